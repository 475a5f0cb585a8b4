//! A large JPEG decoded at 1/4 or 1/8 of its size in the DCT domain.
//!
//! The inverse DCT of an 8x8 block can produce 4x4, 2x2 or 1x1 pixels straight from its
//! low-frequency coefficients (libjpeg's scaled decoding). A 3840x2400 photo bound for a 224x224
//! input then costs a sixteenth of the IDCT, upsampling and colour conversion, and the resizer
//! starts from a sixteenth of the pixels. The entropy decoding is the same, so the saving grows
//! with the reduction. The tensor is not the exact path's (the reduced IDCT's low-pass is not
//! the bilinear filter's), so this is a per-model choice, `[preprocess] jpeg_dct_scaling`, with
//! its measured agreement in the README (Benchmarks).
//!
//! image-rs's `jpeg-decoder` does the scaling; zune-jpeg, the image crate's JPEG decoder, has no
//! scaled mode. `jpeg-decoder`'s entropy decoding, which no reduction skips, is about twice as
//! slow as zune-jpeg's, and for a progressive file slower still, so only reductions of 1/4 and
//! 1/8 of sequential files are taken; everything else takes the exact path. Measured on 29
//! photos (`make dct-scaling-bench`, README), the reduced path is 1.66x faster for a 28x28
//! model, where resizing every decoded pixel dominates, and no faster (0.96x) for MobileNet's
//! 256-pixel resize.

use image::{DynamicImage, GrayImage, RgbImage};

/// Numerators over 8 of the scales worth decoding at, smallest first: 1/8 and 1/4 (see the
/// module doc for why not 1/2).
const SCALES: [u32; 2] = [1, 2];

/// The size a `len`-pixel side decodes to at `scale`/8: libjpeg's `ceil(len * scale / 8)`.
fn scaled(len: u32, scale: u32) -> u32 {
    (len * scale).div_ceil(8)
}

/// The smallest scale (numerator over 8) that still gives at least `need` pixels on both sides
/// of a `size` image, or `None` when none of [`SCALES`] does.
pub fn choose_scale(size: (u32, u32), need: (u32, u32)) -> Option<u32> {
    SCALES.into_iter().find(|&s| scaled(size.0, s) >= need.0 && scaled(size.1, s) >= need.1)
}

/// Decodes `jpeg` (a whole baseline or progressive JPEG of `size` pixels, as stored, before any
/// EXIF rotation) at the smallest scale that keeps `need` pixels on both sides. `max_bytes`
/// bounds the decoded buffer.
///
/// `None` asks the caller for the exact path: no reduction keeps `need`, the file is
/// progressive (slower here than the exact path), the colour layout is one the exact decoder
/// converts better (CMYK), or this decoder refused the file (the exact decoder then gives the
/// client its own reason).
pub fn decode(jpeg: &[u8], size: (u32, u32), need: (u32, u32), max_bytes: u64) -> Option<DynamicImage> {
    let scale = choose_scale(size, need)?;
    let (w, h) = (scaled(size.0, scale), scaled(size.1, scale));
    let mut decoder = jpeg_decoder::Decoder::new(jpeg);
    decoder.set_max_decoding_buffer_size(usize::try_from(max_bytes).unwrap_or(usize::MAX));
    // The decoder picks the smallest scale reaching the request on *either* side; asking for
    // exactly what `scale` gives and checking both sides afterwards keeps `need` on both.
    let (got_w, got_h) = decoder.scale(u16::try_from(w).ok()?, u16::try_from(h).ok()?).ok()?;
    if (u32::from(got_w), u32::from(got_h)) != (w, h)
        || decoder.info()?.coding_process != jpeg_decoder::CodingProcess::DctSequential
    {
        return None;
    }
    let pixels = decoder.decode().ok()?;
    match decoder.info()?.pixel_format {
        jpeg_decoder::PixelFormat::L8 => GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
        jpeg_decoder::PixelFormat::RGB24 => RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
        jpeg_decoder::PixelFormat::L16 | jpeg_decoder::PixelFormat::CMYK32 => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: 3840x2400 needing 409x256 (ImageNet's resize of a 16:10 photo) reduces to
    /// 1/8 (480x300), 2000x1500 to 1/4 (500x375); 1000x700 would need 1/2, which is not worth
    /// it; 1024x1024 for 28x28 reaches 1/8.
    #[test]
    fn the_smallest_scale_that_keeps_both_sides() {
        assert_eq!(choose_scale((3840, 2400), (409, 256)), Some(1));
        assert_eq!(choose_scale((2000, 1500), (341, 256)), Some(2));
        assert_eq!(choose_scale((1000, 700), (365, 256)), None);
        assert_eq!(choose_scale((640, 427), (383, 256)), None);
        assert_eq!(choose_scale((1024, 1024), (28, 28)), Some(1));
        // ceil: 1025 / 4 = 256.25 decodes to 257 pixels, 1023 / 4 to 256: enough for 256; 1019 is not.
        assert_eq!(choose_scale((1025, 1025), (256, 256)), Some(2));
        assert_eq!(choose_scale((1019, 1400), (256, 350)), None);
    }

    fn jpeg(width: u32, height: u32, grey: bool) -> Vec<u8> {
        let img = if grey {
            DynamicImage::ImageLuma8(GrayImage::from_fn(width, height, |x, y| image::Luma([((x ^ y) & 0xFF) as u8])))
        } else {
            DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
                image::Rgb([(x & 0xFF) as u8, (y & 0xFF) as u8, ((x + y) & 0xFF) as u8])
            }))
        };
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
        out
    }

    #[test]
    fn decodes_at_the_chosen_size_in_the_stored_layout() {
        let rgb = decode(&jpeg(600, 400, false), (600, 400), (140, 100), u64::MAX).unwrap();
        assert_eq!((rgb.width(), rgb.height()), (150, 100));
        let eighth = decode(&jpeg(600, 400, false), (600, 400), (70, 50), u64::MAX).unwrap();
        assert_eq!((eighth.width(), eighth.height()), (75, 50));
        assert!(matches!(rgb, DynamicImage::ImageRgb8(_)));
        let grey = decode(&jpeg(600, 400, true), (600, 400), (75, 50), u64::MAX).unwrap();
        assert_eq!((grey.width(), grey.height()), (75, 50));
        assert!(matches!(grey, DynamicImage::ImageLuma8(_)));
    }

    /// What it cannot do well it leaves to the exact path: no useful reduction, a progressive
    /// file, a buffer over the bound, bytes it cannot read.
    #[test]
    fn hands_back_what_it_should_not_decode() {
        let j = jpeg(600, 400, false);
        assert!(decode(&j, (600, 400), (300, 200), u64::MAX).is_none());
        let progressive =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cases/jpeg_progressive_thumbnail.jpg"))
                .unwrap();
        assert!(decode(&progressive, (64, 48), (1, 1), u64::MAX).is_none());
        assert!(decode(&j, (600, 400), (150, 100), 1000).is_none());
        assert!(decode(b"\xFF\xD8\xFF\xDBnot a table", (600, 400), (150, 100), u64::MAX).is_none());
    }
}
