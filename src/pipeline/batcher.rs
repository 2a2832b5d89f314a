//! The partition task: one per assigned partition. It reads that partition's records in order,
//! groups them into batches by the [`FlushPolicy`], hands batches to the persisters, and turns
//! their acknowledgements, in source order, into the partition's committable offset.
//!
//! Invariants kept here:
//! - records enter batches in offset order and batches are tracked in that order;
//! - the committable offset only moves through [`OffsetTracker`], i.e. past durable batches whose
//!   predecessors are all durable;
//! - at most `max_in_flight` batches are being written; at the limit the task stops reading
//!   (backpressure reaches librdkafka's bounded prefetch queue, then the broker);
//! - acknowledgements are handled before new records (`biased`), so memory stays bounded;
//! - on stop (revoke or shutdown) the open batch is flushed and every in-flight batch awaited.

use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use prometheus::IntCounter;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, error};

use crate::kafka::offsets::{OffsetTracker, SharedOffset};
use crate::pipeline::batch::{Batch, BatchOutcome, Record};
use crate::pipeline::flush::{FlushPolicy, FlushReason};
use crate::telemetry::Metrics;

/// How a partition task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on request with everything flushed and acknowledged.
    Drained { committable: Option<i64> },
    /// A batch was abandoned; nothing at or after it is committable. The coordinator restarts the
    /// partition from `committable` (or from `first_offset` when nothing was committable yet).
    Failed {
        committable: Option<i64>,
        first_offset: Option<i64>,
        reason: String,
    },
    /// The record stream ended (the consumer is closing).
    StreamEnded { committable: Option<i64> },
}

/// Everything a partition task needs.
pub struct PartitionTask {
    pub topic: Arc<str>,
    pub partition: i32,
    pub policy: FlushPolicy,
    pub max_in_flight: usize,
    pub persist: async_channel::Sender<Batch>,
    pub committable: Arc<SharedOffset>,
    pub metrics: Arc<Metrics>,
}

type Ack = BoxFuture<'static, (u64, BatchOutcome)>;

struct State {
    tracker: OffsetTracker,
    acks: FuturesUnordered<Ack>,
    open: Vec<Record>,
    open_bytes: usize,
    opened_at: Option<Instant>,
    next_seq: u64,
    first_offset: Option<i64>,
    failure: Option<String>,
}

impl PartitionTask {
    /// Runs until `stop` fires (or its sender is dropped, read as shutdown), a batch fails, or
    /// `records` ends.
    pub async fn run<S>(self, records: S, mut stop: oneshot::Receiver<FlushReason>) -> Exit
    where
        S: Stream<Item = Record> + Send,
    {
        let mut records = std::pin::pin!(records);
        let consumed: IntCounter = self
            .metrics
            .events_consumed
            .with_label_values(&[&*self.topic, &self.partition.to_string()]);
        let mut st = State {
            tracker: OffsetTracker::new(),
            acks: FuturesUnordered::new(),
            open: Vec::with_capacity(self.policy.max_events.min(4096)),
            open_bytes: 0,
            opened_at: None,
            next_seq: 0,
            first_offset: None,
            failure: None,
        };
        let far_future = Instant::now() + std::time::Duration::from_secs(86_400 * 365);
        let linger = tokio::time::sleep_until(far_future);
        let mut linger = std::pin::pin!(linger);

        let stop_reason = loop {
            let room = st.tracker.in_flight() < self.max_in_flight;
            tokio::select! {
                biased;
                reason = &mut stop => break reason.unwrap_or(FlushReason::Shutdown),
                Some((seq, outcome)) = st.acks.next(), if !st.acks.is_empty() => {
                    self.on_ack(&mut st, seq, outcome);
                    if let Some(reason) = st.failure.take() {
                        return self.failed(&st, reason);
                    }
                }
                _ = &mut linger, if room && st.opened_at.is_some() => {
                    self.flush(&mut st, FlushReason::Linger).await;
                    linger.as_mut().reset(far_future);
                }
                next = records.next(), if room => {
                    let Some(record) = next else {
                        self.flush_and_drain(&mut st, FlushReason::Shutdown).await;
                        return match st.failure.take() {
                            Some(reason) => self.failed(&st, reason),
                            None => Exit::StreamEnded { committable: st.tracker.committable() },
                        };
                    };
                    consumed.inc();
                    self.push(&mut st, record, &mut linger).await;
                    // Take what is already buffered without another trip through select!, while
                    // the batch has room and the in-flight limit allows.
                    while st.tracker.in_flight() < self.max_in_flight {
                        match records.next().now_or_never() {
                            Some(Some(record)) => {
                                consumed.inc();
                                self.push(&mut st, record, &mut linger).await;
                            }
                            _ => break,
                        }
                    }
                }
            }
        };
        debug!(topic = %self.topic, partition = self.partition, reason = stop_reason.as_str(), "Draining partition.");
        self.flush_and_drain(&mut st, stop_reason).await;
        match st.failure.take() {
            Some(reason) => self.failed(&st, reason),
            None => Exit::Drained {
                committable: st.tracker.committable(),
            },
        }
    }

    async fn push(
        &self,
        st: &mut State,
        record: Record,
        linger: &mut Pin<&mut tokio::time::Sleep>,
    ) {
        let size = record.size();
        st.first_offset.get_or_insert(record.source().offset);
        if let Some(reason) = self.policy.before_push(st.open.len(), st.open_bytes, size) {
            self.flush(st, reason).await;
        }
        if st.open.is_empty() {
            let now = Instant::now();
            st.opened_at = Some(now);
            linger.as_mut().reset(self.policy.deadline(now));
        }
        st.open.push(record);
        st.open_bytes += size;
        if let Some(reason) = self.policy.after_push(st.open.len(), st.open_bytes) {
            self.flush(st, reason).await;
        }
    }

    /// Hands the open batch to the persisters and starts tracking it.
    async fn flush(&self, st: &mut State, reason: FlushReason) {
        if st.open.is_empty() {
            return;
        }
        let records = std::mem::replace(
            &mut st.open,
            Vec::with_capacity(self.policy.max_events.min(4096)),
        );
        let bytes = std::mem::take(&mut st.open_bytes);
        st.opened_at = None;
        let seq = st.next_seq;
        st.next_seq += 1;
        let (batch, ack) = Batch::new(records, bytes, seq, reason);
        let m = &self.metrics;
        m.batches_flushed
            .with_label_values(&[reason.as_str()])
            .inc();
        m.batch_events.observe(batch.len() as f64);
        m.batch_bytes.observe(bytes as f64);
        st.tracker.track(seq, batch.last_offset);
        st.acks.push(
            ack.map(move |r| {
                (
                    seq,
                    r.unwrap_or_else(|_| {
                        BatchOutcome::Abandoned("persister dropped the batch".into())
                    }),
                )
            })
            .boxed(),
        );
        if self.persist.send(batch).await.is_err() {
            // The persister pool is gone: the batch is dropped, and its ack reads as abandoned.
            error!(topic = %self.topic, partition = self.partition, "Persister pool closed; batch abandoned.");
        }
    }

    async fn flush_and_drain(&self, st: &mut State, reason: FlushReason) {
        if st.failure.is_none() {
            self.flush(st, reason).await;
        }
        while let Some((seq, outcome)) = st.acks.next().await {
            self.on_ack(st, seq, outcome);
        }
    }

    fn on_ack(&self, st: &mut State, seq: u64, outcome: BatchOutcome) {
        match outcome {
            BatchOutcome::Durable => {
                if let Some(next) = st.tracker.durable(seq) {
                    self.committable.publish(next);
                }
            }
            BatchOutcome::Abandoned(reason) => {
                st.tracker.failed(seq);
                if st.failure.is_none() {
                    st.failure = Some(reason);
                }
            }
        }
    }

    fn failed(&self, st: &State, reason: String) -> Exit {
        Exit::Failed {
            committable: st.tracker.committable(),
            first_offset: st.first_offset,
            reason,
        }
    }
}
