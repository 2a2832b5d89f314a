//! The pipeline between the consumer and the store: batches, the flush policy, the
//! per-partition batcher task, and the deadlines of stops.

pub mod batch;
pub mod batcher;
pub mod deadline;
pub mod flush;
