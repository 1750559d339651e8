//! `outbox-relay dead-letters list | retry | discard`: the events the broker refused
//! permanently (or that were not valid events), kept in `<table>_dead_letters` with the error.
//!
//! `retry` sends them back to the stream in their order (`position`) and releases the
//! aggregates they hold:
//!
//! - **poll mode**: one statement moves the selected dead letters back into the outbox —
//!   `DELETE … RETURNING` feeding `INSERT … OVERRIDING SYSTEM VALUE` — with their original id,
//!   aggregate, type, payload, headers, trace context and their original `relay_seq`. The
//!   daemon reads pending rows in `relay_seq` order, and every event that waited behind a dead
//!   letter was written after it, so has a larger `relay_seq`: the retried event is published
//!   first, then the held ones, exactly in outbox order. Because the hold disappears in the
//!   same statement that puts the event back, the daemon never sees the aggregate released
//!   without its event. The retry itself needs no broker; the daemon publishes with its usual
//!   guarantees, and dead-letters the event again if the broker still refuses it.
//! - **wal mode**: the event is already behind the slot's position, so there is nothing to put
//!   back: `retry` publishes the dead letters itself, in `position` order per aggregate (the
//!   events parked behind a held one come right after it), and deletes each one once the
//!   broker confirmed it. The hold ends with the last of them; the daemon re-reads the held
//!   aggregates from the table before it parks an event, so the next event of the aggregate
//!   flows. Events the daemon parks while `retry` works are picked up by its next pass when
//!   they match the selection (`--aggregate-id`, `--all`); otherwise they keep the aggregate
//!   held, and `retry` says so.
//!
//! `discard` deletes dead letters for good, after a confirmation (or `--yes`).

use std::collections::{BTreeSet, HashMap};

use clap::{Args, Subcommand};

use super::sql::{
    DEAD_LETTER_COLUMNS, DeadLetter, OpsTable, Params, dead_letter_conditions, where_all,
};
use super::{
    SelectionArgs, confirm, format_age, format_ms, invalid, publish_ordered, render_table, truncate,
};
use crate::config::Config;
use crate::error::Error;
use crate::event::OutboxEvent;
use crate::sink::AnySink;

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters in the order they were dead-lettered, with error and attempts.
    List(ListArgs),
    /// Send dead letters back to the stream, in order, and release the aggregates they hold.
    Retry(RetryArgs),
    /// Delete dead letters for good (asks first, or --yes).
    Discard(DiscardArgs),
}

/// `--since/--until` select dead letters by when they were dead-lettered.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Print JSON (every field, full error text) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show at most this many.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Retry every dead letter (required when no selection is given).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct DiscardArgs {
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Discard every dead letter (required when no selection is given).
    #[arg(long)]
    pub all: bool,
    /// Do not ask for a confirmation.
    #[arg(long, short)]
    pub yes: bool,
}

pub async fn run(config: &Config, command: DeadLettersCommand) -> Result<(), Error> {
    match command {
        DeadLettersCommand::List(args) => list(config, args).await,
        DeadLettersCommand::Retry(args) => retry(config, args).await,
        DeadLettersCommand::Discard(args) => discard(config, args).await,
    }
}

/// The selection as SQL on the dead-letter table `d`; unknown event ids are an error.
async fn select(
    t: &OpsTable,
    selection: &SelectionArgs,
    all: bool,
    verb: &str,
) -> Result<(String, Params), Error> {
    if selection.is_empty() && !all {
        return Err(invalid(format!(
            "say which dead letters to {verb}: --id, --aggregate-type/--aggregate-id, --since/--until (dead_at), or --all"
        )));
    }
    let filter = selection.resolve(t.client()).await?;
    if !filter.ids.is_empty() {
        let known: Vec<String> = t
            .client()
            .query(
                &format!(
                    "SELECT event_id FROM {} WHERE event_id = ANY($1)",
                    t.dead_letters()
                ),
                &[&filter.ids],
            )
            .await
            .map_err(|e| Error::pg("cannot look up dead letters", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let unknown: Vec<&str> = filter
            .ids
            .iter()
            .filter(|i| !known.contains(i))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "no dead letter with event id {}; `outbox-relay dead-letters list` shows them; nothing was changed",
                unknown.join(", ")
            )));
        }
    }
    let mut params = Params::default();
    let conditions = dead_letter_conditions(&filter, &mut params);
    Ok((where_all(&conditions), params))
}

async fn read(
    t: &OpsTable,
    where_sql: &str,
    params: &Params,
    limit: Option<i64>,
) -> Result<Vec<DeadLetter>, Error> {
    let rows = t
        .client()
        .query(
            &format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM {} d WHERE {where_sql} ORDER BY d.position{}",
                t.dead_letters(),
                limit.map(|l| format!(" LIMIT {l}")).unwrap_or_default()
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot read the dead-letter table", e))?;
    Ok(rows.iter().map(DeadLetter::from_row).collect())
}

async fn list(config: &Config, args: ListArgs) -> Result<(), Error> {
    let t = OpsTable::open(config).await?;
    let filter = args.selection.resolve(t.client()).await?;
    let mut params = Params::default();
    let where_sql = where_all(&dead_letter_conditions(&filter, &mut params));
    let letters = read(&t, &where_sql, &params, Some(args.limit.max(0))).await?;
    let row = t
        .client()
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (d.aggregate_type, d.aggregate_id)) FILTER (WHERE d.holds_aggregate) \
                 FROM {} d WHERE {where_sql}",
                t.dead_letters()
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot count dead letters", e))?;
    let (total, held): (i64, i64) = (row.get(0), row.get(1));
    if args.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            total: i64,
            held_aggregates: i64,
            dead_letters: Vec<Json<'a>>,
        }
        #[derive(serde::Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            letter: &'a DeadLetter,
            created_at: Option<String>,
            dead_at: String,
        }
        let out = Out {
            total,
            held_aggregates: held,
            dead_letters: letters
                .iter()
                .map(|d| Json {
                    letter: d,
                    created_at: d.created_at_ms.map(format_ms),
                    dead_at: format_ms(d.dead_at_ms),
                })
                .collect(),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("dead letters serialize")
        );
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters in `{}`", t.dead_letters().display());
        return Ok(());
    }
    let now = super::server_now_ms(t.client()).await?;
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.position.to_string(),
                d.event_id.clone(),
                format!("{}/{}", d.aggregate_type, d.aggregate_id),
                d.event_type.clone(),
                d.attempts.to_string(),
                format!(
                    "{} ago",
                    format_age((now - d.dead_at_ms).max(0) as f64 / 1000.0)
                ),
                if d.holds_aggregate { "yes" } else { "no" }.into(),
                truncate(&d.error, 80),
            ]
        })
        .collect();
    print!(
        "{}",
        render_table(
            &[
                "position",
                "event_id",
                "aggregate",
                "event_type",
                "attempts",
                "dead",
                "holds",
                "error"
            ],
            &rows
        )
    );
    println!(
        "{total} dead letter{}{}, {held} aggregate{} held",
        if total == 1 { "" } else { "s" },
        if (letters.len() as i64) < total {
            format!(" ({} shown; --limit)", letters.len())
        } else {
            String::new()
        },
        if held == 1 { "" } else { "s" }
    );
    Ok(())
}

/// What deleting dead letters did.
pub(crate) struct Released {
    pub deleted: u64,
    /// Aggregates that were held and no longer are.
    pub released: Vec<(String, String)>,
    /// Aggregates that were held by a deleted dead letter and still are (by another one).
    pub still_held: Vec<(String, String)>,
}

/// Deletes the dead letters matching `where_sql` (table aliased `d`) and reports which held
/// aggregates that released.
pub(crate) async fn delete_and_release(
    t: &OpsTable,
    where_sql: &str,
    params: &Params,
) -> Result<Released, Error> {
    let rows = t
        .client()
        .query(
            &format!(
                "WITH gone AS (DELETE FROM {} d WHERE {where_sql} \
                     RETURNING d.aggregate_type, d.aggregate_id, d.holds_aggregate) \
                 SELECT aggregate_type, aggregate_id, count(*), bool_or(holds_aggregate) \
                 FROM gone GROUP BY 1, 2",
                t.dead_letters()
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot delete dead letters", e))?;
    let deleted = rows.iter().map(|r| r.get::<_, i64>(2) as u64).sum();
    let held: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(3))
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (released, still_held) = split_holds(t, held).await?;
    Ok(Released {
        deleted,
        released,
        still_held,
    })
}

/// Tells which aggregates a command released and which other dead letters still hold.
fn print_holds(released: &[(String, String)], still: &[(String, String)], still_note: &str) {
    if !released.is_empty() {
        println!(
            "released {} aggregate{}: {}",
            released.len(),
            if released.len() == 1 { "" } else { "s" },
            describe_aggregates(released)
        );
    }
    if !still.is_empty() {
        println!(
            "still held by other dead letters{still_note}: {}",
            describe_aggregates(still)
        );
    }
}

/// `touched` split into the aggregates now released and those another dead letter still holds.
async fn split_holds(
    t: &OpsTable,
    touched: Vec<(String, String)>,
) -> Result<(Vec<(String, String)>, Vec<(String, String)>), Error> {
    let still = still_held(t, &touched).await?;
    Ok(touched.into_iter().partition(|k| !still.contains(k)))
}

/// Which of `aggregates` a dead letter still holds.
async fn still_held(
    t: &OpsTable,
    aggregates: &[(String, String)],
) -> Result<BTreeSet<(String, String)>, Error> {
    if aggregates.is_empty() {
        return Ok(BTreeSet::new());
    }
    let types: Vec<&str> = aggregates.iter().map(|(a, _)| a.as_str()).collect();
    let ids: Vec<&str> = aggregates.iter().map(|(_, i)| i.as_str()).collect();
    let rows = t
        .client()
        .query(
            &format!(
                "SELECT DISTINCT d.aggregate_type, d.aggregate_id FROM {} d \
                 JOIN unnest($1::text[], $2::text[]) AS a(t, i) \
                   ON d.aggregate_type = a.t AND d.aggregate_id = a.i \
                 WHERE d.holds_aggregate",
                t.dead_letters()
            ),
            &[&types, &ids],
        )
        .await
        .map_err(|e| Error::pg("cannot read held aggregates", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn describe_aggregates(aggregates: &[(String, String)]) -> String {
    let shown: Vec<String> = aggregates
        .iter()
        .take(5)
        .map(|(t, i)| format!("{t}/{i}"))
        .collect();
    let more = aggregates.len().saturating_sub(5);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

async fn retry(config: &Config, args: RetryArgs) -> Result<(), Error> {
    let t = OpsTable::open(config).await?;
    let (where_sql, params) = select(&t, &args.selection, args.all, "retry").await?;
    if t.poll {
        retry_poll(&t, &where_sql, &params).await
    } else {
        let mut sink = AnySink::connect(config).await?;
        retry_wal(&t, &mut sink, &where_sql, &params).await
    }
}

/// Poll mode: the selected dead letters go back into the outbox at their original
/// `relay_seq`, and out of the dead-letter table, in one statement (see the module docs).
async fn retry_poll(t: &OpsTable, where_sql: &str, params: &Params) -> Result<(), Error> {
    let dl = t.dead_letters();
    // An id that is both a dead letter and in the outbox cannot go back: say so instead of
    // failing on the primary key.
    let id_type = t.type_of(t.id()).to_string();
    let clash: Vec<String> = t
        .client()
        .query(
            &format!(
                "SELECT d.event_id FROM {dl} d WHERE {where_sql} AND EXISTS \
                 (SELECT 1 FROM {table} o WHERE o.{id} = d.event_id::{id_type})",
                table = t.table(),
                id = t.id(),
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot read the dead-letter table", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !clash.is_empty() {
        return Err(invalid(format!(
            "event {} is a dead letter and also still in the outbox; discard the dead letter instead (`dead-letters discard --id ...`); nothing was changed",
            clash.join(", ")
        )));
    }
    let cast = |column: &str, value: &str| format!("CAST({value} AS {})", t.type_of(column));
    let mut columns = vec![
        "relay_seq".to_string(),
        t.id().to_string(),
        t.aggregate_type().to_string(),
        t.aggregate_id().to_string(),
        t.event_type().to_string(),
        t.payload().to_string(),
    ];
    let mut values = vec![
        "m.relay_seq".to_string(),
        cast(t.id(), "m.event_id"),
        cast(t.aggregate_type(), "m.aggregate_type"),
        cast(t.aggregate_id(), "m.aggregate_id"),
        cast(t.event_type(), "m.event_type"),
        if t.type_of(t.payload()) == "bytea" {
            "m.payload".to_string()
        } else {
            cast(t.payload(), "convert_from(m.payload, 'UTF8')")
        },
    ];
    for (column, value) in [
        (t.headers(), "coalesce(m.headers, '{}')"),
        (t.traceparent(), "m.traceparent"),
        (t.tracestate(), "m.tracestate"),
        (t.created_at(), "coalesce(m.created_at, now())"),
    ] {
        if let Some(c) = column {
            columns.push(c.to_string());
            values.push(cast(c, value));
        }
    }
    // The columns the templates name go back as they were kept (names are identifiers,
    // checked at start-up, so they are safe in a literal).
    for (name, column) in &t.shape().template_columns {
        if columns.contains(&column.quoted) {
            continue;
        }
        columns.push(column.quoted.clone());
        values.push(cast(&column.quoted, &format!("m.columns->>'{name}'")));
    }
    let rows = t
        .client()
        .query(
            &format!(
                "WITH moved AS (DELETE FROM {dl} d WHERE {where_sql} RETURNING d.*), \
                 back AS (INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE \
                     SELECT {values} FROM moved m ORDER BY m.position \
                     RETURNING 1) \
                 SELECT m.aggregate_type, m.aggregate_id, count(*), bool_or(m.holds_aggregate) \
                 FROM moved m GROUP BY 1, 2",
                table = t.table(),
                columns = columns.join(", "),
                values = values.join(", "),
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot move dead letters back into the outbox", e))?;
    let moved: i64 = rows.iter().map(|r| r.get::<_, i64>(2)).sum();
    if moved == 0 {
        println!("no dead letters match; nothing was changed");
        return Ok(());
    }
    let held: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(3))
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (released, still) = split_holds(t, held).await?;
    println!(
        "moved {moved} dead letter{} back into `{}` at their original position; the relay publishes them before the events that waited behind them",
        if moved == 1 { "" } else { "s" },
        t.table().display()
    );
    print_holds(&released, &still, "");
    Ok(())
}

/// Wal mode: publish the dead letters in order, delete each once confirmed.
async fn retry_wal(
    t: &OpsTable,
    sink: &mut AnySink,
    where_sql: &str,
    params: &Params,
) -> Result<(), Error> {
    let mut sent = 0usize;
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    // Passes until the selection is empty: the daemon may park more events of a selected
    // aggregate while we work.
    loop {
        let letters = read(t, where_sql, params, Some(10_000)).await?;
        if letters.is_empty() {
            break;
        }
        let n = publish_and_delete(t, sink, &letters, &mut touched).await?;
        sent += n;
        if n < letters.len() {
            break;
        }
    }
    if sent == 0 {
        println!("no dead letters match; nothing was changed");
        return Ok(());
    }
    let (released, still) = split_holds(t, touched.into_iter().collect()).await?;
    println!(
        "published {sent} dead letter{} and deleted {}",
        if sent == 1 { "" } else { "s" },
        if sent == 1 { "it" } else { "them" }
    );
    print_holds(&released, &still, "");
    Ok(())
}

/// Publishes `letters` (in position order) and deletes the confirmed ones. An aggregate stops
/// at its first failure, which is recorded on its dead letter; returns how many were sent, or
/// an error naming the failure. Aggregates that a sent letter held are added to `held`.
async fn publish_and_delete(
    t: &OpsTable,
    sink: &mut AnySink,
    letters: &[DeadLetter],
    held: &mut BTreeSet<(String, String)>,
) -> Result<usize, Error> {
    let events: Vec<OutboxEvent> = letters.iter().map(DeadLetter::event).collect();
    let mut invalid_event = None;
    let mut sendable = Vec::with_capacity(events.len());
    for e in &events {
        match e.validate() {
            Ok(()) => sendable.push(e),
            Err(defect) => {
                invalid_event.get_or_insert((e.id.clone(), defect));
                break;
            }
        }
    }
    let results = publish_ordered(sink, &sendable).await;
    let mut confirmed = Vec::new();
    let mut first_failure: HashMap<(String, String), (String, String)> = HashMap::new();
    // `sendable` is a prefix of `letters`, in the same order.
    for ((e, result), letter) in sendable.iter().zip(&results).zip(letters) {
        let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
        if letter.holds_aggregate {
            held.insert(key.clone());
        }
        match result {
            Ok(()) if !first_failure.contains_key(&key) => confirmed.push(e.id.clone()),
            Ok(()) => {}
            Err(err) => {
                first_failure
                    .entry(key)
                    .or_insert((e.id.clone(), err.message.clone()));
            }
        }
    }
    if !confirmed.is_empty() {
        t.client()
            .execute(
                &format!("DELETE FROM {} WHERE event_id = ANY($1)", t.dead_letters()),
                &[&confirmed],
            )
            .await
            .map_err(|e| Error::pg("cannot delete the published dead letters", e))?;
    }
    for (id, error) in first_failure.values() {
        t.client()
            .execute(
                &format!(
                    "UPDATE {} SET attempts = attempts + 1, error = $2, dead_at = now() WHERE event_id = $1",
                    t.dead_letters()
                ),
                &[id, error],
            )
            .await
            .map_err(|e| Error::pg("cannot record the failure on the dead letter", e))?;
    }
    if let Some((id, error)) = first_failure.values().next() {
        return Err(Error::Broker(format!(
            "published {} dead letters, but the broker refused event {id} again: {error}; it stays a dead letter (and holds its aggregate)",
            confirmed.len()
        )));
    }
    if let Some((id, defect)) = invalid_event {
        return Err(invalid(format!(
            "published {} dead letters; event {id} is not a valid event ({defect}) and cannot be sent; discard it",
            confirmed.len()
        )));
    }
    Ok(confirmed.len())
}

async fn discard(config: &Config, args: DiscardArgs) -> Result<(), Error> {
    let t = OpsTable::open(config).await?;
    let (where_sql, params) = select(&t, &args.selection, args.all, "discard").await?;
    let row = t
        .client()
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (d.aggregate_type, d.aggregate_id)) FROM {} d WHERE {where_sql}",
                t.dead_letters()
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("cannot count dead letters", e))?;
    let (count, aggregates): (i64, i64) = (row.get(0), row.get(1));
    if count == 0 {
        println!("no dead letters match; nothing was changed");
        return Ok(());
    }
    confirm(
        &format!(
            "Discard {count} dead letter{} of {aggregates} aggregate{}? Their events were never delivered and never will be.",
            if count == 1 { "" } else { "s" },
            if aggregates == 1 { "" } else { "s" }
        ),
        args.yes,
    )?;
    let r = delete_and_release(&t, &where_sql, &params).await?;
    println!(
        "discarded {} dead letter{}",
        r.deleted,
        if r.deleted == 1 { "" } else { "s" }
    );
    print_holds(
        &r.released,
        &r.still_held,
        if t.poll {
            ""
        } else {
            " (events parked behind the discarded one; `dead-letters retry` sends them)"
        },
    );
    Ok(())
}
