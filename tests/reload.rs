//! SIGHUP reloads the config file while clients stay connected: the binary, end to end.
//!
//! Each test rewrites the file, sends SIGHUP, and waits until the change is observable (a new
//! client sees it, or the log says so) before checking what it must and must not change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::time::{Duration, Instant};

use redis::Commands;
use support::{binary::RedmuxProcess, Deadline, Raw, RedisServer};

const P1: &str = "first-Xq7pw3";
const P2: &str = "second-Lm4zr8";
const OK: &str = "+OK\r\n";
const WRONGPASS: &str = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const NOAUTH: &str = "-NOAUTH Authentication required.\r\n";

fn upstream(redis: &RedisServer) -> String {
    format!("[upstream]\naddress = \"{}\"\n", redis.addr())
}

fn auth(password: &str) -> String {
    format!("[auth]\npassword = \"{password}\"\n")
}

/// Waits until a new client can log in with `password`: the reload is in effect.
async fn wait_for_password(redmux: &RedmuxProcess, password: &str) {
    let deadline = Deadline::new();
    while redmux.raw().await.call(&["AUTH", password]).await != OK {
        deadline.next_try("the new password").await;
    }
}

/// `key` as Redis `redis` holds it, read directly.
fn direct_get(redis: &RedisServer, key: &str) -> Option<String> {
    redis.direct().get(key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_password_for_new_logins_while_logged_in_clients_stay() {
    let redis = RedisServer::start();
    let redmux = RedmuxProcess::start("", &format!("{}{}", upstream(&redis), auth(P1)));
    let mut a = redmux.raw().await;
    assert_eq!(a.call(&["AUTH", P1]).await, OK);
    assert_eq!(a.call(&["SET", "k", "v"]).await, OK);
    let mut waiting = redmux.raw().await;

    redmux.reload("", &format!("{}{}", upstream(&redis), auth(P2)));
    wait_for_password(&redmux, P2).await;

    let mut new = redmux.raw().await;
    assert_eq!(new.call(&["GET", "k"]).await, NOAUTH);
    assert_eq!(new.call(&["AUTH", P1]).await, WRONGPASS);
    assert_eq!(new.call(&["AUTH", P2]).await, OK);
    assert_eq!(new.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    // The client logged in before the reload is still connected and logged in.
    assert_eq!(a.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(a.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    // Its next AUTH is checked against the new password; a failed one changes nothing.
    assert_eq!(a.call(&["AUTH", P1]).await, WRONGPASS);
    assert_eq!(a.call(&["GET", "k"]).await, "$1\r\nv\r\n");
    assert_eq!(a.call(&["AUTH", P2]).await, OK);
    // A client connected before the reload but not logged in needs the new password.
    assert_eq!(waiting.call(&["GET", "k"]).await, NOAUTH);
    assert_eq!(waiting.call(&["AUTH", P1]).await, WRONGPASS);
    assert_eq!(waiting.call(&["AUTH", P2]).await, OK);

    let logs = redmux.wait_for_log("configuration reloaded", 1);
    assert!(logs.contains("auth.password"), "{logs}");
    assert!(
        !logs.contains(P1) && !logs.contains(P2),
        "a password in:\n{logs}"
    );
    assert_eq!(redmux.stop(), 0);
}

/// Removing the password lets in the clients that had not logged in yet; removing a named
/// user closes the clients logged in as it (as Redis's ACL DELUSER does), and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_password_and_removed_user() {
    let redis = RedisServer::start();
    let users = "[[auth.users]]\nname = \"app\"\npassword = \"apppw\"\n";
    let redmux = RedmuxProcess::start("", &format!("{}{}{users}", upstream(&redis), auth(P1)));
    let mut waiting = redmux.raw().await;
    assert_eq!(waiting.call(&["GET", "k"]).await, NOAUTH);
    let mut app = redmux.raw().await;
    assert_eq!(app.call(&["AUTH", "app", "apppw"]).await, OK);
    let mut default = redmux.raw().await;
    assert_eq!(default.call(&["AUTH", P1]).await, OK);

    redmux.reload("", &upstream(&redis));
    let deadline = Deadline::new();
    while redmux.raw().await.call(&["GET", "k"]).await == NOAUTH {
        deadline.next_try("no password required").await;
    }
    assert_eq!(waiting.call(&["GET", "k"]).await, "$-1\r\n");
    app.expect_closed().await;
    assert_eq!(default.call(&["GET", "k"]).await, "$-1\r\n");
    assert_eq!(redmux.stop(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_rejected_and_the_old_config_stays() {
    let redis = RedisServer::start();
    let rest = format!("{}{}", upstream(&redis), auth(P1));
    let mut redmux = RedmuxProcess::start("", &rest);
    let mut a = redmux.raw().await;
    assert_eq!(a.call(&["AUTH", P1]).await, OK);
    let bad = [
        // A TOML syntax error: an unterminated string, on line 7 (lines 1-2 are [server] and
        // its listen). The error must not quote the line: it holds a password.
        (
            format!(
                "max_clients = 5\n{}[auth]\npassword = \"{P2}\n",
                upstream(&redis)
            ),
            vec!["redmux.toml:7:", "invalid basic string"],
        ),
        // An unknown key, on line 3.
        (
            format!("max_clientz = 5\n{}{}", upstream(&redis), auth(P2)),
            vec![
                "redmux.toml:3:1: unknown field `max_clientz`",
                "in `server`",
            ],
        ),
        // A bad value, on line 3.
        (
            format!("max_bulk_len = \"lots\"\n{}{}", upstream(&redis), auth(P2)),
            vec![
                "redmux.toml:3:",
                "\"lots\" is not a size",
                "`server.max_bulk_len`",
            ],
        ),
        // A value that fails validation, on line 3.
        (
            format!("max_pipeline = 0\n{}{}", upstream(&redis), auth(P2)),
            vec!["redmux.toml:3: server.max_pipeline: must be at least 1"],
        ),
    ];
    for (round, (server, expected)) in bad.iter().enumerate() {
        redmux.reload(server, "");
        let logs = redmux.wait_for_log("reload failed", round + 1);
        let line = logs
            .lines()
            .filter(|line| line.contains("reload failed"))
            .nth(round)
            .unwrap();
        assert!(line.contains("ERROR"), "{line}");
        for text in expected {
            assert!(line.contains(text), "{text:?} not in {line}");
        }
        assert!(redmux.is_running());
        assert_eq!(redmux.raw().await.call(&["AUTH", P1]).await, OK);
        assert_eq!(redmux.raw().await.call(&["AUTH", P2]).await, WRONGPASS);
        assert_eq!(a.call(&["PING"]).await, "+PONG\r\n");
    }
    assert!(!redmux.stderr().contains(P2), "a password in the logs");
    // The handler is still there: a good file is taken.
    redmux.reload("", &format!("{}{}", upstream(&redis), auth(P2)));
    wait_for_password(&redmux, P2).await;
    assert_eq!(redmux.stop(), 0);
}

/// A reloaded file with a password where it does not belong is rejected, and the logged error
/// says what is wrong and where, without the value or its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reload_never_logs_a_misplaced_secret() {
    let redmux = RedmuxProcess::start("", "");
    let cases = support::misplaced_secrets();
    for (round, case) in cases.iter().enumerate() {
        redmux.reload_text(case.text);
        let logs = redmux.wait_for_log("reload failed", round + 1);
        let line = logs
            .lines()
            .filter(|line| line.contains("reload failed"))
            .nth(round)
            .unwrap();
        assert!(line.contains("redmux.toml:"), "{line}");
        assert!(line.contains(case.says), "{:?}: {line}", case.text);
        for secret in case.secrets {
            assert!(!logs.contains(secret), "logged {secret:?}:\n{logs}");
        }
    }
    assert_eq!(redmux.raw().await.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(redmux.stop(), 0);
}

/// New clients go to the new upstream; a client connected before keeps its connection to the
/// old one, which closes once that client has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_upstream_for_new_clients_and_the_old_one_drains() {
    let (one, two) = (RedisServer::start(), RedisServer::start());
    let redmux = RedmuxProcess::start("", &upstream(&one));
    let mut old = redmux.raw().await;
    assert_eq!(old.call(&["SET", "before", "1"]).await, OK);
    assert_eq!(direct_get(&one, "before").as_deref(), Some("1"));
    let clients_of = |redis: &RedisServer| -> usize {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut redis.direct())
            .unwrap();
        // Every connection but the one asking.
        list.lines().count() - 1
    };
    // redmux's shared connection: one per serving thread that has had a client.
    let shared = clients_of(&one);
    assert!(
        (1..=support::serving_threads()).contains(&shared),
        "{shared}"
    );

    redmux.reload("", &upstream(&two));
    let deadline = Deadline::new();
    loop {
        let mut new = redmux.raw().await;
        assert_eq!(new.call(&["SET", "probe", "x"]).await, OK);
        if direct_get(&two, "probe").is_some() {
            break;
        }
        deadline.next_try("a new client on the new upstream").await;
    }
    let mut new = redmux.raw().await;
    assert_eq!(new.call(&["SET", "after", "new"]).await, OK);
    assert_eq!(old.call(&["SET", "after", "old"]).await, OK);
    assert_eq!(direct_get(&two, "after").as_deref(), Some("new"));
    assert_eq!(direct_get(&one, "after").as_deref(), Some("old"));
    // Transactions and blocking commands of the old client use the old upstream's pool.
    old.send("MULTI\r\nINCR n\r\nEXEC\r\n").await;
    assert_eq!(old.reply_str().await, OK);
    assert_eq!(old.reply_str().await, "+QUEUED\r\n");
    assert_eq!(old.reply_str().await, "*1\r\n:1\r\n");
    assert_eq!(direct_get(&one, "n").as_deref(), Some("1"));
    assert_eq!(direct_get(&two, "n"), None);
    let logs = redmux.wait_for_log("configuration reloaded", 1);
    assert!(logs.contains("upstream.address"), "{logs}");

    // The old client leaves: its upstream connections close.
    assert!(clients_of(&one) >= 2, "shared and pinned connections");
    drop(old);
    let deadline = Deadline::new();
    while clients_of(&one) > 0 {
        deadline
            .next_try("the old upstream's connections closing")
            .await;
    }
    assert_eq!(new.call(&["GET", "after"]).await, "$3\r\nnew\r\n");
    assert_eq!(redmux.stop(), 0);
}

/// With the embedded upstream, a reload that needs new upstream connections keeps the store:
/// what was written before is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_survives_a_reload() {
    let redmux = RedmuxProcess::start("", "");
    let mut a = redmux.raw().await;
    assert_eq!(a.call(&["SET", "k", "kept"]).await, OK);
    redmux.reload("", "[upstream]\nconnections = 2\n");
    redmux.wait_for_log("new upstream connections", 1);
    assert_eq!(
        redmux.raw().await.call(&["GET", "k"]).await,
        "$4\r\nkept\r\n"
    );
    assert_eq!(a.call(&["GET", "k"]).await, "$4\r\nkept\r\n");
    assert_eq!(redmux.stop(), 0);
}

/// Limits apply to new clients and to those already connected, as CONFIG SET does in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_limits_apply_to_new_and_connected_clients() {
    let redis = RedisServer::start();
    let redmux = RedmuxProcess::start("", &upstream(&redis));
    let mut a = redmux.raw().await;
    let mut b = redmux.raw().await;
    // 2,000,000 bytes: within the default max_bulk_len (512mb), past 1mb.
    let big_bulk = "*2\r\n$4\r\nECHO\r\n$2000000\r\n";
    assert_eq!(a.call(&["PING"]).await, "+PONG\r\n");

    redmux.reload("max_clients = 2\nmax_bulk_len = \"1mb\"", &upstream(&redis));
    let deadline = Deadline::new();
    loop {
        let mut c = redmux.raw().await;
        let _ = c.try_send("PING\r\n").await;
        match c.try_reply().await.map(String::from_utf8) {
            Some(Ok(reply)) if reply == "+PONG\r\n" => {}
            Some(Ok(reply)) => {
                assert_eq!(reply, "-ERR max number of clients reached\r\n");
                break;
            }
            other => panic!("{other:?}"),
        }
        deadline.next_try("max_clients = 2").await;
    }
    // Connected before the reload, and held to the new max_bulk_len.
    b.send(big_bulk).await;
    assert_eq!(
        b.reply_str().await,
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    b.expect_closed().await;
    // A slot is free again; a new client has the new limit too.
    let mut c = redmux.raw().await;
    c.send(big_bulk).await;
    assert_eq!(
        c.reply_str().await,
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    assert_eq!(a.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(redmux.stop(), 0);
}

/// A client idle since before the reload is closed by the new client_idle_timeout: sessions
/// take new settings even when nothing wakes them otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_idle_timeout_closes_clients_already_idle() {
    let redis = RedisServer::start();
    let redmux = RedmuxProcess::start("", &upstream(&redis));
    let mut idle = redmux.raw().await;
    assert_eq!(idle.call(&["PING"]).await, "+PONG\r\n");
    let started = Instant::now();
    redmux.reload("client_idle_timeout = \"200ms\"", &upstream(&redis));
    idle.expect_closed().await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    redmux.wait_for_log("server.client_idle_timeout", 1);
    assert_eq!(redmux.stop(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_log_level_takes_effect_and_the_format_waits_for_a_restart() {
    let redis = RedisServer::start();
    let log =
        |level: &str, format: &str| format!("[log]\nlevel = \"{level}\"\nformat = \"{format}\"\n");
    let redmux = RedmuxProcess::start("", &format!("{}{}", upstream(&redis), log("info", "text")));
    assert_eq!(redmux.raw().await.call(&["PING"]).await, "+PONG\r\n");
    assert!(!redmux.stderr().contains("DEBUG"), "{}", redmux.stderr());

    redmux.reload("", &format!("{}{}", upstream(&redis), log("debug", "json")));
    redmux.wait_for_log("configuration reloaded", 1);
    // Client connects are logged at debug.
    let deadline = Deadline::new();
    loop {
        let mut raw = redmux.raw().await;
        assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
        let logs = redmux.stderr();
        if logs
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("connected"))
        {
            break;
        }
        deadline.next_try("debug logs").await;
    }
    let logs = redmux.stderr();
    let warning = logs
        .lines()
        .find(|line| line.contains("need a restart"))
        .unwrap_or_else(|| panic!("no restart warning in:\n{logs}"));
    assert!(
        warning.contains("WARN") && warning.contains("log.format"),
        "{warning}"
    );
    assert!(!logs.lines().any(|l| l.starts_with('{')), "{logs}");

    // And back.
    redmux.reload("", &format!("{}{}", upstream(&redis), log("info", "text")));
    redmux.wait_for_log("configuration reloaded", 2);
    // The filter is switched before anything else runs (one thread): no new debug lines.
    let before = redmux.stderr().matches("DEBUG").count();
    assert_eq!(redmux.raw().await.call(&["PING"]).await, "+PONG\r\n");
    assert_eq!(redmux.stderr().matches("DEBUG").count(), before);
    assert_eq!(redmux.stop(), 0);
}

/// The listeners are bound once: a new `listen` is a warning, and the old one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_listen_address_needs_a_restart() {
    let redis = RedisServer::start();
    let redmux = RedmuxProcess::start("", &format!("{}{}", upstream(&redis), auth(P1)));
    let other = support::free_port();
    redmux.reload_text(&format!(
        "[server]\nlisten = \"127.0.0.1:{other}\"\n{}{}",
        upstream(&redis),
        auth(P2)
    ));
    // What can change does.
    wait_for_password(&redmux, P2).await;
    let logs = redmux.wait_for_log("need a restart", 1);
    assert!(logs.contains("server.listen"), "{logs}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", other)).is_err());
    assert_eq!(redmux.stop(), 0);
}

/// Command-line flags win over the file on reload as at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_flags_still_win_after_a_reload() {
    let (flag, file) = (RedisServer::start(), RedisServer::start());
    let redmux = RedmuxProcess::start_args(
        "",
        &format!("{}{}", upstream(&file), auth(P1)),
        &["--upstream", &flag.addr()],
    );
    redmux.reload("", &format!("{}{}", upstream(&file), auth(P2)));
    wait_for_password(&redmux, P2).await;
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["AUTH", P2]).await, OK);
    assert_eq!(raw.call(&["SET", "where", "flag"]).await, OK);
    assert_eq!(direct_get(&flag, "where").as_deref(), Some("flag"));
    assert_eq!(direct_get(&file, "where"), None);
    let logs = redmux.wait_for_log("configuration reloaded", 1);
    assert!(!logs.contains("upstream.address"), "{logs}");
    assert_eq!(redmux.stop(), 0);
}

/// Without a config file there is nothing to reload: SIGHUP is logged, not fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_config_file_is_harmless() {
    let port = support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = std::process::Command::new(support::redmux_bin())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("RUST_LOG")
        .stderr(log)
        .spawn()
        .unwrap();
    support::wait_listening(port);
    support::send_signal(child.id(), "HUP");
    let deadline = Deadline::new();
    while !std::fs::read_to_string(dir.path().join("stderr.log"))
        .unwrap()
        .contains("no configuration file")
    {
        deadline.next_try("the SIGHUP warning").await;
    }
    let mut raw = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    assert_eq!(raw.call(&["PING"]).await, "+PONG\r\n");
    assert!(child.try_wait().unwrap().is_none());
    child.kill().unwrap();
    child.wait().unwrap();
}
