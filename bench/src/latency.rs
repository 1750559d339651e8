//! Phase 3, latency: paced writers at fixed offered rates on a running relay; commit→consumer
//! from per-event timestamps, commit→ack from the relay's own histogram. A drain's throughput
//! says nothing of how long one event waits at an ordinary load; commit→ack ends where the
//! relay's work ends (the broker's confirmation), commit→consumer where a service sees the
//! event. The paced runs are shared with the failure-isolation runs of [`crate::faults`], so
//! both measure latency the same way.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::combo::{Combo, SinkKind, SourceKind};
use crate::ctx::{Ctx, Seen};
use crate::floor;
use crate::pg::{self, BenchDb, now_us};
use crate::relay::{self, Setup, mib};
use crate::report::{AckQuantiles, Latency};
use crate::stats::{Buckets, Percentiles};

const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";

/// One relay per combination, fed by paced writers at each offered rate in turn.
pub(crate) async fn latency(ctx: &mut Ctx, combo: Combo) -> Result<Vec<Latency>> {
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
                Some(&relay),
                metrics_addr.as_deref(),
                paced,
                &mut written,
            )
            .await?,
        );
    }
    relay.stop();
    if combo.source == SourceKind::Wal && combo.sink == SinkKind::Kafka {
        out.extend(floor::floor(ctx, db, setup, &s.rates, &mut written).await?);
    }
    Ok(out)
}

/// One paced measurement of [`Ctx::paced_run`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct PacedRun {
    /// Offered events/s.
    pub(crate) rate: u64,
    pub(crate) secs: u64,
    pub(crate) aggregates: u64,
}

impl Ctx {
    /// The relay's `/metrics` address, or a note that commit-to-ack cannot be reported.
    pub(crate) async fn metrics_addr(
        &mut self,
        relay: &mut relay::Relay,
        combo: Combo,
    ) -> Option<String> {
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
    pub(crate) async fn warm_up(
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
    pub(crate) async fn paced_run(
        &self,
        db: &BenchDb,
        setup: &Setup,
        relay: Option<&relay::Relay>,
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
        let cpu_before = relay.map(|r| r.footprint().cpu_seconds);
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
        let footprint = relay.map(relay::Relay::footprint);

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
            floor: false,
            peak_rss_mib: footprint.map_or(0.0, |f| mib(f.peak_rss_kib)),
            cpu_seconds: match (footprint, cpu_before) {
                (Some(f), Some(before)) => f.cpu_seconds - before,
                _ => 0.0,
            },
        })
    }
}
