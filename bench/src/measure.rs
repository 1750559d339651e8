//! The phases in order: ceilings, drains, latency, failure isolation, SIGKILLs. Each
//! measurement is tried up to [`ATTEMPTS`] times: the services are shared, and a restart under
//! one measurement should cost a repeat and a note in the report, not the whole run. One log
//! line per result shows a long run's progress.

use anyhow::{Context, Result};

use crate::combo::Combo;
use crate::ctx::{ATTEMPTS, Ctx};
use crate::report::Measured;
use crate::workload::Workload;
use crate::{ceilings, drain, faults, latency};

/// Every phase in order, each repeated when a shared service was restarted under it.
pub(crate) async fn measure(
    ctx: &mut Ctx,
    combos: &[Combo],
    workloads: &[Workload],
) -> Result<Measured> {
    let mut ceilings = None;
    for attempt in 1..=ATTEMPTS {
        match ceilings::ceilings(ctx, combos).await {
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
                match drain::drain(ctx, combo, workload, &mut ceilings).await {
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
            match latency::latency(ctx, combo).await {
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
