//! Getting images out of a request: multipart `image` parts, a raw `image/*` body, or the JSON
//! batch form with base64 data.
//!
//! Every part and every JSON item becomes one [`Upload`] with an id, so nothing a client sent
//! is dropped: a part under another name is refused, not ignored, and an item with bad base64
//! keeps its place in the batch with its own error.

use axum::{
    extract::{FromRequest, Multipart, Request},
    http::header::CONTENT_TYPE,
};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

use super::AppState;
use crate::error::Error;

/// One image as received, before decoding.
#[derive(Debug)]
pub struct Upload {
    /// The client's name for it: the multipart file name, the JSON `id`, or its position.
    pub id: String,
    /// The encoded bytes, or why they could not be read.
    pub data: Result<Bytes, Error>,
}

/// Every image of a request, in the order sent.
#[derive(Debug)]
pub struct Uploads(pub Vec<Upload>);

/// The JSON form of a batch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
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
}

impl FromRequest<AppState> for Uploads {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limits = &state.limits;
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let essence = content_type.split(';').next().unwrap_or("").trim().to_owned();

        if essence == "multipart/form-data" {
            let mut multipart = Multipart::from_request(req, state)
                .await
                .map_err(|e| Error::BadRequest(format!("malformed multipart body: {}", e.body_text())))?;
            let mut uploads = Vec::new();
            while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, limits.max_body_bytes))? {
                if field.name() != Some("image") {
                    return Err(Error::UnexpectedField(field.name().unwrap_or("").to_owned()));
                }
                if uploads.len() == limits.max_batch_images {
                    return Err(Error::TooManyImages { limit: limits.max_batch_images });
                }
                let id = field.file_name().map(str::to_owned).unwrap_or_else(|| uploads.len().to_string());
                let data = field.bytes().await.map_err(|e| multipart_error(e, limits.max_body_bytes))?;
                uploads.push(Upload { id, data: Ok(data) });
            }
            if uploads.is_empty() {
                return Err(Error::MissingImage);
            }
            return Ok(Self(uploads));
        }

        let body = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Error::BodyTooLarge { limit: limits.max_body_bytes }
            } else {
                Error::BadRequest(format!("cannot read the body: {}", e.body_text()))
            }
        })?;
        if essence.starts_with("image/") || essence == "application/octet-stream" {
            return Ok(Self(vec![Upload { id: "0".into(), data: Ok(body) }]));
        }
        if essence == "application/json" {
            let batch: JsonBatch = serde_json::from_slice(&body)
                .map_err(|e| Error::BadRequest(format!("invalid JSON batch: {e}; expected {{\"images\": [{{\"id\": ..., \"data\": \"<base64>\"}}]}}")))?;
            if batch.images.len() > limits.max_batch_images {
                return Err(Error::TooManyImages { limit: limits.max_batch_images });
            }
            if batch.images.is_empty() {
                return Err(Error::MissingImage);
            }
            let engine = base64::engine::general_purpose::STANDARD;
            let uploads = batch
                .images
                .into_iter()
                .enumerate()
                .map(|(i, img)| Upload {
                    id: img.id.unwrap_or_else(|| i.to_string()),
                    data: engine
                        .decode(img.data.as_bytes())
                        .map(Bytes::from)
                        .map_err(|e| Error::BadRequest(format!("`data` is not valid base64: {e}"))),
                })
                .collect();
            return Ok(Self(uploads));
        }
        Err(Error::UnsupportedMediaType(if essence.is_empty() { "(none)".into() } else { essence }))
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> Error {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        Error::BodyTooLarge { limit }
    } else {
        Error::BadRequest(format!("malformed multipart body: {}", e.body_text()))
    }
}
