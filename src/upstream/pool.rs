//! Pinned connections: an upstream connection of one client's own, for a transaction or a
//! blocking command, taken from a bounded pool and cleaned (RESET, AUTH) before reuse.
//!
//! `max_pinned` slots; a slot is free, idle (a clean connection waiting) or leased. The
//! semaphore counts the slots not leased, so leased plus idle connections never exceed the
//! limit, and a client waiting for a slot wakes whenever one is released or abandoned.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use tokio::{
    sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::{
    actor::{ConnectionId, Role},
    call,
    connect::{self, Expect, Setup, Step},
    Batch, Target, UpstreamError, Upstreams,
};
use crate::resp::encode_command;

/// Requests a pinned connection's channel holds: one client's pipeline at most.
pub(super) const CHANNEL_CAPACITY: usize = 64;
/// Actor ids for pinned connections start here, to tell them from shared ones in logs.
const FIRST_PINNED_ID: usize = 10_000;

#[derive(Debug)]
pub(super) struct Pool {
    /// Clean connections (db 0, RESP2, logged in), most recently used last.
    idle: Mutex<Vec<(mpsc::Sender<Batch>, ConnectionId)>>,
    /// Slots not leased.
    slots: Arc<Semaphore>,
    /// `max_pinned`: the slots there are.
    max: usize,
    /// Released connections being cleaned right now: worth waiting for rather than opening a
    /// new connection.
    cleaning: AtomicUsize,
    /// Signalled when a cleaning ends (the connection is idle, or closed).
    cleaned: Notify,
    next_id: AtomicUsize,
}

impl Pool {
    pub(super) fn new(max_pinned: usize) -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_pinned)),
            max: max_pinned,
            cleaning: AtomicUsize::new(0),
            cleaned: Notify::new(),
            next_id: AtomicUsize::new(FIRST_PINNED_ID),
        }
    }

    /// Slots leased now.
    pub(super) fn in_use(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    fn take_idle(&self) -> Option<(mpsc::Sender<Batch>, ConnectionId)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // A connection that died while idle has closed its channel.
        while let Some((sender, id)) = idle.pop() {
            if !sender.is_closed() {
                return Some((sender, id));
            }
        }
        None
    }
}

/// One client's own upstream connection. Dropping a lease (the client left, or RESET) closes
/// the connection at once, which discards an unfinished transaction; [`Lease::release`] cleans
/// it and gives it back.
#[derive(Debug)]
pub struct Lease {
    /// Tells this lease from the ones before it, however often its connection is leased: a
    /// client's requests move to a new lease only once those on its previous path are
    /// answered. (It wraps after 2^32 leases; it is only ever compared with a client's
    /// previous path.)
    id: u32,
    sender: mpsc::Sender<Batch>,
    connection: ConnectionId,
    _slot: OwnedSemaphorePermit,
    upstreams: Upstreams,
}

/// The next lease's id.
static NEXT_LEASE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl Lease {
    fn new(
        (sender, connection): (mpsc::Sender<Batch>, ConnectionId),
        slot: OwnedSemaphorePermit,
        upstreams: &Upstreams,
    ) -> Lease {
        Lease {
            id: NEXT_LEASE.fetch_add(1, Ordering::Relaxed),
            sender,
            connection,
            _slot: slot,
            upstreams: upstreams.clone(),
        }
    }

    /// This lease, told apart from every other.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The id Redis gives the connection, once connected (see [`ConnectionId`]).
    pub fn connection(&self) -> &ConnectionId {
        &self.connection
    }

    /// Where the client's requests go while it holds the lease.
    pub fn sender(&self) -> &mpsc::Sender<Batch> {
        &self.sender
    }

    /// The client is done with it: in the background, RESET it, log in again (RESET logs out)
    /// and put it back in the pool. A connection that does not come back clean is closed.
    pub fn release(self) {
        if self.upstreams.is_cluster() {
            // Its node depends on the keys of its next client: closed, not pooled.
            return;
        }
        let pool = &self.upstreams.inner.pool;
        pool.cleaning.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            self.clean().await;
            let pool = &self.upstreams.inner.pool;
            pool.cleaning.fetch_sub(1, Ordering::AcqRel);
            pool.cleaned.notify_waiters();
            // The slot is given back as the lease drops here, after the connection is idle.
        });
    }

    /// RESET and AUTH; on success the connection joins the idle pool.
    async fn clean(&self) {
        {
            let inner = &self.upstreams.inner;
            let reset = Step {
                name: "RESET",
                request: encode_command([&b"RESET"[..]]),
                expect: Expect::Exact(b"+RESET\r\n"),
            };
            let steps = std::iter::once(reset).chain(connect::auth(&inner.endpoint));
            for step in steps {
                match call(&self.sender, step.request, inner.timeouts.request).await {
                    Ok(reply) if step.expect.accepts(&reply.bytes) => {}
                    _ => return,
                }
            }
            let mut idle = inner.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push((self.sender.clone(), self.connection.clone()));
        }
    }
}

/// One of the `max_pinned` slots, waiting up to `connect_timeout` for one.
pub(super) async fn slot(upstreams: &Upstreams) -> Result<OwnedSemaphorePermit, UpstreamError> {
    slot_by(upstreams, Instant::now() + upstreams.inner.timeouts.connect).await
}

/// One of the `max_pinned` slots, waiting until `deadline` for one.
async fn slot_by(
    upstreams: &Upstreams,
    deadline: Instant,
) -> Result<OwnedSemaphorePermit, UpstreamError> {
    tokio::time::timeout_at(deadline, upstreams.inner.pool.slots.clone().acquire_owned())
        .await
        .map_err(|_| UpstreamError::NoPinned)?
        .map_err(|_| UpstreamError::NoPinned)
}

/// Leases a connection prepared for `target`: an idle one if there is, else a new one, waiting
/// up to `connect_timeout` in all for a free slot and for a connection being cleaned. One
/// deadline for both keeps a client's wait bounded as documented: `connect_timeout` for a
/// connection, then `request_timeout` for the reply.
pub(super) async fn acquire(upstreams: &Upstreams, target: Target) -> Result<Lease, UpstreamError> {
    let inner = &upstreams.inner;
    let deadline = Instant::now() + inner.timeouts.connect;
    let slot = slot_by(upstreams, deadline).await?;
    let idle = loop {
        // Register before looking, so a cleaning that ends in between is not missed.
        let cleaned = inner.pool.cleaned.notified();
        tokio::pin!(cleaned);
        cleaned.as_mut().enable();
        if let Some(idle) = inner.pool.take_idle() {
            break Some(idle);
        }
        if inner.pool.cleaning.load(Ordering::Acquire) == 0 {
            break None;
        }
        if tokio::time::timeout_at(deadline, cleaned).await.is_err() {
            break None;
        }
    };
    let Some((sender, connection)) = idle else {
        let (sender, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let id = inner.pool.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = ConnectionId::default();
        match &inner.cluster {
            Some(cluster) => upstreams.spawn_cluster_pinned(cluster, id, target, rx, &connection),
            None => upstreams.spawn_actor(id, target, Role::Pinned, rx, Some(connection.clone())),
        }
        return Ok(Lease::new((sender, connection), slot, upstreams));
    };
    let setup = Setup {
        db: target.db,
        resp3: target.resp3,
        ping: false,
    };
    // An idle connection is logged in as redmux: a client's own login takes it over.
    let login = target
        .identity
        .as_ref()
        .and_then(|identity| connect::auth(&upstreams.endpoint_for(Some(identity))));
    for step in login.into_iter().chain(connect::select(setup)) {
        match call(&sender, step.request, inner.timeouts.request).await {
            Ok(reply) if step.expect.accepts(&reply.bytes) => {}
            // Dropping the sender closes that connection; the slot goes back with `slot`.
            _ => return Err(UpstreamError::ConnectionLost),
        }
    }
    Ok(Lease::new((sender, connection), slot, upstreams))
}
