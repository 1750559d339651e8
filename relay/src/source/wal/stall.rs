//! A stall that speaks: the stream is connected, the server's WAL moves, and yet the walsender
//! sends nothing, so the relay would sit "streaming" and deliver nothing without a word. The
//! known case is Postgres 17+'s `synchronized_standby_slots` naming a standby slot that is gone
//! or inactive: logical walsenders then wait for that standby before sending anything. A
//! walsender that is stopped or stuck looks the same from here.
//!
//! Every few seconds while the relay is reading and has received no data for
//! `wal.stall_timeout`, it asks the server where the WAL is and how far its walsender
//! (`pg_stat_replication.sent_lsn`, which moves as the walsender decodes, whether or not a
//! change is for us) has got. WAL ahead of `sent_lsn`, with `sent_lsn` unmoved between two
//! such looks, is a stall: reported once in the log (with its cause and fix when it
//! can be named), as the `outbox_relay_wal_stalled` gauge, in `/readyz` and, through the
//! progress row, in `outbox-relay status`; and cleared the same way when data flows again.
//! A relay that stops reading on purpose (the broker is slow, events wait behind a dead letter)
//! does not run the check, so backpressure is never called a stall.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::error::Error;

/// How often the server is asked, once the stream has been quiet for `wal.stall_timeout`.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// What the watch has seen.
#[derive(Debug)]
pub(super) struct StallWatch {
    /// Last time the stream carried data (a transaction, an insert, an emitted message).
    last_data: Instant,
    last_check: Instant,
    /// The walsender's `sent_lsn` at the previous check of this quiet spell.
    sent: Option<String>,
    /// The cause of the stall being reported (its text without the figures that change
    /// from one look to the next).
    reported: Option<String>,
}

/// The server's answer about our walsender.
struct Walsender {
    pid: Option<i32>,
    sent_lsn: Option<String>,
    /// WAL written beyond what the walsender sent.
    behind_bytes: i64,
    wait_event: Option<String>,
}

impl StallWatch {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Self {
            last_data: now,
            last_check: now,
            sent: None,
            // A stall the previous stream of this process reported is still being reported.
            reported: crate::metrics::wal_stall().map(|_| String::new()),
        }
    }

    /// The stream carried data.
    pub(super) fn data(&mut self) {
        self.last_data = Instant::now();
    }

    /// Whether it is time to ask the server (the stream quiet for `timeout`).
    pub(super) fn due(&self, timeout: Duration) -> bool {
        !timeout.is_zero()
            && self.last_check.elapsed() >= CHECK_EVERY
            && (self.last_data.elapsed() >= timeout || self.reported.is_some())
    }

    /// Asks the server and reports a stall that began, or one that ended. Returns the
    /// current stall (if any) when it began, ended or changed cause, for the progress row.
    pub(super) async fn check(
        &mut self,
        client: &Client,
        slot: &str,
        timeout: Duration,
    ) -> Result<Option<Option<String>>, Error> {
        self.last_check = Instant::now();
        let quiet = self.last_data.elapsed();
        let stall = if quiet < timeout {
            self.sent = None;
            None
        } else {
            // Two looks, CHECK_EVERY apart: the walsender sent nothing in between although
            // the WAL is ahead of it.
            let w = walsender(client, slot).await?;
            let unmoved =
                matches!((&self.sent, &w.sent_lsn), (Some(before), Some(now)) if before == now);
            self.sent = w.sent_lsn.clone();
            if unmoved && w.behind_bytes > 0 {
                Some(describe(client, &w, quiet).await)
            } else {
                None
            }
        };
        let cause = stall.as_ref().map(|(cause, _)| cause.clone());
        let text = stall.map(|(cause, what)| format!("{what}; {cause}"));
        if let Some(text) = &text {
            // The figures change at every look: /readyz and the gauge follow them.
            crate::metrics::set_wal_stall(Some(text.clone()));
        }
        if cause == self.reported {
            return Ok(None);
        }
        match &text {
            Some(text) => warn!(slot, "log tailing stalls: {text}"),
            None => {
                info!(slot, "log tailing flows again after a stall");
                crate::metrics::set_wal_stall(None);
            }
        }
        self.reported = cause;
        Ok(Some(text))
    }
}

async fn walsender(client: &Client, slot: &str) -> Result<Walsender, Error> {
    let row = client
        .query_opt(
            "SELECT r.active_pid, s.sent_lsn::text, \
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.sent_lsn), 0)::bigint, \
                    nullif(concat_ws(':', a.wait_event_type, a.wait_event), '') \
             FROM pg_replication_slots r \
             LEFT JOIN pg_stat_replication s ON s.pid = r.active_pid \
             LEFT JOIN pg_stat_activity a ON a.pid = r.active_pid \
             WHERE r.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::pg("cannot check the walsender of the replication slot", e))?;
    Ok(match row {
        Some(r) => Walsender {
            pid: r.get(0),
            sent_lsn: r.get(1),
            behind_bytes: r.get(2),
            wait_event: r.get(3),
        },
        None => Walsender {
            pid: None,
            sent_lsn: None,
            behind_bytes: 0,
            wait_event: None,
        },
    })
}

/// The stall in words: (its cause and fix, what was seen).
async fn describe(client: &Client, w: &Walsender, quiet: Duration) -> (String, String) {
    let what = format!(
        "connected, but nothing received for {}s while the server's WAL is {} bytes past what its walsender{} sent{}",
        quiet.as_secs(),
        w.behind_bytes,
        w.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        w.wait_event
            .as_deref()
            .map(|e| format!(" (waiting on {e})"))
            .unwrap_or_default()
    );
    let cause = standby_slots_cause(client).await.unwrap_or_else(|| {
        "check the walsender in pg_stat_replication and the server log for why it does not send"
            .into()
    });
    (cause, what)
}

/// Postgres 17+: logical walsenders wait for the physical slots in
/// `synchronized_standby_slots`; one that is missing or inactive holds every logical change.
async fn standby_slots_cause(client: &Client) -> Option<String> {
    let setting: Option<String> = client
        .query_one(
            "SELECT current_setting('synchronized_standby_slots', true)",
            &[],
        )
        .await
        .ok()?
        .get(0);
    let setting = setting.filter(|s| !s.trim().is_empty())?;
    let names: Vec<String> = setting
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let fix = "remove it (ALTER SYSTEM SET synchronized_standby_slots = '<the others>'; SELECT pg_reload_conf()) or bring its standby back";
    for name in names {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'",
                &[&name],
            )
            .await
            .ok()?;
        match row.map(|r| r.get::<_, bool>(0)) {
            None => {
                return Some(format!(
                    "Postgres withholds logical changes until the standby slots of synchronized_standby_slots confirm them, and `{name}` does not exist: {fix}"
                ));
            }
            Some(false) => {
                return Some(format!(
                    "Postgres withholds logical changes until the standby slots of synchronized_standby_slots confirm them, and `{name}` is not active (its standby is down): {fix}"
                ));
            }
            Some(true) => {}
        }
    }
    None
}
