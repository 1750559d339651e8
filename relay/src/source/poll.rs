//! The polling publisher.
//!
//! Reads unpublished rows (`relay_published_at IS NULL`) in `relay_seq` order, in batches.
//!
//! **Reads that stay cheap.** A read walks the pending index from a cursor, the highest
//! `relay_seq` read so far, so it never walks past the rows in flight again. A row whose
//! aggregate cannot go now (its earlier events are in flight, or it waits out a failure) is
//! kept in memory, in order, and handed out once its aggregate may go (up to
//! [`KEEP_PER_BATCH`] batches' worth in all, one batch per aggregate). Beyond that the row is
//! let go and its aggregate marked: its later rows are let go too, until a read from the start
//! has found them again. Filtering such rows in SQL instead made every read walk past all of
//! them: with a hot aggregate in flight, reads of 1,000 rows walked 90,000.
//!
//! **Late commits.** `relay_seq` is assigned at insert, so a transaction that started earlier
//! can commit later with a smaller value, below the cursor. A read from the start, leaving out
//! the rows in flight or kept, finds such rows: whenever the previous read came back short (the
//! relay has caught up), at least every [`READ_FROM_START_EVERY`] while a backlog drains, and
//! once an aggregate that had rows let go may go again. It also finds the rows of an aggregate
//! whose dead letter an operator retried or discarded.
//!
//! Wakes on LISTEN/NOTIFY (the trigger of `migrate` notifies at commit), with
//! `poll.interval` as the fallback, so latency is milliseconds, not one interval.
//!
//! One active instance per outbox: a session-level advisory lock on the relay's connection.
//! If the relay dies or its connection drops, Postgres releases the lock and a standby takes
//! over at its next try (`delivery.standby_interval`).

use hashbrown::{HashMap, HashSet};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Blocked, Source};
use crate::config::Config;
use crate::error::Error;
use crate::event::{AggregateKey, KeyRef, OutboxEvent};
use crate::outbox::{Outbox, PollStatements};
use crate::pg::PgConn;

pub struct PollSource {
    conn: PgConn,
    outbox: Outbox,
    statements: PollStatements,
    config: Config,
    last_cleanup: Instant,
    /// `relay_seq` of the events handed out and not yet confirmed, dead-lettered or released.
    out: HashSet<i64>,
    reads: Reads,
}

/// How many batches' worth of rows may wait in memory for their aggregate.
pub const KEEP_PER_BATCH: usize = 8;
/// How often, at least, a read starts from the beginning of the pending rows.
pub const READ_FROM_START_EVERY: Duration = Duration::from_secs(1);

/// What the reads have seen: where the next one starts, and what waits for its aggregate.
#[derive(Debug)]
struct Reads {
    /// The highest `relay_seq` read: every pending row below it is out, kept, let go (its
    /// aggregate in `let_go`) or a late commit.
    cursor: i64,
    /// Rows read (or released) that wait for their aggregate, in outbox order.
    kept: BTreeMap<i64, OutboxEvent>,
    /// How many rows each aggregate has in `kept`.
    kept_per_aggregate: HashMap<AggregateKey, usize>,
    /// Aggregates with pending rows that were read and neither handed out nor kept: their
    /// later rows are not handed out either until a read from the start finds them again.
    let_go: HashSet<AggregateKey>,
    /// Aggregates whose dead letter holds them: their released events are not kept (a read
    /// leaves out held aggregates in SQL, so a row found again means the hold is over).
    held: HashSet<AggregateKey>,
    /// The previous read returned fewer rows than it asked for.
    caught_up: bool,
    last_from_start: Instant,
    /// Most rows kept in all, and per aggregate.
    keep_max: usize,
    keep_per_aggregate: usize,
}

impl Reads {
    fn new(batch_size: usize) -> Self {
        let batch_size = batch_size.max(1);
        Self {
            cursor: 0,
            kept: BTreeMap::new(),
            kept_per_aggregate: HashMap::new(),
            let_go: HashSet::new(),
            held: HashSet::new(),
            caught_up: true,
            last_from_start: Instant::now(),
            keep_max: KEEP_PER_BATCH * batch_size,
            keep_per_aggregate: batch_size,
        }
    }

    fn keep(&mut self, event: OutboxEvent, key: AggregateKey) {
        *self.kept_per_aggregate.entry(key).or_insert(0) += 1;
        self.kept.insert(event.seq, event);
    }

    fn forget(&mut self, event: &OutboxEvent) {
        let key = KeyRef::of(event);
        if let Some(n) = self.kept_per_aggregate.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.kept_per_aggregate.remove(&key);
            }
        }
    }

    /// A dead letter now holds the aggregate of `event`: its kept events go (a read finds them
    /// again once the hold is over), and its released ones are not kept.
    fn hold(&mut self, event: &OutboxEvent) {
        let key = KeyRef::of(event);
        if self.kept_per_aggregate.remove(&key).is_some() {
            self.kept
                .retain(|_, e| !(e.aggregate_type == key.0 && e.aggregate_id == key.1));
        }
        self.held.insert(key.to_key());
    }

    /// Whether the next read starts from the beginning (see the module docs).
    fn read_from_start_due(&self, blocked: &dyn Blocked) -> bool {
        self.caught_up
            || self.last_from_start.elapsed() >= READ_FROM_START_EVERY
            || self
                .let_go
                .iter()
                .any(|key| !blocked.contains_key(key.into()))
    }

    /// Kept events whose aggregate may go, in outbox order, up to `max`.
    fn take_kept(&mut self, max: usize, blocked: &dyn Blocked) -> Vec<OutboxEvent> {
        let seqs: Vec<i64> = self
            .kept
            .values()
            .filter(|e| !blocked.contains(e))
            .take(max)
            .map(|e| e.seq)
            .collect();
        let mut taken = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let event = self.kept.remove(&seq).expect("listed above");
            self.forget(&event);
            taken.push(event);
        }
        taken
    }

    /// Sorts the rows of one read: handed out (returned), kept, or let go. `from_start`: the
    /// read began at the first pending row, so an aggregate let go before is found again.
    fn sort(
        &mut self,
        rows: Vec<OutboxEvent>,
        asked: usize,
        from_start: bool,
        blocked: &dyn Blocked,
        batch: &mut Vec<OutboxEvent>,
    ) {
        self.caught_up = rows.len() < asked;
        let before = if from_start {
            self.last_from_start = Instant::now();
            std::mem::take(&mut self.let_go)
        } else {
            HashSet::new()
        };
        for event in rows {
            self.cursor = self.cursor.max(event.seq);
            let key = KeyRef::of(&event);
            if !self.held.is_empty() {
                self.held.remove(&key);
            }
            if self.let_go.contains(&key) {
                continue;
            }
            let kept = self.kept_per_aggregate.get(&key).copied().unwrap_or(0);
            if kept == 0 && !blocked.contains_key(key) {
                batch.push(event);
                continue;
            }
            let key = key.to_key();
            if self.kept.len() < self.keep_max && kept < self.keep_per_aggregate {
                self.keep(event, key);
            } else {
                self.let_go.insert(key);
            }
        }
        // A read from the start that came back short saw every pending row that is not out or
        // kept: the aggregates let go before are found. One that stopped at its limit may not
        // have reached their rows.
        if from_start && !self.caught_up {
            self.let_go.extend(before);
        }
    }
}

impl PollSource {
    async fn maybe_cleanup(&mut self) -> Result<(), Error> {
        if self.config.outbox.retention.is_zero()
            || self.last_cleanup.elapsed() < self.config.outbox.cleanup_interval
        {
            return Ok(());
        }
        self.last_cleanup = Instant::now();
        let deleted = self
            .outbox
            .cleanup(&self.conn.client, self.config.outbox.retention)
            .await?;
        if deleted > 0 {
            info!(deleted, retention = ?self.config.outbox.retention, "deleted published events past retention");
        }
        Ok(())
    }
}

impl Source for PollSource {
    async fn open(config: &Config) -> Result<Self, Error> {
        let conn = PgConn::connect(&config.database_url).await?;
        // The pending read must walk the pending index in relay_seq order and stop after
        // `batch_size` rows, whatever the statistics say: right after a large backlog is
        // committed they still describe an empty table, and the planner would pick a bitmap
        // scan of the whole backlog plus a sort for every batch. Custom plans also let Postgres
        // hash the in-flight list instead of searching it row by row. No parallel workers: on a
        // large backlog the planner splits the index walk between two workers and merges their
        // rows, which took twice as long for the same 1,000 rows (19 vs 8 ms with 4,000 events
        // in flight, Zipf backlog of 200,000) and keeps more cores from the writers.
        conn.client
            .batch_execute(
                "SET plan_cache_mode = force_custom_plan; SET enable_bitmapscan = off; SET enable_sort = off; \
                 SET max_parallel_workers_per_gather = 0",
            )
            .await
            .map_err(|e| Error::pg("cannot set up the polling connection", e))?;
        let outbox = Outbox::inspect(&conn.client, config, true).await?;
        let statements = outbox.prepare_poll(&conn.client).await?;
        let trigger = outbox.has_notify_trigger(&conn.client).await?;
        if config.poll.notify {
            outbox.listen(&conn.client).await?;
            if !trigger {
                warn!(interval = ?config.poll.interval, "the outbox has no NOTIFY trigger, so new events are found by the interval poll only; run `outbox-relay migrate` (with poll.notify = true) to install it, or set poll.notify = false");
            }
        } else if trigger {
            warn!(
                "poll.notify = false, but the NOTIFY trigger is still on the outbox and still serialises the service's commits; run `outbox-relay migrate` with poll.notify = false to drop it"
            );
        } else {
            info!(interval = ?config.poll.interval, "poll.notify = false: polling every interval");
        }
        Ok(Self {
            conn,
            outbox,
            statements,
            config: config.clone(),
            last_cleanup: Instant::now(),
            out: HashSet::new(),
            reads: Reads::new(config.delivery.batch_size),
        })
    }

    async fn lead(&mut self, shutdown: &CancellationToken) -> Result<bool, Error> {
        super::wait_for_lock(
            &self.conn,
            &self.outbox,
            self.config.delivery.standby_interval,
            shutdown,
        )
        .await
    }

    fn leadership_lost(&self) -> CancellationToken {
        self.conn.closed_token()
    }

    async fn next_batch(
        &mut self,
        max: usize,
        blocked: &dyn Blocked,
        wait_until: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxEvent>, Error> {
        loop {
            if shutdown.is_cancelled() {
                return Ok(vec![]);
            }
            self.conn.ensure_open()?;
            self.maybe_cleanup().await?;
            // Drain a pending wake-up *before* reading, so a commit that lands after this read
            // still wakes the wait below.
            while self.conn.notifications.try_recv().is_ok() {}
            let mut batch = self.reads.take_kept(max, blocked);
            let from_kept = batch.len();
            // Out before the read, which must leave them out.
            self.out.extend(batch.iter().map(|e| e.seq));
            if batch.len() < max {
                let asked = max - batch.len();
                let from_start = self.reads.read_from_start_due(blocked);
                let (after, leave_out): (i64, Vec<i64>) = if from_start {
                    let mut seqs: Vec<i64> = self.out.iter().copied().collect();
                    seqs.extend(self.reads.kept.keys().copied());
                    (0, seqs)
                } else {
                    (self.reads.cursor, Vec::new())
                };
                let rows = self
                    .outbox
                    .fetch_pending(
                        &self.conn.client,
                        &self.statements,
                        asked,
                        after,
                        &leave_out,
                    )
                    .await?;
                self.reads
                    .sort(rows, asked, from_start, blocked, &mut batch);
            }
            if !batch.is_empty() {
                debug!(
                    count = batch.len(),
                    from_kept,
                    kept = self.reads.kept.len(),
                    cursor = self.reads.cursor,
                    "read pending events"
                );
                self.out.extend(batch[from_kept..].iter().map(|e| e.seq));
                return Ok(batch);
            }
            let now = Instant::now();
            let until = match wait_until {
                Some(t) if t > now => t,
                _ => return Ok(vec![]),
            };
            if !self.reads.caught_up {
                // Everything this read found waits for its aggregate: read on.
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(vec![]),
                _ = self.conn.notifications.recv() => {}
                _ = tokio::time::sleep(self.config.poll.interval.min(until - now)) => {}
            }
        }
    }

    async fn show_broker_node(&mut self, node: Option<&str>) -> Result<(), Error> {
        super::show_broker_node(&self.conn, node).await
    }

    async fn confirm(&mut self, events: &[&OutboxEvent]) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        self.outbox
            .confirm(
                &self.conn.client,
                &self.statements,
                &seqs,
                self.config.outbox.retention.is_zero(),
            )
            .await?;
        for seq in seqs {
            self.out.remove(&seq);
        }
        Ok(())
    }

    fn release(&mut self, events: &[&OutboxEvent]) {
        // Kept whatever the room: they were in flight (bounded), and one let go while its
        // aggregate's later rows are kept would let those overtake it.
        for e in events {
            self.out.remove(&e.seq);
            if !self.reads.held.contains(&KeyRef::of(e)) {
                self.reads.keep((*e).clone(), KeyRef::of(e).to_key());
            }
        }
    }

    async fn record_failure(&mut self, event: &OutboxEvent, error: &str) -> Result<u32, Error> {
        let attempts = self
            .outbox
            .record_failure(&self.conn.client, event.seq, error)
            .await?;
        Ok(attempts.max(0) as u32)
    }

    async fn dead_letter(
        &mut self,
        event: &OutboxEvent,
        error: &str,
        attempts: u32,
        hold: bool,
    ) -> Result<(), Error> {
        self.outbox
            .dead_letter(&self.conn.client, event, error, attempts as i32, hold)
            .await?;
        self.out.remove(&event.seq);
        if hold {
            self.reads.hold(event);
        }
        Ok(())
    }
}
