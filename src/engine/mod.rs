//! The running service core: the one pipeline every edge calls.
//!
//! ```text
//! edge (v1, KServe v2, Label Studio, `qscore score`, `qscore calibrate`)
//!   → Engine::score(model, inputs)            admission: images in flight, memory budget
//!     → decode slot → image::prepare          one per core, reserved before decoding
//!     → batch::Worker (one thread per model)  gathers images from every request, runs the Embedder
//!     → qscore maths → risk::measure          pure
//!     → side effects, once per item           metrics, drift, flagged-answer observers
//!   ← one answer per input, in order
//! ```
//!
//! [`Engine::explain`] ([`explain`]) takes one image down the same path, then its occluded
//! copies through the same worker, as one admission-bounded job.
//!
//! [`Engine::open`] starts it from a plain [`EngineConfig`] (never from clap's types): ONNX
//! Runtime, the models under `models_dir` (checked and warmed up), one inference thread each.
//! The offline commands open it exactly as the server does, so `qscore score` answers what
//! `POST /v1/score` answers. Tests open it over fake [`batch::Embedder`]s instead
//! ([`Engine::from_registry`]), so every edge can be tested in-process without ONNX Runtime.

pub mod admission;
pub mod answer;
pub mod batch;
pub mod budget;
pub mod explain;
pub mod registry;
pub mod reload;
pub mod webhook;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use ndarray::Array3;
use tokio::sync::Semaphore;

use self::{
    admission::Admission,
    answer::{answer, millis},
    budget::{MemoryBudget, Reservation},
};
pub use self::{
    answer::{EmbeddingMode, ImageScore, Timings},
    batch::BatchSettings,
    registry::{LoadFailure, Loader, Model, Registry, Selection},
};
use crate::{
    drift::{DriftMonitor, DriftSettings},
    error::Error,
    image::{self, ImageLimits},
    metrics::{Metrics, Outcome, Rejection},
    model::encoder::SessionOptions,
    qscore,
};

/// Where the models and ONNX Runtime come from, how they run, and how images are limited.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Folder holding one sub-folder per model.
    pub models_dir: PathBuf,
    /// The model used when a request names none (default: the first by name).
    pub default_model: Option<String>,
    /// Path to libonnxruntime.so, when not found by the usual search.
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime session settings.
    pub session: SessionOptions,
    /// How each model's thread forms batches.
    pub batching: BatchSettings,
    /// Limits checked on every image.
    pub limits: ImageLimits,
}

/// How much work the pipeline takes on at once, for how long, and how much it remembers.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Most images inside the pipeline at once.
    pub max_images: usize,
    /// Deadline of one call.
    pub timeout: Duration,
    /// The drift windows.
    pub drift: DriftSettings,
    /// Bytes the memory budget holds (`--memory-budget-bytes`).
    pub memory_budget: u64,
}

impl Capacity {
    /// For offline tools (`score`, `calibrate`): they feed the pipeline in chunks themselves,
    /// wait as long as it takes, and watch no drift.
    pub const OFFLINE: Self = Self {
        max_images: usize::MAX / 2,
        timeout: Duration::from_secs(24 * 3600),
        drift: DriftSettings { max_images: 0, max_age: Duration::ZERO },
        memory_budget: u64::MAX,
    };
}

/// Told of every flagged answer, whichever edge it came from (the `--flagged-webhook` is one).
/// Called on the request's task: it must not block.
pub trait FlaggedObserver: Send + Sync {
    /// `id` is the client's name for the image; `answer` has `likely_misclassified == Some(true)`.
    fn flagged(&self, id: &str, answer: &ImageScore);
}

/// One image as an edge hands it in: the client's id for it, and its bytes or why there are
/// none (bad base64, a failed fetch). An input that is already an error keeps its place and is
/// counted like any other.
#[derive(Debug)]
pub struct Input {
    /// The client's name for the image (file name, JSON id, task id, position).
    pub id: String,
    /// The encoded image.
    pub bytes: Result<Bytes, Error>,
    /// The client's classifier's probability for its own prediction on this image, in [0, 1]
    /// (checked at the edge). Read only by a model whose flag was calibrated on it.
    pub confidence: Option<f32>,
}

impl Input {
    /// An image without a client confidence.
    pub fn new(id: impl Into<String>, bytes: Result<Bytes, Error>) -> Self {
        Self { id: id.into(), bytes, confidence: None }
    }
}

/// One answer, in the order of the inputs.
#[derive(Debug)]
pub struct Output {
    /// The input's id.
    pub id: String,
    /// Its score, or why it has none.
    pub answer: Result<ImageScore, Error>,
}

/// The models, the pipeline's limits and its side effects.
pub struct Engine {
    /// The models served now; swapped whole by a reload ([`reload`]).
    registry: ArcSwap<Registry>,
    /// What loads model folders again; `None` for models built elsewhere (tests).
    loader: Option<Loader>,
    /// Limits checked on every image.
    pub limits: ImageLimits,
    /// How many images may be in the server at once.
    pub admission: Arc<Admission>,
    /// How long a request may take before it is answered 503 and its work dropped.
    pub request_timeout: Duration,
    /// Where outcomes are counted.
    pub metrics: Metrics,
    /// Recent answers of each calibrated model, for drift monitoring.
    pub drift: DriftMonitor,
    /// Bytes held for requests, decodes and queued tensors.
    pub budget: MemoryBudget,
    /// Images being decoded at once (one per core): decoding is CPU-bound, and a slot is held
    /// until its decode really ends, so abandoned requests never pile up work.
    decode_slots: Arc<Semaphore>,
    /// Told of every flagged answer.
    observers: Vec<Arc<dyn FlaggedObserver>>,
    /// What one explanation may cost (`--max-explain-features`, `--max-explain-passes`), and how
    /// many run at once (`--max-concurrent-explains`); set with [`Engine::set_explain_limits`].
    pub explain: crate::explain::ExplainLimits,
    /// Explanations running now, one admission slot each, at most `explain.max_concurrent`.
    explaining: Arc<Admission>,
}

/// CPU cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

impl Engine {
    /// Starts ONNX Runtime, loads, checks and warms up the selected models. Blocking: call it
    /// from a blocking context.
    pub fn open(config: &EngineConfig, selection: &Selection, capacity: Capacity) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let loader = Loader::start(config, &metrics)?;
        let registry = loader.load(selection)?;
        let mut engine = Self::from_registry(registry, config.limits, capacity, metrics);
        engine.loader = Some(loader);
        Ok(engine)
    }

    /// The engine over models loaded elsewhere (tests' fake encoders); `metrics` must be the
    /// family their workers report to.
    pub fn from_registry(registry: Registry, limits: ImageLimits, capacity: Capacity, metrics: Metrics) -> Self {
        let drift = DriftMonitor::new(registry.models().map(|m| (m.name(), m.calibration.as_ref())), capacity.drift);
        Self {
            drift,
            registry: ArcSwap::from_pointee(registry),
            loader: None,
            limits,
            admission: Admission::new(capacity.max_images),
            budget: MemoryBudget::new(capacity.memory_budget),
            decode_slots: Arc::new(Semaphore::new(cores())),
            request_timeout: capacity.timeout,
            metrics,
            observers: Vec::new(),
            explain: crate::explain::ExplainLimits::DEFAULT,
            explaining: Admission::new(crate::explain::ExplainLimits::DEFAULT.max_concurrent),
        }
    }

    /// Sets what one explanation may cost and how many run at once.
    pub fn set_explain_limits(&mut self, limits: crate::explain::ExplainLimits) {
        self.explain = limits;
        self.explaining = Admission::new(limits.max_concurrent);
    }

    /// The models served now. A caller keeps the snapshot it took for the whole request, so a
    /// reload meanwhile never changes the version answering it.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    /// The process's ONNX Runtime environment, for tools that build sessions of their own
    /// beside the engine's (the benchmarks); `None` for models built elsewhere.
    pub fn environment(&self) -> Option<&ort::environment::Environment> {
        self.loader.as_ref().map(Loader::environment)
    }

    /// The drift report of `model`'s recent answers.
    pub fn drift_report(&self, model: &Model) -> crate::drift::DriftReport {
        self.drift.report(model.name(), model.calibration.as_ref())
    }

    /// Recomputes the embedding drift test of every model whose window changed, on a blocking
    /// thread every [`crate::drift::EMBEDDING_REFRESH`], for as long as the runtime runs; the
    /// drift reports and /metrics read the last result.
    pub fn watch_drift(engine: Arc<Self>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::drift::EMBEDDING_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let e = Arc::clone(&engine);
                let refreshed = tokio::task::spawn_blocking(move || {
                    e.drift.refresh(e.registry().models().map(|m| (m.name(), m.calibration.as_ref())));
                })
                .await;
                if let Err(err) = refreshed {
                    tracing::error!("the embedding drift refresh failed: {err}");
                }
            }
        });
    }

    /// Adds an observer of flagged answers.
    pub fn observe(&mut self, observer: Arc<dyn FlaggedObserver>) {
        self.observers.push(observer);
    }

    /// Scores `inputs` with `model`: one output per input, in order, with its id; `mode` says
    /// whether answers carry the representation. Every side effect runs here, once per item:
    /// the image counters (inputs that arrived as errors included), the Q-Score histogram,
    /// drift, and the flagged-answer observers.
    ///
    /// Each image is decoded on the blocking pool and queued on its own as soon as it is ready,
    /// so the model's thread batches it with whatever else is waiting, from any request. A
    /// full server (`Overloaded`, 429, refused before any work), a passed deadline (`Timeout`,
    /// 503) or a stopped worker fails the whole call: those say nothing about an image, and
    /// the client should retry all of it. When this future is dropped (the client went away),
    /// its queued images are skipped by the worker and its decodes not yet started never start.
    pub async fn score(
        &self,
        model: &Arc<Model>,
        inputs: Vec<Input>,
        mode: EmbeddingMode,
    ) -> Result<Vec<Output>, Error> {
        self.score_until(model, inputs, mode, Instant::now() + self.request_timeout).await
    }

    /// [`Engine::score`] with the deadline of a request that started earlier (Label Studio's
    /// fetches come out of the same `--request-timeout-ms`).
    pub async fn score_until(
        &self,
        model: &Arc<Model>,
        inputs: Vec<Input>,
        mode: EmbeddingMode,
        deadline: Instant,
    ) -> Result<Vec<Output>, Error> {
        let start = Instant::now();
        let name = model.name();
        let readable = inputs.iter().filter(|i| i.bytes.is_ok()).count();
        let _permit = self.admission.admit(readable).inspect_err(|_| {
            (0..readable).for_each(|_| self.metrics.rejected(name, Rejection::Overloaded));
        })?;
        let (ids, work): (Vec<String>, Vec<_>) = inputs
            .into_iter()
            .map(|Input { id, bytes, confidence }| {
                let work = async move {
                    match bytes {
                        Ok(bytes) => self.score_one(model, bytes, confidence, deadline, mode).await,
                        Err(e) => Err(e),
                    }
                };
                (id, work)
            })
            .unzip();
        let answers = match tokio::time::timeout_at(deadline.into(), futures_util::future::join_all(work)).await {
            Ok(answers) => answers,
            Err(_) => return Err(Error::Timeout),
        };
        if let Some(e) = answers.iter().find_map(|a| match a {
            Err(e @ (Error::Unavailable(_) | Error::Timeout)) => Some(e.clone()),
            _ => None,
        }) {
            return Err(e);
        }

        let total_ms = millis(start.elapsed());
        Ok(ids
            .into_iter()
            .zip(answers)
            .map(|(id, answer)| {
                let answer = match answer {
                    Ok((mut s, h)) => {
                        s.timings_ms.total = total_ms;
                        self.record(model, &id, &s, &h);
                        Ok(s)
                    }
                    Err(e) => {
                        if e.is_client_error() {
                            self.metrics.image(name, Outcome::Rejected);
                            self.metrics.rejected(name, Rejection::Invalid);
                        } else {
                            self.metrics.image(name, Outcome::Failed);
                        }
                        Err(e)
                    }
                };
                Output { id, answer }
            })
            .collect())
    }

    /// The side effects of one scored image, whose representation is `h`.
    fn record(&self, model: &Model, id: &str, s: &ImageScore, h: &[f32]) {
        let name = model.name();
        self.metrics.image(name, Outcome::Scored);
        self.metrics.score.with_label_values(&[name]).observe(f64::from(s.q_score));
        let flagged = s.likely_misclassified == Some(true);
        self.drift.record(
            name,
            s.q_score,
            s.p_misclassified,
            flagged,
            s.discriminative_features.iter().map(|f| f.index),
            h,
        );
        if flagged {
            for o in &self.observers {
                o.flagged(id, s);
            }
        }
    }

    /// One image through decode, the model's queue and the maths: its answer and its
    /// representation (for drift).
    async fn score_one(
        &self,
        model: &Arc<Model>,
        bytes: Bytes,
        confidence: Option<f32>,
        deadline: Instant,
        mode: EmbeddingMode,
    ) -> Result<(ImageScore, Vec<f32>), Error> {
        let mut incoming = model.worker.expect(1);
        let (tensor, decode, _tensor_bytes) = self.prepare(model, bytes, deadline).await?;
        self.metrics.preprocess_duration.with_label_values(&[model.name()]).observe(decode.as_secs_f64());

        let out = model.worker.embed(tensor, deadline, &mut incoming).await?;
        let h = ndarray::ArrayView1::from(&out.embedding);
        let score = qscore::score(h, model.qscore.epsilon, &model.discriminative)
            .map_err(|e| Error::InvalidEmbedding(e.to_string()))?;
        let timings = Timings {
            decode: millis(decode),
            queue: millis(out.queue_wait),
            inference: millis(out.inference),
            batch_size: out.batch_size,
            total: 0.0,
        };
        let scored = answer(model, score, h, out.logits.as_deref(), confidence, timings, mode)?;
        Ok((scored, out.embedding))
    }

    /// Decodes and preprocesses one image within a decode slot and its share of the memory
    /// budget; answers the tensor, the time it took, and the reservation that keeps the tensor's
    /// bytes counted until it is embedded.
    ///
    /// The slot and the reservation move into the blocking tasks, so they stay taken until the
    /// decode really ends even when this future is dropped (the client left, the deadline
    /// passed): what runs is bounded, not only what waits. Nothing starts once the request is
    /// gone, because the slot is awaited here first.
    async fn prepare(
        &self,
        model: &Arc<Model>,
        bytes: Bytes,
        deadline: Instant,
    ) -> Result<(Array3<f32>, Duration, Reservation), Error> {
        let slot = tokio::time::timeout_at(deadline.into(), Arc::clone(&self.decode_slots).acquire_owned())
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Unavailable("the decode pool is closed".into()))?;
        let limits = self.limits;
        let blocking_failed = |e: tokio::task::JoinError| Error::Internal(format!("image task failed: {e}"));
        let (header, slot) = {
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || (image::inspect(&bytes, &limits), slot))
                .await
                .map_err(blocking_failed)?
        };
        let header = header?;
        let preprocess = &model.preprocess;
        let reservation = self.budget.decode(header.peak_bytes(preprocess), deadline).await?;
        let m = Arc::clone(model);
        let (result, mut reservation) = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let t = Instant::now();
            (image::prepare(&bytes, &limits, &m.preprocess).map(|x| (x, t.elapsed())), reservation)
        })
        .await
        .map_err(blocking_failed)?;
        let (tensor, took) = result?;
        reservation.shrink_to((tensor.len() * std::mem::size_of::<f32>()) as u64);
        Ok((tensor, took, reservation))
    }
}
