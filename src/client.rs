//! One client connection: parse its requests, forward or answer each, and write the replies back
//! in request order.
//!
//! The session reads, forwards and writes concurrently, so a client may pipeline: everything
//! buffered is parsed, consecutive forwardable requests go upstream as one batch (one message,
//! one `oneshot`), and replies are written as soon as the oldest outstanding one is ready. At
//! most `max_pipeline` requests are outstanding; past that the client is not read until replies
//! drain, which is all the backpressure a well-behaved client needs.
//!
//! Where requests go follows the client's state: its shared connection for its (db, protocol),
//! or a pinned connection of its own from MULTI or WATCH until EXEC, DISCARD or UNWATCH, and for
//! the duration of a blocking command. A run of requests is always cut where the destination
//! changes, so each batch goes to exactly one connection.
//!
//! A session with nothing to do is parked (see [`Session`]): an idle client costs a task of a
//! few hundred bytes, and the buffers and futures of a busy session exist only while it is busy.

use std::{
    cell::RefCell,
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    sync::{
        mpsc::{self, error::TrySendError},
        oneshot, watch,
    },
    time::{Instant, Sleep},
};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::{debug, warn};

use crate::{
    clients::{flag, PauseMode, Subscription},
    command::{self, Action, CommandId, Transaction},
    connection::{ClientState, Effect, ReplyMode},
    io::{outgoing::write_some, read_arrived, Budget, Duplex, ReadSide},
    live::Live,
    metrics::Metrics,
    monitor, pubsub,
    resp::{encode, encode_command, Args, Frame, Limits, RequestDecoder},
    upstream::{Lease, Replies, Reply, Request, UpstreamError},
};

/// Most requests in one batch. The actor hands a batch's replies back only when all are in, so
/// this bounds what it holds for one client beyond `client_output_limit`: a client pipelining
/// 1,000 GETs of a large value and never reading is cut off after a few batches, not after all.
/// 64 keeps a `redis-benchmark -P 32` write in one batch.
const MAX_BATCH: u32 = 64;
/// Stop reading a client while this many reply bytes wait for it to read them.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;

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
}

impl SessionConfig {
    fn output_limit(&self) -> usize {
        usize::try_from(self.client_output_limit).unwrap_or(usize::MAX)
    }
}

/// A reply slot, in request order.
#[derive(Debug)]
enum Pending {
    /// Replies redmux produced itself, to `count` requests.
    Local { bytes: Bytes, count: u32 },
    /// No reply: gives a pinned connection back once every earlier slot is answered (RESET
    /// in a transaction, after the requests already sent on that connection).
    Release(Lease),
    /// The replies to `count` requests forwarded as one batch.
    Upstream {
        rx: oneshot::Receiver<Reply>,
        count: u32,
        /// CLIENT REPLY OFF or SKIP: the replies are read and dropped.
        suppress: bool,
        /// A pinned connection to give back once these replies are in (EXEC, DISCARD, UNWATCH,
        /// a blocking command). Dropped unreleased if the client leaves first, which closes it.
        release: Option<Lease>,
        /// The replies come from an upstream actor, which charged them to the output budget
        /// (the pub/sub hub's and MONITOR's confirmations are not charged).
        charged: bool,
        /// When the requests were handed over, to measure their latency.
        sent: Instant,
        /// A blocking command, whose reply may never come: a client that closes its side
        /// while owed one is dropped at once, as Redis drops a blocked client that leaves.
        blocking: bool,
        /// What to do with the reply besides passing it on. Boxed: it is rare.
        then: Option<Box<Then>>,
    },
}

/// What to do once an upstream reply is in, besides passing it on.
#[derive(Debug)]
enum Then {
    /// An EXEC whose transaction selects this database: the client is in it once the
    /// transaction has run.
    Select(u32),
    /// Redis's reply to the AUTH that a connection command (AUTH, HELLO) asked it to check
    /// ([`Effect::Check`]): the command is handled again with it, and its reply replaces
    /// Redis's.
    Replay(Bytes),
    /// A count of subscribers in which Redis sees redmux's hub connections, not the clients
    /// they serve: corrected (see [`pubsub::Registry`]). With the argument the correction
    /// needs ([`command::Count::argument_index`]).
    Count(command::Count, Option<Bytes>),
}

/// Where a client's requests travel. Redis runs what arrives on one connection in order, but
/// nothing orders two connections: so a client's requests take a new path only once every
/// request sent on the previous one is answered (see [`State::stalled`]). While the path stays
/// the same, which is the hot path, this costs one comparison per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The client's shared connection, by the number of moves the client has made (see
    /// `ClientState::moves`).
    Shared(u32),
    /// The connection AUTH is checked on.
    Auth,
    /// A pinned connection, by lease (the low bits of its id are enough to tell it from the
    /// previous path).
    Pinned(u32),
    /// A pinned connection not leased yet: a path of its own, whatever came before.
    NewPinned,
    /// The pub/sub hub's subscriber connection.
    PubSub,
    /// The client's MONITOR connection.
    Monitor,
    /// A connection opened for one command that must reach Redis while a script is busy.
    Control,
}

/// The client's transaction state, and the pinned connection that carries it.
#[derive(Debug)]
enum Tx {
    None,
    /// After WATCH, before MULTI.
    Watching(Lease),
    /// After MULTI (with or without WATCH before it). `dirty`: a command was refused while
    /// queuing, so EXEC must abort, as in Redis.
    Multi {
        lease: Lease,
        dirty: bool,
        /// The database the last SELECT queued in the transaction selects: Redis runs it at
        /// EXEC, and the client is in that database from then on.
        db: Option<u32>,
        /// A command queued may write: CLIENT PAUSE WRITE holds the EXEC, as in Redis.
        writes: bool,
        /// Commands queued, for CLIENT LIST's `multi`.
        queued: usize,
    },
}

/// The client's subscriptions, for its confirmations and counts, and the inbox its messages
/// arrive in.
#[derive(Debug, Default)]
struct Subscriptions {
    /// Boxed, once the client first subscribes: every busy session carries this struct, and
    /// most never subscribe.
    held: Option<Box<Held>>,
    /// Present while subscribed to anything, or owed an answer by the hub. The hub closes it,
    /// or fires its `cut`, when it cuts the client off.
    inbox: Option<Feed>,
    /// The hub of the client's subscriptions, from the first: that of the user the client
    /// was logged in as then, whose channel permissions Redis applies.
    hub: Option<pubsub::PubSub>,
}

/// What a subscribed client holds.
#[derive(Debug, Default)]
struct Held {
    /// Channels, patterns and shard channels, in that order.
    kinds: [Names; 3],
    /// The (un)subscriptions the hub has not answered yet, oldest first. The hub answers them
    /// in the client's inbox in this order, each where the upstream stream gave its answer, so
    /// messages and confirmations reach the client in the order Redis would have sent them on
    /// a connection of its own.
    open: VecDeque<Open>,
}

/// An (un)subscription the hub has not answered yet.
#[derive(Debug)]
struct Open {
    /// Completes the request's reply slot.
    reply: oneshot::Sender<Reply>,
    /// Messages Redis sent before its answer: they go out ahead of it. Charged to the output
    /// budget as they arrive.
    before: Vec<Bytes>,
    /// The frames Redis sends when it does what was asked.
    frames: Bytes,
    kind: command::Namespace,
    /// The names a subscription added, each with its place in [`Names`]: taken back if Redis
    /// refuses it.
    added: Vec<(Bytes, u64)>,
}

/// A client's subscriptions of one kind. A client may hold a million (`max_multibulk_len`
/// names in one SUBSCRIBE), so each name is found in constant time; the order of subscription
/// is kept as a number per name, for a no-arg PUNSUBSCRIBE, which Redis answers in that order.
#[derive(Debug, Default)]
struct Names {
    order: std::collections::HashMap<Bytes, u64>,
    /// The number the next name gets.
    next: u64,
}

impl Names {
    fn contains(&self, name: &[u8]) -> bool {
        self.order.contains_key(name)
    }

    /// Adds `name`; returns its place in the order.
    fn insert(&mut self, name: Bytes) -> u64 {
        let at = self.next;
        self.order.insert(name, at);
        self.next += 1;
        at
    }

    fn remove(&mut self, name: &[u8]) -> Option<Bytes> {
        self.order.remove_entry(name).map(|(name, _)| name)
    }

    /// Removes `name` if it is still the one added at `at` (not removed and added again).
    fn remove_added(&mut self, name: &[u8], at: u64) {
        if self.order.get(name) == Some(&at) {
            self.order.remove(name);
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// Every name, in subscription order, leaving none.
    fn take_in_order(&mut self) -> Vec<Bytes> {
        let mut all: Vec<(u64, Bytes)> = self.order.drain().map(|(name, at)| (at, name)).collect();
        all.sort_unstable_by_key(|(at, _)| *at);
        all.into_iter().map(|(_, name)| name).collect()
    }
}

/// Frames pushed to the client from elsewhere (pub/sub messages, the MONITOR feed), bounded in
/// bytes by the sender, which gives up on the client past its limit.
#[derive(Debug)]
struct Feed {
    rx: mpsc::UnboundedReceiver<Bytes>,
    /// Bytes sent and not yet taken, shared with the sender, which gives up past its limit.
    queued: Arc<Budget>,
    /// Fires when the sender gives up on the client: it is then closed at once, however much
    /// it has still to read. `None` once the sender let go without firing it.
    cut: Option<oneshot::Receiver<()>>,
}

impl Feed {
    fn new(limit: usize) -> (Feed, pubsub::Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (cut_tx, cut) = oneshot::channel();
        let queued = Arc::new(Budget::new(limit));
        let inbox = pubsub::Inbox {
            tx,
            queued: queued.clone(),
            cut: cut_tx,
        };
        let feed = Feed {
            rx,
            queued,
            cut: Some(cut),
        };
        (feed, inbox)
    }
}

/// What a feed has for the session.
enum Fed {
    Frame(Bytes),
    /// The sender let go: everything it sent has been taken.
    Ended,
    /// The sender gave up on the client, which is past its output limit.
    CutOff,
}

/// The next frame of a feed, if `room` (the client is not too far behind already), or word
/// that the sender cut the client off, which comes whatever the room. Never ready without a
/// feed. A poll function, like the other branches of a busy session's `select!`, keeps the
/// boxed session small enough for the allocator's per-thread cache.
fn next_frame(feed: &mut Option<Feed>, room: bool) -> impl Future<Output = Fed> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(feed) = feed else {
            return Poll::Pending;
        };
        if let Some(cut) = &mut feed.cut {
            match Pin::new(cut).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Fed::CutOff),
                Poll::Ready(Err(_)) => feed.cut = None,
                Poll::Pending => {}
            }
        }
        if !room {
            return Poll::Pending;
        }
        feed.rx.poll_recv(cx).map(|frame| match frame {
            Some(frame) => {
                feed.queued.refund(frame.len());
                Fed::Frame(frame)
            }
            None => Fed::Ended,
        })
    })
}

/// Where a kind's names are in `Subscriptions::kinds`.
fn kind_index(kind: command::Namespace) -> usize {
    match kind {
        command::Namespace::Channel => 0,
        command::Namespace::Pattern => 1,
        command::Namespace::Shard => 2,
    }
}

impl Subscriptions {
    fn held(&mut self) -> &mut Held {
        self.held.get_or_insert_with(Box::default)
    }

    fn names(&mut self, kind: command::Namespace) -> &mut Names {
        &mut self.held().kinds[kind_index(kind)]
    }

    fn len(&self, kind: command::Namespace) -> usize {
        self.held
            .as_ref()
            .map_or(0, |held| held.kinds[kind_index(kind)].len())
    }

    /// Whether the hub owes the client an answer.
    fn owed(&self) -> bool {
        self.held.as_ref().is_some_and(|held| !held.open.is_empty())
    }

    /// The count Redis puts in a confirmation: channels and patterns together, shard
    /// channels apart.
    fn count(&self, kind: command::Namespace) -> usize {
        match kind {
            command::Namespace::Shard => self.len(kind),
            _ => self.len(command::Namespace::Channel) + self.len(command::Namespace::Pattern),
        }
    }

    /// Subscribed to anything: RESP2 clients are then restricted to pub/sub commands.
    fn active(&self) -> bool {
        self.count(command::Namespace::Channel) + self.count(command::Namespace::Shard) > 0
    }

    /// Whether a message from the hub is for a subscription the client still has. One that
    /// follows the client's unsubscription (the hub may have sent it before it heard of that)
    /// is not: Redis sends none after its confirmation.
    fn wants(&self, frame: &[u8]) -> bool {
        let mut args = Args::new(frame);
        let kind = match args.next() {
            Some(b"message") => command::Namespace::Channel,
            Some(b"pmessage") => command::Namespace::Pattern,
            Some(b"smessage") => command::Namespace::Shard,
            _ => return true,
        };
        let names = self.held.as_ref().map(|held| &held.kinds[kind_index(kind)]);
        args.next()
            .zip(names)
            .is_some_and(|(name, names)| names.contains(name))
    }
}

/// A batch of requests about to be handed to an upstream connection.
#[derive(Default)]
struct Batch {
    frames: Bytes,
    count: u32,
    timeout: Option<Duration>,
    release: Option<Lease>,
    /// A blocking command (see `Pending::Upstream::blocking`).
    blocking: bool,
    /// See `Pending::Upstream::then`.
    then: Option<Box<Then>>,
    /// The connection AUTH is checked on, where it goes instead of the client's current one.
    via: Option<mpsc::Sender<Request>>,
}

/// One client's session. While its client is idle (nothing buffered, nothing owed, no
/// transaction, subscription or MONITOR) it is *parked*: its task holds the socket, the
/// [`Parked`] state and one wait (for readability, a reload or shutdown, the idle timeout), and
/// nothing else. Once the client sends something, a boxed future ([`serve`]) holding the read
/// buffer, the reply queues and the futures of a busy session serves it until it is idle
/// again. So 10,000 idle clients cost 10,000 small tasks, not 10,000 busy ones.
pub struct Session<S> {
    io: S,
    /// Where the settings come from after a reload.
    updates: watch::Receiver<Arc<Live>>,
    /// `None` only while a burst of activity is being served.
    parked: Option<Parked>,
}

/// What a session keeps between bursts of activity.
struct Parked {
    config: Arc<SessionConfig>,
    client: ClientState,
    /// Present when `client_idle_timeout` is set.
    idle: Option<Box<IdleTimer>>,
}

/// Closes a client that has been idle for `client_idle_timeout`.
struct IdleTimer {
    sleep: Pin<Box<Sleep>>,
    /// Last time the client sent a request or took a reply (or the timeout was set by a
    /// reload): idleness is measured from here.
    last_activity: Instant,
    timeout: Duration,
}

impl IdleTimer {
    /// Boxed: sessions without a timeout (the default) pay one pointer for it.
    fn new(timeout: Duration) -> Box<Self> {
        Box::new(IdleTimer {
            sleep: Box::pin(tokio::time::sleep(timeout)),
            last_activity: Instant::now(),
            timeout,
        })
    }

    /// Follows a reloaded `client_idle_timeout`. A client idle since before the reload is
    /// measured from its last activity; one without a timer until now, from the reload.
    fn follow(timer: &mut Option<Box<IdleTimer>>, timeout: Option<Duration>) {
        match (timer.as_mut(), timeout) {
            (Some(idle), Some(timeout)) => {
                idle.timeout = timeout;
                let deadline = idle.last_activity + timeout;
                idle.sleep.as_mut().reset(deadline);
            }
            (None, Some(timeout)) => *timer = Some(IdleTimer::new(timeout)),
            (_, None) => *timer = None,
        }
    }

    /// Ready once the client has done nothing for the timeout (never without a timer). The
    /// timer is armed for the last activity plus the timeout, and re-armed when it fires early.
    /// A poll function rather than a future: it is polled from the parked session's task.
    fn poll_expired(timer: &mut Option<Box<IdleTimer>>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(timer) = timer else {
            return Poll::Pending;
        };
        loop {
            std::task::ready!(timer.sleep.as_mut().poll(cx));
            let deadline = timer.last_activity + timer.timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            timer.sleep.as_mut().reset(deadline);
        }
    }
}

/// The reply queues of a busy session. Parking gives them to a small per-thread pool, from
/// which the next session to wake takes them: a client that sends one request at a time
/// would otherwise allocate both for every request.
#[derive(Default)]
struct Queues {
    pending: VecDeque<Pending>,
    out: VecDeque<Bytes>,
    owed: VecDeque<CommandId>,
}

thread_local! {
    static SPARE_QUEUES: RefCell<Vec<Queues>> = const { RefCell::new(Vec::new()) };
}

/// Most queues kept per thread, and most slots in a kept queue: enough for the sessions that
/// wake at once, never the grown queues of a client that pipelined.
const SPARE_QUEUES_MAX: usize = 64;
const SPARE_QUEUE_CAPACITY: usize = 16;

impl Queues {
    fn take() -> Queues {
        SPARE_QUEUES.with_borrow_mut(Vec::pop).unwrap_or_default()
    }

    /// Empty queues go back to the pool (if it has room and they are small).
    fn give_back(self) {
        if self.pending.is_empty()
            && self.out.is_empty()
            && self.owed.is_empty()
            && self.pending.capacity() <= SPARE_QUEUE_CAPACITY
            && self.out.capacity() <= SPARE_QUEUE_CAPACITY
            && self.owed.capacity() <= SPARE_QUEUE_CAPACITY
        {
            SPARE_QUEUES.with_borrow_mut(|spare| {
                if spare.len() < SPARE_QUEUES_MAX {
                    spare.push(self);
                }
            });
        }
    }
}

/// Everything a busy session tracks besides its socket.
struct State {
    config: Arc<SessionConfig>,
    client: ClientState,
    tx: Tx,
    subs: Subscriptions,
    /// The MONITOR feed, while monitoring.
    monitor: Option<Feed>,
    decoder: RequestDecoder,
    /// Bytes read and not yet parsed (or parsed and not yet split off to be forwarded).
    rbuf: BytesMut,
    /// Set when `rbuf` may hold a complete request that has not been parsed yet.
    unparsed: bool,
    /// The socket has nothing more to read for now: the session may park.
    drained: bool,
    /// Reply slots not yet moved to `out`, oldest first.
    pending: VecDeque<Pending>,
    /// How many of `pending` wait for an upstream (`Pending::Upstream`).
    unresolved: usize,
    /// Where the last requests were sent (see [`Path`]).
    last_path: Option<Path>,
    /// The next request takes another path than the requests still unanswered: it waits in
    /// `rbuf`, unparsed, until they are all answered.
    barrier: bool,
    /// The next request, whatever it is, waits until every request sent is answered: an EXEC
    /// that changes the client's database is in flight.
    sync: bool,
    /// The client closed its side: nothing more is read, but what it sent before is still
    /// carried out and answered.
    eof: bool,
    /// The wait for a CLIENT PAUSE to end, while the next request waits, unparsed, in `rbuf`.
    pause: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Requests whose replies have not reached `out` yet.
    outstanding: usize,
    /// The command of each outstanding request, oldest first, to count replies per command:
    /// kept only with metrics on.
    owed: VecDeque<CommandId>,
    /// The command of the request being handled.
    current: CommandId,
    /// Reply bytes ready to write, oldest first.
    out: VecDeque<Bytes>,
    out_len: usize,
    /// No more requests are read: QUIT, a protocol error, EOF or shutdown. The session ends
    /// once the replies already owed are written.
    draining: bool,
    /// Close now, writing nothing more: an HTTP request (as Redis does), or a client over its
    /// output limit.
    abort: bool,
    idle: Option<Box<IdleTimer>>,
    /// Reply bytes owed to the client, shared with the actors answering it.
    budget: Arc<Budget>,
}

/// What a reload means for a session: new settings to take, or shutdown.
enum Superseded {
    Settings(Arc<Live>),
    Shutdown,
}

/// The settings that superseded a session's: the latest published. They are superseded
/// themselves only at shutdown (every `superseded` token is a child of the server's stop
/// token, and a reload publishes before it cancels the old token).
fn superseded_by(updates: &mut watch::Receiver<Arc<Live>>) -> Superseded {
    let live = updates.borrow_and_update().clone();
    if live.superseded.is_cancelled() {
        Superseded::Shutdown
    } else {
        Superseded::Settings(live)
    }
}

impl<S: Duplex> Session<S> {
    /// A session with the settings `live`, which `client` was made with too, following later
    /// ones from `updates`.
    pub fn new(
        io: S,
        live: &Live,
        updates: watch::Receiver<Arc<Live>>,
        client: ClientState,
    ) -> Self {
        let config = live.session.clone();
        let parked = Parked {
            idle: config.idle_timeout.map(IdleTimer::new),
            config,
            client,
        };
        Session {
            io,
            updates,
            parked: Some(parked),
        }
    }

    /// Serves the client until it leaves, QUITs, misbehaves or the server shuts down, then
    /// calls `on_close`.
    ///
    /// Not an `async fn`: one would move `self` from its argument slot into a local of its own,
    /// and every parked session would carry both copies. The block below uses it in place.
    pub fn run(self, on_close: impl FnOnce() + Send) -> impl Future<Output = ()> + Send {
        let Session {
            mut io,
            mut updates,
            mut parked,
        } = self;
        async move {
            // The settings published last, in case a reload came since the accept.
            let superseded = match superseded_by(&mut updates) {
                Superseded::Settings(live) if parked.as_mut().is_some_and(|p| p.take(&live)) => {
                    live.superseded.clone().cancelled_owned()
                }
                _ => return on_close(),
            };
            // One wait for shutdown and reloads, registered once: a fresh `cancelled()` future
            // per request would lock the token's waiter list twice per request.
            tokio::pin!(superseded);
            while let Some(Parked { idle, client, .. }) = &mut parked {
                // Parked: a wait with nothing but the socket's own waker slot. One poll function
                // rather than `select!`, which would hold a future per branch.
                let woken = std::future::poll_fn(|cx| {
                    if let Poll::Ready(ready) = io.poll_read_ready(cx) {
                        return Poll::Ready(if ready.is_ok() {
                            Wake::Read
                        } else {
                            Wake::Close
                        });
                    }
                    if IdleTimer::poll_expired(idle, cx).is_ready() {
                        debug!("idle timeout; closing");
                        return Poll::Ready(Wake::Close);
                    }
                    if client.entry.poll_killed(cx).is_ready() {
                        debug!("killed (CLIENT KILL); closing");
                        return Poll::Ready(Wake::Close);
                    }
                    superseded.as_mut().poll(cx).map(|()| Wake::Superseded)
                })
                .await;
                match woken {
                    Wake::Read => {
                        let Some(serving) =
                            wake(&mut io, &mut parked, &mut updates, superseded.as_mut())
                        else {
                            break;
                        };
                        parked = serving.await;
                    }
                    Wake::Superseded => match superseded_by(&mut updates) {
                        Superseded::Settings(live)
                            if parked.as_mut().is_some_and(|p| p.take(&live)) =>
                        {
                            superseded.set(live.superseded.clone().cancelled_owned());
                        }
                        _ => break,
                    },
                    Wake::Close => break,
                }
            }
            on_close();
        }
    }
}

/// Why a parked session's wait ended.
enum Wake {
    /// The client sent something (or closed).
    Read,
    /// A reload or shutdown.
    Superseded,
    /// A read error, or the idle timeout.
    Close,
}

/// The future that serves a burst of activity, boxed: only busy sessions hold one. A plain
/// function, so that no temporary of it takes room in the parked session's task.
fn wake<'a, S: Duplex>(
    io: &'a mut S,
    parked: &mut Option<Parked>,
    updates: &'a mut watch::Receiver<Arc<Live>>,
    superseded: Pin<&'a mut WaitForCancellationFutureOwned>,
) -> Option<Pin<Box<impl Future<Output = Option<Parked>> + Send + use<'a, S>>>> {
    let state = State::resume(parked.take()?);
    Some(Box::pin(serve(io, state, updates, superseded)))
}

impl Parked {
    /// Takes the settings a reload published. `false` if the client must be closed.
    fn take(&mut self, live: &Live) -> bool {
        follow(&mut self.config, &mut self.client, &mut self.idle, live)
    }
}

/// What a reload changes for any session: its settings, who may log in, the idle timeout.
/// `false` if the client is logged in as a user that no longer exists: it must be closed, as
/// Redis's ACL DELUSER does.
fn follow(
    config: &mut Arc<SessionConfig>,
    client: &mut ClientState,
    idle: &mut Option<Box<IdleTimer>>,
    live: &Live,
) -> bool {
    if Arc::ptr_eq(config, &live.session) {
        return true;
    }
    *config = live.session.clone();
    IdleTimer::follow(idle, config.idle_timeout);
    if client.set_users(live.users.clone()) {
        true
    } else {
        debug!("its user was removed by a reload; closing");
        false
    }
}

/// Serves a burst of activity: reads, forwards and writes until the client is idle again
/// (returning what the session keeps while parked) or the session ends (`None`).
/// Not an `async fn`, for the reason given at [`Session::run`].
#[allow(clippy::manual_async_fn)]
fn serve<'a, S: Duplex>(
    io: &'a mut S,
    mut this: State,
    updates: &'a mut watch::Receiver<Arc<Live>>,
    mut superseded: Pin<&'a mut WaitForCancellationFutureOwned>,
) -> impl Future<Output = Option<Parked>> + Send + use<'a, S> {
    async move {
        let (mut reader, mut writer) = io.halves();
        loop {
            this.collect_ready();
            if this.abort {
                break;
            }
            if this.unparsed
                && !this.draining
                && !this.stalled()
                && this.pause.is_none()
                && this.outstanding < this.config.max_pipeline
            {
                this.process_input().await;
                continue;
            }
            let done = this.draining || (this.eof && !this.unparsed);
            if done && this.pending.is_empty() && this.out.is_empty() {
                break;
            }
            if this.parkable() {
                return Some(this.park());
            }
            let can_read = !this.draining
                && !this.eof
                && this.outstanding < this.config.max_pipeline
                && this.out_len < OUTPUT_HIGH_WATER;
            // Nothing buffered, nothing owed: the client holds no read buffer while it idles.
            if this.rbuf.is_empty() && this.outstanding == 0 && this.out.is_empty() {
                this.rbuf = BytesMut::new();
                // Nor a large list of owed commands left by a deep pipeline.
                if this.owed.capacity() > MAX_BATCH as usize {
                    this.owed = VecDeque::new();
                }
            }
            let waiting_upstream = matches!(this.pending.front(), Some(Pending::Upstream { .. }));
            tokio::select! {
                biased;
                reply = front_reply(&mut this.pending), if waiting_upstream => {
                    if let Some(Pending::Upstream { count, suppress, release, charged, sent, then, blocking, .. }) = this.pending.pop_front() {
                        this.resolved(blocking);
                        let reply = reply.unwrap_or(Err(UpstreamError::ConnectionLost));
                        let (reply, charged) = this.then(then, reply, charged);
                        this.deliver(reply, count, suppress, release, charged, sent);
                    }
                }
                written = write_some(&mut writer, &mut this.out), if !this.out.is_empty() => {
                    match written {
                        Ok(n) => {
                            this.out_len -= n;
                            this.budget.refund(n);
                            this.touch();
                            if let Some(metrics) = &this.config.metrics {
                                metrics.written(n);
                            }
                        }
                        Err(error) => {
                            debug!(%error, "client write failed");
                            break;
                        }
                    }
                }
                ready = reader.readable(), if can_read => {
                    if let Err(error) = ready {
                        debug!(%error, "client read failed");
                        break;
                    }
                    let missing = this.decoder.missing();
                    let read = std::future::poll_fn(|cx| {
                        Poll::Ready(read_arrived(&mut reader, &mut this.rbuf, missing, cx))
                    })
                    .await;
                    match read {
                        // The client has closed its side: what it sent is still carried out and
                        // answered, as Redis does, except while a blocking command is owed (its
                        // reply may never come): like Redis, drop the client then, and its
                        // pinned connection closes with it, discarding any transaction.
                        Ok((0, _)) => {
                            this.eof = true;
                            this.abort = this
                                .pending
                                .iter()
                                .any(|p| matches!(p, Pending::Upstream { blocking: true, .. }));
                        }
                        Ok((n, drained)) => {
                            if let Some(metrics) = &this.config.metrics {
                                metrics.read(n);
                            }
                            this.unparsed = true;
                            this.drained = drained;
                            this.touch();
                            if this.rbuf.len() as u64 > this.config.client_query_limit {
                                debug!("query buffer limit exceeded; closing");
                                break;
                            }
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            this.drained = true;
                        }
                        Err(error) => {
                            debug!(%error, "client read failed");
                            break;
                        }
                    }
                }
                // Published messages and the MONITOR feed, queued behind the replies already owed,
                // taken while the client is not too far behind; a cut-off is heard regardless.
                frame = next_frame(&mut this.subs.inbox, this.out_len < OUTPUT_HIGH_WATER), if this.subs.inbox.is_some() => match frame {
                    Fed::Frame(bytes) => this.fed(bytes),
                    Fed::Ended => {
                        debug!("pub/sub hub gone; closing");
                        break;
                    }
                    // The hub has dropped the client's subscriptions already. Closed at once,
                    // and everything queued for it freed.
                    Fed::CutOff => {
                        warn!(
                            client = this.client.id,
                            limit = this.config.client_output_limit,
                            "subscriber does not read its messages (output limit reached); closing"
                        );
                        this.subs = Subscriptions::default();
                        break;
                    }
                },
                frame = next_frame(&mut this.monitor, this.out_len < OUTPUT_HIGH_WATER), if this.monitor.is_some() => match frame {
                    Fed::Frame(bytes) => this.pending.push_back(Pending::Local { bytes, count: 0 }),
                    Fed::Ended => {
                        debug!("MONITOR feed ended (upstream lost); closing");
                        break;
                    }
                    Fed::CutOff => {
                        warn!(
                            client = this.client.id,
                            limit = this.config.client_output_limit,
                            "MONITOR client does not read its feed (output limit reached); closing"
                        );
                        break;
                    }
                },
                // A client owed replies is not idle, nor is a subscriber (as in Redis): the
                // timer runs only when neither.
                () = std::future::poll_fn(|cx| IdleTimer::poll_expired(&mut this.idle, cx)), if this.outstanding == 0 && this.out.is_empty() && !this.subs.active() => {
                    debug!("idle timeout; closing");
                    break;
                }
                () = std::future::poll_fn(|cx| this.client.entry.poll_killed(cx)), if !this.draining => {
                    debug!("killed (CLIENT KILL); closing");
                    break;
                }
                // A CLIENT PAUSE this client's next request waits out.
                () = std::future::poll_fn(|cx| poll_pause(&mut this.pause, cx)), if this.pause.is_some() => {
                    this.pause = None;
                }
                // It fires at shutdown and when a reload supersedes the settings: one wake-up
                // for both, so following reloads costs nothing per request.
                () = &mut superseded, if !this.draining => match superseded_by(updates) {
                    Superseded::Settings(live) => {
                        this.take_settings(&live);
                        superseded.set(live.superseded.clone().cancelled_owned());
                    }
                    Superseded::Shutdown => this.draining = true,
                },
            }
        }
        Box::pin(this.leave_pubsub()).await;
        None
    }
}

impl State {
    /// A parked session becomes busy: its client sent something.
    fn resume(parked: Parked) -> State {
        let Parked {
            config,
            client,
            idle,
        } = parked;
        let Queues { pending, out, owed } = Queues::take();
        let mut decoder = RequestDecoder::new(config.limits);
        decoder.set_unauthenticated(!client.authenticated);
        State {
            decoder,
            // A parked session owes nothing, so each burst starts a budget of its own.
            budget: Arc::new(Budget::new(config.output_limit())),
            config,
            client,
            tx: Tx::None,
            subs: Subscriptions::default(),
            monitor: None,
            rbuf: BytesMut::new(),
            unparsed: false,
            drained: false,
            pending,
            unresolved: 0,
            last_path: None,
            barrier: false,
            sync: false,
            eof: false,
            pause: None,
            outstanding: 0,
            owed,
            current: CommandId::OTHER,
            out,
            out_len: 0,
            draining: false,
            abort: false,
            idle,
        }
    }

    /// Whether the session holds nothing a parked one would lose: nothing read, owed or
    /// pending, the socket drained, and no transaction, subscription or MONITOR.
    fn parkable(&self) -> bool {
        self.drained
            && !self.draining
            && !self.eof
            && self.rbuf.is_empty()
            && self.outstanding == 0
            && self.pending.is_empty()
            && self.out.is_empty()
            && matches!(self.tx, Tx::None)
            && self.subs.inbox.is_none()
            && !self.subs.active()
            && self.monitor.is_none()
    }

    /// Keeps what outlives the burst; the buffers and queues, empty now, are freed.
    fn park(self) -> Parked {
        let State {
            config,
            client,
            idle,
            pending,
            out,
            owed,
            ..
        } = self;
        Queues { pending, out, owed }.give_back();
        Parked {
            config,
            client,
            idle,
        }
    }

    /// The client sent a request or took a reply.
    fn touch(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.last_activity = Instant::now();
        }
    }

    /// Takes the settings a reload published: limits, `[auth]`, `allow_monitor` and the idle
    /// timeout apply from now on, as Redis's CONFIG SET does to connected clients. The upstream
    /// connections stay those the client started with.
    fn take_settings(&mut self, live: &Live) {
        if !follow(&mut self.config, &mut self.client, &mut self.idle, live) {
            self.abort = true;
        }
        self.decoder.set_limits(self.config.limits);
        let limit = self.config.output_limit();
        self.budget.set_limit(limit);
        for feed in [&self.subs.inbox, &self.monitor].into_iter().flatten() {
            feed.queued.set_limit(limit);
        }
        self.decoder.set_unauthenticated(!self.client.authenticated);
    }

    /// Moves replies that are ready, in order, from `pending` to `out`.
    fn collect_ready(&mut self) {
        while let Some(front) = self.pending.front_mut() {
            let reply = match front {
                Pending::Local { bytes, count } => {
                    let (bytes, count) = (std::mem::take(bytes), *count);
                    self.pending.pop_front();
                    // A local slot holds one reply, or errors only.
                    let errors = if bytes.first() == Some(&b'-') {
                        u64::MAX
                    } else {
                        0
                    };
                    self.settle(count, errors, None);
                    self.queue_out(bytes);
                    continue;
                }
                Pending::Release(_) => {
                    if let Some(Pending::Release(lease)) = self.pending.pop_front() {
                        lease.release();
                    }
                    continue;
                }
                Pending::Upstream { rx, .. } => match rx.try_recv() {
                    Ok(reply) => reply,
                    Err(oneshot::error::TryRecvError::Empty) => return,
                    Err(oneshot::error::TryRecvError::Closed) => Err(UpstreamError::ConnectionLost),
                },
            };
            if let Some(Pending::Upstream {
                count,
                suppress,
                release,
                charged,
                sent,
                then,
                blocking,
                ..
            }) = self.pending.pop_front()
            {
                self.resolved(blocking);
                let (reply, charged) = self.then(then, reply, charged);
                self.deliver(reply, count, suppress, release, charged, sent);
            }
        }
    }

    /// An upstream slot is answered; a blocking one means the client is no longer blocked.
    fn resolved(&mut self, blocking: bool) {
        self.unresolved -= 1;
        if blocking {
            self.client.entry.set_blocked_on(None);
        }
    }

    /// Does what a reply was awaited for (see [`Then`]); returns the reply to pass on, and
    /// whether it is charged to the output budget.
    fn then(&mut self, then: Option<Box<Then>>, reply: Reply, charged: bool) -> (Reply, bool) {
        match (then.map(|then| *then), reply) {
            // An EXEC that selects `db` ran (an array, not a null or an error): the client is
            // in `db` now, as Redis's SELECT left it.
            (Some(Then::Select(db)), Ok(replies)) => {
                let ran =
                    replies.bytes.first() == Some(&b'*') && !replies.bytes.starts_with(b"*-1");
                if ran {
                    if let Err(error) = self.client.set_db(db) {
                        // The db the transaction left the client in has no shared connection:
                        // the client cannot go on where Redis would have it.
                        warn!(%error, "cannot follow a SELECT run in a transaction; closing");
                        self.abort = true;
                    }
                }
                (Ok(replies), charged)
            }
            (Some(Then::Count(count, argument)), Ok(replies)) => {
                self.recount(count, argument, replies, charged)
            }
            (Some(Then::Replay(request)), Ok(replies)) => {
                if charged {
                    self.budget.refund(replies.bytes.len());
                }
                let mut args = Args::new(&request);
                let name = args.next().unwrap_or_default();
                let (bytes, effect) = self.client.handle(name, args, Some(&replies.bytes));
                self.decoder.set_unauthenticated(!self.client.authenticated);
                let bytes = match effect {
                    Effect::AuthFailed => {
                        self.auth_failed();
                        bytes
                    }
                    // Only one check is asked for a command.
                    Effect::Check(_) | Effect::Send(_) => {
                        encode::error("redmux: AUTH could not be checked")
                    }
                    Effect::None | Effect::Reset => bytes,
                };
                let errors = u64::from(bytes.first() == Some(&b'-'));
                (Ok(Replies { bytes, errors }), false)
            }
            (_, reply) => (reply, charged),
        }
    }

    /// A failed AUTH, for the metrics.
    fn auth_failed(&self) {
        if let Some(metrics) = &self.config.metrics {
            metrics.auth_failed();
        }
    }

    /// Queues the replies of an upstream batch for the client, and gives back the pinned
    /// connection it was holding, if any.
    fn deliver(
        &mut self,
        reply: Reply,
        count: u32,
        suppress: bool,
        release: Option<Lease>,
        charged: bool,
        sent: Instant,
    ) {
        if let Some(lease) = release {
            lease.release();
        }
        // Replies the client does not get (CLIENT REPLY OFF, a DISCARD of redmux's own) are
        // not counted as its errors, nor timed.
        let errors = match &reply {
            _ if suppress => 0,
            Ok(replies) => replies.errors,
            Err(UpstreamError::OutputLimit) => 0,
            Err(_) => u64::MAX,
        };
        self.settle(count, errors, (!suppress).then_some(sent));
        match reply {
            Ok(replies) if suppress => {
                if charged {
                    self.budget.refund(replies.bytes.len());
                }
            }
            Ok(replies) if charged => self.enqueue(replies.bytes),
            Ok(replies) => self.queue_out(replies.bytes),
            Err(UpstreamError::OutputLimit) => self.over_limit(),
            Err(_) if suppress => {}
            Err(error) => self.queue_out(error.replies(count)),
        }
    }

    /// The replies to the `count` oldest outstanding requests are in. With metrics on, each is
    /// counted for its command: bit `i` of `errors` marks reply `i` as an error, and `sent` is
    /// when the requests went upstream (one clock read for the batch).
    fn settle(&mut self, count: u32, errors: u64, sent: Option<Instant>) {
        self.outstanding -= count as usize;
        let Some(metrics) = &self.config.metrics else {
            return;
        };
        let latency = sent.map(|sent| sent.elapsed());
        for i in 0..count {
            let Some(command) = self.owed.pop_front() else {
                break;
            };
            let error = errors.checked_shr(i).is_some_and(|bits| bits & 1 == 1);
            metrics.reply(command, error, latency);
        }
    }

    /// A request was taken on: its reply is owed.
    fn owe(&mut self) {
        self.outstanding += 1;
        if self.config.metrics.is_some() {
            self.owed.push_back(self.current);
        }
    }

    /// Queues bytes redmux produced itself: they count against the output budget too.
    fn queue_out(&mut self, bytes: Bytes) {
        if !self.budget.charge(bytes.len()) {
            self.budget.refund(bytes.len());
            return self.over_limit();
        }
        self.enqueue(bytes);
    }

    /// Queues bytes already charged to the budget.
    fn enqueue(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.out_len += bytes.len();
            self.out.push_back(bytes);
        }
    }

    /// The client does not read what it is sent: close it, as Redis does past its
    /// client-output-buffer-limit.
    fn over_limit(&mut self) {
        if !self.abort {
            warn!(
                limit = self.config.client_output_limit,
                "client output limit reached (it does not read its replies); closing"
            );
            self.abort = true;
        }
    }

    /// Parses buffered requests while the pipeline limit allows, forwarding runs of them.
    /// Stops at a request that must wait for a barrier (see [`Path`]).
    async fn process_input(&mut self) {
        self.barrier = false;
        if self.unresolved == 0 {
            self.sync = false;
        }
        // `rbuf[..run_len]` holds `run_count` canonical requests for the current connection.
        let mut run_len = 0;
        let mut run_count = 0;
        loop {
            if self.outstanding >= self.config.max_pipeline {
                break;
            }
            let frame = match self.decoder.decode(&self.rbuf[run_len..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.unparsed = false;
                    break;
                }
                Err(error) => {
                    self.flush_run(&mut run_len, &mut run_count).await;
                    debug!(%error, "protocol error; closing");
                    // Counted as a request of no known command, answered with an error.
                    self.current = CommandId::OTHER;
                    if let Some(metrics) = &self.config.metrics {
                        metrics.command(CommandId::OTHER);
                    }
                    self.reply_locally(error.reply());
                    self.draining = true;
                    break;
                }
            };
            let Some(request) = frame.command_bytes(&self.rbuf[run_len..]) else {
                // Input Redis ignores without a reply.
                self.flush_run(&mut run_len, &mut run_count).await;
                self.rbuf.advance(frame.consumed());
                continue;
            };
            let profile = self.client.upstreams().profile();
            let (command, action) = match self.decoder.name().and_then(|at| request.get(at)) {
                Some(name) => command::action_named(request, name, profile),
                None => command::action(request, profile),
            };
            let action = self.uncounted(action);
            let plain = self.client.reply_mode == ReplyMode::On
                && self.client.authenticated
                && (self.client.resp3 || !self.subs.active());
            let extends_run = run_count > 0
                && plain
                && action == Action::Forward
                && matches!(
                    frame,
                    Frame::Command {
                        rewritten: None,
                        ..
                    }
                );
            // Whether the request may write, when that matters: under CLIENT PAUSE, and in
            // MULTI (for the EXEC).
            let paused = self.client.clients().paused();
            let in_multi = matches!(self.tx, Tx::Multi { .. });
            let writes = (paused.is_some() || in_multi) && command::may_write(command, request);
            if self.sync && self.unresolved > 0 {
                self.flush_run(&mut run_len, &mut run_count).await;
                self.barrier = true;
                break;
            }
            // The barrier: nothing to check while a run grows, or while nothing is owed.
            if !extends_run && (self.unresolved > 0 || run_count > 0) {
                if let Some(path) = self.path_of(&action, request) {
                    if run_count > 0 && path != self.current_path() {
                        self.flush_run(&mut run_len, &mut run_count).await;
                    }
                    if self.unresolved > 0 && Some(path) != self.last_path {
                        // It stays in `rbuf`, to be parsed again once the barrier lifts.
                        self.barrier = true;
                        break;
                    }
                }
            }
            if let Some(mode) = paused {
                let write = mode == PauseMode::All
                    || writes
                    || (command.name() == "exec"
                        && matches!(self.tx, Tx::Multi { writes: true, .. }));
                if let Some(until) = self.client.clients().held(write) {
                    // It waits, unparsed, for the pause to end (or for UNPAUSE).
                    self.flush_run(&mut run_len, &mut run_count).await;
                    let clients = self.client.clients().clone();
                    self.pause = Some(Box::pin(async move { clients.wait(until).await }));
                    break;
                }
            }
            if let Tx::Multi {
                writes: any,
                queued,
                ..
            } = &mut self.tx
            {
                *any |= writes;
                *queued += 1;
                self.client.entry.set_multi(Some(*queued));
            }
            self.current = command;
            self.client.entry.command(command);
            if let Some(metrics) = &self.config.metrics {
                metrics.command(command);
            }
            if action == Action::Forward && plain {
                if let Frame::Command {
                    len,
                    rewritten: None,
                } = frame
                {
                    // The common case: extend the run, no copy.
                    run_len += len;
                    run_count += 1;
                    self.owe();
                    if run_count >= MAX_BATCH {
                        self.flush_run(&mut run_len, &mut run_count).await;
                    }
                    continue;
                }
            }
            self.flush_run(&mut run_len, &mut run_count).await;
            // The frame is now at the front of the buffer.
            let consumed = frame.consumed();
            let request = match frame {
                Frame::Command {
                    rewritten: Some(bytes),
                    ..
                } => {
                    self.rbuf.advance(consumed);
                    bytes
                }
                _ => self.take_front(consumed),
            };
            // Boxed: only commands off the plain forwarding path get here, and inline its state
            // would sit in every idle client's task.
            if !Box::pin(self.execute(action, request)).await {
                break;
            }
        }
        self.flush_run(&mut run_len, &mut run_count).await;
        if self.draining || self.abort {
            self.unparsed = false;
        }
    }

    /// Carries out one request that is not part of a plain forwarded run. `false` once the
    /// client must not be read any further.
    async fn execute(&mut self, action: Action, request: Bytes) -> bool {
        let go_on = self.carry_out(action, request).await;
        self.publish_state();
        if self.client.entry.killed() {
            // CLIENT KILL: of this very client (SKIPME no) its reply is written, then it
            // closes; of another, the kill branch of the session closes it.
            self.draining = true;
            return false;
        }
        go_on
    }

    async fn carry_out(&mut self, action: Action, request: Bytes) -> bool {
        if let Action::Reject(error) = action {
            if let Tx::Multi { dirty, .. } = &mut self.tx {
                *dirty = true;
            }
            self.reply_locally(error);
            return true;
        }
        if !self.client.authenticated && !allowed_before_auth(&action, &request) {
            // Redis refuses EXEC like any command, but in EXEC's own words.
            let name = Args::new(&request).next().unwrap_or_default();
            self.reply_locally(if name.eq_ignore_ascii_case(b"exec") {
                Bytes::from_static(
                    b"-EXECABORT Transaction discarded because of: NOAUTH Authentication required.\r\n",
                )
            } else {
                Bytes::from_static(b"-NOAUTH Authentication required.\r\n")
            });
            return true;
        }
        if let Tx::Multi { dirty, db, .. } = &mut self.tx {
            let mut args = Args::new(&request);
            let name = args.next().unwrap_or_default();
            if action == Action::Connection && name.eq_ignore_ascii_case(b"select") {
                // Queued by Redis, which runs it at EXEC: the commands queued after it run in
                // that database, and the client stays there after EXEC.
                if let Ok(selected) = self.client.database(args) {
                    *db = Some(selected);
                }
                let timeout = Some(self.config.request_timeout);
                self.forward_one(request, timeout, None).await;
                return true;
            }
            // Redis would queue these and change the connection's state at EXEC; redmux keeps
            // that state itself, so it refuses them here and the transaction aborts.
            let stateful = matches!(action, Action::Connection | Action::PubSub { .. });
            if stateful && !name.eq_ignore_ascii_case(b"reset") {
                *dirty = true;
                let name = String::from_utf8_lossy(name).to_ascii_uppercase();
                self.reply_locally(encode::error(&format!(
                    "redmux: {name} inside MULTI is not supported"
                )));
                return true;
            }
        }
        if self.subs.active() && !self.client.resp3 {
            if let Some(reply) = subscribed_context(&action, &request) {
                self.reply_locally(reply);
                return true;
            }
        }
        match action {
            Action::Forward => {
                let timeout = Some(self.config.request_timeout);
                self.forward_one(request, timeout, None).await;
            }
            Action::Reply(bytes) | Action::Reject(bytes) => self.reply_locally(bytes),
            Action::ReplyAndClose(bytes) => {
                self.reply_locally(bytes);
                self.draining = true;
                return false;
            }
            Action::Drop => {
                self.abort = true;
                return false;
            }
            Action::Connection
                if self.client.pass_through()
                    && Args::new(&request)
                        .next()
                        .is_some_and(|name| name.eq_ignore_ascii_case(b"acl")) =>
            {
                // ACL WHOAMI: the client's connection is logged in as its user, so Redis
                // answers it, and checks it against that user's permissions.
                let timeout = Some(self.config.request_timeout);
                self.forward_one(request, timeout, None).await;
            }
            Action::Connection => {
                let mut args = Args::new(&request);
                let name = args.next().unwrap_or_default();
                // A SKIP set before this command silences it; OFF (even if this command set
                // it) silences it; `CLIENT REPLY ON` is answered.
                let skip = self.client.reply_mode == ReplyMode::Skip;
                let before = self.client.target();
                let (reply, effect) = self.client.handle(name, args, None);
                self.decoder.set_unauthenticated(!self.client.authenticated);
                match effect {
                    Effect::Check(auth) => {
                        self.check_auth(auth, request).await;
                        return true;
                    }
                    Effect::Send(unblock) => {
                        self.owe();
                        let suppress = self.take_suppress();
                        let upstreams = self.client.upstreams();
                        let rx = upstreams.control(unblock, upstreams.default_target());
                        self.await_upstream(rx, Path::Control, suppress);
                        return true;
                    }
                    Effect::AuthFailed => self.auth_failed(),
                    Effect::None | Effect::Reset => {}
                }
                if let Tx::Watching(_) = &self.tx {
                    // The watching connection follows the client's db and protocol, so the
                    // commands it carries run where Redis would run them (the watched keys
                    // keep the db they were watched in).
                    let after = self.client.target();
                    let mut follow = Vec::new();
                    if after.db != before.db {
                        follow.push(encode_command([
                            &b"SELECT"[..],
                            after.db.to_string().as_bytes(),
                        ]));
                    }
                    if after.resp3 != before.resp3 {
                        let proto: &[u8] = if after.resp3 { b"3" } else { b"2" };
                        follow.push(encode_command([&b"HELLO"[..], proto]));
                    }
                    if !follow.is_empty() {
                        let count = follow.len() as u32;
                        let batch = Batch {
                            frames: Bytes::from(follow.concat()),
                            count,
                            timeout: Some(self.config.request_timeout),
                            ..Batch::default()
                        };
                        for _ in 0..count {
                            self.owe();
                        }
                        // Their replies are Redis's, not the client's: dropped.
                        self.send(batch, true).await;
                    }
                }
                if effect == Effect::Reset {
                    // The pinned connection goes back (cleaned by its own RESET, which
                    // discards the transaction) once the requests already sent on it are in.
                    match std::mem::replace(&mut self.tx, Tx::None) {
                        Tx::Watching(lease) | Tx::Multi { lease, .. } => {
                            self.pending.push_back(Pending::Release(lease));
                        }
                        Tx::None => {}
                    }
                    self.monitor = None;
                    self.reset_pubsub().await;
                }
                // `CLIENT REPLY ON` clears a pending SKIP before it answers (Redis's
                // `clientCommand`): the only CLIENT subcommand that leaves replies on.
                let reply_on =
                    name.eq_ignore_ascii_case(b"client") && self.client.reply_mode == ReplyMode::On;
                let suppress = (skip && !reply_on) || self.client.reply_mode == ReplyMode::Off;
                if skip && self.client.reply_mode == ReplyMode::Skip && !reply.is_empty() {
                    self.client.reply_mode = ReplyMode::On;
                }
                self.owe();
                let bytes = if suppress { Bytes::new() } else { reply };
                self.pending.push_back(Pending::Local { bytes, count: 1 });
            }
            Action::Transaction(command) => self.transaction(command, request).await,
            Action::Count(count) => self.forward_counted(count, request).await,
            Action::Control if matches!(self.tx, Tx::Multi { .. }) => {
                // Queued, as Redis queues it.
                let timeout = Some(self.config.request_timeout);
                self.forward_one(request, timeout, None).await;
            }
            Action::Control => {
                self.owe();
                let suppress = self.take_suppress();
                let rx = self
                    .client
                    .upstreams()
                    .control(request, self.client.target());
                self.await_upstream(rx, Path::Control, suppress);
            }
            Action::Monitor if matches!(self.tx, Tx::Multi { .. }) => {
                // Queued in a transaction: Redis refuses it at EXEC.
                let timeout = Some(self.config.request_timeout);
                self.forward_one(request, timeout, None).await;
            }
            Action::Monitor if !self.config.allow_monitor => self.reply_locally(encode::error(
                "redmux: MONITOR is disabled (upstream.allow_monitor = false)",
            )),
            Action::Monitor if self.monitor.is_some() => {
                self.reply_locally(Bytes::from_static(b"+OK\r\n"))
            }
            Action::Monitor => {
                let (feed, inbox) = Feed::new(self.config.output_limit());
                let identity = self.client.identity();
                let rx = monitor::start(self.client.upstreams(), identity.as_ref(), inbox).await;
                self.monitor = Some(feed);
                self.owe();
                // Its `+OK` is a plain reply, which CLIENT REPLY OFF and SKIP silence.
                let suppress = self.take_suppress();
                self.await_upstream(rx, Path::Monitor, suppress);
            }
            Action::PubSub { kind, subscribe } => {
                // Confirmations are push output, never silenced, but a CLIENT REPLY SKIP is
                // used up by this command as by any other.
                self.take_suppress();
                let names: Vec<Bytes> = Args::new(&request)
                    .skip(1)
                    .map(|name| request.slice_ref(name))
                    .collect();
                if subscribe {
                    self.subscribe(kind, names).await;
                } else {
                    self.unsubscribe(kind, names).await;
                }
            }
            Action::Block(block) => {
                // Queued in a transaction it does not block: the normal timeout applies.
                let (timeout, blocking) = match self.tx {
                    Tx::Multi { .. } => (Some(self.config.request_timeout), false),
                    _ => (block.map(|t| t + self.config.request_timeout), true),
                };
                if self.eof && blocking {
                    // Nobody would read the reply, and it may never come.
                    self.abort = true;
                    return false;
                }
                let lease = if matches!(self.tx, Tx::None) {
                    match self.client.upstreams().pinned(self.client.target()).await {
                        Ok(lease) => Some(lease),
                        Err(error) => {
                            self.reply_locally(error.replies(1));
                            return true;
                        }
                    }
                } else {
                    // In a transaction it is queued (and never blocks); while watching it
                    // blocks on the client's own connection, which it holds already.
                    None
                };
                if blocking {
                    let connection = lease.as_ref().or(self.held()).map(Lease::connection);
                    self.client.entry.set_blocked_on(connection.cloned());
                }
                let batch = Batch {
                    frames: request,
                    count: 1,
                    timeout,
                    release: lease,
                    blocking,
                    ..Batch::default()
                };
                self.forward(batch).await;
            }
        }
        true
    }

    /// Shows what CLIENT LIST shows of the client as it is after a command off the plain path
    /// (the plain path changes none of it).
    fn publish_state(&self) {
        let entry = &self.client.entry;
        entry.set_multi(match &self.tx {
            Tx::Multi { queued, .. } => Some(*queued),
            _ => None,
        });
        for (kind, count) in [
            (Subscription::Channel, command::Namespace::Channel),
            (Subscription::Pattern, command::Namespace::Pattern),
            (Subscription::Shard, command::Namespace::Shard),
        ] {
            entry.set_subscriptions(kind, self.subs.len(count));
        }
        entry.set_flag(flag::PUBSUB, self.subs.active());
        entry.set_flag(flag::MONITOR, self.monitor.is_some());
    }

    /// AUTH, or HELLO with AUTH, when Redis checks the credentials: `auth` goes on the
    /// connection AUTH is checked on (on the client's own watching connection while it
    /// watches, which Redis then logs in too), and the command is handled again once Redis has
    /// answered. Nothing after it runs before that: it may change who the client is.
    async fn check_auth(&mut self, auth: Bytes, request: Bytes) {
        let name = Args::new(&request).next().unwrap_or_default();
        let refusal = if self.subs.hub.is_some() {
            Some("redmux: AUTH while subscribed is not supported")
        } else if matches!(self.tx, Tx::Watching(_)) && name.eq_ignore_ascii_case(b"hello") {
            Some("redmux: HELLO with AUTH while watching is not supported")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return self.reply_locally(encode::error(refusal));
        }
        let via = match self.tx {
            Tx::None => Some(self.client.upstreams().auth_checker()),
            _ => None,
        };
        let batch = Batch {
            frames: auth,
            count: 1,
            timeout: Some(self.config.request_timeout),
            then: Some(Box::new(Then::Replay(request))),
            via,
            ..Batch::default()
        };
        self.sync = true;
        self.forward(batch).await;
    }

    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH (with the arity that changes state).
    async fn transaction(&mut self, command: Transaction, request: Bytes) {
        let timeout = Some(self.config.request_timeout);
        match (command, std::mem::replace(&mut self.tx, Tx::None)) {
            // Opening: take a pinned connection (the one WATCH holds, or a new one).
            (Transaction::Multi, Tx::None) | (Transaction::Watch, Tx::None) => {
                match self.client.upstreams().pinned(self.client.target()).await {
                    Ok(lease) => {
                        self.tx = if command == Transaction::Multi {
                            Tx::Multi {
                                lease,
                                dirty: false,
                                db: None,
                                writes: false,
                                queued: 0,
                            }
                        } else {
                            Tx::Watching(lease)
                        };
                        self.forward_one(request, timeout, None).await;
                    }
                    Err(error) => self.reply_locally(error.replies(1)),
                }
            }
            (Transaction::Multi, Tx::Watching(lease)) => {
                self.tx = Tx::Multi {
                    lease,
                    dirty: false,
                    db: None,
                    writes: false,
                    queued: 0,
                };
                self.forward_one(request, timeout, None).await;
            }
            // A command redmux refused while queuing aborts the transaction: DISCARD it
            // upstream (that reply is dropped) and answer as Redis does.
            (Transaction::Exec, Tx::Multi { lease, dirty: true, .. }) => {
                let discard = Batch {
                    frames: encode_command([&b"DISCARD"[..]]),
                    count: 1,
                    timeout,
                    release: Some(lease),
                    ..Batch::default()
                };
                self.owe();
                self.send(discard, true).await;
                self.reply_locally(Bytes::from_static(
                    b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                ));
            }
            // Closing: the last request on the pinned connection; it is given back after. An
            // EXEC whose transaction SELECTs moves the client once it has run, and nothing
            // after it runs before that is known.
            (Transaction::Exec, Tx::Multi { lease, db, .. }) => {
                self.sync = db.is_some();
                let batch = Batch {
                    frames: request,
                    count: 1,
                    timeout,
                    release: Some(lease),
                    then: db.map(|db| Box::new(Then::Select(db))),
                    ..Batch::default()
                };
                self.forward(batch).await;
            }
            (Transaction::Discard, Tx::Multi { lease, .. })
            | (Transaction::Unwatch, Tx::Watching(lease)) => {
                self.forward_one(request, timeout, Some(lease)).await;
            }
            // Without a transaction there is nothing to close: Redis's own answers. Its arity
            // check comes first, and refuses EXEC in EXEC's words.
            (Transaction::Exec, Tx::None) if Args::new(&request).remaining() > 1 => {
                self.reply_locally(Bytes::from_static(
                    b"-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n",
                ))
            }
            (Transaction::Exec, Tx::None) => self.reply_locally(encode::error("EXEC without MULTI")),
            (Transaction::Discard, Tx::None) => {
                self.reply_locally(encode::error("DISCARD without MULTI"))
            }
            (Transaction::Unwatch, Tx::None) => self.reply_locally(Bytes::from_static(b"+OK\r\n")),
            // Everything else goes to the pinned connection, whose Redis answers it (nested
            // MULTI, WATCH inside MULTI, EXEC without MULTI while watching, queued UNWATCH...).
            (_, tx) => {
                self.tx = tx;
                self.forward_one(request, timeout, None).await;
            }
        }
    }

    /// (P|S)SUBSCRIBE: a confirmation per name with this client's count, sent when the hub
    /// answers (see [`State::open_slot`]). Push output: CLIENT REPLY OFF does not silence it.
    /// On a hub logged in as the client's own user, Redis may refuse it (-NOPERM): nothing
    /// after it runs before the answer is in, so that no count assumes it succeeded.
    ///
    /// Constant work per name, and a long list gives the runtime back its thread now and then:
    /// one request may name a million channels, and other clients must not wait for it.
    async fn subscribe(&mut self, kind: command::Namespace, names: Vec<Bytes>) {
        let verb = kind.command(true);
        let mut confirmation = Vec::new();
        let mut added = Vec::new();
        for name in names {
            if !self.subs.names(kind).contains(&name) {
                // A copy: the name is a slice of the buffer the request was read into, which
                // may be 64 KiB or more, and the subscription may last as long as the client.
                let name = Bytes::copy_from_slice(&name);
                let at = self.subs.names(kind).insert(name.clone());
                added.push((name, at));
            }
            let count = self.subs.count(kind);
            self.push_frame(&mut confirmation, verb, Some(&name), count);
            tokio::task::coop::consume_budget().await;
        }
        let confirmation = Bytes::from(confirmation);
        self.owe();
        if added.is_empty() {
            self.pending.push_back(Pending::Local {
                bytes: confirmation,
                count: 1,
            });
            return;
        }
        let inbox = match self.subs.inbox {
            Some(_) => None,
            None => {
                let (feed, inbox) = Feed::new(self.config.output_limit());
                self.subs.inbox = Some(feed);
                Some(inbox)
            }
        };
        let hub = match &self.subs.hub {
            Some(hub) => hub.clone(),
            None => {
                let hub = self
                    .client
                    .upstreams()
                    .pubsub(self.client.identity().as_ref());
                self.subs.hub = Some(hub.clone());
                hub
            }
        };
        let new = added.iter().map(|(name, _)| name.clone()).collect();
        hub.subscribe(self.client.id, kind, new, inbox).await;
        self.open_slot(confirmation, kind, added);
        if self.client.identity().is_some() {
            self.sync = true;
        }
    }

    /// A reply slot for one reply that comes from elsewhere than an upstream actor: not
    /// charged to the output budget by anyone (it is one small reply).
    fn await_upstream(&mut self, rx: oneshot::Receiver<Reply>, path: Path, suppress: bool) {
        self.last_path = Some(path);
        self.unresolved += 1;
        self.pending.push_back(Pending::Upstream {
            rx,
            count: 1,
            suppress,
            release: None,
            charged: false,
            sent: Instant::now(),
            blocking: false,
            then: None,
        });
    }

    /// (P|S)UNSUBSCRIBE: a frame per name (every subscription of the kind when none is given,
    /// in subscription order, or one with a null name when there is none). Constant work per
    /// name, as for [`State::subscribe`]. When the client held any of them, the frames go
    /// once the hub has unsubscribed upstream what nobody else wants: a request of the client
    /// on another path waits for them (see [`Path`]), and so finds Redis's counts without the
    /// subscriptions it dropped.
    async fn unsubscribe(&mut self, kind: command::Namespace, names: Vec<Bytes>) {
        let verb = kind.command(false);
        let mut reply = Vec::new();
        let mut removed = Vec::new();
        if names.is_empty() {
            removed = self.subs.names(kind).take_in_order();
            // The count as each one goes: the others of the kind are still there.
            let left = self.subs.count(kind);
            for (i, name) in removed.iter().enumerate() {
                let count = left + removed.len() - 1 - i;
                self.push_frame(&mut reply, verb, Some(name), count);
                tokio::task::coop::consume_budget().await;
            }
            if removed.is_empty() {
                self.push_frame(&mut reply, verb, None, left);
            }
        }
        for name in &names {
            if let Some(name) = self.subs.names(kind).remove(name) {
                removed.push(name);
            }
            let count = self.subs.count(kind);
            self.push_frame(&mut reply, verb, Some(name), count);
            tokio::task::coop::consume_budget().await;
        }
        self.owe();
        let reply = Bytes::from(reply);
        match (removed.is_empty(), self.subs.hub.clone()) {
            (false, Some(hub)) => {
                hub.unsubscribe(self.client.id, kind, removed).await;
                self.open_slot(reply, kind, Vec::new());
            }
            _ => self.pending.push_back(Pending::Local {
                bytes: reply,
                count: 1,
            }),
        }
    }

    /// A reply slot the hub's answer completes: `frames` if it did what was asked, its error
    /// if Redis refused (then the names in `added` are taken back), after the messages Redis
    /// sent before its answer.
    fn open_slot(&mut self, frames: Bytes, kind: command::Namespace, added: Vec<(Bytes, u64)>) {
        let (reply, rx) = oneshot::channel();
        self.subs.held().open.push_back(Open {
            reply,
            before: Vec::new(),
            frames,
            kind,
            added,
        });
        self.last_path = Some(Path::PubSub);
        self.unresolved += 1;
        self.pending.push_back(Pending::Upstream {
            rx,
            count: 1,
            suppress: false,
            release: None,
            // The session charges what it puts in the reply itself.
            charged: true,
            sent: Instant::now(),
            blocking: false,
            then: None,
        });
    }

    /// A frame from the hub: a message, or the answer to the oldest open (un)subscription.
    /// A message that comes while one is open is one Redis sent before that answer, so it
    /// goes out ahead of it.
    fn fed(&mut self, frame: Bytes) {
        if pubsub::Delivery::of(&frame) != pubsub::Delivery::Message {
            return self.answered(frame);
        }
        if !self.subs.wants(&frame) {
            return;
        }
        // Messages come as the RESP2 subscriber connection sent them; in RESP3 they are
        // pushes, decided by the protocol the client speaks now.
        let frame = if self.client.resp3 {
            as_push(frame)
        } else {
            frame
        };
        if !self.subs.owed() {
            return self.pending.push_back(Pending::Local {
                bytes: frame,
                count: 0,
            });
        }
        if !self.budget.charge(frame.len()) {
            self.over_limit();
        }
        if let Some(open) = self
            .subs
            .held
            .as_mut()
            .and_then(|held| held.open.front_mut())
        {
            open.before.push(frame);
        }
    }

    /// The hub answered the oldest open (un)subscription: done (an empty frame), or refused
    /// with Redis's error, which the client gets instead of the confirmations, its state as if
    /// the command never ran.
    fn answered(&mut self, answer: Bytes) {
        let Some(held) = self.subs.held.as_mut() else {
            return;
        };
        let Some(open) = held.open.pop_front() else {
            return;
        };
        let refused = !answer.is_empty();
        if refused {
            let names = &mut held.kinds[kind_index(open.kind)];
            for (name, at) in &open.added {
                names.remove_added(name, *at);
            }
        }
        self.finish_slot(open, refused.then_some(answer));
        if !self.subs.active() && !self.subs.owed() {
            // Nothing held, nothing owed: the hub forgets the client, which may park.
            if let Some(hub) = std::mem::take(&mut self.subs).hub {
                hub.forget(self.client.id);
            }
        }
    }

    /// Completes an open slot: the messages before it, then its frames or `error`.
    fn finish_slot(&mut self, open: Open, error: Option<Bytes>) {
        let Open {
            reply,
            before,
            frames,
            ..
        } = open;
        let answer = error.as_ref().unwrap_or(&frames);
        if !self.budget.charge(answer.len()) {
            self.over_limit();
        }
        if before.is_empty() && error.is_none() {
            // The common case, and the one of a million confirmations: no copy.
            let _ = reply.send(Ok(Replies::from(frames)));
            return;
        }
        let mut bytes =
            BytesMut::with_capacity(before.iter().map(Bytes::len).sum::<usize>() + answer.len());
        for message in &before {
            bytes.extend_from_slice(message);
        }
        bytes.extend_from_slice(answer);
        let replies = Replies {
            bytes: bytes.freeze(),
            errors: u64::from(error.is_some()),
        };
        let _ = reply.send(Ok(replies));
    }

    /// Drops every subscription (the client leaving).
    async fn leave_pubsub(&mut self) {
        if let Some(hub) = std::mem::take(&mut self.subs).hub {
            hub.leave(self.client.id).await;
        }
    }

    /// RESET drops every subscription. What the hub has not answered yet is confirmed now,
    /// as Redis would have before the RESET; the client's next request on another path waits
    /// until the hub has unsubscribed upstream what nobody else wants (a reply slot of no
    /// reply of its own).
    async fn reset_pubsub(&mut self) {
        let Subscriptions { held, hub, .. } = std::mem::take(&mut self.subs);
        for open in held.map(|held| held.open).unwrap_or_default() {
            self.finish_slot(open, None);
        }
        let Some(hub) = hub else {
            return;
        };
        let rx = hub.reset(self.client.id).await;
        self.last_path = Some(Path::PubSub);
        self.unresolved += 1;
        self.pending.push_back(Pending::Upstream {
            rx,
            count: 0,
            suppress: false,
            release: None,
            charged: false,
            sent: Instant::now(),
            blocking: false,
            then: None,
        });
    }

    /// A count command stays on the plain forwarding path unless this upstream set's hubs or
    /// their clients hold a subscription (one atomic load): with none, Redis's count is right.
    /// In a transaction it is queued as it is (EXEC's reply is not corrected).
    fn uncounted(&self, action: Action) -> Action {
        match action {
            Action::Count(_)
                if matches!(self.tx, Tx::Multi { .. })
                    || !self.client.upstreams().pubsub_registry().active() =>
            {
                Action::Forward
            }
            action => action,
        }
    }

    /// Forwards a count command; its reply is corrected ([`Then::Count`]).
    async fn forward_counted(&mut self, count: command::Count, request: Bytes) {
        let argument = count
            .argument_index()
            .and_then(|i| Args::new(&request).nth(i))
            .map(|arg| request.slice_ref(arg));
        let batch = Batch {
            frames: request,
            count: 1,
            timeout: Some(self.config.request_timeout),
            then: Some(Box::new(Then::Count(count, argument))),
            ..Batch::default()
        };
        self.forward(batch).await;
    }

    /// Redis's count corrected for what redmux's hubs and their clients hold.
    fn recount(
        &self,
        count: command::Count,
        argument: Option<Bytes>,
        replies: Replies,
        charged: bool,
    ) -> (Reply, bool) {
        let registry = self.client.upstreams().pubsub_registry();
        match registry.correct(count, argument.as_deref(), &replies.bytes) {
            Some(bytes) => {
                if charged {
                    self.budget.refund(replies.bytes.len());
                }
                (Ok(Replies { bytes, errors: 0 }), false)
            }
            None => (Ok(replies), charged),
        }
    }

    /// Appends a 3-element subscription frame to `out`: RESP2 array or RESP3 push.
    fn push_frame(&self, out: &mut Vec<u8>, verb: &str, name: Option<&[u8]>, count: usize) {
        let kind = if self.client.resp3 { b'>' } else { b'*' };
        encode::put_header(out, kind, 3);
        encode::put_bulk(out, verb.as_bytes());
        match name {
            Some(name) => encode::put_bulk(out, name),
            None => out.extend_from_slice(&self.client.null()),
        }
        encode::put_integer(out, count as i64);
    }

    /// Answers one request locally, honouring CLIENT REPLY OFF and SKIP.
    fn reply_locally(&mut self, bytes: Bytes) {
        let bytes = if self.take_suppress() {
            Bytes::new()
        } else {
            bytes
        };
        self.owe();
        self.pending.push_back(Pending::Local { bytes, count: 1 });
    }

    /// Whether this request's reply is to be dropped (CLIENT REPLY OFF, or SKIP once).
    fn take_suppress(&mut self) -> bool {
        match self.client.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::Skip => {
                self.client.reply_mode = ReplyMode::On;
                true
            }
        }
    }

    /// The pinned connection the client holds for its transaction, if any.
    fn held(&self) -> Option<&Lease> {
        match &self.tx {
            Tx::Watching(lease) | Tx::Multi { lease, .. } => Some(lease),
            Tx::None => None,
        }
    }

    /// Where forwarded requests go now: the pinned connection during a transaction, else the
    /// shared one for the client's db and protocol.
    fn current_path(&self) -> Path {
        match self.held() {
            Some(lease) => Path::Pinned(lease.id()),
            None => Path::Shared(self.client.moves),
        }
    }

    /// The path a request will take, if it goes upstream.
    fn path_of(&self, action: &Action, request: &[u8]) -> Option<Path> {
        let held = self.held().map(|lease| Path::Pinned(lease.id()));
        match action {
            // AUTH checked by Redis: on the checking connection, or on the watching one. It
            // waits for what the client sent before, an UNSUBSCRIBE whose hub is that of the
            // old login included.
            Action::Connection if self.client.pass_through() && names_auth(request) => {
                Some(held.unwrap_or(Path::Auth))
            }
            Action::Forward | Action::Count(_) => Some(self.current_path()),
            // Without a transaction, the others are answered locally.
            Action::Transaction(Transaction::Multi | Transaction::Watch) | Action::Block(_) => {
                Some(held.unwrap_or(Path::NewPinned))
            }
            Action::Transaction(_) => held,
            Action::PubSub { .. } => Some(Path::PubSub),
            // Queued in a transaction, else on a connection of its own.
            Action::Monitor | Action::Control if matches!(self.tx, Tx::Multi { .. }) => held,
            Action::Monitor => Some(Path::Monitor),
            Action::Control => Some(Path::Control),
            Action::Connection
            | Action::Reply(_)
            | Action::Reject(_)
            | Action::ReplyAndClose(_)
            | Action::Drop => None,
        }
    }

    /// Whether the next request waits for a barrier (see [`Path`]).
    fn stalled(&self) -> bool {
        self.barrier && self.unresolved > 0
    }

    /// Sends the run of requests at the front of `rbuf` as one batch.
    async fn flush_run(&mut self, run_len: &mut usize, run_count: &mut u32) {
        if *run_count > 0 {
            let frames = self.take_front(*run_len);
            let batch = Batch {
                frames,
                count: *run_count,
                timeout: Some(self.config.request_timeout),
                ..Batch::default()
            };
            self.send(batch, false).await;
        }
        *run_len = 0;
        *run_count = 0;
    }

    /// The first `len` bytes of the read buffer. When they are all of it, the buffer is handed
    /// over whole: splitting it would allocate a shared header, once per request for a client
    /// that sends one request at a time.
    fn take_front(&mut self, len: usize) -> Bytes {
        if len == self.rbuf.len() {
            std::mem::take(&mut self.rbuf).freeze()
        } else {
            self.rbuf.split_to(len).freeze()
        }
    }

    /// Forwards one request: on `release`'s connection if given (which is then given back
    /// after the reply), else to the current destination.
    async fn forward_one(
        &mut self,
        frames: Bytes,
        timeout: Option<Duration>,
        release: Option<Lease>,
    ) {
        let batch = Batch {
            frames,
            count: 1,
            timeout,
            release,
            ..Batch::default()
        };
        self.forward(batch).await;
    }

    /// Forwards a batch of one request, honouring CLIENT REPLY OFF and SKIP.
    async fn forward(&mut self, batch: Batch) {
        self.owe();
        let suppress = self.take_suppress();
        self.send(batch, suppress).await;
    }

    /// Hands a batch to an upstream actor: the connection of its `release` lease if it has
    /// one, else the current destination. A full channel is waited on for at most
    /// `request_timeout`, so a stuck upstream cannot hold a client forever.
    ///
    /// Not an `async fn`, which would keep the batch in its future twice, in every busy
    /// session: the common case hands the batch over at once, and the future keeps only what
    /// the rare wait for a full channel needs.
    fn send(&mut self, batch: Batch, suppress: bool) -> impl Future<Output = ()> + Send + '_ {
        let (reply, rx) = oneshot::channel();
        let Batch {
            frames,
            count,
            timeout,
            release,
            blocking,
            then,
            via,
        } = batch;
        let (destination, path) = match (via, &release, self.held()) {
            (Some(via), _, _) => (via, Path::Auth),
            (None, Some(lease), _) | (None, None, Some(lease)) => {
                (lease.sender().clone(), Path::Pinned(lease.id()))
            }
            (None, None, None) => (self.client.shared.clone(), Path::Shared(self.client.moves)),
        };
        self.last_path = Some(path);
        let handed_at = Instant::now();
        let request = Request {
            frames,
            count,
            queued_at: handed_at,
            timeout,
            reply,
            budget: Some(self.budget.clone()),
        };
        let handed = match destination.try_send(request) {
            Ok(()) => Ok(true),
            // Boxed: a full channel is rare, and this future is large.
            Err(TrySendError::Full(request)) => {
                let timeout = self.config.request_timeout;
                Err(Box::pin(async move {
                    tokio::time::timeout(timeout, destination.send(request)).await
                }))
            }
            Err(TrySendError::Closed(_)) => Ok(false),
        };
        async move {
            let sent = match handed {
                Ok(sent) => sent,
                Err(waiting) => matches!(waiting.await, Ok(Ok(()))),
            };
            if sent {
                self.unresolved += 1;
            }
            self.pending.push_back(if sent {
                Pending::Upstream {
                    rx,
                    count,
                    suppress,
                    release,
                    charged: true,
                    sent: handed_at,
                    blocking,
                    then,
                }
            } else {
                Pending::Local {
                    bytes: if suppress {
                        Bytes::new()
                    } else {
                        UpstreamError::Unavailable.replies(count)
                    },
                    count,
                }
            });
        }
    }
}

/// Whether a connection command is AUTH, or HELLO with an AUTH option (which Redis checks when
/// AUTH is passed through).
fn names_auth(request: &[u8]) -> bool {
    let mut args = Args::new(request);
    let name = args.next().unwrap_or_default();
    name.eq_ignore_ascii_case(b"auth")
        || (name.eq_ignore_ascii_case(b"hello")
            && args.any(|arg| command::keyword_is(arg, b"auth")))
}

/// Before authenticating, a client may only AUTH, HELLO (with AUTH), RESET or QUIT.
fn allowed_before_auth(action: &Action, request: &[u8]) -> bool {
    match action {
        Action::ReplyAndClose(_) | Action::Drop => true,
        Action::Connection => {
            let name = Args::new(request).next().unwrap_or_default();
            [&b"auth"[..], b"hello", b"reset"]
                .iter()
                .any(|allowed| name.eq_ignore_ascii_case(allowed))
        }
        _ => false,
    }
}

/// What a RESP2 client in subscribed state gets for a command Redis does not allow there;
/// `None` if it is allowed. PING is answered in the subscribed form.
fn subscribed_context(action: &Action, request: &[u8]) -> Option<Bytes> {
    let mut args = Args::new(request);
    let name = args.next().unwrap_or_default().to_ascii_lowercase();
    match (action, name.as_slice()) {
        (Action::PubSub { .. }, _) | (_, b"quit" | b"reset") => None,
        (_, b"ping") => Some(match (args.next(), args.next()) {
            (None, _) => Bytes::from_static(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
            (Some(arg), None) => {
                let mut out = BytesMut::from(&b"*2\r\n$4\r\npong\r\n"[..]);
                encode::put_bulk(&mut out, arg);
                out.freeze()
            }
            _ => encode::error("wrong number of arguments for 'ping' command"),
        }),
        _ => {
            let mut fullname = String::from_utf8_lossy(&name[..name.len().min(128)]).into_owned();
            if matches!(
                name.as_slice(),
                b"client"
                    | b"config"
                    | b"script"
                    | b"function"
                    | b"object"
                    | b"memory"
                    | b"command"
                    | b"pubsub"
                    | b"acl"
                    | b"cluster"
                    | b"xinfo"
                    | b"latency"
                    | b"slowlog"
                    | b"module"
                    | b"xgroup"
            ) {
                if let Some(sub) = args.next() {
                    fullname.push('|');
                    fullname.push_str(&String::from_utf8_lossy(&sub.to_ascii_lowercase()));
                }
            }
            let why = if name == b"exec" && args.remaining() > 0 {
                // Redis checks the arity first.
                "wrong number of arguments for 'exec' command".to_owned()
            } else {
                format!(
                    "Can't execute '{fullname}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / \
                     QUIT / RESET are allowed in this context"
                )
            };
            Some(if name == b"exec" {
                // Redis refuses EXEC in EXEC's own words (`rejectCommand`).
                Bytes::from(format!(
                    "-EXECABORT Transaction discarded because of: {why}\r\n"
                ))
            } else {
                encode::error(&why)
            })
        }
    }
}

/// A RESP2 array frame as a RESP3 push: the same bytes but the first.
fn as_push(frame: Bytes) -> Bytes {
    if frame.first() != Some(&b'*') {
        return frame;
    }
    let mut push = BytesMut::from(&frame[..]);
    push[0] = b'>';
    push.freeze()
}

/// Polls the wait for a CLIENT PAUSE to end; never ready without one.
fn poll_pause(
    pause: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    match pause {
        Some(wait) => wait.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

/// Waits for the oldest slot, which the caller guarantees is an upstream one.
fn front_reply(
    pending: &mut VecDeque<Pending>,
) -> impl Future<Output = Result<Reply, oneshot::error::RecvError>> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some(Pending::Upstream { rx, .. }) => Pin::new(rx).poll(cx),
        _ => Poll::Pending,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpStream;

    use super::*;

    fn future_size<A, F: Fn(A) -> Fut, Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    fn future_size4<A, B, C, D, F: Fn(A, B, C, D) -> Fut, Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every idle client costs a parked session: a tokio task of about 100 bytes of header and
    /// trailer plus this future, in steps of 128 bytes. Up to 280 bytes the task takes 384;
    /// past that every idle client costs 128 bytes more. (264 bytes in a debug build, 256 in
    /// release.) Something a session must keep between requests belongs in `ClientState` only
    /// if it is small; otherwise box it, or keep it in `State`.
    #[test]
    fn a_parked_session_fits_a_384_byte_task() {
        let clients = Arc::new(AtomicUsize::new(0));
        // Closing counts the client out, as the server's closure does.
        let size = future_size(&|session: Session<TcpStream>| {
            let clients = clients.clone();
            session.run(move || {
                clients.fetch_sub(1, Ordering::AcqRel);
            })
        });
        assert!(size <= 280, "a parked session's future is {size} bytes");
    }

    /// A busy session is boxed for each burst of activity, so a client that sends one request
    /// at a time allocates it once per request: up to 1016 bytes, glibc serves it from its
    /// per-thread cache, past that from its bins, several times slower. (880 bytes now.)
    #[test]
    fn a_busy_session_fits_the_allocators_thread_cache() {
        let size = future_size4(&serve::<TcpStream>);
        assert!(size <= 1016, "a busy session's future is {size} bytes");
    }
}
