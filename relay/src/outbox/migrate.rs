//! `outbox-relay migrate`: creates or upgrades the outbox schema from the SQL files of
//! `migrations/`, each idempotent, with the configured names and columns filled in. Wal mode
//! also sets up the publication and the replication slot (through [`crate::pg::slot`], the
//! same admin the wal source uses), and leaves an existing outbox table as it is.

use tokio_postgres::Client;

use super::{LOCK_CLASS, channel_name, names, replay_tables};
use crate::config::{Config, SourceKind};
use crate::error::Error;
use crate::ident::quote;
use crate::pg::slot;

/// The migrations of `migrations/`, applied in order; each is idempotent.
const MIGRATIONS: [(&str, &str); 11] = [
    (
        "0001_outbox",
        include_str!("../../../migrations/0001_outbox.sql"),
    ),
    (
        "0002_bookkeeping",
        include_str!("../../../migrations/0002_bookkeeping.sql"),
    ),
    (
        "0003_dead_letters",
        include_str!("../../../migrations/0003_dead_letters.sql"),
    ),
    (
        "0004_notify",
        include_str!("../../../migrations/0004_notify.sql"),
    ),
    (
        "0005_replays",
        include_str!("../../../migrations/0005_replays.sql"),
    ),
    (
        "0006_wal_progress",
        include_str!("../../../migrations/0006_wal_progress.sql"),
    ),
    (
        "0007_dead_letter_payload_bytea",
        include_str!("../../../migrations/0007_dead_letter_payload_bytea.sql"),
    ),
    (
        "0008_poll_autovacuum",
        include_str!("../../../migrations/0008_poll_autovacuum.sql"),
    ),
    (
        "0009_wal_attempts",
        include_str!("../../../migrations/0009_wal_attempts.sql"),
    ),
    (
        "0010_dead_letter_columns",
        include_str!("../../../migrations/0010_dead_letter_columns.sql"),
    ),
    (
        "0011_wal_stall",
        include_str!("../../../migrations/0011_wal_stall.sql"),
    ),
];

/// Migrations only the polling publisher needs; wal mode leaves an existing table untouched.
const POLL_ONLY: [&str; 3] = ["0002_bookkeeping", "0004_notify", "0008_poll_autovacuum"];

/// Creates or upgrades the outbox schema. Idempotent; serialised by an advisory lock so that
/// two instances starting together do not race.
///
/// Poll mode: the table, the relay's bookkeeping columns, the dead-letter table and the NOTIFY
/// trigger. Wal mode: the table (only if missing: an existing one is not altered), the
/// dead-letter table, the publication and the replication slot.
pub async fn migrate(client: &mut Client, config: &Config) -> Result<Vec<String>, Error> {
    let cfg = &config.outbox;
    let wal = config.source == SourceKind::Wal;
    let (table, dead_letters) = names(cfg)?;
    let c = &cfg.columns;
    let notify_function = table.sibling("_relay_notify");
    let (replays, replay_items) = replay_tables(&table);
    let replacements: Vec<(&str, String)> = vec![
        ("{{table}}", table.to_string()),
        ("{{table_name}}", table.name.clone()),
        ("{{dead_letters}}", dead_letters.to_string()),
        ("{{dead_letters_name}}", dead_letters.name.clone()),
        ("{{notify_function}}", notify_function.to_string()),
        ("{{channel}}", channel_name(&table)),
        ("{{replays}}", replays.to_string()),
        (
            "{{wal_progress}}",
            table.sibling("_relay_progress").to_string(),
        ),
        (
            "{{wal_attempts}}",
            table.sibling("_relay_attempts").to_string(),
        ),
        ("{{replay_items}}", replay_items.to_string()),
        ("{{id}}", quote(&c.id)),
        ("{{aggregate_type}}", quote(&c.aggregate_type)),
        ("{{aggregate_id}}", quote(&c.aggregate_id)),
        ("{{event_type}}", quote(&c.event_type)),
        ("{{payload}}", quote(&c.payload)),
        ("{{headers}}", quote(&c.headers)),
        ("{{traceparent}}", quote(&c.traceparent)),
        ("{{tracestate}}", quote(&c.tracestate)),
        ("{{created_at}}", quote(&c.created_at)),
    ];
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::pg("migrate: cannot start a transaction", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext('migrate'))",
        &[&LOCK_CLASS],
    )
    .await
    .map_err(|e| Error::pg("migrate: cannot take the migration lock", e))?;
    for schema in [&table.schema, &dead_letters.schema].into_iter().flatten() {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote(schema)))
            .await
            .map_err(|e| Error::pg(format!("migrate: cannot create schema `{schema}`"), e))?;
    }
    let mut applied = Vec::new();
    for (name, sql) in MIGRATIONS {
        if wal && POLL_ONLY.contains(&name) {
            continue;
        }
        if name == "0004_notify" && !config.poll.notify {
            // poll.notify = false: no trigger on the service's commits.
            tx.batch_execute(&format!("DROP TRIGGER IF EXISTS relay_notify ON {table}"))
                .await
                .map_err(|e| Error::pg("migrate: cannot drop the NOTIFY trigger", e))?;
            applied.push("dropped the NOTIFY trigger (poll.notify = false)".into());
            continue;
        }
        let mut sql = sql.to_string();
        for (from, to) in &replacements {
            sql = sql.replace(from, to);
        }
        tx.batch_execute(&sql)
            .await
            .map_err(|e| Error::pg(format!("migration {name} failed"), e))?;
        applied.push(name.to_string());
    }
    if wal {
        let publication = config.wal.publication_name(&cfg.table);
        slot::ensure_publication(&tx, &publication, &table).await?;
        applied.push(format!("publication {publication}"));
    }
    tx.commit()
        .await
        .map_err(|e| Error::pg("migrate: commit failed", e))?;
    if wal {
        slot::check_wal_level(client).await?;
        let slot = slot::resolve_slot_name(client, config.wal.slot.as_deref(), &table).await?;
        slot::check_slot_usable(client, &slot).await?;
        // A slot that was streamed before (its progress is saved) and is now missing must be
        // recreated by `run`, which first publishes the events of the gap from the table;
        // creating it here would make the relay skip them.
        let streamed_before = client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE slot_name = $1",
                    table.sibling("_relay_progress")
                ),
                &[&slot],
            )
            .await
            .map_err(|e| Error::pg("migrate: cannot read the log-tailing progress", e))?
            .is_some();
        if streamed_before && !slot::slot_exists(client, &slot).await? {
            applied.push(format!(
                "left replication slot {slot} missing: it was streamed before, so `outbox-relay run` recreates it and first publishes the events of the gap from the table"
            ));
        } else if slot::ensure_slot(client, &slot, config.wal.failover_slot).await? {
            super::progress::record_new_slot(client, &table, &slot).await?;
            applied.push(format!("created replication slot {slot}"));
        }
    }
    Ok(applied)
}
