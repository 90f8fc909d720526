//! The server: listeners (TCP, unix, TLS), the accept loops, and the order of a graceful
//! shutdown.
//!
//! An accept loop only accepts and counts: anything that takes time, the TLS handshake
//! included, happens in the client's own task, so a slow client never holds up the next.
//!
//! Shutdown: the token stops the accept loops and tells every session to stop reading; sessions
//! finish the replies they owe; after `shutdown_grace` whatever is left is abandoned. Upstream
//! actors end by themselves once the last session (and so the last channel sender) is gone.
//!
//! Each accepted client takes the settings in effect from the [`Reloader`]'s channel (see
//! [`crate::live`]), so a reload applies from the next accept on.

mod reload;
pub mod tls;
mod workers;

pub use reload::Reloader;
use tls::TlsClient;
use workers::Workers;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn, Instrument};

use crate::{
    client::{ClientState, Live, Peer, Session},
    config::Config,
    io::Duplex,
    metrics::{Metrics, Rejection},
    tls::TlsError,
    upstream::Upstreams,
};

/// Pause after a failed accept (typically EMFILE), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// TLS clients past `max_clients` being told so at once. Each needs a handshake first, which
/// may take up to [`tls::HANDSHAKE_TIMEOUT`], and they do not count as clients: past this
/// many, the next is closed without a word, as Redis closes every TLS client past maxclients.
pub const MAX_TLS_REFUSALS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    Bind { addr: String, source: io::Error },
    #[error("cannot start the upstream")]
    Upstream(#[source] io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A bound, not yet running, server.
pub struct Server {
    tcp: Vec<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    /// `[server.tls]`: its listeners and the acceptor they share.
    tls: Option<(Vec<TcpListener>, TlsAcceptor)>,
    metrics: Arc<Metrics>,
    reloader: Reloader,
    /// Cancelled when the caller's shutdown token is: stops the accept loops and the sessions,
    /// which it reaches through the settings they hold (see [`Live::superseded`]).
    stop: CancellationToken,
    /// Stops the embedded upstream, once clients are done with it.
    upstream_shutdown: CancellationToken,
}

/// State the accept loops share.
struct Shared {
    /// The settings in effect; each new client takes them, and its session follows reloads.
    live: tokio::sync::watch::Receiver<Arc<Live>>,
    /// Counts clients (and admits them by that count).
    metrics: Arc<Metrics>,
    /// TLS clients past `max_clients` in their handshake, to be told so: at most
    /// [`MAX_TLS_REFUSALS`].
    tls_refusals: AtomicUsize,
    next_id: AtomicU64,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The runtimes of the serving threads after this one, which clients are handed to in
    /// turn with this one.
    workers: Vec<tokio::runtime::Handle>,
    next_worker: AtomicUsize,
}

impl Server {
    /// Binds every listener and starts the upstream actors (and the embedded store).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let tcp = bind_tcp(&config.server.listen).await?;
        let tls = match &config.server.tls {
            Some(settings) => Some((bind_tcp(&settings.listen).await?, tls::acceptor(settings)?)),
            None => None,
        };
        let unix = match &config.server.unix_socket {
            Some(path) => Some((
                bind_unix(path, config.server.unix_socket_mode)?,
                path.clone(),
            )),
            None => None,
        };
        // Per-request counters cost a little on every request: kept only when the admin
        // endpoint is there to show them.
        let metrics = Arc::new(Metrics::new(config.metrics.listen.is_some()));
        let upstream_shutdown = CancellationToken::new();
        let upstreams = Upstreams::start(&config.upstream, metrics.clone(), &upstream_shutdown)
            .await
            .map_err(ServerError::Upstream)?;
        let stop = CancellationToken::new();
        let reloader = Reloader::new(
            config,
            upstreams,
            metrics.clone(),
            stop.clone(),
            upstream_shutdown.clone(),
        );
        Ok(Server {
            tcp,
            unix,
            tls,
            metrics,
            reloader,
            stop,
            upstream_shutdown,
        })
    }

    /// What this server counts, for the admin endpoint to show.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Replaces the settings while the server runs (SIGHUP), and lets others follow them: a
    /// metrics endpoint, say, subscribes to it for the configuration in effect.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The TCP addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The TLS addresses actually bound.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.tls
            .iter()
            .flat_map(|(listeners, _)| listeners)
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then drains for at most `shutdown_grace`.
    pub async fn run(self, shutdown: CancellationToken) {
        let threads = self
            .reloader
            .subscribe()
            .borrow()
            .config
            .server
            .threads
            .count();
        let workers = match Workers::start(threads - 1) {
            Ok(workers) => Some(workers),
            Err(error) => {
                error!(%error, threads, "cannot start the serving threads; serving on one");
                None
            }
        };
        info!(
            threads = workers.as_ref().map_or(1, |w| w.handles().len() + 1),
            "serving"
        );
        let shared = Arc::new(Shared {
            workers: workers
                .as_ref()
                .map(|w| w.handles().to_vec())
                .unwrap_or_default(),
            next_worker: AtomicUsize::new(0),
            live: self.reloader.subscribe(),
            metrics: self.metrics.clone(),
            tls_refusals: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            shutdown: self.stop.clone(),
        });
        let mut loops = Vec::new();
        for listener in self.tcp {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "listening");
            }
            loops.push(tokio::spawn(accept_loop(listener, shared.clone())));
        }
        if let Some((listeners, acceptor)) = self.tls {
            for tcp in listeners {
                if let Ok(addr) = tcp.local_addr() {
                    info!(%addr, "listening (TLS)");
                }
                let listener = TlsListener {
                    tcp,
                    acceptor: acceptor.clone(),
                    shutdown: self.stop.clone(),
                };
                loops.push(tokio::spawn(accept_loop(listener, shared.clone())));
            }
        }
        let unix_path = self.unix.map(|(listener, path)| {
            info!(path = %path.display(), "listening on unix socket");
            loops.push(tokio::spawn(accept_loop(listener, shared.clone())));
            path
        });
        shutdown.cancelled().await;
        self.stop.cancel();
        info!("shutting down: no new clients; finishing in-flight requests");
        for accept in loops {
            let _ = accept.await;
        }
        shared.tracker.close();
        let grace = shared.live.borrow().config.server.shutdown_grace;
        if tokio::time::timeout(grace, shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                "shutdown grace period over; closing remaining clients"
            );
        }
        if let Some(workers) = workers {
            workers.stop().await;
        }
        self.upstream_shutdown.cancel();
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        info!("stopped");
    }
}

/// Binds a TCP listener on each of `addrs`.
pub async fn bind_tcp(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, ServerError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A source of client connections: TCP, unix or TLS.
trait Listener: Send + Sync + 'static {
    /// A connection as accepted.
    type Stream: LocalAddr + Handover + Send + 'static;
    /// What the client's session runs on.
    type Client: Duplex;
    /// `establish` is a handshake, which may take long.
    const HANDSHAKE: bool = false;
    /// A new client and its address (none for a unix socket).
    fn accept(&self)
        -> impl Future<Output = io::Result<(Self::Stream, Option<SocketAddr>)>> + Send;
    /// Makes an accepted connection ready for a session: nothing to do, or the TLS handshake.
    /// Run in the client's own task.
    fn establish(
        &self,
        stream: Self::Stream,
    ) -> impl Future<Output = io::Result<Self::Client>> + Send + 'static;
    /// The connection, ready for a session at once if no handshake is needed (so that the
    /// client's task can be its session alone); else given back for [`Listener::establish`].
    fn established(stream: Self::Stream) -> Result<Self::Client, Self::Stream> {
        Err(stream)
    }
    /// The one address every client of this listener connects to; `None` for a wildcard
    /// address, where each client's own must be asked for (a `getsockname` per accept).
    fn bound(&self) -> Option<SocketAddr> {
        None
    }
}

/// Moving an accepted connection to the runtime of the thread that will serve it: taken off
/// this runtime's reactor, then registered with that one's.
trait Handover: Sized {
    type Detached: Send + 'static;
    fn detach(self) -> io::Result<Self::Detached>;
    /// Must run on the runtime that takes the connection over.
    fn attach(detached: Self::Detached) -> io::Result<Self>;
}

impl Handover for TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> io::Result<Self> {
        TcpStream::from_std(detached)
    }
}

impl Handover for UnixStream {
    type Detached = std::os::unix::net::UnixStream;
    fn detach(self) -> io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> io::Result<Self> {
        UnixStream::from_std(detached)
    }
}

/// The address a client connected to, for CLIENT INFO's `laddr`.
trait LocalAddr {
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl LocalAddr for TcpStream {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }
}

impl LocalAddr for UnixStream {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Client = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, Option<SocketAddr>)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok((stream, Some(peer)))
    }

    fn establish(
        &self,
        stream: TcpStream,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send + 'static {
        std::future::ready(Ok(stream))
    }

    fn established(stream: TcpStream) -> Result<TcpStream, TcpStream> {
        Ok(stream)
    }

    fn bound(&self) -> Option<SocketAddr> {
        self.local_addr()
            .ok()
            .filter(|addr| !addr.ip().is_unspecified())
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Client = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, Option<SocketAddr>)> {
        let (stream, _) = UnixListener::accept(self).await?;
        Ok((stream, None))
    }

    fn establish(
        &self,
        stream: UnixStream,
    ) -> impl Future<Output = io::Result<UnixStream>> + Send + 'static {
        std::future::ready(Ok(stream))
    }

    fn established(stream: UnixStream) -> Result<UnixStream, UnixStream> {
        Ok(stream)
    }
}

/// `[server.tls] listen`: TCP, then a TLS handshake in the client's task.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    /// Ends handshakes under way when the server shuts down.
    shutdown: CancellationToken,
}

impl Listener for TlsListener {
    type Stream = TcpStream;
    type Client = TlsClient;
    const HANDSHAKE: bool = true;

    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, Option<SocketAddr>)>> + Send {
        Listener::accept(&self.tcp)
    }

    fn establish(
        &self,
        stream: TcpStream,
    ) -> impl Future<Output = io::Result<TlsClient>> + Send + 'static {
        tls::accept(self.acceptor.clone(), stream, self.shutdown.clone())
    }

    fn bound(&self) -> Option<SocketAddr> {
        Listener::bound(&self.tcp)
    }
}

async fn accept_loop<L: Listener>(listener: L, shared: Arc<Shared>) {
    let listener = Arc::new(listener);
    let shutdown = shared.shutdown.clone().cancelled_owned();
    tokio::pin!(shutdown);
    let bound = listener.bound();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                error!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let local = bound.or_else(|| stream.local_addr().ok());
        // The settings in effect: one read lock per accept, none per request.
        let live = shared.live.borrow().clone();
        let clients = &shared.metrics.clients;
        if clients.fetch_add(1, Ordering::AcqRel) >= live.config.server.max_clients {
            clients.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.rejected(Rejection::MaxClients);
            debug!(?peer, "max_clients reached; refusing");
            if L::HANDSHAKE
                && shared.tls_refusals.fetch_add(1, Ordering::AcqRel) >= MAX_TLS_REFUSALS
            {
                shared.tls_refusals.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            // Told in the client's protocol: over TLS after the handshake.
            let establish = listener.establish(stream);
            let shared_for_task = shared.clone();
            shared.tracker.spawn(async move {
                if let Ok(mut client) = establish.await {
                    let _ = client.halves().1.write_all(MAX_CLIENTS_REPLY).await;
                }
                if L::HANDSHAKE {
                    shared_for_task.tls_refusals.fetch_sub(1, Ordering::AcqRel);
                }
            });
            continue;
        }
        // The threads that serve clients take them in turn: the first (this one) at once, the
        // others through a hand-over of the socket to their runtime.
        let turn = shared.next_worker.fetch_add(1, Ordering::Relaxed) % (shared.workers.len() + 1);
        if turn == 0 {
            start_client(&listener, stream, peer, local, live, &shared);
            continue;
        }
        let detached = match stream.detach() {
            Ok(detached) => detached,
            Err(error) => {
                debug!(%error, "cannot hand a client over to its thread");
                clients.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
        };
        let (listener, shared_for_task) = (listener.clone(), shared.clone());
        let handover = shared.tracker.track_future(async move {
            match <L::Stream as Handover>::attach(detached) {
                Ok(stream) => start_client(&listener, stream, peer, local, live, &shared_for_task),
                Err(error) => {
                    debug!(%error, "cannot take a client over");
                    shared_for_task
                        .metrics
                        .clients
                        .fetch_sub(1, Ordering::AcqRel);
                }
            }
        });
        shared.workers[turn - 1].spawn(handover);
    }
}

/// Starts serving an accepted client on this thread's runtime: its state (and so its shared
/// upstream connections) are this thread's.
fn start_client<L: Listener>(
    listener: &Arc<L>,
    stream: L::Stream,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    live: Arc<Live>,
    shared: &Arc<Shared>,
) {
    let clients = &shared.metrics.clients;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let client = match ClientState::new(
        id,
        Peer { addr: peer, local },
        (live.upstreams.clone(), live.hubs.clone()),
        live.users.clone(),
        live.clients.clone(),
    ) {
        Ok(client) => client,
        Err(error) => {
            error!(%error, "cannot serve a new client");
            clients.fetch_sub(1, Ordering::AcqRel);
            return;
        }
    };
    // Debug level: an enabled span per connection costs more than the connection itself.
    let span = tracing::debug_span!("client", id, ?peer);
    debug!(parent: &span, "connected");
    let shared_for_task = shared.clone();
    let on_close = move || {
        shared_for_task
            .metrics
            .clients
            .fetch_sub(1, Ordering::AcqRel);
        debug!("disconnected");
    };
    let updates = shared.live.clone();
    match L::established(stream) {
        // No handshake: the task is the session alone. An async block around it would
        // hold a second copy of the session, and every idle client pays for its task.
        Ok(io) => {
            shared.metrics.accepted();
            spawn_client(
                &shared.tracker,
                Session::new(io, &live, updates, client).run(on_close),
                span,
            );
        }
        Err(stream) => {
            let establish = listener.establish(stream);
            let metrics = shared.metrics.clone();
            let task = async move {
                match establish.await {
                    Ok(io) => {
                        metrics.accepted();
                        Session::new(io, &live, updates, client).run(on_close).await;
                    }
                    Err(error) => {
                        metrics.rejected(Rejection::TlsHandshake);
                        debug!(%error, "TLS handshake failed");
                        on_close();
                    }
                }
            };
            spawn_client(&shared.tracker, task, span);
        }
    }
}

/// Spawns a client's task, in its span only when that is enabled: a disabled span still takes
/// 40 bytes in every client's task.
fn spawn_client(
    tracker: &TaskTracker,
    task: impl Future<Output = ()> + Send + 'static,
    span: tracing::Span,
) {
    if span.is_disabled() {
        tracker.spawn(task);
    } else {
        tracker.spawn(task.instrument(span));
    }
}

/// Binds a unix socket that has its permissions from the moment it appears at `path`, replacing
/// a stale socket file (one nobody answers on). A socket that answers, or a file that is not a
/// socket, is left alone and the bind fails.
///
/// bind(2) creates the file with the umask's permissions, so a chmod afterwards leaves a moment
/// in which anyone the umask lets in can connect; changing the umask around the bind would be
/// process-wide, racing every other thread. Instead the socket is bound in a private directory
/// beside `path` (mode 0700: nobody else can reach what is inside, and rename stays on one file
/// system), given its mode there, and only then put at `path`: with link(2), which fails rather
/// than replace a file that appeared meanwhile, or with rename(2) over the stale socket, which
/// replaces it in one step.
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |source| ServerError::Bind {
        addr: path.display().to_string(),
        source,
    };
    let stale = match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => false,
        Err(error) => return Err(fail(error)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(fail(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is there",
            )))
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(fail(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on it",
            )))
        }
        Ok(_) => true,
    };
    let private = PrivateDir::beside(path).map_err(fail)?;
    let bound = private.path.join("s");
    let listener = UnixListener::bind(&bound).map_err(fail)?;
    std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    if stale {
        std::fs::rename(&bound, path).map_err(fail)?;
    } else {
        std::fs::hard_link(&bound, path).map_err(fail)?;
    }
    // `private` goes now, with the socket's other name.
    Ok(listener)
}

/// A directory only this process's user can enter, removed with what is in it on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates one in the directory that holds `path`, under a short random name: the socket
    /// bound inside must fit in a unix socket address (108 bytes) as `path` does.
    fn beside(path: &Path) -> io::Result<PrivateDir> {
        use std::{
            hash::{BuildHasher, Hasher},
            os::unix::fs::{DirBuilderExt, PermissionsExt},
        };
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut attempts = 0;
        loop {
            // Random per process and per call (std's hasher keys), so another process's
            // leftover, or a name taken on purpose, only costs another try.
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let dir = parent.join(format!(".{:08x}", random as u32));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    let private = PrivateDir { path: dir };
                    // The umask may have taken the owner's own bits away.
                    std::fs::set_permissions(
                        &private.path,
                        std::fs::Permissions::from_mode(0o700),
                    )?;
                    return Ok(private);
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => {
                    attempts += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            warn!(%error, dir = %self.path.display(), "cannot remove a temporary directory");
        }
    }
}
