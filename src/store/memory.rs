//! In-memory store: rows keyed exactly like the ScyllaDB table, so "stored once" means the same
//! thing here as in production. Faults can be injected to exercise the retry and ordering paths.
//! Used by the test suite and, with `store = "memory"`, by benchmarks as the null store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::event::Event;
use crate::store::erasure::{tombstone_timestamp, Erasure};
use crate::store::{version, Store, StoreError, WriteFailure};

/// Primary key of a row: `((user_id, day), occurred_at, event_id)`.
pub type RowKey = (String, i64, i64, Uuid);

type Matcher = Box<dyn Fn(&Event) -> bool + Send + Sync>;

struct Fault {
    matches: Matcher,
    /// Requests left to fail; `None` fails until cleared.
    remaining: Option<u64>,
    error: StoreError,
}

#[derive(Default)]
struct Inner {
    rows: HashMap<RowKey, Event>,
    /// Per user, the newest erasure's tombstone timestamp: writes at or below it are shadowed,
    /// as a partition tombstone shadows them in ScyllaDB.
    erased: HashMap<String, i64>,
    writes: u64,
    requests: u64,
    failed_requests: u64,
    faults: Vec<Fault>,
}

/// See the module docs.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    /// When false, events are counted but not kept (the benchmark's null store).
    keep_rows: bool,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::default(),
            keep_rows: true,
        }
    }

    /// A store that acknowledges immediately and keeps nothing: the write-side ceiling.
    pub fn null() -> Self {
        MemoryStore {
            inner: Arc::default(),
            keep_rows: false,
        }
    }

    /// Fails every request containing an event that `matches`, `times` times (or until
    /// [`clear_faults`](Self::clear_faults) when `None`), with `error`.
    pub fn fail_when(
        &self,
        matches: impl Fn(&Event) -> bool + Send + Sync + 'static,
        times: Option<u64>,
        error: StoreError,
    ) {
        self.lock().faults.push(Fault {
            matches: Box::new(matches),
            remaining: times,
            error,
        });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Distinct rows stored.
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Event writes acknowledged, replays included (`writes - len` = duplicates written).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Write requests received, failed ones included.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    pub fn failed_requests(&self) -> u64 {
        self.lock().failed_requests
    }

    /// Whether the event at this Kafka position is stored.
    pub fn contains_source(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.lock().rows.values().any(|e| {
            &*e.source.topic == topic
                && e.source.partition == partition
                && e.source.offset == offset
        })
    }

    /// Every stored row, in no particular order.
    pub fn rows(&self) -> Vec<Event> {
        self.lock().rows.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock is a test bug; keep serving the data regardless.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn row_key(e: &Event) -> RowKey {
    (
        e.user_id().to_owned(),
        e.day(),
        e.occurred_at_ms,
        e.event_id,
    )
}

impl Store for MemoryStore {
    async fn write(&self, events: &[&Event]) -> Result<(), WriteFailure> {
        let mut inner = self.lock();
        inner.requests += 1;
        let hit = inner
            .faults
            .iter()
            .position(|f| f.remaining != Some(0) && events.iter().any(|e| (f.matches)(e)));
        if let Some(i) = hit {
            let fault = &mut inner.faults[i];
            if let Some(n) = fault.remaining.as_mut() {
                *n -= 1;
            }
            let error = fault.error.clone();
            inner.failed_requests += 1;
            return Err(WriteFailure::all(error, events.len()));
        }
        inner.writes += events.len() as u64;
        if self.keep_rows {
            for e in events {
                let shadowed = inner
                    .erased
                    .get(e.user_id())
                    .is_some_and(|t| version::of(e) <= *t);
                if shadowed {
                    continue;
                }
                // Last write wins by version, as in ScyllaDB.
                let key = row_key(e);
                if inner
                    .rows
                    .get(&key)
                    .is_none_or(|old| version::of(old) <= version::of(e))
                {
                    inner.rows.insert(key, (*e).clone());
                }
            }
        }
        Ok(())
    }

    async fn erase(&self, erasure: &Erasure) -> Result<(), StoreError> {
        let at = tombstone_timestamp(erasure.through_ms);
        let mut inner = self.lock();
        inner
            .rows
            .retain(|_, e| e.user_id() != erasure.user_id || version::of(e) > at);
        let t = inner.erased.entry(erasure.user_id.clone()).or_insert(at);
        *t = (*t).max(at);
        Ok(())
    }
}
