//! Sinks: where events go. One file per broker.
//!
//! The contract every sink keeps (and the pipeline relies on):
//! - `publish` returns one result per event, in the order given, and returns only after every
//!   event has been confirmed by the broker or has definitely failed. `Ok` means the broker has
//!   the message durably (Kafka: delivery report with `acks=all`; RabbitMQ: publisher-confirm
//!   `ack` with no `basic.return`). Nothing else counts as success.
//! - Events of one aggregate are handed to the broker in the order given, so they reach it in
//!   that order as long as they succeed; the pipeline re-sends everything of an aggregate behind
//!   a failure, so duplicates are possible and loss is not.
//! - A lost connection is not an error of the sink's lifetime: the next `publish` reconnects.

pub mod amqp;
pub mod kafka;

use crate::config::{Config, SinkKind};
use crate::error::{Error, PublishError};
use crate::event::OutboxEvent;

/// A broker the relay publishes to. See the module docs for the contract.
pub trait Sink: Send {
    /// Publishes `events` and waits for every confirmation; result `i` is for `events[i]`.
    fn publish(
        &mut self,
        events: &[&OutboxEvent],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send;

    /// Short name of the destination system, for logs and metrics (`kafka`, `rabbitmq`).
    fn system(&self) -> &'static str;
}

/// The configured sink, chosen at run time.
pub enum AnySink {
    Kafka(kafka::KafkaSink),
    Rabbitmq(amqp::AmqpSink),
}

impl AnySink {
    /// Connects and checks the broker; an unreachable broker or refused credentials is an error
    /// here, at start-up, with a message that says what to fix.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        Ok(match config.sink {
            SinkKind::Kafka => AnySink::Kafka(kafka::KafkaSink::connect(&config.kafka).await?),
            SinkKind::Rabbitmq => {
                AnySink::Rabbitmq(amqp::AmqpSink::connect(&config.rabbitmq).await?)
            }
        })
    }
}

impl Sink for AnySink {
    async fn publish(&mut self, events: &[&OutboxEvent]) -> Vec<Result<(), PublishError>> {
        match self {
            AnySink::Kafka(s) => s.publish(events).await,
            AnySink::Rabbitmq(s) => s.publish(events).await,
        }
    }

    fn system(&self) -> &'static str {
        match self {
            AnySink::Kafka(s) => s.system(),
            AnySink::Rabbitmq(s) => s.system(),
        }
    }
}

/// A cheap reachability check of the configured broker, on a client of its own (for
/// `/readyz`; the sink's own connection may be idle or busy).
pub enum BrokerProbe {
    Kafka(rdkafka::producer::FutureProducer),
    Rabbitmq(crate::config::Secret),
    Unavailable(String),
}

impl BrokerProbe {
    pub fn new(config: &Config) -> Self {
        match config.sink {
            SinkKind::Kafka => match kafka::client_config(&config.kafka).create() {
                Ok(producer) => BrokerProbe::Kafka(producer),
                Err(e) => BrokerProbe::Unavailable(format!("cannot create a Kafka client: {e}")),
            },
            SinkKind::Rabbitmq => BrokerProbe::Rabbitmq(config.rabbitmq.url.clone()),
        }
    }

    pub async fn check(&self) -> Result<(), String> {
        let timeout = std::time::Duration::from_secs(3);
        match self {
            BrokerProbe::Kafka(producer) => {
                use rdkafka::producer::Producer;
                let producer = producer.clone();
                tokio::task::spawn_blocking(move || {
                    producer
                        .client()
                        .fetch_metadata(None, timeout)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
            BrokerProbe::Rabbitmq(url) => {
                let connect = lapin::Connection::connect(
                    url.expose(),
                    lapin::ConnectionProperties::default(),
                );
                match tokio::time::timeout(timeout, connect).await {
                    Ok(Ok(conn)) => {
                        let _ = conn.close(200, "probe").await;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }
            BrokerProbe::Unavailable(e) => Err(e.clone()),
        }
    }
}
