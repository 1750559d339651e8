//! The two fault measurements of the benchmark, for each source × sink combination:
//!
//! - **Failure isolation**: healthy commit→consumer latency at a moderate rate, first with
//!   nothing failing (baseline), then with ONE extra aggregate whose every publish fails, each
//!   on a relay, database and topic or exchange of its own. RabbitMQ fails it transiently: a queue with `x-max-length = 0` and
//!   `x-overflow = reject-publish` is bound to its routing key, so every publish routed there is
//!   nacked. Kafka fails it permanently: its topic does not exist and the relay may not create
//!   it; a permanent refusal counts toward `delivery.max_attempts` (engine/mod.rs `settle`), so
//!   a very high limit keeps the aggregate failing, with a short backoff, for the whole run
//!   instead of being dead-lettered once and going idle.
//! - **Duplicates per SIGKILL**: paced writers, the relay SIGKILLed and restarted at once a few
//!   times, then drained; every delivery counted. What a dying relay had sent and not yet
//!   confirmed is sent again after the restart, so the duplicates of one kill should stay within
//!   the in-flight window, `delivery.max_in_flight × delivery.batch_size`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::combo::{Combo, SinkKind};
use crate::ctx::Ctx;
use crate::latency::PacedRun;
use crate::pg::{self, BenchDb, now_us};
use crate::relay::{self, Setup};
use crate::report::{Isolation, KillRun, Latency};
use crate::stats;
use crate::workload::OrderCheck;
use crate::{amqp, kafka};

/// Aggregate type of the failing aggregate: its own topic (Kafka) or routing key (RabbitMQ).
const FAILING_TYPE: &str = "bench_fail";
const RETRYING_AGGREGATES: &str = "outbox_relay_retrying_aggregates";
const PUBLISH_FAILURES: &str = "outbox_relay_publish_failures_total";
const DEAD_LETTERED: &str = "outbox_relay_dead_letters_total";
/// Relay defaults (`[delivery]` in relay/src/config/mod.rs) of the in-flight window, unless
/// `--relay-env` sets them.
const DEFAULT_MAX_IN_FLIGHT: usize = 4;
const DEFAULT_BATCH_SIZE: usize = 1000;

/// The failure-isolation run of one combination: the baseline and the measurement with a
/// failing aggregate, each on a relay, database and topic or exchange of its own, created for it
/// and removed after it whatever the outcome. Separate, so that both start from the same broker
/// state: tansu's in-memory storage lists every batch a partition holds on each fetch, so on a
/// shared topic the second measurement's consumer would be slower for that alone (its CPU
/// doubled over 40 s at a steady 800 events/s).
pub async fn isolation(ctx: &mut Ctx, combo: Combo) -> Result<Isolation> {
    let s = ctx.settings.clone();
    // Before --relay-env, which may still override them. The same in both measurements.
    let mut env: Vec<(String, String)> = vec![
        ("RELAY_DELIVERY__MAX_ATTEMPTS".into(), "1000000".into()),
        ("RELAY_DELIVERY__BACKOFF_INITIAL".into(), "50ms".into()),
        ("RELAY_DELIVERY__BACKOFF_MAX".into(), "1s".into()),
    ];
    if combo.sink == SinkKind::Kafka {
        env.push(("RELAY_KAFKA__CREATE_TOPICS".into(), "false".into()));
    }
    let relay_env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let (baseline, _) = isolation_phase(ctx, combo, &env, false).await?;
    let (with_failure, failing) = isolation_phase(ctx, combo, &env, true).await?;
    let failing = failing.context("the failing measurement reported no failing aggregate")?;
    if failing.publish_failures == Some(0.0) {
        ctx.notes.push(format!(
            "isolation {}: the relay counted no publish failure during the failing run: the failing aggregate did not fail as intended",
            combo.title()
        ));
    }
    for (run, l) in [("baseline", &baseline), ("with failure", &with_failure)] {
        behind_note(
            ctx,
            &format!("isolation {} ({run})", combo.title()),
            l.offered_per_sec,
            l.achieved_per_sec,
        );
    }
    let limit = |b: f64| (2.0 * b).max(b + 100.0);
    let limit_ms = limit(baseline.commit_to_consumer.p99_ms);
    let ack_limit_ms = baseline.commit_to_ack.as_ref().map(|a| limit(a.p99_ms));
    let ack_met = match (&with_failure.commit_to_ack, ack_limit_ms) {
        (Some(a), Some(l)) => Some(a.p99_ms <= l),
        _ => None,
    };
    let (retrying_max, above, scrapes) = failing.retrying;
    Ok(Isolation {
        combo: combo.title(),
        failure: failing.description,
        failure_kind: failure_kind(combo).into(),
        failing_aggregate_type: FAILING_TYPE.into(),
        failing_per_sec: s.isolation_failing_rate,
        failing_written: failing.written,
        relay_env,
        met: with_failure.commit_to_consumer.p99_ms <= limit_ms,
        limit_ms,
        ack_limit_ms,
        ack_met,
        baseline,
        with_failure,
        publish_failures: failing.publish_failures,
        dead_lettered: failing.dead_lettered,
        retrying_aggregates_max: retrying_max,
        retrying_scrapes: (above, scrapes),
    })
}

fn failure_kind(combo: Combo) -> &'static str {
    match combo.sink {
        SinkKind::Kafka => "permanent",
        SinkKind::Rabbitmq => "transient",
    }
}

/// What the measurement with a failing aggregate saw of it.
struct Failing {
    /// How it fails (with the names of this measurement's topic or queue).
    description: String,
    /// Its events committed during the measurement and the second before it.
    written: u64,
    publish_failures: Option<f64>,
    dead_lettered: Option<f64>,
    /// `outbox_relay_retrying_aggregates`: highest, scrapes above 0, scrapes.
    retrying: (Option<f64>, usize, usize),
}

/// One of the two measurements, in a database of its own (`<combo>_iso` for the baseline,
/// `<combo>_isofail` with the failing aggregate); the database, topic or exchange and queues are
/// removed whatever the outcome.
async fn isolation_phase(
    ctx: &mut Ctx,
    combo: Combo,
    env: &[(String, String)],
    failing: bool,
) -> Result<(Latency, Option<Failing>)> {
    let phase = if failing { "isofail" } else { "iso" };
    let label = format!("{}_{phase}", combo.label());
    let db = BenchDb::create(&ctx.args.pg_admin_url, &ctx.run_id, &label).await?;
    let mut setup = ctx.setup(combo, &db, phase);
    let mut extra = env.to_vec();
    extra.append(&mut setup.extra_env);
    setup.extra_env = extra;
    let result = isolation_on(ctx, &db, &setup, failing).await;
    ctx.cleanup_broker(&setup).await;
    if combo.sink == SinkKind::Rabbitmq {
        amqp::delete_queue(&ctx.args.amqp_url, &refusing_queue(&setup)).await;
    }
    let dropped = db.drop_now().await;
    let measured = result?;
    dropped?;
    Ok(measured)
}

fn refusing_queue(setup: &Setup) -> String {
    format!("{}.refusing", setup.destination)
}

async fn isolation_on(
    ctx: &mut Ctx,
    db: &BenchDb,
    setup: &Setup,
    failing: bool,
) -> Result<(Latency, Option<Failing>)> {
    let s = ctx.settings.clone();
    let combo = setup.combo;
    setup.migrate()?;
    // The same broker set-up in both measurements; only the failing one writes to it.
    let description = match combo.sink {
        SinkKind::Kafka => {
            // The relay may not create topics in this run: the healthy one is made here, the
            // failing aggregate's (`<destination>.bench_fail`) never is.
            kafka::create_topic(&ctx.args.kafka_brokers, &setup.topic()).await?;
            format!(
                "`{FAILING_TYPE}`: topic `{}.{FAILING_TYPE}` missing, create_topics = false",
                setup.destination
            )
        }
        SinkKind::Rabbitmq => {
            let url = &ctx.args.amqp_url;
            amqp::declare(
                url,
                &setup.destination,
                &setup.destination,
                &format!("{}.#", pg::AGGREGATE_TYPE),
            )
            .await?;
            amqp::declare_refusing_queue(
                url,
                &setup.destination,
                &refusing_queue(setup),
                &format!("{FAILING_TYPE}.#"),
            )
            .await?;
            format!("`{FAILING_TYPE}`: queue x-max-length = 0, reject-publish (nack)")
        }
    };
    let mut relay = setup.start()?;
    relay
        .wait_for_log("relay started", Duration::from_secs(30))
        .await?;
    let metrics_addr = ctx.metrics_addr(&mut relay, combo).await;
    let mut written = 0u64;
    ctx.warm_up(db, setup, &relay, s.isolation_aggregates, &mut written)
        .await?;
    let run = PacedRun {
        rate: s.isolation_rate,
        secs: s.isolation_secs,
        aggregates: s.isolation_aggregates,
    };
    if !failing {
        ctx.log(format!(
            "isolation {}: baseline, {} events/s over {} aggregates for {} s",
            combo.title(),
            run.rate,
            run.aggregates,
            run.secs
        ));
    } else {
        ctx.log(format!(
            "isolation {}: with one failing aggregate ({}) at {} events/s, {} events/s over {} aggregates for {} s",
            combo.title(),
            failure_kind(combo),
            s.isolation_failing_rate,
            run.rate,
            run.aggregates,
            run.secs
        ));
    }
    let side = if failing {
        Some(FailingSide::start(db, metrics_addr.clone(), s.isolation_failing_rate).await)
    } else {
        None
    };
    let measured = ctx
        .paced_run(
            db,
            setup,
            Some(&relay),
            metrics_addr.as_deref(),
            run,
            &mut written,
        )
        .await;
    let failing = match side {
        Some(side) => Some(side.finish(description).await?),
        None => None,
    };
    let measured = measured?;
    relay.check_alive()?;
    relay.stop();
    Ok((measured, failing))
}

/// The failing aggregate's writer and the sampler of the retrying-aggregates gauge, running
/// beside the healthy writers of the failing measurement.
struct FailingSide {
    stop: Arc<AtomicBool>,
    writer: tokio::task::JoinHandle<Result<u64>>,
    sampler: tokio::task::JoinHandle<(Option<f64>, usize, usize)>,
    metrics_addr: Option<String>,
    before: Option<String>,
}

impl FailingSide {
    /// Starts writing the failing aggregate and returns once it has failed for a second, so it
    /// is failing already when the measurement starts.
    async fn start(db: &BenchDb, metrics_addr: Option<String>, rate: u64) -> Self {
        let before = match &metrics_addr {
            Some(addr) => relay::scrape(addr).await.ok(),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn({
            let (url, stop) = (db.url.clone(), stop.clone());
            async move { pg::paced_aggregate_writer(&url, FAILING_TYPE, rate, stop).await }
        });
        // The gauge, every 250 ms while the failing run lasts: (highest, scrapes above 0,
        // scrapes).
        let sampler = tokio::spawn({
            let (addr, stop) = (metrics_addr.clone(), stop.clone());
            async move {
                let mut highest: Option<f64> = None;
                let (mut above, mut scrapes) = (0, 0);
                while let Some(addr) = addr.as_deref()
                    && !stop.load(Ordering::Relaxed)
                {
                    if let Ok(m) = relay::scrape(addr).await {
                        scrapes += 1;
                        if let Some(v) = stats::total(&m, RETRYING_AGGREGATES) {
                            highest = Some(highest.map_or(v, |h: f64| h.max(v)));
                            if v > 0.0 {
                                above += 1;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                (highest, above, scrapes)
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        Self {
            stop,
            writer,
            sampler,
            metrics_addr,
            before,
        }
    }

    /// Stops the failing writer and the sampler; what they saw, with the relay's counters
    /// over the measurement.
    async fn finish(self, description: String) -> Result<Failing> {
        self.stop.store(true, Ordering::Relaxed);
        let written = self.writer.await.context("failing writer panicked")??;
        let retrying = self.sampler.await.context("metrics sampler panicked")?;
        let after = match &self.metrics_addr {
            Some(addr) => relay::scrape(addr).await.ok(),
            None => None,
        };
        let delta = |name: &str| match (&self.before, &after) {
            (Some(b), Some(a)) => {
                Some(stats::total(a, name).unwrap_or(0.0) - stats::total(b, name).unwrap_or(0.0))
            }
            _ => None,
        };
        Ok(Failing {
            description,
            written,
            publish_failures: delta(PUBLISH_FAILURES),
            dead_lettered: delta(DEAD_LETTERED),
            retrying,
        })
    }
}

/// The SIGKILL run of one combination, in a database of its own.
pub async fn kills(ctx: &mut Ctx, combo: Combo) -> Result<KillRun> {
    let label = format!("{}_kill", combo.label());
    let db = BenchDb::create(&ctx.args.pg_admin_url, &ctx.run_id, &label).await?;
    let setup = ctx.setup(combo, &db, "kill");
    let result = kills_on(ctx, &db, &setup).await;
    ctx.cleanup_broker(&setup).await;
    let dropped = db.drop_now().await;
    let r = result?;
    dropped?;
    Ok(r)
}

/// A note in the report when the writers could not offer the rate (the poll schema's NOTIFY
/// trigger serialises commits: see the commit ceilings), so the run measured a lower one.
fn behind_note(ctx: &mut Ctx, what: &str, offered: u64, achieved: f64) {
    if achieved < 0.9 * offered as f64 {
        ctx.notes.push(format!(
            "{what}: the writers committed {achieved:.0} events/s of the {offered}/s offered (Postgres commit rate; see the commit ceilings)"
        ));
    }
}

/// `KEY=VALUE` of `--relay-env` as a number, or `default`; `keys` are the setting's env names
/// (the current one and a deprecated one the relay still reads), the last one given wins.
fn relay_setting(env: &[(String, String)], keys: &[&str], default: usize) -> usize {
    env.iter()
        .rev()
        .find(|(k, _)| keys.contains(&k.as_str()))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(default)
}

async fn kills_on(ctx: &mut Ctx, db: &BenchDb, setup: &Setup) -> Result<KillRun> {
    let s = ctx.settings.clone();
    let combo = setup.combo;
    setup.migrate()?;
    ctx.prepare_broker(setup).await?;
    let mut relay = setup.start()?;
    relay
        .wait_for_log("relay started", Duration::from_secs(30))
        .await?;
    ctx.log(format!(
        "kills {}: {} events/s over {} aggregates for {} s, {} SIGKILLs",
        combo.title(),
        s.kill_rate,
        s.kill_aggregates,
        s.kill_secs,
        s.kills
    ));
    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let since = now_us();
    let deadline = Instant::now() + Duration::from_secs(s.kill_secs + 90);
    let consumer = ctx
        .consumer(setup, target.clone(), since, deadline, stop.clone())
        .await?;
    let writers = tokio::spawn({
        let url = db.url.clone();
        let (rate, secs, aggregates, writers) =
            (s.kill_rate, s.kill_secs, s.kill_aggregates, s.writers);
        async move {
            pg::paced_writers(
                &url,
                rate,
                Duration::from_secs(secs),
                aggregates,
                writers,
                0,
            )
            .await
        }
    });
    let started = Instant::now();
    let mut kill_us = Vec::with_capacity(s.kills);
    let mut restart_seconds = Vec::with_capacity(s.kills);
    let mut restarted: Result<()> = Ok(());
    for i in 1..=s.kills {
        let due =
            started + Duration::from_secs(s.kill_secs).mul_f64(i as f64 / (s.kills + 1) as f64);
        tokio::time::sleep_until(due.into()).await;
        if let Err(e) = relay.check_alive() {
            restarted = Err(e.context(format!("before SIGKILL {i}")));
            break;
        }
        let at = Instant::now();
        kill_us.push(now_us());
        relay.kill();
        relay = match setup.start_instance(i) {
            Ok(r) => r,
            Err(e) => {
                restarted = Err(e);
                break;
            }
        };
        if let Err(e) = relay
            .wait_for_log("relay started", Duration::from_secs(30))
            .await
        {
            restarted = Err(e.context(format!("restart after SIGKILL {i}")));
            break;
        }
        restart_seconds.push(at.elapsed().as_secs_f64());
    }
    let paced = writers.await.context("paced writers panicked")?;
    let writers_done_us = now_us();
    let paced = match (paced, restarted) {
        (Ok(p), Ok(())) => p,
        (Err(e), _) | (_, Err(e)) => {
            stop.store(true, Ordering::Relaxed);
            let _ = consumer.join().await;
            return Err(e);
        }
    };
    target.store(paced.committed.len(), Ordering::Relaxed);
    let seen = consumer.join().await?;
    relay.check_alive()?;
    relay.stop();

    let achieved = paced.committed.len() as f64 / paced.elapsed.as_secs_f64();
    behind_note(
        ctx,
        &format!("kills {}", combo.title()),
        s.kill_rate,
        achieved,
    );
    let committed: HashMap<u128, i64> = paced.committed.iter().copied().collect();
    let mut delivered: HashMap<u128, usize> = HashMap::with_capacity(seen.len());
    let mut order = OrderCheck::default();
    // Index 0: before the first kill; i: after kill i.
    let mut by_kill = vec![0usize; s.kills + 1];
    let mut last_new_us = writers_done_us;
    for m in &seen {
        let n = delivered.entry(m.id).or_insert(0);
        *n += 1;
        if *n == 1 {
            if committed.contains_key(&m.id) {
                last_new_us = last_new_us.max(m.recv_us);
            }
            if let Some((aggregate, seq)) = m.order {
                order.first_delivery(aggregate, seq);
            }
        } else {
            by_kill[kill_us.iter().filter(|&&k| k <= m.recv_us).count()] += 1;
        }
    }
    let missing = committed
        .keys()
        .filter(|id| !delivered.contains_key(id))
        .count();
    if missing > 0 {
        ctx.log(format!(
            "kills {}: {missing} of {} committed events never arrived; relay logs: {}",
            combo.title(),
            committed.len(),
            relay.log.display()
        ));
    }
    let max_in_flight = relay_setting(
        &setup.extra_env,
        &["RELAY_DELIVERY__MAX_IN_FLIGHT"],
        DEFAULT_MAX_IN_FLIGHT,
    );
    let batch_size = relay_setting(
        &setup.extra_env,
        &["RELAY_DELIVERY__BATCH_SIZE", "RELAY_POLL__BATCH_SIZE"],
        DEFAULT_BATCH_SIZE,
    );
    let window = max_in_flight * batch_size;
    let per_kill: Vec<usize> = by_kill[1..].to_vec();
    let max_per_kill = per_kill.iter().copied().max().unwrap_or(0);
    let duplicates = seen.len() - delivered.len();
    Ok(KillRun {
        combo: combo.title(),
        offered_per_sec: s.kill_rate,
        achieved_per_sec: achieved,
        aggregates: s.kill_aggregates,
        seconds: s.kill_secs,
        kills: s.kills,
        restart_seconds,
        committed: committed.len(),
        received: delivered.len(),
        deliveries: seen.len(),
        missing,
        duplicates,
        mean_duplicates_per_kill: per_kill.iter().sum::<usize>() as f64 / s.kills as f64,
        max_duplicates_per_kill: max_per_kill,
        duplicates_per_kill: per_kill,
        duplicates_before_first_kill: by_kill[0],
        in_flight_window: window,
        window_formula: format!("{max_in_flight} × {batch_size}"),
        window_met: max_per_kill <= window,
        order_checked: order.checked,
        order_violations: order.violations,
        drain_after_writers_seconds: (last_new_us - writers_done_us).max(0) as f64 / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_settings_come_from_relay_env_last_one_wins() {
        let batch_size = ["RELAY_DELIVERY__BATCH_SIZE", "RELAY_POLL__BATCH_SIZE"];
        let env = vec![
            ("RELAY_DELIVERY__BATCH_SIZE".to_string(), "5000".to_string()),
            ("RELAY_DELIVERY__BATCH_SIZE".to_string(), "200".to_string()),
        ];
        assert_eq!(relay_setting(&env, &batch_size, 1000), 200);
        assert_eq!(
            relay_setting(&env, &["RELAY_DELIVERY__MAX_IN_FLIGHT"], 4),
            4
        );
    }

    #[test]
    fn the_deprecated_batch_size_name_still_counts_for_the_in_flight_window() {
        let env = vec![("RELAY_POLL__BATCH_SIZE".to_string(), "300".to_string())];
        let batch_size = ["RELAY_DELIVERY__BATCH_SIZE", "RELAY_POLL__BATCH_SIZE"];
        assert_eq!(relay_setting(&env, &batch_size, 1000), 300);
    }
}
