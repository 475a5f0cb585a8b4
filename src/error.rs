//! The one error type a client of qscore can see.
//!
//! Variants name what went wrong for the user, never which library failed. Each has a stable
//! snake_case `code` and a sentence saying what to do next; a batch item, a Label Studio task
//! and a `qscore score` line answer it as [`ErrorDetail`]. Transport is not decided here: the
//! HTTP status and headers of each variant live in `src/http/error.rs` alone.

use serde::Serialize;

/// Longest error message answered, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Codes of the errors a rerun may change, where the image itself is not at fault: a fetch that
/// failed or timed out (a 404 included: the server may get the file), a refused URL (the next
/// run may pass `--allow-host`), a missing or unreadable file (it may appear), and the engine
/// being busy, out of memory budget, timed out or unavailable. Every other code says the image is
/// bad (undecodable, unsupported, too large, too many pixels) and is answered the same each run.
pub const RETRYABLE_CODES: &[&str] = &[
    "fetch_failed",
    "url_refused",
    "unreadable_file",
    "timeout",
    "unavailable",
    "overloaded",
    "memory_budget_exhausted",
    "body_timeout",
    "internal",
];

/// Whether an error with `code` may go away on a rerun ([`RETRYABLE_CODES`]).
pub fn is_retryable(code: &str) -> bool {
    RETRYABLE_CODES.contains(&code)
}

/// A machine-readable code and a sentence for a human: how every error is answered.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `undecodable_image`.
    pub code: String,
    /// What happened and what to do about it.
    pub message: String,
}

impl From<&Error> for ErrorDetail {
    fn from(e: &Error) -> Self {
        e.detail()
    }
}

/// Everything that can stop one request or one image from being scored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed (bad JSON, bad base64, bad multipart).
    #[error("{0}")]
    BadRequest(String),
    /// An image was sent with zero bytes.
    #[error("the image is empty (0 bytes); send the file's contents")]
    EmptyImage,
    /// A multipart request without any `image` part.
    #[error(
        "the request holds no image; send a multipart `image` part (`-F image=@photo.jpg`), a raw image/* body, or a JSON batch with at least one image"
    )]
    MissingImage,
    /// A multipart part with a name other than `image`.
    #[error("unexpected multipart field `{0}`; only `image` parts (and `confidence` fields) are accepted")]
    UnexpectedField(String),
    /// The body's content type is not one qscore reads.
    #[error(
        "unsupported content type `{0}`; send multipart/form-data with an `image` part, a raw image/* body, or JSON for the batch endpoint"
    )]
    UnsupportedMediaType(String),
    /// The body's `Content-Encoding` is not one qscore decodes.
    #[error("unsupported content encoding `{0}`; send the body uncompressed or with Content-Encoding gzip or deflate")]
    UnsupportedContentEncoding(String),
    /// The bytes are not in an image format qscore decodes.
    #[error("not a supported image: the bytes are none of JPEG, PNG, WebP, GIF, BMP or TIFF")]
    UnsupportedFormat,
    /// The bytes are in a format qscore reads, in a variant of it that it does not (a TIFF with
    /// float samples, an arithmetic-coded JPEG): the format is named, never denied.
    #[error(
        "a {format} with {feature} is not supported; re-save it as an 8-bit PNG or JPEG (or a baseline TIFF) and send it again"
    )]
    UnsupportedVariant {
        /// The format the bytes are in, as users know it (`TIFF`, `JPEG`).
        format: &'static str,
        /// What in it is not supported, as the decoder tells it.
        feature: String,
    },
    /// The bytes look like an image but cannot be decoded (truncated or corrupt).
    #[error("the image could not be decoded: {0}")]
    UndecodableImage(String),
    /// The image declares more pixels than the server allows.
    #[error("the image is {width}x{height} = {pixels} pixels; the limit is {limit} (--max-image-pixels)")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// width * height.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The image is a strip: its longer side is too many times its shorter one.
    #[error(
        "the image is {width}x{height}: its longer side is more than {limit} times its shorter side (--max-image-aspect-ratio); crop it or split it"
    )]
    AspectRatioTooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The configured ratio.
        limit: u32,
    },
    /// Decoding the image would need more memory than the whole decode budget.
    #[error(
        "decoding the image needs {needed} bytes; the decode share of --memory-budget-bytes is {limit}; send a smaller image or raise the budget"
    )]
    ImageNeedsTooMuchMemory {
        /// Bytes the decode would hold.
        needed: u64,
        /// The decode share of the budget.
        limit: u64,
    },
    /// The server holds as many request bytes as its memory budget allows.
    #[error(
        "the server's memory budget (--memory-budget-bytes) is taken by other requests; retry after {retry_after_s} s"
    )]
    MemoryBudgetExhausted {
        /// Seconds the client should wait.
        retry_after_s: u64,
    },
    /// A client-chosen identifier is longer than allowed.
    #[error("{what} is {len} bytes; identifiers are limited to {limit} bytes")]
    IdTooLong {
        /// Which identifier.
        what: String,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// One image is larger than the per-image byte limit.
    #[error("the image is {size} bytes; the limit is {limit} (--max-image-bytes)")]
    ImageTooLarge {
        /// Size of the image in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A body of unknown length passed the per-image byte limit while being read: its size is
    /// unknown, only where reading stopped. Same code as [`Error::ImageTooLarge`].
    #[error("the image is over the limit of {limit} bytes (--max-image-bytes); reading stopped at {read} bytes")]
    ImageOverLimit {
        /// Bytes read when reading stopped.
        read: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The whole request body is over the limit.
    #[error("the request body is over the {limit}-byte limit (--max-body-bytes)")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A batch carries more images than allowed.
    #[error("the batch has more than {limit} images (--max-batch-images); split it")]
    TooManyImages {
        /// The configured limit.
        limit: usize,
    },
    /// No model of that name is loaded.
    #[error("unknown model `{name}`; loaded models: {loaded}")]
    UnknownModel {
        /// The name the client asked for.
        name: String,
        /// Comma-separated names of the loaded models.
        loaded: String,
    },
    /// The request needs a calibration the model does not have.
    #[error(
        "model `{model}` has no calibration.json, so it has no discriminative set D; run `qscore calibrate --model {model}` or drop `compressed=true`"
    )]
    NotCalibrated {
        /// The model asked for.
        model: String,
    },
    /// The model's flag is calibrated on the client's own classifier confidence, and the image
    /// came without it.
    #[error(
        "model `{model}` flags images by your classifier's confidence (calibrated with `--predictions` and a `confidence` column), so each image needs `confidence`, a number in [0, 1]: a `confidence` form field, a `confidence` query parameter with a raw body, `confidence` in a JSON batch item, or a KServe `confidence` input"
    )]
    MissingConfidence {
        /// The model asked for.
        model: String,
    },
    /// A `confidence` sent with an image that is not a probability.
    #[error("`confidence` must be a number in [0, 1] (your classifier's probability for its prediction); got {0}")]
    InvalidConfidence(String),
    /// An explanation's parameters (`features`, `patch`, `stride`) are out of bounds or dearer
    /// than the server allows.
    #[error("{0}")]
    InvalidExplainParameters(String),
    /// The client accepts none of the media types the route answers in.
    #[error("this route answers {0}; send an Accept header that allows one of them (or none)")]
    NotAcceptable(&'static str),
    /// `/v1/*` needs an API key and the request had none or a wrong one.
    #[error("{0}")]
    Unauthorized(String),
    /// The client took longer than the request deadline to send its body.
    #[error("the request body did not arrive within --request-timeout-ms")]
    BodyTimeout,
    /// No route at this path.
    #[error("no such route; see /openapi.json for the API")]
    NotFound,
    /// The route exists but not for this method.
    #[error("this route does not take that method; see /openapi.json")]
    MethodNotAllowed,
    /// The inference queue is full.
    #[error("the server is at capacity; retry after {retry_after_s} s")]
    Overloaded {
        /// Seconds the client should wait.
        retry_after_s: u64,
    },
    /// The request's deadline passed before it was answered; its queued work was dropped.
    #[error("the request did not finish within --request-timeout-ms; retry later or send fewer images")]
    Timeout,
    /// The server is starting or shutting down, or a model worker stopped.
    #[error("{0}")]
    Unavailable(String),
    /// The model produced an embedding that cannot be scored (NaN or infinity).
    #[error("the model produced an invalid embedding: {0}")]
    InvalidEmbedding(String),
    /// A file `qscore score` was given could not be read.
    #[error("cannot read the file: {0}")]
    UnreadableFile(String),
    /// A task image URL that qscore will not fetch (another host, not a URL).
    #[error("{0}")]
    UrlRefused(String),
    /// A task image could not be fetched from Label Studio.
    #[error("{0}")]
    FetchFailed(String),
    /// A Label Studio task whose image qscore cannot find: no `<Image>` variable in its data, or
    /// an image reference of a kind qscore does not read.
    #[error("{0}")]
    UnresolvedImage(String),
    /// Anything else that is the server's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::explain::ExplainError> for Error {
    fn from(e: crate::explain::ExplainError) -> Self {
        Self::InvalidExplainParameters(e.to_string())
    }
}

impl Error {
    /// The stable, machine-readable code answered in `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::EmptyImage => "empty_image",
            Self::MissingImage => "missing_image",
            Self::UnexpectedField(_) => "unexpected_field",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UnsupportedContentEncoding(_) => "unsupported_content_encoding",
            Self::UnsupportedFormat | Self::UnsupportedVariant { .. } => "unsupported_image_format",
            Self::UndecodableImage(_) => "undecodable_image",
            Self::TooManyPixels { .. } => "too_many_pixels",
            Self::ImageTooLarge { .. } | Self::ImageOverLimit { .. } => "image_too_large",
            Self::AspectRatioTooLarge { .. } => "aspect_ratio_too_large",
            Self::ImageNeedsTooMuchMemory { .. } => "image_needs_too_much_memory",
            Self::MemoryBudgetExhausted { .. } => "memory_budget_exhausted",
            Self::IdTooLong { .. } => "id_too_long",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::UnknownModel { .. } => "unknown_model",
            Self::NotCalibrated { .. } => "not_calibrated",
            Self::MissingConfidence { .. } => "missing_confidence",
            Self::InvalidConfidence(_) => "invalid_confidence",
            Self::InvalidExplainParameters(_) => "invalid_explain_parameters",
            Self::NotAcceptable(_) => "not_acceptable",
            Self::Unauthorized(_) => "unauthorized",
            Self::BodyTimeout => "body_timeout",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Overloaded { .. } => "overloaded",
            Self::Timeout => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::InvalidEmbedding(_) => "invalid_embedding",
            Self::UnreadableFile(_) => "unreadable_file",
            Self::UrlRefused(_) => "url_refused",
            Self::FetchFailed(_) => "fetch_failed",
            Self::UnresolvedImage(_) => "unresolved_image",
            Self::Internal(_) => "internal",
        }
    }

    /// Whether the client caused it (and so it counts as `rejected`, not `failed`): its input,
    /// its request's shape, or its share of capacity. The rest is the server's fault or its
    /// upstream's (a failed Label Studio fetch), or a deadline it could not meet.
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            Self::Unavailable(_) | Self::Timeout | Self::FetchFailed(_) | Self::InvalidEmbedding(_) | Self::Internal(_)
        )
    }

    /// The sentence answered for this error, at most [`MAX_MESSAGE_BYTES`]: messages quote
    /// what the client sent (a field name, a parser's view of a value), and an answer must
    /// never grow with it.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("… (truncated)");
        }
        message
    }

    /// The `{code, message}` pair every error answers with.
    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail { code: self.code().to_owned(), message: self.message() }
    }
}
