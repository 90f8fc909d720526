//! Pub/sub counts (PUBLISH, SPUBLISH, PUBSUB) through redmux, compared with the same clients
//! connected to Redis directly, and Redis's glob, which the counts of patterns depend on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::net::SocketAddr;

use support::{Raw, RedisServer, Redmux};

/// How a client of a scenario connects in the world through redmux (in the direct world,
/// every client connects to Redis directly).
#[derive(Clone, Copy)]
enum Via {
    /// Through redmux, never logged in: redmux's own hub.
    Own,
    /// Through redmux, logged in as `alice`: her hub.
    Alice,
    /// Directly to Redis, beside redmux's hubs.
    Direct,
    /// Through redmux, in RESP3.
    Resp3,
}

/// Redis with `alice`, who may do anything.
fn redis_with_alice() -> RedisServer {
    let redis = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all"][..])
        .query(&mut redis.direct())
        .unwrap();
    redis
}

async fn connect(via: Via, redis: SocketAddr, redmux: Option<SocketAddr>) -> Raw {
    let Some(redmux) = redmux else {
        let mut raw = Raw::connect(redis).await;
        if let Via::Alice = via {
            assert_eq!(raw.call(&["AUTH", "alice", "pw"]).await, "+OK\r\n");
        }
        if let Via::Resp3 = via {
            assert!(raw.call(&["HELLO", "3"]).await.starts_with('%'));
        }
        return raw;
    };
    let mut raw = Raw::connect(match via {
        Via::Direct => redis,
        _ => redmux,
    })
    .await;
    match via {
        Via::Alice => assert_eq!(raw.call(&["AUTH", "alice", "pw"]).await, "+OK\r\n"),
        Via::Resp3 => assert!(raw.call(&["HELLO", "3"]).await.starts_with('%')),
        Via::Own | Via::Direct => {}
    }
    raw
}

/// An array of bulk strings with its elements sorted: Redis lists channels in hash order.
fn sorted(reply: String) -> String {
    let Some(rest) = reply.strip_prefix('*') else {
        return reply;
    };
    let Some((count, mut rest)) = rest.split_once("\r\n") else {
        return reply;
    };
    let mut items = Vec::new();
    while let Some((len, tail)) = rest.strip_prefix('$').and_then(|r| r.split_once("\r\n")) {
        let len: usize = len.parse().unwrap();
        items.push(tail[..len].to_owned());
        rest = &tail[len + 2..];
    }
    items.sort();
    let mut out = format!("*{count}\r\n");
    for item in items {
        out.push_str(&format!("${}\r\n{item}\r\n", item.len()));
    }
    out
}

/// Runs `steps` (client, command, frames to read) with the clients connected as `clients`
/// says, through redmux if it is given, else all directly to Redis. Returns every reply.
async fn run(
    clients: &[Via],
    steps: &[(usize, &[&str], usize)],
    redis: SocketAddr,
    redmux: Option<SocketAddr>,
) -> Vec<String> {
    let mut raws = Vec::new();
    for via in clients {
        raws.push(connect(*via, redis, redmux).await);
    }
    let mut replies = Vec::new();
    for (client, command, frames) in steps {
        let raw = &mut raws[*client];
        raw.send(redmux::resp::encode_command(
            command.iter().map(|a| a.as_bytes()),
        ))
        .await;
        for _ in 0..*frames {
            let mut reply = raw.reply_str().await;
            // Subscribers' messages are not compared: Redis sends a message's pmessages in
            // the order of its table of patterns, which differs from one server to another.
            while ["message", "pmessage", "smessage"].iter().any(|kind| {
                reply
                    .get(4..)
                    .unwrap_or("")
                    .starts_with(&format!("${}\r\n{kind}\r\n", kind.len()))
            }) {
                reply = raw.reply_str().await;
            }
            let channels = command[0] == "PUBSUB" && command[1].ends_with("CHANNELS");
            replies.push(if channels { sorted(reply) } else { reply });
        }
    }
    replies
}

/// Two clients SUBSCRIBE to `ch` and a third PSUBSCRIBEs to `c*`: directly, `PUBLISH ch x`
/// returns 3, as it must through redmux (which used to answer 2: its hub counted once for the
/// channel and once for the pattern). Then with a second hub (a client logged in as `alice`),
/// a client connected to Redis directly beside redmux, shard channels, RESP3, and clients
/// leaving: PUBLISH, SPUBLISH and PUBSUB NUMSUB, SHARDNUMSUB, NUMPAT, CHANNELS and
/// SHARDCHANNELS (with and without a pattern) give what Redis gives with every client on a
/// connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_those_of_clients_connected_directly() {
    use Via::*;
    let clients = [Own, Own, Own, Alice, Direct, Own, Alice, Resp3];
    let steps: &[(usize, &[&str], usize)] = &[
        (0, &["SUBSCRIBE", "ch"], 1),
        (1, &["SUBSCRIBE", "ch"], 1),
        (2, &["PSUBSCRIBE", "c*"], 1),
        (5, &["PUBLISH", "ch", "x"], 1),
        (5, &["PUBSUB", "NUMSUB", "ch"], 1),
        (5, &["PUBSUB", "NUMPAT"], 1),
        (3, &["SUBSCRIBE", "ch", "other"], 2),
        (4, &["SUBSCRIBE", "ch"], 1),
        (3, &["PSUBSCRIBE", "c*", "ch*", "o[s-u]her"], 3),
        (5, &["PUBLISH", "ch", "x"], 1),
        (6, &["PUBLISH", "ch", "x"], 1),
        (7, &["PUBLISH", "ch", "x"], 1),
        (5, &["PUBLISH", "other", "x"], 1),
        (5, &["PUBLISH", "nobody", "x"], 1),
        (5, &["PUBSUB", "NUMSUB", "ch", "other", "nope"], 1),
        (7, &["PUBSUB", "NUMSUB", "ch", "other", "nope"], 1),
        (5, &["PUBSUB", "NUMSUB"], 1),
        (5, &["PUBSUB", "NUMPAT"], 1),
        (5, &["PUBSUB", "CHANNELS"], 1),
        (5, &["PUBSUB", "CHANNELS", "c*"], 1),
        (7, &["PUBSUB", "CHANNELS", "[a-p]*"], 1),
        (0, &["SSUBSCRIBE", "s1", "s2"], 2),
        (6, &["SSUBSCRIBE", "s1"], 1),
        (4, &["SSUBSCRIBE", "s1"], 1),
        (5, &["SPUBLISH", "s1", "x"], 1),
        (5, &["SPUBLISH", "s2", "x"], 1),
        (7, &["SPUBLISH", "s3", "x"], 1),
        (5, &["PUBSUB", "SHARDNUMSUB", "s1", "s2", "s3"], 1),
        (5, &["PUBSUB", "SHARDCHANNELS"], 1),
        (5, &["PUBSUB", "SHARDCHANNELS", "*2"], 1),
        (5, &["PUBLISH", "s1", "x"], 1),
        // Errors pass as Redis gives them.
        (5, &["PUBLISH", "ch"], 1),
        (5, &["PUBSUB", "NUMSUB2"], 1),
        // Clients leave, one way or another.
        (1, &["UNSUBSCRIBE", "ch"], 1),
        (3, &["PUNSUBSCRIBE", "ch*"], 1),
        (5, &["PUBLISH", "ch", "x"], 1),
        (5, &["PUBSUB", "NUMSUB", "ch", "other"], 1),
        (5, &["PUBSUB", "NUMPAT"], 1),
        (2, &["RESET"], 1),
        (3, &["RESET"], 1),
        (0, &["SUNSUBSCRIBE", "s2"], 1),
        (5, &["PUBLISH", "ch", "x"], 1),
        (5, &["PUBLISH", "other", "x"], 1),
        (5, &["SPUBLISH", "s2", "x"], 1),
        (5, &["PUBSUB", "NUMSUB", "ch", "other"], 1),
        (5, &["PUBSUB", "NUMPAT"], 1),
        (5, &["PUBSUB", "CHANNELS"], 1),
        (5, &["PUBSUB", "SHARDCHANNELS"], 1),
        (5, &["PUBSUB", "SHARDNUMSUB", "s1", "s2"], 1),
    ];
    let direct = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all"][..])
        .query(&mut direct.direct())
        .unwrap();
    let expected = run(&clients, steps, direct.addr().parse().unwrap(), None).await;
    assert_eq!(expected[3], ":3\r\n");
    let redis = redis_with_alice();
    let redmux = Redmux::start(&redis.addr()).await;
    let got = run(
        &clients,
        steps,
        redis.addr().parse().unwrap(),
        Some(redmux.addr),
    )
    .await;
    let mut i = 0;
    for (client, command, frames) in steps {
        for _ in 0..*frames {
            assert_eq!(
                got[i], expected[i],
                "step {i}: client {client}: {command:?}"
            );
            i += 1;
        }
    }
}

/// A client's own requests after it unsubscribes see no trace of its subscription: the
/// unsubscription is done upstream before they run. Pipelined, 20 times over, for channels,
/// patterns and shard channels, and after RESET; RESP3 too, where the client stays
/// subscribed to something else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscription_leaves_no_trace_in_the_clients_next_counts() {
    let (plain, behind) = (RedisServer::start(), RedisServer::start());
    let redmux = Redmux::start(&behind.addr()).await;
    let direct: SocketAddr = plain.addr().parse().unwrap();
    let mut n = 0;
    for round in 0..20 {
        for case in 0..5 {
            for resp3 in [false, true] {
                // Names of their own: what clients of earlier rounds held may still be
                // leaving Redis.
                n += 1;
                let (ch, p, sh, elsewhere) = (
                    format!("c{n}"),
                    format!("p{n}*"),
                    format!("s{n}"),
                    format!("e{n}"),
                );
                let (subscribe, leave, then) = match case {
                    0 => (
                        format!("SUBSCRIBE {ch}"),
                        format!("UNSUBSCRIBE {ch}"),
                        vec![
                            format!("PUBSUB NUMSUB {ch}"),
                            format!("PUBLISH {ch} x"),
                            format!("PUBSUB CHANNELS {ch}"),
                        ],
                    ),
                    1 => (
                        format!("PSUBSCRIBE {p}"),
                        format!("PUNSUBSCRIBE {p}"),
                        vec!["PUBSUB NUMPAT".to_owned(), format!("PUBLISH p{n}x x")],
                    ),
                    2 => (
                        format!("SSUBSCRIBE {sh}"),
                        "SUNSUBSCRIBE".to_owned(),
                        vec![
                            format!("PUBSUB SHARDNUMSUB {sh}"),
                            format!("SPUBLISH {sh} x"),
                            format!("PUBSUB SHARDCHANNELS {sh}"),
                        ],
                    ),
                    3 => (
                        format!("SUBSCRIBE {ch}"),
                        "RESET".to_owned(),
                        vec![format!("PUBSUB NUMSUB {ch}"), format!("PUBLISH {ch} x")],
                    ),
                    _ => (
                        format!("PSUBSCRIBE {p}"),
                        "RESET".to_owned(),
                        vec!["PUBSUB NUMPAT".to_owned(), format!("PUBLISH p{n}x x")],
                    ),
                };
                let mut replies = Vec::new();
                for addr in [direct, redmux.addr] {
                    let mut raw = Raw::connect(addr).await;
                    if resp3 {
                        assert!(raw.call(&["HELLO", "3"]).await.starts_with('%'));
                        // Subscribed to something else all along.
                        raw.call(&["SUBSCRIBE", &elsewhere]).await;
                    }
                    raw.call(&subscribe.split(' ').collect::<Vec<_>>()).await;
                    let mut pipeline = format!("{leave}\r\n");
                    for command in &then {
                        pipeline.push_str(command);
                        pipeline.push_str("\r\n");
                    }
                    let replies_of = raw.pipeline(pipeline.as_bytes(), 1 + then.len()).await;
                    replies.push(
                        replies_of
                            .iter()
                            .map(|reply| String::from_utf8_lossy(reply).into_owned())
                            .collect::<Vec<_>>(),
                    );
                }
                assert_eq!(
                    replies[1], replies[0],
                    "round {round}: {subscribe}, then {leave} and {then:?} (RESP3: {resp3}); \
                     through redmux (left), directly (right)"
                );
            }
        }
    }
}

/// A pseudo-random number generator, so that the glob comparison is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }

    fn string(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
        let len = self.next(max + 1);
        (0..len)
            .map(|_| alphabet[self.next(alphabet.len())])
            .collect()
    }
}

/// redmux's glob against Redis's own: the channels `PUBSUB CHANNELS pattern` lists, for
/// thousands of random patterns (stars, `?`, classes with `^`, ranges and escapes, bytes past
/// 0x7f, unterminated classes) over random channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_matches_as_redis_does() {
    let redis = RedisServer::start();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let letters = b"abcx-]^\\\x80\xff";
    let mut channels: Vec<Vec<u8>> = (0..300).map(|_| rng.string(letters, 6)).collect();
    channels.retain(|channel| !channel.is_empty());
    channels.sort();
    channels.dedup();
    let mut subscriber = Raw::connect(redis.addr().parse().unwrap()).await;
    let subscribe = redmux::resp::encode_command(
        std::iter::once(&b"SUBSCRIBE"[..]).chain(channels.iter().map(Vec::as_slice)),
    );
    assert_eq!(
        subscriber.pipeline(&subscribe, channels.len()).await.len(),
        channels.len()
    );
    let symbols = b"abcx-]^\\\x80\xff*?[[";
    let mut direct = redis.direct();
    for _ in 0..3000 {
        let pattern = rng.string(symbols, 7);
        let mut listed: Vec<Vec<u8>> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(&pattern)
            .query(&mut direct)
            .unwrap();
        listed.sort();
        let matched: Vec<Vec<u8>> = channels
            .iter()
            .filter(|channel| redmux::pubsub::glob::matches(&pattern, channel))
            .cloned()
            .collect();
        assert_eq!(
            matched,
            listed,
            "pattern {:?}",
            String::from_utf8_lossy(&pattern)
        );
    }
}
