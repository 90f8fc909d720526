//! Upstream failures: every request gets its reply or an error within the configured time, none
//! is written twice, and service comes back on its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::{Duration, Instant};

use support::{Deadline, RedisServer, Redmux};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(700);
/// How soon service must come back once Redis is up again: the reconnect backoff's 1 s cap, plus
/// slack for a loaded CI machine (2 s in all once fell short there).
const RECOVERY: Duration = Duration::from_secs(5);

fn config(upstream: &str) -> redmux::Config {
    let mut config = support::config(upstream);
    config.upstream.connect_timeout = CONNECT_TIMEOUT;
    config.upstream.request_timeout = REQUEST_TIMEOUT;
    config
}

/// Sends PING until it is answered +PONG, for at most `within`.
async fn wait_recovered(redmux: &Redmux, within: Duration) {
    let deadline = Deadline::within(within);
    let mut raw = redmux.raw().await;
    while raw.call(&["PING"]).await != "+PONG\r\n" {
        deadline.next_try("no recovery").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_at_start_gives_errors_then_recovers() {
    let port = support::free_port();
    let redmux = Redmux::start_with(config(&format!("127.0.0.1:{port}"))).await;
    let mut raw = redmux.raw().await;
    let started = Instant::now();
    assert_eq!(
        raw.call(&["PING"]).await,
        "-ERR redmux: upstream unavailable\r\n"
    );
    let waited = started.elapsed();
    assert!(
        waited >= CONNECT_TIMEOUT - Duration::from_millis(50),
        "{waited:?}"
    );
    assert!(
        waited < CONNECT_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
    // A pipeline gets one error per request, so the client's replies stay aligned.
    raw.send("PING\r\nPING\r\nPING\r\n").await;
    for _ in 0..3 {
        assert_eq!(
            raw.reply_str().await,
            "-ERR redmux: upstream unavailable\r\n"
        );
    }
    let mut redis = RedisServer::start();
    // Reuse the port redmux was pointed at: restart the fresh server there.
    redis.port = port;
    redis.restart();
    // This client's own connection (each serving thread has one) recovers too.
    let deadline = Deadline::within(RECOVERY);
    while raw.call(&["PING"]).await != "+PONG\r\n" {
        deadline.next_try("no recovery").await;
    }
    wait_recovered(&redmux, RECOVERY).await;
    assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_flight() {
    let mut redis = RedisServer::start();
    let mut config = config(&redis.addr());
    config.upstream.request_timeout = Duration::from_secs(10);
    let redmux = Redmux::start_with(config).await;
    let mut slow = redmux.raw().await;
    assert_eq!(slow.call(&["SET", "k", "before"]).await, "+OK\r\n");
    // A request that is surely in flight when Redis dies: DEBUG SLEEP keeps Redis busy, and
    // the INCR queued behind it is written but not yet run.
    slow.send(
        "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n5\r\n*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n",
    )
    .await;
    // Redis is inside the DEBUG SLEEP once it stops answering PING.
    while support::answers_ping(redis.port, Duration::from_millis(100)) {}
    redis.kill();
    assert_eq!(
        slow.reply_str().await,
        "-ERR redmux: upstream connection lost\r\n"
    );
    assert_eq!(
        slow.reply_str().await,
        "-ERR redmux: upstream connection lost\r\n"
    );
    redis.restart();
    wait_recovered(&redmux, RECOVERY).await;
    assert_eq!(slow.call(&["SET", "k", "after"]).await, "+OK\r\n");
    // The INCR that was in flight was not replayed on the new connection.
    let counter: Option<i64> = redis::Commands::get(&mut redis.direct(), "counter").unwrap();
    assert_eq!(counter, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stalled_times_out_resets_and_recovers() {
    let redis = RedisServer::start();
    let redmux = Redmux::start_with(config(&redis.addr())).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
    redis.signal("STOP");
    let started = Instant::now();
    assert_eq!(
        raw.call(&["INCR", "stalled"]).await,
        "-ERR redmux: upstream request timed out\r\n"
    );
    let waited = started.elapsed();
    assert!(waited >= REQUEST_TIMEOUT, "{waited:?}");
    assert!(
        waited < REQUEST_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
    redis.signal("CONT");
    wait_recovered(&redmux, RECOVERY).await;
    // The INCR was written once and ran once, when Redis woke; its late reply went nowhere
    // (the connection had been reset), and it was not replayed.
    let mut other = redmux.raw().await;
    assert_eq!(other.call(&["GET", "stalled"]).await, "$1\r\n1\r\n");
    assert_eq!(raw.call(&["ECHO", "mine"]).await, "$4\r\nmine\r\n");
}

/// Upstream connections are AUTHed and SELECTed as configured before any client request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_auth_and_db() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/5", redis.port);
    let redmux = Redmux::start_with(config(&url)).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["SET", "where", "db5"]).await, "+OK\r\n");
    let mut direct = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let value: String = redis::Commands::get(&mut direct, "where").unwrap();
    assert_eq!(value, "db5");

    // A wrong password: requests fail with an error, never hang.
    let wrong = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let redmux = Redmux::start_with(config(&wrong)).await;
    let mut raw = redmux.raw().await;
    assert_eq!(
        raw.call(&["PING"]).await,
        "-ERR redmux: upstream unavailable\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    let socket_arg = socket.display().to_string();
    let _redis = RedisServer::start_with(&["--unixsocket", &socket_arg]);
    let redmux = Redmux::start_with(config(&format!("unix://{socket_arg}"))).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
}

/// Many requests in flight across many clients while the upstream dies: each one gets exactly
/// one reply or error, and no INCR runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_runs_twice_across_a_crash() {
    let mut redis = RedisServer::start();
    let redmux = Redmux::start_with(config(&redis.addr())).await;
    let mut clients = Vec::new();
    for id in 0..16 {
        let addr = redmux.addr;
        clients.push(tokio::spawn(async move {
            let mut raw = support::Raw::connect(addr).await;
            let mut ok = 0u64;
            let mut failed = 0u64;
            for _ in 0..200 {
                let reply = raw.call(&["INCR", "total"]).await;
                if reply.starts_with(':') {
                    ok += 1;
                } else {
                    assert!(
                        reply.starts_with("-ERR redmux: upstream"),
                        "client {id}: {reply}"
                    );
                    failed += 1;
                }
            }
            (ok, failed)
        }));
    }
    // Crash Redis mid-traffic: once a good part of the INCRs have run.
    let mut direct = redis.direct();
    let deadline = Deadline::new();
    loop {
        let total: Option<u64> = redis::Commands::get(&mut direct, "total").unwrap();
        if total.unwrap_or(0) >= 500 {
            break;
        }
        // No pause between looks: the crash must come while the INCRs are still running.
        deadline.check("500 INCRs");
        tokio::task::yield_now().await;
    }
    redis.kill();
    redis.restart();
    let mut sent_ok = 0;
    let mut sent = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        sent_ok += ok;
        sent += ok + failed;
    }
    assert_eq!(sent, 16 * 200, "every request got exactly one answer");
    let total: Option<u64> = redis::Commands::get(&mut redis.direct(), "total").unwrap();
    // Redis lost its data in the crash; what ran after the restart must not exceed what was
    // acknowledged plus what failed in flight, and nothing may have run twice.
    assert!(
        total.unwrap_or(0) <= sent,
        "INCR ran more often than it was sent"
    );
    assert!(sent_ok >= total.unwrap_or(0));
}

/// A Redis that accepts the connection and then refuses it (max clients reached): the refusal
/// is caught by the handshake PING, never handed to a client as a reply, and redmux backs off
/// until a slot frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_is_not_a_reply() {
    let redis = RedisServer::start_with(&["--maxclients", "1"]);
    let occupant = redis.direct();
    let redmux = Redmux::start_with(config(&redis.addr())).await;
    let mut raw = redmux.raw().await;
    assert_eq!(
        raw.call(&["PING"]).await,
        "-ERR redmux: upstream unavailable\r\n"
    );
    drop(occupant);
    wait_recovered(&redmux, Duration::from_secs(3)).await;
}

/// Connection state under faults: a transaction whose connection dies fails as a whole and
/// nothing in it runs outside it; subscriptions come back by themselves after a Redis restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_subscriptions_across_a_crash() {
    let mut redis = RedisServer::start();
    let redmux = Redmux::start_with(config(&redis.addr())).await;
    let mut tx = redmux.raw().await;
    let mut sub = redmux.raw().await;
    assert_eq!(
        sub.call(&["SUBSCRIBE", "alerts"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$6\r\nalerts\r\n:1\r\n"
    );
    assert_eq!(tx.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(tx.call(&["SET", "in-tx", "1"]).await, "+QUEUED\r\n");
    redis.kill();
    redis.restart();
    // The pinned connection is gone with the transaction: every later command of it fails
    // instead of running outside it, until the client ends the transaction.
    let reply = tx.call(&["SET", "in-tx", "2"]).await;
    assert!(reply.starts_with("-ERR redmux: upstream"), "{reply}");
    let reply = tx.call(&["EXEC"]).await;
    assert!(reply.starts_with("-ERR redmux: upstream"), "{reply}");
    let in_tx: Option<String> = redis::Commands::get(&mut redis.direct(), "in-tx").unwrap();
    assert_eq!(in_tx, None, "nothing of the transaction ran");
    // After EXEC the client is out of the transaction and served normally again.
    wait_recovered(&redmux, RECOVERY).await;
    assert_eq!(tx.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(tx.call(&["SET", "in-tx", "3"]).await, "+QUEUED\r\n");
    assert_eq!(tx.call(&["EXEC"]).await, "*1\r\n+OK\r\n");
    // The subscriber connection resubscribed by itself.
    let deadline = Deadline::within(Duration::from_secs(5));
    loop {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("alerts")
            .query(&mut redis.direct())
            .unwrap();
        if n == 1 {
            break;
        }
        deadline.next_try("never resubscribed").await;
    }
    let mut publisher = redmux.raw().await;
    assert_eq!(
        publisher.call(&["PUBLISH", "alerts", "back"]).await,
        ":1\r\n"
    );
    assert_eq!(
        sub.reply_str().await,
        "*3\r\n$7\r\nmessage\r\n$6\r\nalerts\r\n$4\r\nback\r\n"
    );
}
