//! Integration tests: the real pipeline over real sockets against librdkafka's mock cluster (or a
//! real Kafka, with VAULT_IT_KAFKA_BROKERS=host:port). One test binary, to keep builds short.

#[cfg(feature = "failpoints")]
mod adversarial;
mod bad_input;
#[cfg(feature = "failpoints")]
mod chaos;
mod cluster;
mod common;
mod demo;
mod deploy;
mod faults;
mod http;
mod pipeline;
mod secrets;
mod store;
mod supervision;
mod telemetry;
