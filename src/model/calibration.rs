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
            Self::ZMax => s.stats.z_max,
            Self::QV1 => s.stats.q_v1,
            Self::L2Norm => s.stats.l2_norm,
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
        if self.x.windows(2).any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(x: &[f32], y: &[f32]) -> IsotonicMap {
        IsotonicMap { x: x.to_vec(), y: y.to_vec() }
    }

    /// Knots (1, 0.8), (3, 0.4), (5, 0.0): decreasing, as for the Q-Score (higher Q, less risk).
    /// At 2: halfway between 0.8 and 0.4 = 0.6; at 4.5: 0.4 - 0.75 * 0.4 = 0.1; clipped outside.
    #[test]
    fn isotonic_interpolates_and_clips() {
        let m = map(&[1.0, 3.0, 5.0], &[0.8, 0.4, 0.0]);
        m.validate().unwrap();
        assert_eq!(m.apply(-10.0), 0.8);
        assert_eq!(m.apply(1.0), 0.8);
        assert!((m.apply(2.0) - 0.6).abs() < 1e-6);
        assert!((m.apply(3.0) - 0.4).abs() < 1e-6);
        assert!((m.apply(4.5) - 0.1).abs() < 1e-6);
        assert_eq!(m.apply(99.0), 0.0);
        assert_eq!(map(&[2.0], &[0.3]).apply(7.0), 0.3);
    }

    #[test]
    fn isotonic_rejects_bad_maps() {
        assert!(map(&[1.0, 1.0], &[0.1, 0.2]).validate().is_err(), "x not strictly ascending");
        assert!(map(&[1.0, 2.0, 3.0], &[0.1, 0.5, 0.2]).validate().is_err(), "not monotone");
        assert!(map(&[1.0, 2.0], &[0.1, 1.5]).validate().is_err(), "not a probability");
        assert!(map(&[], &[]).validate().is_err());
        assert!(map(&[1.0, 2.0], &[0.1]).validate().is_err());
    }

    fn calibration(json: serde_json::Value) -> Result<Calibration, String> {
        let cal: Calibration = serde_json::from_value(json).map_err(|e| e.to_string())?;
        cal.validate(8).map(|()| cal)
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "format_version": 1, "epsilon": 0.5, "percentiles": [50.0, 95.0],
            "discriminative_features": [6], "risk_source": "q_score",
            "isotonic": {"x": [0.0, 2.0, 4.0], "y": [0.9, 0.5, 0.1]}, "threshold": 0.5,
            "metrics": {"ignored": "by the server"}
        })
    }

    /// The hand-computed vector of the Q-Score tests, with D = {6}: Q = 2.75, so
    /// p = 0.5 - 0.375 * 0.4 = 0.35 < tau = 0.5: not flagged. With D = {} Q = 0: p = 0.9, flagged.
    #[test]
    fn risk_follows_the_chosen_source() {
        let cal = calibration(base()).unwrap();
        let h = ndarray::array![1.0_f32, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 7.0];
        let s = crate::qscore::score(h.view(), cal.epsilon, &cal.discriminative_set(8).unwrap()).unwrap();
        let r = cal.risk(&s);
        assert!((r.p_misclassified - 0.35).abs() < 1e-6, "{r:?}");
        assert!(!r.likely_misclassified);
        let none =
            crate::qscore::score(h.view(), cal.epsilon, &crate::qscore::Discriminative::Mask(vec![false; 8])).unwrap();
        assert_eq!(cal.risk(&none), Risk { p_misclassified: 0.9, likely_misclassified: true });
    }

    #[test]
    fn bad_calibrations_are_refused() {
        let mut v = base();
        v["discriminative_features"] = serde_json::json!([3, 8]);
        assert!(calibration(v).unwrap_err().contains("index 8"));
        let mut v = base();
        v["discriminative_features"] = serde_json::json!([4, 2]);
        assert!(calibration(v).is_err());
        let mut v = base();
        v["format_version"] = serde_json::json!(2);
        assert!(calibration(v).is_err());
        let mut v = base();
        v["threshold"] = serde_json::json!(1.5);
        assert!(calibration(v).is_err());
        let mut v = base();
        v["risk_source"] = serde_json::json!("max_softmax");
        assert!(calibration(v).is_err(), "probe-based sources need a build that serves the probe");
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
}
