//! Adaptive write concurrency end to end: the real pipeline and the ScyllaDB store against a
//! saturated CQL stand-in node (latency that grows with the requests in flight, Overloaded
//! above a threshold).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vault::config::ScyllaConfig;
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::scylla::ScyllaStore;
use vault_sandbox::cql::{CqlNode, Saturation};

use crate::common::{settings, unique, wait_until, Kafka, Running};

const MAX: i64 = 16;

/// A Kafka topic of `partitions` partitions and a CQL stand-in node saturated as the tests
/// here want it (four statements at once at full speed, Overloaded above eight in flight),
/// with vault's settings for them: adaptive concurrency up to [`MAX`], and small requests (at
/// most 5 rows), so that a batch is many of them and demand exceeds the limit.
struct Saturated {
    kafka: Kafka,
    node: CqlNode,
    topic: String,
    group: String,
    c: ScyllaConfig,
    store: ScyllaStore,
    cfg: vault::config::Config,
}

async fn saturated(name: &str, partitions: i32) -> Saturated {
    let kafka = Kafka::start();
    let node = CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("CQL stand-in starts");
    let (topic, group) = (unique(name), unique("g"));
    kafka.create_source_topic(&topic, partitions).await;
    let c = ScyllaConfig {
        nodes: vec![node.addr().to_string()],
        keyspace: unique("it").replace('-', "_"),
        max_concurrent_requests: MAX as usize,
        min_concurrent_requests: 1,
        adaptive_concurrency: true,
        max_batch_rows: 5,
        ..ScyllaConfig::default()
    };
    let store = ScyllaStore::connect(&c, true).await.expect("migrate");
    // The fixed maximum of 16 (a write permit is one request, of 1 to 5 statements)
    // overloads it.
    node.saturate(Saturation::new(4, Duration::from_millis(5), 8).matching(&c.keyspace));
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.scylla = c.clone();
    Saturated {
        kafka,
        node,
        topic,
        group,
        c,
        store,
        cfg,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_limit_backs_off_from_a_saturated_node_recovers_and_loses_nothing() {
    let partitions = 4;
    let Saturated {
        kafka,
        node,
        topic,
        group,
        c,
        store,
        cfg,
    } = saturated("saturated", partitions).await;
    let vault = Running::start(cfg, store, MemoryDeadLetters::default());
    let limit = vault.metrics.write_concurrency_limit.clone();
    wait_until("the limit to be exported", Duration::from_secs(30), || {
        let l = limit.get();
        async move {
            match l {
                MAX => Ok(()),
                l => Err(format!("limit {l}, expected the maximum to start with")),
            }
        }
    })
    .await;
    let lowest = Arc::new(AtomicI64::new(MAX));

    kafka.produce_events(&topic, partitions, 0, 3000).await;
    wait_until("the limit to back off", Duration::from_secs(60), || {
        let (limit, lowest) = (limit.clone(), lowest.clone());
        async move {
            lowest.fetch_min(limit.get(), Ordering::SeqCst);
            match lowest.load(Ordering::SeqCst) {
                l if l <= MAX / 2 => Ok(()),
                l => Err(format!("lowest limit {l}")),
            }
        }
    })
    .await;
    let probe = kafka.probe(&group);
    probe
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(120))
        .await;
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), 3000);
    let stats = node.saturation_stats();
    assert!(stats.overloaded > 0, "the node shed load: {stats:?}");
    assert!(
        vault.counter("vault_write_retries_total") > 0.0,
        "shed writes were retried"
    );

    // Healthy again: the limit climbs back while there is demand at the limit.
    node.clear_faults();
    let mut produced = 3000;
    wait_until(
        "the limit to recover to its maximum",
        Duration::from_secs(60),
        || {
            let limit = limit.get();
            let more = (limit < MAX).then_some(produced);
            if more.is_some() {
                produced += 1000;
            }
            let kafka = &kafka;
            let topic = &topic;
            async move {
                if let Some(first) = more {
                    kafka.produce_events(topic, partitions, first, 1000).await;
                }
                match limit {
                    MAX => Ok(()),
                    l => Err(format!("limit {l}")),
                }
            }
        },
    )
    .await;
    probe
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(60))
        .await;
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), produced);
    assert_eq!(
        vault.counter("vault_events_stored_total") as usize,
        produced,
        "every event stored once"
    );
    assert_eq!(vault.metrics.write_requests_in_flight.get(), 0);
    vault.stop().await;
}

/// A saturated node sheds some requests of most batches, and now and then all of an attempt,
/// while the partitions wait for in-flight memory: a batch being written (a transient failure,
/// not the second attempt in a row to write nothing) retries unjudged, so nothing is abandoned
/// for memory and nothing is read and written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_node_under_memory_pressure_costs_no_replay() {
    let partitions = 8;
    let Saturated {
        kafka,
        node,
        topic,
        group,
        c,
        store,
        mut cfg,
    } = saturated("pressed", partitions).await;
    // Eight partitions of 4 batches of 500 events (about 300 bytes each in memory) fill the
    // smallest budget several times over: partitions wait for memory throughout.
    cfg.pipeline.max_in_flight_bytes = 1 << 20;
    cfg.batch.max_events = 500;
    let vault = Running::start(cfg, store, MemoryDeadLetters::default());
    // The fullest the in-flight memory gets, sampled while the backlog drains.
    let fullest = Arc::new(AtomicI64::new(0));
    let sampler = tokio::spawn({
        let (in_flight, fullest) = (vault.metrics.in_flight_bytes.clone(), fullest.clone());
        async move {
            loop {
                fullest.fetch_max(in_flight.get(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let n = 8000;
    kafka.produce_events(&topic, partitions, 0, n).await;
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(180))
        .await;
    sampler.abort();
    assert!(
        fullest.load(Ordering::SeqCst) >= (1 << 20) * 3 / 4,
        "the partitions filled the in-flight memory: {} bytes at most",
        fullest.load(Ordering::SeqCst)
    );
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), n);
    assert!(
        vault.counter("vault_write_retries_total") > 0.0,
        "the node shed writes, which were retried"
    );
    assert_eq!(
        vault.counter("vault_retries_out_of_memory_total"),
        0.0,
        "no batch abandoned for memory"
    );
    assert_eq!(
        vault.counter("vault_events_stored_total") as usize,
        n,
        "every event written once"
    );
    vault.stop().await;
}
