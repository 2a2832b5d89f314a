//! Every metric vault exports, named here and nowhere else. Labels are bounded: topic, partition,
//! reason or kind — never anything derived from event content.

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// The metrics of one pipeline. Each instance has its own registry, so tests can run several
/// pipelines in one process.
pub struct Metrics {
    pub registry: Registry,
    /// The name of every metric family registered above, for checks of dashboards and alerts.
    pub names: Vec<&'static str>,
    pub ready: IntGauge,
    pub events_consumed: IntCounterVec,
    pub events_stored: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub events_skipped: IntCounterVec,
    pub batches_flushed: IntCounterVec,
    pub batch_events: Histogram,
    pub batch_bytes: Histogram,
    pub batch_write_duration: Histogram,
    pub end_to_end_latency: Histogram,
    pub store_retries: IntCounterVec,
    pub dead_letters_refused: IntCounterVec,
    pub erasures: IntCounterVec,
    pub events_expired: IntCounterVec,
    pub commits: IntCounterVec,
    pub commit_duration: Histogram,
    pub committed_offset: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub oldest_uncommitted_age: GaugeVec,
    pub seconds_since_commit: GaugeVec,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub in_flight_batches: IntGauge,
    pub in_flight_bytes: IntGauge,
    pub prefetched_bytes: IntGauge,
    pub partition_restarts: IntCounterVec,
    pub restart_seek_failures: IntCounterVec,
    pub retries_out_of_memory: IntCounterVec,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let mut b = Builder::default();
        let m = Metrics {
            ready: b.gauge(
                "vault_ready",
                "1 while the instance is ready (as /readyz), 0 otherwise; set at each scrape.",
            ),
            events_consumed: b.counter(
                "vault_events_consumed_total",
                "Kafka messages read, valid or not.",
                &["topic", "partition"],
            ),
            events_stored: b.counter(
                "vault_events_stored_total",
                "Events acknowledged by the store.",
                &["topic"],
            ),
            events_dead_lettered: b.counter(
                "vault_events_dead_lettered_total",
                "Invalid events acknowledged by the dead-letter topic.",
                &["topic", "reason"],
            ),
            events_skipped: b.counter(
                "vault_events_skipped_total",
                "Invalid events dropped because pipeline.on_invalid = skip.",
                &["topic", "reason"],
            ),
            batches_flushed: b.counter(
                "vault_batches_flushed_total",
                "Batches handed to the persisters, by flush reason.",
                &["reason"],
            ),
            batch_events: b.histogram(
                "vault_batch_events",
                "Events per flushed batch.",
                exponential_buckets(1.0, 2.0, 15).expect("valid buckets"),
            ),
            batch_bytes: b.histogram(
                "vault_batch_bytes",
                "Bytes per flushed batch.",
                exponential_buckets(256.0, 2.0, 16).expect("valid buckets"),
            ),
            batch_write_duration: b.histogram(
                "vault_batch_write_duration_seconds",
                "Duration of one store write attempt of a batch.",
                exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
            ),
            end_to_end_latency: b.histogram(
                "vault_end_to_end_latency_seconds",
                "From an event's Kafka timestamp to its write being acknowledged by the store.",
                exponential_buckets(0.005, 2.0, 16).expect("valid buckets"),
            ),
            store_retries: b.counter(
                "vault_write_retries_total",
                "Failed write attempts that will be retried, by error kind.",
                &["kind"],
            ),
            dead_letters_refused: b.counter(
                "vault_dead_letters_refused_total",
                "Dead-letter sends refused by a permanent error (too large even when cut, missing topic, no authorization): the partition stalls until it is fixed.",
                &["topic", "error"],
            ),
            events_expired: b.counter(
                "vault_events_expired_total",
                "Events not written because they were past their retention (occurred_at + retention of their type) when read.",
                &["topic"],
            ),
            erasures: b.counter(
                "vault_erasures_total",
                "User erasures requested on Kafka (tombstones, with pipeline.tombstones = erase) and made durable.",
                &["topic"],
            ),
            commits: b.counter(
                "vault_commits_total",
                "Offset commits, by result.",
                &["result"],
            ),
            commit_duration: b.histogram(
                "vault_commit_duration_seconds",
                "Duration of one synchronous offset commit (periodic, revoke or shutdown).",
                exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
            ),
            consumer_lag: b.gauge_vec(
                "vault_consumer_lag",
                "Messages behind: the partition's end offset minus the committed offset (from librdkafka statistics).",
                &["topic", "partition"],
            ),
            oldest_uncommitted_age: b.float_gauge_vec(
                "vault_oldest_uncommitted_event_age_seconds",
                "How long the oldest event read but not yet durable has been waiting (0 when none).",
                &["topic", "partition"],
            ),
            seconds_since_commit: b.float_gauge_vec(
                "vault_seconds_since_last_commit",
                "Seconds since the partition's committed offset last advanced or was last fully caught up.",
                &["topic", "partition"],
            ),
            committed_offset: b.gauge_vec(
                "vault_committed_offset",
                "Last offset committed (next offset to read).",
                &["topic", "partition"],
            ),
            rebalances: b.counter(
                "vault_rebalances_total",
                "Rebalance events, by kind (assign, revoke, lost).",
                &["kind"],
            ),
            assigned_partitions: b.gauge(
                "vault_assigned_partitions",
                "Partitions currently assigned to this instance.",
            ),
            in_flight_batches: b.gauge(
                "vault_in_flight_batches",
                "Batches being written right now.",
            ),
            in_flight_bytes: b.gauge(
                "vault_in_flight_bytes",
                "Memory of records read and not yet durable (open and flushed batches), of pipeline.max_in_flight_bytes.",
            ),
            prefetched_bytes: b.gauge(
                "vault_kafka_prefetched_bytes",
                "Bytes of messages librdkafka has fetched and vault not yet read, of kafka.prefetch_bytes (from its statistics).",
            ),
            restart_seek_failures: b.counter(
                "vault_restart_seek_failures_total",
                "Restarts of a failed partition not started because the seek to where it must resume (or reading the committed offset) failed; each is tried again.",
                &["topic"],
            ),
            retries_out_of_memory: b.counter(
                "vault_retries_out_of_memory_total",
                "Failing batches abandoned instead of retried because failing batches already hold half of pipeline.max_in_flight_bytes; each one's partition restarts where it must resume.",
                &["topic"],
            ),
            partition_restarts: b.counter(
                "vault_partition_restarts_total",
                "Partition tasks restarted from the last commit after a failure.",
                &["topic"],
            ),
            build_info: b.gauge_vec(
                "vault_build_info",
                "Build information; the value is always 1.",
                &["version"],
            ),
            names: b.names,
            registry: b.registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Drops the per-partition series of a partition this instance no longer owns, so that a
    /// stale value can never raise an alert on the wrong instance.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let p = partition.to_string();
        let labels = [topic, p.as_str()];
        let _ = self.committed_offset.remove_label_values(&labels);
        let _ = self.oldest_uncommitted_age.remove_label_values(&labels);
        let _ = self.seconds_since_commit.remove_label_values(&labels);
        let _ = self.consumer_lag.remove_label_values(&labels);
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

/// Registers metric families and remembers their names.
#[derive(Default)]
struct Builder {
    registry: Registry,
    names: Vec<&'static str>,
}

impl Builder {
    fn add<C: Collector + Clone + 'static>(&mut self, name: &'static str, c: C) -> C {
        self.registry
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        self.names.push(name);
        c
    }

    fn counter(&mut self, name: &'static str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.add(name, c)
    }

    fn gauge(&mut self, name: &'static str, help: &str) -> IntGauge {
        let g = IntGauge::new(name, help).expect("valid metric");
        self.add(name, g)
    }

    fn gauge_vec(&mut self, name: &'static str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.add(name, g)
    }

    fn float_gauge_vec(&mut self, name: &'static str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.add(name, g)
    }

    fn histogram(&mut self, name: &'static str, help: &str, buckets: Vec<f64>) -> Histogram {
        let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric");
        self.add(name, h)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `vault_*` name the dashboard and the alert rules use is a metric this module exports
    /// (histograms through their `_bucket`, `_sum` and `_count` series).
    #[test]
    fn dashboards_and_alerts_only_use_exported_metrics() {
        let m = Metrics::new();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        for file in [
            "grafana/dashboards/vault.json",
            "prometheus/alerts.yml",
            "prometheus/alerts.test.yml",
        ] {
            let text = std::fs::read_to_string(dir.join(file)).expect("deploy file");
            let mut used = 0;
            for (i, _) in text.match_indices("vault_") {
                let boundary = i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric();
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !boundary {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    m.names.contains(&name.as_str()) || m.names.contains(&base),
                    "{file} uses {name}, which vault does not export"
                );
                used += 1;
            }
            assert!(used > 5, "{file} uses vault metrics");
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        for name in &m.names {
            assert!(name.starts_with("vault_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        let rendered = m.render();
        assert!(rendered.contains("vault_build_info{version="));
    }
}
