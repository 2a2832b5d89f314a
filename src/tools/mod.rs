//! Operator tools built into the `vault` binary: the load generator (`produce`), the end-to-end
//! audit (`verify`) and the read side (`query`), and dead-letter replay (`dlq replay`). Each reports progress on long work and ends with
//! a summary.

pub mod dlq;
pub mod produce;
pub mod progress;
pub mod query;
pub mod record;
pub mod verify;
