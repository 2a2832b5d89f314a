//! The partition coordinator: the one owner of partition tasks, their supervision and their
//! cancellation.
//!
//! It receives assignments, revocations and fatal errors from the consumer context over a
//! channel, starts a [`PartitionTask`] per assigned partition, hands committable offsets to
//! [`Commits`] every `commit_interval`, keeps the per-partition progress gauges, drains revoked
//! partitions and commits their final offsets before the rebalance callback returns, restarts a
//! failed partition from [`Progress::resume_at`], and on shutdown (or a fatal error) drains
//! everything and commits what is durable.
//!
//! Invariants kept here:
//! - the only offsets ever committed are committable offsets published by partition tasks,
//!   i.e. ends of durable, in-order batch runs;
//! - supervision with incarnations: each task started for a partition is a new incarnation with
//!   its own id, [`Progress`] and cancellation token. Its exit carries the id; the exit of a
//!   replaced incarnation is ignored. A scheduled restart carries a ticket, and only the ticket
//!   still on file for the partition starts it, so a restart scheduled before a revocation can
//!   never seek the partition after it has been assigned again;
//! - a restarted incarnation starts only after a successful seek to where the previous one must
//!   resume; a failed seek schedules another try instead;
//! - cancellation: an incarnation's token (a child of the process-wide abandon token) fires when
//!   it is replaced, when it fails, and at its stop's abandon deadline, so its batches stop
//!   retrying while the partition's next owner writes the same rows.

use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::Offset;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::failpoint;
use crate::kafka::commits::{is_rebalance_refusal, Commits, Key};
use crate::kafka::context::{VaultConsumer, VaultContext};
use crate::kafka::resume::{self, Progress};
use crate::kafka::to_record;
use crate::pipeline::batch::{Batch, InFlightBudget, PartitionHealth};
use crate::pipeline::batcher::{Exit, OldestPending, PartitionTask};
use crate::pipeline::deadline::{self, Deadlines, Stop};
use crate::pipeline::flush::FlushReason;
use crate::telemetry::health::{beating, Loop};
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
    /// Drain these partitions, commit their final offsets (unless `lost`), then reply.
    Revoke {
        partitions: Vec<(String, i32)>,
        /// The assignment was lost (session expired, evicted): this member is out of the group
        /// until it rejoins, and a commit would be refused.
        lost: bool,
        /// When the rebalance callback began to wait: the revoke's deadlines count from here.
        since: std::time::Instant,
        reply: SyncSender<()>,
    },
    /// A message of an assigned partition arrived on the main queue (a partition queue was
    /// dropped and not yet split again). The partition restarts from where it must resume.
    Stray {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// A scheduled restart of a failed partition is due.
    Restart {
        topic: Arc<str>,
        partition: i32,
        ticket: u64,
    },
    /// librdkafka reported a fatal error (e.g. this static member was fenced): the consumer can
    /// no longer take part in the group. Drain, commit what may be, and exit non-zero.
    Fatal(String),
}

/// How often the time-driven partition gauges are refreshed.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

struct Running {
    incarnation: u64,
    stop: Option<oneshot::Sender<FlushReason>>,
    abort: AbortHandle,
    cancel: CancellationToken,
    progress: Arc<Progress>,
    oldest_pending: Arc<OldestPending>,
    /// What this incarnation inherited, kept up to date by the gauges (its `ceiling` unused:
    /// that is a restart's).
    lineage: Lineage,
}

/// The last message a partition task read: when, and its Kafka timestamp. Written for every
/// message read (two relaxed atomic stores, no lock, no clock), read by the per-partition
/// gauges, which date the reads they find: "when" is the first look after the read. The gauges
/// look once a second from the coordinator's loop, between its commands, so a read made while
/// a command (a revoke's drain) runs is dated when the command ends.
#[derive(Debug, Default)]
struct LastRead {
    /// Kafka timestamp (ms since the epoch) of the last message read that had one; 0: none.
    kafka_ms: std::sync::atomic::AtomicI64,
    /// A message was read since the gauges last looked.
    read_since_look: std::sync::atomic::AtomicBool,
    /// When the gauges last found a read (only they touch it).
    at: std::sync::Mutex<Option<Instant>>,
}

impl LastRead {
    fn note(&self, kafka_ms: Option<i64>) {
        if let Some(ms) = kafka_ms.filter(|ms| *ms > 0) {
            self.kafka_ms
                .store(ms, std::sync::atomic::Ordering::Relaxed);
        }
        self.read_since_look
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn kafka_ms(&self) -> Option<i64> {
        Some(self.kafka_ms.load(std::sync::atomic::Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// When the last read happened, as of a look at `now`: `now` if one happened since the
    /// previous look.
    fn at(&self, now: Instant) -> Option<Instant> {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .read_since_look
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            *at = Some(now);
        }
        *at
    }
}

/// Seconds behind for a partition (`vault_consumer_lag_seconds`): 0 when nothing is left to
/// read; else how old the last message read is (the next one, unread, was produced at or after
/// it, so this bounds the oldest unread message's age from above and is exact when the
/// partition is read steadily); before the first read of this incarnation, how long it has
/// run. `None` while librdkafka has not reported the partition's lag.
fn lag_seconds(
    lag: Option<i64>,
    last_read_kafka_ms: Option<i64>,
    now_ms: i64,
    running_for: Duration,
) -> Option<f64> {
    match (lag?, last_read_kafka_ms) {
        (l, _) if l <= 0 => Some(0.0),
        (_, Some(ms)) => Some((now_ms - ms).max(0) as f64 / 1000.0),
        (_, None) => Some(running_for.as_secs_f64()),
    }
}

/// How long the oldest event read and not yet durable has waited; with none waiting while the
/// partition is behind (messages left to read, none being read), how long since it last read
/// (or started): a partition that reads nothing is as stuck as one whose write never ends.
fn oldest_uncommitted_age(
    now: Instant,
    oldest_pending: Option<Instant>,
    behind: bool,
    last_read: Option<Instant>,
    started_at: Instant,
) -> Duration {
    match oldest_pending {
        Some(t) => now - t,
        None if behind => now - last_read.unwrap_or(started_at).max(started_at),
        None => Duration::ZERO,
    }
}

/// A failed partition waiting for its restart; still owned by this member.
#[derive(Debug)]
struct PendingRestart {
    ticket: u64,
    resume_at: Option<i64>,
    lineage: Lineage,
}

/// What a partition's next incarnation inherits from the one before: the failures in a row
/// (the restart backoff doubles with each, and only an advancing commit resets them), whether
/// it is failing, and what its stall gauges count from. A partition that keeps failing must
/// look stalled, however often it restarts.
#[derive(Debug, Clone)]
struct Lineage {
    failures: u32,
    health: PartitionHealth,
    /// When the committed offset last advanced, or the partition was last caught up.
    caught_up_at: Instant,
    /// When this member started owning the partition.
    owned_since: Instant,
    last_read: Arc<LastRead>,
    /// The committed offset last seen, to tell when it advances.
    last_confirmed: Option<i64>,
    /// A stray's offset (a record of the partition taken off the main queue): the restart
    /// never starts after it, also where it starts from the committed offset.
    ceiling: Option<i64>,
}

impl Lineage {
    /// A partition just assigned.
    fn fresh() -> Lineage {
        let now = Instant::now();
        Lineage {
            failures: 0,
            health: PartitionHealth::default(),
            caught_up_at: now,
            owned_since: now,
            last_read: Arc::default(),
            last_confirmed: None,
            ceiling: None,
        }
    }

    /// One more failure in a row.
    fn failed_again(mut self) -> Lineage {
        self.failures += 1;
        self
    }
}

impl Running {
    /// What the next incarnation inherits from this one. A stray's ceiling bounds restarts
    /// until an incarnation knows its own position: one that read nothing and was not sought to
    /// a durable start (it failed at once) passes it on, so its restart still never starts
    /// after the stray.
    fn lineage(&self) -> Lineage {
        let ceiling = if self.progress.resume_at().is_none() {
            self.lineage.ceiling
        } else {
            None
        };
        Lineage {
            ceiling,
            ..self.lineage.clone()
        }
    }
}

/// The restarts on file: one per failed partition, under a ticket. Only the ticket on file
/// starts the restart, so a restart scheduled before its partition was revoked (and perhaps
/// assigned again), or before a newer failure, is void.
#[derive(Debug, Default)]
struct Restarts {
    pending: HashMap<Key, PendingRestart>,
    next_ticket: u64,
}

impl Restarts {
    /// Files a restart of `key`, replacing any earlier one; returns its ticket.
    fn schedule(&mut self, key: Key, resume_at: Option<i64>, lineage: Lineage) -> u64 {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.pending.insert(
            key,
            PendingRestart {
                ticket,
                resume_at,
                lineage,
            },
        );
        ticket
    }

    /// The restart due under `ticket`, if that ticket is still the one on file.
    fn take_due(&mut self, key: &Key, ticket: u64) -> Option<PendingRestart> {
        if self.pending.get(key).is_some_and(|p| p.ticket == ticket) {
            self.pending.remove(key)
        } else {
            None
        }
    }

    /// A stray of a partition waiting for its restart: the restart starts at or below it.
    fn lower(&mut self, key: &Key, stray: i64) -> bool {
        let Some(p) = self.pending.get_mut(key) else {
            return false;
        };
        p.resume_at = resume::after_stray(p.resume_at, stray);
        p.lineage.ceiling = Some(p.lineage.ceiling.map_or(stray, |c| c.min(stray)));
        true
    }

    /// The partition left this member (or was assigned afresh): no restart of it is due.
    fn cancel(&mut self, key: &Key) {
        self.pending.remove(key);
    }

    fn clear(&mut self) {
        self.pending.clear();
    }

    fn len(&self) -> usize {
        self.pending.len()
    }
}

/// How a partition task ended, as the coordinator sees it.
enum Ended {
    Exited(Key, u64, Exit),
    Panicked(Key, u64, String),
    /// Aborted on purpose: its replacement (or nobody) owns the partition now.
    Aborted,
}

pub struct Coordinator {
    consumer: Arc<VaultConsumer>,
    settings: Arc<Settings>,
    persist: async_channel::Sender<Batch>,
    budget: InFlightBudget,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    deadlines: Deadlines,
    commits: Commits,
    /// The process-wide abandon token; every incarnation's token is a child of it.
    abandon: CancellationToken,
    running: HashMap<Key, Running>,
    tasks: JoinSet<(Key, u64, Exit)>,
    ids: HashMap<tokio::task::Id, (Key, u64)>,
    restarting: Restarts,
    /// Source of incarnation ids and restart tickets.
    next_id: u64,
    commands: mpsc::UnboundedSender<Command>,
    fatal: Option<String>,
}

impl Coordinator {
    pub fn new(
        commands: mpsc::UnboundedSender<Command>,
        consumer: Arc<VaultConsumer>,
        settings: Arc<Settings>,
        persist: async_channel::Sender<Batch>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        abandon: CancellationToken,
    ) -> Self {
        let budget = InFlightBudget::new(settings.config.pipeline.max_in_flight_bytes);
        let deadlines = settings.deadlines();
        Coordinator {
            commits: Commits::new(consumer.clone(), metrics.clone()),
            consumer,
            settings,
            persist,
            budget,
            metrics,
            health,
            deadlines,
            abandon,
            running: HashMap::new(),
            tasks: JoinSet::new(),
            ids: HashMap::new(),
            restarting: Restarts::default(),
            next_id: 0,
            commands,
            fatal: None,
        }
    }

    /// Runs until `shutdown` fires or a fatal error arrives, then drains every partition
    /// (abandoning unfinished writes at `shutdown_timeout`) and commits what is durable.
    /// Returns the fatal error, if one ended the run.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let mut tick = tokio::time::interval(self.settings.config.kafka.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut observe = tokio::time::interval(OBSERVE_EVERY);
        observe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let health = self.health.clone();
        let command_bound = self.deadlines.revoke_reply_wait();
        while self.fatal.is_none() {
            health.beat(Loop::Coordinator);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Handling a command waits on bounded calls (a revoke's drain and commit at
                // most `revoke_reply_wait`): the loop beats meanwhile, up to that bound.
                Some(cmd) = commands.recv() => {
                    beating(&health, Loop::Coordinator, command_bound, self.handle(cmd)).await
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let ended = self.ended(joined);
                    self.on_task_end(ended);
                }
                () = self.commits.completed() => {}
                _ = tick.tick() => self.commit_progress(),
                _ = observe.tick() => {
                    self.wedge_if_told().await;
                    self.observe_partitions();
                }
            }
        }
        self.health.set_shutting_down();
        let shutdown_bound = self.deadlines.shutdown_wait();
        beating(
            &health,
            Loop::Coordinator,
            shutdown_bound,
            self.shutdown(&mut commands),
        )
        .await;
        health.loop_ended(Loop::Coordinator);
        match self.fatal {
            Some(fatal) => Err(fatal),
            None => Ok(()),
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Assign(assigned) => {
                for mut a in assigned {
                    let key: Key = (a.topic.clone(), a.partition);
                    self.restarting.cancel(&key);
                    // An earlier incarnation not yet gone (its revoke timed out) would, when
                    // dropped, switch off the wake-up of the partition's queue, which every
                    // handle shares: let it go first, then take a fresh handle.
                    if self.retire(&key).await {
                        drop(a.queue);
                        match self.consumer.split_partition_queue(&key.0, key.1) {
                            Some(queue) => a.queue = queue,
                            None => {
                                error!(topic = %key.0, partition = key.1, "Cannot split the queue of an assigned partition.");
                                continue;
                            }
                        }
                    }
                    let mut lineage = Lineage::fresh();
                    lineage.last_confirmed = self.commits.confirmed(&key);
                    self.start(a, None, lineage);
                }
                self.health.set_in_group(true);
                self.report_assigned();
            }
            Command::Revoke {
                partitions,
                lost,
                since,
                reply,
            } => {
                if lost {
                    self.health.set_in_group(false);
                }
                let keys: Vec<Key> = partitions
                    .into_iter()
                    .map(|(t, p)| (Arc::from(t), p))
                    .collect();
                let stop = self.deadlines.revoke(Instant::from_std(since));
                let finals = self.drain(&keys, FlushReason::Revoke, stop).await;
                if lost {
                    // Settle the commit in flight before forgetting what it confirms.
                    let _ = self.commits.commit_now(Vec::new()).await;
                } else {
                    self.commit_revoked(finals).await;
                }
                for key in &keys {
                    self.commits.forget(key);
                }
                self.report_assigned();
                let _ = reply.send(());
            }
            Command::Stray {
                topic,
                partition,
                offset,
            } => {
                let key: Key = (Arc::from(topic), partition);
                if let Some(r) = self.running.remove(&key) {
                    warn!(topic = %key.0, partition, offset, "Message of an assigned partition arrived on the main queue; restarting the partition where it must resume.");
                    r.abort.abort();
                    r.cancel.cancel();
                    let resume_at = resume::after_stray(
                        r.progress.resume_at().or(self.commits.confirmed(&key)),
                        offset,
                    );
                    let mut lineage = r.lineage();
                    lineage.ceiling = Some(lineage.ceiling.map_or(offset, |c| c.min(offset)));
                    self.schedule_restart(key, resume_at, lineage);
                } else if self.restarting.lower(&key, offset) {
                    warn!(topic = %key.0, partition, offset, "Message of a partition waiting for its restart arrived on the main queue; the restart starts at or below it.");
                }
            }
            Command::Restart {
                topic,
                partition,
                ticket,
            } => {
                let key: Key = (topic, partition);
                if let Some(pending) = self.restarting.take_due(&key, ticket) {
                    self.restart(key, pending).await;
                }
            }
            Command::Fatal(reason) => {
                error!(
                    reason,
                    "Fatal Kafka client error: draining, committing what is durable, then exiting."
                );
                self.fatal = Some(reason);
            }
        }
    }

    /// Failpoint `coordinator::loop` (SPEC: the consumer group): the loop stops turning, as a
    /// wedged one would, for as long as it is configured.
    async fn wedge_if_told(&self) {
        while failpoint::hit(
            "coordinator::loop",
            &self.settings.config.kafka.group_id,
            None,
        ) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `vault_assigned_partitions`: the partitions this member owns, running or waiting for
    /// their restart.
    fn report_assigned(&self) {
        let owned = self.running.len() + self.restarting.len();
        self.metrics.assigned_partitions.set(owned as i64);
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Starts a new incarnation of a partition's task. `start` is where the partition was just
    /// sought to (`None`: where the assignment put it).
    fn start(&mut self, a: Assigned, start: Option<i64>, lineage: Lineage) {
        let key: Key = (a.topic.clone(), a.partition);
        let incarnation = self.next_id();
        let (stop_tx, stop_rx) = oneshot::channel();
        let oldest_pending = Arc::new(OldestPending::default());
        let progress = Arc::new(Progress::new(start));
        let cancel = self.abandon.child_token();
        let task = PartitionTask {
            topic: a.topic.clone(),
            partition: a.partition,
            policy: self.settings.flush,
            max_in_flight: self.settings.config.batch.max_in_flight,
            persist: self.persist.clone(),
            progress: progress.clone(),
            cancel: cancel.clone(),
            oldest_pending: oldest_pending.clone(),
            budget: self.budget.clone(),
            health: lineage.health.clone(),
            metrics: self.metrics.clone(),
        };
        let limits = self.settings.limits();
        let tombstones = self.settings.config.pipeline.tombstones;
        let topic = a.topic;
        let queue = a.queue;
        let task_key = key.clone();
        let read = progress.clone();
        let noted = lineage.last_read.clone();
        let abort = self.tasks.spawn(async move {
            let records = queue.stream().map(|m| match m {
                Ok(m) => {
                    // A record lost to a read error (failpoint): not noted, never batched.
                    if failpoint::hit("kafka::read", &topic, Some(m.offset())) {
                        return Err(format!("failpoint kafka::read at offset {}", m.offset()));
                    }
                    // Noted before decoding: a record that panics the decoder was read.
                    read.note_read(m.offset());
                    noted.note(m.timestamp().to_millis());
                    if failpoint::hit("kafka::decode", &topic, Some(m.offset())) {
                        panic!("failpoint kafka::decode at offset {}", m.offset());
                    }
                    Ok(to_record(&m, &topic, limits, tombstones))
                }
                Err(e) => Err(e.to_string()),
            });
            let exit = task.run(records, stop_rx).await;
            (task_key, incarnation, exit)
        });
        self.ids.insert(abort.id(), (key.clone(), incarnation));
        // Its lineage keeps the committed offset as last seen: a commit confirmed since (say,
        // during a restart's backoff, of what the failed incarnation made durable) is an
        // advance, and resets the failures.
        if let Some(old) = self.running.insert(
            key,
            Running {
                incarnation,
                stop: Some(stop_tx),
                abort,
                cancel,
                progress,
                oldest_pending,
                lineage,
            },
        ) {
            old.abort.abort();
            old.cancel.cancel();
        }
    }

    /// Aborts and joins every incarnation of `key` still in the task set; whether there was one.
    async fn retire(&mut self, key: &Key) -> bool {
        let mut retired = false;
        if let Some(r) = self.running.remove(key) {
            r.abort.abort();
            r.cancel.cancel();
        }
        // Incarnations still in the set were aborted by the drain that gave up on them (or just
        // above): they end at their next poll.
        while self.ids.values().any(|(k, _)| k == key) {
            retired = true;
            match self.tasks.join_next_with_id().await {
                Some(joined) => {
                    let ended = self.ended(joined);
                    self.on_task_end(ended);
                }
                None => break,
            }
        }
        retired
    }

    fn ended(
        &mut self,
        joined: Result<(tokio::task::Id, (Key, u64, Exit)), tokio::task::JoinError>,
    ) -> Ended {
        match joined {
            Ok((id, (key, incarnation, exit))) => {
                self.ids.remove(&id);
                Ended::Exited(key, incarnation, exit)
            }
            Err(e) => match self.ids.remove(&e.id()) {
                Some(_) if e.is_cancelled() => Ended::Aborted,
                Some((key, incarnation)) => Ended::Panicked(key, incarnation, e.to_string()),
                None => Ended::Aborted,
            },
        }
    }

    /// Stops the given partitions and waits for them: at the stop's abandon instant their
    /// batches are cancelled, at its give-up instant the tasks still running are aborted.
    /// Returns the final committable offsets (what each made durable, also when it failed or
    /// was aborted). Other partitions that end meanwhile are supervised as usual.
    async fn drain(&mut self, keys: &[Key], reason: FlushReason, stop: Stop) -> Vec<(Key, i64)> {
        let mut waiting: Vec<(Key, u64)> = Vec::new();
        for key in keys {
            self.restarting.cancel(key);
            if let Some(r) = self.running.get_mut(key) {
                if let Some(tx) = r.stop.take() {
                    let _ = tx.send(reason);
                }
                waiting.push((key.clone(), r.incarnation));
            }
        }
        if keys
            .iter()
            .any(|k| failpoint::hit("coordinator::drain", &k.0, None))
        {
            panic!("failpoint coordinator::drain");
        }
        let mut abandoned = false;
        while !waiting.is_empty() {
            let until = if abandoned {
                stop.give_up_at
            } else {
                stop.abandon_at
            };
            match tokio::time::timeout_at(until, self.tasks.join_next_with_id()).await {
                Ok(Some(joined)) => {
                    let ended = self.ended(joined);
                    let id = match &ended {
                        Ended::Exited(k, i, _) | Ended::Panicked(k, i, _) => Some((k.clone(), *i)),
                        Ended::Aborted => None,
                    };
                    match id.and_then(|id| waiting.iter().position(|w| *w == id)) {
                        Some(pos) => {
                            let (key, _) = waiting.swap_remove(pos);
                            match ended {
                                Ended::Exited(_, _, Exit::Failed { reason, .. }) => {
                                    warn!(topic = %key.0, partition = key.1, reason, "Partition stopped with an abandoned batch; committing only what is durable.");
                                }
                                Ended::Panicked(_, _, panic) => {
                                    error!(topic = %key.0, partition = key.1, panic, "Partition task panicked while draining; committing only what is durable.");
                                }
                                _ => {}
                            }
                        }
                        // Another partition ended on its own while these drain: supervise it.
                        None => self.on_task_end(ended),
                    }
                }
                Ok(None) => break,
                Err(_elapsed) if !abandoned => {
                    abandoned = true;
                    for (key, _) in &waiting {
                        warn!(topic = %key.0, partition = key.1, "Partition did not drain in time; abandoning its unfinished writes (they are replayed by its next reader).");
                        if let Some(r) = self.running.get(key) {
                            r.cancel.cancel();
                        }
                    }
                }
                Err(_elapsed) => {
                    for (key, _) in &waiting {
                        error!(topic = %key.0, partition = key.1, "Partition task did not end after its writes were abandoned; aborting it.");
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
                r.cancel.cancel();
                if let Some(o) = r.progress.committable() {
                    finals.push((key.clone(), o));
                }
            }
        }
        finals
    }

    async fn commit_revoked(&mut self, finals: Vec<(Key, i64)>) {
        // Even with nothing to commit, the periodic commit in flight is awaited: it must not
        // land after the partitions are handed over.
        let n = finals.len();
        match self.commits.commit_now(finals).await {
            Ok(()) if n > 0 => info!(partitions = n, "Committed revoked partitions."),
            Ok(()) => {}
            Err(e) => {
                warn!(error = %e, "Commit on revoke failed; the next owner replays from the previous commit.")
            }
        }
    }

    fn on_task_end(&mut self, ended: Ended) {
        let (key, incarnation, why) = match ended {
            Ended::Aborted => return,
            Ended::Exited(key, incarnation, exit) => match exit {
                Exit::Drained { .. } | Exit::StreamEnded { .. } => {
                    // Stopped on purpose (or the consumer is closing): nothing to supervise.
                    if self
                        .running
                        .get(&key)
                        .is_some_and(|r| r.incarnation == incarnation && r.stop.is_some())
                    {
                        warn!(topic = %key.0, partition = key.1, "Partition stream ended while assigned.");
                    }
                    return;
                }
                Exit::Failed { reason, .. } => (key, incarnation, reason),
            },
            Ended::Panicked(key, incarnation, panic) => {
                (key, incarnation, format!("task panicked: {panic}"))
            }
        };
        if self
            .running
            .get(&key)
            .is_none_or(|r| r.incarnation != incarnation)
        {
            return; // A replaced incarnation: its successor owns the partition.
        }
        let Some(r) = self.running.remove(&key) else {
            return;
        };
        r.cancel.cancel();
        let resume_at = r.progress.resume_at().or(self.commits.confirmed(&key));
        error!(topic = %key.0, partition = key.1, reason = why, resume_at, "Partition failed; restarting it where it must resume.");
        self.metrics
            .partition_restarts
            .with_label_values(&[&key.0])
            .inc();
        self.schedule_restart(key, resume_at, r.lineage().failed_again());
    }

    /// Restarts a partition after a backoff that grows with consecutive failures (1 s doubling
    /// to 30 s), without holding up the coordinator meanwhile.
    fn schedule_restart(&mut self, key: Key, resume_at: Option<i64>, lineage: Lineage) {
        let delay =
            Duration::from_millis(500u64 << lineage.failures.min(6)).min(Duration::from_secs(30));
        let ticket = self.restarting.schedule(key.clone(), resume_at, lineage);
        let commands = self.commands.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = commands.send(Command::Restart {
                topic: key.0,
                partition: key.1,
                ticket,
            });
        });
    }

    /// Seeks a failed partition to where it must resume, then starts its next incarnation. A
    /// failed seek starts nothing: the restart is tried again after a longer backoff.
    async fn restart(&mut self, key: Key, pending: PendingRestart) {
        // No position known (the failed incarnation read nothing, e.g. its first item was a
        // read error that skipped records): the group's committed offset, never "where the
        // queue stands". Whether every record below the target is durable: not where only a
        // stray bounds it (nothing committed, `auto.offset.reset = latest`).
        let (target, durable_below) = match pending.resume_at {
            Some(o) => (Offset::Offset(o), true),
            None => match self.committed(&key).await {
                Ok(committed) => (
                    resume::without_progress(
                        committed,
                        self.settings.config.kafka.auto_offset_reset == "earliest",
                        pending.lineage.ceiling,
                    ),
                    committed.is_some(),
                ),
                Err(e) => {
                    error!(topic = %key.0, partition = key.1, error = %e, "Cannot read the committed offset; the partition is not started, and the restart is tried again.");
                    self.seek_failed(&key);
                    self.schedule_restart(key, pending.resume_at, pending.lineage.failed_again());
                    return;
                }
            },
        };
        let consumer = self.consumer.clone();
        let (topic, partition) = (key.0.to_string(), key.1);
        let sought = tokio::task::spawn_blocking(move || {
            if failpoint::hit("kafka::seek", &topic, None) {
                return Err(rdkafka::error::KafkaError::Seek(
                    "failpoint kafka::seek".into(),
                ));
            }
            consumer.seek(&topic, partition, target, deadline::KAFKA_CALL_TIMEOUT)
        })
        .await;
        match sought {
            Ok(Ok(())) => {
                info!(topic = %key.0, partition = key.1, position = ?target, "Partition rewound.")
            }
            Ok(Err(e)) => {
                error!(topic = %key.0, partition = key.1, position = ?target, error = %e, "Seek failed; the partition is not started, and the restart is tried again.");
                self.seek_failed(&key);
                self.schedule_restart(key, pending.resume_at, pending.lineage.failed_again());
                return;
            }
            Err(e) => {
                error!(topic = %key.0, partition = key.1, error = %e, "Seek task failed; the restart is tried again.");
                self.seek_failed(&key);
                self.schedule_restart(key, pending.resume_at, pending.lineage.failed_again());
                return;
            }
        }
        // Where it was sought to, when every record below is durable: the new incarnation may
        // commit it before it makes anything durable itself.
        let start = match target {
            Offset::Offset(o) if durable_below => Some(o),
            _ => None,
        };
        match self.consumer.split_partition_queue(&key.0, key.1) {
            Some(queue) => self.start(
                Assigned {
                    topic: key.0.clone(),
                    partition: key.1,
                    queue,
                },
                start,
                pending.lineage,
            ),
            None => {
                error!(topic = %key.0, partition = key.1, "Cannot split the partition queue for a restart; tried again.");
                self.schedule_restart(key, pending.resume_at, pending.lineage.failed_again());
            }
        }
    }

    fn seek_failed(&self, key: &Key) {
        self.metrics
            .restart_seek_failures
            .with_label_values(&[&*key.0])
            .inc();
    }

    /// The group's committed offset of a partition, from the broker (`None`: nothing committed).
    /// An answer that carries an error for the partition, or none for it, is a failed lookup,
    /// never "nothing committed": that would send the partition to `auto.offset.reset`.
    async fn committed(&self, key: &Key) -> Result<Option<i64>, rdkafka::error::KafkaError> {
        let consumer = self.consumer.clone();
        let (topic, partition) = (key.0.to_string(), key.1);
        tokio::task::spawn_blocking(move || {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let got = consumer.committed_offsets(tpl, deadline::KAFKA_CALL_TIMEOUT)?;
            let entry = got.find_partition(&topic, partition).ok_or_else(|| {
                rdkafka::error::KafkaError::OffsetFetch(
                    rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                )
            })?;
            entry.error()?;
            Ok(match entry.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
        })
        .await
        .map_err(|_| rdkafka::error::KafkaError::Canceled)?
    }

    /// Hands every partition's committable offset to the committer, which sends those ahead of
    /// what the broker confirmed (one commit at a time; a failed one is sent again next tick).
    fn commit_progress(&mut self) {
        let offsets: Vec<(Key, i64)> = self
            .running
            .iter()
            .filter_map(|(k, r)| r.progress.committable().map(|o| (k.clone(), o)))
            .collect();
        self.commits.start(offsets);
    }

    /// Per-partition gauges that only time moves: how long the oldest event read but not yet
    /// durable has waited (or, with none, how long a partition that is behind has read
    /// nothing), how long since the committed offset last advanced or was caught up (with
    /// nothing left to read: a partition that reads nothing is not caught up), and how many
    /// seconds behind it is.
    fn observe_partitions(&mut self) {
        self.metrics
            .in_flight_bytes
            .set(self.budget.in_use() as i64);
        let now = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let context = self.consumer.context();
        for (key, r) in &mut self.running {
            let confirmed = self.commits.confirmed(key);
            let l = &mut r.lineage;
            if confirmed != l.last_confirmed {
                l.last_confirmed = confirmed;
                l.caught_up_at = now;
                l.failures = 0;
            }
            let lag = context.lag(&key.0, key.1);
            let behind = lag.is_some_and(|l| l > 0);
            let oldest = r.oldest_pending.get();
            if oldest.is_none() && r.progress.committable() == confirmed && !behind {
                l.caught_up_at = now;
            }
            let partition = key.1.to_string();
            let labels = [&*key.0, partition.as_str()];
            if let Some(seconds) =
                lag_seconds(lag, l.last_read.kafka_ms(), now_ms, now - l.owned_since)
            {
                self.metrics
                    .consumer_lag_seconds
                    .with_label_values(&labels)
                    .set(seconds);
            }
            let age =
                oldest_uncommitted_age(now, oldest, behind, l.last_read.at(now), l.owned_since);
            self.metrics
                .oldest_uncommitted_age
                .with_label_values(&labels)
                .set(age.as_secs_f64());
            self.metrics
                .seconds_since_commit
                .with_label_values(&labels)
                .set((now - l.caught_up_at).as_secs_f64());
        }
    }

    async fn shutdown(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) {
        self.restarting.clear();
        let keys: Vec<Key> = self.running.keys().cloned().collect();
        info!(
            partitions = keys.len(),
            "Shutting down: flushing partial batches and waiting for writes."
        );
        let stop = self.deadlines.shutdown(Instant::now());
        let finals = self.drain(&keys, FlushReason::Shutdown, stop).await;
        self.final_commit(finals, commands).await;
        self.tasks.shutdown().await;
        // Answer anything the context is still waiting on, so the consumer can close.
        commands.close();
        while let Ok(cmd) = commands.try_recv() {
            if let Command::Revoke { reply, .. } = cmd {
                let _ = reply.send(());
            }
        }
    }

    /// Commits the drained partitions' final offsets. A commit the broker refuses while a
    /// rebalance is in progress is sent again for up to [`deadline::FINAL_COMMIT_RETRY`];
    /// meanwhile a revocation of some of these partitions is answered by committing them
    /// within the rebalance. What is still refused after that is replayed by the next owner
    /// (never lost: it is below nothing unwritten).
    async fn final_commit(
        &mut self,
        finals: Vec<(Key, i64)>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) {
        let mut pending = finals;
        let retry_until = Instant::now() + deadline::FINAL_COMMIT_RETRY;
        while !pending.is_empty() {
            match self.commits.commit_now(pending.clone()).await {
                Ok(()) => {
                    info!(partitions = pending.len(), "Final offsets committed.");
                    return;
                }
                Err(e) if is_rebalance_refusal(&e) && Instant::now() < retry_until => {
                    warn!(error = %e, "Final commit refused during a rebalance; sending it again.");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        Some(cmd) = commands.recv() => {
                            if let Command::Revoke { partitions, lost, reply, .. } = cmd {
                                let (revoked, kept): (Vec<_>, Vec<_>) = pending
                                    .into_iter()
                                    .partition(|(k, _)| partitions.iter().any(|(t, p)| **t == *k.0 && *p == k.1));
                                pending = kept;
                                if !lost {
                                    self.commit_revoked(revoked).await;
                                }
                                let _ = reply.send(());
                            }
                        }
                    }
                }
                Err(e) => {
                    error!(error = %e, "Final commit failed; the next owner replays from the previous commit.");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> Key {
        (Arc::from("t"), p)
    }

    #[test]
    fn lag_in_seconds_is_the_age_of_the_last_message_read_while_behind() {
        let ten_s = Duration::from_secs(10);
        assert_eq!(lag_seconds(None, Some(1_000), 5_000, ten_s), None);
        assert_eq!(lag_seconds(Some(0), Some(1_000), 5_000, ten_s), Some(0.0));
        assert_eq!(lag_seconds(Some(40), Some(1_000), 5_500, ten_s), Some(4.5));
        assert_eq!(
            lag_seconds(Some(40), None, 5_500, ten_s),
            Some(10.0),
            "nothing read yet: how long the partition has been owned"
        );
        assert_eq!(
            lag_seconds(Some(1), Some(9_000), 5_000, ten_s),
            Some(0.0),
            "a timestamp ahead of this clock is not negative lag"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_that_reads_nothing_while_behind_ages() {
        let started = Instant::now();
        tokio::time::advance(Duration::from_secs(30)).await;
        let now = Instant::now();
        let pending = now - Duration::from_secs(7);
        assert_eq!(
            oldest_uncommitted_age(now, Some(pending), true, None, started),
            Duration::from_secs(7)
        );
        assert_eq!(
            oldest_uncommitted_age(now, None, false, None, started),
            Duration::ZERO,
            "caught up: nothing waits"
        );
        assert_eq!(
            oldest_uncommitted_age(now, None, true, None, started),
            Duration::from_secs(30),
            "behind and never read: since it started"
        );
        let read = now - Duration::from_secs(12);
        assert_eq!(
            oldest_uncommitted_age(now, None, true, Some(read), started),
            Duration::from_secs(12),
            "behind and reading nothing: since the last read"
        );
    }

    #[test]
    fn a_read_is_dated_by_the_first_look_after_it() {
        let r = LastRead::default();
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        assert_eq!(r.at(t(1)), None, "nothing read yet");
        r.note(Some(1_000));
        assert_eq!(r.at(t(2)), Some(t(2)));
        assert_eq!(r.at(t(3)), Some(t(2)), "no read since: the last one stands");
        r.note(None);
        assert_eq!(r.at(t(4)), Some(t(4)));
        assert_eq!(
            r.kafka_ms(),
            Some(1_000),
            "a read without a timestamp keeps the last one"
        );
    }

    /// The lineage of a partition that failed `n` times in a row.
    fn failed(n: u32) -> Lineage {
        (0..n).fold(Lineage::fresh(), |l, _| l.failed_again())
    }

    #[test]
    fn a_restart_scheduled_before_a_revocation_is_void_after_it() {
        let mut r = Restarts::default();
        let stale = r.schedule(key(0), Some(100), failed(1));
        // Revoked, assigned again, failed again: a new restart is on file.
        r.cancel(&key(0));
        let fresh = r.schedule(key(0), Some(40), failed(1));
        assert!(
            r.take_due(&key(0), stale).is_none(),
            "the stale ticket starts nothing"
        );
        assert_eq!(
            r.take_due(&key(0), fresh).map(|p| p.resume_at),
            Some(Some(40))
        );
        assert!(r.take_due(&key(0), fresh).is_none(), "due once");
    }

    #[test]
    fn a_stray_of_a_partition_waiting_for_its_restart_lowers_where_it_starts() {
        let mut r = Restarts::default();
        let known = r.schedule(key(0), Some(100), failed(1));
        let unknown = r.schedule(key(1), None, failed(1));
        assert!(r.lower(&key(0), 40));
        assert!(r.lower(&key(0), 70), "a later stray lowers nothing");
        assert!(r.lower(&key(1), 30));
        assert!(!r.lower(&key(2), 10), "no restart pending");
        let p = r.take_due(&key(0), known).expect("still due");
        assert_eq!((p.resume_at, p.lineage.ceiling), (Some(40), Some(40)));
        let p = r.take_due(&key(1), unknown).expect("still due");
        assert_eq!(
            (p.resume_at, p.lineage.ceiling),
            (None, Some(30)),
            "the committed offset rules, capped by the stray"
        );
    }

    #[test]
    fn a_newer_failure_supersedes_the_restart_on_file() {
        let mut r = Restarts::default();
        let first = r.schedule(key(1), Some(10), failed(1));
        let second = r.schedule(key(1), Some(10), failed(2));
        assert!(r.take_due(&key(1), first).is_none(), "superseded");
        assert_eq!(
            r.take_due(&key(1), second).map(|p| p.lineage.failures),
            Some(2)
        );
        let cancelled = r.schedule(key(2), None, failed(1));
        r.clear();
        assert!(r.take_due(&key(2), cancelled).is_none(), "cleared");
    }
}
