//! The stacked risk estimator: a binary logistic regression over the other estimators' risk
//! values, fitted to the mistakes on the select part.
//!
//! Each single estimator sees one side of an image (the probe's softmax, the neighbourhood, the
//! distance from the bulk); a linear combination of them can rank mistakes better than any one
//! (stacked generalisation, Wolpert 1992). Its weights are learnt on the same select part that
//! chooses between estimators, so its select AUPRC is measured by K-fold cross-fitting: each
//! fold is scored by a regression fitted on the other folds, and those out-of-fold values are
//! what its select AUPRC, isotonic map and threshold are fitted on. The served model is refitted
//! on the whole select part.
//!
//! The regression minimises `sum log-loss + alpha/2 ||w||^2` (intercept unpenalised) by Newton's
//! method with step halving: with about a dozen inputs the Hessian is tiny, and the penalty keeps
//! the optimum finite when the mistakes are linearly separable. Inputs are standardised with
//! their mean and population standard deviation on the rows it is fitted on. Pure maths.

use ndarray::ArrayView2;
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{RiskSource, linalg};

/// Newton iterations before giving up on convergence (it converges in well under 30).
const MAX_ITERATIONS: usize = 100;

/// A fitted stacked regression: which estimators it reads, their standardisation, its weights.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Stacked {
    /// The estimators whose risk values it reads, in weight order.
    pub inputs: Vec<RiskSource>,
    /// Mean of each input on the rows it was fitted on.
    pub mean: Vec<f32>,
    /// Population standard deviation of each input there (1 where 0).
    pub scale: Vec<f32>,
    /// One weight per standardised input.
    pub weights: Vec<f32>,
    /// The intercept.
    pub bias: f32,
    /// L2 penalty it was fitted with.
    pub alpha: f64,
}

impl Stacked {
    /// Fits the regression to `x` (n rows x one column per entry of `inputs`, risk values) and
    /// `wrong` (n flags, the positive class). `None` when both classes are not present or a
    /// value is not finite.
    pub fn fit(inputs: &[RiskSource], x: ArrayView2<f32>, wrong: &[bool], alpha: f64) -> Option<Self> {
        let (n, m) = x.dim();
        assert_eq!(m, inputs.len(), "one column per input");
        assert_eq!(n, wrong.len(), "one flag per row");
        if !wrong.contains(&true) || !wrong.contains(&false) || x.iter().any(|v| !v.is_finite()) {
            return None;
        }
        // Rounded to f32 before use, so training standardises exactly as serving will.
        let mean: Vec<f32> =
            (0..m).map(|j| (x.column(j).iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64) as f32).collect();
        let scale: Vec<f32> = (0..m)
            .map(|j| {
                let mu = f64::from(mean[j]);
                let var = x.column(j).iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>() / n as f64;
                if var > 0.0 && var.is_finite() { var.sqrt() as f32 } else { 1.0 }
            })
            .collect();
        let z: Vec<Vec<f64>> = x
            .rows()
            .into_iter()
            .map(|r| r.iter().zip(mean.iter().zip(&scale)).map(|(&v, (&mu, &s))| standard(v, mu, s)).collect())
            .collect();
        let y: Vec<f64> = wrong.iter().map(|&w| f64::from(u8::from(w))).collect();
        let theta = newton(&z, &y, alpha)?;
        Some(Self {
            inputs: inputs.to_vec(),
            mean,
            scale,
            weights: theta[1..].iter().map(|&w| w as f32).collect(),
            bias: theta[0] as f32,
            alpha,
        })
    }

    /// The risk: the regression's logit of p(misclassified) for one image's input risk values
    /// (one per entry of `inputs`, in order). Unbounded, higher = riskier; the isotonic map turns
    /// it into a probability.
    pub fn risk(&self, values: &[f32]) -> f32 {
        assert_eq!(values.len(), self.inputs.len(), "one value per input");
        let eta: f64 = f64::from(self.bias)
            + values
                .iter()
                .zip(&self.weights)
                .zip(self.mean.iter().zip(&self.scale))
                .map(|((&v, &w), (&mu, &s))| f64::from(w) * standard(v, mu, s))
                .sum::<f64>();
        eta as f32
    }

    /// Checks a stacked model read from a file: matching lengths, finite values, and no input
    /// that is itself stacked.
    pub fn validate(&self) -> Result<(), String> {
        let m = self.inputs.len();
        if m == 0 || self.mean.len() != m || self.scale.len() != m || self.weights.len() != m {
            return Err("stacked must hold one mean, scale and weight per input".into());
        }
        if self.inputs.contains(&RiskSource::Stacked) || self.inputs.contains(&RiskSource::Sirc) {
            return Err("stacked.inputs may not hold stacked or sirc".into());
        }
        let finite = self.mean.iter().chain(&self.weights).all(|v| v.is_finite()) && self.bias.is_finite();
        if !finite || self.scale.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err("stacked holds a value that is not finite (or a scale that is not positive)".into());
        }
        Ok(())
    }
}

/// Out-of-fold risk values of the stacked regression on `x` (n x inputs) with K-fold
/// cross-fitting: folds from [`folds`] with `k` and `seed`, each fold's rows scored by
/// [`Stacked::fit`] on the other folds. `None` when a fit fails (a training fold without both
/// classes, or a value that is not finite).
pub fn cross_fit(
    inputs: &[RiskSource],
    x: ArrayView2<f32>,
    wrong: &[bool],
    k: usize,
    seed: u64,
    alpha: f64,
) -> Option<Vec<f32>> {
    let fold = folds(wrong, k, seed);
    let mut out = vec![f32::NAN; wrong.len()];
    for f in 0..k {
        let train: Vec<usize> = (0..wrong.len()).filter(|&i| fold[i] != f).collect();
        let held: Vec<usize> = (0..wrong.len()).filter(|&i| fold[i] == f).collect();
        if held.is_empty() {
            continue;
        }
        let y: Vec<bool> = train.iter().map(|&i| wrong[i]).collect();
        let model = Stacked::fit(inputs, x.select(ndarray::Axis(0), &train).view(), &y, alpha)?;
        for i in held {
            out[i] = model.risk(x.row(i).as_slice().expect("rows of a standard-layout array"));
        }
    }
    Some(out)
}

/// Fold (0..k) of each row, stratified by `wrong`: each class is shuffled with a ChaCha8 stream
/// seeded by `seed` and dealt round-robin, the second class continuing where the first stopped,
/// so every fold gets its share of mistakes and of rows (sizes differ by at most one).
pub fn folds(wrong: &[bool], k: usize, seed: u64) -> Vec<usize> {
    assert!(k >= 1, "at least one fold");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut fold = vec![0; wrong.len()];
    let mut next = 0;
    for class in [true, false] {
        let mut rows: Vec<usize> = (0..wrong.len()).filter(|&i| wrong[i] == class).collect();
        rows.shuffle(&mut rng);
        for i in rows {
            fold[i] = next % k;
            next += 1;
        }
    }
    fold
}

fn standard(v: f32, mean: f32, scale: f32) -> f64 {
    (f64::from(v) - f64::from(mean)) / f64::from(scale)
}

/// Minimises the penalised log-loss over (intercept, weights) by Newton's method with step
/// halving; `None` when the Hessian cannot be factored.
fn newton(z: &[Vec<f64>], y: &[f64], alpha: f64) -> Option<Vec<f64>> {
    let m = z.first().map_or(0, Vec::len);
    let p = m + 1;
    let mut theta = vec![0.0; p];
    let eta = |theta: &[f64], row: &[f64]| theta[0] + row.iter().zip(&theta[1..]).map(|(a, b)| a * b).sum::<f64>();
    let loss = |theta: &[f64]| {
        let data: f64 = z
            .iter()
            .zip(y)
            .map(|(row, &y)| {
                let e = eta(theta, row);
                // log(1 + e^e) - y e, stable for either sign.
                e.max(0.0) + (-e.abs()).exp().ln_1p() - y * e
            })
            .sum();
        data + 0.5 * alpha * theta[1..].iter().map(|w| w * w).sum::<f64>()
    };
    let mut current = loss(&theta);
    for _ in 0..MAX_ITERATIONS {
        let mut grad = vec![0.0; p];
        let mut hess = vec![0.0; p * p];
        for (row, &y) in z.iter().zip(y) {
            let mu = 1.0 / (1.0 + (-eta(&theta, row)).exp());
            let w = mu * (1.0 - mu);
            let x = std::iter::once(1.0).chain(row.iter().copied()).collect::<Vec<f64>>();
            for a in 0..p {
                grad[a] += (mu - y) * x[a];
                for b in 0..=a {
                    hess[a * p + b] += w * x[a] * x[b];
                }
            }
        }
        for a in 1..p {
            grad[a] += alpha * theta[a];
            hess[a * p + a] += alpha;
        }
        // A whisker of ridge on every diagonal keeps the factorisation alive when the fitted
        // probabilities saturate; it moves the optimum by far less than f32 resolution.
        for a in 0..p {
            hess[a * p + a] += 1e-9;
            for b in 0..a {
                hess[b * p + a] = hess[a * p + b];
            }
        }
        let step = linalg::cholesky_solve(&linalg::cholesky(&hess, p)?, p, &grad);
        let mut t = 1.0;
        let mut moved = false;
        while t > 1e-10 {
            let trial: Vec<f64> = theta.iter().zip(&step).map(|(a, s)| a - t * s).collect();
            let l = loss(&trial);
            if l <= current {
                moved = l < current;
                (theta, current) = (trial, l);
                break;
            }
            t *= 0.5;
        }
        if !moved || step.iter().map(|s| (t * s).abs()).fold(0.0, f64::max) < 1e-10 {
            break;
        }
    }
    theta.iter().all(|v| v.is_finite()).then_some(theta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn column(v: &[f32]) -> Array2<f32> {
        Array2::from_shape_vec((v.len(), 1), v.to_vec()).unwrap()
    }

    /// x = (0, 0, 0, 1, 1, 1), wrong = (T, F, F, T, T, F), no penalty: mean 0.5, scale 0.5, so
    /// z = -1 / +1; the maximum-likelihood logits are the groups' log-odds, ln(1/2) and ln 2,
    /// hence bias 0 and weight ln 2.
    #[test]
    fn inseparable_by_hand() {
        let x = column(&[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let wrong = [true, false, false, true, true, false];
        let s = Stacked::fit(&[RiskSource::MaxSoftmax], x.view(), &wrong, 0.0).unwrap();
        s.validate().unwrap();
        assert_eq!((s.mean[0], s.scale[0]), (0.5, 0.5));
        assert!(s.bias.abs() < 1e-6 && (s.weights[0] - 2f32.ln()).abs() < 1e-6, "{s:?}");
        assert!((s.risk(&[1.0]) - 2f32.ln()).abs() < 1e-6);
        assert!((s.risk(&[0.0]) + 2f32.ln()).abs() < 1e-6);
    }

    /// x = (0, 1, 2, 3), wrong = (F, F, T, T): separable, so without a penalty the weight would
    /// run off to infinity; with alpha = 1 it stays finite, positive, and by symmetry around
    /// x = 1.5 the bias is 0 (risk(0) = -risk(3)).
    #[test]
    fn separable_stays_finite() {
        let x = column(&[0.0, 1.0, 2.0, 3.0]);
        let wrong = [false, false, true, true];
        let s = Stacked::fit(&[RiskSource::Knn], x.view(), &wrong, 1.0).unwrap();
        assert!(s.weights[0].is_finite() && s.weights[0] > 0.5, "{s:?}");
        assert!(s.bias.abs() < 1e-5 && (s.risk(&[0.0]) + s.risk(&[3.0])).abs() < 1e-5);
        assert!(s.risk(&[1.0]) < 0.0 && s.risk(&[2.0]) > 0.0);
        assert!(Stacked::fit(&[RiskSource::Knn], x.view(), &[true; 4], 1.0).is_none(), "one class");
    }

    /// Folds are stratified and fixed by the seed; cross-fitting is deterministic, and every row
    /// gets an out-of-fold value.
    #[test]
    fn cross_fitting_is_deterministic_and_stratified() {
        let wrong: Vec<bool> = (0..50).map(|i| i % 5 == 0).collect();
        let f = folds(&wrong, 5, 7);
        for k in 0..5 {
            let rows = f.iter().filter(|&&v| v == k).count();
            let mistakes = f.iter().zip(&wrong).filter(|&(&v, &w)| v == k && w).count();
            assert_eq!((rows, mistakes), (10, 2), "fold {k}");
        }
        assert_eq!(folds(&wrong, 5, 7), f);
        assert_ne!(folds(&wrong, 5, 8), f);
        let x =
            Array2::from_shape_fn((50, 2), |(i, j)| ((i * 7 + j * 3) % 11) as f32 + if wrong[i] { 3.0 } else { 0.0 });
        let inputs = [RiskSource::Knn, RiskSource::Margin];
        let a = cross_fit(&inputs, x.view(), &wrong, 5, 7, 1.0).unwrap();
        assert_eq!(a, cross_fit(&inputs, x.view(), &wrong, 5, 7, 1.0).unwrap());
        assert!(a.iter().all(|v| v.is_finite()));
    }
}
