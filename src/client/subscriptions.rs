//! A client's subscriptions: what it holds in each namespace, its confirmations built as Redis
//! would send them, and the feed of messages from its pub/sub hub (and of MONITOR lines).
//! Also the PUBSUB counts redmux corrects so that they read as if every client had its own
//! connection.

use std::{collections::VecDeque, future::Future, pin::Pin, sync::Arc, task::Poll};

use bytes::{Bytes, BytesMut};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{Path, Pending, Run, State, Then, Tx};
use crate::{
    command,
    command::Action,
    io::Budget,
    pubsub,
    resp::{encode, Args},
    upstream::{Replies, Reply},
};

/// The client's subscriptions, for its confirmations and counts, and the inbox its messages
/// arrive in.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Boxed, once the client first subscribes: every busy session carries this struct, and
    /// most never subscribe.
    held: Option<Box<Held>>,
    /// Present while subscribed to anything, or owed an answer by the hub. The hub closes it,
    /// or fires its `cut`, when it cuts the client off.
    pub(super) inbox: Option<Feed>,
    /// The hub of the client's subscriptions, from the first: that of the user the client
    /// was logged in as then, whose channel permissions Redis applies.
    pub(super) hub: Option<pubsub::PubSub>,
}

/// What a subscribed client holds.
#[derive(Debug, Default)]
pub(super) struct Held {
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
pub(super) struct Open {
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
pub(super) struct Names {
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

    pub(super) fn len(&self) -> usize {
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
pub(super) struct Feed {
    rx: mpsc::UnboundedReceiver<Bytes>,
    /// Bytes sent and not yet taken, shared with the sender, which gives up past its limit.
    pub(super) queued: Arc<Budget>,
    /// Fires when the sender gives up on the client: it is then closed at once, however much
    /// it has still to read. `None` once the sender let go without firing it.
    cut: Option<oneshot::Receiver<()>>,
}

impl Feed {
    pub(super) fn new(limit: usize) -> (Feed, pubsub::Inbox) {
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
pub(super) enum Fed {
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
pub(super) fn next_frame(
    mut feed: Option<&mut Feed>,
    room: bool,
) -> impl Future<Output = Fed> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(feed) = feed.as_deref_mut() else {
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
pub(super) fn kind_index(kind: command::Namespace) -> usize {
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

    pub(super) fn len(&self, kind: command::Namespace) -> usize {
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
    pub(super) fn active(&self) -> bool {
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

/// A RESP2 array frame as a RESP3 push: the same bytes but the first.
pub(super) fn as_push(frame: Bytes) -> Bytes {
    if frame.first() != Some(&b'*') {
        return frame;
    }
    let mut push = BytesMut::from(&frame[..]);
    push[0] = b'>';
    push.freeze()
}

impl State {
    /// (P|S)SUBSCRIBE: a confirmation per name with this client's count, sent when the hub
    /// answers (see [`State::open_slot`]). Push output: CLIENT REPLY OFF does not silence it.
    /// On a hub logged in as the client's own user, Redis may refuse it (-NOPERM): nothing
    /// after it runs before the answer is in, so that no count assumes it succeeded.
    ///
    /// Constant work per name, and a long list gives the runtime back its thread now and then:
    /// one request may name a million channels, and other clients must not wait for it.
    pub(super) async fn subscribe(&mut self, kind: command::Namespace, names: Vec<Bytes>) {
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
                let hub = self.client.hubs().hub(self.client.identity().as_ref());
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

    /// (P|S)UNSUBSCRIBE: a frame per name (every subscription of the kind when none is given,
    /// in subscription order, or one with a null name when there is none). Constant work per
    /// name, as for [`State::subscribe`]. When the client held any of them, the frames go
    /// once the hub has unsubscribed upstream what nobody else wants: a request of the client
    /// on another path waits for them (see [`Path`]), and so finds Redis's counts without the
    /// subscriptions it dropped.
    pub(super) async fn unsubscribe(&mut self, kind: command::Namespace, names: Vec<Bytes>) {
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
    pub(super) fn open_slot(
        &mut self,
        frames: Bytes,
        kind: command::Namespace,
        added: Vec<(Bytes, u64)>,
    ) {
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
    pub(super) fn fed(&mut self, frame: Bytes) {
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
    pub(super) fn answered(&mut self, answer: Bytes) {
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
    pub(super) fn finish_slot(&mut self, open: Open, error: Option<Bytes>) {
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
    pub(super) async fn leave_pubsub(&mut self) {
        if let Some(hub) = std::mem::take(&mut self.subs).hub {
            hub.leave(self.client.id).await;
        }
    }

    /// RESET drops every subscription. What the hub has not answered yet is confirmed now,
    /// as Redis would have before the RESET; the client's next request on another path waits
    /// until the hub has unsubscribed upstream what nobody else wants (a reply slot of no
    /// reply of its own).
    pub(super) async fn reset_pubsub(&mut self) {
        let Subscriptions { held, hub, .. } = std::mem::take(&mut self.subs);
        for open in held.map(|held| held.open).unwrap_or_default() {
            self.finish_slot(open, None);
        }
        let Some(hub) = hub else {
            return;
        };
        let rx = hub.reset(self.client.id).await;
        self.await_replies(rx, Path::PubSub, 0, false, None);
    }

    /// Appends a 3-element subscription frame to `out`: RESP2 array or RESP3 push.
    pub(super) fn push_frame(
        &self,
        out: &mut Vec<u8>,
        verb: &str,
        name: Option<&[u8]>,
        count: usize,
    ) {
        let kind = if self.client.resp3 { b'>' } else { b'*' };
        encode::put_header(out, kind, 3);
        encode::put_bulk(out, verb.as_bytes());
        match name {
            Some(name) => encode::put_bulk(out, name),
            None => out.extend_from_slice(&self.client.null()),
        }
        encode::put_integer(out, count as i64);
    }

    /// A count command stays on the plain forwarding path unless this upstream set's hubs or
    /// their clients hold a subscription (one atomic load): with none, Redis's count is right.
    /// In a transaction it is queued as it is (EXEC's reply is not corrected).
    pub(super) fn uncounted(&self, action: Action) -> Action {
        match action {
            Action::Count(_)
                if matches!(self.tx, Tx::Multi { .. })
                    || !self.client.hubs().registry().active() =>
            {
                Action::Forward
            }
            action => action,
        }
    }

    /// Forwards a count command; its reply is corrected ([`Then::Count`]).
    pub(super) async fn forward_counted(&mut self, count: command::Count, request: Bytes) {
        let argument = count
            .argument_index()
            .and_then(|i| Args::new(&request).nth(i))
            .map(|arg| request.slice_ref(arg));
        let batch = Run {
            frames: request,
            count: 1,
            timeout: Some(self.config.request_timeout),
            then: Some(Box::new(Then::Count(count, argument))),
            ..Run::default()
        };
        self.forward(batch).await;
    }

    /// Redis's count corrected for what redmux's hubs and their clients hold.
    pub(super) fn recount(
        &self,
        count: command::Count,
        argument: Option<Bytes>,
        replies: Replies,
        charged: bool,
    ) -> (Reply, bool) {
        let registry = self.client.hubs().registry();
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
}
