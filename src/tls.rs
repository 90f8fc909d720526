//! TLS material: the PEM files a configuration names, read into rustls types, with errors
//! that name the key and the file. Both sides build on it: the server's acceptor
//! (`server::tls`) and the upstream's connector (`upstream::tls`).
//!
//! The rustls configurations are built from PEM files when the configuration is loaded (so
//! `--check` reads and checks every file) and again when the server starts. The crypto
//! provider is ring, chosen per configuration rather than process-wide: rustls's default,
//! aws-lc-rs, needs cmake and a long C build.

use std::{
    io::{self, IoSlice},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    RootCertStore,
};
use tokio::io::AsyncWrite;

/// A TLS setting that cannot be used, and the configuration key it comes from.
#[derive(Debug, thiserror::Error)]
#[error("{key}")]
pub struct TlsError {
    pub key: &'static str,
    #[source]
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
    #[error("cannot read {path}")]
    Read { path: String, source: io::Error },
    #[error("{path} is not PEM")]
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
    #[error("{path}: not a usable CA certificate")]
    BadCa { path: String, source: rustls::Error },
    #[error("{path}: not a usable private key")]
    BadKey { path: String, source: rustls::Error },
    #[error("{key} does not match the certificate in {cert}")]
    KeyMismatch { key: String, cert: String },
    #[error(transparent)]
    Verifier(rustls::server::VerifierBuilderError),
    #[error(transparent)]
    Protocol(rustls::Error),
    #[error("{0:?} is not a TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    #[error("not set, and no CA certificates were found in the system store{0}")]
    NoSystemRoots(String),
}

impl TlsError {
    pub fn new(key: &'static str, problem: Problem) -> Self {
        TlsError { key, problem }
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === files ===

pub(crate) fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
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
pub(crate) fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

pub(crate) fn private_key(
    key: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
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
pub(crate) fn ca_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
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
pub(crate) fn system_roots() -> Result<RootCertStore, TlsError> {
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
pub(crate) type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The identity in `cert_file` and `key_file`, each given as (key name, path): both or
/// neither.
pub(crate) fn identity(
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
pub(crate) fn key_error(
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

/// A TLS writer whose write is done only once its records are on the socket. A TLS stream
/// takes bytes into records and may keep some of them when the socket is full, to be sent by a
/// later write or flush. Client sessions and upstream actors write only while they have bytes
/// to write, and never flush, so those records would wait forever.
///
/// A write that was taken but not yet sent answers `Pending` until it is, and must be polled
/// again with the same bytes first (more may follow them), as every writer in redmux does: it
/// drops what was written only when the write returns.
pub(crate) struct Flushed<W> {
    inner: W,
    /// Bytes of the current write that the TLS stream took and has not sent yet.
    taken: usize,
}

impl<W> Flushed<W> {
    pub(crate) fn new(inner: W) -> Self {
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
