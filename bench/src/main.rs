//! `relay-bench`: measures `outbox-relay` against the raw ceilings of this machine, in one run.
//!
//! 1. Ceilings ([`ceilings`]): Postgres commit rate of outbox transactions; a plain producer
//!    with the relay's settings to Kafka and to RabbitMQ; Postgres alone handing the backlog out
//!    (pgoutput decoding through `pg_logical_slot_peek_binary_changes` for wal, measured on the
//!    first drain backlog of each combination, with the backlog streamed from a copy of the slot
//!    to a plain replication client beside it; a claim-and-read SQL loop for poll).
//! 2. Drain ([`drain`]): a backlog written first, then the real relay binary started; timed
//!    from its start until a consumer has read every event (poll and wal × Kafka and RabbitMQ),
//!    for each key distribution of `--workloads` (spread, 10 aggregates, 1 aggregate, Zipf, one
//!    transaction), each with a time limit; the consumer checks per-aggregate order.
//! 3. Latency ([`latency`]): writers at fixed offered rates; commit-to-consumer from per-event
//!    timestamps, commit-to-ack from the relay's own histogram. For wal → Kafka also the
//!    latency floor ([`floor`]): the same runs through a plain replication client and producer,
//!    no relay.
//! 4. Footprint: the relay's peak RSS and CPU seconds, from `/proc`, taken in the drain and
//!    latency runs.
//! 5. Failure isolation ([`faults`]): healthy latency with and without one aggregate
//!    whose every publish fails (RabbitMQ: nacked, transient; Kafka: topic missing, permanent).
//! 6. Duplicates per SIGKILL ([`faults`]): the relay killed and restarted under paced writers;
//!    missing events, duplicates per kill against the in-flight window, order.
//! 7. Report ([`report`]): `report.md`, `report.json`, `latency.svg`.
//!
//! Everything runs on one machine next to Postgres and the broker, so the harness's own writers
//! and consumers compete with the relay for the same cores; the ceilings are measured the same
//! way, so the ratios stay comparable.
//!
//! [`run`] turns the arguments ([`args`]) into the settings and the shared context ([`ctx`]);
//! [`measure`] runs the phases in order for each source × sink combination ([`combo`]); `main`
//! writes the report files.
#![forbid(unsafe_code)]

mod amqp;
mod args;
mod ceilings;
mod combo;
mod ctx;
mod drain;
mod faults;
mod floor;
mod kafka;
mod latency;
mod measure;
mod pg;
mod relay;
mod report;
mod run;
mod stats;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use args::Args;

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
        let report = run::run(args).await?;
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
