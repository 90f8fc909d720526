//! The metrics endpoint (`[metrics] listen`): `/metrics` as Prometheus text whose counters move
//! with real traffic through a real redis-server, `/health` following the upstream, `/status`,
//! the HTTP side's limits, and the binary's `--ping` and `--status`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use support::{binary::RedmuxProcess, Deadline, RedisServer, Redmux, READY_TIMEOUT};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Redmux in front of `upstream`, with the metrics endpoint on a free port.
async fn start(upstream: &str) -> (Redmux, SocketAddr) {
    start_with(support::config(upstream)).await
}

async fn start_with(mut config: redmux::Config) -> (Redmux, SocketAddr) {
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let redmux = Redmux::start_with(config).await;
    let metrics = redmux.metrics.expect("the metrics endpoint is bound");
    (redmux, metrics)
}

/// An HTTP response: status code, head, body.
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` as is and reads the response until the server closes the connection.
async fn http_raw(addr: SocketAddr, request: &[u8]) -> Response {
    try_http(addr, request)
        .await
        .expect("a response before the connection closed")
}

/// As [`http_raw`]; `None` if the connection closed with no response.
async fn try_http(addr: SocketAddr, request: &[u8]) -> Option<Response> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to /metrics");
    let _ = stream.write_all(request).await;
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(READY_TIMEOUT, stream.read_to_end(&mut bytes))
        .await
        .expect("the endpoint closes the connection after its response");
    if read.is_err() || bytes.is_empty() {
        return None;
    }
    let text = String::from_utf8(bytes).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    assert!(head.contains("\r\nConnection: close"), "{head}");
    let length = format!("\r\nContent-Length: {}\r\n", body.len());
    assert!(head.contains(&length), "{head} / {} body bytes", body.len());
    Some(Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

async fn get(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    http_raw(addr, request.as_bytes()).await
}

/// Polls `path` until it answers `status`, for at most `within`.
async fn wait_status(addr: SocketAddr, path: &str, status: u16, within: Duration) -> Response {
    let deadline = Deadline::within(within);
    loop {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let response = try_http(addr, request.as_bytes()).await;
        match response {
            Some(response) if response.status == status => return response,
            _ => {}
        }
        deadline
            .next_try(format!("{path} still not {status}"))
            .await;
    }
}

/// A scrape, checked line by line against the Prometheus text format (0.0.4): series name
/// (`name{labels}`, labels sorted as written) to value.
struct Scrape {
    series: BTreeMap<String, f64>,
    /// Family name to type.
    types: BTreeMap<String, String>,
    lines: usize,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut series = BTreeMap::new();
        let mut types = BTreeMap::new();
        let mut family: Option<(String, String)> = None;
        let mut help: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').expect("HELP name text");
                assert!(valid_name(name), "{line}");
                assert!(!text.is_empty(), "every metric has help text: {line}");
                help = Some(name.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name type");
                assert_eq!(help.as_deref(), Some(name), "HELP before TYPE: {line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "one TYPE per family: {line}"
                );
                family = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let (name, labels, value) = split_sample(line);
            let (family, kind) = family.as_ref().expect("a sample after its TYPE");
            let fits = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{family}{suffix}")),
                _ => name == family,
            };
            assert!(fits, "{name} is not of family {family} ({kind})");
            assert!(name.starts_with("redmux_"), "{line}");
            let key = format!("{name}{labels}");
            assert!(
                series.insert(key, value).is_none(),
                "duplicate series: {line}"
            );
        }
        let scrape = Scrape {
            series,
            types,
            lines: text.lines().count(),
        };
        scrape.check_histograms();
        scrape
    }

    /// Buckets grow with `le`, and the `+Inf` one equals `_count`.
    fn check_histograms(&self) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let counts: Vec<(&String, f64)> = self
                .series
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("{family}_count")))
                .map(|(k, v)| (k, *v))
                .collect();
            assert!(!counts.is_empty() || self.lines > 0);
            for (key, count) in counts {
                let labels = key.trim_start_matches(&format!("{family}_count"));
                let inner = labels.trim_start_matches('{').trim_end_matches('}');
                let prefix = format!("{family}_bucket{{{inner},le=\"");
                let mut buckets: Vec<(f64, f64)> = self
                    .series
                    .iter()
                    .filter_map(|(k, v)| {
                        let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                        let le = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().expect("le is a number")
                        };
                        Some((le, *v))
                    })
                    .collect();
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                assert!(
                    buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                    "{key}: buckets are cumulative: {buckets:?}"
                );
                assert_eq!(
                    buckets.last(),
                    Some(&(f64::INFINITY, count)),
                    "{key}: +Inf bucket = count"
                );
            }
        }
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .series
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }

    /// Values of label `label` over the series of `name`.
    fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        let needle = format!("{label}=\"");
        self.series
            .keys()
            .filter(|k| k.starts_with(&format!("{name}{{")))
            .filter_map(|k| {
                let at = k.find(&needle)? + needle.len();
                Some(k[at..].split('"').next()?.to_owned())
            })
            .collect()
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{labels} value`: the name, the labels as written (checked), the value.
fn split_sample(line: &str) -> (&str, &str, f64) {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line}"));
    let name = &line[..name_end];
    assert!(valid_name(name), "{line}");
    let rest = &line[name_end..];
    let (labels, value) = if rest.starts_with('{') {
        let end = rest.find("} ").unwrap_or_else(|| panic!("{line}"));
        let labels = &rest[..=end];
        for pair in labels[1..labels.len() - 1].split("\",") {
            let (key, value) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
            assert!(valid_name(key), "{line}");
            assert!(!value.trim_end_matches('"').contains('"'), "{line}");
        }
        (labels, &rest[end + 2..])
    } else {
        ("", &rest[1..])
    };
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}")),
    };
    (name, labels, value)
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let response = get(addr, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response
            .head
            .contains("Content-Type: text/plain; version=0.0.4"),
        "{}",
        response.head
    );
    Scrape::parse(&response.body)
}

/// Polls the scrape until `check` holds, for at most `within`.
async fn wait_scrape(addr: SocketAddr, within: Duration, check: impl Fn(&Scrape) -> bool) {
    let deadline = Deadline::within(within);
    while !check(&scrape(addr).await) {
        deadline.next_try("metrics never got there").await;
    }
}

fn command_series(name: &str, command: &str) -> String {
    format!("{name}{{command=\"{command}\"}}")
}

/// A raw client that counts the bytes it sends and receives.
struct Counted {
    raw: support::Raw,
    sent: usize,
    received: usize,
}

impl Counted {
    async fn call(&mut self, args: &[&str]) -> String {
        let request = redmux::resp::encode_command(args.iter().map(|a| a.as_bytes()));
        self.sent += request.len();
        self.raw.send(&request).await;
        let reply = self.raw.reply_str().await;
        self.received += reply.len();
        reply
    }

    async fn pipeline(&mut self, requests: &str, count: usize) -> Vec<Vec<u8>> {
        let replies = self.raw.pipeline(requests.as_bytes(), count).await;
        self.sent += requests.len();
        self.received += replies.iter().map(Vec::len).sum::<usize>();
        replies
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_errors_latency_and_bytes_are_counted() {
    let redis = RedisServer::start();
    let (redmux, metrics) = start(&redis.addr()).await;
    let mut client = Counted {
        raw: redmux.raw().await,
        sent: 0,
        received: 0,
    };
    assert_eq!(client.call(&["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(client.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    assert!(client.call(&["GET"]).await.starts_with("-ERR wrong number"));
    let unknown = client.call(&["FOOBAR", "x"]).await;
    assert!(unknown.starts_with("-ERR unknown command"), "{unknown}");
    // Answered by redmux itself, with an error: counted, not timed.
    assert_eq!(client.call(&["EXEC"]).await, "-ERR EXEC without MULTI\r\n");
    // One batch upstream: the error is counted for the command whose reply it is.
    let replies = client
        .pipeline("SET a 1\r\nLPUSH a x\r\nINCR a\r\nGET a\r\n", 4)
        .await;
    assert!(replies[1].starts_with(b"-WRONGTYPE"));
    let (sent, received) = (client.sent, client.received);

    // Written bytes are counted just after the write that sends them, so the client may see
    // them a moment before the counter does.
    let written = "redmux_client_sent_bytes_total";
    wait_scrape(metrics, READY_TIMEOUT, |m| {
        m.get(written) == received as f64
    })
    .await;
    let m = scrape(metrics).await;
    let calls = |c| m.get(&command_series("redmux_commands_total", c));
    let errors = |c| m.get(&command_series("redmux_command_errors_total", c));
    let timed = |c| m.get(&command_series("redmux_request_duration_seconds_count", c));
    for (command, n, failed, upstream) in [
        ("set", 2.0, 0.0, 2.0),
        ("get", 3.0, 1.0, 3.0),
        ("other", 1.0, 1.0, 1.0),
        ("exec", 1.0, 1.0, 0.0),
        ("lpush", 1.0, 1.0, 1.0),
        ("incr", 1.0, 0.0, 1.0),
    ] {
        assert_eq!(calls(command), n, "{command}");
        assert_eq!(errors(command), failed, "{command} errors");
        if upstream > 0.0 {
            assert_eq!(timed(command), upstream, "{command} timed");
            let sum = m.get(&command_series(
                "redmux_request_duration_seconds_sum",
                command,
            ));
            assert!(sum > 0.0 && sum < 5.0, "{command}: {sum}");
        }
    }
    assert!(
        !m.series.contains_key(&command_series(
            "redmux_request_duration_seconds_count",
            "exec"
        )),
        "a command only redmux answered has no latency series"
    );
    assert!(!m
        .series
        .contains_key(&command_series("redmux_commands_total", "del")));
    assert_eq!(m.get("redmux_client_received_bytes_total"), sent as f64);
    assert_eq!(m.get("redmux_connections_accepted_total"), 1.0);
    assert_eq!(
        m.get("redmux_connections_rejected_total{reason=\"max_clients\"}"),
        0.0
    );
    assert_eq!(m.get("redmux_upstream_connects_total"), 1.0);
    assert_eq!(m.get("redmux_upstream_in_flight_requests"), 0.0);
    assert_eq!(m.get("redmux_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(m.get("redmux_start_time_seconds") > 1.6e9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_clients_and_rejections() {
    let redis = RedisServer::start();
    let mut config = support::config(&redis.addr());
    config.server.max_clients = 3;
    let (redmux, metrics) = start_with(config).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut raw = redmux.raw().await;
        assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
        clients.push(raw);
    }
    let gauge = |n: f64| move |m: &Scrape| m.get("redmux_connected_clients") == n;
    wait_scrape(metrics, READY_TIMEOUT, gauge(3.0)).await;
    let mut refused = redmux.raw().await;
    assert_eq!(
        refused.reply_str().await,
        "-ERR max number of clients reached\r\n"
    );
    clients.truncate(1);
    wait_scrape(metrics, READY_TIMEOUT, gauge(1.0)).await;
    let m = scrape(metrics).await;
    assert_eq!(m.get("redmux_connections_accepted_total"), 3.0);
    assert_eq!(
        m.get("redmux_connections_rejected_total{reason=\"max_clients\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_upstream() {
    let mut redis = RedisServer::start();
    let (redmux, metrics) = start(&redis.addr()).await;
    let up = wait_status(metrics, "/health", 200, READY_TIMEOUT).await;
    assert_eq!(up.body, "OK\n");
    assert!(up.head.contains("Content-Type: text/plain"), "{}", up.head);
    assert_eq!(scrape(metrics).await.get("redmux_upstream_up"), 1.0);

    redis.kill();
    let down = wait_status(metrics, "/health", 503, READY_TIMEOUT).await;
    assert_eq!(down.body, "upstream down\n");
    let m = scrape(metrics).await;
    assert_eq!(m.get("redmux_upstream_up"), 0.0);
    assert_eq!(m.get("redmux_upstream_connections{role=\"shared\"}"), 0.0);
    assert_eq!(m.get("redmux_upstream_disconnects_total"), 1.0);
    // Requests wait for the connection (for connect_timeout), and the gauge shows them.
    let mut raw = redmux.raw().await;
    raw.send("PING\r\n").await;
    wait_scrape(metrics, READY_TIMEOUT, |m| {
        m.get("redmux_upstream_queued_requests") == 1.0
    })
    .await;
    assert_eq!(
        raw.reply_str().await,
        "-ERR redmux: upstream unavailable\r\n"
    );

    redis.restart();
    wait_status(metrics, "/health", 200, READY_TIMEOUT).await;
    let m = scrape(metrics).await;
    assert_eq!(m.get("redmux_upstream_up"), 1.0);
    assert_eq!(m.get("redmux_upstream_connects_total"), 2.0);
    assert!(m.get("redmux_upstream_connect_failures_total") >= 1.0);
    assert_eq!(m.get("redmux_upstream_queued_requests"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_clients_upstreams_and_counters_but_no_password() {
    const PASSWORD: &str = "upstream-s3cret";
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let mut config = support::config(&format!("redis://:{PASSWORD}@{}/", redis.addr()));
    config.upstream.max_pinned = 5;
    let (redmux, metrics) = start_with(config).await;
    wait_status(metrics, "/health", 200, READY_TIMEOUT).await;

    let mut subscriber = redmux.raw().await;
    subscriber.send("SUBSCRIBE news\r\nPSUBSCRIBE n*\r\n").await;
    subscriber.reply().await;
    subscriber.reply().await;
    let mut tx = redmux.raw().await;
    assert_eq!(tx.call(&["MULTI"]).await, "+OK\r\n");
    let mut sleeper = redmux.raw().await;
    sleeper.send("DEBUG SLEEP 1\r\n").await;
    wait_scrape(metrics, READY_TIMEOUT, |m| {
        m.get("redmux_upstream_in_flight_requests") == 1.0
    })
    .await;

    let response = get(metrics, "/status").await;
    assert_eq!(response.status, 200);
    assert!(
        response.head.contains("Content-Type: application/json"),
        "{}",
        response.head
    );
    assert!(!response.body.contains(PASSWORD), "{}", response.body);
    let status: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64());
    assert_eq!(status["config"]["upstream"], redis.addr());
    assert_eq!(status["config"]["metrics_listen"], metrics.to_string());
    assert_eq!(status["config"]["listen"][0], redmux.addr.to_string());
    assert_eq!(status["clients"], 3);
    assert_eq!(status["healthy"], true);
    let upstreams = status["upstreams"].as_array().expect("upstreams");
    // One shared connection per serving thread that has clients (REDMUX_TEST_THREADS).
    let shared: Vec<&serde_json::Value> =
        upstreams.iter().filter(|u| u["role"] == "shared").collect();
    assert!(!shared.is_empty(), "the shared connection");
    for shared in &shared {
        assert_eq!(shared["db"], 0);
        assert_eq!(shared["resp"], 2);
        assert_eq!(shared["connected"], true);
    }
    let in_flight: u64 = shared.iter().filter_map(|u| u["in_flight"].as_u64()).sum();
    assert_eq!(in_flight, 1, "DEBUG SLEEP is in flight");
    assert!(upstreams.iter().any(|u| u["role"] == "pinned"));
    assert_eq!(status["pinned"]["in_use"], 1);
    assert_eq!(status["pinned"]["max"], 5);
    assert_eq!(status["pubsub"]["channels"], 1);
    assert_eq!(status["pubsub"]["patterns"], 1);
    assert_eq!(status["pubsub"]["clients"], 1);
    assert!(status["counters"]["commands"].as_u64() >= Some(4));
    assert!(status["counters"]["upstream_connects"].as_u64() >= Some(2));

    let m = scrape(metrics).await;
    assert_eq!(m.get("redmux_pinned_connections_in_use"), 1.0);
    assert_eq!(m.get("redmux_pinned_connections_max"), 5.0);
    assert_eq!(m.get("redmux_pubsub_subscriptions{kind=\"channel\"}"), 1.0);
    assert_eq!(m.get("redmux_pubsub_subscriptions{kind=\"pattern\"}"), 1.0);
    assert_eq!(m.get("redmux_pubsub_clients"), 1.0);
    assert_eq!(m.get("redmux_upstream_connections{role=\"pinned\"}"), 1.0);

    assert_eq!(sleeper.reply_str().await, "+OK\r\n");
    drop(subscriber);
    assert_eq!(tx.call(&["DISCARD"]).await, "+OK\r\n");
    wait_scrape(metrics, READY_TIMEOUT, |m| {
        m.get("redmux_pubsub_clients") == 0.0
            && m.get("redmux_pubsub_subscriptions{kind=\"channel\"}") == 0.0
            && m.get("redmux_pinned_connections_in_use") == 0.0
            && m.get("redmux_upstream_in_flight_requests") == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_share_one_label() {
    let redis = RedisServer::start();
    let (redmux, metrics) = start(&redis.addr()).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["GET", "k"]).await, "$-1\r\n");
    let before = scrape(metrics).await;
    let mut pipeline = String::new();
    for i in 0..1000 {
        pipeline.push_str(&format!("NOSUCHCOMMAND{i} x\r\n"));
    }
    let replies = raw.pipeline(pipeline.as_bytes(), 1000).await;
    assert_eq!(replies.len(), 1000);
    assert!(replies
        .iter()
        .all(|r| r.starts_with(b"-ERR unknown command")));
    let after = scrape(metrics).await;
    assert_eq!(
        after.label_values("redmux_commands_total", "command"),
        ["get", "other"].map(String::from).into()
    );
    assert_eq!(
        after.get(&command_series("redmux_commands_total", "other")),
        1000.0
    );
    assert_eq!(
        after.get(&command_series("redmux_command_errors_total", "other")),
        1000.0
    );
    assert_eq!(
        after.get(&command_series(
            "redmux_request_duration_seconds_count",
            "other"
        )),
        1000.0
    );
    // One more command label: its calls, errors and latency series, and nothing else.
    let histogram = 10 + 2;
    assert_eq!(after.lines, before.lines + 2 + histogram);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_side_is_strict() {
    let (_redmux, metrics) = start("embedded").await;
    assert_eq!(
        get(metrics, "/health").await.status,
        200,
        "embedded is always up"
    );
    let not_found = get(metrics, "/nope").await;
    assert_eq!(not_found.status, 404);
    let post = http_raw(
        metrics,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert_eq!(post.status, 405);
    assert!(post.head.contains("\r\nAllow: GET"), "{}", post.head);
    assert_eq!(
        http_raw(metrics, b"HEAD /health HTTP/1.1\r\n\r\n")
            .await
            .status,
        405
    );
    assert_eq!(http_raw(metrics, b"GET /health\r\n\r\n").await.status, 400);
    assert_eq!(
        http_raw(metrics, b"GET /health SPDY/3\r\n\r\n")
            .await
            .status,
        400
    );
    assert_eq!(
        get(metrics, "/health?verbose=1").await.status,
        200,
        "a query string is ignored"
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "x".repeat(10_000)
    );
    assert_eq!(http_raw(metrics, huge.as_bytes()).await.status, 431);
    // A client that never finishes its request is answered 408 and closed.
    let started = Instant::now();
    let slow = http_raw(metrics, b"GET /metrics HTTP/1.1\r\n").await;
    assert_eq!(slow.status, 408);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

/// A request head of `len` bytes for `/health`, its blank line included.
fn head_of(len: usize) -> String {
    let start = "GET /health HTTP/1.1\r\nX-Padding: ";
    let end = "\r\n\r\n";
    let head = format!("{start}{}{end}", "x".repeat(len - start.len() - end.len()));
    assert_eq!(head.len(), len);
    head
}

/// The 8 KiB limit on a request head is exact: 8192 bytes (the blank line that ends it
/// included) are answered, one more byte is refused with 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_limit_is_exactly_8_kib() {
    let (_redmux, metrics) = start("embedded").await;
    assert_eq!(
        http_raw(metrics, head_of(8192).as_bytes()).await.status,
        200
    );
    for len in [8193, 9 * 1024] {
        let refused = http_raw(metrics, head_of(len).as_bytes()).await;
        assert_eq!(refused.status, 431, "{len} bytes: {}", refused.head);
    }
}

/// Idle connections cannot take the endpoint offline: `/health` answers at once beside
/// hundreds of them, and past the cap the oldest are closed to make room for new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_never_take_the_endpoint_offline() {
    // Both ends of every connection are in this process.
    rlimit::increase_nofile_limit(8192).expect("raise the open-file limit");
    let (_redmux, metrics) = start("embedded").await;
    let cap = redmux::admin::MAX_CONNECTIONS;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(metrics).await.expect("connect"));
    }
    let started = Instant::now();
    assert_eq!(get(metrics, "/health").await.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "/health beside 300 idle connections took {:?}",
        started.elapsed()
    );
    // Past the cap: the oldest idle connections are shed, /health still answers.
    while idle.len() < cap + 100 {
        idle.push(TcpStream::connect(metrics).await.expect("connect"));
    }
    let started = Instant::now();
    assert_eq!(get(metrics, "/health").await.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "/health beside {} idle connections took {:?}",
        idle.len(),
        started.elapsed()
    );
    for (i, stream) in idle.iter_mut().take(100).enumerate() {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(READY_TIMEOUT, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "idle connection {i} is still open");
        assert!(rest.is_empty(), "shed without an answer: {rest:?}");
    }
    // The newest are still open, waiting for their request.
    let newest = idle.last_mut().expect("connections");
    let mut byte = [0u8; 1];
    assert_eq!(
        newest.try_read(&mut byte).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the newest connection was closed"
    );
}

/// A client that sends its request head a byte at a time (slowloris) gets 408 and is closed
/// once the 5 s head timeout is up, however steadily it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_cut_off_after_5_s() {
    let (_redmux, metrics) = start("embedded").await;
    let mut stream = TcpStream::connect(metrics).await.expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("write");
    let started = Instant::now();
    let mut answer = Vec::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "still open after {:?}",
            started.elapsed()
        );
        if stream.write_all(b"x").await.is_err() {
            break;
        }
        // A byte every 100 ms: the pace of the attack, not a wait for the server.
        let mut chunk = [0u8; 512];
        tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(4500),
        "closed after {elapsed:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_without_metrics_listen() {
    let redmux = Redmux::start("embedded").await;
    assert_eq!(redmux.metrics, None);
}

/// Runs the binary with `args`: exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(support::redmux_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run redmux");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ping_and_status_from_the_command_line() {
    let port = support::free_port();
    let process = RedmuxProcess::start("", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    support::wait_listening(port);
    // A copy: the process's own goes with it.
    let dir = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(process.config_path()).expect("config");
    let config = support::write_file(dir.path(), "redmux.toml", &text);
    let config = config.to_str().expect("path");
    assert_eq!(run(&["--ping", "--config", config]).0, 0);
    let (code, stdout, stderr) = run(&["--status", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(status["config"]["upstream"], "embedded");
    assert_eq!(process.stop(), 0);

    let (code, _, stderr) = run(&["--ping", "--config", config]);
    assert_eq!(code, 1);
    assert!(stderr.contains("ping failed: cannot reach"), "{stderr}");
    let (code, stdout, stderr) = run(&["--status", "--config", config]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("cannot reach"), "{stderr}");
}

#[test]
fn status_needs_the_endpoint_and_ping_logs_in() {
    let process = RedmuxProcess::start("", "[auth]\npassword = \"client-pw\"\n");
    let config = process.config_path();
    let config = config.to_str().expect("path");
    assert_eq!(run(&["--ping", "--config", config]).0, 0, "AUTH, then PING");
    let (code, _, stderr) = run(&["--status", "--config", config]);
    assert_eq!(code, 1);
    assert!(stderr.contains("[metrics] listen"), "{stderr}");
    // A redmux that answers something else than PONG fails the check.
    let other = RedmuxProcess::start("", "");
    let wrong = format!(
        "[server]\nlisten = \"{}\"\n[auth]\npassword = \"nope\"\n",
        other.addr
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let wrong = support::write_file(dir.path(), "wrong.toml", &wrong);
    let (code, _, stderr) = run(&["--ping", "--config", wrong.to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("answered"), "{stderr}");
}

/// The Dockerfile's HEALTHCHECK is `redmux --ping` with the flags the container runs redmux
/// with, and that command succeeds against a redmux started that way (on a loopback port here).
#[test]
fn the_dockerfile_healthcheck_pings_with_the_containers_flags() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("Dockerfile");
    let instructions: Vec<String> = dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::to_owned)
        .collect();
    let exec_form = |prefix: &str| -> Vec<String> {
        let line = instructions
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in the Dockerfile"));
        let array = &line[line.find("CMD [").expect("exec form") + 4..];
        serde_json::from_str(array).expect("a JSON array")
    };
    let health = exec_form("HEALTHCHECK ");
    let cmd = exec_form("CMD [");
    assert_eq!(health[..2], ["/usr/local/bin/redmux", "--ping"]);
    assert_eq!(health[2..], cmd[..], "the check uses the container's flags");

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/redmux.toml");
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args: Vec<String> = health[1..]
        .iter()
        .map(|arg| match arg.as_str() {
            "/etc/redmux/redmux.toml" => shipped.to_owned(),
            "0.0.0.0:6380" => listen.clone(),
            other => other.to_owned(),
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(run(&args).0, 1, "nothing listens yet");
    let mut server = Command::new(support::redmux_bin())
        .args(["--config", shipped, "--listen", &listen])
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start redmux");
    support::wait_listening(port);
    let (code, _, stderr) = run(&args);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_are_rejections() {
    let redis = RedisServer::start();
    let certs = support::tls::Certs::new();
    let mut config = support::config(&redis.addr());
    config.server.tls = Some(certs.server_tls(false));
    let (redmux, metrics) = start_with(config).await;
    let tls_addr = redmux.tls_addr.expect("a TLS listener");
    let mut plain = TcpStream::connect(tls_addr).await.expect("connect");
    plain.write_all(b"PING\r\n").await.expect("send");
    let rejected = "redmux_connections_rejected_total{reason=\"tls_handshake\"}";
    wait_scrape(metrics, READY_TIMEOUT, |m| m.get(rejected) == 1.0).await;
    let mut tls = support::tls::connect(tls_addr, &certs.client(false))
        .await
        .expect("handshake");
    tls.write_all(b"PING\r\n").await.expect("send");
    let mut pong = [0u8; 7];
    tls.read_exact(&mut pong).await.expect("reply");
    assert_eq!(&pong, b"+PONG\r\n");
    // The failed client leaves just after it is counted.
    wait_scrape(metrics, READY_TIMEOUT, |m| {
        m.get("redmux_connected_clients") == 1.0
    })
    .await;
    let m = scrape(metrics).await;
    assert_eq!(m.get("redmux_connections_accepted_total"), 1.0);
    assert_eq!(m.get(rejected), 1.0);
}

/// After SIGHUP, `/status` shows the new configuration and `/health` the new upstream, the
/// counters go on from where they were, and `metrics.listen` waits for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_counters_and_shows_the_new_configuration() {
    let mut one = RedisServer::start();
    let mut two = RedisServer::start();
    let port = support::free_port();
    let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
    let section = |redis: &RedisServer, port: u16| {
        format!(
            "[upstream]\naddress = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            redis.addr()
        )
    };
    let redmux = RedmuxProcess::start("", &section(&one, port));
    support::wait_listening(port);
    assert_eq!(redmux.raw().await.call(&["SET", "k", "v"]).await, "+OK\r\n");
    wait_status(metrics, "/health", 200, READY_TIMEOUT).await;

    let elsewhere = support::free_port();
    redmux.reload("max_clients = 77", &section(&two, elsewhere));
    let logs = redmux.wait_for_log("configuration reloaded", 1);
    assert!(logs.contains("metrics.listen"), "{logs}");
    let status: serde_json::Value =
        serde_json::from_str(&get(metrics, "/status").await.body).expect("JSON");
    assert_eq!(status["config"]["upstream"], two.addr());
    assert_eq!(status["config"]["max_clients"], 77);
    assert_eq!(status["config"]["metrics_listen"], metrics.to_string());
    assert!(TcpStream::connect(("127.0.0.1", elsewhere)).await.is_err());
    assert_eq!(
        status["counters"]["commands"], 1,
        "counted before the reload"
    );

    assert_eq!(redmux.raw().await.call(&["SET", "k", "w"]).await, "+OK\r\n");
    let m = scrape(metrics).await;
    assert_eq!(m.get(&command_series("redmux_commands_total", "set")), 2.0);
    // The new upstream decides /health; the old one no longer does.
    one.kill();
    assert_eq!(get(metrics, "/health").await.status, 200);
    two.kill();
    wait_status(metrics, "/health", 503, READY_TIMEOUT).await;
}

/// The shipped configuration files load with their `[metrics]` sections: off in the default
/// one, on loopback in the production example.
#[test]
fn the_shipped_configs_have_their_metrics_sections() {
    let parse = |file: &str| {
        let path = format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("config file");
        redmux::Config::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    assert_eq!(parse("redmux.toml").metrics.listen, None);
    assert_eq!(
        parse("production.example.toml").metrics.listen,
        Some("127.0.0.1:9480".parse().unwrap())
    );
}
