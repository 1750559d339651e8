//! Kafka sink (librdkafka through rdkafka, built statically).
//!
//! Idempotent producer with `acks=all`: librdkafka retries internally without reordering or
//! duplicating within a partition, and the key is the aggregate id, so one aggregate's events
//! stay in order in one partition. Many messages are in flight; every delivery report is
//! awaited. See <https://github.com/confluentinc/librdkafka/blob/master/INTRODUCTION.md#idempotent-producer>.
//!
//! Topics are checked (or created, when `kafka.create_topics` is set) the first time an event
//! names them: many managed Kafkas, and tansu, do not create topics on first produce.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use tracing::{info, warn};

use super::Sink;
use crate::config::KafkaConfig;
use crate::error::{Error, PublishError};
use crate::event::OutboxEvent;
use crate::telemetry::{Destination, start_publish_span};
use crate::template::Template;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic as the broker's metadata shows it.
enum TopicState {
    Exists,
    /// The broker answered, and it has no such topic.
    Missing,
    /// The broker answered with an error for the topic (e.g. while a leader moves).
    Unclear(String),
}

pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    topic: Template,
    config: KafkaConfig,
    known_topics: HashSet<String>,
}

/// The producer settings of DESIGN.md; `kafka.properties` are applied last and may add TLS/SASL.
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
        // A sidecar talks to a handful of brokers: after an outage, reconnect within a second
        // rather than librdkafka's default of up to 10 s (messages time out meanwhile).
        .set("reconnect.backoff.max.ms", "1000");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

impl KafkaSink {
    pub async fn connect(config: &KafkaConfig) -> Result<Self, Error> {
        let client_config = client_config(config);
        let producer: FutureProducer = client_config.create().map_err(|e| {
            Error::Config(format!(
                "cannot create the Kafka producer: {e}; check kafka.properties"
            ))
        })?;
        let admin: AdminClient<DefaultClientContext> = client_config
            .create()
            .map_err(|e| Error::Config(format!("cannot create the Kafka admin client: {e}")))?;
        let probe = producer.clone();
        let brokers = config.brokers.clone();
        tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, METADATA_TIMEOUT))
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
            topic: Template::parse(&config.topic).map_err(Error::Config)?,
            config: config.clone(),
            known_topics: HashSet::new(),
        })
    }

    /// Makes sure `topic` exists, creating it when configured to. `Err` is the message for every
    /// event bound to it.
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), PublishError> {
        if self.known_topics.contains(topic) {
            return Ok(());
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
                return Err(PublishError::permanent(format!(
                    "Kafka topic `{topic}` does not exist; create it, or set kafka.create_topics = true"
                )));
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

    /// Bookkeeping for a message that failed with `e`: a topic reported unknown is checked
    /// again (and created, if configured) before the retry. `true` when the producer itself
    /// must be replaced.
    fn failed(&mut self, e: &KafkaError, topic: &str) -> bool {
        if matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
        ) {
            self.known_topics.remove(topic);
        }
        producer_state_lost(e)
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
    let message = format!("Kafka refused the message: {e}");
    if permanent {
        PublishError::permanent(message)
    } else {
        PublishError::transient(message)
    }
}

impl Sink for KafkaSink {
    async fn publish(&mut self, events: &[&OutboxEvent]) -> Vec<Result<(), PublishError>> {
        let topics: Vec<String> = events.iter().map(|e| self.topic.render(e)).collect();
        let mut topic_status: std::collections::HashMap<String, Result<(), PublishError>> =
            Default::default();
        for topic in &topics {
            if !topic_status.contains_key(topic) {
                let status = self.ensure_topic(topic).await;
                topic_status.insert(topic.clone(), status);
            }
        }

        enum Pending {
            Sent(rdkafka::producer::DeliveryFuture),
            Failed(PublishError),
        }
        let mut pending = Vec::with_capacity(events.len());
        let mut renew_producer = false;
        let mut spans = Vec::with_capacity(events.len());
        for (event, topic) in events.iter().zip(&topics) {
            let span = start_publish_span(
                event,
                &Destination {
                    system: "kafka",
                    name: topic,
                    routing_key: None,
                },
            );
            let headers_of_event =
                event.message_headers(span.traceparent.as_deref(), span.tracestate.as_deref());
            spans.push(span);
            if let Some(Err(e)) = topic_status.get(topic) {
                pending.push(Pending::Failed(e.clone()));
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(8);
            for (key, value) in headers_of_event {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(topic)
                .key(event.aggregate_id.as_bytes())
                .payload(&event.payload)
                .headers(headers);
            if let Some(ts) = event.created_at_ms {
                record = record.timestamp(ts);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(Pending::Sent(delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: let deliveries drain, then try again.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        renew_producer |= self.failed(&e, topic);
                        pending.push(Pending::Failed(classify(&e)));
                        break;
                    }
                }
            }
        }
        let mut results = Vec::with_capacity(events.len());
        for ((p, span), topic) in pending.into_iter().zip(spans).zip(&topics) {
            let result = match p {
                Pending::Failed(e) => Err(e),
                Pending::Sent(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => {
                        renew_producer |= self.failed(&e, topic);
                        Err(classify(&e))
                    }
                    Err(_) => Err(PublishError::transient(
                        "the Kafka producer dropped the delivery report",
                    )),
                },
            };
            span.end(&result);
            results.push(result);
        }
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            warn!(error = %e, "Kafka publish failures in batch");
        }

        // An idempotent producer that hit a fatal error, or whose identity the broker no longer
        // accepts (fenced epoch, sequence gap), fails every later message: start a new one.
        // Every delivery report of this batch has arrived, so nothing is in flight on the old
        // one; the failed events are retried, in order, on the new one.
        let fatal = self.producer.client().fatal_error();
        if renew_producer || fatal.is_some() {
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
                    crate::metrics::record_producer_renewed();
                }
                Err(e) => warn!(error = %e, "cannot create a new Kafka producer; retrying later"),
            }
        }
        results
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
