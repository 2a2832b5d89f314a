//! Every metric vault exports, named here and nowhere else. Labels are bounded: topic, partition,
//! reason or kind — never anything derived from event content.

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The metrics of one pipeline. Each instance has its own registry, so tests can run several
/// pipelines in one process.
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounterVec,
    pub events_stored: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub events_skipped: IntCounterVec,
    pub batches_flushed: IntCounterVec,
    pub batch_events: Histogram,
    pub batch_bytes: Histogram,
    pub batch_write_duration: Histogram,
    pub store_retries: IntCounterVec,
    pub commits: IntCounterVec,
    pub committed_offset: IntGaugeVec,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub in_flight_batches: IntGauge,
    pub partition_restarts: IntCounterVec,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric definition is valid");
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("metric definition is valid");
            r.register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        }
        fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
            let g = IntGauge::new(name, help).expect("metric definition is valid");
            r.register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        }
        fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("metric definition is valid");
            r.register(Box::new(h.clone()))
                .expect("metric names are unique");
            h
        }
        let m = Metrics {
            events_consumed: counter(
                &registry,
                "vault_events_consumed_total",
                "Kafka messages read, valid or not.",
                &["topic", "partition"],
            ),
            events_stored: counter(
                &registry,
                "vault_events_stored_total",
                "Events acknowledged by the store.",
                &["topic"],
            ),
            events_dead_lettered: counter(
                &registry,
                "vault_events_dead_lettered_total",
                "Invalid events acknowledged by the dead-letter topic.",
                &["topic", "reason"],
            ),
            events_skipped: counter(
                &registry,
                "vault_events_skipped_total",
                "Invalid events dropped because pipeline.on_invalid = skip.",
                &["topic", "reason"],
            ),
            batches_flushed: counter(
                &registry,
                "vault_batches_flushed_total",
                "Batches handed to the persisters, by flush reason.",
                &["reason"],
            ),
            batch_events: histogram(
                &registry,
                "vault_batch_events",
                "Events per flushed batch.",
                exponential_buckets(1.0, 2.0, 15).expect("valid buckets"),
            ),
            batch_bytes: histogram(
                &registry,
                "vault_batch_bytes",
                "Bytes per flushed batch.",
                exponential_buckets(256.0, 2.0, 16).expect("valid buckets"),
            ),
            batch_write_duration: histogram(
                &registry,
                "vault_batch_write_duration_seconds",
                "Duration of one store write attempt of a batch.",
                exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
            ),
            store_retries: counter(
                &registry,
                "vault_write_retries_total",
                "Failed write attempts that will be retried, by error kind.",
                &["kind"],
            ),
            commits: counter(
                &registry,
                "vault_commits_total",
                "Offset commits, by result.",
                &["result"],
            ),
            committed_offset: gauge_vec(
                &registry,
                "vault_committed_offset",
                "Last offset committed (next offset to read).",
                &["topic", "partition"],
            ),
            rebalances: counter(
                &registry,
                "vault_rebalances_total",
                "Rebalance events, by kind (assign, revoke, lost).",
                &["kind"],
            ),
            assigned_partitions: gauge(
                &registry,
                "vault_assigned_partitions",
                "Partitions currently assigned to this instance.",
            ),
            in_flight_batches: gauge(
                &registry,
                "vault_in_flight_batches",
                "Batches being written right now.",
            ),
            partition_restarts: counter(
                &registry,
                "vault_partition_restarts_total",
                "Partition tasks restarted from the last commit after a failure.",
                &["topic"],
            ),
            build_info: gauge_vec(
                &registry,
                "vault_build_info",
                "Build information; the value is always 1.",
                &["version"],
            ),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            out = format!("# encoding metrics failed: {e}\n");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
