//! The direct path: a client's one keyed request goes from its session straight to the actor
//! of its slot's master, without a turn through the router's task, when nothing can make it
//! run out of order. That is one task hop less for the commonest request of all, a client
//! that sends one command and waits for its reply.
//!
//! Why order holds:
//!
//! - The session takes the direct path only with nothing of its own outstanding anywhere
//!   (every earlier request answered), so no earlier request of the client can be overtaken;
//!   a later one goes through the router, to the same node while the map is the same, behind
//!   this one.
//! - The router publishes its slot table only while it holds nothing back (no gate, no request
//!   waiting, no `-MOVED` correction, no retry), and withdraws it *before* it changes where a
//!   slot's requests go (a new map, a `-MOVED`, a gate). Publishing and withdrawing take the
//!   table's lock for writing and a direct send holds it for reading from the table lookup to
//!   the send, so a direct request is either in its node's queue before the router's fence
//!   for that node, or routed by the router.
//! - The request goes to the node as a batch the router passed on whole would: the node's
//!   actor answers the client itself unless the reply is an error, and errors, redirects and
//!   lost connections come back to the router on the channel the router's own messages come
//!   back on, in the order the node's actor wrote them, which handles them as for any other
//!   batch.
//!
//! The request goes as [`ReplyTo::Direct`]: the client's reply channel and nothing else. What
//! the router needs to take an error back (its channel, the node) the node's actor was given
//! once, when the router started it ([`Returns`]), instead of a box per request carrying them;
//! the request itself, to send again on `-MOVED`, the actor keeps while it is in flight. A
//! batch stays 96 bytes, as for every other client: with the request and the client's
//! deadline in it (144 bytes) the channel's moves called `memcpy` and took back half of what
//! the box had cost.

use std::sync::{atomic::Ordering, Arc, RwLock};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{Client, Job, NodeAddr, Returned, Routed, Unit};
use crate::{
    cluster::keys::{self, Scope, SlotOf},
    upstream::{
        cluster::{Cluster, Topology},
        Batch, Budget, Reply, ReplyTo,
    },
};

/// A router's slot table for the direct path, or nothing while requests must go through it.
#[derive(Debug)]
pub(crate) struct Direct {
    table: RwLock<Option<Table>>,
    /// Where the requests sent are counted.
    cluster: Arc<Cluster>,
}

/// Where each slot's requests go while the router holds nothing back.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) topology: Arc<Topology>,
    /// The channel of each master of `topology`'s actor.
    pub(super) masters: Vec<Option<mpsc::Sender<Batch>>>,
}

/// What a router's node actor needs to give the router the error of a request the direct
/// path sent it: given to the actor once, when the router starts it.
#[derive(Debug, Clone)]
pub(crate) struct Returns {
    /// Weak: the actor does not keep its router alive.
    pub(super) back: mpsc::WeakUnboundedSender<Returned>,
    pub(super) node: Arc<NodeAddr>,
}

/// Hands the reply to a client's one request that the direct path sent (see
/// [`ReplyTo::Direct`]): called by the node's actor with the reply (or the error that ended
/// it), the client's output `budget`, when the reply is due, the request as written (which
/// the actor kept), and the way back to its router. The client gets a reply that is no
/// error, the router the rest, as it would have from a batch it passed on whole (see
/// [`Routed`]). Once the router has gone, the client gets the error as it is: that client
/// has gone too, since only a router of redmux's own identity has a direct path, and it lives
/// as long as the upstream set that every one of its clients holds.
pub(in crate::upstream) fn deliver(
    sender: oneshot::Sender<Reply>,
    reply: Reply,
    (budget, deadline): (Option<Arc<Budget>>, Option<Instant>),
    frames: Bytes,
    returns: &Returns,
) {
    let clean = matches!(&reply, Ok(replies) if replies.errors == 0);
    let back = (!clean).then(|| returns.back.upgrade()).flatten();
    let client = Client {
        reply: ReplyTo::Sender(sender),
        budget,
        deadline,
    };
    match back {
        Some(back) => Routed {
            back,
            node: returns.node.clone(),
            job: Job::new(0, Unit::Range { start: 0, len: 1 }, frames),
            client: Some(client),
        }
        .deliver(reply),
        None => client.reply.deliver(reply, client.budget.as_deref()),
    }
}

impl Direct {
    /// Sends `batch`, one request, to the master of its slot; gives it back when it must go
    /// through the router.
    pub(crate) fn send(&self, batch: Batch) -> Result<(), Batch> {
        if batch.count != 1 || batch.reply.is_closed() {
            return Err(batch);
        }
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let Some(table) = table.as_ref() else {
            return Err(batch);
        };
        // Keyless requests go through the router, CLUSTER among them (it answers that).
        let (Scope::Keys | Scope::ShardChannels, SlotOf::One(slot)) =
            keys::scope_and_slot(&batch.frames)
        else {
            return Err(batch);
        };
        let Some(sender) = table
            .topology
            .map
            .owner(slot)
            .and_then(|at| table.masters.get(at))
            .and_then(Option::as_ref)
        else {
            return Err(batch);
        };
        let Batch {
            frames,
            count,
            queued_at,
            timeout,
            reply: ReplyTo::Sender(sender_of_client),
            budget,
        } = batch
        else {
            return Err(batch);
        };
        // The node's batch keeps the client's clock and budget; the actor keeps the request
        // while it is in flight: no copy is made here.
        let request = Batch {
            frames,
            count,
            queued_at,
            timeout,
            reply: ReplyTo::Direct(sender_of_client),
            budget,
        };
        sender.try_send(request).map_err(|refused| {
            let request = match refused {
                mpsc::error::TrySendError::Full(request)
                | mpsc::error::TrySendError::Closed(request) => request,
            };
            given_back(request)
        })?;
        self.cluster.direct.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn new(cluster: Arc<Cluster>) -> Direct {
        Direct {
            table: RwLock::new(None),
            cluster,
        }
    }

    /// Publishes `table` (`None`: withdraws it).
    pub(super) fn set(&self, table: Option<Table>) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
    }
}

/// The client's batch again, from the node's batch made of it: its deadline is the client's
/// own.
fn given_back(request: Batch) -> Batch {
    let reply = match request.reply {
        ReplyTo::Direct(sender) => ReplyTo::Sender(sender),
        reply => reply,
    };
    Batch { reply, ..request }
}
