//! Phase 3b, the latency floor of wal → Kafka: the latency phase's paced writers and consumer,
//! with the relay replaced by the least any log-tailing relay has to do. A replication client
//! (the relay's settings, a slot of its own) hands every Insert straight to a producer (the
//! relay's producer settings): key = aggregate id, header `id`, the payload as it came. No
//! engine, order tracking, confirmation to Postgres or saved progress. What it reaches at a rate
//! bounds what any relay reaches on this machine in the same minutes (the host's noise moves
//! both), so the report puts the relay's latency beside it. It runs inside the bench's process,
//! after the relay of the same combination has stopped, and measures commit→ack from the same
//! start as the relay's histogram (which starts at the row's `created_at`, its transaction's
//! start): the insert's `clock_timestamp()`, carried in the payload, to the delivery report.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::ctx::Ctx;
use crate::kafka;
use crate::latency::PacedRun;
use crate::pg::{self, BenchDb, now_us};
use crate::relay::Setup;
use crate::report::{self, AckQuantiles, Latency};
use crate::stats::Percentiles;

/// Columns of the default outbox table, in the order of `migrations/0001_outbox.sql`.
const ID: usize = 0;
const AGGREGATE_ID: usize = 2;
const PAYLOAD: usize = 4;

/// The floor at each offered rate, on a topic of its own (created now, deleted after; the
/// relay's runs also share one topic across the rates, and tansu's fetches slow down as a topic
/// fills), after the relay of `setup` has stopped.
pub(crate) async fn floor(
    ctx: &Ctx,
    db: &BenchDb,
    setup: &Setup,
    rates: &[u64],
    written: &mut u64,
) -> Result<Vec<Latency>> {
    let setup = Setup {
        destination: format!("{}_floor", setup.destination),
        ..setup.clone()
    };
    ctx.prepare_broker(&setup).await?;
    let measured = async {
        let mut out = Vec::new();
        for &rate in rates {
            ctx.log(format!(
                "latency floor {}: {rate} events/s for {} s, no relay",
                setup.combo.title(),
                ctx.settings.latency_secs
            ));
            let run = PacedRun {
                rate,
                secs: ctx.settings.latency_secs,
                aggregates: ctx.settings.aggregates,
            };
            out.push(floor_run(ctx, db, &setup, run, written).await?);
        }
        Ok(out)
    }
    .await;
    ctx.cleanup_broker(&setup).await;
    measured
}

/// One paced run through the floor pipeline on a slot of its own, created now (so it starts
/// at the current end of the WAL) and dropped after.
async fn floor_run(
    ctx: &Ctx,
    db: &BenchDb,
    setup: &Setup,
    run: PacedRun,
    written: &mut u64,
) -> Result<Latency> {
    let slot = format!("{}_floor_{}", setup.slot, run.rate);
    let client = db.client().await?;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .with_context(|| format!("cannot create the floor's slot {slot}"))?;
    let pipeline = Pipeline::start(&db.url, &slot, &ctx.args.kafka_brokers, &setup.topic()).await;
    let measured = match pipeline {
        Ok(p) => {
            let l = ctx.paced_run(db, setup, None, None, run, written).await;
            let acks = p.stop().await;
            l.and_then(|l| Ok((l, acks?)))
        }
        Err(e) => Err(e),
    };
    pg::drop_slot(&client, &slot).await?;
    let (mut l, acks) = measured?;
    l.combo = report::floor_title(&l.combo);
    l.floor = true;
    let p = Percentiles::of(acks);
    l.commit_to_ack = (p.samples > 0).then_some(AckQuantiles {
        samples: p.samples as u64,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        p999_ms: p.p999_ms,
        max_bucket_ms: Some(p.max_ms),
    });
    Ok(l)
}

/// The replication client and producer on a thread and runtime of their own (as in a process
/// of their own, the bench's writers and consumer do not delay them), until [`Pipeline::stop`].
struct Pipeline {
    stop: Arc<Notify>,
    thread: std::thread::JoinHandle<Result<Vec<f64>>>,
}

impl Pipeline {
    /// Connected, streaming and with a producer that has delivered one warm-up message (producer
    /// id and topic metadata fetched before the clock starts).
    async fn start(url: &str, slot: &str, brokers: &str, topic: &str) -> Result<Self> {
        let (url, slot, brokers, topic) = (
            url.to_string(),
            slot.to_string(),
            brokers.to_string(),
            topic.to_string(),
        );
        let stop = Arc::new(Notify::new());
        let (ready_tx, ready) = oneshot::channel();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-floor".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("the floor's runtime")?;
                runtime.block_on(async move {
                    let connected = connect(&url, &slot, &brokers, &topic).await;
                    let (repl, producer) = match connected {
                        Ok(c) => {
                            let _ = ready_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(Vec::new());
                        }
                    };
                    forward(repl, producer, topic, stopped).await
                })
            })
            .context("cannot start the floor's thread")?;
        ready
            .await
            .map_err(|_| anyhow!("the floor's thread ended before it was ready"))??;
        Ok(Self { stop, thread })
    }

    /// Stops reading, waits for the deliveries still pending; commit→ack samples in ms.
    async fn stop(self) -> Result<Vec<f64>> {
        self.stop.notify_one();
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow!("the floor's thread panicked"))?
    }
}

async fn connect(
    url: &str,
    slot: &str,
    brokers: &str,
    topic: &str,
) -> Result<(ReplicationClient, FutureProducer)> {
    let producer = kafka::warm_producer(brokers, topic).await?;
    let repl = ReplicationClient::connect(pg::replication_config(url, slot)?)
        .await
        .context("the floor's replication connection")?;
    Ok((repl, producer))
}

/// Every Insert of the stream produced as it arrives; the delivery reports are awaited by a
/// task beside it, in whatever order they come.
async fn forward(
    mut repl: ReplicationClient,
    producer: FutureProducer,
    topic: String,
    stop: Arc<Notify>,
) -> Result<Vec<f64>> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        let mut samples = Vec::new();
        let mut failed = 0u64;
        let mut record = |inserted_us: i64, ok: bool| {
            if ok {
                samples.push((now_us() - inserted_us) as f64 / 1000.0);
            } else {
                failed += 1;
            }
        };
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some((inserted_us, d)) => pending.push(async move {
                        let r: Result<_, _> = d.await;
                        (inserted_us, matches!(r, Ok(Ok(_))))
                    }),
                    None => break,
                },
                Some((inserted_us, ok)) = pending.next(), if !pending.is_empty() => record(inserted_us, ok),
            }
        }
        while let Some((inserted_us, ok)) = pending.next().await {
            record(inserted_us, ok);
        }
        if failed > 0 {
            bail!("the floor's producer failed {failed} deliveries");
        }
        Ok(samples)
    });
    let streamed: Result<()> = async {
        loop {
            let event = tokio::select! {
                _ = stop.notified() => return Ok(()),
                event = repl.recv() => event.context("the floor's replication stream")?,
            };
            match event {
                Some(ReplicationEvent::XLogData { data, .. }) if data.first() == Some(&b'I') => {
                    let columns = insert_columns(&data)?;
                    let text = |i: usize| -> Result<&[u8]> {
                        columns
                            .get(i)
                            .copied()
                            .flatten()
                            .ok_or_else(|| anyhow!("Insert without column {i}"))
                    };
                    let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                        key: "id",
                        value: Some(text(ID)?),
                    });
                    let payload = text(PAYLOAD)?;
                    let inserted_us = pg::payload_t_us(payload)
                        .ok_or_else(|| anyhow!("a bench payload without its insert time"))?;
                    let mut rec = FutureRecord::to(&topic)
                        .key(text(AGGREGATE_ID)?)
                        .payload(payload)
                        .headers(headers);
                    let delivery = loop {
                        match producer.send_result(rec) {
                            Ok(d) => break d,
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                r,
                            )) => {
                                rec = r;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err((e, _)) => bail!("the floor's produce failed: {e}"),
                        }
                    };
                    tx.send((inserted_us, delivery))
                        .map_err(|_| anyhow!("the floor's delivery task ended"))?;
                }
                Some(_) => {}
                None => bail!("the floor's replication stream ended"),
            }
        }
    }
    .await;
    repl.stop();
    drop(tx);
    let samples = acks.await.context("the floor's delivery task panicked")?;
    streamed?;
    samples
}

/// The column values of a pgoutput Insert (proto 1): `I`, relation id, `N`, column count, then
/// per column `n` (null), `u` (unchanged) or `t`/`b` with a length and the bytes.
fn insert_columns(data: &[u8]) -> Result<Vec<Option<&[u8]>>> {
    let short = || anyhow!("truncated pgoutput Insert ({} bytes)", data.len());
    let tuple = data
        .get(5..)
        .filter(|t| t.first() == Some(&b'N'))
        .ok_or_else(short)?;
    let n = u16::from_be_bytes(tuple.get(1..3).ok_or_else(short)?.try_into()?) as usize;
    let mut rest = &tuple[3..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (&kind, after) = rest.split_first().ok_or_else(short)?;
        rest = after;
        match kind {
            b't' | b'b' => {
                let len = i32::from_be_bytes(rest.get(..4).ok_or_else(short)?.try_into()?);
                let len = usize::try_from(len).map_err(|_| short())?;
                out.push(Some(rest.get(4..4 + len).ok_or_else(short)?));
                rest = &rest[4 + len..];
            }
            b'n' | b'u' => out.push(None),
            other => bail!("unknown pgoutput column kind {other:#x}"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::insert_columns;

    #[test]
    fn insert_columns_reads_text_null_and_rejects_truncation() {
        let mut m = vec![b'I', 0, 0, 0x40, 0x01, b'N', 0, 3];
        m.extend([b't', 0, 0, 0, 2, b'a', b'b']);
        m.push(b'n');
        m.extend([b't', 0, 0, 0, 0]);
        assert_eq!(
            insert_columns(&m).unwrap(),
            vec![Some(&b"ab"[..]), None, Some(&b""[..])]
        );
        assert!(insert_columns(&m[..m.len() - 1]).is_err());
        assert!(insert_columns(&m[..4]).is_err());
    }
}
