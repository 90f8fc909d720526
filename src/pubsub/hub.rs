//! The hub's event loop and its bookkeeping of who wants what: one task per hub, owning the
//! subscriber connection, taking (un)subscriptions from client sessions and sending them
//! upstream in windows.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, oneshot, watch},
    task::coop::consume_budget,
    time::{interval, sleep, Instant, MissedTickBehavior},
};
use tracing::{info, warn};

use super::{
    Answer, Counts, Dials, HubRequest, Inbox, Key, Outbox, Registry, Subscriber, Waiter, SWEEP,
};
use crate::{
    command::Namespace,
    report::Chain,
    resp::ReplyScanner,
    upstream::{self, Reply, Setup, Timeouts, UpstreamError},
};

pub(super) struct Hub {
    pub(super) dials: Dials,
    pub(super) timeouts: Timeouts,
    pub(super) ping: bool,
    /// A shard hub: what Redis drops is dropped for its clients too (see the module's doc).
    pub(super) shard: bool,
    pub(super) rx: mpsc::Receiver<HubRequest>,
    /// Whether there is an upstream connection.
    pub(super) connected: bool,
    /// Who wants each subscription: each client, with the waiter whose answer makes it live
    /// for that client (`None` once live). Messages go to live clients only: a client gets
    /// none for a subscription before its confirmation.
    pub(super) wanted: HashMap<Key, HashMap<u64, Option<u64>>>,
    pub(super) clients: HashMap<u64, Subscriber>,
    /// Subscriptions the upstream has confirmed on the current connection.
    pub(super) active: HashSet<Key>,
    /// What Redis has the connection subscribed to, as its frames say: what the registry
    /// counts for this hub.
    pub(super) upstream: HashSet<Key>,
    /// SUBSCRIBEs queued or sent and not yet answered, per key. Only the confirmation of the
    /// last one counts: an earlier one may be followed by an UNSUBSCRIBE that Redis has still
    /// to run.
    pub(super) in_flight: HashMap<Key, u32>,
    pub(super) waiters: HashMap<u64, Waiter>,
    /// The waiters each key keeps waiting: a confirmation touches only those, not every waiter.
    pub(super) waiting: HashMap<Key, Vec<u64>>,
    pub(super) next_waiter: u64,
    /// Waiters that may be done: answered, in their client's order, before the next frame is
    /// looked at.
    pub(super) ready: Vec<u64>,
    /// Clients cut off while messages were dispatched, with their subscriptions: dropped, and
    /// unsubscribed upstream where nobody else wants them, right after the dispatch.
    pub(super) cut_off: Vec<(u64, HashSet<Key>)>,
    /// When the connection last read something, was made, or was sent subscriptions to
    /// confirm: Redis is stuck if it answers nothing for `request_timeout` after that.
    pub(super) progress: Instant,
    /// (Un)subscriptions for the current connection, sent a window at a time.
    pub(super) outbox: Outbox,
    /// `wanted` and `clients` counted, kept up to date as they change.
    pub(super) counts: Counts,
    pub(super) counts_tx: watch::Sender<Counts>,
    pub(super) registry: Arc<Registry>,
}

/// The upstream connection, while there is one.
pub(super) type Conn = (upstream::Reader, upstream::Writer);

impl Drop for Hub {
    /// Whatever the hub still holds leaves the registry with it.
    fn drop(&mut self) {
        for key in &self.upstream {
            self.registry.hub(key, false);
        }
        for (key, wanted) in &self.wanted {
            for pending in wanted.values() {
                if pending.is_none() {
                    self.registry.client(key, false);
                }
            }
        }
    }
}

/// Reads from the subscriber connection; never ready while there is none.
pub(super) async fn read_some(
    conn: Option<&mut Conn>,
    rbuf: &mut BytesMut,
) -> std::io::Result<usize> {
    match conn {
        Some((reader, _)) => reader.read_buf(rbuf).await,
        None => std::future::pending().await,
    }
}

impl Hub {
    pub(super) async fn run(mut self) {
        let mut conn: Option<Conn> = None;
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let mut scanner = ReplyScanner::new();
        let mut sweep = interval(SWEEP);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            if conn.is_none() && self.connected {
                self.lost().await;
            }
            if conn.is_none() && !self.wanted.is_empty() {
                let setup = Setup {
                    db: 0,
                    resp3: false,
                    ping: self.ping,
                };
                match self.connect(setup).await {
                    Ok((reader, writer)) => {
                        info!("pub/sub connection up");
                        failures = 0;
                        rbuf.clear();
                        scanner.reset();
                        self.connected = true;
                        self.resubscribe().await;
                        conn = Some((reader, writer));
                        self.progress = Instant::now();
                    }
                    Err(error) => {
                        if failures == 0 {
                            warn!(error = %Chain(&error), "cannot open the pub/sub connection; retrying");
                        }
                        failures = failures.saturating_add(1);
                        self.expire_waiters().await;
                        sleep(Duration::from_millis(100).min(self.timeouts.connect)).await;
                        continue;
                    }
                }
            }
            self.flush(&mut conn).await;
            if conn.is_none() && self.connected {
                continue;
            }
            // Not biased towards requests: a steady stream of them must not starve the reads,
            // or Redis would drop the subscriber connection past its own output limit. A
            // message that follows a client's UNSUBSCRIBE here is dropped by its session.
            tokio::select! {
                read = read_some(conn.as_mut(), &mut rbuf) => match read {
                    Ok(n) if n > 0 => {
                        self.progress = Instant::now();
                        if let Err(error) = self.dispatch(&mut rbuf, &mut scanner).await {
                            warn!(error = %Chain(&error), "malformed pub/sub traffic; reconnecting");
                            conn = None;
                        }
                        self.drop_cut_off().await;
                        self.publish_counts();
                    }
                    _ => {
                        warn!("pub/sub connection lost; reconnecting");
                        conn = None;
                    }
                },
                request = self.rx.recv() => {
                    let Some(request) = request else { return };
                    self.handle(request).await;
                    self.drop_cut_off().await;
                    self.publish_counts();
                }
                _ = sweep.tick() => {
                    self.expire_waiters().await;
                    let gone: Vec<u64> = self
                        .clients
                        .iter()
                        .filter(|(_, s)| s.inbox.tx.is_closed())
                        .map(|(id, _)| *id)
                        .collect();
                    for client in gone {
                        self.remove_client(client, None).await;
                    }
                    self.drop_cut_off().await;
                    self.publish_counts();
                }
            }
        }
    }

    /// A connection to the first of the hub's candidates that answers.
    async fn connect(&self, setup: Setup) -> Result<Conn, upstream::ConnectError> {
        let mut failed = None;
        for dial in (self.dials)() {
            match upstream::connect(&dial, setup, self.timeouts.connect).await {
                Ok(conn) => return Ok(conn),
                Err(error) => failed = Some(error),
            }
        }
        Err(failed.unwrap_or(upstream::ConnectError::NoCandidate))
    }

    /// A new connection subscribes to everything wanted now.
    pub(super) async fn resubscribe(&mut self) {
        self.active.clear();
        self.in_flight.clear();
        self.outbox = Outbox::default();
        let mut all: [Vec<Bytes>; 3] = Default::default();
        for (kind, name) in self.wanted.keys() {
            *self.in_flight.entry((*kind, name.clone())).or_default() += 1;
            let i = match kind {
                Namespace::Channel => 0,
                Namespace::Pattern => 1,
                Namespace::Shard => 2,
            };
            all[i].push(name.clone());
            consume_budget().await;
        }
        for (kind, mut names) in [Namespace::Channel, Namespace::Pattern, Namespace::Shard]
            .into_iter()
            .zip(all)
        {
            self.by_slot(kind, &mut names);
            self.outbox.push(kind, true, names, None);
        }
    }

    /// A shard hub's shard channels, in slot order: its outbox sends a command per slot, and
    /// this makes them few.
    fn by_slot(&self, kind: Namespace, names: &mut [Bytes]) {
        if self.shard && kind == Namespace::Shard {
            names.sort_by_cached_key(|name| crate::cluster::slot::slot(name));
        }
    }

    /// The connection is gone, and with it everything it was subscribed to in Redis; requests
    /// sent on it will never be answered. Unsubscriptions are done (nothing is subscribed any
    /// more); subscriptions wait for the next connection.
    pub(super) async fn lost(&mut self) {
        self.connected = false;
        for key in self.upstream.drain() {
            self.registry.hub(&key, false);
            consume_budget().await;
        }
        if self.shard {
            self.drop_everything().await;
        }
        self.active.clear();
        self.in_flight.clear();
        self.outbox = Outbox::default();
        for (id, waiter) in &mut self.waiters {
            waiter.own = 0;
            if waiter.done() {
                self.ready.push(*id);
            }
        }
        self.answer_ready().await;
        self.drop_cut_off().await;
        self.publish_counts();
    }

    /// A shard hub lost its connection: the node may have failed over, or its slots moved, so
    /// nothing is subscribed again here. Subscriptions waiting for Redis fail; every client
    /// hears each channel it held dropped, as Redis tells it when a slot leaves the node.
    pub(super) async fn drop_everything(&mut self) {
        let waiting: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, waiter)| waiter.subscribe && !waiter.done())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.fail(id, UpstreamError::ConnectionLost.replies(1))
                .await;
        }
        let held: Vec<Key> = self.wanted.keys().cloned().collect();
        for key in held {
            self.dropped(key).await;
        }
    }

    /// Takes a client's request; what it means upstream is queued if connected (else the
    /// next connection subscribes to everything wanted then).
    pub(super) async fn handle(&mut self, request: HubRequest) {
        match request {
            HubRequest::Subscribe {
                client,
                kind,
                names,
                inbox,
            } => self.subscribe(client, kind, names, inbox).await,
            HubRequest::Unsubscribe {
                client,
                kind,
                names,
            } => self.unsubscribe(client, kind, names).await,
            HubRequest::Sync { client } => self.sync(client),
            HubRequest::Leave { client, done } => self.remove_client(client, done).await,
        }
        self.answer_ready().await;
    }

    pub(super) async fn subscribe(
        &mut self,
        client: u64,
        kind: Namespace,
        names: Vec<Bytes>,
        inbox: Option<Inbox>,
    ) {
        let entry = match (self.clients.get_mut(&client), inbox) {
            (Some(entry), None) => entry,
            // The session made a new inbox: it dropped the one the hub had.
            (Some(entry), Some(inbox)) => {
                entry.inbox = inbox;
                entry
            }
            (None, Some(inbox)) => self.clients.entry(client).or_insert(Subscriber {
                inbox,
                subscriptions: HashSet::new(),
                queue: VecDeque::new(),
            }),
            // Cut off meanwhile: the session learns it from its inbox.
            (None, None) => return,
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        entry.queue.push_back(id);
        let mut added = Vec::new();
        let mut new = Vec::new();
        // What this request waits for: its own names that are not active yet. Names of
        // earlier requests are waited for by those requests, answered first.
        let mut missing = HashSet::new();
        for name in names {
            let key = (kind, name);
            if !entry.subscriptions.insert(key.clone()) {
                continue;
            }
            let wanted = self.wanted.entry(key.clone()).or_default();
            if wanted.is_empty() {
                *self.counts.of(kind) += 1;
                new.push(key.1.clone());
            }
            wanted.insert(client, Some(id));
            if !self.active.contains(&key) {
                self.waiting.entry(key.clone()).or_default().push(id);
                missing.insert(key.clone());
            }
            added.push(key);
            consume_budget().await;
        }
        let own = u32::from(self.connected && !new.is_empty());
        if own > 0 {
            for name in &new {
                *self.in_flight.entry((kind, name.clone())).or_default() += 1;
                consume_budget().await;
            }
            self.outbox.push(kind, true, new, Some(id));
        }
        self.waiters.insert(
            id,
            Waiter {
                client,
                subscribe: true,
                names: added,
                missing,
                own,
                refused: None,
                answer: Answer::Inbox,
                since: Instant::now(),
            },
        );
        self.ready.push(id);
    }

    pub(super) async fn unsubscribe(&mut self, client: u64, kind: Namespace, names: Vec<Bytes>) {
        let Some(entry) = self.clients.get_mut(&client) else {
            return;
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        entry.queue.push_back(id);
        let mut gone = Vec::new();
        for name in names {
            let key = (kind, name);
            if entry.subscriptions.remove(&key) {
                gone.push(key);
            }
            consume_budget().await;
        }
        let unwanted = self.release(client, gone).await;
        let own = self.push_by_kind(unwanted, false, Some(id));
        self.wait_for_commands(id, client, own);
    }

    /// Waiter `id` of `client`, of no names: done once Redis has answered its `own` commands.
    fn wait_for_commands(&mut self, id: u64, client: u64, own: u32) {
        self.waiters.insert(
            id,
            Waiter {
                client,
                subscribe: false,
                names: Vec::new(),
                missing: HashSet::new(),
                own,
                refused: None,
                answer: Answer::Inbox,
                since: Instant::now(),
            },
        );
        self.ready.push(id);
    }

    /// A [`HubRequest::Sync`]: a waiter of no names, done once Redis has answered a PING sent
    /// behind everything sent so far. With no connection, or none that knows PING (the
    /// embedded store), there is nothing to wait for.
    pub(super) fn sync(&mut self, client: u64) {
        let Some(entry) = self.clients.get_mut(&client) else {
            return;
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        entry.queue.push_back(id);
        let own = match self.connected && self.ping {
            true => {
                self.outbox.push_ping(id);
                1
            }
            false => 0,
        };
        self.wait_for_commands(id, client, own);
    }

    /// Drops a client and everything it held; `done` hears when Redis has unsubscribed what
    /// nobody else wants.
    pub(super) async fn remove_client(
        &mut self,
        client: u64,
        done: Option<oneshot::Sender<Reply>>,
    ) {
        let subscriptions = match self.clients.remove(&client) {
            Some(entry) => {
                // Its unanswered requests: the session that sent them has let them go.
                for id in entry.queue {
                    self.waiters.remove(&id);
                }
                entry.subscriptions
            }
            None => HashSet::new(),
        };
        let unwanted = self
            .release(client, subscriptions.into_iter().collect())
            .await;
        let Some(done) = done else {
            self.push_by_kind(unwanted, false, None);
            return;
        };
        let id = self.next_waiter;
        self.next_waiter += 1;
        let own = self.push_by_kind(unwanted, false, Some(id));
        self.waiters.insert(
            id,
            Waiter {
                client,
                subscribe: false,
                names: Vec::new(),
                missing: HashSet::new(),
                own,
                refused: None,
                answer: Answer::Reset(done),
                since: Instant::now(),
            },
        );
        self.ready.push(id);
    }

    /// Removes the clients cut off by the last dispatch from every subscription they had.
    pub(super) async fn drop_cut_off(&mut self) {
        while !self.cut_off.is_empty() {
            for (client, subscriptions) in std::mem::take(&mut self.cut_off) {
                let unwanted = self
                    .release(client, subscriptions.into_iter().collect())
                    .await;
                self.push_by_kind(unwanted, false, None);
            }
            self.answer_ready().await;
        }
    }

    /// Removes `client` from each subscription in `keys`; returns those nobody wants any more
    /// that Redis has, or may have, subscribed: they are to be unsubscribed upstream.
    pub(super) async fn release(&mut self, client: u64, keys: Vec<Key>) -> Vec<Key> {
        let mut unwanted = Vec::new();
        for key in keys {
            if let Some(key) = self.release_one(client, key) {
                unwanted.push(key);
            }
            consume_budget().await;
        }
        unwanted
    }

    pub(super) fn release_one(&mut self, client: u64, key: Key) -> Option<Key> {
        let wanted = self.wanted.get_mut(&key)?;
        if let Some(None) = wanted.remove(&client) {
            self.registry.client(&key, false);
        }
        if !wanted.is_empty() {
            return None;
        }
        self.wanted.remove(&key);
        let count = self.counts.of(key.0);
        *count = count.saturating_sub(1);
        self.active.remove(&key);
        // A client that subscribed and unsubscribed before the upstream answered gets its
        // confirmation all the same, as from Redis.
        self.satisfy(&key);
        (self.in_flight.contains_key(&key) || self.upstream.contains(&key)).then_some(key)
    }

    /// Queues (un)subscriptions of `keys`, one request per kind; returns how many.
    pub(super) fn push_by_kind(
        &mut self,
        keys: Vec<Key>,
        subscribe: bool,
        origin: Option<u64>,
    ) -> u32 {
        if !self.connected || keys.is_empty() {
            return 0;
        }
        let mut by_kind: [Vec<Bytes>; 3] = Default::default();
        for (kind, name) in keys {
            let i = match kind {
                Namespace::Channel => 0,
                Namespace::Pattern => 1,
                Namespace::Shard => 2,
            };
            if subscribe {
                *self.in_flight.entry((kind, name.clone())).or_default() += 1;
            }
            by_kind[i].push(name);
        }
        let mut pushed = 0;
        for (kind, mut names) in [Namespace::Channel, Namespace::Pattern, Namespace::Shard]
            .into_iter()
            .zip(by_kind)
        {
            self.by_slot(kind, &mut names);
            if !names.is_empty() {
                self.outbox.push(kind, subscribe, names, origin);
                pushed += 1;
            }
        }
        pushed
    }

    /// Sends what the window allows of the outbox. A failed write loses the connection.
    pub(super) async fn flush(&mut self, conn: &mut Option<Conn>) {
        let Some((_, writer)) = conn.as_mut() else {
            return;
        };
        let out = self.outbox.next_commands(self.shard).await;
        if out.is_empty() {
            return;
        }
        let written = async {
            writer.write_all(&out).await?;
            writer.flush().await
        };
        match written.await {
            // Redis has something to answer from now on.
            Ok(()) => self.progress = Instant::now(),
            Err(error) => {
                warn!(error = %Chain(&error), "pub/sub connection lost; reconnecting");
                *conn = None;
            }
        }
    }
}
