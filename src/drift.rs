//! Drift monitoring: are recent images still like the ones the model was calibrated on?
//!
//! Each calibrated model keeps a rolling window of its recent answers (bounded by count and by
//! age) and compares it with the reference that calibration stored: the Kolmogorov-Smirnov
//! statistic and the population stability index (PSI, over the reference's deciles) of the
//! Q-Score distribution, the flagged share against the share expected at tau, the mean
//! `p_misclassified` against the reference's (a label-free expected error rate), and the
//! activation frequency of every discriminative feature against its reference A_j. The last one
//! says *which* features the new images stopped (or started) firing, which is what a person
//! debugging the drift wants.
//!
//! The Q-Score statistics see one number per image. The embedding test ([`embedding`]) compares
//! the representations themselves, window against a sample of calibration's held-out
//! embeddings, with a kernel two-sample test (MMD² and its permutation p-value): it catches a
//! window of a few classes, or of transformed images, whose Q-Scores look like the reference's.
//!
//! Replicas each keep their own window. The PSI, the flagged share and the mean
//! `p_misclassified` also come out as [`WindowCounts`], whose sum over replicas is the counts of
//! the union of their windows: Prometheus sums them and computes the fleet's figures with the
//! same formulas (deploy/prometheus/alerts.yml). KS and the embedding test need the samples
//! themselves and stay per replica.
//!
//! The statistics are pure functions of the window and the reference; the window is the only
//! state, one mutex per model, touched once per answered image. The embedding test is too costly
//! for a request (O((n + m)² d)), so [`DriftMonitor::refresh`] computes it off the request path,
//! at most every [`EMBEDDING_REFRESH`], and reports read the cached result.

pub mod embedding;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use serde::Serialize;

use self::embedding::MmdTest;
use crate::model::calibration::{Calibration, Distribution};

/// Most recent embeddings the embedding test compares with the reference sample (fewer when the
/// window holds fewer answers). Each costs 4 d bytes: 1 MiB per model at d = 512, 2.5 MiB at
/// d = 1280, held only for models whose calibration has an embedding sample.
pub const EMBEDDING_WINDOW: usize = 500;

/// Fewest embeddings the embedding test runs on. Its permutation p-value is valid at any size;
/// below this it rarely has the power to say anything.
pub const MIN_EMBEDDING_WINDOW: usize = 50;

/// Fewest answers whose KS and PSI the shipped alert thresholds (KS > 0.2, PSI > 0.25) are valid
/// for: their false-alarm rates were measured on undrifted windows of this size
/// (`undrifted_windows_stay_under_the_alerts`), and deploy/prometheus/alerts.yml waits for as
/// many. A smaller window is still reported, as `too_few_images`, so nobody reads a KS of one
/// image as a verdict.
pub const MIN_DRIFT_WINDOW: usize = 200;

/// Permutations of the embedding test's p-value: the smallest p-value it can give is
/// 1 / (1 + this).
pub const EMBEDDING_PERMUTATIONS: usize = 500;

/// Seed of the permutations, so the same window gives the same p-value.
const PERMUTATION_SEED: u64 = 0x5eed;

/// How often the embedding test is recomputed at most (and only when the window changed).
pub const EMBEDDING_REFRESH: Duration = Duration::from_secs(5);

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
    p_misclassified: Option<f32>,
    flagged: bool,
    /// Features of L ∩ D.
    active: Vec<u32>,
}

/// One calibrated model's window.
#[derive(Default)]
struct Window {
    seen: VecDeque<Seen>,
    /// The most recent embeddings (at most [`EMBEDDING_WINDOW`], none older than the window's
    /// age), only for a model with an embedding sample.
    embeddings: VecDeque<(Instant, Box<[f32]>)>,
    /// Answers recorded so far: tells the refresh whether anything changed.
    recorded: u64,
}

/// The last embedding test of one model.
struct Computed {
    /// `Window::recorded` and the embeddings it ran on.
    recorded: u64,
    images: usize,
    at: Instant,
    /// None when there were fewer than [`MIN_EMBEDDING_WINDOW`] embeddings.
    test: Option<MmdTest>,
}

/// One calibrated model's drift state.
struct ModelDrift {
    window: Mutex<Window>,
    /// Whether its calibration has an embedding sample, so its embeddings are kept.
    keeps_embeddings: bool,
    embedding: Mutex<Option<Computed>>,
}

impl ModelDrift {
    fn new(calibration: &Calibration) -> Self {
        Self {
            window: Mutex::new(Window::default()),
            keeps_embeddings: calibration.reference.embedding.is_some(),
            embedding: Mutex::new(None),
        }
    }
}

/// Rolling windows of every calibrated model.
pub struct DriftMonitor {
    settings: DriftSettings,
    // Replaced whole when a model is reloaded: a new version's answers are not comparable
    // with the old one's, and its calibration may be another reference.
    windows: RwLock<BTreeMap<String, Arc<ModelDrift>>>,
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
    /// The window was compared with the calibration reference and holds enough answers
    /// ([`MIN_DRIFT_WINDOW`]) for the shipped thresholds to apply.
    Ok,
    /// The window was compared, but holds fewer than [`MIN_DRIFT_WINDOW`] answers: the
    /// statistics are reported and are noise at this size; the alerts do not read them yet.
    TooFewImages,
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
    /// `ok`; `too_few_images` while the window holds fewer than 200 answers (the statistics
    /// are reported, and are noise at that size); `no_reference` for a model without
    /// calibration.json; `empty_window` before any answer.
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
    /// Population stability index over the reference's deciles (10 equal-probability bins).
    pub psi: Option<f64>,
    /// The window as counts that add up across replicas (null without a reference): summed over
    /// every replica they give the fleet's PSI, flagged share and mean `p_misclassified`, as
    /// deploy/prometheus/alerts.yml computes them.
    pub counts: Option<WindowCounts>,
    /// Share of the window flagged likely misclassified.
    pub flagged_ratio: Option<f64>,
    /// Share flagged on the reference (calibration's held-out images).
    pub expected_flagged_ratio: Option<f64>,
    /// Mean `p_misclassified` over the window: a label-free estimate of the share of these images
    /// the classifier behind the calibration gets wrong (its expected error rate).
    pub mean_p_misclassified: Option<f64>,
    /// Mean `p_misclassified` over the calibration reference (held-out images), the same
    /// estimate where nothing drifted.
    pub reference_mean_p_misclassified: Option<f64>,
    /// Mean Q-Score in the window.
    pub mean_q_score: Option<f64>,
    /// Median Q-Score of the reference.
    pub reference_median_q_score: Option<f64>,
    /// Discriminative features whose activation frequency moved most, largest shift first.
    pub features: Vec<FeatureShift>,
    /// The test on the embeddings themselves (multivariate), as last computed.
    pub embedding: EmbeddingDrift,
}

/// One drift window as counts: the window of several replicas is the sum of theirs.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WindowCounts {
    /// The PSI's bins, lowest first: the reference's deciles, a point mass's equal deciles merged.
    pub score_bins: Vec<ScoreBin>,
    /// Answers flagged likely misclassified.
    pub flagged_images: usize,
    /// Answers with a `p_misclassified`.
    pub p_misclassified_images: usize,
    /// Sum of their `p_misclassified`: the expected number of misclassified images among them.
    pub p_misclassified_sum: f64,
}

/// One bin of the PSI.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScoreBin {
    /// Lowest Q-Score in the bin (inclusive); null for the lowest bin.
    pub lower: Option<f64>,
    /// Share of the reference in the bin.
    pub reference_ratio: f64,
    /// Window answers in the bin.
    pub window_images: usize,
}

/// Whether the embedding test has a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingDriftStatus {
    /// `mmd2` and `p_value` compare the most recent embeddings with the reference sample.
    Ok,
    /// The calibration holds no embedding sample (no calibration, or one written before the
    /// sample existed): re-run `qscore calibrate`.
    NoSample,
    /// Fewer embeddings in the window than the test needs.
    TooFewImages,
    /// Not computed yet: it runs in the background every few seconds.
    Pending,
    /// The answers compared hold no embeddings (`qscore drift` over a backfill's scores): the
    /// test needs the representations, which only a server's window keeps.
    NotStored,
}

/// The embedding test: unbiased MMD² between the window's most recent embeddings and the
/// calibration's sample of held-out embeddings, under a Gaussian kernel, with a permutation
/// p-value. Computed off the request path every few seconds; this is the last result.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EmbeddingDrift {
    /// `ok`, `no_sample`, `too_few_images`, `pending` or `not_stored`.
    pub status: EmbeddingDriftStatus,
    /// What the status means.
    pub message: String,
    /// Embeddings the last test compared (the window's most recent, at most 500).
    pub window_images: usize,
    /// Rows of the reference sample.
    pub reference_images: usize,
    /// Fewest embeddings the test runs on.
    pub min_window_images: usize,
    /// Unbiased MMD² (dimensionless: kernel values lie in [0, 1]); about 0, possibly slightly
    /// negative, when nothing drifted.
    pub mmd2: Option<f64>,
    /// Permutation p-value of `mmd2`: the share of random splits of the pooled embeddings whose
    /// MMD² reached it (at least 1 / (1 + permutations)). Small means drift.
    pub p_value: Option<f64>,
    /// Permutations behind `p_value`.
    pub permutations: usize,
    /// Gaussian kernel bandwidth sigma (median distance between reference rows), in the
    /// representation's units.
    pub bandwidth: Option<f64>,
    /// Seconds since the test ran.
    pub age_seconds: Option<f64>,
}

impl EmbeddingDrift {
    /// The embedding test's answer for answers that kept no embeddings (a backfill's scores).
    pub fn not_stored(calibration: &Calibration) -> Self {
        Self::untested(
            EmbeddingDriftStatus::NotStored,
            "the scores hold no embeddings, so the embedding test cannot run on them; POST the images to \
             `qscore serve` and read its /v1/drift for it"
                .into(),
            Some(calibration),
        )
    }

    /// A report with no test result yet, saying why; the reference's size and bandwidth as
    /// `calibration` has them.
    fn untested(status: EmbeddingDriftStatus, message: String, calibration: Option<&Calibration>) -> Self {
        let sample = calibration.and_then(|c| c.reference.embedding.as_ref());
        Self {
            status,
            message,
            window_images: 0,
            reference_images: sample.map_or(0, |s| s.len()),
            min_window_images: MIN_EMBEDDING_WINDOW,
            mmd2: None,
            p_value: None,
            permutations: EMBEDDING_PERMUTATIONS,
            bandwidth: sample.map(|s| f64::from(s.bandwidth)),
            age_seconds: None,
        }
    }
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
            .filter_map(|(name, calibration)| Some((name.to_owned(), Arc::new(ModelDrift::new(calibration?)))))
            .collect();
        Self { settings, windows: RwLock::new(windows) }
    }

    /// Starts `model`'s window afresh for a newly loaded version with `calibration` (none: the
    /// model is no longer watched), or forgets it when the model is gone.
    pub fn reset(&self, model: &str, calibration: Option<&Calibration>) {
        let mut windows = self.windows.write().expect("drift windows lock");
        match calibration {
            Some(cal) => windows.insert(model.to_owned(), Arc::new(ModelDrift::new(cal))),
            None => windows.remove(model),
        };
    }

    fn window(&self, model: &str) -> Option<Arc<ModelDrift>> {
        self.windows.read().expect("drift windows lock").get(model).cloned()
    }

    /// Remembers one answer of `model` (ignored for an uncalibrated one), with its embedding `h`
    /// (kept only when the model's calibration has an embedding sample).
    pub fn record(
        &self,
        model: &str,
        q_score: f32,
        p_misclassified: Option<f32>,
        flagged: bool,
        active: impl Iterator<Item = usize>,
        h: &[f32],
    ) {
        let Some(drift) = self.window(model) else { return };
        let at = Instant::now();
        let seen = Seen { at, q_score, p_misclassified, flagged, active: active.map(|j| j as u32).collect() };
        let mut w = drift.window.lock().expect("drift window lock");
        w.seen.push_back(seen);
        w.recorded += 1;
        if drift.keeps_embeddings && self.settings.max_images > 0 {
            w.embeddings.push_back((at, h.into()));
        }
        self.trim(&mut w);
    }

    fn trim(&self, w: &mut Window) {
        while w.seen.len() > self.settings.max_images {
            w.seen.pop_front();
        }
        while w.embeddings.len() > self.settings.max_images.min(EMBEDDING_WINDOW) {
            w.embeddings.pop_front();
        }
        let now = Instant::now();
        let old = |at: Instant| now.duration_since(at) > self.settings.max_age;
        while w.seen.front().is_some_and(|s| old(s.at)) {
            w.seen.pop_front();
        }
        while w.embeddings.front().is_some_and(|(at, _)| old(*at)) {
            w.embeddings.pop_front();
        }
    }

    /// Recomputes the embedding test of every model in `models` (name, calibration) whose
    /// window changed since its last test. Blocking and CPU-bound (up to a fraction of a second
    /// per model): run it on a blocking thread, never on the request path.
    pub fn refresh<'a>(&self, models: impl Iterator<Item = (&'a str, Option<&'a Calibration>)>) {
        for (name, calibration) in models {
            let (Some(drift), Some(sample)) =
                (self.window(name), calibration.and_then(|c| c.reference.embedding.as_ref()))
            else {
                continue;
            };
            let (recorded, rows) = {
                let mut w = drift.window.lock().expect("drift window lock");
                self.trim(&mut w);
                let last = drift.embedding.lock().expect("embedding drift lock");
                let unchanged =
                    last.as_ref().is_some_and(|c| c.recorded == w.recorded && c.images == w.embeddings.len());
                if unchanged {
                    continue;
                }
                let rows: Vec<f32> = w.embeddings.iter().flat_map(|(_, h)| h.iter().copied()).collect();
                (w.recorded, rows)
            };
            let images = rows.len() / sample.dim.max(1);
            let test = (images >= MIN_EMBEDDING_WINDOW && rows.len() == images * sample.dim)
                .then(|| embedding::mmd_test(&rows, sample, EMBEDDING_PERMUTATIONS, PERMUTATION_SEED));
            *drift.embedding.lock().expect("embedding drift lock") =
                Some(Computed { recorded, images, at: Instant::now(), test });
        }
    }

    /// The embedding test's last result for `name`.
    fn embedding_report(&self, name: &str, calibration: Option<&Calibration>) -> EmbeddingDrift {
        let sample = calibration.and_then(|c| c.reference.embedding.as_ref());
        let mut report = EmbeddingDrift::untested(
            EmbeddingDriftStatus::NoSample,
            format!(
                "the calibration of `{name}` holds no embedding sample, so the embedding test has no reference; \
                 re-run `qscore calibrate --model {name}` with this version"
            ),
            calibration,
        );
        let Some(drift) = sample.and(self.window(name)) else { return report };
        let last = drift.embedding.lock().expect("embedding drift lock");
        let Some(c) = last.as_ref() else {
            report.status = EmbeddingDriftStatus::Pending;
            report.message =
                format!("not computed yet: the test runs in the background every {}s", EMBEDDING_REFRESH.as_secs());
            return report;
        };
        report.window_images = c.images;
        report.age_seconds = Some(c.at.elapsed().as_secs_f64());
        match c.test {
            Some(t) => {
                report.status = EmbeddingDriftStatus::Ok;
                report.message = "the window's most recent embeddings compared with the reference sample".into();
                report.mmd2 = Some(t.mmd2);
                report.p_value = Some(t.p_value);
            }
            None => {
                report.status = EmbeddingDriftStatus::TooFewImages;
                report.message =
                    format!("{} embeddings in the window; the test needs at least {MIN_EMBEDDING_WINDOW}", c.images);
            }
        }
        report
    }

    /// The report for the model `name`, whose calibration (the reference) is `calibration`.
    pub fn report(&self, name: &str, calibration: Option<&Calibration>) -> DriftReport {
        let name = name.to_owned();
        let embedding = self.embedding_report(&name, calibration);
        let (Some(cal), Some(drift)) = (calibration, self.window(&name)) else {
            return DriftReport::empty(
                name.clone(),
                DriftStatus::NoReference,
                format!(
                    "model `{name}` has no calibration.json, so there is no reference distribution to compare with; \
                     run `qscore calibrate --model {name}`"
                ),
                0,
                None,
                embedding,
            );
        };
        let mut window = drift.window.lock().expect("drift window lock");
        self.trim(&mut window);
        let w = &window.seen;
        let mut tally = Tally::default();
        for s in w {
            tally.add(s.q_score, s.p_misclassified, s.flagged, s.active.iter().copied());
        }
        let oldest = w.front().map_or(0.0, |s| s.at.elapsed().as_secs_f64());
        drop(window);
        tally.report(name, cal, oldest, embedding)
    }
}

/// The answers one comparison with the reference reads: a live window's, or a finished
/// backfill's rows. What the statistics need and no more (the Q-Scores for KS and PSI, counts
/// and sums for the rest), so a backfill of millions of rows is read in one pass holding 4 bytes
/// per image.
#[derive(Debug, Default)]
pub struct Tally {
    q: Vec<f32>,
    flagged: usize,
    p_sum: f64,
    p_count: usize,
    /// Images with each feature in L ∩ D.
    counts: BTreeMap<u32, usize>,
}

impl Tally {
    /// Adds one answered image: its Q-Score, p_misclassified, flag and the features of L ∩ D.
    pub fn add(
        &mut self,
        q_score: f32,
        p_misclassified: Option<f32>,
        flagged: bool,
        active: impl IntoIterator<Item = u32>,
    ) {
        self.q.push(q_score);
        self.flagged += usize::from(flagged);
        if let Some(p) = p_misclassified {
            self.p_sum += f64::from(p);
            self.p_count += 1;
        }
        for j in active {
            *self.counts.entry(j).or_default() += 1;
        }
    }

    /// Images added.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether no image was added.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// The drift of these answers from `cal`'s reference: the one computation behind both
    /// `GET /v1/drift` and `qscore drift`. `window_seconds` is the age of the oldest answer (0
    /// for a backfill, which has no age); `embedding` is the embedding test's result. Call it
    /// on a non-empty tally; an empty one is answered `empty_window`.
    pub fn report(
        self,
        model: String,
        cal: &Calibration,
        window_seconds: f64,
        embedding: EmbeddingDrift,
    ) -> DriftReport {
        let window_counts = ScoreBins::new(&cal.reference.q_score)
            .map(|b| b.window_counts(&self.q, self.flagged, self.p_count, self.p_sum));
        if self.is_empty() {
            return DriftReport::empty(
                model,
                DriftStatus::EmptyWindow,
                "no image answered in the window yet".into(),
                cal.reference.images,
                window_counts,
                embedding,
            );
        }
        let q = self.q;
        let n = q.len() as f64;
        let (status, message) = window_status(q.len());
        DriftReport {
            model,
            status,
            message,
            window_images: q.len(),
            window_seconds,
            reference_images: cal.reference.images,
            ks: Some(ks(&q, &cal.reference.q_score)),
            psi: window_counts.as_ref().map(WindowCounts::psi),
            counts: window_counts,
            flagged_ratio: Some(self.flagged as f64 / n),
            expected_flagged_ratio: Some(cal.reference.flagged_rate),
            mean_p_misclassified: (self.p_count > 0).then(|| self.p_sum / self.p_count as f64),
            reference_mean_p_misclassified: distribution_mean(&cal.reference.p_misclassified),
            mean_q_score: Some(q.iter().map(|&v| f64::from(v)).sum::<f64>() / n),
            reference_median_q_score: cal.reference.q_score.percentiles.get(50).map(|&v| f64::from(v)),
            features: feature_shifts(cal, &self.counts, n),
            embedding,
        }
    }
}

impl DriftReport {
    /// A report that compares nothing, saying why.
    pub fn empty(
        model: String,
        status: DriftStatus,
        message: String,
        reference_images: usize,
        counts: Option<WindowCounts>,
        embedding: EmbeddingDrift,
    ) -> Self {
        Self {
            model,
            status,
            message,
            window_images: 0,
            window_seconds: 0.0,
            reference_images,
            ks: None,
            psi: None,
            counts,
            flagged_ratio: None,
            expected_flagged_ratio: None,
            mean_p_misclassified: None,
            reference_mean_p_misclassified: None,
            mean_q_score: None,
            reference_median_q_score: None,
            features: Vec::new(),
            embedding,
        }
    }
}

/// Whether a compared window of `images` answers is large enough for the shipped thresholds.
fn window_status(images: usize) -> (DriftStatus, String) {
    if images >= MIN_DRIFT_WINDOW {
        return (DriftStatus::Ok, "window compared with the calibration reference".into());
    }
    let message = format!(
        "{images} image{} compared with the calibration reference; KS and PSI are read against the shipped \
         thresholds only from {MIN_DRIFT_WINDOW} images (below that an undrifted window often passes them), so \
         these figures are not a verdict yet",
        if images == 1 { "" } else { "s" }
    );
    (DriftStatus::TooFewImages, message)
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

/// The mean of a distribution given by its percentiles, read as a quantile function linear
/// between them: the integral of that function over [0, 1], by the trapezoid rule, which is exact
/// for it. None without percentiles.
fn distribution_mean(d: &Distribution) -> Option<f64> {
    let p = &d.percentiles;
    (p.len() >= 2).then(|| {
        let sum: f64 = p.windows(2).map(|w| (f64::from(w[0]) + f64::from(w[1])) / 2.0).sum();
        sum / (p.len() - 1) as f64
    })
}

/// The reference CDF at `x`, P(X <= x), from its 101 percentiles (linear between them). A run
/// of equal percentiles is a point mass: the CDF jumps there, and this is the value after the
/// jump.
fn reference_cdf(p: &[f32], x: f64) -> f64 {
    let last = p.len() - 1;
    if x < f64::from(p[0]) {
        return 0.0;
    }
    if x >= f64::from(p[last]) {
        return 1.0;
    }
    if x.is_nan() {
        return 0.0;
    }
    // The last percentile at or below x: within a run of equal percentiles, its end. Clamped,
    // so percentiles out of order (a hand-edited calibration) give a wrong value, not a panic.
    let k = p.partition_point(|&v| f64::from(v) <= x).saturating_sub(1).min(last - 1);
    let (lo, hi) = (f64::from(p[k]), f64::from(p[k + 1]));
    (k as f64 + (x - lo) / (hi - lo)) / last as f64
}

/// The reference CDF's left limit at `x`, P(X < x): the value before a point mass's jump.
fn reference_cdf_below(p: &[f32], x: f64) -> f64 {
    let last = p.len() - 1;
    // Percentiles strictly below x; the CDF rises linearly from the last of them to the next.
    let k = p.partition_point(|&v| f64::from(v) < x);
    if k == 0 || x.is_nan() {
        return 0.0;
    }
    if k > last {
        return 1.0;
    }
    let (lo, hi) = (f64::from(p[k - 1]), f64::from(p[k]));
    ((k - 1) as f64 + (x - lo) / (hi - lo)) / last as f64
}

/// Two-sided Kolmogorov-Smirnov statistic between `window` and the reference distribution:
/// sup over x of |F_window(x) - F_reference(x)|.
///
/// Both CDFs step at point masses (the Q-Score's spike at 0 is one), so the supremum is taken
/// over each window value's left limits (both sides just before it) and right limits (both
/// sides at it); between window values the window's CDF is flat and the reference's is monotone,
/// so those two comparisons bound every x in between. Comparing one side's left limit with the
/// other's right limit would count a point mass the two share as drift.
pub fn ks(window: &[f32], reference: &Distribution) -> f64 {
    let p = &reference.percentiles;
    if window.is_empty() || p.len() < 2 {
        return 0.0;
    }
    // A value that is not finite has no place on either CDF: it is left out, never a panic.
    let mut x: Vec<f64> = window.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v)).collect();
    if x.is_empty() {
        return 0.0;
    }
    x.sort_by(f64::total_cmp);
    let n = x.len() as f64;
    let mut d: f64 = 0.0;
    let mut seen = 0;
    for group in x.chunk_by(|a, b| a == b) {
        let below = seen as f64 / n;
        seen += group.len();
        let upto = seen as f64 / n;
        let v = group[0];
        d = d.max((upto - reference_cdf(p, v)).abs()).max((below - reference_cdf_below(p, v)).abs());
    }
    d
}

/// Bins of the PSI: the reference's deciles, so that each bin holds a tenth of the reference
/// and a window of 100 images expects 10 in each.
pub const PSI_BINS: usize = 10;

/// The PSI's bins of one reference distribution: edges at its deciles, and its share in each.
#[derive(Debug, Clone)]
pub struct ScoreBins {
    /// Inner edges at the deciles, each once; bin b is [edge b-1, edge b), the ends open.
    edges: Vec<f64>,
    /// The reference's share in each bin.
    reference_share: Vec<f64>,
}

impl ScoreBins {
    /// The bins of `reference`; None without percentiles.
    ///
    /// Equal-probability bins keep every reference share near 1/10, where equal-width bins over
    /// a skewed Q-Score distribution leave most bins nearly empty and turn sampling noise into
    /// PSI. A point mass (several equal deciles) becomes one bin holding its whole mass, so the
    /// shares are not equal by construction and travel with the counts.
    pub fn new(reference: &Distribution) -> Option<Self> {
        let p = &reference.percentiles;
        if p.len() < 2 {
            return None;
        }
        let last = p.len() - 1;
        let mut edges: Vec<f64> = (1..PSI_BINS).map(|b| f64::from(p[b * last / PSI_BINS])).collect();
        edges.dedup();
        let mut reference_share = Vec::with_capacity(edges.len() + 1);
        let mut below = 0.0;
        for &e in &edges {
            let upto = reference_cdf_below(p, e);
            reference_share.push(upto - below);
            below = upto;
        }
        reference_share.push(1.0 - below);
        Some(Self { edges, reference_share })
    }

    /// The bin `q` falls in.
    pub fn bin(&self, q: f32) -> usize {
        self.edges.partition_point(|&e| e <= f64::from(q))
    }

    /// The window's counts: `q` its Q-Scores, `p` its `p_misclassified` values.
    fn window_counts(&self, q: &[f32], flagged_images: usize, p_count: usize, p_sum: f64) -> WindowCounts {
        let mut seen = vec![0_usize; self.reference_share.len()];
        // As in `ks`, a value that is not finite is in no bin.
        for &v in q.iter().filter(|v| v.is_finite()) {
            seen[self.bin(v)] += 1;
        }
        let score_bins = seen
            .into_iter()
            .zip(&self.reference_share)
            .enumerate()
            .map(|(b, (window_images, &reference_ratio))| ScoreBin {
                lower: b.checked_sub(1).map(|e| self.edges[e]),
                reference_ratio,
                window_images,
            })
            .collect();
        WindowCounts { score_bins, flagged_images, p_misclassified_images: p_count, p_misclassified_sum: p_sum }
    }
}

impl WindowCounts {
    /// Population stability index of the window against the reference: sum over bins of
    /// (w - r) ln(w / r), with w and r the window's and the reference's shares and empty shares
    /// smoothed to [`PSI_FLOOR`]. Summed counts of several windows give their union's PSI; the
    /// fleet rule in deploy/prometheus/alerts.yml is this formula in PromQL, and
    /// tests/fleet_drift.rs checks that the two agree.
    ///
    /// Under no drift and a large reference, n * PSI is approximately chi-squared with
    /// (bins - 1) degrees of freedom, so the shipped alert at 0.25 from 100 images is a 0.3%
    /// false-alarm rate; the unit test `undrifted_windows_stay_under_the_alerts` measures it on
    /// simulated windows.
    pub fn psi(&self) -> f64 {
        let n: usize = self.score_bins.iter().map(|b| b.window_images).sum();
        if n == 0 {
            return 0.0;
        }
        self.score_bins
            .iter()
            .map(|b| {
                let r = b.reference_ratio.max(PSI_FLOOR);
                let w = (b.window_images as f64 / n as f64).max(PSI_FLOOR);
                (w - r) * (w / r).ln()
            })
            .sum()
    }
}

/// Smallest share the PSI reads for a bin, so that an empty bin does not make it infinite.
pub const PSI_FLOOR: f64 = 1e-4;

/// Population stability index of `window` against the reference, over bins at the reference's
/// deciles ([`ScoreBins`], [`WindowCounts::psi`]).
pub fn psi(window: &[f32], reference: &Distribution) -> f64 {
    ScoreBins::new(reference).map_or(0.0, |b| b.window_counts(window, 0, 0, 0.0).psi())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::calibration::Histogram;

    /// Reference uniform on [0, 100]: percentiles 0, 1, ..., 100 (its deciles 10, 20, ..., 90).
    fn uniform() -> Distribution {
        Distribution {
            percentiles: (0..=100).map(|v| v as f32).collect(),
            histogram: Histogram { edges: vec![0.0, 25.0, 50.0, 75.0, 100.0], counts: vec![25, 25, 25, 25] },
        }
    }

    /// A window with one value in each decile bin has KS 0.05 (its ECDF steps by 1/10 at
    /// 5, 15, ..., 95, where the reference CDF is 1/20 off either side) and PSI 0. A window
    /// all at 90 has KS 0.9 (just below 90 the reference is at 0.9, the window at 0) and the PSI
    /// of (everything in the last bin, the floor elsewhere):
    /// 9 (1e-4 - .1) ln(1e-3) + (1 - .1) ln(10).
    #[test]
    fn a_window_is_a_verdict_only_from_the_alerts_minimum() {
        assert_eq!(window_status(1).0, DriftStatus::TooFewImages);
        assert_eq!(window_status(MIN_DRIFT_WINDOW - 1).0, DriftStatus::TooFewImages);
        assert!(window_status(7).1.starts_with("7 images"));
        assert_eq!(window_status(MIN_DRIFT_WINDOW).0, DriftStatus::Ok);
    }

    #[test]
    fn ks_and_psi_by_hand() {
        let r = uniform();
        let same: Vec<f32> = (0..10).map(|b| 5.0 + 10.0 * b as f32).collect();
        assert!((ks(&same, &r) - 0.05).abs() < 1e-9, "{}", ks(&same, &r));
        assert!(psi(&same, &r).abs() < 1e-12);
        let shifted = [90.0_f32; 8];
        assert!((ks(&shifted, &r) - 0.9).abs() < 1e-9);
        let want = 9.0 * (1e-4 - 0.1) * (1e-4_f64 / 0.1).ln() + 0.9 * 10.0_f64.ln();
        assert!((psi(&shifted, &r) - want).abs() < 1e-9, "{}", psi(&shifted, &r));
        assert!(psi(&[-5.0, 500.0], &r) > 0.0, "values outside the range land in the end bins");
    }

    /// 30% of the reference at Q = 0 (percentiles 0..=30 are 0, then 1, 2, ..., 70), and a
    /// window with the same share of zeros and one value at each 10 from 10 to 70. Both CDFs
    /// jump by 0.3 at 0, so 0 adds nothing; the largest gap is just below 10 (window 0.3,
    /// reference 0.4) and just below 70 (0.9 against 1.0): KS = 0.1. Comparing the window's
    /// left limit at 0 with the reference's right limit read 0.3, an alert.
    #[test]
    fn a_shared_point_mass_is_not_drift() {
        let mut percentiles = vec![0.0_f32; 31];
        percentiles.extend((1..=70).map(|v| v as f32));
        let r = Distribution { percentiles, histogram: Histogram { edges: vec![0.0, 70.0], counts: vec![100] } };
        let mut window = vec![0.0_f32; 3];
        window.extend((1..=7).map(|v| 10.0 * v as f32));
        assert!((ks(&window, &r) - 0.1).abs() < 1e-9, "{}", ks(&window, &r));
        assert!((reference_cdf_below(&r.percentiles, 0.0)).abs() < 1e-12);
        assert!((reference_cdf(&r.percentiles, 0.0) - 0.3).abs() < 1e-12);
        // All ten values at 0 against the reference's 30%: a real shift, KS 0.7.
        assert!((ks(&[0.0; 10], &r) - 0.7).abs() < 1e-9);
    }

    /// A value drawn from the reference: its percentiles read as a quantile function.
    fn draw(p: &[f32], rng: &mut impl rand::Rng) -> f32 {
        let u = rng.random::<f64>() * (p.len() - 1) as f64;
        let k = (u.floor() as usize).min(p.len() - 2);
        let t = (u - k as f64) as f32;
        p[k] + t * (p[k + 1] - p[k])
    }

    /// Undrifted windows drawn from the reference itself, for a continuous reference, one with
    /// 30% of its mass at Q = 0 and one with 90% (as at eps = 4): the share of windows past the
    /// shipped alerts (KS > 0.2, PSI > 0.25) at the alerts' minimum window of 200 images, which
    /// deploy/prometheus/alerts.yml quotes, and at 100 for comparison (printed only: PSI's
    /// floored empty bins pass 0.25 in about 1% of 100-image windows, which is why the alerts
    /// wait for 200). Seeded, so the figures are the same each run.
    #[test]
    fn undrifted_windows_stay_under_the_alerts() {
        use rand::SeedableRng;
        let spike = |zeros: usize| -> Vec<f32> {
            let mut p = vec![0.0_f32; zeros + 1];
            p.extend((1..=100 - zeros).map(|v| v as f32 * 0.37));
            p
        };
        let references = [("continuous", uniform().percentiles), ("30% at 0", spike(30)), ("90% at 0", spike(90))];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        const WINDOWS: usize = 4000;
        for (name, percentiles) in references {
            let r = Distribution { percentiles, histogram: Histogram { edges: vec![], counts: vec![] } };
            for size in [100, 200] {
                let (mut ks_alerts, mut psi_alerts, mut psi_sum) = (0, 0, 0.0);
                for _ in 0..WINDOWS {
                    let w: Vec<f32> = (0..size).map(|_| draw(&r.percentiles, &mut rng)).collect();
                    ks_alerts += usize::from(ks(&w, &r) > 0.2);
                    let v = psi(&w, &r);
                    psi_alerts += usize::from(v > 0.25);
                    psi_sum += v;
                }
                let (ks_rate, psi_rate) = (ks_alerts as f64 / WINDOWS as f64, psi_alerts as f64 / WINDOWS as f64);
                println!(
                    "{name}, {size} images: KS > 0.2 in {:.2}%, PSI > 0.25 in {:.2}% (mean PSI {:.3})",
                    100.0 * ks_rate,
                    100.0 * psi_rate,
                    psi_sum / WINDOWS as f64
                );
                if size == 200 {
                    assert!(ks_rate < 0.001 && psi_rate < 0.001, "{name}: false alarms KS {ks_rate}, PSI {psi_rate}");
                }
            }
        }
    }

    /// The reference mean from percentiles: uniform on [0, 100] has mean 50; 30% at 0 and then
    /// linear from 1 to 70 (the quantile function is 0 on [0, .3], rises to 1 at .31, then
    /// linearly to 70 at 1): (0.5 + (1 + 70) / 2 * 69) / 100 = 24.5.
    #[test]
    fn reference_mean_integrates_the_quantile_function() {
        assert!((distribution_mean(&uniform()).unwrap() - 50.0).abs() < 1e-9);
        let mut percentiles = vec![0.0_f32; 31];
        percentiles.extend((1..=70).map(|v| v as f32));
        let d = Distribution { percentiles, histogram: Histogram { edges: vec![], counts: vec![] } };
        assert!((distribution_mean(&d).unwrap() - 24.5).abs() < 1e-9, "{:?}", distribution_mean(&d));
        let none = Distribution { percentiles: vec![], histogram: Histogram { edges: vec![], counts: vec![] } };
        assert_eq!(distribution_mean(&none), None);
    }

    /// A reference with a point mass at 0 (the Q = 0 images): its CDF at 0 is the mass.
    #[test]
    fn values_that_are_not_finite_are_left_out_never_a_panic() {
        let window = [5.0, 15.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0, 85.0, 95.0];
        let mut odd = window.to_vec();
        odd.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(ks(&odd, &uniform()), ks(&window, &uniform()));
        assert_eq!(psi(&odd, &uniform()), psi(&window, &uniform()));
        assert_eq!(ks(&[f32::NAN], &uniform()), 0.0);
        assert_eq!(reference_cdf(&uniform().percentiles, f64::NAN), 0.0);
        assert_eq!(reference_cdf_below(&uniform().percentiles, f64::NAN), 0.0);
    }

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
