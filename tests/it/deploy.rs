//! The deployment files (Dockerfile, docker-compose.yml, deploy/k8s, deploy/prometheus,
//! deploy/grafana) checked statically and against the binary: no Docker engine or cluster exists
//! here, so every YAML must parse, every command line and environment variable they hand vault
//! must be one `vault` accepts (through `vault check-config` and `--help`), and ports, paths and
//! timeouts must agree with the code and with each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_yaml_ng::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file, with merge keys (`<<: *anchor`) applied.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            let mut v: Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{rel} does not parse: {e}"));
            v.apply_merge()
                .unwrap_or_else(|e| panic!("{rel}: merge keys: {e}"));
            v
        })
        .collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel} holds one document");
    docs.remove(0)
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("expected a scalar, got {other:?}"),
        })
        .collect()
}

fn env_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("environment is a mapping: {v:?}"))
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("env {k:?}: unexpected {other:?}"),
            };
            (s(k).to_owned(), value)
        })
        .collect()
}

/// Runs the vault binary with exactly `env` (plus PATH); panics with its output on failure.
fn vault(args: &[String], env: &BTreeMap<String, String>) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vault"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("run vault");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vault {args:?} with {env:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The command line is one vault accepts: the subcommand and every flag before `--help` parse.
fn assert_command_accepted(command: &[String]) {
    let mut args = command.to_vec();
    args.push("--help".into());
    vault(&args, &BTreeMap::new());
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} has no port"))
}

fn duration(v: &str) -> Duration {
    humantime::parse_duration(v).unwrap_or_else(|e| panic!("{v}: {e}"))
}

#[test]
fn every_yaml_file_parses() {
    let mut files = vec![PathBuf::from("docker-compose.yml")];
    let mut dirs = vec![root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
                files.push(path.strip_prefix(root()).unwrap().to_path_buf());
            }
        }
    }
    assert!(files.len() >= 13, "deployment YAML files: {files:?}");
    for f in files {
        let docs = yaml_docs(f.to_str().unwrap());
        assert!(!docs.is_empty(), "{f:?} is empty");
    }
}

#[test]
fn the_compose_stack_hands_vault_only_settings_it_accepts() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().map(s).collect();
    for want in [
        "kafka",
        "scylla",
        "init-topics",
        "init-schema",
        "vault",
        "producer",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(want), "service {want} in docker-compose.yml");
    }

    // Every service running the vault image: its environment validates and its command parses.
    let mut vault_services = 0;
    for (name, svc) in services {
        if svc["image"].as_str() != Some("vault:local") {
            continue;
        }
        vault_services += 1;
        let env = env_map(&svc["environment"]);
        let effective = vault(&["check-config".into()], &env);
        assert!(
            effective.contains("brokers = \"kafka:9092\""),
            "{effective}"
        );
        let command = match &svc["command"] {
            Value::Null => vec!["run".to_string()],
            c => strings(c),
        };
        assert_command_accepted(&command);
        assert!(
            svc["ports"].is_null() || s(name) != "vault",
            "replicas cannot share host ports"
        );
    }
    assert_eq!(
        vault_services, 3,
        "init-schema, vault, producer use the image"
    );

    let vault_svc = &compose["services"]["vault"];
    assert_eq!(vault_svc["deploy"]["replicas"].as_u64(), Some(3));
    let env = env_map(&vault_svc["environment"]);
    let metrics_port = port_of(&env["VAULT_METRICS_ADDR"]);
    let health = strings(&vault_svc["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains(&format!("127.0.0.1:{metrics_port}/readyz")),
        "{health}"
    );
    let default_shutdown = vault::config::Config::default().pipeline.shutdown_timeout;
    assert!(duration(s(&vault_svc["stop_grace_period"])) > default_shutdown);
    assert_eq!(
        strings(&compose["services"]["producer"]["profiles"]),
        ["load"]
    );
    assert_eq!(
        s(&compose["services"]["init-schema"]["command"][0]),
        "migrate"
    );

    // The topics the init job creates are the ones vault reads and dead-letters to.
    let init = strings(&compose["services"]["init-topics"]["command"]).join(" ");
    let topic = &env["VAULT_KAFKA_TOPICS"];
    assert!(init.contains(&format!("--topic {topic} ")), "{init}");
    let dlq = vault::config::Config::default()
        .kafka
        .dead_letter_topic
        .replace("{topic}", topic);
    assert!(init.contains(&format!("--topic {dlq} ")), "{init}");

    // Prometheus scrapes the port vault serves, and loads the rules the tests check.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let sd = &prom["scrape_configs"][0]["dns_sd_configs"][0];
    assert_eq!(sd["port"].as_u64(), Some(u64::from(metrics_port)));
    assert_eq!(strings(&sd["names"]), ["vault"]);
    assert_eq!(strings(&prom["rule_files"]), ["alerts.yml"]);
    let prom_volumes = strings(&compose["services"]["prometheus"]["volumes"]);
    assert!(prom_volumes.contains(&"./deploy/prometheus:/etc/prometheus:ro".to_string()));

    // Grafana finds the dashboard where its provisioning looks.
    let provider = yaml("deploy/grafana/provisioning/dashboards/vault.yml");
    let dash_path = s(&provider["providers"][0]["options"]["path"]).to_owned();
    let volumes = strings(&compose["services"]["grafana"]["volumes"]);
    assert!(
        volumes.contains(&format!("./deploy/grafana/dashboards:{dash_path}:ro")),
        "{volumes:?}"
    );
    // Published ports never leave the host.
    for (name, svc) in services {
        for p in svc["ports"].as_sequence().into_iter().flatten() {
            assert!(s(p).starts_with("127.0.0.1:"), "{name:?} publishes {p:?}");
        }
    }
}

fn k8s_objects() -> BTreeMap<String, Value> {
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization lists every manifest");
    let mut objects = BTreeMap::new();
    for file in listed {
        for doc in yaml_docs(&format!("deploy/k8s/{file}")) {
            assert!(doc["apiVersion"].is_string(), "{file}: apiVersion");
            let kind = s(&doc["kind"]).to_owned();
            assert!(doc["metadata"]["name"].is_string(), "{file}: metadata.name");
            assert!(
                objects.insert(kind.clone(), doc).is_none(),
                "one {kind} only"
            );
        }
    }
    objects
}

#[test]
fn the_kubernetes_manifests_agree_with_the_binary_and_each_other() {
    let objects = k8s_objects();
    for kind in [
        "Namespace",
        "ConfigMap",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
    ] {
        assert!(objects.contains_key(kind), "{kind} in deploy/k8s");
    }
    let sts = &objects["StatefulSet"];
    let pod = &sts["spec"]["template"];
    let container = &pod["spec"]["containers"][0];

    // The configuration file validates, with the environment the pod gives it.
    let toml_text = s(&objects["ConfigMap"]["data"]["vault.toml"]).to_owned();
    let dir = std::env::temp_dir().join(crate::common::unique("vault-k8s"));
    std::fs::create_dir_all(&dir).unwrap();
    let mount = s(&container["volumeMounts"][0]["mountPath"]).to_owned();
    let mut env = BTreeMap::new();
    for e in container["env"].as_sequence().unwrap() {
        let name = s(&e["name"]).to_owned();
        let value = match (&e["value"], &e["valueFrom"]) {
            (Value::String(v), _) => v.replace(&mount, dir.to_str().unwrap()),
            (_, from) if from["fieldRef"]["fieldPath"] == "metadata.name" => "vault-0".into(),
            (_, from) if from["secretKeyRef"].is_mapping() => {
                format!("secret-{}", s(&from["secretKeyRef"]["key"]))
            }
            other => panic!("env {name}: {other:?}"),
        };
        env.insert(name, value);
    }
    let file = Path::new(&env["VAULT_CONFIG"]).to_path_buf();
    std::fs::write(&file, &toml_text).unwrap();
    let effective = vault(&["check-config".into()], &env);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        effective.contains("instance_id = \"vault-0\""),
        "static membership from the pod name: {effective}"
    );
    assert!(
        !effective.contains("secret-scylla-password"),
        "the password is masked: {effective}"
    );
    assert_command_accepted(&strings(&container["args"]));

    // Ports and paths agree with the configuration and with each other.
    let config: toml::Value = toml::from_str(&toml_text).unwrap();
    let metrics_port = port_of(config["metrics"]["addr"].as_str().unwrap());
    let port = &container["ports"][0];
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(metrics_port))
    );
    let port_name = s(&port["name"]);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(s(&container[probe]["httpGet"]["path"]), path);
        assert_eq!(s(&container[probe]["httpGet"]["port"]), port_name);
    }
    let svc = &objects["Service"];
    assert_eq!(s(&svc["spec"]["ports"][0]["targetPort"]), port_name);
    assert_eq!(s(&sts["spec"]["serviceName"]), s(&svc["metadata"]["name"]));
    let monitor = &objects["ServiceMonitor"]["spec"];
    assert_eq!(s(&monitor["endpoints"][0]["path"]), "/metrics");
    assert_eq!(
        s(&monitor["endpoints"][0]["port"]),
        s(&svc["spec"]["ports"][0]["name"])
    );

    // Selectors reach the pods.
    let pod_labels = &pod["metadata"]["labels"];
    for selector in [
        &sts["spec"]["selector"]["matchLabels"],
        &svc["spec"]["selector"],
        &objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        &monitor["selector"]["matchLabels"],
    ] {
        for (k, v) in selector.as_mapping().unwrap() {
            assert_eq!(&pod_labels[k], v, "selector {k:?}");
        }
    }

    // The grace period covers the drain.
    let shutdown = duration(config["pipeline"]["shutdown_timeout"].as_str().unwrap());
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        Duration::from_secs(grace) >= shutdown + Duration::from_secs(10),
        "grace {grace}s vs shutdown_timeout {shutdown:?}"
    );
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][r].is_null(),
                "resources.{kind}.{r}"
            );
        }
    }

    // Autoscaling targets the StatefulSet, on vault's group and topic, capped at the partitions.
    let scaled = &objects["ScaledObject"]["spec"];
    assert_eq!(s(&scaled["scaleTargetRef"]["kind"]), "StatefulSet");
    assert_eq!(
        s(&scaled["scaleTargetRef"]["name"]),
        s(&sts["metadata"]["name"])
    );
    let trigger = &scaled["triggers"][0]["metadata"];
    assert_eq!(
        trigger["consumerGroup"].as_str(),
        config["kafka"]["group_id"].as_str()
    );
    assert_eq!(
        trigger["topic"].as_str(),
        config["kafka"]["topics"][0].as_str()
    );
    assert_eq!(s(&trigger["allowIdleConsumers"]), "false");
    let compose = yaml("docker-compose.yml");
    let init = strings(&compose["services"]["init-topics"]["command"]).join(" ");
    let partitions: u64 = init
        .split("--partitions ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("partition count of the source topic");
    assert!(scaled["maxReplicaCount"].as_u64().unwrap() <= partitions);

    // The operator's rules are the rules promtool tests.
    let alerts = yaml("deploy/prometheus/alerts.yml");
    assert_eq!(
        objects["PrometheusRule"]["spec"]["groups"], alerts["groups"],
        "deploy/k8s/prometheusrule.yaml and deploy/prometheus/alerts.yml differ"
    );
}

#[test]
fn the_image_is_multi_stage_non_root_and_serves_the_metrics_port() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let rust: Vec<u32> = froms[0]
        .split(':')
        .nth(1)
        .and_then(|t| t.split('-').next())
        .expect("a pinned rust image")
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let msrv: Vec<u32> = manifest["package"]["rust-version"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(rust >= msrv, "builder {rust:?} vs rust-version {msrv:?}");
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(lines
        .iter()
        .any(|l| l.starts_with("ENTRYPOINT [") && l.contains("vault\"]")));
    let expose = lines
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    assert!(dockerfile.contains(&format!("VAULT_METRICS_ADDR=0.0.0.0:{expose}")));
    assert!(dockerfile.contains(&format!("127.0.0.1:{expose}/healthz")));
}
