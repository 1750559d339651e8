//! One run from its arguments to its report. The settings are derived from the arguments (the
//! `--quick` defaults) and checked before anything is written, so a bad flag fails at once
//! rather than after minutes of ceilings; whatever the phases return, this run's databases are
//! dropped, so a failed run leaves nothing behind on the shared Postgres.

use std::time::Instant;

use anyhow::{Result, bail};
use uuid::Uuid;

use crate::args::{Args, command_line};
use crate::combo::Combo;
use crate::ctx::Ctx;
use crate::measure::measure;
use crate::report::{self, Report, Settings};
use crate::workload::{self, Workload};
use crate::{pg, relay};

pub(crate) async fn run(args: Args) -> Result<Report> {
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
        relay_build: args.relay_build.clone(),
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
