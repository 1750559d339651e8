//! The polling publisher.
//!
//! Reads unpublished rows (`relay_published_at IS NULL`) in `relay_seq` order, in batches.
//! It never keeps a "last seen" watermark: `relay_seq` is assigned at insert, so a transaction
//! that started earlier can commit later with a smaller value; reading every unpublished row
//! each round is what guarantees that such a row is never skipped.
//!
//! A read leaves out only the rows that are out and the aggregates that wait out a failure.
//! Rows of aggregates whose events are merely in flight are *parked* in memory (at most
//! [`PARK_BATCHES`] batches' worth) and handed out, without another read, as soon as their
//! aggregate's flight is answered; so are rows read past a full batch, for the next one. Each
//! read asks for no more rows than the batch and the park can still take. Leaving the
//! aggregates in flight out in SQL instead made every read walk past all of their pending rows:
//! up to 90,000 rows per 1,000 read on a Zipf backlog, and the whole backlog of a single hot
//! aggregate for a read that found nothing.
//! A parked row goes out before any later row of its aggregate, and is dropped (to be read
//! again, in order) as soon as an earlier row of its aggregate is released or dead-lettered.
//! With the park full, a read leaves out every blocked aggregate again (walking past their
//! rows), so an aggregate whose answer is slow to come holds up nobody else.
//!
//! Wakes on LISTEN/NOTIFY (the trigger of `migrate` notifies at commit), with
//! `poll.interval` as the fallback, so latency is milliseconds, not one interval.
//!
//! One active instance per outbox: a session-level advisory lock on the relay's connection.
//! If the relay dies or its connection drops, Postgres releases the lock and a standby takes
//! over at its next try (`delivery.standby_interval`).

use hashbrown::{HashMap, HashSet};
use std::collections::BTreeMap;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Blocked, Source};
use crate::config::Config;
use crate::config::secret::Secret;
use crate::error::Error;
use crate::event::{KeyRef, OutboxEvent};
use crate::outbox::{OutSeqs, Outbox, PollStatements, RetentionCleanup};
use crate::pg::PgConn;

pub struct PollSource {
    conn: PgConn,
    outbox: Outbox,
    statements: PollStatements,
    /// Marks confirmed rows published on a connection of its own while `conn` reads on.
    marker: Marker,
    config: Config,
    cleanup: RetentionCleanup,
    /// `relay_seq` of the events handed out and not yet confirmed (marked published),
    /// dead-lettered or released, and of those parked.
    out: HashSet<i64>,
    /// Rows read while their aggregate had events in flight, by `relay_seq`: handed out before
    /// anything read later.
    parked: BTreeMap<i64, OutboxEvent>,
    /// A read past every blocked aggregate found nothing, and nothing has changed since (no
    /// commit notified, no answer applied): the next one would walk the same rows for nothing.
    nothing_past_blocked: bool,
    /// When a read found no row, and how many aggregates were waiting out a failure then. The
    /// engine asks again every few tens of ms while a batch's answer is slow; until something
    /// changes (a commit notified, an answer applied, an aggregate's wait over) or
    /// `poll.interval` passes, the answer is the same without a read.
    found_nothing: Option<(Instant, usize)>,
}

/// The polling connection's settings for its pending read (see [`PollSource::open`]).
pub(crate) const READ_SETTINGS: &str = "SET plan_cache_mode = force_custom_plan; \
     SET enable_bitmapscan = off; SET enable_sort = off; SET max_parallel_workers_per_gather = 0";

/// Most rows parked, in batches of `delivery.batch_size`.
pub const PARK_BATCHES: usize = 3;

/// Splits rows just read (in `relay_seq` order) into the batch and the park (with its limit;
/// every row taken joins `out`). A row goes into the batch while it has room and its aggregate
/// is not blocked; otherwise it is parked for a later batch (behind its aggregate's flight, or
/// the batch is full); with the park full it is dropped, to be read again. Nothing of an
/// aggregate goes out, or is parked, ahead of an earlier row of it: its rows are all blocked
/// or all not, and the batch and the park only fill up. (Rows that found the batch full were
/// dropped too, before: on a Zipf backlog 1.17 rows were read per event sent; parked, 1.01.)
fn sort_read(
    events: Vec<OutboxEvent>,
    batch: &mut Vec<OutboxEvent>,
    max: usize,
    (parked, out, park_limit): (&mut BTreeMap<i64, OutboxEvent>, &mut HashSet<i64>, usize),
    blocked: &dyn Blocked,
) {
    for event in events {
        if batch.len() < max && !blocked.contains(&event) {
            out.insert(event.seq);
            batch.push(event);
        } else if parked.len() < park_limit {
            out.insert(event.seq);
            parked.insert(event.seq, event);
        } else if batch.len() >= max {
            // Both full: this row and every later one are read again.
            break;
        }
    }
}

/// Takes out of the park the rows of aggregates that are not blocked, up to `max`: whole
/// aggregates, each with its parked rows in order, in the order of their oldest parked row
/// (the last one taken may be cut short; what is left of it stays parked, behind the rest).
///
/// Taking the oldest ready rows across every aggregate instead put a few rows of each hot
/// aggregate in one batch, and that batch then blocked all of them until its answer: on a Zipf
/// backlog each hot aggregate moved only its share of one batch per round trip, and the park
/// filled with their rows until reads were dropped (poll -> Kafka Zipf 26.4k/s against 32.3k/s
/// with this order, same run).
fn take_ready(
    parked: &mut BTreeMap<i64, OutboxEvent>,
    max: usize,
    blocked: &dyn Blocked,
) -> Vec<OutboxEvent> {
    if parked.is_empty() || max == 0 {
        return Vec::new();
    }
    let mut runs: Vec<Vec<i64>> = Vec::new();
    {
        let mut run_of: HashMap<KeyRef<'_>, usize> = HashMap::new();
        for (seq, e) in parked.iter() {
            if blocked.contains(e) {
                continue;
            }
            let next = runs.len();
            let run = *run_of.entry(KeyRef::of(e)).or_insert(next);
            if run == next {
                runs.push(Vec::new());
            }
            runs[run].push(*seq);
        }
    }
    // Still counted as out by the caller: they are handed out now.
    runs.into_iter()
        .flatten()
        .take(max)
        .filter_map(|seq| parked.remove(&seq))
        .collect()
}

/// Marks confirmed rows published (deletes them, with retention 0) on a second connection, in
/// a task of its own, while the polling connection reads the next batch: on one connection the
/// two took turns, and a spread poll -> Kafka drain spent about half of each batch's time
/// waiting for the UPDATE of the previous one. Rows being marked stay out (the reads leave them
/// out) until their UPDATE has committed.
///
/// Markings are applied in the order they were asked for; what was asked while one ran goes
/// in the next statement, all together. The engine does not wait for a marking unless
/// [`MARKINGS_AHEAD`] are unanswered (before, it waited for each one to end before asking for
/// the next).
struct Marker {
    requests: tokio::sync::mpsc::UnboundedSender<Vec<i64>>,
    answers: tokio::sync::mpsc::UnboundedReceiver<Marked>,
    /// Markings asked for and not yet answered.
    unanswered: usize,
}

/// The rows of one statement and how many markings they were, or why it failed (the task has
/// stopped then).
type Marked = Result<(Vec<i64>, usize), Error>;

/// Most markings asked for and not answered before the engine waits for one.
const MARKINGS_AHEAD: usize = 2;

impl Marker {
    async fn open(config: &Config, outbox: &Outbox) -> Result<Self, Error> {
        let url = config.database_url.clone();
        let outbox = outbox.clone();
        let (conn, statements) = Self::connect(&url, &outbox).await?;
        let delete = config.outbox.retention.is_zero();
        let (requests, mut queue) = tokio::sync::mpsc::unbounded_channel::<Vec<i64>>();
        let (answer, answers) = tokio::sync::mpsc::unbounded_channel();
        // Ends once the source is gone and what it asked for is marked (those rows reached the
        // broker), or at the first failure.
        tokio::spawn(async move {
            let (mut conn, mut statements) = (conn, statements);
            while let Some(mut seqs) = queue.recv().await {
                let mut markings = 1;
                while let Ok(more) = queue.try_recv() {
                    seqs.extend(more);
                    markings += 1;
                }
                let marked = async {
                    if conn.is_closed() {
                        // It sits idle while nothing is confirmed, and a server or a firewall
                        // may close it then: open it again rather than end the leader's session.
                        debug!("the marking connection was closed; reconnecting it");
                        (conn, statements) = Self::connect(&url, &outbox).await?;
                    }
                    outbox
                        .confirm(&conn.client, &statements, &seqs, delete)
                        .await
                }
                .await;
                let failed = marked.is_err();
                if let Err(unanswered) = answer.send(marked.map(|()| (seqs, markings)))
                    && let Err(e) = unanswered.0
                {
                    warn!(error = %e, "cannot mark confirmed events published; they will be sent again");
                }
                if failed {
                    return;
                }
            }
        });
        Ok(Self {
            requests,
            answers,
            unanswered: 0,
        })
    }

    async fn connect(url: &Secret, outbox: &Outbox) -> Result<(PgConn, PollStatements), Error> {
        let conn = PgConn::connect(url).await?;
        let statements = outbox.prepare_poll(&conn.client).await?;
        Ok((conn, statements))
    }

    fn take(&mut self, answer: Option<Marked>, done: &mut Vec<i64>) -> Result<(), Error> {
        match answer {
            Some(Ok((seqs, markings))) => {
                self.unanswered = self.unanswered.saturating_sub(markings);
                done.extend(seqs);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            // Only if the task panicked: it answers every marking, or fails one and says so.
            None => Err(Error::pg_transient(
                "marking events published stopped",
                "its task ended",
            )),
        }
    }

    /// Waits until every marking asked for is done; returns the rows marked.
    async fn finish(&mut self) -> Result<Vec<i64>, Error> {
        let mut done = Vec::new();
        while self.unanswered > 0 {
            let answer = self.answers.recv().await;
            self.take(answer, &mut done)?;
        }
        Ok(done)
    }

    /// The rows of the markings that are done, without waiting for the others.
    fn finished(&mut self) -> Result<Vec<i64>, Error> {
        let mut done = Vec::new();
        while let Ok(answer) = self.answers.try_recv() {
            self.take(Some(answer), &mut done)?;
        }
        Ok(done)
    }

    /// Asks for `seqs` to be marked; returns the rows of the markings done meanwhile (waiting
    /// for them only while [`MARKINGS_AHEAD`] are unanswered).
    async fn start(&mut self, seqs: Vec<i64>) -> Result<Vec<i64>, Error> {
        let mut done = self.finished()?;
        while self.unanswered >= MARKINGS_AHEAD {
            let answer = self.answers.recv().await;
            self.take(answer, &mut done)?;
        }
        if self.requests.send(seqs).is_err() {
            // The task stopped at a failure: its answer, still to be taken, says which.
            loop {
                let answer = self.answers.recv().await;
                self.take(answer, &mut done)?;
            }
        }
        self.unanswered += 1;
        Ok(done)
    }
}

impl Drop for Marker {
    /// The session ended (on an error, or at shutdown after `finish`): a marking that failed
    /// and whose answer nobody took is still said (those rows will be sent again).
    fn drop(&mut self) {
        while let Ok(answer) = self.answers.try_recv() {
            if let Err(e) = answer {
                warn!(error = %e, "cannot mark confirmed events published; they will be sent again");
            }
        }
    }
}

impl PollSource {
    /// Marked rows are no longer out.
    fn marked(&mut self, seqs: Vec<i64>) {
        for seq in seqs {
            self.out.remove(&seq);
        }
    }

    /// Reads up to `max` pending rows that are not out into `batch` and the park (see
    /// [`sort_read`]), leaving out in SQL the aggregates that wait out a failure, or with
    /// `past_blocked` every blocked one. Returns how many rows were read.
    async fn read(
        &mut self,
        max: usize,
        batch: &mut Vec<OutboxEvent>,
        park_limit: usize,
        blocked: &dyn Blocked,
        past_blocked: bool,
    ) -> Result<usize, Error> {
        // No more rows than the batch and the park can still take: the rest would be dropped
        // and read again. (A read past the blocked aggregates finds sendable rows only.)
        let room = max.saturating_sub(batch.len());
        let limit = if past_blocked {
            room
        } else {
            (room + park_limit.saturating_sub(self.parked.len())).min(max)
        };
        // Every unpublished row that is not out, from the start: a row that commits late with
        // a smaller relay_seq is found by the next read, never skipped.
        let out = OutSeqs::split(self.out.iter().copied());
        let keys = if past_blocked {
            blocked.keys()
        } else {
            blocked.waiting_keys()
        };
        let events = self
            .outbox
            .fetch_pending(&self.conn.client, &self.statements, limit, &out, keys)
            .await?;
        let read = events.len();
        let parked_before = self.parked.len();
        let sending_before = batch.len();
        sort_read(
            events,
            batch,
            max,
            (&mut self.parked, &mut self.out, park_limit),
            blocked,
        );
        debug!(
            read,
            past_blocked,
            sending = batch.len() - sending_before,
            parked = self.parked.len() - parked_before,
            "read pending events"
        );
        Ok(read)
    }

    /// Drops the parked rows of these events' aggregates: an earlier row of theirs goes back
    /// to be read again, and the parked ones must follow it, not go ahead of it.
    fn unpark_behind(&mut self, events: &[&OutboxEvent]) {
        if self.parked.is_empty() || events.is_empty() {
            return;
        }
        let keys: HashSet<KeyRef<'_>> = events.iter().map(|e| KeyRef::of(e)).collect();
        let out = &mut self.out;
        self.parked.retain(|seq, e| {
            let keep = !keys.contains(&KeyRef::of(e));
            if !keep {
                out.remove(seq);
            }
            keep
        });
    }

    /// A commit was notified or an answer applied: reads may find what they did not before.
    fn changed(&mut self) {
        self.nothing_past_blocked = false;
        self.found_nothing = None;
    }

    async fn maybe_cleanup(&mut self) -> Result<(), Error> {
        if self.config.outbox.retention.is_zero() || !self.cleanup.due() {
            return Ok(());
        }
        self.cleanup
            .run(
                &self.outbox,
                &self.conn.client,
                self.config.outbox.retention,
                self.config.outbox.cleanup_interval,
            )
            .await;
        Ok(())
    }
}

impl Source for PollSource {
    async fn open(config: &Config) -> Result<Self, Error> {
        let conn = PgConn::connect(&config.database_url).await?;
        // The pending read must walk the pending index in relay_seq order (two ranges of it,
        // merged: see `Outbox::fetch_pending`) and stop after `batch_size` rows, whatever the
        // statistics say: right after a large backlog is committed they still describe an empty
        // table, and the planner would pick a bitmap scan of the whole backlog plus a sort for
        // every batch. Custom plans also let Postgres hash the in-flight list instead of
        // searching it row by row, and drop the waiting aggregates' clause when none waits. No
        // parallel workers: on a large backlog the planner splits the index walk between two
        // workers and merges their rows, which took twice as long for the same 1,000 rows (19 vs
        // 8 ms with 4,000 events in flight, Zipf backlog of 200,000) and keeps more cores from
        // the writers.
        conn.client
            .batch_execute(READ_SETTINGS)
            .await
            .map_err(|e| Error::pg("cannot set up the polling connection", e))?;
        let outbox = Outbox::inspect(&conn.client, config, true).await?;
        let statements = outbox.prepare_poll(&conn.client).await?;
        let marker = Marker::open(config, &outbox).await?;
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
            marker,
            config: config.clone(),
            cleanup: RetentionCleanup::new(),
            out: HashSet::new(),
            parked: BTreeMap::new(),
            nothing_past_blocked: false,
            found_nothing: None,
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
        let park_limit = max.saturating_mul(PARK_BATCHES);
        loop {
            if shutdown.is_cancelled() {
                return Ok(vec![]);
            }
            self.conn.ensure_open()?;
            let marked = self.marker.finished()?;
            self.marked(marked);
            self.maybe_cleanup().await?;
            // Drain a pending wake-up *before* reading, so a commit that lands after this read
            // still wakes the wait below.
            while self.conn.notifications.try_recv().is_ok() {
                self.changed();
            }
            // Parked rows whose aggregate has nothing in flight any more go first.
            let mut batch = take_ready(&mut self.parked, max, blocked);
            // Read only when every parked row that could go is in the batch (so a row read now
            // never overtakes a parked row of its aggregate).
            if batch.len() < max {
                if self.parked.len() < park_limit {
                    let waiting = blocked.waiting_keys().count();
                    let same_as_last = wait_until.is_none()
                        && self.found_nothing.is_some_and(|(at, w)| {
                            w == waiting && at.elapsed() < self.config.poll.interval
                        });
                    if !same_as_last {
                        let read = self
                            .read(max, &mut batch, park_limit, blocked, false)
                            .await?;
                        self.found_nothing = (read == 0).then(|| (Instant::now(), waiting));
                    }
                } else if !self.nothing_past_blocked {
                    // The park is full of rows of aggregates in flight: read past them (leaving
                    // every blocked aggregate out in SQL), so the rest of the outbox is not held
                    // up behind an aggregate whose answer is slow to come.
                    let read = self
                        .read(max, &mut batch, park_limit, blocked, true)
                        .await?;
                    self.nothing_past_blocked = read == 0;
                }
            }
            if !batch.is_empty() {
                batch.sort_unstable_by_key(|e| e.seq);
                return Ok(batch);
            }
            if wait_until.is_some() && !self.parked.is_empty() {
                // Nothing is in flight (the engine waits only then), so what is parked waits out
                // a failure: let it go, to be read again once its aggregate may go on.
                let out = &mut self.out;
                for seq in self.parked.keys() {
                    out.remove(seq);
                }
                self.parked.clear();
                self.changed();
                continue;
            }
            let now = Instant::now();
            let until = match wait_until {
                Some(t) if t > now => t,
                _ => return Ok(vec![]),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(vec![]),
                _ = self.conn.notifications.recv() => self.changed(),
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
        // Marked in the background; they stay out until then.
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let marked = self.marker.start(seqs).await?;
        self.marked(marked);
        self.changed();
        Ok(())
    }

    async fn close(&mut self) {
        // What the broker confirmed is marked before the relay stops, so a restart does not
        // send it again.
        if let Err(e) = self.marker.finish().await {
            warn!(error = %e, "cannot mark the last confirmed events published; they will be sent again");
        }
    }

    fn release(&mut self, events: &[&OutboxEvent]) {
        for e in events {
            self.out.remove(&e.seq);
        }
        self.changed();
        self.unpark_behind(events);
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
        // An earlier event of its aggregate may be being marked published: that commits first,
        // or a crash in between would leave it pending behind this dead letter's hold, to be
        // sent again (out of order) only once the dead letter is retried.
        let marked = self.marker.finish().await?;
        self.marked(marked);
        self.outbox
            .dead_letter(
                &self.conn.client,
                event,
                error,
                attempts as i32,
                hold,
                false,
            )
            .await?;
        self.out.remove(&event.seq);
        self.changed();
        // Held: the rest waits in the table. Skipped: it follows, read again in order.
        self.unpark_behind(&[event]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AggregateKey;

    struct BlockedSet(HashSet<AggregateKey>);

    impl Blocked for BlockedSet {
        fn contains(&self, event: &OutboxEvent) -> bool {
            self.0.contains(&KeyRef::of(event))
        }
        fn keys(&self) -> Box<dyn Iterator<Item = &AggregateKey> + Send + '_> {
            Box::new(self.0.iter())
        }
        fn waiting_keys(&self) -> Box<dyn Iterator<Item = &AggregateKey> + Send + '_> {
            Box::new(std::iter::empty())
        }
    }

    fn park(rows: &[(i64, &str)]) -> BTreeMap<i64, OutboxEvent> {
        rows.iter()
            .map(|(seq, aggregate)| {
                let mut e = OutboxEvent::for_tests("wallet", aggregate, "E");
                e.seq = *seq;
                (*seq, e)
            })
            .collect()
    }

    fn blocked(aggregates: &[&str]) -> BlockedSet {
        BlockedSet(
            aggregates
                .iter()
                .map(|a| ("wallet".to_string(), a.to_string()))
                .collect(),
        )
    }

    /// `sort_read` of these rows into an empty batch of `max` and an empty park of `limit`.
    fn sort(
        rows: &[(i64, &str)],
        max: usize,
        limit: usize,
        in_flight: &[&str],
    ) -> (Vec<OutboxEvent>, BTreeMap<i64, OutboxEvent>, HashSet<i64>) {
        let (mut batch, mut parked, mut out) = (Vec::new(), BTreeMap::new(), HashSet::new());
        let read = park(rows).into_values().collect();
        sort_read(
            read,
            &mut batch,
            max,
            (&mut parked, &mut out, limit),
            &blocked(in_flight),
        );
        (batch, parked, out)
    }

    fn seqs(events: &[OutboxEvent]) -> Vec<i64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn rows_read_past_a_full_batch_are_parked_and_go_out_next_in_order() {
        let (batch, mut parked, out) = sort(
            &[(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "d"), (6, "c")],
            2,
            10,
            &["b"],
        );
        // b is in flight: parked. The batch takes a and c; a's and c's later rows, and d,
        // find it full: parked, not dropped (they were read again before).
        assert_eq!(seqs(&batch), vec![1, 3]);
        assert_eq!(parked.keys().copied().collect::<Vec<_>>(), vec![2, 4, 5, 6]);
        assert_eq!(out.len(), 6);
        // The next batch, with a and c in flight and b back: b and d, whole, oldest first.
        let next = take_ready(&mut parked, 10, &blocked(&["a", "c"]));
        assert_eq!(seqs(&next), vec![2, 5]);
    }

    #[test]
    fn with_the_park_full_blocked_rows_are_dropped_and_the_batch_still_fills() {
        let (batch, parked, out) = sort(
            &[(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b"), (6, "d")],
            2,
            1,
            &["a"],
        );
        // a is in flight: its first row fills the park, its second is dropped (read again);
        // b and c fill the batch; b's next row and d find both full.
        assert_eq!(seqs(&batch), vec![2, 4]);
        assert_eq!(parked.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn ready_rows_are_taken_by_whole_aggregates_in_order_of_their_oldest_row() {
        let rows = [
            (1, "a"),
            (2, "b"),
            (3, "c"),
            (4, "a"),
            (5, "b"),
            (6, "a"),
            (7, "d"),
        ];
        let mut parked = park(&rows);
        let taken = take_ready(&mut parked, 5, &blocked(&["c"]));
        // a's three rows, then b's two; d does not fit, c is blocked.
        assert_eq!(seqs(&taken), vec![1, 4, 6, 2, 5]);
        assert_eq!(parked.keys().copied().collect::<Vec<_>>(), vec![3, 7]);
    }

    #[test]
    fn the_last_aggregate_taken_may_be_cut_short_and_keeps_the_rest_parked_in_order() {
        let mut parked = park(&[(1, "a"), (2, "b"), (3, "b"), (4, "b"), (5, "a")]);
        let taken = take_ready(&mut parked, 3, &blocked(&[]));
        assert_eq!(seqs(&taken), vec![1, 5, 2]);
        assert_eq!(parked.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        // What is left of b comes next, oldest first.
        let taken = take_ready(&mut parked, 3, &blocked(&[]));
        assert_eq!(seqs(&taken), vec![3, 4]);
        assert!(parked.is_empty());
    }

    #[test]
    fn nothing_is_taken_of_blocked_aggregates() {
        let mut parked = park(&[(1, "a"), (2, "a")]);
        assert!(take_ready(&mut parked, 10, &blocked(&["a"])).is_empty());
        assert_eq!(parked.len(), 2);
        assert!(take_ready(&mut parked, 0, &blocked(&[])).is_empty());
    }
}
