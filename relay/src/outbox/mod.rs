//! The relay's SQL: migrations, the shape of the configured outbox table, and the statements
//! that read, confirm and dead-letter events.
//!
//! Every identifier comes from configuration, is validated by [`crate::ident`] and emitted
//! quoted. The statements are built once, after the table has been inspected, so optional
//! columns (`headers`, `traceparent`, `tracestate`, `created_at`) may simply be absent.

use std::time::Duration;

use tokio_postgres::{Client, Statement};

use crate::config::{Config, OutboxConfig};
use crate::error::Error;
use crate::event::{AggregateKey, OutboxEvent};
use crate::ident::{QualifiedName, quote};

mod migrate;
mod progress;
mod retention;
mod shape;

pub use migrate::migrate;
use progress::ProgressSql;
pub use progress::{PgTimestamp, Progress};
pub use retention::RetentionCleanup;
pub use shape::{Column, TableShape};

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

/// First key of the two-key advisory locks the relay takes (ASCII "obxr").
pub(crate) const LOCK_CLASS: i32 = 0x6f62_7872;

/// The replay progress tables of migration `0005_replays`, next to the outbox table.
pub fn replay_tables(table: &QualifiedName) -> (QualifiedName, QualifiedName) {
    (table.sibling("_replays"), table.sibling("_replay_items"))
}

/// The configured outbox table, inspected, with its statements.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub table: QualifiedName,
    pub dead_letters: QualifiedName,
    /// The table's columns, inspected once.
    pub shape: TableShape,
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
    /// Wal mode: the same, forgetting the event's publish attempts in the same statement.
    wal_dead_letter_sql: String,
    backfill_sql: Option<String>,
    held_sql: String,
    progress: ProgressSql,
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

pub(crate) fn names(cfg: &OutboxConfig) -> Result<(QualifiedName, QualifiedName), Error> {
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

impl Outbox {
    /// Inspects the configured table and builds the statements. Fails with the fix when the
    /// table, a required column or the relay's bookkeeping is missing.
    pub async fn inspect(
        client: &Client,
        config: &Config,
        bookkeeping: bool,
    ) -> Result<Self, Error> {
        let cfg = &config.outbox;
        let (table, dead_letters) = names(cfg)?;
        let template_columns = config.template_columns();
        let shape = TableShape::inspect(
            client,
            &table,
            &dead_letters,
            cfg,
            &template_columns,
            bookkeeping,
        )
        .await?;
        Ok(Self::build(table, dead_letters, shape, bookkeeping))
    }

    fn build(
        table: QualifiedName,
        dead_letters: QualifiedName,
        shape: TableShape,
        bookkeeping: bool,
    ) -> Self {
        let columns = shape.event_columns("o");
        let at = &shape.aggregate_type.quoted;
        let ai = &shape.aggregate_id.quoted;
        // Wal mode's repair of a lost slot: rows created since $1, in creation order (ctid
        // breaks ties inside one transaction), after the cursor ($2, $3).
        let backfill_sql = shape.created_at.as_ref().map(|ca| {
            let ca = &ca.quoted;
            format!(
                "SELECT {columns}, o.{ca}::text, o.ctid::text \
                 FROM {table} o \
                 WHERE o.{ca} >= $1::text::timestamptz \
                   AND (o.{ca}, o.ctid) > ($2::text::timestamptz, $3::text::tid) \
                 ORDER BY o.{ca}, o.ctid LIMIT $4"
            )
        });
        let progress = table.sibling("_relay_progress");
        let attempts = table.sibling("_relay_attempts");
        // The rows out are mostly the oldest pending ones, and walking past them (each a heap
        // fetch and a probe of the array) made a read cost 2.5 times that of the same rows with
        // nothing out. So the longest run of consecutive `relay_seq` out ($4..=$5) is skipped by
        // the index itself, as two index ranges merged in order, and only the rest of `out`
        // ($2) is filtered row by row. A run with no gap holds every seq between its ends, so
        // skipping it skips exactly those rows: a late commit is never inside it. The waiting
        // aggregates' keys ($3) are usually none; then the key is not built for every row.
        let filter = format!(
            "o.relay_published_at IS NULL \
             AND NOT (o.relay_seq = ANY($2::bigint[])) \
             AND (cardinality($3::text[]) = 0 \
                  OR NOT ((length(o.{at}::text)::text || ':' || o.{at}::text || o.{ai}::text) \
                      = ANY($3::text[]))) \
             AND NOT EXISTS (SELECT 1 FROM {dl} d WHERE d.holds_aggregate \
                 AND d.aggregate_type = o.{at}::text AND d.aggregate_id = o.{ai}::text)",
            dl = dead_letters,
        );
        let fetch_sql = format!(
            "SELECT * FROM ( \
                 (SELECT o.relay_seq, {columns} FROM {table} o \
                  WHERE o.relay_seq < $4 AND {filter} ORDER BY o.relay_seq LIMIT $1) \
                 UNION ALL \
                 (SELECT o.relay_seq, {columns} FROM {table} o \
                  WHERE o.relay_seq > $5 AND {filter} ORDER BY o.relay_seq LIMIT $1) \
             ) pending ORDER BY 1 LIMIT $1"
        );
        // Rows whose replay window is over, `$1` being the retention: published that long ago
        // (poll), or created that long ago (wal: a row's insert is in the WAL whether or not the
        // row still exists, so deleting old rows never loses an event). The daemon's cleanup
        // and `outbox-relay purge` both delete by this condition.
        let past_retention = if bookkeeping {
            Some("relay_published_at < now() - $1::text::interval".to_string())
        } else {
            (shape.created_at.as_ref())
                .map(|ca| format!("{} < now() - $1::text::interval", ca.quoted))
        };
        let insert = format!(
            "INSERT INTO {dead_letters} (event_id, relay_seq, aggregate_type, aggregate_id, \
                 event_type, payload, headers, traceparent, tracestate, created_at, error, \
                 attempts, holds_aggregate, columns) \
             VALUES ($2, $1, $3, $4, $5, $6, $7, $8, $9, \
                 to_timestamp($10::bigint / 1000.0), $11, $12, $13, $14::text::jsonb) \
             ON CONFLICT (event_id) DO UPDATE SET error = EXCLUDED.error, \
                 attempts = EXCLUDED.attempts, holds_aggregate = EXCLUDED.holds_aggregate, \
                 dead_at = now()"
        );
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
                "{remove}{insert}",
                remove = if bookkeeping {
                    format!("WITH gone AS (DELETE FROM {table} WHERE relay_seq = $1) ")
                } else {
                    String::new()
                },
            ),
            wal_dead_letter_sql: format!(
                "WITH cleared AS (DELETE FROM {attempts} WHERE event_id = $2) {insert}"
            ),
            pending_sql: bookkeeping.then(|| {
                format!(
                    "SELECT count(*), EXTRACT(EPOCH FROM now() - min({created}))::float8 \
                     FROM {table} WHERE relay_published_at IS NULL",
                    created = match &shape.created_at {
                        Some(ca) => ca.quoted.clone(),
                        None => "NULL::timestamptz".into(),
                    }
                )
            }),
            dead_letter_stats_sql: format!(
                "SELECT count(*), count(DISTINCT (aggregate_type, aggregate_id)) FILTER (WHERE holds_aggregate) \
                 FROM {dead_letters}"
            ),
            backfill_sql,
            progress: ProgressSql::new(&progress),
            held_sql: format!(
                "SELECT DISTINCT aggregate_type, aggregate_id FROM {dead_letters} WHERE holds_aggregate"
            ),
            fetch_sql,
            table,
            dead_letters,
            shape,
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

    /// The pending read's SQL, for tests of its plan.
    #[cfg(test)]
    pub(crate) fn fetch_sql(&self) -> &str {
        &self.fetch_sql
    }

    /// Unpublished events in outbox order, leaving out the rows `out` (in flight) and the
    /// aggregates in `blocked` (waiting out a failure) and those held by a dead letter.
    pub async fn fetch_pending(
        &self,
        client: &Client,
        statements: &PollStatements,
        limit: usize,
        out: &OutSeqs,
        blocked: impl Iterator<Item = &AggregateKey>,
    ) -> Result<Vec<OutboxEvent>, Error> {
        // One text key per aggregate, `<chars in type>:<type><id>` (unambiguous), so that the
        // planner hashes the list: an anti-join over thousands of (type, id) pairs was a nested
        // loop per row and made a spread backlog drain at a tenth of its rate.
        let keys: Vec<String> = blocked
            .map(|(t, i)| format!("{}:{t}{i}", t.chars().count()))
            .collect();
        let rows = client
            .query(
                &statements.fetch,
                &[&(limit as i64), &out.rest, &keys, &out.run.0, &out.run.1],
            )
            .await
            .map_err(|e| Error::pg("cannot read pending outbox events", e))?;
        Ok(rows
            .iter()
            .map(|r| self.shape.decode(r, 1, r.get(0)))
            .collect())
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
        clear_wal_attempts: bool,
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
        let columns_json: Option<String> = (!event.columns.is_empty()).then(|| {
            let map: serde_json::Map<String, serde_json::Value> = (event.columns.iter())
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.clone().map_or(serde_json::Value::Null, Into::into),
                    )
                })
                .collect();
            serde_json::Value::Object(map).to_string()
        });
        client
            .execute(
                if clear_wal_attempts {
                    &self.wal_dead_letter_sql
                } else {
                    &self.dead_letter_sql
                },
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
                    &columns_json,
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

    /// Whether rows can be read back by creation time (the table has `created_at`).
    pub fn can_backfill(&self) -> bool {
        self.backfill_sql.is_some()
    }

    /// Up to `limit` rows created since `from`, after the cursor `(created_at, ctid)`; each
    /// with its cursor.
    pub async fn backfill(
        &self,
        client: &Client,
        from: &PgTimestamp,
        after: &(PgTimestamp, String),
        limit: usize,
    ) -> Result<Vec<(OutboxEvent, (PgTimestamp, String))>, Error> {
        let Some(sql) = &self.backfill_sql else {
            return Ok(vec![]);
        };
        let rows = client
            .query(
                sql,
                &[&from.as_sql(), &after.0.as_sql(), &after.1, &(limit as i64)],
            )
            .await
            .map_err(|e| Error::pg("cannot read outbox rows to repair a lost slot", e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let width = self.shape.width();
                let cursor = (PgTimestamp::from_row(r, width), r.get(width + 1));
                (self.shape.decode(r, 0, 0), cursor)
            })
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

/// The rows out of the polling source (`relay_seq`), as its pending read leaves them out: the
/// longest run of consecutive values, which the read skips in the index, and the rest, which it
/// filters row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutSeqs {
    /// First and last seq of the run. With nothing out it is `(1, 0)`: the read's two ranges,
    /// below 1 and above 0, then cover every row once.
    pub run: (i64, i64),
    /// The seqs out that are not in the run, in order.
    pub rest: Vec<i64>,
}

impl OutSeqs {
    pub fn split(out: impl IntoIterator<Item = i64>) -> Self {
        let mut seqs: Vec<i64> = out.into_iter().collect();
        if seqs.is_empty() {
            return Self {
                run: (1, 0),
                rest: Vec::new(),
            };
        }
        seqs.sort_unstable();
        seqs.dedup();
        // The longest run, as a range of indexes into `seqs`.
        let (mut best, mut start) = (0..1, 0);
        for i in 1..=seqs.len() {
            if i == seqs.len() || seqs[i - 1].checked_add(1) != Some(seqs[i]) {
                if i - start > best.len() {
                    best = start..i;
                }
                start = i;
            }
        }
        let run = (seqs[best.start], seqs[best.end - 1]);
        seqs.drain(best);
        Self { run, rest: seqs }
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

#[cfg(test)]
mod tests {
    use super::OutSeqs;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_longest_run_is_split_off() {
        let out = OutSeqs::split([7, 3, 4, 5, 10, 11, 1]);
        assert_eq!(out.run, (3, 5));
        assert_eq!(out.rest, vec![1, 7, 10, 11]);
        // Nothing out: the two ranges of the read (< 1 and > 0) cover every row once.
        assert_eq!(OutSeqs::split([]).run, (1, 0));
        assert_eq!(OutSeqs::split([i64::MAX, 1]).run, (1, 1));
    }

    proptest! {
        /// The run and the rest together are exactly the rows out, and the run has no gap: a
        /// row skipped by the run's index range is a row out, never a late commit.
        #[test]
        fn run_and_rest_are_exactly_the_rows_out(
            out in prop::collection::btree_set(-5i64..200, 0..120),
        ) {
            let split = OutSeqs::split(out.iter().copied());
            let (lo, hi) = split.run;
            let mut seen: BTreeSet<i64> = split.rest.iter().copied().collect();
            prop_assert_eq!(seen.len(), split.rest.len());
            if out.is_empty() {
                prop_assert!(lo > hi);
            } else {
                for seq in lo..=hi {
                    prop_assert!(out.contains(&seq));
                    prop_assert!(seen.insert(seq));
                }
                // No longer run is left in the rest.
                let longest = out
                    .iter()
                    .fold((0i64, 0i64, i64::MIN), |(best, len, prev), &s| {
                        let len = if s == prev + 1 { len + 1 } else { 1 };
                        (best.max(len), len, s)
                    })
                    .0;
                prop_assert_eq!(hi - lo + 1, longest);
            }
            prop_assert_eq!(seen, out);
        }
    }
}
