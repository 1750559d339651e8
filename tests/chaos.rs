//! The chaos suite: concurrent writers commit events over many aggregates while, at random
//! moments, the active relay is SIGKILLed (a standby takes over), the broker goes away and
//! comes back, and Postgres restarts. Then an independent checker reads everything from the
//! broker and counts: committed, delivered, lost (must be 0), duplicates, per-aggregate order
//! violations among first deliveries (must be 0), longest failover, most relays active at once.
//!
//! Kafka outages go through a TCP proxy in front of a private tansu (stopping tansu itself
//! would lose its in-memory log); RabbitMQ outages stop the real broker's app. The cluster
//! variant (`fault_chaos_cluster_*`) stops nodes instead: the relay lists the three nodes of
//! `scripts/services rabbitmq-cluster` or `kafka-cluster`, and each outage stops one node for
//! real (RabbitMQ: the one the active relay uses, unless the consumer reads through it; Kafka:
//! kafka-1, 2, 3 in turn) and starts it again 3 s later.
//!
//! `CHAOS_EVENTS` (default 4,000) and `CHAOS_SECONDS` (default 20) size a run; `scripts/chaos`
//! runs the long variant and appends each report to `CHAOS_REPORT` when set.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::faults::restart_postgres;
use crate::support::proxy::{Proxy, Tansu, free_port};
use crate::support::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rabbitmqctl(args: &[&str]) {
    let _ = Command::new("rabbitmqctl").args(args).status();
}

/// Brings every node of the cluster back when dropped during a panic.
struct RestoreCluster(Broker);

impl Drop for RestoreCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services"))
                .arg(match self.0 {
                    Broker::Kafka => "kafka-cluster",
                    Broker::Rabbitmq => "rabbitmq-cluster",
                })
                .status();
        }
    }
}

/// What a run's broker outages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outages {
    /// Kafka: the proxy in front of a private tansu is cut; RabbitMQ: the broker's app stops.
    SingleBroker,
    /// A node of the three-node cluster is stopped for real and started again.
    ClusterNode,
}

const RABBIT_NODES: [u16; 3] = [5701, 5702, 5703];
const KAFKA_NODES: &str = "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103";

fn rabbit_node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

#[derive(Debug)]
struct ChaosReport {
    combination: String,
    committed: usize,
    delivered: usize,
    lost: usize,
    duplicates: usize,
    consumer_redeliveries: usize,
    order_violations: usize,
    relay_kills: usize,
    broker_outages: usize,
    postgres_restarts: usize,
    longest_failover: Duration,
    most_active_at_once: usize,
    /// Events the relay gave up on: under chaos every event is valid, so this must be 0.
    dead_letters: i64,
    duration: Duration,
}

impl ChaosReport {
    fn markdown_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} ({} consumer redeliveries) | {} | {} / {} / {} | {:.1} s | {} | {:.0} s |",
            self.combination,
            self.committed,
            self.delivered,
            self.lost,
            self.dead_letters,
            self.duplicates,
            self.consumer_redeliveries,
            self.order_violations,
            self.relay_kills,
            self.broker_outages,
            self.postgres_restarts,
            self.longest_failover.as_secs_f64(),
            self.most_active_at_once,
            self.duration.as_secs_f64()
        )
    }
}

async fn chaos(mode: Mode, broker: Broker, outages_of: Outages) -> ChaosReport {
    let events = env_or("CHAOS_EVENTS", 4_000) as usize;
    let seconds = env_or("CHAOS_SECONDS", 20);
    let started = Instant::now();
    let toml = "[delivery]\nstandby_interval = \"250ms\"\nbatch_size = 500\n\
                backoff_initial = \"100ms\"\nbackoff_max = \"2s\"\n";
    let mut s = Scenario::of(mode, broker, toml).await;
    // Kafka: a private tansu behind a proxy we can cut.
    let mut _tansu = None;
    let mut proxy = None;
    let cluster = outages_of == Outages::ClusterNode;
    // A failed run must not leave a node down for the tests after it.
    let _restore = cluster.then_some(RestoreCluster(broker));
    if cluster {
        match broker {
            Broker::Kafka => s.kafka_brokers = KAFKA_NODES.into(),
            Broker::Rabbitmq => {
                let list: Vec<String> = RABBIT_NODES.iter().map(|p| rabbit_node_url(*p)).collect();
                s.extra_env.push(("RELAY_AMQP_URL".into(), list.join(",")));
            }
        }
    } else if broker == Broker::Kafka {
        let port = free_port();
        let p = Proxy::start(port).await;
        _tansu = Some(Tansu::start(port, p.port));
        s.kafka_brokers = format!("127.0.0.1:{}", p.port);
        proxy = Some(p);
    }
    s.migrate();
    let mut reader = if cluster && broker == Broker::Rabbitmq {
        // A quorum queue, read through the last node, which no outage stops.
        AnyReader::Amqp(
            amqp::Reader::bind_on(&rabbit_node_url(RABBIT_NODES[2]), &s.destination, "#", true)
                .await
                .expect("the RabbitMQ cluster on 127.0.0.1:5701-5703 is not running: run scripts/services rabbitmq-cluster"),
        )
    } else {
        s.reader(&["wallet"]).await
    };

    let mut relays = vec![s.start_relay(), s.start_relay()];
    let mut bases = Vec::new();
    for r in &relays {
        bases.push(r.http_base().await);
    }

    // Writers: `events` over 200 aggregates, spread over `seconds`.
    let writers = 4;
    let pause = Duration::from_secs(seconds) * writers as u32 / events as u32;
    let url = s.db.url.clone();
    let writing = tokio::spawn(async move {
        write_events_paced(
            &url,
            "wallet",
            200,
            (events / 200) as u64,
            writers,
            Some(pause),
        )
        .await
    });

    // Watch how many relays believe they are active, every 100 ms.
    let most_active = Arc::new(AtomicUsize::new(0));
    let watched: Arc<std::sync::Mutex<Vec<String>>> =
        Arc::new(std::sync::Mutex::new(bases.clone()));
    let watcher = {
        let most_active = most_active.clone();
        let watched = watched.clone();
        tokio::spawn(async move {
            loop {
                let bases = watched.lock().unwrap().clone();
                let mut active = 0;
                for b in &bases {
                    if http_get(&format!("{b}/readyz"))
                        .await
                        .1
                        .contains("\"active\":true")
                    {
                        active += 1;
                    }
                }
                most_active.fetch_max(active, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let (mut kills, mut outages, mut restarts) = (0, 0, 0);
    let mut longest_failover = Duration::ZERO;
    let mut node_outage: Option<tokio::task::JoinHandle<()>> = None;
    let mut step = 0u64;
    while !writing.is_finished() {
        let wait = rand::rng().random_range(1500..3500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if writing.is_finished() {
            break;
        }
        // Cycle through the faults so every run sees each of them.
        match step % 3 {
            0 => {
                // SIGKILL the active relay; a standby must take over.
                let mut active = None;
                for (i, b) in bases.iter().enumerate() {
                    if relays[i].is_active(b).await {
                        active = Some(i);
                    }
                }
                if let Some(i) = active {
                    relays[i].kill();
                    let killed_at = Instant::now();
                    kills += 1;
                    let mut took_over = None;
                    while killed_at.elapsed() < Duration::from_secs(30) {
                        for (j, b) in bases.iter().enumerate() {
                            if j != i && relays[j].is_active(b).await {
                                took_over = Some(killed_at.elapsed());
                            }
                        }
                        if took_over.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let failover = took_over.expect("no standby took over within 30 s");
                    longest_failover = longest_failover.max(failover);
                    // A fresh standby replaces the killed relay.
                    relays[i] = s.start_relay();
                    bases[i] = relays[i].http_base().await;
                    *watched.lock().unwrap() = bases.clone();
                }
            }
            1 if cluster => {
                outages += 1;
                let node = match broker {
                    Broker::Kafka => format!("kafka-{}", outages % 3 + 1),
                    Broker::Rabbitmq => {
                        // The node the active relay publishes through, unless it is the
                        // consumer's (then another one).
                        let mut in_use = None;
                        for (i, b) in bases.iter().enumerate() {
                            if relays[i].is_active(b).await {
                                let (_, body) = http_get(&format!("{b}/readyz")).await;
                                let v: serde_json::Value =
                                    serde_json::from_str(&body).unwrap_or_default();
                                in_use = v["broker_node"].as_str().map(str::to_string);
                            }
                        }
                        match in_use.as_deref() {
                            Some("127.0.0.1:5701") => "rabbit-1".into(),
                            Some("127.0.0.1:5702") => "rabbit-2".into(),
                            _ => format!("rabbit-{}", outages % 2 + 1),
                        }
                    }
                };
                // Stopping and starting a RabbitMQ node takes 10-20 s: the outage runs beside
                // the other faults, one node at a time (a quorum needs two of three).
                if node_outage.as_ref().is_none_or(|o| o.is_finished()) {
                    if let Some(done) = node_outage.take() {
                        done.await.expect("a node outage failed");
                    }
                    eprintln!("chaos: stopping {node}");
                    node_outage = Some(tokio::task::spawn_blocking(move || {
                        services(&["stop-node", &node]);
                        std::thread::sleep(Duration::from_secs(3));
                        services(&["start-node", &node]);
                    }));
                } else {
                    outages -= 1;
                }
            }
            1 => {
                outages += 1;
                match &proxy {
                    Some(p) => {
                        p.down();
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        p.up();
                    }
                    None => {
                        rabbitmqctl(&["-q", "stop_app"]);
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        rabbitmqctl(&["-q", "start_app"]);
                        rabbitmqctl(&["-q", "await_startup"]);
                    }
                }
            }
            _ => {
                restarts += 1;
                restart_postgres();
            }
        }
        step += 1;
        eprintln!(
            "chaos: {:?} in: {kills} kills, {outages} broker outages, {restarts} Postgres restarts",
            started.elapsed()
        );
    }
    if let Some(outage) = node_outage {
        outage.await.expect("a node outage failed");
    }
    eprintln!("chaos: writers done after {:?}", started.elapsed());
    let written = writing.await.unwrap();
    let received = reader.read_until(&written, Duration::from_secs(150)).await;
    watcher.abort();
    let t = tally(&written, &received);
    let report = ChaosReport {
        combination: format!(
            "{mode:?} → {broker:?}{}",
            if cluster { " cluster" } else { "" }
        )
        .to_lowercase(),
        committed: t.sent,
        delivered: t.unique,
        lost: t.missing,
        duplicates: t.duplicates,
        consumer_redeliveries: t.consumer_redeliveries,
        order_violations: t.order_violations,
        relay_kills: kills,
        broker_outages: outages,
        postgres_restarts: restarts,
        longest_failover,
        most_active_at_once: most_active.load(Ordering::SeqCst),
        dead_letters: s
            .db
            .client()
            .await
            .query_one("SELECT count(*) FROM outbox_dead_letters", &[])
            .await
            .unwrap()
            .get(0),
        duration: started.elapsed(),
    };
    eprintln!("{report:#?}");
    if report.lost > 0 {
        // Tell a relay that lost events from a checker that missed them.
        if mode == Mode::Poll {
            eprintln!(
                "diagnosis: {} rows still unpublished in the outbox",
                pending_count(&s.db).await
            );
        }
        if broker == Broker::Kafka {
            let mut fresh = s.reader(&["wallet"]).await;
            let again = fresh.read_until(&written, Duration::from_secs(30)).await;
            eprintln!(
                "diagnosis: a fresh Kafka consumer reads {} of the {} committed events",
                tally(&written, &again).unique,
                written.len()
            );
        }
    }
    if let Ok(path) = std::env::var("CHAOS_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{}", report.markdown_row()).unwrap();
    }
    assert_eq!(report.lost, 0, "events lost under chaos: {report:#?}");
    assert_eq!(
        report.dead_letters, 0,
        "events dead-lettered under chaos: {report:#?}"
    );
    assert_eq!(
        report.order_violations, 0,
        "order broken under chaos: {report:#?}"
    );
    assert!(
        kills + outages + restarts >= 3,
        "too little chaos: {report:#?}"
    );
    assert!(
        report.most_active_at_once <= 1,
        "two relays were active at once: {report:#?}"
    );
    drop(relays);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_poll_kafka_loses_nothing() {
    chaos(Mode::Poll, Broker::Kafka, Outages::SingleBroker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_poll_rabbitmq_loses_nothing() {
    chaos(Mode::Poll, Broker::Rabbitmq, Outages::SingleBroker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_wal_kafka_loses_nothing() {
    chaos(Mode::Wal, Broker::Kafka, Outages::SingleBroker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_wal_rabbitmq_loses_nothing() {
    chaos(Mode::Wal, Broker::Rabbitmq, Outages::SingleBroker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_cluster_poll_kafka_loses_nothing() {
    chaos(Mode::Poll, Broker::Kafka, Outages::ClusterNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_cluster_poll_rabbitmq_loses_nothing() {
    chaos(Mode::Poll, Broker::Rabbitmq, Outages::ClusterNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_cluster_wal_kafka_loses_nothing() {
    chaos(Mode::Wal, Broker::Kafka, Outages::ClusterNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_chaos_cluster_wal_rabbitmq_loses_nothing() {
    chaos(Mode::Wal, Broker::Rabbitmq, Outages::ClusterNode).await;
}
