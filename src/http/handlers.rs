//! Request handlers: small async functions over extractors. They parse, validate and answer;
//! the scoring itself lives in [`crate::engine::Engine::score`].

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::header,
    response::IntoResponse,
};

use super::{
    AppState,
    error::ErrorBody,
    types::{
        BatchItem, BatchQuery, BatchResponse, BatchSummary, EmbedQuery, Health, ModelInfo, ModelList, ModelQuery,
        ScoreQuery, ServerLimits,
    },
    upload::{JsonBatch, Uploads},
};
use crate::{
    drift::DriftList,
    engine::{EmbeddingMode, ImageScore, Input, Output},
    error::Error,
};

/// A single image as multipart form data.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ImageUpload {
    /// The image file: JPEG, PNG, WebP, GIF (first frame), BMP or TIFF.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Your classifier's probability for its prediction, in [0, 1]; needed only by a model
    /// whose `calibration.needs_confidence` is true.
    confidence: Option<f32>,
}

/// Many images as multipart form data: repeat the `image` part; file names are echoed as ids.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct BatchUpload {
    /// The image files.
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<Vec<u8>>,
    /// Your classifier's confidence per image, the i-th for the i-th `image` part: none, or
    /// exactly one per image.
    confidence: Option<Vec<f32>>,
}

/// Scores the uploads with the model asked for; an upload that could not be read (bad base64)
/// keeps its place with its own error. Answers in upload order, with their ids.
async fn score_uploads(
    state: &AppState,
    model: Option<&str>,
    uploads: Vec<Input>,
    mode: EmbeddingMode,
) -> Result<Vec<Output>, Error> {
    let model = state.engine.registry().get(model)?;
    if mode == EmbeddingMode::Discriminative && model.calibration.is_none() {
        return Err(Error::NotCalibrated { model: model.name().to_owned() });
    }
    state.engine.score(&model, uploads, mode).await
}

/// Scores exactly one uploaded image; `confidence` is the `?confidence=` of a raw upload.
async fn single(
    state: &AppState,
    model: Option<&str>,
    confidence: Option<&str>,
    Uploads { items: mut uploads, held: _held }: Uploads,
    embedding: EmbeddingMode,
) -> Result<Json<ImageScore>, Error> {
    if uploads.len() != 1 {
        return Err(Error::BadRequest(format!(
            "this endpoint takes one image and got {}; use POST /v1/score/batch for several",
            uploads.len()
        )));
    }
    if let Some(text) = confidence {
        if uploads[0].confidence.is_some() {
            return Err(Error::BadRequest(
                "`confidence` came both as a query parameter and as a form field; send it once".into(),
            ));
        }
        uploads[0].confidence = Some(super::upload::parse_confidence(text)?);
    }
    match score_uploads(state, model, uploads, embedding).await?.pop() {
        Some(Output { answer, .. }) => answer.map(Json),
        None => Err(Error::MissingImage),
    }
}

/// Score one image.
#[utoipa::path(
    post, path = "/v1/score", tag = "scoring", params(ScoreQuery),
    request_body(description = "One image: multipart field `image`, or the raw bytes with an image/* content type.",
        content((ImageUpload = "multipart/form-data"), ("image/*"))),
    responses(
        (status = 200, description = "The image's Q-Score, flag and discriminative features", body = ImageScore),
        (status = 400, description = "Malformed request, empty image or no `image` part", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body, image or pixel count over the limit", body = ErrorBody),
        (status = 415, description = "Unsupported content type or image format", body = ErrorBody),
        (status = 422, description = "The image could not be decoded", body = ErrorBody),
        (status = 429, description = "At capacity; retry after the Retry-After header", body = ErrorBody),
        (status = 500, description = "Server fault", body = ErrorBody),
    )
)]
pub async fn score(
    State(state): State<AppState>,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    uploads: Uploads,
) -> Result<Json<ImageScore>, Error> {
    let q = after_body(query)?;
    single(&state, q.model.as_deref(), q.confidence.as_deref(), uploads, EmbeddingMode::Omit).await
}

/// Embed one image: its representation h with its Q-Score; with `compressed=true`, only the
/// features of the calibrated discriminative set D.
#[utoipa::path(
    post, path = "/v1/embed", tag = "scoring", params(EmbedQuery),
    request_body(description = "One image: multipart field `image`, or the raw bytes with an image/* content type.",
        content((ImageUpload = "multipart/form-data"), ("image/*"))),
    responses(
        (status = 200, description = "The answer of /v1/score with `embedding` added (and `embedding_features` when compressed)", body = ImageScore),
        (status = 400, description = "Malformed request, or `compressed=true` on an uncalibrated model", body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 500, body = ErrorBody),
    )
)]
pub async fn embed(
    State(state): State<AppState>,
    query: Result<Query<EmbedQuery>, QueryRejection>,
    uploads: Uploads,
) -> Result<Json<ImageScore>, Error> {
    let q = after_body(query)?;
    let embedding = if q.compressed { EmbeddingMode::Discriminative } else { EmbeddingMode::Full };
    single(&state, q.model.as_deref(), q.confidence.as_deref(), uploads, embedding).await
}

/// Score many images; each answers on its own.
#[utoipa::path(
    post, path = "/v1/score/batch", tag = "scoring", params(BatchQuery),
    request_body(description = "Repeated multipart `image` parts, or JSON with base64 images.",
        content((BatchUpload = "multipart/form-data"), (JsonBatch = "application/json"))),
    responses(
        (status = 200, description = "One result per image in input order; a bad image has its own error", body = BatchResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 429, body = ErrorBody),
    )
)]
pub async fn score_batch(
    State(state): State<AppState>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    Uploads { items: uploads, held: _held }: Uploads,
) -> Result<Json<BatchResponse>, Error> {
    let q = after_body(query)?;
    let answers = score_uploads(&state, q.model.as_deref(), uploads, EmbeddingMode::Omit).await?;
    let scores: Vec<f32> = answers.iter().filter_map(|o| o.answer.as_ref().ok().map(|s| s.q_score)).collect();
    let summary = BatchSummary {
        count: answers.len(),
        scored: scores.len(),
        failed: answers.len() - scores.len(),
        flagged: answers.iter().filter(|o| matches!(&o.answer, Ok(s) if s.likely_misclassified == Some(true))).count(),
        mean_q_score: (!scores.is_empty())
            .then(|| (scores.iter().map(|&q| f64::from(q)).sum::<f64>() / scores.len() as f64) as f32),
    };
    let results = answers
        .into_iter()
        .map(|Output { id, answer }| match answer {
            Ok(score) => BatchItem::Scored { id, score },
            Err(e) => BatchItem::Failed { id, error: (&e).into() },
        })
        .collect();
    Ok(Json(BatchResponse { results, summary }))
}

/// A POST's query string, checked only once its body has been read: refused before, the
/// connection would close under a client still uploading, which then sees a reset instead of
/// the 400 that says what was wrong.
pub(super) fn after_body<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Error> {
    query.map(|Query(q)| q).map_err(|e| Error::BadRequest(e.body_text()))
}

/// List the loaded models.
#[utoipa::path(get, path = "/v1/models", tag = "models", responses((status = 200, body = ModelList)))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let registry = state.engine.registry();
    Json(ModelList {
        default: registry.default_name().to_owned(),
        models: registry.models().map(|m| ModelInfo::from(m.as_ref())).collect(),
        load_failures: registry.failures().cloned().collect(),
        limits: ServerLimits {
            max_batch_images: state.limits.max_batch_images,
            max_body_bytes: state.limits.max_body_bytes,
            max_image_bytes: state.engine.limits.max_bytes,
            max_image_pixels: state.engine.limits.max_pixels,
        },
    })
}

/// Describe one loaded model.
#[utoipa::path(
    get, path = "/v1/models/{name}", tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = ModelInfo), (status = 404, description = "Unknown model", body = ErrorBody))
)]
pub async fn model(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<ModelInfo>, Error> {
    Ok(Json(ModelInfo::from(state.engine.registry().get(Some(&name))?.as_ref())))
}

/// Drift of each model's recent answers from its calibration reference.
#[utoipa::path(
    get, path = "/v1/drift", tag = "models", params(ModelQuery),
    responses(
        (status = 200, description = "One report per model (or the one asked for); uncalibrated models say they have no reference", body = DriftList),
        (status = 404, description = "Unknown model", body = ErrorBody),
    )
)]
pub async fn drift(State(state): State<AppState>, Query(q): Query<ModelQuery>) -> Result<Json<DriftList>, Error> {
    let engine = &state.engine;
    let models: Vec<_> = match q.model.as_deref() {
        Some(name) => vec![engine.registry().get(Some(name))?],
        None => engine.registry().models().cloned().collect(),
    };
    Ok(Json(DriftList { models: models.iter().map(|m| engine.drift_report(m)).collect() }))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, body = Health)))]
pub async fn live() -> Json<Health> {
    Json(Health { status: "live".into() })
}

/// Readiness: every model loaded and warmed up, and not shutting down.
#[utoipa::path(
    get, path = "/health/ready", tag = "health",
    responses((status = 200, body = Health), (status = 503, description = "Starting or draining", body = ErrorBody))
)]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Health>, Error> {
    if state.is_ready() {
        Ok(Json(Health { status: "ready".into() }))
    } else {
        Err(Error::Unavailable("not ready: starting up or shutting down".into()))
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let engine = &state.engine;
    let reports: Vec<_> =
        engine.registry().models().map(|m| (m.worker.queue_depth(), engine.drift_report(m))).collect();
    engine.metrics.observe_state(engine.admission.in_flight(), engine.budget.used_bytes(), &reports);
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], engine.metrics.render())
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "health", responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn openapi() -> impl IntoResponse {
    Json(super::api_doc())
}

/// JSON 404 for unknown routes.
pub async fn not_found() -> Error {
    Error::NotFound
}

/// JSON 405 for a known route with the wrong method, counted under that route.
pub async fn method_not_allowed(path: Option<axum::extract::MatchedPath>) -> axum::response::Response {
    let mut response = Error::MethodNotAllowed.into_response();
    if let Some(path) = path {
        response.extensions_mut().insert(super::RouteTemplate(path.as_str().into()));
    }
    response
}
