//! Operating the outbox from the CLI: `status`, `replay`, `purge`, `dead-letters`.
//!
//! Every command works against the database the daemon uses, safely while it runs:
//!
//! - `status` only reads (counts, `pg_locks`, `pg_replication_slots`); it takes no lock.
//! - `replay` only reads the outbox and publishes copies through the same [`crate::sink`] the
//!   daemon uses; its progress lives in `<table>_replays` / `<table>_replay_items`, advanced
//!   only after the broker confirmed, so an interrupted replay resumes without sending twice.
//! - `purge` deletes with one statement per batch; in poll mode the daemon's retention cleanup
//!   and `purge --older-than` run the same statement ([`crate::outbox::Outbox::cleanup`]).
//! - `dead-letters retry` in poll mode moves dead letters back into the outbox in one
//!   transaction, at their original `relay_seq`, so the daemon publishes them before the held
//!   events behind them; in wal mode it publishes them itself (see [`dead_letters`]).
//!
//! Bad input (unknown event id, empty or inverted time range, malformed duration, unknown
//! topic, unpublished events without `--include-unpublished`) is one message and exit code 1,
//! and is detected before anything is changed.

pub mod dead_letters;
pub mod purge;
pub mod replay;
pub mod sql;
pub mod status;

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::Error;

/// The operator subcommands, flattened into the top-level CLI.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Pending events, oldest pending age, published in the last minute, dead letters and held
    /// aggregates, the active instance, and in wal mode the replication slot and its lag.
    Status(status::StatusArgs),
    /// Publish retained events again, selected by id, time range or aggregate (--dry-run);
    /// interrupted replays continue with --resume.
    Replay(Box<replay::ReplayArgs>),
    /// Delete published events by age or selection, or dead letters (--dry-run; asks before
    /// deleting anything that was never delivered).
    Purge(Box<purge::PurgeArgs>),
    /// Events the broker refused permanently: list | retry | discard.
    #[command(subcommand)]
    DeadLetters(Box<dead_letters::DeadLettersCommand>),
}

/// Runs one operator subcommand.
pub async fn execute(config: &Config, command: OpsCommand) -> Result<(), Error> {
    match command {
        OpsCommand::Status(args) => status::run(config, args).await,
        OpsCommand::Replay(args) => replay::run(config, *args).await,
        OpsCommand::Purge(args) => purge::run(config, *args).await,
        OpsCommand::DeadLetters(command) => dead_letters::run(config, *command).await,
    }
}

/// Which events a command acts on. Criteria combine with AND.
#[derive(Debug, Clone, Default, Args)]
pub struct SelectionArgs {
    /// Event id(s); repeat the flag or separate with commas.
    #[arg(long = "id", value_name = "EVENT_ID", value_delimiter = ',')]
    pub ids: Vec<String>,
    /// Only events of this aggregate type (e.g. `wallet`).
    #[arg(long, value_name = "TYPE")]
    pub aggregate_type: Option<String>,
    /// Only events of this aggregate id.
    #[arg(long, value_name = "ID")]
    pub aggregate_id: Option<String>,
    /// Created at or after this time: RFC 3339 (`2024-05-01T12:00:00Z`) or a duration ago
    /// (`2h`, `30m`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Created before this time: RFC 3339 or a duration ago.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

impl SelectionArgs {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.aggregate_type.is_none()
            && self.aggregate_id.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    /// Parses times and ids into a [`sql::Filter`]; every mistake is an error here, before
    /// anything is read or changed.
    pub async fn resolve(&self, client: &Client) -> Result<sql::Filter, Error> {
        let mut ids = Vec::with_capacity(self.ids.len());
        for id in &self.ids {
            let id = id.trim();
            if id.is_empty() {
                return Err(invalid("--id must not be empty"));
            }
            // A UUID in any spelling becomes the canonical text Postgres prints.
            ids.push(match uuid::Uuid::parse_str(id) {
                Ok(u) => u.to_string(),
                Err(_) => id.to_string(),
            });
        }
        ids.dedup();
        let now = server_now_ms(client).await?;
        let since = match &self.since {
            Some(s) => Some(parse_time(client, "--since", s, now).await?),
            None => None,
        };
        let until = match &self.until {
            Some(s) => Some(parse_time(client, "--until", s, now).await?),
            None => None,
        };
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(invalid(format!(
                "the time range is {}: --since {} is not before --until {}; give an earlier --since or a later --until",
                if since == until { "empty" } else { "inverted" },
                format_ms(since),
                format_ms(until)
            )));
        }
        for (flag, value) in [
            ("--aggregate-type", &self.aggregate_type),
            ("--aggregate-id", &self.aggregate_id),
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(format!("{flag} must not be empty")));
            }
        }
        Ok(sql::Filter {
            ids,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            since_ms: since,
            until_ms: until,
        })
    }

    /// One line for humans and for the replay record, e.g. `aggregate_type=wallet since=...`.
    pub fn describe(filter: &sql::Filter) -> String {
        let mut parts = Vec::new();
        if !filter.ids.is_empty() {
            parts.push(format!("id={}", filter.ids.join(",")));
        }
        if let Some(t) = &filter.aggregate_type {
            parts.push(format!("aggregate_type={t}"));
        }
        if let Some(a) = &filter.aggregate_id {
            parts.push(format!("aggregate_id={a}"));
        }
        if let Some(s) = filter.since_ms {
            parts.push(format!("since={}", format_ms(s)));
        }
        if let Some(u) = filter.until_ms {
            parts.push(format!("until={}", format_ms(u)));
        }
        if parts.is_empty() {
            "all".into()
        } else {
            parts.join(" ")
        }
    }
}

/// An operator mistake: the message says what is wrong and what to do.
pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::Invalid(message.into())
}

/// A duration such as `90s`, `2h`, `7d`, `1h 30m`.
pub(crate) fn parse_duration(flag: &str, value: &str) -> Result<Duration, Error> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(format!(
            "{flag} `{value}` is not a duration ({e}); use e.g. 90s, 30m, 2h, 7d"
        ))
    })
}

/// A point in time as milliseconds since the epoch: a duration ago (`2h`) measured from the
/// server's clock, or a timestamp Postgres understands (RFC 3339, with or without offset).
pub(crate) async fn parse_time(
    client: &Client,
    flag: &str,
    value: &str,
    server_now_ms: i64,
) -> Result<i64, Error> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("{flag} must not be empty")));
    }
    if let Ok(ago) = humantime::parse_duration(value) {
        return Ok(server_now_ms - ago.as_millis() as i64);
    }
    // Only strings that look like a date go to Postgres, so words like `now` or `epoch` (which
    // it would accept) are not taken by surprise.
    let looks_like_date = value.len() >= 10
        && value.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && value.as_bytes()[4] == b'-';
    let parsed = if looks_like_date {
        client
            .query_one(
                "SELECT (extract(epoch FROM $1::text::timestamptz) * 1000)::bigint",
                &[&value],
            )
            .await
            .ok()
            .map(|r| r.get::<_, i64>(0))
    } else {
        None
    };
    parsed.ok_or_else(|| {
        invalid(format!(
            "{flag} `{value}` is neither a time (RFC 3339, e.g. 2024-05-01T12:00:00Z) nor a duration ago (e.g. 30m, 2h, 7d)"
        ))
    })
}

pub(crate) async fn server_now_ms(client: &Client) -> Result<i64, Error> {
    Ok(client
        .query_one("SELECT (extract(epoch FROM now()) * 1000)::bigint", &[])
        .await
        .map_err(|e| Error::pg("cannot read the server's clock", e))?
        .get(0))
}

/// `2024-05-01T12:00:00Z`.
pub(crate) fn format_ms(ms: i64) -> String {
    let t = if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A short age: `850ms`, `4.2s`, `3m 12s`, `2h 5m`, `3d 4h`.
pub(crate) fn format_age(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "0s".into();
    }
    let s = secs as u64;
    match s {
        _ if secs < 1.0 => format!("{}ms", (secs * 1000.0).round() as u64),
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `512 B`, `1.5 MiB`.
pub(crate) fn format_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes.max(0) as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Asks before something that cannot be undone. `--yes` skips the question; otherwise the
/// answer is read from stdin (a terminal, or `echo yes |` in a script), and anything but `y` /
/// `yes` — including no answer at all — cancels with an error, so nothing is changed.
pub(crate) fn confirm(question: &str, yes: bool) -> Result<(), Error> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let read = stdin.lock().read_line(&mut answer).unwrap_or(0);
    if read == 0 {
        eprintln!();
    }
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ if read == 0 && !interactive => Err(invalid(
            "this needs a confirmation and there is no answer on stdin; pass --yes to confirm, nothing was changed",
        )),
        _ => Err(invalid("not confirmed; nothing was changed")),
    }
}

/// A plain text table: a header row, then rows, columns padded to the widest cell.
/// A sample of selected events as a table: id, aggregate, type, creation time, then one column
/// of the command's own (`last`: its header and the value for each event).
pub(crate) fn event_sample_table(
    events: impl IntoIterator<Item = (crate::event::OutboxEvent, String)>,
    last: &str,
) -> String {
    let rows: Vec<Vec<String>> = events
        .into_iter()
        .map(|(e, extra)| {
            vec![
                e.id,
                e.aggregate_type,
                e.aggregate_id,
                e.event_type,
                e.created_at_ms.map(format_ms).unwrap_or_default(),
                extra,
            ]
        })
        .collect();
    render_table(
        &[
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "created_at",
            last,
        ],
        &rows,
    )
}

pub(crate) fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Cuts `s` to `max` characters, marking the cut with `…`.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

pub(crate) use crate::engine::publish_ordered;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(format_age(0.25), "250ms");
        assert_eq!(format_age(4.24), "4.2s");
        assert_eq!(format_age(192.0), "3m 12s");
        assert_eq!(format_age(7500.0), "2h 5m");
        assert_eq!(format_age(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536 * 1024), "1.5 MiB");
    }

    #[test]
    fn malformed_durations_are_one_clear_message() {
        let e = parse_duration("--older-than", "5 parsecs")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--older-than `5 parsecs` is not a duration"),
            "{e}"
        );
        assert_eq!(
            parse_duration("--older-than", "2h").unwrap(),
            Duration::from_secs(7200)
        );
    }

    #[test]
    fn tables_are_padded() {
        let t = render_table(
            &["a", "bb"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "a    bb\nxxx  y\nz    w\n");
    }
}
