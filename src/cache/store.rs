//! One shard of the near cache: its entries and placeholders, their recency order, and the
//! bytes they cost, kept within the shard's share of `cache.max_memory`.
//!
//! An entry is found two ways: by its identity (db, protocol, and the exact request, or the
//! key of an MGET part), to serve a read; and by its Redis key, to drop every entry of a key
//! that changed, in every database (an invalidation carries no db). Entries live in a slab,
//! linked in recency order (most recent at the head), so a hit moves one entry and eviction
//! takes from the tail without a scan.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use std::time::Instant;

use super::sketch::Sketch;

/// What an entry costs beyond its bytes: the slot, its place in both maps, the allocations'
/// headers. Measured, not guessed: see the memory test in `tests/cache.rs`.
pub(super) const OVERHEAD: usize = 320;

/// The largest reply one shard keeps, as a share of its budget: a few huge values must not
/// empty the cache of everything else.
const MAX_ENTRY_SHARE: usize = 8;

const NIL: u32 = u32::MAX;

/// Which reply an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity<'a> {
    pub db: u32,
    pub resp3: bool,
    /// An element of an MGET reply (`request` is then the key), not a whole reply.
    pub part: bool,
    pub request: &'a [u8],
}

/// A read on its way upstream, whose reply may fill its placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub(super) shard: u32,
    slot: u32,
    id: u64,
}

/// What a shard says of a read.
#[derive(Debug)]
pub(super) enum Found {
    Hit(Bytes),
    /// Not there: read it upstream, and fill the placeholder with the reply.
    Fill(Ticket),
    /// Not there, and not kept (too cold to admit, or too large).
    Miss,
}

#[derive(Debug)]
enum State {
    /// A placeholder: the read went upstream, its reply is not in. An invalidation removes
    /// it, so a reply that may predate the change never fills it.
    Waiting(u64),
    Ready {
        reply: Bytes,
        expires: Instant,
    },
}

#[derive(Debug)]
struct Slot {
    hash: u64,
    db: u32,
    resp3: bool,
    part: bool,
    /// The request (or the key of a part), copied: never a slice of a client's read buffer,
    /// which it would keep alive.
    request: Bytes,
    /// The hash of the Redis key, by which an invalidation finds the entry.
    key_hash: u64,
    state: State,
    cost: usize,
    prev: u32,
    next: u32,
}

impl Slot {
    fn is(&self, identity: &Identity<'_>) -> bool {
        self.db == identity.db
            && self.resp3 == identity.resp3
            && self.part == identity.part
            && self.request[..] == *identity.request
    }
}

/// How entries are chosen to stay (`cache.eviction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The least recently used entry goes.
    Lru,
    /// LRU, but a new entry is let in only if it was asked for more often lately than the
    /// entry it would push out (TinyLFU admission).
    TinyLfu,
}

#[derive(Debug)]
pub(super) struct Shard {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Identity hash → slot.
    index: HashMap<u64, u32>,
    /// (Redis key hash, slot): a key's entries in every db and protocol. By hash, not by
    /// key: two keys with one hash only ever drop each other's entries, which is safe, and no
    /// entry keeps a second copy of its key.
    keys: BTreeSet<(u64, u32)>,
    head: u32,
    tail: u32,
    used: usize,
    budget: usize,
    sketch: Option<Sketch>,
    next_ticket: u64,
    pub(super) max_ttl: Duration,
    pub(super) prefixes: Arc<[Bytes]>,
}

impl Shard {
    pub(super) fn new(budget: usize, policy: Policy) -> Shard {
        let mut shard = Shard {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            keys: BTreeSet::new(),
            head: NIL,
            tail: NIL,
            used: 0,
            budget: 0,
            sketch: None,
            next_ticket: 0,
            max_ttl: Duration::from_secs(60),
            prefixes: Arc::from(Vec::new()),
        };
        shard.configure(budget, policy);
        shard
    }

    /// New limits; entries past the new budget are evicted now.
    pub(super) fn configure(&mut self, budget: usize, policy: Policy) {
        let lfu = policy == Policy::TinyLfu;
        if lfu != self.sketch.is_some() || budget != self.budget {
            // About one counter per entry the budget holds, at a few hundred bytes each.
            self.sketch = lfu.then(|| Sketch::new(budget / OVERHEAD));
        }
        self.budget = budget;
        // Room for every entry the budget can hold, reserved now: grown by doubling, the slab
        // would hold up to twice what it needs, beyond the budget. A reserved vector the cache
        // never fills is never touched, so it costs no resident memory (a hash map's reserve
        // would: it writes its control bytes). If the address space refuses, it grows as it
        // goes instead.
        let most = budget / OVERHEAD;
        let _ = self
            .slots
            .try_reserve(most.saturating_sub(self.slots.len()));
        while self.used > self.budget && self.remove(self.tail) {}
    }

    pub(super) fn used(&self) -> usize {
        self.used
    }

    pub(super) fn entries(&self) -> usize {
        self.index.len()
    }

    /// Whether reads of `key` are cached at all (`cache.prefixes`).
    pub(super) fn wanted(&self, key: &[u8]) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// Looks a read up; on a miss, leaves a placeholder for its reply (unless the entry is
    /// not admitted). `hash` is the identity's, `key_hash` the Redis key's.
    pub(super) fn find(
        &mut self,
        shard: u32,
        (hash, key_hash): (u64, u64),
        identity: &Identity<'_>,
        now: Instant,
    ) -> Found {
        if let Some(sketch) = &mut self.sketch {
            sketch.add(hash);
        }
        if let Some(&at) = self.index.get(&hash) {
            let Some(slot) = self.slot(at) else {
                self.index.remove(&hash);
                return Found::Miss;
            };
            if slot.is(identity) {
                match &slot.state {
                    State::Ready { reply, expires } if *expires > now => {
                        let reply = reply.clone();
                        self.touch(at);
                        return Found::Hit(reply);
                    }
                    State::Waiting(id) => {
                        // Another client's read is on its way: either reply may fill it.
                        return Found::Fill(Ticket {
                            shard,
                            slot: at,
                            id: *id,
                        });
                    }
                    State::Ready { .. } => {}
                }
            }
            // Expired, or another identity with the same hash: it makes way.
            self.remove(at);
        }
        let cost = OVERHEAD + identity.request.len();
        if !self.make_room(cost, hash) {
            return Found::Miss;
        }
        let request = Bytes::copy_from_slice(identity.request);
        self.next_ticket += 1;
        let id = self.next_ticket;
        let at = self.insert(Slot {
            hash,
            db: identity.db,
            resp3: identity.resp3,
            part: identity.part,
            request,
            key_hash,
            state: State::Waiting(id),
            cost,
            prev: NIL,
            next: NIL,
        });
        Found::Fill(Ticket {
            shard,
            slot: at,
            id,
        })
    }

    /// The reply of `ticket`'s read is in: it fills the placeholder if the placeholder is
    /// still there (no invalidation came since the read was sent).
    pub(super) fn fill(
        &mut self,
        ticket: Ticket,
        reply: &[u8],
        now: Instant,
        deadline: Option<Instant>,
    ) {
        let at = ticket.slot;
        let Some(Some(slot)) = self.slots.get_mut(at as usize) else {
            return;
        };
        if !matches!(slot.state, State::Waiting(id) if id == ticket.id) {
            return;
        }
        let expires = deadline.map_or(now + self.max_ttl, |deadline| {
            deadline.min(now + self.max_ttl)
        });
        if reply.len() > self.budget / MAX_ENTRY_SHARE || expires <= now {
            self.remove(at);
            return;
        }
        let added = reply.len();
        let ticket_hash = slot.hash;
        slot.cost += added;
        slot.state = State::Ready {
            // A copy: the reply may be a slice of a large read buffer.
            reply: Bytes::copy_from_slice(reply),
            expires,
        };
        self.used += added;
        // Room is made around it: with TinyLFU only by evicting entries asked for less often
        // lately than it (else it goes itself), and never by evicting it while others remain.
        while self.used > self.budget {
            let victim = if self.tail == at {
                self.slot(at).map_or(NIL, |slot| slot.prev)
            } else {
                self.tail
            };
            if victim == NIL || !self.admits(ticket_hash, victim) || !self.remove(victim) {
                self.remove(at);
                break;
            }
        }
    }

    /// Drops every entry of the key of `key_hash`, in every db and protocol. Returns how many.
    pub(super) fn invalidate(&mut self, key_hash: u64) -> usize {
        let slots: Vec<u32> = self
            .keys
            .range((key_hash, 0)..=(key_hash, u32::MAX))
            .map(|&(_, at)| at)
            .collect();
        for &at in &slots {
            self.remove(at);
        }
        slots.len()
    }

    /// Drops everything.
    pub(super) fn flush(&mut self) {
        self.slots.clear();
        self.free.clear();
        self.index.clear();
        self.keys.clear();
        self.head = NIL;
        self.tail = NIL;
        self.used = 0;
    }

    /// Evicts from the tail until `cost` more bytes fit. With TinyLFU, an entry asked for no
    /// more often than the tail's is refused instead (`false`), and nothing is evicted.
    fn make_room(&mut self, cost: usize, hash: u64) -> bool {
        if cost > self.budget / MAX_ENTRY_SHARE
            || (self.used + cost > self.budget && !self.admits(hash, self.tail))
        {
            return false;
        }
        while self.used + cost > self.budget {
            if !self.remove(self.tail) {
                return false;
            }
        }
        true
    }

    /// Whether an entry of `hash` may push out the one at `victim`: always with LRU; with
    /// TinyLFU only if it was asked for more often lately.
    fn admits(&self, hash: u64, victim: u32) -> bool {
        match (&self.sketch, self.slot(victim)) {
            (Some(sketch), Some(victim)) => sketch.frequency(hash) > sketch.frequency(victim.hash),
            _ => true,
        }
    }

    fn slot(&self, at: u32) -> Option<&Slot> {
        self.slots.get(at as usize)?.as_ref()
    }

    fn slot_mut(&mut self, at: u32) -> Option<&mut Slot> {
        self.slots.get_mut(at as usize)?.as_mut()
    }

    fn insert(&mut self, slot: Slot) -> u32 {
        self.used += slot.cost;
        let (hash, key_hash) = (slot.hash, slot.key_hash);
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = Some(slot);
                at
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(hash, at);
        self.keys.insert((key_hash, at));
        self.link_front(at);
        at
    }

    /// Removes one entry from every structure; `false` if there is none at `at` (`NIL`).
    fn remove(&mut self, at: u32) -> bool {
        if self.slot(at).is_none() {
            return false;
        }
        self.unlink(at);
        let Some(slot) = self.slots.get_mut(at as usize).and_then(Option::take) else {
            return false;
        };
        self.keys.remove(&(slot.key_hash, at));
        if self.index.get(&slot.hash) == Some(&at) {
            self.index.remove(&slot.hash);
        }
        self.used -= slot.cost;
        self.free.push(at);
        true
    }

    fn touch(&mut self, at: u32) {
        if self.head != at {
            self.unlink(at);
            self.link_front(at);
        }
    }

    fn link_front(&mut self, at: u32) {
        let head = self.head;
        let Some(slot) = self.slot_mut(at) else {
            return;
        };
        slot.prev = NIL;
        slot.next = head;
        match self.slot_mut(head) {
            Some(old) => old.prev = at,
            None => self.tail = at,
        }
        self.head = at;
    }

    fn unlink(&mut self, at: u32) {
        let Some((prev, next)) = self.slot(at).map(|slot| (slot.prev, slot.next)) else {
            return;
        };
        match self.slot_mut(prev) {
            Some(before) => before.next = next,
            None => self.head = next,
        }
        match self.slot_mut(next) {
            Some(after) => after.prev = prev,
            None => self.tail = prev,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(request: &[u8]) -> Identity<'_> {
        Identity {
            db: 0,
            resp3: false,
            part: false,
            request,
        }
    }

    /// The request is its own key, here.
    fn find(shard: &mut Shard, request: &[u8], now: Instant) -> Found {
        let hash = crc(request);
        shard.find(0, (hash, hash), &id(request), now)
    }

    fn crc(bytes: &[u8]) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(bytes)
    }

    #[test]
    fn a_placeholder_is_filled_unless_invalidated_first() {
        let now = Instant::now();
        let mut shard = Shard::new(1 << 20, Policy::Lru);
        let Found::Fill(ticket) = find(&mut shard, b"k", now) else {
            panic!("miss expected")
        };
        shard.fill(ticket, b"$1\r\nv\r\n", now, None);
        assert!(matches!(find(&mut shard, b"k", now), Found::Hit(r) if &r[..] == b"$1\r\nv\r\n"));
        assert_eq!(shard.invalidate(crc(b"k")), 1);
        let Found::Fill(ticket) = find(&mut shard, b"k", now) else {
            panic!("miss expected")
        };
        // The key changes while the read is upstream: its reply is not kept.
        shard.invalidate(crc(b"k"));
        shard.fill(ticket, b"$3\r\nold\r\n", now, None);
        let Found::Fill(again) = find(&mut shard, b"k", now) else {
            panic!("miss expected")
        };
        assert_ne!(again, ticket);
        // A stale ticket cannot fill the new placeholder either.
        shard.fill(ticket, b"$3\r\nold\r\n", now, None);
        assert!(matches!(find(&mut shard, b"k", now), Found::Fill(t) if t == again));
        assert_eq!(shard.entries(), 1);
    }

    #[test]
    fn entries_expire_after_max_ttl() {
        let now = Instant::now();
        let mut shard = Shard::new(1 << 20, Policy::Lru);
        shard.max_ttl = Duration::from_secs(1);
        let Found::Fill(ticket) = find(&mut shard, b"k", now) else {
            panic!()
        };
        shard.fill(ticket, b"+x\r\n", now, None);
        assert!(matches!(find(&mut shard, b"k", now), Found::Hit(_)));
        let later = now + Duration::from_secs(2);
        assert!(matches!(find(&mut shard, b"k", later), Found::Fill(_)));
        assert_eq!(shard.entries(), 1);
    }

    #[test]
    fn entries_expire_with_their_key() {
        let now = Instant::now();
        let mut shard = Shard::new(1 << 20, Policy::Lru);
        let Found::Fill(ticket) = find(&mut shard, b"k", now) else {
            panic!()
        };
        // The key expires in Redis in 1 s, well before max_ttl (60 s).
        shard.fill(ticket, b"+x\r\n", now, Some(now + Duration::from_secs(1)));
        assert!(matches!(find(&mut shard, b"k", now), Found::Hit(_)));
        let later = now + Duration::from_millis(1001);
        assert!(matches!(find(&mut shard, b"k", later), Found::Fill(_)));
        // A key already gone by the time its reply is in is not kept.
        let Found::Fill(ticket) = find(&mut shard, b"j", now) else {
            panic!()
        };
        shard.fill(ticket, b"+x\r\n", now, Some(now));
        assert!(matches!(find(&mut shard, b"j", now), Found::Fill(_)));
    }

    #[test]
    fn memory_stays_within_the_budget() {
        let now = Instant::now();
        let budget = 64 * 1024;
        let mut shard = Shard::new(budget, Policy::Lru);
        let value = vec![b'x'; 1000];
        for i in 0..10_000u32 {
            let request = format!("key:{i}");
            if let Found::Fill(ticket) = find(&mut shard, request.as_bytes(), now) {
                shard.fill(ticket, &value, now, None);
            }
            assert!(shard.used() <= budget);
        }
        assert!(shard.entries() > 30, "{}", shard.entries());
        // Accounting matches the entries left: dropping them all leaves nothing.
        let keys: Vec<u64> = shard.keys.iter().map(|&(key, _)| key).collect();
        for key in keys {
            shard.invalidate(key);
        }
        assert_eq!((shard.used(), shard.entries()), (0, 0));
        // Too large for one shard: not kept.
        let Found::Fill(ticket) = find(&mut shard, b"big", now) else {
            panic!()
        };
        shard.fill(ticket, &vec![0; budget / 4], now, None);
        assert_eq!(shard.entries(), 0);
    }

    #[test]
    fn lru_keeps_the_recently_used() {
        let now = Instant::now();
        let mut shard = Shard::new(40 * (OVERHEAD + 16), Policy::Lru);
        let fill = |shard: &mut Shard, request: &[u8]| {
            if let Found::Fill(ticket) = find(shard, request, now) {
                shard.fill(ticket, b"+v\r\n", now, None);
            }
        };
        fill(&mut shard, b"hot");
        for i in 0..200 {
            fill(&mut shard, format!("cold:{i}").as_bytes());
            assert!(matches!(find(&mut shard, b"hot", now), Found::Hit(_)));
        }
    }

    #[test]
    fn tinylfu_refuses_a_cold_key_over_a_hot_one() {
        let now = Instant::now();
        let mut shard = Shard::new(32 * (OVERHEAD + 16), Policy::TinyLfu);
        for _ in 0..10 {
            for key in [&b"a"[..], b"b", b"c"] {
                if let Found::Fill(ticket) = find(&mut shard, key, now) {
                    shard.fill(ticket, b"+v\r\n", now, None);
                }
            }
        }
        // A one-off read of a new key does not push a popular one out.
        for i in 0..50 {
            let request = format!("scan:{i}");
            if let Found::Fill(ticket) = find(&mut shard, request.as_bytes(), now) {
                shard.fill(ticket, b"+v\r\n", now, None);
            }
        }
        for key in [&b"a"[..], b"b", b"c"] {
            assert!(matches!(find(&mut shard, key, now), Found::Hit(_)));
        }
    }
}
