//! A stand-in for the one Kubernetes API call vault makes (`kafka.leave_group_on_shutdown =
//! "scale-down"`): the scale of a StatefulSet, served over TLS on 127.0.0.1 with a CA of its
//! own, to a bearer token, with the service-account files a pod would have.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};

use super::{self_signed_for, unique};

pub const NAMESPACE: &str = "streaming";
pub const TOKEN: &str = "pod-token";
/// What [`FakeKubernetes::set_replicas`] takes for a server that reads a request and never
/// answers it.
pub const NEVER_ANSWERS: i64 = -2;

/// The API stand-in; it stops serving when dropped.
pub struct FakeKubernetes {
    pub port: u16,
    /// The service-account directory: `token`, `ca.crt`, `namespace`.
    pub dir: PathBuf,
    /// The replicas it answers for every StatefulSet; -1: the StatefulSet is not found.
    replicas: Arc<AtomicI64>,
    /// Each request: its path and whether it carried the pod's token.
    requests: Arc<Mutex<Vec<(String, bool)>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubernetes {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FakeKubernetes {
    pub async fn start(replicas: i64) -> FakeKubernetes {
        Self::start_certified_for(replicas, "127.0.0.1").await
    }

    /// A stand-in on 127.0.0.1 whose certificate names `ip` instead (a server that is not the
    /// one the client asked for).
    pub async fn start_certified_for(replicas: i64, ip: &str) -> FakeKubernetes {
        let dir = std::env::temp_dir().join(unique("vault-k8s"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self_signed_for(&dir, "apiserver", ip);
        std::fs::copy(&cert, dir.join("ca.crt")).unwrap();
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(dir.join("namespace"), NAMESPACE).unwrap();
        let mut tls = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        tls.set_certificate_chain_file(&cert).unwrap();
        tls.set_private_key_file(&key, SslFiletype::PEM).unwrap();
        let tls = tls.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let replicas = Arc::new(AtomicI64::new(replicas));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (answer, log) = (replicas.clone(), requests.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let ssl = openssl::ssl::Ssl::new(tls.context()).unwrap();
                let (answer, log) = (answer.clone(), log.clone());
                tokio::spawn(async move {
                    let mut stream = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                    if std::pin::Pin::new(&mut stream).accept().await.is_err() {
                        return; // A client that does not trust this server's CA.
                    }
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let path = req.uri().path().to_owned();
                        let authorized = req
                            .headers()
                            .get(hyper::header::AUTHORIZATION)
                            .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
                        log.lock().unwrap().push((path.clone(), authorized));
                        let replicas = answer.load(Ordering::SeqCst);
                        let scale = path.strip_prefix(&format!(
                            "/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/"
                        ));
                        let (status, body) = match scale.and_then(|p| p.strip_suffix("/scale")) {
                            _ if !authorized => (401, r#"{"kind":"Status","code":401}"#.to_owned()),
                            Some(name) if replicas >= 0 => (
                                200,
                                format!(
                                    r#"{{"kind":"Scale","apiVersion":"autoscaling/v1","metadata":{{"name":"{name}","namespace":"{NAMESPACE}"}},"spec":{{"replicas":{replicas}}},"status":{{"replicas":{replicas}}}}}"#
                                ),
                            ),
                            _ => (404, r#"{"kind":"Status","code":404}"#.to_owned()),
                        };
                        async move {
                            if replicas == NEVER_ANSWERS {
                                std::future::pending::<()>().await;
                            }
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeKubernetes {
            port,
            dir,
            replicas,
            requests,
            server,
        }
    }

    /// The replicas answered from now on; -1: the StatefulSet is not found;
    /// [`NEVER_ANSWERS`]: the request is read and never answered.
    pub fn set_replicas(&self, replicas: i64) {
        self.replicas.store(replicas, Ordering::SeqCst);
    }

    /// The requests served so far: path, and whether it carried the pod's token.
    pub fn requests(&self) -> Vec<(String, bool)> {
        self.requests.lock().unwrap().clone()
    }

    /// What a pod's environment would say about the API server and its credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), self.port.to_string()),
            (
                vault::kubernetes::SERVICE_ACCOUNT_DIR_ENV.into(),
                self.dir.display().to_string(),
            ),
        ]
    }
}
