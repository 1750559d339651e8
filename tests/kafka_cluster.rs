//! Kafka cluster faults: three tansu brokers sharing PostgreSQL storage
//! (`scripts/services kafka-cluster`, 127.0.0.1:9101-9103). The relay and the consumer get all
//! three as bootstrap servers. Mid-stream each broker in turn is SIGKILLed and started again
//! (so the one the relay produces through is among them, whichever it is), or all three are
//! restarted: nothing is lost, per-aggregate order holds,
//! and the longest stall (gap between consecutive receipts) and the time until events arrive
//! promptly again are printed.
//!
//! Each tansu broker names itself (node 111, its own address) the leader of every partition, so
//! failover is librdkafka's: when the leader's connection dies, it asks another bootstrap
//! broker for metadata, which names node 111 at a new address, and reconnects there; the
//! idempotent producer's state (producer id, sequence numbers) is in the shared database, so the
//! surviving broker accepts the retried batches where the dead one left off.
//!
//! `fault_*`: they stop shared services and run one at a time (see `scripts/test`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::support::*;

const CLUSTER: &str = "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103";
const NODES: [(&str, u16); 3] = [("kafka-1", 9101), ("kafka-2", 9102), ("kafka-3", 9103)];
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// An event counts as on time when it arrives within this of its commit.
const ON_TIME: Duration = Duration::from_secs(1);

for_both_sources! {
    fault_kafka_cluster_broker_killed_mid_stream_loses_nothing_and_keeps_order => broker_killed;
    fault_kafka_cluster_all_brokers_restarted_mid_stream_lose_nothing => all_restarted;
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn require_cluster() {
    let down: Vec<_> = NODES.iter().filter(|(_, port)| !listening(*port)).collect();
    assert!(
        down.is_empty(),
        "the tansu Kafka cluster is not up ({down:?} not listening): run scripts/services kafka-cluster"
    );
}

/// Starts every broker of the cluster again when dropped, so a failing test leaves none down.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        if NODES.iter().any(|(_, port)| !listening(*port)) {
            let _ = Command::new(repo_root().join("scripts/services"))
                .arg("kafka-cluster")
                .output();
        }
    }
}

/// SIGKILL for broker `node`: the tansu process listening on its port (`ss`), wherever it was
/// started from.
fn kill_broker(node: &str) {
    let (_, port) = NODES.iter().find(|(n, _)| *n == node).unwrap();
    let out = Command::new("ss")
        .args(["-Htlnp", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    let listing = String::from_utf8_lossy(&out.stdout);
    let pid = listing
        .split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| {
            panic!("nothing listens on {port} ({node}): run scripts/services kafka-cluster")
        });
    let status = Command::new("kill").args(["-KILL", pid]).status().unwrap();
    assert!(status.success(), "kill -KILL {pid} ({node}) failed");
}

/// The cluster ports `pid` has established TCP connections to, with their counts (`ss`).
fn connections_of(pid: u32) -> BTreeMap<u16, usize> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .expect("run ss");
    let mut ports = BTreeMap::new();
    let needle = format!("pid={pid},");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(&needle) {
            continue;
        }
        // Columns: Recv-Q Send-Q Local Peer Process.
        let Some(peer) = line.split_whitespace().nth(3) else {
            continue;
        };
        if let Some(port) = peer.rsplit(':').next().and_then(|p| p.parse::<u16>().ok())
            && NODES.iter().any(|(_, p)| *p == port)
        {
            *ports.entry(port).or_default() += 1;
        }
    }
    ports
}

/// What the relay's log says it went through: messages timed out in librdkafka, the producer
/// replaced after the broker refused its identity.
fn relay_saw(relay: &Relay) -> String {
    let logs = relay.logs();
    format!(
        "relay: messages timed out {}, producer replaced {}",
        logs.contains("MessageTimedOut"),
        logs.contains("the Kafka producer cannot continue; creating a new one")
    )
}

/// A Kafka reader on the cluster that reads while the stream runs (so receipt times mean
/// something) until it is handed the list of what was written, then until all of it arrived.
struct LiveReader {
    written: oneshot::Sender<Vec<Written>>,
    task: tokio::task::JoinHandle<(Vec<Received>, Vec<SystemTime>)>,
}

impl LiveReader {
    fn start(topic: String) -> Self {
        let mut reader = kafka::Reader::new(CLUSTER);
        reader.add_topic(topic);
        let (written, mut rx) = oneshot::channel::<Vec<Written>>();
        let task = tokio::spawn(async move {
            let none = HashSet::from(["\u{0}never"]);
            loop {
                match rx.try_recv() {
                    Ok(written) => {
                        let want: HashSet<&str> = written.iter().map(|w| w.id.as_str()).collect();
                        let got = reader.read_until(&want, READ_TIMEOUT).await;
                        return (got, reader.arrivals().to_vec());
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        reader.read_until(&none, Duration::from_millis(200)).await;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => panic!("writer side dropped"),
                }
            }
        });
        Self { written, task }
    }

    async fn finish(self, written: &[Written]) -> (Vec<Received>, Vec<SystemTime>) {
        self.written.send(written.to_vec()).unwrap();
        self.task.await.unwrap()
    }
}

/// What the receipt times show about a fault at `fault` whose brokers were all back at `back`.
#[derive(Debug)]
#[allow(dead_code)] // read through `Debug`: the figures the test prints
struct Timing {
    /// Longest gap between two consecutive first receipts during the stream.
    longest_stall: Duration,
    /// First receipts between the fault and `back`: events that went through the others.
    during_fault: usize,
    /// Per window of the scenario (a broker down): events committed more than 0.5 s into it and
    /// received before its end.
    during_each: Vec<usize>,
    /// From `back` until every later event arrived within [`ON_TIME`] of its commit (zero:
    /// they all did from the moment the brokers were back).
    back_on_time_after: Duration,
    /// From the fault until the same moment.
    on_time_after_fault: Duration,
    /// The longest commit-to-receipt time of any event.
    max_latency: Duration,
}

async fn timing(
    db: &TestDb,
    received: &[Received],
    arrivals: &[SystemTime],
    fault: SystemTime,
    back: SystemTime,
    windows: &[(SystemTime, SystemTime)],
) -> Timing {
    let committed: HashMap<String, SystemTime> = db
        .client()
        .await
        .query("SELECT id::text, created_at FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // First receipts only, in arrival order.
    let mut seen = HashSet::new();
    let firsts: Vec<(SystemTime, Duration)> = received
        .iter()
        .zip(arrivals)
        .filter(|(r, _)| seen.insert(r.id().to_string()))
        .filter_map(|(r, at)| {
            let commit = committed.get(r.id())?;
            Some((*at, at.duration_since(*commit).unwrap_or_default()))
        })
        .collect();
    let longest_stall = firsts
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0).unwrap_or_default())
        .max()
        .unwrap_or_default();
    let during_fault = firsts
        .iter()
        .filter(|(at, _)| *at > fault && *at < back)
        .count();
    // The last late event: from the one after it on, everything was on time.
    let recovered = firsts
        .iter()
        .rev()
        .find(|(_, latency)| *latency > ON_TIME)
        .map_or(fault, |(at, _)| *at);
    // Events committed half a second into the window and received before its end: the relay sent
    // them while the broker was dead (not ones that were in flight at the kill).
    let during_each = windows
        .iter()
        .map(|(from, to)| {
            let after = *from + Duration::from_millis(500);
            firsts
                .iter()
                .filter(|(at, latency)| {
                    *at < *to && at.checked_sub(*latency).is_some_and(|c| c > after)
                })
                .count()
        })
        .collect();
    Timing {
        longest_stall,
        during_fault,
        during_each,
        back_on_time_after: recovered.duration_since(back).unwrap_or_default(),
        on_time_after_fault: recovered.duration_since(fault).unwrap_or_default(),
        max_latency: firsts.iter().map(|(_, l)| *l).max().unwrap_or_default(),
    }
}

async fn start(mode: Mode) -> (Scenario, LiveReader, Relay) {
    let mut s = Scenario::of(
        mode,
        Broker::Kafka,
        "[delivery]\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n",
    )
    .await;
    s.kafka_brokers = CLUSTER.into();
    // kafka.message_timeout stays at its default (30 s): longer than the outages here.
    s.extra_toml.push_str(&format!(
        "[kafka]\ntopic = \"{}.{{aggregate_type}}\"\ncreate_topics = false\n",
        s.destination
    ));
    // tansu does not create topics on first produce; the first broker takes it for all.
    kafka::create_topic_on(CLUSTER, &s.topic("wallet"), 3).await;
    s.migrate();
    let reader = LiveReader::start(s.topic("wallet"));
    let relay = s.start_relay();
    (s, reader, relay)
}

/// ~250 events/s for about 19 s (`per_aggregate` = 160; 240: 28 s): 30 aggregates, 3 writers.
fn write(s: &Scenario, per_aggregate: u64) -> tokio::task::JoinHandle<Vec<Written>> {
    let url = s.db.url.clone();
    tokio::spawn(async move {
        write_events_paced(
            &url,
            "wallet",
            30,
            per_aggregate,
            3,
            Some(Duration::from_millis(10)),
        )
        .await
    })
}

/// The end of a scenario whose brokers are all back now: the writers' stream must go on past
/// that moment (else the fault did not reach it), then everything is read and counted.
async fn finish(
    s: &Scenario,
    reader: LiveReader,
    writers: tokio::task::JoinHandle<Vec<Written>>,
    fault: SystemTime,
    who_was_back: &str,
    windows: &[(SystemTime, SystemTime)],
) -> (Tally, Timing) {
    let back = SystemTime::now();
    let written = writers.await.unwrap();
    assert!(
        SystemTime::now() > back + Duration::from_secs(2),
        "the writers finished before {who_was_back} back: the stream did not span the fault"
    );
    let (received, arrivals) = reader.finish(&written).await;
    let t = tally(&written, &received);
    (
        t,
        timing(&s.db, &received, &arrivals, fault, back, windows).await,
    )
}

/// Each broker in turn is SIGKILLed, left dead for 5 s and started again, while the others
/// run: one of them is the broker the relay produces through, whichever it is.
async fn broker_killed(mode: Mode) {
    require_cluster();
    let _restore = Restore;
    let (s, reader, relay) = start(mode).await;
    let writers = write(&s, 240);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fault = SystemTime::now();
    let mut windows = Vec::new();
    let mut seen = Vec::new();
    for (node, _) in NODES {
        let before = connections_of(relay.pid());
        let down = SystemTime::now();
        kill_broker(node);
        // The target: full rate within 5 s of a node loss.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let during = connections_of(relay.pid());
        let up = SystemTime::now();
        services(&["start-node", node]);
        windows.push((down, up));
        seen.push(format!("{node}: before {before:?}, while down {during:?}"));
    }
    let (t, timing) = finish(&s, reader, writers, fault, "every broker was", &windows).await;
    eprintln!(
        "{mode:?}: kafka-1, 2, 3 SIGKILLed in turn mid-stream, each dead for 5 s: {t:?}; {timing:?}; relay connections {seen:?}; {}",
        relay_saw(&relay)
    );
    t.assert_complete_and_ordered();
    // The relay kept producing through the others while each one was dead, the one it was
    // producing through included.
    assert!(
        timing.during_each.iter().all(|n| *n > 0),
        "nothing arrived while one of the brokers was dead: the relay did not fail over ({timing:?})\n{}",
        relay.logs()
    );
}

async fn all_restarted(mode: Mode) {
    require_cluster();
    let _restore = Restore;
    let (s, reader, relay) = start(mode).await;
    let writers = write(&s, 160);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fault = SystemTime::now();
    // All at once: `stop-node` waits up to 5 s for tansu to exit on SIGTERM.
    std::thread::scope(|scope| {
        for (node, _) in NODES {
            scope.spawn(move || services(&["stop-node", node]));
        }
    });
    assert!(
        NODES.iter().all(|(_, port)| !listening(*port)),
        "a broker still listens after stop-node"
    );
    let down = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (node, _) in NODES {
        services(&["start-node", node]);
    }
    let (t, timing) = finish(&s, reader, writers, fault, "the brokers were", &[]).await;
    eprintln!(
        "{mode:?}: all three brokers stopped (SIGTERM, taking {:?}), down for 3 s, started again: {t:?}; {timing:?}; {}",
        down.duration_since(fault).unwrap_or_default(),
        relay_saw(&relay)
    );
    t.assert_complete_and_ordered();
    assert!(
        timing.longest_stall >= Duration::from_secs(3),
        "no stall while every broker was down: the outage did not reach the stream ({timing:?})\n{}",
        relay.logs()
    );
}
