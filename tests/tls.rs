//! TLS both ways, against real redis-server processes, with certificates made for each test.
//! Clients on `[server.tls]`: redis-cli --tls, a rustls client, a plain client on the TLS port,
//! client certificates, the handshake timeout and max_clients. `rediss://` upstreams: shared,
//! pinned, pub/sub and MONITOR connections, a client certificate, a wrong server name,
//! insecure_skip_verify, the system's CAs. And what the configuration refuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::{Duration, Instant};

use redis::Commands;
use redmux::{
    config::{Config, Overrides},
    resp::encode_command,
};
use support::{
    binary::RedmuxProcess,
    tls::{self, Certs},
    Deadline, Raw, RedisServer, Redmux, READY_TIMEOUT,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

/// redmux in front of `redis`, with `[server.tls]` made of `certs`.
async fn redmux_tls(redis: &RedisServer, certs: &Certs, require_client_cert: bool) -> Redmux {
    let mut config = support::config(&redis.addr());
    config.server.tls = Some(certs.server_tls(require_client_cert));
    Redmux::start_with(config).await
}

/// A rustls client on redmux's TLS port.
async fn tls_raw(redmux: &Redmux, certs: &Certs) -> Raw {
    let addr = redmux.tls_addr.expect("a TLS listener");
    Raw::over(
        tls::connect(addr, &certs.client(false))
            .await
            .expect("TLS handshake"),
    )
}

/// A rustls client stream on redmux's TLS port that has sent `request`.
async fn tls_send(redmux: &Redmux, certs: &Certs, request: &[u8]) -> TlsStream<TcpStream> {
    let addr = redmux.tls_addr.expect("a TLS listener");
    let mut stream = tls::connect(addr, &certs.client(false))
        .await
        .expect("TLS handshake");
    stream.write_all(request).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

/// redis-cli with `args`, its trimmed output.
async fn redis_cli(args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .args(args)
        .output()
        .await
        .expect("redis-cli must be installed (apt-get install redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text + String::from_utf8_lossy(&out.stderr).trim()
}

#[tokio::test]
async fn redis_cli_speaks_tls_to_redmux() {
    let redis = RedisServer::start();
    let certs = Certs::new();
    let redmux = redmux_tls(&redis, &certs, false).await;
    let port = redmux.tls_addr.expect("TLS listener").port().to_string();
    let ca = certs.ca.display().to_string();
    let tls = ["--tls", "--cacert", &ca, "-h", "127.0.0.1", "-p", &port];
    let set = [&tls[..], &["SET", "tls:k", "v"]].concat();
    assert_eq!(redis_cli(&set).await, "OK");
    let get = [&tls[..], &["GET", "tls:k"]].concat();
    assert_eq!(redis_cli(&get).await, "v");
    let held: String = redis.direct().get("tls:k").unwrap();
    assert_eq!(held, "v");
    // The plain listener goes on as before.
    let mut plain = redmux.raw().await;
    assert_eq!(plain.call(&["GET", "tls:k"]).await, "$1\r\nv\r\n");
}

#[tokio::test]
async fn rust_client_pipelines_and_moves_large_values_over_tls() {
    let redis = RedisServer::start();
    let certs = Certs::new();
    let redmux = redmux_tls(&redis, &certs, false).await;
    let mut raw = tls_raw(&redmux, &certs).await;
    assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
    // Larger than the socket buffers: records are held back and sent as the client reads.
    let big = "x".repeat(4 << 20);
    assert_eq!(raw.call(&["SET", "big", &big]).await, "+OK\r\n");
    let reply = raw.call(&["GET", "big"]).await;
    assert_eq!(reply, format!("${}\r\n{big}\r\n", big.len()));
    // Read slowly, so the socket stays full and redmux's last write of the reply cannot send
    // all of its records at once: they must still arrive.
    let mut slow = tls_send(&redmux, &certs, b"GET big\r\n").await;
    let expected = format!("${}\r\n{big}\r\n", big.len()).len();
    let mut got = 0;
    let mut chunk = vec![0; 16 * 1024];
    tokio::time::timeout(READY_TIMEOUT, async {
        while got < expected {
            let n = slow.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed after {got} bytes");
            got += n;
            tokio::time::sleep(Duration::from_millis(1)).await; // pacing, not synchronisation
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {got} of {expected} bytes arrived"));
    let mut pipeline = Vec::new();
    for _ in 0..2000 {
        pipeline.extend_from_slice(&encode_command([&b"INCR"[..], b"n"]));
    }
    let replies = raw.pipeline(&pipeline, 2000).await;
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply, format!(":{}\r\n", i + 1).as_bytes());
    }
    assert_eq!(replies.len(), 2000);
    // QUIT: the reply, then a clean TLS end (close_notify), not a truncated stream.
    let mut stream = tls_send(&redmux, &certs, b"QUIT\r\n").await;
    let mut got = Vec::new();
    tokio::time::timeout(READY_TIMEOUT, stream.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("a clean end of the TLS stream");
    assert_eq!(got, b"+OK\r\n");
    // A client that closes its side without close_notify still gets the replies it is owed,
    // as a plain client that closes does.
    let mut stream = tls_send(&redmux, &certs, b"INCR n\r\nGET n\r\n").await;
    stream.get_mut().0.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(READY_TIMEOUT, stream.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("a clean end of the TLS stream");
    assert_eq!(got, b":2001\r\n$4\r\n2001\r\n");
}

#[tokio::test]
async fn plain_client_on_the_tls_port_fails_and_others_carry_on() {
    let redis = RedisServer::start();
    let certs = Certs::new();
    let redmux = redmux_tls(&redis, &certs, false).await;
    let mut before = tls_raw(&redmux, &certs).await;
    assert_eq!(before.call(&["SET", "k", "1"]).await, "+OK\r\n");
    let mut plain = TcpStream::connect(redmux.tls_addr.unwrap()).await.unwrap();
    plain.write_all(b"PING\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(READY_TIMEOUT, plain.read_to_end(&mut got))
        .await
        .expect("the plain client is closed");
    assert!(!String::from_utf8_lossy(&got).contains("PONG"), "{got:?}");
    assert_eq!(before.call(&["GET", "k"]).await, "$1\r\n1\r\n");
    let mut after = tls_raw(&redmux, &certs).await;
    assert_eq!(after.call(&["GET", "k"]).await, "$1\r\n1\r\n");
}

#[tokio::test]
async fn client_certificates_are_required_with_ca_file() {
    let redis = RedisServer::start();
    let certs = Certs::new();
    let redmux = redmux_tls(&redis, &certs, true).await;
    let addr = redmux.tls_addr.unwrap();
    // Without a certificate. In TLS 1.3 the client finishes its handshake before the server
    // has checked, so the refusal may show only on the first read.
    if let Ok(stream) = tls::connect(addr, &certs.client(false)).await {
        let mut raw = Raw::over(stream);
        let _ = raw.try_send(b"PING\r\n").await;
        let reply = tokio::time::timeout(READY_TIMEOUT, raw.try_reply())
            .await
            .expect("refused in time");
        assert_eq!(reply, None, "a client without a certificate was served");
    }
    let mut raw = Raw::over(
        tls::connect(addr, &certs.client(true))
            .await
            .expect("TLS handshake with a client certificate"),
    );
    assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
    // redis-cli too, with --cert and --key.
    let (ca, cert, key) = (
        certs.ca.display().to_string(),
        certs.client_cert.display().to_string(),
        certs.client_key.display().to_string(),
    );
    let port = addr.port().to_string();
    let with_cert = [
        "--tls", "--cacert", &ca, "--cert", &cert, "--key", &key, "-p", &port, "PING",
    ];
    assert_eq!(redis_cli(&with_cert).await, "PONG");
    let without = ["--tls", "--cacert", &ca, "-p", &port, "PING"];
    assert_ne!(redis_cli(&without).await, "PONG");
}

/// A client that connects and never starts its handshake takes a client slot but never holds
/// up the accept loop, and is closed after the handshake timeout. A client past max_clients is
/// told so over TLS.
#[tokio::test]
async fn silent_handshakes_neither_block_accepts_nor_last() {
    let redis = RedisServer::start();
    let certs = Certs::new();
    let mut config = support::config(&redis.addr());
    config.server.tls = Some(certs.server_tls(false));
    config.server.max_clients = 2;
    let redmux = Redmux::start_with(config).await;
    let addr = redmux.tls_addr.unwrap();
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut served = tls_raw(&redmux, &certs).await;
    assert_eq!(served.call(&["PING"]).await, "+PONG\r\n");
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut refused = tls_raw(&redmux, &certs).await;
    assert_eq!(
        refused.reply_str().await,
        "-ERR max number of clients reached\r\n"
    );
    refused.expect_closed().await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        redmux::server::tls::HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        silent.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the silent client was never closed");
    let lasted = started.elapsed();
    assert!(
        lasted >= redmux::server::tls::HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "closed after {lasted:?}"
    );
    // Its slot is free again.
    let mut next = tls_raw(&redmux, &certs).await;
    assert_eq!(next.call(&["PING"]).await, "+PONG\r\n");
}

/// Clients past max_clients are not counted, so those that never finish their handshake must
/// not pile up for the handshake timeout each: past a few being told, the rest are closed at
/// once, and redmux's sockets stay bounded.
#[tokio::test]
async fn silent_clients_past_max_clients_do_not_pile_up() {
    const SILENT: usize = 300;
    let redis = RedisServer::start();
    let certs = Certs::new();
    let mut config = support::config(&redis.addr());
    config.server.tls = Some(certs.server_tls(false));
    config.server.max_clients = 1;
    let redmux = Redmux::start_with(config).await;
    let mut served = tls_raw(&redmux, &certs).await;
    assert_eq!(served.call(&["PING"]).await, "+PONG\r\n");
    let addr = redmux.tls_addr.unwrap();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Well within the handshake timeout.
    let closed = futures_util::future::join_all(silent.iter_mut().map(|stream| async move {
        let mut byte = [0; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(3), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }))
    .await;
    let closed = closed.iter().filter(|closed| **closed).count();
    assert!(
        closed >= SILENT - redmux::server::MAX_TLS_REFUSALS,
        "only {closed} of {SILENT} silent clients past max_clients were closed at once"
    );
    assert_eq!(served.call(&["PING"]).await, "+PONG\r\n");
}

// === rediss:// upstreams ===

/// redmux (plain for its clients) in front of a TLS-only redis-server.
async fn redmux_rediss(redis: &RedisServer, certs: &Certs, client_cert: bool) -> Redmux {
    let mut config = support::config(&format!("rediss://127.0.0.1:{}", redis.port));
    config.upstream.tls = Some(certs.upstream_tls(client_cert));
    Redmux::start_with(config).await
}

#[tokio::test]
async fn rediss_upstream_carries_shared_pinned_pubsub_and_monitor_connections() {
    let certs = Certs::new();
    let redis = RedisServer::start_tls(&certs, false);
    let redmux = redmux_rediss(&redis, &certs, false).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    let big = "y".repeat(4 << 20);
    assert_eq!(raw.call(&["SET", "big", &big]).await, "+OK\r\n");
    let reply = raw.call(&["GET", "big"]).await;
    assert_eq!(reply, format!("${}\r\n{big}\r\n", big.len()));
    // A transaction, pipelined: a pinned connection.
    let mut tx = Vec::new();
    for args in [&["MULTI"][..], &["INCR", "n"], &["INCR", "n"], &["EXEC"]] {
        tx.extend_from_slice(&encode_command(args.iter().map(|a| a.as_bytes())));
    }
    let replies = raw.pipeline(&tx, 4).await;
    let replies: Vec<String> = replies
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(
        replies,
        [
            "+OK\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "*2\r\n:1\r\n:2\r\n"
        ]
    );
    // A blocking command: pinned too.
    assert_eq!(raw.call(&["BLPOP", "nothing", "0.05"]).await, "*-1\r\n");
    // Pub/sub through the shared subscriber connection.
    let mut subscriber = redmux.raw().await;
    assert_eq!(
        subscriber.call(&["SUBSCRIBE", "news"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(raw.call(&["PUBLISH", "news", "hello"]).await, ":1\r\n");
    assert_eq!(
        subscriber.reply_str().await,
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    // MONITOR on a connection of its own.
    let mut monitor = redmux.raw().await;
    assert_eq!(monitor.call(&["MONITOR"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["GET", "watched"]).await, "$-1\r\n");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let line = monitor.reply_str().await;
        if line.contains("\"GET\" \"watched\"") {
            break;
        }
        assert!(Instant::now() < deadline, "MONITOR never showed the GET");
    }
}

#[tokio::test]
async fn rediss_upstream_with_a_client_certificate() {
    let certs = Certs::new();
    let redis = RedisServer::start_tls(&certs, true);
    let redmux = redmux_rediss(&redis, &certs, true).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    // The same Redis refuses redmux without its certificate.
    let without = redmux_rediss(&redis, &certs, false).await;
    let mut raw = without.raw().await;
    let started = Instant::now();
    assert_eq!(
        raw.call(&["GET", "k"]).await,
        "-ERR redmux: upstream unavailable\r\n"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The binary, for its logs: `rest` holds the `[upstream]` sections.
fn redmux_process(rest: &str, env: &[(&str, &str)]) -> RedmuxProcess {
    RedmuxProcess::start_env("", rest, env)
}

/// `[upstream]` for `redis` (TLS) with `[upstream.tls]` trusting the test CA, plus `tls_keys`.
fn rediss_sections(redis: &RedisServer, certs: &Certs, tls_keys: &str) -> String {
    format!(
        "[upstream]\naddress = \"rediss://127.0.0.1:{}\"\nconnect_timeout = \"500ms\"\n\
         [upstream.tls]\nca_file = \"{}\"\n{tls_keys}\n",
        redis.port,
        certs.ca.display()
    )
}

#[tokio::test]
async fn wrong_server_name_is_logged_and_insecure_skip_verify_accepts_it() {
    let certs = Certs::new();
    let redis = RedisServer::start_tls(&certs, false);
    let upstream = |extra: &str| {
        rediss_sections(
            &redis,
            &certs,
            &format!("server_name = \"wrong.example\"\n{extra}"),
        )
    };
    let wrong = redmux_process(&upstream(""), &[]);
    let mut raw = wrong.raw().await;
    let started = Instant::now();
    assert_eq!(
        raw.call(&["GET", "k"]).await,
        "-ERR redmux: upstream unavailable\r\n"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let log = wrong.stderr();
    assert!(
        log.contains("TLS handshake failed") && log.contains("wrong.example"),
        "{log}"
    );
    let insecure = redmux_process(&upstream("insecure_skip_verify = true"), &[]);
    let mut raw = insecure.raw().await;
    assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    let log = insecure.stderr();
    assert!(
        log.contains("WARN") && log.contains("insecure_skip_verify"),
        "{log}"
    );
}

/// Without `[upstream.tls]`, the system's CAs, found as OpenSSL finds them: here through
/// SSL_CERT_FILE, which points at the test CA.
#[tokio::test]
async fn rediss_without_upstream_tls_trusts_the_system_cas() {
    let certs = Certs::new();
    let redis = RedisServer::start_tls(&certs, false);
    let ca = certs.ca.display().to_string();
    let rest = format!(
        "[upstream]\naddress = \"rediss://localhost:{}\"\n",
        redis.port
    );
    let process = redmux_process(&rest, &[("SSL_CERT_FILE", &ca), ("SSL_CERT_DIR", "")]);
    let mut raw = process.raw().await;
    assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(raw.call(&["GET", "k"]).await, "$1\r\nv\r\n");
}

/// A reload (SIGHUP) gives new clients upstream connections with the new `[upstream.tls]`;
/// `[server.tls]` waits for a restart, as the other listeners do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_upstream_tls_and_server_tls_needs_a_restart() {
    let certs = Certs::new();
    let redis = RedisServer::start_tls(&certs, false);
    let upstream =
        |name: &str| rediss_sections(&redis, &certs, &format!("server_name = \"{name}\""));
    let redmux = redmux_process(&upstream("wrong.example"), &[]);
    let mut before = redmux.raw().await;
    assert_eq!(
        before.call(&["PING"]).await,
        "-ERR redmux: upstream unavailable\r\n"
    );
    let server_tls = format!(
        "[server.tls]\nlisten = \"127.0.0.1:{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        support::free_port(),
        certs.server_cert.display(),
        certs.server_key.display()
    );
    redmux.reload(&server_tls, &upstream("localhost"));
    let deadline = Deadline::new();
    while redmux.raw().await.call(&["PING"]).await != "+PONG\r\n" {
        deadline
            .next_try("the new [upstream.tls] never applied")
            .await;
    }
    let logs = redmux.wait_for_log("need a restart", 1);
    assert!(logs.contains("server.tls"), "{logs}");
    assert!(logs.contains("upstream.tls"), "{logs}");
}

// === configuration ===

fn load(text: &str) -> Result<Config, String> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    redmux::load_config(Some(file.path()), &Overrides::default()).map_err(|e| e.to_string())
}

#[test]
fn every_tls_key_loads() {
    let certs = Certs::new();
    let config = load(&format!(
        "[server.tls]\nlisten = [\"127.0.0.1:6390\", \"[::1]:6390\"]\ncert_file = \"{}\"\n\
         key_file = \"{}\"\nca_file = \"{}\"\n\
         [upstream]\naddress = \"rediss://user:pw@127.0.0.1:6391/2\"\n\
         [upstream.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         server_name = \"localhost\"\ninsecure_skip_verify = false\n",
        certs.server_cert.display(),
        certs.server_key.display(),
        certs.ca.display(),
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display(),
    ))
    .unwrap();
    let server = config.server.tls.as_ref().unwrap();
    assert_eq!(server.listen.len(), 2);
    assert_eq!(server.ca_file.as_ref(), Some(&certs.ca));
    let upstream = config.upstream.tls.as_ref().unwrap();
    assert_eq!(upstream.server_name.as_deref(), Some("localhost"));
    assert!(!upstream.insecure_skip_verify);
    let summary = config.summary();
    assert!(
        summary.contains("tls listen: 127.0.0.1:6390, [::1]:6390 (client certificates required)"),
        "{summary}"
    );
    assert!(
        summary.contains("upstream: rediss://127.0.0.1:6391"),
        "{summary}"
    );
    assert!(
        summary.contains("upstream tls: server name localhost"),
        "{summary}"
    );
}

#[test]
fn bad_tls_settings_are_refused_naming_key_and_line() {
    let certs = Certs::new();
    let [cert, key, ca, client_key] = [
        &certs.server_cert,
        &certs.server_key,
        &certs.ca,
        &certs.client_key,
    ]
    .map(|path| path.display().to_string());
    let server = |body: &str| {
        load(&format!(
            "[server]\nmax_clients = 5\n[server.tls]\n{body}\n"
        ))
    };
    let upstream = |body: &str| {
        load(&format!(
            "[upstream]\naddress = \"rediss://127.0.0.1:1\"\n[upstream.tls]\n{body}\n"
        ))
    };
    let listen = "listen = \"127.0.0.1:6390\"\n";
    let cases = [
        (
            server(&format!(
                "{listen}cert_file = \"/nonexistent/cert.pem\"\nkey_file = \"{key}\""
            )),
            ":5: server.tls.cert_file: cannot read /nonexistent/cert.pem".to_owned(),
        ),
        (
            server(&format!("{listen}cert_file = \"{cert}\"")),
            "server.tls.key_file: not set: server.tls.cert_file needs its private key".to_owned(),
        ),
        (
            server(&format!(
                "{listen}cert_file = \"{cert}\"\nkey_file = \"{cert}\""
            )),
            format!(":6: server.tls.key_file: {cert} holds no private key"),
        ),
        (
            server(&format!(
                "{listen}cert_file = \"{key}\"\nkey_file = \"{key}\""
            )),
            format!(":5: server.tls.cert_file: {key} holds no certificate"),
        ),
        (
            server(&format!(
                "{listen}cert_file = \"{cert}\"\nkey_file = \"{client_key}\""
            )),
            format!(
                ":6: server.tls.key_file: {client_key} does not match the certificate in {cert}"
            ),
        ),
        (
            server(&format!("cert_file = \"{cert}\"\nkey_file = \"{key}\"")),
            "server.tls.listen: no address to listen on".to_owned(),
        ),
        (
            server(&format!(
                "{listen}cert_file = \"{cert}\"\nkey_file = \"{key}\"\nciphers = \"x\""
            )),
            "unknown field `ciphers`".to_owned(),
        ),
        (
            load(&format!(
                "[upstream]\naddress = \"127.0.0.1:1\"\n[upstream.tls]\nca_file = \"{ca}\"\n"
            )),
            ":3: upstream.tls: set, but upstream.address is not a rediss:// address".to_owned(),
        ),
        (
            upstream("ca_file = \"/nonexistent/ca.pem\""),
            ":4: upstream.tls.ca_file: cannot read /nonexistent/ca.pem".to_owned(),
        ),
        (
            upstream(&format!("ca_file = \"{ca}\"\nserver_name = \"not a name\"")),
            ":5: upstream.tls.server_name: \"not a name\" is not a TLS server name".to_owned(),
        ),
        (
            upstream(&format!("ca_file = \"{ca}\"\nkey_file = \"{key}\"")),
            ":5: upstream.tls.key_file: set without the certificate it belongs to".to_owned(),
        ),
    ];
    for (result, expected) in cases {
        let err = result.expect_err(&expected);
        assert!(err.contains(&expected), "expected {expected:?} in: {err}");
    }
}

#[test]
fn check_reads_the_tls_files() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let text = |key: &std::path::Path| {
        format!(
            "[server.tls]\nlisten = \"127.0.0.1:6390\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            certs.server_cert.display(),
            key.display()
        )
    };
    let run = |text: String| {
        let file = support::write_file(dir.path(), "redmux.toml", &text);
        std::process::Command::new(support::redmux_bin())
            .args(["--check", "--config"])
            .arg(file)
            .output()
            .unwrap()
    };
    let good = run(text(&certs.server_key));
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{stdout}");
    assert!(stdout.contains("tls listen: 127.0.0.1:6390"), "{stdout}");
    let bad = run(text(&certs.client_key));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr.contains("redmux.toml:4: server.tls.key_file: ")
            && stderr.contains("does not match"),
        "{stderr}"
    );
}

/// `config/production.example.toml` passes `--check` once the files it names exist: every key in
/// it is real, and its TLS, password and socket settings go together.
#[test]
fn the_production_example_checks_with_its_files_in_place() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = |name: &str| support::write_file(dir.path(), name, "pw\n");
    let mut text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/production.example.toml"
    ))
    .expect("production example");
    for (shipped, here) in [
        ("/etc/redmux/tls/server.crt", certs.server_cert.clone()),
        ("/etc/redmux/tls/server.key", certs.server_key.clone()),
        ("/etc/redmux/tls/redis-ca.crt", certs.ca.clone()),
        ("/etc/redmux/redis-password", secret("redis-password")),
        ("/etc/redmux/app-password", secret("app-password")),
        ("/run/redmux/redmux.sock", dir.path().join("redmux.sock")),
    ] {
        assert!(
            text.contains(shipped),
            "{shipped} is no longer in the example"
        );
        text = text.replace(shipped, &here.display().to_string());
    }
    let config = support::write_file(dir.path(), "redmux.toml", &text);
    let out = std::process::Command::new(support::redmux_bin())
        .args(["--check", "--config"])
        .arg(&config)
        .env("REDMUX_DEFAULT_PASSWORD", "pw")
        .output()
        .expect("run redmux --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
}
