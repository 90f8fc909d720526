//! Test fixtures: real redis-server processes on free loopback ports, redmux in-process on port
//! 0, and a raw RESP socket for protocol edges. Never port 6379, never a mock.
#![allow(dead_code)] // each test binary uses a different part of this module

pub(crate) mod binary;
pub(crate) mod checker;
pub(crate) mod cluster;
pub(crate) mod tls;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use redmux::{config::Config, resp::ReplyScanner, Proxy};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

/// How long anything in a test may take to become ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause between two looks at another process's state.
const POLL: Duration = Duration::from_millis(5);

/// A bound on waiting for another process (Redis, a redmux binary, the kernel) to reach a state
/// it sends no event for: a loop looks, and calls `next_try` before looking again, which fails
/// the test once the time is up.
pub(crate) struct Deadline {
    at: Instant,
    within: Duration,
}

impl Deadline {
    /// Up to `READY_TIMEOUT` from now.
    pub(crate) fn new() -> Deadline {
        Deadline::within(READY_TIMEOUT)
    }

    pub(crate) fn within(within: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + within,
            within,
        }
    }

    /// Fails the test with `what` if the time is up; otherwise pauses before the next look.
    pub(crate) fn next_try(&self, what: impl std::fmt::Display) -> tokio::time::Sleep {
        self.check(what);
        tokio::time::sleep(POLL)
    }

    /// `next_try` for code that does not run on tokio.
    pub(crate) fn next_try_blocking(&self, what: impl std::fmt::Display) {
        self.check(what);
        std::thread::sleep(POLL);
    }

    /// Fails the test with `what` if the time is up.
    pub(crate) fn check(&self, what: impl std::fmt::Display) {
        assert!(
            Instant::now() < self.at,
            "{what}: not within {:?}",
            self.within
        );
    }
}

/// `REDMUX_TEST_THREADS`: the number of threads every redmux of the tests serves clients on
/// (in-process and binary alike); unset, the default (`auto`, one on two cores). `.ci/run`
/// runs the suite with 1 and with 4.
pub(crate) fn test_threads() -> Option<String> {
    std::env::var("REDMUX_TEST_THREADS")
        .ok()
        .filter(|n| !n.is_empty())
}

/// How many threads serve clients in the tests' redmux (see [`test_threads`]): on the
/// development and CI machines' two cores, `auto` means one.
pub(crate) fn serving_threads() -> usize {
    test_threads().map_or(1, |n| n.parse().expect("REDMUX_TEST_THREADS"))
}

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A redis-server child process, killed on drop.
pub(crate) struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// `port` speaks TLS only (`--port 0 --tls-port port`).
    tls: bool,
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING.
    pub(crate) fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts redis-server with extra `--option value` arguments.
    pub(crate) fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_on(extra, false)
    }

    /// Starts redis-server speaking only TLS, with the test certificates (`--tls-ca-cert-file`
    /// is their CA); `auth_clients`: it requires a client certificate signed by that CA.
    pub(crate) fn start_tls(certs: &tls::Certs, auth_clients: bool) -> RedisServer {
        let file = |path: &Path| path.display().to_string();
        Self::start_on(
            &[
                "--tls-cert-file",
                &file(&certs.server_cert),
                "--tls-key-file",
                &file(&certs.server_key),
                "--tls-ca-cert-file",
                &file(&certs.ca),
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ],
            true,
        )
    }

    fn start_on(extra: &[&str], tls: bool) -> RedisServer {
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                tls,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server would not start on any free port");
    }

    /// The port is fixed: start (again) on it, waiting for readiness.
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let ports = match self.tls {
            true => vec!["--port", "0", "--tls-port", &port],
            false => vec!["--port", &port],
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false; // e.g. the port was taken meanwhile
                }
            }
            // A TLS port is ready once it listens: redis-server listens when it is ready.
            let ready = match self.tls {
                true => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
                false => answers_ping(self.port, Duration::from_secs(1)),
            };
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not become ready", self.port);
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// A direct connection, bypassing redmux, to check what Redis really holds.
    pub(crate) fn direct(&self) -> redis::Connection {
        self.direct_db(0)
    }

    /// Waits until Redis reports `n` blocked clients (`INFO clients`).
    pub(crate) async fn wait_blocked_clients(&self, n: usize) {
        let want = format!("blocked_clients:{n}\r");
        let deadline = Deadline::new();
        let mut direct = self.direct();
        loop {
            let info: String = redis::cmd("INFO")
                .arg("clients")
                .query(&mut direct)
                .unwrap();
            if info.contains(&want) {
                return;
            }
            deadline
                .next_try(format!("never {n} blocked clients:\n{info}"))
                .await;
        }
    }

    /// A direct connection to database `db`.
    pub(crate) fn direct_db(&self, db: u32) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/{db}", self.port))
            .and_then(|c| c.get_connection())
            .expect("direct connection to redis-server")
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub(crate) fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server could not restart on port {}",
            self.port
        );
    }

    pub(crate) fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }
}

/// Sends `signal` (a name such as `STOP`) to process `pid`.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True if a Redis on `port` answers PING within `wait` (+PONG, or -NOAUTH when it has a
/// password: either way it is up and serving).
pub(crate) fn answers_ping(port: u16, wait: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(wait));
    let mut buf = [0u8; 1];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut buf).is_ok()
        && (buf[0] == b'+' || buf[0] == b'-')
}

/// A redmux server running in this process, stopped on drop.
pub(crate) struct Redmux {
    pub addr: SocketAddr,
    /// The first `[server.tls]` address, if any.
    pub tls_addr: Option<SocketAddr>,
    /// The metrics endpoint, when `[metrics] listen` is set.
    pub metrics: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Redmux {
    /// Starts redmux in front of `upstream` (an address string) with default settings.
    pub(crate) async fn start(upstream: &str) -> Redmux {
        Self::start_with(config(upstream)).await
    }

    /// Starts redmux with `config`, listening on a free port, with `REDMUX_TEST_THREADS`
    /// serving threads if that is set.
    pub(crate) async fn start_with(mut config: Config) -> Redmux {
        config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
        if let Some(threads) = test_threads() {
            config.server.threads = threads.parse().expect("REDMUX_TEST_THREADS");
        }
        let server = Proxy::bind(config).await.expect("redmux binds");
        let addr = server.server().local_addrs()[0];
        let tls_addr = server.server().tls_addrs().first().copied();
        let metrics = server.metrics_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Redmux {
            addr,
            tls_addr,
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// A `redis` crate multiplexed connection through redmux.
    pub(crate) async fn client(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.url()).await
    }

    pub(crate) async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Graceful stop, waiting for the server to finish.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Redmux {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A `redis` crate multiplexed connection to `url`.
pub(crate) async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Default config pointed at `upstream`.
pub(crate) fn config(upstream: &str) -> Config {
    let mut config = Config::default();
    config.upstream.address = upstream.parse().expect("upstream address");
    config
}

/// redmux in front of `upstream` with one pinned connection, and a client that holds it (in
/// MULTI): the next that wants one waits `wait` (`connect_timeout`) and gets none.
pub(crate) async fn pinned_pool_held(upstream: &str, wait: Duration) -> (Redmux, Raw) {
    let mut config = config(upstream);
    config.upstream.max_pinned = 1;
    config.upstream.connect_timeout = wait;
    let redmux = Redmux::start_with(config).await;
    let mut holder = redmux.raw().await;
    assert_eq!(holder.call(&["MULTI"]).await, "+OK\r\n");
    (redmux, holder)
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A raw client socket for protocol edges, plain or TLS.
pub(crate) struct Raw {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
    scanner: ReplyScanner,
}

impl Raw {
    pub(crate) async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (reader, writer) = stream.into_split();
        Raw::new(Box::new(reader), Box::new(writer))
    }

    /// Over any stream, a TLS one for example.
    pub(crate) fn over<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> Raw {
        let (reader, writer) = tokio::io::split(stream);
        Raw::new(Box::new(reader), Box::new(writer))
    }

    fn new(reader: Reader, writer: Writer) -> Raw {
        Raw {
            reader,
            writer,
            buf: BytesMut::new(),
            scanner: ReplyScanner::with_push(),
        }
    }

    pub(crate) async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.try_send(bytes).await.expect("send");
    }

    /// Sends, reporting a failure (the server closed the connection) instead of panicking.
    /// Flushed: a TLS stream may hold back what it was given.
    pub(crate) async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        self.writer.write_all(bytes.as_ref()).await?;
        self.writer.flush().await
    }

    /// Writes `bytes` while reading `count` replies, as a pipelining client must (a client that
    /// writes everything before reading can deadlock against any server).
    pub(crate) async fn pipeline(&mut self, bytes: &[u8], count: usize) -> Vec<Vec<u8>> {
        let write = async {
            self.writer.write_all(bytes).await.expect("send");
            self.writer.flush().await.expect("flush");
        };
        let read = async {
            let mut replies = Vec::with_capacity(count);
            while replies.len() < count {
                match Self::next_reply(&mut self.reader, &mut self.buf, &mut self.scanner).await {
                    Some(reply) => replies.push(reply),
                    None => break,
                }
            }
            replies
        };
        let ((), replies) =
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
                .await
                .expect("pipeline finished in time");
        replies
    }

    /// Closes the write side, as a client does when it has nothing more to send.
    pub(crate) async fn shutdown_write(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// Reads one complete reply, as raw bytes (within 10 s).
    pub(crate) async fn reply(&mut self) -> Vec<u8> {
        tokio::time::timeout(READY_TIMEOUT, self.try_reply())
            .await
            .expect("a reply within the timeout")
            .expect("a reply before the connection closed")
    }

    /// One reply, or `None` if the connection closed first.
    pub(crate) async fn try_reply(&mut self) -> Option<Vec<u8>> {
        Self::next_reply(&mut self.reader, &mut self.buf, &mut self.scanner).await
    }

    async fn next_reply(
        reader: &mut Reader,
        buf: &mut BytesMut,
        scanner: &mut ReplyScanner,
    ) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = scanner.next_reply(buf).expect("valid RESP") {
                scanner.consumed(end);
                return Some(buf.split_to(end).to_vec());
            }
            match reader.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads a reply and returns it as a string, for readable assertions.
    pub(crate) async fn reply_str(&mut self) -> String {
        String::from_utf8_lossy(&self.reply().await).into_owned()
    }

    /// Sends a command and returns its reply as a string.
    pub(crate) async fn call(&mut self, args: &[&str]) -> String {
        self.send(redmux::resp::encode_command(
            args.iter().map(|a| a.as_bytes()),
        ))
        .await;
        self.reply_str().await
    }

    /// Asserts the server closes the connection (within 10 s), with nothing more to read.
    pub(crate) async fn expect_closed(&mut self) {
        let next = tokio::time::timeout(READY_TIMEOUT, self.try_reply())
            .await
            .expect("the connection should close");
        assert_eq!(
            next.map(|r| String::from_utf8_lossy(&r).into_owned()),
            None,
            "expected the connection to be closed"
        );
    }
}

/// Path of the redmux binary built for these tests.
pub(crate) fn redmux_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_redmux"))
}

/// Waits until `port` accepts connections (or fails the test after the ready timeout).
pub(crate) fn wait_listening(port: u16) {
    let deadline = Deadline::new();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        deadline.next_try_blocking(format!("nothing listening on port {port}"));
    }
}

pub(crate) fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// A config file with a password where it does not belong: its text, the parts of the
/// password that must never be printed, and what the error must say instead.
pub(crate) struct MisplacedSecret {
    pub text: &'static str,
    pub secrets: &'static [&'static str],
    pub says: &'static str,
}

/// Passwords written the wrong way, each of which toml's own error would quote: as a number
/// (its message names the value), in a multi-line string with a syntax error on its second line
/// (its message quotes that line), or as a string where a table or list of tables belongs. The
/// numbers are longer than a temporary file name's random part, and the other fragments hold a
/// `-`, which it never does: no path in a message can contain them by chance.
pub(crate) fn misplaced_secrets() -> Vec<MisplacedSecret> {
    let case = |text, secrets, says| MisplacedSecret {
        text,
        secrets,
        says,
    };
    vec![
        case(
            "[auth]\npassword = 86753091\n",
            &["86753091"],
            "`auth.password` must be a string",
        ),
        case(
            "[auth]\npassword = 8675.3091\n",
            &["8675.", ".3091"],
            "`auth.password` must be a string",
        ),
        case(
            "[[auth.users]]\nname = \"app\"\npassword = 86753092\n",
            &["86753092"],
            "`auth.users.password` must be a string",
        ),
        case(
            "[upstream]\naddress = \"127.0.0.1:7000\"\npassword = 86753093\n",
            &["86753093"],
            "`upstream.password` must be a string",
        ),
        case(
            "[auth]\npassword = \"\"\"Xq1-first\nZk9-second\\q-tail\"\"\"\n",
            &["Xq1-first", "Zk9-second", "q-tail"],
            ":3:12: missing escaped value",
        ),
        case(
            "[auth]\npassword = \"\"\"Xq1-first\nZk9-second never closed\n",
            &["Xq1-first", "Zk9-second"],
            ":4:1: invalid multi-line basic string",
        ),
        case(
            "[auth]\nusers = [\"app:Zk9-userpw\"]\n",
            &["Zk9-userpw"],
            "`auth.users` must be a list of tables",
        ),
        case(
            "auth = \"Zk9-requirepass\"\n",
            &["Zk9-requirepass"],
            "`auth` must be a table",
        ),
        case(
            "upstream = \"redis://:Zk9-url@127.0.0.1:7000\"\n",
            &["Zk9-url"],
            "`upstream` must be a table",
        ),
    ]
}

/// How many times Redis has run `command` (lower case), from its `INFO commandstats`: what
/// really reached it, whatever redmux answered itself.
pub(crate) fn redis_calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.direct())
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

/// Waits until redmux's near cache serves `client`: a repeated GET of `key` no longer reaches
/// Redis. (The invalidation stream starts at the first cacheable read.)
pub(crate) async fn wait_cache_serving(redis: &RedisServer, client: &mut Raw, key: &str) {
    let deadline = Deadline::new();
    loop {
        client.call(&["GET", key]).await;
        let before = redis_calls(redis, "get");
        client.call(&["GET", key]).await;
        if redis_calls(redis, "get") == before {
            return;
        }
        deadline.next_try("the near cache serving").await;
    }
}

/// The body of `GET path` from redmux's HTTP endpoint at `addr`.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send the request");
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .expect("read the response");
    body.split_once("\r\n\r\n")
        .expect("a head and a body")
        .1
        .to_owned()
}
