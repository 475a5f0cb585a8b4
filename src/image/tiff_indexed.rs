//! The baseline TIFF types the image crate refuses: palette colour (PhotometricInterpretation 3
//! with a ColorMap, 1 to 8 bits) and 2- or 4-bit grey.
//!
//! Both are in every TIFF reader's baseline (TIFF 6.0, section 4 and 5), and scanners and old
//! fax and GIS tools write them. The `tiff` crate does the reading (strips, tiles, PackBits, LZW,
//! Deflate, WhiteIsZero); only the last step, from packed samples to 8-bit pixels, is ours. The
//! `tiff` crate refuses to read the samples of a palette image, so its decoder reads the file
//! through [`Patched`], which shows the PhotometricInterpretation tag as grey (BlackIsZero),
//! and the palette is applied here from the ColorMap tag.

use std::io::{Cursor, Read, Seek, SeekFrom};

use image::{ColorType, ImageDecoder, ImageError, ImageResult, error};
use tiff::{
    decoder::{Decoder, DecodingResult, Limits},
    tags::{ByteOrder, Tag},
};

use super::MAX_METADATA_BYTES;

/// PhotometricInterpretation values (TIFF 6.0, section 3 and 5).
const WHITE_IS_ZERO: u16 = 0;
const BLACK_IS_ZERO: u16 = 1;
const PALETTE: u16 = 3;

/// A decoder for the low-depth grey and palette TIFFs, with the image crate's interface so
/// that the header checks and decode limits apply to it as to every other format.
pub struct IndexedTiff<'a> {
    /// An `Option` only so that `with_limits`, which takes the decoder by value, can be called.
    inner: Option<Decoder<Patched<'a>>>,
    dimensions: (u32, u32),
    bits: u8,
    /// The ColorMap, 8 bits a channel; `None` for grey.
    palette: Option<Vec<[u8; 3]>>,
}

/// Whether a TIFF needs [`IndexedTiff`]: palette colour, or grey in 2 or 4 bits (the image
/// crate reads 1, 8 and 16).
pub fn needs_indexed(bytes: &[u8]) -> bool {
    let Ok(mut d) = Decoder::new(Cursor::new(bytes)) else { return false };
    let photometric = d.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation).ok().flatten();
    let samples = d.find_tag_unsigned::<u16>(Tag::SamplesPerPixel).ok().flatten().unwrap_or(1);
    let bits = d.find_tag_unsigned_vec::<u16>(Tag::BitsPerSample).ok().flatten().unwrap_or_else(|| vec![1]);
    match photometric {
        Some(PALETTE) => true,
        Some(WHITE_IS_ZERO | BLACK_IS_ZERO) => samples == 1 && matches!(bits.as_slice(), [2 | 4]),
        _ => false,
    }
}

impl<'a> IndexedTiff<'a> {
    /// Reads the header and the ColorMap; metadata allocations stay within
    /// [`MAX_METADATA_BYTES`].
    pub fn new(bytes: &'a [u8]) -> ImageResult<Self> {
        let mut probe = Decoder::new(Cursor::new(bytes)).map_err(tiff_error)?;
        let order = probe.byte_order();
        let ifd = probe.ifd_pointer().map(|p| p.0);
        let photometric = probe.get_tag_unsigned::<u16>(Tag::PhotometricInterpretation).map_err(tiff_error)?;
        // Its directory is freed before the decoder that reads the pixels parses its own.
        drop(probe);
        let patch = if photometric == PALETTE {
            let at = ifd
                .and_then(|ifd| {
                    photometric_value_offset(
                        bytes,
                        ifd,
                        order,
                        bytes.starts_with(b"II+\0") || bytes.starts_with(b"MM\0+"),
                    )
                })
                .ok_or_else(|| decoding("the PhotometricInterpretation tag cannot be located"))?;
            let value = match order {
                ByteOrder::LittleEndian => BLACK_IS_ZERO.to_le_bytes(),
                ByteOrder::BigEndian => BLACK_IS_ZERO.to_be_bytes(),
            };
            Some((at, value))
        } else {
            None
        };
        let mut inner = Decoder::new(Patched { bytes, pos: 0, patch }).map_err(tiff_error)?;
        inner = inner.with_limits(metadata_limits(MAX_METADATA_BYTES));
        let dimensions = inner.dimensions().map_err(tiff_error)?;
        let bits = match inner.colortype().map_err(tiff_error)? {
            tiff::ColorType::Gray(b @ (1 | 2 | 4 | 8)) => b,
            other => return Err(unsupported(format!("{other:?} samples in a palette or grey image"))),
        };
        let palette = if patch.is_some() {
            let map = inner.get_tag_u16_vec(Tag::ColorMap).map_err(tiff_error)?;
            let n = 1usize << bits;
            if map.len() != 3 * n {
                return Err(decoding(&format!(
                    "the ColorMap has {} entries; {bits}-bit samples need {}",
                    map.len(),
                    3 * n
                )));
            }
            // The ColorMap holds all reds, then all greens, then all blues, 16 bits each.
            Some((0..n).map(|i| [0, 1, 2].map(|c| (map[c * n + i] >> 8) as u8)).collect())
        } else {
            None
        };
        Ok(Self { inner: Some(inner), dimensions, bits, palette })
    }
}

/// tiff limits for reading metadata, plus `decoded` bytes for the packed samples.
fn metadata_limits(decoded: u64) -> Limits {
    let mut limits = Limits::default();
    limits.decoding_buffer_size = usize::try_from(decoded).unwrap_or(usize::MAX);
    limits.intermediate_buffer_size = MAX_METADATA_BYTES as usize;
    limits.ifd_value_size = MAX_METADATA_BYTES as usize;
    limits
}

impl ImageDecoder for IndexedTiff<'_> {
    fn dimensions(&self) -> (u32, u32) {
        self.dimensions
    }

    fn color_type(&self) -> ColorType {
        if self.palette.is_some() { ColorType::Rgb8 } else { ColorType::L8 }
    }

    fn orientation(&mut self) -> ImageResult<image::metadata::Orientation> {
        let Some(inner) = self.inner.as_mut() else { return Ok(image::metadata::Orientation::NoTransforms) };
        Ok(inner
            .find_tag_unsigned::<u16>(Tag::Orientation)
            .ok()
            .flatten()
            .and_then(|v| image::metadata::Orientation::from_exif(v.min(255) as u8))
            .unwrap_or(image::metadata::Orientation::NoTransforms))
    }

    fn set_limits(&mut self, limits: image::Limits) -> ImageResult<()> {
        let (w, h) = self.dimensions;
        limits.check_dimensions(w, h)?;
        // The packed samples, at most one byte a pixel, are the decoder's working buffer beside
        // the output, as the strip buffer is for the image crate's TIFF decoder.
        let packed = u64::from(w.div_ceil(8 / u32::from(self.bits))) * u64::from(h);
        if limits.max_alloc.is_some_and(|max| packed > max) {
            return Err(ImageError::Limits(error::LimitError::from_kind(error::LimitErrorKind::InsufficientMemory)));
        }
        self.inner = self.inner.take().map(|d| d.with_limits(metadata_limits(packed)));
        Ok(())
    }

    fn read_image(mut self, buf: &mut [u8]) -> ImageResult<()> {
        let mut packed = DecodingResult::U8(Vec::new());
        let Some(inner) = self.inner.as_mut() else { return Err(decoding("the decoder is gone")) };
        inner.read_image_to_buffer(&mut packed).map_err(tiff_error)?;
        let DecodingResult::U8(packed) = packed else {
            return Err(decoding("the samples are not bytes"));
        };
        let (w, h) = (self.dimensions.0 as usize, self.dimensions.1 as usize);
        let bits = usize::from(self.bits);
        let row_bytes = (w * bits).div_ceil(8);
        if packed.len() < row_bytes * h {
            return Err(decoding("fewer samples than the image declares"));
        }
        let max = (1u16 << bits) - 1;
        let channels = if self.palette.is_some() { 3 } else { 1 };
        for (row, out) in packed.chunks_exact(row_bytes).zip(buf.chunks_exact_mut(w * channels)) {
            for (x, px) in out.chunks_exact_mut(channels).enumerate() {
                let bit = x * bits;
                let v = (row[bit / 8] >> (8 - bits - bit % 8)) & max as u8;
                match &self.palette {
                    Some(p) => px.copy_from_slice(&p[usize::from(v)]),
                    // Scaled as Pillow does: 4-bit 15 and 2-bit 3 are white.
                    None => px[0] = (u16::from(v) * 255 / max) as u8,
                }
            }
        }
        Ok(())
    }

    fn read_image_boxed(self: Box<Self>, buf: &mut [u8]) -> ImageResult<()> {
        (*self).read_image(buf)
    }
}

/// Where the PhotometricInterpretation value sits in the IFD at `ifd`: a SHORT, stored in the
/// entry's own value field.
fn photometric_value_offset(bytes: &[u8], ifd: u64, order: ByteOrder, big: bool) -> Option<usize> {
    let u16_at = |at: usize| {
        let b: [u8; 2] = bytes.get(at..at + 2)?.try_into().ok()?;
        Some(match order {
            ByteOrder::LittleEndian => u16::from_le_bytes(b),
            ByteOrder::BigEndian => u16::from_be_bytes(b),
        })
    };
    let ifd = usize::try_from(ifd).ok()?;
    let (count, first, size, value) = if big {
        let b: [u8; 8] = bytes.get(ifd..ifd + 8)?.try_into().ok()?;
        let n = match order {
            ByteOrder::LittleEndian => u64::from_le_bytes(b),
            ByteOrder::BigEndian => u64::from_be_bytes(b),
        };
        (usize::try_from(n).ok()?, ifd + 8, 20, 12)
    } else {
        (usize::from(u16_at(ifd)?), ifd + 2, 12, 8)
    };
    (0..count)
        .map(|i| first + i * size)
        .find(|&e| u16_at(e) == Some(262) && u16_at(e + 2) == Some(3))
        .map(|e| e + value)
}

/// The file's bytes with two of them replaced: a reader, so that nothing is copied.
struct Patched<'a> {
    bytes: &'a [u8],
    pos: u64,
    patch: Option<(usize, [u8; 2])>,
}

impl Read for Patched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = usize::try_from(self.pos).unwrap_or(usize::MAX).min(self.bytes.len());
        let n = buf.len().min(self.bytes.len() - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        if let Some((at, value)) = self.patch {
            for (i, v) in value.iter().enumerate() {
                if (start..start + n).contains(&(at + i)) {
                    buf[at + i - start] = *v;
                }
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Patched<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => (self.bytes.len() as u64).checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            base.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

fn decoding(what: &str) -> ImageError {
    ImageError::Decoding(error::DecodingError::new(image::ImageFormat::Tiff.into(), what.to_owned()))
}

fn unsupported(what: String) -> ImageError {
    ImageError::Unsupported(error::UnsupportedError::from_format_and_kind(
        image::ImageFormat::Tiff.into(),
        error::UnsupportedErrorKind::GenericFeature(what),
    ))
}

/// The tiff crate's errors, sorted as the image crate sorts them.
fn tiff_error(e: tiff::TiffError) -> ImageError {
    match e {
        tiff::TiffError::UnsupportedError(u) => unsupported(u.to_string()),
        tiff::TiffError::LimitsExceeded => {
            ImageError::Limits(error::LimitError::from_kind(error::LimitErrorKind::InsufficientMemory))
        }
        tiff::TiffError::IoError(e) => ImageError::IoError(e),
        e => decoding(&e.to_string()),
    }
}

/// A TIFF's pixel layout in words, from its tags: what an unsupported-variant answer names.
pub fn describe(bytes: &[u8]) -> String {
    let Ok(mut d) = Decoder::new(Cursor::new(bytes)) else { return "an unreadable first directory".into() };
    let mut tag = |t| d.find_tag_unsigned_vec::<u16>(t).ok().flatten().unwrap_or_default();
    let photometric = match tag(Tag::PhotometricInterpretation).first() {
        Some(0) => "WhiteIsZero grey".to_owned(),
        Some(1) => "BlackIsZero grey".to_owned(),
        Some(2) => "RGB".to_owned(),
        Some(3) => "palette".to_owned(),
        Some(4) => "transparency mask".to_owned(),
        Some(5) => "CMYK".to_owned(),
        Some(6) => "YCbCr".to_owned(),
        Some(8..=10) => "CIE L*a*b*".to_owned(),
        Some(p) => format!("PhotometricInterpretation {p}"),
        None => "no PhotometricInterpretation".to_owned(),
    };
    let bits = tag(Tag::BitsPerSample);
    let sample = match tag(Tag::SampleFormat).first() {
        Some(2) => "signed integer",
        Some(3) => "floating-point",
        Some(4) => "undefined",
        _ => "unsigned integer",
    };
    let compression = match tag(Tag::Compression).first().copied().unwrap_or(1) {
        1 => "uncompressed".to_owned(),
        2 => "CCITT RLE".to_owned(),
        3 | 4 => "CCITT fax".to_owned(),
        5 => "LZW".to_owned(),
        6 | 7 => "JPEG".to_owned(),
        8 | 32946 => "Deflate".to_owned(),
        32773 => "PackBits".to_owned(),
        c => format!("compression {c}"),
    };
    let depth = match bits.as_slice() {
        [] => "1-bit".to_owned(),
        [b, rest @ ..] if rest.iter().all(|r| r == b) => format!("{} x {b}-bit", bits.len()),
        _ => format!("{bits:?}-bit"),
    };
    format!("{photometric} pixels of {depth} {sample} samples, {compression}")
}
