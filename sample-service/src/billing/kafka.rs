//! Kafka consumption: a consumer group on wallet's topic, offsets committed only after the
//! message's transaction committed (`enable.auto.commit=false`).
//!
//! Messages are handled one at a time, in partition order (the key is the wallet id, so a
//! wallet's events are in order). The topic may not exist yet when billing starts (the relay
//! creates it on first publish): the short metadata refresh picks it up within seconds.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};
use tokio_util::sync::CancellationToken;

use super::{Config, Ledger, Source, process};

/// Logs librdkafka's client errors, except the expected one before the relay has created the
/// topic.
struct Logging;

impl ClientContext for Logging {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
            tracing::debug!(%reason, "topic not created yet; waiting for the relay's first event");
        } else {
            tracing::warn!(%error, %reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for Logging {}

pub(super) async fn consume(
    config: &Config,
    ledger: &Ledger,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer<Logging> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", &config.kafka_group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create_with_context(Logging)
        .context("cannot create the Kafka consumer; check BILLING_KAFKA_BROKERS")?;
    consumer
        .subscribe(&[&config.kafka_topic])
        .with_context(|| format!("cannot subscribe to {}", config.kafka_topic))?;
    tracing::info!(
        brokers = %config.kafka_brokers,
        topic = %config.kafka_topic,
        group = %config.kafka_group,
        "billing consuming from Kafka"
    );
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                // Broker down, topic not created yet, rebalance: librdkafka recovers.
                tracing::debug!(error = %e, "Kafka consumer error");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let decoded = outbox_client::incoming::kafka::incoming_event(&message);
        let source = Source {
            system: "kafka",
            destination: message.topic(),
        };
        if !process(ledger, decoded, source, shutdown).await {
            return Ok(());
        }
        if let Err(e) = consumer.commit_message(&message, CommitMode::Async) {
            // The event is handled; after a restart it is redelivered and skipped as a duplicate.
            tracing::warn!(error = %e, "cannot commit the Kafka offset");
        }
    }
}
