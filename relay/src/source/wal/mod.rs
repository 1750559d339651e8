//! Log tailing: the outbox's inserts streamed from the WAL through a logical replication slot
//! (pgoutput) and a publication on the outbox table (inserts only).
//!
//! ```text
//!  Postgres ──Begin/Relation/Insert…/Commit──► decode ──► ready ──► handed out (in flight)
//!     ▲                                                                   │ broker confirms
//!     └──── flush LSN = end of the newest transaction whose events ◄──────┘
//!           and all earlier ones are confirmed (or dead-lettered)
//! ```
//!
//! - "Received" and "confirmed" positions are kept apart: the flush LSN reported to Postgres
//!   only passes a transaction's commit once every event of it, and of every earlier
//!   transaction, was confirmed by the broker. After a crash, streaming restarts from the
//!   slot's confirmed position; unconfirmed events are sent again (duplicates, never loss).
//! - Events are handed out as they arrive, so a transaction of 100,000 events is never held
//!   whole in memory; when the broker is slow the relay stops reading and the replication
//!   client's bounded buffer pushes back on the walsender, while status updates continue so
//!   `wal_sender_timeout` does not fire.
//! - When nothing is in flight, keepalives move the flush LSN to the server's WAL end, so an
//!   idle outbox next to busy tables does not pin WAL.
//! - `pg_logical_emit_message(true, '<prefix>', '<json>')` events are relayed too (a
//!   table-less outbox).
//! - One active relay: the same advisory lock as the polling publisher, then the slot itself
//!   (Postgres lets only one process stream from a slot).
//!
//! Docs: <https://www.postgresql.org/docs/15/protocol-replication.html>,
//! <https://www.postgresql.org/docs/15/logicaldecoding-explanation.html>.

use std::collections::{BTreeMap, VecDeque};

use hashbrown::{HashMap, HashSet};

mod decode;
pub mod frontier;
mod housekeeping;
mod repair;
mod setup;
mod stall;

use self::decode::{ColumnMap, emitted_event};
use self::housekeeping::Chores;
use self::repair::Backfill;
use self::setup::check_setup;
use self::stall::StallWatch;

use self::frontier::{Confirmed, Frontier};
use std::time::{Duration, Instant};

use pgwire_replication::client::ReplicationEvent;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig};

use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::pgoutput::{self, Message};
use super::{Blocked, Source};
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::event::{KeyRef, OutboxEvent};

use crate::outbox::Outbox;
use crate::pg::PgConn;
use crate::pg::slot::{resolve_slot_name, slot_info};
use crate::pg::tls::PgTarget;

/// Only refused credentials or rights are final here: a slot that was dropped or invalidated
/// while streaming is repaired on reconnect (`prepare_slot`), and a missing publication is
/// reported by the set-up checks of that reconnect.
fn replication_error(e: PgWireError) -> Error {
    let refused = match &e {
        PgWireError::Auth(_) => true,
        // Class 28 (invalid authorization) and 42 (access rule violation) will not fix
        // themselves; everything else from the server (shutdown, conflict, slot gone) may.
        PgWireError::Server(_) => replication_sqlstate(&e).is_some_and(|code| {
            let class = &code.code()[..2];
            class == "28" || class == "42"
        }),
        _ => false,
    };
    Error::Replication {
        context: "logical replication failed".into(),
        kind: if refused {
            ErrorKind::Configuration
        } else {
            ErrorKind::Transient
        },
        source: e,
    }
}

/// The SQLSTATE of a server error on the replication connection. pgwire-replication 0.5
/// keeps only the message and code of the server's ErrorResponse, formatted as
/// `<message> (SQLSTATE <code>)`: the code is read back from that one fixed place.
fn replication_sqlstate(e: &PgWireError) -> Option<SqlState> {
    let PgWireError::Server(text) = e else {
        return None;
    };
    let code = text.rsplit_once("(SQLSTATE ")?.1.strip_suffix(')')?;
    (code.len() == 5).then(|| SqlState::from_code(code))
}

/// Replication messages the client buffers ahead of the engine (pgwire-replication's bounded
/// channel; a full one pushes back on the walsender). A batch is 1,000 events by default, so
/// this still keeps one read ahead; 4,096 cost 1-3 MiB more peak RSS on a 100,000-event
/// transaction (wal → Kafka 40.2 vs 37.3 MiB, mean of two bench runs) for no faster drain.
const REPLICATION_BUFFER_EVENTS: usize = 1024;

pub struct WalSource {
    conn: PgConn,
    outbox: Outbox,
    config: Config,
    slot: String,
    publication: String,
    repl: Option<ReplicationClient>,
    relations: HashMap<u32, Option<ColumnMap>>,
    /// What may be reported to Postgres as flushed (see [`frontier`]).
    frontier: Frontier,
    ready: VecDeque<OutboxEvent>,
    /// Read from the stream and not yet confirmed or dead-lettered, in stream order. The event
    /// itself is kept only while it is not out (parked behind a blocked aggregate, or released
    /// unconfirmed): those are sent again first. Events in flight are the engine's.
    handed: BTreeMap<i64, Option<Box<OutboxEvent>>>,
    /// Of `handed`, those in flight now (handed out and not yet released).
    out: HashSet<i64>,
    attempts: HashMap<i64, u32>,
    /// Attempts are counted in `<table>_relay_attempts` (so they survive a restart); false
    /// when that table is missing (not migrated yet): then only in memory.
    attempts_table: bool,
    held: HashSet<(String, String)>,
    next_seq: i64,
    /// When the periodic chores last ran, and the position last saved.
    chores: Chores,
    /// A repair in progress: rows created since `from`, read after `cursor`.
    backfill: Option<Backfill>,
    /// Whether the stream stalls (connected, the WAL moving, nothing sent to us).
    stall: StallWatch,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Postgres timestamps in the protocol count microseconds from 2000-01-01.
fn pg_epoch_micros_to_unix_ms(micros: i64) -> i64 {
    (micros + 946_684_800_000_000) / 1000
}

impl WalSource {
    /// Streams from the server the query connection reached: with several hosts in
    /// `DATABASE_URL` (and `target_session_attrs=read-write`), the current primary.
    async fn replication_config(&self, start: Lsn) -> Result<ReplicationConfig, Error> {
        let target = PgTarget::parse(&self.config.database_url)?;
        let pg = &target.config;
        let hosts = target.hosts();
        let (host, port) = if hosts.is_empty() {
            ("localhost".to_string(), 5432)
        } else {
            crate::pg::connected_host(&self.conn.client, &hosts).await?
        };
        if hosts.len() > 1 {
            info!(host = %host, port, "streaming from the primary among DATABASE_URL's hosts");
        }
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        Ok(ReplicationConfig::new(
            host,
            pg.get_user().unwrap_or("postgres"),
            password,
            pg.get_dbname().unwrap_or("postgres"),
            self.slot.clone(),
            self.publication.clone(),
        )
        .with_port(port)
        .with_tls(target.replication_tls())
        .with_start_lsn(start)
        .with_status_interval(self.config.wal.status_interval)
        .with_wakeup_interval(Duration::from_secs(10))
        .with_buffer_size(REPLICATION_BUFFER_EVENTS)
        .with_application_name("outbox-relay")
        // Makes `feedback_pending_since` report whether the newest position reached Postgres.
        .with_feedback_observer(pgwire_replication::FeedbackObserver::new(|_| {}))
        // Text values in a fixed form, whatever the server's defaults.
        .with_options("-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3"))
    }

    /// Waits for the slot to be free (a relay that just died may still hold it briefly).
    async fn wait_for_slot(&self, shutdown: &CancellationToken) -> Result<Lsn, Error> {
        let deadline = Instant::now() + self.config.wal.slot_wait;
        loop {
            let info = slot_info(&self.conn.client, &self.slot)
                .await?
                .ok_or_else(|| {
                    Error::Setup(format!(
                        "replication slot `{}` was dropped; restart the relay to recreate it",
                        self.slot
                    ))
                })?;
            match info.active_pid {
                None => {
                    return Ok(info.confirmed_flush.unwrap_or(Lsn(0)));
                }
                Some(pid) if Instant::now() >= deadline => {
                    return Err(Error::Setup(format!(
                        "replication slot `{}` is active in process {pid}; stop the other consumer of the slot (SELECT pg_terminate_backend({pid})) or set wal.slot to another name",
                        self.slot
                    )));
                }
                Some(pid) => {
                    debug!(slot = %self.slot, pid, "slot still active; waiting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Lsn(0)),
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        }
    }

    fn enqueue(&mut self, event: OutboxEvent) {
        self.ready.push_back(event);
    }

    /// The event left flight (confirmed or dead-lettered): maybe move the flush LSN.
    fn settle(&mut self, seq: i64) {
        self.handed.remove(&seq);
        self.out.remove(&seq);
        self.attempts.remove(&seq);
        self.chores.events_moved = true;
        if let Some(c) = self.frontier.settle(seq) {
            self.report(c);
        }
    }

    /// A new confirmed position: to the replication client, which reports it to Postgres
    /// within `wal.status_interval` (coalescing what moves meanwhile).
    fn report(&mut self, c: Confirmed) {
        if let Some(repl) = &self.repl {
            repl.update_applied_lsn(c.lsn);
        }
    }

    fn idle(&self) -> bool {
        self.frontier.is_idle()
            && self.ready.is_empty()
            && self.handed.is_empty()
            && self.backfill.is_none()
    }

    /// Events kept because they were not sent (parked behind their aggregate, or released),
    /// oldest first, up to `max`, except those of the aggregates in `blocked`.
    fn take_kept(&mut self, max: usize, blocked: &dyn Blocked) -> Vec<OutboxEvent> {
        let mut batch = Vec::new();
        if self.handed.len() > self.out.len() {
            for (seq, kept) in self.handed.iter_mut() {
                if batch.len() >= max {
                    break;
                }
                if !self.out.contains(seq)
                    && let Some(e) = kept.take_if(|e| !blocked.contains(e))
                {
                    batch.push(*e);
                }
            }
        }
        batch
    }

    /// Marks `batch` as out and returns it, except events of aggregates held by a dead letter:
    /// those wait in the dead-letter table, in order, instead of pinning the slot.
    async fn hand_out(&mut self, batch: Vec<OutboxEvent>) -> Result<Vec<OutboxEvent>, Error> {
        // `outbox-relay dead-letters retry|discard` may have released an aggregate since the
        // last reload: check the table before parking anything.
        if batch.iter().any(|e| self.held.contains(&KeyRef::of(e))) {
            self.held = self.outbox.held_aggregates(&self.conn.client).await?;
            self.chores.held_loaded = Instant::now();
        }
        let mut out = Vec::with_capacity(batch.len());
        for event in batch {
            if self.held.contains(&KeyRef::of(&event)) {
                self.outbox
                    .dead_letter(
                        &self.conn.client,
                        &event,
                        "held: an earlier event of this aggregate is in the dead-letter table",
                        0,
                        true,
                        false,
                    )
                    .await?;
                self.settle(event.seq);
            } else {
                out.push(event);
            }
        }
        self.out.extend(out.iter().map(|e| e.seq));
        Ok(out)
    }

    fn handle(&mut self, event: ReplicationEvent) -> Result<(), Error> {
        if !matches!(event, ReplicationEvent::KeepAlive { .. }) {
            self.stall.data();
        }
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.frontier
                    .begin(pg_epoch_micros_to_unix_ms(commit_time_micros));
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(c) = self.frontier.commit(end_lsn) {
                    self.report(c);
                }
            }
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data)
                .map_err(|e| Error::Setup(format!("cannot decode pgoutput: {e}")))?
            {
                Message::Relation(rel) => {
                    let ours = rel.namespace == self.outbox.table.schema_or_public()
                        && rel.name == self.outbox.table.name;
                    let map = if ours {
                        Some(ColumnMap::new(
                            &rel,
                            &self.config.outbox.columns,
                            &self.outbox.shape.template_column_names(),
                        )?)
                    } else {
                        None
                    };
                    self.relations.insert(rel.id, map);
                }
                Message::Insert { relation, values } => {
                    let Some(Some(map)) = self.relations.get(&relation) else {
                        return Ok(());
                    };
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let event = map.event(seq, &values);
                    if !self.frontier.add_to_open(seq) {
                        return Err(Error::Setup("pgoutput Insert outside a transaction".into()));
                    }
                    self.enqueue(event);
                }
                Message::Other(_) => {}
            },
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix != self.config.wal.message_prefix {
                    return Ok(());
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let event = emitted_event(
                    seq,
                    lsn,
                    &content,
                    &self.outbox.shape.template_column_names(),
                );
                if !(transactional && self.frontier.add_to_open(seq)) {
                    self.frontier.add_standalone(seq, lsn, now_ms());
                }
                self.enqueue(event);
            }
            ReplicationEvent::KeepAlive {
                wal_end,
                server_time_micros,
                ..
            } => {
                // Nothing in flight: everything up to the server's position is done, even if
                // it was all other tables' changes. This is what keeps the slot moving.
                // The server's clock, not ours: a repair starts from this time.
                if self.idle()
                    && let Some(c) = self
                        .frontier
                        .keepalive(wal_end, pg_epoch_micros_to_unix_ms(server_time_micros))
                {
                    self.report(c);
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }
}

impl Source for WalSource {
    async fn open(config: &Config) -> Result<Self, Error> {
        let conn = PgConn::connect(&config.database_url).await?;
        let outbox = Outbox::inspect(&conn.client, config, false).await?;
        let slot =
            resolve_slot_name(&conn.client, config.wal.slot.as_deref(), &outbox.table).await?;
        check_setup(&conn.client, config, &outbox.table, &slot).await?;
        let held = outbox.held_aggregates(&conn.client).await?;
        Ok(Self {
            slot,
            publication: config.wal.publication_name(&config.outbox.table),
            conn,
            outbox,
            config: config.clone(),
            repl: None,
            relations: HashMap::new(),
            frontier: Frontier::new(Lsn(0), now_ms()),
            ready: VecDeque::new(),
            handed: BTreeMap::new(),
            out: HashSet::new(),
            attempts: HashMap::new(),
            attempts_table: true,
            held,
            next_seq: 1,
            chores: Chores::new(),
            backfill: None,
            stall: StallWatch::new(),
        })
    }

    async fn lead(&mut self, shutdown: &CancellationToken) -> Result<bool, Error> {
        if !super::wait_for_lock(
            &self.conn,
            &self.outbox,
            self.config.delivery.standby_interval,
            shutdown,
        )
        .await?
        {
            return Ok(false);
        }
        self.prepare_slot().await?;
        let slot_start = self.wait_for_slot(shutdown).await?;
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        let progress = self
            .outbox
            .load_progress(&self.conn.client, &self.slot)
            .await?;
        // Postgres before 17 does not write a logical slot's confirmed position to disk when
        // only that position moved, so after a restart the slot can be seconds behind what
        // was confirmed (every event since would be published again). Our own progress row is
        // committed every `status_interval`: start from whichever is newer — if this cluster
        // wrote it. Not during a repair, whose recreated slot starts where the table read ends.
        let saved = progress
            .as_ref()
            .filter(|p| p.trusted && self.backfill.is_none())
            .map(|p| p.confirmed_lsn);
        let start = match saved {
            Some(saved) if saved > slot_start => {
                info!(slot = %self.slot, slot_position = %slot_start, saved = %saved, "the slot is behind the saved progress (Postgres restarted); starting from the saved position");
                saved
            }
            _ => slot_start,
        };
        let repl = ReplicationClient::connect(self.replication_config(start).await?)
            .await
            .map_err(replication_error)?;
        info!(slot = %self.slot, publication = %self.publication, start = %start, "streaming the outbox from the WAL");
        self.frontier = Frontier::new(start, self.frontier.confirmed_commit_ms());
        // Nothing new is confirmed yet: keep the saved progress (its commit time is where a
        // repair would start) until a transaction really is.
        self.chores.saved = start;
        if let Some(p) = progress {
            self.frontier.set_confirmed_commit_ms(p.commit_ms);
        }
        self.repl = Some(repl);
        Ok(true)
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
        let is_blocked = |e: &OutboxEvent| blocked.contains(e);
        // Events of blocked aggregates read from the stream wait in memory; past this many the
        // stream is not read further until some are sent (bounded memory; the slot cannot move
        // past them anyway).
        let park_limit = max.saturating_mul(3);
        loop {
            if shutdown.is_cancelled() {
                return Ok(vec![]);
            }
            self.conn.ensure_open()?;
            self.housekeeping().await?;
            // Events released unconfirmed go first, in order (not those still out, nor those of
            // an aggregate that waits out a failure).
            let mut batch = self.take_kept(max, blocked);
            // A repair of a lost slot publishes the gap from the table before streaming.
            if self.handed.is_empty() && self.backfill.is_some() {
                match self.next_backfill(max).await? {
                    Some(events) => {
                        for e in &events {
                            self.handed.insert(e.seq, None);
                        }
                        batch = events;
                    }
                    None => continue,
                }
            }
            let mut parked_full = false;
            while self.backfill.is_none() {
                if self
                    .handed
                    .len()
                    .saturating_sub(self.out.len() + batch.len())
                    >= park_limit
                {
                    parked_full = true;
                    break;
                }
                while batch.len() < max
                    && self
                        .handed
                        .len()
                        .saturating_sub(self.out.len() + batch.len())
                        < park_limit
                    && let Some(e) = self.ready.pop_front()
                {
                    if is_blocked(&e) {
                        self.handed.insert(e.seq, Some(Box::new(e)));
                    } else {
                        self.handed.insert(e.seq, None);
                        batch.push(e);
                    }
                }
                if batch.len() >= max {
                    break;
                }
                let wait = match wait_until {
                    Some(t) if batch.is_empty() => t
                        .checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero()),
                    _ => None,
                };
                let repl = self
                    .repl
                    .as_mut()
                    .ok_or_else(|| Error::Setup("replication not started".into()))?;
                let received = match wait {
                    Some(left) => tokio::select! {
                        _ = shutdown.cancelled() => return Ok(vec![]),
                        r = repl.recv() => r,
                        // Idle: still save progress (and do the chores) every status interval.
                        _ = tokio::time::sleep(self.config.wal.status_interval.min(left)) => {
                            self.housekeeping().await?;
                            continue;
                        }
                    },
                    // Only what is already buffered: do not hold a batch back waiting. A
                    // timeout, not `now_or_never`: once the task's cooperative budget is spent
                    // (every 128 receives) the channel answers Pending, and the timeout then
                    // yields and reads on with a new budget, where `now_or_never` would end the
                    // batch (tried: wal -> Kafka drains 5-17k/s instead of 63-70k/s).
                    None => match tokio::time::timeout(Duration::ZERO, repl.recv()).await {
                        Ok(r) => r,
                        Err(_) => break,
                    },
                };
                match received.map_err(replication_error)? {
                    Some(event) => {
                        self.handle(event)?;
                        // An idle outbox still moves the slot (keepalives): save that progress
                        // and do the periodic chores while waiting.
                        if batch.is_empty() {
                            self.housekeeping().await?;
                        }
                    }
                    None => {
                        return Err(Error::pg_transient(
                            "logical replication stream ended",
                            "the server closed it; reconnecting",
                        ));
                    }
                }
            }
            let out = self.hand_out(batch).await?;
            if !out.is_empty() {
                return Ok(out);
            }
            if wait_until.is_none_or(|t| t <= Instant::now()) {
                return Ok(vec![]);
            }
            if parked_full {
                // Nothing sendable until a blocked aggregate is released: wait a little, then
                // let the engine look at its blocks again.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.config.wal.status_interval) => {}
                }
                return Ok(vec![]);
            }
        }
    }

    async fn next_read(
        &mut self,
        max: usize,
        blocked: &dyn Blocked,
    ) -> Result<Vec<OutboxEvent>, Error> {
        self.conn.ensure_open()?;
        let batch = self.take_kept(max, blocked);
        self.hand_out(batch).await
    }

    async fn close(&mut self) {
        // Events are handed out as they arrive, so the last transaction's events may all be
        // confirmed while its Commit is still unread: read on until it arrives so the position
        // can pass it (otherwise the next relay sends that transaction again). Bounded: the
        // whole stop is bounded by `delivery.shutdown_timeout` anyway.
        let until = Instant::now() + Duration::from_secs(5);
        while self.frontier.waits_for_commit() && Instant::now() < until {
            let Some(repl) = self.repl.as_mut() else {
                break;
            };
            match tokio::time::timeout(until - Instant::now(), repl.recv()).await {
                Ok(Ok(Some(event))) => {
                    if self.handle(event).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        info!(
            position = %self.frontier.confirmed(),
            unsettled = self.frontier.unsettled(),
            "log tailing stopped; the next relay starts at this position (unsettled events are sent again)"
        );
        let Some(repl) = self.repl.as_mut() else {
            return;
        };
        // The worker reports positions every `status_interval`; wait for the last one so the
        // next relay does not send the final second again.
        // At least 2 s: on a busy machine the worker may need longer than a few intervals.
        let deadline =
            Instant::now() + (self.config.wal.status_interval * 3).max(Duration::from_secs(2));
        while repl.feedback_pending_since().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = repl.shutdown().await {
            debug!(error = %e, "replication stream did not close cleanly");
        }
        self.repl = None;
        // And in our own progress row, which outlives a Postgres restart (the slot's position
        // may not: see `lead`).
        if let Err(e) = self.save_progress().await {
            warn!(error = %e, "cannot save the final log-tailing progress; the next start may publish the last events again");
        }
    }

    async fn show_broker_node(&mut self, node: Option<&str>) -> Result<(), Error> {
        super::show_broker_node(&self.conn, node).await
    }

    async fn confirm(&mut self, events: &[&OutboxEvent]) -> Result<(), Error> {
        let mut retried: Vec<&str> = Vec::new();
        for e in events {
            if self.attempts.contains_key(&e.seq) {
                retried.push(&e.id);
            }
            self.settle(e.seq);
        }
        if !retried.is_empty() && self.attempts_table {
            self.outbox
                .clear_wal_attempts(&self.conn.client, &retried)
                .await?;
        }
        Ok(())
    }

    fn release(&mut self, events: &[&OutboxEvent]) {
        for e in events {
            self.out.remove(&e.seq);
            if let Some(kept) = self.handed.get_mut(&e.seq) {
                *kept = Some(Box::new((*e).clone()));
            }
        }
    }

    async fn record_failure(&mut self, event: &OutboxEvent, error: &str) -> Result<u32, Error> {
        let n = self.attempts.entry(event.seq).or_insert(0);
        *n += 1;
        if self.attempts_table {
            match self
                .outbox
                .record_wal_failure(&self.conn.client, &event.id, error)
                .await
            {
                Ok(counted) => *n = counted.max(1) as u32,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    warn!(
                        "publish attempts are counted in memory only (a restart starts them \
                         again): the attempts table is missing; run `outbox-relay migrate`"
                    );
                    self.attempts_table = false;
                }
                Err(e) => return Err(Error::pg("cannot record a publish failure", e)),
            }
        }
        debug!(event_id = %event.id, attempts = *n, error, "publish refused");
        Ok(*n)
    }

    async fn dead_letter(
        &mut self,
        event: &OutboxEvent,
        error: &str,
        attempts: u32,
        hold: bool,
    ) -> Result<(), Error> {
        // The dead letter and the end of its attempts row are one statement: a crash between
        // two would leave the row for the daily chore.
        self.outbox
            .dead_letter(
                &self.conn.client,
                event,
                error,
                attempts as i32,
                hold,
                self.attempts_table,
            )
            .await?;
        if hold {
            self.held
                .insert((event.aggregate_type.clone(), event.aggregate_id.clone()));
        }
        self.settle(event.seq);
        Ok(())
    }
}

impl Drop for WalSource {
    fn drop(&mut self) {
        if let Some(repl) = &self.repl {
            repl.stop();
        }
    }
}
