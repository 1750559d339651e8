//! Where log tailing got to, saved in the outbox's `_relay_progress` table next to the slot.
//!
//! The slot's own position is not enough: it is lost with the slot (dropped, invalidated for
//! retaining too much WAL, or not carried over by a failover), and Postgres may move it back
//! after a crash. The saved row outlives all of those; its commit time is where a repair of a
//! lost slot starts reading the table, and the cluster's system identifier tells a copy of the
//! row in another cluster (a restored backup) from our own.

use pgwire_replication::Lsn;
use tokio_postgres::Client;

use super::Outbox;
use crate::error::Error;
use crate::ident::QualifiedName;

/// A `timestamptz` as Postgres prints it (ISO, UTC on the relay's sessions), handed back to
/// Postgres as text: exact to the microsecond, and able to say `-infinity`, which a repair
/// that starts from the first row needs. Only Postgres makes one; the relay never parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTimestamp(String);

impl PgTimestamp {
    /// Before every row.
    pub fn beginning() -> Self {
        Self("-infinity".into())
    }

    /// For a `$n::text::timestamptz` parameter.
    pub fn as_sql(&self) -> &str {
        &self.0
    }

    /// A `timestamptz::text` column of `row`.
    pub fn from_row(row: &tokio_postgres::Row, i: usize) -> Self {
        Self(row.get(i))
    }
}

impl std::fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where log tailing got to for one slot.
#[derive(Debug, Clone)]
pub struct Progress {
    pub confirmed_lsn: Lsn,
    /// Commit time of the newest confirmed transaction: where a repair of a lost slot starts.
    pub commit_time: PgTimestamp,
    /// `commit_time` in ms since the Unix epoch.
    pub commit_ms: i64,
    /// Set while a repair is publishing the gap from the table.
    pub backfill_from: Option<PgTimestamp>,
    /// Written by this very cluster and not ahead of its WAL: a copy of the database in
    /// another cluster carries the row along, with an LSN that means nothing there.
    pub trusted: bool,
}

/// The statements on the progress table.
#[derive(Debug, Clone)]
pub(super) struct ProgressSql {
    load: String,
    save: String,
    backfill: String,
    stall: String,
}

impl ProgressSql {
    pub(super) fn new(progress: &QualifiedName) -> Self {
        Self {
            load: format!(
                "SELECT (confirmed_lsn - '0/0'::pg_lsn)::bigint, commit_time::text, backfill_from::text, \
                        system_identifier IS NOT DISTINCT FROM \
                            (SELECT system_identifier::text FROM pg_control_system()) \
                        AND confirmed_lsn <= pg_current_wal_flush_lsn(), \
                        (extract(epoch FROM commit_time) * 1000)::bigint \
                 FROM {progress} WHERE slot_name = $1"
            ),
            save: format!(
                "INSERT INTO {progress} (slot_name, confirmed_lsn, commit_time, system_identifier) \
                 VALUES ($1, $2::text::pg_lsn, to_timestamp($3::float8 / 1000), \
                     (SELECT system_identifier::text FROM pg_control_system())) \
                 ON CONFLICT (slot_name) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, \
                     commit_time = EXCLUDED.commit_time, \
                     system_identifier = EXCLUDED.system_identifier, updated_at = now()"
            ),
            backfill: format!(
                "UPDATE {progress} SET backfill_from = $2::text::timestamptz, updated_at = now() WHERE slot_name = $1"
            ),
            // An upsert: a relay that never confirmed anything has no row yet; the position
            // written then is the one it streams from.
            stall: format!(
                "INSERT INTO {progress} (slot_name, confirmed_lsn, commit_time, system_identifier, stall, stall_since) \
                 VALUES ($1, $3::text::pg_lsn, to_timestamp($4::float8 / 1000), \
                     (SELECT system_identifier::text FROM pg_control_system()), $2, \
                     CASE WHEN $2::text IS NULL THEN NULL ELSE now() END) \
                 ON CONFLICT (slot_name) DO UPDATE SET stall = EXCLUDED.stall, \
                     stall_since = CASE WHEN EXCLUDED.stall IS NULL THEN NULL \
                         ELSE coalesce({progress}.stall_since, now()) END"
            ),
        }
    }
}

/// Records a slot just created: its starting point, and the server's time as the commit time a
/// repair would start from. Without the row, a slot lost before its first confirmation (a
/// failover moments after the start) would look like a first run on the new primary, and the
/// events of the gap would be skipped. The row comes before any event in the WAL, so a standby
/// that has an event streamed from this slot has the row too. Never overwrites a row.
fn created_sql(progress: &QualifiedName) -> String {
    format!(
        "INSERT INTO {progress} (slot_name, confirmed_lsn, commit_time, system_identifier) \
         SELECT slot_name::text, coalesce(confirmed_flush_lsn, pg_current_wal_lsn()), now(), \
             (SELECT system_identifier::text FROM pg_control_system()) \
         FROM pg_replication_slots WHERE slot_name = $1::text::name \
         ON CONFLICT (slot_name) DO NOTHING"
    )
}

/// Runs [`created_sql`]; `migrate` creates the slot before any `Outbox` exists.
pub(crate) async fn record_new_slot(
    client: &Client,
    outbox_table: &QualifiedName,
    slot: &str,
) -> Result<(), Error> {
    client
        .execute(
            &created_sql(&outbox_table.sibling("_relay_progress")),
            &[&slot],
        )
        .await
        .map_err(|e| Error::pg("cannot record the new replication slot's position", e))?;
    Ok(())
}

impl Outbox {
    /// Records the position of the slot `slot`, just created (see [`created_sql`]).
    pub async fn record_new_slot(&self, client: &Client, slot: &str) -> Result<(), Error> {
        record_new_slot(client, &self.table, slot).await
    }

    /// Wal mode's saved position of `slot`.
    pub async fn load_progress(
        &self,
        client: &Client,
        slot: &str,
    ) -> Result<Option<Progress>, Error> {
        let row = client
            .query_opt(&self.progress.load, &[&slot])
            .await
            .map_err(|e| Error::pg("cannot read the log-tailing progress", e))?;
        Ok(row.map(|r| Progress {
            confirmed_lsn: Lsn(r.get::<_, i64>(0) as u64),
            commit_time: PgTimestamp::from_row(&r, 1),
            backfill_from: r.get::<_, Option<String>>(2).map(PgTimestamp),
            trusted: r.get::<_, Option<bool>>(3).unwrap_or(false),
            commit_ms: r.get(4),
        }))
    }

    pub async fn save_progress(
        &self,
        client: &Client,
        slot: &str,
        lsn: Lsn,
        commit_time_ms: i64,
    ) -> Result<(), Error> {
        client
            .execute(
                &self.progress.save,
                &[&slot, &lsn.to_pg_string(), &(commit_time_ms as f64)],
            )
            .await
            .map_err(|e| Error::pg("cannot save the log-tailing progress", e))?;
        Ok(())
    }

    /// Records (or with `None` clears) what stalls the stream, for `status`.
    pub async fn set_stall(
        &self,
        client: &Client,
        slot: &str,
        stall: Option<&str>,
        (lsn, commit_time_ms): (Lsn, i64),
    ) -> Result<(), Error> {
        client
            .execute(
                &self.progress.stall,
                &[&slot, &stall, &lsn.to_pg_string(), &(commit_time_ms as f64)],
            )
            .await
            .map_err(|e| Error::pg("cannot record the stream's stall", e))?;
        Ok(())
    }

    /// Records (or with `None` clears) an unfinished repair starting at `from`.
    pub async fn set_backfill(
        &self,
        client: &Client,
        slot: &str,
        from: Option<&PgTimestamp>,
    ) -> Result<(), Error> {
        client
            .execute(
                &self.progress.backfill,
                &[&slot, &from.map(PgTimestamp::as_sql)],
            )
            .await
            .map_err(|e| Error::pg("cannot save the log-tailing progress", e))?;
        Ok(())
    }
}
