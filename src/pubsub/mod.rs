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
//! In front of a Redis Cluster, shard channels live on the master of their slot: each master
//! gets a hub of its own for them (a *shard hub*, see [`Hubs::shard`]). Redis 7 drops a shard
//! channel's subscribers, with an unasked `sunsubscribe`, when the channel's slot leaves the
//! node (`removeChannelsInSlot` in Redis's `cluster.c`); a shard hub passes that on to each
//! client that held it, and does the same for every channel it holds when it loses its
//! connection, since the slots may have moved meanwhile. The client subscribes again, and its
//! session picks the master the slot map names then.
//!
//! One client may name a million channels in one request, so nothing here costs more than
//! constant work per name, and every loop over names, frames or subscribers gives the runtime
//! back its thread now and then (`consume_budget`): the hub shares that thread with every
//! client session.

mod answers;
pub mod glob;
mod hub;
mod hubs;
mod outbox;
pub mod registry;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::Instrument;

pub use hubs::Hubs;
pub use registry::Registry;

use self::{
    hub::Hub,
    outbox::{Outbox, Sent},
};
use crate::{
    command::Namespace,
    io::Budget,
    upstream::{Dial, Reply, Timeouts},
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

/// Where a hub may connect, in order of preference, as things stand when it connects.
pub type Dials = Arc<dyn Fn() -> Vec<Dial> + Send + Sync>;

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
    /// Answer `client` (an empty frame in its inbox, in the order of its other requests) once
    /// every frame Redis sent on the subscriber connection before now has been passed on: a
    /// PING goes upstream and its answer is awaited. A RESP3 subscriber's PUBLISH waits for it,
    /// so that the message its own PUBLISH caused reaches it ahead of the reply, as Redis
    /// sends them on one connection.
    Sync { client: u64 },
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
    /// Each connection goes to the first of `dials` that answers (asked again at each
    /// connection). A shard hub (`shard`) tells its clients when Redis drops their channels
    /// instead of subscribing them again on a new connection.
    pub fn start(
        dials: Dials,
        timeouts: Timeouts,
        ping: bool,
        shard: bool,
        registry: Arc<Registry>,
    ) -> PubSub {
        let (tx, rx) = mpsc::channel(HUB_CAPACITY);
        let (counts_tx, counts) = watch::channel(Counts::default());
        let hub = Hub {
            counts: Counts::default(),
            counts_tx,
            dials,
            timeouts,
            ping,
            shard,
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

    /// Asks for a [`HubRequest::Sync`] answer; `false` if the hub is gone and so will not
    /// answer. A full queue (other clients' subscriptions) is waited on by a task of its own:
    /// the session cannot wait here, and the client sends nothing else meanwhile, so there is
    /// at most one such task per client.
    pub fn sync(&self, client: u64) -> bool {
        match self.tx.try_send(HubRequest::Sync { client }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(request)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(request).await;
                });
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
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

    /// What the hub held when it last changed.
    pub fn counts(&self) -> Counts {
        *self.counts.borrow()
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
