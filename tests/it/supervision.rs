//! Supervision: a partition whose write panics or is abandoned is restarted from its last
//! durable offset; the process survives and nothing is lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vault::event::Event;
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::{MemoryStore, Store, WriteFailure};

use crate::common::{settings, stored_positions, unique, Kafka, Running};

/// A store that panics once, on the first write containing partition 1's offset 120.
#[derive(Clone)]
struct PanicsOnce {
    inner: MemoryStore,
    fired: Arc<AtomicBool>,
}

impl Store for PanicsOnce {
    async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        let hit = events
            .iter()
            .any(|e| e.source.partition == 1 && e.source.offset == 120);
        if hit && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("injected store panic");
        }
        self.inner.write(events).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_write_restarts_its_partition_from_the_last_durable_offset() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("panic"), unique("g"));
    let partitions = 2;
    kafka.create_source_topic(&topic, partitions).await;
    let produced: BTreeSet<_> = kafka
        .produce_events(&topic, partitions, 0, 600)
        .await
        .into_iter()
        .collect();
    let memory = MemoryStore::new();
    let store = PanicsOnce {
        inner: memory.clone(),
        fired: Arc::default(),
    };
    // One persister: if a panic took the worker down with it, nothing would be written again.
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.pipeline.persisters = 1;
    let vault = Running::start(cfg, store.clone(), MemoryDeadLetters::default());
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(60))
        .await;
    assert!(store.fired.load(Ordering::SeqCst), "the panic was injected");
    assert_eq!(stored_positions(&memory), produced, "nothing lost");
    assert_eq!(vault.restarts(&topic), 1);
    // The persister pool survived: the stream keeps flowing after the restart.
    let more = kafka
        .produce_and_wait_committed(&topic, &group, partitions, 600, 200)
        .await;
    assert!(more.is_subset(&stored_positions(&memory)));
    vault.stop().await;
}

/// Holds the writes of some topics until released, and panics once on a write holding a given
/// event.
#[derive(Clone)]
struct DrainRace {
    inner: MemoryStore,
    held: tokio::sync::watch::Sender<BTreeSet<String>>,
    /// Writes waiting, by topic.
    waiting: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
    panic_at: Arc<std::sync::Mutex<Option<(String, i64)>>>,
    fired: Arc<AtomicBool>,
}

impl DrainRace {
    fn new(inner: MemoryStore) -> Self {
        DrainRace {
            inner,
            held: tokio::sync::watch::Sender::new(BTreeSet::new()),
            waiting: Arc::default(),
            panic_at: Arc::default(),
            fired: Arc::default(),
        }
    }

    fn hold(&self, topic: &str) {
        self.held.send_modify(|h| {
            h.insert(topic.to_owned());
        });
    }

    fn release(&self, topic: &str) {
        self.held.send_modify(|h| {
            h.remove(topic);
        });
    }
}

impl Store for DrainRace {
    async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        let topic = events
            .first()
            .map(|e| e.source.topic.to_string())
            .unwrap_or_default();
        if self.held.borrow().contains(&topic) {
            *self
                .waiting
                .lock()
                .unwrap()
                .entry(topic.clone())
                .or_default() += 1;
            let _ = self
                .held
                .subscribe()
                .wait_for(|held| !held.contains(&topic))
                .await;
            *self
                .waiting
                .lock()
                .unwrap()
                .entry(topic.clone())
                .or_default() -= 1;
        }
        let target = self.panic_at.lock().unwrap().clone();
        if let Some((t, offset)) = target {
            let hit = events
                .iter()
                .any(|e| *e.source.topic == *t && e.source.offset == offset);
            if hit && !self.fired.swap(true, Ordering::SeqCst) {
                panic!("injected store panic while another partition drains");
            }
        }
        self.inner.write(events).await
    }
}

/// A partition whose task fails while another partition is being drained (its revoke waits on
/// a held write) is supervised by the drain and restarted, not forgotten until the next
/// rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_failing_while_another_drains_is_restarted() {
    use crate::common::wait_until;
    let kafka = Kafka::start();
    let (kept, moved, group) = (unique("kept"), unique("moved"), unique("g"));
    kafka.create_source_topic(&kept, 1).await;
    kafka.create_source_topic(&moved, 1).await;
    let memory = MemoryStore::new();
    let store = DrainRace::new(memory.clone());
    let mut cfg = settings(&kafka.brokers, &kept, &group);
    cfg.kafka.topics.push(moved.clone());
    cfg.pipeline.revoke_timeout = Duration::from_secs(60);
    let a = Running::start(cfg, store.clone(), MemoryDeadLetters::default());
    let mut produced: BTreeSet<(String, i64)> = BTreeSet::new();
    for topic in [&kept, &moved] {
        for (_, o) in kafka.produce_events(topic, 1, 0, 50).await {
            produced.insert((topic.clone(), o));
        }
        kafka
            .probe(&group)
            .wait_committed_to_end(topic, 1, Duration::from_secs(60))
            .await;
    }
    // A write of each topic hangs in flight; the one of `kept` will panic when let go.
    *store.panic_at.lock().unwrap() = Some((kept.clone(), 55));
    for topic in [&kept, &moved] {
        store.hold(topic);
        for (_, o) in kafka.produce_events(topic, 1, 50, 10).await {
            produced.insert((topic.clone(), o));
        }
    }
    let waiting = |topic: &str| {
        store
            .waiting
            .lock()
            .unwrap()
            .get(topic)
            .copied()
            .unwrap_or(0)
    };
    wait_until(
        "a held write of each topic",
        Duration::from_secs(30),
        || {
            let n = (waiting(&kept), waiting(&moved));
            async move { (n.0 > 0 && n.1 > 0).then_some(()).ok_or(format!("{n:?}")) }
        },
    )
    .await;
    // A second member subscribed to `moved` only: the rebalance moves `moved` to it, and `a`
    // drains it (waiting on its held write) while keeping `kept`.
    let b = Running::start(
        settings(&kafka.brokers, &moved, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );
    wait_until("the revoke", Duration::from_secs(60), || {
        let n = a.counter_with("vault_rebalances_total", "kind", "revoke");
        async move { (n >= 1.0).then_some(()).ok_or(format!("{n}")) }
    })
    .await;
    store.release(&kept);
    let fired = store.fired.clone();
    wait_until("the panic in `kept`", Duration::from_secs(30), || {
        let f = fired.load(Ordering::SeqCst);
        async move { f.then_some(()).ok_or("not yet".to_string()) }
    })
    .await;
    // The drain, still waiting for `moved`, sees `kept` end and schedules its restart.
    wait_until(
        "`kept` restarted during the drain",
        Duration::from_secs(30),
        || {
            let n = a
                .metrics
                .partition_restarts
                .with_label_values(&[&kept])
                .get();
            async move { (n >= 1).then_some(()).ok_or(format!("{n}")) }
        },
    )
    .await;
    assert!(
        waiting(&moved) > 0,
        "`kept` failed and was supervised while `moved` was still draining"
    );
    store.release(&moved);
    for topic in [&kept, &moved] {
        kafka
            .probe(&group)
            .wait_committed_to_end(topic, 1, Duration::from_secs(60))
            .await;
    }
    let stored: BTreeSet<(String, i64)> = memory
        .rows()
        .iter()
        .map(|e| (e.source.topic.to_string(), e.source.offset))
        .collect();
    assert_eq!(stored, produced, "nothing lost");
    assert_eq!(
        a.metrics
            .partition_restarts
            .with_label_values(&[&kept])
            .get(),
        1,
        "`kept` was restarted"
    );
    b.stop().await;
    a.stop().await;
}

/// A store whose writes of any record at or after offset 150 panic after `hold` (the batch is
/// abandoned and its partition restarts), for ever; earlier ones are stored.
#[derive(Clone)]
struct PanicsFrom150 {
    inner: MemoryStore,
    hold: Duration,
}

impl Store for PanicsFrom150 {
    async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        if events.iter().any(|e| e.source.offset >= 150) {
            tokio::time::sleep(self.hold).await;
            panic!("injected store panic");
        }
        self.inner.write(events).await
    }
}

/// A partition that keeps failing, after it committed, looks stalled however often it
/// restarts: its stall gauges count on across incarnations (a restart used to reset them, and
/// its restart backoff with them, as if the partition had just caught up), and it keeps owning
/// the partition meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_keeps_failing_after_a_commit_shows_as_stalled_across_restarts() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("keeps-failing"), unique("g"));
    kafka.create_source_topic(&topic, 1).await;
    let first: BTreeSet<_> = kafka
        .produce_events(&topic, 1, 0, 100)
        .await
        .into_iter()
        .collect();
    let memory = MemoryStore::new();
    let store = PanicsFrom150 {
        inner: memory.clone(),
        hold: Duration::from_millis(1500),
    };
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.batch.max_events = 50;
    let vault = Running::start(cfg, store, MemoryDeadLetters::default());
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    let second: BTreeSet<_> = kafka
        .produce_events(&topic, 1, 100, 100)
        .await
        .into_iter()
        .collect();
    let labels = [topic.as_str(), "0"];
    crate::common::wait_until(
        "three restarts, the partition stalled for 8 s",
        Duration::from_secs(90),
        || {
            let restarts = vault.restarts(&topic);
            let stalled = vault
                .metrics
                .seconds_since_commit
                .with_label_values(&labels)
                .get();
            async move {
                (restarts >= 3 && stalled >= 8.0)
                    .then_some(())
                    .ok_or(format!("{restarts} restarts, stalled {stalled:.1} s"))
            }
        },
    )
    .await;
    assert_eq!(
        vault.metrics.assigned_partitions.get(),
        1,
        "still owned while it waits for its restarts"
    );
    assert_eq!(
        stored_positions(&memory),
        first
            .union(&second)
            .filter(|p| p.1 < 150)
            .copied()
            .collect(),
        "everything before the fault is stored"
    );
    vault.stop().await;
}
