//! `qscore::http::kserve::{Parsed, parse}`: the KServe v2 / Open Inference Protocol request, in its JSON
//! form (base64 strings, nested lists flattened) and its binary-data form
//! (`Inference-Header-Content-Length`, then u32-LE length-prefixed BYTES elements).
//!
//! Input: byte 0 picks the `inference-header-content-length` header (low 2 bits: 0 none,
//! 1 the decimal value of the next two bytes as a little-endian u16, 2 the bytes up to the
//! first newline verbatim, 3 the body's length minus the next byte) and `max_images`
//! (high 4 bits + 1, so 1..=16); the rest is the body.
//!
//! Properties: no panic; an `Ok` has exactly one input tensor, between 1 and `max_images`
//! images, and, in the binary form, images that are slices of the body past the JSON header.
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use qscore::http::kserve::{Parsed, parse};

const HEADER: &str = "inference-header-content-length";

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else { return };
    let max_images = usize::from(choice >> 4) + 1;
    let mut headers = HeaderMap::new();
    let body: &[u8] = match choice & 3 {
        0 => rest,
        1 => {
            let Some((len, body)) = rest.split_first_chunk::<2>() else { return };
            headers.insert(HEADER, HeaderValue::from(u16::from_le_bytes(*len)));
            body
        }
        2 => {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let Ok(v) = HeaderValue::from_bytes(&rest[..end]) else { return };
            headers.insert(HEADER, v);
            rest.get(end + 1..).unwrap_or(&[])
        }
        _ => {
            let Some((&back, body)) = rest.split_first() else { return };
            headers.insert(HEADER, HeaderValue::from(body.len().saturating_sub(usize::from(back))));
            body
        }
    };
    let body = Bytes::copy_from_slice(body);
    let Ok(Parsed { request, images, confidence }) = parse(&headers, &body, max_images) else { return };
    assert!((1..=2).contains(&request.inputs.len()));
    if let Some(c) = &confidence {
        assert_eq!(c.len(), images.len(), "one confidence per image");
        assert!(c.iter().all(|v| (0.0..=1.0).contains(v)), "{c:?}");
    }
    assert!((1..=max_images).contains(&images.len()), "{} images, max_images {max_images}", images.len());
    let total: usize = images.iter().map(Bytes::len).sum();
    assert!(total <= body.len(), "{total} image bytes from a body of {}", body.len());
});
