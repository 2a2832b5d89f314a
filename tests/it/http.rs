//! The HTTP server under clients that try to hold it (issue 19): a partial request, idle
//! connections, a connection flood, oversized headers, a request body, and a shutdown while
//! clients hold connections. Every server binds 127.0.0.1 port 0; the limits are shortened so
//! that each test takes about a second, and each measures against a deadline, never a sleep.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use vault::http::Limits;
use vault::telemetry::{Health, Metrics};

/// Limits short enough for tests: a partial request is dropped after 300 ms.
fn limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 4,
        max_connections_per_peer: 4,
        max_header_bytes: 8192,
        max_headers: 16,
        max_connection_age: Duration::from_secs(30),
        shutdown_grace: Duration::from_millis(200),
    }
}

/// vault's real router (/metrics, /healthz, /readyz) served within `limits`.
async fn start(
    limits: Limits,
) -> (
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = vault::telemetry::http::router(
        Arc::new(Metrics::new()),
        Arc::new(Health::new(Duration::from_secs(60))),
    );
    let stop = CancellationToken::new();
    let server = tokio::spawn(vault::http::serve(
        listener,
        router,
        limits,
        stop.clone().cancelled_owned(),
    ));
    (addr, stop, server)
}

/// Reads until the server closes the connection or `within` passes; the bytes read, and how
/// long it took, or `None` when the connection was still open at the deadline.
async fn read_until_closed(
    stream: &mut TcpStream,
    within: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((got, start.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let (body, _) = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .ok_or("no answer within 5 s")?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A client that is served once (so it surely holds a connection slot), then opens a second
/// request on the same connection and never finishes its headers.
async fn served_then_partial(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    s
}

/// A client that opens a request and never finishes its headers.
async fn partial_request(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    s
}

#[tokio::test]
async fn a_partial_request_or_an_idle_connection_is_closed_at_the_header_timeout() {
    let (addr, stop, server) = start(limits()).await;
    let opened = Instant::now();
    let mut partial = partial_request(addr).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    for (what, stream) in [("partial request", &mut partial), ("idle", &mut idle)] {
        read_until_closed(stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("the {what} connection is still open after 5 s"));
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "{what}: closed after {took:?}, before the timeout"
        );
    }
    // A keep-alive connection serves several requests, then idles out too.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    }
    assert!(read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .is_some());
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_connection_flood_is_capped_and_the_server_recovers() {
    // A header timeout long enough that the holders stay for the whole flood.
    let limits = Limits {
        header_read_timeout: Duration::from_secs(3),
        ..limits()
    };
    let (addr, stop, server) = start(limits).await;
    let mut holders = Vec::new();
    for _ in 0..limits.max_connections {
        holders.push(served_then_partial(addr).await);
    }
    let started = Instant::now();
    for _ in 0..50 {
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        let closed = read_until_closed(&mut extra, Duration::from_secs(2)).await;
        let (body, _) = closed.expect("a connection over the cap is closed at once");
        assert!(body.is_empty(), "over the cap, nothing is served: {body:?}");
    }
    assert!(
        started.elapsed() < limits.header_read_timeout,
        "the flood was refused before the holders timed out"
    );
    // One holder goes: the next client is served at once.
    drop(holders.pop());
    crate::common::wait_until("/healthz served again", Duration::from_secs(2), || async {
        get(addr, "/healthz")
            .await
            .and_then(|r| r.starts_with("HTTP/1.1 200").then_some(()).ok_or(r))
    })
    .await;
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// A connection from 127.0.0.2 (any 127/8 address is this machine's loopback).
async fn connect_from_another_peer(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// One client holding its most connections (a batch job's exports, slow headers) leaves the
/// others room, the orchestrator's probes among them: it alone is refused more.
#[tokio::test]
async fn one_peer_cannot_take_every_connection() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(3),
        max_connections: 4,
        max_connections_per_peer: 2,
        ..limits()
    };
    let (addr, stop, server) = start(limits).await;
    let _holders = [
        served_then_partial(addr).await,
        served_then_partial(addr).await,
    ];
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let (body, _) = read_until_closed(&mut third, Duration::from_secs(2))
        .await
        .expect("the peer's third connection is closed at once");
    assert!(body.is_empty(), "nothing is served to it: {body:?}");
    let mut other = connect_from_another_peer(addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (body, _) = read_until_closed(&mut other, Duration::from_secs(2))
        .await
        .expect("answered");
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn headers_and_bodies_are_bounded() {
    let (addr, stop, server) = start(limits()).await;
    // 400 KB of headers, as in the review: refused once past the bound, not buffered.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let line = format!("X-Pad: {}\r\n", "a".repeat(1000));
    let mut sent = 0;
    for _ in 0..400 {
        if s.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        sent += line.len();
    }
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "after {sent} bytes: {answer}"
    );
    // Too many header fields.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let many: String = (0..40).map(|i| format!("X-{i}: 1\r\n")).collect();
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many}\r\n").as_bytes())
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
        "{answer:?}"
    );
    // A body, announced and never sent: answered 413 without waiting for it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 413"),
        "{answer:?}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_never_waits_for_a_client() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(30),
        max_connections: 8,
        max_connections_per_peer: 8,
        ..limits()
    };
    let (addr, stop, server) = start(limits).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(partial_request(addr).await);
    }
    held.push(TcpStream::connect(addr).await.unwrap());
    // A client that asks for /metrics and reads nothing of the answer.
    let mut unread = TcpStream::connect(addr).await.unwrap();
    for _ in 0..20 {
        unread
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
    }
    held.push(unread);
    assert!(get(addr, "/healthz")
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("the server stops within its grace while clients hold connections")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() <= limits.shutdown_grace + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The held connections are closed, and nothing listens any more.
    for mut s in held {
        assert!(read_until_closed(&mut s, Duration::from_secs(2))
            .await
            .is_some());
    }
    assert!(TcpStream::connect(addr).await.is_err());
}

/// `vault healthcheck`, the container's health check (the image has no curl): exit 0 on 200,
/// non-zero on anything else or nothing listening.
#[tokio::test]
async fn the_binary_is_the_health_check() {
    let (addr, stop, server) = start(limits()).await;
    let check = |path: &str, addr: SocketAddr| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
            .args(["healthcheck", "--addr", &addr.to_string()])
            .args(path.split(' ').flat_map(|p| ["--path", p]))
            .env_clear()
            .output()
            .expect("run vault healthcheck")
    };
    let alive = tokio::task::spawn_blocking(move || check("/healthz", addr))
        .await
        .unwrap();
    assert!(alive.status.success(), "{alive:?}");
    // Not in a consumer group: not ready.
    let ready = tokio::task::spawn_blocking(move || check("/readyz", addr))
        .await
        .unwrap();
    assert_eq!(ready.status.code(), Some(1), "{ready:?}");
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("503"),
        "{ready:?}"
    );
    // Both paths (compose's check): alive but not ready fails, naming the path that failed.
    let both = tokio::task::spawn_blocking(move || check("/healthz /readyz", addr))
        .await
        .unwrap();
    assert_eq!(both.status.code(), Some(1), "{both:?}");
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("/readyz answered"),
        "{both:?}"
    );
    stop.cancel();
    server.await.unwrap().unwrap();
    let gone = tokio::task::spawn_blocking(move || check("/healthz", addr))
        .await
        .unwrap();
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
}
