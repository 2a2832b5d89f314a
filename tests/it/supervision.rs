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
    assert_eq!(
        vault
            .metrics
            .partition_restarts
            .with_label_values(&[&topic])
            .get(),
        1
    );
    // The persister pool survived: the stream keeps flowing after the restart.
    let more = kafka
        .produce_and_wait_committed(&topic, &group, partitions, 600, 200)
        .await;
    assert!(more.is_subset(&stored_positions(&memory)));
    vault.stop().await;
}
