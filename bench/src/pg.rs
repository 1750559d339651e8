//! Postgres side of the benchmark: a database per measurement, the writers (backlog, commit-rate
//! ceiling, paced writers for latency) and the two source ceilings (pgoutput decoding of the
//! backlog through `pg_logical_slot_peek_binary_changes`, with the backlog streamed from a copy
//! of the slot to a plain replication client beside it, and a plain SQL claim-and-read loop).
//!
//! Every event is one transaction of one `INSERT`, as a service writes them (except the
//! `one-txn` drain backlog: one transaction for all). Its payload is 512 bytes of JSON (as
//! Postgres prints the `jsonb`), and carries `n`, the event's sequence number within its
//! aggregate, and `t_us`: `clock_timestamp()` in microseconds at insert time, set by the server
//! inside the transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::workload::{self, Workload};

/// Bytes of each event's payload, as the relay sends it (`payload::text`).
pub const PAYLOAD_BYTES: usize = 512;
pub const AGGREGATE_TYPE: &str = "bench";
pub const EVENT_TYPE: &str = "Happened";
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// The relay's default publication name for table `outbox`.
pub const PUBLICATION: &str = "outbox_relay_outbox";

/// The writer's statement: the server adds `t_us` (its clock at insert time) to the payload.
const INSERT_SQL: &str = "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, traceparent) \
     VALUES ($1, 'bench', $2, 'Happened', \
             $3::text::jsonb || jsonb_build_object('t_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint), $4)";

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub fn aggregate_id(a: u64) -> String {
    format!("agg-{a:05}")
}

/// The payload as Postgres prints the `jsonb` (keys by length, `": "` and `", "`), exactly
/// [`PAYLOAD_BYTES`] long once `t_us` (16 digits) is in. With `t_us = None` the field is left
/// for the server to add.
pub fn payload(aggregate: &str, n: u64, t_us: Option<i64>) -> String {
    // {"n": N, "pad": "P", "t_us": T, "aggregate_id": "A"}
    let fixed = 6 + 10 + 11 + 16 + 19 + 2;
    let pad = PAYLOAD_BYTES.saturating_sub(fixed + n.to_string().len() + aggregate.len());
    let pad = "x".repeat(pad);
    match t_us {
        Some(t) => {
            format!(
                r#"{{"n": {n}, "pad": "{pad}", "t_us": {t:016}, "aggregate_id": "{aggregate}"}}"#
            )
        }
        None => format!(r#"{{"n": {n}, "pad": "{pad}", "aggregate_id": "{aggregate}"}}"#),
    }
}

/// `t_us` of a payload, found without parsing the whole JSON.
pub fn payload_t_us(payload: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"t_us\": ";
    let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits: &[u8] = &payload[at..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// `(aggregate number, sequence number in the aggregate)` of a payload: its `aggregate_id`
/// (`agg-NNNNN`) and `n`, found without parsing the whole JSON.
pub fn payload_order(payload: &[u8]) -> Option<(u64, u64)> {
    fn digits_after(payload: &[u8], key: &[u8]) -> Option<u64> {
        let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
        let digits = &payload[at..];
        let end = digits
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(digits.len());
        std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
    }
    let n = digits_after(payload, b"\"n\": ")?;
    let aggregate = digits_after(payload, b"\"aggregate_id\": \"agg-")?;
    Some((aggregate, n))
}

pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}; run scripts/services"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// A database of its own for one measurement; [`BenchDb::drop_now`] removes it and its slots.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl BenchDb {
    pub async fn create(admin_url: &str, run_id: &str, label: &str) -> Result<Self> {
        let name = format!("relay_bench_{run_id}_{label}");
        let admin = connect(admin_url).await?;
        // A repeated phase reuses the name: drop what its failed attempt left behind.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .ok();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => bail!("admin URL {admin_url} has no database part"),
        };
        Ok(Self {
            name,
            url,
            admin_url: admin_url.into(),
        })
    }

    pub async fn client(&self) -> Result<Client> {
        connect(&self.url).await
    }

    /// Drops the database, after terminating whatever still streams from its slots.
    pub async fn drop_now(&self) -> Result<()> {
        let admin = connect(&self.admin_url).await?;
        for _ in 0..50 {
            let done = admin
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{0}' AND active_pid IS NOT NULL; \
                     SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}'",
                    self.name
                ))
                .await;
            if done.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("cannot drop database {}", self.name))
    }
}

/// Drops every database of run `run_id` that is left (a failed phase), with its slots.
pub async fn drop_run_databases(admin_url: &str, run_id: &str) -> Result<()> {
    let admin = connect(admin_url).await?;
    let pattern = format!("relay_bench_{run_id}_%");
    for row in admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .await?
    {
        let name: String = row.get(0);
        BenchDb {
            url: String::new(),
            admin_url: admin_url.into(),
            name,
        }
        .drop_now()
        .await?;
    }
    Ok(())
}

/// Event `i` of a run belongs to aggregate `i % aggregates` and is that aggregate's
/// `i / aggregates`-th event; the writer owning an aggregate writes its events in order.
fn owner(i: u64, aggregates: u64, writers: usize) -> usize {
    ((i % aggregates) % writers as u64) as usize
}

/// Writes events `0..events` spread uniformly over `aggregates` (event `i` → aggregate
/// `i % aggregates`), as [`write_events`] does.
pub async fn write_backlog(
    url: &str,
    events: u64,
    aggregates: u64,
    writers: usize,
) -> Result<Duration> {
    let keys = Workload::Spread.keys(events, aggregates);
    write_events(url, keys, writers, false).await
}

/// Writes one event per entry of `keys` (its aggregate), in order, as fast as Postgres takes
/// them: `writers` connections, each owning the aggregates `a % writers == w` and writing their
/// events with up to 32 single-insert transactions pipelined (in order, so each aggregate's
/// events commit in order). Each payload's `n` is the event's sequence number within its
/// aggregate. With `one_transaction`, one connection writes every event in one transaction
/// instead. `synchronous_commit = off` for speed: the rows and their WAL are the same as with
/// it on, only the wait for the flush is skipped.
pub async fn write_events(
    url: &str,
    keys: Vec<u64>,
    writers: usize,
    one_transaction: bool,
) -> Result<Duration> {
    let seqs = workload::sequences(&keys);
    let writers = if one_transaction { 1 } else { writers };
    let mut owned: Vec<Vec<(u64, u64)>> = vec![Vec::new(); writers];
    for (a, n) in keys.into_iter().zip(seqs) {
        owned[(a % writers as u64) as usize].push((a, n));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for events in owned {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            client.batch_execute("SET synchronous_commit = off").await?;
            let stmt = client.prepare(INSERT_SQL).await?;
            if one_transaction {
                client.batch_execute("BEGIN").await?;
            }
            let (client, stmt) = (&client, &stmt);
            futures::stream::iter(events)
                .map(|(a, n)| async move {
                    let agg = aggregate_id(a);
                    let body = payload(&agg, n, None);
                    client
                        .execute(stmt, &[&Uuid::new_v4(), &agg, &body, &TRACEPARENT])
                        .await
                })
                .buffered(32)
                .try_for_each(|_| async { Ok(()) })
                .await?;
            if one_transaction {
                client.batch_execute("COMMIT").await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("backlog writer panicked")??;
    }
    Ok(started.elapsed())
}

/// The NOTIFY channel of the poll schema's trigger for table `outbox` (the relay's
/// `channel_name`).
pub const CHANNEL: &str = "outbox_relay_public_outbox";

/// Commit-rate ceiling: `writers` connections, each committing one single-insert transaction
/// after another (`synchronous_commit = on`, the default), for `duration`. Events per second.
/// With `listen`, one more session LISTENs on the trigger's channel, as the polling relay does.
pub async fn commit_ceiling(
    url: &str,
    writers: usize,
    duration: Duration,
    listen: bool,
) -> Result<(u64, f64)> {
    // Its connection task reads (and drops) the notifications, like an idle relay would.
    let _listener = if listen {
        let client = connect(url).await?;
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        Some(client)
    } else {
        None
    };
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let stmt = client.prepare(INSERT_SQL).await?;
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let agg = aggregate_id(w as u64);
                let body = payload(&agg, n, None);
                client
                    .execute(&stmt, &[&Uuid::new_v4(), &agg, &body, &TRACEPARENT])
                    .await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.context("commit writer panicked")??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((total, total as f64 / secs))
}

/// What paced writers committed.
#[derive(Debug, Default)]
pub struct Paced {
    /// `(event id, wall-clock µs when COMMIT returned to the writer)`.
    pub committed: Vec<(u128, i64)>,
    pub elapsed: Duration,
    /// The largest delay of a write behind its schedule (writers falling behind the rate).
    pub max_behind: Duration,
}

/// Offers `rate` events/s for `duration` from `writers` connections (one single-insert
/// transaction per event, `synchronous_commit = on`): event `i` is due at `start + i / rate`.
/// Writers that fall behind write as fast as they can and stop at the end of `duration`, so
/// the achieved rate can be lower than the offered one. `first` numbers the events so a later
/// run continues each aggregate's sequence.
pub async fn paced_writers(
    url: &str,
    rate: u64,
    duration: Duration,
    aggregates: u64,
    writers: usize,
    first: u64,
) -> Result<Paced> {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let interval_ns = 1_000_000_000f64 / rate as f64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await?;
            let stmt = client.prepare(INSERT_SQL).await?;
            let mut committed = Vec::new();
            let mut max_behind = Duration::ZERO;
            for i in (0..total).filter(|&i| owner(first + i, aggregates, writers) == w) {
                let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                let now = tokio::time::Instant::now();
                if now >= start + duration {
                    break;
                }
                if due > now {
                    tokio::time::sleep_until(due).await;
                } else {
                    max_behind = max_behind.max(now - due);
                }
                let seq = first + i;
                let agg = aggregate_id(seq % aggregates);
                let body = payload(&agg, seq / aggregates, None);
                let id = Uuid::new_v4();
                client
                    .execute(&stmt, &[&id, &agg, &body, &TRACEPARENT])
                    .await?;
                committed.push((id.as_u128(), now_us()));
            }
            anyhow::Ok((committed, max_behind))
        }));
    }
    let mut out = Paced::default();
    for t in tasks {
        let (committed, behind) = t.await.context("paced writer panicked")??;
        out.committed.extend(committed);
        out.max_behind = out.max_behind.max(behind);
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// Offers `rate` events/s of ONE aggregate (`<aggregate_type>-0`) of `aggregate_type` from one
/// connection (one single-insert transaction each, as [`paced_writers`]) until `stop` is set;
/// returns the events committed. The failing aggregate of the failure-isolation run: its own
/// aggregate type gives it its own topic or routing key.
pub async fn paced_aggregate_writer(
    url: &str,
    aggregate_type: &str,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> Result<u64> {
    let client = connect(url).await?;
    let stmt = client
        .prepare(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, traceparent) \
             VALUES ($1, $2, $3, 'Happened', \
                     $4::text::jsonb || jsonb_build_object('t_us', (extract(epoch from clock_timestamp()) * 1000000)::bigint), $5)",
        )
        .await?;
    let agg = format!("{aggregate_type}-0");
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = tokio::time::Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(start + interval.mul_f64(n as f64)).await;
        let body = payload(&agg, n, None);
        client
            .execute(
                &stmt,
                &[&Uuid::new_v4(), &aggregate_type, &agg, &body, &TRACEPARENT],
            )
            .await?;
        n += 1;
    }
    Ok(n)
}

/// pgoutput decoding of everything the slot holds, by the server alone: rows handed out by
/// `pg_logical_slot_peek_binary_changes` (Begin, Relation, Insert, Commit messages), and the
/// time it took. Peeking does not move the slot, so the relay still gets everything after.
pub async fn peek_ceiling(url: &str, slot: &str) -> Result<(i64, Duration)> {
    let client = connect(url).await?;
    let started = Instant::now();
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2)",
            &[&slot, &PUBLICATION],
        )
        .await
        .context("pg_logical_slot_peek_binary_changes")?
        .get(0);
    Ok((rows, started.elapsed()))
}

/// The backlog streamed to a plain replication client (reported beside the wal source ceiling,
/// not as one): the slot copied (so the relay still
/// gets everything after), then its changes read over the replication protocol with the relay's
/// settings (pgoutput proto 1, text values, the relay's buffer) by a client that only counts
/// the Insert messages, until it has seen `events` of them. This is the walsender's work for the
/// relay (decoding plus sending), which a peek does without the sending. Returns the time.
pub async fn stream_to_plain_client(url: &str, slot: &str, events: u64) -> Result<Duration> {
    let client = connect(url).await?;
    let copy = format!("{slot}_ceiling");
    client
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&slot, &copy],
        )
        .await
        .context("pg_copy_logical_replication_slot")?;
    let measured = stream_slot(url, &copy, events).await;
    drop_slot(&client, &copy).await?;
    measured
}

/// Ends the walsender that still holds `slot` (it may still be writing into a socket its
/// client stopped reading), then drops the slot once Postgres has let go of it.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active: Option<i32> = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .and_then(|row| row.get(0));
        let Some(pid) = active else { break };
        if Instant::now() > deadline {
            bail!("the slot {slot} is still held by walsender {pid}");
        }
        client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .with_context(|| format!("pg_drop_replication_slot({slot})"))?;
    Ok(())
}

/// A replication connection to `slot` with the relay's settings (pgoutput proto 1, text values,
/// the relay's buffer and session options).
pub fn replication_config(url: &str, slot: &str) -> Result<pgwire_replication::ReplicationConfig> {
    let cfg: tokio_postgres::Config = url.parse().context("database url")?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let password = cfg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    Ok(pgwire_replication::ReplicationConfig::new(
        host,
        cfg.get_user().unwrap_or("postgres"),
        password,
        cfg.get_dbname().unwrap_or("postgres"),
        slot,
        PUBLICATION,
    )
    .with_port(cfg.get_ports().first().copied().unwrap_or(5432))
    .with_buffer_size(1024)
    .with_options("-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3"))
}

async fn stream_slot(url: &str, slot: &str, events: u64) -> Result<Duration> {
    use pgwire_replication::{ReplicationClient, ReplicationEvent};
    let config = replication_config(url, slot)?;
    let started = Instant::now();
    let mut repl = ReplicationClient::connect(config)
        .await
        .context("replication connection for the stream to a plain client")?;
    let mut inserts = 0u64;
    while inserts < events {
        let next = tokio::time::timeout(Duration::from_secs(30), repl.recv())
            .await
            .with_context(|| {
                format!("stream to a plain client: nothing for 30 s after {inserts} inserts")
            })?
            .context("stream to a plain client")?;
        match next {
            Some(ReplicationEvent::XLogData { data, .. }) if data.first() == Some(&b'I') => {
                inserts += 1
            }
            Some(_) => {}
            None => bail!(
                "stream to a plain client: the stream ended after {inserts} of {events} inserts"
            ),
        }
    }
    let took = started.elapsed();
    // Not read any further: the caller ends the walsender (a clean stop would wait for the
    // client to drain what the server already sent).
    repl.stop();
    drop(repl);
    Ok(took)
}

/// The columns the poll loops read: those the relay reads, as it decodes them.
const POLL_COLUMNS: &str = "relay_seq, id::text, aggregate_type::text, aggregate_id::text, \
     event_type::text, convert_to(payload::text, 'UTF8'), headers::text, traceparent::text, \
     tracestate::text, (extract(epoch from created_at) * 1000)::bigint";

/// The relay's marking statement.
const POLL_MARK: &str = "UPDATE outbox SET relay_published_at = now() \
     WHERE relay_seq = ANY($1) AND relay_published_at IS NULL";

/// A plain SQL loop that hands the backlog out like the polling publisher, without a broker:
/// read 1,000 unpublished rows in `relay_seq` order (the columns the relay reads), mark them
/// published, repeat until none are left. Returns rows handed out, payload bytes, time.
pub async fn poll_ceiling(url: &str) -> Result<(u64, u64, Duration)> {
    let client = connect(url).await?;
    let fetch = client
        .prepare(&format!(
            "SELECT {POLL_COLUMNS} FROM outbox WHERE relay_published_at IS NULL \
             ORDER BY relay_seq LIMIT 1000"
        ))
        .await?;
    let mark = client.prepare(POLL_MARK).await?;
    let started = Instant::now();
    let (mut rows_out, mut bytes) = (0u64, 0u64);
    loop {
        let rows = client.query(&fetch, &[]).await?;
        if rows.is_empty() {
            break;
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        bytes += rows
            .iter()
            .map(|r| r.get::<_, &[u8]>(5).len() as u64)
            .sum::<u64>();
        rows_out += rows.len() as u64;
        client.execute(&mark, &[&seqs]).await?;
    }
    Ok((rows_out, bytes, started.elapsed()))
}

/// The same work as [`poll_ceiling`] on two connections, split as the relay splits it: one reads
/// the next 1,000 rows while the other marks those read before (at most two batches ahead of the
/// marking). Reported beside the ceiling, not used as one: it reads past a watermark (`relay_seq >
/// last read`), which needs none of the relay's filter for the rows still being marked, and
/// nothing else competes for the cores. Returns rows marked and the time until the last marking.
pub async fn poll_pipelined(url: &str) -> Result<(u64, Duration)> {
    let reader = connect(url).await?;
    let marker = connect(url).await?;
    let fetch = reader
        .prepare(&format!(
            "SELECT {POLL_COLUMNS} FROM outbox WHERE relay_published_at IS NULL AND relay_seq > $1 \
             ORDER BY relay_seq LIMIT 1000"
        ))
        .await?;
    let mark = marker.prepare(POLL_MARK).await?;
    let (batches, mut to_mark) = tokio::sync::mpsc::channel::<Vec<i64>>(2);
    let started = Instant::now();
    let marking = tokio::spawn(async move {
        let mut marked = 0u64;
        while let Some(seqs) = to_mark.recv().await {
            marked += marker.execute(&mark, &[&seqs]).await?;
        }
        anyhow::Ok(marked)
    });
    let mut last = 0i64;
    loop {
        let rows = reader.query(&fetch, &[&last]).await?;
        let Some(row) = rows.last() else { break };
        last = row.get(0);
        let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        if batches.send(seqs).await.is_err() {
            // The marking failed: its error is the one to report.
            break;
        }
    }
    drop(batches);
    let marked = marking
        .await
        .context("the marking task of the pipelined poll loop")??;
    Ok((marked, started.elapsed()))
}

/// Average `payload::text` length of the outbox (a check that events are 512 bytes).
pub async fn average_payload_bytes(client: &Client) -> Result<f64> {
    Ok(client
        .query_one(
            "SELECT coalesce(avg(octet_length(payload::text)), 0)::float8 FROM outbox",
            &[],
        )
        .await?
        .get(0))
}

/// Whether the polling relay has marked every row: one probe of the pending index, not a
/// count (a `count(*)` of a 200,000-row backlog took 17.6 ms, every 100 ms of a drain: Postgres
/// CPU the relay's reads and marks competed with, and the ceiling loop never does).
pub async fn poll_drained(client: &Client) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE relay_published_at IS NULL)",
            &[],
        )
        .await?
        .get(0))
}

pub async fn current_lsn(client: &Client) -> Result<String> {
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// Whether the slot's confirmed position has reached `lsn`.
pub async fn slot_reached(client: &Client, slot: &str, lsn: &str) -> Result<bool> {
    Ok(client
        .query_opt(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await?
        .and_then(|r| r.get::<_, Option<bool>>(0))
        .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_512_bytes_in_jsonb_form() {
        for (agg, n) in [("agg-00000", 0), ("agg-09999", 19), ("agg-00042", 123456)] {
            let full = payload(agg, n, Some(1_712_345_678_901_234));
            assert_eq!(full.len(), PAYLOAD_BYTES, "{full}");
            serde_json::from_str::<serde_json::Value>(&full).unwrap();
            let partial = payload(agg, n, None);
            assert_eq!(partial.len() + 16 + 10, PAYLOAD_BYTES);
            assert_eq!(payload_t_us(full.as_bytes()), Some(1_712_345_678_901_234));
            let a: u64 = agg[4..].parse().unwrap();
            assert_eq!(payload_order(full.as_bytes()), Some((a, n)));
            assert_eq!(payload_order(partial.as_bytes()), Some((a, n)));
        }
    }

    #[test]
    fn aggregates_stay_with_one_writer() {
        for i in 0..1000 {
            assert_eq!(owner(i, 100, 8), owner(i + 100, 100, 8));
        }
    }
}
