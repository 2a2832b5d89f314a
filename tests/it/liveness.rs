//! Liveness: `/healthz` answers 503, naming the loop, once the Kafka poll loop or the
//! coordinator loop is wedged (failpoints `kafka::poll` and `coordinator::loop`) for longer than
//! `pipeline.liveness_timeout`, and 200 again once it turns; a pipeline that is only waiting
//! (every write held, the partitions stopped by backpressure) stays alive.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use vault::event::Event;
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::{MemoryStore, Store, WriteFailure};

use crate::common::{
    free_port, http_get, settings, stored_positions, unique, wait_until, Kafka, Running,
};

const LIVENESS: Duration = Duration::from_secs(3);

/// `GET /healthz` on a blocking thread: the status and the body.
async fn healthz(addr: &str) -> Result<(u16, String), String> {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || http_get(&addr, "/healthz"))
        .await
        .map_err(|e| e.to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_loop_turns_healthz_unhealthy_until_it_runs_again() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("wedge"), unique("g"));
    kafka.create_source_topic(&topic, 2).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.metrics.addr = addr.clone();
    cfg.pipeline.liveness_timeout = LIVENESS;
    let memory = MemoryStore::new();
    let vault = Running::start(cfg, memory.clone(), MemoryDeadLetters::default());
    let first = kafka
        .produce_and_wait_committed(&topic, &group, 2, 0, 100)
        .await;
    assert_eq!(healthz(&addr).await, Ok((200, "ok\n".to_owned())));

    for (failpoint, named) in [
        ("coordinator::loop", "the coordinator loop has not run for"),
        ("kafka::poll", "the Kafka poll loop has not run for"),
    ] {
        fail::cfg(failpoint, &format!("return({group})")).unwrap();
        let wedged_at = tokio::time::Instant::now();
        wait_until(
            &format!("/healthz 503 with {failpoint} wedged"),
            Duration::from_secs(30),
            || async {
                match healthz(&addr).await? {
                    (503, body) if body.contains(named) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        assert!(
            wedged_at.elapsed() >= LIVENESS - Duration::from_secs(1),
            "{failpoint}: unhealthy after {:?}, before the bound",
            wedged_at.elapsed()
        );
        fail::remove(failpoint);
        wait_until(
            &format!("/healthz 200 once {failpoint} runs again"),
            Duration::from_secs(30),
            || async {
                match healthz(&addr).await? {
                    (200, _) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }

    // Both loops turn again: the pipeline still stores and commits.
    let more = kafka
        .produce_and_wait_committed(&topic, &group, 2, 100, 100)
        .await;
    let stored = stored_positions(&memory);
    assert!(first.is_subset(&stored) && more.is_subset(&stored));
    vault.stop().await;
}

/// A store whose writes wait until the test opens the gate.
#[derive(Clone)]
struct Gated {
    inner: MemoryStore,
    gate: Arc<Semaphore>,
}

impl Store for Gated {
    async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        let _pass = self.gate.acquire().await.expect("the gate is never closed");
        self.inner.write(events).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_waiting_on_its_store_stays_alive() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("waits"), unique("g"));
    kafka.create_source_topic(&topic, 2).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.metrics.addr = addr.clone();
    cfg.pipeline.liveness_timeout = LIVENESS;
    // Two batches in flight per partition at most: the partitions stop reading at once.
    cfg.batch.max_in_flight = 2;
    let memory = MemoryStore::new();
    let store = Gated {
        inner: memory.clone(),
        gate: Arc::new(Semaphore::new(0)),
    };
    let vault = Running::start(cfg, store.clone(), MemoryDeadLetters::default());
    let produced = kafka.produce_events(&topic, 2, 0, 2000).await;
    wait_until(
        "writes waiting on the store",
        Duration::from_secs(30),
        || async {
            match vault.metrics.in_flight_batches.get() {
                n if n >= 2 => Ok(()),
                n => Err(format!("{n} batches in flight")),
            }
        },
    )
    .await;
    // Three liveness bounds with every write held: alive at every look.
    let until = tokio::time::Instant::now() + 3 * LIVENESS;
    while tokio::time::Instant::now() < until {
        assert_eq!(healthz(&addr).await, Ok((200, "ok\n".to_owned())));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        memory.is_empty(),
        "nothing was written while the gate was shut"
    );
    store.gate.add_permits(Semaphore::MAX_PERMITS);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 2, Duration::from_secs(60))
        .await;
    assert_eq!(
        stored_positions(&memory),
        produced.into_iter().collect(),
        "nothing lost"
    );
    vault.stop().await;
}

/// A member draining a revoked partition whose write is held (its coordinator inside the
/// revoke, its poll thread waiting in the rebalance callback) stays alive for as long as the
/// drain may take, and loses nothing once the write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_draining_a_revoked_partition_stays_alive() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("drains"), unique("g"));
    kafka.create_source_topic(&topic, 2).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.metrics.addr = addr.clone();
    cfg.pipeline.liveness_timeout = LIVENESS;
    cfg.pipeline.revoke_timeout = Duration::from_secs(60);
    let held = MemoryStore::new();
    let store = Gated {
        inner: held.clone(),
        gate: Arc::new(Semaphore::new(0)),
    };
    let a = Running::start(cfg, store.clone(), MemoryDeadLetters::default());
    let produced = kafka.produce_events(&topic, 2, 0, 400).await;
    wait_until("writes held", Duration::from_secs(30), || async {
        match a.metrics.in_flight_batches.get() {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} batches in flight")),
        }
    })
    .await;
    // A second member: `a` must hand over a partition, and drains it first.
    let free = MemoryStore::new();
    let b = Running::start(
        settings(&kafka.brokers, &topic, &group),
        free.clone(),
        MemoryDeadLetters::default(),
    );
    wait_until("the revoke", Duration::from_secs(60), || {
        let n = a.counter_with("vault_rebalances_total", "kind", "revoke");
        async move { (n >= 1.0).then_some(()).ok_or(format!("{n}")) }
    })
    .await;
    let until = tokio::time::Instant::now() + 3 * LIVENESS;
    while tokio::time::Instant::now() < until {
        assert_eq!(healthz(&addr).await, Ok((200, "ok\n".to_owned())));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        b.assigned(),
        0,
        "the drain was still under way: the revoked partition is not handed over yet"
    );
    store.gate.add_permits(Semaphore::MAX_PERMITS);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 2, Duration::from_secs(60))
        .await;
    let mut stored = stored_positions(&held);
    stored.extend(stored_positions(&free));
    assert_eq!(stored, produced.into_iter().collect(), "nothing lost");
    b.stop().await;
    a.stop().await;
}
