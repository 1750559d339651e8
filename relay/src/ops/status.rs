//! `outbox-relay status`: how the outbox is doing, read-only and lock-free, so it is safe to
//! run (and to scrape with `--json`) while the daemon works.
//!
//! - poll mode: pending events (`relay_published_at IS NULL`) and how many of them wait behind
//!   a dead letter, the oldest pending event's age (needs `created_at`), events published in
//!   the last minute, and the published rows kept for replay.
//! - wal mode: "pending" means not yet confirmed through the replication slot, so the slot is
//!   reported (<https://www.postgresql.org/docs/15/view-pg-replication-slots.html>): active
//!   pid, confirmed LSN, the WAL it retains (`pg_current_wal_lsn() - restart_lsn`) and the lag
//!   (`pg_current_wal_lsn() - confirmed_flush_lsn`).
//! - both: dead letters and held aggregates, the active relay (whoever holds the leader
//!   advisory lock, from `pg_locks`), and replays that were interrupted.

use clap::Args;
use serde::Serialize;

use super::sql::OpsTable;
use super::{format_age, format_bytes, format_ms, render_table};
use crate::config::{Config, SinkKind, SourceKind};
use crate::error::Error;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    outbox: String,
    source: &'static str,
    sink: &'static str,
    active_instance: Option<Instance>,
    /// Poll mode only (wal: see `slot.lag_bytes`).
    pending: Option<i64>,
    /// Of `pending`, events waiting behind a dead letter of their aggregate.
    pending_held: Option<i64>,
    oldest_pending_age_secs: Option<f64>,
    /// Poll mode only.
    published_last_minute: Option<i64>,
    /// Rows kept for replay: published ones (poll) or all rows (wal).
    retained: i64,
    oldest_retained: Option<String>,
    dead_letters: i64,
    held_aggregates: i64,
    /// Wal mode: later events of held aggregates, parked in the dead-letter table.
    parked_held_events: i64,
    oldest_dead_letter: Option<String>,
    slot: Option<Slot>,
    unfinished_replays: Vec<Replay>,
}

#[derive(Debug, Serialize)]
struct Instance {
    pid: i32,
    application_name: String,
    /// The RabbitMQ node its sink is connected to (`host:port`), from its `application_name`.
    broker_node: Option<String>,
    client_addr: Option<String>,
    since: Option<String>,
}

#[derive(Debug, Serialize)]
struct Slot {
    name: String,
    exists: bool,
    active: bool,
    active_pid: Option<i32>,
    confirmed_flush_lsn: Option<String>,
    restart_lsn: Option<String>,
    retained_wal_bytes: Option<i64>,
    lag_bytes: Option<i64>,
    wal_status: Option<String>,
    /// Postgres 17+: a failover slot (synced to standbys with `sync_replication_slots`).
    failover: Option<bool>,
    /// What the active relay found stalling its stream, and since when (its progress row).
    stall: Option<String>,
    stall_since: Option<String>,
    /// What each other host of a multi-host `DATABASE_URL` holds of the slot (a synced
    /// copy or not), for a failover slot.
    standbys: Option<String>,
}

#[derive(Debug, Serialize)]
struct Replay {
    replay_id: String,
    sent: i64,
    skipped: i64,
    total: i64,
    started_at: String,
}

pub async fn run(config: &Config, args: StatusArgs) -> Result<(), Error> {
    let t = OpsTable::open(config).await?;
    let status = collect(config, &t).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("status serializes")
        );
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

async fn collect(config: &Config, t: &OpsTable) -> Result<Status, Error> {
    let client = t.client();
    let pg = |what: &'static str| move |e| Error::pg(format!("status: cannot read {what}"), e);
    let table = t.table();
    let dl = t.dead_letters();
    let created = t.created_at();
    let ms = |col: &str| format!("(extract(epoch FROM {col}) * 1000)::bigint");

    let mut status = Status {
        outbox: table.display(),
        source: match config.source {
            SourceKind::Poll => "poll",
            SourceKind::Wal => "wal",
        },
        sink: match config.sink {
            SinkKind::Kafka => "kafka",
            SinkKind::Rabbitmq => "rabbitmq",
        },
        active_instance: t.active_instance().await?.map(
            |(pid, application_name, client_addr, since)| Instance {
                pid,
                broker_node: crate::source::broker_node_of(&application_name).map(str::to_string),
                application_name,
                client_addr,
                since: since.map(format_ms),
            },
        ),
        pending: None,
        pending_held: None,
        oldest_pending_age_secs: None,
        published_last_minute: None,
        retained: 0,
        oldest_retained: None,
        dead_letters: 0,
        held_aggregates: 0,
        parked_held_events: 0,
        oldest_dead_letter: None,
        slot: None,
        unfinished_replays: vec![],
    };

    if t.poll {
        let oldest = match created {
            Some(c) => format!("extract(epoch FROM now() - min(o.{c}))::float8"),
            None => "NULL::float8".into(),
        };
        // Each count on its own, so each uses its partial index.
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), {oldest} FROM {table} o WHERE o.relay_published_at IS NULL"
                ),
                &[],
            )
            .await
            .map_err(pg("pending events"))?;
        status.pending = Some(row.get(0));
        status.oldest_pending_age_secs = row.get(1);
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} o WHERE o.relay_published_at IS NULL \
                     AND EXISTS (SELECT 1 FROM {dl} d WHERE d.holds_aggregate \
                         AND d.aggregate_type = o.{at}::text AND d.aggregate_id = o.{ai}::text)",
                    at = t.aggregate_type(),
                    ai = t.aggregate_id(),
                ),
                &[],
            )
            .await
            .map_err(pg("held events"))?;
        status.pending_held = Some(row.get(0));
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} WHERE relay_published_at >= now() - interval '1 minute'"
                ),
                &[],
            )
            .await
            .map_err(pg("recently published events"))?;
        status.published_last_minute = Some(row.get(0));
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), {} FROM {table} WHERE relay_published_at IS NOT NULL",
                    ms("min(relay_published_at)")
                ),
                &[],
            )
            .await
            .map_err(pg("published events"))?;
        status.retained = row.get(0);
        status.oldest_retained = row.get::<_, Option<i64>>(1).map(format_ms);
    } else {
        let oldest = match created {
            Some(c) => ms(&format!("min({c})")),
            None => "NULL::bigint".into(),
        };
        let row = client
            .query_one(&format!("SELECT count(*), {oldest} FROM {table}"), &[])
            .await
            .map_err(pg("the outbox table"))?;
        status.retained = row.get(0);
        status.oldest_retained = row.get::<_, Option<i64>>(1).map(format_ms);
        let name =
            crate::pg::slot::resolve_slot_name(client, config.wal.slot.as_deref(), t.table())
                .await?;
        let row = client
            .query_opt(
                "SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, \
                        (pg_current_wal_lsn() - restart_lsn)::bigint, \
                        (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, wal_status, \
                        (to_jsonb(s)->>'failover')::bool \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                &[&name],
            )
            .await
            .map_err(pg("pg_replication_slots"))?;
        status.slot = Some(match row {
            Some(r) => Slot {
                name,
                exists: true,
                active: r.get(0),
                active_pid: r.get(1),
                confirmed_flush_lsn: r.get(2),
                restart_lsn: r.get(3),
                retained_wal_bytes: r.get(4),
                lag_bytes: r.get(5),
                wal_status: r.get(6),
                failover: r.get(7),
                stall: None,
                stall_since: None,
                standbys: None,
            },
            None => Slot {
                name,
                exists: false,
                active: false,
                active_pid: None,
                confirmed_flush_lsn: None,
                restart_lsn: None,
                retained_wal_bytes: None,
                lag_bytes: None,
                wal_status: None,
                failover: None,
                stall: None,
                stall_since: None,
                standbys: None,
            },
        });
        if let Some(slot) = status.slot.as_mut()
            && slot.failover == Some(true)
        {
            slot.standbys = standbys(&config.database_url, &slot.name).await;
        }
        // The stall columns came with a later migration: read them only if the row has them.
        let progress = t.table().sibling("_relay_progress");
        let row = client
            .query_opt(
                &format!(
                    "SELECT to_jsonb(p)->>'stall', to_jsonb(p)->>'stall_since' FROM {progress} p \
                     WHERE to_regclass($2) IS NOT NULL AND p.slot_name = $1"
                ),
                &[
                    &status.slot.as_ref().map(|s| s.name.clone()),
                    &progress.to_string(),
                ],
            )
            .await;
        if let (Ok(Some(r)), Some(slot)) = (row, status.slot.as_mut()) {
            slot.stall = r.get(0);
            slot.stall_since = r.get(1);
        }
    }

    let row = client
        .query_one(
            &format!(
                "SELECT count(*), \
                        count(DISTINCT (aggregate_type, aggregate_id)) FILTER (WHERE holds_aggregate), \
                        count(*) FILTER (WHERE attempts = 0 AND error LIKE 'held%'), {} \
                 FROM {dl}",
                ms("min(dead_at)")
            ),
            &[],
        )
        .await
        .map_err(pg("the dead-letter table"))?;
    status.dead_letters = row.get(0);
    status.held_aggregates = row.get(1);
    status.parked_held_events = row.get(2);
    status.oldest_dead_letter = row.get::<_, Option<i64>>(3).map(format_ms);

    if t.require_replay_tables().await.is_ok() {
        let rows = client
            .query(
                &format!(
                    "SELECT replay_id, sent, skipped, total, {} FROM {} \
                     WHERE finished_at IS NULL ORDER BY started_at",
                    ms("started_at"),
                    t.replays
                ),
                &[],
            )
            .await
            .map_err(pg("the replay table"))?;
        status.unfinished_replays = rows
            .iter()
            .map(|r| Replay {
                replay_id: r.get(0),
                sent: r.get(1),
                skipped: r.get(2),
                total: r.get(3),
                started_at: format_ms(r.get(4)),
            })
            .collect();
    }
    Ok(status)
}

fn render(s: &Status) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut add = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    add(
        "outbox",
        format!("{} ({} → {})", s.outbox, s.source, s.sink),
    );
    add(
        "active instance",
        match &s.active_instance {
            Some(i) => {
                format!(
                    "pid {} ({}{}{})",
                    i.pid,
                    if i.application_name.is_empty() {
                        "?"
                    } else {
                        &i.application_name
                    },
                    i.client_addr
                        .as_deref()
                        .map(|a| format!(" from {a}"))
                        .unwrap_or_default(),
                    i.since
                        .as_deref()
                        .map(|t| format!(", since {t}"))
                        .unwrap_or_default()
                ) + &i
                    .broker_node
                    .as_deref()
                    .map(|n| format!(", RabbitMQ node {n}"))
                    .unwrap_or_default()
            }
            None => "none: no relay holds the leader lock".into(),
        },
    );
    match s.pending {
        Some(pending) => {
            let held = s.pending_held.unwrap_or(0);
            add(
                "pending",
                format!(
                    "{pending} event{}{}",
                    if pending == 1 { "" } else { "s" },
                    if held > 0 {
                        format!(" ({held} held behind dead letters)")
                    } else {
                        String::new()
                    }
                ),
            );
            add(
                "oldest pending",
                match s.oldest_pending_age_secs {
                    Some(age) => format_age(age),
                    None if pending == 0 => "-".into(),
                    None => "unknown (the table has no created_at)".into(),
                },
            );
            add(
                "published (last 1m)",
                s.published_last_minute.unwrap_or(0).to_string(),
            );
            add(
                "retained",
                match &s.oldest_retained {
                    Some(t) => format!("{} published events, oldest published {t}", s.retained),
                    None => format!("{} published events", s.retained),
                },
            );
        }
        None => {
            add(
                "pending",
                "not counted in wal mode: events not yet confirmed through the slot, see lag"
                    .into(),
            );
            add(
                "retained",
                match &s.oldest_retained {
                    Some(t) => format!("{} rows, oldest created {t}", s.retained),
                    None => format!("{} rows", s.retained),
                },
            );
        }
    }
    if let Some(slot) = &s.slot {
        if slot.exists {
            add(
                "slot",
                format!(
                    "{} ({}{}{})",
                    slot.name,
                    match slot.active_pid {
                        Some(pid) => format!("active, pid {pid}"),
                        None => "inactive".into(),
                    },
                    slot.wal_status
                        .as_deref()
                        .map(|w| format!(", wal_status {w}"))
                        .unwrap_or_default(),
                    match slot.failover {
                        Some(true) => ", failover slot",
                        Some(false) => ", not a failover slot",
                        None => "",
                    }
                ),
            );
            add(
                "confirmed LSN",
                slot.confirmed_flush_lsn.clone().unwrap_or("-".into()),
            );
            add(
                "retained WAL",
                slot.retained_wal_bytes
                    .map(format_bytes)
                    .unwrap_or("-".into()),
            );
            add(
                "lag",
                slot.lag_bytes
                    .map(|b| format!("{} not yet confirmed", format_bytes(b)))
                    .unwrap_or("-".into()),
            );
            if let Some(standbys) = &slot.standbys {
                add("standbys", standbys.clone());
            }
            if let Some(stall) = &slot.stall {
                add(
                    "STALLED",
                    format!(
                        "since {}: {stall}",
                        slot.stall_since.as_deref().unwrap_or("?")
                    ),
                );
            }
        } else {
            add(
                "slot",
                format!(
                    "{} does not exist; run `outbox-relay migrate` or start the relay",
                    slot.name
                ),
            );
        }
    }
    add(
        "dead letters",
        if s.dead_letters == 0 {
            "0".into()
        } else {
            let mut v = format!(
                "{} ({} aggregate{} held",
                s.dead_letters,
                s.held_aggregates,
                if s.held_aggregates == 1 { "" } else { "s" }
            );
            if s.parked_held_events > 0 {
                v.push_str(&format!(
                    "; {} of them later event{} parked behind the first",
                    s.parked_held_events,
                    if s.parked_held_events == 1 { "" } else { "s" }
                ));
            }
            if let Some(t) = &s.oldest_dead_letter {
                v.push_str(&format!("; oldest {t}"));
            }
            v.push(')');
            v
        },
    );
    for r in &s.unfinished_replays {
        add(
            "unfinished replay",
            format!(
                "{}: {}/{} sent, started {}; continue with `outbox-relay replay --resume {}`",
                r.replay_id,
                r.sent + r.skipped,
                r.total,
                r.started_at,
                r.replay_id
            ),
        );
    }
    let table = render_table(&["", ""], &rows);
    // The header row of a key/value table is empty: drop it.
    table.lines().skip(1).map(|l| format!("{l}\n")).collect()
}

/// The failover slot's copies on the other hosts of `DATABASE_URL`; `None` with one host.
async fn standbys(url: &crate::config::secret::Secret, slot: &str) -> Option<String> {
    let copies = crate::pg::slot::standby_copies(url, slot).await;
    (!copies.is_empty()).then(|| crate::pg::slot::describe_copies(&copies))
}
