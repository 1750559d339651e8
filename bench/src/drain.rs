//! Phase 2, drain throughput: a backlog written first, then the real relay binary started and
//! timed until a consumer has read every event, once for each key distribution of
//! `--workloads`. Catching up on a backlog (after an outage, a deploy, a slow broker) is where
//! the relay's throughput matters, and how the keys are spread decides how much of it the
//! per-aggregate ordering leaves, so each distribution is drained on its own. The consumer
//! checks that order too: a fast drain that reorders an aggregate's events is no result. Each
//! drain has a time limit, so a distribution the relay cannot keep up with reports the rate so
//! far instead of holding up the run. The relay's footprint (peak RSS, CPU) is taken here as
//! well, since a drain is its busiest state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::combo::{Combo, SinkKind, SourceKind};
use crate::ctx::Ctx;
use crate::pg::{self, BenchDb, now_us};
use crate::relay::{self, Setup, mib};
use crate::report::{Ceilings, Drain, WalCeiling};
use crate::stats;
use crate::workload::{OrderCheck, Workload};

const BATCH_SIZE: &str = "outbox_relay_batch_size";

/// Backlog first, then the relay; timed until the consumer has read every event. The database,
/// topic or exchange are removed whatever the outcome.
pub(crate) async fn drain(
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
            ctx.log(format!(
                "drain {title}: the backlog streamed to a plain replication client"
            ));
            let streamed = pg::stream_to_plain_client(&db.url, &setup.slot, events).await?;
            let rate = events as f64 / t.as_secs_f64();
            ceilings.wal_source.retain(|w| w.combo != combo.title());
            ceilings.wal_source.push(WalCeiling {
                combo: combo.title(),
                backlog: workload.name().into(),
                rows,
                seconds: t.as_secs_f64(),
                events_per_sec: rate,
                streamed_seconds: streamed.as_secs_f64(),
                streamed_events_per_sec: events as f64 / streamed.as_secs_f64(),
            });
            rate
        }
    };
    // wal: the same drain against the backlog streamed to a plain replication client.
    let streamed = (ceilings.wal_source.iter())
        .find(|w| w.combo == combo.title() && combo.source == SourceKind::Wal)
        .map(|w| w.streamed_events_per_sec);
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
                    SourceKind::Poll => pg::poll_drained(&client).await?,
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
        ratio_to_streamed: streamed.map(|s| rate / s.min(broker_ceiling)),
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
