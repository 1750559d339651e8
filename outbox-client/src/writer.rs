//! The writer side: add an event to the outbox in the caller's transaction.
//!
//! The insert runs on the connection the caller passes, which should be inside the transaction
//! that writes the business rows: the event then exists exactly when the business change does
//! (both commit or neither does). The relay publishes it after commit.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::trace::{self, TraceHeaders};
use crate::{Error, TableName};

/// An event to write to the outbox: one row of the outbox table `outbox-relay migrate` creates.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event id consumers deduplicate on; a UUIDv7 (time-ordered) unless set.
    pub id: Uuid,
    /// Selects the topic / routing key, e.g. `wallet`.
    pub aggregate_type: String,
    /// The Kafka key and the unit of ordering, e.g. the wallet id.
    pub aggregate_id: String,
    /// E.g. `CardAdded`.
    pub event_type: String,
    /// The message body.
    pub payload: serde_json::Value,
    /// Extra string headers, copied onto the message.
    pub headers: BTreeMap<String, String>,
    /// The trace context to store; `None` captures the current one at [`Outbox::enqueue`].
    pub trace: Option<TraceHeaders>,
}

impl NewEvent {
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl ToString,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.to_string(),
            event_type: event_type.into(),
            payload,
            headers: BTreeMap::new(),
            trace: None,
        }
    }

    /// Uses this id instead of a fresh one (e.g. one derived from an idempotency key).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Adds a string header to the message.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Stores this trace context instead of capturing the current one.
    pub fn with_trace(mut self, trace: TraceHeaders) -> Self {
        self.trace = Some(trace);
        self
    }
}

/// An outbox table to write to. [`Outbox::default`] is the table `outbox` that
/// `outbox-relay migrate` creates.
#[derive(Debug, Clone)]
pub struct Outbox {
    table: TableName,
    insert: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::with_table(TableName::parse("outbox").expect("a valid name"))
    }
}

impl Outbox {
    /// An outbox table other than `outbox`, optionally schema-qualified (`billing.outbox`).
    pub fn new(table: &str) -> Result<Self, Error> {
        Ok(Self::with_table(TableName::parse(table)?))
    }

    fn with_table(table: TableName) -> Self {
        let insert = format!(
            "INSERT INTO {table} \
             (id, aggregate_type, aggregate_id, event_type, payload, headers, traceparent, tracestate) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        );
        Self { table, insert }
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Inserts `event` on `conn` — pass the transaction of the business write
    /// (`&mut *tx`) — and returns its id. The trace context stored is the event's own, or else
    /// the current one ([`trace::current_context`]); without any, the columns stay NULL and the
    /// relay starts a new trace.
    pub async fn enqueue(&self, conn: &mut PgConnection, event: NewEvent) -> Result<Uuid, Error> {
        let trace = event
            .trace
            .unwrap_or_else(|| trace::inject(&trace::current_context()));
        let headers = serde_json::to_value(&event.headers)?;
        sqlx::query(&self.insert)
            .bind(event.id)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(&event.payload)
            .bind(headers)
            .bind(trace.traceparent)
            .bind(trace.tracestate)
            .execute(conn)
            .await?;
        tracing::debug!(
            event.id = %event.id,
            event.r#type = %event.event_type,
            aggregate.id = %event.aggregate_id,
            "event added to the outbox"
        );
        Ok(event.id)
    }
}

/// [`Outbox::enqueue`] on the default table `outbox`.
pub async fn enqueue(conn: &mut PgConnection, event: NewEvent) -> Result<Uuid, Error> {
    Outbox::default().enqueue(conn, event).await
}
