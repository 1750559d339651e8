//! Kafka sink (librdkafka through rdkafka, built statically).
//!
//! Idempotent producer with `acks=all`: librdkafka retries internally without reordering or
//! duplicating within a partition, and the key is the aggregate id, so one aggregate's events
//! stay in order in one partition. Many messages are in flight; every delivery report is
//! awaited. See <https://github.com/confluentinc/librdkafka/blob/master/INTRODUCTION.md#idempotent-producer>.
//!
//! Topics are checked (or created, when `kafka.create_topics` is set) the first time an event
//! names them: many managed Kafkas, and tansu, do not create topics on first produce.
//!
//! Everything the relay knows about Kafka lives in this folder: the `[kafka]` settings and
//! their validation ([`config`]), the `/readyz` check ([`probe`]) and where `replay` may send
//! instead ([`destination`]). They share [`client_config`], so the probe and replay's topic
//! check talk to the brokers exactly as the sink does (TLS, SASL and all).

pub mod config;
pub mod destination;
pub mod probe;

use hashbrown::{HashMap, HashSet};
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaRespErr;
use tracing::{info, warn};

use self::config::KafkaConfig;
use super::{Confirmations, InFlight, Sink};
use crate::error::{Error, PublishError};
use crate::event::OutboxEvent;
use crate::message::Encoder;
use crate::metrics::PublishTally;
use crate::telemetry::{Destination, PublishSpan, start_publish_span};
use crate::template::Template;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a topic found missing (and not to be created) is taken as missing without asking
/// the broker again: every retry of its events would otherwise fetch metadata inside `send`,
/// ahead of the healthy events of the same batch.
const MISSING_RECHECK: Duration = Duration::from_secs(5);

/// A topic as the broker's metadata shows it.
enum TopicState {
    Exists,
    /// The broker answered, and it has no such topic.
    Missing,
    /// The broker answered with an error for the topic (e.g. while a leader moves).
    Unclear(String),
}

/// The Kafka [`Sink`]: one idempotent producer, replaced only when the broker no longer
/// accepts its identity and nothing is in flight on it.
pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    topic: Template,
    key: Template,
    encoder: Encoder,
    config: KafkaConfig,
    known_topics: HashSet<String>,
    /// Topics the broker said do not exist (with `create_topics = false`), and when.
    missing_topics: HashMap<String, Instant>,
    /// What delivery reports found, for the next `send` (reports arrive after it returned).
    reports: Arc<Mutex<Reports>>,
    /// Messages sent on the current producer whose report has not arrived.
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Reports {
    /// Topics a report called unknown: checked again before the next send to them.
    stale_topics: Vec<String>,
    /// The broker no longer accepts the producer's identity: replace it.
    renew: bool,
}

/// The producer settings the delivery guarantees rest on (`acks=all`, the idempotent
/// producer); `kafka.properties` are applied last and may add TLS/SASL (the guarantee-critical
/// ones are refused by [`KafkaConfig::validate`]).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", "outbox-relay")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set(
            "message.timeout.ms",
            config.message_timeout.as_millis().to_string(),
        )
        .set("allow.auto.create.topics", "false")
        // The partitioner of Kafka's Java client (and Debezium): a key lands on the same
        // partition whoever produces it, and `{partition}` in RabbitMQ routing keys matches it.
        .set("partitioner", "murmur2_random")
        // A sidecar talks to a handful of brokers: after an outage, reconnect within a second
        // rather than librdkafka's default of up to 10 s (messages time out meanwhile).
        .set("reconnect.backoff.max.ms", "1000");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

/// A client context that keeps the last error librdkafka reported about its brokers (a
/// [`Refusal`] before any other): a failed
/// metadata request says only "broker transport failure", while the reason (a refused TLS
/// certificate, a failed SASL authentication) is reported to the context. It logs nothing
/// itself: the start-up error names the reason once.
/// Error events reach the context when the client is polled: it is used with a
/// [`ThreadedProducer`], whose thread polls all the time.
#[derive(Default)]
pub(crate) struct LastError(Mutex<Option<String>>);

impl LastError {
    /// The last error reported since the last call.
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl ClientContext for LastError {
    fn log(&self, _: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", fac, "{message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_string()
        };
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A refusal is the reason: the "all brokers are down" that follows it does not hide it.
        if last.as_deref().and_then(refusal).is_none() || refusal(&reason).is_some() {
            *last = Some(reason);
        }
    }
}

impl ProducerContext for LastError {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A refusal that waiting does not cure, as librdkafka words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The broker's certificate was not accepted (wrong CA, wrong host name).
    Certificate,
    /// The SASL login was refused.
    Login,
}

/// Whether librdkafka's `reason` is a [`Refusal`]. A handshake that broke off ("SSL
/// handshake failed: Disconnected", a broker restarting) is not one.
fn refusal(reason: &str) -> Option<Refusal> {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("certificate verify failed") {
        Some(Refusal::Certificate)
    } else if lower.contains("sasl authentication error")
        || lower.contains("sasl scram authentication failed")
    {
        Some(Refusal::Login)
    } else {
        None
    }
}

/// Fetches the cluster's metadata through a client of its own with the sink's settings, for
/// up to [`METADATA_TIMEOUT`], before the sink's own clients exist (they would each log every
/// failed attempt). `Err` is the start-up error: a refused TLS certificate or SASL login ends
/// the wait at once, with a message that names the settings to fix; anything else says the
/// brokers cannot be reached and why.
async fn check_reachable(client_config: &ClientConfig) -> Result<(), Error> {
    let brokers = client_config
        .get("bootstrap.servers")
        .unwrap_or_default()
        .to_string();
    let client: ThreadedProducer<LastError> = client_config
        .create_with_context(LastError::default())
        .map_err(|e| {
            Error::Config(format!(
                "cannot create a Kafka client: {}; check kafka.properties",
                client_error(&e)
            ))
        })?;
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + METADATA_TIMEOUT;
        let mut reason: Option<String> = None;
        loop {
            let started = Instant::now();
            let attempt = deadline
                .saturating_duration_since(started)
                .min(Duration::from_secs(1));
            let e = match client.client().fetch_metadata(None, attempt) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            // A refusal, once seen, is the reason; later "all brokers down" does not hide it.
            if let Some(new) = client.context().take()
                && (reason.as_deref().and_then(refusal).is_none() || refusal(&new).is_some())
            {
                reason = Some(new);
            }
            if reason.as_deref().and_then(refusal).is_some() || Instant::now() >= deadline {
                return Err(Error::Broker(explain_unreachable(
                    &brokers,
                    &e.to_string(),
                    reason.as_deref(),
                )));
            }
            // A request that failed at once is not sent again at once.
            std::thread::sleep(attempt.saturating_sub(started.elapsed()));
        }
    })
    .await
    .map_err(|e| Error::Broker(format!("Kafka metadata task failed: {e}")))?
}

/// A client creation error without the value of the setting it names: that may be a
/// password (`"sasl.pasword" = "…"`, misspelt, is refused with its value).
pub(crate) fn client_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("{description} (setting `{key}`)")
        }
        other => other.to_string(),
    }
}

/// The start-up message for brokers that did not answer a metadata request (`error`), given
/// the last reason librdkafka reported for them.
fn explain_unreachable(brokers: &str, error: &str, reason: Option<&str>) -> String {
    const CHECK: &str = "check RELAY_KAFKA_BROKERS and that the brokers are up";
    let Some(reason) = reason else {
        return format!("cannot reach Kafka at {brokers}: {error}; {CHECK}");
    };
    match refusal(reason) {
        Some(Refusal::Certificate) => format!(
            "cannot reach Kafka at {brokers}: the TLS handshake failed ({reason}); set kafka.properties ssl.ca.location to the CA that signed the brokers' certificates, and name the brokers by a host name their certificates hold"
        ),
        Some(Refusal::Login) => format!(
            "cannot reach Kafka at {brokers}: SASL authentication failed ({reason}); check kafka.properties sasl.mechanism, sasl.username and sasl.password"
        ),
        None => format!("cannot reach Kafka at {brokers}: {error} ({reason}); {CHECK}"),
    }
}

impl KafkaSink {
    /// Creates the producer and fetches the cluster's metadata once: unreachable brokers or
    /// bad `kafka.properties` are start-up errors.
    pub async fn connect(config: &KafkaConfig, encoder: Encoder) -> Result<Self, Error> {
        let client_config = client_config(config);
        let (topic, key) = config.templates()?;
        check_reachable(&client_config).await?;
        let producer: FutureProducer = client_config.create().map_err(|e| {
            Error::Config(format!(
                "cannot create the Kafka producer: {}; check kafka.properties",
                client_error(&e)
            ))
        })?;
        let admin: AdminClient<DefaultClientContext> = client_config.create().map_err(|e| {
            Error::Config(format!(
                "cannot create the Kafka admin client: {}",
                client_error(&e)
            ))
        })?;
        // The producer learns the cluster now, not with the first batch. The check above
        // found the brokers answering: a failure here (they went away meanwhile) is an error
        // like any other start-up error.
        let warm = producer.clone();
        let brokers = config.brokers.clone();
        tokio::task::spawn_blocking(move || warm.client().fetch_metadata(None, METADATA_TIMEOUT))
            .await
            .map_err(|e| Error::Broker(format!("Kafka metadata task failed: {e}")))?
            .map_err(|e| {
                Error::Broker(format!(
                    "cannot reach Kafka at {brokers}: {e}; check RELAY_KAFKA_BROKERS and that the brokers are up"
                ))
            })?;
        Ok(Self {
            producer,
            admin,
            topic,
            key,
            encoder,
            config: config.clone(),
            known_topics: HashSet::new(),
            missing_topics: HashMap::new(),
            reports: Arc::default(),
            in_flight: Arc::default(),
        })
    }

    /// Makes sure `topic` exists, creating it when configured to. `Err` is the message for every
    /// event bound to it.
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), PublishError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let missing_error = || {
            PublishError::permanent(format!(
                "Kafka topic `{topic}` does not exist; create it, or set kafka.create_topics = true"
            ))
        };
        if let Some(seen) = self.missing_topics.get(topic) {
            if seen.elapsed() < MISSING_RECHECK {
                return Err(missing_error());
            }
            self.missing_topics.remove(topic);
        }
        let missing = match self.topic_state(topic).await? {
            TopicState::Exists => false,
            TopicState::Missing => true,
            // Metadata in flux (a broker restarting, a leader moving): ask again later.
            TopicState::Unclear(why) => {
                return Err(PublishError::transient(format!(
                    "Kafka metadata for topic `{topic}` is not usable yet: {why}"
                )));
            }
        };
        if missing {
            if !self.config.create_topics {
                self.missing_topics
                    .insert(topic.to_string(), Instant::now());
                return Err(missing_error());
            }
            let new = NewTopic::new(
                topic,
                self.config.partitions,
                TopicReplication::Fixed(self.config.replication_factor),
            );
            let results = self
                .admin
                .create_topics([&new], &AdminOptions::new())
                .await
                .map_err(|e| {
                    PublishError::transient(format!("cannot create topic `{topic}`: {e}"))
                })?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    // What the broker will answer again: the name, the settings or the rights.
                    Err((
                        _,
                        code @ (RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::InvalidConfig
                        | RDKafkaErrorCode::PolicyViolation
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed),
                    )) => {
                        return Err(PublishError::permanent(format!(
                            "cannot create Kafka topic `{topic}`: {code}"
                        )));
                    }
                    Err((_, code)) => {
                        return Err(PublishError::transient(format!(
                            "cannot create Kafka topic `{topic}` yet: {code}"
                        )));
                    }
                }
            }
            info!(
                topic,
                partitions = self.config.partitions,
                "created Kafka topic"
            );
            // Wait until the metadata shows it, so the first produce does not race creation.
            for _ in 0..50 {
                if matches!(self.topic_state(topic).await?, TopicState::Exists) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.known_topics.insert(topic.to_string());
        Ok(())
    }

    /// What the broker's metadata says of `topic`; `Err` when metadata cannot be fetched.
    async fn topic_state(&self, topic: &str) -> Result<TopicState, PublishError> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| PublishError::transient(format!("metadata task failed: {e}")))?
        .map_err(|e| PublishError::transient(format!("cannot fetch Kafka metadata: {e}")))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(TopicState::Missing);
        };
        Ok(match t.error() {
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => TopicState::Missing,
            Some(e) => TopicState::Unclear(format!("{}", RDKafkaErrorCode::from(e))),
            None if t.partitions().is_empty() => TopicState::Unclear("no partitions yet".into()),
            None => TopicState::Exists,
        })
    }
}

/// Errors that leave the idempotent producer's identity (producer id, epoch, sequence numbers)
/// unusable: every later message would fail the same way until a new producer is created.
/// Seen from brokers that answer librdkafka's epoch bump (after messages time out during an
/// outage) with `PRODUCER_FENCED`.
fn producer_state_lost(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::Fatal
        )
    )
}

/// Errors the broker will give again for the same message.
fn classify(e: &KafkaError) -> PublishError {
    let permanent = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidMessage
        )
    );
    // An unknown topic is not final: metadata can be stale while a broker restarts or the
    // network is cut. `publish` re-checks the topic before the retry, and only a topic the
    // broker positively lacks becomes a permanent error (in `ensure_topic`).
    // Nothing on this producer can get through: a message that timed out (no broker answered
    // within kafka.message_timeout), or an identity the broker no longer accepts.
    let unavailable = producer_state_lost(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::MessageTimedOut
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
            )
        );
    let message = format!("Kafka refused the message: {e}");
    if permanent {
        PublishError::permanent(message)
    } else if unavailable {
        PublishError::unavailable(message)
    } else {
        PublishError::transient(message)
    }
}

impl KafkaSink {
    /// Takes in what the delivery reports of earlier sends found: topics to check again, and
    /// whether the producer must be replaced. A producer is only replaced once every message
    /// sent on it has its report (the sink contract: one ordered path at a time); until then
    /// `Err` is the reason every event of this send fails.
    fn apply_reports(&mut self) -> Result<(), PublishError> {
        let renew = {
            let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
            for topic in reports.stale_topics.drain(..) {
                self.known_topics.remove(&topic);
            }
            reports.renew
        };
        let fatal = self.producer.client().fatal_error();
        if !renew && fatal.is_none() {
            return Ok(());
        }
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if in_flight > 0 {
            return Err(PublishError::unavailable(format!(
                "the Kafka producer must be replaced; waiting for the reports of {in_flight} messages still in flight on it"
            )));
        }
        let reason = fatal
            .map(|(code, reason)| format!("{code}: {reason}"))
            .unwrap_or_else(|| {
                "the broker no longer accepts its producer id, epoch or sequence".into()
            });
        warn!(
            reason,
            "the Kafka producer cannot continue; creating a new one"
        );
        match client_config(&self.config).create::<FutureProducer>() {
            Ok(producer) => {
                // Destroying a librdkafka handle blocks (purge, thread joins).
                let old = std::mem::replace(&mut self.producer, producer);
                tokio::task::spawn_blocking(move || drop(old));
                self.reports.lock().unwrap_or_else(|e| e.into_inner()).renew = false;
                crate::metrics::record_producer_renewed();
                Ok(())
            }
            Err(e) => Err(PublishError::unavailable(format!(
                "cannot create a new Kafka producer: {}",
                client_error(&e)
            ))),
        }
    }
}

/// Bookkeeping for a message that failed with `e`, for the next `send`: a topic reported unknown
/// is checked again (and created, if configured) before the retry, and a producer whose
/// identity the broker no longer accepts is replaced.
fn note_failure(reports: &Mutex<Reports>, e: &KafkaError, topic: &str) {
    let stale = matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
    );
    let renew = producer_state_lost(e);
    if stale || renew {
        let mut r = reports.lock().unwrap_or_else(|e| e.into_inner());
        if stale {
            r.stale_topics.push(topic.to_string());
        }
        r.renew |= renew;
    }
}

impl Sink for KafkaSink {
    async fn send(&mut self, events: &[&OutboxEvent]) -> Confirmations {
        if let Err(e) = self.apply_reports() {
            let results = events.iter().map(|_| Err(e.clone())).collect();
            return Box::pin(async move { results });
        }
        // Where each event goes, or why it cannot go anywhere (a NULL column its topic or
        // key names, a NULL payload without tombstones): known before anything is sent.
        // (Copies of the templates: what they render may borrow them across `&mut self` calls.)
        let (topic_template, key_template) = (self.topic.clone(), self.key.clone());
        let routes: Vec<Result<(String, Cow<'_, str>), PublishError>> = events
            .iter()
            .map(|e| {
                let topic = topic_template.render(e).map_err(PublishError::permanent)?;
                let key = key_template.render(e).map_err(PublishError::permanent)?;
                if e.payload.is_none() && !self.config.tombstone_on_null_payload {
                    return Err(PublishError::permanent(
                        "the payload is NULL; set kafka.tombstone_on_null_payload = true to send such rows as tombstones (the key with a null value)",
                    ));
                }
                Ok((topic.into_owned(), key))
            })
            .collect();
        let mut topic_status: HashMap<String, Result<(), PublishError>> = HashMap::new();
        for (topic, _) in routes.iter().flatten() {
            if !topic_status.contains_key(topic) {
                let status = self.ensure_topic(topic).await;
                topic_status.insert(topic.clone(), status);
            }
        }

        enum Pending {
            Sent(
                rdkafka::producer::DeliveryFuture,
                String,
                PublishSpan,
                InFlight,
            ),
            Failed(PublishError, PublishSpan),
        }
        let mut pending = Vec::with_capacity(events.len());
        // Aggregates with an event refused before it reached the producer: their later events
        // are not produced either, so they cannot reach the broker ahead of it.
        let mut refused: HashSet<(&str, &str)> = HashSet::new();
        for (event, route) in events.iter().zip(routes) {
            let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
            let (topic, message_key) = match route {
                Ok(route) => route,
                Err(e) => {
                    refused.insert(key);
                    let span = start_publish_span(
                        event,
                        &Destination {
                            system: "kafka",
                            name: self.topic.as_str(),
                            routing_key: None,
                        },
                    );
                    pending.push(Pending::Failed(e, span));
                    continue;
                }
            };
            let span = start_publish_span(
                event,
                &Destination {
                    system: "kafka",
                    name: &topic,
                    routing_key: None,
                },
            );
            if let Some(Err(e)) = topic_status.get(&topic) {
                refused.insert(key);
                pending.push(Pending::Failed(e.clone(), span));
                continue;
            }
            if refused.contains(&key) {
                pending.push(Pending::Failed(
                    PublishError::transient("not sent: behind a failed event of its aggregate"),
                    span,
                ));
                continue;
            }
            let wire = self.encoder.encode(
                event,
                span.traceparent.as_deref(),
                span.tracestate.as_deref(),
            );
            let mut headers = OwnedHeaders::new_with_capacity(wire.headers.len());
            for (key, value) in &wire.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                .key(message_key.as_bytes())
                .headers(headers);
            if let Some(body) = &wire.body {
                record = record.payload(body);
            }
            if let Some(ts) = event.created_at_ms {
                record = record.timestamp(ts);
            }
            let sent = loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: let deliveries drain, then try again.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            match sent {
                Ok(delivery) => {
                    let counted = InFlight::new(&self.in_flight);
                    pending.push(Pending::Sent(delivery, topic, span, counted));
                }
                Err(e) => {
                    note_failure(&self.reports, &e, &topic);
                    refused.insert(key);
                    pending.push(Pending::Failed(classify(&e), span));
                }
            }
        }
        let reports = self.reports.clone();
        let template = self.topic.clone();
        Box::pin(async move {
            let mut results = Vec::with_capacity(pending.len());
            let mut tally = PublishTally::new("kafka");
            for p in pending {
                let (result, span, topic) = match p {
                    Pending::Failed(e, span) => (Err(e), span, None),
                    Pending::Sent(delivery, topic, span, counted) => {
                        let result = match delivery.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((e, _))) => {
                                note_failure(&reports, &e, &topic);
                                Err(classify(&e))
                            }
                            Err(_) => Err(PublishError::unavailable(
                                "the Kafka producer dropped the delivery report",
                            )),
                        };
                        drop(counted);
                        (result, span, Some(topic))
                    }
                };
                // Failures are counted by kind only; the topic names a success's series.
                let label = topic.as_deref().map_or("", |t| template.metric_label(t));
                span.end(&result, label, &mut tally);
                results.push(result);
            }
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                warn!(error = %e, "Kafka publish failures in batch");
            }
            results
        })
    }

    fn system(&self) -> &'static str {
        "kafka"
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::{Refusal, explain_unreachable, refusal};

    #[test]
    fn only_a_refused_certificate_or_login_ends_the_wait() {
        assert_eq!(refusal(REFUSED), Some(Refusal::Certificate));
        assert_eq!(
            refusal(
                "sasl_plaintext://b:9104/bootstrap: SASL authentication error: SASL SCRAM authentication failed: broker responded with invalid-proof"
            ),
            Some(Refusal::Login)
        );
        // A broker restarting mid-handshake is not a refusal.
        assert_eq!(
            refusal(
                "ssl://b:9093/bootstrap: SSL handshake failed: Disconnected: connection reset by peer"
            ),
            None
        );
        assert_eq!(refusal("1/1 brokers are down"), None);
    }

    /// librdkafka 2.12's report of a certificate it could not verify.
    const REFUSED: &str = "ssl://localhost:9193/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 18ms in state SSL_HANDSHAKE)";
    const FETCH: &str =
        "Meta data fetch error: BrokerTransportFailure (Local: Broker transport failure)";

    #[test]
    fn a_refused_certificate_names_the_tls_settings_not_the_broker_list() {
        let msg = explain_unreachable("localhost:9193", FETCH, Some(REFUSED));
        assert!(
            msg.starts_with("cannot reach Kafka at localhost:9193: the TLS handshake failed (")
                && msg.contains("set kafka.properties ssl.ca.location")
                && !msg.contains("BrokerTransportFailure"),
            "{msg}"
        );
    }

    #[test]
    fn a_refused_login_names_the_sasl_settings() {
        let reason = "sasl_ssl://b:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512";
        let msg = explain_unreachable("b:9093", FETCH, Some(reason));
        assert!(
            msg.contains("SASL authentication failed") && msg.contains("sasl.username"),
            "{msg}"
        );
    }

    #[test]
    fn an_unreachable_broker_names_the_broker_list() {
        let msg = explain_unreachable("127.0.0.1:1", FETCH, None);
        assert!(msg.contains("RELAY_KAFKA_BROKERS"), "{msg}");
        let reason =
            "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused";
        let msg = explain_unreachable("127.0.0.1:1", FETCH, Some(reason));
        assert!(
            msg.contains("Connection refused") && msg.contains("RELAY_KAFKA_BROKERS"),
            "{msg}"
        );
    }
}
