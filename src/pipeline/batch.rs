//! A batch: a contiguous run of one partition's messages, in offset order, plus how to acknowledge
//! it. Valid events go to the store; invalid ones travel in the same batch as dead letters so that
//! the batch's offset range is only acknowledged when both are durable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::{Event, EventError, Source};
use crate::pipeline::deadline::RETRY_HOLD_TURN;
use crate::pipeline::flush::FlushReason;

/// A message that failed decoding, with everything needed to dead-letter it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: Source,
    /// The original coordinates of a message re-published by `vault dlq replay` (from its
    /// `vault.source.*` headers): its letter names them again, so a second replay still maps
    /// to the row of the first read.
    pub origin: Option<(String, i32, i64)>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub error: EventError,
}

/// A request to erase a user, read from Kafka: a tombstone keyed by the user id, with
/// `pipeline.tombstones = "erase"`. It erases through the tombstone's Kafka timestamp.
#[derive(Debug, Clone)]
pub struct EraseRequest {
    pub source: Source,
    pub user_id: String,
}

/// One decoded Kafka message.
#[derive(Debug, Clone)]
pub enum Record {
    Event(Event),
    Invalid(DeadLetter),
    Erase(EraseRequest),
}

impl Record {
    pub fn source(&self) -> &Source {
        match self {
            Record::Event(e) => &e.source,
            Record::Invalid(d) => &d.source,
            Record::Erase(r) => &r.source,
        }
    }

    /// Bytes the record counts against `max_bytes`: the size of the Kafka value.
    pub fn size(&self) -> usize {
        match self {
            Record::Event(e) => e.payload().len(),
            Record::Invalid(d) => d.value.as_ref().map_or(0, Vec::len),
            Record::Erase(_) => 0,
        }
    }

    /// Bytes of memory the record takes while it is read and not yet durable, counted against
    /// the in-flight budget: its value, its key (and a dead letter's original topic) and the
    /// record itself.
    pub fn footprint(&self) -> usize {
        let key = match self {
            Record::Event(e) => e.key().map_or(0, <[u8]>::len),
            Record::Invalid(d) => {
                d.key.as_ref().map_or(0, Vec::len) + d.origin.as_ref().map_or(0, |o| o.0.len())
            }
            Record::Erase(r) => r.user_id.len(),
        };
        std::mem::size_of::<Record>() + self.size() + key
    }
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every event is in the store and every dead letter is acknowledged by Kafka.
    Durable,
    /// The batch was abandoned (shutdown or revoke deadline passed, a permanent failure the
    /// policy does not allow to skip, a panic, or a failing batch giving its memory back to
    /// partitions waiting for it). Nothing at or after its first offset may be committed.
    Abandoned(String),
}

/// A flushed batch on its way to a persister.
#[derive(Debug)]
pub struct Batch {
    pub topic: Arc<str>,
    pub partition: i32,
    /// Position of the batch in its partition's sequence, starting at 0 for each task.
    pub seq: u64,
    pub first_offset: i64,
    pub last_offset: i64,
    /// The records in offset order: valid events and dead letters.
    pub records: Vec<Record>,
    pub bytes: usize,
    pub reason: FlushReason,
    /// Fired when the batch's partition incarnation must stop: the persister stops retrying and
    /// abandons the batch.
    pub cancel: CancellationToken,
    ack: Option<oneshot::Sender<BatchOutcome>>,
    /// This batch's share of the in-flight budget, returned when the batch is dropped.
    budget: Option<Share>,
}

/// The process-wide bound on the memory of events read from Kafka and not yet durable: records
/// in open batches and in batches being written, across all partitions. A partition adds each
/// record's [`Record::footprint`] to the share of its open batch; the batch carries that share
/// to the persister and gives it back when dropped.
///
/// While healthy partitions (see [`PartitionHealth`]) wait for room, batches whose writes are
/// stuck (see [`Batch::may_keep_retrying`]) keep their memory only within half of it: failing
/// partitions, however many, cannot keep the others from reading.
#[derive(Debug, Clone)]
pub struct InFlightBudget {
    permits: Arc<Semaphore>,
    /// What failing batches may hold together, and that amount (half the budget).
    retrying: (Arc<Semaphore>, u32),
    /// Healthy partitions waiting for room right now: the pressure on failing batches.
    pressing: Arc<AtomicUsize>,
    total: u32,
}

/// Whether a partition is failing, for as long as it is assigned to this member: from the first
/// failed write of one of its batches until one of its batches is durable, across the restarts
/// of its task, and while any of its batches is retrying. The coordinator keeps one per assigned
/// partition and hands it to each of the partition's incarnations.
///
/// A healthy partition waiting for room presses failing batches to give memory back; a failing
/// one does not, since its own writes are what holds it up. Its state is judged as it is now,
/// not as it was when the wait began: a partition that starts failing while it waits stops
/// pressing at once, and one whose batch was abandoned does not press again when its task
/// restarts and waits for room to read that batch again. But a failed partition with no batch
/// retrying whose wait has lasted [`RETRY_HOLD_TURN`] presses too: batches that keep failing
/// elsewhere cannot keep it from reading for good, and in an outage this costs about one
/// abandonment per such partition per turn.
#[derive(Debug, Clone, Default)]
pub struct PartitionHealth(Arc<Mutex<Marks>>);

#[derive(Debug, Default)]
struct Marks {
    /// Waits for room in progress.
    waiting: usize,
    /// Of those, waits that have lasted [`RETRY_HOLD_TURN`].
    overdue: usize,
    /// Batches retrying right now.
    retrying: usize,
    /// A write failed, and no batch of the partition was durable since.
    failed: bool,
}

impl Marks {
    fn presses(&self) -> bool {
        self.waiting > 0 && self.retrying == 0 && (!self.failed || self.overdue > 0)
    }
}

impl PartitionHealth {
    /// Changes the marks, and the count of pressing partitions with them (under the lock, so the
    /// count is always the sum of what each partition's marks say).
    fn update(&self, pressing: &AtomicUsize, change: impl FnOnce(&mut Marks)) {
        let mut marks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let before = marks.presses();
        change(&mut marks);
        match (before, marks.presses()) {
            (false, true) => {
                pressing.fetch_add(1, Ordering::SeqCst);
            }
            (true, false) => {
                pressing.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }

    /// Whether the partition counts as failing right now.
    pub fn is_failing(&self) -> bool {
        let marks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        marks.retrying > 0 || marks.failed
    }
}

/// Bytes of the budget held by one open batch or batch; returned when dropped.
#[derive(Debug)]
pub struct Share {
    permits: Arc<Semaphore>,
    retrying: (Arc<Semaphore>, u32),
    pressing: Arc<AtomicUsize>,
    health: PartitionHealth,
    bytes: u32,
}

/// What a failed attempt of a batch says about it (see [`Batch::may_keep_retrying`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedAttempt {
    /// The failure is one that another attempt may cure (`StoreError::is_retryable`; for a
    /// dead-letter send, any refusal but a permanent one).
    pub transient: bool,
    /// The attempt wrote part of what it sent: rows the store acknowledged, letters Kafka did.
    pub progressed: bool,
}

/// A failed batch's retry state, from its first failure until it stops retrying (durable or
/// abandoned): it marks the batch's partition as failing from that first failure (see
/// [`PartitionHealth`]), counts its attempts in a row that wrote nothing and when its failures
/// began (a transient failure retries unjudged within a turn unless it is the second attempt
/// in a row to write nothing, see [`Batch::may_keep_retrying`]), and holds the batch's claim on the half of
/// the budget that failing batches may hold while healthy partitions wait, if it has one, for
/// a turn of [`RETRY_HOLD_TURN`].
#[derive(Debug)]
pub struct RetryHold {
    claim: Option<(OwnedSemaphorePermit, Instant)>,
    /// The batch's failed attempts in a row that wrote nothing.
    fruitless: u32,
    /// When the batch first failed.
    since: Instant,
    health: PartitionHealth,
    pressing: Arc<AtomicUsize>,
}

impl RetryHold {
    /// An attempt of the batch (of any of its phases: events, erasures, dead letters) wrote
    /// everything it sent: the next failure is not the second in a row to write nothing.
    pub fn succeeded(hold: &mut Option<RetryHold>) {
        if let Some(state) = hold {
            state.fruitless = 0;
        }
    }

    fn began(share: &Share) -> Self {
        share.health.update(&share.pressing, |m| {
            m.retrying += 1;
            m.failed = true;
        });
        RetryHold {
            claim: None,
            fruitless: 0,
            since: Instant::now(),
            health: share.health.clone(),
            pressing: share.pressing.clone(),
        }
    }
}

impl Drop for RetryHold {
    fn drop(&mut self) {
        self.health.update(&self.pressing, |m| m.retrying -= 1);
    }
}

/// Marks a partition as waiting for room while it waits (also when the wait is dropped).
struct Waiting<'a> {
    health: &'a PartitionHealth,
    pressing: &'a AtomicUsize,
    overdue: bool,
}

impl<'a> Waiting<'a> {
    fn begin(health: &'a PartitionHealth, pressing: &'a AtomicUsize) -> Self {
        health.update(pressing, |m| m.waiting += 1);
        Waiting {
            health,
            pressing,
            overdue: false,
        }
    }

    /// The wait has lasted [`RETRY_HOLD_TURN`].
    fn overdue(&mut self) {
        self.overdue = true;
        self.health.update(self.pressing, |m| m.overdue += 1);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let overdue = self.overdue;
        self.health.update(self.pressing, |m| {
            m.waiting -= 1;
            m.overdue -= usize::from(overdue);
        });
    }
}

impl Share {
    /// A share holding nothing yet, of the same partition (for its next open batch).
    pub fn sibling(&self) -> Share {
        Share {
            permits: self.permits.clone(),
            retrying: self.retrying.clone(),
            pressing: self.pressing.clone(),
            health: self.health.clone(),
            bytes: 0,
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.permits.add_permits(self.bytes as usize);
    }
}

impl InFlightBudget {
    pub fn new(total_bytes: usize) -> Self {
        let total = u32::try_from(total_bytes.max(1)).unwrap_or(u32::MAX);
        let half = (total / 2).max(1);
        InFlightBudget {
            permits: Arc::new(Semaphore::new(total as usize)),
            retrying: (Arc::new(Semaphore::new(half as usize)), half),
            pressing: Arc::default(),
            total,
        }
    }

    /// A share holding nothing yet, of the partition whose health is `health`.
    pub fn share(&self, health: &PartitionHealth) -> Share {
        Share {
            permits: self.permits.clone(),
            retrying: self.retrying.clone(),
            pressing: self.pressing.clone(),
            health: health.clone(),
            bytes: 0,
        }
    }

    /// Adds `bytes` to `share` if they fit right now.
    pub fn try_add(&self, share: &mut Share, bytes: usize) -> bool {
        let want = self.clamp(bytes);
        match self.permits.try_acquire_many(want) {
            Ok(permit) => {
                permit.forget();
                share.bytes += want;
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until `bytes` fit, then adds them to `share` (a record larger than the whole
    /// budget waits for all of it).
    pub async fn add(&self, share: &mut Share, bytes: usize) {
        let want = self.clamp(bytes);
        // Presses failing batches while the partition is healthy, or once the wait has lasted
        // a turn (see `PartitionHealth`).
        let mut waiting = Waiting::begin(&share.health, &self.pressing);
        let acquire = self.permits.acquire_many(want);
        tokio::pin!(acquire);
        let permit = tokio::select! {
            biased;
            permit = &mut acquire => permit,
            () = tokio::time::sleep(RETRY_HOLD_TURN) => {
                waiting.overdue();
                acquire.await
            }
        };
        permit
            .expect("the in-flight budget is never closed")
            .forget();
        drop(waiting);
        share.bytes += want;
    }

    fn clamp(&self, bytes: usize) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.total)
    }

    /// Healthy partitions waiting for room right now.
    pub fn pressing(&self) -> usize {
        self.pressing.load(Ordering::SeqCst)
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        (self.total as usize).saturating_sub(self.permits.available_permits())
    }
}

impl Batch {
    pub fn new(
        records: Vec<Record>,
        bytes: usize,
        seq: u64,
        reason: FlushReason,
    ) -> (Batch, oneshot::Receiver<BatchOutcome>) {
        let first = records
            .first()
            .expect("a flushed batch holds at least one record")
            .source();
        let last = records
            .last()
            .expect("a flushed batch holds at least one record")
            .source();
        let (topic, partition) = (first.topic.clone(), first.partition);
        let (first_offset, last_offset) = (first.offset, last.offset);
        let (tx, rx) = oneshot::channel();
        let batch = Batch {
            topic,
            partition,
            seq,
            first_offset,
            last_offset,
            records,
            bytes,
            reason,
            cancel: CancellationToken::new(),
            ack: Some(tx),
            budget: None,
        };
        (batch, rx)
    }

    /// Attaches the batch's share of the in-flight budget, held until the batch is dropped.
    pub fn hold(&mut self, share: Share) {
        self.budget = Some(share);
    }

    /// Whether this batch, whose write just failed, may keep its memory and retry; `false`:
    /// abandon it, giving its memory back (its partition restarts where it must resume and
    /// reads it again). Called at each failure with the batch's `hold`.
    ///
    /// A transient failure (an `Overloaded` answer, a timeout: what one more attempt may cure)
    /// retries unclaimed for the first [`RETRY_HOLD_TURN`] since the batch first failed,
    /// unless its attempt and the one before both wrote nothing of what they sent
    /// (`failed.progressed`; a first failure has no attempt before it): the batch is being
    /// written, and holds its memory through one backoff and one more attempt (which waits for
    /// a retry slot and a write slot, behind first attempts), outside the half below. One
    /// attempt that writes nothing is not a pattern: a saturated node sheds all of an attempt
    /// now and then, between attempts that progress. Judging such failures made
    /// a database that sheds a little load from every partition cost whole partitions' worth of
    /// replays: many batches of such a run see a shed request, their retries wait for write
    /// slots behind first attempts, and while the claims of those retries filled half the
    /// budget, the next batch to fail was abandoned, and its partition read again and rewrote
    /// what it had already written. A batch whose last two attempts wrote nothing, whose
    /// failure is not transient (a rejected schema, a dead-letter topic that refuses for
    /// good), or that has been failing for a turn, is stuck, and judged as follows (a judged
    /// batch whose next attempt makes progress within its first turn retries unjudged again).
    ///
    /// A judged batch claims its bytes (at most half the budget, so one batch can always
    /// claim) of the half of the budget that failing batches may hold together, whenever there
    /// is room. While no healthy partition (see [`PartitionHealth`]) waits for memory it
    /// may retry without a claim, so a store that fails every write (down, or too overloaded
    /// to take any) makes nothing be abandoned and read twice once each partition has had a
    /// write fail; while one does, only with a claim. A claim lasts
    /// [`RETRY_HOLD_TURN`]: then it is given back, and under pressure the batch is abandoned, so
    /// a batch that keeps failing (a schema error, a dead-letter topic that refuses) cannot keep
    /// memory from others for good. A batch without a share (written outside a pipeline)
    /// always may. Pressure is judged now, by what the waiting partitions are now (see
    /// [`PartitionHealth`]).
    pub fn may_keep_retrying(&self, hold: &mut Option<RetryHold>, failed: FailedAttempt) -> bool {
        let Some(share) = &self.budget else {
            return true;
        };
        let state = hold.get_or_insert_with(|| RetryHold::began(share));
        state.fruitless = if failed.progressed {
            0
        } else {
            state.fruitless.saturating_add(1)
        };
        let being_written = state.fruitless < 2;
        if failed.transient && being_written && state.since.elapsed() < RETRY_HOLD_TURN {
            return true;
        }
        let pressure = share.pressing.load(Ordering::SeqCst) > 0;
        if let Some((_, since)) = &state.claim {
            if since.elapsed() < RETRY_HOLD_TURN {
                return true;
            }
            state.claim = None;
            return !pressure;
        }
        let (retrying, cap) = &share.retrying;
        state.claim = retrying
            .clone()
            .try_acquire_many_owned(share.bytes.clamp(1, *cap))
            .ok()
            .map(|permit| (permit, Instant::now()));
        state.claim.is_some() || !pressure
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// The valid events, in offset order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.records.iter().filter_map(|r| match r {
            Record::Event(e) => Some(e),
            _ => None,
        })
    }

    /// The records that failed decoding, in offset order.
    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetter> {
        self.records.iter().filter_map(|r| match r {
            Record::Invalid(d) => Some(d),
            _ => None,
        })
    }

    /// The erasure requests, in offset order.
    pub fn erasures(&self) -> impl Iterator<Item = &EraseRequest> {
        self.records.iter().filter_map(|r| match r {
            Record::Erase(e) => Some(e),
            _ => None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reports the outcome to the partition task. A batch dropped without an ack reads as
    /// abandoned on the other side, so a lost batch can never look durable. A durable batch
    /// marks its partition healthy again (see [`PartitionHealth`]).
    pub fn ack(mut self, outcome: BatchOutcome) {
        if let (BatchOutcome::Durable, Some(share)) = (&outcome, &self.budget) {
            share.health.update(&share.pressing, |m| m.failed = false);
        }
        if let Some(tx) = self.ack.take() {
            // The partition task may be gone (revoked and aborted); then nobody needs the answer.
            let _ = tx.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_holding(budget: &InFlightBudget, bytes: usize) -> Batch {
        batch_of(&PartitionHealth::default(), budget, bytes)
    }

    fn batch_of(health: &PartitionHealth, budget: &InFlightBudget, bytes: usize) -> Batch {
        let event = crate::event::decode(
            Some(b"k"),
            Some(br#"{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#),
            Source {
                topic: Arc::from("t"),
                partition: 0,
                offset: 0,
                timestamp_ms: None,
            },
            None,
            crate::event::Limits::default(),
        )
        .expect("a valid event");
        let mut share = budget.share(health);
        assert!(budget.try_add(&mut share, bytes));
        let (mut batch, _ack) = Batch::new(vec![Record::Event(event)], bytes, 0, FlushReason::Size);
        batch.hold(share);
        batch
    }

    /// A partition waiting for room, for as long as the returned task runs.
    fn wait_for_room(budget: &InFlightBudget) -> tokio::task::JoinHandle<()> {
        wait_for_room_as(&PartitionHealth::default(), budget)
    }

    /// The partition whose health is `health` waiting for room (a task of it, perhaps a new
    /// incarnation), for as long as the returned task runs.
    fn wait_for_room_as(
        health: &PartitionHealth,
        budget: &InFlightBudget,
    ) -> tokio::task::JoinHandle<()> {
        let (health, budget) = (health.clone(), budget.clone());
        tokio::spawn(async move {
            let mut share = budget.share(&health);
            budget.add(&mut share, budget.total as usize).await;
        })
    }

    #[tokio::test(start_paused = true)]
    async fn without_pressure_failing_batches_keep_retrying_with_or_without_a_claim() {
        let budget = InFlightBudget::new(1000);
        let (a, b) = (batch_holding(&budget, 300), batch_holding(&budget, 300));
        let (mut ha, mut hb) = (None, None);
        assert!(keeps_failing(&a, &mut ha) && claimed(&ha), "a claims");
        assert!(
            keeps_failing(&b, &mut hb),
            "b retries unclaimed: nobody waits"
        );
        assert!(!claimed(&hb), "600 bytes would pass half");
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_failing_batches_hold_at_most_half_and_take_turns() {
        let budget = InFlightBudget::new(1000);
        let (a, b) = (batch_holding(&budget, 300), batch_holding(&budget, 300));
        let waiter = wait_for_room(&budget);
        tokio::task::yield_now().await;
        assert_eq!(budget.pressing(), 1, "a healthy partition waits");
        let (mut ha, mut hb) = (None, None);
        assert!(keeps_failing(&a, &mut ha), "a claims");
        assert!(!keeps_failing(&b, &mut hb), "b must give its memory back");
        assert!(keeps_failing(&a, &mut ha), "within its turn");
        tokio::time::advance(RETRY_HOLD_TURN).await;
        assert!(!keeps_failing(&a, &mut ha), "its turn is over");
        assert!(!claimed(&ha));
        drop((a, b));
        waiter.await.unwrap();
        assert_eq!(budget.in_use(), 0, "every share was given back");
    }

    /// A transient failure of an attempt that wrote nothing.
    const SHED_ALL: FailedAttempt = FailedAttempt {
        transient: true,
        progressed: false,
    };

    /// The batch's write fails again: the first time (its free retry) when it has not failed
    /// yet, then once more, each attempt writing nothing; what [`Batch::may_keep_retrying`]
    /// answers to the latest failure.
    fn keeps_failing(batch: &Batch, hold: &mut Option<RetryHold>) -> bool {
        if hold.is_none() {
            assert!(
                batch.may_keep_retrying(hold, SHED_ALL) && !claimed(hold),
                "a first failure retries, unclaimed"
            );
        }
        batch.may_keep_retrying(hold, SHED_ALL)
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_retries_unclaimed_under_pressure_while_first_or_progressing() {
        let budget = InFlightBudget::new(1000);
        let (a, b, c, d, e) = (
            batch_holding(&budget, 500),
            batch_holding(&budget, 300),
            batch_holding(&budget, 100),
            batch_holding(&budget, 50),
            batch_holding(&budget, 50),
        );
        let waiter = wait_for_room(&budget);
        tokio::task::yield_now().await;
        assert_eq!(budget.pressing(), 1, "a healthy partition waits");
        let (mut ha, mut hb) = (None, None);
        assert!(
            keeps_failing(&a, &mut ha) && claimed(&ha),
            "a fails twice and claims half"
        );
        assert!(
            b.may_keep_retrying(&mut hb, SHED_ALL) && !claimed(&hb),
            "b's first failure: one retry, though the claims are full and a partition waits"
        );
        assert!(
            health_of(&b).is_failing(),
            "its partition counts as failing from its first failure"
        );
        assert!(
            !b.may_keep_retrying(&mut hb, SHED_ALL),
            "b fails again: it gives its memory back"
        );
        let mut hc = None;
        assert!(
            !c.may_keep_retrying(
                &mut hc,
                FailedAttempt {
                    transient: false,
                    progressed: true
                }
            ),
            "a first failure that is not transient is judged at once"
        );
        let mut hd = None;
        assert!(
            d.may_keep_retrying(&mut hd, SHED_ALL),
            "d's first failure: one retry"
        );
        assert!(
            d.may_keep_retrying(
                &mut hd,
                FailedAttempt {
                    transient: true,
                    progressed: true
                }
            ) && !claimed(&hd),
            "d fails again but wrote part of its rows: it is being written, and retries"
        );
        assert!(
            d.may_keep_retrying(&mut hd, SHED_ALL) && !claimed(&hd),
            "d's next attempt writes nothing, once after progress: it retries"
        );
        assert!(
            !d.may_keep_retrying(&mut hd, SHED_ALL),
            "and the next writes nothing too: two in a row, it gives its memory back"
        );
        let progressed = FailedAttempt {
            transient: true,
            progressed: true,
        };
        // Progress and nothing in turn, then a success of another phase (an erasure, a
        // dead-letter send): never two attempts in a row that wrote nothing.
        let mut hf = None;
        for failed in [progressed, SHED_ALL, progressed, SHED_ALL] {
            assert!(e.may_keep_retrying(&mut hf, failed) && !claimed(&hf));
        }
        RetryHold::succeeded(&mut hf);
        assert!(
            e.may_keep_retrying(&mut hf, SHED_ALL),
            "after a success, one attempt that writes nothing is not two in a row"
        );
        drop(hf);
        let mut he = None;
        assert!(e.may_keep_retrying(&mut he, SHED_ALL), "e fails");
        tokio::time::advance(RETRY_HOLD_TURN).await;
        assert!(
            !e.may_keep_retrying(&mut he, progressed),
            "after failing for a turn, e is judged even while it makes progress"
        );
        drop((a, ha, b, hb, c, hc, d, hd, e, he));
        waiter.await.unwrap();
    }

    fn health_of(batch: &Batch) -> &PartitionHealth {
        &batch.budget.as_ref().expect("a share").health
    }

    fn claimed(hold: &Option<RetryHold>) -> bool {
        hold.as_ref().is_some_and(|h| h.claim.is_some())
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_whose_own_writes_fail_puts_no_pressure_on_the_others() {
        let budget = InFlightBudget::new(1000);
        let (a, b) = (batch_holding(&budget, 300), batch_holding(&budget, 300));
        let mut ha = None;
        assert!(keeps_failing(&a, &mut ha), "a fails and claims");
        // `a`'s partition waits for room for its next batch: it is failing, so no pressure.
        let mut next = a.budget.as_ref().expect("a share").sibling();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.add(&mut next, 1000).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a's partition waits for room");
        assert_eq!(
            budget.pressing(),
            0,
            "and its wait is not counted as pressure"
        );
        let mut hb = None;
        assert!(keeps_failing(&b, &mut hb), "b retries unclaimed");
        assert!(!claimed(&hb));
        drop((ha, hb, a, b));
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_half_the_budget_may_still_claim_alone() {
        let budget = InFlightBudget::new(1000);
        let big = batch_holding(&budget, 900);
        let _waiter = wait_for_room(&budget);
        tokio::task::yield_now().await;
        assert_eq!(budget.pressing(), 1, "under pressure");
        let mut hold = None;
        assert!(keeps_failing(&big, &mut hold), "one batch can always claim");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_that_starts_failing_while_it_waits_stops_pressing_at_once() {
        let budget = InFlightBudget::new(1000);
        let health = PartitionHealth::default();
        let (own, other, third) = (
            batch_of(&health, &budget, 300),
            batch_holding(&budget, 600),
            batch_holding(&budget, 50),
        );
        let waiter = wait_for_room_as(&health, &budget);
        tokio::task::yield_now().await;
        assert_eq!(budget.pressing(), 1, "a healthy partition waits");
        let mut other_hold = None;
        assert!(keeps_failing(&other, &mut other_hold), "other claims half");
        let mut own_hold = None;
        assert!(
            keeps_failing(&own, &mut own_hold) && !claimed(&own_hold),
            "the claims are full, but the only waiter is its own partition, failing now"
        );
        assert!(health.is_failing(), "a write of it failed");
        assert_eq!(
            budget.pressing(),
            0,
            "its partition's wait, begun while it was healthy, presses no longer"
        );
        let mut third_hold = None;
        assert!(
            keeps_failing(&third, &mut third_hold) && !claimed(&third_hold),
            "without pressure a failing batch retries unclaimed"
        );
        drop((own, own_hold, other, other_hold, third, third_hold));
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_partition_presses_nobody_after_its_restart_until_a_batch_of_it_is_durable(
    ) {
        let budget = InFlightBudget::new(1000);
        let health = PartitionHealth::default();
        let abandoned = batch_of(&health, &budget, 300);
        let mut hold = None;
        assert!(keeps_failing(&abandoned, &mut hold), "it fails");
        // Abandoned: the batch and its retry state are gone, and its memory with them.
        drop((abandoned, hold));
        let elsewhere = batch_holding(&budget, 600);
        let mut elsewhere_hold = None;
        assert!(keeps_failing(&elsewhere, &mut elsewhere_hold) && claimed(&elsewhere_hold));
        let unclaimed = batch_holding(&budget, 300);
        // A batch of the partition read before the restart, still being written.
        let durable = batch_of(&health, &budget, 100);
        // The partition's next incarnation waits for room to read the abandoned batch again.
        let restarted = wait_for_room_as(&health, &budget);
        tokio::task::yield_now().await;
        assert!(!restarted.is_finished(), "it waits for room");
        assert_eq!(
            budget.pressing(),
            0,
            "a failing partition's new incarnation presses nobody"
        );
        let mut unclaimed_hold = None;
        assert!(
            keeps_failing(&unclaimed, &mut unclaimed_hold) && !claimed(&unclaimed_hold),
            "so a failing batch without a claim keeps retrying"
        );
        durable.ack(BatchOutcome::Durable);
        assert!(!health.is_failing(), "a durable batch makes it healthy");
        assert_eq!(budget.pressing(), 1, "and its wait presses from then on");
        assert!(
            !keeps_failing(&unclaimed, &mut unclaimed_hold),
            "a failing batch without a claim gives its memory back"
        );
        drop((unclaimed, unclaimed_hold, elsewhere, elsewhere_hold));
        restarted.await.unwrap();
        assert_eq!(budget.pressing(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_partition_that_has_waited_a_turn_presses_again() {
        let budget = InFlightBudget::new(1000);
        let health = PartitionHealth::default();
        let abandoned = batch_of(&health, &budget, 100);
        let mut hold = None;
        assert!(keeps_failing(&abandoned, &mut hold), "it fails");
        drop((abandoned, hold));
        // Elsewhere, batches that keep failing hold the whole budget.
        let (claimed_one, unclaimed) = (batch_holding(&budget, 500), batch_holding(&budget, 500));
        let (mut claim, mut unclaimed_hold) = (None, None);
        assert!(keeps_failing(&claimed_one, &mut claim) && claimed(&claim));
        let waiter = wait_for_room_as(&health, &budget);
        tokio::task::yield_now().await;
        assert_eq!(
            budget.pressing(),
            0,
            "the failed partition waits, pressing nobody"
        );
        assert!(keeps_failing(&unclaimed, &mut unclaimed_hold));
        tokio::time::advance(RETRY_HOLD_TURN).await;
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still waiting");
        assert_eq!(budget.pressing(), 1, "after a whole turn it presses");
        assert!(
            !keeps_failing(&unclaimed, &mut unclaimed_hold),
            "so a failing batch without a claim gives its memory back"
        );
        drop((unclaimed, unclaimed_hold, claimed_one, claim));
        waiter.await.unwrap();
        assert_eq!(budget.pressing(), 0, "the wait is over");
    }
}
