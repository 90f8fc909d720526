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
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

use bytes::Bytes;

use super::{glob, Key};
use crate::command::{Count, Namespace};
use crate::resp::encode;

/// Who holds one name: hub connections subscribed to it in Redis, and local clients whose
/// subscription to it is confirmed.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    hubs: u32,
    clients: u32,
}

impl Entry {
    /// What Redis's figure is off by for this name.
    fn skew(self) -> i64 {
        i64::from(self.clients) - i64::from(self.hubs)
    }
}

/// See the module's documentation. One per upstream set, shared by its hubs and sessions.
#[derive(Debug, Default)]
pub struct Registry {
    /// Channels, patterns and shard channels, by [`Namespace`].
    tables: Mutex<[HashMap<Bytes, Entry>; 3]>,
    /// Entries in the tables.
    entries: AtomicUsize,
}

fn index(kind: Namespace) -> usize {
    match kind {
        Namespace::Channel => 0,
        Namespace::Pattern => 1,
        Namespace::Shard => 2,
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

    /// Redis's reply to `count` corrected, `argument` being the one [`Count::argument_index`]
    /// names. `None` if the reply is not the one the command gives when it succeeds (an error,
    /// say): it is passed on as it is.
    pub fn correct(&self, count: Count, argument: Option<&[u8]>, reply: &[u8]) -> Option<Bytes> {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let [channels, patterns, shards] = &*tables;
        match count {
            Count::Publish | Count::SPublish => {
                let n = integer_reply(reply)?;
                let channel = argument?;
                let skew = if count == Count::Publish {
                    // Each pattern that matches counts once per client holding it, as in Redis.
                    let by_pattern: i64 = patterns
                        .iter()
                        .filter(|(_, entry)| entry.skew() != 0)
                        .filter(|(pattern, _)| glob::matches(pattern, channel))
                        .map(|(_, entry)| entry.skew())
                        .sum();
                    skew(channels, channel) + by_pattern
                } else {
                    skew(shards, channel)
                };
                Some(encode::integer((n + skew).max(0)))
            }
            Count::NumSub | Count::ShardNumSub => {
                let table = if count == Count::NumSub {
                    channels
                } else {
                    shards
                };
                let mut items = Items::new(reply)?;
                let mut out = items.header().to_vec();
                for _ in 0..items.len / 2 {
                    let name = items.bulk()?;
                    let n = items.integer()?;
                    encode::put_bulk(&mut out, name);
                    encode::put_integer(&mut out, (n + skew(table, name)).max(0));
                }
                items.end()?;
                Some(Bytes::from(out))
            }
            Count::Channels | Count::ShardChannels => {
                let table = if count == Count::Channels {
                    channels
                } else {
                    shards
                };
                let mut items = Items::new(reply)?;
                let mut listed = HashSet::new();
                for _ in 0..items.len {
                    listed.insert(items.bulk()?);
                }
                items.end()?;
                // Redis lacks a channel only local clients hold while their hub reconnects.
                let missing: Vec<&Bytes> = table
                    .iter()
                    .filter(|(name, entry)| entry.clients > 0 && !listed.contains(&name[..]))
                    .filter(|(name, _)| argument.is_none_or(|pattern| glob::matches(pattern, name)))
                    .map(|(name, _)| name)
                    .collect();
                if missing.is_empty() {
                    return None;
                }
                let mut out = Vec::new();
                encode::put_header(&mut out, b'*', items.len + missing.len());
                out.extend_from_slice(&reply[items.header().len()..]);
                for name in missing {
                    encode::put_bulk(&mut out, name);
                }
                Some(Bytes::from(out))
            }
        }
    }
}

fn skew(table: &HashMap<Bytes, Entry>, name: &[u8]) -> i64 {
    table.get(name).map_or(0, |entry| entry.skew())
}

/// The number in a line `<prefix><digits>\r\n` at the start of `buf`, and the line's length.
fn line(buf: &[u8], prefix: u8) -> Option<(i64, usize)> {
    if buf.first() != Some(&prefix) {
        return None;
    }
    let end = memchr::memchr(b'\r', buf)?;
    if buf.get(end + 1) != Some(&b'\n') {
        return None;
    }
    let n = std::str::from_utf8(&buf[1..end]).ok()?.parse().ok()?;
    Some((n, end + 2))
}

/// The integer of a reply that is exactly one integer.
fn integer_reply(reply: &[u8]) -> Option<i64> {
    let (n, len) = line(reply, b':')?;
    (len == reply.len()).then_some(n)
}

/// A reader over an array reply of bulk strings and integers (what PUBSUB answers).
struct Items<'a> {
    reply: &'a [u8],
    /// Where the next element starts.
    at: usize,
    /// The array's length.
    len: usize,
    /// The header's length.
    header: usize,
}

impl<'a> Items<'a> {
    fn new(reply: &'a [u8]) -> Option<Self> {
        let (len, header) = line(reply, b'*')?;
        Some(Items {
            reply,
            at: header,
            len: usize::try_from(len).ok()?,
            header,
        })
    }

    fn header(&self) -> &'a [u8] {
        &self.reply[..self.header]
    }

    fn bulk(&mut self) -> Option<&'a [u8]> {
        let rest = self.reply.get(self.at..)?;
        let (len, header) = line(rest, b'$')?;
        let len = usize::try_from(len).ok()?;
        let body = rest.get(header..header + len)?;
        if rest.get(header + len..header + len + 2) != Some(&b"\r\n"[..]) {
            return None;
        }
        self.at += header + len + 2;
        Some(body)
    }

    fn integer(&mut self) -> Option<i64> {
        let (n, len) = line(self.reply.get(self.at..)?, b':')?;
        self.at += len;
        Some(n)
    }

    /// Nothing after the last element.
    fn end(&self) -> Option<()> {
        (self.at == self.reply.len()).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Namespace, name: &str) -> Key {
        (kind, Bytes::copy_from_slice(name.as_bytes()))
    }

    fn correct(registry: &Registry, count: Count, arg: Option<&str>, reply: &str) -> String {
        let corrected = registry.correct(count, arg.map(str::as_bytes), reply.as_bytes());
        corrected.map_or(reply.to_owned(), |bytes| {
            String::from_utf8_lossy(&bytes).into_owned()
        })
    }

    /// Two local clients on `ch`, one on `c*`, all on one hub: Redis counts the hub twice.
    #[test]
    fn publish_counts_each_local_receiver() {
        let registry = Registry::default();
        assert!(!registry.active());
        let ch = key(Namespace::Channel, "ch");
        let pattern = key(Namespace::Pattern, "c*");
        registry.hub(&ch, true);
        registry.hub(&pattern, true);
        registry.client(&ch, true);
        registry.client(&ch, true);
        registry.client(&pattern, true);
        assert!(registry.active());
        // Redis: the hub, and one direct subscriber.
        assert_eq!(
            correct(&registry, Count::Publish, Some("ch"), ":3\r\n"),
            ":4\r\n"
        );
        assert_eq!(
            correct(&registry, Count::Publish, Some("cx"), ":1\r\n"),
            ":1\r\n"
        );
        assert_eq!(
            correct(&registry, Count::Publish, Some("zz"), ":0\r\n"),
            ":0\r\n"
        );
        assert_eq!(
            correct(&registry, Count::SPublish, Some("ch"), ":0\r\n"),
            ":0\r\n"
        );
        assert_eq!(
            correct(
                &registry,
                Count::NumSub,
                None,
                "*4\r\n$2\r\nch\r\n:1\r\n$1\r\nx\r\n:0\r\n"
            ),
            "*4\r\n$2\r\nch\r\n:2\r\n$1\r\nx\r\n:0\r\n"
        );
        // Errors and unexpected shapes pass as they are.
        let error = "-ERR wrong number of arguments for 'publish' command\r\n";
        assert_eq!(
            registry.correct(Count::Publish, Some(b"ch"), error.as_bytes()),
            None
        );
        assert_eq!(
            registry.correct(Count::NumSub, None, b"*1\r\n$2\r\nch\r\n"),
            None
        );
        // Everyone leaves: nothing is held.
        registry.client(&ch, false);
        registry.client(&ch, false);
        registry.client(&pattern, false);
        registry.hub(&ch, false);
        registry.hub(&pattern, false);
        assert!(!registry.active());
    }

    /// While a hub reconnects Redis does not list what only its clients hold.
    #[test]
    fn channels_lists_what_local_clients_hold() {
        let registry = Registry::default();
        registry.client(&key(Namespace::Channel, "news"), true);
        registry.client(&key(Namespace::Channel, "other"), true);
        registry.hub(&key(Namespace::Channel, "listed"), true);
        registry.client(&key(Namespace::Channel, "listed"), true);
        assert_eq!(
            correct(&registry, Count::Channels, Some("n*"), "*0\r\n"),
            "*1\r\n$4\r\nnews\r\n"
        );
        assert_eq!(
            correct(
                &registry,
                Count::Channels,
                Some("[l]*"),
                "*1\r\n$6\r\nlisted\r\n"
            ),
            "*1\r\n$6\r\nlisted\r\n"
        );
        assert_eq!(
            correct(&registry, Count::ShardChannels, None, "*0\r\n"),
            "*0\r\n"
        );
    }
}
