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

/// The name everything vault deploys carries: never plain `vault`, which a HashiCorp Vault
/// install uses for its image, namespace, StatefulSet, Service and PDB.
const NAME: &str = "activity-vault";

/// The repository of an image reference, without registry, tag or digest: `vault` for
/// `vault:0.1.0`, `hashicorp/vault` and `docker.io/library/vault@sha256:...`.
fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

/// A name of ours: `activity-vault` or `activity-vault-...`.
fn assert_ours(what: &str, name: &str) {
    assert!(
        name == NAME || name.starts_with(&format!("{NAME}-")),
        "{what} {name:?} must be {NAME}[-...], not one a HashiCorp Vault install may use"
    );
}

/// The Prometheus job label each group of alert rules selects its targets by: one job per
/// group, `vault` (the consumers) and `vault-api` (the read side), each its own.
fn rules_jobs() -> BTreeMap<String, String> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let jobs: BTreeMap<String, String> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|group| {
            let name = s(&group["name"]).to_owned();
            let jobs: BTreeSet<String> = group["rules"]
                .as_sequence()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    let expr = s(&r["expr"]);
                    expr.match_indices("job=\"")
                        .map(|(i, m)| expr[i + m.len()..].split('"').next().unwrap().to_owned())
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(jobs.len(), 1, "group {name}: one job label: {jobs:?}");
            (name, jobs.into_iter().next().unwrap())
        })
        .collect();
    assert_eq!(
        jobs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["vault", "vault-api"],
        "the consumers' rules and the read side's"
    );
    assert_ne!(
        jobs["vault"], jobs["vault-api"],
        "each selects its own targets"
    );
    jobs
}

/// The job of the consumers' targets (`vault run`).
fn rules_job() -> String {
    rules_jobs()["vault"].clone()
}

/// The job of the read side's targets (`vault api`).
fn api_rules_job() -> String {
    rules_jobs()["vault-api"].clone()
}

#[test]
fn nothing_is_named_plain_vault() {
    for (image, repo) in [
        ("vault:0.1.0", "vault"),
        ("hashicorp/vault", "vault"),
        ("docker.io/library/vault@sha256:00", "vault"),
        (
            "registry.example.com/activity-vault:0.1.0",
            "activity-vault",
        ),
        ("localhost:5000/activity-vault", "activity-vault"),
    ] {
        assert_eq!(image_repository(image), repo, "{image}");
    }
    // Kubernetes: the namespace, every object, every Secret and ConfigMap referenced, images.
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    assert_ours("namespace", s(&kustomization["namespace"]));
    let objects = k8s_objects();
    for (kind, o) in &objects {
        assert_ours(kind, s(&o["metadata"]["name"]));
        if kind == "Namespace" {
            assert_eq!(s(&o["metadata"]["name"]), s(&kustomization["namespace"]));
        }
    }
    let images = kustomization["images"].as_sequence().expect("images");
    for workload in ["StatefulSet", "Deployment"] {
        let pod = &objects[workload]["spec"]["template"]["spec"];
        let containers: Vec<&Value> = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod[*k].as_sequence().into_iter().flatten())
            .collect();
        for c in &containers {
            let image = s(&c["image"]);
            assert_ne!(image_repository(image), "vault", "{image}");
            let set = images
                .iter()
                .find(|i| s(&i["name"]) == image)
                .unwrap_or_else(|| panic!("kustomization.yaml sets the image {image}"));
            assert_ours("image", image_repository(s(&set["newName"])));
            for e in c["env"].as_sequence().into_iter().flatten() {
                if let Some(name) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    assert_ours("Secret", name);
                }
            }
        }
        for v in pod["volumes"].as_sequence().unwrap() {
            if let Some(name) = v["configMap"]["name"].as_str() {
                assert_ours("ConfigMap", name);
            }
            if let Some(name) = v["secret"]["secretName"].as_str() {
                assert_ours("Secret", name);
            }
        }
    }
    for r in objects["TriggerAuthentication"]["spec"]["secretTargetRef"]
        .as_sequence()
        .unwrap()
    {
        assert_ours("Secret", s(&r["name"]));
    }
    // Prometheus: the scrape jobs the rules select (HashiCorp Vault's is often "vault").
    for job in rules_jobs().values() {
        assert_ours("Prometheus job", job);
    }
    // docker compose: every image built or run from this repository.
    let compose = yaml("docker-compose.yml");
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        let image = s(&svc["image"]);
        assert_ne!(image_repository(image), "vault", "{name:?}: {image}");
        if !svc["build"].is_null() {
            assert_ours("image", image_repository(image));
        }
    }
}

/// Every rule of every group of alert rules.
fn alert_rules() -> Vec<Value> {
    yaml("deploy/prometheus/alerts.yml")["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .collect()
}

/// The alerts the rules raise.
fn alert_names() -> BTreeSet<String> {
    alert_rules()
        .iter()
        .map(|r| s(&r["alert"]).to_owned())
        .collect()
}

/// Every alert the Alertmanager configuration names is one the rules raise, and a store
/// outage's follow-on alerts are inhibited by VaultPartitionStuck on the same topic.
#[test]
fn the_alertmanager_config_names_real_alerts() {
    let names = alert_names();
    let text = read("deploy/alertmanager/alertmanager.yml");
    let mut named = 0;
    for (i, _) in text.match_indices("Vault") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        assert!(
            names.contains(&name),
            "alertmanager.yml names {name}, which no rule raises"
        );
        named += 1;
    }
    assert!(named >= 4);
    let am = yaml("deploy/alertmanager/alertmanager.yml");
    let outage = am["inhibit_rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| strings(&r["source_matchers"]) == ["alertname = \"VaultPartitionStuck\""])
        .expect("an inhibit rule with VaultPartitionStuck as its source");
    assert_eq!(strings(&outage["equal"]), ["topic"]);
    let targets = strings(&outage["target_matchers"]).join(" ");
    for follows in ["VaultCommitsStalled", "VaultPartitionNotCommitting"] {
        assert!(targets.contains(follows), "{targets}");
    }
    // Alerts inhibited per topic carry a topic label: the rules aggregate by topic.
    for r in &alert_rules() {
        if [
            "VaultPartitionStuck",
            "VaultCommitsStalled",
            "VaultPartitionNotCommitting",
        ]
        .contains(&s(&r["alert"]))
        {
            assert!(
                s(&r["expr"]).contains("count by (topic)"),
                "{}",
                s(&r["alert"])
            );
        }
    }
}

/// The README lists every alert the rules raise, and the README, DESIGN and the dashboard name
/// only alerts that exist.
#[test]
fn the_docs_list_every_alert_and_name_only_real_ones() {
    let names = alert_names();
    let readme = read("README.md");
    for name in &names {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not list the alert {name}"
        );
    }
    for file in [
        "README.md",
        "docs/DESIGN.md",
        "deploy/grafana/dashboards/vault.json",
    ] {
        let text = read(file);
        for (i, _) in text.match_indices("Vault") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let boundary = i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric();
            let alert_like = name.chars().nth(5).is_some_and(|c| c.is_ascii_uppercase());
            if boundary && alert_like {
                assert!(
                    names.contains(&name),
                    "{file} names {name}, which no rule raises"
                );
            }
        }
    }
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
        if svc["image"].as_str() != Some("activity-vault:local") {
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
        vault_services, 4,
        "init-schema, vault, vault-api, producer use the image"
    );

    let vault_svc = &compose["services"]["vault"];
    assert_eq!(vault_svc["deploy"]["replicas"].as_u64(), Some(3));
    let env = env_map(&vault_svc["environment"]);
    let metrics_port = port_of(&env["VAULT_METRICS_ADDR"]);
    let health = strings(&vault_svc["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains(&format!(
            "--addr 127.0.0.1:{metrics_port} --path /readyz --path /healthz"
        )),
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
    assert_eq!(
        s(&prom["scrape_configs"][0]["job_name"]),
        rules_job(),
        "the job the alert rules select"
    );
    assert_eq!(strings(&prom["rule_files"]), ["alerts.yml"]);
    // vault api is scraped as the job its rules select, where compose's vault-api serves.
    let api_env = env_map(&compose["services"]["vault-api"]["environment"]);
    let api_scrape = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| s(&c["job_name"]) == api_rules_job())
        .expect("a scrape job for vault api, the one its rules select");
    assert_eq!(s(&api_scrape["metrics_path"]), "/metrics");
    assert_eq!(
        strings(&api_scrape["static_configs"][0]["targets"]),
        [format!("vault-api:{}", port_of(&api_env["VAULT_API_ADDR"]))]
    );
    let prom_volumes = strings(&compose["services"]["prometheus"]["volumes"]);
    assert!(prom_volumes.contains(&"./deploy/prometheus:/etc/prometheus:ro".to_string()));

    // Prometheus sends alerts to the compose Alertmanager, which runs the checked config.
    let target = strings(&prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]);
    assert_eq!(target.len(), 1, "{target:?}");
    let (host, port) = target[0].split_once(':').expect("host:port");
    let am = &compose["services"][host];
    assert!(am.is_mapping(), "no compose service {host}");
    assert!(
        strings(&am["volumes"]).contains(&"./deploy/alertmanager:/etc/alertmanager:ro".to_string())
    );
    assert!(strings(&am["command"])
        .contains(&"--config.file=/etc/alertmanager/alertmanager.yml".to_string()));
    assert!(
        strings(&am["ports"]).contains(&format!("127.0.0.1:{port}:{port}")),
        "{:?}",
        am["ports"]
    );
    assert!(strings(&compose["services"]["prometheus"]["depends_on"]).contains(&host.to_owned()));
    // `make up` returns once every service is healthy.
    let makefile = read("Makefile");
    let up = makefile
        .lines()
        .skip_while(|l| !l.starts_with("up:"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        up.contains("docker compose up") && up.contains("--wait"),
        "{up}"
    );

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

/// The stand-in for the value of `key` in the Secret `secret`: librdkafka options for a
/// `.properties` key (what kafka.options_file reads), else a string naming both.
fn stand_in(secret: &str, key: &str) -> String {
    if key.ends_with(".properties") {
        format!("sasl.username=secret-{secret}-user\nsasl.password=secret-{secret}-password\n")
    } else {
        format!("secret-{secret}-{key}")
    }
}

/// The environment `container` of the pod spec `pod` runs with, on this machine: the volumes it
/// mounts, under `dir` (the ConfigMap's vault.toml; each item of a Secret volume as a file
/// holding its stand-in and a newline, as `kubectl create secret --from-file` would from an
/// editor's file), its values with each mount path moved there, a Secret key's value as its
/// stand-in, and the pod's name from the downward API.
fn container_env(
    pod: &Value,
    container: &Value,
    toml_text: &str,
    dir: &Path,
) -> BTreeMap<String, String> {
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let name = s(&m["name"]);
        let volume = volumes
            .iter()
            .find(|v| s(&v["name"]) == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let local = dir.join(name);
        std::fs::create_dir_all(&local).unwrap();
        if volume["configMap"].is_mapping() {
            std::fs::write(local.join("vault.toml"), toml_text).unwrap();
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            for item in volume["secret"]["items"].as_sequence().expect("items") {
                let text = stand_in(secret, s(&item["key"]));
                let text = if text.ends_with('\n') {
                    text
                } else {
                    text + "\n"
                };
                std::fs::write(local.join(s(&item["path"])), text).unwrap();
            }
        }
        mounts.push((s(&m["mountPath"]).to_owned(), local));
    }
    let mut env = BTreeMap::new();
    for e in container["env"].as_sequence().unwrap() {
        let name = s(&e["name"]).to_owned();
        let value = match (&e["value"], &e["valueFrom"]) {
            (Value::String(v), _) => mounts
                .iter()
                .filter_map(|(path, local)| {
                    v.strip_prefix(path.as_str())
                        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                        .map(|rest| (path.len(), format!("{}{rest}", local.display())))
                })
                .max()
                .map_or_else(|| v.clone(), |(_, moved)| moved),
            (_, from) if from["fieldRef"]["fieldPath"] == "metadata.name" => format!("{NAME}-0"),
            (_, from) if from["secretKeyRef"].is_mapping() => {
                let r = &from["secretKeyRef"];
                stand_in(s(&r["name"]), s(&r["key"]))
            }
            other => panic!("env {name}: {other:?}"),
        };
        env.insert(name, value);
    }
    env
}

/// What `vault check-config` shows holds nothing from a Secret but a user name.
fn assert_shows_no_secret(effective: &str) {
    for line in effective.lines().filter(|l| l.contains("secret-")) {
        assert!(line.starts_with("username = "), "a secret shown: {line}");
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
            // The consumers' object of a kind is keyed by the kind; another one (vault api's
            // Service and NetworkPolicy, in vault-api.yaml, listed last) by kind/name.
            let key = if objects.contains_key(&kind) {
                format!("{kind}/{}", s(&doc["metadata"]["name"]))
            } else {
                kind.clone()
            };
            assert!(
                objects.insert(key, doc).is_none(),
                "one {kind} of each name only"
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
        "TriggerAuthentication",
    ] {
        assert!(objects.contains_key(kind), "{kind} in deploy/k8s");
    }
    let sts = &objects["StatefulSet"];
    let pod = &sts["spec"]["template"];
    let container = &pod["spec"]["containers"][0];

    // The configuration file validates, with the environment and the files the pod gives
    // each container.
    let toml_text = s(&objects["ConfigMap"]["data"]["vault.toml"]).to_owned();
    let check_config = |container: &Value| -> String {
        let dir = std::env::temp_dir().join(crate::common::unique("vault-k8s"));
        let env = container_env(&pod["spec"], container, &toml_text, &dir);
        let effective = vault(&["check-config".into()], &env);
        let _ = std::fs::remove_dir_all(&dir);
        assert_shows_no_secret(&effective);
        effective
    };
    let effective = check_config(container);
    assert!(
        effective.contains(&format!("instance_id = \"{NAME}-0\"")),
        "static membership from the pod name: {effective}"
    );
    assert_command_accepted(&strings(&container["args"]));

    // A fresh cluster does not crash-loop: an init container migrates the schema first, with
    // the consumer's image, configuration and credentials.
    let inits = pod["spec"]["initContainers"]
        .as_sequence()
        .expect("initContainers");
    let migrate = inits
        .iter()
        .find(|c| strings(&c["args"]) == ["migrate"])
        .expect("an init container running `vault migrate`");
    assert_command_accepted(&strings(&migrate["args"]));
    assert_eq!(migrate["image"], container["image"]);
    assert_eq!(
        migrate["volumeMounts"][0], container["volumeMounts"][0],
        "the same configuration (the API token is the consumer's alone)"
    );
    // The same cluster and keyspace, each with its own role: the user name and the file of
    // the password differ (tests secrets_reach_the_pods_as_files_of_their_own_role).
    let scylla = |effective: &str| -> Vec<String> {
        effective
            .split("[scylla]")
            .nth(1)
            .and_then(|r| r.split("\n[").next())
            .expect("[scylla] in check-config's output")
            .lines()
            .filter(|l| !l.starts_with("username = ") && !l.starts_with("password_file = "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        scylla(&check_config(migrate)),
        scylla(&effective),
        "migrate sees the consumer's ScyllaDB settings"
    );

    // The restricted Pod Security Standard, which namespace.yaml enforces.
    assert_eq!(
        s(&objects["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]),
        "restricted"
    );
    let pod_security = &pod["spec"]["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(s(&pod_security["seccompProfile"]["type"]), "RuntimeDefault");
    for c in inits
        .iter()
        .chain(pod["spec"]["containers"].as_sequence().unwrap())
    {
        let sc = &c["securityContext"];
        let name = s(&c["name"]);
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        assert!(sc["privileged"].as_bool() != Some(true), "{name}");
        for kind in ["requests", "limits"] {
            assert!(
                c["resources"][kind].is_mapping(),
                "{name}: resources.{kind}"
            );
        }
    }

    // Ports and paths agree with the configuration and with each other.
    let config: toml::Value = toml::from_str(&toml_text).unwrap();
    let metrics_port = port_of(config["metrics"]["addr"].as_str().unwrap());
    let port = &container["ports"][0];
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(metrics_port))
    );
    let port_name = s(&port["name"]);
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(s(&container[probe]["httpGet"]["path"]), path);
        assert_eq!(s(&container[probe]["httpGet"]["port"]), port_name);
    }
    // The startup probe waits out the ScyllaDB connection retries (with room to spare); the
    // liveness probe restarts a pod whose loops went quiet, not one that is merely slow.
    let probe_budget = |probe: &str| {
        Duration::from_secs(
            container[probe]["periodSeconds"].as_u64().unwrap()
                * container[probe]["failureThreshold"].as_u64().unwrap(),
        )
    };
    assert!(
        probe_budget("startupProbe")
            > vault::pipeline::deadline::STARTUP_CONNECT_PATIENCE + Duration::from_secs(15)
    );
    assert!(probe_budget("livenessProbe") >= Duration::from_secs(10));
    assert!(container["livenessProbe"]["initialDelaySeconds"].is_null());
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

    // The grace period covers the whole stop, every step at its bound.
    let shutdown = duration(config["pipeline"]["shutdown_timeout"].as_str().unwrap());
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let topics = config["kafka"]["topics"].as_array().unwrap().len();
    let worst = {
        use vault::pipeline::deadline::*;
        shutdown
            + DRAIN_GRACE
            + FINAL_COMMIT_RETRY
            + 2 * KAFKA_CALL_TIMEOUT
            + after_final_commit(topics)
    };
    assert!(
        Duration::from_secs(grace) >= worst,
        "grace {grace}s vs the longest stop {worst:?}"
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
    // KEDA owns the count: a `replicas` here would reset it on every apply.
    assert!(
        sts["spec"]["replicas"].is_null(),
        "no replicas in the StatefulSet: KEDA owns the count"
    );
    let scaled = &objects["ScaledObject"]["spec"];
    let min_replicas = scaled["minReplicaCount"].as_u64().expect("minReplicaCount");
    assert!(min_replicas >= 2, "a drain never leaves one consumer alone");
    let pdb = &objects["PodDisruptionBudget"]["spec"];
    assert!(pdb["maxUnavailable"].as_u64().unwrap() < min_replicas);
    let scale_down = &scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"];
    assert!(scale_down["stabilizationWindowSeconds"].as_u64().unwrap() >= 300);
    let session_timeout = duration(config["kafka"]["session_timeout"].as_str().unwrap());
    for policy in scale_down["policies"].as_sequence().unwrap() {
        assert_eq!(s(&policy["type"]), "Pods");
        assert_eq!(policy["value"].as_u64(), Some(1), "one pod at a time");
        assert!(
            Duration::from_secs(policy["periodSeconds"].as_u64().unwrap()) > session_timeout,
            "a scale-down step waits out the stall of the last one"
        );
    }
    let auth = &objects["TriggerAuthentication"];
    assert_eq!(
        s(&scaled["triggers"][0]["authenticationRef"]["name"]),
        s(&auth["metadata"]["name"])
    );
    let params: BTreeSet<&str> = auth["spec"]["secretTargetRef"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| s(&r["parameter"]))
        .collect();
    for p in ["sasl", "username", "password", "tls"] {
        assert!(params.contains(p), "TriggerAuthentication sets {p}");
    }
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
    assert_eq!(
        s(&trigger["excludePersistentLag"]),
        "true",
        "a stuck partition does not drive scaling to the maximum"
    );
    let compose = yaml("docker-compose.yml");
    let init = strings(&compose["services"]["init-topics"]["command"]).join(" ");
    let partitions: u64 = init
        .split("--partitions ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("partition count of the source topic");
    let max_replicas = scaled["maxReplicaCount"].as_u64().unwrap();
    assert!(min_replicas <= max_replicas && max_replicas <= partitions);

    // Prometheus finds the targets and rules through the label its selectors usually match,
    // set in one place (a kustomize patch on both Prometheus Operator objects); the Service's
    // name is the job label the rules select.
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let release = kustomization["patches"]
        .as_sequence()
        .expect("patches")
        .iter()
        .filter(|p| s(&p["target"]["group"]) == "monitoring.coreos.com")
        .find_map(|p| {
            let patch: Value = serde_yaml_ng::from_str(s(&p["patch"])).unwrap();
            patch["metadata"]["labels"]["release"]
                .as_str()
                .map(str::to_owned)
        })
        .expect("a patch setting the release label on ServiceMonitor and PrometheusRule");
    assert!(!release.is_empty());
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert_eq!(
            s(&objects[kind]["apiVersion"]),
            "monitoring.coreos.com/v1",
            "{kind} is reached by the patch"
        );
    }
    assert!(
        monitor["jobLabel"].is_null(),
        "the job label is the Service's name"
    );
    assert_eq!(s(&svc["metadata"]["name"]), rules_job());

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
    // The health check is the binary itself (no curl in the image), asking the metrics port.
    let check = lines
        .iter()
        .find_map(|l| l.strip_prefix("CMD [\"/usr/local/bin/vault\", \"healthcheck\""))
        .expect("HEALTHCHECK runs vault healthcheck");
    assert!(
        check.contains(&format!("\"127.0.0.1:{expose}\"")),
        "{check}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("curl")),
        "no curl in the image"
    );
}

/// Issue 19's hardening, as files: the pod mounts no service-account token but the vault
/// container's, which may read its StatefulSet's scale and nothing else, a NetworkPolicy
/// lets in only the monitoring namespace on the metrics port and lets out only Kafka's and
/// ScyllaDB's namespaces and ports (as configured), the API server's ports and DNS, SASL
/// credentials and the ScyllaDB password come from Secrets (as files: see
/// secrets_reach_the_pods_as_files_of_their_own_role), the ScyllaDB password travels over TLS;
/// compose's vault is read-only, without capabilities or privilege gain, and Grafana has no
/// default admin.
#[test]
fn the_deployment_is_hardened() {
    let objects = k8s_objects();
    let sts = &objects["StatefulSet"];
    let pod = &sts["spec"]["template"];
    assert_eq!(
        pod["spec"]["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    let container = &pod["spec"]["containers"][0];
    let file_of = |setting: &str| {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| s(&e["name"]) == setting)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{setting} in the vault container"))
            .to_owned()
    };
    for setting in ["VAULT_KAFKA_OPTIONS_FILE", "VAULT_SCYLLA_PASSWORD_FILE"] {
        assert!(file_of(setting).starts_with("/run/secrets/"), "{setting}");
    }
    let toml_text = s(&objects["ConfigMap"]["data"]["vault.toml"]).to_owned();
    let config: toml::Value = toml::from_str(&toml_text).unwrap();
    assert_eq!(
        config["scylla"]["tls"].as_bool(),
        Some(true),
        "the password from the Secret crosses the network over TLS"
    );

    // The one Kubernetes API read (a stopping pod's StatefulSet scale): a ServiceAccount whose
    // Role may `get` that scale and nothing else, its token in the vault container alone.
    let account = s(&objects["ServiceAccount"]["metadata"]["name"]);
    assert_eq!(s(&pod["spec"]["serviceAccountName"]), account);
    assert_eq!(
        objects["ServiceAccount"]["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    let rules = objects["Role"]["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), ["apps"]);
    assert_eq!(strings(&rules[0]["resources"]), ["statefulsets/scale"]);
    assert_eq!(
        strings(&rules[0]["resourceNames"]),
        [s(&sts["metadata"]["name"])]
    );
    assert_eq!(strings(&rules[0]["verbs"]), ["get"]);
    let binding = &objects["RoleBinding"];
    assert_eq!(
        s(&binding["roleRef"]["name"]),
        s(&objects["Role"]["metadata"]["name"])
    );
    assert_eq!(s(&binding["subjects"][0]["kind"]), "ServiceAccount");
    assert_eq!(s(&binding["subjects"][0]["name"]), account);
    let mounts_token = |c: &Value| {
        c["volumeMounts"].as_sequence().is_some_and(|m| {
            m.iter().any(|v| {
                s(&v["mountPath"]) == "/var/run/secrets/kubernetes.io/serviceaccount"
                    && v["readOnly"].as_bool() == Some(true)
            })
        })
    };
    assert!(mounts_token(container), "the vault container reads the API");
    for init in pod["spec"]["initContainers"].as_sequence().unwrap() {
        assert!(!mounts_token(init), "{} has no token", s(&init["name"]));
    }
    let token = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|v| {
            v["projected"]["sources"]
                .as_sequence()
                .into_iter()
                .flatten()
        })
        .find(|source| source["serviceAccountToken"].is_mapping())
        .expect("a projected service-account token");
    assert!(
        token["serviceAccountToken"]["expirationSeconds"]
            .as_u64()
            .is_some_and(|s| s <= 3600),
        "short-lived"
    );
    assert_eq!(
        config["kafka"]["leave_group_on_shutdown"].as_str(),
        Some("scale-down")
    );

    let policy = &objects["NetworkPolicy"]["spec"];
    for (k, v) in policy["podSelector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][k], v,
            "the policy selects the pods"
        );
    }
    assert_eq!(strings(&policy["policyTypes"]), ["Ingress", "Egress"]);
    let ingress = policy["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1, "one ingress rule: {ingress:?}");
    let metrics_port = port_of(config["metrics"]["addr"].as_str().unwrap());
    assert_eq!(
        ingress[0]["ports"][0]["port"].as_u64(),
        Some(u64::from(metrics_port))
    );
    assert_eq!(
        s(&ingress[0]["from"][0]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"]),
        "monitoring"
    );
    // Every configured broker and node is reachable: `<service>.<namespace>.svc:<port>`.
    let egress = policy["egress"].as_sequence().unwrap();
    let allows = |host_port: &str| {
        let (host, port) = host_port.rsplit_once(':').unwrap();
        let namespace = host.split('.').nth(1).unwrap();
        egress.iter().any(|rule| {
            rule["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                .as_str()
                == Some(namespace)
                && rule["ports"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(port))
        })
    };
    let brokers = config["kafka"]["brokers"].as_str().unwrap();
    for b in brokers.split(',') {
        assert!(allows(b.trim()), "egress to broker {b}");
    }
    for n in config["scylla"]["nodes"].as_array().unwrap() {
        assert!(allows(n.as_str().unwrap()), "egress to node {n}");
    }
    assert!(
        egress.iter().any(|r| r["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["port"].as_u64() == Some(53))),
        "DNS"
    );
    // The API server by address (its address depends on the cluster): private ranges only,
    // on its ports alone.
    let by_address: Vec<&Value> = egress
        .iter()
        .filter(|r| r["to"][0]["ipBlock"].is_mapping())
        .collect();
    assert_eq!(by_address.len(), 1, "{by_address:?}");
    let cidrs: Vec<&str> = by_address[0]["to"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| s(&t["ipBlock"]["cidr"]))
        .collect();
    assert_eq!(
        cidrs,
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        "never the internet"
    );
    let api_ports: Vec<u64> = by_address[0]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(api_ports, [443, 6443], "the API server's ports only");

    let compose = yaml("docker-compose.yml");
    let vault = &compose["services"]["vault"];
    assert_eq!(vault["read_only"].as_bool(), Some(true));
    assert_eq!(strings(&vault["cap_drop"]), ["ALL"]);
    assert!(strings(&vault["security_opt"]).contains(&"no-new-privileges:true".to_owned()));
    let check = strings(&vault["healthcheck"]["test"]);
    assert_eq!(check[1], "/usr/local/bin/vault", "{check:?}");
    assert_command_accepted(&check[2..]);
    let grafana = env_map(&compose["services"]["grafana"]["environment"]);
    assert!(
        !grafana.contains_key("GF_SECURITY_ADMIN_PASSWORD")
            && grafana
                .get("GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION")
                .map(String::as_str)
                == Some("true"),
        "no default admin account: {grafana:?}"
    );
}

/// The containers of a pod spec, init containers first.
fn pod_containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_sequence().into_iter().flatten())
        .collect()
}

/// Whether every label `selector` (a matchLabels mapping) asks for is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .expect("matchLabels")
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

/// The security review's findings, as files: no password reaches a pod as an environment
/// variable. Every `*_file` setting a container is given names a file of a Secret volume
/// mounted read-only into that container alone, readable by the pod's group and no one else;
/// each command (`vault migrate`, `run`, `api`) connects with a ScyllaDB role of its own, from
/// a Secret of its own; and vault, started with a container's environment and files, reads its
/// password from there and shows none of it.
#[test]
fn secrets_reach_the_pods_as_files_of_their_own_role() {
    let objects = k8s_objects();
    let toml_text = s(&objects["ConfigMap"]["data"]["vault.toml"]).to_owned();
    // The Secret each command's ScyllaDB password comes from.
    let mut roles: BTreeMap<String, String> = BTreeMap::new();
    for workload in ["StatefulSet", "Deployment"] {
        let pod = &objects[workload]["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_sequence().unwrap();
        let security = &pod["securityContext"];
        let user = security["runAsUser"].as_u64().expect("runAsUser");
        assert_ne!(user, 0);
        let fs_group = security["fsGroup"].as_u64();
        for v in volumes.iter().filter(|v| v["secret"].is_mapping()) {
            let holders: Vec<&str> = pod_containers(pod)
                .iter()
                .filter(|c| {
                    c["volumeMounts"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|m| m["name"] == v["name"])
                })
                .map(|c| s(&c["name"]))
                .collect();
            assert_eq!(
                holders.len(),
                1,
                "{workload}: {:?} is mounted into one container: {holders:?}",
                v["name"]
            );
        }
        for c in pod_containers(pod) {
            let name = format!("{workload}/{}", s(&c["name"]));
            let command = s(&c["args"][0]).to_owned();
            let env = c["env"].as_sequence().unwrap();
            // From Secrets as environment variables: user names only. Never a password or a
            // token.
            for e in env {
                if e["valueFrom"]["secretKeyRef"].is_mapping() {
                    let var = s(&e["name"]);
                    assert_eq!(
                        var, "VAULT_SCYLLA_USERNAME",
                        "{name}: {var} from a Secret as an environment variable"
                    );
                }
            }
            let files: BTreeMap<&str, &str> = env
                .iter()
                .filter(|e| s(&e["name"]).ends_with("_FILE"))
                .map(|e| (s(&e["name"]), s(&e["value"])))
                .collect();
            let mut wanted = vec!["VAULT_SCYLLA_PASSWORD_FILE"];
            if command == "run" {
                wanted.push("VAULT_KAFKA_OPTIONS_FILE");
            }
            if command == "api" {
                wanted.extend(["VAULT_API_READ_TOKENS_FILE", "VAULT_API_ADMIN_TOKENS_FILE"]);
            }
            for setting in wanted {
                assert!(files.contains_key(setting), "{name}: {setting}");
            }
            for (setting, path) in &files {
                let (mount, item_path) = c["volumeMounts"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find_map(|m| {
                        path.strip_prefix(&format!("{}/", s(&m["mountPath"])))
                            .map(|rest| (m, rest))
                    })
                    .unwrap_or_else(|| {
                        panic!("{name}: {setting} {path} is in no volume it mounts")
                    });
                assert_eq!(mount["readOnly"].as_bool(), Some(true), "{name}: {setting}");
                let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
                let secret = &volume["secret"];
                assert!(
                    secret.is_mapping(),
                    "{name}: {setting} {path} is a Secret's"
                );
                assert!(
                    secret["optional"].as_bool() != Some(true),
                    "{name}: {setting}: the Secret is required"
                );
                let item = secret["items"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|i| s(&i["path"]) == item_path)
                    .unwrap_or_else(|| {
                        panic!("{name}: {setting}: {path} is no item of {secret:?}")
                    });
                let mode = item["mode"]
                    .as_u64()
                    .or(secret["defaultMode"].as_u64())
                    .unwrap_or(0o644);
                assert_eq!(
                    mode & 0o337,
                    0,
                    "{name}: {path} mode {mode:o}: read-only, and no one else's"
                );
                // The kubelet writes the files as root: the container (user {user}) reads them
                // through the pod's fsGroup.
                assert!(
                    mode & 0o040 != 0 && fs_group.is_some(),
                    "{name}: {path} mode {mode:o}, fsGroup {fs_group:?}: user {user} cannot read it"
                );
                if *setting == "VAULT_SCYLLA_PASSWORD_FILE" {
                    let user_ref = env
                        .iter()
                        .find(|e| s(&e["name"]) == "VAULT_SCYLLA_USERNAME")
                        .map(|e| &e["valueFrom"]["secretKeyRef"])
                        .unwrap_or_else(|| panic!("{name}: VAULT_SCYLLA_USERNAME"));
                    assert_eq!(
                        user_ref["name"], secret["secretName"],
                        "{name}: user and password of one role"
                    );
                    let previous =
                        roles.insert(command.clone(), s(&secret["secretName"]).to_owned());
                    assert!(previous.is_none(), "{command} runs once");
                }
                if *setting == "VAULT_KAFKA_OPTIONS_FILE" {
                    assert_eq!(
                        secret["secretName"],
                        objects["TriggerAuthentication"]["spec"]["secretTargetRef"][0]["name"],
                        "{name}: the Kafka credentials KEDA reads"
                    );
                }
            }

            // vault, started with this environment and these files, uses the mounted password
            // (and Kafka options), and check-config shows none of it.
            let dir = std::env::temp_dir().join(crate::common::unique("vault-k8s-secrets"));
            let env = container_env(pod, c, &toml_text, &dir);
            let config = vault::config::load_with_env(
                Some(Path::new(&env["VAULT_CONFIG"])),
                &[],
                env.clone(),
            )
            .and_then(|c| c.validate())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let password_secret = &roles[&command];
            assert_eq!(
                config.config.scylla.password,
                stand_in(password_secret, "scylla-password"),
                "{name}: the password is the mounted file's, its newline dropped"
            );
            assert_eq!(
                config.config.scylla.username,
                stand_in(password_secret, "scylla-username")
            );
            if command == "run" {
                let kafka =
                    s(&objects["TriggerAuthentication"]["spec"]["secretTargetRef"][0]["name"]);
                assert_eq!(
                    config.config.kafka.options.get("sasl.password"),
                    Some(&format!("secret-{kafka}-password")),
                    "{name}: the SASL password is the mounted options file's"
                );
            }
            if command == "api" {
                vault::api::ApiSettings::new(&config.config)
                    .unwrap_or_else(|e| panic!("{name}: vault api starts with it: {e}"));
            }
            let effective = vault(&["check-config".into()], &env);
            let _ = std::fs::remove_dir_all(&dir);
            assert!(
                effective.contains("password = \"********\""),
                "{name}: {effective}"
            );
            assert_shows_no_secret(&effective);
        }
    }
    assert_eq!(
        roles.keys().map(String::as_str).collect::<Vec<_>>(),
        ["api", "migrate", "run"]
    );
    let secrets: BTreeSet<&String> = roles.values().collect();
    assert_eq!(
        secrets.len(),
        3,
        "a ScyllaDB role, and a Secret, per command: {roles:?}"
    );
    // The README documents each role's grants.
    let readme = read("README.md");
    for grant in [
        "GRANT CREATE ON ALL KEYSPACES TO vault_migrate;",
        "GRANT SELECT ON KEYSPACE vault TO vault_run;",
        "GRANT MODIFY ON KEYSPACE vault TO vault_run;",
        "GRANT SELECT ON KEYSPACE vault TO vault_api;",
        "GRANT MODIFY ON KEYSPACE vault TO vault_api;",
    ] {
        assert!(readme.contains(grant), "README: {grant}");
    }
    for secret in roles.values() {
        assert!(
            readme.contains(&format!("`{secret}`")),
            "README names the Secret {secret}"
        );
    }
}

/// vault api through drains, rollouts and the loss of a node: its own PodDisruptionBudget (one
/// replica down at a time, unready ones evictable, like the consumers'), a rollout that never
/// has fewer ready replicas than it wants, a stop that lets the Service's endpoints forget the
/// pod before SIGTERM and fits the grace period with vault api's shutdown, and the replicas of
/// both workloads spread over nodes.
#[test]
fn the_read_side_keeps_serving_through_drains_rollouts_and_node_loss() {
    let objects = k8s_objects();
    let deployment = &objects["Deployment"];
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    let consumer_pod = &objects["StatefulSet"]["spec"]["template"];
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();

    let pdb = &objects["PodDisruptionBudget/activity-vault-api"];
    let consumers_pdb = &objects["PodDisruptionBudget"];
    assert_eq!(s(&pdb["apiVersion"]), "policy/v1");
    let selector = &pdb["spec"]["selector"]["matchLabels"];
    assert!(selects(selector, labels), "the PDB counts vault api's pods");
    assert!(
        !selects(selector, &consumer_pod["metadata"]["labels"]),
        "and not the consumers'"
    );
    assert!(
        !selects(&consumers_pdb["spec"]["selector"]["matchLabels"], labels),
        "the consumers' PDB does not count vault api's pods"
    );
    let max_unavailable = pdb["spec"]["maxUnavailable"]
        .as_u64()
        .expect("maxUnavailable");
    assert!(
        (1..replicas).contains(&max_unavailable),
        "a drain goes on, one of {replicas} replicas at a time: {max_unavailable}"
    );
    assert_eq!(s(&pdb["spec"]["unhealthyPodEvictionPolicy"]), "AlwaysAllow");
    assert_eq!(
        pdb["spec"]["unhealthyPodEvictionPolicy"],
        consumers_pdb["spec"]["unhealthyPodEvictionPolicy"]
    );

    let rolling = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(s(&deployment["spec"]["strategy"]["type"]), "RollingUpdate");
    assert_eq!(
        rolling["maxUnavailable"].as_u64(),
        Some(0),
        "a new pod is ready before an old one stops"
    );
    assert!(rolling["maxSurge"].as_u64().is_some_and(|n| n >= 1));

    // SIGTERM stops vault api accepting at once (src/http.rs): the kubelet sleeps first, while
    // the endpoints forget the pod, and the grace period covers the sleep and the shutdown.
    let container = &pod["spec"]["containers"][0];
    let pre_stop = &container["lifecycle"]["preStop"];
    assert!(
        pre_stop["exec"].is_null(),
        "the kubelet sleeps: no sleep binary in the image"
    );
    let sleep = Duration::from_secs(
        pre_stop["sleep"]["seconds"]
            .as_u64()
            .expect("a preStop sleep"),
    );
    assert!(
        sleep >= Duration::from_secs(5),
        "long enough for the endpoints to forget the pod"
    );
    let grace = Duration::from_secs(
        pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap(),
    );
    let shutdown = vault::api::limits(&vault::config::ApiConfig::default()).shutdown_grace;
    assert!(
        grace >= sleep + shutdown + Duration::from_secs(2),
        "grace {grace:?} covers the sleep {sleep:?} and vault api's shutdown {shutdown:?}"
    );

    for (workload, pod) in [("StatefulSet", consumer_pod), ("Deployment", pod)] {
        let by_node = pod["spec"]["topologySpreadConstraints"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{workload}: topologySpreadConstraints"))
            .iter()
            .find(|c| s(&c["topologyKey"]) == "kubernetes.io/hostname")
            .unwrap_or_else(|| panic!("{workload}: spread over nodes"));
        assert_eq!(by_node["maxSkew"].as_u64(), Some(1), "{workload}");
        assert_eq!(
            s(&by_node["whenUnsatisfiable"]),
            "ScheduleAnyway",
            "{workload}: a preference, so a cluster with fewer nodes still runs every replica"
        );
        assert!(
            selects(
                &by_node["labelSelector"]["matchLabels"],
                &pod["metadata"]["labels"]
            ),
            "{workload}: spreads its own pods"
        );
    }
}

/// vault api's alert rules select the job its targets have (compose's scrape job, the Service's
/// name on Kubernetes) and only metrics it exports; the consumers' rules never count its
/// series; each read side alert carries the job, as Alertmanager can route it, and is a
/// warning, as README says.
#[test]
fn the_read_side_rules_select_its_job_and_its_metrics() {
    let objects = k8s_objects();
    let api_job = api_rules_job();
    let svc = &objects["Service/activity-vault-api"];
    assert_eq!(
        s(&svc["metadata"]["name"]),
        api_job,
        "the Prometheus Operator's job label"
    );
    let monitor = &objects["ServiceMonitor/activity-vault-api"];
    assert!(
        monitor["spec"]["jobLabel"].is_null(),
        "the job label is the Service's name"
    );
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));
    assert_eq!(
        s(&monitor["spec"]["endpoints"][0]["port"]),
        s(&svc["spec"]["ports"][0]["name"])
    );
    assert_eq!(s(&monitor["spec"]["endpoints"][0]["path"]), "/metrics");
    // The consumers' ServiceMonitor does not scrape vault api's Service.
    assert!(!selects(
        &objects["ServiceMonitor"]["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));

    let api = vault::telemetry::metrics::ApiMetrics::new();
    let consumers = vault::telemetry::metrics::Metrics::new();
    let metrics_of = |expr: &str| -> Vec<(String, String)> {
        // Each vault_ metric an expression uses, with its selector ("" without one).
        expr.match_indices("vault_")
            .filter(|(i, _)| *i == 0 || !expr.as_bytes()[i - 1].is_ascii_alphanumeric())
            .map(|(i, _)| {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let rest = &expr[i + name.len()..];
                let selector = rest
                    .strip_prefix('{')
                    .and_then(|r| r.split('}').next())
                    .unwrap_or_default()
                    .to_owned();
                (name, selector)
            })
            .collect()
    };
    let base = |name: &str| -> String {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name)
            .to_owned()
    };
    let rules = yaml("deploy/prometheus/alerts.yml");
    for group in rules["groups"].as_sequence().unwrap() {
        let name = s(&group["name"]);
        for r in group["rules"].as_sequence().unwrap() {
            let alert = s(&r["alert"]);
            let expr = s(&r["expr"]);
            for (metric, selector) in metrics_of(expr) {
                let metric = base(&metric);
                let in_api = api.names.contains(&metric.as_str());
                if name == "vault-api" {
                    assert!(
                        in_api,
                        "{alert} uses {metric}, which vault api does not export"
                    );
                    assert!(
                        selector.contains(&format!("job=\"{api_job}\"")),
                        "{alert}: {metric} without the job: {expr}"
                    );
                } else if in_api {
                    assert!(
                        consumers.names.contains(&metric.as_str())
                            && selector.contains(&format!("job=\"{}\"", rules_job())),
                        "{alert} counts vault api's {metric}: {expr}"
                    );
                }
            }
            if name == "vault-api" {
                assert!(expr.contains(&format!("job=\"{api_job}\"")), "{alert}");
                assert!(
                    expr.contains("by (job")
                        || expr.starts_with("up{")
                        || expr.starts_with("absent("),
                    "{alert} keeps the job label: {expr}"
                );
                assert_eq!(s(&r["labels"]["severity"]), "warning", "{alert}");
                assert!(alert.starts_with("VaultApi"), "{alert}");
            }
        }
    }
}

/// The dashboard shows the consumers: its instance variable lists them alone, and every panel
/// on a metric vault api exports too (vault_build_info) selects their job.
#[test]
fn the_dashboard_lists_only_the_consumers() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/vault.json")).unwrap();
    let job = format!("job=\"{}\"", rules_job());
    let api = vault::telemetry::metrics::ApiMetrics::new();
    let consumers = vault::telemetry::metrics::Metrics::new();
    let shared: Vec<&str> = api
        .names
        .iter()
        .copied()
        .filter(|n| consumers.names.contains(n))
        .collect();
    assert!(shared.contains(&"vault_build_info"), "{shared:?}");
    let variable = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("the instance variable");
    let mut queries = vec![
        variable["query"]["query"].as_str().unwrap().to_owned(),
        variable["definition"].as_str().unwrap().to_owned(),
    ];
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let mut checked = 0;
    for q in &queries {
        for name in &shared {
            for (i, _) in q.match_indices(name) {
                let selector = q[i + name.len()..]
                    .strip_prefix('{')
                    .and_then(|r| r.split('}').next())
                    .unwrap_or_default();
                assert!(
                    selector.contains(&job),
                    "{q}: {name} without {job}: vault api's too"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "the variable and the build panel: {checked}");
}
