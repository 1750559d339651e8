//! Percentiles of measured samples, and quantiles estimated from Prometheus histogram buckets.

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples_ms`; all zero when there are none.
    pub fn of(mut samples_ms: Vec<f64>) -> Self {
        if samples_ms.is_empty() {
            return Self::default();
        }
        samples_ms.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let n = samples_ms.len();
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples_ms[i]
        };
        Self {
            samples: samples_ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            p999_ms: rank(0.999),
            max_ms: samples_ms[samples_ms.len() - 1],
        }
    }
}

/// Cumulative bucket counts of one Prometheus histogram: `(upper bound, count)`, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// Parses `<name>_bucket{...le="x"} n` lines whose labels contain `label` (e.g.
    /// `system="kafka"`) out of a Prometheus text exposition.
    pub fn parse(exposition: &str, name: &str, label: &str) -> Self {
        let prefix = format!("{name}_bucket{{");
        let mut out = Vec::new();
        for line in exposition.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            if !label.is_empty() && !labels.contains(label) {
                continue;
            }
            let Some(le) = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("le=\""))
                .map(|l| l.trim_end_matches('"'))
            else {
                continue;
            };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(b) => b,
                    Err(_) => continue,
                }
            };
            if let Ok(count) = value.trim().parse::<f64>() {
                out.push((bound, count));
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(out)
    }

    /// `self - before`, bucket by bucket: the observations made between two scrapes.
    pub fn since(&self, before: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(le, n)| {
                    let old = before
                        .0
                        .iter()
                        .find(|(b, _)| *b == le)
                        .map(|(_, n)| *n)
                        .unwrap_or(0.0);
                    (le, (n - old).max(0.0))
                })
                .collect(),
        )
    }

    pub fn count(&self) -> f64 {
        self.0.last().map(|(_, n)| *n).unwrap_or(0.0)
    }

    /// The q-quantile in seconds, interpolated linearly inside its bucket the way Prometheus'
    /// `histogram_quantile` does; the highest finite bound when it falls into `+Inf`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for &(le, n) in &self.0 {
            if n >= rank {
                if le.is_infinite() {
                    return Some(lower_bound);
                }
                let in_bucket = n - lower_count;
                if in_bucket <= 0.0 {
                    return Some(le);
                }
                return Some(lower_bound + (le - lower_bound) * (rank - lower_count) / in_bucket);
            }
            lower_bound = le;
            lower_count = n;
        }
        Some(lower_bound)
    }

    /// Upper bound of the highest bucket that received an observation (the max is at most this).
    pub fn max_bound(&self) -> Option<f64> {
        let mut prev = 0.0;
        let mut out = None;
        for &(le, n) in &self.0 {
            if n > prev {
                out = Some(le);
            }
            prev = n;
        }
        out
    }
}

/// Sum and count of a Prometheus histogram or summary (`<name>_sum`, `<name>_count`).
pub fn sum_and_count(exposition: &str, name: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| {
        exposition.lines().find_map(|line| {
            let rest = line.strip_prefix(&format!("{name}{suffix}"))?;
            let rest = rest.strip_prefix(' ').or_else(|| {
                rest.strip_prefix('{')
                    .and_then(|r| r.split_once("} ").map(|x| x.1))
            })?;
            rest.trim().parse::<f64>().ok()
        })
    };
    Some((value("_sum")?, value("_count")?))
}

/// Sum over every series of counter or gauge `name` (all label sets), `None` when the exposition
/// has no sample of it (e.g. a gauge not set yet).
pub fn total(exposition: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(v) = rest.strip_prefix(' ') {
            v
        } else if let Some(labelled) = rest.strip_prefix('{') {
            match labelled.split_once("} ") {
                Some((_, v)) => v,
                None => continue,
            }
        } else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=1000).map(f64::from).collect());
        assert_eq!(p.samples, 1000);
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.p999_ms, 999.0);
        assert_eq!(p.max_ms, 1000.0);
        assert_eq!(Percentiles::of(vec![]).samples, 0);
    }

    const EXPOSITION: &str = "\
# TYPE outbox_relay_commit_to_ack_seconds histogram
outbox_relay_commit_to_ack_seconds_bucket{system=\"kafka\",le=\"0.005\"} 10
outbox_relay_commit_to_ack_seconds_bucket{system=\"kafka\",le=\"0.01\"} 90
outbox_relay_commit_to_ack_seconds_bucket{system=\"kafka\",le=\"0.025\"} 100
outbox_relay_commit_to_ack_seconds_bucket{system=\"kafka\",le=\"+Inf\"} 100
outbox_relay_commit_to_ack_seconds_sum{system=\"kafka\"} 0.8
outbox_relay_commit_to_ack_seconds_count{system=\"kafka\"} 100
outbox_relay_batch_size_sum 5000
outbox_relay_batch_size_count 10
";

    #[test]
    fn histogram_quantiles_interpolate_inside_the_bucket() {
        let b = Buckets::parse(
            EXPOSITION,
            "outbox_relay_commit_to_ack_seconds",
            "system=\"kafka\"",
        );
        assert_eq!(b.0.len(), 4);
        assert_eq!(b.count(), 100.0);
        // rank 50 lies 40/80 of the way through (0.005, 0.01]
        assert!((b.quantile(0.5).unwrap() - 0.0075).abs() < 1e-9);
        assert!((b.quantile(0.99).unwrap() - (0.01 + 0.015 * 0.9)).abs() < 1e-9);
        assert_eq!(b.max_bound(), Some(0.025));
        let none = Buckets::parse(EXPOSITION, "outbox_relay_commit_to_ack_seconds", "rabbitmq");
        assert_eq!(none.quantile(0.5), None);
        let diff = b.since(&Buckets(vec![(0.005, 10.0), (0.01, 50.0)]));
        assert_eq!(diff.0[0].1, 0.0);
        assert_eq!(diff.0[1].1, 40.0);
    }

    #[test]
    fn totals_add_every_label_set() {
        let e = "outbox_relay_publish_failures_total{system=\"kafka\",kind=\"permanent\"} 3\n\
                 outbox_relay_publish_failures_total{system=\"kafka\",kind=\"transient\"} 4\n\
                 outbox_relay_retrying_aggregates 1\n";
        assert_eq!(total(e, "outbox_relay_publish_failures_total"), Some(7.0));
        assert_eq!(total(e, "outbox_relay_retrying_aggregates"), Some(1.0));
        assert_eq!(total(e, "outbox_relay_retrying"), None);
        assert_eq!(total(EXPOSITION, "outbox_relay_batch_size"), None);
    }

    #[test]
    fn sum_and_count_with_and_without_labels() {
        assert_eq!(
            sum_and_count(EXPOSITION, "outbox_relay_batch_size"),
            Some((5000.0, 10.0))
        );
        assert_eq!(
            sum_and_count(EXPOSITION, "outbox_relay_commit_to_ack_seconds"),
            Some((0.8, 100.0))
        );
    }
}
