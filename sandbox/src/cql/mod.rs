//! The CQL stand-in: one node or a small cluster of them (test infrastructure, in memory, not a
//! database).

pub mod cluster;
pub mod engine;
pub mod faults;
pub mod frame;
pub mod murmur3;
pub mod parser;
pub mod ring;
pub mod server;
pub mod tablets;
pub mod types;

pub use cluster::{CqlCluster, CqlNode, CqlOptions, RoutingStats};
pub use faults::{Fault, FaultKind, Saturation, SaturationStats, LATENCY_SAMPLES};
pub use server::{LoggedRequest, RequestTotals};
pub use tablets::Tablet;
