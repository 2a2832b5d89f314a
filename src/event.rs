//! The user-activity event: wire format, validation and identity.
//!
//! Owns one rule: an event's identity is stable across replays. When the producer sends no
//! `event_id`, it is derived (UUID v5) from the Kafka coordinates, so re-reading the same message
//! after a crash or rebalance rewrites the same row instead of adding one.
//!
//! Decoding never panics: every way a message can be wrong is an [`EventError`] naming the field,
//! and the caller routes it to the dead-letter path.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::DateTime;
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
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: Uuid,
    pub user_id: String,
    pub event_type: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub occurred_at_ms: i64,
    /// The `attributes` object as JSON text, exactly as received; `None` when absent or null.
    pub attributes: Option<String>,
    /// The raw Kafka message value.
    pub payload: Vec<u8>,
    /// The Kafka message key, kept for the dead-letter path.
    pub key: Option<Vec<u8>>,
    pub source: Source,
}

impl Event {
    /// UTC calendar day of `occurred_at`, as days since 1970-01-01 (part of the storage key).
    pub fn day(&self) -> i64 {
        self.occurred_at_ms.div_euclid(86_400_000)
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

/// Field slots of the wire object. Each is kept raw so that a wrong type is reported against its
/// field name rather than as a bare serde position. Unknown fields are ignored.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    occurred_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    attributes: Option<&'a RawValue>,
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
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => EventError::NotAnObject,
            Err(e) => EventError::Json(e.to_string()),
        });
    }
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;

    let user_id = required_string(wire.user_id, "user_id", MAX_USER_ID_BYTES)?;
    let event_type = required_string(wire.event_type, "event_type", MAX_EVENT_TYPE_BYTES)?;
    let occurred_at_ms = occurred_at(wire.occurred_at, source.timestamp_ms)?;
    let event_id = match wire.event_id {
        None => derived_event_id(&source),
        Some(raw) => {
            let s = string_field(raw, "event_id")?;
            Uuid::try_parse(&s).map_err(|e| EventError::InvalidField {
                field: "event_id",
                reason: format!("not a UUID ({e})"),
            })?
        }
    };
    let attributes = match wire.attributes {
        None => None,
        Some(raw) if raw.get().starts_with('{') => Some(raw.get().to_owned()),
        Some(_) => {
            return Err(EventError::InvalidField {
                field: "attributes",
                reason: "must be a JSON object".into(),
            })
        }
    };

    Ok(Event {
        event_id,
        user_id: user_id.into_owned(),
        event_type: event_type.into_owned(),
        occurred_at_ms,
        attributes,
        payload: bytes.to_vec(),
        key: key.map(<[u8]>::to_vec),
        source,
    })
}

/// The id given to an event that carries none: the same message always gets the same id.
pub fn derived_event_id(source: &Source) -> Uuid {
    let name = format!("{}/{}/{}", source.topic, source.partition, source.offset);
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

fn string_field<'a>(raw: &'a RawValue, field: &'static str) -> Result<Cow<'a, str>, EventError> {
    serde_json::from_str::<Cow<'a, str>>(raw.get()).map_err(|_| EventError::InvalidField {
        field,
        reason: format!("must be a string, got {}", json_kind(raw.get())),
    })
}

fn required_string<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
    max_bytes: usize,
) -> Result<Cow<'a, str>, EventError> {
    let s = string_field(raw.ok_or(EventError::MissingField(field))?, field)?;
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

fn occurred_at(raw: Option<&RawValue>, kafka_ts: Option<i64>) -> Result<i64, EventError> {
    const FIELD: &str = "occurred_at";
    let s = string_field(raw.ok_or(EventError::MissingField(FIELD))?, FIELD)?;
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

fn json_kind(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
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
        assert_eq!(e.user_id, "u-1");
        assert_eq!(e.event_type, "click");
        assert_eq!(e.occurred_at_ms, 1_763_978_400_123);
        assert_eq!(e.attributes.as_deref(), Some(r#"{"page":"/home"}"#));
        assert_eq!(e.payload, v.as_bytes());
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
        assert_eq!(a.attributes, None);
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
        assert_eq!(e.user_id, "a\"b");
        assert_eq!(e.event_type, "té");
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
                    prop_assert_eq!(&e.user_id, &user);
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
            prop_assert_eq!(e.user_id, user);
            prop_assert_eq!(e.event_type, kind);
            prop_assert_eq!(e.occurred_at_ms, ms);
            prop_assert_eq!(e.attributes, Some(format!(r#"{{"n":{n}}}"#)));
            prop_assert_eq!(e.payload, v.into_bytes());
        }
    }
}
