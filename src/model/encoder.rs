//! One ONNX Runtime session running one encoder: a batch of preprocessed images in, one
//! representation per image out.
//!
//! Two ways through ONNX Runtime, chosen per device at load ([`IoPath`]):
//!
//! - **CPU: `Session::run` with host tensors.** The input is borrowed from the batch, the CPU
//!   EP reads it in place, and nothing is copied that need not be. Binding buys nothing there.
//! - **CUDA: IO binding.** The batch is written once into a page-locked (CUDA-pinned) staging
//!   buffer that this encoder owns and reuses, and bound from there: ONNX Runtime uploads it to
//!   the device with one DMA copy, without the driver's extra bounce through its own pinned
//!   buffer that a pageable `session.run` input costs. The outputs are bound to pinned host
//!   memory too: the representations (N x d floats, a few hundred KB at most) are needed on the
//!   host for the Q-Score anyway, so one device-to-host copy straight into memory we read is the
//!   shortest path; keeping them on the device would only add a second copy call. What is
//!   available is probed at load with one run, and a part that ONNX Runtime refuses falls back
//!   to plain host memory, logged, so an unattended GPU run never dies on an optimisation.

use std::path::Path;

use anyhow::Context;
use ndarray::{Array2, Array4, ArrayView3, ArrayView4, Axis};
use ort::{
    environment::Environment,
    ep,
    memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType},
    session::{IoBinding, Session, SessionOutputs, builder::GraphOptimizationLevel},
    value::{Shape, Tensor, TensorRef, TensorRefMut},
};

/// Session settings for every model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Execution provider.
    pub device: Device,
    /// Intra-op threads (0: ONNX Runtime's default, one per core, on CPU; 1 on CUDA, where the
    /// GPU does the work and idle pool threads would only take cores from decoding).
    pub intra_threads: usize,
    /// Whether idle intra-op threads spin before sleeping. ONNX Runtime spins by default, which
    /// suits a process that only runs inference; qscore decodes on the same cores, and spinning
    /// threads take their time (README, Benchmarks).
    pub intra_spinning: bool,
    /// Graph optimisation level.
    pub optimization: GraphOptimization,
    /// The CUDA execution provider's settings; all `None` (ONNX Runtime's defaults) on CPU.
    pub cuda: CudaOptions,
    /// How batches go through ONNX Runtime; `None`: the device's own ([`IoPath::for_device`]).
    /// Only the benchmarks and tests choose, to measure one path against the other.
    pub io: Option<IoPath>,
}

impl Default for SessionOptions {
    /// The CPU, one intra-op thread per core that does not spin (the server's defaults), every
    /// graph optimisation, ONNX Runtime's defaults for the rest.
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            intra_threads: 0,
            intra_spinning: false,
            optimization: GraphOptimization::All,
            cuda: CudaOptions::default(),
            io: None,
        }
    }
}

/// Settings of ONNX Runtime's CUDA execution provider. `None` leaves ONNX Runtime's default
/// (named on each field), so that only what an operator set is passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CudaOptions {
    /// How the device memory arena grows (ONNX Runtime: next power of two).
    pub arena_extend: Option<ArenaExtend>,
    /// Most bytes the device memory arena of one model's session may hold (ONNX Runtime: no
    /// limit). Each model has its own session, so each its own arena.
    pub memory_limit_bytes: Option<u64>,
    /// How cuDNN picks convolution algorithms (ONNX Runtime: exhaustive).
    pub conv_algo_search: Option<ConvAlgoSearch>,
    /// Whether cuDNN's algorithm search may use as much workspace as it wants (ONNX Runtime:
    /// yes); without it the search is held to 32 MB.
    pub conv_max_workspace: Option<bool>,
}

impl CudaOptions {
    /// Whether any setting differs from ONNX Runtime's defaults.
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }
}

/// How the CUDA device memory arena grows when it needs more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaExtend {
    /// Each extension doubles (ONNX Runtime's default): few, large allocations.
    NextPowerOfTwo,
    /// Each extension is exactly what was asked: tighter memory, more allocations.
    SameAsRequested,
}

impl std::str::FromStr for ArenaExtend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "next-power-of-two" => Ok(Self::NextPowerOfTwo),
            "same-as-requested" => Ok(Self::SameAsRequested),
            _ => Err(format!("`{s}` is not an arena extend strategy; use next-power-of-two or same-as-requested")),
        }
    }
}

/// How cuDNN chooses the algorithm of each convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgoSearch {
    /// Benchmark every algorithm on first sight of each input shape (ONNX Runtime's default):
    /// the fastest kernels, at the price of a slow first batch of each new batch size.
    Exhaustive,
    /// cuDNN's heuristics: no benchmarking, usually close to the best.
    Heuristic,
    /// cuDNN's default algorithm (implicit precomputed GEMM): least memory, rarely fastest.
    Default,
}

impl std::str::FromStr for ConvAlgoSearch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exhaustive" => Ok(Self::Exhaustive),
            "heuristic" => Ok(Self::Heuristic),
            "default" => Ok(Self::Default),
            _ => Err(format!("`{s}` is not a cuDNN algorithm search; use exhaustive, heuristic or default")),
        }
    }
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

/// How a batch goes through ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPath {
    /// `Session::run` with host tensors in and out (the CPU's path).
    Run,
    /// IO binding from a staging buffer this encoder owns, outputs bound to host-readable
    /// memory (the CUDA path; pinned memory on CUDA, plain memory on CPU).
    Bind,
}

impl IoPath {
    /// The path a device takes unless told otherwise.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cpu => Self::Run,
            Device::Cuda(_) => Self::Bind,
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
    /// How batches reach ONNX Runtime.
    io: Io,
}

/// What one run answers for a batch of N images.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The representations, shape (N, d).
    pub embeddings: Array2<f32>,
    /// The classifier head's logits, shape (N, classes), when the model has a head.
    pub logits: Option<Array2<f32>>,
}

enum Io {
    Run,
    // Boxed: the binding's state is large, and `Run` encoders should not carry its size.
    Bound(Box<Bound>),
}

/// The IO-binding path's state, kept across runs so that nothing is set up per batch.
struct Bound {
    binding: IoBinding,
    /// Where batches are written before upload; `None` binds the caller's memory as it is.
    staging: Option<Staging>,
    /// Where the outputs land, in words, for the log and the benchmarks.
    outputs: &'static str,
    /// Where the outputs land. They are bound there again before every run: ONNX Runtime keeps
    /// the tensors a run allocated for a device-bound output and refuses the next run whose
    /// batch size differs.
    output_memory: MemoryInfo<'static>,
    /// The names of the bound outputs: the representation, then the head's logits.
    output_names: Vec<String>,
}

/// A host buffer from ONNX Runtime's allocator (pinned on CUDA), reused for every batch and
/// grown by doubling when a bigger batch comes.
struct Staging {
    allocator: Allocator,
    tensor: Tensor<f32>,
    /// Images it holds.
    capacity: usize,
    /// Whether the tensor is always exactly the batch (reallocated when the batch size changes)
    /// instead of a buffer bound through a view of its first rows. ort 2.0.0-rc.15 deadlocks
    /// binding a borrowed tensor (a view) on the device the session reads its input from (its
    /// `bind_input` clones such a value through its own copy session, which binds it again under
    /// the same lock), so a view is bound only where that cannot happen: pinned memory on CUDA,
    /// whose session reads from the device. The CPU EP (tests) binds owned tensors.
    exact: bool,
    /// Floats per image (C x H x W).
    image_len: usize,
    /// C, H, W as ONNX Runtime's shape wants them.
    image_dims: [i64; 3],
}

/// Batches at least this big are copied into the staging buffer by several threads: one core
/// copies about 10 GB/s, so a batch of 32 MobileNet images (19 MB) takes ~2 ms on one, as long
/// as a small GPU runs it, while the GPU waits.
const PARALLEL_COPY_BYTES: usize = 8 << 20;
/// Most threads for that copy; memory bandwidth is saturated by a few, and every other core is
/// decoding images.
const COPY_THREADS: usize = 4;

impl Encoder {
    /// Builds the session of the model folder `dir` as its `manifest` declares it: `model.onnx`,
    /// the input and representation tensors, and the classifier head when there is one. Errors
    /// as [`Encoder::load`].
    pub fn load_folder(
        env: &Environment,
        dir: &Path,
        manifest: &crate::model::manifest::Manifest,
        opts: SessionOptions,
    ) -> anyhow::Result<Self> {
        let head = manifest.classifier.as_ref().map(|c| (c.output.as_str(), c.classes.len()));
        let io = (manifest.input.name.as_str(), manifest.output.name.as_str(), manifest.output.dim);
        Self::load(env, &dir.join("model.onnx"), io, head, opts)
    }

    /// Builds a session for `model_path` on the requested device; `head` names the logits
    /// output and its class count when the graph also holds a classifier. A CUDA request whose
    /// provider cannot register is an error carrying ONNX Runtime's reason. On the IO-binding
    /// path, one probe run (zeros) settles where inputs and outputs live.
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
        let threads = match (opts.intra_threads, opts.device) {
            (0, Device::Cpu) => None,
            (0, Device::Cuda(_)) => Some(1),
            (n, _) => Some(n),
        };
        if let Some(n) = threads {
            builder = builder.with_intra_threads(n).map_err(|e| fail("intra-op threads", e.to_string()))?;
        }
        if let Device::Cuda(id) = opts.device {
            builder = builder
                .with_execution_providers([cuda_provider(id, opts.cuda).build().error_on_failure()])
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--device {} was asked for, but ONNX Runtime's CUDA execution provider could not register: {}. \
                         Use the CUDA build of ONNX Runtime (`make ort-gpu` puts it in ./.ort/) on a machine with an NVIDIA \
                         driver, and CUDA 13 and cuDNN 9 on the library path; or run with --device cpu",
                        opts.device,
                        e.to_string().trim_end().trim_end_matches('.')
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
        let mut encoder = Self {
            session,
            input: input.to_owned(),
            output: output.to_owned(),
            dim,
            head: head.map(|(name, classes)| (name.to_owned(), classes)),
            io: Io::Run,
        };
        if opts.io.unwrap_or(IoPath::for_device(opts.device)) == IoPath::Bind {
            encoder.bind(opts.device).with_context(|| format!("{}: IO binding", model_path.display()))?;
            tracing::info!(model = %model_path.display(), io = %encoder.io_description(), "IO binding ready");
        }
        Ok(encoder)
    }

    /// How batches go through ONNX Runtime, in words (for logs and the benchmarks' tables).
    pub fn io_description(&self) -> String {
        match &self.io {
            Io::Run => "session.run, host tensors".into(),
            Io::Bound(b) => format!(
                "IO binding: input from {}, outputs to {}",
                b.staging.as_ref().map_or("the caller's host memory", |s| staging_kind(&s.allocator)),
                b.outputs
            ),
        }
    }

    /// Sets up the IO-binding path and proves it with one run of zeros. What ONNX Runtime
    /// refuses falls back, logged, in this order: pinned staging with pinned outputs, pinned
    /// staging with host outputs, the caller's memory with host outputs. On the CPU EP every
    /// part is plain host memory (for tests and benchmarks).
    fn bind(&mut self, device: Device) -> anyhow::Result<()> {
        let dims = self.image_dims()?;
        let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        let (mut staging, attempts) = match device {
            Device::Cpu => (Some(Staging::new(Allocator::default(), dims)?), vec![(true, "host memory", host)]),
            Device::Cuda(id) => {
                let pinned = |memory| MemoryInfo::new(AllocationDevice::CUDA_PINNED, id, AllocatorType::Device, memory);
                let staging = pinned(MemoryType::CPUInput)
                    .and_then(|info| Allocator::new(&self.session, info))
                    .and_then(|allocator| Staging::new(allocator, dims))
                    .inspect_err(|e| {
                        tracing::warn!("no CUDA-pinned staging buffer ({e}); batches are bound from pageable memory");
                    })
                    .ok();
                let attempts = vec![
                    (true, "pinned host memory", pinned(MemoryType::CPUOutput)?),
                    (true, "host memory", host.clone()),
                    (false, "host memory", host),
                ];
                (staging, attempts)
            }
        };
        let mut failures = Vec::new();
        for (staged, outputs, memory) in attempts {
            if staged && staging.is_none() {
                continue;
            }
            let binding = self.session.create_binding().context("creating the binding")?;
            let staging_here = if staged { staging.take() } else { None };
            self.io = Io::Bound(Box::new(Bound {
                binding,
                staging: staging_here,
                outputs,
                output_memory: memory,
                output_names: self.output_names(),
            }));
            let probe = Array4::<f32>::zeros((1, dims[0] as usize, dims[1] as usize, dims[2] as usize));
            match self.embed(probe.view()) {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let tried = self.io_description();
                    tracing::warn!("{tried} failed its probe run: {e:#}");
                    failures.push(format!("{tried}: {e:#}"));
                    if let Io::Bound(b) = std::mem::replace(&mut self.io, Io::Run) {
                        staging = staging.or(b.staging);
                    }
                }
            }
        }
        anyhow::bail!("every way of binding failed its probe run: {}", failures.join("; "))
    }

    /// The graph's input dimensions after the batch axis; every one must be fixed.
    fn image_dims(&self) -> anyhow::Result<[i64; 3]> {
        let input = self.session.inputs().iter().find(|i| i.name() == self.input).context("the input is gone")?;
        let shape = input.dtype().tensor_shape().context("the input is not a tensor")?;
        match shape.get(1..) {
            Some(&[c, h, w]) if c > 0 && h > 0 && w > 0 => Ok([c, h, w]),
            _ => anyhow::bail!("the input's shape {shape:?} is not (N, C, H, W) with C, H and W fixed"),
        }
    }

    fn output_names(&self) -> Vec<String> {
        std::iter::once(self.output.clone()).chain(self.head.as_ref().map(|(name, _)| name.clone())).collect()
    }

    /// Runs a batch (N, C, H, W) and returns the representations (N, d), whatever trailing
    /// singleton axes the graph leaves (N, d, 1, 1 is common for pooled CNNs), and the head's
    /// logits (N, classes) when there is a head.
    pub fn embed(&mut self, batch: ArrayView4<f32>) -> anyhow::Result<Encoded> {
        let n = batch.dim().0;
        match &mut self.io {
            Io::Run => {
                let input = TensorRef::from_array_view(batch).context("building the input tensor")?;
                let outputs =
                    self.session.run(ort::inputs![self.input.as_str() => input]).context("ONNX Runtime run")?;
                read(&outputs, n, (&self.output, self.dim), self.head.as_ref())
            }
            Io::Bound(bound) => match &mut bound.staging {
                Some(staging) => {
                    staging.fill(&batch.outer_iter().collect::<Vec<_>>())?;
                    self.run_staged(n)
                }
                None => {
                    // No pinned memory: bind an owned copy (a borrowed one may deadlock ort, see
                    // `Staging::exact`); ONNX Runtime copies it to the device at bind time.
                    let input = Tensor::from_array(batch.to_owned()).context("building the input tensor")?;
                    bound.binding.bind_input(self.input.as_str(), &input).context("binding the input")?;
                    self.run_bound(n)
                }
            },
        }
    }

    /// Runs images (C, H, W) as one batch. On the staged path each image is written once,
    /// straight into the staging buffer; elsewhere they are stacked and run as [`Encoder::embed`].
    pub fn embed_images(&mut self, images: &[ArrayView3<f32>]) -> anyhow::Result<Encoded> {
        if let Io::Bound(bound) = &mut self.io
            && let Some(staging) = &mut bound.staging
        {
            staging.fill(images)?;
            return self.run_staged(images.len());
        }
        self.embed(stack(images)?.view())
    }

    /// Binds the first `n` images of the staging buffer and runs them.
    fn run_staged(&mut self, n: usize) -> anyhow::Result<Encoded> {
        let Io::Bound(bound) = &mut self.io else { anyhow::bail!("not bound") };
        let Bound { binding, staging: Some(staging), .. } = &mut **bound else {
            anyhow::bail!("no staging buffer");
        };
        if staging.capacity == n {
            binding.bind_input(self.input.as_str(), &staging.tensor).context("binding the input")?;
            return self.run_bound(n);
        }
        anyhow::ensure!(!staging.exact, "the staging buffer holds {} images, not {n}", staging.capacity);
        // SAFETY: the view covers the first n images of the staging tensor, which this encoder
        // owns and does not touch again before the run has returned; the view is dropped with
        // the binding's inputs right after the run.
        let memory = staging.tensor.memory_info().to_owned();
        let data = staging.tensor.data_ptr_mut();
        let view = unsafe {
            TensorRefMut::<f32>::from_raw(memory, data, Shape::new(std::iter::once(n as i64).chain(staging.image_dims)))
        }
        .context("a view of the staging buffer")?;
        binding.bind_input(self.input.as_str(), &view).context("binding the input")?;
        self.run_bound(n)
    }

    /// Runs the bound inputs, reads the bound outputs, and lets go of the inputs (so a device
    /// copy of the batch goes back to ONNX Runtime's arena at once).
    fn run_bound(&mut self, n: usize) -> anyhow::Result<Encoded> {
        let Io::Bound(bound) = &mut self.io else { anyhow::bail!("not bound") };
        for name in &bound.output_names {
            if let Err(e) = bound.binding.bind_output_to_device(name, &bound.output_memory) {
                bound.binding.clear_inputs();
                return Err(e).with_context(|| format!("binding output `{name}`"));
            }
        }
        let result = self
            .session
            .run_binding(&bound.binding)
            .context("ONNX Runtime run (IO binding)")
            .and_then(|outputs| read(&outputs, n, (&self.output, self.dim), self.head.as_ref()));
        bound.binding.clear_inputs();
        result
    }
}

/// The CUDA execution provider with the operator's settings; ONNX Runtime's defaults for the
/// rest.
fn cuda_provider(id: i32, o: CudaOptions) -> ep::CUDA {
    let mut cuda = ep::CUDA::default().with_device_id(id);
    if let Some(s) = o.arena_extend {
        cuda = cuda.with_arena_extend_strategy(match s {
            ArenaExtend::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
            ArenaExtend::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
        });
    }
    if let Some(bytes) = o.memory_limit_bytes {
        cuda = cuda.with_memory_limit(usize::try_from(bytes).unwrap_or(usize::MAX));
    }
    if let Some(search) = o.conv_algo_search {
        cuda = cuda.with_conv_algorithm_search(match search {
            ConvAlgoSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvAlgoSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvAlgoSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
        });
    }
    if let Some(max) = o.conv_max_workspace {
        cuda = cuda.with_conv_max_workspace(max);
    }
    cuda
}

fn staging_kind(allocator: &Allocator) -> &'static str {
    if allocator.memory_info().allocation_device() == AllocationDevice::CUDA_PINNED {
        "a pinned staging buffer"
    } else {
        "a host staging buffer"
    }
}

/// Stacks images (C, H, W) into one batch (N, C, H, W).
fn stack(images: &[ArrayView3<f32>]) -> anyhow::Result<Array4<f32>> {
    let (c, h, w) = images.first().context("an empty batch")?.dim();
    let mut input = Array4::<f32>::zeros((images.len(), c, h, w));
    for (mut slot, image) in input.axis_iter_mut(Axis(0)).zip(images) {
        slot.assign(image);
    }
    Ok(input)
}

/// The representations (and logits) of a run of `n` images, checked against the manifest.
fn read(
    outputs: &SessionOutputs<'_>,
    n: usize,
    (output, dim): (&str, usize),
    head: Option<&(String, usize)>,
) -> anyhow::Result<Encoded> {
    let rows = |name: &str, width: usize, what: &str| -> anyhow::Result<Array2<f32>> {
        let value = outputs.get(name).with_context(|| format!("the run answered no `{name}`"))?;
        let view = value.try_extract_array::<f32>().with_context(|| format!("reading the {what} tensor"))?;
        if view.len() != n * width {
            anyhow::bail!("the model answered {what} {:?} for {n} images; model.toml says {width} each", view.shape());
        }
        Ok(Array2::from_shape_vec((n, width), view.iter().copied().collect())?)
    };
    let embeddings = rows(output, dim, "features")?;
    let logits = match head {
        Some((name, classes)) => Some(rows(name, *classes, "classifier logits")?),
        None => None,
    };
    Ok(Encoded { embeddings, logits })
}

impl Staging {
    fn new(allocator: Allocator, image_dims: [i64; 3]) -> ort::Result<Self> {
        let image_len = image_dims.iter().map(|&d| d as usize).product();
        let tensor = Tensor::<f32>::new(&allocator, Self::shape(1, image_dims))?;
        if !tensor.memory_info().is_cpu_accessible() {
            return Err(ort::Error::new("the staging memory cannot be written from the host"));
        }
        let exact = allocator.memory_info().allocation_device() != AllocationDevice::CUDA_PINNED;
        Ok(Self { allocator, tensor, capacity: 1, exact, image_len, image_dims })
    }

    fn shape(n: usize, [c, h, w]: [i64; 3]) -> [usize; 4] {
        [n, c as usize, h as usize, w as usize]
    }

    /// Writes `images` into the first rows, growing the buffer (doubling) when they do not fit.
    fn fill(&mut self, images: &[ArrayView3<f32>]) -> anyhow::Result<()> {
        let n = images.len();
        anyhow::ensure!(n > 0, "an empty batch");
        for image in images {
            let dims = image.shape();
            anyhow::ensure!(
                dims.iter().zip(self.image_dims).all(|(&a, b)| a as i64 == b),
                "an image of shape {dims:?}; the model takes {:?}",
                self.image_dims
            );
        }
        if n > self.capacity || (self.exact && n != self.capacity) {
            let capacity = if self.exact { n } else { n.next_power_of_two() };
            self.tensor = Tensor::<f32>::new(&self.allocator, Self::shape(capacity, self.image_dims))
                .context("growing the staging buffer")?;
            self.capacity = capacity;
        }
        let len = self.image_len;
        let (_, data) = self.tensor.try_extract_tensor_mut::<f32>().context("writing the staging buffer")?;
        let threads = copy_threads(n * len * size_of::<f32>(), n, crate::engine::cores());
        copy_parallel(&mut data[..n * len], images, len, threads);
        Ok(())
    }
}

/// Threads for copying `bytes` of `n` images into a batch: one below [`PARALLEL_COPY_BYTES`],
/// else up to [`COPY_THREADS`], at most one per image and one per four cores.
fn copy_threads(bytes: usize, n: usize, cores: usize) -> usize {
    if bytes < PARALLEL_COPY_BYTES { 1 } else { COPY_THREADS.min(n).min((cores / 4).max(1)) }
}

/// Copies images, each `len` floats, into consecutive rows of `dst`, split over `threads`.
fn copy_parallel(dst: &mut [f32], images: &[ArrayView3<f32>], len: usize, threads: usize) {
    if threads <= 1 {
        return copy_images(dst, images, len);
    }
    let per = images.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (rows, part) in dst.chunks_mut(per * len).zip(images.chunks(per)) {
            s.spawn(move || copy_images(rows, part, len));
        }
    });
}

/// Copies images, each `len` floats, into consecutive rows of `dst`.
fn copy_images(dst: &mut [f32], images: &[ArrayView3<f32>], len: usize) {
    for (row, image) in dst.chunks_mut(len).zip(images) {
        match image.as_slice() {
            Some(src) => row.copy_from_slice(src),
            None => row.iter_mut().zip(image.iter()).for_each(|(d, s)| *d = *s),
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array3;

    use super::*;

    #[test]
    fn copies_go_parallel_only_for_big_batches_on_big_machines() {
        assert_eq!(copy_threads(PARALLEL_COPY_BYTES - 1, 32, 16), 1);
        assert_eq!(copy_threads(PARALLEL_COPY_BYTES, 32, 16), 4);
        assert_eq!(copy_threads(PARALLEL_COPY_BYTES, 2, 16), 2);
        assert_eq!(copy_threads(PARALLEL_COPY_BYTES, 32, 2), 1);
    }

    #[test]
    fn a_parallel_copy_lays_images_out_as_a_stacked_batch() {
        let images: Vec<Array3<f32>> = (0..7)
            .map(|i| Array3::from_shape_fn((2, 3, 4), |(c, h, w)| (i * 100 + c * 12 + h * 4 + w) as f32))
            .collect();
        // One image in another memory order: copied element by element, in logical order.
        let mut views: Vec<ArrayView3<f32>> = images.iter().map(|a| a.view()).collect();
        let transposed = images[3].clone().reversed_axes();
        let odd = transposed.view().reversed_axes();
        views[3] = odd;
        let stacked = stack(&views).unwrap();
        for threads in [1, 3, 4] {
            let mut dst = vec![f32::NAN; 8 * 24];
            copy_parallel(&mut dst[..7 * 24], &views, 24, threads);
            assert_eq!(&dst[..7 * 24], stacked.as_slice().unwrap(), "threads = {threads}");
            assert!(dst[7 * 24..].iter().all(|v| v.is_nan()), "wrote past the batch");
        }
    }

    #[test]
    fn cuda_settings_parse_from_their_flag_values() {
        assert_eq!("same-as-requested".parse(), Ok(ArenaExtend::SameAsRequested));
        assert_eq!("next-power-of-two".parse(), Ok(ArenaExtend::NextPowerOfTwo));
        assert!("kSameAsRequested".parse::<ArenaExtend>().is_err());
        assert_eq!("heuristic".parse(), Ok(ConvAlgoSearch::Heuristic));
        assert!("fastest".parse::<ConvAlgoSearch>().unwrap_err().contains("exhaustive, heuristic or default"));
        assert!(!CudaOptions::default().is_set());
        assert!(CudaOptions { conv_max_workspace: Some(true), ..Default::default() }.is_set());
        assert_eq!(IoPath::for_device(Device::Cpu), IoPath::Run);
        assert_eq!(IoPath::for_device(Device::Cuda(1)), IoPath::Bind);
    }
}
