//! CLIENT TRACKING through redmux: every client tracks as if it had a connection of its own.
//! Each scenario runs three times: directly against Redis (the reference), with both clients
//! through redmux, and with the tracking client through redmux while the writer talks to Redis
//! directly. What the tracking client (or its redirect target) sees must be the same bytes,
//! client ids aside.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::net::SocketAddr;

use support::{Raw, RedisServer, Redmux};

/// Where a scenario's clients connect: the tracking client (and its redirect target), and the
/// client that writes.
#[derive(Clone, Copy)]
struct Ends {
    track: SocketAddr,
    write: SocketAddr,
}

/// Redis directly, both through redmux, and tracking through redmux with a direct writer.
fn ends(redis: &RedisServer, redmux: &Redmux) -> [(&'static str, Ends); 3] {
    let direct: SocketAddr = redis.addr().parse().unwrap();
    [
        (
            "redis",
            Ends {
                track: direct,
                write: direct,
            },
        ),
        (
            "redmux",
            Ends {
                track: redmux.addr,
                write: redmux.addr,
            },
        ),
        (
            "redmux, writer direct",
            Ends {
                track: redmux.addr,
                write: direct,
            },
        ),
    ]
}

async fn id_of(raw: &mut Raw) -> String {
    let reply = raw.call(&["CLIENT", "ID"]).await;
    reply.trim_start_matches(':').trim_end().to_owned()
}

/// The `flags` and `redir` fields of CLIENT INFO, ids replaced by `ID`.
async fn info_fields(raw: &mut Raw, ids: &[&str]) -> String {
    let info = raw.call(&["CLIENT", "INFO"]).await;
    let mut fields: Vec<String> = info
        .split(' ')
        .filter(|f| f.starts_with("flags=") || f.starts_with("redir="))
        .map(str::to_owned)
        .collect();
    for field in &mut fields {
        for id in ids {
            if field.ends_with(&format!("={id}")) {
                *field = field.replace(id, "ID");
            }
        }
    }
    fields.join(" ")
}

/// Starts Redis and redmux, runs `scenario` at each of [`ends`] after emptying Redis, and
/// asserts every transcript is Redis's; returns it.
async fn same_as_redis<F, Fut>(scenario: F) -> Vec<String>
where
    F: Fn(Ends) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let redis = RedisServer::start();
    let mut transcripts = Vec::new();
    for at in 0..3 {
        let mut direct = redis.direct();
        let () = redis::cmd("FLUSHALL").query(&mut direct).unwrap();
        // A redmux of its own for each end, started after the FLUSHALL: Redis pushes a flush
        // to a redmux whose stream tracked keys before, and it could reach the next
        // scenario's tracking client, which Redis's own client never sees.
        let redmux = Redmux::start(&redis.addr()).await;
        let Some((name, ends)) = ends(&redis, &redmux).into_iter().nth(at) else {
            unreachable!("three ends");
        };
        transcripts.push((name, scenario(ends).await));
    }
    let (_, expected) = &transcripts[0];
    for (name, transcript) in &transcripts[1..] {
        assert_eq!(
            transcript, expected,
            "{name}: the transcript differs from Redis's"
        );
    }
    transcripts.swap_remove(0).1
}

/// A tracking client in RESP3 and a writer.
async fn resp3_clients(ends: Ends) -> (Raw, Raw) {
    let mut t = Raw::connect(ends.track).await;
    assert!(t.call(&["HELLO", "3"]).await.starts_with('%'));
    (t, Raw::connect(ends.write).await)
}

/// The default mode in RESP3: reads are tracked, each changed key is pushed once, the
/// client's own write is pushed after its reply, FLUSHALL pushes the null invalidation.
async fn default_mode(ends: Ends) -> Vec<String> {
    let (mut t, mut w) = resp3_clients(ends).await;
    let mut log = Vec::new();
    log.push(t.call(&["CLIENT", "TRACKING", "ON"]).await);
    log.push(t.call(&["GET", "k"]).await);
    assert_eq!(w.call(&["SET", "k", "1"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    log.push(t.call(&["MGET", "x", "y"]).await);
    assert_eq!(w.call(&["MSET", "x", "1", "y", "2"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    log.push(t.reply_str().await);
    // A read and the client's own write in one pipeline: the push follows the write's reply.
    for reply in t
        .pipeline(
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n2\r\n",
            3,
        )
        .await
    {
        log.push(String::from_utf8_lossy(&reply).into_owned());
    }
    log.push(t.call(&["CLIENT", "TRACKINGINFO"]).await);
    log.push(t.call(&["CLIENT", "GETREDIR"]).await);
    log.push(info_fields(&mut t, &[]).await);
    log.push(t.call(&["GET", "k"]).await);
    assert_eq!(w.call(&["FLUSHALL"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    log.push(t.call(&["CLIENT", "TRACKING", "OFF"]).await);
    log.push(t.call(&["CLIENT", "TRACKINGINFO"]).await);
    log.push(info_fields(&mut t, &[]).await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_mode_pushes_what_redis_pushes() {
    let log = same_as_redis(default_mode).await;
    assert_eq!(log[2], ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n");
    assert_eq!(log[13], ">2\r\n$10\r\ninvalidate\r\n_\r\n", "{log:?}");
}

/// A RESP2 client redirects its invalidations to a subscribed client, which gets them as
/// messages on `__redis__:invalidate`, the null one included.
async fn redirect_resp2(ends: Ends) -> Vec<String> {
    let mut s = Raw::connect(ends.track).await;
    let mut t = Raw::connect(ends.track).await;
    let mut w = Raw::connect(ends.write).await;
    let id = id_of(&mut s).await;
    let ids = [id.as_str()];
    let mut log = Vec::new();
    log.push(s.call(&["SUBSCRIBE", "__redis__:invalidate"]).await);
    log.push(t.call(&["CLIENT", "TRACKING", "ON", "REDIRECT", &id]).await);
    log.push(t.call(&["GET", "k"]).await);
    assert_eq!(w.call(&["SET", "k", "1"]).await, "+OK\r\n");
    log.push(s.reply_str().await);
    log.push(
        t.call(&["CLIENT", "TRACKINGINFO"])
            .await
            .replace(&format!(":{id}\r\n"), ":ID\r\n"),
    );
    log.push(t.call(&["CLIENT", "GETREDIR"]).await.replace(&id, "ID"));
    log.push(info_fields(&mut t, &ids).await);
    log.push(t.call(&["GET", "k"]).await);
    assert_eq!(w.call(&["FLUSHALL"]).await, "+OK\r\n");
    log.push(s.reply_str().await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp2_client_redirects_to_a_subscribed_client() {
    let log = same_as_redis(redirect_resp2).await;
    assert_eq!(
        log[3],
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n"
    );
    assert_eq!(
        log[8],
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n"
    );
}

/// The redirect target leaves: the tracking client (RESP3) is told so, once per invalidation,
/// and shows the `R` flag.
async fn broken_redirect(ends: Ends) -> Vec<String> {
    let mut s = Raw::connect(ends.track).await;
    let mut t = Raw::connect(ends.track).await;
    let mut w = Raw::connect(ends.write).await;
    let id = id_of(&mut s).await;
    let ids = [id.as_str()];
    let mut log = Vec::new();
    assert!(t.call(&["HELLO", "3"]).await.starts_with('%'));
    log.push(t.call(&["CLIENT", "TRACKING", "ON", "REDIRECT", &id]).await);
    log.push(t.call(&["GET", "k"]).await);
    drop(s);
    // Gone once CLIENT LIST no longer shows it.
    let deadline = support::Deadline::new();
    let listed = format!("id={id} ");
    while t
        .call(&["CLIENT", "LIST", "ID", &id])
        .await
        .contains(&listed)
    {
        deadline.next_try("the redirect client gone").await;
    }
    assert_eq!(w.call(&["SET", "k", "1"]).await, "+OK\r\n");
    log.push(frame_of(t.reply_str().await, &ids));
    log.push(info_fields(&mut t, &ids).await);
    log.push(frame_of(t.call(&["CLIENT", "TRACKINGINFO"]).await, &ids));
    log
}

/// `text` with the integer replies that are client ids replaced by `ID`.
fn frame_of(text: String, ids: &[&str]) -> String {
    ids.iter().fold(text, |text, id| {
        text.replace(&format!(":{id}\r\n"), ":ID\r\n")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_redirect_is_reported_as_redis_reports_it() {
    let log = same_as_redis(broken_redirect).await;
    assert_eq!(log[2], ">2\r\n$21\r\ntracking-redir-broken\r\n:ID\r\n");
    assert_eq!(log[3], "flags=tR redir=ID");
}

/// BCAST with prefixes: only matching keys.
async fn broadcast(ends: Ends) -> Vec<String> {
    let (mut t, mut w) = resp3_clients(ends).await;
    let mut log = Vec::new();
    let on = ["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "b:"];
    log.push(t.call(&on).await);
    log.push(
        t.call(&["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a:"])
            .await,
    );
    log.push(t.call(&["CLIENT", "TRACKINGINFO"]).await);
    log.push(info_fields(&mut t, &[]).await);
    assert_eq!(w.call(&["SET", "a:1", "x"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    // A key of no prefix is not pushed: the next push is the one after it.
    assert_eq!(w.call(&["SET", "c:1", "x"]).await, "+OK\r\n");
    assert_eq!(w.call(&["SET", "b:1", "x"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    // The client's own write too.
    log.push(t.call(&["SET", "a:2", "x"]).await);
    log.push(t.reply_str().await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcast_follows_prefixes() {
    let log = same_as_redis(broadcast).await;
    assert_eq!(log[3], "flags=tB redir=0");
    assert_eq!(log[7], ">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\na:2\r\n");
}

/// OPTIN: only a read after CLIENT CACHING YES is tracked.
async fn optin(ends: Ends) -> Vec<String> {
    let (mut t, mut w) = resp3_clients(ends).await;
    let mut log = Vec::new();
    log.push(t.call(&["CLIENT", "TRACKING", "ON", "OPTIN"]).await);
    log.push(t.call(&["GET", "k"]).await);
    log.push(t.call(&["CLIENT", "CACHING", "YES"]).await);
    log.push(t.call(&["CLIENT", "TRACKINGINFO"]).await);
    log.push(t.call(&["GET", "j"]).await);
    assert_eq!(w.call(&["SET", "k", "1"]).await, "+OK\r\n");
    assert_eq!(w.call(&["SET", "j", "1"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optin_tracks_only_after_caching_yes() {
    let log = same_as_redis(optin).await;
    assert_eq!(log[5], ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nj\r\n");
}

/// Reads in a transaction are tracked when EXEC runs them, and CLIENT CACHING YES before
/// MULTI covers them (as rueidis caches).
async fn transaction(ends: Ends) -> Vec<String> {
    let (mut t, mut w) = resp3_clients(ends).await;
    let mut log = Vec::new();
    log.push(t.call(&["CLIENT", "TRACKING", "ON"]).await);
    log.push(t.call(&["MULTI"]).await);
    log.push(t.call(&["GET", "m"]).await);
    // Not read yet: nothing to hear of.
    assert_eq!(w.call(&["SET", "m", "2"]).await, "+OK\r\n");
    log.push(t.call(&["EXEC"]).await);
    assert_eq!(w.call(&["SET", "m", "3"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    log.push(t.call(&["CLIENT", "TRACKING", "ON", "OPTIN"]).await);
    let steps = [
        &["CLIENT", "CACHING", "YES"][..],
        &["MULTI"],
        &["PTTL", "o"],
        &["GET", "o"],
        &["EXEC"],
    ];
    let pipeline: Vec<u8> = steps
        .iter()
        .flat_map(|step| redmux::resp::encode_command(step.iter().map(|a| a.as_bytes())))
        .collect();
    for reply in t.pipeline(&pipeline, steps.len()).await {
        log.push(String::from_utf8_lossy(&reply).into_owned());
    }
    assert_eq!(w.call(&["SET", "o", "1"]).await, "+OK\r\n");
    log.push(t.reply_str().await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_a_transaction_are_tracked_when_exec_runs_them() {
    let log = same_as_redis(transaction).await;
    assert_eq!(log[4], ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nm\r\n");
    assert_eq!(log[11], ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\no\r\n");
}

/// A redirect client hears at once, even while the tracking client waits on a blocking
/// command: the tracking client's replies are another connection's business.
async fn redirect_while_blocked(ends: Ends) -> Vec<String> {
    let mut s = Raw::connect(ends.track).await;
    let mut t = Raw::connect(ends.track).await;
    let mut w = Raw::connect(ends.write).await;
    let id = id_of(&mut s).await;
    let mut log = Vec::new();
    log.push(s.call(&["SUBSCRIBE", "__redis__:invalidate"]).await);
    log.push(t.call(&["CLIENT", "TRACKING", "ON", "REDIRECT", &id]).await);
    log.push(t.call(&["GET", "k"]).await);
    t.send("*3\r\n$5\r\nBLPOP\r\n$1\r\nl\r\n$1\r\n0\r\n").await;
    // Blocked once Redis counts a blocked client.
    let deadline = support::Deadline::new();
    while !w
        .call(&["INFO", "clients"])
        .await
        .contains("blocked_clients:1\r")
    {
        deadline.next_try("the BLPOP blocked").await;
    }
    assert_eq!(w.call(&["SET", "k", "1"]).await, "+OK\r\n");
    log.push(s.reply_str().await);
    assert_eq!(w.call(&["RPUSH", "l", "x"]).await, ":1\r\n");
    log.push(t.reply_str().await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_client_hears_while_the_tracking_client_is_blocked() {
    let log = same_as_redis(redirect_while_blocked).await;
    assert_eq!(
        log[3],
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n"
    );
}

/// NOLOOP is accepted and shown, but a client through redmux may hear of its own writes:
/// redmux cannot tell its write from another's change to the same key, and skipping the
/// wrong one would leave a stale cache. A write that changed nothing never hides the next
/// change from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noloop_never_hides_another_clients_change() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    for bcast in [false, true] {
        let mut t = redmux.raw().await;
        let mut w = redmux.raw().await;
        assert_eq!(w.call(&["SET", "k", "v1"]).await, "+OK\r\n");
        assert!(t.call(&["HELLO", "3"]).await.starts_with('%'));
        let on: &[&str] = if bcast {
            &["CLIENT", "TRACKING", "ON", "BCAST", "NOLOOP"]
        } else {
            &["CLIENT", "TRACKING", "ON", "NOLOOP"]
        };
        assert_eq!(t.call(on).await, "+OK\r\n");
        assert!(t.call(&["CLIENT", "TRACKINGINFO"]).await.contains("noloop"));
        assert_eq!(t.call(&["GET", "k"]).await, "$2\r\nv1\r\n");
        // Writes that change nothing.
        assert_eq!(t.call(&["SET", "k", "x", "NX"]).await, "_\r\n");
        assert!(t.call(&["INCR", "k"]).await.starts_with("-ERR"));
        assert_eq!(w.call(&["SET", "k", "v2"]).await, "+OK\r\n");
        assert_eq!(
            t.reply_str().await,
            ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n",
            "bcast {bcast}"
        );
    }
}

/// A client logged in to Redis as its own ACL user is refused: Redis would check its ACL,
/// and redmux's stream sees every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_running_as_its_own_acl_user_is_refused() {
    let redis = RedisServer::start();
    let mut direct = redis.direct();
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", "lim", "on", ">pw", "~public:*", "+@all"])
        .query(&mut direct)
        .unwrap();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut t = redmux.raw().await;
    assert_eq!(t.call(&["AUTH", "lim", "pw"]).await, "+OK\r\n");
    assert_eq!(
        t.call(&["CLIENT", "TRACKING", "ON", "BCAST"]).await,
        "-ERR redmux: CLIENT TRACKING is not supported for clients logged in as their own \
         Redis user yet\r\n"
    );
    assert!(t
        .call(&["CLIENT", "TRACKINGINFO"])
        .await
        .contains("\r\noff\r\n"));
}

/// Invalid forms get Redis's errors, and the informational subcommands its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_info_are_redis_bytes() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let sequences: &[&[&[&str]]] = &[
        &[
            &["CLIENT", "TRACKING", "ON", "PREFIX", "a"],
            &["CLIENT", "TRACKING", "ON", "BCAST", "OPTIN"],
            &["CLIENT", "TRACKING", "ON", "OPTIN", "OPTOUT"],
            &["CLIENT", "TRACKING", "ON", "REDIRECT", "x"],
            &["CLIENT", "TRACKING", "ON", "REDIRECT", "0"],
            &["CLIENT", "TRACKING", "ON", "REDIRECT", "123456789"],
            &["CLIENT", "TRACKING", "ON", "REDIRECT"],
            &["CLIENT", "TRACKING", "MAYBE"],
            &["CLIENT", "TRACKING", "ON", "FOO"],
            &["CLIENT", "TRACKING"],
            &["CLIENT", "CACHING", "YES"],
            &["CLIENT", "CACHING"],
            &["CLIENT", "GETREDIR", "x"],
            &["CLIENT", "TRACKINGINFO", "x"],
            &["CLIENT", "TRACKING", "OFF"],
            &["CLIENT", "GETREDIR"],
            &["CLIENT", "TRACKINGINFO"],
        ],
        &[
            &["CLIENT", "TRACKING", "ON", "OPTIN"],
            &["CLIENT", "CACHING", "NO"],
            &["CLIENT", "CACHING", "MAYBE"],
            &["CLIENT", "TRACKING", "ON", "OPTOUT"],
            &["CLIENT", "TRACKING", "ON", "BCAST"],
            &["CLIENT", "TRACKING", "ON", "OPTIN", "NOLOOP"],
            &["CLIENT", "TRACKINGINFO"],
            &["CLIENT", "GETREDIR"],
        ],
        &[
            &["CLIENT", "TRACKING", "ON", "OPTOUT"],
            &["CLIENT", "CACHING", "YES"],
            &["CLIENT", "CACHING", "NO"],
            &["CLIENT", "TRACKINGINFO"],
        ],
        &[
            &[
                "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "ab", "PREFIX", "a",
            ],
            &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a"],
            &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "abc"],
            &[
                "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "b", "PREFIX", "c",
            ],
            &["CLIENT", "TRACKING", "ON"],
            &["CLIENT", "TRACKINGINFO"],
            &["HELLO", "3"],
            &["CLIENT", "TRACKINGINFO"],
        ],
        &[
            &["CLIENT", "TRACKING", "ON", "BCAST"],
            &["CLIENT", "TRACKINGINFO"],
            &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a"],
            &["CLIENT", "TRACKING", "ON", "BCAST"],
            &["CLIENT", "TRACKINGINFO"],
        ],
        &[
            &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "a"],
            &["CLIENT", "TRACKING", "ON", "BCAST"],
            &["CLIENT", "TRACKINGINFO"],
        ],
    ];
    for sequence in sequences {
        let mut replies = Vec::new();
        for addr in [redis.addr().parse().unwrap(), redmux.addr] {
            let mut raw = Raw::connect(addr).await;
            let mut got = Vec::new();
            for command in sequence.iter() {
                let reply = raw.call(command).await;
                // HELLO's map names the server's client id.
                if command[0] != "HELLO" {
                    got.push(reply);
                }
            }
            replies.push(got);
        }
        assert_eq!(
            replies[1], replies[0],
            "differs from Redis for {sequence:?}"
        );
    }
}

/// A client of `redmux` tracking in RESP3, in the default mode.
async fn tracking_client(redmux: &Redmux) -> Raw {
    let mut t = redmux.raw().await;
    assert!(t.call(&["HELLO", "3"]).await.starts_with('%'));
    assert_eq!(t.call(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n");
    t
}

/// redmux's invalidation stream is lost: every tracking client is told to flush everything,
/// again once the stream is back, and tracking goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stream_flushes_every_tracking_client() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut t = tracking_client(&redmux).await;
    let mut w = redmux.raw().await;
    assert_eq!(t.call(&["GET", "k"]).await, "_\r\n");
    // The stream is Redis's only client tracking in BCAST mode.
    let mut direct = Raw::connect(redis.addr().parse().unwrap()).await;
    let list = direct.call(&["CLIENT", "LIST"]).await;
    let stream: Vec<&str> = list
        .lines()
        .filter(|line| line.contains(" flags=tB "))
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next())
        .collect();
    assert_eq!(stream.len(), 1, "one stream connection in {list}");
    assert_eq!(
        direct.call(&["CLIENT", "KILL", "ID", stream[0]]).await,
        ":1\r\n"
    );
    let null = ">2\r\n$10\r\ninvalidate\r\n_\r\n";
    assert_eq!(t.reply_str().await, null, "lost");
    assert_eq!(t.reply_str().await, null, "back");
    assert_eq!(t.call(&["GET", "k2"]).await, "_\r\n");
    assert_eq!(w.call(&["SET", "k2", "1"]).await, "+OK\r\n");
    assert_eq!(
        t.reply_str().await,
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\nk2\r\n"
    );
}

/// `tracking_table_max_keys` bounds the table: a key evicted to make room is invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_table_evicts_with_an_invalidation() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.server.tracking_table_max_keys = 2;
    let redmux = Redmux::start_with(config).await;
    let mut t = tracking_client(&redmux).await;
    assert_eq!(t.call(&["MGET", "a", "b"]).await, "*2\r\n_\r\n_\r\n");
    t.send("*2\r\n$3\r\nGET\r\n$1\r\nc\r\n").await;
    let evicted = t.reply_str().await;
    let reply = t.reply_str().await;
    let (push, reply) = if evicted.starts_with('>') {
        (evicted, reply)
    } else {
        (reply, evicted)
    };
    assert_eq!(reply, "_\r\n");
    assert!(
        push == ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n"
            || push == ">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nb\r\n",
        "{push}"
    );
}

/// The embedded store cannot track: CLIENT TRACKING ON is refused in words that say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_refuses_tracking() {
    let redmux = Redmux::start_with(redmux::Config::default()).await;
    let mut t = redmux.raw().await;
    assert_eq!(
        t.call(&["CLIENT", "TRACKING", "ON"]).await,
        "-ERR redmux: CLIENT TRACKING needs a Redis upstream (the embedded store cannot track)\r\n"
    );
    assert!(t
        .call(&["CLIENT", "TRACKINGINFO"])
        .await
        .contains("\r\noff\r\n"));
}

/// A transaction that got no pinned connection reads nothing: its keys are not tracked, and a
/// change to them is not pushed (the first push the client hears is of a key it did read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_without_a_connection_tracks_nothing() {
    let redis = RedisServer::start();
    let wait = std::time::Duration::from_millis(200);
    let (redmux, mut holder) = support::pinned_pool_held(&redis.addr(), wait).await;
    let (mut t, mut w) = resp3_clients(Ends {
        track: redmux.addr,
        write: redis.addr().parse().unwrap(),
    })
    .await;
    assert_eq!(t.call(&["CLIENT", "TRACKING", "ON"]).await, "+OK\r\n");
    assert_eq!(t.call(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(t.call(&["GET", "unread"]).await, "+QUEUED\r\n");
    assert!(t.call(&["EXEC"]).await.starts_with("-EXECABORT"));
    assert_eq!(w.call(&["SET", "unread", "1"]).await, "+OK\r\n");
    assert_eq!(t.call(&["GET", "read"]).await, "_\r\n");
    assert_eq!(w.call(&["SET", "read", "1"]).await, "+OK\r\n");
    assert_eq!(
        t.reply_str().await,
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n$4\r\nread\r\n"
    );
    assert_eq!(holder.call(&["EXEC"]).await, "*0\r\n");
}
