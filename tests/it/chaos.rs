//! The chaos run: one long stream of good and poisonous messages while a seeded schedule
//! starts, SIGTERMs and kill -9s real `vault run` processes (1 to 3 at a time), takes brokers
//! down, injects CQL faults (timeouts, overload, dropped connections, outages) and arms
//! failpoint panics inside the processes. Then it audits by reading everything back: every
//! valid event is stored, every bad message is in the dead-letter topic, and everything is
//! committed. It prints the seed (VAULT_CHAOS_SEED replays a run) and the figures.
//!
//! CI runs a short schedule; `make chaos` a long one (VAULT_CHAOS_STEPS).

use std::collections::BTreeSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use vault_sandbox::cql::{Fault, FaultKind};

use crate::common::{env_or, read_all, spawn_vault, stop_gracefully, ProcessRig, VaultProcess};
use crate::faults::{rows_written, stored};

/// A bad message of one of the shapes the chaos run sends, by number.
fn poison(i: usize) -> (&'static str, Vec<u8>) {
    match i % 6 {
        0 => ("bad_json", b"{\"user_id\": nope".to_vec()),
        1 => (
            "too_deep",
            format!(
                r#"{{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","attributes":{}1{}}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            )
            .into_bytes(),
        ),
        2 => (
            "bad_unicode",
            br#"{"user_id":"u","event_type":"t","occurred_at":"2025-11-24T10:00:00Z","attributes":{"s":"\ud800"}}"#
                .to_vec(),
        ),
        3 => ("missing_field", br#"{"event_type":"t"}"#.to_vec()),
        // Larger than pipeline.max_event_bytes and than kafka.dead_letter_max_bytes (both
        // lowered for this run, so the mock broker's ~5 MiB per partition holds a long run):
        // cut to fit on its way to the dead-letter topic.
        4 => ("too_large", vec![b'x'; 300_000 + i]),
        _ => (
            "invalid_field",
            format!(
                r#"{{"user_id":"u","event_type":"t","occurred_at":"1999-12-31T23:59:59.{}Z"}}"#,
                "9".repeat(50_000)
            )
            .into_bytes(),
        ),
    }
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "4000000")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_run_loses_nothing_and_dead_letters_every_bad_message() {
    let steps: usize = env_or("VAULT_CHAOS_STEPS", 8);
    let seed: u64 = env_or("VAULT_CHAOS_SEED", 13);
    println!("chaos: {steps} steps, seed {seed} (VAULT_CHAOS_STEPS, VAULT_CHAOS_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);

    let partitions = 4;
    let ProcessRig {
        kafka,
        node,
        topic,
        group,
        keyspace,
        dir,
        env,
    } = ProcessRig::start("chaos", partitions).await;
    let big = producer(&kafka.brokers);
    let mut members: Vec<VaultProcess> = Vec::new();
    let mut spawned = 0;
    let mut spawn = |rng: &mut StdRng, members: &mut Vec<VaultProcess>, next_offset: i64| {
        // Each process may carry a failpoint that fires once inside it.
        let failpoint = match rng.random_range(0..4) {
            0 => format!(
                "kafka::decode=return({topic}@{}:once)",
                next_offset + rng.random_range(0..40)
            ),
            1 => format!("persister::write=3*return({topic})"),
            // A flush is matched by its batch's first offset: the first flush, whatever it is.
            2 => format!("batcher::flush=return({topic}:once)"),
            _ => String::new(),
        };
        let mut env = env.clone();
        env.extend(
            [
                ("FAILPOINTS", failpoint.as_str()),
                ("VAULT_PIPELINE_MAX_EVENT_BYTES", "200000"),
                ("VAULT_KAFKA_DEAD_LETTER_MAX_BYTES", "100000"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let (child, _) = spawn_vault(&env, &dir.join(format!("vault-{spawned}.log")));
        println!("  start member {spawned} (failpoint: {failpoint:?})");
        spawned += 1;
        members.push(child);
    };

    let mut valid = BTreeSet::new();
    let mut bad: Vec<((i32, i64), &'static str)> = Vec::new();
    let (mut kills, mut terms, mut n) = (0, 0, 0usize);
    spawn(&mut rng, &mut members, 0);
    // A member that exits on its own crashed: bad input, faults and failpoints must never do
    // that (a failpoint panic restarts a partition, not the process).
    let mut crashed = Vec::new();
    for step in 0..steps {
        members.retain_mut(|m| match m.try_wait() {
            Ok(Some(status)) => {
                crashed.push(status.to_string());
                false
            }
            _ => true,
        });
        // Process events are as likely as all faults together.
        let mut actions = vec!["cql", "outage", "broker"];
        if members.len() < 3 {
            actions.extend(["start", "start"]);
        }
        if members.len() > 1 {
            actions.push("term");
        }
        if !members.is_empty() {
            actions.extend(["kill", "kill"]);
        }
        match actions[rng.random_range(0..actions.len())] {
            "start" => spawn(&mut rng, &mut members, n as i64 / 4),
            "term" => {
                let victim = members.swap_remove(rng.random_range(0..members.len()));
                println!("  SIGTERM a member");
                stop_gracefully(victim, "a member to exit 0 on SIGTERM").await;
                terms += 1;
            }
            "kill" => {
                let mut victim = members.swap_remove(rng.random_range(0..members.len()));
                println!("  kill -9 a member");
                victim.kill().expect("kill -9");
                let _ = victim.wait();
                kills += 1;
            }
            "cql" => {
                let kind = match rng.random_range(0..3) {
                    0 => FaultKind::WriteTimeout,
                    1 => FaultKind::Overloaded,
                    _ => FaultKind::DropConnection,
                };
                println!("  CQL fault {kind:?}");
                node.inject(
                    Fault::new(kind)
                        .matching("INSERT")
                        .probability(0.3)
                        .times(30),
                );
            }
            "outage" => {
                println!("  CQL outage 2s");
                node.outage(Duration::from_secs(2));
            }
            _ => {
                if let Some(mock) = kafka.mock() {
                    let broker = rng.random_range(1..=3);
                    println!("  broker {broker} down for 2s");
                    mock.broker_down(broker).expect("broker down");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    mock.broker_up(broker).expect("broker up");
                }
            }
        }
        if members.is_empty() {
            spawn(&mut rng, &mut members, n as i64 / 4);
        }
        // The stream goes on: good events and, now and then, a poison pill.
        let count = rng.random_range(100..300);
        for (p, o) in kafka.produce_events(&topic, partitions, n, count).await {
            valid.insert((p, o));
        }
        n += count;
        let (kind, value) = poison(step);
        let partition = rng.random_range(0..partitions);
        let delivered = big
            .send(
                FutureRecord::<str, [u8]>::to(&topic)
                    .partition(partition)
                    .key("poison")
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("the broker takes the poison pill");
        bad.push(((delivered.partition, delivered.offset), kind));
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
    }
    node.clear_faults();
    if members.is_empty() {
        spawn(&mut rng, &mut members, n as i64 / 4);
    }
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(180))
        .await;

    // Audit: read everything back.
    let rows = stored(&node, &keyspace);
    let letters = read_all(&kafka.brokers, &format!("{topic}.dlq")).await;
    let lettered: Vec<((i32, i64), String)> = letters
        .iter()
        .map(|m| {
            let h = |name: &str| {
                m.headers()
                    .and_then(|hs| hs.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            let p = h("vault.source.partition").parse().unwrap_or(-1);
            let o = h("vault.source.offset").parse().unwrap_or(-1);
            ((p, o), h("vault.error.kind"))
        })
        .collect();
    let lettered_set: BTreeSet<_> = lettered.iter().map(|(pos, _)| *pos).collect();
    let lost: Vec<_> = valid.difference(&rows).collect();
    let missing_letters: Vec<_> = bad
        .iter()
        .filter(|(pos, _)| !lettered_set.contains(pos))
        .collect();
    let written = rows_written(&node);
    println!(
        "chaos figures: seed {seed}, steps {steps}, members started {spawned}, kill -9 {kills}, SIGTERM {terms}; \
         valid sent {}, stored {}, lost {}; bad sent {}, dead-lettered {}, missing {}; \
         duplicate row writes {}, duplicate letters {}",
        valid.len(),
        rows.len(),
        lost.len(),
        bad.len(),
        lettered_set.len(),
        missing_letters.len(),
        written.saturating_sub(rows.len()),
        lettered.len() - lettered_set.len(),
    );
    for (pos, kind) in &bad {
        if let Some((_, got)) = lettered.iter().find(|(p, _)| p == pos) {
            assert_eq!(got, kind, "dead letter of {pos:?} has the wrong kind");
        }
    }
    for child in members {
        stop_gracefully(child, "a member to exit 0 on SIGTERM").await;
    }
    assert!(
        crashed.is_empty(),
        "members exited on their own: {crashed:?} (seed {seed}, logs in {})",
        dir.display()
    );
    assert!(
        lost.is_empty(),
        "lost {lost:?} (seed {seed}, logs in {})",
        dir.display()
    );
    assert!(
        missing_letters.is_empty(),
        "not dead-lettered: {missing_letters:?} (seed {seed}, logs in {})",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
