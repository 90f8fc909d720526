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
    marker::PhantomData,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, Deserialize, Deserializer};

mod address;

pub use address::{Address, Credentials, Endpoint, Identity};

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
fn secret(
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A TOML error, shown as its place and message. toml's own `Display` would quote the line,
    /// so `source` is kept without the file's text (see [`Config::parse`]).
    #[error("{path}{}: {}", place(.at), toml_message(.source))]
    Parse {
        path: String,
        /// Boxed: with its place beside it, it would make every `Result` here large.
        source: Box<toml::de::Error>,
        /// Line and column (1-based) of the error, when toml gives its place.
        at: Option<(usize, usize)>,
    },
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("{location}{key}: {message}")]
    Invalid {
        /// `file:line: ` when the key is in the file, empty otherwise.
        location: String,
        key: &'static str,
        message: String,
    },
}

/// `:line:column`, or nothing.
fn place(at: &Option<(usize, usize)>) -> String {
    at.map_or_else(String::new, |(line, column)| format!(":{line}:{column}"))
}

/// A toml error on one line: its message, then the keys it is in (`; in `server.listen``),
/// unless the message names them already.
fn toml_message(error: &toml::de::Error) -> String {
    // Without its input, toml shows the message, then `in `keys`` on a line of its own.
    let shown = error.to_string();
    let message = error.message().trim();
    let keys = shown
        .trim_end()
        .rsplit_once('\n')
        .and_then(|(_, last)| last.strip_prefix("in "));
    match keys {
        Some(keys) if message.contains(keys) => message.replace('\n', "; "),
        _ => shown.trim_end().replace('\n', "; "),
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

impl Config {
    /// Loads `path` (or the defaults), applies the command-line overrides, and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::load_checked(path, overrides, |_| Ok(()))
    }

    /// [`Config::load`], then `check`, which reads what the values name (the TLS files, see
    /// `tls::check`): its refusal names the key, and the file's line as every other does. Plain
    /// data here, so what reads the files is the caller's.
    pub fn load_checked(
        path: Option<&Path>,
        overrides: &Overrides,
        check: impl FnOnce(&Config) -> Result<(), (&'static str, String)>,
    ) -> Result<Config, ConfigError> {
        let (mut config, source) = match path {
            None => (Config::default(), None),
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: name.clone(),
                    source,
                })?;
                let config = Config::parse(&text).map_err(|source| ConfigError::Parse {
                    path: name.clone(),
                    at: source.span().map(|span| line_and_column(&text, span.start)),
                    source: Box::new(source),
                })?;
                (config, Some((name, text)))
            }
        };
        config.apply(overrides)?;
        let upstream = &mut config.upstream;
        upstream.password = secret(
            upstream.password.take(),
            upstream.password_env.as_deref(),
            upstream.password_file.as_deref(),
        )
        .map_err(|message| ConfigError::Invalid {
            location: String::new(),
            key: "upstream.password",
            message,
        })?;
        let source = source
            .as_ref()
            .map(|(name, text)| (name.as_str(), text.as_str()));
        config.validate(source)?;
        if let Err((key, message)) = check(&config) {
            return Err(ConfigError::Invalid {
                location: located(source, key),
                key,
                message,
            });
        }
        config
            .auth
            .resolve()
            .map_err(|(key, message)| ConfigError::Invalid {
                location: String::new(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Parses TOML text; single values are validated here. The error does not hold `text`:
    /// toml's `Display` would quote the offending line, and that line may hold a password.
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text).map_err(|mut error: toml::de::Error| {
            error.set_input(None);
            error
        })
    }

    fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        if !overrides.listen.is_empty() {
            self.server.listen = overrides
                .listen
                .iter()
                .map(|addr| parse_listen(addr))
                .collect::<Result<_, _>>()
                .map_err(|message| ConfigError::Flag {
                    flag: "--listen",
                    message,
                })?;
        }
        if let Some(upstream) = &overrides.upstream {
            self.upstream.address =
                upstream
                    .parse()
                    .map_err(|message: String| ConfigError::Flag {
                        flag: "--upstream",
                        message: without_password(upstream, message),
                    })?;
            self.upstream.cluster.clear();
        }
        if let Some(seeds) = &overrides.upstream_cluster {
            self.upstream.cluster = seeds
                .split(',')
                .map(str::trim)
                .filter(|seed| !seed.is_empty())
                .map(|seed| {
                    seed.parse().map_err(|message: String| ConfigError::Flag {
                        flag: "--upstream-cluster",
                        message: without_password(seed, message),
                    })
                })
                .collect::<Result<_, _>>()?;
            if self.upstream.cluster.is_empty() {
                return Err(ConfigError::Flag {
                    flag: "--upstream-cluster",
                    message: "no seed node given".into(),
                });
            }
            self.upstream.address = Endpoint::from(Address::Embedded);
        }
        if let Some(threads) = &overrides.threads {
            self.server.threads = threads.parse().map_err(|message| ConfigError::Flag {
                flag: "--threads",
                message,
            })?;
        }
        if let Some(level) = &overrides.log_level {
            check_log_level(level).map_err(|message| ConfigError::Flag {
                flag: "--log-level",
                message,
            })?;
            self.log.level = level.clone();
        }
        Ok(())
    }

    /// Checks that involve more than one key. `source` is the file's name and text, to point
    /// at the offending line.
    fn validate(&self, source: Option<(&str, &str)>) -> Result<(), ConfigError> {
        let fail = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                location: located(source, key),
                key,
                message: message.to_owned(),
            })
        };
        let server = &self.server;
        let upstream = &self.upstream;
        if server.listen.is_empty() && server.unix_socket.is_none() {
            return fail(
                "server.listen",
                "no address to listen on (and no server.unix_socket)",
            );
        }
        for (key, value) in [
            ("server.max_clients", server.max_clients),
            ("server.max_pipeline", server.max_pipeline),
            ("upstream.connections", upstream.connections),
            ("upstream.max_pinned", upstream.max_pinned),
            ("upstream.max_shared", upstream.max_shared),
            ("upstream.databases", upstream.databases as usize),
        ] {
            if value == 0 {
                return fail(key, "must be at least 1");
            }
        }
        if server.max_multibulk_len == 0 {
            return fail("server.max_multibulk_len", "must be at least 1");
        }
        if server.max_bulk_len < 1024 * 1024 {
            return fail("server.max_bulk_len", "must be at least 1MB, as in Redis");
        }
        for (key, value) in [
            ("upstream.connect_timeout", upstream.connect_timeout),
            ("upstream.request_timeout", upstream.request_timeout),
        ] {
            if value.is_zero() {
                return fail(key, "must be more than 0");
            }
        }
        if !upstream.cluster.is_empty() {
            if upstream.address.address != Address::Embedded {
                return fail(
                    "upstream.cluster",
                    "replaces upstream.address: give only one of them",
                );
            }
            let tls = matches!(upstream.cluster[0].address, Address::Tcp { tls: true, .. });
            for seed in &upstream.cluster {
                match seed.address {
                    Address::Tcp { tls: seed_tls, .. } if seed_tls == tls => {}
                    Address::Tcp { .. } => {
                        return fail(
                            "upstream.cluster",
                            "mixes rediss:// and plain seeds: TLS applies to every node",
                        )
                    }
                    _ => return fail("upstream.cluster", "seed nodes must be host:port addresses"),
                }
                if seed.db != 0 {
                    return fail("upstream.cluster", "a cluster has only db 0");
                }
            }
            if upstream.endpoint().db != 0 {
                return fail("upstream.db", "a cluster has only db 0");
            }
            if upstream.cluster_refresh_interval.is_zero() {
                return fail("upstream.cluster_refresh_interval", "must be more than 0");
            }
        }
        if upstream.endpoint().db >= upstream.databases {
            return fail("upstream.db", "must be below upstream.databases");
        }
        if upstream.address.address == Address::Embedded {
            let endpoint = upstream.endpoint();
            if endpoint.username.is_some() {
                return fail("upstream.username", "the embedded upstream has no users");
            }
            if endpoint.password.is_some() {
                return fail("upstream.password", "the embedded upstream has no password");
            }
            if endpoint.db != 0 {
                return fail("upstream.db", "the embedded upstream has only db 0");
            }
        }
        if server.tls.as_ref().is_some_and(|tls| tls.listen.is_empty()) {
            return fail("server.tls.listen", "no address to listen on");
        }
        let rediss = matches!(upstream.endpoint().address, Address::Tcp { tls: true, .. });
        if upstream.tls.is_some() && !rediss {
            return fail(
                "upstream.tls",
                "set, but upstream.address is not a rediss:// address",
            );
        }
        Ok(())
    }

    /// The keys whose values differ in `new`, by name only: some values are passwords. Passwords
    /// are compared as read (from the file, the environment or a password file). Every key
    /// belongs here, or a reload that changes only it is taken for no change at all.
    pub fn changed_keys(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        // A key's name is its field's: serde reads the file by those names.
        macro_rules! compare {
            ($section:ident: $($key:ident),+) => {
                $(
                    if self.$section.$key != new.$section.$key {
                        keys.push(concat!(stringify!($section), ".", stringify!($key)));
                    }
                )+
            };
        }
        compare!(server: listen, unix_socket, unix_socket_mode, max_clients, max_pipeline,
            max_bulk_len, max_multibulk_len, client_query_limit, client_output_limit,
            client_idle_timeout, shutdown_grace, tls, threads);
        compare!(upstream: address, connections, connect_timeout, request_timeout, username,
            password, db, databases, max_pinned, max_shared, allow_monitor, tls, cluster,
            cluster_refresh_interval);
        compare!(auth: password, users);
        compare!(log: level, format);
        compare!(metrics: listen);
        keys
    }

    /// A human summary for `--check`, passwords redacted.
    pub fn summary(&self) -> String {
        let endpoint = self.upstream.endpoint();
        let listen: Vec<String> = self.server.listen.iter().map(ToString::to_string).collect();
        let mut out = format!("listen: {}\n", listen.join(", "));
        let threads = self.server.threads;
        out += &match threads {
            Threads::Auto => format!("threads: {} (auto)\n", threads.count()),
            Threads::Count(n) => format!("threads: {n}\n"),
        };
        if let Some(path) = &self.server.unix_socket {
            out += &format!(
                "unix_socket: {} (mode {:04o})\n",
                path.display(),
                self.server.unix_socket_mode
            );
        }
        if let Some(server_tls) = &self.server.tls {
            let listen: Vec<String> = server_tls.listen.iter().map(ToString::to_string).collect();
            out += &format!(
                "tls listen: {} (client certificates {})\n",
                listen.join(", "),
                if server_tls.ca_file.is_some() {
                    "required"
                } else {
                    "not asked for"
                }
            );
        }
        let upstream = match self.upstream.cluster.as_slice() {
            [] => endpoint.address.to_string(),
            seeds => {
                let seeds: Vec<String> = seeds.iter().map(|s| s.address.to_string()).collect();
                format!(
                    "cluster, seeds {} (slot map refreshed every {:?})",
                    seeds.join(", "),
                    self.upstream.cluster_refresh_interval
                )
            }
        };
        out += &format!(
            "upstream: {} (connections {}, db {}, user {}, password {})\n",
            upstream,
            self.upstream.connections,
            endpoint.db,
            endpoint.username.as_deref().unwrap_or("-"),
            if endpoint.password.is_some() {
                "set"
            } else {
                "-"
            },
        );
        if let Address::Tcp {
            tls: true, host, ..
        } = &endpoint.address
        {
            let tls = self.upstream.tls.clone().unwrap_or_default();
            out += &format!(
                "upstream tls: server name {}, {}, client certificate {}\n",
                tls.server_name.as_deref().unwrap_or(host),
                match (&tls.ca_file, tls.insecure_skip_verify) {
                    (_, true) => "certificate NOT verified (insecure_skip_verify)".to_owned(),
                    (Some(ca), false) => format!("CA {}", ca.display()),
                    (None, false) => "system CA certificates".to_owned(),
                },
                tls.cert_file
                    .as_ref()
                    .map_or("-".to_owned(), |cert| cert.display().to_string()),
            );
        }
        out += &format!(
            "limits: max_clients {}, max_pipeline {}, max_bulk_len {}, max_multibulk_len {}, \
             client_query_limit {}, client_output_limit {}\n",
            self.server.max_clients,
            self.server.max_pipeline,
            self.server.max_bulk_len,
            self.server.max_multibulk_len,
            self.server.client_query_limit,
            self.server.client_output_limit
        );
        out += &format!(
            "timeouts: connect {:?}, request {:?}, client idle {:?}, shutdown grace {:?}\n",
            self.upstream.connect_timeout,
            self.upstream.request_timeout,
            self.server.client_idle_timeout,
            self.server.shutdown_grace
        );
        out += &format!(
            "log: level {}, format {:?}\n",
            self.log.level, self.log.format
        );
        out += &match self.metrics.listen {
            Some(addr) => format!("metrics: listen {addr}\n"),
            None => "metrics: off\n".to_owned(),
        };
        out
    }
}

/// A file that every user on the machine can read and that holds a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exposed {
    /// The config file, with a password in its own text.
    ConfigFile(PathBuf),
    /// A `password_file`, and the key that names it.
    PasswordFile { key: &'static str, path: PathBuf },
}

impl fmt::Display for Exposed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exposed::ConfigFile(path) => write!(
                f,
                "config file {} is world-readable and holds a password",
                path.display()
            ),
            Exposed::PasswordFile { key, path } => write!(
                f,
                "password file {} ({key}) is world-readable",
                path.display()
            ),
        }
    }
}

/// The files that leak a password to every account on the machine (mode & 0o004): the config
/// file at `path` when its text holds a password (`upstream.password`, one inside
/// `upstream.address`, or one of `[auth]`'s), and every `password_file` it names. `file` is the
/// configuration read from that file alone: a password given with `--upstream` is not in it.
pub fn world_readable_secrets(path: &Path, file: &Config) -> Vec<Exposed> {
    use std::os::unix::fs::PermissionsExt;
    let world_readable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o004 != 0)
    };
    // Passwords read from the environment or another file are not in this one.
    let in_text = |password: &Option<Secret>, env: &Option<String>, path: &Option<PathBuf>| {
        password.is_some() && env.is_none() && path.is_none()
    };
    let (auth, upstream) = (&file.auth, &file.upstream);
    let holds_password = in_text(
        &upstream.password,
        &upstream.password_env,
        &upstream.password_file,
    ) || upstream.address.password.is_some()
        || in_text(&auth.password, &auth.password_env, &auth.password_file)
        || auth
            .users
            .iter()
            .any(|u| in_text(&u.password, &u.password_env, &u.password_file));
    let mut exposed = Vec::new();
    if holds_password && world_readable(path) {
        exposed.push(Exposed::ConfigFile(path.to_owned()));
    }
    let password_files = [
        ("upstream.password_file", &upstream.password_file),
        ("auth.password_file", &auth.password_file),
    ]
    .into_iter()
    .chain(
        auth.users
            .iter()
            .map(|user| ("auth.users.password_file", &user.password_file)),
    );
    for (key, password_file) in password_files {
        if let Some(password_file) = password_file.as_deref().filter(|p| world_readable(p)) {
            exposed.push(Exposed::PasswordFile {
                key,
                path: password_file.to_owned(),
            });
        }
    }
    exposed
}

/// The line (1-based) of `section.key` in TOML text (the section may have dots itself, as in
/// `server.tls.cert_file`), or of the `[section]` header `dotted` names, found by reading the
/// section headers.
/// `file:line: ` for `key` in `source`, or nothing when it is not in the file.
fn located(source: Option<(&str, &str)>, key: &str) -> String {
    source
        .and_then(|(name, text)| Some(format!("{name}:{}: ", line_of(text, key)?)))
        .unwrap_or_default()
}

fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.')?;
    let mut current = "";
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.trim();
            if current == dotted {
                return Some(number + 1);
            }
        } else if current == section
            && line
                .split_once('=')
                .is_some_and(|(name, _)| name.trim() == key)
        {
            return Some(number + 1);
        }
    }
    None
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not an address: expected IP:PORT, e.g. \"127.0.0.1:6380\"")
    })
}

fn check_log_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("{level:?} is not a log filter: {e}"))
}

/// Parses a size the way Redis's config does: a plain number of bytes, or a number with a unit,
/// case-insensitive: `k`/`m`/`g` are powers of 1000, `kb`/`mb`/`gb` powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let multiplier: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => u64::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| multiplier != u64::MAX)
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is not a size: expected e.g. 1024, \"64kb\", \"512mb\""))
}

/// Longest duration accepted anywhere: keeps deadline arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration: a whole number with a unit `ms`, `s`, `m` or `h`; `0` alone is allowed.
/// At most a year.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration: expected e.g. \"500ms\", \"5s\", \"1m\"");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let duration = match unit {
        "" if n == 0 => Duration::ZERO,
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is too long: at most a year"));
    }
    Ok(duration)
}

// === serde adapters: each gives a precise message, and toml adds the line ===

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(de::Error::custom)
}

/// `upstream.cluster`: a list of addresses, each read as `address` reads one.
fn addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Endpoint>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|message: String| de::Error::custom(without_password(text, message)))
        })
        .collect()
}

fn address<'de, D: Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|message: String| de::Error::custom(without_password(&text, message)))
}

/// An address error quotes the address: one with a password (`redis://user:pass@...`) must
/// not show it.
fn without_password(address: &str, message: String) -> String {
    let password = address
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|password| !password.is_empty());
    match password {
        // The message quotes the address with `{:?}`, which escapes `"` and `\`.
        Some(password) => {
            let quoted = format!("{password:?}");
            let escaped = quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .unwrap_or(&quoted);
            message
                .replace(escaped, "<redacted>")
                .replace(password, "<redacted>")
        }
        None => message,
    }
}

// === keys that may hold a password: their value's shape is checked without quoting it ===
//
// serde's type errors quote the value they got ("invalid type: integer `86753091`, expected a
// string"), and a password written as a number, or as a string where its section or list
// belongs, is still a password. These keys check the shape themselves and say only what it
// must be: "`auth.password` must be a string".

fn auth_password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    checked(d, "auth.password", "a string").map(Some)
}

fn user_password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    checked(d, "auth.users.password", "a string").map(Some)
}

fn upstream_password<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    checked(d, "upstream.password", "a string").map(Some)
}

fn auth_section<'de, D: Deserializer<'de>>(d: D) -> Result<AuthConfig, D::Error> {
    checked(d, "auth", "a table").map(|Table(auth)| auth)
}

fn upstream_section<'de, D: Deserializer<'de>>(d: D) -> Result<UpstreamConfig, D::Error> {
    checked(d, "upstream", "a table").map(|Table(upstream)| upstream)
}

fn auth_users<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<UserConfig>, D::Error> {
    let users: Vec<Table<UserConfig>> = checked(d, "auth.users", "a list of tables")?;
    Ok(users.into_iter().map(|Table(user)| user).collect())
}

/// Reads a `T` at `key`; any other shape of value is refused with "`key` must be `what`",
/// which quotes nothing of it.
fn checked<'de, D: Deserializer<'de>, T: Shape<'de>>(
    d: D,
    key: &'static str,
    what: &'static str,
) -> Result<T, D::Error> {
    de::DeserializeSeed::deserialize(
        Checked {
            key,
            what,
            shape: PhantomData,
        },
        d,
    )
}

/// The shapes of value a checked key takes; `None` for any other.
trait Shape<'de>: Sized {
    fn from_str<E: de::Error>(_text: &str) -> Option<Result<Self, E>> {
        None
    }
    fn from_map<A: de::MapAccess<'de>>(_map: A) -> Option<Result<Self, A::Error>> {
        None
    }
    fn from_seq<A: de::SeqAccess<'de>>(
        _seq: A,
        _checked: Checked<Self>,
    ) -> Option<Result<Self, A::Error>> {
        None
    }
}

impl Shape<'_> for Secret {
    fn from_str<E: de::Error>(text: &str) -> Option<Result<Self, E>> {
        Some(Ok(Secret::new(text)))
    }
}

/// A TOML table, read as `T`: its own errors (an unknown key, a bad value) keep their place.
struct Table<T>(T);

impl<'de, T: Deserialize<'de>> Shape<'de> for Table<T> {
    fn from_map<A: de::MapAccess<'de>>(map: A) -> Option<Result<Self, A::Error>> {
        Some(T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table))
    }
}

/// A list of tables (`[[auth.users]]`): each element is checked as the list is.
impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<Table<T>> {
    fn from_seq<A: de::SeqAccess<'de>>(
        mut seq: A,
        checked: Checked<Self>,
    ) -> Option<Result<Self, A::Error>> {
        let mut tables = Vec::new();
        let element = || Checked::<Table<T>> {
            key: checked.key,
            what: checked.what,
            shape: PhantomData,
        };
        loop {
            match seq.next_element_seed(element()) {
                Ok(Some(table)) => tables.push(table),
                Ok(None) => return Some(Ok(tables)),
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

/// The visitor behind [`checked`]: every shape but the ones `T` takes is refused the same
/// way, with the value left out.
struct Checked<T> {
    key: &'static str,
    what: &'static str,
    shape: PhantomData<T>,
}

impl<T> Checked<T> {
    fn wrong<E: de::Error>(&self) -> E {
        E::custom(format!("`{}` must be {}", self.key, self.what))
    }
}

impl<'de, T: Shape<'de>> de::DeserializeSeed<'de> for Checked<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Shape<'de>> de::Visitor<'de> for Checked<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        T::from_str(text).unwrap_or_else(|| Err(self.wrong()))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map).unwrap_or_else(|| Err(self.wrong()))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        let wrong = self.wrong();
        T::from_seq(seq, self).unwrap_or(Err(wrong))
    }

    // Every other shape: serde's defaults would quote the value.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<T, D::Error> {
        Err(self.wrong())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Err(self.wrong())
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, _: D) -> Result<T, D::Error> {
        Err(self.wrong())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(self.wrong())
    }
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    check_log_level(&level).map_err(de::Error::custom)?;
    Ok(level)
}

fn file_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    u32::from_str_radix(&text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            de::Error::custom(format!(
                "{text:?} is not a file mode: expected octal, e.g. \"0660\""
            ))
        })
}

/// A size: a TOML integer (bytes) or a string with a unit.
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d).map_err(|_| {
        de::Error::custom("expected a size: a number of bytes or a string such as \"512mb\"")
    })? {
        Size::Bytes(n) => Ok(n),
        Size::Text(text) => parse_size(&text).map_err(de::Error::custom),
    }
}

fn optional_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    parse_listen(&String::deserialize(d)?)
        .map(Some)
        .map_err(de::Error::custom)
}

/// A string or a list of strings.
fn listen_addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)
        .map_err(|_| de::Error::custom("expected an address or a list of addresses"))?
    {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    };
    list.iter()
        .map(|addr| parse_listen(addr).map_err(de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
                 `client_idle_timeout`, `shutdown_grace`, `tls`, `threads`; in `server`"
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
