//! Who must hear of a change to which key: the tracking table of Redis's `src/tracking.c`,
//! kept for redmux's clients. Pure data: the stream feeds it keys, sessions feed it reads and
//! writes, and it answers with who gets which invalidation.

use std::collections::HashMap;

use bytes::Bytes;
use indexmap::IndexMap;

/// How a client tracks keys (the options of `CLIENT TRACKING ON`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Keys the client reads (Redis's default mode, with OPTIN and OPTOUT decided by the
    /// session before it reports a read).
    Reads,
    /// Every key that starts with one of `prefixes` (all keys when empty): Redis's BCAST.
    Broadcast { prefixes: Vec<Bytes> },
}

/// What an invalidation means for the clients: each client's keys.
pub(super) type Deliveries = HashMap<u64, Vec<Bytes>>;

/// A key's readers are pruned of clients that stopped tracking each time their count reaches
/// a power of two from this on: a hot key read by clients that come and go keeps at most
/// twice as many readers as there are tracking clients, at a cost that is constant per read.
const PRUNE_FROM: usize = 16;

/// The tracking table: keys read by clients in the default mode, and the BCAST clients.
#[derive(Debug)]
pub(super) struct Table {
    /// Key → the clients that read it since its last invalidation. An `IndexMap`, so that a
    /// key to evict is found by its index at once: the first key of a `HashMap`'s iterator is
    /// found by a walk over the empty buckets before it, which eviction from the front
    /// lengthens (at 1,000,000 keys, 10 µs a read under the tracker's lock instead of 0.5).
    readers: IndexMap<Bytes, Vec<u64>>,
    clients: HashMap<u64, Mode>,
    /// Like Redis's `tracking-table-max-keys`: past it, a key is evicted and its readers get
    /// its invalidation. 0: no limit.
    max_keys: usize,
    /// Picks the key to evict: a random one, as Redis evicts (xorshift64).
    victim: u64,
}

impl Table {
    pub(super) fn new(max_keys: usize) -> Table {
        Table {
            readers: IndexMap::new(),
            clients: HashMap::new(),
            max_keys,
            victim: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub(super) fn set_max_keys(&mut self, max_keys: usize) {
        self.max_keys = max_keys;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Client `id` tracks in `mode` from now on (replacing any mode it had).
    pub(super) fn enable(&mut self, id: u64, mode: Mode) {
        let mode = match mode {
            Mode::Broadcast { prefixes } => Mode::Broadcast {
                prefixes: disjoint(prefixes),
            },
            Mode::Reads => Mode::Reads,
        };
        self.clients.insert(id, mode);
    }

    /// Client `id` stops tracking. Its reads stay in the table until their keys change:
    /// delivering to a client that no longer tracks is skipped, as Redis skips it.
    pub(super) fn disable(&mut self, id: u64) {
        self.clients.remove(&id);
    }

    /// Client `id` read `keys` (its session decided the read is tracked). Returns the
    /// invalidations that evicting keys to stay within `max_keys` causes.
    pub(super) fn read<'a>(
        &mut self,
        id: u64,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Deliveries {
        let mut evicted = Vec::new();
        for key in keys {
            if let Some(readers) = self.readers.get_mut(key) {
                if !readers.contains(&id) {
                    if readers.len() >= PRUNE_FROM && readers.len().is_power_of_two() {
                        readers.retain(|reader| self.clients.contains_key(reader));
                    }
                    readers.push(id);
                }
                continue;
            }
            if self.max_keys > 0 && self.readers.len() >= self.max_keys {
                self.victim ^= self.victim << 13;
                self.victim ^= self.victim >> 7;
                self.victim ^= self.victim << 17;
                let at = self.victim % self.readers.len() as u64;
                if let Some(evicted_key) = self.readers.swap_remove_index(at as usize) {
                    evicted.push(evicted_key);
                }
            }
            self.readers.insert(Bytes::copy_from_slice(key), vec![id]);
        }
        let mut out = Deliveries::new();
        for (key, readers) in evicted {
            self.deliver_to(&mut out, readers, &key);
        }
        out
    }

    /// Redis says `keys` changed: who must hear of it. Readers are forgotten (they read again
    /// to be tracked again, as in Redis); BCAST clients hear of every key their prefixes
    /// match.
    pub(super) fn invalidate(&mut self, keys: &[Bytes]) -> Deliveries {
        let mut out = Deliveries::new();
        for key in keys {
            if let Some(readers) = self.readers.swap_remove(key) {
                self.deliver_to(&mut out, readers, key);
            }
        }
        for (id, mode) in &self.clients {
            let Mode::Broadcast { prefixes } = mode else {
                continue;
            };
            let matched: Vec<Bytes> = keys
                .iter()
                .filter(|key| matches_any(prefixes, key))
                .cloned()
                .collect();
            if !matched.is_empty() {
                out.entry(*id).or_default().extend(matched);
            }
        }
        out
    }

    /// Everything may have changed (FLUSHALL, or the stream was lost): the table is emptied,
    /// and every tracking client is to get a null invalidation. Returns them.
    pub(super) fn flush(&mut self) -> Vec<u64> {
        self.readers.clear();
        self.clients.keys().copied().collect()
    }

    /// Adds `key` for each of `readers` that still tracks in the default mode.
    fn deliver_to(&self, out: &mut Deliveries, readers: Vec<u64>, key: &Bytes) {
        for id in readers {
            let reads = self
                .clients
                .get(&id)
                .is_some_and(|mode| *mode == Mode::Reads);
            if !reads {
                continue;
            }
            out.entry(id).or_default().push(key.clone());
        }
    }
}

/// Whether `key` starts with one of `prefixes` (any key when there are none), which
/// [`disjoint`] made: the only candidate is the greatest prefix not above the key. A search
/// rather than a walk: a client with 20,000 prefixes made each write of 20,000 keys take
/// seconds, while the clients behind the invalidations waited.
fn matches_any(prefixes: &[Bytes], key: &[u8]) -> bool {
    if prefixes.is_empty() {
        return true;
    }
    let after = prefixes.partition_point(|prefix| prefix.as_ref() <= key);
    after
        .checked_sub(1)
        .and_then(|at| prefixes.get(at))
        .is_some_and(|prefix| key.starts_with(prefix))
}

/// `prefixes` sorted, without those that start with another (which match no key the other
/// does not): a key then starts with at most one of them. A client's prefixes never overlap
/// but for BCAST's empty one, added without a check, as Redis adds it.
fn disjoint(mut prefixes: Vec<Bytes>) -> Vec<Bytes> {
    prefixes.sort();
    let mut kept: Vec<Bytes> = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        if !kept.last().is_some_and(|last| prefix.starts_with(last)) {
            kept.push(prefix);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<Bytes> {
        names
            .iter()
            .map(|n| Bytes::copy_from_slice(n.as_bytes()))
            .collect()
    }

    fn sorted(out: Deliveries) -> Vec<(u64, Vec<Bytes>)> {
        let mut out: Vec<_> = out.into_iter().collect();
        out.sort();
        out
    }

    #[test]
    fn a_reader_hears_once_and_then_reads_again() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads);
        table.enable(2, Mode::Reads);
        table.read(1, [&b"k"[..]]);
        table.read(2, [&b"k"[..], b"j"]);
        let out = sorted(table.invalidate(&keys(&["k", "x"])));
        assert_eq!(out, vec![(1, keys(&["k"])), (2, keys(&["k"]))]);
        assert!(table.invalidate(&keys(&["k"])).is_empty(), "forgotten");
        assert_eq!(
            sorted(table.invalidate(&keys(&["j"]))),
            vec![(2, keys(&["j"]))]
        );
    }

    /// A full table evicts a key per new key read at a cost that stays the same however
    /// many it has evicted: a walk to the first key of a `HashMap` grew with each eviction
    /// from its front. Each read evicts one key, whose reader hears of it.
    #[test]
    fn a_full_table_evicts_at_a_constant_cost() {
        const KEYS: usize = 400_000;
        let evicted = crate::within_a_watchdog("1,200,000 reads past a full table", || {
            let mut table = Table::new(KEYS);
            table.enable(1, Mode::Reads);
            let mut evicted = 0;
            for i in 0..1_200_000u32 {
                let key = i.to_be_bytes();
                evicted += table
                    .read(1, [&key[..]])
                    .values()
                    .map(Vec::len)
                    .sum::<usize>();
            }
            assert_eq!(table.readers.len(), KEYS);
            evicted
        });
        assert_eq!(evicted, 1_200_000 - KEYS);
    }

    #[test]
    fn a_client_that_stopped_tracking_hears_nothing() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads);
        table.read(1, [&b"k"[..]]);
        table.disable(1);
        assert!(table.invalidate(&keys(&["k"])).is_empty());
        assert_eq!(table.readers.len(), 0);
    }

    #[test]
    fn prefixes_match_as_a_walk_over_them_would() {
        let sets: [&[&str]; 5] = [
            &["user:", "order:"],
            &["", "a"],
            &["a", "ab", "b", "ba", "c"],
            &["abc", "abd", "x"],
            &["k"],
        ];
        for set in sets {
            let prefixes = keys(set);
            let made = disjoint(prefixes.clone());
            for key in [
                "", "a", "ab", "abc", "abd1", "abe", "b", "ba", "bz", "c", "user:1", "x", "y",
            ] {
                let walked = prefixes.iter().any(|p| key.as_bytes().starts_with(p));
                assert_eq!(matches_any(&made, key.as_bytes()), walked, "{set:?} {key}");
            }
        }
    }

    /// 100,000 prefixes and a write of 100,000 keys: one search per key, not a walk over
    /// every prefix (which took minutes here). Bounded by a watchdog, generous enough for a
    /// slow debug build, so that the walk fails instead of hanging.
    #[test]
    fn many_prefixes_and_many_keys_cost_a_search_per_key() {
        let prefixes: Vec<Bytes> = (0..100_000)
            .map(|i| Bytes::from(format!("p{i:06}:")))
            .collect();
        let written: Vec<Bytes> = (0..100_000)
            .map(|i| Bytes::from(format!("p{:06}:k", i * 7 % 200_000)))
            .collect();
        let matched = crate::within_a_watchdog("invalidated", move || {
            let mut table = Table::new(0);
            table.enable(1, Mode::Broadcast { prefixes });
            table.invalidate(&written).get(&1).map_or(0, Vec::len)
        });
        let expected = (0..100_000).filter(|i| i * 7 % 200_000 < 100_000).count();
        assert_eq!(matched, expected);
    }

    #[test]
    fn broadcast_matches_prefixes() {
        let mut table = Table::new(0);
        let prefixes = keys(&["user:"]);
        table.enable(
            1,
            Mode::Broadcast {
                prefixes: prefixes.clone(),
            },
        );
        table.enable(2, Mode::Broadcast { prefixes });
        table.enable(
            3,
            Mode::Broadcast {
                prefixes: Vec::new(),
            },
        );
        let out = sorted(table.invalidate(&keys(&["user:1", "other"])));
        assert_eq!(
            out,
            vec![
                (1, keys(&["user:1"])),
                (2, keys(&["user:1"])),
                (3, keys(&["user:1", "other"]))
            ]
        );
    }

    #[test]
    fn the_table_stays_within_max_keys_and_evicted_keys_are_invalidated() {
        let mut table = Table::new(2);
        table.enable(1, Mode::Reads);
        assert!(table.read(1, [&b"a"[..], b"b"]).is_empty());
        let evicted = sorted(table.read(1, [&b"c"[..]]));
        assert_eq!(table.readers.len(), 2);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0, 1);
        let key = &evicted[0].1[0];
        assert!(key == "a" || key == "b", "{key:?}");
    }

    #[test]
    fn readers_that_left_are_pruned_from_a_hot_key() {
        let mut table = Table::new(0);
        for id in 0..10_000 {
            table.enable(id, Mode::Reads);
            table.read(id, [&b"hot"[..]]);
            table.disable(id);
        }
        table.enable(10_000, Mode::Reads);
        table.read(10_000, [&b"hot"[..]]);
        let readers = table.readers[&b"hot"[..]].len();
        assert!(readers <= 2 * PRUNE_FROM, "{readers} readers kept");
        assert_eq!(
            sorted(table.invalidate(&keys(&["hot"]))),
            vec![(10_000, keys(&["hot"]))]
        );
    }

    #[test]
    fn a_flush_empties_the_table_and_names_every_tracking_client() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads);
        table.enable(
            2,
            Mode::Broadcast {
                prefixes: Vec::new(),
            },
        );
        table.read(1, [&b"k"[..]]);
        let mut all = table.flush();
        all.sort();
        assert_eq!(all, vec![1, 2]);
        assert_eq!(table.readers.len(), 0);
    }
}
