//! The pipeline between the consumer and the store: batches, the flush policy, and the
//! per-partition batcher task.

pub mod batch;
pub mod batcher;
pub mod flush;
