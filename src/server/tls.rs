//! TLS for clients connecting to `[server.tls] listen`: the acceptor, the handshake, and the
//! client connection the session runs on.
//!
//! A TLS connection's reads and writes share one rustls state, so its two halves each lock it
//! for one poll: the halves of a client connection are polled by that client's task alone, so
//! the lock is never contended.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    task::{ready, Context, Poll, Waker},
    time::Duration,
};

use rustls::{server::WebPkiClientVerifier, ServerConfig};
use tokio::{
    io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{server, TlsAcceptor};
use tokio_util::sync::CancellationToken;

use crate::{
    config::ServerTlsConfig,
    io::{Duplex, ReadSide},
    tls::{ca_roots, identity, key_error, provider, Flushed, Problem, TlsError},
};

/// How long a client may take over its TLS handshake. It counts towards `max_clients` while it
/// handshakes, so one that never finishes must not hold its slot for long; 10 s leaves room for
/// a slow network.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The acceptor for `[server.tls]`: its certificate, and client certificates checked against
/// `ca_file` when that is set.
pub fn acceptor(config: &ServerTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let cert_path = config.cert_file.as_deref();
    let key_path = config.key_file.as_deref();
    let Some((certs, key)) = identity(
        ("server.tls.cert_file", cert_path),
        ("server.tls.key_file", key_path),
    )?
    else {
        return Err(TlsError::new(
            "server.tls.cert_file",
            Problem::Missing("[server.tls] needs a certificate (cert_file) and its key (key_file)"),
        ));
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("server.tls", Problem::Protocol(e)))?;
    let builder = match &config.ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = ca_roots("server.tls.ca_file", path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::new("server.tls.ca_file", Problem::Verifier(e)))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| key_error("server.tls.key_file", cert_path, key_path, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Completes a client's TLS handshake within [`HANDSHAKE_TIMEOUT`]; gives up at shutdown.
pub async fn accept(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    shutdown: CancellationToken,
) -> io::Result<TlsClient> {
    tokio::select! {
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match done {
            Ok(stream) => Ok(TlsClient {
                stream: Mutex::new(stream?),
            }),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        },
        () = shutdown.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "shutting down")),
    }
}

/// A client's TLS connection, after the handshake.
pub struct TlsClient {
    stream: Mutex<server::TlsStream<TcpStream>>,
}

/// One half of a TLS connection: it locks the shared TLS state for each poll.
pub struct Half<'a, S>(&'a Mutex<S>);

impl<S> Half<'_, S> {
    fn lock(&self) -> MutexGuard<'_, S> {
        // Nothing panics while holding it; a poisoned lock's state is as good as any.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Duplex for TlsClient {
    type Read<'a> = Half<'a, server::TlsStream<TcpStream>>;
    type Write<'a> = Flushed<Half<'a, server::TlsStream<TcpStream>>>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        (Half(&self.stream), Flushed::new(Half(&self.stream)))
    }
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let stream = self.stream.get_mut().unwrap_or_else(|e| e.into_inner());
        poll_decrypted(stream, cx)
    }
}

/// Readiness-first reads, as for plain sockets: `readable` waits until rustls holds decrypted
/// bytes (or the end), and the read takes them.
impl ReadSide for Half<'_, server::TlsStream<TcpStream>> {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(move |cx| poll_decrypted(&mut self.lock(), cx))
    }
}

/// Ready once rustls holds decrypted bytes, or the connection has ended.
fn poll_decrypted(
    stream: &mut server::TlsStream<TcpStream>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    match ready!(Pin::new(stream).poll_fill_buf(cx)) {
        Err(error) if error.kind() != io::ErrorKind::UnexpectedEof => Poll::Ready(Err(error)),
        _ => Poll::Ready(Ok(())),
    }
}

/// A client that closes without TLS's close_notify ends like a plain client that closes: the
/// replies it is owed are still written.
impl<S: AsyncRead + Unpin> AsyncRead for Half<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut *self.lock()).poll_read(cx, buf)) {
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            done => Poll::Ready(done),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// Sends close_notify as the connection closes, as Redis does, without waiting: a client that
/// reads to the end then sees a clean end rather than a truncated TLS stream.
impl Drop for TlsClient {
    fn drop(&mut self) {
        let stream = self.stream.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = Pin::new(stream).poll_shutdown(&mut Context::from_waker(noop_waker()));
    }
}

/// A waker that does nothing, for a poll whose outcome is taken as it comes.
fn noop_waker() -> &'static Waker {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(Noop)))
}
