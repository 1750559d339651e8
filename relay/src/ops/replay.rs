//! `outbox-relay replay`: publish retained events again, e.g. after a consumer lost data.
//!
//! ```text
//!  selection ──► freeze into <table>_replay_items (ord = outbox order) ──► batch by ord
//!                                                                           │ publish (waves)
//!  <table>_replays.last_ord ◄── advanced only after the broker confirmed ◄──┘
//! ```
//!
//! - What is replayed: rows still in the outbox table. Poll mode: published rows only (pending
//!   ones are the daemon's to send); wal mode: every row (the table has no bookkeeping), in
//!   `created_at` order, so a table without `created_at` cannot be replayed in wal mode.
//!   Dead-lettered events are never replayed (`dead-letters retry` is for them).
//! - Messages are the ones the daemon would send (same id, key, headers), plus a `replay`
//!   header carrying the replay id, through the same [`Sink`](crate::sink::Sink);
//!   `--topic`/`--exchange` send them elsewhere (each sink's `destination` module).
//! - Order per aggregate: each batch goes out in one send on the sink's ordered path
//!   (`engine::publish_ordered`); once an event of an aggregate failed, its later
//!   events of the batch count as failed too, so progress stops before the first failure.
//! - Resumable: the selection is frozen when the replay starts; progress (`last_ord`) is saved
//!   after every confirmed batch. Ctrl-C (or SIGTERM) finishes the batch in flight, saves, and
//!   prints the `--resume` command; resuming sends exactly the items after `last_ord`. A crash
//!   (SIGKILL) re-sends at most the one unconfirmed batch.
//! - Progress (count, rate, ETA) goes to stderr once a second.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::sql::{OpsTable, Params, where_all};
use super::{SelectionArgs, event_sample_table, format_age, format_ms, invalid, publish_ordered};
use crate::config::{Config, SinkKind};
use crate::error::{Error, PublishError};
use crate::event::OutboxEvent;
use crate::outbox::LOCK_CLASS;
use crate::sink::{AnySink, amqp, kafka};
use crate::template::{Placeholder, Template};

/// The header every replayed message carries: the replay id.
pub const REPLAY_HEADER: &str = "replay";

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Replay every retained event (required when no selection is given).
    #[arg(long)]
    pub all: bool,
    /// Kafka: publish to this topic instead of `kafka.topic` (a name or a template such as
    /// `replay.{aggregate_type}`). It must exist.
    #[arg(long, value_name = "TOPIC", conflicts_with = "exchange")]
    pub topic: Option<String>,
    /// RabbitMQ: publish to this exchange instead of `rabbitmq.exchange`. It must exist.
    #[arg(long, value_name = "EXCHANGE")]
    pub exchange: Option<String>,
    /// Show how many events would be sent and a sample of them; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue an interrupted replay after what it already sent.
    #[arg(
        long,
        value_name = "REPLAY_ID",
        conflicts_with_all = ["ids", "aggregate_type", "aggregate_id", "since", "until", "all", "topic", "exchange", "dry_run"]
    )]
    pub resume: Option<String>,
    /// Events per batch; progress is saved after each confirmed batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Testing aid: behave as if interrupted once at least this many events were sent.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

/// A replay as recorded in `<table>_replays`.
struct Record {
    id: String,
    selection: String,
    destination: Option<String>,
    total: i64,
    sent: i64,
    skipped: i64,
    last_ord: i64,
}

pub async fn run(config: &Config, args: ReplayArgs) -> Result<(), Error> {
    // Everything that can be checked without the database comes first.
    match (config.sink, &args.topic, &args.exchange) {
        (SinkKind::Rabbitmq, Some(_), _) => {
            return Err(invalid(
                "--topic is for Kafka, but this relay publishes to RabbitMQ (RELAY_SINK=rabbitmq); use --exchange",
            ));
        }
        (SinkKind::Kafka, _, Some(_)) => {
            return Err(invalid(
                "--exchange is for RabbitMQ, but this relay publishes to Kafka (RELAY_SINK=kafka); use --topic",
            ));
        }
        _ => {}
    }
    if let Some(topic) = &args.topic {
        kafka::destination::parse_override(topic).map_err(invalid)?;
    }
    if let Some(exchange) = &args.exchange {
        amqp::destination::parse_override(exchange).map_err(invalid)?;
    }
    if args.resume.is_none() && args.selection.is_empty() && !args.all {
        return Err(invalid(
            "say which events to replay: --id, --aggregate-type/--aggregate-id, --since/--until, or --all",
        ));
    }

    // Opened with the override applied: the columns a `--topic` template names are read
    // with the events.
    let explicit = args.topic.clone().or(args.exchange.clone());
    let mut t = OpsTable::open(&target_config(config, explicit.as_deref())).await?;
    t.require_replay_tables().await?;
    let order = t.order_by()?;

    let record = match &args.resume {
        Some(id) => load(&t, id).await?,
        None => {
            let filter = args.selection.resolve(t.client()).await?;
            let mut params = Params::default();
            let mut conditions = t.event_conditions(&filter, &mut params)?;
            check_ids(&t, &filter.ids).await?;
            if t.poll {
                conditions.push("o.relay_published_at IS NOT NULL".into());
            }
            conditions.push(format!(
                "NOT EXISTS (SELECT 1 FROM {} d WHERE d.event_id = o.{}::text)",
                t.dead_letters(),
                t.id()
            ));
            let selection = SelectionArgs::describe(&filter);
            let destination = args.topic.clone().or(args.exchange.clone());
            let sink_config = target_config(config, destination.as_deref());
            let matched = count(&t, &conditions, &params).await?;
            if matched.events == 0 {
                return Err(invalid(format!(
                    "no retained events of `{}` match ({selection}){}; nothing to replay",
                    t.table().display(),
                    if t.poll {
                        ", counting published events only"
                    } else {
                        ""
                    }
                )));
            }
            if args.dry_run {
                return dry_run(&t, &sink_config, &conditions, &params, &order, &matched).await;
            }
            // The destination must exist before anything is recorded or sent.
            preflight(
                &t,
                &sink_config,
                destination.is_some(),
                &conditions,
                &params,
            )
            .await?;
            create(&t, selection, destination, &conditions, params, &order).await?
        }
    };
    let sink_config = target_config(config, record.destination.as_deref());
    if args.resume.is_some() && record.destination.is_some() {
        // The recorded destination may name columns the configured templates do not.
        t = OpsTable::open(&sink_config).await?;
    }
    let mut sink = connect(&sink_config, record.destination.is_some()).await?;
    send(&t, &mut sink, record, &args).await
}

/// The config with `--topic`/`--exchange` applied (each sink's `destination` module says what
/// an override changes). An explicit destination is never created: it must exist, which is
/// checked before anything is sent.
fn target_config(config: &Config, destination: Option<&str>) -> Config {
    let mut c = config.clone();
    if let Some(d) = destination {
        match c.sink {
            SinkKind::Kafka => c.kafka = kafka::destination::with_override(&config.kafka, d),
            SinkKind::Rabbitmq => {
                c.rabbitmq = amqp::destination::with_override(&config.rabbitmq, d)
            }
        }
    }
    c
}

async fn connect(config: &Config, explicit: bool) -> Result<AnySink, Error> {
    AnySink::connect(config)
        .await
        .map_err(|e| match config.sink {
            SinkKind::Rabbitmq => {
                amqp::destination::explain_connect_error(&config.rabbitmq, explicit, e)
            }
            SinkKind::Kafka => e,
        })
}

/// Unknown ids and (poll) ids of events not published yet are errors: one message for all.
async fn check_ids(t: &OpsTable, ids: &[String]) -> Result<(), Error> {
    let unknown = t.unknown_ids(ids).await?;
    if !unknown.is_empty() {
        let dead: Vec<String> = t
            .client()
            .query(
                &format!(
                    "SELECT event_id FROM {} WHERE event_id = ANY($1)",
                    t.dead_letters()
                ),
                &[&unknown],
            )
            .await
            .map_err(|e| Error::pg("cannot look up dead letters", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<&String> = unknown.iter().filter(|id| !dead.contains(id)).collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "no event with id {} in the outbox `{}` (never written, or purged past retention); nothing was sent",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                t.table().display()
            )));
        }
        return Err(invalid(format!(
            "event {} is in the dead-letter table, not the outbox; send it with `outbox-relay dead-letters retry --id ...`",
            dead.join(", ")
        )));
    }
    if t.poll {
        let id_type = t.type_of(t.id()).to_string();
        let pending: Vec<String> = t
            .client()
            .query(
                &format!(
                    "SELECT o.{id}::text FROM {table} o WHERE o.{id} = ANY($1::text[]::{id_type}[]) \
                     AND o.relay_published_at IS NULL",
                    id = t.id(),
                    table = t.table()
                ),
                &[&ids],
            )
            .await
            .map_err(|e| Error::pg("cannot look up event ids", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !pending.is_empty() {
            return Err(invalid(format!(
                "event {} is not published yet; the relay will publish it (replay only sends events that were published)",
                pending.join(", ")
            )));
        }
    }
    Ok(())
}

struct Matched {
    events: i64,
    aggregates: i64,
    oldest_ms: Option<i64>,
    newest_ms: Option<i64>,
}

async fn count(t: &OpsTable, conditions: &[String], params: &Params) -> Result<Matched, Error> {
    let span = match t.created_at() {
        Some(c) => format!(
            "(extract(epoch FROM min(o.{c})) * 1000)::bigint, (extract(epoch FROM max(o.{c})) * 1000)::bigint"
        ),
        None => "NULL::bigint, NULL::bigint".into(),
    };
    let row = t
        .client()
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (o.{at}::text, o.{ai}::text)), {span} FROM {table} o WHERE {w}",
                at = t.aggregate_type(),
                ai = t.aggregate_id(),
                table = t.table(),
                w = where_all(conditions)
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot count the selected events", e))?;
    Ok(Matched {
        events: row.get(0),
        aggregates: row.get(1),
        oldest_ms: row.get(2),
        newest_ms: row.get(3),
    })
}

fn describe_destination(config: &Config) -> String {
    match config.sink {
        SinkKind::Kafka => kafka::destination::describe(&config.kafka),
        SinkKind::Rabbitmq => amqp::destination::describe(&config.rabbitmq),
    }
}

fn render_destination(config: &Config, event: &OutboxEvent) -> String {
    match config.sink {
        SinkKind::Kafka => kafka::destination::render(&config.kafka, event),
        SinkKind::Rabbitmq => amqp::destination::render(&config.rabbitmq, event),
    }
}

const SAMPLE: i64 = 10;

async fn dry_run(
    t: &OpsTable,
    config: &Config,
    conditions: &[String],
    params: &Params,
    order: &str,
    matched: &Matched,
) -> Result<(), Error> {
    let rows = t
        .client()
        .query(
            &format!(
                "SELECT {cols} FROM {table} o WHERE {w} ORDER BY {order} LIMIT {SAMPLE}",
                cols = t.event_columns(),
                table = t.table(),
                w = where_all(conditions),
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot read the selected events", e))?;
    println!(
        "dry run: {} event{} of {} aggregate{} would be replayed to {}",
        matched.events,
        if matched.events == 1 { "" } else { "s" },
        matched.aggregates,
        if matched.aggregates == 1 { "" } else { "s" },
        describe_destination(config)
    );
    if let (Some(a), Some(b)) = (matched.oldest_ms, matched.newest_ms) {
        println!("created between {} and {}", format_ms(a), format_ms(b));
    }
    println!("first {} in outbox order:", rows.len().min(SAMPLE as usize));
    let sample = rows.iter().map(|r| {
        let e = t.event_from_row(r, 0, 0);
        let destination = render_destination(config, &e);
        (e, destination)
    });
    print!("{}", event_sample_table(sample, "destination"));
    println!("nothing was sent (dry run)");
    Ok(())
}

/// Makes sure every Kafka topic the selection renders to exists (or will be created, when the
/// configured template is used with `kafka.create_topics`), so an unknown topic is an error
/// before anything is sent. RabbitMQ's exchange is checked when the sink connects.
async fn preflight(
    t: &OpsTable,
    config: &Config,
    explicit: bool,
    conditions: &[String],
    params: &Params,
) -> Result<(), Error> {
    if config.sink != SinkKind::Kafka || !kafka::destination::must_exist(&config.kafka, explicit) {
        return Ok(());
    }
    let template = Template::parse(&config.kafka.topic).map_err(invalid)?;
    // Only the columns the template names are worth a DISTINCT.
    let placeholders = template.placeholders();
    if placeholders.is_empty() {
        let topics = HashSet::from([template.as_str().to_string()]);
        return kafka::destination::require_topics(&config.kafka, topics, explicit).await;
    }
    let column = |p: &Placeholder| -> String {
        match p {
            Placeholder::AggregateType => format!("o.{}::text", t.aggregate_type()),
            // (`{partition}` is refused in Kafka topics.)
            Placeholder::AggregateId | Placeholder::Partition => {
                format!("o.{}::text", t.aggregate_id())
            }
            Placeholder::EventType => format!("o.{}::text", t.event_type()),
            Placeholder::Column(name) => format!("o.{}::text", crate::ident::quote(name)),
        }
    };
    let rows = t
        .client()
        .query(
            &format!(
                "SELECT DISTINCT {} FROM {} o WHERE {} LIMIT 1000",
                placeholders
                    .iter()
                    .map(|p| column(p))
                    .collect::<Vec<_>>()
                    .join(", "),
                t.table(),
                where_all(conditions)
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot read the selected events", e))?;
    // A row whose named column is NULL has no topic; its send fails with that reason. Only the
    // topics that can be rendered are checked here.
    let topics: HashSet<String> = rows
        .iter()
        .filter_map(|r| {
            let values: Vec<Option<String>> = (0..placeholders.len()).map(|i| r.get(i)).collect();
            template
                .render_with(|p| {
                    let i = placeholders.iter().position(|q| *q == p)?;
                    values[i].as_deref().map(std::borrow::Cow::Borrowed)
                })
                .ok()
                .map(|topic| topic.into_owned())
        })
        .collect();
    kafka::destination::require_topics(&config.kafka, topics, explicit).await
}

/// Records the replay and freezes its selection, in one transaction.
async fn create(
    t: &OpsTable,
    selection: String,
    destination: Option<String>,
    conditions: &[String],
    mut params: Params,
    order: &str,
) -> Result<Record, Error> {
    let id = format!(
        "replay-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let id_param = params.push(id.clone());
    let client = t.client();
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| Error::pg("replay: cannot start a transaction", e))?;
    let result = async {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (replay_id, selection, destination, total) VALUES ($1, $2, $3, 0)",
                    t.replays
                ),
                &[&id, &selection, &destination],
            )
            .await
            .map_err(|e| Error::pg("replay: cannot record the replay", e))?;
        let total = client
            .execute(
                &format!(
                    "INSERT INTO {items} (replay_id, ord, event_id) \
                     SELECT {id_param}, row_number() OVER (ORDER BY {order}), o.{id}::text \
                     FROM {table} o WHERE {w}",
                    items = t.replay_items,
                    id = t.id(),
                    table = t.table(),
                    w = where_all(conditions),
                ),
                &params.refs(),
            )
            .await
            .map_err(|e| Error::pg("replay: cannot record the selected events", e))?;
        client
            .execute(
                &format!("UPDATE {} SET total = $2 WHERE replay_id = $1", t.replays),
                &[&id, &(total as i64)],
            )
            .await
            .map_err(|e| Error::pg("replay: cannot record the replay", e))?;
        Ok::<i64, Error>(total as i64)
    }
    .await;
    match result {
        Ok(total) => {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| Error::pg("replay: cannot commit", e))?;
            Ok(Record {
                id,
                selection,
                destination,
                total,
                sent: 0,
                skipped: 0,
                last_ord: 0,
            })
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn load(t: &OpsTable, id: &str) -> Result<Record, Error> {
    let row = t
        .client()
        .query_opt(
            &format!(
                "SELECT selection, destination, total, sent, skipped, last_ord, finished_at IS NOT NULL \
                 FROM {} WHERE replay_id = $1",
                t.replays
            ),
            &[&id],
        )
        .await
        .map_err(|e| Error::pg("cannot read the replay table", e))?
        .ok_or_else(|| {
            invalid(format!(
                "there is no replay `{id}` for `{}`; `outbox-relay status` lists unfinished replays",
                t.table().display()
            ))
        })?;
    if row.get::<_, bool>(6) {
        return Err(invalid(format!(
            "replay `{id}` already finished ({} events sent); start a new replay to send them again",
            row.get::<_, i64>(3)
        )));
    }
    Ok(Record {
        id: id.to_string(),
        selection: row.get(0),
        destination: row.get(1),
        total: row.get(2),
        sent: row.get(3),
        skipped: row.get(4),
        last_ord: row.get(5),
    })
}

/// Stops the replay between batches on Ctrl-C or SIGTERM; a second Ctrl-C exits at once.
fn watch_interrupts(stop: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("\nstopping after the batch in flight is confirmed (Ctrl-C again to quit now)");
        stop.cancel();
        int.recv().await;
        std::process::exit(130);
    });
}

async fn send(
    t: &OpsTable,
    sink: &mut AnySink,
    mut record: Record,
    args: &ReplayArgs,
) -> Result<(), Error> {
    let client = t.client();
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&LOCK_CLASS, &format!("replay:{}", record.id)],
        )
        .await
        .map_err(|e| Error::pg("cannot lock the replay", e))?
        .get(0);
    if !locked {
        return Err(invalid(format!(
            "replay `{}` is running in another process; wait for it or stop it first",
            record.id
        )));
    }
    let stop = CancellationToken::new();
    watch_interrupts(stop.clone());
    eprintln!(
        "replay {}: {} events ({}) of `{}`{}; Ctrl-C stops it, `--resume {}` continues it",
        record.id,
        record.total,
        record.selection,
        t.table().display(),
        if record.sent + record.skipped > 0 {
            format!(", resuming after {}", record.sent + record.skipped)
        } else {
            String::new()
        },
        record.id
    );
    let fetch_sql = format!(
        "SELECT i.ord, {cols} FROM {items} i LEFT JOIN {table} o ON o.{id} = i.event_id::{id_type} \
         WHERE i.replay_id = $1 AND i.ord > $2 ORDER BY i.ord LIMIT $3",
        cols = t.event_columns(),
        items = t.replay_items,
        table = t.table(),
        id = t.id(),
        id_type = t.type_of(t.id()),
    );
    let progress_sql = format!(
        "UPDATE {} SET last_ord = $2, sent = sent + $3, skipped = skipped + $4, updated_at = now() \
         WHERE replay_id = $1",
        t.replays
    );
    let started = Instant::now();
    let done_before = record.sent + record.skipped;
    let mut last_report = Instant::now();
    let mut reported = done_before;
    let mut sent_now: u64 = 0;
    loop {
        if stop.is_cancelled() || args.stop_after.is_some_and(|n| sent_now >= n) {
            report(&record, started, done_before);
            return Err(invalid(format!(
                "replay {} interrupted after {} of {} events (progress is saved); continue with `outbox-relay replay --resume {}`",
                record.id,
                record.sent + record.skipped,
                record.total,
                record.id
            )));
        }
        let rows = client
            .query(
                &fetch_sql,
                &[&record.id, &record.last_ord, &(args.batch_size as i64)],
            )
            .await
            .map_err(|e| Error::pg("replay: cannot read the next batch", e))?;
        if rows.is_empty() {
            break;
        }
        let mut ords = Vec::with_capacity(rows.len());
        let mut events: Vec<Option<OutboxEvent>> = Vec::with_capacity(rows.len());
        for r in &rows {
            let ord: i64 = r.get(0);
            ords.push(ord);
            if r.get::<_, Option<String>>(1).is_none() {
                // Deleted since the replay started (purge or retention).
                events.push(None);
                continue;
            }
            let mut e = t.event_from_row(r, 1, ord);
            e.headers.retain(|(k, _)| k != REPLAY_HEADER);
            e.headers
                .push((REPLAY_HEADER.to_string(), record.id.clone()));
            match e.validate() {
                Ok(()) => events.push(Some(e)),
                Err(defect) => {
                    eprintln!("replay {}: skipping event {}: {defect}", record.id, e.id);
                    events.push(None);
                }
            }
        }
        let to_send: Vec<&OutboxEvent> = events.iter().flatten().collect();
        let results = publish_ordered(sink, &to_send).await;
        // Confirmed prefix: every item before the first failure, in replay order.
        let mut outcome = results.into_iter();
        let mut confirmed = 0usize;
        let (mut sent, mut skipped) = (0i64, 0i64);
        let mut failure: Option<(String, PublishError)> = None;
        for e in &events {
            match e {
                None => skipped += 1,
                Some(e) => match outcome.next() {
                    Some(Ok(())) => sent += 1,
                    Some(Err(err)) => {
                        failure = Some((e.id.clone(), err));
                        break;
                    }
                    None => break,
                },
            }
            confirmed += 1;
        }
        if confirmed > 0 {
            let last_ord = ords[confirmed - 1];
            client
                .execute(&progress_sql, &[&record.id, &last_ord, &sent, &skipped])
                .await
                .map_err(|e| Error::pg("replay: cannot save progress", e))?;
            record.last_ord = last_ord;
            record.sent += sent;
            record.skipped += skipped;
            sent_now += sent as u64;
        }
        if let Some((event_id, err)) = failure {
            report(&record, started, done_before);
            return Err(Error::Broker(format!(
                "replay {} stopped after {} of {} events: the broker did not take event {event_id}: {err}; fix the cause and continue with `outbox-relay replay --resume {}`",
                record.id,
                record.sent + record.skipped,
                record.total,
                record.id
            )));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            report(&record, started, done_before);
            last_report = Instant::now();
            reported = record.sent + record.skipped;
        }
    }
    client
        .execute(
            &format!(
                "UPDATE {} SET finished_at = now(), updated_at = now() WHERE replay_id = $1",
                t.replays
            ),
            &[&record.id],
        )
        .await
        .map_err(|e| Error::pg("replay: cannot record the end", e))?;
    client
        .execute(
            &format!("DELETE FROM {} WHERE replay_id = $1", t.replay_items),
            &[&record.id],
        )
        .await
        .map_err(|e| Error::pg("replay: cannot clean up its items", e))?;
    if reported < record.sent + record.skipped {
        report(&record, started, done_before);
    }
    println!(
        "replay {} finished: {} events sent{} in {}",
        record.id,
        record.sent,
        if record.skipped > 0 {
            format!(
                ", {} skipped (deleted or invalid since the replay started)",
                record.skipped
            )
        } else {
            String::new()
        },
        format_age(started.elapsed().as_secs_f64())
    );
    Ok(())
}

/// `replay replay-…: 1500/10000 (15%), 3200/s, ETA 3s` on stderr.
fn report(record: &Record, started: Instant, done_before: i64) {
    let done = record.sent + record.skipped;
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    let rate = (done - done_before) as f64 / elapsed;
    let remaining = (record.total - done).max(0);
    let eta = if remaining == 0 {
        "0s".to_string()
    } else if rate > 0.0 {
        format_age(remaining as f64 / rate)
    } else {
        "?".into()
    };
    let pct = if record.total > 0 {
        done as f64 * 100.0 / record.total as f64
    } else {
        100.0
    };
    eprintln!(
        "replay {}: {done}/{} ({pct:.0}%), {rate:.0}/s, ETA {eta}",
        record.id, record.total
    );
}
