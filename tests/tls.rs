//! TLS to the brokers (`scripts/services tls`): amqps to the RabbitMQ cluster's TLS listeners
//! (127.0.0.1:5711-5713) and Kafka over TLS to a tansu broker (127.0.0.1:9193), both with a
//! server certificate for `localhost` signed by the test CA.
//!
//! The relay verifies the certificate: with the test CA every event arrives; with another CA,
//! or with a host name the certificate does not hold (127.0.0.1), it stops at start-up with
//! one message that names the setting to fix, and the events wait in the outbox for a relay
//! that is set up right.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// amqps on rabbit-1 (its plain port is 5701, where the consumer reads).
const AMQPS_PORT: u16 = 5711;
const KAFKA_TLS_PORT: u16 = 9193;

/// The test CA of `scripts/services tls`.
fn test_ca() -> PathBuf {
    let state = std::env::var("OUTBOX_RELAY_CLUSTER_STATE")
        .unwrap_or_else(|_| "/var/tmp/outbox-relay-clusters".into());
    let ca = Path::new(&state).join("tls/ca.pem");
    assert!(
        ca.exists(),
        "{} is missing: run scripts/services tls",
        ca.display()
    );
    ca
}

/// A CA of its own, which signed nothing the brokers present.
fn other_ca() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("other_ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, pem) = (dir.join("other-ca.key"), dir.join("other-ca.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the test CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&pem)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pem
}

fn amqps_url(host: &str) -> String {
    format!("amqps://guest:guest@{host}:{AMQPS_PORT}/%2f")
}

async fn rabbitmq_scenario(host: &str, ca: Option<&Path>) -> Scenario {
    let mut s = Scenario::with_destination(Mode::Poll, Broker::Rabbitmq, |d| {
        format!("[rabbitmq]\nexchange = \"{d}\"\n")
    })
    .await;
    if let Some(ca) = ca {
        s.extra_toml
            .push_str(&format!("tls_ca_file = \"{}\"\n", ca.display()));
    }
    s.extra_env.push(("RELAY_AMQP_URL".into(), amqps_url(host)));
    s
}

/// The consumer reads through rabbit-1's plain listener.
async fn rabbitmq_reader(s: &Scenario) -> AnyReader {
    AnyReader::Amqp(
        amqp::Reader::bind_on(
            "amqp://guest:guest@127.0.0.1:5701/%2f",
            &s.destination,
            "#",
            false,
        )
        .await
        .expect("the RabbitMQ cluster (127.0.0.1:5701) is not running: run scripts/services tls"),
    )
}

async fn kafka_scenario(host: &str, ca: &Path) -> Scenario {
    let mut s = Scenario::of(
        Mode::Poll,
        Broker::Kafka,
        &format!(
            "[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{}\"\n",
            ca.display()
        ),
    )
    .await;
    s.kafka_brokers = format!("{host}:{KAFKA_TLS_PORT}");
    s
}

/// The consumer reads over TLS too (the broker has no plain listener).
fn kafka_reader(s: &Scenario) -> AnyReader {
    let ca = test_ca();
    let mut r = kafka::Reader::with_config(
        &format!("localhost:{KAFKA_TLS_PORT}"),
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", ca.to_str().unwrap()),
        ],
    );
    r.add_topic(s.topic("wallet"));
    AnyReader::Kafka(r)
}

/// A refused certificate stops the relay at once (Kafka: without waiting out its 10 s
/// start-up check).
const REFUSED_WITHIN: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_amqps_verified_with_the_test_ca_gets_every_event() {
    let ca = test_ca();
    let s = rabbitmq_scenario("localhost", Some(&ca)).await;
    s.migrate();
    let mut reader = rabbitmq_reader(&s).await;
    let written = write_events(&s.db.url, "wallet", 4, 25, 2).await;
    let relay = relay_delivers_all(&s, &mut reader, &written, READ_TIMEOUT).await;
    assert!(
        relay.logs().contains("localhost:5711"),
        "the relay should log the amqps node it connected to:\n{}",
        relay.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_with_another_ca_is_refused_with_one_clear_message_and_loses_nothing() {
    let ca = test_ca();
    let wrong = other_ca();
    let mut s = rabbitmq_scenario("localhost", Some(&wrong)).await;
    s.migrate();
    let written = write_events(&s.db.url, "wallet", 3, 10, 1).await;
    let (error, _) = refused_start(&s, REFUSED_WITHIN);
    assert!(
        error.contains("localhost:5711")
            && error.contains("not signed by a CA of rabbitmq.tls_ca_file"),
        "{}",
        error
    );
    assert!(!error.contains("guest:guest"), "{}", error);
    // The same outbox, the test CA: everything that waited arrives.
    let mut reader = rabbitmq_reader(&s).await;
    s.extra_toml = s
        .extra_toml
        .replace(&wrong.display().to_string(), &ca.display().to_string());
    // The refusal lost nothing: a relay set up right sends every event that waited.
    relay_delivers_all(&s, &mut reader, &written, READ_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_under_a_host_name_the_certificate_lacks_is_refused_with_one_clear_message() {
    let ca = test_ca();
    // The certificate names `localhost` only: 127.0.0.1 is another host name.
    let s = rabbitmq_scenario("127.0.0.1", Some(&ca)).await;
    s.migrate();
    let (error, _) = refused_start(&s, REFUSED_WITHIN);
    assert!(
        error.contains("127.0.0.1:5711")
            && error.contains("is not for this host (IP address mismatch)")
            && error.contains("RELAY_AMQP_URL"),
        "{}",
        error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_verified_with_the_test_ca_gets_every_event() {
    let ca = test_ca();
    let s = kafka_scenario("localhost", &ca).await;
    s.migrate();
    let mut reader = kafka_reader(&s);
    let written = write_events(&s.db.url, "wallet", 4, 25, 2).await;
    relay_delivers_all(&s, &mut reader, &written, READ_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_another_ca_is_refused_with_one_clear_message_and_loses_nothing() {
    let ca = test_ca();
    let wrong = other_ca();
    let s = kafka_scenario("localhost", &wrong).await;
    s.migrate();
    let written = write_events(&s.db.url, "wallet", 3, 10, 1).await;
    let (error, _) = refused_start(&s, REFUSED_WITHIN);
    assert!(
        error.contains("localhost:9193")
            && error.contains("TLS handshake failed")
            && error.contains("ssl.ca.location"),
        "{}",
        error
    );
    let mut reader = kafka_reader(&s);
    let mut s = s;
    s.extra_toml = s
        .extra_toml
        .replace(&wrong.display().to_string(), &ca.display().to_string());
    // The refusal lost nothing: a relay set up right sends every event that waited.
    relay_delivers_all(&s, &mut reader, &written, READ_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_under_a_host_name_the_certificate_lacks_is_refused_with_one_clear_message() {
    let ca = test_ca();
    let s = kafka_scenario("127.0.0.1", &ca).await;
    s.migrate();
    let (error, _) = refused_start(&s, REFUSED_WITHIN);
    assert!(
        error.contains("127.0.0.1:9193") && error.contains("TLS handshake failed"),
        "{}",
        error
    );
}
