//! Key distributions of the drain backlogs (`spread`, `10`, `1`, `zipf`, `one-txn`): which
//! aggregate each event of a backlog belongs to, and whether the backlog is committed event by
//! event or in one transaction.
//!
//! The assignment is deterministic (a fixed-seed SplitMix64 stream for Zipf), so two runs drain
//! the same backlogs.

use anyhow::{Result, bail};

/// Events of the `one-txn` backlog at most (one transaction of 100,000 events, the size of the
/// wal suite's big transaction).
pub const ONE_TXN_MAX_EVENTS: u64 = 100_000;
/// Zipf exponent of the `zipf` workload.
pub const ZIPF_S: f64 = 1.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Uniform over `--aggregates` (event `i` → aggregate `i % aggregates`).
    Spread,
    /// Ten aggregates, round robin.
    Ten,
    /// One aggregate.
    One,
    /// Zipf(s = 1.1) over `--aggregates`: aggregate of rank `k` (from 1) with probability
    /// ∝ `k^-1.1`.
    Zipf,
    /// Uniform over `--aggregates`, the whole backlog (at most [`ONE_TXN_MAX_EVENTS`]) in one
    /// transaction.
    OneTxn,
}

impl Workload {
    pub const NAMES: &'static str = "spread, 10, 1, zipf, one-txn";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "spread" => Workload::Spread,
            "10" => Workload::Ten,
            "1" => Workload::One,
            "zipf" => Workload::Zipf,
            "one-txn" | "one_txn" => Workload::OneTxn,
            other => bail!("unknown workload `{other}`; use {}", Self::NAMES),
        })
    }

    /// The name of `--workloads` and of the report.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Spread => "spread",
            Workload::Ten => "10",
            Workload::One => "1",
            Workload::Zipf => "zipf",
            Workload::OneTxn => "one-txn",
        }
    }

    /// For names of databases, slots, topics: `[a-z0-9_]`.
    pub fn label(self) -> &'static str {
        match self {
            Workload::Spread => "spread",
            Workload::Ten => "agg10",
            Workload::One => "agg1",
            Workload::Zipf => "zipf",
            Workload::OneTxn => "onetxn",
        }
    }

    /// What the report says about it.
    pub fn describe(self, aggregates: u64) -> String {
        match self {
            Workload::Spread => format!("uniform over {aggregates} aggregates"),
            Workload::Ten => "10 aggregates".into(),
            Workload::One => "1 aggregate".into(),
            Workload::Zipf => format!("Zipf(s = {ZIPF_S}) over {aggregates} aggregates"),
            Workload::OneTxn => {
                format!("one transaction, uniform over {aggregates} aggregates")
            }
        }
    }

    /// Few keys, so an engine that serialises per aggregate is slow on them: the `--hot-events`
    /// cap applies.
    pub fn is_hot(self) -> bool {
        matches!(self, Workload::Ten | Workload::One)
    }

    pub fn one_transaction(self) -> bool {
        self == Workload::OneTxn
    }

    /// The aggregate of each event, in write order.
    pub fn keys(self, events: u64, aggregates: u64) -> Vec<u64> {
        match self {
            Workload::Spread | Workload::OneTxn => (0..events).map(|i| i % aggregates).collect(),
            Workload::Ten => (0..events).map(|i| i % 10).collect(),
            Workload::One => vec![0; events as usize],
            Workload::Zipf => {
                let zipf = Zipf::new(aggregates, ZIPF_S);
                let mut rng = SplitMix64(0x5eed_0f0b_0ec7);
                (0..events).map(|_| zipf.sample(rng.next_f64())).collect()
            }
        }
    }
}

/// Each event's sequence number within its aggregate (0, 1, 2, … in write order).
pub fn sequences(keys: &[u64]) -> Vec<u64> {
    let mut next: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    keys.iter()
        .map(|k| {
            let n = next.entry(*k).or_default();
            *n += 1;
            *n - 1
        })
        .collect()
}

/// Zipf over `0..n` by inverse CDF: aggregate `k` (rank `k + 1`) with probability
/// `(k + 1)^-s / H(n, s)`.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf }
    }

    /// The aggregate for a uniform `u` in `[0, 1)`.
    pub fn sample(&self, u: f64) -> u64 {
        let i = self.cdf.partition_point(|&c| c <= u);
        i.min(self.cdf.len() - 1) as u64
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, good enough to draw keys.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Per-aggregate order of what a consumer read, in the order it read it: a first delivery
/// whose sequence number is lower than one already read for its aggregate went backwards.
#[derive(Debug, Default)]
pub struct OrderCheck {
    highest: std::collections::HashMap<u64, u64>,
    /// First deliveries checked (those that carried aggregate and sequence).
    pub checked: usize,
    pub violations: usize,
}

impl OrderCheck {
    pub fn first_delivery(&mut self, aggregate: u64, seq: u64) {
        self.checked += 1;
        match self.highest.get_mut(&aggregate) {
            Some(h) if seq < *h => self.violations += 1,
            Some(h) => *h = seq,
            None => {
                self.highest.insert(aggregate, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for w in [
            Workload::Spread,
            Workload::Ten,
            Workload::One,
            Workload::Zipf,
            Workload::OneTxn,
        ] {
            assert_eq!(Workload::parse(w.name()).unwrap(), w);
        }
        assert!(Workload::parse("2").is_err());
    }

    #[test]
    fn zipf_is_skewed_like_zipf() {
        let keys = Workload::Zipf.keys(200_000, 10_000);
        let mut counts = vec![0u64; 10_000];
        for k in &keys {
            counts[*k as usize] += 1;
        }
        // H(10000, 1.1) ≈ 6.62: the top aggregate gets ≈ 15 %, the second ≈ 7 %.
        let top = counts[0] as f64 / keys.len() as f64;
        let second = counts[1] as f64 / keys.len() as f64;
        assert!((0.14..0.162).contains(&top), "{top}");
        assert!((0.065..0.076).contains(&second), "{second}");
        assert!(counts.iter().filter(|c| **c > 0).count() > 3_000);
        assert_eq!(keys, Workload::Zipf.keys(200_000, 10_000), "deterministic");
    }

    #[test]
    fn sequences_count_per_aggregate() {
        assert_eq!(sequences(&[0, 1, 0, 0, 2, 1]), vec![0, 0, 1, 2, 0, 1]);
        let keys = Workload::Spread.keys(30, 10);
        assert_eq!(sequences(&keys)[25], 2);
    }

    #[test]
    fn order_check_counts_backward_steps() {
        let mut o = OrderCheck::default();
        for (a, s) in [(1, 0), (2, 0), (1, 2), (1, 1), (2, 1), (1, 3)] {
            o.first_delivery(a, s);
        }
        assert_eq!((o.checked, o.violations), (6, 1));
    }
}
