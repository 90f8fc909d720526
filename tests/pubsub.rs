//! Pub/sub through one shared subscriber connection.

mod support;

use std::time::{Duration, Instant};

use support::{Deadline, RedisServer, Redmux};

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
        assert_eq!(
            publisher.call(&["PUBLISH", "news", &format!("m{i}")]).await,
            ":1\r\n"
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
    let mut config = support::config(&redis.addr());
    config.server.client_output_limit = 4 * 1024 * 1024;
    let redmux = Redmux::start_with(config).await;
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
    let mut round = Vec::new();
    for _ in 0..100 {
        round.extend_from_slice(&redmux::resp::encode_command([
            &b"PUBLISH"[..],
            b"flood",
            payload.as_bytes(),
        ]));
    }
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
    let cases: [(&str, usize); 4] = [
        ("SUBSCRIBE x\r\nUNSUBSCRIBE x\r\nPING\r\n", 3),
        // A no-arg PUNSUBSCRIBE lists patterns in subscription order, after removals too.
        ("SUBSCRIBE c\r\nPSUBSCRIBE p3 p1 p2 p1\r\nPUNSUBSCRIBE p1 nope\r\nPSUBSCRIBE p0\r\nPUNSUBSCRIBE\r\nUNSUBSCRIBE\r\nPING\r\n", 13),
        ("SUBSCRIBE a b a\r\nPSUBSCRIBE p*\r\nSSUBSCRIBE s\r\nSUBSCRIBE c\r\nSUNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nUNSUBSCRIBE a b c\r\nPING\r\n", 12),
        ("SUBSCRIBE a\r\nRESET\r\nPING\r\n", 3),
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
