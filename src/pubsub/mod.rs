//! Pub/sub: one shared subscriber connection for every client, and the fan-out of its messages.
//!
//! Each channel, pattern or shard channel is subscribed upstream once, however many clients
//! want it, and unsubscribed when the last of them leaves. Clients get their own confirmations
//! and counts from their session, exactly as Redis would send them; the hub only confirms that
//! the upstream subscription is active, so a client never sees its confirmation before messages
//! can reach it. Messages go to each subscriber's inbox, which is bounded in bytes: a subscriber
//! with more than `client_output_limit` bytes of messages waiting is cut off (as Redis's pubsub
//! output-buffer limit does), never buffered without bound.
//!
//! One client may name a million channels in one request, so nothing here costs more than
//! constant work per name, and every loop over names, frames or subscribers gives the runtime
//! back its thread now and then (`consume_budget`): the hub shares that thread with every
//! client session.

pub mod glob;

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

use crate::{
    resp::{encode_command, Args, ReplyScanner},
    upstream::{self, Budget, Endpoint, Reply, Setup, Timeouts, UpstreamError},
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

/// Channels, patterns and shard channels are separate name spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Channel,
    Pattern,
    Shard,
}

impl Kind {
    /// The command that (un)subscribes this kind, which is also the first word of its
    /// confirmation frames.
    pub fn command(self, subscribe: bool) -> &'static str {
        match (self, subscribe) {
            (Kind::Channel, true) => "subscribe",
            (Kind::Pattern, true) => "psubscribe",
            (Kind::Shard, true) => "ssubscribe",
            (Kind::Channel, false) => "unsubscribe",
            (Kind::Pattern, false) => "punsubscribe",
            (Kind::Shard, false) => "sunsubscribe",
        }
    }
}

#[derive(Debug)]
enum HubRequest {
    /// Subscribe `client` to `names`; `reply` gets `confirmation` once all are active upstream.
    Subscribe {
        client: u64,
        kind: Kind,
        names: Vec<Bytes>,
        /// The client's inbox, with its first subscription only: the hub then holds the only
        /// sender, until the client unsubscribes from everything, leaves or is cut off.
        inbox: Option<Inbox>,
        confirmation: Bytes,
        reply: oneshot::Sender<Reply>,
    },
    Unsubscribe {
        client: u64,
        kind: Kind,
        names: Vec<Bytes>,
    },
    /// The client left, or RESET: drop all its subscriptions.
    Leave { client: u64 },
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
    fn of(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Channel => &mut self.channels,
            Kind::Pattern => &mut self.patterns,
            Kind::Shard => &mut self.shard_channels,
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
    pub fn start(endpoint: Endpoint, timeouts: Timeouts, ping: bool) -> PubSub {
        let (tx, rx) = mpsc::channel(HUB_CAPACITY);
        let (counts_tx, counts) = watch::channel(Counts::default());
        let hub = Hub {
            counts: Counts::default(),
            counts_tx,
            endpoint,
            timeouts,
            ping,
            rx,
            subscribers: HashMap::new(),
            clients: HashMap::new(),
            active: HashSet::new(),
            in_flight: HashMap::new(),
            waiters: HashMap::new(),
            waiting: HashMap::new(),
            next_waiter: 0,
            cut_off: Vec::new(),
            progress: Instant::now(),
            outbox: Outbox::default(),
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

    /// Subscribes; the returned receiver completes with `confirmation` when the subscriptions
    /// are active, or with an error.
    pub async fn subscribe(
        &self,
        client: u64,
        kind: Kind,
        names: Vec<Bytes>,
        inbox: Option<Inbox>,
        confirmation: Bytes,
    ) -> oneshot::Receiver<Reply> {
        let (reply, rx) = oneshot::channel();
        let request = HubRequest::Subscribe {
            client,
            kind,
            names,
            inbox,
            confirmation,
            reply,
        };
        // A hub that is gone drops the sender: the receiver then reports the loss.
        let _ = self.tx.send(request).await;
        rx
    }

    pub async fn unsubscribe(&self, client: u64, kind: Kind, names: Vec<Bytes>) {
        let _ = self
            .tx
            .send(HubRequest::Unsubscribe {
                client,
                kind,
                names,
            })
            .await;
    }

    pub async fn leave(&self, client: u64) {
        let _ = self.tx.send(HubRequest::Leave { client }).await;
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
    subscriptions: HashSet<(Kind, Bytes)>,
}

/// A client waiting for its subscriptions to be active upstream.
#[derive(Debug)]
struct Waiter {
    /// The names of its request not active yet, each listed in `Hub::waiting`.
    missing: HashSet<(Kind, Bytes)>,
    reply: oneshot::Sender<Reply>,
    confirmation: Bytes,
    /// When it arrived. It fails `connect_timeout` later while there is no connection, and
    /// `request_timeout` after that or the connection's last sign of life, whichever is later:
    /// Redis may take a while to confirm a million names, and is not stuck while it does.
    since: Instant,
}

struct Hub {
    endpoint: Endpoint,
    timeouts: Timeouts,
    ping: bool,
    rx: mpsc::Receiver<HubRequest>,
    /// Who wants each subscription.
    subscribers: HashMap<(Kind, Bytes), HashSet<u64>>,
    clients: HashMap<u64, Subscriber>,
    /// Subscriptions the upstream has confirmed on the current connection.
    active: HashSet<(Kind, Bytes)>,
    /// SUBSCRIBEs sent and not yet confirmed, per key. Only the confirmation of the last one
    /// counts: an earlier one may be followed by an UNSUBSCRIBE that Redis has still to run.
    in_flight: HashMap<(Kind, Bytes), u32>,
    waiters: HashMap<u64, Waiter>,
    /// The waiters each key keeps waiting: a confirmation touches only those, not every waiter.
    waiting: HashMap<(Kind, Bytes), Vec<u64>>,
    next_waiter: u64,
    /// Clients cut off while messages were dispatched, with their subscriptions: dropped, and
    /// unsubscribed upstream where nobody else wants them, right after the dispatch.
    cut_off: Vec<(u64, HashSet<(Kind, Bytes)>)>,
    /// When the connection last read something, was made, or was sent subscriptions to
    /// confirm: Redis is stuck if it answers nothing for `request_timeout` after that.
    progress: Instant,
    /// (Un)subscriptions for the current connection, sent a window at a time.
    outbox: Outbox,
    /// `subscribers` and `clients` counted, kept up to date as they change.
    counts: Counts,
    counts_tx: watch::Sender<Counts>,
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
            if conn.is_none() && !self.subscribers.is_empty() {
                let setup = Setup {
                    db: 0,
                    resp3: false,
                    ping: self.ping,
                };
                match upstream::connect(&self.endpoint, setup, self.timeouts.connect).await {
                    Ok((reader, writer)) => {
                        info!("pub/sub connection up");
                        failures = 0;
                        self.active.clear();
                        self.in_flight.clear();
                        self.outbox = Outbox::default();
                        rbuf.clear();
                        scanner.reset();
                        let all: Vec<(Kind, Bytes)> = self.subscribers.keys().cloned().collect();
                        self.sent(&all).await;
                        self.outbox.push(all, true);
                        conn = Some((reader, writer));
                        self.progress = Instant::now();
                    }
                    Err(error) => {
                        if failures == 0 {
                            warn!(%error, "cannot open the pub/sub connection; retrying");
                        }
                        failures = failures.saturating_add(1);
                        self.expire_waiters(false).await;
                        sleep(Duration::from_millis(100).min(self.timeouts.connect)).await;
                        continue;
                    }
                }
            }
            self.flush(&mut conn).await;
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
                        self.drop_cut_off(conn.is_some()).await;
                        self.publish_counts();
                    }
                    _ => {
                        warn!("pub/sub connection lost; reconnecting");
                        conn = None;
                    }
                },
                request = self.rx.recv() => {
                    let Some(request) = request else { return };
                    self.handle(request, conn.is_some()).await;
                    self.publish_counts();
                }
                _ = sweep.tick() => {
                    self.expire_waiters(conn.is_some()).await;
                    let gone: Vec<u64> = self
                        .clients
                        .iter()
                        .filter(|(_, s)| s.inbox.tx.is_closed())
                        .map(|(id, _)| *id)
                        .collect();
                    for client in gone {
                        self.remove_client(client, conn.is_some()).await;
                    }
                    self.publish_counts();
                }
            }
        }
    }

    /// Takes a client's request; what it means upstream is queued if `connected` (else the
    /// next connection subscribes to everything wanted then).
    async fn handle(&mut self, request: HubRequest, connected: bool) {
        match request {
            HubRequest::Subscribe {
                client,
                kind,
                names,
                inbox,
                confirmation,
                reply,
            } => {
                let entry = match (self.clients.get_mut(&client), inbox) {
                    (Some(entry), _) => entry,
                    (None, Some(inbox)) => self.clients.entry(client).or_insert(Subscriber {
                        inbox,
                        subscriptions: HashSet::new(),
                    }),
                    // Cut off meanwhile: the session learns it from its inbox.
                    (None, None) => {
                        let _ = reply.send(Err(UpstreamError::ConnectionLost));
                        return;
                    }
                };
                let mut new = Vec::new();
                // What this request waits for: its own names that are not active yet. Names of
                // earlier requests are waited for by those requests' confirmations, which the
                // session sends first.
                let mut missing = HashSet::new();
                for name in names {
                    let key = (kind, name);
                    entry.subscriptions.insert(key.clone());
                    let wanted = self.subscribers.entry(key.clone()).or_default();
                    if wanted.is_empty() {
                        *self.counts.of(kind) += 1;
                        new.push(key.clone());
                    }
                    wanted.insert(client);
                    if !self.active.contains(&key) {
                        missing.insert(key);
                    }
                    consume_budget().await;
                }
                if missing.is_empty() {
                    let _ = reply.send(Ok(confirmation.into()));
                } else {
                    let id = self.next_waiter;
                    self.next_waiter += 1;
                    for key in &missing {
                        self.waiting.entry(key.clone()).or_default().push(id);
                        consume_budget().await;
                    }
                    let waiter = Waiter {
                        missing,
                        reply,
                        confirmation,
                        since: Instant::now(),
                    };
                    self.waiters.insert(id, waiter);
                }
                if connected {
                    self.sent(&new).await;
                    self.outbox.push(new, true);
                }
            }
            HubRequest::Unsubscribe {
                client,
                kind,
                names,
            } => {
                let mut gone = Vec::new();
                if let Some(entry) = self.clients.get_mut(&client) {
                    for name in names {
                        let key = (kind, name);
                        if entry.subscriptions.remove(&key) {
                            gone.push(key);
                        }
                        consume_budget().await;
                    }
                    if entry.subscriptions.is_empty() {
                        self.clients.remove(&client);
                    }
                }
                self.drop_subscriptions(client, gone, connected).await;
            }
            HubRequest::Leave { client } => self.remove_client(client, connected).await,
        }
    }

    async fn remove_client(&mut self, client: u64, connected: bool) {
        let Some(entry) = self.clients.remove(&client) else {
            return;
        };
        let keys = entry.subscriptions.into_iter().collect();
        self.drop_subscriptions(client, keys, connected).await;
    }

    /// Removes the clients cut off by the last dispatch from every subscription they had.
    async fn drop_cut_off(&mut self, connected: bool) {
        for (client, subscriptions) in std::mem::take(&mut self.cut_off) {
            let keys = subscriptions.into_iter().collect();
            self.drop_subscriptions(client, keys, connected).await;
        }
    }

    /// Removes `client` from each subscription; the ones nobody wants any more are
    /// unsubscribed upstream.
    async fn drop_subscriptions(&mut self, client: u64, keys: Vec<(Kind, Bytes)>, connected: bool) {
        let mut unwanted = Vec::new();
        for key in keys {
            if let Some(wanted) = self.subscribers.get_mut(&key) {
                wanted.remove(&client);
                if wanted.is_empty() {
                    self.subscribers.remove(&key);
                    let count = self.counts.of(key.0);
                    *count = count.saturating_sub(1);
                    self.active.remove(&key);
                    // A client that subscribed and unsubscribed before the upstream answered
                    // gets its confirmation all the same, as from Redis.
                    self.satisfy(&key);
                    unwanted.push(key);
                }
            }
            consume_budget().await;
        }
        if connected {
            self.outbox.push(unwanted, false);
        }
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

    /// Handles every complete frame the subscriber connection sent.
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
                // Redis refused a whole (UN)SUBSCRIBE (an ACL's -NOPERM): its waiters expire.
                self.outbox.answered(true);
                continue;
            }
            let mut args = Args::new(&frame);
            let (Some(what), Some(name)) = (args.next(), args.next()) else {
                continue;
            };
            let key = match what {
                b"message" => (Kind::Channel, name),
                b"pmessage" => (Kind::Pattern, name),
                b"smessage" => (Kind::Shard, name),
                b"subscribe" | b"psubscribe" | b"ssubscribe" => {
                    let kind = match what {
                        b"subscribe" => Kind::Channel,
                        b"psubscribe" => Kind::Pattern,
                        _ => Kind::Shard,
                    };
                    self.outbox.answered(false);
                    self.confirmed((kind, Bytes::copy_from_slice(name)));
                    continue;
                }
                b"unsubscribe" | b"punsubscribe" | b"sunsubscribe" => {
                    self.outbox.answered(false);
                    continue;
                }
                _ => continue,
            };
            let key = (key.0, Bytes::copy_from_slice(key.1));
            self.deliver(&key, &frame).await;
        }
        Ok(())
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

    async fn sent(&mut self, keys: &[(Kind, Bytes)]) {
        for key in keys {
            *self.in_flight.entry(key.clone()).or_default() += 1;
            consume_budget().await;
        }
    }

    fn confirmed(&mut self, key: (Kind, Bytes)) {
        if let Some(count) = self.in_flight.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count > 0 {
                return; // a later SUBSCRIBE of the same key is still to be confirmed
            }
            self.in_flight.remove(&key);
        }
        if !self.subscribers.contains_key(&key) {
            return; // unsubscribed meanwhile
        }
        self.satisfy(&key);
        self.active.insert(key);
    }

    /// `key` no longer keeps any waiter waiting; answers the waiters it was the last for.
    fn satisfy(&mut self, key: &(Kind, Bytes)) {
        let Some(ids) = self.waiting.remove(key) else {
            return;
        };
        for id in ids {
            let Some(waiter) = self.waiters.get_mut(&id) else {
                continue;
            };
            waiter.missing.remove(key);
            if waiter.missing.is_empty() {
                if let Some(waiter) = self.waiters.remove(&id) {
                    let _ = waiter.reply.send(Ok(waiter.confirmation.into()));
                }
            }
        }
    }

    async fn deliver(&mut self, key: &(Kind, Bytes), frame: &Bytes) {
        let Some(wanted) = self.subscribers.get(key) else {
            return;
        };
        // Frames go out as the RESP2 upstream sent them; a RESP3 session makes them pushes.
        let mut cut_off = Vec::new();
        for client in wanted {
            consume_budget().await;
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
        // Out of `clients` at once, so that it is cut off once; out of every subscription
        // (and its frames, queued or not, freed) as soon as the dispatch is over.
        for client in cut_off {
            if let Some(subscriber) = self.clients.remove(&client) {
                // Its session logs it, once: the hub could only log every message it drops.
                let _ = subscriber.inbox.cut.send(());
                self.cut_off.push((client, subscriber.subscriptions));
            }
        }
    }

    /// Fails the waiters that have waited too long (see [`Waiter::since`]).
    async fn expire_waiters(&mut self, connected: bool) {
        let now = Instant::now();
        let (progress, timeouts) = (self.progress, self.timeouts);
        let expired: HashSet<u64> = self
            .waiters
            .iter()
            .filter(|(_, waiter)| match connected {
                true => waiter.since.max(progress) + timeouts.request <= now,
                false => waiter.since + timeouts.connect <= now,
            })
            .map(|(id, _)| *id)
            .collect();
        let mut keys = HashSet::new();
        for id in &expired {
            if let Some(waiter) = self.waiters.remove(id) {
                let _ = waiter.reply.send(Err(UpstreamError::Unavailable));
                keys.extend(waiter.missing);
            }
        }
        // Their places in `waiting`, each list walked once.
        for key in keys {
            if let Some(ids) = self.waiting.get_mut(&key) {
                ids.retain(|id| !expired.contains(id));
                if ids.is_empty() {
                    self.waiting.remove(&key);
                }
            }
            consume_budget().await;
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

/// (Un)subscriptions on their way to Redis, in order, sent while Redis owes the hub less than
/// `WINDOW` bytes of replies to those sent before.
#[derive(Debug, Default)]
struct Outbox {
    /// Not sent yet: each key, and whether to subscribe to it.
    queue: VecDeque<((Kind, Bytes), bool)>,
    /// Each command sent and not wholly answered, oldest first: how many of its names Redis
    /// has still to answer, and the reply bytes it was counted for.
    sent: VecDeque<(usize, usize)>,
    /// The reply bytes of `sent`.
    owed: usize,
}

impl Outbox {
    fn push(&mut self, keys: Vec<(Kind, Bytes)>, subscribe: bool) {
        self.queue
            .extend(keys.into_iter().map(|key| (key, subscribe)));
    }

    /// The commands the window allows now (the first one whatever its size), encoded: names
    /// of one kind and verb next to each other in the queue go together, up to
    /// `NAMES_PER_COMMAND`.
    async fn next_commands(&mut self) -> BytesMut {
        let mut out = BytesMut::new();
        while self.owed < WINDOW {
            let Some(&((kind, _), subscribe)) = self.queue.front() else {
                break;
            };
            let mut names = Vec::new();
            let mut owed = 0;
            while let Some(((next, name), verb)) = self.queue.front() {
                if *next != kind
                    || *verb != subscribe
                    || names.len() == NAMES_PER_COMMAND
                    || self.owed + owed >= WINDOW
                {
                    break;
                }
                owed += name.len() + REPLY_OVERHEAD;
                if let Some(((_, name), _)) = self.queue.pop_front() {
                    names.push(name);
                }
            }
            let command = kind.command(subscribe).as_bytes();
            let args = std::iter::once(command).chain(names.iter().map(|name| &name[..]));
            out.extend_from_slice(&encode_command(args));
            self.sent.push_back((names.len(), owed));
            self.owed += owed;
            consume_budget().await;
        }
        out
    }

    /// Redis answered a name of the oldest command, or refused the whole command.
    fn answered(&mut self, whole_command: bool) {
        let Some((left, _)) = self.sent.front_mut() else {
            return;
        };
        *left = if whole_command {
            0
        } else {
            left.saturating_sub(1)
        };
        if *left == 0 {
            if let Some((_, owed)) = self.sent.pop_front() {
                self.owed -= owed;
            }
        }
    }
}
