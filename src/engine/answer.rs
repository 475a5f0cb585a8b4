//! The answer for one image, built from its representation: Q-Score, flag, features and timings.
//!
//! It is the one shape every edge translates from: `/v1` serialises it as is, KServe v2 takes
//! columns of it, Label Studio a score, `qscore score` a line.

use ndarray::ArrayView1;
use serde::Serialize;

use super::Model;
use crate::{
    error::Error,
    qscore::{ActiveFeature, Score, Stats},
    risk::{RiskSource, probe::Prediction},
};

/// Whether answers carry the representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingMode {
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
    /// Calibrated probability that the classifier the model was calibrated for (see
    /// `calibration.target` in `GET /v1/models/{name}`) misclassifies the image; null when
    /// uncalibrated.
    pub p_misclassified: Option<f32>,
    /// The estimator behind the flag; null when uncalibrated.
    pub risk_source: Option<RiskSource>,
    /// The class of the model's own classifier head when it has one, else the calibration
    /// probe's; null when the model has neither.
    pub predicted_class: Option<String>,
    /// The softmax probability of that class; null when there is no class.
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

impl ImageScore {
    /// The image's risk in [0, 1], higher is riskier: `p_misclassified` for a calibrated model,
    /// `1 / (1 + Q)` otherwise (Q >= 0, so a weak representation is risky). This is the one
    /// definition of "riskiest first" (`qscore score --sort risk`, Label Studio's score).
    pub fn risk(&self) -> f64 {
        match self.p_misclassified {
            Some(p) => f64::from(p),
            None => 1.0 / (1.0 + f64::from(self.q_score.max(0.0))),
        }
    }
}

/// Sorts answers riskiest first by [`ImageScore::risk`]; items without an answer go last, in
/// their input order (the sort is stable).
pub fn sort_riskiest_first<T>(items: &mut [T], answer: impl Fn(&T) -> Option<&ImageScore>) {
    items.sort_by(|a, b| match (answer(a), answer(b)) {
        (Some(x), Some(y)) => y.risk().total_cmp(&x.risk()),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
}

/// Milliseconds, to the microsecond.
pub(crate) fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// Builds one answer from a representation, its score and, for a model with a classifier head,
/// the head's logits. `confidence` is the client's classifier confidence, read only when the
/// model's flag was calibrated on it and the model has no head of its own.
///
/// The class answered is the head's when there is one (it is the user's classifier), else the
/// calibration probe's. Fails with [`Error::MissingConfidence`] when the flag needs a
/// confidence that neither the head nor the client gave.
pub(crate) fn answer(
    model: &Model,
    s: Score,
    h: ArrayView1<f32>,
    logits: Option<&[f32]>,
    confidence: Option<f32>,
    timings: Timings,
    embedding: EmbeddingMode,
) -> Result<ImageScore, Error> {
    let calibration = model.calibration.as_ref();
    if logits.is_some_and(|l| l.iter().any(|v| !v.is_finite())) {
        return Err(Error::InvalidEmbedding("the classifier head's logits are not finite".into()));
    }
    let head = model.manifest.classifier.as_ref().zip(logits).map(|(spec, logits)| {
        let logits: Vec<f64> = logits.iter().map(|&l| f64::from(l)).collect();
        (spec, Prediction::from_logits(&logits))
    });
    let user_confidence = match &head {
        Some((_, p)) => Some(p.confidence()),
        None => confidence,
    };
    let assessed = calibration
        .map(|c| c.assess(h, &s, user_confidence))
        .transpose()
        .map_err(|_| Error::MissingConfidence { model: model.name().to_owned() })?;
    let (predicted_class, class_probability) = match (&head, calibration.zip(assessed.as_ref())) {
        (Some((spec, p)), _) => (Some(spec.classes[p.class].clone()), Some(p.confidence())),
        (None, Some((c, a))) => (Some(c.probe.classes[a.prediction.class].clone()), Some(a.prediction.confidence())),
        (None, None) => (None, None),
    };
    let (embedding, embedding_features) = match (embedding, calibration) {
        (EmbeddingMode::Omit, _) => (None, None),
        (EmbeddingMode::Discriminative, Some(c)) => {
            let d = &c.discriminative_features;
            (Some(d.iter().map(|&j| h[j]).collect()), Some(d.clone()))
        }
        (EmbeddingMode::Full | EmbeddingMode::Discriminative, _) => (Some(h.to_vec()), None),
    };
    Ok(ImageScore {
        model: model.name().to_owned(),
        q_score: s.q_score,
        calibrated: calibration.is_some(),
        likely_misclassified: assessed.as_ref().map(|a| a.likely_misclassified),
        p_misclassified: assessed.as_ref().map(|a| a.p_misclassified),
        risk_source: calibration.map(|c| c.risk_source),
        predicted_class,
        class_probability,
        stats: s.stats,
        discriminative_features: s.features,
        timings_ms: timings,
        embedding,
        embedding_features,
    })
}
