//! The near cache (`[cache]`): replies to hot reads kept in redmux, served without a round
//! trip to Redis, and dropped the moment Redis says their key changed.
//!
//! Correctness rests on four rules, each enforced here or by the caller:
//!
//! 1. **Only while Redis tells us of every change.** The cache serves only while CLIENT
//!    TRACKING's BCAST stream (see `tracking`) is up; when it is lost, or comes back, or Redis
//!    sends a null invalidation, everything is dropped ([`NearCache::set_up`],
//!    [`NearCache::flush`]).
//! 2. **A placeholder before the read goes upstream.** A miss leaves a placeholder with a
//!    ticket; an invalidation of the key removes it, so a reply that left Redis before the
//!    change can never fill it ([`NearCache::fill`]). A read sent after an invalidation came
//!    ran after the change.
//! 3. **Every database.** Invalidations carry no db: a key's entries go in every db and
//!    protocol at once (entries are found by their Redis key as well as by their request).
//! 4. **A client's own writes.** The caller reads around the cache while the client has a
//!    write in flight, and drops the keys it wrote once its replies are in, before the client
//!    can see the acknowledgement ([`NearCache::invalidate`]): a client always reads its own
//!    writes, without waiting for the stream.
//!
//! What the cache serves is in [`reads`]; its memory is held within `cache.max_memory` by
//! [`store`], with LRU or TinyLFU eviction. It is split in shards by key, so serving threads
//! rarely wait on each other.

mod reads;
mod sketch;
mod store;

pub use reads::{read_of, Read};
pub use store::{Policy, Ticket};

use std::{
    hash::{BuildHasher, Hash, Hasher, RandomState},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use self::store::{Found, Identity, Shard};

/// Shards: enough that 16 serving threads rarely meet on one lock.
const SHARDS: usize = 16;

/// What the cache says of a read.
#[derive(Debug)]
pub enum Lookup {
    /// The reply, from the cache.
    Hit(Bytes),
    /// Read it upstream and give the reply to [`NearCache::fill`] with this ticket.
    Fill(Ticket),
    /// Read it upstream; its reply is not kept.
    Pass,
    /// The invalidation stream is not up: read upstream, and have the stream started.
    Down,
}

/// The cache's limits (`[cache]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_memory: usize,
    pub max_ttl: Duration,
    pub prefixes: Vec<Bytes>,
    pub policy: Policy,
}

/// What `/metrics` and `/status` show.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Snapshot {
    /// The invalidation stream is up: the cache serves.
    pub up: bool,
    /// Hits over reads looked up, since the start (0 before any).
    pub hit_rate: f64,
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub flushes: u64,
    pub bytes: u64,
    pub entries: u64,
    pub max_memory: u64,
}

/// The near cache. Cheap to clone: every clone is the same cache.
#[derive(Debug, Clone)]
pub struct NearCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Who made it: the cache holds replies of one set of upstream connections, and a client
    /// on another set (after a reload changed `[upstream]`) must not read them.
    owner: usize,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    up: AtomicBool,
    max_memory: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
}

impl NearCache {
    pub fn new(limits: &Limits, owner: usize) -> NearCache {
        let cache = NearCache {
            inner: Arc::new(Inner {
                owner,
                shards: (0..SHARDS)
                    .map(|_| Mutex::new(Shard::new(0, limits.policy)))
                    .collect(),
                hasher: RandomState::new(),
                up: AtomicBool::new(false),
                max_memory: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                invalidations: AtomicU64::new(0),
                flushes: AtomicU64::new(0),
            }),
        };
        cache.configure(limits);
        cache
    }

    /// The `owner` it was made with.
    pub fn owner(&self) -> usize {
        self.inner.owner
    }

    /// New limits (a reload): entries past a smaller budget are evicted now, and a shorter
    /// `max_ttl` or new prefixes empty the cache.
    pub fn configure(&self, limits: &Limits) {
        let prefixes: Arc<[Bytes]> = Arc::from(limits.prefixes.clone());
        self.inner
            .max_memory
            .store(limits.max_memory as u64, Relaxed);
        for shard in self.inner.shards.iter() {
            let mut shard = lock(shard);
            // Entries of keys no longer wanted would never be read, only take room; entries
            // filled under a longer `max_ttl` would be served past the new one.
            if shard.prefixes != prefixes || limits.max_ttl < shard.max_ttl {
                shard.flush();
                shard.prefixes = prefixes.clone();
            }
            shard.max_ttl = limits.max_ttl;
            shard.configure(limits.max_memory / SHARDS, limits.policy);
        }
    }

    /// The stream is up (every change from now on is told) or down. Either way what is
    /// cached may have missed a change: everything goes.
    pub fn set_up(&self, up: bool) {
        self.inner.up.store(up, Relaxed);
        self.flush();
    }

    /// Looks up the reply to `request` (a read of `key`, a slice of it) by a client in `db`.
    pub fn get(&self, db: u32, resp3: bool, request: &[u8], key: &[u8]) -> Lookup {
        self.find(
            Identity {
                db,
                resp3,
                part: false,
                request,
            },
            key,
        )
    }

    /// Looks up `key`'s element of an MGET reply.
    pub fn get_part(&self, db: u32, resp3: bool, key: &[u8]) -> Lookup {
        self.find(
            Identity {
                db,
                resp3,
                part: true,
                request: key,
            },
            key,
        )
    }

    fn find(&self, identity: Identity<'_>, key: &[u8]) -> Lookup {
        if !self.inner.up.load(Relaxed) {
            return Lookup::Down;
        }
        let key_hash = self.inner.hasher.hash_one(key);
        let (index, shard) = self.shard(key_hash);
        let mut shard = lock(shard);
        if !shard.wanted(key) {
            return Lookup::Pass;
        }
        let hash = self.inner.hasher.hash_one(identity);
        match shard.find(index, (hash, key_hash), &identity, Instant::now()) {
            Found::Hit(reply) => Lookup::Hit(reply),
            Found::Fill(ticket) => Lookup::Fill(ticket),
            Found::Miss => Lookup::Pass,
        }
    }

    /// The reply to a read that left a placeholder: kept if no invalidation of its key came
    /// since, until `max_ttl` or `deadline`, whichever comes first. `deadline` is when the key
    /// may expire in Redis: Redis tells nothing of an expiry until it deletes the key, which
    /// a read served here never makes it do.
    pub fn fill(&self, ticket: Ticket, reply: &[u8], deadline: Option<Instant>) {
        // Errors are not kept: -LOADING, -BUSY and the like say nothing about the key.
        if matches!(reply.first(), Some(b'-' | b'!')) {
            return;
        }
        if let Some(shard) = self.inner.shards.get(ticket.shard as usize) {
            lock(shard).fill(ticket, reply, Instant::now(), deadline);
        }
    }

    /// These keys changed: their entries go, in every db.
    pub fn invalidate<K: AsRef<[u8]>>(&self, keys: &[K]) {
        let mut dropped = 0;
        for key in keys {
            let key_hash = self.inner.hasher.hash_one(key.as_ref());
            dropped += lock(self.shard(key_hash).1).invalidate(key_hash);
        }
        self.inner.invalidations.fetch_add(dropped as u64, Relaxed);
    }

    /// Anything may have changed: everything goes.
    pub fn flush(&self) {
        for shard in self.inner.shards.iter() {
            lock(shard).flush();
        }
        self.inner.flushes.fetch_add(1, Relaxed);
    }

    /// Counts one read served (`hit`) or sent upstream.
    pub fn count(&self, hit: bool) {
        let counter = if hit {
            &self.inner.hits
        } else {
            &self.inner.misses
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let (mut bytes, mut entries) = (0, 0);
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            bytes += shard.used() as u64;
            entries += shard.entries() as u64;
        }
        let hits = self.inner.hits.load(Relaxed);
        let misses = self.inner.misses.load(Relaxed);
        Snapshot {
            up: self.inner.up.load(Relaxed),
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            hits,
            misses,
            invalidations: self.inner.invalidations.load(Relaxed),
            flushes: self.inner.flushes.load(Relaxed),
            bytes,
            entries,
            max_memory: self.inner.max_memory.load(Relaxed),
        }
    }

    fn shard(&self, key_hash: u64) -> (u32, &Mutex<Shard>) {
        let index = (key_hash % SHARDS as u64) as u32;
        (index, &self.inner.shards[index as usize])
    }
}

impl Hash for Identity<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.db.hash(state);
        self.resp3.hash(state);
        self.part.hash(state);
        self.request.hash(state);
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET_K: &[u8] = b"GET k";
    const GET_U: &[u8] = b"GET user:1";

    fn cache() -> NearCache {
        let cache = NearCache::new(
            &Limits {
                max_memory: 1 << 20,
                max_ttl: Duration::from_secs(60),
                prefixes: Vec::new(),
                policy: Policy::TinyLfu,
            },
            0,
        );
        cache.set_up(true);
        cache
    }

    #[test]
    fn an_invalidation_drops_the_key_in_every_db_and_protocol() {
        let cache = cache();
        for (db, resp3) in [(0, false), (1, false), (0, true)] {
            let Lookup::Fill(ticket) = cache.get(db, resp3, GET_K, &GET_K[4..]) else {
                panic!()
            };
            cache.fill(ticket, b"$1\r\nv\r\n", None);
            assert!(matches!(
                cache.get(db, resp3, GET_K, &GET_K[4..]),
                Lookup::Hit(_)
            ));
        }
        let Lookup::Fill(ticket) = cache.get_part(0, false, b"k") else {
            panic!()
        };
        cache.fill(ticket, b"$1\r\nv\r\n", None);
        assert_eq!(cache.snapshot().entries, 4);
        cache.invalidate(&[b"k"]);
        let after = cache.snapshot();
        assert_eq!((after.entries, after.bytes, after.invalidations), (0, 0, 4));
    }

    #[test]
    fn nothing_is_served_while_the_stream_is_down() {
        let cache = cache();
        let Lookup::Fill(ticket) = cache.get(0, false, GET_K, &GET_K[4..]) else {
            panic!()
        };
        cache.set_up(false);
        cache.fill(ticket, b"$1\r\nv\r\n", None);
        assert!(matches!(
            cache.get(0, false, GET_K, &GET_K[4..]),
            Lookup::Down
        ));
        cache.set_up(true);
        assert!(matches!(
            cache.get(0, false, GET_K, &GET_K[4..]),
            Lookup::Fill(_)
        ));
    }

    #[test]
    fn errors_are_not_kept_and_prefixes_choose_keys() {
        let cache = NearCache::new(
            &Limits {
                max_memory: 1 << 20,
                max_ttl: Duration::from_secs(60),
                prefixes: vec![Bytes::from_static(b"user:")],
                policy: Policy::Lru,
            },
            0,
        );
        cache.set_up(true);
        assert!(matches!(
            cache.get(0, false, GET_K, &GET_K[4..]),
            Lookup::Pass
        ));
        let Lookup::Fill(ticket) = cache.get(0, false, GET_U, &GET_U[4..]) else {
            panic!()
        };
        cache.fill(ticket, b"-LOADING Redis is loading\r\n", None);
        assert!(matches!(
            cache.get(0, false, GET_U, &GET_U[4..]),
            Lookup::Fill(_)
        ));
    }

    /// No entry outlives `max_ttl` after it was read: one filled under a longer `max_ttl`
    /// goes when a reload shortens it; a longer one changes nothing already cached.
    #[test]
    fn a_shorter_max_ttl_empties_the_cache_and_a_longer_one_keeps_it() {
        let cache = cache();
        let Lookup::Fill(ticket) = cache.get(0, false, GET_K, &GET_K[4..]) else {
            panic!()
        };
        cache.fill(ticket, b"$1\r\nv\r\n", None);
        let limits = |secs| Limits {
            max_memory: 1 << 20,
            max_ttl: Duration::from_secs(secs),
            prefixes: Vec::new(),
            policy: Policy::TinyLfu,
        };
        cache.configure(&limits(120));
        assert!(matches!(
            cache.get(0, false, GET_K, &GET_K[4..]),
            Lookup::Hit(_)
        ));
        cache.configure(&limits(1));
        assert_eq!(cache.snapshot().entries, 0);
    }

    /// A loop over a few more keys than fit: LRU evicts each key just before it is read again,
    /// TinyLFU keeps most of them (and its sketch is sized for the budget set after `new`).
    #[test]
    fn tinylfu_keeps_a_loop_that_lru_loses() {
        let hits = |policy| {
            let cache = NearCache::new(
                &Limits {
                    max_memory: 16 << 20,
                    max_ttl: Duration::from_secs(60),
                    prefixes: Vec::new(),
                    policy,
                },
                0,
            );
            cache.set_up(true);
            let mut hits = 0;
            for i in 0..150_000u32 {
                let request = format!("GET {:05}", i % 60_000);
                match cache.get(0, false, request.as_bytes(), &request.as_bytes()[4..]) {
                    Lookup::Hit(_) => hits += 1,
                    Lookup::Fill(ticket) => cache.fill(ticket, &[b'v'; 100], None),
                    Lookup::Pass | Lookup::Down => {}
                }
            }
            assert!(cache.snapshot().bytes <= 16 << 20);
            hits
        };
        assert_eq!(hits(Policy::Lru), 0);
        assert!(hits(Policy::TinyLfu) > 20_000, "{}", hits(Policy::TinyLfu));
    }
}
