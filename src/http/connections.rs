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
//! - a cap per client address, below the total: one client that opens connections and keeps
//!   them busy (a keep-alive request every few seconds never trips the idle timeout) would
//!   otherwise hold every slot and leave even the health probe in the backlog. Past it, the
//!   client's new connection gets a 503 JSON answer and is closed;
//! - the open-file limit raised to its hard maximum at start-up, so the cap can be generous.
//!
//! Request bodies have their own deadline and size limit (`upload::read_limited`) on every
//! route. HTTP/2 is not served: none of the clients qscore speaks to need it, and its streams
//! would each need the same limits again.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::Semaphore};

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
    /// Most connections open at once from one client address.
    pub max_connections_per_client: usize,
}

/// Open connections per client address; an entry leaves when its last connection closes.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One client's claim on a connection; released on drop.
struct ClientSlot {
    clients: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn claim(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientSlot> {
        let mut open = self.0.lock().expect("per-client lock");
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot { clients: Arc::clone(self), ip })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.0.lock().expect("per-client lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The body of the answer to a connection past its client's cap, written before anything is
/// read.
const TOO_MANY_CONNECTIONS: &str = r#"{"error":{"code":"too_many_connections","message":"this client address has too many open connections; reuse or close some (--max-connections-per-client)"}}"#;

fn too_many_connections() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n\
         retry-after: 1\r\ncontent-length: {}\r\n\r\n{TOO_MANY_CONNECTIONS}",
        TOO_MANY_CONNECTIONS.len()
    )
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
    let clients = Arc::new(PerClient::default());
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, keep serving.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(client) = clients.claim(peer.ip(), limits.max_connections_per_client) else {
            drop(slot);
            // Written without reading the request, in its own task, bounded by the send
            // timeout, so a refused client cannot slow the accept loop.
            let send_timeout = limits.send_timeout;
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(send_timeout, stream.write_all(too_many_connections().as_bytes())).await;
                let _ = tokio::time::timeout(send_timeout, stream.shutdown()).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.send_timeout));
        let io = TokioIo::new(Box::pin(stream));
        let connection = http.serve_connection(io, TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // The client's claim goes before the slot, so the connection the slot lets in next
            // never finds this one still counted against its address.
            let _slots = (client, slot);
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
