//! The Mahalanobis risk estimator: how far a representation lies from the fit part's bulk, under
//! one Gaussian fitted to the fit part's standardised representations.
//!
//! Lee et al. (NeurIPS 2018) score out-of-distribution inputs by Mahalanobis distance to class
//! Gaussians; this is the class-agnostic form (one Gaussian, no labels), so it reads only the
//! representation. The covariance is shrunk towards a scaled identity with the Ledoit-Wolf
//! estimate (Ledoit & Wolf 2004, scikit-learn's `ledoit_wolf`), which keeps it invertible when
//! features are collinear or d approaches n.
//!
//! The file keeps the mean and the inverse of the covariance's lower Cholesky factor, packed
//! (d (d + 1) / 2 values), as f32 little-endian base64: D^2 = ||L^-1 (z - m)||^2, d^2 / 2
//! multiply-adds per image.

use base64::Engine as _;
use ndarray::Array2;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::linalg;

/// One Gaussian over standardised representations, stored as its whitening transform.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Gaussian {
    /// Size d of the representations.
    pub dim: usize,
    /// Ledoit-Wolf shrinkage delta in [0, 1]: cov = (1 - delta) S + delta (tr S / d) I.
    pub shrinkage: f64,
    /// Mean m of the fit part's standardised representations (d values).
    #[serde(serialize_with = "to_f32_base64", deserialize_with = "from_f32_base64")]
    pub mean: Vec<f32>,
    /// L^-1, the inverse lower Cholesky factor of the shrunk covariance, lower triangle packed
    /// row after row (row i holds i + 1 values).
    #[serde(serialize_with = "to_f32_base64", deserialize_with = "from_f32_base64")]
    pub whitening: Vec<f32>,
}

impl Gaussian {
    /// Fits the Gaussian to `rows` (n x dim, row-major, standardised representations) with
    /// Ledoit-Wolf shrinkage. `None` when there are fewer than two rows, a value is not finite,
    /// or every feature is constant (no covariance to invert).
    pub fn fit(rows: &[f32], dim: usize) -> Option<Self> {
        assert_eq!(rows.len() % dim.max(1), 0, "whole rows");
        let n = rows.len() / dim.max(1);
        if n < 2 || dim == 0 || rows.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut x = Array2::from_shape_fn((n, dim), |(i, j)| f64::from(rows[i * dim + j]));
        let mean = x.mean_axis(ndarray::Axis(0)).expect("n >= 2");
        x -= &mean;
        let s = x.t().dot(&x) / n as f64;
        let d = dim as f64;
        let mu = s.diag().sum() / d;
        // Ledoit-Wolf as scikit-learn computes it: delta = ||S - mu I||_F^2 / d, beta =
        // (mean_k ||x_k||^4 - ||S||_F^2) / (d n), shrinkage = min(beta, delta) / delta.
        let frobenius2: f64 = s.iter().map(|v| v * v).sum();
        let fourth = x.rows().into_iter().map(|r| r.dot(&r).powi(2)).sum::<f64>() / n as f64;
        let delta = (frobenius2 - 2.0 * mu * s.diag().sum() + d * mu * mu) / d;
        let beta = ((fourth - frobenius2) / (d * n as f64)).min(delta);
        let shrinkage = if beta <= 0.0 || delta <= 0.0 { 0.0 } else { beta / delta };
        let mut cov: Vec<f64> = s.iter().map(|v| (1.0 - shrinkage) * v).collect();
        for j in 0..dim {
            cov[j * dim + j] += shrinkage * mu;
        }
        Self::from_covariance(&mean.to_vec(), &cov, shrinkage)
    }

    /// The Gaussian with mean `mean` (d values) and covariance `cov` (d x d, row-major,
    /// symmetric positive-definite); `None` when cov is not positive-definite.
    pub fn from_covariance(mean: &[f64], cov: &[f64], shrinkage: f64) -> Option<Self> {
        let dim = mean.len();
        let inv = linalg::lower_inverse(&linalg::cholesky(cov, dim)?, dim);
        let whitening = (0..dim).flat_map(|i| inv[i * dim..=i * dim + i].iter().map(|&v| v as f32)).collect();
        Some(Self { dim, shrinkage, mean: mean.iter().map(|&m| m as f32).collect(), whitening })
    }

    /// Squared Mahalanobis distance (z - m)^T cov^-1 (z - m) of one standardised representation
    /// `z` (d values); unitless, >= 0. The risk of [`super::RiskSource::Mahalanobis`].
    pub fn distance2(&self, z: &[f32]) -> f32 {
        assert_eq!(z.len(), self.dim, "a representation of the Gaussian's size");
        let centred: Vec<f64> = z.iter().zip(&self.mean).map(|(&v, &m)| f64::from(v) - f64::from(m)).collect();
        let mut total = 0.0;
        let mut start = 0;
        for i in 0..self.dim {
            let row = &self.whitening[start..=start + i];
            let w: f64 = row.iter().zip(&centred).map(|(&a, &b)| f64::from(a) * b).sum();
            total += w * w;
            start += i + 1;
        }
        total as f32
    }

    /// Checks a Gaussian read from a file against the model's d.
    pub fn validate(&self, dim: usize) -> Result<(), String> {
        if self.dim != dim || self.mean.len() != dim || self.whitening.len() != dim * (dim + 1) / 2 {
            return Err(format!(
                "gaussian must hold a mean of the model's {dim} features and {} whitening values",
                dim * (dim + 1) / 2
            ));
        }
        if self.mean.iter().chain(&self.whitening).any(|v| !v.is_finite()) {
            return Err("gaussian holds a value that is not finite".into());
        }
        Ok(())
    }
}

fn to_f32_base64<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn from_f32_base64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let text = String::deserialize(d)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)?;
    if bytes.len() % 4 != 0 {
        return Err(serde::de::Error::custom("gaussian holds a byte count that is not a multiple of 4"));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean 0, covariance [[4, 2], [2, 3]]: its inverse is [[3/8, -1/4], [-1/4, 1/2]], so
    /// D^2(1, 1) = 3/8 - 2/4 + 1/2 = 0.375, D^2(2, 0) = 4 * 3/8 = 1.5, D^2(0, 1) = 0.5.
    #[test]
    fn mahalanobis_by_hand() {
        let g = Gaussian::from_covariance(&[0.0, 0.0], &[4.0, 2.0, 2.0, 3.0], 0.0).unwrap();
        g.validate(2).unwrap();
        assert!((g.distance2(&[1.0, 1.0]) - 0.375).abs() < 1e-6);
        assert!((g.distance2(&[2.0, 0.0]) - 1.5).abs() < 1e-6);
        assert!((g.distance2(&[0.0, 1.0]) - 0.5).abs() < 1e-6);
        let shifted = Gaussian::from_covariance(&[1.0, 1.0], &[4.0, 2.0, 2.0, 3.0], 0.0).unwrap();
        assert_eq!(shifted.distance2(&[1.0, 1.0]), 0.0);
        assert!(g.validate(3).is_err());
    }

    /// Rows (2, 0), (-2, 0), (0, 1), (0, -1): mean 0, S = diag(2, 0.5), mu = 1.25,
    /// delta = (0.75^2 + 0.75^2) / 2 = 0.5625, mean ||x||^4 = (16 + 16 + 1 + 1) / 4 = 8.5,
    /// beta = (8.5 - 4.25) / (2 * 4) = 0.53125, shrinkage = 0.53125 / 0.5625 = 17/18. The shrunk
    /// covariance is diag(2/18 + 17/18 * 1.25, 0.5/18 + 17/18 * 1.25) = diag(23.25, 21.75) / 18,
    /// so D^2(1, 0) = 18 / 23.25 and D^2(0, 1) = 18 / 21.75.
    #[test]
    fn ledoit_wolf_by_hand() {
        let g = Gaussian::fit(&[2.0, 0.0, -2.0, 0.0, 0.0, 1.0, 0.0, -1.0], 2).unwrap();
        assert!((g.shrinkage - 17.0 / 18.0).abs() < 1e-12, "{}", g.shrinkage);
        assert!((g.distance2(&[1.0, 0.0]) - 18.0 / 23.25).abs() < 1e-6);
        assert!((g.distance2(&[0.0, 1.0]) - 18.0 / 21.75).abs() < 1e-6);
        assert!(Gaussian::fit(&[1.0, 1.0, 1.0, 1.0], 2).is_none(), "constant features");
    }

    #[test]
    fn round_trips_through_json() {
        let g = Gaussian::from_covariance(&[0.5, -1.0], &[4.0, 2.0, 2.0, 3.0], 0.25).unwrap();
        let back: Gaussian = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }
}
