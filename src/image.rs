//! From encoded bytes to the model's input tensor: decode with limits, orient, convert, resize,
//! crop, normalise.
//!
//! The format is sniffed from the bytes, never taken from a file name or a content type. Limits
//! are checked on the header, before any pixel buffer is allocated, so a 74-byte PNG that
//! declares 100000 x 100000 pixels costs nothing. Resizing uses `fast_image_resize`'s bilinear
//! convolution, which reproduces Pillow's antialiased bilinear filter: with the same
//! shorter-side resize and centre crop as torchvision, the tensors match PyTorch's reference
//! preprocessing (the golden-embedding test holds us to it).
//!
//! Everything here is CPU-bound and synchronous; callers run it on a blocking pool.

use std::io::Cursor;

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image as FirImage};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, metadata::Orientation};
use ndarray::{Array3, ArrayViewMut3};

use crate::{error::Error, model::manifest::Preprocess};

mod jpeg;
mod reduced;
mod tiff_indexed;

/// Limits applied to every image before any of its pixels is decoded.
///
/// Together they bound every buffer [`prepare`] allocates: the decoded image (pixels x bytes
/// per pixel), its colour-converted copy, the resize intermediate (at most
/// `resize_shorter^2 x max_aspect_ratio` pixels) and the output tensor. [`Header::peak_bytes`]
/// states the sum for one image, and callers reserve it before decoding.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest encoded size, in bytes.
    pub max_bytes: usize,
    /// Largest declared width x height.
    pub max_pixels: u64,
    /// Largest ratio of the longer side to the shorter one. The shorter side is resized to the
    /// model's `resize_shorter`, so the intermediate image grows with this ratio, not with the
    /// pixel count: a 1 x 20,000,000 strip would otherwise need a 256 x 5,120,000,000 buffer.
    pub max_aspect_ratio: u32,
}

impl ImageLimits {
    /// The server's defaults (`--max-image-bytes`, `--max-image-pixels`,
    /// `--max-image-aspect-ratio`).
    pub const DEFAULT: Self = Self { max_bytes: 16 << 20, max_pixels: 40_000_000, max_aspect_ratio: 20 };
}

/// Bytes a decoder may allocate for metadata (ICC profiles, text chunks, EXIF, TIFF tags) while
/// reading the header, before the pixel limits are known. The image crate's own default is
/// 512 MiB; a colour profile or caption is never near this.
pub const MAX_METADATA_BYTES: u64 = 4 << 20;

/// The largest DCT partition a lossy WebP header can declare (a 24-bit size), which the decoder
/// allocates before reading it.
const WEBP_PARTITION_BYTES: u64 = 17 << 20;

/// Formats qscore decodes; anything else is `unsupported_image_format`.
const SUPPORTED: [ImageFormat; 6] =
    [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::Tiff];

/// File extensions the offline tools (`score` on a folder, `calibrate`) treat as images. The
/// bytes still decide the format; a file named wrongly gets its own error, not a skip.
const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "pbm"];

/// Whether `path` has an image file extension (case-insensitive).
pub fn has_image_extension(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// What an image's header declares, read and checked against the limits before any pixel
/// buffer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Declared width, in pixels.
    pub width: u32,
    /// Declared height, in pixels.
    pub height: u32,
    /// Size of the decoded buffer in the decoder's own colour type, in bytes.
    pub decoded_bytes: u64,
    /// The decoded colour type; unless it is the model's own layout (L8 or Rgb8), preprocessing
    /// converts a copy.
    pub color: image::ColorType,
    /// The format the bytes are in.
    pub format: ImageFormat,
    /// Bytes of metadata segments a JPEG carries (APPn, COM); 0 for other formats.
    pub metadata_bytes: u64,
}

impl Header {
    /// The most bytes [`prepare`] holds at once for this image with preprocessing `p`: the
    /// decoded buffer, a converted 8-bit copy, the resize intermediate and the output tensor
    /// (a decoder's own row and palette buffers are bounded by [`MAX_METADATA_BYTES`]).
    pub fn peak_bytes(&self, p: &Preprocess) -> u64 {
        let channels = p.channels() as u64;
        let pixels = u64::from(self.width) * u64::from(self.height);
        let layout = if channels == 1 { image::ColorType::L8 } else { image::ColorType::Rgb8 };
        let converted = if self.color == layout { 0 } else { pixels * channels };
        let intermediate = match geometry(self.width, self.height, p) {
            Ok(g) => u64::from(g.resized.0) * u64::from(g.resized.1) * channels,
            Err(_) => 0,
        };
        let tensor = u64::from(p.width) * u64::from(p.height) * channels * 4;
        // What a decoder holds beside its output, measured on 6324 x 6324 images: a progressive
        // JPEG keeps every DCT coefficient (2 bytes a sample) until its last scan; lossless WebP
        // decodes into its own ARGB planes (+1.25x) and TIFF through strip buffers (+0.9x).
        // Lossy WebP also reads each DCT partition into a buffer of the size its header declares
        // (24 bits: up to 16 MiB, whatever the file's size). The WebP partition and the GIF
        // frame buffer were found by the fuzzer's allocation check.
        let decoder_working = match self.format {
            ImageFormat::Jpeg => 2 * self.decoded_bytes,
            ImageFormat::WebP => self.decoded_bytes * 3 / 2 + WEBP_PARTITION_BYTES,
            ImageFormat::Tiff => self.decoded_bytes,
            // GIF decodes a frame (which may be larger than the screen) into its own buffer
            // first, bounded by the decoder's memory limit: the image plus the metadata bound.
            ImageFormat::Gif => self.decoded_bytes + MAX_METADATA_BYTES,
            _ => 0,
        };
        self.decoded_bytes + decoder_working + converted + intermediate + tensor + MAX_METADATA_BYTES
    }
}

/// Reads and checks an image's header: its size in bytes, format, pixel count and aspect ratio.
/// Only metadata is read, within [`MAX_METADATA_BYTES`].
pub fn inspect(bytes: &[u8], limits: &ImageLimits) -> Result<Header, Error> {
    open(bytes, limits).map(|(_, header)| header)
}

/// Opens a decoder on `bytes` and checks its header against `limits`.
fn open<'a>(bytes: &'a [u8], limits: &ImageLimits) -> Result<(Box<dyn ImageDecoder + 'a>, Header), Error> {
    if bytes.is_empty() {
        return Err(Error::EmptyImage);
    }
    if bytes.len() > limits.max_bytes {
        return Err(Error::ImageTooLarge { size: bytes.len(), limit: limits.max_bytes });
    }
    let format = match image::guess_format(bytes) {
        Ok(f) if SUPPORTED.contains(&f) => f,
        // The image crate sniffs classic TIFF only; its TIFF decoder reads BigTIFF too.
        _ if bytes.starts_with(b"II+\0") || bytes.starts_with(b"MM\0+") => ImageFormat::Tiff,
        _ => return Err(Error::UnsupportedFormat),
    };
    // A JPEG is read only up to the EOI that ends its image: what follows (a motion photo's
    // video, an MPF second picture) is not the image, and an image without its EOI is not whole.
    let mut metadata_bytes = 0;
    let bytes = match format {
        ImageFormat::Jpeg => match jpeg::walk(bytes) {
            Ok(jpeg) => match jpeg.unsupported() {
                Some(feature) => return Err(Error::UnsupportedVariant { format: "JPEG", feature }),
                None => {
                    metadata_bytes = jpeg.metadata_bytes;
                    &bytes[..jpeg.len]
                }
            },
            Err(jpeg::Incomplete::Truncated(why)) => {
                return Err(Error::UndecodableImage(format!("the JPEG is truncated: {why}")));
            }
            Err(jpeg::Incomplete::Corrupt(why)) => {
                return Err(Error::UndecodableImage(format!("the JPEG is corrupt: {why}")));
            }
        },
        _ => bytes,
    };
    let fail = |e| undecodable(e, format, bytes);
    let decoder: Box<dyn ImageDecoder + 'a> = if format == ImageFormat::Tiff && tiff_indexed::needs_indexed(bytes) {
        Box::new(tiff_indexed::IndexedTiff::new(bytes).map_err(fail)?)
    } else {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut header_limits = image::Limits::default();
        header_limits.max_alloc = Some(MAX_METADATA_BYTES);
        reader.limits(header_limits);
        Box::new(reader.into_decoder().map_err(fail)?)
    };
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(Error::TooManyPixels { width, height, pixels, limit: limits.max_pixels });
    }
    if pixels == 0 {
        return Err(Error::UndecodableImage(format!("the image declares {width}x{height} pixels")));
    }
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) > u64::from(short) * u64::from(limits.max_aspect_ratio) {
        return Err(Error::AspectRatioTooLarge { width, height, limit: limits.max_aspect_ratio });
    }
    let header = Header {
        width,
        height,
        decoded_bytes: decoder.total_bytes(),
        color: decoder.color_type(),
        format,
        metadata_bytes,
    };
    Ok((decoder, header))
}

/// Decodes one encoded image, applying its EXIF orientation, after checking `limits` on the
/// header alone.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, Error> {
    let (mut decoder, header) = open(bytes, limits)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    decode_opened(decoder, header, orientation, bytes)
}

/// Decodes every pixel of an image [`open`] has checked, then applies `orientation`.
fn decode_opened(
    mut decoder: Box<dyn ImageDecoder + '_>,
    header: Header,
    orientation: Orientation,
    bytes: &[u8],
) -> Result<DynamicImage, Error> {
    // The header is checked: the decoder may now allocate the declared image, and a little
    // beyond it for its own rows and palettes.
    let mut decode_limits = image::Limits::default();
    decode_limits.max_alloc = Some(header.decoded_bytes.saturating_add(MAX_METADATA_BYTES));
    let fail = |e| undecodable(e, header.format, bytes);
    decoder.set_limits(decode_limits).map_err(fail)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(fail)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Whether an EXIF orientation swaps width and height.
fn transposes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

/// The decoder's error as the client's: a variant the decoder does not read names the format
/// and the variant (for a TIFF, its tags), since the bytes are in a format qscore reads.
fn undecodable(e: image::ImageError, format: ImageFormat, bytes: &[u8]) -> Error {
    match e {
        image::ImageError::Unsupported(u) => {
            let said = match u.kind() {
                image::error::UnsupportedErrorKind::Color(c) => format!("colour type {c:?}"),
                image::error::UnsupportedErrorKind::GenericFeature(f) => f,
                _ => u.to_string(),
            };
            let feature = match format {
                ImageFormat::Tiff => format!("{} ({said})", tiff_indexed::describe(bytes)),
                _ => said,
            };
            Error::UnsupportedVariant { format: format_name(format), feature }
        }
        image::ImageError::Limits(l) => Error::UndecodableImage(format!("decoder memory limit: {l}")),
        e => Error::UndecodableImage(e.to_string()),
    }
}

/// A format's name as users know it.
fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

/// The target geometry: where the image is resized to, and the centred window cut from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    resized: (u32, u32),
    crop_left: u32,
    crop_top: u32,
}

/// torchvision's `Resize(s)` (shorter side to s, the longer side truncated, as in
/// `int(s * long / short)`) followed by `CenterCrop` (offsets `int(round((len - crop) / 2))`);
/// without `resize_shorter`, a plain resize to the input size. Sizes are computed in 64 bits;
/// one that does not fit 32 is refused rather than wrapped.
fn geometry(width: u32, height: u32, p: &Preprocess) -> Result<Geometry, Error> {
    let (out_w, out_h) = (p.width, p.height);
    let Some(s) = p.resize_shorter else {
        return Ok(Geometry { resized: (out_w, out_h), crop_left: 0, crop_top: 0 });
    };
    let long_side = |long: u32, short: u32| {
        u32::try_from(u64::from(s) * u64::from(long) / u64::from(short.max(1)))
            .map_err(|_| Error::AspectRatioTooLarge { width, height, limit: u32::MAX / s.max(1) })
    };
    let resized = if width <= height { (s, long_side(height, width)?) } else { (long_side(width, height)?, s) };
    // Python's round() is half-to-even; offsets are integers or .5, so match it exactly.
    let offset = |len: u32, crop: u32| ((f64::from(len) - f64::from(crop)) / 2.0).round_ties_even().max(0.0) as u32;
    Ok(Geometry { resized, crop_left: offset(resized.0, out_w), crop_top: offset(resized.1, out_h) })
}

/// Decoded image → resized, cropped, normalised tensor of shape (channels, height, width).
pub fn preprocess(image: &DynamicImage, p: &Preprocess) -> Result<Array3<f32>, Error> {
    resize_crop_normalise(image, geometry(image.width(), image.height(), p)?, p)
}

/// Resizes `image` to `g.resized` whatever its own size (a reduced decode is smaller than the
/// image `g` was computed for), then cuts and normalises the crop window.
fn resize_crop_normalise(image: &DynamicImage, g: Geometry, p: &Preprocess) -> Result<Array3<f32>, Error> {
    let channels = p.channels();
    // Greyscale models take luma; colour models take RGB with alpha dropped (as Pillow's
    // convert("RGB") does). 16-bit samples are scaled to 8 bits, as the reference pipeline does.
    // An image already in the model's layout is resized in place, without a copy.
    let converted;
    let (pixels, pixel_type) = match (channels, image) {
        (1, DynamicImage::ImageLuma8(_)) => (image, PixelType::U8),
        (1, _) => {
            converted = DynamicImage::ImageLuma8(image.to_luma8());
            (&converted, PixelType::U8)
        }
        (_, DynamicImage::ImageRgb8(_)) => (image, PixelType::U8x3),
        _ => {
            converted = DynamicImage::ImageRgb8(image.to_rgb8());
            (&converted, PixelType::U8x3)
        }
    };
    let mut resized = FirImage::new(g.resized.0, g.resized.1, pixel_type);
    Resizer::new()
        .resize(pixels, &mut resized, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)))
        .map_err(|e| Error::Internal(format!("resize: {e}")))?;

    let mut out = Array3::<f32>::zeros((channels, p.height as usize, p.width as usize));
    normalise_into(resized.buffer(), g, channels, p, out.view_mut());
    Ok(out)
}

/// Copies the crop window of an interleaved u8 buffer into planar f32, as
/// `(x / 255 - mean) / std` per channel.
fn normalise_into(buf: &[u8], g: Geometry, channels: usize, p: &Preprocess, mut out: ArrayViewMut3<f32>) {
    let stride = g.resized.0 as usize * channels;
    let scale: Vec<f32> = p.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
    let shift: Vec<f32> = p.mean.iter().zip(&p.std).map(|(m, s)| m / s).collect();
    for y in 0..p.height as usize {
        let row = &buf[(g.crop_top as usize + y) * stride..];
        for x in 0..p.width as usize {
            let px = &row[(g.crop_left as usize + x) * channels..][..channels];
            for c in 0..channels {
                out[[c, y, x]] = f32::from(px[c]) * scale[c] - shift[c];
            }
        }
    }
}

/// Decode then preprocess: the whole path from bytes to tensor.
///
/// With `p.jpeg_dct_scaling`, a JPEG large enough is decoded at a reduced scale
/// (`reduced`), and the geometry still comes from its full size, so the crop is the
/// exact path's window. A JPEG whose metadata segments exceed [`MAX_METADATA_BYTES`] takes the
/// exact path, whose decoder bounds what it keeps of them.
pub fn prepare(bytes: &[u8], limits: &ImageLimits, p: &Preprocess) -> Result<Array3<f32>, Error> {
    let (mut decoder, header) = open(bytes, limits)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    if p.jpeg_dct_scaling && header.format == ImageFormat::Jpeg && header.metadata_bytes <= MAX_METADATA_BYTES {
        let (w, h) = (header.width, header.height);
        let g = if transposes(orientation) { geometry(h, w, p)? } else { geometry(w, h, p)? };
        let need = if transposes(orientation) { (g.resized.1, g.resized.0) } else { g.resized };
        if let Some(mut small) = reduced::decode(bytes, (w, h), need, header.decoded_bytes) {
            small.apply_orientation(orientation);
            return resize_crop_normalise(&small, g, p);
        }
    }
    preprocess(&decode_opened(decoder, header, orientation, bytes)?, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imagenet() -> Preprocess {
        Preprocess {
            width: 224,
            height: 224,
            resize_shorter: Some(256),
            color: crate::model::manifest::Color::Rgb,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            jpeg_dct_scaling: false,
        }
    }

    /// torchvision: a 640x427 photo resizes to int(256 * 640 / 427) = 383 x 256; the crop
    /// offsets are round((383 - 224) / 2) = round(79.5) = 80 (half to even) and 16.
    #[test]
    fn geometry_matches_torchvision() {
        let g = geometry(640, 427, &imagenet()).unwrap();
        assert_eq!(g, Geometry { resized: (383, 256), crop_left: 80, crop_top: 16 });
        let g = geometry(300, 451, &imagenet()).unwrap();
        assert_eq!(g.resized, (256, 384));
        assert_eq!((g.crop_left, g.crop_top), (16, 80));
        let mut plain = imagenet();
        plain.resize_shorter = None;
        assert_eq!(geometry(999, 3, &plain).unwrap(), Geometry { resized: (224, 224), crop_left: 0, crop_top: 0 });
    }

    #[test]
    fn normalisation_is_per_channel() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(300, 300, image::Rgb([255, 0, 128])));
        let t = preprocess(&img, &imagenet()).unwrap();
        assert_eq!(t.dim(), (3, 224, 224));
        let expect = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128.0 / 255.0 - 0.406) / 0.225];
        for (c, e) in expect.iter().enumerate() {
            assert!((t[[c, 100, 100]] - e).abs() < 1e-5, "channel {c}: {} vs {e}", t[[c, 100, 100]]);
        }
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        DynamicImage::ImageLuma8(image::GrayImage::new(width, height))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        png
    }

    /// A strip is refused on its header, before any buffer sized from it exists: a 1 x 16,777,217
    /// strip used to wrap a 32-bit size and be scored squashed, a 1 x 20,000,000 one to ask for
    /// a 633 GB resize buffer.
    #[test]
    fn strips_are_refused_by_aspect_ratio() {
        let limits = ImageLimits::DEFAULT;
        for (w, h) in [(1, 21), (21, 1), (40, 1_000), (5_000, 1)] {
            assert!(
                matches!(inspect(&png(w, h), &limits), Err(Error::AspectRatioTooLarge { limit: 20, .. })),
                "{w}x{h}"
            );
        }
        for (w, h) in [(1, 20), (20, 1), (300, 6_000)] {
            assert!(inspect(&png(w, h), &limits).is_ok(), "{w}x{h}");
        }
        let strip = Preprocess { resize_shorter: Some(256), ..imagenet() };
        assert!(matches!(geometry(1, 16_777_217, &strip), Err(Error::AspectRatioTooLarge { .. })));
        assert_eq!(geometry(1, 16_777_215, &strip).unwrap().resized, (256, 4_294_967_040));
    }

    /// peak_bytes by hand: a 300x600 grey PNG for ImageNet: decoded 180,000 (L8, so RGB is a
    /// copy: 540,000), resized to 256x512x3 = 393,216, tensor 224*224*3*4 = 602,112, plus the
    /// metadata allowance.
    #[test]
    fn peak_bytes_counts_every_buffer() {
        let h = inspect(&png(300, 600), &ImageLimits::DEFAULT).unwrap();
        assert_eq!(h.decoded_bytes, 180_000);
        assert_eq!(h.peak_bytes(&imagenet()), 180_000 + 540_000 + 393_216 + 602_112 + MAX_METADATA_BYTES);
        let grey = Preprocess {
            width: 28,
            height: 28,
            resize_shorter: None,
            color: crate::model::manifest::Color::Grey,
            mean: vec![0.5],
            std: vec![0.5],
            jpeg_dct_scaling: false,
        };
        assert_eq!(h.peak_bytes(&grey), 180_000 + 784 + 784 * 4 + MAX_METADATA_BYTES);
    }

    fn cosine(a: &Array3<f32>, b: &Array3<f32>) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        let norm = |v: &Array3<f32>| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    }

    /// A reduced decode keeps the exact path's geometry, EXIF rotation included: on a photo
    /// stored 451x300 with orientation 6 (shown 300x451), the centred 28x28 grey tensor from a
    /// 1/8 decode has cosine 0.979 with the exact one; the same photo left unrotated has 0.09.
    #[test]
    fn a_reduced_decode_keeps_the_rotation_and_the_window() {
        let bytes =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/formats/chelsea_exif6.jpg")).unwrap();
        let grey = Preprocess {
            width: 28,
            height: 28,
            resize_shorter: None,
            color: crate::model::manifest::Color::Grey,
            mean: vec![0.45],
            std: vec![0.25],
            jpeg_dct_scaling: false,
        };
        let limits = ImageLimits::DEFAULT;
        let exact = prepare(&bytes, &limits, &grey).unwrap();
        let reduced = prepare(&bytes, &limits, &Preprocess { jpeg_dct_scaling: true, ..grey.clone() }).unwrap();
        assert_eq!(exact.dim(), reduced.dim());
        assert_ne!(exact, reduced, "the reduced path was not taken");
        let c = cosine(&exact, &reduced);
        assert!(c > 0.97, "cosine {c}");
        let unrotated = preprocess(&decode_unrotated(&bytes), &grey).unwrap();
        assert!(cosine(&exact, &unrotated) < 0.5, "rotation does not matter to this image");
    }

    fn decode_unrotated(bytes: &[u8]) -> DynamicImage {
        image::load_from_memory_with_format(bytes, ImageFormat::Jpeg).unwrap()
    }

    #[test]
    fn limits_are_checked_before_decoding() {
        let limits = ImageLimits { max_bytes: 1 << 20, max_pixels: 1000, max_aspect_ratio: 20 };
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(image::RgbImage::new(40, 40))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(matches!(decode(&png, &limits), Err(Error::TooManyPixels { pixels: 1600, .. })));
        assert!(matches!(decode(&[], &limits), Err(Error::EmptyImage)));
        assert!(matches!(decode(b"hello, world", &limits), Err(Error::UnsupportedFormat)));
        let small = ImageLimits { max_bytes: 10, ..limits };
        assert!(matches!(decode(&png, &small), Err(Error::ImageTooLarge { .. })));
    }
}
