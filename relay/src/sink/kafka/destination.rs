//! Where `replay` sends Kafka messages: `kafka.topic`, or the topic (template) given with
//! `--topic`, and the check that every topic a replay renders to exists before anything is
//! recorded or sent.
//!
//! Why a check of its own: the sink finds a missing topic only when an event names it, and a
//! replay would then stop half-way with some events sent. So the replay asks the brokers'
//! metadata (<https://kafka.apache.org/protocol#The_Messages_Metadata>) for each distinct
//! topic of its selection first. An explicit `--topic` is never created, also with
//! `kafka.create_topics`: a typo would otherwise create a topic nobody reads.
//!
//! What can go wrong: a topic whose metadata shows an error or no partitions yet (being
//! created, a leader moving) counts as missing; the replay refuses to start and can be run
//! again. Unreachable brokers are a broker error, not a missing topic.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer};

use super::client_config;
use super::config::KafkaConfig;
use crate::error::Error;
use crate::event::OutboxEvent;
use crate::template::Template;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a `--topic` value (a name or a template such as `replay.{aggregate_type}`).
pub fn parse_override(topic: &str) -> Result<Template, String> {
    Template::parse(topic).map_err(|e| format!("--topic: {e}"))
}

/// `config` sending to `topic` instead of `kafka.topic`; such a topic must exist.
pub fn with_override(config: &KafkaConfig, topic: &str) -> KafkaConfig {
    KafkaConfig {
        topic: topic.to_string(),
        create_topics: false,
        ..config.clone()
    }
}

/// The destination in words, for `replay --dry-run`.
pub fn describe(config: &KafkaConfig) -> String {
    format!("Kafka topic `{}`", config.topic)
}

/// The topic `event` goes to, or why it cannot be routed; empty when the template does not
/// parse (validation refused such a config already).
pub fn render(config: &KafkaConfig, event: &OutboxEvent) -> String {
    Template::parse(&config.topic)
        .map(|t| match t.render(event) {
            Ok(topic) => topic.into_owned(),
            Err(e) => format!("(cannot route: {e})"),
        })
        .unwrap_or_default()
}

/// Whether a replay must make sure its topics exist: always for `--topic` (`explicit`), and
/// for `kafka.topic` unless the sink creates missing topics.
pub fn must_exist(config: &KafkaConfig, explicit: bool) -> bool {
    explicit || !config.create_topics
}

/// `Ok` when every one of `topics` exists; else one message naming the missing ones and the
/// fix (an [`Error::Setup`]: nothing was sent).
pub async fn require_topics(
    config: &KafkaConfig,
    topics: HashSet<String>,
    explicit: bool,
) -> Result<(), Error> {
    let producer: BaseProducer = client_config(config).create().map_err(|e| {
        Error::Config(format!(
            "cannot create the Kafka client: {}",
            super::client_error(&e)
        ))
    })?;
    let brokers = config.brokers.clone();
    let missing = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
        let mut missing = Vec::new();
        for topic in topics {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map_err(|e| format!("cannot reach Kafka at {brokers}: {e}"))?;
            let exists = md
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !exists {
                missing.push(topic);
            }
        }
        Ok(missing)
    })
    .await
    .map_err(|e| Error::Broker(format!("Kafka metadata task failed: {e}")))?
    .map_err(Error::Broker)?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Setup(format!(
        "Kafka topic {} does not exist; {}; nothing was sent",
        missing
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", "),
        if explicit {
            "create it first (replay never creates the topic given with --topic)"
        } else {
            "create it, or set kafka.create_topics = true"
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_is_never_created() {
        let config = KafkaConfig {
            create_topics: true,
            ..KafkaConfig::default()
        };
        assert!(!must_exist(&config, false));
        let replay = with_override(&config, "replay.{aggregate_type}");
        assert!(!replay.create_topics);
        assert!(must_exist(&replay, true));
        let e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        assert_eq!(render(&replay, &e), "replay.wallet");
        assert!(
            parse_override("replay.{x")
                .unwrap_err()
                .starts_with("--topic: ")
        );
    }
}
