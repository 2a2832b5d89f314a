//! Where a partition resumes reading after a failure: the one owner of that decision.
//!
//! Invariant kept here: a restarted partition task starts at or below the first offset that is
//! not durable, so nothing its predecessor read and did not make durable is skipped. Each
//! incarnation of a partition task records, in its [`Progress`], where it was told to start, the
//! first offset it took off the queue (before decoding, so a record that panics the decoder
//! counts as read), and the committable offset its durable batches reached. [`Progress::resume_at`]
//! turns those into the restart position; when it knows none (the incarnation read nothing and
//! was not sought: its first item may have been a read error that skipped records),
//! [`without_progress`] gives the group's committed offset instead, never "where the queue
//! stands". The coordinator seeks there before the next incarnation starts, and does not start
//! it when the seek fails.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::kafka::offsets::SharedOffset;

/// Sentinel for "no offset read yet".
const NONE: i64 = -1;

/// What one incarnation of a partition task has read and made durable.
#[derive(Debug)]
pub struct Progress {
    /// Where this incarnation was sought to before it started (`None`: where the group's
    /// assignment left the fetch position, i.e. the committed offset or `auto.offset.reset`).
    start: Option<i64>,
    /// The first offset this incarnation took off its queue.
    first_read: AtomicI64,
    /// The committable offset: next to read after the last durable, in-order batch run.
    durable: SharedOffset,
}

impl Progress {
    pub fn new(start: Option<i64>) -> Self {
        Progress {
            start,
            first_read: AtomicI64::new(NONE),
            durable: SharedOffset::default(),
        }
    }

    /// Records that `offset` was taken off the queue; only the first call counts.
    pub fn note_read(&self, offset: i64) {
        let _ = self
            .first_read
            .compare_exchange(NONE, offset, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Publishes a new committable offset (monotonic).
    pub fn publish_durable(&self, next_to_read: i64) {
        self.durable.publish(next_to_read);
    }

    /// The offset that may be committed now: every record below it is durable. Before this
    /// incarnation made anything durable, where it was sought to: a restart starts at or below
    /// the first offset not durable, so every record below that is durable too, and a partition
    /// restarted with nothing new to read still commits (and counts as caught up) there.
    pub fn committable(&self) -> Option<i64> {
        self.durable.get().or(self.start)
    }

    fn first_read(&self) -> Option<i64> {
        let v = self.first_read.load(Ordering::Acquire);
        (v != NONE).then_some(v)
    }

    /// Where the next incarnation must start reading: after the last durable batch run; else at
    /// the first record this incarnation read; else where it was told to start. `None` means
    /// this incarnation read nothing and was not sought, so the fetch position is still where the
    /// assignment put it and no seek is needed.
    pub fn resume_at(&self) -> Option<i64> {
        self.durable
            .get()
            .or_else(|| self.first_read())
            .or(self.start)
    }
}

/// Where a partition resumes after a stray message (one of its records that reached the main
/// queue, and was taken off it there): where it must resume, and never after the stray. `None`
/// when no position is known: records before the stray may still sit unread in the partition's
/// queue, so the stray's offset is no lower bound; the restart then takes
/// [`without_progress`].
pub fn after_stray(resume_at: Option<i64>, stray: i64) -> Option<i64> {
    resume_at.map(|o| o.min(stray))
}

/// Where a partition resumes when no incarnation recorded a position: the group's committed
/// offset, else where `auto.offset.reset` starts a partition without one; never after
/// `ceiling`, a stray's offset (a record taken off the main queue, so never read by the
/// partition's task). With nothing committed, a stray and `latest`: from the beginning (a
/// replay), as the log's end would skip the stray and the stray itself may have unread records
/// below it. Without a stray, `latest` starts at the log's end: the limit DESIGN states.
pub fn without_progress(
    committed: Option<i64>,
    reset_earliest: bool,
    ceiling: Option<i64>,
) -> rdkafka::Offset {
    match committed {
        Some(o) => rdkafka::Offset::Offset(ceiling.map_or(o, |c| o.min(c))),
        None if reset_earliest || ceiling.is_some() => rdkafka::Offset::Beginning,
        None => rdkafka::Offset::End,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stray_never_lets_the_partition_resume_after_it() {
        assert_eq!(after_stray(Some(50), 80), Some(50));
        assert_eq!(
            after_stray(Some(90), 80),
            Some(80),
            "the stray was read and not batched"
        );
        assert_eq!(
            after_stray(None, 80),
            None,
            "records before the stray may be unread: the committed offset rules"
        );
    }

    #[test]
    fn with_no_position_known_the_committed_offset_rules() {
        assert_eq!(
            without_progress(Some(40), true, None),
            rdkafka::Offset::Offset(40)
        );
        assert_eq!(
            without_progress(None, true, None),
            rdkafka::Offset::Beginning
        );
        assert_eq!(without_progress(None, false, None), rdkafka::Offset::End);
    }

    #[test]
    fn a_stray_caps_where_a_partition_without_progress_resumes() {
        assert_eq!(
            without_progress(Some(40), false, Some(30)),
            rdkafka::Offset::Offset(30)
        );
        assert_eq!(
            without_progress(Some(40), true, Some(50)),
            rdkafka::Offset::Offset(40)
        );
        assert_eq!(
            without_progress(None, true, Some(30)),
            rdkafka::Offset::Beginning,
            "from the start is below any stray"
        );
        assert_eq!(
            without_progress(None, false, Some(30)),
            rdkafka::Offset::Beginning,
            "the log's end would skip the stray, and the stray records below it"
        );
    }

    #[test]
    fn a_task_that_made_nothing_durable_resumes_at_the_first_record_it_read() {
        let p = Progress::new(None);
        assert_eq!(p.resume_at(), None, "read nothing: no seek");
        assert_eq!(p.committable(), None, "nothing durable yet");
        p.note_read(40);
        p.note_read(41);
        assert_eq!(p.resume_at(), Some(40));
        p.publish_durable(42);
        assert_eq!(p.resume_at(), Some(42));
    }

    #[test]
    fn a_restarted_task_that_read_nothing_resumes_where_it_was_sent() {
        let p = Progress::new(Some(120));
        assert_eq!(p.resume_at(), Some(120));
        assert_eq!(
            p.committable(),
            Some(120),
            "everything below where a restart starts is durable"
        );
        p.note_read(120);
        assert_eq!(p.resume_at(), Some(120));
        p.publish_durable(130);
        assert_eq!(p.resume_at(), Some(130));
    }
}
