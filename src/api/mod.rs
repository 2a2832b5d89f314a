//! `vault api`: the read side as an HTTP service, a process of its own (scaled and secured apart
//! from `vault run`), served on the hardened server of [`crate::http`].
//!
//! - [`routes`]: the endpoints (a user's events, export, erasure, the OpenAPI document, health
//!   and metrics) and the timeline page;
//! - [`auth`]: bearer tokens in two scopes; [`params`]: query parameters, checked;
//!   [`token`]: signed page tokens; [`html`]: the page, escaped; [`error`]: every error with
//!   its status; [`openapi`]: the document, generated from the handlers.
//!
//! Reads go through [`crate::store::read`] (the one owner of how rows are read), erasures
//! through [`crate::store::erasure::forget`] (the one erasure function).

pub mod auth;
pub mod error;
pub mod html;
pub mod openapi;
pub mod params;
pub mod routes;
pub mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Response, StatusCode};
use axum::middleware::Next;
use axum::Router;
use tokio::net::TcpListener;

use crate::config::{ApiConfig, Config, ConfigError};
use crate::store::read::EventReader;
use crate::store::scylla::ScyllaStore;
use crate::store::StoreError;
use crate::telemetry::metrics::ApiMetrics;

/// What `vault api` runs with, checked.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub addr: SocketAddr,
    pub tokens: auth::Tokens,
    pub page_key: token::PageKey,
    pub default_limit: usize,
    pub max_limit: usize,
    /// What one client may cost the server.
    pub limits: crate::http::Limits,
}

impl ApiSettings {
    /// From validated configuration. Refuses an API without tokens on an address other hosts
    /// can reach.
    pub fn new(c: &Config) -> Result<ApiSettings, ConfigError> {
        let a: &ApiConfig = &c.api;
        let addr: SocketAddr = a.addr.parse().map_err(|_| ConfigError::Invalid {
            key: "api.addr",
            value: a.addr.clone(),
            allowed: "an ip:port such as 127.0.0.1:9899".into(),
        })?;
        let tokens = auth::Tokens::new(&a.read_tokens, &a.admin_tokens);
        if tokens.is_open() && !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "api.addr",
                value: a.addr.clone(),
                allowed: "with no token configured, vault api serves only a loopback address \
                          (127.0.0.1): set api.read_tokens and api.admin_tokens \
                          (VAULT_API_READ_TOKENS, VAULT_API_ADMIN_TOKENS), or bind 127.0.0.1"
                    .into(),
            });
        }
        Ok(ApiSettings {
            addr,
            tokens,
            page_key: token::PageKey::from_config(a),
            default_limit: a.default_limit,
            max_limit: a.max_limit,
            limits: limits(a),
        })
    }
}

/// Everything the handlers share.
pub struct Api {
    pub settings: ApiSettings,
    pub store: Arc<ScyllaStore>,
    pub reader: Arc<EventReader>,
    pub metrics: Arc<ApiMetrics>,
}

impl Api {
    /// Prepares the read statements on the store's session.
    pub async fn new(settings: ApiSettings, store: ScyllaStore) -> Result<Api, StoreError> {
        let reader = EventReader::new(store.session().clone(), store.keyspace()).await?;
        Ok(Api {
            settings,
            store: Arc::new(store),
            reader: Arc::new(reader),
            metrics: Arc::new(ApiMetrics::new()),
        })
    }
}

/// The router: every route, with request metrics by route template.
pub fn router(api: Arc<Api>) -> Router {
    routes::routes()
        .fallback(routes::no_route)
        .layer(axum::middleware::from_fn_with_state(api.clone(), track))
        .with_state(api)
}

/// The server's limits: vault's defaults with the connection caps of `a`, and a connection
/// may live for [`MAX_CONNECTION_AGE`], so that an export of a long history is not cut after a
/// minute.
pub fn limits(a: &ApiConfig) -> crate::http::Limits {
    crate::http::Limits {
        max_connection_age: MAX_CONNECTION_AGE,
        max_connections: a.max_connections,
        max_connections_per_peer: a.max_connections_per_address,
        ..crate::http::Limits::default()
    }
}

/// The longest a connection (an export's included) may last.
pub const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Serves `api` on `listener` until `shutdown` resolves, within [`limits`].
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if api.settings.tokens.is_open() {
        tracing::warn!("No API token is configured: every request is allowed (loopback only).");
    }
    tracing::info!(addr = %listener.local_addr()?, "Serving the read API.");
    let limits = api.settings.limits;
    crate::http::serve(listener, router(api), limits, shutdown).await
}

/// Counts every response by route template (never the path itself: it holds the user id)
/// and status, and times it.
async fn track(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response<Body> {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let start = Instant::now();
    let mut response = next.run(req).await;
    // Every answer echoes what the client sent (a user id, a parameter): never sniffed as
    // something else.
    response
        .headers_mut()
        .entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    api.metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    api.metrics
        .request_duration
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    response
}

/// A JSON response of already serialized bytes.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An instant as RFC 3339 in UTC with milliseconds (`2025-11-24T10:00:00.123Z`).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}
