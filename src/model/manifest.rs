//! `model.toml`: what a model folder declares about its ONNX file.
//!
//! The manifest is the contract between a recipe that exports an encoder and the server that
//! runs it: tensor names, input geometry, the preprocessing the encoder was trained with, and
//! the Q-Score parameters (design.md section 1). It is validated on load so that a bad manifest
//! stops start-up with a message naming the file and the field.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole `model.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Model name, as used in `?model=`; must equal the folder name.
    pub name: String,
    /// Version of this model build.
    pub version: String,
    /// One line on what the encoder is.
    pub description: String,
    /// Where the weights come from and how the file was built.
    pub provenance: Provenance,
    /// The input tensor.
    pub input: TensorSpec,
    /// The representation tensor.
    pub output: OutputSpec,
    /// How an image becomes the input tensor.
    pub preprocess: PreprocessSpec,
    /// Q-Score parameters.
    #[serde(default)]
    pub qscore: QScoreParams,
    /// The user's own classifier head, when the ONNX file also outputs its logits.
    pub classifier: Option<ClassifierSpec>,
    /// The arithmetic inside the graph (its inputs and outputs are float32 either way).
    #[serde(default)]
    pub precision: Precision,
}

/// The arithmetic inside a model's graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout: runs on every device.
    #[default]
    Fp32,
    /// float16 inside, float32 at the edges (`make fp16-models`, into `models-fp16/`): made for
    /// CUDA. ONNX Runtime's CPU EP has no float16 kernel for most operators and wraps each in
    /// casts, so on CPU it runs at about half the speed of the float32 graph (MobileNetV2, batch
    /// 32: 29 against 65 images/s measured); the engine refuses it there.
    Fp16,
}

/// A classifier head in the same ONNX graph: its logits answer `predicted_class` and, for
/// calibration, say whose mistakes the flag predicts (the model's own, without a predictions
/// file).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// Tensor name of the logits in the ONNX graph, shape (N, classes) before softmax.
    pub output: String,
    /// Class names in the order of the logits; calibration matches them to the class folders.
    pub classes: Vec<String>,
}

/// Provenance of a model build.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Architecture and training.
    pub source: String,
    /// Where the weights were obtained.
    pub weights: String,
    /// The script that produced model.onnx.
    pub recipe: String,
    /// Licence of the weights.
    pub license: String,
}

/// The ONNX input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Channels: 3 (RGB) or 1 (grey).
    pub channels: usize,
    /// Height in pixels.
    pub height: u32,
    /// Width in pixels.
    pub width: u32,
}

/// The ONNX output holding the representation h.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Embedding size d.
    pub dim: usize,
}

/// Preprocessing as written in the manifest.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// Resize the shorter side to this, keeping the aspect ratio, then centre-crop to the input
    /// size. Absent: resize straight to the input size.
    pub resize_shorter: Option<u32>,
    /// Colour the model takes.
    pub color: Color,
    /// Per-channel mean, applied after scaling to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
    /// Decode a large sequential JPEG at 1/4 or 1/8 of its size in the DCT domain (libjpeg's
    /// scaled decoding) when the reduced image still has at least the pixels the resize needs on
    /// both sides, instead of decoding every pixel and resizing them away. Off by default: the
    /// tensor is then not the reference pipeline's, and it pays only for small inputs (the
    /// README's Benchmarks give the measured cosine and speed).
    #[serde(default)]
    pub jpeg_dct_scaling: bool,
}

/// Colour layout of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// Three channels, R G B.
    Rgb,
    /// One luma channel.
    Grey,
}

/// Q-Score parameters for this model (design.md section 1).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QScoreParams {
    /// eps in L = { j : h_j > mu + eps * sigma }.
    pub epsilon: f32,
    /// (lo, hi) percentiles of the non-zero A_j that bound D.
    pub percentiles: (f64, f64),
}

impl Default for QScoreParams {
    fn default() -> Self {
        Self { epsilon: 4.0, percentiles: (50.0, 95.0) }
    }
}

/// Everything the image path needs, flattened from the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// Shorter-side resize before the centre crop.
    pub resize_shorter: Option<u32>,
    /// Colour layout.
    pub color: Color,
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel std.
    pub std: Vec<f32>,
    /// Whether a large JPEG may be decoded at a reduced scale ([`PreprocessSpec::jpeg_dct_scaling`]).
    pub jpeg_dct_scaling: bool,
}

impl Preprocess {
    /// Number of input channels.
    pub fn channels(&self) -> usize {
        match self.color {
            Color::Rgb => 3,
            Color::Grey => 1,
        }
    }
}

impl Manifest {
    /// Reads and validates `dir/model.toml`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("model.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let manifest: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a valid manifest: {e}", path.display()))?;
        manifest.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        let pre = self.preprocess();
        let c = pre.channels();
        if self.input.channels != c {
            return Err(format!("input.channels = {} but preprocess.color needs {c}", self.input.channels));
        }
        if self.preprocess.mean.len() != c || self.preprocess.std.len() != c {
            return Err(format!("preprocess.mean and preprocess.std need {c} values each"));
        }
        if self.preprocess.std.iter().any(|&s| !s.is_finite() || s <= 0.0) {
            return Err("preprocess.std values must be positive".into());
        }
        if self.input.width == 0 || self.input.height == 0 || self.output.dim < 2 {
            return Err("input size must be non-zero and output.dim at least 2".into());
        }
        if let Some(s) = self.preprocess.resize_shorter
            && s < self.input.width.min(self.input.height)
        {
            return Err("preprocess.resize_shorter must be at least the input size".into());
        }
        let (lo, hi) = self.qscore.percentiles;
        if !(0.0..=100.0).contains(&lo) || !(0.0..=100.0).contains(&hi) || lo > hi {
            return Err("qscore.percentiles must be 0 <= lo <= hi <= 100".into());
        }
        if !(self.qscore.epsilon.is_finite()) {
            return Err("qscore.epsilon must be finite".into());
        }
        if let Some(head) = &self.classifier {
            if head.classes.len() < 2 {
                return Err("classifier.classes needs at least two class names".into());
            }
            let mut sorted: Vec<&String> = head.classes.iter().collect();
            sorted.sort();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!("classifier.classes names `{}` twice", w[0]));
            }
            if head.output == self.output.name {
                return Err("classifier.output must be another tensor than output.name".into());
            }
        }
        Ok(())
    }

    /// The preprocessing the image path applies.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            width: self.input.width,
            height: self.input.height,
            resize_shorter: self.preprocess.resize_shorter,
            color: self.preprocess.color,
            mean: self.preprocess.mean.clone(),
            std: self.preprocess.std.clone(),
            jpeg_dct_scaling: self.preprocess.jpeg_dct_scaling,
        }
    }
}
