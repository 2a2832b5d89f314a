//! Bad input never stops the pipeline: every kind of invalid message lands in the dead-letter
//! topic with its original key, value and context, and every good event around it is stored.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Headers, Message};
use vault::kafka::dead_letter::{headers, KafkaDeadLetters};
use vault::store::MemoryStore;

use crate::common::{event_json, read_all, settings, stored_positions, unique, Kafka, Running};

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
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_context_and_good_events_flow() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("bad"), unique("g"));
    let partitions = 2;
    kafka.create_topic(&topic, partitions).await;
    kafka.create_topic(&format!("{topic}.dlq"), 1).await;

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
    // Tombstones need a null value: produce them as such.
    let mut positions = Vec::new();
    for (p, key, value) in &messages {
        let got = match value {
            Some(v) => kafka.produce(&topic, &[(*p, key.clone(), v.clone())]).await,
            None => kafka.produce_tombstone(&topic, *p, key).await,
        };
        positions.push(got[0]);
    }

    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.pipeline.max_event_bytes = 4096;
    let settings_v = cfg.clone().validate().unwrap();
    let dlq = KafkaDeadLetters::new(
        &vault::kafka::base_client_config(&settings_v),
        &cfg.kafka.dead_letter_topic,
    )
    .unwrap();
    let store = MemoryStore::new();
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

    // After a fix, `vault dlq replay` re-publishes the chosen kinds to the source topic.
    let replay = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
            .args(["dlq", "replay"])
            .args(args)
            .env("VAULT_KAFKA_BROKERS", &kafka.brokers)
            .env("VAULT_KAFKA_TOPICS", &topic)
            .env("VAULT_KAFKA_GROUP_ID", &group)
            .output()
            .expect("run vault dlq replay");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let wanted = ["not_an_object", "tombstone"];
    let n_wanted = kinds.iter().filter(|k| wanted.contains(k)).count();
    let line = |n: usize| format!("matched              {n}\n");
    let dry = replay(&["--kind", wanted[0], "--kind", wanted[1], "--dry-run"]);
    assert!(dry.contains(&line(n_wanted)), "{dry}");
    assert!(dry.contains("replayed             0 (dry run)"), "{dry}");
    let too_old = replay(&["--until", "1h", "--dry-run"]);
    assert!(
        too_old.contains(&line(0)),
        "nothing is older than 1h: {too_old}"
    );
    let before = read_all(&kafka.brokers, &topic).await.len();
    assert_eq!(before, messages.len(), "the dry runs published nothing");
    let done = replay(&["--kind", wanted[0], "--kind", wanted[1], "--since", "1h"]);
    assert!(
        done.contains(&format!("replayed             {n_wanted} in")),
        "{done}"
    );
    let replayed: Vec<_> = read_all(&kafka.brokers, &topic)
        .await
        .into_iter()
        .filter(|m| {
            m.headers()
                .is_some_and(|h| h.iter().any(|h| h.key == vault::tools::dlq::REPLAYED_FROM))
        })
        .collect();
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
    }
}
