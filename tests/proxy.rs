//! End-to-end behaviour through real clients against a real redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use redis::AsyncCommands;
use support::{RedisServer, Redmux};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_commands_through_the_redis_crate() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut con = redmux.client().await;

    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let _: () = con.set("greeting", "hello").await.unwrap();
    let got: String = con.get("greeting").await.unwrap();
    assert_eq!(got, "hello");
    let n: i64 = con.incr("counter", 5).await.unwrap();
    assert_eq!(n, 5);
    let missing: Option<String> = con.get("nope").await.unwrap();
    assert_eq!(missing, None);
    let binary: Vec<u8> = (0..=255).collect();
    let _: () = con.set("bin", &binary).await.unwrap();
    let back: Vec<u8> = con.get("bin").await.unwrap();
    assert_eq!(back, binary);
    let big = "x".repeat(3 * 1024 * 1024);
    let _: () = con.set("big", &big).await.unwrap();
    let back: String = con.get("big").await.unwrap();
    assert_eq!(back.len(), big.len());
    let _: () = con.rpush("list", &[1, 2, 3]).await.unwrap();
    let list: Vec<i64> = con.lrange("list", 0, -1).await.unwrap();
    assert_eq!(list, vec![1, 2, 3]);
    let err = con.incr::<_, _, i64>("greeting", 1).await.unwrap_err();
    assert!(err.to_string().contains("not an integer"), "{err}");
    // The data really is in Redis.
    let direct: String = redis::Commands::get(&mut redis.direct(), "greeting").unwrap();
    assert_eq!(direct, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mini_redis_client_through_redmux() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut client = mini_redis::client::connect(redmux.addr).await.unwrap();
    client.set("k", "v".into()).await.unwrap();
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(client.publish("chan", "m".into()).await.unwrap(), 0);
}

/// 128 clients, each writing and reading keys and values that carry its own id: every reply
/// must be the one for that client's own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_only_their_own_replies() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut tasks = Vec::new();
    for id in 0..128 {
        let url = redmux.url();
        tasks.push(tokio::spawn(async move {
            let mut con = support::connect(&url).await;
            for seq in 0..50 {
                let key = format!("client:{id}:{seq}");
                let value = format!("value:{id}:{seq}:{}", "v".repeat(seq * 7));
                let _: () = con.set(&key, &value).await.unwrap();
                let back: String = con.get(&key).await.unwrap();
                assert_eq!(back, value, "client {id} got someone else's reply");
                let n: i64 = con.incr(format!("count:{id}"), 1).await.unwrap();
                assert_eq!(n, seq as i64 + 1, "client {id} counter");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Redis saw one connection from redmux for all 128 clients (one per serving thread), plus
    // this direct one.
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(
        list.lines().count(),
        support::serving_threads() + 1,
        "{list}"
    );
}

/// `connections = 3`: three upstream connections, clients spread over them, each client's
/// replies still in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_upstream_connections() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.upstream.connections = 3;
    let redmux = Redmux::start_with(config).await;
    let mut clients = Vec::new();
    for id in 0..6 {
        let mut raw = redmux.raw().await;
        assert_eq!(
            raw.call(&["SET", &format!("k{id}"), &id.to_string()]).await,
            "+OK\r\n"
        );
        clients.push(raw);
    }
    for (id, raw) in clients.iter_mut().enumerate() {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend_from_slice(&redmux::resp::encode_command([
                &b"GET"[..],
                format!("k{id}").as_bytes(),
            ]));
        }
        let expected = format!("${}\r\n{id}\r\n", id.to_string().len()).into_bytes();
        assert!(raw
            .pipeline(&batch, 100)
            .await
            .iter()
            .all(|r| *r == expected));
    }
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.direct())
        .unwrap();
    assert_eq!(
        list.lines().count(),
        3 * support::serving_threads() + 1,
        "three from redmux per serving thread, one direct: {list}"
    );
}

/// One client writes 20,000 commands in a single write; the replies come back complete and in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipeline_in_one_write_keeps_order() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    const N: usize = 20_000;
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend_from_slice(&redmux::resp::encode_command([&b"INCR"[..], b"seq"]));
        if i % 1000 == 0 {
            let value = format!("marker-{i}");
            batch.extend_from_slice(&redmux::resp::encode_command([
                &b"SET"[..],
                format!("m{i}").as_bytes(),
                value.as_bytes(),
            ]));
            batch.extend_from_slice(&redmux::resp::encode_command([
                &b"GET"[..],
                format!("m{i}").as_bytes(),
            ]));
        }
    }
    let replies = raw.pipeline(&batch, N + 2 * (N / 1000)).await;
    let mut replies = replies.into_iter();
    for i in 0..N {
        assert_eq!(
            replies.next().unwrap(),
            format!(":{}\r\n", i + 1).into_bytes(),
            "reply {i}"
        );
        if i % 1000 == 0 {
            assert_eq!(replies.next().unwrap(), b"+OK\r\n");
            let value = format!("marker-{i}");
            assert_eq!(
                replies.next().unwrap(),
                format!("${}\r\n{value}\r\n", value.len()).into_bytes()
            );
        }
    }
    assert!(replies.next().is_none());
}

/// Past `max_pipeline` outstanding requests redmux stops reading the client; the pipeline still
/// completes, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_limit_applies_backpressure_without_losing_order() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.server.max_pipeline = 3;
    let redmux = Redmux::start_with(config).await;
    let mut raw = redmux.raw().await;
    let mut batch = Vec::new();
    for _ in 0..1000 {
        batch.extend_from_slice(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\nPING\r\n");
    }
    let replies = raw.pipeline(&batch, 2000).await;
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(pair[0], format!(":{}\r\n", i + 1).into_bytes());
        assert_eq!(pair[1], b"+PONG\r\n");
    }
    assert_eq!(replies.len(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_work_like_redis() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    raw.send("PING\r\n").await;
    assert_eq!(raw.reply_str().await, "+PONG\r\n");
    raw.send("SET \"key one\" 'it\\'s'\r\n\r\n   \nGET \"key one\"\n")
        .await;
    assert_eq!(raw.reply_str().await, "+OK\r\n");
    assert_eq!(raw.reply_str().await, "$4\r\nit's\r\n");
    // Mixed with multibulk in one write, and blank lines ignored as Redis does.
    raw.send("*1\r\n$4\r\nPING\r\nECHO hi\r\n\r\n*0\r\n*-1\r\nPING\r\n")
        .await;
    assert_eq!(raw.reply_str().await, "+PONG\r\n");
    assert_eq!(raw.reply_str().await, "$2\r\nhi\r\n");
    assert_eq!(raw.reply_str().await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_answers_ok_then_closes_and_ignores_the_rest() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    raw.send("INCR q\r\nQUIT\r\nINCR q\r\n").await;
    assert_eq!(raw.reply_str().await, ":1\r\n");
    assert_eq!(raw.reply_str().await, "+OK\r\n");
    raw.expect_closed().await;
    let value: i64 = redis::Commands::get(&mut redis.direct(), "q").unwrap();
    assert_eq!(value, 1, "the command after QUIT never ran");
}

/// Commands not implemented yet are refused with an error naming them, and never reach Redis:
/// Redis's own command statistics show none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_commands_are_refused_and_never_forwarded() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut a = redmux.raw().await;
    // (request, the name the error gives)
    let refused: &[(&[&str], &str)] = &[
        (&["READONLY"], "READONLY"),
        (&["SHUTDOWN"], "SHUTDOWN"),
        (&["REPLICAOF", "NO", "ONE"], "REPLICAOF"),
        (&["REPLCONF", "ACK", "0"], "REPLCONF"),
        (&["SCRIPT", "DEBUG", "YES"], "SCRIPT DEBUG"),
    ];
    for (args, name) in refused {
        let reply = a.call(args).await;
        assert_eq!(
            reply,
            format!("-ERR redmux: {name} is not supported yet\r\n")
        );
    }
    let mut direct = redis.direct();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut direct)
        .unwrap();
    for (args, _) in refused {
        let stat = format!("cmdstat_{}:", args[0].to_ascii_lowercase());
        assert!(
            !stats.contains(&stat),
            "{} reached Redis:\n{stats}",
            args[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_dropped_silently() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    raw.send("POST / HTTP/1.1\r\nHost: example\r\n\r\n").await;
    raw.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_refuses_with_the_redis_error() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.server.max_clients = 2;
    let redmux = Redmux::start_with(config).await;
    let mut first = redmux.raw().await;
    let mut second = redmux.raw().await;
    assert_eq!(first.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(second.call(&["PING"]).await, "+PONG\r\n");
    let mut third = redmux.raw().await;
    assert_eq!(
        third.reply_str().await,
        "-ERR max number of clients reached\r\n"
    );
    third.expect_closed().await;
    // A slot frees up when a client leaves.
    drop(first);
    let deadline = support::Deadline::new();
    loop {
        let mut next = redmux.raw().await;
        next.send("PING\r\n").await;
        if next.reply_str().await == "+PONG\r\n" {
            break;
        }
        deadline.next_try("slot never freed").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_with_requests_in_flight_does_not_disturb_others() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut other = redmux.client().await;
    for round in 0..20 {
        let mut leaver = redmux.raw().await;
        let mut batch = Vec::new();
        for _ in 0..500 {
            batch.extend_from_slice(b"*2\r\n$4\r\nINCR\r\n$6\r\nleaver\r\n");
        }
        leaver.send(&batch).await;
        drop(leaver);
        let key = format!("other:{round}");
        let _: () = other.set(&key, round).await.unwrap();
        let back: i64 = other.get(&key).await.unwrap();
        assert_eq!(back, round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_when_configured() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.server.client_idle_timeout = std::time::Duration::from_millis(300);
    let redmux = Redmux::start_with(config).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
    let started = std::time::Instant::now();
    raw.expect_closed().await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));

    // A client slowly reading a large reply is busy, not idle: it gets the whole reply.
    let big = "b".repeat(4 * 1024 * 1024);
    let _: () = redis::Commands::set(&mut redis.direct(), "big", &big).unwrap();
    let mut stream = tokio::net::TcpStream::connect(redmux.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET big\r\n")
        .await
        .unwrap();
    let mut received = 0;
    let mut chunk = vec![0u8; 128 * 1024];
    loop {
        // A deliberately slow reader: the pause models the client, it synchronises nothing.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        match tokio::io::AsyncReadExt::read(&mut stream, &mut chunk)
            .await
            .unwrap()
        {
            0 => break,
            n => received += n,
        }
        if received == big.len() + "$4194304\r\n\r\n".len() {
            break;
        }
    }
    assert_eq!(
        received,
        big.len() + "$4194304\r\n\r\n".len(),
        "the reply was cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redmux.sock");
    let mut config = support::config(&redis.addr());
    config.server.unix_socket = Some(path.clone());
    config.server.unix_socket_mode = 0o600;
    let redmux = Redmux::start_with(config).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"PING\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 7];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    redmux.stop().await;
    assert!(!path.exists(), "socket file removed at exit");
}

/// Every event inotify has for the entries of the watched directory: name and flags, in order.
fn directory_events(
    inotify: &std::os::fd::OwnedFd,
) -> Vec<(String, rustix::fs::inotify::ReadFlags)> {
    let mut buffer = [std::mem::MaybeUninit::uninit(); 4096];
    let mut reader = rustix::fs::inotify::Reader::new(inotify, &mut buffer);
    let mut events = Vec::new();
    loop {
        match reader.next() {
            Ok(event) => {
                let name = event.file_name().map(|n| n.to_string_lossy().into_owned());
                events.push((name.unwrap_or_default(), event.events()));
            }
            Err(rustix::io::Errno::AGAIN) => return events,
            Err(error) => panic!("reading inotify events: {error}"),
        }
    }
}

/// The unix socket is at its path with its configured mode from the moment it appears there,
/// never with the umask's (which would let others connect until a chmod). inotify on the
/// directory shows it: the socket's name appears (created or moved in) and its attributes are
/// never changed afterwards, as a chmod after bind(2) would. Both for a new socket and for a
/// stale one (nobody answers on it) that is replaced. A live socket, or a file that is not a
/// socket, is left alone and the bind fails. Nothing else is left in the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_never_appears_with_other_permissions() {
    use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redmux.sock");
    let mut config = support::config("embedded");
    config.server.unix_socket = Some(path.clone());
    config.server.unix_socket_mode = 0o600;
    for stale in [false, true] {
        if stale {
            // Bound, then closed: the file stays, and nobody answers on it.
            drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
            assert!(std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket());
        }
        let watch = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).unwrap();
        let changes = WatchFlags::CREATE
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::DELETE
            | WatchFlags::ATTRIB;
        inotify::add_watch(&watch, dir.path(), changes).unwrap();
        let redmux = Redmux::start_with(config.clone()).await;
        let events: Vec<ReadFlags> = directory_events(&watch)
            .into_iter()
            .filter(|(name, _)| name == "redmux.sock")
            .map(|(_, flags)| flags)
            .collect();
        let appeared = events
            .iter()
            .position(|flags| flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO))
            .unwrap_or_else(|| panic!("stale {stale}: the socket never appeared: {events:?}"));
        assert!(
            !events[appeared..]
                .iter()
                .any(|flags| flags.contains(ReadFlags::ATTRIB)),
            "stale {stale}: the socket's mode changed after it appeared: {events:?}"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "stale {stale}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["redmux.sock"], "stale {stale}");
        let mut raw = support::Raw::over(tokio::net::UnixStream::connect(&path).await.unwrap());
        assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
        // A second redmux on the same path while the first answers: refused, socket kept.
        let error = redmux::Server::bind(config.clone()).await.err();
        let error = error.expect("a second bind on a live socket").to_string();
        assert!(
            error.starts_with(&format!("cannot listen on {}", path.display())),
            "{error}"
        );
        assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
        redmux.stop().await;
        assert!(!path.exists(), "socket file removed at exit");
    }
    // A file that is not a socket is not replaced.
    std::fs::write(&path, "not a socket").unwrap();
    let error = redmux::Server::bind(config.clone()).await.err();
    assert!(error.is_some(), "bound over a regular file");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_upstream_for_a_first_try() {
    let redmux = Redmux::start("embedded").await;
    let mut con = redmux.client().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let _: () = con.set("k", "v").await.unwrap();
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("v")
        .arg("EX")
        .arg(100)
        .query_async(&mut con)
        .await
        .unwrap();
    let mut raw = redmux.raw().await;
    // What mini-redis would choke on is answered by redmux, and the shared connection survives.
    assert_eq!(
        raw.call(&["SET", "k", "v", "NX"]).await,
        "-ERR redmux: the embedded upstream does not support SET NX\r\n"
    );
    assert_eq!(
        raw.call(&["GET"]).await,
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        raw.call(&["INCR", "k"]).await,
        "-ERR unknown command 'incr'\r\n"
    );
    let v: String = con.get("k").await.unwrap();
    assert_eq!(v, "v");
    let mut mini = mini_redis::client::connect(redmux.addr).await.unwrap();
    assert_eq!(mini.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

/// A client that pipelines GETs of a large value and does not read its replies is closed once
/// `client_output_limit` bytes wait for it, instead of making redmux buffer without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_not_reading_replies_is_cut_off_at_the_output_limit() {
    let redis = RedisServer::start();
    let value = "v".repeat(100 * 1000);
    let _: () = redis::Commands::set(&mut redis.direct(), "big", &value).unwrap();
    let mut config = support::config(&redis.addr());
    config.server.client_output_limit = 2 * 1024 * 1024;
    let redmux = Redmux::start_with(config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(redmux.addr).await.unwrap();
    let requests = "GET big\r\n".repeat(1000);
    tokio::io::AsyncWriteExt::write_all(&mut stream, requests.as_bytes())
        .await
        .unwrap();
    // The client under test does not read for a while: that is the behaviour being tested.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut received = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(
            support::READY_TIMEOUT,
            tokio::io::AsyncReadExt::read(&mut stream, &mut chunk),
        )
        .await
        .expect("redmux closes the connection");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    let full = 1000 * (value.len() + "$100000\r\n\r\n".len());
    assert!(received < full / 4, "received {received} of {full} bytes");
    // Everyone else carries on.
    let mut other = redmux.raw().await;
    assert_eq!(other.call(&["PING"]).await, "+PONG\r\n");
}
