//! Malformed input: redmux must answer exactly as Redis 7 does, byte for byte, then close; and
//! nobody else may notice. Each case is sent to a real redis-server too, and the answers compared.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::net::SocketAddr;

use support::{Raw, RedisServer, Redmux};

/// Everything a server says in answer to `input` until it closes the connection.
async fn transcript(addr: SocketAddr, input: &[u8], name: &str) -> Vec<String> {
    let mut raw = Raw::connect(addr).await;
    raw.send(input).await;
    let mut replies = Vec::new();
    while let Some(reply) = tokio::time::timeout(support::READY_TIMEOUT, raw.try_reply())
        .await
        .unwrap_or_else(|_| panic!("{name}: {addr} should answer and close"))
    {
        replies.push(String::from_utf8_lossy(&reply).into_owned());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_match_redis_byte_for_byte() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let redis_addr: SocketAddr = redis.addr().parse().unwrap();
    let mut too_big_inline = vec![b'a'; 65_537];
    too_big_inline[0] = b'G';
    let mut too_big_count = b"*".to_vec();
    too_big_count.extend(std::iter::repeat_n(b'1', 65_536));
    let mut too_big_bulk_count = b"*1\r\n$".to_vec();
    too_big_bulk_count.extend(std::iter::repeat_n(b'1', 65_536));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage count", b"*abc\r\n".to_vec()),
        ("empty count", b"*\r\n".to_vec()),
        ("plus count", b"*+1\r\n".to_vec()),
        ("count over INT_MAX", b"*2147483648\r\n".to_vec()),
        ("overflowing count", b"*99999999999999999999\r\n".to_vec()),
        ("negative bulk", b"*1\r\n$-1\r\n".to_vec()),
        ("non-numeric bulk", b"*1\r\n$abc\r\n".to_vec()),
        ("leading zero bulk", b"*1\r\n$04\r\nPING\r\n".to_vec()),
        (
            "overflowing bulk",
            b"*1\r\n$99999999999999999999\r\n".to_vec(),
        ),
        (
            "bulk over proto-max-bulk-len",
            b"*1\r\n$536870913\r\n".to_vec(),
        ),
        (
            "integer inside request",
            b"*2\r\n$3\r\nGET\r\n:1\r\n".to_vec(),
        ),
        ("array inside request", b"*1\r\n*1\r\n".to_vec()),
        ("simple string inside request", b"*1\r\n+PING\r\n".to_vec()),
        ("unbalanced quotes", b"SET \"a b\"c\r\n".to_vec()),
        ("unterminated quote", b"GET 'abc\r\n".to_vec()),
        (
            "replies before the error are kept",
            b"PING\r\nECHO x\r\n*1\r\n$-5\r\nPING\r\n".to_vec(),
        ),
        ("too big inline request", too_big_inline),
        ("too big mbulk count string", too_big_count),
        ("too big bulk count string", too_big_bulk_count),
    ];
    let mut bystander = redmux.raw().await;
    for (name, input) in cases {
        let expected = transcript(redis_addr, &input, name).await;
        let got = transcript(redmux.addr, &input, name).await;
        assert!(
            expected
                .last()
                .is_some_and(|r| r.starts_with("-ERR Protocol error")),
            "{name}: the case should be a protocol error in Redis: {expected:?}"
        );
        assert_eq!(got, expected, "{name}");
        // Other clients carry on.
        assert_eq!(
            bystander.call(&["ECHO", name]).await,
            format!("${}\r\n{name}\r\n", name.len())
        );
    }
}

/// Input Redis tolerates is tolerated the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tolerated_input_matches_redis() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let redis_addr: SocketAddr = redis.addr().parse().unwrap();
    let cases: Vec<(&str, &[u8])> = vec![
        ("sloppy separators", b"*1\rX$4\rYPING\r\n"),
        ("sloppy bulk trailer", b"*2\r\n$4\r\nECHOxx$2\r\nhiyy"),
        ("empty and negative counts", b"*0\r\n*-1\r\n*-7\r\nPING\r\n"),
        ("blank inline lines", b"\r\n\n   \r\nPING\r\n"),
        ("empty argument", b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n"),
        ("unknown command", b"*2\r\n$3\r\nFOO\r\n$1\r\na\r\n"),
        ("empty command name", b"*1\r\n$0\r\n\r\n"),
        ("inline escapes", b"ECHO \"\\x41\\n\\t\" 'a\\'b'\r\n"),
    ];
    for (name, input) in cases {
        let mut input = input.to_vec();
        input.extend_from_slice(b"QUIT\r\n");
        let expected = transcript(redis_addr, &input, name).await;
        let got = transcript(redmux.addr, &input, name).await;
        assert_eq!(got, expected, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_give_the_redis_errors() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.server.max_bulk_len = 1024 * 1024;
    config.server.max_multibulk_len = 4;
    let redmux = Redmux::start_with(config).await;
    let mut raw = redmux.raw().await;
    raw.send("*5\r\n").await;
    assert_eq!(
        raw.reply_str().await,
        "-ERR Protocol error: invalid multibulk length\r\n"
    );
    raw.expect_closed().await;
    let mut raw = redmux.raw().await;
    raw.send("*2\r\n$3\r\nGET\r\n$1048577\r\n").await;
    assert_eq!(
        raw.reply_str().await,
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    raw.expect_closed().await;
    let mut raw = redmux.raw().await;
    let value = "v".repeat(1024 * 1024);
    assert_eq!(raw.call(&["SET", "k", &value]).await, "+OK\r\n");
}

/// redmux's default `max_multibulk_len` (1048576) is far below Redis's limit (INT_MAX,
/// `src/networking.c`): a header above it is refused at once, where Redis waits for the
/// arguments and runs the command. At the limit redmux answers as Redis does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_multibulk_limit_is_below_redis() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let echo = |count: usize| {
        let mut request = format!("*{count}\r\n$4\r\nECHO\r\n").into_bytes();
        for _ in 1..count {
            request.extend_from_slice(b"$1\r\na\r\n");
        }
        request
    };
    let arity = "-ERR wrong number of arguments for 'echo' command\r\n";
    let mut direct = Raw::connect(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    direct.send(echo(1_048_577)).await;
    assert_eq!(direct.reply_str().await, arity, "Redis takes it");
    let mut raw = redmux.raw().await;
    raw.send("*1048577\r\n").await;
    assert_eq!(
        raw.reply_str().await,
        "-ERR Protocol error: invalid multibulk length\r\n"
    );
    raw.expect_closed().await;
    let mut raw = redmux.raw().await;
    raw.send(echo(1_048_576)).await;
    assert_eq!(raw.reply_str().await, arity);
}

/// A request written one byte per write is reassembled; deep nesting, a client that leaves mid
/// frame, and a NUL in an inline line neither crash nor disturb anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_and_hostile_input() {
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let mut slow = redmux.raw().await;
    for byte in b"*3\r\n$3\r\nSET\r\n$5\r\nslow!\r\n$5\r\nvalue\r\nGET slow!\r\n" {
        slow.send([*byte]).await;
    }
    assert_eq!(slow.reply_str().await, "+OK\r\n");
    assert_eq!(slow.reply_str().await, "$5\r\nvalue\r\n");

    let mut nested = redmux.raw().await;
    nested.send(b"*1\r\n".repeat(100_000)).await;
    assert_eq!(
        nested.reply_str().await,
        "-ERR Protocol error: expected '$', got '*'\r\n"
    );
    nested.expect_closed().await;

    let mut half = redmux.raw().await;
    half.send("*2\r\n$3\r\nGET\r\n$10\r\nab").await;
    drop(half);

    let mut bystander = redmux.raw().await;
    assert_eq!(bystander.call(&["PING"]).await, "+PONG\r\n");
}

/// Writes `prefix`, then `filler` bytes in 512-byte writes (a line that never ends), for at
/// most 8 MiB or until the server closes; returns what the server said before closing.
async fn grow_line(addr: SocketAddr, prefix: &'static [u8], filler: u8) -> Vec<String> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let chunk = vec![filler; 512];
        let mut sent = writer.write_all(prefix).await.map(|()| prefix.len());
        while let Ok(n) = sent {
            if n >= 8 * 1024 * 1024 {
                break;
            }
            sent = writer.write_all(&chunk).await.map(|()| n + chunk.len());
        }
    });
    let mut received = Vec::new();
    tokio::time::timeout(
        support::READY_TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut received),
    )
    .await
    .expect("the server closes the connection")
    .ok();
    writing.await.unwrap();
    String::from_utf8_lossy(&received)
        .split_inclusive("\r\n")
        .map(str::to_owned)
        .collect()
}

/// A line with no end, growing past 64 KiB in many small writes, gets the same error as from
/// Redis and a close; with 20 such clients at once redmux's memory grows by a few MB at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_lines_in_small_writes() {
    let redis = RedisServer::start();
    let redmux = support::binary::RedmuxProcess::start(
        "",
        &format!("[upstream]\naddress = \"{}\"\n", redis.addr()),
    );
    let redis_addr: SocketAddr = redis.addr().parse().unwrap();
    let cases: [(&str, &'static [u8], u8); 3] = [
        ("too big inline request", b"GET ", b'a'),
        ("too big mbulk count string", b"*", b'1'),
        ("too big bulk count string", b"*1\r\n$", b'1'),
    ];
    let mut bystander = Raw::connect(redmux.addr).await;
    assert_eq!(bystander.call(&["PING"]).await, "+PONG\r\n");
    let before = redmux.rss_kib();
    for (error, prefix, filler) in cases {
        let expected = grow_line(redis_addr, prefix, filler).await;
        assert_eq!(
            expected,
            vec![format!("-ERR Protocol error: {error}\r\n")],
            "Redis"
        );
        let clients: Vec<_> = (0..20)
            .map(|_| tokio::spawn(grow_line(redmux.addr, prefix, filler)))
            .collect();
        for client in clients {
            assert_eq!(client.await.unwrap(), expected, "{error}");
        }
        assert_eq!(
            bystander.call(&["ECHO", error]).await.len(),
            error.len() + 7
        );
    }
    let peak = redmux.peak_rss_kib();
    println!(
        "endless lines: redmux rss {before} KiB before, peak {peak} KiB (+{} KiB)",
        peak - before
    );
    assert!(peak - before < 4 * 1024, "{before} KiB -> {peak} KiB");
}
