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
//!
//! The files, in the order a request meets them: `session` (the event loop, parking),
//! `dispatch` (parse, decide, forward), `transaction` and `subscriptions` (the two states that
//! change where requests go), `replies` (order and budget), and the client's own data: `state`
//! (db, protocol, login, reply mode), `tracking` (CLIENT TRACKING and the invalidations it
//! delivers), `registry` (every client, for CLIENT LIST and KILL) and `settings` (what a
//! reload replaces). This file holds the types they share.

mod cache;
mod dispatch;
mod registry;
mod replies;
mod session;
mod settings;
mod state;
mod subscriptions;
mod tracking;
mod transaction;

pub(crate) use registry::{Clients, Peer};
pub(crate) use session::Session;
pub(crate) use settings::{Live, SessionConfig};
pub(crate) use state::ClientState;

use std::{collections::VecDeque, future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use self::{
    session::IdleTimer,
    subscriptions::{Feed, Subscriptions},
};
use crate::{
    command::{self, CommandId},
    io::Budget,
    resp::RequestDecoder,
    upstream::{Batch, Lease, Reply, UpstreamError},
};

/// Most requests in one batch. The actor hands a batch's replies back only when all are in, so
/// this bounds what it holds for one client beyond `client_output_limit`: a client pipelining
/// 1,000 GETs of a large value and never reading is cut off after a few batches, not after all.
/// 64 keeps a `redis-benchmark -P 32` write in one batch.
const MAX_BATCH: u32 = 64;

/// Stop reading a client while this many reply bytes wait for it to read them.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// Most request bytes on their way upstream and not yet answered: no more requests are taken
/// while a client has this many out (one request of any size goes when none is). The replies
/// are bounded by `client_output_limit`; this bounds the requests, and above all what a
/// cluster router makes of them: a request split by slot becomes up to 16,384 requests, some
/// 150 bytes each of the router's and the actors' memory, so a client pipelining hundreds of
/// such splits could make redmux hold gigabytes, and keep other clients' requests waiting
/// behind them on the masters' connections.
const MAX_IN_FLIGHT: usize = 1024 * 1024;
/// Most unparsed input read ahead while the next request waits for a barrier (see
/// [`Path`]): reading on would let a client that pipelines behind one (a RESP3 subscriber's
/// PUBLISHes, each waiting for the last) fill its buffer up to `client_query_limit`. Not
/// while a blocking command is owed: its reply may never come, and the client's close must
/// still be seen (`State::owes_blocking`; the same goes for the other limits on reading).
const STALLED_READ_AHEAD: usize = 1024 * 1024;

/// The wait for a CLIENT PAUSE to end (see `State::pause`).
type PauseWait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A reply slot, in request order.
#[derive(Debug)]
enum Pending {
    /// Replies redmux produced itself, to `count` requests.
    Local { bytes: Bytes, count: u32 },
    /// A frame the client did not ask for (a pub/sub message, a MONITOR line), charged to the
    /// output budget when it was queued: it may wait behind a reply that takes long (a
    /// blocked BLPOP), and counts against `client_output_limit` meanwhile.
    Pushed(Bytes),
    /// No reply: gives a pinned connection back once every earlier slot is answered (RESET
    /// in a transaction, after the requests already sent on that connection).
    Release(Lease),
    /// No reply: ends a MONITOR feed once every earlier slot is answered (RESET right after
    /// MONITOR: closing its connection at once would lose MONITOR's `+OK`). The feed is not
    /// read meanwhile: after RESET the client hears no more of it.
    Unmonitor(Box<Feed>),
    /// No reply: an invalidation for a tracking client, turned into bytes (a push, or a
    /// message to the client it redirects to) when every slot before it is out, so it never
    /// overtakes the reply of a read sent before the key changed. Charged to the output
    /// budget when queued, as `Pushed` is. Boxed: it is rare.
    Invalidate(Box<Invalidate>),
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
        /// The bytes of the requests, counted in `State::in_flight` until the replies are in
        /// (0 for a blocking command, whose reply may never come).
        bytes: u32,
        /// What to do with the reply besides passing it on. Boxed: it is rare.
        then: Option<Box<Then>>,
    },
}

/// Invalidations waiting in a client's reply queue (see `Pending::Invalidate`).
#[derive(Debug)]
struct Invalidate {
    invalidation: crate::tracking::Invalidation,
    /// From a client that redirects its invalidations to this one.
    redirected: bool,
    /// What it was charged to the output budget ([`Invalidation::size`]), given back when it
    /// is turned into bytes.
    ///
    /// [`Invalidation::size`]: crate::tracking::Invalidation::size
    charged: usize,
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
    /// A count as [`Then::Count`], of a RESP3 subscriber's PUBLISH whose reply waits for the
    /// message it caused (`State::synced`); with whether the client skips the reply (CLIENT
    /// REPLY).
    Synced(command::Count, Option<Bytes>, bool),
    /// The answer to CLIENT TRACKING ON that waited for redmux's invalidation stream: an
    /// error means the client does not track after all.
    Tracking,
    /// A read the near cache missed: its reply fills the placeholders it left (see
    /// [`cache::Filling`]).
    Fill(cache::Filling),
    /// WAIT or WAITAOF behind redmux's [`command::MARK`], a PING: its reply is taken off. (A
    /// user Redis does not allow PING has no connection through redmux at all: every
    /// connection redmux opens is checked with one.)
    Marked,
}

impl Then {
    /// Replies to requests redmux added to the client's own in the batch (the near cache's
    /// PTTL probes), which `then` takes off before the client sees the reply.
    fn added_replies(&self) -> u32 {
        match self {
            Then::Fill(filling) => filling.probes(),
            Then::Marked => 1,
            _ => 0,
        }
    }
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
    /// CLIENT TRACKING ON waiting for redmux's invalidation stream: the reads after it wait
    /// too, so none goes untracked.
    Tracking,
    /// Answered by redmux, acting on other clients (see [`command::acts_on_others`]), or
    /// behind a blocking command: no request was ever sent on it, so it waits for every
    /// request before it.
    Others,
}

/// The client's transaction state, and the pinned connection that carries it, or why there is
/// none: WATCH or MULTI found no pinned connection (`max_pinned` were taken). Such a
/// transaction never reaches Redis: MULTI is answered `+OK` all the same and what is queued
/// `+QUEUED` here, so that a client that pipelines its transaction behind MULTI (or WATCH)
/// has none of it run outside the transaction, and its EXEC gets `-EXECABORT` with the reason.
#[derive(Debug)]
enum Tx {
    None,
    /// After WATCH, before MULTI. Without a connection, the commands the client sends go on as
    /// outside a transaction; the one it opens next never runs (its WATCH did not hold).
    Watching(Result<Lease, UpstreamError>),
    /// After MULTI (with or without WATCH before it). `dirty`: a command was refused while
    /// queuing, so EXEC must abort, as in Redis.
    Multi {
        lease: Result<Lease, UpstreamError>,
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

impl Tx {
    /// A transaction that got no connection: what it queues is answered here, and never sent.
    fn queues_here(&self) -> bool {
        matches!(self, Tx::Multi { lease: Err(_), .. })
    }
}

/// A run of requests about to be handed to an upstream connection as one [`Batch`].
#[derive(Default)]
struct Run {
    frames: Bytes,
    count: u32,
    timeout: Option<Duration>,
    release: Option<Lease>,
    /// A blocking command (see `Pending::Upstream::blocking`).
    blocking: bool,
    /// See `Pending::Upstream::then`.
    then: Option<Box<Then>>,
    /// The connection AUTH is checked on, where it goes instead of the client's current one.
    via: Option<mpsc::Sender<Batch>>,
}

/// Everything a busy session tracks besides its socket.
struct State {
    config: Arc<SessionConfig>,
    client: ClientState,
    tx: Tx,
    subs: Subscriptions,
    /// The MONITOR feed, while monitoring.
    monitor: Option<Box<Feed>>,
    decoder: RequestDecoder,
    /// Bytes read and not yet parsed (or parsed and not yet split off to be forwarded).
    rbuf: BytesMut,
    /// Set when `rbuf` may hold a complete request that has not been parsed yet.
    unparsed: bool,
    /// The socket has nothing more to read for now: the session may park.
    drained: bool,
    /// Reply slots not yet moved to `out`, oldest first.
    pending: VecDeque<Pending>,
    /// How many of `pending` wait for an upstream (`Pending::Upstream`). This and
    /// `outstanding` are `u32`s, bounded by `max_pipeline`: side by side they take one word, and
    /// that word keeps a busy session's box in glibc's small bins (see the size test below).
    unresolved: u32,
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
    /// Boxed twice: the wait is rare, and a thin pointer keeps the busy session's box small.
    pause: Option<Box<PauseWait>>,
    /// Requests whose replies have not reached `out` yet.
    outstanding: u32,
    /// Bytes of the requests of the unanswered `Pending::Upstream` slots (see
    /// [`MAX_IN_FLIGHT`]). A `u32`, with the others above, to keep the busy session's box
    /// small; added and taken away saturating, as a request of 4 GiB would saturate it.
    in_flight: u32,
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
    /// The keys of the client's writes in flight, while a near cache is on (see `cache`).
    /// Boxed: few clients write while a cache is on, and every busy session holds this.
    written: Option<Box<cache::Written>>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpStream;

    use super::{state::ReplyMode, *};
    use crate::{metrics::Metrics, tracking::Invalidation};

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
    /// at a time allocates it once per request. glibc's per-thread cache keeps only 7 freed
    /// blocks of a size, fewer than the sessions that park at once under load, so most of these
    /// come from its bins. Up to 1000 bytes a block is a "small" chunk (under 1024 bytes with
    /// its header), taken whole from an exact-size bin; past that, a "large" one, whose search
    /// first sweeps every freed small block into the bins: 660 instructions more per request at
    /// 64 clients (callgrind), 6% of redmux's whole cost in front of a cluster. (1000 bytes now.)
    #[test]
    fn a_busy_session_is_a_small_allocation() {
        let size = future_size4(&session::burst::<TcpStream>);
        assert!(size <= 1000, "a busy session's future is {size} bytes");
    }

    /// A session's state with no upstream behind it: the address refuses connections, and
    /// nothing here waits for one. Commands redmux answers itself and the reply queue can be
    /// exercised without Redis.
    async fn offline_state(shutdown: &tokio_util::sync::CancellationToken) -> State {
        let mut config = crate::config::Config::default();
        config.upstream.address = "127.0.0.1:1".parse().unwrap();
        let metrics = Arc::new(Metrics::new(false));
        let upstreams =
            crate::upstream::Upstreams::start(&config.upstream, metrics.clone(), shutdown)
                .await
                .unwrap();
        let hubs = crate::pubsub::Hubs::new(&upstreams);
        let clients = Arc::new(Clients::default());
        let live = Live::new(
            config,
            (upstreams, hubs),
            clients.clone(),
            &metrics,
            shutdown,
        );
        let client = ClientState::new(
            1,
            Peer {
                addr: None,
                local: None,
            },
            (live.upstreams.clone(), live.hubs.clone()),
            live.users.clone(),
            clients,
        )
        .unwrap();
        State::resume(session::Parked {
            config: live.session.clone(),
            client,
            idle: None,
        })
    }

    fn upstream_slot(state: &mut State) -> oneshot::Sender<Reply> {
        let (tx, rx) = oneshot::channel();
        state.owe();
        state.await_upstream(rx, state.current_path(), false);
        tx
    }

    fn written(state: &State) -> Vec<u8> {
        state.out.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// Replies leave in request order whatever order they arrive in: a later upstream reply
    /// and a local one wait behind an earlier upstream reply that has not come.
    #[tokio::test]
    async fn replies_leave_in_request_order() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut state = offline_state(&shutdown).await;
        let first = upstream_slot(&mut state);
        state.reply_locally(Bytes::from_static(b"+local\r\n"));
        let second = upstream_slot(&mut state);
        second
            .send(Ok(Bytes::from_static(b"$6\r\nsecond\r\n").into()))
            .unwrap();
        state.collect_ready();
        assert!(
            written(&state).is_empty(),
            "nothing overtakes the first reply"
        );
        first
            .send(Ok(Bytes::from_static(b"$5\r\nfirst\r\n").into()))
            .unwrap();
        state.collect_ready();
        assert_eq!(
            written(&state),
            b"$5\r\nfirst\r\n+local\r\n$6\r\nsecond\r\n".to_vec()
        );
        assert!(state.pending.is_empty());
        shutdown.cancel();
    }

    /// A lost upstream answers its slot with an error, in its place.
    #[tokio::test]
    async fn a_lost_reply_is_an_error_in_its_place() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut state = offline_state(&shutdown).await;
        drop(upstream_slot(&mut state));
        state.reply_locally(Bytes::from_static(b"+after\r\n"));
        state.collect_ready();
        let out = String::from_utf8(written(&state)).unwrap();
        assert!(out.starts_with("-ERR "), "{out}");
        assert!(out.ends_with("+after\r\n"), "{out}");
        shutdown.cancel();
    }

    /// A tracking client in RESP3, with a read of its own still owed a reply.
    async fn tracking_state(
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> (State, oneshot::Sender<Reply>) {
        let mut state = offline_state(shutdown).await;
        state.client.resp3 = true;
        state.client.tracking = Some(Box::default());
        let read = upstream_slot(&mut state);
        (state, read)
    }

    fn invalidate(state: &State, key: &[u8]) {
        let keys = vec![Bytes::copy_from_slice(key)];
        crate::tracking::Sink::invalidate(&*state.client.entry, Invalidation::Keys(keys));
    }

    /// An invalidation never overtakes the reply of a read sent before it: the read may have
    /// run before the write, and the client would cache a value the invalidation was for.
    #[tokio::test]
    async fn an_invalidation_waits_behind_the_replies_owed_before_it() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (mut state, read) = tracking_state(&shutdown).await;
        invalidate(&state, b"k");
        assert!(state.client.entry.has_mail());
        state.take_mail();
        assert!(!state.client.entry.has_mail());
        state.collect_ready();
        assert!(written(&state).is_empty(), "nothing overtakes the read");
        read.send(Ok(Bytes::from_static(b"$1\r\nv\r\n").into()))
            .unwrap();
        state.collect_ready();
        assert_eq!(
            written(&state),
            b"$1\r\nv\r\n>2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n".to_vec()
        );
        shutdown.cancel();
    }

    /// Invalidations that wait behind a reply that does not come (a blocking command) merge
    /// into one, and past a bound into the null invalidation: what waits stays bounded.
    #[tokio::test]
    async fn waiting_invalidations_stay_bounded() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (mut state, read) = tracking_state(&shutdown).await;
        for i in 0..5000 {
            invalidate(&state, format!("key:{i}").as_bytes());
            if i % 3 == 0 {
                state.take_mail();
            }
        }
        state.take_mail();
        assert_eq!(state.pending.len(), 2, "the read, and one invalidation");
        read.send(Ok(Bytes::from_static(b"_\r\n").into())).unwrap();
        state.collect_ready();
        assert_eq!(
            written(&state),
            b"_\r\n>2\r\n$10\r\ninvalidate\r\n_\r\n".to_vec()
        );
        shutdown.cancel();
    }

    /// A client's own invalidations and those of a client redirecting to it alternate behind a
    /// reply that does not come: each kind merges into its own, and the client is sent two.
    #[tokio::test]
    async fn own_and_redirected_invalidations_merge_each_into_their_own() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (mut state, _read) = tracking_state(&shutdown).await;
        for i in 0..3000 {
            invalidate(&state, format!("own:{i}").as_bytes());
            let redirected = vec![Bytes::from(format!("other:{i}"))];
            state.client.entry.post(Invalidation::Keys(redirected));
            state.take_mail();
        }
        assert_eq!(state.pending.len(), 3, "the read, and one of each kind");
        shutdown.cancel();
    }

    /// Invalidations kept apart by messages queued between them (a subscriber in RESP3) do
    /// not merge, but each is charged to the output budget when it is queued: a client that
    /// waits behind a reply that does not come is closed at `client_output_limit`.
    #[tokio::test]
    async fn invalidations_between_messages_count_against_the_output_limit() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (mut state, _read) = tracking_state(&shutdown).await;
        state.budget.set_limit(1 << 20);
        let key = Bytes::from(vec![b'k'; 1000]);
        let mut rounds = 0;
        while !state.abort {
            rounds += 1;
            assert!(rounds < 100, "never closed: {} slots", state.pending.len());
            let keys = (0..60).map(|i| [key.clone(), Bytes::from(i.to_string())].concat().into());
            crate::tracking::Sink::invalidate(
                &*state.client.entry,
                Invalidation::Keys(keys.collect()),
            );
            state.take_mail();
            state.push_unasked(Bytes::from_static(
                b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            ));
        }
        // About a MiB of key bytes waited when the client was closed.
        assert!(rounds < 30, "{rounds}");
        shutdown.cancel();
    }

    /// The client's own state moves with what it sends, answered by redmux alone: SELECT and
    /// HELLO change the db and protocol its next commands take, CLIENT REPLY OFF silences
    /// replies, RESET puts everything back.
    #[tokio::test]
    async fn connection_commands_change_only_this_client() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut state = offline_state(&shutdown).await;
        state.rbuf.extend_from_slice(
            b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n",
        );
        state.unparsed = true;
        state.process_input().await;
        state.collect_ready();
        assert_eq!((state.client.db, state.client.resp3), (3, true));
        let out = written(&state);
        assert!(
            out.starts_with(b"+OK\r\n%"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        state.out.clear();
        state.rbuf.extend_from_slice(
            b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n*1\r\n$5\r\nRESET\r\n",
        );
        state.unparsed = true;
        state.process_input().await;
        state.collect_ready();
        assert_eq!(state.client.reply_mode, ReplyMode::On);
        assert_eq!((state.client.db, state.client.resp3), (0, false));
        assert_eq!(
            written(&state),
            b"+RESET\r\n".to_vec(),
            "OFF is silent, RESET is not"
        );
        shutdown.cancel();
    }
}
