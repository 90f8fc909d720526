//! A client's subscriptions: what it holds in each namespace, its confirmations built as Redis
//! would send them, and the feed of messages from its pub/sub hub (and of MONITOR lines).
//! Also the PUBSUB counts redmux corrects so that they read as if every client had its own
//! connection.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{Path, Pending, Run, State, Then, Tx};
use crate::{
    cluster::{
        keys::{slot_of, SlotOf},
        plan::{CLUSTERDOWN, CROSSSLOT},
        redirect::{redirect, Redirect},
    },
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
    /// In front of a cluster: the shard hubs of the masters the client's shard channels are
    /// on, each with a feed of its own.
    shards: Vec<ShardLink>,
    /// In front of a cluster: the shard hub (its [`ShardLink::id`]) of each shard channel.
    shard_of: HashMap<Bytes, u32>,
    /// The id the next shard link gets.
    next_shard: u32,
    /// The feed [`next_message`] looks at first (0: the own hub's, then the shard links').
    turn: usize,
    /// The (un)subscriptions the hub has not answered yet, oldest first. The hub answers them
    /// in the client's inbox in this order, each where the upstream stream gave its answer, so
    /// messages and confirmations reach the client in the order Redis would have sent them on
    /// a connection of its own.
    open: VecDeque<Open>,
}

/// The shard hub of one master, for a client's shard channels on it.
#[derive(Debug)]
struct ShardLink {
    /// Its number, never 0 (the client's own hub): where its answers go (see [`Open::hub`]).
    id: u32,
    node: (String, u16),
    hub: pubsub::PubSub,
    feed: Feed,
}

/// An UNSUBSCRIBE's frames in runs, each run's names held on one hub (see
/// [`State::unsubscribe`]).
#[derive(Debug, Default)]
struct HubRuns {
    runs: Vec<HubRun>,
}

#[derive(Debug)]
struct HubRun {
    /// The hub of the names removed in this run; `None` while it has none.
    hub: Option<u32>,
    frames: Vec<u8>,
    removed: Vec<Bytes>,
}

impl HubRuns {
    /// Where the frame of a name goes: the last run, unless the name is held on a hub other
    /// than that run's (`hub`: `None` for a name the client did not hold).
    fn frame(&mut self, hub: Option<u32>) -> &mut Vec<u8> {
        let fits = self
            .runs
            .last()
            .is_some_and(|last| hub.is_none() || last.hub.is_none() || last.hub == hub);
        if !fits {
            self.runs.push(HubRun {
                hub: None,
                frames: Vec::new(),
                removed: Vec::new(),
            });
        }
        let at = self.runs.len() - 1;
        let last = &mut self.runs[at];
        last.hub = last.hub.or(hub);
        &mut last.frames
    }

    /// The last frame's name was held, and is removed.
    fn removed(&mut self, name: Bytes) {
        if let Some(last) = self.runs.last_mut() {
            last.removed.push(name);
        }
    }

    fn done(self) -> Vec<HubRun> {
        self.runs
    }
}

/// The hub of the client's channels and patterns (and of its shard channels without a
/// cluster), in [`Open::hub`].
const OWN_HUB: u32 = 0;

/// An (un)subscription the hub has not answered yet.
#[derive(Debug)]
pub(super) struct Open {
    /// The hub that answers it: [`OWN_HUB`], or a shard link's id. Each hub answers its
    /// client's requests in order; the reply queue puts the answers of different hubs back in
    /// the order the client sent them.
    hub: u32,
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
    awaits: Awaits,
}

/// What an open slot waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaits {
    /// The hub's answer to an (un)subscription.
    Answer,
    /// A RESP3 subscriber's PUBLISH, in flight on another connection: the slot holds the
    /// messages the hub passes on meanwhile, and will hold the PUBLISH's reply.
    Reply,
    /// The PUBLISH's reply is in `frames`; the hub's answer to a [`pubsub::PubSub::sync`]
    /// says every message Redis sent before it ran has been passed on.
    Sync,
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
    std::future::poll_fn(move |cx| match feed.as_deref_mut() {
        Some(feed) => feed.poll_next(cx, room),
        None => Poll::Pending,
    })
}

/// [`next_frame`] of every hub feed of the client: its own hub's and its shard links', with
/// the hub it came from (see [`Open::hub`]). The feeds take turns: a busy one does not keep
/// the others waiting until they pass their output limit.
pub(super) fn next_message(
    subs: &mut Subscriptions,
    room: bool,
) -> impl Future<Output = (u32, Fed)> + '_ {
    std::future::poll_fn(move |cx| {
        let Subscriptions { held, inbox, .. } = &mut *subs;
        let Some(held) = held.as_deref_mut().filter(|held| !held.shards.is_empty()) else {
            return match inbox {
                Some(feed) => feed.poll_next(cx, room).map(|fed| (OWN_HUB, fed)),
                None => Poll::Pending,
            };
        };
        let feeds = 1 + held.shards.len();
        for i in 0..feeds {
            let at = (held.turn + i) % feeds;
            let polled = match at.checked_sub(1) {
                None => inbox
                    .as_mut()
                    .map(|feed| (OWN_HUB, feed.poll_next(cx, room))),
                Some(at) => held
                    .shards
                    .get_mut(at)
                    .map(|link| (link.id, link.feed.poll_next(cx, room))),
            };
            if let Some((hub, Poll::Ready(fed))) = polled {
                held.turn = at + 1;
                return Poll::Ready((hub, fed));
            }
        }
        Poll::Pending
    })
}

impl Feed {
    fn poll_next(&mut self, cx: &mut Context<'_>, room: bool) -> Poll<Fed> {
        if let Some(cut) = &mut self.cut {
            match Pin::new(cut).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Fed::CutOff),
                Poll::Ready(Err(_)) => self.cut = None,
                Poll::Pending => {}
            }
        }
        if !room {
            return Poll::Pending;
        }
        self.rx.poll_recv(cx).map(|frame| match frame {
            Some(frame) => {
                self.queued.refund(frame.len());
                Fed::Frame(frame)
            }
            None => Fed::Ended,
        })
    }
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

impl Subscriptions {
    /// Whether a hub feeds the client: a session with a feed cannot park.
    pub(super) fn feeding(&self) -> bool {
        self.inbox.is_some() || self.held.as_ref().is_some_and(|h| !h.shards.is_empty())
    }

    /// Whether the client is known to any hub.
    pub(super) fn has_hub(&self) -> bool {
        self.hub.is_some() || self.held.as_ref().is_some_and(|h| !h.shards.is_empty())
    }

    /// Every feed of the client's hubs.
    pub(super) fn feeds(&self) -> impl Iterator<Item = &Feed> {
        let shards = self.held.iter().flat_map(|held| &held.shards);
        self.inbox.iter().chain(shards.map(|link| &link.feed))
    }

    /// Every hub the client is known to; leaves the client with none.
    fn take_hubs(&mut self) -> Vec<pubsub::PubSub> {
        let shards = self.held.as_mut().map(|h| std::mem::take(&mut h.shards));
        let shards = shards.into_iter().flatten().map(|link| link.hub);
        self.hub.take().into_iter().chain(shards).collect()
    }

    /// The hub numbered `id` (see [`Open::hub`]).
    fn hub_of(&self, id: u32) -> Option<pubsub::PubSub> {
        if id == OWN_HUB {
            return self.hub.clone();
        }
        let held = self.held.as_ref()?;
        let link = held.shards.iter().find(|link| link.id == id)?;
        Some(link.hub.clone())
    }

    /// The number of the hub that holds shard channel `name` (the client's own hub without a
    /// cluster), forgetting it.
    fn take_shard_of(&mut self, name: &[u8]) -> u32 {
        let held = self.held.as_mut();
        held.and_then(|held| held.shard_of.remove(name))
            .unwrap_or(OWN_HUB)
    }
}

impl State {
    /// (P|S)SUBSCRIBE: a confirmation per name with this client's count, sent when the hub
    /// answers (see [`State::open_slot`]). Push output: CLIENT REPLY OFF does not silence it.
    /// On a hub logged in as the client's own user, Redis may refuse it (-NOPERM), and on a
    /// shard hub too (-MOVED): nothing after it runs before the answer is in, so that no count
    /// assumes it succeeded.
    ///
    /// Constant work per name, and a long list gives the runtime back its thread now and then:
    /// one request may name a million channels, and other clients must not wait for it.
    pub(super) async fn subscribe(&mut self, kind: command::Namespace, names: Vec<Bytes>) {
        let node = match self.shard_node(kind, &names) {
            Ok(node) => node,
            Err(error) => {
                self.owe();
                return self.pending.push_back(Pending::Local {
                    bytes: error,
                    count: 1,
                });
            }
        };
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
        let new: Vec<Bytes> = added.iter().map(|(name, _)| name.clone()).collect();
        // Redis may refuse it: -NOPERM to a client's own login, -MOVED to a shard channel
        // whose slot has just moved.
        let refusable = self.client.identity().is_some() || node.is_some();
        let (id, hub, inbox) = match node {
            Some(node) => self.shard_link(node, &new),
            None => self.own_hub(),
        };
        hub.subscribe(self.client.id, kind, new, inbox).await;
        self.open_slot(confirmation, kind, added, id, 1, Awaits::Answer);
        if refusable {
            self.sync = true;
        }
    }

    /// The client's own hub, with an inbox for it when the client has no feed from it.
    fn own_hub(&mut self) -> (u32, pubsub::PubSub, Option<pubsub::Inbox>) {
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
        (OWN_HUB, hub, inbox)
    }

    /// The shard hub of master `node` for shard channels `names`, with an inbox for it when
    /// the client has none from it yet.
    fn shard_link(
        &mut self,
        node: (String, u16),
        names: &[Bytes],
    ) -> (u32, pubsub::PubSub, Option<pubsub::Inbox>) {
        let limit = self.config.output_limit();
        let identity = self.client.identity();
        let hubs = self.client.hubs().clone();
        let held = self.subs.held();
        let (id, hub, inbox) = match held.shards.iter().find(|link| link.node == node) {
            Some(link) => (link.id, link.hub.clone(), None),
            None => {
                held.next_shard += 1;
                let id = held.next_shard;
                let hub = hubs.shard(identity.as_ref(), &node.0, node.1);
                let (feed, inbox) = Feed::new(limit);
                let link = ShardLink {
                    id,
                    node,
                    hub: hub.clone(),
                    feed,
                };
                held.shards.push(link);
                (id, hub, Some(inbox))
            }
        };
        for name in names {
            held.shard_of.insert(name.clone(), id);
        }
        (id, hub, inbox)
    }

    /// In front of a cluster, the master whose shard hub takes a SSUBSCRIBE or SUNSUBSCRIBE
    /// of `names`: that of their slot now (`None` for other kinds, without a cluster, or for
    /// no names). Names that span slots get Redis Cluster's `-CROSSSLOT`; a slot no master
    /// serves, its `-CLUSTERDOWN`.
    fn shard_node(
        &self,
        kind: command::Namespace,
        names: &[Bytes],
    ) -> Result<Option<(String, u16)>, Bytes> {
        let upstreams = self.client.upstreams();
        if kind != command::Namespace::Shard || !upstreams.is_cluster() {
            return Ok(None);
        }
        let slot = match slot_of(names.iter().map(|name| &name[..])) {
            SlotOf::None => return Ok(None),
            SlotOf::Cross => return Err(Bytes::from_static(CROSSSLOT)),
            SlotOf::One(slot) => slot,
        };
        match upstreams.master_of(slot) {
            Some(node) => Ok(Some(node)),
            None => Err(Bytes::from_static(CLUSTERDOWN)),
        }
    }

    /// (P|S)UNSUBSCRIBE: a frame per name (every subscription of the kind when none is given,
    /// in subscription order, or one with a null name when there is none). Constant work per
    /// name, as for [`State::subscribe`]. When the client held any of them, the frames go
    /// once the hub has unsubscribed upstream what nobody else wants: a request of the client
    /// on another path waits for them (see [`Path`]), and so finds Redis's counts without the
    /// subscriptions it dropped. In front of a cluster a client's shard channels may be on
    /// several shard hubs: the frames go in a run per hub, each once its hub has answered.
    pub(super) async fn unsubscribe(&mut self, kind: command::Namespace, names: Vec<Bytes>) {
        if let Err(error) = self.shard_node(kind, &names) {
            self.owe();
            return self.pending.push_back(Pending::Local {
                bytes: error,
                count: 1,
            });
        }
        let verb = kind.command(false);
        let shard = kind == command::Namespace::Shard;
        let mut runs = HubRuns::default();
        if names.is_empty() {
            let mut removed: Vec<(u32, Bytes)> = self
                .subs
                .names(kind)
                .take_in_order()
                .into_iter()
                .map(|name| (OWN_HUB, name))
                .collect();
            if shard {
                for (hub, name) in &mut removed {
                    *hub = self.subs.take_shard_of(name);
                }
                // Redis answers in no set order: a run per hub.
                removed.sort_by_key(|(hub, _)| *hub);
            }
            // The count as each one goes: the others of the kind are still there.
            let left = self.subs.count(kind);
            let total = removed.len();
            for (i, (hub, name)) in removed.into_iter().enumerate() {
                let count = left + total - 1 - i;
                let frame = runs.frame(Some(hub));
                self.push_frame(frame, verb, Some(&name), count);
                runs.removed(name);
                tokio::task::coop::consume_budget().await;
            }
            if total == 0 {
                self.push_frame(runs.frame(None), verb, None, left);
            }
        }
        for name in &names {
            let removed = self.subs.names(kind).remove(name);
            let hub = match (&removed, shard) {
                (Some(name), true) => Some(self.subs.take_shard_of(name)),
                (Some(_), false) => Some(OWN_HUB),
                (None, _) => None,
            };
            let count = self.subs.count(kind);
            self.push_frame(runs.frame(hub), verb, Some(name), count);
            if let Some(name) = removed {
                runs.removed(name);
            }
            tokio::task::coop::consume_budget().await;
        }
        self.owe();
        for (i, run) in runs.done().into_iter().enumerate() {
            // The later runs complete the same reply: slots of no reply count of their own.
            self.unsubscribe_run(kind, run, u32::from(i == 0)).await;
        }
    }

    /// One hub's run of an UNSUBSCRIBE's frames, in a reply slot of `count` replies: sent when
    /// that hub has answered, at once if the client held none of its names.
    async fn unsubscribe_run(&mut self, kind: command::Namespace, run: HubRun, count: u32) {
        let hub = run.hub.and_then(|id| Some((id, self.subs.hub_of(id)?)));
        match hub {
            Some((id, hub)) if !run.removed.is_empty() => {
                hub.unsubscribe(self.client.id, kind, run.removed).await;
                self.open_slot(
                    Bytes::from(run.frames),
                    kind,
                    Vec::new(),
                    id,
                    count,
                    Awaits::Answer,
                );
            }
            _ => self.pending.push_back(Pending::Local {
                bytes: Bytes::from(run.frames),
                count,
            }),
        }
    }

    /// A reply slot the hub's answer completes: `frames` if it did what was asked, its error
    /// if Redis refused (then the names in `added` are taken back), after the messages Redis
    /// sent before its answer; or, for a synced PUBLISH ([`Awaits::Reply`]), the PUBLISH's
    /// reply once the hub has answered its PING.
    fn open_slot(
        &mut self,
        frames: Bytes,
        kind: command::Namespace,
        added: Vec<(Bytes, u64)>,
        hub: u32,
        count: u32,
        awaits: Awaits,
    ) {
        let (reply, rx) = oneshot::channel();
        self.subs.held().open.push_back(Open {
            hub,
            reply,
            before: Vec::new(),
            frames,
            kind,
            added,
            awaits,
        });
        self.last_path = Some(Path::PubSub);
        self.unresolved += 1;
        self.pending.push_back(Pending::Upstream {
            rx,
            count,
            suppress: false,
            release: None,
            // The session charges what it puts in the reply itself.
            charged: true,
            sent: Instant::now(),
            bytes: 0,
            blocking: false,
            then: None,
        });
    }

    /// A frame from hub `hub`: a message, or the answer to the oldest (un)subscription that
    /// hub has open. A message that comes while one is open is one Redis sent before that
    /// answer, so it goes out ahead of it.
    pub(super) fn fed(&mut self, frame: Bytes, hub: u32) {
        if pubsub::Delivery::of(&frame) != pubsub::Delivery::Message {
            return self.answered(frame, hub);
        }
        let mut args = Args::new(&frame);
        if args.next() == Some(b"sunsubscribe") {
            if let Some(name) = args.next() {
                let name = frame.slice_ref(name);
                self.dropped(name, hub);
            }
            return;
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
        self.push_message(frame, hub);
    }

    /// Puts a frame the client did not ask for in its place: ahead of the oldest answer hub
    /// `hub` owes, which Redis sent after it; else after everything queued, so after the
    /// hub's own answers, which may still wait in the queue behind another hub's.
    fn push_message(&mut self, frame: Bytes, hub: u32) {
        let open = self.subs.held.as_mut().and_then(|held| {
            let at = held.open.iter().position(|open| open.hub == hub)?;
            held.open.get_mut(at)
        });
        let Some(open) = open else {
            return self.push_unasked(frame);
        };
        let len = frame.len();
        open.before.push(frame);
        if !self.budget.charge(len) {
            self.over_limit();
        }
    }

    /// Redis dropped shard channel `name` of hub `hub` on its own: the channel's slot left
    /// the master, or the shard hub lost its connection. The client holds it no more, and
    /// hears it as Redis 7 tells it: a `sunsubscribe` frame with its count.
    fn dropped(&mut self, name: Bytes, hub: u32) {
        let kind = command::Namespace::Shard;
        let held = self.subs.held.as_mut();
        let holds =
            held.is_some_and(|held| held.shard_of.get(&name).copied().unwrap_or(OWN_HUB) == hub);
        if !holds || self.subs.names(kind).remove(&name).is_none() {
            return;
        }
        self.subs.take_shard_of(&name);
        let mut frame = Vec::new();
        let count = self.subs.count(kind);
        self.push_frame(&mut frame, kind.command(false), Some(&name), count);
        self.push_message(Bytes::from(frame), hub);
        self.forget_hubs_if_idle();
    }

    /// Hub `hub` answered the oldest (un)subscription it has open: done (an empty frame), or
    /// refused with Redis's error, which the client gets instead of the confirmations, its
    /// state as if the command never ran.
    pub(super) fn answered(&mut self, answer: Bytes, hub: u32) {
        let Some(held) = self.subs.held.as_mut() else {
            return;
        };
        let Some(at) = held
            .open
            .iter()
            .position(|open| open.hub == hub && open.awaits != Awaits::Reply)
        else {
            return;
        };
        let Some(open) = held.open.remove(at) else {
            return;
        };
        if open.awaits == Awaits::Sync {
            // Redis answers a PING; whatever it said, the messages before it are in.
            return self.finish_slot(open, None);
        }
        let mut refused = (!answer.is_empty()).then_some(answer);
        if let Some(error) = &refused {
            let names = &mut held.kinds[kind_index(open.kind)];
            for (name, at) in &open.added {
                names.remove_added(name, *at);
                if hub != OWN_HUB && !names.contains(name) {
                    held.shard_of.remove(name);
                }
            }
            if let Some(Redirect::Moved { .. } | Redirect::Ask { .. }) = redirect(error) {
                // The shard channel's slot moved before redmux read the map that says so.
                self.client.upstreams().refresh_cluster();
                refused = Some(encode::error(
                    "redmux: the shard channel's slot moved to another master; subscribe again",
                ));
            }
        }
        self.finish_slot(open, refused);
        self.forget_hubs_if_idle();
    }

    /// Nothing held, nothing owed: the hubs forget the client, which may park.
    fn forget_hubs_if_idle(&mut self) {
        if self.subs.active() || self.subs.owed() {
            return;
        }
        for hub in self.subs.take_hubs() {
            hub.forget(self.client.id);
        }
        self.subs = Subscriptions::default();
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
        for hub in std::mem::take(&mut self.subs).take_hubs() {
            hub.leave(self.client.id).await;
        }
    }

    /// RESET drops every subscription. What the hubs have not answered yet is confirmed now,
    /// as Redis would have before the RESET; the client's next request on another path waits
    /// until each hub has unsubscribed upstream what nobody else wants (a reply slot of no
    /// reply of its own).
    pub(super) async fn reset_pubsub(&mut self) {
        let mut subs = std::mem::take(&mut self.subs);
        let hubs = subs.take_hubs();
        for open in subs.held.map(|held| held.open).unwrap_or_default() {
            self.finish_slot(open, None);
        }
        for hub in hubs {
            let rx = hub.reset(self.client.id).await;
            self.await_replies(rx, Path::PubSub, 0, false, None);
        }
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

    /// Forwards a count command; its reply is corrected ([`Then::Count`]). A RESP3
    /// subscriber's PUBLISH to what it hears is answered after the message it caused
    /// ([`Then::Synced`]).
    pub(super) async fn forward_counted(&mut self, count: command::Count, request: Bytes) {
        let argument = count
            .argument_index()
            .and_then(|i| Args::new(&request).nth(i))
            .map(|arg| request.slice_ref(arg));
        let synced = argument
            .as_deref()
            .and_then(|channel| self.hears(count, channel));
        // A reply the client skips (CLIENT REPLY) is not passed on, but its message still
        // comes before the next reply.
        let skipped = !matches!(self.client.reply_mode, super::state::ReplyMode::On);
        let then = match synced {
            Some(_) => Then::Synced(count, argument, skipped),
            None => Then::Count(count, argument),
        };
        let batch = Run {
            frames: request,
            count: 1,
            timeout: Some(self.config.request_timeout),
            then: Some(Box::new(then)),
            ..Run::default()
        };
        self.forward(batch).await;
        if let Some(hub) = synced {
            self.open_sync(hub);
            // The next request waits for the reply: the hub's PING must follow this PUBLISH
            // and come before the next, or its message would go out ahead of this reply.
            self.sync = true;
        }
    }

    /// The hub whose messages a PUBLISH (or SPUBLISH) to `channel` may send this client, which
    /// it must get before the reply: directly, Redis delivers a RESP3 client's messages while
    /// the command runs, ahead of its reply, while a hub's connection and the client's shared
    /// one are two streams. A PUBLISH only in front of one Redis: a cluster carries it to the
    /// hub's node on its own bus, after the reply, so no PING on the hub can tell that the
    /// message is in. A SPUBLISH goes to the master its shard hub is on.
    fn hears(&self, count: command::Count, channel: &[u8]) -> Option<u32> {
        let held = self.subs.held.as_deref()?;
        if !self.client.resp3 {
            return None;
        }
        // The own hub serves channels, patterns, and shard channels without a cluster.
        let own = (self.subs.inbox.is_some()
            && self.subs.hub.is_some()
            && !self.client.upstreams().is_cluster())
        .then_some(OWN_HUB);
        let holds = |kind| held.kinds[kind_index(kind)].contains(channel);
        match count {
            command::Count::Publish
                if holds(command::Namespace::Channel)
                    || held.kinds[kind_index(command::Namespace::Pattern)].len() > 0 =>
            {
                own
            }
            command::Count::SPublish if holds(command::Namespace::Shard) => {
                held.shard_of.get(channel).copied().or(own)
            }
            _ => None,
        }
    }

    /// The handle of hub `hub` ([`Open::hub`]).
    fn hub_handle(&self, hub: u32) -> Option<&pubsub::PubSub> {
        match hub {
            OWN_HUB => self.subs.hub.as_ref(),
            link => self
                .subs
                .held
                .as_deref()?
                .shards
                .iter()
                .find(|shard| shard.id == link)
                .map(|shard| &shard.hub),
        }
    }

    /// The slot a synced PUBLISH's reply goes out in, behind the PUBLISH's own (which yields
    /// nothing): the messages hub `hub` passes on from now until its sync answer go out ahead
    /// of the reply.
    fn open_sync(&mut self, hub: u32) {
        let kind = command::Namespace::Channel;
        // No request of its own (the PUBLISH's slot counts it). The path it names is moot:
        // the client's next request waits for this slot whatever its path.
        self.open_slot(Bytes::new(), kind, Vec::new(), hub, 0, Awaits::Reply);
    }

    /// A synced PUBLISH's reply, corrected: kept in its slot until the hub has passed on every
    /// message Redis sent before it ([`pubsub::PubSub::sync`]). What goes out now, in
    /// the PUBLISH's own place: nothing, or the reply itself if there is nothing to wait for
    /// (an error, a RESET since, a hub that cannot take the request).
    pub(super) fn synced(&mut self, reply: Reply, charged: bool, skipped: bool) -> (Reply, bool) {
        let held = self.subs.held.as_deref_mut();
        let at = held.and_then(|held| {
            held.open
                .iter()
                .position(|open| open.awaits == Awaits::Reply)
        });
        let Some(at) = at else {
            return (reply, charged);
        };
        let replies = match reply {
            Ok(replies) if replies.errors == 0 => replies,
            reply => {
                if let Some(open) = self.subs.held().open.remove(at) {
                    self.finish_slot(open, None);
                }
                return (reply, charged);
            }
        };
        if charged {
            self.budget.refund(replies.bytes.len());
        }
        let reply = match skipped {
            true => Bytes::new(),
            false => replies.bytes,
        };
        let hub = self.subs.held().open.get(at).map(|open| open.hub);
        let asked = hub
            .and_then(|hub| self.hub_handle(hub))
            .is_some_and(|hub| hub.sync(self.client.id));
        let held = self.subs.held();
        match (asked, held.open.get_mut(at)) {
            (true, Some(open)) => {
                open.frames = reply;
                open.awaits = Awaits::Sync;
            }
            (_, _) => {
                if let Some(mut open) = held.open.remove(at) {
                    open.frames = reply;
                    self.finish_slot(open, None);
                }
            }
        }
        (Ok(Replies::from(Bytes::new())), false)
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
