//! redmux is transparent: the same steps give the same bytes through redmux as from Redis
//! directly, where a client's state and a pinned connection's state could drift apart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use support::{Raw, RedisServer, Redmux};

/// Sends `bytes` (holding `count` requests) in one write and reads `count` replies.
async fn pipeline(raw: &mut Raw, bytes: &[u8], count: usize) -> Vec<String> {
    raw.pipeline(bytes, count)
        .await
        .into_iter()
        .map(|reply| String::from_utf8_lossy(&reply).into_owned())
        .collect()
}

/// Runs `steps` (one command a line, inline form) one at a time, directly against Redis and
/// then through redmux, each after FLUSHALL, then reads `check` (more steps) from each: the
/// replies must be the same bytes.
async fn same_as_redis(redis: &RedisServer, redmux: &Redmux, steps: &[&str], pipelined: bool) {
    let direct_addr = redis.addr().parse().expect("redis address");
    let mut results = Vec::new();
    for addr in [direct_addr, redmux.addr] {
        let mut raw = Raw::connect(addr).await;
        assert_eq!(raw.call(&["FLUSHALL"]).await, "+OK\r\n");
        let replies = if pipelined {
            let bytes: String = steps.iter().map(|s| format!("{s}\r\n")).collect();
            pipeline(&mut raw, bytes.as_bytes(), steps.len()).await
        } else {
            let mut replies = Vec::new();
            for step in steps {
                replies.extend(pipeline(&mut raw, format!("{step}\r\n").as_bytes(), 1).await);
            }
            replies
        };
        results.push(replies);
    }
    let labelled = |replies: &[String]| -> Vec<String> {
        steps
            .iter()
            .zip(replies)
            .map(|(step, reply)| format!("{step} -> {:?}", without_client_id(reply)))
            .collect()
    };
    assert_eq!(
        labelled(&results[1]),
        labelled(&results[0]),
        "through redmux (left) and directly (right), pipelined: {pipelined}"
    );
}

/// A HELLO reply with its client id masked: ids differ between two servers by design.
fn without_client_id(reply: &str) -> String {
    match reply.split_once("$2\r\nid\r\n:") {
        Some((head, tail)) => {
            let rest = tail.split_once("\r\n").map_or("", |(_, rest)| rest);
            format!("{head}$2\r\nid\r\n:ID\r\n{rest}")
        }
        None => reply.to_owned(),
    }
}

/// Issue steps: a WATCH stays in the db it was issued in, and a command always runs in the
/// client's current db, even while the client holds a watching connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_while_watching_or_in_a_transaction_runs_where_redis_runs_it() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let cases: [&[&str]; 8] = [
        // RESET while watching or in a transaction: back to db 0, nothing watched.
        &[
            "SELECT 3", "WATCH k", "RESET", "SET k v", "GET k", "SELECT 3", "GET k",
        ],
        &[
            "SELECT 3", "MULTI", "SET k v", "RESET", "EXEC", "GET k", "SELECT 3", "GET k",
        ],
        // While blocked, what follows waits, then runs where the client is by then.
        &[
            "BLPOP l 0.05",
            "SELECT 2",
            "SET k v",
            "SELECT 0",
            "GET k",
            "SELECT 2",
            "GET k",
        ],
        &[
            "SELECT 5", "SET x 30", "WATCH x", "SELECT 1", "SET x 10", "SELECT 5", "MULTI", "PING",
            "EXEC", "GET x", "SELECT 1", "GET x",
        ],
        // SELECT queued inside MULTI runs at EXEC: the commands after it run in that db, and
        // the client stays there.
        &[
            "SET k zero",
            "MULTI",
            "SELECT 3",
            "SET k three",
            "EXEC",
            "GET k",
            "SELECT 0",
            "GET k",
        ],
        // A transaction whose WATCH fails does not move the client.
        &[
            "SET w 1",
            "WATCH w",
            "SET w 2",
            "MULTI",
            "SELECT 4",
            "EXEC",
            "SET where here",
            "SELECT 4",
            "GET where",
        ],
        // HELLO while watching: the replies of what follows are in the new protocol.
        &[
            "WATCH h",
            "HELLO 3",
            "HGETALL nothing",
            "MULTI",
            "HSET h f v",
            "EXEC",
            "HGETALL h",
        ],
        // Watches in two dbs, then a write to one of them from elsewhere in the same client.
        &[
            "SELECT 2",
            "WATCH a",
            "SELECT 6",
            "WATCH a",
            "SELECT 2",
            "SET a touched",
            "SELECT 6",
            "MULTI",
            "PING",
            "EXEC",
        ],
    ];
    for steps in cases {
        for pipelined in [false, true] {
            same_as_redis(&redis, &redmux, steps, pipelined).await;
        }
    }
    // The case, spelled out.
    let mut raw = redmux.raw().await;
    for step in [
        &["SELECT", "5"][..],
        &["SET", "x", "30"],
        &["WATCH", "x"],
        &["SELECT", "1"],
        &["SET", "x", "10"],
        &["SELECT", "5"],
        &["MULTI"],
        &["PING"],
    ] {
        raw.call(step).await;
    }
    assert_eq!(raw.call(&["EXEC"]).await, "*1\r\n+PONG\r\n");
    let x = |db: u32| -> Option<String> {
        redis::cmd("GET")
            .arg("x")
            .query(&mut redis.direct_db(db))
            .unwrap()
    };
    assert_eq!(x(5).as_deref(), Some("30"));
    assert_eq!(x(1).as_deref(), Some("10"));
}

/// CLIENT REPLY OFF while watching silences the commands on the watching connection too, and
/// ON brings the replies back, as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_while_watching() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let steps = "WATCH k\r\nCLIENT REPLY OFF\r\nSET k 1\r\nSELECT 1\r\nCLIENT REPLY ON\r\nGET k\r\nSELECT 0\r\nGET k\r\nMULTI\r\nEXEC\r\n";
    let mut expected = None;
    for addr in [redis.addr().parse().unwrap(), redmux.addr] {
        let mut raw = Raw::connect(addr).await;
        assert_eq!(raw.call(&["FLUSHALL"]).await, "+OK\r\n");
        let replies = pipeline(&mut raw, steps.as_bytes(), 7).await;
        match &expected {
            None => expected = Some(replies),
            Some(expected) => assert_eq!(&replies, expected),
        }
    }
    assert_eq!(
        expected.unwrap(),
        [
            "+OK\r\n",
            "+OK\r\n",
            "$-1\r\n",
            "+OK\r\n",
            "$1\r\n1\r\n",
            "+OK\r\n",
            "*-1\r\n"
        ]
    );
}

/// Waits until Redis answers a direct PING with `-BUSY`: a script has run past
/// `busy-reply-threshold`.
async fn wait_busy(redis: &RedisServer) {
    let deadline = support::Deadline::new();
    let mut direct = Raw::connect(redis.addr().parse().unwrap()).await;
    loop {
        if direct.call(&["PING"]).await.starts_with("-BUSY") {
            return;
        }
        deadline.next_try("Redis busy with the script").await;
    }
}

/// One runaway script or function, killed through `killer`: what the script's client got,
/// what FUNCTION STATS said while it ran, and the kill's reply.
async fn run_and_kill(
    redis: &RedisServer,
    addr: std::net::SocketAddr,
    run: &[&str],
    kill: &[&str],
) -> (String, String, String) {
    let mut runner = Raw::connect(addr).await;
    runner
        .send(redmux::resp::encode_command(
            run.iter().map(|a| a.as_bytes()),
        ))
        .await;
    wait_busy(redis).await;
    let mut other = Raw::connect(addr).await;
    let stats = other.call(&["FUNCTION", "STATS"]).await;
    let killed = other.call(kill).await;
    (runner.reply_str().await, stats, killed)
}

/// SCRIPT KILL, FUNCTION KILL and FUNCTION STATS reach a busy Redis at once through redmux,
/// and each client gets what it would get directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_scripts_and_functions_are_killed_as_directly() {
    let redis = RedisServer::start_with(&["--busy-reply-threshold", "100"]);
    let redmux = Redmux::start(&redis.addr()).await;
    let mut direct = redis.direct();
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(
            "#!lua name=spinlib\nredis.register_function('spin', function() while true do end end)",
        )
        .query(&mut direct)
        .unwrap();
    let direct_addr = redis.addr().parse().unwrap();
    for (run, kill) in [
        (
            &["EVAL", "while true do end", "0"][..],
            &["SCRIPT", "KILL"][..],
        ),
        (&["FCALL", "spin", "0"][..], &["FUNCTION", "KILL"][..]),
    ] {
        let expected = run_and_kill(&redis, direct_addr, run, kill).await;
        let got = run_and_kill(&redis, redmux.addr, run, kill).await;
        assert_eq!(got.0, expected.0, "{run:?}: the script's own reply");
        assert_eq!(got.2, "+OK\r\n", "{kill:?}");
        assert_eq!(got.2, expected.2);
        let without_duration = |stats: &str| -> String {
            match stats.split_once("duration_ms\r\n:") {
                Some((head, tail)) => {
                    format!(
                        "{head}duration_ms\r\n:N{}",
                        &tail[tail.find('\r').unwrap_or(0)..]
                    )
                }
                None => stats.to_owned(),
            }
        };
        assert_eq!(
            without_duration(&got.1),
            without_duration(&expected.1),
            "FUNCTION STATS while busy"
        );
        if run[0] == "FCALL" {
            assert!(
                got.1.starts_with("*4\r\n$14\r\nrunning_script\r\n*6\r\n"),
                "FUNCTION STATS while a function runs: {:?}",
                got.1
            );
        }
        // Redis is free again, and so is redmux's shared connection.
        let mut raw = redmux.raw().await;
        assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
    }
}

/// Every pinned connection held by a client blocked for ever (any client can do that with
/// `BLPOP k 0`) must not keep SCRIPT KILL from reaching a busy Redis: the one-request
/// connections of the kill commands are bounded apart from `max_pinned`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_script_is_killed_while_every_pinned_connection_is_held() {
    let redis = RedisServer::start_with(&["--busy-reply-threshold", "100"]);
    let mut config = support::config(&redis.addr());
    config.upstream.max_pinned = 2;
    let redmux = Redmux::start_with(config).await;
    let mut holders = Vec::new();
    for key in ["held:1", "held:2"] {
        let mut holder = redmux.raw().await;
        holder
            .send(redmux::resp::encode_command([
                &b"BLPOP"[..],
                key.as_bytes(),
                b"0",
            ]))
            .await;
        holders.push(holder);
    }
    let mut direct = redis.direct();
    let deadline = support::Deadline::new();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut direct)
            .unwrap();
        if info.contains("blocked_clients:2\r\n") {
            break;
        }
        deadline.next_try("both holders blocked in Redis").await;
    }
    let mut runner = redmux.raw().await;
    runner
        .send(redmux::resp::encode_command([
            &b"EVAL"[..],
            b"while true do end",
            b"0",
        ]))
        .await;
    wait_busy(&redis).await;
    let mut killer = redmux.raw().await;
    assert_eq!(killer.call(&["SCRIPT", "KILL"]).await, "+OK\r\n");
    assert!(
        runner
            .reply_str()
            .await
            .starts_with("-ERR Script killed by user with SCRIPT KILL"),
        "the script's client gets Redis's error"
    );
    assert_eq!(killer.call(&["PING"]).await, "+PONG\r\n");
}

/// CLIENT REPLY SKIP is used up by the next command whatever it is, (UN)SUBSCRIBE, MONITOR
/// and an empty request included; MONITOR's `+OK` is a plain reply it silences; `CLIENT REPLY ON` clears a pending
/// SKIP and is answered. Each compared with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_skip_is_used_up_as_by_redis() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    for (steps, count) in [
        ("CLIENT REPLY SKIP\r\nCLIENT REPLY ON\r\nPING\r\n", 2),
        ("CLIENT REPLY SKIP\r\nSUBSCRIBE c\r\nPING\r\n", 2),
        (
            "CLIENT REPLY SKIP\r\nPSUBSCRIBE c*\r\nPUNSUBSCRIBE\r\nPING\r\n",
            3,
        ),
        ("CLIENT REPLY SKIP\r\nUNSUBSCRIBE c\r\nPING\r\n", 2),
        ("CLIENT REPLY SKIP\r\nRESET\r\nPING\r\n", 1),
        // An empty request is a command of no arguments to Redis, which uses up the SKIP.
        ("CLIENT REPLY SKIP\r\n\r\nPING\r\nECHO end\r\n", 2),
        ("CLIENT REPLY SKIP\r\n*0\r\nPING\r\n", 1),
        ("CLIENT REPLY SKIP\r\n*-1\r\nPING\r\n", 1),
        // The first reply only: the MONITOR feed follows on its own connection.
        ("CLIENT REPLY SKIP\r\nMONITOR\r\nPING\r\n", 1),
    ] {
        let mut expected = None;
        for addr in [redis.addr().parse().unwrap(), redmux.addr] {
            let mut raw = Raw::connect(addr).await;
            let replies = tokio::time::timeout(
                support::READY_TIMEOUT,
                pipeline(&mut raw, steps.as_bytes(), count),
            )
            .await
            .unwrap_or_else(|_| panic!("{steps:?}: fewer than {count} replies from {addr}"));
            match &expected {
                None => expected = Some(replies),
                Some(expected) => assert_eq!(&replies, expected, "{steps:?}"),
            }
        }
    }
}

/// EXEC with arguments gets Redis's arity answer before anything else, after a command
/// redmux refused while queuing too (a name with a NUL byte, which redmux never forwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_arguments_is_refused_for_its_arity_first() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let steps = b"MULTI\r\n*1\r\n$10\r\nsubscribe\0\r\nEXEC x\r\nPING\r\n";
    let mut expected = None;
    for addr in [redis.addr().parse().unwrap(), redmux.addr] {
        let mut raw = Raw::connect(addr).await;
        let replies = pipeline(&mut raw, steps, 4).await;
        match &expected {
            None => expected = Some(replies),
            Some(expected) => assert_eq!(&replies, expected, "through redmux, directly"),
        }
    }
    assert_eq!(
        expected.unwrap()[2],
        "-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n"
    );
}

/// A blocking command's timeout too large for Redis gets Redis's own error ("timeout is out
/// of range"), not a lost connection: redmux adds `request_timeout` to the timeout it reads
/// and must not overflow doing so. Alone, pipelined, queued in a transaction, and in front of
/// the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_timeout_out_of_range_gets_redis_error() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let steps = [
        "BLPOP l 1e19",
        "BRPOP l 1.8e19",
        "BLMOVE l m LEFT RIGHT 9.3e18",
        "BZPOPMIN z 1e300",
        "XREAD BLOCK 99999999999999999999 STREAMS s $",
        "MULTI",
        "BLPOP l 1e19",
        "EXEC",
        "PING",
    ];
    same_as_redis(&redis, &redmux, &steps, false).await;
    same_as_redis(&redis, &redmux, &steps, true).await;
}

/// Redis reads a blocking command's seconds with `strtold`, which takes hex floats: `BLPOP l
/// 0x1.8p0` blocks for 1.5 s there. redmux cannot read that number, so it must not cut the
/// wait short at `request_timeout` (1 s here): the client gets Redis's `*-1` when Redis's
/// timeout ends, as directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_timeout_in_hex_blocks_as_long_as_redis_reads_it() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.upstream.request_timeout = std::time::Duration::from_secs(1);
    let redmux = Redmux::start_with(config).await;
    same_as_redis(&redis, &redmux, &["BLPOP l 0x1.8p0", "PING"], false).await;
}
