//! Configuration: layered file → environment (`VAULT_<SECTION>_<KEY>`) → command line
//! (`--set section.key=value`), deserialized strictly (unknown keys are errors) and validated once
//! into [`Settings`]. Every key has a documented default in `deploy/vault.example.toml`, which a
//! test parses, so the example cannot drift from the code.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use crate::event::{Limits, MAX_JSON_DEPTH_LIMIT};
use crate::pipeline::flush::FlushPolicy;

/// Sections a `VAULT_*` variable may address; other `VAULT_*` variables are not configuration.
const SECTIONS: [&str; 6] = ["kafka", "batch", "pipeline", "scylla", "metrics", "log"];

/// librdkafka options that vault owns, because the delivery guarantee depends on them.
const RESERVED_KAFKA_OPTIONS: [(&str, &str); 6] = [
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("group.id", "set kafka.group_id instead"),
    ("group.instance.id", "set kafka.instance_id instead"),
    (
        "enable.auto.commit",
        "vault commits explicitly, only after writes are durable",
    ),
    (
        "enable.auto.offset.store",
        "vault commits explicitly, only after writes are durable",
    ),
    (
        "partition.assignment.strategy",
        "vault requires cooperative-sticky",
    ),
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub batch: BatchConfig,
    pub pipeline: PipelineConfig,
    pub scylla: ScyllaConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port`.
    #[serde(deserialize_with = "lenient_string")]
    pub brokers: String,
    /// Topics to consume.
    #[serde(deserialize_with = "string_or_list")]
    pub topics: Vec<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    /// Static membership (`group.instance.id`); empty disables it.
    #[serde(deserialize_with = "lenient_string")]
    pub instance_id: String,
    /// Where a partition without a committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest time between commits of progress made.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Dead-letter topic; `{topic}` is replaced by the source topic. It must exist when
    /// `pipeline.on_invalid = "dlq"` (checked at start-up) and must not be a source topic.
    pub dead_letter_topic: String,
    /// Largest dead letter, in bytes, that the dead-letter topic accepts (its
    /// `max.message.bytes`, and the producer's `message.max.bytes`): a longer value is cut to
    /// fit, with headers for its original size and SHA-256.
    pub dead_letter_max_bytes: usize,
    /// Bytes of fetched, not yet read messages librdkafka may hold, shared among the subscribed
    /// topics' partitions (its per-partition queue limit and fetch size).
    pub prefetch_bytes: usize,
    /// Raw librdkafka options for the consumer and the dead-letter producer (security, tuning).
    pub options: BTreeMap<String, String>,
    /// Accept `isolation.level = read_uncommitted` in `options`, which stores events of aborted
    /// transactions. One of the explicit opt-ins that weaken the delivery guarantee (see
    /// [`Settings::weakened_guarantees`]); refused without it.
    pub allow_read_uncommitted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Batches of one partition being written at once; the partition stops reading at the limit.
    pub max_in_flight: usize,
}

/// What happens to a message that is not a valid event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidPolicy {
    /// Publish it to the dead-letter topic; its offset counts as done once Kafka acknowledges.
    #[serde(rename = "dlq")]
    DeadLetter,
    /// Log and count it, then move on.
    Skip,
    /// Stop the partition at it (nothing after it is committed).
    Fail,
}

/// Which store the pipeline writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Scylla,
    /// Acknowledges without storing: for benchmarks of the consume side only.
    Null,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub store: StoreKind,
    /// Persister tasks (batches written concurrently across all partitions).
    pub persisters: usize,
    /// Memory of records read and not yet durable (open batches and batches being written),
    /// across all partitions of the process; a partition whose next record does not fit hands
    /// over its open batch and stops reading until there is room.
    pub max_in_flight_bytes: usize,
    /// Larger Kafka values are invalid (dead-lettered).
    pub max_event_bytes: usize,
    /// Deeper nesting of objects and arrays (the event object is level 1) is invalid
    /// (dead-lettered): readers with a recursion limit could not read the value back.
    pub max_json_depth: usize,
    pub on_invalid: InvalidPolicy,
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Writes failing for longer than this make the instance not ready.
    #[serde(with = "humantime_serde")]
    pub unready_after: Duration,
    /// How long a revoked partition may take to drain before it is let go uncommitted.
    #[serde(with = "humantime_serde")]
    pub revoke_timeout: Duration,
    /// How long shutdown waits for in-flight writes before abandoning them uncommitted.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    #[serde(deserialize_with = "string_or_list")]
    pub nodes: Vec<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub keyspace: String,
    #[serde(deserialize_with = "lenient_string")]
    pub username: String,
    #[serde(deserialize_with = "lenient_string")]
    pub password: String,
    /// Consistency of writes: one of ANY, ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM, EACH_QUORUM, LOCAL_ONE.
    /// ANY, ONE and LOCAL_ONE need `allow_weak_consistency`.
    pub consistency: String,
    /// Datacenter whose nodes are preferred (token- and DC-aware routing); empty: any.
    #[serde(deserialize_with = "lenient_string")]
    pub local_dc: String,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Keyspace replication used by `vault migrate`: SimpleStrategy (development) or
    /// NetworkTopologyStrategy (production, with `datacenters`).
    pub replication_strategy: String,
    /// Replication factor for SimpleStrategy.
    pub replication_factor: u32,
    /// Replication factor per datacenter for NetworkTopologyStrategy, e.g. { dc1 = 3 }.
    pub datacenters: BTreeMap<String, u32>,
    /// Default TTL of stored rows; "0s" keeps them forever.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Rows of one (user_id, day) partition sent in one UNLOGGED batch, at most.
    pub max_batch_rows: usize,
    /// Bytes of payload in one UNLOGGED batch, at most (keep below the cluster's batch_size_fail_threshold).
    pub max_batch_bytes: usize,
    /// Write requests in flight at once, per process (one batch sends at most 32 at once).
    pub max_concurrent_requests: usize,
    /// Connect to the nodes over TLS.
    pub tls: bool,
    /// PEM file of the certificate authorities that sign the nodes' certificates; empty: the
    /// system's trusted roots.
    #[serde(deserialize_with = "lenient_string")]
    pub tls_ca_file: String,
    /// Client certificate and key (PEM) for nodes that require mutual TLS; both or neither.
    #[serde(deserialize_with = "lenient_string")]
    pub tls_cert_file: String,
    #[serde(deserialize_with = "lenient_string")]
    pub tls_key_file: String,
    /// Verify the nodes' certificates. Turn off only to test against self-signed nodes.
    pub tls_verify: bool,
    /// Accept a consistency at which one node's loss can lose acknowledged writes: ANY, ONE,
    /// LOCAL_ONE, or a LOCAL_* level without `local_dc` while `datacenters` names several. One
    /// of the explicit opt-ins that weaken the delivery guarantee (see
    /// [`Settings::weakened_guarantees`]); refused without it.
    pub allow_weak_consistency: bool,
}

impl fmt::Debug for ScyllaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaConfig")
            .field("nodes", &self.nodes)
            .field("keyspace", &self.keyspace)
            .field("username", &self.username)
            .field("password", &mask(&self.password))
            .field("consistency", &self.consistency)
            .field("local_dc", &self.local_dc)
            .field("request_timeout", &self.request_timeout)
            .field("replication_strategy", &self.replication_strategy)
            .field("replication_factor", &self.replication_factor)
            .field("datacenters", &self.datacenters)
            .field("default_ttl", &self.default_ttl)
            .field("max_batch_rows", &self.max_batch_rows)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_verify", &self.tls_verify)
            .field("allow_weak_consistency", &self.allow_weak_consistency)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[serde(deserialize_with = "lenient_string")]
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `vault=debug,rdkafka=warn`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["user-activity".into()],
            group_id: "vault".into(),
            instance_id: String::new(),
            auto_offset_reset: "earliest".into(),
            session_timeout: Duration::from_secs(45),
            commit_interval: Duration::from_secs(1),
            dead_letter_topic: "{topic}.dlq".into(),
            dead_letter_max_bytes: 1_000_000,
            prefetch_bytes: 8 << 20,
            options: BTreeMap::new(),
            allow_read_uncommitted: false,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 1000,
            max_bytes: 1024 * 1024,
            linger: Duration::from_millis(250),
            max_in_flight: 4,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            store: StoreKind::Scylla,
            persisters: 8,
            max_in_flight_bytes: 16 << 20,
            max_event_bytes: 1024 * 1024,
            max_json_depth: crate::event::DEFAULT_MAX_JSON_DEPTH,
            on_invalid: InvalidPolicy::DeadLetter,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(30),
            unready_after: Duration::from_secs(60),
            revoke_timeout: Duration::from_secs(20),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "vault".into(),
            username: String::new(),
            password: String::new(),
            consistency: "LOCAL_QUORUM".into(),
            local_dc: String::new(),
            request_timeout: Duration::from_secs(5),
            replication_strategy: "SimpleStrategy".into(),
            replication_factor: 1,
            datacenters: BTreeMap::new(),
            default_ttl: Duration::ZERO,
            max_batch_rows: 100,
            max_batch_bytes: 64 * 1024,
            max_concurrent_requests: 256,
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_verify: true,
            allow_weak_consistency: false,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: "127.0.0.1:9898".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Why configuration was refused. Each message names the key and what would be accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist: pass an existing file or leave --config unset")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Load(String),
    #[error("{key} = {value:?} is invalid: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("--set {0:?} is not of the form section.key=value")]
    BadOverride(String),
}

/// Validated, typed settings: what the rest of the program runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub flush: FlushPolicy,
    pub metrics_addr: SocketAddr,
}

/// Retry timing shared by the persisters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySettings {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Settings {
    pub fn retry(&self) -> RetrySettings {
        RetrySettings {
            initial_backoff: self.config.pipeline.retry_initial_backoff,
            max_backoff: self.config.pipeline.retry_max_backoff,
        }
    }

    /// How long revokes and shutdown may take (see [`crate::pipeline::deadline`]).
    pub fn deadlines(&self) -> crate::pipeline::deadline::Deadlines {
        crate::pipeline::deadline::Deadlines {
            revoke_timeout: self.config.pipeline.revoke_timeout,
            shutdown_timeout: self.config.pipeline.shutdown_timeout,
        }
    }

    /// The dead-letter topic of a source topic.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        self.config
            .kafka
            .dead_letter_topic
            .replace("{topic}", topic)
    }

    /// Every dead-letter topic in use, each with the source topics (in configured order) whose
    /// dead letters go there: several when `kafka.dead_letter_topic` has no `{topic}`.
    pub fn dead_letter_routes(&self) -> BTreeMap<String, Vec<String>> {
        let mut routes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in &self.config.kafka.topics {
            routes
                .entry(self.dead_letter_topic(t))
                .or_default()
                .push(t.clone());
        }
        routes
    }

    /// What a Kafka value may be: `pipeline.max_event_bytes` and `pipeline.max_json_depth`.
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.config.pipeline.max_event_bytes,
            max_depth: self.config.pipeline.max_json_depth,
        }
    }

    /// The settings in force that weaken the delivery guarantee, each with what it costs, for
    /// a warning at start-up; empty with the defaults. Validation refuses each of them unless its
    /// opt-in (`scylla.allow_weak_consistency`, `kafka.allow_read_uncommitted`) is set;
    /// `pipeline.on_invalid = "skip"` is listed too, being a choice to drop invalid input.
    pub fn weakened_guarantees(&self) -> Vec<String> {
        let mut out: Vec<String> = weakenings(&self.config)
            .into_iter()
            .filter(|w| w.allowed)
            .map(|w| {
                format!(
                    "{} = {} (allowed by {} = true): {}",
                    w.key, w.value, w.opt_in, w.cost
                )
            })
            .collect();
        if self.config.pipeline.on_invalid == InvalidPolicy::Skip {
            out.push(
                "pipeline.on_invalid = skip: invalid events are logged, counted and dropped, \
                 not kept in a dead-letter topic"
                    .into(),
            );
        }
        out
    }
}

/// A setting that weakens the delivery guarantee: where it is, the opt-in that accepts it, and
/// what it costs. Validation and [`Settings::weakened_guarantees`] both read this one list.
struct Weakening {
    key: &'static str,
    value: String,
    opt_in: &'static str,
    allowed: bool,
    cost: String,
    fix: &'static str,
}

/// Consistency levels at which a write counts as durable once a single node has it.
const WEAK_CONSISTENCIES: [&str; 3] = ["ANY", "ONE", "LOCAL_ONE"];

fn weakenings(c: &Config) -> Vec<Weakening> {
    let mut out = Vec::new();
    let s = &c.scylla;
    let consistency = s.consistency.to_ascii_uppercase();
    if WEAK_CONSISTENCIES.contains(&consistency.as_str()) {
        let cost = if consistency == "ANY" {
            "a write counts as durable once any node holds it, if only as a hint for the \
             replicas: losing that node loses events whose offsets are already committed"
        } else {
            "a write counts as durable once one replica has it: losing that replica before the \
             others catch up loses events whose offsets are already committed"
        };
        out.push(Weakening {
            key: "scylla.consistency",
            value: s.consistency.clone(),
            opt_in: "scylla.allow_weak_consistency",
            allowed: s.allow_weak_consistency,
            cost: cost.into(),
            fix: "use LOCAL_QUORUM (the default), QUORUM, EACH_QUORUM or ALL",
        });
    } else if consistency.starts_with("LOCAL_") && s.local_dc.is_empty() && s.datacenters.len() > 1
    {
        let dcs: Vec<&str> = s.datacenters.keys().map(String::as_str).collect();
        out.push(Weakening {
            key: "scylla.local_dc",
            value: String::new(),
            opt_in: "scylla.allow_weak_consistency",
            allowed: s.allow_weak_consistency,
            cost: format!(
                "scylla.consistency = {} is counted in the datacenter of whichever node \
                 coordinates a write, and scylla.datacenters names {} ({}): a write may be \
                 acknowledged by a datacenter other than the one vault runs in",
                s.consistency,
                dcs.len(),
                dcs.join(", ")
            ),
            fix: "set scylla.local_dc to the datacenter vault runs in",
        });
    }
    let read_uncommitted = c
        .kafka
        .options
        .get("isolation.level")
        .filter(|v| v.trim().eq_ignore_ascii_case("read_uncommitted"));
    if let Some(v) = read_uncommitted {
        out.push(Weakening {
            key: "kafka.options",
            value: format!("isolation.level={v}"),
            opt_in: "kafka.allow_read_uncommitted",
            allowed: c.kafka.allow_read_uncommitted,
            cost: "events of aborted Kafka transactions are stored as if they had been produced"
                .into(),
            fix: "remove it (vault then reads read_committed, librdkafka's default)",
        });
    }
    out
}

/// Kafka's rule for topic names.
fn is_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Loads configuration from an optional file, the process environment and `--set` overrides.
pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
    load_with_env(file, overrides, std::env::vars())
}

/// [`load`] with an explicit environment, for tests.
pub fn load_with_env(
    file: Option<&Path>,
    overrides: &[String],
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    // Which layer set each key, so an error can say what to fix.
    let mut origins: Vec<(String, String)> = Vec::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_owned()));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    // VAULT_<SECTION>_<KEY>: the section is the first word, the key the rest (which may hold
    // underscores). The environment is a parameter so tests need not touch the process's own.
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("VAULT_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some((section, key)) = lower.split_once('_') else {
            continue;
        };
        if !SECTIONS.contains(&section) || key.is_empty() {
            continue;
        }
        // VAULT_KAFKA_OPTION_SASL_PASSWORD=... is the raw librdkafka option sasl.password.
        if let Some(option) = (section == "kafka")
            .then(|| key.strip_prefix("option_"))
            .flatten()
            .filter(|o| !o.is_empty())
        {
            let option = option.replace('_', ".");
            fig = fig.merge(Serialized::default(
                "kafka.options",
                BTreeMap::from([(option.clone(), value)]),
            ));
            origins.push((
                format!("kafka.options.{option}"),
                format!("environment variable {name}"),
            ));
            continue;
        }
        let path = format!("{section}.{key}");
        fig = fig.merge(Serialized::default(&path, parse_scalar(&value)));
        origins.push((path, format!("environment variable {name}")));
    }
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .filter(|(k, _)| k.contains('.'))
            .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
        let key = key.trim();
        // --set kafka.options.fetch.wait.max.ms=10: the rest of the key is one librdkafka name.
        if let Some(option) = key.strip_prefix("kafka.options.") {
            fig = fig.merge(Serialized::default(
                "kafka.options",
                BTreeMap::from([(option.to_owned(), value.trim().to_owned())]),
            ));
        } else {
            fig = fig.merge(Serialized::default(key, parse_scalar(value.trim())));
        }
        origins.push((key.to_owned(), format!("--set {o}")));
    }
    fig.extract()
        .map_err(|e| ConfigError::Load(describe_load_error(e, file, &origins)))
}

/// "batch.linger: invalid value ... (from environment variable VAULT_BATCH_LINGER)".
fn describe_load_error(
    e: figment::Error,
    file: Option<&Path>,
    origins: &[(String, String)],
) -> String {
    e.into_iter()
        .map(|err| {
            let key = err.path.join(".");
            let origin = origins
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, o)| o.clone())
                .or_else(|| file.map(|f| format!("file {}", f.display())))
                .unwrap_or_else(|| "defaults".into());
            let key = if key.is_empty() {
                "configuration".to_owned()
            } else {
                key
            };
            format!("{key}: {} (from {origin})", err.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Interprets a value from the environment or the command line the way TOML would a bare word.
fn parse_scalar(s: &str) -> figment::value::Value {
    use figment::value::Value;
    if let Ok(i) = s.parse::<i64>() {
        return Value::from(i);
    }
    match s {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => Value::from(s.to_owned()),
    }
}

impl Config {
    /// Checks every value once; the error names the key and what it accepts.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        fn bad(key: &'static str, value: impl fmt::Display, allowed: &str) -> ConfigError {
            ConfigError::Invalid {
                key,
                value: value.to_string(),
                allowed: allowed.to_owned(),
            }
        }
        let k = &self.kafka;
        if k.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(bad(
                "kafka.brokers",
                &k.brokers,
                "give at least one host:port",
            ));
        }
        if k.topics.is_empty() {
            return Err(bad("kafka.topics", "", "give at least one topic"));
        }
        for t in &k.topics {
            if !is_topic_name(t) {
                return Err(bad(
                    "kafka.topics",
                    t,
                    "topic names are 1-249 characters of [a-zA-Z0-9._-]",
                ));
            }
        }
        if k.group_id.trim().is_empty() {
            return Err(bad("kafka.group_id", &k.group_id, "must not be empty"));
        }
        if !["earliest", "latest"].contains(&k.auto_offset_reset.as_str()) {
            return Err(bad(
                "kafka.auto_offset_reset",
                &k.auto_offset_reset,
                "earliest or latest",
            ));
        }
        if k.prefetch_bytes < 1 << 20 {
            return Err(bad(
                "kafka.prefetch_bytes",
                k.prefetch_bytes,
                "at least 1048576 (1 MiB)",
            ));
        }
        if k.commit_interval.is_zero() {
            return Err(bad(
                "kafka.commit_interval",
                "0s",
                "a positive duration such as \"1s\"",
            ));
        }
        if k.session_timeout < Duration::from_secs(1) {
            return Err(bad(
                "kafka.session_timeout",
                humantime::format_duration(k.session_timeout),
                "at least 1s",
            ));
        }
        if k.dead_letter_max_bytes < 64 << 10 {
            return Err(bad(
                "kafka.dead_letter_max_bytes",
                k.dead_letter_max_bytes,
                "at least 65536: the dead-letter topic's max.message.bytes (Kafka's default is 1048588)",
            ));
        }
        if k.dead_letter_topic.is_empty() {
            return Err(bad(
                "kafka.dead_letter_topic",
                "",
                "a topic name; {topic} stands for the source topic",
            ));
        }
        for t in &k.topics {
            let dlq = k.dead_letter_topic.replace("{topic}", t);
            if !is_topic_name(&dlq) {
                return Err(ConfigError::Invalid {
                    key: "kafka.dead_letter_topic",
                    value: k.dead_letter_topic.clone(),
                    allowed: format!(
                        "it gives '{dlq}' for topic '{t}'; topic names are 1-249 characters of \
                         [a-zA-Z0-9._-], and {{topic}} stands for the source topic"
                    ),
                });
            }
            if k.topics.contains(&dlq) {
                return Err(ConfigError::Invalid {
                    key: "kafka.dead_letter_topic",
                    value: k.dead_letter_topic.clone(),
                    allowed: format!(
                        "it gives '{dlq}' for topic '{t}', which is a source topic: dead letters \
                         would be read back as input; give them a topic of their own, such as \
                         \"{{topic}}.dlq\""
                    ),
                });
            }
        }
        for name in k.options.keys() {
            if let Some((_, why)) = RESERVED_KAFKA_OPTIONS.iter().find(|(n, _)| n == name) {
                return Err(ConfigError::Invalid {
                    key: "kafka.options",
                    value: name.clone(),
                    allowed: format!("this option is managed by vault: {why}"),
                });
            }
        }
        let b = &self.batch;
        if b.max_events == 0 || b.max_events > 100_000 {
            return Err(bad("batch.max_events", b.max_events, "1 to 100000"));
        }
        if b.max_bytes < 1024 {
            return Err(bad("batch.max_bytes", b.max_bytes, "at least 1024 (bytes)"));
        }
        if b.linger.is_zero() || b.linger > Duration::from_secs(3600) {
            return Err(bad(
                "batch.linger",
                humantime::format_duration(b.linger),
                "a duration from 1ms to 1h, such as \"250ms\"",
            ));
        }
        if b.max_in_flight == 0 || b.max_in_flight > 1024 {
            return Err(bad("batch.max_in_flight", b.max_in_flight, "1 to 1024"));
        }
        let p = &self.pipeline;
        if p.max_in_flight_bytes < 1 << 20 {
            return Err(bad(
                "pipeline.max_in_flight_bytes",
                p.max_in_flight_bytes,
                "at least 1048576 (1 MiB)",
            ));
        }
        if p.persisters == 0 || p.persisters > 4096 {
            return Err(bad("pipeline.persisters", p.persisters, "1 to 4096"));
        }
        if p.max_event_bytes == 0 {
            return Err(bad(
                "pipeline.max_event_bytes",
                0,
                "a positive number of bytes",
            ));
        }
        if !(2..=MAX_JSON_DEPTH_LIMIT).contains(&p.max_json_depth) {
            return Err(bad(
                "pipeline.max_json_depth",
                p.max_json_depth,
                "2 (the event object and a flat attributes object) to 127 (serde_json's \
                 default reader refuses 128 levels)",
            ));
        }
        if p.retry_initial_backoff.is_zero() || p.retry_initial_backoff > p.retry_max_backoff {
            return Err(bad(
                "pipeline.retry_initial_backoff",
                humantime::format_duration(p.retry_initial_backoff),
                "positive and not above pipeline.retry_max_backoff",
            ));
        }
        let s = &self.scylla;
        if s.nodes.is_empty() {
            return Err(bad("scylla.nodes", "", "give at least one host:port"));
        }
        for n in &s.nodes {
            let ok = n
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(bad(
                    "scylla.nodes",
                    n,
                    "each node is host:port, e.g. 127.0.0.1:9042",
                ));
            }
        }
        let ks_ok = !s.keyspace.is_empty()
            && s.keyspace.len() <= 48
            && s.keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ks_ok {
            return Err(bad(
                "scylla.keyspace",
                &s.keyspace,
                "1-48 characters of [a-zA-Z0-9_]",
            ));
        }
        const CONSISTENCIES: [&str; 9] = [
            "ANY",
            "ONE",
            "TWO",
            "THREE",
            "QUORUM",
            "ALL",
            "LOCAL_QUORUM",
            "EACH_QUORUM",
            "LOCAL_ONE",
        ];
        if !CONSISTENCIES.contains(&s.consistency.to_ascii_uppercase().as_str()) {
            return Err(bad(
                "scylla.consistency",
                &s.consistency,
                "one of ANY, ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM, EACH_QUORUM, LOCAL_ONE",
            ));
        }
        if s.tls_cert_file.is_empty() != s.tls_key_file.is_empty() {
            return Err(bad(
                "scylla.tls_key_file",
                &s.tls_key_file,
                "set together with scylla.tls_cert_file (mutual TLS), or neither",
            ));
        }
        for (key, file) in [
            ("scylla.tls_ca_file", &s.tls_ca_file),
            ("scylla.tls_cert_file", &s.tls_cert_file),
            ("scylla.tls_key_file", &s.tls_key_file),
        ] {
            if !file.is_empty() && !Path::new(file).is_file() {
                return Err(bad(key, file, "the path of a readable PEM file"));
            }
            if !file.is_empty() && !s.tls {
                return Err(bad(
                    "scylla.tls",
                    "false",
                    "true when TLS files are given (or remove them)",
                ));
            }
        }
        if s.request_timeout.is_zero() {
            return Err(bad(
                "scylla.request_timeout",
                "0s",
                "a positive duration such as \"5s\"",
            ));
        }
        match s.replication_strategy.as_str() {
            "SimpleStrategy" if s.replication_factor >= 1 => {}
            "SimpleStrategy" => return Err(bad("scylla.replication_factor", s.replication_factor, "at least 1")),
            "NetworkTopologyStrategy" if !s.datacenters.is_empty() && s.datacenters.values().all(|rf| *rf >= 1) => {}
            "NetworkTopologyStrategy" => {
                return Err(bad("scylla.datacenters", format!("{:?}", s.datacenters), "NetworkTopologyStrategy needs a replication factor >= 1 per datacenter, e.g. { dc1 = 3 }"))
            }
            other => return Err(bad("scylla.replication_strategy", other, "SimpleStrategy or NetworkTopologyStrategy")),
        }
        if s.default_ttl.subsec_nanos() != 0 || s.default_ttl.as_secs() > i32::MAX as u64 {
            return Err(bad(
                "scylla.default_ttl",
                humantime::format_duration(s.default_ttl),
                "whole seconds, e.g. \"30days\", or \"0s\" for none",
            ));
        }
        if s.max_batch_rows == 0 || s.max_batch_rows > 1000 {
            return Err(bad("scylla.max_batch_rows", s.max_batch_rows, "1 to 1000"));
        }
        if s.max_batch_bytes < 1024 {
            return Err(bad(
                "scylla.max_batch_bytes",
                s.max_batch_bytes,
                "at least 1024 (bytes)",
            ));
        }
        if s.max_concurrent_requests == 0 {
            return Err(bad("scylla.max_concurrent_requests", 0, "at least 1"));
        }
        if let Some(w) = weakenings(&self).into_iter().find(|w| !w.allowed) {
            return Err(ConfigError::Invalid {
                key: w.key,
                value: w.value,
                allowed: format!(
                    "{}; {}, or set {} = true to accept that",
                    w.cost, w.fix, w.opt_in
                ),
            });
        }
        let metrics_addr: SocketAddr = self.metrics.addr.parse().map_err(|_| {
            bad(
                "metrics.addr",
                &self.metrics.addr,
                "an ip:port such as 127.0.0.1:9898",
            )
        })?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(bad(
                "log.level",
                &self.log.level,
                "a filter such as info or vault=debug",
            ));
        }
        let flush = FlushPolicy {
            max_events: b.max_events,
            max_bytes: b.max_bytes,
            linger: b.linger,
        };
        Ok(Settings {
            config: self,
            flush,
            metrics_addr,
        })
    }

    /// The configuration as TOML with secrets masked, for `vault check-config`.
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        c.scylla.password = mask(&c.scylla.password);
        for (k, v) in c.kafka.options.iter_mut() {
            if is_secret_option(k) {
                *v = mask(v);
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key.pem") || k.contains("token")
}

fn mask(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        "********".into()
    }
}

/// Accepts a list or one comma-separated string (the form environment variables take).
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Either::Many(v) => v.into_iter().map(|s| s.trim().to_owned()).collect(),
    })
}

/// Accepts a string, or a number or boolean taken as its text (`VAULT_KAFKA_GROUP_ID=42`).
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = load_with_env(None, &[], env(&[]))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(s.config, Config::default());
        assert_eq!(s.flush.linger, Duration::from_millis(250));
    }

    #[test]
    fn the_documented_env_names_reach_their_keys() {
        let c = load_with_env(
            None,
            &[],
            env(&[
                ("VAULT_KAFKA_BROKERS", "k1:9092,k2:9092"),
                ("VAULT_KAFKA_TOPICS", "a, b"),
                ("VAULT_KAFKA_GROUP_ID", "42"),
                ("VAULT_SCYLLA_NODES", "s1:9042,s2:9042"),
                ("VAULT_SCYLLA_KEYSPACE", "ks"),
                ("VAULT_METRICS_ADDR", "0.0.0.0:9100"),
                ("VAULT_BATCH_MAX_EVENTS", "500"),
                ("VAULT_BATCH_LINGER", "40ms"),
                ("VAULT_IT_SCYLLA_NODES", "ignored:1"),
                ("VAULT_CONFIG", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.kafka.topics, ["a", "b"]);
        assert_eq!(c.kafka.group_id, "42");
        assert_eq!(c.scylla.nodes, ["s1:9042", "s2:9042"]);
        assert_eq!(c.scylla.keyspace, "ks");
        assert_eq!(c.metrics.addr, "0.0.0.0:9100");
        assert_eq!(c.batch.max_events, 500);
        assert_eq!(c.batch.linger, Duration::from_millis(40));
    }

    #[test]
    fn layers_apply_file_then_env_then_cli() {
        let dir = std::env::temp_dir().join(format!("vault-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("layers.toml");
        std::fs::write(
            &file,
            "[batch]\nmax_events = 10\nmax_in_flight = 2\nlinger = \"1s\"\n",
        )
        .unwrap();
        let c = load_with_env(
            Some(&file),
            &["batch.max_events=30".into()],
            env(&[
                ("VAULT_BATCH_MAX_EVENTS", "20"),
                ("VAULT_BATCH_LINGER", "2s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.batch.max_events, 30, "cli wins over env and file");
        assert_eq!(c.batch.linger, Duration::from_secs(2), "env wins over file");
        assert_eq!(c.batch.max_in_flight, 2, "file wins over defaults");
    }

    #[test]
    fn raw_librdkafka_options_come_from_file_env_and_cli() {
        let dir = std::env::temp_dir().join(format!("vault-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("opts.toml");
        std::fs::write(
            &file,
            "[kafka.options]\n\"security.protocol\" = \"SASL_SSL\"\n\"fetch.wait.max.ms\" = \"100\"\n",
        )
        .unwrap();
        let c = load_with_env(
            Some(&file),
            &["kafka.options.fetch.wait.max.ms=10".into()],
            env(&[
                ("VAULT_KAFKA_OPTION_SASL_PASSWORD", "hunter2"),
                ("VAULT_KAFKA_OPTION_FETCH_WAIT_MAX_MS", "50"),
            ]),
        )
        .unwrap();
        let o = &c.kafka.options;
        assert_eq!(
            o["security.protocol"], "SASL_SSL",
            "the file's options stay"
        );
        assert_eq!(o["sasl.password"], "hunter2", "env adds one");
        assert_eq!(o["fetch.wait.max.ms"], "10", "cli wins over env and file");
        let err = load_with_env(
            None,
            &[],
            env(&[("VAULT_KAFKA_OPTION_ENABLE_AUTO_COMMIT", "true")]),
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("enable.auto.commit"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = load_with_env(None, &[], env(&[("VAULT_BATCH_MAX_EVENTZ", "1")])).unwrap_err();
        assert!(err.to_string().contains("max_eventz"), "{err}");

        let err = load_with_env(None, &[], env(&[("VAULT_BATCH_LINGER", "soon")])).unwrap_err();
        assert!(err.to_string().contains("linger"), "{err}");

        let cases = [
            ("batch.max_events=0", "batch.max_events"),
            ("batch.linger=0s", "batch.linger"),
            ("kafka.auto_offset_reset=middle", "kafka.auto_offset_reset"),
            ("metrics.addr=localhost", "metrics.addr"),
            ("scylla.keyspace=bad-name", "scylla.keyspace"),
            ("kafka.topics=a b", "kafka.topics"),
        ];
        for (set, key) in cases {
            let err = load_with_env(None, &[set.into()], env(&[]))
                .and_then(Config::validate)
                .unwrap_err();
            assert!(err.to_string().starts_with(key), "{set}: {err}");
        }
    }

    #[test]
    fn reserved_librdkafka_options_are_refused_with_the_reason() {
        let mut c = Config::default();
        c.kafka
            .options
            .insert("enable.auto.commit".into(), "true".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("enable.auto.commit") && err.contains("commits explicitly"),
            "{err}"
        );
    }

    #[test]
    fn secrets_are_masked() {
        let mut c = Config::default();
        c.scylla.password = "hunter2".into();
        c.kafka
            .options
            .insert("sasl.password".into(), "s3cret".into());
        let out = c.to_masked_toml();
        assert!(!out.contains("hunter2") && !out.contains("s3cret"), "{out}");
        assert!(!format!("{:?}", c.scylla).contains("hunter2"));
    }

    #[test]
    fn a_missing_file_is_reported() {
        let err =
            load_with_env(Some(Path::new("/nonexistent/vault.toml")), &[], env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    fn set(pairs: &[&str]) -> Result<Settings, ConfigError> {
        let overrides: Vec<String> = pairs.iter().map(|p| p.to_string()).collect();
        load_with_env(None, &overrides, env(&[]))?.validate()
    }

    #[test]
    fn the_defaults_weaken_nothing() {
        let s = set(&[]).unwrap();
        assert!(s.weakened_guarantees().is_empty());
        assert_eq!(
            s.limits(),
            Limits {
                max_bytes: 1 << 20,
                max_depth: 64
            }
        );
    }

    #[test]
    fn weak_consistency_is_refused_unless_opted_in_and_then_listed() {
        for level in ["ANY", "ONE", "LOCAL_ONE", "one"] {
            let consistency = format!("scylla.consistency={level}");
            let err = set(&[&consistency]).unwrap_err().to_string();
            assert!(
                err.starts_with("scylla.consistency")
                    && err.contains("LOCAL_QUORUM")
                    && err.contains("scylla.allow_weak_consistency = true"),
                "{err}"
            );
            let s = set(&[&consistency, "scylla.allow_weak_consistency=true"]).unwrap();
            let weakened = s.weakened_guarantees();
            assert_eq!(weakened.len(), 1, "{weakened:?}");
            assert!(
                weakened[0].starts_with(&format!("scylla.consistency = {level} (allowed by")),
                "{weakened:?}"
            );
        }
        for level in [
            "TWO",
            "THREE",
            "QUORUM",
            "ALL",
            "LOCAL_QUORUM",
            "EACH_QUORUM",
        ] {
            set(&[&format!("scylla.consistency={level}")]).unwrap();
        }
        // The opt-in alone weakens nothing.
        let s = set(&["scylla.allow_weak_consistency=true"]).unwrap();
        assert!(s.weakened_guarantees().is_empty());
    }

    #[test]
    fn local_consistency_across_datacenters_needs_local_dc() {
        let mut c = Config::default();
        c.scylla.replication_strategy = "NetworkTopologyStrategy".into();
        c.scylla.datacenters = BTreeMap::from([("dc1".into(), 3), ("dc2".into(), 3)]);
        let err = c.clone().validate().unwrap_err().to_string();
        assert!(
            err.starts_with("scylla.local_dc")
                && err.contains("dc1, dc2")
                && err.contains("set scylla.local_dc"),
            "{err}"
        );
        let mut local = c.clone();
        local.scylla.local_dc = "dc1".into();
        assert!(local.validate().unwrap().weakened_guarantees().is_empty());
        let mut quorum = c.clone();
        quorum.scylla.consistency = "QUORUM".into();
        quorum.validate().unwrap();
        let mut one_dc = c.clone();
        one_dc.scylla.datacenters = BTreeMap::from([("dc1".into(), 3)]);
        one_dc.validate().unwrap();
        let mut allowed = c;
        allowed.scylla.allow_weak_consistency = true;
        let weakened = allowed.validate().unwrap().weakened_guarantees();
        assert!(
            weakened.len() == 1 && weakened[0].starts_with("scylla.local_dc"),
            "{weakened:?}"
        );
    }

    #[test]
    fn read_uncommitted_is_refused_unless_opted_in() {
        let option = "kafka.options.isolation.level=read_uncommitted";
        let err = set(&[option]).unwrap_err().to_string();
        assert!(
            err.starts_with("kafka.options")
                && err.contains("aborted")
                && err.contains("kafka.allow_read_uncommitted = true"),
            "{err}"
        );
        let s = set(&[option, "kafka.allow_read_uncommitted=true"]).unwrap();
        assert!(s.weakened_guarantees()[0].contains("isolation.level=read_uncommitted"));
        set(&["kafka.options.isolation.level=read_committed"]).unwrap();
    }

    #[test]
    fn skipping_invalid_input_is_listed_as_a_weakening() {
        let s = set(&["pipeline.on_invalid=skip"]).unwrap();
        assert!(s.weakened_guarantees()[0].starts_with("pipeline.on_invalid = skip"));
    }

    #[test]
    fn a_dead_letter_topic_must_not_be_a_source_topic() {
        for (topics, dlq) in [("a", "{topic}"), ("a,b", "b"), ("a,a.dlq", "{topic}.dlq")] {
            let err = set(&[
                &format!("kafka.topics={topics}"),
                &format!("kafka.dead_letter_topic={dlq}"),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("kafka.dead_letter_topic") && err.contains("source topic"),
                "{err}"
            );
        }
        let err = set(&["kafka.dead_letter_topic={topic} dlq"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[a-zA-Z0-9._-]"), "{err}");
    }

    #[test]
    fn dead_letter_routes_name_each_dead_letter_topic_once() {
        let s = set(&["kafka.topics=a,b", "kafka.dead_letter_topic=shared.dlq"]).unwrap();
        assert_eq!(
            s.dead_letter_routes(),
            BTreeMap::from([(
                "shared.dlq".to_owned(),
                vec!["a".to_owned(), "b".to_owned()]
            )])
        );
        let s = set(&["kafka.topics=a,b"]).unwrap();
        assert_eq!(
            s.dead_letter_routes(),
            BTreeMap::from([
                ("a.dlq".to_owned(), vec!["a".to_owned()]),
                ("b.dlq".to_owned(), vec!["b".to_owned()]),
            ])
        );
    }

    #[test]
    fn max_json_depth_is_bounded_by_what_readers_take() {
        for bad in ["pipeline.max_json_depth=1", "pipeline.max_json_depth=128"] {
            let err = set(&[bad]).unwrap_err().to_string();
            assert!(err.starts_with("pipeline.max_json_depth"), "{err}");
        }
        let s = set(&[
            "pipeline.max_json_depth=127",
            "pipeline.max_event_bytes=4096",
        ])
        .unwrap();
        assert_eq!(
            s.limits(),
            Limits {
                max_bytes: 4096,
                max_depth: 127
            }
        );
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/vault.example.toml");
        let c = load_with_env(Some(&path), &[], env(&[])).unwrap();
        assert_eq!(
            c,
            Config::default(),
            "deploy/vault.example.toml documents the defaults"
        );
        c.validate().unwrap();
    }
}
