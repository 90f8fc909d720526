//! One client never reaches another, and a client's own commands run in the order it sent them,
//! whichever upstream connections they take. Each test speaks raw RESP to redmux and, where
//! Redis's own answer is the reference, sends the same bytes to a redis-server directly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use redmux::config::{Secret, UserConfig};
use support::{Raw, RedisServer, Redmux};

/// The reply Redis gives a command name it does not find, `multi\0…` included: it prints the
/// name as a C string.
const UNKNOWN_MULTI: &str = "-ERR unknown command 'multi', with args beginning with: \r\n";

/// A multibulk request from raw byte arguments.
fn request(args: &[&[u8]]) -> Vec<u8> {
    redmux::resp::encode_command(args.iter().copied()).to_vec()
}

/// Sends `bytes` (holding `count` requests) in one write and reads `count` replies.
async fn pipeline(raw: &mut Raw, bytes: &[u8], count: usize) -> Vec<String> {
    raw.pipeline(bytes, count)
        .await
        .into_iter()
        .map(|reply| String::from_utf8_lossy(&reply).into_owned())
        .collect()
}

/// The same pipeline, once directly to Redis and once through redmux, each after emptying
/// Redis: the replies must be the same bytes.
async fn same_as_redis(redis: &RedisServer, redmux: &Redmux, bytes: &[u8], count: usize) {
    let mut direct = Raw::connect(redis.addr().parse().expect("redis address")).await;
    assert_eq!(direct.call(&["FLUSHALL"]).await, "+OK\r\n");
    let expected = pipeline(&mut direct, bytes, count).await;
    let mut through = redmux.raw().await;
    assert_eq!(through.call(&["FLUSHALL"]).await, "+OK\r\n");
    let got = pipeline(&mut through, bytes, count).await;
    assert_eq!(
        got,
        expected,
        "redmux differs from Redis for {:?}",
        String::from_utf8_lossy(bytes)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_command_name_never_reaches_the_shared_connection() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut victim = redmux.raw().await;
    let mut attacker = redmux.raw().await;
    assert_eq!(
        victim.call(&["SET", "victimkey", "secret"]).await,
        "+OK\r\n"
    );
    // Redis runs `multi\0N` as MULTI for about one N in 256: a thousand tries would open a
    // transaction on the shared connection several times over.
    for n in 0..1000u32 {
        let name = format!("multi\0{n}");
        let replies = pipeline(&mut attacker, &request(&[name.as_bytes()]), 1).await;
        assert_eq!(replies, [UNKNOWN_MULTI], "{name:?}");
        if n % 50 == 0 {
            // Another client's commands are not queued in anybody's transaction.
            assert_eq!(victim.call(&["GET", "victimkey"]).await, "$6\r\nsecret\r\n");
        }
    }
    // The other connection-state commands, with arguments that would do harm.
    let attacks: [&[&[u8]]; 6] = [
        &[b"select\x0017", b"7"],
        &[b"client\x00a", b"REPLY", b"OFF"],
        &[b"hello\x00b", b"3"],
        &[b"monitor\x00c"],
        &[b"subscribe\x00d", b"ch"],
        &[b"exec\x00e"],
    ];
    for args in attacks {
        let name =
            String::from_utf8_lossy(&args[0][..args[0].iter().position(|b| *b == 0).unwrap_or(0)])
                .into_owned();
        let mut echoed = String::new();
        for arg in &args[1..] {
            echoed.push_str(&format!("'{}' ", String::from_utf8_lossy(arg)));
        }
        let expected =
            format!("-ERR unknown command '{name}', with args beginning with: {echoed}\r\n");
        assert_eq!(pipeline(&mut attacker, &request(args), 1).await, [expected]);
    }
    // The victim still writes to db 0, in RESP2, and gets its replies.
    assert_eq!(victim.call(&["SET", "after", "1"]).await, "+OK\r\n");
    assert_eq!(victim.call(&["GET", "victimkey"]).await, "$6\r\nsecret\r\n");
    let mut direct = redis.direct();
    let after: Option<String> = redis::cmd("GET").arg("after").query(&mut direct).unwrap();
    assert_eq!(after.as_deref(), Some("1"), "the write went to db 0");

    // Redis's own reply, when its lookup misses, is the same bytes.
    let mut direct_raw = Raw::connect(redis.addr().parse().unwrap()).await;
    let mut missed = false;
    for n in 0..20u32 {
        let name = format!("multi\0{n}");
        let reply = pipeline(&mut direct_raw, &request(&[name.as_bytes()]), 1).await;
        if reply[0].starts_with('-') {
            assert_eq!(reply, [UNKNOWN_MULTI]);
            missed = true;
            break;
        }
        // It ran MULTI: close the transaction again.
        assert_eq!(direct_raw.call(&["DISCARD"]).await, "+OK\r\n");
    }
    assert!(missed, "Redis missed none of 20 names");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcommands_and_options_with_a_nul_are_read_as_redis_reads_them() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    // SCRIPT DEBUG would turn the shared connection into a debugger.
    assert_eq!(
        pipeline(&mut raw, &request(&[b"SCRIPT", b"debug\x00x", b"yes"]), 1).await,
        ["-ERR unknown subcommand 'debug'. Try SCRIPT HELP.\r\n"]
    );
    assert_eq!(
        pipeline(&mut raw, &request(&[b"SCRIPT", b"DEBUG", b"yes"]), 1).await,
        ["-ERR redmux: SCRIPT DEBUG is not supported yet\r\n"]
    );
    // Redis takes `block\0` for BLOCK: it must block on a connection of its own, so a PING from
    // another client is answered while it waits.
    let mut blocked = redmux.raw().await;
    blocked
        .send(request(&[
            b"XREAD",
            b"block\x00",
            b"0",
            b"STREAMS",
            b"s",
            b"$",
        ]))
        .await;
    let mut other = redmux.raw().await;
    for _ in 0..5 {
        assert_eq!(other.call(&["PING"]).await, "+PONG\r\n");
    }
    let mut direct = redis.direct();
    let _: String = redis::cmd("XADD")
        .arg("s")
        .arg("*")
        .arg("f")
        .arg("v")
        .query(&mut direct)
        .unwrap();
    let reply = blocked.reply_str().await;
    assert!(reply.starts_with("*1\r\n*2\r\n$1\r\ns\r\n"), "{reply:?}");
    // DEBUG PROTOCOL would push frames onto a shared connection.
    assert_eq!(
        pipeline(&mut raw, &request(&[b"DEBUG", b"protocol\x00", b"push"]), 1).await,
        ["-ERR redmux: DEBUG PROTOCOL is not supported yet\r\n"]
    );
    raw.send("HELLO 3\r\n").await;
    assert!(raw.reply_str().await.starts_with("%7"));
    assert_eq!(
        raw.call(&["DEBUG", "PROTOCOL", "push"]).await,
        "-ERR redmux: DEBUG PROTOCOL is not supported yet\r\n"
    );
    assert_eq!(
        raw.call(&["DEBUG", "PROTOCOL", "attrib"]).await,
        "-ERR redmux: DEBUG PROTOCOL is not supported yet\r\n"
    );
}

/// Pipelines that switch between the shared connection, a pinned one and back, each sent in
/// one write, give exactly Redis's replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_commands_run_in_order_across_shared_and_pinned_connections() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let cases: [(&str, usize); 8] = [
        // EXEC runs on the pinned connection; the GET after it must see its write.
        ("SET k old\r\nMULTI\r\nSET k new\r\nEXEC\r\nGET k\r\n", 5),
        // The GET queued in the transaction must see the SET before it.
        ("SET k v\r\nMULTI\r\nGET k\r\nEXEC\r\n", 4),
        // BLPOP finds the element pushed just before it.
        ("RPUSH l x\r\nBLPOP l 1\r\nLLEN l\r\n", 3),
        (
            "SET w 1\r\nWATCH w\r\nGET w\r\nMULTI\r\nINCR w\r\nEXEC\r\nGET w\r\n",
            7,
        ),
        (
            "DEL q\r\nBLPOP q 0.01\r\nRPUSH q a\r\nBRPOPLPUSH q r 1\r\nLRANGE r 0 -1\r\n",
            5,
        ),
        // Across databases: MOVE in db 1, then GET in db 0.
        (
            "SELECT 1\r\nSET m x\r\nMOVE m 0\r\nSELECT 0\r\nGET m\r\n",
            5,
        ),
        (
            "MULTI\r\nINCR c\r\nEXEC\r\nMULTI\r\nINCR c\r\nEXEC\r\nGET c\r\n",
            7,
        ),
        (
            "WATCH a\r\nUNWATCH\r\nSET a 1\r\nBLPOP nothing 0.01\r\nGET a\r\nEXEC x\r\n",
            6,
        ),
    ];
    for (bytes, count) in cases {
        same_as_redis(&redis, &redmux, bytes.as_bytes(), count).await;
    }
    // And again and again: the reorder was seen in 200 of 200 runs before.
    let mut raw = redmux.raw().await;
    for round in 0..200 {
        let replies = pipeline(
            &mut raw,
            format!("SET k old{round}\r\nMULTI\r\nSET k new{round}\r\nEXEC\r\nGET k\r\n")
                .as_bytes(),
            5,
        )
        .await;
        let expected = format!("${}\r\nnew{round}\r\n", 3 + round.to_string().len());
        assert_eq!(replies[4], expected, "round {round}");
        let replies = pipeline(&mut raw, b"RPUSH l2 x\r\nBLPOP l2 1\r\n", 2).await;
        assert_eq!(replies[1], "*2\r\n$2\r\nl2\r\n$1\r\nx\r\n", "round {round}");
    }
}

/// A client that closes its side right after a pipeline still gets every reply, barriers
/// included, as from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_gets_every_reply() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    raw.send("MULTI\r\nSET k new\r\nEXEC\r\nGET k\r\nSELECT 2\r\nGET k\r\n")
        .await;
    raw.shutdown_write().await;
    let mut replies = Vec::new();
    while let Some(reply) = raw.try_reply().await {
        replies.push(String::from_utf8_lossy(&reply).into_owned());
    }
    assert_eq!(
        replies,
        [
            "+OK\r\n",
            "+QUEUED\r\n",
            "*1\r\n+OK\r\n",
            "$3\r\nnew\r\n",
            "+OK\r\n",
            "$-1\r\n"
        ]
    );
}

fn auth_config(redis: &RedisServer) -> redmux::Config {
    let mut config = support::config(&redis.addr());
    config.auth.password = Some(Secret::new("s3cret"));
    config.auth.users = vec![UserConfig {
        name: "app".into(),
        password: Some(Secret::new("apppw")),
        ..UserConfig::default()
    }];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_change_nothing_and_exec_is_refused_in_its_own_words() {
    let redis = RedisServer::start();
    let redmux = Redmux::start_with(auth_config(&redis)).await;
    // The same steps against a Redis with a password give the same bytes.
    let protected = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let steps: &[u8] = b"HELLO 2 AUTH default bad SETNAME evil\r\n\
        MULTI\r\nGET a\r\nEXEC\r\n\
        WATCH a\r\nRESET\r\nEXEC\r\n\
        HELLO 2 SETNAME early AUTH default bad\r\n\
        AUTH s3cret\r\nCLIENT GETNAME\r\nEXEC x\r\n";
    let count = 11;
    let mut direct = Raw::connect(protected.addr().parse().unwrap()).await;
    let expected = pipeline(&mut direct, steps, count).await;
    let mut raw = redmux.raw().await;
    let got = pipeline(&mut raw, steps, count).await;
    assert_eq!(got, expected);
    // Spelled out, so the reference cannot drift unnoticed.
    assert_eq!(
        got[0],
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        got[3],
        "-EXECABORT Transaction discarded because of: NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        got[9], "$5\r\nearly\r\n",
        "a SETNAME before the failed AUTH is applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_whoami_names_the_clients_own_user() {
    let redis = RedisServer::start();
    let redmux = Redmux::start_with(auth_config(&redis)).await;
    let mut raw = redmux.raw().await;
    assert_eq!(
        raw.call(&["ACL", "WHOAMI"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(raw.call(&["AUTH", "s3cret"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["ACL", "whoami"]).await, "$7\r\ndefault\r\n");
    assert_eq!(raw.call(&["AUTH", "app", "apppw"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["ACL", "WHOAMI"]).await, "$3\r\napp\r\n");
    assert_eq!(
        raw.call(&["ACL", "WHOAMI", "x"]).await,
        "-ERR wrong number of arguments for 'acl|whoami' command\r\n"
    );
}
