//! Shared test harness: a Kafka (mock cluster or real), producers of test events, offset probes,
//! a running-pipeline handle, and `wait_until`.

#![allow(dead_code)]

pub mod k8s;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use vault::config::Config;
use vault::store::MemoryStore;
use vault::telemetry::Metrics;
use vault::{Pipeline, Settings};

/// A unique name per test, so tests sharing a broker never see each other's data.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `cond` until it returns `Ok` or `timeout` passes; panics naming `what` and the last
/// observation.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match cond().await {
            Ok(()) => return,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The value of environment variable `name` (a knob of a long test run), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A Kafka to test against: librdkafka's mock cluster, or the brokers in VAULT_IT_KAFKA_BROKERS.
pub struct Kafka {
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    pub brokers: String,
    producer: FutureProducer,
}

/// Installs a log subscriber for the test binary once (RUST_LOG selects what is shown).
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()
        .expect("test producer")
}

impl Kafka {
    pub fn start() -> Kafka {
        init_logging();
        let (mock, brokers) = match std::env::var("VAULT_IT_KAFKA_BROKERS") {
            Ok(b) if !b.is_empty() => (None, b),
            _ => {
                let mock = MockCluster::new(3).expect("start librdkafka's mock cluster");
                let brokers = mock.bootstrap_servers();
                (Some(mock), brokers)
            }
        };
        Kafka {
            producer: producer(&brokers),
            mock,
            brokers,
        }
    }

    /// Another handle on an already running Kafka (no fault injection), e.g. for a task.
    pub fn connect(brokers: &str) -> Kafka {
        Kafka {
            mock: None,
            brokers: brokers.to_owned(),
            producer: producer(brokers),
        }
    }

    /// The mock cluster, for fault injection; `None` against a real Kafka.
    pub fn mock(&self) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        self.mock.as_ref()
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match &self.mock {
            Some(m) => m.create_topic(name, partitions, 1).expect("create topic"),
            None => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .create()
                    .expect("admin client");
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let res = admin
                    .create_topics([&topic], &AdminOptions::new())
                    .await
                    .expect("create topic");
                for r in res {
                    r.expect("create topic");
                }
            }
        }
    }

    /// Creates a topic vault reads and its dead-letter topic (`<name>.dlq`, the default), as a
    /// deployment does: with `pipeline.on_invalid = "dlq"`, vault refuses to start without it.
    pub async fn create_source_topic(&self, name: &str, partitions: i32) {
        self.create_topic(name, partitions).await;
        self.create_topic(&format!("{name}.dlq"), 1).await;
    }

    /// Produces `(partition, key, value)` messages; returns the `(partition, offset)` of each.
    pub async fn produce(&self, topic: &str, values: &[(i32, String, Vec<u8>)]) -> Vec<(i32, i64)> {
        let mut deliveries = Vec::with_capacity(values.len());
        for (partition, key, value) in values {
            loop {
                let record = FutureRecord::to(topic)
                    .partition(*partition)
                    .key(key.as_bytes())
                    .payload(value.as_slice());
                match self.producer.send_result(record) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => panic!("produce failed: {e}"),
                }
            }
        }
        let mut out = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let delivered = d.await.expect("producer alive").expect("delivered");
            out.push((delivered.partition, delivered.offset));
        }
        out
    }

    /// Produces one message (a tombstone when `value` is `None`) with the given Kafka timestamp;
    /// returns its `(partition, offset)`.
    pub async fn produce_at(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        value: Option<&[u8]>,
        timestamp_ms: i64,
    ) -> (i32, i64) {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .timestamp(timestamp_ms);
        if let Some(v) = value {
            record = record.payload(v);
        }
        let d = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("enqueue");
        let delivered = d.await.expect("producer alive").expect("delivered");
        (delivered.partition, delivered.offset)
    }

    /// Produces a tombstone (null value) to `partition`.
    pub async fn produce_tombstone(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
    ) -> Vec<(i32, i64)> {
        let record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(topic).partition(partition).key(key);
        let d = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("enqueue");
        let delivered = d.await.expect("producer alive").expect("delivered");
        vec![(delivered.partition, delivered.offset)]
    }

    /// Produces `n` valid events spread round-robin over `partitions`, numbered from `first`.
    pub async fn produce_events(
        &self,
        topic: &str,
        partitions: i32,
        first: usize,
        n: usize,
    ) -> Vec<(i32, i64)> {
        let values: Vec<_> = (first..first + n)
            .map(|i| {
                let user = format!("user-{}", i % 97);
                let value = event_json(&user, i).into_bytes();
                (i as i32 % partitions, user, value)
            })
            .collect();
        self.produce(topic, &values).await
    }

    /// Produces `n` more events (see [`Kafka::produce_events`]) and waits until `group` has
    /// committed every partition to its end; returns their positions.
    pub async fn produce_and_wait_committed(
        &self,
        topic: &str,
        group: &str,
        partitions: i32,
        first: usize,
        n: usize,
    ) -> BTreeSet<(i32, i64)> {
        let produced = self.produce_events(topic, partitions, first, n).await;
        self.probe(group)
            .wait_committed_to_end(topic, partitions, Duration::from_secs(60))
            .await;
        produced.into_iter().collect()
    }

    /// A consumer that only reads committed offsets and watermarks of `group`.
    pub fn probe(&self, group: &str) -> Probe {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("probe consumer");
        Probe {
            consumer: Arc::new(consumer),
        }
    }
}

/// A valid event for user `user`, numbered `i` (the number is kept in the attributes).
pub fn event_json(user: &str, i: usize) -> String {
    format!(
        r#"{{"user_id":"{user}","event_type":"{}","occurred_at":"2025-11-24T{:02}:{:02}:{:02}.{:03}Z","attributes":{{"n":{i}}}}}"#,
        ["click", "view", "purchase"][i % 3],
        (i / 3600) % 24,
        (i / 60) % 60,
        i % 60,
        i % 1000
    )
}

#[derive(Clone)]
pub struct Probe {
    consumer: Arc<BaseConsumer>,
}

impl Probe {
    /// Committed offset per partition (`None` when nothing is committed).
    pub async fn committed(&self, topic: &str, partitions: i32) -> Vec<Option<i64>> {
        self.try_committed(topic, partitions, Duration::from_secs(10))
            .await
            .expect("committed offsets")
    }

    /// [`Probe::committed`], or the error when the group coordinator does not answer in time.
    pub async fn try_committed(
        &self,
        topic: &str,
        partitions: i32,
        timeout: Duration,
    ) -> Result<Vec<Option<i64>>, KafkaError> {
        let c = self.consumer.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let got = c.committed_offsets(tpl, timeout)?;
            Ok((0..partitions)
                .map(
                    |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Some(o),
                        _ => None,
                    },
                )
                .collect())
        })
        .await
        .unwrap()
    }

    /// High watermark (end offset) per partition.
    pub async fn ends(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let c = self.consumer.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    c.fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .expect("watermarks")
                        .1
                })
                .collect()
        })
        .await
        .unwrap()
    }

    /// Waits until every partition's committed offset equals its end offset.
    pub async fn wait_committed_to_end(&self, topic: &str, partitions: i32, timeout: Duration) {
        wait_until("committed == end on every partition", timeout, || async {
            let c = self.committed(topic, partitions).await;
            let e = self.ends(topic, partitions).await;
            if c.iter().zip(&e).all(|(c, e)| *c == Some(*e)) {
                Ok(())
            } else {
                Err(format!("committed {c:?}, end {e:?}"))
            }
        })
        .await
    }
}

/// Settings for a test pipeline: small batches, short intervals, an ephemeral metrics port.
pub fn settings(brokers: &str, topic: &str, group: &str) -> Config {
    let mut c = Config::default();
    c.kafka.brokers = brokers.into();
    c.kafka.topics = vec![topic.into()];
    c.kafka.group_id = group.into();
    c.kafka.commit_interval = Duration::from_millis(100);
    // The mock cluster holds every rebalance of a non-empty group for session_timeout - 1s,
    // even once all members have rejoined: keep it short so rebalances take seconds.
    c.kafka.session_timeout = Duration::from_secs(6);
    c.batch.max_events = 50;
    c.batch.linger = Duration::from_millis(50);
    c.pipeline.persisters = 4;
    c.pipeline.retry_initial_backoff = Duration::from_millis(10);
    c.pipeline.retry_max_backoff = Duration::from_millis(100);
    c.pipeline.shutdown_timeout = Duration::from_secs(10);
    c.pipeline.revoke_timeout = Duration::from_secs(10);
    c.metrics.addr = "127.0.0.1:0".into();
    if let Ok(d) = std::env::var("VAULT_IT_KAFKA_DEBUG") {
        c.kafka.options.insert("debug".into(), d);
    }
    c
}

/// The Kafka dead-letter sink `cfg` configures.
pub fn kafka_dead_letters(cfg: &Config) -> vault::kafka::dead_letter::KafkaDeadLetters {
    let validated = cfg.clone().validate().expect("valid settings");
    vault::kafka::dead_letter::KafkaDeadLetters::new(
        &vault::kafka::base_client_config(&validated),
        &cfg.kafka.dead_letter_topic,
        cfg.kafka.dead_letter_max_bytes,
    )
    .expect("dead-letter producer")
}

/// A pipeline running in this process.
pub struct Running {
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), vault::Error>>,
}

impl Running {
    pub fn start<S: vault::store::Store, D: vault::kafka::dead_letter::DeadLetterSink>(
        config: Config,
        store: S,
        dead_letters: D,
    ) -> Running {
        let settings: Settings = config.validate().expect("valid test settings");
        let pipeline = Pipeline::new(settings, store, dead_letters);
        let metrics = pipeline.metrics.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pipeline.run(shutdown.clone()));
        Running {
            metrics,
            shutdown,
            task,
        }
    }

    /// Signals shutdown and waits for a clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("pipeline stops within 60s")
            .expect("pipeline task did not panic")
            .expect("pipeline exits cleanly");
    }

    /// Waits for the pipeline to end on its own (e.g. after a fatal error) and returns how.
    pub async fn wait_exit(self, timeout: Duration) -> Result<(), vault::Error> {
        let ended = tokio::time::timeout(timeout, self.task)
            .await
            .expect("pipeline ends in time")
            .expect("pipeline task did not panic");
        self.shutdown.cancel();
        ended
    }

    /// Restarts of `topic`'s partitions so far (`vault_partition_restarts_total`).
    pub fn restarts(&self, topic: &str) -> u64 {
        self.metrics
            .partition_restarts
            .with_label_values(&[topic])
            .get()
    }

    /// Sum of a counter over all its label values.
    pub fn counter(&self, name: &str) -> f64 {
        self.counter_where(name, |_| true)
    }

    /// Sum of a counter over the series having `label = value`.
    pub fn counter_with(&self, name: &str, label: &str, value: &str) -> f64 {
        self.counter_where(name, |m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == label && l.value() == value)
        })
    }

    fn counter_where(&self, name: &str, keep: impl Fn(&prometheus::proto::Metric) -> bool) -> f64 {
        self.metrics
            .registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| {
                f.get_metric()
                    .iter()
                    .filter(|m| keep(m))
                    .map(|m| m.get_counter().get_value())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    pub fn assigned(&self) -> i64 {
        self.metrics.assigned_partitions.get()
    }
}

/// Every message of a topic, from the beginning to the current end of each partition.
pub async fn read_all(brokers: &str, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("reader"))
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        let parts = md.topics()[0].partitions().len();
        for p in 0..parts as i32 {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let (mut eof, mut out) = (0, Vec::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while eof < parts && std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(m.detach()),
                Some(Err(KafkaError::PartitionEOF(_))) => eof += 1,
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap()
}

/// The `(partition, offset)` of every row in the store.
pub fn stored_positions(store: &MemoryStore) -> BTreeSet<(i32, i64)> {
    store
        .rows()
        .iter()
        .map(|e| (e.source.partition, e.source.offset))
        .collect()
}

/// A loopback port that was free a moment ago (Prometheus cannot report a port 0 choice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `GET path` over HTTP/1.0; returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((status, body.to_owned()))
}

/// The environment of a `vault run` process against this test's Kafka and CQL node.
pub fn vault_env(
    brokers: &str,
    topic: &str,
    group: &str,
    scylla_node: &str,
    keyspace: &str,
) -> Vec<(String, String)> {
    [
        ("VAULT_KAFKA_BROKERS", brokers),
        ("VAULT_KAFKA_TOPICS", topic),
        ("VAULT_KAFKA_GROUP_ID", group),
        ("VAULT_KAFKA_SESSION_TIMEOUT", "6s"),
        ("VAULT_KAFKA_COMMIT_INTERVAL", "200ms"),
        ("VAULT_BATCH_MAX_EVENTS", "50"),
        ("VAULT_BATCH_LINGER", "50ms"),
        ("VAULT_SCYLLA_NODES", scylla_node),
        ("VAULT_SCYLLA_KEYSPACE", keyspace),
        ("VAULT_SCYLLA_CONSISTENCY", "LOCAL_QUORUM"),
        ("VAULT_LOG_LEVEL", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A `vault run` process, killed when dropped (a failing test leaves nothing running).
pub struct VaultProcess(std::process::Child);

impl std::ops::Deref for VaultProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for VaultProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for VaultProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts `vault run` with `env`, logging to `log`; returns the process and its metrics address.
pub fn spawn_vault(env: &[(String, String)], log: &std::path::Path) -> (VaultProcess, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
        .arg("run")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("VAULT_METRICS_ADDR", &metrics)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start vault");
    (VaultProcess(child), metrics)
}

/// SIGTERM, then waits for the process to exit 0 (it drains, commits and leaves the group).
pub async fn stop_gracefully(mut child: VaultProcess, what: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    wait_until(what, Duration::from_secs(60), || {
        let exited = child.try_wait().ok().flatten();
        async move {
            match exited {
                Some(s) if s.success() => Ok(()),
                Some(s) => panic!("{what}: exited with {s}"),
                None => Err("running".into()),
            }
        }
    })
    .await;
}

/// Everything a test of real `vault run` processes needs: a Kafka with a topic, a CQL stand-in
/// with the schema in place, a log directory and the processes' environment.
pub struct ProcessRig {
    pub kafka: Kafka,
    pub node: vault_sandbox::cql::CqlNode,
    pub topic: String,
    pub group: String,
    pub keyspace: String,
    pub dir: std::path::PathBuf,
    pub env: Vec<(String, String)>,
}

impl ProcessRig {
    pub async fn start(name: &str, partitions: i32) -> ProcessRig {
        let kafka = Kafka::start();
        let node =
            vault_sandbox::cql::CqlNode::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("CQL stand-in");
        let (topic, group) = (unique(name), unique("g"));
        kafka.create_source_topic(&topic, partitions).await;
        let keyspace = unique("k").replace('-', "_");
        let scylla = vault::config::ScyllaConfig {
            nodes: vec![node.addr().to_string()],
            keyspace: keyspace.clone(),
            ..Default::default()
        };
        drop(
            vault::store::scylla::ScyllaStore::connect(&scylla, true)
                .await
                .expect("migrate"),
        );
        let dir = std::env::temp_dir().join(unique(&format!("vault-{name}")));
        std::fs::create_dir_all(&dir).expect("log dir");
        let env = vault_env(
            &kafka.brokers,
            &topic,
            &group,
            &node.addr().to_string(),
            &keyspace,
        );
        ProcessRig {
            kafka,
            node,
            topic,
            group,
            keyspace,
            dir,
            env,
        }
    }
}

/// A self-signed certificate for 127.0.0.1 (also its own CA) and its key, as PEM files.
pub fn self_signed(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    self_signed_for(dir, name, "127.0.0.1")
}

/// A self-signed certificate for `ip` (also its own CA) and its key, as PEM files.
pub fn self_signed_for(
    dir: &std::path::Path,
    name: &str,
    ip: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
    use openssl::x509::{X509NameBuilder, X509};
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_text("CN", name).unwrap();
    let subject = subject.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&subject).unwrap();
    b.set_issuer_name(&subject).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .ip(ip)
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = b.build();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.to_pem().unwrap()).unwrap();
    std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (cert_path, key_path)
}

/// A producer that sends values larger than librdkafka's default limit, compressed, as a
/// producer with raised limits would.
pub fn big_producer(brokers: &str) -> rdkafka::producer::FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "4000000")
        .set("compression.type", "lz4")
        .create()
        .expect("producer")
}

/// The messages of `topic` that `vault dlq replay` published (with a `vault.replayed.from`
/// header).
pub async fn replayed(brokers: &str, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::message::{Headers, Message};
    read_all(brokers, topic)
        .await
        .into_iter()
        .filter(|m| {
            m.headers()
                .is_some_and(|h| h.iter().any(|h| h.key == vault::tools::dlq::REPLAYED_FROM))
        })
        .collect()
}
