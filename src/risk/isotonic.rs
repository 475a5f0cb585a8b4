//! Isotonic regression: the monotone map from a risk estimator's value to p(misclassified).
//!
//! Fitting follows scikit-learn's `IsotonicRegression(increasing=True, out_of_bounds="clip")`:
//! equal x values are pooled first (mean y), the pool-adjacent-violators algorithm makes the
//! fitted values non-decreasing, and only the knots where the fitted line bends are kept.
//! Applying the map interpolates linearly between knots and clips outside them. Pure maths.
//!
//! [`IsotonicMap::fit_shrunk`] adds one step calibration uses: PAVA's plateaus at the ends are
//! often a handful of images (a select part's top block of 23 images, all wrong, answers
//! p = 1.0, and 87% of the test images that land there were wrong), so each plateau's value is
//! shrunk toward the overall rate with a Beta prior of strength `a`: (k + a * base) / (n + a),
//! k the plateau's sum of y and n its images. Plateaus of hundreds of images barely move.

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
    /// Fits a non-decreasing map to the pairs (x_i, y_i), exactly as scikit-learn does. `None`
    /// when there is no finite pair.
    pub fn fit(x: &[f64], y: &[f64]) -> Option<Self> {
        Self::fit_shrunk(x, y, 0.0)
    }

    /// Fits a non-decreasing map whose plateaus are shrunk toward the overall mean of y.
    ///
    /// `x`, `y`: one pair per image (y in [0, 1]; 1 = misclassified); pairs with a non-finite x
    /// are left out. `prior`: the prior strength a, in images (0 gives [`IsotonicMap::fit`]).
    /// Steps: (1) scikit-learn's fit (ties in x pooled, PAVA); (2) adjacent runs with the same
    /// fitted value joined into plateaus, each with its sum of y, k, and its count, n; (3) each
    /// plateau's value set to (k + a * base) / (n + a), base = mean y over all pairs; (4) where
    /// that breaks the order (a small plateau shrinks past a larger one below it), the two are
    /// pooled, their k and n summed and the value shrunk again, until the values ascend. So every
    /// fitted value is (k + a * base) / (n + a) over the images it covers, and the map stays
    /// monotone. The Beta(a * base, a * (1 - base)) prior is the standard shrinkage of a
    /// binomial rate; a = 5 moves a 23-of-23 block at base 0.15 to 0.85.
    pub fn fit_shrunk(x: &[f64], y: &[f64], prior: f64) -> Option<Self> {
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
        if prior > 0.0 {
            runs = shrink(&runs, prior, pairs.iter().map(|p| p.1).sum::<f64>() / pairs.len() as f64);
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

/// Steps 2 to 4 of [`IsotonicMap::fit_shrunk`] over PAVA's runs (mean, weight, x values).
fn shrink(runs: &[(f64, f64, usize)], prior: f64, base: f64) -> Vec<(f64, f64, usize)> {
    // Plateaus as (sum of y, weight, x values): equal neighbours are one block of images, and
    // it is the block's size that says how much to trust its rate.
    let mut plateaus: Vec<(f64, f64, usize)> = Vec::with_capacity(runs.len());
    let mut last_value = f64::NAN;
    for &(v, w, n) in runs {
        match plateaus.last_mut() {
            Some(last) if last_value == v => {
                last.0 += v * w;
                last.1 += w;
                last.2 += n;
            }
            _ => plateaus.push((v * w, w, n)),
        }
        last_value = v;
    }
    let value = |k: f64, w: f64| (k + prior * base) / (w + prior);
    let mut out: Vec<(f64, f64, usize)> = Vec::with_capacity(plateaus.len());
    for &(k, w, n) in &plateaus {
        out.push((k, w, n));
        while out.len() > 1 && {
            let (a, b) = (out[out.len() - 2], out[out.len() - 1]);
            value(a.0, a.1) > value(b.0, b.1)
        } {
            let (k2, w2, n2) = out.pop().expect("two plateaus");
            let (k1, w1, n1) = out.pop().expect("two plateaus");
            out.push((k1 + k2, w1 + w2, n1 + n2));
        }
    }
    out.into_iter().map(|(k, w, n)| (value(k, w), w, n)).collect()
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

    /// The audited case: 1,000 select images tied at risk 0 with 130 mistakes, then a top block
    /// of 23 images (risk 1..=23), all wrong. scikit-learn's map answers 1.0 for all 23. With
    /// a = 5 the block is one plateau, k = n = 23, base = 153 / 1023: (23 + 5 * 153/1023) / 28
    /// = 0.84814; the big block moves from 0.13 to (130 + 0.7478) / 1005 = 0.13010.
    #[test]
    fn small_end_block_shrinks_toward_the_base_rate() {
        let mut x = vec![0.0; 1000];
        let mut y: Vec<f64> = (0..1000).map(|i| f64::from(u8::from(i < 130))).collect();
        x.extend((1..=23).map(f64::from));
        y.extend([1.0; 23]);
        assert_eq!(IsotonicMap::fit(&x, &y).unwrap().apply(23.0), 1.0);
        let m = IsotonicMap::fit_shrunk(&x, &y, 5.0).unwrap();
        let base = 153.0 / 1023.0;
        assert!((f64::from(m.apply(23.0)) - (23.0 + 5.0 * base) / 28.0).abs() < 1e-6, "{m:?}");
        assert!((f64::from(m.apply(1.0)) - 0.848_14).abs() < 1e-5);
        assert!((f64::from(m.apply(0.0)) - (130.0 + 5.0 * base) / 1005.0).abs() < 1e-6);
        m.validate().unwrap();
    }

    /// x = 1..=9, y = [0, 0, 0, 0, 1, 1, 1, 0, 1], a = 2, base = 4/9 (a * base = 8/9).
    /// PAVA: four 0 runs, then (1, 1, 1, 0) pooled to 3/4, then 1. Plateaus: the four zeros
    /// (k 0, n 4), (k 3, n 4), (k 1, n 1). Shrunk: (8/9) / 6 = 4/27, (3 + 8/9) / 6 = 35/54 =
    /// 0.6481, (1 + 8/9) / 3 = 17/27 = 0.6296: the lone top image fell below the block under
    /// it, so the two pool (k 4, n 5): (4 + 8/9) / 7 = 44/63. Knots: 1, 4 (4/27) and 5, 9 (44/63).
    #[test]
    fn shrinking_by_hand_repools_what_it_disorders() {
        let x: Vec<f64> = (1..=9).map(f64::from).collect();
        let y = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let m = IsotonicMap::fit_shrunk(&x, &y, 2.0).unwrap();
        assert_eq!(m.x, vec![1.0, 4.0, 5.0, 9.0]);
        let want = [4.0 / 27.0, 4.0 / 27.0, 44.0 / 63.0, 44.0 / 63.0];
        for (got, want) in m.y.iter().zip(want) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{m:?}");
        }
        // Without the prior: scikit-learn's [0 x4, 3/4 x4, 1].
        assert_eq!(IsotonicMap::fit(&x, &y).unwrap(), map(&[1.0, 4.0, 5.0, 8.0, 9.0], &[0.0, 0.0, 0.75, 0.75, 1.0]));
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
