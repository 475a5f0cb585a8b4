//! Isotonic regression: the monotone map from a risk estimator's value to p(misclassified).
//!
//! Fitting follows scikit-learn's `IsotonicRegression(increasing=True, out_of_bounds="clip")`:
//! equal x values are pooled first (mean y), the pool-adjacent-violators algorithm makes the
//! fitted values non-decreasing, and only the knots where the fitted line bends are kept.
//! Applying the map interpolates linearly between knots and clips outside them. Pure maths.

use serde::{Deserialize, Serialize};

/// A piecewise-linear monotone map: x ascending, y the fitted value at each x.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct IsotonicMap {
    /// Knots, strictly ascending.
    pub x: Vec<f32>,
    /// Fitted values at the knots, in [0, 1], monotone.
    pub y: Vec<f32>,
}

impl IsotonicMap {
    /// Fits a non-decreasing map to the pairs (x_i, y_i). `None` when there is no finite pair.
    pub fn fit(x: &[f64], y: &[f64]) -> Option<Self> {
        assert_eq!(x.len(), y.len(), "one y per x");
        let mut pairs: Vec<(f64, f64)> =
            x.iter().copied().zip(y.iter().copied()).filter(|(a, _)| a.is_finite()).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));

        // Pool ties in x: each block is (x, mean y, weight).
        let mut blocks: Vec<(f64, f64, f64)> = Vec::new();
        for group in pairs.chunk_by(|a, b| a.0 == b.0) {
            let w = group.len() as f64;
            blocks.push((group[0].0, group.iter().map(|p| p.1).sum::<f64>() / w, w));
        }
        if blocks.is_empty() {
            return None;
        }

        // Pool adjacent violators; `runs` holds (mean, weight, number of x values pooled).
        let mut runs: Vec<(f64, f64, usize)> = Vec::with_capacity(blocks.len());
        for &(_, v, w) in &blocks {
            runs.push((v, w, 1));
            while runs.len() > 1 && runs[runs.len() - 2].0 > runs[runs.len() - 1].0 {
                let (v2, w2, n2) = runs.pop().expect("two runs");
                let (v1, w1, n1) = runs.pop().expect("two runs");
                runs.push(((v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2));
            }
        }
        let fitted: Vec<f64> = runs.iter().flat_map(|&(v, _, n)| std::iter::repeat_n(v, n)).collect();

        // Keep a knot where the fitted value differs from a neighbour's, and both ends.
        let last = blocks.len() - 1;
        let (mut kx, mut ky) = (Vec::new(), Vec::new());
        for i in 0..blocks.len() {
            let keep = i == 0 || i == last || fitted[i] != fitted[i - 1] || fitted[i] != fitted[i + 1];
            if keep {
                kx.push(blocks[i].0 as f32);
                ky.push(fitted[i] as f32);
            }
        }
        // x values distinct in f64 may meet in f32; keep the first of each.
        let mut map = Self { x: Vec::with_capacity(kx.len()), y: Vec::with_capacity(ky.len()) };
        for (x, y) in kx.into_iter().zip(ky) {
            if map.x.last() != Some(&x) {
                map.x.push(x);
                map.y.push(y);
            }
        }
        Some(map)
    }

    /// The fitted value at `v`: linear between knots, the end values outside them.
    pub fn apply(&self, v: f32) -> f32 {
        let (x, y) = (&self.x, &self.y);
        if v.is_nan() {
            // Never a valid estimator value; answer the riskier end rather than panic below.
            return y[y.len() - 1].max(y[0]);
        }
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

    /// Checks a map read from a file: equal non-empty lengths, strictly ascending x, y a
    /// monotone probability.
    pub fn validate(&self) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(x: &[f32], y: &[f32]) -> IsotonicMap {
        IsotonicMap { x: x.to_vec(), y: y.to_vec() }
    }

    /// y = [1, 0, 1, 0, 1] at x = 1..5. PAVA: (1, 0) pool to 0.5; 1 stands; (1, 0) pool to 0.5,
    /// which ties the run before it (allowed); 1 stands: fitted [.5, .5, .5, .5, 1]. Knots: x = 1
    /// (end), 4 (next value differs), 5 (end). At 4.5: halfway from 0.5 to 1 = 0.75.
    #[test]
    fn pava_by_hand() {
        let m = IsotonicMap::fit(&[1.0, 2.0, 3.0, 4.0, 5.0], &[1.0, 0.0, 1.0, 0.0, 1.0]).unwrap();
        assert_eq!(m, map(&[1.0, 4.0, 5.0], &[0.5, 0.5, 1.0]));
        assert!((m.apply(4.5) - 0.75).abs() < 1e-6);
        m.validate().unwrap();
    }

    /// Ties in x pool first: x = [1, 1, 2, 3], y = [1, 0, 0, 1] gives blocks (1, 0.5, w2),
    /// (2, 0), (3, 1); PAVA pools (0.5 w2, 0 w1) to 1/3: fitted [1/3, 1/3, 1]; knots 1, 2, 3.
    /// Input order does not matter.
    #[test]
    fn ties_pool_with_weights() {
        let m = IsotonicMap::fit(&[3.0, 1.0, 2.0, 1.0], &[1.0, 1.0, 0.0, 0.0]).unwrap();
        assert_eq!(m.x, vec![1.0, 2.0, 3.0]);
        assert!((m.y[0] - 1.0 / 3.0).abs() < 1e-6 && (m.y[1] - 1.0 / 3.0).abs() < 1e-6 && m.y[2] == 1.0);
    }

    /// Already monotone data is kept as is; a constant stays one flat line.
    #[test]
    fn monotone_and_constant() {
        let m = IsotonicMap::fit(&[0.0, 1.0, 2.0], &[0.0, 0.5, 1.0]).unwrap();
        assert_eq!(m, map(&[0.0, 1.0, 2.0], &[0.0, 0.5, 1.0]));
        let flat = IsotonicMap::fit(&[0.0, 1.0, 2.0, 3.0], &[0.2; 4]).unwrap();
        assert_eq!(flat, map(&[0.0, 3.0], &[0.2, 0.2]));
        assert!(IsotonicMap::fit(&[f64::NAN], &[1.0]).is_none());
    }

    /// Knots (1, 0.8), (3, 0.4), (5, 0.0): at 2, halfway = 0.6; at 4.5, 0.4 - 0.75 * 0.4 = 0.1;
    /// clipped outside.
    #[test]
    fn interpolates_and_clips() {
        let m = map(&[1.0, 3.0, 5.0], &[0.8, 0.4, 0.0]);
        m.validate().unwrap();
        assert_eq!(m.apply(-10.0), 0.8);
        assert!((m.apply(2.0) - 0.6).abs() < 1e-6);
        assert!((m.apply(4.5) - 0.1).abs() < 1e-6);
        assert_eq!(m.apply(99.0), 0.0);
        assert_eq!(map(&[2.0], &[0.3]).apply(7.0), 0.3);
    }

    #[test]
    fn rejects_bad_maps() {
        assert!(map(&[1.0, 1.0], &[0.1, 0.2]).validate().is_err(), "x not strictly ascending");
        assert!(map(&[1.0, 2.0, 3.0], &[0.1, 0.5, 0.2]).validate().is_err(), "not monotone");
        assert!(map(&[1.0, 2.0], &[0.1, 1.5]).validate().is_err(), "not a probability");
        assert!(map(&[], &[]).validate().is_err());
        assert!(map(&[1.0, 2.0], &[0.1]).validate().is_err());
    }
}
