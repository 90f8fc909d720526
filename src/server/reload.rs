//! Reload: a new configuration applied while clients stay connected. Listeners and the log
//! format cannot change without a restart; a changed `[upstream]` gets a new set of
//! connections for the clients that come next (see [`crate::client::Live`]).

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ServerError;
use crate::{
    client::{Clients, Live},
    config::Config,
    metrics::Metrics,
    pubsub::Hubs,
    upstream::Upstreams,
};

/// Keys a reload cannot apply: the listeners (TLS ones with their certificate) are bound once,
/// and the log format is fixed when logging starts (a span created under one format cannot be
/// printed by the other). They keep their current values until a restart.
const RESTART_KEYS: [&str; 7] = [
    "server.threads",
    "server.listen",
    "server.unix_socket",
    "server.unix_socket_mode",
    "server.tls",
    "log.format",
    "metrics.listen",
];

/// `[upstream]` keys that shape the connections themselves: a change needs a new set of them.
/// `request_timeout` and `allow_monitor` are applied by the sessions instead.
const CONNECTION_KEYS: [&str; 10] = [
    "upstream.address",
    "upstream.tls",
    "upstream.connections",
    "upstream.connect_timeout",
    "upstream.username",
    "upstream.password",
    "upstream.db",
    "upstream.databases",
    "upstream.max_pinned",
    "upstream.max_shared",
];

/// Publishes new settings. Cheap to clone; reloads are meant to run one at a time (the signal
/// handler runs them in turn).
#[derive(Debug, Clone)]
pub struct Reloader {
    tx: Arc<watch::Sender<Arc<Live>>>,
    /// Counts across reloads: every set of settings records into it.
    metrics: Arc<Metrics>,
    /// The server's clients, across reloads.
    clients: Arc<Clients>,
    /// The server's stop token: the parent of every `superseded`.
    stop: CancellationToken,
    /// Stops embedded stores at the very end.
    upstream_shutdown: CancellationToken,
}

impl Reloader {
    /// The first settings, from the configuration the server starts with.
    pub(crate) fn new(
        config: Config,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        upstream_shutdown: CancellationToken,
    ) -> Reloader {
        let clients = Arc::new(Clients::default());
        let hubs = Hubs::new(&upstreams);
        let live = Live::new(config, (upstreams, hubs), clients.clone(), &metrics, &stop);
        let (tx, _) = watch::channel(Arc::new(live));
        Reloader {
            tx: Arc::new(tx),
            metrics,
            clients,
            stop,
            upstream_shutdown,
        }
    }

    /// The settings in effect, and every later change: `changed().await` wakes on each reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Live>> {
        self.tx.subscribe()
    }

    /// Applies `config` (loaded and validated, overrides applied): starts new upstream
    /// connections if `[upstream]` changed, publishes the new settings and wakes the sessions.
    /// Logs what changed, by key name only. Returns the keys that took effect. If it fails (an
    /// embedded store cannot start), nothing changes.
    pub async fn reload(&self, mut config: Config) -> Result<Vec<&'static str>, ServerError> {
        let current = self.tx.borrow().clone();
        let old = &current.config;
        let (restart, applied): (Vec<&'static str>, Vec<&'static str>) = old
            .changed_keys(&config)
            .into_iter()
            .partition(|key| RESTART_KEYS.contains(key));
        if !restart.is_empty() {
            warn!(
                keys = %restart.join(", "),
                "configuration changes that need a restart to take effect; keeping the current values"
            );
            config.server.listen.clone_from(&old.server.listen);
            config
                .server
                .unix_socket
                .clone_from(&old.server.unix_socket);
            config.server.unix_socket_mode = old.server.unix_socket_mode;
            config.server.tls.clone_from(&old.server.tls);
            config.log.format = old.log.format;
            config.metrics.listen = old.metrics.listen;
        }
        if applied.is_empty() {
            info!("configuration reloaded: nothing else changed");
            return Ok(Vec::new());
        }
        let connections = if applied.iter().any(|key| CONNECTION_KEYS.contains(key)) {
            let upstreams = current
                .upstreams
                .rebuild(&config.upstream, &self.upstream_shutdown)
                .await
                .map_err(ServerError::Upstream)?;
            info!(
                upstream = %config.upstream.endpoint().address,
                "new upstream connections for new clients; connected clients keep theirs until \
                 they leave"
            );
            let hubs = Hubs::new(&upstreams);
            (upstreams, hubs)
        } else {
            (current.upstreams.clone(), current.hubs.clone())
        };
        info!(changed = %applied.join(", "), "configuration reloaded");
        let live = Live::new(
            config,
            connections,
            self.clients.clone(),
            &self.metrics,
            &self.stop,
        );
        self.tx.send_replace(Arc::new(live));
        current.superseded.cancel();
        Ok(applied)
    }
}
