//! `vault query`: a user's activity over a time range, newest first, read through the store's
//! read path (the `(user_id, day)` partitions of the user's index of days in the range).
//!
//! Stored content never drives the operator's terminal: the table escapes control and
//! bidirectional-override characters, the JSON lines escape the control characters JSON leaves
//! raw. The range is first cut to the days an event can be stored on, then bounded to
//! [`MAX_DAYS`].

use std::borrow::Cow;
use std::fmt::Write as _;

use std::sync::Arc;

use scylla::client::session::Session;

use crate::config::ScyllaConfig;
use crate::store::read::{EventReader, PageRequest};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActivityRow {
    pub occurred_at: String,
    pub event_type: String,
    pub event_id: uuid::Uuid,
    pub attributes: Option<String>,
    pub source: String,
}

/// Up to `limit` events of `user` with `from_ms <= occurred_at <= to_ms`, newest first, read
/// through the store's read path ([`crate::store::read`], the one owner of how rows are read).
pub async fn user_activity(
    session: &Arc<Session>,
    c: &ScyllaConfig,
    user: &str,
    from_ms: i64,
    to_ms: i64,
    limit: usize,
) -> Result<Vec<ActivityRow>, String> {
    let reader = EventReader::new(session.clone(), &c.keyspace)
        .await
        .map_err(|e| format!("cannot prepare the query: {e}"))?;
    let page = reader
        .page(&PageRequest {
            user_id: user,
            from_ms,
            to_ms,
            event_types: &[],
            limit,
            after: None,
            // The whole of --limit, in one read: an operator's tool, not a shared server.
            max_examined: usize::MAX,
            max_bytes: usize::MAX,
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(page
        .events
        .into_iter()
        .map(|e| ActivityRow {
            occurred_at: chrono::DateTime::from_timestamp_millis(e.occurred_at_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| e.occurred_at_ms.to_string()),
            event_type: e.event_type,
            event_id: e.event_id,
            attributes: e.attributes,
            source: format!(
                "{}/{}@{}",
                e.source_topic, e.source_partition, e.source_offset
            ),
        })
        .collect())
}

/// Renders rows as an aligned text table, every stored text passed through [`escape`].
pub fn table(rows: &[ActivityRow]) -> String {
    let mut out = format!(
        "{:<24}  {:<12}  {:<36}  {:<22}  {}\n",
        "occurred_at", "event_type", "event_id", "source", "attributes"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<24}  {:<12}  {:<36}  {:<22}  {}\n",
            escape(&r.occurred_at),
            escape(&r.event_type),
            r.event_id,
            escape(&r.source),
            escape(r.attributes.as_deref().unwrap_or(""))
        ));
    }
    out
}

/// A row as one JSON line. serde_json escapes U+0000 to U+001F; DEL, the C1 controls (among
/// them the one-byte CSI) and the bidirectional overrides it writes raw, so they are escaped
/// here too: they occur only inside strings, and `\uXXXX` reads back as the same string.
pub fn json_line(row: &ActivityRow) -> String {
    let json = serde_json::to_string(row).expect("a row of strings and a UUID serializes");
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_unsafe(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a character could act on a terminal instead of being shown: C0 and C1 controls and
/// DEL (escape sequences, bells, carriage returns), and the bidirectional overrides and isolates
/// that reorder what is shown.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text safe to print on a terminal: each control or bidirectional-override character is shown
/// as its escape (`\x1b` as `\u{1b}`), and a backslash as `\\` so that the escapes stay
/// unambiguous. Text without them is returned as it is.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if is_unsafe(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The most days one query may span: one request is sent per day.
pub const MAX_DAYS: i64 = 366;

const DAY_MS: i64 = 86_400_000;

/// The part of `[from_ms, to_ms]` where a stored event can be, and an error when that still
/// spans more than [`MAX_DAYS`] days. An event's `occurred_at` is at least 2000-01-01 and at
/// most 24 h after its Kafka timestamp, itself at most 24 h ahead of the clock
/// ([`crate::event`]). No retention cuts it: a type's retention may be longer than
/// `scylla.default_ttl`, and a row kept by that TTL lives for it from its write, whenever it
/// happened.
pub fn bounded_range(from_ms: i64, to_ms: i64, now_ms: i64) -> Result<(i64, i64), String> {
    use crate::event::{MAX_FUTURE_SKEW_MS, MIN_OCCURRED_AT_MS};
    if from_ms > to_ms {
        return Err("--since is after --until: give a start before the end".into());
    }
    let earliest = MIN_OCCURRED_AT_MS;
    let latest = now_ms.saturating_add(2 * MAX_FUTURE_SKEW_MS);
    let from = from_ms.max(earliest);
    let to = to_ms.min(latest);
    if from > to {
        // Nothing can be stored in the range: an empty one, read in no request.
        return Ok((from, from - 1));
    }
    let days = to.div_euclid(DAY_MS) - from.div_euclid(DAY_MS) + 1;
    if days > MAX_DAYS {
        return Err(format!(
            "the range spans {days} days, and a query reads one day per request: at most \
             {MAX_DAYS} days at once (narrow it with --since and --until)"
        ));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_type: &str, attributes: &str) -> ActivityRow {
        ActivityRow {
            occurred_at: "2025-11-24T10:00:00.000Z".into(),
            event_type: event_type.into(),
            event_id: uuid::Uuid::nil(),
            attributes: Some(attributes.into()),
            source: "t/0@1".into(),
        }
    }

    #[test]
    fn stored_text_cannot_drive_the_terminal() {
        let hostile = row(
            "click\u{1b}[2J\u{1b}]0;owned\u{7}\r\u{9b}31m",
            "{\"p\":\"\u{202e}txt.exe\\\\\u{0}\"}",
        );
        let out = table(std::slice::from_ref(&hostile));
        assert!(!out.chars().any(|c| c != '\n' && is_unsafe(c)), "{out:?}");
        assert!(
            out.contains("click\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\u{d}\\u{9b}31m"),
            "{out}"
        );
        assert!(out.contains("\\u{202e}txt.exe\\\\\\\\\\u{0}"), "{out}");
        assert_eq!(out.lines().count(), 2, "one line per row: {out:?}");
        let json = json_line(&hostile);
        assert!(!json.chars().any(is_unsafe), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back["event_type"], hostile.event_type,
            "the JSON reads back the same"
        );
        assert_eq!(
            escape("plain text, ünïcode"),
            Cow::Borrowed("plain text, ünïcode")
        );
    }

    #[test]
    fn the_day_range_is_cut_to_what_can_be_stored_and_bounded() {
        let now = 1_764_000_000_000; // 2025-11-24
        let until_9999 = 253_402_214_400_000;
        // --until 9999-12-31 with the default --since 1day: four days, not 2.9 million.
        let (from, to) = bounded_range(now - DAY_MS, until_9999, now).unwrap();
        assert_eq!((from, to), (now - DAY_MS, now + 2 * DAY_MS));
        let err = bounded_range(0, until_9999, now).unwrap_err();
        assert!(err.contains("at most 366 days"), "{err}");
        let first = crate::event::MIN_OCCURRED_AT_MS;
        let (from, _) = bounded_range(0, first + 10 * DAY_MS, now).unwrap();
        assert_eq!(from, first, "nothing before 2000-01-01");
        // No retention cuts it: a year-old event may still be stored.
        let (from, _) = bounded_range(now - 365 * DAY_MS, now, now).unwrap();
        assert_eq!(from, now - 365 * DAY_MS);
        assert!(bounded_range(now, now - 1, now).is_err());
        let (from, to) = bounded_range(now + 10 * DAY_MS, now + 20 * DAY_MS, now).unwrap();
        assert!(from > to, "an empty range reads no day");
        assert!(bounded_range(now - 365 * DAY_MS, now, now).is_ok());
        assert!(bounded_range(now - 366 * DAY_MS, now, now).is_err());
    }
}
