//! The endpoints of `vault api`. Each checks the caller first, then its input, then reads through
//! the store: a request that fails is answered by [`ApiError`] (JSON, or a page for `/ui`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use axum::routing::{delete, get};
use axum::Router;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::api::auth::{Presented, Scope};
use crate::api::error::{ApiError, ErrorJson};
use crate::api::params::{self, EventsQuery};
use crate::api::{html, json_response, rfc3339, Api};
use crate::store::erasure::{self, Erasure};
use crate::store::read::{PageRequest, StoredEvent};
use crate::telemetry::metrics::{ApiMetrics, EXPORT_COMPLETE, EXPORT_DROPPED, EXPORT_STORE};

/// Every route (the router adds the fallback, metrics and state).
pub fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/v1/users/{user_id}/events", get(events))
        .route("/v1/users/{user_id}/export", get(export))
        .route("/v1/users/{user_id}", delete(erase))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/ui/users/{user_id}", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// One stored event.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventJson {
    /// The event's UUID.
    pub event_id: String,
    pub event_type: String,
    /// RFC 3339, UTC, milliseconds.
    pub occurred_at: String,
    /// The event's `attributes` object as it was sent, or null.
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Box<RawValue>>,
    /// The Kafka record the event was stored from.
    pub source: SourceJson,
}

/// Where an event came from.
#[derive(Debug, Serialize, ToSchema)]
pub struct SourceJson {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A page of a user's events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventsPage {
    pub user_id: String,
    pub events: Vec<EventJson>,
    /// Give it as `page_token` (with the same since, until and type) for the next page; null
    /// when there are no more events.
    pub next_page_token: Option<String>,
}

/// What an erasure deleted.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasureJson {
    pub user_id: String,
    /// True when nothing was deleted (dry_run=true): `days` are what would be.
    pub dry_run: bool,
    /// `(user_id, day)` partitions deleted.
    pub partitions_deleted: usize,
    /// Their days (UTC), newest first.
    pub days: Vec<String>,
    /// Rows of messages up to this time are gone for good (RFC 3339).
    pub erased_through: String,
    /// The tombstones' write timestamp (microseconds).
    pub tombstone_timestamp: i64,
    /// Who asked, as recorded in the erasures table.
    pub requested_by: String,
    /// The same as `vault forget` prints.
    pub summary: String,
}

impl EventJson {
    pub fn from_stored(e: StoredEvent) -> EventJson {
        let attributes = e.attributes.map(|mut a| {
            // Kept as the producer wrote it, pretty-printed perhaps: a line break in JSON text
            // is whitespace between tokens (never inside a string, where it must be escaped),
            // and goes, so an event is one line of an NDJSON export whatever its attributes.
            if a.contains(['\n', '\r']) {
                a = a.replace(['\n', '\r'], " ");
            }
            RawValue::from_string(a.clone()).unwrap_or_else(|_| {
                // Stored text that is not JSON (it cannot be, from vault): shown as a string.
                serde_json::value::to_raw_value(&a).expect("a string serializes")
            })
        });
        EventJson {
            event_id: e.event_id.to_string(),
            event_type: e.event_type,
            occurred_at: rfc3339(e.occurred_at_ms),
            attributes,
            source: SourceJson {
                topic: e.source_topic,
                partition: e.source_partition,
                offset: e.source_offset,
            },
        }
    }
}

/// The `{user_id}` of a route's path, or why it cannot be read (not UTF-8 once
/// percent-decoded): the handler checks the caller first, then answers that as any other bad
/// input (a JSON 400, or the page's HTML one).
pub struct UserId(pub Result<String, ApiError>);

impl<S: Send + Sync> FromRequestParts<S> for UserId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(UserId(
            Path::<String>::from_request_parts(parts, state)
                .await
                .map(|Path(user_id)| user_id)
                .map_err(|e| {
                    ApiError::bad(
                        "user_id",
                        format!("the user id in the path cannot be read: {e}"),
                    )
                }),
        ))
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Reads one page for `q`; 404 when the user has no event at all.
async fn read_page(
    api: &Api,
    user_id: &str,
    q: &EventsQuery,
) -> Result<(Vec<StoredEvent>, Option<String>), ApiError> {
    let page = api
        .reader
        .page(&PageRequest {
            user_id,
            from_ms: q.from_ms,
            to_ms: q.to_ms,
            event_types: &q.types,
            limit: q.limit,
            after: q.after,
            max_examined: crate::store::read::EXAMINED_PER_PAGE,
            max_bytes: crate::store::read::PAGE_BYTES,
        })
        .await?;
    if page.events.is_empty() && q.after.is_none() && !api.reader.user_exists(user_id).await? {
        return Err(ApiError::UnknownUser(user_id.to_owned()));
    }
    let next = page
        .next
        .map(|p| q.next_token(&api.settings.page_key, user_id, p));
    Ok((page.events, next))
}

fn parse_query(
    api: &Api,
    user_id: &str,
    raw: Option<&str>,
    from_form: bool,
) -> Result<EventsQuery, ApiError> {
    params::check_user_id(user_id)?;
    EventsQuery::parse(
        &params::pairs(raw)?,
        user_id,
        &api.settings.page_key,
        now_ms(),
        api.settings.default_limit,
        api.settings.max_limit,
        from_form,
    )
}

/// A user's events, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/events",
    tag = "events",
    params(
        ("user_id" = String, Path, description = "The user id, 1 to 256 bytes, percent-encoded"),
        ("since" = Option<String>, Query, description = "Earliest occurred_at, included: RFC 3339 or a duration before now (7d, 36h)"),
        ("until" = Option<String>, Query, description = "Latest occurred_at, included: RFC 3339 or a duration before now"),
        ("type" = Option<Vec<String>>, Query, description = "Only this event type; repeat for several"),
        ("limit" = Option<usize>, Query, description = "Events per page, 1 to api.max_limit (default api.default_limit)"),
        ("page_token" = Option<String>, Query, description = "next_page_token of the previous page, with the same since, until and type"),
    ),
    responses(
        (status = 200, description = "One page of events", body = EventsPage),
        (status = 400, description = "A parameter is not acceptable; the message says what to fix", body = ErrorJson),
        (status = 401, description = "No valid token", body = ErrorJson),
        (status = 404, description = "No event of this user is stored", body = ErrorJson),
        (status = 503, description = "The store cannot answer; retry after Retry-After seconds", body = ErrorJson),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(api): State<Arc<Api>>,
    UserId(user_id): UserId,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response<Body> {
    let answer = async {
        api.settings
            .tokens
            .check(&headers, Scope::Read, Presented::Bearer)?;
        let user_id = user_id?;
        let q = parse_query(&api, &user_id, raw.as_deref(), false)?;
        let (events, next) = read_page(&api, &user_id, &q).await?;
        let page = EventsPage {
            user_id: user_id.clone(),
            events: events.into_iter().map(EventJson::from_stored).collect(),
            next_page_token: next,
        };
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            serde_json::to_vec(&page).expect("a page serializes"),
        ))
    };
    answer.await.unwrap_or_else(ApiError::into_json)
}

/// Every stored event of a user as NDJSON (one event object a line, newest first), streamed:
/// the answer to a data-access request.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/export",
    tag = "events",
    params(("user_id" = String, Path, description = "The user id")),
    responses(
        (status = 200, description = "Every event, one JSON object (as in events) per line", content_type = "application/x-ndjson", body = EventJson),
        (status = 401, description = "No valid token", body = ErrorJson),
        (status = 404, description = "No event of this user is stored", body = ErrorJson),
        (status = 503, description = "The store cannot answer; retry later", body = ErrorJson),
    ),
    security(("bearer" = []))
)]
pub async fn export(
    State(api): State<Arc<Api>>,
    UserId(user_id): UserId,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let answer = async {
        api.settings
            .tokens
            .check(&headers, Scope::Read, Presented::Bearer)?;
        let user_id = user_id?;
        params::check_user_id(&user_id)?;
        if let Some((name, _)) = params::pairs(raw.as_deref())?.first() {
            return Err(ApiError::bad(
                "query",
                format!("unknown parameter {name:?}: export takes none (it returns every event)"),
            ));
        }
        let mut events = api.reader.export(&user_id);
        // The first event decides the status: 404, 503, or a 200 that then streams.
        let first = match events.next().await {
            Some(Err(e)) => return Err(ApiError::Store(e)),
            Some(Ok(e)) => Some(e),
            None if !api.reader.user_exists(&user_id).await? => {
                return Err(ApiError::UnknownUser(user_id.clone()))
            }
            None => None,
        };
        let lines = futures::stream::iter(first.map(Ok))
            .chain(events)
            .map_ok(|e| {
                let mut line =
                    serde_json::to_vec(&EventJson::from_stored(e)).expect("an event serializes");
                line.push(b'\n');
                Bytes::from(line)
            })
            .inspect_err(|e| {
                tracing::warn!(error = %e, "An export failed in the store; the response is cut short.")
            })
            .map_err(std::io::Error::other);
        let lines = TimedExport {
            lines: Box::pin(lines),
            started,
            metrics: api.metrics.clone(),
            ended: false,
        };
        let mut r = Response::new(Body::from_stream(lines));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(r)
    };
    answer.await.unwrap_or_else(ApiError::into_json)
}

/// An export's body, timed to its end: a 200 is counted when its headers leave, but a long
/// export's time, and a cut one (a store read failing after the headers, or the body dropped
/// unfinished: the client leaving first, or the connection closed at its age limit or on
/// shutdown), show only when the body ends (`vault_api_export_duration_seconds{outcome}`).
struct TimedExport {
    lines: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
    started: std::time::Instant,
    metrics: Arc<ApiMetrics>,
    ended: bool,
}

impl TimedExport {
    fn end(&mut self, outcome: &str) {
        self.ended = true;
        self.metrics
            .export_duration
            .with_label_values(&[outcome])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl futures::Stream for TimedExport {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let next = self.lines.poll_next_unpin(cx);
        match &next {
            std::task::Poll::Ready(None) => self.end(EXPORT_COMPLETE),
            std::task::Poll::Ready(Some(Err(_))) => self.end(EXPORT_STORE),
            _ => {}
        }
        next
    }
}

impl Drop for TimedExport {
    fn drop(&mut self) {
        if !self.ended {
            self.end(EXPORT_DROPPED);
        }
    }
}

/// Erases a user (the right to be forgotten) through the same function as `vault forget`:
/// every stored row of the user whose message is not later than `through` is deleted and stays
/// deleted under any replay. The erasure is recorded with who asked.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}",
    tag = "erasure",
    params(
        ("user_id" = String, Path, description = "The user id"),
        ("through" = Option<String>, Query, description = "Erase rows of messages up to this time (RFC 3339 or a duration before now); default now; not in the future"),
        ("requested_by" = Option<String>, Query, description = "Who asks, for the record (up to 128 characters), after the token's name"),
        ("dry_run" = Option<bool>, Query, description = "true: report the partitions, delete nothing"),
    ),
    responses(
        (status = 200, description = "What was deleted", body = ErasureJson),
        (status = 400, description = "A parameter is not acceptable", body = ErrorJson),
        (status = 401, description = "No valid token", body = ErrorJson),
        (status = 403, description = "The token is not of the admin scope", body = ErrorJson),
        (status = 503, description = "The store cannot answer; retry (erasures are idempotent)", body = ErrorJson),
    ),
    security(("bearer" = []))
)]
pub async fn erase(
    State(api): State<Arc<Api>>,
    UserId(user_id): UserId,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response<Body> {
    let answer = async {
        let caller = api
            .settings
            .tokens
            .check(&headers, Scope::Admin, Presented::Bearer)?;
        let user_id = user_id?;
        params::check_user_id(&user_id)?;
        let now = now_ms();
        let (mut through, mut who, mut dry_run) = (now, None, false);
        for (name, value) in params::pairs(raw.as_deref())? {
            match name.as_str() {
                "through" => {
                    through = params::parse_time("through", &value, now)?;
                    if through > now {
                        return Err(ApiError::bad(
                            "through",
                            "through is in the future: an erasure covers what is stored up to \
                             now at the latest (later activity is new activity)",
                        ));
                    }
                }
                "requested_by" => {
                    if value.is_empty()
                        || value.chars().count() > 128
                        || value.chars().any(char::is_control)
                    {
                        return Err(ApiError::bad(
                            "requested_by",
                            "1 to 128 printable characters naming who asks, such as a ticket",
                        ));
                    }
                    who = Some(value);
                }
                "dry_run" => {
                    dry_run = match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(ApiError::bad("dry_run", "true or false")),
                    }
                }
                other => {
                    return Err(ApiError::bad(
                        "query",
                        format!(
                            "unknown parameter {other:?}: the parameters are through, \
                             requested_by and dry_run"
                        ),
                    ))
                }
            }
        }
        let requested_by = match who {
            Some(w) => format!("api:{}:{w}", caller.name),
            None => format!("api:{}", caller.name),
        };
        let request = Erasure {
            user_id: user_id.clone(),
            through_ms: through,
            requested_by: requested_by.clone(),
            requested_at_ms: now,
        };
        let report = erasure::forget(&api.store, &request, dry_run).await?;
        let body = ErasureJson {
            user_id: user_id.clone(),
            dry_run,
            partitions_deleted: if dry_run { 0 } else { report.days.len() },
            days: report
                .days
                .iter()
                .map(|d| rfc3339(d * crate::store::read::DAY_MS)[..10].to_owned())
                .collect(),
            erased_through: rfc3339(through),
            tombstone_timestamp: report.tombstone_timestamp,
            requested_by,
            summary: erasure::summary(&report),
        };
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            serde_json::to_vec(&body).expect("a report serializes"),
        ))
    };
    answer.await.unwrap_or_else(ApiError::into_json)
}

/// The timeline page for support staff: a user's events with filters and paging (HTML).
#[utoipa::path(
    get,
    path = "/ui/users/{user_id}",
    tag = "page",
    params(
        ("user_id" = String, Path, description = "The user id"),
        ("since" = Option<String>, Query, description = "As for events; empty means none"),
        ("until" = Option<String>, Query, description = "As for events"),
        ("type" = Option<Vec<String>>, Query, description = "As for events"),
        ("limit" = Option<usize>, Query, description = "As for events"),
        ("page_token" = Option<String>, Query, description = "As for events"),
    ),
    responses(
        (status = 200, description = "The page", content_type = "text/html"),
        (status = 401, description = "No valid token: the browser asks for one (basic auth, the token as the password)"),
    ),
    security(("bearer" = []), ("basic" = []))
)]
pub async fn page(
    State(api): State<Arc<Api>>,
    UserId(user_id): UserId,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response<Body> {
    let answer = async {
        api.settings
            .tokens
            .check(&headers, Scope::Read, Presented::BearerOrBasic)?;
        let user_id = user_id?;
        let q = parse_query(&api, &user_id, raw.as_deref(), true)?;
        let (events, next) = read_page(&api, &user_id, &q).await?;
        Ok::<_, ApiError>(html::html_response(
            StatusCode::OK,
            html::timeline(&user_id, &q, &events, next.as_deref()),
        ))
    };
    answer.await.unwrap_or_else(ApiError::into_html)
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of vault api", content_type = "application/json")))]
pub async fn openapi_json() -> Response<Body> {
    json_response(StatusCode::OK, crate::api::openapi::document().into_bytes())
}

/// Alive and serving.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "ok", content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: ScyllaDB answers a one-row read of the index of days (the schema is there, and that
/// row's replicas answer).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready", content_type = "text/plain"),
              (status = 503, description = "not ready, and why", content_type = "text/plain")))]
pub async fn readyz(State(api): State<Arc<Api>>) -> (StatusCode, String) {
    match api.reader.user_exists("vault-readiness-probe").await {
        Ok(_) => (StatusCode::OK, "ready\n".into()),
        Err(e) => {
            tracing::warn!(error = %e, "Not ready: the store does not answer.");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: ScyllaDB does not answer ({})\n", e.kind()),
            )
        }
    }
}

/// Prometheus metrics of this process.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(api): State<Arc<Api>>) -> Response<Body> {
    let mut r = Response::new(Body::from(api.metrics.render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Any other path.
pub async fn no_route(uri: axum::http::Uri) -> Response<Body> {
    let path = uri.path();
    let e = ApiError::NoRoute(path.to_owned());
    if path.starts_with("/ui/") || path == "/ui" {
        e.into_html()
    } else {
        e.into_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(metrics: &Arc<ApiMetrics>, lines: Vec<Result<Bytes, std::io::Error>>) -> TimedExport {
        TimedExport {
            lines: futures::stream::iter(lines).boxed(),
            started: std::time::Instant::now(),
            metrics: metrics.clone(),
            ended: false,
        }
    }

    fn ended(metrics: &ApiMetrics, outcome: &str) -> u64 {
        metrics
            .export_duration
            .with_label_values(&[outcome])
            .get_sample_count()
    }

    #[tokio::test]
    async fn an_export_is_timed_to_its_end_and_a_cut_one_says_why() {
        let metrics = Arc::new(ApiMetrics::new());
        let line = || Ok(Bytes::from_static(b"{}\n"));

        let whole: Vec<_> = timed(&metrics, vec![line(), line()]).collect().await;
        assert_eq!(whole.len(), 2);
        assert_eq!(ended(&metrics, "complete"), 1);

        let failing = vec![line(), Err(std::io::Error::other("store")), line()];
        let cut: Vec<_> = timed(&metrics, failing).collect().await;
        assert_eq!(cut.len(), 2, "nothing after the failure");
        assert_eq!(ended(&metrics, "store"), 1);

        let mut left = timed(&metrics, vec![line(), line()]);
        assert!(left.next().await.is_some());
        drop(left);
        assert_eq!(ended(&metrics, "dropped"), 1);
        assert_eq!(
            (ended(&metrics, "complete"), ended(&metrics, "store")),
            (1, 1),
            "each export counted once"
        );
        assert!(metrics
            .render()
            .contains("vault_api_export_duration_seconds_count{outcome=\"dropped\"} 1"));
    }
}
