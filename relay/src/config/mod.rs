//! Configuration: a TOML file (`--config`) with every setting overridable from the environment.
//!
//! The env names of the README (Configuration: `DATABASE_URL`, `RELAY_SOURCE`, `RELAY_SINK`,
//! `RELAY_KAFKA_BROKERS`, `RELAY_AMQP_URL`, `RELAY_HTTP_ADDR`) are fixed so a sidecar can be
//! configured with env alone. Any other key is reachable as `RELAY_<SECTION>__<KEY>`, e.g.
//! `RELAY_KAFKA__TOPIC` or `RELAY_OUTBOX__COLUMNS__AGGREGATE_ID`.
//!
//! Unknown keys in the file are errors (a typo must not silently fall back to a default), and
//! [`Config::validate`] runs before anything connects, so a bad setting is one clear message.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ident::{QualifiedName, validate_ident};
use crate::sink::amqp::config::RabbitmqConfig;
use crate::sink::kafka::config::KafkaConfig;

pub mod secret;
pub use secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The polling publisher: reads unpublished rows from the outbox table.
    Poll,
    /// Log tailing through a logical replication slot.
    Wal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Kafka,
    #[serde(alias = "amqp")]
    Rabbitmq,
}

/// What happens to later events of an aggregate once one of its events is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadLetter {
    /// Hold them back until the dead letter is retried or discarded: order is preserved.
    Hold,
    /// Keep publishing them: the aggregate's order has a gap where the dead letter was.
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The service's Postgres (`DATABASE_URL`).
    pub database_url: Secret,
    pub source: SourceKind,
    pub sink: SinkKind,
    pub outbox: OutboxConfig,
    pub poll: PollConfig,
    pub wal: WalConfig,
    pub delivery: DeliveryConfig,
    /// `[kafka]`, owned by the Kafka sink.
    pub kafka: KafkaConfig,
    /// `[rabbitmq]`, owned by the RabbitMQ sink.
    pub rabbitmq: RabbitmqConfig,
    pub http: HttpConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: Secret::default(),
            source: SourceKind::Poll,
            sink: SinkKind::Kafka,
            outbox: OutboxConfig::default(),
            poll: PollConfig::default(),
            wal: WalConfig::default(),
            delivery: DeliveryConfig::default(),
            kafka: KafkaConfig::default(),
            rabbitmq: RabbitmqConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The outbox table, optionally schema-qualified (`billing.outbox`).
    pub table: String,
    /// The dead-letter table; defaults to `<table>_dead_letters` in the outbox's schema.
    pub dead_letter_table: Option<String>,
    pub columns: ColumnsConfig,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            dead_letter_table: None,
            columns: ColumnsConfig::default(),
        }
    }
}

/// Column names of the outbox table. The last four are optional: a table without them works.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnsConfig {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    pub headers: String,
    pub traceparent: String,
    pub tracestate: String,
    pub created_at: String,
}

impl Default for ColumnsConfig {
    fn default() -> Self {
        Self {
            id: "id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            traceparent: "traceparent".into(),
            tracestate: "tracestate".into(),
            created_at: "created_at".into(),
        }
    }
}

impl ColumnsConfig {
    /// `(setting name, column name)` of every configured column.
    pub fn all(&self) -> [(&'static str, &str); 9] {
        [
            ("id", &self.id),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
            ("payload", &self.payload),
            ("headers", &self.headers),
            ("traceparent", &self.traceparent),
            ("tracestate", &self.tracestate),
            ("created_at", &self.created_at),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// Most events read and published in one round.
    pub batch_size: usize,
    /// Fallback poll when no NOTIFY arrives (NOTIFY wakes the relay at once); with
    /// `notify = false`, the only poll.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Wake on LISTEN/NOTIFY (a statement trigger that `migrate` installs). NOTIFY takes a
    /// database-wide lock at commit, which serialises the commits of busy writers; `false`
    /// makes `migrate` drop the trigger and the relay poll every `interval` instead.
    pub notify: bool,
    /// How long published events are kept for `replay` before the daemon deletes them.
    /// `0s` deletes an event as soon as the broker confirmed it.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the daemon deletes published events older than `retention`.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// How often a standby instance tries to become the active one.
    #[serde(with = "humantime_serde")]
    pub standby_interval: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            interval: Duration::from_secs(1),
            notify: true,
            retention: Duration::from_secs(24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            standby_interval: Duration::from_secs(1),
        }
    }
}

/// Log tailing (`RELAY_SOURCE=wal`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Logical replication slot (pgoutput); default `outbox_relay_<database>_<table>` (slots are
    /// cluster-wide, so the default differs per database).
    pub slot: Option<String>,
    /// Publication on the outbox table (inserts only); default `outbox_relay_<table>`.
    pub publication: Option<String>,
    /// Create the slot on first run when it does not exist (`migrate` creates it too).
    pub create_slot: bool,
    /// Prefix of `pg_logical_emit_message(true, '<prefix>', '<json>')` events (table-less outbox).
    pub message_prefix: String,
    /// The confirmed position is reported to Postgres, and saved in the progress row, as soon
    /// as it moves, at most this often (and at least this often while idle, well under
    /// `wal_sender_timeout`, default 60 s). A shorter interval means fewer events sent again
    /// after a crash; each report is one small message and each save one single-row update.
    #[serde(with = "humantime_serde")]
    pub status_interval: std::time::Duration,
    /// How long to wait for a slot that another process still holds (a relay that just died)
    /// before giving up with an error.
    #[serde(with = "humantime_serde")]
    pub slot_wait: std::time::Duration,
    /// When a lost slot is repaired from the table, how far before the last confirmed commit
    /// to start (covers transactions that began earlier and committed later).
    #[serde(with = "humantime_serde")]
    pub repair_margin: std::time::Duration,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            slot: None,
            publication: None,
            create_slot: true,
            message_prefix: "outbox".into(),
            status_interval: std::time::Duration::from_millis(50),
            slot_wait: std::time::Duration::from_secs(30),
            repair_margin: std::time::Duration::from_secs(300),
        }
    }
}

impl WalConfig {
    fn default_name(table: &str) -> String {
        let name = table.rsplit('.').next().unwrap_or(table);
        let mut n = format!("outbox_relay_{name}").to_ascii_lowercase();
        n.truncate(63);
        n
    }
    pub fn publication_name(&self, table: &str) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| Self::default_name(table))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Attempts for an event the broker refuses permanently before it is dead-lettered.
    pub max_attempts: u32,
    pub on_dead_letter: OnDeadLetter,
    /// Backoff between retries of transient failures (broker down, Postgres restarting).
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// On SIGTERM/SIGINT, how long to wait for in-flight confirmations before exiting anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Batches sent and not yet confirmed at once: the next batch is read and sent while
    /// earlier ones wait for the broker. Also bounds what can reach the broker behind a failed
    /// event of its aggregate before the failure is known (it is sent again, in order, after).
    pub max_in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            on_dead_letter: OnDeadLetter::Hold,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            max_in_flight: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz` (`RELAY_HTTP_ADDR`).
    pub addr: String,
}

impl HttpConfig {
    /// The address to serve on; `None` when set to `off` or empty.
    pub fn enabled_addr(&self) -> Option<&str> {
        let addr = self.addr.trim();
        (!addr.is_empty() && !addr.eq_ignore_ascii_case("off")).then_some(addr)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:9464".into(),
        }
    }
}

/// The fixed env names (README, Configuration) and the keys they set.
const FIXED_ENV: [(&str, &str); 6] = [
    ("DATABASE_URL", "database_url"),
    ("RELAY_SOURCE", "source"),
    ("RELAY_SINK", "sink"),
    ("RELAY_KAFKA_BROKERS", "kafka.brokers"),
    ("RELAY_AMQP_URL", "rabbitmq.url"),
    ("RELAY_HTTP_ADDR", "http.addr"),
];

impl Config {
    /// Defaults, then the file (if any), then the environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file `{}` does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        for (var, key) in FIXED_ENV {
            figment = figment.merge(Env::raw().only(&[var]).map(move |_| key.into()));
        }
        figment = figment.merge(
            Env::prefixed("RELAY_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let config: Config = figment
            .extract()
            .map_err(|e| Error::Config(describe_figment(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.database_url.is_empty() {
            return bad(
                "DATABASE_URL is not set; set it to the service's Postgres, e.g. postgres://relay@127.0.0.1:5432/app".into(),
            );
        }
        crate::pg::tls::PgTarget::parse(&self.database_url)?;
        QualifiedName::parse(&self.outbox.table)
            .map_err(|e| Error::Config(format!("outbox.table: {e}")))?;
        if let Some(dl) = &self.outbox.dead_letter_table {
            QualifiedName::parse(dl)
                .map_err(|e| Error::Config(format!("outbox.dead_letter_table: {e}")))?;
        }
        for (setting, column) in self.outbox.columns.all() {
            validate_ident(column)
                .map_err(|e| Error::Config(format!("outbox.columns.{setting}: {e}")))?;
        }
        if self.source == SourceKind::Wal {
            if let Some(slot) = &self.wal.slot
                && (slot.is_empty()
                    || !slot
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
            {
                return bad(format!(
                    "wal.slot `{slot}`: replication slot names may contain only lower-case letters, digits and `_`"
                ));
            }
            let publication = self.wal.publication_name(&self.outbox.table);
            validate_ident(&publication)
                .map_err(|e| Error::Config(format!("wal.publication: {e}")))?;
            // The server lower-cases `publication_names` when streaming starts.
            if publication != publication.to_ascii_lowercase() {
                return bad(format!(
                    "wal.publication `{publication}`: use lower case (the replication protocol lower-cases publication names)"
                ));
            }
            if self.wal.status_interval.is_zero() {
                return bad("wal.status_interval must be greater than 0".into());
            }
        }
        if self.poll.batch_size == 0 || self.poll.batch_size > 100_000 {
            return bad(format!(
                "poll.batch_size = {} is out of range; use 1..=100000",
                self.poll.batch_size
            ));
        }
        if self.poll.interval.is_zero() {
            return bad("poll.interval must be greater than 0".into());
        }
        if self.delivery.max_attempts == 0 {
            return bad("delivery.max_attempts must be at least 1".into());
        }
        if self.delivery.backoff_initial.is_zero()
            || self.delivery.backoff_max < self.delivery.backoff_initial
        {
            return bad(
                "delivery.backoff_initial must be > 0 and not above delivery.backoff_max".into(),
            );
        }
        // Each sink validates its own section (`sink/<broker>/config.rs`).
        match self.sink {
            SinkKind::Kafka => self.kafka.validate()?,
            SinkKind::Rabbitmq => self.rabbitmq.validate()?,
        }
        if self.http.enabled_addr().is_some()
            && self.http.addr.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "RELAY_HTTP_ADDR `{}` is not an address like 127.0.0.1:9464 (or `off`)",
                self.http.addr
            ));
        }
        Ok(())
    }
}

fn describe_figment(e: figment::Error) -> String {
    use figment::error::Kind;
    // figment names the key and the provider (file or env) of every error.
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            match &e.kind {
                Kind::UnknownField(field, expected) => format!(
                    "unknown key `{key}`{origin}; `{field}` is not one of: {}",
                    expected.join(", ")
                ),
                Kind::UnknownVariant(value, expected) => format!(
                    "`{key}` = `{value}` is not valid{origin}; use one of: {}",
                    expected.join(", ")
                ),
                kind if key.is_empty() => format!("{kind}{origin}"),
                kind => format!("`{key}`: {kind}{origin}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_once_database_url_is_set() {
        let mut c = Config::default();
        assert!(c.validate().is_err());
        c.database_url = Secret::new("postgres://postgres@127.0.0.1/app");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_placeholder_in_topic_is_rejected() {
        let mut c = Config {
            database_url: Secret::new("postgres://postgres@127.0.0.1/app"),
            ..Config::default()
        };
        c.kafka.topic = "x.{aggregatetype}".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("kafka.topic"), "{err}");
        assert!(err.contains("aggregatetype"), "{err}");
    }
}
