//! The sandbox program as a process: it prints usable VAULT_* lines, takes fault and compaction
//! commands on its control port, serves the Python driver (scylla-driver, cqlsh's base) as one
//! CQL node or as a cluster of them, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn python_has_driver() -> bool {
    Command::new("python3")
        .args(["-c", "import cassandra"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running `vault-sandbox` process and the VAULT_* lines it printed.
struct Sandbox {
    child: Child,
    env: Vec<(String, String)>,
}

impl Sandbox {
    fn start(args: &[&str]) -> Sandbox {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vault-sandbox"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vault-sandbox");
        let mut env = Vec::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..3 {
            let line = lines.next().expect("a VAULT_* line").unwrap();
            let (k, v) = line.split_once('=').expect("KEY=VALUE");
            env.push((k.to_owned(), v.to_owned()));
        }
        Sandbox { child, env }
    }

    fn get(&self, k: &str) -> String {
        self.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} printed"))
    }

    /// Runs `vault-sandbox ctl CONTROL WORDS...`.
    fn ctl(&self, words: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vault-sandbox"))
            .arg("ctl")
            .arg(self.get("VAULT_SANDBOX_CONTROL"))
            .args(words)
            .output()
            .expect("run ctl")
    }

    /// Runs a Python driver script from tests/ with the VAULT_* lines in its environment, if
    /// the driver is installed.
    fn python(&self, script: &str) {
        if !python_has_driver() {
            println!("skipped {script}: `make test` installs scylla-driver (pip) first");
            return;
        }
        let out = Command::new("python3")
            .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGTERM: a clean exit, promptly.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                break;
            }
            assert!(Instant::now() < deadline, "sandbox did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A test that fails before [`Sandbox::stop`] leaves no process behind.
impl Drop for Sandbox {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn sandbox_serves_the_python_driver_takes_faults_and_stops_on_sigterm() {
    let sandbox = Sandbox::start(&["--topic", "conformance:2", "--brokers", "1"]);
    assert!(sandbox.get("VAULT_KAFKA_BROKERS").starts_with("127.0.0.1:"));
    let ctl = |words: &[&str]| sandbox.ctl(words);
    let out = ctl(&["broker", "down", "1"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok"),
        "{out:?}"
    );
    // Down, the broker refuses connections; up, it listens on its port again.
    let broker = sandbox.get("VAULT_KAFKA_BROKERS");
    assert!(
        std::net::TcpStream::connect(&broker).is_err(),
        "{broker} down"
    );
    let out = ctl(&["broker", "up", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(std::net::TcpStream::connect(&broker).is_ok(), "{broker} up");
    let out = ctl(&["no-such-command"]);
    assert!(!out.status.success(), "a bad command is refused");
    let out = ctl(&[
        "cql",
        "saturate",
        "16",
        "2ms",
        "64",
        "match",
        "user_activity",
    ]);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && answer.contains("capacity: 16")
            && answer.contains("overload_above: 64"),
        "{out:?}"
    );
    let out = ctl(&["cql", "saturate", "16", "soon", "64"]);
    assert!(
        !out.status.success(),
        "a bad saturation is refused: {out:?}"
    );
    let out = ctl(&["cql", "clear"]);
    assert!(out.status.success(), "{out:?}");
    // Compaction, now or as if days had passed: nothing to purge yet (python_driver.py
    // purges a tombstone with `cql compact`).
    let out = ctl(&["cql", "compact", "11d"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok compacted as if 11days had passed: 0 tombstones purged",
        "{out:?}"
    );
    let out = ctl(&["cql", "compact", "soon"]);
    assert!(!out.status.success(), "a bad duration is refused: {out:?}");
    let out = ctl(&["help"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cql compact [DURATION]"),
        "{out:?}"
    );

    sandbox.python("python_driver.py");
    sandbox.stop();
}

/// `--cql-nodes 3`: three CQL nodes on one port, listed in VAULT_SCYLLA_NODES; `cql routing`
/// reports where writes went, `cql move-tablet` moves a tablet, and the Python driver's token
/// map agrees with the stand-in's placement (tests/python_driver_cluster.py).
#[test]
fn sandbox_runs_a_cql_cluster_whose_placement_the_python_driver_agrees_with() {
    let sandbox = Sandbox::start(&["--topic", "cluster:1", "--brokers", "1", "--cql-nodes", "3"]);
    let nodes = sandbox.get("VAULT_SCYLLA_NODES");
    let addrs: Vec<(&str, &str)> = nodes
        .split(',')
        .map(|a| a.rsplit_once(':').expect("HOST:PORT"))
        .collect();
    let hosts: Vec<&str> = addrs.iter().map(|(h, _)| *h).collect();
    assert_eq!(hosts, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], "{nodes}");
    assert!(
        addrs.iter().all(|(_, p)| *p == addrs[0].1),
        "one port: {nodes}"
    );
    let out = sandbox.ctl(&["cql", "routing"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok writes=0 non_replica=0 by_node=0,0,0",
        "{out:?}"
    );
    let out = sandbox.ctl(&["help"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cql routing"),
        "{out:?}"
    );
    let answer = |words: &[&str]| String::from_utf8_lossy(&sandbox.ctl(words).stdout).into_owned();
    assert_eq!(
        answer(&["cql", "move-tablet", "nowhere", "0", "1"]).trim(),
        "error: keyspace 'nowhere' does not exist"
    );
    let refused = answer(&["cql", "move-tablet", "nowhere", "0", "one"]);
    assert!(refused.contains("not a list of node indexes"), "{refused}");
    sandbox.python("python_driver_cluster.py");
    if python_has_driver() {
        // pyt1 (8 tablets, RF 1): token 0 is in the fifth, (-1, 2^61 - 1].
        assert_eq!(
            answer(&["cql", "move-tablet", "pyt1", "0", "2"]).trim(),
            "ok tablet (-1,2305843009213693951] of pyt1 on nodes 2"
        );
    }
    sandbox.stop();
}

/// `--cql-tablets-by-default`: a NetworkTopologyStrategy keyspace created with no `tablets`
/// option (here by the Python driver) is a tablet keyspace, whose tablet `cql move-tablet`
/// moves; without the flag it is a vnode keyspace, which it refuses.
#[test]
fn sandbox_gives_new_nts_keyspaces_tablets_with_cql_tablets_by_default() {
    if !python_has_driver() {
        println!("skipped: `make test` installs scylla-driver (pip) first");
        return;
    }
    let create = r#"
import os
from cassandra.cluster import Cluster
host, port = os.environ["VAULT_SCYLLA_NODES"].split(",")[0].rsplit(":", 1)
cluster = Cluster([host], port=int(port), protocol_version=4, compression=False)
cluster.connect().execute(
    "CREATE KEYSPACE dflt WITH replication = {'class': 'NetworkTopologyStrategy', 'datacenter1': 1}")
cluster.shutdown()
"#;
    for by_default in [true, false] {
        let mut args = vec!["--topic", "tbd:1", "--brokers", "1"];
        if by_default {
            args.push("--cql-tablets-by-default");
        }
        let sandbox = Sandbox::start(&args);
        let out = Command::new("python3")
            .args(["-c", create])
            .envs(sandbox.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run python3");
        assert!(out.status.success(), "CREATE KEYSPACE: {out:?}");
        let out = sandbox.ctl(&["cql", "move-tablet", "dflt", "0", "0"]);
        let answer = String::from_utf8_lossy(&out.stdout);
        if by_default {
            assert!(answer.starts_with("ok tablet"), "{answer}");
        } else {
            assert!(answer.contains("not a tablet keyspace"), "{answer}");
        }
        sandbox.stop();
    }
}

#[test]
fn sandbox_refuses_a_cql_cluster_it_cannot_host() {
    for n in ["0", "9"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vault-sandbox"))
            .args(["--brokers", "1", "--cql-nodes", n])
            .output()
            .expect("run vault-sandbox");
        assert!(!out.status.success(), "--cql-nodes {n}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("1 to 8 nodes"),
            "--cql-nodes {n}: {out:?}"
        );
    }
}
