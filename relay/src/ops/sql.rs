//! The SQL the operator commands share: the configured outbox as they see it (column names
//! quoted, column types from the catalog), event selections turned into `WHERE` conditions with
//! bind parameters, and the names of the replay tables.
//!
//! Identifiers come from configuration and are always emitted quoted ([`crate::ident`]);
//! values from the command line are always bind parameters, never spliced.

use std::sync::Arc;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::invalid;
use crate::config::{Config, SourceKind};
use crate::error::Error;
use crate::event::{OutboxEvent, RowColumns};
use crate::ident::QualifiedName;
use crate::outbox::{Outbox, TableShape, replay_tables};
use crate::pg::PgConn;

/// A selection, parsed and checked: ids canonical, times in ms since the epoch.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// Bind parameters collected while a statement is built; `push` returns the placeholder.
#[derive(Default)]
pub(crate) struct Params {
    values: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Params {
    pub fn push<T: ToSql + Sync + Send + 'static>(&mut self, value: T) -> String {
        self.values.push(Box::new(value));
        format!("${}", self.values.len())
    }

    pub fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// `WHERE` text for a list of conditions (`TRUE` when there are none).
pub(crate) fn where_all(conditions: &[String]) -> String {
    if conditions.is_empty() {
        "TRUE".into()
    } else {
        conditions.join(" AND ")
    }
}

/// The outbox table and its dead-letter table, as the operator commands use them.
pub(crate) struct OpsTable {
    pub conn: PgConn,
    pub outbox: Outbox,
    /// Poll mode: the table has the relay's bookkeeping (`relay_seq`, `relay_published_at`).
    pub poll: bool,
    pub replays: QualifiedName,
    pub replay_items: QualifiedName,
}

impl OpsTable {
    /// Connects and inspects the configured outbox ([`Outbox::inspect`] says what to fix when
    /// the table, a column, the bookkeeping or the dead-letter table is missing).
    pub async fn open(config: &Config) -> Result<Self, Error> {
        let conn = PgConn::connect(&config.database_url).await?;
        let poll = config.source == SourceKind::Poll;
        let outbox = Outbox::inspect(&conn.client, config, poll).await?;
        let (replays, replay_items) = replay_tables(&outbox.table);
        Ok(Self {
            conn,
            outbox,
            poll,
            replays,
            replay_items,
        })
    }

    pub fn client(&self) -> &Client {
        &self.conn.client
    }

    pub fn table(&self) -> &QualifiedName {
        &self.outbox.table
    }

    pub fn dead_letters(&self) -> &QualifiedName {
        &self.outbox.dead_letters
    }

    pub(crate) fn shape(&self) -> &TableShape {
        &self.outbox.shape
    }

    /// Quoted column names: id, aggregate_type, aggregate_id, event_type, payload.
    pub fn id(&self) -> &str {
        &self.shape().id.quoted
    }
    pub fn aggregate_type(&self) -> &str {
        &self.shape().aggregate_type.quoted
    }
    pub fn aggregate_id(&self) -> &str {
        &self.shape().aggregate_id.quoted
    }
    pub fn event_type(&self) -> &str {
        &self.shape().event_type.quoted
    }
    pub fn payload(&self) -> &str {
        &self.shape().payload.quoted
    }
    /// Quoted names of the optional columns the table has.
    pub fn headers(&self) -> Option<&str> {
        self.shape().headers.as_ref().map(|c| c.quoted.as_str())
    }
    pub fn traceparent(&self) -> Option<&str> {
        self.shape().traceparent.as_ref().map(|c| c.quoted.as_str())
    }
    pub fn tracestate(&self) -> Option<&str> {
        self.shape().tracestate.as_ref().map(|c| c.quoted.as_str())
    }
    pub fn created_at(&self) -> Option<&str> {
        self.shape().created_at.as_ref().map(|c| c.quoted.as_str())
    }

    /// The SQL type of a column (by its quoted name), e.g. `uuid`, `jsonb`,
    /// `character varying(255)`; it comes from the catalog, never from the user.
    pub fn type_of(&self, quoted: &str) -> &str {
        self.shape().type_of(quoted)
    }

    /// The event columns read by [`Self::event_from_row`], from the table aliased `o`.
    pub fn event_columns(&self) -> String {
        self.shape().event_columns("o")
    }

    /// The event in columns `first..` of `row` (see [`Self::event_columns`]).
    pub fn event_from_row(&self, row: &Row, first: usize, seq: i64) -> OutboxEvent {
        self.shape().decode(row, first, seq)
    }

    /// Outbox order, table aliased `o`: `relay_seq` in poll mode; in wal mode (no bookkeeping)
    /// `created_at`, then physical order, which is insert order for rows of one transaction.
    pub fn order_by(&self) -> Result<String, Error> {
        if self.poll {
            return Ok("o.relay_seq".into());
        }
        match self.created_at() {
            Some(c) => Ok(format!("o.{c}, o.ctid")),
            None => Err(invalid(format!(
                "the outbox table `{}` has no `{}` column of a timestamp type, so the order of its rows is unknown in wal mode and it cannot be replayed; add the column (timestamptz NOT NULL DEFAULT now()) or set outbox.columns.created_at",
                self.table().display(),
                self.created_at_name()
            ))),
        }
    }

    fn created_at_name(&self) -> &str {
        &self.shape().created_at_name
    }

    /// The selection as conditions on the outbox aliased `o`.
    pub fn event_conditions(
        &self,
        filter: &Filter,
        params: &mut Params,
    ) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        if !filter.ids.is_empty() {
            let p = params.push(filter.ids.clone());
            // Cast the list, not the column, so the primary key index is used.
            let id_type = self.type_of(self.id()).to_string();
            out.push(format!("o.{} = ANY({p}::text[]::{id_type}[])", self.id()));
        }
        if let Some(t) = &filter.aggregate_type {
            let p = params.push(t.clone());
            out.push(format!("o.{}::text = {p}", self.aggregate_type()));
        }
        if let Some(a) = &filter.aggregate_id {
            let p = params.push(a.clone());
            out.push(format!("o.{}::text = {p}", self.aggregate_id()));
        }
        if filter.since_ms.is_some() || filter.until_ms.is_some() {
            let Some(created) = self.created_at() else {
                return Err(invalid(format!(
                    "--since/--until select by creation time, but the outbox table `{}` has no `{}` timestamp column; select by --id or --aggregate-type/--aggregate-id, or set outbox.columns.created_at",
                    self.table().display(),
                    self.created_at_name()
                )));
            };
            if let Some(s) = filter.since_ms {
                let p = params.push(s);
                out.push(format!("o.{created} >= to_timestamp({p}::bigint / 1000.0)"));
            }
            if let Some(u) = filter.until_ms {
                let p = params.push(u);
                out.push(format!("o.{created} < to_timestamp({p}::bigint / 1000.0)"));
            }
        }
        Ok(out)
    }

    /// Ids of `filter.ids` that are not in the outbox table (nor, with `dead_letters`, in the
    /// dead-letter table).
    pub async fn unknown_ids(&self, ids: &[String]) -> Result<Vec<String>, Error> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        if self.type_of(self.id()) == "uuid" {
            let bad: Vec<String> = ids
                .iter()
                .filter(|id| uuid::Uuid::parse_str(id).is_err())
                .cloned()
                .collect();
            if !bad.is_empty() {
                return Err(invalid(format!(
                    "--id {} is not an event id: the outbox's ids are UUIDs",
                    bad.join(", ")
                )));
            }
        }
        let id_type = self.type_of(self.id());
        let rows = self
            .client()
            .query(
                &format!(
                    "SELECT o.{id}::text FROM {table} o WHERE o.{id} = ANY($1::text[]::{id_type}[])",
                    id = self.id(),
                    table = self.table(),
                ),
                &[&ids],
            )
            .await
            .map_err(|e| Error::pg("cannot look up event ids", e))?;
        let found: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(ids
            .iter()
            .filter(|id| !found.contains(*id))
            .cloned()
            .collect())
    }

    /// Fails unless migration `0005_replays` has run.
    pub async fn require_replay_tables(&self) -> Result<(), Error> {
        let exists: bool = self
            .client()
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                &[&self.replays.to_string(), &self.replay_items.to_string()],
            )
            .await
            .map_err(|e| Error::pg("cannot inspect the replay tables", e))?
            .get(0);
        if exists {
            Ok(())
        } else {
            Err(invalid(format!(
                "the replay table `{}` does not exist; run `outbox-relay migrate` (it adds it and changes nothing else)",
                self.replays.display()
            )))
        }
    }

    /// Whether some relay holds this outbox's leader lock: `(pid, application_name, client
    /// address, backend start in ms)`.
    pub async fn active_instance(
        &self,
    ) -> Result<Option<(i32, String, Option<String>, Option<i64>)>, Error> {
        let row = self
            .client()
            .query_opt(
                "SELECT a.pid, coalesce(a.application_name, ''), host(a.client_addr), \
                        (extract(epoch FROM a.backend_start) * 1000)::bigint \
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.classid = ($1::int4)::oid AND l.objid = hashtext($2)::oid \
                 LIMIT 1",
                &[&crate::outbox::LOCK_CLASS, &self.outbox.lock_key],
            )
            .await
            .map_err(|e| Error::pg("cannot read pg_locks", e))?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
    }
}

/// The selection as conditions on the dead-letter table aliased `d`; times are `dead_at`.
pub(crate) fn dead_letter_conditions(filter: &Filter, params: &mut Params) -> Vec<String> {
    let mut out = Vec::new();
    if !filter.ids.is_empty() {
        let p = params.push(filter.ids.clone());
        out.push(format!("d.event_id = ANY({p}::text[])"));
    }
    if let Some(t) = &filter.aggregate_type {
        let p = params.push(t.clone());
        out.push(format!("d.aggregate_type = {p}"));
    }
    if let Some(a) = &filter.aggregate_id {
        let p = params.push(a.clone());
        out.push(format!("d.aggregate_id = {p}"));
    }
    if let Some(s) = filter.since_ms {
        let p = params.push(s);
        out.push(format!("d.dead_at >= to_timestamp({p}::bigint / 1000.0)"));
    }
    if let Some(u) = filter.until_ms {
        let p = params.push(u);
        out.push(format!("d.dead_at < to_timestamp({p}::bigint / 1000.0)"));
    }
    out
}

/// One row of the dead-letter table.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct DeadLetter {
    pub position: i64,
    pub event_id: String,
    pub relay_seq: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
    #[serde(skip)]
    pub headers: Option<String>,
    /// The row's columns the templates named, as a JSON object (text).
    #[serde(skip)]
    pub columns: Option<String>,
    #[serde(skip)]
    pub traceparent: Option<String>,
    #[serde(skip)]
    pub tracestate: Option<String>,
    pub created_at_ms: Option<i64>,
    pub error: String,
    pub attempts: i32,
    pub holds_aggregate: bool,
    pub dead_at_ms: i64,
}

/// Columns read by [`DeadLetter::from_row`], from the dead-letter table aliased `d`.
pub(crate) const DEAD_LETTER_COLUMNS: &str = "d.position, d.event_id, d.relay_seq, \
    d.aggregate_type, d.aggregate_id, d.event_type, d.payload, d.headers, d.traceparent, \
    d.tracestate, (extract(epoch FROM d.created_at) * 1000)::bigint, d.error, d.attempts, \
    d.holds_aggregate, (extract(epoch FROM d.dead_at) * 1000)::bigint, d.columns::text";

impl DeadLetter {
    pub fn from_row(row: &Row) -> Self {
        Self {
            position: row.get(0),
            event_id: row.get(1),
            relay_seq: row.get(2),
            aggregate_type: row.get(3),
            aggregate_id: row.get(4),
            event_type: row.get(5),
            payload: row.get(6),
            headers: row.get(7),
            traceparent: row.get(8),
            tracestate: row.get(9),
            created_at_ms: row.get(10),
            error: row.get(11),
            attempts: row.get(12),
            holds_aggregate: row.get(13),
            dead_at_ms: row.get(14),
            columns: row.get(15),
        }
    }

    /// The event as the daemon would have published it.
    pub fn event(&self) -> OutboxEvent {
        RowColumns {
            id: Some(self.event_id.clone()),
            aggregate_type: Some(self.aggregate_type.clone()),
            aggregate_id: Some(self.aggregate_id.clone()),
            event_type: Some(self.event_type.clone()),
            payload: self.payload.clone(),
            headers: self.headers.clone(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            created_at_ms: self.created_at_ms,
            columns: self.template_columns(),
            // Kept as bytes: checked again.
            payload_is_json: false,
        }
        .into_event(self.position, None)
    }

    /// The template columns kept with the dead letter, by name.
    pub fn template_columns(&self) -> Vec<(Arc<str>, Option<String>)> {
        let Some(json) = &self.columns else {
            return vec![];
        };
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) {
            Ok(map) => map
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    };
                    (Arc::from(k.as_str()), v)
                })
                .collect(),
            // Not written by the relay (edited by hand): say so; a template naming one of its
            // columns then fails the event with "column … is NULL", never silently.
            Err(e) => {
                tracing::warn!(event_id = %self.event_id, error = %e, "the dead letter's `columns` is not a JSON object; its template columns are taken as NULL");
                vec![]
            }
        }
    }
}
