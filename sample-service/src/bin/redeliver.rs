//! `redeliver <event-id>`: publishes an outbox event to the broker again (a duplicate
//! delivery), for the demo.
//!
//! Env: `DATABASE_URL` (the outbox's database), `REDELIVER_BROKER` (`kafka` | `rabbitmq`),
//! `RELAY_KAFKA_BROKERS`, `REDELIVER_TOPIC` (default `outbox.event.{aggregate_type}`),
//! `RELAY_AMQP_URL`, `REDELIVER_EXCHANGE` (default `outbox`), `REDELIVER_TABLE` (`outbox`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use sample_service::env::{first_of, string};
use sample_service::redeliver::{Target, redeliver};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match try_main().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redeliver: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn try_main() -> anyhow::Result<()> {
    let id = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: redeliver <event-id>"))?
        .parse()?;
    let database_url =
        first_of(&["DATABASE_URL"]).ok_or_else(|| anyhow::anyhow!("DATABASE_URL is not set"))?;
    let target = match string("REDELIVER_BROKER", "kafka").as_str() {
        "kafka" => Target::Kafka {
            brokers: string("RELAY_KAFKA_BROKERS", "127.0.0.1:9092"),
            topic: string("REDELIVER_TOPIC", "outbox.event.{aggregate_type}"),
        },
        "rabbitmq" => Target::Rabbitmq {
            url: string("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: string("REDELIVER_EXCHANGE", "outbox"),
        },
        other => anyhow::bail!("REDELIVER_BROKER={other:?}: use kafka or rabbitmq"),
    };
    redeliver(
        &database_url,
        &string("REDELIVER_TABLE", "outbox"),
        id,
        &target,
    )
    .await
}
