//! TEST STAND-IN, NOT A DATABASE.
//!
//! `vault-sandbox` provides what vault's tests and demo need on machines where neither Kafka nor
//! ScyllaDB can run: an in-memory node that speaks the CQL native protocol (v4) well enough for
//! the real `scylla` driver, and a program hosting it beside librdkafka's mock Kafka cluster.
//! It keeps data in memory, has no durability and no replication. The `vault` binary never
//! depends on this crate.

pub mod cql;
