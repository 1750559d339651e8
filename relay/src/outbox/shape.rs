//! The configured outbox table as the relay reads it: which of its columns exist, their SQL
//! types, and the one column list that both selects an event and decodes it.
//!
//! The table is inspected once ([`TableShape::inspect`]) by whoever opens the outbox: the
//! daemon, the health observer and the operator commands share the result through
//! [`super::Outbox`]. Optional columns (`headers`, `traceparent`, `tracestate`, `created_at`)
//! may be absent; the statements then read NULL in their place, so one decoder fits every
//! table. Column names come from configuration and are always emitted quoted.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::{Client, Row};

use crate::config::OutboxConfig;
use crate::error::Error;
use crate::event::{OutboxEvent, RowColumns};
use crate::ident::{QualifiedName, quote};

/// How many columns [`TableShape::event_columns`] selects before the template columns.
const FIXED_COLUMNS: usize = 9;

/// One column of the outbox table: its quoted name and its type as `format_type` prints it
/// (`uuid`, `jsonb`, `character varying(255)`); both come from the catalog or the validated
/// configuration, never from a command line.
#[derive(Debug, Clone)]
pub struct Column {
    pub quoted: String,
    pub sql_type: String,
}

/// The outbox table's event columns. See the module docs.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub id: Column,
    pub aggregate_type: Column,
    pub aggregate_id: Column,
    pub event_type: Column,
    pub payload: Column,
    pub headers: Option<Column>,
    pub traceparent: Option<Column>,
    pub tracestate: Option<Column>,
    /// Present only when of a timestamp type: it orders rows in wal mode and bounds retention.
    pub created_at: Option<Column>,
    /// The configured name of `created_at` (unquoted), for messages when it is missing.
    pub created_at_name: String,
    /// The other columns the templates name (`{tenant}`), with their names as events carry
    /// them.
    pub template_columns: Vec<(Arc<str>, Column)>,
}

impl TableShape {
    /// Inspects `table`. Fails with the fix when the table, a required column, a column a
    /// template names (`template_columns`: name and setting), the relay's bookkeeping
    /// (`bookkeeping`: poll mode) or the dead-letter table is missing, or when the payload has
    /// a type the relay cannot send.
    pub async fn inspect(
        client: &Client,
        table: &QualifiedName,
        dead_letters: &QualifiedName,
        cfg: &OutboxConfig,
        template_columns: &[(String, &'static str)],
        bookkeeping: bool,
    ) -> Result<Self, Error> {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table.to_string()],
            )
            .await
            .map_err(|e| Error::pg(format!("cannot inspect table `{}`", table.display()), e))?;
        if rows.is_empty() {
            return Err(Error::Setup(format!(
                "the outbox table `{}` does not exist (or this role cannot see it); run `outbox-relay migrate` or set outbox.table",
                table.display()
            )));
        }
        let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let c = &cfg.columns;
        let column = |name: &str| {
            types.get(name).map(|t| Column {
                quoted: quote(name),
                sql_type: t.clone(),
            })
        };
        let required = |setting: &str, name: &str| {
            column(name).ok_or_else(|| {
                Error::Setup(format!(
                    "the outbox table `{}` has no column `{name}` (outbox.columns.{setting}); set outbox.columns.{setting} to the right column name",
                    table.display()
                ))
            })
        };
        let id = required("id", &c.id)?;
        let aggregate_type = required("aggregate_type", &c.aggregate_type)?;
        let aggregate_id = required("aggregate_id", &c.aggregate_id)?;
        let event_type = required("event_type", &c.event_type)?;
        let payload = required("payload", &c.payload)?;
        let template_columns = template_columns
            .iter()
            .map(|(name, setting)| {
                column(name).map(|col| (Arc::from(name.as_str()), col)).ok_or_else(|| {
                    Error::Setup(format!(
                        "{setting} names {{{name}}}, but the outbox table `{}` has no column `{name}`; name a column of the table, or one of {{aggregate_type}}, {{aggregate_id}}, {{event_type}}",
                        table.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let required: &[&str] = if bookkeeping {
            &[
                "relay_seq",
                "relay_published_at",
                "relay_attempts",
                "relay_last_error",
            ]
        } else {
            &[]
        };
        for bookkeeping in required {
            if !types.contains_key(*bookkeeping) {
                return Err(Error::Setup(format!(
                    "the outbox table `{}` lacks the relay's column `{bookkeeping}`; run `outbox-relay migrate` (it adds the bookkeeping columns and changes nothing else)",
                    table.display()
                )));
            }
        }
        check_dead_letter_table(client, dead_letters).await?;
        if !["jsonb", "json", "text", "bytea"].contains(&payload.sql_type.as_str())
            && !payload.sql_type.starts_with("character varying")
        {
            return Err(Error::Setup(format!(
                "column `{}` of `{}` has type {}; the payload must be jsonb, json, text, varchar or bytea",
                c.payload,
                table.display(),
                payload.sql_type
            )));
        }
        Ok(Self {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            headers: column(&c.headers),
            traceparent: column(&c.traceparent),
            tracestate: column(&c.tracestate),
            created_at: column(&c.created_at).filter(|t| t.sql_type.starts_with("timestamp")),
            created_at_name: c.created_at.clone(),
            template_columns,
        })
    }

    /// The names of [`Self::template_columns`].
    pub fn template_column_names(&self) -> Vec<Arc<str>> {
        self.template_columns
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// How many columns [`Self::event_columns`] selects.
    pub fn width(&self) -> usize {
        FIXED_COLUMNS + self.template_columns.len()
    }

    pub fn payload_is_bytea(&self) -> bool {
        self.payload.sql_type == "bytea"
    }

    /// A `json` or `jsonb` payload: Postgres checked it when it was written.
    pub fn payload_is_json(&self) -> bool {
        matches!(self.payload.sql_type.as_str(), "json" | "jsonb")
    }

    /// The SQL type of a column by its quoted name; `text` for one the table does not have.
    pub fn type_of(&self, quoted: &str) -> &str {
        [
            Some(&self.id),
            Some(&self.aggregate_type),
            Some(&self.aggregate_id),
            Some(&self.event_type),
            Some(&self.payload),
            self.headers.as_ref(),
            self.traceparent.as_ref(),
            self.tracestate.as_ref(),
            self.created_at.as_ref(),
        ]
        .into_iter()
        .flatten()
        .find(|c| c.quoted == quoted)
        .map(|c| c.sql_type.as_str())
        .unwrap_or("text")
    }

    /// The [`Self::width`] columns that [`Self::decode`] reads, from the table aliased `a`.
    /// Text columns as text, the payload as bytes (text payloads encoded as UTF-8), the
    /// creation time as ms since the Unix epoch, NULL for a column the table lacks.
    pub fn event_columns(&self, a: &str) -> String {
        let text = |col: Option<&Column>| match col {
            Some(c) => format!("{a}.{}::text", c.quoted),
            None => "NULL::text".into(),
        };
        let payload = if self.payload_is_bytea() {
            format!("{a}.{}", self.payload.quoted)
        } else {
            format!("convert_to({a}.{}::text, 'UTF8')", self.payload.quoted)
        };
        let created = match &self.created_at {
            Some(c) => format!("(extract(epoch FROM {a}.{}) * 1000)::bigint", c.quoted),
            None => "NULL::bigint".into(),
        };
        let mut columns = format!(
            "{}, {}, {}, {}, {payload}, {}, {}, {}, {created}",
            text(Some(&self.id)),
            text(Some(&self.aggregate_type)),
            text(Some(&self.aggregate_id)),
            text(Some(&self.event_type)),
            text(self.headers.as_ref()),
            text(self.traceparent.as_ref()),
            text(self.tracestate.as_ref()),
        );
        for (_, c) in &self.template_columns {
            columns.push_str(", ");
            columns.push_str(&text(Some(c)));
        }
        columns
    }

    /// The event in columns `first..first + self.width()` of `row`, selected by
    /// [`Self::event_columns`], at source position `seq`.
    pub fn decode(&self, row: &Row, first: usize, seq: i64) -> OutboxEvent {
        let text = |i: usize| row.get::<_, Option<String>>(first + i);
        RowColumns {
            id: text(0),
            aggregate_type: text(1),
            aggregate_id: text(2),
            event_type: text(3),
            payload: row.get(first + 4),
            headers: text(5),
            traceparent: text(6),
            tracestate: text(7),
            created_at_ms: row.get(first + 8),
            columns: (self.template_columns.iter().enumerate())
                .map(|(i, (name, _))| (name.clone(), text(FIXED_COLUMNS + i)))
                .collect(),
            payload_is_json: self.payload_is_json(),
        }
        .into_event(seq, None)
    }
}

/// The dead-letter table must exist with the current schema (payload as bytea).
async fn check_dead_letter_table(
    client: &Client,
    dead_letters: &QualifiedName,
) -> Result<(), Error> {
    let dl_exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&dead_letters.to_string()],
        )
        .await
        .map_err(|e| Error::pg("cannot inspect the dead-letter table", e))?
        .get(0);
    if !dl_exists {
        return Err(Error::Setup(format!(
            "the dead-letter table `{}` does not exist; run `outbox-relay migrate`",
            dead_letters.display()
        )));
    }
    let dl_payload: Option<String> = client
        .query_one(
            "SELECT (SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1::text::regclass AND attname = 'payload' AND NOT attisdropped)",
            &[&dead_letters.to_string()],
        )
        .await
        .map_err(|e| Error::pg("cannot inspect the dead-letter table", e))?
        .get(0);
    if dl_payload.as_deref() != Some("bytea") {
        return Err(Error::Setup(format!(
            "the dead-letter table `{}` has a payload column of type {}, not bytea (an older schema); run `outbox-relay migrate` to convert it",
            dead_letters.display(),
            dl_payload.as_deref().unwrap_or("(none)")
        )));
    }
    Ok(())
}
