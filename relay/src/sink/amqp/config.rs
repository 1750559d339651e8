//! The `[rabbitmq]` settings, their defaults, and the checks run on them at start-up.
//!
//! They live with the sink, not in the top-level configuration, so that what the relay knows
//! about RabbitMQ sits in one folder; the top-level `Config` only holds a `rabbitmq` field of
//! this type and calls [`RabbitmqConfig::validate`] when RabbitMQ is the sink.
//!
//! What can go wrong: the URL carries the password, so it is a [`Secret`] and only its
//! redacted form appears in messages. Whether the URL's host, credentials and vhost work
//! (<https://www.rabbitmq.com/docs/uri-spec>) is only known when the sink connects.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::secret::Secret;
use crate::error::Error;
use crate::template::{Placeholder, Template};

/// The `[rabbitmq]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitmqConfig {
    /// `RELAY_AMQP_URL`: one URL, or a comma-separated list of a cluster's nodes, tried in
    /// order (see [`RabbitmqConfig::urls`]).
    pub url: Secret,
    /// The exchange every message is published to.
    pub exchange: String,
    /// Declare the (durable, topic) exchange at start-up; when false it must already exist.
    pub declare_exchange: bool,
    /// Routing key template: `{aggregate_type}`, `{event_type}`, `{aggregate_id}`, any column
    /// of the outbox row (`{tenant}`), and `{partition}` when `partitions` is set.
    pub routing_key: String,
    /// Number of partitions of `{partition}` (= `murmur2(aggregate_id) mod partitions`, the
    /// partition Kafka's default partitioner picks for the same key): one queue per partition
    /// lets that many consumers work in parallel and keep each aggregate's order.
    pub partitions: Option<u32>,
    /// How long to wait for the broker's confirmations of one batch (its messages are
    /// published together) before counting those still unanswered as failed.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Largest body the broker takes (RabbitMQ's `max_message_size`, 128 MiB by default);
    /// larger events are dead-lettered instead of breaking the channel.
    pub max_message_size: usize,
    /// PEM file of the CA (or CAs) that signed the nodes' certificates, trusted besides the
    /// system's roots for `amqps://` URLs. The URL's host must be a name in the certificate.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for RabbitmqConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "outbox".into(),
            declare_exchange: true,
            routing_key: "{aggregate_type}.{event_type}".into(),
            partitions: None,
            confirm_timeout: Duration::from_secs(30),
            max_message_size: 128 * 1024 * 1024,
            tls_ca_file: None,
        }
    }
}

impl RabbitmqConfig {
    /// Checks everything that can be checked without connecting; the error names the setting
    /// and what to do, and never the password.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        for url in self.urls() {
            let u = url.expose();
            if !(u.starts_with("amqp://") || u.starts_with("amqps://")) {
                return bad(format!(
                    "RELAY_AMQP_URL `{}` must start with amqp:// or amqps:// (several nodes: a comma-separated list of such URLs)",
                    url.redacted()
                ));
            }
        }
        if self.tls_ca_file.is_some() {
            if let Some(url) = self
                .urls()
                .iter()
                .find(|u| !u.expose().starts_with("amqps://"))
            {
                return bad(format!(
                    "rabbitmq.tls_ca_file is set but RELAY_AMQP_URL `{}` is not an amqps:// URL, so it would not be used; use amqps:// (RabbitMQ's TLS port, 5671 by default) or remove rabbitmq.tls_ca_file",
                    url.redacted()
                ));
            }
            self.ca_pem()?;
        }
        if self.exchange.is_empty() {
            return bad(
                "rabbitmq.exchange must not be empty (the default exchange cannot route by template)"
                    .into(),
            );
        }
        let routing_key = self.routing_key_template()?;
        if self.partitions.is_some() && !routing_key.uses(&Placeholder::Partition) {
            return bad(format!(
                "rabbitmq.partitions is set but rabbitmq.routing_key `{}` does not use {{partition}}; add it, e.g. \"{{aggregate_type}}.{{partition}}\", or remove rabbitmq.partitions",
                self.routing_key
            ));
        }
        Ok(())
    }

    /// The nodes of `url`, in the order the relay tries them: it connects to the first that
    /// answers and, when that node goes away, to the next.
    pub fn urls(&self) -> Vec<Secret> {
        self.url.split()
    }

    /// The certificates of `tls_ca_file`, in PEM, if it is set; `Err` when the file cannot be
    /// read or holds no PEM certificate.
    pub fn ca_pem(&self) -> Result<Option<String>, Error> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "rabbitmq.tls_ca_file `{}` cannot be read: {e}",
                path.display()
            ))
        })?;
        // Every certificate of the file is trusted, so every one must parse.
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        let blocks: Vec<&str> = pem.split(BEGIN).skip(1).collect();
        let not_pem = |why: String| {
            Error::Config(format!(
                "rabbitmq.tls_ca_file `{}` is not a PEM certificate file ({BEGIN} … -----END CERTIFICATE-----): {why}",
                path.display()
            ))
        };
        if blocks.is_empty() {
            return Err(not_pem("no certificate in it".into()));
        }
        for (i, block) in blocks.iter().enumerate() {
            native_tls::Certificate::from_pem(format!("{BEGIN}{block}").as_bytes())
                .map_err(|e| not_pem(format!("certificate {} of {}: {e}", i + 1, blocks.len())))?;
        }
        Ok(Some(pem))
    }

    /// The routing key template; `Err` names the setting.
    pub fn routing_key_template(&self) -> Result<Template, Error> {
        let partitions = match self.partitions {
            None => None,
            Some(n) => Some(NonZeroU32::new(n).ok_or_else(|| {
                Error::Config(
                    "rabbitmq.partitions = 0: set it to the number of partition queues (at least 1), or remove it"
                        .into(),
                )
            })?),
        };
        Template::parse_partitioned(&self.routing_key, partitions)
            .map_err(|e| Error::Config(format!("rabbitmq.routing_key: {e}")))
    }

    /// The outbox columns the routing key names besides the event's fields, each with the
    /// setting that names it.
    pub fn template_columns(&self) -> Vec<(String, &'static str)> {
        self.routing_key_template()
            .map(|t| {
                t.columns()
                    .map(|c| (c.to_string(), "rabbitmq.routing_key"))
                    .collect()
            })
            .unwrap_or_default()
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
    fn a_ca_file_needs_amqps_urls_and_a_readable_pem_file() {
        let dir = std::env::temp_dir().join(format!("amqp-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let with = |url: &str, ca: PathBuf| RabbitmqConfig {
            url: Secret::new(url),
            tls_ca_file: Some(ca),
            ..RabbitmqConfig::default()
        };
        let err = with(
            "amqps://a:5671,amqp://guest:hunter2@b:5672",
            not_pem.clone(),
        )
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an amqps:// URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = with("amqps://a:5671", dir.join("missing.pem"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot be read") && err.contains("missing.pem"),
            "{err}"
        );
        let err = with("amqps://a:5671", not_pem)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a PEM certificate"), "{err}");
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = with("amqps://a:5671", broken)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate 1 of 1"), "{err}");
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
    fn every_node_of_a_list_is_checked() {
        let c = RabbitmqConfig {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5701/,http://guest:hunter2@h:5702/"),
            ..RabbitmqConfig::default()
        };
        assert_eq!(c.urls().len(), 2);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`http://guest:***@h:5702/`"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn partitions_and_the_partition_placeholder_go_together() {
        let with = |routing_key: &str, partitions: Option<u32>| {
            RabbitmqConfig {
                routing_key: routing_key.into(),
                partitions,
                ..RabbitmqConfig::default()
            }
            .validate()
            .map_err(|e| e.to_string())
        };
        with("{aggregate_type}.{partition}", Some(8)).unwrap();
        let err = with("{aggregate_type}.{partition}", Some(0)).unwrap_err();
        assert!(err.contains("rabbitmq.partitions = 0"), "{err}");
        let err = with("{aggregate_type}.{partition}", None).unwrap_err();
        assert!(err.contains("needs rabbitmq.partitions"), "{err}");
        let err = with("{aggregate_type}", Some(8)).unwrap_err();
        assert!(err.contains("does not use {partition}"), "{err}");
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
            routing_key: "{type".into(),
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
