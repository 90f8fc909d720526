//! From bytes to destinations: parse what the client sent, decide each request with
//! [`crate::command`], and carry it out, answering locally, forwarding runs of requests as one
//! batch, or taking a pinned connection. The path barrier lives here: a request that takes
//! another connection than the ones still unanswered waits until they are answered.

use std::{
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{sync::mpsc::error::TrySendError, sync::oneshot, time::Instant};
use tracing::debug;

use super::{
    cache::{note_write, Plan},
    registry::{flag, PauseMode, Subscription},
    state::{Effect, ReplyMode},
    subscriptions::Feed,
    Path, PauseWait, Pending, Run, State, Then, Tx, MAX_BATCH,
};
use crate::{
    command::{self, Action, CommandId, Transaction},
    monitor,
    resp::{encode, encode_command, Args, Frame},
    upstream::{Batch, Lease, UpstreamError},
};

/// Polls the wait for a CLIENT PAUSE to end; never ready without one.
pub(super) fn poll_pause(pause: &mut Option<Box<PauseWait>>, cx: &mut Context<'_>) -> Poll<()> {
    match pause {
        Some(wait) => (**wait).as_mut().poll(cx),
        None => Poll::Pending,
    }
}

impl State {
    /// Parses buffered requests while the pipeline limit allows, forwarding runs of them.
    /// Stops at a request that must wait for a barrier (see [`Path`]).
    pub(super) async fn process_input(&mut self) {
        self.barrier = false;
        if self.unresolved == 0 {
            self.sync = false;
        }
        // `rbuf[..run_len]` holds `run_count` canonical requests for the current connection.
        let mut run_len = 0;
        let mut run_count = 0;
        loop {
            if !self.pipeline_has_room() {
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
                // Input Redis ignores without a reply, though as a command of no arguments:
                // it uses up a CLIENT REPLY SKIP (Redis's `resetClient` runs for it).
                self.flush_run(&mut run_len, &mut run_count).await;
                self.rbuf.advance(frame.consumed());
                if self.client.reply_mode == ReplyMode::Skip {
                    self.client.reply_mode = ReplyMode::On;
                }
                continue;
            };
            let profile = self.client.upstreams().profile();
            let (command, action) = match self.decoder.name().and_then(|at| request.get(at)) {
                Some(name) => command::action_named(request, name, profile),
                None => command::action(request, profile),
            };
            let action = self.uncounted(action);
            let action = self.monitoring(command, action, request);
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
            let cached = self.config.cache.is_some();
            let writes =
                (paused.is_some() || in_multi || cached) && command::may_write(command, request);
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
                    let wait = Box::pin(async move { clients.wait(until).await });
                    self.pause = Some(Box::new(wait));
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
            // A transaction without a connection reads nothing (see `Tx`).
            if self.client.tracking.is_some() && !self.tx.queues_here() {
                // Before it goes upstream: see `tracking`. (A run flushed above moved the
                // request to the front of the buffer, where `run_len` now points.)
                if let Some(request) = frame.command_bytes(&self.rbuf[run_len..]) {
                    self.client.track(command, request, in_multi);
                }
            }
            if writes && cached {
                if let Some(request) = frame.command_bytes(&self.rbuf[run_len..]) {
                    let owed = (!in_multi).then_some(self.outstanding);
                    note_write(&mut self.written, command, request, owed);
                }
            }
            self.client.entry.command(command);
            if let Some(metrics) = &self.config.metrics {
                metrics.command(command);
            }
            if let (
                true,
                true,
                Frame::Command {
                    len,
                    rewritten: None,
                },
            ) = (cached, action == Action::Forward && plain, &frame)
            {
                if let Some(cache) = self.readable_cache(run_count) {
                    let len = *len;
                    let plan = self.plan(&cache, command, &self.rbuf[run_len..run_len + len]);
                    if !matches!(plan, Plan::Forward) {
                        // Boxed, as `execute` is: its state would sit in every busy session.
                        Box::pin(self.take_cached(plan, len, &mut run_len, &mut run_count)).await;
                        continue;
                    }
                }
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
    pub(super) async fn execute(&mut self, action: Action, request: Bytes) -> bool {
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

    pub(super) async fn carry_out(&mut self, action: Action, request: Bytes) -> bool {
        if let Action::Reject(error) = action {
            if let Tx::Multi { dirty, .. } = &mut self.tx {
                *dirty = true;
            }
            self.reply_locally(error);
            return true;
        }
        if !self.client.authenticated && !command::allowed_before_auth(&action, &request) {
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
            if let Some(reply) = command::subscribed_context(&action, &request) {
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
                    Effect::Send(unblock, node) => {
                        self.owe();
                        let suppress = self.take_suppress();
                        let upstreams = self.client.upstreams();
                        let rx = upstreams.control(unblock, upstreams.default_target(), node);
                        self.await_upstream(rx, Path::Control, suppress);
                        return true;
                    }
                    Effect::Track(rx) => {
                        self.owe();
                        let suppress = self.take_suppress();
                        let then = Some(Box::new(Then::Tracking));
                        self.await_replies(rx, Path::Tracking, 1, suppress, then);
                        return true;
                    }
                    Effect::AuthFailed => self.auth_failed(),
                    Effect::None | Effect::Reset => {}
                }
                if let Tx::Watching(Ok(_)) = &self.tx {
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
                        let batch = Run {
                            frames: Bytes::from(follow.concat()),
                            count,
                            timeout: Some(self.config.request_timeout),
                            ..Run::default()
                        };
                        for _ in 0..count {
                            self.owe();
                        }
                        // Their replies are Redis's, not the client's: dropped.
                        self.send(batch, true).await;
                    }
                }
                if matches!(effect, Effect::Reset) {
                    // The pinned connection goes back (cleaned by its own RESET, which
                    // discards the transaction) once the requests already sent on it are in.
                    match std::mem::replace(&mut self.tx, Tx::None) {
                        Tx::Watching(Ok(lease))
                        | Tx::Multi {
                            lease: Ok(lease), ..
                        } => {
                            self.pending.push_back(Pending::Release(lease));
                        }
                        Tx::Watching(Err(_)) | Tx::Multi { lease: Err(_), .. } | Tx::None => {}
                    }
                    if let Some(feed) = self.monitor.take() {
                        self.pending.push_back(Pending::Unmonitor(feed));
                    }
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
                    .control(request, self.client.target(), None);
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
            // Redis answers nothing to a client that monitors already (`monitorCommand` returns
            // before its reply): an empty slot, which uses up a CLIENT REPLY SKIP as any does.
            Action::Monitor if self.monitor.is_some() => self.reply_locally(Bytes::new()),
            Action::Monitor => {
                let (feed, inbox) = Feed::new(self.config.output_limit());
                let identity = self.client.identity();
                let rx = monitor::start(self.client.upstreams(), identity.as_ref(), inbox).await;
                self.monitor = Some(Box::new(feed));
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
                    // A timeout too large to add to, which Redis refuses ("timeout is
                    // negative" or "out of range"), waits for that answer without a deadline.
                    _ => (
                        block.and_then(|t| t.checked_add(self.config.request_timeout)),
                        true,
                    ),
                };
                if self.eof && blocking {
                    // Nobody would read the reply, and it may never come.
                    self.abort = true;
                    return false;
                }
                // Watching without a connection, it takes one of its own as outside.
                let lease = if self.held().is_none() && !matches!(self.tx, Tx::Multi { .. }) {
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
                // WAIT counts replicas for this connection's offset: a command of redmux's own
                // first moves it past the client's writes. A standalone Redis only: the
                // embedded store has no replicas, and in front of a cluster the client's writes
                // went to other masters than the one WAIT reaches.
                let upstreams = self.client.upstreams();
                let marked = blocking
                    && upstreams.profile() == command::Profile::Redis
                    && !upstreams.is_cluster()
                    && command::waits_for_replicas(&request);
                let (frames, then) = match marked {
                    true => (
                        Bytes::from([command::MARK, &request].concat()),
                        Some(Box::new(Then::Marked)),
                    ),
                    false => (request, None),
                };
                let batch = Run {
                    frames,
                    count: 1,
                    timeout,
                    release: lease,
                    blocking,
                    then,
                    ..Run::default()
                };
                self.forward(batch).await;
            }
        }
        true
    }

    /// Shows what CLIENT LIST shows of the client as it is after a command off the plain path
    /// (the plain path changes none of it).
    pub(super) fn publish_state(&self) {
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
    pub(super) async fn check_auth(&mut self, auth: Bytes, request: Bytes) {
        let name = Args::new(&request).next().unwrap_or_default();
        let refusal = if self.subs.has_hub() {
            Some("redmux: AUTH while subscribed is not supported")
        } else if matches!(self.tx, Tx::Watching(Ok(_))) && name.eq_ignore_ascii_case(b"hello") {
            Some("redmux: HELLO with AUTH while watching is not supported")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return self.reply_locally(encode::error(refusal));
        }
        // Never on the shared connection: on the watching one, else the checking one.
        let via = match self.held() {
            None => Some(self.client.upstreams().auth_checker()),
            Some(_) => None,
        };
        let batch = Run {
            frames: auth,
            count: 1,
            timeout: Some(self.config.request_timeout),
            then: Some(Box::new(Then::Replay(request))),
            via,
            ..Run::default()
        };
        self.sync = true;
        self.forward(batch).await;
    }

    /// Redis counts a MONITOR client as a replica, which may not touch the keyspace: refused
    /// here (after the subscribed context's own refusal, which comes first in Redis).
    fn monitoring(&self, command: CommandId, action: Action, request: &[u8]) -> Action {
        let refused = self.monitor.is_some()
            && matches!(
                action,
                Action::Forward | Action::Count(_) | Action::Block(_)
            )
            && (self.client.resp3 || !self.subs.active())
            && command::touches_keyspace(command, request);
        match refused {
            true => Action::Reject(encode::error("Replica can't interact with the keyspace")),
            false => action,
        }
    }

    /// The pinned connection the client holds for its transaction, if any.
    pub(super) fn held(&self) -> Option<&Lease> {
        match &self.tx {
            Tx::Watching(Ok(lease))
            | Tx::Multi {
                lease: Ok(lease), ..
            } => Some(lease),
            Tx::Watching(Err(_)) | Tx::Multi { lease: Err(_), .. } | Tx::None => None,
        }
    }

    /// Where forwarded requests go now: the pinned connection during a transaction, else the
    /// shared one for the client's db and protocol.
    pub(super) fn current_path(&self) -> Path {
        match self.held() {
            Some(lease) => Path::Pinned(lease.id()),
            None => Path::Shared(self.client.moves),
        }
    }

    /// The path a request will take, if it goes upstream.
    pub(super) fn path_of(&self, action: &Action, request: &[u8]) -> Option<Path> {
        let held = self.held().map(|lease| Path::Pinned(lease.id()));
        match action {
            // AUTH checked by Redis: on the checking connection, or on the watching one. It
            // waits for what the client sent before, an UNSUBSCRIBE whose hub is that of the
            // old login included.
            Action::Connection if self.client.pass_through() && command::names_auth(request) => {
                Some(held.unwrap_or(Path::Auth))
            }
            Action::Forward | Action::Count(_) => Some(self.current_path()),
            // Without a transaction, the others are answered locally.
            Action::Transaction(Transaction::Multi | Transaction::Watch) | Action::Block(_) => {
                Some(held.unwrap_or(Path::NewPinned))
            }
            Action::Transaction(_) => held,
            Action::Connection if command::acts_on_others(request) => Some(Path::Others),
            // Redis runs nothing a client sends behind a blocking command before it returns:
            // RESET, HELLO or CLIENT TRACKING OFF would otherwise drop or change what the
            // client hears meanwhile.
            Action::Connection if self.owes_blocking() => Some(Path::Others),
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
    pub(super) fn stalled(&self) -> bool {
        self.barrier && self.unresolved > 0
    }

    /// Sends the run of requests at the front of `rbuf` as one batch.
    pub(super) async fn flush_run(&mut self, run_len: &mut usize, run_count: &mut u32) {
        if *run_count > 0 {
            let frames = self.take_front(*run_len);
            let batch = Run {
                frames,
                count: *run_count,
                timeout: Some(self.config.request_timeout),
                ..Run::default()
            };
            self.send(batch, false).await;
        }
        *run_len = 0;
        *run_count = 0;
    }

    /// The first `len` bytes of the read buffer. When they are all of it, the buffer is handed
    /// over whole: splitting it would allocate a shared header, once per request for a client
    /// that sends one request at a time.
    pub(super) fn take_front(&mut self, len: usize) -> Bytes {
        if len == self.rbuf.len() {
            std::mem::take(&mut self.rbuf).freeze()
        } else {
            self.rbuf.split_to(len).freeze()
        }
    }

    /// Forwards one request: on `release`'s connection if given (which is then given back
    /// after the reply), else to the current destination.
    pub(super) async fn forward_one(
        &mut self,
        frames: Bytes,
        timeout: Option<Duration>,
        release: Option<Lease>,
    ) {
        let batch = Run {
            frames,
            count: 1,
            timeout,
            release,
            ..Run::default()
        };
        self.forward(batch).await;
    }

    /// Forwards a batch of one request, honouring CLIENT REPLY OFF and SKIP.
    pub(super) async fn forward(&mut self, batch: Run) {
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
    pub(super) fn send(
        &mut self,
        batch: Run,
        suppress: bool,
    ) -> impl Future<Output = ()> + Send + '_ {
        let (reply, rx) = oneshot::channel();
        let Run {
            frames,
            count,
            timeout,
            release,
            blocking,
            then,
            via,
        } = batch;
        // The connection: `via`, else the request's own lease, else the transaction's, else
        // the shared one (the same choice as the destination's below).
        let path = match (&via, release.as_ref().or(self.held())) {
            (Some(_), _) => Path::Auth,
            (None, Some(lease)) => Path::Pinned(lease.id()),
            (None, None) => Path::Shared(self.client.moves),
        };
        // Queued in a transaction that has no connection: answered here, and never sent
        // (see `Tx`), least of all to the shared connection.
        let queued_here = via.is_none() && release.is_none() && self.tx.queues_here();
        // One request of a client with nothing outstanding may go past a cluster's router,
        // straight to its master (see `Shared::direct`): nothing of its own can be overtaken.
        let direct = matches!(path, Path::Shared(_))
            && self.unresolved == 0
            && count == 1
            && then.is_none()
            && !queued_here;
        self.last_path = Some(path);
        let handed_at = Instant::now();
        let bytes = match blocking {
            true => 0,
            false => u32::try_from(frames.len()).unwrap_or(u32::MAX),
        };
        let added = then.as_deref().map_or(0, Then::added_replies);
        let request = Batch {
            frames,
            count: count + added,
            queued_at: handed_at,
            timeout,
            reply: reply.into(),
            budget: Some(self.budget.clone()),
        };
        let request = match direct {
            true => self.client.shared.direct(request).err(),
            false => Some(request),
        };
        let handed = match request {
            _ if queued_here => Ok(false),
            None => Ok(true),
            Some(request) => {
                // Taken only now: a request sent direct needs no handle on the connection.
                let destination = via.unwrap_or_else(|| match release.as_ref().or(self.held()) {
                    Some(lease) => lease.sender().clone(),
                    None => self.client.shared.sender().clone(),
                });
                match destination.try_send(request) {
                    Ok(()) => Ok(true),
                    // Boxed: a full channel is rare, and this future is large.
                    Err(TrySendError::Full(request)) => {
                        let timeout = self.config.request_timeout;
                        Err(Box::pin(async move {
                            tokio::time::timeout(timeout, destination.send(request)).await
                        }))
                    }
                    Err(TrySendError::Closed(_)) => Ok(false),
                }
            }
        };
        async move {
            let sent = match handed {
                Ok(sent) => sent,
                Err(waiting) => matches!(waiting.await, Ok(Ok(()))),
            };
            if sent {
                self.unresolved += 1;
                self.in_flight = self.in_flight.saturating_add(bytes);
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
                    bytes,
                    then,
                }
            } else {
                Pending::Local {
                    bytes: match (suppress, queued_here) {
                        (true, _) => Bytes::new(),
                        (false, true) => encode::repeat(b"+QUEUED\r\n", count as usize),
                        (false, false) => UpstreamError::Unavailable.replies(count),
                    },
                    count,
                }
            });
        }
    }
}
