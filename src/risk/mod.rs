//! The risk model: what turns one representation into "how likely is a mistake on this image".
//!
//! Pure maths, no I/O. [`probe`] is the linear probe whose mistakes are predicted,
//! [`neighbours`] the nearest-neighbour estimators' reference set, [`gaussian`] the fit part's
//! Gaussian for the Mahalanobis distance, [`estimators`] the candidate risk numbers (and SIRC's
//! and DOCTOR's formulas), [`stacked`] the regression over them, [`isotonic`] the map from the
//! chosen one to a probability, [`ranking`] how well a number ranks mistakes (AUROC, AUPRC,
//! thresholds), and [`linalg`] the Cholesky factors the Gaussian and the regression need.
//!
//! [`measure`] is the one place a representation goes through standardise → predict →
//! estimators: calibration measures every estimator with it on held-out images, and the server
//! applies the chosen one with it, so what is served is what was measured.

pub mod estimators;
pub mod gaussian;
pub mod isotonic;
pub mod linalg;
pub mod neighbours;
pub mod probe;
pub mod ranking;
pub mod stacked;

use std::cell::OnceCell;

use ndarray::ArrayView1;

pub use self::estimators::RiskSource;
use self::{
    estimators::Sirc,
    gaussian::Gaussian,
    neighbours::{Neighbours, Search},
    probe::{Prediction, Probe},
    stacked::Stacked,
};
use crate::qscore::Score;

/// The estimator asked for reads the client's classifier confidence, and none was given (or it
/// was NaN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this model's flag uses the client's classifier confidence; send `confidence` in [0, 1] per image")]
pub struct MissingConfidence;

/// The fitted parts the estimators read. An estimator whose part is absent measures NaN
/// (calibration files are validated so that the chosen one has its part).
#[derive(Debug, Clone, Copy)]
pub struct RiskModel<'a> {
    /// The probe: standardisation, prediction, softmax.
    pub probe: &'a Probe,
    /// The reference set of `knn` and `knn_distance`.
    pub neighbours: &'a Neighbours,
    /// The Gaussian of `mahalanobis` (and of `sirc` when its S2 is mahalanobis).
    pub gaussian: Option<&'a Gaussian>,
    /// SIRC's S2 and parameters.
    pub sirc: Option<&'a Sirc>,
    /// The stacked regression.
    pub stacked: Option<&'a Stacked>,
}

/// A representation as the risk model sees it: the probe's prediction and the estimators asked
/// for.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The probe's class and probabilities.
    pub prediction: Prediction,
    /// The risk (higher = riskier) of each source asked for, in the order asked.
    pub risks: Vec<f32>,
}

/// Measures `sources` for one representation `h` (shape (d,)) and its Q-Score `score`: the
/// probe standardises h once and predicts, and each estimator reads what it needs (the k-NN
/// search runs once, and only when `knn` or `knn_distance` is asked for, directly or through
/// `stacked` or `sirc`). `user_confidence` is the client's classifier probability for its own
/// prediction, in [0, 1].
///
/// # Errors
/// [`MissingConfidence`] when a source asked for reads `user_confidence` and it is `None` or NaN.
pub fn measure(
    h: ArrayView1<f32>,
    score: &Score,
    model: &RiskModel,
    sources: &[RiskSource],
    user_confidence: Option<f32>,
) -> Result<Measurement, MissingConfidence> {
    let z = model.probe.standardise(h);
    let prediction = model.probe.predict_standardised(&z);
    let reading = Reading {
        score,
        z: &z,
        prediction: &prediction,
        model,
        user_confidence: user_confidence.filter(|c| !c.is_nan()),
        search: OnceCell::new(),
    };
    let risks = sources.iter().map(|&s| reading.risk(s)).collect::<Result<_, _>>()?;
    Ok(Measurement { prediction, risks })
}

/// One image's inputs, with the k-NN search done at most once.
struct Reading<'a> {
    score: &'a Score,
    z: &'a [f32],
    prediction: &'a Prediction,
    model: &'a RiskModel<'a>,
    user_confidence: Option<f32>,
    search: OnceCell<Search>,
}

impl Reading<'_> {
    fn search(&self) -> Search {
        *self.search.get_or_init(|| self.model.neighbours.search(self.z, self.prediction.class))
    }

    fn risk(&self, source: RiskSource) -> Result<f32, MissingConfidence> {
        Ok(match source {
            RiskSource::QScore => -self.score.q_score,
            RiskSource::ZMax => -self.score.stats.z_max,
            RiskSource::QV1 => -self.score.stats.q_v1,
            RiskSource::L2Norm => -self.score.stats.l2_norm,
            RiskSource::MaxSoftmax => 1.0 - self.prediction.confidence(),
            RiskSource::Margin => 1.0 - self.prediction.margin(),
            RiskSource::Doctor => estimators::doctor(&self.prediction.probabilities),
            RiskSource::Knn => self.search().disagreement,
            RiskSource::KnnDistance => self.search().mean_distance,
            RiskSource::Mahalanobis => self.model.gaussian.map_or(f32::NAN, |g| g.distance2(self.z)),
            RiskSource::UserConfidence => 1.0 - self.user_confidence.ok_or(MissingConfidence)?,
            RiskSource::Sirc => match self.model.sirc {
                // Validation keeps S2 a plain estimator; the guard only stops a loop.
                Some(p) if !matches!(p.s2, RiskSource::Sirc | RiskSource::Stacked) => {
                    p.risk(self.risk(RiskSource::MaxSoftmax)?, self.risk(p.s2)?)
                }
                _ => f32::NAN,
            },
            RiskSource::Stacked => match self.model.stacked {
                Some(m) if !m.inputs.iter().any(|s| matches!(s, RiskSource::Sirc | RiskSource::Stacked)) => {
                    let values = m.inputs.iter().map(|&s| self.risk(s)).collect::<Result<Vec<f32>, _>>()?;
                    m.risk(&values)
                }
                _ => f32::NAN,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qscore::{Discriminative, score};

    /// The hand-computed spike of the Q-Score tests, h = [0 x 9, 10] with eps 2: Q = 9,
    /// z_max = 9 / sqrt(10), ||h||_2 = 10. A probe over d = 10 with mean 0, scale 1 whose
    /// logits are (ln 7, ln 2, 0) * h_9 / 10: softmax (0.7, 0.2, 0.1), max softmax 0.7, margin
    /// 0.5, DOCTOR 1 - 0.54. One reference at the origin with k = 1 and label 1: disagreement 1
    /// (the probe says 0), distance 10. The identity Gaussian: D^2 = 100. Every value comes out
    /// negated or complemented, so higher is riskier.
    #[test]
    fn oriented_so_higher_is_riskier() {
        let mut h = ndarray::Array1::<f32>::zeros(10);
        h[9] = 10.0;
        let s = score(h.view(), 2.0, &Discriminative::All).unwrap();
        let mut weights = vec![vec![0.0_f32; 10]; 3];
        (weights[0][9], weights[1][9]) = (7f32.ln() / 10.0, 2f32.ln() / 10.0);
        let probe = Probe {
            classes: vec!["a".into(), "b".into(), "c".into()],
            mean: vec![0.0; 10],
            scale: vec![1.0; 10],
            weights,
            bias: vec![0.0; 3],
            alpha: 1.0,
        };
        let neighbours = Neighbours::new(1, 10, &[0.0; 10], &[1]);
        let mut identity = vec![0.0; 100];
        (0..10).for_each(|i| identity[i * 11] = 1.0);
        let gaussian = Gaussian::from_covariance(&[0.0; 10], &identity, 0.0).unwrap();
        let model =
            RiskModel { probe: &probe, neighbours: &neighbours, gaussian: Some(&gaussian), sirc: None, stacked: None };
        let m = measure(h.view(), &s, &model, &RiskSource::ALL[..10], Some(0.9)).unwrap();
        let want = [-9.0, -9.0 / 10f32.sqrt(), -0.9 / 10f32.sqrt(), -10.0, 10.0, 100.0, 0.3, 0.5, 0.46, 1.0];
        for ((source, got), want) in RiskSource::ALL.iter().zip(&m.risks).zip(want) {
            assert!((got - want).abs() < 1e-5, "{source}: {got} != {want}");
        }
        let user = measure(h.view(), &s, &model, &[RiskSource::UserConfidence], Some(0.9)).unwrap();
        assert!((user.risks[0] - 0.1).abs() < 1e-6);
        assert_eq!(measure(h.view(), &s, &model, &[RiskSource::UserConfidence], None).unwrap_err(), MissingConfidence);
        assert!(measure(h.view(), &s, &model, &[RiskSource::UserConfidence], Some(f32::NAN)).is_err());
        let no_parts = RiskModel { gaussian: None, ..model };
        let m =
            measure(h.view(), &s, &no_parts, &[RiskSource::Mahalanobis, RiskSource::Sirc, RiskSource::Stacked], None)
                .unwrap();
        assert!(m.risks.iter().all(|r| r.is_nan()), "a missing part measures NaN: {:?}", m.risks);
    }

    /// SIRC and the stacked regression read the same values the single estimators give: with
    /// a = -1, b = 1 on l2_norm (risk -10): 0.3 (1 + e^(1 (-10 - 1))); a stacked model over
    /// (max_softmax, user_confidence) with mean 0, scale 1, weights (2, 1) and bias -1:
    /// -1 + 0.6 + 0.1 = -0.3, and it needs the client's confidence.
    #[test]
    fn combinations_read_the_single_estimators() {
        let mut h = ndarray::Array1::<f32>::zeros(10);
        h[9] = 10.0;
        let s = score(h.view(), 2.0, &Discriminative::All).unwrap();
        let probe = Probe {
            classes: vec!["a".into(), "b".into(), "c".into()],
            mean: vec![0.0; 10],
            scale: vec![1.0; 10],
            weights: vec![
                [vec![0.0; 9], vec![7f32.ln() / 10.0]].concat(),
                [vec![0.0; 9], vec![2f32.ln() / 10.0]].concat(),
                vec![0.0; 10],
            ],
            bias: vec![0.0; 3],
            alpha: 1.0,
        };
        let neighbours = Neighbours::new(1, 10, &[0.0; 10], &[1]);
        let sirc = Sirc { s2: RiskSource::L2Norm, a: -1.0, b: 1.0 };
        let stacked = Stacked {
            inputs: vec![RiskSource::MaxSoftmax, RiskSource::UserConfidence],
            mean: vec![0.0, 0.0],
            scale: vec![1.0, 1.0],
            weights: vec![2.0, 1.0],
            bias: -1.0,
            alpha: 1.0,
        };
        let model = RiskModel {
            probe: &probe,
            neighbours: &neighbours,
            gaussian: None,
            sirc: Some(&sirc),
            stacked: Some(&stacked),
        };
        let m = measure(h.view(), &s, &model, &[RiskSource::Sirc, RiskSource::Stacked], Some(0.9)).unwrap();
        assert!((m.risks[0] - 0.3 * (1.0 + (-11f32).exp())).abs() < 1e-6, "{:?}", m.risks);
        assert!((m.risks[1] + 0.3).abs() < 1e-5, "{:?}", m.risks);
        assert!(measure(h.view(), &s, &model, &[RiskSource::Stacked], None).is_err());
    }
}
