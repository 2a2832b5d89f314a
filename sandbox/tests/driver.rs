//! Conformance: the real `scylla` driver, with default options (schema metadata fetched),
//! against the stand-in node, and against a stand-in cluster that it routes to token-aware.

use std::net::SocketAddr;
use std::time::Duration;

use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use vault_sandbox::cql::frame::Opcode;
use vault_sandbox::cql::{
    CqlCluster, CqlNode, CqlOptions, Fault, FaultKind, LoggedRequest, Saturation,
};

async fn node_and_session() -> (CqlNode, Session) {
    let node = CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let session = tokio::time::timeout(
        Duration::from_secs(20),
        SessionBuilder::new()
            .known_node(node.addr().to_string())
            .build(),
    )
    .await
    .expect("driver connects within 20s")
    .expect("driver connects");
    session
        .query_unpaged("CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}", &[])
        .await
        .unwrap();
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS ks.events (user_id text, day date, at timestamp, id uuid, kind text, n bigint, payload blob, \
             PRIMARY KEY ((user_id, day), at, id)) WITH CLUSTERING ORDER BY (at DESC, id ASC)",
            &[],
        )
        .await
        .unwrap();
    (node, session)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_creates_inserts_selects_with_paging_and_batches() {
    let (node, session) = node_and_session().await;
    session
        .refresh_metadata()
        .await
        .expect("schema metadata reads from the node's system tables");
    let ks = session
        .get_cluster_state()
        .get_keyspace("ks")
        .expect("keyspace in driver metadata")
        .clone();
    assert!(ks.tables.contains_key("events"), "table in driver metadata");

    let insert = session
        .prepare("INSERT INTO ks.events (user_id, day, at, id, kind, n, payload) VALUES (?, ?, ?, ?, ?, ?, ?)")
        .await
        .unwrap();
    let day = scylla::value::CqlDate((1u32 << 31) + 20_000);
    for i in 0..25i64 {
        let id = uuid::Uuid::from_u128(i as u128);
        let at = scylla::value::CqlTimestamp(1_700_000_000_000 + i);
        session
            .execute_unpaged(&insert, ("u1", day, at, id, "click", i, vec![1u8, 2, 3]))
            .await
            .unwrap();
    }
    let mut select = session
        .prepare("SELECT n FROM ks.events WHERE user_id = ? AND day = ?")
        .await
        .unwrap();
    select.set_page_size(10);
    let rows: Vec<(i64,)> = session
        .execute_iter(select.clone(), ("u1", day))
        .await
        .unwrap()
        .rows_stream::<(i64,)>()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let ns: Vec<i64> = rows.into_iter().map(|r| r.0).collect();
    assert_eq!(
        ns,
        (0..25).rev().collect::<Vec<_>>(),
        "all pages, newest first"
    );
    let pages = node
        .requests()
        .iter()
        .filter(|r| r.opcode == "EXECUTE" && r.statement.contains("FROM ks.events"))
        .count();
    assert_eq!(pages, 3, "25 rows in pages of 10");

    let mut batch = Batch::new(BatchType::Unlogged);
    for i in 100..110i64 {
        batch.append_statement(insert.clone());
        let _ = i;
    }
    let values: Vec<_> = (100..110i64)
        .map(|i| {
            (
                "u2",
                day,
                scylla::value::CqlTimestamp(i),
                uuid::Uuid::from_u128(i as u128),
                "view",
                i,
                vec![0u8],
            )
        })
        .collect();
    session.batch(&batch, values).await.unwrap();
    let batch_log: Vec<_> = node
        .requests()
        .into_iter()
        .filter(|r| r.opcode == "BATCH")
        .collect();
    assert_eq!(batch_log.len(), 1);
    assert_eq!(batch_log[0].rows, 10);
    assert_eq!(node.row_count("ks", "events"), 35);

    let count: (i64,) = session
        .query_unpaged(
            "SELECT COUNT(*) FROM ks.events WHERE user_id = 'u2' AND day = '2024-10-04'",
            &[],
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row()
        .unwrap();
    assert_eq!(count.0, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_surfaces_as_the_matching_driver_error() {
    let (node, session) = node_and_session().await;
    let mut insert = session
        .prepare("INSERT INTO ks.events (user_id, day, at, id) VALUES (?, ?, ?, ?)")
        .await
        .unwrap();
    // Not idempotent: the driver does not retry, so each injected error reaches us as such.
    insert.set_is_idempotent(false);
    let values = (
        "u",
        scylla::value::CqlDate(1 << 31),
        scylla::value::CqlTimestamp(1),
        uuid::Uuid::nil(),
    );
    let cases = [
        (FaultKind::WriteTimeout, "timed out"),
        (FaultKind::Overloaded, "verloaded"),
        (FaultKind::Unavailable, "nough"),
        (FaultKind::ServerError, "nternal"),
    ];
    for (kind, needle) in cases {
        node.inject(
            Fault::new(kind.clone())
                .on(&[Opcode::Execute])
                .matching("INSERT")
                .times(1),
        );
        let err = session
            .execute_unpaged(&insert, values)
            .await
            .expect_err("fault injected");
        assert!(
            format!("{err:?} {err}").contains(needle),
            "{kind:?}: {err:?}"
        );
        session
            .execute_unpaged(&insert, values)
            .await
            .expect("fault used up");
    }

    node.inject(
        Fault::new(FaultKind::Delay(Duration::from_millis(300)))
            .on(&[Opcode::Execute])
            .times(1),
    );
    let t0 = std::time::Instant::now();
    session.execute_unpaged(&insert, values).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));

    let mut read = session
        .prepare("SELECT id FROM ks.events WHERE user_id = ? AND day = ?")
        .await
        .unwrap();
    read.set_is_idempotent(false);
    node.inject(
        Fault::new(FaultKind::ReadTimeout)
            .on(&[Opcode::Execute])
            .matching("SELECT")
            .times(1),
    );
    let err = session
        .execute_unpaged(&read, ("u", scylla::value::CqlDate(1 << 31)))
        .await
        .expect_err("read timeout");
    assert!(format!("{err:?}").contains("ReadTimeout"), "{err:?}");

    node.inject(
        Fault::new(FaultKind::DropConnection)
            .on(&[Opcode::Execute])
            .times(1),
    );
    let err = session
        .execute_unpaged(&insert, values)
        .await
        .expect_err("connection dropped");
    assert!(
        format!("{err:?}").to_lowercase().contains("broken")
            || format!("{err:?}").contains("Connection"),
        "{err:?}"
    );

    // The driver reconnects on its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while session.execute_unpaged(&insert, values).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "driver did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let err = session
        .query_unpaged("GRANT SELECT ON ks.events TO someone", &[])
        .await
        .expect_err("unsupported");
    assert!(
        format!("{err:?}").contains("SyntaxError") && format!("{err}").contains("grant"),
        "{err:?}"
    );
}

/// The saturated-node mode, seen through the driver: one request at a time is served in the
/// base latency; many at once queue (latency grows with the requests in flight) and those
/// above the threshold are answered Overloaded at once; cleared, the node is normal again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_node_queues_requests_and_sheds_load_above_its_threshold() {
    use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
    let (node, session) = node_and_session().await;
    // Not idempotent: the driver does not retry an Overloaded answer, so each is seen here.
    let insert = session
        .prepare("INSERT INTO ks.events (user_id, day, at, id, kind, n, payload) VALUES (?, ?, ?, ?, ?, ?, ?)")
        .await
        .unwrap();
    let day = scylla::value::CqlDate((1u32 << 31) + 20_000);
    let write = |i: i64| {
        let (session, insert) = (&session, &insert);
        async move {
            let id = uuid::Uuid::from_u128(1000 + i as u128);
            let at = scylla::value::CqlTimestamp(1_700_000_000_000 + i);
            session
                .execute_unpaged(insert, ("sat", day, at, id, "click", i, vec![0u8]))
                .await
        }
    };
    let base = Duration::from_millis(100);
    node.saturate(Saturation::new(2, base, 4).matching("ks.events"));

    let t0 = std::time::Instant::now();
    write(0).await.expect("one request is served");
    assert!(t0.elapsed() >= base, "{:?}", t0.elapsed());

    let results = futures::future::join_all((1..=12).map(write)).await;
    let overloaded = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ExecutionError::LastAttemptError(
                    RequestAttemptError::DbError(DbError::Overloaded, _)
                ))
            )
        })
        .count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(served + overloaded, 12, "{results:?}");
    assert!(
        served >= 4,
        "the node serves up to its threshold: {results:?}"
    );
    assert!(overloaded >= 1, "and sheds the rest: {results:?}");
    let stats = node.saturation_stats();
    assert_eq!(stats.served as usize, 1 + served);
    assert_eq!(stats.overloaded as usize, overloaded);
    assert!(stats.peak_in_flight <= 4, "{stats:?}");
    // Past the capacity (2), latency grows with the requests in flight: 4 take twice as long.
    assert_eq!(stats.latencies[0], base);
    assert_eq!(stats.latencies.iter().max(), Some(&(base * 2)), "{stats:?}");
    let stored = session
        .query_unpaged(
            "SELECT n FROM ks.events WHERE user_id = ? AND day = ?",
            ("sat", day),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows_num();
    assert_eq!(
        stored,
        1 + served,
        "every served request is stored, no shed one is"
    );

    // A BATCH weighs its statements: 6 rows alone are 3 times the capacity (2), so it takes
    // three times the base latency, and is served although it is above the threshold (4),
    // since nothing else is in flight.
    let mut batch =
        scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Unlogged);
    for _ in 0..6 {
        batch.append_statement(insert.clone());
    }
    let rows: Vec<_> = (100..106)
        .map(|i: i64| {
            let id = uuid::Uuid::from_u128(1000 + i as u128);
            let at = scylla::value::CqlTimestamp(1_700_000_000_000 + i);
            ("sat", day, at, id, "click", i, vec![0u8])
        })
        .collect();
    session
        .batch(&batch, rows)
        .await
        .expect("a lone batch is served");
    let stats = node.saturation_stats();
    assert_eq!(stats.latencies.last(), Some(&(base * 3)), "{stats:?}");
    assert_eq!(stats.peak_in_flight, 6, "{stats:?}");

    node.clear_faults();
    let t0 = std::time::Instant::now();
    let results = futures::future::join_all((13..=24).map(write)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(t0.elapsed() < base, "cleared: {:?}", t0.elapsed());
}

/// A session on a stand-in cluster, once the driver knows every node.
async fn cluster_and_session(nodes: usize) -> (CqlCluster, Session) {
    let cluster = CqlCluster::start(nodes).await.unwrap();
    let session = session_on(&cluster).await;
    (cluster, session)
}

/// A session on `cluster`, once the driver knows every node.
async fn session_on(cluster: &CqlCluster) -> Session {
    let nodes = cluster.addrs().len();
    let session = tokio::time::timeout(
        Duration::from_secs(20),
        SessionBuilder::new()
            .known_node(cluster.addrs()[0].to_string())
            .build(),
    )
    .await
    .expect("driver connects within 20s")
    .expect("driver connects");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while session.get_cluster_state().get_nodes_info().len() < nodes {
        assert!(
            std::time::Instant::now() < deadline,
            "the driver did not discover {nodes} nodes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    session
}

/// The EXECUTE requests of an INSERT the log holds.
fn inserts(cluster: &CqlCluster) -> Vec<LoggedRequest> {
    cluster
        .requests()
        .into_iter()
        .filter(|r| r.opcode == "EXECUTE" && r.statement.starts_with("INSERT"))
        .collect()
}

/// Three nodes seen through the driver: it discovers each at its own address on the one port,
/// its token map names the same replicas as the stand-in's own Murmur3 and ring (SimpleStrategy
/// RF 1, NetworkTopologyStrategy RF 2), its token-aware writes all land on a replica, spread
/// over the nodes, and a write pinned to a node that is not a replica is counted as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_routes_prepared_writes_to_replicas_and_counts_those_that_are_not() {
    use scylla::client::execution_profile::ExecutionProfile;
    use scylla::policies::load_balancing::{NodeIdentifier, SingleTargetLoadBalancingPolicy};

    let (cluster, session) = cluster_and_session(3).await;
    let state = session.get_cluster_state();
    let mut seen: Vec<SocketAddr> = state
        .get_nodes_info()
        .iter()
        .map(|n| SocketAddr::new(n.address.ip(), n.address.port()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        cluster.addrs(),
        "every node, on the contact point's port"
    );

    for (ks, replication) in [
        (
            "routed",
            "'class': 'SimpleStrategy', 'replication_factor': 1",
        ),
        (
            "routed2",
            "'class': 'NetworkTopologyStrategy', 'datacenter1': 2",
        ),
    ] {
        events_keyspace(&session, ks, &format!("{{{replication}}}")).await;
    }
    session.refresh_metadata().await.unwrap();
    let state = session.get_cluster_state();
    for ks in ["routed", "routed2"] {
        for i in 0..30 {
            // 18-byte keys whose 2-byte tail is the day's low byte (above 0x7f for about half)
            // and 0x00: Murmur3's sign quirk counts.
            let user = format!("user-{i:03}");
            let day = i32::MIN + i * 7919;
            let mut driver: Vec<SocketAddr> = state
                .get_endpoints(ks, "events", &(user.as_str(), day))
                .unwrap()
                .iter()
                .map(|(n, _)| SocketAddr::new(n.address.ip(), n.address.port()))
                .collect();
            driver.sort();
            let mut ours: Vec<SocketAddr> = cluster
                .replicas(ks, &[user.as_bytes(), &day.to_be_bytes()])
                .into_iter()
                .map(|n| cluster.addrs()[n])
                .collect();
            ours.sort();
            assert_eq!(driver, ours, "replicas of ({user}, {day}) in {ks}");
        }
    }

    let day = 20_000i32;
    let insert = session
        .prepare("INSERT INTO routed.events (user_id, day, at, v) VALUES (?, ?, ?, ?)")
        .await
        .unwrap();
    cluster.clear_requests();
    for i in 0..40i64 {
        session
            .execute_unpaged(&insert, (format!("user-{i}"), day, i, "x"))
            .await
            .unwrap();
    }
    let writes = inserts(&cluster);
    assert_eq!(writes.len(), 40);
    for w in &writes {
        assert_eq!(w.writes, 1, "{w:?}");
        assert_eq!(w.non_replica, [("routed.events".to_string(), 0)], "{w:?}");
    }
    let routing = cluster.routing();
    assert_eq!(
        (routing.writes, routing.non_replica),
        (40, 0),
        "{routing:?}"
    );
    assert!(
        routing.writes_by_node.iter().filter(|n| **n > 0).count() > 1,
        "more than one node served writes: {routing:?}"
    );

    // Pinned to a node that does not own user-0's partition: served there, and counted.
    let key = [b"user-0".as_slice(), &day.to_be_bytes()];
    let owner = cluster.replicas("routed", &key);
    assert_eq!(owner.len(), 1);
    let pinned = |node: usize| {
        let target = NodeIdentifier::NodeAddress(cluster.addrs()[node]);
        let profile = ExecutionProfile::builder()
            .load_balancing_policy(SingleTargetLoadBalancingPolicy::new(target, None))
            .build();
        let mut statement = insert.clone();
        statement.set_execution_profile_handle(Some(profile.into_handle()));
        statement
    };
    let stranger = (0..3).find(|n| !owner.contains(n)).unwrap();
    cluster.clear_requests();
    session
        .execute_unpaged(&pinned(stranger), ("user-0", day, 1000i64, "y"))
        .await
        .unwrap();
    session
        .execute_unpaged(&pinned(owner[0]), ("user-0", day, 1001i64, "y"))
        .await
        .unwrap();
    let writes = inserts(&cluster);
    let got: Vec<(usize, usize)> = writes
        .iter()
        .map(|w| (w.node, w.non_replica[0].1))
        .collect();
    assert_eq!(got, [(stranger, 1), (owner[0], 0)]);
    assert_eq!(cluster.routing().non_replica, 1);
    assert_eq!(
        cluster.row_count("routed", "events"),
        42,
        "one store: every write is there whichever node took it"
    );

    // A BATCH on the stranger: its statements for user-0 are counted, one for a partition it
    // owns is not.
    let mine = (1..100)
        .map(|i| format!("user-{i}"))
        .find(|u| cluster.replicas("routed", &[u.as_bytes(), &day.to_be_bytes()]) == [stranger])
        .expect("a partition the stranger owns");
    let mut batch = Batch::new(BatchType::Unlogged);
    for _ in 0..3 {
        batch.append_statement(insert.clone());
    }
    let profile = ExecutionProfile::builder()
        .load_balancing_policy(SingleTargetLoadBalancingPolicy::new(
            NodeIdentifier::NodeAddress(cluster.addrs()[stranger]),
            None,
        ))
        .build();
    batch.set_execution_profile_handle(Some(profile.into_handle()));
    cluster.clear_requests();
    session
        .batch(
            &batch,
            (
                ("user-0", day, 2000i64, "b"),
                ("user-0", day, 2001i64, "b"),
                (mine.as_str(), day, 2002i64, "b"),
            ),
        )
        .await
        .unwrap();
    let logged: Vec<_> = cluster
        .requests()
        .into_iter()
        .filter(|r| r.opcode == "BATCH")
        .collect();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].node, stranger);
    assert_eq!(logged[0].writes, 3);
    assert_eq!(logged[0].non_replica, [("routed.events".to_string(), 2)]);
}

/// EXECUTEs `insert` (`user_id, day, at, v`) for the partition `key`, each at the next `at`,
/// until `learned()`: one served by a node outside the partition's tablet teaches the driver
/// the tablet. Panics after 10 s.
async fn execute_until(
    session: &Session,
    insert: &PreparedStatement,
    (user, day): (&str, i32),
    at: &mut i64,
    learned: impl Fn() -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !learned() {
        assert!(
            std::time::Instant::now() < deadline,
            "the driver did not learn the tablet of ({user}, {day})"
        );
        *at += 1;
        session
            .execute_unpaged(insert, (user, day, *at, "learn"))
            .await
            .unwrap();
        wait_until(&learned, Duration::from_millis(200)).await;
    }
}

/// Creates keyspace `ks` `WITH replication = {with}` (options after the map included) and
/// its table `events`, partitioned by `(user_id, day)`.
async fn events_keyspace(session: &Session, ks: &str, with: &str) {
    for ddl in [
        format!("CREATE KEYSPACE {ks} WITH replication = {with}"),
        format!("CREATE TABLE {ks}.events (user_id text, day int, at bigint, v text, PRIMARY KEY ((user_id, day), at))"),
    ] {
        session.query_unpaged(ddl, &[]).await.unwrap();
    }
}

/// The nodes the driver would route a token of `ks.events` to, by host id, sorted.
fn driver_replicas(session: &Session, ks: &str, token: i64) -> Vec<uuid::Uuid> {
    use scylla::frame::response::result::TableSpec;
    let state = session.get_cluster_state();
    let strategy = &state.get_keyspace(ks).expect("keyspace known").strategy;
    let mut ids: Vec<uuid::Uuid> = state
        .replica_locator()
        .replicas_for_token(
            scylla::routing::Token::new(token),
            strategy,
            None,
            &TableSpec::borrowed(ks, "events"),
        )
        .into_iter()
        .map(|(node, _)| node.host_id)
        .collect();
    ids.sort();
    ids
}

/// Tablets (ScyllaDB's TABLETS_ROUTING_V1) seen through the driver, on three nodes: it reads
/// which keyspaces are tablet-based, knows no replica of their tables until an EXECUTE served
/// by a node outside a partition's tablet answers with that tablet, then knows each tablet's
/// range and replicas exactly as the stand-in places them (not as the vnode ring would), and
/// routes every further write to a replica. A vnode keyspace beside them still routes by the
/// ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_teaches_the_driver_its_tablets_and_the_driver_routes_by_them() {
    let (cluster, session) = cluster_and_session(3).await;
    let keyspaces = [("tablets1", 1), ("tablets2", 2), ("vnodes", 1)];
    for (ks, rf) in keyspaces {
        let tablets = match ks {
            "vnodes" => "",
            _ => " AND tablets = {'enabled': true, 'initial': 8}",
        };
        let replication = format!("{{'class': 'NetworkTopologyStrategy', 'datacenter1': {rf}}}");
        events_keyspace(&session, ks, &format!("{replication}{tablets}")).await;
    }
    session.refresh_metadata().await.unwrap();
    let state = session.get_cluster_state();
    for (ks, _) in keyspaces {
        let tablet_based = state.get_keyspace(ks).unwrap().tablet_based;
        assert_eq!(tablet_based, ks != "vnodes", "{ks} tablet_based");
    }

    let day = 20_000i32;
    let key = |user: &str| [user.as_bytes().to_vec(), day.to_be_bytes().to_vec()];
    let token = |user: &str| {
        let k = key(user);
        vault_sandbox::cql::murmur3::partition_token(&[&k[0], &k[1]])
    };
    let host_ids = cluster.host_ids();
    let ours = |ks: &str, user: &str| {
        let k = key(user);
        let mut ids: Vec<uuid::Uuid> = cluster
            .replicas(ks, &[&k[0], &k[1]])
            .into_iter()
            .map(|n| host_ids[n])
            .collect();
        ids.sort();
        ids
    };
    // A user in each of the eight tablets (all tables of a keyspace split alike).
    let mut users: Vec<(String, vault_sandbox::cql::Tablet)> = Vec::new();
    for i in 0.. {
        let user = format!("user-{i}");
        let k = key(&user);
        let tablet = cluster.tablet("tablets1", &[&k[0], &k[1]]).unwrap();
        if users.iter().all(|(_, t)| t.last != tablet.last) {
            users.push((user, tablet));
        }
        if users.len() == 8 {
            break;
        }
    }
    assert!(
        users.iter().any(|(u, _)| {
            let mut ring = ours("vnodes", u);
            ring.truncate(1);
            ring != ours("tablets1", u)
        }),
        "the tablets are not where the ring puts the same tokens"
    );
    for (ks, _) in &keyspaces[..2] {
        for (user, _) in &users {
            assert!(
                driver_replicas(&session, ks, token(user)).is_empty(),
                "{ks}: no tablet known before an EXECUTE"
            );
        }
    }
    for (user, _) in &users {
        assert_eq!(
            driver_replicas(&session, "vnodes", token(user)),
            ours("vnodes", user)
        );
    }

    // Writes to each tablet until the driver knows them all: one served by a replica teaches
    // nothing, one served elsewhere teaches the tablet.
    let mut at = 0i64;
    for (ks, _) in &keyspaces[..2] {
        let insert = session
            .prepare(format!(
                "INSERT INTO {ks}.events (user_id, day, at, v) VALUES (?, ?, ?, ?)"
            ))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let unknown: Vec<&String> = users
                .iter()
                .map(|(u, _)| u)
                .filter(|u| driver_replicas(&session, ks, token(u)) != ours(ks, u))
                .collect();
            if unknown.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{ks}: the driver did not learn the tablets of {unknown:?}"
            );
            for user in unknown {
                at += 1;
                session
                    .execute_unpaged(&insert, (user, day, at, "learn"))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Each tablet's whole range: its first token (the payload's first is exclusive) and its
        // last.
        for (user, tablet) in &users {
            for edge in [tablet.first + 1, tablet.last] {
                assert_eq!(
                    driver_replicas(&session, ks, edge),
                    ours(ks, user),
                    "{ks}: token {edge} in the tablet of {user}"
                );
            }
        }
    }

    // Token-aware from now on: every write on a replica, tablets and vnodes alike.
    let before = cluster.routing();
    for (ks, _) in keyspaces {
        let insert = session
            .prepare(format!(
                "INSERT INTO {ks}.events (user_id, day, at, v) VALUES (?, ?, ?, ?)"
            ))
            .await
            .unwrap();
        for i in 0..40 {
            session
                .execute_unpaged(&insert, (format!("user-{i}"), day, 10_000i64 + i, "routed"))
                .await
                .unwrap();
        }
    }
    let after = cluster.routing();
    assert_eq!(after.writes - before.writes, 120, "{after:?}");
    assert_eq!(
        after.non_replica, before.non_replica,
        "{before:?} -> {after:?}"
    );
    let busy = after
        .writes_by_node
        .iter()
        .zip(&before.writes_by_node)
        .filter(|(a, b)| a > b)
        .count();
    assert_eq!(busy, 3, "every node served writes: {before:?} -> {after:?}");
}

/// Tablets by default (ScyllaDB's `tablets_mode_for_new_keyspaces: enabled`) seen through the
/// driver, on three nodes: a NetworkTopologyStrategy keyspace created with no `tablets` option
/// is tablet-based, and the driver learns its tablets from an EXECUTE as it does an explicit
/// one's; one created `AND tablets = {'enabled': false}`, and a SimpleStrategy one, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tablets_by_default_an_nts_keyspace_with_no_option_is_tablet_based() {
    let options = CqlOptions {
        tablets_by_default: true,
        ..CqlOptions::default()
    };
    let cluster = CqlCluster::start_with(3, options).await.unwrap();
    let session = session_on(&cluster).await;
    let nts = "{'class': 'NetworkTopologyStrategy', 'datacenter1': 1}";
    let simple = "{'class': 'SimpleStrategy', 'replication_factor': 1}";
    let keyspaces = [
        ("dflt", nts.to_string(), true),
        (
            "optout",
            format!("{nts} AND tablets = {{'enabled': false}}"),
            false,
        ),
        ("simple", simple.to_string(), false),
    ];
    for (ks, with, _) in &keyspaces {
        events_keyspace(&session, ks, with).await;
    }
    session.refresh_metadata().await.unwrap();
    let state = session.get_cluster_state();
    let (user, day) = ("user-1", 20_000i32);
    let key = [user.as_bytes(), &day.to_be_bytes()[..]];
    let token = vault_sandbox::cql::murmur3::partition_token(&key);
    for (ks, _, tablets) in &keyspaces {
        let tablet_based = state.get_keyspace(ks).unwrap().tablet_based;
        assert_eq!(tablet_based, *tablets, "{ks} tablet_based");
        assert_eq!(
            cluster.tablet(ks, &key).is_some(),
            *tablets,
            "{ks} placed by tablet"
        );
        assert_eq!(
            driver_replicas(&session, ks, token).is_empty(),
            *tablets,
            "{ks}: replicas known before an EXECUTE only on vnodes"
        );
    }

    let host_ids = cluster.host_ids();
    let ours: Vec<uuid::Uuid> = cluster
        .replicas("dflt", &key)
        .into_iter()
        .map(|n| host_ids[n])
        .collect();
    let insert = session
        .prepare("INSERT INTO dflt.events (user_id, day, at, v) VALUES (?, ?, ?, ?)")
        .await
        .unwrap();
    let mut at = 0i64;
    let learned = || driver_replicas(&session, "dflt", token) == ours;
    execute_until(&session, &insert, (user, day), &mut at, learned).await;
}

/// NetworkTopologyStrategy's `'replication_factor': 2` shorthand seen through the driver, on
/// three nodes: the stand-in stores it expanded to `datacenter1` as ScyllaDB does (the driver
/// would otherwise take `replication_factor` for a datacenter's name), so the driver's strategy
/// is `datacenter1: 2` for a vnode and a tablet keyspace alike, and its token map names the
/// same replicas as the stand-in's placement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_expands_the_nts_replication_factor_to_its_datacenter_for_the_driver() {
    use scylla::cluster::metadata::Strategy;

    let (cluster, session) = cluster_and_session(3).await;
    let shorthand = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 2}";
    for (ks, tablets) in [
        ("rf_vnodes", ""),
        ("rf_tablets", " AND tablets = {'enabled': true}"),
    ] {
        events_keyspace(&session, ks, &format!("{shorthand}{tablets}")).await;
    }
    session.refresh_metadata().await.unwrap();
    let state = session.get_cluster_state();
    let want = Strategy::NetworkTopologyStrategy {
        datacenter_repfactors: [("datacenter1".to_string(), 2)].into(),
    };
    for ks in ["rf_vnodes", "rf_tablets"] {
        let strategy = &state.get_keyspace(ks).expect("keyspace known").strategy;
        assert_eq!(strategy, &want, "{ks}");
    }

    let host_ids = cluster.host_ids();
    for i in 0..30 {
        let (user, day) = (format!("user-{i:03}"), i32::MIN + i * 7919);
        let key = [user.as_bytes(), &day.to_be_bytes()[..]];
        let token = vault_sandbox::cql::murmur3::partition_token(&key);
        let mut ours: Vec<uuid::Uuid> = cluster
            .replicas("rf_vnodes", &key)
            .into_iter()
            .map(|n| host_ids[n])
            .collect();
        ours.sort();
        assert_eq!(ours.len(), 2, "two replicas of ({user}, {day})");
        assert_eq!(
            driver_replicas(&session, "rf_vnodes", token),
            ours,
            "replicas of ({user}, {day})"
        );
    }
}

/// Polls `ready` every 20 ms until it holds or `within` has passed: whether it held.
async fn wait_until(mut ready: impl FnMut() -> bool, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while !ready() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A tablet moved (as ScyllaDB's load balancer moves one) after the driver learned it, on three
/// nodes at RF 1: the driver keeps routing to the old replica, which serves its BATCHes as a
/// non-replica and answers them with no tablet, so batches never teach the move; the next
/// EXECUTE, also served there as a non-replica, answers with the moved tablet, the driver
/// learns its new replica and routes every further EXECUTE there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tablet_is_learned_from_the_next_execute_and_never_from_a_batch() {
    let (cluster, session) = cluster_and_session(3).await;
    let replication = "{'class': 'NetworkTopologyStrategy', 'datacenter1': 1}";
    events_keyspace(
        &session,
        "moving",
        &format!("{replication} AND tablets = {{'enabled': true, 'initial': 8}}"),
    )
    .await;
    session.refresh_metadata().await.unwrap();
    let insert = session
        .prepare("INSERT INTO moving.events (user_id, day, at, v) VALUES (?, ?, ?, ?)")
        .await
        .unwrap();
    let (user, day) = ("mover", 20_000i32);
    let (user_key, day_key) = (user.as_bytes().to_vec(), day.to_be_bytes().to_vec());
    let key: [&[u8]; 2] = [&user_key, &day_key];
    let token = vault_sandbox::cql::murmur3::partition_token(&key);
    let host_ids = cluster.host_ids();
    let driver_knows = |node: usize| driver_replicas(&session, "moving", token) == [host_ids[node]];
    let mut at = 0i64;

    // The driver learns the tablet where it was placed.
    let placed = cluster.tablet("moving", &key).unwrap();
    let old = placed.replicas[0];
    execute_until(&session, &insert, (user, day), &mut at, || {
        driver_knows(old)
    })
    .await;

    let new = (old + 1) % 3;
    let moved = cluster.move_tablet("moving", &key, vec![new]).unwrap();
    assert_eq!(
        (moved.first, moved.last, &moved.replicas[..]),
        (placed.first, placed.last, &[new][..])
    );
    assert_eq!(cluster.tablet("moving", &key), Some(moved.clone()));
    assert_eq!(cluster.replicas("moving", &key), [new]);
    assert!(driver_knows(old), "nothing told the driver yet");

    // BATCHes: to the old replica, each of its statements a non-replica write, and no lesson.
    let mut batch = Batch::new(BatchType::Unlogged);
    batch.append_statement(insert.clone());
    batch.append_statement(insert.clone());
    for i in 0..5 {
        let before = cluster.routing();
        at += 2;
        session
            .batch(
                &batch,
                ((user, day, at - 1, "batch"), (user, day, at, "batch")),
            )
            .await
            .unwrap();
        let after = cluster.routing();
        assert_eq!(after.non_replica - before.non_replica, 2, "batch {i}");
        assert_eq!(
            after.writes_by_node[old] - before.writes_by_node[old],
            2,
            "batch {i} on the old replica"
        );
        assert!(driver_knows(old), "batch {i} taught the move");
    }

    // The next EXECUTE: on the old replica, a non-replica now, which teaches the move.
    let before = cluster.routing();
    at += 1;
    session
        .execute_unpaged(&insert, (user, day, at, "taught"))
        .await
        .unwrap();
    let after = cluster.routing();
    assert_eq!(after.non_replica - before.non_replica, 1, "{after:?}");
    assert_eq!(after.writes_by_node[old] - before.writes_by_node[old], 1);
    assert!(
        wait_until(|| driver_knows(new), Duration::from_secs(10)).await,
        "the driver did not learn the move: {:?}",
        driver_replicas(&session, "moving", token)
    );
    for edge in [moved.first + 1, moved.last] {
        assert_eq!(
            driver_replicas(&session, "moving", edge),
            [host_ids[new]],
            "token {edge}: the whole tablet moved"
        );
    }

    // Routed to the new replica from now on.
    let before = cluster.routing();
    for _ in 0..10 {
        at += 1;
        session
            .execute_unpaged(&insert, (user, day, at, "routed"))
            .await
            .unwrap();
    }
    let after = cluster.routing();
    assert_eq!(after.non_replica, before.non_replica, "{after:?}");
    assert_eq!(after.writes_by_node[new] - before.writes_by_node[new], 10);
}
