//! TLS for a `rediss://` upstream: the connector and its handshake. An upstream connection's
//! halves are polled by its actor alone.

use std::{fmt, io, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::{client, TlsConnector};

use crate::{
    config::{UpstreamConfig, UpstreamTlsConfig},
    tls::{ca_roots, identity, key_error, provider, system_roots, Problem, TlsError},
};

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
pub(crate) fn connector(config: &UpstreamConfig) -> Result<Connector, TlsError> {
    // The address, or a cluster's first seed.
    let host = match config.endpoint().address {
        crate::config::Address::Tcp { host, .. } => host,
        _ => String::new(),
    };
    Connector::new(config.tls.as_ref(), &host)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A `rediss://` cluster has no `address`: the name checked is its first seed's host.
    #[test]
    fn a_tls_cluster_is_checked_against_its_first_seed() {
        let mut config = Config::default().upstream;
        config.cluster = vec!["rediss://node1.example:7000".parse().unwrap()];
        config.tls = Some(UpstreamTlsConfig {
            insecure_skip_verify: true,
            ..UpstreamTlsConfig::default()
        });
        let connector = connector(&config).unwrap();
        assert_eq!(
            connector.server_name,
            ServerName::try_from("node1.example").unwrap()
        );
    }
}
