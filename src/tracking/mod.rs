//! CLIENT TRACKING for redmux's clients: each client tracks keys as if it had a connection of
//! its own, while its reads travel on connections it shares.
//!
//! How redmux learns of changes: one connection of its own (the *stream*, see `stream`) runs
//! `CLIENT TRACKING ON BCAST` in RESP3, so Redis pushes it every key that changes, whoever
//! changed it, and a null invalidation on FLUSHALL and FLUSHDB. The shared and pinned
//! connections that carry clients' reads are left as they are: nothing about tracking changes
//! a connection another client uses. The [`Table`] says which client hears of which key:
//! readers in the default mode (a session reports each tracked read before the read goes
//! upstream), every BCAST client whose prefixes match. Each client's invalidations go to its
//! [`Sink`], which its session drains behind the replies it already owes, so an invalidation
//! never overtakes the reply of a read that came before it.
//!
//! When the stream is lost, or comes back after a loss, writes may have gone unseen: every
//! tracking client gets a null invalidation ("flush everything"), as Redis gives on FLUSHALL.
//! The stream runs only while some client tracks: Redis's BCAST sends every changed key, a
//! cost paid only when it is used.

mod stream;
mod table;

pub(crate) use table::Mode;

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use tokio::sync::oneshot;

use self::table::{Deliveries, Table};
use crate::{
    cache::{Limits, NearCache},
    upstream::{Dial, Reply, Timeouts, UpstreamError, Upstreams},
};

/// What a tracking client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// These keys changed (or were evicted from the table).
    Keys(Vec<Bytes>),
    /// Anything may have changed: Redis's null invalidation.
    All,
}

/// Most keys, and most bytes of keys, that invalidations waiting for one client merge into:
/// past either, they become one null invalidation ("flush everything"), which is always
/// correct and keeps what waits for a client that does not read bounded.
const MERGED_MAX_KEYS: usize = 1024;
const MERGED_MAX_BYTES: usize = 64 * 1024;

impl Invalidation {
    /// Adds `next` to what waits in `slot`.
    pub fn merge(slot: &mut Option<Invalidation>, next: Invalidation) {
        match slot {
            Some(waiting) => waiting.absorb(next),
            None => *slot = Some(next),
        }
    }

    /// About the bytes it takes, in memory and as a frame: what a client that has it waiting
    /// is charged against its output limit.
    pub fn size(&self) -> usize {
        const FRAME: usize = 32;
        match self {
            Invalidation::Keys(keys) => {
                keys.iter().map(|key| key.len() + FRAME).sum::<usize>() + FRAME
            }
            Invalidation::All => FRAME,
        }
    }

    /// Takes `next` in: the keys of both, or everything.
    pub fn absorb(&mut self, next: Invalidation) {
        match (&mut *self, next) {
            (Invalidation::All, _) => {}
            (_, Invalidation::All) => *self = Invalidation::All,
            (Invalidation::Keys(keys), Invalidation::Keys(more)) => {
                keys.extend(more);
                let bytes: usize = keys.iter().map(Bytes::len).sum();
                if keys.len() > MERGED_MAX_KEYS || bytes > MERGED_MAX_BYTES {
                    *self = Invalidation::All;
                }
            }
        }
    }
}

/// Where a client's invalidations go: its session, woken to deliver them.
pub trait Sink: Send + Sync + Debug {
    fn invalidate(&self, invalidation: Invalidation);
}

/// Why a client cannot track through this upstream.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Unsupported {
    #[error("redmux: CLIENT TRACKING needs a Redis upstream (the embedded store cannot track)")]
    Embedded,
    #[error("redmux: CLIENT TRACKING is not supported in front of a cluster yet")]
    Cluster,
}

/// The tracking of one set of upstream connections. Cheap to clone: every clone is the same.
#[derive(Debug, Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// How the stream reaches Redis; `Err` when this upstream cannot track.
    dial: Result<Dial, Unsupported>,
    timeouts: Timeouts,
    shared: Mutex<Shared>,
}

#[derive(Debug)]
struct Shared {
    table: Table,
    sinks: HashMap<u64, Arc<dyn Sink>>,
    /// The stream's task runs (it ends once no client tracks).
    running: bool,
    /// The stream is up: every write from now on is seen.
    up: bool,
    /// `CLIENT TRACKING ON` replies that wait for the stream to come up, by client.
    waiting: Vec<(u64, oneshot::Sender<Reply>)>,
    /// The near cache, which the stream keeps correct: while there is one, the stream runs
    /// whether or not a client tracks.
    cache: Option<NearCache>,
}

impl Tracker {
    /// The tracker of `upstreams`; its stream starts when a client first tracks. `max_keys`:
    /// see [`Tracker::set_max_keys`].
    pub fn new(upstreams: &Upstreams, max_keys: usize) -> Tracker {
        let dial = if upstreams.is_cluster() {
            Err(Unsupported::Cluster)
        } else if upstreams.profile() != crate::command::Profile::Redis {
            Err(Unsupported::Embedded)
        } else {
            Ok(upstreams.dial_as(None))
        };
        Tracker {
            inner: Arc::new(Inner {
                dial,
                timeouts: upstreams.timeouts(),
                shared: Mutex::new(Shared {
                    table: Table::new(max_keys),
                    sinks: HashMap::new(),
                    running: false,
                    up: false,
                    waiting: Vec::new(),
                    cache: None,
                }),
            }),
        }
    }

    /// Most keys the table remembers (`server.tracking_table_max_keys`); 0: no limit.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.inner.lock().table.set_max_keys(max_keys);
    }

    /// The near cache with these limits (`None`: none). It is the same cache across calls
    /// while one is wanted, with new limits; one no longer wanted stops serving at once. The
    /// stream starts at the first read that finds it down ([`Tracker::wake`]). `None` also
    /// where this upstream cannot track (the configuration refuses that pairing).
    pub fn configure_cache(&self, limits: Option<&Limits>) -> Option<NearCache> {
        let mut shared = self.inner.lock();
        let Some(limits) = limits.filter(|_| self.inner.dial.is_ok()) else {
            if let Some(old) = shared.cache.take() {
                old.set_up(false);
            }
            return None;
        };
        let cache = match &shared.cache {
            Some(cache) => {
                cache.configure(limits);
                cache.clone()
            }
            None => {
                let cache = NearCache::new(limits, self.id());
                cache.set_up(shared.up);
                shared.cache = Some(cache.clone());
                cache
            }
        };
        Some(cache)
    }

    /// Which tracker this is: a near cache made by it carries it as its owner.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// A read found the near cache down: the stream is started if it is not running.
    pub fn wake(&self) {
        let Ok(dial) = &self.inner.dial else {
            return;
        };
        let mut shared = self.inner.lock();
        if !shared.running && shared.cache.is_some() {
            shared.running = true;
            tokio::spawn(stream::run(
                Arc::downgrade(&self.inner),
                dial.clone(),
                self.inner.timeouts,
            ));
        }
    }

    /// Client `id` tracks in `mode` from now on, told through `sink`. `Ok(None)` when the
    /// stream is up (the client may be answered OK now); else the reply to give it once the
    /// stream is up (OK) or could not be opened (an error, and the client no longer tracks).
    /// An error if clients cannot track through this upstream.
    pub fn enable(
        &self,
        id: u64,
        mode: Mode,
        sink: Arc<dyn Sink>,
    ) -> Result<Option<oneshot::Receiver<Reply>>, Unsupported> {
        let dial = self
            .inner
            .dial
            .as_ref()
            .map_err(|unsupported| *unsupported)?;
        let mut shared = self.inner.lock();
        shared.table.enable(id, mode);
        shared.sinks.insert(id, sink);
        if shared.up {
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        shared.waiting.push((id, tx));
        if !shared.running {
            shared.running = true;
            tokio::spawn(stream::run(
                Arc::downgrade(&self.inner),
                dial.clone(),
                self.inner.timeouts,
            ));
        }
        Ok(Some(rx))
    }

    /// Client `id` no longer tracks (CLIENT TRACKING OFF, RESET, or it left).
    pub fn disable(&self, id: u64) {
        let mut shared = self.inner.lock();
        shared.table.disable(id);
        shared.sinks.remove(&id);
    }

    /// Tells client `id` of `invalidation` the way it asked to be told.
    pub fn tell(&self, id: u64, invalidation: Invalidation) {
        if let Some(sink) = self.inner.lock().sinks.get(&id) {
            sink.invalidate(invalidation);
        }
    }

    /// Client `id` is about to read `keys`, and the read is tracked.
    pub fn read<'a>(&self, id: u64, keys: impl IntoIterator<Item = &'a [u8]>) {
        let mut shared = self.inner.lock();
        let evicted = shared.table.read(id, keys);
        shared.deliver(evicted);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Redis says `keys` changed. The cache drops them first: a tracking client that read
    /// one of them from the cache is in the table already, so it hears of the change.
    fn changed(&self, keys: &[Bytes]) {
        let mut shared = self.lock();
        if let Some(cache) = &shared.cache {
            cache.invalidate(keys);
        }
        let deliveries = shared.table.invalidate(keys);
        shared.deliver(deliveries);
    }

    /// Redis says everything may have changed (FLUSHALL, FLUSHDB).
    fn flushed(&self) {
        let mut shared = self.lock();
        if let Some(cache) = &shared.cache {
            cache.flush();
        }
        shared.flush_all(&[]);
    }

    /// The stream is up. The clients waiting for it are answered; the others tracked while it
    /// was down, when writes went unseen, so they get a null invalidation.
    fn up(&self) {
        let mut shared = self.lock();
        shared.up = true;
        if let Some(cache) = &shared.cache {
            cache.set_up(true);
        }
        let waiting = std::mem::take(&mut shared.waiting);
        let answered: Vec<u64> = waiting.iter().map(|(id, _)| *id).collect();
        shared.flush_all(&answered);
        for (_, tx) in waiting {
            let _ = tx.send(Ok(Bytes::from_static(b"+OK\r\n").into()));
        }
    }

    /// The stream is down (lost, or could not be opened): writes go unseen from now on, so
    /// every tracking client gets a null invalidation; clients still waiting for it get an
    /// error and stop tracking.
    fn down(&self) {
        let mut shared = self.lock();
        let was_up = std::mem::replace(&mut shared.up, false);
        if let Some(cache) = &shared.cache {
            cache.set_up(false);
        }
        for (id, tx) in std::mem::take(&mut shared.waiting) {
            shared.table.disable(id);
            shared.sinks.remove(&id);
            let _ = tx.send(Err(UpstreamError::Unavailable));
        }
        if was_up {
            shared.flush_all(&[]);
        }
    }

    /// Whether the stream should stop: nobody tracks, and there is no near cache. Marks it stopped if so, under the same
    /// lock [`Tracker::enable`] takes, so a client that starts tracking meanwhile starts a new
    /// one. The reads of clients gone are forgotten with it.
    fn stop_if_idle(&self) -> bool {
        let mut shared = self.lock();
        if shared.table.is_empty() && shared.waiting.is_empty() && shared.cache.is_none() {
            shared.running = false;
            shared.up = false;
            shared.table.flush();
            true
        } else {
            false
        }
    }
}

impl Shared {
    fn deliver(&self, deliveries: Deliveries) {
        for (id, keys) in deliveries {
            if let Some(sink) = self.sinks.get(&id) {
                sink.invalidate(Invalidation::Keys(keys));
            }
        }
    }

    /// Empties the table and sends a null invalidation to every tracking client but `except`.
    fn flush_all(&mut self, except: &[u64]) {
        for id in self.table.flush() {
            if except.contains(&id) {
                continue;
            }
            if let Some(sink) = self.sinks.get(&id) {
                sink.invalidate(Invalidation::All);
            }
        }
    }
}
