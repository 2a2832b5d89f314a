//! Persisters: take flushed batches from a bounded channel, write their events to the store and
//! their invalid records to the dead-letter sink, and acknowledge each batch.
//!
//! Invariants kept here:
//! - a batch is acknowledged [`BatchOutcome::Durable`] only when every event is written and every
//!   dead letter is acknowledged by Kafka. Transient failures are retried with exponential
//!   backoff and jitter for as long as it takes (visible in logs, metrics and readiness). A
//!   batch is abandoned only by cancellation (the process's abandon token, or the batch's own
//!   token: its partition's stop deadline passed or its task was replaced), by a panic, or when
//!   it is stuck (two attempts in a row wrote nothing, it has been failing for a
//!   turn, or it failed for a reason that is not transient) while healthy partitions wait for in-flight memory and
//!   failing batches hold their half of it (see [`Batch::may_keep_retrying`]); an abandoned
//!   batch is never committed past, and its partition restarts where it must resume;
//! - a retry sends only what is still unwritten: rows the store did not acknowledge, letters
//!   Kafka did not acknowledge;
//! - a failing partition holds at most its share of write capacity. Each batch is its own task;
//!   a write attempt holds one of `pipeline.persisters` slots, a backoff sleep holds none, and
//!   retries (attempts after a failure) also take one of half as many retry slots (one, with a
//!   single persister). So failing batches, however many and however long they fail, leave at
//!   least half the slots to first attempts (with a single persister, they take turns), and
//!   healthy partitions keep flowing;
//! - with `scylla.max_rows_per_second`, each write request of events first waits for its rows in
//!   the instance's rate limit ([`RowRate`]), holding no slot (nor, in the store, any
//!   concurrency permit) meanwhile; the wait is part of the attempt that cancellation drops, so
//!   an abandoned batch stops waiting at once, and rows admitted but cancelled before their slot
//!   is taken are given back to the rate. The limit only delays writes: a batch is durable,
//!   and committed past, only once the store acknowledged its rows, as without it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::config::{InvalidPolicy, RetrySettings};
use crate::event::{Event, EventError};
use crate::kafka::dead_letter::DeadLetterSink;
use crate::pipeline::batch::{Batch, BatchOutcome, DeadLetter, FailedAttempt, RetryHold};
use crate::store::erasure::Erasure;
use crate::store::rate::RowRate;
use crate::store::retention::{Retention, Ttl};
use crate::store::{Store, StoreError};
use crate::telemetry::{Health, Metrics};

/// What every persister shares.
pub struct Persister<S, D> {
    pub store: S,
    pub dead_letters: D,
    pub on_invalid: InvalidPolicy,
    /// Events past their retention are not written (counted as expired).
    pub retention: Retention,
    pub retry: RetrySettings,
    /// The instance's limit on event rows written per second (`scylla.max_rows_per_second`),
    /// shared by every write request of every batch.
    pub rate: RowRate,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Fired when the shutdown deadline passes: retry loops give up and abandon their batch.
    pub cancel: CancellationToken,
}

/// Write slots: every attempt holds one of `attempts`; an attempt after a failure first takes
/// one of `retries` (half as many), so retries can never take every slot.
struct Slots {
    attempts: Semaphore,
    retries: Semaphore,
}

impl Slots {
    fn new(workers: usize) -> Self {
        Slots {
            attempts: Semaphore::new(workers),
            retries: Semaphore::new((workers / 2).max(1)),
        }
    }

    async fn acquire(&self, retry: bool) -> (Option<SemaphorePermit<'_>>, SemaphorePermit<'_>) {
        let retry = match retry {
            true => Some(self.retries.acquire().await.expect("never closed")),
            false => None,
        };
        (retry, self.attempts.acquire().await.expect("never closed"))
    }
}

impl<S: Store, D: DeadLetterSink> Persister<S, D> {
    /// Writes the batches of `batches` until the channel closes, each in its own task, at most
    /// `workers` write attempts at once, on `runtime` (else the current one); the pool ends
    /// once every batch is answered.
    pub fn spawn_pool(
        self: Arc<Self>,
        workers: usize,
        batches: async_channel::Receiver<Batch>,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> JoinSet<()> {
        self.rate.report_to(
            self.metrics.write_rate_limit.clone(),
            self.metrics.write_rate_limited_seconds.clone(),
        );
        let mut set = JoinSet::new();
        let pool = async move {
            let slots = Arc::new(Slots::new(workers));
            let mut writing = JoinSet::new();
            loop {
                tokio::select! {
                    batch = batches.recv() => match batch {
                        Ok(batch) => {
                            let this = self.clone();
                            let slots = slots.clone();
                            writing.spawn(async move { this.persist_and_ack(batch, &slots).await });
                        }
                        Err(_closed) => break,
                    },
                    Some(_) = writing.join_next(), if !writing.is_empty() => {}
                }
            }
            while writing.join_next().await.is_some() {}
        };
        match runtime {
            Some(runtime) => set.spawn_on(pool, runtime),
            None => set.spawn(pool),
        };
        set
    }

    async fn persist_and_ack(&self, batch: Batch, slots: &Slots) {
        self.metrics.in_flight_batches.inc();
        // A panic in the store or the sink abandons this batch (its partition restarts from
        // where it must resume); other batches carry on.
        let outcome = AssertUnwindSafe(self.persist_with(&batch, slots))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                error!(topic = %batch.topic, partition = batch.partition, first_offset = batch.first_offset, panic = %what, "Writing a batch panicked; the batch is abandoned and its partition restarts.");
                BatchOutcome::Abandoned(format!("write panicked: {what}"))
            });
        self.metrics.in_flight_batches.dec();
        batch.ack(outcome);
    }

    /// Writes one batch to completion (or abandonment), with slots of its own.
    pub async fn persist(&self, batch: &Batch) -> BatchOutcome {
        self.persist_with(batch, &Slots::new(1)).await
    }

    async fn persist_with(&self, batch: &Batch, slots: &Slots) -> BatchOutcome {
        let mut dead: Vec<DeadLetter> = Vec::new();
        // Begun at the batch's first failure (a claim is tried once the batch is stuck: two
        // attempts in a row wrote nothing, or one failed for a reason that is not transient),
        // kept until it is durable or abandoned.
        let mut hold: Option<RetryHold> = None;
        if let Err(reason) = self.write_events(batch, &mut dead, slots, &mut hold).await {
            return BatchOutcome::Abandoned(reason);
        }
        if let Err(reason) = self.erase_users(batch, slots, &mut hold).await {
            return BatchOutcome::Abandoned(reason);
        }
        let invalid = batch.dead_letters().chain(dead.iter());
        let letters: Vec<&DeadLetter> = invalid.collect();
        if !letters.is_empty() {
            if let Err(reason) = self.handle_invalid(batch, letters, slots, &mut hold).await {
                return BatchOutcome::Abandoned(reason);
            }
        }
        BatchOutcome::Durable
    }

    /// Lets a failed batch retry while it may keep its memory (see
    /// [`Batch::may_keep_retrying`]: always after a transient failure, within a turn, unless its
    /// attempt and the one before both wrote nothing; after any other, unless partitions wait
    /// for memory and failing batches hold their half of it). Otherwise the batch is abandoned: its memory goes back to
    /// the partitions waiting for it, and its own partition restarts where it must resume
    /// (after the restart backoff), reading it again.
    fn may_retry(
        &self,
        batch: &Batch,
        hold: &mut Option<RetryHold>,
        failed: FailedAttempt,
    ) -> Result<(), String> {
        if batch.may_keep_retrying(hold, failed) {
            return Ok(());
        }
        self.metrics
            .retries_out_of_memory
            .with_label_values(&[&*batch.topic])
            .inc();
        warn!(topic = %batch.topic, partition = batch.partition, first_offset = batch.first_offset, "Healthy partitions wait for in-flight memory and failing batches hold their half of it: this failing batch is abandoned instead of retried, and its partition restarts where it must resume.");
        Err("abandoned instead of retried: healthy partitions wait for in-flight memory and failing batches hold their half of pipeline.max_in_flight_bytes".to_string())
    }

    /// Resolves when `batch` must be abandoned.
    async fn cancelled(&self, batch: &Batch) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = batch.cancel.cancelled() => {}
        }
    }

    async fn write_events(
        &self,
        batch: &Batch,
        dead: &mut Vec<DeadLetter>,
        slots: &Slots,
        hold: &mut Option<RetryHold>,
    ) -> Result<(), String> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (mut pending, expired): (Vec<&Event>, Vec<&Event>) = batch
            .events()
            .partition(|e| self.retention.ttl(e, now_ms) != Ttl::Expired);
        if !expired.is_empty() {
            self.metrics
                .events_expired
                .with_label_values(&[&*batch.topic])
                .inc_by(expired.len() as u64);
        }
        let mut backoff = self.backoff();
        // Ends the readiness failure however this returns, a caught panic included.
        let mut failing: Option<Failing<'_>> = None;
        while !pending.is_empty() {
            let result = {
                let _slot = tokio::select! {
                    biased;
                    _ = self.cancelled(batch) => return Err(give_up("before writing")),
                    slot = async {
                        // The rate first, holding nothing: the slot (and the store's
                        // concurrency permits) only once the rows may go. Rows admitted and
                        // cancelled while they wait for the slot are given back.
                        let admitted = self.rate.admit(pending.len()).await;
                        let slot = slots.acquire(failing.is_some()).await;
                        admitted.sent();
                        slot
                    } => slot,
                };
                let started = Instant::now();
                // Cancellation interrupts a write in progress too: its rows may land anyway,
                // which a replay makes harmless.
                let result = tokio::select! {
                    biased;
                    _ = self.cancelled(batch) => return Err(give_up("while writing")),
                    result = self.write(&pending) => result,
                };
                self.metrics
                    .batch_write_duration
                    .observe(started.elapsed().as_secs_f64());
                result
            };
            let failure = match result {
                Ok(()) => {
                    RetryHold::succeeded(hold);
                    Failing::recovered(&mut failing);
                    self.metrics
                        .events_stored
                        .with_label_values(&[&batch.topic])
                        .inc_by(pending.len() as u64);
                    break;
                }
                Err(f) => f,
            };
            // A store names unwritten rows by their index in what it was sent; one outside it
            // would leave a row neither retried nor written. That breaks the store's contract:
            // the panic abandons the batch (caught above), so nothing is committed past it.
            assert!(
                failure.unwritten.iter().all(|&i| i < pending.len()),
                "the store reported unwritten rows outside the request"
            );
            let unwritten: Vec<&Event> = failure
                .unwritten
                .iter()
                .filter_map(|&i| pending.get(i).copied())
                .collect();
            // What this attempt did write is stored, whatever happens to the rest.
            self.metrics
                .events_stored
                .with_label_values(&[&batch.topic])
                .inc_by((pending.len() - unwritten.len()) as u64);
            if unwritten.is_empty() {
                // The store reports an error but names no row it left unwritten: every row
                // is durable, so the batch is done, with no retry, backoff or failure counted.
                RetryHold::succeeded(hold);
                Failing::recovered(&mut failing);
                break;
            }
            if failure.error.is_row_error() {
                // The database rejects these rows as such: retrying cannot help. They go to the
                // dead-letter path with the store's reason, the rest of the batch is done.
                warn!(topic = %batch.topic, partition = batch.partition, rows = unwritten.len(), error = %failure.error, "Store rejected rows; dead-lettering them.");
                // The store answered for every row: the write went through.
                Failing::recovered(&mut failing);
                dead.extend(
                    unwritten
                        .iter()
                        .map(|e| store_dead_letter(e, &failure.error)),
                );
                break;
            }
            if failing.is_none() {
                failing = Some(Failing::began(&self.health));
            }
            self.metrics
                .store_retries
                .with_label_values(&[failure.error.kind()])
                .inc();
            let failed = FailedAttempt {
                transient: failure.error.is_retryable(),
                progressed: unwritten.len() < pending.len(),
            };
            self.may_retry(batch, hold, failed)?;
            let delay = backoff.next().unwrap_or(self.retry.max_backoff);
            if !failure.error.is_retryable() {
                error!(topic = %batch.topic, partition = batch.partition, first_offset = batch.first_offset, error = %failure.error, retry_in = ?delay, "Batch write failed with a non-transient error; the partition is stalled until it is fixed.");
            } else {
                warn!(topic = %batch.topic, partition = batch.partition, first_offset = batch.first_offset, unwritten = unwritten.len(), error = %failure.error, retry_in = ?delay, "Batch write failed, retrying.");
            }
            pending = unwritten;
            tokio::select! {
                biased;
                _ = self.cancelled(batch) => {
                    return Err(give_up(&failure.error.to_string()));
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
        drop(failing);
        self.observe_latency(batch);
        Ok(())
    }

    /// Applies the batch's erasure requests (after its events: an erasure covers every earlier
    /// message), each retried until it is durable; nothing after one is committed before.
    async fn erase_users(
        &self,
        batch: &Batch,
        slots: &Slots,
        hold: &mut Option<RetryHold>,
    ) -> Result<(), String> {
        for request in batch.erasures() {
            let s = &request.source;
            let through_ms = s.timestamp_ms.unwrap_or(0);
            let erasure = Erasure {
                user_id: request.user_id.clone(),
                through_ms,
                requested_by: format!("kafka:{}/{}/{}", s.topic, s.partition, s.offset),
                requested_at_ms: through_ms,
            };
            let mut backoff = self.backoff();
            let mut failing: Option<Failing<'_>> = None;
            loop {
                let result = {
                    let _slot = tokio::select! {
                        biased;
                        _ = self.cancelled(batch) => return Err(give_up("before erasing")),
                        slot = slots.acquire(failing.is_some()) => slot,
                    };
                    tokio::select! {
                        biased;
                        _ = self.cancelled(batch) => return Err(give_up("while erasing")),
                        result = self.store.erase(&erasure) => result,
                    }
                };
                let error = match result {
                    Ok(()) => {
                        RetryHold::succeeded(hold);
                        Failing::recovered(&mut failing);
                        self.metrics
                            .erasures
                            .with_label_values(&[&*batch.topic])
                            .inc();
                        break;
                    }
                    Err(e) => e,
                };
                failing.get_or_insert_with(|| Failing::began(&self.health));
                let delay = backoff.next().unwrap_or(self.retry.max_backoff);
                // An erasure is never skipped: a permanent error stalls the partition, loudly.
                error!(topic = %batch.topic, partition = batch.partition, offset = s.offset, error = %error, retry_in = ?delay, "Erasure failed; retrying (the partition waits for it).");
                self.metrics
                    .store_retries
                    .with_label_values(&["erase"])
                    .inc();
                let failed = FailedAttempt {
                    transient: error.is_retryable(),
                    progressed: false,
                };
                self.may_retry(batch, hold, failed)?;
                tokio::select! {
                    biased;
                    _ = self.cancelled(batch) => return Err(give_up(&error.to_string())),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        Ok(())
    }

    async fn write(&self, events: &[&Event]) -> Result<(), crate::store::WriteFailure> {
        if let Some(first) = events.first() {
            let (topic, offset) = (&first.source.topic, first.source.offset);
            if crate::failpoint::hit("persister::write", topic, Some(offset)) {
                return Err(crate::store::WriteFailure::all(
                    StoreError::Timeout("failpoint persister::write".into()),
                    events.len(),
                ));
            }
        }
        self.store.write(events).await
    }

    /// Kafka timestamp → durable, for every event of a batch whose writes are all done.
    fn observe_latency(&self, batch: &Batch) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let latency = self.metrics.end_to_end_latency.local();
        for ts in batch.events().filter_map(|e| e.source.timestamp_ms) {
            latency.observe(now_ms.saturating_sub(ts).max(0) as f64 / 1000.0);
        }
        latency.flush();
    }

    async fn handle_invalid(
        &self,
        batch: &Batch,
        letters: Vec<&DeadLetter>,
        slots: &Slots,
        hold: &mut Option<RetryHold>,
    ) -> Result<(), String> {
        // A message whose decoding panicked is not known to be invalid: a fault of vault's is
        // never skipped. Without a dead-letter topic the partition stops at it, as with `fail`.
        let undecodable = |d: &&DeadLetter| matches!(d.error, EventError::Undecodable(_));
        let (policy, letters) = match self.on_invalid {
            InvalidPolicy::Skip if letters.iter().any(undecodable) => (
                InvalidPolicy::Fail,
                letters.into_iter().filter(undecodable).collect(),
            ),
            policy => (policy, letters),
        };
        match policy {
            InvalidPolicy::Skip => {
                for d in letters {
                    warn!(topic = %batch.topic, partition = batch.partition, offset = d.source.offset, kind = d.error.kind(), error = %d.error, "Skipping invalid event (on_invalid = skip).");
                    self.metrics
                        .events_skipped
                        .with_label_values(&[&batch.topic, d.error.kind()])
                        .inc();
                }
                Ok(())
            }
            InvalidPolicy::Fail => {
                let d = letters[0];
                error!(topic = %batch.topic, partition = batch.partition, offset = d.source.offset, kind = d.error.kind(), error = %d.error, "Invalid event and on_invalid = fail: the partition stops here.");
                Err(format!(
                    "invalid event at offset {}: {}",
                    d.source.offset, d.error
                ))
            }
            InvalidPolicy::DeadLetter => self.dead_letter(batch, letters, slots, hold).await,
        }
    }

    /// Sends the letters until every one is acknowledged, each retry sending only those not
    /// acknowledged yet. A permanent refusal (see [`is_permanent`]) stalls the partition, which
    /// is never committed past a letter that is not durable: it is counted, logged as an error
    /// and makes the instance not ready at once, and the send is retried at the longest backoff
    /// until an operator fixes the topic.
    async fn dead_letter(
        &self,
        batch: &Batch,
        mut pending: Vec<&DeadLetter>,
        slots: &Slots,
        hold: &mut Option<RetryHold>,
    ) -> Result<(), String> {
        let mut backoff = self.backoff();
        // Ends the readiness refusal however this returns, a caught panic included.
        let mut refused: Option<Refused<'_>> = None;
        let mut retry = false;
        let result = loop {
            let sent = {
                let _slot = tokio::select! {
                    biased;
                    _ = self.cancelled(batch) => break Err("gave up dead-lettering: cancelled at its stop deadline".to_string()),
                    slot = slots.acquire(retry) => slot,
                };
                tokio::select! {
                    biased;
                    _ = self.cancelled(batch) => break Err("gave up dead-lettering: cancelled at its stop deadline".to_string()),
                    sent = self.dead_letters.send(&pending) => sent,
                }
            };
            let failure = match sent {
                Ok(()) => {
                    RetryHold::succeeded(hold);
                    self.count_dead_lettered(batch, &pending);
                    break Ok(());
                }
                Err(f) => f,
            };
            retry = true;
            let unsent: Vec<&DeadLetter> = failure
                .unsent
                .iter()
                .filter_map(|&i| pending.get(i).copied())
                .collect();
            let mut sent = vec![true; pending.len()];
            for &i in &failure.unsent {
                if let Some(s) = sent.get_mut(i) {
                    *s = false;
                }
            }
            let acknowledged: Vec<&DeadLetter> = pending
                .iter()
                .zip(&sent)
                .filter(|(_, &sent)| sent)
                .map(|(d, _)| *d)
                .collect();
            self.count_dead_lettered(batch, &acknowledged);
            pending = unsent;
            let permanent = failure.permanent;
            let delay = if permanent {
                self.retry.max_backoff
            } else {
                backoff.next().unwrap_or(self.retry.max_backoff)
            };
            if permanent {
                let code = failure
                    .error
                    .rdkafka_error_code()
                    .map_or_else(|| "unknown".to_owned(), |c| format!("{c:?}"));
                self.metrics
                    .dead_letters_refused
                    .with_label_values(&[&*batch.topic, code.as_str()])
                    .inc();
                if refused.is_none() {
                    refused = Some(Refused::began(&self.health, &failure.error.to_string()));
                }
                error!(topic = %batch.topic, partition = batch.partition, first_offset = pending.first().map(|d| d.source.offset), letters = pending.len(), error = %failure.error, retry_in = ?delay, "The dead-letter topic refuses letters for good; the partition is stalled until the topic is fixed.");
            } else {
                warn!(topic = %batch.topic, partition = batch.partition, letters = pending.len(), error = %failure.error, retry_in = ?delay, "Dead-letter produce failed, retrying the letters not acknowledged.");
            }
            self.metrics
                .dead_letter_send_failures
                .with_label_values(&[&*batch.topic])
                .inc();
            let failed = FailedAttempt {
                transient: !permanent,
                progressed: !acknowledged.is_empty(),
            };
            if let Err(reason) = self.may_retry(batch, hold, failed) {
                break Err(reason);
            }
            tokio::select! {
                biased;
                _ = self.cancelled(batch) => break Err(format!("gave up dead-lettering: cancelled at its stop deadline ({})", failure.error)),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        drop(refused);
        result
    }

    fn count_dead_lettered(&self, batch: &Batch, letters: &[&DeadLetter]) {
        for d in letters {
            self.metrics
                .events_dead_lettered
                .with_label_values(&[&batch.topic, d.error.kind()])
                .inc();
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.retry.initial_backoff)
            .with_max_delay(self.retry.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

fn give_up(last: &str) -> String {
    format!("gave up writing: cancelled at its stop deadline ({last})")
}

/// A batch whose writes are failing, counted by readiness until dropped.
struct Failing<'a> {
    health: &'a Health,
    /// Its write went through in the end (else it was abandoned).
    recovered: bool,
}

impl<'a> Failing<'a> {
    fn began(health: &'a Health) -> Self {
        health.failure_began();
        Failing {
            health,
            recovered: false,
        }
    }

    /// The failing batch's write went through, if it was failing.
    fn recovered(failing: &mut Option<Failing<'_>>) {
        if let Some(mut f) = failing.take() {
            f.recovered = true;
        }
    }
}

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        self.health.failure_ended(self.recovered);
    }
}

/// A batch whose dead letters are refused for good, counted by readiness until dropped.
struct Refused<'a>(&'a Health);

impl<'a> Refused<'a> {
    fn began(health: &'a Health, error: &str) -> Self {
        health.refusal_began(error);
        Refused(health)
    }
}

impl Drop for Refused<'_> {
    fn drop(&mut self) {
        self.0.refusal_ended();
    }
}

fn store_dead_letter(e: &Event, error: &StoreError) -> DeadLetter {
    DeadLetter {
        source: e.source.clone(),
        origin: None,
        key: e.key().map(<[u8]>::to_vec),
        value: Some(e.payload().to_vec()),
        error: EventError::Rejected(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{decode, Limits, Source};
    use crate::kafka::dead_letter::MemoryDeadLetters;
    use crate::pipeline::batch::{InFlightBudget, PartitionHealth};
    use crate::pipeline::flush::FlushReason;
    use crate::store::{MemoryStore, WriteFailure};

    fn source(partition: i32, offset: i64) -> Source {
        Source {
            topic: Arc::from("t"),
            partition,
            offset,
            timestamp_ms: None,
        }
    }

    fn event(partition: i32, offset: i64) -> Record {
        let v = r#"{"user_id":"u","event_type":"t","occurred_at":"2023-11-14T22:13:20Z"}"#;
        let e = decode(
            None,
            Some(v.as_bytes()),
            source(partition, offset),
            None,
            Limits::default(),
        )
        .expect("valid event");
        Record::Event(e)
    }

    fn invalid(offset: i64) -> Record {
        Record::Invalid(DeadLetter {
            source: source(0, offset),
            origin: None,
            key: None,
            value: Some(b"not json".to_vec()),
            error: EventError::Json("expected value".into()),
        })
    }

    fn batch(records: Vec<Record>) -> (Batch, tokio::sync::oneshot::Receiver<BatchOutcome>) {
        Batch::new(records, 0, 0, FlushReason::Size)
    }

    fn persister<S: Store>(
        store: S,
        letters: MemoryDeadLetters,
    ) -> Arc<Persister<S, MemoryDeadLetters>> {
        Arc::new(Persister {
            store,
            dead_letters: letters,
            on_invalid: InvalidPolicy::DeadLetter,
            retention: Retention::default(),
            retry: RetrySettings {
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(30),
            },
            rate: RowRate::unlimited(),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(Duration::from_secs(60))),
            cancel: CancellationToken::new(),
        })
    }

    use crate::pipeline::batch::Record;

    /// Writes of partitions 0 and 1 time out after 5 s, for ever; partition 2's succeed.
    #[derive(Clone)]
    struct TwoStuckPartitions(MemoryStore);

    impl Store for TwoStuckPartitions {
        async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
            if events.iter().any(|e| e.source.partition < 2) {
                tokio::time::sleep(Duration::from_secs(5)).await;
                return Err(WriteFailure::all(
                    StoreError::Timeout("stuck".into()),
                    events.len(),
                ));
            }
            self.0.write(events).await
        }
    }

    /// Fails every write with a timeout that names no unwritten row: what it was sent is
    /// stored.
    #[derive(Clone)]
    struct FailsHavingWrittenAll(MemoryStore);

    impl Store for FailsHavingWrittenAll {
        async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
            self.0.write(events).await?;
            Err(WriteFailure {
                error: StoreError::Timeout("after the last row".into()),
                unwritten: Vec::new(),
            })
        }
    }

    /// Writes to a memory store, noting the name of the thread each write ran on.
    #[derive(Clone)]
    struct NotesThreads(MemoryStore, Arc<std::sync::Mutex<Vec<String>>>);

    impl Store for NotesThreads {
        async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
            let thread = std::thread::current().name().unwrap_or_default().to_owned();
            self.1.lock().unwrap().push(thread);
            self.0.write(events).await
        }
    }

    #[tokio::test]
    async fn a_pool_given_the_store_runtime_writes_on_its_threads() {
        let store_runtime = crate::store::runtime::StoreRuntime::new(2).unwrap();
        for runtime in [Some(store_runtime.handle()), None] {
            let (memory, threads) = (MemoryStore::new(), Arc::default());
            let p = persister(
                NotesThreads(memory.clone(), Arc::clone(&threads)),
                MemoryDeadLetters::default(),
            );
            let (tx, rx) = async_channel::bounded(4);
            let mut pool = p.clone().spawn_pool(4, rx, runtime);
            let mut acks = Vec::new();
            for partition in 0..4 {
                let (b, ack) = batch(vec![event(partition, 0), event(partition, 1)]);
                tx.send(b).await.unwrap();
                acks.push(ack);
            }
            for ack in acks {
                assert_eq!(ack.await.unwrap(), BatchOutcome::Durable);
            }
            drop(tx);
            while pool.join_next().await.is_some() {}
            for partition in 0..4 {
                assert!(memory.contains_source("t", partition, 1));
            }
            let threads = threads.lock().unwrap().clone();
            assert_eq!(threads.len(), 4);
            let on_store = threads.iter().filter(|t| *t == "vault-store").count();
            match runtime {
                Some(_) => assert_eq!(on_store, 4, "{threads:?}"),
                None => assert_eq!(on_store, 0, "{threads:?}"),
            }
        }
        // Dropped in async code: shut down without waiting, no panic.
        drop(store_runtime);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_that_names_no_unwritten_row_is_a_durable_batch_without_a_retry() {
        let memory = MemoryStore::new();
        let p = persister(
            FailsHavingWrittenAll(memory.clone()),
            MemoryDeadLetters::default(),
        );
        let (tx, rx) = async_channel::bounded(1);
        let _pool = p.clone().spawn_pool(1, rx, None);
        let t0 = tokio::time::Instant::now();
        let (b, ack) = batch(vec![event(0, 0), event(0, 1)]);
        tx.send(b).await.unwrap();
        assert_eq!(ack.await.unwrap(), BatchOutcome::Durable);
        assert!(memory.contains_source("t", 0, 0) && memory.contains_source("t", 0, 1));
        // No backoff slept, no retry counted.
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let retries = p
            .metrics
            .store_retries
            .with_label_values(&["timeout"])
            .get();
        assert_eq!(retries, 0);
        let stored = p.metrics.events_stored.with_label_values(&["t"]).get();
        assert_eq!(stored, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_partition_commits_while_two_others_fail_for_minutes() {
        let memory = MemoryStore::new();
        let p = persister(
            TwoStuckPartitions(memory.clone()),
            MemoryDeadLetters::default(),
        );
        let (tx, rx) = async_channel::bounded(2);
        let mut pool = p.clone().spawn_pool(2, rx, None);
        // Both partitions fill their in-flight window with batches that never succeed.
        let mut stuck = Vec::new();
        for partition in 0..2 {
            for offset in 0..4 {
                let (b, ack) = batch(vec![event(partition, offset)]);
                tx.send(b).await.unwrap();
                stuck.push(ack);
            }
        }
        tokio::time::sleep(Duration::from_secs(120)).await;
        let t0 = tokio::time::Instant::now();
        let (b, ack) = batch(vec![event(2, 0)]);
        tx.send(b).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(60), ack)
            .await
            .expect("the healthy partition is not held up by the failing ones");
        assert_eq!(outcome.unwrap(), BatchOutcome::Durable);
        assert!(
            t0.elapsed() <= Duration::from_secs(10),
            "{:?}",
            t0.elapsed()
        );
        assert!(memory.contains_source("t", 2, 0));
        assert!(
            stuck.iter_mut().all(|a| a.try_recv().is_err()),
            "still retrying"
        );
        // Shutdown abandons the stuck batches.
        p.cancel.cancel();
        drop(tx);
        while pool.join_next().await.is_some() {}
        for a in stuck {
            assert!(matches!(a.await.unwrap(), BatchOutcome::Abandoned(_)));
        }
    }

    /// A batch of partition `partition`'s events at `offsets`, holding `bytes` of `budget` as a
    /// batch of that partition (health `health`) does.
    fn batch_in_budget(
        budget: &InFlightBudget,
        health: &PartitionHealth,
        partition: i32,
        bytes: usize,
    ) -> (Batch, tokio::sync::oneshot::Receiver<BatchOutcome>) {
        let mut share = budget.share(health);
        assert!(budget.try_add(&mut share, bytes), "room for the batch");
        let (mut b, ack) = batch(vec![event(partition, 0)]);
        b.hold(share);
        (b, ack)
    }

    /// Under memory pressure, with failing batches holding their whole half of the budget, a
    /// batch whose first write is shed (`Overloaded`) retries and is durable: one shed request
    /// costs a backoff, not its partition's replay. A batch that keeps failing is what gives
    /// memory back.
    #[tokio::test(start_paused = true)]
    async fn under_pressure_a_batch_shed_once_retries_and_one_that_keeps_failing_gives_way() {
        let store = MemoryStore::new();
        // Partition 0's writes always fail; partition 1's first write fails, once.
        store.fail_when(
            |e| e.source.partition == 0,
            None,
            StoreError::Overloaded("shed".into()),
        );
        store.fail_when(
            |e| e.source.partition == 1,
            Some(1),
            StoreError::Overloaded("shed".into()),
        );
        let p = persister(store.clone(), MemoryDeadLetters::default());
        let budget = InFlightBudget::new(1000);
        let (stuck, _stuck_ack) = batch_in_budget(&budget, &PartitionHealth::default(), 0, 500);
        let writing = tokio::spawn({
            let p = p.clone();
            async move { p.persist(&stuck).await }
        });
        // The stuck batch fails twice (its free retry, then judged): it claims the half.
        while store.failed_requests() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (shed, ack) = batch_in_budget(&budget, &PartitionHealth::default(), 1, 300);
        // A healthy partition waits for room.
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move {
                let mut share = budget.share(&PartitionHealth::default());
                budget.add(&mut share, 1000).await;
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(budget.pressing(), 1, "a healthy partition presses");
        let outcome = p.persist(&shed).await;
        assert_eq!(
            outcome,
            BatchOutcome::Durable,
            "shed once, retried, durable"
        );
        assert!(store.contains_source("t", 1, 0));
        assert_eq!(
            p.metrics
                .retries_out_of_memory
                .with_label_values(&["t"])
                .get(),
            0
        );
        drop((shed, ack));
        // The stuck batch is abandoned at a failure once its claim's turn is over.
        let stuck_outcome = writing.await.unwrap();
        assert!(
            matches!(stuck_outcome, BatchOutcome::Abandoned(ref why) if why.contains("in-flight")),
            "{stuck_outcome:?}"
        );
        assert_eq!(
            p.metrics
                .retries_out_of_memory
                .with_label_values(&["t"])
                .get(),
            1
        );
        waiter.await.unwrap();
    }

    #[test]
    fn batches_that_fail_together_do_not_retry_together() {
        let p = persister(MemoryStore::new(), MemoryDeadLetters::default());
        let first: Vec<Vec<Duration>> = (0..8).map(|_| p.backoff().take(4).collect()).collect();
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(
            distinct.len() > 1,
            "every backoff drew the same jitter: {first:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_batch_stops_retrying_at_once() {
        let store = MemoryStore::new();
        store.fail_when(|_| true, None, StoreError::Overloaded("busy".into()));
        let p = persister(store, MemoryDeadLetters::default());
        let (b, _ack) = batch(vec![event(0, 0)]);
        let cancel = b.cancel.clone();
        let writing = tokio::spawn(async move { p.persist(&b).await });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!writing.is_finished(), "retries for as long as it takes");
        let t0 = tokio::time::Instant::now();
        cancel.cancel();
        let outcome = writing.await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(matches!(outcome, BatchOutcome::Abandoned(r) if r.contains("stop deadline")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_batch_sends_only_the_letters_not_yet_acknowledged() {
        let letters = MemoryDeadLetters::default();
        letters.fail_after_first(2);
        let p = persister(MemoryStore::new(), letters.clone());
        let (b, _ack) = batch(vec![invalid(0), event(0, 1), invalid(2), invalid(3)]);
        assert_eq!(p.persist(&b).await, BatchOutcome::Durable);
        let offsets: Vec<i64> = letters.letters().iter().map(|d| d.source.offset).collect();
        assert_eq!(offsets, [0, 2, 3], "each letter once, in order");
        let counted = p
            .metrics
            .events_dead_lettered
            .with_label_values(&["t", "bad_json"])
            .get();
        assert_eq!(counted, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanently_refused_letter_stalls_the_partition_visibly_until_fixed() {
        let letters = MemoryDeadLetters::default();
        letters.refuse_offset(5);
        let p = persister(MemoryStore::new(), letters.clone());
        p.health.set_in_group(true);
        let (b, _ack) = batch(vec![invalid(4), invalid(5)]);
        let writing = tokio::spawn({
            let p = p.clone();
            async move { p.persist(&b).await }
        });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(
            !writing.is_finished(),
            "never past a letter that is not durable"
        );
        let why = p.health.not_ready_reason().expect("not ready at once");
        assert!(why.contains("dead-letter topic refuses"), "{why}");
        let refused = p
            .metrics
            .dead_letters_refused
            .with_label_values(&["t", "MessageSizeTooLarge"])
            .get();
        assert!(refused >= 2, "{refused}");
        letters.accept_all();
        assert_eq!(writing.await.unwrap(), BatchOutcome::Durable);
        assert_eq!(p.health.not_ready_reason(), None);
        let offsets: Vec<i64> = letters.letters().iter().map(|d| d.source.offset).collect();
        assert_eq!(offsets, [4, 5], "the acknowledged letter is not sent again");
    }

    /// `events` rows of partition `partition` from offset `from`, as one batch.
    fn events_batch(
        partition: i32,
        from: i64,
        events: i64,
    ) -> (Batch, tokio::sync::oneshot::Receiver<BatchOutcome>) {
        batch((from..from + events).map(|o| event(partition, o)).collect())
    }

    fn limited(
        store: MemoryStore,
        rows_per_second: u64,
    ) -> Arc<Persister<MemoryStore, MemoryDeadLetters>> {
        let mut p = Arc::into_inner(persister(store, MemoryDeadLetters::default())).unwrap();
        p.rate = RowRate::new(rows_per_second);
        Arc::new(p)
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_every_persister_together_and_every_row_is_stored() {
        let memory = MemoryStore::new();
        let p = limited(memory.clone(), 100);
        let (tx, rx) = async_channel::bounded(64);
        let mut pool = p.clone().spawn_pool(8, rx, None);
        assert_eq!(p.metrics.write_rate_limit.get(), 100);
        let t0 = tokio::time::Instant::now();
        // 1,000 rows in 20 batches of 50 over 4 partitions, written by 8 persisters at once.
        let mut acks = Vec::new();
        for i in 0..20 {
            let (b, ack) = events_batch(i % 4, i64::from(i / 4) * 50, 50);
            tx.send(b).await.unwrap();
            acks.push(ack);
        }
        for ack in acks {
            assert_eq!(ack.await.unwrap(), BatchOutcome::Durable);
        }
        let took = t0.elapsed();
        // At 100 rows a second with a burst of 100: at least (1,000 - 100) / 100 seconds.
        assert!(
            took >= Duration::from_secs(9) && took <= Duration::from_millis(9_100),
            "{took:?}"
        );
        assert_eq!(memory.len(), 1000, "every row stored");
        for partition in 0..4 {
            for offset in 0..250 {
                assert!(memory.contains_source("t", partition, offset));
            }
        }
        let stored = p.metrics.events_stored.with_label_values(&["t"]).get();
        assert_eq!(stored, 1000);
        assert!(p.metrics.write_rate_limited_seconds.get() >= 9.0);
        drop(tx);
        while pool.join_next().await.is_some() {}
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waiting_for_the_rate_holds_no_write_slot() {
        let memory = MemoryStore::new();
        let letters = MemoryDeadLetters::default();
        let mut p = Arc::into_inner(persister(memory.clone(), letters.clone())).unwrap();
        p.rate = RowRate::new(10);
        let p = Arc::new(p);
        let (tx, rx) = async_channel::bounded(8);
        // One write slot.
        let mut pool = p.clone().spawn_pool(1, rx, None);
        let t0 = tokio::time::Instant::now();
        let (first, first_ack) = events_batch(0, 0, 10);
        let (second, second_ack) = events_batch(0, 10, 10);
        let (letter, letter_ack) = batch(vec![invalid(20)]);
        tx.send(first).await.unwrap();
        assert_eq!(first_ack.await.unwrap(), BatchOutcome::Durable);
        tx.send(second).await.unwrap();
        tx.send(letter).await.unwrap();
        assert_eq!(letter_ack.await.unwrap(), BatchOutcome::Durable);
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the dead letter took the only slot while the rows waited for the rate"
        );
        assert_eq!(second_ack.await.unwrap(), BatchOutcome::Durable);
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        assert_eq!((memory.len(), letters.letters().len()), (20, 1));
        drop(tx);
        while pool.join_next().await.is_some() {}
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waiting_for_the_rate_is_abandoned_at_once_and_takes_none_of_it() {
        let memory = MemoryStore::new();
        let p = limited(memory.clone(), 10);
        let (first, _) = events_batch(0, 0, 10);
        assert_eq!(p.persist(&first).await, BatchOutcome::Durable);
        let (waiting, _) = events_batch(1, 0, 10);
        let cancel = waiting.cancel.clone();
        let writing = tokio::spawn({
            let p = p.clone();
            async move { p.persist(&waiting).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!writing.is_finished(), "waits a second for the rate");
        let t0 = tokio::time::Instant::now();
        cancel.cancel();
        let outcome = writing.await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(matches!(outcome, BatchOutcome::Abandoned(r) if r.contains("before writing")));
        assert!(!memory.contains_source("t", 1, 0), "nothing of it written");
        // Half a second refilled 5 rows, and the abandoned batch took none of them.
        let (next, _) = events_batch(2, 0, 5);
        assert_eq!(p.persist(&next).await, BatchOutcome::Durable);
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(memory.len(), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn rows_admitted_by_the_rate_and_abandoned_while_waiting_for_a_slot_are_given_back() {
        let memory = MemoryStore::new();
        let p = limited(memory.clone(), 10);
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire(false).await;
        // A second's worth of rows: admitted at once, then waiting for the only slot.
        let (waiting, _) = events_batch(0, 0, 10);
        let cancel = waiting.cancel.clone();
        let writing = tokio::spawn({
            let (p, slots) = (p.clone(), slots.clone());
            async move { p.persist_with(&waiting, &slots).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!writing.is_finished(), "waits for the slot");
        cancel.cancel();
        let outcome = writing.await.unwrap();
        assert!(matches!(outcome, BatchOutcome::Abandoned(r) if r.contains("before writing")));
        drop(held);
        // Its rows were never written, so they are given back: a second's worth goes at once
        // (0.9 s later without the give-back).
        let t0 = tokio::time::Instant::now();
        let (next, _) = events_batch(1, 0, 10);
        assert_eq!(p.persist(&next).await, BatchOutcome::Durable);
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(memory.len(), 10);
        assert!(
            !memory.contains_source("t", 0, 0),
            "nothing of the abandoned batch written"
        );
    }
}
