//! Configuration: a TOML file with a default for every key, CLI flags merged over it, validated
//! before anything starts. Every key named here is public interface, documented in the README.
//!
//! Single values are checked while deserializing, so a bad value is reported by `toml` with the
//! line it is on; checks across keys run afterwards and look the line up themselves.
//!
//! No error ever shows a password, wherever it was written: errors give the place (file, line,
//! column) and what is wrong, never the file's line (toml's own `Display` quotes it, and it may
//! be the second line of a multi-line password), and the keys that may hold a password check
//! their value's shape themselves, so a password written as a number is not quoted back either.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

mod address;
mod load;
mod values;

pub use address::{Address, Credentials, Endpoint, Identity};
pub use load::{world_readable_secrets, ConfigError, Exposed};

use self::values::{
    address, addresses, auth_password, auth_section, auth_users, byte_size, duration, file_mode,
    listen_addresses, log_level, optional_address, upstream_password, upstream_section,
    user_password,
};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(deserialize_with = "upstream_section")]
    pub upstream: UpstreamConfig,
    #[serde(deserialize_with = "auth_section")]
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub cache: CacheConfig,
}

/// `[cache]`: the near cache, off unless `enabled`. Replies to hot reads are kept in redmux
/// and served without a round trip, dropped when Redis says their key changed (docs/cache.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub enabled: bool,
    /// A hard bound on what the entries cost, their bookkeeping included.
    #[serde(deserialize_with = "byte_size")]
    pub max_memory: u64,
    /// The longest an entry is served, even if Redis never says its key changed (a key whose
    /// expiry Redis has not acted on yet).
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// Cache only keys that start with one of these; empty: every key.
    pub prefixes: Vec<String>,
    /// `"tinylfu"` or `"lru"`.
    pub eviction: Eviction,
}

/// How the near cache chooses what stays when it is full (`cache.eviction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Eviction {
    /// Least recently used goes, and a new entry gets in only if it was asked for more often
    /// lately than the one it would push out.
    Tinylfu,
    /// Least recently used goes.
    Lru,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            max_memory: 64 * 1024 * 1024,
            max_ttl: Duration::from_secs(60),
            prefixes: Vec::new(),
            eviction: Eviction::Tinylfu,
        }
    }
}

/// `[metrics]`: the admin HTTP endpoint (`/metrics`, `/health`, `/status`). Off unless
/// `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(deserialize_with = "optional_address")]
    pub listen: Option<SocketAddr>,
}

/// `[auth]`: what clients must present, as Redis's `requirepass` and ACL users. Each password
/// may be given in the file, or read from an environment variable or a file instead.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The `default` user's password; when set, clients must AUTH first.
    #[serde(deserialize_with = "auth_password")]
    pub password: Option<Secret>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `[[auth.users]]`: named users, for `AUTH user password`.
    #[serde(deserialize_with = "auth_users")]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(deserialize_with = "user_password")]
    pub password: Option<Secret>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl AuthConfig {
    /// Reads the passwords given by environment variable or file into `password`. The error
    /// names the key.
    pub fn resolve(&mut self) -> Result<(), (&'static str, String)> {
        self.password = secret(
            self.password.take(),
            self.password_env.as_deref(),
            self.password_file.as_deref(),
        )
        .map_err(|message| ("auth.password", message))?;
        for user in &mut self.users {
            if user.name.is_empty() || user.name.contains(char::is_whitespace) {
                return Err((
                    "auth.users.name",
                    format!("{:?} is not a user name", user.name),
                ));
            }
            user.password = secret(
                user.password.take(),
                user.password_env.as_deref(),
                user.password_file.as_deref(),
            )
            .map_err(|message| {
                (
                    "auth.users.password",
                    format!("user {}: {message}", user.name),
                )
            })?;
            if user.password.is_none() {
                return Err((
                    "auth.users.password",
                    format!("user {} has no password", user.name),
                ));
            }
        }
        Ok(())
    }
}

/// One password from exactly one of: the value, an environment variable, a file (its content
/// without the trailing newline).
pub(super) fn secret(
    value: Option<Secret>,
    env: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<Secret>, String> {
    match (value, env, file) {
        (value, None, None) => Ok(value),
        (None, Some(name), None) => std::env::var(name)
            .map(|v| Some(Secret::new(v)))
            .map_err(|_| format!("environment variable {name} is not set")),
        (None, None, Some(path)) => std::fs::read_to_string(path)
            .map(|v| Some(Secret::new(v.trim_end_matches(['\r', '\n']))))
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
        _ => Err("give one of password, password_env, password_file".into()),
    }
}

/// `[server]`: the client-facing side.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP addresses to accept clients on: a string or a list of strings.
    #[serde(deserialize_with = "listen_addresses")]
    pub listen: Vec<SocketAddr>,
    /// A unix socket to accept clients on as well.
    pub unix_socket: Option<PathBuf>,
    /// Permissions of the unix socket file, in octal.
    #[serde(deserialize_with = "file_mode")]
    pub unix_socket_mode: u32,
    /// Clients beyond this get `-ERR max number of clients reached` and are closed.
    pub max_clients: usize,
    /// Requests in flight per client; past it redmux stops reading from that client.
    pub max_pipeline: usize,
    /// Longest bulk argument accepted (Redis's `proto-max-bulk-len`).
    #[serde(deserialize_with = "byte_size")]
    pub max_bulk_len: u64,
    /// Most arguments in one request.
    pub max_multibulk_len: u64,
    /// Most unparsed bytes buffered for one client (Redis's `client-query-buffer-limit`); past
    /// it the client is closed.
    #[serde(deserialize_with = "byte_size")]
    pub client_query_limit: u64,
    /// Most reply bytes waiting for one client to read them (Redis's
    /// `client-output-buffer-limit`); past it the client is closed.
    #[serde(deserialize_with = "byte_size")]
    pub client_output_limit: u64,
    /// Close clients idle this long; 0 = never.
    #[serde(deserialize_with = "duration")]
    pub client_idle_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// `[server.tls]`: TLS listeners, besides the plain ones.
    pub tls: Option<ServerTlsConfig>,
    /// Threads that serve clients: a number, or `"auto"`.
    #[serde(deserialize_with = "threads")]
    pub threads: Threads,
    /// Most keys the CLIENT TRACKING table remembers for clients' reads (Redis's
    /// `tracking-table-max-keys`); past it a key is evicted and its readers get its
    /// invalidation. 0: no limit.
    pub tracking_table_max_keys: usize,
}

/// How many threads serve clients (`server.threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// One on a machine of one or two cores (a second thread there only takes a core from
    /// Redis and the clients), else one per core redmux may run on.
    #[default]
    Auto,
    Count(std::num::NonZeroUsize),
}

impl Threads {
    /// The number of threads this stands for on this machine.
    pub fn count(self) -> usize {
        match self {
            Threads::Count(n) => n.get(),
            Threads::Auto => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                if cores <= 2 {
                    1
                } else {
                    cores
                }
            }
        }
    }
}

impl std::str::FromStr for Threads {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(Threads::Auto);
        }
        text.parse()
            .map(Threads::Count)
            .map_err(|_| format!("{text:?} is not a number of threads (1 or more) or \"auto\""))
    }
}

fn threads<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Threads, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    let text = match Raw::deserialize(deserializer)? {
        Raw::Number(n) => n.to_string(),
        Raw::Text(text) => text,
    };
    text.parse().map_err(serde::de::Error::custom)
}

/// `[server.tls]`: clients that connect to these addresses speak TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// TLS addresses: a string or a list of strings, as `server.listen`.
    #[serde(deserialize_with = "listen_addresses")]
    pub listen: Vec<SocketAddr>,
    /// The server's certificate chain (PEM), leaf first.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM): when set, clients must present a certificate signed by one.
    pub ca_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 6380))],
            unix_socket: None,
            unix_socket_mode: 0o660,
            max_clients: 10_000,
            max_pipeline: 1024,
            max_bulk_len: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            client_query_limit: 1024 * 1024 * 1024,
            client_output_limit: 64 * 1024 * 1024,
            client_idle_timeout: Duration::ZERO,
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            threads: Threads::Auto,
            tracking_table_max_keys: 1_000_000,
        }
    }
}

/// `[upstream]`: the Redis server behind redmux.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `redis://[user:pass@]host:port[/db]`, `host:port`, `unix:///path` or `embedded`.
    #[serde(deserialize_with = "address")]
    pub address: Endpoint,
    /// Upstream connections (actors); each client is assigned to one.
    pub connections: usize,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    pub username: Option<String>,
    /// Sent as AUTH; may come from `password_env` or `password_file` instead, as in `[auth]`.
    #[serde(deserialize_with = "upstream_password")]
    pub password: Option<Secret>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    pub db: Option<u32>,
    /// Databases the upstream has (Redis's `databases`): SELECT beyond is refused as Redis does.
    pub databases: u32,
    /// Pinned connections (transactions, blocking commands) at once.
    pub max_pinned: usize,
    /// Shared connection targets (distinct db and protocol pairs) at once.
    pub max_shared: usize,
    /// Let clients use MONITOR (each gets a connection of its own, from the pinned slots).
    pub allow_monitor: bool,
    /// `[upstream.tls]`: how to talk TLS to a `rediss://` upstream.
    pub tls: Option<UpstreamTlsConfig>,
    /// Seed nodes of a Redis Cluster, in any form `address` takes (`rediss://` for TLS). When
    /// set it replaces `address`: redmux reads the slot map from them and presents the
    /// cluster to its clients as one Redis.
    #[serde(deserialize_with = "addresses")]
    pub cluster: Vec<Endpoint>,
    /// How often the slot map is read again when nothing (a MOVED, a lost node) asked for it.
    #[serde(deserialize_with = "duration")]
    pub cluster_refresh_interval: Duration,
}

/// `[upstream.tls]`. Without it a `rediss://` upstream is checked against the system's CA
/// certificates, as `redis-cli --tls` without `--cacert` does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA certificates (PEM) the upstream's certificate must chain to, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM), for a Redis with `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file` (PEM).
    pub key_file: Option<PathBuf>,
    /// The name the upstream's certificate must carry (a DNS name or an IP address); the
    /// address's host by default.
    pub server_name: Option<String>,
    /// Accept any certificate from the upstream. Only for testing: anyone on the path can then
    /// read and change the traffic.
    pub insecure_skip_verify: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            address: Endpoint::from(Address::Embedded),
            connections: 1,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            db: None,
            databases: 16,
            max_pinned: 64,
            max_shared: 32,
            allow_monitor: true,
            tls: None,
            cluster: Vec::new(),
            cluster_refresh_interval: Duration::from_secs(30),
        }
    }
}

impl UpstreamConfig {
    /// Where to connect and how to log in: the `username`, `password` and `db` keys win over
    /// the same parts of a `redis://` address.
    /// For a cluster, the first seed's address stands in for `address`.
    pub fn endpoint(&self) -> Endpoint {
        let mut endpoint = self.cluster.first().unwrap_or(&self.address).clone();
        if let Some(user) = &self.username {
            endpoint.username = Some(user.clone());
        }
        if let Some(password) = &self.password {
            endpoint.password = Some(password.clone());
        }
        if let Some(db) = self.db {
            endpoint.db = db;
        }
        endpoint
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `redmux=debug,warn`...); `RUST_LOG` overrides it.
    #[serde(deserialize_with = "log_level")]
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A password: kept out of `Debug` output and logs. Not `Deserialize`: each key that holds one
/// reads it with [`checked`], so a value of the wrong type is never quoted in an error.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Values given on the command line; each replaces the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub upstream: Option<String>,
    /// `--upstream-cluster host:port[,host:port...]`: replaces `upstream.cluster` (and
    /// `upstream.address`).
    pub upstream_cluster: Option<String>,
    pub log_level: Option<String>,
    pub threads: Option<String>,
    /// `--cache`: sets `cache.enabled`.
    pub cache: bool,
}

#[cfg(test)]
mod tests {
    use super::{
        values::{parse_duration, parse_size},
        *,
    };

    fn load_text(text: &str, overrides: &Overrides) -> Result<Config, String> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        Config::load(Some(file.path()), overrides).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(
            config.server.listen,
            vec!["127.0.0.1:6380".parse().unwrap()]
        );
        assert_eq!(config.server.max_pipeline, 1024);
        assert_eq!(config.server.max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(config.upstream.address.address, Address::Embedded);
        assert_eq!(config.upstream.request_timeout, Duration::from_secs(5));
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(
            config.metrics.listen, None,
            "no metrics endpoint by default"
        );
    }

    #[test]
    fn every_key_parses() {
        let config = load_text(
            r#"
            [server]
            listen = ["127.0.0.1:7000", "[::1]:7000"]
            unix_socket = "/tmp/redmux.sock"
            unix_socket_mode = "0600"
            max_clients = 5
            max_pipeline = 16
            max_bulk_len = "2mb"
            max_multibulk_len = 100
            client_query_limit = 1048576
            client_output_limit = "8mb"
            client_idle_timeout = "30s"
            shutdown_grace = "500ms"
            [upstream]
            address = "redis://u:p%40ss@127.0.0.1:7001/3"
            connections = 2
            connect_timeout = "2s"
            request_timeout = "1m"
            [log]
            level = "debug"
            format = "json"
            [metrics]
            listen = "127.0.0.1:9480"
            "#,
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.server.listen.len(), 2);
        assert_eq!(config.server.unix_socket_mode, 0o600);
        assert_eq!(config.server.max_bulk_len, 2 * 1024 * 1024);
        assert_eq!(config.server.client_idle_timeout, Duration::from_secs(30));
        assert_eq!(config.upstream.request_timeout, Duration::from_secs(60));
        let endpoint = config.upstream.endpoint();
        assert_eq!(endpoint.username.as_deref(), Some("u"));
        assert_eq!(endpoint.password, Some(Secret::new("p@ss")));
        assert_eq!(endpoint.db, 3);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9480".parse().unwrap())
        );
        assert!(config.summary().contains("metrics: listen 127.0.0.1:9480"));
        let err = load_text("[metrics]\nlisten = \"9480\"\n", &Overrides::default()).unwrap_err();
        assert!(
            err.contains(":2:") && err.contains("\"9480\" is not an address"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_file_key_and_line() {
        let err = load_text(
            "[server]\nmax_pipeline = 8\nlisten = \"nope\"\n",
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.contains(":3:")
                && err.contains("listen")
                && err.contains("\"nope\" is not an address"),
            "{err}"
        );
        let err = load_text("[server]\nbogus = 1\n", &Overrides::default()).unwrap_err();
        assert!(err.contains(":2:1: unknown field `bogus`"), "{err}");
        let err = load_text(
            "[upstream]\nrequest_timeout = \"5 parsecs\"\n",
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.contains(":2:") && err.contains("not a duration"),
            "{err}"
        );
        let err =
            load_text("[server]\nmax_bulk_len = \"12XB\"\n", &Overrides::default()).unwrap_err();
        assert!(err.contains("not a size"), "{err}");
        let err = load_text("[log]\nformat = \"xml\"\n", &Overrides::default()).unwrap_err();
        assert!(err.contains(":2:") && err.contains("xml"), "{err}");
        let err = load_text("\n[server]\n\nmax_pipeline = 0\n", &Overrides::default()).unwrap_err();
        assert!(
            err.ends_with(":4: server.max_pipeline: must be at least 1"),
            "{err}"
        );
        let err = load_text("[upstream]\npassword = \"x\"\n", &Overrides::default()).unwrap_err();
        assert!(
            err.ends_with(":2: upstream.password: the embedded upstream has no password"),
            "{err}"
        );
        let err = load_text(
            "[upstream]\naddress = \"127.0.0.1:1\"\npassword = \"x\"\npassword_env = \"Y\"\n",
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.ends_with("upstream.password: give one of password, password_env, password_file"),
            "{err}"
        );
        let err = load_text(
            "[upstream]\naddress = \"127.0.0.1:1\"\npassword_env = \"REDMUX_UNSET_VARIABLE\"\n",
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.ends_with(
                "upstream.password: environment variable REDMUX_UNSET_VARIABLE is not set"
            ),
            "{err}"
        );
    }

    #[test]
    fn errors_never_quote_the_file() {
        let overrides = Overrides::default();
        let unterminated = "[upstream]\naddress = \"127.0.0.1:7000\"\npassword = \"hunter2\n";
        let file = tempfile::NamedTempFile::new().unwrap();
        let name = file.path().display().to_string();
        std::fs::write(file.path(), unterminated).unwrap();
        let error = Config::load(Some(file.path()), &overrides).unwrap_err();
        let shown = error.to_string();
        assert!(
            !shown.contains("hunter2") && !shown.contains('\n'),
            "{shown}"
        );
        assert!(shown.starts_with(&format!("{name}:3:")), "{shown}");
        // Nor does the error it keeps as its cause.
        let cause = std::error::Error::source(&error).unwrap().to_string();
        assert!(!cause.contains("hunter2"), "{cause}");
        // Not even a line without a password: which lines hold one is not known for sure.
        std::fs::write(file.path(), "[server]\nbogus = 1\n").unwrap();
        let shown = Config::load(Some(file.path()), &overrides)
            .unwrap_err()
            .to_string();
        assert_eq!(
            shown,
            format!(
                "{name}:2:1: unknown field `bogus`, expected one of `listen`, `unix_socket`, \
                 `unix_socket_mode`, `max_clients`, `max_pipeline`, `max_bulk_len`, \
                 `max_multibulk_len`, `client_query_limit`, `client_output_limit`, \
                 `client_idle_timeout`, `shutdown_grace`, `tls`, `threads`, \
                 `tracking_table_max_keys`; in `server`"
            )
        );
        std::fs::write(
            file.path(),
            "[upstream]\naddress = \"redis://u:hunter2@h:port\"\n",
        )
        .unwrap();
        let shown = Config::load(Some(file.path()), &overrides)
            .unwrap_err()
            .to_string();
        assert!(
            shown.contains("redis://u:<redacted>@h:port") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    /// A password written as something else than a string, or where a section or a list of
    /// tables belongs, is refused without being quoted; the keys' other errors keep their
    /// place and keys.
    #[test]
    fn a_misplaced_password_is_never_quoted() {
        for (text, says) in [
            (
                "[auth]\npassword = 86753091\n",
                ":2:12: `auth.password` must be a string",
            ),
            (
                "[auth]\npassword = 8675.3091\n",
                ":2:12: `auth.password` must be a string",
            ),
            (
                "[auth]\npassword = true\n",
                ":2:12: `auth.password` must be a string",
            ),
            (
                "[auth]\npassword = [86753091]\n",
                ":2:12: `auth.password` must be a string",
            ),
            (
                "[upstream]\naddress = \"127.0.0.1:1\"\npassword = 86753091\n",
                ":3:12: `upstream.password` must be a string",
            ),
            (
                "[[auth.users]]\nname = \"a\"\npassword = \"ok\"\n\
                 [[auth.users]]\nname = \"b\"\npassword = 86753091\n",
                ":6:12: `auth.users.password` must be a string",
            ),
            (
                "[auth]\nusers = [\"b:86753091\"]\n",
                ":2:10: `auth.users` must be a list of tables",
            ),
            (
                "[auth]\nusers = \"b:86753091\"\n",
                ":2:9: `auth.users` must be a list of tables",
            ),
            ("auth = 86753091\n", ":1:8: `auth` must be a table"),
            (
                "upstream = \"redis://:86753091@h:1\"\n",
                ":1:12: `upstream` must be a table",
            ),
            (
                "[auth]\npasword = \"86753091\"\n",
                ":2:1: unknown field `pasword`, expected one of `password`, `password_env`, \
                 `password_file`, `users`; in `auth`",
            ),
            (
                "[auth]\nusers = [{ name = \"a\", password = \"86753091\", x = 1 }]\n",
                ":2:47: unknown field `x`, expected one of `name`, `password`, \
                 `password_env`, `password_file`; in `auth.users`",
            ),
        ] {
            let shown = load_text(text, &Overrides::default()).unwrap_err();
            assert!(shown.ends_with(says), "{text:?}: {shown}");
            assert!(!shown.contains("86753091"), "{text:?}: {shown}");
        }
        let config = load_text(
            "[auth]\npassword = \"pw\"\n[[auth.users]]\nname = \"a\"\npassword = \"apw\"\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.auth.password, Some(Secret::new("pw")));
        assert_eq!(config.auth.users[0].password, Some(Secret::new("apw")));
    }

    #[test]
    fn changed_keys_names_what_differs() {
        let old = Config::default();
        assert!(old.changed_keys(&old.clone()).is_empty());
        let mut new = old.clone();
        new.server.max_clients = 1;
        new.upstream.address = "127.0.0.1:7000".parse().unwrap();
        new.auth.password = Some(Secret::new("pw"));
        new.log.format = LogFormat::Json;
        new.server.tls = Some(ServerTlsConfig::default());
        new.upstream.tls = Some(UpstreamTlsConfig::default());
        assert_eq!(
            old.changed_keys(&new),
            [
                "server.max_clients",
                "server.tls",
                "upstream.address",
                "upstream.tls",
                "auth.password",
                "log.format"
            ]
        );
    }

    /// The address is quoted escaped (`{:?}`), so a password with `"` or `\` in it must be
    /// hidden in that form too; from the file and from `--upstream` alike.
    #[test]
    fn an_address_error_hides_a_password_that_quoting_escapes() {
        let file = tempfile::NamedTempFile::new().unwrap();
        // The part after the escaped character must not show: not a shorter one, which a
        // random temporary file name in the message could contain.
        for password in [r#"hun"ter2xq"#, r"hun\ter2xq"] {
            let address = format!("redis://u:{password}@h:port");
            std::fs::write(file.path(), format!("[upstream]\naddress = '{address}'\n")).unwrap();
            let error = Config::load(Some(file.path()), &Overrides::default()).unwrap_err();
            let flag = Config::load(
                None,
                &Overrides {
                    upstream: Some(address.clone()),
                    ..Overrides::default()
                },
            )
            .unwrap_err();
            for shown in [error.to_string(), flag.to_string()] {
                assert!(!shown.contains("ter2xq"), "{password}: {shown}");
                assert!(shown.contains("<redacted>"), "{shown}");
            }
        }
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = Overrides {
            listen: vec!["127.0.0.1:9999".into()],
            upstream: Some("127.0.0.1:7777".into()),
            log_level: Some("warn".into()),
            threads: Some("3".into()),
            ..Overrides::default()
        };
        let config = load_text("[server]\nlisten = \"127.0.0.1:1\"\n", &overrides).unwrap();
        assert_eq!(config.server.threads.count(), 3);
        let auto = load_text("[server]\nthreads = \"auto\"\n", &Overrides::default()).unwrap();
        assert_eq!(auto.server.threads, Threads::Auto);
        let four = load_text("[server]\nthreads = 4\n", &Overrides::default()).unwrap();
        assert_eq!(four.server.threads.count(), 4);
        for bad in ["threads = 0", "threads = \"many\"", "threads = -1"] {
            let err = load_text(&format!("[server]\n{bad}\n"), &Overrides::default());
            assert!(err.unwrap_err().to_string().contains("threads"), "{bad}");
        }
        assert_eq!(
            config.server.listen,
            vec!["127.0.0.1:9999".parse().unwrap()]
        );
        assert_eq!(
            config.upstream.address.address.to_string(),
            "127.0.0.1:7777"
        );
        assert_eq!(config.log.level, "warn");
        let bad = Overrides {
            upstream: Some("http://x".into()),
            ..Overrides::default()
        };
        let err = Config::load(None, &bad).unwrap_err().to_string();
        assert!(err.starts_with("--upstream: "), "{err}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MB"), Ok(536_870_912));
        assert_eq!(parse_size("1k"), Ok(1000));
        assert_eq!(parse_size("1kb"), Ok(1024));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("mb").is_err());
        assert!(parse_size("1tb").is_err());
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("366d").is_err());
    }

    #[test]
    fn world_readable_secret_needs_both_a_password_and_mode_o_r() {
        use std::os::unix::fs::PermissionsExt;
        let file = tempfile::NamedTempFile::new().unwrap();
        let check = |text: &str, mode: u32| {
            std::fs::write(file.path(), text).unwrap();
            std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let exposed = world_readable_secrets(file.path(), &Config::parse(text).unwrap());
            match exposed[..] {
                [] => false,
                [Exposed::ConfigFile(ref path)] => path == file.path(),
                _ => panic!("{exposed:?}"),
            }
        };
        let key = "[upstream]\naddress = \"127.0.0.1:7000\"\npassword = \"pw\"\n";
        let url = "[upstream]\naddress = \"redis://:pw@127.0.0.1:7000\"\n";
        let none = "[upstream]\naddress = \"127.0.0.1:7000\"\n";
        assert!(check(key, 0o644));
        assert!(check(url, 0o604));
        assert!(!check(key, 0o640));
        assert!(!check(url, 0o600));
        assert!(!check(none, 0o644));
    }

    #[test]
    fn world_readable_password_files_are_named_with_their_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("redmux.toml");
        let (open, private) = (dir.path().join("open"), dir.path().join("private"));
        for (path, mode) in [(&config, 0o644), (&open, 0o604), (&private, 0o640)] {
            std::fs::write(path, "pw\n").unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let text = format!(
            "[upstream]\naddress = \"127.0.0.1:7000\"\npassword_file = {open:?}\n\
             [auth]\npassword_file = {private:?}\n\
             [[auth.users]]\nname = \"a\"\npassword_file = {open:?}\n"
        );
        let exposed = world_readable_secrets(&config, &Config::parse(&text).unwrap());
        let names: Vec<String> = exposed.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                format!(
                    "password file {} (upstream.password_file) is world-readable",
                    open.display()
                ),
                format!(
                    "password file {} (auth.users.password_file) is world-readable",
                    open.display()
                ),
            ]
        );
    }

    #[test]
    fn a_cluster_replaces_the_address() {
        let config = load_text(
            "[upstream]\ncluster = [\"127.0.0.1:7000\", \"redis://u:p@127.0.0.1:7001\"]\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.upstream.cluster.len(), 2);
        assert_eq!(
            config.upstream.cluster_refresh_interval,
            Duration::from_secs(30)
        );
        assert_eq!(
            config.upstream.endpoint().address.to_string(),
            "127.0.0.1:7000"
        );
        assert!(config
            .summary()
            .contains("cluster, seeds 127.0.0.1:7000, 127.0.0.1:7001"));
        // A login for every node: `address` keeps its default (embedded), which has no users.
        let login =
            "[upstream]\ncluster = [\"127.0.0.1:7000\"]\nusername = \"u\"\npassword = \"p\"\n";
        let config = load_text(login, &Overrides::default()).unwrap();
        assert_eq!(config.upstream.endpoint().username.as_deref(), Some("u"));
        let both = "[upstream]\naddress = \"127.0.0.1:1\"\ncluster = [\"127.0.0.1:7000\"]\n";
        let err = load_text(both, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream.cluster: replaces upstream.address"),
            "{err}"
        );
        for (text, message) in [
            ("[\"redis://127.0.0.1:7000/2\"]", "a cluster has only db 0"),
            (
                "[\"unix:///tmp/x\"]",
                "seed nodes must be host:port addresses",
            ),
            (
                "[\"127.0.0.1:1\", \"rediss://127.0.0.1:2\"]",
                "mixes rediss:// and plain",
            ),
        ] {
            let err = load_text(
                &format!("[upstream]\ncluster = {text}\n"),
                &Overrides::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(message), "{text}: {err}");
        }
        let flag = Overrides {
            upstream_cluster: Some("127.0.0.1:7000, 127.0.0.1:7001".into()),
            ..Overrides::default()
        };
        let config = load_text("[upstream]\naddress = \"127.0.0.1:1\"\n", &flag).unwrap();
        assert_eq!(config.upstream.cluster.len(), 2);
        assert_eq!(config.upstream.address.address, Address::Embedded);
        let empty = Overrides {
            upstream_cluster: Some(",".into()),
            ..Overrides::default()
        };
        assert!(load_text("", &empty).is_err());
    }

    #[test]
    fn the_cache_section_is_read_and_checked() {
        let config = load_text(
            "[upstream]\naddress = \"127.0.0.1:1\"\n[cache]\nenabled = true\nmax_memory = \"16mb\"\n\
             max_ttl = \"5s\"\nprefixes = [\"user:\"]\neviction = \"lru\"\n",
            &Overrides::default(),
        )
        .unwrap();
        let cache = &config.cache;
        assert!(cache.enabled);
        assert_eq!(cache.max_memory, 16 * 1024 * 1024);
        assert_eq!(cache.max_ttl, Duration::from_secs(5));
        assert_eq!(cache.prefixes, ["user:"]);
        assert_eq!(cache.eviction, Eviction::Lru);
        assert!(config.summary().contains("cache: on, max_memory 16777216"));
        let flag = Overrides {
            cache: true,
            upstream: Some("127.0.0.1:1".into()),
            ..Overrides::default()
        };
        let config = load_text("", &flag).unwrap();
        assert_eq!(
            config.cache,
            CacheConfig {
                enabled: true,
                ..CacheConfig::default()
            }
        );
        let redis = "[upstream]\naddress = \"127.0.0.1:1\"\n";
        for (text, message) in [
            (
                "[cache]\nenabled = true\n",
                "the embedded store cannot track keys",
            ),
            (
                "[upstream]\ncluster = [\"127.0.0.1:7000\"]\n[cache]\nenabled = true\n",
                "cache.enabled: the near cache needs a standalone Redis, not a cluster",
            ),
            (
                &format!("{redis}[cache]\nmax_memory = \"1kb\"\n"),
                "cache.max_memory: must be between 1MB and 1TB",
            ),
            (
                &format!("{redis}[cache]\nmax_ttl = \"0s\"\n"),
                "cache.max_ttl: must be more than 0",
            ),
            (
                &format!("{redis}[cache]\nprefixes = [\"\"]\n"),
                "cache.prefixes: an empty prefix",
            ),
            (
                &format!("{redis}[cache]\neviction = \"fifo\"\n"),
                "unknown variant `fifo`",
            ),
        ] {
            let err = load_text(text, &Overrides::default()).unwrap_err();
            assert!(err.contains(message), "{text}: {err}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let config = Config::load(
            None,
            &Overrides {
                upstream: Some("redis://:hunter2@127.0.0.1:1".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!config.summary().contains("hunter2"));
    }
}
