//! Dynamic batching: one queue and one inference thread per model.
//!
//! `Session::run` needs `&mut` and blocks for milliseconds, so it never runs on the async
//! runtime. Every prepared image, from any request, is sent to its model's thread as one entry;
//! the thread owns the queue (the channel) and the session, and gathers entries into one ONNX
//! Runtime run of at most `max_batch` images. It waits for a batch to fill (at most
//! `max_delay`) only while more images for the model are being decoded: a lone request is run at
//! once, and a burst is gathered. This is TEI's shape (`core/src/queue.rs`: a task owns the queue
//! and is fed by a channel), on an OS thread because the work under it is blocking.
//!
//! Entries whose client went away are dropped before they cost inference, and entries still
//! queued at their deadline are answered `Timeout`. Admission (how many images may be in the
//! server at once) is decided before decoding, by [`super::admission::Admission`], so the queue never grows
//! without bound.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis};
use tokio::sync::oneshot;

pub use crate::model::encoder::Encoded;
use crate::{
    error::Error,
    metrics::{Metrics, Rejection},
};

/// What a model's thread runs: a batch of preprocessed images in, one representation per image
/// out. ONNX Runtime's [`crate::model::encoder::Encoder`] is the real one; tests drive the
/// whole pipeline with a fake.
pub trait Embedder: Send + 'static {
    /// Runs a batch of shape (N, C, H, W); answers the representations (N, d) and, for a model
    /// with a classifier head, its logits (N, classes).
    fn embed(&mut self, batch: ArrayView4<f32>) -> anyhow::Result<Encoded>;

    /// Runs images of shape (C, H, W) as one batch. By default they are stacked into one array
    /// for [`Embedder::embed`]; an embedder with a buffer of its own (the CUDA encoder's pinned
    /// staging) writes them there instead, so each image is copied once on its way to the device.
    fn embed_images(&mut self, images: &[ArrayView3<f32>]) -> anyhow::Result<Encoded> {
        let (c, h, w) = images.first().map(ArrayView3::dim).ok_or_else(|| anyhow::anyhow!("an empty batch"))?;
        let mut input = Array4::<f32>::zeros((images.len(), c, h, w));
        for (mut slot, image) in input.axis_iter_mut(Axis(0)).zip(images) {
            slot.assign(image);
        }
        self.embed(input.view())
    }
}

impl Embedder for crate::model::encoder::Encoder {
    fn embed(&mut self, batch: ArrayView4<f32>) -> anyhow::Result<Encoded> {
        crate::model::encoder::Encoder::embed(self, batch)
    }

    fn embed_images(&mut self, images: &[ArrayView3<f32>]) -> anyhow::Result<Encoded> {
        crate::model::encoder::Encoder::embed_images(self, images)
    }
}

/// How a model's thread forms batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most images in one ONNX Runtime run.
    pub max_batch: usize,
    /// Longest a queued image waits for its batch to fill while more are on their way.
    pub max_delay: Duration,
}

/// One image's representation and what it went through.
#[derive(Debug)]
pub struct Inferred {
    /// The representation h.
    pub embedding: Vec<f32>,
    /// The classifier head's logits, when the model has a head.
    pub logits: Option<Vec<f32>>,
    /// Wall time of the ONNX Runtime run it was part of.
    pub inference: Duration,
    /// Time from being queued to its run starting.
    pub queue_wait: Duration,
    /// Images in its run.
    pub batch_size: usize,
}

struct Entry {
    input: Array3<f32>,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Inferred, Error>>,
}

/// A cheap, cloneable handle to a model's inference thread.
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Entry>,
    model: Arc<str>,
    /// Images admitted for this model and still being decoded: the thread waits for a batch to
    /// fill only while this is non-zero.
    incoming: Arc<AtomicUsize>,
    /// Images sitting in the queue.
    queued: Arc<AtomicUsize>,
    /// Most images in one run.
    max_batch: usize,
}

impl Worker {
    /// Starts the inference thread for `model`, which takes ownership of `encoder`.
    pub fn spawn(
        model: String,
        encoder: impl Embedder,
        settings: BatchSettings,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Entry>();
        let worker = Self {
            tx,
            model: model.as_str().into(),
            incoming: Arc::new(AtomicUsize::new(0)),
            queued: Arc::new(AtomicUsize::new(0)),
            max_batch: settings.max_batch.max(1),
        };
        let (incoming, queued) = (Arc::clone(&worker.incoming), Arc::clone(&worker.queued));
        std::thread::Builder::new()
            .name(format!("infer-{model}"))
            .spawn(move || run(&model, encoder, &rx, settings, &incoming, &queued, &metrics))?;
        Ok(worker)
    }

    /// Announces `n` images that are being decoded for this model; they will be queued or
    /// dropped through the returned guard.
    pub fn expect(&self, n: usize) -> Incoming {
        self.incoming.fetch_add(n, Ordering::AcqRel);
        Incoming { counter: Arc::clone(&self.incoming), left: n }
    }

    /// Images waiting in this model's queue.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Queues one prepared image (C, H, W) and waits for its representation. `incoming` is
    /// the guard from [`Worker::expect`] that covered this image.
    pub async fn embed(
        &self,
        input: Array3<f32>,
        deadline: Instant,
        incoming: &mut Incoming,
    ) -> Result<Inferred, Error> {
        let (reply, answer) = oneshot::channel();
        let entry = Entry { input, queued: Instant::now(), deadline, reply };
        self.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.send(entry);
        incoming.arrived();
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.stopped());
        }
        answer.await.map_err(|_| self.stopped())?
    }

    /// Most images this model's thread runs at once.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Queues prepared images (C, H, W) all at once, as one job, and waits for every
    /// representation, in order. They are announced before the first is sent, so the thread
    /// gathers them into full batches (with whatever else waits) instead of running the first
    /// alone; an explanation's occluded copies take this path. Dropping the future drops the
    /// replies, so copies still queued are skipped, never run.
    pub async fn embed_many(&self, inputs: Vec<Array3<f32>>, deadline: Instant) -> Result<Vec<Inferred>, Error> {
        let mut incoming = self.expect(inputs.len());
        let mut answers = Vec::with_capacity(inputs.len());
        for input in inputs {
            let (reply, answer) = oneshot::channel();
            self.queued.fetch_add(1, Ordering::AcqRel);
            let sent = self.tx.send(Entry { input, queued: Instant::now(), deadline, reply });
            incoming.arrived();
            if sent.is_err() {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(self.stopped());
            }
            answers.push(answer);
        }
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(answer.await.map_err(|_| self.stopped())??);
        }
        Ok(out)
    }

    fn stopped(&self) -> Error {
        Error::Unavailable(format!("the inference worker of `{}` has stopped", self.model))
    }
}

/// Images announced with [`Worker::expect`] and not yet queued; whatever is left when it drops
/// (failed decodes, an abandoned request) is taken back.
pub struct Incoming {
    counter: Arc<AtomicUsize>,
    left: usize,
}

impl Incoming {
    /// One announced image has been queued or has failed to decode.
    pub fn arrived(&mut self) {
        if self.left > 0 {
            self.left -= 1;
            self.counter.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.left, Ordering::AcqRel);
    }
}

/// The thread's loop: gather a batch, drop what nobody waits for, run, answer.
fn run(
    model: &str,
    mut encoder: impl Embedder,
    rx: &mpsc::Receiver<Entry>,
    settings: BatchSettings,
    incoming: &AtomicUsize,
    queued: &AtomicUsize,
    metrics: &Metrics,
) {
    let inference = metrics.inference_duration.with_label_values(&[model]);
    let batch_size = metrics.batch_size.with_label_values(&[model]);
    let queue_wait = metrics.queue_wait.with_label_values(&[model]);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let fill_until = Instant::now() + settings.max_delay;
        while batch.len() < settings.max_batch {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    // Wait only for images already on their way; a lone request runs at once.
                    let now = Instant::now();
                    if incoming.load(Ordering::Acquire) == 0 || now >= fill_until {
                        break;
                    }
                    match rx.recv_timeout((fill_until - now).min(Duration::from_micros(200))) {
                        Ok(e) => batch.push(e),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        queued.fetch_sub(batch.len(), Ordering::AcqRel);

        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for e in batch {
            if e.reply.is_closed() {
                metrics.rejected(model, Rejection::Cancelled);
            } else if now >= e.deadline {
                metrics.rejected(model, Rejection::Timeout);
                let _ = e.reply.send(Err(Error::Timeout));
            } else {
                live.push(e);
            }
        }
        if live.is_empty() {
            continue;
        }

        let images: Vec<ArrayView3<f32>> = live.iter().map(|e| e.input.view()).collect();
        let start = Instant::now();
        let result: Result<Encoded, String> = encoder.embed_images(&images).map_err(|e| format!("{e:#}"));
        drop(images);
        let duration = start.elapsed();
        inference.observe(duration.as_secs_f64());
        batch_size.observe(live.len() as f64);
        let n = live.len();
        match result {
            Ok(Encoded { embeddings, logits }) => {
                for (i, (e, row)) in live.into_iter().zip(embeddings.axis_iter(Axis(0))).enumerate() {
                    let wait = start.saturating_duration_since(e.queued);
                    queue_wait.observe(wait.as_secs_f64());
                    let _ = e.reply.send(Ok(Inferred {
                        embedding: row.to_vec(),
                        logits: logits.as_ref().map(|l| l.row(i).to_vec()),
                        inference: duration,
                        queue_wait: wait,
                        batch_size: n,
                    }));
                }
            }
            Err(msg) => {
                for e in live {
                    let _ = e.reply.send(Err(Error::Internal(format!("inference failed: {msg}"))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_gives_back_what_never_arrived() {
        let counter = Arc::new(AtomicUsize::new(0));
        counter.fetch_add(3, Ordering::AcqRel);
        let mut guard = Incoming { counter: Arc::clone(&counter), left: 3 };
        guard.arrived();
        assert_eq!(counter.load(Ordering::Acquire), 2);
        drop(guard);
        assert_eq!(counter.load(Ordering::Acquire), 0);
    }
}
