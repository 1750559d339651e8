//! The billing service: consumes wallet's events from Kafka or RabbitMQ and charges each
//! purchased plan to the card on file, exactly once, in its own database ([`ledger`]).
//!
//! A message is acknowledged (Kafka offset committed, AMQP `basic.ack`) only after its
//! transaction committed, so a crash means a redelivery, which the ledger recognises. A database
//! outage stops consumption and retries the same message with backoff; nothing is skipped.

mod amqp;
mod kafka;
pub mod ledger;

use std::time::Duration;

use anyhow::Context as _;
use outbox_client::IncomingEvent;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use ledger::{Ledger, Outcome, RetryPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Kafka,
    Rabbitmq,
}

/// Env-only configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `BILLING_DATABASE_URL` (or `DATABASE_URL`): billing's own Postgres database.
    pub database_url: String,
    /// `BILLING_BROKER`: `kafka` (default) or `rabbitmq`.
    pub broker: Broker,
    /// `BILLING_KAFKA_BROKERS` (or `RELAY_KAFKA_BROKERS`), default `127.0.0.1:9092`.
    pub kafka_brokers: String,
    /// `BILLING_KAFKA_TOPIC`, default `outbox.event.wallet`.
    pub kafka_topic: String,
    /// `BILLING_KAFKA_GROUP`, default `billing`.
    pub kafka_group: String,
    /// `BILLING_AMQP_URL` (or `RELAY_AMQP_URL`), default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp_url: String,
    /// `BILLING_AMQP_EXCHANGE`, default `outbox`.
    pub amqp_exchange: String,
    /// `BILLING_AMQP_QUEUE`: billing's durable queue, default `billing.wallet-events`.
    pub amqp_queue: String,
    /// `BILLING_AMQP_BINDING`, default `wallet.*`.
    pub amqp_binding: String,
    /// `BILLING_RETRY_BACKOFF` (default `1s`), `BILLING_RETRY_MAX_BACKOFF` (`60s`),
    /// `BILLING_RETRY_LIMIT` (`8`): a plan waiting for its card.
    pub retry: RetryPolicy,
    /// `BILLING_RETRY_INTERVAL`: how often due retries are looked for, default `500ms`.
    pub retry_interval: Duration,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        use crate::env::{duration, first_of, parsed, string};
        let broker = match string("BILLING_BROKER", "kafka")
            .to_ascii_lowercase()
            .as_str()
        {
            "kafka" => Broker::Kafka,
            "rabbitmq" | "amqp" => Broker::Rabbitmq,
            other => anyhow::bail!("BILLING_BROKER={other:?} is invalid: use kafka or rabbitmq"),
        };
        let defaults = RetryPolicy::default();
        Ok(Self {
            database_url: first_of(&["BILLING_DATABASE_URL", "DATABASE_URL"]).ok_or_else(|| {
                anyhow::anyhow!(
                    "BILLING_DATABASE_URL is not set: point it at billing's own Postgres database"
                )
            })?,
            broker,
            kafka_brokers: first_of(&["BILLING_KAFKA_BROKERS", "RELAY_KAFKA_BROKERS"])
                .unwrap_or_else(|| "127.0.0.1:9092".into()),
            kafka_topic: string("BILLING_KAFKA_TOPIC", "outbox.event.wallet"),
            kafka_group: string("BILLING_KAFKA_GROUP", "billing"),
            amqp_url: first_of(&["BILLING_AMQP_URL", "RELAY_AMQP_URL"])
                .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            amqp_exchange: string("BILLING_AMQP_EXCHANGE", "outbox"),
            amqp_queue: string("BILLING_AMQP_QUEUE", "billing.wallet-events"),
            amqp_binding: string("BILLING_AMQP_BINDING", "wallet.*"),
            retry: RetryPolicy {
                backoff: duration("BILLING_RETRY_BACKOFF", defaults.backoff)?,
                max_backoff: duration("BILLING_RETRY_MAX_BACKOFF", defaults.max_backoff)?,
                limit: parsed("BILLING_RETRY_LIMIT", defaults.limit)?,
            },
            retry_interval: duration("BILLING_RETRY_INTERVAL", Duration::from_millis(500))?,
        })
    }
}

/// Consumes until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to billing's database {}; check BILLING_DATABASE_URL",
                crate::env::redact(&config.database_url)
            )
        })?;
    let ledger = Ledger::open(pool, config.retry)
        .await
        .context("cannot create billing's tables")?;
    let retries = tokio::spawn(retry_loop(
        ledger.clone(),
        config.retry_interval,
        shutdown.clone(),
    ));
    let consumed = match config.broker {
        Broker::Kafka => kafka::consume(&config, &ledger, &shutdown).await,
        Broker::Rabbitmq => amqp::consume(&config, &ledger, &shutdown).await,
    };
    shutdown.cancel();
    let _ = retries.await;
    consumed
}

async fn retry_loop(ledger: Ledger, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = ledger.retry_due().await {
            tracing::warn!(error = %e, "retrying waiting purchases failed; trying again");
        }
    }
}

/// Where a message came from, for the consumer span's attributes.
pub(crate) struct Source<'a> {
    pub system: &'static str,
    pub destination: &'a str,
}

/// Handles one decoded message until its outcome is durable: transient database errors are
/// retried with backoff (the message stays unacknowledged), a malformed event is dead-lettered.
/// Returns `false` only when `shutdown` interrupted the retries: do not acknowledge then.
pub(crate) async fn process(
    ledger: &Ledger,
    decoded: Result<IncomingEvent, outbox_client::Error>,
    source: Source<'_>,
    shutdown: &CancellationToken,
) -> bool {
    let event = match decoded {
        Ok(event) => event,
        Err(e) => {
            // Not an outbox event at all (no id): nothing to deduplicate on or store under.
            tracing::error!(error = %e, destination = source.destination, "dropping a message that is not an outbox event");
            return true;
        }
    };
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("{} process", source.destination),
        otel.kind = "consumer",
        messaging.system = source.system,
        messaging.destination.name = source.destination,
        messaging.message.id = %event.id,
        event.r#type = %event.event_type,
        wallet = %event.aggregate_id,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(event.trace_context());
    if let Some(trace_id) = event.trace_headers().trace_id() {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    async {
        let mut delay = Duration::from_millis(100);
        loop {
            match ledger.handle(&event).await {
                Ok(outcome) => {
                    match &outcome {
                        Outcome::Duplicate => {
                            tracing::info!("duplicate delivery skipped (already processed)")
                        }
                        Outcome::WaitingForCard { purchase_id } => tracing::info!(
                            purchase = %purchase_id,
                            "no card on file yet: purchase waits for the card (retried with backoff)"
                        ),
                        Outcome::CardStored { charged } => {
                            tracing::info!(charged_waiting = charged, "card on file")
                        }
                        Outcome::Charged { .. } | Outcome::Ignored => {}
                    }
                    return true;
                }
                Err(e) if e.is_permanent() => {
                    tracing::error!(error = %e, "event dead-lettered");
                    match ledger.dead_letter(&event, &e.to_string()).await {
                        Ok(()) => return true,
                        Err(e) => tracing::warn!(error = %e, "cannot store the dead letter"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "handling failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
    .instrument(span)
    .await
}
