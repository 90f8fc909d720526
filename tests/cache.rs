//! The near cache (`[cache] enabled = true`) against a live redis-server: each cached read
//! gives Redis's own bytes; a second read is answered without Redis (seen in Redis's own
//! `INFO commandstats`, which counts what really reached it); a change made directly in Redis,
//! in any db, reaches readers; reads inside MULTI and WATCH, after a client's own write, by an
//! ACL user, or while the invalidation stream is down go to Redis; `max_ttl`, `max_memory`
//! and `prefixes` hold; `/metrics` and `/status` show the cache.
//!
//! The race between writers elsewhere and cached readers is `tests/cache_checker.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::Duration;

use redmux::config::Config;
use support::{
    binary::RedmuxProcess, redis_calls, wait_cache_serving, Deadline, Raw, RedisServer, Redmux,
};

fn cache_config(redis: &RedisServer) -> Config {
    let mut config = support::config(&redis.addr());
    config.cache.enabled = true;
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

async fn start(config: Config, redis: &RedisServer) -> (Redmux, Raw) {
    let redmux = Redmux::start_with(config).await;
    let mut client = redmux.raw().await;
    wait_cache_serving(redis, &mut client, "cache:warm").await;
    (redmux, client)
}

/// One request in RESP, for a raw direct connection.
fn direct_reply(redis: &RedisServer, resp3: bool, args: &[&str]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(redis.addr()).unwrap();
    if resp3 {
        stream
            .write_all(&redmux::resp::encode_command([&b"HELLO"[..], b"3"]))
            .unwrap();
    }
    stream
        .write_all(&redmux::resp::encode_command(
            args.iter().map(|a| a.as_bytes()),
        ))
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = Vec::new();
    stream.read_to_end(&mut all).unwrap();
    if resp3 {
        // The HELLO map comes first: skip it with the scanner.
        let mut scanner = redmux::resp::ReplyScanner::with_push();
        let end = scanner.next_reply(&all).unwrap().unwrap();
        all.drain(..end);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cached_read_gives_redis_bytes_and_is_answered_again_without_redis() {
    let redis = RedisServer::start();
    let mut direct = redis.direct();
    let _: () = redis::pipe()
        .cmd("SET")
        .arg("s")
        .arg("value")
        .cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("1")
        .arg("g")
        .arg("2")
        .cmd("SADD")
        .arg("set")
        .arg("a")
        .arg("b")
        .cmd("SET")
        .arg("other")
        .arg("x")
        .query(&mut direct)
        .unwrap();
    let (redmux, mut resp2) = start(cache_config(&redis), &redis).await;
    let mut resp3 = redmux.raw().await;
    resp3.call(&["HELLO", "3"]).await;
    let reads: &[&[&str]] = &[
        &["GET", "s"],
        &["GET", "missing"],
        &["STRLEN", "s"],
        &["HGET", "h", "f"],
        &["HGET", "h", "nope"],
        &["HGETALL", "h"],
        &["SMEMBERS", "set"],
        &["EXISTS", "s"],
        &["EXISTS", "missing"],
        &["MGET", "s", "missing", "other"],
        &["MGET", "other", "s"],
        // A wrong type: the error is Redis's, and is not kept.
        &["HGET", "s", "f"],
    ];
    for (resp3_on, client) in [(false, &mut resp2), (true, &mut resp3)] {
        for read in reads {
            let name = read[0].to_ascii_lowercase();
            let expected = direct_reply(&redis, resp3_on, read);
            let before = redis_calls(&redis, &name);
            let first = client
                .pipeline(
                    &redmux::resp::encode_command(read.iter().map(|a| a.as_bytes())),
                    1,
                )
                .await;
            let second = client
                .pipeline(
                    &redmux::resp::encode_command(read.iter().map(|a| a.as_bytes())),
                    1,
                )
                .await;
            assert_eq!(first[0], expected, "{read:?} resp3={resp3_on}");
            assert_eq!(
                second[0], expected,
                "{read:?} resp3={resp3_on}, from the cache"
            );
            let reached = redis_calls(&redis, &name) - before;
            let error = expected.first() == Some(&b'-');
            // The MGETs' parts were cached by the ones before them, or by the first call.
            let want = match (error, read[0]) {
                (true, _) => 2,
                (false, "MGET") => u64::from(reached == 1),
                _ => 1,
            };
            assert_eq!(
                reached, want,
                "{read:?} resp3={resp3_on}: reached Redis {reached} times"
            );
        }
    }
    // MGET of parts each cached: no round trip at all.
    let before = redis_calls(&redis, "mget");
    let reply = resp2.call(&["MGET", "s", "other", "missing"]).await;
    assert_eq!(reply, "*3\r\n$5\r\nvalue\r\n$1\r\nx\r\n$-1\r\n");
    assert_eq!(redis_calls(&redis, "mget"), before);
    // Not cacheable: time-dependent, or not listed.
    let before = redis_calls(&redis, "ttl");
    resp2.call(&["TTL", "s"]).await;
    resp2.call(&["TTL", "s"]).await;
    assert_eq!(redis_calls(&redis, "ttl") - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_in_redis_reaches_readers_in_every_db() {
    let redis = RedisServer::start();
    let (redmux, mut reader) = start(cache_config(&redis), &redis).await;
    let mut direct = redis.direct();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v1")
        .query(&mut direct)
        .unwrap();
    assert_eq!(reader.call(&["GET", "k"]).await, "$2\r\nv1\r\n");
    assert_eq!(reader.call(&["GET", "k"]).await, "$2\r\nv1\r\n");
    // Another db, the same key name.
    let mut db1 = redmux.raw().await;
    db1.call(&["SELECT", "1"]).await;
    assert_eq!(db1.call(&["GET", "k"]).await, "$-1\r\n");
    let before = redis_calls(&redis, "get");
    assert_eq!(db1.call(&["GET", "k"]).await, "$-1\r\n");
    assert_eq!(redis_calls(&redis, "get"), before, "db 1's read is cached");
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v2")
        .query(&mut direct)
        .unwrap();
    let deadline = Deadline::within(Duration::from_secs(2));
    while reader.call(&["GET", "k"]).await != "$2\r\nv2\r\n" {
        deadline.next_try("the change reaching the reader").await;
    }
    // An invalidation carries no db: db 1's entry went too, and its next read reaches Redis.
    let before = redis_calls(&redis, "get");
    assert_eq!(db1.call(&["GET", "k"]).await, "$-1\r\n");
    assert_eq!(redis_calls(&redis, "get"), before + 1);
    // FLUSHALL: a null invalidation, everything goes.
    reader.call(&["GET", "k"]).await;
    let _: () = redis::cmd("FLUSHALL").query(&mut direct).unwrap();
    let deadline = Deadline::within(Duration::from_secs(2));
    while reader.call(&["GET", "k"]).await != "$-1\r\n" {
        deadline.next_try("FLUSHALL reaching the reader").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_own_writes_and_acl_users_read_around_the_cache() {
    let redis = RedisServer::start();
    let (redmux, mut client) = start(cache_config(&redis), &redis).await;
    client.call(&["SET", "k", "v1"]).await;
    client.call(&["GET", "k"]).await;
    client.call(&["GET", "k"]).await;
    // In MULTI: queued, run by Redis at EXEC.
    let before = redis_calls(&redis, "get");
    let replies = client
        .pipeline(
            b"*1\r\n$5\r\nMULTI\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nEXEC\r\n",
            3,
        )
        .await;
    assert_eq!(replies[1], b"+QUEUED\r\n");
    assert_eq!(replies[2], b"*1\r\n$2\r\nv1\r\n");
    assert_eq!(redis_calls(&redis, "get"), before + 1);
    // While watching.
    client.call(&["WATCH", "k"]).await;
    let before = redis_calls(&redis, "get");
    assert_eq!(client.call(&["GET", "k"]).await, "$2\r\nv1\r\n");
    assert_eq!(redis_calls(&redis, "get"), before + 1);
    client.call(&["UNWATCH"]).await;
    // A write and a read of it in one pipeline, many times: the read sees the write.
    for i in 0..200 {
        let value = format!("w{i}");
        let replies = client
            .pipeline(
                &[
                    redmux::resp::encode_command([&b"SET"[..], b"k", value.as_bytes()]),
                    redmux::resp::encode_command([&b"GET"[..], b"k"]),
                    redmux::resp::encode_command([&b"MGET"[..], b"k", b"j"]),
                ]
                .concat(),
                3,
            )
            .await;
        assert_eq!(
            replies[1],
            format!("${}\r\n{value}\r\n", value.len()).into_bytes()
        );
        assert_eq!(
            replies[2],
            format!("*2\r\n${}\r\n{value}\r\n$-1\r\n", value.len()).into_bytes()
        );
        // And once acknowledged, the next read too (it may be served from the cache).
        assert_eq!(
            client.call(&["GET", "k"]).await,
            format!("${}\r\n{value}\r\n", value.len())
        );
    }
    // A write whose keys redmux cannot name (a script's own), then a read in the same write.
    client.call(&["SET", "k", "old"]).await;
    client.call(&["GET", "k"]).await;
    let eval = redmux::resp::encode_command([
        &b"EVAL"[..],
        b"redis.call('set', 'k', 'new') return 1",
        b"0",
    ]);
    let get = redmux::resp::encode_command([&b"GET"[..], b"k"]);
    let replies = client.pipeline(&[eval, get].concat(), 2).await;
    assert_eq!(replies[1], b"$3\r\nnew\r\n");
    // An ACL user's reads go to Redis, which checks its key permissions: the default user's
    // cached value of `secret` never reaches it.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "limited", "on", ">pw", "~public:*", "+@all"])
        .query(&mut redis.direct())
        .unwrap();
    client.call(&["SET", "secret", "s3cr3t"]).await;
    client.call(&["GET", "secret"]).await;
    client.call(&["GET", "secret"]).await;
    let mut limited = redmux.raw().await;
    assert_eq!(limited.call(&["AUTH", "limited", "pw"]).await, "+OK\r\n");
    let reply = limited.call(&["GET", "secret"]).await;
    assert!(reply.starts_with("-NOPERM"), "{reply}");
    let reply = limited.call(&["MGET", "secret"]).await;
    assert!(reply.starts_with("-NOPERM"), "{reply}");
}

/// Redis 7.0 tells no tracking client of a SWAPDB: redmux empties the cache when the reply
/// of one sent through it is in, before the client sees it, even with a blocking command
/// owed behind it on the same connection (after WATCH, or after the EXEC of a MULTI that
/// queued it), whose reply may not come for a long time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapdb_empties_the_cache_before_its_reply_whatever_is_owed_after_it() {
    let redis = RedisServer::start();
    let (redmux, mut reader) = start(cache_config(&redis), &redis).await;
    let mut direct = Raw::connect(redis.addr().parse().unwrap()).await;
    assert_eq!(direct.call(&["SET", "k", "a"]).await, "+OK\r\n");
    assert_eq!(direct.call(&["SELECT", "1"]).await, "+OK\r\n");
    assert_eq!(direct.call(&["SET", "k", "b"]).await, "+OK\r\n");
    let command = |args: &[&str]| redmux::resp::encode_command(args.iter().map(|a| a.as_bytes()));
    let pipelines = [
        [command(&["WATCH", "x"]), command(&["SWAPDB", "0", "1"])].concat(),
        [
            command(&["MULTI"]),
            command(&["SWAPDB", "0", "1"]),
            command(&["EXEC"]),
        ]
        .concat(),
    ];
    let mut expected = ["a", "b"].into_iter().cycle();
    let mut clients = Vec::new();
    for (round, pipeline) in pipelines.iter().enumerate() {
        let now = expected.next().unwrap();
        support::wait_cache_serving(&redis, &mut reader, "k").await;
        assert_eq!(reader.call(&["GET", "k"]).await, format!("$1\r\n{now}\r\n"));
        let mut writer = redmux.raw().await;
        let blpop = command(&["BLPOP", &format!("q{round}"), "0"]);
        writer.send([&pipeline[..], &blpop].concat()).await;
        let replies = if round == 0 { 2 } else { 3 };
        for _ in 0..replies {
            let reply = writer.reply_str().await;
            assert!(reply.starts_with('+') || reply.starts_with('*'), "{reply}");
        }
        // The SWAPDB's reply is in, the BLPOP waits: db 0 now holds the other value.
        let swapped = expected.clone().next().unwrap();
        assert_eq!(
            reader.call(&["GET", "k"]).await,
            format!("$1\r\n{swapped}\r\n"),
            "round {round}: a read after SWAPDB's reply got db 0's old value from the cache"
        );
        clients.push(writer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_while_the_invalidation_stream_is_down() {
    let redis = RedisServer::start();
    let (_redmux, mut client) = start(cache_config(&redis), &redis).await;
    let mut direct = redis.direct();
    client.call(&["SET", "k", "v1"]).await;
    client.call(&["GET", "k"]).await;
    // The stream is the connection that tracks in BCAST mode.
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut direct).unwrap();
    let stream = list
        .lines()
        .find(|line| {
            line.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .expect("the tracking stream is connected");
    let id = stream.split(' ').next().unwrap().trim_start_matches("id=");
    // Block its return for a moment: kill it, and change the key at once, while it is away.
    let _: () = redis::pipe()
        .cmd("CLIENT")
        .arg(&["KILL", "ID", id])
        .ignore()
        .cmd("SET")
        .arg("k")
        .arg("v2")
        .ignore()
        .query(&mut direct)
        .unwrap();
    // Whether the cache noticed yet or not, the change must show within the delay, and stay.
    let deadline = Deadline::within(Duration::from_secs(3));
    while client.call(&["GET", "k"]).await != "$2\r\nv2\r\n" {
        deadline
            .next_try("the change made while the stream was lost")
            .await;
    }
    wait_cache_serving(&redis, &mut client, "cache:warm").await;
    assert_eq!(client.call(&["GET", "k"]).await, "$2\r\nv2\r\n");
}

/// The stream PINGs Redis every second: Redis's idle `timeout` does not close it (which would
/// empty the cache each time), and a stream whose Redis stops answering is taken as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_outlives_redis_idle_timeout_and_notices_a_silent_redis() {
    let redis = RedisServer::start();
    let config_set = |name: &str, value: u64| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut redis.direct())
            .unwrap();
    };
    config_set("timeout", 1);
    let mut config = cache_config(&redis);
    config.upstream.request_timeout = Duration::from_millis(1500);
    let (redmux, mut client) = start(config, &redis).await;
    let stream_id = || {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut redis.direct())
            .unwrap();
        list.lines()
            .find(|line| line.contains(" flags=t"))
            .and_then(|line| line.split(' ').next())
            .map(str::to_owned)
    };
    let first = stream_id().expect("the stream is connected");
    let flushes = status(&redmux).await["cache"]["flushes"].as_u64().unwrap();
    // Idle time is what is under test: there is no event to wait for.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(stream_id().as_deref(), Some(first.as_str()));
    let cache = &status(&redmux).await["cache"];
    assert_eq!(cache["flushes"].as_u64().unwrap(), flushes, "{cache}");
    assert_eq!(cache["up"], true);
    config_set("timeout", 0);
    // A script keeps Redis busy for longer than request_timeout: the PINGs are answered
    // with -BUSY, which is an answer, so the stream stays.
    config_set("busy-reply-threshold", 100);
    let busy = std::thread::spawn({
        let mut direct = redis.direct();
        move || {
            let script = "local s = redis.call('TIME')[1] \
                          while redis.call('TIME')[1] - s < 3 do end";
            let _: () = redis::cmd("EVAL")
                .arg(script)
                .arg(0)
                .query(&mut direct)
                .unwrap();
        }
    });
    busy.join().unwrap();
    assert_eq!(stream_id().as_deref(), Some(first.as_str()));
    let cache = &status(&redmux).await["cache"];
    assert_eq!(cache["flushes"].as_u64().unwrap(), flushes, "{cache}");
    // Redis stops answering for longer than request_timeout: the stream is taken as lost,
    // and the cache emptied, though the connection never closed.
    let sleeper = std::thread::spawn({
        let mut direct = redis.direct();
        move || {
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(3)
                .query(&mut direct)
                .unwrap();
        }
    });
    sleeper.join().unwrap();
    let deadline = Deadline::within(Duration::from_secs(3));
    while status(&redmux).await["cache"]["flushes"].as_u64().unwrap() == flushes {
        deadline.next_try("the silent stream taken as lost").await;
    }
    assert_ne!(stream_id().as_deref(), Some(first.as_str()));
    wait_cache_serving(&redis, &mut client, "cache:warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ttl_max_memory_and_prefixes_hold() {
    let redis = RedisServer::start();
    let mut config = cache_config(&redis);
    config.cache.max_ttl = Duration::from_millis(300);
    config.cache.max_memory = 1024 * 1024;
    config.cache.prefixes = vec!["cache:".into(), "big:".into()];
    let (redmux, mut client) = start(config, &redis).await;
    // Outside the prefixes: every read reaches Redis.
    let before = redis_calls(&redis, "get");
    client.call(&["GET", "other"]).await;
    client.call(&["GET", "other"]).await;
    assert_eq!(redis_calls(&redis, "get"), before + 2);
    // max_ttl: served, then read again from Redis once it has passed.
    client.call(&["GET", "cache:t"]).await;
    let before = redis_calls(&redis, "get");
    client.call(&["GET", "cache:t"]).await;
    assert_eq!(redis_calls(&redis, "get"), before);
    // Waiting out the time limit itself: there is no event to wait for.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.call(&["GET", "cache:t"]).await;
    assert_eq!(redis_calls(&redis, "get"), before + 1);
    // max_memory: 3,000 values of 1 KiB through a cache of 1 MiB.
    let value = "x".repeat(1024);
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("SET").arg(format!("big:{i}")).arg(&value).ignore();
    }
    let _: () = pipe.query(&mut redis.direct()).unwrap();
    // All of them once, by MGETs (past the bound), then a hot few, one GET at a time (a
    // pipelined read is not answered from the cache while earlier ones are owed), which must
    // be served.
    let all: Vec<String> = (0..3000).map(|i| format!("big:{i}")).collect();
    for chunk in all.chunks(100) {
        let args: Vec<&str> = std::iter::once("MGET")
            .chain(chunk.iter().map(String::as_str))
            .collect();
        let reply = client.call(&args).await;
        assert_eq!(reply.len(), 6 + 100 * (1024 + 9));
    }
    for _ in 0..3 {
        for key in &all[..200] {
            assert_eq!(client.call(&["GET", key]).await.len(), 1024 + 9);
        }
    }
    let status = status(&redmux).await;
    let cache = &status["cache"];
    let bytes = cache["bytes"].as_u64().unwrap();
    assert!(bytes <= 1024 * 1024, "{cache}");
    assert!(cache["entries"].as_u64().unwrap() > 100, "{cache}");
    assert!(cache["hits"].as_u64().unwrap() > 100, "{cache}");
    assert!(cache["hit_rate"].as_f64().unwrap() > 0.0, "{cache}");
    assert_eq!(cache["up"], true);
    let metrics = support::http_get(redmux.metrics.unwrap(), "/metrics").await;
    for series in [
        "redmux_cache_hits_total ",
        "redmux_cache_misses_total ",
        "redmux_cache_invalidations_total ",
        "redmux_cache_flushes_total ",
        "redmux_cache_bytes ",
        "redmux_cache_entries ",
        "redmux_cache_max_memory_bytes 1048576",
        "redmux_cache_up 1",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
}

/// Redis tells of an expiry only when it deletes the key, which reads served from the cache
/// never make it do: an entry lives no longer than its key's TTL. Redis's active expiry is
/// off for the test, so only the TTL redmux reads with each miss can end the entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_lives_no_longer_than_its_key() {
    let redis = RedisServer::start();
    let mut direct = redis.direct();
    let _: () = redis::cmd("DEBUG")
        .arg("SET-ACTIVE-EXPIRE")
        .arg(0)
        .query(&mut direct)
        .unwrap();
    // max_ttl is 60 s.
    let (_redmux, mut client) = start(cache_config(&redis), &redis).await;
    let _: () = redis::pipe()
        .cmd("SET")
        .arg("v")
        .arg("1")
        .arg("PX")
        .arg(300)
        .cmd("SET")
        .arg("m")
        .arg("2")
        .arg("PX")
        .arg(300)
        .cmd("SET")
        .arg("w")
        .arg("3")
        .query(&mut direct)
        .unwrap();
    let set_at = tokio::time::Instant::now();
    for _ in 0..2 {
        assert_eq!(client.call(&["GET", "v"]).await, "$1\r\n1\r\n");
        assert_eq!(
            client.call(&["MGET", "m", "w"]).await,
            "*2\r\n$1\r\n2\r\n$1\r\n3\r\n"
        );
    }
    // Served from the cache meanwhile, or the test shows nothing.
    let (gets, mgets) = (redis_calls(&redis, "get"), redis_calls(&redis, "mget"));
    assert_eq!(client.call(&["GET", "v"]).await, "$1\r\n1\r\n");
    client.call(&["MGET", "m", "w"]).await;
    assert_eq!(
        (redis_calls(&redis, "get"), redis_calls(&redis, "mget")),
        (gets, mgets)
    );
    // Waiting out the keys' TTL itself: there is no event to wait for.
    tokio::time::sleep_until(set_at + Duration::from_millis(350)).await;
    assert_eq!(client.call(&["GET", "v"]).await, "$-1\r\n");
    assert_eq!(
        client.call(&["MGET", "m", "w"]).await,
        "*2\r\n$-1\r\n$1\r\n3\r\n"
    );
    // The probes' replies never reach the client: a pipeline right after a miss gets its own.
    let mut pipeline = Vec::new();
    for args in [&["GET", "fresh"][..], &["MGET", "a", "b"], &["PING"]] {
        pipeline.extend_from_slice(&redmux::resp::encode_command(
            args.iter().map(|a| a.as_bytes()),
        ));
    }
    let replies = client.pipeline(&pipeline, 3).await;
    assert_eq!(
        replies,
        vec![
            b"$-1\r\n".to_vec(),
            b"*2\r\n$-1\r\n$-1\r\n".to_vec(),
            b"+PONG\r\n".to_vec()
        ]
    );
    // A key named twice is probed once; a long MGET probes 256 keys at most, and what it
    // leaves unfilled a later read fills.
    let pttl = redis_calls(&redis, "pttl");
    client.call(&["MGET", "d1", "d2", "d1", "d1", "d2"]).await;
    assert_eq!(redis_calls(&redis, "pttl"), pttl + 2);
    let many: Vec<String> = (0..1000).map(|i| format!("many:{i}")).collect();
    let mut mget = vec!["MGET"];
    mget.extend(many.iter().map(String::as_str));
    let pttl = redis_calls(&redis, "pttl");
    client.call(&mget).await;
    assert_eq!(redis_calls(&redis, "pttl"), pttl + 256);
    let last = &many[999];
    client.call(&["MGET", last]).await;
    let mgets = redis_calls(&redis, "mget");
    assert_eq!(client.call(&["MGET", last]).await, "*1\r\n$-1\r\n");
    assert_eq!(
        redis_calls(&redis, "mget"),
        mgets,
        "filled by the read after"
    );
}

/// The bound holds for what the process really uses, bookkeeping and allocator included, not
/// only for the cache's own count: 60,000 values of 100 bytes (about 23 MiB of entries) read
/// twice through a cache of 8 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_within_max_memory() {
    let redis = RedisServer::start();
    let keys: Vec<String> = (0..60_000).map(|i| format!("mem:{i}")).collect();
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("SET").arg(key).arg(&[b'v'; 100][..]).ignore();
    }
    let _: () = pipe.query(&mut redis.direct()).unwrap();
    let redmux = RedmuxProcess::start(
        "",
        &format!(
            "[upstream]\naddress = \"{}\"\n[cache]\nenabled = true\nmax_memory = \"8mb\"\n",
            redis.addr()
        ),
    );
    let mut client = redmux.raw().await;
    wait_cache_serving(&redis, &mut client, "cache:warm").await;
    let before = redmux.rss_kib();
    for _ in 0..2 {
        for chunk in keys.chunks(1000) {
            // MGET: each key's element is cached on its own.
            let args: Vec<&str> = std::iter::once("MGET")
                .chain(chunk.iter().map(String::as_str))
                .collect();
            let reply = client.call(&args).await;
            assert_eq!(reply.len(), 7 + chunk.len() * 108);
        }
    }
    let grown = redmux.peak_rss_kib().saturating_sub(before);
    println!("resident memory grew by {grown} KiB for a max_memory of 8192 KiB");
    // 1 MiB for the client's own buffers (an MGET of 1,000 keys and its reply).
    assert!(grown <= 8 * 1024 + 1024, "grew by {grown} KiB");
    assert!(
        grown >= 4 * 1024,
        "the cache did not fill: grew by {grown} KiB"
    );
}

/// `[cache]` at a reload: turned on, it serves clients already connected; turned off, it
/// stops serving them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_cache_on_and_off_for_connected_clients() {
    let redis = RedisServer::start();
    let upstream = format!("[upstream]\naddress = \"{}\"\n", redis.addr());
    let redmux = RedmuxProcess::start("", &upstream);
    let mut client = redmux.raw().await;
    client.call(&["GET", "cache:warm"]).await;
    let before = redis_calls(&redis, "get");
    client.call(&["GET", "cache:warm"]).await;
    assert_eq!(
        redis_calls(&redis, "get"),
        before + 1,
        "off: every read reaches Redis"
    );
    redmux.reload("", &format!("{upstream}[cache]\nenabled = true\n"));
    redmux.wait_for_log("configuration reloaded", 1);
    wait_cache_serving(&redis, &mut client, "cache:warm").await;
    redmux.reload("", &upstream);
    // The log line comes just before the new settings are published: wait for a read that
    // reaches Redis, then every read must.
    let deadline = Deadline::new();
    loop {
        let before = redis_calls(&redis, "get");
        client.call(&["GET", "cache:warm"]).await;
        if redis_calls(&redis, "get") > before {
            break;
        }
        deadline.next_try("the cache turned off").await;
    }
    let before = redis_calls(&redis, "get");
    client.call(&["GET", "cache:warm"]).await;
    client.call(&["GET", "cache:warm"]).await;
    assert_eq!(redis_calls(&redis, "get"), before + 2, "off again");
}

async fn status(redmux: &Redmux) -> serde_json::Value {
    serde_json::from_str(&support::http_get(redmux.metrics.unwrap(), "/status").await).unwrap()
}
