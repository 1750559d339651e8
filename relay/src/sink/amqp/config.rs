//! The `[rabbitmq]` settings, their defaults, and the checks run on them at start-up.
//!
//! They live with the sink, not in the top-level configuration, so that what the relay knows
//! about RabbitMQ sits in one folder; the top-level `Config` only holds a `rabbitmq` field of
//! this type and calls [`RabbitmqConfig::validate`] when RabbitMQ is the sink.
//!
//! What can go wrong: the URL carries the password, so it is a [`Secret`] and only its
//! redacted form appears in messages. Whether the URL's host, credentials and vhost work
//! (<https://www.rabbitmq.com/docs/uri-spec>) is only known when the sink connects.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::secret::Secret;
use crate::error::Error;
use crate::template::Template;

/// The `[rabbitmq]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitmqConfig {
    /// `RELAY_AMQP_URL`.
    pub url: Secret,
    /// The exchange every message is published to.
    pub exchange: String,
    /// Declare the (durable, topic) exchange at start-up; when false it must already exist.
    pub declare_exchange: bool,
    /// Routing key template; placeholders `{aggregate_type}`, `{event_type}`, `{aggregate_id}`.
    pub routing_key: String,
    /// How long to wait for a broker confirmation before counting the publish as failed.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Largest body the broker takes (RabbitMQ's `max_message_size`, 128 MiB by default);
    /// larger events are dead-lettered instead of breaking the channel.
    pub max_message_size: usize,
}

impl Default for RabbitmqConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "outbox".into(),
            declare_exchange: true,
            routing_key: "{aggregate_type}.{event_type}".into(),
            confirm_timeout: Duration::from_secs(30),
            max_message_size: 128 * 1024 * 1024,
        }
    }
}

impl RabbitmqConfig {
    /// Checks everything that can be checked without connecting; the error names the setting
    /// and what to do, and never the password.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        let url = self.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return bad(format!(
                "RELAY_AMQP_URL `{}` must start with amqp:// or amqps://",
                self.url.redacted()
            ));
        }
        if self.exchange.is_empty() {
            return bad(
                "rabbitmq.exchange must not be empty (the default exchange cannot route by template)"
                    .into(),
            );
        }
        Template::parse(&self.routing_key)
            .map_err(|e| Error::Config(format!("rabbitmq.routing_key: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        RabbitmqConfig::default().validate().unwrap();
    }

    #[test]
    fn a_url_of_another_scheme_is_refused_without_its_password() {
        let c = RabbitmqConfig {
            url: Secret::new("http://guest:hunter2@127.0.0.1:5672/"),
            ..RabbitmqConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("RELAY_AMQP_URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn empty_exchange_and_bad_routing_key_are_refused() {
        let c = RabbitmqConfig {
            exchange: String::new(),
            ..RabbitmqConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("rabbitmq.exchange")
        );
        let c = RabbitmqConfig {
            routing_key: "{type}".into(),
            ..RabbitmqConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("rabbitmq.routing_key")
        );
    }
}
