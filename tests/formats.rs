//! The ecosystem's formats: CloudEvents read back by the official SDK's protocol bindings,
//! templates that name any column (and dead letters that keep it), `{partition}` routing that
//! matches Kafka's partitioner, and tombstones for a NULL payload.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_client::partitions;
use outbox_relay::partition;

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(60);

for_both_sources! {
    cloudevents_binary_on_kafka_is_read_by_the_official_sdk => |m| cloudevents_read_by_the_sdk(m, Broker::Kafka, "binary");
    cloudevents_binary_on_rabbitmq_is_read_by_the_official_sdk => |m| cloudevents_read_by_the_sdk(m, Broker::Rabbitmq, "binary");
    templates_route_kafka_topics_and_keys_by_any_column => templates_name_any_column;
    rabbitmq_partitions_put_each_aggregate_on_one_queue_and_use_them_all => rabbitmq_partitions;
    a_null_payload_is_a_kafka_tombstone_when_asked_for => kafka_tombstones;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_structured_on_kafka_is_read_by_the_official_sdk() {
    cloudevents_read_by_the_sdk(Mode::Poll, Broker::Kafka, "structured").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_structured_on_rabbitmq_is_read_by_the_official_sdk() {
    cloudevents_read_by_the_sdk(Mode::Wal, Broker::Rabbitmq, "structured").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_partitions_follow_the_same_murmur2_as_rabbitmq_partition_routing() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Kafka,
        "", // the scenario's topics are created with 3 partitions
    )
    .await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 60, 3, 4).await;
    let received = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &received).assert_complete_and_ordered();
    let mut used = HashSet::new();
    for r in &received {
        let aggregate_id = r.key.as_deref().unwrap();
        let expected = partition::of(aggregate_id, 3) as i32;
        assert_eq!(
            r.partition,
            Some(expected),
            "{aggregate_id}: the relay's producer and {{partition}} must agree"
        );
        used.insert(expected);
    }
    assert_eq!(used.len(), 3, "60 aggregates use every partition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_the_column_its_routing_key_names_and_a_retry_restores_it() {
    let s = Scenario::with_destination(Mode::Poll, Broker::Rabbitmq, |d| {
        format!(
            "[rabbitmq]\nexchange = \"{d}\"\nrouting_key = \"{{tenant}}.{{event_type}}\"\n\
             [delivery]\nbackoff_initial = \"100ms\"\nbackoff_max = \"200ms\"\n"
        )
    })
    .await;
    s.migrate();
    let client = s.db.client().await;
    client
        .batch_execute("ALTER TABLE outbox ADD COLUMN tenant text")
        .await
        .unwrap();
    let mut acme = AnyReader::Amqp(s.amqp_reader("acme.#").await);
    let relay = s.start_relay();
    let routed = insert_with_tenant(&client, "w-1", Some("acme"), 0).await;
    let stray = insert_with_tenant(&client, "w-2", Some("nowhere"), 0).await;
    let got = acme.read_until(&[routed], READ_TIMEOUT).await;
    assert_eq!(got[0].destination, "acme.Happened");
    // `nowhere.Happened` has no queue: unroutable, a dead letter that keeps its tenant.
    let kept = || async {
        client
            .query_opt(
                "SELECT columns::text, error FROM outbox_dead_letters WHERE event_id = $1",
                &[&stray.id],
            )
            .await
            .unwrap()
            .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, String>(1)))
    };
    assert!(
        eventually(Duration::from_secs(30), || async { kept().await.is_some() }).await,
        "the unroutable event is dead-lettered; relay log:\n{}",
        relay.logs()
    );
    let (columns, error) = kept().await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(columns.as_deref().unwrap()).unwrap(),
        serde_json::json!({"tenant": "nowhere"})
    );
    assert!(error.contains("nowhere.Happened"), "{error}");
    // A queue for it now exists: the retried row must carry its tenant again to get there.
    let mut nowhere = AnyReader::Amqp(s.amqp_reader("nowhere.#").await);
    let out = s.command(&["dead-letters", "retry", "--id", &stray.id]);
    assert!(out.status.success(), "{}", out.stderr);
    let got = nowhere.read_until(&[stray], READ_TIMEOUT).await;
    assert_eq!(got.len(), 1, "relay log:\n{}", relay.logs());
    assert_eq!(got[0].destination, "nowhere.Happened");
    // A NULL tenant cannot be routed at all: a dead letter that says why.
    let null = insert_with_tenant(&client, "w-3", None, 0).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            client
                .query_opt(
                    "SELECT error FROM outbox_dead_letters WHERE event_id = $1",
                    &[&null.id],
                )
                .await
                .unwrap()
                .is_some_and(|r| r.get::<_, String>(0).contains("column `tenant` is NULL"))
        })
        .await,
        "relay log:\n{}",
        relay.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tombstones_a_null_payload_is_a_dead_letter_that_says_why() {
    for broker in [Broker::Kafka, Broker::Rabbitmq] {
        let s = Scenario::of(Mode::Poll, broker, "").await;
        s.migrate();
        let client = s.db.client().await;
        client
            .batch_execute("ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL")
            .await
            .unwrap();
        let mut reader = s.reader(&["wallet"]).await;
        let relay = s.start_relay();
        let null = insert_payload(&client, "w-1", None).await;
        let other = insert_payload(&client, "w-2", Some(serde_json::json!({"n": 0}))).await;
        let got = reader.read_until(&[other], READ_TIMEOUT).await;
        assert_eq!(got.len(), 1, "the other aggregate flows");
        let error = || async {
            client
                .query_opt(
                    "SELECT error, payload IS NULL FROM outbox_dead_letters WHERE event_id = $1",
                    &[&null.id],
                )
                .await
                .unwrap()
                .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
        };
        assert!(
            eventually(Duration::from_secs(30), || async {
                error().await.is_some()
            })
            .await,
            "{broker:?}: relay log:\n{}",
            relay.logs()
        );
        let (error, payload_null) = error().await.unwrap();
        assert!(error.contains("payload is NULL"), "{broker:?}: {error}");
        match broker {
            Broker::Kafka => assert!(error.contains("tombstone_on_null_payload"), "{error}"),
            Broker::Rabbitmq => assert!(error.contains("no tombstones"), "{error}"),
        }
        assert!(payload_null, "the dead letter keeps the NULL payload");
    }
}

/// Messages as the SDK's binding takes them, read by `tests/cloudevents/read.py` with the
/// official CloudEvents SDK (installed by `scripts/services` in `.run/py`).
fn sdk_read(broker: Broker, received: &[Received]) -> Vec<serde_json::Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".run/py/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/services (it installs the CloudEvents SDK there)",
        python.display()
    );
    let input: Vec<serde_json::Value> = received
        .iter()
        .map(|r| {
            serde_json::json!({
                "broker": match broker { Broker::Kafka => "kafka", Broker::Rabbitmq => "rabbitmq" },
                "headers": r.headers,
                "key": r.key,
                "content_type": r.amqp.as_ref().and_then(|p| p.content_type.clone()),
                "body_hex": r.body.as_deref().unwrap_or_default().iter().map(|b| format!("{b:02x}")).collect::<String>(),
            })
        })
        .collect();
    let mut child = Command::new(python)
        .arg(root.join("tests/cloudevents/read.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the CloudEvents reader");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the CloudEvents reader failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn cloudevents_read_by_the_sdk(mode: Mode, broker: Broker, content_mode: &str) {
    let s = Scenario::of(
        mode,
        broker,
        &format!("[message]\nformat = \"cloudevents\"\nmode = \"{content_mode}\"\n"),
    )
    .await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 5, 4, 2).await;
    let received = reader.read_until(&written, READ_TIMEOUT).await;
    let by_id: HashMap<&str, &Written> = written.iter().map(|w| (w.id.as_str(), w)).collect();
    let events = sdk_read(broker, &received);
    assert_eq!(events.len(), received.len());
    if let (Some(m), Some(e)) = (received.first(), events.first()) {
        eprintln!(
            "{broker:?} {content_mode}: key {:?}, headers {:?}, content type {:?}, body {}\nthe SDK read: {e}",
            m.key,
            m.headers,
            m.content_type(),
            String::from_utf8_lossy(m.body.as_deref().unwrap_or_default())
        );
    }
    let source = format!("/outbox-relay/{}/public.outbox", s.db.name);
    let mut seen = HashSet::new();
    let mut last_n: BTreeMap<String, u64> = BTreeMap::new();
    for (event, message) in events.iter().zip(&received) {
        assert!(
            event.get("error").is_none(),
            "the SDK refused {message:?}: {event}\nrelay log:\n{}",
            relay.logs()
        );
        let a = &event["attributes"];
        let id = a["id"].as_str().unwrap();
        let w = by_id.get(id).unwrap_or_else(|| panic!("unknown id {id}"));
        seen.insert(id.to_string());
        assert_eq!(a["specversion"], "1.0");
        assert_eq!(a["type"], "Happened");
        assert_eq!(a["subject"], w.aggregate_id.as_str());
        assert_eq!(a["source"], source.as_str());
        assert_eq!(a["aggregatetype"], "wallet");
        assert_eq!(a["datacontenttype"], "application/json");
        assert!(
            a["time"].as_str().is_some_and(|t| t.starts_with("20")),
            "{a}"
        );
        let tp = a["traceparent"].as_str().unwrap_or_default();
        assert!(tp.contains(TRACE_ID), "the writer's trace: {a}");
        assert_eq!(event["data"]["n"], w.n, "{event}");
        assert_eq!(event["data"]["aggregate_id"], w.aggregate_id.as_str());
        // OpenTelemetry's propagators read the plain header in both modes.
        assert!(message.headers["traceparent"].contains(TRACE_ID));
        if broker == Broker::Kafka {
            assert_eq!(message.key.as_deref(), Some(w.aggregate_id.as_str()));
        }
        let last = last_n.entry(w.aggregate_id.clone()).or_insert(0);
        assert!(w.n >= *last, "order per aggregate");
        *last = w.n;
    }
    assert_eq!(seen.len(), written.len(), "every event, read by the SDK");
}

async fn insert_with_tenant(
    client: &tokio_postgres::Client,
    aggregate_id: &str,
    tenant: Option<&str>,
    n: u64,
) -> Written {
    let id = uuid::Uuid::new_v4();
    client
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, tenant) \
             VALUES ($1, 'wallet', $2, 'Happened', $3, $4)",
            &[&id, &aggregate_id, &serde_json::json!({"n": n}), &tenant],
        )
        .await
        .unwrap();
    Written {
        id: id.to_string(),
        aggregate_id: aggregate_id.into(),
        n,
    }
}

async fn insert_payload(
    client: &tokio_postgres::Client,
    aggregate_id: &str,
    payload: Option<serde_json::Value>,
) -> Written {
    let id = uuid::Uuid::new_v4();
    client
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, 'wallet', $2, 'Happened', $3)",
            &[&id, &aggregate_id, &payload],
        )
        .await
        .unwrap();
    Written {
        id: id.to_string(),
        aggregate_id: aggregate_id.into(),
        n: 0,
    }
}

async fn templates_name_any_column(mode: Mode) {
    let s = Scenario::with_destination(mode, Broker::Kafka, |d| {
        format!("[kafka]\ntopic = \"{}.{{tenant}}\"\nkey = \"{{tenant}}/{{aggregate_id}}\"\ncreate_topics = true\nmessage_timeout = \"10s\"\n", d)
    })
    .await;
    s.migrate();
    let client = s.db.client().await;
    client
        .batch_execute("ALTER TABLE outbox ADD COLUMN tenant text")
        .await
        .unwrap();
    let mut reader = s.kafka_reader().await;
    reader.add_topic(format!("{}.acme", s.destination));
    reader.add_topic(format!("{}.globex", s.destination));
    let mut reader = AnyReader::Kafka(reader);
    let relay = s.start_relay();
    let mut written = Vec::new();
    let mut tenant_of = HashMap::new();
    for n in 0..3 {
        for (aggregate, tenant) in [("w-1", "acme"), ("w-2", "globex"), ("w-3", "acme")] {
            let w = insert_with_tenant(&client, aggregate, Some(tenant), n).await;
            tenant_of.insert(w.id.clone(), tenant);
            written.push(w);
        }
    }
    let received = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &received).assert_complete_and_ordered();
    let aggregate_of: HashMap<&str, &str> = written
        .iter()
        .map(|w| (w.id.as_str(), w.aggregate_id.as_str()))
        .collect();
    for r in &received {
        let tenant = tenant_of[r.id()];
        assert_eq!(r.destination, format!("{}.{tenant}", s.destination));
        assert_eq!(
            r.key.as_deref(),
            Some(format!("{tenant}/{}", aggregate_of[r.id()]).as_str()),
            "relay log:\n{}",
            relay.logs()
        );
    }
}

async fn rabbitmq_partitions(mode: Mode) {
    let s = Scenario::with_destination(mode, Broker::Rabbitmq, |d| {
        format!("[rabbitmq]\nexchange = \"{}\"\nrouting_key = \"{{aggregate_type}}.{{partition}}\"\npartitions = 4\n", d)
    })
    .await;
    s.migrate();
    // The queues come from the consumer helper users get, `outbox_client::partitions`.
    let queues = {
        let conn = lapin::Connection::connect(AMQP_URL, Default::default())
            .await
            .expect("RabbitMQ reachable at 127.0.0.1:5672; run scripts/services");
        let channel = conn.create_channel().await.unwrap();
        amqp::declare_exchange(&channel, &s.destination)
            .await
            .unwrap();
        let spec = partitions::PartitionedQueues::new(
            &s.destination,
            "wallet.{partition}",
            4,
            &unique("billing"),
        );
        let names = partitions::declare(&channel, &spec).await.unwrap();
        assert_eq!(names.len(), 4);
        names
    };
    let mut readers = Vec::new();
    for queue in &queues {
        readers.push(AnyReader::Amqp(
            amqp::Reader::on_queue(&s.destination, queue).await,
        ));
    }
    let relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 40, 5, 4).await;
    let aggregate_of: HashMap<&str, &str> = written
        .iter()
        .map(|w| (w.id.as_str(), w.aggregate_id.as_str()))
        .collect();
    // Each queue reads what it gets; together they must have everything.
    let mut all = Vec::new();
    let mut partition_of: HashMap<String, HashSet<u32>> = HashMap::new();
    for (p, reader) in readers.iter_mut().enumerate() {
        let want: Vec<Written> = written
            .iter()
            .filter(|w| partition::of(&w.aggregate_id, 4) == p as u32)
            .map(|w| Written {
                id: w.id.clone(),
                aggregate_id: w.aggregate_id.clone(),
                n: w.n,
            })
            .collect();
        assert!(!want.is_empty(), "40 aggregates use partition {p}");
        let got = reader.read_until(&want, READ_TIMEOUT).await;
        for r in &got {
            assert_eq!(r.destination, format!("wallet.{p}"));
            partition_of
                .entry(aggregate_of[r.id()].to_string())
                .or_default()
                .insert(p as u32);
        }
        all.extend(got);
    }
    let t = tally(&written, &all);
    eprintln!("{mode:?} partitions: {t:?}");
    t.assert_complete_and_ordered();
    for (aggregate, partitions) in &partition_of {
        assert_eq!(
            partitions.len(),
            1,
            "{aggregate} must stay on one partition: {partitions:?}; relay log:\n{}",
            relay.logs()
        );
    }
}

async fn kafka_tombstones(mode: Mode) {
    let s = Scenario::with_destination(mode, Broker::Kafka, |d| {
        format!("[kafka]\ntopic = \"{}.{{aggregate_type}}\"\ncreate_topics = true\ntombstone_on_null_payload = true\nmessage_timeout = \"10s\"\n", d)
    })
    .await;
    s.migrate();
    let client = s.db.client().await;
    client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL")
        .await
        .unwrap();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let created = insert_payload(&client, "w-1", Some(serde_json::json!({"n": 0}))).await;
    let deleted = insert_payload(&client, "w-1", None).await;
    let (created_id, deleted_id) = (created.id.clone(), deleted.id.clone());
    let got = reader.read_until(&[created, deleted], READ_TIMEOUT).await;
    let ids: Vec<&str> = got.iter().map(|r| r.id()).collect();
    assert_eq!(
        ids,
        [created_id.as_str(), deleted_id.as_str()],
        "in order; relay log:\n{}",
        relay.logs()
    );
    let tombstone = &got[1];
    assert_eq!(tombstone.key.as_deref(), Some("w-1"));
    assert_eq!(tombstone.body, None, "a tombstone's value is null");
    assert!(got[0].body.is_some());
}
