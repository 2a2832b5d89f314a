//! The sandbox program as a process: it prints usable VAULT_* lines, takes fault commands on its
//! control port, serves the Python driver (scylla-driver, cqlsh's base), and exits cleanly on
//! SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn python_has_driver() -> bool {
    Command::new("python3")
        .args(["-c", "import cassandra"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn sandbox_serves_the_python_driver_takes_faults_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vault-sandbox"))
        .args(["--topic", "conformance:2", "--brokers", "1"])
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
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} printed"))
    };
    assert!(get("VAULT_KAFKA_BROKERS").starts_with("127.0.0.1:"));
    let control = get("VAULT_SANDBOX_CONTROL");

    let ctl = |words: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vault-sandbox"))
            .arg("ctl")
            .arg(&control)
            .args(words)
            .output()
            .expect("run ctl")
    };
    let out = ctl(&["broker", "down", "1"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok"),
        "{out:?}"
    );
    let out = ctl(&["broker", "up", "1"]);
    assert!(out.status.success(), "{out:?}");
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

    if python_has_driver() {
        let out = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python_driver.py"
            ))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "python driver conformance failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        println!("skipped the Python driver part: `make test` installs scylla-driver (pip) first");
    }

    // SIGTERM: a clean exit, promptly.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "sandbox did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
