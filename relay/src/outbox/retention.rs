//! When the daemon deletes rows past retention, and how it keeps up.
//!
//! One round deletes at most [`CLEANUP_BATCH`] rows, so each transaction stays short. A round
//! every `cleanup_interval` alone would cap the cleanup at 10,000 rows per interval (167 rows/s
//! at the default 60 s), far below what a busy outbox takes in: the table would grow for ever.
//! So while a round deletes a full batch, the next one follows after [`BEHIND_SHARE`] times the
//! round's length (the cleanup gets at most a quarter of the connection's time, delivery at
//! least three quarters), and the interval applies again once a round finds fewer rows than a
//! batch. A round that fails is logged and tried again after the interval: deleting old rows
//! never stops delivery.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use super::{CLEANUP_BATCH, Outbox};

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
    /// the next round. A failure is logged; the next round comes after the interval.
    pub async fn run(
        &mut self,
        outbox: &Outbox,
        client: &Client,
        retention: Duration,
        interval: Duration,
    ) {
        let started = Instant::now();
        let deleted = match outbox.cleanup(client, retention).await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, retry_in = ?interval, "retention cleanup failed; delivery goes on");
                0
            }
        };
        self.next = next_round(started, Instant::now(), deleted, interval);
        metrics::counter!(crate::metrics::RETENTION_DELETED).increment(deleted);
        self.unlogged += deleted;
        let behind = deleted >= CLEANUP_BATCH;
        if self.unlogged > 0 && (!behind || self.logged_at.elapsed() >= LOG_EVERY) {
            info!(
                deleted = self.unlogged,
                ?retention,
                behind,
                "deleted outbox rows past retention"
            );
            self.unlogged = 0;
            self.logged_at = Instant::now();
        }
    }
}

/// When the round after one that ran from `started` to `now` and deleted `deleted` rows is due.
fn next_round(started: Instant, now: Instant, deleted: u64, interval: Duration) -> Instant {
    if deleted >= CLEANUP_BATCH {
        now + ((now - started) * BEHIND_SHARE).min(interval)
    } else {
        started + interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_the_next_round_follows_after_three_times_the_last_and_the_interval_applies_again_once_caught_up()
     {
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let took = Duration::from_millis(200);
        let t1 = t0 + took;
        // A full batch: 600 ms later, not a minute.
        assert_eq!(
            next_round(t0, t1, CLEANUP_BATCH, interval),
            t1 + Duration::from_millis(600)
        );
        // Never later than the interval, however long the round took.
        let slow = t0 + Duration::from_secs(30);
        assert_eq!(
            next_round(t0, slow, CLEANUP_BATCH, interval),
            slow + interval
        );
        // Fewer rows than a batch (caught up), or a failed round (0): the interval again.
        assert_eq!(
            next_round(t0, t1, CLEANUP_BATCH - 1, interval),
            t0 + interval
        );
        assert_eq!(next_round(t0, t1, 0, interval), t0 + interval);
    }
}
