//! Occlusion sensitivity: which input cells make a feature of h fire (issue 14, part 3).
//!
//! ONNX Runtime runs models forward only, so there are no gradients to read a saliency map
//! from. Occlusion sensitivity (Zeiler and Fergus, 2014) needs nothing else: a square patch of
//! the model's input tensor is filled ([`Fill`]: by default with 0, the per-channel mean the
//! model was normalised with, so the patch carries no signal on average; or with black, for
//! data on a black background), the occluded copy is run forward, and the drop of
//! feature j, `h_j(x) - h_j(x with the patch occluded)`, is what that patch contributed. The
//! patch slides over the input with a stride; every position is one forward pass. The drops are
//! deterministic (unlike RISE's random masks, which need thousands of passes to average out their
//! noise), their count is known before anything runs, and each says something a user can check:
//! "hide this square and the feature loses this much".
//!
//! The heatmap is over the model's input (28x28 for Fashion-MNIST, 224x224 for MobileNetV2, after
//! resize and crop), in cells of `stride` x `stride` pixels: a cell's value is the mean of the drops
//! of the patches that overlap it, weighted by the overlap's area. Positive: occluding the cell
//! lowers the feature (the cell supports it); negative: occluding it raises the feature.
//!
//! Everything here is pure: plans checked against bounds before anything is allocated, the
//! occluded copies, the accumulation of drops into heatmaps, the parser of a client's feature
//! list. [`overlay`] draws a heatmap over the input it explains. The engine
//! ([`crate::engine::Engine::explain`]) runs the copies through the model's batching worker.

pub mod overlay;

use ndarray::{Array3, ArrayView3, s};
use serde::Serialize;

/// What a client may ask of one explanation: checked before any work or allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainLimits {
    /// Most features one explanation maps (each is one heatmap in the answer).
    pub max_features: usize,
    /// Most occluded forward passes one explanation may cost.
    pub max_passes: usize,
    /// Most explanations running at once, across models. Admission counts the copies an
    /// explanation holds, not the passes still to come, so without this cap a few dear plans
    /// could all be admitted and all run past the deadline; and since a client that left is only
    /// noticed when its answer is written, it bounds what abandoned explanations can take.
    pub max_concurrent: usize,
}

/// Most cells one heatmap may have, whatever the input size: a small stride over a large input
/// would otherwise make every map, and so the answer, as large as the input itself.
pub const MAX_GRID_CELLS: usize = 4096;

impl ExplainLimits {
    /// The server's defaults: 16 heatmaps, 1024 passes (about six times the default plan's 169),
    /// two explanations at a time (one per core of a small machine).
    pub const DEFAULT: Self = Self { max_features: 16, max_passes: 1024, max_concurrent: 2 };
}

/// Why a plan or a feature list was refused; every variant is the client's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// `patch` outside [1, the input's shorter side].
    #[error("`patch` must be between 1 and {max} (the model's input is {height}x{width} pixels); got {got}")]
    Patch {
        /// What the client sent.
        got: usize,
        /// The input's shorter side.
        max: usize,
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
    },
    /// `stride` outside [1, patch]: a larger stride would leave pixels no patch covers.
    #[error(
        "`stride` must be between 1 and `patch` ({patch}) so that every pixel is occluded once at least; got {got}"
    )]
    Stride {
        /// What the client sent.
        got: usize,
        /// The patch size in force.
        patch: usize,
    },
    /// The plan needs more forward passes than the server allows.
    #[error(
        "patch {patch} with stride {stride} over a {height}x{width} input needs {passes} occluded passes; the limit is {limit} (--max-explain-passes): raise `stride` or `patch`"
    )]
    TooManyPasses {
        /// Patch size.
        patch: usize,
        /// Stride.
        stride: usize,
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
        /// Passes the plan needs.
        passes: u64,
        /// The limit.
        limit: usize,
    },
    /// The heatmap's grid would have more cells than [`MAX_GRID_CELLS`].
    #[error(
        "stride {stride} over a {height}x{width} input makes a heatmap of {cells} cells; the limit is {limit}: raise `stride`"
    )]
    TooManyCells {
        /// Stride.
        stride: usize,
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
        /// Cells the grid would have.
        cells: u64,
        /// The limit.
        limit: usize,
    },
    /// The feature list did not parse, or names a feature twice or past the representation.
    #[error("`features` {0}")]
    Features(String),
}

/// What an occluded patch is filled with.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// The per-channel mean the model was normalised with (0 in the input tensor): no signal on
    /// average over the training data. The default.
    #[default]
    Mean,
    /// Black pixels (`-mean / std` in the tensor): for data on a black background
    /// (Fashion-MNIST), where it removes a part without drawing anything new; on such data a
    /// mean-filled patch is a grey blob the model may react to wherever it lands.
    Black,
}

impl Fill {
    /// The tensor value per channel for a model normalised with `mean` and `std`.
    pub fn values(self, mean: &[f32], std: &[f32]) -> Vec<f32> {
        match self {
            Self::Mean => vec![0.0; mean.len()],
            Self::Black => mean.iter().zip(std).map(|(m, s)| -m / s).collect(),
        }
    }
}

/// Where occluding patches go over an input of `height` x `width` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Occlusion {
    /// Input height in pixels (the model's input, after resize and crop).
    pub height: usize,
    /// Input width in pixels.
    pub width: usize,
    /// Side of the square occluding patch, in input pixels.
    pub patch: usize,
    /// Step between patch positions, in input pixels; also the heatmap's cell size.
    pub stride: usize,
}

/// Positions along one axis of `len` pixels: every `stride` while the patch fits, then one
/// flush with the far edge when the last left a gap, so every pixel is covered.
fn axis_positions(len: usize, patch: usize, stride: usize) -> impl Iterator<Item = usize> {
    let span = len - patch;
    let regular = span / stride + 1;
    let extra = usize::from(!span.is_multiple_of(stride));
    (0..regular).map(move |i| i * stride).chain((extra == 1).then_some(span))
}

/// Half the patch: neighbouring positions overlap by half.
fn default_stride(patch: usize) -> usize {
    (patch / 2).max(1)
}

/// Number of positions along one axis, computed without building them.
fn axis_count(len: usize, patch: usize, stride: usize) -> usize {
    (len - patch).div_ceil(stride) + 1
}

impl Occlusion {
    /// The default patch and stride for an input: a patch of a seventh of the shorter side
    /// (4 px of Fashion-MNIST's 28, 32 px of MobileNetV2's 224: about a sleeve, an object's
    /// part) at half-patch stride, so 13 x 13 = 169 passes for both and a 14 x 14 heatmap;
    /// overlapping patches make the map smoother than the patch grid alone.
    pub fn default_patch(height: usize, width: usize) -> (usize, usize) {
        let patch = height.min(width).div_ceil(7).max(1);
        (patch, default_stride(patch))
    }

    /// A plan for an input of `height` x `width` with the client's patch and stride (the
    /// defaults where absent), refused when out of bounds or dearer than `limits.max_passes`.
    /// Only arithmetic happens before the refusal.
    pub fn plan(
        height: usize,
        width: usize,
        patch: Option<usize>,
        stride: Option<usize>,
        limits: &ExplainLimits,
    ) -> Result<Self, ExplainError> {
        let max = height.min(width);
        let patch = patch.unwrap_or(Self::default_patch(height, width).0);
        if patch == 0 || patch > max {
            return Err(ExplainError::Patch { got: patch, max, height, width });
        }
        // A stride left to its default follows the patch in force, the client's or the default.
        let stride = stride.unwrap_or(default_stride(patch));
        if stride == 0 || stride > patch {
            return Err(ExplainError::Stride { got: stride, patch });
        }
        let plan = Self { height, width, patch, stride };
        let cells = height.div_ceil(stride) as u64 * width.div_ceil(stride) as u64;
        if cells > MAX_GRID_CELLS as u64 {
            return Err(ExplainError::TooManyCells { stride, height, width, cells, limit: MAX_GRID_CELLS });
        }
        let passes = axis_count(height, patch, stride) as u64 * axis_count(width, patch, stride) as u64;
        if passes > limits.max_passes as u64 {
            return Err(ExplainError::TooManyPasses { patch, stride, height, width, passes, limit: limits.max_passes });
        }
        Ok(plan)
    }

    /// Occluded forward passes this plan costs (the unoccluded one not counted).
    pub fn passes(&self) -> usize {
        axis_count(self.height, self.patch, self.stride) * axis_count(self.width, self.patch, self.stride)
    }

    /// Top-left corners (y, x) of the patch positions, row by row.
    pub fn positions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        axis_positions(self.height, self.patch, self.stride)
            .flat_map(move |y| axis_positions(self.width, self.patch, self.stride).map(move |x| (y, x)))
    }

    /// The heatmap's grid: (rows, columns) of cells of `stride` pixels (the last row and column
    /// may be narrower).
    pub fn grid(&self) -> (usize, usize) {
        (self.height.div_ceil(self.stride), self.width.div_ceil(self.stride))
    }

    /// A copy of `input` (C, H, W) with the patch at `(y, x)` set to `fill[c]` in channel c
    /// ([`Fill::values`]).
    pub fn occlude(&self, input: ArrayView3<f32>, (y, x): (usize, usize), fill: &[f32]) -> Array3<f32> {
        let mut copy = input.to_owned();
        for (c, &v) in fill.iter().enumerate().take(copy.dim().0) {
            copy.slice_mut(s![c, y..y + self.patch, x..x + self.patch]).fill(v);
        }
        copy
    }

    /// Heatmaps from the drops: `drops[p][f]` is feature f's drop when the p-th position of
    /// [`Occlusion::positions`] is occluded. Answers one row-major grid per feature.
    pub fn heatmaps(&self, drops: &[Vec<f32>], features: usize) -> Vec<Vec<f32>> {
        let (rows, cols) = self.grid();
        let cells = rows * cols;
        let mut sums = vec![vec![0.0_f64; cells]; features];
        let mut weights = vec![0.0_f64; cells];
        let overlap = |lo: usize, hi: usize, cell: usize, len: usize| {
            let (c0, c1) = (cell * self.stride, ((cell + 1) * self.stride).min(len));
            hi.min(c1).saturating_sub(lo.max(c0))
        };
        for ((y, x), drop) in self.positions().zip(drops) {
            let (y1, x1) = (y + self.patch, x + self.patch);
            for r in y / self.stride..y1.div_ceil(self.stride).min(rows) {
                let dy = overlap(y, y1, r, self.height);
                for c in x / self.stride..x1.div_ceil(self.stride).min(cols) {
                    let area = (dy * overlap(x, x1, c, self.width)) as f64;
                    if area == 0.0 {
                        continue;
                    }
                    let cell = r * cols + c;
                    weights[cell] += area;
                    for (sum, &d) in sums.iter_mut().zip(drop) {
                        sum[cell] += area * f64::from(d);
                    }
                }
            }
        }
        sums.into_iter()
            .map(|sum| sum.iter().zip(&weights).map(|(s, w)| if *w > 0.0 { (s / w) as f32 } else { 0.0 }).collect())
            .collect()
    }

    /// The pixel rectangle (y, x, height, width) of cell (row, col).
    pub fn cell_rect(&self, row: usize, col: usize) -> (usize, usize, usize, usize) {
        let (y, x) = (row * self.stride, col * self.stride);
        (y, x, self.stride.min(self.height - y), self.stride.min(self.width - x))
    }
}

/// The hottest cell of a heatmap: its index in the row-major grid and its value; `None` for an
/// empty map.
pub fn hottest(heatmap: &[f32]) -> Option<(usize, f32)> {
    heatmap.iter().copied().enumerate().filter(|(_, v)| v.is_finite()).max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Which features to map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureChoice {
    /// The discriminative features that fired (L ∩ D), strongest first: the default.
    Discriminative,
    /// Every highly activating feature (L), strongest first, discriminative or not.
    Active,
    /// These indices, in this order.
    List(Vec<usize>),
}

/// Parses a client's `features`: `discriminative`, `active`, or a comma-separated list of
/// distinct decimal feature indices below `dim` (spaces around items allowed), at most
/// `max` of them. Reads at most `max + 1` items, so a list of any length costs what `max` does.
pub fn parse_features(text: &str, dim: usize, max: usize) -> Result<FeatureChoice, ExplainError> {
    let bad = |m: String| Err(ExplainError::Features(m));
    match text.trim() {
        "discriminative" => return Ok(FeatureChoice::Discriminative),
        "active" => return Ok(FeatureChoice::Active),
        "" => return bad("is empty; send `discriminative`, `active` or indices such as `3,17,42`".into()),
        _ => {}
    }
    let mut list: Vec<usize> = Vec::new();
    for (n, item) in text.split(',').enumerate() {
        if n >= max {
            return bad(format!("lists more than {max} features (--max-explain-features); ask for fewer"));
        }
        let item = item.trim();
        // Digits only: `+3`, `0x3` and `3.0` are not indices; a long run of digits is past any
        // dim, and is refused without parsing past what a usize holds.
        if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
            let shown: String = item.chars().take(32).collect();
            return bad(format!("item {} (`{shown}`) is not a feature index (a non-negative integer)", n + 1));
        }
        let index = match item.parse::<usize>() {
            Ok(i) if i < dim => i,
            _ => {
                let shown: String = item.chars().take(32).collect();
                return bad(format!("item {} is {shown}; this model's features are 0 to {}", n + 1, dim - 1));
            }
        };
        if list.contains(&index) {
            return bad(format!("names feature {index} twice"));
        }
        list.push(index);
    }
    Ok(FeatureChoice::List(list))
}

#[cfg(test)]
mod tests {
    use ndarray::Array3;

    use super::*;

    const LIMITS: ExplainLimits = ExplainLimits::DEFAULT;

    #[test]
    fn default_plans_cost_169_passes_for_both_bundled_input_sizes() {
        for side in [28, 224] {
            let plan = Occlusion::plan(side, side, None, None, &LIMITS).unwrap();
            assert_eq!(plan.passes(), 169, "{plan:?}");
            assert_eq!(plan.positions().count(), 169);
            assert_eq!(plan.grid(), (side / plan.stride, side / plan.stride));
        }
    }

    #[test]
    fn positions_cover_every_pixel_even_when_the_stride_does_not_divide() {
        let plan = Occlusion::plan(10, 7, Some(4), Some(3), &LIMITS).unwrap();
        let mut covered = [false; 70];
        for (y, x) in plan.positions() {
            assert!(y + 4 <= 10 && x + 4 <= 7);
            for yy in y..y + 4 {
                for xx in x..x + 4 {
                    covered[yy * 7 + xx] = true;
                }
            }
        }
        assert!(covered.iter().all(|&c| c));
        assert_eq!(plan.passes(), plan.positions().count());
    }

    #[test]
    fn bounds_are_checked_before_anything_is_built() {
        assert!(matches!(Occlusion::plan(28, 28, Some(0), None, &LIMITS), Err(ExplainError::Patch { .. })));
        assert!(matches!(Occlusion::plan(28, 28, Some(29), None, &LIMITS), Err(ExplainError::Patch { .. })));
        assert!(matches!(Occlusion::plan(28, 28, Some(4), Some(5), &LIMITS), Err(ExplainError::Stride { .. })));
        assert!(matches!(Occlusion::plan(28, 28, Some(4), Some(0), &LIMITS), Err(ExplainError::Stride { .. })));
        assert_eq!(Occlusion::plan(224, 224, Some(8), Some(8), &LIMITS).unwrap().passes(), 784);
        assert!(matches!(
            Occlusion::plan(224, 224, Some(8), Some(4), &LIMITS),
            Err(ExplainError::TooManyPasses { passes: 3025, .. })
        ));
        assert!(matches!(
            Occlusion::plan(224, 224, Some(200), Some(1), &LIMITS),
            Err(ExplainError::TooManyCells { cells: 50176, .. })
        ));
        assert!(matches!(Occlusion::plan(28, 28, Some(usize::MAX), None, &LIMITS), Err(ExplainError::Patch { .. })));
        // A whole-input patch is one pass.
        assert_eq!(Occlusion::plan(28, 28, Some(28), Some(28), &LIMITS).unwrap().passes(), 1);
    }

    #[test]
    fn occlude_zeroes_only_the_patch() {
        let input = Array3::<f32>::ones((3, 8, 8));
        let plan = Occlusion::plan(8, 8, Some(2), Some(2), &LIMITS).unwrap();
        let copy = plan.occlude(input.view(), (2, 4), &Fill::Mean.values(&[0.5; 3], &[0.25; 3]));
        assert_eq!(copy.iter().filter(|&&v| v == 0.0).count(), 3 * 4);
        assert_eq!(copy[[1, 3, 5]], 0.0);
        assert_eq!(copy[[1, 1, 5]], 1.0);
        let black = plan.occlude(input.view(), (0, 0), &Fill::Black.values(&[0.5, 0.5, 0.5], &[0.25, 0.5, 1.0]));
        assert_eq!((black[[0, 0, 0]], black[[1, 1, 1]], black[[2, 0, 1]]), (-2.0, -1.0, -0.5));
    }

    /// A feature that is the sum of one pixel: only the cells whose patches cover that pixel
    /// are hot, and the hottest is the pixel's own cell.
    #[test]
    fn heatmap_points_at_the_pixel_a_feature_reads() {
        let plan = Occlusion::plan(8, 8, Some(2), Some(1), &LIMITS).unwrap();
        let (py, px) = (5, 2);
        let drops: Vec<Vec<f32>> = plan
            .positions()
            .map(|(y, x)| vec![if (y..y + 2).contains(&py) && (x..x + 2).contains(&px) { 1.0 } else { 0.0 }])
            .collect();
        let maps = plan.heatmaps(&drops, 1);
        let (rows, cols) = plan.grid();
        assert_eq!((rows, cols), (8, 8));
        let (cell, value) = hottest(&maps[0]).unwrap();
        assert_eq!((cell / cols, cell % cols), (py, px));
        assert!(value > 0.0);
        assert_eq!(maps[0][0], 0.0);
    }

    #[test]
    fn feature_lists_are_bounded_distinct_and_in_range() {
        assert_eq!(parse_features("discriminative", 128, 16), Ok(FeatureChoice::Discriminative));
        assert_eq!(parse_features(" active ", 128, 16), Ok(FeatureChoice::Active));
        assert_eq!(parse_features("3, 17,42", 128, 16), Ok(FeatureChoice::List(vec![3, 17, 42])));
        for bad in ["", ",", "3,,4", "-1", "+3", "3.0", "0x3", "128", "99999999999999999999999999", "3,3", "a"] {
            assert!(parse_features(bad, 128, 16).is_err(), "{bad}");
        }
        let many = (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(parse_features(&many, 128, 16).is_err());
        assert!(parse_features(&many[..many.find(",16").unwrap()], 128, 16).is_ok());
    }
}
