//! Sources: where events come from. `poll` reads the outbox table; `wal` (log tailing) streams
//! its inserts from the WAL.
//!
//! The contract every source keeps:
//! - `next_batch` returns events in outbox order (commit order for wal) and never skips a
//!   committed event, however late it commits relative to its neighbours.
//! - An event handed out by `next_batch` is *out*: later batches leave it out until the engine
//!   calls `confirm` (the broker confirmed it), `dead_letter`, or `release` (not confirmed: read
//!   it again). Several batches may be out at once. Events of the aggregates in `blocked` are
//!   left out of a batch, and so is everything of theirs behind them.
//! - An event stays pending until `confirm` or `dead_letter` was called for it; after a crash
//!   everything unconfirmed is read again. Duplicates are possible, loss is not.
//! - `lead` makes this instance the only active relay of the outbox, or waits until it can be.

pub mod pgoutput;
pub mod poll;
pub mod wal;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::error::Error;
use crate::event::{AggregateKey, OutboxEvent};
use crate::outbox::Outbox;
use crate::pg::PgConn;

/// The aggregates a read must leave out (their events are in flight, or they wait out a
/// failure). The engine implements it over its per-aggregate bookkeeping, so a read copies
/// nothing; `Sync` so that a source's future holding it stays `Send`.
pub trait Blocked: Sync {
    fn contains(&self, event: &OutboxEvent) -> bool;
    /// Every blocked aggregate.
    fn keys(&self) -> Box<dyn Iterator<Item = &AggregateKey> + Send + '_>;
    /// The blocked aggregates that wait out a failure or a probe, not merely for their events
    /// in flight: the polling read leaves them out in SQL (and parks the others' rows).
    fn waiting_keys(&self) -> Box<dyn Iterator<Item = &AggregateKey> + Send + '_>;
}

/// What precedes the broker node in the leader session's `application_name`.
const BROKER_NODE_TAG: &str = " rabbitmq=";

/// The leader session's `application_name`: `outbox-relay`, plus ` rabbitmq=<host:port>` while
/// the sink is connected to a RabbitMQ node; `status` reads it from `pg_stat_activity`
/// ([`broker_node_of`]).
pub(crate) async fn show_broker_node(conn: &PgConn, node: Option<&str>) -> Result<(), Error> {
    let mut name = match node {
        Some(n) => format!("outbox-relay{BROKER_NODE_TAG}{n}"),
        None => "outbox-relay".into(),
    };
    // Postgres keeps 63 bytes of it.
    while name.len() > 63 {
        name.pop();
    }
    conn.client
        .execute("SELECT set_config('application_name', $1, false)", &[&name])
        .await
        .map_err(|e| Error::pg("cannot set application_name", e))?;
    Ok(())
}

/// The broker node an `application_name` written by [`show_broker_node`] names.
pub(crate) fn broker_node_of(application_name: &str) -> Option<&str> {
    application_name
        .split_once(BROKER_NODE_TAG)
        .map(|(_, node)| node)
}

/// Waits until this instance holds the outbox's leader lock (both sources use it).
/// `Ok(false)` when shut down first; an error when the connection is lost.
pub(crate) async fn wait_for_lock(
    conn: &PgConn,
    outbox: &Outbox,
    retry: Duration,
    shutdown: &CancellationToken,
) -> Result<bool, Error> {
    let mut announced = false;
    loop {
        conn.ensure_open()?;
        if outbox.try_lead(&conn.client).await? {
            info!(outbox = %outbox.table.display(), "this instance is the active relay");
            return Ok(true);
        }
        if !announced {
            info!(outbox = %outbox.table.display(), "another relay is active; standing by");
            announced = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

pub trait Source: Send + Sized {
    /// Connects and checks the outbox set-up. Errors here on the first attempt are fatal.
    fn open(config: &Config) -> impl Future<Output = Result<Self, Error>> + Send;

    /// Waits until this instance is the active relay. `Ok(false)` when shut down first.
    fn lead(
        &mut self,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Cancelled when this instance can no longer be the active relay (its connection, and
    /// with it the leader lock, is gone).
    fn leadership_lost(&self) -> CancellationToken;

    /// Returns up to `max` events that are not out, leaving out the aggregates in `blocked`.
    /// With `wait_until`, waits for events until that instant; without, returns what is there
    /// now. Empty when there is nothing (by then), or when shutting down.
    fn next_batch(
        &mut self,
        max: usize,
        blocked: &dyn Blocked,
        wait_until: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, Error>> + Send;

    /// For a graceful stop: events already read but not yet handed out (those that waited
    /// behind their aggregate's events in flight, or were released), up to `max`, leaving out
    /// the aggregates in `blocked`; reads nothing new. Sending them lets a source whose
    /// position moves only past settled events (wal) stop where nothing sent is sent again.
    fn next_read(
        &mut self,
        _max: usize,
        _blocked: &dyn Blocked,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, Error>> + Send {
        async { Ok(Vec::new()) }
    }

    /// The sink now talks to broker node `node` (`None`: to none, or the broker does not say):
    /// shown to `status` through the leader session's `application_name`.
    fn show_broker_node(
        &mut self,
        _node: Option<&str>,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }

    /// The broker confirmed these events.
    fn confirm(
        &mut self,
        events: &[&OutboxEvent],
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// These events are not confirmed: hand them out again (in order, in a later batch).
    fn release(&mut self, events: &[&OutboxEvent]);

    /// The broker refused `event` permanently; returns the attempts counted so far.
    fn record_failure(
        &mut self,
        event: &OutboxEvent,
        error: &str,
    ) -> impl Future<Output = Result<u32, Error>> + Send;

    /// Stops cleanly at shutdown: reports the last confirmed position where that is separate
    /// from confirming (wal), so a restart sends as little again as possible.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Moves `event` to the dead-letter table; `hold` keeps its aggregate's later events back.
    fn dead_letter(
        &mut self,
        event: &OutboxEvent,
        error: &str,
        attempts: u32,
        hold: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}
