//! The linear probe: multinomial logistic regression on standardised representations.
//!
//! The paper judges a representation by whether a linear classifier on top of it gets the image
//! right; calibration trains that classifier on labelled data and the server answers its
//! prediction. Training uses `linfa-logistic` (L-BFGS on `sum log-loss + alpha/2 ||W||^2`, the
//! intercept unpenalised, i.e. scikit-learn's `LogisticRegression(C = 1/alpha)`). linfa speaks
//! ndarray 0.16 while the rest of qscore speaks 0.17: the two meet in [`Probe::train`] only,
//! through plain slices.

use linfa::{DatasetBase, traits::Fit};
use linfa_logistic::MultiLogisticRegression;
use ndarray::{ArrayView1, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

/// A trained probe: standardisation, then one linear score per class, then softmax.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Probe {
    /// Class names, in the order of the weight rows.
    pub classes: Vec<String>,
    /// Per-feature mean of the training representations.
    pub mean: Vec<f32>,
    /// Per-feature population standard deviation of the training representations (1 where 0).
    pub scale: Vec<f32>,
    /// One row of d weights per class.
    pub weights: Vec<Vec<f32>>,
    /// One intercept per class.
    pub bias: Vec<f32>,
    /// L2 penalty it was trained with.
    pub alpha: f64,
}

/// Above this many training rows, L-BFGS starts from the solution on an evenly spaced subsample.
const WARM_START_ROWS: usize = 5000;

/// The probe's answer for one representation.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Index of the most probable class.
    pub class: usize,
    /// Softmax probability of every class.
    pub probabilities: Vec<f32>,
}

impl Prediction {
    /// Probability of the predicted class.
    pub fn confidence(&self) -> f32 {
        self.probabilities[self.class]
    }

    /// The softmax of `logits` (one per class, at least one) and its top class, the first on
    /// ties. Computed in f64 after subtracting the largest logit, so no logit overflows.
    pub fn from_logits(logits: &[f64]) -> Self {
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        let probabilities: Vec<f32> = exp.iter().map(|&e| (e / total) as f32).collect();
        let class = logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
        Self { class, probabilities }
    }

    /// Top-1 minus top-2 probability.
    pub fn margin(&self) -> f32 {
        let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for &p in &self.probabilities {
            if p > first {
                (first, second) = (p, first);
            } else if p > second {
                second = p;
            }
        }
        if second.is_finite() { first - second } else { first }
    }
}

/// Settings of probe training.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// L2 penalty (scikit-learn's 1/C).
    pub alpha: f64,
    /// L-BFGS iteration cap.
    pub max_iterations: u64,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self { alpha: 1.0, max_iterations: 500 }
    }
}

impl Probe {
    /// Trains on `x` (n x d) with labels in `0..classes.len()`.
    pub fn train(
        x: ArrayView2<f32>,
        labels: &[usize],
        classes: &[String],
        settings: ProbeSettings,
    ) -> anyhow::Result<Self> {
        let (n, d) = x.dim();
        anyhow::ensure!(n == labels.len(), "{n} representations but {} labels", labels.len());
        anyhow::ensure!(labels.iter().all(|&c| c < classes.len()), "a label is past the class list");
        anyhow::ensure!(classes.len() >= 2, "the probe needs at least two classes");
        if let Some(empty) = (0..classes.len()).find(|c| !labels.contains(c)) {
            anyhow::bail!("class {} has no training example; every class needs some", classes[empty]);
        }

        let mean: Vec<f64> =
            (0..d).map(|j| x.column(j).iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64).collect();
        let scale: Vec<f64> = (0..d)
            .map(|j| {
                let var = x.column(j).iter().map(|&v| (f64::from(v) - mean[j]).powi(2)).sum::<f64>() / n as f64;
                if var > 0.0 { var.sqrt() } else { 1.0 }
            })
            .collect();
        let mut standard = Vec::with_capacity(n * d);
        for row in x.axis_iter(Axis(0)) {
            standard.extend(row.iter().enumerate().map(|(j, &v)| (f64::from(v) - mean[j]) / scale[j]));
        }

        let records = ndarray016::Array2::from_shape_vec((n, d), standard)?;
        let targets = ndarray016::Array1::from_vec(labels.to_vec());
        let fit = |records: ndarray016::Array2<f64>, targets: ndarray016::Array1<usize>, start| {
            let mut lr =
                MultiLogisticRegression::default().alpha(settings.alpha).max_iterations(settings.max_iterations);
            if let Some(params) = start {
                lr = lr.initial_params(params);
            }
            lr.fit(&DatasetBase::new(records, targets))
                .map_err(|e| anyhow::anyhow!("training the linear probe failed: {e}"))
        };
        // On large sets L-BFGS can run out of iterations long before it converges (the summed
        // loss grows with n, the penalty does not); starting from the solution on an evenly
        // spaced subsample gets much closer within the same budget.
        let start = if n > WARM_START_ROWS {
            let step = n as f64 / WARM_START_ROWS as f64;
            let rows: Vec<usize> = (0..WARM_START_ROWS).map(|i| (i as f64 * step) as usize).collect();
            let sub_y: Vec<usize> = rows.iter().map(|&r| labels[r]).collect();
            if (0..classes.len()).all(|c| sub_y.contains(&c)) {
                let sub = records.select(ndarray016::Axis(0), &rows);
                let small = fit(sub, ndarray016::Array1::from_vec(sub_y), None)?;
                let mut params = ndarray016::Array2::<f64>::zeros((d + 1, small.classes().len()));
                params.slice_mut(ndarray016::s![..d, ..]).assign(small.params());
                params.row_mut(d).assign(small.intercept());
                Some(params)
            } else {
                None
            }
        } else {
            None
        };
        let fitted = fit(records, targets, start)?;

        // Columns of linfa's (d x k) parameters follow its own sorted class list.
        let mut weights = vec![vec![0.0_f32; d]; classes.len()];
        let mut bias = vec![0.0_f32; classes.len()];
        for (col, &class) in fitted.classes().iter().enumerate() {
            weights[class] = fitted.params().column(col).iter().map(|&w| w as f32).collect();
            bias[class] = fitted.intercept()[col] as f32;
        }
        Ok(Self {
            classes: classes.to_vec(),
            mean: mean.iter().map(|&m| m as f32).collect(),
            scale: scale.iter().map(|&s| s as f32).collect(),
            weights,
            bias,
            alpha: settings.alpha,
        })
    }

    /// Size d of the representations it takes.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// h standardised with the training mean and scale.
    pub fn standardise(&self, h: ArrayView1<f32>) -> Vec<f32> {
        h.iter().zip(self.mean.iter().zip(&self.scale)).map(|(&v, (&m, &s))| (v - m) / s).collect()
    }

    /// The probe's prediction for one representation.
    pub fn predict(&self, h: ArrayView1<f32>) -> Prediction {
        self.predict_standardised(&self.standardise(h))
    }

    /// The prediction for a representation already standardised (for callers that also need z,
    /// like the nearest-neighbour estimator).
    pub fn predict_standardised(&self, z: &[f32]) -> Prediction {
        let logits: Vec<f64> = self
            .weights
            .iter()
            .zip(&self.bias)
            .map(|(w, &b)| f64::from(b) + w.iter().zip(z).map(|(&w, &z)| f64::from(w) * f64::from(z)).sum::<f64>())
            .collect();
        Prediction::from_logits(&logits)
    }

    /// Checks a probe read from a file against the model's d.
    pub fn validate(&self, dim: usize) -> Result<(), String> {
        let k = self.classes.len();
        if k < 2 {
            return Err("probe.classes needs at least two classes".into());
        }
        if self.mean.len() != dim || self.scale.len() != dim {
            return Err(format!("probe.mean and probe.scale must have the model's {dim} features"));
        }
        if self.weights.len() != k || self.bias.len() != k || self.weights.iter().any(|w| w.len() != dim) {
            return Err(format!("probe.weights must be {k} rows of {dim} and probe.bias {k} values"));
        }
        if self.scale.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err("probe.scale must be positive and finite".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    /// A hand-set probe over d = 2, mean 0 and scale 1: logits = (2, 0, 0) for h = (1, 0), so
    /// softmax = e^2 / (e^2 + 2) = 0.78699 for class 0 and 0.10650 each for the others;
    /// margin 0.68049.
    #[test]
    fn softmax_by_hand() {
        let probe = Probe {
            classes: vec!["a".into(), "b".into(), "c".into()],
            mean: vec![0.0, 0.0],
            scale: vec![1.0, 1.0],
            weights: vec![vec![2.0, 0.0], vec![0.0, 2.0], vec![0.0, 0.0]],
            bias: vec![0.0, 0.0, 0.0],
            alpha: 1.0,
        };
        probe.validate(2).unwrap();
        let p = probe.predict(array![1.0_f32, 0.0].view());
        let e2 = 2.0_f64.exp();
        assert_eq!(p.class, 0);
        assert!((f64::from(p.confidence()) - e2 / (e2 + 2.0)).abs() < 1e-6);
        assert!((f64::from(p.margin()) - (e2 - 1.0) / (e2 + 2.0)).abs() < 1e-6);
        assert!(probe.validate(3).is_err());
    }

    /// Two well-separated clusters in 2-d: the trained probe gets every point right and keeps
    /// the training mean and population scale (of x: values 0,0,0,10,10,10 -> mean 5, sd 5).
    #[test]
    fn trains_on_separable_data() {
        let x: Array2<f32> = array![[0.0, 1.0], [0.0, 1.2], [0.0, 0.8], [10.0, 5.0], [10.0, 5.2], [10.0, 4.8]];
        let labels = [0, 0, 0, 1, 1, 1];
        let classes = vec!["left".to_string(), "right".to_string()];
        let probe = Probe::train(x.view(), &labels, &classes, ProbeSettings::default()).unwrap();
        assert!((probe.mean[0] - 5.0).abs() < 1e-6 && (probe.scale[0] - 5.0).abs() < 1e-6);
        for (row, &label) in x.axis_iter(Axis(0)).zip(&labels) {
            assert_eq!(probe.predict(row).class, label);
        }
        assert!(Probe::train(x.view(), &[0; 6], &classes, ProbeSettings::default()).is_err(), "one class");
    }
}
