//! Images real users send, rebuilt after public bug reports of neighbouring decoders
//! (tests/fixtures/cases/README.md says which): each is scored as the picture it holds, or
//! refused with a reason that names its real format.

mod common;

use common::{Server, assert_error, floats, read};
use serde_json::Value;

/// The `/v1/embed` answer for a fixture under cases/: its Q-Score and embedding.
fn embed(s: &Server, name: &str) -> (f64, Vec<f64>) {
    let r = s.post_image("/v1/embed", name, read(&format!("cases/{name}")));
    let status = r.status();
    let text = r.text().unwrap();
    assert_eq!(status, 200, "{name}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (v["q_score"].as_f64().unwrap(), floats(&v["embedding"]))
}

/// Asserts two fixtures give the same Q-Score and the same embedding: the same pixels reached
/// the model.
fn assert_same(s: &Server, a: &str, b: &str) {
    let (qa, ea) = embed(s, a);
    let (qb, eb) = embed(s, b);
    assert_eq!(qa, qb, "{a} and {b}: Q-Scores differ");
    assert_eq!(ea, eb, "{a} and {b}: embeddings differ");
}

/// A complete JPEG followed by anything (the two bytes FF DA, a motion photo's MP4, a cut-off
/// second picture after fill bytes) scores exactly as the JPEG alone; an EXIF thumbnail with its
/// own EOI does not end the image early.
#[test]
fn complete_jpegs_with_trailing_data_score_as_without_it() {
    let s = Server::start(&[]);
    assert_same(&s, "jpeg_base.jpg", "jpeg_trailing_ffda.jpg");
    assert_same(&s, "jpeg_base.jpg", "jpeg_motion_photo.jpg");
    assert_same(&s, "jpeg_progressive_thumbnail.jpg", "jpeg_progressive_thumbnail_mpf_cut.jpg");
}

/// A JPEG cut inside its scan, or whole but for its EOI, is still refused as truncated.
#[test]
fn truncated_jpegs_are_still_refused() {
    let s = Server::start(&[]);
    for name in ["jpeg_cut_mid_scan.jpg", "jpeg_no_eoi.jpg"] {
        let v = assert_error(s.post_image("/v1/score", name, read(&format!("cases/{name}"))), 422, "undecodable_image");
        assert!(v["error"]["message"].as_str().unwrap().contains("truncated"), "{name}: {v}");
    }
}

/// The baseline TIFF types the image crate refuses decode to the same pixels as a PNG of the
/// same picture: palette colour in 8 bits (LZW) and 4 bits, 4-bit WhiteIsZero grey, and a
/// BigTIFF (which the image crate's format sniffing does not know).
#[test]
fn baseline_tiff_types_decode_as_their_png_twins() {
    let s = Server::start(&[]);
    assert_same(&s, "tiff_palette8_lzw.tif", "tiff_palette8_twin.png");
    assert_same(&s, "tiff_palette4.tif", "tiff_palette4_twin.png");
    assert_same(&s, "tiff_grey4_whiteiszero.tif", "tiff_grey4_twin.png");
    assert_same(&s, "tiff_bigtiff.tif", "tiff_rgb_twin.png");
}

/// A variant no decoder here reads is answered 415 with its format and what in it is not
/// supported, never "the bytes are none of JPEG, PNG, ...".
#[test]
fn unsupported_variants_name_their_format() {
    let s = Server::start(&[]);
    for (name, says) in [
        ("jpeg_arithmetic.jpg", "a JPEG with arithmetic coding"),
        ("jpeg_12bit.jpg", "a JPEG with 12-bit samples"),
        ("tiff_float32.tif", "a TIFF with BlackIsZero grey pixels of 1 x 32-bit floating-point samples"),
        ("tiff_ycbcr.tif", "a TIFF with YCbCr pixels"),
    ] {
        let v = assert_error(
            s.post_image("/v1/score", name, read(&format!("cases/{name}"))),
            415,
            "unsupported_image_format",
        );
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(says), "{name}: {message}");
        assert!(!message.contains("none of"), "{name}: {message}");
    }
}
