//! Real client libraries' client-side caches through redmux: node-redis 5 (`clientSideCache`)
//! and redis-py (`cache_config`), each reading through redmux with CLIENT TRACKING in RESP3
//! while another client writes to Redis directly. A cached read may lag the last write
//! acknowledged before it began only by the time an invalidation takes to arrive; the scripts
//! in `tests/clients/` measure that lag and the delay, and docs/tracking.md has the figures.
//!
//! The libraries live in `target/client-libs`, where `.ci/run` installs them (the versions are
//! pinned there). Without them these tests say so and pass, unless
//! `REDMUX_REQUIRE_CLIENT_LIBS` is set, as `.ci/run` sets it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{path::PathBuf, process::Command};

use support::{RedisServer, Redmux};

/// Writes, each followed by three cached reads, then as many delay measurements.
const ROUNDS: &str = "300";

/// The longest a cached read may lag an acknowledged write: far above the delay measured on a
/// loaded 2-core machine (a few ms), far below a missed invalidation (for ever).
const MAX_LAG_MS: f64 = 1000.0;

fn libs() -> PathBuf {
    std::env::var_os("REDMUX_CLIENT_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/client-libs"))
}

/// Whether `what` is installed; if not, the test is skipped, or fails when the libraries are
/// required.
fn available(what: &str, path: &std::path::Path) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var_os("REDMUX_REQUIRE_CLIENT_LIBS").is_none(),
        "{what} is not installed at {} (.ci/run installs it)",
        path.display()
    );
    eprintln!(
        "skipped: {what} is not installed at {} (.ci/run installs it)",
        path.display()
    );
    false
}

/// A number field of the scripts' one-line JSON.
fn field(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {json}"))
        + key.len();
    let value: String = json[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-' || *c == 'e')
        .collect();
    value.parse().unwrap_or_else(|_| panic!("{name} in {json}"))
}

/// Runs a script and judges its report: no errors, the cache answered reads, no read lagged
/// beyond [`MAX_LAG_MS`], every change reached the cache.
fn judge(name: &str, command: &mut Command) {
    let output = command.output().expect("run the client script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{name}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = stdout.lines().last().unwrap_or_default().replace(' ', "");
    println!("{name}: {json}");
    assert!(json.contains("\"errors\":[]"), "{name}: {json}");
    assert!(
        field(&json, "hits") > 0.0,
        "{name}: the cache served nothing"
    );
    assert!(
        field(&json, "max_lag_ms") < MAX_LAG_MS,
        "{name}: a cached read lagged a write: {json}"
    );
    assert!(
        field(&json, "delay_max_ms") < 5000.0,
        "{name}: a change never reached the cache: {json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_redis_client_side_cache_through_redmux() {
    let libs = libs();
    if !available("node-redis", &libs.join("node_modules/redis")) {
        return;
    }
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node_cache.js");
    let mut command = Command::new("node");
    command
        .arg(script)
        .arg(&libs)
        .arg(redmux.url())
        .arg(redis.url())
        .arg(ROUNDS);
    tokio::task::block_in_place(|| judge("node-redis", &mut command));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_client_side_cache_through_redmux() {
    let libs = libs().join("py");
    if !available("redis-py", &libs.join("redis")) {
        return;
    }
    let redis = RedisServer::start();
    let redmux = Redmux::start(&redis.addr()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/py_cache.py");
    let redis_port = redis.addr().rsplit(':').next().unwrap().to_owned();
    let mut command = Command::new("python3");
    command
        .arg(script)
        .arg(&libs)
        .arg(redmux.addr.port().to_string())
        .arg(redis_port)
        .arg(ROUNDS);
    tokio::task::block_in_place(|| judge("redis-py", &mut command));
}
