//! `calibration.json`: everything `qscore calibrate` learnt about a model on labelled data.
//!
//! The server uses D (which features count in the Q-Score), the probe (`predicted_class`), the
//! chosen risk estimator with its isotonic map to p(misclassified) and the threshold tau that
//! turns that into the flag. The rest is there for people and for drift monitoring: the held-out
//! evaluation of every estimator (answered by `GET /v1/models/{name}`), the reference
//! distribution of Q-Score and risk, and a fingerprint of the data it was fitted on.
//!
//! The held-out data is split in two: the *select* part picks the estimator, fits the isotonic
//! map and the threshold; the *test* part, untouched by any choice, gives every reported figure.

use std::path::Path;

use ndarray::ArrayView1;
use serde::{Deserialize, Serialize};

use crate::{
    drift::embedding::EmbeddingSample,
    qscore::{Discriminative, Score},
    risk::isotonic::IsotonicMap,
    risk::neighbours::Neighbours,
    risk::probe::{Prediction, Probe},
    risk::ranking::Operating,
    risk::{MissingConfidence, RiskModel, RiskSource, estimators::Sirc, gaussian::Gaussian, stacked::Stacked},
};

/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;

/// The calibration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Calibration {
    /// Format of the file; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// SHA-256 of the text it was parsed from, lowercase hex; empty for one built in memory.
    /// It names the calibration in force (`qscore_model_info`, `GET /v1/models`), and backfills
    /// record it, so scores from different calibrations are never mixed.
    #[serde(skip)]
    pub sha256: String,
    /// The model it was made for.
    pub model: String,
    /// eps used to find D; the server scores with the same value.
    pub epsilon: f32,
    /// (lo, hi) percentile band used to find D.
    pub percentiles: (f64, f64),
    /// A_j in percent, for every feature, over the fit part.
    pub activation_frequency: Vec<f32>,
    /// Indices of D, ascending.
    pub discriminative_features: Vec<usize>,
    /// The linear probe trained on the fit part.
    pub probe: Probe,
    /// The fit part, standardised, for the nearest-neighbour estimators.
    pub neighbours: Neighbours,
    /// The fit part's Gaussian, for `mahalanobis` (absent in files written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gaussian: Option<Gaussian>,
    /// SIRC's S2 and parameters, for `sirc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sirc: Option<Sirc>,
    /// The stacked regression refitted on the whole select part, for `stacked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stacked: Option<Stacked>,
    /// The estimator that drives `p_misclassified`.
    pub risk_source: RiskSource,
    /// Monotone map from the estimator's risk value to p(misclassified).
    pub isotonic: IsotonicMap,
    /// tau: the flag is raised when p_misclassified >= tau.
    pub threshold: f32,
    /// How tau was chosen.
    pub threshold_rule: ThresholdRule,
    /// Distributions on the held-out part: the baseline for drift monitoring.
    pub reference: Reference,
    /// Held-out figures of every estimator, the flag and the compression.
    pub evaluation: Evaluation,
    /// What data it was fitted on.
    pub data: DataFingerprint,
    /// Whose mistakes "misclassified" means, in every figure and in the flag.
    #[serde(default)]
    pub target: Target,
}

/// Whose mistakes the flag predicts: what "misclassified" meant when it was calibrated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "classifier")]
pub enum Target {
    /// qscore's own linear probe on the representation, trained on the fit part: a stand-in
    /// for a classifier the user did not name.
    #[default]
    Probe,
    /// The user's classifier, by its answers in `qscore calibrate --predictions FILE`.
    Predictions {
        /// The file as given.
        file: String,
        /// SHA-256 of its bytes.
        sha256: String,
        /// Whether it had a `confidence` column (a candidate estimator, `user_confidence`).
        with_confidence: bool,
    },
    /// The model's own classifier head (`[classifier]` in model.toml), whose logits the ONNX
    /// file outputs beside the representation.
    ModelHead {
        /// The logits tensor's name.
        output: String,
        /// The head's classes in the order of its logits, as model.toml listed them.
        classes: Vec<String>,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Probe => f.write_str("qscore's linear probe"),
            Self::Predictions { file, sha256, .. } => write!(f, "the classifier of {file} (sha256 {:.12})", sha256),
            Self::ModelHead { output, .. } => write!(f, "the model's own head `{output}`"),
        }
    }
}

/// How tau was chosen, on the select part.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum ThresholdRule {
    /// The threshold with the best F1 for the misclassified class.
    MaxF1,
    /// The lowest threshold whose precision reached the target.
    TargetPrecision {
        /// The precision asked for.
        target: f64,
    },
}

/// Distributions on the held-out part (select and test together).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Reference {
    /// Images they are measured on.
    pub images: usize,
    /// Of the Q-Score.
    pub q_score: Distribution,
    /// Of p_misclassified.
    pub p_misclassified: Distribution,
    /// Share of images flagged at tau.
    pub flagged_rate: f64,
    /// A seeded random sample of the held-out embeddings with its kernel bandwidth: the
    /// reference of the embedding drift test. Absent in calibrations written before it existed;
    /// those models report no embedding drift until recalibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingSample>,
}

/// One distribution: its percentiles and a histogram.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Distribution {
    /// The 0th, 1st, ..., 100th percentiles (101 values, numpy's linear interpolation).
    pub percentiles: Vec<f32>,
    /// Counts in equal-width bins between the minimum and the maximum.
    pub histogram: Histogram,
}

/// A histogram with explicit bin edges.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Histogram {
    /// Bin edges, ascending; one more than `counts`.
    pub edges: Vec<f32>,
    /// Values per bin; the last bin includes its upper edge.
    pub counts: Vec<u64>,
}

/// Held-out evaluation (all on the test part unless a field says otherwise).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Evaluation {
    /// Seed of the stratified splits.
    pub seed: u64,
    /// Images the probe, A_j and D were fitted on.
    pub fit_images: usize,
    /// Images that chose the estimator, its isotonic map and tau.
    pub select_images: usize,
    /// Images every figure here is measured on.
    pub test_images: usize,
    /// The probe's accuracy.
    pub probe_accuracy: f64,
    /// Share misclassified by the probe: the base rate every AUPRC compares with.
    pub error_rate: f64,
    /// Every estimator measured, for "misclassified", paper's first.
    pub estimators: Vec<EstimatorMetrics>,
    /// The best class-agnostic estimator (one that reads only the representation: q_score,
    /// z_max, q_v1, l2_norm, knn_distance, mahalanobis), chosen by select AUPRC, measured on the
    /// test part. Absent in files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_label_free: Option<BestLabelFree>,
    /// The Q-Score for "correct" (higher Q, more likely correct): the paper's own framing.
    pub q_score_for_correct: Ranking,
    /// p_misclassified (the chosen estimator through its isotonic map) for "misclassified".
    pub p_misclassified: Ranking,
    /// What the flag does at tau.
    pub flag: FlagMetrics,
    /// Probe accuracy on D alone, random subsets of D's size, and everything.
    pub compression: Compression,
    /// Q-Score for other epsilons and bands (empty unless asked for).
    #[serde(default)]
    pub sweep: Vec<SweepRow>,
    /// Index in `sweep` of the row with the best AUPRC for mistakes on the select part (the
    /// first among equals): the (eps, band) a user would pick, whose test figure is then honest.
    /// `None` without a sweep, or in files written before it was measured.
    #[serde(default)]
    pub sweep_chosen: Option<usize>,
    /// Reliability diagram of p_misclassified on the test part: the test images sorted by p and
    /// cut into (at most) 10 bins of equal count (sizes differ by at most one; ties in p may
    /// straddle a cut). Empty in files written before it was measured.
    #[serde(default)]
    pub reliability: Vec<ReliabilityBin>,
    /// Prior strength a (in images) the isotonic map's plateaus were shrunk with toward the
    /// select part's error rate: (k + a * base) / (n + a), see `IsotonicMap::fit_shrunk`. 0 in
    /// files written before shrinking (scikit-learn's plain map).
    #[serde(default)]
    pub isotonic_prior: f64,
}

/// One bin of a reliability diagram: how often the images given a p were really wrong.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ReliabilityBin {
    /// Lowest p_misclassified in the bin.
    pub p_lo: f64,
    /// Highest p_misclassified in the bin.
    pub p_hi: f64,
    /// Mean p_misclassified of the bin's images: the x of the diagram.
    pub p_mean: f64,
    /// Share of the bin's images that were misclassified: the y (on the diagonal when p is
    /// calibrated).
    pub error_rate: f64,
    /// Images in the bin.
    pub count: usize,
}

/// How one estimator ranks the probe's mistakes.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct EstimatorMetrics {
    /// Which.
    pub source: RiskSource,
    /// AUROC on the test part.
    pub auroc: Option<f64>,
    /// AUPRC (average precision) on the test part.
    pub auprc: Option<f64>,
    /// AUPRC on the select part, the figure the choice was made on.
    pub select_auprc: Option<f64>,
}

/// The best label-free estimator and how far above chance it ranks mistakes.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
pub struct BestLabelFree {
    /// Which (the label-free one with the best select AUPRC).
    pub source: RiskSource,
    /// Its AUPRC on the select part, the figure it was chosen on.
    pub select_auprc: Option<f64>,
    /// Its AUROC on the test part.
    pub auroc: Option<f64>,
    /// Its AUPRC on the test part.
    pub auprc: Option<f64>,
    /// The test part's error rate: a random ranking's AUPRC.
    pub base_rate: f64,
    /// auprc / base_rate: how many times chance.
    pub auprc_over_base_rate: Option<f64>,
}

impl BestLabelFree {
    /// The label-free estimator of `estimators` with the best select AUPRC (the earlier one on
    /// a tie), with `base_rate` the test error rate; `None` when none has a select AUPRC.
    pub fn of(estimators: &[EstimatorMetrics], base_rate: f64) -> Option<Self> {
        let best = estimators
            .iter()
            .filter(|m| m.source.label_free())
            .filter_map(|m| m.select_auprc.map(|a| (m, a)))
            .fold(None, |best: Option<(&EstimatorMetrics, f64)>, (m, a)| match best {
                Some((_, b)) if b >= a => best,
                _ => Some((m, a)),
            })?
            .0;
        Some(Self {
            source: best.source,
            select_auprc: best.select_auprc,
            auroc: best.auroc,
            auprc: best.auprc,
            base_rate,
            auprc_over_base_rate: best.auprc.filter(|_| base_rate > 0.0).map(|a| a / base_rate),
        })
    }
}

/// AUROC and AUPRC of one score for one kind of positive.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Ranking {
    /// Area under the ROC curve.
    pub auroc: Option<f64>,
    /// Average precision.
    pub auprc: Option<f64>,
    /// Share of positives: what a random ranking's AUPRC would be.
    pub base_rate: f64,
}

/// The flag at tau on the test part.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
pub struct FlagMetrics {
    /// Precision, recall and flagged share at tau.
    #[serde(flatten)]
    pub operating: Operating,
    /// Misclassified share among flagged images.
    pub error_rate_flagged: f64,
    /// Misclassified share among images not flagged.
    pub error_rate_unflagged: f64,
    /// error_rate_flagged / error_rate_unflagged: how much likelier a flagged image is wrong.
    pub lift: Option<f64>,
}

/// The compression result: does keeping only D lose accuracy?
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Compression {
    /// d.
    pub dim: usize,
    /// |D|.
    pub discriminative: usize,
    /// |D| / d.
    pub kept_ratio: f64,
    /// Probe accuracy on all d features.
    pub accuracy_all: f64,
    /// Probe accuracy on D's features alone.
    pub accuracy_discriminative: f64,
    /// Probe accuracy on random subsets of |D| features, one per seed.
    pub accuracy_random: Vec<f64>,
    /// Their mean.
    pub accuracy_random_mean: f64,
    /// Their sample standard deviation.
    pub accuracy_random_sd: f64,
    /// The paper's operating point: only the features with A_j > 0 (any feature that was ever
    /// highly activating on a fit image), against random subsets of as many features. `None` in
    /// files written before it was measured.
    #[serde(default)]
    pub active: Option<SubsetAccuracy>,
    /// Accuracy against the share of features kept, ascending. At each fraction f the probe
    /// keeps the k = round(f * d) features with the highest A_j (descending A_j, ties by lower
    /// index: the paper ranks features by how often they are highly activating), against random
    /// subsets of k. At f = 1 every feature is kept, so both are `accuracy_all` and the random
    /// list is empty. Empty in files written before it was measured.
    #[serde(default)]
    pub curve: Vec<CurvePoint>,
}

/// Probe accuracy on one chosen feature subset against random subsets of the same size.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct SubsetAccuracy {
    /// Features kept.
    pub kept: usize,
    /// Probe accuracy (fit on the fit part, measured on the test part) on the chosen features.
    pub accuracy: f64,
    /// Probe accuracy on random subsets of `kept` features, one per seed.
    pub accuracy_random: Vec<f64>,
    /// Their mean.
    pub accuracy_random_mean: f64,
    /// Their sample standard deviation (0 with fewer than two).
    pub accuracy_random_sd: f64,
}

/// One point of the compression curve.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct CurvePoint {
    /// Share of the d features kept, in (0, 1].
    pub fraction: f64,
    /// The features of highest A_j against random ones.
    #[serde(flatten)]
    pub subset: SubsetAccuracy,
}

/// The Q-Score under other Q-Score parameters, on the select and the test parts.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct SweepRow {
    /// eps.
    pub epsilon: f32,
    /// (lo, hi).
    pub percentiles: (f64, f64),
    /// |D| found on the fit part.
    pub discriminative: usize,
    /// Share of test images with L ∩ D empty (Q = 0).
    pub zero_share: f64,
    /// Q for "misclassified" (risk = -Q), on the test part.
    pub misclassified: Ranking,
    /// The same on the select part: the figure a choice among rows is made on. `None` in files
    /// written before it was measured.
    #[serde(default)]
    pub select: Option<Ranking>,
}

/// What the calibration was fitted on.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct DataFingerprint {
    /// The folders given (`--data`, or `--fit` and `--holdout`).
    pub sources: Vec<String>,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// Images per class in the fit part (those that scored; `skipped` lists the others).
    pub fit_per_class: Vec<usize>,
    /// Images per class in the select part that scored.
    pub select_per_class: Vec<usize>,
    /// Images per class in the test part that scored.
    pub test_per_class: Vec<usize>,
    /// SHA-256 of the sorted list of "part/class/file size" lines.
    pub file_list_sha256: String,
    /// Files that could not be scored, with why; left out of every figure.
    pub skipped: Vec<String>,
}

/// What calibration says about one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// The probe's answer.
    pub prediction: Prediction,
    /// p(misclassified) from the isotonic map.
    pub p_misclassified: f32,
    /// p_misclassified >= tau.
    pub likely_misclassified: bool,
}

impl Calibration {
    /// Reads `dir/calibration.json` when it exists; `Ok(None)` when it does not.
    pub fn load(dir: &Path, dim: usize) -> anyhow::Result<Option<Self>> {
        let path = dir.join("calibration.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let cal = Self::parse(&text, dim).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Some(cal))
    }

    /// Parses and checks a calibration for a model with `dim` features.
    pub fn parse(text: &str, dim: usize) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version = serde_json::from_str(text)
            .map_err(|e| format!("not a calibration file ({e}); re-run `qscore calibrate`"))?;
        if version.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION}); re-run `qscore calibrate`",
                version.format_version
            ));
        }
        let mut cal: Self = serde_json::from_str(text)
            .map_err(|e| format!("not a calibration this build reads: {e}; re-run `qscore calibrate`"))?;
        cal.validate(dim)?;
        cal.sha256 = crate::digest::sha256_hex(text.as_bytes());
        Ok(cal)
    }

    fn validate(&self, dim: usize) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err("threshold must lie in [0, 1]".into());
        }
        if self.discriminative_features.windows(2).any(|w| w[0] >= w[1]) {
            return Err("discriminative_features must be strictly ascending".into());
        }
        if self.activation_frequency.len() != dim {
            return Err(format!("activation_frequency must have the model's {dim} features"));
        }
        self.discriminative_set(dim)?;
        self.probe.validate(dim)?;
        self.neighbours.validate(dim, self.probe.classes.len())?;
        if let Some(sample) = &self.reference.embedding {
            sample.validate(dim)?;
        }
        if let Some(g) = &self.gaussian {
            g.validate(dim)?;
        }
        if let Some(s) = &self.sirc {
            s.validate()?;
        }
        if let Some(s) = &self.stacked {
            s.validate()?;
        }
        self.parts_of(self.risk_source)?;
        self.isotonic.validate()
    }

    /// Checks that the parts `source` reads are in the file, and through SIRC and the stacked
    /// model, the parts of what they read.
    fn parts_of(&self, source: RiskSource) -> Result<(), String> {
        let missing = |part: &str| {
            Err(format!("risk_source {source} needs `{part}`, which the file lacks; re-run `qscore calibrate`"))
        };
        match source {
            RiskSource::Mahalanobis if self.gaussian.is_none() => missing("gaussian"),
            RiskSource::Sirc => match &self.sirc {
                None => missing("sirc"),
                Some(s) => self.parts_of(s.s2),
            },
            RiskSource::Stacked => match &self.stacked {
                None => missing("stacked"),
                Some(s) => s.inputs.iter().try_for_each(|&i| self.parts_of(i)),
            },
            _ => Ok(()),
        }
    }

    /// Checks that this calibration was made for a model with `head` (model.toml's
    /// `[classifier]`): a head's calibration needs that very head (same logits, same class
    /// order), and a model with a head predicts its head's mistakes, not another classifier's.
    pub fn check_head(&self, head: Option<&crate::model::manifest::ClassifierSpec>) -> Result<(), String> {
        match (&self.target, head) {
            (Target::ModelHead { output, classes }, Some(h)) if *output == h.output && *classes == h.classes => Ok(()),
            (Target::ModelHead { output, .. }, Some(_)) => Err(format!(
                "calibration.json was made for the head `{output}` with other classes or another class order than \
                 model.toml's [classifier]; re-run `qscore calibrate`"
            )),
            (Target::ModelHead { output, .. }, None) => Err(format!(
                "calibration.json was made for a classifier head `{output}`, but model.toml has no [classifier]; \
                 re-run `qscore calibrate`"
            )),
            (target, Some(h)) => Err(format!(
                "model.toml has a classifier head `{}`, but calibration.json predicts the mistakes of {target}; \
                 re-run `qscore calibrate` so the flag is about the head",
                h.output
            )),
            (_, None) => Ok(()),
        }
    }

    /// Whether serving this calibration's flag needs the client's classifier confidence per
    /// image: its risk source is `user_confidence`, or reads it (the stacked model's inputs).
    pub fn needs_user_confidence(&self) -> bool {
        match self.risk_source {
            RiskSource::Stacked => {
                self.stacked.as_ref().is_some_and(|s| s.inputs.iter().any(|i| i.needs_user_confidence()))
            }
            source => source.needs_user_confidence(),
        }
    }

    /// The fitted parts the estimators read, borrowed.
    pub fn risk_model(&self) -> RiskModel<'_> {
        RiskModel {
            probe: &self.probe,
            neighbours: &self.neighbours,
            gaussian: self.gaussian.as_ref(),
            sirc: self.sirc.as_ref(),
            stacked: self.stacked.as_ref(),
        }
    }

    /// D as a mask over the model's `dim` features; an error names an index past them.
    pub fn discriminative_set(&self, dim: usize) -> Result<Discriminative, String> {
        Discriminative::from_indices(&self.discriminative_features, dim)
            .map_err(|j| format!("discriminative_features holds index {j}, past the model's {dim} features"))
    }

    /// The probe's prediction and the calibrated risk of one representation `h` (shape (d,))
    /// and its score. `user_confidence` is the client's classifier probability for its own
    /// prediction on this image, read only when [`Self::needs_user_confidence`].
    ///
    /// # Errors
    /// [`MissingConfidence`] when the flag needs `user_confidence` and it is `None` or NaN.
    pub fn assess(
        &self,
        h: ArrayView1<f32>,
        score: &Score,
        user_confidence: Option<f32>,
    ) -> Result<Assessment, MissingConfidence> {
        let crate::risk::Measurement { prediction, risks } =
            crate::risk::measure(h, score, &self.risk_model(), &[self.risk_source], user_confidence)?;
        let p = self.isotonic.apply(risks[0]);
        Ok(Assessment { prediction, p_misclassified: p, likely_misclassified: p >= self.threshold })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A complete calibration over d = 8 with two classes, Q-Score as the source.
    fn base() -> serde_json::Value {
        let neighbours = Neighbours::new(1, 8, &[0.0; 16], &[0, 1]);
        let (zeros, ones) = (vec![0.0_f32; 8], vec![1.0_f32; 8]);
        serde_json::json!({
            "format_version": 2, "model": "toy", "epsilon": 0.5, "percentiles": [50.0, 95.0],
            "activation_frequency": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 40.0, 60.0],
            "discriminative_features": [6],
            "probe": {"classes": ["a", "b"], "mean": zeros, "scale": ones,
                      "weights": [zeros, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], "bias": [0.0, 0.0], "alpha": 1.0},
            "neighbours": neighbours,
            "risk_source": "q_score",
            "isotonic": {"x": [-4.0, -2.0, 0.0], "y": [0.1, 0.5, 0.9]}, "threshold": 0.5,
            "threshold_rule": {"rule": "max_f1"},
            "reference": {"images": 0, "flagged_rate": 0.0,
                "q_score": {"percentiles": [], "histogram": {"edges": [], "counts": []}},
                "p_misclassified": {"percentiles": [], "histogram": {"edges": [], "counts": []}}},
            "evaluation": {"seed": 0, "fit_images": 2, "select_images": 0, "test_images": 0, "probe_accuracy": 1.0,
                "error_rate": 0.0, "estimators": [], "q_score_for_correct": {"auroc": null, "auprc": null, "base_rate": 1.0},
                "p_misclassified": {"auroc": null, "auprc": null, "base_rate": 0.0},
                "flag": {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "flagged_rate": 0.0,
                         "error_rate_flagged": 0.0, "error_rate_unflagged": 0.0, "lift": null},
                "compression": {"dim": 8, "discriminative": 1, "kept_ratio": 0.125, "accuracy_all": 1.0,
                    "accuracy_discriminative": 1.0, "accuracy_random": [], "accuracy_random_mean": 0.0, "accuracy_random_sd": 0.0}},
            "data": {"sources": [], "classes": ["a", "b"], "fit_per_class": [1, 1], "select_per_class": [0, 0],
                     "test_per_class": [0, 0], "file_list_sha256": "", "skipped": []}
        })
    }

    fn calibration(json: serde_json::Value) -> Result<Calibration, String> {
        Calibration::parse(&json.to_string(), 8)
    }

    /// The hand-computed vector of the Q-Score tests, with D = {6} and eps 0.5: Q = 2.75, so the
    /// risk is -2.75, between knots -4 (0.1) and -2 (0.5): p = 0.1 + 0.625 * 0.4 = 0.35 < tau:
    /// not flagged. With D = {} Q = 0: risk 0, p = 0.9, flagged. The probe's logits are (0, 7):
    /// class b.
    #[test]
    fn assessment_follows_the_chosen_source() {
        let cal = calibration(base()).unwrap();
        let h = ndarray::array![1.0_f32, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 7.0];
        let s = crate::qscore::score(h.view(), cal.epsilon, &cal.discriminative_set(8).unwrap()).unwrap();
        assert!((s.q_score - 2.75).abs() < 1e-6);
        let a = cal.assess(h.view(), &s, None).unwrap();
        assert!((a.p_misclassified - 0.35).abs() < 1e-6, "{a:?}");
        assert!(!a.likely_misclassified);
        assert_eq!(a.prediction.class, 1);
        let none = crate::qscore::score(h.view(), cal.epsilon, &Discriminative::Mask(vec![false; 8])).unwrap();
        let a = cal.assess(h.view(), &none, None).unwrap();
        assert!((a.p_misclassified - 0.9).abs() < 1e-6 && a.likely_misclassified);
    }

    #[test]
    fn bad_calibrations_are_refused() {
        let refused = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base();
            f(&mut v);
            calibration(v).unwrap_err()
        };
        assert!(refused(&|v| v["discriminative_features"] = serde_json::json!([3, 8])).contains("index 8"));
        assert!(refused(&|v| v["discriminative_features"] = serde_json::json!([4, 2])).contains("ascending"));
        assert!(refused(&|v| v["format_version"] = serde_json::json!(1)).contains("re-run `qscore calibrate`"));
        assert!(refused(&|v| v["threshold"] = serde_json::json!(1.5)).contains("threshold"));
        assert!(refused(&|v| v["risk_source"] = serde_json::json!("max_softmx")).contains("re-run"));
        assert!(refused(&|v| v["probe"]["bias"] = serde_json::json!([0.0])).contains("probe"));
        assert!(refused(&|v| v["activation_frequency"] = serde_json::json!([1.0])).contains("activation_frequency"));
        assert!(refused(&|v| v["isotonic"]["y"] = serde_json::json!([0.1, 0.9, 0.5])).contains("monotone"));
        // A source whose fitted part the file lacks.
        for (source, part) in [("mahalanobis", "gaussian"), ("sirc", "sirc"), ("stacked", "stacked")] {
            assert!(refused(&|v| v["risk_source"] = serde_json::json!(source)).contains(part), "{source}");
        }
        assert!(
            refused(&|v| {
                v["risk_source"] = serde_json::json!("sirc");
                v["sirc"] = serde_json::json!({"s2": "mahalanobis", "a": 0.0, "b": 1.0});
            })
            .contains("gaussian")
        );
        assert!(
            refused(&|v| {
                v["risk_source"] = serde_json::json!("stacked");
                v["stacked"] = stacked(&["knn", "stacked"]);
            })
            .contains("stacked.inputs")
        );
        assert!(
            refused(&|v| v["gaussian"] = serde_json::json!({"dim": 8, "shrinkage": 0.0, "mean": "", "whitening": ""}))
                .contains("gaussian")
        );
    }

    fn stacked(inputs: &[&str]) -> serde_json::Value {
        let m = inputs.len();
        serde_json::json!({"inputs": inputs, "mean": vec![0.0; m], "scale": vec![1.0; m], "weights": vec![1.0; m],
                           "bias": 0.0, "alpha": 1.0})
    }

    /// A file written before the new estimators (no gaussian, sirc, stacked or best_label_free)
    /// loads and serves as before; one whose stacked model reads user_confidence needs it.
    #[test]
    fn new_parts_are_optional_and_user_confidence_is_reported() {
        let cal = calibration(base()).unwrap();
        assert!(cal.gaussian.is_none() && cal.sirc.is_none() && cal.stacked.is_none());
        assert!(!cal.needs_user_confidence());
        let mut v = base();
        v["risk_source"] = serde_json::json!("stacked");
        v["stacked"] = stacked(&["max_softmax", "user_confidence"]);
        let cal = calibration(v).unwrap();
        assert!(cal.needs_user_confidence());
        let h = ndarray::array![1.0_f32, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 7.0];
        let s = crate::qscore::score(h.view(), cal.epsilon, &cal.discriminative_set(8).unwrap()).unwrap();
        let err = cal.assess(h.view(), &s, None).unwrap_err();
        assert!(err.to_string().contains("send `confidence` in [0, 1] per image"));
        assert!(cal.assess(h.view(), &s, Some(f32::NAN)).is_err());
        assert!(cal.assess(h.view(), &s, Some(0.5)).is_ok());
        let mut v = base();
        v["risk_source"] = serde_json::json!("user_confidence");
        assert!(calibration(v).unwrap().needs_user_confidence());
    }

    /// A calibration written before the embedding sample existed still loads, without one; a
    /// sample must fit the model.
    #[test]
    fn the_embedding_sample_is_optional_and_checked() {
        assert!(calibration(base()).unwrap().reference.embedding.is_none());
        let mut v = base();
        let rows: Vec<f32> = (0..16).map(|i| i as f32).collect();
        v["reference"]["embedding"] = serde_json::to_value(EmbeddingSample::new(&rows, 8, 1)).unwrap();
        let sample = calibration(v.clone()).unwrap().reference.embedding.unwrap();
        assert_eq!((sample.len(), sample.dim), (2, 8));
        v["reference"]["embedding"]["dim"] = serde_json::json!(4);
        assert!(calibration(v).unwrap_err().contains("reference.embedding"));
    }

    #[test]
    fn missing_file_means_uncalibrated() {
        let dir = std::env::temp_dir().join(format!("qscore-cal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Calibration::load(&dir, 8).unwrap().is_none());
        std::fs::write(dir.join("calibration.json"), base().to_string()).unwrap();
        assert_eq!(Calibration::load(&dir, 8).unwrap().unwrap().discriminative_features, vec![6]);
        std::fs::write(dir.join("calibration.json"), "{").unwrap();
        assert!(Calibration::load(&dir, 8).unwrap_err().to_string().contains("qscore calibrate"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A format-2 file written before the sweep's select figures, the compression curve, the
    /// reliability bins and the isotonic prior (every bundled calibration.json, with those
    /// fields taken out if a later calibration wrote them) loads, with them at their defaults.
    #[test]
    fn older_format_2_files_load_with_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-simclr/calibration.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let e = v["evaluation"].as_object_mut().unwrap();
        for field in ["sweep_chosen", "reliability", "isotonic_prior"] {
            e.remove(field);
        }
        for row in e["sweep"].as_array_mut().unwrap() {
            row.as_object_mut().unwrap().remove("select");
        }
        let k = e["compression"].as_object_mut().unwrap();
        k.remove("active");
        k.remove("curve");
        let cal = Calibration::parse(&v.to_string(), 128).unwrap();
        let e = &cal.evaluation;
        assert!(e.reliability.is_empty() && e.compression.curve.is_empty() && e.compression.active.is_none());
        assert!(e.sweep_chosen.is_none() && e.sweep.iter().all(|r| r.select.is_none()));
        assert_eq!(e.isotonic_prior, 0.0);
    }
}
