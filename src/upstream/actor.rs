//! The upstream actor: owns one connection, writes every client's requests to it in batches and
//! hands each batch of replies back to the client that sent it.
//!
//! Replies come back in the order requests were written, so a FIFO of reply senders is all the
//! routing there is. The FIFO is only trustworthy while every byte is accounted for: on any
//! error, timeout or surprise from the upstream the connection is dropped and every request in
//! the FIFO is failed. Never resynchronised, never retried (redis-rs #698 shows what happens
//! otherwise).

use std::{
    collections::VecDeque,
    hash::{BuildHasher, RandomState},
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, watch},
    time::{interval, sleep, sleep_until, Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn, Instrument};

use super::{
    cluster::Returns,
    connect::{open, ConnectError, Reader, Writer},
    ActorSnapshot, Batch, Dial, Replies, Reply, ReplyTo, Setup, Target, Timeouts, UpstreamError,
};
use crate::{
    io::{outgoing::write_some, Budget},
    metrics::Metrics,
    report::Chain,
    resp::{ReplyError, ReplyScanner},
};

/// Messages taken off the channel at once: one batch, one write.
const BATCH: usize = 256;
/// Stop taking requests while this much is still waiting to be written.
const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// Read-buffer growth step; replies are cut out of it as `Bytes` without copying.
const READ_CHUNK: usize = 64 * 1024;
/// A request at least this large is queued for writing as it came, by reference; smaller ones
/// are copied together, so that a batch of small requests is one slice of the vectored write.
/// A queued slice keeps its client's read buffer alive until it is written, as a request
/// waiting in the channel does; `WRITE_HIGH_WATER` bounds how many are queued.
const BY_REFERENCE: usize = 4 * 1024;
/// Exponential reconnect backoff: first delay and cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// Delay before trying again after a handshake answered `-BUSY`: Redis is up and serves again
/// the moment its script ends or is killed, so waiting for the backoff's cap would only delay
/// the recovery.
const BUSY_RETRY: Duration = Duration::from_millis(25);

/// What an actor's connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Shared by many clients: reconnects after a loss, drains before exiting.
    Shared,
    /// Pinned to one client's transaction or blocking command. Its connection carries that
    /// client's state (MULTI, WATCH), so after a loss it never reconnects: a command meant for
    /// a transaction must not run outside it. When its lease is dropped (the client is gone),
    /// it closes the connection at once, discarding whatever the client left unfinished.
    Pinned,
}

/// Everything an actor needs to know to open its connection, and where it reports.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub endpoint: Dial,
    pub setup: Setup,
    pub timeouts: Timeouts,
    pub role: Role,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// Connected shared connections of the default target, for `/health`: present for those
    /// connections only.
    pub health: Option<watch::Sender<usize>>,
    /// Where a pinned connection publishes the id Redis gives it (see [`ConnectionId`]).
    pub connection_id: Option<ConnectionId>,
    /// The cluster node it connects to, if any.
    pub node: Option<(String, u16)>,
    /// For a cluster router's node, the way back to the router for the errors of the
    /// requests its direct path sends (see [`ReplyTo::Direct`]).
    pub returns: Option<Returns>,
}

/// The id Redis gives a pinned connection (CLIENT ID), once it is connected; 0 before, or if
/// Redis would not say. CLIENT UNBLOCK names a blocked client's connection by it.
pub(crate) type ConnectionId = Arc<Connected>;

/// A pinned connection's id, and in front of a cluster the node it is on (`host`, `port`):
/// ids are a node's own, so CLIENT UNBLOCK must go to that node. Set together on connect.
#[derive(Debug, Default)]
pub struct Connected(Mutex<(u64, Option<(String, u16)>)>);

impl Connected {
    fn set(&self, id: u64, node: Option<(String, u16)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (id, node);
    }

    /// The id (0 if none yet) and the node.
    pub fn get(&self) -> (u64, Option<(String, u16)>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What an actor shows of itself to `/status` and `/metrics`: written by the actor alone (plain
/// stores, once per turn of its loop), read at any time.
#[derive(Debug)]
pub(crate) struct Stats {
    id: usize,
    role: Role,
    /// The cluster node it connects to, `host:port`.
    node: Option<Arc<str>>,
    db: u32,
    resp3: bool,
    connected: AtomicBool,
    in_flight: AtomicU64,
    queued: AtomicU64,
}

impl Stats {
    pub(super) fn new(id: usize, role: Role, target: &Target, node: Option<Arc<str>>) -> Stats {
        Stats {
            id,
            role,
            node,
            db: target.db,
            resp3: target.resp3,
            connected: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        }
    }

    pub(super) fn snapshot(&self) -> ActorSnapshot {
        ActorSnapshot {
            id: self.id,
            role: match self.role {
                Role::Shared => "shared",
                Role::Pinned => "pinned",
            },
            node: self.node.as_deref().map(str::to_owned),
            db: self.db,
            resp: if self.resp3 { 3 } else { 2 },
            connected: self.connected.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            queued: self.queued.load(Relaxed),
        }
    }
}

/// Starts an actor on `rx`.
pub(super) fn spawn(config: Config, rx: mpsc::Receiver<Batch>) {
    let id = config.stats.id;
    let span =
        tracing::info_span!("upstream", id, addr = %config.endpoint.address, db = config.setup.db);
    let actor = Actor {
        config,
        rx,
        closed: false,
        waiting: VecDeque::new(),
    };
    tokio::spawn(actor.run().instrument(span));
}

/// A batch written upstream whose replies are not all back yet.
#[derive(Debug)]
struct InFlight {
    /// Replies in this batch.
    count: u32,
    /// Replies still to come for this batch.
    remaining: u32,
    /// Which of the replies in so far are errors (see [`Replies::errors`]).
    errors: u64,
    reply: ReplyTo,
    budget: Option<Arc<Budget>>,
    /// Past this instant the connection is presumed stuck; `None`: a blocking command that may
    /// wait forever.
    deadline: Option<Instant>,
}

/// Why `pipeline` returned.
enum Ended {
    /// Every client is gone and every request answered.
    Done,
    /// The connection is unusable; in-flight requests have been failed. `answered`: it had
    /// delivered replies, so it was healthy for a while (not a server closing at once).
    Lost { why: Lost, answered: bool },
}

/// Why a connection was given up: logged with the error that caused it, if any.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("every client is gone")]
    ClientsGone,
    #[error("closed by upstream")]
    Closed,
    #[error("read failed")]
    Read(#[source] io::Error),
    #[error("write failed")]
    Write(#[source] io::Error),
    #[error("reply not understood")]
    Reply(#[source] DispatchError),
    #[error("a request timed out")]
    Timeout,
}

struct Actor {
    config: Config,
    rx: mpsc::Receiver<Batch>,
    /// The channel is closed: no client will send again.
    closed: bool,
    /// Requests that arrived while there was no connection, oldest first. Each waits at most
    /// `connect_timeout` from when it was queued.
    waiting: VecDeque<Batch>,
}

impl Actor {
    async fn run(mut self) {
        // Consecutive attempts that did not give a healthy connection; drives the backoff.
        let mut failures: u32 = 0;
        loop {
            let config = self.config.clone();
            let attempt = async move {
                let identify = config.connection_id.is_some();
                let timeout = config.timeouts.connect;
                let (reader, writer, id) =
                    open(&config.endpoint, config.setup, timeout, identify).await?;
                if let (Some(cell), Some(id)) = (&config.connection_id, id) {
                    cell.set(id, config.node.clone());
                }
                Ok::<_, ConnectError>((reader, writer))
            };
            let result = match self.while_disconnected(attempt).await {
                Some(result) => result,
                None => return,
            };
            match result {
                Ok((reader, writer)) => {
                    info!("upstream connected");
                    self.set_connected(true);
                    let ended = self.pipeline(reader, writer).await;
                    self.set_connected(false);
                    match ended {
                        Ended::Done => return,
                        Ended::Lost { why, .. } if self.config.role == Role::Pinned => {
                            debug!(why = %Chain(&why), "pinned upstream connection lost");
                            return self.refuse_all().await;
                        }
                        Ended::Lost {
                            why,
                            answered: true,
                        } => {
                            warn!(why = %Chain(&why), "upstream connection lost; reconnecting");
                            failures = 0;
                        }
                        Ended::Lost {
                            why,
                            answered: false,
                        } => {
                            debug!(why = %Chain(&why), failures, "upstream connection lost before any reply");
                        }
                    }
                }
                Err(error @ ConnectError::Busy { .. }) => {
                    if failures == 0 {
                        warn!(error = %Chain(&error), "upstream busy; retrying until the script ends");
                    }
                    failures = 1;
                    if self.while_disconnected(sleep(BUSY_RETRY)).await.is_none() {
                        return;
                    }
                    continue;
                }
                // One warning per outage, not one per retry.
                Err(error) if failures == 0 => {
                    self.config.metrics.upstream_connect_failed();
                    warn!(error = %Chain(&error), "cannot connect to upstream; retrying with backoff");
                }
                Err(error) => {
                    self.config.metrics.upstream_connect_failed();
                    debug!(error = %Chain(&error), failures, "upstream connect failed");
                }
            }
            let delay = backoff(failures);
            failures = failures.saturating_add(1);
            if self.while_disconnected(sleep(delay)).await.is_none() {
                return;
            }
        }
    }

    /// Publishes a connection coming up or going away.
    fn set_connected(&self, up: bool) {
        let config = &self.config;
        config.stats.connected.store(up, Relaxed);
        if up {
            config.metrics.upstream_connected();
        } else {
            config.metrics.upstream_lost();
            config.stats.in_flight.store(0, Relaxed);
        }
        if let Some(health) = &config.health {
            health.send_modify(|connected| {
                *connected = if up {
                    connected.saturating_add(1)
                } else {
                    connected.saturating_sub(1)
                }
            });
        }
    }

    /// Publishes how many requests wait for a connection.
    fn publish_queued(&self) {
        let queued = self.waiting.iter().map(|r| u64::from(r.count)).sum();
        self.config.stats.queued.store(queued, Relaxed);
    }

    /// A pinned actor whose connection is gone: every later request fails until the lease is
    /// given up.
    async fn refuse_all(mut self) {
        // Closing the channel marks the connection dead for the pool.
        self.rx.close();
        for request in self.waiting.drain(..) {
            request
                .reply
                .deliver(Err(UpstreamError::ConnectionLost), None);
        }
        self.publish_queued();
        while let Some(request) = self.rx.recv().await {
            request
                .reply
                .deliver(Err(UpstreamError::ConnectionLost), None);
        }
    }

    /// Runs `fut` while holding incoming requests for the next connection and failing those
    /// that waited too long. `None` when every client is gone and nothing waits.
    async fn while_disconnected<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            if self.closed && self.waiting.is_empty() {
                return None;
            }
            let connect_timeout = self.config.timeouts.connect;
            let expiry = self.waiting.front().map(|r| r.queued_at + connect_timeout);
            tokio::select! {
                output = &mut fut => return Some(output),
                n = self.rx.recv_many(&mut batch, BATCH), if !self.closed => {
                    self.closed = n == 0;
                    self.waiting.extend(batch.drain(..));
                    self.publish_queued();
                }
                _ = sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    let now = Instant::now();
                    while let Some(request) = self.waiting.front() {
                        if request.queued_at + connect_timeout > now {
                            break;
                        }
                        if let Some(request) = self.waiting.pop_front() {
                            let Batch { frames, queued_at, timeout, reply, budget, .. } = request;
                            let deadline = timeout.and_then(|t| queued_at.checked_add(t));
                            let returns = self.config.returns.as_ref();
                            let back = returns.map(|returns| (returns, frames));
                            let error = Err(UpstreamError::Unavailable);
                            reply.deliver_from(error, (budget, deadline), back);
                        }
                    }
                    self.publish_queued();
                }
            }
        }
    }

    /// Pipelines requests over one live connection until it fails or every client is gone.
    async fn pipeline(&mut self, mut reader: Reader, mut writer: Writer) -> Ended {
        let mut pipe = Pipeline::new(self.config.returns.clone());
        let now = Instant::now();
        for request in self.waiting.drain(..) {
            pipe.push(request, now);
        }
        self.publish_queued();
        let mut batch = Vec::with_capacity(BATCH);
        // Timeouts are checked on a coarse tick rather than a timer per request: precise enough
        // for a multi-second timeout, and free on the hot path.
        let mut tick = interval(
            (self.config.timeouts.request / 10)
                .clamp(Duration::from_millis(5), Duration::from_millis(250)),
        );
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Whether the actor has let other tasks run since its last write.
        let mut yielded = false;
        loop {
            self.config.stats.in_flight.store(pipe.owed, Relaxed);
            if self.closed && (pipe.is_idle() || self.config.role == Role::Pinned) {
                pipe.fail(UpstreamError::ConnectionLost, Lost::ClientsGone);
                return Ended::Done;
            }
            if pipe.rbuf.capacity() - pipe.rbuf.len() < READ_CHUNK / 4 {
                pipe.rbuf.reserve(READ_CHUNK);
            }
            pipe.seal();
            // Reading is always polled, whatever else is pending: a writer blocked on a full
            // socket while nobody reads replies would deadlock (redis-rs #1955).
            tokio::select! {
                biased;
                read = reader.read_buf(&mut pipe.rbuf) => match read {
                    Ok(0) => return pipe.fail(UpstreamError::ConnectionLost, Lost::Closed),
                    Ok(_) => {
                        if let Err(error) = pipe.dispatch() {
                            return pipe.fail(UpstreamError::ConnectionLost, Lost::Reply(error));
                        }
                        // A buffer grown for a large batch of replies is given back once empty.
                        if pipe.rbuf.is_empty() && pipe.rbuf.capacity() > 4 * READ_CHUNK {
                            pipe.rbuf = BytesMut::with_capacity(READ_CHUNK);
                        }
                    }
                    Err(error) => return pipe.fail(UpstreamError::ConnectionLost, Lost::Read(error)),
                },
                n = self.rx.recv_many(&mut batch, BATCH),
                    if !self.closed && pipe.unwritten < WRITE_HIGH_WATER =>
                {
                    self.closed = n == 0;
                    let now = Instant::now();
                    for request in batch.drain(..) {
                        pipe.push(request, now);
                    }
                    // Other clients that are ready to send run first, so that one write carries
                    // all their requests, as Redis writes replies only before it sleeps. With 16
                    // clients sending one request at a time, Redis's CPU per request fell by a
                    // third.
                    if !yielded {
                        yielded = true;
                        tokio::task::yield_now().await;
                    }
                }
                written = write_some(&mut writer, &mut pipe.out), if !pipe.out.is_empty() => {
                    yielded = false;
                    let flushed = match written {
                        Ok(n) => {
                            pipe.unwritten -= n;
                            if pipe.unwritten == 0 {
                                writer.flush().await
                            } else {
                                Ok(())
                            }
                        }
                        Err(error) => Err(error),
                    };
                    if let Err(error) = flushed {
                        return pipe.fail(UpstreamError::ConnectionLost, Lost::Write(error));
                    }
                }
                _ = tick.tick(), if !pipe.inflight.is_empty() => {
                    let now = Instant::now();
                    if pipe.inflight.front().and_then(|f| f.deadline).is_some_and(|d| d <= now) {
                        return pipe.fail(UpstreamError::Timeout, Lost::Timeout);
                    }
                }
            }
        }
    }
}

/// The state of one live connection: bytes to write, bytes read, and who is owed what.
struct Pipeline {
    /// Requests to write, in order: large ones as they came, small ones copied together.
    out: VecDeque<Bytes>,
    /// Small requests not yet moved to `out`: they are copied here so that many become one slice.
    tail: BytesMut,
    /// Bytes in `out` and `tail`.
    unwritten: usize,
    rbuf: BytesMut,
    scanner: ReplyScanner,
    inflight: VecDeque<InFlight>,
    /// Replies owed, over every batch in `inflight`.
    owed: u64,
    /// Where the next reply starts in `rbuf`: its first byte says whether it is an error.
    next_reply: usize,
    /// Some batch has been answered on this connection.
    answered: bool,
    /// The actor's way back to its cluster router (see [`Config::returns`]).
    returns: Option<Returns>,
    /// The request of each [`ReplyTo::Direct`] batch in `inflight`, in order: the router
    /// sends it again on `-MOVED`. Kept here rather than in the batch, which stays small.
    direct: VecDeque<Bytes>,
}

impl Pipeline {
    fn new(returns: Option<Returns>) -> Self {
        Pipeline {
            out: VecDeque::new(),
            tail: BytesMut::with_capacity(READ_CHUNK),
            unwritten: 0,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            scanner: ReplyScanner::new(),
            inflight: VecDeque::new(),
            owed: 0,
            next_reply: 0,
            answered: false,
            returns,
            direct: VecDeque::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.inflight.is_empty() && self.unwritten == 0
    }

    /// Moves the small requests copied together so far to the end of `out`.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.out.push_back(self.tail.split().freeze());
        }
    }

    /// Queues a request for writing. One whose client has already gone is dropped unwritten.
    fn push(&mut self, request: Batch, now: Instant) {
        if request.reply.is_closed() {
            return;
        }
        let Batch {
            frames,
            count,
            mut reply,
            budget,
            timeout,
            ..
        } = request;
        self.unwritten += frames.len();
        let direct = matches!(reply, ReplyTo::Direct(_));
        if frames.len() >= BY_REFERENCE {
            self.seal();
            if direct {
                self.direct.push_back(frames.clone());
            } else if reply.keeps_written() {
                reply.written(frames.clone());
            }
            self.out.push_back(frames);
        } else {
            self.tail.extend_from_slice(&frames);
            match direct {
                true => self.direct.push_back(frames),
                false => reply.written(frames),
            }
        }
        self.owed += u64::from(count);
        self.inflight.push_back(InFlight {
            count,
            remaining: count,
            errors: 0,
            reply,
            budget,
            // A timeout past what the clock can count is no deadline (a blocking command's
            // timeout comes from the client).
            deadline: timeout.and_then(|timeout| now.checked_add(timeout)),
        });
    }

    /// Cuts complete replies out of the read buffer and completes the batches they finish.
    fn dispatch(&mut self) -> Result<(), DispatchError> {
        loop {
            let Some(front) = self.inflight.front_mut() else {
                return if self.rbuf.is_empty() {
                    Ok(())
                } else {
                    Err(DispatchError::Unsolicited)
                };
            };
            let Some(end) = self.scanner.next_reply(&self.rbuf)? else {
                return Ok(());
            };
            if matches!(self.rbuf.get(self.next_reply), Some(b'-' | b'!')) {
                let index = front.count - front.remaining;
                front.errors |= 1u64.checked_shl(index).unwrap_or(0);
            }
            self.next_reply = end;
            self.owed -= 1;
            front.remaining -= 1;
            if front.remaining == 0 {
                let replies = self.rbuf.split_to(end).freeze();
                self.scanner.consumed(end);
                self.next_reply = 0;
                self.answered = true;
                if let Some(done) = self.inflight.pop_front() {
                    // Replies a client has no room for are dropped here, not held for it.
                    let replies = Replies {
                        bytes: replies,
                        errors: done.errors,
                    };
                    self.answer(done, Ok(replies));
                }
            }
        }
    }

    /// Hands `reply` to the batch `done` answers; a direct request's error goes to the router
    /// with the request, which is taken off `direct` in any case.
    fn answer(&mut self, done: InFlight, reply: Reply) {
        let frames = match done.reply {
            ReplyTo::Direct(_) => self.direct.pop_front(),
            _ => None,
        };
        let back = self.returns.as_ref().zip(frames);
        done.reply
            .deliver_from(reply, (done.budget, done.deadline), back);
    }

    /// Fails every request written or queued on this connection.
    fn fail(&mut self, error: UpstreamError, why: Lost) -> Ended {
        for request in std::mem::take(&mut self.inflight) {
            self.answer(request, Err(error));
        }
        self.owed = 0;
        Ended::Lost {
            why,
            answered: self.answered,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DispatchError {
    #[error("malformed reply")]
    Malformed(#[from] ReplyError),
    #[error("reply received with no request outstanding")]
    Unsolicited,
}

/// Delay before reconnect attempt `failures + 1`: exponential, capped, with jitter so that many
/// redmux instances do not reconnect in step.
fn backoff(failures: u32) -> Duration {
    let ceiling = BACKOFF_FIRST
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_CAP);
    let half = ceiling / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
    let random = RandomState::new().hash_one(Instant::now()) % nanos;
    half + Duration::from_nanos(random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Reply;
    use tokio::sync::oneshot;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        assert!(backoff(0) <= BACKOFF_FIRST && backoff(0) >= BACKOFF_FIRST / 2);
        assert!(backoff(3) <= BACKOFF_FIRST * 8);
        for _ in 0..100 {
            let delay = backoff(30);
            assert!(
                delay >= BACKOFF_CAP / 2 && delay <= BACKOFF_CAP,
                "{delay:?}"
            );
        }
    }

    fn request(frames: Bytes, count: u32) -> (Batch, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let request = Batch {
            frames,
            count,
            queued_at: Instant::now(),
            timeout: Some(Duration::from_secs(1)),
            reply: reply.into(),
            budget: None,
        };
        (request, rx)
    }

    #[tokio::test]
    async fn replies_go_to_their_batch_in_order() {
        let mut pipe = Pipeline::new(None);
        let (a, mut rx_a) = request(
            Bytes::from_static(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n"),
            2,
        );
        let (b, mut rx_b) = request(Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"), 1);
        pipe.push(a, Instant::now());
        pipe.push(b, Instant::now());
        pipe.seal();
        assert_eq!(
            pipe.out.iter().flatten().copied().collect::<Vec<u8>>(),
            b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        pipe.rbuf.extend_from_slice(b"+PONG\r\n+PO");
        pipe.dispatch().unwrap();
        assert!(rx_a.try_recv().is_err(), "half a batch is not delivered");
        pipe.rbuf.extend_from_slice(b"NG\r\n$1\r\nv");
        pipe.dispatch().unwrap();
        assert_eq!(
            &rx_a.try_recv().unwrap().unwrap().bytes[..],
            b"+PONG\r\n+PONG\r\n"
        );
        pipe.rbuf.extend_from_slice(b"\r\n");
        pipe.dispatch().unwrap();
        assert_eq!(&rx_b.try_recv().unwrap().unwrap().bytes[..], b"$1\r\nv\r\n");
        assert!(pipe.inflight.is_empty());
        pipe.rbuf.extend_from_slice(b"+EXTRA\r\n");
        assert!(matches!(pipe.dispatch(), Err(DispatchError::Unsolicited)));
    }

    #[tokio::test]
    async fn large_requests_are_queued_by_reference_and_small_ones_copied_together() {
        let mut pipe = Pipeline::new(None);
        let value = vec![b'v'; BY_REFERENCE];
        let large = Bytes::from(
            [
                format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${BY_REFERENCE}\r\n").as_bytes(),
                &value,
                b"\r\n",
            ]
            .concat(),
        );
        let at = large.as_ptr();
        let small = Bytes::from_static(b"*1\r\n$4\r\nPING\r\n");
        let mut receivers = Vec::new();
        for frames in [&small, &small, &large, &small] {
            let (request, rx) = request(frames.clone(), 1);
            pipe.push(request, Instant::now());
            receivers.push(rx);
        }
        pipe.seal();
        let slices: Vec<&[u8]> = pipe.out.iter().map(|b| &b[..]).collect();
        assert_eq!(slices, [&[&small[..], &small].concat()[..], &large, &small]);
        assert_eq!(pipe.out[1].as_ptr(), at, "the large request is not copied");
        assert_eq!(pipe.unwritten, 3 * small.len() + large.len());
    }

    #[tokio::test]
    async fn error_replies_are_marked_by_position_in_their_batch() {
        let mut pipe = Pipeline::new(None);
        let (a, mut rx_a) = request(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 4);
        let (b, mut rx_b) = request(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 2);
        pipe.push(a, Instant::now());
        pipe.push(b, Instant::now());
        assert_eq!(pipe.owed, 6);
        pipe.rbuf
            .extend_from_slice(b"+OK\r\n-ERR x\r\n$2\r\n-E\r\n!3\r\nbad\r\n-ERR");
        pipe.dispatch().unwrap();
        let a = rx_a.try_recv().unwrap().unwrap();
        assert_eq!(a.errors, 0b1010, "a bulk string holding '-' is no error");
        assert_eq!(pipe.owed, 2);
        pipe.rbuf.extend_from_slice(b" y\r\n:1\r\n");
        pipe.dispatch().unwrap();
        assert_eq!(rx_b.try_recv().unwrap().unwrap().errors, 0b01);
        assert_eq!(pipe.owed, 0);
    }

    #[tokio::test]
    async fn failure_reaches_every_batch_and_gone_clients_are_skipped() {
        let mut pipe = Pipeline::new(None);
        let (a, rx_a) = request(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 1);
        let (b, mut rx_b) = request(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 1);
        drop(rx_a);
        pipe.push(a, Instant::now());
        pipe.push(b, Instant::now());
        assert_eq!(
            pipe.inflight.len(),
            1,
            "the departed client's request is never written"
        );
        pipe.fail(UpstreamError::ConnectionLost, Lost::ClientsGone);
        assert_eq!(rx_b.try_recv().unwrap(), Err(UpstreamError::ConnectionLost));
    }
}
