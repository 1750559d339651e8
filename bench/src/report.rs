//! The report: JSON (everything measured), markdown (the tables and the targets each run is
//! checked against: drain rates, latency, footprint, failure isolation, SIGKILLs) and
//! an SVG chart of latency percentiles by offered rate, drawn by hand.

use std::fmt::Write as _;
use std::process::Command;

use serde::Serialize;

use crate::stats::Percentiles;
use crate::workload::Workload;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub rabbitmq: String,
    pub kafka_broker: String,
    pub relay_commit: String,
    pub started_at: String,
    pub load_before: String,
    pub load_after: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: String,
    pub events: u64,
    pub aggregates: u64,
    /// Drain backlogs (`--workloads`), in the order they ran.
    pub workloads: Vec<String>,
    /// Time limit of each drain, from the relay's start.
    pub drain_limit_secs: u64,
    /// Events of the `1` and `10` backlogs.
    pub hot_events: u64,
    /// Events of the `one-txn` backlog.
    pub one_txn_events: u64,
    pub payload_bytes: usize,
    pub writers: usize,
    pub rates: Vec<u64>,
    pub latency_secs: u64,
    pub commit_ceiling_secs: u64,
    /// Failure isolation: healthy offered rate, its aggregates, the failing aggregate's rate,
    /// seconds of each of the two measurements (0: not run).
    pub isolation_rate: u64,
    pub isolation_aggregates: u64,
    pub isolation_failing_rate: u64,
    pub isolation_secs: u64,
    /// Duplicates per SIGKILL: offered rate, aggregates, seconds of writing, kills (0: not run).
    pub kill_rate: u64,
    pub kill_aggregates: u64,
    pub kill_secs: u64,
    pub kills: usize,
    /// The arguments of the run, as `scripts/bench` got them (without `--relay-bin`/`--out`).
    pub arguments: String,
    /// Relay settings changed from the defaults (`--relay-env`).
    pub relay_env: Vec<String>,
    /// The cargo profile of the relay and the harness (`--relay-build`).
    pub relay_build: String,
}

impl Settings {
    /// Events in the backlog of `workload`.
    pub fn events_of(&self, workload: Workload) -> u64 {
        if workload.is_hot() {
            self.hot_events
        } else if workload.one_transaction() {
            self.one_txn_events
        } else {
            self.events
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WalCeiling {
    pub combo: String,
    /// The workload whose backlog was decoded (the combination's first drain).
    pub backlog: String,
    /// Rows of `pg_logical_slot_peek_binary_changes` (Begin, Relation, Insert, Commit).
    pub rows: i64,
    /// The source ceiling: decoding alone (the peek, which sends nothing over a socket).
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Beside it, not a ceiling: the backlog streamed to a plain replication client (a copy of
    /// the slot), the walsender's decoding plus sending, as a streaming client receives it.
    pub streamed_seconds: f64,
    pub streamed_events_per_sec: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Ceilings {
    pub commit_writers: usize,
    /// Plain outbox table (wal schema).
    pub commit_events: u64,
    pub commit_events_per_sec: f64,
    /// Outbox table with the poll schema's NOTIFY trigger.
    pub commit_notify_events: u64,
    pub commit_notify_events_per_sec: f64,
    /// The same with a session LISTENing on the trigger's channel (as the polling relay does).
    pub commit_notify_listen_events: u64,
    pub commit_notify_listen_events_per_sec: f64,
    pub kafka_producer_msgs_per_sec: f64,
    pub rabbitmq_publisher_msgs_per_sec: f64,
    pub poll_source_events_per_sec: f64,
    pub poll_source_mb_per_sec: f64,
    /// Beside it, not a ceiling: the same work on two connections, reading while marking
    /// (`pg::poll_pipelined`).
    pub poll_pipelined_events_per_sec: f64,
    pub wal_source: Vec<WalCeiling>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub combo: String,
    /// `spread`, `10`, `1`, `zipf` or `one-txn`.
    pub workload: String,
    pub workload_description: String,
    /// Events in the backlog.
    pub events: u64,
    /// Distinct events the consumer read (all of them unless `timed_out`).
    pub events_read: u64,
    /// Not drained within `time_limit_seconds`: the rates are those so far.
    pub timed_out: bool,
    pub time_limit_seconds: u64,
    pub backlog_write_seconds: f64,
    pub avg_payload_bytes: f64,
    /// From spawning the relay until the consumer read the last event (timed out: until the
    /// time limit).
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Payload bytes (512 per event) per second.
    pub mb_per_sec: f64,
    pub first_message_after_seconds: f64,
    /// From the first to the last event read (start-up excluded).
    pub steady_events_per_sec: f64,
    /// When the source agreed: outbox has no unpublished row (poll) or the slot's confirmed
    /// position passed the backlog (wal; reported once a second by the relay).
    pub source_done_after_seconds: Option<f64>,
    pub source_ceiling: f64,
    pub broker_ceiling: f64,
    pub relay_ceiling: f64,
    pub ratio_to_ceiling: f64,
    /// wal: events/s over min(the backlog streamed to a plain replication client, broker
    /// ceiling): what a streaming client of this Postgres got, rather than decoding alone.
    pub ratio_to_streamed: Option<f64>,
    /// Events/s relative to the same combination's `spread` drain.
    pub ratio_to_spread: Option<f64>,
    pub duplicates: usize,
    /// First deliveries that carried aggregate and sequence number (payload `aggregate_id`, `n`).
    pub order_checked: usize,
    /// First deliveries whose sequence number is lower than one already read for their
    /// aggregate.
    pub order_violations: usize,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_100k: f64,
    pub mean_batch_size: Option<f64>,
    /// Average cores used while draining, by process group (and the whole machine).
    pub cpu_cores_by_process: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AckQuantiles {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Upper bound of the highest non-empty bucket: the max is at most this.
    pub max_bucket_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub combo: String,
    pub offered_per_sec: u64,
    pub achieved_per_sec: f64,
    pub writer_max_behind_ms: f64,
    pub committed: usize,
    pub received: usize,
    pub missing: usize,
    /// Consumer receive time minus the writer's wall clock when COMMIT returned.
    pub commit_to_consumer: Percentiles,
    /// Consumer receive time minus `clock_timestamp()` at insert (carried in the payload).
    pub insert_to_consumer: Percentiles,
    /// Events the consumer had before the writer saw its COMMIT return (counted as 0 ms).
    pub consumer_before_commit_returned: usize,
    /// From the relay's `outbox_relay_commit_to_ack_seconds` histogram (created_at to broker
    /// confirmation), quantiles interpolated inside buckets.
    pub commit_to_ack: Option<AckQuantiles>,
    /// A run of the latency floor ([`crate::floor`]): no relay; commit→ack from its own
    /// delivery reports, no RSS or CPU of its own.
    pub floor: bool,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
}

/// Failure isolation: healthy latency with nothing failing, then with one extra
/// aggregate whose every publish fails, each on a relay (and database, topic or exchange) of its
/// own.
#[derive(Debug, Clone, Serialize)]
pub struct Isolation {
    pub combo: String,
    /// How the failing aggregate fails.
    pub failure: String,
    /// `transient` (RabbitMQ nack) or `permanent` (Kafka topic missing).
    pub failure_kind: String,
    pub failing_aggregate_type: String,
    pub failing_per_sec: u64,
    /// Events of the failing aggregate committed while the failing run was measured (and the
    /// second before it).
    pub failing_written: u64,
    /// Relay settings of this run (both measurements), before `--relay-env`.
    pub relay_env: Vec<String>,
    pub baseline: Latency,
    pub with_failure: Latency,
    /// `outbox_relay_publish_failures_total` during the failing run (all kinds).
    pub publish_failures: Option<f64>,
    /// `outbox_relay_dead_letters_total` during the failing run (should stay 0: the failing
    /// aggregate keeps being retried).
    pub dead_lettered: Option<f64>,
    /// Highest `outbox_relay_retrying_aggregates` scraped during the failing run (every 250 ms).
    pub retrying_aggregates_max: Option<f64>,
    /// Scrapes during the failing run that saw the gauge above 0, of all scrapes.
    pub retrying_scrapes: (usize, usize),
    /// max(2 × baseline p99, baseline p99 + 100 ms), commit→consumer.
    pub limit_ms: f64,
    pub met: bool,
    /// The same rule on the relay's commit→ack histogram (without the consumer's own tail,
    /// which dominates commit→consumer on tansu); `None` without /metrics.
    pub ack_limit_ms: Option<f64>,
    pub ack_met: Option<bool>,
}

/// Duplicates per SIGKILL: paced writers, the relay killed and restarted at once a
/// few times, then drained.
#[derive(Debug, Clone, Serialize)]
pub struct KillRun {
    pub combo: String,
    pub offered_per_sec: u64,
    pub achieved_per_sec: f64,
    pub aggregates: u64,
    pub seconds: u64,
    pub kills: usize,
    /// From each SIGKILL to the new instance's `relay started` line.
    pub restart_seconds: Vec<f64>,
    pub committed: usize,
    /// Distinct events read.
    pub received: usize,
    /// Every message read, duplicates included.
    pub deliveries: usize,
    pub missing: usize,
    pub duplicates: usize,
    /// Deliveries of an already-read event, by the kill they followed (read after kill i and
    /// before kill i + 1).
    pub duplicates_per_kill: Vec<usize>,
    /// Duplicates read before the first kill (expected 0).
    pub duplicates_before_first_kill: usize,
    pub max_duplicates_per_kill: usize,
    pub mean_duplicates_per_kill: f64,
    /// delivery.max_in_flight × delivery.batch_size (batches of either source): what can be
    /// sent and not yet confirmed when the relay dies.
    pub in_flight_window: usize,
    pub window_formula: String,
    pub order_checked: usize,
    pub order_violations: usize,
    /// From the end of the writers until the consumer read the last new event.
    pub drain_after_writers_seconds: f64,
    pub window_met: bool,
}

/// What the run measured, phase by phase.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub ceilings: Ceilings,
    pub drains: Vec<Drain>,
    pub latencies: Vec<Latency>,
    pub isolation: Vec<Isolation>,
    pub kills: Vec<KillRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub ceilings: Ceilings,
    pub drains: Vec<Drain>,
    pub latency: Vec<Latency>,
    pub isolation: Vec<Isolation>,
    pub kills: Vec<KillRun>,
    pub targets: Vec<TargetCheck>,
    pub notes: Vec<String>,
    pub run_seconds: f64,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `host:port` of a URL, without credentials.
fn config_host(url: &str) -> String {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|x| x.1).unwrap_or(rest);
    rest.split('/').next().unwrap_or_default().to_string()
}

/// What the numbers came from.
pub async fn machine(pg_admin_url: &str, amqp_url: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let postgres = match crate::pg::connect(pg_admin_url).await {
        Ok(c) => c
            .query_one("SELECT version()", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default()
            .split(" on ")
            .next()
            .unwrap_or_default()
            .to_string(),
        Err(_) => String::new(),
    };
    let dirty = !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory_gib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
            .unwrap_or(0.0),
        kernel: sh("uname", &["-sr"]),
        postgres,
        rabbitmq: match sh("rabbitmqctl", &["version"]) {
            v if v.is_empty() => format!("RabbitMQ at {}", config_host(amqp_url)),
            v => format!("RabbitMQ {v}"),
        },
        kafka_broker: {
            let v = sh("tansu", &["--version"]);
            if v.is_empty() { "tansu".into() } else { v }
        },
        relay_commit: format!(
            "{}{}",
            sh("git", &["rev-parse", "--short", "HEAD"]),
            if dirty {
                " (working tree with uncommitted changes)"
            } else {
                ""
            }
        ),
        started_at: sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        load_before: loadavg(),
        load_after: String::new(),
    }
}

fn k(rate: f64) -> String {
    if rate >= 10_000.0 {
        format!("{:.1}k", rate / 1000.0)
    } else {
        format!("{rate:.0}")
    }
}

/// A ceiling, or `not measured` (no combination of the run used that source or broker).
fn measured(rate: f64) -> String {
    if rate > 0.0 {
        format!("{}/s", k(rate))
    } else {
        "not measured".into()
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into())
}

/// `p50 / p99 / p99.9 / max ≤` of the relay's commit→ack histogram, or `n/a`.
fn ack_cell(l: &Latency) -> String {
    l.commit_to_ack
        .as_ref()
        .map(|a| {
            format!(
                "{:.1} / {:.1} / {:.1} / {}",
                a.p50_ms,
                a.p99_ms,
                a.p999_ms,
                opt_ms(a.max_bucket_ms)
            )
        })
        .unwrap_or_else(|| "n/a".into())
}

/// How the latency floor of `combo` is named in the report (its own series in the table and
/// the chart).
pub fn floor_title(combo: &str) -> String {
    format!("{combo} floor")
}

/// `; floor p99 …` when the run measured the latency floor of `l`'s combination and rate.
fn floor_note(latency: &[Latency], l: &Latency) -> String {
    let floor_combo = floor_title(&l.combo);
    latency
        .iter()
        .find(|f| f.floor && f.combo == floor_combo && f.offered_per_sec == l.offered_per_sec)
        .and_then(|f| f.commit_to_ack.as_ref())
        .map(|a| format!("; floor without a relay p99 {:.1} ms", a.p99_ms))
        .unwrap_or_default()
}

impl Report {
    pub fn new(
        machine: Machine,
        settings: Settings,
        measured: Measured,
        notes: Vec<String>,
        run_seconds: f64,
    ) -> Self {
        let Measured {
            ceilings,
            mut drains,
            latencies: latency,
            isolation,
            kills,
        } = measured;
        let spread: Vec<(String, f64)> = drains
            .iter()
            .filter(|d| d.workload == "spread")
            .map(|d| (d.combo.clone(), d.events_per_sec))
            .collect();
        for d in &mut drains {
            d.ratio_to_spread = spread
                .iter()
                .find(|(c, _)| *c == d.combo)
                .map(|(_, rate)| d.events_per_sec / rate);
        }
        let mut targets = Vec::new();
        for d in drains.iter().filter(|d| d.workload == "spread") {
            targets.push(TargetCheck {
                target: format!("{}: drain ≥ 0.8 × relay ceiling", d.combo),
                measured: format!(
                    "{:.2} × ({}/s of {}/s)",
                    d.ratio_to_ceiling,
                    k(d.events_per_sec),
                    k(d.relay_ceiling)
                ),
                met: Some(d.ratio_to_ceiling >= 0.8),
            });
            let floor = match d.combo.as_str() {
                "wal → kafka" => 50_000.0,
                "poll → kafka" => 25_000.0,
                _ => 20_000.0,
            };
            targets.push(TargetCheck {
                target: format!("{}: drain ≥ {}/s", d.combo, k(floor)),
                measured: format!(
                    "{}/s (ceiling {}/s{})",
                    k(d.events_per_sec),
                    k(d.relay_ceiling),
                    if d.relay_ceiling < floor {
                        ", below the target itself"
                    } else {
                        ""
                    }
                ),
                met: Some(d.events_per_sec >= floor),
            });
        }
        for l in latency.iter().filter(|l| !l.floor) {
            let limit = if l.combo.starts_with("wal") {
                50.0
            } else {
                100.0
            };
            if l.offered_per_sec != 5_000 {
                continue;
            }
            targets.push(TargetCheck {
                target: format!(
                    "{}: p99 commit-to-ack ≤ {limit:.0} ms at {}/s",
                    l.combo, l.offered_per_sec
                ),
                measured: match &l.commit_to_ack {
                    Some(a) => format!(
                        "{:.1} ms (commit-to-consumer p99 {:.1} ms){}",
                        a.p99_ms,
                        l.commit_to_consumer.p99_ms,
                        floor_note(&latency, l)
                    ),
                    None => format!(
                        "relay histogram n/a; commit-to-consumer p99 {:.1} ms",
                        l.commit_to_consumer.p99_ms
                    ),
                },
                met: l.commit_to_ack.as_ref().map(|a| a.p99_ms <= limit),
            });
        }
        let mut combos: Vec<&str> = Vec::new();
        for d in &drains {
            if !combos.contains(&d.combo.as_str()) {
                combos.push(&d.combo);
            }
        }
        for combo in &combos {
            let Some(d) = drains
                .iter()
                .filter(|d| d.combo == *combo)
                .max_by(|a, b| a.peak_rss_mib.total_cmp(&b.peak_rss_mib))
            else {
                continue;
            };
            targets.push(TargetCheck {
                target: format!("{combo}: relay peak RSS ≤ 40 MiB while draining"),
                measured: format!("{:.1} MiB (highest: {} drain)", d.peak_rss_mib, d.workload),
                met: Some(d.peak_rss_mib <= 40.0),
            });
        }
        // Key distributions: 10, 1 and Zipf drain at ≥ 0.8 × the spread drain, one transaction
        // at ≥ 0.8 × the relay ceiling.
        let so_far = |d: &Drain| {
            if d.timed_out {
                format!(", timed out after {} s: rate so far", d.time_limit_seconds)
            } else {
                String::new()
            }
        };
        for d in &drains {
            match d.workload.as_str() {
                "10" | "1" | "zipf" => targets.push(TargetCheck {
                    target: format!("{}: {} drain ≥ 0.8 × spread drain", d.combo, d.workload),
                    measured: match d.ratio_to_spread {
                        Some(r) => format!(
                            "{r:.2} × ({}/s of {}/s{})",
                            k(d.events_per_sec),
                            k(d.events_per_sec / r),
                            so_far(d)
                        ),
                        None => format!("{}/s; no spread drain to compare", k(d.events_per_sec)),
                    },
                    met: d.ratio_to_spread.map(|r| r >= 0.8),
                }),
                "one-txn" => targets.push(TargetCheck {
                    target: format!("{}: one-txn drain ≥ 0.8 × relay ceiling", d.combo),
                    measured: format!(
                        "{:.2} × ({}/s of {}/s{})",
                        d.ratio_to_ceiling,
                        k(d.events_per_sec),
                        k(d.relay_ceiling),
                        so_far(d)
                    ),
                    met: Some(d.ratio_to_ceiling >= 0.8),
                }),
                _ => {}
            }
        }
        for combo in &combos {
            let (checked, violations) = drains
                .iter()
                .filter(|d| d.combo == *combo)
                .fold((0, 0), |(c, v), d| {
                    (c + d.order_checked, v + d.order_violations)
                });
            targets.push(TargetCheck {
                target: format!("{combo}: per-aggregate order kept in every drain"),
                measured: format!("{violations} backward steps in {checked} first deliveries"),
                met: (checked > 0).then_some(violations == 0),
            });
        }
        // Failure isolation and duplicates per SIGKILL.
        for i in &isolation {
            let (b, f) = (&i.baseline, &i.with_failure);
            targets.push(TargetCheck {
                target: format!(
                    "{}: healthy p99 with a failing aggregate ({}) ≤ max(2 × baseline p99, baseline p99 + 100 ms)",
                    i.combo, i.failure_kind
                ),
                measured: format!(
                    "{:.1} ms (baseline {:.1} ms, limit {:.1} ms)",
                    f.commit_to_consumer.p99_ms, b.commit_to_consumer.p99_ms, i.limit_ms
                ),
                met: Some(i.met),
            });
            targets.push(TargetCheck {
                target: format!(
                    "{}: the same on the relay's commit→ack p99 (informational)",
                    i.combo
                ),
                measured: match (&b.commit_to_ack, &f.commit_to_ack, i.ack_limit_ms) {
                    (Some(ba), Some(fa), Some(limit)) => format!(
                        "{:.1} ms (baseline {:.1} ms, limit {limit:.1} ms)",
                        fa.p99_ms, ba.p99_ms
                    ),
                    _ => "relay histogram n/a".into(),
                },
                met: i.ack_met,
            });
            targets.push(TargetCheck {
                target: format!(
                    "{}: no healthy event missing with a failing aggregate",
                    i.combo
                ),
                measured: format!(
                    "{} of {} missing (baseline {} of {})",
                    f.missing, f.committed, b.missing, b.committed
                ),
                met: Some(f.missing == 0 && b.missing == 0),
            });
        }
        for r in &kills {
            targets.push(TargetCheck {
                target: format!("{}: no event missing after {} SIGKILLs", r.combo, r.kills),
                measured: format!("{} of {} missing", r.missing, r.committed),
                met: Some(r.missing == 0),
            });
            targets.push(TargetCheck {
                target: format!(
                    "{}: duplicates per SIGKILL ≤ in-flight window ({} = {})",
                    r.combo, r.window_formula, r.in_flight_window
                ),
                measured: format!(
                    "max {}, mean {:.0} ({} duplicates in all)",
                    r.max_duplicates_per_kill, r.mean_duplicates_per_kill, r.duplicates
                ),
                met: Some(r.window_met),
            });
            targets.push(TargetCheck {
                target: format!("{}: per-aggregate order kept across SIGKILLs", r.combo),
                measured: format!(
                    "{} backward steps in {} first deliveries",
                    r.order_violations, r.order_checked
                ),
                met: (r.order_checked > 0).then_some(r.order_violations == 0),
            });
        }
        Self {
            machine,
            settings,
            ceilings,
            drains,
            latency,
            isolation,
            kills,
            targets,
            notes,
            run_seconds,
        }
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let c = &self.ceilings;
        let mut o = String::new();
        let _ = writeln!(o, "# outbox-relay benchmark ({} run)\n", s.mode);
        let _ = writeln!(
            o,
            "Generated by `scripts/bench{}` at {} in {:.0} s.\n",
            s.arguments, m.started_at, self.run_seconds
        );
        let _ = writeln!(o, "## Machine\n");
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(o, "| CPU | {} × {} |", m.cores, m.cpu_model);
        let _ = writeln!(o, "| memory | {} GiB |", m.memory_gib);
        let _ = writeln!(o, "| kernel | {} |", m.kernel);
        let _ = writeln!(o, "| Postgres | {} (same machine) |", m.postgres);
        let _ = writeln!(o, "| RabbitMQ | {} (same machine) |", m.rabbitmq);
        let _ = writeln!(
            o,
            "| Kafka | {} (in-memory storage, same machine) |",
            m.kafka_broker
        );
        let _ = writeln!(
            o,
            "| relay | `{}`, {} build, {} |",
            m.relay_commit,
            s.relay_build,
            if s.relay_env.is_empty() {
                "default settings (delivery.batch_size = 1000), 3 partitions".to_string()
            } else {
                format!(
                    "3 partitions, changed settings: `{}`",
                    s.relay_env.join(" ")
                )
            }
        );
        let _ = writeln!(
            o,
            "| load average (1/5/15 min) | before {} · after {} |",
            m.load_before, m.load_after
        );
        if s.relay_build != "release" {
            let _ = writeln!(
                o,
                "\n**The relay and this harness are a `{}` build, not the release one: the figures \
                 below show that every phase runs, not how fast the relay is.**",
                s.relay_build
            );
        }
        let _ = writeln!(
            o,
            "\nWorkload: {} events per backlog over {} aggregates, {}-byte JSON payloads, one event per \
             transaction; {} writer connections; latency runs of {} s at {} events/s.\n",
            s.events,
            s.aggregates,
            s.payload_bytes,
            s.writers,
            s.latency_secs,
            s.rates
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        );
        let drained: Vec<String> = s
            .workloads
            .iter()
            .filter_map(|w| Workload::parse(w).ok())
            .map(|w| {
                format!(
                    "`{}` ({}, {} events{})",
                    w.name(),
                    w.describe(s.aggregates),
                    s.events_of(w),
                    if w.is_hot() && s.hot_events < s.events {
                        ", capped by --hot-events"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "Drain backlogs: {}; each drain stopped after {} s at most.\n",
            drained.join(", "),
            s.drain_limit_secs
        );

        let _ = writeln!(o, "## Ceilings\n");
        let _ = writeln!(o, "| what | rate | how |\n|---|---:|---|");
        if c.commit_events_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| Postgres commits, wal schema | {} | {} connections, one `INSERT` per transaction, `synchronous_commit = on`, {} events |",
                measured(c.commit_events_per_sec),
                c.commit_writers,
                c.commit_events
            );
        }
        if c.commit_notify_events_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| Postgres commits, poll schema | {} | the same, with the poll schema's statement trigger that NOTIFYs at commit, {} events |",
                measured(c.commit_notify_events_per_sec),
                c.commit_notify_events
            );
        }
        if c.commit_notify_listen_events_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| Postgres commits, poll schema + LISTEN | {} | the same, with one idle session LISTENing on the channel as the polling relay does, {} events |",
                measured(c.commit_notify_listen_events_per_sec),
                c.commit_notify_listen_events
            );
        }
        if c.kafka_producer_msgs_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| Kafka producer | {} | rdkafka, idempotent, acks=all, linger.ms=5, relay headers and key, all in flight |",
                measured(c.kafka_producer_msgs_per_sec)
            );
        }
        if c.rabbitmq_publisher_msgs_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| RabbitMQ publisher | {} | lapin, publisher confirms (5,000 outstanding), mandatory, persistent, durable queue |",
                measured(c.rabbitmq_publisher_msgs_per_sec)
            );
        }
        if c.poll_source_events_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| poll source | {} ({:.1} MB/s) | SQL loop: 1,000 unpublished rows in relay_seq order, then `UPDATE … relay_published_at = now()` |",
                measured(c.poll_source_events_per_sec),
                c.poll_source_mb_per_sec
            );
        }
        if c.poll_pipelined_events_per_sec > 0.0 {
            let _ = writeln!(
                o,
                "| poll source on two connections (not a ceiling) | {} | the same rows and statements, read past a watermark on one connection while the other marks the batches read before (at most two ahead) |",
                measured(c.poll_pipelined_events_per_sec)
            );
        }
        for w in &c.wal_source {
            let _ = writeln!(
                o,
                "| wal source ({}, {} backlog) | {}/s | `pg_logical_slot_peek_binary_changes` (pgoutput, proto 1) on the relay's slot: {} rows in {:.2} s (decoding alone: nothing is sent over a socket) |",
                w.combo,
                w.backlog,
                k(w.events_per_sec),
                w.rows,
                w.seconds
            );
            let _ = writeln!(
                o,
                "| wal streamed to a plain client ({}, {} backlog; not a ceiling) | {}/s | the same backlog from a copy of the relay's slot, streamed to a client that only counts Insert messages (pgwire-replication, the relay's settings): {:.2} s |",
                w.combo,
                w.backlog,
                k(w.streamed_events_per_sec),
                w.streamed_seconds
            );
        }

        let _ = writeln!(o, "\n## Drain throughput\n");
        let _ = writeln!(
            o,
            "Backlog written first, then the relay started; timed from spawning the relay until the consumer had read every event \
             (a drain not done within {} s: until then, rates so far, marked ⏱).\n",
            s.drain_limit_secs
        );
        let _ = writeln!(
            o,
            "| source → sink | workload | events/s | MB/s | steady events/s | source ceiling | broker ceiling | ratio to ceiling | first event after | source done after | mean batch | peak RSS | CPU s / 100k |"
        );
        let _ = writeln!(
            o,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for d in &self.drains {
            let _ = writeln!(
                o,
                "| {} | {} | **{}**{} | {:.1} | {} | {} | {} | **{:.2}** | {:.2} s | {} | {} | {:.1} MiB | {:.2} |",
                d.combo,
                d.workload,
                k(d.events_per_sec),
                if d.timed_out { " ⏱" } else { "" },
                d.mb_per_sec,
                k(d.steady_events_per_sec),
                k(d.source_ceiling),
                k(d.broker_ceiling),
                d.ratio_to_ceiling,
                d.first_message_after_seconds,
                d.source_done_after_seconds
                    .map(|t| format!("{t:.2} s"))
                    .unwrap_or_else(|| "n/a".into()),
                d.mean_batch_size
                    .map(|b| format!("{b:.0}"))
                    .unwrap_or_else(|| "n/a".into()),
                d.peak_rss_mib,
                d.cpu_seconds_per_100k
            );
        }

        let _ = writeln!(
            o,
            "\nWhere the CPU went while draining (average cores busy, from /proc; {} cores in all):\n",
            self.machine.cores
        );
        let mut groups: Vec<String> = Vec::new();
        for d in &self.drains {
            for (g, _) in &d.cpu_cores_by_process {
                if !groups.contains(g) {
                    groups.push(g.clone());
                }
            }
        }
        let _ = writeln!(o, "| source → sink | workload | {} |", groups.join(" | "));
        let _ = writeln!(o, "|---|---|{}", "---:|".repeat(groups.len()));
        for d in &self.drains {
            let cells: Vec<String> = groups
                .iter()
                .map(|g| {
                    d.cpu_cores_by_process
                        .iter()
                        .find(|(name, _)| name == g)
                        .map(|(_, v)| format!("{v:.2}"))
                        .unwrap_or_else(|| "0".into())
                })
                .collect();
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                d.combo,
                d.workload,
                cells.join(" | ")
            );
        }

        let _ = writeln!(o, "\n## Drain by key distribution\n");
        let _ = writeln!(
            o,
            "Each backlog drained by each combination, timed as above. ratio to ceiling: events/s over the combination's \
             min(source ceiling, broker ceiling) (wal: decoding measured on the combination's first backlog; in brackets \
             against min(the backlog streamed to a plain replication client, broker ceiling)). ratio to spread: \
             events/s over the same combination's `spread` drain. Targets: ≥ 0.8 × spread for `10`, `1` and `zipf`; \
             ≥ 0.8 × ceiling for `spread` and `one-txn`. Order violations: first deliveries whose sequence number within \
             their aggregate (`n` in the payload) is lower than one already read for that aggregate.\n"
        );
        let _ = writeln!(
            o,
            "| source → sink | workload | events | seconds | events/s | ratio to ceiling | ratio to spread | order violations | duplicates | status |"
        );
        let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
        for d in &self.drains {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.2} | **{}** | {:.2}{} | {} | {} | {} | {} |",
                d.combo,
                d.workload,
                d.events,
                d.seconds,
                k(d.events_per_sec),
                d.ratio_to_ceiling,
                d.ratio_to_streamed
                    .map(|r| format!(" ({r:.2})"))
                    .unwrap_or_default(),
                d.ratio_to_spread
                    .map(|r| format!("**{r:.2}**"))
                    .unwrap_or_else(|| "n/a".into()),
                if d.order_checked == 0 {
                    "n/a".to_string()
                } else {
                    d.order_violations.to_string()
                },
                d.duplicates,
                if d.timed_out {
                    format!(
                        "timed out after {} s: {} of {} read, {}/s so far",
                        d.time_limit_seconds,
                        d.events_read,
                        d.events,
                        k(d.events_per_sec)
                    )
                } else {
                    "done".into()
                }
            );
        }

        let _ = writeln!(o, "\n## Latency\n");
        let _ = writeln!(
            o,
            "commit→consumer: consumer receive time minus the writer's clock when COMMIT returned (primary). \
             insert→consumer: minus `clock_timestamp()` at insert, carried in the payload (the source-timestamp way of \
             Debezium-style benchmarks; includes the commit itself). commit→ack: the relay's \
             `outbox_relay_commit_to_ack_seconds` histogram (event `created_at` to broker confirmation), \
             quantiles interpolated inside buckets like `histogram_quantile`, max = upper bound of the highest \
             non-empty bucket. All ms. `… floor` (wal → Kafka): no relay, the least a log-tailing relay does \
             (`bench/src/floor.rs`): a replication client handing each insert straight to a producer with the \
             relay's settings, on its own slot and topic, same writers and consumer, after the relay's runs; \
             commit→ack from the insert (`clock_timestamp()` in the payload; the relay's starts at `created_at`) to its delivery reports, exact. A relay near its floor is as fast \
             as this machine allows at that rate.\n"
        );
        let _ = writeln!(
            o,
            "| source → sink | offered/s | achieved/s | commit→consumer p50 / p99 / p99.9 / max | insert→consumer p50 / p99 / p99.9 | commit→ack p50 / p99 / p99.9 / max ≤ | missing | relay CPU s | RSS |"
        );
        let _ = writeln!(o, "|---|---:|---:|---|---|---|---:|---:|---:|");
        for l in &self.latency {
            let p = &l.commit_to_consumer;
            let i = &l.insert_to_consumer;
            let ack = ack_cell(l);
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.1} / **{:.1}** / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {} | {} | {} |",
                l.combo,
                l.offered_per_sec,
                l.achieved_per_sec,
                p.p50_ms,
                p.p99_ms,
                p.p999_ms,
                p.max_ms,
                i.p50_ms,
                i.p99_ms,
                i.p999_ms,
                ack,
                l.missing,
                // The floor runs in the bench's own process: no relay to measure.
                if l.floor {
                    "– | –".to_string()
                } else {
                    format!("{:.1} | {:.1} MiB", l.cpu_seconds, l.peak_rss_mib)
                }
            );
        }
        let _ = writeln!(o, "\n![latency percentiles by offered rate](latency.svg)\n");

        if !self.isolation.is_empty() {
            self.isolation_markdown(&mut o);
        }
        if !self.kills.is_empty() {
            self.kills_markdown(&mut o);
        }

        let _ = writeln!(o, "## Targets (issues 8 and 11)\n");
        let _ = writeln!(o, "| target | measured | met |\n|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                t.target,
                t.measured,
                match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "n/a",
                }
            );
        }
        let _ = writeln!(o, "\n## Method notes\n");
        for line in [
            "Everything runs on the one machine: Postgres, the broker, the relay, and the harness's writers and consumer share the cores, as they do for the ceilings.",
            "Backlogs are written by 4 connections with 32 single-insert transactions pipelined each and `synchronous_commit = off` (same rows and WAL, no flush wait); each aggregate's events commit in order (a connection owns the aggregates a % 4). `one-txn`: one connection, every insert in one transaction. `zipf`: aggregate k (k = 0 … aggregates − 1) with probability ∝ (k + 1)^−1.1, drawn with a fixed seed (same backlog every run). For wal the slot exists before the backlog is written (`outbox-relay migrate`).",
            "Order check: the consumer reads every partition (Kafka, keyed by aggregate) or the one queue (RabbitMQ) and, for each aggregate, compares each first delivery's `n` with the highest already read; redeliveries of an event are counted as duplicates, not checked.",
            "Drain time includes the relay's start-up (connections, leader lock, topic metadata); `steady events/s` excludes it. Completion is judged by the distinct event ids the consumer read (tansu's high watermarks can lag), never by offsets.",
            "Ceilings are measured for the sources and brokers the run's combinations use (`--only`); the wal decoding ceiling on each wal combination's first drain backlog.",
            "The relay ceiling is min(source ceiling, broker ceiling); the ceilings run alone, the drain runs source, relay, broker and consumer at once on 2 cores.",
            "Kafka: topic created up front with 3 partitions; the consumer assigns them from the beginning. RabbitMQ: durable topic exchange and a durable queue bound with `#`, consumed with no-ack.",
            "Footprint: VmHWM of /proc/<pid>/status and utime+stime of /proc/<pid>/stat of the relay process.",
            "Failure isolation: the failing aggregate has aggregate type `bench_fail`. RabbitMQ (transient): a durable queue with `x-max-length = 0` and `x-overflow = reject-publish` bound with `bench_fail.#`, so RabbitMQ nacks every publish routed there; the healthy queue is bound with `bench.#` only. Kafka (permanent): its topic does not exist and the relay runs with `kafka.create_topics = false` (the harness creates the healthy topic), so every attempt is refused as permanent; `delivery.max_attempts = 1000000` keeps it from being dead-lettered (a permanent failure counts toward max_attempts, engine/mod.rs `settle`), backoff 50 ms to 1 s so it is retried throughout. Both measurements use these settings, each on a relay, database and topic or exchange of its own (tansu's in-memory storage lists every batch of a partition on each fetch, so a topic's consumer slows down as the topic fills: a second measurement on the baseline's topic would be slower for that alone).",
            "Duplicates per SIGKILL: the consumer reads from before the first event; it stops once it has read every committed event, so a duplicate read after the last new event would not be counted (re-sends follow a restart, before newer events).",
        ] {
            let _ = writeln!(o, "- {line}");
        }
        if s.hot_events < s.events && s.workloads.iter().any(|w| w == "1" || w == "10") {
            let _ = writeln!(
                o,
                "- The `1` and `10` backlogs are capped at {} events (`--hot-events`; {} for the others): a fast relay drains them in well under a second, so their events/s include the relay's start-up (see `first event after`) and their ratio to spread is biased low; `steady events/s` excludes the start-up.",
                s.hot_events, s.events
            );
        }
        for n in &self.notes {
            let _ = writeln!(o, "- {n}");
        }
        o
    }

    fn isolation_markdown(&self, o: &mut String) {
        let s = &self.settings;
        let _ = writeln!(o, "## Failure isolation\n");
        let _ = writeln!(
            o,
            "Two relays per combination, each with a database and a topic or exchange of its own: healthy writers at {} \
             events/s over {} aggregates for {} s with nothing failing (baseline), then the same for {} s with ONE extra aggregate of its own aggregate type written at {} events/s \
             whose every publish fails (it starts failing 1 s before the second measurement and goes on until its end). \
             Latencies of healthy events only, measured as in the latency section (commit→consumer per event, commit→ack \
             from the relay's histogram between two scrapes; the failing events never reach the healthy consumer). Target \
             (issue 11): healthy p99 with the failure ≤ max(2 × baseline p99, baseline p99 + 100 ms), commit→consumer; \
             the same rule on the relay's commit→ack p99 is listed too (informational: it leaves out the consumer's own \
             tail, which dominates commit→consumer on tansu). \
             retrying aggregates: highest `outbox_relay_retrying_aggregates` of the scrapes every 250 ms during the failing \
             run (scrapes above 0 / all). All ms.\n",
            s.isolation_rate,
            s.isolation_aggregates,
            s.isolation_secs,
            s.isolation_secs,
            s.isolation_failing_rate
        );
        let _ = writeln!(
            o,
            "| source → sink | failing aggregate | run | achieved/s | commit→consumer p50 / p99 / p99.9 / max | commit→ack p50 / p99 / p99.9 / max ≤ | missing | failing events written | publish failures | dead-lettered | retrying aggregates | p99 limit | met |"
        );
        let _ = writeln!(
            o,
            "|---|---|---|---:|---|---|---:|---:|---:|---:|---|---:|---|"
        );
        let count = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
        for i in &self.isolation {
            for (run, l) in [("baseline", &i.baseline), ("with failure", &i.with_failure)] {
                let failing = run != "baseline";
                let p = &l.commit_to_consumer;
                let _ = writeln!(
                    o,
                    "| {} | {} | {run} | {:.0} | {:.1} / **{:.1}** / {:.1} / {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    i.combo,
                    if failing { i.failure.as_str() } else { "none" },
                    l.achieved_per_sec,
                    p.p50_ms,
                    p.p99_ms,
                    p.p999_ms,
                    p.max_ms,
                    ack_cell(l),
                    l.missing,
                    if failing {
                        i.failing_written.to_string()
                    } else {
                        "–".into()
                    },
                    if failing {
                        count(i.publish_failures)
                    } else {
                        "–".into()
                    },
                    if failing {
                        count(i.dead_lettered)
                    } else {
                        "–".into()
                    },
                    if failing {
                        format!(
                            "{} ({} / {})",
                            count(i.retrying_aggregates_max),
                            i.retrying_scrapes.0,
                            i.retrying_scrapes.1
                        )
                    } else {
                        "–".into()
                    },
                    if failing {
                        format!("{:.1}", i.limit_ms)
                    } else {
                        "–".into()
                    },
                    if !failing {
                        "–"
                    } else if i.met {
                        "yes"
                    } else {
                        "**no**"
                    },
                );
            }
        }
        let envs: Vec<String> = self
            .isolation
            .iter()
            .map(|i| format!("{}: `{}`", i.combo, i.relay_env.join(" ")))
            .collect();
        let _ = writeln!(
            o,
            "\nRelay settings of these runs (both measurements; `--relay-env` applies after them): {}.\n",
            envs.join("; ")
        );
    }

    fn kills_markdown(&self, o: &mut String) {
        let s = &self.settings;
        let _ = writeln!(o, "## Duplicates per SIGKILL\n");
        let _ = writeln!(
            o,
            "Writers at {} events/s over {} aggregates for {} s; the relay SIGKILLed {} times at even intervals and \
             restarted at once (the same configuration), then left to drain. Every message the consumer read is counted: \
             duplicates are deliveries of an event already read, attributed to the kill they followed (read after kill i, \
             before kill i + 1). In-flight window: delivery.max_in_flight × delivery.batch_size (batches of either source), \
             what can be sent and not yet confirmed when the relay dies. Order: first deliveries \
             per aggregate, as in the drains. restart: from the SIGKILL to the new instance's `relay started` line.\n",
            s.kill_rate, s.kill_aggregates, s.kill_secs, s.kills
        );
        let _ = writeln!(
            o,
            "| source → sink | achieved/s | committed | read (distinct) | deliveries | missing | duplicates | per kill | before 1st kill | in-flight window | within window | order violations | restart s | drain after writers |"
        );
        let _ = writeln!(
            o,
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---|---:|"
        );
        for r in &self.kills {
            let _ = writeln!(
                o,
                "| {} | {:.0} | {} | {} | {} | **{}** | {} | {} | {} | {} ({}) | {} | {} | {} | {:.2} s |",
                r.combo,
                r.achieved_per_sec,
                r.committed,
                r.received,
                r.deliveries,
                r.missing,
                r.duplicates,
                r.duplicates_per_kill
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(" / "),
                r.duplicates_before_first_kill,
                r.in_flight_window,
                r.window_formula,
                if r.window_met { "yes" } else { "**no**" },
                if r.order_checked == 0 {
                    "n/a".to_string()
                } else {
                    r.order_violations.to_string()
                },
                r.restart_seconds
                    .iter()
                    .map(|t| format!("{t:.2}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                r.drain_after_writers_seconds
            );
        }
        let _ = writeln!(o);
    }

    /// Two panels (commit→consumer, relay commit→ack), log-scale ms over offered rate; one
    /// colour per source → sink, one dash pattern per percentile.
    pub fn svg(&self) -> String {
        const W: f64 = 980.0;
        const H: f64 = 460.0;
        const PANEL_W: f64 = 400.0;
        const PANEL_H: f64 = 300.0;
        const TOP: f64 = 60.0;
        let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f"];
        let dashes = [("p50", ""), ("p99", "6 4"), ("p99.9", "2 3")];
        let mut combos: Vec<String> = Vec::new();
        for l in &self.latency {
            if !combos.contains(&l.combo) {
                combos.push(l.combo.clone());
            }
        }
        let mut rates: Vec<u64> = self.latency.iter().map(|l| l.offered_per_sec).collect();
        rates.sort_unstable();
        rates.dedup();
        type Pick = fn(&Latency) -> Option<[f64; 3]>;
        let panels: [(&str, Pick); 2] = [
            ("commit → consumer (measured per event)", |l| {
                let p = &l.commit_to_consumer;
                (p.samples > 0).then_some([p.p50_ms, p.p99_ms, p.p999_ms])
            }),
            ("commit → broker ack (relay histogram)", |l| {
                l.commit_to_ack
                    .as_ref()
                    .map(|a| [a.p50_ms, a.p99_ms, a.p999_ms])
            }),
        ];
        let values: Vec<f64> = self
            .latency
            .iter()
            .flat_map(|l| {
                panels
                    .iter()
                    .filter_map(|(_, f)| f(l))
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .filter(|v| *v > 0.0)
            .collect();
        // Decades of the log axis, from the data (1 ms to 1 s when there is none).
        let lo = values
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .clamp(0.01, 1e6)
            .log10()
            .floor();
        let hi = values
            .iter()
            .copied()
            .fold(0.0, f64::max)
            .clamp(1.0, 1e6)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let (lo, hi) = if values.is_empty() {
            (0.0, 3.0)
        } else {
            (lo, hi)
        };
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="16">outbox-relay latency by offered rate ({} run, {} s per rate)</text>"#,
            W / 2.0,
            self.settings.mode,
            self.settings.latency_secs
        );
        for (pi, (title, pick)) in panels.iter().enumerate() {
            let x0 = 70.0 + pi as f64 * (PANEL_W + 90.0);
            let y0 = TOP;
            let x_of = |i: usize| {
                if rates.len() <= 1 {
                    x0 + PANEL_W / 2.0
                } else {
                    x0 + 40.0 + (PANEL_W - 80.0) * i as f64 / (rates.len() - 1) as f64
                }
            };
            let y_of = |v: f64| {
                let v = v.max(10f64.powf(lo)).log10();
                y0 + PANEL_H - (v - lo) / (hi - lo) * PANEL_H
            };
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{title}</text>"#,
                x0 + PANEL_W / 2.0,
                y0 - 10.0
            );
            let _ = writeln!(
                o,
                r##"<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/>"##
            );
            let mut e = lo as i32;
            while e <= hi as i32 {
                let v = 10f64.powi(e);
                let y = y_of(v);
                let _ = writeln!(
                    o,
                    r##"<line x1="{x0}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                    x0 + PANEL_W,
                    x0 - 6.0,
                    y + 4.0,
                    if v >= 1.0 {
                        format!("{v:.0} ms")
                    } else {
                        format!("{v} ms")
                    }
                );
                e += 1;
            }
            for (i, r) in rates.iter().enumerate() {
                let _ = writeln!(
                    o,
                    r#"<text x="{:.1}" y="{}" text-anchor="middle">{r}/s</text>"#,
                    x_of(i),
                    y0 + PANEL_H + 18.0
                );
            }
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="middle">offered rate (events/s)</text>"#,
                x0 + PANEL_W / 2.0,
                y0 + PANEL_H + 36.0
            );
            for (ci, combo) in combos.iter().enumerate() {
                let colour = colours[ci % colours.len()];
                for (di, (_, dash)) in dashes.iter().enumerate() {
                    let points: Vec<(f64, f64)> = rates
                        .iter()
                        .enumerate()
                        .filter_map(|(ri, r)| {
                            let l = self
                                .latency
                                .iter()
                                .find(|l| &l.combo == combo && l.offered_per_sec == *r)?;
                            pick(l).map(|v| (x_of(ri), y_of(v[di])))
                        })
                        .collect();
                    if points.is_empty() {
                        continue;
                    }
                    let path: Vec<String> = points
                        .iter()
                        .map(|(x, y)| format!("{x:.1},{y:.1}"))
                        .collect();
                    let _ = writeln!(
                        o,
                        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                        path.join(" ")
                    );
                    for (x, y) in points {
                        let _ = writeln!(
                            o,
                            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
                        );
                    }
                }
            }
        }
        // Legend.
        let ly = TOP + PANEL_H + 62.0;
        for (ci, combo) in combos.iter().enumerate() {
            let x = 70.0 + ci as f64 * 150.0;
            let _ = writeln!(
                o,
                r#"<line x1="{x}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{combo}</text>"#,
                x + 24.0,
                colours[ci % colours.len()],
                x + 30.0,
                ly + 4.0
            );
        }
        for (di, (name, dash)) in dashes.iter().enumerate() {
            let x = 70.0 + di as f64 * 150.0;
            let y = ly + 22.0;
            let _ = writeln!(
                o,
                r##"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="#333" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{name}</text>"##,
                x + 24.0,
                x + 30.0,
                y + 4.0
            );
        }
        let _ = writeln!(o, "</svg>");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Report {
        measured(Measured::default())
    }

    fn measured(measured: Measured) -> Report {
        Report::new(
            Machine::default(),
            Settings {
                mode: "quick".into(),
                events: 1,
                aggregates: 1,
                workloads: vec!["spread".into()],
                drain_limit_secs: 1,
                hot_events: 1,
                one_txn_events: 1,
                payload_bytes: 512,
                writers: 1,
                rates: vec![],
                latency_secs: 1,
                commit_ceiling_secs: 1,
                isolation_rate: 800,
                isolation_aggregates: 200,
                isolation_failing_rate: 20,
                isolation_secs: 1,
                kill_rate: 2000,
                kill_aggregates: 1000,
                kill_secs: 1,
                kills: 3,
                relay_env: vec![],
                relay_build: "release".into(),
                arguments: String::new(),
            },
            measured,
            vec![],
            0.0,
        )
    }

    #[test]
    fn a_report_without_latency_runs_still_renders() {
        let r = empty();
        assert!(r.svg().ends_with("</svg>\n"));
        assert!(r.markdown().contains("## Targets"));
    }

    fn latency(p99_ms: f64) -> Latency {
        Latency {
            combo: "poll → rabbitmq".into(),
            offered_per_sec: 800,
            achieved_per_sec: 800.0,
            writer_max_behind_ms: 0.0,
            committed: 100,
            received: 100,
            missing: 0,
            commit_to_consumer: Percentiles::of(vec![1.0, p99_ms]),
            insert_to_consumer: Percentiles::default(),
            consumer_before_commit_returned: 0,
            commit_to_ack: None,
            floor: false,
            peak_rss_mib: 1.0,
            cpu_seconds: 1.0,
        }
    }

    #[test]
    fn isolation_and_kills_get_their_sections_and_targets() {
        let mut r = empty();
        r.isolation.push(Isolation {
            combo: "poll → rabbitmq".into(),
            failure: "nacked".into(),
            failure_kind: "transient".into(),
            failing_aggregate_type: "bench_fail".into(),
            failing_per_sec: 20,
            failing_written: 100,
            relay_env: vec!["RELAY_DELIVERY__MAX_ATTEMPTS=1000000".into()],
            baseline: latency(10.0),
            with_failure: latency(150.0),
            publish_failures: Some(8.0),
            dead_lettered: Some(0.0),
            retrying_aggregates_max: Some(1.0),
            retrying_scrapes: (20, 21),
            limit_ms: 110.0,
            met: false,
            ack_limit_ms: None,
            ack_met: None,
        });
        r.kills.push(KillRun {
            combo: "poll → rabbitmq".into(),
            offered_per_sec: 2000,
            achieved_per_sec: 2000.0,
            aggregates: 1000,
            seconds: 5,
            kills: 3,
            restart_seconds: vec![0.2, 0.2, 0.2],
            committed: 10_000,
            received: 10_000,
            deliveries: 10_030,
            missing: 0,
            duplicates: 30,
            duplicates_per_kill: vec![10, 10, 10],
            duplicates_before_first_kill: 0,
            max_duplicates_per_kill: 10,
            mean_duplicates_per_kill: 10.0,
            in_flight_window: 4000,
            window_formula: "4 × 1000".into(),
            order_checked: 10_000,
            order_violations: 0,
            drain_after_writers_seconds: 0.1,
            window_met: true,
        });
        // Targets are derived in `new`: rebuild from the parts.
        let r = Report::new(
            r.machine,
            r.settings,
            Measured {
                isolation: r.isolation,
                kills: r.kills,
                ..Default::default()
            },
            vec![],
            0.0,
        );
        let md = r.markdown();
        assert!(md.contains("## Failure isolation"), "{md}");
        assert!(md.contains("## Duplicates per SIGKILL"), "{md}");
        assert!(md.contains("| 10 / 10 / 10 |"), "{md}");
        let p99 = r
            .targets
            .iter()
            .find(|t| t.target.contains("healthy p99 with a failing aggregate"))
            .unwrap();
        assert_eq!(p99.met, Some(false));
        assert!(
            r.targets
                .iter()
                .any(|t| t.target.contains("duplicates per SIGKILL") && t.met == Some(true))
        );
    }

    #[test]
    fn the_wal_kafka_target_names_the_floor_of_its_rate() {
        let ack = |p99_ms| {
            Some(AckQuantiles {
                samples: 100,
                p50_ms: 1.0,
                p99_ms,
                p999_ms: p99_ms,
                max_bucket_ms: None,
            })
        };
        let relay = Latency {
            combo: "wal → kafka".into(),
            offered_per_sec: 5_000,
            commit_to_ack: ack(80.0),
            ..latency(90.0)
        };
        let floor = |rate, p99_ms| Latency {
            combo: "wal → kafka floor".into(),
            offered_per_sec: rate,
            commit_to_ack: ack(p99_ms),
            floor: true,
            ..latency(70.0)
        };
        let r = measured(Measured {
            latencies: vec![relay, floor(1_000, 9.0), floor(5_000, 61.0)],
            ..Measured::default()
        });
        let checks: Vec<_> = r
            .targets
            .iter()
            .filter(|t| t.target.contains("p99"))
            .collect();
        assert_eq!(
            checks.len(),
            1,
            "the floor is no target of its own: {checks:?}"
        );
        assert!(
            checks[0].measured.contains("80.0 ms")
                && checks[0]
                    .measured
                    .contains("floor without a relay p99 61.0 ms"),
            "{checks:?}"
        );
        assert_eq!(checks[0].met, Some(false));
        let md = r.markdown();
        assert!(
            md.contains("| wal → kafka floor | 5000 |") && md.contains("| 0 | – | – |"),
            "the floor has no relay CPU or RSS to show: {md}"
        );
    }

    #[test]
    fn chart_axis_spans_the_measured_values() {
        let mut r = empty();
        r.latency.push(Latency {
            combo: "wal → kafka".into(),
            offered_per_sec: 1000,
            achieved_per_sec: 1000.0,
            writer_max_behind_ms: 0.0,
            committed: 1,
            received: 1,
            missing: 0,
            commit_to_consumer: Percentiles::of(vec![2.0, 30.0, 450.0]),
            insert_to_consumer: Percentiles::default(),
            consumer_before_commit_returned: 0,
            commit_to_ack: None,
            floor: false,
            peak_rss_mib: 1.0,
            cpu_seconds: 1.0,
        });
        let svg = r.svg();
        // p50 = 30 ms, p99 = p99.9 = 450 ms: decades 10 ms to 1000 ms.
        assert!(
            svg.contains(">10 ms<") && svg.contains(">1000 ms<"),
            "{svg}"
        );
        assert!(!svg.contains(">1 ms<"), "{svg}");
        assert!(svg.contains("<polyline"));
    }
}
