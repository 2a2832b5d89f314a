//! The pipeline core against Kafka: every event stored once, commits only past durable batches,
//! rebalances and shutdown without gaps.

use std::collections::BTreeSet;
use std::time::Duration;

use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::{MemoryStore, StoreError};

use crate::common::{settings, stored_positions, unique, wait_until, Kafka, Running};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_stored_once_and_committed_to_the_end() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("all"), unique("g"));
    let partitions = 4;
    kafka.create_source_topic(&topic, partitions).await;
    let produced: BTreeSet<_> = kafka
        .produce_events(&topic, partitions, 0, 2000)
        .await
        .into_iter()
        .collect();

    let store = MemoryStore::new();
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, LONG)
        .await;

    assert_eq!(
        stored_positions(&store),
        produced,
        "every produced event is stored"
    );
    assert_eq!(store.len(), 2000);
    assert_eq!(
        store.writes(),
        2000,
        "no event written twice in a clean run"
    );
    assert_eq!(vault.counter("vault_events_consumed_total"), 2000.0);
    assert_eq!(vault.counter("vault_events_stored_total"), 2000.0);
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_holds_back_only_its_partition() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("fail"), unique("g"));
    let partitions = 3;
    kafka.create_source_topic(&topic, partitions).await;
    kafka.produce_events(&topic, partitions, 0, 900).await; // 300 per partition
    let probe = kafka.probe(&group);

    // Every write containing partition 0's offset 100 times out until the fault is cleared.
    let store = MemoryStore::new();
    let t = topic.clone();
    store.fail_when(
        move |e| *e.source.topic == *t && e.source.partition == 0 && e.source.offset == 100,
        None,
        StoreError::Timeout("injected".into()),
    );
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );

    // The other partitions finish.
    wait_until("partitions 1 and 2 committed to the end", LONG, || async {
        let c = probe.committed(&topic, partitions).await;
        (c[1] == Some(300) && c[2] == Some(300))
            .then_some(())
            .ok_or(format!("{c:?}"))
    })
    .await;
    // Partition 0 wrote batches after the failing one (up to the in-flight window)...
    wait_until("a later batch of partition 0 stored", LONG, || async {
        let later = stored_positions(&store)
            .iter()
            .filter(|(p, o)| *p == 0 && *o > 100)
            .count();
        (later > 0)
            .then_some(())
            .ok_or(format!("{later} later rows"))
    })
    .await;
    // ...and one more commit round (proved by a new event on partition 1 being committed) does
    // not move partition 0 past the failing batch.
    kafka
        .produce(
            &topic,
            &[(
                1,
                "k".into(),
                crate::common::event_json("u", 5000).into_bytes(),
            )],
        )
        .await;
    wait_until("the extra event on partition 1 committed", LONG, || async {
        let c = probe.committed(&topic, partitions).await;
        (c[1] == Some(301)).then_some(()).ok_or(format!("{c:?}"))
    })
    .await;
    let c0 = probe.committed(&topic, partitions).await[0];
    assert!(
        c0.unwrap_or(0) <= 100,
        "partition 0 committed {c0:?}, past the failing batch at offset 100"
    );
    assert!(!store.contains_source(&topic, 0, 100));
    assert!(
        store.failed_requests() >= 2,
        "the failing batch was retried"
    );
    assert!(vault.counter("vault_write_retries_total") >= 2.0);

    // Once the store recovers, the batch is retried to success and everything is committed.
    store.clear_faults();
    probe.wait_committed_to_end(&topic, partitions, LONG).await;
    assert_eq!(store.len(), 901);
    assert!(store.contains_source(&topic, 0, 100));
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_joining_and_leaving_loses_nothing() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("scale"), unique("g"));
    let partitions = 4;
    kafka.create_source_topic(&topic, partitions).await;
    let probe = kafka.probe(&group);
    let store = MemoryStore::new();
    let mut produced = BTreeSet::new();

    let a = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );
    produced.extend(kafka.produce_events(&topic, partitions, 0, 800).await);
    probe.wait_committed_to_end(&topic, partitions, LONG).await;

    let b = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );
    wait_until("the second consumer gets partitions", LONG, || async {
        (b.assigned() > 0 && a.assigned() + b.assigned() == partitions as i64)
            .then_some(())
            .ok_or(format!("a={} b={}", a.assigned(), b.assigned()))
    })
    .await;
    produced.extend(kafka.produce_events(&topic, partitions, 800, 800).await);
    wait_until("the second consumer stores events", LONG, || async {
        let n = b.counter("vault_events_stored_total");
        (n > 0.0).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    b.stop().await;

    produced.extend(kafka.produce_events(&topic, partitions, 1600, 800).await);
    probe.wait_committed_to_end(&topic, partitions, LONG).await;
    assert_eq!(
        a.assigned(),
        partitions as i64,
        "the first consumer owns everything again"
    );
    assert_eq!(stored_positions(&store), produced);
    assert_eq!(store.len(), 2400);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_partial_batches_and_a_restart_resumes_without_gap() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("stop"), unique("g"));
    let partitions = 2;
    kafka.create_source_topic(&topic, partitions).await;
    let probe = kafka.probe(&group);
    let mut produced: BTreeSet<_> = kafka
        .produce_events(&topic, partitions, 0, 500)
        .await
        .into_iter()
        .collect();

    // Batches never fill and linger never expires: only shutdown can flush them.
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.batch.max_events = 100_000;
    cfg.batch.linger = Duration::from_secs(3600);
    cfg.batch.flush_when_idle = false;
    let store = MemoryStore::new();
    let vault = Running::start(cfg.clone(), store.clone(), MemoryDeadLetters::default());
    wait_until("all 500 events read into open batches", LONG, || async {
        let n = vault.counter("vault_events_consumed_total");
        (n == 500.0).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    assert!(store.is_empty(), "nothing is flushed before shutdown");
    assert_eq!(probe.committed(&topic, partitions).await, vec![None, None]);

    let flushed_on_shutdown = {
        let v = &vault;
        v.counter_with("vault_batches_flushed_total", "reason", "shutdown")
    };
    assert_eq!(flushed_on_shutdown, 0.0);
    let metrics = vault.metrics.clone();
    vault.stop().await;
    let shutdown_flushes = metrics
        .batches_flushed
        .with_label_values(&["shutdown"])
        .get();
    assert_eq!(
        shutdown_flushes, 2,
        "one partial batch per partition flushed at shutdown"
    );
    assert_eq!(store.len(), 500);
    assert_eq!(
        probe.committed(&topic, partitions).await,
        vec![Some(250), Some(250)]
    );

    // A new consumer resumes exactly at the commit: new events stored, old ones not re-read.
    produced.extend(kafka.produce_events(&topic, partitions, 500, 300).await);
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );
    probe.wait_committed_to_end(&topic, partitions, LONG).await;
    assert_eq!(stored_positions(&store), produced);
    assert_eq!(
        store.writes(),
        800,
        "the restart re-read nothing that was committed"
    );
    assert_eq!(vault.counter("vault_events_consumed_total"), 300.0);
    vault.stop().await;
}
