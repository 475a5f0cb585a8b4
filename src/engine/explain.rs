//! Explanations: which input cells make a feature of h fire, by occlusion
//! ([`crate::explain`] has the method and why).
//!
//! One explanation is one job through the same pipeline as scoring: admission, the decode slot
//! and memory budget, then the model's batching worker, which runs the unoccluded image and
//! then its occluded copies in windows of two batches, gathered with whatever else waits
//! (no second session, no side path). Every bound a client controls (feature count, patch and
//! stride, hence the passes) is checked before the image is decoded. The copies are built one
//! window at a time, with the window's bytes reserved in the decode share of the memory
//! budget; when the future is dropped (the deadline passed, hyper closed the connection) the
//! worker skips the copies still queued and no further window is built. A client that closes
//! its connection while waiting is not seen until the answer is written (the server keeps
//! half-closed connections, `http::connections`), so its explanation runs to the deadline.
//!
//! An explanation records no drift and counts no scored image: its image is a diagnostic
//! request, and its copies are not images anyone sent. Its passes are counted in
//! `qscore_explain_passes_total`, and the worker's own inference metrics see every run.

use std::{sync::Arc, time::Instant};

use ndarray::{Array3, ArrayView1};
use serde::Serialize;

use super::{Engine, ImageScore, Input, Model, Timings, answer::answer, answer::millis};
use crate::{
    error::Error,
    explain::{ExplainError, FeatureChoice, Fill, Occlusion, hottest},
    metrics::Rejection,
    qscore::{self, Discriminative},
};

/// What a client asks of one explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainRequest {
    /// Which features to map.
    pub features: FeatureChoice,
    /// Side of the occluding patch in input pixels; the model's default when absent.
    pub patch: Option<usize>,
    /// Step between patch positions in input pixels; half the patch when absent.
    pub stride: Option<usize>,
    /// What occluded patches are filled with.
    pub fill: Fill,
}

impl Default for ExplainRequest {
    fn default() -> Self {
        Self { features: FeatureChoice::Discriminative, patch: None, stride: None, fill: Fill::Mean }
    }
}

/// The answer of `POST /v1/explain`: one heatmap per feature over the model's input grid.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Explanation {
    /// Model that explained the image.
    pub model: String,
    /// How the maps were made: `occlusion` (a patch of the input tensor filled, run forward; a
    /// cell's value is the feature's drop).
    pub method: &'static str,
    /// The patch plan over the model's input (after resize and crop).
    pub occlusion: Occlusion,
    /// What the occluded patches were filled with.
    pub fill: Fill,
    /// The heatmaps' grid.
    pub grid: Grid,
    /// Occluded forward passes run (the unoccluded one not counted).
    pub passes: usize,
    /// The unoccluded image's answer, as `POST /v1/score` gives it.
    pub score: ImageScore,
    /// One map per feature, in the order asked for (strongest first by default).
    pub features: Vec<FeatureMap>,
    /// Where the time went, in milliseconds.
    pub timings_ms: ExplainTimings,
    /// The preprocessed input (C, H, W), for drawing the overlay; never serialised.
    #[serde(skip)]
    #[schema(ignore)]
    pub input: Array3<f32>,
}

/// The heatmaps' grid over the model's input.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Grid {
    /// Rows of cells.
    pub rows: usize,
    /// Columns of cells.
    pub cols: usize,
    /// Side of a cell in input pixels (the stride; the last row and column may be narrower).
    pub cell_px: usize,
}

/// One feature's heatmap and its summary.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FeatureMap {
    /// Feature index in the representation h.
    pub index: usize,
    /// Whether the feature is in the calibrated discriminative set D (every feature is when the
    /// model is uncalibrated).
    pub discriminative: bool,
    /// Whether it is highly activating on this image (in L: h_j > mu + eps * sigma).
    pub active: bool,
    /// h_j on the unoccluded image.
    pub activation: f32,
    /// (h_j - mu) / sigma on the unoccluded image; 0 when sigma is 0.
    pub z_score: f32,
    /// The cell whose occlusion lowers the feature most; null when the map is empty.
    pub hottest: Option<HotCell>,
    /// The largest drop of one occluded pass, as a share of `activation` (1: some patch alone
    /// switches the feature off); null when `activation` is 0.
    pub max_drop_share: Option<f32>,
    /// `grid.rows` x `grid.cols` values, row-major: the feature's mean drop when the patches
    /// over the cell are occluded, in units of h_j (negative: occluding raises it).
    pub heatmap: Vec<f32>,
}

/// A heatmap's hottest cell.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct HotCell {
    /// Row in the grid.
    pub row: usize,
    /// Column in the grid.
    pub col: usize,
    /// Its left edge in input pixels.
    pub x: usize,
    /// Its top edge in input pixels.
    pub y: usize,
    /// Its width in input pixels.
    pub width: usize,
    /// Its height in input pixels.
    pub height: usize,
    /// Its heatmap value.
    pub value: f32,
}

/// An explanation's timings in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct ExplainTimings {
    /// Decode, resize and normalise of the image.
    pub decode: f64,
    /// The unoccluded pass, queue included.
    pub unoccluded: f64,
    /// Building, queueing and running every occluded copy.
    pub occluded: f64,
    /// From the start of the call to the answer.
    pub total: f64,
}

impl Engine {
    /// Explains one image with `model`: a heatmap per feature asked for. Fails whole (there is
    /// one image): a bad request before any work, then as [`Engine::score`] fails.
    pub async fn explain(
        &self,
        model: &Arc<Model>,
        input: Input,
        request: &ExplainRequest,
    ) -> Result<Explanation, Error> {
        let start = Instant::now();
        let deadline = start + self.request_timeout;
        let limits = self.explain;
        let (height, width) = (model.preprocess.height as usize, model.preprocess.width as usize);
        let plan = Occlusion::plan(height, width, request.patch, request.stride, &limits)?;
        let dim = model.manifest.output.dim;
        if let FeatureChoice::List(list) = &request.features {
            // The edge parsed it against the same bounds; a library caller gets them too.
            if list.len() > limits.max_features || list.iter().any(|&j| j >= dim) {
                return Err(ExplainError::Features(format!(
                    "must list at most {} distinct features below {dim}",
                    limits.max_features
                ))
                .into());
            }
        }
        let bytes = input.bytes?;

        // Copies live one window at a time: two of the worker's batches, fewer when the decode
        // share of the budget could not hold them.
        let tensor_bytes = (model.preprocess.channels() * height * width * std::mem::size_of::<f32>()) as u64;
        let fits = (self.budget.share_bytes() / tensor_bytes.max(1)).max(1) as usize;
        let window = (2 * model.worker.max_batch()).min(plan.passes()).min(fits).max(1);
        let name = model.name();
        let _running = self.explaining.admit(1).inspect_err(|_| self.metrics.rejected(name, Rejection::Overloaded))?;
        let _permit =
            self.admission.admit(1 + window).inspect_err(|_| self.metrics.rejected(name, Rejection::Overloaded))?;

        let work = async {
            let (tensor, decode, _tensor_held) = self.prepare(model, bytes, deadline).await?;
            let t = Instant::now();
            let first = model.worker.embed_many(vec![tensor.clone()], deadline).await?.pop();
            let first = first.ok_or_else(|| Error::Internal("the worker answered no representation".into()))?;
            let unoccluded = t.elapsed();
            let h = ArrayView1::from(&first.embedding);
            let score = qscore::score(h, model.qscore.epsilon, &model.discriminative)
                .map_err(|e| Error::InvalidEmbedding(e.to_string()))?;
            let active = qscore::score(h, model.qscore.epsilon, &Discriminative::All)
                .map_err(|e| Error::InvalidEmbedding(e.to_string()))?
                .features;
            let chosen: Vec<usize> = match &request.features {
                FeatureChoice::Discriminative => score.features.iter().map(|f| f.index).collect(),
                FeatureChoice::Active => active.iter().map(|f| f.index).collect(),
                FeatureChoice::List(list) => list.clone(),
            };
            let chosen: Vec<usize> = chosen.into_iter().take(limits.max_features).collect();

            let t = Instant::now();
            let base: Vec<f32> = chosen.iter().map(|&j| first.embedding[j]).collect();
            let positions: Vec<(usize, usize)> = plan.positions().collect();
            let fill = request.fill.values(&model.preprocess.mean, &model.preprocess.std);
            let mut drops: Vec<Vec<f32>> = Vec::with_capacity(positions.len());
            let _copies_held = self.budget.decode(window as u64 * tensor_bytes, deadline).await?;
            for chunk in positions.chunks(window) {
                let copies = chunk.iter().map(|&p| plan.occlude(tensor.view(), p, &fill)).collect();
                for out in model.worker.embed_many(copies, deadline).await? {
                    if let Some(j) = out.embedding.iter().position(|v| !v.is_finite()) {
                        return Err(Error::InvalidEmbedding(format!(
                            "an occluded copy's representation has a non-finite value at feature {j}"
                        )));
                    }
                    drops.push(chosen.iter().zip(&base).map(|(&j, b)| b - out.embedding[j]).collect());
                }
            }
            let occluded = t.elapsed();
            self.metrics.explain_passes.with_label_values(&[name]).inc_by(1 + positions.len() as u64);

            let timings = Timings {
                decode: millis(decode),
                queue: millis(first.queue_wait),
                inference: millis(first.inference),
                batch_size: first.batch_size,
                total: millis(start.elapsed()),
            };
            let (mu, sigma) = (score.stats.mu, score.stats.sigma);
            let answered = answer(
                model,
                score,
                h,
                first.logits.as_deref(),
                input.confidence,
                timings,
                super::EmbeddingMode::Omit,
            )?;
            let maps = plan.heatmaps(&drops, chosen.len());
            let (_, cols) = plan.grid();
            let features = chosen
                .iter()
                .zip(maps)
                .enumerate()
                .map(|(i, (&j, heatmap))| {
                    let activation = base[i];
                    let largest = drops.iter().map(|d| d[i]).fold(f32::NEG_INFINITY, f32::max);
                    let hot = hottest(&heatmap).map(|(cell, value)| {
                        let (y, x, height, width) = plan.cell_rect(cell / cols, cell % cols);
                        HotCell { row: cell / cols, col: cell % cols, x, y, width, height, value }
                    });
                    FeatureMap {
                        index: j,
                        discriminative: model.discriminative.contains(j),
                        active: active.iter().any(|f| f.index == j),
                        activation,
                        z_score: if sigma > 0.0 { (activation - mu) / sigma } else { 0.0 },
                        hottest: hot,
                        max_drop_share: (activation != 0.0 && largest.is_finite()).then(|| largest / activation),
                        heatmap,
                    }
                })
                .collect();
            let (rows, cols) = plan.grid();
            Ok(Explanation {
                model: name.to_owned(),
                method: "occlusion",
                occlusion: plan,
                fill: request.fill,
                grid: Grid { rows, cols, cell_px: plan.stride },
                passes: positions.len(),
                score: answered,
                features,
                timings_ms: ExplainTimings {
                    decode: millis(decode),
                    unoccluded: millis(unoccluded),
                    occluded: millis(occluded),
                    total: millis(start.elapsed()),
                },
                input: tensor,
            })
        };
        match tokio::time::timeout_at(deadline.into(), work).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::Timeout),
        }
    }
}
