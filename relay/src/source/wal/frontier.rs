//! The log-tailing source's confirmed position: how far Postgres may forget the WAL.
//!
//! Postgres streams whole transactions in commit order (`Begin`, the rows, `Commit` with the
//! transaction's end LSN). The engine confirms events in any order, several batches at once;
//! the frontier turns that into the one position that is safe to report as flushed:
//!
//! > the end LSN of the newest committed transaction whose events, and the events of every
//! > transaction before it, are all settled (confirmed by the broker or dead-lettered).
//!
//! Why that is safe: after a restart Postgres streams every transaction that commits after the
//! reported position ([logical decoding docs]), so a transaction with an unsettled event is
//! always streamed again; one that is wholly settled may be skipped, and nothing is lost. A
//! position is never reported inside a transaction, so a restart never starts half-way through
//! one. Keepalives carry the server's WAL end; when nothing is open or unsettled, everything up
//! to it is other tables' changes, and confirming it keeps an idle outbox from pinning WAL.
//!
//! Invariants (checked by the property tests below, over arbitrary settle orders): the
//! position only moves forward; it never passes a transaction with an unsettled event or one
//! whose `Commit` has not arrived; once everything is settled it is the last commit's end.
//!
//! [logical decoding docs]: https://www.postgresql.org/docs/15/logicaldecoding-explanation.html

use std::collections::VecDeque;

use hashbrown::HashMap;

pub use pgwire_replication::Lsn;

/// The source's event position (its `seq`).
pub type Seq = i64;

/// A transaction whose events are being delivered.
#[derive(Debug)]
struct Txn {
    id: u64,
    /// Commit time, ms since the Unix epoch (saved with the progress: a repair starts there).
    commit_ms: i64,
    /// Known at `Commit` (or at once for a non-transactional message).
    end_lsn: Option<Lsn>,
    /// Events of the transaction not yet settled.
    outstanding: usize,
}

/// The confirmed position and what holds it back. See the module docs.
#[derive(Debug)]
pub struct Frontier {
    txns: VecDeque<Txn>,
    next_txn: u64,
    open: Option<u64>,
    event_txn: HashMap<Seq, u64>,
    confirmed: Lsn,
    confirmed_commit_ms: i64,
}

/// A new confirmed position: report it to Postgres and save it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub lsn: Lsn,
    pub commit_ms: i64,
}

impl Frontier {
    /// Starts at `start` (where streaming starts), last confirmed commit at `commit_ms`.
    pub fn new(start: Lsn, commit_ms: i64) -> Self {
        Self {
            txns: VecDeque::new(),
            next_txn: 0,
            open: None,
            event_txn: HashMap::new(),
            confirmed: start,
            confirmed_commit_ms: commit_ms,
        }
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    pub fn confirmed_commit_ms(&self) -> i64 {
        self.confirmed_commit_ms
    }

    /// Overrides the commit time of the confirmed position (read from saved progress).
    pub fn set_confirmed_commit_ms(&mut self, commit_ms: i64) {
        self.confirmed_commit_ms = commit_ms;
    }

    /// `Begin`: events until the next `commit` belong to this transaction.
    pub fn begin(&mut self, commit_ms: i64) {
        let id = self.push(None, commit_ms);
        self.open = Some(id);
    }

    /// An event of the open transaction; `false` when no transaction is open (a protocol
    /// error: the event is not tracked).
    pub fn add_to_open(&mut self, seq: Seq) -> bool {
        match self.open {
            Some(id) => {
                self.add(seq, id);
                true
            }
            None => false,
        }
    }

    /// An event outside any transaction (a non-transactional emitted message), ending at `lsn`.
    pub fn add_standalone(&mut self, seq: Seq, lsn: Lsn, commit_ms: i64) {
        let id = self.push(Some(lsn), commit_ms);
        self.add(seq, id);
    }

    /// `Commit` of the open transaction, ending at `end_lsn`.
    pub fn commit(&mut self, end_lsn: Lsn) -> Option<Confirmed> {
        if let Some(id) = self.open.take()
            && let Some(t) = self.txn_mut(id)
        {
            t.end_lsn = Some(end_lsn);
        }
        self.advance()
    }

    /// The event left flight for good (confirmed or dead-lettered).
    pub fn settle(&mut self, seq: Seq) -> Option<Confirmed> {
        let id = self.event_txn.remove(&seq)?;
        if let Some(t) = self.txn_mut(id) {
            t.outstanding = t.outstanding.saturating_sub(1);
        }
        self.advance()
    }

    /// Only the open transaction's `Commit` holds the position back: every event read so far
    /// is settled, so reading on to that `Commit` moves the position.
    pub fn waits_for_commit(&self) -> bool {
        self.open.is_some() && self.event_txn.is_empty()
    }

    /// Events read and not yet settled.
    pub fn unsettled(&self) -> usize {
        self.event_txn.len()
    }

    /// Nothing open and nothing unsettled.
    pub fn is_idle(&self) -> bool {
        self.txns.is_empty() && self.open.is_none()
    }

    /// A keepalive: when idle, everything up to the server's WAL end is done.
    pub fn keepalive(&mut self, wal_end: Lsn, server_ms: i64) -> Option<Confirmed> {
        if self.is_idle() {
            self.move_to(wal_end, server_ms)
        } else {
            None
        }
    }

    /// Moves to `lsn` if that is ahead (a position known to be done by other means).
    pub fn move_to(&mut self, lsn: Lsn, commit_ms: i64) -> Option<Confirmed> {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.confirmed_commit_ms = commit_ms;
            Some(Confirmed { lsn, commit_ms })
        } else {
            None
        }
    }

    fn push(&mut self, end_lsn: Option<Lsn>, commit_ms: i64) -> u64 {
        let id = self.next_txn;
        self.next_txn += 1;
        self.txns.push_back(Txn {
            id,
            commit_ms,
            end_lsn,
            outstanding: 0,
        });
        id
    }

    fn add(&mut self, seq: Seq, id: u64) {
        if let Some(t) = self.txn_mut(id) {
            t.outstanding += 1;
            self.event_txn.insert(seq, id);
        }
    }

    fn txn_mut(&mut self, id: u64) -> Option<&mut Txn> {
        let front = self.txns.front()?.id;
        self.txns
            .get_mut(usize::try_from(id.checked_sub(front)?).ok()?)
    }

    fn advance(&mut self) -> Option<Confirmed> {
        let mut newest = None;
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(lsn) if front.outstanding == 0 => {
                    newest = Some((lsn, front.commit_ms));
                    self.txns.pop_front();
                }
                _ => break,
            }
        }
        let (lsn, commit_ms) = newest?;
        self.move_to(lsn, commit_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_position_waits_for_every_event_of_a_transaction_and_of_those_before() {
        let mut f = Frontier::new(Lsn(100), 0);
        f.begin(1);
        assert!(f.add_to_open(1));
        assert!(f.add_to_open(2));
        assert_eq!(f.commit(Lsn(200)), None);
        f.begin(2);
        assert!(f.add_to_open(3));
        assert_eq!(f.commit(Lsn(300)), None);
        // The second transaction is done first: nothing moves.
        assert_eq!(f.settle(3), None);
        assert_eq!(f.settle(1), None);
        assert_eq!(
            f.settle(2),
            Some(Confirmed {
                lsn: Lsn(300),
                commit_ms: 2
            })
        );
        assert!(f.is_idle());
        assert_eq!(f.keepalive(Lsn(400), 9).map(|c| c.lsn), Some(Lsn(400)));
    }

    #[test]
    fn an_uncommitted_transaction_holds_the_position_even_when_its_events_are_settled() {
        let mut f = Frontier::new(Lsn(100), 0);
        f.begin(1);
        f.add_to_open(1);
        assert_eq!(f.settle(1), None);
        assert_eq!(f.keepalive(Lsn(500), 0), None);
        assert_eq!(f.commit(Lsn(200)).map(|c| c.lsn), Some(Lsn(200)));
    }

    #[test]
    fn unknown_or_repeated_settles_change_nothing() {
        let mut f = Frontier::new(Lsn(100), 0);
        f.begin(1);
        f.add_to_open(1);
        f.add_to_open(2);
        f.commit(Lsn(200));
        assert_eq!(f.settle(99), None);
        assert_eq!(f.settle(1), None);
        assert_eq!(f.settle(1), None);
        assert_eq!(f.confirmed(), Lsn(100));
        assert_eq!(f.settle(2).map(|c| c.lsn), Some(Lsn(200)));
        assert!(!f.add_to_open(3), "no transaction is open");
    }

    /// A stream of transactions (each with 0..4 events, or a standalone message), then every
    /// event settled in an arbitrary order, with the stream's remaining transactions arriving
    /// in between.
    #[derive(Debug, Clone)]
    enum Step {
        Txn(usize),
        Standalone,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![4 => (0usize..4).prop_map(Step::Txn), 1 => Just(Step::Standalone)],
            1..25,
        )
    }

    proptest! {
        #[test]
        fn the_position_is_the_end_of_the_longest_wholly_settled_prefix(
            steps in steps(),
            order in any::<prop::sample::Index>(),
            interleave in prop::collection::vec(any::<bool>(), 200),
        ) {
            let mut f = Frontier::new(Lsn(1_000), 0);
            // (end lsn, seqs) per transaction, in commit order.
            let mut txns: Vec<(Lsn, Vec<Seq>)> = Vec::new();
            let mut next_seq = 1;
            let mut lsn = 1_000u64;
            let mut pending_steps = steps.into_iter();
            let mut unsettled: Vec<Seq> = Vec::new();
            let mut settled = std::collections::HashSet::new();
            let mut last = f.confirmed();
            let mut coin = interleave.into_iter().cycle();
            let mut pick = order.index(usize::MAX);
            loop {
                let stream_more = coin.next().unwrap_or(true) || unsettled.is_empty();
                if stream_more && let Some(step) = pending_steps.next() {
                    lsn += 100;
                    match step {
                        Step::Txn(n) => {
                            f.begin(lsn as i64);
                            let mut seqs = Vec::new();
                            for _ in 0..n {
                                prop_assert!(f.add_to_open(next_seq));
                                seqs.push(next_seq);
                                unsettled.push(next_seq);
                                next_seq += 1;
                            }
                            f.commit(Lsn(lsn));
                            txns.push((Lsn(lsn), seqs));
                        }
                        Step::Standalone => {
                            f.add_standalone(next_seq, Lsn(lsn), lsn as i64);
                            txns.push((Lsn(lsn), vec![next_seq]));
                            unsettled.push(next_seq);
                            next_seq += 1;
                        }
                    }
                } else if !unsettled.is_empty() {
                    pick = pick.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let seq = unsettled.swap_remove((pick >> 33) % unsettled.len());
                    settled.insert(seq);
                    f.settle(seq);
                } else {
                    break;
                }
                // The expected position: the end of the longest prefix of transactions whose
                // events are all settled.
                let expected = txns
                    .iter()
                    .take_while(|(_, seqs)| seqs.iter().all(|s| settled.contains(s)))
                    .last()
                    .map_or(Lsn(1_000), |(end, _)| *end);
                prop_assert_eq!(f.confirmed(), expected);
                prop_assert!(f.confirmed() >= last, "the position went back");
                last = f.confirmed();
            }
            prop_assert!(f.is_idle());
            prop_assert_eq!(f.confirmed(), txns.last().map_or(Lsn(1_000), |(end, _)| *end));
        }
    }
}
