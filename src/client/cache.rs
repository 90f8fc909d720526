//! A session's side of the near cache (`crate::cache`): reads answered from it, misses sent
//! upstream with a ticket their reply fills, and the keys the client writes, dropped from
//! the cache once its replies are in, before it can see them.
//!
//! The cache is read only on the plain path: replies on (CLIENT REPLY ON), no MULTI or WATCH,
//! the client logged in as redmux's own user (Redis checks an ACL user's key permissions, and
//! the cache cannot), and no write of the client's own in flight (a client reads its own
//! writes). A hit takes a reply slot like any local reply, so it waits its turn behind the
//! replies the client is owed.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use super::{Pending, Run, State, Then, Tx};
use crate::{
    cache::{read_of, Lookup, NearCache, Read, Ticket},
    cluster::keys::{keys, Scope},
    command::CommandId,
    resp::{encode_command, ReplyScanner},
    upstream::{Replies, Reply},
};

/// Most written keys a session remembers; past it, the whole cache is dropped when the
/// replies are in (a client that writes thousands of keys in one pipeline).
const WRITTEN_MAX_KEYS: usize = 1024;
/// Most PTTL probes one read is sent with (see [`filling`]): at most 5.6 KB of replies.
const MAX_PROBES: usize = 256;

/// The keys of the client's writes whose replies are not all in (`None` in the session
/// when there are none).
#[derive(Debug)]
pub(super) enum Written {
    Keys(Vec<Bytes>),
    /// Anything: FLUSHALL, FLUSHDB, SWAPDB, or too many keys.
    All {
        /// For each FLUSHALL, FLUSHDB and SWAPDB not yet answered, the replies still to come,
        /// its own the last: when its reply is in, the cache is emptied at once, before the
        /// client sees it. A reply owed behind it (a BLPOP) must not hold that back: Redis
        /// 7.0 tells no tracking client of a SWAPDB, so nothing else empties the cache.
        /// One queued in MULTI runs at EXEC, which nothing follows until it is answered
        /// (the EXEC gives its connection back, and the next request waits at the barrier
        /// for the replies of the one before): it is flushed for when every reply is in.
        flushes: Vec<u32>,
    },
}

/// What to do with a read, as the cache says.
pub(super) enum Plan {
    /// Send it upstream as usual.
    Forward,
    /// Answer it with these bytes.
    Hit(Bytes),
    /// Send it upstream on its own, followed by these probes, and fill the cache with its
    /// reply.
    Fill(Filling, Bytes),
}

/// A read the cache missed, sent upstream with a PTTL of each key whose placeholder it may
/// fill. Redis tells of an expiry only when it deletes the key, which reads served from the
/// cache never make it do: so an entry lives no longer than its key's TTL, counted from
/// before the read was sent. A change to the key between the read and its PTTL reaches the
/// placeholder as an invalidation (Redis sends one for an expiry's deletion too).
#[derive(Debug)]
pub(super) struct Filling {
    cache: NearCache,
    /// One per key read: one for a whole reply, one per MGET key; `None` where the key's
    /// reply is not kept (already cached, or not admitted), which gets no probe.
    tickets: Vec<Option<Ticket>>,
    /// An MGET: each element fills its key's placeholder.
    parts: bool,
    asked: Instant,
}

impl Filling {
    /// How many PTTL replies follow the read's.
    pub(super) fn probes(&self) -> u32 {
        self.tickets.iter().flatten().count() as u32
    }
}

impl State {
    /// The near cache this client reads from now, if any: the one of its own upstream
    /// connections, not one a reload made for another Redis.
    ///
    /// Only while nothing is owed from upstream: a hit is looked up when it is parsed, and
    /// must not show an older value than a reply to a request sent before it, which Redis may
    /// run later. (`run_count`: requests parsed and not yet sent.)
    pub(super) fn readable_cache(&self, run_count: u32) -> Option<NearCache> {
        let cache = self.config.cache.as_ref()?;
        let usable = run_count == 0
            && self.unresolved == 0
            && matches!(self.tx, Tx::None)
            && self.written.is_none()
            && self.client.identity().is_none()
            && cache.owner() == self.client.hubs().tracker().id();
        usable.then(|| cache.clone())
    }

    /// What the cache says of `request`, a read by this client.
    pub(super) fn plan(&self, cache: &NearCache, command: CommandId, request: &[u8]) -> Plan {
        let Some(read) = read_of(command, request) else {
            return Plan::Forward;
        };
        let (db, resp3) = (self.client.db, self.client.resp3);
        let plan = match read {
            Read::One(key) => match cache.get(db, resp3, request, key) {
                Lookup::Hit(reply) => Plan::Hit(reply),
                Lookup::Fill(ticket) => filling(cache, vec![Some(ticket)], false, &[key]),
                Lookup::Pass => Plan::Forward,
                Lookup::Down => return self.cache_down(),
            },
            Read::Parts(keys) => {
                // Each key on its own: a hit gives its element, a miss a ticket for its
                // element of the reply, once the whole MGET has gone upstream.
                let mut parts = Vec::with_capacity(keys.len());
                let mut tickets = Vec::with_capacity(keys.len());
                let mut missed = false;
                for &key in &keys {
                    let ticket = match cache.get_part(db, resp3, key) {
                        Lookup::Hit(part) => {
                            parts.push(part);
                            None
                        }
                        Lookup::Fill(ticket) => {
                            missed = true;
                            Some(ticket)
                        }
                        Lookup::Pass => {
                            missed = true;
                            None
                        }
                        Lookup::Down => return self.cache_down(),
                    };
                    tickets.push(ticket);
                }
                if missed {
                    filling(cache, tickets, true, &keys)
                } else {
                    Plan::Hit(array(&parts))
                }
            }
        };
        cache.count(matches!(plan, Plan::Hit(_)));
        plan
    }

    /// Carries out a `plan` other than `Forward` for the request of `len` bytes at
    /// `rbuf[run_len..]`, after the run before it.
    pub(super) async fn take_cached(
        &mut self,
        plan: Plan,
        len: usize,
        run_len: &mut usize,
        run_count: &mut u32,
    ) {
        self.flush_run(run_len, run_count).await;
        match plan {
            Plan::Forward => {}
            Plan::Hit(bytes) => {
                self.rbuf.advance(len);
                self.owe();
                self.pending.push_back(Pending::Local { bytes, count: 1 });
            }
            Plan::Fill(filling, probes) => {
                // On its own, so its reply is the one the tickets wait for.
                let mut frames = BytesMut::with_capacity(len + probes.len());
                frames.put_slice(&self.rbuf[..len]);
                frames.put_slice(&probes);
                self.rbuf.advance(len);
                self.owe();
                let batch = Run {
                    frames: frames.freeze(),
                    count: 1,
                    timeout: Some(self.config.request_timeout),
                    then: Some(Box::new(Then::Fill(filling))),
                    ..Run::default()
                };
                self.send(batch, false).await;
            }
        }
    }

    /// The reply to a read the cache missed, with the PTTL replies of its probes after it:
    /// the placeholders are filled, and the client gets the read's reply alone.
    pub(super) fn filled(
        &mut self,
        filling: Filling,
        replies: Replies,
        charged: bool,
    ) -> (Reply, bool) {
        let Replies { bytes, errors } = replies;
        let mut scanner = ReplyScanner::new();
        let Ok(Some(end)) = scanner.next_reply(&bytes) else {
            // The actor read exactly this many replies: not reached.
            return (Ok(Replies { bytes, errors }), charged);
        };
        scanner.consumed(end);
        let read = bytes.slice(..end);
        if charged {
            self.budget.refund(bytes.len() - end);
        }
        let lives = probed(&mut scanner, &bytes[end..], filling.probes());
        if let Some(lives) = lives.filter(|_| errors & 1 == 0) {
            fill(&filling, &read, &lives);
        }
        (
            Ok(Replies {
                bytes: read,
                errors: errors & 1,
            }),
            charged,
        )
    }

    /// The invalidation stream is down: the read goes upstream, and the stream is started.
    fn cache_down(&self) -> Plan {
        self.client.hubs().tracker().wake();
        Plan::Forward
    }

    /// Every reply owed is in and no MULTI is open: the keys written leave the cache
    /// now, before the client can read the acknowledgement (the stream's invalidation of
    /// them may come a moment later).
    pub(super) fn settle_written(&mut self) {
        // Queued in MULTI, writes run at EXEC; while watching, they run as they come.
        if self.unresolved > 0 || matches!(self.tx, Tx::Multi { .. }) {
            return;
        }
        let Some(cache) = &self.config.cache else {
            return;
        };
        match self.written.take().map(|written| *written) {
            None => {}
            Some(Written::Keys(keys)) => cache.invalidate(&keys),
            Some(Written::All { .. }) => cache.flush(),
        }
    }

    /// `count` more replies are in: a FLUSHALL, FLUSHDB or SWAPDB among them empties the cache
    /// now, whatever replies are still owed after it (the written keys are dropped when all
    /// are in, as ever, with one more flush).
    pub(super) fn flush_if_answered(&mut self, count: u32) {
        let Some(Written::All { flushes, .. }) = self.written.as_deref_mut() else {
            return;
        };
        let waiting = flushes.len();
        for left in flushes.iter_mut() {
            *left = left.saturating_sub(count);
        }
        flushes.retain(|&left| left > 0);
        if flushes.len() < waiting {
            if let Some(cache) = &self.config.cache {
                cache.flush();
            }
        }
    }
}

/// A request that may write, while a cache is on: its keys are noted, and the client
/// reads around the cache until its replies are in.
/// `owed`: the replies owed before this request's, `None` in MULTI (it runs at EXEC).
pub(super) fn note_write(
    written: &mut Option<Box<Written>>,
    command: CommandId,
    request: &[u8],
    owed: Option<u32>,
) {
    if matches!(command.name(), "flushall" | "flushdb" | "swapdb") {
        let mut flushes = match written.take().map(|written| *written) {
            Some(Written::All { flushes }) => flushes,
            _ => Vec::new(),
        };
        flushes.extend(owed.map(|owed| owed.saturating_add(1)));
        *written = Some(Box::new(Written::All { flushes }));
        return;
    }
    let found = keys(request);
    if found.scope() != Scope::Keys || found.keys().is_empty() {
        // Keys redmux cannot name (a script's, a function's): its reads go around the cache
        // until the replies are in, with nothing to drop after.
        if written.is_none() {
            *written = Some(Box::new(Written::Keys(Vec::new())));
        }
        return;
    }
    match written.as_deref_mut() {
        Some(Written::All { .. }) => {}
        Some(Written::Keys(noted)) => {
            noted.extend(copies(found.keys()));
            if noted.len() > WRITTEN_MAX_KEYS {
                *written = Some(Box::new(Written::All {
                    flushes: Vec::new(),
                }));
            }
        }
        None => *written = Some(Box::new(Written::Keys(copies(found.keys())))),
    }
}

/// The plan for a read that left placeholders: `tickets` (one per key of `keys`), and a PTTL
/// of each key with a ticket. A key an MGET names twice is probed and filled once, and at
/// most `MAX_PROBES` keys are: the probes run on the shared connection, before other
/// clients' requests, and their replies count against the client's output limit until its
/// reply is in. A placeholder left unfilled is filled by the next read of its key.
fn filling(
    cache: &NearCache,
    mut tickets: Vec<Option<Ticket>>,
    parts: bool,
    keys: &[&[u8]],
) -> Plan {
    let mut probes = BytesMut::new();
    // Only an MGET has more than one ticket to tell apart.
    let mut probed = HashSet::new();
    for (ticket, key) in tickets.iter_mut().zip(keys) {
        let Some(held) = *ticket else { continue };
        if parts && (probed.len() == MAX_PROBES || !probed.insert(held)) {
            *ticket = None;
            continue;
        }
        probes.put_slice(&encode_command([&b"PTTL"[..], key]));
    }
    let filling = Filling {
        cache: cache.clone(),
        tickets,
        parts,
        asked: Instant::now(),
    };
    Plan::Fill(filling, probes.freeze())
}

/// How long each probed key lives, from the `count` PTTL replies in `replies`: `None` inside
/// for no expiry (-1) or no key (-2: were it deleted after the read, its invalidation drops
/// the placeholder). `None` if any reply is not an integer (a PTTL refused by an ACL).
fn probed(
    scanner: &mut ReplyScanner,
    mut replies: &[u8],
    count: u32,
) -> Option<Vec<Option<Duration>>> {
    let mut lives = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let end = scanner.next_reply(replies).ok()??;
        scanner.consumed(end);
        let ttl: i64 =
            std::str::from_utf8(replies[..end].strip_prefix(b":")?.strip_suffix(b"\r\n")?)
                .ok()?
                .parse()
                .ok()?;
        lives.push(u64::try_from(ttl).ok().map(Duration::from_millis));
        replies = &replies[end..];
    }
    Some(lives)
}

/// Fills the placeholders of `filling` with `read`, the reply, each until its key's TTL
/// (`lives`, one per ticket) runs out.
fn fill(filling: &Filling, read: &[u8], lives: &[Option<Duration>]) {
    let deadline = |life: &Option<Duration>| life.map(|life| filling.asked + life);
    let mut lives = lives.iter();
    if !filling.parts {
        if let (Some(Some(ticket)), Some(life)) = (filling.tickets.first(), lives.next()) {
            filling.cache.fill(*ticket, read, deadline(life));
        }
        return;
    }
    let Some(parts) = mget_parts(read).filter(|parts| parts.len() == filling.tickets.len()) else {
        return;
    };
    for (ticket, part) in filling.tickets.iter().zip(parts) {
        // The probes are in the order of the tickets, one per ticket.
        let Some(ticket) = ticket else { continue };
        let Some(life) = lives.next() else { return };
        filling.cache.fill(*ticket, part, deadline(life));
    }
}

/// The reply an MGET answered from the cache gets: its parts, in order, in an array.
fn array(parts: &[Bytes]) -> Bytes {
    let len: usize = parts.iter().map(Bytes::len).sum();
    let mut out = BytesMut::with_capacity(len + 16);
    out.put_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

fn copies(keys: &[&[u8]]) -> Vec<Bytes> {
    keys.iter().map(|key| Bytes::copy_from_slice(key)).collect()
}

/// The elements of an MGET reply, each as Redis encoded it, split by the reply scanner the
/// actors use. `None` for anything else.
pub(super) fn mget_parts(reply: &[u8]) -> Option<Vec<&[u8]>> {
    let head = reply.strip_prefix(b"*")?;
    let end = head.windows(2).position(|pair| pair == b"\r\n")?;
    let count: usize = std::str::from_utf8(&head[..end]).ok()?.parse().ok()?;
    let mut rest = &head[end + 2..];
    let mut scanner = ReplyScanner::new();
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        // Only bulk strings and nulls: anything else is not an MGET element.
        if !matches!(rest.first(), Some(b'$' | b'_')) {
            return None;
        }
        let end = scanner.next_reply(rest).ok()??;
        scanner.consumed(end);
        parts.push(&rest[..end]);
        rest = &rest[end..];
    }
    rest.is_empty().then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mget_replies_split_into_their_elements() {
        assert_eq!(
            mget_parts(b"*3\r\n$1\r\na\r\n$-1\r\n_\r\n").unwrap(),
            vec![&b"$1\r\na\r\n"[..], b"$-1\r\n", b"_\r\n"]
        );
        assert_eq!(mget_parts(b"*0\r\n").unwrap(), Vec::<&[u8]>::new());
        assert!(mget_parts(b"*2\r\n$1\r\na\r\n").is_none());
        assert!(mget_parts(b"-ERR x\r\n").is_none());
        assert!(mget_parts(b"*1\r\n:1\r\n").is_none());
        let parts = [
            Bytes::from_static(b"$1\r\na\r\n"),
            Bytes::from_static(b"$-1\r\n"),
        ];
        assert_eq!(&array(&parts)[..], b"*2\r\n$1\r\na\r\n$-1\r\n");
    }
}
