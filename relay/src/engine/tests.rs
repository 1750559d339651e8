//! The engine against an in-memory source and a scripted sink: ordering, failure isolation,
//! hold/skip, answers that complete out of order, lost leadership and shutdown, without
//! services. (The same rules are tested against real brokers in `tests/`.) `with_postgres`
//! runs the engine with the real polling source against the tests' Postgres.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::*;
use crate::event::{AggregateKey, OutboxEvent};
use crate::source::Blocked;

mod with_postgres;

/// What the fake broker and the fake table saw, shared with the test.
#[derive(Debug, Default)]
struct World {
    /// Every event the broker took, in the order it took them (ids).
    broker: Vec<i64>,
    /// Confirmations in the order the engine applied them.
    confirmed: Vec<i64>,
    dead_letters: Vec<(i64, u32)>,
    held: HashSet<AggregateKey>,
    /// Sends (calls) so far, and sends made after leadership was lost.
    sends: usize,
    sends_after_lost: usize,
    /// Most sends whose answers were outstanding at one time.
    max_outstanding: usize,
    outstanding: usize,
    /// Aggregates with events in an unanswered send, and sends that added to one.
    aggregates_in_flight: HashMap<String, usize>,
    overtaking_sends: usize,
    /// How long the fake table takes to apply confirmations.
    confirm_delay: Duration,
    /// The table is applying confirmations now, and answers that came in meanwhile.
    confirming: bool,
    answered_while_confirming: usize,
}

struct MemorySource {
    events: Vec<OutboxEvent>,
    done: HashSet<i64>,
    out: HashSet<i64>,
    attempts: HashMap<i64, u32>,
    world: Arc<Mutex<World>>,
    leadership: CancellationToken,
}

impl MemorySource {
    fn new(events: Vec<OutboxEvent>, world: Arc<Mutex<World>>) -> Self {
        Self {
            events,
            done: HashSet::new(),
            out: HashSet::new(),
            attempts: HashMap::new(),
            world,
            leadership: CancellationToken::new(),
        }
    }
}

impl Source for MemorySource {
    async fn open(_: &Config) -> Result<Self, Error> {
        unreachable!("built by the test")
    }

    async fn lead(&mut self, _: &CancellationToken) -> Result<bool, Error> {
        Ok(true)
    }

    fn leadership_lost(&self) -> CancellationToken {
        self.leadership.clone()
    }

    async fn next_batch(
        &mut self,
        max: usize,
        blocked: &dyn Blocked,
        wait_until: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxEvent>, Error> {
        loop {
            let held = self.world.lock().unwrap().held.clone();
            let batch: Vec<OutboxEvent> = self
                .events
                .iter()
                .filter(|e| !self.done.contains(&e.seq) && !self.out.contains(&e.seq))
                .filter(|e| !blocked.contains(e) && !held.contains(&key_of(e)))
                .take(max)
                .cloned()
                .collect();
            if !batch.is_empty() {
                self.out.extend(batch.iter().map(|e| e.seq));
                return Ok(batch);
            }
            match wait_until {
                Some(t) if t > Instant::now() && !shutdown.is_cancelled() => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                _ => return Ok(vec![]),
            }
        }
    }

    async fn confirm(&mut self, events: &[&OutboxEvent]) -> Result<(), Error> {
        let delay = self.world.lock().unwrap().confirm_delay;
        if !delay.is_zero() {
            self.world.lock().unwrap().confirming = true;
            tokio::time::sleep(delay).await;
            self.world.lock().unwrap().confirming = false;
        }
        let mut w = self.world.lock().unwrap();
        for e in events {
            assert!(
                self.out.remove(&e.seq),
                "confirmed an event that was not out"
            );
            assert!(self.done.insert(e.seq), "confirmed twice");
            w.confirmed.push(e.seq);
        }
        Ok(())
    }

    fn release(&mut self, events: &[&OutboxEvent]) {
        for e in events {
            assert!(
                self.out.remove(&e.seq),
                "released an event that was not out"
            );
        }
    }

    async fn record_failure(&mut self, event: &OutboxEvent, _: &str) -> Result<u32, Error> {
        let n = self.attempts.entry(event.seq).or_insert(0);
        *n += 1;
        Ok(*n)
    }

    async fn dead_letter(
        &mut self,
        event: &OutboxEvent,
        _: &str,
        attempts: u32,
        hold: bool,
    ) -> Result<(), Error> {
        self.out.remove(&event.seq);
        self.done.insert(event.seq);
        let mut w = self.world.lock().unwrap();
        w.dead_letters.push((event.seq, attempts));
        if hold {
            w.held.insert(key_of(event));
        }
        Ok(())
    }
}

/// The broker's answer for an event on its n-th send (n from 1).
type Script = dyn Fn(&OutboxEvent, u32) -> Result<(), PublishError> + Send + Sync;

struct ScriptedSink {
    script: Arc<Script>,
    sends: HashMap<i64, u32>,
    world: Arc<Mutex<World>>,
    leadership: CancellationToken,
    /// How long the answers of the k-th send take (k from 0); cycles.
    delays: Vec<Duration>,
}

impl Sink for ScriptedSink {
    async fn send(&mut self, events: &[&OutboxEvent]) -> crate::sink::Confirmations {
        let mut results = Vec::with_capacity(events.len());
        let delay;
        {
            let mut w = self.world.lock().unwrap();
            delay = self.delays[w.sends % self.delays.len()];
            w.sends += 1;
            if self.leadership.is_cancelled() {
                w.sends_after_lost += 1;
            }
            w.outstanding += 1;
            w.max_outstanding = w.max_outstanding.max(w.outstanding);
            if events
                .iter()
                .any(|e| w.aggregates_in_flight.contains_key(&e.aggregate_id))
            {
                w.overtaking_sends += 1;
            }
            for e in events {
                *w.aggregates_in_flight
                    .entry(e.aggregate_id.clone())
                    .or_default() += 1;
            }
            for e in events {
                let n = self.sends.entry(e.seq).or_insert(0);
                *n += 1;
                let r = (self.script)(e, *n);
                if r.is_ok() {
                    w.broker.push(e.seq);
                }
                results.push(r);
            }
        }
        let world = self.world.clone();
        let aggregates: Vec<String> = events.iter().map(|e| e.aggregate_id.clone()).collect();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut w = world.lock().unwrap();
            w.outstanding -= 1;
            if w.confirming {
                w.answered_while_confirming += 1;
            }
            for a in aggregates {
                if let Some(n) = w.aggregates_in_flight.get_mut(&a) {
                    *n -= 1;
                    if *n == 0 {
                        w.aggregates_in_flight.remove(&a);
                    }
                }
            }
            drop(w);
            results
        })
    }

    fn system(&self) -> &'static str {
        "test"
    }
}

fn ev(seq: i64, aggregate: &str) -> OutboxEvent {
    let mut e = OutboxEvent::for_tests("wallet", aggregate, "E");
    e.seq = seq;
    e.id = format!("ev-{seq}");
    e
}

/// `n` events over `aggregates`, round robin.
fn events(n: i64, aggregates: &[&str]) -> Vec<OutboxEvent> {
    (1..=n)
        .map(|i| ev(i, aggregates[(i as usize - 1) % aggregates.len()]))
        .collect()
}

fn config(on_dead_letter: OnDeadLetter, max_attempts: u32) -> Config {
    let mut c = Config::default();
    c.delivery.batch_size = 10;
    c.delivery.max_in_flight = 4;
    c.delivery.max_attempts = max_attempts;
    c.delivery.on_dead_letter = on_dead_letter;
    c.delivery.backoff_initial = Duration::from_millis(5);
    c.delivery.backoff_max = Duration::from_millis(40);
    c
}

struct Run {
    world: Arc<Mutex<World>>,
    result: Result<(), Error>,
    events: Vec<OutboxEvent>,
}

/// Runs the engine until `done(world)` holds (or 10 s pass), then shuts it down.
async fn run(
    config: Config,
    events: Vec<OutboxEvent>,
    script: Arc<Script>,
    delays: Vec<Duration>,
    done: impl Fn(&World) -> bool + Send + 'static,
    during: impl FnOnce(&CancellationToken, &CancellationToken) + Send + 'static,
) -> Run {
    run_in(
        World::default(),
        config,
        events,
        script,
        delays,
        done,
        during,
    )
    .await
}

/// [`run`] in a world set up by the test (e.g. a slow table).
async fn run_in(
    world: World,
    config: Config,
    events: Vec<OutboxEvent>,
    script: Arc<Script>,
    delays: Vec<Duration>,
    done: impl Fn(&World) -> bool + Send + 'static,
    during: impl FnOnce(&CancellationToken, &CancellationToken) + Send + 'static,
) -> Run {
    let world = Arc::new(Mutex::new(world));
    let source = MemorySource::new(events.clone(), world.clone());
    let result = run_source(source, world.clone(), config, script, delays, done, during).await;
    Run {
        world,
        result,
        events,
    }
}

/// Runs the engine over `source` until `done(world)` holds (or 10 s pass), then shuts it down.
async fn run_source<S: Source>(
    mut source: S,
    world: Arc<Mutex<World>>,
    config: Config,
    script: Arc<Script>,
    delays: Vec<Duration>,
    done: impl Fn(&World) -> bool + Send + 'static,
    during: impl FnOnce(&CancellationToken, &CancellationToken) + Send + 'static,
) -> Result<(), Error> {
    let leadership = source.leadership_lost();
    let mut sink = ScriptedSink {
        script,
        sends: HashMap::new(),
        world: world.clone(),
        leadership: leadership.clone(),
        delays,
    };
    let shutdown = CancellationToken::new();
    let watcher = {
        let (world, shutdown, leadership) = (world.clone(), shutdown.clone(), leadership.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut during = Some(during);
            while !done(&world.lock().unwrap()) && started.elapsed() < Duration::from_secs(10) {
                if let Some(f) = during.take() {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    f(&shutdown, &leadership);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            shutdown.cancel();
        })
    };
    let health = Arc::new(Health::default());
    let mut backoff = Backoff::new(&config.delivery);
    let result = tokio::time::timeout(
        Duration::from_secs(15),
        pump(
            &mut source,
            &mut sink,
            &config,
            &shutdown,
            &mut backoff,
            &health,
        ),
    )
    .await
    .expect("the engine stops after shutdown");
    watcher.abort();
    if result.is_ok() {
        // As the daemon does after a clean stop (poll: waits for the last marking).
        source.close().await;
    }
    result
}

fn ok() -> Arc<Script> {
    Arc::new(|_, _| Ok(()))
}

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|&m| Duration::from_millis(m)).collect()
}

impl Run {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    fn aggregate_of(&self, seq: i64) -> String {
        self.events[(seq - 1) as usize].aggregate_id.clone()
    }

    /// Per aggregate, confirmations were applied in outbox order, and the *last* copy of each
    /// event on the broker is in outbox order (what a deduplicating consumer ends up with).
    fn assert_in_order(&self) {
        let w = self.world();
        let mut last_confirmed: HashMap<String, i64> = HashMap::new();
        for &seq in &w.confirmed {
            let agg = self.aggregate_of(seq);
            if let Some(prev) = last_confirmed.insert(agg.clone(), seq) {
                assert!(prev < seq, "{agg}: {seq} confirmed after {prev}");
            }
        }
        let mut last_copy: HashMap<i64, usize> = HashMap::new();
        for (pos, &seq) in w.broker.iter().enumerate() {
            last_copy.insert(seq, pos);
        }
        let mut by_agg: HashMap<String, Vec<(usize, i64)>> = HashMap::new();
        for &seq in &w.confirmed {
            by_agg
                .entry(self.aggregate_of(seq))
                .or_default()
                .push((last_copy[&seq], seq));
        }
        for (agg, mut copies) in by_agg {
            copies.sort();
            let seqs: Vec<i64> = copies.iter().map(|c| c.1).collect();
            let mut sorted = seqs.clone();
            sorted.sort();
            assert_eq!(
                seqs, sorted,
                "{agg}: last copies on the broker out of order"
            );
        }
    }
}

#[tokio::test]
async fn batches_overlap_and_every_event_is_confirmed_in_order_per_aggregate() {
    let names: Vec<String> = (0..40).map(|i| format!("agg-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let evs = events(400, &names);
    let run = run(
        config(OnDeadLetter::Hold, 3),
        evs,
        ok(),
        ms(&[4, 1, 2]),
        |w| w.confirmed.len() == 400,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    let w = run.world();
    assert_eq!(w.confirmed.len(), 400);
    assert!(
        w.max_outstanding > 1,
        "batches were never in flight together"
    );
    assert!(
        w.max_outstanding <= 4,
        "more than max_in_flight batches in flight"
    );
    assert_eq!(
        w.overtaking_sends, 0,
        "an aggregate was in two sends at once"
    );
    assert_eq!(
        w.broker.len(),
        400,
        "no event sent twice when nothing fails"
    );
    drop(w);
    run.assert_in_order();
}

#[tokio::test]
async fn answers_completing_out_of_order_are_applied_in_source_order() {
    // The first send of every four answers last.
    let run = run(
        config(OnDeadLetter::Hold, 3),
        events(80, &["one"]),
        ok(),
        ms(&[30, 1, 1, 1]),
        |w| w.confirmed.len() == 80,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    let w = run.world();
    assert_eq!(w.confirmed, (1..=80).collect::<Vec<_>>());
    assert_eq!(
        w.overtaking_sends, 0,
        "one aggregate: one batch in flight at a time"
    );
}

#[tokio::test]
async fn answers_are_taken_as_they_arrive_while_the_engine_waits_on_the_table() {
    // Confirming to the table takes 40 ms, the broker answers in 2: the answers of the other
    // flights must come in (and be timed, their spans ended) during that wait, not after it.
    let world = World {
        confirm_delay: Duration::from_millis(40),
        ..World::default()
    };
    // Every event its own aggregate, so four batches are in flight at once.
    let names: Vec<String> = (0..400).map(|i| format!("agg-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let run = run_in(
        world,
        config(OnDeadLetter::Hold, 3),
        events(400, &names),
        ok(),
        ms(&[2]),
        |w| w.confirmed.len() == 400,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    assert_eq!(w.confirmed.len(), 400);
    assert!(
        w.answered_while_confirming > 0,
        "no answer was taken while the engine confirmed to the table: {} sends",
        w.sends
    );
}

#[tokio::test]
async fn a_transiently_failing_aggregate_retries_alone_while_the_others_flow() {
    // Every event of `bad` is nacked on its first three sends.
    let script: Arc<Script> = Arc::new(|e, n| {
        if e.aggregate_id == "bad" && n <= 3 {
            Err(PublishError::transient("nacked"))
        } else {
            Ok(())
        }
    });
    let run = run(
        config(OnDeadLetter::Hold, 3),
        events(200, &["bad", "a", "b", "c"]),
        script,
        ms(&[1]),
        |w| w.confirmed.len() == 200,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    assert!(
        w.dead_letters.is_empty(),
        "transient failures count no attempt"
    );
    // The healthy aggregates were done long before `bad` was.
    let last_healthy = w
        .confirmed
        .iter()
        .rposition(|&s| run.aggregate_of(s) != "bad")
        .unwrap();
    let last_bad = w
        .confirmed
        .iter()
        .rposition(|&s| run.aggregate_of(s) == "bad")
        .unwrap();
    assert!(last_healthy < last_bad);
}

#[tokio::test]
async fn hold_confirms_nothing_behind_a_dead_letter_and_sends_nothing_ahead_of_it_again() {
    // Event 9 (aggregate `p`) is refused for good.
    let script: Arc<Script> = Arc::new(|e, _| {
        if e.seq == 9 {
            Err(PublishError::permanent("unroutable"))
        } else {
            Ok(())
        }
    });
    let evs = events(60, &["p", "q", "r", "s"]);
    let run = run(
        config(OnDeadLetter::Hold, 2),
        evs,
        script,
        ms(&[2]),
        // Everything but p's events from 9 on.
        |w| w.confirmed.len() == 60 - 13 && !w.dead_letters.is_empty(),
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    assert_eq!(w.dead_letters, vec![(9, 2)]);
    for &s in &w.confirmed {
        assert!(
            !(run.aggregate_of(s) == "p" && s > 9),
            "{s} confirmed behind the dead letter"
        );
    }
    // Sent behind the failure before it was known: at most once, and never after the dead
    // letter's second (last) send.
    assert!(!w.broker.contains(&9), "9 was refused every time");
    // Its retry went alone: what was behind it reached the broker at most once.
    for seq in (13..=57).step_by(4) {
        let copies = w.broker.iter().filter(|&&s| s == seq).count();
        assert!(
            copies <= 1,
            "{seq} sent {copies} times behind the poison event"
        );
    }
    assert_eq!(w.confirmed.len(), 47);
}

#[tokio::test]
async fn skip_lets_an_aggregate_go_on_after_its_dead_letter() {
    let script: Arc<Script> = Arc::new(|e, _| {
        if e.seq == 5 {
            Err(PublishError::permanent("too large"))
        } else {
            Ok(())
        }
    });
    let run = run(
        config(OnDeadLetter::Skip, 1),
        events(40, &["x", "y"]),
        script,
        ms(&[1]),
        |w| w.confirmed.len() == 39,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    assert_eq!(w.dead_letters, vec![(5, 1)]);
    assert_eq!(w.confirmed.len(), 39);
}

#[tokio::test]
async fn an_unavailable_broker_pauses_sending_instead_of_spinning() {
    // Everything fails as unavailable on its first two sends.
    let script: Arc<Script> = Arc::new(|_, n| {
        if n <= 2 {
            Err(PublishError::unavailable("connection lost"))
        } else {
            Ok(())
        }
    });
    let run = run(
        config(OnDeadLetter::Hold, 3),
        events(50, &["a", "b", "c"]),
        script,
        ms(&[1]),
        |w| w.confirmed.len() == 50,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    // 5 batches of 10, each sent three times at most, plus re-sends of released tails.
    assert!(w.sends < 40, "{} sends: no pause between attempts", w.sends);
}

#[tokio::test]
async fn an_instance_that_lost_leadership_sends_nothing_more() {
    let run = run(
        config(OnDeadLetter::Hold, 3),
        events(2000, &["a", "b"]),
        ok(),
        ms(&[5]),
        |_| false,
        |_, leadership| leadership.cancel(),
    )
    .await;
    assert!(
        matches!(&run.result, Err(e) if e.is_transient()),
        "lost leadership ends the session: {:?}",
        run.result.as_ref().err()
    );
    let w = run.world();
    assert_eq!(w.sends_after_lost, 0);
    assert!(w.confirmed.len() < 2000);
}

#[tokio::test]
async fn shutdown_mid_flight_applies_the_answers_of_what_was_sent() {
    let run = run(
        config(OnDeadLetter::Hold, 3),
        events(2000, &["a", "b", "c"]),
        ok(),
        ms(&[20]),
        |_| false,
        |shutdown, _| shutdown.cancel(),
    )
    .await;
    assert!(run.result.is_ok());
    let w = run.world();
    assert!(!w.confirmed.is_empty() && w.confirmed.len() < 2000);
    // Everything the broker took was confirmed: nothing left out when stopping.
    assert_eq!(w.broker.len(), w.confirmed.len());
    assert_eq!(w.outstanding, 0);
}

#[tokio::test]
async fn a_poison_events_retry_goes_alone_so_what_is_behind_it_is_sent_at_most_once() {
    // Like the RabbitMQ test: A1, poison, A3 and five events of B in one batch.
    let mut evs = vec![ev(1, "A"), ev(2, "A"), ev(3, "A")];
    evs.extend((4..=8).map(|s| ev(s, "B")));
    let script: Arc<Script> = Arc::new(|e, _| {
        if e.seq == 2 {
            Err(PublishError::permanent("unroutable"))
        } else {
            Ok(())
        }
    });
    let run = run(
        config(OnDeadLetter::Hold, 2),
        evs,
        script,
        ms(&[1]),
        |w| w.confirmed.len() == 6 && !w.dead_letters.is_empty(),
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    let w = run.world();
    assert_eq!(w.dead_letters, vec![(2, 2)]);
    assert_eq!(
        w.broker.iter().filter(|&&s| s == 3).count(),
        1,
        "{:?}",
        w.broker
    );
}

#[tokio::test]
async fn events_the_broker_took_behind_a_failed_one_are_not_confirmed_but_sent_again_behind_it() {
    // The first event fails once; the broker takes the rest of its batch.
    let script: Arc<Script> = Arc::new(|e, n| {
        if e.seq == 1 && n == 1 {
            Err(PublishError::transient("nacked"))
        } else {
            Ok(())
        }
    });
    let run = run(
        config(OnDeadLetter::Hold, 3),
        events(30, &["A"]),
        script,
        ms(&[1]),
        |w| w.confirmed.len() == 30,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    assert_eq!(w.confirmed, (1..=30).collect::<Vec<_>>());
    // 2..10 reached the broker ahead of 1 and again behind it.
    for seq in 2..=10 {
        assert_eq!(w.broker.iter().filter(|&&s| s == seq).count(), 2, "{seq}");
    }
}

#[tokio::test]
async fn an_invalid_event_behind_a_valid_one_of_its_batch_is_dead_lettered_behind_it() {
    // x: 1 valid, 3 invalid, 5 valid (y in between). The invalid one waits for 1's answer,
    // then becomes a dead letter, and 5 follows. It used to block x while 1 was in flight, so
    // 1's confirmation was thrown away and the same batch was read again, forever.
    let mut evs = events(6, &["x", "y"]);
    evs[2].defect = Some("payload is not valid JSON".into());
    let run = run(
        config(OnDeadLetter::Skip, 3),
        evs,
        ok(),
        ms(&[1]),
        |w| w.confirmed.len() == 5,
        |_, _| {},
    )
    .await;
    assert!(run.result.is_ok());
    run.assert_in_order();
    let w = run.world();
    assert_eq!(w.dead_letters, vec![(3, 1)]);
    assert_eq!(w.confirmed.len(), 5, "confirmed: {:?}", w.confirmed);
    let copies_of_1 = w.broker.iter().filter(|&&s| s == 1).count();
    assert_eq!(copies_of_1, 1, "broker: {:?}", w.broker);
}
