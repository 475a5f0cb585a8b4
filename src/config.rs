//! Command-line and environment configuration, parsed once at the edge.
//!
//! Every setting has a flag and a `QSCORE_*` variable with the same meaning; clap prints both in
//! `--help`. The rest of the program receives the typed parts it needs, never raw strings.

use std::{net::IpAddr, path::PathBuf, str::FromStr};

use clap::{Args, Parser, Subcommand, ValueEnum};

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
pub enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Score image files without a server; prints one JSON line per file (the /v1/score answer).
    Score(ScoreArgs),
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
    /// ONNX Runtime intra-op threads per model (0: ONNX Runtime's default, one per core).
    #[arg(long, env = "QSCORE_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,
    /// Most images in one ONNX Runtime run; larger requests are split.
    #[arg(long, env = "QSCORE_MAX_BATCH", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_batch: u32,
    /// Largest image accepted, in pixels (width x height), checked before decoding.
    #[arg(long, env = "QSCORE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Largest encoded image accepted, in bytes.
    #[arg(long, env = "QSCORE_MAX_IMAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_image_bytes: usize,
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
    /// Most images in one batch request.
    #[arg(long, env = "QSCORE_MAX_BATCH_IMAGES", default_value_t = 256)]
    pub max_batch_images: usize,
    /// Most inference jobs waiting per model before requests are answered 429.
    #[arg(long, env = "QSCORE_MAX_QUEUED_JOBS", default_value_t = 256)]
    pub max_queued_jobs: usize,
    /// Log format.
    #[arg(long, env = "QSCORE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Settings of `qscore score`.
#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    /// Models, runtime and image limits.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Image files to score.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// The CUDA execution provider on the GPU with this ordinal.
    Cuda(i32),
}

impl FromStr for Device {
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
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
