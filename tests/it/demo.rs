//! A small run of `make demo` (scripts/demo.sh) with the test build's binaries, so the demo
//! cannot rot: it must verify every event and leave no process behind.

use std::path::Path;
use std::process::Command;

/// The directory of the test build's `vault`, with `vault-sandbox` built beside it.
fn bin_dir() -> &'static Path {
    let vault = Path::new(env!("CARGO_BIN_EXE_vault"));
    let bin_dir = vault.parent().expect("binary directory");
    if !bin_dir.join("vault-sandbox").exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "-p", "vault-sandbox"])
            .status()
            .expect("cargo build");
        assert!(built.success(), "building vault-sandbox");
    }
    bin_dir
}

/// With CARGO_TARGET_DIR set (and no DEMO_BIN_DIR) the demo runs the binaries cargo built
/// there, not `target/release`: it asks cargo where its target directory is.
#[test]
fn the_demo_finds_the_binaries_under_cargo_target_dir() {
    let target = std::env::temp_dir().join(crate::common::unique("vault-demo-target"));
    let release = target.join("release");
    std::fs::create_dir_all(&release).unwrap();
    for bin in ["vault", "vault-sandbox"] {
        std::os::unix::fs::symlink(bin_dir().join(bin), release.join(bin)).unwrap();
    }
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"))
        .env("DEMO_EVENTS", "500")
        .env("DEMO_PARTITIONS", "2")
        .env_remove("DEMO_BIN_DIR")
        .env("DEMO_SKIP_BUILD", "1")
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run the demo");
    let _ = std::fs::remove_dir_all(&target);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("binaries in {}\n", release.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("verdict              OK: nothing lost"),
        "{stdout}"
    );
}

#[test]
fn the_demo_flow_verifies_every_event_and_stops_everything() {
    let bin_dir = bin_dir();
    let pid_file = std::env::temp_dir().join(format!("vault-demo-pids-{}", std::process::id()));
    let _ = std::fs::remove_file(&pid_file);
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"))
        .env("DEMO_EVENTS", "4000")
        .env("DEMO_PARTITIONS", "4")
        .env("DEMO_BIN_DIR", bin_dir)
        .env("DEMO_SKIP_BUILD", "1")
        .env("DEMO_PID_FILE", &pid_file)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("verdict              OK: nothing lost"),
        "{stdout}"
    );
    assert!(stdout.contains("missing              0"), "{stdout}");
    assert!(
        stderr.contains("event(s) of user-") && stdout.contains("occurred_at "),
        "the query step ran: {stdout}"
    );
    assert!(
        stdout.contains("5 event(s) over HTTP; next_page_token: yes"),
        "one page of the user's events over HTTP: {stdout}"
    );
    // Only the demo's own processes: other tests run vault binaries concurrently.
    let pids =
        std::fs::read_to_string(&pid_file).expect("the demo records the processes it starts");
    let _ = std::fs::remove_file(&pid_file);
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(
        pids.len(),
        4,
        "sandbox, vault api and two vault processes: {pids:?}"
    );
    let left: Vec<&str> = pids
        .into_iter()
        .filter(|pid| {
            // A zombie (state Z) has exited; anything else still runs.
            std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next())
                    != Some("Z")
            })
        })
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
