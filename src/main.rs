//! The `qscore` command: `serve`, `score`, `calibrate`, `evaluate` and `openapi`.

use std::{io::Write, process::ExitCode};

use bytes::Bytes;
use clap::Parser;
use qscore::{
    config::{Cli, Command, LogFormat, ScoreArgs},
    http::error::ErrorDetail,
    scoring::ImageScore,
    server,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Openapi => print_openapi(),
        Command::Serve(args) => {
            init_logging(args.log_format);
            runtime().and_then(|rt| rt.block_on(server::serve(args))).map(|()| ExitCode::SUCCESS)
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qscore: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Decoding is CPU-bound: more blocking threads than cores only adds contention.
        .max_blocking_threads(cores.max(2))
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

fn print_openapi() -> anyhow::Result<ExitCode> {
    println!("{}", qscore::http::api_doc().to_pretty_json()?);
    Ok(ExitCode::SUCCESS)
}

/// One line of `qscore score`: the file, then the /v1/score answer or the error.
#[derive(serde::Serialize)]
struct FileLine<'a> {
    file: &'a std::path::Path,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    score: Option<ImageScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
}

/// Scores files through the same pipeline as the server; one JSON line per file, in order.
/// Exits 1 when any file failed, after printing every line.
async fn score_files(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let engine = args.engine.clone();
    let scorer = tokio::task::spawn_blocking(move || {
        server::build_scorer(&engine, &qscore::model::Selection::All, server::Capacity::OFFLINE)
    })
    .await??;
    let model = scorer.registry.get(args.engine.model.as_deref())?.clone();
    let mut stdout = std::io::stdout().lock();
    let mut failed = false;
    for chunk in args.files.chunks(256) {
        let mut readable = Vec::with_capacity(chunk.len());
        let reads: Vec<_> = chunk.iter().map(|f| std::fs::read(f).map(|b| readable.push(Bytes::from(b)))).collect();
        let mut scored = scorer.score(&model, readable, qscore::scoring::Embedding::Omit).await?.into_iter();
        for (file, read) in chunk.iter().zip(reads) {
            let answer = match read {
                Err(e) => Err(ErrorDetail { code: "unreadable_file".into(), message: e.to_string() }),
                Ok(()) => scored
                    .next()
                    .unwrap_or_else(|| Err(qscore::error::Error::Internal("a file was left unanswered".into())))
                    .map_err(|e| ErrorDetail::from(&e)),
            };
            failed |= answer.is_err();
            let (score, error) = match answer {
                Ok(score) => (Some(score), None),
                Err(error) => (None, Some(error)),
            };
            writeln!(stdout, "{}", serde_json::to_string(&FileLine { file, score, error })?)?;
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
