//! The fault suite: database faults while the pipeline runs (never a commit past an unwritten
//! event) and kill -9 of a real `vault run` process at random moments (nothing lost). Each test
//! prints its figures: sent, stored, lost, duplicated.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::scylla::ScyllaStore;
use vault_sandbox::cql::{CqlNode, Fault, FaultKind};

use crate::common::{
    env_or, settings, spawn_vault, stop_gracefully, unique, wait_until, Kafka, ProcessRig, Running,
};

/// `(partition, offset)` of every row in the node's user_activity table.
pub fn stored(node: &CqlNode, keyspace: &str) -> BTreeSet<(i32, i64)> {
    let rows = node
        .execute(&format!(
            "SELECT source_partition, source_offset FROM {keyspace}.user_activity"
        ))
        .expect("select")
        .expect("rows");
    rows.rows
        .iter()
        .map(|r| {
            let p = i32::from_be_bytes(r[0].clone().unwrap().try_into().unwrap());
            let o = i64::from_be_bytes(r[1].clone().unwrap().try_into().unwrap());
            (p, o)
        })
        .collect()
}

/// Write requests' rows as seen by the node (replays included).
pub fn rows_written(node: &CqlNode) -> usize {
    node.requests()
        .iter()
        .filter(|r| matches!(r.opcode, "EXECUTE" | "BATCH") && r.statement.contains("INSERT INTO"))
        .flat_map(|r| &r.tables)
        .filter(|(table, _)| table.ends_with(".user_activity"))
        .map(|(_, n)| n)
        .sum()
}

fn report(what: &str, sent: usize, stored: usize, written: usize) {
    let lost = sent.saturating_sub(stored);
    println!("{what}: sent {sent}, stored {stored}, lost {lost}, duplicated writes {} (at most the in-flight window per restart)", written.saturating_sub(stored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_faults_never_let_a_commit_pass_an_unwritten_event() {
    let kafka = Kafka::start();
    let node = CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let (topic, group) = (unique("dbfault"), unique("g"));
    let partitions = 3;
    kafka.create_source_topic(&topic, partitions).await;
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.scylla.nodes = vec![node.addr().to_string()];
    cfg.scylla.keyspace = unique("f").replace('-', "_");
    cfg.scylla.request_timeout = Duration::from_secs(2);
    let ks = cfg.scylla.keyspace.clone();
    let store = ScyllaStore::connect(&cfg.scylla, true).await.unwrap();
    let vault = Running::start(cfg, store, MemoryDeadLetters::default());
    let probe = kafka.probe(&group);

    let mut sent = 0;
    let check =
        |committed: &[Option<i64>], stored: &BTreeSet<(i32, i64)>, sent_by_part: &[Vec<i64>]| {
            for (p, c) in committed.iter().enumerate() {
                if let Some(c) = c {
                    for o in sent_by_part[p].iter().filter(|o| **o < *c) {
                        assert!(
                            stored.contains(&(p as i32, *o)),
                            "partition {p} committed {c} but offset {o} is not stored"
                        );
                    }
                }
            }
        };
    let mut sent_by_part = vec![Vec::new(); partitions as usize];
    type StartFault = Box<dyn Fn(&CqlNode)>;
    let phases: [(&str, StartFault); 5] = [
        (
            "write timeouts",
            Box::new(|n: &CqlNode| {
                n.inject(
                    Fault::new(FaultKind::WriteTimeout)
                        .matching("INSERT")
                        .probability(0.5)
                        .times(40),
                )
            }),
        ),
        (
            "overloaded",
            Box::new(|n: &CqlNode| {
                n.inject(
                    Fault::new(FaultKind::Overloaded)
                        .matching("INSERT")
                        .probability(0.5)
                        .times(40),
                )
            }),
        ),
        (
            "unavailable",
            Box::new(|n: &CqlNode| {
                n.inject(
                    Fault::new(FaultKind::Unavailable)
                        .matching("INSERT")
                        .times(20),
                )
            }),
        ),
        (
            "dropped connections",
            Box::new(|n: &CqlNode| {
                n.inject(
                    Fault::new(FaultKind::DropConnection)
                        .matching("INSERT")
                        .times(5),
                )
            }),
        ),
        (
            "a 3 s outage",
            Box::new(|n: &CqlNode| n.outage(Duration::from_secs(3))),
        ),
    ];
    for (i, (name, start_fault)) in phases.iter().enumerate() {
        start_fault(&node);
        for (p, o) in kafka.produce_events(&topic, partitions, i * 600, 600).await {
            sent_by_part[p as usize].push(o);
        }
        sent += 600;
        // While the fault lasts, sample the invariant.
        for _ in 0..20 {
            let committed = probe.committed(&topic, partitions).await;
            check(&committed, &stored(&node, &ks), &sent_by_part);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("phase {name}: invariant held");
    }
    node.clear_faults();
    probe
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(90))
        .await;
    let rows = stored(&node, &ks);
    check(
        &probe.committed(&topic, partitions).await,
        &rows,
        &sent_by_part,
    );
    report("database faults", sent, rows.len(), rows_written(&node));
    assert_eq!(rows.len(), sent, "nothing lost");
    assert!(
        vault.counter("vault_write_retries_total") > 0.0,
        "the faults were hit and retried"
    );
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing() {
    let iterations: usize = env_or("VAULT_FAULT_ITERATIONS", 10);
    let seed: u64 = env_or("VAULT_FAULT_SEED", 7);
    println!("kill -9 suite: {iterations} iterations, seed {seed} (VAULT_FAULT_ITERATIONS, VAULT_FAULT_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let partitions = 4;
    let ProcessRig {
        kafka,
        node,
        topic,
        group,
        keyspace,
        dir,
        env,
    } = ProcessRig::start("kill", partitions).await;

    let probe = kafka.probe(&group);
    let mut sent = 0usize;
    let committed_sum = || async {
        probe
            .committed(&topic, partitions)
            .await
            .iter()
            .map(|c| c.unwrap_or(0))
            .sum::<i64>()
    };
    for i in 0..iterations {
        let base = committed_sum().await;
        let (mut child, _) = spawn_vault(&env, &dir.join(format!("vault-{i}.log")));
        // Events keep arriving while the process runs.
        for _ in 0..rng.random_range(2..6) {
            kafka.produce_events(&topic, partitions, sent, 100).await;
            sent += 100;
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        }
        // Let this process make progress (it may first wait out the killed member's session),
        // then kill it at a random moment of its work.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while committed_sum().await <= base && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
        child.kill().expect("kill -9");
        let _ = child.wait();
        println!(
            "iteration {i}: killed with {} of {sent} committed",
            committed_sum().await
        );
    }
    // A last process finishes the work.
    let (child, _) = spawn_vault(&env, &dir.join("vault-final.log"));
    probe
        .wait_committed_to_end(&topic, partitions, Duration::from_secs(120))
        .await;
    let rows = stored(&node, &keyspace);
    report("kill -9", sent, rows.len(), rows_written(&node));
    stop_gracefully(child, "the final vault to exit 0 on SIGTERM").await;
    assert_eq!(
        rows.len(),
        sent,
        "lost events after kill -9 (logs in {})",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second SIGTERM while a stop waits for writes that keep failing exits at once, with 143,
/// instead of after `pipeline.shutdown_timeout`; and loses nothing: no offset
/// moved past what was stored, so the next process stores the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once_and_loses_nothing() {
    let ProcessRig {
        kafka,
        node,
        topic,
        group,
        keyspace,
        dir,
        env,
    } = ProcessRig::start("second-signal", 1).await;
    let probe = kafka.probe(&group);
    let log = dir.join("vault-0.log");
    let (mut child, metrics) = spawn_vault(&env, &log);
    kafka.produce_events(&topic, 1, 0, 100).await;
    probe
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    // Every write fails from now on: a stop would wait for them for shutdown_timeout (30 s).
    node.inject(Fault::new(FaultKind::WriteTimeout).matching("INSERT"));
    kafka.produce_events(&topic, 1, 100, 100).await;
    let term = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
    };
    let logged = |what: &'static str| {
        let log = log.clone();
        move || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains(what).then_some(()).ok_or(String::new()) }
        }
    };
    wait_until(
        "a write failing",
        Duration::from_secs(30),
        logged("Batch write failed"),
    )
    .await;
    term(child.id());
    wait_until("the first signal taken", Duration::from_secs(10), || {
        let ready = crate::common::http_get(&metrics, "/readyz");
        async move {
            match ready {
                Ok((503, body)) if body.contains("shutting down") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let second = std::time::Instant::now();
    term(child.id());
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            second.elapsed() < Duration::from_secs(10),
            "still draining 10 s after the second signal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(143), "128 + SIGTERM");
    assert_eq!(
        probe.committed(&topic, 1).await,
        [Some(100)],
        "nothing committed past what was stored"
    );
    node.clear_faults();
    let (child, _) = spawn_vault(&env, &dir.join("vault-1.log"));
    probe
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    assert_eq!(stored(&node, &keyspace).len(), 200, "every event stored");
    stop_gracefully(child, "the next vault to exit 0 on SIGTERM").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A panic (here a partition task's, which is restarted) is logged in the configured format: a
/// JSON log stays one JSON object a line, the panic's message and place among its fields.
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "injects failpoints: run with --features vault/failpoints, as make test does"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_logged_as_json_in_a_json_log() {
    let ProcessRig {
        kafka,
        node: _node,
        topic,
        group,
        dir,
        mut env,
        ..
    } = ProcessRig::start("panic-json", 1).await;
    env.push(("VAULT_LOG_FORMAT".into(), "json".into()));
    env.push((
        "FAILPOINTS".into(),
        format!("kafka::decode=return({topic}@1:once)"),
    ));
    kafka.produce_events(&topic, 1, 0, 3).await;
    let log = dir.join("vault.log");
    let (child, _) = spawn_vault(&env, &log);
    kafka
        .probe(&group)
        .wait_committed_to_end(&topic, 1, Duration::from_secs(60))
        .await;
    stop_gracefully(child, "vault to exit 0 on SIGTERM").await;
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let panic = lines
        .iter()
        .find(|l| l["message"] == "A thread panicked.")
        .unwrap_or_else(|| panic!("no panic logged in {text}"));
    assert!(
        panic["panic"]
            .as_str()
            .is_some_and(|p| p.contains("failpoint kafka::decode")),
        "{panic}"
    );
    assert!(panic["location"]
        .as_str()
        .is_some_and(|l| l.contains(".rs:")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The error vault stops on is a JSON line in a JSON log (a log shipper parses every line), and
/// plain text otherwise; both say what to fix. Here `vault run` stops once logging has started:
/// `leave_group_on_shutdown = "scale-down"` outside a pod, where no Kubernetes API is known.
#[test]
fn the_error_vault_stops_on_is_json_in_a_json_log() {
    // Only what the check needs: it runs before vault connects to anything.
    let run = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VAULT_KAFKA_INSTANCE_ID", "activity-vault-0")
            .env("VAULT_KAFKA_LEAVE_GROUP_ON_SHUTDOWN", "scale-down")
            .env("VAULT_METRICS_ADDR", "127.0.0.1:0")
            .env("VAULT_LOG_FORMAT", format)
            .output()
            .expect("run vault");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let json = run("json");
    let stopped: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|l: &serde_json::Value| l["message"] == "vault stopped.")
        .collect();
    assert_eq!(stopped.len(), 1, "{json}");
    let error = stopped[0]["error"].as_str().expect("error field");
    assert!(error.contains("KUBERNETES_SERVICE_HOST"), "{error}");
    assert_eq!(stopped[0]["level"], "ERROR");
    let text = run("text");
    assert!(
        text.lines()
            .any(|l| l.starts_with("vault: ") && l.contains("KUBERNETES_SERVICE_HOST")),
        "{text}"
    );
}
