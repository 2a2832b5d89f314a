//! Integration tests: the real pipeline over real sockets against librdkafka's mock cluster (or a
//! real Kafka, with VAULT_IT_KAFKA_BROKERS=host:port). One test binary, to keep builds short.

#[cfg(feature = "failpoints")]
mod adversarial;
mod api;
mod bad_input;
#[cfg(feature = "failpoints")]
mod chaos;
mod cluster;
mod common;
mod concurrency;
mod demo;
mod deploy;
mod faults;
mod group_view;
mod http;
mod kubernetes;
#[cfg(feature = "failpoints")]
mod liveness;
mod pipeline;
mod secrets;
mod store;
mod supervision;
mod telemetry;
