//! One ONNX Runtime session running one encoder: a batch of preprocessed images in, one
//! representation per image out.

use std::path::Path;

use anyhow::Context;
use ndarray::{Array2, ArrayView4};
use ort::{
    environment::Environment,
    ep,
    session::{Session, builder::GraphOptimizationLevel},
    value::TensorRef,
};

/// Session settings for every model.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Execution provider.
    pub device: Device,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub intra_threads: usize,
    /// Whether idle intra-op threads spin before sleeping. ONNX Runtime spins by default, which
    /// suits a process that only runs inference; qscore decodes on the same cores, and spinning
    /// threads take their time (README, Benchmarks).
    pub intra_spinning: bool,
    /// Graph optimisation level.
    pub optimization: GraphOptimization,
}

/// ONNX Runtime's graph optimisation levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphOptimization {
    /// No graph optimisation.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Plus operator fusions.
    Extended,
    /// Everything, including layout optimisations.
    All,
}

impl std::str::FromStr for GraphOptimization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(Self::Disable),
            "basic" => Ok(Self::Basic),
            "extended" => Ok(Self::Extended),
            "all" => Ok(Self::All),
            _ => Err(format!("`{s}` is not an optimisation level; use disable, basic, extended or all")),
        }
    }
}

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider on the GPU with this ordinal.
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|&n| n >= 0)
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device; use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// An encoder session with the names of its input and outputs.
pub struct Encoder {
    session: Session,
    input: String,
    output: String,
    dim: usize,
    /// The classifier head's logits tensor and its class count, when the graph has one.
    head: Option<(String, usize)>,
}

/// What one run answers for a batch of N images.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The representations, shape (N, d).
    pub embeddings: Array2<f32>,
    /// The classifier head's logits, shape (N, classes), when the model has a head.
    pub logits: Option<Array2<f32>>,
}

impl Encoder {
    /// Builds a session for `model_path` on the requested device; `head` names the logits
    /// output and its class count when the graph also holds a classifier. A CUDA request whose
    /// provider cannot register is an error carrying ONNX Runtime's reason.
    pub fn load(
        env: &Environment,
        model_path: &Path,
        (input, output, dim): (&str, &str, usize),
        head: Option<(&str, usize)>,
        opts: SessionOptions,
    ) -> anyhow::Result<Self> {
        let fail = |what: &str, e: String| anyhow::anyhow!("{}: {what}: {e}", model_path.display());
        let mut builder = Session::builder(env)
            .map_err(|e| fail("session options", e.to_string()))?
            .with_optimization_level(match opts.optimization {
                GraphOptimization::Disable => GraphOptimizationLevel::Disable,
                GraphOptimization::Basic => GraphOptimizationLevel::Level1,
                GraphOptimization::Extended => GraphOptimizationLevel::Level2,
                GraphOptimization::All => GraphOptimizationLevel::Level3,
            })
            .map_err(|e| fail("optimisation level", e.to_string()))?;
        builder = builder
            .with_intra_op_spinning(opts.intra_spinning)
            .map_err(|e| fail("intra-op spinning", e.to_string()))?;
        if opts.intra_threads > 0 {
            builder =
                builder.with_intra_threads(opts.intra_threads).map_err(|e| fail("intra-op threads", e.to_string()))?;
        }
        if let Device::Cuda(id) = opts.device {
            builder = builder
                .with_execution_providers([ep::CUDA::default().with_device_id(id).build().error_on_failure()])
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--device {} was asked for, but ONNX Runtime's CUDA execution provider could not register: {}. \
                         Use the CUDA build of ONNX Runtime (`make ort-gpu` puts it in ./.ort/) on a machine with an NVIDIA \
                         driver, and CUDA 13 and cuDNN 9 on the library path; or run with --device cpu",
                        opts.device,
                        e.to_string().trim_end_matches('.')
                    )
                })?;
        }
        let session =
            builder.commit_from_file(model_path).map_err(|e| fail("cannot load the ONNX model", e.to_string()))?;
        let mut named = vec![("input", input, session.inputs()), ("output", output, session.outputs())];
        if let Some((logits, _)) = head {
            named.push(("classifier.output", logits, session.outputs()));
        }
        for (what, name, outlets) in named {
            if !outlets.iter().any(|o| o.name() == name) {
                let names: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
                anyhow::bail!(
                    "{}: model.toml names {what} `{name}`, but the graph has {names:?}",
                    model_path.display()
                );
            }
        }
        Ok(Self {
            session,
            input: input.to_owned(),
            output: output.to_owned(),
            dim,
            head: head.map(|(name, classes)| (name.to_owned(), classes)),
        })
    }

    /// Runs a batch (N, C, H, W) and returns the representations (N, d), whatever trailing
    /// singleton axes the graph leaves (N, d, 1, 1 is common for pooled CNNs), and the head's
    /// logits (N, classes) when there is a head.
    pub fn embed(&mut self, batch: ArrayView4<f32>) -> anyhow::Result<Encoded> {
        let n = batch.dim().0;
        let input = TensorRef::from_array_view(batch).context("building the input tensor")?;
        let outputs = self.session.run(ort::inputs![self.input.as_str() => input]).context("ONNX Runtime run")?;
        let rows = |name: &str, width: usize, what: &str| -> anyhow::Result<Array2<f32>> {
            let view =
                outputs[name].try_extract_array::<f32>().with_context(|| format!("reading the {what} tensor"))?;
            if view.len() != n * width {
                anyhow::bail!(
                    "the model answered {what} {:?} for {n} images; model.toml says {width} each",
                    view.shape()
                );
            }
            Ok(Array2::from_shape_vec((n, width), view.iter().copied().collect())?)
        };
        let embeddings = rows(&self.output, self.dim, "features")?;
        let logits = match &self.head {
            Some((name, classes)) => Some(rows(name, *classes, "classifier logits")?),
            None => None,
        };
        Ok(Encoded { embeddings, logits })
    }
}
