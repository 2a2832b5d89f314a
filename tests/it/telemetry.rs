//! Observability end to end: a real Prometheus server (Debian's `prometheus` package, which
//! `make test` installs) scrapes a running pipeline, loads vault's alert rules, and answers, through
//! its HTTP API, that the events stored reached the number produced, that lag drained to zero and
//! that every dashboard query is valid PromQL. `/healthz` and `/readyz` are checked directly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vault::kafka::dead_letter::MemoryDeadLetters;
use vault::store::MemoryStore;

use crate::common::{free_port, http_get, settings, unique, wait_until, Kafka, Running};

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server process, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let binary = std::env::var("VAULT_IT_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let dir = std::env::temp_dir().join(unique("vault-prometheus"));
        std::fs::create_dir_all(&dir).expect("prometheus work dir");
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: activity-vault\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new(&binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start '{binary}' ({e}): install Debian's prometheus package \
                     (`make test` does) or point VAULT_IT_PROMETHEUS at the server binary"
                )
            });
        Prometheus { child, addr, dir }
    }

    /// An instant query; `Ok` with the result vector, or why not.
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let (status, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("query {promql:?} answered {status}: {body}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The single value of a query that returns one series.
    fn scalar(&self, promql: &str) -> Result<f64, String> {
        let result = self.query(promql)?;
        match result.as_slice() {
            [one] => one["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no value in {one}")),
            other => Err(format!("{promql}: {} series", other.len())),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_vault_and_sees_every_event_stored() {
    let kafka = Kafka::start();
    let (topic, group) = (unique("observed"), unique("g"));
    let partitions = 3;
    kafka.create_source_topic(&topic, partitions).await;
    let produced = kafka.produce_events(&topic, partitions, 0, 600).await.len();

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut cfg = settings(&kafka.brokers, &topic, &group);
    cfg.metrics.addr = metrics_addr.clone();
    cfg.kafka
        .options
        .insert("statistics.interval.ms".into(), "500".into());
    let store = MemoryStore::new();
    let vault = Running::start(cfg, store.clone(), MemoryDeadLetters::default());

    wait_until("/readyz answers 200", Duration::from_secs(30), || {
        let addr = metrics_addr.clone();
        async move {
            match http_get(&addr, "/readyz") {
                Ok((200, body)) if body.contains("ready") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert_eq!(http_get(&metrics_addr, "/healthz").unwrap().0, 200);

    let prometheus = Prometheus::start(&metrics_addr);
    let stored_query = format!("sum(vault_events_stored_total{{topic=\"{topic}\"}})");
    wait_until(
        "Prometheus to see every event stored",
        Duration::from_secs(90),
        || {
            let r = prometheus.scalar(&stored_query);
            async move {
                match r {
                    Ok(v) if v == produced as f64 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert_eq!(store.rows().len(), produced, "the store agrees");

    // Lag comes from librdkafka's statistics: one series per assigned partition, all drained.
    let lag_query = format!("vault_consumer_lag{{topic=\"{topic}\"}}");
    wait_until(
        "lag on every partition to reach 0",
        Duration::from_secs(30),
        || {
            let r = prometheus.query(&lag_query);
            async move {
                let series = r?;
                let zero = series.iter().all(|s| s["value"][1] == "0");
                if series.len() == partitions as usize && zero {
                    Ok(())
                } else {
                    Err(format!("{series:?}"))
                }
            }
        },
    )
    .await;
    assert_eq!(prometheus.scalar("vault_ready").unwrap(), 1.0);
    let stuck = prometheus
        .scalar(&format!(
            "max(vault_oldest_uncommitted_event_age_seconds{{topic=\"{topic}\"}})"
        ))
        .unwrap();
    assert_eq!(stuck, 0.0, "nothing waits once everything is durable");
    let latencies = prometheus
        .scalar("sum(vault_end_to_end_latency_seconds_count)")
        .unwrap();
    assert_eq!(latencies, produced as f64, "one latency per stored event");

    // The alert rules are loaded by a real server and evaluate without error.
    let (status, body) = http_get(&prometheus.addr, "/api/v1/rules").unwrap();
    assert_eq!(status, 200, "{body}");
    let rules: Value = serde_json::from_str(&body).unwrap();
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let loaded: Vec<Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(loaded.len() >= 8, "alert rules loaded: {body}");
    for r in &loaded {
        assert_ne!(
            r["health"], "err",
            "rule {} fails to evaluate: {r}",
            r["name"]
        );
    }

    // Every dashboard query is valid PromQL that the server accepts.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards/vault.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    let mut concurrency = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            let series = match prometheus.query(&expr) {
                Ok(series) => series,
                Err(e) => panic!("dashboard panel {}: {e}", panel["title"]),
            };
            if expr.contains("vault_write_concurrency_limit")
                || expr.contains("vault_write_requests_in_flight")
            {
                concurrency.push((expr, series));
            }
            checked += 1;
        }
    }
    assert!(checked > 15, "dashboard queries checked: {checked}");
    // The write concurrency panel: the limit and the requests in flight, one line per instance
    // (the gauges exist from the start, whatever the store).
    assert_eq!(concurrency.len(), 2, "{concurrency:?}");
    for (expr, series) in &concurrency {
        let instances: Vec<&str> = series
            .iter()
            .map(|s| s["metric"]["instance"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(instances, [metrics_addr.as_str()], "{expr}: {series:?}");
    }
    vault.stop().await;
}

/// An Alertmanager process (Debian's `prometheus-alertmanager`, which `make test` installs)
/// running deploy/alertmanager/alertmanager.yml, killed on drop.
struct Alertmanager {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let binary = std::env::var("VAULT_IT_ALERTMANAGER")
            .unwrap_or_else(|_| "prometheus-alertmanager".into());
        let dir = std::env::temp_dir().join(unique("vault-alertmanager"));
        std::fs::create_dir_all(&dir).expect("alertmanager work dir");
        let config =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/alertmanager/alertmanager.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("alertmanager.log")).expect("alertmanager log");
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // A single instance: no gossip port to bind.
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} (apt-get install prometheus-alertmanager): {e}")
            });
        Alertmanager { child, addr, dir }
    }

    /// POSTs alerts (API v2) as Prometheus sends them.
    fn post(&self, alerts: &Value) -> Result<(), String> {
        use std::io::{Read, Write};
        let body = alerts.to_string();
        let mut s = std::net::TcpStream::connect(&self.addr).map_err(|e| e.to_string())?;
        write!(
            s,
            "POST /api/v2/alerts HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
        if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(answer)
        }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a ScyllaDB outage raises (each rule once per topic, as alerts.test.yml shows) reaches
/// Alertmanager, whose inhibit rule leaves one page: VaultPartitionStuck. A commit stall on
/// another topic, with no stuck partition there, still pages. The warnings that say why (writes
/// retried, the write concurrency limit held down, failing batches abandoned for memory) are
/// shown on the vault-ui receiver: not inhibited, and never a page; so is VaultStoreRuntimeBusy
/// (lag under load, not an outage: in one the store's threads wait, idle).
#[tokio::test]
async fn a_store_outage_pages_once_through_alertmanager() {
    let am = Alertmanager::start();
    let alert = |name: &str, topic: &str| {
        serde_json::json!({
            "labels": {"alertname": name, "severity": "critical", "topic": topic},
            "annotations": {"summary": format!("{name} on {topic}")},
        })
    };
    let warning = |name: &str, labels: &[(&str, &str)]| {
        let mut l = serde_json::json!({"alertname": name, "severity": "warning", "instance": "vault-0:9898"});
        for (k, v) in labels {
            l[*k] = Value::from(*v);
        }
        serde_json::json!({"labels": l, "annotations": {"summary": name}})
    };
    let raised = serde_json::json!([
        alert("VaultPartitionStuck", "user-activity"),
        alert("VaultCommitsStalled", "user-activity"),
        alert("VaultPartitionNotCommitting", "user-activity"),
        alert("VaultCommitsStalled", "orders"),
        warning("VaultWriteErrors", &[("kind", "overloaded")]),
        warning("VaultWriteConcurrencyLow", &[]),
        warning("VaultRetriesOutOfMemory", &[("topic", "user-activity")]),
        warning("VaultStoreRuntimeBusy", &[]),
    ]);
    wait_until(
        "Alertmanager to take the alerts",
        Duration::from_secs(30),
        || {
            let r = am.post(&raised);
            async move { r }
        },
    )
    .await;
    // (alert/topic, receiver) of every alert that is active, not inhibited.
    let mut active = Vec::new();
    wait_until(
        "Alertmanager to show all eight, inhibitions applied",
        Duration::from_secs(30),
        || {
            let got = http_get(&am.addr, "/api/v2/alerts");
            active.clear();
            let seen = (|| {
                let (status, body) = got?;
                if status != 200 {
                    return Err(format!("{status}: {body}"));
                }
                let alerts: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
                let alerts = alerts.as_array().ok_or("not a list")?.clone();
                for a in &alerts {
                    if a["status"]["state"] == "active" {
                        let receivers: Vec<&str> = a["receivers"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|r| r["name"].as_str())
                            .collect();
                        active.push((
                            format!(
                                "{}/{}",
                                a["labels"]["alertname"].as_str().unwrap_or("?"),
                                a["labels"]["topic"].as_str().unwrap_or("-")
                            ),
                            receivers.join(","),
                        ));
                    }
                }
                if alerts.len() == 8 {
                    Ok(())
                } else {
                    Err(body)
                }
            })();
            async move { seen }
        },
    )
    .await;
    active.sort();
    let on = |receiver: &str| -> Vec<&str> {
        active
            .iter()
            .filter(|(_, r)| r == receiver)
            .map(|(a, _)| a.as_str())
            .collect()
    };
    assert_eq!(
        on("vault-pages"),
        [
            "VaultCommitsStalled/orders",
            "VaultPartitionStuck/user-activity"
        ],
        "one page for the outage, and the unrelated stall still pages: {active:?}"
    );
    assert_eq!(
        on("vault-ui"),
        [
            "VaultRetriesOutOfMemory/user-activity",
            "VaultStoreRuntimeBusy/-",
            "VaultWriteConcurrencyLow/-",
            "VaultWriteErrors/-"
        ],
        "the warnings are shown, not paged: {active:?}"
    );
    assert_eq!(active.len(), 6, "{active:?}");
}
