//! A small run of `make demo` (scripts/demo.sh) with the test build's binaries, so the demo
//! cannot rot: it must verify every event and leave no process behind.

use std::path::Path;
use std::process::Command;

#[test]
fn the_demo_flow_verifies_every_event_and_stops_everything() {
    let vault = Path::new(env!("CARGO_BIN_EXE_vault"));
    let bin_dir = vault.parent().expect("binary directory");
    let sandbox = bin_dir.join("vault-sandbox");
    if !sandbox.exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "-p", "vault-sandbox"])
            .status()
            .expect("cargo build");
        assert!(built.success(), "building vault-sandbox");
    }
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"))
        .env("DEMO_EVENTS", "4000")
        .env("DEMO_PARTITIONS", "4")
        .env("DEMO_BIN_DIR", bin_dir)
        .env("DEMO_SKIP_BUILD", "1")
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
    let left = Command::new("pgrep")
        .arg("-f")
        .arg(format!("{}/vault", bin_dir.display()))
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
