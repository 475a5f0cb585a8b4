//! Drift monitoring: are recent images still like the ones the model was calibrated on?
//!
//! Each calibrated model keeps a rolling window of its recent answers (bounded by count and by
//! age) and compares it with the reference that calibration stored: the Kolmogorov-Smirnov
//! statistic and the population stability index (PSI) of the Q-Score distribution, the flagged
//! share against the share expected at tau, and the activation frequency of every
//! discriminative feature against its reference A_j. The last one says *which* features the new
//! images stopped (or started) firing, which is what a person debugging the drift wants.
//!
//! The statistics are pure functions of the window and the reference; the window is the only
//! state, one mutex per model, touched once per answered image.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::model::calibration::{Calibration, Distribution};

/// How much recent history a window keeps.
#[derive(Debug, Clone, Copy)]
pub struct DriftSettings {
    /// Most answers kept.
    pub max_images: usize,
    /// Oldest answer kept.
    pub max_age: Duration,
}

/// One answered image, as the window remembers it.
struct Seen {
    at: Instant,
    q_score: f32,
    flagged: bool,
    /// Features of L ∩ D.
    active: Vec<u32>,
}

/// Rolling windows of every calibrated model.
pub struct DriftMonitor {
    settings: DriftSettings,
    windows: BTreeMap<String, Mutex<VecDeque<Seen>>>,
}

/// `GET /v1/drift`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DriftList {
    /// One report per loaded model.
    pub models: Vec<DriftReport>,
}

/// Whether a drift report compares anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriftStatus {
    /// The window was compared with the calibration reference.
    Ok,
    /// The model has no calibration.json, so there is no reference.
    NoReference,
    /// No image was answered in the window yet.
    EmptyWindow,
}

/// Drift of one model's recent answers from its calibration reference.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DriftReport {
    /// The model.
    pub model: String,
    /// `ok`; `no_reference` for a model without calibration.json; `empty_window` before any
    /// answer.
    pub status: DriftStatus,
    /// What the status means.
    pub message: String,
    /// Answers in the window.
    pub window_images: usize,
    /// Age of the oldest answer in the window, in seconds.
    pub window_seconds: f64,
    /// Images the reference was measured on.
    pub reference_images: usize,
    /// Kolmogorov-Smirnov statistic between the window's Q-Scores and the reference's.
    pub ks: Option<f64>,
    /// Population stability index over the reference histogram's bins.
    pub psi: Option<f64>,
    /// Share of the window flagged likely misclassified.
    pub flagged_ratio: Option<f64>,
    /// Share flagged on the reference (calibration's held-out images).
    pub expected_flagged_ratio: Option<f64>,
    /// Mean Q-Score in the window.
    pub mean_q_score: Option<f64>,
    /// Median Q-Score of the reference.
    pub reference_median_q_score: Option<f64>,
    /// Discriminative features whose activation frequency moved most, largest shift first.
    pub features: Vec<FeatureShift>,
}

/// One discriminative feature's activation frequency, reference against window.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeatureShift {
    /// Feature index.
    pub index: usize,
    /// A_j on the calibration fit part, percent.
    pub reference_frequency: f64,
    /// Share of window images with the feature in L ∩ D, percent.
    pub window_frequency: f64,
}

/// Features listed per report.
const TOP_FEATURES: usize = 10;

impl DriftMonitor {
    /// A window for every calibrated model among `models` (name, calibration).
    pub fn new<'a>(models: impl Iterator<Item = (&'a str, Option<&'a Calibration>)>, settings: DriftSettings) -> Self {
        let windows = models
            .filter(|(_, calibration)| calibration.is_some())
            .map(|(name, _)| (name.to_owned(), Mutex::new(VecDeque::new())))
            .collect();
        Self { settings, windows }
    }

    /// Remembers one answer of `model` (ignored for an uncalibrated one).
    pub fn record(&self, model: &str, q_score: f32, flagged: bool, active: impl Iterator<Item = usize>) {
        let Some(window) = self.windows.get(model) else { return };
        let seen = Seen { at: Instant::now(), q_score, flagged, active: active.map(|j| j as u32).collect() };
        let mut w = window.lock().expect("drift window lock");
        w.push_back(seen);
        self.trim(&mut w);
    }

    fn trim(&self, w: &mut VecDeque<Seen>) {
        while w.len() > self.settings.max_images {
            w.pop_front();
        }
        let now = Instant::now();
        while w.front().is_some_and(|s| now.duration_since(s.at) > self.settings.max_age) {
            w.pop_front();
        }
    }

    /// The report for the model `name`, whose calibration (the reference) is `calibration`.
    pub fn report(&self, name: &str, calibration: Option<&Calibration>) -> DriftReport {
        let name = name.to_owned();
        let (Some(cal), Some(window)) = (calibration, self.windows.get(&name)) else {
            return DriftReport::empty(
                name.clone(),
                DriftStatus::NoReference,
                format!(
                    "model `{name}` has no calibration.json, so there is no reference distribution to compare with; \
                     run `qscore calibrate --model {name}`"
                ),
                0,
            );
        };
        let mut w = window.lock().expect("drift window lock");
        self.trim(&mut w);
        if w.is_empty() {
            return DriftReport::empty(
                name,
                DriftStatus::EmptyWindow,
                "no image answered in the window yet".into(),
                cal.reference.images,
            );
        }
        let q: Vec<f32> = w.iter().map(|s| s.q_score).collect();
        let n = w.len() as f64;
        let flagged = w.iter().filter(|s| s.flagged).count() as f64 / n;
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for s in w.iter() {
            for &j in &s.active {
                *counts.entry(j).or_default() += 1;
            }
        }
        let oldest = w.front().map_or(0.0, |s| s.at.elapsed().as_secs_f64());
        drop(w);
        DriftReport {
            model: name,
            status: DriftStatus::Ok,
            message: "window compared with the calibration reference".into(),
            window_images: q.len(),
            window_seconds: oldest,
            reference_images: cal.reference.images,
            ks: Some(ks(&q, &cal.reference.q_score)),
            psi: Some(psi(&q, &cal.reference.q_score)),
            flagged_ratio: Some(flagged),
            expected_flagged_ratio: Some(cal.reference.flagged_rate),
            mean_q_score: Some(q.iter().map(|&v| f64::from(v)).sum::<f64>() / n),
            reference_median_q_score: cal.reference.q_score.percentiles.get(50).map(|&v| f64::from(v)),
            features: feature_shifts(cal, &counts, n),
        }
    }
}

impl DriftReport {
    fn empty(model: String, status: DriftStatus, message: String, reference_images: usize) -> Self {
        Self {
            model,
            status,
            message,
            window_images: 0,
            window_seconds: 0.0,
            reference_images,
            ks: None,
            psi: None,
            flagged_ratio: None,
            expected_flagged_ratio: None,
            mean_q_score: None,
            reference_median_q_score: None,
            features: Vec::new(),
        }
    }
}

fn feature_shifts(cal: &Calibration, counts: &BTreeMap<u32, usize>, n: f64) -> Vec<FeatureShift> {
    let mut shifts: Vec<FeatureShift> = cal
        .discriminative_features
        .iter()
        .map(|&j| FeatureShift {
            index: j,
            reference_frequency: f64::from(cal.activation_frequency[j]),
            window_frequency: 100.0 * counts.get(&(j as u32)).copied().unwrap_or(0) as f64 / n,
        })
        .collect();
    shifts.sort_by(|a, b| {
        let (da, db) =
            ((a.window_frequency - a.reference_frequency).abs(), (b.window_frequency - b.reference_frequency).abs());
        db.total_cmp(&da).then(a.index.cmp(&b.index))
    });
    shifts.truncate(TOP_FEATURES);
    shifts
}

/// The reference CDF at `x`, from its 101 percentiles (linear between them).
fn reference_cdf(p: &[f32], x: f64) -> f64 {
    let last = p.len() - 1;
    if x < f64::from(p[0]) {
        return 0.0;
    }
    if x >= f64::from(p[last]) {
        return 1.0;
    }
    // The last percentile at or below x: within a run of equal percentiles, its end.
    let k = p.partition_point(|&v| f64::from(v) <= x) - 1;
    let (lo, hi) = (f64::from(p[k]), f64::from(p[k + 1]));
    (k as f64 + (x - lo) / (hi - lo)) / last as f64
}

/// Two-sided Kolmogorov-Smirnov statistic between `window` and the reference distribution.
pub fn ks(window: &[f32], reference: &Distribution) -> f64 {
    let p = &reference.percentiles;
    if window.is_empty() || p.len() < 2 {
        return 0.0;
    }
    let mut x: Vec<f64> = window.iter().map(|&v| f64::from(v)).collect();
    x.sort_by(f64::total_cmp);
    let n = x.len() as f64;
    let mut d: f64 = 0.0;
    for (i, group) in x.chunk_by(|a, b| a == b).scan(0, |seen, g| {
        let start = *seen;
        *seen += g.len();
        Some((start, g))
    }) {
        let f = reference_cdf(p, group[0]);
        let below = i as f64 / n;
        let upto = (i + group.len()) as f64 / n;
        d = d.max((upto - f).abs()).max((f - below).abs());
    }
    d
}

/// Population stability index of `window` over the reference histogram's bins; values outside
/// the reference range count in the end bins, and empty bins are smoothed by 1e-4.
pub fn psi(window: &[f32], reference: &Distribution) -> f64 {
    let h = &reference.histogram;
    let bins = h.counts.len();
    let total: u64 = h.counts.iter().sum();
    if bins == 0 || total == 0 || window.is_empty() {
        return 0.0;
    }
    let mut seen = vec![0_usize; bins];
    for &v in window {
        let b = h.edges[1..bins].partition_point(|&e| e <= v);
        seen[b] += 1;
    }
    const FLOOR: f64 = 1e-4;
    (0..bins)
        .map(|b| {
            let r = (h.counts[b] as f64 / total as f64).max(FLOOR);
            let w = (seen[b] as f64 / window.len() as f64).max(FLOOR);
            (w - r) * (w / r).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::calibration::Histogram;

    /// Reference uniform on [0, 100]: percentiles 0, 1, ..., 100; 4 bins of 25 each.
    fn uniform() -> Distribution {
        Distribution {
            percentiles: (0..=100).map(|v| v as f32).collect(),
            histogram: Histogram { edges: vec![0.0, 25.0, 50.0, 75.0, 100.0], counts: vec![25, 25, 25, 25] },
        }
    }

    /// A window equal to the reference's quartile midpoints has KS 1/8 (the ECDF jumps by 1/4
    /// at 12.5, 37.5, ... where the reference CDF is 1/8 off either side) and PSI 0 (one value
    /// per bin, as the reference). A window all at 90 has KS 0.9 and the PSI of (1 in the last
    /// bin, floor elsewhere): 3 * (1e-4 - .25) ln(4e-4) + (1 - .25) ln(4).
    #[test]
    fn ks_and_psi_by_hand() {
        let r = uniform();
        let same = [12.5_f32, 37.5, 62.5, 87.5];
        assert!((ks(&same, &r) - 0.125).abs() < 1e-9);
        assert!(psi(&same, &r).abs() < 1e-12);
        let shifted = [90.0_f32; 8];
        assert!((ks(&shifted, &r) - 0.9).abs() < 1e-9);
        let want = 3.0 * (1e-4 - 0.25) * (1e-4_f64 / 0.25).ln() + 0.75 * 4.0_f64.ln();
        assert!((psi(&shifted, &r) - want).abs() < 1e-9, "{}", psi(&shifted, &r));
        assert!(psi(&[-5.0, 500.0], &r) > 0.0, "values outside the range land in the end bins");
    }

    /// A reference with a point mass at 0 (the Q = 0 images): its CDF at 0 is the mass.
    #[test]
    fn cdf_handles_point_masses() {
        let mut p = vec![0.0_f32; 11];
        p.extend((1..=90).map(|v| v as f32));
        assert_eq!(p.len(), 101);
        assert!((reference_cdf(&p, 0.0) - 0.10).abs() < 1e-9);
        assert!((reference_cdf(&p, -1.0)).abs() < 1e-9);
        assert!((reference_cdf(&p, 90.0) - 1.0).abs() < 1e-9);
        assert!((reference_cdf(&p, 0.5) - 0.105).abs() < 1e-9);
    }
}
