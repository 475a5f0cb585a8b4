//! Command-line and environment configuration, parsed once at the edge.
//!
//! Every setting has a flag and a `QSCORE_*` variable with the same meaning; clap prints both in
//! `--help`. The rest of the program receives the typed parts it needs, never raw strings.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::TypedValueParser};

pub use crate::backfill::{fetch::AllowedHost, manifest::Shard};
pub use crate::model::encoder::{ArenaExtend, ConvAlgoSearch, CudaOptions, Device, GraphOptimization};
use crate::{
    engine::{BatchSettings, EngineConfig},
    image::ImageLimits,
    model::encoder::SessionOptions,
};

/// Score self-supervised image representations with the label-free Q-Score.
#[derive(Debug, Parser)]
#[command(name = "qscore", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process; boxing buys nothing")]
pub enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Score image files without a server; prints one JSON line per file (the /v1/score answer).
    Score(ScoreArgs),
    /// Calibrate a model on labelled images: D, the linear probe, every risk estimator measured
    /// on held-out images, the chosen one's isotonic map and threshold; writes calibration.json.
    Calibrate(CalibrateArgs),
    /// Print the held-out evaluation stored in calibrated models' calibration.json, as tables.
    Evaluate(EvaluateArgs),
    /// Print the drift of a finished backfill (`qscore score --format parquet` shards) from a
    /// model's calibration reference, as JSON in /v1/drift's shape.
    Drift(DriftArgs),
    /// Explain image files without a server: draw each one's heatmaps (which input cells make
    /// its features fire, by occlusion) as a PNG overlay in --out, and print one JSON line per
    /// file (the /v1/explain answer).
    Explain(ExplainArgs),
    /// Print the OpenAPI document.
    Openapi,
}

/// Where the models and ONNX Runtime come from, and how images are limited: shared by `serve`
/// and `score` so both answer the same for the same file.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Folder holding one sub-folder per model (model.onnx + model.toml).
    #[arg(long, env = "QSCORE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// The model used when a request names none [default: the first model, by name].
    #[arg(long, env = "QSCORE_MODEL")]
    pub model: Option<String>,
    /// Path to libonnxruntime.so; otherwise ORT_DYLIB_PATH, next to the executable, then ./.ort/.
    #[arg(long, env = "QSCORE_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
    /// Execution provider: cpu, cuda or cuda:N. A cuda request that cannot be met is an error,
    /// never a silent fallback to CPU.
    #[arg(long, env = "QSCORE_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// ONNX Runtime intra-op threads per model (0: one per core on cpu; 1 on cuda, where the GPU
    /// does the work and more threads would only take cores from image decoding).
    #[arg(long, env = "QSCORE_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,
    /// Let ONNX Runtime's idle intra-op threads spin before they sleep (its own default). Off
    /// here: the decoders share the cores, and spinning threads took 30% more CPU per image
    /// under load (README, Benchmarks); turn it on for a model served on cores of its own.
    #[arg(long, env = "QSCORE_INTRA_OP_SPINNING", default_value_t = false, action = clap::ArgAction::Set)]
    pub intra_op_spinning: bool,
    /// ONNX Runtime graph optimisation level: disable, basic, extended or all.
    #[arg(long, env = "QSCORE_GRAPH_OPTIMIZATION", default_value = "all",
          value_parser = clap::builder::PossibleValuesParser::new(["disable", "basic", "extended", "all"])
              .map(|s| s.parse::<GraphOptimization>().expect("a listed value")))]
    pub graph_optimization: GraphOptimization,
    /// CUDA only: how the GPU memory arena grows, next-power-of-two (ONNX Runtime's default:
    /// few large allocations) or same-as-requested (tighter, more allocations).
    #[arg(long, env = "QSCORE_CUDA_ARENA_EXTEND_STRATEGY",
          value_parser = clap::builder::PossibleValuesParser::new(["next-power-of-two", "same-as-requested"])
              .map(|s| s.parse::<ArenaExtend>().expect("a listed value")))]
    pub cuda_arena_extend_strategy: Option<ArenaExtend>,
    /// CUDA only: most bytes of GPU memory each model's arena may hold [default: no limit]. Each
    /// model has its own session and arena; cuDNN's workspace and CUDA's context come on top.
    #[arg(long, env = "QSCORE_CUDA_MEMORY_LIMIT_BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub cuda_memory_limit_bytes: Option<u64>,
    /// CUDA only: how cuDNN picks each convolution's algorithm: exhaustive (ONNX Runtime's
    /// default: benchmarks every algorithm the first time each batch size is seen, so the first
    /// batches of a size are slow), heuristic (no benchmarking) or default (least memory).
    #[arg(long, env = "QSCORE_CUDNN_CONV_ALGO_SEARCH",
          value_parser = clap::builder::PossibleValuesParser::new(["exhaustive", "heuristic", "default"])
              .map(|s| s.parse::<ConvAlgoSearch>().expect("a listed value")))]
    pub cudnn_conv_algo_search: Option<ConvAlgoSearch>,
    /// CUDA only: whether cuDNN's algorithm search may use as much GPU memory as it wants
    /// (true, ONNX Runtime's default) or 32 MB (false: less memory, maybe slower kernels).
    #[arg(long, env = "QSCORE_CUDNN_CONV_USE_MAX_WORKSPACE", value_name = "BOOL")]
    pub cudnn_conv_use_max_workspace: Option<bool>,
    /// Most images in one ONNX Runtime run; images from many requests are gathered up to it,
    /// and larger requests are split.
    #[arg(long, env = "QSCORE_MAX_BATCH", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_batch: u32,
    /// Longest a queued image waits for its batch to fill, in milliseconds; only while more
    /// images for the model are being decoded (a lone request runs at once).
    #[arg(long, env = "QSCORE_MAX_BATCH_DELAY_MS", default_value_t = 2)]
    pub max_batch_delay_ms: u64,
    /// Largest image accepted, in pixels (width x height), checked before decoding.
    #[arg(long, env = "QSCORE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Largest encoded image accepted, in bytes.
    #[arg(long, env = "QSCORE_MAX_IMAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Largest ratio of an image's longer side to its shorter side, checked before decoding.
    /// The shorter side is resized to the model's input, so this bounds the resize buffer.
    #[arg(long, env = "QSCORE_MAX_IMAGE_ASPECT_RATIO", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_image_aspect_ratio: u32,
}

impl EngineArgs {
    /// The engine's plain configuration: the only form the rest of the program sees. A CUDA
    /// setting with `--device cpu` is refused: it would do nothing, and an operator who set a
    /// GPU memory limit should not believe one is in force.
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        let cuda = CudaOptions {
            arena_extend: self.cuda_arena_extend_strategy,
            memory_limit_bytes: self.cuda_memory_limit_bytes,
            conv_algo_search: self.cudnn_conv_algo_search,
            conv_max_workspace: self.cudnn_conv_use_max_workspace,
        };
        if self.device == Device::Cpu && cuda.is_set() {
            let set: Vec<&str> = [
                (cuda.arena_extend.is_some(), "--cuda-arena-extend-strategy (QSCORE_CUDA_ARENA_EXTEND_STRATEGY)"),
                (cuda.memory_limit_bytes.is_some(), "--cuda-memory-limit-bytes (QSCORE_CUDA_MEMORY_LIMIT_BYTES)"),
                (cuda.conv_algo_search.is_some(), "--cudnn-conv-algo-search (QSCORE_CUDNN_CONV_ALGO_SEARCH)"),
                (
                    cuda.conv_max_workspace.is_some(),
                    "--cudnn-conv-use-max-workspace (QSCORE_CUDNN_CONV_USE_MAX_WORKSPACE)",
                ),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            let (verb, them) = if set.len() == 1 { ("applies", "it") } else { ("apply", "them") };
            anyhow::bail!(
                "{} only {verb} to --device cuda, and the device is cpu: run with --device cuda, or unset {them}",
                set.join(", ")
            );
        }
        Ok(EngineConfig {
            models_dir: self.models_dir.clone(),
            default_model: self.model.clone(),
            ort_lib: self.ort_lib.clone(),
            session: SessionOptions {
                device: self.device,
                intra_threads: self.intra_threads,
                intra_spinning: self.intra_op_spinning,
                optimization: self.graph_optimization,
                cuda,
                io: None,
            },
            batching: BatchSettings {
                max_batch: self.max_batch as usize,
                max_delay: Duration::from_millis(self.max_batch_delay_ms),
            },
            limits: ImageLimits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
                max_aspect_ratio: self.max_image_aspect_ratio,
            },
        })
    }
}

/// Settings of `qscore serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Models, runtime and image limits.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, env = "QSCORE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port, printed at start-up).
    #[arg(long, env = "QSCORE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "QSCORE_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most images in one batch request (at most 4096).
    #[arg(long, env = "QSCORE_MAX_BATCH_IMAGES", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub max_batch_images: usize,
    /// Most images inside the server at once (decoding, queued or running), across models;
    /// a request that would pass it is answered 429 with Retry-After at once.
    #[arg(long, env = "QSCORE_MAX_QUEUED_IMAGES", default_value_t = 512)]
    pub max_queued_images: usize,
    /// Bytes the server may hold for requests at once: half for request bodies, fetched task
    /// images and answers being built (past it: 429 at once), half for decoding images and the
    /// tensors waiting for inference (past it: decodes wait). Models and ONNX Runtime's own
    /// memory come on top; the default fits the shipped 2 GiB Kubernetes limit.
    #[arg(long, env = "QSCORE_MEMORY_BUDGET_BYTES", default_value_t = 1 << 30)]
    pub memory_budget_bytes: u64,
    /// Longest a client may take to send a request's headers, in milliseconds; also how long an
    /// idle keep-alive connection stays open waiting for its next request.
    #[arg(long, env = "QSCORE_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Longest an answer's write may make no progress because the client does not read it, in
    /// milliseconds; the connection is then dropped.
    #[arg(long, env = "QSCORE_SEND_TIMEOUT_MS", default_value_t = 10_000)]
    pub send_timeout_ms: u64,
    /// Most client connections open at once; past it new connections wait in the kernel's
    /// backlog [default: the open-file limit minus 64, at most 4096].
    #[arg(long, env = "QSCORE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections open at once from one client address; past it a new connection from
    /// that address is answered 503 and closed, so one client cannot hold every slot. Behind a
    /// proxy all clients share its address: raise this to --max-connections there [default: a
    /// quarter of --max-connections].
    #[arg(long, env = "QSCORE_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<usize>,
    /// What one explanation (`POST /v1/explain`) may cost.
    #[command(flatten)]
    pub explain: ExplainLimitArgs,
    /// Deadline of a request in milliseconds: past it the answer is 503 and its queued work is
    /// dropped. Also bounds how long a client may take to send its body.
    #[arg(long, env = "QSCORE_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// File of API keys, one per line: `/v1/*` then needs `Authorization: Bearer KEY`. Re-read
    /// on SIGHUP and when it changes. Without it the API is open.
    #[arg(long, env = "QSCORE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Origins browsers may call the API from (repeatable, or comma-separated; `*` for any).
    /// CORS is off without it.
    #[arg(long, env = "QSCORE_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Label Studio's base URL: `POST /predict` fetches task images from this host only, and
    /// only from its media paths (uploads, local files, storage proxy, presign).
    #[arg(long, env = "QSCORE_LABEL_STUDIO_URL")]
    pub label_studio_url: Option<String>,
    /// Label Studio API token, sent as `Authorization: Token ...` when fetching task images from
    /// Label Studio's media paths, and nowhere else.
    #[arg(long, env = "QSCORE_LABEL_STUDIO_TOKEN", hide_env_values = true)]
    pub label_studio_token: Option<String>,
    /// Timeout of one task image fetch, in milliseconds.
    #[arg(long, env = "QSCORE_LABEL_STUDIO_TIMEOUT_MS", default_value_t = 10_000)]
    pub label_studio_timeout_ms: u64,
    /// Storage hosts Label Studio's presign redirects may lead to, for S3/GCS/Azure projects
    /// (comma-separated exact host names, or `*.domain` for any host below it). They are
    /// fetched without the token; a redirect elsewhere is refused. Empty: no redirect followed.
    #[arg(long, env = "QSCORE_LABEL_STUDIO_STORAGE_HOSTS", value_delimiter = ',')]
    pub label_studio_storage_hosts: Vec<String>,
    /// POST every flagged answer (model, id, scores; never the image) to this URL, in the
    /// background: at most 3 tries each, and a slow endpoint never slows scoring.
    #[arg(long, env = "QSCORE_FLAGGED_WEBHOOK")]
    pub flagged_webhook: Option<String>,
    /// Timeout of one webhook delivery try, in milliseconds.
    #[arg(long, env = "QSCORE_FLAGGED_WEBHOOK_TIMEOUT_MS", default_value_t = 5000)]
    pub flagged_webhook_timeout_ms: u64,
    /// Seconds to finish requests in flight after SIGTERM or SIGINT before exiting anyway.
    #[arg(long, env = "QSCORE_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Drift window: most recent answers per calibrated model compared with the reference. The
    /// shipped KS and PSI thresholds hold from 200 answers, so a smaller window never reads `ok`.
    #[arg(long, env = "QSCORE_DRIFT_WINDOW", default_value_t = 1000)]
    pub drift_window: usize,
    /// Drift window: oldest answer kept, in seconds.
    #[arg(long, env = "QSCORE_DRIFT_WINDOW_S", default_value_t = 3600)]
    pub drift_window_s: u64,
    /// How often the models folder is checked for added, replaced or removed model folders, in
    /// milliseconds; a change is loaded once two checks agree (so within two periods plus the
    /// load). 0: only on SIGHUP, which reloads at once either way.
    #[arg(long, env = "QSCORE_RELOAD_POLL_MS", default_value_t = 2000)]
    pub reload_poll_ms: u64,
    /// Log format.
    #[arg(long, env = "QSCORE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// What one explanation may cost: shared by `serve` and `explain`.
#[derive(Debug, Clone, Copy, Args)]
pub struct ExplainLimitArgs {
    /// Most features one explanation maps (`/v1/explain?features=`); the default list, the
    /// discriminative features that fired, is cut to the strongest this many.
    #[arg(long, env = "QSCORE_MAX_EXPLAIN_FEATURES", default_value_t = 16,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub max_explain_features: usize,
    /// Most occluded forward passes one explanation may cost (its patch positions; the default
    /// plan costs 169); a `patch`/`stride` that needs more is refused before any work.
    #[arg(long, env = "QSCORE_MAX_EXPLAIN_PASSES", default_value_t = 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub max_explain_passes: usize,
    /// Most explanations running at once (each is up to --max-explain-passes forward passes);
    /// one more is answered 429 at once rather than admitted to time out behind the others.
    #[arg(long, env = "QSCORE_MAX_CONCURRENT_EXPLAINS", default_value_t = 2,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub max_concurrent_explains: usize,
}

impl ExplainLimitArgs {
    /// The engine's limits.
    pub fn limits(&self) -> crate::explain::ExplainLimits {
        crate::explain::ExplainLimits {
            max_features: self.max_explain_features,
            max_passes: self.max_explain_passes,
            max_concurrent: self.max_concurrent_explains,
        }
    }
}

/// Settings of `qscore explain`.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// Models, runtime and image limits.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// What one explanation may cost.
    #[command(flatten)]
    pub explain: ExplainLimitArgs,
    /// Image files, or folders to walk (recursively, image extensions only, sorted).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Folder the overlays are written to, as <file stem>.png (created when missing); a file
    /// already there is replaced.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Which features to map: `discriminative` (the features of D that fired), `active` (every
    /// feature of L) or indices such as `3,17,42`.
    #[arg(long, default_value = "discriminative")]
    pub features: String,
    /// Side of the occluding patch in input pixels [default: a seventh of the input's shorter side].
    #[arg(long)]
    pub patch: Option<usize>,
    /// Step between patch positions in input pixels [default: half the patch].
    #[arg(long)]
    pub stride: Option<usize>,
    /// What occluded patches are filled with: the normalisation mean, or black (for data on a
    /// black background).
    #[arg(long, value_enum, default_value = "mean")]
    pub fill: crate::explain::Fill,
}

/// Settings of `qscore score`.
#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    /// Models, runtime and image limits.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Image files, or folders to walk (recursively, image extensions only, sorted).
    #[arg(required_unless_present = "manifest", conflicts_with = "manifest")]
    pub files: Vec<PathBuf>,
    /// A manifest: one image per line, a local path (a relative one is read from the
    /// manifest's folder) or an http(s) URL. Blank lines and `#` comments are skipped; a UTF-8
    /// BOM and CRLF line ends are accepted. Every line becomes one output line or row.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Score only shard INDEX of COUNT: the manifest's entries (lines naming an image, counted
    /// from 0) whose position modulo COUNT is INDEX. Shards are disjoint, cover the manifest,
    /// and are the same on every run.
    #[arg(long, value_name = "INDEX/COUNT", requires = "manifest", conflicts_with = "files")]
    pub shard: Option<Shard>,
    /// Hosts the manifest's URLs may be fetched from (repeatable, or comma-separated): HOST for
    /// any port, HOST:PORT for that one (a URL without a port has its scheme's). Redirects are
    /// followed only to allowed hosts. Without it every URL is refused.
    #[arg(long, env = "QSCORE_ALLOW_HOST", value_delimiter = ',', value_name = "HOST[:PORT]")]
    pub allow_host: Vec<AllowedHost>,
    /// Timeout of one URL fetch, from connecting to the last byte, in milliseconds.
    #[arg(long, env = "QSCORE_FETCH_TIMEOUT_MS", default_value_t = 30_000)]
    pub fetch_timeout_ms: u64,
    /// `risk`: riskiest first (highest p_misclassified for a calibrated model, lowest Q-Score
    /// otherwise; files that failed last), ready to import into a labelling queue. `none`: input
    /// order, streamed.
    #[arg(long, value_enum, default_value_t = SortOrder::None)]
    pub sort: SortOrder,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Jsonl)]
    pub format: OutputFormat,
    /// The Parquet file to write (only with --format parquet, which needs it). Written whole
    /// or not at all; when it already holds this manifest's shard, scored by the same model
    /// version and calibration, the shard is skipped.
    #[arg(long, value_name = "FILE", required_if_eq("format", "parquet"))]
    pub out: Option<PathBuf>,
    /// Overwrite an --out that holds something else (another manifest, shard, model or
    /// calibration's scores, or a foreign Parquet file) instead of stopping.
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// Settings of `qscore drift`.
#[derive(Debug, Clone, Args)]
pub struct DriftArgs {
    /// Folder holding one sub-folder per model.
    #[arg(long, env = "QSCORE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// The model whose calibration.json is the reference; the rows must have been scored by it,
    /// with that calibration.
    #[arg(long, value_name = "MODEL")]
    pub reference: String,
    /// The backfill's Parquet files (every shard, or any subset).
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    pub scores: Vec<PathBuf>,
}

/// Order of `qscore score`'s lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortOrder {
    /// As given.
    None,
    /// Riskiest first.
    Risk,
}

/// Format of `qscore score`'s lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per line: the /v1/score answer with `file` and `risk`.
    Jsonl,
    /// file, risk, q_score, p_misclassified, likely_misclassified, predicted_class, class_probability, error.
    Csv,
    /// One Parquet row per manifest entry, in the file --out (needs --manifest); see the
    /// README's Backfills section for the columns.
    Parquet,
}

/// Settings of `qscore calibrate`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// Models, runtime and image limits; `--model` names the model to calibrate.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Labelled images in ImageFolder layout (DIR/<class>/<image>), split into fit and held-out.
    #[arg(long, required_unless_present = "fit", conflicts_with_all = ["fit", "holdout"])]
    pub data: Option<PathBuf>,
    /// Your classifier's answers on every labelled image, so the flag predicts its mistakes
    /// instead of qscore's probe's: a CSV with a header and the columns `path` (`<class>/<file>`
    /// under the dataset root), `predicted` (a class folder name) and optionally `confidence`
    /// (its probability for that prediction, in [0, 1]).
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
    /// Labelled images to fit on (instead of --data); needs --holdout.
    #[arg(long, requires = "holdout")]
    pub fit: Option<PathBuf>,
    /// Labelled held-out images (with --fit).
    #[arg(long, requires = "fit")]
    pub holdout: Option<PathBuf>,
    /// Share of each class of --data that is fitted on; the rest is held out.
    #[arg(long, default_value_t = 0.5)]
    pub fit_fraction: f64,
    /// Share of each class's held-out images that chooses the estimator, its map and the
    /// threshold; the rest (the test part) only measures.
    #[arg(long, default_value_t = 0.5)]
    pub select_fraction: f64,
    /// Seed of the stratified splits and of the random feature subsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// eps of the highly activating set L [default: the model's, from model.toml].
    #[arg(long)]
    pub epsilon: Option<f32>,
    /// Percentile band LO,HI of the non-zero A_j that bounds D [default: the model's].
    #[arg(long, value_parser = parse_band)]
    pub percentiles: Option<(f64, f64)>,
    /// Choose the flag's threshold as the lowest reaching this precision on the select part
    /// [default: maximum F1].
    #[arg(long)]
    pub target_precision: Option<f64>,
    /// Use this risk estimator instead of the best held-out AUPRC: q_score, z_max, q_v1,
    /// l2_norm, knn_distance, mahalanobis, max_softmax, margin, doctor, knn, sirc,
    /// user_confidence (only with per-image confidences) or stacked.
    #[arg(long)]
    pub risk_source: Option<crate::risk::RiskSource>,
    /// Neighbours that vote in the k-NN estimator.
    #[arg(long, default_value_t = 20)]
    pub neighbours: usize,
    /// Most fit images kept as the k-NN estimator's reference set (a seeded sample beyond it);
    /// they ship in calibration.json (2 bytes per feature) and are searched on every request.
    #[arg(long, default_value_t = 5000)]
    pub max_neighbours: usize,
    /// L2 penalty of the linear probe (scikit-learn's 1/C).
    #[arg(long, default_value_t = 1.0)]
    pub probe_alpha: f64,
    /// L-BFGS iteration cap of the linear probe.
    #[arg(long, default_value_t = 500)]
    pub probe_max_iterations: u64,
    /// Random feature subsets the compression result compares D with (and A_j > 0, and each
    /// point of the compression curve).
    #[arg(long, default_value_t = 5)]
    pub random_subsets: usize,
    /// Shares of the features kept on the compression curve (comma-separated, each in (0, 1]):
    /// the highest-A_j features against random ones; each share below 1 costs 1 +
    /// --random-subsets probe fits, so `--compression-curve 1` fits none.
    #[arg(long, value_delimiter = ',', default_value = "0.4,0.5,0.6,0.7,0.8,0.9,1.0", value_parser = parse_fraction)]
    pub compression_curve: Vec<f64>,
    /// Prior strength (in images) that shrinks each plateau of the isotonic map toward the
    /// select part's error rate, (k + a * base) / (n + a); 0 for scikit-learn's plain map.
    #[arg(long, default_value_t = 5.0)]
    pub isotonic_prior: f64,
    /// Also write the split's embeddings, labels and the Rust probe's predictions to this folder
    /// as .npy files ({fit,select,test}_{h,y,pred}.npy and split.json), for
    /// `models/recipes/sklearn_probe.py` to refit scikit-learn's probe on exactly the same rows.
    #[arg(long)]
    pub export_split: Option<PathBuf>,
    /// Also measure the Q-Score at these eps values (comma-separated)...
    #[arg(long, value_delimiter = ',')]
    pub sweep_epsilon: Vec<f32>,
    /// ...crossed with these bands (LO,HI pairs separated by ';', e.g. "50,95;25,75").
    #[arg(long, value_delimiter = ';', value_parser = parse_band)]
    pub sweep_percentiles: Vec<(f64, f64)>,
    /// Where to write the calibration [default: MODELS_DIR/MODEL/calibration.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Settings of `qscore evaluate`.
#[derive(Debug, Clone, Args)]
pub struct EvaluateArgs {
    /// Folder holding one sub-folder per model.
    #[arg(long, env = "QSCORE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Models to report (repeatable) [default: every calibrated model].
    #[arg(long)]
    pub model: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Markdown)]
    pub format: ReportFormat,
}

/// How `qscore evaluate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Tables for people.
    Markdown,
    /// The evaluations as a JSON array.
    Json,
}

fn parse_band(s: &str) -> Result<(f64, f64), String> {
    let err = || format!("`{s}` is not a percentile band; write LO,HI with 0 <= LO <= HI <= 100, e.g. 50,95");
    let (lo, hi) = s.split_once(',').ok_or_else(err)?;
    let (lo, hi): (f64, f64) = (lo.trim().parse().map_err(|_| err())?, hi.trim().parse().map_err(|_| err())?);
    if !(0.0..=100.0).contains(&lo) || !(0.0..=100.0).contains(&hi) || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("`{s}` is not a share of the features; write a number in (0, 1], e.g. 0.4")),
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert!("cuda:-1".parse::<Device>().is_err());
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn bands_parse() {
        assert_eq!(parse_band("50,95"), Ok((50.0, 95.0)));
        assert_eq!(parse_band(" 0 , 100"), Ok((0.0, 100.0)));
        assert!(parse_band("95,50").is_err());
        assert!(parse_band("50").is_err());
        assert!(parse_band("-1,50").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
