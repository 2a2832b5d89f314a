//! The HTTP/1 server every vault endpoint runs on (`/metrics`, `/healthz`, `/readyz`, and the
//! read API of `vault api`). It owns one rule: **no client can hold the server or its
//! shutdown**.
//!
//! - a connection must deliver a request's headers within [`Limits::header_read_timeout`], from
//!   the moment it opens or goes idle between requests; a partial request or an idle keep-alive
//!   connection is closed then;
//! - at most [`Limits::max_connections`] connections are open at once, and at most
//!   [`Limits::max_connections_per_peer`] from one address; one more is closed as soon as it is
//!   accepted, so idle clients cannot exhaust file descriptors, one client (a batch job's
//!   exports, a slow-headers attacker) cannot take every connection from the others, the
//!   orchestrator's probes included, and a probe that is refused fails fast instead of timing
//!   out;
//! - request headers are bounded ([`Limits::max_header_bytes`], [`Limits::max_headers`]: 431
//!   beyond) and no endpoint takes a body (413), so a connection buffers a bounded amount;
//! - a connection lives at most [`Limits::max_connection_age`], then finishes its response and
//!   closes;
//! - on shutdown the server stops accepting at once, lets responses in flight finish for
//!   [`Limits::shutdown_grace`] and then drops every connection: it never waits for a client.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What one client may cost the server. [`Limits::default`] is what vault serves with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to deliver a request's headers, counted from the connection's start or the end of
    /// its previous response.
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_peer: usize,
    /// Bytes of a request's start line and headers (at least 8192, hyper's smallest buffer).
    pub max_header_bytes: usize,
    /// Header fields of a request.
    pub max_headers: usize,
    /// Longest life of one connection.
    pub max_connection_age: Duration,
    /// How long shutdown lets responses in flight finish before dropping the connections.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 64,
            max_connections_per_peer: 32,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_connection_age: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

/// hyper's smallest read buffer; a smaller header bound is raised to it.
const MIN_BUFFER: usize = 8192;

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then returns within
/// [`Limits::shutdown_grace`] (plus a few milliseconds), whatever the clients do.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    let header_bytes = limits.max_header_bytes.max(MIN_BUFFER);
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(header_bytes)
        .max_header_size(header_bytes)
        .max_headers(limits.max_headers);
    let http = Arc::new(http);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Peers::new(limits.max_connections_per_peer);
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "Cannot accept an HTTP connection; retrying.");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        // At a cap: close it now rather than let it wait in the backlog or hold a descriptor.
        let Some(slot) = peers.take(peer.ip()) else {
            drop(stream);
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = NoBodies(TowerToHyperService::new(router.clone()));
        let http = http.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _held = (permit, slot);
            let mut conn = pin!(http.serve_connection(TokioIo::new(stream), service));
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(limits.max_connection_age) => {}
            }
            // Finish the response in flight, if any, then close; a client that does not let
            // it finish is dropped after the grace.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.shutdown_grace, conn).await;
        });
    }
    drop(listener);
    stop.cancel();
    let drained = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(limits.shutdown_grace + Duration::from_millis(100), drained).await;
    connections.abort_all();
    Ok(())
}

/// Connections open by peer address.
struct Peers {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One connection of a peer; its count goes down when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn new(max: usize) -> Arc<Peers> {
        Arc::new(Peers {
            open: Mutex::new(HashMap::new()),
            max: max.max(1),
        })
    }

    /// A slot for one more connection of `ip`, unless it has its most open.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The router behind a guard: a request that declares a body is answered 413 and its connection
/// closed, without reading the body (no endpoint takes one).
#[derive(Clone)]
struct NoBodies(TowerToHyperService<Router>);

impl hyper::service::Service<Request<Incoming>> for NoBodies {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let declares_body = req.headers().contains_key(header::TRANSFER_ENCODING)
            || req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if declares_body {
            let mut response = Response::new(Body::from("request bodies are not accepted\n"));
            *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.0.call(req))
    }
}
