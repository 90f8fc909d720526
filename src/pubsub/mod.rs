//! Pub/sub: subscriber hubs, each owning one upstream subscriber connection, and the fan-out of
//! its messages.
//!
//! A hub serves the clients of one identity (redmux's own, or one ACL user's): each channel,
//! pattern or shard channel is subscribed upstream once, however many of its clients want it,
//! and unsubscribed when the last of them leaves. Clients build their own confirmations and
//! counts in their session, exactly as Redis would send them; the hub answers each of a
//! client's (un)subscriptions, in the order the client sent them, in the client's inbox, at the
//! point of the upstream stream where Redis gave the answer (see [`Delivery`]). So a client
//! gets its messages and confirmations in the order Redis would have sent them on a connection
//! of its own: no message for a new subscription before its confirmation, none that Redis sent
//! before the confirmation after it. Messages go to each subscriber's inbox, which is bounded
//! in bytes: a subscriber with more than `client_output_limit` bytes of messages waiting is cut
//! off (as Redis's pubsub output-buffer limit does), never buffered without bound.
//!
//! Redis may refuse a (P|S)SUBSCRIBE as a whole: an ACL user without permission for one of its
//! names gets `-NOPERM ...` and is subscribed to none of them. So each client request's names
//! go upstream as their own command(s), never merged with another client's: a refusal is that
//! request's answer, and the names it shares with others that were waiting on it are sent again
//! on their own.
//!
//! One client may name a million channels in one request, so nothing here costs more than
//! constant work per name, and every loop over names, frames or subscribers gives the runtime
//! back its thread now and then (`consume_budget`): the hub shares that thread with every
//! client session.

pub mod glob;
mod hubs;
pub mod registry;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, oneshot, watch},
    task::coop::consume_budget,
    time::{interval, sleep, Instant, MissedTickBehavior},
};
use tracing::{info, warn, Instrument};

pub use hubs::Hubs;
pub use registry::Registry;

use crate::command::Namespace;

use crate::{
    io::Budget,
    resp::{encode_command, Args, ReplyScanner},
    upstream::{self, Dial, Replies, Reply, Setup, Timeouts, UpstreamError},
};

/// Hub requests waiting at once.
const HUB_CAPACITY: usize = 4096;
/// How often subscribers that left without a word are looked for.
const SWEEP: Duration = Duration::from_millis(500);
/// Most names in one (UN)SUBSCRIBE sent upstream: a command is encoded in one go, so a long
/// list goes as several commands, with a chance for others to run between them.
const NAMES_PER_COMMAND: usize = 1024;
/// Most reply bytes the hub lets Redis owe it for (un)subscriptions. Redis drops a subscriber
/// connection whose unread output passes its pubsub limit (`client-output-buffer-limit`,
/// 32 MB by default), and a million names are answered with 40 MB: sent all at once they
/// would cost every subscriber its connection, again at each reconnect.
const WINDOW: usize = 128 * 1024;
/// What Redis's confirmation of one name takes besides the name: `*3`, the verb, the count.
const REPLY_OVERHEAD: usize = 40;

/// A subscription: its kind and name.
pub type Key = (Namespace, Bytes);

/// What a frame in a subscriber's inbox is. Besides Redis's messages, the hub puts there the
/// answer to each of the client's (un)subscriptions, in the order the client sent them, where
/// the upstream stream gave it: an empty frame when it is done (the session has the
/// confirmation frames), or Redis's error when Redis refused it. Messages are never empty and
/// never errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Message,
    Done,
    Refused,
}

impl Delivery {
    pub fn of(frame: &[u8]) -> Delivery {
        match frame.first() {
            None => Delivery::Done,
            Some(b'-') => Delivery::Refused,
            Some(_) => Delivery::Message,
        }
    }
}

#[derive(Debug)]
enum HubRequest {
    /// Subscribe `client` to `names` (none of which it holds); answered in its inbox.
    Subscribe {
        client: u64,
        kind: Namespace,
        names: Vec<Bytes>,
        /// The client's inbox, when the session has just made it: the hub then holds the only
        /// sender, until the client leaves or is cut off.
        inbox: Option<Inbox>,
    },
    /// Unsubscribe `client` from `names` (each of which it holds); answered in its inbox once
    /// what nobody else wants is unsubscribed upstream, so that Redis's counts no longer
    /// include it when the client's next request runs.
    Unsubscribe {
        client: u64,
        kind: Namespace,
        names: Vec<Bytes>,
    },
    /// The client left, RESET, or holds nothing any more: drop it and all its subscriptions.
    /// `done`, if given, hears once what nobody else wants is unsubscribed upstream.
    Leave {
        client: u64,
        done: Option<oneshot::Sender<Reply>>,
    },
}

/// The sending side of a subscriber's inbox, with the bytes queued in it.
#[derive(Debug)]
pub struct Inbox {
    pub tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes sent and not yet taken by the session, which refunds what it takes, and the most
    /// that may wait (the client's `client_output_limit`, which a reload may change).
    pub queued: Arc<Budget>,
    /// Fired when the sender gives up on a client past its limit. The session hears it at once,
    /// whatever it still has to write: a client that does not read would never drain the inbox
    /// to find it closed, and would keep what is queued there and in its session for as long as
    /// it stays connected. Dropped unfired when the sender simply lets go.
    pub cut: oneshot::Sender<()>,
}

/// What the hub holds, for `/status` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Subscribed upstream, each once however many clients want it.
    pub channels: u64,
    pub patterns: u64,
    pub shard_channels: u64,
    /// Clients subscribed to anything.
    pub clients: u64,
}

impl Counts {
    fn of(&mut self, kind: Namespace) -> &mut u64 {
        match kind {
            Namespace::Channel => &mut self.channels,
            Namespace::Pattern => &mut self.patterns,
            Namespace::Shard => &mut self.shard_channels,
        }
    }
}

/// A handle to the hub; cheap to clone.
#[derive(Debug, Clone)]
pub struct PubSub {
    tx: mpsc::Sender<HubRequest>,
    counts: watch::Receiver<Counts>,
}

impl PubSub {
    /// Starts the hub; it connects upstream on first use and stops when every handle is gone.
    /// What it holds in Redis, and what its clients hold, are counted in `registry`.
    pub fn start(
        endpoint: Dial,
        timeouts: Timeouts,
        ping: bool,
        registry: Arc<Registry>,
    ) -> PubSub {
        let (tx, rx) = mpsc::channel(HUB_CAPACITY);
        let (counts_tx, counts) = watch::channel(Counts::default());
        let hub = Hub {
            counts: Counts::default(),
            counts_tx,
            endpoint,
            timeouts,
            ping,
            rx,
            connected: false,
            wanted: HashMap::new(),
            clients: HashMap::new(),
            active: HashSet::new(),
            upstream: HashSet::new(),
            in_flight: HashMap::new(),
            waiters: HashMap::new(),
            waiting: HashMap::new(),
            next_waiter: 0,
            ready: Vec::new(),
            cut_off: Vec::new(),
            progress: Instant::now(),
            outbox: Outbox::default(),
            registry,
        };
        tokio::spawn(hub.run().instrument(tracing::info_span!("pubsub")));
        PubSub { tx, counts }
    }

    /// A handle that does not keep the hub alive.
    pub fn downgrade(&self) -> WeakPubSub {
        WeakPubSub {
            tx: self.tx.downgrade(),
            counts: self.counts.clone(),
        }
    }

    /// What the hub holds now.
    pub fn counts(&self) -> Counts {
        *self.counts.borrow()
    }

    /// Subscribes `client` to `names`, which it does not hold yet; the answer comes in its
    /// inbox (see [`Delivery`]). A hub that is gone drops the request, and with it the inbox:
    /// the session then learns the loss from its inbox.
    pub async fn subscribe(
        &self,
        client: u64,
        kind: Namespace,
        names: Vec<Bytes>,
        inbox: Option<Inbox>,
    ) {
        let request = HubRequest::Subscribe {
            client,
            kind,
            names,
            inbox,
        };
        let _ = self.tx.send(request).await;
    }

    /// Unsubscribes `client` from `names`, which it holds; answered in its inbox.
    pub async fn unsubscribe(&self, client: u64, kind: Namespace, names: Vec<Bytes>) {
        let _ = self
            .tx
            .send(HubRequest::Unsubscribe {
                client,
                kind,
                names,
            })
            .await;
    }

    /// The client leaves: everything it held is dropped.
    pub async fn leave(&self, client: u64) {
        let _ = self.tx.send(HubRequest::Leave { client, done: None }).await;
    }

    /// The client RESETs: as [`PubSub::leave`], and the receiver completes once Redis has
    /// unsubscribed what nobody else wants (at once if nothing), so that its counts no longer
    /// include the client's subscriptions when its next request runs.
    pub async fn reset(&self, client: u64) -> oneshot::Receiver<Reply> {
        let (done, rx) = oneshot::channel();
        let _ = self
            .tx
            .send(HubRequest::Leave {
                client,
                done: Some(done),
            })
            .await;
        rx
    }

    /// The client holds nothing any more and has dropped its inbox: the hub forgets it now if
    /// its queue has room, else at its next sweep (or when the client subscribes again).
    pub fn forget(&self, client: u64) {
        let _ = self.tx.try_send(HubRequest::Leave { client, done: None });
    }
}

/// A hub that may have stopped: it stops once no [`PubSub`] handle is left.
#[derive(Debug, Clone)]
pub struct WeakPubSub {
    tx: mpsc::WeakSender<HubRequest>,
    counts: watch::Receiver<Counts>,
}

impl WeakPubSub {
    pub fn upgrade(&self) -> Option<PubSub> {
        Some(PubSub {
            tx: self.tx.upgrade()?,
            counts: self.counts.clone(),
        })
    }

    pub fn alive(&self) -> bool {
        self.tx.strong_count() > 0
    }
}

#[derive(Debug)]
struct Subscriber {
    inbox: Inbox,
    /// What it wants, confirmed to it or not.
    subscriptions: HashSet<Key>,
    /// Its (un)subscriptions not answered yet, oldest first: each is answered once every
    /// earlier one is, as Redis answers a connection's commands in order.
    queue: VecDeque<u64>,
}

/// Where a waiter's answer goes.
#[derive(Debug)]
enum Answer {
    /// The client's inbox, in the order of its queue.
    Inbox,
    /// A RESET waiting for its unsubscriptions (the client has left the hub already).
    Reset(oneshot::Sender<Reply>),
}

/// A client's (un)subscription not answered yet.
#[derive(Debug)]
struct Waiter {
    client: u64,
    subscribe: bool,
    /// The names a subscription added for the client: live for it once it is answered,
    /// taken back if it is refused.
    names: Vec<Key>,
    /// Names not active upstream yet, each listed in `Hub::waiting`.
    missing: HashSet<Key>,
    /// Requests of its own in the outbox (sent or not) that Redis has not wholly answered.
    own: u32,
    /// Redis's refusal (or redmux's error), once known: the answer.
    refused: Option<Bytes>,
    answer: Answer,
    /// When it arrived. It fails `connect_timeout` later while there is no connection, and
    /// `request_timeout` after that or the connection's last sign of life, whichever is later:
    /// Redis may take a while to confirm a million names, and is not stuck while it does.
    since: Instant,
}

impl Waiter {
    fn done(&self) -> bool {
        self.refused.is_some() || (self.missing.is_empty() && self.own == 0)
    }
}

struct Hub {
    endpoint: Dial,
    timeouts: Timeouts,
    ping: bool,
    rx: mpsc::Receiver<HubRequest>,
    /// Whether there is an upstream connection.
    connected: bool,
    /// Who wants each subscription: each client, with the waiter whose answer makes it live
    /// for that client (`None` once live). Messages go to live clients only: a client gets
    /// none for a subscription before its confirmation.
    wanted: HashMap<Key, HashMap<u64, Option<u64>>>,
    clients: HashMap<u64, Subscriber>,
    /// Subscriptions the upstream has confirmed on the current connection.
    active: HashSet<Key>,
    /// What Redis has the connection subscribed to, as its frames say: what the registry
    /// counts for this hub.
    upstream: HashSet<Key>,
    /// SUBSCRIBEs queued or sent and not yet answered, per key. Only the confirmation of the
    /// last one counts: an earlier one may be followed by an UNSUBSCRIBE that Redis has still
    /// to run.
    in_flight: HashMap<Key, u32>,
    waiters: HashMap<u64, Waiter>,
    /// The waiters each key keeps waiting: a confirmation touches only those, not every waiter.
    waiting: HashMap<Key, Vec<u64>>,
    next_waiter: u64,
    /// Waiters that may be done: answered, in their client's order, before the next frame is
    /// looked at.
    ready: Vec<u64>,
    /// Clients cut off while messages were dispatched, with their subscriptions: dropped, and
    /// unsubscribed upstream where nobody else wants them, right after the dispatch.
    cut_off: Vec<(u64, HashSet<Key>)>,
    /// When the connection last read something, was made, or was sent subscriptions to
    /// confirm: Redis is stuck if it answers nothing for `request_timeout` after that.
    progress: Instant,
    /// (Un)subscriptions for the current connection, sent a window at a time.
    outbox: Outbox,
    /// `wanted` and `clients` counted, kept up to date as they change.
    counts: Counts,
    counts_tx: watch::Sender<Counts>,
    registry: Arc<Registry>,
}

/// The upstream connection, while there is one.
type Conn = (upstream::Reader, upstream::Writer);

impl Hub {
    async fn run(mut self) {
        let mut conn: Option<Conn> = None;
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let mut scanner = ReplyScanner::new();
        let mut sweep = interval(SWEEP);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            if conn.is_none() && self.connected {
                self.lost().await;
            }
            if conn.is_none() && !self.wanted.is_empty() {
                let setup = Setup {
                    db: 0,
                    resp3: false,
                    ping: self.ping,
                };
                match upstream::connect(&self.endpoint, setup, self.timeouts.connect).await {
                    Ok((reader, writer)) => {
                        info!("pub/sub connection up");
                        failures = 0;
                        rbuf.clear();
                        scanner.reset();
                        self.connected = true;
                        self.resubscribe().await;
                        conn = Some((reader, writer));
                        self.progress = Instant::now();
                    }
                    Err(error) => {
                        if failures == 0 {
                            warn!(%error, "cannot open the pub/sub connection; retrying");
                        }
                        failures = failures.saturating_add(1);
                        self.expire_waiters().await;
                        sleep(Duration::from_millis(100).min(self.timeouts.connect)).await;
                        continue;
                    }
                }
            }
            self.flush(&mut conn).await;
            if conn.is_none() && self.connected {
                continue;
            }
            // Not biased towards requests: a steady stream of them must not starve the reads,
            // or Redis would drop the subscriber connection past its own output limit. A
            // message that follows a client's UNSUBSCRIBE here is dropped by its session.
            tokio::select! {
                read = read_some(conn.as_mut(), &mut rbuf) => match read {
                    Ok(n) if n > 0 => {
                        self.progress = Instant::now();
                        if let Err(error) = self.dispatch(&mut rbuf, &mut scanner).await {
                            warn!(%error, "malformed pub/sub traffic; reconnecting");
                            conn = None;
                        }
                        self.drop_cut_off().await;
                        self.publish_counts();
                    }
                    _ => {
                        warn!("pub/sub connection lost; reconnecting");
                        conn = None;
                    }
                },
                request = self.rx.recv() => {
                    let Some(request) = request else { return };
                    self.handle(request).await;
                    self.drop_cut_off().await;
                    self.publish_counts();
                }
                _ = sweep.tick() => {
                    self.expire_waiters().await;
                    let gone: Vec<u64> = self
                        .clients
                        .iter()
                        .filter(|(_, s)| s.inbox.tx.is_closed())
                        .map(|(id, _)| *id)
                        .collect();
                    for client in gone {
                        self.remove_client(client, None).await;
                    }
                    self.drop_cut_off().await;
                    self.publish_counts();
                }
            }
        }
    }

    /// A new connection subscribes to everything wanted now.
    async fn resubscribe(&mut self) {
        self.active.clear();
        self.in_flight.clear();
        self.outbox = Outbox::default();
        let mut all: [Vec<Bytes>; 3] = Default::default();
        for (kind, name) in self.wanted.keys() {
            *self.in_flight.entry((*kind, name.clone())).or_default() += 1;
            let i = match kind {
                Namespace::Channel => 0,
                Namespace::Pattern => 1,
                Namespace::Shard => 2,
            };
            all[i].push(name.clone());
            consume_budget().await;
        }
        for (kind, names) in [Namespace::Channel, Namespace::Pattern, Namespace::Shard]
            .into_iter()
            .zip(all)
        {
            self.outbox.push(kind, true, names, None);
        }
    }

    /// The connection is gone, and with it everything it was subscribed to in Redis; requests
    /// sent on it will never be answered. Unsubscriptions are done (nothing is subscribed any
    /// more); subscriptions wait for the next connection.
    async fn lost(&mut self) {
        self.connected = false;
        for key in self.upstream.drain() {
            self.registry.hub(&key, false);
            consume_budget().await;
        }
        self.active.clear();
        self.in_flight.clear();
        self.outbox = Outbox::default();
        for (id, waiter) in &mut self.waiters {
            waiter.own = 0;
            if waiter.done() {
                self.ready.push(*id);
            }
        }
        self.answer_ready().await;
        self.drop_cut_off().await;
        self.publish_counts();
    }

    /// Takes a client's request; what it means upstream is queued if connected (else the
    /// next connection subscribes to everything wanted then).
    async fn handle(&mut self, request: HubRequest) {
        match request {
            HubRequest::Subscribe {
                client,
                kind,
                names,
                inbox,
            } => self.subscribe(client, kind, names, inbox).await,
            HubRequest::Unsubscribe {
                client,
                kind,
                names,
            } => self.unsubscribe(client, kind, names).await,
            HubRequest::Leave { client, done } => self.remove_client(client, done).await,
        }
        self.answer_ready().await;
    }

    async fn subscribe(
        &mut self,
        client: u64,
        kind: Namespace,
        names: Vec<Bytes>,
        inbox: Option<Inbox>,
    ) {
        let entry = match (self.clients.get_mut(&client), inbox) {
            (Some(entry), None) => entry,
            // The session made a new inbox: it dropped the one the hub had.
            (Some(entry), Some(inbox)) => {
                entry.inbox = inbox;
                entry
            }
            (None, Some(inbox)) => self.clients.entry(client).or_insert(Subscriber {
                inbox,
                subscriptions: HashSet::new(),
                queue: VecDeque::new(),
            }),
            // Cut off meanwhile: the session learns it from its inbox.
            (None, None) => return,
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        entry.queue.push_back(id);
        let mut added = Vec::new();
        let mut new = Vec::new();
        // What this request waits for: its own names that are not active yet. Names of
        // earlier requests are waited for by those requests, answered first.
        let mut missing = HashSet::new();
        for name in names {
            let key = (kind, name);
            if !entry.subscriptions.insert(key.clone()) {
                continue;
            }
            let wanted = self.wanted.entry(key.clone()).or_default();
            if wanted.is_empty() {
                *self.counts.of(kind) += 1;
                new.push(key.1.clone());
            }
            wanted.insert(client, Some(id));
            if !self.active.contains(&key) {
                self.waiting.entry(key.clone()).or_default().push(id);
                missing.insert(key.clone());
            }
            added.push(key);
            consume_budget().await;
        }
        let own = u32::from(self.connected && !new.is_empty());
        if own > 0 {
            for name in &new {
                *self.in_flight.entry((kind, name.clone())).or_default() += 1;
                consume_budget().await;
            }
            self.outbox.push(kind, true, new, Some(id));
        }
        self.waiters.insert(
            id,
            Waiter {
                client,
                subscribe: true,
                names: added,
                missing,
                own,
                refused: None,
                answer: Answer::Inbox,
                since: Instant::now(),
            },
        );
        self.ready.push(id);
    }

    async fn unsubscribe(&mut self, client: u64, kind: Namespace, names: Vec<Bytes>) {
        let Some(entry) = self.clients.get_mut(&client) else {
            return;
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        entry.queue.push_back(id);
        let mut gone = Vec::new();
        for name in names {
            let key = (kind, name);
            if entry.subscriptions.remove(&key) {
                gone.push(key);
            }
            consume_budget().await;
        }
        let unwanted = self.release(client, gone).await;
        let own = self.push_by_kind(unwanted, false, Some(id));
        self.waiters.insert(
            id,
            Waiter {
                client,
                subscribe: false,
                names: Vec::new(),
                missing: HashSet::new(),
                own,
                refused: None,
                answer: Answer::Inbox,
                since: Instant::now(),
            },
        );
        self.ready.push(id);
    }

    /// Drops a client and everything it held; `done` hears when Redis has unsubscribed what
    /// nobody else wants.
    async fn remove_client(&mut self, client: u64, done: Option<oneshot::Sender<Reply>>) {
        let subscriptions = match self.clients.remove(&client) {
            Some(entry) => {
                // Its unanswered requests: the session that sent them has let them go.
                for id in entry.queue {
                    self.waiters.remove(&id);
                }
                entry.subscriptions
            }
            None => HashSet::new(),
        };
        let unwanted = self
            .release(client, subscriptions.into_iter().collect())
            .await;
        let Some(done) = done else {
            self.push_by_kind(unwanted, false, None);
            return;
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        let own = self.push_by_kind(unwanted, false, Some(id));
        self.waiters.insert(
            id,
            Waiter {
                client,
                subscribe: false,
                names: Vec::new(),
                missing: HashSet::new(),
                own,
                refused: None,
                answer: Answer::Reset(done),
                since: Instant::now(),
            },
        );
        self.ready.push(id);
    }

    /// Removes the clients cut off by the last dispatch from every subscription they had.
    async fn drop_cut_off(&mut self) {
        while !self.cut_off.is_empty() {
            for (client, subscriptions) in std::mem::take(&mut self.cut_off) {
                let unwanted = self
                    .release(client, subscriptions.into_iter().collect())
                    .await;
                self.push_by_kind(unwanted, false, None);
            }
            self.answer_ready().await;
        }
    }

    /// Removes `client` from each subscription in `keys`; returns those nobody wants any more
    /// that Redis has, or may have, subscribed: they are to be unsubscribed upstream.
    async fn release(&mut self, client: u64, keys: Vec<Key>) -> Vec<Key> {
        let mut unwanted = Vec::new();
        for key in keys {
            if let Some(key) = self.release_one(client, key) {
                unwanted.push(key);
            }
            consume_budget().await;
        }
        unwanted
    }

    fn release_one(&mut self, client: u64, key: Key) -> Option<Key> {
        let wanted = self.wanted.get_mut(&key)?;
        if let Some(None) = wanted.remove(&client) {
            self.registry.client(&key, false);
        }
        if !wanted.is_empty() {
            return None;
        }
        self.wanted.remove(&key);
        let count = self.counts.of(key.0);
        *count = count.saturating_sub(1);
        self.active.remove(&key);
        // A client that subscribed and unsubscribed before the upstream answered gets its
        // confirmation all the same, as from Redis.
        self.satisfy(&key);
        (self.in_flight.contains_key(&key) || self.upstream.contains(&key)).then_some(key)
    }

    /// Queues (un)subscriptions of `keys`, one request per kind; returns how many.
    fn push_by_kind(&mut self, keys: Vec<Key>, subscribe: bool, origin: Option<u64>) -> u32 {
        if !self.connected || keys.is_empty() {
            return 0;
        }
        let mut by_kind: [Vec<Bytes>; 3] = Default::default();
        for (kind, name) in keys {
            let i = match kind {
                Namespace::Channel => 0,
                Namespace::Pattern => 1,
                Namespace::Shard => 2,
            };
            if subscribe {
                *self.in_flight.entry((kind, name.clone())).or_default() += 1;
            }
            by_kind[i].push(name);
        }
        let mut pushed = 0;
        for (kind, names) in [Namespace::Channel, Namespace::Pattern, Namespace::Shard]
            .into_iter()
            .zip(by_kind)
        {
            if !names.is_empty() {
                self.outbox.push(kind, subscribe, names, origin);
                pushed += 1;
            }
        }
        pushed
    }

    /// Sends what the window allows of the outbox. A failed write loses the connection.
    async fn flush(&mut self, conn: &mut Option<Conn>) {
        let Some((_, writer)) = conn.as_mut() else {
            return;
        };
        let out = self.outbox.next_commands().await;
        if out.is_empty() {
            return;
        }
        let written = async {
            writer.write_all(&out).await?;
            writer.flush().await
        };
        match written.await {
            // Redis has something to answer from now on.
            Ok(()) => self.progress = Instant::now(),
            Err(error) => {
                warn!(%error, "pub/sub connection lost; reconnecting");
                *conn = None;
            }
        }
    }

    /// Handles every complete frame the subscriber connection sent, answering each waiter as
    /// soon as the frame that completes it is in: before the next message is delivered.
    async fn dispatch(
        &mut self,
        rbuf: &mut BytesMut,
        scanner: &mut ReplyScanner,
    ) -> Result<(), crate::resp::ReplyError> {
        while let Some(end) = scanner.next_reply(rbuf)? {
            let frame = rbuf.split_to(end).freeze();
            scanner.consumed(end);
            consume_budget().await;
            if frame.first() == Some(&b'-') {
                // Redis refused a whole (UN)SUBSCRIBE: an ACL's -NOPERM.
                if let Some(sent) = self.outbox.refused() {
                    self.refused(sent, frame).await;
                }
                self.answer_ready().await;
                continue;
            }
            let mut args = Args::new(&frame);
            let (Some(what), Some(name)) = (args.next(), args.next()) else {
                continue;
            };
            let (kind, subscribe) = match what {
                b"message" | b"pmessage" | b"smessage" => {
                    let kind = match what {
                        b"message" => Namespace::Channel,
                        b"pmessage" => Namespace::Pattern,
                        _ => Namespace::Shard,
                    };
                    let key = (kind, Bytes::copy_from_slice(name));
                    self.deliver(&key, &frame).await;
                    continue;
                }
                b"subscribe" => (Namespace::Channel, true),
                b"psubscribe" => (Namespace::Pattern, true),
                b"ssubscribe" => (Namespace::Shard, true),
                b"unsubscribe" => (Namespace::Channel, false),
                b"punsubscribe" => (Namespace::Pattern, false),
                b"sunsubscribe" => (Namespace::Shard, false),
                _ => continue,
            };
            let key = (kind, Bytes::copy_from_slice(name));
            if subscribe {
                if self.upstream.insert(key.clone()) {
                    self.registry.hub(&key, true);
                }
                self.confirmed(key);
            } else if self.upstream.remove(&key) {
                self.registry.hub(&key, false);
            }
            if let Some(sent) = self.outbox.answered() {
                self.command_done(&sent);
            }
            self.answer_ready().await;
        }
        Ok(())
    }

    /// Redis has answered every name of a command.
    fn command_done(&mut self, sent: &Sent) {
        if let (Some(id), true) = (sent.origin, sent.last) {
            if let Some(waiter) = self.waiters.get_mut(&id) {
                waiter.own = waiter.own.saturating_sub(1);
                self.ready.push(id);
            }
        }
    }

    /// Redis refused a command as a whole.
    async fn refused(&mut self, sent: Sent, error: Bytes) {
        if !sent.subscribe {
            // UNSUBSCRIBE is never refused for its channels; a user without the command may
            // not unsubscribe, and there is nothing else to do.
            self.command_done(&sent);
            return;
        }
        let keys: Vec<Key> = sent
            .names
            .into_iter()
            .map(|name| (sent.kind, name))
            .collect();
        for key in &keys {
            if let Some(count) = self.in_flight.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.in_flight.remove(key);
                }
            }
        }
        match sent.origin {
            // A client's own request: refused as Redis would have refused it.
            Some(id) => self.fail(id, error).await,
            // Sent again for others (or by a new connection): one at a time, to find which
            // name Redis refuses.
            None if keys.len() > 1 => {
                for key in keys {
                    if self.orphaned(&key) {
                        self.push_by_kind(vec![key], true, None);
                    }
                    consume_budget().await;
                }
                return;
            }
            None => {
                if let Some(key) = keys.first() {
                    self.forbid(key, error).await;
                }
            }
        }
        // Names of the refused request that others were waiting for go again, on their own.
        for key in keys {
            if self.orphaned(&key) {
                self.push_by_kind(vec![key], true, None);
            }
            consume_budget().await;
        }
    }

    /// Whether `key` is wanted, and yet not subscribed and not on its way.
    fn orphaned(&self, key: &Key) -> bool {
        self.wanted.contains_key(key)
            && !self.active.contains(key)
            && !self.in_flight.contains_key(key)
    }

    /// Answers a subscription with `error`: the names it added for its client are taken back,
    /// as if it never ran.
    async fn fail(&mut self, id: u64, error: Bytes) {
        let Some(waiter) = self.waiters.get_mut(&id) else {
            return;
        };
        if waiter.refused.is_some() {
            return;
        }
        waiter.refused = Some(error);
        let client = waiter.client;
        let names = std::mem::take(&mut waiter.names);
        self.ready.push(id);
        let mut mine = Vec::new();
        for key in names {
            let pending = self.wanted.get(&key).and_then(|wanted| wanted.get(&client));
            if pending == Some(&Some(id)) {
                if let Some(entry) = self.clients.get_mut(&client) {
                    entry.subscriptions.remove(&key);
                }
                mine.push(key);
            }
        }
        let unwanted = self.release(client, mine).await;
        self.push_by_kind(unwanted, false, None);
    }

    /// Redis refused `key` on its own: its waiters fail with Redis's words. Clients holding it
    /// already (their user lost the permission while it was held, and the connection was made
    /// again) are closed, as Redis closes them.
    async fn forbid(&mut self, key: &Key, error: Bytes) {
        let mut pending: Vec<u64> = self.waiting.remove(key).unwrap_or_default();
        let mut holders = Vec::new();
        for (client, waiter) in self.wanted.get(key).into_iter().flatten() {
            match waiter {
                Some(id) => pending.push(*id),
                None => holders.push(*client),
            }
        }
        for id in pending {
            self.fail(id, error.clone()).await;
        }
        for client in holders {
            warn!(
                client,
                "Redis no longer lets the subscriber's user subscribe to a name it holds; closing it"
            );
            self.remove_client(client, None).await;
        }
    }

    /// Publishes the counts, if they changed.
    fn publish_counts(&mut self) {
        self.counts.clients = self.clients.len() as u64;
        let counts = self.counts;
        self.counts_tx.send_if_modified(|published| {
            let changed = *published != counts;
            *published = counts;
            changed
        });
    }

    fn confirmed(&mut self, key: Key) {
        if let Some(count) = self.in_flight.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count > 0 {
                return; // a later SUBSCRIBE of the same key is still to be confirmed
            }
            self.in_flight.remove(&key);
        }
        if !self.wanted.contains_key(&key) {
            return; // unsubscribed meanwhile
        }
        self.satisfy(&key);
        self.active.insert(key);
    }

    /// `key` no longer keeps any waiter waiting.
    fn satisfy(&mut self, key: &Key) {
        let Some(ids) = self.waiting.remove(key) else {
            return;
        };
        for id in ids {
            if let Some(waiter) = self.waiters.get_mut(&id) {
                waiter.missing.remove(key);
                self.ready.push(id);
            }
        }
    }

    /// Answers the waiters that are done, each client's in the order it sent them.
    async fn answer_ready(&mut self) {
        while let Some(id) = self.ready.pop() {
            let Some(waiter) = self.waiters.get(&id) else {
                continue;
            };
            if !waiter.done() {
                continue;
            }
            if let Answer::Reset(_) = waiter.answer {
                if let Some(Waiter {
                    answer: Answer::Reset(done),
                    ..
                }) = self.waiters.remove(&id)
                {
                    let _ = done.send(Ok(Replies::from(Bytes::new())));
                }
                continue;
            }
            let client = waiter.client;
            self.answer_client(client).await;
        }
    }

    /// Puts the answers of the client's oldest requests that are done in its inbox.
    async fn answer_client(&mut self, client: u64) {
        let Some(entry) = self.clients.get_mut(&client) else {
            return;
        };
        while let Some(&id) = entry.queue.front() {
            let Some(waiter) = self.waiters.get(&id) else {
                entry.queue.pop_front();
                continue;
            };
            if !waiter.done() {
                break;
            }
            entry.queue.pop_front();
            let Some(waiter) = self.waiters.remove(&id) else {
                continue;
            };
            let marker = match waiter.refused {
                Some(error) => error,
                None => {
                    // Live from now on: the next message for these goes to the client.
                    for key in &waiter.names {
                        let pending = self
                            .wanted
                            .get_mut(key)
                            .and_then(|wanted| wanted.get_mut(&client));
                        if let Some(pending) = pending {
                            if *pending == Some(id) {
                                *pending = None;
                                self.registry.client(key, true);
                            }
                        }
                        consume_budget().await;
                    }
                    Bytes::new()
                }
            };
            if !entry.inbox.queued.charge(marker.len()) || entry.inbox.tx.send(marker).is_err() {
                self.cut(client);
                return;
            }
        }
    }

    async fn deliver(&mut self, key: &Key, frame: &Bytes) {
        let Some(wanted) = self.wanted.get(key) else {
            return;
        };
        // Frames go out as the RESP2 upstream sent them; a RESP3 session makes them pushes.
        let mut cut_off = Vec::new();
        for (client, pending) in wanted {
            consume_budget().await;
            if pending.is_some() {
                continue;
            }
            let Some(subscriber) = self.clients.get(client) else {
                continue;
            };
            let bytes = frame.clone();
            if !subscriber.inbox.queued.charge(bytes.len())
                || subscriber.inbox.tx.send(bytes).is_err()
            {
                cut_off.push(*client);
            }
        }
        for client in cut_off {
            self.cut(client);
        }
    }

    /// Gives up on a client past its limit: out of `clients` at once, so that it is cut off
    /// once; out of every subscription (and its frames, queued or not, freed) as soon as the
    /// dispatch is over.
    fn cut(&mut self, client: u64) {
        if let Some(subscriber) = self.clients.remove(&client) {
            // Its session logs it, once: the hub could only log every message it drops.
            let _ = subscriber.inbox.cut.send(());
            for id in subscriber.queue {
                self.waiters.remove(&id);
            }
            self.cut_off.push((client, subscriber.subscriptions));
        }
    }

    /// Fails the waiters that have waited too long (see [`Waiter::since`]): a subscription
    /// with redmux's error, taken back; an unsubscription is done all the same.
    async fn expire_waiters(&mut self) {
        let now = Instant::now();
        let (progress, timeouts, connected) = (self.progress, self.timeouts, self.connected);
        let expired: HashSet<u64> = self
            .waiters
            .iter()
            .filter(|(_, waiter)| !waiter.done())
            .filter(|(_, waiter)| match connected {
                true => waiter.since.max(progress) + timeouts.request <= now,
                false => waiter.since + timeouts.connect <= now,
            })
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return;
        }
        // Their places in `waiting`, each list walked once.
        let mut keys = HashSet::new();
        for id in &expired {
            if let Some(waiter) = self.waiters.get_mut(id) {
                keys.extend(std::mem::take(&mut waiter.missing));
            }
        }
        for key in keys {
            if let Some(ids) = self.waiting.get_mut(&key) {
                ids.retain(|id| !expired.contains(id));
                if ids.is_empty() {
                    self.waiting.remove(&key);
                }
            }
            consume_budget().await;
        }
        for id in expired {
            match self.waiters.get_mut(&id) {
                Some(waiter) if waiter.subscribe => {
                    self.fail(id, UpstreamError::Unavailable.replies(1)).await;
                }
                Some(waiter) => {
                    waiter.own = 0;
                    self.ready.push(id);
                }
                None => {}
            }
        }
        self.answer_ready().await;
    }
}

impl Drop for Hub {
    /// Whatever the hub still holds leaves the registry with it.
    fn drop(&mut self) {
        for key in &self.upstream {
            self.registry.hub(key, false);
        }
        for (key, wanted) in &self.wanted {
            for pending in wanted.values() {
                if pending.is_none() {
                    self.registry.client(key, false);
                }
            }
        }
    }
}

/// Reads from the subscriber connection; never ready while there is none.
async fn read_some(conn: Option<&mut Conn>, rbuf: &mut BytesMut) -> std::io::Result<usize> {
    match conn {
        Some((reader, _)) => reader.read_buf(rbuf).await,
        None => std::future::pending().await,
    }
}

/// One client request's names (or a new connection's, or names sent again), on their way.
#[derive(Debug)]
struct Queued {
    kind: Namespace,
    subscribe: bool,
    names: VecDeque<Bytes>,
    /// The waiter whose request this is, if any.
    origin: Option<u64>,
}

/// A command sent and not wholly answered.
#[derive(Debug)]
struct Sent {
    kind: Namespace,
    subscribe: bool,
    /// How many of its names Redis has still to answer.
    left: usize,
    /// The reply bytes it was counted for.
    owed: usize,
    /// A SUBSCRIBE's names, for when Redis refuses it.
    names: Vec<Bytes>,
    origin: Option<u64>,
    /// The last command of its request.
    last: bool,
}

/// (Un)subscriptions on their way to Redis, in order, sent while Redis owes the hub less than
/// `WINDOW` bytes of replies to those sent before. Each request goes as its own commands
/// (`NAMES_PER_COMMAND` names at most each), so that a refusal is that request's alone.
#[derive(Debug, Default)]
struct Outbox {
    queue: VecDeque<Queued>,
    /// Each command sent and not wholly answered, oldest first.
    sent: VecDeque<Sent>,
    /// The reply bytes of `sent`.
    owed: usize,
}

impl Outbox {
    fn push(&mut self, kind: Namespace, subscribe: bool, names: Vec<Bytes>, origin: Option<u64>) {
        if !names.is_empty() {
            self.queue.push_back(Queued {
                kind,
                subscribe,
                names: names.into(),
                origin,
            });
        }
    }

    /// The commands the window allows now (the first one whatever its size), encoded.
    async fn next_commands(&mut self) -> BytesMut {
        let mut out = BytesMut::new();
        while self.owed < WINDOW {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let mut names = Vec::new();
            let mut owed = 0;
            while let Some(name) = front.names.front() {
                if names.len() == NAMES_PER_COMMAND || self.owed + owed >= WINDOW {
                    break;
                }
                owed += name.len() + REPLY_OVERHEAD;
                if let Some(name) = front.names.pop_front() {
                    names.push(name);
                }
            }
            let (kind, subscribe, origin) = (front.kind, front.subscribe, front.origin);
            let last = front.names.is_empty();
            if last {
                self.queue.pop_front();
            }
            let command = kind.command(subscribe).as_bytes();
            let args = std::iter::once(command).chain(names.iter().map(|name| &name[..]));
            out.extend_from_slice(&encode_command(args));
            self.sent.push_back(Sent {
                kind,
                subscribe,
                left: names.len(),
                owed,
                names: if subscribe { names } else { Vec::new() },
                origin,
                last,
            });
            self.owed += owed;
            consume_budget().await;
        }
        out
    }

    /// Redis answered a name of the oldest command: the command, if that was its last name.
    fn answered(&mut self) -> Option<Sent> {
        let front = self.sent.front_mut()?;
        front.left = front.left.saturating_sub(1);
        if front.left > 0 {
            return None;
        }
        let sent = self.sent.pop_front()?;
        self.owed -= sent.owed;
        Some(sent)
    }

    /// Redis refused the oldest command as a whole.
    fn refused(&mut self) -> Option<Sent> {
        let sent = self.sent.pop_front()?;
        self.owed -= sent.owed;
        Some(sent)
    }
}
