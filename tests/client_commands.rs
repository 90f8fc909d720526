//! CLIENT LIST, INFO, KILL, PAUSE, UNPAUSE and UNBLOCK over redmux's own clients, answered as
//! Redis would answer them if each client had a connection of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::{Duration, Instant};

use support::{Raw, RedisServer, Redmux};

/// The `key=value` fields of one CLIENT LIST line.
fn fields(line: &str) -> std::collections::HashMap<String, String> {
    line.split(' ')
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The lines of a CLIENT LIST (or INFO) reply, RESP2 bulk or RESP3 verbatim.
fn lines(reply: &str) -> Vec<String> {
    let body = reply.split_once("\r\n").map_or("", |(_, body)| body);
    let body = body.strip_prefix("txt:").unwrap_or(body);
    body.trim_end_matches("\r\n")
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The line of client `id` in `list`.
fn line_of(list: &[String], id: &str) -> std::collections::HashMap<String, String> {
    let line = list
        .iter()
        .find(|line| line.starts_with(&format!("id={id} ")))
        .unwrap_or_else(|| panic!("client {id} not in {list:?}"));
    fields(line)
}

async fn id_of(raw: &mut Raw) -> String {
    let reply = raw.call(&["CLIENT", "ID"]).await;
    reply.trim_start_matches(':').trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_list_shows_each_client_as_it_is() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut named = redmux.raw().await;
    assert_eq!(
        named.call(&["CLIENT", "SETNAME", "worker-1"]).await,
        "+OK\r\n"
    );
    assert_eq!(named.call(&["SELECT", "3"]).await, "+OK\r\n");
    assert!(named.call(&["HELLO", "3"]).await.starts_with('%'));
    assert_eq!(
        named
            .call(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"])
            .await,
        "+OK\r\n"
    );
    let mut subscriber = redmux.raw().await;
    let subscriber_id = id_of(&mut subscriber).await;
    subscriber.send("SUBSCRIBE a b\r\nPSUBSCRIBE p*\r\n").await;
    for _ in 0..3 {
        subscriber.reply().await;
    }
    let mut queuing = redmux.raw().await;
    let queuing_id = id_of(&mut queuing).await;
    assert_eq!(queuing.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(queuing.call(&["SET", "k", "v"]).await, "+QUEUED\r\n");
    assert_eq!(queuing.call(&["INCR", "n"]).await, "+QUEUED\r\n");
    let mut blocked = redmux.raw().await;
    let blocked_id = id_of(&mut blocked).await;
    blocked.send("BLPOP nothing 0\r\n").await;
    redis.wait_blocked_clients(1).await;

    let mut asking = redmux.raw().await;
    let asking_id = id_of(&mut asking).await;
    let named_id = id_of(&mut named).await;
    let list = lines(&asking.call(&["CLIENT", "LIST"]).await);
    assert_eq!(list.len(), 5, "{list:?}");
    let named_line = line_of(&list, &named_id);
    assert_eq!(named_line["name"], "worker-1");
    assert_eq!(named_line["db"], "3");
    assert_eq!(named_line["resp"], "3");
    assert_eq!(named_line["flags"], "N");
    assert_eq!(named_line["cmd"], "client");
    assert_eq!(named_line["lib-name"], "redis-py");
    assert_eq!(named_line["laddr"], redmux.addr.to_string());
    let subscriber_line = line_of(&list, &subscriber_id);
    assert_eq!(
        (
            &*subscriber_line["flags"],
            &*subscriber_line["sub"],
            &*subscriber_line["psub"]
        ),
        ("P", "2", "1")
    );
    let queuing_line = line_of(&list, &queuing_id);
    assert_eq!(
        (&*queuing_line["flags"], &*queuing_line["multi"]),
        ("x", "2")
    );
    let blocked_line = line_of(&list, &blocked_id);
    assert_eq!(
        (&*blocked_line["flags"], &*blocked_line["cmd"]),
        ("b", "blpop")
    );
    let own = line_of(&list, &asking_id);
    assert_eq!(
        (&*own["cmd"], &*own["user"], &*own["multi"]),
        ("client|list", "default", "-1")
    );
    // Every field of Redis 7.0's line, in its order.
    let keys: Vec<&str> = list[0]
        .split(' ')
        .filter_map(|f| f.split_once('=').map(|(k, _)| k))
        .take(28)
        .collect();
    assert_eq!(
        keys.join(" "),
        "id addr laddr fd name age idle flags db sub psub ssub multi qbuf qbuf-free argv-mem \
         multi-mem rbs rbp obl oll omem tot-mem events cmd user redir resp"
    );

    // Filters.
    let pubsub = lines(&asking.call(&["CLIENT", "LIST", "TYPE", "pubsub"]).await);
    assert_eq!(pubsub.len(), 1);
    assert!(pubsub[0].starts_with(&format!("id={subscriber_id} ")));
    assert_eq!(
        lines(&asking.call(&["CLIENT", "LIST", "TYPE", "normal"]).await).len(),
        4
    );
    assert!(lines(&asking.call(&["CLIENT", "LIST", "TYPE", "master"]).await).is_empty());
    let by_id = lines(
        &asking
            .call(&["CLIENT", "LIST", "ID", &blocked_id, "999999", &named_id])
            .await,
    );
    assert_eq!(by_id.len(), 2);
    assert!(by_id[0].starts_with(&format!("id={blocked_id} ")));
    // CLIENT INFO: the caller's own line.
    let info = lines(&named.call(&["CLIENT", "INFO"]).await);
    assert_eq!(line_of(&info, &named_id)["cmd"], "client|info");
    assert!(
        named.call(&["CLIENT", "INFO"]).await.starts_with('='),
        "RESP3 verbatim"
    );
}

/// The errors of CLIENT LIST, KILL, PAUSE and UNBLOCK are Redis's, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_redis_errors() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let cases: &[&[&str]] = &[
        &["CLIENT", "LIST", "TYPE", "foo"],
        &["CLIENT", "LIST", "ID", "abc"],
        &["CLIENT", "LIST", "ID"],
        &["CLIENT", "LIST", "BOGUS"],
        &["CLIENT", "KILL"],
        &["CLIENT", "KILL", "1.2.3.4:5"],
        &["CLIENT", "KILL", "ID", "0"],
        &["CLIENT", "KILL", "ID", "abc"],
        &["CLIENT", "KILL", "TYPE", "foo"],
        &["CLIENT", "KILL", "SKIPME", "maybe"],
        &["CLIENT", "KILL", "BOGUS", "1"],
        &["CLIENT", "KILL", "ID", "999999"],
        &["CLIENT", "KILL", "ID", "999999", "TYPE"],
        &["CLIENT", "KILL", "TYPE", "master"],
        &["CLIENT", "PAUSE"],
        &["CLIENT", "PAUSE", "abc"],
        &["CLIENT", "PAUSE", "-1"],
        &["CLIENT", "PAUSE", "10", "FOO"],
        // The mode is checked before the timeout; a fourth argument is a syntax error.
        &["CLIENT", "PAUSE", "abc", "xyz"],
        &["CLIENT", "PAUSE", "10", "ALL", "extra"],
        &["CLIENT", "pause", "10", "ALL", "extra"],
        &["CLIENT", "UNBLOCK", "5", "ERROR", "extra"],
        // Redis 7.0 adds the timeout to the clock in a signed 64-bit integer: this one wraps
        // into the past, the pause ends at once, and the SET after it is answered.
        &["CLIENT", "PAUSE", "9223372036854775807", "WRITE"],
        &["SET", "k", "v"],
        &["CLIENT", "PAUSE", "9223372036854775807"],
        &["PING"],
        &["CLIENT", "UNPAUSE", "x"],
        &["CLIENT", "UNBLOCK"],
        &["CLIENT", "UNBLOCK", "abc"],
        &["CLIENT", "UNBLOCK", "5", "FOO"],
        &["CLIENT", "UNBLOCK", "999999"],
        // Values compared as Redis compares them (`strcasecmp`, up to a NUL), and a
        // subcommand echoed as Redis prints it (`%s`, up to a NUL).
        &["CLIENT", "REPLY", "on\0x"],
        &["CLIENT", "NO-EVICT", "on\0x"],
        &["CLIENT", "NO-EVICT", "OFF"],
        &["CLIENT", "zzz\0x"],
        &["CLIENT", "HELP"],
    ];
    let mut direct = Raw::connect(redis.addr().parse().unwrap()).await;
    let mut through = redmux.raw().await;
    for case in cases {
        assert_eq!(
            through.call(case).await,
            direct.call(case).await,
            "{case:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_closes_matching_clients() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut admin = redmux.raw().await;
    let mut victim = redmux.raw().await;
    let victim_id = id_of(&mut victim).await;
    // An idle (parked) client is closed too.
    assert_eq!(
        admin.call(&["CLIENT", "KILL", "ID", &victim_id]).await,
        ":1\r\n"
    );
    victim.expect_closed().await;

    let mut subscriber = redmux.raw().await;
    subscriber.send("SUBSCRIBE ch\r\n").await;
    subscriber.reply().await;
    let mut plain = redmux.raw().await;
    assert_eq!(
        admin.call(&["CLIENT", "KILL", "TYPE", "pubsub"]).await,
        ":1\r\n"
    );
    subscriber.expect_closed().await;
    assert_eq!(plain.call(&["PING"]).await, "+PONG\r\n");

    // The old form, by address.
    let list = lines(&admin.call(&["CLIENT", "LIST"]).await);
    let plain_id = id_of(&mut plain).await;
    let addr = line_of(&list, &plain_id)["addr"].clone();
    assert_eq!(admin.call(&["CLIENT", "KILL", &addr]).await, "+OK\r\n");
    plain.expect_closed().await;
    assert_eq!(
        admin.call(&["CLIENT", "KILL", &addr]).await,
        "-ERR No such client\r\n"
    );

    // By user and by the listening address, skipping the caller by default.
    let mut others: Vec<Raw> = Vec::new();
    for _ in 0..3 {
        let mut raw = redmux.raw().await;
        assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
        others.push(raw);
    }
    assert_eq!(
        admin.call(&["CLIENT", "KILL", "USER", "default"]).await,
        ":3\r\n"
    );
    for raw in &mut others {
        raw.expect_closed().await;
    }
    let laddr = redmux.addr.to_string();
    assert_eq!(
        admin
            .call(&["CLIENT", "KILL", "LADDR", &laddr, "SKIPME", "yes"])
            .await,
        ":0\r\n"
    );
    // SKIPME no: the caller gets the count, then is closed.
    assert_eq!(
        admin
            .call(&["CLIENT", "KILL", "LADDR", &laddr, "SKIPME", "no"])
            .await,
        ":1\r\n"
    );
    admin.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_holds_requests_and_drops_none() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut admin = redmux.raw().await;
    let mut client = redmux.raw().await;
    assert_eq!(client.call(&["SET", "k", "before"]).await, "+OK\r\n");

    // WRITE: reads go on, writes wait for the pause to end.
    let pause = Duration::from_millis(400);
    assert_eq!(
        admin.call(&["CLIENT", "PAUSE", "400", "WRITE"]).await,
        "+OK\r\n"
    );
    let started = Instant::now();
    assert_eq!(client.call(&["GET", "k"]).await, "$6\r\nbefore\r\n");
    // Neither `write` nor `may_replicate` in Redis 7.0, which lets it by.
    assert!(client
        .call(&["SCRIPT", "LOAD", "return 1"])
        .await
        .starts_with("$40\r\n"));
    assert!(
        started.elapsed() < pause / 2,
        "a read or SCRIPT LOAD waited"
    );
    client
        .send("SET k during\r\nGET k\r\nEVAL \"return 1\" 0\r\n")
        .await;
    assert_eq!(client.reply_str().await, "+OK\r\n");
    assert!(
        started.elapsed() >= pause - Duration::from_millis(20),
        "the write ran early"
    );
    assert_eq!(client.reply_str().await, "$6\r\nduring\r\n");
    assert_eq!(client.reply_str().await, ":1\r\n");

    // ALL: everything waits (UNPAUSE too, as in Redis), until the pause ends by itself.
    assert_eq!(admin.call(&["CLIENT", "PAUSE", "300"]).await, "+OK\r\n");
    let started = Instant::now();
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
    assert!(started.elapsed() >= Duration::from_millis(280));

    // UNPAUSE ends a pause early, and what waited runs: here the EXEC of a transaction with
    // a write, which WRITE holds.
    assert_eq!(
        admin.call(&["CLIENT", "PAUSE", "60000", "WRITE"]).await,
        "+OK\r\n"
    );
    client.send("MULTI\r\nINCR n\r\nEXEC\r\n").await;
    assert_eq!(client.reply_str().await, "+OK\r\n");
    let started = Instant::now();
    let mut other = redmux.raw().await;
    assert_eq!(
        other.call(&["GET", "n"]).await,
        "$-1\r\n",
        "the INCR has not run"
    );
    assert_eq!(admin.call(&["CLIENT", "UNPAUSE"]).await, "+OK\r\n");
    assert_eq!(client.reply_str().await, "+QUEUED\r\n");
    assert_eq!(client.reply_str().await, "*1\r\n:1\r\n");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_unblocks_as_redis_does() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let direct_addr = redis.addr().parse().unwrap();
    for mode in [None, Some("TIMEOUT"), Some("ERROR")] {
        let mut results = Vec::new();
        for addr in [direct_addr, redmux.addr] {
            let mut blocked = Raw::connect(addr).await;
            let id = id_of(&mut blocked).await;
            let mut admin = Raw::connect(addr).await;
            assert_eq!(
                admin.call(&["CLIENT", "UNBLOCK", &id]).await,
                ":0\r\n",
                "not blocked yet"
            );
            blocked.send("BLPOP list 0\r\n").await;
            redis.wait_blocked_clients(1).await;
            let mut unblock = vec!["CLIENT", "UNBLOCK", &id];
            unblock.extend(mode);
            let answer = admin.call(&unblock).await;
            results.push((answer, blocked.reply_str().await));
            assert_eq!(blocked.call(&["PING"]).await, "+PONG\r\n");
            redis.wait_blocked_clients(0).await;
        }
        assert_eq!(results[1], results[0], "{mode:?}: through redmux, directly");
        assert_eq!(results[1].0, ":1\r\n");
    }
}

/// B waits in `BLPOP l 0`; A sends `RPUSH l x`, then CLIENT UNBLOCK or KILL of B, then
/// `LLEN l`, in one write. Redis runs A's commands in order, so the push serves B first: A
/// gets `:1 :0 :0` (UNBLOCK finds B no longer blocked) or `:1 :1 :0` (KILL), and B the
/// element. A's replies, and B's for UNBLOCK.
async fn push_then_act_on_the_blocked(
    redis: &RedisServer,
    addr: std::net::SocketAddr,
    verb: &str,
) -> (Vec<String>, Option<String>) {
    let mut b = Raw::connect(addr).await;
    let b_id = id_of(&mut b).await;
    assert_eq!(b.call(&["DEL", "l"]).await.chars().next(), Some(':'));
    b.send("BLPOP l 0\r\n").await;
    redis.wait_blocked_clients(1).await;
    let mut a = Raw::connect(addr).await;
    let act: &[&str] = match verb {
        "KILL" => &["CLIENT", "KILL", "ID", &b_id],
        _ => &["CLIENT", "UNBLOCK", &b_id],
    };
    let mut bytes = Vec::new();
    for request in [&["RPUSH", "l", "x"][..], act, &["LLEN", "l"]] {
        bytes.extend_from_slice(&redmux::resp::encode_command(
            request.iter().map(|arg| arg.as_bytes()),
        ));
    }
    let replies = a
        .pipeline(&bytes, 3)
        .await
        .into_iter()
        .map(|reply| String::from_utf8_lossy(&reply).into_owned())
        .collect();
    let b_reply = match verb {
        "KILL" => None,
        _ => Some(b.reply_str().await),
    };
    redis.wait_blocked_clients(0).await;
    (replies, b_reply)
}

/// CLIENT UNBLOCK and KILL act on another client, and Redis runs them after what the client
/// sent before: redmux, which answers them itself (UNBLOCK on a connection of its own), waits
/// for the replies to the client's earlier requests first. Without that wait, KILL closed B
/// before A's push reached Redis (most trials) and UNBLOCK overtook the push (some): the
/// binary, whose single thread shows the race most often, and 20 trials of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_and_unblock_run_after_the_clients_earlier_commands() {
    let redis = RedisServer::start();
    let redmux = support::binary::RedmuxProcess::start(
        "",
        &format!("[upstream]\naddress = \"redis://{}\"", redis.addr()),
    );
    let direct_addr = redis.addr().parse().unwrap();
    for (verb, a_replies, b_reply) in [
        (
            "UNBLOCK",
            [":1\r\n", ":0\r\n", ":0\r\n"],
            Some("*2\r\n$1\r\nl\r\n$1\r\nx\r\n"),
        ),
        ("KILL", [":1\r\n", ":1\r\n", ":0\r\n"], None),
    ] {
        let want = (
            a_replies.map(str::to_owned).to_vec(),
            b_reply.map(str::to_owned),
        );
        let direct = push_then_act_on_the_blocked(&redis, direct_addr, verb).await;
        assert_eq!(direct, want, "{verb} directly");
        for trial in 0..20 {
            let proxied = push_then_act_on_the_blocked(&redis, redmux.addr, verb).await;
            assert_eq!(proxied, want, "{verb} through redmux, trial {trial}");
        }
    }
}
