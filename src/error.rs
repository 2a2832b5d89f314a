//! The crate-level error: what can stop vault from starting or running, each saying what to do.

use rdkafka::error::KafkaError;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Kafka client error: {}", without_values(.0))]
    Kafka(#[from] KafkaError),
    #[error("topic '{0}' does not exist on the brokers: create it, or fix kafka.topics / VAULT_KAFKA_TOPICS")]
    MissingTopic(String),
    #[error("dead-letter topic '{topic}' (for source topic {sources}) does not exist on the brokers: create it, set kafka.dead_letter_topic to an existing topic, or set pipeline.on_invalid to \"skip\" or \"fail\"")]
    MissingDeadLetterTopic { topic: String, sources: String },
    #[error("cannot reach Kafka at {brokers} to read topic metadata: {source} (check kafka.brokers / VAULT_KAFKA_BROKERS)")]
    Unreachable { brokers: String, source: KafkaError },
    #[error("cannot listen on metrics.addr {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(String),
    #[error("fatal Kafka client error, the consumer cannot go on: {0} (a fenced static member means another instance runs with the same kafka.instance_id / VAULT_KAFKA_INSTANCE_ID)")]
    Fatal(String),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error("kafka.leave_group_on_shutdown = \"scale-down\" reads the pod's StatefulSet from the Kubernetes API, and cannot: {0} (outside Kubernetes, set it to \"never\" or \"always\")")]
    Kubernetes(String),
}

/// A Kafka error as text, without the option value rdkafka appends to a configuration error
/// (`... sasl.passwrd <the value>`): the value may be a secret. Validation has already put every
/// configured option through librdkafka ([`crate::config`]), so this is a second line of defence.
fn without_values(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, reason, key, value) => {
            let reason = if value.is_empty() {
                reason.clone()
            } else {
                reason.replace(value.as_str(), "********")
            };
            format!("Client config error: {reason} (option {key})")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_config_error_never_shows_the_value() {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("sasl.passwrd", "hunter2");
        let created: Result<rdkafka::consumer::BaseConsumer, _> = cfg.create();
        let raw = created.err().expect("an unknown option is refused");
        assert!(
            raw.to_string().contains("hunter2"),
            "rdkafka echoes it: {raw}"
        );
        let shown = Error::from(raw).to_string();
        assert!(
            shown.contains("sasl.passwrd") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
