//! User erasure (the right to be forgotten): one library function, [`forget`], behind
//! `vault forget`, the Kafka erasure message and the read API.
//!
//! Invariant kept here: an erasure through time `T` removes every row of the user whose
//! message's Kafka timestamp is at or before `T`, and they stay removed under any replay: each
//! of the user's partitions gets a partition tombstone at the version of the last microsecond
//! of `T` ([`version::write_timestamp`]`(T, 999)`), which shadows every write at or below that
//! version whenever it lands, and no write above it. Rows of later messages are new activity
//! and are kept. The user's partitions are found in the `user_days` index (one row per
//! `(user_id, day)`, written with the rows of that day, see the ScyllaDB store), so the cost
//! is one read plus one delete per day the user has activity on, never a scan. The index
//! itself is deleted at the same version, so days that only erased activity held disappear from
//! it, and days with later activity stay. Every erasure is recorded in `erasures`.
//!
//! Everything is idempotent: a retried or replayed erasure writes the same tombstones.

use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::value::{CqlDate, CqlTimestamp};

use crate::store::scylla::{classify, cql_day, ScyllaStore, ERASURES, TABLE, USER_DAYS};
use crate::store::{version, StoreError};

/// Partition deletes of one erasure in flight at once.
const CONCURRENT_DELETES: usize = 16;

/// A request to erase a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub user_id: String,
    /// Rows of messages with a Kafka timestamp up to and including this instant (ms) go.
    pub through_ms: i64,
    /// Who or what asked: `cli:<who>`, `kafka:<topic>/<partition>/<offset>`, `api:<token name>`.
    pub requested_by: String,
    /// When it was asked (ms); recorded with it.
    pub requested_at_ms: i64,
}

/// What an erasure did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureReport {
    pub user_id: String,
    /// The days (since 1970-01-01) whose partitions were deleted, newest first.
    pub days: Vec<i64>,
    /// The tombstones' timestamp (microseconds).
    pub tombstone_timestamp: i64,
    pub dry_run: bool,
}

/// The tombstone timestamp of an erasure through `through_ms`: above every version of a
/// message of that millisecond or earlier, below every later one.
pub fn tombstone_timestamp(through_ms: i64) -> i64 {
    version::write_timestamp(through_ms, 999)
}

/// Erases `erasure.user_id` through `erasure.through_ms` (see the module doc), or with `dry_run`
/// only reports the partitions it would delete.
pub async fn forget(
    store: &ScyllaStore,
    erasure: &Erasure,
    dry_run: bool,
) -> Result<ErasureReport, StoreError> {
    let session = store.session();
    let ks = store.keyspace();
    let user = erasure.user_id.as_str();
    let at = tombstone_timestamp(erasure.through_ms);
    let days: Vec<i64> = session
        .query_unpaged(
            format!("SELECT day FROM {ks}.{USER_DAYS} WHERE user_id = ?"),
            (user,),
        )
        .await
        .map_err(|e| classify(&e))?
        .into_rows_result()
        .map_err(|e| StoreError::Invalid(format!("reading the user's days: {e}")))?
        .rows::<(CqlDate,)>()
        .map_err(|e| StoreError::Invalid(format!("reading the user's days: {e}")))?
        .map(|r| r.map(|(d,)| i64::from(d.0) - (1i64 << 31)))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Invalid(format!("reading the user's days: {e}")))?;
    let report = ErasureReport {
        user_id: user.to_owned(),
        days,
        tombstone_timestamp: at,
        dry_run,
    };
    if dry_run {
        return Ok(report);
    }
    let delete_day = session
        .prepare(format!(
            "DELETE FROM {ks}.{TABLE} USING TIMESTAMP ? WHERE user_id = ? AND day = ?"
        ))
        .await
        .map_err(|e| classify(&scylla::errors::ExecutionError::PrepareError(e)))?;
    let delete_day = &delete_day;
    stream::iter(report.days.iter().copied())
        .map(|day| async move {
            session
                .execute_unpaged(delete_day, (at, user, cql_day(day)))
                .await
                .map_err(|e| classify(&e))
        })
        .buffer_unordered(CONCURRENT_DELETES)
        .try_collect::<Vec<_>>()
        .await?;
    // The index goes last: until the rows are gone, a retry must still find their days.
    session
        .query_unpaged(
            format!("DELETE FROM {ks}.{USER_DAYS} USING TIMESTAMP ? WHERE user_id = ?"),
            (at, user),
        )
        .await
        .map_err(|e| classify(&e))?;
    session
        .query_unpaged(
            format!(
                "INSERT INTO {ks}.{ERASURES} (user_id, requested_at, requested_by, erased_through, partitions) \
                 VALUES (?, ?, ?, ?, ?)"
            ),
            (
                user,
                CqlTimestamp(erasure.requested_at_ms),
                erasure.requested_by.as_str(),
                CqlTimestamp(erasure.through_ms),
                i32::try_from(report.days.len()).unwrap_or(i32::MAX),
            ),
        )
        .await
        .map_err(|e| classify(&e))?;
    tracing::info!(
        user_partitions = report.days.len(),
        requested_by = %erasure.requested_by,
        through_ms = erasure.through_ms,
        "User erased."
    );
    Ok(report)
}

/// The latest instant (ms) through which `user_id` was erased, from the record of erasures;
/// `None` when the user never was. `vault dlq replay` asks it before re-publishing a letter: a
/// dead-lettered event never reached the store, so its `(user_id, day)` partition may not be
/// in the day index the erasure read, and nothing there would shadow it.
pub async fn erased_through(store: &ScyllaStore, user_id: &str) -> Result<Option<i64>, StoreError> {
    let ks = store.keyspace();
    let bad = |e: &dyn std::fmt::Display| {
        StoreError::Invalid(format!("reading the user's erasures: {e}"))
    };
    let rows = store
        .session()
        .query_unpaged(
            format!("SELECT erased_through FROM {ks}.{ERASURES} WHERE user_id = ?"),
            (user_id,),
        )
        .await
        .map_err(|e| classify(&e))?
        .into_rows_result()
        .map_err(|e| bad(&e))?;
    let mut latest = None;
    for row in rows
        .rows::<(Option<CqlTimestamp>,)>()
        .map_err(|e| bad(&e))?
    {
        if let (Some(t),) = row.map_err(|e| bad(&e))? {
            latest = latest.max(Some(t.0));
        }
    }
    Ok(latest)
}

/// A human summary of an erasure report, for the command line.
pub fn summary(r: &ErasureReport) -> String {
    let days: Vec<String> = r
        .days
        .iter()
        .map(|d| {
            chrono::DateTime::from_timestamp(d * 86_400, 0)
                .map_or_else(|| d.to_string(), |t| t.format("%Y-%m-%d").to_string())
        })
        .collect();
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    format!(
        "user {}: {verb} {} partition(s){}{}\n",
        crate::tools::query::escape(&r.user_id),
        r.days.len(),
        if days.is_empty() { "" } else { ": " },
        days.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tombstone_covers_its_millisecond_and_nothing_after() {
        let t = 1_764_000_000_000;
        let at = tombstone_timestamp(t);
        assert!(version::write_timestamp(t, 998_999) <= at);
        assert!(version::write_timestamp(t - 5, 7) < at);
        assert!(version::write_timestamp(t + 1, 0) > at);
    }
}
