//! The Kubernetes API read behind `kafka.leave_group_on_shutdown = "scale-down"`: the
//! StatefulSet's scale, read over TLS verified against the cluster's CA alone, with the pod's
//! token. Its use when a member stops is in tests/it/cluster.rs.

use std::time::Duration;

use vault::kubernetes::{InCluster, StatefulPod};

use crate::common::k8s::{FakeKubernetes, NAMESPACE, NEVER_ANSWERS};
use crate::common::{self_signed, unique};

fn pod() -> StatefulPod {
    StatefulPod::parse("activity-vault-1").expect("a StatefulSet pod's name")
}

fn cluster(api: &FakeKubernetes) -> InCluster {
    InCluster::new("127.0.0.1".into(), api.port, api.dir.clone()).expect("the pod's files")
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn the_statefulset_scale_is_read_with_the_pod_token_and_a_deleted_set_reads_as_none() {
    let api = FakeKubernetes::start(3).await;
    let cluster = cluster(&api);
    assert_eq!(cluster.replicas(&pod(), WAIT).await, Ok(Some(3)));
    api.set_replicas(1);
    assert_eq!(cluster.replicas(&pod(), WAIT).await, Ok(Some(1)));
    api.set_replicas(-1);
    assert_eq!(cluster.replicas(&pod(), WAIT).await, Ok(None), "not found");
    let path = format!("/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/activity-vault/scale");
    assert_eq!(api.requests(), vec![(path, true); 3]);
}

#[tokio::test]
async fn an_api_server_the_cluster_ca_did_not_sign_or_a_refused_token_is_an_error() {
    let api = FakeKubernetes::start(3).await;
    // Another CA in the pod's files: the server's certificate is not trusted.
    let dir = std::env::temp_dir().join(unique("vault-k8s-stranger"));
    std::fs::create_dir_all(&dir).unwrap();
    let (stranger, _) = self_signed(&dir, "stranger");
    std::fs::copy(&stranger, dir.join("ca.crt")).unwrap();
    for file in ["token", "namespace"] {
        std::fs::copy(api.dir.join(file), dir.join(file)).unwrap();
    }
    let untrusted = InCluster::new("127.0.0.1".into(), api.port, dir.clone()).unwrap();
    let err = untrusted.replicas(&pod(), WAIT).await.unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(api.requests().is_empty(), "nothing was sent to it");
    // The right CA, a token the server refuses.
    std::fs::copy(api.dir.join("ca.crt"), dir.join("ca.crt")).unwrap();
    std::fs::write(dir.join("token"), "someone-else").unwrap();
    let refused = InCluster::new("127.0.0.1".into(), api.port, dir.clone()).unwrap();
    let err = refused.replicas(&pod(), WAIT).await.unwrap_err();
    assert!(err.contains("HTTP 401"), "{err}");
    // A pod without its token mounted is told so.
    std::fs::remove_file(dir.join("token")).unwrap();
    let err = InCluster::new("127.0.0.1".into(), api.port, dir.clone()).unwrap_err();
    assert!(err.contains("token is missing"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_server_whose_certificate_names_another_address_is_refused() {
    let api = FakeKubernetes::start_certified_for(3, "127.0.0.2").await;
    let err = cluster(&api).replicas(&pod(), WAIT).await.unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(api.requests().is_empty(), "nothing was sent to it");
}

#[tokio::test]
async fn an_api_server_that_never_answers_is_given_up_on_in_time() {
    let api = FakeKubernetes::start(3).await;
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let cluster = InCluster::new("127.0.0.1".into(), port, api.dir.clone()).unwrap();
    let started = std::time::Instant::now();
    let err = cluster
        .replicas(&pod(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains("did not answer within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded");
    held.abort();
}

#[tokio::test]
async fn an_api_server_that_takes_the_request_and_never_answers_is_given_up_on_in_time() {
    let api = FakeKubernetes::start(NEVER_ANSWERS).await;
    let started = std::time::Instant::now();
    let err = cluster(&api)
        .replicas(&pod(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains("did not answer within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded");
    assert_eq!(api.requests().len(), 1, "the request was sent and read");
}

/// `vault run` with `leave_group_on_shutdown = "scale-down"` outside a pod, or with a member
/// name that is no pod's, stops at once with what to fix, before connecting to anything.
#[test]
fn leaving_on_a_scale_down_outside_a_pod_or_without_a_pod_name_is_refused_at_start() {
    let run = |instance_id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VAULT_KAFKA_LEAVE_GROUP_ON_SHUTDOWN", "scale-down")
            .env("VAULT_KAFKA_INSTANCE_ID", instance_id)
            .env("VAULT_METRICS_ADDR", "127.0.0.1:0")
            .output()
            .expect("run vault")
    };
    let out = run("activity-vault-0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("KUBERNETES_SERVICE_HOST is not set")
            && err.contains("\"never\" or \"always\""),
        "{err}"
    );
    let out = run("vault-a");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("kafka.instance_id") && err.contains("<statefulset>-<ordinal>"),
        "{err}"
    );
}
