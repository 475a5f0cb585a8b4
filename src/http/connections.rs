//! Client connections: accepted up to a cap, timed out while idle or while sending headers,
//! drained on shutdown.
//!
//! axum's `serve` keeps every connection as long as the client likes: headers trickled a byte
//! at a time, or an idle keep-alive socket, hold a task and a file descriptor forever, and
//! enough of them starve the health probe of descriptors. So qscore runs hyper's HTTP/1.1
//! connection itself (hyper-util's graceful shutdown, tower-to-hyper service) with:
//!
//! - a header-read timeout, which hyper also applies while a keep-alive connection waits for
//!   its next request, so it is the idle timeout as well;
//! - a send timeout: a client that stops reading its answers (a small receive window, a
//!   pipeline of requests it never reads) is dropped once a write makes no progress for that
//!   long, so unread answers never pile up in memory or hold a connection slot;
//! - half-close allowed: a client that shuts its sending side down after a complete request
//!   (`nc -N`, socat, some proxies) is still answered, within the same send timeout;
//! - a cap on open connections: past it the accept loop waits and new clients queue in the
//!   kernel's backlog, instead of the process running out of descriptors;
//! - the open-file limit raised to its hard maximum at start-up, so the cap can be generous.
//!
//! Request bodies have their own deadline and size limit (`upload::read_limited`) on every
//! route. HTTP/2 is not served: none of the clients qscore speaks to need it, and its streams
//! would each need the same limits again.

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};

/// How connections are limited.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Longest a client may take to send a request's headers, and longest an idle keep-alive
    /// connection is kept.
    pub header_read_timeout: Duration,
    /// Longest a write to the client may make no progress before the connection is dropped.
    pub send_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Descriptors kept free of client connections, for model files, the metrics scrape's own
/// work, outgoing fetches and the webhook.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the soft open-file limit to the hard one and answers the connection cap it allows:
/// `requested`, or the limit minus [`RESERVED_DESCRIPTORS`] (at most 4096, at least 16).
pub fn connection_cap(requested: Option<usize>) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("cannot read or raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let allowed = limit.saturating_sub(RESERVED_DESCRIPTORS).clamp(16, 4096) as usize;
    match requested {
        Some(n) if n as u64 + RESERVED_DESCRIPTORS > limit => {
            tracing::warn!(
                "--max-connections {n} leaves fewer than {RESERVED_DESCRIPTORS} of the {limit} open files; using {allowed}"
            );
            allowed
        }
        Some(n) => n.max(1),
        None => allowed,
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets each open
/// connection finish the request it is in, and returns once all have closed (the caller bounds
/// that wait with the shutdown grace).
pub async fn serve(listener: TcpListener, app: Router, limits: ConnectionLimits, shutdown: impl Future<Output = ()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // Half-close: a client that sends its request and then shuts its side down (`nc -N`, socat,
    // some proxies) still gets its answer; the send timeout bounds one that then never reads.
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true).half_close(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, keep serving.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.send_timeout));
        let io = TokioIo::new(Box::pin(stream));
        let connection = http.serve_connection(io, TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
