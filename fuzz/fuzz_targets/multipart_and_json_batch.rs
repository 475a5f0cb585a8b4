//! `qscore::http::upload::parse_uploads`: the `/v1/score` body parsers (multipart `image`
//! parts, the JSON batch with base64 data, a raw `image/*` body) and the content-type parsing
//! in front of them.
//!
//! Input: byte 0 picks the content type (low 2 bits: 0 multipart/form-data with boundary
//! `XyZ`, 1 application/json, 2 image/png, 3 the content type is the input up to its first
//! newline) and `max_images` (high 4 bits + 1, so 1..=16); the rest is the body.
//!
//! Properties: no panic; the future completes without waiting (the body is already in memory);
//! an `Ok` holds 1..=max_images uploads, each id at most `MAX_ID_BYTES`, and no upload is
//! larger than the body it came from.
#![no_main]

use bytes::Bytes;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use qscore::http::{bounded::MAX_ID_BYTES, upload::parse_uploads};

pub const BOUNDARY: &str = "XyZ";

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else { return };
    let max_images = usize::from(choice >> 4) + 1;
    let (content_type, body) = match choice & 3 {
        0 => (format!("multipart/form-data; boundary={BOUNDARY}"), rest),
        1 => ("application/json".to_owned(), rest),
        2 => ("image/png".to_owned(), rest),
        _ => {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            (String::from_utf8_lossy(&rest[..end]).into_owned(), rest.get(end + 1..).unwrap_or(&[]))
        }
    };
    let body_len = body.len();
    let result = parse_uploads(&content_type, Bytes::copy_from_slice(body), max_images)
        .now_or_never()
        .expect("parse_uploads must not wait on a body that is already in memory");
    let Ok(uploads) = result else { return };
    assert!(!uploads.is_empty(), "Ok with no upload");
    assert!(uploads.len() <= max_images, "{} uploads past max_images {max_images}", uploads.len());
    for u in &uploads {
        assert!(u.id.len() <= MAX_ID_BYTES, "id of {} bytes", u.id.len());
        if let Ok(d) = &u.bytes {
            assert!(d.len() <= body_len, "an upload of {} bytes from a body of {body_len}", d.len());
        }
    }
});
