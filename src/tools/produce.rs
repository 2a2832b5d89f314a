//! `vault produce`: a load generator of realistic user-activity events.
//!
//! Users follow a Zipf distribution (a few very active users, a long tail), event types a
//! weighted mix with type-specific attributes; messages are keyed by `user_id`. Optionally a
//! fraction of messages re-send an earlier event (same `event_id`: must be stored once) or are
//! invalid in one of several ways (must be dead-lettered). Every delivered message is recorded
//! for `vault verify`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use futures::stream::{FuturesUnordered, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::time::Instant;

use crate::tools::progress::Progress;
use crate::tools::record::{self, Produced};

#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub topic: String,
    pub count: u64,
    /// Events per second; `None` as fast as the broker takes them.
    pub rate: Option<f64>,
    pub users: u64,
    /// Zipf exponent of user activity.
    pub skew: f64,
    /// Fraction of messages that re-send an earlier event.
    pub duplicates: f64,
    /// Fraction of messages that are invalid.
    pub invalid: f64,
    pub record: Option<PathBuf>,
    pub seed: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ProduceSummary {
    pub sent: u64,
    pub valid: u64,
    pub duplicates: u64,
    pub invalid: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-3);
        write!(
            f,
            "produced {} messages ({} valid, {} duplicates, {} invalid), {:.1} MiB in {:.1}s: {:.0} events/s",
            self.sent,
            self.valid,
            self.duplicates,
            self.invalid,
            self.bytes as f64 / (1024.0 * 1024.0),
            secs,
            self.sent as f64 / secs
        )
    }
}

const TYPES: [(&str, u32); 6] = [
    ("page_view", 50),
    ("click", 25),
    ("search", 10),
    ("add_to_cart", 8),
    ("purchase", 4),
    ("login", 3),
];

/// Invalid messages, one of each kind in turn: what `verify` expects in the dead-letter topic.
const INVALID: [&[u8]; 7] = [
    b"{not json",
    br#"{"event_type":"click","occurred_at":"2025-11-24T10:00:00Z"}"#,
    br#"{"user_id":"u-bad","event_type":"click","occurred_at":"yesterday"}"#,
    b"[1,2,3]",
    br#"{"user_id":"","event_type":"click","occurred_at":"2025-11-24T10:00:00Z"}"#,
    b"\xff\xfe{}",
    br#"{"user_id":"u-bad","event_type":"click","occurred_at":"1970-01-01T00:00:00Z"}"#,
];

struct Generator {
    rng: StdRng,
    users: Zipf<f64>,
    recent: VecDeque<(String, Vec<u8>, uuid::Uuid, i64)>,
    invalid_n: usize,
}

enum Message {
    Valid {
        user: String,
        value: Vec<u8>,
        id: uuid::Uuid,
        day: i64,
        dup: bool,
    },
    Invalid(Vec<u8>),
}

impl Generator {
    fn next(&mut self, opts: &ProduceOptions) -> Message {
        let roll: f64 = self.rng.random();
        if roll < opts.invalid {
            let v = INVALID[self.invalid_n % INVALID.len()].to_vec();
            self.invalid_n += 1;
            return Message::Invalid(v);
        }
        if roll < opts.invalid + opts.duplicates && !self.recent.is_empty() {
            let i = self.rng.random_range(0..self.recent.len());
            let (user, value, id, day) = self.recent[i].clone();
            return Message::Valid {
                user,
                value,
                id,
                day,
                dup: true,
            };
        }
        let user = format!("user-{:07}", self.users.sample(&mut self.rng) as u64);
        let total: u32 = TYPES.iter().map(|t| t.1).sum();
        let mut pick = self.rng.random_range(0..total);
        let kind = TYPES
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or("page_view", |t| t.0);
        let n: u32 = self.rng.random_range(1..10_000);
        let attributes = match kind {
            "page_view" => format!(
                r#"{{"page":"/products/{n}","referrer":"{}","device":"{}"}}"#,
                ["google", "direct", "newsletter", "partner"][n as usize % 4],
                ["ios", "android", "web"][n as usize % 3]
            ),
            "click" => format!(
                r#"{{"element":"button-{}","page":"/products/{n}"}}"#,
                n % 40
            ),
            "search" => format!(
                r#"{{"query":"{} {}","results":{}}}"#,
                ["red", "blue", "large", "cheap"][n as usize % 4],
                ["shoes", "lamp", "desk"][n as usize % 3],
                n % 200
            ),
            "add_to_cart" | "purchase" => format!(
                r#"{{"sku":"SKU-{n}","price_cents":{},"currency":"EUR"}}"#,
                99 + n % 20_000
            ),
            _ => format!(r#"{{"method":"{}"}}"#, ["password", "sso"][n as usize % 2]),
        };
        let now = chrono::Utc::now().timestamp_millis();
        let occurred = now - self.rng.random_range(0..300_000);
        let at = DateTime::from_timestamp_millis(occurred)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let id = uuid::Builder::from_random_bytes(self.rng.random()).into_uuid();
        let value = format!(r#"{{"event_id":"{id}","user_id":"{user}","event_type":"{kind}","occurred_at":"{at}","attributes":{attributes}}}"#).into_bytes();
        let day = occurred.div_euclid(86_400_000);
        if self.recent.len() == 1000 {
            self.recent.pop_front();
        }
        self.recent
            .push_back((user.clone(), value.clone(), id, day));
        Message::Valid {
            user,
            value,
            id,
            day,
            dup: false,
        }
    }
}

/// Produces `opts.count` messages and returns the summary.
pub async fn produce(base: &ClientConfig, opts: &ProduceOptions) -> Result<ProduceSummary, String> {
    if let Some(rate) = opts.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(format!(
            "--rate {rate}: give a rate above 0, or none for no limit"
        ));
    }
    let mut cfg = base.clone();
    for (name, value) in [
        ("linger.ms", "10"),
        ("batch.num.messages", "10000"),
        ("acks", "all"),
        ("enable.idempotence", "true"),
    ] {
        crate::kafka::options::set_owned(&mut cfg, name, value);
    }
    crate::kafka::options::set_default(&mut cfg, "compression.type", "lz4");
    let producer: FutureProducer = cfg
        .create()
        .map_err(|e| format!("cannot create the producer: {e}"))?;
    let users = Zipf::new(opts.users.max(1) as f64, opts.skew.max(0.01))
        .map_err(|e| format!("bad --users/--skew: {e}"))?;
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(opts.seed),
        users,
        recent: VecDeque::new(),
        invalid_n: 0,
    };
    let mut writer = match &opts.record {
        Some(p) => Some(
            record::Writer::create(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let mut summary = ProduceSummary::default();
    let mut progress = Progress::new("produce", Some(opts.count));
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut delivered = 0u64;
    for i in 0..opts.count {
        if let Some(rate) = opts.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        let msg = generator.next(opts);
        let (key, value, rec) = match msg {
            Message::Valid {
                user,
                value,
                id,
                day,
                dup,
            } => {
                summary.valid += u64::from(!dup);
                summary.duplicates += u64::from(dup);
                let rec = Produced {
                    p: 0,
                    o: 0,
                    id: Some(id),
                    u: Some(user.clone()),
                    d: Some(day),
                    dup,
                };
                (user, value, rec)
            }
            Message::Invalid(value) => {
                summary.invalid += 1;
                (
                    "invalid".to_owned(),
                    value,
                    Produced {
                        p: 0,
                        o: 0,
                        id: None,
                        u: None,
                        d: None,
                        dup: false,
                    },
                )
            }
        };
        summary.bytes += value.len() as u64;
        let delivery = loop {
            let record = FutureRecord::to(&opts.topic)
                .key(key.as_bytes())
                .payload(value.as_slice());
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Let deliveries drain before trying again.
                    if let Some(done) = pending.next().await {
                        finish_one(done, &mut writer, &mut delivered)?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Err((e, _)) => return Err(format!("produce failed: {e}")),
            }
        };
        pending.push(async move { (delivery.await, rec) });
        while pending.len() > 100_000 {
            if let Some(done) = pending.next().await {
                finish_one(done, &mut writer, &mut delivered)?;
            }
        }
        summary.sent += 1;
        progress.update(summary.sent, "");
    }
    while let Some(done) = pending.next().await {
        finish_one(done, &mut writer, &mut delivered)?;
        progress.update(summary.sent, "waiting for acknowledgements");
    }
    if let Some(w) = writer {
        w.finish()
            .map_err(|e| format!("cannot write the record: {e}"))?;
    }
    summary.elapsed = start.elapsed();
    progress.finish(summary.sent, "done");
    Ok(summary)
}

type Delivery = (
    Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
    Produced,
);

fn finish_one(
    done: Delivery,
    writer: &mut Option<record::Writer>,
    delivered: &mut u64,
) -> Result<(), String> {
    let (result, mut rec) = done;
    let d = match result {
        Ok(Ok(d)) => d,
        Ok(Err((e, _))) => return Err(format!("delivery failed: {e}")),
        Err(_) => return Err("producer dropped".into()),
    };
    rec.p = d.partition;
    rec.o = d.offset;
    *delivered += 1;
    if let Some(w) = writer {
        w.write(&rec)
            .map_err(|e| format!("cannot write the record: {e}"))?;
    }
    Ok(())
}
