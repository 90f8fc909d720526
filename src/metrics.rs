//! What redmux counts. The admin endpoint turns it into Prometheus's text format.
//!
//! Recording sits on the hot path (every request, every read and write of a client socket), so
//! it is plain atomic adds with `Relaxed` ordering (each counter stands alone, and a scrape that
//! sees one a moment late is fine): no lock, no allocation, and no lookup by name, since a
//! command's counters sit at its [`CommandId`], an array index. Per-request counters are kept
//! only when the endpoint is configured ([`Metrics::per_request`]); sessions without it skip
//! them with one branch. Events that happen once per connection are always counted.
//!
//! Gauges that describe state (clients, upstream connections, pinned connections, pub/sub) are
//! not kept here but read at scrape time from what owns that state (`upstream::Snapshot`).

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use crate::command::CommandId;

/// Upper bounds of the latency histogram's buckets, in nanoseconds: 100 µs to 1 s. A request
/// through redmux to a local Redis takes tens to hundreds of microseconds; the upper buckets
/// catch a slow or stalled Redis.
pub(crate) const BOUNDS: [u64; 9] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];

/// Why a connection was refused.
#[derive(Debug, Clone, Copy)]
pub enum Rejection {
    /// `server.max_clients` clients were connected already.
    MaxClients,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
}

/// Counters for one command (or for every `other` one).
#[derive(Debug, Default)]
struct CommandStats {
    calls: AtomicU64,
    errors: AtomicU64,
    /// Replies per latency bucket (the last one past every bound), not cumulative.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    /// Sum of the latencies, in nanoseconds.
    nanos: AtomicU64,
}

/// Every counter redmux keeps. One per server, shared by its sessions and upstream actors.
#[derive(Debug)]
pub struct Metrics {
    /// Per-request counters are kept (a `[metrics] listen` is configured).
    enabled: bool,
    started: Instant,
    started_at: SystemTime,
    /// Clients connected now. The server admits clients by it (`max_clients`).
    pub clients: AtomicUsize,
    accepted: AtomicU64,
    rejected_max_clients: AtomicU64,
    rejected_tls_handshake: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    upstream_connects: AtomicU64,
    upstream_connect_failures: AtomicU64,
    upstream_disconnects: AtomicU64,
    /// AUTH (or HELLO AUTH) refused, by redmux or by Redis.
    auth_failures: AtomicU64,
    /// Indexed by [`CommandId::index`].
    commands: Box<[CommandStats]>,
}

/// Totals across commands, for `/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Totals {
    pub connections_accepted: u64,
    pub connections_rejected: u64,
    pub commands: u64,
    pub command_errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream_connects: u64,
    pub upstream_connect_failures: u64,
    pub upstream_disconnects: u64,
}

impl Metrics {
    /// `per_request`: keep the counters that cost something per request.
    pub fn new(per_request: bool) -> Metrics {
        Metrics {
            enabled: per_request,
            started: Instant::now(),
            started_at: SystemTime::now(),
            clients: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            rejected_max_clients: AtomicU64::new(0),
            rejected_tls_handshake: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            upstream_connects: AtomicU64::new(0),
            upstream_connect_failures: AtomicU64::new(0),
            upstream_disconnects: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            commands: (0..CommandId::COUNT)
                .map(|_| CommandStats::default())
                .collect(),
        }
    }

    /// The handle sessions record requests through: `None` when per-request counters are off.
    pub fn per_request(self: &Arc<Self>) -> Option<Arc<Metrics>> {
        self.enabled.then(|| self.clone())
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    // === per connection ===

    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, why: Rejection) {
        match why {
            Rejection::MaxClients => &self.rejected_max_clients,
            Rejection::TlsHandshake => &self.rejected_tls_handshake,
        }
        .fetch_add(1, Relaxed);
    }

    /// A client's AUTH was refused.
    pub fn auth_failed(&self) {
        self.auth_failures.fetch_add(1, Relaxed);
    }

    pub fn upstream_connected(&self) {
        self.upstream_connects.fetch_add(1, Relaxed);
    }

    pub fn upstream_connect_failed(&self) {
        self.upstream_connect_failures.fetch_add(1, Relaxed);
    }

    pub fn upstream_lost(&self) {
        self.upstream_disconnects.fetch_add(1, Relaxed);
    }

    // === per request (only through `per_request`) ===

    /// A request for `command` was received.
    pub fn command(&self, command: CommandId) {
        if let Some(stats) = self.commands.get(command.index()) {
            stats.calls.fetch_add(1, Relaxed);
        }
    }

    /// The reply to a `command` request is in: an error or not, and how long it took if it
    /// came from upstream (`None` for replies redmux makes itself).
    pub fn reply(&self, command: CommandId, error: bool, latency: Option<Duration>) {
        let Some(stats) = self.commands.get(command.index()) else {
            return;
        };
        if error {
            stats.errors.fetch_add(1, Relaxed);
        }
        if let Some(latency) = latency {
            let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
            let bucket = BOUNDS
                .iter()
                .position(|b| nanos <= *b)
                .unwrap_or(BOUNDS.len());
            if let Some(bucket) = stats.buckets.get(bucket) {
                bucket.fetch_add(1, Relaxed);
            }
            stats.nanos.fetch_add(nanos, Relaxed);
        }
    }

    /// `n` bytes read from a client.
    pub fn read(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }

    /// `n` bytes written to a client.
    pub fn written(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
    }

    // === reading ===

    pub fn totals(&self) -> Totals {
        let sum = |f: fn(&CommandStats) -> &AtomicU64| {
            self.commands.iter().map(|s| f(s).load(Relaxed)).sum()
        };
        Totals {
            connections_accepted: self.accepted.load(Relaxed),
            connections_rejected: self.rejected_max_clients.load(Relaxed)
                + self.rejected_tls_handshake.load(Relaxed),
            commands: sum(|s| &s.calls),
            command_errors: sum(|s| &s.errors),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            upstream_connects: self.upstream_connects.load(Relaxed),
            upstream_connect_failures: self.upstream_connect_failures.load(Relaxed),
            upstream_disconnects: self.upstream_disconnects.load(Relaxed),
        }
    }

    /// Every counter as it stands now, for the exposition: the per-command ones only for the
    /// commands that have been used (at most one series per command in the table, plus
    /// `other`).
    pub fn counters(&self) -> Counters {
        let load = |n: &AtomicU64| n.load(Relaxed);
        Counters {
            started_at: self.started_at,
            clients: self.clients.load(Relaxed) as u64,
            accepted: load(&self.accepted),
            rejected_max_clients: load(&self.rejected_max_clients),
            rejected_tls_handshake: load(&self.rejected_tls_handshake),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            upstream_connects: load(&self.upstream_connects),
            upstream_connect_failures: load(&self.upstream_connect_failures),
            upstream_disconnects: load(&self.upstream_disconnects),
            auth_failures: load(&self.auth_failures),
            commands: self
                .commands
                .iter()
                .zip(CommandId::all())
                .filter(|(stats, _)| load(&stats.calls) > 0)
                .map(|(stats, id)| CommandCounters {
                    name: id.name(),
                    calls: load(&stats.calls),
                    errors: load(&stats.errors),
                    buckets: stats.buckets.each_ref().map(load),
                    nanos: load(&stats.nanos),
                })
                .collect(),
        }
    }
}

/// What [`Metrics::counters`] read.
#[derive(Debug, Clone)]
pub struct Counters {
    pub started_at: SystemTime,
    pub clients: u64,
    pub accepted: u64,
    pub rejected_max_clients: u64,
    pub rejected_tls_handshake: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream_connects: u64,
    pub upstream_connect_failures: u64,
    pub upstream_disconnects: u64,
    pub auth_failures: u64,
    pub commands: Vec<CommandCounters>,
}

/// One used command's counters.
#[derive(Debug, Clone)]
pub struct CommandCounters {
    /// Lower case, or `other`.
    pub name: &'static str,
    pub calls: u64,
    pub errors: u64,
    /// Replies per latency bucket of [`BOUNDS`] (the last one past every bound), not
    /// cumulative.
    pub buckets: [u64; BOUNDS.len() + 1],
    /// Sum of the latencies, in nanoseconds.
    pub nanos: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_its_bucket() {
        let metrics = Metrics::new(true);
        let get = crate::command::lookup(b"get").0;
        metrics.command(get);
        metrics.reply(get, false, Some(Duration::from_micros(100)));
        metrics.reply(get, true, Some(Duration::from_micros(101)));
        metrics.reply(get, false, Some(Duration::from_secs(5)));
        metrics.reply(get, true, None);
        let stats = &metrics.commands[get.index()];
        let counts: Vec<u64> = stats.buckets.iter().map(|b| b.load(Relaxed)).collect();
        assert_eq!(counts, [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(stats.errors.load(Relaxed), 2);
        assert_eq!(metrics.totals().commands, 1);
    }
}
