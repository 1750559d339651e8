//! Sinks: where events go. One folder per broker ([`kafka`], [`amqp`]), each owning its
//! settings, their validation, its readiness probe and replay's destination override.
//!
//! The contract every sink keeps (and the engine relies on):
//! - `send` hands the events to the broker's client in the order given and resolves once they
//!   are on their way; the future it returns resolves once every event has been confirmed by the
//!   broker or has definitely failed, with one result per event, in the order given. `Ok` means
//!   the broker has the message durably (Kafka: delivery report with `acks=all`; RabbitMQ:
//!   publisher-confirm `ack` with no `basic.return`). Nothing else counts as success.
//! - Several sends may be in flight at once. Events of one aggregate are handed to the broker in
//!   the order of the calls and of the events in each call, on one ordered path (Kafka: one
//!   partition of one idempotent producer; RabbitMQ: one channel), so they reach the broker in
//!   that order as long as they succeed.
//! - A sink never switches to a new path (a new AMQP connection, a new Kafka producer) while
//!   confirmations from the old one are outstanding: until they are in, `send` fails every event
//!   with [`FailureKind::Unavailable`]. So an event sent after a failed one of its aggregate can
//!   only reach the broker ahead of the failed one's re-send if it was already in flight on the
//!   same path; the engine never confirms such an event and sends it again behind.
//! - A lost connection is not an error of the sink's lifetime: a later `send` reconnects.
//!
//! [`FailureKind::Unavailable`]: crate::error::FailureKind::Unavailable

pub mod amqp;
pub mod kafka;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use crate::config::{Config, SinkKind};
use crate::error::{Error, PublishError};
use crate::event::OutboxEvent;
use crate::message::Binding;

/// One message counted as in flight on a sink's current path (AMQP connection, Kafka producer)
/// until its answer is in, or until its confirmation future is dropped (a session ended and
/// the events will be read again): a dropped future must not pin the path forever.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(crate) fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The broker's answers for one `send`, result `i` for event `i`.
pub type Confirmations = BoxFuture<'static, Vec<Result<(), PublishError>>>;

/// A broker the relay publishes to. See the module docs for the contract.
pub trait Sink: Send {
    /// Hands `events` to the broker in order; the returned future yields their confirmations.
    fn send(&mut self, events: &[&OutboxEvent]) -> impl Future<Output = Confirmations> + Send;

    /// Sends `events` and waits for every confirmation; result `i` is for `events[i]`.
    fn publish(
        &mut self,
        events: &[&OutboxEvent],
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send {
        async move { self.send(events).await.await }
    }

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
            SinkKind::Kafka => AnySink::Kafka(
                kafka::KafkaSink::connect(&config.kafka, config.encoder(Binding::Kafka)).await?,
            ),
            SinkKind::Rabbitmq => AnySink::Rabbitmq(
                amqp::AmqpSink::connect(&config.rabbitmq, config.encoder(Binding::Rabbitmq))
                    .await?,
            ),
        })
    }
}

impl Sink for AnySink {
    async fn send(&mut self, events: &[&OutboxEvent]) -> Confirmations {
        match self {
            AnySink::Kafka(s) => s.send(events).await,
            AnySink::Rabbitmq(s) => s.send(events).await,
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
/// `/readyz`; the sink's own connection may be idle or busy). Each broker's check lives in its
/// folder: [`kafka::probe`], [`amqp::probe`].
pub enum BrokerProbe {
    /// A metadata request on a client of its own.
    Kafka(kafka::probe::KafkaProbe),
    /// Boxed: it holds a whole lapin connection, and there is one probe per process.
    Rabbitmq(Box<amqp::probe::AmqpProbe>),
    /// The client could not be created; every check fails with this reason.
    Unavailable(String),
}

impl BrokerProbe {
    /// The probe of the configured sink; it connects on its first check.
    pub fn new(config: &Config) -> Self {
        match config.sink {
            SinkKind::Kafka => match kafka::probe::KafkaProbe::new(&config.kafka) {
                Ok(probe) => BrokerProbe::Kafka(probe),
                Err(e) => BrokerProbe::Unavailable(e),
            },
            SinkKind::Rabbitmq => match amqp::probe::AmqpProbe::new(&config.rabbitmq) {
                Ok(probe) => BrokerProbe::Rabbitmq(Box::new(probe)),
                Err(e) => BrokerProbe::Unavailable(e),
            },
        }
    }

    /// `Ok` when the broker answered; `Err` says why not, for the debug log.
    pub async fn check(&mut self) -> Result<(), String> {
        match self {
            BrokerProbe::Kafka(probe) => probe.check().await,
            BrokerProbe::Rabbitmq(probe) => probe.check().await,
            BrokerProbe::Unavailable(e) => Err(e.clone()),
        }
    }
}
