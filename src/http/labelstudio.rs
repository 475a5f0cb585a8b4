//! A Label Studio ML backend: `GET /health`, `POST /setup` and `POST /predict`, so a labelling
//! project can sort its tasks by how likely the model is to get each image wrong.
//!
//! Label Studio's Data Manager lists the lowest prediction score first, so the score is
//! oriented that way: `1 - p_misclassified` for a calibrated model, and `Q / (1 + Q)` (the
//! Q-Score squashed into [0, 1), still low for a weak representation) otherwise. Sorting the
//! "Prediction score" column ascending therefore puts the riskiest images on top.
//!
//! Task images arrive as URLs. They are fetched only from the one Label Studio host given by
//! `--label-studio-url` (relative paths such as `/data/upload/...` are resolved against it),
//! with its `--label-studio-token`, a size limit and a timeout; any other URL is refused with an
//! error on that task alone. Nothing else in qscore ever fetches a URL.

use std::time::Duration;

use axum::{Json, extract::State};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_json::Value;

use super::error::ErrorDetail;
use super::{AppState, bounded};
use crate::{
    engine::{
        EmbeddingMode, Input, Output,
        budget::{HeldBuffer, MemoryBudget, Reservation},
    },
    error::Error,
};

/// Where task images may come from.
#[derive(Debug, Clone)]
pub struct LabelStudio {
    /// The Label Studio base URL.
    pub base: reqwest::Url,
    /// Sent as `Authorization: Token ...`.
    pub token: Option<String>,
    /// The HTTP client, with the fetch timeout.
    pub client: reqwest::Client,
    /// Largest image fetched, in bytes.
    pub max_bytes: usize,
}

impl LabelStudio {
    /// A fetcher for `base`, with `timeout` per image.
    pub fn new(base: &str, token: Option<String>, timeout: Duration, max_bytes: usize) -> anyhow::Result<Self> {
        let base =
            reqwest::Url::parse(base).map_err(|e| anyhow::anyhow!("--label-studio-url {base} is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            anyhow::bail!("--label-studio-url must be an http(s) URL with a host, got {base}");
        }
        let client = reqwest::Client::builder().timeout(timeout).redirect(reqwest::redirect::Policy::none()).build()?;
        Ok(Self { base, token, client, max_bytes })
    }

    /// The URL to fetch for a task's image reference, or why it is refused.
    pub fn resolve(&self, reference: &str) -> Result<reqwest::Url, Error> {
        let url =
            self.base.join(reference).map_err(|e| Error::UrlRefused(format!("`{reference}` is not a URL: {e}")))?;
        let same = url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default();
        if same {
            Ok(url)
        } else {
            Err(Error::UrlRefused(format!(
                "refused to fetch {url}: images are fetched only from the Label Studio host {} (--label-studio-url)",
                self.base.origin().ascii_serialization()
            )))
        }
    }

    /// Fetches one image, within the size limit, reserving its bytes from `budget` as they
    /// arrive.
    async fn fetch(&self, url: reqwest::Url, budget: &MemoryBudget) -> Result<(Bytes, Reservation), Error> {
        let mut req = self.client.get(url.clone());
        if let Some(token) = &self.token {
            req = req.header(reqwest::header::AUTHORIZATION, format!("Token {token}"));
        }
        let mut resp = req.send().await.map_err(|e| Error::FetchFailed(format!("cannot fetch {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(Error::FetchFailed(format!("fetching {url} answered {}", resp.status())));
        }
        let too_large = || Error::ImageTooLarge { size: self.max_bytes + 1, limit: self.max_bytes };
        let declared = resp.content_length().unwrap_or(0);
        if declared > self.max_bytes as u64 {
            return Err(too_large());
        }
        let mut buf = HeldBuffer::new(budget, declared as usize, self.max_bytes)?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| Error::FetchFailed(format!("reading {url}: {e}")))? {
            if buf.len() + chunk.len() > self.max_bytes {
                return Err(too_large());
            }
            buf.extend(&chunk)?;
        }
        Ok(buf.into_parts())
    }
}

/// Task images fetched at once for one `/predict`: enough to hide the latency of Label Studio,
/// few enough that one request cannot open hundreds of connections.
const FETCH_CONCURRENCY: usize = 8;

/// `POST /predict`, as Label Studio sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PredictRequest {
    /// The tasks to score.
    #[serde(deserialize_with = "bounded::list")]
    pub tasks: Vec<Task>,
    /// The project's labelling config (unused, skipped unread).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub label_config: Option<IgnoredAny>,
    /// The project id (unused, skipped unread).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub project: Option<IgnoredAny>,
}

/// One Label Studio task.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Task {
    /// Task id: a number or a string.
    #[schema(value_type = Object)]
    pub id: TaskId,
    /// Task data; the image URL is `data.image`, else the first string field.
    #[schema(value_type = Object)]
    pub data: TaskData,
}

/// A task's id as Label Studio sends it, a number or a string, echoed in logs and webhook events.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskId(pub String);

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = TaskId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a task id: a number or a string of at most {} bytes", bounded::MAX_ID_BYTES)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TaskId, E> {
                Ok(TaskId(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TaskId, E> {
                Ok(TaskId(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TaskId, E> {
                Ok(TaskId(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TaskId, E> {
                if v.len() > bounded::MAX_ID_BYTES {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(TaskId(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// What qscore reads of a task's `data`: the image reference, `data.image` or else the first
/// string field. Every other field is skipped unread, whatever its size or shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskData {
    /// The image URL or path, when there is one.
    pub image: Option<String>,
}

impl<'de> Deserialize<'de> for TaskData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A field's value: kept when it is a string, skipped unread otherwise.
        struct MaybeString(Option<String>);
        impl<'de> Deserialize<'de> for MaybeString {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = MaybeString;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("any value")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MaybeString, E> {
                        Ok(MaybeString(Some(v.to_owned())))
                    }
                    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<MaybeString, E> {
                        Ok(MaybeString(None))
                    }
                    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<MaybeString, E> {
                        Ok(MaybeString(None))
                    }
                    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<MaybeString, E> {
                        Ok(MaybeString(None))
                    }
                    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<MaybeString, E> {
                        Ok(MaybeString(None))
                    }
                    fn visit_unit<E: serde::de::Error>(self) -> Result<MaybeString, E> {
                        Ok(MaybeString(None))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<MaybeString, A::Error> {
                        while a.next_element::<IgnoredAny>()?.is_some() {}
                        Ok(MaybeString(None))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<MaybeString, A::Error> {
                        while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                        Ok(MaybeString(None))
                    }
                }
                d.deserialize_any(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TaskData;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the task's data object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<TaskData, A::Error> {
                let (mut image, mut first) = (None, None);
                while let Some(key) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                    let MaybeString(value) = a.next_value()?;
                    if key == "image" && value.is_some() {
                        image = value;
                    } else if first.is_none() {
                        first = value;
                    }
                }
                Ok(TaskData { image: image.or(first) })
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a `/predict` body: at most `max_tasks` tasks, every field checked before it is kept.
pub fn parse_predict(body: &[u8], max_tasks: usize) -> Result<PredictRequest, Error> {
    let req: PredictRequest = serde_json::from_slice(body).map_err(|e| {
        Error::BadRequest(format!("invalid /predict request: {e}; expected {{\"tasks\": [{{\"id\": ..., \"data\": {{\"image\": \"<url>\"}}}}]}}"))
    })?;
    if req.tasks.len() > max_tasks {
        return Err(Error::TooManyImages { limit: max_tasks });
    }
    Ok(req)
}

/// The answer of `/predict`: one prediction per task, in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PredictResponse {
    /// Predictions.
    pub results: Vec<TaskPrediction>,
}

/// One task's prediction.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskPrediction {
    /// `model@version`.
    pub model_version: String,
    /// Lowest = riskiest (see the module docs); null when the task failed.
    pub score: Option<f64>,
    /// Regions (none: qscore scores whole images).
    #[schema(value_type = Vec<Object>)]
    pub result: Vec<Value>,
    /// Why the task could not be scored: the same `{code, message}` as a batch item's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// `POST /setup`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SetupResponse {
    /// `model@version`.
    pub model_version: String,
}

/// `GET /health`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BackendHealth {
    /// `UP`.
    pub status: String,
    /// What answers.
    pub model_class: String,
}

fn model_version(state: &AppState) -> Result<String, Error> {
    let m = state.engine.registry.get(None)?;
    Ok(format!("{}@{}", m.name(), m.manifest.version))
}

/// Label Studio ML backend health.
#[utoipa::path(get, path = "/health", tag = "label-studio", responses((status = 200, body = BackendHealth)))]
pub async fn health() -> Json<BackendHealth> {
    Json(BackendHealth { status: "UP".into(), model_class: "qscore".into() })
}

/// Label Studio ML backend setup: names the model that will score.
#[utoipa::path(post, path = "/setup", tag = "label-studio", responses((status = 200, body = SetupResponse)))]
pub async fn setup(State(state): State<AppState>) -> Result<Json<SetupResponse>, Error> {
    Ok(Json(SetupResponse { model_version: model_version(&state)? }))
}

/// Label Studio ML backend predictions: one score per task, lowest = riskiest.
#[utoipa::path(
    post, path = "/predict", tag = "label-studio", request_body = PredictRequest,
    responses((status = 200, description = "One prediction per task; a task that failed has its own error", body = PredictResponse),
              (status = 400, body = super::error::ErrorBody), (status = 413, body = super::error::ErrorBody))
)]
pub async fn predict(State(state): State<AppState>, body: axum::body::Body) -> Result<Json<PredictResponse>, Error> {
    let body = super::upload::read_limited(body, &state.limits, &state.engine.budget).await?;
    let req = parse_predict(&body.bytes, state.limits.max_batch_images)?;
    drop(body);
    let version = model_version(&state)?;
    let model = state.engine.registry.get(None)?.clone();
    // The fetches and the scoring share the request's deadline.
    let deadline = std::time::Instant::now() + state.engine.request_timeout;
    let fetches: Vec<_> = req.tasks.iter().map(|t| fetch_task(&state, t)).collect();
    let fetching = futures_util::stream::iter(fetches).buffered(FETCH_CONCURRENCY).collect::<Vec<_>>();
    let fetched = tokio::time::timeout_at(deadline.into(), fetching).await.map_err(|_| Error::Timeout)?;
    // The fetched bytes stay reserved until the answer is built.
    let mut _held = Reservation::default();
    let inputs = req
        .tasks
        .iter()
        .zip(fetched)
        .map(|(task, fetched)| Input {
            id: task.id.to_string(),
            bytes: fetched.map(|(bytes, held)| {
                _held.merge(held);
                bytes
            }),
        })
        .collect();
    let results = state
        .engine
        .score_until(&model, inputs, EmbeddingMode::Omit, deadline)
        .await?
        .into_iter()
        .map(|Output { answer, .. }| TaskPrediction {
            model_version: version.clone(),
            // Label Studio's Data Manager lists the lowest score first: the riskiest on top.
            score: answer.as_ref().ok().map(|s| 1.0 - s.risk()),
            result: Vec::new(),
            error: answer.err().map(|e| ErrorDetail::from(&e)),
        })
        .collect();
    Ok(Json(PredictResponse { results }))
}

async fn fetch_task(state: &AppState, task: &Task) -> Result<(Bytes, Reservation), Error> {
    let reference = task
        .data
        .image
        .as_deref()
        .ok_or_else(|| Error::BadRequest(format!("task {}: no image URL in its data", task.id)))?;
    let ls = state.label_studio.as_ref().ok_or_else(|| {
        Error::FetchFailed("no Label Studio host is configured (--label-studio-url), so no image URL is fetched".into())
    })?;
    let url = ls.resolve(reference)?;
    ls.fetch(url, &state.engine.budget).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_label_studio_host_is_fetched() {
        let ls = LabelStudio::new("http://ls.local:8080", None, Duration::from_secs(1), 1 << 20).unwrap();
        assert_eq!(ls.resolve("/data/upload/1/a.png").unwrap().as_str(), "http://ls.local:8080/data/upload/1/a.png");
        assert!(ls.resolve("http://ls.local:8080/data/x.png").is_ok());
        for other in [
            "http://ls.local:9090/x.png",
            "https://ls.local:8080/x.png",
            "http://evil.example/x.png",
            "file:///etc/passwd",
        ] {
            assert!(ls.resolve(other).unwrap_err().to_string().contains("refused"), "{other}");
        }
        assert!(LabelStudio::new("ftp://x", None, Duration::from_secs(1), 1).is_err());
    }
}
