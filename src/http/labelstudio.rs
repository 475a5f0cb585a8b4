//! A Label Studio ML backend: `GET /health`, `POST /setup` and `POST /predict`, so a labelling
//! project can sort its tasks by how likely the model is to get each image wrong.
//!
//! Label Studio's Data Manager lists the lowest prediction score first, so the score is
//! oriented that way: `1 - p_misclassified` for a calibrated model, and `Q / (1 + Q)` (the
//! Q-Score squashed into [0, 1), still low for a weak representation) otherwise. Sorting the
//! "Prediction score" column ascending therefore puts the riskiest images on top.
//!
//! A task's images are the fields its project's label config names in `<Image value="$...">`
//! (or `valueList`) tags ([`label_config`]): the config comes in each `/predict` request's
//! `label_config` (or `project.label_config`), else from the project's `/setup`; without one,
//! `data.image` is read, or the task's only data field. A task with several images scores as its
//! riskiest. What each image reference may point at, and where the Label Studio token may go, is
//! [`media`]'s: nothing else in qscore ever fetches a URL.

mod label_config;
mod media;

use std::sync::Arc;

use axum::{Json, extract::State};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_json::Value;

pub use label_config::{ImageField, image_fields};
pub use media::{LabelStudio, StorageHosts};

use super::error::ErrorDetail;
use super::{AppState, bounded};
use crate::{
    engine::{EmbeddingMode, Input, Model, Output, budget::Reservation},
    error::Error,
};

/// Task images fetched at once for one `/predict`: enough to hide the latency of Label Studio,
/// few enough that one request cannot open hundreds of connections.
const FETCH_CONCURRENCY: usize = 8;

/// `POST /predict`, as Label Studio sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PredictRequest {
    /// The tasks to score.
    #[serde(deserialize_with = "bounded::image_list")]
    pub tasks: Vec<Task>,
    /// The project's label config (XML): its `<Image>` tags name the image fields.
    #[serde(default)]
    pub label_config: Option<String>,
    /// The project: Label Studio's `"<id>.<created>"` key, or an object with `id` and
    /// `label_config`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub project: Option<ProjectRef>,
}

/// `POST /setup`, as Label Studio sends it: the project and its label config. Its `hostname`
/// and `access_token` are ignored: images come only from `--label-studio-url`, with
/// `--label-studio-token`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct SetupRequest {
    /// The project key, as `/predict` will send it.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub project: Option<ProjectRef>,
    /// The label config (Label Studio sends it as `schema`).
    #[serde(default)]
    pub schema: Option<String>,
    /// The label config, as some clients name it.
    #[serde(default)]
    pub label_config: Option<String>,
}

/// Which project a request is for: its key, and its label config when it came along.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectRef {
    /// `"12.1732945600"` (Label Studio's id and creation time), or the bare id.
    pub key: Option<String>,
    /// The label config inside a project object.
    pub label_config: Option<String>,
}

impl<'de> Deserialize<'de> for ProjectRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ProjectRef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a project key (string or number) or a project object")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ProjectRef, E> {
                if v.len() > bounded::MAX_ID_BYTES {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(ProjectRef { key: Some(v.to_owned()), label_config: None })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ProjectRef, E> {
                Ok(ProjectRef { key: Some(v.to_string()), label_config: None })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ProjectRef, E> {
                Ok(ProjectRef { key: Some(v.to_string()), label_config: None })
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<ProjectRef, E> {
                Ok(ProjectRef::default())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ProjectRef, E> {
                Ok(ProjectRef::default())
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ProjectRef, E> {
                Ok(ProjectRef::default())
            }
            /// Not a project Label Studio sends: skipped unread, however large.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<ProjectRef, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ProjectRef::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<ProjectRef, A::Error> {
                let mut out = ProjectRef::default();
                while let Some(key) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" => out.key = a.next_value::<Option<ProjectRef>>()?.and_then(|p| p.key),
                        "label_config" => out.label_config = a.next_value()?,
                        _ => {
                            a.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// One Label Studio task.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Task {
    /// Task id: a number or a string; a cloud storage image needs Label Studio's number.
    #[schema(value_type = Object)]
    pub id: TaskId,
    /// Task data: the image fields are those the label config names.
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
            /// A fraction, or an integer past `u64` (serde_json reads it as a float): kept as
            /// written by `Debug` (`3.0`, `1.1805916207174113e21`), never as digits that would
            /// name another task's presign path.
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TaskId, E> {
                Ok(TaskId(format!("{v:?}")))
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

/// One top-level field of a task's data, as far as qscore reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// A string: an image reference, or text.
    One(String),
    /// A number (a task imported from JSON; CSV imports give every value as a string).
    Number(f64),
    /// A list: each item a string, or what was found instead (`a number`, `null`, ...), so that
    /// nothing in it is silently dropped.
    List(Vec<Result<String, &'static str>>),
    /// Anything else, skipped unread.
    Other,
}

/// The task field a model calibrated on the client's confidence reads it from.
pub const CONFIDENCE_FIELD: &str = "confidence";

/// What qscore reads of a task's `data`: its top-level strings and lists of strings, by key.
/// Every other value is skipped unread, whatever its size or shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskData {
    /// The fields, in order.
    pub fields: Vec<(String, Field)>,
}

impl TaskData {
    /// The field named `key`.
    pub fn get(&self, key: &str) -> Option<&Field> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The image references of this task, by the label config's image fields (`None`: no label
    /// config, so `data.image`, or else the only field).
    pub fn images(&self, fields: Option<&[ImageField]>) -> Result<Vec<&str>, Error> {
        let unresolved = |why: String| Err(Error::UnresolvedImage(why));
        let Some(fields) = fields else {
            return match (self.get("image"), self.fields.as_slice()) {
                (Some(Field::One(url)), _) => Ok(vec![url.as_str()]),
                (None, [(_, Field::One(url))]) => Ok(vec![url.as_str()]),
                _ => unresolved(format!(
                    "no label config came with the request (`label_config`) or from /setup for this project, so the \
                     image is `data.image` or the task's only field; this task has {}",
                    self.keys()
                )),
            };
        };
        if fields.is_empty() {
            return unresolved(
                "the label config has no <Image value=\"$field\"> (or valueList) tag, so no task field holds an image"
                    .into(),
            );
        }
        let mut out = Vec::new();
        for field in fields {
            let key = field.key();
            match (field, self.get(key)) {
                (_, None) => {
                    return unresolved(format!(
                        "the label config's <Image> reads `${key}`, but the task data has no `{key}` field (it has {})",
                        self.keys()
                    ));
                }
                (ImageField::One(_), Some(Field::One(url))) => out.push(url.as_str()),
                (ImageField::List(_), Some(Field::List(items))) => {
                    for (pos, item) in items.iter().enumerate() {
                        match item {
                            Ok(url) => out.push(url.as_str()),
                            Err(found) => {
                                return unresolved(format!(
                                    "task field `{key}` (valueList): item {pos} (counting from 0) is {found}, not a \
                                     string (an image URL)"
                                ));
                            }
                        }
                    }
                }
                (ImageField::One(_), Some(_)) => {
                    return unresolved(format!("task field `{key}` is not a string (an image URL)"));
                }
                (ImageField::List(_), Some(_)) => {
                    return unresolved(format!("task field `{key}` is not a list of image URLs (valueList)"));
                }
            }
        }
        if out.is_empty() {
            return unresolved("the task's image list is empty".into());
        }
        Ok(out)
    }

    /// The client's classifier confidence for this task, `data.confidence`: a number in [0, 1],
    /// or its text (Label Studio's CSV import makes every value a string). `None` without the
    /// field; `invalid_confidence` for anything else.
    pub fn confidence(&self) -> Result<Option<f32>, Error> {
        match self.get(CONFIDENCE_FIELD) {
            None => Ok(None),
            Some(Field::Number(v)) => super::upload::checked_confidence(*v)
                .map(Some)
                .ok_or_else(|| Error::InvalidConfidence(format!("task field `{CONFIDENCE_FIELD}` is {v}"))),
            Some(Field::One(text)) => super::upload::parse_confidence(text).map(Some),
            Some(_) => {
                Err(Error::InvalidConfidence(format!("task field `{CONFIDENCE_FIELD}` is not a number in [0, 1]")))
            }
        }
    }

    /// The data's keys, for messages: at most a few.
    fn keys(&self) -> String {
        if self.fields.is_empty() {
            return "no fields".into();
        }
        let mut keys: Vec<String> = self.fields.iter().take(8).map(|(k, _)| format!("`{k}`")).collect();
        if self.fields.len() > 8 {
            keys.push("...".into());
        }
        keys.join(", ")
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(Field::One(v.to_owned()))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Field, E> {
                Ok(Field::Number(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Field, E> {
                Ok(Field::Number(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Field, E> {
                Ok(Field::Number(v))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Field, A::Error> {
                let mut items = Vec::new();
                while let Some(ListItem(item)) = a.next_element()? {
                    items.push(item);
                }
                Ok(Field::List(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Field, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// One item of a list field: a string, or what was found instead (skipped unread).
struct ListItem(Result<String, &'static str>);

impl<'de> Deserialize<'de> for ListItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ListItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ListItem, E> {
                Ok(ListItem(Ok(v.to_owned())))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ListItem, E> {
                Ok(ListItem(Err("a boolean")))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<ListItem, E> {
                Ok(ListItem(Err("a number")))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<ListItem, E> {
                Ok(ListItem(Err("a number")))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ListItem, E> {
                Ok(ListItem(Err("a number")))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<ListItem, E> {
                Ok(ListItem(Err("null")))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<ListItem, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ListItem(Err("a list")))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<ListItem, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ListItem(Err("an object")))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for TaskData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TaskData;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the task's data object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<TaskData, A::Error> {
                let mut fields = Vec::new();
                while let Some(key) = a.next_key::<String>()? {
                    fields.push((key, a.next_value()?));
                }
                Ok(TaskData { fields })
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a `/predict` body: at most `max_tasks` tasks, every field checked before it is kept.
pub fn parse_predict(body: &[u8], max_tasks: usize) -> Result<PredictRequest, Error> {
    let req: PredictRequest = serde_json::from_slice(body).map_err(|e| {
        super::bounded::refused(e, max_tasks, |e| Error::BadRequest(format!("invalid /predict request: {e}; expected {{\"tasks\": [{{\"id\": ..., \"data\": {{\"photo\": \"<url>\"}}}}], \"label_config\": \"<View><Image name=\\\"img\\\" value=\\\"$photo\\\"/></View>\"}}")))
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

fn model_version(m: &Model) -> String {
    format!("{}@{}", m.name(), m.manifest.version)
}

/// Label Studio ML backend health.
#[utoipa::path(get, path = "/health", tag = "label-studio", responses((status = 200, body = BackendHealth)))]
pub async fn health() -> Json<BackendHealth> {
    Json(BackendHealth { status: "UP".into(), model_class: "qscore".into() })
}

/// Label Studio ML backend setup: names the model that will score, and remembers the project's
/// image fields for `/predict` requests that come without a label config.
#[utoipa::path(
    post, path = "/setup", tag = "label-studio", request_body = SetupRequest,
    responses((status = 200, body = SetupResponse), (status = 400, body = super::error::ErrorBody))
)]
pub async fn setup(State(state): State<AppState>, body: axum::body::Body) -> Result<Json<SetupResponse>, Error> {
    let body = super::upload::read_limited(body, &state.limits, &state.engine.budget).await?;
    let req: SetupRequest = if body.bytes.iter().all(u8::is_ascii_whitespace) {
        SetupRequest::default()
    } else {
        serde_json::from_slice(&body.bytes).map_err(|e| {
            Error::BadRequest(format!(
                "invalid /setup request: {e}; expected {{\"project\": \"<id>.<created>\", \"schema\": \"<label config>\"}}"
            ))
        })?
    };
    drop(body);
    let config = req.schema.as_deref().or(req.label_config.as_deref()).filter(|c| !c.trim().is_empty());
    if let Some(config) = config {
        let fields = image_fields(config)?;
        if let (Some(ls), Some(key)) = (&state.label_studio, req.project.and_then(|p| p.key)) {
            ls.remember(key, fields);
        }
    }
    let model = state.engine.registry().get(None)?;
    Ok(Json(SetupResponse { model_version: model_version(&model) }))
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
    let fields = request_image_fields(&state, &req)?;
    // One job per image: a task with several images has several; a task whose images cannot be
    // named has one, its error.
    let mut jobs: Vec<(usize, Result<&str, Error>)> = Vec::new();
    for (i, task) in req.tasks.iter().enumerate() {
        match task.data.images(fields.as_deref().map(Vec::as_slice)) {
            Ok(images) => jobs.extend(images.into_iter().map(|r| (i, Ok(r)))),
            Err(e) => jobs.push((i, Err(e))),
        }
    }
    if jobs.len() > state.limits.max_batch_images {
        return Err(Error::TooManyImages { limit: state.limits.max_batch_images });
    }
    // One snapshot: the version named is the one that scores, whatever reloads meanwhile.
    let model = state.engine.registry().get(None)?;
    let version = model_version(&model);
    let needs_confidence = model.needs_client_confidence();
    // The fetches and the scoring share the request's deadline; the fetches end a quarter of it
    // early, so the images fetched by then are still scored.
    let start = std::time::Instant::now();
    let deadline = start + state.engine.request_timeout;
    let fetch_deadline = start + state.engine.request_timeout * 3 / 4;
    let fetches: Vec<_> = jobs
        .iter()
        .enumerate()
        .map(|(j, (i, reference))| {
            let (state, task, reference) = (&state, &req.tasks[*i], reference.clone());
            async move {
                let fetched = match reference {
                    Ok(reference) => fetch_image(state, task, reference).await,
                    Err(e) => Err(e),
                };
                (j, fetched)
            }
        })
        .collect();
    // Unordered, so a slow image holds only its own slot; each answer goes back to its job.
    let mut fetching = futures_util::stream::iter(fetches).buffer_unordered(FETCH_CONCURRENCY);
    let mut slots: Vec<Option<Result<(Bytes, Reservation), Error>>> = (0..jobs.len()).map(|_| None).collect();
    while let Ok(Some((j, fetched))) = tokio::time::timeout_at(fetch_deadline.into(), fetching.next()).await {
        slots[j] = Some(fetched);
    }
    drop(fetching);
    let fetched = slots.into_iter().map(|slot| {
        slot.unwrap_or_else(|| {
            Err(Error::FetchFailed(format!(
                "not fetched within the request's deadline ({} ms of --request-timeout-ms go to fetching)",
                (state.engine.request_timeout * 3 / 4).as_millis()
            )))
        })
    });
    // The fetched bytes stay reserved until the answer is built.
    let mut _held = Reservation::default();
    let inputs = jobs
        .iter()
        .zip(fetched)
        .map(|((i, _), fetched)| {
            let bytes = fetched.map(|(bytes, held)| {
                _held.merge(held);
                bytes
            });
            let task = &req.tasks[*i];
            // Read only for a model that needs it: elsewhere `data.confidence` may be any
            // field of the user's own.
            match needs_confidence.then(|| task.data.confidence()).transpose() {
                Ok(confidence) => Input { confidence: confidence.flatten(), ..Input::new(task.id.to_string(), bytes) },
                Err(e) => Input::new(task.id.to_string(), bytes.and(Err(e))),
            }
        })
        .collect();
    let outputs = state.engine.score_until(&model, inputs, EmbeddingMode::Omit, deadline).await?;
    // A task's score is its riskiest image's; one image that fails fails the task.
    let mut per_task: Vec<Option<Result<f64, Error>>> = vec![None; req.tasks.len()];
    for ((i, _), Output { answer, .. }) in jobs.iter().zip(outputs) {
        // Label Studio's Data Manager lists the lowest score first: the riskiest on top.
        let score = answer.map(|s| 1.0 - s.risk());
        per_task[*i] = Some(match (per_task[*i].take(), score) {
            (None, s) => s,
            (Some(Err(e)), _) | (Some(Ok(_)), Err(e)) => Err(e),
            (Some(Ok(a)), Ok(b)) => Ok(a.min(b)),
        });
    }
    let results = per_task
        .into_iter()
        .map(|score| {
            let score = score.unwrap_or_else(|| Err(Error::Internal("a task got no job".into())));
            TaskPrediction {
                model_version: version.clone(),
                score: score.as_ref().ok().copied(),
                result: Vec::new(),
                error: score.err().map(|e| ErrorDetail::from(&e)),
            }
        })
        .collect();
    Ok(Json(PredictResponse { results }))
}

/// The image fields of a `/predict` request: from its `label_config`, its project object's, or
/// the project's `/setup`; `None` when none of them is known.
fn request_image_fields(state: &AppState, req: &PredictRequest) -> Result<Option<Arc<Vec<ImageField>>>, Error> {
    let given = req.label_config.as_deref().or(req.project.as_ref().and_then(|p| p.label_config.as_deref()));
    if let Some(config) = given.filter(|c| !c.trim().is_empty()) {
        return Ok(Some(Arc::new(image_fields(config)?)));
    }
    let key = req.project.as_ref().and_then(|p| p.key.as_deref());
    Ok(key.zip(state.label_studio.as_ref()).and_then(|(key, ls)| ls.recall(key)))
}

/// One image of a task: decoded from a `data:` URI, or fetched through Label Studio.
async fn fetch_image(state: &AppState, task: &Task, reference: &str) -> Result<(Bytes, Reservation), Error> {
    if media::is_data_uri(reference) {
        return media::decode_data_uri(reference, state.engine.limits.max_bytes, &state.engine.budget);
    }
    let ls = state.label_studio.as_ref().ok_or_else(|| {
        Error::FetchFailed("no Label Studio host is configured (--label-studio-url), so no image URL is fetched".into())
    })?;
    let url = ls.resolve(reference, &task.id.0)?;
    ls.fetch(url, &state.engine.budget).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> PredictRequest {
        parse_predict(json.as_bytes(), 16).unwrap()
    }

    #[test]
    fn the_image_is_the_field_the_label_config_names() {
        let req = parse(
            r#"{"tasks": [{"id": 1, "data": {"caption": "a cat on a blanket", "photo": "/data/upload/1/cat.png"}}],
                "label_config": "<View><Text name=\"t\" value=\"$caption\"/><Image name=\"img\" value=\"$photo\"/></View>",
                "project": "1.1732945600"}"#,
        );
        let fields = image_fields(req.label_config.as_deref().unwrap()).unwrap();
        assert_eq!(req.tasks[0].data.images(Some(&fields)).unwrap(), ["/data/upload/1/cat.png"]);
        assert_eq!(req.project.unwrap().key.as_deref(), Some("1.1732945600"));
        // No config: `image`, else the only field; never a caption picked by position.
        assert!(
            matches!(req.tasks[0].data.images(None), Err(Error::UnresolvedImage(m)) if m.contains("`caption`, `photo`"))
        );
        let only = parse(r#"{"tasks": [{"id": 1, "data": {"photo": "/data/upload/1/a.png"}}]}"#);
        assert_eq!(only.tasks[0].data.images(None).unwrap(), ["/data/upload/1/a.png"]);
        let image = parse(r#"{"tasks": [{"id": 1, "data": {"caption": "x", "image": "/data/upload/1/a.png"}}]}"#);
        assert_eq!(image.tasks[0].data.images(None).unwrap(), ["/data/upload/1/a.png"]);
    }

    #[test]
    fn several_images_lists_and_missing_fields() {
        let req = parse(
            r#"{"tasks": [{"id": 1, "data": {"front": "/data/upload/1/f.png", "pages": ["/data/upload/1/p1.png", "/data/upload/1/p2.png"], "n": {"deep": [1]}}},
                          {"id": 2, "data": {"pages": []}}],
                "project": {"id": 3, "label_config": "<View><Image name=\"a\" value=\"$front\"/><Image name=\"b\" valueList=\"$pages\"/></View>"}}"#,
        );
        let project = req.project.unwrap();
        assert_eq!(project.key.as_deref(), Some("3"));
        let fields = image_fields(project.label_config.as_deref().unwrap()).unwrap();
        assert_eq!(
            req.tasks[0].data.images(Some(&fields)).unwrap(),
            ["/data/upload/1/f.png", "/data/upload/1/p1.png", "/data/upload/1/p2.png"]
        );
        let e = req.tasks[1].data.images(Some(&fields)).unwrap_err();
        assert!(e.to_string().contains("no `front` field") && e.code() == "unresolved_image", "{e}");
        let text_only = image_fields(r#"<View><Text name="t" value="$text"/></View>"#).unwrap();
        assert!(req.tasks[0].data.images(Some(&text_only)).unwrap_err().to_string().contains("no <Image"));
        // Nothing in a list is silently dropped: an item that is not a string fails the task.
        let lists = parse(
            r#"{"tasks": [{"id": 1, "data": {"front": "f", "pages": ["/a.png", 5]}},
                          {"id": 2, "data": {"front": "f", "pages": ["/a.png", null]}},
                          {"id": 3, "data": {"front": "f", "pages": ["/a.png", {"url": "/b.png"}]}},
                          {"id": 4, "data": {"front": "f", "pages": [["/a.png"]]}},
                          {"id": 5, "data": {"front": "f", "pages": [true]}}]}"#,
        );
        for (task, want) in lists.tasks.iter().zip([
            "item 1 (counting from 0) is a number",
            "item 1 (counting from 0) is null",
            "item 1 (counting from 0) is an object",
            "item 0 (counting from 0) is a list",
            "item 0 (counting from 0) is a boolean",
        ]) {
            let e = task.data.images(Some(&fields)).unwrap_err();
            assert!(e.code() == "unresolved_image" && e.to_string().contains(want), "{want}: {e}");
            assert!(e.to_string().contains("`pages`"), "{e}");
        }
        // Task ids: a float, or an integer past u64, never reads as another task's number.
        let ids = parse(
            r#"{"tasks": [{"id": 1180591620717411303424, "data": {}}, {"id": 3.0, "data": {}},
                                      {"id": -4, "data": {}}, {"id": 18446744073709551615, "data": {}}]}"#,
        );
        let ids: Vec<&str> = ids.tasks.iter().map(|t| t.id.0.as_str()).collect();
        assert_eq!(ids, ["1.1805916207174113e21", "3.0", "-4", "18446744073709551615"]);
        let wrong = [ImageField::One("pages".into())];
        assert!(req.tasks[0].data.images(Some(&wrong)).unwrap_err().to_string().contains("not a string"));
    }

    #[test]
    fn the_clients_confidence_is_a_number_or_its_text() {
        let req = parse(
            r#"{"tasks": [{"id": 1, "data": {"confidence": 0.25}}, {"id": 2, "data": {"confidence": " 1 "}},
                          {"id": 3, "data": {}}, {"id": 4, "data": {"confidence": 1.5}},
                          {"id": 5, "data": {"confidence": "high"}}, {"id": 6, "data": {"confidence": [0.5]}},
                          {"id": 7, "data": {"confidence": 0}}]}"#,
        );
        let got: Vec<_> = req.tasks.iter().map(|t| t.data.confidence().map_err(|e| e.code())).collect();
        assert_eq!(
            got,
            [
                Ok(Some(0.25)),
                Ok(Some(1.0)),
                Ok(None),
                Err("invalid_confidence"),
                Err("invalid_confidence"),
                Err("invalid_confidence"),
                Ok(Some(0.0))
            ]
        );
    }
}
