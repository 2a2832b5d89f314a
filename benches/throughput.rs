//! `make bench`: vault measured against the two limits it sits between, in one run, on one
//! broker and one data set.
//!
//! - baseline A: a raw rdkafka consumer draining the topic (no parsing, no writing): the
//!   consume limit;
//! - baseline B: concurrent prepared inserts straight to the CQL stand-in: the write limit;
//! - vault end to end (the real binary, as a process) with the null store and with the ScyllaDB
//!   store against the stand-in (the default settings' store runs three times each, the run
//!   of median CPU per event reported);
//! - produce → commit latency at a fixed low rate;
//! - the fault run: vault with adaptive write concurrency against vault at today's fixed
//!   concurrency, each draining the same backlog into a saturated stand-in node (latency that
//!   grows with the requests in flight, Overloaded above a threshold); throughput, p99 write
//!   latency, failed attempts per stored event, and a read-back that nothing was lost; then
//!   both against the healthy node (what the limiter costs when nothing is wrong). The
//!   throughput and concurrency limit over time are drawn to target/bench/fault-run.png.
//!
//! The data: `vault produce` (realistic events of ~230 B, Zipf-skewed users) into librdkafka's
//! mock cluster hosted by this process. The mock keeps ~5 MiB per partition, so a backlog of N
//! events is spread over enough partitions to fit (64 for a million). Figures are written to
//! target/bench/results.{json,md}; ratios to the baselines are the headline.
//!
//! - the read side: p50 and p99 latency of `vault api` serving 100-event pages of a user with
//!   10,000 events over 30 days, against the stand-in (`BENCH_READ_ONLY=1` runs only this);
//! - vault idle: the CPU, as a share of one core, of a vault holding 64 partitions with nothing
//!   to read (`BENCH_STORE_ONLY=1` runs it after the store runs).
//!
//! BENCH_SCALE=0.1 runs everything on a tenth of the data (a quick check); BENCH_LATENCY_ONLY=1
//! runs only the latency measurement; BENCH_FAULT_ONLY=1 only the fault run (figures in
//! target/bench/fault-run.json); BENCH_DRAIN_ONLY=1 only the null-store drain with idle flush
//! against fixed linger; BENCH_HEALTHY_ONLY=1 only adaptive against fixed concurrency on the
//! healthy stand-in; BENCH_DEFAULT_STORE_ONLY=1 only the two store runs with the default
//! settings, uniform and Zipf-skewed (a quick A/B of CPU per event). A/B comparisons of one setting (idle flush, adaptive concurrency on
//! the healthy node) run as interleaved pairs and report the median of the pairs' ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use vault_sandbox::cql::{CqlNode, Saturation};

#[path = "shared/baseline_rows.rs"]
mod baseline_rows;
#[path = "shared/proc_cpu.rs"]
mod proc_cpu;
use proc_cpu::{cpu_seconds, cpu_split};

const VAULT: &str = env!("CARGO_BIN_EXE_vault");

/// The setting that turns shard-aware batching (the default) off: a request per partition.
const BY_PARTITION: (&str, &str) = ("VAULT_SCYLLA_BATCH_BY_REPLICA", "false");

/// The setting that turns idle flushing off: batches wait for size, bytes or linger only.
const FIXED_LINGER: (&str, &str) = ("VAULT_BATCH_FLUSH_WHEN_IDLE", "false");
/// The driver and the persisters on the main runtime (`store::runtime`): the baseline of the
/// store's own runtime.
const MAIN_RUNTIME: (&str, &str) = ("VAULT_SCYLLA_STORE_THREADS", "0");

/// Repetitions of the headline runs (baseline A, vault with the null store, the store runs by
/// replica); the median counts.
const RUNS: usize = 3;
/// Interleaved pairs of an A/B comparison (see `Bench::paired`).
const PAIRS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; a child started by this harness passes raw-consume.
    if args.get(1).map(String::as_str) == Some("raw-consume") {
        raw_consume(&args[2], &args[3], args[4].parse().expect("count"));
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets once as tests: nothing to check here.
        println!("throughput: a benchmark; run it with `make bench`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

fn say(what: &str) {
    eprintln!("\n==> {what}");
}

/// Baseline A, in a process of its own: reads `count` messages from every partition of `topic`
/// (assigned, no group), touching each payload, and prints its figures as JSON.
fn raw_consume(brokers: &str, topic: &str, count: u64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        // Fetching configured like vault's consumer: the same prefetch in all (this consumer
        // reads one queue for all partitions, so librdkafka's limit is for the whole queue),
        // the same fetch wait and the same refetch delay after a full queue (librdkafka's 1 s
        // default makes this consumer drain in either 0.5 s or 1.5 s, run to run).
        .set(
            "queued.max.messages.kbytes",
            (vault::config::KafkaConfig::default().prefetch_bytes / 1024).to_string(),
        )
        .set(
            "fetch.wait.max.ms",
            vault::kafka::FETCH_WAIT_MAX_MS.to_string(),
        )
        .set(
            "fetch.queue.backoff.ms",
            vault::kafka::FETCH_QUEUE_BACKOFF_MS.to_string(),
        )
        .create()
        .expect("raw consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let (mut n, mut bytes) = (0u64, 0usize);
    let mut started = None;
    let (from, to) = window(count);
    let (mut t_from, mut t_to) = (None, None);
    while n < count {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            if started.is_none() {
                started = Some((Instant::now(), cpu_seconds(std::process::id())));
            }
            bytes += m.payload().map_or(0, <[u8]>::len);
            n += 1;
            if n == from {
                t_from = Some(Instant::now());
            } else if n == to {
                t_to = Some(Instant::now());
            }
        }
    }
    let (t0, cpu0) = started.expect("read something");
    let secs = t0.elapsed().as_secs_f64();
    let steady = (t_to.unwrap() - t_from.unwrap()).as_secs_f64();
    let cpu = cpu_seconds(std::process::id()) - cpu0;
    println!(
        "{}",
        json!({"events": n, "bytes": bytes, "seconds": secs, "cpu_seconds": cpu,
               "steady_events": to - from, "steady_seconds": steady,
               "peak_rss_mib": peak_rss_mib(std::process::id())})
    );
}

/// How long the idle run measures (seconds).
const IDLE_SECONDS: u64 = 5;

/// The steady-state window of a drain of `count` events: from the 10% mark to the 90% mark, so
/// that neither start-up nor the tail (the last partial batches) counts in the rate.
fn window(count: u64) -> (u64, u64) {
    (count / 10, count - count / 10)
}

/// When a count sampled as `previous` and then `now` passed `mark`, at the rate between the two
/// samples (`now`'s time without an earlier sample).
fn crossing(previous: Option<(Instant, u64)>, now: (Instant, u64), mark: u64) -> Instant {
    match previous {
        Some((t0, n0)) if n0 < mark && now.1 > n0 => {
            let share = (mark - n0) as f64 / (now.1 - n0) as f64;
            t0 + (now.0 - t0).mul_f64(share.min(1.0))
        }
        _ => now.0,
    }
}

/// Peak resident set size (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The sum of a metric over its series, scraped from a vault process.
fn scrape(addr: &str, name: &str) -> Option<f64> {
    Scrape::of(addr)?.sum(name)
}

/// One read of a vault process's `/metrics`. A scrape costs the process a registry walk and an
/// encoding (a few hundred µs with its per-partition series), which it would count as its own
/// CPU: a loop that watches several metrics reads them all from one scrape.
struct Scrape(String);

impl Scrape {
    fn of(addr: &str) -> Option<Scrape> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(Scrape(body))
    }

    /// The sum of a metric over its series; `None` when it has none.
    fn sum(&self, name: &str) -> Option<f64> {
        let mut values = self
            .0
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .peekable();
        values.peek()?;
        Some(values.sum())
    }
}

/// Per partition, each committed offset seen and when it was first seen.
type CommitTimeline = BTreeMap<i32, Vec<(i64, Instant)>>;

struct Bench {
    mock: MockCluster<'static, DefaultProducerContext>,
    brokers: String,
    node: CqlNode,
    scale: f64,
}

/// Creates vault's schema in `keyspace` on the stand-in, as `vault migrate` does.
async fn migrate(node: &CqlNode, keyspace: &str) {
    let schema = vault::config::ScyllaConfig {
        nodes: vec![node.addr().to_string()],
        keyspace: keyspace.into(),
        ..Default::default()
    };
    let session = vault::store::scylla::connect(&schema)
        .await
        .expect("session");
    vault::store::scylla::migrate(&session, &schema)
        .await
        .expect("migrate");
}

/// A child process killed when dropped (a broker started for one run).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The slow-answering broker's line for the summary.
fn slow_broker_line(v: &Value) -> String {
    format!(
        "Slow-answering broker (tansu, {} events, 12 partitions, default budget): raw consumer {:.0} events/s ({:.2} s, {:.1} MiB), vault null store {:.0} events/s ({:.2} s, {:.1} MiB), **{:.2}× the raw consumer**",
        v["events"],
        v["raw_consumer"]["drain_events_per_s"].as_f64().unwrap(),
        v["raw_consumer"]["seconds"].as_f64().unwrap(),
        v["raw_consumer"]["peak_rss_mib"].as_f64().unwrap(),
        v["vault_null"]["drain_events_per_s"].as_f64().unwrap(),
        v["vault_null"]["seconds"].as_f64().unwrap(),
        v["vault_null"]["peak_rss_mib"].as_f64().unwrap(),
        v["ratio_to_raw"].as_f64().unwrap()
    )
}

/// A store run: the vault run, and CQL requests per event to the table and the day index.
struct StoreRun {
    run: VaultRun,
    rows: f64,
    index: f64,
    /// CPU µs per event of each of the runs it is the median of, in order.
    cpu_us_runs: Vec<f64>,
}

/// The store runs ([`Bench::store_runs`]): users uniform and Zipf-skewed, each by replica (the
/// default) and by partition, and the store's own runtime against the main one.
struct StoreRuns {
    uniform: StoreRun,
    zipf: StoreRun,
    by_partition: StoreRun,
    zipf_by_partition: StoreRun,
    runtimes: Paired,
}

/// Two settings compared in interleaved pairs ([`Bench::paired`]): the median run of each (by
/// rate) and the medians of the pairs' ratios, a to b.
struct Paired {
    a: VaultRun,
    b: VaultRun,
    ratio: f64,
    cpu_ratio: f64,
}

/// What one vault run measured.
struct VaultRun {
    events: u64,
    seconds: f64,
    /// Events stored, and seconds, between the 10% and 90% marks (see [`window`]).
    steady_events: u64,
    steady_seconds: f64,
    cpu_seconds: f64,
    /// Of `cpu_seconds`, those spent in the kernel (system calls, wake-ups, page faults).
    system_seconds: f64,
    peak_rss_mib: f64,
    /// Batches flushed (each one write request of the null store).
    batches: f64,
    /// The write concurrency limit, averaged over the run's samples.
    mean_limit: f64,
}

impl VaultRun {
    /// The steady-state rate (see [`window`]).
    fn rate(&self) -> f64 {
        self.steady_events as f64 / self.steady_seconds
    }
}

impl Bench {
    fn n(&self, full: u64) -> u64 {
        ((full as f64 * self.scale) as u64).max(1000)
    }

    fn env(&self, topic: &str) -> Vec<(&'static str, String)> {
        vec![
            ("VAULT_KAFKA_BROKERS", self.brokers.clone()),
            ("VAULT_KAFKA_TOPICS", topic.into()),
            ("VAULT_SCYLLA_NODES", self.node.addr().to_string()),
            ("VAULT_SCYLLA_KEYSPACE", "bench".into()),
            ("VAULT_SCYLLA_CONSISTENCY", "LOCAL_QUORUM".into()),
            ("VAULT_LOG_LEVEL", "warn".into()),
        ]
    }

    /// A topic holding `count` events made by `vault produce`, users spread evenly.
    fn topic_with(&self, name: &str, partitions: i32, count: u64) {
        // Users spread evenly, so partitions fill evenly and none outgrows the mock broker's
        // ~5 MiB retention (a Zipf-skewed key would lose its oldest events).
        self.topic_with_skew(name, partitions, count, 0.01);
    }

    /// A topic holding `count` events of 100,000 users whose activity is Zipf-distributed with
    /// exponent `skew`.
    fn topic_with_skew(&self, name: &str, partitions: i32, count: u64, skew: f64) {
        self.mock
            .create_topic(name, partitions, 1)
            .expect("create topic");
        // vault refuses to start without the dead-letter topic.
        self.mock
            .create_topic(&format!("{name}.dlq"), 1, 1)
            .expect("create dead-letter topic");
        say(&format!(
            "Producing {count} events into {name} ({partitions} partitions) with vault produce"
        ));
        self.produce(&self.brokers, name, count, skew);
    }

    /// `vault produce`: `count` events of 100,000 users, Zipf exponent `skew`, into `topic` on
    /// `brokers`.
    fn produce(&self, brokers: &str, topic: &str, count: u64, skew: f64) {
        let status = Command::new(VAULT)
            .args(["produce", "--count", &count.to_string()])
            .args(["--users", "100000", "--skew", &skew.to_string()])
            .envs(self.env(topic))
            .env("VAULT_KAFKA_BROKERS", brokers)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("vault produce");
        assert!(status.success(), "vault produce into {topic} failed");
    }

    /// Starts `vault run` on `topic` in `group`, serving metrics on `metrics`.
    fn spawn_vault(
        &self,
        topic: &str,
        group: &str,
        metrics: &str,
        extra: &[(&str, &str)],
    ) -> Child {
        Command::new(VAULT)
            .arg("run")
            .envs(self.env(topic))
            .env("VAULT_KAFKA_GROUP_ID", group)
            .env("VAULT_METRICS_ADDR", metrics)
            // The null-store runs measure the consume side alone, on purpose.
            .env("VAULT_PIPELINE_ALLOW_NULL_STORE", "true")
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("vault run")
    }

    fn baseline_a(&self, topic: &str, count: u64) -> Value {
        self.raw_consumer_on(&self.brokers, topic, count)
    }

    /// A raw rdkafka consumer (see [`raw_consume`]) draining `topic` on `brokers`.
    fn raw_consumer_on(&self, brokers: &str, topic: &str, count: u64) -> Value {
        say(&format!(
            "Baseline A: raw rdkafka consumer draining {topic}"
        ));
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["raw-consume", brokers, topic, &count.to_string()])
            .output()
            .expect("raw consumer");
        assert!(out.status.success(), "raw consumer failed");
        let v: Value = serde_json::from_slice(&out.stdout).expect("raw consumer figures");
        eprintln!(
            "    {:.0} events/s (steady state), {:.0} events/s (whole drain)",
            v["steady_events"].as_f64().unwrap() / v["steady_seconds"].as_f64().unwrap(),
            v["events"].as_f64().unwrap() / v["seconds"].as_f64().unwrap()
        );
        v
    }

    /// Runs `vault run` on `topic` until it has stored `count` events; measures from its first
    /// consumed event to the last stored one, and the steady state in between.
    async fn vault(&self, what: &str, topic: &str, count: u64, extra: &[(&str, &str)]) -> VaultRun {
        say(&format!("vault end to end, {what}: {count} events"));
        let metrics = format!("127.0.0.1:{}", free_port());
        let group = format!("bench-{topic}-{}", free_port());
        let mut child = self.spawn_vault(topic, &group, &metrics, extra);
        let pid = child.id();
        let mut start = None;
        let (from, to) = window(count);
        let (mut mark_from, mut mark_to) = (None, None);
        let mut previous: Option<(Instant, u64)> = None;
        let mut limits = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut last_report = Instant::now();
        let (end, stored) = loop {
            assert!(Instant::now() < deadline, "vault did not finish in time");
            assert!(child.try_wait().unwrap().is_none(), "vault exited early");
            // A failed scrape is no sample (its zeros would drag the interpolation back).
            let Some(seen) = Scrape::of(&metrics) else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let consumed = seen.sum("vault_events_consumed_total").unwrap_or(0.0);
            if start.is_none() && consumed > 0.0 {
                start = Some((Instant::now(), cpu_split(pid)));
            }
            let stored = seen.sum("vault_events_stored_total").unwrap_or(0.0) as u64;
            if start.is_some() {
                if let Some(l) = seen.sum("vault_write_concurrency_limit") {
                    limits.push(l);
                }
            }
            // Each mark is placed where the count crossed it between two scrapes, at the rate
            // between them, so the scrapes can be sparse (each costs vault CPU) and the marks
            // still exact to a few ms. Samples before consumption started are not used.
            let now = (Instant::now(), stored);
            let crossed = |mark: u64| crossing(previous, now, mark);
            if mark_from.is_none() && stored >= from {
                mark_from = Some((crossed(from), from));
            }
            if mark_to.is_none() && stored >= to {
                mark_to = Some((crossed(to), to));
            }
            if stored >= count {
                break (crossed(count), count);
            }
            if start.is_some() {
                previous = Some(now);
            }
            if last_report.elapsed() > Duration::from_secs(2) {
                eprintln!("    stored {stored}/{count}");
                last_report = Instant::now();
            }
            // Until consumption starts, every 10 ms (the start is not interpolated); then 4
            // scrapes a second. A scrape costs vault CPU (rendering the registry, the process
            // collector's /proc reads, the connection: 0.5 ms on an idle process, more under
            // load). At 20 a second, as no Prometheus scrapes, serving them took 3% of vault's
            // samples in the steady state of a perf profile of the store run.
            let every = if start.is_some() { 250 } else { 10 };
            tokio::time::sleep(Duration::from_millis(every)).await;
        };
        let (user, system) = cpu_split(pid);
        let rss = peak_rss_mib(pid);
        let batches = scrape(&metrics, "vault_batch_events_count").unwrap_or(f64::NAN);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = child.wait();
        let (t0, cpu0) = start.expect("consumption started");
        let ((t_from, n_from), (t_to, n_to)) = (mark_from.unwrap(), mark_to.unwrap());
        let run = VaultRun {
            events: stored,
            seconds: (end - t0).as_secs_f64(),
            steady_events: n_to - n_from,
            steady_seconds: (t_to - t_from).as_secs_f64(),
            cpu_seconds: user + system - cpu0.0 - cpu0.1,
            system_seconds: system - cpu0.1,
            peak_rss_mib: rss,
            batches,
            mean_limit: limits.iter().sum::<f64>() / limits.len().max(1) as f64,
        };
        eprintln!(
            "    {:.0} events/s (steady state), {:.0} events/s (whole drain), {:.2} µs CPU/event, peak RSS {:.1} MiB, {:.0} events/batch, write limit {:.0} on average",
            run.rate(),
            run.events as f64 / run.seconds,
            run.cpu_seconds * 1e6 / run.events as f64,
            run.peak_rss_mib,
            run.events as f64 / run.batches,
            run.mean_limit
        );
        run
    }

    /// vault with the ScyllaDB store and nothing to do: `partitions` assigned, no events. The
    /// CPU it spends in [`IDLE_SECONDS`] without scrapes, as a share of one core.
    async fn idle(&self, partitions: i32) -> f64 {
        say(&format!(
            "vault idle: {partitions} partitions, no events, {IDLE_SECONDS} s"
        ));
        let (_, _, mut child) = self
            .vault_on_empty_topic("bench-idle", partitions, &[])
            .await;
        // Past start-up: schema checks, statements prepared, first fetches.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu0 = cpu_seconds(child.id());
        tokio::time::sleep(Duration::from_secs(IDLE_SECONDS)).await;
        let share = (cpu_seconds(child.id()) - cpu0) / IDLE_SECONDS as f64;
        assert!(child.try_wait().unwrap().is_none(), "vault exited early");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        eprintln!("    {:.2}% of a core", share * 100.0);
        share
    }

    /// vault with the ScyllaDB store on a fresh topic of `count` events with user skew `skew`:
    /// the run, and the CQL requests per event it sent to the main table (by partition each with
    /// its partition's day-index entry) and to the day index alone (by replica). With `times`
    /// above 1, vault drains the topic that many times (a new group each) and the run of median
    /// CPU per event is the one reported: one run's CPU per event moves by a quarter from run to
    /// run on these machines.
    async fn store_run(
        &self,
        what: &str,
        topic: &str,
        count: u64,
        skew: f64,
        extra: &[(&str, &str)],
        times: usize,
    ) -> StoreRun {
        self.topic_with_skew(topic, 64, count, skew);
        let mut runs = Vec::with_capacity(times);
        for _ in 0..times.max(1) {
            self.node.clear_requests();
            let run = self
                .vault(
                    &format!("ScyllaDB store (CQL stand-in), {what}"),
                    topic,
                    count,
                    extra,
                )
                .await;
            let requests = self.node.requests();
            let count_of = |table: &str| {
                requests
                    .iter()
                    .filter(|r| {
                        matches!(r.opcode, "EXECUTE" | "BATCH")
                            && r.statement.contains(&format!("INSERT INTO bench.{table}"))
                    })
                    .count() as f64
                    / count as f64
            };
            let (rows, index) = (count_of("user_activity"), count_of("user_days"));
            eprintln!(
                "    CQL requests per event: {rows:.4} to the table, {index:.4} to the day index alone"
            );
            runs.push(StoreRun {
                run,
                rows,
                index,
                cpu_us_runs: Vec::new(),
            });
        }
        let cpu_us = |r: &StoreRun| r.run.cpu_seconds * 1e6 / r.run.events as f64;
        runs.sort_by(|a, b| cpu_us(a).total_cmp(&cpu_us(b)));
        let cpu_us_runs: Vec<f64> = runs.iter().map(cpu_us).collect();
        if runs.len() > 1 {
            eprintln!(
                "    CPU per event of the {} runs: {} µs; the median run is reported",
                runs.len(),
                cpu_us_runs
                    .iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut median = runs.swap_remove(runs.len() / 2);
        median.cpu_us_runs = cpu_us_runs;
        median
    }

    /// The slow-answering-broker run: `tansu` (a Kafka-compatible broker that answers every
    /// fetch after `fetch.wait.max.ms`, as a remote or loaded broker does) with `count` events
    /// over 12 partitions, drained by the raw consumer and by vault with the null store, both
    /// with vault's default prefetch budget. `None` when `tansu` is not installed (`make tansu`).
    async fn slow_broker(&self, count: u64) -> Option<Value> {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let broker = match Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => KillOnDrop(child),
            Err(_) => {
                say("Slow-answering broker: skipped (tansu is not installed; `make tansu` installs it)");
                return None;
            }
        };
        say(&format!(
            "Slow-answering broker (tansu, pid {}): {count} events over 12 partitions",
            broker.0.id()
        ));
        let topic = "slow";
        for (name, partitions) in [(topic, "12"), ("slow.dlq", "1")] {
            let mut tries = 0;
            while !Command::new("tansu")
                .args([
                    "topic",
                    "create",
                    "--broker",
                    &url,
                    "--partitions",
                    partitions,
                    name,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                tries += 1;
                assert!(tries < 50, "tansu did not take the topic {name}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.produce(&addr, topic, count, 0.01);
        let raw = self.raw_consumer_on(&addr, topic, count);
        let drained = self
            .vault(
                "null store, slow-answering broker (tansu)",
                topic,
                count,
                &[
                    ("VAULT_PIPELINE_STORE", "null"),
                    ("VAULT_KAFKA_BROKERS", &addr),
                ],
            )
            .await;
        let raw_drain = raw["events"].as_f64().unwrap() / raw["seconds"].as_f64().unwrap();
        let drain = drained.events as f64 / drained.seconds;
        Some(json!({
            "events": count, "partitions": 12,
            "raw_consumer": {"drain_events_per_s": raw_drain, "seconds": raw["seconds"], "cpu_seconds": raw["cpu_seconds"], "peak_rss_mib": raw["peak_rss_mib"]},
            "vault_null": {"drain_events_per_s": drain, "seconds": drained.seconds, "cpu_seconds": drained.cpu_seconds, "peak_rss_mib": drained.peak_rss_mib},
            "ratio_to_raw": drain / raw_drain,
        }))
    }

    /// `runs` runs each of two settings of the same drain, interleaved (a b, b a, a b, ...) so
    /// that the machine's drift falls on both alike: the median run of each (by steady rate),
    /// and the median of the pairs' rate ratios a / b, which is what the A/B targets judge.
    async fn paired(
        &self,
        topic: &str,
        count: u64,
        runs: usize,
        a: (&str, &[(&str, &str)]),
        b: (&str, &[(&str, &str)]),
    ) -> Paired {
        let rate = VaultRun::rate;
        let cpu = |r: &VaultRun| r.cpu_seconds / r.events as f64;
        let (mut a_runs, mut b_runs) = (Vec::new(), Vec::new());
        let (mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let (first, second) = if i % 2 == 0 { (a, b) } else { (b, a) };
            let x = self.vault(first.0, topic, count, first.1).await;
            let y = self.vault(second.0, topic, count, second.1).await;
            let (ra, rb) = if i % 2 == 0 { (x, y) } else { (y, x) };
            ratios.push(rate(&ra) / rate(&rb));
            cpu_ratios.push(cpu(&ra) / cpu(&rb));
            eprintln!(
                "    pair {}: {:.3}× the rate, {:.3}× the CPU per event",
                i + 1,
                ratios[i],
                cpu_ratios[i]
            );
            a_runs.push(ra);
            b_runs.push(rb);
        }
        let median_run = |mut v: Vec<VaultRun>| {
            v.sort_by(|x, y| rate(x).total_cmp(&rate(y)));
            v.swap_remove(v.len() / 2)
        };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (ratio, cpu_ratio) = (median(ratios), median(cpu_ratios));
        eprintln!(
            "    median ratios of {runs} interleaved pairs: {ratio:.3}× the rate, {cpu_ratio:.3}× the CPU per event"
        );
        Paired {
            a: median_run(a_runs),
            b: median_run(b_runs),
            ratio,
            cpu_ratio,
        }
    }

    /// The null-store drain of `topic` with the default idle flush against a fixed linger
    /// (`batch.flush_when_idle = false`), in interleaved pairs.
    async fn idle_against_fixed_linger(
        &self,
        topic: &str,
        count: u64,
    ) -> (VaultRun, VaultRun, f64) {
        let p = self
            .paired(
                topic,
                count,
                PAIRS,
                ("null store", &[("VAULT_PIPELINE_STORE", "null")]),
                (
                    "null store, fixed linger",
                    &[("VAULT_PIPELINE_STORE", "null"), FIXED_LINGER],
                ),
            )
            .await;
        (p.a, p.b, p.ratio)
    }

    /// The ScyllaDB-store drain of `topic` into the healthy stand-in with adaptive against fixed
    /// write concurrency, in interleaved pairs, by partition as in the fault run.
    async fn adaptive_against_fixed_healthy(
        &self,
        topic: &str,
        count: u64,
    ) -> (VaultRun, VaultRun, f64) {
        let p = self
            .paired(
                topic,
                count,
                PAIRS,
                ("healthy stand-in, adaptive concurrency", &[BY_PARTITION]),
                (
                    "healthy stand-in, fixed concurrency",
                    &[BY_PARTITION, ("VAULT_SCYLLA_ADAPTIVE_CONCURRENCY", "false")],
                ),
            )
            .await;
        (p.a, p.b, p.ratio)
    }

    /// The store runs of `count` events: users uniform (`count`) and Zipf-skewed (half as
    /// many), by replica (the default) and by partition; then the store's own runtime against
    /// the driver on the main one.
    async fn store_runs(&self, count: u64) -> StoreRuns {
        let uniform = self
            .store_run("users uniform", "bench-scylla", count, 0.01, &[], RUNS)
            .await;
        let zipf = self
            .store_run(
                "users Zipf 1.1",
                "bench-scylla-zipf",
                count / 2,
                1.1,
                &[],
                RUNS,
            )
            .await;
        let by_partition = self
            .store_run(
                "users uniform, by partition",
                "bench-scylla-partition",
                count,
                0.01,
                &[BY_PARTITION],
                1,
            )
            .await;
        let zipf_by_partition = self
            .store_run(
                "users Zipf 1.1, by partition",
                "bench-scylla-zipf-partition",
                count / 2,
                1.1,
                &[BY_PARTITION],
                1,
            )
            .await;
        let runtimes = self
            .store_runtime_against_main("bench-scylla-runtimes", count)
            .await;
        StoreRuns {
            uniform,
            zipf,
            by_partition,
            zipf_by_partition,
            runtimes,
        }
    }

    /// The ScyllaDB-store drain of `count` events of users spread evenly (a fresh `topic`), by
    /// partition (where a request is sent per event or so, and its wake-ups matter), with the
    /// store's own runtime (the default) against the driver on the main runtime
    /// (`scylla.store_threads = 0`), in interleaved pairs.
    async fn store_runtime_against_main(&self, topic: &str, count: u64) -> Paired {
        self.topic_with_skew(topic, 64, count, 0.01);
        self.paired(
            topic,
            count,
            PAIRS,
            (
                "ScyllaDB store (stand-in), users uniform, by partition, the store's own runtime",
                &[BY_PARTITION],
            ),
            (
                "ScyllaDB store (stand-in), users uniform, by partition, driver on the main runtime",
                &[BY_PARTITION, MAIN_RUNTIME],
            ),
        )
        .await
    }

    /// vault with the null store (acknowledges without storing) on `topic`.
    async fn vault_null(&self, topic: &str, count: u64) -> VaultRun {
        self.vault(
            "null store",
            topic,
            count,
            &[("VAULT_PIPELINE_STORE", "null")],
        )
        .await
    }

    /// Baseline B: `count` prepared inserts, `concurrency` at a time, straight to the stand-in.
    async fn baseline_b(&self, count: u64, concurrency: usize) -> Value {
        say(&format!(
            "Baseline B: {count} concurrent prepared inserts to the CQL stand-in"
        ));
        let cfg = vault::config::ScyllaConfig {
            nodes: vec![self.node.addr().to_string()],
            keyspace: "bench".into(),
            consistency: "LOCAL_QUORUM".into(),
            ..Default::default()
        };
        let session = vault::store::scylla::connect(&cfg).await.expect("session");
        let mut insert = session
            .prepare(baseline_rows::insert_cql("bench"))
            .await
            .expect("prepare");
        insert.set_is_idempotent(true);
        let payload = vec![b'x'; 230];
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        stream::iter(0..count)
            .map(|i| {
                let (session, insert, payload) = (&session, &insert, payload.clone());
                async move {
                    session
                        .execute_unpaged(insert, baseline_rows::row(i, payload))
                        .await
                        .expect("insert");
                }
            })
            .buffer_unordered(concurrency)
            .for_each(|_| {
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 50_000 == 0 {
                    eprintln!("    {n}/{count}");
                }
                std::future::ready(())
            })
            .await;
        let secs = started.elapsed().as_secs_f64();
        eprintln!("    {:.0} inserts/s", count as f64 / secs);
        json!({"events": count, "seconds": secs, "concurrency": concurrency})
    }

    /// A fresh topic of `partitions` (and its dead-letter topic), and `vault run` on it holding
    /// them all: the topic, vault's group, and its process.
    async fn vault_on_empty_topic(
        &self,
        prefix: &str,
        partitions: i32,
        extra: &[(&str, &str)],
    ) -> (&'static str, String, Child) {
        // Leaked: a few topic names a run.
        let topic: &'static str = format!("{prefix}-{}", free_port()).leak();
        self.mock.create_topic(topic, partitions, 1).expect("topic");
        self.mock
            .create_topic(&format!("{topic}.dlq"), 1, 1)
            .expect("dead-letter topic");
        let group = format!("{prefix}-{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = self.spawn_vault(topic, &group, &metrics, extra);
        let deadline = Instant::now() + Duration::from_secs(60);
        while scrape(&metrics, "vault_assigned_partitions").unwrap_or(0.0) < partitions as f64 {
            assert!(Instant::now() < deadline, "vault did not join");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (topic, group, child)
    }

    /// Produces at `rate` events/s for `seconds` into a fresh topic while vault (ScyllaDB store)
    /// runs; returns each event's produce → commit latency in milliseconds.
    async fn latency(&self, rate: u64, seconds: u64, extra: &[(&str, &str)]) -> Vec<f64> {
        say(&format!(
            "produce -> commit latency at {rate} events/s for {seconds}s"
        ));
        // A topic per run: the bench measures fixed linger and idle flush one after the other.
        let partitions = 8;
        let (topic, group, mut child) = self
            .vault_on_empty_topic("bench-latency", partitions, extra)
            .await;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "0")
            .create()
            .expect("producer");
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("probe");
        let probe = Arc::new(probe);
        // Sent (partition, offset) → send instant, filled as deliveries arrive.
        let sent: Arc<std::sync::Mutex<BTreeMap<(i32, i64), Instant>>> = Arc::default();
        let total = rate * seconds;
        let producing = {
            let sent = sent.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                let mut pending = Vec::new();
                for i in 0..total {
                    tick.tick().await;
                    let value = format!(
                        r#"{{"user_id":"lat-{}","event_type":"click","occurred_at":"{}"}}"#,
                        i % 500,
                        chrono::Utc::now().to_rfc3339()
                    );
                    let key = format!("lat-{}", i % 500);
                    let at = Instant::now();
                    let record = FutureRecord::to(topic)
                        .key(key.as_bytes())
                        .payload(value.as_bytes());
                    let d = producer
                        .send_result(record)
                        .map_err(|(e, _)| e)
                        .expect("send");
                    pending.push((at, d));
                }
                for (at, d) in pending {
                    let delivered = d.await.expect("producer").expect("delivered");
                    sent.lock()
                        .unwrap()
                        .insert((delivered.partition, delivered.offset), at);
                }
            }
        };
        // Committed offsets sampled every 5 ms: an event counts as committed at the first sample
        // whose committed offset is past it.
        let committed_at: Arc<std::sync::Mutex<CommitTimeline>> = Arc::default();
        let sampling = {
            let (probe, committed_at) = (probe.clone(), committed_at.clone());
            tokio::task::spawn_blocking(move || {
                let stop = Instant::now() + Duration::from_secs(seconds + 10);
                while Instant::now() < stop {
                    let mut tpl = TopicPartitionList::new();
                    for p in 0..partitions {
                        tpl.add_partition(topic, p);
                    }
                    if let Ok(c) = probe.committed_offsets(tpl, Duration::from_secs(2)) {
                        let now = Instant::now();
                        let mut map = committed_at.lock().unwrap();
                        for e in c.elements() {
                            if let Offset::Offset(o) = e.offset() {
                                let v = map.entry(e.partition()).or_default();
                                if v.last().is_none_or(|(last, _)| *last < o) {
                                    v.push((o, now));
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        producing.await;
        sampling.await.unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let sent = sent.lock().unwrap();
        let committed = committed_at.lock().unwrap();
        let mut latencies = Vec::with_capacity(sent.len());
        for (&(p, o), &at) in sent.iter() {
            let when = committed
                .get(&p)
                .and_then(|v| v.iter().find(|(c, _)| *c > o))
                .map(|(_, t)| *t);
            match when {
                Some(t) => latencies.push(t.saturating_duration_since(at).as_secs_f64() * 1e3),
                None => panic!("event {p}/{o} was never committed"),
            }
        }
        latencies.sort_by(f64::total_cmp);
        latencies
    }
}

/// The saturated node of the fault run: 16 statements (rows or day-index entries) at once are
/// served in 2 ms (8,000 a second), more queue (latency grows with the statements in flight),
/// and above 64 in flight it answers Overloaded. vault at its fixed maximum (256 write permits,
/// one request each) sends far more.
fn saturation(keyspace: &str) -> Saturation {
    Saturation::new(16, Duration::from_millis(2), 64).matching(&format!("{keyspace}."))
}

/// What one fault run measured.
struct FaultRun {
    label: &'static str,
    adaptive: bool,
    events: u64,
    /// Steady-state (10% to 90% mark) and whole-drain rates, events/s.
    rate: f64,
    drain: f64,
    /// Failed write attempts (vault_write_retries_total) per stored event.
    failed_per_event: f64,
    /// Overloaded answers of the node per stored event.
    overloaded_per_event: f64,
    /// p50 and p99 latency of a CQL write request at the node, ms.
    p50_ms: f64,
    p99_ms: f64,
    /// Rows in the run's table after the drain.
    rows: usize,
    /// Statements in one write request, on average (the node sheds load above about
    /// `overload_above` statements in flight, so above `overload_above / this` write permits).
    statements_per_request: f64,
    /// vault exited 0 on SIGTERM.
    clean_exit: bool,
    /// (seconds since the first event was read, events stored per second over the last 0.5 s,
    /// the write concurrency limit)
    timeline: Vec<(f64, f64, f64)>,
}

impl Bench {
    /// Drains `topic` (`count` events) with vault into a keyspace of its own while the node is
    /// saturated, sampling the rows stored and the concurrency limit every 100 ms.
    async fn fault_run(
        &self,
        label: &'static str,
        topic: &str,
        count: u64,
        adaptive: bool,
    ) -> FaultRun {
        say(&format!(
            "Fault run, {label}: {count} events into a saturated stand-in"
        ));
        let keyspace = format!("bench_fault_{}", label.replace(' ', "_"));
        migrate(&self.node, &keyspace).await;
        self.node.saturate(saturation(&keyspace));
        self.node.clear_requests();
        let metrics = format!("127.0.0.1:{}", free_port());
        let group = format!("bench-fault-{}", free_port());
        let adaptive_env = adaptive.to_string();
        let mut child = self.spawn_vault(
            topic,
            &group,
            &metrics,
            &[
                ("VAULT_SCYLLA_KEYSPACE", &keyspace),
                ("VAULT_SCYLLA_ADAPTIVE_CONCURRENCY", &adaptive_env),
                // By partition: the saturated node admits 64 statements at once, fewer than a
                // batch by replica holds (100 rows), so only requests of a partition each give
                // the limiter room to act; it is the per-request limit that is measured here.
                BY_PARTITION,
                // With the default 30 s, the fixed run's batches wait up to a minute between
                // tries (jitter included) and the run takes many minutes; both runs get 1 s.
                ("VAULT_PIPELINE_RETRY_MAX_BACKOFF", "1s"),
            ],
        );
        let (from, to) = window(count);
        let (mut start, mut mark_from, mut mark_to) = (None, None, None);
        let mut samples: Vec<(Instant, f64, f64)> = Vec::new();
        let mut gauges: Vec<[f64; FAULT_SERIES.len()]> = Vec::new();
        // CPU seconds of vault and of this process (the stand-in node, the mock broker).
        let mut cpu: Vec<(f64, f64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut last_report = Instant::now();
        let (end, stored) = loop {
            assert!(Instant::now() < deadline, "vault did not finish in time");
            assert!(child.try_wait().unwrap().is_none(), "vault exited early");
            let now = Instant::now();
            let seen = Scrape::of(&metrics);
            let metric = |name| seen.as_ref().and_then(|s| s.sum(name)).unwrap_or(0.0);
            if start.is_none() && metric("vault_events_consumed_total") > 0.0 {
                start = Some(now);
            }
            // Distinct rows in the table, not vault_events_stored_total, which also counts the
            // rows a restarted partition writes again.
            let stored = self.node.row_count(&keyspace, "user_activity") as f64;
            let limit = metric("vault_write_concurrency_limit");
            if start.is_some() {
                samples.push((now, stored, limit));
                gauges.push(FAULT_SERIES.map(metric));
                cpu.push((cpu_seconds(child.id()), cpu_seconds(std::process::id())));
            }
            let n = stored as u64;
            if mark_from.is_none() && n >= from {
                mark_from = Some((now, n));
            }
            if mark_to.is_none() && n >= to {
                mark_to = Some((now, n));
            }
            if n >= count {
                break (now, n);
            }
            if last_report.elapsed() > Duration::from_secs(2) {
                eprintln!("    stored {n}/{count}, concurrency limit {limit}");
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let retries = scrape(&metrics, "vault_write_retries_total").unwrap_or(0.0);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let clean_exit = child.wait().is_ok_and(|s| s.success());
        let stats = self.node.saturation_stats();
        self.node.clear_faults();
        let rows = self.node.row_count(&keyspace, "user_activity");
        let t0 = start.expect("consumption started");
        let timeline: Vec<(f64, f64, f64)> = samples
            .iter()
            .enumerate()
            .map(|(i, &(t, stored, limit))| {
                let (t_then, stored_then, _) = samples[i.saturating_sub(5)];
                let dt = (t - t_then).as_secs_f64();
                let rate = if dt > 0.0 {
                    (stored - stored_then) / dt
                } else {
                    0.0
                };
                ((t - t0).as_secs_f64(), rate, limit)
            })
            .collect();
        write_series(label, &timeline, &gauges, &cpu);
        let mut latencies: Vec<f64> = stats
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let ((t_from, n_from), (t_to, n_to)) = (mark_from.unwrap(), mark_to.unwrap());
        let log = self.node.requests();
        let writes: Vec<_> = log
            .iter()
            .filter(|r| matches!(r.opcode, "EXECUTE" | "BATCH") && r.statement.contains("INSERT"))
            .collect();
        let (requests, statements) = writes.iter().fold((0, 0), |(n, k), r| (n + 1, k + r.rows));
        write_node_series(label, t0, &writes);
        let run = FaultRun {
            label,
            adaptive,
            events: stored,
            rate: (n_to - n_from) as f64 / (t_to - t_from).as_secs_f64(),
            drain: stored as f64 / (end - t0).as_secs_f64(),
            failed_per_event: retries / stored as f64,
            overloaded_per_event: stats.overloaded as f64 / stored as f64,
            p50_ms: percentile(&latencies, 0.5),
            p99_ms: percentile(&latencies, 0.99),
            rows,
            statements_per_request: statements as f64 / requests.max(1) as f64,
            clean_exit,
            timeline,
        };
        eprintln!(
            "    {:.0} events/s (steady state), {:.0} events/s (whole drain), p99 write {:.1} ms, {:.3} failed attempts and {:.3} Overloaded answers per stored event, {:.2} statements per write request, {} of {count} rows stored",
            run.rate, run.drain, run.p99_ms, run.failed_per_event, run.overloaded_per_event, run.statements_per_request, run.rows
        );
        run
    }

    /// The fault run: fixed concurrency, then adaptive, on one backlog; draws the plot.
    /// Then both again against the healthy node, for what the limiter costs when nothing is
    /// wrong (the ratio of the steady rates is returned beside the figures).
    async fn fault_runs(&self, count: u64) -> (FaultRun, FaultRun, Value, f64) {
        let topic = "bench-fault";
        self.topic_with(topic, 16, count);
        let fixed = self.fault_run("fixed", topic, count, false).await;
        let adaptive = self.fault_run("adaptive", topic, count, true).await;
        let (healthy_adaptive, healthy_fixed, healthy_ratio) =
            self.adaptive_against_fixed_healthy(topic, count).await;
        let steady = VaultRun::rate;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("fault-run.png");
        if let Err(e) = plot_fault_runs(&png, &[&adaptive, &fixed]) {
            panic!("drawing {}: {e}", png.display());
        }
        eprintln!("    plot: {}", png.display());
        let summary = |r: &FaultRun| {
            json!({"adaptive": r.adaptive, "events": r.events, "events_per_s": r.rate, "drain_events_per_s": r.drain,
                   "p50_write_ms": r.p50_ms, "p99_write_ms": r.p99_ms,
                   "failed_attempts_per_event": r.failed_per_event, "overloaded_per_event": r.overloaded_per_event,
                   "rows_stored": r.rows, "clean_exit": r.clean_exit,
                   "statements_per_request": r.statements_per_request,
                   "lowest_limit": r.timeline.iter().map(|s| s.2).fold(f64::INFINITY, f64::min),
                   "mean_limit": r.timeline.iter().map(|s| s.2).sum::<f64>() / r.timeline.len().max(1) as f64})
        };
        let s = saturation("ks");
        let value = json!({
            "events": count,
            "node": {"capacity": s.capacity, "base_latency_ms": s.base_latency.as_secs_f64() * 1e3, "overload_above": s.overload_above},
            "adaptive": summary(&adaptive),
            "fixed": summary(&fixed),
            "rate_ratio_to_fixed": adaptive.rate / fixed.rate,
            "p99_ratio_to_fixed": adaptive.p99_ms / fixed.p99_ms,
            "failed_attempts_ratio_to_fixed": adaptive.failed_per_event / fixed.failed_per_event.max(f64::MIN_POSITIVE),
            "plot": "target/bench/fault-run.png",
            "healthy": {"fixed_events_per_s": steady(&healthy_fixed), "adaptive_events_per_s": steady(&healthy_adaptive),
                        "rate_ratio_to_fixed": healthy_ratio, "interleaved_pairs": PAIRS},
        });
        (adaptive, fixed, value, healthy_ratio)
    }
}

/// Throughput (top) and the write concurrency limit (bottom) over time, one line per run.
fn plot_fault_runs(
    path: &std::path::Path,
    runs: &[&FaultRun],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::FontStyle;
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the bundled font does not load")?;
    let root = BitMapBackend::new(path, (1000, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(360);
    let s = saturation("ks");
    let caption = format!(
        "Draining into a saturated node ({} statements at once in {} ms, Overloaded above {})",
        s.capacity,
        s.base_latency.as_millis(),
        s.overload_above
    );
    // A write permit is one request, of the adaptive run's statements per request on average
    // (the fixed run's requests are mostly shed attempts); no line without one.
    let shed = runs
        .iter()
        .find(|r| r.adaptive && r.statements_per_request > 0.0)
        .map(|r| s.overload_above as f64 / r.statements_per_request);
    draw_panel(
        &top,
        runs,
        |p| p.1,
        "events stored per second (0.5 s window)",
        Some(&caption),
        None,
        SeriesLabelPosition::LowerRight,
    )?;
    draw_panel(
        &bottom,
        runs,
        |p| p.2,
        "write concurrency limit",
        None,
        shed,
        SeriesLabelPosition::UpperRight,
    )?;
    root.present()?;
    Ok(())
}

/// What the fault run records of vault at each sample besides the limit, into
/// `target/bench/fault-run-<label>.csv` (for reading what throughput did and why, beside the
/// plot).
const FAULT_SERIES: [&str; 7] = [
    "vault_write_requests_in_flight",
    "vault_in_flight_batches",
    "vault_in_flight_bytes",
    "vault_kafka_prefetched_bytes",
    "vault_write_retries_total",
    "vault_events_consumed_total",
    "vault_events_stored_total",
];

/// Writes a fault run's samples: its timeline, [`FAULT_SERIES`] and the CPU seconds of vault
/// and of the bench's own process (the stand-in node, the mock broker), one line per sample.
fn write_series(
    label: &str,
    timeline: &[(f64, f64, f64)],
    gauges: &[[f64; FAULT_SERIES.len()]],
    cpu: &[(f64, f64)],
) {
    let mut csv = format!(
        "seconds,stored_per_second,write_concurrency_limit,{},vault_cpu_seconds,bench_cpu_seconds\n",
        FAULT_SERIES.join(",")
    );
    for (((t, rate, limit), g), (vault, bench)) in timeline.iter().zip(gauges).zip(cpu) {
        let g: Vec<String> = g.iter().map(|v| format!("{v:.0}")).collect();
        let _ = writeln!(
            csv,
            "{t:.3},{rate:.0},{limit:.0},{},{vault:.2},{bench:.2}",
            g.join(",")
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("fault-run-{}.csv", label.replace(' ', "-")));
    if let Err(e) = std::fs::write(&path, csv) {
        eprintln!("    could not write {}: {e}", path.display());
    }
}

/// Writes what the node received in a fault run, per half second since `t0`: write requests,
/// their statements, and of those the rows of the main table, into
/// `target/bench/fault-run-<label>-node.csv`.
fn write_node_series(label: &str, t0: Instant, writes: &[&vault_sandbox::cql::LoggedRequest]) {
    let mut buckets: Vec<(usize, usize, usize)> = Vec::new();
    for r in writes {
        let Some(since) = r.at.checked_duration_since(t0) else {
            continue;
        };
        let i = (since.as_secs_f64() / 0.5) as usize;
        if buckets.len() <= i {
            buckets.resize(i + 1, (0, 0, 0));
        }
        let rows: usize = r
            .tables
            .iter()
            .filter(|(t, _)| t.ends_with(".user_activity"))
            .map(|(_, n)| n)
            .sum();
        let b = &mut buckets[i];
        *b = (b.0 + 1, b.1 + r.rows, b.2 + rows);
    }
    let mut csv = String::from("seconds,write_requests,statements,user_activity_rows\n");
    for (i, (n, k, rows)) in buckets.iter().enumerate() {
        let _ = writeln!(csv, "{:.1},{n},{k},{rows}", i as f64 * 0.5);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let path = dir.join(format!("fault-run-{}-node.csv", label.replace(' ', "-")));
    if let Err(e) = std::fs::write(&path, csv) {
        eprintln!("    could not write {}: {e}", path.display());
    }
}

/// One panel of the fault-run plot: `value` of each run's timeline over time, and optionally a
/// horizontal line at `mark` (the permits at which the node sheds load).
fn draw_panel<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    runs: &[&FaultRun],
    value: impl Fn(&(f64, f64, f64)) -> f64,
    y_desc: &str,
    caption: Option<&str>,
    mark: Option<f64>,
    legend_at: plotters::prelude::SeriesLabelPosition,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    let colors = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
    let t_max = runs
        .iter()
        .filter_map(|r| r.timeline.last().map(|s| s.0))
        .fold(1.0, f64::max);
    let y_max = runs
        .iter()
        .flat_map(|r| r.timeline.iter().map(&value))
        .chain(mark)
        .fold(1.0, f64::max)
        * 1.1;
    let mut builder = ChartBuilder::on(area);
    if let Some(c) = caption {
        builder.caption(c, ("sans-serif", 18));
    }
    let mut chart = builder
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (run, color) in runs.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                run.timeline.iter().map(|p| (p.0, value(p))),
                color.stroke_width(2),
            ))?
            .label(format!("{} concurrency", run.label))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if let Some(at) = mark {
        chart
            .draw_series(LineSeries::new(
                [(0.0, at), (t_max, at)],
                BLACK.mix(0.5).stroke_width(1),
            ))?
            .label("permits at which the node sheds load")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    chart
        .configure_series_labels()
        .position(legend_at)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The fault run's targets: nothing lost in either run; with the limiter, no less throughput,
/// a p99 write latency no higher, and at most a tenth of the failed attempts per stored event;
/// against the healthy node, no less throughput.
fn fault_targets(adaptive: &FaultRun, fixed: &FaultRun, healthy_ratio: f64) -> Value {
    let lost_nothing = |r: &FaultRun| r.rows as u64 == r.events && r.clean_exit;
    json!({
        "fault_nothing_lost": lost_nothing(adaptive) && lost_nothing(fixed),
        "fault_adaptive_rate_ge_0.95_fixed": adaptive.rate >= 0.95 * fixed.rate,
        "fault_adaptive_p99_le_fixed": adaptive.p99_ms <= fixed.p99_ms,
        "fault_adaptive_failed_attempts_le_0.1_fixed": adaptive.failed_per_event <= 0.1 * fixed.failed_per_event,
        "healthy_adaptive_rate_ge_0.95_fixed": healthy_ratio >= 0.95,
    })
}

/// The fault run side by side, as a Markdown table.
fn fault_table(adaptive: &FaultRun, fixed: &FaultRun, healthy: &Value) -> String {
    let s = saturation("ks");
    let mut md = format!(
        "Fault run: {} events into a saturated stand-in ({} statements at once in {} ms, more queue, Overloaded above {} statements in flight)\n\n\
         | concurrency | events/s (steady) | vs fixed | events/s (whole drain) | p50 / p99 write ms (at the node) | failed attempts per stored event | Overloaded per stored event | limit: lowest / mean | rows stored |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        adaptive.events,
        s.capacity,
        s.base_latency.as_millis(),
        s.overload_above
    );
    for r in [adaptive, fixed] {
        let lowest = r.timeline.iter().map(|s| s.2).fold(f64::INFINITY, f64::min);
        let mean = r.timeline.iter().map(|s| s.2).sum::<f64>() / r.timeline.len().max(1) as f64;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2}× | {:.0} | {:.1} / {:.1} | {:.3} | {:.3} | {:.0} / {:.0} | {} of {} |",
            r.label,
            r.rate,
            r.rate / fixed.rate,
            r.drain,
            r.p50_ms,
            r.p99_ms,
            r.failed_per_event,
            r.overloaded_per_event,
            lowest,
            mean,
            r.rows,
            r.events
        );
    }
    let _ = writeln!(
        md,
        "\nThe same backlog against the healthy stand-in: adaptive {:.0} events/s, fixed {:.0} (steady, medians), {:.2}× fixed (the median ratio of {PAIRS} interleaved pairs)",
        healthy["adaptive_events_per_s"].as_f64().unwrap_or(f64::NAN),
        healthy["fixed_events_per_s"].as_f64().unwrap_or(f64::NAN),
        healthy["rate_ratio_to_fixed"].as_f64().unwrap_or(f64::NAN)
    );
    md
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run() {
    let scale: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let mock = MockCluster::new(1).expect("mock cluster");
    let brokers = mock.bootstrap_servers();
    let node = CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("CQL stand-in");
    let bench = Bench {
        mock,
        brokers,
        node,
        scale,
    };
    migrate(&bench.node, "bench").await;
    // librdkafka's mock broker answers a fetch with no data only after fetch.wait.max.ms
    // (500 ms by default), even when data arrives meanwhile; a real broker answers as soon as
    // data is there. The latency run lowers the wait so that it measures vault, not the mock.
    let latency_env = [
        ("VAULT_KAFKA_COMMIT_INTERVAL", "10ms"),
        ("VAULT_KAFKA_OPTION_FETCH_WAIT_MAX_MS", "5"),
    ];
    // The baseline of the latency run: a fixed linger (no flush when the writer is idle).
    let fixed_linger_env = [latency_env[0], latency_env[1], FIXED_LINGER];
    if std::env::var_os("BENCH_FAULT_ONLY").is_some() {
        let (adaptive, fixed, value, healthy) = bench.fault_runs(bench.n(200_000)).await;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        let value = json!({"scale": scale, "fault_run": value, "targets": fault_targets(&adaptive, &fixed, healthy)});
        std::fs::write(
            dir.join("fault-run.json"),
            serde_json::to_string_pretty(&value).unwrap(),
        )
        .unwrap();
        say("Fault run (target/bench/fault-run.json, target/bench/fault-run.png)");
        println!(
            "{}",
            fault_table(&adaptive, &fixed, &value["fault_run"]["healthy"])
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&value["targets"]).unwrap()
        );
        return;
    }
    if std::env::var_os("BENCH_HEALTHY_ONLY").is_some() {
        let n = bench.n(200_000);
        bench.topic_with("bench-healthy", 16, n);
        let (adaptive, fixed, ratio) = bench
            .adaptive_against_fixed_healthy("bench-healthy", n)
            .await;
        say("Adaptive against fixed concurrency, healthy stand-in");
        let rate = VaultRun::rate;
        println!(
            "adaptive {:.0} events/s (limit {:.0} on average); fixed {:.0} events/s; {ratio:.3}× (median of {PAIRS} interleaved pairs)",
            rate(&adaptive),
            adaptive.mean_limit,
            rate(&fixed)
        );
        return;
    }
    if std::env::var_os("BENCH_DRAIN_ONLY").is_some() {
        let n = bench.n(1_000_000);
        bench.topic_with("bench-1m", 64, n);
        let (idle, fixed, ratio) = bench.idle_against_fixed_linger("bench-1m", n).await;
        say("Idle flush against fixed linger, null-store drain");
        let rate = VaultRun::rate;
        println!(
            "idle flush {:.0} events/s, {:.0} events/batch; fixed linger {:.0} events/s, {:.0} events/batch; {ratio:.3}× (median of {PAIRS} interleaved pairs)",
            rate(&idle),
            idle.events as f64 / idle.batches,
            rate(&fixed),
            fixed.events as f64 / fixed.batches
        );
        return;
    }
    if std::env::var_os("BENCH_SLOW_BROKER_ONLY").is_some() {
        if let Some(v) = bench.slow_broker(bench.n(1_000_000)).await {
            say("Slow-answering broker");
            println!("{}", slow_broker_line(&v));
        }
        return;
    }
    if std::env::var_os("BENCH_DEFAULT_STORE_ONLY").is_some() {
        let count = bench.n(200_000);
        let uniform = bench
            .store_run("users uniform", "bench-scylla", count, 0.01, &[], 1)
            .await;
        let zipf = bench
            .store_run(
                "users Zipf 1.1",
                "bench-scylla-zipf",
                count / 2,
                1.1,
                &[],
                1,
            )
            .await;
        say("Store runs, default settings");
        for (what, r) in [("users uniform", &uniform), ("users Zipf 1.1", &zipf)] {
            println!(
                "{what}: {:.2} µs CPU/event, {:.4} CQL requests/event",
                r.run.cpu_seconds * 1e6 / r.run.events as f64,
                r.rows
            );
        }
        return;
    }
    if std::env::var_os("BENCH_STORE_ONLY").is_some() {
        let runs = bench.store_runs(bench.n(200_000)).await;
        let idle = bench.idle(64).await;
        say("Store runs");
        println!("{}", store_lines(&runs));
        println!("idle, 64 partitions: {:.2}% of a core", idle * 100.0);
        return;
    }
    if std::env::var_os("BENCH_READ_ONLY").is_some() {
        let read = read_page_latency(&bench.node).await;
        say("The read side (vault api)");
        println!("{}", read_line(&read));
        return;
    }
    if std::env::var_os("BENCH_LATENCY_ONLY").is_some() {
        let fixed = bench.latency(1000, 15, &fixed_linger_env).await;
        let idle = bench.latency(1000, 15, &latency_env).await;
        for (what, l) in [("fixed linger", &fixed), ("idle flush", &idle)] {
            println!(
                "{what}: p50 {:.0} ms, p99 {:.0} ms over {} events",
                percentile(l, 0.5),
                percentile(l, 0.99),
                l.len()
            );
        }
        println!(
            "idle flush / fixed linger, p99: {:.2}",
            percentile(&idle, 0.99) / percentile(&fixed, 0.99)
        );
        return;
    }
    let big = bench.n(1_000_000);
    let small = bench.n(100_000);
    let half = bench.n(500_000);
    let scylla_n = bench.n(200_000);
    let partitions = 64;

    bench.topic_with("bench-1m", partitions, big);
    // The two headline runs are repeated; the median run (by rate) is reported.
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(bench.baseline_a("bench-1m", big));
    }
    runs.sort_by(|x, y| {
        let rate = |v: &Value| {
            v["steady_events"].as_f64().unwrap() / v["steady_seconds"].as_f64().unwrap()
        };
        rate(x).total_cmp(&rate(y))
    });
    let a = runs.swap_remove(RUNS / 2);
    // The drain with the default idle flush and with a fixed linger, in interleaved pairs.
    let (null_big, null_fixed, idle_ratio) = bench.idle_against_fixed_linger("bench-1m", big).await;
    bench.topic_with("bench-100k", partitions, small);
    let null_small = bench.vault_null("bench-100k", small).await;
    // A third backlog size, to show where peak memory stops growing with the backlog.
    bench.topic_with("bench-500k", partitions, half);
    let null_half = bench.vault_null("bench-500k", half).await;
    let b = bench.baseline_b(bench.n(100_000), 256).await;
    let runs = bench.store_runs(scylla_n).await;
    let (store, runtimes) = (&runs.uniform, &runs.runtimes);
    // Idle flush against fixed linger when behind: the same store run with a fixed linger.
    let store_fixed = bench
        .store_run(
            "users uniform, fixed linger",
            "bench-scylla-fixed",
            scylla_n,
            0.01,
            &[FIXED_LINGER],
            1,
        )
        .await;
    let scylla = &store.run;
    let idle = bench.idle(partitions).await;
    let linger_ms = 250.0;
    let fixed = bench.latency(1000, 15, &fixed_linger_env).await;
    let latencies = bench.latency(1000, 15, &latency_env).await;
    let (fixed_p50, fixed_p99) = (percentile(&fixed, 0.5), percentile(&fixed, 0.99));
    let (fault_adaptive, fault_fixed, fault, healthy) = bench.fault_runs(bench.n(200_000)).await;
    let read = read_page_latency(&bench.node).await;
    let slow = bench.slow_broker(big).await;

    // Figures and ratios.
    // Rates are steady-state rates (see `window`); whole-drain rates are reported beside them.
    let a_rate = a["steady_events"].as_f64().unwrap() / a["steady_seconds"].as_f64().unwrap();
    let a_drain = a["events"].as_f64().unwrap() / a["seconds"].as_f64().unwrap();
    let a_cpu_us = a["cpu_seconds"].as_f64().unwrap() * 1e6 / a["events"].as_f64().unwrap();
    let b_rate = b["events"].as_f64().unwrap() / b["seconds"].as_f64().unwrap();
    let rate = VaultRun::rate;
    let drain = |r: &VaultRun| r.events as f64 / r.seconds;
    let cpu_us = |r: &VaultRun| r.cpu_seconds * 1e6 / r.events as f64;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let results = json!({
        "scale": scale,
        "data": {"partitions": partitions, "events_1m": big, "events_100k": small, "events_500k": half,
                 "events_scylla": scylla_n, "event_bytes_mean": a["bytes"].as_f64().unwrap() / a["events"].as_f64().unwrap()},
        "baseline_a_raw_consumer": {"events_per_s": a_rate, "drain_events_per_s": a_drain, "cpu_us_per_event": a_cpu_us, "peak_rss_mib": a["peak_rss_mib"]},
        "baseline_b_cql_inserts": {"events_per_s": b_rate, "concurrency": b["concurrency"]},
        "vault_null_1m": {"events_per_s": rate(&null_big), "drain_events_per_s": drain(&null_big), "cpu_us_per_event": cpu_us(&null_big),
                          "cpu_s_per_million": cpu_us(&null_big), "peak_rss_mib": null_big.peak_rss_mib,
                          "ratio_to_a": rate(&null_big) / a_rate, "cpu_ratio_to_a": cpu_us(&null_big) / a_cpu_us},
        "vault_null_100k": {"events_per_s": rate(&null_small), "peak_rss_mib": null_small.peak_rss_mib},
        "vault_null_500k": {"events_per_s": rate(&null_half), "peak_rss_mib": null_half.peak_rss_mib},
        "vault_scylla": {"events_per_s": rate(scylla), "drain_events_per_s": drain(scylla), "cpu_us_per_event": cpu_us(scylla),
                         "cpu_us_per_event_of_runs": store.cpu_us_runs, "runs": RUNS,
                         "kernel_cpu_share": scylla.system_seconds / scylla.cpu_seconds,
                         "peak_rss_mib": scylla.peak_rss_mib, "ratio_to_b": rate(scylla) / b_rate,
                         "cql_requests_per_event": store.rows,
                         "index_requests_per_event": store.index,
                         "batch_by_replica": true,
                         "by_partition": {"events": scylla_n, "events_per_s": rate(&runs.by_partition.run), "cpu_us_per_event": cpu_us(&runs.by_partition.run),
                                  "cql_requests_per_event": runs.by_partition.rows, "index_requests_per_event": runs.by_partition.index, "ratio_to_b": rate(&runs.by_partition.run) / b_rate},
                         "store_runtime_against_main": {"events": scylla_n, "interleaved_pairs": PAIRS, "batch_by_replica": false,
                                  "store_runtime": {"events_per_s": rate(&runtimes.a), "cpu_us_per_event": cpu_us(&runtimes.a)},
                                  "main_runtime": {"events_per_s": rate(&runtimes.b), "cpu_us_per_event": cpu_us(&runtimes.b)},
                                  "rate_ratio": runtimes.ratio, "cpu_ratio": runtimes.cpu_ratio},
                         "zipf": {"events": scylla_n / 2, "events_per_s": rate(&runs.zipf.run), "cpu_us_per_event": cpu_us(&runs.zipf.run),
                                  "cql_requests_per_event": runs.zipf.rows, "index_requests_per_event": runs.zipf.index},
                         "zipf_by_partition": {"events": scylla_n / 2, "events_per_s": rate(&runs.zipf_by_partition.run), "cpu_us_per_event": cpu_us(&runs.zipf_by_partition.run),
                                  "cql_requests_per_event": runs.zipf_by_partition.rows, "index_requests_per_event": runs.zipf_by_partition.index}},
        "latency_1k_per_s": {"events": latencies.len(), "p50_ms": p50, "p99_ms": p99,
                             "fixed_linger_p50_ms": fixed_p50, "fixed_linger_p99_ms": fixed_p99,
                             "p99_ratio_to_fixed_linger": p99 / fixed_p99,
                             "linger_ms": linger_ms, "commit_interval_ms": 10},
        "targets": {
            "null_store_rate_ge_0.95_a": rate(&null_big) / a_rate >= 0.95,
            "cpu_per_event_le_5.5_a": cpu_us(&null_big) / a_cpu_us <= 5.5,
            "rss_1m_le_100_mib": null_big.peak_rss_mib <= 100.0,
            "rss_1m_le_1.2_100k": null_big.peak_rss_mib <= 1.2 * null_small.peak_rss_mib,
            "p99_le_linger_plus_25ms": p99 <= linger_ms + 25.0,
            "p99_idle_flush_le_50ms": p99 <= 50.0,
            "store_cpu_per_event_le_4us": cpu_us(scylla) <= 4.0,
            "idle_cpu_le_1pct_core": idle <= 0.01,
        }
    });
    let mut results = results;
    results["fault_run"] = fault;
    results["read_api_page_100"] = read.clone();
    results["idle"] =
        json!({"partitions": partitions, "seconds": IDLE_SECONDS, "core_share": idle});
    results["idle_flush_vs_fixed_linger"] = json!({
        "null_1m": {"idle_events_per_s": rate(&null_big), "fixed_events_per_s": rate(&null_fixed),
                    "drain_ratio": idle_ratio, "interleaved_pairs": PAIRS,
                    "idle_events_per_batch": null_big.events as f64 / null_big.batches,
                    "fixed_events_per_batch": null_fixed.events as f64 / null_fixed.batches,
                    "idle_cpu_us_per_event": cpu_us(&null_big), "fixed_cpu_us_per_event": cpu_us(&null_fixed)},
        "store": {"idle_requests_per_event": store.rows + store.index,
                  "fixed_requests_per_event": store_fixed.rows + store_fixed.index},
    });
    results["targets"]["idle_flush_drain_ge_0.95_fixed_linger"] = json!(idle_ratio >= 0.95);
    results["targets"]["idle_flush_requests_le_fixed_linger"] =
        json!(store.rows + store.index <= 1.05 * (store_fixed.rows + store_fixed.index));
    if let Some(slow) = &slow {
        results["slow_broker"] = slow.clone();
        results["targets"]["slow_broker_null_ge_0.8_raw"] =
            json!(slow["ratio_to_raw"].as_f64().unwrap() >= 0.8);
        results["targets"]["slow_broker_rss_le_100_mib"] =
            json!(slow["vault_null"]["peak_rss_mib"].as_f64().unwrap() <= 100.0);
    }
    if let (Some(targets), Value::Object(more)) = (
        results["targets"].as_object_mut(),
        fault_targets(&fault_adaptive, &fault_fixed, healthy),
    ) {
        targets.extend(more);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| run | events/s (steady state) | vs baseline | events/s (whole drain) | CPU µs/event (s per 1M) | peak RSS MiB |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let _ = writeln!(md, "| A: raw rdkafka consumer ({big} events, {partitions} partitions) | {a_rate:.0} | 1.00× A | {a_drain:.0} | {a_cpu_us:.2} | {:.1} |", a["peak_rss_mib"].as_f64().unwrap());
    let _ = writeln!(
        md,
        "| vault, null store, {big} backlog | {:.0} | {:.2}× A | {:.0} | {:.2} ({:.2}× A) | {:.1} |",
        rate(&null_big),
        rate(&null_big) / a_rate,
        drain(&null_big),
        cpu_us(&null_big),
        cpu_us(&null_big) / a_cpu_us,
        null_big.peak_rss_mib
    );
    let _ = writeln!(
        md,
        "| vault, null store, {small} backlog (for peak RSS; too short for rates and CPU) | | | {:.0} | | {:.1} |",
        drain(&null_small),
        null_small.peak_rss_mib
    );
    let _ = writeln!(
        md,
        "| vault, null store, {half} backlog (for peak RSS) | {:.0} | {:.2}× A | {:.0} | {:.2} | {:.1} |",
        rate(&null_half),
        rate(&null_half) / a_rate,
        drain(&null_half),
        cpu_us(&null_half),
        null_half.peak_rss_mib
    );
    let _ = writeln!(
        md,
        "| B: prepared inserts to the CQL stand-in (256 concurrent) | {b_rate:.0} | 1.00× B | | | |"
    );
    let _ = writeln!(md, "| vault, ScyllaDB store (stand-in), {scylla_n} events | {:.0} | {:.2}× B | {:.0} | {:.2} | {:.1} |", rate(scylla), rate(scylla) / b_rate, drain(scylla), cpu_us(scylla), scylla.peak_rss_mib);
    let _ = writeln!(md);
    let _ = writeln!(md, "{}", store_lines(&runs));
    let _ = writeln!(
        md,
        "vault idle ({partitions} partitions, no events): {:.2}% of a core\n",
        idle * 100.0
    );
    let _ = writeln!(
        md,
        "Idle flush against fixed linger, when behind: null-store 1M drain {:.0} vs {:.0} events/s (medians; {:.2}×, the median ratio of {PAIRS} interleaved pairs), {:.0} vs {:.0} events per batch, CPU {:.2} vs {:.2} µs/event; ScyllaDB store CQL requests per event {:.4} vs {:.4}\n",
        rate(&null_big),
        rate(&null_fixed),
        idle_ratio,
        null_big.events as f64 / null_big.batches,
        null_fixed.events as f64 / null_fixed.batches,
        cpu_us(&null_big),
        cpu_us(&null_fixed),
        store.rows + store.index,
        store_fixed.rows + store_fixed.index
    );
    let _ = writeln!(md, "produce → commit latency at 1,000 events/s (linger 250 ms, commit_interval 10 ms, fetch.wait.max.ms 5 for the mock broker, ScyllaDB store): idle flush (default) p50 {p50:.0} ms, p99 {p99:.0} ms over {} events; fixed linger p50 {fixed_p50:.0} ms, p99 {fixed_p99:.0} ms; p99 {:.2}× fixed linger", latencies.len(), p99 / fixed_p99);
    let _ = writeln!(md, "{}", read_line(&read));
    if let Some(slow) = &slow {
        let _ = writeln!(md, "\n{}", slow_broker_line(slow));
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "{}",
        fault_table(
            &fault_adaptive,
            &fault_fixed,
            &results["fault_run"]["healthy"]
        )
    );
    let _ = writeln!(md, "| target | result |\n|---|---|");
    for (k, v) in results["targets"].as_object().unwrap() {
        let _ = writeln!(
            md,
            "| {k} | {} |",
            if v.as_bool() == Some(true) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("results.md"), &md).unwrap();
    say("Summary (target/bench/results.md, target/bench/results.json)");
    println!("{md}");
}

/// The store runs' CPU per event and CQL requests per event: users uniform and Zipf-skewed, by
/// replica (the default) and by partition (`scylla.batch_by_replica = false`); then the store's
/// own runtime against the driver on the main runtime (`scylla.store_threads = 0`), in pairs.
fn store_lines(runs: &StoreRuns) -> String {
    let mut md = String::from(
        "| ScyllaDB store (stand-in) | events | events/s (steady state) | CPU µs/event | of which kernel | CQL requests/event, table | to the day index alone |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (what, r) in [
        ("users uniform (by replica, the default)", &runs.uniform),
        ("users Zipf 1.1", &runs.zipf),
        ("users uniform, by partition", &runs.by_partition),
        ("users Zipf 1.1, by partition", &runs.zipf_by_partition),
    ] {
        let of_runs = match r.cpu_us_runs.as_slice() {
            [_, _, ..] => format!(
                " (median of {})",
                r.cpu_us_runs
                    .iter()
                    .map(|c| format!("{c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "| {what} | {} | {:.0} | {:.2}{of_runs} | {:.0}% | {:.4} | {:.4} |",
            r.run.events,
            r.run.rate(),
            r.run.cpu_seconds * 1e6 / r.run.events as f64,
            100.0 * r.run.system_seconds / r.run.cpu_seconds,
            r.rows,
            r.index
        );
    }
    let cpu_us = |r: &VaultRun| r.cpu_seconds * 1e6 / r.events as f64;
    let runtimes = &runs.runtimes;
    let _ = writeln!(
        md,
        "\nThe store's own runtime (`scylla.store_threads` at its default) against the driver on the main one (`store_threads = 0`), users uniform, by partition, {PAIRS} interleaved pairs: median runs {:.0} against {:.0} events/s and {:.2} against {:.2} µs of CPU per event; the medians of the pairs' ratios: **CPU per event {:.2}×**, events/s {:.2}×.",
        runtimes.a.rate(),
        runtimes.b.rate(),
        cpu_us(&runtimes.a),
        cpu_us(&runtimes.b),
        runtimes.cpu_ratio,
        runtimes.ratio
    );
    md
}

/// Events of the read-side user, and the days they span.
const READ_EVENTS: usize = 10_000;
const READ_DAYS: i64 = 30;
/// Times the whole history is paged through, 100 events a page.
const READ_PASSES: usize = 5;

/// `vault api` (in this process, on the real HTTP server) over the stand-in: a user with
/// 10,000 events over 30 days, paged through 100 events at a time, first page to last
/// (each page a new connection, as a client without keep-alive); latency from sending the
/// request to the last byte of the answer.
async fn read_page_latency(node: &CqlNode) -> Value {
    use vault::store::Store;
    let mut config = vault::config::Config::default();
    config.scylla.nodes = vec![node.addr().to_string()];
    config.scylla.keyspace = "bench_read".into();
    config.api.addr = "127.0.0.1:0".into();
    let settings = config.validate().expect("settings");
    let store = vault::store::scylla::ScyllaStore::connect(&settings.config.scylla, true)
        .await
        .expect("migrate");
    let day0 = 1_763_942_400_000i64; // 2025-11-24
    let events: Vec<vault::event::Event> = (0..READ_EVENTS)
        .map(|i| {
            let day = i as i64 % READ_DAYS;
            let at = day0 - day * 86_400_000 + (i as i64 / READ_DAYS) * 1000;
            let event_type = ["click", "page_view", "purchase"][i % 3];
            let json = json!({
                "user_id": "reader", "event_type": event_type,
                "occurred_at": chrono::DateTime::from_timestamp_millis(at).unwrap().to_rfc3339(),
                "attributes": {"page": format!("/products/{}", i % 997), "n": i},
            })
            .to_string();
            let source = vault::event::Source {
                topic: Arc::from("bench-read"),
                partition: 0,
                offset: i as i64,
                timestamp_ms: Some(at),
            };
            vault::event::decode(
                None,
                Some(json.as_bytes()),
                source,
                None,
                Default::default(),
            )
            .expect("valid event")
        })
        .collect();
    for chunk in events.chunks(1000) {
        let refs: Vec<&vault::event::Event> = chunk.iter().collect();
        store.write(&refs).await.expect("write");
    }
    let api_settings = vault::api::ApiSettings::new(&settings.config).expect("api settings");
    let api = Arc::new(
        vault::api::Api::new(api_settings, store)
            .await
            .expect("api"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(vault::api::serve(
        listener,
        api,
        stop.clone().cancelled_owned(),
    ));
    let mut latencies_ms = Vec::new();
    let mut pages = 0;
    for _ in 0..READ_PASSES {
        let mut token: Option<String> = None;
        let mut seen = 0;
        loop {
            let path = match &token {
                None => "/v1/users/reader/events?limit=100".to_owned(),
                Some(t) => format!("/v1/users/reader/events?limit=100&page_token={t}"),
            };
            let start = Instant::now();
            let body = http_get_body(addr, &path).await;
            latencies_ms.push(start.elapsed().as_secs_f64() * 1000.0);
            let page: Value = serde_json::from_str(&body).expect("a JSON page");
            seen += page["events"].as_array().expect("events").len();
            pages += 1;
            match page["next_page_token"].as_str() {
                Some(t) => token = Some(t.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, READ_EVENTS, "every event once per pass");
    }
    stop.cancel();
    let _ = server.await;
    latencies_ms.sort_by(f64::total_cmp);
    json!({
        "events": READ_EVENTS, "days": READ_DAYS, "page_events": 100, "pages": pages,
        "p50_ms": percentile(&latencies_ms, 0.5), "p99_ms": percentile(&latencies_ms, 0.99),
        "max_ms": latencies_ms.last().copied().unwrap_or(0.0),
    })
}

/// The read-side figure as one line of the summary.
fn read_line(r: &Value) -> String {
    format!(
        "vault api, a 100-event page of a user with {} events over {} days (CQL stand-in, {} pages \
         paged through first to last): p50 {:.1} ms, p99 {:.1} ms",
        r["events"],
        r["days"],
        r["pages"],
        r["p50_ms"].as_f64().unwrap_or(f64::NAN),
        r["p99_ms"].as_f64().unwrap_or(f64::NAN)
    )
}

/// `GET path` over HTTP/1.0 (the server closes after the answer); the body of a 200.
async fn http_get_body(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}
