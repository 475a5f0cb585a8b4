//! The inference worker: one OS thread per model that owns the ONNX Runtime session.
//!
//! `Session::run` needs `&mut` and blocks for milliseconds, so it never runs on the async
//! runtime. Requests reach the thread through a bounded channel and get their answer on a
//! oneshot; when the channel is full the caller is told at once (`Overloaded`, HTTP 429) rather
//! than left waiting. The thread owns its session and needs no lock.

use std::time::{Duration, Instant};

use ndarray::{Array2, Array4};
use tokio::sync::{mpsc, oneshot};

use crate::{error::Error, metrics::Metrics, model::encoder::Encoder};

/// The representations of one batch and how long the run took.
#[derive(Debug)]
pub struct Inference {
    /// One row per input image.
    pub embeddings: Array2<f32>,
    /// Wall time of the ONNX Runtime run.
    pub duration: Duration,
}

struct Job {
    input: Array4<f32>,
    reply: oneshot::Sender<Result<Inference, String>>,
}

/// A cheap, cloneable handle to a model's worker thread.
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
    model: String,
}

impl Worker {
    /// Starts the worker thread for `model`, which takes ownership of `encoder`.
    pub fn spawn(model: String, mut encoder: Encoder, queue: usize, metrics: Metrics) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Job>(queue.max(1));
        let label = model.clone();
        std::thread::Builder::new().name(format!("infer-{model}")).spawn(move || {
            let inference = metrics.inference_duration.with_label_values(&[&label]);
            let batch_size = metrics.batch_size.with_label_values(&[&label]);
            while let Some(job) = rx.blocking_recv() {
                // A client that went away no longer needs its batch run.
                if job.reply.is_closed() {
                    continue;
                }
                let start = Instant::now();
                let result = encoder.embed(job.input.view()).map_err(|e| format!("{e:#}"));
                let duration = start.elapsed();
                inference.observe(duration.as_secs_f64());
                batch_size.observe(job.input.dim().0 as f64);
                let _ = job.reply.send(result.map(|embeddings| Inference { embeddings, duration }));
            }
        })?;
        Ok(Self { tx, model })
    }

    /// Embeds a batch (N, C, H, W) on the worker thread.
    pub async fn embed(&self, input: Array4<f32>) -> Result<Inference, Error> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Job { input, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded { retry_after_s: 1 },
            mpsc::error::TrySendError::Closed(_) => {
                Error::Unavailable(format!("the inference worker of `{}` has stopped", self.model))
            }
        })?;
        answer
            .await
            .map_err(|_| Error::Unavailable(format!("the inference worker of `{}` stopped mid-request", self.model)))?
            .map_err(|e| Error::Internal(format!("inference failed: {e}")))
    }
}
