//! Kafka-side failures: broker faults through the mock cluster under a running pipeline, and a
//! group of real `vault run` processes scaled 1 → 3 → 1 while events keep arriving. Each test
//! prints sent, stored, lost and duplicated writes, and asserts nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::MemoryStore;

use crate::common::k8s::{self, FakeKubernetes};
use crate::common::{
    http_get, settings, spawn_vault, stop_gracefully, stored_positions, unique, wait_until, Kafka,
    ProcessRig, Running,
};

fn report(what: &str, sent: usize, stored: usize, written: usize) {
    println!(
        "{what}: sent {sent}, stored {stored}, lost {}, duplicated writes {}",
        sent.saturating_sub(stored),
        written.saturating_sub(stored)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_faults_lose_nothing_and_commit_only_what_is_stored() {
    use RDKafkaRespErr::*;
    let kafka = Kafka::start();
    let Some(mock) = kafka.mock() else {
        println!(
            "skipped: broker faults need librdkafka's mock cluster (VAULT_IT_KAFKA_BROKERS is set)"
        );
        return;
    };
    let (topic, group) = (unique("brokers"), unique("g"));
    let partitions = 4;
    kafka.create_source_topic(&topic, partitions).await;
    let store = MemoryStore::new();
    let vault = Running::start(
        settings(&kafka.brokers, &topic, &group),
        store.clone(),
        MemoryDeadLetters::default(),
    );
    let probe = kafka.probe(&group);
    let mut produced = BTreeSet::new();
    let mut next = 0;
    // Each committed offset must be backed by every earlier event being stored.
    let check = |committed: Vec<Option<i64>>, produced: &BTreeSet<(i32, i64)>| {
        let stored = stored_positions(&store);
        for (p, c) in committed.iter().enumerate() {
            let Some(c) = c else { continue };
            for &(pp, o) in produced.iter().filter(|(pp, o)| *pp == p as i32 && o < c) {
                assert!(
                    stored.contains(&(pp, o)),
                    "partition {p} committed {c} but offset {o} is not stored"
                );
            }
        }
    };

    let phases: [(&str, RDKafkaApiKey, Vec<RDKafkaRespErr>); 4] = [
        (
            "fetch errors",
            RDKafkaApiKey::Fetch,
            vec![RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 6],
        ),
        (
            "offset-commit errors",
            RDKafkaApiKey::OffsetCommit,
            vec![
                RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            ],
        ),
        (
            "heartbeat errors",
            RDKafkaApiKey::Heartbeat,
            vec![RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 3],
        ),
        (
            "join-group errors",
            RDKafkaApiKey::JoinGroup,
            vec![RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 2],
        ),
    ];
    for (name, api, errors) in phases {
        mock.request_errors(api, &errors);
        produced.extend(kafka.produce_events(&topic, partitions, next, 300).await);
        next += 300;
        for _ in 0..10 {
            check(probe.committed(&topic, partitions).await, &produced);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("phase {name}: invariant held");
    }
    wait_until(
        "an injected offset-commit error to be seen and retried",
        Duration::from_secs(30),
        || {
            let errors = vault.counter_with("vault_commits_total", "result", "error");
            async move {
                if errors > 0.0 {
                    Ok(())
                } else {
                    Err(format!("{errors} commit errors"))
                }
            }
        },
    )
    .await;

    // A broker down for 3 s: its partitions stall (fetches and, if it leads the group, commits),
    // then resume. The events are produced first: produce to a down leader would block.
    produced.extend(kafka.produce_events(&topic, partitions, next, 300).await);
    next += 300;
    mock.broker_down(2).expect("broker down");
    let down_until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < down_until {
        // When broker 2 is the group coordinator, committed offsets cannot be read (nor
        // written) until it is back: those samples are skipped.
        let sample = probe
            .try_committed(&topic, partitions, Duration::from_millis(500))
            .await;
        if let Ok(committed) = sample {
            check(committed, &produced);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mock.broker_up(2).expect("broker up");
    println!("phase broker 2 down for 3s: invariant held");
    produced.extend(kafka.produce_events(&topic, partitions, next, 300).await);

    probe
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(120))
        .await;
    let stored = stored_positions(&store);
    check(probe.committed(&topic, partitions).await, &produced);
    report(
        "broker faults",
        produced.len(),
        stored.len(),
        store.writes() as usize,
    );
    assert_eq!(
        stored, produced,
        "every produced event stored, nothing lost"
    );
    vault.stop().await;
}

/// Partitions a vault process reports as assigned (`vault_assigned_partitions`).
fn assigned(metrics_addr: &str) -> Result<i64, String> {
    let (_, body) = http_get(metrics_addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("vault_assigned_partitions "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no vault_assigned_partitions".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_scaled_from_one_to_three_processes_and_back_loses_nothing() {
    let partitions = 6;
    let ProcessRig {
        kafka,
        node,
        topic,
        group,
        keyspace,
        dir,
        env,
    } = ProcessRig::start("scale", partitions).await;

    // Events keep arriving during the whole run, from a thread of their own.
    let producing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let producer = {
        let (brokers, topic, producing) = (kafka.brokers.clone(), topic.clone(), producing.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("producer runtime");
            rt.block_on(async {
                let kafka = Kafka::connect(&brokers);
                let mut sent = 0;
                while producing.load(std::sync::atomic::Ordering::Acquire) {
                    kafka.produce_events(&topic, partitions, sent, 60).await;
                    sent += 60;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                sent
            })
        })
    };

    let (first, first_addr) = spawn_vault(&env, &dir.join("vault-1.log"));
    let probe = kafka.probe(&group);
    // Every process of `addrs` holds at least one partition, and together all of them.
    let sharing = |addrs: Vec<String>| {
        move || {
            let counts: Result<Vec<i64>, String> = addrs.iter().map(|a| assigned(a)).collect();
            async move {
                let counts = counts?;
                let all = counts.iter().sum::<i64>() == i64::from(partitions);
                if all && counts.iter().all(|c| *c > 0) {
                    Ok(())
                } else {
                    Err(format!("assigned {counts:?}"))
                }
            }
        }
    };
    wait_until(
        "one process owning every partition",
        Duration::from_secs(30),
        sharing(vec![first_addr.clone()]),
    )
    .await;
    let (second, second_addr) = spawn_vault(&env, &dir.join("vault-2.log"));
    let (third, third_addr) = spawn_vault(&env, &dir.join("vault-3.log"));
    wait_until(
        "three processes sharing the partitions",
        Duration::from_secs(60),
        sharing(vec![first_addr.clone(), second_addr, third_addr]),
    )
    .await;
    println!("scaled to 3 processes");
    stop_gracefully(second, "the second process to drain and exit 0").await;
    stop_gracefully(third, "the third process to drain and exit 0").await;
    wait_until(
        "one process owning every partition again",
        Duration::from_secs(60),
        sharing(vec![first_addr]),
    )
    .await;
    println!("scaled back to 1 process");

    producing.store(false, std::sync::atomic::Ordering::Release);
    let sent = producer.join().expect("producer thread");
    probe
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(120))
        .await;
    let rows = node
        .execute(&format!(
            "SELECT source_partition, source_offset FROM {keyspace}.user_activity"
        ))
        .expect("select")
        .expect("rows")
        .rows
        .len();
    let written = crate::faults::rows_written(&node);
    report("scale 1 -> 3 -> 1", sent, rows, written);
    stop_gracefully(first, "the last process to exit 0").await;
    assert_eq!(
        rows,
        sent,
        "lost events while scaling (logs in {})",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_drops_while_the_group_is_lost_and_returns_after_rejoining() {
    let kafka = Kafka::start();
    let Some(mock) = kafka.mock() else {
        println!("skipped: needs librdkafka's mock cluster (VAULT_IT_KAFKA_BROKERS is set)");
        return;
    };
    let (topic, group) = (unique("evicted"), unique("g"));
    let partitions = 2;
    kafka.create_source_topic(&topic, partitions).await;
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    let addr = format!("127.0.0.1:{}", crate::common::free_port());
    cfg.metrics.addr = addr.clone();
    let store = MemoryStore::new();
    let vault = Running::start(cfg, store.clone(), MemoryDeadLetters::default());
    let readyz = |want: u16| {
        let addr = addr.clone();
        move || {
            let got = http_get(&addr, "/readyz");
            async move {
                match got {
                    Ok((status, _)) if status == want => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        }
    };
    wait_until("ready in the group", Duration::from_secs(30), readyz(200)).await;

    // Every broker down for longer than the session timeout (6 s): the member loses its
    // assignment and must say so.
    for b in 1..=3 {
        mock.broker_down(b).expect("broker down");
    }
    wait_until(
        "not ready once the assignment is lost",
        Duration::from_secs(30),
        readyz(503),
    )
    .await;
    let (_, why) = http_get(&addr, "/readyz").unwrap();
    assert!(why.contains("not in the consumer group"), "{why}");
    for b in 1..=3 {
        mock.broker_up(b).expect("broker up");
    }
    wait_until(
        "ready again after rejoining",
        Duration::from_secs(60),
        readyz(200),
    )
    .await;

    // And it works again: new events are stored and committed.
    let produced = kafka
        .produce_and_wait_committed(&topic, &group, partitions, 0, 200)
        .await;
    assert_eq!(stored_positions(&store), produced);
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_refused_during_a_rebalance_is_sent_again() {
    use RDKafkaRespErr::*;
    let kafka = Kafka::start();
    let Some(mock) = kafka.mock() else {
        println!("skipped: needs librdkafka's mock cluster (VAULT_IT_KAFKA_BROKERS is set)");
        return;
    };
    let (topic, group) = (unique("final"), unique("g"));
    let partitions = 2;
    kafka.create_source_topic(&topic, partitions).await;
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    // No periodic commit in this test's time: only the shutdown commit commits.
    cfg.kafka.commit_interval = Duration::from_secs(300);
    let store = MemoryStore::new();
    let vault = Running::start(cfg, store.clone(), MemoryDeadLetters::default());
    let produced: BTreeSet<_> = kafka
        .produce_events(&topic, partitions, 0, 300)
        .await
        .into_iter()
        .collect();
    wait_until("every event stored", Duration::from_secs(60), || {
        let stored = stored_positions(&store);
        let done = stored == produced;
        async move {
            if done {
                Ok(())
            } else {
                Err(format!("{} stored", stored.len()))
            }
        }
    })
    .await;
    let probe = kafka.probe(&group);
    assert_eq!(
        probe.committed(&topic, partitions).await,
        vec![None; partitions as usize],
        "nothing committed before shutdown"
    );
    // The broker refuses the next three commits as a rebalancing group would.
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
        ],
    );
    vault.stop().await;
    let ends = probe.ends(&topic, partitions).await;
    let committed = probe.committed(&topic, partitions).await;
    assert_eq!(
        committed,
        ends.into_iter().map(Some).collect::<Vec<_>>(),
        "the refused final commit was sent again until accepted"
    );
}

/// A static member (`kafka.instance_id`) that stops: how long until the survivor owns its
/// partitions, with `kafka.leave_group_on_shutdown = "scale-down"`, when the pod's StatefulSet
/// still counts it (a restart: it keeps its membership) and when it no longer does (a
/// scale-down: it leaves). librdkafka sends no LeaveGroup for a static member that closes, so
/// on a restart the partitions wait for its session to expire; on a scale-down, leaving first
/// hands them over in one rebalance. Prints both times; nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_leaves_the_group_on_a_scale_down_and_keeps_it_on_a_restart() {
    let partitions = 4;
    let ProcessRig {
        kafka,
        node,
        topic,
        group,
        keyspace,
        dir,
        env,
    } = ProcessRig::start("static", partitions).await;
    // The pods activity-vault-0 (a) and activity-vault-1 (b) of a StatefulSet of 2.
    let api = FakeKubernetes::start(2).await;
    let member = |id: &str, leave: &str| {
        let mut env = env.clone();
        env.extend(api.env());
        env.push(("VAULT_KAFKA_INSTANCE_ID".into(), id.into()));
        env.push(("VAULT_KAFKA_LEAVE_GROUP_ON_SHUTDOWN".into(), leave.into()));
        // Heartbeats every 500 ms: the session of a member that just closed has at most that
        // much of its 6 s behind it, so waiting it out takes at least 5.5 s more than leaving.
        env.push((
            "VAULT_KAFKA_OPTION_HEARTBEAT_INTERVAL_MS".into(),
            "500".into(),
        ));
        env
    };
    let sharing = |addrs: Vec<String>| {
        move || {
            let counts: Result<Vec<i64>, String> = addrs.iter().map(|a| assigned(a)).collect();
            async move {
                let counts = counts?;
                let all = counts.iter().sum::<i64>() == i64::from(partitions);
                if all && counts.iter().all(|c| *c > 0) {
                    Ok(())
                } else {
                    Err(format!("assigned {counts:?}"))
                }
            }
        }
    };
    let (a, a_addr) = spawn_vault(&member("activity-vault-0", "never"), &dir.join("a.log"));
    let mut moved = Vec::new();
    let scale = format!(
        "/apis/apps/v1/namespaces/{}/statefulsets/activity-vault/scale",
        k8s::NAMESPACE
    );
    // b stops while the StatefulSet wants 2 replicas (a restart), then while it wants 1.
    for (round, replicas) in [2, 1].into_iter().enumerate() {
        api.set_replicas(replicas);
        let (b, b_addr) = spawn_vault(
            &member("activity-vault-1", "scale-down"),
            &dir.join(format!("b-{round}.log")),
        );
        wait_until(
            "a and b sharing the partitions",
            Duration::from_secs(90),
            sharing(vec![a_addr.clone(), b_addr]),
        )
        .await;
        kafka
            .produce_and_wait_committed(&topic, &group, partitions, round * 200, 200)
            .await;
        // b read its StatefulSet's scale once as it started (the start-up check).
        let started_reads = 2 * round + 1;
        wait_until("b's start-up read", Duration::from_secs(10), || {
            let n = api.requests().len();
            async move {
                (n == started_reads)
                    .then_some(())
                    .ok_or(format!("{n} reads"))
            }
        })
        .await;
        let stopped = tokio::time::Instant::now();
        stop_gracefully(b, "b to drain and exit 0").await;
        assert_eq!(
            api.requests().len(),
            started_reads + 1,
            "b read the scale once as it stopped"
        );
        wait_until(
            "a owning every partition",
            Duration::from_secs(90),
            sharing(vec![a_addr.clone()]),
        )
        .await;
        moved.push(stopped.elapsed());
    }
    println!(
        "static member stopped (session timeout 6 s, leave_group_on_shutdown = \"scale-down\"): \
         its partitions owned again after {:.1} s on a restart, {:.1} s on a scale-down",
        moved[0].as_secs_f64(),
        moved[1].as_secs_f64()
    );
    assert_eq!(
        api.requests(),
        vec![(scale, true); 4],
        "b read its StatefulSet's scale at each start and stop, with its token"
    );
    kafka
        .produce_and_wait_committed(&topic, &group, partitions, 400, 200)
        .await;
    stop_gracefully(a, "a to exit 0").await;
    assert_eq!(
        node.row_count(&keyspace, "user_activity"),
        600,
        "every event produced is stored, whichever member wrote it"
    );
    // Without leaving (the restart), the partitions wait for the 6 s session to expire, then for the mock's
    // rebalance (about 5 s); leaving skips the session, so the two differ by the session left
    // after the last heartbeat (5.5-6 s, see above) plus up to 1 s of the mock's session check.
    // A broken leave makes them equal to within that check.
    assert!(
        moved[0] >= Duration::from_secs(6),
        "a restarting static member keeps its partitions for its session: {moved:?}"
    );
    assert!(
        moved[1] + Duration::from_secs(3) <= moved[0],
        "a member scaled away leaves, faster than waiting for the session to expire: {moved:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
