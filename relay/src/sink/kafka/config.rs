//! The `[kafka]` settings, their defaults, and the checks run on them at start-up.
//!
//! They live with the sink, not in the top-level configuration, so that what the relay knows
//! about Kafka sits in one folder; the top-level `Config` only holds a `kafka` field of
//! this type and calls [`KafkaConfig::validate`] when Kafka is the sink.
//!
//! What can go wrong: `kafka.properties` is passed to librdkafka as it is
//! (<https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>), so it could
//! switch off what the delivery guarantees rest on; [`GUARDED_PROPERTIES`] are refused here, and
//! so is a `max.in.flight.requests.per.connection` outside 1-5.
//! Anything else librdkafka does not know only fails when the client is created.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::template::Template;

/// librdkafka settings `kafka.properties` may not change: at-least-once and per-aggregate order
/// depend on `acks=all` and the idempotent producer.
pub const GUARDED_PROPERTIES: [&str; 2] = ["acks", "enable.idempotence"];

/// Requests in flight per broker connection: the idempotent producer keeps order with at most
/// 5 (the relay's default); fewer is allowed.
const MAX_IN_FLIGHT: &str = "max.in.flight.requests.per.connection";

/// The `[kafka]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers (`RELAY_KAFKA_BROKERS`).
    pub brokers: String,
    /// Topic template: `{aggregate_type}`, `{event_type}`, `{aggregate_id}` or any column of
    /// the outbox row, e.g. `{tenant}`.
    pub topic: String,
    /// Message key template, default `{aggregate_id}`; it picks the partition, so it must
    /// have one value per aggregate (e.g. `{tenant}`, a column fixed for the aggregate) for
    /// the aggregate's order to hold.
    pub key: String,
    /// A NULL payload becomes a tombstone (the key with a null value, for compacted topics)
    /// instead of a dead letter.
    pub tombstone_on_null_payload: bool,
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
            key: "{aggregate_id}".into(),
            tombstone_on_null_payload: false,
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
        self.templates()?;
        for guarded in GUARDED_PROPERTIES {
            if self.properties.contains_key(guarded) {
                return bad(format!(
                    "kafka.properties.{guarded} cannot be changed: the relay's delivery guarantees depend on it (acks=all, idempotent producer)"
                ));
            }
        }
        if let Some(v) = self.properties.get(MAX_IN_FLIGHT)
            && !matches!(v.trim().parse::<u8>(), Ok(1..=5))
        {
            return bad(format!(
                "kafka.properties.{MAX_IN_FLIGHT} = {v:?}: it must be 1 to 5, the most the idempotent producer keeps in order (the default is 5)"
            ));
        }
        if self.partitions < 1 {
            return bad("kafka.partitions must be at least 1".into());
        }
        if self.replication_factor < 1 {
            return bad("kafka.replication_factor must be at least 1".into());
        }
        Ok(())
    }

    /// The topic and key templates; `Err` names the setting.
    pub fn templates(&self) -> Result<(Template, Template), Error> {
        let topic =
            Template::parse(&self.topic).map_err(|e| Error::Config(format!("kafka.topic: {e}")))?;
        let key =
            Template::parse(&self.key).map_err(|e| Error::Config(format!("kafka.key: {e}")))?;
        Ok((topic, key))
    }

    /// The outbox columns the templates name besides the event's fields, each with the
    /// setting that names it.
    pub fn template_columns(&self) -> Vec<(String, &'static str)> {
        let Ok((topic, key)) = self.templates() else {
            return vec![];
        };
        let mut out: Vec<(String, &'static str)> = Vec::new();
        for (setting, t) in [("kafka.topic", &topic), ("kafka.key", &key)] {
            for c in t.columns() {
                if !out.iter().any(|(n, _)| n == c) {
                    out.push((c.to_string(), setting));
                }
            }
        }
        out
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
    fn requests_in_flight_may_be_lowered_but_not_raised_past_what_keeps_order() {
        for (value, ok) in [
            ("1", true),
            ("5", true),
            ("0", false),
            ("6", false),
            ("x", false),
        ] {
            let mut c = KafkaConfig::default();
            c.properties.insert(MAX_IN_FLIGHT.into(), value.into());
            match c.validate() {
                Ok(()) => assert!(ok, "{value} accepted"),
                Err(e) => {
                    assert!(!ok, "{value} refused: {e}");
                    assert!(e.to_string().contains("must be 1 to 5"), "{e}");
                }
            }
        }
    }

    #[test]
    fn key_is_a_template_and_its_columns_are_listed() {
        let c = KafkaConfig {
            topic: "outbox.{tenant}".into(),
            key: "{tenant}-{region}".into(),
            ..KafkaConfig::default()
        };
        c.validate().unwrap();
        assert_eq!(
            c.template_columns(),
            [
                ("tenant".to_string(), "kafka.topic"),
                ("region".to_string(), "kafka.key")
            ]
        );
        let c = KafkaConfig {
            key: "{partition}".into(),
            ..KafkaConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("kafka.key") && err.contains("rabbitmq.partitions"),
            "{err}"
        );
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
