//! The HTTP API: router, shared state, middleware and the OpenAPI document.
//!
//! This layer parses, validates and answers. It does no maths: handlers hand images to
//! [`crate::engine::Engine::score`] and turn its answers into JSON. Cross-cutting work (body limits,
//! tracing, panics, request metrics) lives in layers, not in handlers.

pub mod auth;
pub mod bounded;
pub mod connections;
pub mod docs;
pub mod error;
pub mod explain;
pub mod form_data;
pub mod handlers;
pub mod kserve;
pub mod labelstudio;
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

use crate::{engine::Engine, error::Error};

/// Request-shape limits the HTTP layer enforces.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest body, in bytes.
    pub max_body_bytes: usize,
    /// Most images in one request.
    pub max_batch_images: usize,
    /// Longest a client may take to send its body.
    pub body_timeout: std::time::Duration,
}

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The scoring pipeline and the models.
    pub engine: Arc<Engine>,
    /// Request-shape limits.
    pub limits: RequestLimits,
    /// True once every model is warmed up; false again while draining.
    pub ready: Arc<AtomicBool>,
    /// The keys `/v1/*` requires; `None` leaves it open.
    pub api_keys: Option<Arc<auth::ApiKeys>>,
    /// The one host Label Studio task images may be fetched from.
    pub label_studio: Option<Arc<labelstudio::LabelStudio>>,
}

impl AppState {
    /// Every model is warmed up and the server is not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "qscore", description = "Label-free representation quality (Q-Score) and likely-misclassification flags for images, from self-supervised ONNX encoders."),
    paths(
        handlers::score, handlers::score_batch, handlers::embed, explain::explain, handlers::models, handlers::model, handlers::drift,
        handlers::live, handlers::ready, handlers::metrics, handlers::openapi,
        kserve::server_metadata, kserve::live, kserve::ready, kserve::model_metadata, kserve::model_ready, kserve::infer,
        kserve::version_metadata, kserve::version_ready, kserve::version_infer,
        labelstudio::health, labelstudio::setup, labelstudio::predict,
    ),
    tags(
        (name = "scoring", description = "Score, embed and explain images"),
        (name = "models", description = "What is loaded, and how its recent answers drift"),
        (name = "health", description = "Probes, metrics and this document"),
        (name = "kserve-v2", description = "KServe v2 / Open Inference Protocol"),
        (name = "label-studio", description = "Label Studio ML backend: risk scores for labelling queues"),
    )
)]
struct ApiDoc;

/// The OpenAPI document, with the crate's version and the API-key scheme on `/v1/*`.
pub fn api_doc() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut scheme = Http::new(HttpAuthScheme::Bearer);
    scheme.description = Some("Required on /v1/* when the server runs with --api-keys-file.".into());
    doc.components.get_or_insert_with(Default::default).add_security_scheme("api_key", SecurityScheme::Http(scheme));
    for (path, item) in doc.paths.paths.iter_mut() {
        if path.starts_with("/v1/") || path.starts_with("/v2/models/") || path == "/predict" || path == "/setup" {
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                op.security = Some(vec![SecurityRequirement::new("api_key", Vec::<String>::new())]);
                let unauthorized = utoipa::openapi::ResponseBuilder::new()
                    .description("Missing or wrong API key (only with --api-keys-file)")
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build();
                op.responses.responses.insert("401".into(), unauthorized.into());
            }
        }
    }
    doc
}

/// Builds the router with every route and layer. `cors` lists the origins browsers may call
/// from (`*` for any); empty turns CORS off.
pub fn router(state: AppState, cors: &[String]) -> Router {
    // Keys guard /v1/*, /v2/models/* and the Label Studio calls: probes, metrics and the API
    // document stay open.
    let v1 = Router::new()
        .route("/v1/score", post(handlers::score))
        .route("/v1/score/batch", post(handlers::score_batch))
        .route("/v1/embed", post(handlers::embed))
        .route("/v1/explain", post(explain::explain))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{name}", get(handlers::model))
        .route("/v1/drift", get(handlers::drift))
        .route("/v2/models/{name}", get(kserve::model_metadata))
        .route("/v2/models/{name}/ready", get(kserve::model_ready))
        .route("/v2/models/{name}/infer", post(kserve::infer))
        .route("/v2/models/{name}/versions/{version}", get(kserve::version_metadata))
        .route("/v2/models/{name}/versions/{version}/ready", get(kserve::version_ready))
        .route("/v2/models/{name}/versions/{version}/infer", post(kserve::version_infer))
        .route("/setup", post(labelstudio::setup))
        .route("/predict", post(labelstudio::predict))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key));
    let api = v1
        .route("/health", get(labelstudio::health))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .route("/docs", get(docs::index))
        .route("/docs/{file}", get(docs::file))
        .route_layer(middleware::from_fn(tag_route))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found);
    // Bodies are read, and limited, by `upload::read_limited` alone, on every route: behind
    // the decompression layer, so the limits count decoded bytes.
    let app = api
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .layer(middleware::from_fn(content_encoding))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn(kserve::protocol_errors))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(Error::Internal("the request handler panicked".into()))
        }))
        .with_state(state);
    match cors_layer(cors) {
        Some(layer) => app.layer(layer),
        None => app,
    }
}

/// CORS for the listed origins, or none.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::CONTENT_ENCODING])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// The route template that answered, carried from the inner route layer to [`track`].
#[derive(Clone)]
pub(crate) struct RouteTemplate(pub(crate) Arc<str>);

/// Tags a routed answer with its route template.
async fn tag_route(path: MatchedPath, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response.extensions_mut().insert(RouteTemplate(path.as_str().into()));
    response
}

/// Counts and times every answer the router gives, by route template and status class; an
/// answer no route gave (404, 405 from the fallback) counts under `route="unmatched"`, so a
/// scan shows in the 4xx alerts.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let m = &state.engine.metrics;
    m.requests_in_flight.inc();
    // Decremented on drop, so a request whose client went away is not counted forever.
    let _in_flight = scopeguard(|| m.requests_in_flight.dec());
    let response = next.run(req).await;
    let route = response.extensions().get::<RouteTemplate>().map_or("unmatched", |r| &r.0);
    let class = format!("{}xx", response.status().as_u16() / 100);
    m.http_requests.with_label_values(&[route, &class]).inc();
    m.http_duration.with_label_values(&[route]).observe(start.elapsed().as_secs_f64());
    response
}

/// Refuses a request body in a `Content-Encoding` qscore does not decode (415 naming it and,
/// in `Accept-Encoding`, the accepted ones), and spells the accepted ones the way the
/// decompression layer behind it matches them: content codings are case-insensitive (RFC 9110
/// §8.4.1), `x-gzip` is gzip (§8.4.1.3), and `identity` is no coding at all.
///
/// Every `Content-Encoding` line is read: several lines are one comma-separated list (RFC 9110
/// §5.3), so `gzip` and `gzip` on two lines are the stacked `gzip, gzip`. Once `identity` and
/// empty members are dropped, at most one coding may remain, gzip or deflate; the layer behind
/// is then left exactly one header line naming it.
async fn content_encoding(mut req: Request, next: Next) -> Response {
    use axum::http::{HeaderValue, header::CONTENT_ENCODING};
    match encoding_of(req.headers().get_all(CONTENT_ENCODING).iter().map(HeaderValue::as_bytes)) {
        Ok(None) => {
            req.headers_mut().remove(CONTENT_ENCODING);
        }
        Ok(Some(coding)) => {
            req.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static(coding));
        }
        Err(error) => {
            return if req.uri().path().starts_with("/v2/") {
                axum::response::IntoResponse::into_response(kserve::V2Failure::from(error))
            } else {
                axum::response::IntoResponse::into_response(error)
            };
        }
    }
    next.run(req).await
}

/// The one coding the `Content-Encoding` lines name (`None` for none or only `identity`), or
/// the 415 naming the whole list when it stacks codings or names one qscore does not decode.
fn encoding_of<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Result<Option<&'static str>, Error> {
    let mut listed: Vec<String> = Vec::new();
    let mut codings: Vec<Option<&'static str>> = Vec::new();
    for line in lines {
        for member in String::from_utf8_lossy(line).split(',') {
            let member = member.trim().to_ascii_lowercase();
            if member.is_empty() {
                continue;
            }
            let coding = match member.as_str() {
                "identity" => {
                    listed.push(member);
                    continue;
                }
                "gzip" | "x-gzip" => Some("gzip"),
                "deflate" => Some("deflate"),
                _ => None,
            };
            codings.push(coding);
            listed.push(member);
            // Enough to name the fault; a request cannot make the work or the message grow.
            if listed.len() > 16 {
                break;
            }
        }
    }
    match codings.as_slice() {
        [] => Ok(None),
        [Some(coding)] => Ok(Some(coding)),
        _ => {
            // A name longer than any coding is cut: error messages never grow with the request.
            let shown: String = listed.join(", ").chars().take(64).collect();
            Err(Error::UnsupportedContentEncoding(shown))
        }
    }
}

/// Turns the plain-text rejections of axum's extractors (a path segment that is not UTF-8, a
/// query that does not parse) into our JSON error shape, so that every error answer is JSON.
async fn json_errors(response: Response) -> Response {
    use axum::http::{StatusCode, header::CONTENT_TYPE};
    use http_body_util::BodyExt;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/plain; version=0.0.4"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Extractor rejections are a sentence long; anything longer is cut, never buffered whole.
    let text = match http_body_util::Limited::new(body, 4096).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let error = match status {
        StatusCode::NOT_FOUND => Error::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Error::MethodNotAllowed,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::UnsupportedMediaType(text),
        s if s.is_client_error() => Error::BadRequest(if text.is_empty() { s.to_string() } else { text }),
        _ => Error::Internal(text),
    };
    let mut answer = axum::response::IntoResponse::into_response(error);
    *answer.status_mut() = parts.status;
    answer.extensions_mut().extend(parts.extensions);
    answer
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
