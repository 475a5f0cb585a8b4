//! The `qscore` command: `serve`, `score`, `calibrate`, `evaluate`, `drift`, `explain` and `openapi`.

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::Parser;
use qscore::{
    backfill::{self, fetch::Sources, manifest::Manifest},
    config::{Cli, Command, DriftArgs, ExplainArgs, LogFormat, OutputFormat, ScoreArgs, Shard, SortOrder},
    engine::{Capacity, EmbeddingMode, Engine, ImageScore, Input, Selection, answer::sort_riskiest_first},
    error::ErrorDetail,
    server,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Openapi => print_openapi(),
        Command::Serve(args) => {
            qscore::engine::budget::release_large_frees_to_the_os();
            init_logging(args.log_format);
            runtime()
                .and_then(|rt| {
                    let served = rt.block_on(server::serve(args));
                    // A decode still running on the blocking pool must not hold the exit past
                    // the grace period: dropping the runtime would wait for it.
                    rt.shutdown_timeout(std::time::Duration::from_millis(200));
                    served
                })
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Score(args) => {
            init_logging(LogFormat::Text);
            runtime().and_then(|rt| rt.block_on(score_files(args)))
        }
        Command::Calibrate(args) => {
            init_logging(LogFormat::Text);
            runtime().and_then(|rt| rt.block_on(qscore::calibrate::run(args))).map(|()| ExitCode::SUCCESS)
        }
        Command::Evaluate(args) => qscore::calibrate::evaluate(args).map(|()| ExitCode::SUCCESS),
        Command::Drift(args) => print_backfill_drift(args),
        Command::Explain(args) => {
            init_logging(LogFormat::Text);
            runtime().and_then(|rt| rt.block_on(explain_files(args)))
        }
    };
    match result {
        Ok(code) => code,
        // `qscore drift | head`: the reader has what it wanted; nothing went wrong.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qscore: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocking-pool threads beyond one per core (see [`runtime`]).
const BLOCKING_SPARE_THREADS: usize = 4;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Decodes are CPU-bound and already held to one per core by the engine's decode slots;
        // the spare threads are for the pool's other, occasional jobs (a model reload and its
        // warm-up, which takes seconds on CUDA; the drift refresh; file reads), which with
        // exactly one thread per core would each take a decode's thread while a slot waits.
        .max_blocking_threads(cores.max(2) + BLOCKING_SPARE_THREADS)
        .build()?)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QSCORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn print_backfill_drift(args: DriftArgs) -> anyhow::Result<ExitCode> {
    let drift = qscore::backfill::drift::compare(&args.models_dir, &args.reference, &args.scores)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&drift)?)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn print_openapi() -> anyhow::Result<ExitCode> {
    println!("{}", qscore::http::api_doc().to_pretty_json()?);
    Ok(ExitCode::SUCCESS)
}

/// One line of `qscore score`: the file (or manifest entry), its risk, then the /v1/score
/// answer or the error.
#[derive(serde::Serialize)]
struct FileLine {
    file: String,
    /// [`ImageScore::risk`]: p_misclassified for a calibrated model, 1 / (1 + Q) otherwise;
    /// higher is riskier.
    #[serde(skip_serializing_if = "Option::is_none")]
    risk: Option<f64>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    score: Option<ImageScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
}

impl FileLine {
    fn new(file: String, answer: Result<ImageScore, ErrorDetail>) -> Self {
        match answer {
            Ok(s) => Self { file, risk: Some(s.risk()), score: Some(s), error: None },
            Err(e) => Self { file, risk: None, score: None, error: Some(e) },
        }
    }
}

/// Writes lines as JSON or CSV.
enum Writer {
    Jsonl(std::io::StdoutLock<'static>),
    Csv(Box<csv::Writer<std::io::StdoutLock<'static>>>),
}

impl Writer {
    fn new(format: OutputFormat) -> anyhow::Result<Self> {
        let out = std::io::stdout().lock();
        Ok(match format {
            OutputFormat::Jsonl => Self::Jsonl(out),
            OutputFormat::Parquet => anyhow::bail!("internal error: Parquet is written by the backfill, not by lines"),
            OutputFormat::Csv => {
                let mut w = csv::Writer::from_writer(out);
                w.write_record([
                    "file",
                    "risk",
                    "q_score",
                    "p_misclassified",
                    "likely_misclassified",
                    "predicted_class",
                    "class_probability",
                    "error",
                ])?;
                Self::Csv(Box::new(w))
            }
        })
    }

    fn write(&mut self, line: &FileLine) -> anyhow::Result<()> {
        match self {
            Self::Jsonl(out) => writeln!(out, "{}", serde_json::to_string(line)?)?,
            Self::Csv(w) => {
                let opt = |v: Option<String>| v.unwrap_or_default();
                let s = line.score.as_ref();
                w.write_record([
                    line.file.clone(),
                    opt(line.risk.map(|r| r.to_string())),
                    opt(s.map(|s| s.q_score.to_string())),
                    opt(s.and_then(|s| s.p_misclassified).map(|p| p.to_string())),
                    opt(s.and_then(|s| s.likely_misclassified).map(|f| f.to_string())),
                    opt(s.and_then(|s| s.predicted_class.clone())),
                    opt(s.and_then(|s| s.class_probability).map(|p| p.to_string())),
                    opt(line.error.as_ref().map(|e| format!("{}: {}", e.code, e.message))),
                ])?;
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Self::Jsonl(mut out) => out.flush()?,
            Self::Csv(mut w) => w.flush()?,
        }
        Ok(())
    }
}

/// Image files under `paths`: files as given, folders walked recursively (sorted).
fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            let mut stack = vec![p.clone()];
            while let Some(dir) = stack.pop() {
                for entry in
                    std::fs::read_dir(&dir).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?
                {
                    let entry = entry?;
                    let path = entry.path();
                    // A link to a folder is not walked (as `find` and ripgrep do by default): a
                    // link to `..` would lead out of the folder named and round forever.
                    if entry.file_type()?.is_symlink() && path.is_dir() {
                        tracing::warn!("left out: {} is a link to a folder, which is not followed", path.display());
                    } else if path.is_dir() {
                        stack.push(path);
                    } else if qscore::image::has_image_extension(&path) {
                        found.push(path);
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Scores files through the same pipeline as the server. Exits 1 when any file failed, after
/// writing every line; a Parquet backfill writes failures as rows and exits 1 only while a row
/// failed for a reason a rerun may change (see [`qscore::backfill`]).
async fn score_files(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    if args.format == OutputFormat::Parquet {
        if args.manifest.is_none() {
            anyhow::bail!("--format parquet needs --manifest FILE: the file records which manifest it answers");
        }
        if args.sort == SortOrder::Risk {
            anyhow::bail!(
                "--format parquet keeps the manifest's order; sort the table when reading it, or drop --sort"
            );
        }
    } else if args.out.is_some() {
        anyhow::bail!("--out is for --format parquet; jsonl and csv go to stdout (redirect it)");
    }
    let config = args.engine.config()?;
    let engine = tokio::task::spawn_blocking(move || {
        let selection = config.default_model.clone().map_or(Selection::All, Selection::One);
        Engine::open(&config, &selection, Capacity::OFFLINE)
    })
    .await??;
    let model = engine.registry().get(args.engine.model.as_deref())?;
    if let Some(path) = &args.manifest {
        return score_manifest(&args, path, &engine, &model).await;
    }
    let files = expand(&args.files)?;
    let mut writer = Writer::new(args.format)?;
    let mut held = Vec::new();
    let mut failed = false;
    for chunk in files.chunks(256) {
        let inputs = chunk
            .iter()
            .map(|f| {
                let bytes = backfill::fetch::read_file(f, engine.limits.max_bytes);
                Input::new(f.display().to_string(), bytes)
            })
            .collect();
        for (file, out) in chunk.iter().zip(engine.score(&model, inputs, EmbeddingMode::Omit).await?) {
            failed |= out.answer.is_err();
            let line = FileLine::new(file.display().to_string(), out.answer.map_err(|e| ErrorDetail::from(&e)));
            match args.sort {
                SortOrder::None => writer.write(&line)?,
                SortOrder::Risk => held.push(line),
            }
        }
    }
    sort_riskiest_first(&mut held, |line| line.score.as_ref());
    for line in &held {
        writer.write(line)?;
    }
    writer.finish()?;
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `qscore score --manifest`: one shard of the manifest, as a Parquet file or as lines.
async fn score_manifest(
    args: &ScoreArgs,
    path: &std::path::Path,
    engine: &Engine,
    model: &std::sync::Arc<qscore::engine::Model>,
) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::read(path)?;
    let shard = args.shard.unwrap_or(Shard::WHOLE);
    // Absolute, so a message about a relative entry names a folder even for `--manifest m.txt`.
    let base = std::path::absolute(path)?.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let timeout = std::time::Duration::from_millis(args.fetch_timeout_ms);
    let sources = Sources::new(base, args.allow_host.clone(), engine.limits.max_bytes, timeout)?;
    if let (OutputFormat::Parquet, Some(out)) = (args.format, &args.out) {
        if qscore::regular_file::same(path, out) {
            anyhow::bail!(
                "--out {} is the manifest itself, which writing would replace; give --out another path",
                out.display()
            );
        }
        let outcome = backfill::write_shard(engine, model, &manifest, shard, &sources, out, args.force).await?;
        let retryable = outcome.retryable_rows();
        let permanent = outcome.failed - retryable;
        if !outcome.skipped {
            eprintln!(
                "qscore: wrote shard {shard} to {}: {} rows, {} scored, {permanent} failed for good (the image \
                 itself), {retryable} failed for reasons a rerun may change",
                out.display(),
                outcome.rows,
                outcome.rows - outcome.failed,
            );
        }
        if retryable > 0 {
            // Exit 1 so a Job retries the index; the rerun scores the shard again.
            eprintln!(
                "qscore: shard {shard} is not done: {retryable} rows failed for reasons a rerun may change ({}); fix \
                 the cause (--allow-host, the files, the server) and run the same command again",
                backfill::by_code(&outcome.retryable)
            );
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut writer = Writer::new(args.format)?;
    let mut held = Vec::new();
    let mut failed = false;
    backfill::score_entries(engine, model, &manifest.shard(shard), &sources, |entry, answer| {
        failed |= answer.is_err();
        let line = FileLine::new(entry.text.clone(), answer);
        match args.sort {
            SortOrder::None => writer.write(&line),
            SortOrder::Risk => {
                held.push(line);
                Ok(())
            }
        }
    })
    .await?;
    sort_riskiest_first(&mut held, |line| line.score.as_ref());
    for line in &held {
        writer.write(line)?;
    }
    writer.finish()?;
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `qscore explain`: each file through [`Engine::explain`], as `POST /v1/explain` does; its
/// overlay written to `--out`, its answer printed as a JSON line (with `overlay`, the PNG's
/// path). Exits 1 when any file failed, after trying every one.
async fn explain_files(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    use qscore::{
        engine::explain::ExplainRequest,
        explain::{Occlusion, overlay, parse_features},
    };
    let config = args.engine.config()?;
    let mut engine = tokio::task::spawn_blocking(move || {
        let selection = config.default_model.clone().map_or(Selection::All, Selection::One);
        Engine::open(&config, &selection, Capacity::OFFLINE)
    })
    .await??;
    engine.set_explain_limits(args.explain.limits());
    let model = engine.registry().get(args.engine.model.as_deref())?;
    let features = parse_features(&args.features, model.manifest.output.dim, engine.explain.max_features)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replacen("`features`", "--features", 1)))?;
    // A plan out of bounds would fail every file alike: say so once, before any work.
    let p = &model.preprocess;
    Occlusion::plan(p.height as usize, p.width as usize, args.patch, args.stride, &engine.explain)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace('`', "--").replace("--patch--", "--patch")))?;
    std::fs::create_dir_all(&args.out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.out.display()))?;
    let request = ExplainRequest { features, patch: args.patch, stride: args.stride, fill: args.fill };
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    // Overlays are named by the file's stem; two inputs with one stem (`a/1.png`, `b/1.png`)
    // get `1.png` and `1-2.png`, so no overlay overwrites another (each JSON line names its own).
    let mut taken = std::collections::HashSet::new();
    let files = expand(&args.files)?;
    // An overlay never replaces an input (`--out` may be the folder the images are in).
    let inputs: std::collections::HashSet<PathBuf> = files.iter().filter_map(|f| f.canonicalize().ok()).collect();
    let is_input = |path: &std::path::Path| path.canonicalize().is_ok_and(|p| inputs.contains(&p));
    for file in files {
        let name = file.display().to_string();
        let bytes = backfill::fetch::read_file(&file, engine.limits.max_bytes);
        let line = match engine.explain(&model, Input::new(name.clone(), bytes), &request).await {
            Ok(e) => {
                let stem = file.file_stem().map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
                let unique = (1..)
                    .map(|n| if n == 1 { stem.clone() } else { format!("{stem}-{n}") })
                    .find(|candidate| {
                        !is_input(&args.out.join(format!("{candidate}.png"))) && taken.insert(candidate.clone())
                    })
                    .expect("an unbounded range finds a free name");
                let path = args.out.join(format!("{unique}.png"));
                let maps: Vec<&[f32]> = e.features.iter().map(|f| f.heatmap.as_slice()).collect();
                let canvas = overlay::render(e.input.view(), &p.mean, &p.std, &e.occlusion, &maps);
                overlay::png(&canvas)
                    .map_err(anyhow::Error::from)
                    .and_then(|png| Ok(std::fs::write(&path, png)?))
                    .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", path.display()))?;
                serde_json::json!({ "file": name, "overlay": path.display().to_string(), "explanation": e })
            }
            Err(e) => {
                failed = true;
                serde_json::json!({ "file": name, "error": ErrorDetail::from(&e) })
            }
        };
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
