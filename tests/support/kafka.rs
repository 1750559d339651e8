//! A plain Kafka consumer: assigns every partition of the watched topics from the beginning
//! (no consumer group needed) and collects what it reads.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::Received;

pub struct Reader {
    consumer: StreamConsumer,
    topics: Vec<String>,
    /// Topics found so far, with their partitions (fetched once: the broker may be cut later).
    assigned: std::collections::BTreeMap<String, Vec<i32>>,
    seen: Vec<Received>,
    /// When each message of `seen` was read (same index): for measuring stalls.
    arrived: Vec<SystemTime>,
}

impl Reader {
    pub fn new(brokers: &str) -> Self {
        Self::with_config(brokers, &[])
    }

    /// A reader with librdkafka settings of its own besides the defaults (TLS, SASL).
    pub fn with_config(brokers: &str, extra: &[(&str, &str)]) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", super::unique("reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            // As the relay: back within a second of a broker's return, not librdkafka's 10 s,
            // so that a stall the tests measure is the relay's, not the consumer's.
            .set("reconnect.backoff.max.ms", "1000");
        for (k, v) in extra {
            config.set(*k, *v);
        }
        let consumer: StreamConsumer = config.create().expect("create Kafka consumer");
        Self {
            consumer,
            topics: vec![],
            assigned: Default::default(),
            seen: vec![],
            arrived: vec![],
        }
    }

    pub fn add_topic(&mut self, topic: String) {
        self.topics.push(topic);
    }

    /// When each message `read_until` returned was read, in the same order.
    pub fn arrivals(&self) -> &[SystemTime] {
        &self.arrived
    }

    /// Assigns partitions of topics that exist by now (the relay creates them lazily).
    /// `true` when the assignment changed (and reading restarted from the beginning).
    fn assign_new_topics(&mut self) -> bool {
        let mut changed = false;
        for topic in &self.topics {
            if self.assigned.contains_key(topic) {
                continue;
            }
            let Ok(md) = self
                .consumer
                .fetch_metadata(Some(topic), Duration::from_secs(2))
            else {
                continue;
            };
            if let Some(t) = md.topics().iter().find(|t| t.name() == topic)
                && t.error().is_none()
                && !t.partitions().is_empty()
            {
                let partitions = t.partitions().iter().map(|p| p.id()).collect();
                self.assigned.insert(topic.clone(), partitions);
                changed = true;
            }
        }
        if changed {
            // At each partition's low watermark, looked up here: assigned at
            // `Offset::Beginning`, librdkafka makes its own offset request once assigned, and
            // against tansu the first message then comes 0.5 s later (Beginning stays the
            // fallback when the lookup fails).
            let mut tpl = TopicPartitionList::new();
            for (topic, partitions) in &self.assigned {
                for p in partitions {
                    let offset = self
                        .consumer
                        .fetch_watermarks(topic, *p, Duration::from_secs(2))
                        .map_or(Offset::Beginning, |(low, _)| Offset::Offset(low));
                    tpl.add_partition_offset(topic, *p, offset).unwrap();
                }
            }
            // Re-assigning restarts every partition from the beginning: forget what we have.
            self.seen.clear();
            self.arrived.clear();
            self.consumer.assign(&tpl).expect("assign partitions");
        }
        changed
    }

    pub async fn read_until(&mut self, want: &HashSet<&str>, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut last_assign = Instant::now() - Duration::from_secs(10);
        let mut remaining = super::remaining(want, &self.seen);
        loop {
            if self.assigned.len() < self.topics.len()
                && last_assign.elapsed() > Duration::from_millis(500)
            {
                if self.assign_new_topics() {
                    remaining = super::remaining(want, &self.seen);
                }
                last_assign = Instant::now();
            }
            if remaining.is_empty() || Instant::now() >= deadline {
                return self.seen.clone();
            }
            if self.assigned.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            match tokio::time::timeout(Duration::from_millis(500), self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    let mut headers = BTreeMap::new();
                    if let Some(h) = m.headers() {
                        for header in h.iter() {
                            headers.insert(
                                header.key.to_string(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            );
                        }
                    }
                    let received = Received {
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        destination: m.topic().to_string(),
                        headers,
                        payload: serde_json::from_slice(m.payload().unwrap_or(b"null"))
                            .unwrap_or(serde_json::Value::Null),
                        body: m.payload().map(<[u8]>::to_vec),
                        partition: Some(m.partition()),
                        amqp: None,
                        redelivered: false,
                    };
                    remaining.remove(received.id());
                    self.seen.push(received);
                    self.arrived.push(SystemTime::now());
                }
                Ok(Err(e)) => {
                    eprintln!("kafka reader: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => {}
            }
        }
    }
}

/// Creates `topic` on the test broker.
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(super::KAFKA_BROKERS, topic, partitions).await
}

/// Creates `topic` through the bootstrap servers `brokers`.
pub async fn create_topic_on(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    for r in created {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}
