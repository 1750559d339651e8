//! Administration of the replication slot and the publication that log tailing reads from.
//! `migrate` creates them and the wal source checks and repairs them, both through here, so
//! the two always agree on what a usable slot is.
//!
//! Slots are cluster-wide objects (one name space for all databases of a cluster), bound to
//! one database and one output plugin: <https://www.postgresql.org/docs/15/logicaldecoding-explanation.html#LOGICALDECODING-REPLICATION-SLOTS>.

use tokio_postgres::Client;
use tracing::info;

use crate::error::Error;
use crate::ident::{QualifiedName, quote};

/// Fails unless the server can do logical decoding.
pub async fn check_wal_level(client: &Client) -> Result<(), Error> {
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| Error::pg("cannot read wal_level", e))?
        .get(0);
    if level != "logical" {
        return Err(Error::Setup(format!(
            "wal_level is `{level}`, but log tailing needs `logical`: run ALTER SYSTEM SET wal_level = logical and restart Postgres, or use RELAY_SOURCE=poll"
        )));
    }
    Ok(())
}

pub async fn slot_exists(client: &Client, slot: &str) -> Result<bool, Error> {
    Ok(slot_info(client, slot).await?.is_some())
}

/// Creates the pgoutput slot when missing; `true` if it was created.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<bool, Error> {
    if slot_exists(client, slot).await? {
        return Ok(false);
    }
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(|e| Error::pg(format!("cannot create replication slot `{slot}`"), e))?;
    info!(slot, "created logical replication slot");
    Ok(true)
}

/// Bytes between the server's WAL position and the slot's confirmed one, and the WAL the slot
/// retains; `None` when the slot does not exist.
pub async fn slot_lag(client: &Client, slot: &str) -> Result<Option<(i64, i64)>, Error> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                    (pg_current_wal_lsn() - restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::pg("cannot read the replication slot's position", e))?;
    Ok(row.map(|r| {
        (
            r.get::<_, Option<i64>>(0).unwrap_or(0),
            r.get::<_, Option<i64>>(1).unwrap_or(0),
        )
    }))
}

/// A slot as `pg_replication_slots` shows it.
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<String>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, wal_status, confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::pg("cannot inspect replication slots", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        wal_status: r.get(3),
        confirmed_flush: r.get(4),
    }))
}

/// Creates the publication (inserts only) or adds the table to an existing one.
pub async fn ensure_publication(
    tx: &tokio_postgres::Transaction<'_>,
    publication: &str,
    table: &QualifiedName,
) -> Result<(), Error> {
    let exists = tx
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| Error::pg("migrate: cannot inspect publications", e))?
        .is_some();
    let sql = if !exists {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {table} WITH (publish = 'insert')",
            quote(publication)
        )
    } else if tx
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema_or_public(), &table.name],
        )
        .await
        .map_err(|e| Error::pg("migrate: cannot inspect publication tables", e))?
        .is_none()
    {
        format!("ALTER PUBLICATION {} ADD TABLE {table}", quote(publication))
    } else {
        return Ok(());
    };
    tx.batch_execute(&sql).await.map_err(|e| {
        Error::pg(
            format!("migrate: cannot set up publication `{publication}`"),
            e,
        )
    })
}
