//! A session's life: parked while its client is idle, a boxed [`burst`] future while it is
//! busy, following reloads and the idle timeout throughout. The loop in [`burst`] reads,
//! forwards and writes concurrently; what each of those does is in the sibling modules.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    sync::watch,
    time::{Instant, Sleep},
};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::{debug, warn};

use super::{
    dispatch::poll_pause,
    registry::Event,
    replies::{front_reply, Queues},
    settings::{Live, SessionConfig},
    state::ClientState,
    subscriptions::{next_frame, next_message, Fed, Subscriptions},
    Pending, State, Tx, MAX_BATCH, OUTPUT_HIGH_WATER, STALLED_READ_AHEAD,
};
use crate::{
    command::CommandId,
    io::outgoing::write_some,
    io::{read_arrived, Budget, Duplex, ReadSide},
    resp::RequestDecoder,
    upstream::UpstreamError,
};

/// One client's session. While its client is idle (nothing buffered, nothing owed, no
/// transaction, subscription or MONITOR) it is *parked*: its task holds the socket, the
/// [`Parked`] state and one wait (for readability, a reload or shutdown, the idle timeout), and
/// nothing else. Once the client sends something, a boxed future ([`burst`]) holding the read
/// buffer, the reply queues and the futures of a busy session serves it until it is idle
/// again. So 10,000 idle clients cost 10,000 small tasks, not 10,000 busy ones.
pub(crate) struct Session<S> {
    io: S,
    /// Where the settings come from after a reload.
    updates: watch::Receiver<Arc<Live>>,
    /// `None` only while a burst of activity is being served.
    parked: Option<Parked>,
}

/// What a session keeps between bursts of activity.
pub(super) struct Parked {
    pub(super) config: Arc<SessionConfig>,
    pub(super) client: ClientState,
    /// Present when `client_idle_timeout` is set.
    pub(super) idle: Option<Box<IdleTimer>>,
}

/// Closes a client that has been idle for `client_idle_timeout`.
pub(super) struct IdleTimer {
    sleep: Pin<Box<Sleep>>,
    /// Last time the client sent a request or took a reply (or the timeout was set by a
    /// reload): idleness is measured from here.
    last_activity: Instant,
    timeout: Duration,
}

impl IdleTimer {
    /// Boxed: sessions without a timeout (the default) pay one pointer for it.
    pub(super) fn new(timeout: Duration) -> Box<Self> {
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

/// What a reload means for a session: new settings to take, or shutdown.
pub(super) enum Superseded {
    Settings(Arc<Live>),
    Shutdown,
}

/// The settings that superseded a session's: the latest published. They are superseded
/// themselves only at shutdown (every `superseded` token is a child of the server's stop
/// token, and a reload publishes before it cancels the old token).
pub(super) fn superseded_by(updates: &mut watch::Receiver<Arc<Live>>) -> Superseded {
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
    pub(crate) fn new(
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
    pub(crate) fn run(self, on_close: impl FnOnce() + Send) -> impl Future<Output = ()> + Send {
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
                    match client.entry.poll_event(cx) {
                        Poll::Ready(Event::Killed) => {
                            debug!("killed (CLIENT KILL); closing");
                            return Poll::Ready(Wake::Close);
                        }
                        Poll::Ready(Event::Mail) => return Poll::Ready(Wake::Mail),
                        Poll::Pending => {}
                    }
                    superseded.as_mut().poll(cx).map(|()| Wake::Superseded)
                })
                .await;
                match woken {
                    Wake::Read | Wake::Mail => {
                        // Woken by invalidations only, the socket had nothing to read.
                        let drained = matches!(woken, Wake::Mail);
                        let Some(serving) = wake(
                            &mut io,
                            &mut parked,
                            &mut updates,
                            superseded.as_mut(),
                            drained,
                        ) else {
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
pub(super) enum Wake {
    /// The client sent something (or closed).
    Read,
    /// Invalidations wait to be delivered (CLIENT TRACKING).
    Mail,
    /// A reload or shutdown.
    Superseded,
    /// A read error, or the idle timeout.
    Close,
}

/// The future that serves a burst of activity, boxed: only busy sessions hold one. A plain
/// function, so that no temporary of it takes room in the parked session's task.
pub(super) fn wake<'a, S: Duplex>(
    io: &'a mut S,
    parked: &mut Option<Parked>,
    updates: &'a mut watch::Receiver<Arc<Live>>,
    superseded: Pin<&'a mut WaitForCancellationFutureOwned>,
    drained: bool,
) -> Option<Pin<Box<impl Future<Output = Option<Parked>> + Send + use<'a, S>>>> {
    let mut state = State::resume(parked.take()?);
    state.drained = drained;
    Some(Box::pin(burst(io, state, updates, superseded)))
}

impl Parked {
    /// Takes the settings a reload published. `false` if the client must be closed.
    pub(super) fn take(&mut self, live: &Live) -> bool {
        follow(&mut self.config, &mut self.client, &mut self.idle, live)
    }
}

/// What a reload changes for any session: its settings, who may log in, the idle timeout.
/// `false` if the client is logged in as a user that no longer exists: it must be closed, as
/// Redis's ACL DELUSER does.
pub(super) fn follow(
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
pub(super) fn burst<'a, S: Duplex>(
    io: &'a mut S,
    mut this: State,
    updates: &'a mut watch::Receiver<Arc<Live>>,
    mut superseded: Pin<&'a mut WaitForCancellationFutureOwned>,
) -> impl Future<Output = Option<Parked>> + Send + use<'a, S> {
    async move {
        let (mut reader, mut writer) = io.halves();
        loop {
            if this.client.entry.has_mail() && !this.draining {
                this.take_mail();
            }
            this.collect_ready();
            if this.abort {
                break;
            }
            if this.unparsed
                && !this.draining
                && !this.stalled()
                && this.pause.is_none()
                && this.pipeline_has_room()
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
            // Past any of these limits the client is not read, except while a blocking
            // command is owed: its reply may never come, and the client's close must be seen
            // (to drop it, as Redis drops a blocked client that leaves), so it is read on, what
            // it sends meanwhile kept in `rbuf` within `client_query_limit`, as Redis reads a
            // blocked client on. Asked last: it looks through the reply slots.
            let room = this.pipeline_has_room()
                && this.out_len < OUTPUT_HIGH_WATER
                && !(this.stalled() && this.rbuf.len() >= STALLED_READ_AHEAD);
            let can_read = !this.draining && !this.eof && (room || this.owes_blocking());
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
                    if let Some(Pending::Upstream { count, suppress, release, charged, sent, then, blocking, bytes, .. }) = this.pending.pop_front() {
                        this.resolved(blocking, bytes);
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
                            this.abort = this.owes_blocking();
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
                (hub, frame) = next_message(&mut this.subs, this.out_len < OUTPUT_HIGH_WATER), if this.subs.feeding() => match frame {
                    Fed::Frame(bytes) => this.fed(bytes, hub),
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
                frame = next_frame(this.monitor.as_deref_mut(), this.out_len < OUTPUT_HIGH_WATER), if this.monitor.is_some() => match frame {
                    Fed::Frame(bytes) => this.push_unasked(bytes),
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
                event = std::future::poll_fn(|cx| this.client.entry.poll_event(cx)), if !this.draining => match event {
                    Event::Killed => {
                        debug!("killed (CLIENT KILL); closing");
                        break;
                    }
                    // Taken at the top of the loop.
                    Event::Mail => {}
                },
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
    pub(super) fn resume(parked: Parked) -> State {
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
            written: None,
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
            in_flight: 0,
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
    pub(super) fn parkable(&self) -> bool {
        self.drained
            && !self.draining
            && !self.eof
            && self.rbuf.is_empty()
            && self.outstanding == 0
            && self.pending.is_empty()
            && self.out.is_empty()
            && matches!(self.tx, Tx::None)
            && !self.subs.feeding()
            && !self.subs.active()
            && self.monitor.is_none()
    }

    /// Keeps what outlives the burst; the buffers and queues, empty now, are freed.
    pub(super) fn park(self) -> Parked {
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

    /// Whether a blocking command's reply is owed: it may never come, so the client's close
    /// must be seen (it drops the client, as Redis drops a blocked client that leaves), however
    /// much it pipelined behind the command.
    pub(super) fn owes_blocking(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Upstream { blocking: true, .. }))
    }

    /// The client sent a request or took a reply.
    pub(super) fn touch(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.last_activity = Instant::now();
        }
    }

    /// Takes the settings a reload published: limits, `[auth]`, `allow_monitor` and the idle
    /// timeout apply from now on, as Redis's CONFIG SET does to connected clients. The upstream
    /// connections stay those the client started with.
    pub(super) fn take_settings(&mut self, live: &Live) {
        if !follow(&mut self.config, &mut self.client, &mut self.idle, live) {
            self.abort = true;
        }
        self.decoder.set_limits(self.config.limits);
        let limit = self.config.output_limit();
        self.budget.set_limit(limit);
        for feed in self.subs.feeds().chain(self.monitor.as_deref()) {
            feed.queued.set_limit(limit);
        }
        self.decoder.set_unauthenticated(!self.client.authenticated);
    }
}
