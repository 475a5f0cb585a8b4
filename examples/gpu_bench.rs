//! The measuring tools of `benches/gpu/run.sh`, in one binary so that one file is carried to the
//! GPU machine (which has no wrk, no Rust and no network):
//!
//! - `ceiling`: the raw ONNX Runtime ceiling: one encoder session alone on a prepared batch, for
//!   each batch size, through `session.run` with host tensors and through qscore's IO binding.
//! - `load`: a closed-loop HTTP load generator: C connections, each POSTing the same image
//!   again as soon as its answer is read, for S seconds after a warm-up.
//! - `wait`: polls a URL until it answers 2xx (a server's readiness; the GPU machine may lack curl).
//! - `embed`: every image through `POST /v1/embed` of a running server, one JSON line each
//!   (Q-Score, flag, probability, embedding), for the fp16-vs-fp32 agreement.
//!
//! Each prints JSON lines on stdout; `benches/gpu/table.py` turns them into the table.
//!
//!     gpu_bench ceiling --model-dir models/mobilenet_v2-imagenet --device cuda --label fp32
//!     gpu_bench load --url http://127.0.0.1:8091/v1/score --file photo.jpg --concurrency 64
//!     gpu_bench embed --url http://127.0.0.1:8091 --model fmnist-simclr DIR_OR_FILE...

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ndarray::{Array4, Axis};
use qscore::{
    config::Device,
    image::ImageLimits,
    model::{
        encoder::{Encoder, IoPath, SessionOptions},
        manifest::Manifest,
        runtime,
    },
};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The raw ONNX Runtime ceiling of one model: images/s per batch size and IO path.
    Ceiling {
        /// A model folder (model.onnx + model.toml).
        #[arg(long)]
        model_dir: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        batches: Vec<usize>,
        /// IO paths to measure, comma-separated: run (session.run, host tensors), bind.
        #[arg(long, value_delimiter = ',', default_value = "run,bind")]
        io: Vec<String>,
        /// Seconds per measurement (after one warm-up run of each batch size).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// A photo to fill the batch with (decoded and preprocessed as the server does).
        #[arg(long, default_value = "tests/fixtures/photos/china.jpg")]
        photo: PathBuf,
        /// Names this model's rows (fp32, fp16).
        #[arg(long)]
        label: String,
        /// Path to libonnxruntime.so [default: the server's search].
        #[arg(long)]
        ort_lib: Option<PathBuf>,
    },
    /// Closed-loop load on one URL.
    Load {
        /// The endpoint, e.g. http://127.0.0.1:8091/v1/score.
        #[arg(long)]
        url: String,
        /// The body: one image file, POSTed raw.
        #[arg(long)]
        file: PathBuf,
        /// Its content type.
        #[arg(long, default_value = "image/jpeg")]
        content_type: String,
        /// Connections, each with one request in flight.
        #[arg(long)]
        concurrency: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seconds of the same load before measuring (cuDNN searches, arenas growing).
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Threads of the generator (it shares the machine with the server).
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Names this row.
        #[arg(long)]
        label: String,
    },
    /// Waits until a URL answers 2xx (a server's readiness), or fails after the timeout.
    Wait {
        /// The URL to poll.
        #[arg(long)]
        url: String,
        /// Seconds before giving up.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// The server's process: its exit ends the wait at once.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Every image through POST /v1/embed, one JSON line each.
    Embed {
        /// The server's base URL.
        #[arg(long)]
        url: String,
        /// The model to ask for.
        #[arg(long)]
        model: String,
        /// Image files, or folders walked recursively (sorted).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ceiling { model_dir, device, batches, io, seconds, photo, label, ort_lib } => {
            let paths = io.iter().map(|p| match p.as_str() {
                "run" => Ok(IoPath::Run),
                "bind" => Ok(IoPath::Bind),
                _ => anyhow::bail!("--io takes run and bind, not `{p}`"),
            });
            let paths = paths.collect::<anyhow::Result<Vec<_>>>()?;
            ceiling(&model_dir, device, &batches, &paths, seconds, &photo, &label, ort_lib.as_deref())
        }
        Command::Load { url, file, content_type, concurrency, seconds, warmup, threads, label } => {
            let body = bytes::Bytes::from(std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?);
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
            rt.block_on(load(&url, body, &content_type, concurrency, warmup, seconds, &label))
        }
        Command::Wait { url, timeout, pid } => wait(&url, timeout, pid),
        Command::Embed { url, model, paths } => embed(&url, &model, &paths),
    }
}

fn wait(url: &str, timeout: f64, pid: Option<u32>) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let until = Instant::now() + Duration::from_secs_f64(timeout);
    // Gone, or a zombie its parent has not reaped yet: either way it will never answer.
    let exited = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
    };
    loop {
        if let Some(pid) = pid.filter(|&p| exited(p)) {
            anyhow::bail!("the server (pid {pid}) exited before {url} answered");
        }
        let last = match client.get(url).send() {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => r.status().to_string(),
            Err(e) => e.to_string(),
        };
        anyhow::ensure!(Instant::now() < until, "{url} did not answer 2xx within {timeout} s (last: {last})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[allow(clippy::too_many_arguments, reason = "one subcommand's flags, passed on once")]
fn ceiling(
    dir: &Path,
    device: Device,
    batches: &[usize],
    paths: &[IoPath],
    seconds: f64,
    photo: &Path,
    label: &str,
    ort_lib: Option<&Path>,
) -> anyhow::Result<()> {
    let manifest = Manifest::load(dir)?;
    let env = runtime::start(&runtime::locate(ort_lib)?)?;
    let image = qscore::image::prepare(&std::fs::read(photo)?, &ImageLimits::DEFAULT, &manifest.preprocess())?;
    for &io in paths {
        // Spinning as ONNX Runtime does alone (raw_ceiling.rs too): nothing else runs here.
        let opts = SessionOptions { device, io: Some(io), intra_spinning: true, ..SessionOptions::default() };
        let mut encoder = Encoder::load_folder(&env, dir, &manifest, opts)?;
        for &n in batches {
            let (c, h, w) = image.dim();
            let mut batch = Array4::<f32>::zeros((n, c, h, w));
            batch.axis_iter_mut(Axis(0)).for_each(|mut s| s.assign(&image));
            // The first run of a batch size pays for cuDNN's algorithm search and arena growth.
            encoder.embed(batch.view())?;
            let (start, mut runs) = (Instant::now(), 0_usize);
            while start.elapsed() < Duration::from_secs_f64(seconds) {
                encoder.embed(batch.view())?;
                runs += 1;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let row = json!({
                "what": "ceiling", "label": label, "device": device.to_string(), "batch": n,
                "io": match io { IoPath::Run => "run", IoPath::Bind => "bind" },
                "io_description": encoder.io_description(),
                "images_per_s": (runs * n) as f64 / elapsed, "ms_per_batch": elapsed * 1e3 / runs as f64,
            });
            println!("{row}");
        }
    }
    Ok(())
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    non_2xx: usize,
    errors: usize,
}

async fn load(
    url: &str,
    body: bytes::Bytes,
    content_type: &str,
    concurrency: usize,
    warmup: f64,
    seconds: f64,
    label: &str,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let until = measure_from + Duration::from_secs_f64(seconds);
    let (url, content_type): (Arc<str>, Arc<str>) = (url.into(), content_type.into());
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, content_type, body) = (client.clone(), url.clone(), content_type.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < until {
                let sent = Instant::now();
                let answer = client
                    .post(&*url)
                    .header(reqwest::header::CONTENT_TYPE, &*content_type)
                    .body(body.clone())
                    .send()
                    .await;
                let ok = match answer {
                    Ok(r) => {
                        let status = r.status();
                        r.bytes().await.is_ok().then_some(status.is_success())
                    }
                    Err(_) => None,
                };
                if sent < measure_from {
                    continue;
                }
                match ok {
                    Some(true) => tally.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3),
                    Some(false) => tally.non_2xx += 1,
                    None => tally.errors += 1,
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await?;
        all.latencies_ms.extend(t.latencies_ms);
        all.non_2xx += t.non_2xx;
        all.errors += t.errors;
    }
    let measured = (Instant::now().min(until + Duration::from_secs(60)) - measure_from).as_secs_f64();
    all.latencies_ms.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let l = &all.latencies_ms;
        if l.is_empty() { f64::NAN } else { l[((l.len() - 1) as f64 * p).round() as usize] }
    };
    let row = json!({
        "what": "load", "label": label, "concurrency": concurrency, "ok": all.latencies_ms.len(),
        "non_2xx": all.non_2xx, "errors": all.errors, "seconds": measured,
        "images_per_s": all.latencies_ms.len() as f64 / measured,
        "p50_ms": q(0.5), "p99_ms": q(0.99),
    });
    println!("{row}");
    Ok(())
}

fn embed(url: &str, model: &str, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for p in paths {
        walk(p, &mut files)?;
    }
    files.sort();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let endpoint = format!("{}/v1/embed?model={model}", url.trim_end_matches('/'));
    for file in files {
        let kind = if file.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) { "png" } else { "jpeg" };
        let answer = client
            .post(&endpoint)
            .header(reqwest::header::CONTENT_TYPE, format!("image/{kind}"))
            .body(std::fs::read(&file)?)
            .send()
            .with_context(|| format!("POST {endpoint}"))?;
        let status = answer.status();
        let v: serde_json::Value = answer.json().with_context(|| format!("{}: not JSON", file.display()))?;
        anyhow::ensure!(status.is_success(), "{}: {status} {v}", file.display());
        let row = json!({
            "file": file.display().to_string(), "model": model, "q_score": v["q_score"],
            "likely_misclassified": v["likely_misclassified"], "p_misclassified": v["p_misclassified"],
            "embedding": v["embedding"],
        });
        println!("{row}");
    }
    Ok(())
}

/// Image files under `path` (PNG and JPEG), or `path` itself.
fn walk(path: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            walk(&entry?.path(), out)?;
        }
    } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e)) {
        out.push(path.to_path_buf());
    }
    Ok(())
}
