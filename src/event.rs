//! The user-activity event: wire format, validation and identity.
//!
//! Owns one rule: an event's identity is stable across replays. When the producer sends no
//! `event_id`, it is derived (UUID v5) from the Kafka coordinates, so re-reading the same message
//! after a crash or rebalance rewrites the same row instead of adding one.
//!
//! Decoding never panics: every way a message can be wrong is an [`EventError`] naming the field,
//! and the caller routes it to the dead-letter path. A stored value is one that any JSON reader
//! can read back: nesting is bounded ([`Limits::max_depth`]), every number is within an f64's
//! range, and every `\uXXXX` escape stands for a character (no unpaired UTF-16 surrogates).
//! All are checked by one linear pass over
//! the bytes before the parser runs, so a hostile value costs a scan, never recursion.
//!
//! Error texts are bounded: an echo of the input is cut at [`ECHO_CHARS`] characters, and no
//! message is longer than a few hundred bytes, whatever the input.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::DateTime;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

/// Longest accepted `user_id`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest accepted `event_type`, in bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 128;
/// Earliest accepted `occurred_at`: 2000-01-01T00:00:00Z, in milliseconds since the epoch.
pub const MIN_OCCURRED_AT_MS: i64 = 946_684_800_000;
/// How far `occurred_at` may lie after the Kafka message timestamp, and the Kafka message
/// timestamp after this host's clock (clock skew allowance).
pub const MAX_FUTURE_SKEW_MS: i64 = 24 * 3600 * 1000;
/// Default of `pipeline.max_json_depth`.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;
/// Highest accepted `pipeline.max_json_depth`: serde_json's default parser refuses 128 levels.
pub const MAX_JSON_DEPTH_LIMIT: usize = 127;
/// Characters of the input an error message echoes, at most.
pub const ECHO_CHARS: usize = 64;
/// Characters of a free-form error text (a parser's or the store's) shown, at most.
const MESSAGE_CHARS: usize = 256;

/// Namespace of derived event ids (UUID v5 over `topic/partition/offset`).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f1c_0a7e_9b3d_4c21_8e6f_2a4b_7c9d_0e13);

/// What a Kafka value may be, beyond being a JSON object with the required fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value, in bytes (`pipeline.max_event_bytes`).
    pub max_bytes: usize,
    /// Deepest nesting of objects and arrays, the event object itself being level 1
    /// (`pipeline.max_json_depth`).
    pub max_depth: usize,
}

impl Default for Limits {
    /// The configuration's defaults.
    fn default() -> Self {
        Limits {
            max_bytes: 1024 * 1024,
            max_depth: DEFAULT_MAX_JSON_DEPTH,
        }
    }
}

/// The coordinates an event's derived id is made from: the message's own, or, for a dead letter
/// that `vault dlq replay` re-published, those of the message it was first read as (its
/// `vault.source.*` headers), so that the replay lands on the row the original would have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl<'a> Origin<'a> {
    pub fn of(source: &'a Source) -> Origin<'a> {
        Origin {
            topic: &source.topic,
            partition: source.partition,
            offset: source.offset,
        }
    }
}

/// Where a message came from. Cheap to clone: the topic name is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp (create or log-append time), milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

/// A validated event, ready to be stored.
///
/// The Kafka value is copied once, into `payload`; the text fields are ranges of it (an owned
/// string only when the JSON text had escapes), so an event costs one allocation for the value
/// and one for the key, whatever its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: Uuid,
    /// Milliseconds since the Unix epoch, UTC.
    pub occurred_at_ms: i64,
    pub source: Source,
    /// The raw Kafka message value: a JSON object, valid UTF-8.
    payload: Box<str>,
    /// The Kafka message key, kept for the dead-letter path.
    key: Option<Box<[u8]>>,
    user_id: Text,
    event_type: Text,
    /// The `attributes` object as received; `None` when absent or null.
    attributes: Option<Range<usize>>,
}

/// A decoded JSON string: where it sits in the payload, or its unescaped text. Ranges are only
/// made by [`decode`], from strings the JSON parser borrowed out of the same text, so they lie
/// on character boundaries of `payload` and slicing with them cannot fail.
#[derive(Debug, Clone, PartialEq)]
enum Text {
    In(Range<usize>),
    Owned(Box<str>),
}

impl Event {
    pub fn user_id(&self) -> &str {
        self.text(&self.user_id)
    }

    pub fn event_type(&self) -> &str {
        self.text(&self.event_type)
    }

    /// The `attributes` object as JSON text, exactly as received; `None` when absent or null.
    pub fn attributes(&self) -> Option<&str> {
        self.attributes.clone().map(|r| &self.payload[r])
    }

    /// The raw Kafka message value.
    pub fn payload(&self) -> &[u8] {
        self.payload.as_bytes()
    }

    /// The Kafka message key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// UTC calendar day of `occurred_at`, as days since 1970-01-01 (part of the storage key).
    pub fn day(&self) -> i64 {
        self.occurred_at_ms.div_euclid(86_400_000)
    }

    fn text<'a>(&'a self, t: &'a Text) -> &'a str {
        match t {
            Text::In(r) => &self.payload[r.clone()],
            Text::Owned(s) => s,
        }
    }
}

/// Why a message is not a valid event. `kind()` is a stable, bounded label for metrics and
/// dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("message has no value (tombstone)")]
    Tombstone,
    #[error("value is {size} bytes, above the limit of {limit} bytes (pipeline.max_event_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("value is not valid UTF-8: {}", Clip(.0))]
    NotUtf8(String),
    #[error("value is not valid JSON: {}", Clip(.0))]
    Json(String),
    #[error("value is JSON but not an object")]
    NotAnObject,
    /// Deeper than JSON readers with a recursion limit (serde_json's 128, Python's ~1000) take.
    #[error("value nests objects and arrays more than {limit} levels deep (byte {at}); raise pipeline.max_json_depth (at most 127) if such events are wanted")]
    TooDeep { limit: usize, at: usize },
    /// A `\uD800`-`\uDFFF` escape without its pair: it stands for no character, and strict
    /// readers refuse the whole value.
    #[error("value has an unpaired UTF-16 surrogate escape ({escape}) at byte {at}; every \\uD800-\\uDBFF escape must be followed by a \\uDC00-\\uDFFF one")]
    BadUnicode { escape: String, at: usize },
    /// The Kafka timestamp, which `occurred_at` is judged against, is itself in the future.
    #[error("the Kafka message timestamp ({timestamp}) is more than 24h ahead of this host's clock ({now}): the producer's clock or the timestamp it sets is wrong")]
    FutureTimestamp { timestamp: String, now: String },
    #[error("field '{0}' is missing or null")]
    MissingField(&'static str),
    #[error("field '{field}' is invalid: {}", Clip(.reason))]
    InvalidField { field: &'static str, reason: String },
    /// Valid on the wire, but the store refused the row for good.
    #[error("store rejected the row: {}", Clip(.0))]
    Rejected(String),
    /// Decoding panicked: a fault of vault's, not of the message, which is kept in the
    /// dead-letter topic to be replayed once it is fixed (rather than stalling its partition).
    #[error("decoding failed unexpectedly (a fault of vault's; replay the message once it is fixed): {}", Clip(.0))]
    Undecodable(String),
}

impl EventError {
    /// Every [`EventError::kind`], for metric series created before their first event.
    pub const KINDS: [&'static str; 12] = [
        "tombstone",
        "too_large",
        "not_utf8",
        "bad_json",
        "not_an_object",
        "too_deep",
        "bad_unicode",
        "future_timestamp",
        "missing_field",
        "invalid_field",
        "store_rejected",
        "undecodable",
    ];

    /// Stable machine-readable kind, used as a metric label and a dead-letter header.
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::Tombstone => "tombstone",
            EventError::TooLarge { .. } => "too_large",
            EventError::NotUtf8(_) => "not_utf8",
            EventError::Json(_) => "bad_json",
            EventError::NotAnObject => "not_an_object",
            EventError::TooDeep { .. } => "too_deep",
            EventError::BadUnicode { .. } => "bad_unicode",
            EventError::FutureTimestamp { .. } => "future_timestamp",
            EventError::MissingField(_) => "missing_field",
            EventError::InvalidField { .. } => "invalid_field",
            EventError::Rejected(_) => "store_rejected",
            EventError::Undecodable(_) => "undecodable",
        }
    }
}

/// Shows at most [`MESSAGE_CHARS`] characters of a free-form text (a parser's or the store's
/// message), so that no error text grows with the input.
struct Clip<'a>(&'a str);

impl std::fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.char_indices().nth(MESSAGE_CHARS) {
            None => f.write_str(self.0),
            Some((cut, _)) => write!(f, "{}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

/// An echo of input for an error message: quoted, escaped, and cut after [`ECHO_CHARS`]
/// characters with `…` and the input's length in bytes.
pub fn excerpt(s: &str) -> String {
    let mut out = String::from('"');
    let mut chars = s.char_indices();
    for (_, c) in chars.by_ref().take(ECHO_CHARS) {
        out.extend(c.escape_debug());
    }
    out.push('"');
    if chars.next().is_some() {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    out
}

/// Field slots of the wire object, filled in one pass over the text. A wrong type is recorded
/// rather than failing the parse, so that it is reported against its field name rather than as
/// a bare serde position. Unknown fields are ignored.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    event_id: Field<'a>,
    #[serde(borrow, default)]
    user_id: Field<'a>,
    #[serde(borrow, default)]
    event_type: Field<'a>,
    #[serde(borrow, default)]
    occurred_at: Field<'a>,
    #[serde(borrow, default)]
    attributes: Option<&'a RawValue>,
}

/// One field of the wire object, as far as a string field cares.
#[derive(Default)]
enum Field<'a> {
    #[default]
    Absent,
    Null,
    Str(Cow<'a, str>),
    /// Any other JSON value; the kind names it in the error.
    Other(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Field::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Field::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Other("a number"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other("an object"))
    }
}

/// Decodes and validates one Kafka message. A missing `event_id` is derived from `origin` when
/// given (a replayed dead letter's original coordinates), else from `source`.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    source: Source,
    origin: Option<Origin<'_>>,
    limits: Limits,
) -> Result<Event, EventError> {
    let bytes = value.ok_or(EventError::Tombstone)?;
    if bytes.len() > limits.max_bytes {
        return Err(EventError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| EventError::NotUtf8(e.to_string()))?;
    check_structure(bytes, limits.max_depth)?;
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        // Distinguish "valid JSON of the wrong shape" from "not JSON at all".
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => EventError::NotAnObject,
            Err(e) => EventError::Json(e.to_string()),
        });
    }
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;

    let user_id = required_string(wire.user_id, "user_id", MAX_USER_ID_BYTES)?;
    let event_type = required_string(wire.event_type, "event_type", MAX_EVENT_TYPE_BYTES)?;
    let occurred_at_ms = occurred_at(wire.occurred_at, source.timestamp_ms)?;
    let event_id = match wire.event_id {
        Field::Absent | Field::Null => derived_id(origin.unwrap_or(Origin::of(&source))),
        field => {
            let s = string_field(field, "event_id")?;
            Uuid::try_parse(&s).map_err(|e| EventError::InvalidField {
                field: "event_id",
                reason: format!("not a UUID ({e})"),
            })?
        }
    };
    let attributes = match wire.attributes {
        None => None,
        Some(raw) if raw.get().starts_with('{') => Some(range_in(text, raw.get())),
        Some(_) => {
            return Err(EventError::InvalidField {
                field: "attributes",
                reason: "must be a JSON object".into(),
            })
        }
    };

    Ok(Event {
        event_id,
        occurred_at_ms,
        user_id: text_in(text, user_id),
        event_type: text_in(text, event_type),
        attributes,
        payload: text.into(),
        key: key.map(Box::from),
        source,
    })
}

/// Where `part`, a string borrowed from `whole`, lies in it.
fn range_in(whole: &str, part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

fn text_in(whole: &str, s: Cow<'_, str>) -> Text {
    match s {
        Cow::Borrowed(part) => Text::In(range_in(whole, part)),
        Cow::Owned(unescaped) => Text::Owned(unescaped.into()),
    }
}

/// The id given to an event that carries none: the same message always gets the same id.
pub fn derived_event_id(source: &Source) -> Uuid {
    derived_id(Origin::of(source))
}

/// UUID v5 of `topic/partition/offset`: the one definition of a derived id.
pub fn derived_id(origin: Origin<'_>) -> Uuid {
    let name = format!("{}/{}/{}", origin.topic, origin.partition, origin.offset);
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

/// One pass over a value's bytes (valid UTF-8) for what the JSON parser lets through but
/// readers refuse: nesting deeper than `max_depth` (counted outside strings), numbers beyond
/// an f64's range, and `\uXXXX` escapes that are unpaired UTF-16 surrogates (inside strings,
/// keys included). Encoded
/// surrogates cannot occur: they are not valid UTF-8. Malformed JSON is left to the parser.
fn check_structure(bytes: &[u8], max_depth: usize) -> Result<(), EventError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(EventError::TooDeep {
                        limit: max_depth,
                        at: i,
                    });
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => i = string_end(bytes, i + 1)?,
            b'-' | b'0'..=b'9' => i = number_end(bytes, i)?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// Scans a number from `i`; returns the index after it, or an error when it is beyond what an
/// f64 holds (`1e400`, four hundred digits): most readers refuse such a number (serde_json's
/// `Value` among them), and the parser in front only skips it. Only a number with an exponent
/// or more than 300 characters is parsed; the rest cannot overflow.
fn number_end(bytes: &[u8], i: usize) -> Result<usize, EventError> {
    let len = bytes[i..]
        .iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .unwrap_or(bytes.len() - i);
    let token = &bytes[i..i + len];
    if len > 300 || token.iter().any(|b| matches!(b, b'e' | b'E')) {
        let text = std::str::from_utf8(token).unwrap_or_default();
        if text.parse::<f64>().is_ok_and(|n| n.is_infinite()) {
            return Err(EventError::Json(format!(
                "number out of range at byte {i} (JSON readers take numbers up to about \
                 1.8e308): {}",
                excerpt(text)
            )));
        }
    }
    Ok(i + len)
}

/// Scans a string's contents from `i` (just after its opening quote); returns the index after
/// its closing quote (or the end of the input), or the first unpaired surrogate escape.
fn string_end(bytes: &[u8], mut i: usize) -> Result<usize, EventError> {
    loop {
        // An escape at the very end can put `i` past the end.
        let rest = bytes.get(i..).unwrap_or_default();
        let Some(n) = memchr::memchr2(b'"', b'\\', rest) else {
            return Ok(bytes.len());
        };
        i += n;
        if bytes[i] == b'"' {
            return Ok(i + 1);
        }
        // A backslash: `\uXXXX` is checked, any other escape is two bytes.
        let Some(unit) = unicode_escape(bytes, i) else {
            i += 2;
            continue;
        };
        match unit {
            0xD800..=0xDBFF => match unicode_escape(bytes, i + 6) {
                Some(0xDC00..=0xDFFF) => i += 12,
                _ => return Err(bad_unicode(bytes, i)),
            },
            0xDC00..=0xDFFF => return Err(bad_unicode(bytes, i)),
            _ => i += 6,
        }
    }
}

/// The code unit of a `\uXXXX` escape at `i`, if one is there.
fn unicode_escape(bytes: &[u8], i: usize) -> Option<u16> {
    let esc = bytes.get(i..i + 6)?;
    if esc[0] != b'\\' || esc[1] != b'u' {
        return None;
    }
    let hex = std::str::from_utf8(&esc[2..]).ok()?;
    u16::from_str_radix(hex, 16).ok()
}

fn bad_unicode(bytes: &[u8], at: usize) -> EventError {
    // Six ASCII bytes: the escape `unicode_escape` just read.
    let escape = String::from_utf8_lossy(&bytes[at..at + 6]).into_owned();
    EventError::BadUnicode { escape, at }
}

/// The string a present, non-null field holds.
fn string_field<'a>(field: Field<'a>, name: &'static str) -> Result<Cow<'a, str>, EventError> {
    match field {
        Field::Str(s) => Ok(s),
        Field::Absent | Field::Null => Err(EventError::MissingField(name)),
        Field::Other(kind) => Err(EventError::InvalidField {
            field: name,
            reason: format!("must be a string, got {kind}"),
        }),
    }
}

fn required_string<'a>(
    raw: Field<'a>,
    field: &'static str,
    max_bytes: usize,
) -> Result<Cow<'a, str>, EventError> {
    let s = string_field(raw, field)?;
    if s.is_empty() {
        return Err(EventError::InvalidField {
            field,
            reason: "must not be empty".into(),
        });
    }
    if s.len() > max_bytes {
        return Err(EventError::InvalidField {
            field,
            reason: format!("{} bytes, above the limit of {max_bytes}", s.len()),
        });
    }
    Ok(s)
}

fn occurred_at(raw: Field<'_>, kafka_ts: Option<i64>) -> Result<i64, EventError> {
    const FIELD: &str = "occurred_at";
    let s = string_field(raw, FIELD)?;
    let ts = DateTime::parse_from_rfc3339(&s).map_err(|e| EventError::InvalidField {
        field: FIELD,
        reason: format!("not an RFC 3339 timestamp ({e})"),
    })?;
    let ms = ts.timestamp_millis();
    if ms < MIN_OCCURRED_AT_MS {
        return Err(EventError::InvalidField {
            field: FIELD,
            reason: format!("{} is before 2000-01-01", excerpt(&s)),
        });
    }
    // Judged against the message's own timestamp so that a replay decides exactly as the first
    // read did; wall-clock time only when the message carries none. The producer sets that
    // timestamp, so it must not be in the future itself: otherwise any occurred_at would pass.
    let too_late = match kafka_ts {
        Some(t) => {
            kafka_timestamp_not_ahead(t)?;
            ms > t.saturating_add(MAX_FUTURE_SKEW_MS)
        }
        None => within_skew_of_now(ms).is_err(),
    };
    if too_late {
        return Err(EventError::InvalidField {
            field: FIELD,
            reason: format!(
                "{} is more than 24h after the message was produced",
                excerpt(&s)
            ),
        });
    }
    Ok(ms)
}

/// A message's Kafka timestamp (set by its producer) may run at most [`MAX_FUTURE_SKEW_MS`]
/// ahead of the clock `now` (ms). It dates what the message does: an event's `occurred_at` is
/// judged against it, and an erasure request erases through it, so one a year ahead would
/// otherwise hide a year of the user's later activity.
pub fn kafka_timestamp_not_ahead(kafka_ts: i64) -> Result<(), EventError> {
    within_skew_of_now(kafka_ts).map_err(|now| EventError::FutureTimestamp {
        timestamp: show_ms(kafka_ts),
        now: show_ms(now),
    })
}

/// The latest reading of the wall clock (ms since the epoch) taken by [`within_skew_of_now`].
static CLOCK_READ_MS: AtomicI64 = AtomicI64::new(i64::MIN);

/// Whether `ms` is at most [`MAX_FUTURE_SKEW_MS`] past the wall clock; `Err(now)` when not.
/// Decided without reading the clock when an earlier reading says so: the clock has only moved
/// on since (stepped back, it lets through at most that step more, against a 24 h allowance).
/// A reading for every event was a few % of the CPU of a store run.
fn within_skew_of_now(ms: i64) -> Result<(), i64> {
    let earliest_now = ms.saturating_sub(MAX_FUTURE_SKEW_MS);
    if earliest_now <= CLOCK_READ_MS.load(Ordering::Relaxed) {
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp_millis();
    CLOCK_READ_MS.fetch_max(now, Ordering::Relaxed);
    if earliest_now <= now {
        Ok(())
    } else {
        Err(now)
    }
}

/// Milliseconds since the epoch as RFC 3339 when representable, else as the number.
fn show_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms since the epoch"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000; // 2025-11-24

    fn src(offset: i64) -> Source {
        Source {
            topic: Arc::from("activity"),
            partition: 3,
            offset,
            timestamp_ms: Some(NOW),
        }
    }

    fn bytes(max_bytes: usize) -> Limits {
        Limits {
            max_bytes,
            max_depth: DEFAULT_MAX_JSON_DEPTH,
        }
    }

    fn dec(v: &str) -> Result<Event, EventError> {
        decode(None, Some(v.as_bytes()), src(42), None, bytes(64 * 1024))
    }

    #[test]
    fn decodes_a_full_event_and_keeps_the_raw_value() {
        let v = r#"{"event_id":"6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01","user_id":"u-1","event_type":"click","occurred_at":"2025-11-24T10:00:00.123Z","attributes":{"page":"/home"},"extra":1}"#;
        let e = dec(v).unwrap();
        assert_eq!(
            e.event_id.to_string(),
            "6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01"
        );
        assert_eq!(e.user_id(), "u-1");
        assert_eq!(e.event_type(), "click");
        assert_eq!(e.occurred_at_ms, 1_763_978_400_123);
        assert_eq!(e.attributes(), Some(r#"{"page":"/home"}"#));
        assert_eq!(e.payload(), v.as_bytes());
        assert_eq!(e.key(), None);
        assert_eq!(e.day(), 1_763_978_400_123 / 86_400_000);
    }

    #[test]
    fn missing_event_id_is_derived_deterministically_from_coordinates() {
        let v = r#"{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00+02:00"}"#;
        let a = dec(v).unwrap();
        let b = dec(v).unwrap();
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(a.event_id.get_version_num(), 5);
        let other = decode(None, Some(v.as_bytes()), src(43), None, bytes(1 << 16)).unwrap();
        assert_ne!(a.event_id, other.event_id);
        assert_eq!(a.attributes(), None);
    }

    #[test]
    fn each_kind_of_bad_input_is_a_typed_error_naming_the_field() {
        let cases: &[(Option<&[u8]>, &str)] = &[
            (None, "tombstone"),
            (Some(b"\xff\xfe"), "not_utf8"),
            (Some(b"{not json"), "bad_json"),
            (Some(b"[1,2]"), "not_an_object"),
            (Some(b"\"str\""), "not_an_object"),
            (Some(br#"{"event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#), "missing_field"),
            (Some(br#"{"user_id":null,"event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#), "missing_field"),
            (Some(br#"{"user_id":7,"event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#), "invalid_field"),
            (Some(br#"{"user_id":"","event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#), "invalid_field"),
            (Some(br#"{"user_id":"u","event_type":"t","occurred_at":"yesterday"}"#), "invalid_field"),
            (Some(br#"{"user_id":"u","event_type":"t","occurred_at":"1970-01-01T00:00:00Z"}"#), "invalid_field"),
            (Some(br#"{"user_id":"u","event_type":"t","occurred_at":"2999-01-01T00:00:00Z"}"#), "invalid_field"),
            (Some(br#"{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","event_id":"nope"}"#), "invalid_field"),
            (Some(br#"{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","attributes":[1]}"#), "invalid_field"),
        ];
        for (value, kind) in cases {
            let err = decode(None, *value, src(1), None, bytes(1 << 16)).unwrap_err();
            assert_eq!(err.kind(), *kind, "{value:?} gave {err}");
        }
    }

    #[test]
    fn a_wrong_type_names_the_field_and_what_it_got() {
        let at = r#""event_type":"t","occurred_at":"2025-11-24T10:00:00Z""#;
        for (user, got) in [
            ("7", "a number"),
            ("true", "a boolean"),
            (r#"{"a":[1,{"b":2}]}"#, "an object"),
            ("[1,2]", "an array"),
        ] {
            let err = dec(&format!(r#"{{"user_id":{user},{at}}}"#)).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("field 'user_id' is invalid: must be a string, got {got}")
            );
        }
        // Fields after a skipped nested value are still read.
        let v = format!(r#"{{"x":{{"user_id":1}},"user_id":"u",{at}}}"#);
        assert_eq!(dec(&v).unwrap().user_id(), "u");
    }

    #[test]
    fn a_null_event_id_is_derived_like_a_missing_one() {
        let v = r#"{"event_id":null,"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#;
        assert_eq!(dec(v).unwrap().event_id, derived_event_id(&src(42)));
    }

    #[test]
    fn limits_are_enforced_in_bytes() {
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        let v = format!(
            r#"{{"user_id":"{long}","event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}}"#
        );
        let err = dec(&v).unwrap_err();
        assert!(err.to_string().contains("user_id"), "{err}");
        let err = decode(None, Some(v.as_bytes()), src(1), None, bytes(100)).unwrap_err();
        assert_eq!(err.kind(), "too_large");
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let v = r#"{"user_id":"a\"b","event_type":"t\u00e9","occurred_at":"2025-11-24T10:00:00Z"}"#;
        let e = dec(v).unwrap();
        assert_eq!(e.user_id(), "a\"b");
        assert_eq!(e.event_type(), "té");
    }

    const OK: &str = r#""user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z""#;

    /// What is stored must read back with serde_json's `Value` (and readers like it): a number
    /// beyond an f64 is refused, in `attributes` and in unknown fields alike.
    #[test]
    fn numbers_beyond_an_f64_are_refused_and_the_rest_read_back() {
        let digits = "9".repeat(400);
        for bad in ["1e400", "-1E+400", "0.5e309", digits.as_str()] {
            for v in [
                format!(r#"{{{OK},"attributes":{{"x":{bad}}}}}"#),
                format!(r#"{{{OK},"extra":[{bad}]}}"#),
            ] {
                let err = dec(&v).unwrap_err();
                assert_eq!(err.kind(), "bad_json", "{bad}: {err}");
                assert!(err.to_string().contains("out of range"), "{err}");
                assert!(err.to_string().len() < 300, "the echo is cut: {err}");
            }
        }
        for fine in [
            "1e300",
            "-1.5e-400",
            "123456789012345678901234567890",
            "0",
            "-0.0",
        ] {
            let v = format!(r#"{{{OK},"attributes":{{"x":{fine}}},"n":{fine}}}"#);
            let e = dec(&v).unwrap_or_else(|err| panic!("{fine}: {err}"));
            serde_json::from_slice::<serde_json::Value>(e.payload()).expect("reads back");
        }
        // A string that looks like one is a string.
        let v = format!(r#"{{{OK},"attributes":{{"x":"1e400"}}}}"#);
        assert!(dec(&v).is_ok());
    }

    /// `depth` levels of objects around `1`: `{"a":{"a":1}}` is depth 2.
    fn nested(depth: usize) -> String {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_too_deep_and_costs_one_scan() {
        // The event object is level 1, so attributes of depth 63 reach the default 64.
        let at_limit = format!(
            r#"{{{OK},"attributes":{}}}"#,
            nested(DEFAULT_MAX_JSON_DEPTH - 1)
        );
        assert!(dec(&at_limit).is_ok());
        let over = format!(
            r#"{{{OK},"attributes":{}}}"#,
            nested(DEFAULT_MAX_JSON_DEPTH)
        );
        let err = dec(&over).unwrap_err();
        assert_eq!(err.kind(), "too_deep", "{err}");
        assert!(err.to_string().contains("pipeline.max_json_depth"), "{err}");

        // 200,000 levels, in attributes, in an unknown field, or as the whole value: refused
        // without recursion (a recursive check would overflow the test thread's stack).
        let huge = Limits {
            max_bytes: 1 << 22,
            max_depth: DEFAULT_MAX_JSON_DEPTH,
        };
        let deep = 200_000;
        for v in [
            format!(r#"{{{OK},"attributes":{}}}"#, nested(deep)),
            format!(r#"{{{OK},"x":{}{}}}"#, "[".repeat(deep), "]".repeat(deep)),
            "[".repeat(deep),
        ] {
            let started = std::time::Instant::now();
            let err = decode(None, Some(v.as_bytes()), src(1), None, huge).unwrap_err();
            assert_eq!(err.kind(), "too_deep", "{err}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let v = format!(
            r#"{{{OK},"attributes":{{"s":"{}\"{}"}}}}"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        assert!(dec(&v).is_ok());
    }

    #[test]
    fn the_deepest_configurable_value_still_parses() {
        let limits = Limits {
            max_bytes: 1 << 16,
            max_depth: MAX_JSON_DEPTH_LIMIT,
        };
        let v = format!(
            r#"{{{OK},"attributes":{}}}"#,
            nested(MAX_JSON_DEPTH_LIMIT - 1)
        );
        let e = decode(None, Some(v.as_bytes()), src(1), None, limits).unwrap();
        // serde_json's default reader takes it back.
        serde_json::from_str::<serde_json::Value>(e.attributes().unwrap()).unwrap();
        serde_json::from_slice::<serde_json::Value>(e.payload()).unwrap();
    }

    #[test]
    fn unpaired_surrogate_escapes_are_bad_unicode_wherever_they_are() {
        for bad in [
            r#""attributes":{"k":"\ud800"}"#,
            r#""attributes":{"k":"\uDC00"}"#,
            r#""attributes":{"k":"x\ud800\u0041"}"#,
            r#""attributes":{"k":"\udc00\ud800"}"#,
            r#""attributes":{"\ud800":1}"#,
            r#""extra":"\ud800""#,
            r#""extra":["\ud83d"]"#,
        ] {
            let err = dec(&format!("{{{OK},{bad}}}")).unwrap_err();
            assert_eq!(err.kind(), "bad_unicode", "{bad}: {err}");
        }
        // A lone surrogate in a required field too (serde_json alone would call it bad JSON).
        let err =
            dec(r#"{"user_id":"\ud800","event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#)
                .unwrap_err();
        assert_eq!(err.kind(), "bad_unicode", "{err}");
        // Pairs, escaped backslashes and other escapes are fine.
        for good in [
            r#""attributes":{"k":"\ud83d\ude00"}"#,
            r#""attributes":{"k":"\\ud800"}"#,
            r#""attributes":{"k":"\"\\\/\b\f\n\r\t\u00e9"}"#,
            r#""extra":"\uD83D\uDE00""#,
        ] {
            assert!(dec(&format!("{{{OK},{good}}}")).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_kafka_timestamp_ahead_of_the_clock_is_a_future_timestamp() {
        let now = chrono::Utc::now().timestamp_millis();
        let v = r#"{"user_id":"u","event_type":"t","occurred_at":"9999-12-31T00:00:00Z"}"#;
        let at = |ts: i64| Source {
            timestamp_ms: Some(ts),
            ..src(1)
        };
        let year_9999 = 253_402_214_400_000;
        let err = decode(
            None,
            Some(v.as_bytes()),
            at(year_9999),
            None,
            bytes(1 << 16),
        )
        .unwrap_err();
        assert_eq!(err.kind(), "future_timestamp", "{err}");
        assert!(err.to_string().contains("9999-12-31"), "{err}");
        let err = decode(None, Some(v.as_bytes()), at(i64::MAX), None, bytes(1 << 16)).unwrap_err();
        assert_eq!(err.kind(), "future_timestamp", "{err}");

        // Within the allowance, occurred_at is still judged against the Kafka timestamp.
        let soon = now + MAX_FUTURE_SKEW_MS - 60_000;
        let occurred = DateTime::from_timestamp_millis(soon + MAX_FUTURE_SKEW_MS - 60_000)
            .unwrap()
            .to_rfc3339();
        let v = format!(r#"{{"user_id":"u","event_type":"t","occurred_at":"{occurred}"}}"#);
        assert!(decode(None, Some(v.as_bytes()), at(soon), None, bytes(1 << 16)).is_ok());
        let late = now + MAX_FUTURE_SKEW_MS + 60_000;
        let err = decode(None, Some(v.as_bytes()), at(late), None, bytes(1 << 16)).unwrap_err();
        assert_eq!(err.kind(), "future_timestamp", "{err}");
    }

    #[test]
    fn error_texts_echo_at_most_a_bounded_piece_of_the_input() {
        let long = "1".repeat(520_000);
        let at = r#""occurred_at":"2025-11-24T10:00:00Z""#;
        for (fields, echoed) in [
            // Fractional seconds of any length parse: the value is echoed, cut.
            (
                format!(r#""occurred_at":"1970-01-01T00:00:00.{long}Z""#),
                true,
            ),
            (
                format!(r#""occurred_at":"2999-01-01T00:00:00.{long}Z""#),
                true,
            ),
            (format!(r#""occurred_at":"{long}""#), false),
            (
                format!(r#""occurred_at":"2025-11-24T10:00:00Z{long}""#),
                false,
            ),
            (format!(r#"{at},"event_id":"{long}""#), false),
            (format!(r#"{at},"event_id":"{long}-""#), false),
        ] {
            let v = format!(r#"{{"user_id":"u","event_type":"t",{fields}}}"#);
            let err = decode(None, Some(v.as_bytes()), src(1), None, bytes(1 << 20)).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.kind(), "invalid_field", "{text}");
            assert!(text.len() < 512, "{} bytes: {}", text.len(), &text[..512]);
            if echoed {
                assert!(text.contains("… (520021 bytes)"), "{text}");
            }
        }
        let err = dec(r#"{"user_id":"u","event_type":"t","occurred_at":"1999-01-01T00:00:00Z"}"#)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(r#""1999-01-01T00:00:00Z" is before"#),
            "{err}"
        );
        assert_eq!(
            excerpt(&"é".repeat(100)),
            format!("\"{}\"… (200 bytes)", "é".repeat(ECHO_CHARS))
        );
        assert_eq!(excerpt("a\nb"), r#""a\nb""#);
        // Texts from elsewhere (the store's, the parser's) are cut too.
        let text = EventError::Rejected("x".repeat(100_000)).to_string();
        assert!(
            text.len() < 512 && text.ends_with("(100000 bytes)"),
            "{text}"
        );
    }

    #[test]
    fn a_replayed_message_derives_its_id_from_its_original_coordinates() {
        let v = r#"{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z"}"#;
        let original = dec(v).unwrap();
        // Re-published at offset 9000 of partition 0, with the original's coordinates.
        let replayed_at = Source {
            partition: 0,
            offset: 9000,
            ..src(42)
        };
        let origin = Origin {
            topic: "activity",
            partition: 3,
            offset: 42,
        };
        let replayed = decode(
            None,
            Some(v.as_bytes()),
            replayed_at.clone(),
            Some(origin),
            bytes(1 << 16),
        )
        .unwrap();
        assert_eq!(replayed.event_id, original.event_id);
        assert_eq!(replayed.event_id, derived_id(origin));
        assert_eq!(
            replayed.source, replayed_at,
            "the row still names where it was read"
        );
        // Without the headers it would have been a new row.
        let plain = decode(None, Some(v.as_bytes()), replayed_at, None, bytes(1 << 16)).unwrap();
        assert_ne!(plain.event_id, original.event_id);
        // A producer's own event_id wins over both.
        let id = "6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01";
        let with_id = format!(r#"{{"event_id":"{id}",{}"#, &v[1..]);
        let e = decode(
            None,
            Some(with_id.as_bytes()),
            src(1),
            Some(origin),
            bytes(1 << 16),
        )
        .unwrap();
        assert_eq!(e.event_id.to_string(), id);
    }
}

#[cfg(test)]
mod properties {
    //! Decoding never panics, whatever the bytes, and every valid event survives a round trip.
    //! `make fuzz` runs these with many more cases (PROPTEST_CASES).

    use proptest::prelude::*;

    use super::*;

    fn src() -> Source {
        Source {
            topic: Arc::from("t"),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1_764_000_000_000),
        }
    }

    fn json_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9_.@-]{0,300}",
            any::<String>(),
            Just(String::new()),
        ]
    }

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 16,
        max_depth: DEFAULT_MAX_JSON_DEPTH,
    };

    /// Error texts stay this short whatever the input.
    const MAX_ERROR_TEXT: usize = 1024;

    /// JSON text made mostly of brackets, braces, quotes, escapes and surrogate escapes.
    fn structural_noise() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("[".to_owned()),
                Just("]".to_owned()),
                Just("{".to_owned()),
                Just("}".to_owned()),
                Just("\"".to_owned()),
                Just("\\".to_owned()),
                Just(":".to_owned()),
                Just(",".to_owned()),
                Just("1".to_owned()),
                (0xD700u16..0xE100).prop_map(|u| format!("\\u{u:04x}")),
            ],
            0..600,
        )
        .prop_map(|parts| parts.concat())
    }

    /// A JSON string literal writing every UTF-16 code unit as a `\uXXXX` escape.
    fn escaped(units: &[u16]) -> String {
        let body: String = units.iter().map(|u| format!("\\u{u:04x}")).collect();
        format!("\"{body}\"")
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = decode(None, Some(&bytes), src(), None, LIMITS) {
                prop_assert!(e.to_string().len() <= MAX_ERROR_TEXT);
            }
        }

        #[test]
        fn structural_noise_never_panics(noise in structural_noise(), depth in 1usize..200) {
            let limits = Limits { max_bytes: 1 << 16, max_depth: depth };
            for v in [noise.clone(), format!(r#"{{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","x":{noise}}}"#)] {
                if let Err(e) = decode(None, Some(v.as_bytes()), src(), None, limits) {
                    prop_assert!(e.to_string().len() <= MAX_ERROR_TEXT);
                }
            }
        }

        #[test]
        fn nesting_is_classified_by_depth(
            levels in proptest::collection::vec(any::<bool>(), 1..300),
            limit in 2usize..=MAX_JSON_DEPTH_LIMIT,
        ) {
            // `levels` containers (true: object, false: array) under attributes' own object.
            let (mut open, mut close) = (String::new(), String::new());
            for &object in &levels {
                open.push_str(if object { r#"{"k":"# } else { "[" });
                close.insert(0, if object { '}' } else { ']' });
            }
            let v = format!(
                r#"{{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","attributes":{{"a":{open}"[{{"{close}}}}}"#
            );
            let limits = Limits { max_bytes: 1 << 16, max_depth: limit };
            let depth = 2 + levels.len();
            match decode(None, Some(v.as_bytes()), src(), None, limits) {
                Ok(e) => {
                    prop_assert!(depth <= limit);
                    // What is stored, serde_json's default reader takes back.
                    prop_assert!(serde_json::from_slice::<serde_json::Value>(e.payload()).is_ok());
                }
                Err(e) => {
                    prop_assert!(depth > limit, "{e}");
                    prop_assert_eq!(e.kind(), "too_deep");
                }
            }
        }

        #[test]
        fn surrogate_escapes_are_classified(
            units in proptest::collection::vec(prop_oneof![0xD800u16..0xE000, 0x20u16..0x7F, any::<u16>()], 0..12),
            in_key in any::<bool>(),
        ) {
            let s = escaped(&units);
            let extra = if in_key { format!("{s}:1") } else { format!(r#""x":{s}"#) };
            let v = format!(r#"{{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z",{extra}}}"#);
            let valid = String::from_utf16(&units).is_ok();
            match decode(None, Some(v.as_bytes()), src(), None, LIMITS) {
                Ok(e) => {
                    prop_assert!(valid);
                    prop_assert!(serde_json::from_slice::<serde_json::Value>(e.payload()).is_ok());
                }
                Err(e) => {
                    prop_assert!(!valid, "{e}");
                    prop_assert_eq!(e.kind(), "bad_unicode");
                }
            }
        }

        #[test]
        fn arbitrary_field_values_give_an_event_or_a_typed_error(
            user in json_string(),
            kind in json_string(),
            at in prop_oneof![json_string(), Just("2025-11-24T10:00:00Z".to_owned())],
            id in prop_oneof![json_string(), Just("6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01".to_owned())],
            attrs in prop_oneof![Just("{}".to_owned()), Just("[]".to_owned()), Just("null".to_owned()), Just("3".to_owned())],
        ) {
            let v = serde_json::json!({"user_id": user, "event_type": kind, "occurred_at": at, "event_id": id}).to_string();
            let v = format!("{}, \"attributes\": {attrs}}}", &v[..v.len() - 1]);
            match decode(None, Some(v.as_bytes()), src(), None, LIMITS) {
                Ok(e) => {
                    prop_assert_eq!(e.user_id(), user.as_str());
                    prop_assert!(!user.is_empty() && user.len() <= MAX_USER_ID_BYTES);
                    prop_assert!(e.occurred_at_ms >= MIN_OCCURRED_AT_MS);
                }
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }

        #[test]
        fn valid_events_round_trip(
            user in "[a-z0-9-]{1,64}",
            kind in "[a-z_]{1,32}",
            ms in MIN_OCCURRED_AT_MS..1_764_000_000_000i64,
            n in any::<i64>(),
        ) {
            let at = chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let v = format!(r#"{{"user_id":"{user}","event_type":"{kind}","occurred_at":"{at}","attributes":{{"n":{n}}}}}"#);
            let e = decode(Some(b"k"), Some(v.as_bytes()), src(), None, LIMITS).unwrap();
            prop_assert_eq!(e.user_id(), user);
            prop_assert_eq!(e.event_type(), kind);
            prop_assert_eq!(e.occurred_at_ms, ms);
            let attributes = format!(r#"{{"n":{n}}}"#);
            prop_assert_eq!(e.attributes(), Some(attributes.as_str()));
            prop_assert_eq!(e.key(), Some(&b"k"[..]));
            prop_assert_eq!(e.payload(), v.as_bytes());
        }
    }
}
