//! Configuration: a TOML file (`--config`) with every setting overridable from the environment.
//!
//! The env names of the README (Configuration: `DATABASE_URL`, `RELAY_SOURCE`, `RELAY_SINK`,
//! `RELAY_KAFKA_BROKERS`, `RELAY_AMQP_URL`, `RELAY_HTTP_ADDR`) are fixed so a sidecar can be
//! configured with env alone. Any other key is reachable as `RELAY_<SECTION>__<KEY>`, e.g.
//! `RELAY_KAFKA__TOPIC` or `RELAY_OUTBOX__COLUMNS__AGGREGATE_ID`.
//!
//! Unknown keys in the file are errors (a typo must not silently fall back to a default), and
//! [`Config::validate`] runs before anything connects, so a bad setting is one clear message.
//!
//! A setting that moved keeps working under its old key for a while ([`MOVED`]): its value
//! lands in the new field, start-up logs one warning per old key that names the new one, and
//! the old and the new key set to different values is an error, never a silent choice.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::Error;
use crate::ident::{QualifiedName, validate_ident};
use crate::message::{Binding, Encoder, MessageConfig};
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
    /// `[message]`: the format of the messages (plain or CloudEvents).
    pub message: MessageConfig,
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
            message: MessageConfig::default(),
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
    /// How long relayed rows stay in the table for `replay` before the daemon deletes them.
    /// Under `[outbox]` because it is about the table's rows, whichever source reads them
    /// (was `poll.retention`). poll: published rows; `0s` deletes a row as soon as the broker
    /// confirmed it. wal: rows older than this are deleted, except those a repair of a lost
    /// slot may still need (`wal.repair_margin`); `0s` deletes nothing.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the daemon deletes rows past `retention` (wal: and forgets the publish
    /// attempts of events that are settled). A round deletes up to 10,000 rows; while rounds
    /// find that many, the next follows after three times the last one's length instead, so
    /// the cleanup keeps up with a busy outbox. With `retention` (was `poll.cleanup_interval`).
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            dead_letter_table: None,
            columns: ColumnsConfig::default(),
            retention: Duration::from_secs(24 * 3600),
            cleanup_interval: Duration::from_secs(60),
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

/// The polling publisher (`RELAY_SOURCE=poll`): only what no other part of the relay uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// Fallback poll when no NOTIFY arrives (NOTIFY wakes the relay at once); with
    /// `notify = false`, the only poll.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Wake on LISTEN/NOTIFY (a statement trigger that `migrate` installs). NOTIFY takes a
    /// database-wide lock at commit, which serialises the commits of busy writers; `false`
    /// makes `migrate` drop the trigger and the relay poll every `interval` instead.
    pub notify: bool,
    // Deprecated keys, read only to be moved to their new home by `Config::load` (see
    // `MOVED`), which leaves them `None`: nothing else may read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<usize>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    retention: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    cleanup_interval: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    standby_interval: Option<Duration>,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            notify: true,
            batch_size: None,
            retention: None,
            cleanup_interval: None,
            standby_interval: None,
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
    /// How long the stream may deliver nothing while the server's WAL moves and the
    /// walsender sends none of it before the relay reports a stall (log, `status`, metric,
    /// `/readyz`); `0s` turns the check off.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: std::time::Duration,
    /// Create the slot as a failover slot on Postgres 17+ (synced to standbys that set
    /// `sync_replication_slots = on`); older servers get an ordinary slot.
    pub failover_slot: bool,
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
            stall_timeout: std::time::Duration::from_secs(15),
            failover_slot: true,
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
    /// Most events read from the source and sent as one batch, by either source. Here, next to
    /// `max_in_flight`, because the two make the in-flight window: at most `max_in_flight ×
    /// batch_size` events are sent and not yet confirmed, which is also what a crash may send
    /// again (was `poll.batch_size`).
    pub batch_size: usize,
    /// How often a standby instance tries to become the active relay (either source: the
    /// advisory lock, plus the slot in wal mode). Here because, like `shutdown_timeout`, it
    /// decides when this instance delivers (was `poll.standby_interval`).
    #[serde(with = "humantime_serde")]
    pub standby_interval: Duration,
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
            batch_size: 1000,
            standby_interval: Duration::from_secs(1),
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

/// Settings that moved, `(old key, new key)`: the old key still works, with a warning, until
/// it is removed. [`Config::move_deprecated`] does the moving, one line per pair.
pub const MOVED: [(&str, &str); 4] = [
    ("poll.batch_size", "delivery.batch_size"),
    ("poll.standby_interval", "delivery.standby_interval"),
    ("poll.retention", "outbox.retention"),
    ("poll.cleanup_interval", "outbox.cleanup_interval"),
];

/// A deprecated key that was set: what start-up warns about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Deprecation {
    /// The old key, e.g. `poll.batch_size`.
    old: &'static str,
    /// The key that replaces it, e.g. `delivery.batch_size`.
    new: &'static str,
    /// Where the old key was set.
    origin: Origin,
}

/// Where a setting came from, to name it the way the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// `RELAY_<SECTION>__<KEY>`.
    Env,
    /// A TOML file (its path, when known).
    File(Option<std::path::PathBuf>),
}

impl Origin {
    fn of(settings: &Figment, key: &str) -> Self {
        match settings.find_metadata(key) {
            Some(m) if m.name.contains("environment variable") => Origin::Env,
            Some(m) => Origin::File(
                m.source
                    .as_ref()
                    .and_then(|s| s.file_path())
                    .map(Into::into),
            ),
            None => Origin::File(None),
        }
    }

    /// The key as the user wrote it: `RELAY_POLL__BATCH_SIZE` or `poll.batch_size`.
    fn name(&self, key: &str) -> String {
        match self {
            Origin::Env => format!("`{}`", env_name(key)),
            Origin::File(Some(path)) => format!("`{key}` (in {})", path.display()),
            Origin::File(None) => format!("`{key}`"),
        }
    }
}

/// The env variable of a key: `poll.batch_size` → `RELAY_POLL__BATCH_SIZE`.
fn env_name(key: &str) -> String {
    format!("RELAY_{}", key.replace('.', "__").to_ascii_uppercase())
}

impl std::fmt::Display for Deprecation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let old = self.origin.name(self.old);
        let removed = "is deprecated and will be removed in a future release";
        match self.origin {
            Origin::Env => write!(
                f,
                "{old} {removed}; set `{}` instead (`{}` moved to `{}`)",
                env_name(self.new),
                self.old,
                self.new
            ),
            Origin::File(_) => write!(f, "{old} {removed}; set `{}` instead", self.new),
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then the environment; validated.
    ///
    /// Each deprecated key that is set ([`MOVED`]) is logged here as one warning, so logging
    /// must be set up before (`main` does it first).
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        let mut settings = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file `{}` does not exist",
                    path.display()
                )));
            }
            settings = settings.merge(Toml::file_exact(path));
        }
        for (var, key) in FIXED_ENV {
            settings = settings.merge(Env::raw().only(&[var]).map(move |_| key.into()));
        }
        settings = settings.merge(
            Env::prefixed("RELAY_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let (config, deprecations) = Self::from_settings(&settings)?;
        // Before validating: a bad value under an old key is reported as its new key.
        for d in &deprecations {
            warn!(old_key = d.old, new_key = d.new, "{d}");
        }
        config.validate()?;
        Ok(config)
    }

    /// The defaults overridden by `settings` (what the user set: file and environment), with
    /// deprecated keys moved to their new home; not validated yet.
    fn from_settings(settings: &Figment) -> Result<(Self, Vec<Deprecation>), Error> {
        let mut config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(settings.clone())
            .extract()
            .map_err(|e| Error::Config(describe_figment(e)))?;
        let deprecations = config.move_deprecated(settings)?;
        Ok((config, deprecations))
    }

    /// Moves the value of each deprecated key that is set to its new field (see [`MOVED`]).
    fn move_deprecated(&mut self, settings: &Figment) -> Result<Vec<Deprecation>, Error> {
        let [batch_size, standby_interval, retention, cleanup_interval] = MOVED;
        let count = |n: &usize| n.to_string();
        let time = |d: &Duration| humantime::format_duration(*d).to_string();
        let p = &mut self.poll;
        let moved = [
            moved(
                settings,
                batch_size,
                &mut p.batch_size,
                &mut self.delivery.batch_size,
                count,
            )?,
            moved(
                settings,
                standby_interval,
                &mut p.standby_interval,
                &mut self.delivery.standby_interval,
                time,
            )?,
            moved(
                settings,
                retention,
                &mut p.retention,
                &mut self.outbox.retention,
                time,
            )?,
            moved(
                settings,
                cleanup_interval,
                &mut p.cleanup_interval,
                &mut self.outbox.cleanup_interval,
                time,
            )?,
        ];
        Ok(moved.into_iter().flatten().collect())
    }

    /// The outbox columns the configured sink's templates name besides the event's fields
    /// (`{tenant}`), each with the setting that names it: every reader selects them with the
    /// event, and the table must have them.
    pub fn template_columns(&self) -> Vec<(String, &'static str)> {
        match self.sink {
            SinkKind::Kafka => self.kafka.template_columns(),
            SinkKind::Rabbitmq => self.rabbitmq.template_columns(),
        }
    }

    /// How events become messages on `binding`: `[message]`, with the CloudEvents `source`
    /// derived from the database and the table unless `message.source` sets it.
    pub fn encoder(&self, binding: Binding) -> Encoder {
        let database = crate::pg::tls::PgTarget::parse(&self.database_url)
            .ok()
            .and_then(|t| t.config.get_dbname().map(str::to_string))
            .unwrap_or_else(|| "postgres".into());
        let (schema, table) = match QualifiedName::parse(&self.outbox.table) {
            Ok(q) => (q.schema_or_public().to_string(), q.name.clone()),
            Err(_) => ("public".into(), self.outbox.table.clone()),
        };
        let source = self.message.source_for(&database, &schema, &table);
        Encoder::new(&self.message, source, binding)
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
        if self.delivery.batch_size == 0 || self.delivery.batch_size > 100_000 {
            return bad(format!(
                "delivery.batch_size = {} is out of range; use 1..=100000",
                self.delivery.batch_size
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
        self.message.validate().map_err(Error::Config)?;
        for (column, setting) in self.template_columns() {
            validate_ident(&column)
                .map_err(|e| Error::Config(format!("{setting}: placeholder {{{column}}}: {e}")))?;
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

/// Takes the value of the deprecated key `old` (if set) into the field of its new key `new`.
/// Both set to different values is an error: which one should win is the user's call.
fn moved<T: PartialEq>(
    settings: &Figment,
    (old, new): (&'static str, &'static str),
    old_value: &mut Option<T>,
    new_value: &mut T,
    show: impl Fn(&T) -> String,
) -> Result<Option<Deprecation>, Error> {
    let Some(value) = old_value.take() else {
        return Ok(None);
    };
    let origin = Origin::of(settings, old);
    if settings.contains(new) && *new_value != value {
        return Err(Error::Config(format!(
            "{} = {} and {} = {} are both set and differ; `{old}` is the deprecated name of \
             `{new}`: remove it and keep only `{new}`",
            origin.name(old),
            show(&value),
            Origin::of(settings, new).name(new),
            show(new_value),
        )));
    }
    *new_value = value;
    Ok(Some(Deprecation { old, new, origin }))
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
                Kind::UnknownField(field, expected) => {
                    // A moved key is still accepted, but the hint points to its new home.
                    let section = e.path[..e.path.len().saturating_sub(1)].join(".");
                    let expected: Vec<String> = expected
                        .iter()
                        .map(|f| {
                            let full = format!("{section}.{f}");
                            match MOVED.iter().find(|(old, _)| *old == full) {
                                Some((_, new)) => format!("{f} (moved to `{new}`)"),
                                None => f.to_string(),
                            }
                        })
                        .collect();
                    format!(
                        "unknown key `{key}`{origin}; `{field}` is not one of: {}",
                        expected.join(", ")
                    )
                }
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
    fn a_placeholder_must_be_a_column_name() {
        let mut c = Config {
            database_url: Secret::new("postgres://postgres@127.0.0.1/app"),
            ..Config::default()
        };
        // Any column may be named; whether the table has it is checked when it is inspected.
        c.kafka.topic = "x.{tenant}".into();
        c.validate().unwrap();
        assert_eq!(
            c.template_columns(),
            [("tenant".to_string(), "kafka.topic")]
        );
        c.kafka.topic = "x.{aggregate type}".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("kafka.topic"), "{err}");
        assert!(err.contains("{aggregate type}"), "{err}");
        c.kafka.topic = "x.{partition}".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("rabbitmq.partitions"), "{err}");
    }

    /// What the user set, as a TOML file would give it (the env provider is covered by
    /// `tests/config_errors.rs`, which runs the binary).
    fn load_toml(toml: &str) -> Result<(Config, Vec<Deprecation>), Error> {
        let toml = format!("database_url = \"postgres://postgres@127.0.0.1/app\"\n{toml}");
        let (config, deprecations) = Config::from_settings(&Figment::from(Toml::string(&toml)))?;
        config.validate()?;
        Ok((config, deprecations))
    }

    #[test]
    fn moved_settings_are_read_from_their_new_keys_without_warning() {
        let (c, deprecations) = load_toml(
            "[delivery]\nbatch_size = 50\nstandby_interval = \"250ms\"\n\
             [outbox]\nretention = \"2m\"\ncleanup_interval = \"10s\"\n",
        )
        .unwrap();
        assert_eq!(deprecations, vec![]);
        assert_eq!(c.delivery.batch_size, 50);
        assert_eq!(c.delivery.standby_interval, Duration::from_millis(250));
        assert_eq!(c.outbox.retention, Duration::from_secs(120));
        assert_eq!(c.outbox.cleanup_interval, Duration::from_secs(10));
    }

    #[test]
    fn old_poll_keys_still_set_the_new_fields_with_one_deprecation_each() {
        let (c, deprecations) = load_toml(
            "[poll]\nbatch_size = 50\nstandby_interval = \"250ms\"\nretention = \"2m\"\n\
             cleanup_interval = \"10s\"\n",
        )
        .unwrap();
        assert_eq!(c.delivery.batch_size, 50);
        assert_eq!(c.delivery.standby_interval, Duration::from_millis(250));
        assert_eq!(c.outbox.retention, Duration::from_secs(120));
        assert_eq!(c.outbox.cleanup_interval, Duration::from_secs(10));
        let pairs: Vec<_> = deprecations.iter().map(|d| (d.old, d.new)).collect();
        assert_eq!(pairs, MOVED.to_vec());
        let warning = deprecations[0].to_string();
        for fragment in [
            "`poll.batch_size`",
            "`delivery.batch_size`",
            "will be removed",
        ] {
            assert!(
                warning.contains(fragment),
                "`{fragment}` missing from: {warning}"
            );
        }
    }

    #[test]
    fn old_keys_are_moved_out_so_a_config_dump_shows_only_the_new_ones() {
        let (c, _) = load_toml("[poll]\nbatch_size = 50\nretention = \"2m\"\n").unwrap();
        let dump = serde_json::to_value(&c).unwrap();
        assert_eq!(
            dump["poll"],
            serde_json::json!({"interval": "1s", "notify": true}),
            "{dump}"
        );
        assert_eq!(dump["delivery"]["batch_size"], 50, "{dump}");
        assert_eq!(dump["outbox"]["retention"], "2m", "{dump}");
    }

    #[test]
    fn an_old_key_and_its_new_key_set_to_different_values_is_an_error_naming_both() {
        let err = load_toml("[poll]\nbatch_size = 50\n[delivery]\nbatch_size = 60\n")
            .unwrap_err()
            .to_string();
        for fragment in [
            "`poll.batch_size` = 50",
            "`delivery.batch_size` = 60",
            "remove it",
        ] {
            assert!(err.contains(fragment), "`{fragment}` missing from: {err}");
        }
        let err = load_toml("[poll]\nretention = \"1h\"\n[outbox]\nretention = \"2h\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`poll.retention` = 1h"), "{err}");
        assert!(err.contains("`outbox.retention` = 2h"), "{err}");
    }

    #[test]
    fn an_old_key_and_its_new_key_set_to_the_same_value_only_warn() {
        let (c, deprecations) = load_toml(
            "[poll]\nstandby_interval = \"1000ms\"\n[delivery]\nstandby_interval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.delivery.standby_interval, Duration::from_secs(1));
        assert_eq!(deprecations.len(), 1);
    }

    #[test]
    fn a_deprecated_key_from_the_environment_is_named_by_its_variable() {
        let d = Deprecation {
            old: "poll.batch_size",
            new: "delivery.batch_size",
            origin: Origin::Env,
        };
        let warning = d.to_string();
        assert!(
            warning.starts_with("`RELAY_POLL__BATCH_SIZE` is deprecated and will be removed"),
            "{warning}"
        );
        assert!(
            warning.contains("set `RELAY_DELIVERY__BATCH_SIZE` instead"),
            "{warning}"
        );
    }

    #[test]
    fn unknown_keys_in_the_poll_section_are_still_errors() {
        let err = load_toml("[poll]\nbatchsize = 50\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `poll.batchsize`"), "{err}");
        // The hint still lists the old key, but as what it is now.
        assert!(
            err.contains("batch_size (moved to `delivery.batch_size`)"),
            "{err}"
        );
    }

    #[test]
    fn an_out_of_range_batch_size_is_reported_under_its_new_key() {
        let err = load_toml("[poll]\nbatch_size = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.batch_size = 0 is out of range"),
            "{err}"
        );
    }
}
