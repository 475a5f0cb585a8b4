//! The scoring pipeline shared by the HTTP API and `qscore score`: encoded images in, one
//! answer per image out, in order.
//!
//! A request is admitted (or refused at once when the server is full), then each image is
//! decoded on tokio's blocking pool and queued on its model's inference thread, which batches
//! images from every request ([`crate::batch`]); each representation is then scored with
//! section 1 of design.md. One bad image never fails the others: every input gets its own
//! `Result`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use ndarray::{Array3, ArrayView1};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::{
    batch::Admission,
    budget::{MemoryBudget, Reservation},
    drift::DriftMonitor,
    error::Error,
    image::{self, ImageLimits},
    metrics::{Metrics, Outcome, Rejection},
    model::{Model, Registry},
    qscore::{self, ActiveFeature, Score, Stats},
    risk::RiskSource,
};

/// Whether answers carry the representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    /// No.
    Omit,
    /// All d features.
    Full,
    /// Only D's features, with their indices (a calibrated model's compression).
    Discriminative,
}

/// The answer for one image: the body of `POST /v1/score`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ImageScore {
    /// Model that scored the image.
    pub model: String,
    /// The Q-Score (design.md section 1). Higher means a more confident representation.
    pub q_score: f32,
    /// Whether the model has a calibration; without one, D = all features and there is no flag.
    pub calibrated: bool,
    /// p_misclassified >= the calibrated threshold; null when uncalibrated.
    pub likely_misclassified: Option<bool>,
    /// Calibrated probability that a linear probe misclassifies the image; null when uncalibrated.
    pub p_misclassified: Option<f32>,
    /// The estimator behind the flag; null when uncalibrated.
    pub risk_source: Option<RiskSource>,
    /// The calibration probe's class for the image; null when uncalibrated.
    pub predicted_class: Option<String>,
    /// The probe's softmax probability of that class; null when uncalibrated.
    pub class_probability: Option<f32>,
    /// Features in L ∩ D, strongest first.
    pub discriminative_features: Vec<ActiveFeature>,
    /// Statistics of the representation.
    pub stats: Stats,
    /// Where the time went, in milliseconds.
    pub timings_ms: Timings,
    /// The representation h, only from `/v1/embed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// Which features `embedding` holds, only from `/v1/embed?compressed=true` (D's indices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_features: Option<Vec<usize>>,
}

/// Per-image timings in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Timings {
    /// Decode, resize and normalise of this image.
    pub decode: f64,
    /// Waiting in the model's queue for its batch to run.
    pub queue: f64,
    /// The ONNX Runtime run that embedded it (shared by its batch).
    pub inference: f64,
    /// Images in that run (from any request).
    pub batch_size: usize,
    /// From the start of the request to this answer.
    pub total: f64,
}

/// The pipeline and its limits.
pub struct Scorer {
    /// The loaded models.
    pub registry: Arc<Registry>,
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
    pub decode_slots: Arc<Semaphore>,
}

impl Scorer {
    /// Scores `images` with `model`; one answer per image, in input order; `embedding` says
    /// whether answers carry the representation.
    ///
    /// Each image is decoded on the blocking pool and queued on its own as soon as it is ready,
    /// so the model's thread batches it with whatever else is waiting, from any request. A
    /// full server (`Overloaded`, 429, refused before any work), a passed deadline (`Timeout`,
    /// 503) or a stopped worker fails the whole request: those say nothing about an image, and
    /// the client should retry all of it. When this future is dropped (the client went away),
    /// its queued images are skipped by the worker.
    pub async fn score(
        &self,
        model: &Arc<Model>,
        images: Vec<Bytes>,
        embedding: Embedding,
    ) -> Result<Vec<Result<ImageScore, Error>>, Error> {
        let start = Instant::now();
        let name = model.name();
        let _permit = self.admission.admit(images.len()).inspect_err(|_| {
            (0..images.len()).for_each(|_| self.metrics.rejected(name, Rejection::Overloaded));
        })?;
        let deadline = start + self.request_timeout;
        let work = images.into_iter().map(|bytes| self.score_one(model, bytes, deadline, embedding));
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
        Ok(answers
            .into_iter()
            .map(|mut a| {
                match &mut a {
                    Ok(s) => {
                        s.timings_ms.total = total_ms;
                        self.metrics.image(name, Outcome::Scored);
                        self.metrics.score.with_label_values(&[name]).observe(f64::from(s.q_score));
                        let flagged = s.likely_misclassified == Some(true);
                        self.drift.record(name, s.q_score, flagged, s.discriminative_features.iter().map(|f| f.index));
                    }
                    Err(e) if e.is_client_error() => {
                        self.metrics.image(name, Outcome::Rejected);
                        self.metrics.rejected(name, Rejection::Invalid);
                    }
                    Err(_) => self.metrics.image(name, Outcome::Failed),
                }
                a
            })
            .collect())
    }

    /// One image through decode, the model's queue and the maths.
    async fn score_one(
        &self,
        model: &Arc<Model>,
        bytes: Bytes,
        deadline: Instant,
        embedding: Embedding,
    ) -> Result<ImageScore, Error> {
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
        Ok(answer(model, score, h, timings, embedding))
    }
}

impl Scorer {
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
            tokio::task::spawn_blocking(move || (image::inspect(&bytes, &limits), slot)).await.map_err(blocking_failed)?
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

/// Milliseconds, to the microsecond.
fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// Builds one answer from a representation and its score.
fn answer(model: &Model, s: Score, h: ArrayView1<f32>, timings: Timings, embedding: Embedding) -> ImageScore {
    let calibration = model.calibration.as_ref();
    let assessed = calibration.map(|c| c.assess(h, &s));
    let (embedding, embedding_features) = match (embedding, calibration) {
        (Embedding::Omit, _) => (None, None),
        (Embedding::Discriminative, Some(c)) => {
            let d = &c.discriminative_features;
            (Some(d.iter().map(|&j| h[j]).collect()), Some(d.clone()))
        }
        (Embedding::Full | Embedding::Discriminative, _) => (Some(h.to_vec()), None),
    };
    ImageScore {
        model: model.name().to_owned(),
        q_score: s.q_score,
        calibrated: calibration.is_some(),
        likely_misclassified: assessed.as_ref().map(|a| a.likely_misclassified),
        p_misclassified: assessed.as_ref().map(|a| a.p_misclassified),
        risk_source: calibration.map(|c| c.risk_source),
        predicted_class: calibration.zip(assessed.as_ref()).map(|(c, a)| c.probe.classes[a.prediction.class].clone()),
        class_probability: assessed.as_ref().map(|a| a.prediction.confidence()),
        stats: s.stats,
        discriminative_features: s.features,
        timings_ms: timings,
        embedding,
        embedding_features,
    }
}
