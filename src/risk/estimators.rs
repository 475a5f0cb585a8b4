//! The risk estimators: label-free, probe-based and client-given numbers that may predict a
//! misclassification.
//!
//! Each estimator is oriented so that a higher value means a riskier image, which is how
//! calibration ranks and maps them. The orientation is fixed in advance, from what each number
//! means, never learnt from the data it is measured on; an estimator that predicts mistakes in
//! the other direction shows up as an AUROC below 0.5, plainly. (The one exception by design is
//! [`RiskSource::Stacked`], a regression learnt on the select part and measured by
//! cross-fitting there.) How each value is computed lives in [`super::measure`]; the small
//! formulas are here.

use serde::{Deserialize, Serialize};

/// Every estimator calibration measures; the one it picks drives `p_misclassified`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RiskSource {
    /// The paper's Q-Score; risk = -Q (a low score is risky).
    QScore,
    /// (max h - mu) / sigma; risk = -z_max.
    ZMax,
    /// z_max / ||h||_1, the 2022 preprint's score; risk = -q_v1.
    QV1,
    /// ||h||_2; risk = -||h||_2 (a weak representation is risky).
    L2Norm,
    /// The probe's top class probability; risk = 1 - max softmax.
    MaxSoftmax,
    /// The probe's top-1 minus top-2 probability; risk = 1 - margin.
    Margin,
    /// Share of the k nearest calibration images whose label disagrees with the probe.
    Knn,
    /// Mean Euclidean distance to the k nearest calibration images (standardised features): far
    /// from everything seen is risky. Label-free.
    KnnDistance,
    /// Squared Mahalanobis distance to the fit part's mean under its (Ledoit-Wolf shrunk)
    /// covariance, on standardised features. Label-free.
    Mahalanobis,
    /// DOCTOR's Gini form (Granese et al., NeurIPS 2021): risk = 1 - sum_k p_k^2 of the probe.
    Doctor,
    /// SIRC (Xia & Bouganis, ACCV 2022): max softmax combined with a class-agnostic score.
    Sirc,
    /// The client's own classifier: risk = 1 - c, c its probability for its prediction.
    UserConfidence,
    /// A logistic regression over the other estimators, fitted on the select part.
    Stacked,
}

impl RiskSource {
    /// Every estimator, in report order: the paper's first, then the other label-free ones, then
    /// those that read the probe, then the client's and the combination.
    pub const ALL: [Self; 13] = [
        Self::QScore,
        Self::ZMax,
        Self::QV1,
        Self::L2Norm,
        Self::KnnDistance,
        Self::Mahalanobis,
        Self::MaxSoftmax,
        Self::Margin,
        Self::Doctor,
        Self::Knn,
        Self::Sirc,
        Self::UserConfidence,
        Self::Stacked,
    ];

    /// The name used in files, answers and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::QScore => "q_score",
            Self::ZMax => "z_max",
            Self::QV1 => "q_v1",
            Self::L2Norm => "l2_norm",
            Self::MaxSoftmax => "max_softmax",
            Self::Margin => "margin",
            Self::Knn => "knn",
            Self::KnnDistance => "knn_distance",
            Self::Mahalanobis => "mahalanobis",
            Self::Doctor => "doctor",
            Self::Sirc => "sirc",
            Self::UserConfidence => "user_confidence",
            Self::Stacked => "stacked",
        }
    }

    /// Whether it reads only the representation (no labels, no probe weights, no client
    /// input): class-agnostic. The k-NN distance and the Mahalanobis distance use the fit
    /// part's features and standardisation, never its labels.
    pub fn label_free(self) -> bool {
        matches!(self, Self::QScore | Self::ZMax | Self::QV1 | Self::L2Norm | Self::KnnDistance | Self::Mahalanobis)
    }

    /// Whether computing it needs the client's classifier confidence for the image. (A stacked
    /// model may need it through its inputs: see `Calibration::needs_user_confidence`.)
    pub fn needs_user_confidence(self) -> bool {
        self == Self::UserConfidence
    }
}

/// DOCTOR's risk (Granese et al. 2021, "DOCTOR: A Simple Method for Detecting
/// Misclassification Errors"), Gini form: 1 - sum_k p_k^2 of the softmax `probabilities`. It is
/// monotone in DOCTOR's (1 - g) / g with g = sum_k p_k^2, so it ranks identically and stays in
/// [0, 1 - 1/K].
pub fn doctor(probabilities: &[f32]) -> f32 {
    let g: f64 = probabilities.iter().map(|&p| f64::from(p) * f64::from(p)).sum();
    (1.0 - g) as f32
}

/// The largest exponent SIRC's exp term is allowed: e^80 ~ 5.5e34 keeps the risk finite in f32
/// for any (1 - S1) <= 1, and only images already far outside the fit part tie there.
const SIRC_MAX_EXPONENT: f64 = 80.0;

/// SIRC's parameters (Xia & Bouganis 2022, "Augmenting Softmax Information for Selective
/// Classification with Out-of-Distribution Data"): S1 is the probe's max softmax, S2 the
/// class-agnostic estimator `s2`, used as a confidence S2' = -risk(s2).
/// SIRC = -(1 - S1) (1 + exp(-b (S2' - a))); the risk is -SIRC.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Sirc {
    /// The class-agnostic estimator S2 reads (l2_norm or mahalanobis).
    pub s2: RiskSource,
    /// a = mean - 3 sd of S2' on the fit part: where S2 starts to count.
    pub a: f64,
    /// b = 1 / sd of S2' on the fit part: how fast it counts (0 when S2' is constant there).
    pub b: f64,
}

impl Sirc {
    /// The paper's a and b from S2' on the fit part (`confidence`, any length >= 2): a = mean -
    /// 3 sd, b = 1 / sd, with the sample standard deviation. `None` when a value is not finite
    /// or there are fewer than two.
    pub fn fit(s2: RiskSource, confidence: &[f64]) -> Option<Self> {
        let n = confidence.len() as f64;
        if confidence.len() < 2 || confidence.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mean = confidence.iter().sum::<f64>() / n;
        let sd = (confidence.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        Some(Self { s2, a: mean - 3.0 * sd, b: if sd > 0.0 { 1.0 / sd } else { 0.0 } })
    }

    /// The risk -SIRC = (1 - S1) (1 + exp(-b (S2' - a))) from the max-softmax risk
    /// `softmax_risk` = 1 - S1 and the S2 estimator's risk `s2_risk` = -S2'. >= 0; NaN in, NaN out.
    pub fn risk(&self, softmax_risk: f32, s2_risk: f32) -> f32 {
        let exponent = (self.b * (f64::from(s2_risk) + self.a)).min(SIRC_MAX_EXPONENT);
        (f64::from(softmax_risk) * (1.0 + exponent.exp())) as f32
    }

    /// Checks parameters read from a file.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.s2, RiskSource::L2Norm | RiskSource::Mahalanobis | RiskSource::KnnDistance) {
            return Err(format!("sirc.s2 must be a class-agnostic distance or norm, not {}", self.s2));
        }
        if !(self.a.is_finite() && self.b.is_finite() && self.b >= 0.0) {
            return Err("sirc.a and sirc.b must be finite, b >= 0".into());
        }
        Ok(())
    }
}

impl std::fmt::Display for RiskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RiskSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown risk source {s:?}; one of {}", Self::ALL.map(Self::name).join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// p = (0.7, 0.2, 0.1): g = 0.49 + 0.04 + 0.01 = 0.54, risk 0.46; a one-hot p has risk 0 and
    /// the uniform p over 4 classes 1 - 4/16 = 0.75.
    #[test]
    fn doctor_by_hand() {
        assert!((doctor(&[0.7, 0.2, 0.1]) - 0.46).abs() < 1e-6);
        assert_eq!(doctor(&[1.0, 0.0, 0.0]), 0.0);
        assert!((doctor(&[0.25; 4]) - 0.75).abs() < 1e-6);
    }

    /// S2' on the fit part = (1, 2, 3): mean 2, sample sd 1, so a = -1, b = 1. For S1 = 0.8
    /// (risk 0.2) and S2' = -1 (s2 risk 1): exp(-1 (-1 + 1)) = 1, risk 0.2 * 2 = 0.4; with
    /// S2' = 1 (s2 risk -1): exp(-2), risk 0.2 (1 + e^-2) = 0.22707. A far outlier stays finite.
    #[test]
    fn sirc_by_hand() {
        let s = Sirc::fit(RiskSource::L2Norm, &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.a, s.b), (-1.0, 1.0));
        s.validate().unwrap();
        assert!((s.risk(0.2, 1.0) - 0.4).abs() < 1e-6);
        assert!((s.risk(0.2, -1.0) - 0.2 * (1.0 + (-2f32).exp())).abs() < 1e-6);
        assert!(s.risk(0.2, -1.0) < s.risk(0.2, 1.0) && s.risk(0.1, 1.0) < s.risk(0.2, 1.0));
        assert!(s.risk(1.0, 1e9).is_finite());
        assert_eq!(Sirc::fit(RiskSource::L2Norm, &[5.0, 5.0]).unwrap().b, 0.0);
        assert!(Sirc { s2: RiskSource::MaxSoftmax, a: 0.0, b: 1.0 }.validate().is_err());
    }

    #[test]
    fn names_round_trip() {
        for r in RiskSource::ALL {
            assert_eq!(r.name().parse::<RiskSource>().unwrap(), r);
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        assert!("max_softmx".parse::<RiskSource>().unwrap_err().contains("max_softmax"));
        let label_free: Vec<&str> =
            RiskSource::ALL.into_iter().filter(|r| r.label_free()).map(RiskSource::name).collect();
        assert_eq!(label_free, ["q_score", "z_max", "q_v1", "l2_norm", "knn_distance", "mahalanobis"]);
        assert!(RiskSource::UserConfidence.needs_user_confidence() && !RiskSource::Stacked.needs_user_confidence());
    }
}
