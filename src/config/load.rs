//! Loading a configuration: the file read and parsed, command-line overrides applied, every
//! value validated, and errors that point at the key and the line. Also what a reload compares
//! (`changed_keys`) and the check for secrets in a world-readable file.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use super::{
    secret,
    values::{check_log_level, parse_listen, without_password},
    Address, Config, Endpoint, Overrides, Secret, Threads,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read")]
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
pub(super) fn place(at: &Option<(usize, usize)>) -> String {
    at.map_or_else(String::new, |(line, column)| format!(":{line}:{column}"))
}

/// A toml error on one line: its message, then the keys it is in (`; in `server.listen``),
/// unless the message names them already.
pub(super) fn toml_message(error: &toml::de::Error) -> String {
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
pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
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
        if overrides.cache {
            self.cache.enabled = true;
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
        // The endpoint, not `address`: in front of a cluster, `address` keeps its default.
        let endpoint = upstream.endpoint();
        if endpoint.address == Address::Embedded {
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
        let cache = &self.cache;
        if cache.enabled {
            if !upstream.cluster.is_empty() {
                return fail(
                    "cache.enabled",
                    "the near cache needs a standalone Redis, not a cluster",
                );
            }
            if upstream.address.address == Address::Embedded {
                return fail(
                    "cache.enabled",
                    "the near cache needs a Redis upstream (the embedded store cannot track keys)",
                );
            }
        }
        if cache.max_memory < 1024 * 1024 || cache.max_memory > 1024 * 1024 * 1024 * 1024 {
            return fail("cache.max_memory", "must be between 1MB and 1TB");
        }
        if cache.max_ttl.is_zero() {
            return fail("cache.max_ttl", "must be more than 0");
        }
        if cache.prefixes.iter().any(String::is_empty) {
            return fail(
                "cache.prefixes",
                "an empty prefix would match every key: leave the list empty instead",
            );
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
            client_idle_timeout, shutdown_grace, tls, threads, tracking_table_max_keys);
        compare!(upstream: address, connections, connect_timeout, request_timeout, username,
            password, db, databases, max_pinned, max_shared, allow_monitor, tls, cluster,
            cluster_refresh_interval);
        compare!(auth: password, users);
        compare!(log: level, format);
        compare!(metrics: listen);
        compare!(cache: enabled, max_memory, max_ttl, prefixes, eviction);
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
        if self.cache.enabled {
            out += &format!(
                "cache: on, max_memory {}, max_ttl {:?}, eviction {:?}, prefixes {}\n",
                self.cache.max_memory,
                self.cache.max_ttl,
                self.cache.eviction,
                if self.cache.prefixes.is_empty() {
                    "(every key)".to_owned()
                } else {
                    self.cache.prefixes.join(", ")
                }
            );
        }
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
pub(super) fn located(source: Option<(&str, &str)>, key: &str) -> String {
    source
        .and_then(|(name, text)| Some(format!("{name}:{}: ", line_of(text, key)?)))
        .unwrap_or_default()
}

pub(super) fn line_of(text: &str, dotted: &str) -> Option<usize> {
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
