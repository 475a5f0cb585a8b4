//! Response bodies that exist only at the HTTP edge (the per-image answer is
//! [`crate::engine::ImageScore`]).

use serde::{Deserialize, Serialize};

use super::error::ErrorDetail;
use crate::{
    engine::{ImageScore, LoadFailure, Model},
    model::{
        calibration::{Evaluation, Target, ThresholdRule},
        manifest::{ClassifierSpec, Color, Provenance, QScoreParams},
    },
    risk::RiskSource,
};

/// `?model=NAME` of a GET (`/v1/drift`): other parameters, such as a browser's cache-busting
/// `?_=123`, are ignored; nothing is scored, so a misspelt one cannot change an answer's model.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelQuery {
    /// Model to report on; every model when absent.
    pub model: Option<String>,
}

/// `?model=NAME` of `/v1/score/batch`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter (`?modle=`) is a 400 naming it, never a silent answer from the default.
#[serde(deny_unknown_fields)]
pub struct BatchQuery {
    /// Model to use; the server's default when absent.
    pub model: Option<String>,
}

/// `?model=NAME&confidence=P` of `/v1/score`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter (`?modle=`) is a 400 naming it, never a silent answer from the default.
#[serde(deny_unknown_fields)]
pub struct ScoreQuery {
    /// Model to use; the server's default when absent.
    pub model: Option<String>,
    /// Your classifier's probability for its prediction on the image, in [0, 1], for a raw
    /// body (a multipart upload may send it as a `confidence` field instead). Needed only by
    /// a model whose `calibration.needs_confidence` is true.
    #[param(value_type = Option<f32>)]
    pub confidence: Option<String>,
}

/// `?model=NAME&compressed=BOOL&confidence=P` of `/v1/embed`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter (`?modle=`) is a 400 naming it, never a silent answer from the default.
#[serde(deny_unknown_fields)]
pub struct EmbedQuery {
    /// Model to use; the server's default when absent.
    pub model: Option<String>,
    /// Answer only the features of the calibrated discriminative set D (and which they are).
    #[serde(default)]
    pub compressed: bool,
    /// As in `/v1/score`.
    #[param(value_type = Option<f32>)]
    pub confidence: Option<String>,
}

/// One item of a batch answer: the image's answer with its id, or its own error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum BatchItem {
    /// The image was scored.
    Scored {
        /// The client's id for the image.
        id: String,
        /// The same answer as `POST /v1/score`.
        #[serde(flatten)]
        score: ImageScore,
    },
    /// This image alone failed.
    Failed {
        /// The client's id for the image.
        id: String,
        /// Why.
        error: ErrorDetail,
    },
}

/// The body of `POST /v1/score/batch`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    /// One item per image, in input order.
    pub results: Vec<BatchItem>,
    /// Totals over the batch.
    pub summary: BatchSummary,
}

/// Totals over one batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchSummary {
    /// Images received.
    pub count: usize,
    /// Images scored.
    pub scored: usize,
    /// Images that failed.
    pub failed: usize,
    /// Scored images flagged as likely misclassified (0 when uncalibrated).
    pub flagged: usize,
    /// Mean Q-Score of the scored images; null when none was scored.
    pub mean_q_score: Option<f32>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Name of the model used when a request names none.
    pub default: String,
    /// Every loaded model.
    pub models: Vec<ModelInfo>,
    /// Model folders whose current contents failed to load since start-up (the version
    /// before, if any, keeps serving); empty when every folder loaded.
    pub load_failures: Vec<LoadFailure>,
    /// The limits this server enforces on every request, so a client can split its batches
    /// before it sends them.
    pub limits: ServerLimits,
}

/// Limits on requests (`--max-batch-images`, `--max-body-bytes`, `--max-image-bytes`,
/// `--max-image-pixels`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerLimits {
    /// Most images in one request.
    pub max_batch_images: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest encoded image, in bytes.
    pub max_image_bytes: usize,
    /// Largest width x height, in pixels.
    pub max_image_pixels: u64,
}

/// What is loaded under one name.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// Model build version.
    pub version: String,
    /// What the encoder is.
    pub description: String,
    /// Execution provider it runs on (`cpu`, `cuda:0`).
    pub device: String,
    /// The input the encoder takes.
    pub input: InputInfo,
    /// Size d of the representation.
    pub embedding_dim: usize,
    /// Q-Score parameters in use.
    pub qscore: QScoreParams,
    /// Whether a calibration is loaded.
    pub calibrated: bool,
    /// The calibration in use; null when uncalibrated.
    pub calibration: Option<CalibrationInfo>,
    /// The model's own classifier head, when its ONNX file outputs one: it answers
    /// `predicted_class`.
    pub classifier: Option<ClassifierSpec>,
    /// Where the weights come from.
    pub provenance: Provenance,
}

/// The encoder's input.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InputInfo {
    /// ONNX input name.
    pub name: String,
    /// Channels.
    pub channels: usize,
    /// Height in pixels.
    pub height: u32,
    /// Width in pixels.
    pub width: u32,
    /// Colour layout.
    pub color: Color,
    /// Shorter-side resize before the centre crop; null for a direct resize.
    pub resize_shorter: Option<u32>,
}

/// A loaded calibration: what drives the flag and what it is worth on held-out data.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CalibrationInfo {
    /// Whose mistakes the flag and `p_misclassified` predict: qscore's probe, the classifier
    /// of a predictions file, or the model's own head.
    pub target: Target,
    /// Whether each image needs the client's `confidence` (the flag reads the user's
    /// classifier confidence, and the model has no head to give it).
    pub needs_confidence: bool,
    /// Estimator behind the flag.
    pub risk_source: RiskSource,
    /// SHA-256 (lowercase hex) of the calibration.json in force.
    pub sha256: String,
    /// tau on p_misclassified.
    pub threshold: f32,
    /// How tau was chosen.
    pub threshold_rule: ThresholdRule,
    /// D's feature indices.
    pub discriminative_features: Vec<usize>,
    /// The probe's classes.
    pub classes: Vec<String>,
    /// Held-out AUROC/AUPRC of every estimator, the flag's precision and recall, compression.
    pub evaluation: Evaluation,
}

/// `GET /health/*`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `live` or `ready`.
    pub status: String,
}

impl From<&Model> for ModelInfo {
    fn from(m: &Model) -> Self {
        let man = &m.manifest;
        Self {
            name: man.name.clone(),
            version: man.version.clone(),
            description: man.description.clone(),
            device: m.device.to_string(),
            input: InputInfo {
                name: man.input.name.clone(),
                channels: man.input.channels,
                height: man.input.height,
                width: man.input.width,
                color: man.preprocess.color,
                resize_shorter: man.preprocess.resize_shorter,
            },
            embedding_dim: man.output.dim,
            qscore: m.qscore,
            calibrated: m.calibration.is_some(),
            calibration: m.calibration.as_ref().map(|c| CalibrationInfo {
                target: c.target.clone(),
                needs_confidence: m.needs_client_confidence(),
                risk_source: c.risk_source,
                sha256: c.sha256.clone(),
                threshold: c.threshold,
                threshold_rule: c.threshold_rule,
                discriminative_features: c.discriminative_features.clone(),
                classes: c.probe.classes.clone(),
                evaluation: c.evaluation.clone(),
            }),
            classifier: man.classifier.clone(),
            provenance: man.provenance.clone(),
        }
    }
}
