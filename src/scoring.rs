//! The scoring pipeline shared by the HTTP API and `qscore score`: encoded images in, one
//! answer per image out, in order.
//!
//! Decoding and resizing run on tokio's blocking pool, all images of a request at once;
//! the good ones are stacked into batches of at most `max_batch` and embedded on the model's
//! worker thread; each representation is then scored with section 1 of design.md. One bad
//! image never fails the others: every input gets its own `Result`.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use ndarray::{Array3, Array4, ArrayView1, Axis};
use serde::Serialize;

use crate::{
    error::Error,
    image::{self, ImageLimits},
    metrics::{Metrics, Outcome},
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
    /// The ONNX Runtime run that embedded it (shared by its batch).
    pub inference: f64,
    /// From the start of the request to this answer.
    pub total: f64,
}

/// The pipeline and its limits.
pub struct Scorer {
    /// The loaded models.
    pub registry: Arc<Registry>,
    /// Limits checked on every image.
    pub limits: ImageLimits,
    /// Most images in one ONNX Runtime run.
    pub max_batch: usize,
    /// Where outcomes are counted.
    pub metrics: Metrics,
}

impl Scorer {
    /// Scores `images` with `model`; one answer per image, in input order; `embedding` says
    /// whether answers carry the representation.
    ///
    /// A full inference queue or a stopped worker fails the whole request (`Overloaded`,
    /// `Unavailable`): those say nothing about an image, and the client should retry all of it.
    pub async fn score(
        &self,
        model: &Arc<Model>,
        images: Vec<Bytes>,
        embedding: Embedding,
    ) -> Result<Vec<Result<ImageScore, Error>>, Error> {
        let start = Instant::now();
        let prepared = self.prepare_all(model, images).await;
        let mut answers: Vec<Option<Result<ImageScore, Error>>> = vec![None; prepared.len()];
        let mut good = Vec::with_capacity(prepared.len());
        for (i, p) in prepared.into_iter().enumerate() {
            match p {
                Ok(t) => good.push((i, t)),
                Err(e) => answers[i] = Some(Err(e)),
            }
        }

        let pre = &model.preprocess;
        let shape = (pre.channels(), pre.height as usize, pre.width as usize);
        let mut rest = good.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<_> = rest.by_ref().take(self.max_batch).collect();
            let mut batch = Array4::<f32>::zeros((chunk.len(), shape.0, shape.1, shape.2));
            for (mut slot, (_, (tensor, _))) in batch.axis_iter_mut(Axis(0)).zip(&chunk) {
                slot.assign(tensor);
            }
            match model.worker.embed(batch).await {
                Ok(inference) => {
                    let inference_ms = millis(inference.duration);
                    let rows =
                        qscore::score_batch(inference.embeddings.view(), model.qscore.epsilon, &model.discriminative);
                    for (((i, (_, decode_ms)), row), h) in
                        chunk.iter().zip(rows).zip(inference.embeddings.axis_iter(Axis(0)))
                    {
                        let timings = Timings { decode: *decode_ms, inference: inference_ms, total: 0.0 };
                        let answer = row
                            .map_err(|e| Error::InvalidEmbedding(e.to_string()))
                            .map(|s| answer(model, s, h, timings, embedding));
                        answers[*i] = Some(answer);
                    }
                }
                Err(e @ (Error::Overloaded { .. } | Error::Unavailable(_))) => return Err(e),
                Err(e) => chunk.iter().for_each(|(i, _)| answers[*i] = Some(Err(e.clone()))),
            }
        }

        let total_ms = millis(start.elapsed());
        let name = model.name();
        Ok(answers
            .into_iter()
            .map(|a| {
                let mut a = a.unwrap_or_else(|| Err(Error::Internal("an image was left unanswered".into())));
                match &mut a {
                    Ok(s) => {
                        s.timings_ms.total = total_ms;
                        self.metrics.image(name, Outcome::Scored);
                        self.metrics.score.with_label_values(&[name]).observe(f64::from(s.q_score));
                    }
                    Err(e) if e.is_client_error() => self.metrics.image(name, Outcome::Rejected),
                    Err(_) => self.metrics.image(name, Outcome::Failed),
                }
                a
            })
            .collect())
    }

    /// Decodes and preprocesses every image in parallel on the blocking pool, keeping order.
    async fn prepare_all(&self, model: &Arc<Model>, images: Vec<Bytes>) -> Vec<Result<(Array3<f32>, f64), Error>> {
        let tasks: Vec<_> = images
            .into_iter()
            .map(|bytes| {
                let (model, limits) = (Arc::clone(model), self.limits);
                tokio::task::spawn_blocking(move || {
                    let t = Instant::now();
                    image::prepare(&bytes, &limits, &model.preprocess).map(|x| (x, millis(t.elapsed())))
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(task.await.unwrap_or_else(|e| Err(Error::Internal(format!("image task failed: {e}")))));
        }
        out
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
