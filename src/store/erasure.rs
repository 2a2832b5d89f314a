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
//!
//! Tombstones do not last for ever: ScyllaDB purges one at compaction once its
//! `gc_grace_seconds` have passed (10 days by default; with `tombstone_gc` mode `repair`, once
//! repaired), and a write at a version below it lands again after that. Messages from before an
//! erasure are still in Kafka as long as the topic keeps them, and a new consumer group (or an
//! offset reset) reads them again, long after. So the write path keeps them out itself
//! ([`ErasedUsers`]): every erasure is recorded in `erasures` and raises the one-row
//! `erasure_watermark` before its tombstones are written, and a row whose version is at or
//! below the watermark is written only if its user was not erased through it. Only such rows
//! cost a lookup (one read per user, trusted for [`ErasedUsers::TRUST_FOR`]): rows of messages
//! newer than every erasure, the live stream, cost none.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::value::{CqlDate, CqlTimestamp};

use crate::event::Event;
use crate::store::scylla::{
    classify, cql_day, ScyllaStore, ERASURES, ERASURE_WATERMARK, TABLE, USER_DAYS,
};
use crate::store::{version, StoreError};

/// Partition deletes of one erasure in flight at once.
const CONCURRENT_DELETES: usize = 16;

/// Lookups of users' erasures in flight at once, for one write.
const CONCURRENT_LOOKUPS: usize = 16;

/// What the write path knows of erasures (see the module doc): the watermark, the latest
/// `erased_through` of any erasure, and the users it looked up. What it read is trusted for
/// [`Self::TRUST_FOR`]: an erasure made elsewhere (`vault forget`, another member) is known
/// within that, long before its tombstones may be purged, and until then they keep out its
/// rows on the days its index read found (docs/DESIGN.md states the limit). An erasure made
/// through this store is known at once.
#[derive(Debug, Default)]
pub struct ErasedUsers {
    known: Mutex<Known>,
    /// The writes under way, by the epoch they started in: an erasure, once known here, opens
    /// a new epoch and waits for the earlier ones' writes to end before it reads the user's
    /// days, so none of them lands on a day it does not find; new writes go on meanwhile
    /// (they see the erasure).
    writes: Mutex<Writes>,
    /// Signalled whenever a write ends.
    ended: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Writes {
    epoch: u64,
    under_way: std::collections::BTreeMap<u64, usize>,
}

/// A write under way ([`ErasedUsers::writing`]); it ends when dropped.
#[derive(Debug)]
pub struct Writing<'a> {
    users: &'a ErasedUsers,
    epoch: u64,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        {
            let mut w = self.users.lock_writes();
            if let Some(n) = w.under_way.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    w.under_way.remove(&self.epoch);
                }
            }
        }
        self.users.ended.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Known {
    /// The watermark (ms; `None`: no erasure recorded), and when it was read.
    watermark: Option<i64>,
    read_at: Option<Instant>,
    /// Each user looked up: the latest `erased_through` (`None`: never erased), and when.
    users: HashMap<String, (Option<i64>, Instant)>,
}

impl Known {
    /// A user's erasures as read at `now`, merged with what is known: an erasure noted while
    /// the lookup was under way stays. Returns the merged `erased_through`.
    fn looked_up(&mut self, user: &str, read: Option<i64>, now: Instant) -> Option<i64> {
        let entry = self.users.entry(user.to_owned()).or_insert((None, now));
        *entry = (entry.0.max(read), now);
        entry.0
    }

    /// An erasure made through this store, at `now`: the watermark and the user's entry rise
    /// to it (never fall).
    fn noted(&mut self, user: &str, through_ms: i64, now: Instant) {
        self.watermark = self.watermark.max(Some(through_ms));
        let entry = self.users.entry(user.to_owned()).or_insert((None, now));
        entry.0 = entry.0.max(Some(through_ms));
    }

    /// Past `max` users, stale entries go first, then those of users never erased; a user
    /// found erased within [`ErasedUsers::TRUST_FOR`] (an erasure noted here included) goes
    /// only last.
    fn evict(&mut self, max: usize, now: Instant) {
        if self.users.len() > max {
            self.users
                .retain(|_, (_, at)| now.duration_since(*at) < ErasedUsers::TRUST_FOR);
        }
        if self.users.len() > max {
            self.users.retain(|_, (through, _)| through.is_some());
        }
        if self.users.len() > max {
            self.users.clear();
        }
    }

    /// The watermark after a read of it at `now`: it never falls. A failed read keeps the value
    /// read before, which goes on serving for another while (an erasure made elsewhere
    /// meanwhile is still held by its tombstones), rather than every write of the process
    /// failing while one row's replicas are out of reach; with none read before, it fails.
    fn watermark_read(
        &mut self,
        read: Result<Option<i64>, StoreError>,
        now: Instant,
    ) -> Result<Option<i64>, StoreError> {
        match read {
            Ok(read) => self.watermark = self.watermark.max(read),
            Err(e) if self.read_at.is_some() => {
                tracing::warn!(error = %e, "Cannot read the erasure watermark; going on with the one read before.");
            }
            Err(e) => return Err(e),
        }
        self.read_at = Some(now);
        Ok(self.watermark)
    }
}

impl ErasedUsers {
    /// How long a read of the watermark or of a user's erasures is trusted.
    pub const TRUST_FOR: Duration = Duration::from_secs(60);
    /// Users remembered at most; past it stale entries go first, then users never erased.
    const MAX_USERS: usize = 100_000;

    /// Which of `events` to write: `None` for all of them, else the indices of those whose
    /// user was not erased through their version (rows an erasure's tombstones shadow, or
    /// shadowed before they were purged).
    pub async fn kept(
        &self,
        store: &ScyllaStore,
        events: &[&Event],
    ) -> Result<Option<Vec<usize>>, StoreError> {
        let Some(watermark) = self.watermark(store).await? else {
            return Ok(None);
        };
        let bound = tombstone_timestamp(watermark);
        if events.iter().all(|e| version::of(e) > bound) {
            return Ok(None);
        }
        let now = Instant::now();
        // What is known of each user with rows at or below the watermark, decided from this
        // call's own copy: another call's eviction cannot turn an erased user into an unknown one.
        let mut through: HashMap<&str, Option<i64>> = HashMap::new();
        let mut wanted: HashSet<&str> = HashSet::new();
        {
            let known = self.lock();
            for e in events.iter().filter(|e| version::of(e) <= bound) {
                let user = e.user_id();
                if through.contains_key(user) || wanted.contains(user) {
                    continue;
                }
                match known.users.get(user) {
                    Some((t, at)) if now.duration_since(*at) < Self::TRUST_FOR => {
                        through.insert(user, *t);
                    }
                    _ => {
                        wanted.insert(user);
                    }
                }
            }
        }
        let lookups: Vec<String> = wanted.iter().map(|u| (*u).to_owned()).collect();
        let found: Vec<(String, Option<i64>)> = stream::iter(lookups)
            .map(|user| async move { erased_through(store, &user).await.map(|t| (user, t)) })
            .buffer_unordered(CONCURRENT_LOOKUPS)
            .try_collect()
            .await?;
        {
            let mut known = self.lock();
            for (user, read) in found {
                let merged = known.looked_up(&user, read, now);
                if let Some(&u) = wanted.get(user.as_str()) {
                    through.insert(u, merged);
                }
            }
            known.evict(Self::MAX_USERS, now);
        }
        let erased = |e: &Event| {
            through
                .get(e.user_id())
                .copied()
                .flatten()
                .is_some_and(|t| version::of(e) <= tombstone_timestamp(t))
        };
        let kept: Vec<usize> = (0..events.len()).filter(|&i| !erased(events[i])).collect();
        Ok((kept.len() < events.len()).then_some(kept))
    }

    /// Held by a write from before its check ([`Self::kept`]) to its end.
    pub fn writing(&self) -> Writing<'_> {
        let mut w = self.lock_writes();
        let epoch = w.epoch;
        *w.under_way.entry(epoch).or_default() += 1;
        Writing { users: self, epoch }
    }

    /// Waits until every write that started before this call has ended (each is bounded by
    /// the store's request timeouts); writes that start meanwhile are not waited for.
    async fn settle(&self) {
        let before = {
            let mut w = self.lock_writes();
            w.epoch += 1;
            w.epoch
        };
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the two is not missed.
            ended.as_mut().enable();
            if self
                .lock_writes()
                .under_way
                .range(..before)
                .next()
                .is_none()
            {
                return;
            }
            ended.await;
        }
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, Writes> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An erasure made through this store: known at once.
    fn noted(&self, user_id: &str, through_ms: i64) {
        self.lock().noted(user_id, through_ms, Instant::now());
    }

    /// The watermark, read again once the last read is older than [`Self::TRUST_FOR`].
    async fn watermark(&self, store: &ScyllaStore) -> Result<Option<i64>, StoreError> {
        {
            let known = self.lock();
            if known
                .read_at
                .is_some_and(|at| at.elapsed() < Self::TRUST_FOR)
            {
                return Ok(known.watermark);
            }
        }
        let read = read_watermark(store).await;
        self.lock().watermark_read(read, Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The erasure watermark as stored (`None`: no erasure recorded).
async fn read_watermark(store: &ScyllaStore) -> Result<Option<i64>, StoreError> {
    let bad =
        |e: &dyn std::fmt::Display| StoreError::Schema(format!("reading {ERASURE_WATERMARK}: {e}"));
    Ok(store
        .session()
        .execute_unpaged(store.watermark_query(), ())
        .await
        .map_err(|e| classify(&e))?
        .into_rows_result()
        .map_err(|e| bad(&e))?
        .maybe_first_row::<(Option<CqlTimestamp>,)>()
        .map_err(|e| bad(&e))?
        .and_then(|(t,)| t)
        .map(|t| t.0))
}

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
    let key = (user, CqlTimestamp(erasure.requested_at_ms));
    // Rows an earlier release wrote before the day index existed are found only once the
    // upgrade's fill of the index has run through.
    if crate::store::scylla::reindex_pending(session, ks).await? {
        return Err(StoreError::Schema(
            "the index of users' days is still to be filled from an earlier release's rows (an \
             upgrade's `vault migrate` did not finish): run `vault migrate`, then erase again"
                .into(),
        ));
    }
    if !dry_run {
        // Recorded first (its partitions once known), with the watermark, and known to this
        // store at once: from then on the write path keeps the user's rows up to `through`
        // out, also once the tombstones below are purged, and also on a day the index does not
        // hold yet when the days are read below. Written with the tombstones' timestamp: two
        // erasures of one user asked in the same millisecond share a record, and the one that
        // reaches further keeps it, whichever lands last.
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.{ERASURES} (user_id, requested_at, requested_by, erased_through) \
                     VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
                ),
                (
                    key.0,
                    key.1,
                    erasure.requested_by.as_str(),
                    CqlTimestamp(erasure.through_ms),
                    at,
                ),
            )
            .await
            .map_err(|e| classify(&e))?;
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.{ERASURE_WATERMARK} (id, erased_through) VALUES (0, ?) \
                     USING TIMESTAMP ?"
                ),
                (CqlTimestamp(erasure.through_ms), at),
            )
            .await
            .map_err(|e| classify(&e))?;
        store.erased().noted(user, erasure.through_ms);
        // Every write of this store checked before that has ended once this returns.
        store.erased().settle().await;
    }
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
    // The partitions this run deleted (a retry or replay after the index delete finds only days
    // of later activity): the record says what the erasure's last run did.
    session
        .query_unpaged(
            format!(
                "UPDATE {ks}.{ERASURES} SET partitions = ? WHERE user_id = ? AND requested_at = ?"
            ),
            (
                i32::try_from(report.days.len()).unwrap_or(i32::MAX),
                key.0,
                key.1,
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

/// Raises the erasure watermark to the latest erasure recorded: erasures recorded by a release
/// before the watermark existed, also by members of that release still running while a rolling
/// upgrade migrates (each new member's `vault migrate` runs it again). One read of the record
/// of erasures; the write, at the erasure's tombstone timestamp, never lowers the watermark.
/// Returns the latest erasure's `erased_through`, if any.
pub async fn seed_watermark(
    session: &scylla::client::session::Session,
    keyspace: &str,
) -> Result<Option<i64>, StoreError> {
    let bad = |e: &dyn std::fmt::Display| {
        StoreError::Schema(format!("reading {keyspace}.{ERASURES}: {e}"))
    };
    let mut rows = session
        .query_iter(
            format!("SELECT erased_through FROM {keyspace}.{ERASURES}"),
            &[],
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("reading {keyspace}.{ERASURES}: {e}")))?
        .rows_stream::<(Option<CqlTimestamp>,)>()
        .map_err(|e| bad(&e))?;
    let mut latest: Option<i64> = None;
    while let Some(row) = rows.next().await {
        let (through,) = row.map_err(|e| bad(&e))?;
        latest = latest.max(through.map(|t| t.0));
    }
    let Some(through) = latest else {
        return Ok(None);
    };
    session
        .query_unpaged(
            format!(
                "INSERT INTO {keyspace}.{ERASURE_WATERMARK} (id, erased_through) VALUES (0, ?) \
                 USING TIMESTAMP ?"
            ),
            (CqlTimestamp(through), tombstone_timestamp(through)),
        )
        .await
        .map_err(|e| classify(&e))?;
    tracing::info!(
        keyspace,
        through_ms = through,
        "Erasure watermark raised to the latest erasure recorded."
    );
    Ok(Some(through))
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
    fn a_lookup_never_forgets_an_erasure_noted_while_it_was_under_way() {
        let now = Instant::now();
        let mut known = Known::default();
        known.noted("u1", 2_000, now);
        assert_eq!(
            known.looked_up("u1", None, now),
            Some(2_000),
            "read before the erasure"
        );
        assert_eq!(
            known.looked_up("u1", Some(1_000), now),
            Some(2_000),
            "an older erasure"
        );
        assert_eq!(
            known.looked_up("u1", Some(3_000), now),
            Some(3_000),
            "a later one"
        );
        assert_eq!(known.looked_up("u2", None, now), None);
        assert_eq!(known.watermark, Some(2_000));
        known.noted("u2", 1_500, now);
        assert_eq!(known.watermark, Some(2_000), "the watermark never falls");
        assert_eq!(known.users["u2"].0, Some(1_500));
    }

    #[test]
    fn eviction_drops_stale_users_then_users_never_erased_and_erased_ones_last() {
        let start = Instant::now();
        let fresh = start + ErasedUsers::TRUST_FOR;
        let mut known = Known::default();
        known.looked_up("stale-erased", Some(1), start);
        known.looked_up("stale-never", None, start);
        known.looked_up("erased", Some(1), fresh);
        known.looked_up("never", None, fresh);
        known.evict(4, fresh);
        assert_eq!(known.users.len(), 4, "nothing goes within the bound");
        known.evict(3, fresh);
        let mut left: Vec<&str> = known.users.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["erased", "never"],
            "stale entries go first, erased or not"
        );
        known.looked_up("never-2", None, fresh);
        known.evict(2, fresh);
        assert_eq!(known.users.keys().collect::<Vec<_>>(), ["erased"]);
        known.looked_up("erased-2", Some(5), fresh);
        known.evict(1, fresh);
        assert!(
            known.users.is_empty(),
            "erased users too, only when nothing else is left"
        );
    }

    #[test]
    fn a_failed_watermark_read_keeps_the_one_before_and_the_watermark_never_falls() {
        let now = Instant::now();
        let failed = || Err(StoreError::Unavailable("replicas out of reach".into()));
        let mut known = Known::default();
        assert!(
            known.watermark_read(failed(), now).is_err(),
            "nothing read before"
        );
        assert_eq!(known.read_at, None, "read again on the next write");
        assert_eq!(known.watermark_read(Ok(None), now).unwrap(), None);
        assert_eq!(known.watermark_read(Ok(Some(7)), now).unwrap(), Some(7));
        assert_eq!(known.watermark_read(failed(), now).unwrap(), Some(7));
        assert_eq!(known.watermark_read(Ok(Some(3)), now).unwrap(), Some(7));
        known.noted("u", 9, now);
        assert_eq!(known.watermark_read(Ok(Some(8)), now).unwrap(), Some(9));
    }

    #[test]
    fn the_tombstone_covers_its_millisecond_and_nothing_after() {
        let t = 1_764_000_000_000;
        let at = tombstone_timestamp(t);
        assert!(version::write_timestamp(t, 998_999) <= at);
        assert!(version::write_timestamp(t - 5, 7) < at);
        assert!(version::write_timestamp(t + 1, 0) > at);
    }
}
