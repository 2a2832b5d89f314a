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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{OnceLock, Weak};
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
use crate::pipeline::deadline::Deadlines;
use crate::telemetry::Metrics;
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
    /// Whether a fatal error was handed to the coordinator already.
    fatal_reported: AtomicBool,
}

impl VaultContext {
    pub fn new(
        commands: mpsc::UnboundedSender<Command>,
        deadlines: Deadlines,
        metrics: Arc<Metrics>,
    ) -> Self {
        VaultContext {
            commands,
            consumer: OnceLock::new(),
            deadlines,
            metrics,
            fatal_reported: AtomicBool::new(false),
        }
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
        if done
            .recv_timeout(self.deadlines.revoke_reply_wait())
            .is_err()
        {
            warn!("Coordinator did not answer the revoke in time; nothing committed for these partitions.");
        }
    }
}

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

    /// librdkafka's periodic statistics (`statistics.interval.ms`): consumer lag of the partitions
    /// this member fetches (series of partitions it no longer fetches are removed), and the bytes
    /// it holds fetched for them.
    fn stats(&self, statistics: Statistics) {
        let mut prefetched = 0;
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                if partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let label = partition.to_string();
                let labels = [topic.as_str(), label.as_str()];
                if p.desired {
                    prefetched += p.fetchq_size;
                }
                if p.desired && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&labels)
                        .set(p.consumer_lag);
                } else if !p.desired {
                    let _ = self.metrics.consumer_lag.remove_label_values(&labels);
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use rdkafka::statistics::{Partition, Topic};

    use super::*;

    fn partition(id: i32, desired: bool, lag: i64, fetchq_size: u64) -> (i32, Partition) {
        let p = Partition {
            partition: id,
            desired,
            consumer_lag: lag,
            fetchq_size,
            ..Default::default()
        };
        (id, p)
    }

    #[test]
    fn statistics_give_lag_per_fetched_partition_and_the_bytes_fetched_ahead() {
        let metrics = Arc::new(Metrics::new());
        let (tx, _rx) = mpsc::unbounded_channel();
        let deadlines = Deadlines {
            revoke_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
        };
        let context = VaultContext::new(tx, deadlines, metrics.clone());
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

        // Partition 0 is no longer fetched: its lag series goes, its queue no longer counts.
        context.stats(stats(vec![
            partition(0, false, -1, 1000),
            partition(1, true, 3, 100),
        ]));
        assert_eq!(metrics.prefetched_bytes.get(), 100);
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
    }
}
