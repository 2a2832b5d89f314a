//! The ScyllaDB store: the real `scylla` driver against the CQL stand-in node (or a real
//! ScyllaDB with VAULT_IT_SCYLLA_NODES=host:port for the opt-in test).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scylla::frame::response::result::TableSpec;
use scylla::value::{CqlDate, CqlTimestamp};
use tokio_util::sync::CancellationToken;
use vault::config::{InvalidPolicy, ScyllaConfig};
use vault::event::{self, Event, Source};
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::pipeline::batch::{Batch, BatchOutcome, Record};
use vault::pipeline::flush::FlushReason;
use vault::store::persister::Persister;
use vault::store::scylla::{token as scylla_token, ScyllaStore};
use vault::store::{version, Store};
use vault::telemetry::{Health, Metrics};
use vault_sandbox::cql::frame::Opcode;
use vault_sandbox::cql::{CqlCluster, CqlNode, CqlOptions, Fault, FaultKind, LoggedRequest};

use crate::common::{self_signed, unique, wait_until};

async fn node() -> CqlNode {
    CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("CQL stand-in starts")
}

fn scylla_config(nodes: &str) -> ScyllaConfig {
    ScyllaConfig {
        nodes: vec![nodes.to_owned()],
        keyspace: unique("it").replace('-', "_"),
        ..ScyllaConfig::default()
    }
}

/// `n` events of `users` users, all on one day, from Kafka partition 0 offsets `first..`.
fn events(users: usize, n: usize, first: i64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let json = format!(
                r#"{{"user_id":"user-{}","event_type":"click","occurred_at":"2025-11-24T10:{:02}:{:02}.{:03}Z","attributes":{{"i":{i}}}}}"#,
                i % users,
                (i / 60) % 60,
                i % 60,
                i % 1000
            );
            let source = Source {
                topic: Arc::from("activity"),
                partition: 0,
                offset: first + i as i64,
                timestamp_ms: Some(1_764_000_000_000),
            };
            event::decode(Some(b"k"), Some(json.as_bytes()), source, None, event::Limits::default()).expect("valid test event")
        })
        .collect()
}

type Row = (
    String,
    CqlDate,
    CqlTimestamp,
    uuid::Uuid,
    String,
    Option<String>,
    Vec<u8>,
    String,
    i32,
    i64,
    Option<CqlTimestamp>,
    Option<i64>,
);

async fn read_user(store: &ScyllaStore, ks: &str, user: &str, day: i64) -> Vec<Row> {
    let q = format!(
        "SELECT user_id, day, occurred_at, event_id, event_type, attributes, payload, source_topic, source_partition, source_offset, kafka_timestamp, writetime(attributes) \
         FROM {ks}.user_activity WHERE user_id = ? AND day = ?"
    );
    store
        .session()
        .query_unpaged(q, (user, CqlDate(((1i64 << 31) + day) as u32)))
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows")
        .rows::<Row>()
        .expect("typed rows")
        .collect::<Result<_, _>>()
        .expect("decode")
}

async fn round_trip(c: &ScyllaConfig) {
    let store = ScyllaStore::connect(c, true)
        .await
        .expect("connect and migrate");
    let batch = events(2, 6, 100);
    let refs: Vec<&Event> = batch.iter().collect();
    store.write(&refs).await.expect("write");
    store.write(&refs).await.expect("replay");
    let day = batch[0].day();
    let rows = read_user(&store, &c.keyspace, "user-0", day).await;
    assert_eq!(
        rows.len(),
        3,
        "replaying the batch leaves one row per event"
    );
    // Newest first, every column as written.
    let e = &batch[4];
    let r = &rows[0];
    assert_eq!(r.0, e.user_id());
    assert_eq!(r.1, CqlDate(((1i64 << 31) + day) as u32));
    assert_eq!(r.2, CqlTimestamp(e.occurred_at_ms));
    assert_eq!(r.3, e.event_id);
    assert_eq!(r.4, e.event_type());
    assert_eq!(r.5.as_deref(), e.attributes());
    assert_eq!(r.6, e.payload());
    assert_eq!((r.7.as_str(), r.8, r.9), ("activity", 0, 104));
    assert_eq!(
        r.10,
        Some(CqlTimestamp(1_764_000_000_000)),
        "the Kafka timestamp"
    );
    assert_eq!(
        r.11,
        Some(version::write_timestamp(1_764_000_000_000, 104)),
        "written at the row's version"
    );
}

/// An original and its correction (same event) whose writes land in the wrong order, as when the
/// original's write times out and its retry lands last: the stored row is the correction.
async fn original_and_correction(c: &ScyllaConfig) {
    let store = ScyllaStore::connect(c, true)
        .await
        .expect("connect and migrate");
    let event = |offset: i64, what: &str| {
        let json = format!(
            r#"{{"event_id":"6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01","user_id":"u","event_type":"click","occurred_at":"2025-11-24T10:00:00Z","attributes":{{"v":"{what}"}}}}"#
        );
        let source = Source {
            topic: Arc::from("activity"),
            partition: 0,
            offset,
            // Both in the same millisecond: the offset breaks the tie.
            timestamp_ms: Some(1_764_000_000_000),
        };
        event::decode(
            None,
            Some(json.as_bytes()),
            source,
            None,
            event::Limits::default(),
        )
        .expect("valid")
    };
    let (original, correction) = (event(100, "original"), event(150, "correction"));
    store.write(&[&correction]).await.expect("correction");
    store
        .write(&[&original])
        .await
        .expect("the original's retry, last");
    let rows = read_user(&store, &c.keyspace, "u", original.day()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].5.as_deref(), Some(r#"{"v":"correction"}"#));
    assert_eq!(rows[0].9, 150);
    assert_eq!(rows[0].11, Some(version::of(&correction)));
    // A replay of both, in any order, changes no cell and no write timestamp.
    store
        .write(&[&original, &correction])
        .await
        .expect("replay");
    assert_eq!(
        read_user(&store, &c.keyspace, "u", original.day()).await,
        rows
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_wins_over_its_original_whatever_order_the_writes_land_in() {
    let node = node().await;
    original_and_correction(&scylla_config(&node.addr().to_string())).await;
}

/// A keyspace created by the first release's schema (with `ingested_at`, without
/// `kafka_timestamp`) and holding data is migrated in place: old rows stay, new ones are written,
/// and the old rows' days are indexed, also when the first migration was interrupted there.
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "injects failpoints: run with --features vault/failpoints, as make test does"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_brings_the_first_schema_forward_without_losing_data() {
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let ks = &c.keyspace;
    let session = vault::store::scylla::connect(&c).await.expect("session");
    for cql in [
        vault::store::scylla::keyspace_cql(&c),
        format!(
            "CREATE TABLE {ks}.user_activity (user_id text, day date, occurred_at timestamp, \
             event_id uuid, event_type text, attributes text, payload blob, source_topic text, \
             source_partition int, source_offset bigint, ingested_at timestamp, \
             PRIMARY KEY ((user_id, day), occurred_at, event_id)) \
             WITH CLUSTERING ORDER BY (occurred_at DESC, event_id ASC)"
        ),
        format!(
            "INSERT INTO {ks}.user_activity (user_id, day, occurred_at, event_id, event_type, \
             attributes, payload, source_topic, source_partition, source_offset, ingested_at) \
             VALUES ('user-0', '2025-11-23', '2025-11-23 09:00:00+0000', \
             6f1c3a52-5a0e-4b7e-9d61-1d2b6c1a9e01, 'old', '{{}}', 0x7b7d, 'activity', 0, 1, \
             '2025-11-24 09:00:01+0000')"
        ),
    ] {
        session
            .query_unpaged(cql, &[])
            .await
            .expect("the first schema");
    }
    drop(session);
    // The upgrade is interrupted in the middle of filling the day index (a pod evicted): the
    // column is in place, the index is not filled. Every later migration fills it, until done.
    fail::cfg("store::reindex", &format!("return({ks})")).unwrap();
    let interrupted = ScyllaStore::connect(&c, true).await;
    fail::remove("store::reindex");
    assert!(interrupted.is_err(), "the failpoint fired");
    // Until the fill has run through, an erasure would miss the old rows' days: refused.
    let early = ScyllaStore::connect(&c, false).await.expect("connect");
    let err = vault::store::erasure::forget(
        &early,
        &vault::store::erasure::Erasure {
            user_id: "user-0".into(),
            through_ms: chrono::Utc::now().timestamp_millis(),
            requested_by: "test".into(),
            requested_at_ms: chrono::Utc::now().timestamp_millis(),
        },
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("run `vault migrate`"), "{err}");
    drop(early);
    for _ in 0..2 {
        // Idempotent: a second migration finds the column in place and the index filled.
        drop(ScyllaStore::connect(&c, true).await.expect("migrate"));
    }
    let store = ScyllaStore::connect(&c, false).await.expect("connect");
    let batch = events(1, 2, 100);
    let refs: Vec<&Event> = batch.iter().collect();
    store.write(&refs).await.expect("write after migration");
    let rows = read_user(&store, ks, "user-0", batch[0].day()).await;
    assert_eq!(rows.len(), 2, "the two new rows");
    let old_day = batch[0].day() - 1;
    let old = read_user(&store, ks, "user-0", old_day).await;
    assert!(
        old.iter().any(|r| r.4 == "old" && r.9 == 1),
        "old data kept"
    );
    assert!(rows
        .iter()
        .filter(|r| r.4 == "click")
        .all(|r| r.10 == Some(CqlTimestamp(1_764_000_000_000))));
    // The migration put the old row's day in the index: an erasure finds and removes it too.
    let erasure = vault::store::erasure::Erasure {
        user_id: "user-0".into(),
        through_ms: chrono::Utc::now().timestamp_millis(),
        requested_by: "test".into(),
        requested_at_ms: chrono::Utc::now().timestamp_millis(),
    };
    let report = vault::store::erasure::forget(&store, &erasure, false)
        .await
        .expect("erase");
    assert_eq!(report.days, [batch[0].day(), old_day], "newest first");
    assert!(read_user(&store, ks, "user-0", batch[0].day())
        .await
        .is_empty());
    assert!(read_user(&store, ks, "user-0", old_day).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_round_trips_and_a_replay_leaves_one_row_per_event() {
    let node = node().await;
    round_trip(&scylla_config(&node.addr().to_string())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_real_scylladb_when_configured() {
    match std::env::var("VAULT_IT_SCYLLA_NODES") {
        Ok(nodes) if !nodes.is_empty() => round_trip(&scylla_config(&nodes)).await,
        _ => println!("skipped: set VAULT_IT_SCYLLA_NODES=host:port to run the store tests against a real ScyllaDB"),
    }
}

/// By partition (`scylla.batch_by_replica = false`) a batch holds one partition's rows and,
/// last, its day-index entry: 500 users with 3 rows each on one day cost 500 batches of 3 rows
/// and an entry, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_500_users_costs_one_request_per_partition_by_partition() {
    let node = node().await;
    let c = ScyllaConfig {
        batch_by_replica: false,
        ..scylla_config(&node.addr().to_string())
    };
    let (rows, index) = requests_for_500_users(&node, &c).await;
    assert_eq!(
        rows, [4; 500],
        "one UNLOGGED batch per (user_id, day): its 3 rows and its day-index entry"
    );
    assert!(index.is_empty(), "no request of index entries alone");
}

/// By default (`scylla.batch_by_replica`), one node owns every token, so the rows of 500 users
/// share their requests: 1,500 rows in batches of `max_batch_rows` (100), and their 500
/// day-index entries likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_500_users_on_one_replica_set_costs_one_request_per_100_rows() {
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    assert!(c.batch_by_replica, "the default");
    let (rows, index) = requests_for_500_users(&node, &c).await;
    assert_eq!(rows, [100; 15], "15 UNLOGGED batches of 100 rows");
    assert_eq!(
        index, [100; 5],
        "and 5 of 100 entries to the users' index of days"
    );
    // The planner's tokens are the driver's.
    let store = ScyllaStore::connect(&c, false).await.unwrap();
    let cluster = store.session().get_cluster_state();
    for e in &events(500, 20, 0) {
        let day = vault::store::scylla::cql_day(e.day());
        assert_eq!(
            vault::store::scylla::token(&[e.user_id().as_bytes(), &day.0.to_be_bytes()]),
            cluster
                .compute_token(&c.keyspace, "user_activity", &(e.user_id(), day))
                .unwrap()
        );
        assert_eq!(
            vault::store::scylla::token(&[e.user_id().as_bytes()]),
            cluster
                .compute_token(&c.keyspace, "user_days", &(e.user_id(),))
                .unwrap()
        );
    }
}

/// On three nodes (RF 1, then 2), each request goes to a replica of its partitions: by
/// partition the driver routes a partition's batch by its first row, to one of the partition's
/// replicas, which forwards the day-index entry riding with it; by replica (the default), every
/// partition in a batch lives on the node it is sent to, index entries included, and the 500
/// users' rows share a few requests per replica set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_nodes_every_request_goes_to_a_replica_of_its_rows() {
    let cluster = CqlCluster::start(3)
        .await
        .expect("CQL stand-in cluster starts");
    for (rf, by_replica) in [(1, false), (1, true), (2, false), (2, true)] {
        let c = ScyllaConfig {
            nodes: vec![cluster.addrs()[0].to_string()],
            replication_factor: rf,
            batch_by_replica: by_replica,
            ..scylla_config("")
        };
        let case = format!("RF {rf}, batch_by_replica {by_replica}");
        let store = ScyllaStore::connect(&c, true).await.unwrap();
        let batch = events(500, 1500, 0);
        let refs: Vec<&Event> = batch.iter().collect();
        cluster.clear_requests();
        store.write(&refs).await.unwrap();
        assert_eq!(
            cluster.row_count(&c.keyspace, "user_activity"),
            1500,
            "{case}"
        );
        assert_eq!(cluster.row_count(&c.keyspace, "user_days"), 500, "{case}");

        let requests = cluster.requests();
        let table = |name: &str| format!("{}.{name}", c.keyspace);
        let (rows, index) = (table("user_activity"), table("user_days"));
        let writing = |t: &str| -> Vec<_> {
            requests
                .iter()
                .filter(|r| r.tables.iter().any(|(name, _)| name == t))
                .collect()
        };
        let off_replica = |t: &str| -> usize {
            writing(t)
                .iter()
                .flat_map(|r| &r.non_replica)
                .filter(|(name, _)| name == t)
                .map(|(_, n)| n)
                .sum()
        };
        // Every statement was placed by the stand-in (none skipped as unreadable): 1,500 rows
        // and 500 index entries.
        let placed: usize = requests.iter().map(|r| r.writes).sum();
        assert_eq!(placed, 2000, "{case}: statements the stand-in placed");
        assert_eq!(
            off_replica(&rows),
            0,
            "{case}: rows sent to a node that holds them"
        );
        let nodes: BTreeSet<usize> = writing(&rows).iter().map(|r| r.node).collect();
        assert_eq!(nodes.len(), 3, "{case}: the rows spread over every node");
        if by_replica {
            assert_eq!(
                off_replica(&index),
                0,
                "{case}: index entries grouped likewise"
            );
            // RF 1: three replica sets; RF 2: at most three pairs. Each set's rows are cut
            // into requests of at most 100, so 1,500 rows take at most 15 + 3.
            let requests = writing(&rows).len();
            assert!((15..=18).contains(&requests), "{case}: {requests} requests");
        } else {
            assert_eq!(
                writing(&rows).len(),
                500,
                "{case}: one request per partition"
            );
        }
    }
}

/// A tablet keyspace on `cluster` (NetworkTopologyStrategy at `rf`, 8 tablets a table: ScyllaDB
/// refuses tablets with SimpleStrategy) and a store on it.
async fn tablet_store(
    cluster: &CqlCluster,
    rf: u32,
    by_replica: bool,
) -> (ScyllaConfig, ScyllaStore) {
    let c = ScyllaConfig {
        nodes: vec![cluster.addrs()[0].to_string()],
        replication_strategy: "NetworkTopologyStrategy".into(),
        datacenters: [("datacenter1".to_owned(), rf)].into(),
        batch_by_replica: by_replica,
        ..scylla_config("")
    };
    cluster
        .execute(&format!(
            "CREATE KEYSPACE {} WITH replication = {{'class': 'NetworkTopologyStrategy', \
             'datacenter1': {rf}}} AND tablets = {{'enabled': true, 'initial': 8}}",
            c.keyspace
        ))
        .expect("tablet keyspace");
    let store = ScyllaStore::connect(&c, true).await.unwrap();
    store.session().refresh_metadata().await.unwrap();
    let tablet_based = store
        .session()
        .get_cluster_state()
        .get_keyspace(&c.keyspace)
        .map(|ks| ks.tablet_based);
    assert_eq!(tablet_based, Some(true), "the driver sees tablets");
    (c, store)
}

/// Writes 1,500 events of 500 users (3 a partition), from offset `first`.
async fn write_500_users(store: &ScyllaStore, first: i64) {
    let batch = events(500, 1500, first);
    let refs: Vec<&Event> = batch.iter().collect();
    store.write(&refs).await.unwrap();
}

/// Probes in the plan of a write of 500 users (3 rows a partition): a probe sends its
/// partition's first row alone (rows 0-499 are the partitions' first rows). A batch of rows
/// grouped by replica may also hold one row, the last of its group (a group of 167 partitions
/// is 501 rows, cut at 100), but never a partition's first.
fn probes_planned(store: &ScyllaStore) -> usize {
    let batch = events(500, 1500, 0);
    let refs: Vec<&Event> = batch.iter().collect();
    store
        .plan(&refs)
        .iter()
        .filter(|r| matches!(r, vault::store::scylla::Request::Rows(rows) if rows.len() == 1 && rows[0] < 500))
        .count()
}

/// Writes until the driver has learned every tablet the writes touch: until a write's only
/// probe is its first partition. Returns the writes it took; the offsets used end at
/// `1500 * writes`.
async fn teach(store: &ScyllaStore, case: &str) -> i64 {
    for writes in 1..=100 {
        write_500_users(store, 1500 * (writes - 1)).await;
        if probes_planned(store) == 1 {
            return writes;
        }
    }
    panic!("{case}: the driver did not learn the tablets in 100 writes");
}

/// Statements to `table` that the nodes serving them hold no replica of, in the request log.
fn off_replica(cluster: &CqlCluster, table: &str) -> usize {
    cluster
        .requests()
        .iter()
        .flat_map(|r| &r.non_replica)
        .filter(|(name, _)| name == table)
        .map(|(_, n)| n)
        .sum()
}

/// On tablets (ScyllaDB's default for new keyspaces) the driver learns where a tablet lives
/// only from the answer to a plain EXECUTE served by a node that is not its replica. A few
/// partitions of each write are probes (first row and entry alone, as EXECUTEs); the others
/// are batched as on vnodes. Once the driver has learned the tablets, every row goes to a
/// replica of its partition, in one request per partition by partition and a few by replica,
/// and only each write's first partition is a probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_tablets_probes_teach_the_driver_and_then_every_row_goes_to_a_replica() {
    let cluster = CqlCluster::start(3)
        .await
        .expect("CQL stand-in cluster starts");
    for (rf, by_replica) in [(1, false), (1, true), (2, false), (2, true)] {
        let case = format!("tablets, RF {rf}, batch_by_replica {by_replica}");
        let (c, store) = tablet_store(&cluster, rf, by_replica).await;
        let table = |name: &str| format!("{}.{name}", c.keyspace);
        let (rows, index) = (table("user_activity"), table("user_days"));

        // The first write knows no tablet: probes, and batches by partition.
        cluster.clear_requests();
        write_500_users(&store, 0).await;
        let requests = cluster.requests();
        let to_rows = |r: &&LoggedRequest| r.tables.iter().any(|(name, _)| *name == rows);
        let lone = requests
            .iter()
            .filter(to_rows)
            .filter(|r| r.rows == 1)
            .count();
        assert_eq!(lone, 4, "{case}: the first write's probes");
        assert_eq!(
            requests.iter().filter(to_rows).count(),
            496 + 2 * 4,
            "{case}: one request per partition, two per probe"
        );

        let writes = teach(&store, &case).await;
        let metrics = Metrics::new();
        store.report_to(&metrics);
        cluster.clear_requests();
        write_500_users(&store, 1500 * writes).await;
        assert_eq!(
            metrics.write_unplaced_partitions.get(),
            0,
            "{case}: all placed"
        );
        let users = cluster.row_count(&c.keyspace, "user_activity");
        assert_eq!(users, 1500 * (writes as usize + 1), "{case}");
        assert_eq!(cluster.row_count(&c.keyspace, "user_days"), 500, "{case}");
        let requests = cluster.requests();
        let placed: usize = requests.iter().map(|r| r.writes).sum();
        assert_eq!(placed, 2000, "{case}: statements the stand-in placed");
        assert_eq!(
            off_replica(&cluster, &rows),
            0,
            "{case}: rows sent to a node that holds them"
        );
        let writing: Vec<_> = requests
            .iter()
            .filter(|r| r.tables.iter().any(|(n, _)| *n == rows))
            .collect();
        let nodes: BTreeSet<usize> = writing.iter().map(|r| r.node).collect();
        assert_eq!(nodes.len(), 3, "{case}: the rows spread over every node");
        let lone = writing.iter().filter(|r| r.rows == 1).count();
        assert_eq!(lone, 1, "{case}: the first partition's probe alone");
        if by_replica {
            assert_eq!(
                off_replica(&cluster, &index),
                0,
                "{case}: index entries grouped likewise"
            );
            // Three replica sets (RF 1: a node; RF 2: a pair): 1,497 rows in requests of at
            // most 100, and the probe's 2.
            assert!(
                (17..=20).contains(&writing.len()),
                "{case}: {} requests",
                writing.len()
            );
        } else {
            assert_eq!(
                writing.len(),
                499 + 2,
                "{case}: one request per partition, and the probe's two"
            );
        }
    }
}

/// On a ScyllaDB that gives new keyspaces tablets (`tablets_mode_for_new_keyspaces: enabled`,
/// its recent releases' default), `vault migrate` with the default replication
/// (NetworkTopologyStrategy, `replication_factor` in every datacenter) creates a keyspace with
/// tablets, and vault's writes teach the driver where they live, then go to replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tablets_by_default_the_default_keyspace_has_tablets_and_writes_reach_replicas() {
    let options = CqlOptions {
        tablets_by_default: true,
        ..CqlOptions::default()
    };
    let cluster = CqlCluster::start_with(3, options)
        .await
        .expect("CQL stand-in cluster starts");
    let c = ScyllaConfig {
        nodes: vec![cluster.addrs()[0].to_string()],
        ..scylla_config("")
    };
    assert_eq!(
        c.replication_strategy, "NetworkTopologyStrategy",
        "the default"
    );
    let store = ScyllaStore::connect(&c, true).await.unwrap();
    store.session().refresh_metadata().await.unwrap();
    let state = store.session().get_cluster_state();
    let ks = state.get_keyspace(&c.keyspace).expect("migrated");
    assert!(ks.tablet_based, "the default keyspace has tablets");
    let teaching = teach(&store, "tablets by default").await;
    cluster.clear_requests();
    write_500_users(&store, 1500 * teaching).await;
    let rows = format!("{}.user_activity", c.keyspace);
    assert_eq!(off_replica(&cluster, &rows), 0, "every row to its replica");
    let requests = cluster.requests();
    let written: usize = requests.iter().map(|r| r.writes).sum();
    assert_eq!(written, 2000, "1,500 rows and 500 entries");
    let to_rows: Vec<_> = requests
        .iter()
        .filter(|r| r.tables.iter().any(|(name, _)| *name == rows))
        .collect();
    // By replica (the default): three replica sets (RF 1 on three nodes), 1,497 rows in
    // requests of at most 100, and the probe's two.
    assert!(
        (17..=20).contains(&to_rows.len()),
        "{} requests",
        to_rows.len()
    );
    let index = format!("{}.user_days", c.keyspace);
    assert_eq!(
        off_replica(&cluster, &index),
        0,
        "every entry to its replica"
    );
}

/// Where every node is a replica of everything (as many nodes as the replication factor, one
/// shard each), no answer ever carries a tablet: the driver never learns one. Nothing is lost
/// by that, as any node it picks holds every partition: writes go by partition, with a few
/// probes each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_tablets_a_driver_that_never_learns_them_still_batches_by_partition() {
    let cluster = CqlCluster::start(3)
        .await
        .expect("CQL stand-in cluster starts");
    for by_replica in [false, true] {
        let case = format!("RF 3 on 3 nodes, batch_by_replica {by_replica}");
        let (c, store) = tablet_store(&cluster, 3, by_replica).await;
        let rows = format!("{}.user_activity", c.keyspace);
        let metrics = Metrics::new();
        store.report_to(&metrics);
        for write in 0..3 {
            cluster.clear_requests();
            write_500_users(&store, 1500 * write).await;
            let requests = cluster.requests();
            let writing = requests
                .iter()
                .filter(|r| r.tables.iter().any(|(n, _)| *n == rows))
                .count();
            assert_eq!(writing, 496 + 2 * 4, "{case}, write {write}");
            assert_eq!(off_replica(&cluster, &rows), 0, "{case}");
        }
        assert_eq!(probes_planned(&store), 4, "{case}: still nothing learned");
        assert_eq!(
            metrics.write_unplaced_partitions.get(),
            3 * 500,
            "{case}: every partition of the three writes unplaced"
        );
        assert_eq!(
            cluster.row_count(&c.keyspace, "user_activity"),
            4500,
            "{case}"
        );
    }
}

/// ScyllaDB moves tablets (load balancing, nodes joining and leaving). A driver that learned a
/// tablet before the move keeps routing to its old replicas, and learns the move only from the
/// answer to a plain EXECUTE (a batch teaches it nothing): each write's first partition is a
/// probe, so the next write after a move teaches the driver, and the one after it sends every
/// row to a replica again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_tablets_a_moved_tablet_is_learned_again_from_a_writes_probe() {
    let cluster = CqlCluster::start(3)
        .await
        .expect("CQL stand-in cluster starts");
    for by_replica in [false, true] {
        let case = format!("batch_by_replica {by_replica}");
        let (c, store) = tablet_store(&cluster, 1, by_replica).await;
        let rows = format!("{}.user_activity", c.keyspace);
        // Every write's first event is user-0's, on 2025-11-24: the probe's partition.
        let day = chrono::NaiveDate::from_ymd_opt(2025, 11, 24).unwrap();
        let days = day
            .signed_duration_since(chrono::NaiveDate::default())
            .num_days();
        let day = (u32::try_from(days).unwrap() + (1 << 31)).to_be_bytes();
        let key: [&[u8]; 2] = [b"user-0", &day];
        // Where the driver routes that partition now: node indexes.
        let routed = || {
            let state = store.session().get_cluster_state();
            let ks = state.get_keyspace(&c.keyspace).unwrap();
            let table = TableSpec::borrowed(&c.keyspace, "user_activity");
            let ids = cluster.host_ids();
            state
                .replica_locator()
                .replicas_for_token(scylla_token(&key), &ks.strategy, None, &table)
                .into_iter()
                .map(|(node, _)| ids.iter().position(|x| *x == node.host_id).unwrap())
                .collect::<Vec<usize>>()
        };
        let writes = teach(&store, &case).await;
        let home = cluster.tablet(&c.keyspace, &key).unwrap().replicas;
        assert_eq!(routed(), home, "{case}: learned");
        let to = vec![(home[0] + 1) % 3];
        cluster.move_tablet(&c.keyspace, &key, to.clone()).unwrap();

        // The next write: the moved tablet's partitions still go to the old node; its probe
        // teaches the driver the move.
        cluster.clear_requests();
        write_500_users(&store, 1500 * writes).await;
        assert!(
            off_replica(&cluster, &rows) > 0,
            "{case}: rows of the moved tablet sent to its old node"
        );
        wait_until(
            &format!("{case}: the driver learns the move"),
            Duration::from_secs(10),
            || {
                let now = routed();
                let to = to.clone();
                async move { (now == to).then_some(()).ok_or(format!("{now:?}")) }
            },
        )
        .await;

        // And the one after it sends every row to a replica.
        cluster.clear_requests();
        write_500_users(&store, 1500 * (writes + 1)).await;
        assert_eq!(
            off_replica(&cluster, &rows),
            0,
            "{case}: every row to its replica"
        );
    }
}

/// Writes 1,500 events of 500 users (one day) and returns the statements in each request to
/// the table and to the day index, index requests first as they are sent.
async fn requests_for_500_users(node: &CqlNode, c: &ScyllaConfig) -> (Vec<usize>, Vec<usize>) {
    let store = ScyllaStore::connect(c, true).await.unwrap();
    let batch = events(500, 1500, 0);
    let refs: Vec<&Event> = batch.iter().collect();
    node.clear_requests();
    store.write(&refs).await.unwrap();
    let requests = node.requests();
    let writes = |table: &str| -> Vec<usize> {
        requests
            .iter()
            .filter(|r| {
                matches!(r.opcode, "BATCH" | "EXECUTE")
                    && r.statement
                        .contains(&format!("INSERT INTO {}.{table}", c.keyspace))
            })
            .map(|r| r.rows)
            .collect()
    };
    // Every write, batched or alone, at the configured consistency.
    let inserts: Vec<_> = requests
        .iter()
        .filter(|r| matches!(r.opcode, "BATCH" | "EXECUTE") && r.statement.contains("INSERT INTO"))
        .collect();
    assert!(!inserts.is_empty());
    assert!(inserts
        .iter()
        .all(|r| r.consistency == Some("LOCAL_QUORUM")));
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), 1500);
    assert_eq!(node.row_count(&c.keyspace, "user_days"), 500);
    (writes("user_activity"), writes("user_days"))
}

/// A persister of `store` that dead-letters invalid rows into `dead_letters` and retries after
/// 5 to 20 ms.
fn persister_of(
    store: ScyllaStore,
    dead_letters: MemoryDeadLetters,
) -> Persister<ScyllaStore, MemoryDeadLetters> {
    Persister {
        retention: Default::default(),
        store,
        dead_letters,
        on_invalid: InvalidPolicy::DeadLetter,
        retry: vault::config::RetrySettings {
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
        rate: Default::default(),
        metrics: Arc::new(Metrics::new()),
        health: Arc::new(Health::new(Duration::from_secs(60))),
        cancel: CancellationToken::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_and_the_batch_is_durable_only_after_success() {
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.unwrap();
    let persister = persister_of(store, MemoryDeadLetters::default());
    let evs = events(4, 40, 0);
    let (batch, _ack) = Batch::new(
        evs.into_iter().map(Record::Event).collect(),
        0,
        0,
        FlushReason::Size,
    );
    for kind in [
        FaultKind::WriteTimeout,
        FaultKind::Overloaded,
        FaultKind::Unavailable,
    ] {
        node.inject(
            Fault::new(kind)
                .on(&[Opcode::Batch])
                .matching("user_activity")
                .times(4),
        );
    }
    let outcome = persister.persist(&batch).await;
    assert_eq!(outcome, BatchOutcome::Durable);
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), 40);
    let to_rows = |node: &CqlNode| {
        node.requests()
            .iter()
            .filter(|r| r.opcode == "BATCH" && r.statement.contains("user_activity"))
            .count()
    };
    let sent = to_rows(&node);
    // The same write again, without faults: what a write that fails nothing sends.
    node.clear_requests();
    assert_eq!(persister.persist(&batch).await, BatchOutcome::Durable);
    let failed_attempts = sent - to_rows(&node);
    assert!(
        failed_attempts >= 12,
        "every injected fault was hit ({failed_attempts} failed attempts)"
    );
}

/// One bad row makes the database refuse its whole UNLOGGED batch: by replica (one node, so the
/// 4 users' 40 rows share a batch) and by partition (a batch of 10 rows per user), the rows of
/// the refused batch are sent again one by one, and only the row refused alone is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_dead_lettered_alone_and_the_rest_of_its_group_stored() {
    let node = node().await;
    // The node refuses the row of offset 7 (its attributes), and with it its whole batch.
    node.reject_values_containing(br#"{"i":7}"#);
    for by_replica in [true, false] {
        let case = format!("batch_by_replica {by_replica}");
        let c = ScyllaConfig {
            batch_by_replica: by_replica,
            ..scylla_config(&node.addr().to_string())
        };
        let store = ScyllaStore::connect(&c, true).await.unwrap();
        let dead_letters = MemoryDeadLetters::default();
        let persister = persister_of(store, dead_letters.clone());
        let evs = events(4, 40, 0);
        let (batch, _ack) = Batch::new(
            evs.into_iter().map(Record::Event).collect(),
            0,
            0,
            FlushReason::Size,
        );
        node.clear_requests();
        assert_eq!(persister.persist(&batch).await, BatchOutcome::Durable);
        assert_eq!(
            node.row_count(&c.keyspace, "user_activity"),
            39,
            "{case}: every row but the refused one is stored"
        );
        // The refused batch's rows, each sent again alone: all 40 rows by replica, user-3's
        // 10 by partition.
        let alone = node
            .requests()
            .iter()
            .filter(|r| r.opcode == "EXECUTE" && r.statement.contains("user_activity"))
            .count();
        assert_eq!(alone, if by_replica { 40 } else { 10 }, "{case}");
        let letters = dead_letters.letters();
        let offsets: Vec<i64> = letters.iter().map(|d| d.source.offset).collect();
        assert_eq!(
            offsets,
            vec![7],
            "{case}: only the refused row is dead-lettered"
        );
        assert!(
            letters[0]
                .error
                .to_string()
                .contains("refused by the stand-in"),
            "{case}: the letter carries the database's reason: {}",
            letters[0].error
        );
    }
}

/// A row the database refuses, in a write that also fails for a reason that is not about its
/// rows (here the day index is missing): the failure is reported as the latter, so the
/// partition stalls and no valid row is dead-lettered with the refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_beside_a_schema_error_is_not_reported_as_refused() {
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.unwrap();
    node.reject_values_containing(br#"{"i":7}"#);
    node.execute(&format!("DROP TABLE {}.user_days", c.keyspace))
        .unwrap();
    let evs = events(4, 40, 0);
    let refs: Vec<&Event> = evs.iter().collect();
    let failure = store.write(&refs).await.expect_err("the index is gone");
    assert!(
        !failure.error.is_row_error() && !failure.error.is_retryable(),
        "{:?}",
        failure.error
    );
    assert_eq!(failure.unwritten, (0..40).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_reported_as_permanent() {
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.unwrap();
    node.execute(&format!("DROP TABLE {}.user_activity", c.keyspace))
        .unwrap();
    let evs = events(1, 2, 0);
    let refs: Vec<&Event> = evs.iter().collect();
    let failure = store.write(&refs).await.expect_err("table is gone");
    assert!(!failure.error.is_retryable(), "{:?}", failure.error);
    assert_eq!(failure.unwritten, vec![0, 1]);

    let missing = scylla_config(&node.addr().to_string());
    let err = ScyllaStore::connect(&missing, false)
        .await
        .err()
        .expect("no schema yet");
    assert!(err.to_string().contains("vault migrate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_stores_every_event_in_scylla_through_write_timeouts() {
    use crate::common::{settings, Kafka, Running};
    let kafka = Kafka::start();
    let node = node().await;
    let (topic, group) = (unique("e2e"), unique("g"));
    let partitions = 3;
    kafka.create_source_topic(&topic, partitions).await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.unwrap();
    // Timeouts on a third of the write requests for the first 30 hits: retried until written.
    node.inject(
        Fault::new(FaultKind::WriteTimeout)
            .matching("user_activity")
            .probability(0.33)
            .times(30),
    );

    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.scylla = c.clone();
    let vault = Running::start(cfg, store, MemoryDeadLetters::default());
    kafka.produce_events(&topic, partitions, 0, 1500).await;
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(60))
        .await;
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), 1500);
    assert_eq!(vault.counter("vault_events_stored_total"), 1500.0);
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_node_and_carries_the_writes() {
    let dir = std::env::temp_dir().join(unique("vault-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed(&dir, "node");
    let (stranger, _) = self_signed(&dir, "stranger");
    let node = CqlNode::start_tls(SocketAddr::from(([127, 0, 0, 1], 0)), &cert, &key)
        .await
        .expect("TLS stand-in starts");
    let mut c = scylla_config(&node.addr().to_string());
    c.tls = true;
    c.tls_ca_file = cert.display().to_string();
    c.request_timeout = Duration::from_secs(2);

    let store = ScyllaStore::connect(&c, true)
        .await
        .expect("TLS session to a node signed by the configured CA");
    let batch = events(3, 30, 0);
    store
        .write(&batch.iter().collect::<Vec<_>>())
        .await
        .expect("write over TLS");
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), 30);

    // A node the configured CA did not sign is refused; so is a plaintext client.
    let mut wrong_ca = c.clone();
    wrong_ca.tls_ca_file = stranger.display().to_string();
    assert!(ScyllaStore::connect(&wrong_ca, false).await.is_err());
    let mut plain = c.clone();
    plain.tls = false;
    plain.tls_ca_file.clear();
    assert!(ScyllaStore::connect(&plain, false).await.is_err());
    // Verification off (self-signed test nodes only) connects whatever signed the node.
    let mut unverified = wrong_ca.clone();
    unverified.tls_verify = false;
    ScyllaStore::connect(&unverified, false)
        .await
        .expect("TLS without verification");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A user erased by a Kafka tombstone stays erased when a new consumer group re-reads the whole
/// topic: the rows of messages before the erasure never come back, later activity is stored,
/// other users are untouched, and the erasure is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_user_stays_erased_when_a_new_group_replays_the_topic() {
    use crate::common::{event_json, settings, Kafka, Running};
    let kafka = Kafka::start();
    let node = node().await;
    let topic = unique("erase");
    kafka.create_source_topic(&topic, 1).await;
    let c = scylla_config(&node.addr().to_string());
    drop(ScyllaStore::connect(&c, true).await.expect("migrate"));
    let t0 = 1_764_000_000_000i64; // 2025-11-24T16:00:00Z
    for i in 0..40 {
        let user = if i % 2 == 0 { "gone" } else { "kept" };
        let value = event_json(user, i).into_bytes();
        kafka
            .produce_at(&topic, 0, user, Some(&value), t0 + i as i64)
            .await;
    }
    let erased_through = t0 + 1000;
    kafka
        .produce_at(&topic, 0, "gone", None, erased_through)
        .await;
    for i in 40..50 {
        let value = event_json("gone", i).into_bytes();
        kafka
            .produce_at(
                &topic,
                0,
                "gone",
                Some(&value),
                erased_through + 1 + i as i64,
            )
            .await;
    }
    let count = |user: &str| {
        let rows = node
            .execute(&format!(
                "SELECT source_offset FROM {}.user_activity WHERE user_id = '{user}' AND day = '2025-11-24'",
                c.keyspace
            ))
            .expect("select")
            .expect("rows");
        rows.rows.len()
    };
    let mut seen: Vec<String> = Vec::new();
    for group in [unique("first"), unique("replay")] {
        let mut cfg = settings(&kafka.brokers, &topic, &group);
        cfg.scylla = c.clone();
        cfg.pipeline.tombstones = vault::config::TombstonePolicy::Erase;
        let store = ScyllaStore::connect(&c, false).await.expect("connect");
        let vault = Running::start(cfg, store, MemoryDeadLetters::default());
        kafka
            .probe(&group)
            .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
            .await;
        assert_eq!(
            count("gone"),
            10,
            "{group}: only activity after the erasure"
        );
        assert_eq!(count("kept"), 20, "{group}: other users untouched");
        assert_eq!(vault.counter("vault_erasures_total"), 1.0);
        vault.stop().await;
        if let Some(cells) = cells_seen_by_python(&node.addr().to_string(), &c.keyspace) {
            seen.push(cells);
        }
    }
    if let [first, replay] = seen.as_slice() {
        assert!(first.lines().count() == 30, "{first}");
        assert_eq!(
            first, replay,
            "a second group re-reading the topic changes no cell and no write timestamp"
        );
    }
    let record = node
        .execute(&format!(
            "SELECT requested_by FROM {}.erasures WHERE user_id = 'gone'",
            c.keyspace
        ))
        .expect("select")
        .expect("rows");
    assert_eq!(
        record.rows.len(),
        1,
        "recorded once: the replay rewrote the same record"
    );
    let by = String::from_utf8(record.rows[0][0].clone().unwrap()).unwrap();
    assert!(by.starts_with(&format!("kafka:{topic}/0/")), "{by}");
}

/// An erasure keeps its rows out also once ScyllaDB has purged its tombstones
/// (`gc_grace_seconds` passed, compaction ran), when a write below a tombstone lands again: a
/// replay of the erased messages (a new group re-reading the topic) through a store that knows
/// the erasure only from its record writes none of them, and counts them; the other user's
/// rows are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_holds_after_its_tombstones_are_purged() {
    use vault::store::erasure::{forget, Erasure};
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.expect("migrate");
    // Users 0, 1 and 2, three events each, from 2025-11-24.
    let batch = events(3, 9, 100);
    let refs: Vec<&Event> = batch.iter().collect();
    store.write(&refs).await.expect("write");
    let rows_of = |user: &str| {
        node.execute(&format!(
            "SELECT event_id FROM {}.user_activity WHERE user_id = '{user}' AND day = '2025-11-24'",
            c.keyspace
        ))
        .expect("select")
        .expect("rows")
        .rows
        .len()
    };
    let now = chrono::Utc::now().timestamp_millis();
    for user in ["user-0", "user-2"] {
        let erasure = Erasure {
            user_id: user.into(),
            through_ms: now,
            requested_by: "cli:test".into(),
            requested_at_ms: now,
        };
        forget(&store, &erasure, false).await.expect("erase");
    }
    node.compact_after(Duration::from_secs(11 * 86_400));
    // The tombstones are gone: user 2's first row, written again below them, lands.
    let first_of_2 = batch.iter().find(|e| e.user_id() == "user-2").unwrap();
    node.execute(&format!(
        "INSERT INTO {}.user_activity (user_id, day, occurred_at, event_id, event_type)          VALUES ('user-2', '2025-11-24', {}, {}, 'click') USING TIMESTAMP {}",
        c.keyspace,
        first_of_2.occurred_at_ms,
        first_of_2.event_id,
        version::of(first_of_2)
    ))
    .expect("insert");
    assert_eq!(rows_of("user-2"), 1);

    let replay = ScyllaStore::connect(&c, false).await.expect("connect");
    let metrics = Metrics::new();
    replay.report_to(&metrics);
    replay.write(&refs).await.expect("replay");
    assert_eq!(rows_of("user-0"), 0, "the erased user's rows stay out");
    assert_eq!(rows_of("user-2"), 1, "only the row written past vault");
    assert_eq!(rows_of("user-1"), 3);
    assert_eq!(
        metrics.write_erased_rows.get(),
        6,
        "users 0 and 2: three rows each"
    );
    // Later activity of an erased user is written, and costs no lookup.
    let later = {
        let mut e = events(1, 1, 500).remove(0);
        e.source.timestamp_ms = Some(now + 1);
        e
    };
    replay.write(&[&later]).await.expect("later activity");
    assert_eq!(metrics.write_erased_rows.get(), 6);
}

/// Two erasures of one user asked in the same millisecond share a record row: the one that
/// reaches further keeps it, whichever lands last, so the record (what the write path and
/// `dlq replay` read once tombstones are purged) never says less than was erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasures_of_one_user_in_one_millisecond_keep_the_furthest() {
    use vault::store::erasure::{erased_through, forget, Erasure};
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.expect("migrate");
    let now = chrono::Utc::now().timestamp_millis();
    let erasure = |through_ms: i64, by: &str| Erasure {
        user_id: "user-0".into(),
        through_ms,
        requested_by: by.into(),
        requested_at_ms: now,
    };
    forget(&store, &erasure(now, "api:first"), false)
        .await
        .expect("erase");
    forget(&store, &erasure(now - 86_400_000, "api:second"), false)
        .await
        .expect("erase");
    assert_eq!(
        erased_through(&store, "user-0").await.expect("read"),
        Some(now),
        "the further erasure's record stands"
    );
    let record = node
        .execute(&format!(
            "SELECT requested_by FROM {}.erasures WHERE user_id = 'user-0'",
            c.keyspace
        ))
        .expect("select")
        .expect("rows");
    assert_eq!(record.rows.len(), 1, "one record row");
    assert_eq!(record.rows[0][0].as_deref(), Some(&b"api:first"[..]));
}

/// An erasure waits, once it is recorded and known to the store, for the store's writes that
/// were checked before it: until they end it reads no day and deletes nothing, so none of
/// them can land on a day it does not find. Writes that start meanwhile go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_waits_for_the_writes_checked_before_it() {
    use vault::store::erasure::{forget, Erasure};
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.expect("migrate");
    let batch = events(1, 3, 100);
    let refs: Vec<&Event> = batch.iter().collect();
    store.write(&refs).await.expect("write");
    let rows_of_user = || {
        node.execute(&format!(
            "SELECT event_id FROM {}.user_activity WHERE user_id = 'user-0' AND day = '2025-11-24'",
            c.keyspace
        ))
        .expect("select")
        .expect("rows")
        .rows
        .len()
    };
    let recorded = || {
        node.execute(&format!(
            "SELECT requested_by FROM {}.erasures WHERE user_id = 'user-0'",
            c.keyspace
        ))
        .expect("select")
        .expect("rows")
        .rows
        .len()
    };
    // A write checked before the erasure, still under way.
    let writing = store.erased().writing();
    let now = chrono::Utc::now().timestamp_millis();
    let erasure = Erasure {
        user_id: "user-0".into(),
        through_ms: now,
        requested_by: "cli:test".into(),
        requested_at_ms: now,
    };
    let erasing = forget(&store, &erasure, false);
    tokio::pin!(erasing);
    let record_written = async {
        wait_until("the erasure recorded", Duration::from_secs(10), || {
            let n = recorded();
            async move { (n == 1).then_some(()).ok_or(format!("{n} records")) }
        })
        .await
    };
    tokio::select! {
        done = &mut erasing => panic!("the erasure ended while a write checked before it was under way: {done:?}"),
        () = record_written => {}
    }
    assert_eq!(
        rows_of_user(),
        3,
        "nothing deleted while that write is under way"
    );
    // A write started meanwhile is not held up (and sees the erasure).
    let other = events(2, 4, 200);
    let other: Vec<&Event> = other.iter().filter(|e| e.user_id() == "user-1").collect();
    tokio::time::timeout(Duration::from_secs(30), store.write(&other))
        .await
        .expect("a write started after the erasure goes on")
        .expect("write");
    drop(writing);
    let report = erasing.await.expect("erase");
    assert_eq!(report.days.len(), 1);
    assert_eq!(rows_of_user(), 0);
}

/// `vault migrate` raises the erasure watermark to the latest erasure recorded: where none is
/// set (a keyspace whose erasures were made by a release without it) it sets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sets_the_erasure_watermark_from_the_erasures_recorded() {
    use vault::store::erasure::{forget, Erasure};
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.expect("migrate");
    let watermark = || {
        node.execute(&format!(
            "SELECT erased_through FROM {}.erasure_watermark WHERE id = 0",
            c.keyspace
        ))
        .expect("select")
        .expect("rows")
        .rows
        .first()
        .and_then(|r| r[0].clone())
        .map(|b| i64::from_be_bytes(b.try_into().unwrap()))
    };
    assert_eq!(watermark(), None, "no erasure yet");
    for (user, through_ms) in [("a", 1_700_000_000_000), ("b", 1_600_000_000_000)] {
        let erasure = Erasure {
            user_id: user.into(),
            through_ms,
            requested_by: "cli:test".into(),
            requested_at_ms: through_ms,
        };
        forget(&store, &erasure, false).await.expect("erase");
    }
    assert_eq!(watermark(), Some(1_700_000_000_000), "the latest erasure's");
    // As a release without the watermark left it: erasures recorded, no watermark.
    node.execute(&format!(
        "DELETE FROM {}.erasure_watermark WHERE id = 0",
        c.keyspace
    ))
    .expect("delete");
    node.compact_after(Duration::from_secs(11 * 86_400));
    assert_eq!(watermark(), None);
    drop(ScyllaStore::connect(&c, true).await.expect("migrate"));
    assert_eq!(watermark(), Some(1_700_000_000_000), "set from the record");
}

/// `vault forget`: a dry run lists the partitions, the real run deletes them and records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_forget_erases_a_user_from_the_command_line() {
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let store = ScyllaStore::connect(&c, true).await.expect("migrate");
    let batch = events(2, 6, 100);
    let refs: Vec<&Event> = batch.iter().collect();
    store.write(&refs).await.expect("write");
    let day = batch[0].day();
    let forget = |dry_run: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vault"));
        cmd.args(["forget", "--user", "user-0", "--requested-by", "dpo"])
            .env("VAULT_SCYLLA_NODES", node.addr().to_string())
            .env("VAULT_SCYLLA_KEYSPACE", &c.keyspace)
            .env("VAULT_LOG_LEVEL", "warn");
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().expect("run vault forget");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let dry = forget(true);
    assert_eq!(
        dry,
        "user user-0: would delete 1 partition(s): 2025-11-24\n"
    );
    assert_eq!(read_user(&store, &c.keyspace, "user-0", day).await.len(), 3);
    let done = forget(false);
    assert_eq!(done, "user user-0: deleted 1 partition(s): 2025-11-24\n");
    assert!(read_user(&store, &c.keyspace, "user-0", day)
        .await
        .is_empty());
    assert_eq!(read_user(&store, &c.keyspace, "user-1", day).await.len(), 3);
    let record = node
        .execute(&format!(
            "SELECT requested_by, partitions FROM {}.erasures WHERE user_id = 'user-0'",
            c.keyspace
        ))
        .expect("select")
        .expect("rows");
    assert_eq!(record.rows.len(), 1);
    assert_eq!(record.rows[0][0].as_deref(), Some(&b"cli:dpo"[..]));
    // A replay of the erased events (older than the erasure) does not bring them back.
    store.write(&refs).await.expect("replay");
    assert!(read_user(&store, &c.keyspace, "user-0", day)
        .await
        .is_empty());
}

/// Retention per event type: an event past its retention is not written; a row's TTL is what
/// is left of `occurred_at + retention`, so a replay never extends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_expires_rows_at_occurred_at_plus_retention_whenever_written() {
    use vault::store::retention::Retention;
    let node = node().await;
    let c = scylla_config(&node.addr().to_string());
    let retention = Retention {
        default: None,
        by_type: [("page_view".to_owned(), Duration::from_secs(86_400))].into(),
    };
    let store = ScyllaStore::connect(&c, true)
        .await
        .expect("migrate")
        .with_retention(retention.clone());
    let now = chrono::Utc::now();
    let event = |offset: i64, kind: &str, ago: chrono::Duration| {
        let at = (now - ago).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let json = format!(r#"{{"user_id":"u","event_type":"{kind}","occurred_at":"{at}"}}"#);
        let source = Source {
            topic: Arc::from("activity"),
            partition: 0,
            offset,
            timestamp_ms: Some(now.timestamp_millis()),
        };
        event::decode(
            None,
            Some(json.as_bytes()),
            source,
            None,
            event::Limits::default(),
        )
        .expect("valid")
    };
    let too_old = event(1, "page_view", chrono::Duration::days(2));
    let recent = event(2, "page_view", chrono::Duration::hours(1));
    let kept = event(3, "click", chrono::Duration::days(2));
    let persister = Persister {
        retention,
        ..persister_of(store, MemoryDeadLetters::default())
    };
    let ttl_of = |offset: i64| {
        let rows = node
            .execute(&format!(
                "SELECT source_offset, ttl(payload) FROM {}.user_activity WHERE user_id = 'u' AND day = '{}'",
                c.keyspace,
                (now - chrono::Duration::hours(1)).format("%Y-%m-%d")
            ))
            .expect("select")
            .expect("rows");
        rows.rows
            .iter()
            .find(|r| r[0].as_deref() == Some(&offset.to_be_bytes()[..]))
            .map(|r| {
                r[1].clone()
                    .map(|b| i32::from_be_bytes(b.try_into().unwrap()))
            })
    };
    for round in ["first write", "replay"] {
        let records = [&too_old, &recent, &kept].map(|e| Record::Event(e.clone()));
        let (batch, _ack) = Batch::new(records.to_vec(), 0, 0, FlushReason::Size);
        assert_eq!(persister.persist(&batch).await, BatchOutcome::Durable);
        let left = ttl_of(2)
            .expect("the recent page_view is stored")
            .expect("with a TTL");
        assert!(
            (82_700..=82_800).contains(&left),
            "{round}: the TTL is what is left of occurred_at + 1 day, not a fresh day: {left}"
        );
    }
    assert_eq!(
        persister
            .metrics
            .events_expired
            .with_label_values(&["activity"])
            .get(),
        2,
        "the page_view past its retention, not written, each time"
    );
    assert_eq!(node.row_count(&c.keyspace, "user_activity"), 2);
    assert!(ttl_of(1).is_none(), "past its retention: never written");
}

/// Every stored cell and its write timestamp as the Python driver reads them, or `None` (and a
/// note) when the driver is not installed (`make test` installs it).
fn cells_seen_by_python(node: &str, keyspace: &str) -> Option<String> {
    let has_driver = std::process::Command::new("python3")
        .args(["-c", "import cassandra"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_driver {
        println!("skipped the Python driver check: `make test` installs scylla-driver first");
        return None;
    }
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/py/cells.py"))
        .args([node, keyspace])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{out:?}");
    Some(String::from_utf8(out.stdout).expect("utf-8"))
}
