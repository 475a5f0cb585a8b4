//! The Q-Score of Kalibhat et al. (AAAI 2024, arXiv 2203.01881), exactly as defined in
//! `design.md` section 1, plus the quantities calibration needs (activation frequencies A_j
//! and the discriminative set D).
//!
//! Everything here is a pure function over `ndarray` views: no I/O, no allocation beyond the
//! answer, no knowledge of models or HTTP. Sums over the feature axis are accumulated in f64 so
//! that a 1280-d embedding gives the same mean and deviation as numpy/torch in double precision;
//! the answers are f32.
//!
//! Conventions where the paper leaves room (each one is a documented, exposed choice):
//! - sigma is the unbiased standard deviation (divide by d - 1), as `torch.std` does by default;
//! - L uses a strict inequality, `h_j > mu + eps * sigma`;
//! - D's percentile band is inclusive at both ends and uses numpy's default linear
//!   interpolation over the non-zero A_j only;
//! - an image with no discriminative feature active (L ∩ D empty) scores 0, the lowest score;
//! - sigma = 0 makes L empty, Q = 0 and z_max = 0.

use ndarray::{ArrayView1, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

/// Why one representation could not be scored.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum ScoreError {
    /// The representation holds a NaN or an infinity: a model fault, never a score.
    #[error("the representation has a non-finite value at feature {index}")]
    NonFinite {
        /// First offending feature.
        index: usize,
    },
    /// A representation needs at least two features for an unbiased deviation.
    #[error("the representation has {0} features; at least 2 are needed")]
    TooFewFeatures(usize),
}

/// The discriminative set D as a membership mask over the d features.
#[derive(Debug, Clone, PartialEq)]
pub enum Discriminative {
    /// No calibration: every feature counts as discriminative.
    All,
    /// `mask[j]` is true when feature j is in D.
    Mask(Vec<bool>),
}

impl Discriminative {
    /// Builds the mask for a d-dimensional representation from D's feature indices.
    ///
    /// Indices at or past `dim` are an error, so a calibration written for another model is
    /// refused rather than silently truncated.
    pub fn from_indices(indices: &[usize], dim: usize) -> Result<Self, usize> {
        let mut mask = vec![false; dim];
        for &j in indices {
            *mask.get_mut(j).ok_or(j)? = true;
        }
        Ok(Self::Mask(mask))
    }

    /// Whether feature j is in D.
    pub fn contains(&self, j: usize) -> bool {
        match self {
            Self::All => true,
            Self::Mask(mask) => mask.get(j).copied().unwrap_or(false),
        }
    }
}

/// One feature of L ∩ D, as answered to a user.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActiveFeature {
    /// Feature index in the representation.
    pub index: usize,
    /// The feature's activation h_j.
    pub activation: f32,
    /// (h_j - mu) / sigma.
    pub z_score: f32,
}

/// The Q-Score of one representation, its statistics, and L ∩ D.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Q = mean over L ∩ D of (h_j - mu); 0 when L ∩ D is empty.
    pub q_score: f32,
    /// The statistics answered beside Q.
    pub stats: Stats,
    /// L ∩ D, strongest (highest z-score) first.
    pub features: Vec<ActiveFeature>,
}

/// Statistics of one representation (design.md section 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Stats {
    /// Mean of h.
    pub mu: f32,
    /// Unbiased standard deviation of h.
    pub sigma: f32,
    /// |L|: features above mu + eps * sigma.
    pub active: usize,
    /// |L ∩ D|.
    pub active_discriminative: usize,
    /// (max_j h_j - mu) / sigma; 0 when sigma is 0.
    pub z_max: f32,
    /// z_max / ||h||_1, the 2022 preprint's form of the score; 0 when ||h||_1 is 0.
    pub q_v1: f32,
    /// ||h||_2, reported because calibration may pick it as the risk estimator.
    pub l2_norm: f32,
    /// d, the size of h.
    pub dim: usize,
}

/// Mean and unbiased standard deviation, accumulated in f64.
fn moments(h: ArrayView1<f32>) -> Result<(f64, f64), ScoreError> {
    let d = h.len();
    if d < 2 {
        return Err(ScoreError::TooFewFeatures(d));
    }
    if let Some(index) = h.iter().position(|v| !v.is_finite()) {
        return Err(ScoreError::NonFinite { index });
    }
    let mu = h.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
    let ss = h.iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>();
    Ok((mu, (ss / (d - 1) as f64).sqrt()))
}

/// The threshold above which a feature is "highly activating", or `None` when sigma is 0 and
/// therefore L is empty by definition.
fn activation_threshold(mu: f64, sigma: f64, epsilon: f32) -> Option<f64> {
    (sigma > 0.0).then(|| mu + f64::from(epsilon) * sigma)
}

/// Scores one representation h against the discriminative set `d_set`.
pub fn score(h: ArrayView1<f32>, epsilon: f32, d_set: &Discriminative) -> Result<Score, ScoreError> {
    let (mu, sigma) = moments(h)?;
    let l1 = h.iter().map(|&v| f64::from(v).abs()).sum::<f64>();
    let l2 = h.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
    let max = h.iter().copied().fold(f32::NEG_INFINITY, f32::max);

    let mut active = 0;
    let mut features = Vec::new();
    let mut sum = 0.0_f64;
    if let Some(threshold) = activation_threshold(mu, sigma, epsilon) {
        for (j, &v) in h.iter().enumerate() {
            if f64::from(v) > threshold {
                active += 1;
                if d_set.contains(j) {
                    sum += f64::from(v) - mu;
                    features.push(ActiveFeature {
                        index: j,
                        activation: v,
                        z_score: ((f64::from(v) - mu) / sigma) as f32,
                    });
                }
            }
        }
    }
    features.sort_by(|a, b| b.z_score.total_cmp(&a.z_score).then(a.index.cmp(&b.index)));

    let q_score = if features.is_empty() { 0.0 } else { sum / features.len() as f64 };
    let z_max = if sigma > 0.0 { (f64::from(max) - mu) / sigma } else { 0.0 };
    let q_v1 = if l1 > 0.0 { z_max / l1 } else { 0.0 };
    let stats = Stats {
        mu: mu as f32,
        sigma: sigma as f32,
        active,
        active_discriminative: features.len(),
        z_max: z_max as f32,
        q_v1: q_v1 as f32,
        l2_norm: l2 as f32,
        dim: h.len(),
    };
    Ok(Score { q_score: q_score as f32, stats, features })
}

/// Scores every row of a batch of representations (N x d); one answer per row, in order.
pub fn score_batch(reps: ArrayView2<f32>, epsilon: f32, d_set: &Discriminative) -> Vec<Result<Score, ScoreError>> {
    reps.axis_iter(Axis(0)).map(|h| score(h, epsilon, d_set)).collect()
}

/// Activation frequency A_j (in percent) of every feature over a reference set (N x d): the
/// share of representations whose highly activating set L contains feature j.
///
/// A row with a non-finite value is an error: calibration must not silently skip images.
pub fn activation_frequency(reps: ArrayView2<f32>, epsilon: f32) -> Result<Vec<f32>, (usize, ScoreError)> {
    let (n, d) = reps.dim();
    let mut counts = vec![0_u64; d];
    for (i, h) in reps.axis_iter(Axis(0)).enumerate() {
        let (mu, sigma) = moments(h).map_err(|e| (i, e))?;
        if let Some(threshold) = activation_threshold(mu, sigma, epsilon) {
            for (count, &v) in counts.iter_mut().zip(h.iter()) {
                if f64::from(v) > threshold {
                    *count += 1;
                }
            }
        }
    }
    let n = n.max(1) as f64;
    Ok(counts.iter().map(|&c| (100.0 * c as f64 / n) as f32).collect())
}

/// The q-th percentile (0..=100) of `values`, with numpy's default linear interpolation.
/// `None` for an empty slice.
pub fn percentile(values: &[f32], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    sorted.sort_by(f64::total_cmp);
    let rank = q.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// The discriminative set D = { j : A_j > 0 and P_lo <= A_j <= P_hi }, where P_lo and P_hi are
/// percentiles of the non-zero A_j. Returns sorted feature indices; empty when no feature ever
/// activated.
pub fn discriminative_set(frequency: &[f32], lo: f64, hi: f64) -> Vec<usize> {
    let nonzero: Vec<f32> = frequency.iter().copied().filter(|&a| a > 0.0).collect();
    let (Some(p_lo), Some(p_hi)) = (percentile(&nonzero, lo), percentile(&nonzero, hi)) else {
        return Vec::new();
    };
    frequency
        .iter()
        .enumerate()
        .filter(|&(_, &a)| a > 0.0 && f64::from(a) >= p_lo && f64::from(a) <= p_hi)
        .map(|(j, _)| j)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, array};

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    /// h = [0 x 9, 10]: mu = 1, sum of squares = 9 + 81 = 90, sigma = sqrt(90 / 9) = sqrt(10).
    /// With eps = 2 the threshold is 1 + 2 sqrt(10) = 7.32, so L = {9}, Q = 10 - 1 = 9,
    /// z_max = 9 / sqrt(10), ||h||_1 = 10, ||h||_2 = 10.
    #[test]
    fn hand_computed_single_spike() {
        let mut h = Array1::<f32>::zeros(10);
        h[9] = 10.0;
        let s = score(h.view(), 2.0, &Discriminative::All).unwrap();
        assert!(close(s.stats.mu, 1.0));
        assert!(close(s.stats.sigma, 10f64.sqrt()));
        assert_eq!((s.stats.active, s.stats.active_discriminative), (1, 1));
        assert!(close(s.q_score, 9.0));
        assert!(close(s.stats.z_max, 9.0 / 10f64.sqrt()));
        assert!(close(s.stats.q_v1, 9.0 / 10f64.sqrt() / 10.0));
        assert!(close(s.stats.l2_norm, 10.0));
        assert_eq!(s.features[0].index, 9);
        assert!(close(s.features[0].z_score, 9.0 / 10f64.sqrt()));
    }

    /// h = [1, 1, 1, 1, 1, 1, 5, 7]: mu = 18/8 = 2.25; deviations -1.25 (x6), 2.75, 4.75;
    /// sum of squares = 6 * 1.5625 + 7.5625 + 22.5625 = 39.5; sigma = sqrt(39.5 / 7) = 2.37547.
    /// eps = 0.5: threshold = 2.25 + 1.18773 = 3.43773, L = {6, 7}.
    /// With D = all: Q = (2.75 + 4.75) / 2 = 3.75. With D = {6}: Q = 2.75, |L ∩ D| = 1.
    #[test]
    fn hand_computed_two_active_and_mask() {
        let h = array![1.0_f32, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 7.0];
        let sigma = (39.5_f64 / 7.0).sqrt();
        let all = score(h.view(), 0.5, &Discriminative::All).unwrap();
        assert!(close(all.stats.sigma, sigma));
        assert_eq!(all.stats.active, 2);
        assert!(close(all.q_score, 3.75));
        assert_eq!(all.features.iter().map(|f| f.index).collect::<Vec<_>>(), vec![7, 6]);

        let d = Discriminative::from_indices(&[6], 8).unwrap();
        let masked = score(h.view(), 0.5, &d).unwrap();
        assert_eq!((masked.stats.active, masked.stats.active_discriminative), (2, 1));
        assert!(close(masked.q_score, 2.75));
        assert!(close(masked.stats.z_max, 4.75 / sigma), "z_max ignores D");
    }

    #[test]
    fn empty_intersection_scores_zero() {
        let h = array![1.0_f32, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 7.0];
        let d = Discriminative::from_indices(&[0, 1], 8).unwrap();
        let s = score(h.view(), 0.5, &d).unwrap();
        assert_eq!(s.stats.active, 2);
        assert_eq!(s.stats.active_discriminative, 0);
        assert_eq!(s.q_score, 0.0);
        assert!(s.features.is_empty());
    }

    #[test]
    fn constant_vector_has_no_active_features() {
        let h = Array1::<f32>::from_elem(16, 3.5);
        let s = score(h.view(), 4.0, &Discriminative::All).unwrap();
        assert_eq!((s.stats.sigma, s.stats.active, s.q_score, s.stats.z_max), (0.0, 0, 0.0, 0.0));
        assert!(close(s.stats.q_v1, 0.0));
        let zeros = Array1::<f32>::zeros(16);
        let z = score(zeros.view(), 4.0, &Discriminative::All).unwrap();
        assert_eq!((z.q_score, z.stats.q_v1, z.stats.l2_norm), (0.0, 0.0, 0.0));
    }

    /// One huge feature among 1279 zeros: mu = 1e30 / 1280; every other deviation is -mu.
    /// f64 accumulation keeps the answer finite and exact to f32 precision:
    /// z_max = (1 - 1/d) / sqrt(1/d) = (d - 1) / sqrt(d) for a single spike of any height.
    #[test]
    fn single_huge_feature_stays_finite() {
        let d = 1280;
        let mut h = Array1::<f32>::zeros(d);
        h[17] = 1e30;
        let s = score(h.view(), 4.0, &Discriminative::All).unwrap();
        let n = d as f64;
        assert!(s.q_score.is_finite());
        assert_eq!(s.stats.active, 1);
        assert!(close(s.stats.z_max, (n - 1.0) / n.sqrt()));
        assert!(close(s.q_score, 1e30 * (1.0 - 1.0 / n)));
    }

    #[test]
    fn non_finite_values_are_errors_not_scores() {
        let h = array![1.0_f32, f32::NAN, 2.0];
        assert_eq!(score(h.view(), 4.0, &Discriminative::All), Err(ScoreError::NonFinite { index: 1 }));
        let h = array![f32::INFINITY, 0.0];
        assert_eq!(score(h.view(), 4.0, &Discriminative::All), Err(ScoreError::NonFinite { index: 0 }));
        assert_eq!(score(array![1.0_f32].view(), 4.0, &Discriminative::All), Err(ScoreError::TooFewFeatures(1)));
    }

    #[test]
    fn batch_answers_each_row_on_its_own() {
        let reps = array![
            [0.0_f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0],
            [1.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        ];
        let out = score_batch(reps.view(), 2.0, &Discriminative::All);
        assert!(close(out[0].as_ref().unwrap().q_score, 9.0));
        assert!(out[1].is_err());
    }

    #[test]
    fn mask_rejects_out_of_range_indices() {
        assert_eq!(Discriminative::from_indices(&[0, 8], 8), Err(8));
    }

    /// numpy: np.percentile([1, 2, 3, 4], 50) = 2.5, 95 -> 3.85, 0 -> 1, 100 -> 4.
    #[test]
    fn percentile_matches_numpy_linear() {
        let v = [4.0_f32, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert!((percentile(&v, 95.0).unwrap() - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    /// Three 10-d representations, each a single spike (eps = 2 keeps only the spike in L):
    /// spikes at features 0, 0, 3 give A = [66.67, 0, 0, 33.33, 0...].
    /// Non-zero A = [33.33, 66.67]: P50 = 50, P95 = 65. D = {} for that band; with 0..100, D = {0, 3}.
    #[test]
    fn activation_frequency_and_discriminative_set() {
        let mut reps = ndarray::Array2::<f32>::zeros((3, 10));
        reps[[0, 0]] = 10.0;
        reps[[1, 0]] = 10.0;
        reps[[2, 3]] = 10.0;
        let a = activation_frequency(reps.view(), 2.0).unwrap();
        assert!(close(a[0], 200.0 / 3.0));
        assert!(close(a[3], 100.0 / 3.0));
        assert_eq!(a.iter().filter(|&&x| x > 0.0).count(), 2);
        assert!(discriminative_set(&a, 50.0, 95.0).is_empty());
        assert_eq!(discriminative_set(&a, 0.0, 100.0), vec![0, 3]);
        assert_eq!(discriminative_set(&a, 0.0, 50.0), vec![3]);
        assert!(discriminative_set(&[0.0; 4], 50.0, 95.0).is_empty());
    }

    /// A_j = [10, 20, 30, 40, 50] (all non-zero): P50 = 30, P95 = 48, so D = {2, 3}.
    #[test]
    fn discriminative_band_is_inclusive() {
        let a = [10.0_f32, 20.0, 30.0, 40.0, 50.0, 0.0];
        assert_eq!(discriminative_set(&a, 50.0, 95.0), vec![2, 3]);
    }
}
