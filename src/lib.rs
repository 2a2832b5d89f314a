//! vault: consumes user-activity events from Kafka and stores them in ScyllaDB.
//!
//! Data flows one way: consumer → per-partition batcher ([`pipeline::batcher`]) → persisters
//! ([`store::persister`]) → in-order acknowledgement ([`kafka::offsets`]) → commit
//! ([`kafka::coordinator`]). The guarantee, argued in docs/DESIGN.md: a partition's offset is
//! committed only after every event below it is durably written or dead-lettered.

pub mod api;
pub mod config;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod http;
pub mod kafka;
pub mod kubernetes;
pub mod pipeline;
pub mod store;
pub mod telemetry;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Settings;

use config::LeaveGroup;
pub use error::Error;

use kafka::context::{VaultConsumer, VaultContext};
use kafka::coordinator::{Command, Coordinator};
use kafka::dead_letter::DeadLetterSink;
use store::persister::Persister;
use store::Store;
use telemetry::{Health, Metrics};

/// Everything a pipeline runs with. Tests build it with their own store, dead-letter sink and
/// metrics; `main` builds it from the configuration.
pub struct Pipeline<S, D> {
    pub settings: Settings,
    pub store: S,
    pub dead_letters: D,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Where the persisters run (see [`store::runtime`]); `None`: on the runtime `run` is
    /// called on.
    pub store_runtime: Option<Handle>,
}

impl<S: Store, D: DeadLetterSink> Pipeline<S, D> {
    pub fn new(settings: Settings, store: S, dead_letters: D) -> Self {
        let health = Arc::new(
            Health::new(settings.config.pipeline.unready_after)
                .with_liveness_timeout(settings.config.pipeline.liveness_timeout),
        );
        Pipeline {
            settings,
            store,
            dead_letters,
            metrics: Arc::new(Metrics::new()),
            health,
            store_runtime: None,
        }
    }

    /// Runs the persisters on `runtime`: the one the store's client was started on.
    pub fn with_store_runtime(mut self, runtime: Handle) -> Self {
        self.store_runtime = Some(runtime);
        self
    }

    /// Runs until `shutdown` fires, then stops fetching, flushes partial batches, waits for
    /// in-flight writes (up to `pipeline.shutdown_timeout`), commits, and leaves the group.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Pipeline {
            settings,
            store,
            dead_letters,
            metrics,
            health,
            store_runtime,
        } = self;
        let settings = Arc::new(settings);
        let cfg = &settings.config;
        metrics.precreate_topics(&cfg.kafka.topics);
        metrics.watch_runtime(telemetry::metrics::RUNTIME_MAIN, Handle::current());
        if let Some(runtime) = &store_runtime {
            metrics.watch_runtime(telemetry::metrics::RUNTIME_STORE, runtime.clone());
        }
        for weakening in settings.weakened_guarantees() {
            warn!(
                weakening,
                "The delivery guarantee is weakened by configuration (an explicit opt-in)."
            );
        }

        // Checked at start-up, so that a pod without its token fails now, not when it stops.
        let scale_check =
            kubernetes::ScaleCheck::for_config(&cfg.kafka).map_err(Error::Kubernetes)?;
        if let Some(check) = scale_check.clone() {
            tokio::spawn(async move {
                check
                    .probe(pipeline::deadline::KUBERNETES_CALL_TIMEOUT)
                    .await
            });
        }

        let listener = tokio::net::TcpListener::bind(settings.metrics_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: settings.metrics_addr,
                source,
            })?;
        info!(addr = %listener.local_addr().map_err(|source| Error::Listen { addr: settings.metrics_addr, source })?, "Serving /metrics, /healthz and /readyz.");
        let http_stop = CancellationToken::new();
        let http = tokio::spawn(telemetry::http::serve(
            listener,
            metrics.clone(),
            health.clone(),
            http_stop.clone().cancelled_owned(),
        ));

        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let context = VaultContext::new(
            commands_tx.clone(),
            settings.deadlines(),
            metrics.clone(),
            health.clone(),
        );
        let partitions = check_topics(&settings).await?;
        let consumer: Arc<VaultConsumer> = Arc::new(VaultConsumer::from_config_and_context(
            &kafka::consumer_config(&settings, partitions),
            context,
        )?);
        consumer.context().bind(&consumer);
        let topics: Vec<&str> = cfg.kafka.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        info!(topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, "Subscribed.");

        // Persisters.
        store.report_to(&metrics);
        let (persist_tx, persist_rx) = async_channel::bounded(cfg.pipeline.persisters);
        let abandon = CancellationToken::new();
        let persister = Arc::new(Persister {
            store,
            dead_letters,
            on_invalid: cfg.pipeline.on_invalid,
            retention: settings.retention.clone(),
            retry: settings.retry(),
            rate: crate::store::rate::RowRate::new(cfg.scylla.max_rows_per_second),
            metrics: metrics.clone(),
            health: health.clone(),
            cancel: abandon.clone(),
        });
        let mut persisters =
            persister.spawn_pool(cfg.pipeline.persisters, persist_rx, store_runtime.as_ref());

        // The main queue is polled on a dedicated thread: rebalance callbacks run there and may
        // block while the coordinator drains partitions.
        let poll_stop = CancellationToken::new();
        let poller = {
            let consumer = consumer.clone();
            let stop = poll_stop.clone();
            let commands = commands_tx.clone();
            let health = health.clone();
            let group = cfg.kafka.group_id.clone();
            let handle = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("vault-kafka-poll".into())
                .spawn(move || {
                    handle.block_on(poll_main_queue(consumer, stop, commands, &health, &group))
                })
                .map_err(|e| Error::Task(format!("cannot start the Kafka poll thread: {e}")))?
        };

        // Every partition of the subscribed topics, owned or not (see kafka::group_view).
        let group_view = tokio::spawn(kafka::group_view::run(
            consumer.clone(),
            cfg.kafka.topics.clone(),
            cfg.kafka.group_view_interval,
            metrics.clone(),
            poll_stop.clone(),
        ));

        #[cfg(feature = "failpoints")]
        let fatal_injector = {
            let consumer = consumer.clone();
            let stop = poll_stop.clone();
            let group = cfg.kafka.group_id.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => inject_fatal_error(&consumer, &group),
                    }
                }
            })
        };

        let coordinator = Coordinator::new(
            commands_tx,
            consumer.clone(),
            settings.clone(),
            persist_tx,
            metrics.clone(),
            health.clone(),
            abandon.clone(),
        );
        let coordinator = tokio::spawn(coordinator.run(commands_rx, shutdown.clone()));
        let coordinator_result = coordinator.await;

        // Every partition task has ended and the coordinator dropped its sender: the persisters
        // drain what is left in the channel (nothing, normally) and stop.
        abandon.cancel();
        while persisters.join_next().await.is_some() {}

        // Everything durable is committed: a static member asked to leave does so now, while
        // the poll thread still serves the rebalance this starts (closing would not leave).
        let mut leaving = None;
        let leave = !cfg.kafka.instance_id.is_empty()
            && matches!(coordinator_result, Ok(Ok(())))
            && match (cfg.kafka.leave_group_on_shutdown, &scale_check) {
                (LeaveGroup::Always, _) => true,
                (LeaveGroup::ScaleDown, Some(check)) => scaled_away(check).await,
                _ => false,
            };
        if leave {
            // Blocking calls into librdkafka (`unsubscribe` has no timeout), on a thread of its
            // own: the close below joins it before dropping the consumer, so the last handle is
            // dropped there and the close stays bounded, and a thread stuck in librdkafka never
            // holds the runtime's shutdown (which waits for its blocking pool). Waited for at
            // most the bound of its own wait plus one more Kafka call; past that, shutdown goes
            // on and the session expiry moves the partitions.
            let consumer = consumer.clone();
            let (left_tx, left) = tokio::sync::oneshot::channel();
            let thread = std::thread::Builder::new()
                .name("vault-kafka-leave".into())
                .spawn(move || {
                    leave_group(&consumer);
                    let _ = left_tx.send(());
                })
                .map_err(|e| Error::Task(format!("cannot start the leave-group thread: {e}")))?;
            let bound = 2 * pipeline::deadline::KAFKA_CALL_TIMEOUT;
            if tokio::time::timeout(bound, left).await.is_err() {
                warn!("Leaving the consumer group did not finish in time; shutting down anyway.");
            }
            leaving = Some(thread);
        }

        poll_stop.cancel();
        let _ = group_view.await;
        #[cfg(feature = "failpoints")]
        let _ = fatal_injector.await;
        // Closing the consumer leaves the group; it blocks, hence a thread of its own (not the
        // blocking pool, which the runtime waits for when it is dropped).
        let (closed_tx, closing) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("vault-kafka-close".into())
            .spawn(move || {
                let _ = poller.join();
                if let Some(leaving) = leaving {
                    let _ = leaving.join();
                }
                drop(consumer);
                let _ = closed_tx.send(());
            })
            .map_err(|e| Error::Task(format!("cannot start the consumer close thread: {e}")))?;
        // A consumer that hit a fatal error (fenced) cannot leave the group: don't wait on it.
        let close_wait = match coordinator_result {
            Ok(Err(_)) => pipeline::deadline::FATAL_CLOSE_WAIT,
            _ => pipeline::deadline::KAFKA_CALL_TIMEOUT,
        };
        let closed = tokio::time::timeout(close_wait, closing).await;
        http_stop.cancel();
        let _ = http.await;
        info!("Stopped.");
        if closed.is_err() {
            warn!(waited = ?close_wait, "The Kafka consumer did not close in time; stopping without it.");
        }
        coordinator_result
            .map_err(|e| Error::Task(format!("coordinator: {e}")))?
            .map_err(Error::Fatal)
    }
}

/// Serves the consumer's main queue (rebalance callbacks, errors, stray messages) until `stop`,
/// beating for [`telemetry::health::Loop::KafkaPoll`] every
/// [`pipeline::deadline::HEARTBEAT_EVERY`] (the rebalance callback beats while it waits).
async fn poll_main_queue(
    consumer: Arc<VaultConsumer>,
    stop: CancellationToken,
    commands: mpsc::UnboundedSender<Command>,
    health: &Health,
    group: &str,
) {
    use telemetry::health::Loop;
    let mut beat = tokio::time::interval(pipeline::deadline::HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = beat.tick() => {
                // Failpoint `kafka::poll` (SPEC: the consumer group): the thread is stuck, as
                // in a callback that never returns, for as long as it is configured.
                while failpoint::hit("kafka::poll", group, None) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                health.beat(Loop::KafkaPoll);
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    let _ = commands.send(Command::Stray {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                    });
                }
                Err(e) => warn!(error = %e, "Kafka consumer error."),
            }
        }
    }
    health.loop_ended(Loop::KafkaPoll);
}

/// Whether this pod stops for good (`kafka.leave_group_on_shutdown = "scale-down"`): its
/// StatefulSet no longer counts it. When the API cannot tell within
/// [`pipeline::deadline::KUBERNETES_CALL_TIMEOUT`], yes: leaving needlessly costs a rebalance
/// of seconds, staying needlessly stalls the pod's partitions for `kafka.session_timeout`.
async fn scaled_away(check: &kubernetes::ScaleCheck) -> bool {
    let pod = &check.pod;
    match check
        .cluster
        .replicas(pod, pipeline::deadline::KUBERNETES_CALL_TIMEOUT)
        .await
    {
        Ok(replicas) => {
            let away = pod.is_scaled_away(replicas);
            info!(
                statefulset = %pod.statefulset,
                ordinal = pod.ordinal,
                replicas = ?replicas,
                leave = away,
                "{}",
                if away {
                    "The StatefulSet no longer counts this pod (a scale-down): leaving the consumer group."
                } else {
                    "The StatefulSet still counts this pod (a restart): keeping the group membership, so its partitions wait for it."
                }
            );
            away
        }
        Err(e) => {
            warn!(error = %e, "Cannot tell a scale-down from a restart; leaving the consumer group (a rebalance now rather than partitions stalled for kafka.session_timeout).");
            true
        }
    }
}

/// Makes a static member leave the group (KIP-345: librdkafka sends no LeaveGroup for a static
/// member that closes): unsubscribing revokes its partitions and sends the LeaveGroup, after
/// which librdkafka holds no member id (it drops it when the LeaveGroup is sent, not when it is
/// answered). Waits for that, at most [`pipeline::deadline::KAFKA_CALL_TIMEOUT`]. Blocking: each
/// call waits on librdkafka's main thread.
fn leave_group(consumer: &VaultConsumer) {
    let since = std::time::Instant::now();
    consumer.unsubscribe();
    while since.elapsed() < pipeline::deadline::KAFKA_CALL_TIMEOUT {
        if consumer
            .context()
            .member_id()
            .is_none_or(|id| id.is_empty())
        {
            info!(waited = ?since.elapsed(), "LeaveGroup sent (kafka.leave_group_on_shutdown).");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    warn!(
        "The consumer group was not left in time; its partitions move after kafka.session_timeout."
    );
}

/// Failpoint `kafka::fatal`: raises a real librdkafka fatal error (as a static member fenced by
/// another with the same `group.instance.id` would), for tests of the fatal-error path.
#[cfg(feature = "failpoints")]
fn inject_fatal_error(consumer: &VaultConsumer, group: &str) {
    if failpoint::hit("kafka::fatal", group, None) {
        use rdkafka::client::Client;
        let client: &Client<VaultContext> = consumer.client();
        // SAFETY: the client pointer is valid for as long as `consumer` lives; the reason is a
        // NUL-terminated static string.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                client.native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID,
                c"failpoint kafka::fatal".as_ptr(),
            );
        }
    }
}

/// Fails fast, with a message saying what to fix, when a configured topic does not exist, or,
/// with `pipeline.on_invalid = "dlq"`, when a dead-letter topic does not (else the first invalid
/// event would stall its partition); otherwise returns how many partitions the configured
/// topics have in all.
async fn check_topics(settings: &Arc<Settings>) -> Result<usize, Error> {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::consumer::BaseConsumer =
            kafka::base_client_config(&settings).create()?;
        // Partitions of an existing topic; `None` when the brokers do not know it.
        let partitions_of = |topic: &str| {
            let md = client
                .fetch_metadata(Some(topic), Duration::from_secs(15))
                .map_err(|source| Error::Unreachable {
                    brokers: settings.config.kafka.brokers.clone(),
                    source,
                })?;
            Ok::<_, Error>(
                md.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .filter(|n| *n > 0),
            )
        };
        let mut partitions = 0;
        for topic in &settings.config.kafka.topics {
            partitions +=
                partitions_of(topic)?.ok_or_else(|| Error::MissingTopic(topic.clone()))?;
        }
        if settings.config.pipeline.on_invalid == config::InvalidPolicy::DeadLetter {
            for (topic, sources) in settings.dead_letter_routes() {
                if partitions_of(&topic)?.is_none() {
                    return Err(Error::MissingDeadLetterTopic {
                        topic,
                        sources: sources.join(", "),
                    });
                }
            }
        }
        Ok(partitions)
    })
    .await
    .map_err(|e| Error::Task(format!("topic check: {e}")))?
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                error!(error = %e, "Cannot listen for SIGTERM; only SIGINT stops vault.");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("Shutdown signal received.");
}
