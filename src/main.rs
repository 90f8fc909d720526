//! The `redmux` binary: parse flags, load the config, set up logging, run the server until a
//! signal; SIGHUP reloads the config. Everything else lives in the library.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Parser;
use redmux::{
    config::{world_readable_secrets, Exposed, LogConfig, LogFormat, Overrides},
    report::Chain,
    server::Reloader,
    Config, Proxy,
};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{
    layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry,
};

/// A local Redis proxy: many client connections, one pipelined upstream connection.
#[derive(Debug, Parser)]
#[command(name = "redmux", version)]
struct Cli {
    /// Configuration file (TOML). Without it the built-in defaults apply.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept clients on, e.g. 127.0.0.1:6380 (repeatable); replaces server.listen.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Upstream Redis: redis://[user:pass@]host:port[/db], host:port, unix:///path or embedded.
    #[arg(long, value_name = "ADDR")]
    upstream: Option<String>,
    /// A Redis Cluster's seed nodes, host:port[,host:port...] (rediss:// for TLS); replaces
    /// upstream.cluster and upstream.address.
    #[arg(long, value_name = "ADDRS", conflicts_with = "upstream")]
    upstream_cluster: Option<String>,
    /// Log filter, e.g. info or redmux=debug; RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Threads that serve clients: a number or auto; replaces server.threads.
    #[arg(long, value_name = "N")]
    threads: Option<String>,
    /// Turn the near cache on (cache.enabled = true).
    #[arg(long)]
    cache: bool,
    /// Validate the configuration, print a summary and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check: bool,
    /// Send PING to the redmux running with this configuration: exit 0 on PONG, 1 otherwise
    /// (a container health check).
    #[arg(long, conflicts_with_all = ["check", "status"])]
    ping: bool,
    /// Print the /status JSON of the redmux running with this configuration (needs
    /// [metrics] listen): exit 1 if it cannot be reached.
    #[arg(long, conflicts_with = "check")]
    status: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream,
        upstream_cluster: cli.upstream_cluster,
        log_level: cli.log_level,
        threads: cli.threads,
        cache: cli.cache,
    };
    let config = match redmux::load_config(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            // The place and the message, never the file's line: it may hold a password, and
            // --check's output reaches logs too (the systemd unit runs it).
            eprintln!("redmux: invalid configuration: {}", Chain(&error));
            return ExitCode::FAILURE;
        }
    };
    if cli.ping {
        return match redmux::probe::ping(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("redmux: ping failed: {}", Chain(&error));
                ExitCode::FAILURE
            }
        };
    }
    if cli.status {
        return match redmux::probe::status(&config) {
            Ok(json) => {
                print!("{json}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("redmux: status: {}", Chain(&error));
                ExitCode::FAILURE
            }
        };
    }
    let exposed = cli
        .config
        .as_deref()
        .map(exposed_secrets)
        .unwrap_or_default();
    if cli.check {
        for exposed in &exposed {
            eprintln!("warning: {exposed}");
        }
        let source = cli
            .config
            .map_or("defaults".into(), |p| p.display().to_string());
        println!("configuration OK ({source})");
        print!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    let logging = init_logging(&config.log);
    warn_exposed(&exposed);
    let source = Source {
        path: cli.config,
        overrides,
        logging,
    };
    match run(config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The world-readable files that hold a password: the config file at `path`, if its text holds
/// one (a password given with `--upstream` is not in the file), and the password files it names.
fn exposed_secrets(path: &Path) -> Vec<Exposed> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| Config::parse(&text).ok())
        .map(|file| world_readable_secrets(path, &file))
        .unwrap_or_default()
}

fn warn_exposed(exposed: &[Exposed]) {
    for exposed in exposed {
        tracing::warn!("{exposed}");
    }
}

/// Where the configuration comes from, for SIGHUP to read it again the same way.
struct Source {
    path: Option<PathBuf>,
    /// Re-applied over the file on reload, so a reload does not undo a command-line flag.
    overrides: Overrides,
    logging: Logging,
}

fn run(config: Config, source: Source) -> anyhow::Result<()> {
    // Every client is a file descriptor: 10,000 clients need more than the usual soft limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit raised"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    // One thread, like Redis and twemproxy. Measured with benches/compare.py on 2 cores:
    // the multi-thread scheduler was 7-25% slower on every one-request-at-a-time workload, its
    // cross-thread wakeups costing more than a second core gives back while Redis and the
    // clients compete for the same cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Installed before the listeners are bound: a SIGHUP sent as soon as the port answers
        // must reload, not kill the process (the default action).
        let signals = Signals::install().context("cannot install signal handlers")?;
        let proxy = Proxy::bind(config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(
            signals,
            shutdown.clone(),
            proxy.server().reloader(),
            source,
        ));
        proxy.run(shutdown).await;
        Ok(())
    })
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once. SIGHUP reloads
/// the configuration file.
async fn on_signals(
    mut signals: Signals,
    shutdown: CancellationToken,
    reloader: Reloader,
    source: Source,
) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => {}
            _ = signals.int.recv() => {}
            _ = signals.hup.recv() => {
                if !shutdown.is_cancelled() {
                    reload(&source, &reloader).await;
                }
                continue;
            }
        }
        if shutdown.is_cancelled() {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(1);
        }
        shutdown.cancel();
    }
}

/// Reads the configuration again, as at start, and applies it. An invalid file changes
/// nothing: the error is logged and redmux goes on with the configuration it has.
async fn reload(source: &Source, reloader: &Reloader) {
    let Some(path) = source.path.clone() else {
        tracing::warn!("SIGHUP: no configuration file (--config) to reload");
        return;
    };
    tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
    let overrides = source.overrides.clone();
    // Off the runtime's only thread: the file, and any password file, may be slow to read.
    let loaded = tokio::task::spawn_blocking(move || {
        let exposed = exposed_secrets(&path);
        redmux::load_config(Some(&path), &overrides).map(|config| (config, exposed))
    })
    .await;
    let (config, exposed) = match loaded {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(error)) => {
            tracing::error!(
                "reload failed, keeping the current configuration: {}",
                Chain(&error)
            );
            return;
        }
        Err(error) => {
            tracing::error!(%error, "reload failed, keeping the current configuration");
            return;
        }
    };
    warn_exposed(&exposed);
    let level = config.log.level.clone();
    match reloader.reload(config).await {
        Ok(changed) if changed.contains(&"log.level") => source.logging.set_level(&level),
        Ok(_) => {}
        Err(error) => {
            tracing::error!(
                error = %Chain(&error),
                "reload failed, keeping the current configuration"
            );
        }
    }
}

/// What can change in logging while redmux runs: the filter.
struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start: it wins over `log.level`, on reload too.
    from_env: bool,
}

impl Logging {
    fn set_level(&self, level: &str) {
        if self.from_env {
            tracing::warn!("log.level changed, but RUST_LOG is set and still decides the filter");
        } else if let Err(error) = self.filter.reload(level_filter(level)) {
            tracing::error!(%error, "cannot change the log level");
        }
    }
}

fn init_logging(log: &LogConfig) -> Logging {
    let env = EnvFilter::try_from_default_env().ok();
    let from_env = env.is_some();
    let (filter, handle) = reload::Layer::new(env.unwrap_or_else(|| level_filter(&log.level)));
    // Colours only for a terminal, not for a log file or journald.
    let format = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // The format is fixed for the process: a span created under one formatter cannot be
    // printed by the other (the JSON one panics on it), so log.format needs a restart.
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        LogFormat::Text => registry.with(format).init(),
        LogFormat::Json => registry.with(format.json().flatten_event(true)).init(),
    }
    Logging {
        filter: handle,
        from_env,
    }
}

/// The filter for `log.level`. mini-redis logs every connection at info; it stays quiet
/// unless asked for by RUST_LOG.
fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!("{level},mini_redis=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}
