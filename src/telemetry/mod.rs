//! Telemetry: Prometheus metrics (named in one place), health state, and the HTTP endpoints that
//! expose them.

pub mod health;
pub mod http;
pub mod metrics;

pub use health::Health;
pub use metrics::Metrics;
