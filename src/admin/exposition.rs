//! The Prometheus exposition: redmux's counters ([`Metrics::counters`]) and the upstream side
//! as it is at scrape time ([`Snapshot`]), in Prometheus's text format.

use std::{collections::BTreeMap, fmt, time::SystemTime};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType, TypedMetric},
    registry::Registry,
};

use crate::{
    cache,
    metrics::{Counters, Metrics, BOUNDS},
    pubsub::Counts,
    upstream::Snapshot,
};

/// The `Content-Type` of [`prometheus`]'s output.
pub(super) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric in Prometheus text format (version 0.0.4): the counters, and the upstream side
/// as `upstream` shows it now.
pub(super) fn prometheus(
    metrics: &Metrics,
    upstream: Snapshot,
    pubsub: Counts,
    cache: Option<cache::Snapshot>,
) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition {
        counters: metrics.counters(),
        upstream,
        pubsub,
        cache,
    }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// One scrape: the counters, and snapshots of the upstream side and of pub/sub.
#[derive(Debug)]
struct Exposition {
    counters: Counters,
    upstream: Snapshot,
    pubsub: Counts,
    /// The near cache, when it is on.
    cache: Option<cache::Snapshot>,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let m = &self.counters;
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
            m.clients,
        )?;
        counter(
            &mut encoder,
            "redmux_connections_accepted",
            "Client connections accepted and served.",
            m.accepted,
        )?;
        family(
            &mut encoder,
            "redmux_connections_rejected",
            "Client connections refused, by reason (max_clients: server.max_clients reached; \
             tls_handshake: the TLS handshake failed).",
            "reason",
            [
                ("max_clients", m.rejected_max_clients),
                ("tls_handshake", m.rejected_tls_handshake),
            ]
            .map(|(reason, n)| (reason, ConstCounter::new(n))),
        )?;
        counter(
            &mut encoder,
            "redmux_client_received_bytes",
            "Bytes read from clients.",
            m.bytes_in,
        )?;
        counter(
            &mut encoder,
            "redmux_client_sent_bytes",
            "Bytes written to clients.",
            m.bytes_out,
        )?;
        counter(
            &mut encoder,
            "redmux_auth_failures",
            "AUTH and HELLO AUTH refused (wrong password, unknown or disabled user), whether \
             redmux or Redis checked them.",
            m.auth_failures,
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
            m.upstream_connects,
        )?;
        counter(
            &mut encoder,
            "redmux_upstream_connect_failures",
            "Upstream connection attempts that failed.",
            m.upstream_connect_failures,
        )?;
        counter(
            &mut encoder,
            "redmux_upstream_disconnects",
            "Upstream connections that ended (lost, timed out, or closed when no longer needed).",
            m.upstream_disconnects,
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
        encode_nodes(&mut encoder, up)?;
        family(
            &mut encoder,
            "redmux_pubsub_subscriptions",
            "Channels, patterns and shard channels subscribed on the shared subscriber connection.",
            "kind",
            [
                ("channel", ConstGauge::new(self.pubsub.channels)),
                ("pattern", ConstGauge::new(self.pubsub.patterns)),
                ("shard", ConstGauge::new(self.pubsub.shard_channels)),
            ],
        )?;
        gauge(
            &mut encoder,
            "redmux_pubsub_clients",
            "Clients subscribed to anything.",
            self.pubsub.clients,
        )?;
        match &self.cache {
            Some(cache) => encode_cache(&mut encoder, cache),
            None => Ok(()),
        }
    }
}

/// In front of a cluster, the upstream side by node (`host:port` of each node redmux has a
/// connection to, so bounded by the cluster's size): connections open, requests in flight and
/// requests queued.
fn encode_nodes(encoder: &mut DescriptorEncoder, up: &Snapshot) -> Result<(), fmt::Error> {
    let mut nodes: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for actor in &up.actors {
        if let Some(node) = &actor.node {
            let figures = nodes.entry(node).or_default();
            figures[0] += u64::from(actor.connected);
            figures[1] += actor.in_flight;
            figures[2] += actor.queued;
        }
    }
    if nodes.is_empty() {
        return Ok(());
    }
    let families = [
        (
            "redmux_cluster_node_connections",
            "Upstream connections open now to each cluster node.",
        ),
        (
            "redmux_cluster_node_in_flight_requests",
            "Requests written to each cluster node and not answered yet.",
        ),
        (
            "redmux_cluster_node_queued_requests",
            "Requests held for a connection to each cluster node that is not up yet.",
        ),
    ];
    for (i, (name, help)) in families.into_iter().enumerate() {
        let series = nodes
            .iter()
            .map(|(node, figures)| (*node, ConstGauge::new(figures[i])));
        family(encoder, name, help, "node", series)?;
    }
    Ok(())
}

/// The near cache's series (only while `cache.enabled`).
fn encode_cache(
    encoder: &mut DescriptorEncoder,
    cache: &cache::Snapshot,
) -> Result<(), fmt::Error> {
    for (name, help, value) in [
        ("redmux_cache_hits", "Reads answered from the near cache.", cache.hits),
        ("redmux_cache_misses", "Cacheable reads sent to Redis.", cache.misses),
        (
            "redmux_cache_invalidations",
            "Near cache entries dropped because their key changed.",
            cache.invalidations,
        ),
        (
            "redmux_cache_flushes",
            "Times the whole near cache was dropped (null invalidation, stream lost or back, FLUSHALL).",
            cache.flushes,
        ),
    ] {
        counter(encoder, name, help, value)?;
    }
    gauge(
        encoder,
        "redmux_cache_bytes",
        "What the near cache's entries cost now, bookkeeping included.",
        cache.bytes,
    )?;
    gauge(
        encoder,
        "redmux_cache_entries",
        "Entries (and placeholders) in the near cache.",
        cache.entries,
    )?;
    gauge(
        encoder,
        "redmux_cache_max_memory_bytes",
        "cache.max_memory.",
        cache.max_memory,
    )?;
    gauge(
        encoder,
        "redmux_cache_up",
        "1 while the invalidation stream is up and the near cache serves.",
        u64::from(cache.up),
    )
}

impl Exposition {
    /// The per-command families, for the commands that have been used: at most one series per
    /// command in the table, plus `other`.
    fn encode_commands(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        let used = &self.counters.commands;
        family(
            encoder,
            "redmux_commands",
            "Requests received, by command (lower case; commands redmux does not know are `other`).",
            "command",
            used.iter().map(|c| (c.name, ConstCounter::new(c.calls))),
        )?;
        family(
            encoder,
            "redmux_command_errors",
            "Error replies (from Redis or from redmux), by command.",
            "command",
            used.iter().map(|c| (c.name, ConstCounter::new(c.errors))),
        )?;
        let mut latency = encoder.encode_descriptor(
            "redmux_request_duration_seconds",
            "Time from handing a request to its upstream connection to having its reply, by command.",
            None,
            MetricType::Histogram,
        )?;
        for command in used {
            let count = command.buckets.iter().sum();
            if count == 0 {
                continue; // only answered by redmux itself
            }
            let buckets: Vec<(f64, u64)> = BOUNDS
                .iter()
                .map(|nanos| *nanos as f64 / 1e9)
                .chain([f64::INFINITY])
                .zip(command.buckets)
                .collect();
            let sum = command.nanos as f64 / 1e9;
            latency
                .encode_family(&[("command", command.name)])?
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
