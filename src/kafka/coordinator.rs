//! The partition coordinator: the one owner of partition tasks and of offset commits.
//!
//! It receives assignments and revocations from the consumer context over a channel, starts a
//! [`PartitionTask`] per assigned partition, commits each partition's committable offset every
//! `commit_interval` (synchronously, off the runtime; a failed commit is simply re-sent), keeps the
//! per-partition progress gauges, drains revoked partitions
//! and hands their final offsets back for a synchronous commit, restarts a partition whose task
//! failed from its last durable offset, and on shutdown drains everything and commits
//! synchronously.
//!
//! Invariant kept here: the only offsets ever committed are values published by partition tasks
//! through [`SharedOffset`], i.e. ends of durable, in-order batch runs.

use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::kafka::context::{VaultConsumer, VaultContext};
use crate::kafka::offsets::SharedOffset;
use crate::kafka::to_record;
use crate::pipeline::batch::{Batch, InFlightBudget};
use crate::pipeline::batcher::{Exit, OldestPending, PartitionTask};
use crate::pipeline::flush::FlushReason;
use crate::telemetry::{Health, Metrics};

/// A partition whose queue has been split off, ready for a task.
pub struct Assigned {
    pub topic: Arc<str>,
    pub partition: i32,
    pub queue: StreamPartitionQueue<VaultContext>,
}

/// Messages to the coordinator.
pub enum Command {
    Assign(Vec<Assigned>),
    /// Drain these partitions and reply with `(topic, partition, offset to commit)`.
    Revoke {
        partitions: Vec<(String, i32)>,
        /// The assignment was lost (session expired, evicted): this member is out of the group
        /// until it rejoins.
        lost: bool,
        reply: SyncSender<Vec<(String, i32, i64)>>,
    },
    /// A message of an assigned partition arrived on the main queue (should be impossible, as
    /// queues are split before fetching starts). The partition is re-read from that offset.
    Stray {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// A scheduled restart of a failed partition is due.
    Restart {
        topic: Arc<str>,
        partition: i32,
        offset: Option<i64>,
        failures: u32,
    },
}

type Key = (Arc<str>, i32);

/// How often the time-driven partition gauges are refreshed.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

struct Running {
    stop: Option<oneshot::Sender<FlushReason>>,
    abort: AbortHandle,
    progress: Arc<SharedOffset>,
    oldest_pending: Arc<OldestPending>,
    /// Last offset the broker confirmed committed for this partition.
    confirmed: Option<i64>,
    /// When the committed offset last advanced, or was last found fully caught up.
    caught_up_at: Instant,
    /// Consecutive failed restarts, for the restart backoff.
    failures: u32,
}

pub struct Coordinator {
    consumer: Arc<VaultConsumer>,
    settings: Arc<Settings>,
    persist: async_channel::Sender<Batch>,
    budget: InFlightBudget,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    running: HashMap<Key, Running>,
    tasks: JoinSet<(Key, Exit)>,
    ids: HashMap<tokio::task::Id, Key>,
    /// Failed partitions waiting for their restart; still owned by this member.
    restarting: HashMap<Key, u32>,
    commands: mpsc::UnboundedSender<Command>,
    /// The periodic commit in flight, if any: one at a time, each confirmed or re-sent.
    committing: Option<JoinHandle<CommitResult>>,
}

type CommitResult = (Vec<(Key, i64)>, KafkaResult<()>, Duration);

impl Coordinator {
    pub fn new(
        commands: mpsc::UnboundedSender<Command>,
        consumer: Arc<VaultConsumer>,
        settings: Arc<Settings>,
        persist: async_channel::Sender<Batch>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let budget = InFlightBudget::new(settings.config.pipeline.max_in_flight_bytes);
        Coordinator {
            consumer,
            settings,
            persist,
            budget,
            metrics,
            health,
            running: HashMap::new(),
            tasks: JoinSet::new(),
            ids: HashMap::new(),
            restarting: HashMap::new(),
            commands,
            committing: None,
        }
    }

    /// Runs until `shutdown` fires, then drains every partition (cancelling the persisters'
    /// retries via `abandon` once `shutdown_timeout` has passed) and commits synchronously.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
        abandon: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.settings.config.kafka.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut observe = tokio::time::interval(OBSERVE_EVERY);
        observe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => self.handle(cmd).await,
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_task_end(joined).await;
                }
                Some(done) = join_commit(&mut self.committing) => {
                    self.committing = None;
                    self.on_committed(done);
                }
                _ = tick.tick() => self.commit_progress(),
                _ = observe.tick() => self.observe_partitions(),
            }
        }
        if let Some(h) = self.committing.take() {
            let _ = h.await;
        }
        self.health.set_shutting_down();
        self.shutdown(&mut commands, abandon).await;
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Assign(assigned) => {
                for a in assigned {
                    self.start(a, Arc::new(SharedOffset::default()), 0);
                }
                self.health.set_in_group(true);
                self.metrics
                    .assigned_partitions
                    .set(self.running.len() as i64);
            }
            Command::Revoke {
                partitions,
                lost,
                reply,
            } => {
                if lost {
                    self.health.set_in_group(false);
                }
                let keys: Vec<Key> = partitions
                    .into_iter()
                    .map(|(t, p)| (Arc::from(t), p))
                    .collect();
                let deadline = Instant::now() + self.settings.config.pipeline.revoke_timeout;
                let finals = self.drain(&keys, FlushReason::Revoke, deadline).await;
                self.metrics
                    .assigned_partitions
                    .set(self.running.len() as i64);
                let _ = reply.send(finals);
            }
            Command::Stray {
                topic,
                partition,
                offset,
            } => {
                error!(topic, partition, offset, "Message of an assigned partition arrived on the main queue; re-reading the partition from it.");
                let key: Key = (Arc::from(topic), partition);
                if let Some(r) = self.running.remove(&key) {
                    r.abort.abort();
                    self.schedule_restart(key, Some(offset), r.failures);
                }
            }
            Command::Restart {
                topic,
                partition,
                offset,
                failures,
            } => {
                let key: Key = (topic, partition);
                if self.restarting.remove(&key).is_some() {
                    self.restart(key, offset, failures).await;
                }
            }
        }
    }

    fn start(&mut self, a: Assigned, progress: Arc<SharedOffset>, failures: u32) {
        let key: Key = (a.topic.clone(), a.partition);
        let (stop_tx, stop_rx) = oneshot::channel();
        let oldest_pending = Arc::new(OldestPending::default());
        let task = PartitionTask {
            topic: a.topic.clone(),
            partition: a.partition,
            policy: self.settings.flush,
            max_in_flight: self.settings.config.batch.max_in_flight,
            persist: self.persist.clone(),
            committable: progress.clone(),
            oldest_pending: oldest_pending.clone(),
            budget: self.budget.clone(),
            metrics: self.metrics.clone(),
        };
        let max_event_bytes = self.settings.config.pipeline.max_event_bytes;
        let topic = a.topic;
        let queue = a.queue;
        let task_key = key.clone();
        let abort = self.tasks.spawn(async move {
            let records = queue.stream().filter_map(|m| {
                let r = match m {
                    Ok(m) => Some(to_record(&m, &topic, max_event_bytes)),
                    Err(e) => {
                        warn!(topic = %topic, error = %e, "Error reading partition; continuing.");
                        None
                    }
                };
                std::future::ready(r)
            });
            let exit = task.run(records, stop_rx).await;
            (task_key, exit)
        });
        self.ids.insert(abort.id(), key.clone());
        if let Some(old) = self.running.insert(
            key,
            Running {
                stop: Some(stop_tx),
                abort,
                progress,
                oldest_pending,
                confirmed: None,
                caught_up_at: Instant::now(),
                failures,
            },
        ) {
            old.abort.abort();
        }
    }

    /// Stops the given partitions, waits for them until `deadline`, and returns their final
    /// committable offsets. Partitions that miss the deadline are aborted; what they had made
    /// durable and published is still returned.
    async fn drain(
        &mut self,
        keys: &[Key],
        reason: FlushReason,
        deadline: Instant,
    ) -> Vec<(String, i32, i64)> {
        let mut waiting: Vec<Key> = Vec::new();
        for key in keys {
            self.restarting.remove(key);
            if let Some(r) = self.running.get_mut(key) {
                if let Some(stop) = r.stop.take() {
                    let _ = stop.send(reason);
                }
                waiting.push(key.clone());
            }
        }
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(Ok((id, (key, exit))))) => {
                    self.ids.remove(&id);
                    if let Some(pos) = waiting.iter().position(|k| *k == key) {
                        waiting.swap_remove(pos);
                        if let Exit::Failed { reason, .. } = &exit {
                            warn!(topic = %key.0, partition = key.1, reason, "Partition stopped with an abandoned batch; committing only what is durable.");
                        }
                    } else {
                        // Another partition ended on its own while we drain: supervise it.
                        self.on_task_end(Ok((id, (key, exit)))).await;
                    }
                }
                Ok(Some(Err(e))) => {
                    if let Some(key) = self.ids.remove(&e.id()) {
                        waiting.retain(|k| *k != key);
                        error!(topic = %key.0, partition = key.1, error = %e, "Partition task panicked while draining.");
                    }
                }
                Ok(None) => break,
                Err(_elapsed) => {
                    for key in &waiting {
                        warn!(topic = %key.0, partition = key.1, "Partition did not drain in time; letting it go uncommitted past its last durable batch.");
                        if let Some(r) = self.running.get(key) {
                            r.abort.abort();
                        }
                    }
                    break;
                }
            }
        }
        let mut finals = Vec::new();
        for key in keys {
            self.metrics.forget_partition(&key.0, key.1);
            if let Some(r) = self.running.remove(key) {
                if let Some(o) = r.progress.get() {
                    finals.push((key.0.to_string(), key.1, o));
                }
            }
        }
        finals
    }

    async fn on_task_end(
        &mut self,
        joined: Result<(tokio::task::Id, (Key, Exit)), tokio::task::JoinError>,
    ) {
        let (key, resume_at) = match joined {
            Ok((id, (key, exit))) => {
                self.ids.remove(&id);
                match exit {
                    Exit::Drained { .. } | Exit::StreamEnded { .. } => {
                        // Stopped on purpose (or the consumer is closing): nothing to supervise.
                        if self.running.get(&key).is_some_and(|r| r.stop.is_some()) {
                            warn!(topic = %key.0, partition = key.1, "Partition stream ended while assigned.");
                        }
                        return;
                    }
                    Exit::Failed {
                        committable,
                        first_offset,
                        reason,
                    } => {
                        error!(topic = %key.0, partition = key.1, reason, "Partition failed; restarting it from its last durable offset.");
                        (key, committable.or(first_offset))
                    }
                }
            }
            Err(e) => {
                let Some(key) = self.ids.remove(&e.id()) else {
                    return;
                };
                if e.is_cancelled() {
                    return;
                }
                error!(topic = %key.0, partition = key.1, error = %e, "Partition task panicked; restarting it from its last durable offset.");
                let resume = self.running.get(&key).and_then(|r| r.progress.get());
                (key, resume)
            }
        };
        let Some(r) = self.running.remove(&key) else {
            return;
        };
        self.metrics
            .partition_restarts
            .with_label_values(&[&key.0])
            .inc();
        self.schedule_restart(key, resume_at, r.failures + 1);
    }

    /// Restarts a partition after a backoff that grows with consecutive failures (0.5 s doubling
    /// to 30 s), without holding up the coordinator meanwhile.
    fn schedule_restart(&mut self, key: Key, offset: Option<i64>, failures: u32) {
        let delay = Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30));
        self.restarting.insert(key.clone(), failures);
        let commands = self.commands.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = commands.send(Command::Restart {
                topic: key.0,
                partition: key.1,
                offset,
                failures,
            });
        });
    }

    /// Re-reads a partition from `offset` (or from where the consumer stands when `None`) with a
    /// fresh task.
    async fn restart(&mut self, key: Key, offset: Option<i64>, failures: u32) {
        if let Some(offset) = offset {
            let consumer = self.consumer.clone();
            let (topic, partition) = (key.0.to_string(), key.1);
            let sought = tokio::task::spawn_blocking(move || {
                consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                )
            })
            .await;
            match sought {
                Ok(Ok(())) => {
                    info!(topic = %key.0, partition = key.1, offset, "Partition rewound.")
                }
                Ok(Err(e)) => {
                    error!(topic = %key.0, partition = key.1, offset, error = %e, "Seek failed; the partition is left idle until the next rebalance.")
                }
                Err(e) => error!(error = %e, "Seek task failed."),
            }
        }
        match self.consumer.split_partition_queue(&key.0, key.1) {
            Some(queue) => self.start(
                Assigned {
                    topic: key.0.clone(),
                    partition: key.1,
                    queue,
                },
                Arc::new(SharedOffset::default()),
                failures,
            ),
            None => {
                error!(topic = %key.0, partition = key.1, "Cannot split the partition queue for a restart.")
            }
        }
    }

    /// Commits every partition whose committable offset is ahead of what the broker confirmed.
    /// Synchronous, on the blocking pool, one at a time: a commit that fails (e.g. during a
    /// rebalance) leaves `confirmed` behind, so the next tick simply sends it again.
    fn commit_progress(&mut self) {
        if self.committing.is_some() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let mut sent = Vec::new();
        for (key, r) in &self.running {
            if let Some(o) = r.progress.get() {
                if r.confirmed != Some(o)
                    && tpl
                        .add_partition_offset(&key.0, key.1, Offset::Offset(o))
                        .is_ok()
                {
                    sent.push((key.clone(), o));
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        let consumer = self.consumer.clone();
        self.committing = Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = consumer.commit(&tpl, CommitMode::Sync);
            (sent, result, started.elapsed())
        }));
    }

    /// Per-partition gauges that only time moves: how long the oldest event read but not yet
    /// durable has waited, and how long since the committed offset last caught up.
    fn observe_partitions(&mut self) {
        self.metrics
            .in_flight_bytes
            .set(self.budget.in_use() as i64);
        let now = Instant::now();
        for (key, r) in &mut self.running {
            let oldest = r.oldest_pending.get();
            if oldest.is_none() && r.progress.get() == r.confirmed {
                r.caught_up_at = now;
            }
            let partition = key.1.to_string();
            let labels = [&*key.0, partition.as_str()];
            self.metrics
                .oldest_uncommitted_age
                .with_label_values(&labels)
                .set(oldest.map_or(0.0, |t| (now - t).as_secs_f64()));
            self.metrics
                .seconds_since_commit
                .with_label_values(&labels)
                .set((now - r.caught_up_at).as_secs_f64());
        }
    }

    fn on_committed(&mut self, done: Result<CommitResult, tokio::task::JoinError>) {
        match done {
            Ok((sent, Ok(()), took)) => {
                self.metrics.commits.with_label_values(&["ok"]).inc();
                self.metrics.commit_duration.observe(took.as_secs_f64());
                let now = Instant::now();
                for (key, o) in sent {
                    self.metrics
                        .committed_offset
                        .with_label_values(&[&*key.0, &key.1.to_string()])
                        .set(o);
                    if let Some(r) = self.running.get_mut(&key) {
                        r.confirmed = Some(o);
                        r.caught_up_at = now;
                        r.failures = 0;
                    }
                }
            }
            Ok((_, Err(e), took)) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                self.metrics.commit_duration.observe(took.as_secs_f64());
                warn!(error = %e, "Offset commit failed; it is sent again at the next interval.");
            }
            Err(e) => error!(error = %e, "Commit task failed."),
        }
    }

    async fn shutdown(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        abandon: CancellationToken,
    ) {
        self.restarting.clear();
        let keys: Vec<Key> = self.running.keys().cloned().collect();
        info!(
            partitions = keys.len(),
            "Shutting down: flushing partial batches and waiting for writes."
        );
        let timeout = self.settings.config.pipeline.shutdown_timeout;
        let deadline = Instant::now() + timeout;
        // Past the deadline, persisters stop retrying and abandon their batches so the drain can
        // finish; abandoned batches are not committed.
        let abandon_at = abandon.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            warn!(
                "Shutdown timeout reached; abandoning unfinished writes (they will be replayed)."
            );
            abandon_at.cancel();
        });
        let finals = self
            .drain(
                &keys,
                FlushReason::Shutdown,
                deadline + Duration::from_secs(5),
            )
            .await;
        timer.abort();
        self.final_commit(finals, commands).await;
        self.tasks.shutdown().await;
        // Answer anything the context is still waiting on, so the consumer can close.
        commands.close();
        while let Ok(cmd) = commands.try_recv() {
            if let Command::Revoke { reply, .. } = cmd {
                let _ = reply.send(Vec::new());
            }
        }
    }
}

impl Coordinator {
    /// Commits the drained partitions' final offsets. A commit the broker refuses while a
    /// rebalance is in progress is sent again for up to [`FINAL_COMMIT_RETRY`]; meanwhile a
    /// revocation of some of these partitions is answered with their final offsets, so the
    /// context commits them inside the rebalance. What is still refused after that is
    /// replayed by the next owner (never lost: it is below nothing unwritten).
    async fn final_commit(
        &mut self,
        finals: Vec<(String, i32, i64)>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) {
        let mut pending = finals;
        let retry_until = Instant::now() + FINAL_COMMIT_RETRY;
        while !pending.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (t, p, o) in &pending {
                let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
            }
            let consumer = self.consumer.clone();
            let started = std::time::Instant::now();
            let committed =
                tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await;
            self.metrics
                .commit_duration
                .observe(started.elapsed().as_secs_f64());
            match committed {
                Ok(Ok(())) => {
                    info!(partitions = pending.len(), "Final offsets committed.");
                    return;
                }
                Ok(Err(e)) if is_rebalance_refusal(&e) && Instant::now() < retry_until => {
                    warn!(error = %e, "Final commit refused during a rebalance; sending it again.");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        Some(cmd) = commands.recv() => {
                            if let Command::Revoke { partitions, reply, .. } = cmd {
                                let (revoked, kept): (Vec<_>, Vec<_>) = pending
                                    .into_iter()
                                    .partition(|(t, p, _)| partitions.iter().any(|(rt, rp)| rt == t && rp == p));
                                pending = kept;
                                let _ = reply.send(revoked);
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    error!(error = %e, "Final commit failed; the next owner replays from the previous commit.");
                    return;
                }
                Err(e) => {
                    error!(error = %e, "Final commit task failed.");
                    return;
                }
            }
        }
    }
}

/// How long shutdown keeps re-sending a final commit the broker refuses during a rebalance.
const FINAL_COMMIT_RETRY: Duration = Duration::from_secs(5);

/// Commit errors that mean "not now, a rebalance is under way" rather than "never".
fn is_rebalance_refusal(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e,
        rdkafka::error::KafkaError::ConsumerCommit(
            C::RebalanceInProgress
                | C::IllegalGeneration
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
        )
    )
}

/// Resolves with the in-flight commit's result; never, when none is in flight.
async fn join_commit(
    h: &mut Option<JoinHandle<CommitResult>>,
) -> Option<Result<CommitResult, tokio::task::JoinError>> {
    match h {
        Some(h) => Some(h.await),
        None => std::future::pending().await,
    }
}
