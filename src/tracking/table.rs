//! Who must hear of a change to which key: the tracking table of Redis's `src/tracking.c`,
//! kept for redmux's clients. Pure data: the stream feeds it keys, sessions feed it reads and
//! writes, and it answers with who gets which invalidation.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

/// Most keys a BCAST client with NOLOOP remembers writing, waiting for the invalidation its
/// own write causes. Past it the oldest are forgotten, and the client hears of its own write:
/// an invalidation too many, never one too few.
const OWN_WRITES_MAX: usize = 1024;

/// How a client tracks keys (the options of `CLIENT TRACKING ON`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Keys the client reads (Redis's default mode, with OPTIN and OPTOUT decided by the
    /// session before it reports a read).
    Reads { noloop: bool },
    /// Every key that starts with one of `prefixes` (all keys when empty): Redis's BCAST.
    Broadcast { prefixes: Vec<Bytes>, noloop: bool },
}

#[derive(Debug)]
struct Tracking {
    mode: Mode,
    /// BCAST with NOLOOP: keys the client wrote whose invalidation has not come yet.
    own: HashSet<Bytes>,
}

/// What an invalidation means for the clients: `(client, keys)` in no particular order.
pub(super) type Deliveries = Vec<(u64, Vec<Bytes>)>;

/// The tracking table: keys read by clients in the default mode, and the BCAST clients.
#[derive(Debug)]
pub(super) struct Table {
    /// Key → the clients that read it since its last invalidation.
    readers: HashMap<Bytes, Vec<u64>>,
    clients: HashMap<u64, Tracking>,
    /// Like Redis's `tracking-table-max-keys`: past it, a key is evicted and its readers get
    /// its invalidation. 0: no limit.
    max_keys: usize,
}

impl Table {
    pub(super) fn new(max_keys: usize) -> Table {
        Table {
            readers: HashMap::new(),
            clients: HashMap::new(),
            max_keys,
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
        self.clients.insert(
            id,
            Tracking {
                mode,
                own: HashSet::new(),
            },
        );
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
                    readers.push(id);
                }
                continue;
            }
            if self.max_keys > 0 && self.readers.len() >= self.max_keys {
                if let Some(victim) = self.readers.keys().next().cloned() {
                    if let Some(readers) = self.readers.remove(&victim) {
                        evicted.push((victim, readers));
                    }
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

    /// Client `id` wrote `keys`. With NOLOOP it must not hear of it: in the default mode it
    /// stops tracking those keys (Redis removes them from the table when the write
    /// invalidates them, and skips the writer); in BCAST mode the invalidation is skipped
    /// once when it comes.
    pub(super) fn wrote<'a>(&mut self, id: u64, keys: impl IntoIterator<Item = &'a [u8]>) {
        let Some(tracking) = self.clients.get_mut(&id) else {
            return;
        };
        match &tracking.mode {
            Mode::Reads { noloop: true } => {
                for key in keys {
                    if let Some(readers) = self.readers.get_mut(key) {
                        readers.retain(|reader| *reader != id);
                        if readers.is_empty() {
                            self.readers.remove(key);
                        }
                    }
                }
            }
            Mode::Broadcast {
                noloop: true,
                prefixes,
            } => {
                for key in keys {
                    if matches_any(prefixes, key) {
                        if tracking.own.len() >= OWN_WRITES_MAX {
                            tracking.own.clear();
                        }
                        tracking.own.insert(Bytes::copy_from_slice(key));
                    }
                }
            }
            _ => {}
        }
    }

    /// Redis says `keys` changed: who must hear of it. Readers are forgotten (they read again
    /// to be tracked again, as in Redis); BCAST clients hear of every key their prefixes
    /// match.
    pub(super) fn invalidate(&mut self, keys: &[Bytes]) -> Deliveries {
        let mut out = Deliveries::new();
        for key in keys {
            if let Some(readers) = self.readers.remove(key) {
                self.deliver_to(&mut out, readers, key);
            }
        }
        for (id, tracking) in &mut self.clients {
            let Mode::Broadcast { prefixes, noloop } = &tracking.mode else {
                continue;
            };
            let mut matched = Vec::new();
            for key in keys {
                if matches_any(prefixes, key) && !(*noloop && tracking.own.remove(key)) {
                    matched.push(key.clone());
                }
            }
            if !matched.is_empty() {
                out.push((*id, matched));
            }
        }
        out
    }

    /// Everything may have changed (FLUSHALL, or the stream was lost): the table is emptied,
    /// and every tracking client is to get a null invalidation. Returns them.
    pub(super) fn flush(&mut self) -> Vec<u64> {
        self.readers.clear();
        for tracking in self.clients.values_mut() {
            tracking.own.clear();
        }
        self.clients.keys().copied().collect()
    }

    /// Adds `key` for each of `readers` that still tracks in the default mode.
    fn deliver_to(&self, out: &mut Deliveries, readers: Vec<u64>, key: &Bytes) {
        for id in readers {
            let reads = self
                .clients
                .get(&id)
                .is_some_and(|t| matches!(t.mode, Mode::Reads { .. }));
            if !reads {
                continue;
            }
            match out.iter_mut().find(|(client, _)| *client == id) {
                Some((_, keys)) => keys.push(key.clone()),
                None => out.push((id, vec![key.clone()])),
            }
        }
    }
}

/// Whether `key` starts with one of `prefixes` (every key when there are none).
fn matches_any(prefixes: &[Bytes], key: &[u8]) -> bool {
    prefixes.is_empty() || prefixes.iter().any(|prefix| key.starts_with(prefix))
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

    fn sorted(mut out: Deliveries) -> Deliveries {
        out.sort();
        out
    }

    #[test]
    fn a_reader_hears_once_and_then_reads_again() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads { noloop: false });
        table.enable(2, Mode::Reads { noloop: false });
        table.read(1, [&b"k"[..]]);
        table.read(2, [&b"k"[..], b"j"]);
        let out = sorted(table.invalidate(&keys(&["k", "x"])));
        assert_eq!(out, vec![(1, keys(&["k"])), (2, keys(&["k"]))]);
        assert!(table.invalidate(&keys(&["k"])).is_empty(), "forgotten");
        assert_eq!(table.invalidate(&keys(&["j"])), vec![(2, keys(&["j"]))]);
    }

    #[test]
    fn a_client_that_stopped_tracking_hears_nothing() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads { noloop: false });
        table.read(1, [&b"k"[..]]);
        table.disable(1);
        assert!(table.invalidate(&keys(&["k"])).is_empty());
        assert_eq!(table.readers.len(), 0);
    }

    #[test]
    fn broadcast_matches_prefixes_and_noloop_skips_own_writes() {
        let mut table = Table::new(0);
        let prefixes = keys(&["user:"]);
        table.enable(
            1,
            Mode::Broadcast {
                prefixes: prefixes.clone(),
                noloop: false,
            },
        );
        table.enable(
            2,
            Mode::Broadcast {
                prefixes,
                noloop: true,
            },
        );
        table.enable(
            3,
            Mode::Broadcast {
                prefixes: Vec::new(),
                noloop: false,
            },
        );
        table.wrote(2, [&b"user:1"[..]]);
        let out = sorted(table.invalidate(&keys(&["user:1", "other"])));
        assert_eq!(
            out,
            vec![(1, keys(&["user:1"])), (3, keys(&["user:1", "other"]))]
        );
        let out = sorted(table.invalidate(&keys(&["user:1"])));
        assert_eq!(out.len(), 3, "the own write is skipped once: {out:?}");
    }

    #[test]
    fn noloop_readers_stop_tracking_what_they_write() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads { noloop: true });
        table.enable(2, Mode::Reads { noloop: false });
        table.read(1, [&b"k"[..]]);
        table.read(2, [&b"k"[..]]);
        table.wrote(1, [&b"k"[..]]);
        table.wrote(2, [&b"k"[..]]);
        assert_eq!(table.invalidate(&keys(&["k"])), vec![(2, keys(&["k"]))]);
    }

    #[test]
    fn the_table_stays_within_max_keys_and_evicted_keys_are_invalidated() {
        let mut table = Table::new(2);
        table.enable(1, Mode::Reads { noloop: false });
        assert!(table.read(1, [&b"a"[..], b"b"]).is_empty());
        let evicted = table.read(1, [&b"c"[..]]);
        assert_eq!(table.readers.len(), 2);
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0, 1);
        let key = &evicted[0].1[0];
        assert!(key == "a" || key == "b", "{key:?}");
    }

    #[test]
    fn a_flush_empties_the_table_and_names_every_tracking_client() {
        let mut table = Table::new(0);
        table.enable(1, Mode::Reads { noloop: false });
        table.enable(
            2,
            Mode::Broadcast {
                prefixes: Vec::new(),
                noloop: false,
            },
        );
        table.read(1, [&b"k"[..]]);
        let mut all = table.flush();
        all.sort();
        assert_eq!(all, vec![1, 2]);
        assert_eq!(table.readers.len(), 0);
    }
}
