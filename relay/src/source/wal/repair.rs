//! Repairing a lost slot: when the slot that log tailing streamed from is gone (dropped,
//! invalidated by `max_slot_wal_keep_size`, or missing after a restore or a failover), the
//! WAL of the gap is gone with it. The rows are usually still in the table, so the relay
//! recreates the slot first (so that nothing committed from now on is missed), then publishes
//! the rows created since the last confirmed commit minus `wal.repair_margin` (a transaction
//! that began earlier may commit later), in creation order, before it streams again.
//!
//! The table is read through one snapshot, taken once the slot exists, on a connection of its
//! own. Rows committed since the slot was created come from the stream, after the repair, in
//! commit order. Paging through the live table instead would lose per-aggregate order: a
//! transaction that began (`created_at` is its start) before rows the repair had already read,
//! and committed after, falls behind the read and comes from the stream, while a later event
//! of its aggregate, committed after it, is still ahead of the read and goes out first.
//!
//! The repair is recorded in the progress row before it starts and cleared when it ends, so a
//! crash in the middle repeats it: duplicates, never a gap. Rows deleted before the repair
//! (retention, or a service that deletes in the inserting transaction) cannot be recovered;
//! the error for a table without `created_at` says how to publish them by hand.

use pgwire_replication::Lsn;
use tracing::{info, warn};

use super::{WalSource, now_ms};
use crate::config::secret::Secret;
use crate::error::Error;
use crate::event::OutboxEvent;
use crate::outbox::PgTimestamp;
use crate::pg::PgConn;
use crate::pg::slot::{ensure_slot, slot_info};

/// Publishing the rows of a lost slot's gap from the table.
pub(super) struct Backfill {
    from: PgTimestamp,
    cursor: (PgTimestamp, String),
    published: u64,
    /// The connection whose transaction holds the repair's snapshot; opened at the first read.
    snapshot: Option<PgConn>,
}

impl Backfill {
    fn new(from: PgTimestamp) -> Self {
        Self {
            from,
            cursor: (PgTimestamp::beginning(), "(0,0)".into()),
            published: 0,
            snapshot: None,
        }
    }
}

/// A connection in a read-only repeatable-read transaction: every read through it sees the
/// table as it was at the first one. It must be the primary the slot is on (a standby's
/// snapshot may lag behind rows committed before the slot).
async fn open_snapshot(url: &Secret) -> Result<PgConn, Error> {
    let conn = PgConn::connect(url).await?;
    conn.client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| Error::pg("cannot open the repair's snapshot", e))?;
    let standby: bool = conn
        .client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| Error::pg("cannot open the repair's snapshot", e))?
        .get(0);
    if standby {
        return Err(Error::pg_transient(
            "cannot open the repair's snapshot",
            "its connection reached a standby (a failover under way?); retrying. With several hosts in DATABASE_URL, add target_session_attrs=read-write",
        ));
    }
    Ok(conn)
}

impl WalSource {
    /// Makes the slot usable; only the active instance does this. A slot that is missing or
    /// invalidated although it was streamed before (its progress is saved) is recreated, and
    /// the events of the gap — rows created since the last confirmed commit, minus
    /// `wal.repair_margin` — are published from the table before streaming resumes. The repair
    /// is recorded first, so a crash in the middle repeats it (duplicates, no gap).
    pub(super) async fn prepare_slot(&mut self) -> Result<(), Error> {
        let client = &self.conn.client;
        let slot = self.slot.clone();
        let info = slot_info(client, &slot).await?;
        let progress = self.outbox.load_progress(client, &slot).await?;
        let lost = info
            .as_ref()
            .is_some_and(|i| i.wal_status.as_deref() == Some("lost"));
        if info.is_some() && !lost {
            if let Some(from) = progress.and_then(|p| p.backfill_from) {
                info!(
                    slot,
                    %from, "resuming the unfinished repair of the slot's gap"
                );
                self.backfill = Some(Backfill::new(from));
            }
            return Ok(());
        }
        if info.is_none() && progress.is_none() {
            // First run: nothing was streamed from this slot before.
            if !self.config.wal.create_slot {
                return Err(Error::Setup(format!(
                    "replication slot `{slot}` does not exist; run `outbox-relay migrate` with RELAY_SOURCE=wal, or set wal.create_slot = true"
                )));
            }
            if ensure_slot(client, &slot, self.config.wal.failover_slot).await? {
                self.outbox.record_new_slot(client, &slot).await?;
            }
            return Ok(());
        }
        let why = if lost {
            "was invalidated (its WAL was removed, e.g. by max_slot_wal_keep_size)"
        } else {
            "is missing (dropped, or the database was restored from a backup)"
        };
        if !self.outbox.can_backfill() {
            return Err(Error::Setup(format!(
                "replication slot `{slot}` {why}, and the outbox table has no `{}` column to read the gap back from: publish the missing events with `outbox-relay replay` or the polling source, then drop the progress row (DELETE FROM {}_relay_progress WHERE slot_name = '{slot}') to start afresh",
                self.config.outbox.columns.created_at,
                self.outbox.table.display()
            )));
        }
        let margin = format!("{} milliseconds", self.config.wal.repair_margin.as_millis());
        let from = match &progress {
            Some(p) => PgTimestamp::from_row(
                &client
                    .query_one(
                        "SELECT ($1::text::timestamptz - $2::text::interval)::text",
                        &[&p.commit_time.as_sql(), &margin],
                    )
                    .await
                    .map_err(|e| Error::pg("cannot compute the repair's start", e))?,
                0,
            ),
            None => PgTimestamp::beginning(),
        };
        if progress.is_none() {
            self.outbox
                .save_progress(client, &slot, Lsn(0), now_ms())
                .await?;
        }
        self.outbox.set_backfill(client, &slot, Some(&from)).await?;
        if lost {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(|e| Error::pg(format!("cannot drop the invalidated slot `{slot}`"), e))?;
        }
        ensure_slot(client, &slot, self.config.wal.failover_slot).await?;
        warn!(
            slot,
            %from,
            "replication slot {why}: recreated it; publishing the outbox rows created since then from the table before streaming"
        );
        self.backfill = Some(Backfill::new(from));
        Ok(())
    }

    /// The next rows of the repair, or `None` once it is complete (and recorded as such).
    pub(super) async fn next_backfill(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<OutboxEvent>>, Error> {
        let Some(b) = &mut self.backfill else {
            return Ok(None);
        };
        if b.snapshot.is_none() {
            b.snapshot = Some(open_snapshot(&self.config.database_url).await?);
        }
        let snapshot = b.snapshot.as_ref().expect("opened above");
        snapshot.ensure_open()?;
        let rows = self
            .outbox
            .backfill(&snapshot.client, &b.from, &b.cursor, max)
            .await?;
        if rows.is_empty() {
            // Dropping the connection ends its transaction (and the snapshot).
            let done = self.backfill.take().expect("checked above");
            self.outbox
                .set_backfill(&self.conn.client, &self.slot, None)
                .await?;
            info!(
                slot = %self.slot,
                published = done.published,
                "repair of the slot's gap complete; streaming"
            );
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        let b = self.backfill.as_mut().expect("checked above");
        for (mut event, cursor) in rows {
            event.seq = self.next_seq;
            self.next_seq += 1;
            b.cursor = cursor;
            b.published += 1;
            events.push(event);
        }
        Ok(Some(events))
    }
}
