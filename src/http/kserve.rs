//! KServe v2 / Open Inference Protocol: the endpoints standard inference clients (tritonclient,
//! KServe's SDK) speak, over the same pipeline as `/v1`.
//!
//! The input is one BYTES tensor named `image` holding encoded images, either as base64 strings
//! in the JSON body or raw with the binary-data extension (`Inference-Header-Content-Length`:
//! the JSON header first, then each BYTES element as a 4-byte little-endian length and its
//! bytes). Outputs are `q_score` (FP32), `p_misclassified` (FP32) and `likely_misclassified`
//! (BOOL) for calibrated models, and `embedding` (FP32, N x d) when asked for; answers are JSON.
//! The protocol has no per-element error, so one bad image fails the request with a 400 naming
//! its index. Errors follow the protocol's `{"error": "message"}` shape.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AppState, bounded};
use crate::{
    engine::{EmbeddingMode, Input, Model},
    error::Error,
};

/// The protocol's error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V2Error {
    /// What went wrong.
    pub error: String,
}

/// An error answered in the protocol's shape, with qscore's status.
pub struct V2Failure(Error);

impl From<Error> for V2Failure {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl IntoResponse for V2Failure {
    fn into_response(self) -> Response {
        self.0.respond(Json(V2Error { error: self.0.message() }))
    }
}

/// `GET /v2`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    /// Server name.
    pub name: String,
    /// Server version.
    pub version: String,
    /// Protocol extensions supported.
    pub extensions: Vec<String>,
}

/// A tensor's description in model metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// Protocol datatype (BYTES, FP32, BOOL).
    pub datatype: String,
    /// Shape; -1 is any size.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Available versions.
    pub versions: Vec<String>,
    /// Backend.
    pub platform: String,
    /// Inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// `GET /v2/models/{name}/ready`, `GET /v2/health/*`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// Whether it is ready (or live).
    pub ready: bool,
}

/// One input tensor of an inference request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferInput {
    /// `image` (BYTES, the encoded images), or `confidence` (FP32 or FP64: your classifier's
    /// probability for its prediction per image, for a model whose flag was calibrated on it).
    pub name: String,
    /// The tensor's shape; its element count (the product of the dimensions, 1 for `[]`) is the
    /// number of images: `[N]`, `[N, 1]`, `[1, N]` and any other shape with N elements.
    #[serde(deserialize_with = "bounded::list")]
    pub shape: Vec<i64>,
    /// `BYTES` for `image`; `FP32` or `FP64` for `confidence`.
    pub datatype: String,
    /// Base64 strings, one per image, unless sent as binary data; nested lists are read in
    /// row-major order.
    #[serde(default, deserialize_with = "bounded::tensor_leaves")]
    #[schema(value_type = Option<Vec<String>>)]
    pub data: Option<bounded::Leaves>,
    /// `binary_data_size` when the tensor follows the JSON header.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<InputParameters>,
}

/// The parameters of an input tensor qscore reads; any other is ignored unread.
#[derive(Debug, Default, Deserialize)]
pub struct InputParameters {
    /// Bytes of the tensor's binary data after the JSON header.
    #[serde(default)]
    pub binary_data_size: Option<u64>,
}

/// One requested output.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestedOutput {
    /// `q_score`, `p_misclassified`, `likely_misclassified` or `embedding`.
    pub name: String,
}

/// `POST /v2/models/{name}/infer`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    /// Echoed back.
    #[serde(default)]
    pub id: Option<String>,
    /// `image`, and optionally `confidence`.
    #[serde(deserialize_with = "bounded::list")]
    pub inputs: Vec<InferInput>,
    /// Outputs wanted, each at most once; default: the Q-Score, and the flag for a calibrated
    /// model.
    #[serde(default, deserialize_with = "bounded::optional_list")]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One output tensor.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OutputTensor {
    /// Name.
    pub name: String,
    /// Protocol datatype.
    pub datatype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    #[schema(value_type = Vec<Object>)]
    pub data: Value,
}

/// The answer of `POST /v2/models/{name}/infer`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferResponse {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// The request's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Output tensors.
    pub outputs: Vec<OutputTensor>,
}

const OUTPUTS: [&str; 4] = ["q_score", "p_misclassified", "likely_misclassified", "embedding"];

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "kserve-v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "qscore".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec!["binary_tensor_data".into()],
    })
}

/// Liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "kserve-v2", responses((status = 200, body = Readiness)))]
pub async fn live() -> Json<Readiness> {
    Json(Readiness { ready: true })
}

/// Readiness: every model loaded and warmed up, not draining.
#[utoipa::path(get, path = "/v2/health/ready", tag = "kserve-v2", responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let ready = state.is_ready();
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(Readiness { ready }))
}

/// Model metadata.
#[utoipa::path(
    get, path = "/v2/models/{name}", tag = "kserve-v2", params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2Error))
)]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, V2Failure> {
    let m = state.engine.registry().get(Some(&name))?;
    let t = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    };
    let mut outputs = vec![t("q_score", "FP32", vec![-1])];
    if m.calibration.is_some() {
        outputs.push(t("p_misclassified", "FP32", vec![-1]));
        outputs.push(t("likely_misclassified", "BOOL", vec![-1]));
    }
    outputs.push(t("embedding", "FP32", vec![-1, m.manifest.output.dim as i64]));
    Ok(Json(ModelMetadata {
        name: m.name().to_owned(),
        versions: vec![m.manifest.version.clone()],
        platform: "onnxruntime_onnx".into(),
        inputs: if m.calibration.as_ref().is_some_and(|c| c.needs_user_confidence()) && m.manifest.classifier.is_none()
        {
            vec![t("image", "BYTES", vec![-1]), t("confidence", "FP32", vec![-1])]
        } else {
            vec![t("image", "BYTES", vec![-1])]
        },
        outputs,
    }))
}

/// Model readiness.
#[utoipa::path(
    get, path = "/v2/models/{name}/ready", tag = "kserve-v2", params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = Readiness), (status = 404, body = V2Error))
)]
pub async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Readiness>, V2Failure> {
    state.engine.registry().get(Some(&name))?;
    Ok(Json(Readiness { ready: state.is_ready() }))
}

/// Score a BYTES tensor of encoded images.
#[utoipa::path(
    post, path = "/v2/models/{name}/infer", tag = "kserve-v2", params(("name" = String, Path, description = "Model name")),
    request_body(content = InferRequest, description = "JSON, or with the binary-data extension (Inference-Header-Content-Length)"),
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "Malformed request or an image that could not be scored", body = V2Error),
        (status = 404, body = V2Error), (status = 413, body = V2Error), (status = 429, body = V2Error),
    )
)]
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<InferResponse>, V2Failure> {
    let model = state.engine.registry().get(Some(&name))?;
    infer_with(state, model, headers, body).await
}

/// `infer` with the model version already taken, so a reload meanwhile cannot change it.
async fn infer_with(
    state: AppState,
    model: Arc<Model>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<InferResponse>, V2Failure> {
    let budget = &state.engine.budget;
    let body = super::upload::read_limited(body, &state.limits, budget).await?;
    let Parsed { request, images, confidence } = parse(&headers, &body.bytes, state.limits.max_batch_images)?;
    let wanted = wanted_outputs(&request, &model)?;
    let embedding = if wanted.contains(&"embedding") { EmbeddingMode::Full } else { EmbeddingMode::Omit };
    let n = images.len();
    // The answer is built in memory before it is sent: reserve its size, as JSON numbers of at
    // most 24 characters, before any of it exists.
    let per_image = wanted.iter().map(|&o| if o == "embedding" { model.manifest.output.dim } else { 1 }).sum::<usize>();
    let _answer = budget.hold((n * per_image * 24 + 4096) as u64)?;
    // Items are named for the flagged webhook: the request id (when given) and the index.
    let prefix = request.id.as_deref().map(|id| format!("{id}/")).unwrap_or_default();
    let confidence = confidence.map_or_else(|| vec![None; n], |c| c.into_iter().map(Some).collect());
    let inputs = images
        .into_iter()
        .zip(confidence)
        .enumerate()
        .map(|(i, (b, confidence))| Input { id: format!("{prefix}{i}"), bytes: Ok(b), confidence })
        .collect();
    let scored = state.engine.score(&model, inputs, embedding).await?;
    let mut answers = Vec::with_capacity(n);
    for (i, out) in scored.into_iter().enumerate() {
        answers.push(out.answer.map_err(|e| Error::BadRequest(format!("image {i} of the `image` tensor: {e}")))?);
    }

    let outputs = wanted
        .iter()
        .map(|&name| {
            let (datatype, shape, data) = match name {
                "q_score" => ("FP32", vec![n], answers.iter().map(|a| a.q_score).collect::<Vec<_>>().into()),
                "p_misclassified" => (
                    "FP32",
                    vec![n],
                    answers.iter().map(|a| a.p_misclassified.unwrap_or(0.0)).collect::<Vec<_>>().into(),
                ),
                "likely_misclassified" => (
                    "BOOL",
                    vec![n],
                    answers.iter().map(|a| a.likely_misclassified == Some(true)).collect::<Vec<_>>().into(),
                ),
                _ => {
                    let d = model.manifest.output.dim;
                    let flat: Vec<f32> = answers.iter().flat_map(|a| a.embedding.clone().unwrap_or_default()).collect();
                    ("FP32", vec![n, d], flat.into())
                }
            };
            OutputTensor { name: name.to_owned(), datatype: datatype.to_owned(), shape, data }
        })
        .collect();
    Ok(Json(InferResponse {
        model_name: model.name().to_owned(),
        model_version: model.manifest.version.clone(),
        id: request.id,
        outputs,
    }))
}

/// The model `name` if `version` is the one it serves now; an unknown version is a 404 naming
/// the version there is.
fn check_version(state: &AppState, name: &str, version: &str) -> Result<Arc<Model>, Error> {
    let m = state.engine.registry().get(Some(name))?;
    if m.manifest.version == version {
        return Ok(m);
    }
    // A version longer than any real one is cut: error messages never grow with the request.
    let shown: String = version.chars().take(64).collect();
    Err(Error::UnknownModel {
        name: format!("{}` version `{shown}", m.name()),
        loaded: format!("{} at version {}", m.name(), m.manifest.version),
    })
}

/// Model metadata of one version (the one `versions` lists).
#[utoipa::path(
    get, path = "/v2/models/{name}/versions/{version}", tag = "kserve-v2",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version, as `versions` lists it")),
    responses((status = 200, body = ModelMetadata), (status = 404, body = V2Error))
)]
pub async fn version_metadata(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, V2Failure> {
    check_version(&state, &name, &version)?;
    model_metadata(State(state), Path(name)).await
}

/// Readiness of one model version.
#[utoipa::path(
    get, path = "/v2/models/{name}/versions/{version}/ready", tag = "kserve-v2",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version, as `versions` lists it")),
    responses((status = 200, body = Readiness), (status = 404, body = V2Error))
)]
pub async fn version_ready(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Readiness>, V2Failure> {
    check_version(&state, &name, &version)?;
    model_ready(State(state), Path(name)).await
}

/// Score with one model version: as `/v2/models/{name}/infer`.
#[utoipa::path(
    post, path = "/v2/models/{name}/versions/{version}/infer", tag = "kserve-v2",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version, as `versions` lists it")),
    request_body(content = InferRequest, description = "JSON, or with the binary-data extension (Inference-Header-Content-Length)"),
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "Malformed request or an image that could not be scored", body = V2Error),
        (status = 404, body = V2Error), (status = 413, body = V2Error), (status = 429, body = V2Error),
    )
)]
pub async fn version_infer(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<InferResponse>, V2Failure> {
    let model = check_version(&state, &name, &version)?;
    infer_with(state, model, headers, body).await
}

/// Rewrites the JSON errors answered under `/v2` by the layers and fallbacks shared with `/v1`
/// (401 API key, 404 no route, 405, extractor rejections) into the protocol's
/// `{"error": "message"}`, keeping their status and headers.
pub(crate) async fn protocol_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    use http_body_util::BodyExt;
    let path = req.uri().path();
    let v2 = path == "/v2" || path.starts_with("/v2/");
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !v2 || !is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error bodies are a sentence long; a longer one is not ours and is answered as a 500.
    let bytes = match http_body_util::Limited::new(body, 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return V2Failure(Error::Internal("an error answer could not be read".into())).into_response(),
    };
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_owned));
    let body = match message {
        Some(error) => Bytes::from(serde_json::to_vec(&V2Error { error }).unwrap_or_default()),
        None => bytes,
    };
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The outputs to answer, checked against what the model can give.
fn wanted_outputs(request: &InferRequest, model: &Model) -> Result<Vec<&'static str>, Error> {
    let calibrated = model.calibration.is_some();
    let Some(asked) = &request.outputs else {
        return Ok(if calibrated { OUTPUTS[..3].to_vec() } else { vec!["q_score"] });
    };
    let mut wanted: Vec<&'static str> = Vec::with_capacity(OUTPUTS.len());
    for o in asked {
        let name = OUTPUTS.iter().find(|&&n| n == o.name).ok_or_else(|| {
            Error::BadRequest(format!("unknown output `{}`; outputs: {}", o.name, OUTPUTS.join(", ")))
        })?;
        if !calibrated && matches!(*name, "p_misclassified" | "likely_misclassified") {
            return Err(Error::NotCalibrated { model: model.name().to_owned() });
        }
        wanted.push(name);
    }
    Ok(wanted)
}

/// What an inference request carries: its header, the images of its `image` tensor and, when
/// sent, the client's classifier confidence per image (a `confidence` FP32 or FP64 tensor of
/// the same element count).
#[derive(Debug)]
pub struct Parsed {
    /// The JSON header.
    pub request: InferRequest,
    /// The encoded images, in row-major order.
    pub images: Vec<Bytes>,
    /// One confidence per image, each checked to be in [0, 1]; None when not sent.
    pub confidence: Option<Vec<f32>>,
}

/// The request header, the images of its `image` tensor and its optional `confidence` tensor,
/// from a body in the JSON or the binary-data form (with its `Inference-Header-Content-Length`
/// header); at most `max_images`. Binary tensors follow the header in the order of `inputs`.
pub fn parse(headers: &HeaderMap, body: &Bytes, max_images: usize) -> Result<Parsed, Error> {
    let header_len = headers
        .get("inference-header-content-length")
        .map(|v| v.to_str().ok().and_then(|s| s.parse::<usize>().ok()))
        .map(|v| v.ok_or_else(|| Error::BadRequest("Inference-Header-Content-Length is not a number".into())))
        .transpose()?;
    let json_len = header_len.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(Error::BadRequest("Inference-Header-Content-Length is past the end of the body".into()));
    }
    let request: InferRequest = serde_json::from_slice(&body[..json_len]).map_err(|e| {
        bounded::refused(e, max_images, |e| Error::BadRequest(format!("invalid inference request: {e}")))
    })?;
    if let Some(id) = &request.id {
        bounded::check_id(|| "the request `id`".into(), id)?;
    }
    // Each output is answered once: a repeated one would multiply the answer, not inform.
    if let Some(outputs) = &request.outputs {
        let mut seen = std::collections::HashSet::with_capacity(outputs.len());
        if let Some(o) = outputs.iter().find(|o| !seen.insert(o.name.as_str())) {
            return Err(Error::BadRequest(format!(
                "output `{}` is requested more than once; list each output once",
                o.name
            )));
        }
    }
    let expected = "one `image` tensor (BYTES) and optionally one `confidence` tensor (FP32 or FP64)";
    if request.inputs.is_empty() || request.inputs.len() > 2 {
        return Err(Error::BadRequest(format!("expected {expected}; got {} inputs", request.inputs.len())));
    }
    // Binary tensors are laid end to end after the header, in the order of `inputs`.
    let mut binary_at = json_len;
    let mut binary = |input: &InferInput| -> Result<Option<Bytes>, Error> {
        let Some(size) = input.parameters.as_ref().and_then(|p| p.binary_data_size) else { return Ok(None) };
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| binary_at.checked_add(size))
            .filter(|&e| e <= body.len())
            .ok_or_else(|| {
                Error::BadRequest(format!("`{}`'s binary_data_size runs past the end of the body", input.name))
            })?;
        let slice = body.slice(binary_at..end);
        binary_at = end;
        Ok(Some(slice))
    };
    let (mut images, mut confidence) = (None, None);
    for input in &request.inputs {
        match (input.name.as_str(), input.datatype.as_str()) {
            ("image", "BYTES") if images.is_none() => images = Some(image_tensor(input, binary(input)?, max_images)?),
            ("confidence", "FP32" | "FP64") if confidence.is_none() => {
                confidence = Some(confidence_tensor(input, binary(input)?, max_images)?);
            }
            (name, datatype) => {
                return Err(Error::BadRequest(format!("expected {expected}; got `{name}` {datatype}")));
            }
        }
    }
    let images = images.ok_or_else(|| Error::BadRequest(format!("expected {expected}; `image` is missing")))?;
    if header_len.is_some() && binary_at != body.len() {
        return Err(Error::BadRequest(format!(
            "{} bytes follow the last binary tensor; binary_data_size must account for every byte after the header",
            body.len() - binary_at
        )));
    }
    if let Some(c) = &confidence
        && c.len() != images.len()
    {
        return Err(Error::BadRequest(format!(
            "`confidence` has {} elements for {} images; send one per image",
            c.len(),
            images.len()
        )));
    }
    Ok(Parsed { request, images, confidence })
}

/// The images of the `image` tensor, from its binary data or its base64 strings.
fn image_tensor(input: &InferInput, binary: Option<Bytes>, max_images: usize) -> Result<Vec<Bytes>, Error> {
    let n = element_count(&input.name, &input.shape, max_images)?;
    if n > max_images {
        return Err(Error::TooManyImages { limit: max_images });
    }
    if n == 0 {
        return Err(Error::MissingImage);
    }
    let images = match (binary, &input.data) {
        (Some(_), Some(_)) => return Err(both_forms("image")),
        (Some(raw), _) => split_bytes(&raw, n)?,
        (None, Some(leaves)) if leaves.others > 0 || !leaves.numbers.is_empty() => {
            return Err(Error::BadRequest("`image` data must be base64 strings, one per image".into()));
        }
        (None, Some(leaves)) => leaves
            .strings
            .iter()
            .enumerate()
            .map(|(i, s)| {
                super::upload::decode_base64(s)
                    .map(Bytes::from)
                    .map_err(|e| Error::BadRequest(format!("image {i}: not valid base64: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(Error::BadRequest("`image` carries no data: send base64 strings or binary data".into())),
    };
    if images.len() != n {
        return Err(Error::BadRequest(format!(
            "`image` has shape {:?} ({n} elements) but carries {} elements",
            input.shape,
            images.len()
        )));
    }
    Ok(images)
}

/// A tensor sent both as JSON `data` and as binary data: which one the client meant is a guess.
fn both_forms(name: &str) -> Error {
    Error::BadRequest(format!("`{name}` has both `data` and `binary_data_size`; send it one way"))
}

/// The client's confidences: numbers in [0, 1], as JSON numbers or little-endian binary floats
/// of the tensor's datatype.
fn confidence_tensor(input: &InferInput, binary: Option<Bytes>, max_images: usize) -> Result<Vec<f32>, Error> {
    let n = element_count(&input.name, &input.shape, max_images)?;
    let values: Vec<f64> = match (binary, &input.data) {
        (Some(_), Some(_)) => return Err(both_forms("confidence")),
        (Some(raw), _) => {
            let width = if input.datatype == "FP64" { 8 } else { 4 };
            if raw.len() != n * width {
                return Err(Error::BadRequest(format!(
                    "`confidence` has shape {:?} ({n} elements) but {} bytes of {}",
                    input.shape,
                    raw.len(),
                    input.datatype
                )));
            }
            raw.chunks_exact(width)
                .map(|b| match b.try_into() {
                    Ok(b8) => f64::from_le_bytes(b8),
                    Err(_) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                })
                .collect()
        }
        (None, Some(leaves)) if leaves.others > 0 || !leaves.strings.is_empty() => {
            return Err(Error::BadRequest("`confidence` data must be numbers, one per image".into()));
        }
        (None, Some(leaves)) => leaves.numbers.clone(),
        _ => return Err(Error::BadRequest("`confidence` carries no data".into())),
    };
    if values.len() != n {
        return Err(Error::BadRequest(format!(
            "`confidence` has shape {:?} ({n} elements) but carries {} elements",
            input.shape,
            values.len()
        )));
    }
    values
        .iter()
        .map(|&v| super::upload::checked_confidence(v).ok_or_else(|| Error::InvalidConfidence(v.to_string())))
        .collect()
}

/// Elements a shape declares: the product of its dimensions (1 for a scalar's `[]`), as the
/// protocol counts them, so `[N]`, `[N, 1]` and `[1, N]` all carry N images. A negative
/// dimension is refused, and a count past `max_images` is refused as soon as the product passes
/// it, which also keeps the product from overflowing.
fn element_count(name: &str, shape: &[i64], max_images: usize) -> Result<usize, Error> {
    let mut n: usize = 1;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| {
            Error::BadRequest(format!("`{name}` has shape {shape:?}: a dimension is negative; send the actual sizes"))
        })?;
        n = n.saturating_mul(d);
        if n > max_images && !shape.contains(&0) {
            return Err(Error::TooManyImages { limit: max_images });
        }
    }
    Ok(n)
}

/// BYTES elements of the binary extension: each a u32 little-endian length and its bytes; more
/// than `n` is an error found before the extra element is kept.
fn split_bytes(raw: &Bytes, n: usize) -> Result<Vec<Bytes>, Error> {
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    while at < raw.len() {
        if out.len() == n {
            return Err(Error::BadRequest(format!("`image` has {n} elements in its shape but carries more")));
        }
        let len_bytes: [u8; 4] = raw
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::BadRequest("a BYTES element's length is cut off".into()))?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let end = (at + 4)
            .checked_add(len)
            .filter(|&e| e <= raw.len())
            .ok_or_else(|| Error::BadRequest("a BYTES element runs past its tensor's binary data".into()))?;
        out.push(raw.slice(at + 4..end));
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_bytes_elements_split() {
        let raw = Bytes::from_static(&[3, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 1, 0, 0, 0, b'z']);
        let parts = split_bytes(&raw, 3).unwrap();
        assert_eq!(parts, vec![Bytes::from_static(b"abc"), Bytes::new(), Bytes::from_static(b"z")]);
        assert!(split_bytes(&Bytes::from_static(&[9, 0, 0, 0, 1]), 1).is_err());
        assert!(split_bytes(&Bytes::from_static(&[1, 0]), 1).is_err());
        // More elements than the shape declares stops at the first extra one.
        assert!(split_bytes(&raw, 2).unwrap_err().to_string().contains("carries more"));
    }

    /// A client-repeated output would multiply the answer (4,000 `embedding` outputs of 64
    /// images ran the server out of memory): each output is answered once, a repeat is a 400.
    #[test]
    fn outputs_are_listed_once() {
        let body = |outputs: &str| {
            format!(
                r#"{{"inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":["eA=="]}}],"outputs":{outputs}}}"#
            )
        };
        let Parsed { request, .. } =
            parse(&HeaderMap::new(), &Bytes::from(body(r#"[{"name":"embedding"}]"#)), 8).unwrap();
        assert_eq!(request.outputs.unwrap().len(), 1);
        for repeats in [2, 4000, 5000] {
            let repeated = vec![r#"{"name":"embedding"}"#; repeats].join(",");
            let err = parse(&HeaderMap::new(), &Bytes::from(body(&format!("[{repeated}]"))), 8).unwrap_err();
            let message = err.to_string();
            assert!(message.contains("more than once") || message.contains("more than 4096"), "{message}");
        }
    }

    /// Every form the protocol allows for two BYTES elements: flat or nested row-major data, with
    /// shape [2], [2, 1] or [1, 2]; and the shapes that cannot be right.
    #[test]
    fn tensor_forms_agree_on_their_element_count() {
        let two = [Bytes::from_static(b"x"), Bytes::from_static(b"y")];
        for (shape, data) in [
            ("[2]", r#"["eA==","eQ=="]"#),
            ("[2,1]", r#"[["eA=="],["eQ=="]]"#),
            ("[2,1]", r#"["eA==","eQ=="]"#),
            ("[1,2]", r#"[["eA==","eQ=="]]"#),
            ("[1,2,1]", r#"[[["eA=="],["eQ=="]]]"#),
        ] {
            let body = format!(r#"{{"inputs":[{{"name":"image","shape":{shape},"datatype":"BYTES","data":{data}}}]}}"#);
            let parsed = parse(&HeaderMap::new(), &Bytes::from(body), 8).unwrap_or_else(|e| panic!("{shape}: {e}"));
            assert_eq!(parsed.images, two, "{shape} {data}");
        }
        let scalar = r#"{"inputs":[{"name":"image","shape":[],"datatype":"BYTES","data":["eA=="]}]}"#;
        assert_eq!(parse(&HeaderMap::new(), &Bytes::from(scalar), 8).unwrap().images, vec![Bytes::from_static(b"x")]);

        assert_eq!(element_count("image", &[3, 1], 8).unwrap(), 3);
        assert_eq!(element_count("image", &[], 8).unwrap(), 1);
        assert_eq!(element_count("image", &[0, 1 << 40], 8).unwrap(), 0);
        assert!(matches!(element_count("image", &[1 << 40, 1 << 40], 8), Err(Error::TooManyImages { limit: 8 })));
        assert!(element_count("image", &[2, -1], 8).unwrap_err().to_string().contains("negative"));
        for (shape, data) in [("[3]", r#"["eA==","eQ=="]"#), ("[2,2]", r#"[["eA=="],["eQ=="]]"#)] {
            let body = format!(r#"{{"inputs":[{{"name":"image","shape":{shape},"datatype":"BYTES","data":{data}}}]}}"#);
            let err = parse(&HeaderMap::new(), &Bytes::from(body), 8).unwrap_err().to_string();
            assert!(err.contains("carries 2 elements"), "{shape}: {err}");
        }
    }

    #[test]
    fn binary_extension_request_parses() {
        let header =
            br#"{"inputs":[{"name":"image","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":10}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&[1, 0, 0, 0, b'x', 1, 0, 0, 0, b'y']);
        let mut headers = HeaderMap::new();
        headers.insert("inference-header-content-length", header.len().into());
        let Parsed { request, images, confidence } = parse(&headers, &Bytes::from(body), 8).unwrap();
        assert_eq!((request.inputs.len(), confidence), (1, None));
        assert_eq!(images, vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")]);
        let json = br#"{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":["eA=="]}]}"#;
        assert_eq!(
            parse(&HeaderMap::new(), &Bytes::from_static(json), 8).unwrap().images,
            vec![Bytes::from_static(b"x")]
        );
        let wrong = br#"{"inputs":[{"name":"image","shape":[3],"datatype":"BYTES","data":["eA=="]}]}"#;
        assert!(parse(&HeaderMap::new(), &Bytes::from_static(wrong), 8).is_err());
    }

    /// The client's classifier confidence as a second tensor: JSON numbers (any nesting), or
    /// binary FP32 / FP64 laid after the images in the order of `inputs`; refused when its
    /// count differs from the images', when a value is not a probability, or when it is text.
    #[test]
    fn confidence_tensor_in_every_form() {
        let image = r#"{"name":"image","shape":[2],"datatype":"BYTES","data":["eA==","eQ=="]}"#;
        for conf in [
            r#"{"name":"confidence","shape":[2],"datatype":"FP32","data":[0.25,1]}"#,
            r#"{"name":"confidence","shape":[2,1],"datatype":"FP64","data":[[0.25],[1.0]]}"#,
        ] {
            for inputs in [format!("[{image},{conf}]"), format!("[{conf},{image}]")] {
                let body = format!(r#"{{"inputs":{inputs}}}"#);
                let parsed = parse(&HeaderMap::new(), &Bytes::from(body), 8).unwrap();
                assert_eq!(parsed.confidence, Some(vec![0.25, 1.0]), "{inputs}");
            }
        }
        for (datatype, values) in [
            ("FP32", [0.25_f32.to_le_bytes().to_vec(), 1f32.to_le_bytes().to_vec()]),
            ("FP64", [0.25_f64.to_le_bytes().to_vec(), 1f64.to_le_bytes().to_vec()]),
        ] {
            let width = values[0].len() * 2;
            let header = format!(
                r#"{{"inputs":[{{"name":"image","shape":[2],"datatype":"BYTES","parameters":{{"binary_data_size":10}}}},{{"name":"confidence","shape":[2],"datatype":"{datatype}","parameters":{{"binary_data_size":{width}}}}}]}}"#
            );
            let mut body = header.as_bytes().to_vec();
            body.extend_from_slice(&[1, 0, 0, 0, b'x', 1, 0, 0, 0, b'y']);
            body.extend(values.concat());
            let mut headers = HeaderMap::new();
            headers.insert("inference-header-content-length", header.len().into());
            let parsed = parse(&headers, &Bytes::from(body), 8).unwrap();
            assert_eq!(parsed.images, vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")]);
            assert_eq!(parsed.confidence, Some(vec![0.25, 1.0]), "{datatype}");
        }
        for (conf, why) in [
            (r#"{"name":"confidence","shape":[1],"datatype":"FP32","data":[0.5]}"#, "1 elements for 2 images"),
            (r#"{"name":"confidence","shape":[2],"datatype":"FP32","data":[0.5,1.5]}"#, "[0, 1]"),
            (r#"{"name":"confidence","shape":[2],"datatype":"FP32","data":["0.5","1"]}"#, "numbers"),
            (r#"{"name":"confidence","shape":[2],"datatype":"BYTES","data":[0.5,1]}"#, "optionally one `confidence`"),
            (r#"{"name":"image","shape":[2],"datatype":"BYTES","data":["eA==","eQ=="]}"#, "got `image`"),
        ] {
            let body = format!(r#"{{"inputs":[{image},{conf}]}}"#);
            let err = parse(&HeaderMap::new(), &Bytes::from(body), 8).unwrap_err().to_string();
            assert!(err.contains(why), "{conf}: {err}");
        }
    }
}
