//! Whether RabbitMQ answers, for `/readyz`.
//!
//! The probe keeps one connection and one channel of its own (the sink's may be idle, or busy
//! with a backlog) and checks them with a `basic.qos` round trip
//! (<https://www.rabbitmq.com/amqp-0-9-1-reference#basic.qos>): a synchronous method the broker
//! must answer, harmless on a channel with no consumers. Opening a connection for each check,
//! every few seconds, would cost the broker a TCP (and TLS) handshake, an authentication and
//! a connection record in its logs each time.
//!
//! What can go wrong: a broken link (the broker restarted, the network was cut) fails its
//! round trip or times out; it is dropped, which closes it, and a new connection is tried in
//! the same check, so a broker that is back is ready at once. A link that hangs without an
//! error is bounded by the timeout, not by AMQP heartbeats
//! (<https://www.rabbitmq.com/docs/heartbeats>), which take far longer to notice; such a check
//! takes up to three timeouts (the round trip, a new connection, its round trip), and one more
//! per further node of a cluster whose nodes hang.

use std::time::Duration;

use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};

use super::config::RabbitmqConfig;
use crate::config::secret::Secret;

/// How long each step of a check (connect, round trip) may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A connection and a channel kept between checks.
struct Link {
    /// Kept so that the channel stays open; dropping it closes the connection.
    _connection: Connection,
    channel: Channel,
}

/// A round trip on a connection of the probe's own, reconnected only when broken.
pub struct AmqpProbe {
    /// Every node of `RELAY_AMQP_URL`: the broker is up when one of them answers.
    nodes: Vec<Secret>,
    /// `rabbitmq.tls_ca_file`'s certificates, as the sink trusts them.
    ca: Option<String>,
    link: Option<Link>,
}

impl AmqpProbe {
    /// Does not connect yet: the first [`check`](Self::check) does. `Err` when
    /// `rabbitmq.tls_ca_file` cannot be read.
    pub fn new(config: &RabbitmqConfig) -> Result<Self, String> {
        Ok(Self {
            nodes: config.urls(),
            ca: config.ca_pem().map_err(|e| e.to_string())?,
            link: None,
        })
    }

    /// `Ok` when the broker answered a round trip within the timeout.
    pub async fn check(&mut self) -> Result<(), String> {
        let Self { nodes, ca, link } = self;
        check_reusing(link, async || connect_any(nodes, ca.as_deref()).await, ping).await
    }
}

/// AMQP's minimum frame size (4096).
const PROBE_FRAME_MAX: u32 = 4096;

/// A link to the first node that answers within the timeout (the sink's
/// [`connect_first`](super::connect_first)); `Err` names each node's error.
async fn connect_any(nodes: &[Secret], ca: Option<&str>) -> Result<Link, String> {
    // The probe sends one small round trip at a time: the smallest frame AMQP allows keeps
    // lapin's two buffers at 128 KiB each.
    let (_, connection) = super::connect_first(nodes, ca, 0, TIMEOUT, PROBE_FRAME_MAX).await?;
    let channel = tokio::time::timeout(TIMEOUT, connection.create_channel())
        .await
        .map_err(|_| "opening a channel timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Link {
        _connection: connection,
        channel,
    })
}

async fn ping(link: &Link) -> Result<(), String> {
    link.channel
        .basic_qos(0, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())
}

/// One check on the link in `slot`: kept when its round trip succeeds; otherwise dropped, and
/// a new link is opened and checked (and kept when it answers).
async fn check_reusing<L>(
    slot: &mut Option<L>,
    connect: impl AsyncFnOnce() -> Result<L, String>,
    ping: impl AsyncFn(&L) -> Result<(), String>,
) -> Result<(), String> {
    if let Some(link) = slot.as_ref() {
        if let Ok(Ok(())) = tokio::time::timeout(TIMEOUT, ping(link)).await {
            return Ok(());
        }
        *slot = None;
    }
    // `connect` bounds each of its attempts itself (one per node).
    let link = connect().await?;
    tokio::time::timeout(TIMEOUT, ping(&link))
        .await
        .map_err(|_| "timed out".to_string())??;
    *slot = Some(link);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    use super::*;

    /// A link that answers while its connection is alive.
    struct FakeLink(Rc<Cell<bool>>);

    struct FakeBroker {
        up: Cell<bool>,
        connects: Cell<usize>,
        /// Whether the most recently opened link is alive.
        current: RefCell<Rc<Cell<bool>>>,
    }

    impl FakeBroker {
        fn new() -> Self {
            Self {
                up: Cell::new(true),
                connects: Cell::new(0),
                current: RefCell::default(),
            }
        }

        async fn connect(&self) -> Result<FakeLink, String> {
            self.connects.set(self.connects.get() + 1);
            if !self.up.get() {
                return Err("connection refused".into());
            }
            let alive = Rc::new(Cell::new(true));
            *self.current.borrow_mut() = alive.clone();
            Ok(FakeLink(alive))
        }

        /// The broker restarts: every open link breaks.
        fn restart(&self) {
            self.current.borrow().set(false);
        }

        async fn check(&self, slot: &mut Option<FakeLink>) -> Result<(), String> {
            check_reusing(
                slot,
                async || self.connect().await,
                async |l: &FakeLink| {
                    if l.0.get() {
                        Ok(())
                    } else {
                        Err("connection reset".into())
                    }
                },
            )
            .await
        }
    }

    #[tokio::test]
    async fn one_connection_serves_every_check_until_it_breaks() {
        let broker = FakeBroker::new();
        let mut slot = None;
        for _ in 0..5 {
            broker.check(&mut slot).await.unwrap();
        }
        assert_eq!(broker.connects.get(), 1, "one connection for five checks");

        // Broken: reconnected within the same check, which still succeeds.
        broker.restart();
        broker.check(&mut slot).await.unwrap();
        assert_eq!(broker.connects.get(), 2);
        broker.check(&mut slot).await.unwrap();
        assert_eq!(broker.connects.get(), 2);
    }

    #[tokio::test]
    async fn a_broker_that_is_down_fails_the_check_until_it_is_back() {
        let broker = FakeBroker::new();
        let mut slot = None;
        broker.check(&mut slot).await.unwrap();
        broker.restart();
        broker.up.set(false);
        assert!(broker.check(&mut slot).await.is_err());
        assert!(slot.is_none(), "the broken link is dropped");
        assert!(broker.check(&mut slot).await.is_err());
        broker.up.set(true);
        broker.check(&mut slot).await.unwrap();
        assert!(slot.is_some());
    }
}
