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
//! - The request goes to the node as a batch the router passed on whole would
//!   ([`ReplyTo::Router`] with the client): the node's actor answers the client itself unless
//!   the reply is an error, and errors, redirects and lost connections come back to the
//!   router, which handles them as for any other batch.

use std::sync::{atomic::Ordering, Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Client, Job, NodeAddr, Returned, Routed, Unit};
use crate::{
    cluster::keys::{self, Scope, SlotOf},
    upstream::{
        cluster::{Cluster, Topology},
        Batch, ReplyTo,
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
    /// The node of each master of `topology`, where its actor runs.
    pub(super) masters: Vec<Option<(Arc<NodeAddr>, mpsc::Sender<Batch>)>>,
    /// Where the node's actor gives errors back: weak, so that the table does not keep the
    /// router alive.
    pub(super) back: mpsc::WeakUnboundedSender<Returned>,
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
        let node = table
            .topology
            .map
            .owner(slot)
            .and_then(|at| table.masters.get(at))
            .and_then(Option::as_ref);
        let (Some((addr, sender)), Some(back)) = (node, table.back.upgrade()) else {
            return Err(batch);
        };
        // The node's batch keeps the client's clock: the same deadline.
        let (queued_at, timeout) = (batch.queued_at, batch.timeout);
        let (frames, count, client) = Client::of(batch);
        let unit = Unit::Range { start: 0, len: 1 };
        // The actor gives the job the requests once it has written them (see
        // `ReplyTo::written`): no copy is made here.
        let routed = Routed {
            back,
            node: addr.clone(),
            job: Job::new(0, unit, Bytes::new()),
            client: Some(client),
        };
        let request = Batch {
            frames,
            count,
            queued_at,
            timeout,
            reply: ReplyTo::Router(Box::new(routed)),
            budget: None,
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
    let (reply, budget) = match request.reply {
        ReplyTo::Router(routed) => match routed.client {
            Some(client) => (client.reply, client.budget),
            None => (ReplyTo::Router(routed), None),
        },
        reply => (reply, None),
    };
    Batch {
        reply,
        budget,
        ..request
    }
}
