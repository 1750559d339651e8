//! Kafka side: topics, the plain-producer ceiling with the relay's producer settings, and a
//! consumer that counts what it reads (tansu's high watermarks can lag behind what it serves,
//! so completion is judged by the ids read, never by offsets).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

use crate::ctx::Seen;
use crate::pg::now_us;
use crate::pg::{self, AGGREGATE_TYPE, EVENT_TYPE, TRACEPARENT};

pub const PARTITIONS: i32 = 3;

/// The relay's producer settings (`relay/src/sink/kafka/mod.rs`, `client_config`).
fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "relay-bench")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000")
        .set("allow.auto.create.topics", "false");
    c
}

fn admin(brokers: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("cannot create the Kafka admin client")
}

/// Creates `topic` (the broker does not create topics on first produce) and waits until its
/// metadata shows every partition.
pub async fn create_topic(brokers: &str, topic: &str) -> Result<()> {
    let results = admin(brokers)?
        .create_topics(
            [&NewTopic::new(
                topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .with_context(|| format!("cannot create topic {topic}; is Kafka up at {brokers}?"))?;
    for r in results {
        if let Err((name, code)) = r
            && code != RDKafkaErrorCode::TopicAlreadyExists
        {
            bail!("cannot create topic {name}: {code}");
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for _ in 0..100 {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(2))
            && md
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.partitions().len() == PARTITIONS as usize)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("topic {topic} did not show up in the metadata")
}

/// Best effort: tansu keeps topics in memory.
pub async fn delete_topic(brokers: &str, topic: &str) {
    if let Ok(a) = admin(brokers) {
        let _ = a.delete_topics(&[topic], &AdminOptions::new()).await;
    }
}

/// A producer with the relay's settings that has delivered one warm-up message to `topic`
/// (producer id and topic metadata fetched before a clock starts; consumers skip it: no `id`).
pub(crate) async fn warm_producer(brokers: &str, topic: &str) -> Result<FutureProducer> {
    let producer: FutureProducer = producer_config(brokers)
        .create()
        .context("cannot create the Kafka producer")?;
    producer
        .send(
            FutureRecord::to(topic).key("warm-up").payload("{}"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| anyhow!("warm-up produce to {topic} failed: {e}"))?;
    Ok(producer)
}

/// Plain producer with the relay's settings: `n` messages (512-byte payload, key = aggregate id,
/// the relay's headers) all in flight as fast as librdkafka takes them, until the last delivery
/// report. Returns the time from the first send to the last report.
pub async fn producer_ceiling(
    brokers: &str,
    topic: &str,
    n: u64,
    aggregates: u64,
) -> Result<Duration> {
    let producer = warm_producer(brokers, topic).await?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(n as usize);
    for i in 0..n {
        let agg = pg::aggregate_id(i % aggregates);
        let id = Uuid::new_v4().to_string();
        let body = pg::payload(&agg, i / aggregates, Some(now_us()));
        let headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: "id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(EVENT_TYPE),
            })
            .insert(Header {
                key: "aggregate_type",
                value: Some(AGGREGATE_TYPE),
            })
            .insert(Header {
                key: "aggregate_id",
                value: Some(agg.as_str()),
            })
            .insert(Header {
                key: "traceparent",
                value: Some(TRACEPARENT),
            });
        let mut record = FutureRecord::to(topic)
            .key(agg.as_str())
            .payload(body.as_str())
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => bail!("produce failed: {e}"),
            }
        }
    }
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("delivery failed: {e}"),
            Err(_) => bail!("delivery report dropped"),
        }
    }
    Ok(started.elapsed())
}

/// A consumer thread that reads every partition of `topic` from the beginning until it has
/// seen `target` (which may be raised or lowered while it runs) distinct event ids written at or after `since_us` (server clock, `t_us`),
/// `stop` is set, or `deadline` passes.
pub fn spawn_consumer(
    brokers: &str,
    topic: &str,
    target: Arc<AtomicUsize>,
    since_us: i64,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<Vec<Seen>>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("relay-bench-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.error.backoff.ms", "10")
        .set("enable.partition.eof", "false")
        .create()
        .context("cannot create the Kafka consumer")?;
    // Assigned at the partitions' first offsets, looked up here (before the caller starts its
    // clock), not at `Offset::Beginning`: librdkafka resolves that with its own offset request
    // once assigned, and against tansu the first message then arrives 0.5 s later even when
    // it is already there, which a drain would count as the relay's time.
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        let (low, _) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .with_context(|| format!("cannot read the offsets of {topic} [{p}]"))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut distinct: HashSet<u128> = HashSet::new();
        while distinct.len() < target.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && !stop.load(Ordering::Relaxed)
        {
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("relay-bench: kafka consumer: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let recv_us = now_us();
            let id = msg.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "id")
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| Uuid::parse_str(v).ok())
            });
            let Some(id) = id else { continue };
            let t_us = msg.payload().and_then(pg::payload_t_us);
            if t_us.is_some_and(|t| t < since_us) {
                continue; // written before this measurement
            }
            let id = id.as_u128();
            distinct.insert(id);
            seen.push(Seen {
                id,
                recv_us,
                t_us,
                order: msg.payload().and_then(pg::payload_order),
                bytes: msg.payload().map(<[u8]>::len).unwrap_or(0),
            });
        }
        Ok(seen)
    }))
}
