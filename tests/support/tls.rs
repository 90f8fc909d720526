//! TLS fixtures: certificates made fresh for each test with rcgen (a CA, a server certificate
//! for `localhost` and `127.0.0.1`, a client certificate, all signed by the CA), and a TLS client.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use redmux::config::{ServerTlsConfig, UpstreamTlsConfig};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore,
};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

/// PEM files in a temp dir of their own.
pub(crate) struct Certs {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    pub(crate) fn new() -> Certs {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, pem: String| super::write_file(dir.path(), name, &pem);
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "redmux test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: Vec<ExtendedKeyUsagePurpose>| {
            let mut params = CertificateParams::new(names).expect("leaf params");
            params
                .distinguished_name
                .push(DnType::CommonName, "redmux test");
            params.extended_key_usages = usage;
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        // The server's may serve as a client's too: a node of a TLS cluster presents it to
        // the others on the cluster bus and for replication.
        let (server_cert, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_cert, client_key) = leaf(
            vec!["client".into()],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        Certs {
            ca: write("ca.pem", ca_pem),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            _dir: dir,
        }
    }

    /// `[server.tls]` on a free port with these certificates; `require_client_cert`: with
    /// `ca_file`, so clients must present a certificate.
    pub(crate) fn server_tls(&self, require_client_cert: bool) -> ServerTlsConfig {
        ServerTlsConfig {
            listen: vec!["127.0.0.1:0".parse().expect("addr")],
            cert_file: Some(self.server_cert.clone()),
            key_file: Some(self.server_key.clone()),
            ca_file: require_client_cert.then(|| self.ca.clone()),
        }
    }

    /// `[upstream.tls]` trusting the CA; `client_cert`: presenting the client certificate.
    pub(crate) fn upstream_tls(&self, client_cert: bool) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            ca_file: Some(self.ca.clone()),
            cert_file: client_cert.then(|| self.client_cert.clone()),
            key_file: client_cert.then(|| self.client_key.clone()),
            ..UpstreamTlsConfig::default()
        }
    }

    /// A client trusting the CA; `client_cert`: presenting the client certificate.
    pub(crate) fn client(&self, client_cert: bool) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).expect("CA file") {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots);
        let config = if client_cert {
            builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&self.client_cert)
                        .expect("client certificate")
                        .collect::<Result<_, _>>()
                        .expect("client certificate PEM"),
                    PrivateKeyDer::from_pem_file(&self.client_key).expect("client key"),
                )
                .expect("client identity")
        } else {
            builder.with_no_client_auth()
        };
        TlsConnector::from(Arc::new(config))
    }
}

/// A TLS connection to `addr` as `localhost`: the handshake's outcome.
pub(crate) async fn connect(
    addr: SocketAddr,
    client: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("server name");
    client.connect(name, tcp).await
}
