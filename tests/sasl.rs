//! SASL/SCRAM-SHA-512 to Kafka (`scripts/services tls`): a tansu broker on 127.0.0.1:9104 that
//! serves nothing before a login, with the user `relay-sasl`. It is a fourth broker of the
//! Kafka cluster (same storage), so the consumer reads what the relay sent through kafka-1.
//!
//! With the right password every event arrives; with a wrong one the relay stops at start-up
//! with one message naming the SASL settings (never the password), and the events wait in the
//! outbox.

use std::time::Duration;

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(60);
const SASL_BROKER: &str = "127.0.0.1:9104";
const PLAIN_BROKER: &str = "127.0.0.1:9101";
const PASSWORD: &str = "s3cret-sasl";

async fn scenario(password: &str) -> Scenario {
    let mut s = Scenario::of(
        Mode::Poll,
        Broker::Kafka,
        &format!(
            "[kafka.properties]\n\"security.protocol\" = \"sasl_plaintext\"\n\
             \"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"relay-sasl\"\n\
             \"sasl.password\" = \"{password}\"\n"
        ),
    )
    .await;
    s.kafka_brokers = SASL_BROKER.into();
    assert!(
        listening(9104),
        "nothing listens on {SASL_BROKER}: run scripts/services tls"
    );
    s
}

fn reader(s: &Scenario) -> AnyReader {
    let mut r = kafka::Reader::new(PLAIN_BROKER);
    r.add_topic(s.topic("wallet"));
    AnyReader::Kafka(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_a_sasl_scram_login_gets_every_event() {
    let s = scenario(PASSWORD).await;
    s.migrate();
    let written = write_events(&s.db.url, "wallet", 4, 25, 2).await;
    relay_delivers_all(&s, &mut reader(&s), &written, READ_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_with_a_wrong_sasl_password_is_refused_with_one_clear_message_and_loses_nothing() {
    const WRONG: &str = "not-the-Passw0rd";
    let mut s = scenario(WRONG).await;
    s.migrate();
    let written = write_events(&s.db.url, "wallet", 3, 10, 1).await;
    let (error, logs) = refused_start(&s, Duration::from_secs(8));
    assert!(
        error.contains("cannot reach Kafka at 127.0.0.1:9104: SASL authentication failed")
            && error.contains("sasl.password"),
        "{}",
        error
    );
    assert!(!logs.contains(WRONG), "the password was printed:\n{logs}");
    // The right password: everything that waited arrives.
    s.extra_toml = s.extra_toml.replace(WRONG, PASSWORD);
    relay_delivers_all(&s, &mut reader(&s), &written, READ_TIMEOUT).await;
}
