//! The Redis Cluster building blocks (`redmux::cluster`) checked against a live Redis 7.0
//! cluster of three masters with a replica each.
//!
//! The tests share one cluster while any of them runs (starting one takes seconds on a small
//! machine): each holds an `Arc` to it, and the last to finish drops it, which kills the
//! processes. The failover test takes the cluster for itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak},
    time::Duration,
};

use redmux::{
    cluster::{
        keys::{key_positions, keys, Scope, SlotOf},
        plan::{cross_slot, Plan, CROSSSLOT},
        slot::slot,
        topology::SlotMap,
    },
    resp::encode_command,
};
use support::{
    cluster::{parse, Cluster, Conn, Resp, MASTERS},
    Deadline,
};

type Shared = Arc<RwLock<Cluster>>;

static CLUSTER: Mutex<Weak<RwLock<Cluster>>> = Mutex::new(Weak::new());

/// The cluster the running tests share, started if none is running.
fn shared() -> Shared {
    let mut current = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(cluster) = current.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(RwLock::new(Cluster::start()));
    *current = Arc::downgrade(&cluster);
    cluster
}

fn read(cluster: &Shared) -> RwLockReadGuard<'_, Cluster> {
    cluster
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write(cluster: &Shared) -> RwLockWriteGuard<'_, Cluster> {
    cluster
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Requests whose keys Redis finds by keyword or count, with several keys, and the edges of
/// those rules; each is also checked with `COMMAND GETKEYS`.
const MOVABLE: &[&[&str]] = &[
    &["EVAL", "s", "3", "a", "b", "c", "x", "y"],
    &["EVAL", "s", "0", "x"],
    &["EVAL", "s", "4", "a", "b"],
    &["EVAL", "s", "-1", "a"],
    &["EVAL", "s", "2abc", "a", "b"],
    &["EVAL", "s", "02", "a", "b"],
    &["EVAL", "s", "4294967297", "a", "b"],
    &["EVAL", "s", "2147483648", "a", "b"],
    &["evalsha", "s", "2", "a", "b"],
    &["EVAL_RO", "s", "1", "a", "x"],
    &["EVALSHA_RO", "s", "2", "a", "b"],
    &["FCALL", "f", "2", "a", "b", "x"],
    &["FCALL_RO", "f", "1", "a"],
    &[
        "ZUNIONSTORE",
        "d",
        "3",
        "a",
        "b",
        "c",
        "WEIGHTS",
        "1",
        "2",
        "3",
    ],
    &["ZUNIONSTORE", "d", "0", "a"],
    &["ZINTERSTORE", "d", "2", "a", "b", "AGGREGATE", "MAX"],
    &["ZINTERSTORE", "d", " 2", "a", "b"],
    &["ZDIFFSTORE", "d", "2", "a", "b"],
    &["ZUNION", "2", "a", "b", "WITHSCORES"],
    &["ZINTER", "3", "a", "b", "c"],
    &["ZDIFF", "2", "a", "b"],
    &["ZINTERCARD", "2", "a", "b", "LIMIT", "3"],
    &["SINTERCARD", "3", "a", "b", "c"],
    &["SINTERCARD", "+3", "a", "b", "c"],
    &["LMPOP", "2", "a", "b", "LEFT", "COUNT", "2"],
    &["ZMPOP", "1", "a", "MIN"],
    &["BLMPOP", "0", "2", "a", "b", "RIGHT"],
    &["BZMPOP", "1.5", "3", "a", "b", "c", "MAX", "COUNT", "1"],
    &[
        "XREAD", "COUNT", "1", "BLOCK", "0", "STREAMS", "a", "b", "0", "0",
    ],
    &["XREAD", "STREAMS", "a", "b", "c", "0", "0", "0"],
    &["XREAD", "STREAMS", "a", "b", "0"],
    &["XREAD", "streams", "streams", "0"],
    &["XREAD", "COUNT", "1", "a", "0"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "STREAMS",
        "a",
        "b",
        "0",
        "0",
    ],
    &["XREADGROUP", "GROUP", "g", "streams", "STREAMS", "a", ">"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "NOACK",
        "STREAMS",
        "a",
        "b",
        ">",
    ],
    &["XREADGROUP", "GROUP", "g", "c", "COUNT", "STREAMS", "a"],
    &["MIGRATE", "h", "1", "k", "0", "5000"],
    &["MIGRATE", "h", "1", "k", "0", "5000", "COPY", "REPLACE"],
    &["MIGRATE", "h", "1", "", "0", "5000", "KEYS", "a", "b", "c"],
    &[
        "MIGRATE", "h", "1", "", "0", "5000", "COPY", "AUTH", "keys", "KEYS", "a",
    ],
    &[
        "MIGRATE", "h", "1", "", "0", "5000", "AUTH2", "u", "keys", "KEYS", "a", "b",
    ],
    &["MIGRATE", "h", "1", "k", "0", "5000", "KEYS", "a"],
    &["MIGRATE", "h", "1", "", "0", "5000", "KEYS"],
    &["MIGRATE", "h", "1", "", "0", "5000", "REPLACE", "KEYS", "a"],
    &["SORT", "k"],
    &["SORT", "k", "STORE", "d"],
    &[
        "SORT", "k", "BY", "w_*", "GET", "#", "LIMIT", "0", "10", "STORE", "d",
    ],
    &["SORT", "k", "BY", "store", "STORE", "d"],
    &["SORT", "k", "STORE", "a", "STORE", "b"],
    &["SORT", "k", "LIMIT", "store", "x", "ALPHA"],
    &["SORT", "k", "STORE"],
    &["SORT_RO", "k", "BY", "w_*", "GET", "#"],
    &["GEORADIUS", "k", "0", "0", "1", "km"],
    &["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "d"],
    &["GEORADIUS", "k", "0", "0", "1", "km", "STOREDIST", "d"],
    &[
        "GEORADIUS",
        "k",
        "0",
        "0",
        "1",
        "km",
        "STORE",
        "a",
        "STOREDIST",
        "b",
    ],
    &[
        "GEORADIUS",
        "k",
        "0",
        "0",
        "1",
        "km",
        "STOREDIST",
        "b",
        "STORE",
        "a",
    ],
    &["GEORADIUS", "k", "0", "0", "1", "km", "COUNT", "1", "STORE"],
    &["GEORADIUSBYMEMBER", "k", "m", "1", "km", "STORE", "d"],
    &[
        "GEORADIUSBYMEMBER",
        "k",
        "m",
        "1",
        "km",
        "WITHDIST",
        "storedist",
        "d",
    ],
    &["GEORADIUS_RO", "k", "0", "0", "1", "km", "STORE", "d"],
    &["SET", "k", "v", "GET"],
    &["BITFIELD", "k", "GET", "u8", "0"],
    &["OBJECT", "ENCODING", "k"],
    &["object", "freq", "k"],
    &["MEMORY", "USAGE", "k", "SAMPLES", "5"],
    &["XINFO", "STREAM", "k", "FULL", "COUNT", "5"],
    &["XINFO", "GROUPS", "k"],
    &["XINFO", "CONSUMERS", "k", "g"],
    &["XGROUP", "CREATE", "k", "g", "$", "MKSTREAM"],
    &["XGROUP", "SETID", "k", "g", "0"],
    &["XGROUP", "DESTROY", "k", "g"],
    &["XGROUP", "CREATECONSUMER", "k", "g", "c"],
    &["XGROUP", "DELCONSUMER", "k", "g", "c"],
    &["MSET", "a", "1", "b", "2", "c", "3"],
    &["MSET", "a", "1", "b"],
    &["MSETNX", "a", "1", "b", "2"],
    &["BITOP", "AND", "d", "a", "b", "c"],
    &["PFMERGE", "d"],
    &["PFMERGE", "d", "a", "b"],
    &["SDIFFSTORE", "d", "a", "b"],
    &["BLPOP", "a", "b", "c", "0"],
    &["LCS", "a", "b"],
    &["GeT", "k"],
];

/// Sharded pub/sub commands: `COMMAND GETKEYS` says they have no key arguments (their specs
/// are flagged `not_key`), yet a cluster routes them by the channel's slot, so redmux reports
/// their channels under `Scope::ShardChannels`. Skipped in the comparison.
const SHARD_CHANNELS: &[&str] = &["spublish", "ssubscribe", "sunsubscribe"];

/// Every command `COMMAND` reports, with its subcommands, as (name words, arity, has keys).
fn commands(conn: &mut Conn) -> Vec<(Vec<String>, i64, bool)> {
    fn walk(entry: &Resp, out: &mut Vec<(Vec<String>, i64, bool)>) {
        let fields = entry.items();
        let name = fields[0].text();
        let flags: Vec<String> = fields[2].items().iter().map(Resp::text).collect();
        let keyed_spec = fields[8].items().iter().any(|spec| {
            let spec = spec.items();
            let flags = spec
                .chunks(2)
                .find(|kv| kv[0].text() == "flags")
                .map(|kv| kv[1].items().iter().map(Resp::text).collect::<Vec<_>>())
                .unwrap_or_default();
            !flags.iter().any(|f| f == "not_key")
        });
        let keyed = keyed_spec || flags.iter().any(|f| f == "movablekeys");
        let subcommands = fields[9].items();
        if subcommands.is_empty() {
            let words = name.split('|').map(str::to_string).collect();
            out.push((words, fields[1].int(), keyed));
        }
        for sub in subcommands {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    for entry in conn.query(&["COMMAND", "INFO"]).items() {
        walk(entry, &mut out);
    }
    out
}

/// Requests for one command built from its arity alone: the fixed positions of most commands,
/// with fillers that are distinct small numbers, so a count argument parses and points at
/// keys that can be told apart.
fn generic_samples(words: &[String], arity: i64) -> Vec<Vec<String>> {
    let counts: Vec<usize> = match arity >= 0 {
        true => vec![arity as usize],
        false => (0..6).map(|more| (-arity) as usize + more).collect(),
    };
    let mut samples = Vec::new();
    for count in counts {
        let count = count.max(words.len());
        let mut numbers = words.to_vec();
        let mut names = words.to_vec();
        for at in words.len()..count {
            numbers.push(at.to_string());
            names.push(format!("k{at}"));
        }
        samples.push(numbers);
        samples.push(names);
    }
    // One argument too few: Redis refuses it before looking for keys.
    if words.len() < samples[0].len() {
        let mut short = samples[1].clone();
        short.pop();
        samples.push(short);
    }
    samples
}

/// For every command Redis reports, redmux's key extraction (`cluster::keys`) finds the keys
/// `COMMAND GETKEYS` finds, in the same order, for requests built from the command's arity and
/// for the movable forms above; where GETKEYS refuses (no keys, invalid arguments, wrong
/// count), redmux finds none. Every command with keys must have had at least one request
/// with keys.
fn check_key_extraction(port: u16) {
    let mut conn = Conn::connect(port);
    let commands = commands(&mut conn);
    assert!(
        commands.len() > 300,
        "COMMAND INFO lists {}",
        commands.len()
    );
    let mut samples: Vec<Vec<String>> = Vec::new();
    for (words, arity, _) in &commands {
        if SHARD_CHANNELS.contains(&words[0].as_str()) {
            continue;
        }
        samples.extend(generic_samples(words, *arity));
    }
    samples.extend(
        MOVABLE
            .iter()
            .map(|args| args.iter().map(|a| a.to_string()).collect()),
    );
    let requests: Vec<Vec<&[u8]>> = samples
        .iter()
        .map(|args| {
            let mut request: Vec<&[u8]> = vec![b"COMMAND", b"GETKEYS"];
            request.extend(args.iter().map(|a| a.as_bytes()));
            request
        })
        .collect();
    let replies = conn.pipeline(&requests);
    let mut mismatches = Vec::new();
    let mut with_keys = BTreeSet::new();
    for (args, reply) in samples.iter().zip(replies) {
        let expected: Vec<String> = match parse(&reply) {
            Resp::Array(keys) => keys.iter().map(Resp::text).collect(),
            Resp::Error(_) => Vec::new(),
            other => panic!("GETKEYS {args:?}: {other:?}"),
        };
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let (scope, positions) = key_positions(&argv);
        let found: Vec<String> = positions.iter().map(|&at| args[at].clone()).collect();
        if found != expected {
            mismatches.push(format!("{args:?}: redmux {found:?}, Redis {expected:?}"));
        }
        assert_eq!(
            scope == Scope::Keys,
            !found.is_empty(),
            "{args:?}: scope {scope:?}"
        );
        if !expected.is_empty() {
            let name = match commands
                .iter()
                .any(|(words, _, _)| words.len() == 2 && words[0] == args[0].to_lowercase())
            {
                true => format!("{}|{}", args[0], args[1]).to_lowercase(),
                false => args[0].to_lowercase(),
            };
            with_keys.insert(name);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} requests differ:\n{}",
        mismatches.len(),
        samples.len(),
        mismatches.join("\n")
    );
    let keyed: BTreeSet<String> = commands
        .iter()
        .filter(|(words, _, keyed)| *keyed && !SHARD_CHANNELS.contains(&words[0].as_str()))
        .map(|(words, _, _)| words.join("|"))
        .collect();
    let untested: Vec<&String> = keyed.difference(&with_keys).collect();
    assert!(untested.is_empty(), "no request had keys for {untested:?}");
}

#[test]
fn key_extraction_matches_command_getkeys() {
    let cluster = shared();
    let cluster = read(&cluster);
    check_key_extraction(cluster.live_ports()[0]);
}

/// A small deterministic generator (xorshift64*), so a failing key can be reproduced.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, max_len: u64, alphabet: &[u8]) -> Vec<u8> {
        let len = self.next() % (max_len + 1);
        (0..len)
            .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
            .collect()
    }
}

/// Keys of every shape the hash-tag rule cares about.
fn sample_keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = [
        &b""[..],
        b"{",
        b"}",
        b"{}",
        b"}{",
        b"{{}}",
        b"{a}",
        b"{{a}}",
        b"foo{}{bar}",
        b"foo{{bar}}zap",
        b"foo{bar}{zap}",
        b"{user1000}.following",
        b"{user1000}.followers",
        b"a{b",
        b"a}b{c",
        b"{\x00}",
        b"\xff{\xfe}\x00",
        b"123456789",
    ]
    .iter()
    .map(|k| k.to_vec())
    .collect();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let all: Vec<u8> = (0..=255).collect();
    for _ in 0..1000 {
        keys.push(random.bytes(40, &all));
    }
    // Braces often, so tags of every length and position come up.
    for _ in 0..1000 {
        keys.push(random.bytes(12, b"ab{}{}\x00"));
    }
    keys
}

/// `slot()` gives the slot `CLUSTER KEYSLOT` gives, for random binary keys, keys full of
/// braces, and the hash-tag edge cases.
#[test]
fn slot_matches_cluster_keyslot() {
    let cluster = shared();
    let cluster = read(&cluster);
    let keys = sample_keys();
    let requests: Vec<Vec<&[u8]>> = keys
        .iter()
        .map(|key| vec![&b"CLUSTER"[..], b"KEYSLOT", key])
        .collect();
    let replies = Conn::connect(cluster.live_ports()[0]).pipeline(&requests);
    for (key, reply) in keys.iter().zip(replies) {
        assert_eq!(
            i64::from(slot(key)),
            parse(&reply).int(),
            "key {:?}",
            String::from_utf8_lossy(key)
        );
    }
}

/// The slot map of every node, read from CLUSTER SHARDS and from CLUSTER SLOTS; waits until
/// they agree (right after the cluster forms, SHARDS says a replica is `loading` until its
/// first replication bytes arrive, and SLOTS lists it anyway).
fn agreed_map(port: u16) -> SlotMap {
    let deadline = Deadline::within(Duration::from_secs(15));
    let mut conn = Conn::connect(port);
    loop {
        let shards = SlotMap::from_shards(&conn.call(&[b"CLUSTER", b"SHARDS"]), false).unwrap();
        let slots = SlotMap::from_slots(&conn.call(&[b"CLUSTER", b"SLOTS"])).unwrap();
        if shards == slots {
            return shards;
        }
        deadline.next_try_blocking(format!(
            "SHARDS and SLOTS of node {port} to agree:\n{shards:?}\n{slots:?}"
        ));
    }
}

/// Sends `GET key` for many keys to the master the map names for each key's slot: none is
/// redirected.
fn check_routing(map: &SlotMap) {
    let keys = sample_keys();
    for (at, master) in map.masters().iter().enumerate() {
        let mine: Vec<Vec<&[u8]>> = keys
            .iter()
            .filter(|key| map.owner(slot(key)) == Some(at))
            .map(|key| vec![&b"GET"[..], key])
            .collect();
        assert!(!mine.is_empty());
        for reply in Conn::connect(master.port).pipeline(&mine) {
            assert!(
                reply.starts_with(b"$"),
                "{master:?}: {}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
}

/// SlotMaps parsed from live CLUSTER SHARDS and CLUSTER SLOTS agree on every node, cover every
/// slot with the three masters (each with its replica), and route every key to a master that
/// serves it.
#[test]
fn slot_maps_from_shards_and_slots_agree() {
    let cluster = shared();
    let cluster = read(&cluster);
    let masters: BTreeSet<u16> = cluster.masters().into_iter().collect();
    let mut first = None;
    for port in cluster.live_ports() {
        let map = agreed_map(port);
        assert_eq!(map.unassigned(), 0);
        let ports: BTreeSet<u16> = map.masters().iter().map(|m| m.port).collect();
        assert_eq!(ports, masters);
        // Every running node that is not a master is a replica in the map (after the failover
        // test, the promoted replica's master has none).
        let replicas: usize = (0..MASTERS).map(|at| map.replicas(at).len()).sum();
        assert_eq!(
            replicas,
            cluster.live_ports().len() - masters.len(),
            "{map:?}"
        );
        match &first {
            None => first = Some(map),
            Some(first) => assert_eq!(&map, first),
        }
    }
    check_routing(&first.expect("a node"));
}

/// Requests sent to the master of their first key: Redis answers `-CROSSSLOT` exactly when
/// `cross_slot` says so, for every request that is not split; the split ones (which Redis
/// refuses whole) run part by part and merge to what a single server would answer.
#[test]
fn cross_slot_and_split_requests_match_the_cluster() {
    let cluster = shared();
    let cluster = read(&cluster);
    let map = agreed_map(cluster.live_ports()[0]);
    let port_of = |slot: u16| map.master_for(slot).expect("every slot served").port;
    // foo (12182), bar (5061), baz (4813): bar and baz share a master, not a slot.
    let unsplit: &[&[&str]] = &[
        &["MSETNX", "foo", "1", "bar", "2"],
        &["MSETNX", "bar", "1", "baz", "2"],
        &["MSETNX", "{t}a", "1", "{t}b", "2"],
        &["MSET", "foo", "1", "bar"],
        &["MSET", "{t}a", "1", "{t}b"],
        &["RENAME", "foo", "bar"],
        &["RENAME", "{t}a", "{t}b"],
        &["SUNIONSTORE", "foo", "{foo}a", "bar"],
        &["SUNIONSTORE", "{t}d", "{t}a", "{t}b"],
        &["EVAL", "return 1", "2", "foo", "bar"],
        &["EVAL", "return 1", "2", "{t}a", "{t}b"],
        &["EVAL", "return 1", "0", "foo", "bar"],
        &["BLPOP", "foo", "bar", "1"],
        &["ZUNIONSTORE", "foo", "2", "{foo}a", "bar"],
        &["XREAD", "STREAMS", "foo", "bar", "0", "0"],
        &["SORT", "foo", "STORE", "bar"],
        &["SORT", "{t}a", "STORE", "{t}b"],
        &["SSUBSCRIBE", "foo", "bar"],
        &["SSUBSCRIBE", "{t}a", "{t}b"],
        &["SET", "foo", "bar"],
        &["GET", "baz"],
    ];
    for args in unsplit {
        let request = encode_command(args.iter().map(|a| a.as_bytes()));
        let port = match keys(&request).slot() {
            SlotOf::One(slot) => port_of(slot),
            SlotOf::Cross => port_of(slot(keys(&request).keys()[0])),
            SlotOf::None => map.masters()[0].port,
        };
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        // A fresh connection each: SSUBSCRIBE leaves one subscribed.
        let reply = Conn::connect(port).call(&argv);
        assert_eq!(
            reply == CROSSSLOT,
            cross_slot(&request),
            "{args:?}: Redis said {}",
            String::from_utf8_lossy(&reply)
        );
        assert!(
            !reply.starts_with(b"-MOVED"),
            "{args:?} went to the wrong master"
        );
    }

    let run = |plan: &Plan| -> Vec<u8> {
        let replies: Vec<Vec<u8>> = plan
            .parts()
            .iter()
            .map(|part| {
                let argv: Vec<&[u8]> = redmux::resp::Args::new(&part.request).collect();
                Conn::connect(map.masters()[part.node].port).call(&argv)
            })
            .collect();
        let replies: Vec<&[u8]> = replies.iter().map(Vec::as_slice).collect();
        plan.merge(&replies).expect("mergeable").to_vec()
    };
    let node_of = |slot: u16| map.owner(slot).expect("every slot served");
    let split = |args: &[&str]| {
        let request = encode_command(args.iter().map(|a| a.as_bytes()));
        // Redis refuses the whole request.
        let reply = Conn::connect(port_of(slot(args[1].as_bytes())))
            .call(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        assert_eq!(reply, CROSSSLOT, "{args:?}");
        Plan::split(&request, node_of).expect("splittable")
    };
    let mset = split(&[
        "MSET",
        "sp:foo",
        "1",
        "sp:bar",
        "2",
        "{sp:foo}x",
        "3",
        "sp:baz",
        "4",
    ]);
    assert!(mset.parts().len() >= 3);
    assert_eq!(run(&mset), b"+OK\r\n");
    let mget = split(&[
        "MGET",
        "sp:baz",
        "sp:none",
        "sp:foo",
        "{sp:foo}x",
        "sp:bar",
        "sp:baz",
    ]);
    assert_eq!(
        run(&mget),
        b"*6\r\n$1\r\n4\r\n$-1\r\n$1\r\n1\r\n$1\r\n3\r\n$1\r\n2\r\n$1\r\n4\r\n"
    );
    let exists = split(&["EXISTS", "sp:foo", "sp:none", "sp:bar", "sp:foo"]);
    assert_eq!(run(&exists), b":3\r\n");
    let touch = split(&["TOUCH", "sp:foo", "sp:bar", "sp:none"]);
    assert_eq!(run(&touch), b":2\r\n");
    let unlink = split(&["UNLINK", "sp:bar", "sp:none", "{sp:foo}x"]);
    assert_eq!(run(&unlink), b":2\r\n");
    let del = split(&["DEL", "sp:foo", "sp:bar", "sp:baz", "{sp:foo}x"]);
    assert_eq!(run(&del), b":2\r\n");
}

/// After a master is killed and its replica takes over, SHARDS and SLOTS give the same map
/// again, with the promoted replica serving the dead master's slots.
#[test]
fn slot_maps_follow_a_failover() {
    let cluster = shared();
    let mut cluster = write(&cluster);
    let before = agreed_map(cluster.live_ports()[0]);
    let killed = cluster.kill_master();
    let killed_at = before
        .masters()
        .iter()
        .position(|m| m.port == killed)
        .expect("the killed node was a master");
    let replica = before.replicas(killed_at)[0].clone();
    cluster.wait_for_failover(killed);
    for port in cluster.live_ports() {
        let after = agreed_map(port);
        assert_eq!(after.unassigned(), 0);
        assert_eq!(after.masters().len(), MASTERS);
        assert!(after.masters().iter().all(|m| m.port != killed));
        for slot in 0..16384u16 {
            let was = before.master_for(slot).expect("served");
            let now = after.master_for(slot).expect("served");
            match was.port == killed {
                true => assert_eq!(now, &replica, "slot {slot}"),
                false => assert_eq!(now, was, "slot {slot}"),
            }
        }
    }
    check_routing(&agreed_map(cluster.live_ports()[0]));
}
