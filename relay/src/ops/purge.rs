//! `outbox-relay purge`: delete outbox rows (or dead letters) by age or selection.
//!
//! - By age (`--older-than 7d`, `--before <time>`): rows whose replay window is over, by the
//!   same condition as the daemon's retention cleanup ([`Outbox::past_retention`]): published
//!   that long ago in poll mode, created that long ago in wal mode. Without a selection it runs
//!   the daemon's own statement, [`Outbox::cleanup`], batch after batch.
//! - By selection (`--id`, `--aggregate-type/--aggregate-id`, `--since/--until` on
//!   `created_at`), optionally combined with an age.
//! - Poll mode: unpublished events are only deleted with `--include-unpublished` and a
//!   confirmation (or `--yes`), since they would never be delivered; the question says how many
//!   aggregates lose events. Wal mode has no such risk: a row's insert is already in the WAL
//!   and is delivered whether or not the row still exists.
//! - `--dead-letters` deletes dead letters instead (by `dead_at`), after a confirmation, and
//!   releases the aggregates they held.
//!
//! [`Outbox::past_retention`]: crate::outbox::Outbox::past_retention
//! [`Outbox::cleanup`]: crate::outbox::Outbox::cleanup

use std::time::Duration;

use clap::Args;

use super::sql::{OpsTable, Params, dead_letter_conditions, where_all};
use super::{
    SelectionArgs, confirm, event_sample_table, format_age, format_ms, invalid, parse_duration,
    parse_time, render_table, server_now_ms, truncate,
};
use crate::config::Config;
use crate::error::Error;
use crate::outbox::{CLEANUP_BATCH, retention_interval};

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Only rows older than this (e.g. 7d, 12h): published that long ago (poll), created that
    /// long ago (wal), or dead-lettered that long ago (--dead-letters).
    #[arg(long, value_name = "DURATION", conflicts_with = "before")]
    pub older_than: Option<String>,
    /// Like --older-than, with a point in time: RFC 3339 or a duration ago.
    #[arg(long, value_name = "TIME")]
    pub before: Option<String>,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Delete dead letters instead of outbox events (--since/--until then select by dead_at).
    #[arg(long)]
    pub dead_letters: bool,
    /// Poll mode: also delete events that were never published. They are lost for good, so
    /// this asks for a confirmation (or --yes).
    #[arg(long)]
    pub include_unpublished: bool,
    /// Show what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for a confirmation.
    #[arg(long, short)]
    pub yes: bool,
}

pub async fn run(config: &Config, args: PurgeArgs) -> Result<(), Error> {
    if args.older_than.is_none() && args.before.is_none() && args.selection.is_empty() {
        return Err(invalid(
            "say what to purge: --older-than/--before (age), or a selection (--id, --aggregate-type/--aggregate-id, --since/--until)",
        ));
    }
    let older_than = match &args.older_than {
        Some(d) => Some(parse_duration("--older-than", d)?),
        None => None,
    };
    if args.include_unpublished && (older_than.is_some() || args.before.is_some()) {
        return Err(invalid(
            "--older-than/--before only match published events (by when they were published); to delete unpublished ones select them with --id, --aggregate-type/--aggregate-id or --since/--until (creation time) and --include-unpublished",
        ));
    }
    if args.dead_letters && args.include_unpublished {
        return Err(invalid(
            "--include-unpublished is about outbox events; dead letters are deleted with --dead-letters alone",
        ));
    }
    let t = OpsTable::open(config).await?;
    let age = match (&args.before, older_than) {
        (Some(before), _) => {
            let now = server_now_ms(t.client()).await?;
            let at = parse_time(t.client(), "--before", before, now).await?;
            if at > now {
                return Err(invalid(format!(
                    "--before {} is in the future; nothing can have been published after now",
                    format_ms(at)
                )));
            }
            Some(Duration::from_millis((now - at) as u64))
        }
        (None, age) => age,
    };
    let filter = args.selection.resolve(t.client()).await?;
    if args.dead_letters {
        purge_dead_letters(&t, &args, &filter, age).await
    } else {
        purge_events(&t, &args, &filter, age).await
    }
}

async fn purge_events(
    t: &OpsTable,
    args: &PurgeArgs,
    filter: &super::sql::Filter,
    age: Option<Duration>,
) -> Result<(), Error> {
    let unknown = t.unknown_ids(&filter.ids).await?;
    if !unknown.is_empty() {
        return Err(invalid(format!(
            "no event with id {} in the outbox `{}`; nothing was deleted",
            unknown.join(", "),
            t.table().display()
        )));
    }
    let mut params = Params::default();
    let mut conditions = Vec::new();
    if let Some(age) = age {
        let Some(past) = t.outbox.past_retention() else {
            return Err(invalid(format!(
                "--older-than/--before need to know when rows were written, but `{}` has no created_at timestamp column; select rows with --id or --aggregate-type/--aggregate-id instead",
                t.table().display()
            )));
        };
        // The shared condition refers to its interval as `$1`: it must be the first parameter.
        let first = params.push(retention_interval(age));
        debug_assert_eq!(first, "$1");
        conditions.push(format!("({past})"));
    }
    conditions.extend(t.event_conditions(filter, &mut params)?);
    let where_sql = where_all(&conditions);
    let (published, unpublished, unpublished_aggregates) = if t.poll {
        let row = t
            .client()
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE o.relay_published_at IS NOT NULL), \
                            count(*) FILTER (WHERE o.relay_published_at IS NULL), \
                            count(DISTINCT (o.{at}::text, o.{ai}::text)) FILTER (WHERE o.relay_published_at IS NULL) \
                     FROM {table} o WHERE {where_sql}",
                    at = t.aggregate_type(),
                    ai = t.aggregate_id(),
                    table = t.table(),
                ),
                &params.refs(),
            )
            .await
            .map_err(|e| Error::pg("purge: cannot count the selected events", e))?;
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
        )
    } else {
        let row = t
            .client()
            .query_one(
                &format!("SELECT count(*) FROM {} o WHERE {where_sql}", t.table()),
                &params.refs(),
            )
            .await
            .map_err(|e| Error::pg("purge: cannot count the selected events", e))?;
        (row.get::<_, i64>(0), 0, 0)
    };
    if unpublished > 0 && !args.include_unpublished {
        return Err(invalid(format!(
            "the selection matches {unpublished} unpublished event{} of {unpublished_aggregates} aggregate{}, which would never be delivered; pass --include-unpublished to delete them too (you will be asked to confirm), or add --older-than 0s to delete only published ones; nothing was deleted",
            plural(unpublished),
            plural(unpublished_aggregates)
        )));
    }
    let kind = if t.poll { "published " } else { "" };
    if args.dry_run {
        println!(
            "dry run: {published} {kind}event{} of `{}` would be deleted{}",
            plural(published),
            t.table().display(),
            if unpublished > 0 {
                format!(
                    ", and {unpublished} UNPUBLISHED event{} of {unpublished_aggregates} aggregate{}",
                    plural(unpublished),
                    plural(unpublished_aggregates)
                )
            } else {
                String::new()
            }
        );
        sample_events(t, &where_sql, &params).await?;
        println!("nothing was deleted (dry run)");
        return Ok(());
    }
    if unpublished > 0 {
        confirm(
            &format!(
                "Delete {unpublished} unpublished event{} of {unpublished_aggregates} aggregate{} from `{}` (plus {published} published)? They have not reached the broker and never will.",
                plural(unpublished),
                plural(unpublished_aggregates),
                t.table().display()
            ),
            args.yes,
        )?;
    }
    let deleted = if filter_is_empty(filter) && !(t.poll && args.include_unpublished) {
        // Age only: the daemon's own retention statement, batch after batch.
        let age = age.unwrap_or_default();
        let mut deleted = 0;
        loop {
            let n = t.outbox.cleanup(t.client(), age).await?;
            deleted += n;
            if n < CLEANUP_BATCH {
                break;
            }
        }
        deleted
    } else {
        t.client()
            .execute(
                &format!("DELETE FROM {} o WHERE {where_sql}", t.table()),
                &params.refs(),
            )
            .await
            .map_err(|e| Error::pg("purge: cannot delete the selected events", e))?
    };
    println!(
        "deleted {deleted} {}event{} from `{}`{}",
        if unpublished > 0 { "" } else { kind },
        plural(deleted as i64),
        t.table().display(),
        if unpublished > 0 {
            format!(
                " ({unpublished} of them unpublished, of {unpublished_aggregates} aggregate{})",
                plural(unpublished_aggregates)
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn filter_is_empty(f: &super::sql::Filter) -> bool {
    f.ids.is_empty()
        && f.aggregate_type.is_none()
        && f.aggregate_id.is_none()
        && f.since_ms.is_none()
        && f.until_ms.is_none()
}

fn plural(n: i64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

async fn sample_events(t: &OpsTable, where_sql: &str, params: &Params) -> Result<(), Error> {
    let published = if t.poll {
        "(extract(epoch FROM o.relay_published_at) * 1000)::bigint"
    } else {
        "NULL::bigint"
    };
    let order = t.order_by().unwrap_or_else(|_| "o.ctid".into());
    let rows = t
        .client()
        .query(
            &format!(
                "SELECT {cols}, {published} FROM {table} o WHERE {where_sql} ORDER BY {order} LIMIT 10",
                cols = t.event_columns(),
                table = t.table(),
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("purge: cannot read the selected events", e))?;
    if rows.is_empty() {
        return Ok(());
    }
    let sample = rows.iter().map(|r| {
        let published = match r.get::<_, Option<i64>>(t.shape().width()) {
            Some(p) => format_ms(p),
            None if t.poll => "UNPUBLISHED".into(),
            None => String::new(),
        };
        (t.event_from_row(r, 0, 0), published)
    });
    println!("first {} in outbox order:", rows.len());
    print!("{}", event_sample_table(sample, "published_at"));
    Ok(())
}

async fn purge_dead_letters(
    t: &OpsTable,
    args: &PurgeArgs,
    filter: &super::sql::Filter,
    age: Option<Duration>,
) -> Result<(), Error> {
    let mut params = Params::default();
    let mut conditions = Vec::new();
    if let Some(age) = age {
        let p = params.push(retention_interval(age));
        conditions.push(format!("d.dead_at < now() - {p}::text::interval"));
    }
    conditions.extend(dead_letter_conditions(filter, &mut params));
    let where_sql = where_all(&conditions);
    let dl = t.dead_letters();
    if !filter.ids.is_empty() {
        let known: Vec<String> = t
            .client()
            .query(
                &format!("SELECT event_id FROM {dl} WHERE event_id = ANY($1)"),
                &[&filter.ids],
            )
            .await
            .map_err(|e| Error::pg("purge: cannot look up dead letters", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let unknown: Vec<&String> = filter.ids.iter().filter(|i| !known.contains(i)).collect();
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "no dead letter with event id {}; `outbox-relay dead-letters list` shows them; nothing was deleted",
                unknown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let row = t
        .client()
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (d.aggregate_type, d.aggregate_id)) FROM {dl} d WHERE {where_sql}"
            ),
            &params.refs(),
        )
        .await
        .map_err(|e| Error::pg("purge: cannot count dead letters", e))?;
    let (count, aggregates): (i64, i64) = (row.get(0), row.get(1));
    if args.dry_run {
        println!(
            "dry run: {count} dead letter{} of {aggregates} aggregate{} would be deleted",
            plural(count),
            plural(aggregates)
        );
        let rows = t
            .client()
            .query(
                &format!(
                    "SELECT d.event_id, d.aggregate_type, d.aggregate_id, d.event_type, \
                            extract(epoch FROM now() - d.dead_at)::float8, d.error \
                     FROM {dl} d WHERE {where_sql} ORDER BY d.position LIMIT 10"
                ),
                &params.refs(),
            )
            .await
            .map_err(|e| Error::pg("purge: cannot read dead letters", e))?;
        let sample: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    format!("{} ago", format_age(r.get(4))),
                    truncate(&r.get::<_, String>(5), 60),
                ]
            })
            .collect();
        if !sample.is_empty() {
            print!(
                "{}",
                render_table(
                    &[
                        "event_id",
                        "aggregate_type",
                        "aggregate_id",
                        "event_type",
                        "dead",
                        "error"
                    ],
                    &sample
                )
            );
        }
        println!("nothing was deleted (dry run)");
        return Ok(());
    }
    if count == 0 {
        println!("no dead letters match; nothing was deleted");
        return Ok(());
    }
    confirm(
        &format!(
            "Delete {count} dead letter{} of {aggregates} aggregate{}? Their events were never delivered and never will be.",
            plural(count),
            plural(aggregates)
        ),
        args.yes,
    )?;
    let released = super::dead_letters::delete_and_release(t, &where_sql, &params).await?;
    println!(
        "deleted {} dead letter{}; {} aggregate{} no longer held",
        released.deleted,
        plural(released.deleted as i64),
        released.released.len(),
        plural(released.released.len() as i64)
    );
    Ok(())
}
