//! Row versions: the write timestamp of every cell vault writes, a pure function of the Kafka
//! record, so that replays, retries and rebalances commute.
//!
//! Invariant kept here: the same message always writes the same cells with the same timestamp,
//! and within a partition a later offset gets a greater timestamp than an earlier one whenever
//! the Kafka timestamps do not go backwards. The formula, in microseconds (the unit of CQL write
//! timestamps, so `WRITETIME()` reads as a time):
//!
//! ```text
//! write_timestamp = kafka_timestamp_ms * 1000 + offset mod 1000
//! ```
//!
//! The Kafka timestamp orders messages across milliseconds; the offset breaks ties inside one.
//! Limits, stated in docs/DESIGN.md: a CreateTime that goes backwards (or producers whose clocks
//! disagree) orders by the producers' clocks, not by offset; and two messages of one row in the
//! same millisecond are ordered by offset only while their offsets lie in the same block of
//! 1000 (`offset div 1000`), since only 1000 microseconds fit in a millisecond.

use crate::event::Event;

/// Microseconds per millisecond: the tie-breaking slots of one millisecond.
const SLOTS: i64 = 1000;

/// The write timestamp (microseconds) of a message with this Kafka timestamp and offset.
pub fn write_timestamp(kafka_timestamp_ms: i64, offset: i64) -> i64 {
    kafka_timestamp_ms
        .saturating_mul(SLOTS)
        .saturating_add(offset.rem_euclid(SLOTS))
}

/// The Kafka timestamp an event's version is made from: the message's, or, for a message that
/// carries none, its `occurred_at` (also fixed by the message).
pub fn kafka_timestamp_ms(e: &Event) -> i64 {
    e.source
        .timestamp_ms
        .filter(|t| *t >= 0)
        .unwrap_or(e.occurred_at_ms)
}

/// The write timestamp of every cell of `e`'s row.
pub fn of(e: &Event) -> i64 {
    write_timestamp(kafka_timestamp_ms(e), e.source.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_764_000_000_000;

    #[test]
    fn the_same_message_always_gets_the_same_version() {
        assert_eq!(write_timestamp(MS, 12_345), write_timestamp(MS, 12_345));
        assert_eq!(write_timestamp(MS, 12_345), MS * 1000 + 345);
    }

    #[test]
    fn a_later_offset_in_the_same_millisecond_wins() {
        assert!(write_timestamp(MS, 101) > write_timestamp(MS, 100));
        assert!(write_timestamp(MS, 999) > write_timestamp(MS, 0));
    }

    #[test]
    fn a_later_millisecond_wins_whatever_the_offsets() {
        assert!(write_timestamp(MS + 1, 1000) > write_timestamp(MS, 999));
        assert!(write_timestamp(MS + 1, 0) > write_timestamp(MS, 998_999));
    }

    #[test]
    fn the_version_reads_as_the_kafka_time_in_microseconds() {
        let v = write_timestamp(MS, 7);
        assert_eq!(v / 1000, MS);
    }
}
