//! `benches/gpu/run.sh` on a machine without a GPU: it must stop within seconds, before
//! building or starting anything, and name everything that is missing and how to get it. (The
//! whole flow is exercised by its CPU dry run, `QSCORE_GPU_BENCH_DEVICE=cpu`, which takes a
//! minute; benches/gpu/README.md.)

mod common;

use std::time::{Duration, Instant};

use common::root;

fn run_sh(envs: &[(&str, &std::path::Path)], device: &str) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let out = std::process::Command::new("bash")
        .arg(root().join("benches/gpu/run.sh"))
        .env("QSCORE_GPU_BENCH_DEVICE", device)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_os_str())))
        .output()
        .unwrap();
    (out, start.elapsed())
}

#[test]
fn without_a_gpu_the_benchmark_stops_at_once_naming_what_is_missing() {
    let empty = std::env::temp_dir().join(format!("qscore-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    // Whatever this machine has: no driver tool, an empty pack, no ONNX Runtime CUDA build.
    let nowhere = empty.join("no-nvidia-smi");
    let (out, took) = run_sh(
        &[
            ("QSCORE_GPU_BENCH_NVIDIA_SMI", &nowhere),
            ("QSCORE_GPU_BENCH_PACK", &empty),
            ("QSCORE_GPU_BENCH_ORT_DIR", &empty),
        ],
        "cuda",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(took < Duration::from_secs(10), "the preflight took {took:?}");
    assert!(out.stdout.is_empty(), "nothing may be measured: {}", String::from_utf8_lossy(&out.stdout));
    for needed in [
        "cannot run the GPU benchmark (cuda); missing:",
        "nvidia-smi, i.e. an NVIDIA driver",
        "the CUDA build of ONNX Runtime 1.31.1",
        "benches/gpu/prepare.sh",
        "QSCORE_GPU_BENCH_DEVICE=cpu benches/gpu/run.sh",
    ] {
        assert!(stderr.contains(needed), "`{needed}` is not said:\n{stderr}");
    }
    if !std::path::Path::new("/opt/torch/.venv").exists() && !std::path::Path::new("/usr/local/cuda").exists() {
        assert!(stderr.contains("the CUDA 13 and cuDNN 9 libraries libcudart.so.13"), "{stderr}");
    }

    let (out, _) = run_sh(&[], "tpu");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda (default) or cpu (a dry run)"));
    std::fs::remove_dir_all(empty).unwrap();
}
