//! The user-activity event: wire format, validation and identity.
//!
//! Owns one rule: an event's identity is stable across replays. When the producer sends no
//! `event_id`, it is derived (UUID v5) from the Kafka coordinates, so re-reading the same message
//! after a crash or rebalance rewrites the same row instead of adding one.
//!
//! Decoding never panics: every way a message can be wrong is an [`EventError`] naming the field,
//! and the caller routes it to the dead-letter path.

use std::borrow::Cow;
use std::ops::Range;
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
/// How far `occurred_at` may lie after the Kafka message timestamp (clock skew allowance).
pub const MAX_FUTURE_SKEW_MS: i64 = 24 * 3600 * 1000;

/// Namespace of derived event ids (UUID v5 over `topic/partition/offset`).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f1c_0a7e_9b3d_4c21_8e6f_2a4b_7c9d_0e13);

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
    #[error("value is not valid UTF-8: {0}")]
    NotUtf8(String),
    #[error("value is not valid JSON: {0}")]
    Json(String),
    #[error("value is JSON but not an object")]
    NotAnObject,
    #[error("field '{0}' is missing or null")]
    MissingField(&'static str),
    #[error("field '{field}' is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// Valid on the wire, but the store refused the row for good.
    #[error("store rejected the row: {0}")]
    Rejected(String),
}

impl EventError {
    /// Stable machine-readable kind, used as a metric label and a dead-letter header.
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::Tombstone => "tombstone",
            EventError::TooLarge { .. } => "too_large",
            EventError::NotUtf8(_) => "not_utf8",
            EventError::Json(_) => "bad_json",
            EventError::NotAnObject => "not_an_object",
            EventError::MissingField(_) => "missing_field",
            EventError::InvalidField { .. } => "invalid_field",
            EventError::Rejected(_) => "store_rejected",
        }
    }
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

/// Decodes and validates one Kafka message.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    source: Source,
    max_bytes: usize,
) -> Result<Event, EventError> {
    let bytes = value.ok_or(EventError::Tombstone)?;
    if bytes.len() > max_bytes {
        return Err(EventError::TooLarge {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| EventError::NotUtf8(e.to_string()))?;
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
        Field::Absent | Field::Null => derived_event_id(&source),
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
    let name = format!("{}/{}/{}", source.topic, source.partition, source.offset);
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
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
            reason: format!("{s} is before 2000-01-01"),
        });
    }
    // Judged against the message's own timestamp so that a replay decides exactly as the first
    // read did; wall-clock time only when the message carries none.
    let reference = kafka_ts.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    if ms > reference.saturating_add(MAX_FUTURE_SKEW_MS) {
        return Err(EventError::InvalidField {
            field: FIELD,
            reason: format!("{s} is more than 24h after the message was produced"),
        });
    }
    Ok(ms)
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

    fn dec(v: &str) -> Result<Event, EventError> {
        decode(None, Some(v.as_bytes()), src(42), 64 * 1024)
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
        let other = decode(None, Some(v.as_bytes()), src(43), 1 << 16).unwrap();
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
            let err = decode(None, *value, src(1), 1 << 16).unwrap_err();
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
        let err = decode(None, Some(v.as_bytes()), src(1), 100).unwrap_err();
        assert_eq!(err.kind(), "too_large");
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let v = r#"{"user_id":"a\"b","event_type":"t\u00e9","occurred_at":"2025-11-24T10:00:00Z"}"#;
        let e = dec(v).unwrap();
        assert_eq!(e.user_id(), "a\"b");
        assert_eq!(e.event_type(), "té");
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

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(None, Some(&bytes), src(), 1 << 16);
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
            match decode(None, Some(v.as_bytes()), src(), 1 << 16) {
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
            let e = decode(Some(b"k"), Some(v.as_bytes()), src(), 1 << 16).unwrap();
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
