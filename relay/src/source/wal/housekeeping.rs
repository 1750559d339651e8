//! What the active log-tailing instance does besides streaming: saving its confirmed
//! position in the progress row (at most every `wal.status_interval` while outbox events move
//! it, every [`IDLE_PROGRESS_EVERY`] while only keepalives do; a restart of Postgres can move
//! the slot back, the row cannot), reloading the aggregates held by dead letters,
//! forgetting publish attempts left by an instance that died, and deleting outbox rows past
//! retention — but never those a repair of a lost slot might still need.

use std::time::{Duration, Instant};

use pgwire_replication::Lsn;
use tracing::{debug, info};

use super::{WalSource, now_ms};
use crate::error::Error;
use crate::outbox::RetentionCleanup;

/// When each chore last ran, and the position the progress row holds.
#[derive(Debug)]
pub(super) struct Chores {
    /// The confirmed position last written to the progress row.
    pub(super) saved: Lsn,
    progress_saved_at: Instant,
    /// An event settled since the position was last saved with nothing of the outbox
    /// pending: events may move the position (their commit may still be on its way), so it is
    /// saved every `wal.status_interval`; otherwise only keepalives move it.
    pub(super) events_moved: bool,
    /// The held aggregates are reloaded every few seconds (another instance, or an operator
    /// command, may have added or released one).
    pub(super) held_loaded: Instant,
    /// Publish attempts of settled events are forgotten every `outbox.cleanup_interval`.
    attempts_cleared: Instant,
    cleanup: RetentionCleanup,
    /// The failover slot's copies on the standbys are asked about every
    /// [`STANDBYS_EVERY`], by a task of their own (a standby that does not answer must not
    /// hold up the stream).
    standbys_asked: Option<Instant>,
    standbys_task: Option<tokio::task::JoinHandle<()>>,
}

/// How often the progress row is saved while only keepalives move the position (an idle
/// outbox). Saving writes WAL, and the next keepalive reports it as a new position: at
/// `wal.status_interval` an idle relay would write its row 20 times a second, for ever.
const IDLE_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How often the standbys of a multi-host `DATABASE_URL` are asked for their copy of a
/// failover slot (`/readyz`'s `failover_slot`).
const STANDBYS_EVERY: Duration = Duration::from_secs(30);

impl Chores {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Self {
            saved: Lsn(0),
            progress_saved_at: now,
            events_moved: false,
            held_loaded: now,
            attempts_cleared: now,
            cleanup: RetentionCleanup::new(),
            standbys_asked: None,
            standbys_task: None,
        }
    }
}

impl WalSource {
    /// For a failover slot and a `DATABASE_URL` naming standbys: asks them, off the stream,
    /// whether they hold a synced copy, for `/readyz`; says so in the log when that changes.
    async fn ask_standbys(&mut self) -> Result<(), Error> {
        let url = self.config.database_url.clone();
        let several = crate::pg::tls::PgTarget::parse(&url).is_ok_and(|t| t.hosts().len() > 1);
        if !several {
            return Ok(());
        }
        let failover: Option<bool> = self
            .conn
            .client
            .query_opt(
                "SELECT (to_jsonb(s)->>'failover')::bool FROM pg_replication_slots s \
                 WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(|e| Error::pg("cannot read pg_replication_slots", e))?
            .and_then(|r| r.get(0));
        if failover != Some(true) {
            crate::metrics::set_slot_standbys(None);
            return Ok(());
        }
        let slot = self.slot.clone();
        self.chores.standbys_task = Some(tokio::spawn(async move {
            use crate::pg::slot::StandbyCopy;
            let copies = crate::pg::slot::standby_copies(&url, &slot).await;
            let synced = copies
                .iter()
                .any(|(_, c)| matches!(c, StandbyCopy::Synced { .. }));
            let text = crate::pg::slot::describe_copies(&copies);
            let before = crate::metrics::slot_standbys();
            let was_synced = before.as_ref().map(|(s, _)| *s);
            if was_synced != Some(synced) {
                if synced {
                    info!(slot, standbys = %text, "the failover slot has a synced copy on a standby");
                } else {
                    tracing::warn!(
                        slot,
                        standbys = %text,
                        "the failover slot has no synced copy on any standby of DATABASE_URL: a failover now would recreate it and publish the gap from the table"
                    );
                }
            }
            crate::metrics::set_slot_standbys(Some((synced, text)));
        }));
        Ok(())
    }

    /// Records the confirmed position in our progress row, if it moved since the last save.
    pub(super) async fn save_progress(&mut self) -> Result<(), Error> {
        let confirmed = self.frontier.confirmed();
        if confirmed > self.chores.saved {
            self.outbox
                .save_progress(
                    &self.conn.client,
                    &self.slot,
                    confirmed,
                    self.frontier.confirmed_commit_ms(),
                )
                .await?;
            self.chores.saved = confirmed;
            self.chores.progress_saved_at = Instant::now();
        }
        // Only once nothing read is pending: a transaction whose events all settled still
        // moves the position when its commit is read.
        if self.frontier.is_idle() {
            self.chores.events_moved = false;
        }
        Ok(())
    }

    /// The chores of the active instance, between reads and while idle: save the position,
    /// reload the held aggregates, forget attempts nobody made for a day, delete rows past
    /// retention.
    pub(super) async fn housekeeping(&mut self) -> Result<(), Error> {
        let every = if self.chores.events_moved {
            self.config.wal.status_interval
        } else {
            IDLE_PROGRESS_EVERY.max(self.config.wal.status_interval)
        };
        if self.chores.progress_saved_at.elapsed() >= every {
            self.save_progress().await?;
        }
        if self.chores.held_loaded.elapsed() > Duration::from_secs(5) {
            self.held = self.outbox.held_aggregates(&self.conn.client).await?;
            self.chores.held_loaded = Instant::now();
        }
        // Only while reading for real: nothing parked behind a block, no repair running.
        let reading = self.handed.len() == self.out.len() && self.backfill.is_none();
        if reading && self.stall.due(self.config.wal.stall_timeout) {
            let changed = self
                .stall
                .check(&self.conn.client, &self.slot, self.config.wal.stall_timeout)
                .await?;
            if let Some(stall) = changed
                && let Err(e) = (self.outbox)
                    .set_stall(
                        &self.conn.client,
                        &self.slot,
                        stall.as_deref(),
                        (
                            self.frontier.confirmed(),
                            self.frontier.confirmed_commit_ms(),
                        ),
                    )
                    .await
            {
                // An outbox migrated before the stall columns: the log and /readyz still say it.
                debug!(error = %e, "cannot record the stall in the progress row; run `outbox-relay migrate`");
            }
        }
        if self
            .chores
            .standbys_asked
            .is_none_or(|t| t.elapsed() >= STANDBYS_EVERY)
            && self
                .chores
                .standbys_task
                .as_ref()
                .is_none_or(|t| t.is_finished())
        {
            self.chores.standbys_asked = Some(Instant::now());
            self.ask_standbys().await?;
        }
        if self.chores.attempts_cleared.elapsed() >= self.config.outbox.cleanup_interval {
            self.chores.attempts_cleared = Instant::now();
            if self.attempts_table {
                self.outbox
                    .clear_stale_wal_attempts(&self.conn.client)
                    .await?;
            }
        }
        let retention = self.config.outbox.retention;
        if !retention.is_zero() && self.chores.cleanup.due() {
            // Rows a repair of a lost slot might still need (created after the last confirmed
            // commit minus the margin) are kept, whatever the retention.
            let needed_for_repair = Duration::from_millis(
                (now_ms() - self.frontier.confirmed_commit_ms()).max(0) as u64,
            ) + self.config.wal.repair_margin;
            self.chores
                .cleanup
                .run(
                    &self.outbox,
                    &self.conn.client,
                    retention.max(needed_for_repair),
                    self.config.outbox.cleanup_interval,
                )
                .await;
        }
        Ok(())
    }
}
