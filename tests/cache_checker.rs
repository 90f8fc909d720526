//! The near cache's correctness checker: the race between writes made directly in Redis and
//! reads answered from redmux's cache (`[cache] enabled = true`).
//!
//! **Writes elsewhere.** Writers on direct connections to Redis `SET ck:{i} n`, each key owned
//! by one writer, with `n` counting up from 0; each write's send and acknowledgement (the
//! moment its reply arrived) are noted. A few keys change every 16 ms, many others every
//! 320 ms: longer than the bound on staleness below, so an invalidation lost even once leaves a stale entry
//! long enough to be seen, as does one lost at the last writes (readers go on 400 ms after the
//! writers stop). Readers, on their own connections through redmux, `GET` one key or `MGET`
//! two, both answered by the cache, and note when each read began and ended. A reader may see
//! an old value only as long as the invalidation delay: after the run, each value read is
//! checked against the writes.
//!
//! - Every value is a number that was written, and its SET was sent before the read ended.
//! - **Stale reads**: a read that returned `v` while a newer value `n_acked > v` had been
//!   acknowledged before the read began. Its **staleness** is `read start - ack(v + 1)`: how
//!   long Redis had already acknowledged a newer value when the cache still gave the older
//!   one. The maximum must stay under [`MAX_STALENESS`] (250 ms), generous enough for a
//!   loaded two-core machine; the figures printed are the invalidation delay as readers see
//!   it.
//! - **Regressions**: a reader that read a value older than one it had already read (a GET
//!   answered from an entry whose invalidation is on its way, after an MGET that went to
//!   Redis). Its age is `read start - end of this reader's first read of a newer value`, under
//!   the same bound.
//! - **Hit ratio**: `1 - (GET and MGET that reached Redis, from its INFO commandstats) / (GET
//!   and MGET readers sent)`. It must be over 50%, or the check would pass without the cache.
//!
//! **A client's own writes.** Clients that write through redmux read their own writes at
//! once, with no staleness at all, while other clients fill the cache with the same keys: a GET
//! after the SET's reply, a SET and a GET in one write, an MGET after the SET.
//!
//! `cargo test --test cache_checker -- --nocapture` prints the figures: reads, writes, stale
//! reads, staleness p50/p99/max in µs, regressions, hit ratio.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use redmux::resp::encode_command;
use support::{Raw, RedisServer, Redmux};
use tokio::time::MissedTickBehavior;

/// Keys `ck:0` .. `ck:7` change often, each every few milliseconds, and `ck:8` .. `ck:71` are
/// each left alone for longer than [`MAX_STALENESS`] after a change, so an invalidation that
/// never comes leaves a stale entry long enough to be seen.
const OFTEN: usize = 8;
const KEYS: usize = OFTEN + 64;
/// Writers, each the only one to write its share of the keys, one key after another: two
/// write the keys that change often, two the others.
const WRITERS: usize = 4;
/// How often a writer of the keys that change often writes one: each of its keys changes every
/// `OFTEN / 2` of these, while readers read it many times over.
const OFTEN_EVERY: Duration = Duration::from_millis(4);
/// How often a writer of the other keys writes one: each changes every 320 ms.
const SELDOM_EVERY: Duration = Duration::from_millis(10);
/// Readers through redmux.
const READERS: usize = 8;
/// How long writers run.
const RUN: Duration = Duration::from_secs(3);
/// How long readers go on once writers stop: longer than [`MAX_STALENESS`], so an
/// invalidation of the last writes that never came is seen.
const QUIET: Duration = Duration::from_millis(400);
/// The most a read may lag behind an acknowledged write.
const MAX_STALENESS: Duration = Duration::from_millis(250);
/// Own-writes scenario: clients, and rounds of each.
const OWN_WRITERS: usize = 4;
const OWN_ROUNDS: u64 = 2_000;

/// The scenarios measure timings on two cores shared with Redis: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Redmux with the cache on, once the cache serves: a repeated GET no longer reaches Redis.
/// (The invalidation stream starts at the first cacheable read.)
async fn start(redis: &RedisServer) -> Redmux {
    let mut config = support::config(&redis.addr());
    config.cache.enabled = true;
    let redmux = Redmux::start_with(config).await;
    let mut client = redmux.raw().await;
    support::wait_cache_serving(redis, &mut client, "ck:warm").await;
    redmux
}

fn command(args: &[&str]) -> bytes::Bytes {
    encode_command(args.iter().map(|a| a.as_bytes()))
}

/// The first bulk string of `reply` and what follows it; `None` for anything else (a null
/// included).
fn bulk(reply: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = reply.strip_prefix(b"$")?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    let body = rest.get(end + 2..end + 2 + len)?;
    let after = rest.get(end + 2 + len..)?.strip_prefix(b"\r\n")?;
    Some((body, after))
}

/// The number a GET reply holds; fails the test on anything else.
fn number(reply: &[u8]) -> u64 {
    bulk(reply)
        .filter(|(_, after)| after.is_empty())
        .and_then(|(body, _)| std::str::from_utf8(body).ok()?.parse().ok())
        .unwrap_or_else(|| panic!("not a number: {:?}", String::from_utf8_lossy(reply)))
}

/// The two numbers an MGET reply of two keys holds; fails the test on anything else.
fn numbers(reply: &[u8]) -> [u64; 2] {
    let parse = || {
        let rest = reply.strip_prefix(b"*2\r\n")?;
        let (first, rest) = bulk(rest)?;
        let (second, rest) = bulk(rest)?;
        let parse = |body: &[u8]| std::str::from_utf8(body).ok()?.parse().ok();
        rest.is_empty().then_some([parse(first)?, parse(second)?])
    };
    parse().unwrap_or_else(|| panic!("not two numbers: {:?}", String::from_utf8_lossy(reply)))
}

/// One key's writes: for value `n`, when its SET was sent (`sent[n]`) and acknowledged.
#[derive(Default)]
struct Writes {
    sent: Vec<Instant>,
    acked: Vec<Instant>,
}

impl Writes {
    /// Sets `key` to the next value on `conn`, a direct connection, noting the times.
    async fn write(&mut self, conn: &mut Raw, key: usize) {
        let n = self.acked.len().to_string();
        let sent = Instant::now();
        conn.send(command(&["SET", &format!("ck:{key}"), &n])).await;
        let reply = conn.reply().await;
        let acked = Instant::now();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "+OK\r\n",
            "SET ck:{key} {n}"
        );
        self.sent.push(sent);
        self.acked.push(acked);
    }
}

/// Writes `keys` in turn, one every `every`, until `until`.
async fn writer(
    redis: SocketAddr,
    mut keys: Vec<(usize, Writes)>,
    every: Duration,
    until: Instant,
) -> Vec<(usize, Writes)> {
    let mut conn = Raw::connect(redis).await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    'run: loop {
        for (key, writes) in keys.iter_mut() {
            tick.tick().await;
            if Instant::now() >= until {
                break 'run;
            }
            writes.write(&mut conn, *key).await;
        }
    }
    keys
}

/// One value a reader read.
struct Read {
    key: usize,
    value: u64,
    start: Instant,
    end: Instant,
}

/// What one reader did: its reads in order, and how many GETs and MGETs it sent.
#[derive(Default)]
struct Reader {
    reads: Vec<Read>,
    gets: u64,
    mgets: u64,
}

/// Reads random keys through redmux until `until`: a GET, or one time in four an MGET of two.
/// Half the keys read are among the few that change often.
async fn reader(redmux: SocketAddr, seed: u64, until: Instant) -> Reader {
    let mut conn = Raw::connect(redmux).await;
    let mut random = Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut done = Reader::default();
    loop {
        let start = Instant::now();
        if start >= until {
            return done;
        }
        let key = random.key();
        if random.below(4) == 0 {
            let other = std::iter::repeat_with(|| random.key())
                .find(|&other| other != key)
                .unwrap();
            let (a, b) = (format!("ck:{key}"), format!("ck:{other}"));
            conn.send(command(&["MGET", &a, &b])).await;
            let values = numbers(&conn.reply().await);
            let end = Instant::now();
            done.mgets += 1;
            for (key, value) in [key, other].into_iter().zip(values) {
                done.reads.push(Read {
                    key,
                    value,
                    start,
                    end,
                });
            }
        } else {
            conn.send(command(&["GET", &format!("ck:{key}")])).await;
            let value = number(&conn.reply().await);
            let end = Instant::now();
            done.gets += 1;
            done.reads.push(Read {
                key,
                value,
                start,
                end,
            });
        }
    }
}

/// xorshift64: enough to spread reads over keys, and the same on every run.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    /// One of the keys that change often half the time, else one of the others.
    fn key(&mut self) -> usize {
        match self.below(2) {
            0 => self.below(OFTEN),
            _ => OFTEN + self.below(KEYS - OFTEN),
        }
    }
}

/// What the reads say about the writes.
#[derive(Default)]
struct Verdict {
    reads: usize,
    /// Staleness of each stale read.
    stale: Vec<Duration>,
    /// Age of each regression.
    regressions: Vec<Duration>,
}

/// Checks every read of `readers` against `writes` (indexed by key).
fn judge(writes: &[Writes], readers: &[Reader]) -> Verdict {
    let mut verdict = Verdict::default();
    for reader in readers {
        // Per key: each new highest value this reader read, and when the read that first
        // returned it ended (increasing in both).
        let mut highest: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); KEYS];
        for read in &reader.reads {
            verdict.reads += 1;
            let key = &writes[read.key];
            let v = read.value as usize;
            assert!(
                v < key.acked.len() && key.sent[v] < read.end,
                "ck:{} read {v}, which was not written before the read ended",
                read.key
            );
            // The newest value acknowledged before the read began.
            let acked = key.acked.partition_point(|&at| at < read.start);
            let n_acked = acked.checked_sub(1).expect("the first value is set before");
            if v < n_acked {
                verdict.stale.push(read.start - key.acked[v + 1]);
            }
            let seen = &mut highest[read.key];
            match seen.last() {
                Some(&(top, _)) if read.value < top => {
                    let newer = seen.partition_point(|&(value, _)| value <= read.value);
                    verdict.regressions.push(read.start - seen[newer].1);
                }
                Some(&(top, _)) if read.value == top => {}
                _ => seen.push((read.value, read.end)),
            }
        }
    }
    verdict.stale.sort();
    verdict.regressions.sort();
    verdict
}

/// The `p`-th percentile of sorted `durations`, in µs (0 if none).
fn percentile(durations: &[Duration], p: f64) -> u128 {
    if durations.is_empty() {
        return 0;
    }
    let at = ((durations.len() - 1) as f64 * p).round() as usize;
    durations[at].as_micros()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_through_the_cache_lag_writes_elsewhere_by_the_invalidation_delay_at_most() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let redmux = start(&redis).await;
    let redis_addr: SocketAddr = redis.addr().parse().unwrap();

    // Every key holds 0 before anyone reads.
    let mut first = Raw::connect(redis_addr).await;
    let mut writes: Vec<Writes> = (0..KEYS).map(|_| Writes::default()).collect();
    for (key, writes) in writes.iter_mut().enumerate() {
        writes.write(&mut first, key).await;
    }
    let gets_before = support::redis_calls(&redis, "get");
    let mgets_before = support::redis_calls(&redis, "mget");

    let until = Instant::now() + RUN;
    let every = [OFTEN_EVERY, OFTEN_EVERY, SELDOM_EVERY, SELDOM_EVERY];
    let mut shares: Vec<Vec<(usize, Writes)>> = (0..WRITERS).map(|_| Vec::new()).collect();
    for (key, writes) in writes.drain(..).enumerate() {
        let writer = if key < OFTEN { key % 2 } else { 2 + key % 2 };
        shares[writer].push((key, writes));
    }
    let writers: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(i, share)| tokio::spawn(writer(redis_addr, share, every[i], until)))
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|seed| tokio::spawn(reader(redmux.addr, seed as u64, until + QUIET)))
        .collect();
    let mut by_key: Vec<Option<Writes>> = (0..KEYS).map(|_| None).collect();
    for writer in writers {
        for (key, writes) in writer.await.unwrap() {
            by_key[key] = Some(writes);
        }
    }
    let writes: Vec<Writes> = by_key.into_iter().map(Option::unwrap).collect();
    let mut done = Vec::with_capacity(READERS);
    for reader in readers {
        done.push(reader.await.unwrap());
    }

    let upstream = support::redis_calls(&redis, "get") - gets_before
        + support::redis_calls(&redis, "mget")
        - mgets_before;
    let sent: u64 = done.iter().map(|r| r.gets + r.mgets).sum();
    let written: usize = writes.iter().map(|w| w.acked.len() - 1).sum();
    let verdict = judge(&writes, &done);
    let hit_ratio = 1.0 - upstream as f64 / sent.max(1) as f64;
    let max_stale = verdict.stale.last().copied().unwrap_or_default();
    let max_regression = verdict.regressions.last().copied().unwrap_or_default();
    eprintln!(
        "cache checker: {} requests ({} values read), {written} writes; {} stale reads, \
         staleness p50 {} µs, p99 {} µs, max {} µs; {} regressions, max {} µs; \
         hit ratio {:.1}% ({upstream} of {sent} reached Redis)",
        sent,
        verdict.reads,
        verdict.stale.len(),
        percentile(&verdict.stale, 0.5),
        percentile(&verdict.stale, 0.99),
        max_stale.as_micros(),
        verdict.regressions.len(),
        max_regression.as_micros(),
        hit_ratio * 100.0,
    );
    assert!(written > 500, "the writers wrote: {written} writes");
    assert!(
        upstream * 2 < sent,
        "the cache answered most reads: {upstream} of {sent} reached Redis"
    );
    assert!(
        max_stale < MAX_STALENESS,
        "a read lagged an acknowledged write by {max_stale:?} ({} stale reads)",
        verdict.stale.len()
    );
    assert!(
        max_regression < MAX_STALENESS,
        "a reader went back to an older value {max_regression:?} after reading a newer one"
    );
    redmux.stop().await;
}

/// Reads `ck2:{id}` (and `ck2:{id + 1}` in an MGET) through redmux until `stop`, filling the
/// cache; returns how many GETs and MGETs it sent.
async fn filler(redmux: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut conn = Raw::connect(redmux).await;
    let (key, other) = (
        format!("ck2:{}", id % OWN_WRITERS),
        format!("ck2:{}", (id + 1) % OWN_WRITERS),
    );
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        let reply = if sent % 2 == 0 {
            conn.call(&["GET", &key]).await
        } else {
            conn.call(&["MGET", &key, &other]).await
        };
        assert!(!reply.starts_with('-'), "{reply}");
        sent += 1;
    }
    sent
}

/// Writes `ck2:{id}` through redmux and reads it back at once, in three ways by turns.
async fn own_writer(redmux: SocketAddr, id: usize) {
    let mut conn = Raw::connect(redmux).await;
    let key = format!("ck2:{id}");
    let other = format!("ck2:{}", (id + 1) % OWN_WRITERS);
    for n in 1..=OWN_ROUNDS {
        let value = n.to_string();
        match n % 3 {
            0 => {
                // GET once SET's reply is in.
                assert_eq!(conn.call(&["SET", &key, &value]).await, "+OK\r\n");
                let got = number(&request(&mut conn, &["GET", &key]).await);
                assert_eq!(got, n, "GET {key} right after SET {key} {n}");
            }
            1 => {
                // SET and GET in one write.
                let mut both = command(&["SET", &key, &value]).to_vec();
                both.extend_from_slice(&command(&["GET", &key]));
                let replies = conn.pipeline(&both, 2).await;
                let [set, get] = replies.as_slice() else {
                    panic!("two replies to SET {key} {n} and GET {key}: {replies:?}");
                };
                assert_eq!(String::from_utf8_lossy(set), "+OK\r\n");
                assert_eq!(number(get), n, "GET {key} pipelined after SET {key} {n}");
            }
            _ => {
                // MGET of its key and another once SET's reply is in.
                assert_eq!(conn.call(&["SET", &key, &value]).await, "+OK\r\n");
                let reply = request(&mut conn, &["MGET", &key, &other]).await;
                let got = mget_first(&reply);
                assert_eq!(got, n, "MGET {key} {other} right after SET {key} {n}");
            }
        }
    }
}

/// The first element of an MGET reply of two keys, a number (the second may be null).
fn mget_first(reply: &[u8]) -> u64 {
    reply
        .strip_prefix(b"*2\r\n")
        .and_then(bulk)
        .and_then(|(body, _)| std::str::from_utf8(body).ok()?.parse().ok())
        .unwrap_or_else(|| panic!("not an MGET reply: {:?}", String::from_utf8_lossy(reply)))
}

/// Sends `args` on `conn` and returns the raw reply.
async fn request(conn: &mut Raw, args: &[&str]) -> Vec<u8> {
    conn.send(command(args)).await;
    conn.reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_its_own_writes_through_the_cache_at_once() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let redmux = start(&redis).await;
    let gets_before = support::redis_calls(&redis, "get");
    let mgets_before = support::redis_calls(&redis, "mget");

    let stop = Arc::new(AtomicBool::new(false));
    let fillers: Vec<_> = (0..OWN_WRITERS)
        .map(|id| tokio::spawn(filler(redmux.addr, id, stop.clone())))
        .collect();
    let writers: Vec<_> = (0..OWN_WRITERS)
        .map(|id| tokio::spawn(own_writer(redmux.addr, id)))
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut filled = 0;
    for filler in fillers {
        filled += filler.await.unwrap();
    }

    let own_reads = OWN_WRITERS as u64 * OWN_ROUNDS;
    let sent = filled + own_reads;
    let upstream = support::redis_calls(&redis, "get") - gets_before
        + support::redis_calls(&redis, "mget")
        - mgets_before;
    eprintln!(
        "own writes: {own_reads} reads of a client's own write, all exact; {filled} reads \
         by other clients; hit ratio {:.1}% ({upstream} of {sent} reached Redis)",
        (1.0 - upstream as f64 / sent as f64) * 100.0
    );
    redmux.stop().await;
}
