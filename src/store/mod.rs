//! Storage: the [`Store`] trait the persisters write through, its error classification, and the
//! implementations (in-memory for tests and benchmarks; ScyllaDB in production).
//!
//! Contract that keeps the commit-after-write invariant: `write` returns `Ok` only when every
//! event it was given is durable. Writes must be idempotent (same event, same row), because the
//! pipeline replays on crash, rebalance and retry.

pub mod concurrency;
pub mod erasure;
pub mod memory;
pub mod persister;
pub mod rate;
pub mod read;
pub mod retention;
pub mod runtime;
pub mod scylla;
pub mod version;

use std::future::Future;

use crate::event::Event;
use crate::telemetry::Metrics;

pub use memory::MemoryStore;

/// A store failure, classified once: [`StoreError::is_retryable`] decides retry vs dead-letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("request timed out: {0}")]
    Timeout(String),
    #[error("database overloaded: {0}")]
    Overloaded(String),
    #[error("not enough replicas available: {0}")]
    Unavailable(String),
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("request rejected as invalid: {0}")]
    Invalid(String),
    #[error("schema does not match (run `vault migrate`): {0}")]
    Schema(String),
    #[error("authentication failed (check scylla.username/password): {0}")]
    Auth(String),
    /// The configuration, checked against the cluster once connected, is refused.
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// Transient failures are retried with backoff; the others will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout(_)
                | StoreError::Overloaded(_)
                | StoreError::Unavailable(_)
                | StoreError::Connection(_)
        )
    }

    /// The database refuses these particular rows: retrying cannot help, so they are
    /// dead-lettered. Schema and authentication errors are not row errors: they would reject
    /// every row, so the partition stalls (and alerts) until an operator fixes them.
    pub fn is_row_error(&self) -> bool {
        matches!(self, StoreError::Invalid(_))
    }

    /// Every [`StoreError::kind`], for metric series created before their first failure.
    pub const KINDS: [&'static str; 8] = [
        "timeout",
        "overloaded",
        "unavailable",
        "connection",
        "invalid",
        "schema",
        "auth",
        "config",
    ];

    /// Stable label for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Overloaded(_) => "overloaded",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Connection(_) => "connection",
            StoreError::Invalid(_) => "invalid",
            StoreError::Schema(_) => "schema",
            StoreError::Auth(_) => "auth",
            StoreError::Config(_) => "config",
        }
    }
}

/// A write that did not fully succeed: which events are still unwritten, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    pub error: StoreError,
    /// Indices (into the slice given to `write`) of the events not known to be durable.
    pub unwritten: Vec<usize>,
}

impl WriteFailure {
    /// A failure of the whole request.
    pub fn all(error: StoreError, len: usize) -> Self {
        WriteFailure {
            error,
            unwritten: (0..len).collect(),
        }
    }
}

/// Where events are stored.
pub trait Store: Send + Sync + 'static {
    /// Writes every event; `Ok` only once all are durable. Idempotent per event.
    fn write(&self, events: &[&Event]) -> impl Future<Output = Result<(), WriteFailure>> + Send;

    /// Erases a user (see [`erasure`]); `Ok` only once the erasure is durable. Idempotent.
    fn erase(
        &self,
        erasure: &erasure::Erasure,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = erasure;
        async { Err(StoreError::Invalid("this store cannot erase users".into())) }
    }

    /// Exports the store's own figures (its write concurrency) through the pipeline's metrics;
    /// the pipeline calls it once at start.
    fn report_to(&self, metrics: &Metrics) {
        let _ = metrics;
    }
}

impl<S: Store> Store for std::sync::Arc<S> {
    fn write(&self, events: &[&Event]) -> impl Future<Output = Result<(), WriteFailure>> + Send {
        (**self).write(events)
    }

    fn erase(
        &self,
        erasure: &erasure::Erasure,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).erase(erasure)
    }

    fn report_to(&self, metrics: &Metrics) {
        (**self).report_to(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_retry_and_permanent_ones_do_not() {
        assert!(StoreError::Timeout("t".into()).is_retryable());
        assert!(StoreError::Overloaded("o".into()).is_retryable());
        assert!(StoreError::Unavailable("u".into()).is_retryable());
        assert!(StoreError::Connection("c".into()).is_retryable());
        assert!(!StoreError::Invalid("i".into()).is_retryable());
        assert!(!StoreError::Schema("s".into()).is_retryable());
        assert!(!StoreError::Auth("a".into()).is_retryable());
        assert!(!StoreError::Config("c".into()).is_retryable());
    }
}
