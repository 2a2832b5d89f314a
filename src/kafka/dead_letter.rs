//! The dead-letter sink: invalid events are published, with their original key and value and
//! headers describing the failure, to a dead-letter topic. A batch's offsets only count as done
//! once Kafka has acknowledged its dead letters (`acks=all`, idempotent producer).

use std::future::Future;
use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::pipeline::batch::DeadLetter;

/// Header names on dead-letter messages.
pub mod headers {
    pub const ERROR_KIND: &str = "vault.error.kind";
    pub const ERROR_MESSAGE: &str = "vault.error.message";
    pub const SOURCE_TOPIC: &str = "vault.source.topic";
    pub const SOURCE_PARTITION: &str = "vault.source.partition";
    pub const SOURCE_OFFSET: &str = "vault.source.offset";
    pub const SOURCE_TIMESTAMP: &str = "vault.source.timestamp";
    pub const VERSION: &str = "vault.version";
}

/// Where dead letters go.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Publishes every letter; `Ok` only when all are acknowledged.
    fn send(&self, letters: &[&DeadLetter]) -> impl Future<Output = Result<(), KafkaError>> + Send;
}

/// Publishes to Kafka.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic_template: String,
}

impl KafkaDeadLetters {
    pub fn new(base: &ClientConfig, topic_template: &str) -> Result<Self, KafkaError> {
        let mut cfg = base.clone();
        cfg.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        Ok(KafkaDeadLetters {
            producer: cfg.create()?,
            topic_template: topic_template.to_owned(),
        })
    }

    pub fn topic_for(&self, source_topic: &str) -> String {
        self.topic_template.replace("{topic}", source_topic)
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&self, letters: &[&DeadLetter]) -> Result<(), KafkaError> {
        let mut deliveries = Vec::with_capacity(letters.len());
        for d in letters {
            let topic = self.topic_for(&d.source.topic);
            let (partition, offset) = (d.source.partition.to_string(), d.source.offset.to_string());
            let timestamp = d
                .source
                .timestamp_ms
                .map(|t| t.to_string())
                .unwrap_or_default();
            let message = d.error.to_string();
            let hdrs = OwnedHeaders::new()
                .insert(Header {
                    key: headers::ERROR_KIND,
                    value: Some(d.error.kind()),
                })
                .insert(Header {
                    key: headers::ERROR_MESSAGE,
                    value: Some(&message),
                })
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(&*d.source.topic),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(&offset),
                })
                .insert(Header {
                    key: headers::SOURCE_TIMESTAMP,
                    value: Some(&timestamp),
                })
                .insert(Header {
                    key: headers::VERSION,
                    value: Some(env!("CARGO_PKG_VERSION")),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(hdrs);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &d.value {
                record = record.payload(v.as_slice());
            }
            if let Some(ts) = d.source.timestamp_ms {
                record = record.timestamp(ts);
            }
            // Enqueue now; a full queue fails the whole send, which the persister retries.
            deliveries.push(self.producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e),
                Err(_canceled) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }
}

/// Keeps dead letters in memory; can be told to fail. For tests.
#[derive(Clone, Default)]
pub struct MemoryDeadLetters {
    inner: Arc<Mutex<(Vec<DeadLetter>, u32)>>,
}

impl MemoryDeadLetters {
    /// Fails the next `n` sends.
    pub fn fail_next(&self, n: u32) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1 = n;
    }

    pub fn letters(&self) -> Vec<DeadLetter> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    async fn send(&self, letters: &[&DeadLetter]) -> Result<(), KafkaError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 > 0 {
            g.1 -= 1;
            return Err(KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure,
            ));
        }
        g.0.extend(letters.iter().map(|d| (*d).clone()));
        Ok(())
    }
}
