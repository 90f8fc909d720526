//! Connection state: every client keeps its own db, protocol, name and transaction on shared
//! upstream connections, and nothing one client does changes what another sees.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::{Deadline, RedisServer, Redmux};

fn client_list(redis: &RedisServer) -> String {
    redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_is_per_client() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    let mut b = redmux.raw().await;
    let mut c = redmux.raw().await;
    assert_eq!(a.call(&["SELECT", "1"]).await, "+OK\r\n");
    assert_eq!(b.call(&["SELECT", "2"]).await, "+OK\r\n");
    assert_eq!(a.call(&["SET", "k", "in-1"]).await, "+OK\r\n");
    assert_eq!(b.call(&["SET", "k", "in-2"]).await, "+OK\r\n");
    assert_eq!(c.call(&["SET", "k", "in-0"]).await, "+OK\r\n");
    assert_eq!(a.call(&["GET", "k"]).await, "$4\r\nin-1\r\n");
    for (db, value) in [(0, "in-0"), (1, "in-1"), (2, "in-2")] {
        let mut direct = redis.direct_db(db);
        let got: String = redis::Commands::get(&mut direct, "k").unwrap();
        assert_eq!(got, value, "db {db}");
    }
    // Redis's errors for bad indexes, and the client stays where it was.
    assert_eq!(
        a.call(&["SELECT", "16"]).await,
        "-ERR DB index is out of range\r\n"
    );
    assert_eq!(
        a.call(&["SELECT", "-1"]).await,
        "-ERR DB index is out of range\r\n"
    );
    assert_eq!(
        a.call(&["SELECT", "abc"]).await,
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        a.call(&["SELECT", "99999999999"]).await,
        "-ERR value is out of range, value must between -2147483648 and 2147483647\r\n"
    );
    assert_eq!(
        a.call(&["SELECT"]).await,
        "-ERR wrong number of arguments for 'select' command\r\n"
    );
    assert_eq!(a.call(&["GET", "k"]).await, "$4\r\nin-1\r\n");
    // The redis crate's db in the URL is a SELECT at connect.
    let mut con = support::connect(&format!("redis://{}/2", redmux.addr)).await;
    let got: String = con.get("k").await.unwrap();
    assert_eq!(got, "in-2");
    // Three databases in use: three shared connections (per serving thread), however many
    // clients.
    let connections = client_list(&redis).lines().count();
    assert!(
        (4..=3 * support::serving_threads() + 1).contains(&connections),
        "{}",
        client_list(&redis)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_switches_only_that_client_to_resp3() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut v2 = redmux.raw().await;
    let mut v3 = redmux.raw().await;
    assert_eq!(v2.call(&["HSET", "h", "f", "v"]).await, ":1\r\n");
    let id = v2.call(&["CLIENT", "ID"]).await;
    let id = id.trim_start_matches(':').trim_end();
    assert_eq!(
        v2.call(&["HELLO"]).await,
        format!(
            "*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:2\r\n\
             $2\r\nid\r\n:{id}\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n\
             $7\r\nmodules\r\n*0\r\n"
        )
    );
    let hello3 = v3.call(&["HELLO", "3"]).await;
    assert!(hello3.starts_with("%7\r\n$6\r\nserver\r\n"), "{hello3}");
    assert!(hello3.contains("$5\r\nproto\r\n:3\r\n"), "{hello3}");
    assert_eq!(
        v3.call(&["HGETALL", "h"]).await,
        "%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(
        v2.call(&["HGETALL", "h"]).await,
        "*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(v3.call(&["GET", "missing"]).await, "_\r\n");
    assert_eq!(v2.call(&["GET", "missing"]).await, "$-1\r\n");
    assert_eq!(
        v2.call(&["HELLO", "4"]).await,
        "-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        v2.call(&["HELLO", "abc"]).await,
        "-ERR Protocol version is not an integer or out of range\r\n"
    );
    assert_eq!(
        v2.call(&["HELLO", "3", "SETNAME"]).await,
        "-ERR Syntax error in HELLO option 'SETNAME'\r\n"
    );
    assert_eq!(
        v2.call(&["HELLO", "3", "AUTH", "bob", "pw"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    let named = v2
        .call(&["HELLO", "2", "AUTH", "default", "any", "SETNAME", "v2"])
        .await;
    assert!(named.starts_with("*14\r\n"), "{named}");
    assert_eq!(v2.call(&["CLIENT", "GETNAME"]).await, "$2\r\nv2\r\n");
    // Back to RESP2.
    assert!(v3.call(&["HELLO", "2"]).await.starts_with("*14\r\n"));
    assert_eq!(v3.call(&["GET", "missing"]).await, "$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_and_reset_are_per_client() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    let mut b = redmux.raw().await;
    assert_eq!(a.call(&["CLIENT", "SETNAME", "alice"]).await, "+OK\r\n");
    assert_eq!(a.call(&["CLIENT", "GETNAME"]).await, "$5\r\nalice\r\n");
    assert_eq!(b.call(&["CLIENT", "GETNAME"]).await, "$-1\r\n");
    assert_eq!(
        b.call(&["CLIENT", "SETNAME", "has space"]).await,
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_ne!(
        a.call(&["CLIENT", "ID"]).await,
        b.call(&["CLIENT", "ID"]).await
    );
    let info = a.call(&["CLIENT", "INFO"]).await;
    assert!(
        info.contains(" name=alice ")
            && info.contains(" db=0 ")
            && info.contains(&format!(" laddr={} ", redmux.addr))
            && info.ends_with("resp=2\n\r\n"),
        "{info}"
    );
    assert_eq!(a.call(&["CLIENT", "NO-EVICT", "ON"]).await, "+OK\r\n");
    assert_eq!(
        a.call(&["CLIENT", "SETINFO", "LIB-NAME", "redmux-test"])
            .await,
        "+OK\r\n"
    );
    assert_eq!(
        a.call(&["CLIENT", "BOGUS"]).await,
        "-ERR unknown subcommand 'BOGUS'. Try CLIENT HELP.\r\n"
    );
    assert_eq!(
        a.call(&["AUTH", "pw"]).await,
        "-ERR AUTH <password> called without any password configured for the default user. \
         Are you sure your configuration is correct?\r\n"
    );
    // CLIENT REPLY OFF: nothing comes back until ON.
    a.send("CLIENT REPLY OFF\r\nSET quiet 1\r\nGET quiet\r\nCLIENT REPLY ON\r\nGET quiet\r\n")
        .await;
    assert_eq!(a.reply_str().await, "+OK\r\n");
    assert_eq!(a.reply_str().await, "$1\r\n1\r\n");
    a.send("CLIENT REPLY SKIP\r\nINCR skipped\r\nINCR skipped\r\n")
        .await;
    assert_eq!(a.reply_str().await, ":2\r\n");
    // RESET: db, name and protocol back to their defaults.
    assert_eq!(a.call(&["SELECT", "3"]).await, "+OK\r\n");
    assert!(a.call(&["HELLO", "3"]).await.starts_with('%'));
    assert_eq!(a.call(&["RESET"]).await, "+RESET\r\n");
    assert_eq!(a.call(&["CLIENT", "GETNAME"]).await, "$-1\r\n");
    assert_eq!(a.call(&["GET", "missing"]).await, "$-1\r\n");
    assert_eq!(a.call(&["SET", "after-reset", "x"]).await, "+OK\r\n");
    let in_db0: String = redis::Commands::get(&mut redis.direct(), "after-reset").unwrap();
    assert_eq!(in_db0, "x");
    // None of it reached Redis, but the AUTH, which Redis checked on a connection that
    // carries nothing else (see tests/passthrough.rs).
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.direct())
        .unwrap();
    for command in ["client", "reset"] {
        assert!(!stats.contains(&format!("cmdstat_{command}:")), "{stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_private() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    let mut b = redmux.raw().await;
    assert_eq!(a.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.call(&["INCR", "x"]).await, "+QUEUED\r\n");
    // Another client's writes run at once, not inside A's transaction.
    assert_eq!(b.call(&["SET", "x", "100"]).await, "+OK\r\n");
    assert_eq!(b.call(&["GET", "x"]).await, "$3\r\n100\r\n");
    assert_eq!(
        a.call(&["MULTI"]).await,
        "-ERR MULTI calls can not be nested\r\n"
    );
    assert_eq!(a.call(&["EXEC"]).await, "*1\r\n:101\r\n");
    // DISCARD drops the queue.
    assert_eq!(a.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.call(&["SET", "x", "discarded"]).await, "+QUEUED\r\n");
    assert_eq!(a.call(&["DISCARD"]).await, "+OK\r\n");
    assert_eq!(a.call(&["GET", "x"]).await, "$3\r\n101\r\n");
    assert_eq!(a.call(&["EXEC"]).await, "-ERR EXEC without MULTI\r\n");
    assert_eq!(a.call(&["DISCARD"]).await, "-ERR DISCARD without MULTI\r\n");
    // The transaction runs in the client's database.
    assert_eq!(a.call(&["SELECT", "4"]).await, "+OK\r\n");
    a.send("MULTI\r\nSET in4 yes\r\nEXEC\r\nSET after-exec shared\r\n")
        .await;
    assert_eq!(a.reply_str().await, "+OK\r\n");
    assert_eq!(a.reply_str().await, "+QUEUED\r\n");
    assert_eq!(a.reply_str().await, "*1\r\n+OK\r\n");
    assert_eq!(a.reply_str().await, "+OK\r\n");
    let mut db4 = redis.direct_db(4);
    let got: Vec<String> = redis::cmd("MGET")
        .arg("in4")
        .arg("after-exec")
        .query(&mut db4)
        .unwrap();
    assert_eq!(got, ["yes", "shared"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transactions_through_the_redis_crate() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut tasks = Vec::new();
    for id in 0..20 {
        let url = redmux.url();
        tasks.push(tokio::spawn(async move {
            let mut con = support::connect(&url).await;
            for round in 0..10 {
                let key = format!("t:{id}");
                let (n, value): (i64, String) = redis::pipe()
                    .atomic()
                    .incr(&key, 1)
                    .set(format!("{key}:v"), format!("{id}/{round}"))
                    .ignore()
                    .get(format!("{key}:v"))
                    .query_async(&mut con)
                    .await
                    .unwrap();
                assert_eq!((n, value), (round + 1, format!("{id}/{round}")));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_is_aborted_by_another_clients_write() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    let mut b = redmux.raw().await;
    assert_eq!(a.call(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(a.call(&["GET", "w"]).await, "$-1\r\n");
    assert_eq!(b.call(&["SET", "w", "theirs"]).await, "+OK\r\n");
    assert_eq!(a.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.call(&["SET", "w", "mine"]).await, "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]).await, "*-1\r\n");
    assert_eq!(b.call(&["GET", "w"]).await, "$6\r\ntheirs\r\n");
    // Without interference the same sequence commits; UNWATCH releases the connection.
    assert_eq!(a.call(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(a.call(&["UNWATCH"]).await, "+OK\r\n");
    assert_eq!(a.call(&["UNWATCH"]).await, "+OK\r\n");
    assert_eq!(a.call(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(a.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.call(&["SET", "w", "mine"]).await, "+QUEUED\r\n");
    assert_eq!(a.call(&["EXEC"]).await, "*1\r\n+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_transaction_applies_nothing() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    assert_eq!(a.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.call(&["SET", "gone", "1"]).await, "+QUEUED\r\n");
    let before = client_list(&redis).lines().count();
    drop(a);
    // Its pinned connection is closed, not returned to the pool.
    let deadline = Deadline::new();
    while client_list(&redis).lines().count() >= before {
        deadline.next_try("pinned connection never closed").await;
    }
    let gone: Option<String> = redis::Commands::get(&mut redis.direct(), "gone").unwrap();
    assert_eq!(gone, None);
    // RESET inside a transaction discards it too.
    let mut b = redmux.raw().await;
    assert_eq!(b.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(b.call(&["SET", "reset", "1"]).await, "+QUEUED\r\n");
    assert_eq!(b.call(&["RESET"]).await, "+RESET\r\n");
    assert_eq!(b.call(&["GET", "reset"]).await, "$-1\r\n");
}

const NO_PINNED: &str = "-ERR redmux: no pinned upstream connection free (max_pinned reached)\r\n";
const ABORTED_NO_PINNED: &str = "-EXECABORT Transaction discarded because of: redmux: no pinned upstream connection free (max_pinned reached)\r\n";

/// Every pinned connection taken: a transaction gets none, and none of it runs, however the
/// client sends it; its EXEC says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_pool_exhausted_gives_a_clear_error() {
    let redis = RedisServer::start();
    let (redmux, mut a) =
        support::pinned_pool_held(&redis.addr(), Duration::from_millis(300)).await;
    let mut b = redmux.raw().await;
    let started = Instant::now();
    assert_eq!(b.call(&["MULTI"]).await, "+OK\r\n");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(b.call(&["SET", "b", "queued"]).await, "+QUEUED\r\n");
    assert_eq!(
        b.call(&["MULTI"]).await,
        "-ERR MULTI calls can not be nested\r\n"
    );
    assert_eq!(
        b.call(&["WATCH", "b"]).await,
        "-ERR WATCH inside MULTI is not allowed\r\n"
    );
    assert_eq!(b.call(&["EXEC"]).await, ABORTED_NO_PINNED);
    assert_eq!(b.call(&["GET", "b"]).await, "$-1\r\n");
    // A command refused while queuing comes first, as with a connection.
    assert_eq!(b.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(
        b.call(&["GET\0x", "k"]).await,
        "-ERR unknown command 'GET', with args beginning with: 'k' \r\n"
    );
    assert_eq!(
        b.call(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    // Redis's arity check on EXEC comes first.
    assert_eq!(b.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(
        b.call(&["EXEC", "x"]).await,
        "-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n"
    );
    assert_eq!(b.call(&["SET", "b", "still works"]).await, "+OK\r\n");
    // Pipelined, as a client library sends a transaction: nothing runs outside it, nothing is
    // sent to the shared connection (whose SELECT would move every client).
    let pipelined = [
        &["MULTI"][..],
        &["SET", "t", "1"],
        &["SELECT", "3"],
        &["INCR", "n"],
        &["EXEC"],
        &["WATCH", "w"],
        &["MULTI"],
        &["SET", "w", "1"],
        &["EXEC"],
        &["MULTI"],
        &["SET", "d", "1"],
        &["DISCARD"],
        &["GET", "b"],
    ]
    .map(|args| {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        redmux::resp::encode_command(args).to_vec()
    })
    .concat();
    let replies = b.pipeline(&pipelined, 13).await;
    let replies: Vec<String> = replies
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    let queued = "+QUEUED\r\n";
    assert_eq!(
        replies,
        [
            "+OK\r\n",
            queued,
            queued,
            queued,
            ABORTED_NO_PINNED,
            NO_PINNED,
            "+OK\r\n",
            queued,
            ABORTED_NO_PINNED,
            "+OK\r\n",
            queued,
            "+OK\r\n",
            "$11\r\nstill works\r\n",
        ]
    );
    let mut direct = redis.direct();
    for key in ["t", "n", "w", "d"] {
        let exists: bool = redis::Commands::exists(&mut direct, key).unwrap();
        assert!(!exists, "{key} was written outside its transaction");
    }
    let mut db3 = redis.direct_db(3);
    let in3: bool = redis::Commands::exists(&mut db3, "n").unwrap();
    assert!(!in3);
    // A WATCH that got no connection did not hold: the transaction after it never runs,
    // even once a connection is free, and the client's other commands run as ever.
    assert_eq!(b.call(&["WATCH", "w"]).await, NO_PINNED);
    assert_eq!(b.call(&["EXEC"]).await, "-ERR EXEC without MULTI\r\n");
    assert_eq!(b.call(&["SET", "plain", "1"]).await, "+OK\r\n");
    assert_eq!(a.call(&["EXEC"]).await, "*0\r\n");
    assert_eq!(b.call(&["BLPOP", "nothing", "0.01"]).await, "*-1\r\n");
    assert_eq!(b.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(b.call(&["SET", "w", "1"]).await, queued);
    assert_eq!(b.call(&["EXEC"]).await, ABORTED_NO_PINNED);
    let exists: bool = redis::Commands::exists(&mut direct, "w").unwrap();
    assert!(!exists);
    // Released (cleaned and pooled): B gets it now, and it is in B's db, not A's.
    assert_eq!(b.call(&["SELECT", "5"]).await, "+OK\r\n");
    assert_eq!(b.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(b.call(&["SET", "in5", "1"]).await, queued);
    assert_eq!(b.call(&["EXEC"]).await, "*1\r\n+OK\r\n");
    let mut db5 = redis.direct_db(5);
    let in5: String = redis::Commands::get(&mut db5, "in5").unwrap();
    assert_eq!(in5, "1");
}

/// 100 clients doing 20 SETs each at full speed: the 99th percentile of their latencies.
async fn hundred_clients_p99(addr: std::net::SocketAddr) -> Duration {
    let mut tasks = Vec::new();
    for id in 0..100 {
        tasks.push(tokio::spawn(async move {
            let mut raw = support::Raw::connect(addr).await;
            let mut latencies = Vec::new();
            for i in 0..20 {
                let t = Instant::now();
                assert_eq!(
                    raw.call(&["SET", &format!("k{id}"), &i.to_string()]).await,
                    "+OK\r\n"
                );
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all[all.len() * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_get_a_connection_of_their_own() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let baseline = hundred_clients_p99(redmux.addr).await;
    let mut blocked = redmux.raw().await;
    blocked.send("BLPOP jobs 0\r\n").await;
    redis.wait_blocked_clients(1).await;
    // While it blocks, the same 100 clients at full speed see the same latency.
    let during = hundred_clients_p99(redmux.addr).await;
    println!("100 clients, p99 latency: {baseline:?} alone, {during:?} beside a blocked BLPOP");
    assert!(
        during < baseline * 3 + Duration::from_millis(50),
        "p99 {during:?} beside BLPOP, {baseline:?} without"
    );
    // Another client's LPUSH wakes it.
    let mut pusher = redmux.raw().await;
    assert_eq!(pusher.call(&["LPUSH", "jobs", "job-1"]).await, ":1\r\n");
    assert_eq!(
        blocked.reply_str().await,
        "*2\r\n$4\r\njobs\r\n$5\r\njob-1\r\n"
    );
    // A timeout is Redis's null array after the timeout, not a redmux error.
    let t = Instant::now();
    assert_eq!(blocked.call(&["BRPOP", "empty", "0.3"]).await, "*-1\r\n");
    assert!(t.elapsed() >= Duration::from_millis(250));
    // XREAD BLOCK woken by XADD.
    blocked.send("XREAD BLOCK 0 STREAMS s $\r\n").await;
    // Wait until Redis has it blocked (it shows as a blocked client).
    redis.wait_blocked_clients(1).await;
    assert!(pusher
        .call(&["XADD", "s", "*", "f", "v"])
        .await
        .starts_with('$'));
    assert!(blocked
        .reply_str()
        .await
        .starts_with("*1\r\n*2\r\n$1\r\ns\r\n"));
    // Connections stay bounded: one shared (per serving thread) plus the pooled pinned one
    // (plus the direct one).
    assert!(
        client_list(&redis).lines().count() <= support::serving_threads() + 2,
        "{}",
        client_list(&redis)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_client_leaving_closes_its_connection() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut blocked = redmux.raw().await;
    blocked.send("BLPOP never 0\r\n").await;
    redis.wait_blocked_clients(1).await;
    drop(blocked);
    redis.wait_blocked_clients(0).await;
    // A later LPUSH is not eaten by the departed client's BLPOP.
    let mut pusher = redmux.raw().await;
    assert_eq!(pusher.call(&["LPUSH", "never", "x"]).await, ":1\r\n");
    assert_eq!(pusher.call(&["LLEN", "never"]).await, ":1\r\n");
    // The same while watching, with 2 MB of requests behind the BLPOP on its connection: past
    // the bytes redmux lets a client have on their way, and still its close is seen (it was
    // not, and the BLPOP ate the push, and the SET behind it ran).
    let mut watching = redmux.raw().await;
    assert_eq!(watching.call(&["WATCH", "w"]).await, "+OK\r\n");
    let big = "x".repeat(2_000_000);
    let mut out = b"BLPOP later 0\r\n".to_vec();
    out.extend(redmux::resp::encode_command(
        ["SET", "big", big.as_str()].map(str::as_bytes),
    ));
    out.extend(b"PING\r\n");
    watching.send(out).await;
    redis.wait_blocked_clients(1).await;
    drop(watching);
    redis.wait_blocked_clients(0).await;
    assert_eq!(pusher.call(&["LPUSH", "later", "x"]).await, ":1\r\n");
    assert_eq!(pusher.call(&["LLEN", "later"]).await, ":1\r\n");
    assert_eq!(pusher.call(&["EXISTS", "big"]).await, ":0\r\n");
    // And with more requests behind it than `max_pipeline` (1024).
    let mut watching = redmux.raw().await;
    assert_eq!(watching.call(&["WATCH", "w"]).await, "+OK\r\n");
    watching
        .send(format!("BLPOP deep 0\r\n{}", "PING\r\n".repeat(1100)))
        .await;
    redis.wait_blocked_clients(1).await;
    drop(watching);
    redis.wait_blocked_clients(0).await;
    assert_eq!(pusher.call(&["LPUSH", "deep", "x"]).await, ":1\r\n");
    assert_eq!(pusher.call(&["LLEN", "deep"]).await, ":1\r\n");
}

/// A client blocked behind a large reply it does not read, that closes its side: Redis reads a
/// blocked client on and drops it at the end of its input; so does redmux, though it stops
/// reading a client with a megabyte of replies waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_client_that_half_closes_unread_is_dropped() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut pusher = redmux.raw().await;
    let big = "x".repeat(8_000_000);
    assert_eq!(pusher.call(&["SET", "big", &big]).await, "+OK\r\n");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(redmux.addr).await.unwrap();
    let requests = b"GET big\r\nBLPOP half 0\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, requests)
        .await
        .unwrap();
    redis.wait_blocked_clients(1).await;
    tokio::io::AsyncWriteExt::shutdown(&mut stream)
        .await
        .unwrap();
    redis.wait_blocked_clients(0).await;
    assert_eq!(pusher.call(&["LPUSH", "half", "x"]).await, ":1\r\n");
    assert_eq!(pusher.call(&["LLEN", "half"]).await, ":1\r\n");
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_gets_a_connection_of_its_own() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut watcher = redmux.raw().await;
    assert_eq!(watcher.call(&["MONITOR"]).await, "+OK\r\n");
    assert!(
        client_list(&redis).contains("flags=O"),
        "{}",
        client_list(&redis)
    );
    let mut writer = redmux.raw().await;
    assert_eq!(writer.call(&["SET", "watched", "value"]).await, "+OK\r\n");
    loop {
        let line = watcher.reply_str().await;
        assert!(line.starts_with('+'), "{line}");
        if line.contains("\"SET\" \"watched\" \"value\"") {
            break;
        }
    }
    // Redis counts a monitoring client as a replica: it may not touch the keyspace.
    let refused = "-ERR Replica can't interact with the keyspace\r\n";
    for args in [
        &["GET", "watched"][..],
        &["SET", "watched", "other"],
        &["EVAL", "return 1", "0"],
        &["BLPOP", "list", "0"],
        &["OBJECT", "ENCODING", "watched"],
    ] {
        assert_eq!(watcher.call(args).await, refused, "{args:?}");
    }
    // RESET stops monitoring: its connection goes away.
    assert_eq!(watcher.call(&["RESET"]).await, "+RESET\r\n");
    let deadline = Deadline::new();
    while client_list(&redis).contains("flags=O") {
        deadline.next_try("MONITOR connection never closed").await;
    }
    assert_eq!(watcher.call(&["GET", "watched"]).await, "$5\r\nvalue\r\n");
    // MONITOR and RESET in one write: MONITOR's `+OK` first, as Redis answers (closing the
    // MONITOR connection at RESET lost it, and the client got an error in its place). A second
    // MONITOR gets no reply at all, as from Redis.
    let replies = watcher
        .pipeline(b"MONITOR\r\nMONITOR\r\nRESET\r\nGET watched\r\n", 3)
        .await;
    assert_eq!(
        replies,
        [&b"+OK\r\n"[..], b"+RESET\r\n", b"$5\r\nvalue\r\n"],
        "{:?}",
        replies
            .iter()
            .map(|r| String::from_utf8_lossy(r))
            .collect::<Vec<_>>()
    );
    while client_list(&redis).contains("flags=O") {
        deadline.next_try("MONITOR connection never closed").await;
    }

    let mut config = support::config(&redis.addr());
    config.upstream.allow_monitor = false;
    let refusing = Redmux::start_with(config).await;
    let mut raw = refusing.raw().await;
    assert_eq!(
        raw.call(&["MONITOR"]).await,
        "-ERR redmux: MONITOR is disabled (upstream.allow_monitor = false)\r\n"
    );
}

/// Edges where a pinned connection is given up: RESET pipelined after queued commands answers
/// them all as Redis does; a client blocked while watching that leaves frees its connection;
/// MONITOR while watching is a real MONITOR, not a command on the watching connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_a_pinned_connection() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    a.send("MULTI\r\nSET c 1\r\nRESET\r\nGET c\r\n").await;
    assert_eq!(a.reply_str().await, "+OK\r\n");
    assert_eq!(a.reply_str().await, "+QUEUED\r\n");
    assert_eq!(a.reply_str().await, "+RESET\r\n");
    assert_eq!(
        a.reply_str().await,
        "$-1\r\n",
        "the transaction was discarded"
    );
    a.send("WATCH k\r\nGET k\r\nRESET\r\n").await;
    assert_eq!(a.reply_str().await, "+OK\r\n");
    assert_eq!(a.reply_str().await, "$-1\r\n");
    assert_eq!(a.reply_str().await, "+RESET\r\n");

    let mut watcher = redmux.raw().await;
    assert_eq!(watcher.call(&["WATCH", "k"]).await, "+OK\r\n");
    assert_eq!(watcher.call(&["MONITOR"]).await, "+OK\r\n");
    assert_eq!(watcher.call(&["UNWATCH"]).await, "+OK\r\n");
    assert_eq!(a.call(&["SET", "seen", "1"]).await, "+OK\r\n");
    loop {
        let line = watcher.reply_str().await;
        if line.contains("\"SET\" \"seen\"") {
            break;
        }
    }

    let mut blocked = redmux.raw().await;
    assert_eq!(blocked.call(&["WATCH", "k"]).await, "+OK\r\n");
    blocked.send("BLPOP q 0\r\n").await;
    redis.wait_blocked_clients(1).await;
    drop(blocked);
    redis.wait_blocked_clients(0).await;
}

/// The master's replication INFO, once the replica is online and has acknowledged every
/// write so far (its `offset` is the master's `master_repl_offset`).
async fn replica_caught_up(master: &RedisServer) {
    let deadline = Deadline::new();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut master.direct())
            .unwrap();
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.split_once(name).map(|(_, rest)| rest.to_owned()))
        };
        let master_offset = field("master_repl_offset:");
        let acked = field("slave0:").and_then(|slave| {
            slave
                .contains("state=online")
                .then(|| {
                    slave
                        .split(",offset=")
                        .nth(1)?
                        .split(',')
                        .next()
                        .map(str::to_owned)
                })
                .flatten()
        });
        if acked.is_some() && acked == master_offset {
            return;
        }
        deadline
            .next_try(format!("the replica never caught up:\n{info}"))
            .await;
    }
}

/// WAIT counts the replicas that acknowledged the client's own writes, as Redis counts them
/// for the writes of the connection it runs on. redmux runs WAIT on a pinned connection,
/// reused here after the client's transaction: its offset is the transaction's, which the
/// replica had. redmux sends a PING there first, which moves the offset past the client's
/// writes. Without it, with the only replica stopped, WAIT answered `:1` at once for a write
/// the replica never got. Directly, then through redmux; and once the replica runs again,
/// WAIT counts it. Under a write pause on Redis, WAIT is answered at once, as directly (a
/// written mark, an SPUBLISH, waited for the pause to end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_counts_the_replicas_that_have_the_clients_own_writes() {
    let master = RedisServer::start();
    let port = master.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let redmux = Redmux::start(&master.addr()).await;
    for addr in [master.addr().parse().unwrap(), redmux.addr] {
        let mut client = support::Raw::connect(addr).await;
        let transaction = client.pipeline(b"MULTI\r\nSET a 1\r\nEXEC\r\n", 3).await;
        assert_eq!(transaction[2], b"*1\r\n+OK\r\n", "{addr}");
        replica_caught_up(&master).await;
        replica.signal("STOP");
        let replies = client.pipeline(b"SET w 2\r\nWAIT 1 300\r\n", 2).await;
        replica.signal("CONT");
        assert_eq!(replies, [&b"+OK\r\n"[..], b":0\r\n"], "{addr}");
        assert_eq!(
            client.call(&["WAIT", "1", "10000"]).await,
            ":1\r\n",
            "{addr}"
        );
        let _: () = redis::cmd("CLIENT")
            .arg(&["PAUSE", "20000", "WRITE"][..])
            .query(&mut master.direct())
            .unwrap();
        let started = Instant::now();
        let count = client.call(&["WAIT", "0", "100"]).await;
        assert!(count.starts_with(':'), "{addr}: {count}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{addr}: WAIT waited for the pause"
        );
        let _: () = redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query(&mut master.direct())
            .unwrap();
    }
}
