//! Every metric vault exports, named here and nowhere else. Labels are bounded: topic, partition,
//! reason or kind — never anything derived from event content.

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Buckets of `vault_end_to_end_latency_seconds`: one edge at the 250 ms latency target (so
/// the share of events within it is read exactly, not interpolated), fine below it, and up to
/// an hour, so a catch-up after an outage of minutes lands in a bucket rather than +Inf.
pub const END_TO_END_BUCKETS: [f64; 19] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.175, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1200.0, 3600.0,
];

/// librdkafka's consumer group handler states (`cgrp.state` in its statistics).
pub const GROUP_STATES: [&str; 7] = [
    "init",
    "term",
    "query-coord",
    "wait-coord",
    "wait-broker",
    "wait-broker-transport",
    "up",
];

/// librdkafka's consumer group join states (`cgrp.join_state` in its statistics).
pub const GROUP_JOIN_STATES: [&str; 9] = [
    "init",
    "wait-join",
    "wait-metadata",
    "wait-sync",
    "wait-assign-call",
    "wait-unassign-call",
    "wait-unassign-to-complete",
    "wait-incr-unassign-to-complete",
    "steady",
];

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
    pub write_concurrency_limit: IntGauge,
    pub write_requests_in_flight: IntGauge,
    pub write_unplaced_partitions: IntCounter,
    pub write_erased_rows: IntCounter,
    pub write_rate_limit: IntGauge,
    pub write_rate_limited_seconds: Counter,
    pub in_flight_bytes: IntGauge,
    pub prefetched_bytes: IntGauge,
    pub consumer_lag_seconds: GaugeVec,
    pub log_end_offset: IntGaugeVec,
    pub group_state: IntGaugeVec,
    pub group_join_state: IntGaugeVec,
    pub group_generation: IntGauge,
    pub group_rebalance_age: Gauge,
    pub broker_rtt: GaugeVec,
    pub broker_errors: IntCounterVec,
    pub dead_letter_send_failures: IntCounterVec,
    pub group_committed_offset: IntGaugeVec,
    pub group_log_end_offset: IntGaugeVec,
    pub group_lag: IntGaugeVec,
    pub topic_partitions: IntGaugeVec,
    pub partition_restarts: IntCounterVec,
    pub restart_seek_failures: IntCounterVec,
    pub retries_out_of_memory: IntCounterVec,
    pub runtime_workers: IntGaugeVec,
    pub runtime_busy_seconds: CounterVec,
    /// The runtimes `vault_runtime_*` follow, read at each scrape ([`Metrics::watch_runtime`]).
    runtimes: std::sync::Mutex<Vec<WatchedRuntime>>,
    pub build_info: IntGaugeVec,
}

/// The main runtime (`runtime="main"`): Kafka, the batchers, the coordinator; and the persisters
/// and the driver too with `scylla.store_threads = 0`.
pub const RUNTIME_MAIN: &str = "main";
/// The store's runtime (`store::runtime`): the ScyllaDB driver and the persisters.
pub const RUNTIME_STORE: &str = "store";

/// Seconds the workers of `handle`'s runtime have spent running tasks, summed over them.
fn busy_seconds(handle: &tokio::runtime::Handle) -> f64 {
    let metrics = handle.metrics();
    (0..metrics.num_workers())
        .map(|w| metrics.worker_total_busy_duration(w).as_secs_f64())
        .sum()
}

struct WatchedRuntime {
    name: &'static str,
    handle: tokio::runtime::Handle,
    /// Busy seconds of its workers already counted.
    counted: f64,
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
                END_TO_END_BUCKETS.to_vec(),
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
                "Messages behind: the partition's end offset minus the committed offset (with nothing committed, minus the position read, or the log start before the first read), from librdkafka statistics.",
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
            write_concurrency_limit: b.gauge(
                "vault_write_concurrency_limit",
                "Write requests the store may have in flight at once: adapted to the database's answers with scylla.adaptive_concurrency, else scylla.max_concurrent_requests.",
            ),
            write_requests_in_flight: b.gauge(
                "vault_write_requests_in_flight",
                "Write requests in flight to the store right now (each an UNLOGGED batch, or one statement, of rows or of day-index entries).",
            ),
            write_unplaced_partitions: b.int_counter(
                "vault_write_unplaced_partitions_total",
                "Partitions written (retries included) whose replicas the driver did not know: on a keyspace with tablets before it learned theirs, or one it had no metadata for yet. Each went by partition to a node the driver picked, which forwards it, or as a probe (a few a write teach the driver). Its rate falls to about zero once the driver has learned the tablets; it stays up where every node is a replica of everything, with nothing to learn.",
            ),
            write_erased_rows: b.int_counter(
                "vault_write_erased_rows_total",
                "Event rows not written because their user was erased through their version: a replay of messages from before an erasure (a new group, an offset reset), kept out also once the erasure's tombstones are purged.",
            ),
            write_rate_limit: b.gauge(
                "vault_write_rate_limit_rows_per_second",
                "Event rows this instance may write per second, across all persisters (scylla.max_rows_per_second); 0: unlimited.",
            ),
            write_rate_limited_seconds: b.float_counter(
                "vault_write_rate_limited_seconds_total",
                "Seconds write requests waited for scylla.max_rows_per_second before being sent, summed over requests (its rate is the mean number of requests held back by the limit).",
            ),
            in_flight_bytes: b.gauge(
                "vault_in_flight_bytes",
                "Memory of records read and not yet durable (open and flushed batches), of pipeline.max_in_flight_bytes.",
            ),
            prefetched_bytes: b.gauge(
                "vault_kafka_prefetched_bytes",
                "Bytes of messages librdkafka has fetched and vault not yet read, of kafka.prefetch_bytes (from its statistics).",
            ),
            consumer_lag_seconds: b.float_gauge_vec(
                "vault_consumer_lag_seconds",
                "Seconds behind, per partition this instance owns: 0 when nothing is left to read (vault_consumer_lag 0); else now minus the Kafka timestamp of the last message read, or, before the first read of the assignment, the seconds since the assignment.",
                &["topic", "partition"],
            ),
            log_end_offset: b.gauge_vec(
                "vault_log_end_offset",
                "The partition's log-end offset (last stable offset), per partition this instance owns (from librdkafka statistics).",
                &["topic", "partition"],
            ),
            group_state: b.gauge_vec(
                "vault_kafka_group_state",
                "1 for the consumer group handler's current state (librdkafka's cgrp state: up is a member), 0 for the others.",
                &["state"],
            ),
            group_join_state: b.gauge_vec(
                "vault_kafka_group_join_state",
                "1 for the consumer group handler's current join state (steady: joined, not rebalancing), 0 for the others.",
                &["state"],
            ),
            group_generation: b.gauge(
                "vault_kafka_group_generation",
                "The consumer group generation this member last joined (-1 before it joined); every rebalance of the group increments it.",
            ),
            group_rebalance_age: b.float_gauge(
                "vault_kafka_group_seconds_since_rebalance",
                "Seconds since this member's last rebalance (assign or revoke), from librdkafka statistics.",
            ),
            broker_rtt: b.float_gauge_vec(
                "vault_kafka_broker_rtt_seconds",
                "Round-trip time of requests to each broker over the last statistics interval (stat: avg or p99).",
                &["broker", "stat"],
            ),
            broker_errors: b.counter(
                "vault_kafka_broker_errors_total",
                "Errors talking to each broker, by kind: tx and rx (request send and receive errors), timeout (requests timed out), disconnect.",
                &["broker", "kind"],
            ),
            dead_letter_send_failures: b.counter(
                "vault_dead_letter_send_failures_total",
                "Dead-letter sends that failed and are retried (each attempt); permanent refusals also count in vault_dead_letters_refused_total.",
                &["topic"],
            ),
            group_committed_offset: b.gauge_vec(
                "vault_group_committed_offset",
                "The consumer group's committed offset, for every partition of the subscribed topics, owned by anyone or by no one (read from the broker by every instance: aggregate with max by (topic, partition)).",
                &["topic", "partition"],
            ),
            group_log_end_offset: b.gauge_vec(
                "vault_group_log_end_offset",
                "The log-end offset (last stable offset) of every partition of the subscribed topics (read from the broker by every instance: aggregate with max by (topic, partition)).",
                &["topic", "partition"],
            ),
            group_lag: b.gauge_vec(
                "vault_group_lag",
                "Messages behind for every partition of the subscribed topics: log-end offset minus the group's committed offset (minus the log-start offset when nothing is committed). Aggregate with max by (topic, partition).",
                &["topic", "partition"],
            ),
            topic_partitions: b.gauge_vec(
                "vault_topic_partitions",
                "Partitions of each subscribed topic (every instance reports it: aggregate with max by (topic)).",
                &["topic"],
            ),
            restart_seek_failures: b.counter(
                "vault_restart_seek_failures_total",
                "Restarts of a failed partition not started because the seek to where it must resume (or reading the committed offset) failed; each is tried again.",
                &["topic"],
            ),
            retries_out_of_memory: b.counter(
                "vault_retries_out_of_memory_total",
                "Failing batches abandoned instead of retried because healthy partitions (no write failed since their last durable batch) were waiting for pipeline.max_in_flight_bytes and failing batches held their half of it; each one's partition restarts where it must resume.",
                &["topic"],
            ),
            partition_restarts: b.counter(
                "vault_partition_restarts_total",
                "Partition tasks restarted from the last commit after a failure.",
                &["topic"],
            ),
            runtime_workers: b.gauge_vec(
                "vault_runtime_workers",
                "Worker threads of each of vault's async runtimes: main (Kafka, batching, commits) and store (the ScyllaDB driver and the persisters, scylla.store_threads).",
                &["runtime"],
            ),
            runtime_busy_seconds: b.float_counter_vec(
                "vault_runtime_busy_seconds_total",
                "Seconds the runtime's workers spent running tasks, summed over its workers: a rate near vault_runtime_workers means every worker is busy all the time (for store, raise scylla.store_threads; for main, the pod needs more CPU).",
                &["runtime"],
            ),
            runtimes: std::sync::Mutex::default(),
            build_info: b.gauge_vec(
                "vault_build_info",
                "Build information; the value is always 1. commit: VAULT_GIT_COMMIT when the binary was built (unknown otherwise); librdkafka: the linked librdkafka's version.",
                &["version", "commit", "librdkafka"],
            ),
            names: b.names,
            registry: b.registry,
        };
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), GIT_COMMIT, &librdkafka])
            .set(1);
        for state in GROUP_STATES {
            m.group_state.with_label_values(&[state]).set(0);
        }
        for state in GROUP_JOIN_STATES {
            m.group_join_state.with_label_values(&[state]).set(0);
        }
        m.group_generation.set(-1);
        for reason in crate::pipeline::flush::FlushReason::ALL {
            m.batches_flushed.with_label_values(&[reason.as_str()]);
        }
        for result in ["ok", "error"] {
            m.commits.with_label_values(&[result]);
        }
        for kind in ["assign", "revoke", "lost"] {
            m.rebalances.with_label_values(&[kind]);
        }
        for kind in crate::store::StoreError::KINDS.iter().chain(&["erase"]) {
            m.store_retries.with_label_values(&[kind]);
        }
        if let Err(e) = m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(error = %e, "The process_* metrics are not available.");
        }
        m
    }

    /// Creates, at 0, the series of every counter labelled by topic (and by a known set of
    /// reasons), so that the first increment shows in `rate()` and `increase()`.
    pub fn precreate_topics(&self, topics: &[String]) {
        for topic in topics {
            let t = topic.as_str();
            for c in [
                &self.events_stored,
                &self.erasures,
                &self.events_expired,
                &self.partition_restarts,
                &self.restart_seek_failures,
                &self.dead_letter_send_failures,
                &self.retries_out_of_memory,
            ] {
                c.with_label_values(&[t]);
            }
            for kind in crate::event::EventError::KINDS {
                self.events_dead_lettered.with_label_values(&[t, kind]);
                self.events_skipped.with_label_values(&[t, kind]);
            }
        }
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
        let _ = self.consumer_lag_seconds.remove_label_values(&labels);
        let _ = self.log_end_offset.remove_label_values(&labels);
        // Its new owner counts from its own start; rate() reads the drop as a counter reset.
        let _ = self.events_consumed.remove_label_values(&labels);
    }

    /// Follows `handle` as `vault_runtime_*{runtime=name}` (its busy time from now on), until
    /// this registry is dropped; a runtime watched under `name` before is no longer followed.
    pub fn watch_runtime(&self, name: &'static str, handle: tokio::runtime::Handle) {
        self.runtime_workers
            .with_label_values(&[name])
            .set(handle.metrics().num_workers() as i64);
        self.runtime_busy_seconds.with_label_values(&[name]);
        let counted = busy_seconds(&handle);
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
        runtimes.retain(|r| r.name != name);
        runtimes.push(WatchedRuntime {
            name,
            handle,
            counted,
        });
    }

    /// Adds to `vault_runtime_busy_seconds_total` what each watched runtime's workers have been
    /// busy since the last count. A worker's busy time is published when it parks or every few
    /// dozen tasks, so a worker stuck in one task shows none meanwhile.
    fn count_runtimes_busy(&self) {
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
        for r in runtimes.iter_mut() {
            let busy = busy_seconds(&r.handle);
            if busy > r.counted {
                self.runtime_busy_seconds
                    .with_label_values(&[r.name])
                    .inc_by(busy - r.counted);
                r.counted = busy;
            }
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        self.count_runtimes_busy();
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            out = format!("# encoding metrics failed: {e}\n");
        }
        out
    }
}

/// The commit vault was built from: `VAULT_GIT_COMMIT` in the build's environment (the
/// Dockerfile and CI pass it), `unknown` otherwise. No build script asks git, so a build from a
/// source archive works.
pub const GIT_COMMIT: &str = match option_env!("VAULT_GIT_COMMIT") {
    Some(c) if !c.is_empty() => c,
    _ => "unknown",
};

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

    fn int_counter(&mut self, name: &'static str, help: &str) -> IntCounter {
        let c = IntCounter::new(name, help).expect("valid metric");
        self.add(name, c)
    }

    fn float_counter(&mut self, name: &'static str, help: &str) -> Counter {
        let c = Counter::new(name, help).expect("valid metric");
        self.add(name, c)
    }

    fn float_counter_vec(&mut self, name: &'static str, help: &str, labels: &[&str]) -> CounterVec {
        let c = CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
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

    fn float_gauge(&mut self, name: &'static str, help: &str) -> Gauge {
        let g = Gauge::new(name, help).expect("valid metric");
        self.add(name, g)
    }

    fn float_gauge_vec(&mut self, name: &'static str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.add(name, g)
    }

    fn histogram_vec(
        &mut self,
        name: &'static str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> HistogramVec {
        let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("valid metric");
        self.add(name, h)
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

/// How an export's body ended (`vault_api_export_duration_seconds{outcome}`).
pub const EXPORT_OUTCOMES: [&str; 3] = [EXPORT_COMPLETE, EXPORT_STORE, EXPORT_DROPPED];
/// The whole body went out.
pub const EXPORT_COMPLETE: &str = "complete";
/// A store read failed after the 200 went out: the client got a cut export.
pub const EXPORT_STORE: &str = "store";
/// The body was dropped unfinished: the client went away, or the server closed the connection
/// (its age limit, or shutdown).
pub const EXPORT_DROPPED: &str = "dropped";

/// The metrics of `vault api`, a process of its own with its own registry: requests by route
/// template (never the user id in the path) and status, and their latency by route.
pub struct ApiMetrics {
    pub registry: Registry,
    pub names: Vec<&'static str>,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Whole exports, from arrival to the body's end (or its cut), by how they ended.
    pub export_duration: HistogramVec,
    pub build_info: IntGaugeVec,
}

impl ApiMetrics {
    pub fn new() -> Self {
        let mut b = Builder::default();
        let requests = b.counter(
            "vault_api_requests_total",
            "Requests to vault api, by route template and HTTP status.",
            &["route", "status"],
        );
        let request_duration = b.histogram_vec(
            "vault_api_request_duration_seconds",
            "Time from a request's arrival to its response headers (an export's body streams after), by route template.",
            exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
            &["route"],
        );
        let export_duration = b.histogram_vec(
            "vault_api_export_duration_seconds",
            "Time from an export's arrival to the end of its body, by how it ended: complete, store (a read failed after the 200 was sent: the client got a cut export), or dropped (the body was dropped unfinished: the client went away, or the server closed the connection at its age limit or on shutdown).",
            exponential_buckets(0.001, 2.0, 20).expect("valid buckets"),
            &["outcome"],
        );
        for outcome in EXPORT_OUTCOMES {
            export_duration.with_label_values(&[outcome]);
        }
        let build_info = b.gauge_vec(
            "vault_build_info",
            "Build information; the value is always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        ApiMetrics {
            names: b.names,
            registry: b.registry,
            requests,
            request_duration,
            export_duration,
            build_info,
        }
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

impl Default for ApiMetrics {
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
        // `vault run`'s metrics and `vault api`'s.
        let api = ApiMetrics::new();
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
                    [&m.names, &api.names]
                        .iter()
                        .any(|names| names.contains(&name.as_str()) || names.contains(&base)),
                    "{file} uses {name}, which vault does not export"
                );
                used += 1;
            }
            assert!(used > 5, "{file} uses vault metrics");
            // The process collector's series (process_*) too.
            let rendered = m.render();
            for (i, _) in text.match_indices("process_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                assert!(
                    rendered.contains(&format!("\n{name} ")),
                    "{file} uses {name}, which vault does not export"
                );
            }
        }
    }

    /// A watched runtime's workers and the time they spent running tasks are exported, and
    /// the count only grows.
    #[test]
    fn a_watched_runtime_exports_its_workers_and_busy_time() {
        let m = Metrics::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        m.watch_runtime(RUNTIME_STORE, runtime.handle().clone());
        let busy = || {
            m.render();
            m.runtime_busy_seconds
                .with_label_values(&[RUNTIME_STORE])
                .get()
        };
        let before = busy();
        // A task that holds its worker for 100 ms.
        runtime
            .block_on(
                runtime.spawn(async { std::thread::sleep(std::time::Duration::from_millis(100)) }),
            )
            .unwrap();
        // The worker publishes its busy time once it parks, maybe just after it answered.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut after = busy();
        while after - before < 0.09 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            after = busy();
        }
        assert!(after - before >= 0.09, "{before} then {after}");
        assert!(after - before < 5.0, "{before} then {after}");
        assert!(busy() >= after);
        // Watched again: counted from then on, not from the runtime's start.
        m.watch_runtime(RUNTIME_STORE, runtime.handle().clone());
        assert!(busy() - after < 0.09, "{after} then {}", busy());
        assert!(m
            .render()
            .contains("vault_runtime_workers{runtime=\"store\"} 2\n"));
    }

    /// The kinds listed for pre-created series are every kind the errors report.
    #[test]
    fn the_listed_error_kinds_are_the_kinds_reported() {
        use crate::event::EventError;
        use crate::store::StoreError;
        let s = String::new;
        let store: Vec<_> = [
            StoreError::Timeout(s()),
            StoreError::Overloaded(s()),
            StoreError::Unavailable(s()),
            StoreError::Connection(s()),
            StoreError::Invalid(s()),
            StoreError::Schema(s()),
            StoreError::Auth(s()),
            StoreError::Config(s()),
        ]
        .iter()
        .map(StoreError::kind)
        .collect();
        assert_eq!(store, StoreError::KINDS);
        let event: Vec<_> = [
            EventError::Tombstone,
            EventError::TooLarge { size: 0, limit: 0 },
            EventError::NotUtf8(s()),
            EventError::Json(s()),
            EventError::NotAnObject,
            EventError::TooDeep { limit: 0, at: 0 },
            EventError::BadUnicode { escape: s(), at: 0 },
            EventError::FutureTimestamp {
                timestamp: s(),
                now: s(),
            },
            EventError::MissingField("f"),
            EventError::InvalidField {
                field: "f",
                reason: s(),
            },
            EventError::Rejected(s()),
            EventError::Undecodable(s()),
        ]
        .iter()
        .map(EventError::kind)
        .collect();
        assert_eq!(event, EventError::KINDS);
    }

    /// What an operator expects before anything happened: process_* series, the build's
    /// commit and librdkafka version, labelled counters at 0 (so a first increment shows in
    /// rate()), and latency buckets with an edge at the 250 ms target reaching past 10 minutes.
    #[test]
    fn a_fresh_registry_shows_process_build_and_zeroed_counters() {
        let m = Metrics::new();
        m.precreate_topics(&["t".to_owned()]);
        let text = m.render();
        for series in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
            "vault_batches_flushed_total{reason=\"idle\"} 0",
            "vault_commits_total{result=\"error\"} 0",
            "vault_rebalances_total{kind=\"lost\"} 0",
            "vault_write_retries_total{kind=\"timeout\"} 0",
            "vault_events_stored_total{topic=\"t\"} 0",
            "vault_events_dead_lettered_total{reason=\"bad_json\",topic=\"t\"} 0",
            "vault_dead_letter_send_failures_total{topic=\"t\"} 0",
            "vault_retries_out_of_memory_total{topic=\"t\"} 0",
            "vault_partition_restarts_total{topic=\"t\"} 0",
            "vault_kafka_group_state{state=\"up\"} 0",
            "vault_kafka_group_generation -1",
            "vault_write_rate_limit_rows_per_second 0",
            "vault_write_rate_limited_seconds_total 0",
            "vault_end_to_end_latency_seconds_bucket{le=\"0.25\"} 0",
            "vault_end_to_end_latency_seconds_bucket{le=\"1200\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        assert!(
            text.contains(&format!(
                "vault_build_info{{commit=\"{GIT_COMMIT}\",librdkafka=\"{librdkafka}\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(END_TO_END_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(END_TO_END_BUCKETS.iter().any(|b| *b > 600.0));
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
        assert!(rendered.contains("vault_build_info{"));
        let api = ApiMetrics::new();
        for name in &api.names {
            assert!(name.starts_with("vault_"), "{name}");
        }
        assert!(api.render().contains("vault_build_info{version="));
    }
}
