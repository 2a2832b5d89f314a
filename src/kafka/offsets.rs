//! Offset arithmetic: the one place that decides what a partition may commit.
//!
//! Invariant kept here: the committable offset of a partition is `last + 1` where `last` is the
//! last offset of a batch that is durable **and** every batch before it in the partition is
//! durable. A batch that completes early waits for its predecessors; a batch that fails stops
//! the partition's progress for good (the partition task is restarted from the last commit).
//! Kafka's committed offset is "the next offset to read", hence `+ 1`, in [`next_to_read`] only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};

/// The offset to commit once `last` is durable: Kafka commits the next offset to read.
pub fn next_to_read(last: i64) -> i64 {
    last + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Durable,
    Failed,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    last_offset: i64,
    state: State,
}

/// Per-partition, in-order acknowledgement of batches.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    pending: VecDeque<Pending>,
    committable: Option<i64>,
    failed: bool,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a batch handed to the persisters. Batches must be tracked in offset order.
    pub fn track(&mut self, seq: u64, last_offset: i64) {
        debug_assert!(self
            .pending
            .back()
            .is_none_or(|p| p.last_offset < last_offset && p.seq < seq));
        self.pending.push_back(Pending {
            seq,
            last_offset,
            state: State::InFlight,
        });
    }

    /// Marks a batch durable. Returns the new committable offset if it advanced.
    pub fn durable(&mut self, seq: u64) -> Option<i64> {
        self.set(seq, State::Durable);
        if self.failed {
            return None;
        }
        let mut advanced = None;
        while let Some(head) = self.pending.front() {
            match head.state {
                State::Durable => {
                    advanced = Some(next_to_read(head.last_offset));
                    self.pending.pop_front();
                }
                State::InFlight => break,
                State::Failed => unreachable!("a failed head sets the failed flag"),
            }
        }
        if advanced.is_some() {
            self.committable = advanced;
        }
        advanced
    }

    /// Marks a batch failed: nothing at or after it will ever become committable.
    pub fn failed(&mut self, seq: u64) {
        self.set(seq, State::Failed);
        self.failed = true;
    }

    /// Batches handed out and not yet durable (failed ones included).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The offset that may be committed now, if any batch has become durable.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    fn set(&mut self, seq: u64, state: State) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) {
            p.state = state;
        }
    }
}

/// Sentinel for "nothing committable yet" in [`SharedOffset`].
const NONE: i64 = -1;

/// A partition's committable offset, written by its task and read by the committer.
#[derive(Debug)]
pub struct SharedOffset(AtomicI64);

impl Default for SharedOffset {
    fn default() -> Self {
        SharedOffset(AtomicI64::new(NONE))
    }
}

impl SharedOffset {
    pub fn publish(&self, offset: i64) {
        self.0.fetch_max(offset, Ordering::AcqRel);
    }

    pub fn get(&self) -> Option<i64> {
        let v = self.0.load(Ordering::Acquire);
        (v != NONE).then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_value_is_the_next_offset_to_read() {
        let mut t = OffsetTracker::new();
        t.track(0, 9);
        assert_eq!(t.durable(0), Some(10));
        assert_eq!(t.committable(), Some(10));
    }

    #[test]
    fn a_later_batch_waits_for_every_earlier_one() {
        let mut t = OffsetTracker::new();
        t.track(0, 9);
        t.track(1, 19);
        t.track(2, 29);
        assert_eq!(t.durable(2), None);
        assert_eq!(t.durable(1), None);
        assert_eq!(t.committable(), None);
        assert_eq!(t.durable(0), Some(30));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_failed_batch_stops_progress_for_good() {
        let mut t = OffsetTracker::new();
        t.track(0, 9);
        t.track(1, 19);
        t.track(2, 29);
        assert_eq!(t.durable(0), Some(10));
        t.failed(1);
        assert_eq!(t.durable(2), None);
        assert_eq!(t.committable(), Some(10));
        assert!(t.is_failed());
    }

    #[test]
    fn offsets_need_not_be_contiguous() {
        // Compaction and transaction markers leave gaps; only batch ends matter.
        let mut t = OffsetTracker::new();
        t.track(0, 100);
        t.track(1, 250);
        assert_eq!(t.durable(0), Some(101));
        assert_eq!(t.durable(1), Some(251));
    }

    #[test]
    fn shared_offset_never_moves_backwards() {
        let s = SharedOffset::default();
        assert_eq!(s.get(), None);
        s.publish(10);
        s.publish(5);
        assert_eq!(s.get(), Some(10));
    }
}
