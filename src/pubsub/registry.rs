//! Pub/sub counts as Redis would give them if every client were connected to it directly.
//!
//! Redis counts redmux's hub connections, not the clients behind them: two local subscribers
//! of `ch` and one of the pattern `c*` are, to Redis, one connection subscribed to `ch` and to
//! `c*`, and `PUBLISH ch x` answers 2 where it would answer 3 directly. The registry keeps, per
//! upstream set, what every hub holds in Redis and what its clients hold, so that a count can
//! be corrected: Redis's figure, less the hubs' share, plus the local receivers.
//!
//! Every hub of the set writes to it as subscriptions change, and sessions read it when a
//! count comes back: a small table behind a mutex, one entry per name held anywhere, so it is
//! bounded by the subscriptions that exist. While it is empty no count needs correcting, and
//! PUBLISH stays on the plain forwarding path ([`Registry::active`], one atomic load).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

use bytes::Bytes;

use super::{Key, Kind};

/// Who holds one name: hub connections subscribed to it in Redis, and local clients whose
/// subscription to it is confirmed.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    hubs: u32,
    clients: u32,
}

/// See the module's documentation. One per upstream set, shared by its hubs and sessions.
#[derive(Debug, Default)]
pub struct Registry {
    /// Channels, patterns and shard channels, by [`Kind`].
    tables: Mutex<[HashMap<Bytes, Entry>; 3]>,
    /// Entries in the tables.
    entries: AtomicUsize,
}

fn index(kind: Kind) -> usize {
    match kind {
        Kind::Channel => 0,
        Kind::Pattern => 1,
        Kind::Shard => 2,
    }
}

impl Registry {
    /// Whether any name is held, by a hub or a client: if not, Redis's counts are right.
    pub fn active(&self) -> bool {
        self.entries.load(Ordering::Relaxed) > 0
    }

    /// A hub connection's subscription to `key` was confirmed (`true`) or ended in Redis.
    pub(super) fn hub(&self, key: &Key, added: bool) {
        self.change(key, if added { 1 } else { -1 }, 0);
    }

    /// A client's subscription to `key` was confirmed to it (`true`), or it ended.
    pub(super) fn client(&self, key: &Key, added: bool) {
        self.change(key, 0, if added { 1 } else { -1 });
    }

    fn change(&self, (kind, name): &Key, hubs: i32, clients: i32) {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let table = &mut tables[index(*kind)];
        let entry = match table.get_mut(name) {
            Some(entry) => entry,
            None => {
                self.entries.fetch_add(1, Ordering::Relaxed);
                table.entry(name.clone()).or_default()
            }
        };
        entry.hubs = entry.hubs.saturating_add_signed(hubs);
        entry.clients = entry.clients.saturating_add_signed(clients);
        if entry.hubs == 0 && entry.clients == 0 {
            table.remove(name);
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind, name: &str) -> Key {
        (kind, Bytes::copy_from_slice(name.as_bytes()))
    }

    /// An entry lives while a hub or a client holds its name.
    #[test]
    fn entries_live_while_held() {
        let registry = Registry::default();
        assert!(!registry.active());
        let ch = key(Kind::Channel, "ch");
        registry.hub(&ch, true);
        registry.client(&ch, true);
        registry.client(&ch, true);
        assert!(registry.active());
        registry.hub(&ch, false);
        registry.client(&ch, false);
        assert!(registry.active());
        registry.client(&ch, false);
        assert!(!registry.active());
    }
}
