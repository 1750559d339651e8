//! The command line. Every duration and size has a `--quick` default as well as a full one, so
//! CI runs the same phases as a full run, only shorter; the report repeats the arguments (less
//! the local paths) so that a result can be reproduced.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "relay-bench",
    about = "Benchmarks outbox-relay: ceilings, drain throughput, latency and footprint, in one run"
)]
pub(crate) struct Args {
    /// Short variant for CI: 20,000-event backlogs (2,000 for `1` and `10`), workloads
    /// spread,1,zipf, 10 s per drain at most, 5 s latency runs, 4 s failure-isolation runs,
    /// 5 s SIGKILL runs; reports to bench/results/quick unless --out is given. No timing
    /// assertions either way.
    #[arg(long)]
    pub(crate) quick: bool,
    /// The relay binary under test (a release build; `scripts/bench` passes the one of
    /// BENCH_PROFILE).
    #[arg(long, default_value = "target/release/outbox-relay")]
    pub(crate) relay_bin: PathBuf,
    /// The cargo profile the relay and this harness were built with (`scripts/bench` sets it); the
    /// report says so, and that its figures are not performance unless it is `release`.
    #[arg(long, default_value = "release")]
    pub(crate) relay_build: String,
    /// Where report.md, report.json and latency.svg go [default: bench/results].
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Events in each backlog [default: 200000, quick: 20000].
    #[arg(long)]
    pub(crate) events: Option<u64>,
    /// Aggregates the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) aggregates: u64,
    /// Drain backlogs, each drained by every combination: `spread` (uniform over --aggregates),
    /// `10` (10 aggregates), `1` (one aggregate), `zipf` (Zipf(1.1) over --aggregates),
    /// `one-txn` (at most 100,000 events in one transaction, over --aggregates)
    /// [default: spread,10,1,zipf,one-txn; quick: spread,1,zipf].
    #[arg(long, value_delimiter = ',')]
    pub(crate) workloads: Vec<String>,
    /// Time limit of each drain from the relay's start; a drain not done by then is reported as
    /// timed out with the rate so far [default: 40, quick: 10].
    #[arg(long)]
    pub(crate) drain_limit_secs: Option<u64>,
    /// Events of the `1` and `10` backlogs (at most --events) [default: 100000, quick: 2000].
    #[arg(long)]
    pub(crate) hot_events: Option<u64>,
    /// Concurrent writer connections (commit ceiling, latency).
    #[arg(long, default_value_t = 16)]
    pub(crate) writers: usize,
    /// Offered rates of the latency runs, events/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub(crate) rates: Vec<u64>,
    /// Seconds per latency run [default: 60, quick: 5].
    #[arg(long)]
    pub(crate) latency_secs: Option<u64>,
    /// Extra environment for the relay, e.g. `--relay-env RELAY_DELIVERY__BATCH_SIZE=5000` (for
    /// experiments; the report lists what was set).
    #[arg(long, value_name = "KEY=VALUE")]
    pub(crate) relay_env: Vec<String>,
    /// Measure ceilings and drains only (no latency runs).
    #[arg(long)]
    pub(crate) no_latency: bool,
    /// Skip the failure-isolation runs (healthy latency with and without one failing aggregate).
    #[arg(long)]
    pub(crate) no_isolation: bool,
    /// Healthy offered rate of the failure-isolation runs, events/s.
    #[arg(long, default_value_t = 800)]
    pub(crate) isolation_rate: u64,
    /// Healthy aggregates of the failure-isolation runs.
    #[arg(long, default_value_t = 200)]
    pub(crate) isolation_aggregates: u64,
    /// Offered rate of the one failing aggregate, events/s.
    #[arg(long, default_value_t = 20)]
    pub(crate) isolation_failing_rate: u64,
    /// Seconds of each failure-isolation measurement (baseline, with failure) [default: 30,
    /// quick: 4].
    #[arg(long)]
    pub(crate) isolation_secs: Option<u64>,
    /// Skip the SIGKILL runs (duplicates per kill).
    #[arg(long)]
    pub(crate) no_kills: bool,
    /// SIGKILLs of the relay per SIGKILL run, at even intervals while the writers run.
    #[arg(long, default_value_t = 3)]
    pub(crate) kills: usize,
    /// Offered rate of the SIGKILL runs, events/s.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) kill_rate: u64,
    /// Aggregates of the SIGKILL runs.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) kill_aggregates: u64,
    /// Seconds of writing in each SIGKILL run [default: 15, quick: 5].
    #[arg(long)]
    pub(crate) kill_secs: Option<u64>,
    /// Only these source→sink combinations: poll-kafka, poll-rabbitmq, wal-kafka, wal-rabbitmq.
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub(crate) pg_admin_url: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub(crate) kafka_brokers: String,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub(crate) amqp_url: String,
}

/// This run's arguments, without the paths `scripts/bench` fills in, each with a leading space.
pub(crate) fn command_line() -> String {
    let mut out = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--relay-bin" || a == "--out" || a == "--relay-build" {
            args.next();
            continue;
        }
        if a.starts_with("--relay-bin=")
            || a.starts_with("--out=")
            || a.starts_with("--relay-build=")
        {
            continue;
        }
        out.push(' ');
        out.push_str(&a);
    }
    out
}
