//! The read side's one owner of how stored events are read back: a user's events, newest first,
//! one page at a time ([`EventReader::page`]) or all of them as a stream ([`EventReader::export`]).
//!
//! Rules kept here:
//! - **Never a scan.** The user's partitions are found in the index of their days (`user_days`,
//!   the index erasures read, see [`crate::store::erasure`]), newest first and limited to the
//!   requested range; only those `(user_id, day)` partitions are read, each with the partition
//!   key bound (so the driver routes the request to a replica) and the driver's paging.
//! - **Stop when the page is full.** Days are opened newest first, one at first and then more at
//!   once (doubling, at most [`DAYS_IN_FLIGHT`]) while the page is still short of events; a page
//!   reads one event more than it returns, so it knows whether there is a next one. A page is
//!   full at `limit` events, or once its events pass `max_bytes` ([`PAGE_BYTES`] for the API;
//!   its first always counts);
//!   and it ends, full or not, once it has read [`EXAMINED_PER_PAGE`] rows (a type filter that
//!   few rows match), with a next page that resumes after the last row read.
//! - **Resume exactly.** The order is the table's clustering order: `occurred_at` descending,
//!   then `event_id` ascending. A [`Position`] names the last event returned; the next page reads
//!   the events of the same instant with a greater `event_id`, then everything older, on that day
//!   and then on earlier days. No event is returned twice or skipped, whatever the page size.
//! - **Bounded memory.** At most [`DAYS_IN_FLIGHT`] days are open at once, each holding at most
//!   the driver's current page and the one it fetches ahead, whatever the user's history: an
//!   export streams in constant memory.
//!
//! Filtering by event type happens here, on the rows of the partitions read (the type is not part
//! of the key, and filtering on the server would need `ALLOW FILTERING`).

use std::sync::Arc;

use futures::stream::{self, BoxStream, FuturesOrdered, StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::errors::{ExecutionError, NextPageError, NextRowError, PagerExecutionError};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlDate, CqlTimestamp};
use uuid::Uuid;

use crate::store::scylla::{classify, cql_day, TABLE, USER_DAYS};
use crate::store::StoreError;

/// Milliseconds in a day: partitions are UTC days of `occurred_at`.
pub const DAY_MS: i64 = 86_400_000;

/// Day partitions open at once, at most (a page starts with one and doubles while short).
pub const DAYS_IN_FLIGHT: usize = 8;

/// Rows the driver fetches per request when exporting.
const EXPORT_PAGE_ROWS: i32 = 1000;

/// Rows one page reads at most (see [`PageRequest::max_examined`]).
pub const EXAMINED_PER_PAGE: usize = 20_000;

/// Bytes of events a page holds at most, past its first event: a page of large events ends
/// early (with a next page), so its answer stays a few MiB whatever `limit` and the events'
/// size. Events of a few hundred bytes never reach it below the largest `limit` (1000).
pub const PAGE_BYTES: usize = 1 << 20;

/// One stored event, as the read side shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at_ms: i64,
    /// The `attributes` JSON object as stored (text), if the event had one.
    pub attributes: Option<String>,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
}

impl StoredEvent {
    /// About how many bytes the event takes in memory and in an answer.
    pub fn size(&self) -> usize {
        64 + self.event_type.len()
            + self.attributes.as_ref().map_or(0, String::len)
            + self.source_topic.len()
    }

    /// Where a read that returned this event last resumes.
    pub fn position(&self) -> Position {
        Position {
            occurred_at_ms: self.occurred_at_ms,
            event_id: self.event_id,
        }
    }
}

/// A place in a user's events, in the table's order (`occurred_at` newest first, then
/// `event_id` ascending): a read resumes just after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub occurred_at_ms: i64,
    pub event_id: Uuid,
}

/// What a page asks for.
#[derive(Debug, Clone)]
pub struct PageRequest<'a> {
    pub user_id: &'a str,
    /// Events with `from_ms <= occurred_at <= to_ms` (milliseconds since the epoch).
    pub from_ms: i64,
    pub to_ms: i64,
    /// Only these event types; empty: every type.
    pub event_types: &'a [String],
    /// Events to return, at least 1.
    pub limit: usize,
    /// Resume after this event (from the previous page).
    pub after: Option<Position>,
    /// Rows a page reads at most ([`EXAMINED_PER_PAGE`]): a type filter that few rows match
    /// ends the page early, resuming after the last row read, instead of reading the user's
    /// whole history in one request.
    pub max_examined: usize,
    /// Bytes of events a page holds at most, past its first ([`PAGE_BYTES`] for an answer).
    pub max_bytes: usize,
}

/// One page of events, newest first, and where the next one starts (`None`: no more events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<StoredEvent>,
    pub next: Option<Position>,
}

/// Reads events back; prepared once, shared by every request.
pub struct EventReader {
    session: Arc<Session>,
    /// The user's days in a range, newest first.
    days: PreparedStatement,
    /// Whether the user has any day at all.
    any_day: PreparedStatement,
    /// A day's events in `[from, to]`.
    range: PreparedStatement,
    /// A day's events in `[from, to)`: what is older than a position.
    before: PreparedStatement,
    /// A day's events at one instant after an `event_id`: the rest of a position's instant.
    same_instant: PreparedStatement,
}

/// The row the read side selects.
type Row = (
    CqlTimestamp,
    Uuid,
    String,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i64>,
);

const COLUMNS: &str =
    "occurred_at, event_id, event_type, attributes, source_topic, source_partition, source_offset";

impl EventReader {
    /// Prepares the statements on `session` for the tables of `keyspace`.
    pub async fn new(session: Arc<Session>, keyspace: &str) -> Result<EventReader, StoreError> {
        let prepare = |cql: String| {
            let session = session.clone();
            async move {
                let mut st = session.prepare(cql).await.map_err(|e| {
                    match classify(&ExecutionError::PrepareError(e)) {
                        StoreError::Schema(m) | StoreError::Invalid(m) => {
                            StoreError::Schema(format!("{m}: run `vault migrate`"))
                        }
                        other => other,
                    }
                })?;
                st.set_is_idempotent(true);
                Ok::<_, StoreError>(st)
            }
        };
        let ks = keyspace;
        let slice = |cond: &str| {
            format!("SELECT {COLUMNS} FROM {ks}.{TABLE} WHERE user_id = ? AND day = ? AND {cond}")
        };
        Ok(EventReader {
            days: prepare(format!(
                "SELECT day FROM {ks}.{USER_DAYS} WHERE user_id = ? AND day >= ? AND day <= ?"
            ))
            .await?,
            any_day: prepare(format!(
                "SELECT day FROM {ks}.{USER_DAYS} WHERE user_id = ? LIMIT 1"
            ))
            .await?,
            range: prepare(slice("occurred_at >= ? AND occurred_at <= ?")).await?,
            before: prepare(slice("occurred_at >= ? AND occurred_at < ?")).await?,
            same_instant: prepare(slice("occurred_at = ? AND event_id > ?")).await?,
            session,
        })
    }

    /// Whether any event of `user_id` is indexed (one single-row read); also the read side's
    /// readiness probe, since it needs the node and the schema.
    pub async fn user_exists(&self, user_id: &str) -> Result<bool, StoreError> {
        let rows = self
            .session
            .execute_unpaged(&self.any_day, (user_id,))
            .await
            .map_err(|e| classify(&e))?
            .into_rows_result()
            .map_err(|e| StoreError::Schema(format!("reading {USER_DAYS}: {e}")))?;
        Ok(rows.rows_num() > 0)
    }

    /// One page of a user's events, newest first (see the module doc).
    pub async fn page(&self, req: &PageRequest<'_>) -> Result<Page, StoreError> {
        let limit = req.limit.max(1);
        let to_ms = match req.after {
            Some(p) => p.occurred_at_ms.min(req.to_ms),
            None => req.to_ms,
        };
        if req.from_ms > to_ms {
            return Ok(Page {
                events: Vec::new(),
                next: None,
            });
        }
        // One more than the page, to know whether a next page exists.
        let want = limit + 1;
        let page_rows = i32::try_from(want.clamp(10, 1000)).expect("at most 1000");
        let mut days = self
            .days(req.user_id, day_of(req.from_ms), day_of(to_ms), page_rows)
            .await?;
        let mut open = FuturesOrdered::new();
        let (mut window, mut days_done) = (1, false);
        let mut events = Vec::with_capacity(want.min(1024));
        // Bytes of the events taken, and the count the page returns (fewer than `limit` when
        // they pass `max_bytes`); one more event than that shows there is a next page.
        let (mut bytes, mut keep) = (0, limit);
        // Rows read, and the last of them: a page that reads its most ends there.
        let (mut examined, mut last_read) = (0usize, None);
        let mut spent = false;
        'days: loop {
            while open.len() < window && !days_done {
                match days.try_next().await? {
                    Some(day) => open.push_back(self.open_day(
                        req.user_id,
                        day,
                        req.from_ms,
                        to_ms,
                        req.after.filter(|p| day_of(p.occurred_at_ms) == day),
                        page_rows,
                    )),
                    None => days_done = true,
                }
            }
            let Some(rows) = open.next().await else {
                break;
            };
            let mut rows = rows?;
            while let Some(e) = rows.try_next().await? {
                examined += 1;
                if examined > req.max_examined.max(1) {
                    spent = true;
                    break 'days;
                }
                last_read = Some(e.position());
                if !req.event_types.is_empty() && !req.event_types.contains(&e.event_type) {
                    continue;
                }
                bytes += e.size();
                events.push(e);
                if events.len() > keep || (bytes > req.max_bytes && events.len() > 1) {
                    keep = keep.min(events.len() - 1);
                    break 'days;
                }
            }
            window = (window * 2).min(DAYS_IN_FLIGHT);
        }
        let next = if events.len() > keep {
            events.truncate(keep);
            events.last().map(StoredEvent::position)
        } else if spent {
            // Every row after the last event, up to the last one read, was filtered out.
            last_read
        } else {
            None
        };
        Ok(Page { events, next })
    }

    /// Every stored event of `user_id`, newest first, streamed: at most [`DAYS_IN_FLIGHT`] day
    /// partitions are open at once, each read with the driver's paging.
    pub fn export(
        self: &Arc<Self>,
        user_id: &str,
    ) -> BoxStream<'static, Result<StoredEvent, StoreError>> {
        let reader = self.clone();
        let user = user_id.to_owned();
        let days = {
            let (reader, user) = (reader.clone(), user.clone());
            async move {
                reader
                    .days(&user, i64::from(i32::MIN), i64::from(i32::MAX), 1000)
                    .await
            }
        };
        stream::once(days)
            .try_flatten()
            .map_ok(move |day| {
                let (reader, user) = (reader.clone(), user.clone());
                async move {
                    reader
                        .open_day(&user, day, i64::MIN, i64::MAX, None, EXPORT_PAGE_ROWS)
                        .await
                }
            })
            .try_buffered(DAYS_IN_FLIGHT)
            .try_flatten()
            .boxed()
    }

    /// The user's indexed days in `[lo, hi]`, newest first, paged.
    async fn days(
        &self,
        user_id: &str,
        lo: i64,
        hi: i64,
        page_rows: i32,
    ) -> Result<BoxStream<'static, Result<i64, StoreError>>, StoreError> {
        let mut st = self.days.clone();
        st.set_page_size(page_rows);
        let rows = self
            .session
            .execute_iter(st, (user_id, date(lo), date(hi)))
            .await
            .map_err(pager_error)?
            .rows_stream::<(CqlDate,)>()
            .map_err(|e| {
                StoreError::Schema(format!("reading {USER_DAYS}: {e} (run `vault migrate`)"))
            })?;
        Ok(rows
            .map(|r| {
                r.map(|(d,)| i64::from(d.0) - (1i64 << 31))
                    .map_err(row_error)
            })
            .boxed())
    }

    /// The events of one day partition in `[from_ms, to_ms]`, after `after` when it lies on that
    /// day, in the table's order.
    async fn open_day(
        &self,
        user_id: &str,
        day: i64,
        from_ms: i64,
        to_ms: i64,
        after: Option<Position>,
        page_rows: i32,
    ) -> Result<BoxStream<'static, Result<StoredEvent, StoreError>>, StoreError> {
        let day_key = cql_day(day);
        match after {
            None => {
                self.rows(
                    &self.range,
                    (user_id, day_key, CqlTimestamp(from_ms), CqlTimestamp(to_ms)),
                    page_rows,
                )
                .await
            }
            Some(p) => {
                let at = CqlTimestamp(p.occurred_at_ms);
                let (rest, older) = futures::try_join!(
                    self.rows(
                        &self.same_instant,
                        (user_id, day_key, at, p.event_id),
                        page_rows
                    ),
                    self.rows(
                        &self.before,
                        (user_id, day_key, CqlTimestamp(from_ms), at),
                        page_rows
                    ),
                )?;
                Ok(rest.chain(older).boxed())
            }
        }
    }

    async fn rows(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        page_rows: i32,
    ) -> Result<BoxStream<'static, Result<StoredEvent, StoreError>>, StoreError> {
        let mut st = statement.clone();
        st.set_page_size(page_rows);
        let rows = self
            .session
            .execute_iter(st, values)
            .await
            .map_err(pager_error)?
            .rows_stream::<Row>()
            .map_err(|e| {
                StoreError::Schema(format!("reading {TABLE}: {e} (run `vault migrate`)"))
            })?;
        Ok(rows
            .map(|r| {
                let (at, event_id, event_type, attributes, topic, partition, offset) =
                    r.map_err(row_error)?;
                Ok(StoredEvent {
                    event_id,
                    event_type,
                    occurred_at_ms: at.0,
                    attributes,
                    source_topic: topic.unwrap_or_default(),
                    source_partition: partition.unwrap_or(-1),
                    source_offset: offset.unwrap_or(-1),
                })
            })
            .boxed())
    }
}

/// The UTC day (since 1970-01-01) of an instant in milliseconds.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// A day as CQL's `date`, clamped to what the type holds.
fn date(day: i64) -> CqlDate {
    cql_day(day.clamp(i64::from(i32::MIN), i64::from(i32::MAX)))
}

/// A failed read request, classified like every store error (see `store::scylla::classify`).
pub(crate) fn pager_error(e: PagerExecutionError) -> StoreError {
    match e {
        PagerExecutionError::NextPageError(NextPageError::RequestFailure(r)) => {
            classify(&r.into_execution_error())
        }
        PagerExecutionError::PrepareError(p) => classify(&ExecutionError::PrepareError(p)),
        other => StoreError::Connection(other.to_string()),
    }
}

pub(crate) fn row_error(e: NextRowError) -> StoreError {
    match e {
        NextRowError::NextPageError(NextPageError::RequestFailure(r)) => {
            classify(&r.into_execution_error())
        }
        NextRowError::RowDeserializationError(d) => StoreError::Schema(format!(
            "a stored row does not decode: {d} (run `vault migrate`)"
        )),
        other => StoreError::Connection(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_days_of_occurred_at_like_the_partition_key() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY_MS - 1), 0);
        assert_eq!(day_of(-1), -1, "before 1970 counts down");
        assert_eq!(day_of(1_764_000_000_000), 20_416);
        assert_eq!(date(i64::MAX), cql_day(i64::from(i32::MAX)));
    }
}
