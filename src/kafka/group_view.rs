//! The group view: the consumer group's committed offset and the log-end offset of every
//! partition of the subscribed topics, whoever owns it, and whether anyone does.
//!
//! A member's own statistics cover only the partitions it fetches, so a partition that no
//! member owns (after an eviction, or while a stopped static member's session runs out) has no
//! lag series there. Every instance therefore reads, every `kafka.group_view_interval`, the
//! topics' partition counts (metadata), the group's committed offsets (one OffsetFetch) and the
//! log-start and log-end offsets (two ListOffsets, at the consumer's isolation level: the
//! last stable offset under `read_committed`) from the brokers, and exports them as
//! `vault_group_*` and `vault_topic_partitions`. Each instance exports the same broker-side
//! values, so replicas aggregate cleanly with `max by (topic, partition)`, and the view survives
//! as long as any instance is scraped; no instance has to be designated, and none can be the
//! one that is missing.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::kafka::context::VaultConsumer;
use crate::pipeline::deadline::KAFKA_CALL_TIMEOUT;
use crate::telemetry::Metrics;

/// What the brokers say about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionView {
    /// The group's committed offset (next to read); `None`: nothing committed.
    pub committed: Option<i64>,
    pub log_start: i64,
    pub log_end: i64,
}

impl PartitionView {
    /// Messages the group has not consumed: from the committed offset (or, with nothing
    /// committed, from the log start) to the log end.
    pub fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.log_start).max(self.log_start);
        (self.log_end - from).max(0)
    }
}

/// Sets the `vault_group_*` series of one topic's partitions, and its partition count.
pub fn export(metrics: &Metrics, topic: &str, partitions: &[(i32, PartitionView)]) {
    metrics
        .topic_partitions
        .with_label_values(&[topic])
        .set(partitions.len() as i64);
    for (partition, view) in partitions {
        let p = partition.to_string();
        let labels = [topic, p.as_str()];
        metrics
            .group_committed_offset
            .with_label_values(&labels)
            .set(view.committed.unwrap_or(-1));
        metrics
            .group_log_end_offset
            .with_label_values(&labels)
            .set(view.log_end);
        metrics.group_lag.with_label_values(&labels).set(view.lag());
    }
}

/// Reads the view of every partition of `topic` (blocking: at most four bounded calls).
pub fn read(
    consumer: &VaultConsumer,
    topic: &str,
) -> Result<Vec<(i32, PartitionView)>, rdkafka::error::KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), KAFKA_CALL_TIMEOUT)?;
    let mut ids: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    ids.sort_unstable();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let list = |at: Offset| -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for id in &ids {
            tpl.add_partition_offset(topic, *id, at)?;
        }
        Ok(tpl)
    };
    let committed = consumer.committed_offsets(list(Offset::Invalid)?, KAFKA_CALL_TIMEOUT)?;
    // A timestamp of -1 (End) asks for the log end, -2 (Beginning) for the log start.
    let ends = consumer.offsets_for_times(list(Offset::End)?, KAFKA_CALL_TIMEOUT)?;
    let starts = consumer.offsets_for_times(list(Offset::Beginning)?, KAFKA_CALL_TIMEOUT)?;
    let offset_in =
        |tpl: &TopicPartitionList, id: i32| match tpl.find_partition(topic, id).map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
    Ok(ids
        .iter()
        .filter_map(|&id| {
            let log_end = offset_in(&ends, id)?;
            Some((
                id,
                PartitionView {
                    committed: offset_in(&committed, id),
                    log_start: offset_in(&starts, id).unwrap_or(0),
                    log_end,
                },
            ))
        })
        .collect())
}

/// Refreshes the group view of `topics` every `every` until `stop`. A failed read is logged
/// and leaves the previous values (Prometheus then sees them unchanged; the alerts built on
/// them need minutes).
pub async fn run(
    consumer: Arc<VaultConsumer>,
    topics: Vec<String>,
    every: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for topic in &topics {
            let (consumer, t) = (consumer.clone(), topic.clone());
            let reading = tokio::task::spawn_blocking(move || read(&consumer, &t));
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                read = reading => read,
            };
            match read {
                Ok(Ok(view)) => export(&metrics, topic, &view),
                Ok(Err(e)) => {
                    warn!(topic, error = %e, "Cannot read the group's offsets of the topic; the vault_group_* metrics keep their last values.")
                }
                Err(e) => warn!(topic, error = %e, "The group view task failed."),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_commit_or_from_the_log_start() {
        let v = |committed, log_start, log_end| PartitionView {
            committed,
            log_start,
            log_end,
        };
        assert_eq!(v(Some(40), 0, 100).lag(), 60);
        assert_eq!(v(None, 30, 100).lag(), 70, "nothing committed");
        assert_eq!(
            v(Some(10), 30, 100).lag(),
            70,
            "a commit below the log start counts from the log start"
        );
        assert_eq!(v(Some(100), 0, 100).lag(), 0);
    }

    #[test]
    fn every_partition_is_exported_with_nothing_committed_as_minus_one() {
        let m = Metrics::new();
        let view = [
            (
                0,
                PartitionView {
                    committed: Some(5),
                    log_start: 0,
                    log_end: 9,
                },
            ),
            (
                1,
                PartitionView {
                    committed: None,
                    log_start: 2,
                    log_end: 7,
                },
            ),
        ];
        export(&m, "t", &view);
        assert_eq!(m.topic_partitions.with_label_values(&["t"]).get(), 2);
        assert_eq!(
            m.group_committed_offset
                .with_label_values(&["t", "1"])
                .get(),
            -1
        );
        assert_eq!(
            m.group_log_end_offset.with_label_values(&["t", "0"]).get(),
            9
        );
        assert_eq!(m.group_lag.with_label_values(&["t", "0"]).get(), 4);
        assert_eq!(m.group_lag.with_label_values(&["t", "1"]).get(), 5);
    }
}
