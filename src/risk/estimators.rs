//! The risk estimators: label-free and probe-based numbers that may predict a misclassification.
//!
//! Each estimator is oriented so that a higher value means a riskier image, which is how
//! calibration ranks and maps them. The orientation is fixed in advance, from what each number
//! means, never learnt from the data it is measured on; an estimator that predicts mistakes in
//! the other direction shows up as an AUROC below 0.5, plainly.

use serde::{Deserialize, Serialize};

use super::probe::Prediction;
use crate::qscore::Score;

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
}

impl RiskSource {
    /// Every estimator, in report order: the paper's first.
    pub const ALL: [Self; 7] =
        [Self::QScore, Self::ZMax, Self::QV1, Self::L2Norm, Self::MaxSoftmax, Self::Margin, Self::Knn];

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
        }
    }

    /// Whether it reads only the representation (no labels, no probe).
    pub fn label_free(self) -> bool {
        matches!(self, Self::QScore | Self::ZMax | Self::QV1 | Self::L2Norm)
    }

    /// The estimator's risk value (higher = riskier) for one image. `disagreement` is the
    /// nearest-neighbour share, needed only by [`RiskSource::Knn`].
    pub fn risk(self, score: &Score, prediction: &Prediction, disagreement: impl FnOnce() -> f32) -> f32 {
        match self {
            Self::QScore => -score.q_score,
            Self::ZMax => -score.stats.z_max,
            Self::QV1 => -score.stats.q_v1,
            Self::L2Norm => -score.stats.l2_norm,
            Self::MaxSoftmax => 1.0 - prediction.confidence(),
            Self::Margin => 1.0 - prediction.margin(),
            Self::Knn => disagreement(),
        }
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
    use crate::qscore::{Discriminative, score};

    /// The hand-computed spike of the Q-Score tests, h = [0 x 9, 10] with eps 2: Q = 9,
    /// z_max = 9 / sqrt(10), ||h||_2 = 10; a prediction (0.7, 0.2, 0.1): max softmax 0.7,
    /// margin 0.5. Every value comes out negated or complemented, so higher is riskier.
    #[test]
    fn oriented_so_higher_is_riskier() {
        let mut h = ndarray::Array1::<f32>::zeros(10);
        h[9] = 10.0;
        let s = score(h.view(), 2.0, &Discriminative::All).unwrap();
        let p = Prediction { class: 0, probabilities: vec![0.7, 0.2, 0.1] };
        let knn = || 0.25;
        assert_eq!(RiskSource::QScore.risk(&s, &p, knn), -9.0);
        assert!((RiskSource::ZMax.risk(&s, &p, knn) + 9.0 / 10f32.sqrt()).abs() < 1e-5);
        assert!((RiskSource::QV1.risk(&s, &p, knn) + 0.9 / 10f32.sqrt()).abs() < 1e-6);
        assert_eq!(RiskSource::L2Norm.risk(&s, &p, knn), -10.0);
        assert!((RiskSource::MaxSoftmax.risk(&s, &p, knn) - 0.3).abs() < 1e-6);
        assert!((RiskSource::Margin.risk(&s, &p, knn) - 0.5).abs() < 1e-6);
        assert_eq!(RiskSource::Knn.risk(&s, &p, knn), 0.25);
    }

    #[test]
    fn names_round_trip() {
        for r in RiskSource::ALL {
            assert_eq!(r.name().parse::<RiskSource>().unwrap(), r);
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        assert!("max_softmx".parse::<RiskSource>().unwrap_err().contains("max_softmax"));
    }
}
