//! A batch: a contiguous run of one partition's messages, in offset order, plus how to acknowledge
//! it. Valid events go to the store; invalid ones travel in the same batch as dead letters so that
//! the batch's offset range is only acknowledged when both are durable.

use std::sync::Arc;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::event::{Event, EventError, Source};
use crate::pipeline::flush::FlushReason;

/// A message that failed decoding, with everything needed to dead-letter it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub error: EventError,
}

/// One decoded Kafka message.
#[derive(Debug, Clone)]
pub enum Record {
    Event(Event),
    Invalid(DeadLetter),
}

impl Record {
    pub fn source(&self) -> &Source {
        match self {
            Record::Event(e) => &e.source,
            Record::Invalid(d) => &d.source,
        }
    }

    /// Bytes the record counts against `max_bytes`: the size of the Kafka value.
    pub fn size(&self) -> usize {
        match self {
            Record::Event(e) => e.payload().len(),
            Record::Invalid(d) => d.value.as_ref().map_or(0, Vec::len),
        }
    }
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every event is in the store and every dead letter is acknowledged by Kafka.
    Durable,
    /// The batch was abandoned (shutdown or revoke deadline passed, or a permanent failure the
    /// policy does not allow to skip). Nothing at or after its first offset may be committed.
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
    pub events: Vec<Event>,
    pub dead_letters: Vec<DeadLetter>,
    pub bytes: usize,
    pub reason: FlushReason,
    ack: Option<oneshot::Sender<BatchOutcome>>,
    /// This batch's share of the in-flight budget, returned when the batch is dropped.
    budget: Option<OwnedSemaphorePermit>,
}

/// The process-wide bound on bytes of batches flushed and not yet acknowledged. A batch holds
/// its share from flush until the persister is done with it.
#[derive(Debug, Clone)]
pub struct InFlightBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

impl InFlightBudget {
    pub fn new(total_bytes: usize) -> Self {
        let total = total_bytes.clamp(1, Semaphore::MAX_PERMITS);
        InFlightBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits until `bytes` fit (a batch larger than the whole budget takes all of it).
    pub async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let want = bytes.clamp(1, self.total.min(u32::MAX as usize)) as u32;
        self.permits
            .clone()
            .acquire_many_owned(want)
            .await
            .expect("the in-flight budget is never closed")
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
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
        let mut events = Vec::with_capacity(records.len());
        let mut dead_letters = Vec::new();
        for r in records {
            match r {
                Record::Event(e) => events.push(e),
                Record::Invalid(d) => dead_letters.push(d),
            }
        }
        let (tx, rx) = oneshot::channel();
        let batch = Batch {
            topic,
            partition,
            seq,
            first_offset,
            last_offset,
            events,
            dead_letters,
            bytes,
            reason,
            ack: Some(tx),
            budget: None,
        };
        (batch, rx)
    }

    /// Attaches the batch's share of the in-flight budget, held until the batch is dropped.
    pub fn hold(&mut self, share: OwnedSemaphorePermit) {
        self.budget = Some(share);
    }

    pub fn len(&self) -> usize {
        self.events.len() + self.dead_letters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reports the outcome to the partition task. A batch dropped without an ack reads as
    /// abandoned on the other side, so a lost batch can never look durable.
    pub fn ack(mut self, outcome: BatchOutcome) {
        if let Some(tx) = self.ack.take() {
            // The partition task may be gone (revoked and aborted); then nobody needs the answer.
            let _ = tx.send(outcome);
        }
    }
}
