//! redmux: a local Redis proxy that multiplexes many client connections onto one pipelined
//! upstream connection.
//!
//! Data flow, one module each: [`server`] accepts clients → [`client`] sessions parse requests
//! ([`resp`]) and decide what to do with each ([`command`]) → [`upstream`] actors pipeline them
//! onto Redis (or the embedded store) → replies flow back through a `oneshot` per batch.
//! The settings in effect are [`live`]: a reload replaces them while clients stay connected.
//! [`tls`] wraps either side in TLS when configured. Beside that path: [`metrics`] counts what
//! happens, and [`admin`] serves it over HTTP.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod admin;
pub mod auth;
pub mod client;
pub mod clients;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connection;
pub mod io;
pub mod live;
pub mod metrics;
pub mod monitor;
pub mod probe;
pub mod pubsub;
pub mod resp;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod workers;

pub use config::Config;

/// Loads the configuration as the binary does: [`Config::load`], then every TLS file it names
/// read and checked (see [`tls::check`]).
pub fn load_config(
    path: Option<&std::path::Path>,
    overrides: &config::Overrides,
) -> Result<Config, config::ConfigError> {
    Config::load_checked(path, overrides, tls::check)
}
pub use server::{Server, ServerError};
