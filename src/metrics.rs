//! Prometheus metric families.
//!
//! Names follow Prometheus conventions: the `qscore_` prefix, `_total` on counters, base units
//! (seconds), and labels of bounded cardinality only (model, route, status class, outcome).
//! A model name becomes a label only after it matched a loaded model, so clients cannot grow
//! the label set.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric qscore exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route template and status class.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by route template.
    pub http_duration: HistogramVec,
    /// Images by model and outcome (scored, rejected, failed).
    pub images: IntCounterVec,
    /// Duration of one ONNX Runtime run, the copy of its images into the batch included.
    pub inference_duration: HistogramVec,
    /// Images per ONNX Runtime run.
    pub batch_size: HistogramVec,
    /// Q-Scores answered: the raw material of drift monitoring.
    pub score: HistogramVec,
    /// Time an image waited in its model's queue before its run started.
    pub queue_wait: HistogramVec,
    /// Decode, resize and normalise time of one image.
    pub preprocess_duration: HistogramVec,
    /// Images refused or dropped before inference, by model and reason.
    pub rejected: IntCounterVec,
    /// Forward passes run for `POST /v1/explain` (the unoccluded one and every occluded copy),
    /// by model: the work explanations add to the scoring load, which the image counters omit.
    pub explain_passes: IntCounterVec,
    /// Images waiting in each model's queue (set at scrape time).
    pub queue_depth: IntGaugeVec,
    /// Images admitted and not yet answered, across models (set at scrape time).
    pub images_in_flight: IntGauge,
    /// Bytes of the memory budget held now.
    pub memory_budget_used: IntGauge,
    /// HTTP requests being handled.
    pub requests_in_flight: IntGauge,
    /// 1, labelled with each loaded model's version, device and calibration SHA-256.
    pub model_info: IntGaugeVec,
    /// Loads of a model folder after start-up, by outcome (`loaded`, `failed`, `removed`).
    pub model_reloads: IntCounterVec,
    /// 1 while a model folder's current contents fail to load (the version before serves).
    pub model_load_failing: IntGaugeVec,
    /// 1, labelled with the build's version.
    pub build_info: IntGaugeVec,
    /// KS statistic of each calibrated model's recent Q-Scores against its reference.
    pub drift_ks: GaugeVec,
    /// PSI of each calibrated model's recent Q-Scores against its reference.
    pub drift_psi: GaugeVec,
    /// Share of the drift window flagged likely misclassified.
    pub flagged_ratio: GaugeVec,
    /// Share flagged on the calibration reference.
    pub expected_flagged_ratio: GaugeVec,
    /// Mean p_misclassified over the drift window: the window's expected error rate.
    pub drift_mean_p_misclassified: GaugeVec,
    /// Mean p_misclassified over the calibration reference.
    pub reference_mean_p_misclassified: GaugeVec,
    /// Answers in the drift window.
    pub drift_window_images: GaugeVec,
    /// Unbiased MMD² between the drift window's embeddings and the calibration's sample.
    pub drift_embedding_mmd2: GaugeVec,
    /// Permutation p-value of that MMD².
    pub drift_embedding_p_value: GaugeVec,
    /// Embeddings the last embedding test compared.
    pub drift_embedding_window_images: GaugeVec,
    /// Flagged-webhook events by outcome (sent, failed, dropped).
    pub webhook_events: IntCounterVec,
    /// The drift window as counts that add up across replicas (the fleet-wide drift rules).
    pub drift_counts: DriftCounts,
}

/// The drift window of each calibrated model as counts: summed over replicas they give the
/// fleet's PSI, flagged share and mean p_misclassified (deploy/prometheus/alerts.yml).
#[derive(Clone)]
pub struct DriftCounts {
    /// Window answers per PSI bin (`bin` 0..9, lowest Q-Scores first).
    pub score_bin_images: IntGaugeVec,
    /// The reference's share per PSI bin.
    pub reference_score_bin_ratio: GaugeVec,
    /// Window answers flagged likely misclassified.
    pub flagged_images: IntGaugeVec,
    /// Window answers with a p_misclassified.
    pub p_misclassified_images: IntGaugeVec,
    /// Sum of their p_misclassified.
    pub expected_misclassified_images: GaugeVec,
}

impl DriftCounts {
    fn new() -> Self {
        let int = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let float = |name: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        Self {
            score_bin_images: int(
                "qscore_drift_window_score_bin_images",
                "Answers in the drift window per PSI bin (the reference's deciles, lowest Q-Scores in bin 0); sum over replicas for the fleet's PSI.",
                &["model", "bin"],
            ),
            reference_score_bin_ratio: float(
                "qscore_drift_reference_score_bin_ratio",
                "Share of the calibration reference in each PSI bin.",
                &["model", "bin"],
            ),
            flagged_images: int(
                "qscore_drift_window_flagged_images",
                "Answers in the drift window flagged likely misclassified.",
                &["model"],
            ),
            p_misclassified_images: int(
                "qscore_drift_window_p_misclassified_images",
                "Answers in the drift window that have a p_misclassified.",
                &["model"],
            ),
            expected_misclassified_images: float(
                "qscore_drift_window_expected_misclassified_images",
                "Sum of p_misclassified over the drift window: the expected number of misclassified images in it.",
                &["model"],
            ),
        }
    }

    fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 5] {
        [
            Box::new(self.score_bin_images.clone()),
            Box::new(self.reference_score_bin_ratio.clone()),
            Box::new(self.flagged_images.clone()),
            Box::new(self.p_misclassified_images.clone()),
            Box::new(self.expected_misclassified_images.clone()),
        ]
    }

    /// Exports one model's counts (an empty window's zeros too, so the fleet sums see every
    /// replica).
    fn observe(&self, model: &str, counts: &crate::drift::WindowCounts) {
        for (b, bin) in counts.score_bins.iter().enumerate() {
            let labels = [model, BIN_LABELS[b]];
            self.score_bin_images.with_label_values(&labels).set(bin.window_images as i64);
            self.reference_score_bin_ratio.with_label_values(&labels).set(bin.reference_ratio);
        }
        // A reloaded calibration may have fewer bins; stale ones would skew the fleet's sums.
        for bin in &BIN_LABELS[counts.score_bins.len().min(BIN_LABELS.len())..] {
            let _ = self.score_bin_images.remove_label_values(&[model, bin]);
            let _ = self.reference_score_bin_ratio.remove_label_values(&[model, bin]);
        }
        self.flagged_images.with_label_values(&[model]).set(counts.flagged_images as i64);
        self.p_misclassified_images.with_label_values(&[model]).set(counts.p_misclassified_images as i64);
        self.expected_misclassified_images.with_label_values(&[model]).set(counts.p_misclassified_sum);
    }
}

impl DriftCounts {
    /// Drops a model's counts: it is gone, or its new version has no reference.
    fn forget(&self, model: &str) {
        for bin in BIN_LABELS {
            let _ = self.score_bin_images.remove_label_values(&[model, bin]);
            let _ = self.reference_score_bin_ratio.remove_label_values(&[model, bin]);
        }
        for gauge in [&self.flagged_images, &self.p_misclassified_images] {
            let _ = gauge.remove_label_values(&[model]);
        }
        let _ = self.expected_misclassified_images.remove_label_values(&[model]);
    }
}

/// `bin` label values: the PSI has at most one bin per decile of its reference.
const BIN_LABELS: [&str; crate::drift::PSI_BINS] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Why an image never reached inference (`reason` label of `qscore_rejected_images_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The server was full (429).
    Overloaded,
    /// Its request's deadline passed while it was queued (503).
    Timeout,
    /// Its client went away before its run.
    Cancelled,
    /// The image itself was refused (bad format, too large, undecodable).
    Invalid,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Invalid => "invalid",
        }
    }
}

/// Outcome label of `qscore_images_total`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Scored and answered.
    Scored,
    /// Refused because of the client's input.
    Rejected,
    /// Failed on the server's side.
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Scored => "scored",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }
}

impl Metrics {
    /// Creates and registers the families.
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let http_requests = IntCounterVec::new(
            Opts::new("qscore_http_requests_total", "HTTP requests answered, by route and status class."),
            &["route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("qscore_http_request_duration_seconds", "HTTP request latency, by route.")
                .buckets(latency.clone()),
            &["route"],
        )
        .expect("valid metric");
        let images = IntCounterVec::new(
            Opts::new("qscore_images_total", "Images received, by model and outcome (scored, rejected, failed)."),
            &["model", "outcome"],
        )
        .expect("valid metric");
        let inference_duration = HistogramVec::new(
            HistogramOpts::new(
                "qscore_inference_duration_seconds",
                "Duration of one ONNX Runtime run (the copy of its images into the batch included), by model.",
            )
            .buckets(latency),
            &["model"],
        )
        .expect("valid metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new("qscore_batch_size", "Images per ONNX Runtime run, by model.")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            &["model"],
        )
        .expect("valid metric");
        let score = HistogramVec::new(
            HistogramOpts::new("qscore_score", "Q-Scores answered, by model.")
                .buckets(vec![0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]),
            &["model"],
        )
        .expect("valid metric");
        let queue_wait = HistogramVec::new(
            HistogramOpts::new("qscore_queue_wait_seconds", "Time an image waited in its model's queue, by model.")
                .buckets(vec![0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            &["model"],
        )
        .expect("valid metric");
        let preprocess_duration = HistogramVec::new(
            HistogramOpts::new(
                "qscore_preprocess_duration_seconds",
                "Decode, resize and normalise time of one image, by model.",
            )
            .buckets(vec![0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            &["model"],
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "qscore_rejected_images_total",
                "Images refused or dropped before inference, by model and reason (overloaded, timeout, cancelled, invalid).",
            ),
            &["model", "reason"],
        )
        .expect("valid metric");
        let explain_passes = IntCounterVec::new(
            Opts::new(
                "qscore_explain_passes_total",
                "Forward passes run for explanations (the unoccluded image and its occluded copies), by model.",
            ),
            &["model"],
        )
        .expect("valid metric");
        let queue_depth =
            IntGaugeVec::new(Opts::new("qscore_queue_depth", "Images waiting in a model's queue."), &["model"])
                .expect("valid metric");
        let images_in_flight =
            IntGauge::new("qscore_images_in_flight", "Images admitted and not yet answered, across models.")
                .expect("valid metric");
        let requests_in_flight =
            IntGauge::new("qscore_http_requests_in_flight", "HTTP requests being handled.").expect("valid metric");
        let memory_budget_used = IntGauge::new(
            "qscore_memory_budget_used_bytes",
            "Bytes of --memory-budget-bytes held now by request bodies, fetched images, decodes and queued tensors.",
        )
        .expect("valid metric");
        let model_info = IntGaugeVec::new(
            Opts::new(
                "qscore_model_info",
                "Always 1; labels name each loaded model's version, device and calibration SHA-256 (empty: uncalibrated).",
            ),
            &["model", "version", "device", "calibration_sha256"],
        )
        .expect("valid metric");
        let model_reloads = IntCounterVec::new(
            Opts::new(
                "qscore_model_reloads_total",
                "Model folders loaded again after start-up, by model and outcome (loaded, failed, removed).",
            ),
            &["model", "outcome"],
        )
        .expect("valid metric");
        let model_load_failing = IntGaugeVec::new(
            Opts::new(
                "qscore_model_load_failing",
                "1 while a model folder's current contents fail to load; the version loaded before keeps serving.",
            ),
            &["model"],
        )
        .expect("valid metric");
        let build_info =
            IntGaugeVec::new(Opts::new("qscore_build_info", "Always 1; labels name the running build."), &["version"])
                .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["model"]).expect("valid metric");
        let drift_ks = gauge(
            "qscore_drift_ks",
            "Kolmogorov-Smirnov statistic of the drift window's Q-Scores against the calibration reference.",
        );
        let drift_psi = gauge(
            "qscore_drift_psi",
            "Population stability index of the drift window's Q-Scores against the reference.",
        );
        let flagged_ratio = gauge("qscore_flagged_ratio", "Share of the drift window flagged likely misclassified.");
        let expected_flagged_ratio =
            gauge("qscore_expected_flagged_ratio", "Share flagged on the calibration reference (held-out images).");
        let drift_mean_p_misclassified = gauge(
            "qscore_drift_mean_p_misclassified",
            "Mean p_misclassified over the drift window: a label-free estimate of the share of recent images the calibrated classifier gets wrong.",
        );
        let reference_mean_p_misclassified = gauge(
            "qscore_reference_mean_p_misclassified",
            "Mean p_misclassified over the calibration reference (held-out images).",
        );
        let drift_window_images = gauge("qscore_drift_window_images", "Answers in the drift window.");
        let drift_embedding_mmd2 = gauge(
            "qscore_drift_embedding_mmd2",
            "Unbiased squared maximum mean discrepancy (Gaussian kernel, dimensionless) between the drift window's most recent embeddings and the calibration's sample of held-out embeddings.",
        );
        let drift_embedding_p_value = gauge(
            "qscore_drift_embedding_p_value",
            "Permutation p-value of qscore_drift_embedding_mmd2: small means the recent embeddings are unlike the reference's.",
        );
        let drift_embedding_window_images =
            gauge("qscore_drift_embedding_window_images", "Embeddings the last embedding drift test compared.");
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "qscore_webhook_events_total",
                "Flagged answers for --flagged-webhook, by outcome (sent, failed after retries, dropped when the queue was full).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let drift_counts = DriftCounts::new();
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(images.clone()),
            Box::new(inference_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(score.clone()),
            Box::new(queue_wait.clone()),
            Box::new(preprocess_duration.clone()),
            Box::new(rejected.clone()),
            Box::new(queue_depth.clone()),
            Box::new(images_in_flight.clone()),
            Box::new(memory_budget_used.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(model_info.clone()),
            Box::new(model_reloads.clone()),
            Box::new(model_load_failing.clone()),
            Box::new(build_info.clone()),
            Box::new(drift_ks.clone()),
            Box::new(drift_psi.clone()),
            Box::new(flagged_ratio.clone()),
            Box::new(expected_flagged_ratio.clone()),
            Box::new(drift_mean_p_misclassified.clone()),
            Box::new(reference_mean_p_misclassified.clone()),
            Box::new(drift_window_images.clone()),
            Box::new(drift_embedding_mmd2.clone()),
            Box::new(drift_embedding_p_value.clone()),
            Box::new(drift_embedding_window_images.clone()),
            Box::new(webhook_events.clone()),
            Box::new(explain_passes.clone()),
        ]
        .into_iter()
        .chain(drift_counts.collectors())
        {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            http_requests,
            http_duration,
            images,
            inference_duration,
            batch_size,
            score,
            queue_wait,
            preprocess_duration,
            rejected,
            explain_passes,
            queue_depth,
            images_in_flight,
            memory_budget_used,
            requests_in_flight,
            model_info,
            model_reloads,
            model_load_failing,
            build_info,
            drift_ks,
            drift_psi,
            flagged_ratio,
            expected_flagged_ratio,
            drift_mean_p_misclassified,
            reference_mean_p_misclassified,
            drift_window_images,
            drift_embedding_mmd2,
            drift_embedding_p_value,
            drift_embedding_window_images,
            webhook_events,
            drift_counts,
        }
    }

    /// Sets the gauges that describe the server's state, just before a scrape: images in
    /// flight, and per model its queue depth and drift.
    pub fn observe_state(&self, in_flight: usize, budget_used: u64, models: &[(usize, crate::drift::DriftReport)]) {
        self.images_in_flight.set(in_flight as i64);
        self.memory_budget_used.set(budget_used as i64);
        for (depth, r) in models {
            let m = [r.model.as_str()];
            self.queue_depth.with_label_values(&m).set(*depth as i64);
            if r.status == crate::drift::DriftStatus::NoReference {
                // A model reloaded without a calibration must not keep its old version's figures.
                self.forget_drift(&m);
                continue;
            }
            self.drift_window_images.with_label_values(&m).set(r.window_images as f64);
            if let Some(counts) = &r.counts {
                self.drift_counts.observe(&r.model, counts);
            }
            if r.embedding.status == crate::drift::EmbeddingDriftStatus::NoSample {
                let _ = self.drift_embedding_window_images.remove_label_values(&m);
            } else {
                self.drift_embedding_window_images.with_label_values(&m).set(r.embedding.window_images as f64);
            }
            for (gauge, value) in [
                (&self.drift_ks, r.ks),
                (&self.drift_psi, r.psi),
                (&self.flagged_ratio, r.flagged_ratio),
                (&self.expected_flagged_ratio, r.expected_flagged_ratio),
                (&self.drift_mean_p_misclassified, r.mean_p_misclassified),
                (&self.reference_mean_p_misclassified, r.reference_mean_p_misclassified),
                (&self.drift_embedding_mmd2, r.embedding.mmd2),
                (&self.drift_embedding_p_value, r.embedding.p_value),
            ] {
                match value {
                    Some(v) => gauge.with_label_values(&m).set(v),
                    // An empty window has no statistic: export none rather than a stale one.
                    None => {
                        let _ = gauge.remove_label_values(&m);
                    }
                }
            }
        }
    }

    /// Drops every series of a model no longer served, counters and histograms too: folders
    /// renamed again and again must not grow /metrics without bound, and Prometheus reads a
    /// counter that disappears as ended. `qscore_model_reloads_total` stays, to count the removal.
    pub fn forget_model(&self, model: &str) {
        let m = [model];
        let _ = self.queue_depth.remove_label_values(&m);
        let _ = self.model_load_failing.remove_label_values(&m);
        for histogram in
            [&self.inference_duration, &self.batch_size, &self.score, &self.queue_wait, &self.preprocess_duration]
        {
            let _ = histogram.remove_label_values(&m);
        }
        for outcome in [Outcome::Scored, Outcome::Rejected, Outcome::Failed] {
            let _ = self.images.remove_label_values(&[model, outcome.label()]);
        }
        for reason in [Rejection::Overloaded, Rejection::Timeout, Rejection::Cancelled, Rejection::Invalid] {
            let _ = self.rejected.remove_label_values(&[model, reason.label()]);
        }
        self.forget_drift(&m);
    }

    fn forget_drift(&self, m: &[&str; 1]) {
        for gauge in [
            &self.drift_window_images,
            &self.drift_embedding_window_images,
            &self.drift_ks,
            &self.drift_psi,
            &self.flagged_ratio,
            &self.expected_flagged_ratio,
            &self.drift_mean_p_misclassified,
            &self.reference_mean_p_misclassified,
            &self.drift_embedding_mmd2,
            &self.drift_embedding_p_value,
        ] {
            let _ = gauge.remove_label_values(m);
        }
        self.drift_counts.forget(m[0]);
    }

    /// Counts one image refused or dropped for `reason`.
    pub fn rejected(&self, model: &str, reason: Rejection) {
        self.rejected.with_label_values(&[model, reason.label()]).inc();
    }

    /// Counts one image's outcome.
    pub fn image(&self, model: &str, outcome: Outcome) {
        self.images.with_label_values(&[model, outcome.label()]).inc();
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
