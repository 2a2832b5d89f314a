//! Kafka: client configuration, the rebalance context, the partition coordinator, offset
//! arithmetic, the resume position after a failure, commits, the dead-letter producer, the
//! group view (every partition's committed and log-end offsets), and librdkafka's option names.

pub mod commits;
pub mod context;
pub mod coordinator;
pub mod dead_letter;
pub mod group_view;
pub mod offsets;
pub mod options;
pub mod resume;

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedMessage, Message};

use crate::config::Settings;
use crate::config::TombstonePolicy;
use crate::event::{self, Limits, Origin, Source};
use crate::kafka::dead_letter::headers;
use crate::pipeline::batch::{DeadLetter, EraseRequest, Record};

/// Settings shared by the consumer and the dead-letter producer: brokers and passthrough options
/// (security, tuning).
pub fn base_client_config(settings: &Settings) -> ClientConfig {
    let k = &settings.config.kafka;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &k.brokers)
        .set("client.id", concat!("vault/", env!("CARGO_PKG_VERSION")));
    for (key, value) in &k.options {
        cfg.set(key, value);
    }
    cfg
}

/// How long the broker may hold a fetch for partitions with nothing new. librdkafka sends the
/// next fetch (for partitions that have drained meanwhile) only after it returns, so its 500 ms
/// default stalls a catch-up in which some partitions are at the end of the log and others are
/// not; 100 ms bounds the stall at the cost of at most 10 empty fetches a second per broker.
pub const FETCH_WAIT_MAX_MS: u32 = 100;

/// How soon a partition whose prefetch queue reached its limit is fetched again once read;
/// librdkafka waits 1 s by default, which starves a small prefetch during catch-up.
pub const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// librdkafka's default `message.max.bytes`: the least `fetch.max.bytes` it accepts.
const MESSAGE_MAX_BYTES_DEFAULT: usize = 1_000_000;

/// The consumer's configuration. Offsets are committed explicitly by the coordinator, only for
/// durable batches; librdkafka never commits or stores an offset on its own.
///
/// `partitions` is how many partitions the subscribed topics have in all: librdkafka's prefetch
/// limits apply per partition, so `kafka.prefetch_bytes` is shared out among them and the
/// memory held in fetched-but-unread messages stays bounded however many partitions there are.
///
/// One fetch may carry the whole budget (`fetch.max.bytes`), each partition at most its share.
/// Left unset, librdkafka lowers `fetch.max.bytes` to the per-partition queue limit (or 1 MB,
/// `message.max.bytes`), so every fetch would carry one share in all, whatever the number of
/// partitions: on a broker that answers each fetch after ~100 ms (a remote or loaded one),
/// that starves the drain at about 10 MB/s.
pub fn consumer_config(settings: &Settings, partitions: usize) -> ClientConfig {
    let k = &settings.config.kafka;
    let mut cfg = base_client_config(settings);
    cfg.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set(
            "session.timeout.ms",
            k.session_timeout.as_millis().to_string(),
        );
    let queued_kbytes = queued_kbytes_per_partition(k.prefetch_bytes, partitions);
    for (key, value) in [
        ("queued.max.messages.kbytes", queued_kbytes.to_string()),
        // A fetch adds up to this much to a partition's queue once it is below its limit: the
        // same share keeps the overshoot at one more share (librdkafka's 1 MiB would be 16x a
        // 64 KiB share). A larger first record batch is still returned whole.
        (
            "max.partition.fetch.bytes",
            (queued_kbytes * 1024).to_string(),
        ),
        ("fetch.max.bytes", fetch_max_bytes(k).to_string()),
        ("fetch.wait.max.ms", FETCH_WAIT_MAX_MS.to_string()),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string()),
        // Feeds vault_consumer_lag (see the context's stats callback).
        ("statistics.interval.ms", "5000".to_string()),
    ] {
        // Given by the user under it or under its librdkafka alias, the user's value stands.
        if options::given(&k.options, key).is_none() {
            cfg.set(key, value);
        }
    }
    if !k.instance_id.is_empty() {
        cfg.set("group.instance.id", &k.instance_id);
    }
    cfg
}

/// The most one fetch carries for all its partitions: the prefetch budget, at least
/// `message.max.bytes` (librdkafka refuses less), and at most what librdkafka takes: 512 bytes
/// of framing below `receive.message.max.bytes` when that is set, and below `i32::MAX`.
fn fetch_max_bytes(k: &crate::config::KafkaConfig) -> usize {
    let option = |key: &str| k.options.get(key).and_then(|v| v.parse::<usize>().ok());
    let message_max = option("message.max.bytes").unwrap_or(MESSAGE_MAX_BYTES_DEFAULT);
    let ceiling = option("receive.message.max.bytes")
        .unwrap_or(i32::MAX as usize)
        .min(i32::MAX as usize)
        .saturating_sub(512);
    k.prefetch_bytes.min(ceiling).max(message_max)
}

/// librdkafka's per-partition prefetch limit (`queued.max.messages.kbytes`) for a total budget:
/// the budget shared out among the partitions, at least 64 KiB and at most librdkafka's usual
/// 8 MiB each.
pub fn queued_kbytes_per_partition(budget: usize, partitions: usize) -> usize {
    (budget / partitions.max(1)).clamp(64 << 10, 8 << 20) / 1024
}

/// Decodes a Kafka message into a record: a valid event, or a dead letter with its context.
///
/// A message with `vault.source.topic`, `vault.source.partition` and `vault.source.offset`
/// headers (a dead letter re-published by `vault dlq replay`) gets the id derived from those
/// coordinates when it has no `event_id`, so it lands on the row its original would have. Only a
/// message that has headers is looked at: a plain one costs nothing more.
pub fn to_record(
    msg: &BorrowedMessage<'_>,
    topic: &Arc<str>,
    limits: Limits,
    tombstones: TombstonePolicy,
) -> Record {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_record(msg, topic, limits, tombstones)
    })) {
        Ok(record) => record,
        // An erasure request is never set aside: its panic unwinds, and the partition stalls
        // at it, loudly, until the fault is fixed.
        Err(panic) if msg.payload().is_none() && tombstones == TombstonePolicy::Erase => {
            std::panic::resume_unwind(panic)
        }
        Err(panic) => {
            // A panic of the decoding is a fault of vault's (or of a library's: rdkafka's header
            // iteration once panicked on a name that is not UTF-8). Left to unwind, it would
            // restart the partition at this message, which would panic again, for good: the
            // message goes to the dead-letter topic instead, to be replayed once fixed (never
            // skipped: see the persister), and an alert says so (`VaultUndecodable`).
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            let what = event::excerpt(&what);
            tracing::error!(topic = %topic, partition = msg.partition(), offset = msg.offset(), panic = %what, "Decoding a message panicked; dead-lettering it as undecodable.");
            // Its original coordinates, if it is a replayed message (read apart, so that a
            // panic there leaves only the message's own).
            let origin = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                origin_in(|name| header(msg, name).flatten())
                    .map(|o| (o.topic.to_owned(), o.partition, o.offset))
            }))
            .ok()
            .flatten();
            Record::Invalid(DeadLetter {
                source: Source {
                    topic: topic.clone(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    timestamp_ms: msg.timestamp().to_millis(),
                },
                origin,
                key: msg.key().map(<[u8]>::to_vec),
                value: msg.payload().map(<[u8]>::to_vec),
                error: event::EventError::Undecodable(what),
            })
        }
    }
}

fn decode_record(
    msg: &BorrowedMessage<'_>,
    topic: &Arc<str>,
    limits: Limits,
    tombstones: TombstonePolicy,
) -> Record {
    if crate::failpoint::hit("kafka::to_record", topic, Some(msg.offset())) {
        panic!("failpoint kafka::to_record");
    }
    // Built again for the rare invalid message, so that a valid one costs one copy of it.
    let source = || Source {
        topic: topic.clone(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis(),
    };
    if let (None, TombstonePolicy::Erase, Some(at)) =
        (msg.payload(), tombstones, msg.timestamp().to_millis())
    {
        if let Some(user_id) = erasure_user(msg.key()) {
            if let Err(error) = event::kafka_timestamp_not_ahead(at) {
                return Record::Invalid(DeadLetter {
                    source: source(),
                    origin: None,
                    key: msg.key().map(<[u8]>::to_vec),
                    value: None,
                    error,
                });
            }
            return Record::Erase(EraseRequest {
                source: source(),
                user_id: user_id.to_owned(),
            });
        }
    }
    // Only a message with headers is looked at (its headers are not iterated: see `header`).
    let origin = msg
        .headers()
        .and_then(|_| origin_in(|name| header(msg, name).flatten()));
    match event::decode(msg.key(), msg.payload(), source(), origin, limits) {
        Ok(e) => Record::Event(e),
        Err(error) => Record::Invalid(DeadLetter {
            source: source(),
            origin: origin.map(|o| (o.topic.to_owned(), o.partition, o.offset)),
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().map(<[u8]>::to_vec),
            error,
        }),
    }
}

/// The user a tombstone's key names, when it can be a user_id (else the tombstone is invalid).
fn erasure_user(key: Option<&[u8]>) -> Option<&str> {
    let user = std::str::from_utf8(key?).ok()?;
    (!user.is_empty() && user.len() <= event::MAX_USER_ID_BYTES).then_some(user)
}

/// The original coordinates named by a message's `vault.source.*` headers (`header(name)`: the
/// value of its last header of that name), when all three are there and are coordinates Kafka
/// could have given: a topic name by Kafka's rule (at most 249 characters), a partition and an
/// offset not below 0. Headers are input like the value: a megabyte "topic" would otherwise be
/// copied into the message's dead letter, which then fits no topic.
pub fn origin_in<'a>(header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<Origin<'a>> {
    let text = |name| header(name).and_then(|v| std::str::from_utf8(v).ok());
    Some(Origin {
        topic: text(headers::SOURCE_TOPIC).filter(|t| crate::config::is_topic_name(t))?,
        partition: text(headers::SOURCE_PARTITION)
            .and_then(|v| v.parse().ok())
            .filter(|p| *p >= 0)?,
        offset: text(headers::SOURCE_OFFSET)
            .and_then(|v| v.parse().ok())
            .filter(|o| *o >= 0)?,
    })
}

/// The value of `msg`'s last header named `name`: `None` without one, `Some(None)` for one
/// without a value. Read by name from librdkafka, never through rdkafka's header iteration,
/// which panics on a header name that is not UTF-8: a producer may send any bytes there, and a
/// panic on a message would restart its partition at it, for good.
pub fn header<'m>(msg: &'m BorrowedMessage<'_>, name: &str) -> Option<Option<&'m [u8]>> {
    use rdkafka::bindings as rd;
    // The name, NUL-terminated, without an allocation (vault's header names are short).
    let mut buf = [0u8; 64];
    let bytes = name.as_bytes();
    if bytes.len() >= buf.len() || bytes.contains(&0) {
        return None;
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    let mut value: *const std::ffi::c_void = std::ptr::null();
    let mut size = 0usize;
    // SAFETY: `msg.ptr()` is a live message for `'m`; librdkafka parses its headers once and
    // keeps them with it, so the value found points into memory the message owns for `'m`.
    unsafe {
        if rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || hdrs.is_null()
        {
            return None;
        }
        if rd::rd_kafka_header_get_last(hdrs, buf.as_ptr().cast(), &mut value, &mut size)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return None;
        }
        Some((!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)))
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::BaseConsumer;

    use super::*;

    /// The origin `origin_in` reads from headers `pairs` (the last of a name wins).
    fn origin_of<'a>(pairs: &[(&str, &'a str)]) -> Option<Origin<'a>> {
        origin_in(|name| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.as_bytes())
        })
    }

    #[test]
    fn the_origin_is_read_from_the_source_headers_only_when_all_three_parse() {
        let full = origin_of(&[
            (crate::tools::dlq::REPLAYED_FROM, "a.dlq/0/5"),
            (headers::SOURCE_TOPIC, "a"),
            (headers::SOURCE_PARTITION, "3"),
            (headers::SOURCE_OFFSET, "42"),
        ]);
        assert_eq!(
            full,
            Some(Origin {
                topic: "a",
                partition: 3,
                offset: 42
            })
        );
        for partial in [
            origin_of(&[]),
            origin_of(&[
                (headers::SOURCE_TOPIC, "a"),
                (headers::SOURCE_PARTITION, "3"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, ""),
                (headers::SOURCE_PARTITION, "3"),
                (headers::SOURCE_OFFSET, "42"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, "a"),
                (headers::SOURCE_PARTITION, "three"),
                (headers::SOURCE_OFFSET, "42"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, "a"),
                (headers::SOURCE_PARTITION, "3"),
                (headers::SOURCE_OFFSET, "9223372036854775808"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, "a"),
                (headers::SOURCE_PARTITION, "-1"),
                (headers::SOURCE_OFFSET, "42"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, "a"),
                (headers::SOURCE_PARTITION, "3"),
                (headers::SOURCE_OFFSET, "-2"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, &"a".repeat(250)),
                (headers::SOURCE_PARTITION, "3"),
                (headers::SOURCE_OFFSET, "42"),
            ]),
            origin_of(&[
                (headers::SOURCE_TOPIC, "a/b"),
                (headers::SOURCE_PARTITION, "3"),
                (headers::SOURCE_OFFSET, "42"),
            ]),
        ] {
            assert_eq!(partial, None);
        }
    }

    #[test]
    fn a_fetch_size_given_under_its_alias_stands() {
        let mut config = crate::config::Config::default();
        config
            .kafka
            .options
            .insert("fetch.message.max.bytes".into(), "2097152".into());
        let cfg = consumer_config(&config.validate().unwrap(), 12);
        assert_eq!(cfg.get("max.partition.fetch.bytes"), None);
        assert_eq!(cfg.get("fetch.message.max.bytes"), Some("2097152"));
    }

    #[test]
    fn one_fetch_may_carry_the_whole_prefetch_budget() {
        let mut config = crate::config::Config::default();
        let settings = config.clone().validate().unwrap();
        let cfg = consumer_config(&settings, 12);
        assert_eq!(cfg.get("fetch.max.bytes"), Some("8388608"));
        assert_eq!(cfg.get("max.partition.fetch.bytes"), Some("698368"));
        // librdkafka refuses a fetch.max.bytes below message.max.bytes.
        config
            .kafka
            .options
            .insert("message.max.bytes".into(), "10000000".into());
        let settings = config.clone().validate().unwrap();
        assert_eq!(
            consumer_config(&settings, 12).get("fetch.max.bytes"),
            Some("10000000")
        );
        // And at most 512 bytes below receive.message.max.bytes, which librdkafka requires.
        config.kafka.options.remove("message.max.bytes");
        config
            .kafka
            .options
            .insert("receive.message.max.bytes".into(), "4000000".into());
        let settings = config.clone().validate().unwrap();
        assert_eq!(
            consumer_config(&settings, 12).get("fetch.max.bytes"),
            Some("3999488")
        );
        config.kafka.options.remove("receive.message.max.bytes");
        // The consumer librdkafka builds from it accepts it and keeps it as set (left unset,
        // it would lower it to one partition's share).
        let settings = config.validate().unwrap();
        let consumer: rdkafka::consumer::BaseConsumer = consumer_config(&settings, 12)
            .create()
            .expect("librdkafka accepts the configuration");
        drop(consumer);
    }

    #[test]
    fn the_prefetch_budget_is_shared_among_partitions() {
        assert_eq!(queued_kbytes_per_partition(256 << 20, 64), 4096);
        assert_eq!(
            queued_kbytes_per_partition(256 << 20, 12),
            8192,
            "capped at librdkafka's usual 8 MiB"
        );
        assert_eq!(
            queued_kbytes_per_partition(256 << 20, 10_000),
            64,
            "at least 64 KiB"
        );
        assert_eq!(queued_kbytes_per_partition(1 << 20, 0), 1024);
    }

    /// librdkafka is built with OpenSSL, so TLS and SASL/SCRAM options are accepted (a build
    /// without it refuses `security.protocol = SASL_SSL` when the client is created).
    #[test]
    fn tls_and_sasl_scram_are_built_in() {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "tls-check")
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "vault")
            .set("sasl.password", "secret");
        let created: Result<BaseConsumer, _> = cfg.create();
        assert!(created.is_ok(), "{:?}", created.err());
    }
}
