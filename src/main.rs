//! The `redmux` binary: parse flags, load the config, set up logging, run the server until a
//! signal. Everything else lives in the library.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::Parser;
use redmux::{
    config::{world_readable_secret, LogConfig, LogFormat, Overrides},
    Config, Server,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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
    /// Log filter, e.g. info or redmux=debug; RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Validate the configuration, print a summary and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream,
        log_level: cli.log_level,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("redmux: invalid configuration: {error}");
            return ExitCode::FAILURE;
        }
    };
    let exposed = cli.config.as_deref().filter(|path| exposes_password(path));
    if cli.check {
        if let Some(path) = exposed {
            eprintln!("warning: {}", exposed_message(path));
        }
        let source = cli
            .config
            .map_or("defaults".into(), |p| p.display().to_string());
        println!("configuration OK ({source})");
        print!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log);
    if let Some(path) = exposed {
        tracing::warn!("{}", exposed_message(path));
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the config file at `path` is world-readable and holds a password itself (a password
/// given with `--upstream` is not in the file).
fn exposes_password(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| Config::parse(&text).ok())
        .is_some_and(|file| world_readable_secret(path, &file))
}

fn exposed_message(path: &Path) -> String {
    format!(
        "config file {} is world-readable and holds a password",
        path.display()
    )
}

fn run(config: Config) -> anyhow::Result<()> {
    // Every client is a file descriptor: 10,000 clients need more than the usual soft limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit raised"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    // One thread, like Redis and twemproxy. Measured with shared/bench/compare.py on 2 cores:
    // the multi-thread scheduler was 7-25% slower on every one-request-at-a-time workload, its
    // cross-thread wakeups costing more than a second core gives back while Redis and the
    // clients compete for the same cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = Server::bind(config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(shutdown.clone()));
        server.run(shutdown).await;
        Ok(())
    })
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
async fn on_signals(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting without waiting");
    std::process::exit(1);
}

fn init_logging(log: &LogConfig) {
    // mini-redis logs every connection at info; keep it quiet unless asked for by RUST_LOG.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},mini_redis=warn", log.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal, not for a log file or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
