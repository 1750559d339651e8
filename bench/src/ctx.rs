//! What every phase shares: the arguments and settings, the run id that names this run's
//! databases, slots, topics and exchanges (so that runs on the same services never read each
//! other's events), the notes the report carries, and the consumer that reads back what the
//! relay published. A phase that failed is retried from here rather than failing the run,
//! because Postgres and the brokers are shared with other tests that restart them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::args::Args;
use crate::combo::{Combo, SinkKind};
use crate::pg::BenchDb;
use crate::relay::Setup;
use crate::report::Settings;
use crate::{amqp, kafka};

/// Attempts per phase before the run gives up.
pub(crate) const ATTEMPTS: u32 = 3;

/// One message as the consumer read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    pub(crate) id: u128,
    /// Wall clock when the consumer got it.
    pub(crate) recv_us: i64,
    /// `clock_timestamp()` at insert, from the payload.
    pub(crate) t_us: Option<i64>,
    /// `(aggregate, sequence number within it)`, from the payload.
    pub(crate) order: Option<(u64, u64)>,
    pub(crate) bytes: usize,
}

pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) settings: Settings,
    pub(crate) run_id: String,
    pub(crate) dir: PathBuf,
    pub(crate) notes: Vec<String>,
    pub(crate) started: Instant,
}

impl Ctx {
    pub(crate) fn setup(&self, combo: Combo, db: &BenchDb, phase: &str) -> Setup {
        let name = format!("bench_{}_{}_{phase}", self.run_id, combo.label());
        Setup {
            bin: self.args.relay_bin.clone(),
            dir: self.dir.clone(),
            database_url: db.url.clone(),
            combo,
            kafka_brokers: self.args.kafka_brokers.clone(),
            amqp_url: self.args.amqp_url.clone(),
            destination: name.clone(),
            slot: name,
            extra_env: self
                .args
                .relay_env
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The topic, or the exchange with a bound queue, before anything is published.
    pub(crate) async fn prepare_broker(&self, setup: &Setup) -> Result<()> {
        match setup.combo.sink {
            SinkKind::Kafka => kafka::create_topic(&self.args.kafka_brokers, &setup.topic()).await,
            SinkKind::Rabbitmq => {
                amqp::declare(
                    &self.args.amqp_url,
                    &setup.destination,
                    &setup.destination,
                    "#",
                )
                .await
            }
        }
    }

    pub(crate) async fn cleanup_broker(&self, setup: &Setup) {
        match setup.combo.sink {
            SinkKind::Kafka => kafka::delete_topic(&self.args.kafka_brokers, &setup.topic()).await,
            SinkKind::Rabbitmq => {
                amqp::delete(&self.args.amqp_url, &setup.destination, &setup.destination).await
            }
        }
    }

    pub(crate) async fn consumer(
        &self,
        setup: &Setup,
        target: Arc<AtomicUsize>,
        since_us: i64,
        deadline: Instant,
        stop: Arc<AtomicBool>,
    ) -> Result<Consumer> {
        Ok(match setup.combo.sink {
            SinkKind::Kafka => Consumer::Kafka(kafka::spawn_consumer(
                &self.args.kafka_brokers,
                &setup.topic(),
                target,
                since_us,
                deadline,
                stop,
            )?),
            SinkKind::Rabbitmq => Consumer::Amqp(
                amqp::spawn_consumer(
                    &self.args.amqp_url,
                    &setup.destination,
                    target,
                    since_us,
                    deadline,
                    stop,
                )
                .await?,
            ),
        })
    }

    /// A phase failed: retried (fault tests running on the same machine restart the shared
    /// services), with a note in the report, or given up after [`ATTEMPTS`].
    pub(crate) async fn failed(
        &mut self,
        phase: &str,
        attempt: u32,
        e: anyhow::Error,
    ) -> Result<()> {
        if attempt >= ATTEMPTS {
            return Err(e.context(format!("{phase} failed {ATTEMPTS} times")));
        }
        self.log(format!(
            "{phase} failed (attempt {attempt}): {e:#}; retrying in 10 s"
        ));
        self.notes.push(format!(
            "{phase}: attempt {attempt} failed and was repeated: {e:#}"
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok(())
    }

    pub(crate) fn log(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[relay-bench {:>6.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

pub(crate) enum Consumer {
    Kafka(std::thread::JoinHandle<Result<Vec<Seen>>>),
    Amqp(tokio::task::JoinHandle<Result<Vec<Seen>>>),
}

impl Consumer {
    pub(crate) async fn join(self) -> Result<Vec<Seen>> {
        match self {
            Consumer::Kafka(h) => tokio::task::spawn_blocking(move || h.join())
                .await?
                .map_err(|_| anyhow::anyhow!("Kafka consumer thread panicked"))?,
            Consumer::Amqp(h) => h.await?,
        }
    }
}
