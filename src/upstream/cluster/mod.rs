//! A Redis Cluster behind redmux: the slot map, read from the nodes and kept fresh, and the
//! routers that send each client's requests to the masters that own their keys.
//!
//! The map is read with `CLUSTER SHARDS` (`CLUSTER SLOTS` on servers before 7.0) into an
//! immutable [`SlotMap`] and published on a `watch` channel: a router sees one whole map or the
//! next, never half of each. It is read again when a router meets `-MOVED` or loses a node
//! connection, and every `upstream.cluster_refresh_interval`, one read at a time.
//!
//! Each shared target (see [`super::Target`]) gets routers instead of plain actors: a router
//! takes a client's batch as a plain actor would, and answers it with every reply in order,
//! whichever nodes ran them (see [`router`]).

mod pinned;
mod router;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, sync::watch};
use tracing::{debug, info, warn};

pub(super) use pinned::spawn as spawn_pinned;
pub(super) use router::{
    direct::{deliver as deliver_direct, Direct, Returns},
    spawn as spawn_router, Routed, Spawner,
};

use super::{connect, Address, Dial, Setup, Timeouts, UpstreamError};
use crate::{
    cluster::topology::{SlotMap, TopologyError},
    resp::{encode_command, ReplyScanner},
};

/// The least time between the starts of two reads of the slot map.
const REFRESH_GAP: Duration = Duration::from_millis(100);

/// A slot map, and the host to use for a node whose endpoint Redis reports unknown (an empty
/// host): the node the map was read from, as Redis's docs say a client should.
#[derive(Debug)]
pub(crate) struct Topology {
    pub map: SlotMap,
    pub asked: String,
}

impl Topology {
    /// Where master `at` of the map listens.
    pub(crate) fn master_addr(&self, at: usize) -> Option<(String, u16)> {
        let node = self.map.masters().get(at)?;
        let host = match node.host.as_str() {
            "" => self.asked.clone(),
            host => host.to_owned(),
        };
        Some((host, node.port))
    }

    /// Whether `host:port` is a node of the map, master or replica: where a redirect a client
    /// could have written may be followed (see [`crate::cluster::redirect::followable`]).
    pub(crate) fn knows(&self, host: &str, port: u16) -> bool {
        let map = &self.map;
        (0..map.masters().len())
            .flat_map(|at| std::iter::once(&map.masters()[at]).chain(map.replicas(at)))
            .any(|node| {
                node.port == port
                    && match node.host.as_str() {
                        "" => self.asked == host,
                        own => own == host,
                    }
            })
    }
}

/// What every router of one set of upstream connections shares: the seeds, the map, and the
/// one refresh that may run at a time.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// `upstream.cluster`, as (host, port).
    seeds: Vec<(String, u16)>,
    /// How nodes are reached: credentials and TLS of the configuration; the address is
    /// replaced by each node's.
    dial: Dial,
    timeouts: Timeouts,
    map: watch::Sender<Option<Arc<Topology>>>,
    /// A refresh is running: another request for one is dropped, that one will do.
    refreshing: AtomicBool,
    /// When the last refresh started: the next waits until [`REFRESH_GAP`] has passed, so
    /// redirects that come fast (a client can make a script answer `-MOVED` in a loop) cost
    /// one read of the map per gap, not one each.
    last_refresh: Mutex<Option<tokio::time::Instant>>,
    /// Maps read and found different from the one before, for `/status`.
    changes: AtomicU64,
    /// Requests the routers' direct path sent, for `/status`.
    pub(super) direct: AtomicU64,
}

/// Why the slot map could not be read from a node.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("cannot connect: {0}")]
    Connect(#[from] connect::ConnectError),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("unreadable slot map: {0}")]
    Topology(#[from] TopologyError),
}

/// The slot map as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSnapshot {
    /// `host:port` of each master, in slot order.
    pub masters: Vec<String>,
    /// Slots no online master serves (0 when the cluster is whole).
    pub unassigned_slots: usize,
    /// Times a refresh found a new map.
    pub map_changes: u64,
    /// Requests sent past the router, straight to their master (the router's direct path).
    pub direct_requests: u64,
}

impl Cluster {
    /// Reads the map once (so that an unreachable cluster shows in the log at start), then
    /// keeps it fresh every `interval` for as long as the returned value lives.
    pub(super) async fn start(
        seeds: Vec<(String, u16)>,
        dial: Dial,
        timeouts: Timeouts,
        interval: Duration,
    ) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster {
            seeds,
            dial,
            timeouts,
            map: watch::Sender::new(None),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
            changes: AtomicU64::new(0),
            direct: AtomicU64::new(0),
        });
        cluster.refresh().await;
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(periodic(weak, interval));
        cluster
    }

    /// `upstream.cluster`, as (host, port).
    pub(crate) fn seeds(&self) -> &[(String, u16)] {
        &self.seeds
    }

    /// How long a request may wait for its reply (`request_timeout`).
    pub(crate) fn request_timeout(&self) -> Duration {
        self.timeouts.request
    }

    /// The map routers follow.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<Topology>>> {
        self.map.subscribe()
    }

    /// The map now.
    pub(crate) fn current(&self) -> Option<Arc<Topology>> {
        self.map.borrow().clone()
    }

    /// Every slot has an online master.
    pub(crate) fn whole(&self) -> bool {
        self.current().is_some_and(|t| t.map.unassigned() == 0)
    }

    pub(crate) fn snapshot(&self) -> ClusterSnapshot {
        let topology = self.current();
        ClusterSnapshot {
            masters: topology.as_ref().map_or_else(Vec::new, |t| {
                (0..t.map.masters().len())
                    .filter_map(|at| t.master_addr(at))
                    .map(|(host, port)| format!("{host}:{port}"))
                    .collect()
            }),
            unassigned_slots: topology.map_or(crate::cluster::slot::SLOTS, |t| t.map.unassigned()),
            map_changes: self.changes.load(Ordering::Relaxed),
            direct_requests: self.direct.load(Ordering::Relaxed),
        }
    }

    /// `dial` pointed at `host:port`.
    pub(crate) fn node_dial(&self, host: &str, port: u16) -> Dial {
        let mut dial = self.dial.clone();
        let tls = matches!(dial.address, Address::Tcp { tls: true, .. });
        dial.endpoint.address = Address::Tcp {
            host: host.to_owned(),
            port,
            tls,
        };
        dial.endpoint.db = 0;
        dial
    }

    /// Asks for a refresh in the background, unless one is running.
    pub(crate) fn request_refresh(self: &Arc<Self>) {
        if self.refreshing.load(Ordering::Acquire) {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move { cluster.refresh().await });
    }

    /// A node connection failed a request: the node may be gone (a failover), so the map is
    /// read again. Other errors (a timeout) say nothing about the map.
    pub(crate) fn refresh_if_lost(self: &Arc<Self>, error: &UpstreamError) {
        if matches!(
            error,
            UpstreamError::ConnectionLost | UpstreamError::Unavailable
        ) {
            self.request_refresh();
        }
    }

    /// Reads the map from the first node that answers: the masters of the current map, then
    /// the seeds. Only one refresh runs at a time; a call made while one runs returns at once.
    pub(crate) async fn refresh(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let last = *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = last {
            // Calls made meanwhile return at once: this one reads the map for them too.
            tokio::time::sleep_until(last + REFRESH_GAP).await;
        }
        *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(tokio::time::Instant::now());
        let mut candidates: Vec<(String, u16)> = match self.current() {
            Some(topology) => (0..topology.map.masters().len())
                .filter_map(|at| topology.master_addr(at))
                .collect(),
            None => Vec::new(),
        };
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut read = None;
        for (host, port) in &candidates {
            match self.read_from(host, *port).await {
                Ok(map) => {
                    read = Some(Topology {
                        map,
                        asked: host.clone(),
                    });
                    break;
                }
                Err(error) => debug!(%error, node = %format!("{host}:{port}"), "slot map not read"),
            }
        }
        match read {
            Some(topology) => {
                let changed = self
                    .map
                    .borrow()
                    .as_ref()
                    .is_none_or(|old| old.map != topology.map || old.asked != topology.asked);
                if changed {
                    self.changes.fetch_add(1, Ordering::Relaxed);
                    info!(
                        masters = topology.map.masters().len(),
                        unassigned = topology.map.unassigned(),
                        "cluster slot map read"
                    );
                    self.map.send_replace(Some(Arc::new(topology)));
                }
            }
            None => warn!("cannot read the cluster's slot map from any node; retrying later"),
        }
        self.refreshing.store(false, Ordering::Release);
    }

    /// `CLUSTER SHARDS` from one node, or `CLUSTER SLOTS` where SHARDS is unknown.
    async fn read_from(&self, host: &str, port: u16) -> Result<SlotMap, ReadError> {
        let dial = self.node_dial(host, port);
        let setup = Setup {
            db: 0,
            resp3: false,
            ping: false,
        };
        let timeout = self.timeouts.connect;
        let (mut reader, mut writer) = connect::connect(&dial, setup, timeout).await?;
        let request_timeout = self.timeouts.request;
        let shards = ask(&mut reader, &mut writer, b"SHARDS", request_timeout).await?;
        let tls = matches!(dial.address, Address::Tcp { tls: true, .. });
        match SlotMap::from_shards(&shards, tls) {
            Err(TopologyError::ErrorReply(_)) => {}
            other => return Ok(other?),
        }
        let slots = ask(&mut reader, &mut writer, b"SLOTS", request_timeout).await?;
        Ok(SlotMap::from_slots(&slots)?)
    }
}

/// Sends `CLUSTER sub` and reads the reply, within `timeout`.
async fn ask(
    reader: &mut connect::Reader,
    writer: &mut connect::Writer,
    sub: &'static [u8],
    timeout: Duration,
) -> Result<bytes::Bytes, ReadError> {
    let request = encode_command([&b"CLUSTER"[..], sub]);
    let exchange = async {
        writer.write_all(&request).await?;
        writer.flush().await?;
        let mut buf = BytesMut::new();
        connect::read_reply(reader, &mut buf, &mut ReplyScanner::new()).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ReadError::Timeout(timeout))?
        .map_err(ReadError::from)
}

/// Reads the map every `interval` while the cluster is in use.
async fn periodic(cluster: Weak<Cluster>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        cluster.refresh().await;
    }
}
