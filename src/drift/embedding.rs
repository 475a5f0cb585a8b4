//! Multivariate drift on the representation itself: a kernel two-sample test between the drift
//! window's embeddings and a sample of the calibration's held-out embeddings.
//!
//! The Q-Score statistics (KS, PSI) see one number per image; two windows with the same Q-Score
//! distribution can hold very different images (a few classes instead of all of them, upside-down
//! photos, another camera). This test compares the embeddings themselves with the unbiased squared
//! maximum mean discrepancy (MMD², Gretton et al., "A Kernel Two-Sample Test", JMLR 13, 2012,
//! eq. 3) under a Gaussian RBF kernel k(x, y) = exp(-||x - y||² / (2 sigma²)), and turns it into a
//! p-value by permutation.
//!
//! Why MMD and not a domain classifier's AUC (the other common choice): MMD needs no training, so
//! it has no split of a small window into train and test, no classifier hyperparameters and no
//! optimiser noise; its only parameter, sigma, is fixed once on the reference by the median
//! heuristic (the median distance between reference rows) and stored with the sample; and its
//! permutation p-value is exact under no drift (the window and the reference exchangeable) at any
//! window size, while a classifier's AUC would need a retrained classifier per permutation for the
//! same guarantee. Both cost about the same: here one (n + m)² kernel matrix per refresh, reused by
//! every permutation through one matrix product.
//!
//! The kernel works on the raw representation, not standardised per feature: the median heuristic
//! already sets the scale, and per-feature standardisation would give the many near-silent
//! features of a post-ReLU representation the same weight as the ones that carry the image.
//!
//! Cost: O((n + m)² d) for the kernel and O((n + m)² P) for P permutations, both matrix
//! products, and (n + m)² + 2 (n + m)(P + 1) floats of memory while it runs (12 MB at
//! n = m = 500, P = 500). It never runs on the request path: the drift monitor recomputes it in
//! the background at most every [`super::EMBEDDING_REFRESH`], and the endpoints read the cached
//! value.

use ndarray::{Array2, ArrayView2};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize};

/// Held-out embeddings calibration keeps as the reference of the embedding test, with the
/// kernel bandwidth measured on them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
pub struct EmbeddingSample {
    /// Size of each row: the model's d.
    pub dim: usize,
    /// sigma of the Gaussian kernel, in the representation's units: the median Euclidean distance
    /// between two rows of the sample (the median heuristic).
    pub bandwidth: f32,
    /// Seed the rows were drawn with from the held-out images.
    pub seed: u64,
    /// The rows, one after the other (rows x dim), as half-precision floats (base64, little
    /// endian), rounded before the bandwidth was measured.
    #[serde(serialize_with = "crate::risk::neighbours::to_f16_base64", deserialize_with = "from_f16_base64")]
    #[schema(value_type = String, format = Byte)]
    pub rows: Vec<f32>,
}

impl EmbeddingSample {
    /// The sample of `rows` (row-major, `dim` wide), rounded to half precision, with its
    /// median-heuristic bandwidth.
    pub fn new(rows: &[f32], dim: usize, seed: u64) -> Self {
        assert!(dim > 0 && rows.len().is_multiple_of(dim), "whole rows of dim features");
        let rows: Vec<f32> = rows.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let bandwidth = median_distance(&rows, dim);
        Self { dim, bandwidth, seed, rows }
    }

    /// Rows in the sample.
    pub fn len(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    /// Whether the sample holds no row.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Checks a sample read from a file for a model with `dim` features.
    pub fn validate(&self, dim: usize) -> Result<(), String> {
        if self.dim != dim || !self.rows.len().is_multiple_of(dim.max(1)) {
            return Err(format!("reference.embedding must hold whole rows of the model's {dim} features"));
        }
        if self.len() < 2 {
            return Err("reference.embedding must hold at least 2 rows".into());
        }
        if !(self.bandwidth.is_finite() && self.bandwidth > 0.0) || self.rows.iter().any(|v| !v.is_finite()) {
            return Err("reference.embedding holds a non-finite value or a bandwidth that is not positive".into());
        }
        Ok(())
    }
}

/// The result of one embedding test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MmdTest {
    /// Unbiased MMD² between the window and the reference (kernel units, dimensionless; near 0,
    /// possibly slightly negative, when nothing drifted).
    pub mmd2: f64,
    /// (1 + permutations whose MMD² reached the observed one) / (1 + permutations).
    pub p_value: f64,
}

/// The median Euclidean distance between two different rows; 1 when it is 0 (all rows equal),
/// so the kernel stays defined.
pub fn median_distance(rows: &[f32], dim: usize) -> f32 {
    let z = ArrayView2::from_shape((rows.len() / dim, dim), rows).expect("whole rows");
    let d2 = squared_distances(z);
    let n = z.nrows();
    let mut upper: Vec<f32> = (0..n).flat_map(|i| ((i + 1)..n).map(move |j| (i, j))).map(|(i, j)| d2[[i, j]]).collect();
    if upper.is_empty() {
        return 1.0;
    }
    let mid = upper.len() / 2;
    let (_, &mut m, _) = upper.select_nth_unstable_by(mid, f32::total_cmp);
    let median = m.sqrt();
    if median > 0.0 && median.is_finite() { median } else { 1.0 }
}

/// ||z_i - z_j||² for every pair of rows, from the Gram matrix (one matrix product), clamped at 0
/// against rounding.
fn squared_distances(z: ArrayView2<f32>) -> Array2<f32> {
    let gram = z.dot(&z.t());
    let norms: Vec<f32> = (0..z.nrows()).map(|i| gram[[i, i]]).collect();
    let mut d2 = gram;
    for ((i, j), v) in d2.indexed_iter_mut() {
        *v = (norms[i] + norms[j] - 2.0 * *v).max(0.0);
    }
    for i in 0..z.nrows() {
        d2[[i, i]] = 0.0;
    }
    d2
}

/// The Gaussian kernel matrix of the pooled rows with a zero diagonal (every sum of the unbiased
/// estimator leaves out i = j).
fn kernel_matrix(z: ArrayView2<f32>, bandwidth: f32) -> Array2<f32> {
    let scale = 1.0 / (2.0 * bandwidth * bandwidth);
    let mut k = squared_distances(z);
    k.mapv_inplace(|d2| (-d2 * scale).exp());
    for i in 0..z.nrows() {
        k[[i, i]] = 0.0;
    }
    k
}

/// Unbiased MMD² of a split of the pooled kernel matrix `k` (zero diagonal), given the product
/// `r = k · w` with `w` the split's indicator (1 for the first sample, n of them) and `total`,
/// the sum of `k`:
/// S_xx = sum over first-sample rows of r, S_xy = sum over the others, S_yy = total - S_xx -
/// 2 S_xy, and MMD² = S_xx / (n(n-1)) + S_yy / (m(m-1)) - 2 S_xy / (nm).
fn mmd2_of_split(w: impl Iterator<Item = bool>, r: impl Iterator<Item = f32>, n: usize, m: usize, total: f64) -> f64 {
    let (mut sxx, mut sxy) = (0.0_f64, 0.0_f64);
    for (first, v) in w.zip(r) {
        if first {
            sxx += f64::from(v);
        } else {
            sxy += f64::from(v);
        }
    }
    let syy = total - sxx - 2.0 * sxy;
    let (n, m) = (n as f64, m as f64);
    sxx / (n * (n - 1.0)) + syy / (m * (m - 1.0)) - 2.0 * sxy / (n * m)
}

/// Unbiased MMD² between `x` and `y` (row-major, `dim` wide) under the Gaussian kernel of
/// bandwidth `sigma`. Both need at least 2 rows.
pub fn mmd2(x: &[f32], y: &[f32], dim: usize, sigma: f32) -> f64 {
    test(x, y, dim, sigma, 0, 0).mmd2
}

/// The embedding test of `window` (row-major, the sample's dim wide) against `reference`:
/// MMD² and its permutation p-value over `permutations` seeded random splits of the pooled rows
/// into the window's and the reference's sizes. Deterministic for a seed.
pub fn mmd_test(window: &[f32], reference: &EmbeddingSample, permutations: usize, seed: u64) -> MmdTest {
    test(window, &reference.rows, reference.dim, reference.bandwidth, permutations, seed)
}

fn test(x: &[f32], y: &[f32], dim: usize, sigma: f32, permutations: usize, seed: u64) -> MmdTest {
    let (n, m) = (x.len() / dim, y.len() / dim);
    assert!(n >= 2 && m >= 2, "MMD² needs two rows on each side");
    let pooled: Vec<f32> = x.iter().chain(y).copied().collect();
    let z = ArrayView2::from_shape((n + m, dim), &pooled).expect("whole rows");
    let k = kernel_matrix(z, sigma);
    let total: f64 = k.iter().map(|&v| f64::from(v)).sum();
    // Column 0: the observed split; columns 1..: random permutations of it.
    let mut splits = Array2::<f32>::zeros((n + m, permutations + 1));
    let mut order: Vec<usize> = (0..n + m).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for b in 0..=permutations {
        if b > 0 {
            order.shuffle(&mut rng);
        }
        for &i in &order[..n] {
            splits[[i, b]] = 1.0;
        }
    }
    let r = k.dot(&splits);
    let stat = |b: usize| {
        let column = splits.column(b);
        mmd2_of_split(column.iter().map(|&v| v > 0.5), r.column(b).iter().copied(), n, m, total)
    };
    let observed = stat(0);
    // A permutation reaching the observed value up to rounding counts as reaching it.
    let tolerance = 1e-9 * (1.0 + observed.abs());
    let reached = (1..=permutations).filter(|&b| stat(b) >= observed - tolerance).count();
    MmdTest { mmd2: observed, p_value: (1 + reached) as f64 / (1 + permutations) as f64 }
}

fn from_f16_base64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    crate::risk::neighbours::from_f16_base64_named(d, "reference.embedding.rows")
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    /// x = {0, 1}, y = {0, 3} in one dimension, sigma = 1, k(a, b) = exp(-(a - b)² / 2):
    /// the x pair gives k(0, 1) = e^-1/2, the y pair k(0, 3) = e^-9/2, the four cross pairs
    /// k(0,0) + k(0,3) + k(1,0) + k(1,3) = 1 + e^-9/2 + e^-1/2 + e^-2. Unbiased MMD²:
    /// 2 e^-1/2 / 2 + 2 e^-9/2 / 2 - 2 (1 + e^-9/2 + e^-1/2 + e^-2) / 4.
    #[test]
    fn mmd2_by_hand() {
        let e = |v: f64| (-v).exp();
        let want = e(0.5) + e(4.5) - 0.5 * (1.0 + e(4.5) + e(0.5) + e(2.0));
        let got = mmd2(&[0.0, 1.0], &[0.0, 3.0], 1, 1.0);
        assert!((got - want).abs() < 1e-6, "{got} against {want}");
        // Symmetric in its two samples, and 2-d rows measure the Euclidean distance.
        assert!((mmd2(&[0.0, 3.0], &[0.0, 1.0], 1, 1.0) - want).abs() < 1e-6);
        let planar = mmd2(&[0.0, 0.0, 0.6, 0.8], &[0.0, 0.0, 1.8, 2.4], 2, 1.0);
        assert!((planar - want).abs() < 1e-6, "{planar}");
    }

    /// The median heuristic: rows at 0, 1, 3 on a line have distances 1, 2, 3; the median is 2.
    /// A sample of equal rows falls back to 1.
    #[test]
    fn bandwidth_is_the_median_distance() {
        assert_eq!(median_distance(&[0.0, 1.0, 3.0], 1), 2.0);
        assert_eq!(median_distance(&[2.0, 2.0, 2.0, 2.0], 2), 1.0);
        let s = EmbeddingSample::new(&[0.0, 1.0, 3.0], 1, 7);
        assert_eq!((s.len(), s.bandwidth), (3, 2.0));
        s.validate(1).unwrap();
        assert!(s.validate(2).is_err());
        let back: EmbeddingSample = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    fn gaussian(rows: usize, dim: usize, shift: f32, rng: &mut impl Rng) -> Vec<f32> {
        (0..rows * dim)
            .map(|i| {
                // Box-Muller from two uniforms; the shift moves the first coordinate only.
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                let g = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
                if i % dim == 0 { g + shift } else { g }
            })
            .collect()
    }

    /// The permutation p-value: windows and references drawn from one distribution give p-values
    /// spread over (0, 1] (few small ones, a mean near 1/2; the p-value is uniform over draws of
    /// both, and a fixed reference sample adds its own luck, which the false-alarm measurement in
    /// tests/embedding_drift.rs includes); a window shifted by one standard
    /// deviation along one of 16 axes gives the smallest p-value possible, 1/201. The same seed
    /// gives the same answer.
    #[test]
    fn permutation_p_value_separates_same_from_shifted() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (dim, rows) = (16, 100);
        let mut p_values = Vec::new();
        for trial in 0..40 {
            let reference = EmbeddingSample::new(&gaussian(200, dim, 0.0, &mut rng), dim, 0);
            let window = gaussian(rows, dim, 0.0, &mut rng);
            p_values.push(mmd_test(&window, &reference, 200, trial).p_value);
        }
        let small = p_values.iter().filter(|&&p| p <= 0.05).count();
        let mean = p_values.iter().sum::<f64>() / p_values.len() as f64;
        assert!(small <= 6, "undrifted windows gave {small} of 40 p-values <= 0.05: {p_values:?}");
        assert!((0.3..0.7).contains(&mean), "mean p-value {mean}: {p_values:?}");

        let reference = EmbeddingSample::new(&gaussian(200, dim, 0.0, &mut rng), dim, 0);
        let shifted = gaussian(rows, dim, 1.0, &mut rng);
        let t = mmd_test(&shifted, &reference, 200, 3);
        assert!((t.p_value - 1.0 / 201.0).abs() < 1e-12 && t.mmd2 > 0.01, "{t:?}");
        assert_eq!(mmd_test(&shifted, &reference, 200, 3), t, "deterministic for a seed");
        let same = mmd_test(&gaussian(rows, dim, 0.0, &mut rng), &reference, 200, 3);
        assert!(same.mmd2.abs() < t.mmd2 / 5.0, "{same:?} against {t:?}");
    }
}
