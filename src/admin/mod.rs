//! The admin endpoint (`[metrics] listen`): `GET /metrics` (Prometheus text), `GET /health`
//! (200 while the upstream is connected, 503 when not) and `GET /status` (JSON for an operator).
//!
//! Three routes and one response per connection, so the HTTP side is a small hand-written
//! HTTP/1.1 responder rather than a full HTTP stack. What it must never do is let a scraper, a
//! port scanner or a slow client hold resources, or keep `/health` from answering, so: each
//! connection is served in its own task; the request head is capped at 8 KiB, its blank line
//! included (431 past it), and must arrive within 5 s (408 otherwise); at most
//! [`MAX_CONNECTIONS`] connections are open at once, and a new one past that closes the oldest
//! (which, since every connection lasts at most a few seconds, is one that is idle or slow)
//! rather than being refused, so idle connections can never lock a health check out; a request
//! body is never read, only GET is answered (405), unknown paths get 404, and every response
//! carries `Connection: close` and ends the connection. It runs beside the client listeners on
//! the same runtime and never touches the request path.

mod exposition;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::exposition::CONTENT_TYPE;
use crate::{
    cache::{self, NearCache},
    client::Live,
    config::Config,
    metrics::{Metrics, Totals},
    pubsub::Counts,
    upstream::{Snapshot, Upstreams},
};

/// Longest request head: request line, headers and the blank line that ends them.
const MAX_HEAD: usize = 8 * 1024;
/// Time for the whole request head to arrive, and for the response to be taken. A scraper sends
/// its head at once; only a stalled or hostile client needs longer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once. Generous, since each lasts at most two [`IO_TIMEOUT`]s and holds a
/// task, a socket and at most [`MAX_HEAD`] bytes; bounded, since each is a file descriptor
/// taken from the clients'. Past it the oldest is closed (see [`Open`]).
pub const MAX_CONNECTIONS: usize = 512;
/// Pause after a failed accept (typically EMFILE), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the endpoint reads from.
pub struct Admin {
    metrics: Arc<Metrics>,
    /// The settings in effect: after a reload, `/status` shows the new configuration, and
    /// `/health` and the gauges the upstream connections new clients get.
    live: watch::Receiver<Arc<Live>>,
    /// The client addresses bound (the configured port may be 0).
    listen: Vec<String>,
    /// This endpoint's address, as bound.
    metrics_listen: String,
}

/// The configuration as `/status` shows it: no password, of the upstream or of clients.
#[derive(Debug, Clone, Serialize)]
struct ConfigSummary<'a> {
    listen: &'a [String],
    tls_listen: Vec<String>,
    unix_socket: Option<String>,
    metrics_listen: &'a str,
    /// `host:port`, `unix:///path` or `embedded`: credentials are never part of it.
    upstream: String,
    upstream_user: Option<String>,
    upstream_db: u32,
    connections: usize,
    max_clients: usize,
    max_pipeline: usize,
    max_pinned: usize,
    max_shared: usize,
    /// Clients must authenticate (`[auth]`).
    auth_required: bool,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
struct Status<'a> {
    version: &'static str,
    uptime_seconds: u64,
    config: ConfigSummary<'a>,
    clients: usize,
    #[serde(flatten)]
    upstream: Snapshot,
    pubsub: Counts,
    /// The near cache, when it is on: its hit rate among the rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<cache::Snapshot>,
    counters: Totals,
}

impl Admin {
    /// `listen` and `metrics_listen`: the addresses bound (the configured port may be 0).
    pub fn new(
        listen: &[SocketAddr],
        metrics_listen: SocketAddr,
        metrics: Arc<Metrics>,
        live: watch::Receiver<Arc<Live>>,
    ) -> Arc<Admin> {
        Arc::new(Admin {
            metrics,
            live,
            listen: listen.iter().map(ToString::to_string).collect(),
            metrics_listen: metrics_listen.to_string(),
        })
    }

    /// The upstream connections new clients get.
    fn upstreams(&self) -> Upstreams {
        self.live.borrow().upstreams.clone()
    }

    fn summary<'a>(&'a self, config: &Config) -> ConfigSummary<'a> {
        let endpoint = config.upstream.endpoint();
        let server = &config.server;
        let auth = &config.auth;
        let tls_listen = server.tls.iter().flat_map(|tls| &tls.listen);
        ConfigSummary {
            listen: &self.listen,
            tls_listen: tls_listen.map(ToString::to_string).collect(),
            unix_socket: server.unix_socket.as_ref().map(|p| p.display().to_string()),
            metrics_listen: &self.metrics_listen,
            upstream: endpoint.address.to_string(),
            upstream_user: endpoint.username.clone(),
            upstream_db: endpoint.db,
            connections: config.upstream.connections,
            max_clients: server.max_clients,
            max_pipeline: server.max_pipeline,
            max_pinned: config.upstream.max_pinned,
            max_shared: config.upstream.max_shared,
            auth_required: auth.password.is_some() || !auth.users.is_empty(),
        }
    }

    /// The answer to one request head.
    fn route(&self, head: &[u8]) -> Response {
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut parts = line.split(|b| *b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Response::text(400, "Bad Request", "bad request line\n");
        };
        if !version.starts_with(b"HTTP/1.") {
            return Response::text(400, "Bad Request", "HTTP/1.x only\n");
        }
        let path = target.split(|b| *b == b'?').next().unwrap_or_default();
        let known = matches!(path, b"/metrics" | b"/health" | b"/status");
        if !known {
            return Response::text(
                404,
                "Not Found",
                "not found: try /metrics, /health, /status\n",
            );
        }
        if method != b"GET" {
            let mut response = Response::text(405, "Method Not Allowed", "GET only\n");
            response.allow = true;
            return response;
        }
        match path {
            b"/metrics" => match self.prometheus() {
                Ok(text) => Response {
                    content_type: CONTENT_TYPE,
                    ..Response::text(200, "OK", text)
                },
                Err(_) => Response::text(500, "Internal Server Error", "encoding failed\n"),
            },
            b"/health" if self.upstreams().healthy() => Response::text(200, "OK", "OK\n"),
            b"/health" => Response::text(503, "Service Unavailable", "upstream down\n"),
            _ => self.status(),
        }
    }

    fn prometheus(&self) -> Result<String, std::fmt::Error> {
        let live = self.live.borrow().clone();
        exposition::prometheus(
            &self.metrics,
            live.upstreams.snapshot(),
            live.hubs.counts(),
            live.session.cache.as_ref().map(NearCache::snapshot),
        )
    }

    fn status(&self) -> Response {
        let live = self.live.borrow().clone();
        let status = Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.metrics.uptime().as_secs(),
            config: self.summary(&live.config),
            clients: self
                .metrics
                .clients
                .load(std::sync::atomic::Ordering::Relaxed),
            upstream: live.upstreams.snapshot(),
            pubsub: live.hubs.counts(),
            cache: live.session.cache.as_ref().map(NearCache::snapshot),
            counters: self.metrics.totals(),
        };
        match serde_json::to_string_pretty(&status) {
            Ok(mut json) => {
                json.push('\n');
                Response {
                    content_type: "application/json",
                    ..Response::text(200, "OK", json)
                }
            }
            Err(_) => Response::text(500, "Internal Server Error", "encoding failed\n"),
        }
    }
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    /// Send `Allow: GET` (with 405).
    allow: bool,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: body.into(),
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            if self.allow { "Allow: GET\r\n" } else { "" },
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// Serves the endpoint until `shutdown`.
pub async fn run(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let open = Arc::new(Open::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let (id, closed) = open.add();
        let (admin, open) = (admin.clone(), open.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = respond(stream, &admin) => {}
                () = closed.cancelled() => debug!("metrics endpoint: too many connections; closed the oldest"),
            }
            open.remove(id);
        });
    }
}

/// The connections open now, oldest first, each with the token that closes it. When a new one
/// would make more than [`MAX_CONNECTIONS`], the oldest is closed: every connection ends within
/// a few seconds by itself, so the oldest is one that has sat idle or sent slowly the longest,
/// while a health check sends its request at once and is answered long before it is oldest.
/// Refusing the new one instead would let a few hundred idle sockets keep every check out.
#[derive(Default)]
struct Open {
    /// Each connection's id and the token its task closes the connection on.
    connections: Mutex<VecDeque<(u64, CancellationToken)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Open {
    /// Registers a new connection, closing the oldest if that makes one too many; its id, and
    /// the token cancelled when it is to be closed.
    fn add(&self) -> (u64, CancellationToken) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut connections = self.lock();
        while connections.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = connections.pop_front() {
                oldest.cancel();
            }
        }
        connections.push_back((id, token.clone()));
        (id, token)
    }

    /// Forgets a connection that has ended (it may have been closed as the oldest already).
    fn remove(&self, id: u64) {
        let mut connections = self.lock();
        if let Some(at) = connections.iter().position(|(open, _)| *open == id) {
            connections.remove(at);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, CancellationToken)>> {
        // Nothing panics while holding it; if something did, the list is still consistent.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads one request head, answers it, and closes the connection.
async fn respond(mut stream: TcpStream, admin: &Admin) {
    let response = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text(408, "Request Timeout", "request timeout\n"),
        Ok(Err(HeadError::TooLarge)) => Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Ok(head)) => admin.route(&head),
    };
    let write = async {
        stream.write_all(&response.into_bytes()).await?;
        stream.shutdown().await
    };
    if let Err(error) = tokio::time::timeout(IO_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        debug!(%error, "metrics endpoint: response not delivered");
    }
}

#[derive(Debug)]
enum HeadError {
    /// Past `MAX_HEAD` without the blank line that ends it.
    TooLarge,
    /// The client left (or the socket failed) before the head was complete.
    Closed,
}

/// Reads up to the blank line that ends a request head, never more than [`MAX_HEAD`] bytes:
/// a head that has not ended within them is too large, whatever follows.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let room = MAX_HEAD.saturating_sub(head.len());
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        let buffer = chunk.get_mut(..room.min(1024)).unwrap_or_default();
        let n = stream.read(buffer).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(buffer.get(..n).unwrap_or_default());
        if let Some(end) = head_end(head.get(scan_from..).unwrap_or_default()) {
            head.truncate(scan_from + end);
            return Ok(head);
        }
    }
}

/// Where the head ends in `bytes`: after `\r\n\r\n` (or a bare `\n\n`).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(bytes, b"\r\n\r\n").map(|at| at + 4);
    let lf = memchr::memmem::find(bytes, b"\n\n").map(|at| at + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn responses_close_the_connection_and_say_their_length() {
        let mut response = Response::text(405, "Method Not Allowed", "GET only\n");
        response.allow = true;
        let text = String::from_utf8(response.into_bytes()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nContent-Length: 9\r\n"), "{text}");
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
        assert!(
            text.ends_with("\r\nConnection: close\r\n\r\nGET only\n"),
            "{text}"
        );
    }
}
