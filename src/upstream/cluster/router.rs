//! The router: takes a client's batch of requests as a plain shared actor would, sends each
//! request to the master that owns its keys (on one pipelined actor per node), and answers the
//! batch with every reply in the order the requests came, whichever nodes ran them.
//!
//! What a request becomes is decided once, when the batch arrives: a request for one slot goes
//! to that slot's master (consecutive ones for the same node go as one message); MGET, MSET,
//! DEL, UNLINK, EXISTS and TOUCH across slots are split by slot and merged; other requests
//! across slots get `-CROSSSLOT` here; DBSIZE, KEYS, FLUSHALL and the like go to every master
//! and their replies are combined; SCAN walks the masters one after the other with a cursor
//! that names the master; CLUSTER KEYSLOT is answered here.
//!
//! Each node's replies come back in the order its requests were sent, and the router reads
//! them in that order, node by node. So when a node answers `-MOVED` (Redis did not run the
//! request) the resend to the new owner is queued before any later request the router reads
//! from that node, and requests for one slot stay in order. `-ASK` is followed once with
//! `ASKING`, `-TRYAGAIN` is retried with a growing delay, a bounded number of times. A request
//! whose node connection was lost is never resent: it may have run.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{sleep_until, Instant},
};
use tracing::{debug, Instrument};

use super::{Cluster, Topology};
use crate::{
    cluster::{
        keys::{self, Combine, Scope, SlotOf},
        plan::{Plan, CROSSSLOT},
        reply::elements,
        slot::slot,
    },
    resp::{encode_command, parse_int, Args, ReplyScanner},
    upstream::{Budget, Replies, Reply, Request, UpstreamError},
};

/// Messages taken off the channel at once.
const BATCH: usize = 256;
/// Redirects (MOVED, ASK) one request follows before its error goes to the client.
const MAX_REDIRECTS: u8 = 5;
/// `-TRYAGAIN` retries of one request before its error goes to the client.
const MAX_TRYAGAIN: u8 = 6;
/// The first TRYAGAIN delay; each retry doubles it (20 ms .. 640 ms, 1.26 s in all).
const TRYAGAIN_FIRST: Duration = Duration::from_millis(20);
/// Bits of a SCAN cursor given to the master's own cursor; the bits above name the master.
/// Redis's cursor never reaches them: it is below the size of the node's hash table.
const CURSOR_BITS: u32 = 56;

/// Starts a node actor for `host:port` and gives its channel; `None` once the set of upstream
/// connections that owns the router is gone.
pub(in crate::upstream) type Spawner =
    Box<dyn Fn(&str, u16) -> Option<mpsc::Sender<Request>> + Send + Sync>;

/// Starts a router on `rx`.
pub(in crate::upstream) fn spawn(
    cluster: Arc<Cluster>,
    spawner: Spawner,
    rx: mpsc::Receiver<Request>,
    id: usize,
) {
    let map_rx = cluster.subscribe();
    let topology = map_rx.borrow().clone();
    let router = Router {
        rx,
        closed: false,
        cluster,
        map_rx,
        map_open: true,
        topology,
        moved: HashMap::new(),
        nodes: Vec::new(),
        masters: Vec::new(),
        batches: HashMap::new(),
        next_batch: 0,
        retries: Vec::new(),
        spawner,
        round_robin: 0,
    };
    let span = tracing::info_span!("cluster_router", id);
    tokio::spawn(router.run().instrument(span));
}

/// One node's actor and what the router has sent it, oldest first.
struct NodeConn {
    host: String,
    port: u16,
    sender: mpsc::Sender<Request>,
    inflight: VecDeque<Job>,
}

/// Which part of a batch a message to a node answers.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// Requests `start..start + len` of the batch, back to back.
    Range { start: usize, len: usize },
    /// Part `part` of request `index`, which was split or sent to several masters.
    Part { index: usize, part: usize },
}

/// A message sent to a node, waiting for its replies.
struct Job {
    batch: u64,
    unit: Unit,
    /// The requests as the client sent them (without the ASKING put in front).
    frames: Bytes,
    redirects: u8,
    tries: u8,
    /// `ASKING` went first: its `+OK` is not the client's.
    asking: bool,
    rx: oneshot::Receiver<Reply>,
}

/// A request to send again later (TRYAGAIN).
struct Retry {
    at: Instant,
    host: String,
    port: u16,
    batch: u64,
    unit: Unit,
    frames: Bytes,
    redirects: u8,
    tries: u8,
}

/// A client's batch, being answered.
struct Batch {
    reply: oneshot::Sender<Reply>,
    budget: Option<Arc<Budget>>,
    /// When the replies are due: resends get only what is left of it.
    deadline: Option<Instant>,
    /// The reply of each request; a reply to a run of requests sits at its first request, and
    /// the others of the run hold empty bytes.
    filled: Vec<Option<Bytes>>,
    missing: usize,
    /// Which replies are errors (see [`Replies::errors`]).
    errors: u64,
    fanouts: HashMap<usize, Fanout>,
}

/// A request answered from several parts.
struct Fanout {
    merge: Merge,
    parts: Vec<Option<Bytes>>,
    missing: usize,
}

enum Merge {
    /// A multi-key command split by slot.
    Split(Plan),
    /// A command run on every master.
    Combine(Combine),
    /// SCAN on master `master` of `masters`.
    Scan { master: usize, masters: usize },
}

/// What to do with one request.
enum Route {
    Node(usize),
    Local(Bytes),
    Fanout(Merge, Vec<(usize, Bytes)>),
}

struct Router {
    rx: mpsc::Receiver<Request>,
    closed: bool,
    cluster: Arc<Cluster>,
    map_rx: watch::Receiver<Option<Arc<Topology>>>,
    /// The map's sender lives: while it does, changes are followed.
    map_open: bool,
    topology: Option<Arc<Topology>>,
    /// Slots a `-MOVED` named a new owner for, since the map was last read.
    moved: HashMap<u16, usize>,
    nodes: Vec<NodeConn>,
    /// The node of each master of `topology`, once used.
    masters: Vec<Option<usize>>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    retries: Vec<Retry>,
    spawner: Spawner,
    /// Where the next keyless request goes.
    round_robin: usize,
}

impl Router {
    async fn run(mut self) {
        let mut incoming = Vec::with_capacity(BATCH);
        loop {
            if self.closed && self.batches.is_empty() {
                return;
            }
            let next_retry = self.retries.iter().map(|r| r.at).min();
            tokio::select! {
                n = self.rx.recv_many(&mut incoming, BATCH), if !self.closed => {
                    self.closed = n == 0;
                    for request in std::mem::take(&mut incoming) {
                        self.accept(request).await;
                    }
                }
                (node, job, reply) = NextReply { nodes: &mut self.nodes } => {
                    self.answered(node, job, reply).await;
                }
                changed = self.map_rx.changed(), if self.map_open => match changed {
                    Ok(()) => self.new_map(),
                    Err(_) => self.map_open = false,
                },
                _ = sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    self.retry_due().await;
                }
            }
        }
    }

    /// Follows a new slot map: MOVED's corrections are part of it (or outdated), and nodes no
    /// longer masters are let go once they have answered everything.
    fn new_map(&mut self) {
        self.topology = self.map_rx.borrow_and_update().clone();
        self.moved.clear();
        let masters: Vec<(String, u16)> = self.topology.as_ref().map_or_else(Vec::new, |t| {
            (0..t.map.masters().len())
                .filter_map(|at| t.master_addr(at))
                .collect()
        });
        self.nodes.retain(|node| {
            !node.inflight.is_empty() || masters.contains(&(node.host.clone(), node.port))
        });
        self.masters = vec![None; masters.len()];
    }

    /// The node for `host:port`, its actor started if it is new.
    fn node(&mut self, host: &str, port: u16) -> Option<usize> {
        if let Some(at) = self
            .nodes
            .iter()
            .position(|n| n.port == port && n.host == host)
        {
            return Some(at);
        }
        let sender = (self.spawner)(host, port)?;
        self.nodes.push(NodeConn {
            host: host.to_owned(),
            port,
            sender,
            inflight: VecDeque::new(),
        });
        Some(self.nodes.len() - 1)
    }

    fn master_count(&self) -> usize {
        self.topology.as_ref().map_or(0, |t| t.map.masters().len())
    }

    /// The node of master `at` of the map.
    fn master(&mut self, at: usize) -> Option<usize> {
        if let Some(Some(node)) = self.masters.get(at) {
            return Some(*node);
        }
        let (host, port) = self.topology.as_ref()?.master_addr(at)?;
        let node = self.node(&host, port)?;
        if self.masters.len() <= at {
            self.masters.resize(at + 1, None);
        }
        self.masters[at] = Some(node);
        Some(node)
    }

    /// The node that serves `slot`: as the last MOVED said, else as the map says.
    fn slot_node(&mut self, slot: u16) -> Option<usize> {
        if let Some(&node) = self.moved.get(&slot) {
            return Some(node);
        }
        let owner = self.topology.as_ref()?.map.owner(slot)?;
        self.master(owner)
    }

    /// Any master, taken in turn.
    fn any_master(&mut self) -> Option<usize> {
        let masters = self.master_count();
        if masters == 0 {
            return None;
        }
        self.round_robin = (self.round_robin + 1) % masters;
        self.master(self.round_robin)
    }

    /// Takes a client's batch: every request routed, each reply slot waiting or filled.
    async fn accept(&mut self, request: Request) {
        if request.reply.is_closed() {
            return;
        }
        let Some(bounds) = requests(&request.frames, request.count) else {
            let _ = request.reply.send(Err(UpstreamError::ConnectionLost));
            return;
        };
        let id = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        let count = bounds.len();
        self.batches.insert(
            id,
            Batch {
                reply: request.reply,
                budget: request.budget,
                deadline: request.timeout.map(|t| request.queued_at + t),
                filled: vec![None; count],
                missing: count,
                errors: 0,
                fanouts: HashMap::new(),
            },
        );
        let frames = request.frames;
        // A run of consecutive requests for one node: (node, first request, its offset).
        let mut run: Option<(usize, usize, usize)> = None;
        for (index, &(from, to)) in bounds.iter().enumerate() {
            let route = self.route(&frames[from..to]);
            if let (Route::Node(node), Some((run_node, _, _))) = (&route, run) {
                if *node == run_node {
                    continue;
                }
            }
            if let Some((node, start, offset)) = run.take() {
                let unit = Unit::Range {
                    start,
                    len: index - start,
                };
                self.send(node, id, unit, frames.slice(offset..from), 0, 0, false)
                    .await;
            }
            match route {
                Route::Node(node) => run = Some((node, index, from)),
                Route::Local(bytes) => self.fill(id, index, bytes),
                Route::Fanout(merge, parts) => {
                    let fanout = Fanout {
                        merge,
                        parts: vec![None; parts.len()],
                        missing: parts.len(),
                    };
                    if let Some(batch) = self.batches.get_mut(&id) {
                        batch.fanouts.insert(index, fanout);
                    }
                    for (part, (node, request)) in parts.into_iter().enumerate() {
                        let unit = Unit::Part { index, part };
                        self.send(node, id, unit, request, 0, 0, false).await;
                    }
                }
            }
        }
        if let Some((node, start, offset)) = run {
            let unit = Unit::Range {
                start,
                len: count - start,
            };
            let end = frames.len();
            self.send(node, id, unit, frames.slice(offset..end), 0, 0, false)
                .await;
        }
        self.finish_if_done(id);
    }

    /// Where one request goes.
    fn route(&mut self, request: &[u8]) -> Route {
        let mut args = Args::new(request);
        let name = args.next().unwrap_or_default();
        if name.eq_ignore_ascii_case(b"cluster") {
            return Route::Local(cluster_command(args));
        }
        let keys = keys::keys(request);
        let node = match keys.scope() {
            Scope::Keys | Scope::ShardChannels => match keys.slot() {
                SlotOf::One(slot) => self.slot_node(slot),
                SlotOf::None => self.any_master(),
                SlotOf::Cross => return self.cross_slot(request),
            },
            Scope::NoKeys => self.any_master(),
            Scope::RandomMaster => {
                let masters = self.master_count().max(1);
                let at = usize::try_from(random() % masters as u64).unwrap_or_default();
                self.master(at)
            }
            Scope::AllMasters(combine) => {
                let mut parts = Vec::new();
                for at in 0..self.master_count() {
                    match self.master(at) {
                        Some(node) => parts.push((node, Bytes::copy_from_slice(request))),
                        None => return self.down(),
                    }
                }
                if parts.is_empty() {
                    return self.down();
                }
                return Route::Fanout(Merge::Combine(combine), parts);
            }
            Scope::Scan => return self.scan(request),
        };
        match node {
            Some(node) => Route::Node(node),
            None => self.down(),
        }
    }

    /// A request whose keys span slots: split if it is one of the commands that are sums of
    /// single-key work, else Redis Cluster's `-CROSSSLOT`.
    fn cross_slot(&mut self, request: &[u8]) -> Route {
        let Some(plan) = Plan::split(request, |_| 0) else {
            return Route::Local(Bytes::from_static(CROSSSLOT));
        };
        let mut parts = Vec::with_capacity(plan.parts().len());
        for part in plan.parts() {
            match self.slot_node(part.slot) {
                Some(node) => parts.push((node, part.request.clone())),
                None => return self.down(),
            }
        }
        Route::Fanout(Merge::Split(plan), parts)
    }

    /// SCAN: the client's cursor names the master and that master's cursor.
    fn scan(&mut self, request: &[u8]) -> Route {
        let argv: Vec<&[u8]> = Args::new(request).collect();
        let masters = self.master_count();
        let cursor = argv
            .get(1)
            .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok());
        let Some(cursor) = cursor else {
            // Not a cursor: any master gives Redis's own error.
            return match self.any_master() {
                Some(node) => Route::Node(node),
                None => self.down(),
            };
        };
        let master = usize::try_from(cursor >> CURSOR_BITS).unwrap_or(usize::MAX);
        if master >= masters {
            return Route::Local(Bytes::from_static(b"-ERR invalid cursor\r\n"));
        }
        let own = (cursor & ((1 << CURSOR_BITS) - 1)).to_string();
        let mut args = argv.clone();
        args[1] = own.as_bytes();
        let Some(node) = self.master(master) else {
            return self.down();
        };
        Route::Fanout(
            Merge::Scan { master, masters },
            vec![(node, encode_command(args))],
        )
    }

    /// No master serves the slot (the cluster is down, or its map unknown yet): Redis
    /// Cluster's own error, and a refresh.
    fn down(&mut self) -> Route {
        self.cluster.request_refresh();
        Route::Local(Bytes::from_static(b"-CLUSTERDOWN Hash slot not served\r\n"))
    }

    /// Sends `frames` (the requests of `unit`) to node `node`, with only what is left of the
    /// batch's time to answer.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        node: usize,
        batch: u64,
        unit: Unit,
        frames: Bytes,
        redirects: u8,
        tries: u8,
        asking: bool,
    ) {
        let Some(deadline) = self.batches.get(&batch).map(|b| b.deadline) else {
            return;
        };
        let now = Instant::now();
        let timeout = deadline.map(|d| d.saturating_duration_since(now));
        if timeout.is_some_and(|t| t.is_zero()) {
            return self.fail(batch, unit, UpstreamError::Timeout);
        }
        let len = match unit {
            Unit::Range { len, .. } => len,
            Unit::Part { .. } => 1,
        };
        let (wire, count) = if asking {
            let mut wire = BytesMut::with_capacity(frames.len() + 20);
            wire.put_slice(b"*1\r\n$6\r\nASKING\r\n");
            wire.put_slice(&frames);
            (wire.freeze(), len + 1)
        } else {
            (frames.clone(), len)
        };
        let (reply, rx) = oneshot::channel();
        let request = Request {
            frames: wire,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            queued_at: now,
            timeout,
            reply,
            budget: None,
        };
        let Some(conn) = self.nodes.get(node) else {
            return self.fail(batch, unit, UpstreamError::Unavailable);
        };
        let sender = conn.sender.clone();
        let sent = match sender.try_send(request) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(request)) => {
                // The node is behind: wait, within the time the batch has, which holds back
                // the clients of this router as a busy Redis would.
                let wait = timeout.unwrap_or(Duration::from_secs(5));
                matches!(
                    tokio::time::timeout(wait, sender.send(request)).await,
                    Ok(Ok(()))
                )
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if !sent {
            return self.fail(batch, unit, UpstreamError::Unavailable);
        }
        if let Some(conn) = self.nodes.get_mut(node) {
            conn.inflight.push_back(Job {
                batch,
                unit,
                frames,
                redirects,
                tries,
                asking,
                rx,
            });
        }
    }

    /// A node answered `job` (or failed to).
    async fn answered(&mut self, node: usize, job: Job, reply: Reply) {
        let Job {
            batch,
            unit,
            frames,
            redirects,
            tries,
            asking,
            ..
        } = job;
        if !self.batches.contains_key(&batch) {
            return;
        }
        let replies = match reply {
            Ok(replies) => replies,
            Err(error) => {
                if matches!(
                    error,
                    UpstreamError::ConnectionLost | UpstreamError::Unavailable
                ) {
                    self.cluster.request_refresh();
                }
                self.fail(batch, unit, error);
                return self.finish_if_done(batch);
            }
        };
        let (mut bytes, mut errors) = (replies.bytes, replies.errors);
        if asking {
            // ASKING's own +OK.
            match split_replies(&bytes, 1) {
                Some(first) => {
                    let cut = first.first().map_or(0, |&(_, to)| to);
                    bytes = bytes.slice(cut..);
                    errors >>= 1;
                }
                None => {
                    self.fail(batch, unit, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                }
            }
        }
        match unit {
            Unit::Range { start, len } if errors == 0 && len < 64 => {
                self.fill_range(batch, start, len, bytes, 0);
            }
            Unit::Range { start, len } => {
                let (Some(replies), Some(requests)) =
                    (split_replies(&bytes, len), split_replies(&frames, len))
                else {
                    self.fail(batch, unit, UpstreamError::ConnectionLost);
                    return self.finish_if_done(batch);
                };
                for (k, (&(from, to), &(rfrom, rto))) in replies.iter().zip(&requests).enumerate() {
                    let reply = bytes.slice(from..to);
                    let unit = Unit::Range {
                        start: start + k,
                        len: 1,
                    };
                    let request = frames.slice(rfrom..rto);
                    self.reply_or_redirect(node, batch, unit, request, reply, redirects, tries)
                        .await;
                }
            }
            Unit::Part { .. } => {
                self.reply_or_redirect(node, batch, unit, frames, bytes, redirects, tries)
                    .await;
            }
        }
        self.finish_if_done(batch);
    }

    /// One reply: the client's, or a redirect to follow.
    #[allow(clippy::too_many_arguments)]
    async fn reply_or_redirect(
        &mut self,
        node: usize,
        batch: u64,
        unit: Unit,
        request: Bytes,
        reply: Bytes,
        redirects: u8,
        tries: u8,
    ) {
        match redirect(&reply) {
            Some(Redirect::Moved { slot, host, port }) if redirects < MAX_REDIRECTS => {
                self.cluster.request_refresh();
                let host = self.host_or(node, host);
                if let Some(to) = self.node(&host, port) {
                    self.moved.insert(slot, to);
                    debug!(slot, %host, port, "MOVED: resending to the new owner");
                    return self
                        .send(to, batch, unit, request, redirects + 1, tries, false)
                        .await;
                }
            }
            Some(Redirect::Ask { host, port }) if redirects < MAX_REDIRECTS => {
                let host = self.host_or(node, host);
                if let Some(to) = self.node(&host, port) {
                    return self
                        .send(to, batch, unit, request, redirects + 1, tries, true)
                        .await;
                }
            }
            Some(Redirect::TryAgain) if tries < MAX_TRYAGAIN => {
                if let Some(conn) = self.nodes.get(node) {
                    self.retries.push(Retry {
                        at: Instant::now() + TRYAGAIN_FIRST * (1 << tries),
                        host: conn.host.clone(),
                        port: conn.port,
                        batch,
                        unit,
                        frames: request,
                        redirects,
                        tries: tries + 1,
                    });
                    return;
                }
            }
            _ => {}
        }
        match unit {
            Unit::Range { start, .. } => self.fill(batch, start, reply),
            Unit::Part { index, part } => self.fill_part(batch, index, part, reply),
        }
    }

    /// The host a redirect names, or, when Redis left it out (an unknown endpoint), the host
    /// of the node that redirected.
    fn host_or(&self, node: usize, host: String) -> String {
        match host.is_empty() {
            true => self
                .nodes
                .get(node)
                .map(|n| n.host.clone())
                .unwrap_or_default(),
            false => host,
        }
    }

    /// Sends the TRYAGAIN retries that are due.
    async fn retry_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Retry>, Vec<Retry>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|r| r.at <= now);
        self.retries = later;
        for retry in due {
            let batch = retry.batch;
            match self.node(&retry.host, retry.port) {
                Some(node) => {
                    self.send(
                        node,
                        batch,
                        retry.unit,
                        retry.frames,
                        retry.redirects,
                        retry.tries,
                        false,
                    )
                    .await
                }
                None => self.fail(batch, retry.unit, UpstreamError::Unavailable),
            }
            self.finish_if_done(batch);
        }
    }

    /// Every request of `unit` gets `error`.
    fn fail(&mut self, batch: u64, unit: Unit, error: UpstreamError) {
        match unit {
            Unit::Range { start, len } => {
                for index in start..start + len {
                    self.fill(batch, index, error.replies(1));
                }
            }
            Unit::Part { index, .. } => {
                let Some(b) = self.batches.get_mut(&batch) else {
                    return;
                };
                // The other parts' replies are dropped when they come.
                if b.fanouts.remove(&index).is_some() {
                    self.fill(batch, index, error.replies(1));
                }
            }
        }
    }

    fn fill(&mut self, batch: u64, index: usize, reply: Bytes) {
        let error = matches!(reply.first(), Some(b'-' | b'!'));
        self.fill_range(batch, index, 1, reply, u64::from(error));
    }

    /// The replies of requests `start..start + len`, back to back.
    fn fill_range(&mut self, batch: u64, start: usize, len: usize, bytes: Bytes, errors: u64) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        for (k, slot) in b.filled.iter_mut().skip(start).take(len).enumerate() {
            if slot.is_none() {
                b.missing -= 1;
            }
            *slot = Some(if k == 0 { bytes.clone() } else { Bytes::new() });
        }
        b.errors |= errors
            .checked_shl(u32::try_from(start).unwrap_or(64))
            .unwrap_or(0);
    }

    fn fill_part(&mut self, batch: u64, index: usize, part: usize, reply: Bytes) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        let Some(fanout) = b.fanouts.get_mut(&index) else {
            return;
        };
        if let Some(slot) = fanout.parts.get_mut(part) {
            if slot.is_none() {
                fanout.missing -= 1;
            }
            *slot = Some(reply);
        }
        if fanout.missing > 0 {
            return;
        }
        let Some(fanout) = b.fanouts.remove(&index) else {
            return;
        };
        let parts: Vec<Bytes> = fanout.parts.into_iter().flatten().collect();
        let merged = merge(&fanout.merge, &parts);
        self.fill(batch, index, merged);
    }

    /// Answers the client once every reply of its batch is in.
    fn finish_if_done(&mut self, batch: u64) {
        if self.batches.get(&batch).is_none_or(|b| b.missing > 0) {
            return;
        }
        let Some(b) = self.batches.remove(&batch) else {
            return;
        };
        let mut pieces = b.filled.into_iter().flatten().filter(|p| !p.is_empty());
        let bytes = match (pieces.next(), pieces.clone().next()) {
            (Some(only), None) => only,
            (first, _) => {
                let mut out = BytesMut::new();
                for piece in first.into_iter().chain(pieces) {
                    out.put_slice(&piece);
                }
                out.freeze()
            }
        };
        let within = b
            .budget
            .as_ref()
            .is_none_or(|budget| budget.charge(bytes.len()));
        let reply = match within {
            true => Ok(Replies {
                bytes,
                errors: b.errors,
            }),
            false => Err(UpstreamError::OutputLimit),
        };
        let _ = b.reply.send(reply);
    }
}

/// The next node reply, reading each node's replies in the order its requests were sent.
struct NextReply<'a> {
    nodes: &'a mut Vec<NodeConn>,
}

impl Future for NextReply<'_> {
    type Output = (usize, Job, Reply);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        for (at, node) in self.nodes.iter_mut().enumerate() {
            let Some(job) = node.inflight.front_mut() else {
                continue;
            };
            if let Poll::Ready(reply) = Pin::new(&mut job.rx).poll(cx) {
                let reply = reply.unwrap_or(Err(UpstreamError::ConnectionLost));
                if let Some(job) = node.inflight.pop_front() {
                    return Poll::Ready((at, job, reply));
                }
            }
        }
        Poll::Pending
    }
}

/// Where each of `count` complete RESP values in `bytes` starts and ends; `None` if `bytes`
/// does not hold at least that many.
pub(super) fn split_replies(bytes: &[u8], count: usize) -> Option<Vec<(usize, usize)>> {
    let mut scanner = ReplyScanner::with_push();
    let mut at = 0;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let end = scanner.next_reply(&bytes[at..]).ok()??;
        scanner.consumed(end);
        out.push((at, at + end));
        at += end;
    }
    Some(out)
}

/// The bounds of each of `count` requests in a batch's frames.
pub(super) fn requests(frames: &[u8], count: u32) -> Option<Vec<(usize, usize)>> {
    let bounds = split_replies(frames, usize::try_from(count).ok()?)?;
    (bounds.last().map_or(0, |&(_, to)| to) == frames.len()).then_some(bounds)
}

pub(super) enum Redirect {
    Moved { slot: u16, host: String, port: u16 },
    Ask { host: String, port: u16 },
    TryAgain,
}

/// `-MOVED slot host:port`, `-ASK slot host:port` or `-TRYAGAIN ...`.
pub(super) fn redirect(reply: &[u8]) -> Option<Redirect> {
    if reply.starts_with(b"-TRYAGAIN") {
        return Some(Redirect::TryAgain);
    }
    let text = std::str::from_utf8(reply.strip_prefix(b"-")?)
        .ok()?
        .trim_end();
    let mut words = text.split(' ');
    let kind = words.next()?;
    let slot: u16 = words.next()?.parse().ok()?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, host, port }),
        "ASK" => Some(Redirect::Ask { host, port }),
        _ => None,
    }
}

/// CLUSTER: KEYSLOT is answered here; redmux shows the cluster as one Redis, so the other
/// subcommands, which would describe its nodes, are refused.
fn cluster_command(mut args: Args<'_>) -> Bytes {
    let Some(sub) = args.next() else {
        return Bytes::from_static(b"-ERR wrong number of arguments for 'cluster' command\r\n");
    };
    if sub.eq_ignore_ascii_case(b"keyslot") {
        return match (args.next(), args.next()) {
            (Some(key), None) => Bytes::from(format!(":{}\r\n", slot(key))),
            _ => Bytes::from_static(
                b"-ERR wrong number of arguments for 'cluster|keyslot' command\r\n",
            ),
        };
    }
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    let sub: String = sub.chars().filter(|c| !c.is_control()).take(64).collect();
    Bytes::from(format!(
        "-ERR redmux: CLUSTER {sub} is not supported: redmux presents the cluster as a single Redis\r\n"
    ))
}

/// The client's reply to a request answered in parts.
fn merge(how: &Merge, parts: &[Bytes]) -> Bytes {
    let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
    let first_error = || {
        refs.iter()
            .find(|r| is_error(r))
            .map(|r| Bytes::copy_from_slice(r))
    };
    let merged = match how {
        Merge::Split(plan) => plan.merge(&refs).map_err(|e| e.to_string()),
        Merge::Combine(combine) => {
            if let (Combine::OneSucceeded, Some(ok)) = (combine, refs.iter().find(|r| !is_error(r)))
            {
                return Bytes::copy_from_slice(ok);
            }
            if let Some(error) = first_error() {
                return error;
            }
            combined(*combine, &refs)
        }
        Merge::Scan { master, masters } => match refs.first() {
            Some(reply) if is_error(reply) => return Bytes::copy_from_slice(reply),
            Some(reply) => scan_reply(reply, *master, *masters),
            None => Err("no reply".to_owned()),
        },
    };
    merged.unwrap_or_else(|why| {
        Bytes::from(format!(
            "-ERR redmux: cluster replies could not be combined: {why}\r\n"
        ))
    })
}

fn combined(combine: Combine, parts: &[&[u8]]) -> Result<Bytes, String> {
    match combine {
        Combine::Sum => {
            let mut sum: i64 = 0;
            for part in parts {
                let n = integer(part).ok_or("not an integer")?;
                sum = sum.checked_add(n).ok_or("overflow")?;
            }
            Ok(Bytes::from(format!(":{sum}\r\n")))
        }
        Combine::Concat => {
            let mut items = Vec::new();
            let mut header = b'*';
            for part in parts {
                header = part.first().copied().unwrap_or(b'*');
                let elements = elements(part).map_err(|e| e.to_string())?;
                items.extend(elements.ok_or("not an array")?);
            }
            let mut out = BytesMut::new();
            out.put_u8(header);
            out.put_slice(format!("{}\r\n", items.len()).as_bytes());
            for item in items {
                out.put_slice(item);
            }
            Ok(out.freeze())
        }
        Combine::AllSucceeded | Combine::OneSucceeded => parts
            .first()
            .map(|p| Bytes::copy_from_slice(p))
            .ok_or_else(|| "no reply".to_owned()),
        Combine::LogicalAnd => {
            let mut result: Option<Vec<i64>> = None;
            for part in parts {
                let elements = elements(part)
                    .map_err(|e| e.to_string())?
                    .ok_or("not an array")?;
                let values = elements
                    .iter()
                    .map(|e| integer(e).ok_or("not an integer"))
                    .collect::<Result<Vec<i64>, _>>()?;
                result = Some(match result {
                    None => values,
                    Some(before) => before
                        .iter()
                        .zip(&values)
                        .map(|(a, b)| i64::from(*a != 0 && *b != 0))
                        .collect(),
                });
            }
            let values = result.unwrap_or_default();
            let mut out = format!("*{}\r\n", values.len());
            for value in values {
                out += &format!(":{value}\r\n");
            }
            Ok(Bytes::from(out))
        }
    }
}

/// A master's SCAN reply with its cursor made the client's: the next master's start once this
/// master is done, 0 after the last.
fn scan_reply(reply: &[u8], master: usize, masters: usize) -> Result<Bytes, String> {
    let items = elements(reply)
        .map_err(|e| e.to_string())?
        .ok_or("not an array")?;
    let [cursor, keys] = items.as_slice() else {
        return Err("not a cursor and keys".to_owned());
    };
    let cursor = bulk(cursor)
        .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok())
        .ok_or("not a cursor")?;
    if cursor >> CURSOR_BITS != 0 {
        return Err("cursor too large to encode the master".to_owned());
    }
    let next = match cursor {
        0 if master + 1 < masters => ((master + 1) as u64) << CURSOR_BITS,
        0 => 0,
        own => own | ((master as u64) << CURSOR_BITS),
    };
    let next = next.to_string();
    let mut out = BytesMut::with_capacity(reply.len() + 24);
    out.put_slice(format!("*2\r\n${}\r\n{next}\r\n", next.len()).as_bytes());
    out.put_slice(keys);
    Ok(out.freeze())
}

fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-' | b'!'))
}

/// The value of a `:n` reply.
fn integer(reply: &[u8]) -> Option<i64> {
    parse_int(reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
}

/// The contents of a `$n` bulk string.
fn bulk(reply: &[u8]) -> Option<&[u8]> {
    let rest = reply.strip_prefix(b"$")?;
    let cr = rest.iter().position(|&c| c == b'\r')?;
    let len = usize::try_from(parse_int(&rest[..cr])?).ok()?;
    rest.get(cr + 2..cr + 2 + len)
}

/// A random number, for RANDOMKEY's master.
fn random() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_are_read() {
        assert!(matches!(
            redirect(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some(Redirect::Moved { slot: 3999, ref host, port: 6381 }) if host == "127.0.0.1"
        ));
        assert!(matches!(
            redirect(b"-ASK 1 [::1]:7000\r\n"),
            Some(Redirect::Ask { ref host, port: 7000 }) if host == "::1"
        ));
        assert!(matches!(
            redirect(b"-MOVED 3999 :6381\r\n"),
            Some(Redirect::Moved { ref host, .. }) if host.is_empty()
        ));
        assert!(matches!(
            redirect(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"),
            Some(Redirect::TryAgain)
        ));
        assert!(redirect(b"-ERR MOVED\r\n").is_none());
        assert!(redirect(b"$5\r\nMOVED\r\n").is_none());
    }

    #[test]
    fn scan_cursors_name_the_master() {
        let reply = b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\na\r\n";
        let out = scan_reply(reply, 1, 3).unwrap();
        let expected = (17u64 | (1 << CURSOR_BITS)).to_string();
        assert_eq!(
            out,
            format!(
                "*2\r\n${}\r\n{expected}\r\n*1\r\n$1\r\na\r\n",
                expected.len()
            )
        );
        let done = b"*2\r\n$1\r\n0\r\n*0\r\n";
        let next = (2u64 << CURSOR_BITS).to_string();
        assert_eq!(
            scan_reply(done, 1, 3).unwrap(),
            format!("*2\r\n${}\r\n{next}\r\n*0\r\n", next.len())
        );
        assert_eq!(
            &scan_reply(done, 2, 3).unwrap()[..],
            b"*2\r\n$1\r\n0\r\n*0\r\n"
        );
    }

    #[test]
    fn combined_replies_follow_the_response_policy() {
        assert_eq!(
            &combined(Combine::Sum, &[b":1\r\n", b":2\r\n"]).unwrap()[..],
            b":3\r\n"
        );
        assert_eq!(
            &combined(
                Combine::Concat,
                &[b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*1\r\n$1\r\nb\r\n"]
            )
            .unwrap()[..],
            b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        );
        assert_eq!(
            &combined(
                Combine::LogicalAnd,
                &[b"*2\r\n:1\r\n:1\r\n", b"*2\r\n:0\r\n:1\r\n"]
            )
            .unwrap()[..],
            b"*2\r\n:0\r\n:1\r\n"
        );
        let parts = [
            Bytes::from_static(b"-ERR a\r\n"),
            Bytes::from_static(b"+OK\r\n"),
        ];
        assert_eq!(
            &merge(&Merge::Combine(Combine::OneSucceeded), &parts)[..],
            b"+OK\r\n"
        );
        assert_eq!(
            &merge(&Merge::Combine(Combine::AllSucceeded), &parts)[..],
            b"-ERR a\r\n"
        );
    }

    #[test]
    fn cluster_keyslot_is_answered_and_other_subcommands_refused() {
        let ask = |args: &[&str]| {
            let request = encode_command(args.iter().map(|a| a.as_bytes()));
            let mut args = Args::new(&request);
            args.next();
            cluster_command(args)
        };
        assert_eq!(&ask(&["CLUSTER", "KEYSLOT", "foo"])[..], b":12182\r\n");
        assert_eq!(
            &ask(&["cluster", "keyslot", "{user1000}.following"])[..],
            b":3443\r\n"
        );
        assert!(ask(&["CLUSTER", "NODES"]).starts_with(b"-ERR redmux: CLUSTER NODES is not"));
        assert!(ask(&["CLUSTER", "KEYSLOT"]).starts_with(b"-ERR wrong number"));
    }

    #[test]
    fn batches_are_cut_into_requests() {
        let frames = b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        assert_eq!(requests(frames, 2), Some(vec![(0, 14), (14, frames.len())]));
        assert_eq!(requests(frames, 1), None);
        assert_eq!(requests(frames, 3), None);
    }
}
