//! The dead-letter sink: invalid events are published, with their original key and value and
//! headers describing the failure, to a dead-letter topic. A batch's offsets only count as done
//! once Kafka has acknowledged its dead letters (`acks=all`, idempotent producer).
//!
//! Invariants kept here:
//! - a dead letter fits what the dead-letter topic accepts: the value is cut to
//!   `kafka.dead_letter_max_bytes` (with headers for its original size and SHA-256, and
//!   `vault.value.truncated=true`), and cut further, down to nothing, when Kafka still refuses
//!   it as too large; the key is cut to 16 KiB, and the producer batches at most
//!   `kafka.dead_letter_max_bytes` at once, so a burst of small letters is never refused as one
//!   batch too large (only a topic whose limit is below the key and headers alone refuses a
//!   letter for good). The `vault.source.*` headers locate the full value in the source topic;
//! - header texts are bounded, so no piece of the input of unbounded size is ever echoed;
//! - a letter is dated when it is produced; its source's timestamp is in
//!   `vault.source.timestamp`. Dated by its source, the letter of an old message (a lagging or
//!   new group) could be deleted by the dead-letter topic's retention as soon as it is written,
//!   and one of a message from the future refused by the topic's timestamp bounds;
//! - produce errors are classified once, in [`is_permanent`]; a producer that hit a fatal
//!   error fails every later send, so it is replaced (`KafkaDeadLetters::renew`), not retried;
//! - a send reports which letters were not acknowledged, so a retry sends only those;
//! - a letter is acknowledged only by its delivery report, which the producer's own polling
//!   thread ([`Polled`]) hands to the send awaiting it. A send holds the producer it used until
//!   every letter has its report, so a producer never closes under a waiting send; librdkafka
//!   reports every letter, as an error at the latest after `message.timeout.ms`. A report lost
//!   in this process (a panic in the polling thread, which polls on) reads as not acknowledged
//!   a few seconds after that bound.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::oneshot;

use crate::kafka::options;
use crate::pipeline::batch::DeadLetter;

/// Header names on dead-letter messages.
pub mod headers {
    pub const ERROR_KIND: &str = "vault.error.kind";
    pub const ERROR_MESSAGE: &str = "vault.error.message";
    pub const SOURCE_TOPIC: &str = "vault.source.topic";
    pub const SOURCE_PARTITION: &str = "vault.source.partition";
    pub const SOURCE_OFFSET: &str = "vault.source.offset";
    pub const SOURCE_TIMESTAMP: &str = "vault.source.timestamp";
    /// Where a letter's message was read, when that is not its source (a message `vault dlq
    /// replay` re-published names its original as the source): topic, partition and offset.
    pub const READ_TOPIC: &str = "vault.read.topic";
    pub const READ_PARTITION: &str = "vault.read.partition";
    pub const READ_OFFSET: &str = "vault.read.offset";
    pub const VERSION: &str = "vault.version";
    /// `true` when the value (or key) was cut to fit; absent otherwise.
    pub const VALUE_TRUNCATED: &str = "vault.value.truncated";
    /// Size in bytes of the whole original value, when it was cut.
    pub const VALUE_SIZE: &str = "vault.value.size";
    /// Hex SHA-256 of the whole original value, when it was cut.
    pub const VALUE_SHA256: &str = "vault.value.sha256";
    /// `true` when the key was cut to fit; absent otherwise.
    pub const KEY_TRUNCATED: &str = "vault.key.truncated";
}

/// Longest error message put in a header, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Longest key kept on a dead letter, in bytes.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Room left in a letter for headers and Kafka's record framing.
const HEADROOM_BYTES: usize = 8 * 1024;

/// A send in which some letters were not acknowledged.
#[derive(Debug, Clone)]
pub struct SendFailure {
    /// A permanent error if any letter met one (see [`is_permanent`]), else the first error.
    pub error: KafkaError,
    /// Whether some letter was refused for good: retrying cannot help it.
    pub permanent: bool,
    /// Indices (into the slice given to `send`) of the letters not acknowledged.
    pub unsent: Vec<usize>,
}

impl SendFailure {
    /// A failure of every letter.
    pub fn all(error: KafkaError, len: usize) -> Self {
        SendFailure {
            permanent: is_permanent(&error),
            error,
            unsent: (0..len).collect(),
        }
    }
}

/// Where dead letters go.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Publishes every letter; `Ok` only when all are acknowledged, else which were not.
    fn send(&self, letters: &[&DeadLetter])
        -> impl Future<Output = Result<(), SendFailure>> + Send;
}

/// Produce errors that will not go away by sending the same letter again: the letter is too
/// large for the topic even with its value cut away, the topic does not exist or may not be
/// written, or Kafka refuses the record as such. Everything else (timeouts, a broker down, a
/// full queue, leadership moving, a record corrupted on its way, which Kafka calls retriable;
/// old brokers also answer so a keyless record on a compacted topic, which then stalls its
/// partition loudly as retries go on) is transient and retried.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidRecord
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::InvalidTopic
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::UnknownPartition
                | C::InvalidRequiredAcks
                | C::PolicyViolation
        )
    )
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// The value budget to try after Kafka refused a letter whose value was cut to `budget` bytes:
/// a quarter of it, and nothing once that is under 1 KiB; `None` when nothing was left to cut.
pub fn smaller_value_budget(budget: usize) -> Option<usize> {
    match budget {
        0 => None,
        b if b / 4 < 1024 => Some(0),
        b => Some(b / 4),
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// A dead letter as it is published: key and value cut to fit, and its headers.
pub struct Letter<'a> {
    pub topic: String,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: OwnedHeaders,
}

/// Shapes `d` for `topic` with at most `value_budget` bytes of value.
pub fn shape<'a>(d: &'a DeadLetter, topic: String, value_budget: usize) -> Letter<'a> {
    let message = d.error.to_string();
    let message = bounded(&message, MAX_ERROR_MESSAGE_BYTES);
    // A replayed message that fails again names its original coordinates, not the replay's.
    let (source_topic, partition, offset) = match &d.origin {
        Some((t, p, o)) => (t.as_str(), p.to_string(), o.to_string()),
        None => (
            &*d.source.topic,
            d.source.partition.to_string(),
            d.source.offset.to_string(),
        ),
    };
    let timestamp = d
        .source
        .timestamp_ms
        .map(|t| t.to_string())
        .unwrap_or_default();
    let mut hdrs = OwnedHeaders::new_with_capacity(10);
    for (key, value) in [
        (headers::ERROR_KIND, d.error.kind()),
        (headers::ERROR_MESSAGE, &*message),
        (headers::SOURCE_TOPIC, source_topic),
        (headers::SOURCE_PARTITION, &partition),
        (headers::SOURCE_OFFSET, &offset),
        (headers::SOURCE_TIMESTAMP, &timestamp),
        (headers::VERSION, env!("CARGO_PKG_VERSION")),
    ] {
        hdrs = hdrs.insert(Header {
            key,
            value: Some(value),
        });
    }
    if d.origin.is_some() {
        // The message read (a replay's copy) stays findable, by an operator, after the original
        // has aged out (`dlq replay` reads the original's coordinates only).
        let (partition, offset) = (d.source.partition.to_string(), d.source.offset.to_string());
        for (key, value) in [
            (headers::READ_TOPIC, &*d.source.topic),
            (headers::READ_PARTITION, &partition),
            (headers::READ_OFFSET, &offset),
        ] {
            hdrs = hdrs.insert(Header {
                key,
                value: Some(value),
            });
        }
    }
    let key = d.key.as_deref().map(|k| &k[..k.len().min(MAX_KEY_BYTES)]);
    if d.key.as_ref().is_some_and(|k| k.len() > MAX_KEY_BYTES) {
        hdrs = hdrs.insert(Header {
            key: headers::KEY_TRUNCATED,
            value: Some("true"),
        });
    }
    let value = d.value.as_deref();
    let value = match value {
        Some(v) if v.len() > value_budget => {
            let digest = openssl::sha::sha256(v);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            hdrs = hdrs
                .insert(Header {
                    key: headers::VALUE_TRUNCATED,
                    value: Some("true"),
                })
                .insert(Header {
                    key: headers::VALUE_SIZE,
                    value: Some(&v.len().to_string()),
                })
                .insert(Header {
                    key: headers::VALUE_SHA256,
                    value: Some(&hex),
                });
            Some(&v[..value_budget])
        }
        other => other,
    };
    Letter {
        topic,
        key,
        value,
        headers: hdrs,
    }
}

/// Publishes to Kafka.
pub struct KafkaDeadLetters {
    /// The producer's settings, to replace it after a fatal error.
    config: ClientConfig,
    /// The producer in use, and whether it replaced one that hit a fatal error and has had no
    /// letter acknowledged since; never held across an await.
    producer: Mutex<InUse>,
    topic_template: String,
    /// Bytes of value a letter may carry at first.
    value_budget: usize,
}

/// librdkafka's bound on the time from a letter's send to its delivery report
/// (`message.timeout.ms`, vault's whatever the user set).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaDeadLetters {
    /// `max_bytes` is the largest message the dead-letter topic and the producer accept
    /// (`kafka.dead_letter_max_bytes`); the producer's `message.max.bytes` is raised to it.
    pub fn new(
        base: &ClientConfig,
        topic_template: &str,
        max_bytes: usize,
    ) -> Result<Self, KafkaError> {
        let mut cfg = base.clone();
        // Under whichever name the user gave them, these are vault's: a letter is durable
        // (acknowledged by every in-sync replica, never duplicated by a retry) before its
        // offset may be committed.
        for (name, value) in [
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            (
                "message.timeout.ms",
                &MESSAGE_TIMEOUT.as_millis().to_string(),
            ),
        ] {
            options::set_owned(&mut cfg, name, value);
        }
        if cfg.get("message.max.bytes").is_none() {
            cfg.set("message.max.bytes", max_bytes.max(1000).to_string());
        }
        // A batch of letters is one record batch to the broker, which refuses it whole past the
        // topic's limit: never more than one letter's worth at once.
        if cfg.get("batch.size").is_none() {
            cfg.set("batch.size", max_bytes.clamp(1000, 1_000_000).to_string());
        }
        Ok(KafkaDeadLetters {
            producer: Mutex::new(InUse {
                producer: Arc::new(ClosedAside::new(Polled::new(&cfg)?)),
                untried: false,
            }),
            config: cfg,
            topic_template: topic_template.to_owned(),
            value_budget: max_bytes.saturating_sub(MAX_KEY_BYTES + HEADROOM_BYTES),
        })
    }

    pub fn topic_for(&self, source_topic: &str) -> String {
        self.topic_template.replace("{topic}", source_topic)
    }

    fn in_use(&self) -> std::sync::MutexGuard<'_, InUse> {
        self.producer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A letter sent with `producer` went through: if still in use, it works.
    fn delivered_with(&self, producer: &Arc<ClosedAside>) {
        let mut in_use = self.in_use();
        if Arc::ptr_eq(&in_use.producer, producer) {
            in_use.untried = false;
        }
    }

    /// Replaces `failed`, a producer that hit a fatal error, unless another send replaced it
    /// already. librdkafka fails every later send of a fatal (idempotent) producer, so without
    /// a new one every partition with bad input would stall for good. The new producer has a
    /// new producer id; letters sent again may land twice, which a replay of them makes
    /// harmless. Whether the failure is for good: `failed` was itself a replacement that had
    /// no letter through (as each new one would, say, refused its idempotent producer id), or
    /// no new producer can be made.
    fn renew(&self, failed: &Arc<ClosedAside>) -> bool {
        let mut in_use = self.in_use();
        if !Arc::ptr_eq(&in_use.producer, failed) {
            return false; // Replaced already; the new one is still to be tried.
        }
        let again = in_use.untried;
        match Polled::new(&self.config) {
            Ok(fresh) => {
                tracing::error!(
                    reason = ?failed.client().fatal_error(),
                    again,
                    "The dead-letter producer hit a fatal error; replaced it with a new one."
                );
                in_use.producer.retired.store(true, Ordering::Relaxed);
                *in_use = InUse {
                    producer: Arc::new(ClosedAside::new(fresh)),
                    untried: true,
                };
                again
            }
            Err(e) => {
                tracing::error!(error = %e, "The dead-letter producer hit a fatal error and cannot be replaced.");
                true
            }
        }
    }
}

/// Hands each letter's delivery report to the send awaiting it.
struct Acks;

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<oneshot::Sender<KafkaResult<()>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        #[cfg(feature = "failpoints")]
        {
            let topic = match result {
                Ok(m) | Err((_, m)) => rdkafka::Message::topic(m),
            };
            if crate::failpoint::hit("dead_letter::report", topic, None) {
                panic!("failpoint dead_letter::report");
            }
        }
        // A send that stopped waiting (its batch was cancelled) is told nothing.
        let _ = ack.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// How long a send waits for a letter's delivery report past librdkafka's own bound
/// (`message.timeout.ms`), before it reads the letter as not acknowledged. librdkafka reports
/// every letter within its bound; this only bounds a report lost in this process (a panic while
/// the polling thread handed out the reports of one poll loses those after it).
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// The outcome of one letter: its delivery report, or not acknowledged when none comes within
/// `within` (see [`REPORT_GRACE`]) or its sender is gone.
async fn report(delivery: oneshot::Receiver<KafkaResult<()>>, within: Duration) -> KafkaResult<()> {
    match tokio::time::timeout(within, delivery).await {
        Ok(Ok(outcome)) => outcome,
        // Every sender is answered, dropped with its receiver when the letter was not queued,
        // or dropped unanswered by a panic in the polling thread: not acknowledged.
        Ok(Err(_closed)) => Err(KafkaError::Canceled),
        Err(_elapsed) => Err(KafkaError::Canceled),
    }
}

/// How long one call of the polling thread waits for delivery reports. librdkafka waits in
/// whole milliseconds and rdkafka rounds what is left of a wait down, polling without waiting
/// until the wait is over: a wait of exactly 100 ms (rdkafka's `ThreadedProducer`) ends in up
/// to a millisecond of polling in a loop, 1% of a core, idle or not. With 100 µs more, in a
/// wait that no event cuts short, that stretch is at most 100 µs, and mostly overslept (after
/// an event, what is left of the wait may end in up to a millisecond of it, as before).
const POLL_WAIT: Duration = Duration::from_micros(100_100);

/// A producer and the thread that serves its delivery reports (`vault-dlq-poll`). Dropping it
/// stops the thread (within one [`POLL_WAIT`] and the reports in hand), then closes the
/// producer: it purges what is still queued or in flight (letters of cancelled sends only: a
/// waiting send holds the producer) and flushes for up to 500 ms.
struct Polled {
    producer: Arc<BaseProducer<Acks>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Polled {
    fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let producer = Arc::new(config.create_with_context::<_, BaseProducer<Acks>>(Acks)?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("vault-dlq-poll".into())
            .spawn({
                let (producer, stop) = (producer.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        // A panic handing out reports must not stop the thread: every later
                        // report would be lost. The reports of that poll's other letters may
                        // be; their sends read them as not acknowledged after a bound.
                        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            producer.poll(POLL_WAIT)
                        }));
                        if polled.is_err() {
                            tracing::error!(
                                "The dead-letter producer's polling thread caught a panic while \
                                 handing out delivery reports; it polls on, and the letters \
                                 whose reports were lost are sent again."
                            );
                        }
                    }
                }
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!(
                    "cannot start the dead-letter producer's polling thread: {e}"
                ))
            })?;
        Ok(Polled {
            producer,
            stop,
            thread: Some(thread),
        })
    }
}

impl std::ops::Deref for Polled {
    type Target = BaseProducer<Acks>;

    fn deref(&self) -> &BaseProducer<Acks> {
        &self.producer
    }
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The producer closes with this, its last handle.
    }
}

/// A producer, closed where its last handle goes, or, once [`KafkaDeadLetters::renew`] has
/// retired it, on a thread of its own: closing joins its polling thread, purges, flushes for
/// up to 500 ms and destroys the client, and the last handle of a failed producer is dropped
/// by a send on the store's runtime, which may have a single thread (`store::runtime`). The
/// producer in use closes where it is dropped (at shutdown, after the last write), so the
/// process never exits while it closes. Creating one starts threads and returns; it does not
/// wait on the network.
struct ClosedAside {
    producer: Option<Polled>,
    retired: AtomicBool,
}

impl ClosedAside {
    fn new(producer: Polled) -> Self {
        ClosedAside {
            producer: Some(producer),
            retired: AtomicBool::new(false),
        }
    }
}

impl std::ops::Deref for ClosedAside {
    type Target = BaseProducer<Acks>;

    fn deref(&self) -> &BaseProducer<Acks> {
        self.producer.as_ref().expect("present until dropped")
    }
}

impl Drop for ClosedAside {
    fn drop(&mut self) {
        let Some(producer) = self.producer.take() else {
            return;
        };
        if self.retired.load(Ordering::Relaxed) {
            // When no thread can be started, the closure and the producer are dropped here.
            let _ = std::thread::Builder::new()
                .name("vault-dlq-close".into())
                .spawn(move || drop(producer));
        }
    }
}

/// The dead-letter producer in use.
struct InUse {
    producer: Arc<ClosedAside>,
    /// It replaced one that hit a fatal error and has had no letter through yet.
    untried: bool,
}

/// Failpoint `dead_letter::fatal`: raises a real librdkafka fatal error in the dead-letter
/// producer, as a broken idempotent sequence would.
#[cfg(feature = "failpoints")]
fn inject_fatal_error(producer: &BaseProducer<Acks>, topic: &str) {
    if crate::failpoint::hit("dead_letter::fatal", topic, None) {
        // SAFETY: the client pointer is valid while `producer` lives; the reason is a
        // NUL-terminated static string.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                c"failpoint dead_letter::fatal".as_ptr(),
            );
        }
    }
}

#[cfg(not(feature = "failpoints"))]
fn inject_fatal_error(_producer: &BaseProducer<Acks>, _topic: &str) {}

impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letters: &[&DeadLetter]) -> Result<(), SendFailure> {
        let producer = self.in_use().producer.clone();
        if let Some(d) = letters.first() {
            inject_fatal_error(&producer, &d.source.topic);
        }
        let mut budgets = vec![self.value_budget; letters.len()];
        let mut todo: Vec<usize> = (0..letters.len()).collect();
        let mut unsent = Vec::new();
        let mut first_error = None;
        // Each round sends what is left; a letter refused as too large goes again, smaller.
        while !todo.is_empty() {
            let mut deliveries = Vec::with_capacity(todo.len());
            let mut outcomes = Vec::with_capacity(todo.len());
            for &i in &todo {
                let d = letters[i];
                if crate::failpoint::hit(
                    "dead_letter::produce",
                    &d.source.topic,
                    Some(d.source.offset),
                ) {
                    outcomes.push((
                        i,
                        Err(KafkaError::MessageProduction(
                            RDKafkaErrorCode::BrokerTransportFailure,
                        )),
                    ));
                    continue;
                }
                let letter = shape(d, self.topic_for(&d.source.topic), budgets[i]);
                let (ack, acked) = oneshot::channel();
                let mut record: BaseRecord<'_, [u8], [u8], _> =
                    BaseRecord::with_opaque_to(&letter.topic, Box::new(ack))
                        .headers(letter.headers);
                if let Some(k) = letter.key {
                    record = record.key(k);
                }
                if let Some(v) = letter.value {
                    record = record.payload(v);
                }
                match producer.send(record) {
                    Ok(()) => deliveries.push((i, acked)),
                    Err((e, _)) => outcomes.push((i, Err(e))),
                }
            }
            // Every letter queued by now: librdkafka reports each within its bound from here.
            let deadline = tokio::time::Instant::now() + MESSAGE_TIMEOUT + REPORT_GRACE;
            for (i, delivery) in deliveries {
                let within = deadline.saturating_duration_since(tokio::time::Instant::now());
                let outcome = report(delivery, within).await;
                if outcome.is_ok() {
                    // At the first acknowledgement: the producer works.
                    self.delivered_with(&producer);
                }
                outcomes.push((i, outcome));
            }
            todo.clear();
            for (i, outcome) in outcomes {
                let Err(e) = outcome else { continue };
                match is_too_large(&e)
                    .then(|| smaller_value_budget(budgets[i]))
                    .flatten()
                {
                    Some(smaller) => {
                        budgets[i] = smaller;
                        todo.push(i);
                    }
                    None => {
                        unsent.push(i);
                        // Every letter's error is classified: a permanent one is reported.
                        let keep = first_error
                            .as_ref()
                            .is_none_or(|f: &KafkaError| !is_permanent(f) && is_permanent(&e));
                        if keep {
                            first_error = Some(e);
                        }
                    }
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(error) => {
                unsent.sort_unstable();
                Err(SendFailure {
                    // A fatal producer is replaced: its letters go again with the new one. One
                    // that fails so before any letter of it is acknowledged (say, refused the
                    // idempotent producer's id) will again: that is a refusal for good.
                    permanent: is_permanent(&error)
                        || (producer.client().fatal_error().is_some() && self.renew(&producer)),
                    error,
                    unsent,
                })
            }
        }
    }
}

/// Keeps dead letters in memory; can be told to fail. For tests.
#[derive(Clone, Default)]
pub struct MemoryDeadLetters {
    inner: Arc<Mutex<MemoryLetters>>,
}

#[derive(Default)]
struct MemoryLetters {
    letters: Vec<DeadLetter>,
    /// Sends still to fail entirely.
    fail_next: u32,
    /// Sends still to fail after acknowledging their first letter only.
    fail_after_first: u32,
    /// Refuse, as permanently too large, letters of source offsets in this list.
    refuse: Vec<i64>,
}

impl MemoryDeadLetters {
    /// Fails the next `n` sends.
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// The next `n` sends acknowledge their first letter and fail the rest.
    pub fn fail_after_first(&self, n: u32) {
        self.lock().fail_after_first = n;
    }

    /// Refuses the letter of this source offset as too large, until [`Self::accept_all`].
    pub fn refuse_offset(&self, offset: i64) {
        self.lock().refuse.push(offset);
    }

    pub fn accept_all(&self) {
        self.lock().refuse.clear();
    }

    pub fn letters(&self) -> Vec<DeadLetter> {
        self.lock().letters.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryLetters> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    async fn send(&self, letters: &[&DeadLetter]) -> Result<(), SendFailure> {
        let mut g = self.lock();
        if g.fail_next > 0 {
            g.fail_next -= 1;
            return Err(SendFailure::all(
                KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure),
                letters.len(),
            ));
        }
        if g.fail_after_first > 0 && letters.len() > 1 {
            g.fail_after_first -= 1;
            g.letters.push(letters[0].clone());
            return Err(SendFailure {
                error: KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure),
                permanent: false,
                unsent: (1..letters.len()).collect(),
            });
        }
        let mut unsent = Vec::new();
        for (i, d) in letters.iter().enumerate() {
            if g.refuse.contains(&d.source.offset) {
                unsent.push(i);
            } else {
                g.letters.push((*d).clone());
            }
        }
        if unsent.is_empty() {
            Ok(())
        } else {
            Err(SendFailure {
                error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                permanent: true,
                unsent,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rdkafka::message::Headers;

    use super::*;
    use crate::event::{EventError, Source};

    fn letter(value: Vec<u8>, key: Vec<u8>, error: EventError) -> DeadLetter {
        DeadLetter {
            origin: None,
            source: Source {
                topic: Arc::from("activity"),
                partition: 2,
                offset: 77,
                timestamp_ms: Some(1_764_000_000_000),
            },
            key: Some(key),
            value: Some(value),
            error,
        }
    }

    /// A report lost in this process (its sender leaked by a panic mid-poll) reads as not
    /// acknowledged once librdkafka's bound and the grace have passed, not never; a report that
    /// comes is taken as it is.
    #[tokio::test(start_paused = true)]
    async fn a_report_that_never_comes_reads_as_not_acknowledged_after_the_bound() {
        let within = MESSAGE_TIMEOUT + REPORT_GRACE;
        let (lost, never) = oneshot::channel::<KafkaResult<()>>();
        let waiting = tokio::spawn(report(never, within));
        tokio::time::sleep(within - Duration::from_millis(1)).await;
        assert!(!waiting.is_finished(), "waits out librdkafka's bound");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(matches!(waiting.await.unwrap(), Err(KafkaError::Canceled)));
        drop(lost);

        let (ack, acked) = oneshot::channel();
        ack.send(Ok(())).unwrap();
        assert!(report(acked, within).await.is_ok());
        let (ack, refused) = oneshot::channel();
        ack.send(Err(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        )))
        .unwrap();
        assert!(is_too_large(&report(refused, within).await.unwrap_err()));
        let (dropped, closed) = oneshot::channel::<KafkaResult<()>>();
        drop(dropped);
        assert!(matches!(
            report(closed, within).await,
            Err(KafkaError::Canceled)
        ));
    }

    #[test]
    fn the_producer_keeps_its_durability_whatever_name_the_user_gave_an_option() {
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", "127.0.0.1:1")
            .set("request.required.acks", "0")
            .set("delivery.timeout.ms", "100")
            .set("queue.buffering.max.ms", "1000");
        // With acks=0 left beside acks=all, librdkafka would refuse the idempotent producer
        // or take acks=0, by the luck of a HashMap's order.
        let letters = KafkaDeadLetters::new(&base, "{topic}.dlq", 1_000_000).expect("producer");
        for (name, alias, value) in [
            ("acks", "request.required.acks", "all"),
            ("message.timeout.ms", "delivery.timeout.ms", "30000"),
            ("linger.ms", "queue.buffering.max.ms", "5"),
        ] {
            assert_eq!(letters.config.get(name), Some(value), "{name}");
            assert_eq!(letters.config.get(alias), None, "{alias}");
        }
    }

    fn header<'a>(l: &'a Letter<'_>, name: &str) -> Option<&'a str> {
        l.headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| std::str::from_utf8(v).expect("utf-8 header"))
    }

    #[test]
    fn a_letter_of_a_replayed_message_names_its_original_and_where_it_was_read() {
        let mut d = letter(b"{".to_vec(), b"k".to_vec(), EventError::Json("eof".into()));
        let plain = shape(&d, "activity.dlq".into(), 1000);
        assert_eq!(header(&plain, headers::SOURCE_OFFSET), Some("77"));
        assert_eq!(header(&plain, headers::READ_OFFSET), None);
        d.origin = Some(("orders".into(), 0, 5));
        let replayed = shape(&d, "activity.dlq".into(), 1000);
        assert_eq!(header(&replayed, headers::SOURCE_TOPIC), Some("orders"));
        assert_eq!(header(&replayed, headers::SOURCE_PARTITION), Some("0"));
        assert_eq!(header(&replayed, headers::SOURCE_OFFSET), Some("5"));
        assert_eq!(header(&replayed, headers::READ_TOPIC), Some("activity"));
        assert_eq!(header(&replayed, headers::READ_PARTITION), Some("2"));
        assert_eq!(header(&replayed, headers::READ_OFFSET), Some("77"));
    }

    #[test]
    fn a_large_value_is_cut_to_fit_with_its_size_and_digest() {
        let value = vec![b'x'; 1_500_000];
        let d = letter(
            value.clone(),
            vec![b'k'; 100_000],
            EventError::TooLarge {
                size: 1_500_000,
                limit: 1 << 20,
            },
        );
        let l = shape(&d, "activity.dlq".into(), 900_000);
        assert_eq!(l.value.map(<[u8]>::len), Some(900_000));
        assert_eq!(l.key.map(<[u8]>::len), Some(MAX_KEY_BYTES));
        assert_eq!(header(&l, headers::VALUE_TRUNCATED), Some("true"));
        assert_eq!(header(&l, headers::KEY_TRUNCATED), Some("true"));
        assert_eq!(header(&l, headers::VALUE_SIZE), Some("1500000"));
        let digest: String = openssl::sha::sha256(&value)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(header(&l, headers::VALUE_SHA256), Some(digest.as_str()));
        assert_eq!(header(&l, headers::SOURCE_OFFSET), Some("77"));
        assert_eq!(header(&l, headers::ERROR_KIND), Some("too_large"));

        let small = letter(b"{}".to_vec(), b"k".to_vec(), EventError::NotAnObject);
        let l = shape(&small, "activity.dlq".into(), 900_000);
        assert_eq!(l.value, Some(&b"{}"[..]));
        assert_eq!(header(&l, headers::VALUE_TRUNCATED), None);
    }

    #[test]
    fn a_replayed_message_that_fails_again_names_its_original_coordinates() {
        let mut d = letter(b"{".to_vec(), Vec::new(), EventError::Json("eof".into()));
        d.origin = Some(("activity".into(), 5, 1234));
        let l = shape(&d, "activity.dlq".into(), 900_000);
        assert_eq!(header(&l, headers::SOURCE_TOPIC), Some("activity"));
        assert_eq!(header(&l, headers::SOURCE_PARTITION), Some("5"));
        assert_eq!(header(&l, headers::SOURCE_OFFSET), Some("1234"));
    }

    #[test]
    fn error_messages_in_headers_are_bounded() {
        let reason = "9".repeat(520_000);
        let d = letter(
            b"{}".to_vec(),
            Vec::new(),
            EventError::InvalidField {
                field: "occurred_at",
                reason,
            },
        );
        let l = shape(&d, "t.dlq".into(), 900_000);
        let message = header(&l, headers::ERROR_MESSAGE).unwrap();
        assert!(
            message.len() <= MAX_ERROR_MESSAGE_BYTES,
            "{}",
            message.len()
        );
        assert!(
            message.starts_with("field 'occurred_at' is invalid"),
            "{message}"
        );
        assert_eq!(bounded("hello world", 8), "hello…");
        assert_eq!(bounded("ééééé", 6), "é…", "cut on a character boundary");
        assert_eq!(bounded("short", 8), "short");
    }

    #[test]
    fn a_refused_letter_shrinks_to_nothing_in_a_few_steps() {
        let mut budget = 900_000;
        let mut steps = 0;
        while let Some(b) = smaller_value_budget(budget) {
            assert!(b < budget);
            budget = b;
            steps += 1;
        }
        assert_eq!(budget, 0);
        assert!(steps <= 8, "{steps}");
    }

    #[test]
    fn produce_errors_are_classified_once() {
        let permanent = [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ];
        for code in permanent {
            assert!(
                is_permanent(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        let transient = [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            // CORRUPT_MESSAGE: a CRC that did not match on the way, retriable in Kafka.
            RDKafkaErrorCode::InvalidMessage,
        ];
        for code in transient {
            assert!(
                !is_permanent(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
    }
}
