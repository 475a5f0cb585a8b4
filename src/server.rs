//! Start-up and shutdown of `qscore serve`.
//!
//! Order matters and is visible here: load and warm up every model, then bind the port, then
//! report ready. On SIGTERM or SIGINT the server reports not-ready, stops accepting, answers
//! what is in flight, and exits.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;

use crate::{
    config::{EngineArgs, ServeArgs},
    http::{self, AppState, RequestLimits},
    image::ImageLimits,
    metrics::Metrics,
    model::{Registry, Selection},
    scoring::Scorer,
};

/// Loads the models and builds the scoring pipeline (shared by `serve`, `score` and
/// `calibrate`).
pub fn build_scorer(engine: &EngineArgs, selection: &Selection, queue: usize) -> anyhow::Result<Scorer> {
    let metrics = Metrics::new();
    let registry = Registry::load(engine, selection, queue, &metrics)?;
    Ok(Scorer {
        registry: Arc::new(registry),
        limits: ImageLimits { max_bytes: engine.max_image_bytes, max_pixels: engine.max_image_pixels },
        max_batch: engine.max_batch as usize,
        metrics,
    })
}

/// Runs the server until a shutdown signal.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let engine = args.engine.clone();
    let queue = args.max_queued_jobs;
    let scorer = tokio::task::spawn_blocking(move || build_scorer(&engine, &Selection::All, queue)).await??;
    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        scorer: Arc::new(scorer),
        limits: RequestLimits { max_body_bytes: args.max_body_bytes, max_batch_images: args.max_batch_images },
        ready: Arc::clone(&ready),
    };
    let app = http::router(state);

    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}; is the port taken? (--port / QSCORE_PORT)"))?;
    let local = listener.local_addr()?;
    ready.store(true, Ordering::Release);
    tracing::info!("qscore listening on http://{local}");

    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            ready.store(false, Ordering::Release);
            tracing::info!("shutting down: finishing requests in flight");
        })
        .await
        .context("server error")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
