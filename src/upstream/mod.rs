//! The upstream side: actors that each own one connection to Redis and pipeline every client's
//! requests onto it.
//!
//! Clients talk to an actor only through [`Batch`] messages on a bounded channel; each carries
//! a `oneshot` sender that the actor completes with the replies, or with an [`UpstreamError`].

mod actor;
pub(crate) mod cluster;
mod connect;
mod embedded;
mod pool;
pub(crate) mod tls;

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::AsyncWriteExt,
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub(crate) use crate::config::{Address, Credentials, Endpoint, Identity};
pub(crate) use actor::ConnectionId;
pub(crate) use connect::{connect, ConnectError, Dial, Reader, Setup, Writer};
pub(crate) use pool::Lease;

use crate::{
    command::Profile,
    config::UpstreamConfig,
    hash::Fast,
    io::Budget,
    metrics::Metrics,
    resp::{encode, ReplyScanner},
};

thread_local! {
    /// Which of the threads that serve clients this is: 0 for the first (the one the server
    /// runs on), set by the others when they start.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as serving thread `worker`: the shared connections its clients use are
/// its own, actors on its runtime, so a client's requests and their replies never cross
/// threads on their way to Redis.
pub(crate) fn enter_worker(worker: usize) {
    WORKER.set(worker);
}

/// Messages a shared actor's channel holds at most. Each may carry a whole pipeline of one client.
const CHANNEL_CAPACITY: usize = 1024;
/// One-request connections (SCRIPT KILL, FUNCTION KILL, FUNCTION STATS, CLIENT UNBLOCK) open
/// at once. Each lives one round trip; a request past them waits up to `connect_timeout`.
pub(crate) const CONTROL_SLOTS: usize = 4;

/// A batch: one or more requests of one client, to be written upstream back to back, and where
/// their replies go.
#[derive(Debug)]
pub struct Batch {
    /// Complete, canonical RESP requests, exactly as they will be written.
    pub frames: Bytes,
    /// How many requests `frames` holds: the number of replies to collect.
    pub count: u32,
    /// When the client handed the requests over. While the upstream is down they wait for a
    /// connection for at most `connect_timeout` from this moment.
    pub queued_at: Instant,
    /// How long the replies may take once written; `None` for a blocking command that may wait
    /// forever, as Redis lets it.
    pub timeout: Option<Duration>,
    /// Completed with all `count` replies back to back, or with the error that ended them.
    pub reply: ReplyTo,
    /// The client's output budget, charged with the replies as they are handed over.
    pub budget: Option<Arc<Budget>>,
}

/// Where the replies to a [`Batch`] go.
#[derive(Debug)]
pub enum ReplyTo {
    /// The one who sent the batch: a client's session, or redmux's own call.
    Sender(oneshot::Sender<Reply>),
    /// A cluster router that sent the batch to one node: the replies go back to it, or
    /// straight to the client whose batch it passed on whole (see [`cluster::Routed`]).
    Router(Box<cluster::Routed>),
    /// A client's one request that a cluster router's direct path sent to a node: the reply
    /// goes to the client, or to the router when it is an error, with the request, which the
    /// node's actor keeps meanwhile (see [`ReplyTo::deliver_from`]).
    Direct(oneshot::Sender<Reply>),
}

impl ReplyTo {
    /// Nobody waits for these replies any more: the requests need not be written.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            ReplyTo::Sender(sender) => sender.is_closed(),
            ReplyTo::Router(routed) => routed.is_closed(),
            ReplyTo::Direct(sender) => sender.is_closed(),
        }
    }

    /// Hands `reply` over. Replies for a client are first charged to its output `budget`;
    /// past the limit they are dropped and the client gets [`UpstreamError::OutputLimit`].
    /// [`ReplyTo::Direct`] included: without its router ([`ReplyTo::deliver_from`]), its client
    /// gets the reply as it is.
    pub(crate) fn deliver(self, reply: Reply, budget: Option<&Budget>) {
        match self {
            ReplyTo::Sender(sender) => {
                let reply = match reply {
                    Ok(replies) if budget.is_some_and(|b| !b.charge(replies.bytes.len())) => {
                        Err(UpstreamError::OutputLimit)
                    }
                    other => other,
                };
                // A client that has gone no longer wants its replies: they are dropped.
                let _ = sender.send(reply);
            }
            ReplyTo::Router(routed) => routed.deliver(reply),
            ReplyTo::Direct(sender) => ReplyTo::Sender(sender).deliver(reply, budget),
        }
    }

    /// [`ReplyTo::deliver`] by an actor, with what it keeps of the batch (the client's
    /// output `budget`, when the replies are due) and, for a cluster router's node, the way
    /// back to the router with the request as written: an error of [`ReplyTo::Direct`] goes
    /// there.
    pub(crate) fn deliver_from(
        self,
        reply: Reply,
        kept: (Option<Arc<Budget>>, Option<Instant>),
        back: Option<(&cluster::Returns, Bytes)>,
    ) {
        match (self, back) {
            (ReplyTo::Direct(sender), Some((returns, frames))) => {
                cluster::deliver_direct(sender, reply, kept, frames, returns);
            }
            (reply_to, _) => reply_to.deliver(reply, kept.0.as_deref()),
        }
    }

    /// The batch's requests, as they were written: a router's message, which goes without a
    /// copy of them, keeps them to send them again on `-MOVED` (one whose requests follow an
    /// `ASKING` keeps its own). Taking them here saves a copy's allocation and atomics per
    /// message.
    pub(crate) fn written(&mut self, frames: Bytes) {
        if let ReplyTo::Router(routed) = self {
            routed.written(frames);
        }
    }

    /// Whether [`ReplyTo::written`] keeps the requests: only then is a copy worth making
    /// of those the actor writes by reference.
    pub(crate) fn keeps_written(&self) -> bool {
        matches!(self, ReplyTo::Router(routed) if routed.keeps_written())
    }
}

impl From<oneshot::Sender<Reply>> for ReplyTo {
    fn from(sender: oneshot::Sender<Reply>) -> Self {
        ReplyTo::Sender(sender)
    }
}

/// The replies to one [`Batch`].
pub(crate) type Reply = Result<Replies, UpstreamError>;

/// The replies to a batch of requests, back to back, and which of them are errors: the actor
/// sees where each reply starts as it cuts them out, so the session need not scan them again to
/// count errors per command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replies {
    pub bytes: Bytes,
    /// Bit `i` is set when reply `i` is an error (`-`, or RESP3's `!`). Replies past the 64th
    /// are not marked; a session's batches hold at most 64.
    pub errors: u64,
}

impl From<Bytes> for Replies {
    /// Replies with no error among them (a confirmation redmux builds itself).
    fn from(bytes: Bytes) -> Self {
        Replies { bytes, errors: 0 }
    }
}

/// Why requests got no reply from Redis. None of them is retried: a request that was written
/// may have run, and running it twice is worse than failing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The connection broke with the request written (or being written) and not answered.
    #[error("redmux: upstream connection lost")]
    ConnectionLost,
    /// No connection could be made within `connect_timeout`.
    #[error("redmux: upstream unavailable")]
    Unavailable,
    /// A request waited `request_timeout` for its reply; the connection was reset.
    #[error("redmux: upstream request timed out")]
    Timeout,
    /// Every pinned connection (`max_pinned`) stayed busy for `connect_timeout`.
    #[error("redmux: no pinned upstream connection free (max_pinned reached)")]
    NoPinned,
    /// A new (db, protocol) would need more shared connections than `max_shared`.
    #[error("redmux: too many shared upstream connections (max_shared reached)")]
    NoShared,
    /// The client's unread replies passed `client_output_limit`; these were dropped and the
    /// client is closed.
    #[error("redmux: client output limit reached")]
    OutputLimit,
}

impl UpstreamError {
    /// The error reply, once for each of `count` requests so the client's replies stay aligned.
    pub fn replies(self, count: u32) -> Bytes {
        encode::repeat(&encode::error(&self.to_string()), count as usize)
    }
}

/// A cluster node an actor connects to, and for a router's actor the way back to its
/// router (see [`cluster::Returns`]).
struct Node {
    host: String,
    port: u16,
    returns: Option<cluster::Returns>,
}

/// Timeouts an actor applies.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

/// The connection state Redis must see for a client's commands: which shared connection a
/// client uses is chosen by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub db: u32,
    pub resp3: bool,
    /// The user the commands run as: `None` for redmux's own (`upstream.username` and
    /// `password`), else a client's own login, passed through to Redis.
    pub identity: Option<Identity>,
}

/// Where a client sends its requests for a shared connection: the channel of its actor (of its
/// router, in front of a cluster), and the router's direct path. One pointer: every idle
/// client keeps one (see the session's size test).
#[derive(Debug, Clone)]
pub struct Shared(Arc<SharedPath>);

#[derive(Debug)]
struct SharedPath {
    sender: mpsc::Sender<Batch>,
    direct: Option<Arc<cluster::Direct>>,
}

impl Shared {
    fn new(sender: mpsc::Sender<Batch>, direct: Option<Arc<cluster::Direct>>) -> Shared {
        Shared(Arc::new(SharedPath { sender, direct }))
    }

    pub fn sender(&self) -> &mpsc::Sender<Batch> {
        &self.0.sender
    }

    /// Sends a batch of one request straight to its cluster node when the router allows it
    /// (see the router's `direct` module); gives it back otherwise. Only for a client with
    /// nothing outstanding.
    pub fn direct(&self, batch: Batch) -> Result<(), Batch> {
        match &self.0.direct {
            Some(direct) => direct.send(batch),
            None => Err(batch),
        }
    }
}

/// The shared connections of one [`Target`].
#[derive(Debug)]
enum Group {
    /// redmux's own identity: `connections` actors, kept for as long as the upstream set lives.
    Kept(Vec<Shared>),
    /// A client's own login: one actor, alive while a client uses it. When the last one
    /// leaves, the actor ends and the credentials go with it.
    Held(Option<mpsc::WeakSender<Batch>>),
}

impl Group {
    /// The sender client `client` uses, if the group is alive.
    fn sender(&self, client: u64) -> Option<Shared> {
        match self {
            Group::Kept(senders) => {
                let i = usize::try_from(client).unwrap_or_default() % senders.len().max(1);
                senders.get(i).cloned()
            }
            Group::Held(weak) => Some(Shared::new(weak.as_ref()?.upgrade()?, None)),
        }
    }

    fn alive(&self) -> bool {
        match self {
            Group::Kept(_) => true,
            Group::Held(weak) => weak.as_ref().is_some_and(|weak| weak.strong_count() > 0),
        }
    }
}

/// Every upstream connection: shared actors per [`Target`], created on first use, and the pool
/// of pinned connections. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Where the actors connect: for the embedded upstream, its store's address.
    endpoint: Dial,
    /// The embedded store, kept running while this set of connections may use it.
    store: Option<Arc<embedded::Store>>,
    timeouts: Timeouts,
    profile: Profile,
    /// Actors per shared target (`connections` of them).
    connections: usize,
    max_shared: usize,
    databases: u32,
    /// By serving thread and target: each thread that serves clients has shared connections
    /// of its own (see [`enter_worker`]).
    /// At most `max_shared` targets a worker: [`Fast`], not SipHash.
    shared: Mutex<HashMap<(usize, Target), Group, Fast>>,
    /// Ids for shared actors, for logs and `/status`.
    next_shared_id: std::sync::atomic::AtomicUsize,
    pool: pool::Pool,
    /// Bounds the one-request connections of [`Upstreams::control`], apart from the pinned
    /// pool.
    control: tokio::sync::Semaphore,
    /// The connection AUTH is checked on, when redmux passes AUTH through to Redis: opened at
    /// the first AUTH, and never carrying anything else.
    checker: std::sync::OnceLock<mpsc::Sender<Batch>>,
    metrics: Arc<Metrics>,
    /// How many shared connections of the default target are connected, published by their
    /// actors: `/health` is up when all `connections` of them are.
    health: watch::Sender<usize>,
    /// Every actor's own figures, for `/status` and `/metrics`; an entry whose actor has ended
    /// (the only reference left is this one) is dropped on the next registration or read.
    actors: Mutex<Vec<Arc<actor::Stats>>>,
    /// `upstream.cluster`: the slot map, when the upstream is a Redis Cluster. Shared
    /// connections are then routers, each with an actor per master (see [`cluster`]).
    cluster: Option<Arc<cluster::Cluster>>,
}

/// The upstream side as it is right now, for `/status` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    /// What `/health` reports: the default target's shared connections are all up (or the
    /// upstream is the embedded store, which is in-process).
    pub healthy: bool,
    #[serde(rename = "upstreams")]
    pub actors: Vec<ActorSnapshot>,
    pub pinned: PinnedSnapshot,
    /// The slot map, when the upstream is a Redis Cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<cluster::ClusterSnapshot>,
}

/// One upstream connection (actor).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActorSnapshot {
    pub id: usize,
    /// `shared` or `pinned`.
    pub role: &'static str,
    /// In front of a cluster, the node it connects to (`host:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub db: u32,
    /// 2 or 3.
    pub resp: u8,
    pub connected: bool,
    /// Requests written and not answered yet.
    pub in_flight: u64,
    /// Requests waiting for the connection to come up.
    pub queued: u64,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PinnedSnapshot {
    pub in_use: usize,
    pub max: usize,
}

impl Upstreams {
    /// Starts the embedded store if configured. Actors start on first use; they stop once
    /// every sender is gone and their in-flight requests are answered, which is how a set of
    /// connections replaced by a reload drains. The embedded store stops with `shutdown`.
    pub async fn start(
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> io::Result<Self> {
        Self::build(config, None, metrics, shutdown).await
    }

    /// A new set of connections for `config` (reloaded), for the clients that come next; this
    /// one stays with the clients using it. If both are embedded they share the store, which
    /// holds the data.
    pub async fn rebuild(
        &self,
        config: &UpstreamConfig,
        shutdown: &CancellationToken,
    ) -> io::Result<Self> {
        Self::build(
            config,
            self.inner.store.clone(),
            self.inner.metrics.clone(),
            shutdown,
        )
        .await
    }

    async fn build(
        config: &UpstreamConfig,
        store: Option<Arc<embedded::Store>>,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> io::Result<Self> {
        let mut endpoint = Dial {
            endpoint: config.endpoint(),
            tls: None,
        };
        let (profile, store) = if endpoint.address == Address::Embedded {
            let store = match store {
                Some(store) => store,
                None => Arc::new(embedded::start(shutdown).await?),
            };
            endpoint.endpoint.address = Address::Tcp {
                host: store.addr.ip().to_string(),
                port: store.addr.port(),
                tls: false,
            };
            (Profile::Embedded, Some(store))
        } else {
            (Profile::Redis, None)
        };
        if let Address::Tcp { tls: true, .. } = endpoint.address {
            let connector = tls::connector(config).map_err(io::Error::other)?;
            if connector.insecure() {
                warn!(
                    "upstream.tls.insecure_skip_verify = true: the upstream's certificate is not \
                     checked, so anyone on the path can read and change the traffic"
                );
            }
            endpoint.tls = Some(connector);
        }
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            request: config.request_timeout,
        };
        let cluster = match config.cluster.as_slice() {
            [] => None,
            seeds => {
                let seeds = seeds
                    .iter()
                    .filter_map(|seed| match &seed.address {
                        Address::Tcp { host, port, .. } => Some((host.clone(), *port)),
                        _ => None,
                    })
                    .collect();
                let interval = config.cluster_refresh_interval;
                Some(cluster::Cluster::start(seeds, endpoint.clone(), timeouts, interval).await)
            }
        };
        let upstreams = Upstreams {
            inner: Arc::new(Inner {
                pool: pool::Pool::new(config.max_pinned),
                control: tokio::sync::Semaphore::new(CONTROL_SLOTS),
                endpoint,
                store,
                timeouts,
                profile,
                connections: config.connections,
                max_shared: config.max_shared,
                databases: config.databases,
                shared: Mutex::new(HashMap::default()),
                next_shared_id: std::sync::atomic::AtomicUsize::new(0),
                checker: std::sync::OnceLock::new(),
                metrics,
                health: watch::Sender::new(0),
                actors: Mutex::new(Vec::new()),
                cluster,
            }),
        };
        // Connect the default target now, so an unreachable upstream shows in the log at start.
        upstreams
            .shared(&upstreams.default_target(), 0)
            .map_err(io::Error::other)?;
        Ok(upstreams)
    }

    /// What a new client starts with: the configured db, RESP2.
    pub fn default_target(&self) -> Target {
        Target {
            db: self.inner.endpoint.db,
            resp3: false,
            identity: None,
        }
    }

    /// Who redmux's own connections log in as: `upstream.username` (or `default`), and
    /// `upstream.password` if there is one.
    pub fn own_user(&self) -> &str {
        self.inner.endpoint.username.as_deref().unwrap_or("default")
    }

    /// The identity to use for a client that logged in to Redis as `credentials`: `None` if
    /// that is redmux's own (the same user, with its password, or any password where redmux
    /// itself needs none), so that such clients share redmux's connections.
    pub fn identity(&self, credentials: Credentials) -> Option<Identity> {
        let own = &self.inner.endpoint;
        let same_user = *credentials.user == *self.own_user();
        let same_password = own
            .password
            .as_ref()
            .is_none_or(|password| *password == credentials.password);
        (!(same_user && same_password)).then(|| Identity::new(credentials))
    }

    /// `endpoint` logging in as `identity` (redmux's own when `None`).
    fn endpoint_for(&self, identity: Option<&Identity>) -> std::borrow::Cow<'_, Dial> {
        match identity {
            None => std::borrow::Cow::Borrowed(&self.inner.endpoint),
            Some(login) => {
                let mut endpoint = self.inner.endpoint.clone();
                endpoint.endpoint.username = Some(login.user.to_string());
                endpoint.endpoint.password = Some(login.password.clone());
                std::borrow::Cow::Owned(endpoint)
            }
        }
    }

    /// What kind of server is behind the actors.
    pub fn profile(&self) -> Profile {
        self.inner.profile
    }

    /// How to reach Redis logged in as `identity` (redmux's own user when `None`): for a
    /// connection that pub/sub owns.
    pub fn dial_as(&self, identity: Option<&Identity>) -> Dial {
        self.endpoint_for(identity).into_owned()
    }

    /// How to reach cluster node `host:port` logged in as `identity`: for a shard hub's
    /// connection.
    pub fn node_dial_as(&self, identity: Option<&Identity>, host: &str, port: u16) -> Dial {
        let mut dial = self.dial_as(identity);
        if let Some(cluster) = &self.inner.cluster {
            dial.endpoint.address = cluster.node_dial(host, port).endpoint.address;
        }
        dial
    }

    /// Where a subscriber connection of `identity` may go, in order of preference: the
    /// address; in front of a cluster, any node will do (the cluster forwards PUBLISH to every
    /// node), so the seeds, then the masters of the map, so that a seed that failed does not
    /// leave its subscribers without messages.
    pub fn subscriber_dials(&self, identity: Option<&Identity>) -> Vec<Dial> {
        let Some(cluster) = &self.inner.cluster else {
            return vec![self.dial_as(identity)];
        };
        let mut nodes = cluster.seeds().to_vec();
        if let Some(topology) = cluster.current() {
            for at in 0..topology.map.masters().len() {
                if let Some(node) = topology.master_addr(at).filter(|n| !nodes.contains(n)) {
                    nodes.push(node);
                }
            }
        }
        nodes
            .iter()
            .map(|(host, port)| self.node_dial_as(identity, host, *port))
            .collect()
    }

    /// The master that serves `slot` in the cluster's map now, `None` when no master does
    /// (or the upstream is no cluster).
    pub fn master_of(&self, slot: u16) -> Option<(String, u16)> {
        let topology = self.inner.cluster.as_ref()?.current()?;
        topology.master_addr(topology.map.owner(slot)?)
    }

    /// Reads the cluster's slot map again, in the background: someone met a redirect.
    pub fn refresh_cluster(&self) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.request_refresh();
        }
    }

    /// The connect and request timeouts of this set.
    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    /// Where AUTH is checked when redmux passes it through: a connection of redmux's own that
    /// carries nothing else, so logging it in as anyone changes nothing for anyone.
    pub fn auth_checker(&self) -> mpsc::Sender<Batch> {
        self.inner
            .checker
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
                let id = self.next_shared_id();
                let target = Target {
                    db: 0,
                    ..self.default_target()
                };
                match &self.inner.cluster {
                    // Any master checks it, so a failed first seed does not refuse every
                    // AUTH (Redis Cluster expects the same users on every node).
                    Some(cluster) => {
                        self.spawn_router(cluster, &target, rx);
                    }
                    None => self.spawn_actor(id, target, actor::Role::Shared, rx, None),
                }
                tx
            })
            .clone()
    }

    fn next_shared_id(&self) -> usize {
        self.inner
            .next_shared_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The upstream is a Redis Cluster, which has only db 0.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster.is_some()
    }

    /// Databases the upstream has: SELECT beyond is refused.
    pub fn databases(&self) -> u32 {
        self.inner.databases
    }

    /// The shared actor for `target` that client `client` uses; started if it is the first.
    /// At most `max_shared` targets have shared connections at once; those of clients' own
    /// logins count while a client uses them.
    pub fn shared(&self, target: &Target, client: u64) -> Result<Shared, UpstreamError> {
        let inner = &self.inner;
        let worker = WORKER.get();
        let key = (worker, target.clone());
        let mut shared = inner.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = shared.get(&key).and_then(|group| group.sender(client)) {
            return Ok(sender);
        }
        shared.retain(|_, group| group.alive());
        if shared.keys().filter(|(w, _)| *w == worker).count() >= inner.max_shared {
            return Err(UpstreamError::NoShared);
        }
        let connections = match target.identity {
            None => inner.connections,
            Some(_) => 1,
        };
        let senders: Vec<Shared> = (0..connections)
            .map(|_| {
                let (sender, rx) = mpsc::channel(CHANNEL_CAPACITY);
                let direct = match &inner.cluster {
                    Some(cluster) => Some(self.spawn_router(cluster, target, rx)),
                    None => {
                        self.spawn_actor(
                            self.next_shared_id(),
                            target.clone(),
                            actor::Role::Shared,
                            rx,
                            None,
                        );
                        None
                    }
                };
                Shared::new(sender, direct)
            })
            .collect();
        let (group, sender) = match target.identity {
            None => {
                let group = Group::Kept(senders);
                let sender = group.sender(client);
                (group, sender)
            }
            Some(_) => {
                // A client's own login: no direct path (its one router lives while used).
                let sender = senders
                    .into_iter()
                    .next()
                    .map(|shared| Shared::new(shared.sender().clone(), None));
                (
                    Group::Held(sender.as_ref().map(|shared| shared.sender().downgrade())),
                    sender,
                )
            }
        };
        shared.insert(key, group);
        sender.ok_or(UpstreamError::NoShared)
    }

    /// A connection of its own for one client, prepared for `target`. Waits up to
    /// `connect_timeout` for one to be free.
    pub async fn pinned(&self, target: Target) -> Result<Lease, UpstreamError> {
        pool::acquire(self, target).await
    }

    /// A connection for MONITOR, logged in as `identity`: it takes one of the `max_pinned`
    /// slots for as long as it lives, and is never reused (a monitoring connection stays one).
    pub async fn monitor_connection(
        &self,
        identity: Option<&Identity>,
    ) -> Result<(Reader, Writer, tokio::sync::OwnedSemaphorePermit), UpstreamError> {
        let slot = pool::slot(self).await?;
        let setup = Setup {
            db: 0,
            resp3: false,
            ping: self.inner.profile == Profile::Redis,
        };
        let endpoint = self.endpoint_for(identity);
        let (reader, writer) = connect(&endpoint, setup, self.inner.timeouts.connect)
            .await
            .map_err(|_| UpstreamError::Unavailable)?;
        Ok((reader, writer, slot))
    }

    /// Sends one request on a connection opened for it alone, and closes that connection after
    /// the reply. For SCRIPT KILL, FUNCTION KILL and FUNCTION STATS, which Redis runs while a
    /// script is busy: they must not wait behind that script on a shared connection. The
    /// connection is set up with only what Redis accepts then (AUTH, and HELLO for RESP3), and
    /// holds one of [`CONTROL_SLOTS`] slots while it lives: not a `max_pinned` one, which any
    /// client can hold for ever with `BLPOP k 0`, so that a runaway script can always be killed.
    ///
    /// In front of a cluster it goes to `node` when given (CLIENT UNBLOCK: to the node of the
    /// blocked connection, whose id is that node's own), else to every master, and the client
    /// gets the answer of the master running a script (see [`crate::cluster::control`]).
    pub fn control(
        &self,
        request: Bytes,
        target: Target,
        node: Option<(String, u16)>,
    ) -> oneshot::Receiver<Reply> {
        let (reply, rx) = oneshot::channel();
        let upstreams = self.clone();
        tokio::spawn(async move {
            let answer = match (&upstreams.inner.cluster, node) {
                (None, _) => upstreams.control_call(&request, &target, None).await,
                (Some(_), Some(node)) => {
                    upstreams.control_call(&request, &target, Some(&node)).await
                }
                (Some(cluster), None) => upstreams.control_masters(cluster, request, target).await,
            };
            let _ = reply.send(answer);
        });
        rx
    }

    /// [`Upstreams::control`] on every master of the cluster at once.
    async fn control_masters(
        &self,
        cluster: &cluster::Cluster,
        request: Bytes,
        target: Target,
    ) -> Reply {
        let topology = cluster.current().ok_or(UpstreamError::Unavailable)?;
        let masters: Vec<(String, u16)> = (0..topology.map.masters().len())
            .filter_map(|at| topology.master_addr(at))
            .collect();
        let mut asked = tokio::task::JoinSet::new();
        for (at, node) in masters.iter().cloned().enumerate() {
            let (upstreams, request, target) = (self.clone(), request.clone(), target.clone());
            asked.spawn(async move {
                let reply = upstreams.control_call(&request, &target, Some(&node)).await;
                (at, reply)
            });
        }
        let mut replies: Vec<Option<Bytes>> = vec![None; masters.len()];
        let mut error = UpstreamError::Unavailable;
        while let Some(done) = asked.join_next().await {
            match done {
                Ok((at, Ok(reply))) => replies[at] = Some(reply.bytes),
                Ok((_, Err(why))) => error = why,
                Err(_) => {}
            }
        }
        let bytes = crate::cluster::control::combine(&request, &replies).ok_or(error)?;
        let errors = u64::from(bytes.first() == Some(&b'-'));
        Ok(Replies { bytes, errors })
    }

    /// One control request on a connection of its own: to cluster node `node`, or to the
    /// configured upstream.
    async fn control_call(
        &self,
        request: &[u8],
        target: &Target,
        node: Option<&(String, u16)>,
    ) -> Reply {
        let inner = &self.inner;
        let _slot = tokio::time::timeout(inner.timeouts.connect, inner.control.acquire())
            .await
            .map_err(|_| UpstreamError::NoPinned)?
            .map_err(|_| UpstreamError::NoPinned)?;
        let setup = Setup {
            db: 0,
            resp3: target.resp3,
            ping: false,
        };
        let mut endpoint = self.endpoint_for(target.identity.as_ref());
        if let (Some(cluster), Some((host, port))) = (&inner.cluster, node) {
            endpoint.to_mut().endpoint.address = cluster.node_dial(host, *port).endpoint.address;
        }
        let (mut reader, mut writer) = connect(&endpoint, setup, inner.timeouts.connect)
            .await
            .map_err(|_| UpstreamError::Unavailable)?;
        let exchange = async {
            writer.write_all(request).await?;
            writer.flush().await?;
            let mut buf = BytesMut::new();
            connect::read_reply(&mut reader, &mut buf, &mut ReplyScanner::new()).await
        };
        match tokio::time::timeout(inner.timeouts.request, exchange).await {
            Ok(Ok(reply)) => Ok(reply.into()),
            Ok(Err(_)) => Err(UpstreamError::ConnectionLost),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// Starts a cluster router for `target` on `rx`: it starts an actor for each node it
    /// sends to, logged in as `target` says. It holds the set of connections only weakly, so
    /// that a set replaced by a reload still ends once its clients are gone.
    fn spawn_router(
        &self,
        cluster: &Arc<cluster::Cluster>,
        target: &Target,
        rx: mpsc::Receiver<Batch>,
    ) -> Arc<cluster::Direct> {
        let weak = Arc::downgrade(&self.inner);
        let node_target = target.clone();
        let spawner: cluster::Spawner = Box::new(move |host: &str, port: u16, returns| {
            let upstreams = Upstreams {
                inner: weak.upgrade()?,
            };
            let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
            let id = upstreams.next_shared_id();
            let node = Node {
                host: host.to_owned(),
                port,
                returns,
            };
            upstreams.spawn_actor_at(
                id,
                node_target.clone(),
                actor::Role::Shared,
                rx,
                None,
                Some(node),
            );
            Some(tx)
        });
        cluster::spawn_router(cluster.clone(), spawner, rx, self.next_shared_id())
    }

    /// Starts a pinned connection in front of a cluster on `rx`: it opens an actor on the
    /// master of the first key it is given (see [`cluster`]).
    fn spawn_cluster_pinned(
        &self,
        cluster: &Arc<cluster::Cluster>,
        id: usize,
        target: Target,
        rx: mpsc::Receiver<Batch>,
        connection: &ConnectionId,
    ) {
        let weak = Arc::downgrade(&self.inner);
        let connection = connection.clone();
        let spawner: cluster::Spawner = Box::new(move |host: &str, port: u16, returns| {
            let upstreams = Upstreams {
                inner: weak.upgrade()?,
            };
            let (tx, rx) = mpsc::channel(pool::CHANNEL_CAPACITY);
            let node = Some(Node {
                host: host.to_owned(),
                port,
                returns,
            });
            let (role, connection) = (actor::Role::Pinned, Some(connection.clone()));
            upstreams.spawn_actor_at(id, target.clone(), role, rx, connection, node);
            Some(tx)
        });
        cluster::spawn_pinned(cluster.clone(), spawner, rx);
    }

    /// Starts an actor for `target` on `rx`, and registers its figures.
    fn spawn_actor(
        &self,
        id: usize,
        target: Target,
        role: actor::Role,
        rx: mpsc::Receiver<Batch>,
        connection_id: Option<actor::ConnectionId>,
    ) {
        self.spawn_actor_at(id, target, role, rx, connection_id, None);
    }

    /// [`Upstreams::spawn_actor`], connecting to cluster node `node` instead of the
    /// configured address when given.
    fn spawn_actor_at(
        &self,
        id: usize,
        target: Target,
        role: actor::Role,
        rx: mpsc::Receiver<Batch>,
        connection_id: Option<actor::ConnectionId>,
        node: Option<Node>,
    ) {
        let inner = &self.inner;
        let (node, returns) = match node {
            Some(Node {
                host,
                port,
                returns,
            }) => (Some((host, port)), returns),
            None => (None, None),
        };
        let label = node
            .as_ref()
            .map(|(host, port)| Arc::from(format!("{host}:{port}")));
        let stats = Arc::new(actor::Stats::new(id, role, &target, label));
        {
            let mut actors = inner.actors.lock().unwrap_or_else(|e| e.into_inner());
            actors.retain(|stats| Arc::strong_count(stats) > 1);
            actors.push(stats.clone());
        }
        let health = (role == actor::Role::Shared
            && target == self.default_target()
            && inner.cluster.is_none())
        .then(|| inner.health.clone());
        let mut endpoint = self.endpoint_for(target.identity.as_ref()).into_owned();
        if let (Some(cluster), Some((host, port))) = (&inner.cluster, &node) {
            endpoint.endpoint.address = cluster.node_dial(host, *port).endpoint.address;
        }
        let config = actor::Config {
            endpoint,
            setup: Setup {
                db: target.db,
                resp3: target.resp3,
                ping: inner.profile == Profile::Redis,
            },
            timeouts: inner.timeouts,
            role,
            stats,
            metrics: inner.metrics.clone(),
            health,
            connection_id,
            node,
            returns,
        };
        actor::spawn(config, rx);
    }

    /// The upstream side as it is right now.
    pub fn snapshot(&self) -> Snapshot {
        let inner = &self.inner;
        let actors = {
            let mut actors = inner.actors.lock().unwrap_or_else(|e| e.into_inner());
            actors.retain(|stats| Arc::strong_count(stats) > 1);
            actors.iter().map(|stats| stats.snapshot()).collect()
        };
        Snapshot {
            healthy: self.healthy(),
            actors,
            pinned: PinnedSnapshot {
                in_use: inner.pool.in_use(),
                max: inner.pool.max(),
            },
            cluster: inner.cluster.as_ref().map(|cluster| cluster.snapshot()),
        }
    }

    /// The default target's shared connections are all up, or the upstream is embedded.
    pub fn healthy(&self) -> bool {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.whole();
        }
        self.inner.profile == Profile::Embedded
            || *self.inner.health.borrow() >= self.inner.connections
    }
}

/// Sends one request on `sender` and waits for its reply, within `timeout`.
pub(crate) async fn call(sender: &mpsc::Sender<Batch>, request: Bytes, timeout: Duration) -> Reply {
    let (reply, rx) = oneshot::channel();
    let request = Batch {
        frames: request,
        count: 1,
        queued_at: Instant::now(),
        timeout: Some(timeout),
        reply: reply.into(),
        budget: None,
    };
    let sent = tokio::time::timeout(timeout, sender.send(request)).await;
    if !matches!(sent, Ok(Ok(()))) {
        return Err(UpstreamError::Unavailable);
    }
    rx.await.unwrap_or(Err(UpstreamError::ConnectionLost))
}
