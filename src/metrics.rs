//! What redmux counts, and its Prometheus exposition (served by [`crate::admin`]).
//!
//! Recording sits on the hot path (every request, every read and write of a client socket), so
//! it is plain atomic adds with `Relaxed` ordering (each counter stands alone, and a scrape that
//! sees one a moment late is fine): no lock, no allocation, and no lookup by name, since a
//! command's counters sit at its [`CommandId`], an array index. Per-request counters are kept
//! only when the endpoint is configured ([`Metrics::per_request`]); sessions without it skip
//! them with one branch. Events that happen once per connection are always counted.
//!
//! Gauges that describe state (clients, upstream connections, pinned connections, pub/sub) are
//! not kept here but read at scrape time from what owns that state ([`Snapshot`]).

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType, TypedMetric},
    registry::Registry,
};

use crate::{command::CommandId, upstream::Snapshot};

/// Upper bounds of the latency histogram's buckets, in nanoseconds: 100 µs to 1 s. A request
/// through redmux to a local Redis takes tens to hundreds of microseconds; the upper buckets
/// catch a slow or stalled Redis.
const BOUNDS: [u64; 9] = [
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

/// The `Content-Type` of [`Metrics::prometheus`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

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

    /// Every metric in Prometheus text format (version 0.0.4), with the upstream side as
    /// `upstream` shows it now.
    pub fn prometheus(self: &Arc<Self>, upstream: Snapshot) -> Result<String, fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition {
            metrics: self.clone(),
            upstream,
        }));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// One scrape: the counters and a snapshot of the upstream side.
#[derive(Debug)]
struct Exposition {
    metrics: Arc<Metrics>,
    upstream: Snapshot,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let m = &self.metrics;
        let up = &self.upstream;
        family(
            &mut encoder,
            "redmux_build_info",
            "Always 1; the version label says which redmux this is.",
            "version",
            [(env!("CARGO_PKG_VERSION"), ConstGauge::new(1u64))],
        )?;
        let started = m
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        gauge(
            &mut encoder,
            "redmux_start_time_seconds",
            "When redmux started, in seconds since the Unix epoch.",
            started.as_secs_f64(),
        )?;
        gauge(
            &mut encoder,
            "redmux_connected_clients",
            "Client connections open now.",
            m.clients.load(Relaxed) as u64,
        )?;
        counter(
            &mut encoder,
            "redmux_connections_accepted",
            "Client connections accepted and served.",
            m.accepted.load(Relaxed),
        )?;
        family(
            &mut encoder,
            "redmux_connections_rejected",
            "Client connections refused, by reason (max_clients: server.max_clients reached; \
             tls_handshake: the TLS handshake failed).",
            "reason",
            [
                ("max_clients", &m.rejected_max_clients),
                ("tls_handshake", &m.rejected_tls_handshake),
            ]
            .map(|(reason, n)| (reason, ConstCounter::new(n.load(Relaxed)))),
        )?;
        counter(
            &mut encoder,
            "redmux_client_received_bytes",
            "Bytes read from clients.",
            m.bytes_in.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "redmux_client_sent_bytes",
            "Bytes written to clients.",
            m.bytes_out.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "redmux_auth_failures",
            "AUTH and HELLO AUTH refused (wrong password, unknown or disabled user), whether \
             redmux or Redis checked them.",
            m.auth_failures.load(Relaxed),
        )?;
        self.encode_commands(&mut encoder)?;
        gauge(
            &mut encoder,
            "redmux_upstream_up",
            "1 while the shared upstream connections of the default db are connected \
             (always 1 for the embedded upstream), else 0: what /health reports.",
            u64::from(up.healthy),
        )?;
        let open = |role| {
            let open = up.actors.iter().filter(|a| a.connected && a.role == role);
            (role, ConstGauge::new(open.count() as u64))
        };
        family(
            &mut encoder,
            "redmux_upstream_connections",
            "Upstream connections open now, by role (shared, pinned).",
            "role",
            ["shared", "pinned"].map(open),
        )?;
        counter(
            &mut encoder,
            "redmux_upstream_connects",
            "Upstream connections established (and ready: AUTH, SELECT and PING done).",
            m.upstream_connects.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "redmux_upstream_connect_failures",
            "Upstream connection attempts that failed.",
            m.upstream_connect_failures.load(Relaxed),
        )?;
        counter(
            &mut encoder,
            "redmux_upstream_disconnects",
            "Upstream connections that ended (lost, timed out, or closed when no longer needed).",
            m.upstream_disconnects.load(Relaxed),
        )?;
        gauge(
            &mut encoder,
            "redmux_upstream_in_flight_requests",
            "Requests written (or being written) to Redis and not answered yet.",
            up.actors.iter().map(|a| a.in_flight).sum::<u64>(),
        )?;
        gauge(
            &mut encoder,
            "redmux_upstream_queued_requests",
            "Requests held for an upstream connection that is not up yet (at most connect_timeout).",
            up.actors.iter().map(|a| a.queued).sum::<u64>(),
        )?;
        gauge(
            &mut encoder,
            "redmux_pinned_connections_in_use",
            "Pinned upstream connections held by clients now (transactions, blocking commands, MONITOR).",
            up.pinned.in_use as u64,
        )?;
        gauge(
            &mut encoder,
            "redmux_pinned_connections_max",
            "upstream.max_pinned.",
            up.pinned.max as u64,
        )?;
        family(
            &mut encoder,
            "redmux_pubsub_subscriptions",
            "Channels, patterns and shard channels subscribed on the shared subscriber connection.",
            "kind",
            [
                ("channel", ConstGauge::new(up.pubsub.channels)),
                ("pattern", ConstGauge::new(up.pubsub.patterns)),
                ("shard", ConstGauge::new(up.pubsub.shard_channels)),
            ],
        )?;
        gauge(
            &mut encoder,
            "redmux_pubsub_clients",
            "Clients subscribed to anything.",
            up.pubsub.clients,
        )
    }
}

impl Exposition {
    /// The per-command families, for the commands that have been used: at most one series per
    /// command in the table, plus `other`.
    fn encode_commands(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        let used = || {
            self.metrics
                .commands
                .iter()
                .zip(CommandId::all())
                .filter(|(stats, _)| stats.calls.load(Relaxed) > 0)
                .map(|(stats, id)| (stats, id.name()))
        };
        family(
            encoder,
            "redmux_commands",
            "Requests received, by command (lower case; commands redmux does not know are `other`).",
            "command",
            used().map(|(stats, name)| (name, ConstCounter::new(stats.calls.load(Relaxed)))),
        )?;
        family(
            encoder,
            "redmux_command_errors",
            "Error replies (from Redis or from redmux), by command.",
            "command",
            used().map(|(stats, name)| (name, ConstCounter::new(stats.errors.load(Relaxed)))),
        )?;
        let mut latency = encoder.encode_descriptor(
            "redmux_request_duration_seconds",
            "Time from handing a request to its upstream connection to having its reply, by command.",
            None,
            MetricType::Histogram,
        )?;
        for (stats, name) in used() {
            let counts: Vec<u64> = stats.buckets.iter().map(|b| b.load(Relaxed)).collect();
            let count = counts.iter().sum();
            if count == 0 {
                continue; // only answered by redmux itself
            }
            let buckets: Vec<(f64, u64)> = BOUNDS
                .iter()
                .map(|nanos| *nanos as f64 / 1e9)
                .chain([f64::INFINITY])
                .zip(counts)
                .collect();
            let sum = stats.nanos.load(Relaxed) as f64 / 1e9;
            latency
                .encode_family(&[("command", name)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> Result<(), fmt::Error>
where
    ConstGauge<V>: EncodeMetric,
{
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A family whose series differ by the value of one label.
fn family<'a, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, M)>,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (value, metric) in series {
        metric.encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
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
