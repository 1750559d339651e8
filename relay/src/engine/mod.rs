//! The delivery engine: source → sink → confirm, with several batches in flight.
//!
//! ```text
//!  connect ─► lead ─► fill: next_batch ─► validate ─► sink.send ──► in flight (≤ max_in_flight)
//!     ▲                 ▲   (blocked aggregates left out)              │ oldest first
//!     │                 └──────── settle: confirm / release / dead-letter ◄┘
//!     └── Postgres lost (global backoff)      broker unavailable: pause, drain, global backoff
//! ```
//!
//! While fewer than `max_in_flight` batches are out, the engine waits for answers only
//! `ASK_AGAIN_AFTER` (50 ms) before it asks the source again: a source that found nothing to send
//! because what it read waits behind events in flight (poll parks such rows, and once its park
//! is full reads past them) gets to read on, so the free flights go to other aggregates while
//! one batch's answer is slow.
//!
//! **At least once.** An event is confirmed to the source only after the broker confirmed it.
//! Batches are settled oldest first, so confirmations reach the source in source order (poll:
//! marked or deleted; wal: the frontier moves over whole transactions, see
//! [`crate::source::wal`]).
//!
//! **Order per aggregate without a round trip per event.** All events of a batch, including
//! consecutive events of one aggregate, go out in one `send`, and later batches follow while
//! earlier ones are being confirmed. The sinks hand them to the broker on one ordered path
//! (Kafka: the idempotent producer keeps order within a partition across its retries; RabbitMQ:
//! one channel routes in publish order), so while everything succeeds the order needs no wait.
//! An aggregate is in at most one batch in flight: the next batch leaves out aggregates whose
//! events are still unanswered, so a later batch never overtakes an earlier one that fails
//! (a broker outage that times out batch k cannot let batch k+1 of the same aggregate through).
//! Many aggregates pipeline; one hot aggregate moves a whole batch per round trip.
//!
//! **When an event fails.** Its aggregate is blocked ([`aggregates`]): every later event of the
//! aggregate that was already in flight is *not* confirmed, whatever the broker answered, and
//! goes back to the source to be read again; nothing of the aggregate is sent until all of its
//! in-flight events are back and its own backoff has passed. Then the failed event goes first
//! and the rest follows in order. What was in flight behind a failure may already have reached
//! the broker once (counted in `outbox_relay_sent_behind_failure_total`; only events of the same
//! batch, so at most `delivery.batch_size`); it is sent again behind the failed event,
//! so consumers see it again in order (a duplicate, deduplicated by id). With `hold`, an
//! event that becomes a dead letter holds its aggregate: nothing behind it is confirmed, or sent
//! again, until the dead letter is retried or discarded.
//!
//! **Failure isolation.** A transient failure (a `nack`, a timeout for one message) or a
//! permanent one (unroutable, too large: counted toward `delivery.max_attempts`, then
//! dead-lettered) blocks only its aggregate, with its own backoff; the rest of the outbox keeps
//! its full rate. Only a broker that cannot be used as a whole
//! ([`FailureKind::Unavailable`]: connection lost, producer being replaced, messages timing out)
//! pauses sending: what is in flight settles, then the engine backs off globally. A lost
//! Postgres connection ends the session; it reconnects with the same global backoff.
//!
//! **Leadership.** Before every send the engine checks that this instance still holds the
//! leader lock; an instance that lost it sends nothing more than what was already in flight.

pub mod aggregates;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use self::aggregates::{AggregateKey, Aggregates, KeyRef, key_of};
use crate::config::{Config, DeliveryConfig, OnDeadLetter, SourceKind};
use crate::error::{Error, FailureKind, PublishError};
use crate::event::OutboxEvent;
use crate::http::Health;
use crate::sink::{AnySink, Sink};
use crate::source::Source;
use crate::source::poll::PollSource;
use crate::source::wal::WalSource;

/// How long the engine waits for answers, with room for another batch in flight, before it
/// asks the source again for events.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(50);

/// Exponential backoff with jitter that never gives up; `reset` after a success.
pub struct Backoff {
    builder: ExponentialBuilder,
    current: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(config: &DeliveryConfig) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(config.backoff_initial)
            .with_max_delay(config.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            current: builder.build(),
            builder,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(Duration::from_secs(1))
    }

    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }

    /// Sleeps for the next delay; `false` if shut down meanwhile.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled. Returns an error only for what a restart
/// cannot fix (configuration, set-up) or for failures at start-up.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<(), Error> {
    match config.source {
        SourceKind::Poll => run_with::<PollSource>(config, shutdown, health).await,
        SourceKind::Wal => run_with::<WalSource>(config, shutdown, health).await,
    }
}

async fn run_with<S: Source>(
    config: Config,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<(), Error> {
    // Fail fast on a bad database or broker: one clear message at start-up.
    let mut source = Some(S::open(&config).await?);
    let mut sink = AnySink::connect(&config).await?;
    info!(
        source = ?config.source,
        sink = sink.system(),
        outbox = %config.outbox.table,
        "relay started"
    );
    let mut backoff = Backoff::new(&config.delivery);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let mut current = match source.take() {
            Some(s) => s,
            None => match S::open(&config).await {
                Ok(s) => s,
                Err(e) if e.is_transient() => {
                    warn!(error = %e, "cannot reach Postgres; retrying");
                    backoff.wait(&shutdown).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let pumped = pump(
            &mut current,
            &mut sink,
            &config,
            &shutdown,
            &mut backoff,
            &health,
        )
        .await;
        health.set_active(false);
        match pumped {
            Ok(()) => {
                current.close().await;
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                warn!(error = %e, "lost Postgres; reconnecting (unconfirmed events will be sent again)");
                drop(current);
                backoff.wait(&shutdown).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Publishes `events` in one send and waits for every answer; once an event of an aggregate
/// failed, the results of that aggregate's later events are failures too (they may have reached
/// the broker, but not in order behind the failed one). For the operator commands that publish
/// a selection once (`replay`, `dead-letters retry`).
pub(crate) async fn publish_ordered<K: Sink>(
    sink: &mut K,
    events: &[&OutboxEvent],
) -> Vec<Result<(), PublishError>> {
    let mut results = sink.publish(events).await;
    let mut failed: HashSet<(&str, &str)> = HashSet::new();
    for (event, result) in events.iter().zip(results.iter_mut()) {
        let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        if failed.contains(&key) {
            if result.is_ok() {
                crate::metrics::record_sent_behind_failure();
            }
            *result = Err(PublishError::transient(
                "not confirmed: behind a failed event of its aggregate",
            ));
        } else if result.is_err() {
            failed.insert(key);
        }
    }
    results
}

/// A batch in flight: its events and the broker's answers, once they are in.
///
/// It runs as a task of its own, so the answers are taken as they arrive: their spans end and
/// `outbox_relay_commit_to_ack_seconds` is recorded at the broker's answer, on the other
/// worker thread if need be, not whenever the engine loop next awaits its flights (it may be
/// reading the source, sending, or marking rows in Postgres meanwhile). The engine still
/// settles flights oldest first. Dropping a flight (the session ends) aborts its task.
struct Flight(tokio::task::JoinHandle<Landed>);

/// A flight's events and the broker's answer for each.
type Landed = (Vec<OutboxEvent>, Vec<Result<(), PublishError>>);

impl Flight {
    fn spawn(future: BoxFuture<'static, Landed>) -> Self {
        Self(tokio::spawn(future))
    }
}

impl std::future::Future for Flight {
    type Output = Landed;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match std::pin::Pin::new(&mut self.0).poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Ok(answers)) => std::task::Poll::Ready(answers),
            // Only a panic in a sink's confirmation code gets here (a flight is aborted only
            // when dropped): it goes on as if the engine had polled the future itself.
            std::task::Poll::Ready(Err(e)) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("a flight's task ended without its answers: {e}"),
            },
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One session: become the active relay, then keep batches in flight until shutdown or a
/// source error.
async fn pump<S: Source, K: Sink>(
    source: &mut S,
    sink: &mut K,
    config: &Config,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    health: &Arc<Health>,
) -> Result<(), Error> {
    if !source.lead(shutdown).await? {
        return Ok(());
    }
    let leadership = source.leadership_lost();
    health.became_active(leadership.clone());
    let mut engine = Engine {
        config,
        aggregates: Aggregates::new(&config.delivery),
        flights: FuturesOrdered::new(),
        paused_until: None,
        shown_node: (0, None),
    };
    let result = engine
        .drive(source, sink, shutdown, &leadership, backoff)
        .await;
    crate::metrics::set_retrying_aggregates(0);
    result
}

struct Engine<'a> {
    config: &'a Config,
    aggregates: Aggregates,
    flights: FuturesOrdered<Flight>,
    /// The broker was unavailable: send nothing until this instant and until nothing is in
    /// flight.
    paused_until: Option<Instant>,
    /// The broker node last shown to `status` (see `Source::show_broker_node`), and the
    /// `metrics::broker_node_changes` count it was read at.
    shown_node: (u64, Option<String>),
}

impl Engine<'_> {
    async fn drive<S: Source, K: Sink>(
        &mut self,
        source: &mut S,
        sink: &mut K,
        shutdown: &CancellationToken,
        leadership: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), Error> {
        let max_in_flight = self.config.delivery.max_in_flight.max(1);
        loop {
            let changes = crate::metrics::broker_node_changes();
            if changes != self.shown_node.0 {
                let node = crate::metrics::broker_node();
                if node != self.shown_node.1 {
                    source.show_broker_node(node.as_deref()).await?;
                }
                self.shown_node = (changes, node);
            }
            let now = Instant::now();
            if self.aggregates.unblock_due(now) > 0 {
                crate::metrics::set_retrying_aggregates(self.aggregates.blocked_count());
            }
            if let Some(until) = self.paused_until
                && until <= now
                && self.flights.is_empty()
            {
                self.paused_until = None;
            }
            // Stopping: nothing new is read, but what was read and waits behind its
            // aggregate still goes out, so the source can stop where nothing is sent twice.
            let stopping = shutdown.is_cancelled();
            if !leadership.is_cancelled() && self.paused_until.is_none() {
                while self.flights.len() < max_in_flight {
                    let blocked = self.aggregates.blocked();
                    let max = self.config.delivery.batch_size;
                    let batch = if stopping {
                        source.next_read(max, &blocked).await?
                    } else {
                        // Wait for new events only when nothing is in flight; otherwise take
                        // what is there now and go back to the answers.
                        let wait = self.flights.is_empty().then(|| {
                            self.aggregates
                                .next_retry()
                                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                        });
                        source.next_batch(max, &blocked, wait, shutdown).await?
                    };
                    if batch.is_empty() {
                        break;
                    }
                    crate::metrics::record_batch(batch.len());
                    let to_send = self.screen(source, batch).await?;
                    if to_send.is_empty() {
                        continue;
                    }
                    if leadership.is_cancelled() {
                        // Not ours to send any more; the next leader reads them again.
                        let refs: Vec<&OutboxEvent> = to_send.iter().collect();
                        source.release(&refs);
                        break;
                    }
                    for event in &to_send {
                        self.aggregates.sent(KeyRef::of(event));
                    }
                    let refs: Vec<&OutboxEvent> = to_send.iter().collect();
                    debug!(
                        events = refs.len(),
                        first = refs[0].seq,
                        last = refs[refs.len() - 1].seq,
                        in_flight = self.flights.len(),
                        "sending batch"
                    );
                    let confirmations = sink.send(&refs).await;
                    self.flights.push_back(Flight::spawn(Box::pin(async move {
                        let results = confirmations.await;
                        (to_send, results)
                    })));
                }
            }
            if self.flights.is_empty() {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                if leadership.is_cancelled() {
                    return Err(Error::pg_transient(
                        "lost the leader lock",
                        "the connection that held it is gone; standing by again",
                    ));
                }
                if let Some(until) = self.paused_until {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep_until(until.into()) => {}
                    }
                }
                continue;
            }
            // With room for another batch, the answers are awaited only for a while: a source
            // may have found nothing to send only because what it read is behind events in
            // flight (poll parks such rows), and asked again it reads on, past them, so one
            // batch whose answer is slow does not hold up the rest of the outbox.
            let room = self.flights.len() < max_in_flight
                && !stopping
                && !leadership.is_cancelled()
                && self.paused_until.is_none();
            let answer = if room {
                match tokio::time::timeout(ASK_AGAIN_AFTER, self.flights.next()).await {
                    Ok(answer) => answer,
                    Err(_) => continue,
                }
            } else {
                self.flights.next().await
            };
            let Some((events, results)) = answer else {
                continue;
            };
            self.settle(source, &events, results, backoff).await?;
        }
    }

    /// Rows that cannot become messages are dead-lettered at once (retrying cannot help), behind
    /// whatever of their aggregate is still unconfirmed; returns the events to send. Events not
    /// sent go back to the source.
    async fn screen<S: Source>(
        &mut self,
        source: &mut S,
        batch: Vec<OutboxEvent>,
    ) -> Result<Vec<OutboxEvent>, Error> {
        if !self.aggregates.any_retrying() && batch.iter().all(|e| e.validate().is_ok()) {
            return Ok(batch);
        }
        let hold = self.config.delivery.on_dead_letter == OnDeadLetter::Hold;
        let mut skipped: HashSet<AggregateKey> = HashSet::new();
        let mut sending: HashSet<AggregateKey> = HashSet::new();
        let mut to_send = Vec::with_capacity(batch.len());
        let mut released = Vec::new();
        for event in batch {
            let key = key_of(&event);
            if skipped.contains(&key) {
                released.push(event);
                continue;
            }
            if self.aggregates.needs_probe(KeyRef::from(&key)) && event.validate().is_ok() {
                // It failed before: this event goes alone, the rest after its answer.
                self.aggregates.start_probe(KeyRef::from(&key));
                skipped.insert(key);
                to_send.push(event);
                continue;
            }
            match event.validate() {
                Ok(()) => {
                    sending.insert(key);
                    to_send.push(event);
                }
                Err(defect) => {
                    // An earlier event of the aggregate is still to be confirmed (in this batch
                    // or in flight): dead-letter this one later, behind it, not before it.
                    // Its earlier events are not failures: they are confirmed as usual, and
                    // being in flight keeps the aggregate out of later reads until then.
                    if !(sending.contains(&key) || self.aggregates.in_flight(KeyRef::from(&key))) {
                        source
                            .dead_letter(&event, &format!("invalid event: {defect}"), 1, hold)
                            .await?;
                        // The aggregate's later events wait until what it has in flight is back.
                        self.aggregates
                            .failed(KeyRef::from(&key), Instant::now(), false);
                    } else {
                        released.push(event);
                    }
                    skipped.insert(key);
                }
            }
        }
        let refs: Vec<&OutboxEvent> = released.iter().collect();
        source.release(&refs);
        Ok(to_send)
    }

    /// Applies the broker's answers for one batch (the oldest in flight) to the source.
    async fn settle<S: Source>(
        &mut self,
        source: &mut S,
        events: &[OutboxEvent],
        results: Vec<Result<(), PublishError>>,
        backoff: &mut Backoff,
    ) -> Result<(), Error> {
        let now = Instant::now();
        let hold = self.config.delivery.on_dead_letter == OnDeadLetter::Hold;
        let mut confirmed: Vec<&OutboxEvent> = Vec::with_capacity(events.len());
        let mut released: Vec<&OutboxEvent> = Vec::new();
        let mut refused: Vec<(&OutboxEvent, String)> = Vec::new();
        let mut unavailable: Option<String> = None;
        let mut transient: Option<(String, usize)> = None;
        let mut results = results.into_iter();
        for event in events {
            let result = results
                .next()
                .unwrap_or_else(|| Err(PublishError::transient("no answer from the sink")));
            let key = KeyRef::of(event);
            trace!(event_id = %event.id, aggregate_id = %event.aggregate_id, ok = result.is_ok(), "answer");
            self.aggregates.answered(key);
            if self.aggregates.is_blocked(key) {
                // Behind a failed event of its aggregate: read again and sent after it.
                if result.is_ok() {
                    crate::metrics::record_sent_behind_failure();
                }
                released.push(event);
                continue;
            }
            match result {
                Ok(()) => {
                    confirmed.push(event);
                    self.aggregates.succeeded(key);
                }
                Err(e) => match e.kind {
                    FailureKind::Unavailable => {
                        unavailable.get_or_insert(e.message);
                        self.aggregates.failed(key, now, false);
                        released.push(event);
                    }
                    FailureKind::Transient => {
                        let delay = self.aggregates.failed(key, now, true);
                        let t = transient.get_or_insert((e.message, 0));
                        t.1 += 1;
                        debug!(event_id = %event.id, aggregate_id = %event.aggregate_id, ?delay, "publish failed; retrying the aggregate after its backoff");
                        released.push(event);
                    }
                    FailureKind::Permanent => {
                        self.aggregates.failed(key, now, true);
                        refused.push((event, e.message));
                    }
                },
            }
        }
        source.confirm(&confirmed).await?;
        for (event, error) in refused {
            let attempts = source.record_failure(event, &error).await?;
            if attempts >= self.config.delivery.max_attempts {
                source.dead_letter(event, &error, attempts, hold).await?;
                // The dead letter holds the aggregate (or, with `skip`, lets it go on): either
                // way there is nothing to wait for once its in-flight events are back.
                self.aggregates.failed(KeyRef::of(event), now, false);
            } else {
                warn!(
                    event_id = %event.id,
                    trace_id = event.trace_id(),
                    aggregate_id = %event.aggregate_id,
                    attempts,
                    error,
                    "broker refused event; will retry its aggregate after a backoff"
                );
                released.push(event);
            }
        }
        source.release(&released);
        for event in events {
            self.aggregates.settle(KeyRef::of(event));
        }
        if let Some((error, count)) = transient {
            warn!(
                error,
                events = count,
                "publish failed for some aggregates; each retries after its own backoff"
            );
        }
        if let Some(error) = unavailable {
            let delay = backoff.next_delay();
            warn!(
                error,
                confirmed = confirmed.len(),
                ?delay,
                "the broker is unavailable; pausing, then sending again (unconfirmed events are sent again in order)"
            );
            let until = now + delay;
            self.paused_until = Some(self.paused_until.map_or(until, |t| t.max(until)));
        } else if !confirmed.is_empty() {
            backoff.reset();
        }
        crate::metrics::set_retrying_aggregates(self.aggregates.blocked_count());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
