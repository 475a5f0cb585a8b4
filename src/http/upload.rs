//! Getting images out of a request: multipart `image` parts, a raw `image/*` body, or the JSON
//! batch form with base64 data.
//!
//! Every part and every JSON item becomes one engine [`Input`] with an id, so nothing a client sent
//! is dropped: a part under another name is refused, not ignored, and an item with bad base64
//! keeps its place in the batch with its own error.

use std::time::Duration;

use axum::{
    extract::{FromRequest, Request},
    http::header::{CONTENT_DISPOSITION, CONTENT_TYPE},
};
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use super::{AppState, bounded, form_data::Disposition};
use crate::{
    engine::{
        Input,
        budget::{HeldBuffer, MemoryBudget, Reservation},
    },
    error::Error,
};

/// Every image of a request, in the order sent, and the memory they hold.
#[derive(Debug)]
pub struct Uploads {
    /// The images: each with the client's name for it (the multipart file name, the JSON `id`,
    /// or its position) and its bytes, or why they could not be read.
    pub items: Vec<Input>,
    /// The body's (and its parsed copies') share of the memory budget, held while the images are.
    pub held: Reservation,
}

/// The JSON form of a batch. Each item is parsed on its own, so a malformed item answers an
/// error in its own slot and the others are scored.
#[derive(Debug, utoipa::ToSchema)]
pub struct JsonBatch {
    /// The images, scored in this order.
    pub images: Vec<JsonImage>,
}

/// One image of a JSON batch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonImage {
    /// The client's identifier, echoed back; defaults to the position in the batch.
    pub id: Option<String>,
    /// The encoded image (JPEG, PNG, WebP, GIF, BMP or TIFF), standard base64.
    pub data: String,
    /// Your classifier's probability for its prediction on this image, in [0, 1]; needed only
    /// by a model whose flag was calibrated on it (`needs_confidence` in `GET /v1/models`).
    pub confidence: Option<f64>,
}

impl FromRequest<AppState> for Uploads {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let Body { bytes, mut held } = read_limited(req.into_body(), &state.limits, &state.engine.budget).await?;
        // Parsing copies the body: multer buffers it once (parts are slices of that copy); a
        // JSON batch holds its base64 strings and then their decoded bytes.
        let copies = match essence(&content_type).as_str() {
            "multipart/form-data" => 1,
            "application/json" => 2,
            _ => 0,
        };
        held.merge(state.engine.budget.hold(copies * bytes.len() as u64)?);
        let items = parse_uploads(&content_type, bytes, state.limits.max_batch_images).await?;
        Ok(Self { items, held })
    }
}

/// The media type without parameters, lower-cased.
fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

fn is_raw_image(content_type: &str) -> bool {
    let e = essence(content_type);
    e.starts_with("image/") || e == "application/octet-stream"
}

/// The images of a request body, in order, by its content type: multipart `image` parts, a JSON
/// batch, or one raw image. At most `max_images`; ids are checked against
/// [`bounded::MAX_ID_BYTES`].
pub async fn parse_uploads(content_type: &str, body: Bytes, max_images: usize) -> Result<Vec<Input>, Error> {
    match essence(content_type).as_str() {
        "multipart/form-data" => parse_multipart(content_type, body, max_images).await,
        "application/json" => parse_json(&body, max_images),
        _ if is_raw_image(content_type) => Ok(vec![Input::new("0", Ok(body))]),
        "" => Err(Error::UnsupportedMediaType("(none)".into())),
        e => Err(Error::UnsupportedMediaType(e.to_owned())),
    }
}

/// A request body read under the limits, with its share of the memory budget.
#[derive(Debug)]
pub struct Body {
    /// The bytes.
    pub bytes: Bytes,
    /// Their reservation, given back when dropped.
    pub held: Reservation,
}

/// How long, and how much beyond the limit, an oversized body is read and discarded before the
/// 413 is sent. Answering while the client is still writing makes the kernel reset the
/// connection, and most clients then report a broken pipe instead of our JSON error.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_FACTOR: usize = 4;

/// Reads a whole body under the request limits (its size and the deadline to receive it),
/// reserving its bytes from the held share of `budget` as they arrive.
///
/// A body refused for its size or for the budget is read on and discarded for a moment after
/// the deadline's clock stops, so the client reads the error instead of a connection reset.
pub(crate) async fn read_limited(
    body: axum::body::Body,
    limits: &super::RequestLimits,
    budget: &MemoryBudget,
) -> Result<Body, Error> {
    let declared = http_body::Body::size_hint(&body).exact();
    let mut stream = body.into_data_stream();
    let read = read_body(&mut stream, declared, limits.max_body_bytes, budget);
    match tokio::time::timeout(limits.body_timeout, read).await {
        Err(_) => Err(Error::BodyTimeout),
        Ok(Ok(body)) => Ok(body),
        Ok(Err((error, received))) => {
            drain(&mut stream, received, limits.max_body_bytes).await;
            Err(error)
        }
    }
}

/// Reads the whole body into a [`HeldBuffer`], refusing it past `limit` bytes or past the
/// budget; a refusal comes with the bytes received so far.
async fn read_body(
    stream: &mut axum::body::BodyDataStream,
    declared: Option<u64>,
    limit: usize,
    budget: &MemoryBudget,
) -> Result<Body, (Error, usize)> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((Error::BodyTooLarge { limit }, 0));
    }
    let mut buf = HeldBuffer::new(budget, declared.unwrap_or(0) as usize, limit).map_err(|e| (e, 0))?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| (Error::BadRequest(format!("cannot read the body: {e}")), buf.len()))?;
        let needed = buf.len() + chunk.len();
        if needed > limit {
            return Err((Error::BodyTooLarge { limit }, needed));
        }
        buf.extend(&chunk).map_err(|e| (e, needed))?;
    }
    let (bytes, held) = buf.into_parts();
    Ok(Body { bytes, held })
}

/// Reads and discards what the client is still sending (at most [`LINGER_TIME`] and
/// `LINGER_FACTOR x limit` bytes in all), so that it reads our error instead of a reset.
async fn drain(stream: &mut axum::body::BodyDataStream, mut drained: usize, limit: usize) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while let Some(Ok(c)) = stream.next().await {
            drained += c.len();
            if drained > limit.saturating_mul(LINGER_FACTOR) {
                break;
            }
        }
    })
    .await;
}

async fn parse_multipart(content_type: &str, body: Bytes, max_images: usize) -> Result<Vec<Input>, Error> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| Error::BadRequest(format!("malformed multipart content type: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let malformed = |e: multer::Error| Error::BadRequest(format!("malformed multipart body: {e}"));
    let mut uploads = Vec::new();
    let mut confidences: Vec<Result<f32, Error>> = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        // The part's names are read from its header here, not with multer's `name()` and
        // `file_name()`, which match `name=` case-sensitively and skip `filename*`.
        let disposition =
            field.headers().get(CONTENT_DISPOSITION).map(|v| Disposition::parse(v.as_bytes())).unwrap_or_default();
        if !disposition.form_data {
            return Err(Error::BadRequest(format!(
                "multipart part {} has no `Content-Disposition: form-data; name=\"image\"` header",
                uploads.len() + confidences.len()
            )));
        }
        match disposition.name.as_deref() {
            Some("image") => {}
            Some("confidence") => {
                if confidences.len() == max_images {
                    return Err(Error::TooManyImages { limit: max_images });
                }
                let text = field.bytes().await.map_err(malformed)?;
                confidences.push(parse_confidence(&String::from_utf8_lossy(&text)));
                continue;
            }
            _ => return Err(Error::UnexpectedField(disposition.name.unwrap_or_default())),
        }
        if uploads.len() == max_images {
            return Err(Error::TooManyImages { limit: max_images });
        }
        let position = uploads.len().to_string();
        let id = disposition.filename.unwrap_or_else(|| position.clone());
        if let Err(e) = bounded::check_id(|| format!("the file name of part {position}"), &id) {
            // The part keeps its slot, under its position: its name is too long to echo.
            let _ = field.bytes().await.map_err(malformed)?;
            uploads.push(Input::new(position, Err(e)));
            continue;
        }
        let data = field.bytes().await.map_err(malformed)?;
        uploads.push(Input::new(id, Ok(data)));
    }
    if uploads.is_empty() {
        return Err(Error::MissingImage);
    }
    attach_confidences(&mut uploads, confidences)?;
    Ok(uploads)
}

/// Gives the i-th `confidence` field to the i-th image. None at all is fine (the model may not
/// need them); a count that differs from the images' would pair them by guesswork, so it is
/// refused. A confidence that is not a probability fails its own image only.
fn attach_confidences(uploads: &mut [Input], confidences: Vec<Result<f32, Error>>) -> Result<(), Error> {
    if confidences.is_empty() {
        return Ok(());
    }
    if confidences.len() != uploads.len() {
        return Err(Error::BadRequest(format!(
            "{} `confidence` fields for {} images; send one per image, in the order of the `image` parts",
            confidences.len(),
            uploads.len()
        )));
    }
    for (input, c) in uploads.iter_mut().zip(confidences) {
        match c {
            Ok(c) => input.confidence = Some(c),
            Err(e) if input.bytes.is_ok() => input.bytes = Err(e),
            Err(_) => {}
        }
    }
    Ok(())
}

/// Reads a client's classifier confidence: a number in [0, 1], as text (a form field or a
/// query parameter).
pub(crate) fn parse_confidence(text: &str) -> Result<f32, Error> {
    let shown = || {
        let t: String = text.chars().take(32).collect();
        format!("{t:?}")
    };
    let v: f64 = text.trim().parse().map_err(|_| Error::InvalidConfidence(shown()))?;
    checked_confidence(v).ok_or_else(|| Error::InvalidConfidence(shown()))
}

/// `v` as a confidence when it is a probability (finite, in [0, 1]).
pub(crate) fn checked_confidence(v: f64) -> Option<f32> {
    (v.is_finite() && (0.0..=1.0).contains(&v)).then_some(v as f32)
}

/// The batch as it is read: each image kept as its raw JSON text (borrowed from the body, so
/// nothing is copied), so that one malformed item gets its own error in its slot instead of
/// failing the batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBatch<'a> {
    #[serde(borrow, deserialize_with = "bounded::image_list")]
    images: Vec<&'a serde_json::value::RawValue>,
}

fn parse_json(body: &[u8], max_images: usize) -> Result<Vec<Input>, Error> {
    let batch: WireBatch = serde_json::from_slice(body).map_err(|e| {
        bounded::refused(e, max_images, |e| {
            Error::BadRequest(format!(
                "invalid JSON batch: {e}; expected {{\"images\": [{{\"id\": ..., \"data\": \"<base64>\"}}]}}"
            ))
        })
    })?;
    if batch.images.len() > max_images {
        return Err(Error::TooManyImages { limit: max_images });
    }
    if batch.images.is_empty() {
        return Err(Error::MissingImage);
    }
    Ok(batch.images.into_iter().enumerate().map(|(i, raw)| json_item(i, raw.get())).collect())
}

/// One item of a JSON batch: its id (its position when it has none, or none that can be
/// echoed), its decoded bytes or why it has none, and its `confidence`.
fn json_item(i: usize, raw: &str) -> Input {
    let position = || i.to_string();
    let item: JsonImage = match serde_json::from_str(raw) {
        Ok(item) => item,
        Err(e) => {
            let e = Error::BadRequest(format!(
                "image {i} is not {{\"id\": \"...\", \"data\": \"<base64>\", \"confidence\": <optional number>}}: {e}"
            ));
            // The error goes back under the client's own id when the item has a usable one, so
            // a client matching answers by id finds it; otherwise under its position.
            #[derive(Deserialize)]
            struct IdOnly {
                id: Option<String>,
            }
            let id = serde_json::from_str::<IdOnly>(raw)
                .ok()
                .and_then(|item| item.id)
                .filter(|id| bounded::check_id(String::new, id).is_ok());
            return Input::new(id.unwrap_or_else(position), Err(e));
        }
    };
    if let Some(id) = &item.id
        && let Err(e) = bounded::check_id(|| format!("the `id` of image {i}"), id)
    {
        return Input::new(position(), Err(e));
    }
    let id = item.id.unwrap_or_else(position);
    let confidence = match item.confidence.map(|c| checked_confidence(c).ok_or(c)).transpose() {
        Ok(c) => c,
        Err(c) => return Input::new(id, Err(Error::InvalidConfidence(c.to_string()))),
    };
    let bytes = decode_base64(&item.data)
        .map(Bytes::from)
        .map_err(|e| Error::BadRequest(format!("`data` is not valid base64: {e}")));
    Input { id, bytes, confidence }
}

/// Base64 in every form clients send: standard or URL-safe alphabet, padded or not, wrapped
/// (MIME's 76 columns, the `base64` CLI) or not, and optionally as a `data:<type>;base64,` URI
/// (a browser's FileReader). The decoded bytes are at most three quarters of the text, so the
/// body limit bounds them as before.
pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::{
        alphabet,
        engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    };
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);
    let mut text = text.trim_ascii();
    if text.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")) {
        let Some((meta, data)) = text[5..].split_once(',') else {
            return Err("a data URI has no `,` before its data".into());
        };
        if !meta.trim_ascii_end().to_ascii_lowercase().ends_with(";base64") {
            return Err("a data URI must be base64 (`data:<type>;base64,...`)".into());
        }
        text = data;
    }
    let text: std::borrow::Cow<'_, [u8]> = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        text.bytes().filter(|b| !b.is_ascii_whitespace()).collect::<Vec<u8>>().into()
    } else {
        text.as_bytes().into()
    };
    STANDARD.decode(&text).or_else(|e| URL_SAFE.decode(&text).map_err(|_| e)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod base64_tests {
    use base64::Engine as _;

    use super::decode_base64;

    #[test]
    fn every_base64_form_decodes_the_same() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let plain = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let wrapped: String =
            plain.as_bytes().chunks(76).map(|c| format!("{}\n", std::str::from_utf8(c).unwrap())).collect();
        let url = base64::engine::general_purpose::URL_SAFE.encode(&bytes);
        assert!(url.contains(['-', '_']));
        for form in [
            plain.clone(),
            wrapped.clone(),
            wrapped.replace('\n', "\r\n"),
            format!("data:image/png;base64,{plain}"),
            format!("DATA:application/octet-stream;BASE64,{wrapped}"),
            plain.trim_end_matches('=').to_owned(),
            url.clone(),
            url.trim_end_matches('=').to_owned(),
            format!("  {plain}\t"),
        ] {
            assert_eq!(decode_base64(&form).as_deref(), Ok(&bytes[..]), "{form:.40}");
        }
        for bad in ["data:image/png,abcd", "data:image/png;base64", "a+b-", "!!!!", "abcde"] {
            assert!(decode_base64(bad).is_err(), "{bad}");
        }
    }
}
