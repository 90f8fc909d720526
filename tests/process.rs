//! The binary as an operator runs it: flags, config checking, signals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use support::{Deadline, Raw, RedisServer};

struct Process(Child);

impl Process {
    fn start(args: &[&str]) -> Process {
        let child = Command::new(support::redmux_bin())
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redmux");
        Process(child)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the exit code, for at most `within`.
    fn exit_code(&mut self, within: Duration) -> i32 {
        let deadline = Deadline::within(within);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status.code().expect("exited normally");
            }
            deadline.next_try_blocking("redmux did not exit");
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(support::redmux_bin())
        .args(args)
        .output()
        .expect("run redmux");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let redis = RedisServer::start();
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut redmux = Process::start(&["--listen", &listen, "--upstream", &redis.addr()]);
    support::wait_listening(port);
    let mut client = Raw::connect(listen.parse().unwrap()).await;
    assert_eq!(client.call(&["PING"]).await, "+PONG\r\n");
    client
        .send("*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n1\r\n")
        .await;
    while support::answers_ping(redis.port, Duration::from_millis(100)) {}
    redmux.signal("TERM");
    // No new clients once shutdown has begun (Redis is still asleep, so the request is still
    // in flight while this is checked).
    let deadline = Deadline::new();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        deadline.next_try_blocking("still accepting after SIGTERM");
    }
    assert_eq!(
        client.reply_str().await,
        "+OK\r\n",
        "the in-flight request finished"
    );
    client.expect_closed().await;
    assert_eq!(redmux.exit_code(Duration::from_secs(5)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_drain() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let file = support::write_file(
        dir.path(),
        "redmux.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"300ms\"\n[upstream]\naddress = \"{}\"\nrequest_timeout = \"30s\"\n",
            redis.addr()
        ),
    );
    let mut redmux = Process::start(&["--config", file.to_str().unwrap()]);
    support::wait_listening(port);
    let mut client = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    client
        .send("*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n5\r\n")
        .await;
    while support::answers_ping(redis.port, Duration::from_millis(100)) {}
    let started = Instant::now();
    redmux.signal("INT");
    assert_eq!(redmux.exit_code(Duration::from_secs(3)), 0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn check_accepts_the_shipped_config_and_prints_a_summary() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/redmux.toml");
    let (code, out, _) = run(&["--check", "--config", shipped]);
    assert_eq!(code, 0);
    assert!(out.contains("configuration OK"), "{out}");
    assert!(out.contains("upstream: embedded"), "{out}");
}

#[test]
fn check_rejects_a_bad_file_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_file(
        dir.path(),
        "bad.toml",
        "[server]\nmax_pipeline = 10\nmax_bulk_len = \"lots\"\n",
    );
    let (code, _, err) = run(&["--check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml:3:16: "), "{err}");
    assert!(err.contains("max_bulk_len"), "{err}");
    let (code, _, err) = run(&["--check", "--config", "/nonexistent/redmux.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
    let (code, _, err) = run(&["--check", "--upstream", "http://h:1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--upstream") && err.contains("expected redis://, rediss://"),
        "{err}"
    );
}

#[test]
fn check_never_prints_passwords() {
    let (code, out, _) = run(&[
        "--check",
        "--upstream",
        "redis://bob:hunter2@127.0.0.1:7000/1",
    ]);
    assert_eq!(code, 0);
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("user bob, password set"), "{out}");
}

#[test]
fn version_flag() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("redmux {}", env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_listen_address_fails_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut redmux = Process::start(&["--listen", &addr]);
    assert_eq!(redmux.exit_code(Duration::from_secs(5)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let file = support::write_file(
        dir.path(),
        "redmux.toml",
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[log]\nformat = \"json\"\n"),
    );
    let child = Command::new(support::redmux_bin())
        .args(["--config", file.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut redmux = Process(child);
    support::wait_listening(port);
    redmux.signal("TERM");
    assert_eq!(redmux.exit_code(Duration::from_secs(5)), 0);
    let mut stderr = String::new();
    std::io::Read::read_to_string(redmux.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 3, "{stderr}");
    for line in lines {
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        assert!(
            line.contains("\"timestamp\":") && line.contains("\"level\":"),
            "{line}"
        );
        assert!(line.contains("\"message\":"), "{line}");
    }
    assert!(
        stderr.contains("in-memory toy store"),
        "the embedded warning is logged"
    );
}

/// The default, and the shipped config file, listen on loopback only.
#[test]
fn listens_on_loopback_by_default() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/redmux.toml");
    for args in [&["--check"][..], &["--check", "--config", shipped]] {
        let (code, out, _) = run(args);
        assert_eq!(code, 0);
        let listen: Vec<&str> = out.lines().filter(|l| l.starts_with("listen:")).collect();
        assert_eq!(listen, ["listen: 127.0.0.1:6380"], "{args:?}: {out}");
    }
}

/// With every log level on (`RUST_LOG=trace`), through a connect, an upstream crash and
/// reconnect, and a rejected password, no password is ever written to the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_logs() {
    const PASSWORD: &str = "pw-Zq8vX3hunter2";
    const WRONG: &str = "wrong-Kd93jLm4";
    let mut redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    for format in ["text", "json"] {
        let log = format!("[log]\nformat = \"{format}\"\n");
        let trace = [("RUST_LOG", "trace")];
        let in_url = support::binary::RedmuxProcess::start_env(
            "",
            &format!(
                "[upstream]\naddress = \"redis://:{PASSWORD}@127.0.0.1:{}/2\"\n\
                 connect_timeout = \"300ms\"\n{log}",
                redis.port
            ),
            &trace,
        );
        let mut raw = in_url.raw().await;
        assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
        tokio::task::block_in_place(|| redis.restart());
        let deadline = Deadline::new();
        while raw.call(&["PING"]).await != "+PONG\r\n" {
            deadline.next_try("no reconnect").await;
        }
        let wrong = support::binary::RedmuxProcess::start_env(
            "",
            &format!(
                "[upstream]\naddress = \"{}\"\npassword = \"{WRONG}\"\n\
                 connect_timeout = \"300ms\"\n{log}",
                redis.addr()
            ),
            &trace,
        );
        let mut raw = wrong.raw().await;
        assert_eq!(
            raw.call(&["PING"]).await,
            "-ERR redmux: upstream unavailable\r\n"
        );
        for (name, process) in [("password in the url", in_url), ("wrong password", wrong)] {
            let logs = process.stderr();
            assert_eq!(process.stop(), 0);
            // redmux has no trace events; debug ones show the filter is wide open.
            assert!(
                logs.contains("DEBUG"),
                "{format} {name}: verbose logs:\n{logs}"
            );
            assert!(logs.contains("upstream"), "{format} {name}:\n{logs}");
            println!("{format} {name}: {} log lines", logs.lines().count());
            for secret in [PASSWORD, WRONG] {
                assert!(!logs.contains(secret), "{format} {name}: logged:\n{logs}");
            }
            // Written to a pipe, not a terminal: no colour codes.
            assert!(
                !logs.contains('\x1b'),
                "{format} {name}: ANSI codes in:\n{logs}"
            );
        }
    }
}

/// A config file that holds a password and that every user can read is warned about, at
/// start and by `--check`; a private one is not.
#[test]
fn world_readable_config_with_a_password_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let file = support::write_file(
        dir.path(),
        "redmux.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\naddress = \"127.0.0.1:{}\"\n\
             password = \"hunter2\"\n",
            support::free_port()
        ),
    );
    let path = file.to_str().unwrap();
    let warning = format!("config file {path} is world-readable and holds a password");
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, _, err) = run(&["--check", "--config", path]);
        assert_eq!(code, 0);
        assert_eq!(
            err.contains(&warning),
            warned,
            "--check, mode {mode:o}: {err}"
        );
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(support::redmux_bin())
            .args(["--config", path])
            .env_remove("RUST_LOG")
            .stderr(log)
            .spawn()
            .unwrap();
        let mut redmux = Process(child);
        support::wait_listening(port);
        redmux.signal("TERM");
        assert_eq!(redmux.exit_code(Duration::from_secs(5)), 0);
        let logs = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
        assert!(logs.contains("listening"), "{logs}");
        assert_eq!(
            logs.contains(&warning),
            warned,
            "start, mode {mode:o}: {logs}"
        );
        assert!(!logs.contains("hunter2"), "{logs}");
    }
}

/// A `password_file` that every user can read is warned about, as a world-readable config file
/// with a password is: by `--check`, at start and on reload. A private one is not, and the
/// config file that names it holds no password itself.
#[test]
fn world_readable_password_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_file(dir.path(), "client-password", "pw-Rt5-secret\n");
    let user = support::write_file(dir.path(), "app-password", "pw-Rt6-secret\n");
    let auth = format!(
        "[auth]\npassword_file = \"{}\"\n[[auth.users]]\nname = \"app\"\npassword_file = \"{}\"\n",
        file.display(),
        user.display()
    );
    let warning = format!(
        "password file {} (auth.password_file) is world-readable",
        file.display()
    );
    let user_warning = format!(
        "password file {} (auth.users.password_file) is world-readable",
        user.display()
    );
    let set_mode = |mode: u32| {
        for path in [&file, &user] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    let config = support::write_file(dir.path(), "redmux.toml", &auth);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        set_mode(mode);
        let (code, _, err) = run(&["--check", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            err.contains(&warning),
            warned,
            "--check, mode {mode:o}: {err}"
        );
        assert_eq!(
            err.contains(&user_warning),
            warned,
            "--check, mode {mode:o}: {err}"
        );
        assert!(!err.contains("config file"), "{err}");
    }
    // At start (private), then on a reload after the file was opened to everyone.
    let redmux = support::binary::RedmuxProcess::start("", &auth);
    let logs = redmux.stderr();
    assert!(!logs.contains("world-readable"), "{logs}");
    set_mode(0o644);
    redmux.reload("", &auth);
    let logs = redmux.wait_for_log(&warning, 1);
    assert!(logs.contains(&user_warning), "{logs}");
    assert!(
        !logs.contains("Rt5-secret") && !logs.contains("Rt6-secret"),
        "{logs}"
    );
    assert_eq!(redmux.stop(), 0);
    let redmux = support::binary::RedmuxProcess::start("", &auth);
    let logs = redmux.wait_for_log(&warning, 1);
    assert!(logs.contains(&user_warning), "{logs}");
    assert!(!logs.contains("config file"), "{logs}");
    assert_eq!(redmux.stop(), 0);
}

/// Runs the binary with `args` and its output captured, for at most 10 s: exit code, stdout,
/// stderr.
fn run_bounded(args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let child = Command::new(support::redmux_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start redmux");
    let code = Process(child).exit_code(Duration::from_secs(10));
    let read = |path| std::fs::read_to_string(path).unwrap();
    (code, read(&out), read(&err))
}

/// A password written where it does not belong is never printed, by `--check` or at start:
/// the error says what is wrong and where, without the value or its line.
#[test]
fn misplaced_secrets_are_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    for case in support::misplaced_secrets() {
        let file = support::write_file(dir.path(), "bad.toml", case.text);
        let path = file.to_str().unwrap();
        for args in [&["--check", "--config", path][..], &["--config", path]] {
            let (code, out, err) = run_bounded(args);
            let shown = format!("{out}{err}");
            assert_eq!(code, 1, "{args:?} {:?}: {shown}", case.text);
            assert!(
                shown.contains(case.says),
                "{args:?} {:?}: {shown}",
                case.text
            );
            assert!(shown.contains(&format!("{path}:")), "{args:?}: {shown}");
            for secret in case.secrets {
                assert!(
                    !shown.contains(secret),
                    "{args:?} printed {secret:?}: {shown}"
                );
            }
        }
    }
}

/// The upstream password may come from the environment or from a file, as `[auth]`'s do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_password_from_the_environment_or_a_file() {
    const PASSWORD: &str = "up-Hq2rT8pass";
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("upstream-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("write password file");
    let upstream = format!("[upstream]\naddress = \"{}\"\n", redis.addr());
    let from_env = support::binary::RedmuxProcess::start_env(
        "",
        &format!("{upstream}password_env = \"REDMUX_TEST_UPSTREAM_PW\"\n"),
        &[("REDMUX_TEST_UPSTREAM_PW", PASSWORD)],
    );
    let from_file = support::binary::RedmuxProcess::start(
        "",
        &format!("{upstream}password_file = \"{}\"\n", file.display()),
    );
    for process in [from_env, from_file] {
        let mut raw = process.raw().await;
        assert_eq!(raw.call(&["SET", "k", "v"]).await, "+OK\r\n");
        assert_eq!(raw.call(&["GET", "k"]).await, "$1\r\nv\r\n");
        assert_eq!(process.stop(), 0);
    }
}
