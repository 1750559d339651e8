//! The `[kafka]` settings, their defaults, and the checks run on them at start-up.
//!
//! They live with the sink, not in the top-level configuration, so that what the relay knows
//! about Kafka sits in one folder; the top-level `Config` only holds a `kafka` field of
//! this type and calls [`KafkaConfig::validate`] when Kafka is the sink.
//!
//! What can go wrong: `kafka.properties` is passed to librdkafka as it is
//! (<https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>), so it could
//! switch off what the delivery guarantees rest on; [`GUARDED_PROPERTIES`] are refused here.
//! Anything else librdkafka does not know only fails when the client is created.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::template::Template;

/// librdkafka settings `kafka.properties` may not change: at-least-once and per-aggregate order
/// depend on `acks=all` and the idempotent producer (which keeps order with at most 5 requests
/// in flight per connection).
pub const GUARDED_PROPERTIES: [&str; 3] = [
    "acks",
    "enable.idempotence",
    "max.in.flight.requests.per.connection",
];

/// The `[kafka]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers (`RELAY_KAFKA_BROKERS`).
    pub brokers: String,
    /// Topic template; placeholders `{aggregate_type}`, `{event_type}`, `{aggregate_id}`.
    pub topic: String,
    /// Create a missing topic instead of failing its events.
    pub create_topics: bool,
    /// Partitions of a topic the relay creates.
    pub partitions: i32,
    /// Replication factor of a topic the relay creates.
    pub replication_factor: i32,
    /// How long librdkafka keeps retrying one message before the relay sees a failure.
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    /// Extra librdkafka settings (`security.protocol`, `linger.ms`, ...), applied last.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "outbox.event.{aggregate_type}".into(),
            create_topics: false,
            partitions: 3,
            replication_factor: 1,
            message_timeout: Duration::from_secs(30),
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Checks everything that can be checked without connecting; the error names the setting
    /// and what to do.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.brokers.trim().is_empty() {
            return bad(
                "RELAY_KAFKA_BROKERS is empty; set it to the bootstrap servers, e.g. 127.0.0.1:9092"
                    .into(),
            );
        }
        Template::parse(&self.topic).map_err(|e| Error::Config(format!("kafka.topic: {e}")))?;
        for guarded in GUARDED_PROPERTIES {
            if self.properties.contains_key(guarded) {
                return bad(format!(
                    "kafka.properties.{guarded} cannot be changed: the relay's delivery guarantees depend on it (acks=all, idempotent producer)"
                ));
            }
        }
        if self.partitions < 1 {
            return bad("kafka.partitions must be at least 1".into());
        }
        if self.replication_factor < 1 {
            return bad("kafka.replication_factor must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        KafkaConfig::default().validate().unwrap();
    }

    #[test]
    fn guarantee_critical_properties_are_refused() {
        for guarded in GUARDED_PROPERTIES {
            let mut c = KafkaConfig::default();
            c.properties.insert(guarded.into(), "1".into());
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("kafka.properties.{guarded}")),
                "{err}"
            );
        }
        let mut c = KafkaConfig::default();
        c.properties.insert("linger.ms".into(), "20".into());
        c.validate().unwrap();
    }

    #[test]
    fn empty_brokers_and_zero_partitions_are_refused() {
        let c = KafkaConfig {
            brokers: " ".into(),
            ..KafkaConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("RELAY_KAFKA_BROKERS")
        );
        let c = KafkaConfig {
            partitions: 0,
            ..KafkaConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("kafka.partitions")
        );
    }
}
