//! redmux in front of a live Redis 7.0 cluster of three masters with a replica each
//! (`upstream.cluster`): clients that know nothing of slots see one Redis.
//!
//! Most tests share one cluster (starting one takes seconds on a small machine) and keep to keys
//! of their own, each test's with a prefix of its own; the ones that flush, reshard or kill a
//! node start a cluster for themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use redmux::{cluster::slot::slot, resp::encode_command, Config};
use support::{
    cluster::{parse, set_owner, start_move, Cluster, Conn, Resp},
    Raw, Redmux,
};

static CLUSTER: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

/// The cluster the running tests share, started if none is running.
fn shared() -> Arc<Cluster> {
    let mut current = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(cluster) = current.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(Cluster::start());
    *current = Arc::downgrade(&cluster);
    cluster
}

/// A config for redmux in front of `cluster`, every node a seed.
fn config(cluster: &Cluster) -> Config {
    let mut config = Config::default();
    config.upstream.cluster = cluster
        .addrs()
        .iter()
        .map(|addr| addr.parse().expect("seed address"))
        .collect();
    config
}

async fn start(cluster: &Cluster) -> Redmux {
    Redmux::start_with(config(cluster)).await
}

fn cmd(args: &[&str]) -> Vec<u8> {
    encode_command(args.iter().map(|a| a.as_bytes())).to_vec()
}

/// The master that owns `key`, asked of the nodes themselves: the one that does not redirect.
fn owner(cluster: &Cluster, key: &str) -> u16 {
    let owners: Vec<u16> = cluster
        .masters()
        .into_iter()
        .filter(|&port| {
            let reply = Conn::connect(port).query(&["EXISTS", key]);
            !matches!(reply, Resp::Error(ref e) if e.starts_with("MOVED"))
        })
        .collect();
    assert_eq!(owners.len(), 1, "one owner of {key}: {owners:?}");
    owners[0]
}

/// A direct connection to the master of `key`.
fn at_owner(cluster: &Cluster, key: &str) -> Conn {
    Conn::connect(owner(cluster, key))
}

/// The `-CROSSSLOT` errors the masters have given since they started.
fn crossslot_errors(cluster: &Cluster) -> u64 {
    cluster
        .masters()
        .into_iter()
        .map(|port| errors_given(port, "CROSSSLOT"))
        .sum()
}

/// Keys `prefix:0..n`, which spread over every master.
fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}:{i}")).collect()
}

#[tokio::test]
async fn keyed_commands_reach_the_master_of_their_slot() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let keys = keys("route", 60);
    let mut masters = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(client.call(&["SET", key, &i.to_string()]).await, "+OK\r\n");
    }
    for (i, key) in keys.iter().enumerate() {
        let direct = at_owner(&cluster, key).query(&["GET", key]);
        assert_eq!(
            direct,
            Resp::Bulk(i.to_string().into_bytes()),
            "{key} on its master"
        );
        masters.insert(owner(&cluster, key));
        let through = client.call(&["GET", key]).await;
        assert_eq!(through, format!("${}\r\n{i}\r\n", i.to_string().len()));
    }
    assert_eq!(masters.len(), 3, "the keys spread over every master");
}

#[tokio::test]
async fn a_pipeline_across_slots_is_answered_in_order() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let keys = keys("order", 50);
    let mut out = Vec::new();
    let mut expected = Vec::new();
    for round in 0..20 {
        for key in &keys {
            out.extend(cmd(&["INCR", key]));
            expected.push(format!(":{}\r\n", round + 1));
            if round % 7 == 0 {
                out.extend(cmd(&["PING"]));
                expected.push("+PONG\r\n".to_owned());
            }
        }
    }
    let replies = client.pipeline(&out, expected.len()).await;
    let replies: Vec<String> = replies
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(replies, expected);
    // Large values interleaved over the masters: a master's requests of a batch go as one
    // message while small, one per run past 64 KiB.
    let mut out = Vec::new();
    let values: Vec<String> = (0..24).map(|i| format!("{i}").repeat(10_000)).collect();
    for (key, value) in keys.iter().zip(&values) {
        out.extend(cmd(&["SET", key, value]));
        out.extend(cmd(&["GET", key]));
    }
    let replies = client.pipeline(&out, 48).await;
    for (pair, value) in replies.chunks(2).zip(&values) {
        assert_eq!(pair[0], b"+OK\r\n");
        assert_eq!(
            pair[1],
            format!("${}\r\n{value}\r\n", value.len()).into_bytes()
        );
    }
    // Several clients at once, each its own counter.
    let mut tasks = Vec::new();
    for c in 0..8 {
        let addr = redmux.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = Raw::connect(addr).await;
            let key = format!("order:client:{c}");
            let mut out = Vec::new();
            for _ in 0..200 {
                out.extend(cmd(&["INCR", &key]));
                out.extend(cmd(&["GET", &key]));
            }
            let replies = client.pipeline(&out, 400).await;
            for (n, pair) in replies.chunks(2).enumerate() {
                let value = (n + 1).to_string();
                assert_eq!(pair[0], format!(":{value}\r\n").into_bytes());
                assert_eq!(
                    pair[1],
                    format!("${}\r\n{value}\r\n", value.len()).into_bytes()
                );
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
}

#[tokio::test]
async fn multi_key_commands_are_split_by_slot_and_merged() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let keys = keys("split", 12);
    let slots: BTreeSet<u16> = keys.iter().map(|k| slot(k.as_bytes())).collect();
    assert!(slots.len() > 3, "the keys span slots");
    let mut mset = vec!["MSET"];
    let values: Vec<String> = (0..keys.len()).map(|i| format!("v{i}")).collect();
    for (key, value) in keys.iter().zip(&values) {
        mset.push(key);
        mset.push(value);
    }
    assert_eq!(client.call(&mset).await, "+OK\r\n");
    for (key, value) in keys.iter().zip(&values) {
        assert_eq!(
            at_owner(&cluster, key).query(&["GET", key]),
            Resp::Bulk(value.clone().into_bytes())
        );
    }
    let mut mget = vec!["MGET", "split:missing"];
    mget.extend(keys.iter().map(String::as_str));
    mget.push(&keys[0]);
    let reply = parse(client.call(&mget).await.as_bytes());
    let mut expected = vec![Resp::Null];
    expected.extend(values.iter().map(|v| Resp::Bulk(v.clone().into_bytes())));
    expected.push(Resp::Bulk(b"v0".to_vec()));
    assert_eq!(reply, Resp::Array(expected));

    let mut exists = vec!["EXISTS"];
    exists.extend(keys.iter().map(String::as_str));
    exists.push(&keys[1]);
    exists.push("split:missing");
    assert_eq!(
        client.call(&exists).await,
        format!(":{}\r\n", keys.len() + 1)
    );
    let mut touch = vec!["TOUCH"];
    touch.extend(keys[..5].iter().map(String::as_str));
    assert_eq!(client.call(&touch).await, ":5\r\n");
    let mut unlink = vec!["UNLINK", "split:missing"];
    unlink.extend(keys[..4].iter().map(String::as_str));
    assert_eq!(client.call(&unlink).await, ":4\r\n");
    let mut del = vec!["DEL"];
    del.extend(keys.iter().map(String::as_str));
    assert_eq!(client.call(&del).await, format!(":{}\r\n", keys.len() - 4));
    for key in &keys {
        assert_eq!(
            at_owner(&cluster, key).query(&["EXISTS", key]),
            Resp::Int(0)
        );
    }
    // A split request among others keeps its place.
    let mut out = cmd(&["SET", "split:a", "1"]);
    out.extend(cmd(&["MGET", "split:a", "split:b", "split:c"]));
    out.extend(cmd(&["MSET", "split:b", "2", "split:c", "3"]));
    out.extend(cmd(&["MGET", "split:a", "split:b", "split:c"]));
    out.extend(cmd(&["DEL", "split:a", "split:b", "split:c", "split:d"]));
    let replies = client.pipeline(&out, 5).await;
    let replies: Vec<String> = replies
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(
        replies,
        [
            "+OK\r\n",
            "*3\r\n$1\r\n1\r\n$-1\r\n$-1\r\n",
            "+OK\r\n",
            "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n",
            ":3\r\n",
        ]
    );
}

/// A split over more slots than a node's channel and relay hold messages (20,000 keys, some
/// 12,000 slots, eight times over): each node gets one message per split, so nothing is
/// refused as if a node were down.
#[tokio::test]
async fn splits_over_thousands_of_slots_go_to_each_master_as_one_message() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let keys = keys("wide", 20_000);
    let mut mset = vec!["MSET"];
    for key in &keys {
        mset.extend([key.as_str(), key.as_str()]);
    }
    assert_eq!(client.call(&mset).await, "+OK\r\n");
    let mut exists = vec!["EXISTS"];
    exists.extend(keys.iter().map(String::as_str));
    let mut out = Vec::new();
    for _ in 0..8 {
        out.extend(cmd(&exists));
    }
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    out.extend(cmd(&mget));
    let replies = client.pipeline(&out, 9).await;
    for reply in &replies[..8] {
        assert_eq!(String::from_utf8_lossy(reply), ":20000\r\n");
    }
    let values = keys.iter().map(|k| Resp::Bulk(k.clone().into_bytes()));
    assert_eq!(parse(&replies[8]), Resp::Array(values.collect()));
    let mut del = vec!["DEL"];
    del.extend(keys.iter().map(String::as_str));
    assert_eq!(client.call(&del).await, ":20000\r\n");
}

/// A split's parts for one master go as one message: when one of them is redirected (`-ASK`
/// while its slot migrates, `-MOVED` once it has moved and redmux's map is stale), that part
/// alone follows the redirect, and the replies are still merged in the order of the keys.
#[tokio::test]
async fn a_redirected_part_of_a_split_is_followed_alone() {
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let masters = cluster.masters();
    let (m, n, p) = (masters[0], masters[1], masters[2]);
    let moving = name_on(&cluster, m, "parts", &[]);
    let staying = name_on(&cluster, m, "parts", &[slot(moving.as_bytes())]);
    let elsewhere = name_on(&cluster, n, "parts", &[]);
    let sm = slot(moving.as_bytes());
    let mut client = redmux.raw().await;
    let keys = [&moving, &staying, &elsewhere];
    let mset = |value: &str| -> Vec<String> {
        let pairs = keys.map(|key| [key.clone(), format!("{value}:{key}")]);
        std::iter::once("MSET".to_owned())
            .chain(pairs.into_iter().flatten())
            .collect()
    };
    let mget = ["MGET", &moving, &staying, &elsewhere];
    let values = |value: &str| {
        let values = keys.map(|key| Resp::Bulk(format!("{value}:{key}").into_bytes()));
        Resp::Array(values.to_vec())
    };
    let first = mset("first");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    assert_eq!(client.call(&first).await, "+OK\r\n");
    // The slot migrating from m to p, its key moved: m answers that part -ASK.
    start_move(sm, m, p);
    migrate((m, p), &moving);
    assert_eq!(parse(client.call(&mget).await.as_bytes()), values("first"));
    let second = mset("second");
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    assert_eq!(client.call(&second).await, "+OK\r\n");
    // The slot moved: m answers that part -MOVED, until redmux reads the new map.
    let p_id = support::cluster::node_id(p);
    for port in [p, m, n] {
        set_owner(port, sm, &p_id);
    }
    // The part written while the slot migrated went to p, after ASKING.
    assert_eq!(
        Conn::connect(p).query(&["GET", &moving]),
        Resp::Bulk(format!("second:{moving}").into_bytes())
    );
    assert_eq!(parse(client.call(&mget).await.as_bytes()), values("second"));
    let mut del = vec!["DEL"];
    del.extend([moving.as_str(), staying.as_str(), elsewhere.as_str()]);
    assert_eq!(client.call(&del).await, ":3\r\n");
    cluster.wait_agreed();
}

#[tokio::test]
async fn other_commands_across_slots_get_crossslot_and_hash_tags_work() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    assert_ne!(slot(b"cross:a"), slot(b"cross:b"));
    let refused_by_nodes = crossslot_errors(&cluster);
    let blocking = [
        &["BLPOP", "cross:a", "cross:b", "1"][..],
        &["BRPOPLPUSH", "cross:a", "cross:b", "1"],
        &["BLMOVE", "cross:a", "cross:b", "LEFT", "LEFT", "1"],
        &["BZPOPMIN", "cross:a", "cross:b", "1"],
        &["BLMPOP", "1", "2", "cross:a", "cross:b", "LEFT"],
    ];
    let others = [
        &["SUNIONSTORE", "cross:a", "cross:b"][..],
        &["RENAME", "cross:a", "cross:b"],
        &["MSETNX", "cross:a", "1", "cross:b", "2"],
        &["EVAL", "return 1", "2", "cross:a", "cross:b"],
    ];
    for _ in 0..4 {
        for args in others.iter().chain(&blocking) {
            assert_eq!(client.call(args).await, crossslot, "{args:?}");
        }
    }
    // Refused in redmux: the nodes refused none of the 36 (other tests may send them a few).
    let reached = crossslot_errors(&cluster) - refused_by_nodes;
    assert!(
        reached < 20,
        "{reached} cross-slot commands reached the nodes"
    );
    // Nothing reached Redis.
    for key in ["cross:a", "cross:b"] {
        assert_eq!(
            at_owner(&cluster, key).query(&["EXISTS", key]),
            Resp::Int(0)
        );
    }
    // The same slot, by hash tag.
    assert_eq!(client.call(&["SADD", "{cross}a", "x", "y"]).await, ":2\r\n");
    assert_eq!(client.call(&["SADD", "{cross}b", "y", "z"]).await, ":2\r\n");
    assert_eq!(
        client
            .call(&["SINTERSTORE", "{cross}c", "{cross}a", "{cross}b"])
            .await,
        ":1\r\n"
    );
    assert_eq!(
        client
            .call(&["MSETNX", "{cross}d", "1", "{cross}e", "2"])
            .await,
        ":1\r\n"
    );
    assert_eq!(
        client
            .call(&[
                "EVAL",
                "return redis.call('GET', KEYS[2])",
                "2",
                "{cross}d",
                "{cross}e"
            ])
            .await,
        "$1\r\n2\r\n"
    );
    assert_eq!(
        at_owner(&cluster, "{cross}c").query(&["SMEMBERS", "{cross}c"]),
        Resp::Array(vec![Resp::Bulk(b"y".to_vec())])
    );
}

#[tokio::test]
async fn cluster_keyslot_is_local_select_and_other_cluster_commands_are_refused() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    assert_eq!(
        client.call(&["CLUSTER", "KEYSLOT", "foo"]).await,
        ":12182\r\n"
    );
    assert!(client
        .call(&["CLUSTER", "NODES"])
        .await
        .starts_with("-ERR redmux: CLUSTER NODES is not supported"));
    assert_eq!(client.call(&["SELECT", "0"]).await, "+OK\r\n");
    assert_eq!(
        client.call(&["SELECT", "1"]).await,
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
}

/// The tests that touch the whole keyspace have a cluster of their own.
#[tokio::test]
async fn whole_keyspace_commands_cover_every_master() {
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let keys = keys("space", 300);
    let mut out = Vec::new();
    for key in &keys {
        out.extend(cmd(&["SET", key, "1"]));
    }
    client.pipeline(&out, keys.len()).await;
    let per_master: Vec<i64> = cluster
        .masters()
        .into_iter()
        .map(|port| Conn::connect(port).query(&["DBSIZE"]).int())
        .collect();
    assert!(per_master.iter().all(|&n| n > 0), "{per_master:?}");
    assert_eq!(
        client.call(&["DBSIZE"]).await,
        format!(":{}\r\n", keys.len())
    );

    let all: BTreeSet<String> = keys.iter().cloned().collect();
    let listed = parse(client.call(&["KEYS", "space:*"]).await.as_bytes());
    let listed: BTreeSet<String> = listed.items().iter().map(Resp::text).collect();
    assert_eq!(listed, all);

    // A full SCAN returns every key at least once, whatever COUNT.
    for count in ["3", "1000"] {
        let mut cursor = "0".to_owned();
        let mut seen = BTreeSet::new();
        let mut rounds = 0;
        loop {
            let reply = parse(
                client
                    .call(&["SCAN", &cursor, "MATCH", "space:*", "COUNT", count])
                    .await
                    .as_bytes(),
            );
            let [next, batch] = reply.items() else {
                panic!("SCAN reply {reply:?}");
            };
            seen.extend(batch.items().iter().map(Resp::text));
            cursor = next.text();
            rounds += 1;
            assert!(rounds < 10_000, "SCAN ends");
            if cursor == "0" {
                break;
            }
        }
        assert_eq!(seen, all, "SCAN COUNT {count}");
    }
    assert_eq!(
        client.call(&["SCAN", "99999999999999999999"]).await,
        "-ERR invalid cursor\r\n"
    );
    // Read as Redis's strtoul reads a cursor: -1 is 2^64-1, which names no master; +0 is 0.
    assert_eq!(
        client.call(&["SCAN", "-1"]).await,
        "-ERR invalid cursor\r\n"
    );
    let first = client.call(&["SCAN", "+0", "COUNT", "1000"]).await;
    assert!(first.starts_with("*2\r\n"), "{first}");
    let random = client.call(&["RANDOMKEY"]).await;
    assert!(random.contains("space:"), "{random}");

    // Scripts and functions are loaded on every master, so EVALSHA works for any key.
    let sha = parse(
        client
            .call(&["SCRIPT", "LOAD", "return redis.call('GET', KEYS[1])"])
            .await
            .as_bytes(),
    )
    .text();
    for key in &keys[..20] {
        assert_eq!(
            client.call(&["EVALSHA", &sha, "1", key]).await,
            "$1\r\n1\r\n"
        );
    }
    let exists = parse(
        client
            .call(&["SCRIPT", "EXISTS", &sha, "nope"])
            .await
            .as_bytes(),
    );
    assert_eq!(exists, Resp::Array(vec![Resp::Int(1), Resp::Int(0)]));
    let library = "#!lua name=redmuxlib\nredis.register_function('redmux_get', function(keys) return redis.call('GET', keys[1]) end)";
    assert_eq!(
        client.call(&["FUNCTION", "LOAD", library]).await,
        "$9\r\nredmuxlib\r\n"
    );
    for key in &keys[..20] {
        assert_eq!(
            client.call(&["FCALL", "redmux_get", "1", key]).await,
            "$1\r\n1\r\n"
        );
    }
    assert_eq!(
        client.call(&["FUNCTION", "DELETE", "redmuxlib"]).await,
        "+OK\r\n"
    );
    assert!(client
        .call(&["FCALL", "redmux_get", "1", &keys[0]])
        .await
        .starts_with("-ERR"));
    assert_eq!(client.call(&["SCRIPT", "FLUSH"]).await, "+OK\r\n");
    assert!(client
        .call(&["EVALSHA", &sha, "1", &keys[0]])
        .await
        .starts_with("-NOSCRIPT"));

    assert_eq!(client.call(&["FLUSHALL"]).await, "+OK\r\n");
    for port in cluster.masters() {
        assert_eq!(Conn::connect(port).query(&["DBSIZE"]), Resp::Int(0));
    }
    assert_eq!(client.call(&["DBSIZE"]).await, ":0\r\n");
    assert_eq!(client.call(&["RANDOMKEY"]).await, "$-1\r\n");
    client.call(&["SET", "space:again", "1"]).await;
    assert_eq!(client.call(&["FLUSHDB"]).await, "+OK\r\n");
    assert_eq!(client.call(&["DBSIZE"]).await, ":0\r\n");
}

/// A key on a master other than `key`'s.
fn elsewhere(cluster: &Cluster, key: &str, prefix: &str) -> String {
    let owner = owner(cluster, key);
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .find(|other| self::owner(cluster, other) != owner)
        .expect("a key on another master")
}

/// A key in another slot of `key`'s master.
fn beside(cluster: &Cluster, key: &str, prefix: &str) -> String {
    let owner = owner(cluster, key);
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .find(|other| {
            slot(other.as_bytes()) != slot(key.as_bytes()) && self::owner(cluster, other) == owner
        })
        .expect("a key on the same master")
}

#[tokio::test]
async fn transactions_run_on_the_master_of_their_first_key() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    for key in keys("tx", 6) {
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(client.call(&["PING"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["SET", &key, "5"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["INCR", &key]).await, "+QUEUED\r\n");
        assert_eq!(
            client.call(&["EXEC"]).await,
            "*3\r\n+PONG\r\n+OK\r\n:6\r\n",
            "{key}"
        );
        assert_eq!(
            at_owner(&cluster, &key).query(&["GET", &key]),
            Resp::Bulk(b"6".to_vec())
        );
    }
    // Pipelined, and keyless only.
    let mut out = cmd(&["MULTI"]);
    out.extend(cmd(&["SET", "tx:p", "1"]));
    out.extend(cmd(&["GET", "tx:p"]));
    out.extend(cmd(&["EXEC"]));
    out.extend(cmd(&["MULTI"]));
    out.extend(cmd(&["PING"]));
    out.extend(cmd(&["EXEC"]));
    out.extend(cmd(&["MULTI"]));
    out.extend(cmd(&["DISCARD"]));
    out.extend(cmd(&["GET", "tx:p"]));
    let replies: Vec<String> = client
        .pipeline(&out, 10)
        .await
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(
        replies,
        [
            "+OK\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "*2\r\n+OK\r\n$1\r\n1\r\n",
            "+OK\r\n",
            "+QUEUED\r\n",
            "*1\r\n+PONG\r\n",
            "+OK\r\n",
            "+OK\r\n",
            "$1\r\n1\r\n",
        ]
    );
}

/// A transaction that queues keyless commands past what redmux holds for it (64 KiB) goes to
/// a master then, as if it had ended, so that redmux's memory does not grow with what one
/// client queues: a master has it before EXEC, and EXEC runs every command, in order. A key
/// queued after that is one of that master's or a key across slots.
#[tokio::test]
async fn a_long_keyless_transaction_is_not_held_in_redmux() {
    const QUEUED: usize = 10_000;
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let mut out = cmd(&["MULTI"]);
    for i in 0..QUEUED {
        out.extend(cmd(&["ECHO", &i.to_string()]));
    }
    let replies = client.pipeline(&out, QUEUED + 1).await;
    assert_eq!(replies.len(), QUEUED + 1);
    assert_eq!(replies[0], b"+OK\r\n");
    assert!(replies[1..].iter().all(|r| r == b"+QUEUED\r\n"));
    let queued_on_masters: i64 = cluster
        .masters()
        .into_iter()
        .map(|port| {
            let Resp::Bulk(list) = Conn::connect(port).query(&["CLIENT", "LIST"]) else {
                panic!("CLIENT LIST of {port}");
            };
            String::from_utf8_lossy(&list)
                .split_whitespace()
                .filter_map(|field| field.strip_prefix("multi="))
                .filter_map(|n| n.parse::<i64>().ok())
                .filter(|&n| n > 0)
                .sum::<i64>()
        })
        .sum();
    assert!(
        queued_on_masters > 0,
        "the transaction is on a master before EXEC"
    );
    let mut expected = format!("*{QUEUED}\r\n");
    for i in 0..QUEUED {
        let i = i.to_string();
        expected.push_str(&format!("${}\r\n{i}\r\n", i.len()));
    }
    assert_eq!(client.call(&["EXEC"]).await, expected);
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
    // The transaction's first key comes after that: it runs if that key is on the master the
    // transaction went to, and is refused as one across slots if not.
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    let mut ran = std::collections::BTreeSet::new();
    for key in keys("held", 6) {
        let mut out = cmd(&["MULTI"]);
        for i in 0..QUEUED {
            out.extend(cmd(&["ECHO", &i.to_string()]));
        }
        out.extend(cmd(&["SET", &key, "1"]));
        out.extend(cmd(&["EXEC"]));
        let replies = client.pipeline(&out, QUEUED + 3).await;
        let (set, exec) = (&replies[QUEUED + 1], &replies[QUEUED + 2]);
        if set == b"+QUEUED\r\n" {
            // Its master is the one the transaction went to.
            assert!(exec.starts_with(format!("*{}\r\n", QUEUED + 1).as_bytes()));
            ran.insert(key.clone());
        } else {
            // Another master's key, as a transaction across slots.
            assert_eq!(set, crossslot.as_bytes(), "{key}");
            assert_eq!(
                exec,
                b"-EXECABORT Transaction discarded because of previous errors.\r\n"
            );
        }
        let exists = i64::from(ran.contains(&key));
        assert_eq!(
            at_owner(&cluster, &key).query(&["EXISTS", &key]),
            Resp::Int(exists)
        );
    }
    assert!(!ran.is_empty() && ran.len() < 6, "{ran:?}");
}

#[tokio::test]
async fn a_transaction_across_slots_is_aborted_as_redis_cluster_does() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    let first = "txx:first".to_owned();
    for other in [
        elsewhere(&cluster, &first, "txx:other"),
        beside(&cluster, &first, "txx:beside"),
    ] {
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(client.call(&["SET", &first, "1"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["SET", &other, "1"]).await, crossslot);
        assert_eq!(
            client.call(&["EXEC"]).await,
            "-EXECABORT Transaction discarded because of previous errors.\r\n"
        );
        for key in [&first, &other] {
            assert_eq!(
                at_owner(&cluster, key).query(&["EXISTS", key]),
                Resp::Int(0)
            );
        }
    }
    // One command whose own keys span slots, queued first or after the first key.
    let other = elsewhere(&cluster, &first, "txx:own");
    for (before, after) in [(false, true), (true, false)] {
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        if before {
            assert_eq!(client.call(&["SET", &first, "1"]).await, "+QUEUED\r\n");
        }
        let across = ["SUNIONSTORE", &first, &other];
        assert_eq!(client.call(&across).await, crossslot);
        if after {
            assert_eq!(client.call(&["SET", &first, "1"]).await, "+QUEUED\r\n");
        }
        assert_eq!(
            client.call(&["EXEC"]).await,
            "-EXECABORT Transaction discarded because of previous errors.\r\n"
        );
        assert_eq!(
            at_owner(&cluster, &first).query(&["EXISTS", &first]),
            Resp::Int(0)
        );
    }
    assert_eq!(client.call(&["SET", &first, "ok"]).await, "+OK\r\n");
}

/// A transaction runs on one master: a command redmux runs on every master would cover a part
/// of the keyspace there and say nothing of it (SCAN would even give that master's own
/// cursor, and end the walk early). Refused in MULTI, which EXEC then aborts, and while
/// watching. (Nothing destructive here: the cluster is shared by the tests.)
#[tokio::test]
async fn commands_for_every_master_are_refused_in_a_transaction() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let refused = |name: &str| {
        format!(
            "-ERR redmux: '{name}' runs on every master of the cluster, and a transaction \
             (MULTI, WATCH) on one\r\n"
        )
    };
    let execabort = "-EXECABORT Transaction discarded because of previous errors.\r\n";
    let key = "every:key";
    let every: [(&[&str], &str); 5] = [
        (&["DBSIZE"], "dbsize"),
        (&["keys", "every:*"], "keys"),
        (&["SCAN", "0"], "scan"),
        (&["SCRIPT", "LOAD", "return 1"], "script load"),
        (&["script", "Exists", "abc"], "script exists"),
    ];
    for (command, name) in every {
        // Before the transaction's first key, and after it.
        for keyed in [false, true] {
            assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
            if keyed {
                assert_eq!(client.call(&["SET", key, "1"]).await, "+QUEUED\r\n");
            }
            assert_eq!(client.call(command).await, refused(name));
            assert_eq!(client.call(&["EXEC"]).await, execabort);
        }
        assert_eq!(client.call(&["WATCH", key]).await, "+OK\r\n");
        assert_eq!(client.call(command).await, refused(name));
        // EXEC or DISCARD without MULTI is an error, and the client still watches.
        for stray in ["EXEC", "DISCARD"] {
            let error = format!("-ERR {stray} without MULTI\r\n");
            assert_eq!(client.call(&[stray]).await, error);
            assert_eq!(client.call(command).await, refused(name));
        }
        assert_eq!(client.call(&["UNWATCH"]).await, "+OK\r\n");
        assert!(client.call(command).await.starts_with(['*', ':', '$']));
    }
    assert_eq!(
        at_owner(&cluster, key).query(&["EXISTS", key]),
        Resp::Int(0)
    );
    // A keyed command Redis refuses as it queues it, before the transaction's first key: its
    // own error, as Redis gives it (answered `+QUEUED` here before, by the connection that
    // holds MULTI until the first key), and the keys queued after it, on whichever master,
    // `+QUEUED` as by Redis; EXEC is refused.
    for master in cluster.masters() {
        let later = name_on(&cluster, master, "every:later", &[]);
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        for (command, name) in [(&["SET", key][..], "set"), (&["get"][..], "get")] {
            assert_eq!(
                client.call(command).await,
                format!("-ERR wrong number of arguments for '{name}' command\r\n")
            );
        }
        assert_eq!(client.call(&["PING"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["SET", &later, "1"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["EXEC"]).await, execabort);
        assert_eq!(
            at_owner(&cluster, &later).query(&["EXISTS", &later]),
            Resp::Int(0)
        );
        // WATCH in MULTI gets Redis's own error, wherever its key is, and EXEC runs.
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(client.call(&["SET", key, "1"]).await, "+QUEUED\r\n");
        assert_eq!(
            client.call(&["WATCH", &later]).await,
            "-ERR WATCH inside MULTI is not allowed\r\n"
        );
        assert_eq!(client.call(&["EXEC"]).await, "*1\r\n+OK\r\n");
        assert_eq!(client.call(&["DEL", key]).await, ":1\r\n");
    }
    // Given a wrong argument count they get Redis's arity error, as Redis checks it first:
    // from redmux before the first key, from the node after it and while watching.
    let arity = |name: &str| format!("-ERR wrong number of arguments for '{name}' command\r\n");
    for keyed in [false, true] {
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        if keyed {
            assert_eq!(client.call(&["SET", key, "1"]).await, "+QUEUED\r\n");
        }
        assert_eq!(client.call(&["DBSIZE", "x"]).await, arity("dbsize"));
        assert_eq!(client.call(&["script", "load"]).await, arity("script|load"));
        assert_eq!(client.call(&["EXEC"]).await, execabort);
    }
    assert_eq!(client.call(&["WATCH", key]).await, "+OK\r\n");
    assert_eq!(client.call(&["KEYS"]).await, arity("keys"));
    assert_eq!(client.call(&["UNWATCH"]).await, "+OK\r\n");
    // RANDOMKEY is one master's anyway.
    assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(client.call(&["RANDOMKEY"]).await, "+QUEUED\r\n");
    assert!(client.call(&["EXEC"]).await.starts_with("*1\r\n"));
}

#[tokio::test]
async fn watch_pins_the_master_of_the_watched_key() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut client = redmux.raw().await;
    let mut other = redmux.raw().await;
    for key in keys("watch", 4) {
        assert_eq!(client.call(&["WATCH", &key]).await, "+OK\r\n");
        assert_eq!(client.call(&["GET", &key]).await, "$-1\r\n");
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(client.call(&["SET", &key, "mine"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["EXEC"]).await, "*1\r\n+OK\r\n");
        // Changed by another client meanwhile: EXEC runs nothing.
        assert_eq!(client.call(&["WATCH", &key]).await, "+OK\r\n");
        assert_eq!(other.call(&["SET", &key, "theirs"]).await, "+OK\r\n");
        assert_eq!(client.call(&["MULTI"]).await, "+OK\r\n");
        assert_eq!(client.call(&["SET", &key, "mine"]).await, "+QUEUED\r\n");
        assert_eq!(client.call(&["EXEC"]).await, "*-1\r\n");
        assert_eq!(
            at_owner(&cluster, &key).query(&["GET", &key]),
            Resp::Bulk(b"theirs".to_vec())
        );
        assert_eq!(client.call(&["WATCH", &key]).await, "+OK\r\n");
        assert_eq!(client.call(&["UNWATCH"]).await, "+OK\r\n");
    }
}

#[tokio::test]
async fn blocking_commands_wait_on_the_master_of_their_key() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut pusher = redmux.raw().await;
    let mut masters = BTreeSet::new();
    for key in keys("block", 8) {
        masters.insert(owner(&cluster, &key));
        let mut waiter = redmux.raw().await;
        waiter.send(cmd(&["BLPOP", &key, "10"])).await;
        // The waiter is blocked on the key's master once that master counts a blocked client.
        let port = owner(&cluster, &key);
        let deadline = support::Deadline::new();
        while !Conn::connect(port)
            .query(&["INFO", "clients"])
            .text()
            .lines()
            .any(|line| line.starts_with("blocked_clients:") && line != "blocked_clients:0")
        {
            deadline.next_try(format!("BLPOP {key} to block")).await;
        }
        assert_eq!(pusher.call(&["LPUSH", &key, "x"]).await, ":1\r\n");
        assert_eq!(
            waiter.reply_str().await,
            format!("*2\r\n${}\r\n{key}\r\n$1\r\nx\r\n", key.len())
        );
        assert_eq!(
            waiter
                .call(&["BLMPOP", "1", "2", "{b}1", "{b}2", "LEFT"])
                .await,
            "*-1\r\n"
        );
    }
    assert_eq!(masters.len(), 3);
}

/// What one writer saw of its counters: every INCR reply, in order, per key.
type Seen = Vec<Vec<Result<i64, String>>>;

/// INCR traffic through redmux while `disturb` runs: `writers` clients, each the only writer
/// of `per` counters of its own, pipelining one INCR per counter per round, until `stop`.
async fn incr_traffic(
    addr: std::net::SocketAddr,
    (prefix, writers, per): (&'static str, usize, usize),
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(Vec<String>, Seen)> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..per).map(|i| format!("{prefix}:{w}:{i}")).collect();
            let mut seen: Seen = vec![Vec::new(); per];
            let mut client = Raw::connect(addr).await;
            let mut out = Vec::new();
            for key in &keys {
                out.extend(cmd(&["INCR", key]));
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let replies = client.pipeline(&out, per).await;
                assert_eq!(replies.len(), per, "every INCR answered");
                for (at, reply) in replies.iter().enumerate() {
                    seen[at].push(match parse(reply) {
                        Resp::Int(n) => Ok(n),
                        other => Err(format!("{other:?}")),
                    });
                }
            }
            (keys, seen)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.expect("writer"));
    }
    all
}

/// Runs INCR traffic while `disturb` runs (on a thread of its own), then `after` more: 4 clients
/// pipelining 100 counters each, and 16 clients sending one INCR at a time (the router's direct
/// path).
async fn under_traffic(
    redmux: &Redmux,
    after: std::time::Duration,
    disturb: impl FnOnce() + Send + 'static,
) -> Vec<(Vec<String>, Seen)> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn(incr_traffic(redmux.addr, ("count", 4, 100), stop.clone()));
    // And clients that send one INCR at a time, which take the router's direct path.
    let single = tokio::spawn(incr_traffic(redmux.addr, ("single", 16, 1), stop.clone()));
    // Traffic is flowing before the disturbance starts.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(disturb)
        .await
        .expect("disturbance");
    tokio::time::sleep(after).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = traffic.await.expect("traffic");
    seen.extend(single.await.expect("single traffic"));
    seen
}

/// A node that stops reading (stopped here; a long script does the same) fills its channel:
/// the router's messages for it then wait beside the router, which goes on with the other
/// nodes'. It waited for room itself, and every client's pipelines to every node with it.
#[tokio::test]
async fn a_stuck_node_holds_up_only_its_own_requests() {
    // A cluster of its own: a node is stopped.
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let masters = cluster.masters();
    let (stuck, other) = (masters[0], masters[1]);
    let on = |port: u16, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|key| owner(&cluster, key) == port)
            .expect("a key on that master")
    };
    let tag = on(stuck, "tag");
    let probe = on(other, "probe");
    let mut clients = Vec::new();
    for _ in 0..192 {
        clients.push(redmux.raw().await);
    }
    let mut prober = redmux.raw().await;
    assert_eq!(prober.call(&["SET", &probe, "here"]).await, "+OK\r\n");
    // Both nodes' connections are up.
    let warm = format!("{{{tag}}}:warm");
    assert_eq!(prober.call(&["SET", &warm, "1"]).await, "+OK\r\n");

    let stopped = cluster.stop(stuck);
    // Pipelines of 1,024 requests, cut into messages of at most 64: the first megabytes fill
    // the sockets and the stuck node's actor's megabyte unwritten, the rest its channel.
    let pad = "k".repeat(200);
    let mut gets = Vec::new();
    for i in 0..1_024 {
        gets.extend(cmd(&["GET", &format!("{{{tag}}}:{pad}:{i}")]));
    }
    for client in &mut clients {
        client.send(&gets).await;
    }
    // A pipeline for another node is answered while the stuck one is still stopped.
    let mut out = Vec::new();
    for _ in 0..10 {
        out.extend(cmd(&["GET", &probe]));
    }
    let replies = tokio::time::timeout(Duration::from_millis(1_000), prober.pipeline(&out, 10))
        .await
        .expect("another node's pipeline answered while one node is stuck");
    assert!(replies.iter().all(|reply| reply == b"$4\r\nhere\r\n"));
    drop(stopped);
    // Once the node reads again, what waited for it is answered; what found its queue and
    // its relay full (if any did) was refused at once.
    let (mut answered, mut refused) = (0, 0);
    for client in &mut clients {
        let answers = client.pipeline(&[], 1_024).await;
        assert_eq!(answers.len(), 1_024);
        for answer in answers {
            match &answer[..] {
                b"$-1\r\n" => answered += 1,
                b"-ERR redmux: upstream unavailable\r\n" => refused += 1,
                other => panic!("{}", String::from_utf8_lossy(other)),
            }
        }
    }
    assert!(answered > 0, "{answered} answered, {refused} refused");
}

#[tokio::test]
async fn resharding_under_incr_traffic_is_invisible_to_clients() {
    let cluster = Arc::new(Cluster::start());
    let redmux = start(&cluster).await;
    let masters = cluster.masters();
    let (a, b, c) = (masters[0], masters[1], masters[2]);
    let before: std::collections::BTreeMap<String, u16> = (0..4)
        .flat_map(|w| (0..100).map(move |i| format!("count:{w}:{i}")))
        .map(|key| (key.clone(), owner(&cluster, &key)))
        .collect();
    let reshard = cluster.clone();
    let after = std::time::Duration::from_millis(500);
    let seen = under_traffic(&redmux, after, move || {
        reshard.reshard(a, b, 1500);
        reshard.reshard(b, c, 3000);
    })
    .await;
    let mut rounds = 0;
    for (keys, seen) in &seen {
        for (key, replies) in keys.iter().zip(seen) {
            // Every INCR ran once, in order, and none failed.
            let expected: Vec<Result<i64, String>> = (1..=replies.len() as i64).map(Ok).collect();
            assert_eq!(replies, &expected, "{key}");
            assert_eq!(
                at_owner(&cluster, key).query(&["GET", key]),
                Resp::Bulk(replies.len().to_string().into_bytes()),
                "{key} in the cluster"
            );
            rounds = rounds.max(replies.len());
        }
    }
    assert!(
        rounds > 10,
        "traffic ran during the resharding ({rounds} rounds)"
    );
    let moved = seen
        .iter()
        .flat_map(|(keys, _)| keys)
        .filter(|key| before.get(*key) != Some(&owner(&cluster, key)))
        .count();
    assert!(moved > 10, "counters moved ({moved})");
}

#[tokio::test]
async fn a_master_killed_under_incr_traffic_costs_only_what_it_had_not_replicated() {
    let cluster = Arc::new(std::sync::Mutex::new(Cluster::start()));
    let mut config = config(&cluster.lock().expect("cluster"));
    config.upstream.connect_timeout = std::time::Duration::from_millis(300);
    let redmux = Redmux::start_with(config).await;
    let victim = cluster.lock().expect("cluster").masters()[0];
    // A subscriber, whose subscriber connection goes to the first seed: the victim.
    let first_seed = cluster.lock().expect("cluster").addrs()[0].clone();
    assert_eq!(first_seed, format!("127.0.0.1:{victim}"));
    let mut subscriber = redmux.raw().await;
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "news"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    let killer = cluster.clone();
    let seen = under_traffic(&redmux, std::time::Duration::from_secs(3), move || {
        let mut cluster = killer.lock().expect("cluster");
        cluster.kill(victim);
        cluster.wait_for_failover(victim);
    })
    .await;
    let publish_at = {
        let cluster = cluster.lock().expect("cluster");
        let (mut on_victim, mut failed) = (0, 0);
        for (keys, seen) in &seen {
            for (key, replies) in keys.iter().zip(seen) {
                let value = match at_owner(&cluster, key).query(&["GET", key]) {
                    Resp::Bulk(n) => String::from_utf8(n)
                        .expect("digits")
                        .parse()
                        .expect("a count"),
                    Resp::Null => 0,
                    other => panic!("{key}: {other:?}"),
                };
                let errors = replies.iter().filter(|r| r.is_err()).count();
                if errors == 0 && replies.iter().all(|r| r.is_ok()) {
                    // Never on the killed master, or answered around it: exact.
                    let expected: Vec<Result<i64, String>> =
                        (1..=replies.len() as i64).map(Ok).collect();
                    if replies == &expected && value == replies.len() as i64 {
                        continue;
                    }
                }
                on_victim += 1;
                failed += errors;
                for reply in replies.iter().filter_map(|r| r.as_ref().err()) {
                    assert!(
                        reply.contains("redmux: upstream") || reply.contains("CLUSTERDOWN"),
                        "{key}: only the failover's own errors reach the client: {reply}"
                    );
                }
                // Between two answered INCRs, each unanswered one ran at most once: the value grew
                // by one, plus at most the unanswered ones, except once, where the replica that
                // took over had not received the last writes (Redis replicates asynchronously).
                let mut drops = 0;
                let mut last: Option<i64> = None;
                let mut unknown = 0;
                for reply in replies {
                    match reply {
                        Err(_) => unknown += 1,
                        Ok(n) => {
                            let before = last.unwrap_or(0);
                            let grew = *n - before;
                            if !(1..=1 + unknown).contains(&grew) {
                                drops += 1;
                                assert!(grew <= 0, "{key}: an INCR ran twice: {replies:?}");
                            }
                            last = Some(*n);
                            unknown = 0;
                        }
                    }
                }
                assert!(
                    drops <= 1,
                    "{key}: lost writes at one failover only: {replies:?}"
                );
                let last = last.expect("answered INCRs");
                assert!(
                (last..=last + unknown).contains(&value),
                "{key}: {value} in the cluster, {last} last answered, {unknown} unanswered after"
            );
                // After the failover every INCR is answered again.
                assert!(
                    replies.last().is_some_and(|r| r.is_ok()),
                    "{key} answered after the failover"
                );
            }
        }
        assert!(on_victim > 0 && failed > 0, "the kill hit the traffic");
        cluster.masters()[0]
    };
    // The subscriber connection moved to a node that is up: messages published anywhere
    // reach the subscriber again, with no word from it.
    let mut publisher = Conn::connect(publish_at);
    let deadline = support::Deadline::within(std::time::Duration::from_secs(20));
    loop {
        publisher.query(&["PUBLISH", "news", "after"]);
        let heard = tokio::time::timeout(std::time::Duration::from_millis(200), subscriber.reply());
        if let Ok(message) = heard.await {
            assert_eq!(
                String::from_utf8(message).unwrap(),
                "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nafter\r\n"
            );
            break;
        }
        deadline
            .next_try("messages after the first seed failed")
            .await;
    }
    // Credentials are still checked by Redis: by a master that is up.
    assert_eq!(
        redmux.raw().await.call(&["AUTH", "nobody", "x"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
}

#[tokio::test]
async fn pubsub_reaches_subscribers_and_shard_messages_their_shard() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut subscriber = redmux.raw().await;
    let mut publisher = redmux.raw().await;
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "news"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    // The cluster spreads PUBLISH to every node, whichever master redmux sends it to, and
    // whichever node a publisher of its own uses.
    // Its count is the receiving node's subscribers, as with Redis Cluster.
    for _ in 0..3 {
        let count = publisher.call(&["PUBLISH", "news", "hello"]).await;
        assert!(count == ":1\r\n" || count == ":0\r\n", "{count}");
        assert_eq!(
            subscriber.reply_str().await,
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
        );
    }
    for port in cluster.live_ports() {
        Conn::connect(port).query(&["PUBLISH", "news", "direct"]);
        assert_eq!(
            subscriber.reply_str().await,
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$6\r\ndirect\r\n"
        );
    }
    // SPUBLISH goes to the master of the channel's slot, where its subscribers are.
    for channel in keys("shard", 6) {
        let mut direct = at_owner(&cluster, &channel);
        direct.query(&["SSUBSCRIBE", &channel]);
        assert_eq!(
            publisher.call(&["SPUBLISH", &channel, "m"]).await,
            ":1\r\n",
            "{channel}"
        );
        let message = direct.next();
        assert_eq!(message.items()[2], Resp::Bulk(b"m".to_vec()));
    }
}

/// A shard channel subscription frame, as Redis sends it in RESP2.
fn shard_frame(verb: &str, channel: &str, count: usize) -> String {
    format!(
        "*3\r\n${}\r\n{verb}\r\n${}\r\n{channel}\r\n:{count}\r\n",
        verb.len(),
        channel.len()
    )
}

fn smessage(channel: &str, message: &str) -> String {
    format!(
        "*3\r\n$8\r\nsmessage\r\n${}\r\n{channel}\r\n${}\r\n{message}\r\n",
        channel.len(),
        message.len()
    )
}

/// SSUBSCRIBE goes to the master of the channel's slot, each master's channels through a
/// subscriber connection of redmux's to that master: messages SPUBLISHed there arrive,
/// whether sent through redmux or to the master directly; counts are the client's own, as
/// on a connection of its own; channels across slots get Redis Cluster's CROSSSLOT; and
/// SUNSUBSCRIBE leaves Redis subscribed to nothing.
#[tokio::test]
async fn ssubscribe_reaches_the_master_of_each_channel() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let mut subscriber = redmux.raw().await;
    let mut publisher = redmux.raw().await;
    let channels = keys("ssub", 6);
    let owners: BTreeSet<u16> = channels.iter().map(|c| owner(&cluster, c)).collect();
    assert_eq!(owners.len(), 3, "the channels spread over every master");
    for (i, channel) in channels.iter().enumerate() {
        assert_eq!(
            subscriber.call(&["SSUBSCRIBE", channel]).await,
            shard_frame("ssubscribe", channel, i + 1)
        );
    }
    assert_eq!(
        subscriber.call(&["SSUBSCRIBE", "ssub:0", "ssub:1"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    for channel in &channels {
        // Subscribed on the owner itself: it counts one subscriber, redmux's connection.
        let at = at_owner(&cluster, channel).query(&["SPUBLISH", channel, "direct"]);
        assert_eq!(at, Resp::Int(1), "{channel}");
        assert_eq!(subscriber.reply_str().await, smessage(channel, "direct"));
        assert_eq!(
            publisher.call(&["SPUBLISH", channel, "via"]).await,
            ":1\r\n"
        );
        assert_eq!(subscriber.reply_str().await, smessage(channel, "via"));
    }
    // Another client keeps every master's shard hub open.
    let mut keeper = redmux.raw().await;
    for port in cluster.masters() {
        keeper
            .call(&["SSUBSCRIBE", &name_on(&cluster, port, "ssub-kept", &[])])
            .await;
    }
    // Every channel goes, each master's in a run; the count falls to 0.
    subscriber.send(cmd(&["SUNSUBSCRIBE"])).await;
    let mut gone = BTreeSet::new();
    for left in (0..channels.len()).rev() {
        let frame = parse(&subscriber.reply().await);
        assert_eq!(frame.items()[0], Resp::Bulk(b"sunsubscribe".to_vec()));
        assert_eq!(frame.items()[2], Resp::Int(left as i64));
        gone.insert(frame.items()[1].text());
    }
    assert_eq!(gone, channels.iter().cloned().collect());
    // Out of subscribed mode, and Redis holds none of them any more: the reply waited for
    // every shard hub, which unsubscribed each slot's channels on their own (Redis Cluster
    // refuses names across slots).
    assert_eq!(subscriber.call(&["PING"]).await, "+PONG\r\n");
    for channel in &channels {
        let count = at_owner(&cluster, channel).query(&["PUBSUB", "SHARDNUMSUB", channel]);
        assert_eq!(count.items()[1], Resp::Int(0), "{channel}");
    }
    // RESP3: confirmations and messages are pushes.
    let mut resp3 = redmux.raw().await;
    resp3.call(&["HELLO", "3"]).await;
    let channel = &channels[0];
    assert_eq!(
        resp3.call(&["SSUBSCRIBE", channel]).await,
        shard_frame("ssubscribe", channel, 1).replacen('*', ">", 1)
    );
    publisher.call(&["SPUBLISH", channel, "m"]).await;
    assert_eq!(
        resp3.reply_str().await,
        smessage(channel, "m").replacen('*', ">", 1)
    );
    // Its own SPUBLISH: the message comes before the reply, as from the master directly.
    for round in 0..10 {
        let payload = format!("own{round}");
        resp3.send(cmd(&["SPUBLISH", channel, &payload])).await;
        assert_eq!(
            resp3.reply_str().await,
            smessage(channel, &payload).replacen('*', ">", 1),
            "round {round}"
        );
        assert_eq!(resp3.reply_str().await, ":1\r\n", "round {round}");
    }
}

/// When a shard channel's slot moves to another master, Redis 7 drops its subscribers with a
/// `sunsubscribe` frame; a client of redmux gets the same frame as a client of that master,
/// and subscribing again reaches the new owner. When redmux's connection to a master is lost
/// (here killed by CLIENT KILL), its clients hear each of their channels there dropped the
/// same way, and may subscribe again.
#[tokio::test]
async fn a_shard_channel_whose_slot_moves_is_dropped_as_redis_drops_it() {
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let mut subscriber = redmux.raw().await;
    let mut publisher = redmux.raw().await;
    let channel = "moving";
    let from = owner(&cluster, channel);
    let to = *cluster.masters().iter().find(|&&p| p != from).unwrap();
    // A channel on a master the kill below leaves alone.
    let kept = &keys("staying", 16)
        .into_iter()
        .find(|name| owner(&cluster, name) != to)
        .unwrap();
    let mut direct = Conn::connect(from);
    direct.query(&["SSUBSCRIBE", channel]);
    assert_eq!(
        subscriber.call(&["SSUBSCRIBE", kept]).await,
        shard_frame("ssubscribe", kept, 1)
    );
    assert_eq!(
        subscriber.call(&["SSUBSCRIBE", channel]).await,
        shard_frame("ssubscribe", channel, 2)
    );

    cluster.move_slot(slot(channel.as_bytes()), from, to);
    // Redis's frame to its own subscriber, and redmux's to its client: the same but for
    // the count, which is each client's own.
    let told = direct.next();
    assert_eq!(told.items()[0], Resp::Bulk(b"sunsubscribe".to_vec()));
    assert_eq!(told.items()[1], Resp::Bulk(channel.as_bytes().to_vec()));
    assert_eq!(
        subscriber.reply_str().await,
        shard_frame("sunsubscribe", channel, 1)
    );
    // Subscribing again reaches the new owner, once redmux has read the map that names it.
    let deadline = support::Deadline::new();
    loop {
        let reply = subscriber.call(&["SSUBSCRIBE", channel]).await;
        if reply == shard_frame("ssubscribe", channel, 2) {
            break;
        }
        assert_eq!(
            reply,
            "-ERR redmux: the shard channel's slot moved to another master; subscribe again\r\n"
        );
        deadline
            .next_try("subscribing on the slot's new master")
            .await;
    }
    assert_eq!(
        Conn::connect(to).query(&["SPUBLISH", channel, "there"]),
        Resp::Int(1)
    );
    assert_eq!(subscriber.reply_str().await, smessage(channel, "there"));
    assert_eq!(publisher.call(&["SPUBLISH", kept, "still"]).await, ":1\r\n");
    assert_eq!(subscriber.reply_str().await, smessage(kept, "still"));

    // redmux's subscriber connection to the new owner is killed.
    let killed = Conn::connect(to).query(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed, Resp::Int(1));
    assert_eq!(
        subscriber.reply_str().await,
        shard_frame("sunsubscribe", channel, 1)
    );
    assert_eq!(
        subscriber.call(&["SSUBSCRIBE", channel]).await,
        shard_frame("ssubscribe", channel, 2)
    );
    publisher.call(&["SPUBLISH", channel, "again"]).await;
    assert_eq!(subscriber.reply_str().await, smessage(channel, "again"));
    // The other master's channel was never touched.
    publisher.call(&["SPUBLISH", kept, "still"]).await;
    assert_eq!(subscriber.reply_str().await, smessage(kept, "still"));

    // A RESP3 client's own SPUBLISH runs just before its channel's slot leaves the master
    // (CLIENT PAUSE fixes the order): its reply waits for a PING on the master's shard hub,
    // whose connection then holds no subscription, so Redis answers `+PONG`, not the
    // subscribed form. The hub takes either: the reply comes at once, and other clients'
    // SSUBSCRIBEs on that master carry on.
    let m = *cluster
        .masters()
        .iter()
        .find(|&&port| port != to && port != owner(&cluster, kept))
        .unwrap();
    let x = name_on(&cluster, m, "raced", &[]);
    let sx = slot(x.as_bytes());
    let mut resp3 = redmux.raw().await;
    resp3.call(&["HELLO", "3"]).await;
    assert_eq!(
        resp3.call(&["SSUBSCRIBE", &x]).await,
        shard_frame("ssubscribe", &x, 1).replacen('*', ">", 1)
    );
    resp3.send(cmd(&["SPUBLISH", &x, "warm"])).await;
    assert_eq!(
        resp3.reply_str().await,
        smessage(&x, "warm").replacen('*', ">", 1)
    );
    assert_eq!(resp3.reply_str().await, ":1\r\n");
    let to_id = support::cluster::node_id(to);
    start_move(sx, m, to);
    pause(m, 500);
    resp3.send(cmd(&["SPUBLISH", &x, "own"])).await;
    a_moment().await;
    let mover = std::thread::spawn({
        let to_id = to_id.clone();
        move || set_owner(m, sx, &to_id)
    });
    let mut frames = BTreeSet::new();
    for _ in 0..3 {
        let frame = tokio::time::timeout(Duration::from_secs(3), resp3.reply_str())
            .await
            .expect("the own SPUBLISH's frames within 3 s");
        frames.insert(frame);
    }
    mover.join().unwrap();
    let expected = [
        smessage(&x, "own").replacen('*', ">", 1),
        ":1\r\n".to_owned(),
        shard_frame("sunsubscribe", &x, 0).replacen('*', ">", 1),
    ];
    assert_eq!(frames, expected.into_iter().collect());
    for port in cluster.masters() {
        set_owner(port, sx, &to_id);
    }
    let y = name_on(&cluster, m, "after-race", &[sx]);
    let mut other = redmux.raw().await;
    let answer = tokio::time::timeout(Duration::from_secs(3), other.call(&["SSUBSCRIBE", &y]))
        .await
        .expect("another client's SSUBSCRIBE on the same master within 3 s");
    assert_eq!(answer, shard_frame("ssubscribe", &y, 1));
    assert_eq!(
        Conn::connect(m).query(&["SPUBLISH", &y, "after"]),
        Resp::Int(1)
    );
    assert_eq!(other.reply_str().await, smessage(&y, "after"));
    cluster.wait_agreed();
}

/// A cluster that speaks TLS (its plaintext ports left open, as during a move to TLS) and
/// logs redmux in as an ACL user of its own. Given one seed, redmux finds the other masters
/// itself, and reaches each on its TLS port (SHARDS names both ports), logged in as that user.
#[tokio::test]
async fn tls_and_the_login_apply_to_every_node() {
    let certs = support::tls::Certs::new();
    let cluster = Cluster::start_tls(
        &certs,
        &["--user", "proxy", "on", ">pw", "~*", "&*", "+@all"],
    );
    let mut config = Config::default();
    let seed = cluster.tls_ports()[0];
    config.upstream.cluster = vec![format!("rediss://127.0.0.1:{seed}").parse().unwrap()];
    config.upstream.tls = Some(certs.upstream_tls(false));
    config.upstream.username = Some("proxy".into());
    config.upstream.password = Some(redmux::config::Secret::new("pw"));
    let redmux = Redmux::start_with(config).await;
    let mut client = redmux.raw().await;
    let keys = keys("tls", 30);
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(client.call(&["SET", key, &i.to_string()]).await, "+OK\r\n");
    }
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let reply = client.call(&mget).await;
    let expected: String = (0..keys.len())
        .map(|i| format!("${}\r\n{i}\r\n", i.to_string().len()))
        .collect();
    assert_eq!(reply, format!("*{}\r\n{expected}", keys.len()));
    assert_eq!(client.call(&["DBSIZE"]).await, ":30\r\n");
    // Every master has redmux's connections, each on its TLS port, each logged in as proxy.
    let tls_of: std::collections::HashMap<String, u16> = cluster
        .addrs()
        .into_iter()
        .zip(cluster.tls_ports())
        .collect();
    for port in cluster.masters() {
        let tls_port = tls_of[&format!("127.0.0.1:{port}")];
        let list = Conn::connect(port).query(&["CLIENT", "LIST"]).text();
        let ours: Vec<&str> = list
            .lines()
            .filter(|line| line.contains(" user=proxy "))
            .collect();
        assert!(
            !ours.is_empty(),
            "no connection of redmux on {port}:\n{list}"
        );
        for line in ours {
            assert!(
                line.contains(&format!(" laddr=127.0.0.1:{tls_port} ")),
                "not on the TLS port {tls_port}: {line}"
            );
        }
    }
}

/// `/status` shows the slot map (its masters in slot order, no unassigned slot) and the node
/// each upstream connection goes to; `/metrics` has a series per node, labelled `host:port`,
/// and counts the shard channels of every master's shard hub.
#[tokio::test]
async fn status_and_metrics_show_the_map_and_each_node() {
    let cluster = shared();
    let mut config = config(&cluster);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let redmux = Redmux::start_with(config).await;
    let admin = redmux.metrics.expect("the admin endpoint is bound");
    let mut client = redmux.raw().await;
    for key in keys("observed", 12) {
        assert_eq!(client.call(&["SET", &key, "v"]).await, "+OK\r\n");
    }
    let mut subscriber = redmux.raw().await;
    subscriber.call(&["SSUBSCRIBE", "observed:0"]).await;
    subscriber.call(&["SSUBSCRIBE", "observed:1"]).await;

    let status: serde_json::Value =
        serde_json::from_str(&support::http_get(admin, "/status").await).unwrap();
    let map = &status["cluster"];
    let masters: BTreeSet<String> = map["masters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = cluster
        .masters()
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    assert_eq!(masters, expected, "{map}");
    assert_eq!(map["unassigned_slots"], 0, "{map}");
    // The client waited for each reply: its SETs went past the router, straight to their
    // master, but for the first to each master, which starts that master's connection.
    assert!(map["direct_requests"].as_u64().unwrap() >= 9, "{map}");
    let nodes: BTreeSet<String> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|actor| actor["node"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(nodes, expected, "every master has a connection");

    let metrics = support::http_get(admin, "/metrics").await;
    for node in &expected {
        let series = format!("redmux_cluster_node_connections{{node=\"{node}\"}} ");
        let line = metrics.lines().find(|line| line.starts_with(&series));
        let open: u64 = line
            .and_then(|line| line[series.len()..].parse().ok())
            .unwrap_or_else(|| panic!("{series} in {metrics}"));
        assert!(open >= 1, "{series}{open}");
        let series = format!("redmux_cluster_node_in_flight_requests{{node=\"{node}\"}} 0");
        assert!(metrics.contains(&series), "{series}");
    }
    assert!(
        metrics.contains("redmux_pubsub_subscriptions{kind=\"shard\"} 2"),
        "{metrics}"
    );
}

/// A name of `prefix` on master `port`, in none of `slots`.
fn name_on(cluster: &Cluster, port: u16, prefix: &str, slots: &[u16]) -> String {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .find(|name| !slots.contains(&slot(name.as_bytes())) && owner(cluster, name) == port)
        .unwrap()
}

/// Holds every client command on node `port` for `ms` milliseconds (CLIENT PAUSE ALL): the
/// commands that reach it meanwhile run, in the order they came, when the pause ends.
fn pause(port: u16, ms: u64) {
    let reply = Conn::connect(port).query(&["CLIENT", "PAUSE", &ms.to_string(), "ALL"]);
    assert_eq!(reply, Resp::Simple("OK".into()));
}

/// Time for a request to reach a paused node: nothing can be asked of it to know.
async fn a_moment() {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Slot moves that race a shard hub's own requests: each answer stays with its request, and a
/// client's frames keep Redis's order. CLIENT PAUSE holds one master's commands, so the order
/// in which Redis runs them is fixed; while it holds them nothing can be asked of it, so the
/// test leaves each request a moment to reach it before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_answers_stay_with_their_requests_while_slots_move() {
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let masters = cluster.masters();
    let (m, n, p) = (masters[0], masters[1], masters[2]);

    // The move of x's slot reaches Redis between the hub's SUNSUBSCRIBE x and its SSUBSCRIBE
    // y: Redis drops x unasked, answers the SUNSUBSCRIBE with -MOVED, and subscribes y.
    let x = name_on(&cluster, m, "racing", &[]);
    let y = name_on(&cluster, m, "calm", &[slot(x.as_bytes())]);
    let k = name_on(
        &cluster,
        m,
        "kept",
        &[slot(x.as_bytes()), slot(y.as_bytes())],
    );
    let (mut keeper, mut a, mut b) = (redmux.raw().await, redmux.raw().await, redmux.raw().await);
    keeper.call(&["SSUBSCRIBE", &k]).await;
    a.call(&["SSUBSCRIBE", &x]).await;
    let sx = slot(x.as_bytes());
    start_move(sx, m, n);
    pause(m, 1000);
    let n_id = support::cluster::node_id(n);
    let mover = std::thread::spawn({
        let n_id = n_id.clone();
        move || set_owner(m, sx, &n_id)
    });
    a_moment().await;
    a.send(cmd(&["SUNSUBSCRIBE", &x])).await;
    a_moment().await;
    b.send(cmd(&["SSUBSCRIBE", &y])).await;
    // Another client's SSUBSCRIBE in x's slot is refused (-MOVED): what it pipelined after,
    // on another master's hub, counts as if it never ran.
    let (moved, w) = (format!("{{{x}}}d"), name_on(&cluster, n, "elsewhere", &[]));
    let mut d = redmux.raw().await;
    let mut pipeline = cmd(&["SSUBSCRIBE", &moved]);
    for args in [&["SSUBSCRIBE", &w][..], &["SUNSUBSCRIBE"], &["PING"]] {
        pipeline.extend(cmd(args));
    }
    a_moment().await;
    d.send(&pipeline).await;
    mover.join().unwrap();
    set_owner(n, sx, &n_id);
    set_owner(p, sx, &n_id);
    cluster.wait_agreed();
    assert_eq!(a.reply_str().await, shard_frame("sunsubscribe", &x, 0));
    assert_eq!(b.reply_str().await, shard_frame("ssubscribe", &y, 1));
    assert_eq!(Conn::connect(m).query(&["SPUBLISH", &y, "m"]), Resp::Int(1));
    assert_eq!(b.reply_str().await, smessage(&y, "m"));
    assert_eq!(
        d.reply_str().await,
        "-ERR redmux: the shard channel's slot moved to another master; subscribe again\r\n"
    );
    assert_eq!(d.reply_str().await, shard_frame("ssubscribe", &w, 1));
    assert_eq!(d.reply_str().await, shard_frame("sunsubscribe", &w, 0));
    assert_eq!(d.reply_str().await, "+PONG\r\n");

    // A client waits for its SSUBSCRIBE on m (paused) while its next one, on n, is done: a
    // message on n's channel, then the channel's slot leaving n, come after both
    // confirmations, as on a connection of its own.
    let y2 = name_on(&cluster, m, "slow", &[]);
    let x2 = name_on(&cluster, n, "quick", &[]);
    let mut c = redmux.raw().await;
    pause(m, 1500);
    let mut pipeline = cmd(&["SSUBSCRIBE", &y2]);
    pipeline.extend(cmd(&["SSUBSCRIBE", &x2]));
    c.send(&pipeline).await;
    let at_n = || {
        Conn::connect(n)
            .query(&["PUBSUB", "SHARDNUMSUB", &x2])
            .items()[1]
            .int()
    };
    let deadline = support::Deadline::new();
    while at_n() != 1 {
        deadline.next_try("x2 subscribed on n").await;
    }
    assert_eq!(
        Conn::connect(n).query(&["SPUBLISH", &x2, "early"]),
        Resp::Int(1)
    );
    let sx2 = slot(x2.as_bytes());
    start_move(sx2, n, p);
    let p_id = support::cluster::node_id(p);
    set_owner(p, sx2, &p_id);
    set_owner(n, sx2, &p_id);
    assert_eq!(c.reply_str().await, shard_frame("ssubscribe", &y2, 1));
    assert_eq!(c.reply_str().await, shard_frame("ssubscribe", &x2, 2));
    assert_eq!(c.reply_str().await, smessage(&x2, "early"));
    assert_eq!(c.reply_str().await, shard_frame("sunsubscribe", &x2, 1));
    let mover = std::thread::spawn(move || set_owner(m, sx2, &p_id));
    mover.join().unwrap();
    cluster.wait_agreed();
}

/// A client's requests for one slot, queued on its old master when the slot moves, are resent
/// to the new one in the order the client sent them, whether redmux split them (a MGET across
/// slots) or passed them on whole (a SET, whose reply would have gone straight to the client):
/// both come back from the old master -MOVED, in order, on one way back to the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_redirected_together_are_resent_in_their_order() {
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let masters = cluster.masters();
    let (m, n, p) = (masters[0], masters[1], masters[2]);
    let k = name_on(&cluster, m, "ordered", &[]);
    let other = name_on(&cluster, n, "beside", &[]);
    let sk = slot(k.as_bytes());
    let mut client = redmux.raw().await;
    assert_eq!(client.call(&["SET", &other, "o"]).await, "+OK\r\n");
    // n takes the slot first, so that what m sends on is run there; m learns last, while
    // the client's requests wait behind its pause.
    let n_id = support::cluster::node_id(n);
    start_move(sk, m, n);
    set_owner(n, sk, &n_id);
    pause(m, 1000);
    let mover = std::thread::spawn({
        let n_id = n_id.clone();
        move || set_owner(m, sk, &n_id)
    });
    a_moment().await;
    client.send(cmd(&["MGET", &k, &other])).await;
    a_moment().await;
    client.send(cmd(&["SET", &k, "new"])).await;
    mover.join().unwrap();
    // The MGET ran before the SET: k had no value yet.
    assert_eq!(client.reply_str().await, "*2\r\n$-1\r\n$1\r\no\r\n");
    assert_eq!(client.reply_str().await, "+OK\r\n");
    assert_eq!(
        Conn::connect(n).query(&["GET", &k]),
        Resp::Bulk(b"new".to_vec())
    );
    set_owner(p, sk, &n_id);
    cluster.wait_agreed();
}

/// Holds every write command on node `port` for `ms` milliseconds (CLIENT PAUSE WRITE): the
/// connection that sent one waits behind it, other connections are served.
fn pause_writes(port: u16, ms: u64) {
    let reply = Conn::connect(port).query(&["CLIENT", "PAUSE", &ms.to_string(), "WRITE"]);
    assert_eq!(reply, Resp::Simple("OK".into()));
}

/// Both of the client's SETs of `key` (`1`, then `2`) are answered OK, in order, and the
/// second is what master `node` holds: it ran last, there.
async fn both_set_and_second_on(client: &mut Raw, node: u16, key: &str) {
    assert_eq!(client.reply_str().await, "+OK\r\n");
    assert_eq!(client.reply_str().await, "+OK\r\n");
    assert_eq!(
        Conn::connect(node).query(&["GET", key]),
        Resp::Bulk(b"2".to_vec())
    );
}

/// Moves key `key` from master `from` to master `to` (`MIGRATE`, its slot migrating).
fn migrate((from, to): (u16, u16), key: &str) {
    let port = to.to_string();
    let args = ["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key];
    assert_eq!(Conn::connect(from).query(&args), Resp::Simple("OK".into()));
}

/// Two keys `a` and `b` of one slot on master `m` (named after `prefix`), the slot migrating
/// to `n` with only `b` moved, and `client`'s `MSET a 1 b 1` sent: `m` has answered it
/// `-TRYAGAIN` once, and redmux tries it again until the move ends. Gives the keys.
async fn mset_tried_again(
    cluster: &Cluster,
    client: &mut Raw,
    (m, n): (u16, u16),
    prefix: &str,
) -> (String, String) {
    let tag = name_on(cluster, m, prefix, &[]);
    let (a, b) = (format!("{{{tag}}}a"), format!("{{{tag}}}b"));
    for key in [&a, &b] {
        assert_eq!(client.call(&["SET", key, "0"]).await, "+OK\r\n");
    }
    start_move(slot(a.as_bytes()), m, n);
    migrate((m, n), &b);
    let before = tryagains(m);
    client.send(cmd(&["MSET", &a, "1", &b, "1"])).await;
    let deadline = support::Deadline::new();
    while tryagains(m) == before {
        deadline.next_try_blocking("m answers -TRYAGAIN");
    }
    (a, b)
}

/// How many times node `port` answered `-TRYAGAIN`.
fn tryagains(port: u16) -> u64 {
    errors_given(port, "TRYAGAIN")
}

/// How many errors with this code node `port` has given since it started.
fn errors_given(port: u16, code: &str) -> u64 {
    let info = Conn::connect(port).query(&["INFO", "errorstats"]).text();
    let field = format!("errorstat_{code}:count=");
    info.lines()
        .find_map(|line| line.strip_prefix(field.as_str()))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// The slot map changes redmux has read, from its `/status`.
async fn map_changes(admin: std::net::SocketAddr) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&support::http_get(admin, "/status").await).unwrap();
    status["cluster"]["map_changes"].as_u64().unwrap()
}

/// Moves `key`'s slot (holding no key) from master `from` to master `to` (the masters
/// `masters` told in that order: `to` first, `from` next), and waits until redmux has read the
/// new map: `probe`, a RESP3 client (a shared connection of its own), asks for a key of that
/// slot and meets `-MOVED`.
async fn move_and_read(
    probe: &mut Raw,
    admin: std::net::SocketAddr,
    masters: &[u16],
    key: &str,
    (from, to): (u16, u16),
) {
    let changes = map_changes(admin).await;
    let moved = slot(key.as_bytes());
    start_move(moved, from, to);
    let id = support::cluster::node_id(to);
    let others = masters.iter().filter(|&&port| port != to && port != from);
    for &port in [to, from].iter().chain(others) {
        set_owner(port, moved, &id);
    }
    assert_eq!(probe.call(&["GET", &format!("{{{key}}}x")]).await, "_\r\n");
    let deadline = support::Deadline::new();
    while map_changes(admin).await == changes {
        deadline.next_try("redmux reads the new map").await;
    }
}

/// A client's request for a slot runs after the ones it sent for that slot before, even when
/// the slot moved in between: redmux holds it until the old master has answered (and redmux
/// resent) what it was sent, and until a request tried again after `-TRYAGAIN` has its
/// answer. Without that, the later request runs on the new master at once and the earlier
/// one, resent, overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_after_its_slot_moved_runs_after_those_before_it() {
    let cluster = Cluster::start();
    let mut config = config(&cluster);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let redmux = Redmux::start_with(config).await;
    let admin = redmux.metrics.expect("the admin endpoint is bound");
    let masters = cluster.masters();
    let (m, n, p) = (masters[0], masters[1], masters[2]);
    let n_id = support::cluster::node_id(n);
    let owned_by_n = |slot: u16| {
        for port in [n, m, p] {
            set_owner(port, slot, &n_id);
        }
    };
    let mut client = redmux.raw().await;

    // A new map: the first SET waits on m (paused) when the slot goes to n, and redmux reads
    // the new map (another connection's GET met -MOVED) before the second SET comes. A map
    // that moved another slot (n to p) came first: redmux still knows where k's slot's
    // requests went.
    let k = name_on(&cluster, m, "ordered", &[]);
    let unrelated = name_on(&cluster, n, "unrelated", &[]);
    let mut resp3 = redmux.raw().await;
    resp3.call(&["HELLO", "3"]).await;
    pause_writes(m, 2000);
    client.send(cmd(&["SET", &k, "1"])).await;
    a_moment().await;
    move_and_read(&mut resp3, admin, &masters, &unrelated, (n, p)).await;
    move_and_read(&mut resp3, admin, &masters, &k, (m, n)).await;
    client.send(cmd(&["SET", &k, "2"])).await;
    both_set_and_second_on(&mut client, n, &k).await;

    // -TRYAGAIN: a MSET whose slot is half moved is tried again, and the SET sent after it
    // waits for its answer instead of running on m at once.
    let (a, b) = mset_tried_again(&cluster, &mut client, (m, n), "held").await;
    let st = slot(a.as_bytes());
    a_moment().await;
    client.send(cmd(&["SET", &a, "2"])).await;
    a_moment().await;
    migrate((m, n), &a);
    owned_by_n(st);
    both_set_and_second_on(&mut client, n, &a).await;
    assert_eq!(
        Conn::connect(n).query(&["GET", &b]),
        Resp::Bulk(b"1".to_vec())
    );
    cluster.wait_agreed();
}

/// Clients that pipeline MGETs across every master (split by redmux, merged from three
/// replies) and never read are closed at `client_output_limit`, and redmux's memory stays
/// near that limit per client: each part is charged to the client's output budget as it
/// arrives, not once the whole reply is merged, so parts waiting for the rest of their batch
/// count too. The allowance is what the docs promise, as in `tests/abuse.rs`: the limit plus
/// one batch (64 requests) of replies per client, twice (a reply shares its allocation with
/// a node connection's read buffer), plus 8 MiB for the allocator. Measured: +37 to +55 MB (bound
/// +196 MB); before parts were charged, +390 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_clients_of_a_cluster_are_closed_and_memory_stays_bounded() {
    const VALUE_LEN: usize = 100 * 1000;
    const LIMIT: u64 = 4 * 1024 * 1024;
    const MAX_PIPELINE: u64 = 1024;
    const BATCH: u64 = 64;
    const ABUSERS: usize = 4;
    const REQUESTS: usize = 1000;
    let cluster = shared();
    let names: Vec<String> = cluster
        .masters()
        .into_iter()
        .map(|port| name_on(&cluster, port, "unread", &[]))
        .collect();
    let value = "v".repeat(VALUE_LEN);
    for name in &names {
        let reply = at_owner(&cluster, name).query(&["SET", name, &value]);
        assert_eq!(reply, Resp::Simple("OK".into()));
    }
    let seeds: Vec<String> = cluster.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    let redmux = support::binary::RedmuxProcess::start(
        &format!("client_output_limit = {LIMIT}\nmax_pipeline = {MAX_PIPELINE}"),
        &format!("[upstream]\ncluster = [{}]\n", seeds.join(", ")),
    );
    let mut bystander = redmux.raw().await;
    let mget: Vec<&str> = std::iter::once("MGET")
        .chain(names.iter().map(String::as_str))
        .collect();
    assert_eq!(bystander.call(&mget).await.len(), 3 * (VALUE_LEN + 11) + 4);
    let before = redmux.rss_kib();
    let requests = cmd(&mget).repeat(REQUESTS);
    let mut abusers = Vec::new();
    for _ in 0..ABUSERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(redmux.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, &requests)
            .await
            .unwrap();
        abusers.push(stream);
    }
    redmux.wait_for_log("client output limit reached", ABUSERS);
    let peak = redmux.peak_rss_kib();
    assert_eq!(bystander.call(&["PING"]).await, "+PONG\r\n");
    let growth = peak.saturating_sub(before);
    let batch = BATCH * 3 * VALUE_LEN as u64;
    let bound = ABUSERS as u64 * 2 * (LIMIT + batch) / 1024 + 8 * 1024;
    println!("{ABUSERS} never-reading clients: rss before {before} KiB, peak {peak} KiB (+{growth} KiB, bound {bound} KiB)");
    assert!(growth <= bound, "rss grew {growth} KiB, bound {bound} KiB");
    drop(abusers);
}

/// A split becomes a request per slot, each some 150 bytes of the router's and the actors'
/// memory: a client pipelining MGETs of a key in every slot (16,384 requests out of 160 KB)
/// and never reading must not make redmux hold its whole pipeline so (300 of them made it
/// grow by 1.7 GB, and other clients' requests time out behind them on the masters'
/// connections). Its requests on their way are bounded by their bytes, so redmux stops
/// reading it, and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_wide_splits_is_not_read_without_bound() {
    const SENT_MAX: usize = 48 * 1024 * 1024;
    let cluster = shared();
    let mut by_slot: Vec<Option<String>> = vec![None; 16384];
    let mut missing = by_slot.len();
    for i in 0u32.. {
        let key = format!("{i:x}");
        let at = &mut by_slot[usize::from(slot(key.as_bytes()))];
        if at.is_none() {
            *at = Some(key);
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    let mget: Vec<&str> = std::iter::once("MGET")
        .chain(by_slot.iter().flatten().map(String::as_str))
        .collect();
    let request = cmd(&mget);
    let seeds: Vec<String> = cluster.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    let redmux = support::binary::RedmuxProcess::start(
        "",
        &format!("[upstream]\ncluster = [{}]\n", seeds.join(", ")),
    );
    let mut bystander = redmux.raw().await;
    assert_eq!(bystander.call(&["SET", "wide:own", "1"]).await, "+OK\r\n");
    let before = redmux.rss_kib();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(redmux.addr).await.unwrap();
    // Writes until redmux stops taking them.
    let batch = request.repeat(16);
    let mut sent = 0;
    while sent < SENT_MAX {
        let write = tokio::io::AsyncWriteExt::write_all(&mut stream, &batch);
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    assert_eq!(bystander.call(&["GET", "wide:own"]).await, "$1\r\n1\r\n");
    let growth = redmux.peak_rss_kib().saturating_sub(before);
    println!("sent {} KiB; rss grew {growth} KiB", sent / 1024);
    // 1 MiB of requests on their way, and the one that takes them past it, made into split
    // requests (some 7 x 16,384 of them), their replies, a socket's buffers, the allocator.
    let bound = 64 * 1024;
    assert!(growth <= bound, "rss grew {growth} KiB, bound {bound} KiB");
    assert!(sent < SENT_MAX / 2, "redmux read {} KiB ahead", sent / 1024);
    drop(stream);
}

/// A client logged in as a user of its own has connections to the masters as that user, and
/// they close once it logs out, even with a request of its still on its way then: that
/// request went to its node whole (its reply straight to the client, unseen by the router
/// that sent it), and the router lets the user's connections go once it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_login_leaves_every_master_when_it_logs_out() {
    let cluster = shared();
    for port in cluster.masters() {
        let reply = Conn::connect(port).query(&[
            "ACL",
            "SETUSER",
            "leaver",
            "on",
            ">leaverpw",
            "~*",
            "&*",
            "+@all",
        ]);
        assert_eq!(reply, Resp::Simple("OK".into()));
    }
    let redmux = start(&cluster).await;
    // The connection redmux checks AUTH on stays logged in as the last user it checked (its
    // last command AUTH): it carries nothing else.
    let as_leaver = |port: u16| {
        let list = Conn::connect(port).query(&["CLIENT", "LIST"]).text();
        list.lines()
            .filter(|l| l.contains(" user=leaver ") && !l.contains(" cmd=auth "))
            .count()
    };
    let mut client = redmux.raw().await;
    assert_eq!(
        client.call(&["AUTH", "leaver", "leaverpw"]).await,
        "+OK\r\n"
    );
    let keys = keys("leaver", 30);
    for key in &keys {
        assert_eq!(client.call(&["SET", key, "v"]).await, "+OK\r\n");
    }
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    assert!(client.call(&mget).await.starts_with("*30\r\n"));
    for port in cluster.masters() {
        assert!(as_leaver(port) > 0, "no connection as leaver on {port}");
    }
    // It logs out (RESET) with a request on its way, held by the node for a moment.
    pause(owner(&cluster, &keys[0]), 300);
    let mut last = cmd(&["GET", &keys[0]]);
    last.extend(cmd(&["RESET"]));
    client.send(&last).await;
    assert_eq!(client.reply_str().await, "$1\r\nv\r\n");
    assert_eq!(client.reply_str().await, "+RESET\r\n");
    let deadline = support::Deadline::new();
    while cluster.masters().into_iter().map(as_leaver).sum::<usize>() > 0 {
        deadline.next_try("leaver's connections to close").await;
    }
}

/// A script writes any error text it likes (`redis.error_reply`), after it ran: a `-MOVED`,
/// `-ASK` or `-TRYAGAIN` one is not Redis's own. It must neither send anyone's requests out of
/// the cluster (here to a plain redis-server playing the attacker's) nor run the script again.
#[tokio::test]
async fn redirects_a_script_writes_are_given_back_as_they_are() {
    let cluster = shared();
    let trap = support::RedisServer::start();
    let redmux = start(&cluster).await;
    let (mut attacker, mut victim) = (redmux.raw().await, redmux.raw().await);
    let (key, runs) = ("forged:{a}", "forged:{a}:runs");
    let at = slot(key.as_bytes());
    let owner = owner(&cluster, key);
    let other = *cluster.masters().iter().find(|&&p| p != owner).unwrap();
    let script = "redis.call('INCR', KEYS[2]); return redis.error_reply(ARGV[1])";
    let forged = [
        format!("MOVED {at} 127.0.0.1:{}", trap.port),
        format!("ASK {at} 127.0.0.1:{}", trap.port),
        format!("MOVED {at} 127.0.0.1:{other}"),
        format!("ASK {at} 127.0.0.1:{other}"),
        // The node that ran it, which owns the slot: it would run it again.
        format!("MOVED {at} :{owner}"),
        format!("ASK {at} 127.0.0.1:{owner}"),
        "TRYAGAIN forged".to_owned(),
    ];
    for (n, error) in forged.iter().enumerate() {
        let reply = attacker
            .call(&["EVAL", script, "2", key, runs, error])
            .await;
        assert!(reply.starts_with('-'), "{error}: {reply}");
        if !error.contains(&other.to_string()) {
            // Given back as it is. (A redirect to a node of the cluster is followed once,
            // and that node's own -MOVED back comes back instead.)
            assert_eq!(reply, format!("-{error}\r\n"));
        }
        assert_eq!(
            at_owner(&cluster, runs).query(&["GET", runs]),
            Resp::Bulk((n + 1).to_string().into_bytes()),
            "the script ran once for {error}"
        );
        assert_eq!(victim.call(&["SET", key, "secret"]).await, "+OK\r\n");
        assert_eq!(victim.call(&["GET", key]).await, "$6\r\nsecret\r\n");
        assert_eq!(
            at_owner(&cluster, key).query(&["GET", key]),
            Resp::Bulk(b"secret".to_vec())
        );
    }
    let trapped = Conn::connect(trap.port).query(&["DBSIZE"]);
    assert_eq!(
        trapped,
        Resp::Int(0),
        "nothing reached the server outside the cluster"
    );
}

/// A request tried again after `-TRYAGAIN` holds back its own client's later requests only:
/// another client's keyless request and split MGET are answered at once. Before gates were
/// per client, they waited until the retries ran out (1.26 s) and the MSET got `-TRYAGAIN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_tried_again_holds_back_only_its_own_clients_requests() {
    let cluster = shared();
    let redmux = start(&cluster).await;
    let (mut retried, mut other) = (redmux.raw().await, redmux.raw().await);
    let masters = cluster.masters();
    let (m, n) = (masters[0], masters[1]);
    let (a, b) = mset_tried_again(&cluster, &mut retried, (m, n), "retried").await;
    let st = slot(a.as_bytes());
    assert_eq!(other.call(&["ECHO", "free"]).await, "$4\r\nfree\r\n");
    let spread = keys("retried-other", 6);
    let mut mget = vec!["MGET"];
    mget.extend(spread.iter().map(String::as_str));
    assert_eq!(
        other.call(&mget).await,
        format!("*6\r\n{}", "$-1\r\n".repeat(6))
    );
    // Only now does the move end: the MSET, still being tried again, succeeds on n.
    migrate((m, n), &a);
    let n_id = support::cluster::node_id(n);
    for &port in &masters {
        set_owner(port, st, &n_id);
    }
    assert_eq!(retried.reply_str().await, "+OK\r\n");
    assert_eq!(
        Conn::connect(n).query(&["MGET", &a, &b]),
        Resp::Array(vec![Resp::Bulk(b"1".to_vec()), Resp::Bulk(b"1".to_vec())])
    );
    cluster.wait_agreed();
}

/// Waits until master `port` answers `-BUSY`: a script runs there past the threshold.
fn wait_busy(port: u16) {
    let deadline = support::Deadline::new();
    while !matches!(Conn::connect(port).query(&["PING"]), Resp::Error(ref e) if e.starts_with("BUSY"))
    {
        deadline.next_try_blocking("the master is busy with the script");
    }
}

/// SCRIPT KILL, FUNCTION KILL and FUNCTION STATS reach the master running the script, whichever
/// it is (not only the first seed), and CLIENT UNBLOCK reaches the master a client is blocked
/// on: Redis's client ids are each node's own. (A cluster of its own: a busy master would
/// hold up the other tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_stats_and_unblocks_reach_the_master_they_concern() {
    let cluster = Cluster::start();
    let redmux = start(&cluster).await;
    let first_seed: u16 = cluster.addrs()[0]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let key = (0..)
        .map(|i| format!("control:{i}"))
        .find(|key| owner(&cluster, key) != first_seed)
        .unwrap();
    let busy = owner(&cluster, &key);
    for port in cluster.masters() {
        let set = ["CONFIG", "SET", "busy-reply-threshold", "100"];
        assert_eq!(Conn::connect(port).query(&set), Resp::Simple("OK".into()));
    }
    let mut other = redmux.raw().await;
    let library = "#!lua name=spincluster\nredis.register_function('spincluster', function() while true do end end)";
    assert_eq!(
        other.call(&["FUNCTION", "LOAD", "REPLACE", library]).await,
        "$11\r\nspincluster\r\n"
    );
    for (run, kill) in [
        (
            vec!["EVAL", "while true do end", "1", &key],
            ["SCRIPT", "KILL"],
        ),
        (
            vec!["FCALL", "spincluster", "1", &key],
            ["FUNCTION", "KILL"],
        ),
    ] {
        let mut runner = redmux.raw().await;
        runner.send(cmd(&run)).await;
        wait_busy(busy);
        if run[0] == "FCALL" {
            let stats = other.call(&["FUNCTION", "STATS"]).await;
            assert!(
                stats.starts_with(
                    "*4\r\n$14\r\nrunning_script\r\n*6\r\n$4\r\nname\r\n$11\r\nspincluster\r\n"
                ),
                "FUNCTION STATS names the running function: {stats:?}"
            );
        }
        assert_eq!(other.call(&kill).await, "+OK\r\n", "{kill:?}");
        let killed = runner.reply_str().await;
        assert!(killed.starts_with("-ERR Script killed by user"), "{killed}");
    }
    assert_eq!(
        other.call(&["SCRIPT", "KILL"]).await,
        "-NOTBUSY No scripts in execution right now.\r\n"
    );

    let mut blocked = redmux.raw().await;
    let id = blocked.call(&["CLIENT", "ID"]).await;
    let id = id.trim_start_matches(':').trim_end();
    let list = format!("{{{key}}}:list");
    blocked.send(cmd(&["BLPOP", &list, "0"])).await;
    let deadline = support::Deadline::new();
    while !Conn::connect(busy)
        .query(&["INFO", "clients"])
        .text()
        .contains("blocked_clients:1\r\n")
    {
        deadline.next_try_blocking("the client is blocked on its master");
    }
    assert_eq!(other.call(&["CLIENT", "UNBLOCK", id]).await, ":1\r\n");
    assert_eq!(blocked.reply_str().await, "*-1\r\n");
}

/// A slot that a map leaves without a master and the next gives to another: a request still
/// queued on the old master (its writes paused) comes back `-MOVED` and is resent, and the
/// client's next request for the slot runs after it. Without a fence when the slot was left
/// unassigned, the next map had nothing to say where the slot's requests had gone, and the
/// later SET ran first on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_left_without_a_master_keeps_the_order_of_its_requests() {
    let cluster = Cluster::start();
    let mut config = config(&cluster);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    config.upstream.cluster_refresh_interval = std::time::Duration::from_millis(100);
    config.upstream.request_timeout = std::time::Duration::from_secs(20);
    let redmux = Redmux::start_with(config).await;
    let admin = redmux.metrics.expect("the admin endpoint is bound");
    let masters = cluster.masters();
    let (a, b) = (masters[0], masters[1]);
    for port in cluster.live_ports() {
        let set = ["CONFIG", "SET", "cluster-require-full-coverage", "no"];
        assert_eq!(Conn::connect(port).query(&set), Resp::Simple("OK".into()));
    }
    let key = name_on(&cluster, a, "unowned", &[]);
    let s = slot(key.as_bytes()).to_string();
    let mut client = redmux.raw().await;
    assert_eq!(client.call(&["SET", &key, "0"]).await, "+OK\r\n");
    let unassigned = |admin| async move {
        let status: serde_json::Value =
            serde_json::from_str(&support::http_get(admin, "/status").await).unwrap();
        status["cluster"]["unassigned_slots"].as_u64().unwrap()
    };

    pause_writes(a, 4000);
    client.send(cmd(&["SET", &key, "1"])).await;
    a_moment().await;
    // Every node forgets the slot, and redmux reads a map without it.
    for port in cluster.live_ports() {
        let reply = Conn::connect(port).query(&["CLUSTER", "DELSLOTS", &s]);
        assert_eq!(reply, Resp::Simple("OK".into()), "DELSLOTS on {port}");
    }
    let deadline = support::Deadline::new();
    while unassigned(admin).await != 1 {
        deadline
            .next_try("redmux reads a map without the slot")
            .await;
    }
    // B takes it, and redmux reads that too.
    let reply = Conn::connect(b).query(&["CLUSTER", "ADDSLOTS", &s]);
    assert_eq!(reply, Resp::Simple("OK".into()));
    while unassigned(admin).await != 0 {
        deadline.next_try("redmux reads the slot on B").await;
    }
    // A knows it too (reads are not paused): it will answer the paused SET -MOVED.
    while !matches!(Conn::connect(a).query(&["GET", &key]), Resp::Error(e) if e.starts_with("MOVED"))
    {
        deadline.next_try("A redirects the slot to B").await;
    }
    client.send(cmd(&["SET", &key, "2"])).await;
    // A's pause ends: it answers the first SET -MOVED, which is resent to B before the second.
    both_set_and_second_on(&mut client, b, &key).await;
}
