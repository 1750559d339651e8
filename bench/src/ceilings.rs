//! Phase 1, the raw ceilings of this machine: the Postgres commit rate of outbox transactions, a
//! plain producer with the relay's settings to Kafka and to RabbitMQ, and Postgres alone handing
//! a backlog out to a claim-and-read SQL loop (the poll source's work without the relay; beside
//! it, the same work on two connections, reading while marking, not used as a ceiling). The
//! relay can go no faster than the slowest of them, so the drains are reported against them:
//! a bare rate would say more about the machine than about the relay. The wal source's ceiling
//! needs a slot holding a backlog, so the drain phase measures it on its first backlog.

use std::time::Duration;

use anyhow::Result;

use crate::combo::{Combo, SinkKind, SourceKind};
use crate::ctx::Ctx;
use crate::pg::{self, BenchDb};
use crate::report::Ceilings;
use crate::{amqp, kafka};

/// Ceilings that do not depend on a relay: commit rate, the brokers of `combos`, the poll source.
pub(crate) async fn ceilings(ctx: &mut Ctx, combos: &[Combo]) -> Result<Ceilings> {
    let a = &ctx.args;
    let s = ctx.settings.clone();
    let mut c = Ceilings {
        commit_writers: s.writers,
        ..Default::default()
    };

    // Once with the wal schema (plain table) and once with the poll schema, whose statement
    // trigger NOTIFYs at commit (Postgres serialises the commits of notifying transactions).
    // Only the sources and brokers some combination of this run uses.
    let uses_source = |k: SourceKind| combos.iter().any(|c| c.source == k);
    for (combo, listen) in [
        (Combo::ALL[0], false),
        (Combo::ALL[1], false),
        (Combo::ALL[1], true),
    ]
    .into_iter()
    .filter(|(c, _)| uses_source(c.source))
    {
        let schema = format!(
            "{} schema{}",
            combo.source.as_str(),
            if listen { " + LISTEN" } else { "" }
        );
        ctx.log(format!(
            "ceiling: Postgres commit rate ({schema}), {} writers, {} s",
            s.writers, s.commit_ceiling_secs
        ));
        let label = format!(
            "commit_{}{}",
            combo.source.as_str(),
            if listen { "_listen" } else { "" }
        );
        let db = BenchDb::create(&a.pg_admin_url, &ctx.run_id, &label).await?;
        let setup = ctx.setup(combo, &db, "commit");
        setup.migrate()?;
        let measured = pg::commit_ceiling(
            &db.url,
            s.writers,
            Duration::from_secs(s.commit_ceiling_secs),
            listen,
        )
        .await;
        db.drop_now().await?;
        let (n, rate) = measured?;
        match (combo.source, listen) {
            (SourceKind::Wal, _) => {
                c.commit_events = n;
                c.commit_events_per_sec = rate;
            }
            (SourceKind::Poll, false) => {
                c.commit_notify_events = n;
                c.commit_notify_events_per_sec = rate;
            }
            (SourceKind::Poll, true) => {
                c.commit_notify_listen_events = n;
                c.commit_notify_listen_events_per_sec = rate;
            }
        }
    }

    if combos.iter().any(|c| c.sink == SinkKind::Kafka) {
        ctx.log(format!(
            "ceiling: plain Kafka producer, {} messages",
            s.events
        ));
        let topic = format!("bench_{}_producer", ctx.run_id);
        kafka::create_topic(&a.kafka_brokers, &topic).await?;
        let t = kafka::producer_ceiling(&a.kafka_brokers, &topic, s.events, s.aggregates).await?;
        kafka::delete_topic(&a.kafka_brokers, &topic).await;
        c.kafka_producer_msgs_per_sec = s.events as f64 / t.as_secs_f64();
    }
    if combos.iter().any(|c| c.sink == SinkKind::Rabbitmq) {
        ctx.log(format!(
            "ceiling: plain RabbitMQ publisher, {} messages",
            s.events
        ));
        let exchange = format!("bench_{}_publisher", ctx.run_id);
        amqp::declare(&a.amqp_url, &exchange, &exchange, "#").await?;
        let t = amqp::publisher_ceiling(&a.amqp_url, &exchange, s.events, s.aggregates).await;
        amqp::delete(&a.amqp_url, &exchange, &exchange).await;
        c.rabbitmq_publisher_msgs_per_sec = s.events as f64 / t?.as_secs_f64();
    }

    if uses_source(SourceKind::Poll) {
        ctx.log(format!(
            "ceiling: poll source (SQL claim-and-read loop), {} events",
            s.events
        ));
        let db = poll_backlog(ctx, "pollsql").await?;
        let (rows, bytes, t) = pg::poll_ceiling(&db.url).await?;
        c.poll_source_events_per_sec = rows as f64 / t.as_secs_f64();
        c.poll_source_mb_per_sec = bytes as f64 / 1e6 / t.as_secs_f64();
        db.drop_now().await?;

        ctx.log(format!(
            "beside it: the same work on two connections (reading while marking), {} events",
            s.events
        ));
        let db = poll_backlog(ctx, "pollpipe").await?;
        let (rows, t) = pg::poll_pipelined(&db.url).await?;
        c.poll_pipelined_events_per_sec = rows as f64 / t.as_secs_f64();
        db.drop_now().await?;
    }
    Ok(c)
}

/// A database of its own with the poll schema and a vacuumed backlog of the run's size.
async fn poll_backlog(ctx: &Ctx, label: &str) -> Result<BenchDb> {
    let s = &ctx.settings;
    let db = BenchDb::create(&ctx.args.pg_admin_url, &ctx.run_id, label).await?;
    ctx.setup(Combo::ALL[1], &db, label).migrate()?;
    pg::write_backlog(&db.url, s.events, s.aggregates, 4).await?;
    db.client()
        .await?
        .batch_execute("VACUUM ANALYZE outbox")
        .await?;
    Ok(db)
}
