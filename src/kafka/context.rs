//! The consumer context: librdkafka's callbacks, turned into messages to the coordinator.
//!
//! Runs on the thread that polls the consumer's main queue (see `run`), never on a runtime worker,
//! so it may block while the coordinator drains revoked partitions.
//!
//! - Assign: each partition's queue is split off *before* librdkafka starts fetching it, so no
//!   message of an assigned partition can land on the main queue.
//! - Revoke: the coordinator drains the partitions (flush, await in-flight writes) and commits
//!   their final offsets synchronously while this callback waits, so they are committed before
//!   librdkafka hands the partitions to another member. Lost partitions (session expired) are
//!   drained but not committed: the group has moved on and the commit would be refused.
//! - Fatal errors (e.g. a static member fenced by another with the same `group.instance.id`)
//!   are handed to the coordinator, which drains, commits what it may and ends the run with
//!   the cause.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::kafka::coordinator::{Assigned, Command};
use crate::pipeline::deadline::{Deadlines, HEARTBEAT_EVERY};
use crate::telemetry::health::Loop;
use crate::telemetry::metrics::{GROUP_JOIN_STATES, GROUP_STATES};
use crate::telemetry::{Health, Metrics};
use std::sync::Arc;

pub type VaultConsumer = StreamConsumer<VaultContext>;

/// How often the main queue (commit results, errors, rebalances) is served at the latest. A
/// failed asynchronous commit is only re-sent once its result has been seen.
pub const MAIN_QUEUE_POLL: Duration = Duration::from_millis(100);

pub struct VaultContext {
    commands: mpsc::UnboundedSender<Command>,
    consumer: OnceLock<Weak<VaultConsumer>>,
    deadlines: Deadlines,
    metrics: Arc<Metrics>,
    /// The poll thread's heartbeat, kept beating while a revoke waits for the coordinator.
    health: Arc<Health>,
    /// Whether a fatal error was handed to the coordinator already.
    fatal_reported: AtomicBool,
    /// The consumer lag of each partition this member fetches, from the last statistics.
    lags: Mutex<HashMap<String, HashMap<i32, i64>>>,
    /// The brokers the last statistics named, whose series are removed once they are gone.
    brokers: Mutex<BTreeSet<String>>,
}

impl VaultContext {
    pub fn new(
        commands: mpsc::UnboundedSender<Command>,
        deadlines: Deadlines,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        VaultContext {
            commands,
            consumer: OnceLock::new(),
            deadlines,
            metrics,
            health,
            fatal_reported: AtomicBool::new(false),
            lags: Mutex::new(HashMap::new()),
            brokers: Mutex::new(BTreeSet::new()),
        }
    }

    /// The consumer lag of a partition this member fetches, as of the last statistics (every
    /// 5 s); `None` before they report it.
    pub fn lag(&self, topic: &str, partition: i32) -> Option<i64> {
        self.lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .and_then(|partitions| partitions.get(&partition))
            .copied()
    }

    /// This member's id in the group, as librdkafka holds it (empty once it has sent its
    /// LeaveGroup); `None` when the consumer is gone.
    pub fn member_id(&self) -> Option<String> {
        let consumer = self.consumer.get().and_then(Weak::upgrade)?;
        let client = consumer.client();
        // SAFETY: as in `generation`; the member id is copied before the metadata is destroyed.
        unsafe {
            let md = rdkafka::bindings::rd_kafka_consumer_group_metadata(client.native_ptr());
            if md.is_null() {
                return None;
            }
            let id = rdkafka::bindings::rd_kafka_consumer_group_metadata_member_id(md);
            let owned = (!id.is_null())
                .then(|| std::ffi::CStr::from_ptr(id).to_string_lossy().into_owned());
            rdkafka::bindings::rd_kafka_consumer_group_metadata_destroy(md);
            owned
        }
    }

    /// The consumer group generation this member last joined, `None` before it joined.
    fn generation(&self) -> Option<i32> {
        let consumer = self.consumer.get().and_then(Weak::upgrade)?;
        let client = consumer.client();
        // SAFETY: the client pointer is valid while `consumer` lives; the metadata returned is
        // owned here and destroyed once read.
        let generation = unsafe {
            let md = rdkafka::bindings::rd_kafka_consumer_group_metadata(client.native_ptr());
            if md.is_null() {
                return None;
            }
            let g = rdkafka::bindings::rd_kafka_consumer_group_metadata_generation_id(md);
            rdkafka::bindings::rd_kafka_consumer_group_metadata_destroy(md);
            g
        };
        (generation >= 0).then_some(generation)
    }

    /// Gives the context the consumer it belongs to (needed to split partition queues).
    pub fn bind(&self, consumer: &Arc<VaultConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            warn!("Assignment received while the consumer is closing; ignored.");
            return;
        };
        let mut assigned = Vec::new();
        for e in tpl.elements() {
            match consumer.split_partition_queue(e.topic(), e.partition()) {
                Some(queue) => assigned.push(Assigned {
                    topic: Arc::from(e.topic()),
                    partition: e.partition(),
                    queue,
                }),
                None => error!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "Cannot split the queue of an assigned partition."
                ),
            }
        }
        info!(partitions = %describe(tpl), "Partitions assigned.");
        let _ = self.commands.send(Command::Assign(assigned));
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        self.metrics
            .rebalances
            .with_label_values(&[if lost { "lost" } else { "revoke" }])
            .inc();
        info!(partitions = %describe(tpl), lost, "Partitions revoked; draining.");
        let partitions = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let (reply, done) = sync_channel(1);
        if self
            .commands
            .send(Command::Revoke {
                partitions,
                lost,
                since: std::time::Instant::now(),
                reply,
            })
            .is_err()
        {
            return; // The coordinator has finished (shutdown): it already committed what it had.
        }
        // Waits in heartbeats: the poll thread is busy, not wedged, while the coordinator drains.
        let until = std::time::Instant::now() + self.deadlines.revoke_reply_wait();
        let answered = loop {
            self.health.beat(Loop::KafkaPoll);
            let left = until.saturating_duration_since(std::time::Instant::now());
            match done.recv_timeout(left.min(HEARTBEAT_EVERY)) {
                Ok(()) => break true,
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => continue,
                Err(_) => break false,
            }
        };
        if !answered {
            warn!("Coordinator did not answer the revoke in time; nothing committed for these partitions.");
        }
    }
    fn group_stats(&self, statistics: &Statistics) {
        let m = &self.metrics;
        if let Some(g) = &statistics.cgrp {
            for state in GROUP_STATES {
                m.group_state
                    .with_label_values(&[state])
                    .set(i64::from(state == g.state));
            }
            for state in GROUP_JOIN_STATES {
                m.group_join_state
                    .with_label_values(&[state])
                    .set(i64::from(state == g.join_state));
            }
            m.group_rebalance_age
                .set(Duration::from_millis(g.rebalance_age.max(0) as u64).as_secs_f64());
        }
        if let Some(generation) = self.generation() {
            m.group_generation.set(i64::from(generation));
        }
    }

    /// Round-trip times and error counts of the brokers this member talks to (bootstrap and
    /// internal handles, which have no node id, are left out). A round trip is shown only for
    /// an interval in which the broker answered a request (a broker that is down shows none,
    /// not its last good one), and a broker gone from the statistics loses its series.
    fn broker_stats(&self, statistics: &Statistics) {
        let m = &self.metrics;
        let mut named = BTreeSet::new();
        for b in statistics.brokers.values() {
            if b.nodeid < 0 {
                continue;
            }
            let name = b.name.as_str();
            named.insert(b.name.clone());
            match &b.rtt {
                Some(rtt) if rtt.cnt > 0 => {
                    for (stat, micros) in BROKER_RTT_STATS.into_iter().zip([rtt.avg, rtt.p99]) {
                        m.broker_rtt
                            .with_label_values(&[name, stat])
                            .set(micros.max(0) as f64 / 1e6);
                    }
                }
                _ => {
                    for stat in BROKER_RTT_STATS {
                        let _ = m.broker_rtt.remove_label_values(&[name, stat]);
                    }
                }
            }
            for (kind, total) in BROKER_ERROR_KINDS.into_iter().zip([
                b.txerrs,
                b.rxerrs,
                b.req_timeouts,
                b.disconnects.unwrap_or(0).max(0) as u64,
            ]) {
                // librdkafka reports running totals: the counter follows them.
                let c = m.broker_errors.with_label_values(&[name, kind]);
                if total > c.get() {
                    c.inc_by(total - c.get());
                }
            }
        }
        let gone: Vec<String> = {
            let mut brokers = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
            let gone = brokers.difference(&named).cloned().collect();
            *brokers = named;
            gone
        };
        for name in &gone {
            for stat in BROKER_RTT_STATS {
                let _ = m.broker_rtt.remove_label_values(&[name, stat]);
            }
            for kind in BROKER_ERROR_KINDS {
                let _ = m.broker_errors.remove_label_values(&[name, kind]);
            }
        }
    }
}

/// The `stat` labels of `vault_kafka_broker_rtt_seconds`.
const BROKER_RTT_STATS: [&str; 2] = ["avg", "p99"];
/// The `kind` labels of `vault_kafka_broker_errors_total`.
const BROKER_ERROR_KINDS: [&str; 4] = ["tx", "rx", "timeout", "disconnect"];

impl ClientContext for VaultContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // A fatal error (librdkafka raises it once, and every call fails after it) ends the run.
        let fatal = self
            .consumer
            .get()
            .and_then(Weak::upgrade)
            .and_then(|c| c.client().fatal_error());
        match fatal {
            Some((code, fatal_reason)) if !self.fatal_reported.swap(true, Ordering::AcqRel) => {
                error!(target: "librdkafka", error = %error, "{reason}");
                let _ = self
                    .commands
                    .send(Command::Fatal(format!("{code:?}: {fatal_reason}")));
            }
            _ => warn!(target: "librdkafka", error = %error, "{reason}"),
        }
    }

    /// librdkafka's periodic statistics (`statistics.interval.ms`): consumer lag and log-end
    /// offset of the partitions this member fetches (series of partitions it no longer fetches
    /// are removed), the bytes it holds fetched for them, the consumer group's state, and each
    /// broker's round-trip time and errors.
    fn stats(&self, statistics: Statistics) {
        self.group_stats(&statistics);
        self.broker_stats(&statistics);
        let mut lags: HashMap<String, HashMap<i32, i64>> = HashMap::new();
        let mut prefetched = 0;
        for (topic, t) in &statistics.topics {
            let mut topic_lags = HashMap::new();
            for (&partition, p) in &t.partitions {
                if partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let label = partition.to_string();
                let labels = [topic.as_str(), label.as_str()];
                if p.desired {
                    prefetched += p.fetchq_size;
                }
                let lag = lag_of(p.consumer_lag, p.ls_offset, p.app_offset, p.lo_offset);
                if let (true, Some(lag)) = (p.desired, lag) {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&labels)
                        .set(lag);
                    topic_lags.insert(partition, lag);
                } else if !p.desired {
                    let _ = self.metrics.consumer_lag.remove_label_values(&labels);
                    let _ = self.metrics.log_end_offset.remove_label_values(&labels);
                }
                if p.desired && p.ls_offset >= 0 {
                    self.metrics
                        .log_end_offset
                        .with_label_values(&labels)
                        .set(p.ls_offset);
                }
            }
            if !topic_lags.is_empty() {
                lags.insert(topic.clone(), topic_lags);
            }
        }
        *self.lags.lock().unwrap_or_else(|e| e.into_inner()) = lags;
        self.metrics
            .prefetched_bytes
            .set(i64::try_from(prefetched).unwrap_or(i64::MAX));
    }
}

impl ConsumerContext for VaultContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.assign(tpl),
            Rebalance::Revoke(tpl) => self.revoke(consumer, tpl),
            Rebalance::Error(e) => error!(error = %e, "Rebalance failed."),
        }
    }

    fn main_queue_min_poll_interval(&self) -> Timeout {
        Timeout::After(MAIN_QUEUE_POLL)
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        // Commits are synchronous and their results handled by the coordinator; this only
        // records what librdkafka reports for diagnostics.
        if let Err(e) = result {
            debug!(error = %e, partitions = %describe(offsets), "Commit result reported by librdkafka.");
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => format!("{}/{}@{}", e.topic(), e.partition(), o),
            _ => format!("{}/{}", e.topic(), e.partition()),
        })
        .collect();
    parts.join(",")
}

/// A partition's lag in messages, from its statistics: librdkafka's `consumer_lag` (log end
/// minus the committed offset); with nothing committed yet (`consumer_lag` -1), the log end
/// minus the position read (or the log start, before the first read), so that a partition
/// never committed still reads as behind. `None` before the log end is known.
fn lag_of(consumer_lag: i64, log_end: i64, read_position: i64, log_start: i64) -> Option<i64> {
    if consumer_lag >= 0 {
        return Some(consumer_lag);
    }
    if log_end < 0 {
        return None;
    }
    let from = if read_position >= 0 {
        read_position
    } else {
        log_start.max(0)
    };
    Some((log_end - from).max(0))
}

#[cfg(test)]
mod tests {
    use rdkafka::statistics::{Partition, Topic};

    use super::*;

    #[test]
    fn a_partition_never_committed_still_reads_as_behind() {
        assert_eq!(
            lag_of(40, 100, 90, 0),
            Some(40),
            "librdkafka's, from the commit"
        );
        assert_eq!(
            lag_of(-1, 100, 90, 0),
            Some(10),
            "nothing committed: from the read position"
        );
        assert_eq!(
            lag_of(-1, 100, -1, 30),
            Some(70),
            "nothing read: from the log start"
        );
        assert_eq!(lag_of(-1, 100, -1, -1), Some(100));
        assert_eq!(lag_of(-1, -1, -1, -1), None, "log end not known yet");
    }

    /// A context with metrics of its own, not bound to a consumer.
    fn context() -> (Arc<Metrics>, VaultContext) {
        let metrics = Arc::new(Metrics::new());
        let (tx, _rx) = mpsc::unbounded_channel();
        let deadlines = Deadlines {
            revoke_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
        };
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let context = VaultContext::new(tx, deadlines, metrics.clone(), health);
        (metrics, context)
    }

    fn partition(id: i32, desired: bool, lag: i64, fetchq_size: u64) -> (i32, Partition) {
        let p = Partition {
            partition: id,
            desired,
            consumer_lag: lag,
            fetchq_size,
            ls_offset: if desired { 100 + i64::from(id) } else { -1 },
            ..Default::default()
        };
        (id, p)
    }

    #[test]
    fn statistics_give_lag_per_fetched_partition_and_the_bytes_fetched_ahead() {
        let (metrics, context) = context();
        let stats = |partitions: Vec<(i32, Partition)>| {
            let topic = Topic {
                topic: "t".into(),
                partitions: partitions.into_iter().collect(),
                ..Default::default()
            };
            Statistics {
                topics: [("t".to_string(), topic)].into_iter().collect(),
                ..Default::default()
            }
        };
        context.stats(stats(vec![
            partition(0, true, 7, 1000),
            partition(1, true, 0, 24),
            // librdkafka's internal "unassigned" partition holds nothing of ours.
            partition(-1, false, -1, 5000),
        ]));
        assert_eq!(metrics.prefetched_bytes.get(), 1024);
        assert_eq!(metrics.consumer_lag.with_label_values(&["t", "0"]).get(), 7);
        assert_eq!(context.lag("t", 0), Some(7));
        assert_eq!(context.lag("t", 1), Some(0));
        assert_eq!(
            metrics.log_end_offset.with_label_values(&["t", "1"]).get(),
            101
        );

        // Partition 0 is no longer fetched: its lag series goes, its queue no longer counts.
        context.stats(stats(vec![
            partition(0, false, -1, 1000),
            partition(1, true, 3, 100),
        ]));
        assert_eq!(metrics.prefetched_bytes.get(), 100);
        assert_eq!(context.lag("t", 0), None, "no longer fetched");
        assert_eq!(context.lag("t", 1), Some(3));
        let families = metrics.registry.gather();
        let lag = families
            .iter()
            .find(|f| f.name() == "vault_consumer_lag")
            .expect("lag family");
        let series: Vec<_> = lag
            .get_metric()
            .iter()
            .flat_map(|m| m.get_label().iter())
            .filter(|l| l.name() == "partition")
            .map(|l| l.value().to_owned())
            .collect();
        assert_eq!(series, ["1"]);
        let text = metrics.render();
        assert!(
            !text.contains("vault_log_end_offset{partition=\"0\""),
            "{text}"
        );
    }

    #[test]
    fn statistics_give_the_group_state_and_each_brokers_round_trip_and_errors() {
        use rdkafka::statistics::{Broker, ConsumerGroup, Window};
        let (metrics, context) = context();
        let stats = |state: &str, txerrs: u64, rtt_avg: i64| {
            let broker = |nodeid: i32, name: &str| Broker {
                name: name.into(),
                nodeid,
                txerrs,
                rxerrs: 1,
                req_timeouts: 2,
                disconnects: Some(3),
                rtt: Some(Window {
                    avg: rtt_avg,
                    p99: 4 * rtt_avg,
                    cnt: 10,
                    ..Default::default()
                }),
                ..Default::default()
            };
            Statistics {
                brokers: [
                    ("b1".to_string(), broker(1, "kafka-1:9092/1")),
                    ("boot".to_string(), broker(-1, "kafka:9092/bootstrap")),
                ]
                .into_iter()
                .collect(),
                cgrp: Some(ConsumerGroup {
                    state: "up".into(),
                    join_state: state.into(),
                    rebalance_age: 12_500,
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        context.stats(stats("wait-sync", 5, 2_000));
        context.stats(stats("steady", 7, 3_000));
        let m = &metrics;
        assert_eq!(m.group_state.with_label_values(&["up"]).get(), 1);
        assert_eq!(m.group_state.with_label_values(&["init"]).get(), 0);
        assert_eq!(m.group_join_state.with_label_values(&["steady"]).get(), 1);
        assert_eq!(
            m.group_join_state.with_label_values(&["wait-sync"]).get(),
            0
        );
        assert_eq!(m.group_rebalance_age.get(), 12.5);
        let b = "kafka-1:9092/1";
        assert_eq!(m.broker_rtt.with_label_values(&[b, "avg"]).get(), 0.003);
        assert_eq!(m.broker_rtt.with_label_values(&[b, "p99"]).get(), 0.012);
        assert_eq!(m.broker_errors.with_label_values(&[b, "tx"]).get(), 7);
        assert_eq!(
            m.broker_errors.with_label_values(&[b, "disconnect"]).get(),
            3
        );
        assert!(
            !m.render().contains("bootstrap"),
            "bootstrap handles are not brokers"
        );

        // An interval without an answer shows no round trip, not the last one.
        let mut quiet = stats("steady", 7, 3_000);
        for broker in quiet.brokers.values_mut() {
            broker.rtt = Some(Window::default());
        }
        context.stats(quiet);
        let text = m.render();
        assert!(!text.contains("vault_kafka_broker_rtt_seconds{"), "{text}");
        assert!(text.contains("vault_kafka_broker_errors_total{"), "{text}");

        // A broker gone from the statistics loses its series.
        context.stats(stats("steady", 7, 3_000));
        assert!(m.render().contains("vault_kafka_broker_rtt_seconds{"));
        let mut gone = stats("steady", 7, 3_000);
        gone.brokers.remove("b1");
        context.stats(gone);
        let text = m.render();
        assert!(!text.contains(b), "{text}");
    }
}
