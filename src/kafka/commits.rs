//! Offset commits: the one owner of every commit vault sends (periodic, on revoke, on shutdown).
//!
//! Invariants kept here:
//! - only offsets handed in by the coordinator are committed, and the coordinator only hands in
//!   committable offsets published by partition tasks (ends of durable, in-order batch runs);
//! - commits are sent one at a time, synchronously, on the blocking pool: a revoke or final
//!   commit first waits for the periodic commit in flight (up to `KAFKA_CALL_TIMEOUT`), so two
//!   commits of one partition land in order. Only a periodic commit not answered within that
//!   bound may land after the next one; it carries an offset that was durable, so the worst
//!   case is a replay, never a loss;
//! - within an assignment a partition's committed offset never moves backwards: an offset at or
//!   below the last one the broker confirmed is not sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::kafka::context::VaultConsumer;
use crate::pipeline::deadline::KAFKA_CALL_TIMEOUT;
use crate::telemetry::Metrics;

/// A partition: topic and partition number.
pub type Key = (Arc<str>, i32);

type Outcome = (Vec<(Key, i64)>, KafkaResult<()>, Duration);

/// What sends a synchronous commit: the consumer (or, in tests, a double that records them).
pub trait Committer: Send + Sync + 'static {
    fn commit_sync(&self, offsets: &[(Key, i64)]) -> KafkaResult<()>;
}

impl Committer for VaultConsumer {
    fn commit_sync(&self, offsets: &[(Key, i64)]) -> KafkaResult<()> {
        commit_sync(self, offsets)
    }
}

/// The committer. Owned by the coordinator.
pub struct Commits<C: Committer = VaultConsumer> {
    consumer: Arc<C>,
    metrics: Arc<Metrics>,
    /// Last offset the broker confirmed per partition of the current assignment.
    confirmed: HashMap<Key, i64>,
    in_flight: Option<JoinHandle<Outcome>>,
}

impl<C: Committer> Commits<C> {
    pub fn new(consumer: Arc<C>, metrics: Arc<Metrics>) -> Self {
        Commits {
            consumer,
            metrics,
            confirmed: HashMap::new(),
            in_flight: None,
        }
    }

    /// The last offset the broker confirmed for `key` in this assignment.
    pub fn confirmed(&self, key: &Key) -> Option<i64> {
        self.confirmed.get(key).copied()
    }

    /// The partition left this member: its next assignment starts afresh, and its committed
    /// offset series goes (the revoke's own commit set it again after the drain removed it), so
    /// only its new owner reports it.
    pub fn forget(&mut self, key: &Key) {
        self.confirmed.remove(key);
        let _ = self
            .metrics
            .committed_offset
            .remove_label_values(&[&*key.0, &key.1.to_string()]);
    }

    fn ahead(&self, offsets: impl IntoIterator<Item = (Key, i64)>) -> Vec<(Key, i64)> {
        ahead(&self.confirmed, offsets)
    }

    /// Starts a periodic commit of the offsets that are ahead of what the broker confirmed,
    /// unless a commit is already in flight (the next tick sends what this one skips).
    pub fn start(&mut self, offsets: impl IntoIterator<Item = (Key, i64)>) {
        if self.in_flight.is_some() {
            return;
        }
        let sent = self.ahead(offsets);
        if sent.is_empty() {
            return;
        }
        let consumer = self.consumer.clone();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = consumer.commit_sync(&sent);
            (sent, result, started.elapsed())
        }));
    }

    /// Resolves when the periodic commit in flight completes; never when none is.
    pub async fn completed(&mut self) {
        match &mut self.in_flight {
            Some(h) => {
                let done = h.await;
                self.in_flight = None;
                self.record(
                    done,
                    "Offset commit failed; it is sent again at the next interval.",
                );
            }
            None => std::future::pending().await,
        }
    }

    /// Waits for the commit in flight, then commits `offsets` synchronously (revoke, shutdown).
    /// Offsets not ahead of the confirmed ones are left out; `Ok` when there is nothing to send.
    ///
    /// Each wait is bounded by [`KAFKA_CALL_TIMEOUT`]: librdkafka's synchronous commit has no
    /// timeout of its own (it waits for a coordinator). A commit not answered in time is treated
    /// as failed; should it land later, it carries a durable offset, so the consequence is a
    /// replay, never a loss.
    pub async fn commit_now(&mut self, offsets: Vec<(Key, i64)>) -> KafkaResult<()> {
        if let Some(h) = self.in_flight.take() {
            match tokio::time::timeout(KAFKA_CALL_TIMEOUT, h).await {
                Ok(done) => self.record(
                    done,
                    "Offset commit failed before a revoke or final commit.",
                ),
                Err(_) => warn!("The periodic commit in flight did not finish in time."),
            }
        }
        let sent = self.ahead(offsets);
        if sent.is_empty() {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let committing = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = consumer.commit_sync(&sent);
            (sent, result, started.elapsed())
        });
        let Ok(done) = tokio::time::timeout(KAFKA_CALL_TIMEOUT, committing).await else {
            self.metrics.commits.with_label_values(&["error"]).inc();
            warn!(waited = ?KAFKA_CALL_TIMEOUT, "Offset commit not answered in time; treated as failed.");
            return Err(KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
            ));
        };
        let result = match &done {
            Ok((_, r, _)) => r.clone(),
            Err(_) => Err(KafkaError::Canceled),
        };
        self.record(done, "Offset commit failed.");
        result
    }

    fn record(&mut self, done: Result<Outcome, tokio::task::JoinError>, failed: &str) {
        match done {
            Ok((sent, Ok(()), took)) => {
                self.metrics.commits.with_label_values(&["ok"]).inc();
                self.metrics.commit_duration.observe(took.as_secs_f64());
                for (key, o) in sent {
                    self.metrics
                        .committed_offset
                        .with_label_values(&[&*key.0, &key.1.to_string()])
                        .set(o);
                    let c = self.confirmed.entry(key).or_insert(o);
                    *c = (*c).max(o);
                }
            }
            Ok((_, Err(e), took)) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                self.metrics.commit_duration.observe(took.as_secs_f64());
                warn!(error = %e, "{failed}");
            }
            Err(e) => error!(error = %e, "Commit task failed."),
        }
    }
}

/// The offsets of `offsets` that move their partition forward of what the broker confirmed.
fn ahead(
    confirmed: &HashMap<Key, i64>,
    offsets: impl IntoIterator<Item = (Key, i64)>,
) -> Vec<(Key, i64)> {
    offsets
        .into_iter()
        .filter(|(k, o)| confirmed.get(k).is_none_or(|c| o > c))
        .collect()
}

fn commit_sync(consumer: &VaultConsumer, offsets: &[(Key, i64)]) -> KafkaResult<()> {
    if offsets
        .iter()
        .any(|(k, o)| crate::failpoint::hit("kafka::commit", &k.0, Some(*o)))
    {
        return Err(KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::RebalanceInProgress,
        ));
    }
    let mut tpl = TopicPartitionList::new();
    for (key, o) in offsets {
        tpl.add_partition_offset(&key.0, key.1, Offset::Offset(*o))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)
}

/// Commit errors that mean "not now, a rebalance is under way" rather than "never".
pub fn is_rebalance_refusal(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e,
        KafkaError::ConsumerCommit(
            C::RebalanceInProgress
                | C::IllegalGeneration
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records commits as they start and end; holds the first until released.
    struct Held {
        log: std::sync::Mutex<Vec<String>>,
        release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl Committer for Held {
        fn commit_sync(&self, offsets: &[(Key, i64)]) -> KafkaResult<()> {
            let o = offsets[0].1;
            self.log.lock().unwrap().push(format!("start {o}"));
            if let Some(release) = self.release.lock().unwrap().take() {
                let _ = release.recv();
            }
            self.log.lock().unwrap().push(format!("end {o}"));
            Ok(())
        }
    }

    /// A revoke commit sent while the periodic one is still in flight could land first and be
    /// overwritten by the older offset after the partition is handed over: it waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoke_commit_waits_for_the_periodic_commit_in_flight() {
        let key: Key = (Arc::from("t"), 0);
        let (release, held) = std::sync::mpsc::channel();
        let committer = Arc::new(Held {
            log: Default::default(),
            release: std::sync::Mutex::new(Some(held)),
        });
        let log = || committer.log.lock().unwrap().clone();
        let mut commits = Commits::new(committer.clone(), Arc::new(Metrics::new()));
        commits.start([(key.clone(), 10)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the periodic commit started"
            );
            tokio::task::yield_now().await;
        }
        let revoke = tokio::spawn(async move {
            let sent = commits.commit_now(vec![(key.clone(), 20)]).await;
            (sent, commits)
        });
        // Were the revoke commit sent now, it would start within this second.
        let waited = tokio::time::timeout(Duration::from_secs(1), async {
            while log().len() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(waited.is_err(), "the revoke commit overtook: {:?}", log());
        release.send(()).unwrap();
        let (sent, commits) = revoke.await.unwrap();
        sent.unwrap();
        assert_eq!(log(), ["start 10", "end 10", "start 20", "end 20"]);
        assert_eq!(commits.confirmed(&(Arc::from("t"), 0)), Some(20));
    }

    struct Accepts;

    impl Committer for Accepts {
        fn commit_sync(&self, _: &[(Key, i64)]) -> KafkaResult<()> {
            Ok(())
        }
    }

    /// The partitions with a `vault_committed_offset` series, as (partition, offset).
    fn committed_series(metrics: &Metrics) -> Vec<(String, f64)> {
        use prometheus::core::Collector;
        let mut series: Vec<(String, f64)> = metrics
            .committed_offset
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| {
                let partition = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "partition")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                (partition, m.get_gauge().get_value())
            })
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series
    }

    /// A partition that left this member reports no committed offset here any more (its new
    /// owner does), and its next assignment starts with nothing confirmed.
    #[tokio::test]
    async fn a_forgotten_partition_loses_its_committed_offset_series() {
        let key = |p| (Arc::<str>::from("t"), p);
        let metrics = Arc::new(Metrics::new());
        let mut commits = Commits::new(Arc::new(Accepts), metrics.clone());
        commits
            .commit_now(vec![(key(0), 10), (key(1), 20)])
            .await
            .unwrap();
        assert_eq!(
            committed_series(&metrics),
            [("0".to_owned(), 10.0), ("1".to_owned(), 20.0)]
        );
        commits.forget(&key(0));
        assert_eq!(committed_series(&metrics), [("1".to_owned(), 20.0)]);
        assert_eq!(commits.confirmed(&key(0)), None);
        assert_eq!(commits.confirmed(&key(1)), Some(20));
    }

    #[test]
    fn a_commit_never_moves_a_partition_backwards() {
        let key = |p| (Arc::<str>::from("t"), p);
        let confirmed = HashMap::from([(key(0), 100), (key(1), 50)]);
        let sent = ahead(
            &confirmed,
            [(key(0), 90), (key(0), 100), (key(1), 51), (key(2), 7)],
        );
        assert_eq!(sent, [(key(1), 51), (key(2), 7)]);
    }
}
