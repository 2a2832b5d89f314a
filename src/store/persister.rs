//! Persisters: a pool of tasks that take flushed batches from a bounded channel, write their events
//! to the store and their invalid records to the dead-letter sink, and acknowledge each batch.
//!
//! Invariant kept here: a batch is acknowledged [`BatchOutcome::Durable`] only when every event is
//! written and every dead letter is acknowledged by Kafka. Transient failures are retried with
//! exponential backoff and jitter for as long as it takes (visible in logs, metrics and
//! readiness); only cancellation (shutdown or revoke deadline) abandons a batch, and an abandoned
//! batch is never committed past.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::config::{InvalidPolicy, RetrySettings};
use crate::event::{Event, EventError};
use crate::kafka::dead_letter::DeadLetterSink;
use crate::pipeline::batch::{Batch, BatchOutcome, DeadLetter};
use crate::store::{Store, StoreError};
use crate::telemetry::{Health, Metrics};

/// What every persister shares.
pub struct Persister<S, D> {
    pub store: S,
    pub dead_letters: D,
    pub on_invalid: InvalidPolicy,
    pub retry: RetrySettings,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Fired when the shutdown deadline passes: retry loops give up and abandon their batch.
    pub cancel: CancellationToken,
}

impl<S: Store, D: DeadLetterSink> Persister<S, D> {
    /// Starts `workers` tasks draining `batches` until the channel closes.
    pub fn spawn_pool(
        self: Arc<Self>,
        workers: usize,
        batches: async_channel::Receiver<Batch>,
    ) -> JoinSet<()> {
        let mut set = JoinSet::new();
        for _ in 0..workers {
            let this = self.clone();
            let rx = batches.clone();
            set.spawn(async move {
                while let Ok(batch) = rx.recv().await {
                    this.metrics.in_flight_batches.inc();
                    // A panic in the store or the sink abandons this batch (its partition
                    // restarts from the last durable offset); the worker itself carries on.
                    let outcome = AssertUnwindSafe(this.persist(&batch))
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
                    this.metrics.in_flight_batches.dec();
                    batch.ack(outcome);
                }
            });
        }
        set
    }

    /// Writes one batch to completion (or abandonment).
    pub async fn persist(&self, batch: &Batch) -> BatchOutcome {
        let mut dead: Vec<DeadLetter> = Vec::new();
        if let Err(reason) = self.write_events(batch, &mut dead).await {
            return BatchOutcome::Abandoned(reason);
        }
        let invalid = batch.dead_letters().chain(dead.iter());
        let letters: Vec<&DeadLetter> = invalid.collect();
        if !letters.is_empty() {
            if let Err(reason) = self.handle_invalid(batch, &letters).await {
                return BatchOutcome::Abandoned(reason);
            }
        }
        BatchOutcome::Durable
    }

    async fn write_events(&self, batch: &Batch, dead: &mut Vec<DeadLetter>) -> Result<(), String> {
        let mut pending: Vec<&Event> = batch.events().collect();
        let mut backoff = self.backoff();
        let mut failing = false;
        while !pending.is_empty() {
            let started = Instant::now();
            let result = self.store.write(&pending).await;
            self.metrics
                .batch_write_duration
                .observe(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(()) => {
                    self.metrics
                        .events_stored
                        .with_label_values(&[&batch.topic])
                        .inc_by(pending.len() as u64);
                    break;
                }
                Err(f) => f,
            };
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
            if failure.error.is_row_error() {
                // The database rejects these rows as such: retrying cannot help. They go to the
                // dead-letter path with the store's reason, the rest of the batch is done.
                warn!(topic = %batch.topic, partition = batch.partition, rows = unwritten.len(), error = %failure.error, "Store rejected rows; dead-lettering them.");
                dead.extend(
                    unwritten
                        .iter()
                        .map(|e| store_dead_letter(e, &failure.error)),
                );
                break;
            }
            if !failing {
                failing = true;
                self.health.failure_began();
            }
            self.metrics
                .store_retries
                .with_label_values(&[failure.error.kind()])
                .inc();
            let delay = backoff.next().unwrap_or(self.retry.max_backoff);
            let level_error = !failure.error.is_retryable();
            if level_error {
                error!(topic = %batch.topic, partition = batch.partition, first_offset = batch.first_offset, error = %failure.error, retry_in = ?delay, "Batch write failed with a non-transient error; the partition is stalled until it is fixed.");
            } else {
                warn!(topic = %batch.topic, partition = batch.partition, first_offset = batch.first_offset, unwritten = unwritten.len(), error = %failure.error, retry_in = ?delay, "Batch write failed, retrying.");
            }
            pending = unwritten;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    self.health.failure_ended();
                    return Err(format!("gave up retrying at shutdown: {}", failure.error));
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if failing {
            self.health.failure_ended();
        }
        self.observe_latency(batch);
        Ok(())
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

    async fn handle_invalid(&self, batch: &Batch, letters: &[&DeadLetter]) -> Result<(), String> {
        match self.on_invalid {
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
            InvalidPolicy::DeadLetter => {
                let mut backoff = self.backoff();
                loop {
                    match self.dead_letters.send(letters).await {
                        Ok(()) => {
                            for d in letters {
                                self.metrics
                                    .events_dead_lettered
                                    .with_label_values(&[&batch.topic, d.error.kind()])
                                    .inc();
                            }
                            return Ok(());
                        }
                        Err(e) => {
                            let delay = backoff.next().unwrap_or(self.retry.max_backoff);
                            warn!(topic = %batch.topic, partition = batch.partition, error = %e, retry_in = ?delay, "Dead-letter produce failed, retrying.");
                            self.metrics
                                .store_retries
                                .with_label_values(&["dead_letter"])
                                .inc();
                            tokio::select! {
                                biased;
                                _ = self.cancel.cancelled() => return Err(format!("gave up dead-lettering at shutdown: {e}")),
                                _ = tokio::time::sleep(delay) => {}
                            }
                        }
                    }
                }
            }
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

fn store_dead_letter(e: &Event, error: &StoreError) -> DeadLetter {
    DeadLetter {
        source: e.source.clone(),
        key: e.key().map(<[u8]>::to_vec),
        value: Some(e.payload().to_vec()),
        error: EventError::Rejected(error.to_string()),
    }
}
