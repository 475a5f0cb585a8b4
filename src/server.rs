//! Start-up and shutdown of `qscore serve`.
//!
//! Order matters and is visible here: load and warm up every model, then bind the port, then
//! report ready. On SIGTERM or SIGINT the server reports not-ready, stops accepting, answers
//! what is in flight, and exits; after `--shutdown-grace-s` it exits whatever is left (the
//! caller must not wait for blocking decodes either: see `main`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;

use crate::{
    batch::Admission,
    budget::MemoryBudget,
    config::{EngineArgs, ServeArgs},
    drift::{DriftMonitor, DriftSettings},
    http::{
        self, AppState, RequestLimits,
        auth::ApiKeys,
        connections::{self, ConnectionLimits, connection_cap},
        labelstudio::LabelStudio,
    },
    image::ImageLimits,
    metrics::Metrics,
    model::{Registry, Selection},
    scoring::Scorer,
};

/// How much work the pipeline takes on at once, for how long, and how much it remembers.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Most images inside the pipeline at once.
    pub max_images: usize,
    /// Deadline of one call.
    pub timeout: Duration,
    /// The drift windows.
    pub drift: DriftSettings,
    /// `--memory-budget-bytes`.
    pub memory_budget: u64,
}

impl Capacity {
    /// For offline tools (`score`, `calibrate`): they feed the pipeline in chunks themselves,
    /// wait as long as it takes, and watch no drift.
    pub const OFFLINE: Self = Self {
        max_images: usize::MAX / 2,
        timeout: Duration::from_secs(24 * 3600),
        drift: DriftSettings { max_images: 0, max_age: Duration::ZERO },
        memory_budget: u64::MAX,
    };
}

/// Loads the models and builds the scoring pipeline (shared by `serve`, `score` and
/// `calibrate`).
pub fn build_scorer(engine: &EngineArgs, selection: &Selection, capacity: Capacity) -> anyhow::Result<Scorer> {
    let metrics = Metrics::new();
    let registry = Registry::load(engine, selection, &metrics)?;
    let drift = DriftMonitor::new(registry.models().map(AsRef::as_ref), capacity.drift);
    Ok(Scorer {
        drift,
        registry: Arc::new(registry),
        limits: ImageLimits {
            max_bytes: engine.max_image_bytes,
            max_pixels: engine.max_image_pixels,
            max_aspect_ratio: engine.max_image_aspect_ratio,
        },
        admission: Admission::new(capacity.max_images),
        budget: MemoryBudget::new(capacity.memory_budget),
        decode_slots: Arc::new(tokio::sync::Semaphore::new(cores())),
        request_timeout: capacity.timeout,
        metrics,
    })
}

/// CPU cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// Runs the server until a shutdown signal, then drains for at most `--shutdown-grace-s`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let engine = args.engine.clone();
    let capacity = Capacity {
        max_images: args.max_queued_images,
        timeout: Duration::from_millis(args.request_timeout_ms),
        drift: DriftSettings { max_images: args.drift_window, max_age: Duration::from_secs(args.drift_window_s) },
        memory_budget: args.memory_budget_bytes,
    };
    let api_keys = args.api_keys_file.as_deref().map(ApiKeys::load).transpose()?;
    let label_studio = args
        .label_studio_url
        .as_deref()
        .map(|url| {
            let timeout = Duration::from_millis(args.label_studio_timeout_ms);
            LabelStudio::new(url, args.label_studio_token.clone(), timeout, args.engine.max_image_bytes).map(Arc::new)
        })
        .transpose()?;
    let scorer = tokio::task::spawn_blocking(move || build_scorer(&engine, &Selection::All, capacity)).await??;
    if let Some(keys) = &api_keys {
        keys.watch();
    }
    let webhook = args
        .flagged_webhook
        .as_deref()
        .map(|url| {
            let url =
                reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("--flagged-webhook {url} is not a URL: {e}"))?;
            let timeout = Duration::from_millis(args.flagged_webhook_timeout_ms);
            crate::webhook::Webhook::start(url, timeout, scorer.metrics.clone())
        })
        .transpose()?;
    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        webhook,
        scorer: Arc::new(scorer),
        limits: RequestLimits {
            max_body_bytes: args.max_body_bytes,
            max_batch_images: args.max_batch_images,
            body_timeout: capacity.timeout,
        },
        ready: Arc::clone(&ready),
        api_keys,
        label_studio,
    };
    let app = http::router(state, &args.cors_origin);

    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}; is the port taken? (--port / QSCORE_PORT)"))?;
    let local = listener.local_addr()?;
    ready.store(true, Ordering::Release);
    tracing::info!("qscore listening on http://{local}");

    let stopping = Arc::new(tokio::sync::Notify::new());
    let notify = Arc::clone(&stopping);
    let connection_limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
        max_connections: connection_cap(args.max_connections),
    };
    let server = connections::serve(listener, app, connection_limits, async move {
        shutdown_signal().await;
        ready.store(false, Ordering::Release);
        tracing::info!("shutting down: finishing requests in flight");
        notify.notify_one();
    });
    let grace = Duration::from_secs(args.shutdown_grace_s);
    tokio::select! {
        () = server => Ok(()),
        () = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("requests still in flight after --shutdown-grace-s {}; exiting", args.shutdown_grace_s);
            Ok(())
        }
    }
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
