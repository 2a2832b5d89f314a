//! The flush decision: when a partition's open batch must be handed to the persisters.
//!
//! One pure type owns the rule so that the batcher, its tests and the docs agree: a batch is
//! flushed when it holds `max_events` events, when it holds `max_bytes` bytes (an event that would
//! push it past the limit goes into the next batch), when the partition's writer is idle (no
//! batch of it in flight: Nagle-style, so at low load an event waits for about one write, not
//! for `linger`, and under load batches grow while writes are in flight), or when its oldest
//! event has waited `linger`, the upper bound while the partition's in-flight window has room
//! (full, the batch waits for an acknowledgement). Revoke and shutdown flush whatever is open. Every
//! flush carries its [`FlushReason`].

use std::time::Duration;

use tokio::time::Instant;

/// Why a batch was flushed. The label values are part of the metrics contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushReason {
    /// The batch reached `max_events`.
    Size,
    /// The batch reached `max_bytes`, or the next event would have pushed it past the limit.
    Bytes,
    /// The oldest event waited `linger`.
    Linger,
    /// The in-flight budget (`pipeline.max_in_flight_bytes`) is spent: the partition hands over
    /// what it holds and waits for room.
    Budget,
    /// The partition is being revoked from this consumer.
    Revoke,
    /// The process is shutting down.
    Shutdown,
    /// An erasure request: it goes out alone, after every earlier batch is durable.
    Erase,
    /// The partition had no batch in flight: what is open goes at once (`batch.flush_when_idle`).
    Idle,
}

impl FlushReason {
    pub const ALL: [FlushReason; 8] = [
        FlushReason::Size,
        FlushReason::Bytes,
        FlushReason::Linger,
        FlushReason::Budget,
        FlushReason::Revoke,
        FlushReason::Shutdown,
        FlushReason::Erase,
        FlushReason::Idle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Bytes => "bytes",
            FlushReason::Linger => "linger",
            FlushReason::Budget => "budget",
            FlushReason::Revoke => "revoke",
            FlushReason::Shutdown => "shutdown",
            FlushReason::Erase => "erase",
            FlushReason::Idle => "idle",
        }
    }
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushPolicy {
    pub max_events: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    /// Flush as soon as the partition has no batch in flight (else only by size, bytes, linger).
    pub when_idle: bool,
}

impl FlushPolicy {
    /// Before adding a record of `incoming` bytes to a batch of `events` records and `bytes` bytes:
    /// must the open batch be flushed first so that it stays within `max_bytes`?
    pub fn before_push(&self, events: usize, bytes: usize, incoming: usize) -> Option<FlushReason> {
        (events > 0 && bytes.saturating_add(incoming) > self.max_bytes)
            .then_some(FlushReason::Bytes)
    }

    /// After adding a record: is the batch full?
    pub fn after_push(&self, events: usize, bytes: usize) -> Option<FlushReason> {
        if events >= self.max_events {
            Some(FlushReason::Size)
        } else if bytes >= self.max_bytes {
            Some(FlushReason::Bytes)
        } else {
            None
        }
    }

    /// Once the records at hand are in the open batch of `events` records, with `in_flight`
    /// batches of the partition being written: flush now because the writer is idle?
    pub fn idle(&self, events: usize, in_flight: usize) -> Option<FlushReason> {
        (self.when_idle && events > 0 && in_flight == 0).then_some(FlushReason::Idle)
    }

    /// When a batch opened at `opened` (its first record's arrival) must be flushed regardless.
    pub fn deadline(&self, opened: Instant) -> Instant {
        opened + self.linger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FlushPolicy {
        FlushPolicy {
            max_events: 3,
            max_bytes: 100,
            linger: Duration::from_millis(250),
            when_idle: true,
        }
    }

    #[test]
    fn an_idle_writer_takes_what_is_open_at_once() {
        let p = policy();
        assert_eq!(p.idle(1, 0), Some(FlushReason::Idle));
        assert_eq!(
            p.idle(2, 1),
            None,
            "a write in flight: the batch grows meanwhile"
        );
        assert_eq!(p.idle(0, 0), None, "nothing open");
        let fixed = FlushPolicy {
            when_idle: false,
            ..p
        };
        assert_eq!(fixed.idle(1, 0), None, "fixed linger");
    }

    #[test]
    fn full_by_count() {
        let p = policy();
        assert_eq!(p.after_push(2, 20), None);
        assert_eq!(p.after_push(3, 30), Some(FlushReason::Size));
    }

    #[test]
    fn full_by_bytes() {
        let p = policy();
        assert_eq!(p.after_push(1, 99), None);
        assert_eq!(p.after_push(1, 100), Some(FlushReason::Bytes));
        // Count wins when both limits are hit at once.
        assert_eq!(p.after_push(3, 100), Some(FlushReason::Size));
    }

    #[test]
    fn an_event_that_would_overflow_goes_to_the_next_batch() {
        let p = policy();
        assert_eq!(p.before_push(1, 60, 41), Some(FlushReason::Bytes));
        assert_eq!(p.before_push(1, 60, 40), None);
        // An oversized event alone is never held back: it becomes a batch of its own.
        assert_eq!(p.before_push(0, 0, 500), None);
        assert_eq!(p.after_push(1, 500), Some(FlushReason::Bytes));
    }

    #[test]
    fn deadline_is_linger_after_the_first_event() {
        let p = policy();
        let t0 = Instant::now();
        assert_eq!(p.deadline(t0) - t0, Duration::from_millis(250));
    }

    #[test]
    fn reason_labels_are_stable() {
        let labels: Vec<_> = FlushReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            ["size", "bytes", "linger", "budget", "revoke", "shutdown", "erase", "idle"]
        );
    }
}
