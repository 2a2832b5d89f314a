//! Bad input never stops the pipeline: every kind of invalid message lands in the dead-letter
//! topic with its original key, value and context, and every good event around it is stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use vault::config::ScyllaConfig;
use vault::event::{derived_event_id, Source};
use vault::kafka::dead_letter::{headers, MemoryDeadLetters};
use vault::store::scylla::ScyllaStore;
use vault::store::MemoryStore;
use vault_sandbox::cql::CqlNode;

use crate::common::{
    event_json, kafka_dead_letters, read_all, settings, stored_positions, unique, Kafka, Running,
};

/// (expected error kind, value); `None` is a tombstone.
fn corpus() -> Vec<(&'static str, Option<Vec<u8>>)> {
    let ok_at = r#""occurred_at":"2025-11-24T10:00:00Z""#;
    let v = |s: String| Some(s.into_bytes());
    vec![
        ("bad_json", v("{not json".into())),
        ("bad_json", v(r#"{"user_id":"u""#.into())),
        ("bad_json", v(String::new())),
        (
            "bad_json",
            v(format!(
                r#"{{"user_id":"a","user_id":"b","event_type":"t",{ok_at}}}"#
            )),
        ),
        ("not_utf8", Some(b"\xff\xfe{\"user_id\":1}".to_vec())),
        ("tombstone", None),
        ("not_an_object", v("[1,2]".into())),
        ("not_an_object", v(r#""just a string""#.into())),
        ("not_an_object", v("42".into())),
        ("not_an_object", v("null".into())),
        (
            "missing_field",
            v(format!(r#"{{"event_type":"t",{ok_at}}}"#)),
        ),
        (
            "missing_field",
            v(format!(r#"{{"user_id":null,"event_type":"t",{ok_at}}}"#)),
        ),
        (
            "invalid_field",
            v(format!(r#"{{"user_id":17,"event_type":"t",{ok_at}}}"#)),
        ),
        (
            "invalid_field",
            v(format!(r#"{{"user_id":"","event_type":"t",{ok_at}}}"#)),
        ),
        (
            "invalid_field",
            v(format!(
                r#"{{"user_id":"{}","event_type":"t",{ok_at}}}"#,
                "u".repeat(257)
            )),
        ),
        ("missing_field", v(format!(r#"{{"user_id":"u",{ok_at}}}"#))),
        (
            "invalid_field",
            v(format!(
                r#"{{"user_id":"u","event_type":"{}",{ok_at}}}"#,
                "t".repeat(129)
            )),
        ),
        (
            "invalid_field",
            v(format!(r#"{{"user_id":"u","event_type":7,{ok_at}}}"#)),
        ),
        (
            "missing_field",
            v(r#"{"user_id":"u","event_type":"t"}"#.into()),
        ),
        (
            "invalid_field",
            v(r#"{"user_id":"u","event_type":"t","occurred_at":"yesterday"}"#.into()),
        ),
        (
            "invalid_field",
            v(r#"{"user_id":"u","event_type":"t","occurred_at":1700000000}"#.into()),
        ),
        (
            "invalid_field",
            v(r#"{"user_id":"u","event_type":"t","occurred_at":"1999-12-31T23:59:59Z"}"#.into()),
        ),
        (
            "invalid_field",
            v(r#"{"user_id":"u","event_type":"t","occurred_at":"2999-01-01T00:00:00Z"}"#.into()),
        ),
        (
            "invalid_field",
            v(format!(
                r#"{{"user_id":"u","event_type":"t",{ok_at},"event_id":"not-a-uuid"}}"#
            )),
        ),
        (
            "invalid_field",
            v(format!(
                r#"{{"user_id":"u","event_type":"t",{ok_at},"attributes":[1]}}"#
            )),
        ),
        (
            "too_large",
            v(format!(
                r#"{{"user_id":"u","event_type":"t",{ok_at},"attributes":{{"x":"{}"}}}}"#,
                "x".repeat(5000)
            )),
        ),
        (
            "too_deep",
            v(format!(
                r#"{{"user_id":"u","event_type":"t",{ok_at},"attributes":{}1{}}}"#,
                r#"{"a":"#.repeat(100),
                "}".repeat(100)
            )),
        ),
        (
            "bad_unicode",
            v(format!(
                r#"{{"user_id":"u","event_type":"t",{ok_at},"attributes":{{"k":"\ud800"}}}}"#
            )),
        ),
        (
            "bad_unicode",
            v(format!(
                r#"{{"user_id":"u","event_type":"t",{ok_at},"extra":"x\udc00"}}"#
            )),
        ),
        // Produced with a Kafka timestamp in year 9999 (see FUTURE_MS).
        (
            "future_timestamp",
            v(r#"{"user_id":"u","event_type":"t","occurred_at":"9999-12-31T00:00:00Z"}"#.into()),
        ),
    ]
}

/// The clock, in ms since the epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The Kafka timestamp of the corpus's `future_timestamp` entry: 9999-12-31T00:00:00Z.
const FUTURE_MS: i64 = 253_402_214_400_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_context_and_good_events_flow() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("bad"), unique("g"));
    let partitions = 2;
    kafka.create_source_topic(&topic, partitions).await;

    let corpus = corpus();
    assert!(corpus.len() >= 20);
    let mut messages = Vec::new();
    let mut kinds = Vec::new();
    for (i, (kind, value)) in corpus.iter().enumerate() {
        for j in 0..3 {
            let n = i * 10 + j;
            messages.push((
                n as i32 % partitions,
                format!("good-{n}"),
                Some(event_json("user-x", n).into_bytes()),
            ));
        }
        messages.push((i as i32 % partitions, format!("bad-{i}"), value.clone()));
        kinds.push(*kind);
    }
    // Tombstones need a null value, and the future timestamp its timestamp: produce them so.
    let future_key = format!(
        "bad-{}",
        kinds.iter().position(|k| *k == "future_timestamp").unwrap()
    );
    let mut positions = Vec::new();
    for (p, key, value) in &messages {
        let got = match value {
            Some(v) if *key == future_key => {
                vec![kafka.produce_at(&topic, *p, key, Some(v), FUTURE_MS).await]
            }
            Some(v) => kafka.produce(&topic, &[(*p, key.clone(), v.clone())]).await,
            None => kafka.produce_tombstone(&topic, *p, key).await,
        };
        positions.push(got[0]);
    }

    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.pipeline.max_event_bytes = 4096;
    let dlq = kafka_dead_letters(&cfg);
    let store = MemoryStore::new();
    let dead_lettered_from = now_ms();
    let vault = Running::start(cfg, store.clone(), dlq);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(60))
        .await;

    // Good events: all stored.
    let good: std::collections::BTreeSet<_> = messages
        .iter()
        .zip(&positions)
        .filter(|((_, k, _), _)| k.starts_with("good"))
        .map(|(_, pos)| *pos)
        .collect();
    assert_eq!(stored_positions(&store), good);

    // Bad ones: all dead-lettered, with original key and value and the context headers.
    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    let mut by_key: HashMap<String, &rdkafka::message::OwnedMessage> = HashMap::new();
    for m in &letters {
        by_key.insert(
            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            m,
        );
    }
    for (i, kind) in kinds.iter().enumerate() {
        let key = format!("bad-{i}");
        let m = by_key
            .get(&key)
            .unwrap_or_else(|| panic!("{key} ({kind}) is not in the dead-letter topic"));
        let idx = messages.iter().position(|(_, k, _)| *k == key).unwrap();
        assert_eq!(
            m.payload().map(<[u8]>::to_vec),
            messages[idx].2,
            "{key}: original value kept"
        );
        let h: HashMap<&str, String> = m
            .headers()
            .expect("headers")
            .iter()
            .map(|h| {
                (
                    h.key,
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            h[headers::ERROR_KIND],
            *kind,
            "{key}: {:?}",
            h.get(headers::ERROR_MESSAGE)
        );
        assert!(!h[headers::ERROR_MESSAGE].is_empty());
        assert_eq!(h[headers::SOURCE_TOPIC], topic);
        assert_eq!(h[headers::SOURCE_PARTITION], positions[idx].0.to_string());
        assert_eq!(h[headers::SOURCE_OFFSET], positions[idx].1.to_string());
        assert!(h[headers::SOURCE_TIMESTAMP].parse::<i64>().is_ok());
        assert_eq!(h[headers::VERSION], env!("CARGO_PKG_VERSION"));
        // Dated when it was dead-lettered, not by its source (the source's time is the header):
        // the letter of a message from year 9999 must not fall outside the topic's bounds.
        let letter_ms = m.timestamp().to_millis().expect("a timestamp");
        assert!(
            (dead_lettered_from..=now_ms()).contains(&letter_ms),
            "{key}: the letter's timestamp {letter_ms}"
        );
    }
    assert_eq!(
        letters.len(),
        kinds.len(),
        "each bad message dead-lettered once"
    );
    assert_eq!(
        vault.counter("vault_events_dead_lettered_total"),
        kinds.len() as f64
    );
    vault.stop().await;

    // After a fix, `vault dlq replay` re-publishes the chosen kinds to the source topic (it
    // reads the store's record of erasures: none here).
    let (_node, scylla) = scylla_with_schema().await;
    let replay = |args: &[&str]| dlq_replay(&kafka.brokers, &topic, &group, &scylla, args);
    // A forged letter naming a topic vault does not read: replay must not publish there.
    let payments = unique("payments");
    kafka.create_topic(&payments, 1).await;
    let forger: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("producer");
    forger
        .send(
            FutureRecord::to(&format!("{topic}.dlq"))
                .key("forged")
                .payload(
                    r#"{"user_id":"u","event_type":"pay","occurred_at":"2025-11-24T10:00:00Z"}"#,
                )
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: headers::ERROR_KIND,
                            value: Some("not_an_object"),
                        })
                        .insert(Header {
                            key: headers::SOURCE_TOPIC,
                            value: Some(&payments),
                        }),
                ),
            Duration::from_secs(10),
        )
        .await
        .expect("forged letter");

    // too_large becomes valid once the limit is raised (below); the others fail again.
    let wanted = ["not_an_object", "tombstone", "too_large"];
    let kind_args = [
        "--kind", wanted[0], "--kind", wanted[1], "--kind", wanted[2],
    ];
    let n_wanted = kinds.iter().filter(|k| wanted.contains(k)).count();
    let line = |n: usize| format!("matched              {n}\n");
    let dry = replay(&[&kind_args[..], &["--dry-run"]].concat());
    assert!(dry.contains(&line(n_wanted + 1)), "{dry}");
    assert!(
        dry.contains(&format!("destinations\n  {topic} -> {n_wanted}\n")),
        "{dry}"
    );
    assert!(dry.contains("skipped              1 ("), "{dry}");
    assert!(dry.contains(&format!("  {payments} -> 1\n")), "{dry}");
    assert!(dry.contains("replayed             0 (dry run)"), "{dry}");
    let too_old = replay(&["--until", "1h", "--dry-run"]);
    assert!(
        too_old.contains(&line(0)),
        "nothing is older than 1h: {too_old}"
    );
    let before = read_all(&kafka.brokers, &topic).await.len();
    assert_eq!(before, messages.len(), "the dry runs published nothing");
    let done = replay(&[&kind_args[..], &["--since", "1h"]].concat());
    assert!(
        done.contains(&format!("replayed             {n_wanted} in")),
        "{done}"
    );
    assert_eq!(
        kafka.probe(&group).ends(&payments, 1).await,
        [0],
        "the forged letter went nowhere"
    );
    let replayed: Vec<_> = crate::common::replayed(&kafka.brokers, &topic).await;
    assert_eq!(
        replayed.len(),
        n_wanted,
        "only the chosen kinds are replayed"
    );
    for m in &replayed {
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        let i: usize = key.strip_prefix("bad-").unwrap().parse().unwrap();
        assert!(wanted.contains(&kinds[i]), "{key} is a {}", kinds[i]);
        let idx = messages.iter().position(|(_, k, _)| *k == key).unwrap();
        assert_eq!(m.payload().map(<[u8]>::to_vec), messages[idx].2, "{key}");
        // The original coordinates travel with it.
        let h: HashMap<&str, String> = m
            .headers()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key,
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(h[headers::SOURCE_TOPIC], topic, "{key}");
        assert_eq!(h[headers::SOURCE_PARTITION], positions[idx].0.to_string());
        assert_eq!(h[headers::SOURCE_OFFSET], positions[idx].1.to_string());
        // Back in the partition it was read from (it was placed there by hand, not by its
        // key's hash).
        assert_eq!(m.partition(), positions[idx].0, "{key}: its own partition");
    }

    // With the limit raised, the replayed too_large event (it has no event_id) is stored under
    // the id its first read would have given it, not one derived from its new offset.
    let store_after = MemoryStore::new();
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store_after.clone(),
        MemoryDeadLetters::default(),
    );
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(60))
        .await;
    vault.stop().await;
    let i = kinds.iter().position(|k| *k == "too_large").unwrap();
    let idx = messages
        .iter()
        .position(|(_, k, _)| *k == format!("bad-{i}"))
        .unwrap();
    let rows: Vec<_> = store_after
        .rows()
        .into_iter()
        .filter(|e| Some(e.payload()) == messages[idx].2.as_deref())
        .collect();
    assert_eq!(rows.len(), 1, "the replayed too_large event is stored once");
    let (partition, offset) = positions[idx];
    let original = Source {
        topic: Arc::from(topic.as_str()),
        partition,
        offset,
        timestamp_ms: None,
    };
    assert_ne!(
        (rows[0].source.partition, rows[0].source.offset),
        (partition, offset),
        "it was read as the replayed message"
    );
    assert_eq!(rows[0].event_id, derived_event_id(&original));
}

/// An erasure request (a tombstone, with `pipeline.tombstones = "erase"`) timestamped a year
/// ahead of the clock would erase the user's activity for a year: it is dead-lettered as
/// `future_timestamp`, erases nothing, and the user's events before and after it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_request_from_the_future_is_dead_lettered_and_erases_nothing() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("erase-ahead"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let now = now_ms();
    let year_ms = 365 * 24 * 3600 * 1000;
    let (before, after) = (event_json("u", 1), event_json("u", 2));
    kafka
        .produce_at(&topic, 0, "u", Some(before.as_bytes()), now)
        .await;
    kafka.produce_at(&topic, 0, "u", None, now + year_ms).await;
    kafka
        .produce_at(&topic, 0, "u", Some(after.as_bytes()), now + 1)
        .await;
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.pipeline.tombstones = vault::config::TombstonePolicy::Erase;
    let (memory, letters) = (MemoryStore::new(), MemoryDeadLetters::default());
    let vault = Running::start(cfg, memory.clone(), letters.clone());
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    assert!(memory.contains_source(&topic, 0, 0), "the event before it");
    assert!(memory.contains_source(&topic, 0, 2), "the event after it");
    let dead = letters.letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].error.kind(), "future_timestamp");
    assert_eq!((dead[0].source.offset, dead[0].value.as_ref()), (1, None));
    assert_eq!(vault.counter("vault_erasures_total"), 0.0);
    vault.stop().await;
}

/// Runs `vault dlq replay ARGS` for `topic` (read by `group`) against Kafka and ScyllaDB;
/// returns its output, which must end in success.
fn dlq_replay(
    brokers: &str,
    topic: &str,
    group: &str,
    scylla: &ScyllaConfig,
    args: &[&str],
) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
        .args(["dlq", "replay"])
        .args(args)
        .env("VAULT_KAFKA_BROKERS", brokers)
        .env("VAULT_KAFKA_TOPICS", topic)
        .env("VAULT_KAFKA_GROUP_ID", group)
        .env("VAULT_SCYLLA_NODES", &scylla.nodes[0])
        .env("VAULT_SCYLLA_KEYSPACE", &scylla.keyspace)
        .output()
        .expect("run vault dlq replay");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A CQL stand-in node with vault's schema in a keyspace of its own.
async fn scylla_with_schema() -> (CqlNode, ScyllaConfig) {
    let node = CqlNode::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("CQL stand-in starts");
    let c = ScyllaConfig {
        nodes: vec![node.addr().to_string()],
        keyspace: unique("dlq").replace('-', "_"),
        ..ScyllaConfig::default()
    };
    ScyllaStore::connect(&c, true).await.expect("schema");
    (node, c)
}

/// A dead-lettered event never reached the store, so an erasure of its user found no partition
/// of its day to delete: replaying it after the erasure would store it again. `vault dlq
/// replay` skips the letters of users erased after their event happened, and replays the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_never_brings_back_an_erased_users_events() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("replay-erased"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let (_node, scylla) = scylla_with_schema().await;
    let happened_ms = chrono::Utc::now().timestamp_millis() - 60_000;
    let letter = |user: &str| {
        format!(
            r#"{{"user_id":"{user}","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","attributes":[1]}}"#
        )
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("producer");
    // The topic has one partition: a letter naming none, or partition 9, goes back by key.
    for (user, partition) in [
        ("erased-user", "0"),
        ("kept-user", "9"),
        ("erased-later-user", ""),
    ] {
        let value = letter(user);
        let ts = happened_ms.to_string();
        let mut hdrs = OwnedHeaders::new()
            .insert(Header {
                key: headers::ERROR_KIND,
                value: Some("invalid_field"),
            })
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(&topic),
            })
            .insert(Header {
                key: headers::SOURCE_TIMESTAMP,
                value: Some(&ts),
            });
        if !partition.is_empty() {
            hdrs = hdrs.insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(partition),
            });
        }
        producer
            .send(
                FutureRecord::to(&format!("{topic}.dlq"))
                    .key(user)
                    .payload(&value)
                    .timestamp(happened_ms)
                    .headers(hdrs),
                Duration::from_secs(10),
            )
            .await
            .expect("letter");
    }
    // One user erased through now (after the event), one erased only through a time before
    // it: that erasure does not cover the event.
    let store = ScyllaStore::connect(&scylla, false).await.unwrap();
    for (user, through_ms) in [
        ("erased-user", chrono::Utc::now().timestamp_millis()),
        ("erased-later-user", happened_ms - 1),
    ] {
        let erasure = vault::store::erasure::Erasure {
            user_id: user.into(),
            through_ms,
            requested_by: "cli:test".into(),
            requested_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        vault::store::erasure::forget(&store, &erasure, false)
            .await
            .expect("erased");
    }
    let stdout = dlq_replay(&kafka.brokers, &topic, &group, &scylla, &[]);
    assert!(
        stdout.contains("skipped              1 (their user was erased after they happened)"),
        "{stdout}"
    );
    assert!(stdout.contains("replayed             2 in"), "{stdout}");
    assert!(stdout.contains("sent by key          2 ("), "{stdout}");
    let mut replayed: Vec<String> = read_all(&kafka.brokers, &topic)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    replayed.sort();
    assert_eq!(replayed, ["erased-later-user", "kept-user"]);
}

/// A letter cut to fit the dead-letter topic is not the message that was read: `vault dlq
/// replay` reads that one again from its source coordinates and re-publishes it whole, checked
/// against the digest the letter names; a cut letter whose source does not match is skipped and
/// named. A dead-letter topic that does not exist is an error, not an empty replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_reads_a_cut_letter_whole_from_its_source() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("replay-cut"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let (_node, scylla) = scylla_with_schema().await;
    let blob = "x".repeat(1_500_000);
    let huge = format!(
        r#"{{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","attributes":{{"blob":"{blob}"}}}}"#
    );
    let producer = crate::common::big_producer(&kafka.brokers);
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key("u")
                .payload(&huge),
            Duration::from_secs(10),
        )
        .await
        .expect("the broker takes the compressed value");
    kafka
        .produce(&topic, &[(0, "u".into(), event_json("u", 1).into_bytes())])
        .await;
    let cfg = settings(&kafka.brokers, &topic, &group);
    let vault = Running::start(cfg.clone(), MemoryStore::new(), kafka_dead_letters(&cfg));
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    vault.stop().await;
    // Letters of the message at offset 1, cut: one whose digest is not its source's (forged,
    // or the source rewritten); one whose key alone was cut, whose value is the source's and is
    // read back whole.
    let good = event_json("u", 1);
    let cut_letter = |value: &str, cut: &[(&'static str, &'static str)]| {
        let headers = [
            (headers::ERROR_KIND, "too_large"),
            (headers::SOURCE_TOPIC, topic.as_str()),
            (headers::SOURCE_PARTITION, "0"),
            (headers::SOURCE_OFFSET, "1"),
        ]
        .iter()
        .chain(cut)
        .fold(OwnedHeaders::new(), |h, &(key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
        let (producer, topic, value) = (producer.clone(), topic.clone(), value.to_owned());
        async move {
            producer
                .send(
                    FutureRecord::to(&format!("{topic}.dlq"))
                        .key("u")
                        .payload(&value)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .expect("letter");
        }
    };
    cut_letter(
        "{",
        &[
            (headers::VALUE_TRUNCATED, "true"),
            (headers::VALUE_SHA256, "00"),
        ],
    )
    .await;
    cut_letter(&good, &[(headers::KEY_TRUNCATED, "true")]).await;
    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    assert_eq!(letters.len(), 3);
    assert!(
        letters[0].payload().unwrap().len() < huge.len(),
        "the letter is cut"
    );

    let stdout = dlq_replay(
        &kafka.brokers,
        &topic,
        &group,
        &scylla,
        &["--kind", "too_large"],
    );
    assert!(stdout.contains("read whole           2 "), "{stdout}");
    assert!(
        stdout.contains("skipped              1 (cut to fit the dead-letter topic"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "  {topic}/0/1: the source message there is not the one the letter was cut from\n"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("replayed             2 in"), "{stdout}");
    let replayed: Vec<_> = crate::common::replayed(&kafka.brokers, &topic).await;
    assert_eq!(replayed.len(), 2);
    assert_eq!(
        replayed[1].payload(),
        Some(good.as_bytes()),
        "the key-cut letter"
    );
    assert_eq!(
        replayed[0].payload(),
        Some(huge.as_bytes()),
        "the whole message"
    );
    assert_eq!(replayed[0].key(), Some(&b"u"[..]));

    // A second source topic whose dead-letter topic was never created, replayed after the
    // first (dead-letter topics go in name order): the run stops before it replays anything.
    let no_letters = unique("zz-no-letters-yet");
    kafka.create_topic(&no_letters, 1).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
        .args(["dlq", "replay", "--kind", "too_large"])
        .env("VAULT_KAFKA_BROKERS", &kafka.brokers)
        .env("VAULT_KAFKA_TOPICS", format!("{topic},{no_letters}"))
        .env("VAULT_KAFKA_GROUP_ID", &group)
        .env("VAULT_SCYLLA_NODES", &scylla.nodes[0])
        .env("VAULT_SCYLLA_KEYSPACE", &scylla.keyspace)
        .output()
        .expect("run vault dlq replay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "topic {no_letters}.dlq does not exist: check kafka.dead_letter_topic"
        )),
        "{stderr}"
    );
    let replayed = crate::common::replayed(&kafka.brokers, &topic).await;
    assert_eq!(replayed.len(), 2, "nothing more went back to {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_stops_start_up_with_what_to_fix() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("nodlq"), unique("g"));
    kafka.create_topic(&topic, 1).await;
    let cfg = settings(&kafka.brokers, &topic, &group);
    let pipeline = vault::Pipeline::new(
        cfg.clone().validate().unwrap(),
        MemoryStore::new(),
        MemoryDeadLetters::default(),
    );
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        pipeline.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("refused at start-up")
    .unwrap_err();
    assert!(
        matches!(err, vault::Error::MissingDeadLetterTopic { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("'{topic}.dlq'")) && text.contains("kafka.dead_letter_topic"),
        "{text}"
    );

    // Without dead-lettering, no dead-letter topic is needed.
    let mut skip = cfg;
    skip.pipeline.on_invalid = vault::config::InvalidPolicy::Skip;
    let store = MemoryStore::new();
    let vault = Running::start(skip, store.clone(), MemoryDeadLetters::default());
    let produced = kafka
        .produce_and_wait_committed(&topic, &group, 1, 0, 10)
        .await;
    vault.stop().await;
    assert_eq!(stored_positions(&store), produced);
}
