//! Prometheus metric families.
//!
//! Names follow Prometheus conventions: the `qscore_` prefix, `_total` on counters, base units
//! (seconds), and labels of bounded cardinality only (model, route, status class, outcome).
//! A model name becomes a label only after it matched a loaded model, so clients cannot grow
//! the label set.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

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
    /// Duration of one ONNX Runtime run.
    pub inference_duration: HistogramVec,
    /// Images per ONNX Runtime run.
    pub batch_size: HistogramVec,
    /// Q-Scores answered: the raw material of drift monitoring.
    pub score: HistogramVec,
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
            HistogramOpts::new("qscore_inference_duration_seconds", "Duration of one ONNX Runtime run, by model.")
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
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(images.clone()),
            Box::new(inference_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(score.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self { registry, http_requests, http_duration, images, inference_duration, batch_size, score }
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
