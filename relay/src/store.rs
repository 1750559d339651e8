//! The relay's SQL: migrations, the shape of the configured outbox table, and the statements
//! that read, confirm and dead-letter events.
//!
//! Every identifier comes from configuration, is validated by [`crate::ident`] and emitted
//! quoted. The statements are built once, after the table has been inspected, so optional
//! columns (`headers`, `traceparent`, `tracestate`, `created_at`) may simply be absent.

use std::time::Duration;

use tokio_postgres::{Client, Row, Statement};

use crate::config::{Config, OutboxConfig, SourceKind};
use crate::engine::aggregates::Blocked;
use crate::error::Error;
use crate::event::{OutboxEvent, parse_headers};
use crate::ident::{QualifiedName, quote};
use crate::pg::slot;

/// Where log tailing got to for one slot (times as text).
#[derive(Debug, Clone)]
pub struct Progress {
    pub confirmed_lsn: String,
    /// Commit time of the newest confirmed transaction: where a repair of a lost slot starts.
    pub commit_time: String,
    /// Set while a repair is publishing the gap from the table.
    pub backfill_from: Option<String>,
    /// Written by this very cluster and not ahead of its WAL: a copy of the database in
    /// another cluster carries the row along, with an LSN that means nothing there.
    pub trusted: bool,
}

/// A missing attempts table (not migrated yet) holds nothing to delete.
fn ignore_unmigrated(
    result: Result<u64, tokio_postgres::Error>,
    context: &str,
) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(()),
        Err(e) => Err(Error::pg(context, e)),
    }
}

/// The migrations of `migrations/`, applied in order; each is idempotent.
const MIGRATIONS: [(&str, &str); 9] = [
    (
        "0001_outbox",
        include_str!("../../migrations/0001_outbox.sql"),
    ),
    (
        "0002_bookkeeping",
        include_str!("../../migrations/0002_bookkeeping.sql"),
    ),
    (
        "0003_dead_letters",
        include_str!("../../migrations/0003_dead_letters.sql"),
    ),
    (
        "0004_notify",
        include_str!("../../migrations/0004_notify.sql"),
    ),
    (
        "0005_replays",
        include_str!("../../migrations/0005_replays.sql"),
    ),
    (
        "0006_wal_progress",
        include_str!("../../migrations/0006_wal_progress.sql"),
    ),
    (
        "0007_dead_letter_payload_bytea",
        include_str!("../../migrations/0007_dead_letter_payload_bytea.sql"),
    ),
    (
        "0008_poll_autovacuum",
        include_str!("../../migrations/0008_poll_autovacuum.sql"),
    ),
    (
        "0009_wal_attempts",
        include_str!("../../migrations/0009_wal_attempts.sql"),
    ),
];

/// Migrations only the polling publisher needs; wal mode leaves an existing table untouched.
const POLL_ONLY: [&str; 3] = ["0002_bookkeeping", "0004_notify", "0008_poll_autovacuum"];

/// First key of the two-key advisory locks the relay takes (ASCII "obxr").
pub(crate) const LOCK_CLASS: i32 = 0x6f62_7872;

/// Which optional columns the table has, and how its payload is stored.
#[derive(Debug, Clone, Default)]
struct Shape {
    headers: bool,
    traceparent: bool,
    tracestate: bool,
    created_at: bool,
    payload_is_bytea: bool,
}

/// The configured outbox table, inspected, with its statements.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub table: QualifiedName,
    pub dead_letters: QualifiedName,
    /// NOTIFY channel the trigger of `migrate` signals on.
    pub channel: String,
    /// Second key (hashed) of the leader lock; `status` looks for it in `pg_locks`.
    pub(crate) lock_key: String,
    fetch_sql: String,
    confirm_sql: String,
    delete_sql: String,
    fail_sql: String,
    wal_fail_sql: String,
    wal_clear_attempts_sql: String,
    wal_stale_attempts_sql: String,
    past_retention: Option<String>,
    cleanup_sql: Option<String>,
    dead_letter_sql: String,
    backfill_sql: Option<String>,
    progress_load_sql: String,
    progress_save_sql: String,
    progress_backfill_sql: String,
    held_sql: String,
    pending_sql: Option<String>,
    dead_letter_stats_sql: String,
}

/// What the observer reports about the outbox.
#[derive(Debug, Clone, Default)]
pub struct OutboxStats {
    /// Unpublished events (poll mode only: wal mode has no such bookkeeping).
    pub pending: Option<i64>,
    pub oldest_pending_secs: Option<f64>,
    pub dead_letters: i64,
    pub held_aggregates: i64,
}

fn names(cfg: &OutboxConfig) -> Result<(QualifiedName, QualifiedName), Error> {
    let table = QualifiedName::parse(&cfg.table)
        .map_err(|e| Error::Config(format!("outbox.table: {e}")))?;
    let dead_letters = match &cfg.dead_letter_table {
        Some(dl) => QualifiedName::parse(dl)
            .map_err(|e| Error::Config(format!("outbox.dead_letter_table: {e}")))?,
        None => table.sibling("_dead_letters"),
    };
    Ok((table, dead_letters))
}

fn channel_name(table: &QualifiedName) -> String {
    let mut c =
        format!("outbox_relay_{}_{}", table.schema_or_public(), table.name).to_ascii_lowercase();
    c.truncate(63);
    c
}

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
    let (replays, replay_items) = crate::ops::sql::replay_tables(&table);
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
        let slot = config.wal.slot_name(&cfg.table);
        slot::check_wal_level(client).await?;
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
        } else if slot::ensure_slot(client, &slot).await? {
            applied.push(format!("created replication slot {slot}"));
        }
    }
    Ok(applied)
}

impl Outbox {
    /// Inspects the configured table and builds the statements. Fails with the fix when the
    /// table, a required column or the relay's bookkeeping is missing.
    pub async fn inspect(
        client: &Client,
        cfg: &OutboxConfig,
        bookkeeping: bool,
    ) -> Result<Self, Error> {
        let (table, dead_letters) = names(cfg)?;
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table.to_string()],
            )
            .await
            .map_err(|e| Error::pg(format!("cannot inspect table `{}`", table.display()), e))?;
        if rows.is_empty() {
            return Err(Error::Setup(format!(
                "the outbox table `{}` does not exist (or this role cannot see it); run `outbox-relay migrate` or set outbox.table",
                table.display()
            )));
        }
        let column_type = |name: &str| -> Option<String> {
            rows.iter()
                .find(|r| r.get::<_, String>(0) == name)
                .map(|r| r.get::<_, String>(1))
        };
        let c = &cfg.columns;
        for (setting, column) in c.all().into_iter().take(5) {
            if column_type(column).is_none() {
                return Err(Error::Setup(format!(
                    "the outbox table `{}` has no column `{column}` (outbox.columns.{setting}); set outbox.columns.{setting} to the right column name",
                    table.display()
                )));
            }
        }
        let required: &[&str] = if bookkeeping {
            &[
                "relay_seq",
                "relay_published_at",
                "relay_attempts",
                "relay_last_error",
            ]
        } else {
            &[]
        };
        for bookkeeping in required {
            if column_type(bookkeeping).is_none() {
                return Err(Error::Setup(format!(
                    "the outbox table `{}` lacks the relay's column `{bookkeeping}`; run `outbox-relay migrate` (it adds the bookkeeping columns and changes nothing else)",
                    table.display()
                )));
            }
        }
        let dl_exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&dead_letters.to_string()],
            )
            .await
            .map_err(|e| Error::pg("cannot inspect the dead-letter table", e))?
            .get(0);
        if !dl_exists {
            return Err(Error::Setup(format!(
                "the dead-letter table `{}` does not exist; run `outbox-relay migrate`",
                dead_letters.display()
            )));
        }
        let dl_payload: Option<String> = client
            .query_one(
                "SELECT (SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attname = 'payload' AND NOT attisdropped)",
                &[&dead_letters.to_string()],
            )
            .await
            .map_err(|e| Error::pg("cannot inspect the dead-letter table", e))?
            .get(0);
        if dl_payload.as_deref() != Some("bytea") {
            return Err(Error::Setup(format!(
                "the dead-letter table `{}` has a payload column of type {}, not bytea (an older schema); run `outbox-relay migrate` to convert it",
                dead_letters.display(),
                dl_payload.as_deref().unwrap_or("(none)")
            )));
        }
        let payload_type = column_type(&c.payload).unwrap_or_default();
        if !["jsonb", "json", "text", "bytea"].contains(&payload_type.as_str())
            && !payload_type.starts_with("character varying")
        {
            return Err(Error::Setup(format!(
                "column `{}` of `{}` has type {payload_type}; the payload must be jsonb, json, text, varchar or bytea",
                c.payload,
                table.display()
            )));
        }
        let shape = Shape {
            headers: column_type(&c.headers).is_some(),
            traceparent: column_type(&c.traceparent).is_some(),
            tracestate: column_type(&c.tracestate).is_some(),
            created_at: column_type(&c.created_at).is_some_and(|t| t.starts_with("timestamp")),
            payload_is_bytea: payload_type == "bytea",
        };
        Ok(Self::build(table, dead_letters, cfg, &shape, bookkeeping))
    }

    fn build(
        table: QualifiedName,
        dead_letters: QualifiedName,
        cfg: &OutboxConfig,
        shape: &Shape,
        bookkeeping: bool,
    ) -> Self {
        let c = &cfg.columns;
        let col = |present: bool, name: &str, cast: &str, null: &str| {
            if present {
                format!("o.{}{cast}", quote(name))
            } else {
                null.to_string()
            }
        };
        let payload = if shape.payload_is_bytea {
            format!("o.{}", quote(&c.payload))
        } else {
            format!("convert_to(o.{}::text, 'UTF8')", quote(&c.payload))
        };
        let created_at = if shape.created_at {
            format!(
                "(extract(epoch from o.{}) * 1000)::bigint",
                quote(&c.created_at)
            )
        } else {
            "NULL::bigint".into()
        };
        // Wal mode's repair of a lost slot: rows created since $1, in creation order (ctid
        // breaks ties inside one transaction), after the cursor ($2, $3).
        let backfill_sql = shape.created_at.then(|| {
            format!(
                "SELECT 0::bigint, o.{id}::text, o.{at}::text, o.{ai}::text, o.{et}::text, {payload}, \
                        {headers}, {tp}, {ts}, {created_at}, o.{ca}::text, o.ctid::text \
                 FROM {table} o \
                 WHERE o.{ca} >= $1::text::timestamptz \
                   AND (o.{ca}, o.ctid) > ($2::text::timestamptz, $3::text::tid) \
                 ORDER BY o.{ca}, o.ctid LIMIT $4",
                id = quote(&c.id),
                at = quote(&c.aggregate_type),
                ai = quote(&c.aggregate_id),
                et = quote(&c.event_type),
                ca = quote(&c.created_at),
                headers = col(shape.headers, &c.headers, "::text", "NULL::text"),
                tp = col(shape.traceparent, &c.traceparent, "::text", "NULL::text"),
                ts = col(shape.tracestate, &c.tracestate, "::text", "NULL::text"),
            )
        });
        let progress = table.sibling("_relay_progress");
        let attempts = table.sibling("_relay_attempts");
        let fetch_sql = format!(
            "SELECT o.relay_seq, o.{id}::text, o.{at}::text, o.{ai}::text, o.{et}::text, {payload}, \
                    {headers}, {tp}, {ts}, {created_at} \
             FROM {table} o \
             WHERE o.relay_published_at IS NULL \
               AND NOT (o.relay_seq = ANY($2::bigint[])) \
               AND NOT ((length(o.{at}::text)::text || ':' || o.{at}::text || o.{ai}::text) \
                   = ANY($3::text[])) \
               AND NOT EXISTS (SELECT 1 FROM {dl} d WHERE d.holds_aggregate \
                   AND d.aggregate_type = o.{at}::text AND d.aggregate_id = o.{ai}::text) \
             ORDER BY o.relay_seq LIMIT $1",
            id = quote(&c.id),
            at = quote(&c.aggregate_type),
            ai = quote(&c.aggregate_id),
            et = quote(&c.event_type),
            headers = col(shape.headers, &c.headers, "::text", "NULL::text"),
            tp = col(shape.traceparent, &c.traceparent, "::text", "NULL::text"),
            ts = col(shape.tracestate, &c.tracestate, "::text", "NULL::text"),
            dl = dead_letters,
        );
        // Rows whose replay window is over, `$1` being the retention: published that long ago
        // (poll), or created that long ago (wal: a row's insert is in the WAL whether or not the
        // row still exists, so deleting old rows never loses an event). The daemon's cleanup
        // and `outbox-relay purge` both delete by this condition.
        let past_retention = if bookkeeping {
            Some("relay_published_at < now() - $1::text::interval".to_string())
        } else if shape.created_at {
            Some(format!(
                "{} < now() - $1::text::interval",
                quote(&c.created_at)
            ))
        } else {
            None
        };
        Self {
            channel: channel_name(&table),
            lock_key: format!("outbox-relay:{}", table.display()),
            confirm_sql: format!(
                "UPDATE {table} SET relay_published_at = now() \
                 WHERE relay_seq = ANY($1) AND relay_published_at IS NULL"
            ),
            delete_sql: format!("DELETE FROM {table} WHERE relay_seq = ANY($1)"),
            fail_sql: format!(
                "UPDATE {table} SET relay_attempts = relay_attempts + 1, relay_last_error = $2 \
                 WHERE relay_seq = $1 RETURNING relay_attempts"
            ),
            wal_fail_sql: format!(
                "INSERT INTO {attempts} AS a (event_id, attempts, last_error) VALUES ($1, 1, $2) \
                 ON CONFLICT (event_id) DO UPDATE SET attempts = a.attempts + 1, \
                     last_error = EXCLUDED.last_error, updated_at = now() \
                 RETURNING attempts"
            ),
            wal_clear_attempts_sql: format!("DELETE FROM {attempts} WHERE event_id = ANY($1)"),
            wal_stale_attempts_sql: format!(
                "DELETE FROM {attempts} WHERE updated_at < now() - interval '1 day'"
            ),
            cleanup_sql: past_retention.as_ref().map(|past| {
                let key = if bookkeeping { "relay_seq" } else { "ctid" };
                format!(
                    "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} \
                     WHERE {past} LIMIT {CLEANUP_BATCH})"
                )
            }),
            past_retention,
            // Poll mode moves the row (delete + insert in one statement); wal mode has no
            // bookkeeping in the table and only records the event.
            dead_letter_sql: format!(
                "{remove}INSERT INTO {dead_letters} (event_id, relay_seq, aggregate_type, aggregate_id, \
                     event_type, payload, headers, traceparent, tracestate, created_at, error, \
                     attempts, holds_aggregate) \
                 VALUES ($2, $1, $3, $4, $5, $6, $7, $8, $9, \
                     to_timestamp($10::bigint / 1000.0), $11, $12, $13) \
                 ON CONFLICT (event_id) DO UPDATE SET error = EXCLUDED.error, \
                     attempts = EXCLUDED.attempts, holds_aggregate = EXCLUDED.holds_aggregate, \
                     dead_at = now()",
                remove = if bookkeeping {
                    format!("WITH gone AS (DELETE FROM {table} WHERE relay_seq = $1) ")
                } else {
                    String::new()
                },
            ),
            pending_sql: bookkeeping.then(|| {
                format!(
                    "SELECT count(*), EXTRACT(EPOCH FROM now() - min({created}))::float8 \
                     FROM {table} WHERE relay_published_at IS NULL",
                    created = if shape.created_at {
                        quote(&c.created_at)
                    } else {
                        "NULL::timestamptz".into()
                    }
                )
            }),
            dead_letter_stats_sql: format!(
                "SELECT count(*), count(DISTINCT (aggregate_type, aggregate_id)) FILTER (WHERE holds_aggregate) \
                 FROM {dead_letters}"
            ),
            backfill_sql,
            progress_load_sql: format!(
                "SELECT confirmed_lsn::text, commit_time::text, backfill_from::text, \
                        system_identifier IS NOT DISTINCT FROM \
                            (SELECT system_identifier::text FROM pg_control_system()) \
                        AND confirmed_lsn <= pg_current_wal_flush_lsn() \
                 FROM {progress} WHERE slot_name = $1"
            ),
            progress_save_sql: format!(
                "INSERT INTO {progress} (slot_name, confirmed_lsn, commit_time, system_identifier) \
                 VALUES ($1, $2::text::pg_lsn, to_timestamp($3::float8 / 1000), \
                     (SELECT system_identifier::text FROM pg_control_system())) \
                 ON CONFLICT (slot_name) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, \
                     commit_time = EXCLUDED.commit_time, \
                     system_identifier = EXCLUDED.system_identifier, updated_at = now()"
            ),
            progress_backfill_sql: format!(
                "UPDATE {progress} SET backfill_from = $2::text::timestamptz, updated_at = now() WHERE slot_name = $1"
            ),
            held_sql: format!(
                "SELECT DISTINCT aggregate_type, aggregate_id FROM {dead_letters} WHERE holds_aggregate"
            ),
            fetch_sql,
            table,
            dead_letters,
        }
    }

    /// Takes the session-level advisory lock that makes this instance the active relay of this
    /// outbox. It is released when the connection ends, so a dead relay's lock frees itself.
    pub async fn try_lead(&self, client: &Client) -> Result<bool, Error> {
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LOCK_CLASS, &self.lock_key],
            )
            .await
            .map_err(|e| Error::pg("cannot take the leader lock", e))?;
        Ok(row.get(0))
    }

    /// Whether `migrate`'s NOTIFY trigger is on the table.
    pub async fn has_notify_trigger(&self, client: &Client) -> Result<bool, Error> {
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass \
                 AND tgname = 'relay_notify' AND NOT tgisinternal)",
                &[&self.table.to_string()],
            )
            .await
            .map(|r| r.get(0))
            .map_err(|e| Error::pg("cannot inspect the outbox table's triggers", e))
    }

    pub async fn listen(&self, client: &Client) -> Result<(), Error> {
        client
            .batch_execute(&format!("LISTEN {}", quote(&self.channel)))
            .await
            .map_err(|e| Error::pg("cannot LISTEN for outbox notifications", e))
    }

    /// Prepares the polling read and confirmations on `client`, the polling connection: each
    /// batch then costs one round trip per statement, not two (parse, then execute).
    pub async fn prepare_poll(&self, client: &Client) -> Result<PollStatements, Error> {
        let prepare = async |sql: &str| {
            client
                .prepare(sql)
                .await
                .map_err(|e| Error::pg("cannot prepare the polling statements", e))
        };
        Ok(PollStatements {
            fetch: prepare(&self.fetch_sql).await?,
            confirm: prepare(&self.confirm_sql).await?,
            delete: prepare(&self.delete_sql).await?,
        })
    }

    /// Unpublished events in outbox order, leaving out the rows `out` (in flight) and the
    /// aggregates in `blocked` (waiting out a failure) and those held by a dead letter.
    pub async fn fetch_pending(
        &self,
        client: &Client,
        statements: &PollStatements,
        limit: usize,
        out: &[i64],
        blocked: &Blocked<'_>,
    ) -> Result<Vec<OutboxEvent>, Error> {
        // One text key per aggregate, `<chars in type>:<type><id>` (unambiguous), so that the
        // planner hashes the list: an anti-join over thousands of (type, id) pairs was a nested
        // loop per row and made a spread backlog drain at a tenth of its rate.
        let keys: Vec<String> = blocked
            .keys()
            .map(|(t, i)| format!("{}:{t}{i}", t.chars().count()))
            .collect();
        let rows = client
            .query(&statements.fetch, &[&(limit as i64), &out, &keys])
            .await
            .map_err(|e| Error::pg("cannot read pending outbox events", e))?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    /// Marks events published (or deletes them when `delete` is set: retention 0).
    pub async fn confirm(
        &self,
        client: &Client,
        statements: &PollStatements,
        seqs: &[i64],
        delete: bool,
    ) -> Result<(), Error> {
        if seqs.is_empty() {
            return Ok(());
        }
        let sql = if delete {
            &statements.delete
        } else {
            &statements.confirm
        };
        client
            .execute(sql, &[&seqs])
            .await
            .map_err(|e| Error::pg("cannot mark events published", e))?;
        Ok(())
    }

    /// Counts a permanent failure; returns the attempts so far.
    pub async fn record_failure(
        &self,
        client: &Client,
        seq: i64,
        error: &str,
    ) -> Result<i32, Error> {
        let row = client
            .query_opt(&self.fail_sql, &[&seq, &error])
            .await
            .map_err(|e| Error::pg("cannot record a publish failure", e))?;
        Ok(row.map(|r| r.get(0)).unwrap_or(0))
    }

    /// Wal mode: counts one more failed attempt of `event_id` (kept across restarts).
    pub async fn record_wal_failure(
        &self,
        client: &Client,
        event_id: &str,
        error: &str,
    ) -> Result<i32, tokio_postgres::Error> {
        let row = client
            .query_one(&self.wal_fail_sql, &[&event_id, &error])
            .await?;
        Ok(row.get(0))
    }

    /// Wal mode: forgets the attempts of events that were published or dead-lettered.
    pub async fn clear_wal_attempts(
        &self,
        client: &Client,
        event_ids: &[&str],
    ) -> Result<(), Error> {
        let result = client
            .execute(&self.wal_clear_attempts_sql, &[&event_ids])
            .await;
        ignore_unmigrated(result, "cannot clear recorded publish attempts")
    }

    /// Wal mode: forgets attempts nobody made for a day (left by an instance that died).
    pub async fn clear_stale_wal_attempts(&self, client: &Client) -> Result<(), Error> {
        let result = client.execute(&self.wal_stale_attempts_sql, &[]).await;
        ignore_unmigrated(result, "cannot delete stale publish attempts")
    }

    /// Moves the event to the dead-letter table, in one statement.
    pub async fn dead_letter(
        &self,
        client: &Client,
        event: &OutboxEvent,
        error: &str,
        attempts: i32,
        hold: bool,
    ) -> Result<(), Error> {
        let headers_json: Option<String> = if event.headers.is_empty() {
            None
        } else {
            let map: serde_json::Map<String, serde_json::Value> = event
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            Some(serde_json::Value::Object(map).to_string())
        };
        client
            .execute(
                &self.dead_letter_sql,
                &[
                    &event.seq,
                    &event.id,
                    &event.aggregate_type,
                    &event.aggregate_id,
                    &event.event_type,
                    &event.payload,
                    &headers_json,
                    &event.traceparent,
                    &event.tracestate,
                    &event.created_at_ms,
                    &error,
                    &attempts,
                    &hold,
                ],
            )
            .await
            .map_err(|e| Error::pg("cannot move an event to the dead-letter table", e))?;
        crate::metrics::record_dead_letter();
        tracing::warn!(
            event_id = %event.id,
            trace_id = event.trace_id(),
            aggregate_type = %event.aggregate_type,
            aggregate_id = %event.aggregate_id,
            attempts,
            hold,
            error,
            "moved event to the dead-letter table"
        );
        Ok(())
    }

    /// The condition on the outbox table (columns unqualified, `$1` the retention as an
    /// interval, see [`retention_interval`]) that matches events whose replay window is over;
    /// `None` when the table has no way to tell (wal mode without `created_at`).
    pub fn past_retention(&self) -> Option<&str> {
        self.past_retention.as_deref()
    }

    /// Deletes up to [`CLEANUP_BATCH`] published events older than `retention`; returns how
    /// many.
    pub async fn cleanup(&self, client: &Client, retention: Duration) -> Result<u64, Error> {
        let Some(sql) = &self.cleanup_sql else {
            return Ok(0);
        };
        let interval = retention_interval(retention);
        client
            .execute(sql, &[&interval])
            .await
            .map_err(|e| Error::pg("retention cleanup failed", e))
    }

    /// Pending events, oldest pending age, dead letters and held aggregates.
    pub async fn stats(&self, client: &Client) -> Result<OutboxStats, Error> {
        let mut stats = OutboxStats::default();
        if let Some(sql) = &self.pending_sql {
            let row = client
                .query_one(sql, &[])
                .await
                .map_err(|e| Error::pg("cannot count pending events", e))?;
            stats.pending = Some(row.get(0));
            stats.oldest_pending_secs = row.get(1);
        }
        let row = client
            .query_one(&self.dead_letter_stats_sql, &[])
            .await
            .map_err(|e| Error::pg("cannot count dead letters", e))?;
        stats.dead_letters = row.get(0);
        stats.held_aggregates = row.get(1);
        Ok(stats)
    }

    /// Wal mode's saved position of `slot`.
    pub async fn load_progress(
        &self,
        client: &Client,
        slot: &str,
    ) -> Result<Option<Progress>, Error> {
        let row = client
            .query_opt(&self.progress_load_sql, &[&slot])
            .await
            .map_err(|e| Error::pg("cannot read the log-tailing progress", e))?;
        Ok(row.map(|r| Progress {
            confirmed_lsn: r.get(0),
            commit_time: r.get(1),
            backfill_from: r.get(2),
            trusted: r.get::<_, Option<bool>>(3).unwrap_or(false),
        }))
    }

    pub async fn save_progress(
        &self,
        client: &Client,
        slot: &str,
        lsn: &str,
        commit_time_ms: i64,
    ) -> Result<(), Error> {
        client
            .execute(
                &self.progress_save_sql,
                &[&slot, &lsn, &(commit_time_ms as f64)],
            )
            .await
            .map_err(|e| Error::pg("cannot save the log-tailing progress", e))?;
        Ok(())
    }

    /// Records (or with `None` clears) an unfinished repair starting at `from`.
    pub async fn set_backfill(
        &self,
        client: &Client,
        slot: &str,
        from: Option<&str>,
    ) -> Result<(), Error> {
        client
            .execute(&self.progress_backfill_sql, &[&slot, &from])
            .await
            .map_err(|e| Error::pg("cannot save the log-tailing progress", e))?;
        Ok(())
    }

    /// Whether rows can be read back by creation time (the table has `created_at`).
    pub fn can_backfill(&self) -> bool {
        self.backfill_sql.is_some()
    }

    /// Up to `limit` rows created since `from`, after the cursor `(created_at, ctid)`; each
    /// with its cursor.
    pub async fn backfill(
        &self,
        client: &Client,
        from: &str,
        after: &(String, String),
        limit: usize,
    ) -> Result<Vec<(OutboxEvent, (String, String))>, Error> {
        let Some(sql) = &self.backfill_sql else {
            return Ok(vec![]);
        };
        let rows = client
            .query(sql, &[&from, &after.0, &after.1, &(limit as i64)])
            .await
            .map_err(|e| Error::pg("cannot read outbox rows to repair a lost slot", e))?;
        Ok(rows
            .iter()
            .map(|r| (event_from_row(r), (r.get(10), r.get(11))))
            .collect())
    }

    /// Aggregates held back by a dead letter, as `(aggregate_type, aggregate_id)`.
    pub async fn held_aggregates(
        &self,
        client: &Client,
    ) -> Result<hashbrown::HashSet<(String, String)>, Error> {
        let rows = client
            .query(&self.held_sql, &[])
            .await
            .map_err(|e| Error::pg("cannot read held aggregates", e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

/// The statements of the polling source, prepared on its connection ([`Outbox::prepare_poll`]).
pub struct PollStatements {
    fetch: Statement,
    confirm: Statement,
    delete: Statement,
}

/// Most rows one [`Outbox::cleanup`] deletes, so a large backlog is deleted in short
/// transactions.
pub const CLEANUP_BATCH: u64 = 10_000;

/// `retention` as the text of a Postgres interval, the `$1` of [`Outbox::past_retention`].
pub fn retention_interval(retention: Duration) -> String {
    format!("{} milliseconds", retention.as_millis())
}

/// Columns as selected by `fetch_sql`. NULLs in required columns become empty strings and are
/// caught by [`OutboxEvent::validate`], so a bad row is dead-lettered, not a crash.
fn event_from_row(row: &Row) -> OutboxEvent {
    let text = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
    let (headers, defect) = match row.get::<_, Option<String>>(6) {
        Some(h) => match parse_headers(&h) {
            Ok(h) => (h, None),
            Err(e) => (vec![], Some(e)),
        },
        None => (vec![], None),
    };
    OutboxEvent {
        seq: row.get(0),
        id: text(1),
        aggregate_type: text(2),
        aggregate_id: text(3),
        event_type: text(4),
        payload: row.get::<_, Option<Vec<u8>>>(5).unwrap_or_default(),
        headers,
        traceparent: row.get(7),
        tracestate: row.get(8),
        created_at_ms: row.get(9),
        defect,
    }
}
