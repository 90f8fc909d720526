//! TLS both ways: clients connecting to `[server.tls] listen`, and redmux connecting to a
//! `rediss://` upstream.
//!
//! The rustls configurations are built from PEM files when the configuration is loaded (so
//! `--check` reads and checks every file) and again when the server starts. The crypto
//! provider is ring, chosen per configuration rather than process-wide: rustls's default,
//! aws-lc-rs, needs cmake and a long C build.
//!
//! A TLS connection's reads and writes share one rustls state, so its two halves each lock it
//! for one poll: the halves of a client connection are polled by that client's task alone, and
//! an upstream connection's by its actor, so the lock is never contended.

use std::{
    fmt,
    io::{self, IoSlice},
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    task::{ready, Context, Poll, Waker},
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::{
    io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, ServerTlsConfig, UpstreamConfig, UpstreamTlsConfig},
    io::{Duplex, ReadSide},
};

/// How long a client may take over its TLS handshake. It counts towards `max_clients` while it
/// handshakes, so one that never finishes must not hold its slot for long; 10 s leaves room for
/// a slow network.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS setting that cannot be used, and the configuration key it comes from.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TlsError {
    pub key: &'static str,
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("not set: {0}")]
    Missing(&'static str),
    #[error("not set: {cert} needs its private key")]
    NoKey { cert: &'static str },
    #[error("set without the certificate it belongs to ({cert})")]
    NoCert { cert: &'static str },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path} is not PEM: {source}")]
    Pem {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what} (expected PEM \"-----BEGIN {label}-----\")")]
    Empty {
        path: String,
        what: &'static str,
        label: &'static str,
    },
    #[error("{path}: not a usable CA certificate: {source}")]
    BadCa { path: String, source: rustls::Error },
    #[error("{path}: {source}")]
    BadKey { path: String, source: rustls::Error },
    #[error("{key} does not match the certificate in {cert}")]
    KeyMismatch { key: String, cert: String },
    #[error("{0}")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Protocol(rustls::Error),
    #[error("{0:?} is not a TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    #[error("not set, and no CA certificates were found in the system store{0}")]
    NoSystemRoots(String),
}

impl TlsError {
    fn new(key: &'static str, problem: Problem) -> Self {
        TlsError { key, problem }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === files ===

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        TlsError::new(
            key,
            Problem::Read {
                path: path.display().to_string(),
                source,
            },
        )
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| {
            TlsError::new(
                key,
                Problem::Pem {
                    path: path.display().to_string(),
                    source,
                },
            )
        })?;
    if certs.is_empty() {
        return Err(TlsError::new(
            key,
            Problem::Empty {
                path: path.display().to_string(),
                what: "certificate",
                label: "CERTIFICATE",
            },
        ));
    }
    Ok(certs)
}

fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| {
        let path = path.display().to_string();
        TlsError::new(
            key,
            match source {
                rustls::pki_types::pem::Error::NoItemsFound => Problem::Empty {
                    path,
                    what: "private key",
                    label: "PRIVATE KEY",
                },
                source => Problem::Pem { path, source },
            },
        )
    })
}

/// The CA certificates in a PEM file, as trust anchors.
fn ca_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots.add(cert).map_err(|source| {
            TlsError::new(
                key,
                Problem::BadCa {
                    path: path.display().to_string(),
                    source,
                },
            )
        })?;
    }
    Ok(roots)
}

/// The system's CA certificates (as OpenSSL finds them: `SSL_CERT_FILE`, `SSL_CERT_DIR`, then
/// the distribution's bundle), which `redis-cli --tls` trusts without `--cacert`.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join("; "))
        };
        return Err(TlsError::new(
            "upstream.tls.ca_file",
            Problem::NoSystemRoots(why),
        ));
    }
    Ok(roots)
}

/// A certificate chain and its private key.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The identity in `cert_file` and `key_file`, each given as (key name, path): both or
/// neither.
fn identity(
    cert: (&'static str, Option<&Path>),
    key: (&'static str, Option<&Path>),
) -> Result<Option<Identity>, TlsError> {
    match (cert, key) {
        ((_, None), (_, None)) => Ok(None),
        ((cert_key, Some(cert)), (key_key, Some(key))) => Ok(Some((
            certificates(cert_key, cert)?,
            private_key(key_key, key)?,
        ))),
        ((cert, Some(_)), (key, None)) => Err(TlsError::new(key, Problem::NoKey { cert })),
        ((cert, None), (key, Some(_))) => Err(TlsError::new(key, Problem::NoCert { cert })),
    }
}

/// Blames a rejected certificate and key on `key_file`, naming both files when they do not
/// match.
fn key_error(
    key: &'static str,
    cert: Option<&Path>,
    path: Option<&Path>,
    error: rustls::Error,
) -> TlsError {
    let show = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    TlsError::new(
        key,
        match error {
            rustls::Error::InconsistentKeys(_) => Problem::KeyMismatch {
                key: show(path),
                cert: show(cert),
            },
            source => Problem::BadKey {
                path: show(path),
                source,
            },
        },
    )
}

// === clients connecting to redmux ===

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

/// A TLS writer whose write is done only once its records are on the socket. A TLS stream
/// takes bytes into records and may keep some of them when the socket is full, to be sent by a
/// later write or flush. Client sessions and upstream actors write only while they have bytes
/// to write, and never flush, so those records would wait forever.
///
/// A write that was taken but not yet sent answers `Pending` until it is, and must be polled
/// again with the same bytes first (more may follow them), as every writer in redmux does: it
/// drops what was written only when the write returns.
pub struct Flushed<W> {
    inner: W,
    /// Bytes of the current write that the TLS stream took and has not sent yet.
    taken: usize,
}

impl<W> Flushed<W> {
    pub fn new(inner: W) -> Self {
        Flushed { inner, taken: 0 }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Flushed<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.taken == 0 {
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            this.taken = n;
        }
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut this.taken)))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === redmux connecting to the upstream ===

/// How to open TLS to a `rediss://` upstream: the rustls configuration and the name its
/// certificate must carry. Made once at start (and at a reload that changes `[upstream]`);
/// cheap to clone. Two connectors are equal when one is a clone of the other.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    server_name: ServerName<'static>,
    insecure: bool,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl PartialEq for Connector {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.tls.config(), other.tls.config())
    }
}

impl Eq for Connector {}

/// The TLS setup for `config`'s `rediss://` address (`[upstream.tls]`, or the system's CAs),
/// read from its files.
pub fn connector(config: &UpstreamConfig) -> Result<Connector, TlsError> {
    let host = match &config.address.address {
        crate::config::Address::Tcp { host, .. } => host.as_str(),
        _ => "",
    };
    Connector::new(config.tls.as_ref(), host)
}

/// Reads and checks every TLS file `config` names (`[server.tls]`, and `[upstream.tls]` or the
/// system's CAs for a `rediss://` upstream), as the server will when it starts: for
/// [`Config::load_checked`], so that `--check`, a start and a reload refuse a bad file alike.
pub fn check(config: &Config) -> Result<(), (&'static str, String)> {
    if let Some(server_tls) = &config.server.tls {
        acceptor(server_tls).map_err(|error| (error.key, error.problem.to_string()))?;
    }
    if matches!(
        config.upstream.address.address,
        crate::config::Address::Tcp { tls: true, .. }
    ) {
        connector(&config.upstream).map_err(|error| (error.key, error.problem.to_string()))?;
    }
    Ok(())
}

impl Connector {
    /// From `[upstream.tls]` (absent: the system's CAs, no client certificate) for an upstream
    /// on `host`.
    pub fn new(config: Option<&UpstreamTlsConfig>, host: &str) -> Result<Connector, TlsError> {
        let default = UpstreamTlsConfig::default();
        let config = config.unwrap_or(&default);
        let name = config.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|_| {
            let key = if config.server_name.is_some() {
                "upstream.tls.server_name"
            } else {
                "upstream.address"
            };
            TlsError::new(key, Problem::ServerName(name.to_owned()))
        })?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("upstream.tls", Problem::Protocol(e)))?;
        let builder = if config.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                    provider().signature_verification_algorithms,
                )))
        } else {
            let roots = match &config.ca_file {
                Some(path) => ca_roots("upstream.tls.ca_file", path)?,
                None => system_roots()?,
            };
            builder.with_root_certificates(roots)
        };
        let cert_path = config.cert_file.as_deref();
        let key_path = config.key_file.as_deref();
        let client = match identity(
            ("upstream.tls.cert_file", cert_path),
            ("upstream.tls.key_file", key_path),
        )? {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| key_error("upstream.tls.key_file", cert_path, key_path, e))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Connector {
            tls: TlsConnector::from(Arc::new(client)),
            server_name,
            insecure: config.insecure_skip_verify,
        })
    }

    /// The upstream's certificate is not checked (`insecure_skip_verify`).
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// The TLS handshake on a new connection to the upstream.
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<client::TlsStream<TcpStream>> {
        self.tls.connect(self.server_name.clone(), tcp).await
    }
}

/// `insecure_skip_verify`: any certificate is accepted, for any name. The handshake's
/// signatures are still checked, so the connection is encrypted, but to whoever answers.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
