//! The router: takes a client's batch of requests as a plain shared actor would, sends each
//! request to the master that owns its keys (on one pipelined actor per node), and answers the
//! batch with every reply in the order the requests came, whichever nodes ran them.
//!
//! What a request becomes is decided once, when the batch arrives: a request for one slot goes
//! to that slot's master (all of a batch's requests for one node go as one message, in their
//! order, sent before any request that goes in parts); MGET, MSET, DEL, UNLINK, EXISTS and
//! TOUCH across slots are split by slot and merged; other requests across slots get
//! `-CROSSSLOT` here; DBSIZE, KEYS, FLUSHALL and the like go to every master and their replies
//! are combined; SCAN walks the masters one after the other with a cursor that names the
//! master; CLUSTER KEYSLOT is answered here.
//!
//! A client's batch whose requests all go to one node (the usual case: one request, one key)
//! is passed to that node's actor whole, with the client's own reply channel: when none of its
//! replies is an error, the actor answers the client itself, and the router never sees the
//! replies. Everything else a node's actor hands back to the router: the replies to what the
//! router split, and a passed-on batch's replies when one is an error (a redirect, or an
//! ordinary error) or the connection failed. They come back on one channel, each actor's in
//! the order its requests were written, so the router reads each node's replies in order. So
//! when a node answers `-MOVED` (Redis did not run the request) the resend to the new owner is
//! queued before any later request the router reads from that node, and requests for one slot
//! stay in order. `-ASK` is followed once with `ASKING`, `-TRYAGAIN` is retried with a growing
//! delay, a bounded number of times. A request whose node connection was lost is never
//! resent: it may have run.

pub(super) mod combine;
pub(super) mod direct;
pub(super) mod holds;
pub(super) mod redirects;
pub(super) mod relay;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::{
    sync::{mpsc, watch},
    time::{sleep_until, Instant},
};
use tracing::Instrument;

use self::{
    combine::{merge, random, requests},
    direct::{Direct, Returns, Table},
    holds::{Held, Holds, Token, Touch},
    relay::Relay,
};
use super::{Cluster, Topology};
use crate::{
    cluster::{
        keys::{self, Combine, Scope, SlotOf},
        plan::{Plan, CLUSTERDOWN, CROSSSLOT},
        reply::elements,
        slot::{slot, SLOTS},
    },
    resp::{encode_command, parse_int, Args},
    upstream::{Batch, Budget, Replies, Reply, ReplyTo, UpstreamError},
};

/// Messages taken off the channel at once.
const BATCH: usize = 256;
/// Redirects (MOVED, ASK) one request follows before its error goes to the client.
const MAX_REDIRECTS: u8 = 5;
/// `-TRYAGAIN` retries of one request before its error goes to the client.
const MAX_TRYAGAIN: u8 = 6;
/// The first TRYAGAIN delay; each retry doubles it (20 ms .. 640 ms, 1.26 s in all).
const TRYAGAIN_FIRST: Duration = Duration::from_millis(20);

/// The most bytes of a batch's requests for one node that are copied together to go as one
/// message; past it they go as one message per run of consecutive requests, uncopied.
const COPY_MAX: usize = 64 * 1024;

/// How often a router whose clients have all left looks whether the batches it passed on
/// are answered, so that it can end.
const LINGER: Duration = Duration::from_millis(100);
/// A fence (see [`holds`]).
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
/// Bits of a SCAN cursor given to the master's own cursor; the bits above name the master.
/// Redis's cursor never reaches them: it is below the size of the node's hash table.
const CURSOR_BITS: u32 = 56;

/// Starts a node actor for `host:port` and gives its channel; `None` once the set of upstream
/// connections that owns the router is gone. A router's actors get the way back to it for the
/// direct path's errors (see [`direct::Returns`]).
pub(in crate::upstream) type Spawner =
    Box<dyn Fn(&str, u16, Option<Returns>) -> Option<mpsc::Sender<Batch>> + Send + Sync>;

/// Starts a router on `rx`; its direct path (see [`direct`]).
pub(in crate::upstream) fn spawn(
    cluster: Arc<Cluster>,
    spawner: Spawner,
    rx: mpsc::Receiver<Batch>,
    id: usize,
) -> Arc<Direct> {
    let direct = Arc::new(Direct::new(cluster.clone()));
    let map_rx = cluster.subscribe();
    let topology = map_rx.borrow().clone();
    let (back, returns) = mpsc::unbounded_channel();
    let router = Router {
        rx,
        closed: false,
        back,
        returns,
        cluster,
        map_rx,
        map_open: true,
        topology,
        moved: HashMap::new(),
        nodes: Vec::new(),
        masters: Vec::new(),
        batches: HashMap::new(),
        next_batch: 0,
        retries: BTreeMap::new(),
        next_retry: 0,
        spawner,
        round_robin: 0,
        holds: Holds::default(),
        direct: direct.clone(),
        published: None,
        routing: 0,
    };
    let span = tracing::info_span!("cluster_router", id);
    tokio::spawn(router.run().instrument(span));
    direct
}

/// Where a node listens: shared by everything sent to it, for a redirect that names no host
/// (it means the node's own) and for a TRYAGAIN sent there again.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NodeAddr {
    pub(super) host: String,
    pub(super) port: u16,
}

/// One node's actor.
struct NodeConn {
    pub(super) addr: Arc<NodeAddr>,
    pub(super) sender: mpsc::Sender<Batch>,
    /// Messages waiting for room on `sender` (see [`relay`]).
    pub(super) relay: Option<Relay>,
}

/// Which part of a batch a message to a node answers.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// Requests `start..start + len` of the batch, back to back.
    Range { start: usize, len: usize },
    /// The requests of the batch the job's `picks` lists, in order: those of a pipeline that
    /// go to one node, sent as one message however the others interleave.
    Picked,
    /// Part `part` of request `index`, which was split or sent to several masters.
    Part { index: usize, part: usize },
    /// The parts of request `index` the job's `picks` lists, in order: all the parts of a
    /// split that go to one node, as one message.
    Parts { index: usize },
    /// No client's: a `PING` behind what a node was sent before a gate closed (see
    /// [`holds`]).
    Fence,
}

/// A message sent to a node, waiting for its replies.
#[derive(Debug)]
struct Job {
    /// The batch it answers (for a passed-on batch, given when it comes back).
    pub(super) batch: u64,
    pub(super) unit: Unit,
    /// The requests as the client sent them (without the ASKING put in front).
    pub(super) frames: Bytes,
    pub(super) redirects: u8,
    pub(super) tries: u8,
    /// `ASKING` went first: its `+OK` is not the client's.
    pub(super) asking: bool,
    /// A gate that stays closed while the job is on its way (see [`holds`]).
    pub(super) hold: Option<Token>,
    /// For [`Unit::Picked`], the index in the batch of each request; for [`Unit::Parts`],
    /// the number of each part; else empty.
    pub(super) picks: Vec<usize>,
}

impl Job {
    /// A new message for requests `frames` of `unit` of batch `batch`.
    fn new(batch: u64, unit: Unit, frames: Bytes) -> Job {
        Job {
            batch,
            unit,
            frames,
            redirects: 0,
            tries: 0,
            asking: false,
            hold: None,
            picks: Vec::new(),
        }
    }

    /// The requests it holds.
    fn len(&self) -> usize {
        match self.unit {
            Unit::Range { len, .. } => len,
            Unit::Picked | Unit::Parts { .. } => self.picks.len(),
            Unit::Part { .. } | Unit::Fence => 1,
        }
    }

    /// The index in the batch of its `k`th request (`k` below [`Job::len`]).
    fn index(&self, k: usize) -> usize {
        debug_assert!(k < self.len(), "request {k} of a job of {}", self.len());
        match self.unit {
            Unit::Range { start, .. } => start + k,
            Unit::Picked => self.picks.get(k).copied().unwrap_or(usize::MAX),
            Unit::Part { index, .. } | Unit::Parts { index } => index,
            Unit::Fence => usize::MAX,
        }
    }

    /// What its `k`th request (`k` below [`Job::len`]) answers, as a job of its own.
    fn unit_of(&self, k: usize) -> Unit {
        match self.unit {
            Unit::Parts { index } => Unit::Part {
                index,
                part: self.picks.get(k).copied().unwrap_or(usize::MAX),
            },
            Unit::Range { .. } | Unit::Picked | Unit::Part { .. } | Unit::Fence => Unit::Range {
                start: self.index(k),
                len: 1,
            },
        }
    }
}

/// The requests of a batch for one node, gathered while the batch is routed so that they go as
/// one message: the index and the bounds in the batch's frames of each.
struct Group {
    node: usize,
    requests: Vec<(usize, usize, usize)>,
}

/// How a node's actor hands the replies to a router's message back (see [`ReplyTo::Router`]).
#[derive(Debug)]
pub struct Routed {
    back: mpsc::UnboundedSender<Returned>,
    node: Arc<NodeAddr>,
    job: Job,
    /// A client's whole batch, passed on: the actor answers the client itself when no reply
    /// is an error.
    client: Option<Client>,
}

/// The client of a batch passed on whole to a node.
#[derive(Debug)]
struct Client {
    reply: ReplyTo,
    budget: Option<Arc<Budget>>,
    /// When the replies are due.
    deadline: Option<Instant>,
}

impl Client {
    /// A client's batch taken apart: its requests, how many, and where their replies go.
    fn of(batch: Batch) -> (Bytes, u32, Client) {
        let Batch {
            frames,
            count,
            queued_at,
            timeout,
            reply,
            budget,
        } = batch;
        let client = Client {
            reply,
            budget,
            deadline: timeout.and_then(|t| queued_at.checked_add(t)),
        };
        (frames, count, client)
    }
}

/// Replies a node's actor gave back to the router.
#[derive(Debug)]
struct Returned {
    node: Arc<NodeAddr>,
    job: Job,
    client: Option<Client>,
    reply: Reply,
}

impl Routed {
    pub(in crate::upstream) fn is_closed(&self) -> bool {
        match &self.client {
            Some(client) => client.reply.is_closed(),
            None => self.back.is_closed(),
        }
    }

    /// Called by the node's actor with the requests it wrote (see [`ReplyTo::written`]).
    pub(in crate::upstream) fn written(&mut self, frames: Bytes) {
        if self.keeps_written() {
            self.job.frames = frames;
        }
    }

    /// Whether its job went without its requests, to take them back once written.
    pub(in crate::upstream) fn keeps_written(&self) -> bool {
        self.job.frames.is_empty()
    }

    /// Called by the node's actor with the replies (or the error that ended them).
    pub(in crate::upstream) fn deliver(self, reply: Reply) {
        let Routed {
            back,
            node,
            job,
            client,
        } = self;
        // A reply past the 64th is not marked as an error: a batch that long is never
        // passed on whole.
        let clean = matches!(&reply, Ok(replies) if replies.errors == 0);
        match client {
            Some(client) if clean => client.reply.deliver(reply, client.budget.as_deref()),
            client => {
                let returned = Returned {
                    node,
                    job,
                    client,
                    reply,
                };
                // The router ends once every client of its target has left; a client that
                // left with a request on its way gets what the node said.
                if let Err(mpsc::error::SendError(returned)) = back.send(returned) {
                    if let Some(client) = returned.client {
                        client
                            .reply
                            .deliver(returned.reply, client.budget.as_deref());
                    }
                }
            }
        }
    }
}

/// A request to send again later (TRYAGAIN).
struct Retry {
    pub(super) node: Arc<NodeAddr>,
    pub(super) job: Job,
}

/// A client's batch, being answered: its replies as the nodes send them.
struct Answering {
    pub(super) reply: ReplyTo,
    pub(super) budget: Option<Arc<Budget>>,
    /// When the replies are due: resends get only what is left of it.
    pub(super) deadline: Option<Instant>,
    /// The reply of each request; a reply to a run of requests sits at its first request, and
    /// the others of the run hold empty bytes.
    pub(super) filled: Vec<Option<Bytes>>,
    pub(super) missing: usize,
    /// Which replies are errors (see [`Replies::errors`]).
    pub(super) errors: u64,
    pub(super) fanouts: HashMap<usize, Fanout>,
    /// Bytes held for it, charged to the client's output budget as they came: a client
    /// that does not read is stopped while the parts of its replies are still coming in, not
    /// once they are whole (see [`Router::over_limit`]).
    pub(super) charged: usize,
}

impl Answering {
    /// Counts `n` more bytes held for the client; `false` past its output limit.
    fn charge(&mut self, n: usize) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        self.charged += n;
        budget.charge(n)
    }

    /// `n` bytes held for the client were let go.
    fn refund(&mut self, n: usize) {
        if let Some(budget) = &self.budget {
            self.charged -= n;
            budget.refund(n);
        }
    }
}

/// A request answered from several parts.
struct Fanout {
    pub(super) merge: Merge,
    pub(super) parts: Vec<Option<Bytes>>,
    pub(super) missing: usize,
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
    pub(super) rx: mpsc::Receiver<Batch>,
    pub(super) closed: bool,
    /// Where the nodes' actors give replies back (see [`Routed`]).
    pub(super) back: mpsc::UnboundedSender<Returned>,
    pub(super) returns: mpsc::UnboundedReceiver<Returned>,
    pub(super) cluster: Arc<Cluster>,
    pub(super) map_rx: watch::Receiver<Option<Arc<Topology>>>,
    /// The map's sender lives: while it does, changes are followed.
    pub(super) map_open: bool,
    pub(super) topology: Option<Arc<Topology>>,
    /// Slots a `-MOVED` named a new owner for, since the map was last read.
    pub(super) moved: HashMap<u16, usize>,
    pub(super) nodes: Vec<NodeConn>,
    /// The node of each master of `topology`, once used.
    pub(super) masters: Vec<Option<usize>>,
    pub(super) batches: HashMap<u64, Answering>,
    pub(super) next_batch: u64,
    /// `-TRYAGAIN`ed jobs by when they are tried again (and a number, as two may be due at
    /// once): the router looks at the soonest on every turn.
    pub(super) retries: BTreeMap<(Instant, u64), Retry>,
    /// The number the next retry gets.
    pub(super) next_retry: u64,
    pub(super) spawner: Spawner,
    /// Where the next keyless request goes.
    pub(super) round_robin: usize,
    /// Requests waiting for those before them in their slot (see [`holds`]).
    pub(super) holds: Holds,
    /// The slot table sessions send one request by (see [`direct`]).
    pub(super) direct: Arc<Direct>,
    /// The `routing` the published table was made from; `None` while none is published.
    pub(super) published: Option<u64>,
    /// Counts changes to where requests go (a new map, a master's node started).
    pub(super) routing: u64,
}

impl Router {
    pub(super) async fn run(mut self) {
        let mut incoming = Vec::with_capacity(BATCH);
        let mut returned = Vec::with_capacity(BATCH);
        loop {
            // Every client has left and every batch answered here is done: the router ends
            // once the batches it passed on whole are answered too. Those it cannot see
            // (their replies go to the client), so it looks again from time to time.
            let done = self.closed && self.batches.is_empty();
            if done && self.back.strong_count() == 1 {
                return self.withdraw();
            }
            if self.holds.open() {
                self.release().await;
            }
            self.publish();
            let next_retry = self.retries.first_key_value().map(|(&(at, _), _)| at);
            let held_due = self.holds.next_deadline();
            // A gate's token dropped outside the router (an actor that ended with the fence
            // unanswered) wakes nothing: while a gate is closed the router looks from time to
            // time.
            let gated = self.holds.gated();
            tokio::select! {
                n = self.rx.recv_many(&mut incoming, BATCH), if !self.closed => {
                    self.closed = n == 0;
                    for request in incoming.drain(..) {
                        self.accept(request).await;
                    }
                }
                _ = self.returns.recv_many(&mut returned, BATCH) => {
                    for back in returned.drain(..) {
                        self.returned(back).await;
                    }
                }
                changed = self.map_rx.changed(), if self.map_open => match changed {
                    Ok(()) => self.new_map().await,
                    Err(_) => self.map_open = false,
                },
                _ = sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    self.retry_due().await;
                }
                _ = sleep_until(held_due.unwrap_or_else(Instant::now)), if held_due.is_some() => {
                    self.expire_held().await;
                }
                _ = tokio::time::sleep(LINGER), if done || gated => {}
            }
        }
    }

    /// Follows a new slot map: MOVED's corrections are part of it (or outdated), and nodes no
    /// longer masters are let go (their actors end once they have answered what they were
    /// sent). A slot whose requests went to another node than the map names now is gated
    /// until that node has answered what it was sent (see [`holds`]).
    pub(super) async fn new_map(&mut self) {
        self.withdraw();
        self.routing += 1;
        let topology = self.map_rx.borrow_and_update().clone();
        let masters: Vec<(String, u16)> = topology.as_ref().map_or_else(Vec::new, |t| {
            (0..t.map.masters().len())
                .filter_map(|at| t.master_addr(at))
                .collect()
        });
        for (node, slots) in self.leaving(topology.as_deref(), &masters) {
            self.fence(node, slots).await;
        }
        self.topology = topology;
        self.moved.clear();
        // A node dropped here finishes what it was sent before its actor ends.
        self.nodes.retain(|node| {
            masters
                .iter()
                .any(|(host, port)| node.addr.port == *port && node.addr.host == *host)
        });
        // The nodes kept are still the masters' nodes: where their slots' requests went,
        // for the next map's fences.
        self.masters = masters
            .iter()
            .map(|(host, port)| self.find(host, *port))
            .collect();
    }

    /// The nodes sent requests for slots that map `new` (whose masters are at `masters`) gives
    /// another node, each with those slots.
    fn leaving(
        &self,
        new: Option<&Topology>,
        masters: &[(String, u16)],
    ) -> HashMap<usize, Vec<u16>> {
        let mut leaving: HashMap<usize, Vec<u16>> = HashMap::new();
        let Some(new) = new else {
            return leaving;
        };
        for slot in 0..u16::try_from(SLOTS).unwrap_or(u16::MAX) {
            let Some((old, conn)) = self
                .sent_to(slot)
                .and_then(|old| Some((old, self.nodes.get(old)?)))
            else {
                continue;
            };
            // A slot the new map leaves without a master leaves its node too: when the next
            // map gives it one, nothing tells where its requests went before.
            let stays = new
                .map
                .owner(slot)
                .and_then(|owner| masters.get(owner))
                .is_some_and(|(host, port)| conn.addr.port == *port && conn.addr.host == *host);
            if !stays {
                leaving.entry(old).or_default().push(slot);
            }
        }
        leaving
    }

    /// The node `slot`'s requests go to, if any have gone: as the last MOVED said, else as
    /// the map says.
    fn sent_to(&self, slot: u16) -> Option<usize> {
        if let Some(&node) = self.moved.get(&slot) {
            return Some(node);
        }
        let owner = self.topology.as_ref()?.map.owner(slot)?;
        self.masters.get(owner).copied().flatten()
    }

    /// Gates `slots` until node `node` has answered everything it was sent so far.
    pub(super) async fn fence(&mut self, node: usize, slots: Vec<u16>) {
        self.withdraw();
        let hold = Some(self.holds.gate(slots, None));
        let job = Job {
            hold,
            ..Job::new(0, Unit::Fence, Bytes::from_static(PING))
        };
        self.post(node, job, None).await;
    }

    /// Publishes the slot table for the direct path while nothing is held back, made anew
    /// whenever where requests go has changed.
    fn publish(&mut self) {
        let quiet =
            self.holds.idle() && self.moved.is_empty() && self.retries.is_empty() && !self.closed;
        if !quiet {
            return self.withdraw();
        }
        let Some(topology) = self.topology.clone() else {
            return self.withdraw();
        };
        if self.published == Some(self.routing) {
            return;
        }
        let masters = (0..topology.map.masters().len())
            .map(|at| {
                let node = self.nodes.get(self.masters.get(at).copied().flatten()?)?;
                Some(node.sender.clone())
            })
            .collect();
        self.direct.set(Some(Table { topology, masters }));
        self.published = Some(self.routing);
    }

    /// Withdraws the direct path's table: sessions send through the router until it is
    /// published again. Called before anything changes where a slot's requests go.
    pub(super) fn withdraw(&mut self) {
        if self.published.take().is_some() {
            self.direct.set(None);
        }
    }

    /// The node for `host:port`, if it has an actor.
    fn find(&self, host: &str, port: u16) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.addr.port == port && n.addr.host == host)
    }

    /// The node for `host:port`, its actor started if it is new.
    pub(super) fn node(&mut self, host: &str, port: u16) -> Option<usize> {
        if let Some(at) = self.find(host, port) {
            return Some(at);
        }
        let addr = Arc::new(NodeAddr {
            host: host.to_owned(),
            port,
        });
        let returns = Returns {
            back: self.back.downgrade(),
            node: addr.clone(),
        };
        let sender = (self.spawner)(host, port, Some(returns))?;
        self.nodes.push(NodeConn {
            addr,
            sender,
            relay: None,
        });
        Some(self.nodes.len() - 1)
    }

    pub(super) fn master_count(&self) -> usize {
        self.topology.as_ref().map_or(0, |t| t.map.masters().len())
    }

    /// The node of master `at` of the map.
    pub(super) fn master(&mut self, at: usize) -> Option<usize> {
        if let Some(Some(node)) = self.masters.get(at) {
            return Some(*node);
        }
        let (host, port) = self.topology.as_ref()?.master_addr(at)?;
        let node = self.node(&host, port)?;
        if self.masters.len() <= at {
            self.masters.resize(at + 1, None);
        }
        self.masters[at] = Some(node);
        self.routing += 1;
        Some(node)
    }

    /// The node that serves `slot`: as the last MOVED said, else as the map says.
    pub(super) fn slot_node(&mut self, slot: u16) -> Option<usize> {
        if let Some(&node) = self.moved.get(&slot) {
            return Some(node);
        }
        let owner = self.topology.as_ref()?.map.owner(slot)?;
        self.master(owner)
    }

    /// Any master, taken in turn.
    pub(super) fn any_master(&mut self) -> Option<usize> {
        let masters = self.master_count();
        if masters == 0 {
            return None;
        }
        self.round_robin = (self.round_robin + 1) % masters;
        self.master(self.round_robin)
    }

    /// Takes a client's batch: passed on whole when every request goes to one node and
    /// none has to wait, else every request routed and each reply slot waiting or filled.
    pub(super) async fn accept(&mut self, request: Batch) {
        if request.reply.is_closed() {
            return;
        }
        let (frames, count, client) = Client::of(request);
        let (bounds, routes) = if count == 1 {
            let (route, touch) = self.route(&frames);
            if let (Route::Node(node), true) = (&route, self.holds.idle()) {
                return self.pass_on(*node, frames, 1, client).await;
            }
            (vec![(0, frames.len())], vec![(route, touch)])
        } else {
            let Some(bounds) = requests(&frames, count) else {
                return client
                    .reply
                    .deliver(Err(UpstreamError::ConnectionLost), None);
            };
            let routes: Vec<(Route, Touch)> = bounds
                .iter()
                .map(|&(from, to)| self.route(&frames[from..to]))
                .collect();
            if let (Some(node), true) = (one_node(&routes), self.holds.idle()) {
                return self.pass_on(node, frames, routes.len(), client).await;
            }
            (bounds, routes)
        };
        let count = bounds.len();
        let (deadline, owner) = (client.deadline, client.budget.clone());
        let id = self.open(client, count);
        // The requests for each node, sent once the batch is routed, or before a request
        // sent in parts (a part may be for the same slot as an earlier request).
        let mut groups: Vec<Group> = Vec::new();
        for (index, (&(from, to), (route, touch))) in bounds.iter().zip(routes).enumerate() {
            if !self.holds.idle() && self.holds.must_wait(touch, &owner) {
                // Sent later than those gathered: it waits for what was sent before it.
                let request = frames.slice(from..to);
                self.holds.push(Held {
                    batch: id,
                    index,
                    request,
                    touch,
                    deadline,
                    owner: owner.clone(),
                });
                continue;
            }
            match route {
                Route::Node(node) => match groups.iter_mut().find(|g| g.node == node) {
                    Some(group) => group.requests.push((index, from, to)),
                    None => groups.push(Group {
                        node,
                        requests: vec![(index, from, to)],
                    }),
                },
                Route::Local(bytes) => self.fill(id, index, bytes),
                route => {
                    self.send_groups(id, &mut groups, &frames).await;
                    self.dispatch(id, index, frames.slice(from..to), route)
                        .await
                }
            }
        }
        self.send_groups(id, &mut groups, &frames).await;
        self.finish_if_done(id);
    }

    /// Sends each node the requests of batch `id` gathered for it: a run of consecutive
    /// requests as a slice of the batch's `frames`, others copied together while they are
    /// small ([`COPY_MAX`]); larger ones go as one message per run, uncopied.
    async fn send_groups(&mut self, id: u64, groups: &mut Vec<Group>, frames: &Bytes) {
        for Group { node, requests } in groups.drain(..) {
            let size: usize = requests.iter().map(|&(_, from, to)| to - from).sum();
            let runs = requests.chunk_by(|&(a, _, _), &(b, _, _)| b == a + 1);
            if runs.clone().count() == 1 || size > COPY_MAX {
                for run in runs {
                    let (Some(&(start, from, _)), Some(&(_, _, to))) = (run.first(), run.last())
                    else {
                        continue;
                    };
                    let unit = Unit::Range {
                        start,
                        len: run.len(),
                    };
                    self.send(node, Job::new(id, unit, frames.slice(from..to)))
                        .await;
                }
                continue;
            }
            let mut wire = BytesMut::with_capacity(size);
            for &(_, from, to) in &requests {
                wire.put_slice(&frames[from..to]);
            }
            let job = Job {
                picks: requests.iter().map(|&(index, _, _)| index).collect(),
                ..Job::new(id, Unit::Picked, wire.freeze())
            };
            self.send(node, job).await;
        }
    }

    /// Does what `route` says with request `index` of batch `id`.
    async fn dispatch(&mut self, id: u64, index: usize, request: Bytes, route: Route) {
        match route {
            Route::Node(node) => {
                let unit = Unit::Range {
                    start: index,
                    len: 1,
                };
                self.send(node, Job::new(id, unit, request)).await;
            }
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
                // One message per node, however many slots of a split it serves: a split over
                // thousands of slots would otherwise fill the node's channel and its relay
                // with thousands of messages, and be refused as if the node were unavailable.
                let mut by_node: Vec<(usize, Vec<usize>, Vec<Bytes>)> = Vec::new();
                for (part, (node, request)) in parts.into_iter().enumerate() {
                    match by_node.iter_mut().find(|(n, _, _)| *n == node) {
                        Some((_, picks, requests)) => {
                            picks.push(part);
                            requests.push(request);
                        }
                        None => by_node.push((node, vec![part], vec![request])),
                    }
                }
                for (node, picks, requests) in by_node {
                    let job = match (picks.as_slice(), requests.as_slice()) {
                        ([part], [request]) => {
                            Job::new(id, Unit::Part { index, part: *part }, request.clone())
                        }
                        _ => Job {
                            picks,
                            ..Job::new(id, Unit::Parts { index }, requests.concat().into())
                        },
                    };
                    self.send(node, job).await;
                }
            }
        }
    }

    /// Sends the waiting requests whose turn has come, routed as things are now.
    pub(super) async fn release(&mut self) {
        for held in self.holds.release() {
            let (route, _) = self.route(&held.request);
            self.dispatch(held.batch, held.index, held.request, route)
                .await;
            self.finish_if_done(held.batch);
        }
    }

    /// The waiting requests whose time is up get a timeout, as if sent.
    pub(super) async fn expire_held(&mut self) {
        for held in self.holds.expired(Instant::now()) {
            self.fill(held.batch, held.index, UpstreamError::Timeout.replies(1));
            self.finish_if_done(held.batch);
        }
        self.release().await;
    }

    /// Starts answering a client's batch of `count` requests here; its id.
    pub(super) fn open(&mut self, client: Client, count: usize) -> u64 {
        let id = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        self.batches.insert(
            id,
            Answering {
                reply: client.reply,
                budget: client.budget,
                deadline: client.deadline,
                filled: vec![None; count],
                missing: count,
                errors: 0,
                fanouts: HashMap::new(),
                charged: 0,
            },
        );
        id
    }

    /// Passes a client's batch of `count` requests, all for node `node`, on to it whole.
    pub(super) async fn pass_on(
        &mut self,
        node: usize,
        frames: Bytes,
        count: usize,
        client: Client,
    ) {
        let unit = Unit::Range {
            start: 0,
            len: count,
        };
        self.post(node, Job::new(0, unit, frames), Some(client))
            .await;
    }

    /// A node's actor gave replies back: a batch passed on whole is answered here from now on.
    pub(super) async fn returned(&mut self, returned: Returned) {
        let Returned {
            node,
            mut job,
            client,
            reply,
        } = returned;
        if let Some(client) = client {
            job.batch = self.open(client, job.len());
        }
        self.answered(&node, job, reply).await;
    }

    /// Where one request goes, and what it acts on (nothing when redmux answers it).
    pub(super) fn route(&mut self, request: &[u8]) -> (Route, Touch) {
        match self.route_to(request) {
            (Route::Local(bytes), _) => (Route::Local(bytes), Touch::Nothing),
            routed => routed,
        }
    }

    fn route_to(&mut self, request: &[u8]) -> (Route, Touch) {
        let mut args = Args::new(request);
        let name = args.next().unwrap_or_default();
        if name.eq_ignore_ascii_case(b"cluster") {
            return (Route::Local(cluster_command(args)), Touch::Nothing);
        }
        let (scope, slot) = keys::scope_and_slot(request);
        let (node, touch) = match scope {
            Scope::Keys | Scope::ShardChannels => match slot {
                SlotOf::One(slot) => (self.slot_node(slot), Touch::Slot(slot)),
                SlotOf::None => (self.any_master(), Touch::All),
                SlotOf::Cross => return (self.cross_slot(request), Touch::All),
            },
            Scope::NoKeys => (self.any_master(), Touch::All),
            Scope::RandomMaster => {
                let masters = self.master_count().max(1);
                let at = usize::try_from(random() % masters as u64).unwrap_or_default();
                (self.master(at), Touch::All)
            }
            Scope::AllMasters(combine) => {
                let mut parts = Vec::new();
                for at in 0..self.master_count() {
                    match self.master(at) {
                        Some(node) => parts.push((node, Bytes::copy_from_slice(request))),
                        None => return (self.down(), Touch::All),
                    }
                }
                if parts.is_empty() {
                    return (self.down(), Touch::All);
                }
                return (Route::Fanout(Merge::Combine(combine), parts), Touch::All);
            }
            Scope::Scan => return (self.scan(request), Touch::All),
        };
        match node {
            Some(node) => (Route::Node(node), touch),
            None => (self.down(), touch),
        }
    }

    /// A request whose keys span slots: split if it is one of the commands that are sums of
    /// single-key work, else Redis Cluster's `-CROSSSLOT`.
    pub(super) fn cross_slot(&mut self, request: &[u8]) -> Route {
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
    pub(super) fn scan(&mut self, request: &[u8]) -> Route {
        let argv: Vec<&[u8]> = Args::new(request).collect();
        let masters = self.master_count();
        let Some(cursor) = argv.get(1).and_then(|c| scan_cursor(c)) else {
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
        let mut argv = argv;
        argv[1] = own.as_bytes();
        let Some(node) = self.master(master) else {
            return self.down();
        };
        Route::Fanout(
            Merge::Scan { master, masters },
            vec![(node, encode_command(argv))],
        )
    }

    /// No master serves the slot (the cluster is down, or its map unknown yet): Redis
    /// Cluster's own error, and a refresh.
    pub(super) fn down(&mut self) -> Route {
        self.cluster.request_refresh();
        Route::Local(Bytes::from_static(CLUSTERDOWN))
    }

    /// Sends `job` to node `node`.
    pub(super) async fn send(&mut self, node: usize, job: Job) {
        self.post(node, job, None).await;
    }

    /// Puts `job` on node `node`'s channel, with only what is left of its batch's time to
    /// answer: the time of `client`'s batch when it is one passed on whole.
    pub(super) async fn post(&mut self, node: usize, mut job: Job, client: Option<Client>) {
        let now = Instant::now();
        let deadline = match (&client, job.unit) {
            (Some(client), _) => client.deadline,
            // A fence waits as long as what it follows may.
            (None, Unit::Fence) => Some(now + self.cluster.request_timeout()),
            (None, _) => match self.batches.get(&job.batch) {
                Some(b) => b.deadline,
                None => return,
            },
        };
        let timeout = deadline.map(|d| d.saturating_duration_since(now));
        if timeout.is_some_and(|t| t.is_zero()) {
            return self.not_sent(job, client, UpstreamError::Timeout);
        }
        let Some(conn) = self.nodes.get_mut(node) else {
            return self.not_sent(job, client, UpstreamError::Unavailable);
        };
        if conn.relay.as_ref().is_some_and(Relay::drained) {
            conn.relay = None;
        }
        let len = job.len();
        // Without ASKING the actor gives the job its requests back once written (see
        // `ReplyTo::written`): no copy is kept meanwhile.
        let (wire, count) = if job.asking {
            let mut wire = BytesMut::with_capacity(job.frames.len() + 20);
            wire.put_slice(b"*1\r\n$6\r\nASKING\r\n");
            wire.put_slice(&job.frames);
            (wire.freeze(), len + 1)
        } else {
            (std::mem::take(&mut job.frames), len)
        };
        let routed = Routed {
            back: self.back.clone(),
            node: conn.addr.clone(),
            job,
            client,
        };
        let request = Batch {
            frames: wire,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            queued_at: now,
            timeout,
            reply: ReplyTo::Router(Box::new(routed)),
            budget: None,
        };
        if let Some(relay) = &conn.relay {
            // Behind what waits for room already.
            return relay.relay(request);
        }
        let refused = match conn.sender.try_send(request) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(request)) => {
                // The node is behind: its messages wait for room beside the router, which
                // goes on with the other nodes'.
                let relay = Relay::start(conn.sender.clone());
                relay.relay(request);
                conn.relay = Some(relay);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(request)) => request,
        };
        if let ReplyTo::Router(mut routed) = refused.reply {
            routed.written(refused.frames);
            let Routed { job, client, .. } = *routed;
            self.not_sent(job, client, UpstreamError::Unavailable);
        }
    }

    /// A job that could not be sent: its requests get `error`.
    pub(super) fn not_sent(&mut self, job: Job, client: Option<Client>, error: UpstreamError) {
        match client {
            Some(client) => client.reply.deliver(Err(error), None),
            None => self.fail(&job, error),
        }
    }

    /// Every request of `job` gets `error`.
    pub(super) fn fail(&mut self, job: &Job, error: UpstreamError) {
        let batch = job.batch;
        match job.unit {
            Unit::Range { .. } | Unit::Picked => {
                for k in 0..job.len() {
                    self.fill(batch, job.index(k), error.replies(1));
                }
            }
            Unit::Part { index, .. } | Unit::Parts { index } => {
                let Some(b) = self.batches.get_mut(&batch) else {
                    return;
                };
                // The other parts' replies are dropped when they come.
                if let Some(fanout) = b.fanouts.remove(&index) {
                    b.refund(fanout.parts.iter().flatten().map(Bytes::len).sum());
                    self.fill(batch, index, error.replies(1));
                }
            }
            Unit::Fence => {}
        }
    }

    pub(super) fn fill(&mut self, batch: u64, index: usize, reply: Bytes) {
        let error = matches!(reply.first(), Some(b'-' | b'!'));
        self.fill_range(batch, index, 1, reply, u64::from(error));
    }

    /// The replies of requests `start..start + len`, back to back.
    pub(super) fn fill_range(
        &mut self,
        batch: u64,
        start: usize,
        len: usize,
        bytes: Bytes,
        errors: u64,
    ) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        if !b.charge(bytes.len()) {
            return self.over_limit(batch);
        }
        let mut replaced = 0;
        for (k, slot) in b.filled.iter_mut().skip(start).take(len).enumerate() {
            let piece = if k == 0 { bytes.clone() } else { Bytes::new() };
            match slot.replace(piece) {
                Some(old) => replaced += old.len(),
                None => b.missing -= 1,
            }
        }
        b.refund(replaced);
        b.errors |= errors
            .checked_shl(u32::try_from(start).unwrap_or(64))
            .unwrap_or(0);
    }

    pub(super) fn fill_part(&mut self, batch: u64, index: usize, part: usize, reply: Bytes) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        if !b.fanouts.contains_key(&index) {
            return;
        }
        if !b.charge(reply.len()) {
            return self.over_limit(batch);
        }
        let Some(fanout) = b.fanouts.get_mut(&index) else {
            return;
        };
        let mut replaced = 0;
        if let Some(slot) = fanout.parts.get_mut(part) {
            match slot.replace(reply) {
                Some(old) => replaced = old.len(),
                None => fanout.missing -= 1,
            }
        }
        let missing = fanout.missing;
        b.refund(replaced);
        if missing > 0 {
            return;
        }
        let Some(fanout) = b.fanouts.remove(&index) else {
            return;
        };
        let parts: Vec<Bytes> = fanout.parts.into_iter().flatten().collect();
        // The merged reply is charged in place of its parts.
        b.refund(parts.iter().map(Bytes::len).sum());
        let merged = merge(&fanout.merge, &parts);
        self.fill(batch, index, merged);
    }

    /// Answers the client once every reply of its batch is in.
    pub(super) fn finish_if_done(&mut self, batch: u64) {
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
        let replies = Replies {
            bytes,
            errors: b.errors,
        };
        // Charged already, piece by piece.
        b.reply.deliver(Ok(replies), None);
    }

    /// The client's batch `batch` went past its output limit while its replies came in: it
    /// gets the error that closes it, and what was held for it is let go.
    pub(super) fn over_limit(&mut self, batch: u64) {
        let Some(mut b) = self.batches.remove(&batch) else {
            return;
        };
        b.refund(b.charged);
        b.reply.deliver(Err(UpstreamError::OutputLimit), None);
    }
}

/// The node every request of a batch goes to, if it is one, and the batch is short enough for
/// its errors to be marked (see [`Replies::errors`]).
fn one_node(routes: &[(Route, Touch)]) -> Option<usize> {
    if routes.len() > 64 {
        return None;
    }
    let mut nodes = routes.iter().map(|(route, _)| match route {
        Route::Node(node) => Some(*node),
        _ => None,
    });
    let first = nodes.next()??;
    nodes.all(|node| node == Some(first)).then_some(first)
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

/// A SCAN cursor as Redis reads one (`parseScanCursorOrReply`: `strtoul` in base 10 on the
/// argument up to a NUL): an optional sign, then digits; `-n` wraps as an unsigned number
/// does, so `-1` is 2^64−1; no space, nothing after, no overflow. `None`: Redis's "invalid
/// cursor" (the request then goes to a master as it is, which says so).
fn scan_cursor(arg: &[u8]) -> Option<u64> {
    let arg = crate::command::c_string(arg);
    let (negative, digits) = match arg.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, arg),
    };
    // `strtoul` converts nothing from an empty string and leaves it whole: cursor 0. A lone
    // sign is left unread, which Redis refuses.
    if digits.is_empty() {
        return arg.is_empty().then_some(0);
    }
    let mut cursor: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        cursor = cursor.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(if negative {
        cursor.wrapping_neg()
    } else {
        cursor
    })
}

#[cfg(test)]
mod tests {
    use super::{
        combine::{combined, scan_reply},
        *,
    };

    #[test]
    fn scan_cursors_are_read_as_strtoul_reads_them() {
        assert_eq!(scan_cursor(b"0"), Some(0));
        assert_eq!(scan_cursor(b"17"), Some(17));
        assert_eq!(scan_cursor(b"+5"), Some(5));
        assert_eq!(scan_cursor(b"-1"), Some(u64::MAX));
        assert_eq!(scan_cursor(b"-0"), Some(0));
        assert_eq!(scan_cursor(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(scan_cursor(b"18446744073709551616"), None);
        assert_eq!(scan_cursor(b""), Some(0));
        assert_eq!(scan_cursor(b"5\0x"), Some(5));
        for invalid in [&b"-"[..], b"+", b" 1", b"1 ", b"1x", b"0x1", b"1.0"] {
            assert_eq!(scan_cursor(invalid), None, "{invalid:?}");
        }
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
