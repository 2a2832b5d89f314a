//! The CQL stand-in node (test infrastructure, in-memory, not a database).

pub mod engine;
pub mod faults;
pub mod frame;
pub mod parser;
pub mod server;
pub mod types;

pub use faults::{Fault, FaultKind, Saturation, SaturationStats, LATENCY_SAMPLES};
pub use server::{CqlNode, LoggedRequest};
