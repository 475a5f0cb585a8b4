//! The JSON error body and the mapping from [`Error`] to an HTTP response.

use axum::{
    Json,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::error::Error;

/// `{"error": {"code": ..., "message": ...}}`, the body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A machine-readable code and a sentence for a human.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `undecodable_image`.
    pub code: String,
    /// What happened and what to do about it.
    pub message: String,
}

impl From<&Error> for ErrorDetail {
    fn from(e: &Error) -> Self {
        Self { code: e.code().to_owned(), message: e.to_string() }
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
        let mut response = (self.status(), body).into_response();
        match self {
            Error::Overloaded { retry_after_s } | Error::MemoryBudgetExhausted { retry_after_s } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
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
