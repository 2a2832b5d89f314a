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
use crate::pipeline::deadline::GROUP_VIEW_CALL_TIMEOUT;
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

/// What the brokers said about one topic: its partition count (from metadata) and the view of
/// each partition whose offsets they answered for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicView {
    pub partitions: usize,
    pub views: Vec<(i32, PartitionView)>,
}

/// Sets the `vault_group_*` series of one topic's partitions, and its partition count. A
/// partition the brokers did not answer for keeps its previous values.
pub fn export(metrics: &Metrics, topic: &str, view: &TopicView) {
    metrics
        .topic_partitions
        .with_label_values(&[topic])
        .set(view.partitions as i64);
    for (partition, view) in &view.views {
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

/// Reads the view of every partition of `topic` (blocking: at most four calls, each bounded by
/// [`GROUP_VIEW_CALL_TIMEOUT`]). A topic the metadata does not describe is an error, never a
/// topic of 0 partitions: that would hide unowned partitions when the brokers are in trouble.
pub fn read(
    consumer: &VaultConsumer,
    topic: &str,
) -> Result<TopicView, rdkafka::error::KafkaError> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    let md = consumer.fetch_metadata(Some(topic), GROUP_VIEW_CALL_TIMEOUT)?;
    let described = md.topics().iter().find(|t| t.name() == topic);
    let mut ids: Vec<i32> = match described {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => {
            return Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            ))
        }
    };
    ids.sort_unstable();
    let list = |at: Offset| -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for id in &ids {
            tpl.add_partition_offset(topic, *id, at)?;
        }
        Ok(tpl)
    };
    let committed = consumer.committed_offsets(list(Offset::Invalid)?, GROUP_VIEW_CALL_TIMEOUT)?;
    // A timestamp of -1 (End) asks for the log end, -2 (Beginning) for the log start.
    let ends = consumer.offsets_for_times(list(Offset::End)?, GROUP_VIEW_CALL_TIMEOUT)?;
    let starts = consumer.offsets_for_times(list(Offset::Beginning)?, GROUP_VIEW_CALL_TIMEOUT)?;
    // `None`: the brokers did not answer for this partition; `Some(None)`: no offset (for the
    // group's, nothing committed).
    let answered = |tpl: &TopicPartitionList, id: i32| {
        let e = tpl.find_partition(topic, id)?;
        e.error().ok()?;
        Some(match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
    };
    let views = ids
        .iter()
        .filter_map(|&id| {
            Some((
                id,
                PartitionView {
                    committed: answered(&committed, id)?,
                    log_start: answered(&starts, id)?.unwrap_or(0),
                    log_end: answered(&ends, id)??,
                },
            ))
        })
        .collect();
    Ok(TopicView {
        partitions: ids.len(),
        views,
    })
}

/// Refreshes the group view of `topics` every `every` until `stop`. A failed read is logged
/// and leaves the previous values (Prometheus then sees them unchanged; the alerts built on
/// them need minutes). A read under way when `stop` fires is awaited (it is bounded): it holds
/// the consumer, whose close must not be left to the blocking pool.
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
            let read = tokio::task::spawn_blocking(move || read(&consumer, &t)).await;
            if stop.is_cancelled() {
                return;
            }
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
        export(
            &m,
            "t",
            &TopicView {
                partitions: 3,
                views: view.to_vec(),
            },
        );
        assert_eq!(
            m.topic_partitions.with_label_values(&["t"]).get(),
            3,
            "a partition the brokers did not answer for still counts"
        );
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
