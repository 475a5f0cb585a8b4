//! The JSON error body and the mapping from [`Error`] to an HTTP response.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::error::Error;
pub use crate::error::ErrorDetail;

/// `{"error": {"code": ..., "message": ...}}`, the body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The request `Content-Encoding`s qscore decodes, as answered in `Accept-Encoding` with a 415
/// (RFC 9110 §12.5.3).
pub const ACCEPTED_ENCODINGS: &str = "gzip, deflate, identity";

/// The HTTP status each error is answered with (design.md section 4).
pub fn status(e: &Error) -> StatusCode {
    match e {
        Error::BadRequest(_)
        | Error::EmptyImage
        | Error::MissingImage
        | Error::UnexpectedField(_)
        | Error::IdTooLong { .. }
        | Error::UrlRefused(_)
        | Error::UnresolvedImage(_)
        | Error::UnreadableFile(_)
        | Error::NotCalibrated { .. }
        | Error::MissingConfidence { .. }
        | Error::InvalidConfidence(_)
        | Error::InvalidExplainParameters(_) => StatusCode::BAD_REQUEST,
        Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
        Error::UnsupportedMediaType(_)
        | Error::UnsupportedContentEncoding(_)
        | Error::UnsupportedFormat
        | Error::UnsupportedVariant { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::UndecodableImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::TooManyPixels { .. }
        | Error::ImageTooLarge { .. }
        | Error::ImageOverLimit { .. }
        | Error::AspectRatioTooLarge { .. }
        | Error::ImageNeedsTooMuchMemory { .. }
        | Error::BodyTooLarge { .. }
        | Error::TooManyImages { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnknownModel { .. } | Error::NotFound => StatusCode::NOT_FOUND,
        Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Error::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Error::Overloaded { .. } | Error::MemoryBudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable(_) | Error::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        Error::FetchFailed(_) => StatusCode::BAD_GATEWAY,
        Error::InvalidEmbedding(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl Error {
    /// This error's response with `body`: its status, the headers it calls for (Retry-After,
    /// WWW-Authenticate), and a log line when it is the server's fault. Every error shape the
    /// API answers (ours, the KServe v2 protocol's) goes through here.
    pub(crate) fn respond(&self, body: impl IntoResponse) -> Response {
        if !self.is_client_error() {
            tracing::error!(code = self.code(), "{self}");
        }
        let mut response = (status(self), body).into_response();
        match self {
            Error::Overloaded { retry_after_s } | Error::MemoryBudgetExhausted { retry_after_s } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            Error::UnsupportedContentEncoding(_) => {
                response.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static(ACCEPTED_ENCODINGS));
            }
            Error::Unauthorized(_) => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.respond(Json(ErrorBody { error: ErrorDetail::from(&self) }))
    }
}
