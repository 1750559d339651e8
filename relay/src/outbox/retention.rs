//! When the daemon deletes rows past retention, and how it keeps up.
//!
//! One round deletes at most [`CLEANUP_BATCH`] rows, so each transaction stays short. A round
//! every `cleanup_interval` alone would cap the cleanup at 10,000 rows per interval (167 rows/s
//! at the default 60 s), far below what a busy outbox takes in: the table would grow for ever.
//! So while a round deletes a full batch, the next one runs as soon as the source has had the
//! connection for [`BEHIND_SHARE`] times as long as the round took (at most three quarters of
//! its time goes to delivery's reads and confirmations, at least a quarter to the cleanup), and
//! the interval applies again once a round finds fewer rows than a batch.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::info;

use super::{CLEANUP_BATCH, Outbox};
use crate::error::Error;

/// While behind, the pause before the next round is this many times the last round's length.
const BEHIND_SHARE: u32 = 3;

/// While behind, the deleted rows are logged at most this often, summed.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The cleanup's schedule and its running total for the log.
#[derive(Debug)]
pub struct RetentionCleanup {
    next: Instant,
    unlogged: u64,
    logged_at: Instant,
}

impl Default for RetentionCleanup {
    fn default() -> Self {
        Self::new()
    }
}

impl RetentionCleanup {
    /// The first round runs at once: a relay that starts after a long stop may find a lot to
    /// delete.
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            next: now,
            unlogged: 0,
            logged_at: now,
        }
    }

    /// Whether a round is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// Runs one round: deletes up to [`CLEANUP_BATCH`] rows past `retention` and schedules
    /// the next round. Returns how many rows it deleted.
    pub async fn run(
        &mut self,
        outbox: &Outbox,
        client: &Client,
        retention: Duration,
        interval: Duration,
    ) -> Result<u64, Error> {
        let started = Instant::now();
        // A failed round is tried again after the interval, not on every loop.
        self.next = started + interval;
        let deleted = outbox.cleanup(client, retention).await?;
        let behind = deleted >= CLEANUP_BATCH;
        if behind {
            self.next = Instant::now() + (started.elapsed() * BEHIND_SHARE).min(interval);
        }
        metrics::counter!(crate::metrics::RETENTION_DELETED).increment(deleted);
        self.unlogged += deleted;
        if self.unlogged > 0 && (!behind || self.logged_at.elapsed() >= LOG_EVERY) {
            info!(
                deleted = self.unlogged,
                ?retention,
                behind,
                "deleted published events past retention"
            );
            self.unlogged = 0;
            self.logged_at = Instant::now();
        }
        Ok(deleted)
    }
}
