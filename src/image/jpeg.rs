//! Where a JPEG ends, found by following its structure (ITU-T T.81, annex B).
//!
//! The JPEG decoder fills a truncated scan with grey and reports success, which would score
//! half a photograph as if it were whole; so an upload is decoded only if its image reaches its
//! end-of-image marker (EOI). Scanning the raw bytes for markers cannot tell where that is: a
//! complete photo is often followed by more data (a phone's motion-photo video, a vendor block,
//! an MPF second picture, an appended archive) that holds FF DA and FF D9 pairs of its own, and
//! an EXIF thumbnail inside APP1 has its own EOI long before the main image's. Walking the
//! segments by their lengths and the entropy-coded data by its byte stuffing finds the one EOI
//! that ends the first image, and nothing after it is read.

/// Why a JPEG has no end: the answer's reason, for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// The bytes stop before the end-of-image marker (inside a segment or a scan).
    Truncated(&'static str),
    /// A segment cannot be what it claims (a length below its own two bytes).
    Corrupt(&'static str),
}

/// What the walk found of the first image in a JPEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Structure {
    /// Its length through its EOI marker: everything after it is not part of the image.
    pub len: usize,
    /// Its frame: the start-of-frame marker's second byte (C0 baseline ... CF) and the sample
    /// precision in bits; `None` if no frame header comes before the first scan.
    pub frame: Option<(u8, u8)>,
    /// Bytes in its application and comment segments (APP0-APP15, COM): what a decoder may keep
    /// as metadata (an ICC profile may span 255 APP2 segments).
    pub metadata_bytes: u64,
}

impl Structure {
    /// The coding process the JPEG decoder does not implement, in words (T.81, table B.1):
    /// only 8-bit Huffman-coded DCT frames (baseline, extended sequential, progressive) decode.
    pub fn unsupported(&self) -> Option<String> {
        let (sof, precision) = self.frame?;
        let process = match sof {
            0xC0..=0xC2 if precision == 8 => return None,
            0xC0..=0xC2 => return Some(format!("{precision}-bit samples")),
            0xC3 => "lossless coding (SOF3)",
            0xC5..=0xC7 => "hierarchical coding",
            0xC9 | 0xCA => "arithmetic coding",
            0xCB => "lossless arithmetic coding",
            _ => "hierarchical arithmetic coding",
        };
        Some(format!("{process}, {precision}-bit samples"))
    }
}

/// Walks the first JPEG image in `bytes` to its EOI marker. `bytes` must start with SOI
/// (FF D8).
pub fn walk(bytes: &[u8]) -> Result<Structure, Incomplete> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err(Incomplete::Corrupt("it does not start with a start-of-image marker"));
    }
    let mut pos = 2;
    let mut frame = None;
    let mut metadata_bytes = 0;
    loop {
        // libjpeg skips stray bytes before a marker with a warning, and any marker may be
        // preceded by fill bytes (FF FF ...); both are read past here.
        while pos < bytes.len() && bytes[pos] != 0xFF {
            pos += 1;
        }
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return Err(Incomplete::Truncated("no end-of-image marker after its last segment"));
        };
        pos += 1;
        match marker {
            0xD9 => return Ok(Structure { len: pos, frame, metadata_bytes }),
            // Standalone markers without a length: TEM, restarts, a repeated SOI; FF 00 is a
            // stuffed byte in stray data, not a marker.
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            _ => {
                let Some(len) = bytes.get(pos..pos + 2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else {
                    return Err(Incomplete::Truncated("it ends inside a segment header"));
                };
                if len < 2 {
                    return Err(Incomplete::Corrupt("a segment declares a length below 2"));
                }
                if pos + len > bytes.len() {
                    return Err(Incomplete::Truncated("it ends inside a segment"));
                }
                // SOF0-SOF15, less DHT (C4), JPG (C8) and DAC (CC); the first is the image's.
                if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) && frame.is_none() {
                    frame = bytes.get(pos + 2).map(|&precision| (marker, precision));
                }
                if matches!(marker, 0xE0..=0xEF | 0xFE) {
                    metadata_bytes += len as u64;
                }
                pos += len;
                if marker == 0xDA {
                    pos = scan_end(bytes, pos)?;
                }
            }
        }
    }
}

/// The offset of the marker that ends the entropy-coded data starting at `pos`: the first FF
/// that is neither a stuffed FF 00 nor a restart marker (FF D0-D7), fill bytes skipped.
fn scan_end(bytes: &[u8], mut pos: usize) -> Result<usize, Incomplete> {
    loop {
        // memchr: the entropy-coded data is most of the file, and a byte-at-a-time search
        // showed as 1.3% of a loaded server's CPU.
        let Some(ff) = memchr::memchr(0xFF, &bytes[pos..]) else {
            return Err(Incomplete::Truncated("it ends inside a scan"));
        };
        pos += ff;
        let mut next = pos + 1;
        while bytes.get(next) == Some(&0xFF) {
            next += 1;
        }
        match bytes.get(next) {
            None => return Err(Incomplete::Truncated("it ends inside a scan")),
            Some(0x00 | 0xD0..=0xD7) => pos = next + 1,
            Some(_) => return Ok(pos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk_len(bytes: &[u8]) -> Result<usize, Incomplete> {
        walk(bytes).map(|s| s.len)
    }

    /// A minimal structure: SOI, a segment, SOS with entropy data, EOI.
    fn jpeg(scan: &[u8]) -> Vec<u8> {
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAB, 0xCD];
        j.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x03, 0x01]);
        j.extend_from_slice(scan);
        j.extend_from_slice(&[0xFF, 0xD9]);
        j
    }

    #[test]
    fn ends_at_the_first_eoi_whatever_follows() {
        let j = jpeg(&[1, 2, 3]);
        assert_eq!(walk_len(&j), Ok(j.len()));
        for tail in
            [&[0xFF, 0xDA][..], &[0xFF, 0xD9], &[0xFF, 0xD8, 0xFF, 0xDA, 0, 3, 1, 9], b"\0\0\0\x18ftypmp42", &[0xFF]]
        {
            let mut t = j.clone();
            t.extend_from_slice(tail);
            assert_eq!(walk_len(&t), Ok(j.len()), "tail {tail:?}");
        }
    }

    /// Stuffed FF 00, restart markers and fill bytes inside a scan do not end it; a DNL segment
    /// after the first scan is a segment like any other.
    #[test]
    fn entropy_data_is_followed_by_its_stuffing() {
        let j = jpeg(&[0xFF, 0x00, 0xFF, 0xD0, 7, 0xFF, 0xD7, 0xFF, 0xFF, 0x00]);
        assert_eq!(walk_len(&j), Ok(j.len()));
        let mut dnl = jpeg(&[5]);
        dnl.truncate(dnl.len() - 2);
        dnl.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xDC, 0x00, 0x04, 0x01, 0x00, 0xFF, 0xD9]);
        assert_eq!(walk_len(&dnl), Ok(dnl.len()));
    }

    /// An EXIF thumbnail is a whole JPEG inside APP1, EOI included: skipped by its length.
    #[test]
    fn a_thumbnail_inside_app1_does_not_end_the_image() {
        let thumb = jpeg(&[4, 4]);
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xE1];
        j.extend_from_slice(&u16::try_from(thumb.len() + 2).unwrap().to_be_bytes());
        j.extend_from_slice(&thumb);
        let main = jpeg(&[1, 2]);
        j.extend_from_slice(&main[2..]);
        assert_eq!(walk_len(&j), Ok(j.len()));
        j.truncate(j.len() - 2);
        assert!(matches!(walk_len(&j), Err(Incomplete::Truncated(_))));
    }

    /// Several scans (a progressive JPEG) with tables between them.
    #[test]
    fn every_scan_is_walked() {
        let mut j = jpeg(&[1, 0xFF, 0x00]);
        j.truncate(j.len() - 2);
        j.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x03, 0xD9, 0xFF, 0xDA, 0x00, 0x03, 0xD9, 8, 0xFF, 0xD9]);
        assert_eq!(walk_len(&j), Ok(j.len()));
    }

    #[test]
    fn truncated_and_corrupt_are_told_apart() {
        let j = jpeg(&[1, 2, 3, 4, 5, 6]);
        for cut in 2..j.len() - 1 {
            assert!(matches!(walk_len(&j[..cut]), Err(Incomplete::Truncated(_))), "cut at {cut}");
        }
        assert!(matches!(walk_len(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0, 0xFF, 0xD9]), Err(Incomplete::Corrupt(_))));
        assert!(matches!(walk_len(b"GIF89a"), Err(Incomplete::Corrupt(_))));
    }
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    fn with_frame(sof: u8, precision: u8) -> Vec<u8> {
        let mut j = vec![0xFF, 0xD8, 0xFF, sof, 0x00, 0x05, precision, 0x00, 0x08];
        j.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x03, 0x01, 0x55, 0xFF, 0xD9]);
        j
    }

    /// The first frame header decides; 8-bit Huffman DCT frames are supported, the rest named.
    #[test]
    fn frames_the_decoder_lacks_are_named() {
        for sof in [0xC0, 0xC1, 0xC2] {
            assert_eq!(walk(&with_frame(sof, 8)).unwrap().unsupported(), None);
        }
        let named = |sof, p| walk(&with_frame(sof, p)).unwrap().unsupported().unwrap();
        assert_eq!(named(0xC1, 12), "12-bit samples");
        assert!(named(0xC3, 8).starts_with("lossless coding"));
        assert!(named(0xC9, 8).starts_with("arithmetic coding"));
        assert!(named(0xC5, 8).starts_with("hierarchical"));
        assert_eq!(walk(&with_frame(0xC4, 8)).unwrap().frame, None);
    }
}
