//! Whether a stopping pod is being scaled away or restarted, from the Kubernetes API: the one
//! question `kafka.leave_group_on_shutdown = "scale-down"` asks when it stops.
//!
//! A StatefulSet scaled from n to n − 1 replicas lowers its `spec.replicas` first, then deletes
//! the pod with the highest ordinal, n − 1. A rolling update, an eviction or a node drain
//! deletes a pod whose ordinal stays below `spec.replicas`, and the pod comes back under the
//! same name. So a pod named `<statefulset>-<ordinal>` is stopping for good when its ordinal is
//! at or past the StatefulSet's replicas, or when the StatefulSet is gone; then a static member
//! leaves the group and its partitions move at once. Otherwise it keeps its membership, and
//! the restarted pod gets its partitions back without a rebalance.
//!
//! The pod reads `GET /apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale` with its
//! service-account token, over TLS verified against the cluster's CA, as every in-cluster
//! client does (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT` and the files under
//! `/var/run/secrets/kubernetes.io/serviceaccount`). deploy/k8s grants that one read of that
//! one object and nothing else.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use openssl::ssl::{SslConnector, SslMethod};
use serde::Deserialize;

use crate::config::{KafkaConfig, LeaveGroup};

/// Where a pod finds its service-account token, CA certificate and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Overrides [`SERVICE_ACCOUNT_DIR`] (a token mounted elsewhere, or a test's files).
pub const SERVICE_ACCOUNT_DIR_ENV: &str = "VAULT_K8S_SERVICE_ACCOUNT_DIR";

/// The longest a scale answer may be; a real one is a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A pod of a StatefulSet, by its name `<statefulset>-<ordinal>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatefulPod {
    pub statefulset: String,
    pub ordinal: u32,
}

impl StatefulPod {
    /// The StatefulSet and ordinal of a pod name; `None` when the name has no `-<ordinal>`.
    pub fn parse(pod: &str) -> Option<StatefulPod> {
        let (statefulset, ordinal) = pod.rsplit_once('-')?;
        if statefulset.is_empty()
            || statefulset.ends_with('-')
            || !ordinal.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        Some(StatefulPod {
            statefulset: statefulset.to_owned(),
            ordinal: ordinal.parse().ok()?,
        })
    }

    /// Whether this pod stops for good when its StatefulSet wants `replicas` (`None`: the
    /// StatefulSet is gone): its ordinal is at or past them.
    pub fn is_scaled_away(&self, replicas: Option<u32>) -> bool {
        replicas.is_none_or(|n| self.ordinal >= n)
    }
}

/// What a member with `kafka.leave_group_on_shutdown = "scale-down"` asks when it stops: the
/// API server, and the pod it runs as.
#[derive(Debug, Clone)]
pub struct ScaleCheck {
    pub cluster: InCluster,
    pub pod: StatefulPod,
}

impl ScaleCheck {
    /// The check `kafka` asks for (`None`: it does not leave on a scale-down alone, or is a
    /// dynamic member, which always leaves), or what stops it: a member name that is no pod's,
    /// or a process outside a pod.
    pub fn for_config(kafka: &KafkaConfig) -> Result<Option<ScaleCheck>, String> {
        // A dynamic member (no instance id) always leaves as it stops.
        if kafka.leave_group_on_shutdown != LeaveGroup::ScaleDown || kafka.instance_id.is_empty() {
            return Ok(None);
        }
        let pod = StatefulPod::parse(&kafka.instance_id).ok_or_else(|| {
            format!(
                "kafka.instance_id {:?} is not a StatefulSet pod's name",
                kafka.instance_id
            )
        })?;
        Ok(Some(ScaleCheck {
            cluster: InCluster::from_env()?,
            pod,
        }))
    }
}

impl ScaleCheck {
    /// Reads the scale once at start-up and logs what a stop will do, or what keeps it from
    /// knowing (RBAC, a NetworkPolicy, the token): then every stop leaves the group.
    pub async fn probe(&self, timeout: Duration) {
        match self.cluster.replicas(&self.pod, timeout).await {
            Ok(None) => tracing::warn!(
                statefulset = %self.pod.statefulset,
                "The Kubernetes API finds no StatefulSet of this pod's name (is kafka.instance_id the pod's name?): every stop will leave the consumer group, so each restart costs a rebalance."
            ),
            Ok(replicas) => tracing::info!(
                statefulset = %self.pod.statefulset,
                ordinal = self.pod.ordinal,
                replicas = ?replicas,
                "Read the StatefulSet's scale: this pod leaves the consumer group when it stops only if it is scaled away (kafka.leave_group_on_shutdown = \"scale-down\")."
            ),
            Err(e) => tracing::error!(
                statefulset = %self.pod.statefulset,
                error = %e,
                "Cannot read the StatefulSet's scale (check the Role in deploy/k8s/rbac.yaml, the NetworkPolicy's egress to the API server and the mounted token): until it can, every stop leaves the consumer group, so each restart costs a rebalance."
            ),
        }
    }
}

/// The API server and the pod's credentials, as every pod has them.
#[derive(Debug, Clone)]
pub struct InCluster {
    host: String,
    port: u16,
    dir: PathBuf,
}

#[derive(Deserialize)]
struct Scale {
    spec: ScaleSpec,
}

#[derive(Deserialize)]
struct ScaleSpec {
    #[serde(default)]
    replicas: u32,
}

impl InCluster {
    /// The API server from `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`, and the
    /// service-account files from [`SERVICE_ACCOUNT_DIR`] (or [`SERVICE_ACCOUNT_DIR_ENV`]).
    /// Fails, saying what is missing, outside a pod.
    pub fn from_env() -> Result<InCluster, String> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("{name} is not set (is this process running in a pod?)"))
        };
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let port = port
            .parse()
            .map_err(|_| format!("KUBERNETES_SERVICE_PORT is not a port: {port:?}"))?;
        let dir = std::env::var(SERVICE_ACCOUNT_DIR_ENV)
            .ok()
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR), PathBuf::from);
        InCluster::new(host, port, dir)
    }

    /// The API server at `host:port`, and the service-account files in `dir` (`token`,
    /// `ca.crt`, `namespace`), which must exist.
    pub fn new(host: String, port: u16, dir: PathBuf) -> Result<InCluster, String> {
        let cluster = InCluster { host, port, dir };
        for file in ["token", "ca.crt", "namespace"] {
            let path = cluster.dir.join(file);
            if !path.is_file() {
                return Err(format!(
                    "{} is missing: the pod needs its service-account token \
                     (automountServiceAccountToken, see deploy/k8s/rbac.yaml)",
                    path.display()
                ));
            }
        }
        Ok(cluster)
    }

    /// The replicas the pod's StatefulSet wants right now; `None` when it is gone (deleted).
    pub async fn replicas(
        &self,
        pod: &StatefulPod,
        timeout: Duration,
    ) -> Result<Option<u32>, String> {
        tokio::time::timeout(timeout, self.read_replicas(pod))
            .await
            .map_err(|_| format!("the Kubernetes API did not answer within {timeout:?}"))?
    }

    async fn read_replicas(&self, pod: &StatefulPod) -> Result<Option<u32>, String> {
        let read = |file: &str| -> Result<String, String> {
            let path = self.dir.join(file);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        // Read at each use: a projected token is rotated while the pod runs.
        let (token, namespace) = (read("token")?, read("namespace")?);
        let path = format!(
            "/apis/apps/v1/namespaces/{namespace}/statefulsets/{}/scale",
            pod.statefulset
        );
        let (status, body) = self.get(&path, &token).await?;
        match status {
            200 => {
                let scale: Scale = serde_json::from_slice(&body)
                    .map_err(|e| format!("GET {path}: not a Scale: {e}"))?;
                Ok(Some(scale.spec.replicas))
            }
            404 => Ok(None),
            _ => Err(format!(
                "GET {path}: HTTP {status}: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            )),
        }
    }

    /// One HTTPS GET, verified against the cluster's CA alone.
    async fn get(&self, path: &str, token: &str) -> Result<(u16, Vec<u8>), String> {
        let tls = self.connector()?;
        let ssl = tls
            .configure()
            .and_then(|c| c.into_ssl(&self.host))
            .map_err(|e| format!("TLS set-up for {}: {e}", self.host))?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot reach {}:{}: {e}", self.host, self.port))?;
        let mut stream =
            tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| format!("TLS: {e}"))?;
        Pin::new(&mut stream)
            .connect()
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", self.host))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let mut authorization = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the service-account token is not a valid header value".to_owned())?;
        authorization.set_sensitive(true);
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::AUTHORIZATION, authorization)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| format!("GET {path}: reading the answer: {e}"))?
                .to_bytes()
                .to_vec();
            Ok::<_, String>((status, body))
        };
        tokio::pin!(exchange);
        // The connection is driven here, not spawned: nothing outlives the call.
        tokio::select! {
            biased;
            answer = &mut exchange => answer,
            ended = connection => match ended {
                Ok(()) => exchange.await,
                Err(e) => Err(format!("GET {path}: {e}")),
            },
        }
    }

    fn connector(&self) -> Result<SslConnector, String> {
        let ca: &Path = &self.dir.join("ca.crt");
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(|e| format!("TLS: {e}"))?;
        // The cluster's CA only: a certificate the system trusts is not the API server's.
        let store = {
            let pem =
                std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
            let certs = openssl::x509::X509::stack_from_pem(&pem)
                .map_err(|e| format!("{}: not PEM certificates: {e}", ca.display()))?;
            let mut store =
                openssl::x509::store::X509StoreBuilder::new().map_err(|e| format!("TLS: {e}"))?;
            for cert in certs {
                store.add_cert(cert).map_err(|e| format!("TLS: {e}"))?;
            }
            store.build()
        };
        // Replaces the system's store, which `SslConnector::builder` loaded.
        builder.set_cert_store(store);
        Ok(builder.build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_name_gives_its_statefulset_and_ordinal() {
        assert_eq!(
            StatefulPod::parse("activity-vault-12"),
            Some(StatefulPod {
                statefulset: "activity-vault".into(),
                ordinal: 12
            })
        );
        for bad in ["activity-vault", "vault-", "-3", "vault-3a", "vault--1", ""] {
            assert_eq!(StatefulPod::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_pod_is_scaled_away_when_its_ordinal_is_at_or_past_the_replicas_or_the_set_is_gone() {
        let pod = StatefulPod::parse("activity-vault-2").unwrap();
        assert!(pod.is_scaled_away(Some(2)), "3 → 2 replicas removes pod 2");
        assert!(pod.is_scaled_away(Some(0)));
        assert!(pod.is_scaled_away(None), "the StatefulSet was deleted");
        assert!(
            !pod.is_scaled_away(Some(3)),
            "a restart, update or eviction"
        );
        assert!(!pod.is_scaled_away(Some(5)));
    }
}
