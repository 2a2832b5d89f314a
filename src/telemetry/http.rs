//! The operations HTTP server: `/metrics` (Prometheus text), `/healthz` (alive: the Kafka poll
//! loop and the coordinator loop are beating; 503 with the reason otherwise), `/readyz` (in the
//! group and able to write; 503 with the reason otherwise).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::telemetry::{Health, Metrics};

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, health })
}

/// Serves until `shutdown` resolves, within [`crate::http::Limits::default`]: no client can
/// hold the server or delay the shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http::serve(
        listener,
        router(metrics, health),
        crate::http::Limits::default(),
        shutdown,
    )
    .await
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics
        .ready
        .set(i64::from(s.health.not_ready_reason().is_none()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn health_handler(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.not_alive_reason() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn ready_handler(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
