//! redmux: a local Redis proxy that multiplexes many client connections onto one pipelined
//! upstream connection.
//!
//! The modules are layers, and each imports only from layers below it (docs/ARCHITECTURE.md
//! has the map and one request's walk through the files), from the bottom up:
//!
//! - `resp` (pure protocol: the request decoder, the reply scanner, the one local-reply
//!   encoder) and `report` (how an error is shown with its causes);
//! - `command`: the command table and every command policy (what is forwarded, answered,
//!   pinned or refused; the gates for auth and subscribed state). Imports only `resp`;
//! - `config`: plain data (schema, defaults, validation, addresses). Imports nothing of redmux;
//! - `io` (socket traits, outgoing writes, the output budget), `hash` (a cheap hash for maps
//!   whose keys redmux picks), `tls` (PEM files), `metrics`,
//!   `auth`, `cluster` (slots, key positions, the slot map, splits: pure) and `cache` (the
//!   near cache's entries, placeholders and eviction: no I/O);
//! - `upstream`: connections only (actors, the pinned pool, dial and handshake with its TLS
//!   client side, the cluster router). It never reaches `client` or `server`;
//! - `pubsub`, `monitor` and `tracking`, built on upstream connections;
//! - `client`: one client's session, event loop, dispatch, replies, transaction,
//!   subscriptions and state;
//! - `server`: listeners, accept, the TLS server side, admission, reload, serving threads;
//! - `admin` (HTTP endpoints and the Prometheus exposition) and `probe`;
//! - [`Proxy`], which composes the server and the admin endpoint, and `main`.

pub mod admin;
pub mod auth;
pub mod cache;
mod client;
pub mod cluster;
mod command;
pub mod config;
mod hash;
mod io;
mod metrics;
mod monitor;
pub mod probe;
pub mod pubsub;
pub mod report;
pub mod resp;
pub mod server;
mod tls;
mod tracking;
mod upstream;

pub use config::Config;

/// Runs `work` on a thread of its own and gives what it returns, failing the test if that
/// takes more than 30 s: for the tests that bound a cost, so that a quadratic regression fails
/// instead of hanging (the bound is generous enough for a slow debug build).
#[cfg(test)]
pub(crate) fn within_a_watchdog<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    result
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{what} within 30 s"))
}

/// Loads the configuration as the binary does: [`Config::load`], then every TLS file it names
/// read and checked, as the server and the upstream will read them.
pub fn load_config(
    path: Option<&std::path::Path>,
    overrides: &config::Overrides,
) -> Result<Config, config::ConfigError> {
    Config::load_checked(path, overrides, check_tls)
}

/// Reads and checks every TLS file `config` names (`[server.tls]`, and `[upstream.tls]` or the
/// system's CAs for a `rediss://` upstream), as the server will when it starts: for
/// [`Config::load_checked`], so that `--check`, a start and a reload refuse a bad file alike.
fn check_tls(config: &Config) -> Result<(), (&'static str, String)> {
    if let Some(server_tls) = &config.server.tls {
        server::tls::acceptor(server_tls)
            .map_err(|error| (error.key, report::Chain(&error.problem).to_string()))?;
    }
    // `endpoint()`: the address, or a cluster's first seed (every seed is `rediss://` or none).
    if matches!(
        config.upstream.endpoint().address,
        config::Address::Tcp { tls: true, .. }
    ) {
        upstream::tls::connector(&config.upstream)
            .map_err(|error| (error.key, report::Chain(&error.problem).to_string()))?;
    }
    Ok(())
}

pub use server::{Server, ServerError};

/// redmux bound and ready to serve: the proxy's listeners and, if `[metrics] listen` is set,
/// the admin endpoint beside them. The binary and the tests start redmux through this.
pub struct Proxy {
    server: Server,
    admin: Option<tokio::net::TcpListener>,
}

impl Proxy {
    /// Binds every listener and starts the upstream connections (see [`Server::bind`]).
    pub async fn bind(config: Config) -> Result<Proxy, ServerError> {
        let admin = match config.metrics.listen {
            Some(addr) => server::bind_tcp(&[addr]).await?.pop(),
            None => None,
        };
        let server = Server::bind(config).await?;
        Ok(Proxy { server, admin })
    }

    /// The proxy's own listeners, reloads and addresses.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The admin endpoint's address, if it is configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves clients (and the admin endpoint) until `shutdown` is cancelled, then drains for
    /// at most `shutdown_grace`.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let addr = self.metrics_addr();
        let admin = match (self.admin, addr) {
            (Some(listener), Some(addr)) => {
                tracing::info!(%addr, "metrics endpoint listening");
                let endpoint = admin::Admin::new(
                    &self.server.local_addrs(),
                    addr,
                    self.server.metrics(),
                    self.server.reloader().subscribe(),
                );
                Some(tokio::spawn(admin::run(
                    listener,
                    endpoint,
                    shutdown.clone(),
                )))
            }
            _ => None,
        };
        self.server.run(shutdown).await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
    }
}
