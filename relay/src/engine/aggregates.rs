//! Per-aggregate delivery state: what is in flight, and which aggregates wait out a failure.
//!
//! The rule this module keeps: once an event of an aggregate failed, no later event of that
//! aggregate is confirmed, and none is sent again, until every event of the aggregate that was
//! already in flight has come back (and is released to be read again) and the aggregate's own
//! backoff has passed. So a re-send always starts at the failed event and goes out in order,
//! and only this aggregate waits: the rest of the outbox keeps its rate.
//!
//! After a failure the aggregate is *probed*: only its first event (the one that failed) is
//! sent, alone, and the rest follows once that one is confirmed. So a poison event that fails
//! again and again drags nothing behind it on its retries, and a dead letter's later events
//! reach the broker at most once, in flight with its first attempt, before the failure was
//! known.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::DeliveryConfig;
use crate::event::OutboxEvent;
use crate::source::Blocked;

pub use crate::event::{AggregateKey, KeyRef, key_of};

#[derive(Debug, Default)]
pub struct State {
    /// Events of the aggregate sent and not yet answered.
    in_flight: usize,
    /// Set when an event failed: nothing of the aggregate is confirmed or sent until cleared.
    retry_at: Option<Instant>,
    /// Consecutive failures since the last confirmed event: the aggregate's own backoff.
    streak: Option<backon::ExponentialBackoff>,
    /// After a failure, only one event is in flight until it is answered.
    probing: bool,
}

/// What the engine knows of each aggregate with events in flight or a failure to wait out.
/// Aggregates with neither are not kept, so the map stays as small as the in-flight window.
#[derive(Debug)]
pub struct Aggregates {
    states: hashbrown::HashMap<AggregateKey, State>,
    backoff: ExponentialBuilder,
}

impl Aggregates {
    pub fn new(config: &DeliveryConfig) -> Self {
        Self {
            states: hashbrown::HashMap::new(),
            backoff: ExponentialBuilder::default()
                .with_min_delay(config.backoff_initial)
                .with_max_delay(config.backoff_max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
        }
    }

    /// `event` is being sent.
    pub fn sent(&mut self, key: KeyRef<'_>) {
        self.state(key).in_flight += 1;
    }

    fn state(&mut self, key: KeyRef<'_>) -> &mut State {
        if !self.states.contains_key(&key) {
            self.states.insert(key.to_key(), State::default());
        }
        self.states.get_mut(&key).expect("inserted above")
    }

    /// Whether events of the aggregate are still in flight.
    pub fn in_flight(&self, key: KeyRef<'_>) -> bool {
        self.states.get(&key).is_some_and(|s| s.in_flight > 0)
    }

    /// Whether the aggregate waits out a failure (its answers are not confirmed).
    pub fn is_blocked(&self, key: KeyRef<'_>) -> bool {
        self.states.get(&key).is_some_and(|s| s.retry_at.is_some())
    }

    /// An answer for one of the aggregate's in-flight events came back.
    pub fn answered(&mut self, key: KeyRef<'_>) {
        if let Some(s) = self.states.get_mut(&key) {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.probing = false;
            }
        }
    }

    /// Whether the aggregate failed before and its next event must go alone (see module docs).
    pub fn needs_probe(&self, key: KeyRef<'_>) -> bool {
        self.states
            .get(&key)
            .is_some_and(|s| s.streak.is_some() && s.retry_at.is_none())
    }

    /// The aggregate's next event goes alone; nothing else of it is read until it is answered.
    pub fn start_probe(&mut self, key: KeyRef<'_>) {
        if let Some(s) = self.states.get_mut(&key) {
            s.probing = true;
        }
    }

    /// Whether any aggregate is in a failure streak (so batches need screening for probes).
    pub fn any_retrying(&self) -> bool {
        self.states.values().any(|s| s.streak.is_some())
    }

    /// An event of the aggregate was confirmed: its failure streak is over.
    pub fn succeeded(&mut self, key: KeyRef<'_>) {
        if let Some(s) = self.states.get_mut(&key) {
            s.streak = None;
        }
        self.forget_if_idle(key);
    }

    /// An event of the aggregate failed: block it for its next backoff delay (`None`: until
    /// what it has in flight is back, with no delay — e.g. after a dead letter). Returns the
    /// delay.
    pub fn failed(&mut self, key: KeyRef<'_>, now: Instant, backoff: bool) -> Duration {
        let builder = self.backoff;
        let s = self.state(key);
        let delay = if backoff {
            s.streak
                .get_or_insert_with(|| builder.build())
                .next()
                .unwrap_or(Duration::from_secs(1))
        } else {
            s.streak = None;
            Duration::ZERO
        };
        // A later failure of the same round never shortens the wait.
        let until = now + delay;
        s.retry_at = Some(s.retry_at.map_or(until, |t| t.max(until)));
        delay
    }

    /// Clears the blocks that are due and have nothing in flight; returns how many.
    pub fn unblock_due(&mut self, now: Instant) -> usize {
        let mut n = 0;
        self.states.retain(|_, s| {
            if s.in_flight == 0 && s.retry_at.is_some_and(|t| t <= now) {
                s.retry_at = None;
                n += 1;
            }
            s.in_flight > 0 || s.retry_at.is_some() || s.streak.is_some()
        });
        n
    }

    /// Aggregates the next batch leaves out: those waiting out a failure, and those with events
    /// in flight (an aggregate is in one batch at a time, so a later batch can never reach the
    /// broker ahead of an earlier one that fails).
    pub fn blocked(&self) -> BlockedView<'_> {
        BlockedView(&self.states)
    }

    /// How many aggregates wait out a failure.
    pub fn blocked_count(&self) -> usize {
        self.states
            .values()
            .filter(|s| s.retry_at.is_some())
            .count()
    }

    /// When the next block may clear (if its events are back by then).
    pub fn next_retry(&self) -> Option<Instant> {
        self.states.values().filter_map(|s| s.retry_at).min()
    }

    fn forget_if_idle(&mut self, key: KeyRef<'_>) {
        if let Some(s) = self.states.get(&key)
            && s.in_flight == 0
            && s.retry_at.is_none()
            && s.streak.is_none()
        {
            self.states.remove(&key);
        }
    }

    /// Drops an aggregate's bookkeeping after it was answered, when nothing is left of it.
    pub fn settle(&mut self, key: KeyRef<'_>) {
        self.forget_if_idle(key);
    }
}

/// The aggregates a read leaves out, seen through the engine's bookkeeping (no copy per read).
#[derive(Clone, Copy)]
pub struct BlockedView<'a>(&'a hashbrown::HashMap<AggregateKey, State>);

impl State {
    fn blocks_reads(&self) -> bool {
        self.retry_at.is_some() || self.probing || self.in_flight > 0
    }
}

impl Blocked for BlockedView<'_> {
    fn contains(&self, event: &OutboxEvent) -> bool {
        self.0
            .get(&KeyRef::of(event))
            .is_some_and(State::blocks_reads)
    }

    fn keys(&self) -> Box<dyn Iterator<Item = &AggregateKey> + Send + '_> {
        Box::new(
            self.0
                .iter()
                .filter(|(_, s)| s.blocks_reads())
                .map(|(k, _)| k),
        )
    }

    fn waiting_keys(&self) -> Box<dyn Iterator<Item = &AggregateKey> + Send + '_> {
        Box::new(
            self.0
                .iter()
                .filter(|(_, s)| s.retry_at.is_some() || s.probing)
                .map(|(k, _)| k),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DeliveryConfig {
        DeliveryConfig {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..DeliveryConfig::default()
        }
    }

    fn k(id: &str) -> KeyRef<'_> {
        KeyRef("wallet", id)
    }

    #[test]
    fn a_failed_aggregate_stays_blocked_until_its_in_flight_events_are_back() {
        let mut a = Aggregates::new(&config());
        let t0 = Instant::now();
        a.sent(k("a"));
        a.sent(k("a"));
        a.answered(k("a"));
        a.failed(k("a"), t0, false);
        assert!(a.is_blocked(k("a")));
        // Due at once, but one event is still in flight: stays blocked.
        assert_eq!(a.unblock_due(t0 + Duration::from_secs(5)), 0);
        assert!(
            a.blocked()
                .waiting_keys()
                .any(|key| KeyRef::from(key) == k("a"))
        );
        a.answered(k("a"));
        assert_eq!(a.unblock_due(t0 + Duration::from_secs(5)), 1);
        assert!(!a.is_blocked(k("a")));
    }

    #[test]
    fn each_aggregate_has_its_own_growing_backoff_that_a_success_resets() {
        let mut a = Aggregates::new(&config());
        let t0 = Instant::now();
        let first = a.failed(k("a"), t0, true);
        let mut last = first;
        for _ in 0..6 {
            a.unblock_due(t0 + Duration::from_secs(60));
            last = a.failed(k("a"), t0, true);
        }
        assert!(last > first, "{last:?} > {first:?}");
        assert!(last <= Duration::from_secs(2));
        // Another aggregate starts from the beginning.
        assert!(a.failed(k("b"), t0, true) < Duration::from_millis(250));
        // Success ends the streak; the next failure starts small again.
        a.unblock_due(t0 + Duration::from_secs(60));
        a.sent(k("a"));
        a.answered(k("a"));
        a.succeeded(k("a"));
        assert!(a.failed(k("a"), t0, true) < Duration::from_millis(250));
    }

    #[test]
    fn idle_aggregates_are_forgotten() {
        let mut a = Aggregates::new(&config());
        a.sent(k("a"));
        a.answered(k("a"));
        a.succeeded(k("a"));
        assert!(a.states.is_empty());
        assert_eq!(a.next_retry(), None);
    }
}
