//! The ScyllaDB store: schema management (`vault migrate`) and Scylla-shaped, idempotent writes.
//!
//! How a Kafka batch becomes CQL requests is decided here and nowhere else ([`plan`]): by
//! default (`scylla.batch_by_replica`) partitions `(user_id, day)` that live on the same
//! replicas and shard share UNLOGGED batches (at most `max_batch_rows` rows and
//! `max_batch_bytes` bytes a request), and the day index's entries go apart, grouped likewise;
//! a partition the driver cannot place, or where grouping saves no requests, goes by
//! partition: one UNLOGGED batch of its rows ending with its day-index entry, as every
//! partition does with `batch_by_replica = false`. On a keyspace with tablets, either way, a few
//! partitions of each write are probes ([`Probes`]): their first row and their entry go alone,
//! as plain EXECUTEs, whose answers teach the driver where tablets live. A row too large to
//! share a batch goes alone, its entry apart.
//! Requests are written concurrently, as many at once per process as the write concurrency
//! limit allows ([`crate::store::concurrency`]: adaptive between `min_concurrent_requests` and
//! `max_concurrent_requests`, or fixed at the maximum). The statements are prepared once,
//! marked idempotent, and always bind the partition key, so the driver routes each request to
//! a replica of the partition of its first row (token-, shard- and DC-aware) and may retry it
//! safely.
//! A lone row or entry goes as a plain EXECUTE (as do the rows of a refused batch, each
//! alone, to find which the database refuses).
//! `write` returns `Ok` only when every request is written; on failure it names the rows still
//! unwritten, so a retry re-sends only those.
//!
//! Every cell is written `USING TIMESTAMP` its row's version ([`version`]), a function of the
//! Kafka record alone: a replay writes the same cells at the same timestamps, and of two writes of
//! one row the later message wins, whichever arrives last.

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use foldhash::HashMap;
use futures::stream::StreamExt;
use openssl::error::ErrorStack;
use openssl::ssl::{SslContext, SslContextBuilder, SslFiletype, SslMethod, SslVerifyMode};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::cluster::metadata::Keyspace;
use scylla::cluster::ClusterState;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::frame::response::result::TableSpec;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::routing::partitioner::{Murmur3Partitioner, Partitioner, PartitionerHasher};
use scylla::routing::{Shard, Token};
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::{CqlDate, CqlTimestamp};
use tracing::info;

use crate::config::{ScyllaConfig, MAX_BATCH_ROWS};
use crate::event::Event;
use crate::store::concurrency::{Answer, Limiter};
use crate::store::erasure::ErasedUsers;
use crate::store::retention::{Retention, Ttl};
use crate::store::{version, Store, StoreError, WriteFailure};
use crate::telemetry::Metrics;

/// The table vault writes.
pub const TABLE: &str = "user_activity";
/// The index of each user's days (see [`user_days_cql`]).
pub const USER_DAYS: &str = "user_days";
/// The record of erasures (see [`erasures_cql`]).
pub const ERASURES: &str = "erasures";
/// The latest `erased_through` of any erasure, one row (see [`erasure_watermark_cql`]).
pub const ERASURE_WATERMARK: &str = "erasure_watermark";
/// Steps of `migrate` that must run to their end (see [`migrations_cql`]).
pub const MIGRATIONS: &str = "schema_migrations";

/// The migration step that fills the day index from rows written before it existed.
const REINDEX: &str = "reindex_user_days";

/// `CREATE KEYSPACE` for these settings.
pub fn keyspace_cql(c: &ScyllaConfig) -> String {
    let replication =
        if c.replication_strategy == "NetworkTopologyStrategy" && c.datacenters.is_empty() {
            // The server expands it to every datacenter it has.
            format!(
                "{{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
                c.replication_factor
            )
        } else if c.replication_strategy == "NetworkTopologyStrategy" {
            let dcs: Vec<String> = c
                .datacenters
                .iter()
                .map(|(dc, rf)| format!("'{dc}': {rf}"))
                .collect();
            format!("{{'class': 'NetworkTopologyStrategy', {}}}", dcs.join(", "))
        } else {
            format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                c.replication_factor
            )
        };
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {replication};",
        c.keyspace
    )
}

/// `CREATE TABLE` for these settings.
pub fn table_cql(c: &ScyllaConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.{TABLE} (
    user_id text,
    day date,
    occurred_at timestamp,
    event_id uuid,
    event_type text,
    attributes text,
    payload blob,
    source_topic text,
    source_partition int,
    source_offset bigint,
    kafka_timestamp timestamp,
    PRIMARY KEY ((user_id, day), occurred_at, event_id)
) WITH CLUSTERING ORDER BY (occurred_at DESC, event_id ASC)
  AND default_time_to_live = {ttl};",
        ks = c.keyspace,
        ttl = c.default_ttl.as_secs()
    )
}

/// The index of each user's days: one row per `(user_id, day)` that holds activity, written
/// with the rows of that day, so an erasure finds every partition of a user without a scan. It
/// never expires (rows may outlive any TTL it could have): a stale entry costs one delete.
pub fn user_days_cql(c: &ScyllaConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.{USER_DAYS} (
    user_id text,
    day date,
    PRIMARY KEY ((user_id), day)
) WITH CLUSTERING ORDER BY (day DESC)
  AND default_time_to_live = 0;",
        ks = c.keyspace,
    )
}

/// The record of every erasure: who or what asked, when, through which time, how many
/// partitions were deleted.
pub fn erasures_cql(c: &ScyllaConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.{ERASURES} (
    user_id text,
    requested_at timestamp,
    requested_by text,
    erased_through timestamp,
    partitions int,
    PRIMARY KEY ((user_id), requested_at)
) WITH CLUSTERING ORDER BY (requested_at DESC);",
        ks = c.keyspace
    )
}

/// One row (`id` 0): the latest `erased_through` of any erasure. Each erasure writes it with
/// its tombstones' timestamp, so the newest erasure's wins whatever order they land in; the
/// write path reads it to know whether an event may belong to an erased user
/// ([`crate::store::erasure::ErasedUsers`]).
pub fn erasure_watermark_cql(c: &ScyllaConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.{ERASURE_WATERMARK} (
    id int PRIMARY KEY,
    erased_through timestamp
);",
        ks = c.keyspace
    )
}

/// Steps of `migrate` that must run to their end, however often they are interrupted: a step
/// is marked pending before what makes it needed (a column added), and done only once it has
/// run through, so every later `migrate` runs it again until then.
pub fn migrations_cql(c: &ScyllaConfig) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.{MIGRATIONS} (
    step text PRIMARY KEY,
    pending boolean
);",
        ks = c.keyspace
    )
}

/// Every table of the schema, in creation order.
fn tables_cql(c: &ScyllaConfig) -> [String; 5] {
    [
        table_cql(c),
        user_days_cql(c),
        erasures_cql(c),
        erasure_watermark_cql(c),
        migrations_cql(c),
    ]
}

/// The whole schema as a .cql script (what `deploy/cql/schema.cql` holds for the defaults).
pub fn schema_script(c: &ScyllaConfig) -> String {
    format!(
        "-- vault schema. Generated from the code (vault::store::scylla::schema_script) for the default\n\
         -- settings; `vault migrate` runs the same statements with the configured values.\n\n{}\n\n{}\n",
        keyspace_cql(c),
        tables_cql(c).join("\n\n")
    )
}

fn insert_cql(keyspace: &str) -> String {
    format!(
        "INSERT INTO {keyspace}.{TABLE} (user_id, day, occurred_at, event_id, event_type, attributes, payload, \
         source_topic, source_partition, source_offset, kafka_timestamp) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         USING TIMESTAMP ? AND TTL ?"
    )
}

/// Connects a session with the configured routing, consistency, timeout and credentials.
pub async fn connect(c: &ScyllaConfig) -> Result<Session, StoreError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if !c.local_dc.is_empty() {
        policy = policy
            .prefer_datacenter(c.local_dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(consistency(&c.consistency))
        .request_timeout(Some(c.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&c.nodes)
        .connection_timeout(Duration::from_secs(10))
        .default_execution_profile_handle(profile.into_handle());
    if !c.username.is_empty() {
        builder = builder.user(&c.username, &c.password);
    }
    if let Some(tls) = tls_context(c)? {
        builder = builder.tls_context(Some(tls));
    }
    let session = builder.build().await.map_err(|e| {
        let msg = format!(
            "cannot connect to ScyllaDB at {} (check scylla.nodes / VAULT_SCYLLA_NODES): {e}",
            c.nodes.join(",")
        );
        if msg.to_ascii_lowercase().contains("authenticat") {
            StoreError::Auth(msg)
        } else {
            StoreError::Connection(msg)
        }
    })?;
    check_datacenters(&session, c).await?;
    Ok(session)
}

/// Checks the consistency against the datacenters the cluster has, once at connection
/// ([`crate::config::check_cluster_datacenters`]: validation checks what `scylla.datacenters`
/// names; this, where it names fewer than two).
async fn check_datacenters(session: &Session, c: &ScyllaConfig) -> Result<(), StoreError> {
    if !crate::config::needs_cluster_datacenters(c) {
        return Ok(());
    }
    // The datacenters known, and whether some node's is not (a peer row without one, or the
    // driver's first metadata read failed).
    let datacenters = || {
        let state = session.get_cluster_state();
        let nodes = state.get_nodes_info();
        let mut dcs: Vec<String> = nodes.iter().filter_map(|n| n.datacenter.clone()).collect();
        dcs.sort_unstable();
        dcs.dedup();
        (dcs, nodes.iter().any(|n| n.datacenter.is_none()))
    };
    let (mut dcs, mut unknown) = datacenters();
    if dcs.len() < 2 && unknown {
        // Read them again, once, within twice the request timeout.
        let _ = tokio::time::timeout(c.request_timeout * 2, session.refresh_metadata()).await;
        (dcs, unknown) = datacenters();
        if dcs.len() < 2 && unknown {
            let what = "the cluster's datacenters are not known yet, and scylla.consistency is \
                        a LOCAL_* level without scylla.local_dc";
            if c.allow_weak_consistency {
                tracing::warn!("{what} (allowed by scylla.allow_weak_consistency = true).");
                return Ok(());
            }
            return Err(StoreError::Connection(format!(
                "{what}: set scylla.local_dc to the datacenter vault runs in, or set \
                 scylla.allow_weak_consistency = true to accept that"
            )));
        }
    }
    let dcs: Vec<&str> = dcs.iter().map(String::as_str).collect();
    match crate::config::check_cluster_datacenters(c, &dcs) {
        Ok(None) => Ok(()),
        Ok(Some(weakening)) => {
            tracing::warn!(
                weakening,
                "The delivery guarantee is weakened by configuration (an explicit opt-in)."
            );
            Ok(())
        }
        Err(fix) => Err(StoreError::Config(fix)),
    }
}

/// The TLS context for `scylla.tls`: the nodes' CA (or the system's roots), an optional client
/// certificate for mutual TLS, and peer verification unless turned off.
pub fn tls_context(c: &ScyllaConfig) -> Result<Option<SslContext>, StoreError> {
    if !c.tls {
        return Ok(None);
    }
    let fail =
        |what: String, e: ErrorStack| StoreError::Connection(format!("scylla TLS: {what}: {e}"));
    let mut b = SslContextBuilder::new(SslMethod::tls_client())
        .map_err(|e| fail("cannot create a TLS context".into(), e))?;
    b.set_verify(if c.tls_verify {
        SslVerifyMode::PEER
    } else {
        SslVerifyMode::NONE
    });
    if c.tls_ca_file.is_empty() {
        b.set_default_verify_paths()
            .map_err(|e| fail("cannot load the system's trusted roots".into(), e))?;
    } else {
        b.set_ca_file(&c.tls_ca_file)
            .map_err(|e| fail(format!("scylla.tls_ca_file {}", c.tls_ca_file), e))?;
    }
    if !c.tls_cert_file.is_empty() {
        b.set_certificate_chain_file(&c.tls_cert_file)
            .map_err(|e| fail(format!("scylla.tls_cert_file {}", c.tls_cert_file), e))?;
        b.set_private_key_file(&c.tls_key_file, SslFiletype::PEM)
            .map_err(|e| fail(format!("scylla.tls_key_file {}", c.tls_key_file), e))?;
        b.check_private_key().map_err(|e| {
            fail(
                "scylla.tls_key_file does not match scylla.tls_cert_file".into(),
                e,
            )
        })?;
    }
    Ok(Some(b.build()))
}

/// Creates the keyspace and table if missing and waits for schema agreement. Idempotent.
pub async fn migrate(session: &Session, c: &ScyllaConfig) -> Result<(), StoreError> {
    for cql in std::iter::once(keyspace_cql(c)).chain(tables_cql(c)) {
        session
            .query_unpaged(cql.as_str(), &[])
            .await
            .map_err(|e| classify(&e))?;
    }
    // Tables created before row versions have `ingested_at` (the wall clock at the write) and no
    // `kafka_timestamp`: add it. Old rows keep their `ingested_at`; nothing writes it any more.
    // Such a table's rows were written before the day index existed: the index is filled from
    // them, a step marked pending first, so that an interrupted one runs again.
    let present = columns(session, &c.keyspace, TABLE).await?;
    if ADDED_COLUMNS
        .iter()
        .any(|(column, _)| !present.contains(*column))
    {
        set_pending(session, &c.keyspace, REINDEX, true).await?;
    }
    for (column, ty) in ADDED_COLUMNS {
        let add = format!("ALTER TABLE {}.{TABLE} ADD {column} {ty}", c.keyspace);
        match session.query_unpaged(add.as_str(), &[]).await {
            Ok(_) => info!(keyspace = %c.keyspace, table = TABLE, column, "Column added."),
            Err(e) if is_existing_column(&e) => {}
            Err(e) => return Err(classify(&e)),
        }
    }
    session
        .await_schema_agreement()
        .await
        .map_err(|e| StoreError::Unavailable(format!("schema agreement not reached: {e}")))?;
    if is_pending(session, &c.keyspace, REINDEX).await? {
        reindex_user_days(session, c).await?;
    }
    crate::store::erasure::seed_watermark(session, &c.keyspace).await?;
    info!(keyspace = %c.keyspace, table = TABLE, "Schema is in place.");
    Ok(())
}

/// The columns `table` of `keyspace` has, from the schema tables.
async fn columns(
    session: &Session,
    keyspace: &str,
    table: &str,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let bad = |e: &dyn std::fmt::Display| {
        StoreError::Schema(format!("reading the columns of {keyspace}.{table}: {e}"))
    };
    let rows = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, table),
        )
        .await
        .map_err(|e| classify(&e))?
        .into_rows_result()
        .map_err(|e| bad(&e))?;
    rows.rows::<(String,)>()
        .map_err(|e| bad(&e))?
        .map(|r| r.map(|(c,)| c).map_err(|e| bad(&e)))
        .collect()
}

/// Marks migration `step` pending (it must run to its end) or done.
async fn set_pending(
    session: &Session,
    keyspace: &str,
    step: &str,
    pending: bool,
) -> Result<(), StoreError> {
    session
        .query_unpaged(
            format!("INSERT INTO {keyspace}.{MIGRATIONS} (step, pending) VALUES (?, ?)"),
            (step, pending),
        )
        .await
        .map_err(|e| classify(&e))?;
    Ok(())
}

/// Whether the day index is still to be filled from rows written before it existed (an
/// upgrade's `migrate` did not finish): an erasure would miss those days.
pub async fn reindex_pending(session: &Session, keyspace: &str) -> Result<bool, StoreError> {
    is_pending(session, keyspace, REINDEX).await
}

/// Whether migration `step` is marked pending.
async fn is_pending(session: &Session, keyspace: &str, step: &str) -> Result<bool, StoreError> {
    let bad = |e: &dyn std::fmt::Display| {
        StoreError::Schema(format!("reading {keyspace}.{MIGRATIONS}: {e}"))
    };
    Ok(session
        .query_unpaged(
            format!("SELECT pending FROM {keyspace}.{MIGRATIONS} WHERE step = ?"),
            (step,),
        )
        .await
        .map_err(|e| classify(&e))?
        .into_rows_result()
        .map_err(|e| bad(&e))?
        .maybe_first_row::<(Option<bool>,)>()
        .map_err(|e| bad(&e))?
        .and_then(|(p,)| p)
        .unwrap_or(false))
}

/// Puts every `(user_id, day)` that holds rows into the day index, so an erasure finds rows
/// written before the index existed. Reads the whole table once (paged); index rows go in at
/// timestamp 0, below every erasure and every version, so it never resurrects or shadows
/// anything. Idempotent: `vault migrate` runs it again while its step is pending (an upgrade
/// interrupted in the middle of it), and `vault migrate --reindex` whenever asked. Marks the
/// step done once through.
pub async fn reindex_user_days(session: &Session, c: &ScyllaConfig) -> Result<u64, StoreError> {
    let ks = &c.keyspace;
    if crate::failpoint::hit("store::reindex", ks, None) {
        return Err(StoreError::Unavailable(
            "failpoint store::reindex: the day index's fill was interrupted".into(),
        ));
    }
    let mut index = session
        .prepare(format!(
            "INSERT INTO {ks}.{USER_DAYS} (user_id, day) VALUES (?, ?) USING TIMESTAMP 0"
        ))
        .await
        .map_err(|e| classify(&ExecutionError::PrepareError(e)))?;
    index.set_is_idempotent(true);
    let mut rows = session
        .query_iter(format!("SELECT user_id, day FROM {ks}.{TABLE}"), &[])
        .await
        .map_err(|e| StoreError::Unavailable(format!("reading {ks}.{TABLE}: {e}")))?
        .rows_stream::<(String, CqlDate)>()
        .map_err(|e| StoreError::Invalid(format!("reading {ks}.{TABLE}: {e}")))?;
    let (mut last, mut indexed) = (None, 0u64);
    while let Some(row) = rows.next().await {
        let (user, day) =
            row.map_err(|e| StoreError::Unavailable(format!("reading {ks}.{TABLE}: {e}")))?;
        if last.as_ref() == Some(&(user.clone(), day.0)) {
            continue; // Rows of one partition come together.
        }
        session
            .execute_unpaged(&index, (&user, day))
            .await
            .map_err(|e| classify(&e))?;
        indexed += 1;
        last = Some((user, day.0));
    }
    set_pending(session, ks, REINDEX, false).await?;
    info!(keyspace = %ks, partitions = indexed, "Day index filled from existing rows.");
    Ok(indexed)
}

/// Columns added to the table since its first release, in order: `vault migrate` adds each one
/// an existing table lacks.
const ADDED_COLUMNS: [(&str, &str); 1] = [("kafka_timestamp", "timestamp")];

/// Whether an `ALTER TABLE ... ADD` failed because the column is there already (ScyllaDB and
/// Cassandra answer Invalid, "conflicts with an existing column").
fn is_existing_column(e: &ExecutionError) -> bool {
    let text = e.to_string();
    text.contains("conflicts with an existing column") || text.contains("already exist")
}

fn consistency(s: &str) -> Consistency {
    match s.to_ascii_uppercase().as_str() {
        "ANY" => Consistency::Any,
        "ONE" => Consistency::One,
        "TWO" => Consistency::Two,
        "THREE" => Consistency::Three,
        "QUORUM" => Consistency::Quorum,
        "ALL" => Consistency::All,
        "EACH_QUORUM" => Consistency::EachQuorum,
        "LOCAL_ONE" => Consistency::LocalOne,
        _ => Consistency::LocalQuorum,
    }
}

/// Maps a driver error to the store's classification (the one place that decides).
pub fn classify(e: &ExecutionError) -> StoreError {
    let msg = e.to_string();
    match e {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, text)) => {
            let text = format!("{text} ({db})");
            match db {
                DbError::WriteTimeout { .. }
                | DbError::ReadTimeout { .. }
                | DbError::WriteFailure { .. }
                | DbError::ReadFailure { .. } => StoreError::Timeout(text),
                DbError::Overloaded | DbError::RateLimitReached { .. } => {
                    StoreError::Overloaded(text)
                }
                DbError::Unavailable { .. } | DbError::IsBootstrapping => {
                    StoreError::Unavailable(text)
                }
                DbError::AuthenticationError | DbError::Unauthorized => StoreError::Auth(text),
                DbError::Invalid
                | DbError::SyntaxError
                | DbError::AlreadyExists { .. }
                | DbError::ConfigError => {
                    let lower = text.to_ascii_lowercase();
                    if lower.contains("unconfigured table")
                        || lower.contains("undefined column")
                        || lower.contains("keyspace")
                    {
                        StoreError::Schema(text)
                    } else {
                        StoreError::Invalid(text)
                    }
                }
                DbError::Unprepared { .. }
                | DbError::ServerError
                | DbError::ProtocolError
                | DbError::TruncateError => StoreError::Connection(text),
                _ => StoreError::Connection(text),
            }
        }
        ExecutionError::RequestTimeout(_) => StoreError::Timeout(msg),
        ExecutionError::BadQuery(_) => StoreError::Invalid(msg),
        ExecutionError::PrepareError(_)
            if msg.to_ascii_lowercase().contains("unconfigured table") =>
        {
            StoreError::Schema(msg)
        }
        _ => StoreError::Connection(msg),
    }
}

/// The production store.
pub struct ScyllaStore {
    session: Arc<Session>,
    insert: PreparedStatement,
    index: PreparedStatement,
    keyspace: String,
    retention: Retention,
    /// The table's default TTL in seconds, for events no retention applies to.
    default_ttl: i32,
    max_batch_rows: usize,
    max_batch_bytes: usize,
    /// Permits for write requests in flight, process-wide.
    limiter: Limiter,
    per_batch_requests: usize,
    /// The UNLOGGED batches of `insert` and of `index`, by size, and of a partition's rows
    /// with its index entry ([`Request::Partition`]).
    rows_batches: Batches,
    index_batches: Batches,
    partition_batches: Batches,
    /// Batch partitions that live on the same replicas and shard together (`plan`).
    batch_by_replica: bool,
    /// The datacenter whose replicas decide where a partition lives, when set.
    local_dc: Option<String>,
    /// `vault_write_unplaced_partitions_total`, once the pipeline's metrics are known.
    unplaced: OnceLock<prometheus::IntCounter>,
    /// Reads the erasure watermark.
    watermark: PreparedStatement,
    /// What the write path knows of erasures: rows of erased users are not written again.
    erased: ErasedUsers,
    /// `vault_write_erased_rows_total`, once the pipeline's metrics are known.
    erased_rows: OnceLock<prometheus::IntCounter>,
}

/// Prepares one of the store's statements, marked idempotent; one the schema does not have
/// says to migrate.
async fn prepare_idempotent(
    session: &Session,
    cql: String,
) -> Result<PreparedStatement, StoreError> {
    let mut statement = session.prepare(cql).await.map_err(|e| {
        match classify(&ExecutionError::PrepareError(e)) {
            StoreError::Schema(m) | StoreError::Invalid(m) => StoreError::Schema(format!(
                "{m}: run `vault migrate` (or `vault run --migrate`)"
            )),
            other => other,
        }
    })?;
    statement.set_is_idempotent(true);
    Ok(statement)
}

/// Requests of one batch in flight at once, at most (the process-wide bound is
/// `scylla.max_concurrent_requests`).
const PER_BATCH_REQUESTS: usize = 32;

impl ScyllaStore {
    /// Connects, optionally migrates, and prepares the insert.
    pub async fn connect(
        c: &ScyllaConfig,
        migrate_schema: bool,
    ) -> Result<ScyllaStore, StoreError> {
        let session = connect(c).await?;
        if migrate_schema {
            migrate(&session, c).await?;
        }
        Self::with_session(Arc::new(session), c).await
    }

    pub async fn with_session(
        session: Arc<Session>,
        c: &ScyllaConfig,
    ) -> Result<ScyllaStore, StoreError> {
        let insert = prepare_idempotent(&session, insert_cql(&c.keyspace)).await?;
        let index = prepare_idempotent(
            &session,
            format!(
                "INSERT INTO {}.{USER_DAYS} (user_id, day) VALUES (?, ?) USING TIMESTAMP ?",
                c.keyspace
            ),
        )
        .await?;
        let watermark = prepare_idempotent(
            &session,
            format!(
                "SELECT erased_through FROM {}.{ERASURE_WATERMARK} WHERE id = 0",
                c.keyspace
            ),
        )
        .await?;
        // Validated so already; clamped so that the batch caches always hold the sizes planned.
        let max_batch_rows = c.max_batch_rows.clamp(1, MAX_BATCH_ROWS);
        let partition_batches = Batches::new(max_batch_rows, Some(index.clone()));
        Ok(ScyllaStore {
            session,
            insert,
            index,
            keyspace: c.keyspace.clone(),
            retention: Retention::default(),
            default_ttl: i32::try_from(c.default_ttl.as_secs()).unwrap_or(i32::MAX),
            max_batch_rows,
            max_batch_bytes: c.max_batch_bytes,
            limiter: if c.adaptive_concurrency {
                Limiter::adaptive(c.min_concurrent_requests, c.max_concurrent_requests)
            } else {
                Limiter::fixed(c.max_concurrent_requests)
            },
            per_batch_requests: c.max_concurrent_requests.clamp(1, PER_BATCH_REQUESTS),
            rows_batches: Batches::new(max_batch_rows, None),
            index_batches: Batches::new(max_batch_rows, None),
            partition_batches,
            batch_by_replica: c.batch_by_replica,
            local_dc: (!c.local_dc.is_empty()).then(|| c.local_dc.clone()),
            unplaced: OnceLock::new(),
            watermark,
            erased: ErasedUsers::default(),
            erased_rows: OnceLock::new(),
        })
    }

    /// The erasure watermark's statement.
    pub(crate) fn watermark_query(&self) -> &PreparedStatement {
        &self.watermark
    }

    /// What the write path knows of erasures.
    pub fn erased(&self) -> &ErasedUsers {
        &self.erased
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Writes with the TTL each event's retention leaves it (see [`Retention`]).
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The TTL of a write of `e` now: what its retention leaves, else the table's default.
    fn ttl(&self, e: &Event, now_ms: i64) -> i32 {
        match self.retention.ttl(e, now_ms) {
            Ttl::Seconds(s) => s,
            // Expired between the persister's check and now: the shortest life there is.
            Ttl::Expired => 1,
            Ttl::Table => self.default_ttl,
        }
    }

    /// Splits events into requests ([`plan`]): by partition, or with `batch_by_replica` by
    /// where partitions live, as far as the driver knows it now; on tablets, with probes that
    /// teach it ([`Probes`]).
    pub fn plan(&self, events: &[&Event]) -> Vec<Request> {
        self.planned(events).0
    }

    /// [`Self::plan`], and how many of the partitions the driver could not place (on tablets,
    /// or a keyspace it has no metadata for yet).
    fn planned(&self, events: &[&Event]) -> (Vec<Request>, u64) {
        let cluster = self.session.get_cluster_state();
        let tablets = cluster
            .get_keyspace(&self.keyspace)
            .map(|ks| ks.tablet_based);
        let (rows, bytes) = (self.max_batch_rows, self.max_batch_bytes);
        // On vnodes the ring says where every partition lives: nothing to look up or teach.
        if tablets == Some(false) && !self.batch_by_replica {
            return (plan_by_partition(events, rows, bytes), 0);
        }
        let dc = self.local_dc.as_deref();
        let rows_at = Placement::of(&cluster, &self.keyspace, TABLE, dc);
        let index_at = Placement::of(&cluster, &self.keyspace, USER_DAYS, dc);
        let by_replica = self.batch_by_replica;
        // Where a partition's rows and its entry live; by partition only the rows matter (the
        // entry rides with them).
        let keys = |e: &Event| {
            let (user, day) = row_key(e);
            let rows = rows_at.as_ref()?.key(&[user, &day])?;
            let index = if by_replica {
                index_at.as_ref()?.key(&[e.user_id().as_bytes()])?
            } else {
                0
            };
            Some((rows, index))
        };
        let learning = tablets != Some(false);
        let mut probes = Probes::new(learning);
        let mut unplaced = 0;
        let requests = plan(events, rows, bytes, |e| {
            let keys = keys(e);
            unplaced += u64::from(learning && keys.is_none());
            probes.shape(keys, by_replica)
        });
        (requests, unplaced)
    }

    /// Sends one request while holding a write permit, for the whole request (the driver's
    /// retries of it included), and tells the limiter how it ended. A cancelled send gives the
    /// permit back.
    async fn send(&self, events: &[&Event], request: &Request) -> Result<(), ExecutionError> {
        let permit = self.limiter.acquire().await;
        // Boxed: the driver's request future is several KB, and this one is moved through the
        // write's `buffer_unordered` into its task set; boxed, those moves copy a pointer.
        let result = match request {
            Request::Partition { rows, entry } => {
                Box::pin(self.send_partition(events, rows, *entry)).await
            }
            Request::Rows(rows) => Box::pin(self.send_rows(events, rows)).await,
            Request::Index { entries, .. } => Box::pin(self.send_index(events, entries)).await,
        };
        permit.finish(match &result {
            Ok(()) => Answer::Success,
            Err(e) => Answer::of_error(&classify(e)),
        });
        result
    }

    /// Writes one partition's rows and, last in the same UNLOGGED batch, its day-index entry;
    /// each row with the TTL its retention leaves it at this moment (after the wait for a
    /// permit, so a queued write never outlives its retention by the wait).
    async fn send_partition(
        &self,
        events: &[&Event],
        rows: &[usize],
        entry: IndexEntry,
    ) -> Result<(), ExecutionError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let vals: Vec<Bound<'_>> = rows
            .iter()
            .map(|&i| Bound::Row(values(events[i], self.ttl(events[i], now_ms))))
            .chain([Bound::Entry(entry.values(events))])
            .collect();
        let batch = self.partition_batches.get(rows.len(), &self.insert);
        self.session.batch(batch, vals).await?;
        Ok(())
    }

    /// Writes rows, each with the TTL its retention leaves it at this moment (after the wait for
    /// a permit, so a queued write never outlives its retention by the wait).
    async fn send_rows(&self, events: &[&Event], rows: &[usize]) -> Result<(), ExecutionError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let [i] = rows {
            let e = events[*i];
            self.session
                .execute_unpaged(&self.insert, values(e, self.ttl(e, now_ms)))
                .await?;
        } else {
            let vals: Vec<_> = rows
                .iter()
                .map(|&i| values(events[i], self.ttl(events[i], now_ms)))
                .collect();
            let batch = self.rows_batches.get(rows.len(), &self.insert);
            self.session.batch(batch, vals).await?;
        }
        Ok(())
    }

    /// Writes day-index entries: each is `(user_id, day)` of the row `first` at `version`, the
    /// newest version of that day's rows in the write (so an erasure's index delete at a lower
    /// version never removes the entry of a row it does not shadow).
    async fn send_index(
        &self,
        events: &[&Event],
        entries: &[IndexEntry],
    ) -> Result<(), ExecutionError> {
        if let [x] = entries {
            self.session
                .execute_unpaged(&self.index, x.values(events))
                .await?;
        } else {
            let vals: Vec<_> = entries.iter().map(|x| x.values(events)).collect();
            let batch = self.index_batches.get(entries.len(), &self.index);
            self.session.batch(batch, vals).await?;
        }
        Ok(())
    }

    /// Writes one row alone, with its day-index entry: how the rows of a refused request are
    /// tried again, so that only a row the database refuses on its own is reported as refused.
    async fn send_alone(&self, events: &[&Event], i: usize) -> Result<(), ExecutionError> {
        let rows = Request::Rows(vec![i]);
        let index = Request::Index {
            entries: vec![IndexEntry::of(events, &[i])],
            covers: vec![i],
        };
        futures::try_join!(self.send(events, &index), self.send(events, &rows))?;
        Ok(())
    }
}

/// One CQL request of a write: an UNLOGGED batch (or, for one statement, a plain EXECUTE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Rows of one partition `(user_id, day)` (indices into the write's events, in order), and
    /// last the partition's day-index entry at the newest version among them: how rows go by
    /// partition ([`plan_by_partition`]). The batch is routed by its first row, to a replica of
    /// the partition, which forwards the entry to the index's replicas.
    Partition { rows: Vec<usize>, entry: IndexEntry },
    /// Rows of the main table (indices into the write's events), of partitions that share
    /// replicas (by replica, [`plan`]); their index entries go apart.
    Rows(Vec<usize>),
    /// Day-index entries, and the rows they index: when the request fails, those rows count
    /// as unwritten, so that a retry writes their index entries again.
    Index {
        entries: Vec<IndexEntry>,
        covers: Vec<usize>,
    },
}

impl Request {
    /// The rows that are not durable when this request fails.
    pub fn rows(&self) -> &[usize] {
        match self {
            Request::Partition { rows, .. } | Request::Rows(rows) => rows,
            Request::Index { covers, .. } => covers,
        }
    }
}

/// One `(user_id, day)` entry of the day index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// A row of that day (index into the write's events): its user and day are the entry's.
    pub first: usize,
    /// The newest version among the write's rows of that day.
    pub version: i64,
}

impl IndexEntry {
    /// The entry of the day of `rows` (of one partition, at least one), at their newest version.
    fn of(events: &[&Event], rows: &[usize]) -> IndexEntry {
        IndexEntry {
            first: rows[0],
            version: rows
                .iter()
                .map(|&i| version::of(events[i]))
                .max()
                .unwrap_or(0),
        }
    }

    /// The bound values of the index's insert: `(user_id, day, version)`.
    fn values<'a>(&self, events: &[&'a Event]) -> (&'a str, CqlDate, i64) {
        let e = events[self.first];
        (e.user_id(), cql_day(e.day()), self.version)
    }
}

/// What [`plan`] does with one partition `(user_id, day)` of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Its rows, in order, in UNLOGGED batches of their own, each ending with the partition's
    /// day-index entry ([`Request::Partition`]): by partition (`batch_by_replica = false`),
    /// and wherever the driver does not know where the partition or its entry lives.
    Partition,
    /// By replica (`batch_by_replica`, the default): its rows share batches with the write's
    /// other partitions of the same `rows` key, and its entry with the entries of the same
    /// `index` key (the keys of where they live, [`Placement`]); as [`Shape::Partition`] where
    /// that saves no requests (see [`plan`]).
    Grouped { rows: u64, index: u64 },
    /// A probe (on tablets, see [`Probes`]): its entry and its first row each alone, as plain
    /// EXECUTEs, whose answers teach the driver where their tablets live; its other rows in
    /// batches.
    Probe,
}

/// Splits a write's events into requests by partition `(user_id, day)`, each as `shape` says
/// (called once per partition, in order of first appearance, with its first row).
///
/// - [`Shape::Partition`]: the partition's rows, in order, cut into UNLOGGED batches of at most
///   `max_rows` rows and `max_bytes` bytes, and to each batch the partition's day-index entry,
///   last, at the newest version among that batch's rows ([`Request::Partition`]). A row larger
///   than a batch may hold goes alone, its entry in a request of its own.
/// - [`Shape::Grouped`]: partitions of equal `rows` keys are cut together into batches (a
///   partition's rows kept together and in order where they fit); the day index gets one entry
///   per partition, at the newest version of its rows in the write, grouped by `index` key and
///   cut at `max_rows` entries ([`Request::Index`]); an index request that fails leaves every row
///   it covers unwritten. A partition alone on its `rows` key in the write goes as a
///   [`Shape::Partition`], and so do all the grouped partitions when grouping them would take
///   as many requests as going by partition, or more: grouping never sends more requests
///   (what `shape` makes probes aside).
/// - [`Shape::Probe`]: one entry request covering all the partition's rows, its first row
///   alone, and its other rows cut into batches.
///
/// So every row of a write is in one request, and its day's entry, at or above its version, in
/// a request whose failure leaves that row unwritten (the same one, or an index request that
/// covers it): a request that is acknowledged has made its rows and their day durable, and the
/// rows of one that fails are sent again with their entry. Every row of an acknowledged write
/// has an index entry at or above its version, which is what an erasure relies on (DESIGN,
/// Erasure). A second request of a large partition writes the entry again, at its own rows'
/// newest version; the entry keeps the newest of them. Requests run concurrently, so their
/// order is no guarantee: what keeps a day from staying unindexed behind its rows is the commit
/// rule (the write is durable only when every request of it is, and an abandoned one is
/// replayed), and an entry without rows is only a stale entry.
///
/// Why a partition's entry rides with its rows, by partition: a request's fixed cost (on both
/// sides) is most of what a small row costs, and users' activity seldom puts many rows of one
/// day in one Kafka batch; one request then carries the row and its index entry, where separate
/// requests would double them. The entry's partition is another (the index is keyed by user),
/// so the coordinator forwards that one small mutation, as it would replicate it anyway. By
/// replica (the default), on three nodes with a replication factor of 3, a batch of 500 events
/// from 500 users costs a few requests per shard rather than 500, each sent to a coordinator
/// that owns every partition in it (the driver routes a batch by its first statement); DESIGN
/// (Storage) says why that is the default.
pub fn plan(
    events: &[&Event],
    max_rows: usize,
    max_bytes: usize,
    mut shape: impl FnMut(&Event) -> Shape,
) -> Vec<Request> {
    let max_rows = max_rows.max(1);
    let mut requests = Vec::new();
    let mut grouped: Vec<(Vec<usize>, u64, u64)> = Vec::new();
    for rows in partitions(events) {
        match shape(events[rows[0]]) {
            Shape::Partition => by_partition(&mut requests, events, rows, max_rows, max_bytes),
            Shape::Grouped { rows: key, index } => grouped.push((rows, key, index)),
            Shape::Probe => {
                requests.push(Request::Index {
                    entries: vec![IndexEntry::of(events, &rows)],
                    covers: rows.clone(),
                });
                requests.push(Request::Rows(vec![rows[0]]));
                let rest = rows[1..].iter().copied();
                requests.extend(cut(rest, events, max_rows, max_bytes).map(Request::Rows));
            }
        }
    }
    // A partition that shares its replicas with no other partition of the write would gain
    // nothing from grouping, and its entry would cost a request of its own: it goes by
    // partition, its entry riding with its rows.
    let (shared, alone): (Vec<_>, Vec<_>) = by_key(&grouped, |(_, key, _)| *key)
        .into_iter()
        .partition(|(_, group)| group.len() > 1);
    for (rows, _, _) in alone.into_iter().flat_map(|(_, group)| group) {
        by_partition(&mut requests, events, rows.clone(), max_rows, max_bytes);
    }
    let grouped: Vec<&(Vec<usize>, u64, u64)> = shared
        .iter()
        .flat_map(|(_, group)| group)
        .copied()
        .collect();
    let mut index = Vec::new();
    for (_, group) in by_key(&grouped, |(_, _, index)| *index) {
        for chunk in group.chunks(max_rows) {
            let entries = chunk
                .iter()
                .map(|(rows, _, _)| IndexEntry::of(events, rows))
                .collect();
            let mut covers: Vec<usize> = chunk
                .iter()
                .flat_map(|(rows, _, _)| rows.iter().copied())
                .collect();
            covers.sort_unstable();
            index.push(Request::Index { entries, covers });
        }
    }
    for (_, group) in &shared {
        let rows = group.iter().flat_map(|(rows, _, _)| rows.iter().copied());
        index.extend(cut(rows, events, max_rows, max_bytes).map(Request::Rows));
    }
    // The partitions that share replicas stay grouped only if that takes fewer requests than
    // going by partition; otherwise they go by partition too. Where partitions seldom share
    // replicas (a large cluster), pairs would take a request for their rows and one for each
    // entry, where index entries land on other replica sets: more than by partition. By
    // partition takes one request a partition at least, so below that no comparison is needed.
    if index.len() >= grouped.len() {
        let mut apart = Vec::new();
        for (rows, _, _) in grouped {
            by_partition(&mut apart, events, rows.clone(), max_rows, max_bytes);
        }
        if apart.len() <= index.len() {
            index = apart;
        }
    }
    index.extend(requests);
    index
}

/// [`plan`] with every partition a [`Shape::Partition`]: how a write goes on vnodes with
/// `batch_by_replica = false`.
pub fn plan_by_partition(events: &[&Event], max_rows: usize, max_bytes: usize) -> Vec<Request> {
    plan(events, max_rows, max_bytes, |_| Shape::Partition)
}

/// [`Shape::Partition`]'s requests for the partition of `rows`.
fn by_partition(
    requests: &mut Vec<Request>,
    events: &[&Event],
    rows: Vec<usize>,
    max_rows: usize,
    max_bytes: usize,
) {
    let e = events[rows[0]];
    // The entry's own bytes count against the batch's.
    let room = max_bytes.saturating_sub(e.user_id().len() + 32);
    for rows in cut(rows.into_iter(), events, max_rows, room) {
        let entry = IndexEntry::of(events, &rows);
        if let [i] = rows[..] {
            if row_size(events[i]) > room {
                // A row too large to share a batch: the database checks the size of every
                // batch of two partitions or more (it warns above 128 KiB and refuses above
                // 1 MiB), not of a lone statement. The row and its entry go as two EXECUTEs.
                requests.push(Request::Index {
                    entries: vec![entry],
                    covers: vec![i],
                });
                requests.push(Request::Rows(rows));
                continue;
            }
        }
        requests.push(Request::Partition { rows, entry });
    }
}

/// Which partitions of a write are probes ([`Shape::Probe`]), on a keyspace with tablets or
/// one the driver has no metadata for yet (`learning`); on vnodes, none.
///
/// The driver learns where a tablet lives only from the answer to a plain EXECUTE served by a
/// node (or shard) that is not its replica (ScyllaDB's `TABLETS_ROUTING_V1`); a batch teaches
/// it nothing. So each write's first partition is a probe, which tells the driver where a
/// tablet that moved lives now, and so are the next [`Probes::UNKNOWN`] partitions whose
/// rows' or entry's tablet it has not learned yet. The other partitions are batched as they
/// would be on vnodes; one the driver cannot place goes by partition, to whichever node it
/// picks, which forwards it. A probe costs one or two requests more than its partition would
/// (its entry and its first row alone): a handful a write. Where every node is a replica of
/// everything (as many nodes as the replication factor, one shard each) no answer ever teaches
/// the driver, and that is all it costs there. A write's first partition is whichever user's
/// event came first in the Kafka batch, so over the writes every tablet with traffic is probed,
/// in proportion to its traffic: a tablet that moved is learned again at its first write after
/// the move that leads with one of its partitions.
#[derive(Debug)]
pub struct Probes {
    learning: bool,
    seen: usize,
    unknown: usize,
}

impl Probes {
    /// Probes of partitions whose placement is unknown, after the first, a write at most.
    pub const UNKNOWN: usize = 3;

    pub fn new(learning: bool) -> Probes {
        Probes {
            learning,
            seen: 0,
            unknown: 0,
        }
    }

    /// The shape of the write's next partition, given the keys of where its rows and its
    /// entry live (`None` where the driver does not know) and whether partitions on the same
    /// replicas share batches (`batch_by_replica`).
    pub fn shape(&mut self, keys: Option<(u64, u64)>, by_replica: bool) -> Shape {
        let first = self.seen == 0;
        self.seen += 1;
        if self.learning {
            if first {
                return Shape::Probe;
            }
            if keys.is_none() && self.unknown < Self::UNKNOWN {
                self.unknown += 1;
                return Shape::Probe;
            }
        }
        match keys {
            Some((rows, index)) if by_replica => Shape::Grouped { rows, index },
            _ => Shape::Partition,
        }
    }
}

/// The write's partitions `(user_id, day)` in order of first appearance, each with its rows in
/// order.
fn partitions(events: &[&Event]) -> Vec<Vec<usize>> {
    let mut partitions: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<(&str, i64), usize> =
        HashMap::with_capacity_and_hasher(events.len(), Default::default());
    for (i, e) in events.iter().enumerate() {
        let n = partitions.len();
        let p = *seen.entry((e.user_id(), e.day())).or_insert(n);
        if p == n {
            partitions.push(Vec::new());
        }
        partitions[p].push(i);
    }
    partitions
}

/// `rows`, in order, cut into batches of at most `max_rows` rows (at least 1) and `max_bytes`
/// bytes (a row larger than that goes alone).
fn cut<'a>(
    rows: impl Iterator<Item = usize> + 'a,
    events: &'a [&Event],
    max_rows: usize,
    max_bytes: usize,
) -> impl Iterator<Item = Vec<usize>> + 'a {
    let max_rows = max_rows.max(1);
    let mut rows = rows.peekable();
    std::iter::from_fn(move || {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(&i) = rows.peek() {
            let size = row_size(events[i]);
            if !batch.is_empty() && (batch.len() >= max_rows || bytes + size > max_bytes) {
                break;
            }
            batch.push(i);
            bytes += size;
            rows.next();
        }
        (!batch.is_empty()).then_some(batch)
    })
}

/// `items` grouped by `key`, groups in order of their first item, items in order.
fn by_key<T, K: Copy + Eq + std::hash::Hash>(
    items: &[T],
    key: impl Fn(&T) -> K,
) -> Vec<(K, Vec<&T>)> {
    let mut groups: Vec<(K, Vec<&T>)> = Vec::new();
    let mut at: HashMap<K, usize> = HashMap::default();
    for item in items {
        let k = key(item);
        let n = groups.len();
        let g = *at.entry(k).or_insert(n);
        if g == n {
            groups.push((k, Vec::new()));
        }
        groups[g].1.push(item);
    }
    groups
}

/// Where the partitions of one table live, as the driver knows it now (from the ring on vnodes,
/// from the tablets it has learned on tablets): with `scylla.batch_by_replica`, [`plan`]'s key
/// of a partition is a hash of its replicas in `scylla.local_dc` (all of them without one), as
/// (host id, shard) pairs; on tablets, whether it knows them at all.
struct Placement<'a> {
    cluster: &'a ClusterState,
    keyspace: &'a Keyspace,
    table: TableSpec<'a>,
    datacenter: Option<&'a str>,
}

impl<'a> Placement<'a> {
    /// `None` where no partition's replicas can be looked up: the driver has no metadata for the
    /// table yet, or the table is not placed by Murmur3 (the default partitioner, the only one
    /// whose tokens are computed here).
    fn of(
        cluster: &'a ClusterState,
        keyspace: &'a str,
        table: &'a str,
        datacenter: Option<&'a str>,
    ) -> Option<Self> {
        let ks = cluster.get_keyspace(keyspace)?;
        let meta = ks.tables.get(table)?;
        let murmur3 = meta
            .partitioner
            .as_deref()
            .is_none_or(|p| p.ends_with("Murmur3Partitioner"));
        murmur3.then(|| Placement {
            cluster,
            keyspace: ks,
            table: TableSpec::borrowed(keyspace, table),
            datacenter,
        })
    }

    /// The key of the partition whose serialized key columns are `parts`: its replicas (see
    /// [`replica_key`]); `None` when the driver knows none (on tablets: a tablet not learned).
    fn key(&self, parts: &[&[u8]]) -> Option<u64> {
        let replicas = self.cluster.replica_locator().replicas_for_token(
            token(parts),
            &self.keyspace.strategy,
            self.datacenter,
            &self.table,
        );
        replica_key(
            replicas
                .into_iter()
                .map(|(node, shard)| (node.host_id, shard)),
        )
    }
}

/// The planning key of a replica set, as (host id, shard) pairs; `None` for an empty one.
///
/// The pairs' hashes are summed, which does not depend on the order the ring lists them in, so
/// two partitions on the same replicas get the same key without a sorted copy of the set. Two
/// different sets summing alike (odds about 2⁻⁶⁴) would only share a batch whose coordinator
/// forwards some of it, as correct as any batch.
fn replica_key(replicas: impl IntoIterator<Item = (uuid::Uuid, Shard)>) -> Option<u64> {
    replicas
        .into_iter()
        .map(|replica| KEY_HASH.hash_one(replica))
        .reduce(u64::wrapping_add)
}

/// The partition key of `e`'s row, `(user_id, day)`, with the day serialized as CQL does.
fn row_key(e: &Event) -> (&[u8], [u8; 4]) {
    (e.user_id().as_bytes(), cql_day(e.day()).0.to_be_bytes())
}

/// The Murmur3 token of the partition whose serialized key columns are `parts` (a compound key
/// hashed as CQL composes it), as the driver and the database compute it.
pub fn token(parts: &[&[u8]]) -> Token {
    let mut token = Murmur3Partitioner.build_hasher();
    if let [one] = parts {
        token.write(one);
    } else {
        for part in parts {
            // Partition key columns are under 64 KiB (the database refuses longer ones).
            let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
            token.write(&len.to_be_bytes());
            token.write(part);
            token.write(&[0]);
        }
    }
    token.finish()
}

/// The hasher of planning keys (fixed: keys are compared within one write only).
const KEY_HASH: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x5ca1ab1e);

/// UNLOGGED batches of `n` copies of one prepared statement, and then the `tail` statement if
/// there is one, built once for each `n` used (up to `scylla.max_batch_rows`, at most
/// [`MAX_BATCH_ROWS`]): a write binds its values to the cached batch, so no statement is cloned
/// per row. At most `MAX_BATCH_ROWS`² / 2 statement handles, a few MB.
struct Batches {
    sizes: Vec<OnceLock<Batch>>,
    tail: Option<PreparedStatement>,
}

impl Batches {
    fn new(max: usize, tail: Option<PreparedStatement>) -> Self {
        Batches {
            sizes: (0..=max.min(MAX_BATCH_ROWS))
                .map(|_| OnceLock::new())
                .collect(),
            tail,
        }
    }

    /// The batch of `n` statements (and the tail); `n` is at most the `max` this was built
    /// with (the planners cut batches there).
    fn get(&self, n: usize, statement: &PreparedStatement) -> &Batch {
        self.sizes[n].get_or_init(|| {
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in 0..n {
                batch.append_statement(statement.clone());
            }
            if let Some(tail) = &self.tail {
                batch.append_statement(tail.clone());
            }
            batch.set_is_idempotent(true);
            batch
        })
    }
}

type Row<'a> = (
    &'a str,
    CqlDate,
    CqlTimestamp,
    uuid::Uuid,
    &'a str,
    Option<&'a str>,
    &'a [u8],
    &'a str,
    i32,
    i64,
    CqlTimestamp,
    i64,
    i32,
);

/// The bound values of one row: its fields, and its version (see [`version`]) as the write
/// timestamp, so a replay writes exactly the same cells.
fn values(e: &Event, ttl: i32) -> Row<'_> {
    let day = cql_day(e.day());
    (
        e.user_id(),
        day,
        CqlTimestamp(e.occurred_at_ms),
        e.event_id,
        e.event_type(),
        e.attributes(),
        e.payload(),
        &e.source.topic,
        e.source.partition,
        e.source.offset,
        CqlTimestamp(version::kafka_timestamp_ms(e)),
        version::of(e),
        ttl,
    )
}

/// The bound values of one statement of a [`Request::Partition`]'s batch: a row, or (last) the
/// partition's day-index entry.
enum Bound<'a> {
    Row(Row<'a>),
    Entry((&'a str, CqlDate, i64)),
}

impl SerializeRow for Bound<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match self {
            Bound::Row(row) => row.serialize(ctx, writer),
            Bound::Entry(entry) => entry.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A day (days since 1970-01-01) as CQL's `date`.
pub fn cql_day(day: i64) -> CqlDate {
    CqlDate(((1i64 << 31) + day) as u32)
}

fn row_size(e: &Event) -> usize {
    e.payload().len()
        + e.user_id().len()
        + e.event_type().len()
        + e.attributes().map_or(0, str::len)
        + 64
}

impl Store for ScyllaStore {
    fn report_to(&self, metrics: &Metrics) {
        self.limiter.report_to(
            metrics.write_concurrency_limit.clone(),
            metrics.write_requests_in_flight.clone(),
        );
        let _ = self.unplaced.set(metrics.write_unplaced_partitions.clone());
        let _ = self.erased_rows.set(metrics.write_erased_rows.clone());
    }

    async fn erase(&self, erasure: &crate::store::erasure::Erasure) -> Result<(), StoreError> {
        crate::store::erasure::forget(self, erasure, false)
            .await
            .map(drop)
    }

    /// Writes every event but those of users erased through their version
    /// ([`ErasedUsers::kept`]): once an erasure's tombstones are purged nothing else would keep
    /// a replay of them out.
    async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        let _writing = self.erased.writing();
        let kept = self.erased.kept(self, events).await.map_err(|e| {
            // Reading the erasures failed: nothing is said of the rows, so never a row error.
            let e = match e {
                StoreError::Invalid(m) => StoreError::Schema(m),
                other => other,
            };
            WriteFailure::all(e, events.len())
        })?;
        let Some(kept) = kept else {
            return self.write_rows(events).await;
        };
        if let Some(counter) = self.erased_rows.get() {
            counter.inc_by((events.len() - kept.len()) as u64);
        }
        let rows: Vec<&Event> = kept.iter().map(|&i| events[i]).collect();
        self.write_rows(&rows).await.map_err(|mut f| {
            // Indices into what was sent, back to indices into `events`.
            f.unwritten = f.unwritten.iter().map(|&j| kept[j]).collect();
            f
        })
    }
}

impl ScyllaStore {
    /// Writes every event (see [`Store::write`]).
    async fn write_rows(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        let (plan, unplaced) = self.planned(events);
        if let Some(counter) = self.unplaced.get() {
            counter.inc_by(unplaced);
        }
        // The process-wide bound is the limiter in `send`; this one keeps a large batch from
        // queueing hundreds of request futures at once.
        let plan = &plan;
        let mut inflight = futures::stream::iter(0..plan.len())
            .map(|k| async move { (&plan[k], self.send(events, &plan[k]).await) })
            .buffer_unordered(self.per_batch_requests);
        let mut unwritten = Vec::new();
        let mut first_retryable: Option<StoreError> = None;
        let mut first_permanent: Option<StoreError> = None;
        let mut first_rejected: Option<StoreError> = None;
        let mut record = |rows: &[usize], err: StoreError| {
            unwritten.extend_from_slice(rows);
            let slot = if err.is_retryable() {
                &mut first_retryable
            } else if err.is_row_error() {
                &mut first_rejected
            } else {
                &mut first_permanent
            };
            slot.get_or_insert(err);
        };
        // Requests the database refuses as such (one bad row refuses its whole UNLOGGED batch).
        let mut rejected: Vec<usize> = Vec::new();
        while let Some((request, result)) = inflight.next().await {
            if let Err(e) = result {
                let err = classify(&e);
                let rows = request.rows();
                // Only a plain one-row request is the row's own refusal: another request may be
                // refused for any of its statements, an index entry included.
                if err.is_row_error() && (rows.len() > 1 || !matches!(request, Request::Rows(_))) {
                    rejected.extend_from_slice(rows);
                } else {
                    record(rows, err);
                }
            }
        }
        drop(inflight);
        // Each row of a refused request is tried alone, with its index entry, so only the rows
        // the database refuses on their own are reported as refused (and dead-lettered); the
        // others are stored.
        rejected.sort_unstable();
        rejected.dedup();
        let mut alone = futures::stream::iter(rejected)
            .map(|i| async move { (i, self.send_alone(events, i).await) })
            .buffer_unordered(self.per_batch_requests);
        while let Some((i, result)) = alone.next().await {
            if let Err(e) = result {
                record(&[i], classify(&e));
            }
        }
        drop(alone);
        if unwritten.is_empty() {
            return Ok(());
        }
        unwritten.sort_unstable();
        unwritten.dedup();
        // Mixed outcomes report the error that is not about the rows themselves: a transient
        // one (retried), else a permanent one such as a missing table (the partition stalls);
        // rows that are really rejected fail again alone and are reported as rejected only
        // when nothing else failed, so a valid row is never dead-lettered for another's sake.
        let error = first_retryable
            .or(first_permanent)
            .or(first_rejected)
            .expect("a failed request recorded its error");
        Err(WriteFailure { error, unwritten })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_set_has_one_key_in_any_order_and_each_set_its_own() {
        let [a, b, c] = [1u128, 2, 3].map(uuid::Uuid::from_u128);
        let key = |set: &[(uuid::Uuid, Shard)]| replica_key(set.iter().copied());
        assert_eq!(
            key(&[(a, 0), (b, 1), (c, 2)]),
            key(&[(c, 2), (a, 0), (b, 1)])
        );
        assert_ne!(
            key(&[(a, 0), (b, 1)]),
            key(&[(a, 0), (c, 1)]),
            "another node"
        );
        assert_ne!(
            key(&[(a, 0), (b, 1)]),
            key(&[(a, 1), (b, 1)]),
            "another shard"
        );
        assert_ne!(key(&[(a, 0), (b, 1)]), key(&[(a, 0)]), "a subset");
        assert_ne!(key(&[(a, 0)]), key(&[(a, 0), (a, 0)]));
        assert_eq!(key(&[]), None, "no replica known: the partition goes alone");
    }

    /// The size of the future `f` returns, without calling it.
    fn future_size<T>(_: impl Fn(&'static ScyllaStore) -> T) -> usize {
        std::mem::size_of::<T>()
    }

    /// A write's requests are futures moved through its `buffer_unordered` and into its task
    /// set: the driver's request future (several KB) is boxed inside them, so each of those moves
    /// copies a few hundred bytes, not the driver's whole state machine.
    #[test]
    fn a_request_in_flight_is_a_small_future() {
        static ROWS: Request = Request::Rows(Vec::new());
        let size = future_size(|s| s.send(&[], &ROWS));
        assert!(size <= 1024, "{size} bytes");
    }

    /// `n` events of `users` users (user `i % users`), on `days` days (day `i % days`), of
    /// ~150 bytes each, offsets `0..n`.
    fn events(users: usize, days: usize, n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                let json = format!(
                    r#"{{"user_id":"u{}","event_type":"click","occurred_at":"2025-11-{:02}T10:00:00Z","attributes":{{"i":{i}}}}}"#,
                    i % users,
                    1 + i % days,
                );
                let source = crate::event::Source {
                    topic: Arc::from("t"),
                    partition: 0,
                    offset: i as i64,
                    timestamp_ms: Some(1_764_000_000_000 + i as i64),
                };
                crate::event::decode(None, Some(json.as_bytes()), source, None, Default::default())
                    .unwrap()
            })
            .collect()
    }

    fn rows_of(plan: &[Request]) -> Vec<&Vec<usize>> {
        plan.iter()
            .filter_map(|r| match r {
                Request::Rows(rows) => Some(rows),
                Request::Index { .. } | Request::Partition { .. } => None,
            })
            .collect()
    }

    fn index_of(plan: &[Request]) -> Vec<(&Vec<IndexEntry>, &Vec<usize>)> {
        plan.iter()
            .filter_map(|r| match r {
                Request::Index { entries, covers } => Some((entries, covers)),
                Request::Rows(_) | Request::Partition { .. } => None,
            })
            .collect()
    }

    #[test]
    fn partitions_on_the_same_replicas_share_requests_and_others_do_not() {
        let evs = events(500, 1, 500);
        let refs: Vec<&Event> = evs.iter().collect();
        // Two replica sets: users with an even number, and the others.
        let parity = |e: &Event| {
            let k = e.user_id()[1..].parse::<u64>().unwrap() % 2;
            Shape::Grouped { rows: k, index: k }
        };
        let plan = plan(&refs, 100, 1 << 20, parity);
        let rows = rows_of(&plan);
        assert_eq!(
            rows.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [100, 100, 50, 100, 100, 50],
            "250 partitions per replica set, 100 rows a request"
        );
        for r in &rows {
            assert!(
                r.iter().all(|&i| i % 2 == r[0] % 2),
                "one replica set per request"
            );
        }
        let index = index_of(&plan);
        assert_eq!(index.len(), 6);
        for (entries, covers) in &index {
            assert_eq!(
                entries.len(),
                covers.len(),
                "one entry per day, one row each here"
            );
            assert!(entries.iter().all(|x| x.first % 2 == entries[0].first % 2));
        }
        let mut every: Vec<usize> = rows.into_iter().flatten().copied().collect();
        every.sort_unstable();
        assert_eq!(every, (0..500).collect::<Vec<_>>(), "every row once");
    }

    #[test]
    fn a_partition_keeps_its_rows_together_in_order_and_one_index_entry_at_its_newest_version() {
        // 3 users on 2 days: 6 partitions; all on one replica set.
        let evs = events(3, 2, 60);
        let refs: Vec<&Event> = evs.iter().collect();
        let plan = plan(&refs, 1000, 1 << 20, |_| Shape::Grouped {
            rows: 7,
            index: 7,
        });
        let rows = rows_of(&plan);
        assert_eq!(rows.len(), 1, "one request for all 60 rows");
        // Partitions in order of first appearance, each partition's rows in order.
        let mut expected = Vec::new();
        for p in 0..6 {
            expected.extend((0..60).filter(|i| i % 6 == p));
        }
        assert_eq!(*rows[0], expected);
        let index = index_of(&plan);
        assert_eq!(index.len(), 1);
        let (entries, covers) = index[0];
        assert_eq!(entries.len(), 6, "one entry per (user, day)");
        for x in entries.iter() {
            let newest = (0..60)
                .filter(|i| i % 6 == x.first % 6)
                .map(|i| version::of(&evs[i]))
                .max()
                .unwrap();
            assert_eq!(
                x.version, newest,
                "the entry's version covers every row of its day"
            );
        }
        assert_eq!(*covers, (0..60).collect::<Vec<_>>());
    }

    #[test]
    fn requests_are_cut_at_the_byte_cap_and_a_partition_alone_on_its_replicas_goes_by_partition() {
        // Two partitions on one replica set, 20 rows each: 4 requests of rows and one of both
        // entries, where by partition each would take 3 (9 rows and the entry a batch).
        let evs = events(2, 1, 40);
        let refs: Vec<&Event> = evs.iter().collect();
        let size = evs.iter().map(row_size).max().unwrap();
        let plan_capped = plan(&refs, 1000, 10 * size, |_| Shape::Grouped {
            rows: 0,
            index: 0,
        });
        assert!(rows_of(&plan_capped).iter().all(|r| r.len() <= 10));
        assert_eq!(rows_of(&plan_capped).len(), 4);
        assert_eq!(index_of(&plan_capped).len(), 1);
        assert_eq!(plan_by_partition(&refs, 1000, 10 * size).len(), 6);
        // A distinct key per partition (a large cluster): one request per partition, its entry
        // riding with its rows, as by partition; not one for its rows and one for its entry.
        let evs = events(20, 1, 40);
        let refs: Vec<&Event> = evs.iter().collect();
        let key = |e: &Event| {
            let k = e.user_id()[1..].parse::<u64>().unwrap();
            Shape::Grouped { rows: k, index: k }
        };
        let apart = plan(&refs, 1000, 1 << 20, key);
        assert_eq!(apart, plan_by_partition(&refs, 1000, 1 << 20));
        assert_eq!(partitions_of(&apart).len(), 20);
        // Users 0-9 on one replica set, 10-19 each alone: the ten share a request of their rows
        // and one of their entries, the others go by partition.
        let some = |e: &Event| {
            let k = e.user_id()[1..].parse::<u64>().unwrap();
            let k = if k < 10 { 99 } else { k };
            Shape::Grouped { rows: k, index: k }
        };
        let mixed = plan(&refs, 1000, 1 << 20, some);
        assert_eq!(mixed.len(), 2 + 10);
        let user = |i: usize| refs[i].user_id()[1..].parse::<u64>().unwrap();
        let shared = rows_of(&mixed);
        assert_eq!(shared.len(), 1);
        assert!(shared[0].len() == 20 && shared[0].iter().all(|&i| user(i) < 10));
        let index = index_of(&mixed);
        assert_eq!(index.len(), 1);
        assert_eq!(index[0].0.len(), 10, "one entry per partition that shares");
        let alone: Vec<_> = mixed
            .iter()
            .filter_map(|r| match r {
                Request::Partition { rows, .. } => Some(rows),
                _ => None,
            })
            .collect();
        assert_eq!(alone.len(), 10);
        assert!(alone
            .iter()
            .all(|r| r.len() == 2 && r.iter().all(|&i| user(i) >= 10)));
        // Pairs that share replicas for their rows but not for their entries: a request for
        // each pair's rows and one for each entry would be more than by partition, so they go
        // by partition.
        let pairs = |e: &Event| {
            let k = e.user_id()[1..].parse::<u64>().unwrap();
            Shape::Grouped {
                rows: k / 2,
                index: k,
            }
        };
        let paired = plan(&refs, 1000, 1 << 20, pairs);
        assert_eq!(paired, plan_by_partition(&refs, 1000, 1 << 20));
        // A tie goes by partition too: users 0-2 share replicas for their rows, and 0-1 for
        // their entries; grouped, a request of rows and two of entries, as many as by
        // partition.
        let evs = events(3, 1, 6);
        let refs: Vec<&Event> = evs.iter().collect();
        let tie = |e: &Event| {
            let k = e.user_id()[1..].parse::<u64>().unwrap();
            Shape::Grouped {
                rows: 0,
                index: k / 2,
            }
        };
        let tied = plan(&refs, 1000, 1 << 20, tie);
        assert_eq!(tied, plan_by_partition(&refs, 1000, 1 << 20));
        assert_eq!(tied.len(), 3);
    }

    /// The partition requests of a plan: each one's rows and index entry.
    fn partitions_of(plan: &[Request]) -> Vec<(&Vec<usize>, IndexEntry)> {
        plan.iter()
            .map(|r| match r {
                Request::Partition { rows, entry } => (rows, *entry),
                other => panic!("by partition, every request is one partition's: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn by_partition_each_partition_is_one_request_with_its_rows_in_order_and_its_index_entry() {
        // 3 users on 2 days: 6 partitions of 10 rows.
        let evs = events(3, 2, 60);
        let refs: Vec<&Event> = evs.iter().collect();
        let plan = plan_by_partition(&refs, 100, 1 << 20);
        let requests = partitions_of(&plan);
        assert_eq!(requests.len(), 6, "one request per (user, day)");
        for (p, (rows, entry)) in requests.iter().enumerate() {
            let expected: Vec<usize> = (0..60).filter(|i| i % 6 == p).collect();
            assert_eq!(**rows, expected, "partitions in order, their rows in order");
            assert_eq!(entry.first, rows[0], "the entry is its partition's");
            let newest = rows.iter().map(|&i| version::of(&evs[i])).max().unwrap();
            assert_eq!(
                entry.version, newest,
                "at the newest version among its rows"
            );
        }
    }

    #[test]
    fn a_partition_cut_in_several_requests_indexes_its_day_in_each_at_that_requests_newest_version()
    {
        // One partition of 40 rows, at most 10 rows, or about the bytes of 8 rows and an entry.
        let evs = events(1, 1, 40);
        let refs: Vec<&Event> = evs.iter().collect();
        let size = evs.iter().map(row_size).max().unwrap();
        let entry = evs[0].user_id().len() + 32;
        for (max_rows, max_bytes) in [(10, 1 << 20), (1000, 8 * size + entry)] {
            let plan = plan_by_partition(&refs, max_rows, max_bytes);
            let requests = partitions_of(&plan);
            assert!(requests.len() >= 4, "{} requests", requests.len());
            let mut every = Vec::new();
            for (rows, x) in &requests {
                let bytes: usize = rows.iter().map(|&i| row_size(&evs[i])).sum();
                assert!(rows.len() <= max_rows && bytes + entry <= max_bytes);
                assert_eq!(x.first, rows[0]);
                let newest = rows.iter().map(|&i| version::of(&evs[i])).max().unwrap();
                assert_eq!(
                    x.version, newest,
                    "each request's entry covers every row in it, so a request that lands alone \
                     leaves no row it holds without an entry at or above its version"
                );
                every.extend(rows.iter().copied());
            }
            assert_eq!(
                every,
                (0..40).collect::<Vec<_>>(),
                "every row once, in order"
            );
        }
    }

    #[test]
    fn a_row_too_large_to_share_a_batch_goes_alone_and_its_entry_apart() {
        let evs = events(2, 1, 6);
        let refs: Vec<&Event> = evs.iter().collect();
        // Room for the smaller rows with their entry, not for row 3 (of user u1, like 1 and 5).
        let small = [0, 1, 2, 4, 5].map(|i| row_size(&evs[i])).into_iter().max();
        let max_bytes = 3 * small.unwrap() + 40;
        let mut big = evs.clone();
        big[3] = {
            let json = format!(
                r#"{{"user_id":"u1","event_type":"click","occurred_at":"2025-11-01T10:00:00Z","attributes":{{"pad":"{}"}}}}"#,
                "x".repeat(max_bytes)
            );
            crate::event::decode(
                None,
                Some(json.as_bytes()),
                evs[3].source.clone(),
                None,
                Default::default(),
            )
            .unwrap()
        };
        let refs_big: Vec<&Event> = big.iter().collect();
        assert_eq!(
            plan_by_partition(&refs, 100, max_bytes).len(),
            2,
            "two users' rows fit"
        );
        let plan = plan_by_partition(&refs_big, 100, max_bytes);
        let version = version::of(&big[3]);
        assert_eq!(
            plan,
            [
                Request::Partition {
                    rows: vec![0, 2, 4],
                    entry: IndexEntry {
                        first: 0,
                        version: version::of(&big[4])
                    },
                },
                Request::Partition {
                    rows: vec![1],
                    entry: IndexEntry {
                        first: 1,
                        version: version::of(&big[1])
                    },
                },
                Request::Index {
                    entries: vec![IndexEntry { first: 3, version }],
                    covers: vec![3],
                },
                Request::Rows(vec![3]),
                Request::Partition {
                    rows: vec![5],
                    entry: IndexEntry {
                        first: 5,
                        version: version::of(&big[5])
                    },
                },
            ]
        );
    }

    #[test]
    fn on_tablets_the_first_partition_and_a_few_unplaced_ones_are_probes() {
        let known = Some((1, 2));
        // On vnodes: none; by partition, or grouped where placed.
        let mut vnodes = Probes::new(false);
        assert_eq!(vnodes.shape(known, false), Shape::Partition);
        assert_eq!(vnodes.shape(None, true), Shape::Partition);
        assert_eq!(
            vnodes.shape(known, true),
            Shape::Grouped { rows: 1, index: 2 }
        );
        // On tablets: the first partition, placed or not, then the next UNKNOWN unplaced ones.
        for by_replica in [false, true] {
            let mut tablets = Probes::new(true);
            assert_eq!(tablets.shape(known, by_replica), Shape::Probe);
            let placed = if by_replica {
                Shape::Grouped { rows: 1, index: 2 }
            } else {
                Shape::Partition
            };
            assert_eq!(tablets.shape(known, by_replica), placed);
            for _ in 0..Probes::UNKNOWN {
                assert_eq!(tablets.shape(None, by_replica), Shape::Probe);
                assert_eq!(tablets.shape(known, by_replica), placed);
            }
            assert_eq!(
                tablets.shape(None, by_replica),
                Shape::Partition,
                "enough for a write"
            );
        }
    }

    #[test]
    fn a_probe_sends_its_first_row_and_its_entry_alone_and_batches_the_rest() {
        // 4 users on 3 days: 12 partitions of 4 rows; user 1's are probes, the others grouped
        // on one replica set.
        let evs = events(4, 3, 48);
        let refs: Vec<&Event> = evs.iter().collect();
        let user = |i: usize| refs[i].user_id()[1..].parse::<u64>().unwrap();
        let plan = plan(&refs, 100, 1 << 20, |e| {
            if e.user_id() == "u1" {
                Shape::Probe
            } else {
                Shape::Grouped { rows: 7, index: 7 }
            }
        });
        let mut rows: Vec<usize> = plan
            .iter()
            .flat_map(|r| match r {
                Request::Rows(rs) | Request::Partition { rows: rs, .. } => rs.clone(),
                Request::Index { .. } => Vec::new(),
            })
            .collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..48).collect::<Vec<_>>(), "every row once");
        // The 3 probes: an entry covering its partition's 4 rows, the first row alone, the
        // other 3 in one batch.
        let probes: Vec<&Request> = plan
            .iter()
            .filter(|r| r.rows().iter().all(|&i| user(i) == 1))
            .collect();
        assert_eq!(probes.len(), 9);
        for chunk in probes.chunks(3) {
            let Request::Index { entries, covers } = chunk[0] else {
                panic!("{chunk:?}")
            };
            assert_eq!((entries.len(), covers.len()), (1, 4));
            assert_eq!(chunk[1], &Request::Rows(vec![covers[0]]));
            assert_eq!(chunk[2], &Request::Rows(covers[1..].to_vec()));
            let newest = covers.iter().map(|&i| version::of(refs[i])).max().unwrap();
            assert_eq!(entries[0].version, newest, "the entry covers every row");
        }
        // The 9 grouped partitions: one request of their 36 rows, one of their 9 entries.
        assert_eq!(plan.len(), 9 + 2);
    }

    #[test]
    fn deploy_schema_file_is_what_migrate_runs_for_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cql/schema.cql");
        let file = std::fs::read_to_string(&path).expect("deploy/cql/schema.cql exists");
        assert_eq!(
            file,
            schema_script(&ScyllaConfig::default()),
            "deploy/cql/schema.cql drifted from the code: regenerate it with `cargo run -- schema > deploy/cql/schema.cql`"
        );
    }

    #[test]
    fn network_topology_replication_lists_each_datacenter() {
        let mut c = ScyllaConfig {
            replication_strategy: "NetworkTopologyStrategy".into(),
            datacenters: [("dc1".to_owned(), 3), ("dc2".to_owned(), 2)].into(),
            ..ScyllaConfig::default()
        };
        assert!(
            keyspace_cql(&c).contains("{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}")
        );
        c.default_ttl = Duration::from_secs(86_400);
        assert!(table_cql(&c).contains("default_time_to_live = 86400"));
    }
}
