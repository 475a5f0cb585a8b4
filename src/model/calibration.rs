//! `calibration.json`: what `qscore calibrate` learnt about a model on labelled data.
//!
//! The server needs three things from it: the discriminative set D (which features count in
//! the Q-Score), the risk estimator that calibration chose with its isotonic map to
//! p(misclassified), and the threshold tau that turns that probability into the flag. Other
//! fields that calibration writes (metrics, reference distributions, the probe) are read by the
//! parts that use them and ignored here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::qscore::{Discriminative, Score};

/// The calibration file, as far as scoring needs it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Calibration {
    /// Format of the file; this build reads version 1.
    pub format_version: u32,
    /// eps used to find D; the server scores with the same value.
    pub epsilon: f32,
    /// (lo, hi) percentile band used to find D.
    pub percentiles: (f64, f64),
    /// Indices of D, ascending.
    pub discriminative_features: Vec<usize>,
    /// The estimator that drives `p_misclassified`.
    pub risk_source: RiskSource,
    /// Monotone map from the estimator's value to p(misclassified).
    pub isotonic: IsotonicMap,
    /// tau: the flag is raised when p_misclassified >= tau.
    pub threshold: f32,
}

/// A risk estimator the server can evaluate from an embedding alone.
///
/// Calibration also measures estimators that need the linear probe (max softmax, margin) or the
/// fit set (nearest neighbours); a calibration that picks one of those needs a build that
/// serves the probe, and this one refuses it at load rather than guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RiskSource {
    /// The paper's Q-Score.
    QScore,
    /// (max h - mu) / sigma.
    ZMax,
    /// z_max / ||h||_1.
    QV1,
    /// ||h||_2.
    L2Norm,
}

impl RiskSource {
    /// The estimator's raw value for one scored representation.
    pub fn value(self, s: &Score) -> f32 {
        match self {
            Self::QScore => s.q_score,
            Self::ZMax => s.z_max,
            Self::QV1 => s.q_v1,
            Self::L2Norm => s.l2_norm,
        }
    }
}

/// A piecewise-linear monotone map (scikit-learn's `IsotonicRegression` with
/// `out_of_bounds="clip"`): x ascending, y the fitted p(misclassified) at each x.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IsotonicMap {
    /// Knots, strictly ascending.
    pub x: Vec<f32>,
    /// Fitted values at the knots, in [0, 1], monotone in either direction.
    pub y: Vec<f32>,
}

impl IsotonicMap {
    /// p(misclassified) at `v`: linear between knots, clipped to the end values outside them.
    pub fn apply(&self, v: f32) -> f32 {
        let (x, y) = (&self.x, &self.y);
        if v <= x[0] {
            return y[0];
        }
        if v >= x[x.len() - 1] {
            return y[y.len() - 1];
        }
        let i = x.partition_point(|&k| k <= v);
        let t = (v - x[i - 1]) / (x[i] - x[i - 1]);
        y[i - 1] + t * (y[i] - y[i - 1])
    }

    fn validate(&self) -> Result<(), String> {
        if self.x.is_empty() || self.x.len() != self.y.len() {
            return Err("isotonic.x and isotonic.y must be non-empty and of equal length".into());
        }
        if self.x.windows(2).any(|w| !(w[0] < w[1])) {
            return Err("isotonic.x must be strictly ascending".into());
        }
        if self.y.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return Err("isotonic.y must lie in [0, 1]".into());
        }
        let up = self.y.windows(2).all(|w| w[0] <= w[1]);
        let down = self.y.windows(2).all(|w| w[0] >= w[1]);
        if !(up || down) {
            return Err("isotonic.y must be monotone".into());
        }
        Ok(())
    }
}

/// What calibration says about one representation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Risk {
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
        let cal: Self = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{} is not a calibration this build reads: {e}; re-run `qscore calibrate`", path.display())
        })?;
        cal.validate(dim).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Some(cal))
    }

    fn validate(&self, dim: usize) -> Result<(), String> {
        if self.format_version != 1 {
            return Err(format!("format_version {} is not supported (this build reads 1)", self.format_version));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err("threshold must lie in [0, 1]".into());
        }
        if self.discriminative_features.windows(2).any(|w| w[0] >= w[1]) {
            return Err("discriminative_features must be strictly ascending".into());
        }
        self.discriminative_set(dim)?;
        self.isotonic.validate()
    }

    /// D as a mask over the model's `dim` features; an error names an index past them.
    pub fn discriminative_set(&self, dim: usize) -> Result<Discriminative, String> {
        Discriminative::from_indices(&self.discriminative_features, dim)
            .map_err(|j| format!("discriminative_features holds index {j}, past the model's {dim} features"))
    }

    /// The calibrated risk of one scored representation.
    pub fn risk(&self, s: &Score) -> Risk {
        let p = self.isotonic.apply(self.risk_source.value(s));
        Risk { p_misclassified: p, likely_misclassified: p >= self.threshold }
    }
}
