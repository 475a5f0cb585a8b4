//! `--flagged-webhook URL`: every flagged answer is POSTed as JSON (model, id, scores; never the
//! image) to one configured endpoint, for labelling queues that take pushes.
//!
//! Scoring never waits for the endpoint: answers go into a bounded channel with `try_send`, and
//! one background task delivers them, each with at most [`ATTEMPTS`] tries and a per-try timeout.
//! When the endpoint is slower than the traffic the channel fills and further events are
//! dropped and counted (`qscore_webhook_events_total{outcome="dropped"}`), rather than holding
//! memory or requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;

use super::{FlaggedObserver, ImageScore};
use crate::metrics::Metrics;

/// Tries per event, first included.
pub const ATTEMPTS: u32 = 3;
/// Events waiting for delivery before new ones are dropped.
const QUEUE: usize = 1024;

/// What is POSTed for one flagged image.
#[derive(Debug, Clone, Serialize)]
pub struct FlaggedEvent {
    /// The model that flagged it.
    pub model: String,
    /// The client's id for the image (file name, JSON id, task id).
    pub id: String,
    /// Its Q-Score.
    pub q_score: f32,
    /// Calibrated p(misclassified).
    pub p_misclassified: Option<f32>,
    /// The estimator behind the flag.
    pub risk_source: Option<crate::risk::RiskSource>,
    /// The probe's class.
    pub predicted_class: Option<String>,
    /// Its probability.
    pub class_probability: Option<f32>,
    /// Seconds since the Unix epoch when it was answered.
    pub answered_at: f64,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct Webhook {
    tx: mpsc::Sender<FlaggedEvent>,
    metrics: Metrics,
}

impl Webhook {
    /// Starts the delivery task for `url`.
    pub fn start(url: reqwest::Url, timeout: Duration, metrics: Metrics) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(timeout).redirect(reqwest::redirect::Policy::none()).build()?;
        let (tx, mut rx) = mpsc::channel::<FlaggedEvent>(QUEUE);
        let m = metrics.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let mut delivered = false;
                for attempt in 0..ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                    }
                    match client.post(url.clone()).json(&event).send().await {
                        Ok(r) if r.status().is_success() => {
                            delivered = true;
                            break;
                        }
                        Ok(r) => tracing::warn!(status = %r.status(), attempt, "flagged webhook refused an event"),
                        Err(e) => tracing::warn!(attempt, "flagged webhook unreachable: {e}"),
                    }
                }
                m.webhook_events.with_label_values(&[if delivered { "sent" } else { "failed" }]).inc();
            }
        });
        Ok(Self { tx, metrics })
    }
}

impl FlaggedObserver for Webhook {
    /// Queues the flagged answer for delivery; never waits.
    fn flagged(&self, id: &str, score: &ImageScore) {
        let event = FlaggedEvent {
            model: score.model.clone(),
            id: id.to_owned(),
            q_score: score.q_score,
            p_misclassified: score.p_misclassified,
            risk_source: score.risk_source,
            predicted_class: score.predicted_class.clone(),
            class_probability: score.class_probability,
            answered_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        };
        if self.tx.try_send(event).is_err() {
            self.metrics.webhook_events.with_label_values(&["dropped"]).inc();
        }
    }
}
