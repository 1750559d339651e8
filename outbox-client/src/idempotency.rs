//! The idempotent consumer: remember which events were processed, in the consumer's own
//! transaction.
//!
//! The relay delivers at least once, so a consumer sees some events twice (after a relay crash,
//! a broker redelivery, a replay). [`claim`] inserts the event id into `processed_events` in the
//! same transaction as the consumer's effects: if that transaction commits, the id is recorded
//! together with the effects; if it rolls back, neither is. A second claim of the same id returns
//! `false`, and the consumer skips the event. Two concurrent claims of one id serialize on the
//! primary key: the second waits for the first transaction and then sees it.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::{Error, TableName};

/// A table of processed event ids, `processed_events` by default. One table serves many
/// consumers: rows are keyed by `(consumer, event_id)`.
#[derive(Debug, Clone)]
pub struct ProcessedEvents {
    table: TableName,
    claim: String,
}

impl Default for ProcessedEvents {
    fn default() -> Self {
        Self::with_table(TableName::parse("processed_events").expect("a valid name"))
    }
}

impl ProcessedEvents {
    /// A table other than `processed_events`, optionally schema-qualified.
    pub fn new(table: &str) -> Result<Self, Error> {
        Ok(Self::with_table(TableName::parse(table)?))
    }

    fn with_table(table: TableName) -> Self {
        let claim = format!(
            "INSERT INTO {table} (consumer, event_id) VALUES ($1, $2) \
             ON CONFLICT (consumer, event_id) DO NOTHING"
        );
        Self { table, claim }
    }

    /// The `CREATE TABLE IF NOT EXISTS` statement, for a migration of your own.
    pub fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
                 consumer     text        NOT NULL,\n    \
                 event_id     uuid        NOT NULL,\n    \
                 processed_at timestamptz NOT NULL DEFAULT now(),\n    \
                 PRIMARY KEY (consumer, event_id)\n\
             )",
            self.table
        )
    }

    /// Creates the table when it does not exist (idempotent).
    pub async fn ensure_table(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::raw_sql(&self.ddl()).execute(conn).await?;
        Ok(())
    }

    /// Records that `consumer` processes `event_id`, on `conn` — pass the transaction that
    /// applies the event's effects. `true`: first time, go ahead. `false`: already processed
    /// (by a committed transaction), skip it.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<bool, Error> {
        let inserted = sqlx::query(&self.claim)
            .bind(consumer)
            .bind(event_id)
            .execute(conn)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }
}

/// [`ProcessedEvents::claim`] on the default table `processed_events`.
pub async fn claim(conn: &mut PgConnection, consumer: &str, event_id: Uuid) -> Result<bool, Error> {
    ProcessedEvents::default()
        .claim(conn, consumer, event_id)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_uses_the_configured_table() {
        let ddl = ProcessedEvents::new("billing.seen").unwrap().ddl();
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"billing\".\"seen\""));
        assert!(ddl.contains("PRIMARY KEY (consumer, event_id)"));
    }
}
