//! Retention per event type: the one owner of how long a row lives.
//!
//! Invariant kept here: a row expires at `occurred_at + retention` of its event type, whenever
//! it is written, so a replay never extends a row's life; an event already past its retention
//! when read is not written at all (the persister counts it in `vault_events_expired_total`).
//! The TTL sent with each write is what is left of the retention at that moment.

use std::collections::HashMap;
use std::time::Duration;

use crate::event::Event;

/// Longest TTL ScyllaDB and Cassandra accept: 20 years, in seconds.
pub const MAX_TTL_SECS: i64 = 630_720_000;

/// Retention by event type, with a default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// For event types not listed; `None`: `scylla.default_ttl` from each write (0: forever).
    pub default: Option<Duration>,
    pub by_type: HashMap<String, Duration>,
}

/// How long a write's cells live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// No retention applies: `scylla.default_ttl` from the write (0: forever).
    Table,
    /// The cells expire after this many seconds (at least 1).
    Seconds(i32),
    /// Past its retention already: not written.
    Expired,
}

impl Retention {
    /// The retention of an event type.
    pub fn of(&self, event_type: &str) -> Option<Duration> {
        self.by_type.get(event_type).copied().or(self.default)
    }

    /// When `e`'s row must be gone (milliseconds since the epoch), if a retention applies.
    pub fn expires_at_ms(&self, e: &Event) -> Option<i64> {
        let keep = self.of(e.event_type())?;
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        Some(e.occurred_at_ms.saturating_add(keep_ms))
    }

    /// The TTL of a write of `e` at `now_ms`.
    pub fn ttl(&self, e: &Event, now_ms: i64) -> Ttl {
        let Some(at) = self.expires_at_ms(e) else {
            return Ttl::Table;
        };
        let left_ms = at.saturating_sub(now_ms);
        if left_ms <= 0 {
            return Ttl::Expired;
        }
        // Rounded up: a row never expires before its time; capped at what the server takes.
        let secs = (left_ms.saturating_add(999) / 1000).clamp(1, MAX_TTL_SECS);
        Ttl::Seconds(secs as i32)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{decode, Limits, Source};

    fn event(event_type: &str, occurred_at: &str) -> Event {
        let v = format!(
            r#"{{"user_id":"u","event_type":"{event_type}","occurred_at":"{occurred_at}"}}"#
        );
        let source = Source {
            topic: Arc::from("t"),
            partition: 0,
            offset: 1,
            timestamp_ms: Some(1_764_000_000_000),
        };
        decode(None, Some(v.as_bytes()), source, None, Limits::default()).unwrap()
    }

    fn retention() -> Retention {
        Retention {
            default: Some(Duration::from_secs(90 * 86_400)),
            by_type: HashMap::from([("page_view".into(), Duration::from_secs(86_400))]),
        }
    }

    #[test]
    fn a_row_lives_until_occurred_at_plus_its_types_retention_whenever_written() {
        let r = retention();
        let e = event("page_view", "2025-11-24T10:00:00Z");
        let occurred = e.occurred_at_ms;
        assert_eq!(r.ttl(&e, occurred), Ttl::Seconds(86_400));
        // Written (or replayed) an hour later: an hour less, never a fresh day.
        assert_eq!(r.ttl(&e, occurred + 3_600_000), Ttl::Seconds(82_800));
        assert_eq!(r.ttl(&e, occurred + 86_400_000), Ttl::Expired);
        let other = event("purchase", "2025-11-24T10:00:00Z");
        assert_eq!(
            r.ttl(&other, occurred),
            Ttl::Seconds(90 * 86_400),
            "the default"
        );
    }

    #[test]
    fn without_a_retention_the_table_decides() {
        let e = event("page_view", "2025-11-24T10:00:00Z");
        assert_eq!(Retention::default().ttl(&e, e.occurred_at_ms), Ttl::Table);
    }

    #[test]
    fn a_ttl_is_rounded_up_and_capped() {
        let r = Retention {
            default: Some(Duration::from_secs(100 * 365 * 86_400)),
            by_type: HashMap::new(),
        };
        let e = event("x", "2025-11-24T10:00:00Z");
        assert_eq!(
            r.ttl(&e, e.occurred_at_ms),
            Ttl::Seconds(MAX_TTL_SECS as i32)
        );
        let r = Retention {
            default: Some(Duration::from_millis(1500)),
            by_type: HashMap::new(),
        };
        assert_eq!(r.ttl(&e, e.occurred_at_ms + 1), Ttl::Seconds(2));
    }
}
