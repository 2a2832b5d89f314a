//! What one CQL request costs the ScyllaDB driver alone, without vault: prepared inserts of the
//! bench's rows (or, with `batch`, an UNLOGGED batch of a row and its day-index entry, vault's
//! default request for one event) sent with a bound on requests in flight, and this process's
//! CPU per request. Against the CQL stand-in, run apart so that its CPU is not counted:
//!
//! ```sh
//! target/release/vault-sandbox --cql 127.0.0.1:19555 --brokers 1 &
//! cargo run --release --example driver_cost -- 127.0.0.1:19555 100000 32 [batch]
//! ```
//!
//! `DRIVER_COST_RUNTIME` picks the runtime: tokio's multi-threaded one with a worker per CPU
//! (by default), `one` (one worker: vault's store runtime, `scylla.store_threads = 1`) or
//! `current` (a current-thread runtime). Everything runs in a spawned task, as vault's
//! persisters do.

use std::time::Instant;

#[path = "../benches/shared/baseline_rows.rs"]
mod baseline_rows;
#[path = "../benches/shared/proc_cpu.rs"]
mod proc_cpu;

use futures::StreamExt;

fn main() {
    let kind = std::env::var("DRIVER_COST_RUNTIME").unwrap_or_default();
    let mut runtime = match kind.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread(),
        "one" => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
        "" => tokio::runtime::Builder::new_multi_thread(),
        other => {
            eprintln!("DRIVER_COST_RUNTIME={other}: one of one, current, or unset");
            std::process::exit(2);
        }
    };
    runtime
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async { tokio::spawn(run()).await.expect("run") });
}

async fn run() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(addr), Some(count), Some(in_flight)) = (
        args.first().cloned(),
        args.get(1).and_then(|a| a.parse::<u64>().ok()),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: driver_cost HOST:PORT REQUESTS IN_FLIGHT [batch]");
        std::process::exit(2);
    };
    let batch = args.get(3).is_some_and(|a| a == "batch");
    let cfg = vault::config::ScyllaConfig {
        nodes: vec![addr],
        keyspace: "cost".into(),
        consistency: "LOCAL_QUORUM".into(),
        ..Default::default()
    };
    // Creates the keyspace and tables as vault does.
    vault::store::scylla::ScyllaStore::connect(&cfg, true)
        .await
        .expect("migrate");
    let session = vault::store::scylla::connect(&cfg).await.expect("session");
    let mut insert = session
        .prepare(baseline_rows::insert_cql("cost"))
        .await
        .expect("prepare");
    insert.set_is_idempotent(true);
    let mut day = session
        .prepare("INSERT INTO cost.user_days (user_id, day) VALUES (?, ?) USING TIMESTAMP ?")
        .await
        .expect("prepare day");
    day.set_is_idempotent(true);
    use scylla::statement::batch::{Batch, BatchType};
    let mut row_and_index = Batch::new(BatchType::Unlogged);
    row_and_index.append_statement(insert.clone());
    row_and_index.append_statement(day.clone());
    row_and_index.set_is_idempotent(true);
    let payload = vec![b'x'; 230];
    let cpu0 = proc_cpu::cpu_seconds(std::process::id());
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let (session, insert, payload, row_and_index) =
                (&session, &insert, payload.clone(), &row_and_index);
            async move {
                let values = baseline_rows::row(i, payload);
                if batch {
                    let dv = (baseline_rows::user(i), baseline_rows::DAY, 5i64);
                    session
                        .batch(row_and_index, (values, dv))
                        .await
                        .expect("batch");
                } else {
                    session
                        .execute_unpaged(insert, values)
                        .await
                        .expect("insert");
                }
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|_| std::future::ready(()))
        .await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = proc_cpu::cpu_seconds(std::process::id()) - cpu0;
    println!(
        "{count} {}, {in_flight} in flight: {:.0} requests/s, {:.2} µs of this process's CPU per request",
        if batch { "batches of a row and its index entry" } else { "inserts" },
        count as f64 / secs,
        cpu * 1e6 / count as f64
    );
}
