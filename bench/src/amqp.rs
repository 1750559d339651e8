//! RabbitMQ side: the exchange and a durable queue bound to it (declared before anything is
//! published: the relay publishes `mandatory`, so an unbound exchange would dead-letter the
//! events), the plain-publisher ceiling with the relay's settings, and a consumer that counts.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

use crate::ctx::Seen;
use crate::pg::now_us;
use crate::pg::{self, AGGREGATE_TYPE, EVENT_TYPE, TRACEPARENT};

/// Publisher confirms outstanding at once in the ceiling run.
const IN_FLIGHT: usize = 5_000;

pub async fn connect(url: &str) -> Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url}; run scripts/services"))?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// The durable topic exchange and a durable queue bound to it with `binding` (`#`: everything).
pub async fn declare(url: &str, exchange: &str, queue: &str, binding: &str) -> Result<()> {
    let (conn, ch) = connect(url).await?;
    ch.exchange_declare(
        exchange,
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        queue,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue,
        exchange,
        binding,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = conn.close(200, "bye").await;
    Ok(())
}

/// A durable queue that takes nothing (`x-max-length = 0`, `x-overflow = reject-publish`),
/// bound to the existing `exchange` with `binding`: RabbitMQ nacks every publish routed to it,
/// a transient failure for the relay, for as long as the queue exists.
/// <https://www.rabbitmq.com/docs/maxlength#overflow-behaviour>
pub async fn declare_refusing_queue(
    url: &str,
    exchange: &str,
    queue: &str,
    binding: &str,
) -> Result<()> {
    let (conn, ch) = connect(url).await?;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(0));
    args.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        queue,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .with_context(|| format!("cannot declare the refusing queue {queue}"))?;
    ch.queue_bind(
        queue,
        exchange,
        binding,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = conn.close(200, "bye").await;
    Ok(())
}

/// Best effort clean-up of one queue.
pub async fn delete_queue(url: &str, queue: &str) {
    if let Ok((conn, ch)) = connect(url).await {
        let _ = ch.queue_delete(queue, QueueDeleteOptions::default()).await;
        let _ = conn.close(200, "bye").await;
    }
}

/// Best effort clean-up.
pub async fn delete(url: &str, exchange: &str, queue: &str) {
    if let Ok((conn, ch)) = connect(url).await {
        let _ = ch.queue_delete(queue, QueueDeleteOptions::default()).await;
        let _ = ch.exchange_delete(exchange, Default::default()).await;
        let _ = conn.close(200, "bye").await;
    }
}

fn properties(id: &str, agg: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("id", id),
        ("event_type", EVENT_TYPE),
        ("aggregate_type", AGGREGATE_TYPE),
        ("aggregate_id", agg),
        ("traceparent", TRACEPARENT),
    ] {
        headers.insert(ShortString::from(k), AMQPValue::LongString(v.into()));
    }
    BasicProperties::default()
        .with_message_id(id.into())
        .with_type(EVENT_TYPE.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp((now_us() / 1_000_000) as u64)
        .with_headers(headers)
}

/// Plain publisher with the relay's settings (publisher confirms, `mandatory`, persistent, one
/// channel, many confirms outstanding): `n` messages to `exchange`, whose queue must be bound.
/// Returns the time from the first publish to the last `ack`.
pub async fn publisher_ceiling(
    url: &str,
    exchange: &str,
    n: u64,
    aggregates: u64,
) -> Result<Duration> {
    let (conn, ch) = connect(url).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(IN_FLIGHT);
    let settle = |c: Confirmation| -> Result<()> {
        match c {
            Confirmation::Ack(None) => Ok(()),
            other => bail!("RabbitMQ did not ack a publish: {other:?}"),
        }
    };
    for i in 0..n {
        let agg = pg::aggregate_id(i % aggregates);
        let id = Uuid::new_v4().to_string();
        let body = pg::payload(&agg, i / aggregates, Some(now_us()));
        let confirm = ch
            .basic_publish(
                exchange,
                &format!("{AGGREGATE_TYPE}.{EVENT_TYPE}"),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body.as_bytes(),
                properties(&id, &agg),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= IN_FLIGHT
            && let Some(c) = pending.pop_front()
        {
            settle(c.await?)?;
        }
    }
    for c in pending {
        settle(c.await?)?;
    }
    let elapsed = started.elapsed();
    let _ = conn.close(200, "bye").await;
    Ok(elapsed)
}

/// A consumer (no-ack, large prefetch) of `queue` that runs until it has seen `target` (which may
/// change while it runs) distinct event ids written at or after `since_us` (`t_us`), `stop` is set, or `deadline`
/// passes.
pub async fn spawn_consumer(
    url: &str,
    queue: &str,
    target: Arc<AtomicUsize>,
    since_us: i64,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<Result<Vec<Seen>>>> {
    let (conn, ch) = connect(url).await?;
    ch.basic_qos(5_000, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue,
            "relay-bench",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut distinct: HashSet<u128> = HashSet::new();
        while distinct.len() < target.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && !stop.load(Ordering::Relaxed)
        {
            let next = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
            let delivery = match next {
                Err(_) => continue,
                Ok(None) => bail!("the RabbitMQ consumer was cancelled"),
                Ok(Some(d)) => d?,
            };
            let recv_us = now_us();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| Uuid::parse_str(m.as_str()).ok());
            let Some(id) = id else { continue };
            let t_us = pg::payload_t_us(&delivery.data);
            if t_us.is_some_and(|t| t < since_us) {
                continue; // written before this measurement
            }
            let id = id.as_u128();
            distinct.insert(id);
            seen.push(Seen {
                id,
                recv_us,
                t_us,
                order: pg::payload_order(&delivery.data),
                bytes: delivery.data.len(),
            });
        }
        let _ = conn.close(200, "bye").await;
        Ok(seen)
    }))
}
