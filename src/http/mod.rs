//! The HTTP API: router, shared state, middleware and the OpenAPI document.
//!
//! This layer parses, validates and answers. It does no maths: handlers hand images to
//! [`crate::scoring::Scorer`] and turn its answers into JSON. Cross-cutting work (body limits,
//! tracing, panics, request metrics) lives in layers, not in handlers.

pub mod error;
pub mod handlers;
pub mod types;
pub mod upload;

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Instant,
};

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use tower_http::{catch_panic::CatchPanicLayer, trace::TraceLayer};
use utoipa::OpenApi;

use crate::{error::Error, scoring::Scorer};

/// Request-shape limits the HTTP layer enforces.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest body, in bytes.
    pub max_body_bytes: usize,
    /// Most images in one request.
    pub max_batch_images: usize,
}

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The scoring pipeline and the models.
    pub scorer: Arc<Scorer>,
    /// Request-shape limits.
    pub limits: RequestLimits,
    /// True once every model is warmed up; false again while draining.
    pub ready: Arc<AtomicBool>,
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "qscore", description = "Label-free representation quality (Q-Score) and likely-misclassification flags for images, from self-supervised ONNX encoders."),
    paths(
        handlers::score, handlers::score_batch, handlers::embed, handlers::models, handlers::model,
        handlers::live, handlers::ready, handlers::metrics, handlers::openapi,
    ),
    tags(
        (name = "scoring", description = "Score and embed images"),
        (name = "models", description = "What is loaded"),
        (name = "health", description = "Probes, metrics and this document"),
    )
)]
struct ApiDoc;

/// The OpenAPI document, with the crate's version.
pub fn api_doc() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// Builds the router with every route and layer.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/score", post(handlers::score))
        .route("/v1/score/batch", post(handlers::score_batch))
        .route("/v1/embed", post(handlers::embed))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{name}", get(handlers::model))
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found);
    // Bodies are read, and limited, by the `Uploads` extractor alone.
    api.layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(Error::Internal("the request handler panicked".into()))
        }))
        .with_state(state)
}

/// Counts and times every routed request by its route template and status class.
async fn track(State(state): State<AppState>, path: MatchedPath, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = path.as_str().to_owned();
    let response = next.run(req).await;
    let class = format!("{}xx", response.status().as_u16() / 100);
    let m = &state.scorer.metrics;
    m.http_requests.with_label_values(&[&route, &class]).inc();
    m.http_duration.with_label_values(&[&route]).observe(start.elapsed().as_secs_f64());
    response
}
