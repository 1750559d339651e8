//! The daemon's loop: source → sink → confirm.
//!
//! ```text
//!  connect ─► lead (standby until the lock is ours) ─► next_batch ─► publish ─► settle
//!     ▲                                                    ▲                      │
//!     └──────── transient Postgres error (backoff) ────────┴──── confirm / retry ◄┘
//! ```
//!
//! At least once: an event is confirmed to the source only after the broker confirmed it.
//!
//! Order per aggregate: a batch is published in waves; wave k holds the k-th event of each
//! aggregate in the batch, and an aggregate's next event is only sent once its previous one is
//! confirmed. So an event never reaches the broker ahead of an earlier event of its aggregate
//! that failed (a dead letter really holds its aggregate back), while the many aggregates of a
//! batch are still in flight together. Once an event fails, its aggregate's later events in the
//! batch stay pending and are read again behind it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DeliveryConfig, OnDeadLetter, SourceKind};
use crate::error::{Error, FailureKind, PublishError};
use crate::event::OutboxEvent;
use crate::http::Health;
use crate::sink::{AnySink, Sink};
use crate::source::Source;
use crate::source::poll::PollSource;
use crate::source::wal::WalSource;

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

/// What to do with each event of a batch once the broker has answered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Indexes of events to confirm.
    pub confirmed: Vec<usize>,
    /// Indexes of events the broker refused permanently, with the error.
    pub refused: Vec<(usize, String)>,
    /// Events left pending because of a transient failure (theirs or an earlier one of their
    /// aggregate); they are read and sent again.
    pub retried: usize,
    /// First transient error, for the log.
    pub transient_error: Option<String>,
}

/// Decides, per event, from the broker's answers. Only the prefix of each aggregate up to its
/// first failure is confirmed.
pub fn settle(events: &[&OutboxEvent], results: &[Result<(), PublishError>]) -> Settlement {
    let mut out = Settlement::default();
    let mut blocked: HashSet<(&str, &str)> = HashSet::new();
    for (i, (event, result)) in events.iter().zip(results).enumerate() {
        let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        if blocked.contains(&key) {
            out.retried += 1;
            continue;
        }
        match result {
            Ok(()) => out.confirmed.push(i),
            Err(e) => {
                blocked.insert(key);
                match e.kind {
                    FailureKind::Permanent => out.refused.push((i, e.message.clone())),
                    FailureKind::Transient => {
                        out.retried += 1;
                        out.transient_error.get_or_insert_with(|| e.message.clone());
                    }
                }
            }
        }
    }
    out
}

fn same_aggregate(a: &OutboxEvent, b: &OutboxEvent) -> bool {
    a.aggregate_type == b.aggregate_type && a.aggregate_id == b.aggregate_id
}

/// Splits a batch into waves: wave k holds the k-th event of every aggregate, in batch order.
pub fn waves(events: &[&OutboxEvent]) -> Vec<Vec<usize>> {
    let mut occurrence: HashMap<(&str, &str), usize> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let k = occurrence
            .entry((event.aggregate_type.as_str(), event.aggregate_id.as_str()))
            .or_insert(0);
        if waves.len() <= *k {
            waves.push(Vec::new());
        }
        waves[*k].push(i);
        *k += 1;
    }
    waves
}

/// Publishes wave after wave; an aggregate whose event failed sends nothing more in this batch.
pub(crate) async fn publish_in_waves<K: Sink>(
    sink: &mut K,
    events: &[&OutboxEvent],
) -> Vec<Result<(), PublishError>> {
    let mut results: Vec<Result<(), PublishError>> = events
        .iter()
        .map(|_| {
            Err(PublishError::transient(
                "not sent: behind a failed event of its aggregate",
            ))
        })
        .collect();
    let mut failed: HashSet<(&str, &str)> = HashSet::new();
    for wave in waves(events) {
        let sendable: Vec<usize> = wave
            .into_iter()
            .filter(|&i| {
                !failed.contains(&(
                    events[i].aggregate_type.as_str(),
                    events[i].aggregate_id.as_str(),
                ))
            })
            .collect();
        if sendable.is_empty() {
            continue;
        }
        let batch: Vec<&OutboxEvent> = sendable.iter().map(|&i| events[i]).collect();
        let outcome = sink.publish(&batch).await;
        for (&i, result) in sendable.iter().zip(outcome) {
            if result.is_err() {
                failed.insert((
                    events[i].aggregate_type.as_str(),
                    events[i].aggregate_id.as_str(),
                ));
            }
            results[i] = result;
        }
    }
    results
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

/// One session: become the active relay, then move batches until shutdown or a source error.
async fn pump<S: Source>(
    source: &mut S,
    sink: &mut AnySink,
    config: &Config,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    health: &Arc<Health>,
) -> Result<(), Error> {
    if !source.lead(shutdown).await? {
        return Ok(());
    }
    health.became_active(source.leadership_lost());
    let hold = config.delivery.on_dead_letter == OnDeadLetter::Hold;
    loop {
        let batch = source.next_batch(config.poll.batch_size, shutdown).await?;
        if batch.is_empty() {
            return Ok(()); // shutdown
        }
        crate::metrics::record_batch(batch.len());
        // Rows that cannot become messages are dead-lettered at once (retrying cannot help),
        // and their aggregate's later events wait for the next round, behind the dead letter.
        let mut invalid_aggregates: HashSet<(&str, &str)> = HashSet::new();
        let mut to_send: Vec<&OutboxEvent> = Vec::with_capacity(batch.len());
        for event in &batch {
            let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
            if invalid_aggregates.contains(&key) {
                continue;
            }
            match event.validate() {
                Ok(()) => to_send.push(event),
                // An earlier event of the aggregate is still to be confirmed: dead-letter this
                // one next round, behind it, not before it.
                Err(_) if to_send.iter().any(|e| same_aggregate(e, event)) => {
                    invalid_aggregates.insert(key);
                }
                Err(defect) => {
                    invalid_aggregates.insert(key);
                    source
                        .dead_letter(event, &format!("invalid event: {defect}"), 1, hold)
                        .await?;
                }
            }
        }
        let started = std::time::Instant::now();
        let results = publish_in_waves(sink, &to_send).await;
        tracing::debug!(events = to_send.len(), elapsed = ?started.elapsed(), "published batch");
        let settlement = settle(&to_send, &results);
        let confirmed: Vec<&OutboxEvent> =
            settlement.confirmed.iter().map(|&i| to_send[i]).collect();
        source.confirm(&confirmed).await?;
        for (i, error) in &settlement.refused {
            let event = to_send[*i];
            let attempts = source.record_failure(event, error).await?;
            if attempts >= config.delivery.max_attempts {
                source.dead_letter(event, error, attempts, hold).await?;
            } else {
                warn!(
                    event_id = %event.id,
                    trace_id = event.trace_id(),
                    attempts,
                    error,
                    "broker refused event; will retry"
                );
            }
        }
        if settlement.retried > 0 || !settlement.refused.is_empty() {
            if let Some(error) = &settlement.transient_error {
                warn!(
                    error,
                    confirmed = confirmed.len(),
                    retried = settlement.retried,
                    "publish failed; retrying with backoff"
                );
            }
            if !backoff.wait(shutdown).await {
                return Ok(());
            }
        } else {
            backoff.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(agg: &str, seq: i64) -> OutboxEvent {
        let mut e = OutboxEvent::for_tests("wallet", agg, "E");
        e.seq = seq;
        e
    }

    #[test]
    fn only_the_prefix_before_a_failure_is_confirmed_per_aggregate() {
        let events = [ev("a", 1), ev("b", 2), ev("a", 3), ev("b", 4), ev("a", 5)];
        let refs: Vec<&OutboxEvent> = events.iter().collect();
        let results = vec![
            Ok(()),
            Err(PublishError::transient("down")),
            Ok(()),
            Ok(()), // acked, but behind b's failure: must be sent again, not confirmed
            Err(PublishError::permanent("too large")),
        ];
        let s = settle(&refs, &results);
        assert_eq!(s.confirmed, vec![0, 2]);
        assert_eq!(s.refused, vec![(4, "too large".to_string())]);
        assert_eq!(s.retried, 2);
        assert_eq!(s.transient_error.as_deref(), Some("down"));
    }

    #[test]
    fn events_behind_a_permanent_failure_are_not_confirmed() {
        let events = [ev("a", 1), ev("a", 2)];
        let refs: Vec<&OutboxEvent> = events.iter().collect();
        let s = settle(&refs, &[Err(PublishError::permanent("unroutable")), Ok(())]);
        assert!(s.confirmed.is_empty());
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.retried, 1);
    }

    #[test]
    fn waves_hold_the_kth_event_of_each_aggregate() {
        let events = [
            ev("a", 1),
            ev("b", 2),
            ev("a", 3),
            ev("c", 4),
            ev("a", 5),
            ev("b", 6),
        ];
        let refs: Vec<&OutboxEvent> = events.iter().collect();
        assert_eq!(waves(&refs), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
    }

    #[test]
    fn backoff_grows_and_resets() {
        let mut b = Backoff::new(&DeliveryConfig::default());
        let first = b.next_delay();
        for _ in 0..20 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(late > first);
        assert!(late <= DeliveryConfig::default().backoff_max * 2);
        b.reset();
        assert!(b.next_delay() < late);
    }
}
