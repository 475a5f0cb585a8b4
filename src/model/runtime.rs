//! Finding and starting ONNX Runtime.
//!
//! qscore links ONNX Runtime at run time (`ort`'s `load-dynamic`), so one binary serves the CPU
//! build and the CUDA build of the library. The library is looked up in a fixed, documented
//! order, and a missing library is a message that says how to get one, never a panic.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ort::environment::Environment;

/// File name of the runtime on Linux.
const LIB_NAME: &str = "libonnxruntime.so";

/// Where the library was looked for, in order: `--ort-lib`/`QSCORE_ORT_LIB`, `ORT_DYLIB_PATH`,
/// next to the executable, then `./.ort/`.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        out.push(dir.join(LIB_NAME));
    }
    out.push(PathBuf::from(".ort").join(LIB_NAME));
    out
}

/// Resolves the library to load. An explicit path that does not exist is an error by itself:
/// the user asked for that file, so falling through to another would hide their mistake.
pub fn locate(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!(
                "ONNX Runtime library not found at {} (--ort-lib / QSCORE_ORT_LIB); run `make ort` or fix the path",
                p.display()
            );
        }
        return Ok(p.to_path_buf());
    }
    let tried = candidates(None);
    tried.iter().find(|p| p.is_file()).cloned().with_context(|| {
        let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        format!(
            "ONNX Runtime library not found (looked in: {}); run `make ort` to fetch it into ./.ort/, \
             or pass --ort-lib PATH (QSCORE_ORT_LIB)",
            list.join(", ")
        )
    })
}

/// Loads the library at `path` and creates the process's single ONNX Runtime environment.
pub fn start(path: &Path) -> anyhow::Result<Environment> {
    let builder = ort::init_from(path).map_err(|e| {
        anyhow::anyhow!("cannot load ONNX Runtime from {}: {e}; run `make ort` for a fresh copy", path.display())
    })?;
    builder
        .with_name("qscore")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start ONNX Runtime from {}: {e}", path.display()))
}
