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

/// The Prometheus job label the alert rules select vault's targets by.
fn rules_job() -> String {
    let alerts = read("deploy/prometheus/alerts.yml");
    let jobs: BTreeSet<String> = alerts
        .match_indices("job=\"")
        .map(|(i, m)| alerts[i + m.len()..].split('"').next().unwrap().to_owned())
        .collect();
    assert_eq!(jobs.len(), 1, "one job label in the rules: {jobs:?}");
    jobs.into_iter().next().unwrap()
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
    let pod = &objects["StatefulSet"]["spec"]["template"]["spec"];
    let images = kustomization["images"].as_sequence().expect("images");
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
    }
    for r in objects["TriggerAuthentication"]["spec"]["secretTargetRef"]
        .as_sequence()
        .unwrap()
    {
        assert_ours("Secret", s(&r["name"]));
    }
    // Prometheus: the scrape job the rules select (HashiCorp Vault's is often "vault").
    assert_ours("Prometheus job", &rules_job());
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

/// The alerts the rules raise.
fn alert_names() -> BTreeSet<String> {
    yaml("deploy/prometheus/alerts.yml")["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
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
    let rules = yaml("deploy/prometheus/alerts.yml");
    for r in rules["groups"][0]["rules"].as_sequence().unwrap() {
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

    // The configuration file validates, with the environment the pod gives each container.
    let toml_text = s(&objects["ConfigMap"]["data"]["vault.toml"]).to_owned();
    let check_config = |container: &Value| -> String {
        let dir = std::env::temp_dir().join(crate::common::unique("vault-k8s"));
        std::fs::create_dir_all(&dir).unwrap();
        let mount = s(&container["volumeMounts"][0]["mountPath"]).to_owned();
        let mut env = BTreeMap::new();
        for e in container["env"].as_sequence().unwrap() {
            let name = s(&e["name"]).to_owned();
            let value = match (&e["value"], &e["valueFrom"]) {
                (Value::String(v), _) => v.replace(&mount, dir.to_str().unwrap()),
                (_, from) if from["fieldRef"]["fieldPath"] == "metadata.name" => {
                    format!("{NAME}-0")
                }
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
            !effective.contains("secret-scylla-password"),
            "the password is masked: {effective}"
        );
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
    let scylla = |effective: &str| -> Vec<String> {
        effective
            .split("[scylla]")
            .nth(1)
            .and_then(|r| r.split("\n[").next())
            .expect("[scylla] in check-config's output")
            .lines()
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
/// ScyllaDB's namespaces and ports (as configured), the API server's ports and DNS, SASL credentials come from a Secret,
/// the ScyllaDB password travels over TLS; compose's vault is read-only, without capabilities
/// or privilege gain, and Grafana has no default admin.
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
    let secret_env: BTreeSet<String> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"].is_mapping())
        .map(|e| s(&e["name"]).to_owned())
        .collect();
    for name in [
        "VAULT_KAFKA_OPTION_SASL_USERNAME",
        "VAULT_KAFKA_OPTION_SASL_PASSWORD",
        "VAULT_SCYLLA_PASSWORD",
    ] {
        assert!(
            secret_env.contains(name),
            "{name} from a Secret: {secret_env:?}"
        );
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
