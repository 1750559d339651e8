//! RabbitMQ sink (AMQP 0-9-1 through lapin).
//!
//! Publisher confirms (<https://www.rabbitmq.com/docs/confirms#publisher-confirms>) with every
//! message of a batch in flight on one channel, so one aggregate's messages keep their order.
//! Every message is `mandatory`: a `basic.return` (no queue bound for the routing key) comes
//! before the `ack` and makes the publish a permanent failure, and a `nack` a transient one:
//! neither is ever counted as a success. A lost connection fails the unconfirmed messages,
//! which the pipeline publishes again after the next `publish` has reconnected.
//!
//! `RELAY_AMQP_URL` may name several nodes of a cluster. The sink connects to the first that
//! answers; when the connection to a node breaks it tries the next one first (a node that
//! went away for a rolling restart usually refuses for a while), wrapping around the list.
//! The node in use is logged, shown in `/readyz` and, through the engine, in `status`.
//!
//! Everything the relay knows about RabbitMQ lives in this folder: the `[rabbitmq]` settings
//! and their validation ([`config`]), the `/readyz` check ([`probe`]) and where `replay` may
//! send instead ([`destination`]).

pub mod config;
pub mod destination;
pub mod probe;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tracing::{info, warn};

use self::config::RabbitmqConfig;
use super::{Confirmations, InFlight, Sink};
use crate::config::secret::Secret;
use crate::error::{Error, PublishError};
use crate::event::OutboxEvent;
use crate::message::{Encoder, Wire};
use crate::metrics::PublishTally;
use crate::telemetry::{Destination, PublishSpan, start_publish_span};
use crate::template::Template;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The RabbitMQ [`Sink`]: one connection and one confirm-mode channel, replaced only once
/// nothing is in flight on them.
pub struct AmqpSink {
    config: RabbitmqConfig,
    /// The nodes of `RELAY_AMQP_URL`, and the index of the one in use (or to try first).
    nodes: Vec<Secret>,
    node: usize,
    /// `rabbitmq.tls_ca_file`'s certificates, trusted for `amqps://` nodes.
    ca: Option<String>,
    routing_key: Template,
    encoder: Encoder,
    link: Option<(Connection, Channel)>,
    /// Publishes on the current link whose confirmation has not arrived.
    in_flight: Arc<AtomicUsize>,
}

impl AmqpSink {
    /// Connects and declares (or checks) the exchange: an unreachable broker, wrong credentials
    /// or a missing exchange are start-up errors.
    pub async fn connect(config: &RabbitmqConfig, encoder: Encoder) -> Result<Self, Error> {
        let mut sink = Self {
            config: config.clone(),
            nodes: config.urls(),
            node: 0,
            ca: config.ca_pem()?,
            routing_key: config.routing_key_template()?,
            encoder,
            link: None,
            in_flight: Arc::default(),
        };
        sink.open().await?;
        Ok(sink)
    }

    async fn open(&mut self) -> Result<&Channel, Error> {
        if let Some((conn, chan)) = &self.link
            && conn.status().connected()
            && chan.status().connected()
        {
            return Ok(&self.link.as_ref().expect("checked above").1);
        }
        // The sink contract: no new path while confirmations from the old one are outstanding
        // (they fail as the connection went; the engine sends them again, in order, after).
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if self.link.is_some() && in_flight > 0 {
            return Err(Error::Broker(format!(
                "the AMQP connection was lost; waiting for the answers of {in_flight} messages in flight on it before reconnecting"
            )));
        }
        if self.link.take().is_some() {
            warn!(node = %self.nodes[self.node].redacted(), "AMQP connection or channel closed; reconnecting");
            crate::metrics::set_broker_node(None);
            // Its node went away: the next one is tried first.
            self.node = (self.node + 1) % self.nodes.len();
        }
        self.in_flight = Arc::default();
        let (node, connection) = connect_first(
            &self.nodes,
            self.ca.as_deref(),
            self.node,
            CONNECT_TIMEOUT,
            SINK_FRAME_MAX,
        )
        .await
        .map_err(Error::Broker)?;
        self.node = node;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::Broker(format!("cannot open an AMQP channel: {e}")))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Error::Broker(format!("cannot enable publisher confirms: {e}")))?;
        let exchange = &self.config.exchange;
        let passive = !self.config.declare_exchange;
        channel
            .exchange_declare(
                exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive,
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                // A passive declare of a missing exchange: the broker closes the channel with
                // 404 NOT_FOUND.
                if passive && is_not_found(&e) {
                    Error::MissingDestination(format!(
                        "RabbitMQ exchange `{exchange}` does not exist ({e}); create it, or set rabbitmq.declare_exchange = true"
                    ))
                } else if passive {
                    Error::Broker(format!("cannot check RabbitMQ exchange `{exchange}`: {e}"))
                } else {
                    Error::Broker(format!(
                        "cannot declare RabbitMQ exchange `{exchange}` as a durable topic exchange: {e}"
                    ))
                }
            })?;
        let url = &self.nodes[node];
        info!(exchange, node = %url.redacted(), "connected to RabbitMQ");
        crate::metrics::set_broker_node(Some(node_label(url)));
        self.link = Some((connection, channel));
        Ok(&self.link.as_ref().expect("just set").1)
    }
}

/// `host:port` of an AMQP URL, naming the node in `/readyz` and `status`.
fn node_label(url: &Secret) -> String {
    let u = url.expose();
    let rest = u.split_once("://").map_or(u, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_string()
}

/// The indexes of `n` nodes starting at `first`, wrapping around.
fn failover_order(first: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (first + k) % n)
}

/// A connection to the first of `nodes` that answers within `timeout` each, trying them from
/// index `first` around the list, and its index; `Err` names every node's error, without the
/// passwords. `ca` (PEM) is trusted besides the system's roots for `amqps://` nodes. The sink
/// and the `/readyz` probe both connect through it.
async fn connect_first(
    nodes: &[Secret],
    ca: Option<&str>,
    first: usize,
    timeout: Duration,
    frame_max: u32,
) -> Result<(usize, Connection), String> {
    let mut refused = Vec::new();
    for i in failover_order(first, nodes.len()) {
        let url = &nodes[i];
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: ca.map(str::to_string),
        };
        let props = ConnectionProperties::default();
        let connect = async {
            match url.expose().parse::<AMQPUri>() {
                Ok(mut uri) => {
                    uri.query.frame_max.get_or_insert(frame_max);
                    Connection::connect_uri_with_config(uri, props, tls).await
                }
                // lapin's own parse gives the error its usual words.
                Err(_) => Connection::connect_with_config(url.expose(), props, tls).await,
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(connection)) => return Ok((i, connection)),
            Ok(Err(e)) => refused.push(explain_connect_error(url, &e.to_string(), ca.is_some())),
            Err(_) => refused.push(format!(
                "cannot reach RabbitMQ at {}: connect timed out",
                url.redacted()
            )),
        }
    }
    Err(refused.join("; "))
}

/// The largest AMQP frame the sink asks for, unless the URL's `frame_max` says otherwise.
/// lapin keeps a send and a receive buffer of 32 frames each, filled with zeros up front, so
/// RabbitMQ's default of 128 KiB costs 8 MiB per connection; 16 KiB frames (512 KiB buffers)
/// drain as fast (bench: wal → RabbitMQ 13.4k/s, peak RSS 59 → 46 MiB) and a larger body
/// simply goes out in more frames.
pub(super) const SINK_FRAME_MAX: u32 = 16 * 1024;

/// What every message about a refused server certificate says.
const TLS_REFUSED: &str = "the server's TLS certificate";

/// The message for a failed connection to `url`: a refused server certificate says which
/// setting to look at (OpenSSL's reason, e.g. `hostname mismatch` or `unable to get local
/// issuer certificate`, is kept in parentheses).
fn explain_connect_error(url: &Secret, error: &str, ca_set: bool) -> String {
    let at = url.redacted();
    let lower = error.to_ascii_lowercase();
    if !lower.contains("certificate verify failed") {
        return format!(
            "cannot connect to RabbitMQ at {at}: {error}; check RELAY_AMQP_URL (host, credentials, vhost)"
        );
    }
    let reason = error
        .rsplit_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map_or(error, |(r, _)| r);
    // OpenSSL: "hostname mismatch", or "IP address mismatch" for a URL with an IP address.
    if lower.contains("mismatch") {
        format!(
            "cannot connect to RabbitMQ at {at}: {TLS_REFUSED} is not for this host ({reason}); name the node in RELAY_AMQP_URL by a host name the certificate holds"
        )
    } else if ca_set {
        format!(
            "cannot connect to RabbitMQ at {at}: {TLS_REFUSED} is not signed by a CA of rabbitmq.tls_ca_file ({reason}); set it to the CA that signed the server's certificate"
        )
    } else {
        format!(
            "cannot connect to RabbitMQ at {at}: {TLS_REFUSED} is not signed by a CA this system trusts ({reason}); set rabbitmq.tls_ca_file to the CA that signed it"
        )
    }
}

/// AMQP short strings (routing key, message id, type, header names) hold at most 255 bytes,
/// and the broker closes the channel on a body above its `max_message_size`: such a message
/// would fail forever, so it is refused here, permanently, before it breaks the channel.
fn check_limits(
    event: &OutboxEvent,
    routing_key: &str,
    max_body: usize,
) -> Result<(), PublishError> {
    let too_long = |what: &str, s: &str| {
        (s.len() > 255).then(|| {
            PublishError::permanent(format!(
                "{what} is {} bytes; AMQP allows at most 255",
                s.len()
            ))
        })
    };
    if let Some(e) = too_long("the routing key", routing_key)
        .or_else(|| too_long("the event id", &event.id))
        .or_else(|| too_long("the event type", &event.event_type))
        .or_else(|| {
            event
                .headers
                .iter()
                .find_map(|(k, _)| too_long(&format!("header name `{k:.40}…`"), k))
        })
    {
        return Err(e);
    }
    let Some(payload) = &event.payload else {
        return Err(PublishError::permanent(
            "the payload is NULL; RabbitMQ has no tombstones, so such a row cannot be sent (kafka.tombstone_on_null_payload is for Kafka)",
        ));
    };
    if payload.len() > max_body {
        return Err(PublishError::permanent(format!(
            "the payload is {} bytes, above rabbitmq.max_message_size ({max_body})",
            payload.len()
        )));
    }
    Ok(())
}

/// An upper bound of the content-header frame [`properties`] makes for `event`: frame and
/// header fields, the short strings with their length bytes, and each header as a short
/// string name plus a long string value (1 + name, 1 tag + 4 length + value).
fn header_frame_size(event: &OutboxEvent, wire: &Wire<'_>) -> usize {
    const FIXED: usize = 8 + 14 + 1 + 8 + 4;
    let headers: usize = wire
        .headers
        .iter()
        .map(|(k, v)| 1 + k.len() + 1 + 4 + v.len())
        .sum();
    FIXED + 1 + event.id.len() + 1 + event.event_type.len() + 1 + wire.content_type.len() + headers
}

fn properties(event: &OutboxEvent, wire: &Wire<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in &wire.headers {
        headers.insert(
            ShortString::from(&**key),
            AMQPValue::LongString((&**value).into()),
        );
    }
    let mut props = BasicProperties::default()
        .with_message_id(event.id.as_str().into())
        .with_type(event.event_type.as_str().into())
        .with_content_type(wire.content_type.into())
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ms) = event.created_at_ms {
        props = props.with_timestamp((ms / 1000).max(0) as u64);
    }
    props
}

/// How long an answer may still come once the channel is closed (see [`answer`]).
const CLOSED_LINK_GRACE: Duration = Duration::from_secs(1);
/// How often a wait for an answer looks at the channel's state.
const LINK_CHECK: Duration = Duration::from_millis(250);

/// The broker's answer to one publish, or why there is none.
enum Answer {
    Confirmed(Confirmation),
    /// The connection or channel went away before the answer came.
    Lost(String),
    TimedOut,
}

/// The limits a batch's writes and answers are awaited under: one `confirm_timeout` for the
/// whole batch (its messages are awaited one after another; a limit per message would add up to
/// `batch_size` × `confirm_timeout` with a broker that takes messages and never answers), and
/// one closed-channel grace, started when the channel is first seen closed.
struct AnswerWait {
    deadline: tokio::time::Instant,
    closed_since: Option<tokio::time::Instant>,
}

impl AnswerWait {
    fn new(timeout: Duration) -> Self {
        Self {
            deadline: tokio::time::Instant::now() + timeout,
            closed_since: None,
        }
    }

    /// Waits for the answer to one publish (see [`AnswerWait::watch`]).
    async fn answer(&mut self, confirm: PublisherConfirm, channel: &Channel) -> Answer {
        match self.watch(confirm, channel).await {
            Watched::Done(Ok(c)) => Answer::Confirmed(c),
            Watched::Done(Err(e)) => Answer::Lost(e.to_string()),
            Watched::Lost(state) => Answer::Lost(format!(
                "the channel closed ({state}) and RabbitMQ's answer never came"
            )),
            Watched::TimedOut => Answer::TimedOut,
        }
    }

    /// Awaits `work` on `channel` (a publish being written, or its confirmation) under the
    /// batch's limits. lapin fails what it holds when the channel closes, but a publish written
    /// or a confirmation registered while the connection was breaking can be left neither done
    /// nor failed; it would hold the sink on a dead link (it reconnects only once nothing is in
    /// flight), and a publish whose frames never leave would hold the engine itself. So once the
    /// channel is no longer connected, `work` still pending after [`CLOSED_LINK_GRACE`] counts
    /// as lost: nothing can arrive on a closed channel, and the engine sends the message again.
    /// A result that is there when a limit passes still counts.
    async fn watch<T, F>(&mut self, work: F, channel: &Channel) -> Watched<T>
    where
        F: std::future::Future<Output = Result<T, lapin::Error>>,
    {
        use futures::FutureExt as _;
        tokio::pin!(work);
        loop {
            let now = tokio::time::Instant::now();
            if self.closed_since.is_none() && !channel.status().connected() {
                self.closed_since = Some(now);
            }
            let gave_up = if now >= self.deadline {
                Some(Watched::TimedOut)
            } else {
                self.closed_since
                    .filter(|since| now >= *since + CLOSED_LINK_GRACE)
                    .map(|_| Watched::Lost(format!("{:?}", channel.status().state())))
            };
            if let Some(gave_up) = gave_up {
                return match (&mut work).now_or_never() {
                    Some(done) => Watched::Done(done),
                    None => gave_up,
                };
            }
            let wake = self.deadline.min(now + LINK_CHECK);
            if let Ok(done) = tokio::time::timeout_at(wake, &mut work).await {
                return Watched::Done(done);
            }
        }
    }
}

/// How a watched piece of AMQP work ended (see [`AnswerWait::watch`]).
enum Watched<T> {
    Done(Result<T, lapin::Error>),
    /// The channel closed (in this state) and the work was left pending.
    Lost(String),
    TimedOut,
}

/// What the broker's answer to one publish means (see the module docs).
fn confirmation(
    answer: Answer,
    confirm_timeout: Duration,
    exchange: &str,
    routing_key: &str,
) -> Result<(), PublishError> {
    match answer {
        Answer::TimedOut => Err(PublishError::unavailable(format!(
            "no publisher confirm from RabbitMQ within {confirm_timeout:?}"
        ))),
        Answer::Lost(e) => Err(PublishError::unavailable(format!(
            "connection lost before RabbitMQ confirmed: {e}"
        ))),
        Answer::Confirmed(Confirmation::Ack(None)) => Ok(()),
        Answer::Confirmed(Confirmation::Ack(Some(returned)))
        | Answer::Confirmed(Confirmation::Nack(Some(returned))) => {
            Err(PublishError::permanent(format!(
                "RabbitMQ returned the message as unroutable: exchange `{exchange}` has no queue bound for routing key `{routing_key}` ({} {})",
                returned.reply_code, returned.reply_text
            )))
        }
        Answer::Confirmed(Confirmation::Nack(None)) => Err(PublishError::transient(
            "RabbitMQ nacked the message (broker could not take it)",
        )),
        Answer::Confirmed(Confirmation::NotRequested) => Err(PublishError::unavailable(
            "publisher confirms are not enabled on this channel",
        )),
    }
}

impl Sink for AmqpSink {
    async fn send(&mut self, events: &[&OutboxEvent]) -> Confirmations {
        let exchange = self.config.exchange.clone();
        let confirm_timeout = self.config.confirm_timeout;
        let channel = match self.open().await {
            Ok(c) => c.clone(),
            Err(e) => {
                let results = events
                    .iter()
                    .map(|_| Err(PublishError::unavailable(e.to_string())))
                    .collect();
                return Box::pin(async move { results });
            }
        };
        let link_in_flight = self.in_flight.clone();
        let frame_max = self
            .link
            .as_ref()
            .map_or(SINK_FRAME_MAX, |(c, _)| c.configuration().frame_max());
        enum Pending {
            Sent(String, PublisherConfirm, Box<PublishSpan>, InFlight),
            Failed(PublishError),
        }
        let mut pending = Vec::with_capacity(events.len());
        let mut broken: Option<String> = None;
        // One set of limits for the whole batch, its writes and its answers.
        let mut wait = AnswerWait::new(confirm_timeout);
        // Aggregates with an event refused before publishing: their later events wait too.
        let mut refused: hashbrown::HashSet<(&str, &str)> = Default::default();
        for event in events {
            let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
            if refused.contains(&key) {
                pending.push(Pending::Failed(PublishError::transient(
                    "not sent: behind a failed event of its aggregate",
                )));
                continue;
            }
            if let Some(e) = &broken {
                pending.push(Pending::Failed(PublishError::unavailable(e.clone())));
                continue;
            }
            let routing_key = match self.routing_key.render(event) {
                Ok(k) => k.into_owned(),
                Err(e) => {
                    refused.insert(key);
                    pending.push(Pending::Failed(PublishError::permanent(e)));
                    continue;
                }
            };
            if let Err(e) = check_limits(event, &routing_key, self.config.max_message_size) {
                refused.insert(key);
                pending.push(Pending::Failed(e));
                continue;
            }
            let span = start_publish_span(
                event,
                &Destination {
                    system: "rabbitmq",
                    name: &exchange,
                    routing_key: Some(&routing_key),
                },
            );
            let wire = self.encoder.encode(
                event,
                span.traceparent.as_deref(),
                span.tracestate.as_deref(),
            );
            let header_frame = header_frame_size(event, &wire);
            if header_frame > frame_max as usize {
                // The properties and headers travel in one frame that AMQP cannot split;
                // the broker would close the connection on it, again at every retry.
                let error = PublishError::permanent(format!(
                    "the message's headers and properties take about {header_frame} bytes, above the connection's AMQP frame size ({frame_max}); \
                     shrink the row's headers, or raise the frame size with `?frame_max=131072` in RELAY_AMQP_URL (up to the broker's frame_max)"
                ));
                span.end(
                    &Err(error.clone()),
                    &exchange,
                    &mut PublishTally::new("rabbitmq"),
                );
                refused.insert(key);
                pending.push(Pending::Failed(error));
                continue;
            }
            let publish = channel.basic_publish(
                &exchange,
                &routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                wire.body.as_deref().unwrap_or_default(),
                properties(event, &wire),
            );
            let sent = match wait.watch(publish, &channel).await {
                Watched::Done(sent) => sent.map_err(|e| e.to_string()),
                Watched::Lost(state) => Err(format!(
                    "the channel closed ({state}) before the message was written"
                )),
                Watched::TimedOut => Err(format!(
                    "the message was not written to the connection within rabbitmq.confirm_timeout ({confirm_timeout:?})"
                )),
            };
            match sent {
                Ok(confirm) => {
                    let counted = InFlight::new(&link_in_flight);
                    pending.push(Pending::Sent(routing_key, confirm, Box::new(span), counted));
                }
                Err(e) => {
                    // Everything after a failed write fails too: keeps the aggregate's order.
                    let msg = format!("AMQP publish failed: {e}");
                    broken = Some(msg.clone());
                    let error = PublishError::unavailable(msg);
                    span.end(
                        &Err(error.clone()),
                        &exchange,
                        &mut PublishTally::new("rabbitmq"),
                    );
                    pending.push(Pending::Failed(error));
                }
            }
        }
        Box::pin(async move {
            let mut results = Vec::with_capacity(pending.len());
            let mut tally = PublishTally::new("rabbitmq");
            for p in pending {
                results.push(match p {
                    Pending::Failed(e) => Err(e),
                    Pending::Sent(routing_key, confirm, span, counted) => {
                        let result = confirmation(
                            wait.answer(confirm, &channel).await,
                            confirm_timeout,
                            &exchange,
                            &routing_key,
                        );
                        drop(counted);
                        span.end(&result, &exchange, &mut tally);
                        result
                    }
                });
            }
            results
        })
    }

    fn system(&self) -> &'static str {
        "rabbitmq"
    }
}

/// Whether the broker answered with 404 NOT_FOUND (a passive declare of a missing exchange).
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e,
        lapin::Error::ProtocolError(amqp)
            if *amqp.kind() == lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
    )
}

#[cfg(test)]
mod tests {
    use super::{Secret, explain_connect_error, failover_order, node_label};

    #[test]
    fn a_refused_certificate_names_the_setting_to_fix() {
        let url = Secret::new("amqps://guest:hunter2@localhost:5711/%2f");
        // As lapin reports OpenSSL's refusals (seen with RabbitMQ 3.10's TLS listener).
        let verify = |why: &str| {
            format!(
                "IO error: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:../ssl/statem/statem_clnt.c:1889: ({why})"
            )
        };
        let msg = explain_connect_error(
            &url,
            &verify("self-signed certificate in certificate chain"),
            true,
        );
        assert!(msg.contains("not signed by a CA of rabbitmq.tls_ca_file (self-signed certificate in certificate chain)"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let msg = explain_connect_error(
            &url,
            &verify("unable to get local issuer certificate"),
            false,
        );
        assert!(
            msg.contains("a CA this system trusts") && msg.contains("set rabbitmq.tls_ca_file"),
            "{msg}"
        );
        for why in ["hostname mismatch", "IP address mismatch"] {
            let msg = explain_connect_error(&url, &verify(why), true);
            assert!(
                msg.contains("is not for this host") && msg.contains(why),
                "{msg}"
            );
        }
        let msg = explain_connect_error(&url, "IO error: Connection refused (os error 111)", true);
        assert_eq!(
            msg,
            "cannot connect to RabbitMQ at amqps://guest:***@localhost:5711/%2f: IO error: Connection refused (os error 111); check RELAY_AMQP_URL (host, credentials, vhost)"
        );
    }

    #[test]
    fn a_node_is_named_by_its_host_and_port_only() {
        let label = |u: &str| node_label(&Secret::new(u));
        assert_eq!(
            label("amqp://guest:p@ss@127.0.0.1:5702/%2f"),
            "127.0.0.1:5702"
        );
        assert_eq!(
            label("amqps://rabbit-1.example:5671"),
            "rabbit-1.example:5671"
        );
        assert_eq!(label("amqp://h?heartbeat=5"), "h");
    }

    #[test]
    fn nodes_are_tried_from_the_one_in_use_around_the_list() {
        assert_eq!(failover_order(1, 3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(failover_order(0, 1).collect::<Vec<_>>(), [0]);
    }
}
