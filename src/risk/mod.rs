//! The risk model: what turns one representation into "how likely is a mistake on this image".
//!
//! Pure maths, no I/O. [`probe`] is the linear probe whose mistakes are predicted,
//! [`neighbours`] the nearest-neighbour estimator's reference set, [`estimators`] the seven
//! candidate risk numbers, [`isotonic`] the map from the chosen one to a probability, and
//! [`ranking`] how well a number ranks mistakes (AUROC, AUPRC, thresholds).
//!
//! [`measure`] is the one place a representation goes through standardise → predict →
//! estimators: calibration measures every estimator with it on held-out images, and the server
//! applies the chosen one with it, so what is served is what was measured.

pub mod estimators;
pub mod isotonic;
pub mod neighbours;
pub mod probe;
pub mod ranking;

use ndarray::ArrayView1;

pub use self::estimators::RiskSource;
use self::{
    neighbours::Neighbours,
    probe::{Prediction, Probe},
};
use crate::qscore::Score;

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
/// search runs only when [`RiskSource::Knn`] is asked for).
pub fn measure(
    h: ArrayView1<f32>,
    score: &Score,
    probe: &Probe,
    neighbours: &Neighbours,
    sources: &[RiskSource],
) -> Measurement {
    let z = probe.standardise(h);
    let prediction = probe.predict_standardised(&z);
    let risks = sources
        .iter()
        .map(|source| source.risk(score, &prediction, || neighbours.disagreement(&z, prediction.class)))
        .collect();
    Measurement { prediction, risks }
}

/// The chosen estimator reads the client's classifier confidence, and the image came without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingConfidence;

impl std::fmt::Display for MissingConfidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this model's flag uses the client's classifier confidence; send `confidence` in [0, 1] per image")
    }
}

impl std::error::Error for MissingConfidence {}
