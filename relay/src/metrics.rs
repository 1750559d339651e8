//! Prometheus metrics (served on `/metrics` by [`crate::http`]).
//!
//! Names follow Prometheus conventions: `_total` counters, base units (seconds, bytes).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{
    Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, FailureKind, PublishError};

pub const PUBLISHED: &str = "outbox_relay_events_published_total";
pub const FAILURES: &str = "outbox_relay_publish_failures_total";
pub const DEAD_LETTERED: &str = "outbox_relay_dead_letters_total";
pub const DEAD_LETTERS: &str = "outbox_relay_dead_letters";
pub const HELD_AGGREGATES: &str = "outbox_relay_held_aggregates";
pub const PENDING: &str = "outbox_relay_pending_events";
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
pub const BATCH_SIZE: &str = "outbox_relay_batch_size";
pub const WAL_RETAINED: &str = "outbox_relay_wal_retained_bytes";
pub const WAL_LAG: &str = "outbox_relay_wal_confirmed_lag_bytes";
pub const ACTIVE: &str = "outbox_relay_active";
pub const DATABASE_UP: &str = "outbox_relay_database_up";
pub const BROKER_UP: &str = "outbox_relay_broker_up";
pub const PRODUCER_RENEWED: &str = "outbox_relay_kafka_producer_renewals_total";
pub const SENT_BEHIND_FAILURE: &str = "outbox_relay_sent_behind_failure_total";
pub const RETRYING_AGGREGATES: &str = "outbox_relay_retrying_aggregates";
pub const WAL_STALLED: &str = "outbox_relay_wal_stalled";
pub const RETENTION_DELETED: &str = "outbox_relay_retention_deleted_total";

/// What stalls the log-tailing stream, for `/readyz` (see `source::wal::stall`).
static WAL_STALL: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Records (or with `None` clears) the stream's stall: the gauge and `/readyz`'s detail.
pub fn set_wal_stall(stall: Option<String>) {
    metrics::gauge!(WAL_STALLED).set(if stall.is_some() { 1.0 } else { 0.0 });
    *WAL_STALL.write().unwrap_or_else(|e| e.into_inner()) = stall;
}

/// The stream's stall, if any.
pub fn wal_stall() -> Option<String> {
    WAL_STALL.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether a standby of `DATABASE_URL` holds a synced copy of the failover slot, and what
/// each holds (see `source::wal::housekeeping`), for `/readyz`.
static SLOT_STANDBYS: std::sync::RwLock<Option<(bool, String)>> = std::sync::RwLock::new(None);

pub fn set_slot_standbys(standbys: Option<(bool, String)>) {
    *SLOT_STANDBYS.write().unwrap_or_else(|e| e.into_inner()) = standbys;
}

pub fn slot_standbys() -> Option<(bool, String)> {
    SLOT_STANDBYS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The broker node the sink is connected to (RabbitMQ: `host:port` of the node of
/// `RELAY_AMQP_URL`'s list in use), for `/readyz` and `status`; and how often it changed, so
/// the engine can notice a change per batch with one atomic load instead of a lock and a copy.
static BROKER_NODE: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);
static BROKER_NODE_CHANGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn set_broker_node(node: Option<String>) {
    *BROKER_NODE.write().unwrap_or_else(|e| e.into_inner()) = node;
    BROKER_NODE_CHANGES.fetch_add(1, std::sync::atomic::Ordering::Release);
}

pub fn broker_node() -> Option<String> {
    BROKER_NODE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Counts calls of [`set_broker_node`]: a different value means the node may have changed.
pub fn broker_node_changes() -> u64 {
    BROKER_NODE_CHANGES.load(std::sync::atomic::Ordering::Acquire)
}

/// Bounds of the commit → ack histogram, in seconds. Dense from 10 ms to 500 ms, where the
/// latency targets lie: a quantile is interpolated inside its bucket, so with 100–250 ms as one
/// bucket a p99 of "215 ms" could have been anything in it. 23 buckets per `system` label.
const COMMIT_TO_ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the global recorder; call once, before anything records.
pub fn install() -> Result<PrometheusHandle, Error> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(COMMIT_TO_ACK.into()), COMMIT_TO_ACK_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_SIZE.into()),
                &[
                    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ],
            )
        })
        .map_err(|e| Error::Setup(format!("cannot set up metrics: {e}")))?
        .install_recorder()
        .map_err(|e| Error::Setup(format!("cannot install the metrics recorder: {e}")))?;
    describe_counter!(PUBLISHED, "Events confirmed by the broker, by destination");
    describe_counter!(FAILURES, "Publish attempts that failed, by system and kind");
    describe_counter!(DEAD_LETTERED, "Events moved to the dead-letter table");
    describe_gauge!(DEAD_LETTERS, "Rows in the dead-letter table");
    describe_gauge!(HELD_AGGREGATES, "Aggregates held back by a dead letter");
    describe_gauge!(PENDING, "Events not yet published (poll mode)");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        "Age of the oldest unpublished event (poll mode)"
    );
    describe_histogram!(
        COMMIT_TO_ACK,
        "From the event's created_at to the broker's confirmation"
    );
    describe_histogram!(BATCH_SIZE, "Events per batch read from the source");
    describe_gauge!(WAL_RETAINED, "WAL the replication slot retains (wal mode)");
    describe_gauge!(
        WAL_LAG,
        "WAL between the server's position and the slot's confirmed one (wal mode)"
    );
    describe_gauge!(
        ACTIVE,
        "1 when this instance is the active relay, 0 on standby"
    );
    describe_gauge!(DATABASE_UP, "1 when the last database check succeeded");
    describe_gauge!(BROKER_UP, "1 when the last broker check succeeded");
    describe_counter!(
        PRODUCER_RENEWED,
        "Kafka producers replaced because the broker fenced or failed the previous one"
    );
    describe_counter!(
        SENT_BEHIND_FAILURE,
        "Events the broker took while an earlier event of their aggregate had failed; not confirmed, sent again behind it"
    );
    describe_gauge!(
        WAL_STALLED,
        "1 while the log-tailing stream stalls: connected, the server's WAL moving, nothing sent to the relay"
    );
    describe_counter!(
        RETENTION_DELETED,
        "Outbox rows deleted past retention by the daemon's cleanup"
    );
    describe_gauge!(
        RETRYING_AGGREGATES,
        "Aggregates waiting out their own backoff after a failed publish"
    );
    Ok(handle)
}

/// Folds the histograms' recorded samples into their buckets every second. The recorder keeps
/// every sample until then (or until `/metrics` is rendered), so without this a relay nobody
/// scrapes would hold 8 bytes more for every event it publishes, for ever.
pub fn spawn_upkeep(handle: &PrometheusHandle) {
    let handle = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// The broker's answers to one send, counted as they come and added to the labelled counters
/// when the tally is dropped: one registry lookup per destination, not one per event.
pub struct PublishTally {
    system: &'static str,
    published: HashMap<String, u64>,
    failed: [u64; 3],
    commit_to_ack: Option<Histogram>,
}

impl PublishTally {
    /// `system` is `kafka` or `rabbitmq`.
    pub fn new(system: &'static str) -> Self {
        Self {
            system,
            published: HashMap::new(),
            failed: [0; 3],
            commit_to_ack: None,
        }
    }

    /// Counts the answer for one event sent to `destination`, the `destination` label: the
    /// exchange (RabbitMQ) or the topic's bounded label (Kafka,
    /// [`Template::metric_label`](crate::template::Template::metric_label)). It must come
    /// from a bounded set: every distinct value is a time series kept for the process's life.
    pub fn record(
        &mut self,
        destination: &str,
        created_at_ms: Option<i64>,
        result: &Result<(), PublishError>,
    ) {
        match result {
            Ok(()) => {
                match self.published.get_mut(destination) {
                    Some(n) => *n += 1,
                    None => {
                        self.published.insert(destination.to_string(), 1);
                    }
                }
                if let Some(created) = created_at_ms {
                    let now_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(created);
                    let system = self.system;
                    self.commit_to_ack
                        .get_or_insert_with(|| histogram!(COMMIT_TO_ACK, "system" => system))
                        .record((now_ms - created).max(0) as f64 / 1000.0);
                }
            }
            Err(e) => {
                self.failed[match e.kind {
                    FailureKind::Transient => 0,
                    FailureKind::Unavailable => 1,
                    FailureKind::Permanent => 2,
                }] += 1
            }
        }
    }
}

impl Drop for PublishTally {
    fn drop(&mut self) {
        let system = self.system;
        for (destination, n) in self.published.drain() {
            counter!(PUBLISHED, "system" => system, "destination" => destination).increment(n);
        }
        for (kind, n) in ["transient", "unavailable", "permanent"]
            .iter()
            .zip(self.failed)
        {
            if n > 0 {
                counter!(FAILURES, "system" => system, "kind" => *kind).increment(n);
            }
        }
    }
}

pub fn record_batch(size: usize) {
    histogram!(BATCH_SIZE).record(size as f64);
}

pub fn record_dead_letter() {
    counter!(DEAD_LETTERED).increment(1);
}

pub fn record_producer_renewed() {
    counter!(PRODUCER_RENEWED).increment(1);
}

pub fn record_sent_behind_failure() {
    counter!(SENT_BEHIND_FAILURE).increment(1);
}

pub fn set_retrying_aggregates(n: usize) {
    gauge!(RETRYING_AGGREGATES).set(n as f64);
}

pub fn set_active(active: bool) {
    gauge!(ACTIVE).set(if active { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Grafana dashboard only queries metrics the relay exports.
    #[test]
    fn dashboard_queries_only_exported_metrics() {
        let dashboard = include_str!("../../dashboards/outbox-relay.json");
        let known = [
            PUBLISHED,
            FAILURES,
            DEAD_LETTERED,
            DEAD_LETTERS,
            HELD_AGGREGATES,
            PENDING,
            OLDEST_PENDING_AGE,
            COMMIT_TO_ACK,
            BATCH_SIZE,
            WAL_RETAINED,
            WAL_LAG,
            ACTIVE,
            DATABASE_UP,
            BROKER_UP,
            PRODUCER_RENEWED,
        ];
        let mut used = 0;
        for (i, _) in dashboard.match_indices("outbox_relay_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                known.contains(&base),
                "dashboard uses unknown metric {name}"
            );
            used += 1;
        }
        assert!(used >= 10);
    }
}
