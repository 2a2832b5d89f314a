//! The group view and the per-partition gauges an operator watches, on a running pipeline: every
//! partition's committed and log-end offsets from the brokers (`vault_group_*`), the consumer
//! group's state and generation, lag in seconds; and a partition whose writes keep failing shows
//! as a frozen committed offset with a growing lag, an event age that climbs and a time since
//! its last commit that climbs, never as 0.

use std::time::Duration;

use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::{MemoryStore, StoreError};

use crate::common::{settings, unique, wait_until, Kafka, Running};

fn int(family: &prometheus::IntGaugeVec, labels: &[&str]) -> i64 {
    family.with_label_values(labels).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_is_watched_and_a_stuck_one_shows_as_stuck() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("view"), unique("g"));
    kafka.create_source_topic(&topic, 2).await;
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.kafka.group_view_interval = Duration::from_secs(1);
    let memory = MemoryStore::new();
    let vault = Running::start(cfg, memory.clone(), MemoryDeadLetters::default());
    kafka
        .produce_and_wait_committed(&topic, &group, 2, 0, 100)
        .await;
    let ends = kafka.probe(&group).ends(&topic, 2).await;
    let m = vault.metrics.clone();

    wait_until(
        "the group view and the statistics report the caught-up group",
        Duration::from_secs(30),
        || async {
            let seen = (
                int(&m.topic_partitions, &[&topic]),
                [0, 1].map(|p| {
                    let p = p.to_string();
                    (
                        int(&m.group_committed_offset, &[&topic, &p]),
                        int(&m.group_log_end_offset, &[&topic, &p]),
                        int(&m.group_lag, &[&topic, &p]),
                        m.consumer_lag_seconds
                            .with_label_values(&[&topic, &p])
                            .get(),
                    )
                }),
                int(&m.group_state, &["up"]),
                int(&m.group_join_state, &["steady"]),
                m.group_generation.get(),
            );
            let want_partition = |p: usize| (ends[p], ends[p], 0, 0.0);
            if seen.0 == 2
                && seen.1 == [want_partition(0), want_partition(1)]
                && seen.2 == 1
                && seen.3 == 1
                && seen.4 >= 1
            {
                Ok(())
            } else {
                Err(format!("{seen:?}, ends {ends:?}"))
            }
        },
    )
    .await;

    // Partition 1's writes fail from now on: its committed offset freezes while its log grows.
    memory.fail_when(
        |e| e.source.partition == 1,
        None,
        StoreError::Timeout("injected".into()),
    );
    let frozen = ends[1];
    kafka.produce_events(&topic, 2, 100, 100).await;
    wait_until(
        "partition 1 frozen and behind, partition 0 caught up",
        Duration::from_secs(30),
        || async {
            let c1 = int(&m.group_committed_offset, &[&topic, "1"]);
            let lag1 = int(&m.group_lag, &[&topic, "1"]);
            let lag0 = int(&m.group_lag, &[&topic, "0"]);
            if c1 == frozen && lag1 == 50 && lag0 == 0 {
                Ok(())
            } else {
                Err(format!("committed 1 {c1}, lag 1 {lag1}, lag 0 {lag0}"))
            }
        },
    )
    .await;
    // What this member owns says the same, in seconds: nothing reads 0 while it is stuck.
    wait_until(
        "partition 1's age, time since commit and lag in seconds climb",
        Duration::from_secs(30),
        || async {
            let p = [&topic as &str, "1"];
            let age = m.oldest_uncommitted_age.with_label_values(&p).get();
            let since = m.seconds_since_commit.with_label_values(&p).get();
            let lag_s = m.consumer_lag_seconds.with_label_values(&p).get();
            if age >= 3.0 && since >= 3.0 && lag_s > 0.0 {
                Ok(())
            } else {
                Err(format!("age {age}, since commit {since}, lag {lag_s}s"))
            }
        },
    )
    .await;
    memory.clear_faults();
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 2, Duration::from_secs(60))
        .await;
    vault.stop().await;
}
