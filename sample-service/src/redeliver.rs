//! Sends one outbox event to the broker again, straight from the outbox table, exactly as the
//! relay formats it: a duplicate delivery on demand, as after a relay crash between the
//! broker's confirmation and the relay's bookkeeping. The demo and the tests use it to show
//! that billing skips redelivered events.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{Connection as _, PgConnection, Row};
use uuid::Uuid;

/// Where to send the duplicate.
#[derive(Debug, Clone)]
pub enum Target {
    /// `topic` may contain `{aggregate_type}`, like the relay's template.
    Kafka { brokers: String, topic: String },
    /// Routing key `{aggregate_type}.{event_type}`, like the relay's default.
    Rabbitmq { url: String, exchange: String },
}

/// An outbox row in message form.
struct Message {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    body: Vec<u8>,
    headers: BTreeMap<String, String>,
}

async fn load(database_url: &str, table: &str, id: Uuid) -> anyhow::Result<Message> {
    let table = outbox_client::TableName::parse(table)?;
    let mut conn = PgConnection::connect(database_url).await?;
    let row = sqlx::query(&format!(
        "SELECT aggregate_type, aggregate_id, event_type, payload::text AS payload, \
         headers, traceparent, tracestate FROM {table} WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut conn)
    .await?
    .with_context(|| format!("event {id} is not in the outbox table {table}"))?;
    let mut headers: BTreeMap<String, String> = row
        .get::<Option<serde_json::Value>, _>("headers")
        .and_then(|h| serde_json::from_value(h).ok())
        .unwrap_or_default();
    let message = Message {
        aggregate_type: row.get("aggregate_type"),
        aggregate_id: row.get("aggregate_id"),
        event_type: row.get("event_type"),
        body: row.get::<String, _>("payload").into_bytes(),
        headers: BTreeMap::new(),
    };
    headers.insert("id".into(), id.to_string());
    headers.insert("event_type".into(), message.event_type.clone());
    headers.insert("aggregate_type".into(), message.aggregate_type.clone());
    headers.insert("aggregate_id".into(), message.aggregate_id.clone());
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = row.get::<Option<String>, _>(name) {
            headers.insert(name.into(), v);
        }
    }
    Ok(Message { headers, ..message })
}

/// Publishes the outbox row `id` of `table` to `target` and waits for the broker's
/// confirmation.
pub async fn redeliver(
    database_url: &str,
    table: &str,
    id: Uuid,
    target: &Target,
) -> anyhow::Result<()> {
    let m = load(database_url, table, id).await?;
    match target {
        Target::Kafka { brokers, topic } => {
            let topic = topic.replace("{aggregate_type}", &m.aggregate_type);
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("acks", "all")
                .set("message.timeout.ms", "15000")
                // The relay's partitioner (Kafka's murmur2): the copy must land on the
                // partition of its wallet's other events, behind them and before later ones.
                // librdkafka's default (CRC32) would put it on another partition, out of order.
                .set("partitioner", "murmur2_random")
                .create()?;
            let mut headers = OwnedHeaders::new();
            for (key, value) in &m.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&topic)
                .key(&m.aggregate_id)
                .payload(&m.body)
                .headers(headers);
            producer
                .send(record, Duration::from_secs(15))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("Kafka refused the duplicate: {e}"))?;
        }
        Target::Rabbitmq { url, exchange } => {
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let mut table = FieldTable::default();
            for (key, value) in &m.headers {
                table.insert(
                    ShortString::from(key.clone()),
                    AMQPValue::LongString(value.clone().into()),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_type(m.event_type.clone().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(table);
            let routing_key = format!("{}.{}", m.aggregate_type, m.event_type);
            let confirmation = channel
                .basic_publish(
                    exchange,
                    &routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    properties,
                )
                .await?
                .await?;
            match confirmation {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("RabbitMQ did not accept the duplicate: {other:?}"),
            }
            let _ = conn.close(200, "done").await;
        }
    }
    Ok(())
}
