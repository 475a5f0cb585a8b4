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
    config::ServeArgs,
    drift::DriftSettings,
    engine::{Capacity, Engine, Selection},
    http::{
        self, AppState, RequestLimits,
        auth::ApiKeys,
        connections::{self, ConnectionLimits, connection_cap},
        labelstudio::{LabelStudio, StorageHosts},
    },
};

/// Runs the server until a shutdown signal, then drains for at most `--shutdown-grace-s`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.engine.config()?;
    let capacity = Capacity {
        max_images: args.max_queued_images,
        timeout: Duration::from_millis(args.request_timeout_ms),
        drift: DriftSettings { max_images: args.drift_window, max_age: Duration::from_secs(args.drift_window_s) },
        memory_budget: args.memory_budget_bytes,
    };
    if args.drift_window < crate::drift::MIN_DRIFT_WINDOW {
        tracing::warn!(
            "--drift-window {} is below the {} answers the shipped KS and PSI thresholds were measured at: \
             /v1/drift will always say too_few_images and the drift alerts will never evaluate",
            args.drift_window,
            crate::drift::MIN_DRIFT_WINDOW
        );
    }
    let api_keys = args.api_keys_file.as_deref().map(ApiKeys::load).transpose()?;
    let label_studio = args
        .label_studio_url
        .as_deref()
        .map(|url| {
            let timeout = Duration::from_millis(args.label_studio_timeout_ms);
            let hosts = StorageHosts::parse(&args.label_studio_storage_hosts)?;
            let ls = LabelStudio::new(url, args.label_studio_token.clone(), timeout, args.engine.max_image_bytes)?;
            anyhow::Ok(Arc::new(ls.with_storage_hosts(hosts)))
        })
        .transpose()?;
    let mut engine = tokio::task::spawn_blocking(move || Engine::open(&config, &Selection::All, capacity)).await??;
    engine.set_explain_limits(args.explain.limits());
    if let Some(keys) = &api_keys {
        keys.watch();
    }
    if let Some(url) = args.flagged_webhook.as_deref() {
        let url = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("--flagged-webhook {url} is not a URL: {e}"))?;
        let timeout = Duration::from_millis(args.flagged_webhook_timeout_ms);
        engine.observe(Arc::new(crate::engine::webhook::Webhook::start(url, timeout, engine.metrics.clone())?));
    }
    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        engine: Arc::new(engine),
        limits: RequestLimits {
            max_body_bytes: args.max_body_bytes,
            max_batch_images: args.max_batch_images,
            body_timeout: capacity.timeout,
        },
        ready: Arc::clone(&ready),
        api_keys,
        label_studio,
    };
    Engine::watch_drift(Arc::clone(&state.engine));
    let poll = (args.reload_poll_ms > 0).then(|| Duration::from_millis(args.reload_poll_ms));
    Engine::watch_models(Arc::clone(&state.engine), poll);
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
    let max_connections = connection_cap(args.max_connections);
    let connection_limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
        send_timeout: Duration::from_millis(args.send_timeout_ms),
        max_connections,
        max_connections_per_client: args.max_connections_per_client.unwrap_or(max_connections / 4).max(1),
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
