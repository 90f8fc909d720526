//! Reply order: every request gets a slot in `pending`, in the order it was read, and a slot
//! moves to `out` only once every older one has. Local replies, upstream batches and pinned
//! connections to give back all wait their turn here; the output budget and
//! `client_output_limit` are enforced as replies arrive.

use std::{cell::RefCell, collections::VecDeque, future::Future, pin::Pin, task::Poll};

use bytes::Bytes;
use tokio::{sync::oneshot, time::Instant};
use tracing::warn;

use super::{
    state::{Effect, ReplyMode},
    Invalidate, Path, Pending, State, Then, MAX_IN_FLIGHT,
};
use crate::{
    command::CommandId,
    resp::{encode, Args, ReplyScanner},
    upstream::{Lease, Replies, Reply, UpstreamError},
};

/// The reply queues of a busy session. Parking gives them to a small per-thread pool, from
/// which the next session to wake takes them: a client that sends one request at a time
/// would otherwise allocate both for every request.
#[derive(Default)]
pub(super) struct Queues {
    pub(super) pending: VecDeque<Pending>,
    pub(super) out: VecDeque<Bytes>,
    pub(super) owed: VecDeque<CommandId>,
}

thread_local! {
    static SPARE_QUEUES: RefCell<Vec<Queues>> = const { RefCell::new(Vec::new()) };
}

/// Most queues kept per thread, and most slots in a kept queue: enough for the sessions that
/// wake at once, never the grown queues of a client that pipelined. With 256 clients sending
/// one request at a time, a pool of 64 left 43% of bursts allocating two queues; 256 keeps at
/// most 256 × 2 KB per thread (512 KB), 128 KB in the usual case of 4 slots a queue.
pub(super) const SPARE_QUEUES_MAX: usize = 256;

pub(super) const SPARE_QUEUE_CAPACITY: usize = 16;

impl Queues {
    pub(super) fn take() -> Queues {
        SPARE_QUEUES.with_borrow_mut(Vec::pop).unwrap_or_default()
    }

    /// Empty queues go back to the pool (if it has room and they are small).
    pub(super) fn give_back(self) {
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

/// Waits for the oldest slot, which the caller guarantees is an upstream one.
pub(super) fn front_reply(
    pending: &mut VecDeque<Pending>,
) -> impl Future<Output = Result<Reply, oneshot::error::RecvError>> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some(Pending::Upstream { rx, .. }) => Pin::new(rx).poll(cx),
        _ => Poll::Pending,
    })
}

impl State {
    /// Moves replies that are ready, in order, from `pending` to `out`.
    pub(super) fn collect_ready(&mut self) {
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
                Pending::Pushed(bytes) => {
                    let bytes = std::mem::take(bytes);
                    self.pending.pop_front();
                    self.enqueue(bytes);
                    continue;
                }
                Pending::Release(_) => {
                    if let Some(Pending::Release(lease)) = self.pending.pop_front() {
                        lease.release();
                    }
                    continue;
                }
                Pending::Unmonitor(_) => {
                    if let Some(Pending::Unmonitor(feed)) = self.pending.pop_front() {
                        // Dropping the feed closes its connection.
                        drop(feed);
                    }
                    continue;
                }
                Pending::Invalidate(_) => {
                    if let Some(Pending::Invalidate(waiting)) = self.pending.pop_front() {
                        self.invalidate_now(&waiting);
                    }
                    continue;
                }
                Pending::Upstream { rx, blocking, .. } => {
                    let blocked = *blocking;
                    match rx.try_recv() {
                        Ok(reply) => reply,
                        Err(oneshot::error::TryRecvError::Empty) => {
                            if blocked && self.pending.len() > 1 {
                                self.pass_unasked();
                            }
                            return;
                        }
                        Err(oneshot::error::TryRecvError::Closed) => {
                            Err(UpstreamError::ConnectionLost)
                        }
                    }
                }
            };
            if let Some(Pending::Upstream {
                count,
                suppress,
                release,
                charged,
                sent,
                then,
                blocking,
                bytes,
                ..
            }) = self.pending.pop_front()
            {
                self.resolved(blocking, bytes);
                let (reply, charged) = self.then(then, reply, charged);
                self.deliver(reply, count, suppress, release, charged, sent);
            }
        }
    }

    /// An upstream slot of `bytes` of requests is answered; a blocking one means the client
    /// is no longer blocked.
    pub(super) fn resolved(&mut self, blocking: bool, bytes: u32) {
        self.unresolved -= 1;
        self.in_flight = self.in_flight.saturating_sub(bytes);
        if blocking {
            self.client.entry.set_blocked_on(None);
        }
        self.settle_written();
    }

    /// Does what a reply was awaited for (see [`Then`]); returns the reply to pass on, and
    /// whether it is charged to the output budget.
    pub(super) fn then(
        &mut self,
        then: Option<Box<Then>>,
        reply: Reply,
        charged: bool,
    ) -> (Reply, bool) {
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
            (Some(Then::Synced(count, argument, skipped)), reply) => {
                let (reply, charged) = match reply {
                    Ok(replies) => self.recount(count, argument, replies, charged),
                    reply => (reply, charged),
                };
                self.synced(reply, charged, skipped)
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
                    Effect::Check(_) | Effect::Send(..) | Effect::Track(_) => {
                        encode::error("redmux: AUTH could not be checked")
                    }
                    Effect::None | Effect::Reset => bytes,
                };
                let errors = u64::from(bytes.first() == Some(&b'-'));
                (Ok(Replies { bytes, errors }), false)
            }
            (Some(Then::Fill(filling)), Ok(replies)) => self.filled(filling, replies, charged),
            (Some(Then::Marked), Ok(replies)) => self.unmarked(replies, charged),
            (Some(Then::Tracking), reply) => {
                if !matches!(&reply, Ok(replies) if replies.errors == 0) {
                    self.client.tracking_off();
                }
                (reply, charged)
            }
            (_, reply) => (reply, charged),
        }
    }

    /// WAIT's reply, behind that of the PING sent before it (see [`Then::Marked`]).
    fn unmarked(&mut self, replies: Replies, charged: bool) -> (Reply, bool) {
        let Replies { bytes, errors } = replies;
        let mut scanner = ReplyScanner::new();
        let Ok(Some(end)) = scanner.next_reply(&bytes) else {
            // The actor read exactly two replies: not reached.
            return (Ok(Replies { bytes, errors }), charged);
        };
        if charged {
            self.budget.refund(end);
        }
        let wait = bytes.slice(end..);
        (
            Ok(Replies {
                bytes: wait,
                errors: errors >> 1,
            }),
            charged,
        )
    }

    /// A failed AUTH, for the metrics.
    pub(super) fn auth_failed(&self) {
        if let Some(metrics) = &self.config.metrics {
            metrics.auth_failed();
        }
    }

    /// Queues the replies of an upstream batch for the client, and gives back the pinned
    /// connection it was holding, if any.
    pub(super) fn deliver(
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
    pub(super) fn settle(&mut self, count: u32, errors: u64, sent: Option<Instant>) {
        self.outstanding -= count;
        self.flush_if_answered(count);
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

    /// Whether fewer requests are owed than `max_pipeline` allows, and fewer bytes of them are
    /// on their way than [`MAX_IN_FLIGHT`]: more may be read, parsed and sent.
    pub(super) fn pipeline_has_room(&self) -> bool {
        let requests = u32::try_from(self.config.max_pipeline)
            .map_or(self.outstanding < u32::MAX, |max| self.outstanding < max);
        requests && (self.in_flight as usize) < MAX_IN_FLIGHT
    }

    /// A request was taken on: its reply is owed.
    pub(super) fn owe(&mut self) {
        self.outstanding += 1;
        if self.config.metrics.is_some() {
            self.owed.push_back(self.current);
        }
    }

    /// Queues bytes redmux produced itself: they count against the output budget too.
    pub(super) fn queue_out(&mut self, bytes: Bytes) {
        if !self.budget.charge(bytes.len()) {
            self.budget.refund(bytes.len());
            return self.over_limit();
        }
        self.enqueue(bytes);
    }

    /// Queues a frame the client did not ask for behind the replies it is owed, charged to the
    /// output budget now (see [`Pending::Pushed`]). A client blocked on a command hears it at
    /// once instead, as Redis writes a blocked client its pushes: the commands after the
    /// blocking one have not run, and those before it are answered.
    pub(super) fn push_unasked(&mut self, frame: Bytes) {
        if !self.budget.charge(frame.len()) {
            self.budget.refund(frame.len());
            return self.over_limit();
        }
        // With slots behind the blocking one, it goes behind them, and `collect_ready` passes
        // them all on in order.
        if self.blocked() && self.pending.len() == 1 {
            return self.enqueue(frame);
        }
        self.pending.push_back(Pending::Pushed(frame));
    }

    /// Whether the client waits on a blocking command, every reply before it out.
    fn blocked(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Upstream { blocking: true, .. })
        )
    }

    /// The client waits on a blocking command: the pushes and invalidations queued behind it
    /// go out now, in their order, ahead of it and of the replies queued after it, which
    /// Redis would send only once it returns. The slots behind it are at most
    /// `max_pipeline`.
    fn pass_unasked(&mut self) {
        let unasked = |slot: &Pending| matches!(slot, Pending::Pushed(_) | Pending::Invalidate(_));
        if !self.pending.iter().skip(1).any(unasked) {
            return;
        }
        let behind: Vec<Pending> = self.pending.drain(1..).collect();
        for slot in behind {
            match slot {
                Pending::Pushed(bytes) => self.enqueue(bytes),
                Pending::Invalidate(waiting) => self.invalidate_now(&waiting),
                slot => self.pending.push_back(slot),
            }
        }
    }

    /// Turns waiting invalidations into the bytes the client gets, given back to the budget
    /// they were charged to.
    fn invalidate_now(&mut self, waiting: &Invalidate) {
        self.budget.refund(waiting.charged);
        let bytes = if waiting.redirected {
            self.client.redirected(&waiting.invalidation)
        } else {
            self.client.invalidation(&waiting.invalidation)
        };
        if !bytes.is_empty() {
            self.queue_out(bytes);
        }
    }

    /// Queues bytes already charged to the budget.
    pub(super) fn enqueue(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.out_len += bytes.len();
            self.out.push_back(bytes);
        }
    }

    /// The client does not read what it is sent: close it, as Redis does past its
    /// client-output-buffer-limit.
    pub(super) fn over_limit(&mut self) {
        if !self.abort {
            warn!(
                limit = self.config.client_output_limit,
                "client output limit reached (it does not read its replies); closing"
            );
            self.abort = true;
        }
    }

    /// Answers one request locally, honouring CLIENT REPLY OFF and SKIP.
    pub(super) fn reply_locally(&mut self, bytes: Bytes) {
        let bytes = if self.take_suppress() {
            Bytes::new()
        } else {
            bytes
        };
        self.owe();
        self.pending.push_back(Pending::Local { bytes, count: 1 });
    }

    /// Whether this request's reply is to be dropped (CLIENT REPLY OFF, or SKIP once).
    pub(super) fn take_suppress(&mut self) -> bool {
        match self.client.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::Skip => {
                self.client.reply_mode = ReplyMode::On;
                true
            }
        }
    }

    /// A reply slot for one reply that comes from elsewhere than an upstream actor: not
    /// charged to the output budget by anyone (it is one small reply).
    pub(super) fn await_upstream(
        &mut self,
        rx: oneshot::Receiver<Reply>,
        path: Path,
        suppress: bool,
    ) {
        self.await_replies(rx, path, 1, suppress, None);
    }

    /// Takes the invalidations waiting in the client's entry into the reply queue, behind the
    /// replies already owed. One of the same kind waiting among the last two slots (its own
    /// and redirected ones alternate there) takes them in: it overtakes no reply that way.
    /// What waits is charged to the output budget, so a client that does not read (or waits
    /// on a blocking command, with messages or other replies between its invalidations)
    /// is closed at `client_output_limit`, as for any push.
    pub(super) fn take_mail(&mut self) {
        let mail = self.client.entry.take_mail();
        for (invalidation, redirected) in [(mail.own, false), (mail.redirected, true)] {
            let Some(invalidation) = invalidation else {
                continue;
            };
            let waiting = self
                .pending
                .iter_mut()
                .rev()
                .take(2)
                .map_while(|slot| match slot {
                    Pending::Invalidate(waiting) => Some(waiting),
                    _ => None,
                })
                .find(|waiting| waiting.redirected == redirected);
            let charged = match waiting {
                Some(waiting) => {
                    let before = waiting.invalidation.size();
                    waiting.invalidation.absorb(invalidation);
                    let grown = waiting.invalidation.size().saturating_sub(before);
                    self.budget
                        .charge(grown)
                        .then(|| waiting.charged += grown)
                        .ok_or(grown)
                }
                None => {
                    let charged = invalidation.size();
                    let fits = self.budget.charge(charged);
                    if fits {
                        self.pending
                            .push_back(Pending::Invalidate(Box::new(Invalidate {
                                invalidation,
                                redirected,
                                charged,
                            })));
                    }
                    fits.then_some(()).ok_or(charged)
                }
            };
            if let Err(refused) = charged {
                self.budget.refund(refused);
                return self.over_limit();
            }
        }
    }

    /// A reply slot for `count` replies (0: an answer that is not a reply, such as a
    /// subscriber hub's confirmation that a RESET left it) that come in one piece from
    /// elsewhere than an upstream actor; `then`, what to do with them besides passing them on.
    pub(super) fn await_replies(
        &mut self,
        rx: oneshot::Receiver<Reply>,
        path: Path,
        count: u32,
        suppress: bool,
        then: Option<Box<Then>>,
    ) {
        self.last_path = Some(path);
        self.unresolved += 1;
        self.pending.push_back(Pending::Upstream {
            rx,
            count,
            suppress,
            release: None,
            charged: false,
            sent: Instant::now(),
            blocking: false,
            bytes: 0,
            then,
        });
    }
}
