//! The redmux binary as a child process, for what only a real process shows: its memory (RSS
//! from `/proc`), its logs on stderr, and its behaviour under its own single-thread runtime.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{free_port, redmux_bin, send_signal, Deadline, Raw, READY_TIMEOUT};

/// A redmux process listening on a free loopback port, killed on drop. Its stderr goes to a
/// file in its own temp dir, so a test can read the logs at any time.
pub(crate) struct RedmuxProcess {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl RedmuxProcess {
    /// Starts redmux with a config file made of `listen` plus `server` (more `[server]` keys,
    /// one per line) and `rest` (further sections: `[upstream]`, `[log]`), and waits until it
    /// accepts connections. `RUST_LOG` is cleared.
    pub(crate) fn start(server: &str, rest: &str) -> RedmuxProcess {
        Self::start_env(server, rest, &[])
    }

    /// As [`RedmuxProcess::start`], with environment variables set for the process.
    pub(crate) fn start_env(server: &str, rest: &str, env: &[(&str, &str)]) -> RedmuxProcess {
        Self::launch(server, rest, env, &[])
    }

    /// As [`RedmuxProcess::start`], with more command-line arguments after `--config FILE`.
    pub(crate) fn start_args(server: &str, rest: &str, args: &[&str]) -> RedmuxProcess {
        Self::launch(server, rest, &[], args)
    }

    fn launch(server: &str, rest: &str, env: &[(&str, &str)], args: &[&str]) -> RedmuxProcess {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let config = dir.path().join("redmux.toml");
            std::fs::write(&config, config_text(port, server, rest)).expect("write config");
            let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
            let child = Command::new(redmux_bin())
                .arg("--config")
                .arg(&config)
                .args(super::test_threads().map(|n| format!("--threads={n}")))
                .args(args)
                .env_remove("RUST_LOG")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start redmux");
            let mut process = RedmuxProcess {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                child,
                dir,
            };
            if process.wait_listening() {
                return process;
            }
            // It exited: most likely the port was taken meanwhile. Try another.
        }
        panic!("redmux would not start on any free port");
    }

    /// True once this process listens on its port; false if it exited first. A connection
    /// alone does not tell: another test's server may hold the port (free ports are picked
    /// before they are bound), and this redmux then exits on its failed bind. Its own log line
    /// says the port is its own.
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        let own = format!("127.0.0.1:{}", self.addr.port());
        while Instant::now() < deadline {
            if !self.is_running() {
                return false;
            }
            let listening = self
                .stderr()
                .lines()
                .any(|line| line.contains("listening") && line.contains(&own));
            if listening && std::net::TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "redmux did not listen on {} in time; stderr:\n{}",
            self.addr,
            self.stderr()
        );
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory now, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS")
    }

    /// The most resident memory the process has had so far, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM")
    }

    /// Everything redmux has logged so far.
    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.path().join("redmux.toml")
    }

    pub(crate) fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// Rewrites the config file as [`RedmuxProcess::start`] wrote it (same `listen`), with
    /// `server` and `rest`, and sends SIGHUP. The reload is not done yet when this returns.
    pub(crate) fn reload(&self, server: &str, rest: &str) {
        self.reload_text(&config_text(self.addr.port(), server, rest));
    }

    /// Replaces the config file with `text` and sends SIGHUP.
    pub(crate) fn reload_text(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("rewrite config");
        self.signal("HUP");
    }

    /// Waits until the logs hold `needle` at least `count` times, and returns them.
    pub(crate) fn wait_for_log(&self, needle: &str, count: usize) -> String {
        let deadline = Deadline::new();
        loop {
            let logs = self.stderr();
            if logs.matches(needle).count() >= count {
                return logs;
            }
            deadline.next_try_blocking(format!("no {needle:?} (x{count}) in the logs:\n{logs}"));
        }
    }

    pub(crate) async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// SIGTERM, then the exit code (within 10 s).
    pub(crate) fn stop(mut self) -> i32 {
        self.signal("TERM");
        let deadline = Deadline::new();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            deadline.next_try_blocking("redmux did not exit after SIGTERM");
        }
    }
}

impl Drop for RedmuxProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`...), in KiB.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The config file [`RedmuxProcess`] writes: `listen` on `port`, more `[server]` keys, the rest.
fn config_text(port: u16, server: &str, rest: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{server}\n{rest}\n")
}
