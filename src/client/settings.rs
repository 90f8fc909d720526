//! The settings in effect for clients: what they get from the configuration, published on a
//! `watch` channel so that a reload (SIGHUP, see the server's `reload`) can replace them while
//! clients stay connected.
//!
//! A client takes the latest settings when it is accepted. A client already connected takes
//! the new limits, `[auth]` and `allow_monitor` too, as Redis's `CONFIG SET` applies to every
//! client: the settings it holds are superseded, which wakes it, so an idle client is not
//! missed and nothing is checked per request. It keeps the upstream connections it started
//! with, though: a changed `[upstream]` gets a new set of connections for the clients that come
//! next, and the old set closes once its last client has left (its actors end when their last
//! sender is dropped).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::registry::Clients;
use crate::{
    auth::Users,
    cache::{self, NearCache, Policy},
    config::{CacheConfig, Config, Eviction},
    metrics::Metrics,
    pubsub::Hubs,
    resp::Limits,
    upstream::Upstreams,
};

/// The settings in effect.
#[derive(Debug)]
pub struct Live {
    /// The configuration in effect, command-line overrides applied. Anything else that follows
    /// reloads (the admin endpoint, say) subscribes to the server's reloads and reads its section
    /// here.
    pub config: Arc<Config>,
    /// What sessions apply.
    pub session: Arc<SessionConfig>,
    /// Who may log in.
    pub users: Arc<Users>,
    /// Where new clients' commands go.
    pub upstreams: Upstreams,
    /// The subscriber hubs on `upstreams`: replaced with them, never without them, so that
    /// the PUBSUB counts of one set of connections stay in one registry.
    pub hubs: Hubs,
    /// Every client of the server: the same registry across reloads.
    pub clients: Arc<Clients>,
    /// Cancelled when these settings are replaced, and at shutdown (it is a child of the
    /// server's stop token): it wakes every session holding them.
    pub superseded: CancellationToken,
}

impl Live {
    pub fn new(
        config: Config,
        (upstreams, hubs): (Upstreams, Hubs),
        clients: Arc<Clients>,
        metrics: &Arc<Metrics>,
        stop: &CancellationToken,
    ) -> Live {
        let server = &config.server;
        let near_cache = hubs
            .tracker()
            .configure_cache(cache_limits(&config.cache).as_ref());
        let session = SessionConfig {
            limits: Limits {
                max_bulk_len: server.max_bulk_len,
                max_multibulk_len: server.max_multibulk_len,
            },
            max_pipeline: server.max_pipeline,
            client_query_limit: server.client_query_limit,
            client_output_limit: server.client_output_limit,
            idle_timeout: Some(server.client_idle_timeout).filter(|t| !t.is_zero()),
            request_timeout: config.upstream.request_timeout,
            allow_monitor: config.upstream.allow_monitor,
            metrics: metrics.per_request(),
            cache: near_cache,
        };
        hubs.tracker()
            .set_max_keys(config.server.tracking_table_max_keys);
        Live {
            session: Arc::new(session),
            users: Arc::new(Users::new(&config.auth)),
            config: Arc::new(config),
            upstreams,
            hubs,
            clients,
            superseded: stop.child_token(),
        }
    }
}

/// Settings every session shares; a reload replaces them for every session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub limits: Limits,
    pub max_pipeline: usize,
    pub client_query_limit: u64,
    pub client_output_limit: u64,
    pub idle_timeout: Option<Duration>,
    pub request_timeout: Duration,
    pub allow_monitor: bool,
    /// Where requests, replies and bytes are counted; `None` when the metrics endpoint is off,
    /// which then costs one branch per request.
    pub metrics: Option<Arc<Metrics>>,
    /// The near cache, when `cache.enabled`.
    pub cache: Option<NearCache>,
}

/// The near cache's limits from `[cache]`; `None` when it is off.
fn cache_limits(config: &CacheConfig) -> Option<cache::Limits> {
    config.enabled.then(|| cache::Limits {
        max_memory: usize::try_from(config.max_memory).unwrap_or(usize::MAX),
        max_ttl: config.max_ttl,
        prefixes: config
            .prefixes
            .iter()
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect(),
        policy: match config.eviction {
            Eviction::Lru => Policy::Lru,
            Eviction::Tinylfu => Policy::TinyLfu,
        },
    })
}

impl SessionConfig {
    pub(super) fn output_limit(&self) -> usize {
        usize::try_from(self.client_output_limit).unwrap_or(usize::MAX)
    }
}
