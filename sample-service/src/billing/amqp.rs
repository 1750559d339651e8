//! RabbitMQ consumption: billing's own durable queue bound to the relay's topic exchange,
//! manual acknowledgements after the message's transaction committed.
//!
//! A lost connection is re-established with backoff; unacknowledged messages are redelivered
//! by RabbitMQ (<https://www.rabbitmq.com/docs/confirms#consumer-acknowledgements>) and skipped
//! by the ledger when they were already handled.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio_util::sync::CancellationToken;

use super::{Config, Ledger, Source, process};

async fn open(config: &Config) -> lapin::Result<(Connection, Consumer)> {
    let conn = Connection::connect(&config.amqp_url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    channel
        .exchange_declare(
            &config.amqp_exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            &config.amqp_queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            &config.amqp_queue,
            &config.amqp_exchange,
            &config.amqp_binding,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            &config.amqp_queue,
            "billing",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer))
}

pub(super) async fn consume(
    config: &Config,
    ledger: &Ledger,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (conn, mut consumer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            opened = open(config) => match opened {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        url = %crate::env::redact(&config.amqp_url),
                        retry_in = ?backoff,
                        "cannot consume from RabbitMQ; check BILLING_AMQP_URL"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(200);
        tracing::info!(
            exchange = %config.amqp_exchange,
            queue = %config.amqp_queue,
            binding = %config.amqp_binding,
            "billing consuming from RabbitMQ"
        );
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "billing stopping").await;
                    return Ok(());
                }
                d = consumer.next() => d,
            };
            let delivery = match delivery {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "RabbitMQ connection lost; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("RabbitMQ consumer cancelled; reconnecting");
                    break;
                }
            };
            let decoded =
                outbox_client::incoming::amqp::incoming_event(&delivery.properties, &delivery.data);
            let source = Source {
                system: "rabbitmq",
                destination: delivery.routing_key.as_str(),
            };
            if !process(ledger, decoded, source, shutdown).await {
                return Ok(());
            }
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                tracing::warn!(error = %e, "cannot acknowledge; the message will be redelivered and skipped");
            }
        }
    }
}
