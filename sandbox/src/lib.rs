//! TEST STAND-IN, NOT A DATABASE.
//!
//! `vault-sandbox` provides what vault's tests and demo need on machines where neither Kafka nor
//! ScyllaDB can run: an in-memory node that speaks the CQL native protocol (v4) well enough for
//! the real `scylla` driver, or a small cluster of such nodes with vnode tokens, replica
//! placement and ScyllaDB's tablets (TABLETS_ROUTING_V1) for token- and tablet-aware routing,
//! and a program hosting it beside librdkafka's mock Kafka
//! cluster. It keeps data in memory and has no durability; a cluster's nodes share one store, as
//! if replication were instant. The `vault` binary never depends on this crate.

pub mod cql;
