//! The partition task: one per assigned partition. It reads that partition's records in order,
//! groups them into batches by the [`FlushPolicy`], hands batches to the persisters, and turns
//! their acknowledgements, in source order, into the partition's committable offset.
//!
//! Invariants kept here:
//! - records enter batches in offset order and batches are tracked in that order;
//! - the committable offset only moves through [`OffsetTracker`], i.e. past durable batches whose
//!   predecessors are all durable;
//! - at most `max_in_flight` batches are unacknowledged (in order); at the limit the task stops
//!   reading (backpressure reaches librdkafka's bounded prefetch queue, then the broker). A batch
//!   that completes ahead of a slow predecessor still holds its slot, so a stalled batch bounds
//!   how far the partition reads ahead and how much a restart replays;
//! - every record read counts against the process-wide [`InFlightBudget`] from the moment it
//!   joins the open batch until its batch is dropped by the persister; a partition that finds
//!   the budget spent hands over its open batch before it waits, so it waits holding nothing
//!   that only it could release; a stop ends the wait at once, and the record it waited to add,
//!   never batched, is read again by the partition's next reader;
//! - acknowledgements are handled before new records (`biased`), so memory stays bounded;
//! - on stop (revoke or shutdown) the open batch is flushed and every in-flight batch awaited.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use prometheus::IntCounter;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, error};

use tokio_util::sync::CancellationToken;

use crate::failpoint;
use crate::kafka::offsets::OffsetTracker;
use crate::kafka::resume::Progress;
use crate::pipeline::batch::{Batch, BatchOutcome, InFlightBudget, PartitionHealth, Record, Share};
use crate::pipeline::flush::{FlushPolicy, FlushReason};
use crate::telemetry::Metrics;

/// Records an open batch reserves room for ahead, at most (about 24 KB): a vector that grows
/// past it doubles a few times per batch, while a reservation of a whole large batch per
/// partition would be memory outside the in-flight budget that grows with the partitions.
const RESERVE_RECORDS: usize = 128;

/// What became of a record given to [`PartitionTask::push`].
enum Pushed {
    Batched,
    /// A stop arrived while it waited: the partition drains.
    Stopped(FlushReason),
    /// A batch of the partition failed while it waited: the partition fails at once, as when
    /// the failure is read in the run loop.
    Failed(String),
}

/// How a partition task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on request with everything flushed and acknowledged.
    Drained { committable: Option<i64> },
    /// A batch was abandoned, or reading failed in a way that may have skipped records; nothing
    /// at or after the failure is committable. The coordinator restarts the partition from
    /// [`Progress::resume_at`].
    Failed {
        committable: Option<i64>,
        reason: String,
    },
    /// The record stream ended (the consumer is closing).
    StreamEnded { committable: Option<i64> },
}

/// When the partition's oldest event that is read but not yet durable was read (`None` when
/// every event read is durable). Written by the partition task, read for the
/// `vault_oldest_uncommitted_event_age_seconds` metric.
#[derive(Debug, Default)]
pub struct OldestPending(Mutex<Option<Instant>>);

impl OldestPending {
    pub fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, since: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }
}

/// Everything a partition task needs.
pub struct PartitionTask {
    pub topic: Arc<str>,
    pub partition: i32,
    pub policy: FlushPolicy,
    pub max_in_flight: usize,
    pub persist: async_channel::Sender<Batch>,
    /// Where the partition stands: written here, read by the coordinator to commit and to
    /// restart.
    pub progress: Arc<Progress>,
    /// Fired when this incarnation's batches must stop retrying (its stop deadline passed, or it
    /// was replaced): each batch carries it to the persister.
    pub cancel: CancellationToken,
    pub oldest_pending: Arc<OldestPending>,
    pub budget: InFlightBudget,
    /// Whether the partition is failing, kept by the coordinator across its incarnations.
    pub health: PartitionHealth,
    pub metrics: Arc<Metrics>,
}

type Ack = BoxFuture<'static, (u64, BatchOutcome)>;

struct State {
    tracker: OffsetTracker,
    acks: FuturesUnordered<Ack>,
    open: Vec<Record>,
    open_bytes: usize,
    /// The open batch's share of the in-flight budget.
    share: Share,
    opened_at: Option<Instant>,
    /// When each batch the tracker still holds was opened, oldest first.
    in_flight_opened: VecDeque<Instant>,
    next_seq: u64,
    failure: Option<String>,
}

impl PartitionTask {
    /// Runs until `stop` fires (or its sender is dropped, read as shutdown), a batch fails,
    /// reading fails, or `records` ends. A read error (`Err`) may mean records were skipped, so
    /// it fails the partition: nothing after its last durable batch is committed, and the
    /// coordinator restarts it from there.
    pub async fn run<S>(self, records: S, mut stop: oneshot::Receiver<FlushReason>) -> Exit
    where
        S: Stream<Item = Result<Record, String>> + Send,
    {
        let mut records = std::pin::pin!(records);
        let consumed: IntCounter = self
            .metrics
            .events_consumed
            .with_label_values(&[&*self.topic, &self.partition.to_string()]);
        let mut st = State {
            tracker: OffsetTracker::new(),
            acks: FuturesUnordered::new(),
            open: Vec::new(),
            open_bytes: 0,
            share: self.budget.share(&self.health),
            opened_at: None,
            in_flight_opened: VecDeque::with_capacity(self.max_in_flight),
            next_seq: 0,
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
                    // The writer went idle: what gathered meanwhile goes now.
                    if let Some(reason) = self.policy.idle(st.open.len(), st.tracker.in_flight()) {
                        self.flush(&mut st, reason).await;
                        linger.as_mut().reset(far_future);
                    }
                }
                _ = &mut linger, if room && st.opened_at.is_some() => {
                    self.flush(&mut st, FlushReason::Linger).await;
                    linger.as_mut().reset(far_future);
                }
                next = records.next(), if room => {
                    let record = match next {
                        Some(Ok(record)) => record,
                        Some(Err(e)) => return self.failed(&st, format!("reading the partition failed: {e}")),
                        None => {
                            self.flush_and_drain(&mut st, FlushReason::Shutdown).await;
                            return match st.failure.take() {
                                Some(reason) => self.failed(&st, reason),
                                None => Exit::StreamEnded { committable: st.tracker.committable() },
                            };
                        }
                    };
                    consumed.inc();
                    match self.push(&mut st, record, &mut linger, &mut stop).await {
                        Pushed::Batched => {}
                        Pushed::Stopped(reason) => break reason,
                        Pushed::Failed(reason) => return self.failed(&st, reason),
                    }
                    // Take what is already buffered without another trip through select!, while
                    // the batch has room and the in-flight limit allows.
                    let mut stopped = None;
                    while stopped.is_none() && st.tracker.in_flight() < self.max_in_flight {
                        match records.next().now_or_never() {
                            Some(Some(Ok(record))) => {
                                consumed.inc();
                                match self.push(&mut st, record, &mut linger, &mut stop).await {
                                    Pushed::Batched => {}
                                    Pushed::Stopped(reason) => stopped = Some(reason),
                                    Pushed::Failed(reason) => return self.failed(&st, reason),
                                }
                            }
                            Some(Some(Err(e))) => {
                                return self.failed(&st, format!("reading the partition failed: {e}"));
                            }
                            _ => break,
                        }
                    }
                    if let Some(reason) = stopped {
                        break reason;
                    }
                    // Everything at hand is in the batch: an idle writer takes it now.
                    if let Some(reason) = self.policy.idle(st.open.len(), st.tracker.in_flight()) {
                        self.flush(&mut st, reason).await;
                        linger.as_mut().reset(far_future);
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

    /// Adds a record to the open batch, unless a stop arrives or a batch of the partition fails
    /// while it waits (for room in the in-flight budget, or, for an erasure, for every earlier
    /// batch): the record is then left out (it was never part of a batch, so the next reader of
    /// the partition reads it again).
    async fn push(
        &self,
        st: &mut State,
        record: Record,
        linger: &mut Pin<&mut tokio::time::Sleep>,
        stop: &mut oneshot::Receiver<FlushReason>,
    ) -> Pushed {
        let size = record.size();
        let erase = matches!(record, Record::Erase(_));
        if erase {
            // An erasure waits until every earlier record of the partition is durable, so the
            // user's index of days holds every day it must delete; then it goes out alone.
            self.flush(st, FlushReason::Erase).await;
            while st.tracker.in_flight() > 0 {
                tokio::select! {
                    biased;
                    reason = &mut *stop => return Pushed::Stopped(reason.unwrap_or(FlushReason::Shutdown)),
                    Some((seq, outcome)) = st.acks.next() => {
                        self.on_ack(st, seq, outcome);
                        if let Some(reason) = st.failure.take() {
                            // The erasure, never batched, is read again after the restart.
                            return Pushed::Failed(reason);
                        }
                    }
                }
            }
        }
        if failpoint::hit("batcher::add", &self.topic, Some(record.source().offset)) {
            panic!("failpoint batcher::add");
        }
        if let Some(reason) = self.policy.before_push(st.open.len(), st.open_bytes, size) {
            self.flush(st, reason).await;
        }
        let footprint = record.footprint();
        if !self.budget.try_add(&mut st.share, footprint) {
            // The budget is spent: what this partition holds goes to the persisters (its share
            // comes back once written) and the partition stops reading until there is room.
            self.flush(st, FlushReason::Budget).await;
            // One wait for the whole time (it keeps its place in the budget's queue), on a
            // share of its own: acknowledgements go on meanwhile, so what is durable becomes
            // committable, and a failure ends the wait.
            let mut share = st.share.sibling();
            std::mem::swap(&mut share, &mut st.share);
            {
                let added = self.budget.add(&mut share, footprint);
                tokio::pin!(added);
                loop {
                    tokio::select! {
                        biased;
                        reason = &mut *stop => return Pushed::Stopped(reason.unwrap_or(FlushReason::Shutdown)),
                        Some((seq, outcome)) = st.acks.next(), if !st.acks.is_empty() => {
                            self.on_ack(st, seq, outcome);
                            if let Some(reason) = st.failure.take() {
                                // The record, never batched, is read again after the restart.
                                return Pushed::Failed(reason);
                            }
                        }
                        () = &mut added => break,
                    }
                }
            }
            st.share = share;
        }
        if st.open.is_empty() {
            let now = Instant::now();
            st.opened_at = Some(now);
            linger.as_mut().reset(self.policy.deadline(now));
            if st.in_flight_opened.is_empty() {
                self.oldest_pending.set(Some(now));
            }
        }
        st.open.push(record);
        st.open_bytes += size;
        if erase {
            self.flush(st, FlushReason::Erase).await;
        } else if let Some(reason) = self.policy.after_push(st.open.len(), st.open_bytes) {
            self.flush(st, reason).await;
        }
        Pushed::Batched
    }

    /// Hands the open batch to the persisters and starts tracking it.
    async fn flush(&self, st: &mut State, reason: FlushReason) {
        if st.open.is_empty() {
            return;
        }
        // The next batch is likely to be about as large as this one; what it reserves ahead is
        // capped (records are counted against the in-flight budget as they come, not the room
        // reserved for them, and every partition has an open batch).
        let capacity = st.open.len().min(RESERVE_RECORDS);
        if failpoint::hit(
            "batcher::flush",
            &self.topic,
            Some(st.open[0].source().offset),
        ) {
            panic!("failpoint batcher::flush");
        }
        let records = std::mem::replace(&mut st.open, Vec::with_capacity(capacity));
        let bytes = std::mem::take(&mut st.open_bytes);
        let opened_at = st.opened_at.take().unwrap_or_else(Instant::now);
        st.in_flight_opened.push_back(opened_at);
        let seq = st.next_seq;
        st.next_seq += 1;
        let next = st.share.sibling();
        let share = std::mem::replace(&mut st.share, next);
        let (mut batch, ack) = Batch::new(records, bytes, seq, reason);
        batch.hold(share);
        batch.cancel = self.cancel.clone();
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
                    self.progress.publish_durable(next);
                    // The tracker released batches from its front: so does the queue of times.
                    while st.in_flight_opened.len() > st.tracker.in_flight() {
                        st.in_flight_opened.pop_front();
                    }
                    self.oldest_pending
                        .set(st.in_flight_opened.front().copied().or(st.opened_at));
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
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::channel::mpsc;

    use super::*;
    use crate::event::{decode, Limits, Source};

    /// The value of every test record: all of them are the same size.
    const VALUE: &str = r#"{"user_id":"u","event_type":"t","occurred_at":"2023-11-14T22:13:20Z"}"#;

    fn record(offset: i64) -> Record {
        let source = Source {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            timestamp_ms: None,
        };
        Record::Event(
            decode(
                None,
                Some(VALUE.as_bytes()),
                source,
                None,
                Limits::default(),
            )
            .expect("valid event"),
        )
    }

    struct Harness {
        records: mpsc::UnboundedSender<Result<Record, String>>,
        batches: async_channel::Receiver<Batch>,
        stop: Option<oneshot::Sender<FlushReason>>,
        progress: Arc<Progress>,
        oldest_pending: Arc<OldestPending>,
        task: tokio::task::JoinHandle<Exit>,
    }

    /// A partition with a fixed linger (no idle flush), as the timing tests below assume.
    fn start(max_events: usize, max_in_flight: usize) -> Harness {
        start_with_budget(max_events, max_in_flight, InFlightBudget::new(1 << 30))
    }

    fn start_with_budget(
        max_events: usize,
        max_in_flight: usize,
        budget: InFlightBudget,
    ) -> Harness {
        start_with(max_events, max_in_flight, budget, false)
    }

    /// A partition that flushes when its writer is idle (the default).
    fn start_idle(max_events: usize, max_in_flight: usize) -> Harness {
        start_with(
            max_events,
            max_in_flight,
            InFlightBudget::new(1 << 30),
            true,
        )
    }

    fn start_with(
        max_events: usize,
        max_in_flight: usize,
        budget: InFlightBudget,
        when_idle: bool,
    ) -> Harness {
        let (records, rx) = mpsc::unbounded();
        let (persist, batches) = async_channel::bounded(16);
        let (stop, stop_rx) = oneshot::channel();
        let progress = Arc::new(Progress::new(None));
        let oldest_pending = Arc::new(OldestPending::default());
        let task = PartitionTask {
            topic: Arc::from("t"),
            partition: 0,
            policy: FlushPolicy {
                max_events,
                max_bytes: 1 << 20,
                linger: Duration::from_millis(250),
                when_idle,
            },
            max_in_flight,
            persist,
            progress: progress.clone(),
            cancel: CancellationToken::new(),
            oldest_pending: oldest_pending.clone(),
            budget,
            health: PartitionHealth::default(),
            metrics: Arc::new(Metrics::new()),
        };
        let task = tokio::spawn(task.run(rx, stop_rx));
        Harness {
            records,
            batches,
            stop: Some(stop),
            progress,
            oldest_pending,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_partition_sends_an_event_at_once() {
        let h = start_idle(100, 4);
        let t0 = Instant::now();
        h.records.unbounded_send(Ok(record(0))).unwrap();
        let b0 = h.batches.recv().await.unwrap();
        assert_eq!(
            Instant::now(),
            t0,
            "no linger wait when nothing is in flight"
        );
        assert_eq!((b0.reason, b0.len()), (FlushReason::Idle, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn while_a_write_is_in_flight_events_gather_and_go_when_it_is_done() {
        let h = start_idle(100, 4);
        h.records.unbounded_send(Ok(record(0))).unwrap();
        let b0 = h.batches.recv().await.unwrap();
        for o in 1..4 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            h.batches.try_recv().is_err(),
            "a write is in flight: they gather"
        );
        let t1 = Instant::now();
        b0.ack(BatchOutcome::Durable);
        let b1 = h.batches.recv().await.unwrap();
        assert_eq!(Instant::now(), t1, "sent as soon as the writer is idle");
        assert_eq!(
            (b1.reason, b1.first_offset, b1.len()),
            (FlushReason::Idle, 1, 3)
        );
        // Linger stays the upper bound while a write takes long.
        let t2 = Instant::now();
        h.records.unbounded_send(Ok(record(4))).unwrap();
        let b2 = h.batches.recv().await.unwrap();
        assert_eq!(Instant::now() - t2, Duration::from_millis(250));
        assert_eq!((b2.reason, b2.first_offset), (FlushReason::Linger, 4));
        // A backlog still goes in full batches.
        let h = start_idle(10, 4);
        for o in 0..30 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let sizes: Vec<_> = [
            h.batches.recv().await.unwrap(),
            h.batches.recv().await.unwrap(),
            h.batches.recv().await.unwrap(),
        ]
        .iter()
        .map(|b| (b.reason, b.len()))
        .collect();
        assert_eq!(
            sizes,
            [(FlushReason::Size, 10); 3],
            "records at hand fill batches first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_event_is_flushed_after_linger_and_not_before() {
        let h = start(100, 4);
        let t0 = Instant::now();
        h.records.unbounded_send(Ok(record(7))).unwrap();
        tokio::time::sleep(Duration::from_millis(249)).await;
        assert!(
            h.batches.try_recv().is_err(),
            "flushed before linger elapsed"
        );
        let batch = h.batches.recv().await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_millis(250));
        assert_eq!(batch.reason, FlushReason::Linger);
        assert_eq!(
            (batch.first_offset, batch.last_offset, batch.len()),
            (7, 7, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_flushed_at_once_with_reason_size() {
        let h = start(3, 4);
        let t0 = Instant::now();
        for o in 0..3 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let batch = h.batches.recv().await.unwrap();
        assert_eq!(Instant::now(), t0, "no linger wait for a full batch");
        assert_eq!(batch.reason, FlushReason::Size);
        assert_eq!(batch.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn acks_commit_in_order_and_the_in_flight_limit_stops_reading() {
        let mut h = start(2, 2);
        for o in 0..6 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let b0 = h.batches.recv().await.unwrap();
        let b1 = h.batches.recv().await.unwrap();
        // Two batches in flight: the third is neither built nor sent, however long we wait.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(h.batches.try_recv().is_err(), "read past max_in_flight");

        // Batch 1 completes first, but it waits behind batch 0: the window does not move, so
        // a stalled batch bounds how far the partition reads ahead (and how much it replays).
        b1.ack(BatchOutcome::Durable);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            h.batches.try_recv().is_err(),
            "window moved past an unacknowledged batch"
        );
        assert_eq!(
            h.progress.committable(),
            None,
            "batch 1 is durable but batch 0 is not"
        );

        b0.ack(BatchOutcome::Durable);
        let b2 = h.batches.recv().await.unwrap();
        assert_eq!(b2.first_offset, 4);
        assert_eq!(
            h.progress.committable(),
            Some(4),
            "both first batches durable: next to read is 4"
        );

        b2.ack(BatchOutcome::Durable);
        h.stop.take().unwrap().send(FlushReason::Shutdown).unwrap();
        assert_eq!(
            h.task.await.unwrap(),
            Exit::Drained {
                committable: Some(6)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_flushes_the_partial_batch_and_waits_for_its_ack() {
        let mut h = start(100, 4);
        h.records.unbounded_send(Ok(record(0))).unwrap();
        h.records.unbounded_send(Ok(record(1))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        h.stop.take().unwrap().send(FlushReason::Revoke).unwrap();
        let batch = h.batches.recv().await.unwrap();
        assert_eq!((batch.reason, batch.len()), (FlushReason::Revoke, 2));
        assert!(!h.task.is_finished(), "must wait for the in-flight ack");
        batch.ack(BatchOutcome::Durable);
        assert_eq!(
            h.task.await.unwrap(),
            Exit::Drained {
                committable: Some(2)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_batch_fails_the_partition_without_committing_past_it() {
        let h = start(1, 4);
        for o in 0..3 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let b0 = h.batches.recv().await.unwrap();
        let b1 = h.batches.recv().await.unwrap();
        let b2 = h.batches.recv().await.unwrap();
        b0.ack(BatchOutcome::Durable);
        b2.ack(BatchOutcome::Durable);
        drop(b1); // a batch lost without an answer reads as abandoned
        match h.task.await.unwrap() {
            Exit::Failed { committable, .. } => assert_eq!(committable, Some(1)),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(h.progress.committable(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_error_fails_the_partition_at_its_last_durable_batch() {
        let h = start(2, 4);
        for o in 0..2 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        h.batches.recv().await.unwrap().ack(BatchOutcome::Durable);
        h.records.unbounded_send(Ok(record(2))).unwrap();
        // librdkafka skipped a corrupt message set: what follows is not contiguous.
        h.records
            .unbounded_send(Err("Local: Bad message format".into()))
            .unwrap();
        h.records.unbounded_send(Ok(record(9))).unwrap();
        match h.task.await.unwrap() {
            Exit::Failed {
                committable,
                reason,
            } => {
                assert_eq!(committable, Some(2));
                assert!(reason.contains("Bad message format"), "{reason}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(h.progress.committable(), Some(2), "nothing past the error");
        assert!(h.batches.try_recv().is_err(), "record 2 and 9 never sent");
    }

    #[tokio::test(start_paused = true)]
    async fn an_erasure_waits_for_every_earlier_batch_then_goes_out_alone() {
        let h = start(2, 4);
        for o in 0..2 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let b0 = h.batches.recv().await.unwrap();
        let erase = Record::Erase(crate::pipeline::batch::EraseRequest {
            source: Source {
                topic: Arc::from("t"),
                partition: 0,
                offset: 2,
                timestamp_ms: Some(1),
            },
            user_id: "u".into(),
        });
        h.records.unbounded_send(Ok(erase)).unwrap();
        h.records.unbounded_send(Ok(record(3))).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            h.batches.try_recv().is_err(),
            "the erasure waits while an earlier batch is in flight"
        );
        b0.ack(BatchOutcome::Durable);
        let b1 = h.batches.recv().await.unwrap();
        assert_eq!(
            (b1.reason, b1.first_offset, b1.len()),
            (FlushReason::Erase, 2, 1)
        );
        assert_eq!(b1.erasures().count(), 1);
        let b2 = h.batches.recv().await.unwrap();
        assert_eq!(
            (b2.first_offset, b2.len()),
            (3, 1),
            "reading goes on after it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_pending_event_is_tracked_until_it_is_durable() {
        let h = start(2, 4);
        assert_eq!(h.oldest_pending.get(), None);
        let t0 = Instant::now();
        for o in 0..2 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let b0 = h.batches.recv().await.unwrap();
        assert_eq!(h.oldest_pending.get(), Some(t0), "batch 0 is in flight");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let t1 = Instant::now();
        for o in 2..4 {
            h.records.unbounded_send(Ok(record(o))).unwrap();
        }
        let b1 = h.batches.recv().await.unwrap();
        assert_eq!(
            h.oldest_pending.get(),
            Some(t0),
            "still waiting for batch 0"
        );
        b1.ack(BatchOutcome::Durable);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            h.oldest_pending.get(),
            Some(t0),
            "batch 1 waits behind batch 0"
        );
        b0.ack(BatchOutcome::Durable);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(h.progress.committable(), Some(4));
        assert_eq!(h.oldest_pending.get(), None, "everything read is durable");
        let t2 = Instant::now();
        h.records.unbounded_send(Ok(record(4))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            h.oldest_pending.get(),
            Some(t2),
            "an open batch is pending too"
        );
        assert!(t1 < t2);
    }

    /// What one test record counts against the in-flight budget.
    fn footprint() -> usize {
        record(0).footprint()
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_share_the_in_flight_budget_and_wait_for_room() {
        // Room for one record and a half: one single-record batch at a time, across both
        // partitions.
        let budget = InFlightBudget::new(footprint() * 3 / 2);
        let a = start_with_budget(1, 4, budget.clone());
        let b = start_with_budget(1, 4, budget.clone());
        a.records.unbounded_send(Ok(record(0))).unwrap();
        let a0 = a.batches.recv().await.unwrap();
        assert_eq!(budget.in_use(), footprint());
        b.records.unbounded_send(Ok(record(1))).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(b.batches.try_recv().is_err(), "no room: partition b waits");
        a0.ack(BatchOutcome::Durable);
        let b0 = b.batches.recv().await.unwrap();
        assert_eq!(b0.first_offset, 1, "room again once a's batch is done");
        drop(b0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(budget.in_use(), 0, "a dropped batch returns its share");
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_batch_counts_against_the_budget_and_is_handed_over_when_it_is_spent() {
        let budget = InFlightBudget::new(footprint() * 5 / 2);
        let h = start_with_budget(100, 4, budget.clone());
        let t0 = Instant::now();
        h.records.unbounded_send(Ok(record(0))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            budget.in_use(),
            footprint(),
            "an open batch holds its records' share"
        );
        h.records.unbounded_send(Ok(record(1))).unwrap();
        h.records.unbounded_send(Ok(record(2))).unwrap();
        // The third record does not fit: the open batch goes out at once, not after linger.
        let b0 = h.batches.recv().await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_millis(1));
        assert_eq!(
            (b0.reason, b0.first_offset, b0.len()),
            (FlushReason::Budget, 0, 2)
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(h.batches.try_recv().is_err(), "record 2 waits for room");
        b0.ack(BatchOutcome::Durable);
        let b1 = h.batches.recv().await.unwrap();
        assert_eq!(
            (b1.reason, b1.first_offset, b1.len()),
            (FlushReason::Linger, 2, 1)
        );
        assert_eq!(budget.in_use(), footprint());
    }

    /// A partition waiting for room still takes its acknowledgements: its durable batches
    /// become committable (the room they free may go to a partition that waited longer), and a
    /// failed one ends the wait.
    #[tokio::test(start_paused = true)]
    async fn a_partition_waiting_for_room_takes_its_acknowledgements() {
        let budget = InFlightBudget::new(footprint() * 5 / 2);
        let mut p = start_with_budget(1, 4, budget.clone());
        let a = start_with_budget(1, 4, budget.clone());
        let q = start_with_budget(1, 4, budget.clone());
        p.records.unbounded_send(Ok(record(0))).unwrap();
        let p0 = p.batches.recv().await.unwrap();
        a.records.unbounded_send(Ok(record(100))).unwrap();
        let _a0 = a.batches.recv().await.unwrap();
        q.records.unbounded_send(Ok(record(200))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        p.records.unbounded_send(Ok(record(1))).unwrap();
        p.records.unbounded_send(Ok(record(2))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        p0.ack(BatchOutcome::Durable);
        let q0 = q.batches.recv().await.unwrap();
        assert_eq!(
            q0.first_offset, 200,
            "the room went to q, which waited first"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(p.batches.try_recv().is_err(), "p still waits for room");
        assert_eq!(
            p.progress.committable(),
            Some(1),
            "p's durable batch is committable"
        );
        // The budget frees up; p's next batch fails while p waits again for record 2.
        q0.ack(BatchOutcome::Durable);
        let p1 = p.batches.recv().await.unwrap();
        assert_eq!(p1.first_offset, 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!p.task.is_finished(), "p waits for room for record 2");
        p1.ack(BatchOutcome::Abandoned("refused".into()));
        let exit = tokio::time::timeout(Duration::from_secs(60), &mut p.task)
            .await
            .expect("a failure ends the wait")
            .unwrap();
        assert!(
            matches!(
                exit,
                Exit::Failed {
                    committable: Some(1),
                    ..
                }
            ),
            "{exit:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_waiting_for_room_stops_at_once_without_the_record() {
        let budget = InFlightBudget::new(footprint() * 3 / 2);
        let a = start_with_budget(1, 4, budget.clone());
        let mut b = start_with_budget(1, 4, budget.clone());
        a.records.unbounded_send(Ok(record(0))).unwrap();
        let _a0 = a.batches.recv().await.unwrap();
        b.records.unbounded_send(Ok(record(7))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!b.task.is_finished(), "b waits for room");
        // Revoked while waiting: b ends without waiting for a's write, having batched nothing,
        // so nothing of it is committable and the next owner reads offset 7 again.
        b.stop.take().unwrap().send(FlushReason::Revoke).unwrap();
        let t0 = Instant::now();
        let exit = tokio::time::timeout(Duration::from_secs(60), &mut b.task)
            .await
            .expect("the revoke is not held up by the wait for room");
        assert_eq!(exit.unwrap(), Exit::Drained { committable: None });
        assert_eq!(Instant::now(), t0);
        assert!(
            b.batches.try_recv().is_err(),
            "the waiting record was not batched"
        );
        assert_eq!(budget.in_use(), footprint(), "only a's batch holds a share");
    }
}
