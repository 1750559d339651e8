//! A plain AMQP consumer on a durable queue of its own, bound to the scenario's exchange.
//! It acks after recording each message and reconnects when the broker goes away, so nothing
//! the broker accepted escapes the count (redeliveries show up as duplicates).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use super::{AMQP_URL, AmqpProps, Received};

pub struct Reader {
    pub exchange: String,
    pub queue: String,
    binding: String,
    url: String,
    /// A quorum queue (replicated over a cluster's nodes) rather than a classic one.
    quorum: bool,
    /// The reader declares and binds its queue (else it only consumes one declared for it).
    declares: bool,
    link: Option<(Connection, Channel, Consumer)>,
    seen: Vec<Received>,
}

async fn open(r: &Reader) -> lapin::Result<(Connection, Channel, Consumer)> {
    let (exchange, queue, binding) = (&r.exchange, &r.queue, &r.binding);
    let conn = Connection::connect(&r.url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    if r.declares {
        declare_exchange(&ch, exchange).await?;
        let mut args = FieldTable::default();
        if r.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        ch.queue_declare(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
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
    }
    let consumer = ch
        .basic_consume(
            queue,
            "reader",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, ch, consumer))
}

/// The scenario's exchange, declared as the relay declares it (durable topic).
pub async fn declare_exchange(ch: &Channel, exchange: &str) -> lapin::Result<()> {
    ch.exchange_declare(
        exchange,
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

impl Reader {
    pub async fn bind(exchange: &str, binding: &str) -> Self {
        Self::bind_on(AMQP_URL, exchange, binding, false)
            .await
            .expect("RabbitMQ reachable at 127.0.0.1:5672; run scripts/services")
    }

    /// A reader of `queue`, which someone else (a consumer helper under test) declared and
    /// bound: the reader only consumes it, so a wrong binding shows.
    pub async fn on_queue(exchange: &str, queue: &str) -> Self {
        let mut r = Self {
            exchange: exchange.into(),
            queue: queue.into(),
            binding: String::new(),
            url: AMQP_URL.into(),
            quorum: false,
            declares: false,
            link: None,
            seen: vec![],
        };
        r.link = Some(
            open(&r)
                .await
                .expect("RabbitMQ reachable at 127.0.0.1:5672; run scripts/services"),
        );
        r
    }

    /// A reader on the node at `url`, its queue a quorum queue when `quorum`.
    pub async fn bind_on(
        url: &str,
        exchange: &str,
        binding: &str,
        quorum: bool,
    ) -> lapin::Result<Self> {
        let mut r = Self {
            exchange: exchange.into(),
            queue: super::unique("q"),
            binding: binding.into(),
            url: url.into(),
            quorum,
            declares: true,
            link: None,
            seen: vec![],
        };
        r.link = Some(open(&r).await?);
        Ok(r)
    }

    pub async fn read_until(&mut self, want: &HashSet<&str>, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut remaining = super::remaining(want, &self.seen);
        loop {
            if remaining.is_empty() || Instant::now() >= deadline {
                return self.seen.clone();
            }
            let Some((_, _, consumer)) = self.link.as_mut() else {
                match open(self).await {
                    Ok(link) => self.link = Some(link),
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
                continue;
            };
            match tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
                Err(_) => {}
                Ok(Some(Ok(d))) => {
                    let p = &d.properties;
                    let headers = p
                        .headers()
                        .as_ref()
                        .map(|t| {
                            t.inner()
                                .iter()
                                .map(|(k, v)| (k.to_string(), text(v)))
                                .collect()
                        })
                        .unwrap_or_else(BTreeMap::new);
                    let received = Received {
                        key: None,
                        destination: d.routing_key.to_string(),
                        headers,
                        payload: serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
                        body: Some(d.data.clone()),
                        partition: None,
                        amqp: Some(AmqpProps {
                            message_id: p.message_id().as_ref().map(|s| s.to_string()),
                            kind: p.kind().as_ref().map(|s| s.to_string()),
                            content_type: p.content_type().as_ref().map(|s| s.to_string()),
                            delivery_mode: *p.delivery_mode(),
                            timestamp: *p.timestamp(),
                        }),
                        redelivered: d.redelivered,
                    };
                    remaining.remove(received.id());
                    self.seen.push(received);
                    let _ = d.ack(BasicAckOptions::default()).await;
                }
                Ok(_) => {
                    // Consumer ended: the broker went away. Reconnect.
                    self.link = None;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let queue = self.queue.clone();
        let exchange = self.exchange.clone();
        // Best effort: delete the queue and the exchange of this test.
        if let Some((_, ch, _)) = self.link.take() {
            let _ = std::thread::spawn(move || {
                futures::executor::block_on(async move {
                    let _ = ch.queue_delete(&queue, QueueDeleteOptions::default()).await;
                    let _ = ch.exchange_delete(&exchange, Default::default()).await;
                })
            })
            .join();
        }
    }
}

/// A durable queue bound to `binding` on `exchange` that refuses every message routed to it
/// (`x-max-length = 0`, `x-overflow = reject-publish`): the broker nacks each such publish.
pub struct RefusingQueue {
    channel: Channel,
    _conn: Connection,
    pub name: String,
}

impl RefusingQueue {
    pub async fn declare(exchange: &str, binding: &str) -> Self {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable at 127.0.0.1:5672; run scripts/services");
        let channel = conn.create_channel().await.unwrap();
        declare_exchange(&channel, exchange).await.unwrap();
        let name = super::unique("refusing");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare(
                &name,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                &name,
                exchange,
                binding,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            channel,
            _conn: conn,
            name,
        }
    }

    /// Deletes the queue: what was refused is accepted from then on.
    pub async fn delete(self) {
        self.channel
            .queue_delete(&self.name, QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}
