//! The subscriber hubs of one set of upstream connections: redmux's own, and one per ACL user
//! whose clients subscribe with their own login; in front of a cluster, a shard hub per master
//! (and login) for shard channels; and CLIENT TRACKING's invalidation stream.
//!
//! They live beside [`Upstreams`], never inside it: upstream owns connections only, and a hub
//! is pub/sub's fan-out built on one of them. A reload that builds a new set of connections
//! builds new hubs with it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::{Counts, PubSub, Registry, WeakPubSub};
use crate::{
    command::Profile,
    tracking::Tracker,
    upstream::{Identity, Upstreams},
};

/// Cheap to clone: every clone is the same hubs.
#[derive(Debug, Clone)]
pub struct Hubs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstreams: Upstreams,
    /// The hub of clients logged in as redmux's own user.
    own: PubSub,
    /// What every hub of this set holds in Redis, and what their clients hold: for counts as
    /// Redis would give them with every client connected directly.
    registry: Arc<Registry>,
    /// Subscriber hubs of clients' own logins, alive while one of their subscribers is.
    users: Mutex<HashMap<Identity, WeakPubSub>>,
    /// Shard hubs, by login and master, alive while one of their subscribers is.
    shards: Mutex<HashMap<ShardHub, WeakPubSub>>,
    /// CLIENT TRACKING's stream and table, fan-out of invalidations as the hubs are of
    /// messages.
    tracker: Tracker,
}

impl Hubs {
    /// Starts the hub of redmux's own user; a user's hub starts at its first subscriber.
    pub fn new(upstreams: &Upstreams) -> Hubs {
        let registry = Arc::new(Registry::default());
        let own = start(upstreams, None, &registry);
        Hubs {
            inner: Arc::new(Inner {
                upstreams: upstreams.clone(),
                own,
                registry,
                users: Mutex::new(HashMap::new()),
                shards: Mutex::new(HashMap::new()),
                tracker: Tracker::new(upstreams, 0),
            }),
        }
    }

    /// The hub for clients logged in as `identity` (redmux's own user when `None`).
    pub fn hub(&self, identity: Option<&Identity>) -> PubSub {
        let Some(identity) = identity else {
            return self.inner.own.clone();
        };
        let mut hubs = self.inner.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hub) = hubs.get(identity).and_then(WeakPubSub::upgrade) {
            return hub;
        }
        hubs.retain(|_, hub| hub.alive());
        let hub = start(&self.inner.upstreams, Some(identity), &self.inner.registry);
        hubs.insert(identity.clone(), hub.downgrade());
        hub
    }

    /// The shard hub of clients logged in as `identity` for the shard channels of master
    /// `host:port`.
    pub fn shard(&self, identity: Option<&Identity>, host: &str, port: u16) -> PubSub {
        let key: ShardHub = (identity.cloned(), host.to_owned(), port);
        let mut hubs = self.inner.shards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hub) = hubs.get(&key).and_then(WeakPubSub::upgrade) {
            return hub;
        }
        hubs.retain(|_, hub| hub.alive());
        let upstreams = &self.inner.upstreams;
        let dial = upstreams.node_dial_as(identity, host, port);
        let hub = PubSub::start(
            Arc::new(move || vec![dial.clone()]),
            upstreams.timeouts(),
            upstreams.profile() == Profile::Redis,
            true,
            self.inner.registry.clone(),
        );
        hubs.insert(key, hub.downgrade());
        hub
    }

    /// CLIENT TRACKING on these upstreams.
    pub fn tracker(&self) -> &Tracker {
        &self.inner.tracker
    }

    /// The pub/sub counts of these hubs and their clients.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// What `/status` and `/metrics` show: redmux's own hub, and its shard hubs.
    pub fn counts(&self) -> Counts {
        let mut counts = self.inner.own.counts();
        let shards = self.inner.shards.lock().unwrap_or_else(|e| e.into_inner());
        for ((identity, ..), hub) in shards.iter() {
            if identity.is_none() && hub.alive() {
                let shard = hub.counts();
                counts.shard_channels += shard.shard_channels;
                counts.clients += shard.clients;
            }
        }
        counts
    }
}

/// A shard hub's login and master.
type ShardHub = (Option<Identity>, String, u16);

fn start(upstreams: &Upstreams, identity: Option<&Identity>, registry: &Arc<Registry>) -> PubSub {
    let candidates = upstreams.clone();
    let identity = identity.cloned();
    PubSub::start(
        Arc::new(move || candidates.subscriber_dials(identity.as_ref())),
        upstreams.timeouts(),
        upstreams.profile() == Profile::Redis,
        false,
        registry.clone(),
    )
}
