//! `relay-bench`: measures `outbox-relay` against the raw ceilings of this machine, in one run.
//!
//! 1. Ceilings: Postgres commit rate of outbox transactions; a plain producer with the relay's
//!    settings to Kafka and to RabbitMQ; Postgres alone handing the backlog out (pgoutput
//!    decoding through `pg_logical_slot_peek_binary_changes` for wal, a claim-and-read SQL loop
//!    for poll).
//! 2. Drain: a backlog written first, then the real relay binary started; timed from its start
//!    until a consumer has read every event (poll and wal × Kafka and RabbitMQ), for each key
//!    distribution of `--workloads` (spread, 10 aggregates, 1 aggregate, Zipf, one transaction),
//!    each with a time limit; the consumer checks per-aggregate order.
//! 3. Latency: writers at fixed offered rates; commit-to-consumer from per-event timestamps,
//!    commit-to-ack from the relay's own histogram.
//! 4. Footprint: the relay's peak RSS and CPU seconds, from `/proc`.
//! 5. Failure isolation (issue 11, [`faults`]): healthy latency with and without one aggregate
//!    whose every publish fails (RabbitMQ: nacked, transient; Kafka: topic missing, permanent).
//! 6. Duplicates per SIGKILL ([`faults`]): the relay killed and restarted under paced writers;
//!    missing events, duplicates per kill against the in-flight window, order.
//! 7. Report: `report.md`, `report.json`, `latency.svg`.
//!
//! Everything runs on one machine next to Postgres and the broker, so the harness's own writers
//! and consumers compete with the relay for the same cores; the ceilings are measured the same
//! way, so the ratios stay comparable.

mod amqp;
mod faults;
mod kafka;
mod pg;
mod relay;
mod report;
mod stats;
mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use uuid::Uuid;

use pg::BenchDb;
pub use pg::now_us;
use relay::Setup;
use report::{AckQuantiles, Ceilings, Drain, Latency, Measured, Report, Settings, WalCeiling};
use stats::{Buckets, Percentiles};
use workload::{OrderCheck, Workload};

const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
const BATCH_SIZE: &str = "outbox_relay_batch_size";
/// Attempts per phase before the run gives up.
const ATTEMPTS: u32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "relay-bench",
    about = "Benchmarks outbox-relay: ceilings, drain throughput, latency and footprint, in one run"
)]
struct Args {
    /// Short variant for CI: 20,000-event backlogs (2,000 for `1` and `10`), workloads
    /// spread,1,zipf, 10 s per drain at most, 5 s latency runs, 4 s failure-isolation runs,
    /// 5 s SIGKILL runs; reports to bench/results/quick unless --out is given. No timing
    /// assertions either way.
    #[arg(long)]
    quick: bool,
    /// The relay binary under test (a release build).
    #[arg(long, default_value = "target/release/outbox-relay")]
    relay_bin: PathBuf,
    /// Where report.md, report.json and latency.svg go [default: bench/results].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Events in each backlog [default: 200000, quick: 20000].
    #[arg(long)]
    events: Option<u64>,
    /// Aggregates the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    aggregates: u64,
    /// Drain backlogs, each drained by every combination: `spread` (uniform over --aggregates),
    /// `10` (10 aggregates), `1` (one aggregate), `zipf` (Zipf(1.1) over --aggregates),
    /// `one-txn` (at most 100,000 events in one transaction, over --aggregates)
    /// [default: spread,10,1,zipf,one-txn; quick: spread,1,zipf].
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Time limit of each drain from the relay's start; a drain not done by then is reported as
    /// timed out with the rate so far [default: 40, quick: 10].
    #[arg(long)]
    drain_limit_secs: Option<u64>,
    /// Events of the `1` and `10` backlogs (at most --events) [default: 100000, quick: 2000].
    #[arg(long)]
    hot_events: Option<u64>,
    /// Concurrent writer connections (commit ceiling, latency).
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Offered rates of the latency runs, events/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<u64>,
    /// Seconds per latency run [default: 60, quick: 5].
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Extra environment for the relay, e.g. `--relay-env RELAY_POLL__BATCH_SIZE=5000` (for
    /// experiments; the report lists what was set).
    #[arg(long, value_name = "KEY=VALUE")]
    relay_env: Vec<String>,
    /// Measure ceilings and drains only (no latency runs).
    #[arg(long)]
    no_latency: bool,
    /// Skip the failure-isolation runs (healthy latency with and without one failing aggregate).
    #[arg(long)]
    no_isolation: bool,
    /// Healthy offered rate of the failure-isolation runs, events/s.
    #[arg(long, default_value_t = 800)]
    isolation_rate: u64,
    /// Healthy aggregates of the failure-isolation runs.
    #[arg(long, default_value_t = 200)]
    isolation_aggregates: u64,
    /// Offered rate of the one failing aggregate, events/s.
    #[arg(long, default_value_t = 20)]
    isolation_failing_rate: u64,
    /// Seconds of each failure-isolation measurement (baseline, with failure) [default: 30,
    /// quick: 4].
    #[arg(long)]
    isolation_secs: Option<u64>,
    /// Skip the SIGKILL runs (duplicates per kill).
    #[arg(long)]
    no_kills: bool,
    /// SIGKILLs of the relay per SIGKILL run, at even intervals while the writers run.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Offered rate of the SIGKILL runs, events/s.
    #[arg(long, default_value_t = 2_000)]
    kill_rate: u64,
    /// Aggregates of the SIGKILL runs.
    #[arg(long, default_value_t = 1_000)]
    kill_aggregates: u64,
    /// Seconds of writing in each SIGKILL run [default: 15, quick: 5].
    #[arg(long)]
    kill_secs: Option<u64>,
    /// Only these source→sink combinations: poll-kafka, poll-rabbitmq, wal-kafka, wal-rabbitmq.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Poll,
    Wal,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Poll => "poll",
            SourceKind::Wal => "wal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Kafka,
    Rabbitmq,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Rabbitmq => "rabbitmq",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Combo {
    pub source: SourceKind,
    pub sink: SinkKind,
}

impl Combo {
    const ALL: [Combo; 4] = [
        Combo {
            source: SourceKind::Wal,
            sink: SinkKind::Kafka,
        },
        Combo {
            source: SourceKind::Poll,
            sink: SinkKind::Kafka,
        },
        Combo {
            source: SourceKind::Wal,
            sink: SinkKind::Rabbitmq,
        },
        Combo {
            source: SourceKind::Poll,
            sink: SinkKind::Rabbitmq,
        },
    ];

    /// `wal-kafka`: for names of databases, slots, topics, files.
    pub fn label(self) -> String {
        format!("{}_{}", self.source.as_str(), self.sink.as_str())
    }

    /// `wal → kafka`: for the report.
    pub fn title(self) -> String {
        format!("{} → {}", self.source.as_str(), self.sink.as_str())
    }
}

/// One message as the consumer read it.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub id: u128,
    /// Wall clock when the consumer got it.
    pub recv_us: i64,
    /// `clock_timestamp()` at insert, from the payload.
    pub t_us: Option<i64>,
    /// `(aggregate, sequence number within it)`, from the payload.
    pub order: Option<(u64, u64)>,
    pub bytes: usize,
}

struct Ctx {
    args: Args,
    settings: Settings,
    run_id: String,
    dir: PathBuf,
    notes: Vec<String>,
    started: Instant,
}

impl Ctx {
    fn setup(&self, combo: Combo, db: &BenchDb, phase: &str) -> Setup {
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
    async fn prepare_broker(&self, setup: &Setup) -> Result<()> {
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

    async fn cleanup_broker(&self, setup: &Setup) {
        match setup.combo.sink {
            SinkKind::Kafka => kafka::delete_topic(&self.args.kafka_brokers, &setup.topic()).await,
            SinkKind::Rabbitmq => {
                amqp::delete(&self.args.amqp_url, &setup.destination, &setup.destination).await
            }
        }
    }

    async fn consumer(
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

    /// A phase failed: retried (other engineers' fault tests restart the shared services), with
    /// a note in the report, or given up after [`ATTEMPTS`].
    async fn failed(&mut self, phase: &str, attempt: u32, e: anyhow::Error) -> Result<()> {
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

    fn log(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[relay-bench {:>6.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

enum Consumer {
    Kafka(std::thread::JoinHandle<Result<Vec<Seen>>>),
    Amqp(tokio::task::JoinHandle<Result<Vec<Seen>>>),
}

impl Consumer {
    async fn join(self) -> Result<Vec<Seen>> {
        match self {
            Consumer::Kafka(h) => tokio::task::spawn_blocking(move || h.join())
                .await?
                .map_err(|_| anyhow::anyhow!("Kafka consumer thread panicked"))?,
            Consumer::Amqp(h) => h.await?,
        }
    }
}

/// This run's arguments, without the paths `scripts/bench` fills in, each with a leading space.
fn command_line() -> String {
    let mut out = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--relay-bin" || a == "--out" {
            args.next();
            continue;
        }
        if a.starts_with("--relay-bin=") || a.starts_with("--out=") {
            continue;
        }
        out.push(' ');
        out.push_str(&a);
    }
    out
}

/// `host:port` of a URL, without credentials.
pub fn config_host(url: &str) -> String {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|x| x.1).unwrap_or(rest);
    rest.split('/').next().unwrap_or_default().to_string()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Ceilings that do not depend on a relay: commit rate, the brokers of `combos`, the poll source.
async fn ceilings(ctx: &mut Ctx, combos: &[Combo]) -> Result<Ceilings> {
    let a = &ctx.args;
    let s = ctx.settings.clone();
    let mut c = Ceilings {
        commit_writers: s.writers,
        ..Default::default()
    };

    // Once with the wal schema (plain table) and once with the poll schema, whose statement
    // trigger NOTIFYs at commit (Postgres serialises the commits of notifying transactions).
    // Only the sources and brokers some combination of this run uses.
    let uses_source = |k: SourceKind| combos.iter().any(|c| c.source == k);
    for (combo, listen) in [
        (Combo::ALL[0], false),
        (Combo::ALL[1], false),
        (Combo::ALL[1], true),
    ]
    .into_iter()
    .filter(|(c, _)| uses_source(c.source))
    {
        let schema = format!(
            "{} schema{}",
            combo.source.as_str(),
            if listen { " + LISTEN" } else { "" }
        );
        ctx.log(format!(
            "ceiling: Postgres commit rate ({schema}), {} writers, {} s",
            s.writers, s.commit_ceiling_secs
        ));
        let label = format!(
            "commit_{}{}",
            combo.source.as_str(),
            if listen { "_listen" } else { "" }
        );
        let db = BenchDb::create(&a.pg_admin_url, &ctx.run_id, &label).await?;
        let setup = ctx.setup(combo, &db, "commit");
        setup.migrate()?;
        let measured = pg::commit_ceiling(
            &db.url,
            s.writers,
            Duration::from_secs(s.commit_ceiling_secs),
            listen,
        )
        .await;
        db.drop_now().await?;
        let (n, rate) = measured?;
        match (combo.source, listen) {
            (SourceKind::Wal, _) => {
                c.commit_events = n;
                c.commit_events_per_sec = rate;
            }
            (SourceKind::Poll, false) => {
                c.commit_notify_events = n;
                c.commit_notify_events_per_sec = rate;
            }
            (SourceKind::Poll, true) => {
                c.commit_notify_listen_events = n;
                c.commit_notify_listen_events_per_sec = rate;
            }
        }
    }

    if combos.iter().any(|c| c.sink == SinkKind::Kafka) {
        ctx.log(format!(
            "ceiling: plain Kafka producer, {} messages",
            s.events
        ));
        let topic = format!("bench_{}_producer", ctx.run_id);
        kafka::create_topic(&a.kafka_brokers, &topic).await?;
        let t = kafka::producer_ceiling(&a.kafka_brokers, &topic, s.events, s.aggregates).await?;
        kafka::delete_topic(&a.kafka_brokers, &topic).await;
        c.kafka_producer_msgs_per_sec = s.events as f64 / t.as_secs_f64();
    }
    if combos.iter().any(|c| c.sink == SinkKind::Rabbitmq) {
        ctx.log(format!(
            "ceiling: plain RabbitMQ publisher, {} messages",
            s.events
        ));
        let exchange = format!("bench_{}_publisher", ctx.run_id);
        amqp::declare(&a.amqp_url, &exchange, &exchange, "#").await?;
        let t = amqp::publisher_ceiling(&a.amqp_url, &exchange, s.events, s.aggregates).await;
        amqp::delete(&a.amqp_url, &exchange, &exchange).await;
        c.rabbitmq_publisher_msgs_per_sec = s.events as f64 / t?.as_secs_f64();
    }

    if uses_source(SourceKind::Poll) {
        ctx.log(format!(
            "ceiling: poll source (SQL claim-and-read loop), {} events",
            s.events
        ));
        let db = BenchDb::create(&a.pg_admin_url, &ctx.run_id, "pollsql").await?;
        let setup = ctx.setup(Combo::ALL[1], &db, "pollsql");
        setup.migrate()?;
        pg::write_backlog(&db.url, s.events, s.aggregates, 4).await?;
        db.client()
            .await?
            .batch_execute("VACUUM ANALYZE outbox")
            .await?;
        let (rows, bytes, t) = pg::poll_ceiling(&db.url).await?;
        c.poll_source_events_per_sec = rows as f64 / t.as_secs_f64();
        c.poll_source_mb_per_sec = bytes as f64 / 1e6 / t.as_secs_f64();
        db.drop_now().await?;
    }
    Ok(c)
}

/// Backlog first, then the relay; timed until the consumer has read every event. The database,
/// topic or exchange are removed whatever the outcome.
async fn drain(
    ctx: &mut Ctx,
    combo: Combo,
    workload: Workload,
    ceilings: &mut Ceilings,
) -> Result<Drain> {
    let phase = format!("drain_{}", workload.label());
    let label = format!("{}_{phase}", combo.label());
    let db = BenchDb::create(&ctx.args.pg_admin_url, &ctx.run_id, &label).await?;
    let setup = ctx.setup(combo, &db, &phase);
    let result = drain_on(ctx, &db, &setup, workload, ceilings).await;
    ctx.cleanup_broker(&setup).await;
    let dropped = db.drop_now().await;
    let d = result?;
    dropped?;
    Ok(d)
}

async fn drain_on(
    ctx: &mut Ctx,
    db: &BenchDb,
    setup: &Setup,
    workload: Workload,
    ceilings: &mut Ceilings,
) -> Result<Drain> {
    let s = ctx.settings.clone();
    let combo = setup.combo;
    let events = s.events_of(workload);
    let title = format!("{} ({})", combo.title(), workload.name());
    ctx.log(format!(
        "drain {title}: writing {events} events, {}",
        workload.describe(s.aggregates)
    ));
    // In wal mode this creates the publication and the slot: before the backlog, so the slot
    // holds every event.
    setup.migrate()?;
    ctx.prepare_broker(setup).await?;
    let write = pg::write_events(
        &db.url,
        workload.keys(events, s.aggregates),
        4,
        workload.one_transaction(),
    )
    .await?;
    let client = db.client().await?;
    client.batch_execute("VACUUM ANALYZE outbox").await?;
    let avg_payload = pg::average_payload_bytes(&client).await?;
    let wal_end = pg::current_lsn(&client).await?;

    // The wal source ceiling of a combination is measured on its first backlog (`spread`
    // unless --workloads leaves it out) and used for all its workloads.
    let known_wal = ceilings
        .wal_source
        .iter()
        .find(|w| w.combo == combo.title())
        .map(|w| w.events_per_sec);
    let source_ceiling = match (combo.source, known_wal) {
        (SourceKind::Poll, _) => ceilings.poll_source_events_per_sec,
        (SourceKind::Wal, Some(rate)) if workload != Workload::Spread => rate,
        (SourceKind::Wal, _) => {
            ctx.log(format!("drain {title}: pgoutput decoding ceiling (peek)"));
            let (rows, t) = pg::peek_ceiling(&db.url, &setup.slot).await?;
            let rate = events as f64 / t.as_secs_f64();
            ceilings.wal_source.retain(|w| w.combo != combo.title());
            ceilings.wal_source.push(WalCeiling {
                combo: combo.title(),
                backlog: workload.name().into(),
                rows,
                seconds: t.as_secs_f64(),
                events_per_sec: rate,
            });
            rate
        }
    };
    let broker_ceiling = match combo.sink {
        SinkKind::Kafka => ceilings.kafka_producer_msgs_per_sec,
        SinkKind::Rabbitmq => ceilings.rabbitmq_publisher_msgs_per_sec,
    };

    let limit = Duration::from_secs(s.drain_limit_secs);
    ctx.log(format!(
        "drain {title}: relay started (time limit {} s)",
        limit.as_secs()
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + limit;
    let consumer = ctx
        .consumer(
            setup,
            Arc::new(AtomicUsize::new(events as usize)),
            0,
            deadline,
            stop.clone(),
        )
        .await?;
    let cpu_before = relay::CpuSnapshot::take();
    let start_us = now_us();
    let mut relay = setup.start()?;
    // The source's view: outbox drained (poll) or slot confirmed past the backlog (wal).
    let monitor = {
        let url = db.url.clone();
        let slot = setup.slot.clone();
        let source = combo.source;
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = pg::connect(&url).await?;
            while !stop.load(Ordering::Relaxed) {
                let done = match source {
                    SourceKind::Poll => pg::pending_poll(&client).await? == 0,
                    SourceKind::Wal => pg::slot_reached(&client, &slot, &wal_end).await?,
                };
                if done {
                    return anyhow::Ok(Some(now_us()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(None)
        })
    };
    let metrics_addr = relay.metrics_addr().await;
    let seen = consumer.join().await?;
    let end_us = now_us();
    let cpu_wall = (end_us - start_us) as f64 / 1e6;
    let cpu_share = relay::CpuSnapshot::take().since(&cpu_before, relay.pid(), cpu_wall);
    let footprint = relay.footprint();
    let scraped = match &metrics_addr {
        Some(addr) => relay::scrape(addr).await.ok(),
        None => None,
    };

    let mut distinct = std::collections::HashSet::with_capacity(seen.len());
    let mut order = OrderCheck::default();
    let mut first_us = i64::MAX;
    let mut last_us = 0;
    let mut bytes = 0u64;
    for m in &seen {
        if distinct.insert(m.id) {
            first_us = first_us.min(m.recv_us);
            last_us = last_us.max(m.recv_us);
            bytes += m.bytes as u64;
            if let Some((aggregate, seq)) = m.order {
                order.first_delivery(aggregate, seq);
            }
        }
    }
    let read = distinct.len() as u64;
    let timed_out = read < events;
    // Give the source's confirmation (wal: the next status update) a moment to land; a drain
    // that timed out is not waited for.
    if timed_out {
        stop.store(true, Ordering::Relaxed);
    }
    let source_done = tokio::time::timeout(Duration::from_secs(15), monitor).await;
    stop.store(true, Ordering::Relaxed);
    if timed_out {
        // A relay that died is a failed measurement (repeated), not a slow one.
        relay.check_alive().with_context(|| {
            format!("drain {title}: the consumer read {read} of {events} events")
        })?;
    }
    relay.stop();
    let source_done_us = match source_done {
        Ok(Ok(Ok(t))) => t,
        _ => None,
    };
    if timed_out {
        ctx.log(format!(
            "drain {title}: timed out after {} s with {read} of {events} events read; relay log: {}",
            limit.as_secs(),
            relay.log.display()
        ));
    }
    if order.violations > 0 {
        ctx.log(format!(
            "drain {title}: {} of {} first deliveries went backwards in their aggregate's sequence",
            order.violations, order.checked
        ));
    }
    // Done: until the last event was read. Timed out: until the consumer gave up.
    let seconds = if timed_out {
        (end_us - start_us) as f64 / 1e6
    } else {
        (last_us - start_us) as f64 / 1e6
    };
    let rate = read as f64 / seconds;
    let relay_ceiling = source_ceiling.min(broker_ceiling);
    let mean_batch = scraped
        .as_deref()
        .and_then(|m| stats::sum_and_count(m, BATCH_SIZE))
        .and_then(|(sum, n)| (n > 0.0).then_some(sum / n));
    let (first_after, steady) = if read >= 2 {
        (
            (first_us - start_us) as f64 / 1e6,
            (read - 1) as f64 / ((last_us - first_us).max(1) as f64 / 1e6),
        )
    } else {
        (seconds, 0.0)
    };
    Ok(Drain {
        combo: combo.title(),
        workload: workload.name().into(),
        workload_description: workload.describe(s.aggregates),
        events,
        events_read: read,
        timed_out,
        time_limit_seconds: limit.as_secs(),
        backlog_write_seconds: write.as_secs_f64(),
        avg_payload_bytes: avg_payload,
        seconds,
        events_per_sec: rate,
        mb_per_sec: bytes as f64 / 1e6 / seconds,
        first_message_after_seconds: first_after,
        steady_events_per_sec: steady,
        source_done_after_seconds: source_done_us.map(|t| (t - start_us) as f64 / 1e6),
        source_ceiling,
        broker_ceiling,
        relay_ceiling,
        ratio_to_ceiling: rate / relay_ceiling,
        ratio_to_spread: None,
        duplicates: seen.len() - distinct.len(),
        order_checked: order.checked,
        order_violations: order.violations,
        peak_rss_mib: mib(footprint.peak_rss_kib),
        cpu_seconds: footprint.cpu_seconds,
        cpu_seconds_per_100k: footprint.cpu_seconds * 100_000.0 / read.max(1) as f64,
        mean_batch_size: mean_batch,
        cpu_cores_by_process: cpu_share,
    })
}

/// One relay per combination, fed by paced writers at each offered rate in turn.
async fn latency(ctx: &mut Ctx, combo: Combo) -> Result<Vec<Latency>> {
    let label = format!("{}_lat", combo.label());
    let db = BenchDb::create(&ctx.args.pg_admin_url, &ctx.run_id, &label).await?;
    let setup = ctx.setup(combo, &db, "lat");
    let result = latency_on(ctx, &db, &setup).await;
    ctx.cleanup_broker(&setup).await;
    let dropped = db.drop_now().await;
    let l = result?;
    dropped?;
    Ok(l)
}

async fn latency_on(ctx: &mut Ctx, db: &BenchDb, setup: &Setup) -> Result<Vec<Latency>> {
    let s = ctx.settings.clone();
    let combo = setup.combo;
    setup.migrate()?;
    ctx.prepare_broker(setup).await?;
    let mut relay = setup.start()?;
    relay
        .wait_for_log("relay started", Duration::from_secs(30))
        .await?;
    let metrics_addr = ctx.metrics_addr(&mut relay, combo).await;
    let mut written = 0u64;
    ctx.warm_up(db, setup, &relay, s.aggregates, &mut written)
        .await?;
    let mut out = Vec::new();
    for &rate in &s.rates {
        ctx.log(format!(
            "latency {}: {rate} events/s for {} s",
            combo.title(),
            s.latency_secs
        ));
        let paced = PacedRun {
            rate,
            secs: s.latency_secs,
            aggregates: s.aggregates,
        };
        out.push(
            ctx.paced_run(
                db,
                setup,
                &relay,
                metrics_addr.as_deref(),
                paced,
                &mut written,
            )
            .await?,
        );
    }
    relay.stop();
    Ok(out)
}

/// One paced measurement of [`Ctx::paced_run`].
#[derive(Debug, Clone, Copy)]
struct PacedRun {
    /// Offered events/s.
    rate: u64,
    secs: u64,
    aggregates: u64,
}

impl Ctx {
    /// The relay's `/metrics` address, or a note that commit-to-ack cannot be reported.
    async fn metrics_addr(&mut self, relay: &mut relay::Relay, combo: Combo) -> Option<String> {
        let addr = relay.metrics_addr().await;
        if addr.is_none() {
            self.notes.push(format!(
                "{}: the relay logged no `serving /metrics` line, so commit-to-ack is not reported",
                combo.title()
            ));
        }
        addr
    }

    /// 200 events through a started relay, not measured: producer ids, topic metadata,
    /// connections, plans.
    async fn warm_up(
        &self,
        db: &BenchDb,
        setup: &Setup,
        relay: &relay::Relay,
        aggregates: u64,
        written: &mut u64,
    ) -> Result<()> {
        let since = now_us();
        let stop = Arc::new(AtomicBool::new(false));
        let consumer = self
            .consumer(
                setup,
                Arc::new(AtomicUsize::new(200)),
                since,
                Instant::now() + Duration::from_secs(60),
                stop,
            )
            .await?;
        let paced = pg::paced_writers(
            &db.url,
            200,
            Duration::from_secs(1),
            aggregates,
            self.settings.writers,
            *written,
        )
        .await?;
        *written += paced.committed.len() as u64;
        let seen = consumer.join().await?;
        if seen.len() < 200 {
            bail!(
                "{}: warm-up events did not arrive ({} of 200); relay log: {}",
                setup.combo.title(),
                seen.len(),
                relay.log.display()
            );
        }
        Ok(())
    }

    /// Paced writers at `run.rate` for `run.secs` on a running relay and a consumer that reads
    /// until every committed event arrived: commit→consumer per event, commit→ack from the
    /// relay's histogram between a scrape before and one after. `written` numbers the events,
    /// so each aggregate's sequence continues from the previous run.
    async fn paced_run(
        &self,
        db: &BenchDb,
        setup: &Setup,
        relay: &relay::Relay,
        metrics_addr: Option<&str>,
        run: PacedRun,
        written: &mut u64,
    ) -> Result<Latency> {
        let s = &self.settings;
        let combo = setup.combo;
        let system = format!("system=\"{}\"", combo.sink.as_str());
        let before = match metrics_addr {
            Some(addr) => relay::scrape(addr).await.ok(),
            None => None,
        };
        let cpu_before = relay.footprint().cpu_seconds;
        // Known once the writers are done: they stop at the end of the run even when behind.
        let target = Arc::new(AtomicUsize::new(usize::MAX));
        let since = now_us();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(run.secs + 30);
        let consumer = self
            .consumer(setup, target.clone(), since, deadline, stop.clone())
            .await?;
        let paced = pg::paced_writers(
            &db.url,
            run.rate,
            Duration::from_secs(run.secs),
            run.aggregates,
            s.writers,
            *written,
        )
        .await;
        let paced = match paced {
            Ok(p) => p,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                let _ = consumer.join().await;
                return Err(e);
            }
        };
        *written += run.rate * run.secs;
        target.store(paced.committed.len(), Ordering::Relaxed);
        let seen = consumer.join().await?;
        let after = match metrics_addr {
            Some(addr) => relay::scrape(addr).await.ok(),
            None => None,
        };
        let footprint = relay.footprint();

        let committed: HashMap<u128, i64> = paced.committed.iter().copied().collect();
        let mut first_seen: HashMap<u128, Seen> = HashMap::with_capacity(seen.len());
        for m in &seen {
            first_seen.entry(m.id).or_insert(*m);
        }
        let mut to_consumer = Vec::with_capacity(first_seen.len());
        let mut insert_to_consumer = Vec::with_capacity(first_seen.len());
        let mut negative = 0;
        for (id, m) in &first_seen {
            if let Some(commit_us) = committed.get(id) {
                let d = (m.recv_us - commit_us) as f64 / 1000.0;
                if d < 0.0 {
                    negative += 1;
                }
                to_consumer.push(d.max(0.0));
            }
            if let Some(t) = m.t_us {
                insert_to_consumer.push((m.recv_us - t) as f64 / 1000.0);
            }
        }
        let ack = match (&before, &after) {
            (Some(b), Some(a)) => {
                let diff = Buckets::parse(a, COMMIT_TO_ACK, &system).since(&Buckets::parse(
                    b,
                    COMMIT_TO_ACK,
                    &system,
                ));
                diff.quantile(0.5).map(|p50| AckQuantiles {
                    samples: diff.count() as u64,
                    p50_ms: p50 * 1000.0,
                    p99_ms: diff.quantile(0.99).unwrap_or(0.0) * 1000.0,
                    p999_ms: diff.quantile(0.999).unwrap_or(0.0) * 1000.0,
                    max_bucket_ms: diff.max_bound().map(|b| b * 1000.0),
                })
            }
            _ => None,
        };
        Ok(Latency {
            combo: combo.title(),
            offered_per_sec: run.rate,
            achieved_per_sec: paced.committed.len() as f64 / paced.elapsed.as_secs_f64(),
            writer_max_behind_ms: paced.max_behind.as_secs_f64() * 1000.0,
            committed: paced.committed.len(),
            received: first_seen.len(),
            missing: paced
                .committed
                .iter()
                .filter(|(id, _)| !first_seen.contains_key(id))
                .count(),
            commit_to_consumer: Percentiles::of(to_consumer),
            insert_to_consumer: Percentiles::of(insert_to_consumer),
            consumer_before_commit_returned: negative,
            commit_to_ack: ack,
            peak_rss_mib: mib(footprint.peak_rss_kib),
            cpu_seconds: footprint.cpu_seconds - cpu_before,
        })
    }
}

async fn run(args: Args) -> Result<Report> {
    relay::ensure_binary(&args.relay_bin)?;
    let quick = args.quick;
    let workload_names: Vec<String> = if args.workloads.is_empty() {
        let default = if quick {
            "spread,1,zipf"
        } else {
            "spread,10,1,zipf,one-txn"
        };
        default.split(',').map(String::from).collect()
    } else {
        args.workloads.clone()
    };
    let mut workloads = Vec::new();
    for name in &workload_names {
        let w = Workload::parse(name)?;
        if !workloads.contains(&w) {
            workloads.push(w);
        }
    }
    if workloads.is_empty() {
        bail!("--workloads is empty; use {}", Workload::NAMES);
    }
    let events = args.events.unwrap_or(if quick { 20_000 } else { 200_000 });
    let settings = Settings {
        mode: if quick { "quick" } else { "full" }.into(),
        events,
        aggregates: args.aggregates,
        workloads: workloads.iter().map(|w| w.name().to_string()).collect(),
        drain_limit_secs: args.drain_limit_secs.unwrap_or(if quick { 10 } else { 40 }),
        hot_events: args
            .hot_events
            .unwrap_or(if quick { 2_000 } else { 100_000 })
            .min(events),
        one_txn_events: events.min(workload::ONE_TXN_MAX_EVENTS),
        payload_bytes: pg::PAYLOAD_BYTES,
        writers: args.writers,
        rates: args.rates.clone(),
        latency_secs: args.latency_secs.unwrap_or(if quick { 5 } else { 60 }),
        commit_ceiling_secs: if quick { 3 } else { 10 },
        isolation_rate: args.isolation_rate,
        isolation_aggregates: args.isolation_aggregates,
        isolation_failing_rate: args.isolation_failing_rate,
        isolation_secs: args.isolation_secs.unwrap_or(if quick { 4 } else { 30 }),
        kill_rate: args.kill_rate,
        kill_aggregates: args.kill_aggregates,
        kill_secs: args.kill_secs.unwrap_or(if quick { 5 } else { 15 }),
        kills: args.kills,
        relay_env: args.relay_env.clone(),
        arguments: command_line(),
    };
    if let Some(bad) = args.relay_env.iter().find(|kv| !kv.contains('=')) {
        bail!("--relay-env `{bad}` is not KEY=VALUE");
    }
    if settings.events < settings.aggregates || settings.aggregates == 0 || settings.writers == 0 {
        bail!("need events >= aggregates > 0 and writers > 0");
    }
    if settings.isolation_rate == 0
        || settings.isolation_aggregates == 0
        || settings.isolation_failing_rate == 0
        || settings.isolation_secs == 0
    {
        bail!(
            "--isolation-rate, --isolation-aggregates, --isolation-failing-rate and --isolation-secs must be > 0"
        );
    }
    if settings.kill_rate == 0
        || settings.kill_aggregates == 0
        || settings.kill_secs == 0
        || settings.kills == 0
    {
        bail!("--kill-rate, --kill-aggregates, --kill-secs and --kills must be > 0");
    }
    let combos: Vec<Combo> = Combo::ALL
        .into_iter()
        .filter(|c| {
            args.only.is_empty() || args.only.iter().any(|o| o.replace('-', "_") == c.label())
        })
        .collect();
    if combos.is_empty() {
        bail!(
            "--only matched no combination; use poll-kafka, poll-rabbitmq, wal-kafka, wal-rabbitmq"
        );
    }
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_string();
    let dir = std::env::temp_dir().join(format!("relay-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let machine = report::machine(&args.pg_admin_url, &args.amqp_url).await;
    let mut ctx = Ctx {
        args,
        settings,
        run_id,
        dir,
        notes: Vec::new(),
        started: Instant::now(),
    };
    ctx.log(format!(
        "run {} ({} mode); relay logs in {}",
        ctx.run_id,
        ctx.settings.mode,
        ctx.dir.display()
    ));
    let started = ctx.started;
    let result = measure(&mut ctx, &combos, &workloads).await;
    if let Err(e) = pg::drop_run_databases(&ctx.args.pg_admin_url, &ctx.run_id).await {
        ctx.log(format!("cannot drop this run's databases: {e:#}"));
    }
    let m = result?;
    let mut machine = machine;
    machine.load_after = report::loadavg();
    Ok(Report::new(
        machine,
        ctx.settings,
        m,
        ctx.notes,
        started.elapsed().as_secs_f64(),
    ))
}

/// Every phase in order, each repeated when a shared service was restarted under it.
async fn measure(ctx: &mut Ctx, combos: &[Combo], workloads: &[Workload]) -> Result<Measured> {
    let mut ceilings = None;
    for attempt in 1..=ATTEMPTS {
        match self::ceilings(ctx, combos).await {
            Ok(c) => {
                ceilings = Some(c);
                break;
            }
            Err(e) => ctx.failed("ceilings", attempt, e).await?,
        }
    }
    let mut ceilings = ceilings.context("ceilings were not measured")?;
    let mut drains = Vec::new();
    for &combo in combos {
        for &workload in workloads {
            let title = format!("{} ({})", combo.title(), workload.name());
            for attempt in 1..=ATTEMPTS {
                match drain(ctx, combo, workload, &mut ceilings).await {
                    Ok(d) => {
                        ctx.log(format!(
                            "drain {title}: {:.0} events/s{}, {:.2} × ceiling, {} order violations, peak RSS {:.1} MiB",
                            d.events_per_sec,
                            if d.timed_out { " so far (timed out)" } else { "" },
                            d.ratio_to_ceiling,
                            d.order_violations,
                            d.peak_rss_mib
                        ));
                        drains.push(d);
                        break;
                    }
                    Err(e) => ctx.failed(&format!("drain {title}"), attempt, e).await?,
                }
            }
        }
    }
    let mut latencies = Vec::new();
    let run_latency = !ctx.args.no_latency;
    for &combo in combos.iter().filter(|_| run_latency) {
        for attempt in 1..=ATTEMPTS {
            match latency(ctx, combo).await {
                Ok(l) => {
                    for r in &l {
                        ctx.log(format!(
                            "latency {} at {}/s: commit→consumer p50 {:.1} ms, p99 {:.1} ms; commit→ack p99 {}",
                            r.combo,
                            r.offered_per_sec,
                            r.commit_to_consumer.p50_ms,
                            r.commit_to_consumer.p99_ms,
                            r.commit_to_ack
                                .as_ref()
                                .map(|a| format!("{:.1} ms", a.p99_ms))
                                .unwrap_or_else(|| "n/a".into())
                        ));
                    }
                    latencies.extend(l);
                    break;
                }
                Err(e) => {
                    ctx.failed(&format!("latency {}", combo.title()), attempt, e)
                        .await?
                }
            }
        }
    }
    let mut isolation = Vec::new();
    let run_isolation = !ctx.args.no_isolation;
    for &combo in combos.iter().filter(|_| run_isolation) {
        for attempt in 1..=ATTEMPTS {
            match faults::isolation(ctx, combo).await {
                Ok(i) => {
                    ctx.log(format!(
                        "isolation {}: healthy p99 {:.1} ms baseline, {:.1} ms with a failing aggregate (limit {:.1} ms, {}); missing {} / {}; retrying aggregates max {}",
                        i.combo,
                        i.baseline.commit_to_consumer.p99_ms,
                        i.with_failure.commit_to_consumer.p99_ms,
                        i.limit_ms,
                        if i.met { "met" } else { "NOT met" },
                        i.baseline.missing,
                        i.with_failure.missing,
                        i.retrying_aggregates_max
                            .map(|v| format!("{v:.0}"))
                            .unwrap_or_else(|| "n/a".into())
                    ));
                    isolation.push(i);
                    break;
                }
                Err(e) => {
                    ctx.failed(&format!("isolation {}", combo.title()), attempt, e)
                        .await?
                }
            }
        }
    }
    let mut kills = Vec::new();
    let run_kills = !ctx.args.no_kills;
    for &combo in combos.iter().filter(|_| run_kills) {
        for attempt in 1..=ATTEMPTS {
            match faults::kills(ctx, combo).await {
                Ok(r) => {
                    ctx.log(format!(
                        "kills {}: {} missing, {} duplicates ({} per kill; window {}), {} order violations",
                        r.combo,
                        r.missing,
                        r.duplicates,
                        r.duplicates_per_kill
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join("/"),
                        r.in_flight_window,
                        r.order_violations
                    ));
                    kills.push(r);
                    break;
                }
                Err(e) => {
                    ctx.failed(&format!("kills {}", combo.title()), attempt, e)
                        .await?
                }
            }
        }
    }
    Ok(Measured {
        ceilings,
        drains,
        latencies,
        isolation,
        kills,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            PathBuf::from("bench/results/quick")
        } else {
            PathBuf::from("bench/results")
        }
    });
    let result = async {
        let report = run(args).await?;
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(out.join("report.md"), report.markdown())?;
        std::fs::write(out.join("latency.svg"), report.svg())?;
        eprintln!(
            "[relay-bench] wrote {}/report.md, report.json, latency.svg",
            out.display()
        );
        println!("{}", report.markdown());
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
