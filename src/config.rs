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
const SECTIONS: [&str; 8] = [
    "api",
    "kafka",
    "batch",
    "pipeline",
    "scylla",
    "retention",
    "metrics",
    "log",
];

/// librdkafka options that vault owns, because the delivery guarantee depends on them.
const RESERVED_KAFKA_OPTIONS: [(&str, &str); 8] = [
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("session.timeout.ms", "set kafka.session_timeout instead"),
    ("auto.offset.reset", "set kafka.auto_offset_reset instead"),
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
    pub retention: RetentionConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub api: ApiConfig,
}

/// How long stored events live, by event type: a row expires at `occurred_at` + its type's
/// retention, however often it is written (see `store::retention`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Retention of event types not listed in `event_types`; "0s": none (rows live for the
    /// table's `scylla.default_ttl`, 0 = forever).
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    /// Retention per event type, e.g. { page_view = "90days", purchase = "7years" }.
    pub event_types: BTreeMap<String, String>,
}

/// When a static member (`kafka.instance_id`) leaves the consumer group as it stops. librdkafka
/// sends no LeaveGroup for a static member that closes, so without one its partitions move
/// only when its session expires; with one they move at once, and its restart costs a
/// rebalance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaveGroup {
    /// Never: a restart within `session_timeout` keeps its partitions without a rebalance, and
    /// a scale-down stalls them for `session_timeout`.
    #[default]
    Never,
    /// At every stop: a scale-down moves the partitions at once, and every restart rebalances.
    Always,
    /// When the pod's StatefulSet no longer counts it (its ordinal is at or past the replicas,
    /// or the StatefulSet is gone), read from the Kubernetes API as it stops: a scale-down
    /// leaves, a restart, update or eviction does not (see [`crate::kubernetes`]).
    ScaleDown,
}

impl<'de> Deserialize<'de> for LeaveGroup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Flag(bool),
            Name(String),
        }
        match Given::deserialize(d)? {
            Given::Flag(true) => Ok(LeaveGroup::Always),
            Given::Flag(false) => Ok(LeaveGroup::Never),
            Given::Name(name) => match name.as_str() {
                "never" | "false" => Ok(LeaveGroup::Never),
                "always" | "true" => Ok(LeaveGroup::Always),
                "scale-down" => Ok(LeaveGroup::ScaleDown),
                other => Err(serde::de::Error::custom(format!(
                    "{other:?}: give \"never\", \"always\" or \"scale-down\""
                ))),
            },
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
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
    /// When a static member leaves the group as it stops (a dynamic member always does), so its
    /// partitions move at once instead of after `session_timeout` (see [`LeaveGroup`]).
    pub leave_group_on_shutdown: LeaveGroup,
    /// Where a partition without a committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest time between commits of progress made.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How often the group's committed offset and the log-end offset of every partition of the
    /// subscribed topics are read from the brokers (see [`crate::kafka::group_view`]).
    #[serde(with = "humantime_serde")]
    pub group_view_interval: Duration,
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
    /// A file of more librdkafka options, one `name=value` a line (`#` starts a comment), such
    /// as a mounted Secret holding `sasl.username` and `sasl.password`; empty: none. An option
    /// may be set here or in `options`, not both.
    #[serde(deserialize_with = "lenient_string")]
    pub options_file: String,
    /// Accept `isolation.level = read_uncommitted` in `options`, which stores events of aborted
    /// transactions. One of the explicit opt-ins that weaken the delivery guarantee (see
    /// [`Settings::weakened_guarantees`]); refused without it.
    pub allow_read_uncommitted: bool,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, String> = self
            .options
            .iter()
            .map(|(k, v)| {
                let shown = if is_sensitive(&format!("kafka.options.{k}")) {
                    mask(v)
                } else {
                    v.clone()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("instance_id", &self.instance_id)
            .field("leave_group_on_shutdown", &self.leave_group_on_shutdown)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("session_timeout", &self.session_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("group_view_interval", &self.group_view_interval)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("dead_letter_max_bytes", &self.dead_letter_max_bytes)
            .field("prefetch_bytes", &self.prefetch_bytes)
            .field("options", &options)
            .field("options_file", &self.options_file)
            .field("allow_read_uncommitted", &self.allow_read_uncommitted)
            .finish()
    }
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
    /// Send what is open as soon as the partition has no batch being written (latency of about
    /// one write at low load); `linger` stays the upper bound. false: wait for size or linger.
    pub flush_when_idle: bool,
}

/// What a tombstone (a message with a key and no value) on a source topic means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TombstonePolicy {
    /// A tombstone is invalid input (kind `tombstone`), handled by `pipeline.on_invalid`.
    #[serde(rename = "dlq")]
    Invalid,
    /// A tombstone keyed by a user id erases that user through the tombstone's Kafka timestamp
    /// (see `store::erasure`); its offset is committed once the erasure is durable.
    Erase,
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
    /// Accept `store = "null"`, which commits offsets of events it never stores.
    pub allow_null_store: bool,
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
    /// What a tombstone (a message with a key and no value) means: `dlq` (invalid input) or
    /// `erase` (erase the user its key names).
    pub tombstones: TombstonePolicy,
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
    /// `/healthz` fails once the Kafka poll loop or the coordinator loop has not beaten for
    /// this long (see [`crate::pipeline::deadline::DEFAULT_LIVENESS_TIMEOUT`]).
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
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
    /// A file whose content is the password (one trailing newline ignored), such as a mounted
    /// Secret; empty: none. Set this or `password`, not both.
    #[serde(deserialize_with = "lenient_string")]
    pub password_file: String,
    /// Consistency of writes: one of ANY, ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM, EACH_QUORUM, LOCAL_ONE.
    /// ANY, ONE and LOCAL_ONE need `allow_weak_consistency`.
    pub consistency: String,
    /// Datacenter whose nodes are preferred (token- and DC-aware routing); empty: any.
    #[serde(deserialize_with = "lenient_string")]
    pub local_dc: String,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Keyspace replication used by `vault migrate`: NetworkTopologyStrategy (the default, the
    /// only one ScyllaDB recommends and the one tablets need), or SimpleStrategy (Cassandra and
    /// older ScyllaDB, development only).
    pub replication_strategy: String,
    /// Replication factor for SimpleStrategy, and for NetworkTopologyStrategy without
    /// `datacenters` (in every datacenter of the cluster: the server expands it).
    pub replication_factor: u32,
    /// Replication factor per datacenter for NetworkTopologyStrategy, e.g. { dc1 = 3 }.
    pub datacenters: BTreeMap<String, u32>,
    /// Default TTL of stored rows; "0s" keeps them forever.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Rows sent in one UNLOGGED batch, at most (and, by replica, day-index entries in one
    /// batch of the index).
    pub max_batch_rows: usize,
    /// Bytes of payload in one UNLOGGED batch, at most (keep below the cluster's batch_size_fail_threshold).
    pub max_batch_bytes: usize,
    /// Batch rows of different partitions that live on the same replicas and shard together
    /// (shard-aware batching, the default, see `store::scylla::plan`); off: a batch holds one
    /// partition's rows and its day-index entry (`store::scylla::plan_by_partition`).
    pub batch_by_replica: bool,
    /// Write requests in flight at once, per process, at most (one batch sends at most 32 at
    /// once). With `adaptive_concurrency`, the most the adaptive limit goes up to.
    pub max_concurrent_requests: usize,
    /// Adapt the write requests in flight to the database's answers (AIMD, see
    /// `store::concurrency`): fewer when it answers timeouts or Overloaded or its latency rises,
    /// one more at a time while it keeps up, between `min_concurrent_requests` and
    /// `max_concurrent_requests`. false: always `max_concurrent_requests`.
    pub adaptive_concurrency: bool,
    /// The fewest write requests in flight the adaptive limit goes down to.
    pub min_concurrent_requests: usize,
    /// Threads of the runtime the driver and the persisters of `vault run` run on
    /// (`store::runtime`), apart from the one that consumes Kafka; 0: on that one (the other
    /// commands always use their main runtime).
    pub store_threads: usize,
    /// Event rows this instance writes per second, at most, across all persisters (a hard
    /// limit for a cluster shared with others, see `store::rate`); 0: unlimited.
    pub max_rows_per_second: u64,
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
    /// Accept a password sent without TLS (`password` set and `tls = false`): anyone on the
    /// network path can read it. Refused without it.
    pub allow_cleartext_password: bool,
}

/// The largest `scylla.max_batch_rows`. The store builds the UNLOGGED batch of each size up to
/// it once and reuses it (`store::scylla::Batches`), so no request clones a statement per row;
/// past ~100 rows a request's fixed cost is a small share of it anyway.
pub const MAX_BATCH_ROWS: usize = 128;

/// The largest `scylla.max_batch_bytes`: ScyllaDB's default batch_size_warn_threshold_in_kb.
/// Its estimate of a batch is larger than vault's, and it refuses batches above 1 MiB.
const MAX_BATCH_BYTES: usize = 128 * 1024;

/// The most `scylla.store_threads`.
const MAX_STORE_THREADS: usize = 64;

impl fmt::Debug for ScyllaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaConfig")
            .field("nodes", &self.nodes)
            .field("keyspace", &self.keyspace)
            .field("username", &self.username)
            .field("password", &mask(&self.password))
            .field("password_file", &self.password_file)
            .field("consistency", &self.consistency)
            .field("local_dc", &self.local_dc)
            .field("request_timeout", &self.request_timeout)
            .field("replication_strategy", &self.replication_strategy)
            .field("replication_factor", &self.replication_factor)
            .field("datacenters", &self.datacenters)
            .field("default_ttl", &self.default_ttl)
            .field("max_batch_rows", &self.max_batch_rows)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("batch_by_replica", &self.batch_by_replica)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("adaptive_concurrency", &self.adaptive_concurrency)
            .field("min_concurrent_requests", &self.min_concurrent_requests)
            .field("store_threads", &self.store_threads)
            .field("max_rows_per_second", &self.max_rows_per_second)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_verify", &self.tls_verify)
            .field("allow_weak_consistency", &self.allow_weak_consistency)
            .field("allow_cleartext_password", &self.allow_cleartext_password)
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

/// `vault api`, the read side: where it listens, who may call it, how large a page may be.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address `vault api` serves on (the API, its page, /metrics, /healthz and /readyz).
    #[serde(deserialize_with = "lenient_string")]
    pub addr: String,
    /// Bearer tokens of the `read` scope: a user's events, export and page (a list, or one
    /// comma-separated string). Each at least 16 characters.
    #[serde(deserialize_with = "string_or_list")]
    pub read_tokens: Vec<String>,
    /// Bearer tokens of the `admin` scope: user erasure, and everything `read` may do.
    #[serde(deserialize_with = "string_or_list")]
    pub admin_tokens: Vec<String>,
    /// A file of `read` tokens (a mounted Secret): one per line or comma-separated, `#`
    /// comments; instead of `read_tokens`.
    #[serde(deserialize_with = "lenient_string")]
    pub read_tokens_file: String,
    /// A file of `admin` tokens, as `read_tokens_file`; instead of `admin_tokens`.
    #[serde(deserialize_with = "lenient_string")]
    pub admin_tokens_file: String,
    /// Key that signs page tokens, the same on every replica; empty: derived from the tokens
    /// above (so replicas sharing them agree, and rotating them ends the tokens in use).
    #[serde(deserialize_with = "lenient_string")]
    pub page_token_secret: String,
    /// A file holding `page_token_secret` (its first line); instead of it.
    #[serde(deserialize_with = "lenient_string")]
    pub page_token_secret_file: String,
    /// Events per page when a request gives no `limit`.
    pub default_limit: usize,
    /// The largest `limit` a request may ask for.
    pub max_limit: usize,
    /// Connections open at once (probes, scrapes and clients together).
    pub max_connections: usize,
    /// Connections open at once from one IP address, at most `max_connections` less 4 (room
    /// for the probes); behind a proxy or an ingress, which is one address to vault, raise it
    /// to that.
    pub max_connections_per_address: usize,
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let masked = |v: &[String]| v.iter().map(|t| mask(t)).collect::<Vec<_>>();
        f.debug_struct("ApiConfig")
            .field("addr", &self.addr)
            .field("read_tokens", &masked(&self.read_tokens))
            .field("admin_tokens", &masked(&self.admin_tokens))
            .field("read_tokens_file", &self.read_tokens_file)
            .field("admin_tokens_file", &self.admin_tokens_file)
            .field("page_token_secret", &mask(&self.page_token_secret))
            .field("page_token_secret_file", &self.page_token_secret_file)
            .field("default_limit", &self.default_limit)
            .field("max_limit", &self.max_limit)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: "127.0.0.1:9899".into(),
            read_tokens: Vec::new(),
            admin_tokens: Vec::new(),
            read_tokens_file: String::new(),
            admin_tokens_file: String::new(),
            page_token_secret: String::new(),
            page_token_secret_file: String::new(),
            default_limit: 100,
            max_limit: 1000,
            max_connections: 64,
            max_connections_per_address: 32,
        }
    }
}

/// Connections of `vault api` that one address can never take: room for the probes.
const API_OTHER_ADDRESSES_ROOM: usize = 4;

/// The shortest API token accepted.
pub const MIN_API_TOKEN_CHARS: usize = 16;

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
            leave_group_on_shutdown: LeaveGroup::Never,
            auto_offset_reset: "earliest".into(),
            session_timeout: Duration::from_secs(45),
            commit_interval: Duration::from_secs(1),
            group_view_interval: Duration::from_secs(15),
            dead_letter_topic: "{topic}.dlq".into(),
            dead_letter_max_bytes: 1_000_000,
            prefetch_bytes: 8 << 20,
            options: BTreeMap::new(),
            options_file: String::new(),
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
            flush_when_idle: true,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            store: StoreKind::Scylla,
            allow_null_store: false,
            persisters: 8,
            max_in_flight_bytes: 16 << 20,
            max_event_bytes: 1024 * 1024,
            max_json_depth: crate::event::DEFAULT_MAX_JSON_DEPTH,
            on_invalid: InvalidPolicy::DeadLetter,
            tombstones: TombstonePolicy::Invalid,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(30),
            unready_after: Duration::from_secs(60),
            revoke_timeout: Duration::from_secs(20),
            shutdown_timeout: Duration::from_secs(30),
            liveness_timeout: crate::pipeline::deadline::DEFAULT_LIVENESS_TIMEOUT,
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
            password_file: String::new(),
            consistency: "LOCAL_QUORUM".into(),
            local_dc: String::new(),
            request_timeout: Duration::from_secs(5),
            replication_strategy: "NetworkTopologyStrategy".into(),
            replication_factor: 1,
            datacenters: BTreeMap::new(),
            default_ttl: Duration::ZERO,
            max_batch_rows: 100,
            max_batch_bytes: 64 * 1024,
            batch_by_replica: true,
            max_concurrent_requests: 256,
            adaptive_concurrency: true,
            min_concurrent_requests: 1,
            store_threads: 1,
            max_rows_per_second: 0,
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_verify: true,
            allow_weak_consistency: false,
            allow_cleartext_password: false,
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
    /// Names the key only (or the argument's position): the value may be a secret.
    #[error("--set {0} is not of the form section.key=value")]
    BadOverride(String),
    #[error("{key}: cannot read {path}: {reason}")]
    SecretFile {
        key: &'static str,
        path: String,
        reason: String,
    },
}

/// Validated, typed settings: what the rest of the program runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub flush: FlushPolicy,
    pub metrics_addr: SocketAddr,
    pub retention: crate::store::retention::Retention,
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

/// Whether a LOCAL_* consistency without `local_dc` is to be checked against the datacenters
/// the cluster has ([`check_cluster_datacenters`]): where `scylla.datacenters` names fewer than
/// two, validation could not tell (the keyspace may replicate to more than `migrate` would
/// create, or was created before).
pub fn needs_cluster_datacenters(s: &ScyllaConfig) -> bool {
    s.consistency.to_ascii_uppercase().starts_with("LOCAL_")
        && s.local_dc.is_empty()
        && s.datacenters.len() < 2
}

/// The LOCAL_* rule of validation against the datacenters the cluster has (`dcs`, as the driver
/// sees them once connected), where validation could not tell
/// ([`needs_cluster_datacenters`]). `Err` with what to fix when it is refused; `Ok(Some)` with
/// the weakening when it is allowed.
pub fn check_cluster_datacenters(s: &ScyllaConfig, dcs: &[&str]) -> Result<Option<String>, String> {
    if !needs_cluster_datacenters(s) {
        return Ok(None);
    }
    match local_consistency_without_local_dc(s, dcs, "the cluster has") {
        None => Ok(None),
        Some(w) if w.allowed => Ok(Some(format!(
            "{} unset (allowed by {} = true): {}",
            w.key, w.opt_in, w.cost
        ))),
        Some(w) => Err(format!(
            "{}: {}; {}, or set {} = true to accept that",
            w.key, w.cost, w.fix, w.opt_in
        )),
    }
}

/// A LOCAL_* consistency without `local_dc` where there are several datacenters (`dcs`, as
/// `source` names them): a write is counted in the datacenter of whichever node coordinates it.
fn local_consistency_without_local_dc(
    s: &ScyllaConfig,
    dcs: &[&str],
    source: &str,
) -> Option<Weakening> {
    let local = s.consistency.to_ascii_uppercase().starts_with("LOCAL_");
    (local && s.local_dc.is_empty() && dcs.len() > 1).then(|| Weakening {
        key: "scylla.local_dc",
        value: String::new(),
        opt_in: "scylla.allow_weak_consistency",
        allowed: s.allow_weak_consistency,
        cost: format!(
            "scylla.consistency = {} is counted in the datacenter of whichever node coordinates \
             a write, and {source} {} datacenters ({}): a write may be acknowledged by a \
             datacenter other than the one vault runs in",
            s.consistency,
            dcs.len(),
            dcs.join(", ")
        ),
        fix: "set scylla.local_dc to the datacenter vault runs in",
    })
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
    } else {
        let dcs: Vec<&str> = s.datacenters.keys().map(String::as_str).collect();
        out.extend(local_consistency_without_local_dc(
            s,
            &dcs,
            "scylla.datacenters names",
        ));
    }
    if c.pipeline.store == StoreKind::Null {
        out.push(Weakening {
            key: "pipeline.store",
            value: "null".into(),
            opt_in: "pipeline.allow_null_store",
            allowed: c.pipeline.allow_null_store,
            cost: "every event is acknowledged and its offset committed without being stored \
                   anywhere (for benchmarks of the consume side only)"
                .into(),
            fix: "use \"scylla\" (the default)",
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

impl Config {
    /// Reads the secrets named by `*_file` settings into the settings they stand for:
    /// `scylla.password_file` into `scylla.password`, `api.page_token_secret_file`,
    /// `api.read_tokens_file` and `api.admin_tokens_file` into theirs, `kafka.options_file` into
    /// `kafka.options`. An error names the key and the file, never what the file holds.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let read = |key: &'static str, path: &str| {
            std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
                key,
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        let one_line = |text: &str| {
            text.strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(text)
                .to_owned()
        };
        let both = |key: &'static str, file: &str, setting: &str| ConfigError::Invalid {
            key,
            value: file.to_owned(),
            allowed: format!("set {setting} or {key}, not both"),
        };
        let (s, a) = (&mut self.scylla, &mut self.api);
        // Secrets of one line: the file's, less its line end.
        for (key, file, secret, setting) in [
            (
                "scylla.password_file",
                &s.password_file,
                &mut s.password,
                "scylla.password",
            ),
            (
                "api.page_token_secret_file",
                &a.page_token_secret_file,
                &mut a.page_token_secret,
                "api.page_token_secret",
            ),
        ] {
            if file.is_empty() {
                continue;
            }
            if !secret.is_empty() {
                return Err(both(key, file, setting));
            }
            *secret = one_line(&read(key, file)?);
        }
        for (key, file, tokens, setting) in [
            (
                "api.read_tokens_file",
                &a.read_tokens_file,
                &mut a.read_tokens,
                "api.read_tokens",
            ),
            (
                "api.admin_tokens_file",
                &a.admin_tokens_file,
                &mut a.admin_tokens,
                "api.admin_tokens",
            ),
        ] {
            if file.is_empty() {
                continue;
            }
            if !tokens.is_empty() {
                return Err(both(key, file, setting));
            }
            *tokens = read(key, file)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .flat_map(|l| l.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect();
        }
        let k = &mut self.kafka;
        if !k.options_file.is_empty() {
            let text = read("kafka.options_file", &k.options_file)?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim_start();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let invalid = |allowed: String| ConfigError::Invalid {
                    key: "kafka.options_file",
                    value: k.options_file.clone(),
                    allowed,
                };
                let Some((name, value)) = line.split_once('=') else {
                    return Err(invalid(format!(
                        "line {} is not of the form name=value",
                        n + 1
                    )));
                };
                let name = name.trim();
                if k.options.contains_key(name) {
                    return Err(invalid(format!(
                        "line {} sets {name}, which kafka.options sets too: set it in one place",
                        n + 1
                    )));
                }
                let value = value.trim_start().trim_end_matches('\r');
                k.options.insert(name.to_owned(), value.to_owned());
            }
        }
        Ok(())
    }
}

/// `[kafka.options]` configure the dead-letter producer too, which is idempotent (a letter is
/// written once, with acks=all, before its offset is committed): librdkafka refuses to start
/// it with these, or (a transactional id) it starts and every letter then fails. Checked here
/// so that `check-config` says so, not a crash loop at start-up.
fn check_producer_options(options: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    use crate::kafka::options::given_as;
    /// An option, whether a value of it is refused, and what to do instead.
    type Check = (&'static str, fn(&str) -> bool, &'static str);
    // librdkafka reads integers as C's strtol does (hex, octal, trailing text): anything but a
    // plain decimal number is refused, as vault could not tell what librdkafka makes of it.
    fn decimal(v: &str) -> Option<i64> {
        let v = v.trim();
        let plain = v == "0"
            || (v.starts_with(|c: char| matches!(c, '1'..='9'))
                && v.chars().all(|c| c.is_ascii_digit()));
        v.parse::<i32>().ok().filter(|_| plain).map(i64::from)
    }
    fn above(v: &str, most: i64) -> bool {
        decimal(v).is_none_or(|n| n > most)
    }
    let checks: [Check; 5] = [
        (
            "transactional.id",
            |_| true,
            "remove it: the dead-letter producer is not transactional, and every letter \
             would fail",
        ),
        (
            "max.in.flight",
            |v| above(v, 5),
            "at most 5 (a plain decimal number), or remove it: librdkafka would refuse to start",
        ),
        (
            "retries",
            |v| decimal(v).is_none_or(|n| n < 1),
            "at least 1 (a plain decimal number), or remove it: librdkafka would refuse to start",
        ),
        (
            "queue.buffering.backpressure.threshold",
            |v| above(v, 1),
            "1, or remove it: librdkafka would refuse to start",
        ),
        (
            "queuing.strategy",
            |v| !v.trim().eq_ignore_ascii_case("fifo"),
            "fifo, or remove it: librdkafka would refuse to start",
        ),
    ];
    for (option, bad, wanted) in checks {
        if let Some((name, _)) = given_as(options, option).filter(|(_, v)| bad(v)) {
            return Err(ConfigError::Invalid {
                key: "kafka.options",
                value: name.to_owned(),
                allowed: format!(
                    "{wanted}: [kafka.options] also configure the dead-letter producer, which is \
                     idempotent"
                ),
            });
        }
    }
    Ok(())
}

/// Hands every raw option to librdkafka's own parser (as creating the client would), so that
/// `check-config` catches a misspelled name or a bad value too. The error names the option and
/// librdkafka's reason, never the value: a secret put under a wrong or misspelled name is not
/// known to be one.
fn check_librdkafka_options(options: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, value) in options {
        let mut one = rdkafka::ClientConfig::new();
        one.set(name, value);
        if let Err(e) = one.create_native_config() {
            let reason = match e {
                rdkafka::error::KafkaError::ClientConfig(_, reason, _, _) => reason,
                other => other.to_string(),
            };
            let reason = if value.is_empty() {
                reason
            } else {
                reason.replace(value.as_str(), "********")
            };
            return Err(ConfigError::Invalid {
                key: "kafka.options",
                value: name.clone(),
                allowed: format!("librdkafka refuses it: {reason}"),
            });
        }
    }
    Ok(())
}

/// Kafka's rule for topic names.
pub(crate) fn is_topic_name(t: &str) -> bool {
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
    let defaults = figment::value::Value::serialize(Config::default())
        .expect("the default configuration serializes: it is plain data");
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    // Which layer set each key, so an error can say what to fix.
    let mut origins: Vec<(String, String)> = Vec::new();
    // Values given for secret keys, scrubbed from any error as a last line of defence.
    let mut secrets: Vec<String> = Vec::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_owned()));
        }
        check_toml_syntax(path)?;
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
            if is_sensitive(&format!("kafka.options.{option}")) {
                secrets.push(value.clone());
            }
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
        if is_sensitive(&path) {
            secrets.push(value.clone());
        }
        fig = fig.merge(Serialized::default(
            &path,
            scalar_for(&defaults, &path, &value),
        ));
        origins.push((path, format!("environment variable {name}")));
    }
    for (i, o) in overrides.iter().enumerate() {
        let (key, value) = o.split_once('=').ok_or_else(|| {
            ConfigError::BadOverride(format!("argument {} (it has no '=')", i + 1))
        })?;
        let key = key.trim();
        if !key.contains('.') {
            return Err(ConfigError::BadOverride(format!("{key:?}")));
        }
        if is_sensitive(key) {
            secrets.push(value.to_owned());
        }
        // --set kafka.options.fetch.wait.max.ms=10: the rest of the key is one librdkafka name.
        if let Some(option) = key.strip_prefix("kafka.options.") {
            fig = fig.merge(Serialized::default(
                "kafka.options",
                BTreeMap::from([(option.to_owned(), value.trim().to_owned())]),
            ));
        } else {
            fig = fig.merge(Serialized::default(key, scalar_for(&defaults, key, value)));
        }
        // The key only: the value may be a secret.
        origins.push((key.to_owned(), format!("--set {key}=...")));
    }
    fig.extract().map_err(|e| {
        let mut message = describe_load_error(e, file, &origins);
        // A secret's own key is described without its value; this catches any other path. A
        // value of a few characters is left alone: replacing every "a" would garble the message.
        for secret in secrets.iter().filter(|s| s.len() >= 4) {
            message = message.replace(secret.as_str(), "********");
        }
        ConfigError::Load(message)
    })
}

/// The keys given on the command line that hold secrets: each is in `/proc/<pid>/cmdline`,
/// visible to every user of the machine (`ps`). `main` warns about each.
pub fn secrets_on_command_line(overrides: &[String]) -> Vec<String> {
    overrides
        .iter()
        .filter_map(|o| o.split_once('='))
        .map(|(k, _)| k.trim())
        .filter(|k| is_sensitive(k))
        .map(str::to_owned)
        .collect()
}

/// Refuses a file that is not TOML with the line and column and what is wrong, never the
/// line's text (which may hold a secret).
fn check_toml_syntax(path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Load(format!("cannot read {}: {e}", path.display())))?;
    match toml::from_str::<toml::Table>(&text) {
        Ok(_) => Ok(()),
        Err(e) => {
            let at = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(" at line {line}, column {column}")
                })
                .unwrap_or_default();
            Err(ConfigError::Load(format!(
                "file {} is not valid TOML{at}: {}",
                path.display(),
                e.message()
            )))
        }
    }
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
            // A secret's value is never shown, only what was expected of it.
            // So is a librdkafka option's: a misspelled name is not known to be a secret's.
            let what = if is_sensitive(&key) || key.starts_with("kafka.options.") {
                use figment::error::Kind;
                match &err.kind {
                    Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
                        format!("invalid value, expected {expected}")
                    }
                    Kind::UnknownField(..) | Kind::MissingField(_) => err.kind.to_string(),
                    _ => "invalid value".to_owned(),
                }
            } else {
                err.kind.to_string()
            };
            let key = if key.is_empty() {
                "configuration".to_owned()
            } else {
                key
            };
            format!("{key}: {what} (from {origin})")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A value from the environment or the command line for the setting at `path`: exactly the text
/// written when the setting is a string (or a list of strings), so `VAULT_KAFKA_GROUP_ID=0042`
/// is group "0042" and a password `007` stays `007`; otherwise read the way TOML would read a
/// bare word.
fn scalar_for(defaults: &figment::value::Value, path: &str, s: &str) -> figment::value::Value {
    use figment::value::Value;
    match defaults.find_ref(path) {
        Some(Value::String(..)) | Some(Value::Array(..)) => Value::from(s.to_owned()),
        _ => parse_scalar(s.trim()),
    }
}

/// Interprets a value the way TOML would a bare word: an integer written as such (`42`, not
/// `0042`), `true`, `false`, else the text.
fn parse_scalar(s: &str) -> figment::value::Value {
    use figment::value::Value;
    if let Ok(i) = s.parse::<i64>() {
        if i.to_string() == s {
            return Value::from(i);
        }
    }
    match s {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => Value::from(s.to_owned()),
    }
}

impl Config {
    /// Checks every value once; the error names the key and what it accepts.
    pub fn validate(mut self) -> Result<Settings, ConfigError> {
        self.read_secret_files()?;
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
        for (i, t) in k.topics.iter().enumerate() {
            if !is_topic_name(t) {
                return Err(bad(
                    "kafka.topics",
                    t,
                    "topic names are 1-249 characters of [a-zA-Z0-9._-]",
                ));
            }
            if k.topics[..i].contains(t) {
                return Err(bad("kafka.topics", t, "each topic once"));
            }
        }
        if k.group_id.trim().is_empty() {
            return Err(bad("kafka.group_id", &k.group_id, "must not be empty"));
        }
        // Without an instance id the member is dynamic and always leaves: nothing to check.
        if k.leave_group_on_shutdown == LeaveGroup::ScaleDown
            && !k.instance_id.is_empty()
            && crate::kubernetes::StatefulPod::parse(&k.instance_id).is_none()
        {
            return Err(bad(
                "kafka.instance_id",
                &k.instance_id,
                "with kafka.leave_group_on_shutdown = \"scale-down\", the pod's name, \
                 <statefulset>-<ordinal> (deploy/k8s sets it from metadata.name)",
            ));
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
        // The stall alerts read a commit older than ten minutes as stuck.
        if k.commit_interval.is_zero() || k.commit_interval > Duration::from_secs(300) {
            return Err(bad(
                "kafka.commit_interval",
                humantime::format_duration(k.commit_interval),
                "a positive duration up to 5m, such as \"1s\" (the stall alerts read a \
                 committed offset unmoved for 10 minutes as stuck)",
            ));
        }
        if k.group_view_interval < Duration::from_secs(1) {
            return Err(bad(
                "kafka.group_view_interval",
                humantime::format_duration(k.group_view_interval),
                "at least 1s, such as \"15s\"",
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
            // Under either of its names (`metadata.broker.list` is `bootstrap.servers`).
            // A `topic.` prefix is a third name of a topic-level option.
            let plain = name.strip_prefix("topic.").unwrap_or(name);
            if let Some((_, why)) = RESERVED_KAFKA_OPTIONS
                .iter()
                .find(|(n, _)| crate::kafka::options::names_of(n).any(|n| n == name || n == plain))
            {
                return Err(ConfigError::Invalid {
                    key: "kafka.options",
                    value: name.clone(),
                    allowed: format!("this option is managed by vault: {why}"),
                });
            }
        }
        if let Some(name) = k
            .options
            .keys()
            .find(|n| crate::kafka::options::is_prefixed_topic_option(n))
        {
            return Err(ConfigError::Invalid {
                key: "kafka.options",
                value: name.clone(),
                allowed: format!(
                    "the option without its topic. prefix ({}): librdkafka takes both for one \
                     option, and vault checks options by their plain names",
                    &name["topic.".len()..]
                ),
            });
        }
        check_producer_options(&k.options)?;
        if let Some((alias, real)) = crate::kafka::options::given_twice(&k.options) {
            return Err(ConfigError::Invalid {
                key: "kafka.options",
                value: format!("{alias} and {real}"),
                allowed: "one of the two: librdkafka takes both names for one option, and \
                          which value would win is left to chance"
                    .into(),
            });
        }
        check_librdkafka_options(&k.options)?;
        if k.options
            .get("statistics.interval.ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            == Some(0)
        {
            return Err(ConfigError::Invalid {
                key: "kafka.options",
                value: "statistics.interval.ms = 0".into(),
                allowed: "a positive interval (vault's default is 5000): the lag and stall \
                          gauges, and the alerts on them, read the statistics"
                    .into(),
            });
        }
        // The rebalance callback holds a revoke for this long; past max.poll.interval.ms the
        // broker would drop the member in the middle of the drain, and its commit with it.
        let max_poll_ms: u64 = k
            .options
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300_000);
        // Past an hour it is refused below, where the bound is checked (and the sum could
        // overflow).
        let revoke_wait = (self.pipeline.revoke_timeout <= Duration::from_secs(3600)).then(|| {
            crate::pipeline::deadline::Deadlines {
                revoke_timeout: self.pipeline.revoke_timeout,
                shutdown_timeout: self.pipeline.shutdown_timeout,
            }
            .revoke_reply_wait()
        });
        if let Some(revoke_wait) = revoke_wait.filter(|w| w.as_millis() >= u128::from(max_poll_ms))
        {
            return Err(bad(
                "pipeline.revoke_timeout",
                humantime::format_duration(self.pipeline.revoke_timeout),
                &format!(
                    "short enough that a revoke's whole wait ({}, the timeout and the commits \
                     after it) stays below max.poll.interval.ms ({max_poll_ms} ms): lower it, \
                     or raise max.poll.interval.ms in kafka.options",
                    humantime::format_duration(revoke_wait)
                ),
            ));
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
        if p.max_in_flight_bytes < 1 << 20 || p.max_in_flight_bytes > u32::MAX as usize {
            return Err(bad(
                "pipeline.max_in_flight_bytes",
                p.max_in_flight_bytes,
                "1048576 (1 MiB) to 4294967295 (4 GiB)",
            ));
        }
        for (key, d) in [
            ("pipeline.revoke_timeout", p.revoke_timeout),
            ("pipeline.shutdown_timeout", p.shutdown_timeout),
        ] {
            if d > Duration::from_secs(3600) {
                return Err(bad(
                    key,
                    humantime::format_duration(d),
                    "at most 1h, such as \"30s\"",
                ));
            }
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
        if p.liveness_timeout < crate::pipeline::deadline::MIN_LIVENESS_TIMEOUT {
            return Err(bad(
                "pipeline.liveness_timeout",
                humantime::format_duration(p.liveness_timeout),
                "at least 3s (the loops beat every second), such as \"1m\"",
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
        let ks_ok = s.keyspace.len() <= 48
            && s.keyspace.starts_with(|c: char| c.is_ascii_lowercase())
            && s.keyspace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ks_ok {
            // CQL folds an unquoted name to lower case: "Vault" would be created as "vault",
            // and the driver's metadata, which vault looks the keyspace up in, names it so.
            return Err(bad(
                "scylla.keyspace",
                &s.keyspace,
                "1-48 characters of [a-z0-9_], the first a letter (CQL folds unquoted names to lower case)",
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
        if !s.password.is_empty() && s.username.trim().is_empty() {
            return Err(bad(
                "scylla.username",
                &s.username,
                "the user name of scylla.password (VAULT_SCYLLA_USERNAME): without one, vault \
                 connects without authenticating and the password goes unused",
            ));
        }
        if !s.password.is_empty() && !s.tls && !s.allow_cleartext_password {
            return Err(bad(
                "scylla.tls",
                "false",
                "true while scylla.password is set, or the password crosses the network in \
                 cleartext (set scylla.allow_cleartext_password = true to accept that, e.g. on \
                 a loopback test node)",
            ));
        }
        if !s.password.is_empty() && s.tls && !s.tls_verify && !s.allow_cleartext_password {
            return Err(bad(
                "scylla.tls_verify",
                "false",
                "true while scylla.password is set: without verifying the nodes' certificates, \
                 whoever sits between vault and the nodes reads the password (give the nodes' CA \
                 as scylla.tls_ca_file, or set scylla.allow_cleartext_password = true to accept \
                 that, e.g. against a self-signed test node)",
            ));
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
            "NetworkTopologyStrategy" if s.datacenters.is_empty() && s.replication_factor >= 1 => {}
            "NetworkTopologyStrategy" if s.datacenters.is_empty() => {
                return Err(bad("scylla.replication_factor", s.replication_factor, "at least 1 (in every datacenter), or a factor per datacenter in scylla.datacenters, e.g. { dc1 = 3 }"))
            }
            "NetworkTopologyStrategy" if s.datacenters.values().all(|rf| *rf >= 1) => {}
            "NetworkTopologyStrategy" => {
                return Err(bad("scylla.datacenters", format!("{:?}", s.datacenters), "a replication factor >= 1 per datacenter, e.g. { dc1 = 3 }"))
            }
            other => return Err(bad("scylla.replication_strategy", other, "SimpleStrategy or NetworkTopologyStrategy")),
        }
        let max_ttl = crate::store::retention::MAX_TTL_SECS as u64;
        if s.default_ttl.subsec_nanos() != 0 || s.default_ttl.as_secs() > max_ttl {
            return Err(bad(
                "scylla.default_ttl",
                humantime::format_duration(s.default_ttl),
                "whole seconds up to 20 years (630720000s, the most ScyllaDB accepts), e.g. \"30days\", or \"0s\" for none",
            ));
        }
        if !(1..=MAX_BATCH_ROWS).contains(&s.max_batch_rows) {
            return Err(bad(
                "scylla.max_batch_rows",
                s.max_batch_rows,
                "1 to 128 rows (past ~100 rows a request's fixed cost is a small share of it)",
            ));
        }
        if !(1024..=MAX_BATCH_BYTES).contains(&s.max_batch_bytes) {
            return Err(bad(
                "scylla.max_batch_bytes",
                s.max_batch_bytes,
                "1024 to 131072 bytes (ScyllaDB warns about batches above 128 KiB, its batch_size_warn_threshold_in_kb, and refuses those above 1 MiB)",
            ));
        }
        if s.max_concurrent_requests == 0 || s.max_concurrent_requests > 65_536 {
            return Err(bad(
                "scylla.max_concurrent_requests",
                s.max_concurrent_requests,
                "1 to 65536",
            ));
        }
        if s.store_threads > MAX_STORE_THREADS {
            return Err(bad(
                "scylla.store_threads",
                s.store_threads,
                &format!("0 to {MAX_STORE_THREADS} (0: the main runtime, which consumes Kafka)"),
            ));
        }
        if s.min_concurrent_requests == 0 || s.min_concurrent_requests > s.max_concurrent_requests {
            return Err(bad(
                "scylla.min_concurrent_requests",
                s.min_concurrent_requests,
                &format!(
                    "1 to scylla.max_concurrent_requests ({}): the adaptive limit moves between the two",
                    s.max_concurrent_requests
                ),
            ));
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
        let a = &self.api;
        if a.addr.parse::<SocketAddr>().is_err() {
            return Err(bad(
                "api.addr",
                &a.addr,
                "an ip:port such as 127.0.0.1:9899 (0.0.0.0:9899 to serve other hosts, with tokens)",
            ));
        }
        for (key, tokens) in [
            ("api.read_tokens", &a.read_tokens),
            ("api.admin_tokens", &a.admin_tokens),
        ] {
            for (i, t) in tokens.iter().enumerate() {
                if t.chars().count() < MIN_API_TOKEN_CHARS
                    || t.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    // The position only: the value is a secret.
                    return Err(bad(
                        key,
                        format!("token {}", i + 1),
                        "tokens of at least 16 characters without spaces, such as the output of                          `openssl rand -hex 32`",
                    ));
                }
            }
        }
        if a.max_limit == 0 || a.max_limit > 10_000 {
            return Err(bad("api.max_limit", a.max_limit, "1 to 10000"));
        }
        if a.default_limit == 0 || a.default_limit > a.max_limit {
            return Err(bad(
                "api.default_limit",
                a.default_limit,
                "1 to api.max_limit",
            ));
        }
        // Each connection may hold a page (bounded to about 1 MiB) at once.
        if !(8..=1024).contains(&a.max_connections) {
            return Err(bad("api.max_connections", a.max_connections, "8 to 1024"));
        }
        // Some room always stays for other addresses: the kubelet's probes and Prometheus
        // must get through when a proxy in front holds its whole share.
        if a.max_connections_per_address == 0
            || a.max_connections_per_address > a.max_connections - API_OTHER_ADDRESSES_ROOM
        {
            return Err(bad(
                "api.max_connections_per_address",
                a.max_connections_per_address,
                "1 to api.max_connections less 4 (room for the probes: behind a proxy, which is \
                 one address, give it that much)",
            ));
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
        // A row's TTL is what is left of its retention, and ScyllaDB takes 20 years at most: a
        // longer retention would expire its rows early.
        let max_retention = Duration::from_secs(crate::store::retention::MAX_TTL_SECS as u64);
        let mut by_type = std::collections::HashMap::new();
        for (event_type, keep) in &self.retention.event_types {
            let parsed = humantime::parse_duration(keep)
                .ok()
                .filter(|d| !d.is_zero() && *d <= max_retention)
                .ok_or_else(|| ConfigError::Invalid {
                    key: "retention.event_types",
                    value: format!("{event_type} = {keep:?}"),
                    allowed: "a positive duration up to 7300days (630720000s, ScyllaDB's longest \
                              TTL), such as \"90days\" or \"7years\""
                        .into(),
                })?;
            by_type.insert(event_type.clone(), parsed);
        }
        if self.retention.default > max_retention {
            return Err(ConfigError::Invalid {
                key: "retention.default",
                value: humantime::format_duration(self.retention.default).to_string(),
                allowed: "up to 7300days (630720000s, ScyllaDB's longest TTL), or \"0s\" for none"
                    .into(),
            });
        }
        let retention = crate::store::retention::Retention {
            default: (!self.retention.default.is_zero()).then_some(self.retention.default),
            by_type,
        };
        let flush = FlushPolicy {
            max_events: b.max_events,
            max_bytes: b.max_bytes,
            linger: b.linger,
            when_idle: b.flush_when_idle,
        };
        Ok(Settings {
            config: self,
            flush,
            metrics_addr,
            retention,
        })
    }

    /// The configuration as TOML with every value that [`is_sensitive`] masked, for
    /// `vault check-config`.
    pub fn to_masked_toml(&self) -> String {
        let doc = toml::to_string_pretty(self)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                text.parse::<toml_edit::DocumentMut>()
                    .map_err(|e| e.to_string())
            });
        match doc {
            Ok(mut doc) => {
                mask_sensitive(doc.as_item_mut(), "");
                doc.to_string()
            }
            Err(e) => format!("# cannot render config: {e}\n"),
        }
    }
}

/// Options librdkafka itself treats as sensitive (`_RK_SENSITIVE` in rdkafka_conf.c, 2.12):
/// it redacts them from its own configuration dumps.
const LIBRDKAFKA_SENSITIVE: [&str; 13] = [
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.ca.pem",
    "ssl.keystore.password",
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
];

/// Words that make any setting a secret, whatever else its name says.
const SECRET_WORDS: [&str; 4] = ["password", "secret", "token", "passphrase"];

/// The one rule for what is a secret, for a setting's full path (`scylla.password`,
/// `kafka.options.sasl.password`): an option librdkafka treats as sensitive, or any key
/// containing `password`, `secret`, `token` or `passphrase`. A `*_file` setting of vault's own
/// (`scylla.password_file`, `kafka.options_file`) names where a secret is, not the secret, and is
/// shown. Masking (`check-config`, `Debug`), load errors and the `--set` warning all ask this.
pub fn is_sensitive(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    if let Some(option) = p.strip_prefix("kafka.options.") {
        if LIBRDKAFKA_SENSITIVE.contains(&option) {
            return true;
        }
    } else if p.ends_with("_file") {
        return false;
    }
    SECRET_WORDS.iter().any(|w| p.contains(w))
}

/// Masks, in place, every string under `item` whose path [`is_sensitive`].
fn mask_sensitive(item: &mut toml_edit::Item, path: &str) {
    let child = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match item {
        toml_edit::Item::Table(t) => {
            for (k, v) in t.iter_mut() {
                mask_sensitive(v, &child(k.get()));
            }
        }
        toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
            for (k, v) in t.iter_mut() {
                let mut item = toml_edit::Item::Value(v.clone());
                mask_sensitive(&mut item, &child(k.get()));
                if let toml_edit::Item::Value(masked) = item {
                    *v = masked;
                }
            }
        }
        toml_edit::Item::Value(toml_edit::Value::String(s)) if is_sensitive(path) => {
            let decor = s.decor().clone();
            let mut masked = toml_edit::Formatted::new(mask(s.value()));
            *masked.decor_mut() = decor;
            *s = masked;
        }
        // A list of secrets (api.read_tokens): every element.
        toml_edit::Item::Value(toml_edit::Value::Array(a)) if is_sensitive(path) => {
            for v in a.iter_mut() {
                if let toml_edit::Value::String(s) = v {
                    let decor = s.decor().clone();
                    let mut masked = toml_edit::Formatted::new(mask(s.value()));
                    *masked.decor_mut() = decor;
                    *s = masked;
                }
            }
        }
        _ => {}
    }
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
    fn a_table_ttl_beyond_what_scylla_accepts_is_refused() {
        let mut c = Config::default();
        c.scylla.default_ttl = Duration::from_secs(630_720_000);
        assert!(c.clone().validate().is_ok(), "20 years is the maximum");
        c.scylla.default_ttl = Duration::from_secs(630_720_001);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("scylla.default_ttl") && e.contains("630720000s"),
            "{e}"
        );
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
            ("scylla.keyspace=Vault", "scylla.keyspace"),
            ("scylla.keyspace=_vault", "scylla.keyspace"),
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
        // Under librdkafka's other name for it too.
        let mut c = Config::default();
        c.kafka
            .options
            .insert("metadata.broker.list".into(), "elsewhere:9092".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("metadata.broker.list") && err.contains("kafka.brokers"),
            "{err}"
        );
    }

    #[test]
    fn api_connection_caps_are_checked_and_reach_the_server() {
        let mut c = Config::default();
        c.api.max_connections = 200;
        c.api.max_connections_per_address = 196;
        c.clone().validate().expect("valid");
        let limits = crate::api::ApiSettings::new(&c).expect("settings").limits;
        assert_eq!(
            (limits.max_connections, limits.max_connections_per_peer),
            (200, 196)
        );
        // One address never takes the probes' room.
        c.api.max_connections_per_address = 197;
        let err = c.clone().validate().unwrap_err().to_string();
        assert!(err.contains("api.max_connections_per_address"), "{err}");
        c.api.max_connections = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("api.max_connections"), "{err}");
    }

    #[test]
    fn options_the_idempotent_dead_letter_producer_refuses_are_refused_first() {
        for (name, value) in [
            ("max.in.flight.requests.per.connection", "10"),
            ("max.in.flight", "6"),
            ("message.send.max.retries", "0"),
            ("transactional.id", "vault"),
            ("queuing.strategy", "lifo"),
            ("queue.buffering.backpressure.threshold", "10"),
            // librdkafka would read 0x10 as 16, and 08 (octal) as 0.
            ("max.in.flight", "0x10"),
            ("retries", "08"),
            // A third name of a topic-level option (a reserved one: the vault setting named).
            ("topic.auto.offset.reset", "latest"),
            ("topic.request.required.acks", "0"),
        ] {
            let mut c = Config::default();
            c.kafka.options.insert(name.into(), value.into());
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
        let mut c = Config::default();
        c.kafka
            .options
            .insert("topic.auto.offset.reset".into(), "latest".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("kafka.auto_offset_reset"), "{err}");
        let mut c = Config::default();
        for (name, value) in [
            ("max.in.flight", "5"),
            ("queuing.strategy", "FIFO"),
            ("topic.metadata.refresh.interval.ms", "60000"),
        ] {
            c.kafka.options.insert(name.into(), value.into());
        }
        c.validate().expect("within what the producer takes");
    }

    #[test]
    fn one_librdkafka_option_under_both_its_names_is_refused() {
        let mut c = Config::default();
        for (name, value) in [("linger.ms", "5"), ("queue.buffering.max.ms", "50")] {
            c.kafka.options.insert(name.into(), value.into());
        }
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("linger.ms and queue.buffering.max.ms") && err.contains("one of the two"),
            "{err}"
        );
    }

    #[test]
    fn api_tokens_are_layered_validated_and_masked() {
        let read = "r".repeat(32);
        let c = load_with_env(
            None,
            &["api.max_limit=500".into()],
            env(&[
                ("VAULT_API_ADDR", "0.0.0.0:8080"),
                (
                    "VAULT_API_READ_TOKENS",
                    &format!("{read},{}", "s".repeat(20)),
                ),
                ("VAULT_API_ADMIN_TOKENS", &"a".repeat(40)),
            ]),
        )
        .unwrap();
        assert_eq!(c.api.addr, "0.0.0.0:8080");
        assert_eq!(c.api.read_tokens, [read.clone(), "s".repeat(20)]);
        assert_eq!(c.api.admin_tokens, ["a".repeat(40)]);
        assert_eq!(c.api.max_limit, 500);
        let shown = c.to_masked_toml();
        assert!(
            !shown.contains(&read) && !shown.contains(&"a".repeat(40)),
            "{shown}"
        );
        assert_eq!(shown.matches("\"********\"").count(), 3, "{shown}");
        assert!(!format!("{:?}", c.api).contains(&read));
        c.clone().validate().expect("valid");
        let short = load_with_env(None, &[], env(&[("VAULT_API_READ_TOKENS", "hunter2")]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("api.read_tokens") && short.contains("at least 16"),
            "{short}"
        );
        assert!(!short.contains("hunter2"), "{short}");
        let over = set(&["api.default_limit=600", "api.max_limit=500"])
            .unwrap_err()
            .to_string();
        assert!(over.contains("api.default_limit"), "{over}");
        let addr = set(&["api.addr=nowhere"]).unwrap_err().to_string();
        assert!(addr.contains("api.addr"), "{addr}");
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

    /// Every error and rendering of a configuration holding `secret` somewhere, for the scans.
    fn scan(secret: &str, what: &str, out: &str) {
        assert!(!out.contains(secret), "{what} shows the secret: {out}");
    }

    #[test]
    fn leaving_the_group_is_never_always_or_on_a_scale_down_and_true_and_false_still_read() {
        for (given, want) in [
            ("true", LeaveGroup::Always),
            ("false", LeaveGroup::Never),
            ("always", LeaveGroup::Always),
            ("never", LeaveGroup::Never),
            ("scale-down", LeaveGroup::ScaleDown),
        ] {
            let c = load_with_env(
                None,
                &[],
                env(&[("VAULT_KAFKA_LEAVE_GROUP_ON_SHUTDOWN", given)]),
            )
            .unwrap();
            assert_eq!(c.kafka.leave_group_on_shutdown, want, "env {given}");
            let c = load_with_env(
                None,
                &[format!("kafka.leave_group_on_shutdown={given}")],
                env(&[]),
            )
            .unwrap();
            assert_eq!(c.kafka.leave_group_on_shutdown, want, "--set {given}");
        }
        let err = load_with_env(
            None,
            &["kafka.leave_group_on_shutdown=sometimes".into()],
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("scale-down"), "says what to give: {err}");
        let mut c = Config::default();
        c.kafka.leave_group_on_shutdown = LeaveGroup::ScaleDown;
        c.kafka.instance_id = "vault-a".into();
        let err = c.clone().validate().unwrap_err().to_string();
        assert!(
            err.contains("kafka.instance_id") && err.contains("<statefulset>-<ordinal>"),
            "{err}"
        );
        c.kafka.instance_id = "activity-vault-3".into();
        c.clone().validate().expect("a StatefulSet pod's name");
        c.kafka.instance_id.clear();
        c.validate()
            .expect("a dynamic member (vault migrate in the same pod) has nothing to check");
    }

    #[test]
    fn string_settings_keep_exactly_what_was_written() {
        let c = load_with_env(
            None,
            &[
                "scylla.username=0042".into(),
                "kafka.instance_id=true".into(),
                "scylla.local_dc= dc 1 ".into(),
                "batch.linger= 40ms".into(),
            ],
            env(&[
                ("VAULT_KAFKA_GROUP_ID", "0042"),
                ("VAULT_SCYLLA_PASSWORD", "007"),
                ("VAULT_SCYLLA_KEYSPACE", "1e3"),
                ("VAULT_BATCH_MAX_EVENTS", "42"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.group_id, "0042");
        assert_eq!(c.scylla.password, "007");
        assert_eq!(c.scylla.keyspace, "1e3");
        assert_eq!(c.scylla.username, "0042");
        assert_eq!(c.kafka.instance_id, "true");
        assert_eq!(c.scylla.local_dc, " dc 1 ", "not even spaces are dropped");
        assert_eq!(c.batch.linger, Duration::from_millis(40));
        assert_eq!(c.batch.max_events, 42, "numbers are still numbers");
        // A number written with leading zeros is not silently another number.
        let err = load_with_env(None, &[], env(&[("VAULT_BATCH_MAX_EVENTS", "0042")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("batch.max_events"), "{err}");
    }

    #[test]
    fn one_rule_decides_what_is_a_secret() {
        for key in [
            "scylla.password",
            "kafka.options.sasl.password",
            "kafka.options.sasl.username",
            "kafka.options.sasl.oauthbearer.config",
            "kafka.options.sasl.oauthbearer.assertion.private.key.passphrase",
            "kafka.options.sasl.oauthbearer.client.secret",
            "kafka.options.ssl.key.pem",
            "kafka.options.ssl.keystore.password",
            "kafka.options.some.vendor.token",
            "kafka.options.SASL.PASSWORD",
        ] {
            assert!(is_sensitive(key), "{key}");
        }
        for key in [
            "scylla.password_file",
            "kafka.options_file",
            "scylla.username",
            "kafka.options.security.protocol",
            "kafka.group_id",
        ] {
            assert!(!is_sensitive(key), "{key}");
        }
        let mut c = Config::default();
        c.scylla.password = "hunter2".into();
        c.scylla.password_file = String::new();
        for (k, v) in [
            ("sasl.password", "s3cret"),
            ("sasl.oauthbearer.config", "principal=x secret=oauth-cfg"),
            (
                "sasl.oauthbearer.assertion.private.key.passphrase",
                "pass-phrase",
            ),
            ("sasl.username", "kafka-user"),
        ] {
            c.kafka.options.insert(k.into(), v.into());
        }
        let toml = c.to_masked_toml();
        let debug = format!("{c:?}");
        for secret in [
            "hunter2",
            "s3cret",
            "oauth-cfg",
            "pass-phrase",
            "kafka-user",
        ] {
            scan(secret, "check-config", &toml);
            scan(secret, "Debug", &debug);
        }
        assert!(toml.contains("\"sasl.password\" = \"********\""), "{toml}");
    }

    #[test]
    fn errors_of_every_layer_never_show_a_secret() {
        let secret = "0042hunter2";
        let dir = std::env::temp_dir().join(format!("vault-secret-errs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let errors = |file: Option<&Path>, sets: &[String], vars: &[(&str, &str)]| {
            load_with_env(file, sets, env(vars))
                .and_then(Config::validate)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let mut outputs = Vec::new();
        // --set: a misspelled key, no '=', no section.
        for set in [
            format!("scylla.pasword={secret}"),
            secret.to_string(),
            format!("password={secret}"),
            format!("kafka.options.sasl.passwrd={secret}"),
            format!("scylla.password={secret}"),
        ] {
            outputs.push((set.clone(), errors(None, &[set], &[])));
        }
        // The environment: a misspelled librdkafka option, a misspelled key.
        outputs.push((
            "VAULT_KAFKA_OPTION_SASL_PASSWRD".into(),
            errors(None, &[], &[("VAULT_KAFKA_OPTION_SASL_PASSWRD", secret)]),
        ));
        outputs.push((
            "VAULT_SCYLLA_PASWORD".into(),
            errors(None, &[], &[("VAULT_SCYLLA_PASWORD", secret)]),
        ));
        // A file: a value that is not TOML, a value of the wrong type, a bad option value.
        for (i, body) in [
            format!("[scylla]\npassword = {secret}\n"),
            format!("[scylla]\npassword = [\"{secret}\"]\n"),
            format!("[scylla]\npassword = {{ x = \"{secret}\" }}\n"),
            format!("[kafka.options]\n\"ssl.key.password\" = \"{secret}\"\n\"security.protocol\" = \"{secret}\"\n"),
            format!("[kafka.options]\n\"sasl.password\" = {secret}\n"),
            "[kafka.options]\n\"sasl.passwrd\" = 4200424242\n".to_string(),
        ]
        .iter()
        .enumerate()
        {
            let file = dir.join(format!("bad{i}.toml"));
            std::fs::write(&file, body).unwrap();
            outputs.push((body.clone(), errors(Some(&file), &[], &[])));
        }
        for (what, out) in &outputs {
            scan(secret, what, out);
            scan("4200424242", what, out);
        }
        assert!(outputs[3].1.contains("sasl.passwrd"), "{:?}", outputs[3]);
        assert!(
            outputs[5].1.contains("sasl.passwrd") && outputs[5].1.contains("No such"),
            "{:?}",
            outputs[5]
        );
        assert!(outputs[1].1.contains("argument 1"), "{:?}", outputs[1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_larger_than_scylla_warns_about_is_refused_with_the_reason() {
        let err = set(&["scylla.max_batch_bytes=262144"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("scylla.max_batch_bytes") && err.contains("128 KiB"),
            "{err}"
        );
        let ok = set(&[
            "scylla.max_batch_bytes=131072",
            "scylla.batch_by_replica=false",
        ])
        .unwrap();
        assert!(!ok.config.scylla.batch_by_replica);
        assert!(Config::default().scylla.batch_by_replica, "the default");
    }

    #[test]
    fn batches_hold_at_most_128_rows_and_a_larger_setting_says_so() {
        for rows in ["0", "129", "1000"] {
            let err = set(&[&format!("scylla.max_batch_rows={rows}")])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("scylla.max_batch_rows") && err.contains("1 to 128"),
                "{rows}: {err}"
            );
        }
        let ok = set(&["scylla.max_batch_rows=128"]).unwrap();
        assert_eq!(ok.config.scylla.max_batch_rows, MAX_BATCH_ROWS);
    }

    #[test]
    fn misspelled_librdkafka_options_are_caught_by_validation() {
        let err = set(&["kafka.options.fetch.wait.max.mz=10"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("kafka.options") && err.contains("fetch.wait.max.mz"),
            "{err}"
        );
        let err = set(&["kafka.options.security.protocol=carrier_pigeon"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("security.protocol") && !err.contains("carrier_pigeon"),
            "the option is named, its value never: {err}"
        );
        set(&["kafka.options.security.protocol=SASL_SSL"]).unwrap();
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = std::env::temp_dir().join(format!("vault-secret-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = dir.join("password");
        std::fs::write(&password, "007 with spaces \n").unwrap();
        let options = dir.join("kafka.properties");
        std::fs::write(
            &options,
            "# from a Secret\nsasl.username=vault\n  sasl.password = p=w=d\r\n\n",
        )
        .unwrap();
        let p = password.to_str().unwrap();
        let o = options.to_str().unwrap();
        let s = set(&[
            &format!("scylla.password_file={p}"),
            "scylla.username=vault",
            "scylla.tls=true",
            &format!("kafka.options_file={o}"),
        ])
        .unwrap();
        assert_eq!(s.config.scylla.password, "007 with spaces ");
        assert_eq!(s.config.kafka.options["sasl.username"], "vault");
        assert_eq!(s.config.kafka.options["sasl.password"], "p=w=d");
        let shown = s.config.to_masked_toml();
        assert!(shown.contains(p) && !shown.contains("007 with"), "{shown}");

        let both = set(&[
            &format!("scylla.password_file={p}"),
            "scylla.password=x",
            "scylla.tls=true",
        ]);
        assert!(both.unwrap_err().to_string().contains("not both"));
        let twice = set(&[
            &format!("kafka.options_file={o}"),
            "kafka.options.sasl.password=x",
        ]);
        assert!(twice
            .unwrap_err()
            .to_string()
            .contains("line 3 sets sasl.password"));
        let missing = set(&["scylla.password_file=/nonexistent/pw"])
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("scylla.password_file: cannot read /nonexistent/pw"),
            "{missing}"
        );
        std::fs::write(&options, "sasl.password\n").unwrap();
        let err = set(&[&format!("kafka.options_file={o}")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1 is not of the form"), "{err}");

        // vault api's tokens and page-token key.
        let read = dir.join("read-tokens");
        let (r1, r2) = ("r".repeat(32), "s".repeat(20));
        std::fs::write(&read, format!("# rotated 2026-12\n{r1}\n\n {r2} ,\n")).unwrap();
        let admin = dir.join("admin-tokens");
        std::fs::write(&admin, format!("{}\n", "a".repeat(40))).unwrap();
        let key = dir.join("page-key");
        std::fs::write(&key, format!("{}\n", "k".repeat(32))).unwrap();
        let (r, a, k) = (
            read.to_str().unwrap(),
            admin.to_str().unwrap(),
            key.to_str().unwrap(),
        );
        let s = set(&[
            &format!("api.read_tokens_file={r}"),
            &format!("api.admin_tokens_file={a}"),
            &format!("api.page_token_secret_file={k}"),
        ])
        .unwrap();
        assert_eq!(s.config.api.read_tokens, [r1.clone(), r2]);
        assert_eq!(s.config.api.admin_tokens, ["a".repeat(40)]);
        assert_eq!(s.config.api.page_token_secret, "k".repeat(32));
        let shown = s.config.to_masked_toml();
        assert!(shown.contains(r) && !shown.contains(&r1), "{shown}");
        let both = set(&[
            &format!("api.read_tokens_file={r}"),
            &format!("api.read_tokens={}", "t".repeat(16)),
        ]);
        assert!(both.unwrap_err().to_string().contains("not both"));
        // A short token from a file is refused like one given inline.
        std::fs::write(&read, "hunter2\n").unwrap();
        let short = set(&[&format!("api.read_tokens_file={r}")]).unwrap_err();
        assert!(short.to_string().contains("api.read_tokens"), "{short}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_password_without_a_user_name_is_refused() {
        let err = set(&["scylla.password=x", "scylla.tls=true"])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("scylla.username"), "{err}");
        set(&[
            "scylla.password=x",
            "scylla.username=vault",
            "scylla.tls=true",
        ])
        .unwrap();
    }

    #[test]
    fn a_password_without_tls_is_refused_unless_allowed() {
        let user = "scylla.username=vault";
        let err = set(&["scylla.password=x", user]).unwrap_err().to_string();
        assert!(
            err.starts_with("scylla.tls") && err.contains("cleartext"),
            "{err}"
        );
        set(&["scylla.password=x", user, "scylla.tls=true"]).unwrap();
        set(&[
            "scylla.password=x",
            user,
            "scylla.allow_cleartext_password=true",
        ])
        .unwrap();
    }

    #[test]
    fn the_adaptive_concurrency_bounds_are_checked() {
        let s = set(&[]).unwrap();
        assert!(s.config.scylla.adaptive_concurrency, "on by default");
        for bad in [
            [
                "scylla.min_concurrent_requests=0",
                "scylla.max_concurrent_requests=256",
            ],
            [
                "scylla.min_concurrent_requests=65",
                "scylla.max_concurrent_requests=64",
            ],
        ] {
            let err = set(&bad).unwrap_err().to_string();
            assert!(
                err.starts_with("scylla.min_concurrent_requests")
                    && err.contains("1 to scylla.max_concurrent_requests"),
                "{err}"
            );
        }
        let s = set(&[
            "scylla.min_concurrent_requests=64",
            "scylla.max_concurrent_requests=64",
            "scylla.adaptive_concurrency=false",
        ])
        .unwrap();
        assert!(!s.config.scylla.adaptive_concurrency);
    }

    #[test]
    fn the_write_rate_limit_is_off_by_default_and_set_from_the_environment() {
        assert_eq!(set(&[]).unwrap().config.scylla.max_rows_per_second, 0);
        let c = load_with_env(
            None,
            &[],
            env(&[("VAULT_SCYLLA_MAX_ROWS_PER_SECOND", "20000")]),
        )
        .unwrap();
        assert_eq!(c.scylla.max_rows_per_second, 20_000);
        c.validate().unwrap();
        for bad in ["-1", "fast", "1.5", "20k"] {
            let err = load_with_env(None, &[], env(&[("VAULT_SCYLLA_MAX_ROWS_PER_SECOND", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("scylla.max_rows_per_second")
                    && err.contains("VAULT_SCYLLA_MAX_ROWS_PER_SECOND"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn secrets_on_the_command_line_are_named_for_a_warning() {
        let sets: Vec<String> = [
            "scylla.password=x",
            "kafka.options.sasl.password=y",
            "batch.max_events=5",
            "scylla.password_file=/run/secrets/pw",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            secrets_on_command_line(&sets),
            ["scylla.password", "kafka.options.sasl.password"]
        );
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
    fn local_consistency_in_a_cluster_of_several_datacenters_needs_local_dc() {
        // The default replication names no datacenter: the cluster's are checked once known.
        let check = |c: &Config, dcs: &[&str]| check_cluster_datacenters(&c.scylla, dcs);
        let c = Config::default();
        c.clone().validate().unwrap();
        assert_eq!(check(&c, &["dc1"]), Ok(None));
        let err = check(&c, &["dc1", "dc2"]).unwrap_err();
        assert!(
            err.starts_with("scylla.local_dc")
                && err.contains("the cluster has 2 datacenters (dc1, dc2)"),
            "{err}"
        );
        let mut local = c.clone();
        local.scylla.local_dc = "dc1".into();
        assert_eq!(check(&local, &["dc1", "dc2"]), Ok(None));
        let mut allowed = c.clone();
        allowed.scylla.allow_weak_consistency = true;
        let warning = check(&allowed, &["dc1", "dc2"]).unwrap().unwrap();
        assert!(
            warning.contains("allowed by scylla.allow_weak_consistency"),
            "{warning}"
        );
        let mut quorum = c.clone();
        quorum.scylla.consistency = "QUORUM".into();
        assert_eq!(check(&quorum, &["dc1", "dc2"]), Ok(None));
        // One named datacenter: the keyspace may replicate to more (created before, or by
        // hand), so the cluster's are checked too; several are validation's to check.
        let mut named = c.clone();
        named.scylla.datacenters = BTreeMap::from([("dc1".into(), 3)]);
        assert!(check(&named, &["dc1", "dc2"]).is_err());
        let mut several = c;
        several.scylla.local_dc = String::new();
        several.scylla.datacenters = BTreeMap::from([("dc1".into(), 3), ("dc2".into(), 3)]);
        assert!(!needs_cluster_datacenters(&several.scylla));
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
    fn a_null_store_and_an_unverified_password_need_their_opt_in() {
        let err = set(&["pipeline.store=null"]).unwrap_err().to_string();
        assert!(err.contains("pipeline.allow_null_store = true"), "{err}");
        let s = set(&["pipeline.store=null", "pipeline.allow_null_store=true"]).unwrap();
        assert!(
            s.weakened_guarantees()
                .iter()
                .any(|w| w.contains("pipeline.store")),
            "{:?}",
            s.weakened_guarantees()
        );
        let err = set(&[
            "scylla.password=x",
            "scylla.username=vault",
            "scylla.tls=true",
            "scylla.tls_verify=false",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("scylla.tls_verify"), "{err}");
        set(&[
            "scylla.password=x",
            "scylla.username=vault",
            "scylla.tls=true",
            "scylla.tls_verify=false",
            "scylla.allow_cleartext_password=true",
        ])
        .unwrap();
        set(&["scylla.tls=true", "scylla.tls_verify=false"]).unwrap();
    }

    #[test]
    fn a_retention_longer_than_the_longest_ttl_is_refused() {
        for bad in [
            "retention.event_types.purchase=30years",
            "retention.event_types.purchase=20years",
            "retention.default=7301days",
        ] {
            let err = set(&[bad]).unwrap_err().to_string();
            assert!(err.contains("up to 7300days"), "{bad}: {err}");
        }
        set(&[
            "retention.event_types.purchase=7300days",
            "retention.default=7years",
        ])
        .unwrap();
    }

    /// Values no instance could run with (an `Instant` overflow in a rebalance callback, a
    /// semaphore larger than tokio allows, a budget silently capped) are refused, naming the key.
    #[test]
    fn extreme_limits_are_refused_with_what_to_fix() {
        for (bad, key) in [
            (
                "pipeline.revoke_timeout=100years",
                "pipeline.revoke_timeout",
            ),
            ("pipeline.shutdown_timeout=2h", "pipeline.shutdown_timeout"),
            (
                "pipeline.max_in_flight_bytes=4294967296",
                "pipeline.max_in_flight_bytes",
            ),
            (
                "scylla.max_concurrent_requests=65537",
                "scylla.max_concurrent_requests",
            ),
            ("scylla.store_threads=65", "scylla.store_threads"),
        ] {
            let err = set(&[bad]).unwrap_err().to_string();
            assert!(err.starts_with(key), "{bad}: {err}");
        }
        let err = set(&["kafka.topics=a,b,a"]).unwrap_err().to_string();
        assert!(err.contains("each topic once"), "{err}");
        let err = set(&["kafka.commit_interval=11m"]).unwrap_err().to_string();
        assert!(err.starts_with("kafka.commit_interval"), "{err}");
        let err = set(&["pipeline.revoke_timeout=5m"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max.poll.interval.ms (300000 ms)"), "{err}");
        let err = set(&["kafka.options.statistics.interval.ms=0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("statistics"), "{err}");
        let err = set(&["pipeline.revoke_timeout=18446744073709551615s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 1h"), "{err}");
        set(&[
            "pipeline.revoke_timeout=1h",
            "kafka.options.max.poll.interval.ms=3700000",
            "pipeline.shutdown_timeout=1h",
            "pipeline.max_in_flight_bytes=4294967295",
            "scylla.max_concurrent_requests=65536",
            "scylla.store_threads=64",
        ])
        .unwrap();
        set(&["scylla.store_threads=0"]).unwrap();
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
