//! Pub/sub through shared subscriber connections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{Deadline, Raw, RedisServer, Redmux};

fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query(&mut redis.direct())
        .unwrap();
    reply.1
}

fn wait_numsub(redis: &RedisServer, channel: &str, want: i64) {
    let deadline = Deadline::new();
    while numsub(redis, channel) != want {
        deadline.next_try_blocking(format!("NUMSUB {channel} never reached {want}"));
    }
}

/// redmux in front of `redis`, closing a client past `limit` bytes of unread output.
async fn with_output_limit(redis: &RedisServer, limit: u64) -> Redmux {
    let mut config = support::config(&redis.addr());
    config.server.client_output_limit = limit;
    Redmux::start_with(config).await
}

/// 100 PUBLISHes of `payload` to `channel`, pipelined.
fn publish_round(channel: &str, payload: &str) -> Vec<u8> {
    let publish = redmux::resp::encode_command(["PUBLISH", channel, payload].map(str::as_bytes));
    publish.repeat(100)
}

fn message(channel: &str, payload: &str) -> String {
    format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
        channel.len(),
        payload.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_subscription_fans_out_in_order() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut raw = redmux.raw().await;
        assert_eq!(
            raw.call(&["SUBSCRIBE", "news"]).await,
            "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        );
        subscribers.push(raw);
    }
    assert_eq!(numsub(&redis, "news"), 1, "subscribed upstream once");
    let mut publisher = redmux.raw().await;
    for i in 0..50 {
        // Three receivers, as Redis would count them if each were connected to it.
        assert_eq!(
            publisher.call(&["PUBLISH", "news", &format!("m{i}")]).await,
            ":3\r\n"
        );
    }
    for sub in &mut subscribers {
        for i in 0..50 {
            assert_eq!(sub.reply_str().await, message("news", &format!("m{i}")));
        }
    }
    // Counts are per client; a second channel; unsubscribing one name.
    let a = &mut subscribers[0];
    a.send("SUBSCRIBE other news\r\n").await;
    assert_eq!(
        a.reply_str().await,
        "*3\r\n$9\r\nsubscribe\r\n$5\r\nother\r\n:2\r\n"
    );
    assert_eq!(
        a.reply_str().await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:2\r\n"
    );
    assert_eq!(
        a.call(&["UNSUBSCRIBE", "other"]).await,
        "*3\r\n$11\r\nunsubscribe\r\n$5\r\nother\r\n:1\r\n"
    );
    // RESP2 subscribed state: only pub/sub commands, PING in its subscribed form.
    assert_eq!(
        a.call(&["GET", "k"]).await,
        "-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
    assert_eq!(a.call(&["PING"]).await, "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    // Everyone leaves: the upstream subscription goes too.
    for sub in &mut subscribers {
        assert_eq!(
            sub.call(&["UNSUBSCRIBE"]).await,
            "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
        );
        assert_eq!(
            sub.call(&["UNSUBSCRIBE"]).await,
            "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(
            sub.call(&["GET", "k"]).await,
            "$-1\r\n",
            "out of subscribed state"
        );
    }
    wait_numsub(&redis, "news", 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_resp3_and_disconnects() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut p = redmux.raw().await;
    assert_eq!(
        p.call(&["PSUBSCRIBE", "ev.*"]).await,
        "*3\r\n$10\r\npsubscribe\r\n$4\r\nev.*\r\n:1\r\n"
    );
    let mut v3 = redmux.raw().await;
    assert!(v3.call(&["HELLO", "3"]).await.starts_with('%'));
    assert_eq!(
        v3.call(&["SUBSCRIBE", "ev.a"]).await,
        ">3\r\n$9\r\nsubscribe\r\n$4\r\nev.a\r\n:1\r\n"
    );
    // RESP3 clients may mix commands while subscribed.
    assert_eq!(v3.call(&["GET", "k"]).await, "_\r\n");
    let mut publisher = redmux.raw().await;
    assert_eq!(publisher.call(&["PUBLISH", "ev.a", "x"]).await, ":2\r\n");
    assert_eq!(
        p.reply_str().await,
        "*4\r\n$8\r\npmessage\r\n$4\r\nev.*\r\n$4\r\nev.a\r\n$1\r\nx\r\n"
    );
    assert_eq!(
        v3.reply_str().await,
        ">3\r\n$7\r\nmessage\r\n$4\r\nev.a\r\n$1\r\nx\r\n"
    );
    // A subscriber that disconnects is unsubscribed upstream.
    drop(v3);
    wait_numsub(&redis, "ev.a", 0);
    let numpat: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(numpat, 1);
    assert_eq!(p.call(&["RESET"]).await, "+RESET\r\n");
    let deadline = Deadline::new();
    loop {
        let numpat: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query(&mut redis.direct())
            .unwrap();
        if numpat == 0 {
            break;
        }
        deadline
            .next_try("pattern never unsubscribed upstream")
            .await;
    }
    assert_eq!(p.call(&["GET", "k"]).await, "$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_pubsub_api() {
    use futures_util::StreamExt;
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let client = redis::Client::open(redmux.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("crate").await.unwrap();
    let mut con = redmux.client().await;
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("crate")
        .arg("hello")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    let msg = pubsub.on_message().next().await.unwrap();
    assert_eq!(msg.get_channel_name(), "crate");
    assert_eq!(msg.get_payload::<String>().unwrap(), "hello");
}

/// A subscriber that stops reading is cut off; the others keep receiving everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_cut_off() {
    let redis = RedisServer::start();
    let redmux = with_output_limit(&redis, 4 * 1024 * 1024).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(redmux.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"SUBSCRIBE flood\r\n")
        .await
        .unwrap();
    let mut fast = redmux.raw().await;
    assert_eq!(
        fast.call(&["SUBSCRIBE", "flood"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$5\r\nflood\r\n:1\r\n"
    );
    wait_numsub(&redis, "flood", 1);
    let payload = "p".repeat(4000);
    let total = 6000;
    // Published in rounds the fast subscriber keeps up with; the slow one never reads.
    let mut publisher = redmux.raw().await;
    let round = publish_round("flood", &payload);
    for _ in 0..total / 100 {
        publisher.pipeline(&round, 100).await;
        for _ in 0..100 {
            assert_eq!(fast.reply_str().await, message("flood", &payload));
        }
    }
    // The slow one was closed after far fewer messages.
    let mut received = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(
            support::READY_TIMEOUT,
            tokio::io::AsyncReadExt::read(&mut slow, &mut chunk),
        )
        .await
        .expect("the slow subscriber is disconnected");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    assert!(
        received < total * payload.len() / 2,
        "slow subscriber got {received} bytes"
    );
}

/// A RESP3 subscriber blocked in BLPOP that does not read: its messages count against the
/// output limit, and past it the client is closed, as Redis closes a subscriber past its
/// pubsub output limit, and redmux holds nothing more for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_behind_a_blocked_reply_count_against_the_limit() {
    let redis = RedisServer::start();
    let redmux = with_output_limit(&redis, 1024 * 1024).await;
    let mut blocked = redmux.raw().await;
    blocked.call(&["HELLO", "3"]).await;
    blocked.call(&["SUBSCRIBE", "flood"]).await;
    wait_numsub(&redis, "flood", 1);
    blocked.send(b"BLPOP nothing:here 0\r\n").await;
    let payload = "p".repeat(10_000);
    let round = publish_round("flood", &payload);
    let mut publisher = redmux.raw().await;
    // 30 MB published, thirty times the limit and more than the sockets' buffers hold.
    for _ in 0..30 {
        publisher.pipeline(&round, 100).await;
    }
    // What the sockets held is read, then the end: closed, not 30 MB later.
    let mut read = 0;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(reply) = blocked.try_reply().await {
            read += reply.len();
        }
    })
    .await;
    assert!(closed.is_ok(), "the blocked client was not closed");
    assert!(
        read < 20 << 20,
        "{read} bytes reached a client that did not read"
    );
}

/// Subscribes `blocked` (RESP3 already) to `c` and sends `then`, which starts with a
/// BLPOP of `l`; returns once Redis shows it blocked.
async fn subscribe_and_block(redis: &RedisServer, blocked: &mut Raw, then: &[u8]) {
    blocked.call(&["SUBSCRIBE", "c"]).await;
    wait_numsub(redis, "c", 1);
    blocked.send(then).await;
    redis.wait_blocked_clients(1).await;
}

/// `other` pushes to `l`, and `blocked`'s BLPOP returns it.
async fn unblock(other: &mut Raw, blocked: &mut Raw, addr: SocketAddr) {
    assert_eq!(other.call(&["RPUSH", "l", "x"]).await, ":1\r\n");
    assert_eq!(
        blocked.reply_str().await,
        "*2\r\n$1\r\nl\r\n$1\r\nx\r\n",
        "{addr}"
    );
}

/// A RESP3 client blocked in BLPOP hears its messages and its invalidations while it waits,
/// as Redis writes a blocked client its pushes, and then BLPOP's reply: they do not wait
/// behind the reply that has not come. (They did: none reached the client, which was closed
/// at its output limit although it read everything it was sent.) Directly, then through
/// redmux.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_resp3_client_hears_its_pushes_while_it_waits() {
    let redis = RedisServer::start();
    let redmux = with_output_limit(&redis, 1024 * 1024).await;
    let payload = "p".repeat(100_000);
    for addr in [redis.addr().parse().unwrap(), redmux.addr] {
        let mut blocked = Raw::connect(addr).await;
        let mut other = Raw::connect(addr).await;
        assert_eq!(other.call(&["SET", "k", "v"]).await, "+OK\r\n");
        blocked.call(&["HELLO", "3"]).await;
        assert_eq!(blocked.call(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n");
        assert_eq!(blocked.call(&["GET", "k"]).await, "$1\r\nv\r\n");
        subscribe_and_block(&redis, &mut blocked, b"BLPOP l 0\r\n").await;
        // 3 MB of messages, three times the limit, each read as it comes.
        for _ in 0..30 {
            assert_eq!(other.call(&["PUBLISH", "c", &payload]).await, ":1\r\n");
            let push = blocked.reply_str().await;
            assert!(
                push.starts_with(">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n"),
                "{addr}: {push:.40}"
            );
        }
        assert_eq!(other.call(&["SET", "k", "w"]).await, "+OK\r\n");
        assert_eq!(
            blocked.reply_str().await,
            ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
            "{addr}"
        );
        unblock(&mut other, &mut blocked, addr).await;
        assert_eq!(blocked.call(&["PING"]).await, "+PONG\r\n", "{addr}");
        drop(blocked);
        wait_numsub(&redis, "c", 0);
    }
}

/// A connection command pipelined behind a blocking one waits for it, as Redis runs nothing
/// a client sent behind a blocking command before it returns: a RESET there left the client
/// subscribed and hearing its messages until BLPOP returned. (redmux answered it at once:
/// PUBLISH counted 0 and the message was lost.) Directly, then through redmux.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_behind_a_blocking_command_waits_for_it() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    for addr in [redis.addr().parse().unwrap(), redmux.addr] {
        let mut blocked = Raw::connect(addr).await;
        let mut other = Raw::connect(addr).await;
        blocked.call(&["HELLO", "3"]).await;
        subscribe_and_block(&redis, &mut blocked, b"BLPOP l 0\r\nRESET\r\n").await;
        assert_eq!(other.call(&["PUBLISH", "c", "m"]).await, ":1\r\n", "{addr}");
        assert_eq!(
            blocked.reply_str().await,
            ">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            "{addr}"
        );
        unblock(&mut other, &mut blocked, addr).await;
        assert_eq!(blocked.reply_str().await, "+RESET\r\n", "{addr}");
        wait_numsub(&redis, "c", 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_pubsub() {
    let redmux = Redmux::start("embedded").await;
    let mut sub = redmux.raw().await;
    assert_eq!(
        sub.call(&["SUBSCRIBE", "hi"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$2\r\nhi\r\n:1\r\n"
    );
    let mut publisher = redmux.raw().await;
    assert_eq!(publisher.call(&["PUBLISH", "hi", "there"]).await, ":1\r\n");
    assert_eq!(sub.reply_str().await, message("hi", "there"));
    assert_eq!(
        publisher.call(&["PSUBSCRIBE", "h*"]).await,
        "-ERR redmux: the embedded upstream does not support PSUBSCRIBE\r\n"
    );
}

/// Subscribing and unsubscribing before the upstream has answered: the same replies as Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_subscribe_and_unsubscribe_match_redis() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let cases: [(&str, usize); 5] = [
        ("SUBSCRIBE x\r\nUNSUBSCRIBE x\r\nPING\r\n", 3),
        // A no-arg PUNSUBSCRIBE lists patterns in subscription order, after removals too.
        ("SUBSCRIBE c\r\nPSUBSCRIBE p3 p1 p2 p1\r\nPUNSUBSCRIBE p1 nope\r\nPSUBSCRIBE p0\r\nPUNSUBSCRIBE\r\nUNSUBSCRIBE\r\nPING\r\n", 13),
        ("SUBSCRIBE a b a\r\nPSUBSCRIBE p*\r\nSSUBSCRIBE s\r\nSUBSCRIBE c\r\nSUNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nUNSUBSCRIBE a b c\r\nPING\r\n", 12),
        ("SUBSCRIBE a\r\nRESET\r\nPING\r\n", 3),
        // EXEC refused in EXEC's own words, its arity checked first.
        ("SUBSCRIBE a\r\nMULTI\r\nEXEC\r\nEXEC x\r\nUNSUBSCRIBE\r\n", 5),
    ];
    for (input, count) in cases {
        let mut direct = support::Raw::connect(redis.addr().parse().unwrap()).await;
        let expected = direct.pipeline(input.as_bytes(), count).await;
        let mut through = redmux.raw().await;
        let started = Instant::now();
        let got = through.pipeline(input.as_bytes(), count).await;
        assert_eq!(got, expected, "{input:?}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{input:?} took {:?}",
            started.elapsed()
        );
    }
    wait_numsub(&redis, "x", 0);
    wait_numsub(&redis, "a", 0);
}

/// A client that subscribed in RESP3 and went back to RESP2 gets RESP2 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_follow_the_clients_current_protocol() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut sub = redmux.raw().await;
    assert!(sub.call(&["HELLO", "3"]).await.starts_with('%'));
    assert_eq!(
        sub.call(&["SUBSCRIBE", "hx"]).await,
        ">3\r\n$9\r\nsubscribe\r\n$2\r\nhx\r\n:1\r\n"
    );
    assert!(sub.call(&["HELLO", "2"]).await.starts_with("*14"));
    let mut publisher = redmux.raw().await;
    assert_eq!(publisher.call(&["PUBLISH", "hx", "m1"]).await, ":1\r\n");
    assert_eq!(sub.reply_str().await, message("hx", "m1"));
}

/// After a client's UNSUBSCRIBE confirmation no message for that channel reaches it, as with
/// Redis, even when messages sent to it earlier still wait for it in redmux: here the
/// subscriber has not read a megabyte of messages yet, so its session holds more. (It is
/// still subscribed to another channel, so it keeps its inbox.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_after_the_unsubscribe_confirmation() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut sub = support::Raw::over(socket.connect(redmux.addr).await.unwrap());
    sub.send("SUBSCRIBE x y\r\n").await;
    assert_eq!(
        sub.reply_str().await,
        "*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n"
    );
    assert_eq!(
        sub.reply_str().await,
        "*3\r\n$9\r\nsubscribe\r\n$1\r\ny\r\n:2\r\n"
    );
    let payload = "m".repeat(1000);
    let publish = redmux::resp::encode_command([&b"PUBLISH"[..], b"x", payload.as_bytes()]);
    // A witness that reads everything: once it has a message, so has the subscriber's inbox.
    let mut witness = redmux.raw().await;
    assert_eq!(
        witness.call(&["SUBSCRIBE", "x"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n"
    );
    let mut publisher = redmux.raw().await;
    // 8 MB, well past what the kernel and the session's write queue take.
    for _ in 0..80 {
        publisher.pipeline(&publish.repeat(100), 100).await;
        for _ in 0..100 {
            assert_eq!(witness.reply_str().await, message("x", &payload));
        }
    }
    sub.send("UNSUBSCRIBE x\r\nPING\r\n").await;
    let confirmation = "*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:1\r\n";
    let mut before = 0;
    loop {
        let reply = sub.reply_str().await;
        if reply == confirmation {
            break;
        }
        assert_eq!(reply, message("x", &payload));
        before += 1;
    }
    assert_eq!(
        sub.reply_str().await,
        "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
        "nothing between the confirmation and the next reply ({before} messages before it)"
    );
    // The inbox keeps order: what waits in it for `x` would come before this.
    assert_eq!(publisher.call(&["PUBLISH", "y", "end"]).await, ":1\r\n");
    assert_eq!(sub.reply_str().await, message("y", "end"));
}

/// The id of redmux's subscriber connection, as Redis lists it.
fn subscriber_connection(redis: &RedisServer) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap();
    list.lines()
        .find(|line| !line.contains(" sub=0 psub=0 ssub=0 "))
        .and_then(|line| line.split(' ').next())
        .map(str::to_owned)
}

/// Redis drops a subscriber connection whose unread output passes its pubsub limit (32 MB by
/// default, 512 KB here). A SUBSCRIBE of 25,000 names of 250 bytes (7 MB of confirmations,
/// more than the kernel's buffers hold) goes upstream a window at a time, each sent once the
/// previous ones are answered, so the shared subscriber connection survives it and the other
/// subscribers do not notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_subscribe_never_overflows_redis_output_limit() {
    const NAMES: usize = 25_000;
    let redis = RedisServer::start_with(&["--client-output-buffer-limit", "pubsub 512kb 512kb 0"]);
    let redmux = Redmux::start(&redis.addr()).await;
    let mut steady = redmux.raw().await;
    assert_eq!(
        steady.call(&["SUBSCRIBE", "steady"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$6\r\nsteady\r\n:1\r\n"
    );
    let connection = subscriber_connection(&redis).expect("a subscriber connection");
    let names: Vec<String> = (0..NAMES)
        .map(|i| format!("channel:{i:06}:{}", "n".repeat(235)))
        .collect();
    let subscribe = redmux::resp::encode_command(
        std::iter::once(&b"SUBSCRIBE"[..]).chain(names.iter().map(|n| n.as_bytes())),
    );
    let mut big = redmux.raw().await;
    let replies = big.pipeline(&subscribe, NAMES).await;
    assert_eq!(replies.len(), NAMES);
    for (i, (reply, name)) in replies.iter().zip(&names).enumerate() {
        let expected = format!(
            "*3\r\n$9\r\nsubscribe\r\n${}\r\n{name}\r\n:{}\r\n",
            name.len(),
            i + 1
        );
        assert_eq!(String::from_utf8_lossy(reply), expected);
    }
    assert_eq!(
        subscriber_connection(&redis),
        Some(connection),
        "the subscriber connection was dropped"
    );
    let mut publisher = redmux.raw().await;
    assert_eq!(publisher.call(&["PUBLISH", "steady", "on"]).await, ":1\r\n");
    assert_eq!(steady.reply_str().await, message("steady", "on"));
    // Unsubscribing them all goes the same way.
    let replies = big.pipeline(b"UNSUBSCRIBE\r\n", NAMES).await;
    assert_eq!(replies.len(), NAMES);
    let deadline = Deadline::new();
    loop {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query(&mut redis.direct())
            .unwrap();
        if channels == ["steady"] {
            break;
        }
        deadline
            .next_try(format!("{} channels upstream", channels.len()))
            .await;
    }
    assert_eq!(
        publisher.call(&["PUBLISH", "steady", "still"]).await,
        ":1\r\n"
    );
    assert_eq!(steady.reply_str().await, message("steady", "still"));
}

/// One subscriber's view of a trial of [`confirmations_keep_their_place_among_messages`]: the
/// frames it got, as strings.
async fn psubscribe_while_publishing(addr: SocketAddr, resp3: bool, channel: &str) -> Vec<String> {
    const MESSAGES: usize = 400;
    let mut sub = Raw::connect(addr).await;
    if resp3 {
        assert!(sub.call(&["HELLO", "3"]).await.starts_with('%'));
    }
    assert!(sub
        .call(&["SUBSCRIBE", channel])
        .await
        .contains("subscribe"));
    let mut publisher = Raw::connect(addr).await;
    let publishes: Vec<u8> = (0..MESSAGES)
        .flat_map(|i| {
            redmux::resp::encode_command([
                &b"PUBLISH"[..],
                channel.as_bytes(),
                format!("m{i}").as_bytes(),
            ])
        })
        .collect();
    let publishing = tokio::spawn(async move {
        assert_eq!(
            publisher.pipeline(&publishes, MESSAGES).await.len(),
            MESSAGES
        );
        publisher
    });
    let mut frames = Vec::new();
    // Midway through the messages.
    while frames.len() < 20 {
        frames.push(sub.reply_str().await);
    }
    sub.send(redmux::resp::encode_command([
        &b"PSUBSCRIBE"[..],
        format!("{channel}*").as_bytes(),
    ]))
    .await;
    while !frames.iter().any(|f| f.contains("$10\r\npsubscribe\r\n")) {
        frames.push(sub.reply_str().await);
    }
    // A last message, published once the pattern is confirmed: its pmessage ends the stream.
    let mut publisher = publishing.await.unwrap();
    publisher.call(&["PUBLISH", channel, "end"]).await;
    while !frames
        .last()
        .is_some_and(|f| f.contains("pmessage") && f.ends_with("$3\r\nend\r\n"))
    {
        frames.push(sub.reply_str().await);
    }
    frames
}

/// Messages and confirmations reach a client in the order Redis would send them on a
/// connection of its own: a subscriber of `X` PSUBSCRIBEs to `X*` while 400 messages to `X`
/// are published. Every `message` after the psubscribe confirmation has its `pmessage` twin
/// right after it, no `pmessage` comes before the confirmation, and the messages keep their
/// order. 30 trials each in RESP2 and RESP3, directly and through redmux. (Through redmux, the
/// confirmation used to overtake messages Redis sent before it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmations_keep_their_place_among_messages() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let direct: SocketAddr = redis.addr().parse().unwrap();
    for resp3 in [false, true] {
        let push = if resp3 { ">" } else { "*" };
        for trial in 0..30 {
            for (path, addr) in [("directly", direct), ("through redmux", redmux.addr)] {
                let channel = format!("order:{resp3}:{trial}:{}", path.len());
                let mut frames = psubscribe_while_publishing(addr, resp3, &channel).await;
                let context = format!("{path}, RESP{}, trial {trial}", if resp3 { 3 } else { 2 });
                let end = frames.split_off(frames.len() - 2);
                assert_eq!(
                    end[0],
                    format!(
                        "{push}3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n$3\r\nend\r\n",
                        channel.len()
                    ),
                    "{context}: the last message"
                );
                let confirmation = frames
                    .iter()
                    .position(|f| f.contains("psubscribe"))
                    .unwrap_or_else(|| panic!("{context}: no confirmation"));
                assert_eq!(
                    frames[confirmation],
                    format!(
                        "{push}3\r\n$10\r\npsubscribe\r\n${}\r\n{channel}*\r\n:2\r\n",
                        channel.len() + 1
                    ),
                    "{context}"
                );
                let mut next = 0;
                let mut i = 0;
                while i < frames.len() {
                    if i == confirmation {
                        i += 1;
                        continue;
                    }
                    let payload = format!("m{next}");
                    let message = format!(
                        "{push}3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
                        channel.len(),
                        payload.len()
                    );
                    assert_eq!(frames[i], message, "{context}: frame {i}");
                    if i > confirmation {
                        let twin = format!(
                            "{push}4\r\n$8\r\npmessage\r\n${}\r\n{channel}*\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
                            channel.len() + 1,
                            channel.len(),
                            payload.len()
                        );
                        assert_eq!(
                            frames.get(i + 1),
                            Some(&twin),
                            "{context}: the pmessage twin of message {next}, the \
                             confirmation came at frame {confirmation}"
                        );
                        i += 1;
                    }
                    next += 1;
                    i += 1;
                }
                assert_eq!(next, 400, "{context}");
            }
        }
    }
}

/// Redis with `reader`, who may use any command but only channels matching `chan:*`.
fn redis_with_reader() -> RedisServer {
    let redis = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "reader", "on", ">pw", "~*", "&chan:*", "+@all"][..])
        .query(&mut redis.direct())
        .unwrap();
    redis
}

/// Sends `steps` on a new connection to `addr`, each followed by a PING (one at a time, or
/// all in one write), and returns every frame received, HELLO's client id masked.
async fn frames_of(addr: SocketAddr, steps: &[&[&str]], pipelined: bool) -> Vec<String> {
    let mut raw = Raw::connect(addr).await;
    let ping = |i: usize| format!("step{i}");
    let request = |i: usize, step: &[&str]| {
        let mut bytes = redmux::resp::encode_command(step.iter().map(|a| a.as_bytes())).to_vec();
        bytes.extend_from_slice(&redmux::resp::encode_command([
            &b"PING"[..],
            ping(i).as_bytes(),
        ]));
        bytes
    };
    // A PING's reply, in whichever form the connection's state gives it.
    let is_pong =
        |frame: &str, i: usize| frame.ends_with(&format!("${}\r\n{}\r\n", ping(i).len(), ping(i)));
    if pipelined {
        let all: Vec<u8> = steps
            .iter()
            .enumerate()
            .flat_map(|(i, s)| request(i, s))
            .collect();
        raw.send(all).await;
    }
    let mut frames = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        if !pipelined {
            raw.send(request(i, step)).await;
        }
        loop {
            let frame = raw.reply_str().await;
            let done = is_pong(&frame, i);
            frames.push(match frame.split_once("$2\r\nid\r\n:") {
                Some((head, tail)) => {
                    let rest = tail.split_once("\r\n").map_or("", |(_, rest)| rest);
                    format!("{head}$2\r\nid\r\n:ID\r\n{rest}")
                }
                None => frame,
            });
            if done {
                break;
            }
        }
    }
    frames
}

/// The id of the subscriber connection Redis has logged in as `user`.
fn hub_connection(redis: &RedisServer, user: &str) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap();
    list.lines()
        .find(|line| {
            line.contains(&format!(" user={user} ")) && !line.contains(" sub=0 psub=0 ssub=0 ")
        })
        .and_then(|line| line.split(' ').next())
        .map(str::to_owned)
}

/// A user's hub: Redis refuses a (P|S)SUBSCRIBE naming a channel the user may not use, as a
/// whole, with -NOPERM. The client gets exactly that, and its subscriptions and counts are as
/// if the command never ran. The same steps directly and through redmux, one at a time and
/// pipelined, in RESP2 and RESP3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_refused_as_by_redis() {
    let redis = redis_with_reader();
    let redmux = Redmux::start(&redis.addr()).await;
    for login in [
        &["AUTH", "reader", "pw"][..],
        &["HELLO", "3", "AUTH", "reader", "pw"],
    ] {
        let steps: &[&[&str]] = &[
            login,
            &["SUBSCRIBE", "chan:1"],
            &["SUBSCRIBE", "chan:2", "secret", "chan:3"],
            &["SUBSCRIBE", "chan:4", "chan:1"],
            &["PSUBSCRIBE", "other*"],
            &["PSUBSCRIBE", "chan:*"],
            &["SSUBSCRIBE", "secret"],
            &["SSUBSCRIBE", "chan:s"],
            &["UNSUBSCRIBE", "chan:2", "chan:1"],
            &["SUBSCRIBE", "secret"],
            &["PUNSUBSCRIBE"],
            &["SUNSUBSCRIBE"],
            &["UNSUBSCRIBE"],
            &["SUBSCRIBE", "chan:5", "nope"],
            &["SUBSCRIBE", "chan:6"],
        ];
        let direct = redis.addr().parse().unwrap();
        let expected = frames_of(direct, steps, false).await;
        let refusals = expected
            .iter()
            .filter(|frame| frame.starts_with("-NOPERM this user has no permissions to access one of the channels used as arguments\r\n"))
            .count();
        assert_eq!(refusals, 5, "{expected:?}");
        for pipelined in [false, true] {
            assert_eq!(
                frames_of(redmux.addr, steps, pipelined).await,
                expected,
                "{login:?}, pipelined: {pipelined}"
            );
        }
    }
    // A user who may not run SUBSCRIBE at all gets Redis's words for that.
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "nosub",
                "on",
                ">pw",
                "~*",
                "&*",
                "+@all",
                "-subscribe",
            ][..],
        )
        .query(&mut redis.direct())
        .unwrap();
    let steps: &[&[&str]] = &[
        &["AUTH", "nosub", "pw"],
        &["SUBSCRIBE", "chan:1"],
        &["PSUBSCRIBE", "chan:*"],
        &["SUBSCRIBE", "chan:2"],
    ];
    let expected = frames_of(redis.addr().parse().unwrap(), steps, false).await;
    assert_eq!(
        expected[2],
        "-NOPERM this user has no permissions to run the 'subscribe' command\r\n"
    );
    assert_eq!(frames_of(redmux.addr, steps, true).await, expected);
}

/// Clients of the same user's hub are not affected by another's refused SUBSCRIBE, even when
/// it names a channel they are subscribing to at the same moment, and the hub's connection
/// stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_the_refused_clients_alone() {
    let redis = redis_with_reader();
    let redmux = Redmux::start(&redis.addr()).await;
    let login = async || {
        let mut raw = redmux.raw().await;
        assert_eq!(raw.call(&["AUTH", "reader", "pw"]).await, "+OK\r\n");
        raw
    };
    let mut steady = login().await;
    assert_eq!(
        steady.call(&["SUBSCRIBE", "chan:steady"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$11\r\nchan:steady\r\n:1\r\n"
    );
    let connection = hub_connection(&redis, "reader").expect("the user's hub connection");
    let mut publisher = login().await;
    let nopermission =
        "-NOPERM this user has no permissions to access one of the channels used as arguments\r\n";
    for round in 0..20 {
        let (x, y) = (format!("chan:x{round}"), format!("chan:y{round}"));
        let mut refused = login().await;
        let mut other = login().await;
        // Both requests reach the hub together; the refused one names `x` too.
        let (a, b) = tokio::join!(
            refused.send(redmux::resp::encode_command([
                &b"SUBSCRIBE"[..],
                x.as_bytes(),
                b"secret"
            ])),
            other.send(redmux::resp::encode_command([
                &b"SUBSCRIBE"[..],
                x.as_bytes(),
                y.as_bytes()
            ])),
        );
        let ((), ()) = (a, b);
        assert_eq!(refused.reply_str().await, nopermission, "round {round}");
        assert_eq!(
            other.reply_str().await,
            format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{x}\r\n:1\r\n", x.len())
        );
        assert_eq!(
            other.reply_str().await,
            format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{y}\r\n:2\r\n", y.len())
        );
        // The refused client is not subscribed to anything; the other gets its messages.
        assert_eq!(refused.call(&["PING"]).await, "+PONG\r\n");
        assert_eq!(
            publisher.call(&["PUBLISH", &x, "hi"]).await,
            ":1\r\n",
            "round {round}"
        );
        assert_eq!(other.reply_str().await, message(&x, "hi"));
        assert_eq!(
            refused.call(&["SUBSCRIBE", &y]).await,
            format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n{y}\r\n:1\r\n", y.len())
        );
        assert_eq!(publisher.call(&["PUBLISH", &y, "both"]).await, ":2\r\n");
        assert_eq!(other.reply_str().await, message(&y, "both"));
        assert_eq!(refused.reply_str().await, message(&y, "both"));
    }
    assert_eq!(
        publisher.call(&["PUBLISH", "chan:steady", "on"]).await,
        ":1\r\n"
    );
    assert_eq!(steady.reply_str().await, message("chan:steady", "on"));
    assert_eq!(
        hub_connection(&redis, "reader"),
        Some(connection),
        "the hub's connection was dropped"
    );
}

/// When Redis takes a channel away from a user, it closes that user's clients subscribed to
/// it, and keeps the others. Redis closes the user's hub connection, which holds them all;
/// the hub reconnects, finds which name Redis refuses now, and closes the clients that held
/// it, as Redis closes them when they are connected directly. The others keep their
/// subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_taken_from_a_user_closes_its_subscribers_as_redis_does() {
    for through_redmux in [false, true] {
        let redis = redis_with_reader();
        let redmux = Redmux::start(&redis.addr()).await;
        let addr = match through_redmux {
            true => redmux.addr,
            false => redis.addr().parse().unwrap(),
        };
        let mut clients = Vec::new();
        for channel in ["chan:1", "chan:2", "chan:3"] {
            let mut raw = Raw::connect(addr).await;
            assert_eq!(raw.call(&["AUTH", "reader", "pw"]).await, "+OK\r\n");
            assert!(raw.call(&["SUBSCRIBE", channel]).await.contains(channel));
            clients.push(raw);
        }
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "reader", "resetchannels", "&chan:2", "&chan:3"][..])
            .query(&mut redis.direct())
            .unwrap();
        clients[0].expect_closed().await;
        wait_numsub(&redis, "chan:2", 1);
        wait_numsub(&redis, "chan:3", 1);
        let mut publisher = redis.direct();
        for (raw, channel) in clients[1..].iter_mut().zip(["chan:2", "chan:3"]) {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg("still")
                .query(&mut publisher)
                .unwrap();
            assert_eq!(
                raw.reply_str().await,
                message(channel, "still"),
                "through redmux: {through_redmux}"
            );
        }
    }
}

/// What one subscriber of `victim` gets when another client subscribes to `evil` and a direct
/// connection publishes, in one write, a message to `evil` longer than Redis's pubsub output
/// limit and then `m1` to `victim`.
async fn victim_after_an_oversized_publish(redis: &RedisServer, addr: SocketAddr) -> Vec<u8> {
    let mut victim = Raw::connect(addr).await;
    victim.send("SUBSCRIBE victim\r\n").await;
    victim.reply().await;
    let mut attacker = Raw::connect(addr).await;
    attacker.send("SUBSCRIBE evil\r\n").await;
    attacker.reply().await;
    let mut publisher = Raw::connect(redis.addr().parse().unwrap()).await;
    let big = "x".repeat(2 * 1024 * 1024);
    let mut bytes =
        redmux::resp::encode_command([&b"PUBLISH"[..], b"evil", big.as_bytes()]).to_vec();
    bytes.extend_from_slice(b"PUBLISH victim m1\r\n");
    publisher.pipeline(&bytes, 2).await;
    tokio::time::timeout(Duration::from_secs(2), victim.reply())
        .await
        .unwrap_or_default()
}

/// Redis closes a subscriber connection whose unread output passes its pubsub limit. Directly,
/// that is the connection of the one client subscribed to the oversized message; through
/// redmux it is the hub every subscriber shares, so one client's PUBLISH makes every other
/// subscriber miss what is published until the hub has reconnected, without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "open: Redis drops the shared hub connection for one oversized message; the hub \
            reconnects and every subscriber silently misses what was published meanwhile"]
async fn one_oversized_message_costs_other_subscribers_nothing() {
    let redis = RedisServer::start_with(&["--client-output-buffer-limit", "pubsub 1mb 1mb 0"]);
    let redmux = Redmux::start(&redis.addr()).await;
    let direct = victim_after_an_oversized_publish(&redis, redis.addr().parse().unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&direct), message("victim", "m1"));
    let through = victim_after_an_oversized_publish(&redis, redmux.addr).await;
    assert_eq!(
        String::from_utf8_lossy(&through),
        message("victim", "m1"),
        "through redmux"
    );
}

/// A RESP3 subscriber's PUBLISHes pipelined with other commands: the pushes its own PUBLISHes
/// cause, their replies and the other replies come in the order Redis sends them on one
/// connection, through patterns too, with replies skipped (CLIENT REPLY), and up to an
/// UNSUBSCRIBE or a RESET that follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscribers_pipelined_publishes_keep_redis_order() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    // (subscriptions, pipeline, frames it gets directly)
    let scenarios: [(&str, &str, usize); 5] = [
        (
            "SUBSCRIBE c",
            "PUBLISH c a\r\nPUBLISH c b\r\nPUBLISH other z\r\nPING\r\n",
            6,
        ),
        (
            "SUBSCRIBE c\r\nPSUBSCRIBE c*",
            "PUBLISH c a\r\nPUBLISH cx b\r\n",
            5,
        ),
        (
            "SUBSCRIBE c",
            "CLIENT REPLY SKIP\r\nPUBLISH c a\r\nPING\r\n",
            2,
        ),
        ("SUBSCRIBE c", "PUBLISH c a\r\nRESET\r\nPING\r\n", 4),
        (
            "SUBSCRIBE c",
            "PUBLISH c a\r\nUNSUBSCRIBE c\r\nPUBLISH c b\r\n",
            4,
        ),
    ];
    for (subscriptions, pipeline, frames) in scenarios {
        let mut seen = Vec::new();
        for addr in [redis.addr().parse().unwrap(), redmux.addr] {
            let mut raw = Raw::connect(addr).await;
            let setup = format!("HELLO 3\r\n{subscriptions}\r\n");
            let confirmations = 1 + subscriptions.lines().count();
            raw.pipeline(setup.as_bytes(), confirmations).await;
            let replies: Vec<String> = raw
                .pipeline(pipeline.as_bytes(), frames)
                .await
                .iter()
                .map(|reply| String::from_utf8_lossy(reply).into_owned())
                .collect();
            seen.push(replies);
            raw.send("QUIT\r\n").await;
            raw.reply().await;
            // The next client's counts must not include this one.
            let mut check = Raw::connect(redis.addr().parse().unwrap()).await;
            let deadline = Deadline::new();
            while check.call(&["PUBSUB", "NUMPAT"]).await != ":0\r\n"
                || check.call(&["PUBSUB", "NUMSUB", "c", "cx"]).await
                    != "*4\r\n$1\r\nc\r\n:0\r\n$2\r\ncx\r\n:0\r\n"
            {
                deadline.next_try("the subscriber to leave").await;
            }
        }
        assert_eq!(
            seen[1], seen[0],
            "{pipeline:?}: through redmux (left), directly (right)"
        );
    }
}

/// A RESP3 client subscribed to a channel it publishes to gets, directly, the message push
/// before PUBLISH's reply: Redis delivers during the command. Through redmux the two come over
/// different connections (the hub and the shared one), so the reply waits for the hub to have
/// passed on what Redis sent it before a PING sent after the PUBLISH ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscribers_own_publish_is_answered_after_its_message() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    for (subscribe, publish, kind) in [
        ("SUBSCRIBE", "PUBLISH", "message"),
        ("SSUBSCRIBE", "SPUBLISH", "smessage"),
    ] {
        for addr in [redis.addr().parse().unwrap(), redmux.addr] {
            let mut raw = Raw::connect(addr).await;
            raw.send(format!("HELLO 3\r\n{subscribe} c\r\n")).await;
            raw.reply().await;
            raw.reply().await;
            for round in 0..20 {
                raw.send(format!("{publish} c m{round}\r\n")).await;
                let first = String::from_utf8_lossy(&raw.reply().await).into_owned();
                let second = String::from_utf8_lossy(&raw.reply().await).into_owned();
                let push = format!(
                    ">3\r\n${}\r\n{kind}\r\n$1\r\nc\r\n${}\r\nm{round}\r\n",
                    kind.len(),
                    1 + round.to_string().len()
                );
                assert_eq!(
                    (first, second),
                    (push, ":1\r\n".to_owned()),
                    "{publish} at {addr}, round {round}"
                );
            }
        }
    }
}
