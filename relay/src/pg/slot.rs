//! Administration of the replication slot and the publication that log tailing reads from.
//! `migrate` creates them and the wal source checks and repairs them, both through here, so
//! the two always agree on what a usable slot is.
//!
//! Slots are cluster-wide objects (one name space for all databases of a cluster), bound to
//! one database and one output plugin: <https://www.postgresql.org/docs/15/logicaldecoding-explanation.html#LOGICALDECODING-REPLICATION-SLOTS>.

use pgwire_replication::Lsn;
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

/// Creates the pgoutput slot when missing; `true` if it was created. With `failover` on
/// Postgres 17+ it is a failover slot (`wal.failover_slot`): standbys with
/// `sync_replication_slots = on` keep a synced copy, so after a promotion streaming continues
/// from it instead of repairing a lost slot from the table.
pub async fn ensure_slot(client: &Client, slot: &str, failover: bool) -> Result<bool, Error> {
    if slot_exists(client, slot).await? {
        return Ok(false);
    }
    let failover = failover && server_version_num(client).await? >= 170_000;
    let sql = if failover {
        // (name, plugin, temporary, two-phase, failover)
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    client
        .execute(sql, &[&slot])
        .await
        .map_err(|e| Error::pg(format!("cannot create replication slot `{slot}`"), e))?;
    info!(slot, failover, "created logical replication slot");
    Ok(true)
}

/// `server_version_num`, e.g. 150004 or 170002.
pub async fn server_version_num(client: &Client) -> Result<i32, Error> {
    let v: String = client
        .query_one("SELECT current_setting('server_version_num')", &[])
        .await
        .map_err(|e| Error::pg("cannot read the server version", e))?
        .get(0);
    Ok(v.parse().unwrap_or(0))
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
    pub confirmed_flush: Option<Lsn>,
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, wal_status, \
                    (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint \
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
        confirmed_flush: r.get::<_, Option<i64>>(4).map(|v| Lsn(v as u64)),
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

/// The default slot name of `table` in `database`: `outbox_relay_<database>_<table>` (with the
/// schema when it is not `public`). Slots share one name space across all databases of a
/// cluster, so two services with the same table name in two databases get two slots. Slot
/// names allow only `[a-z0-9_]` and 63 bytes: a name that had to be changed to fit gets a
/// hash of the exact names, so it stays unique.
pub fn default_slot_name(database: &str, table: &QualifiedName) -> String {
    let raw = match table.schema.as_deref() {
        Some(schema) if schema != "public" => {
            format!("outbox_relay_{database}_{schema}_{}", table.name)
        }
        _ => format!("outbox_relay_{database}_{}", table.name),
    };
    let clean: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            _ => '_',
        })
        .collect();
    if clean == raw && clean.len() <= 63 {
        return clean;
    }
    // FNV-1a: a stable hash (std's is randomly seeded), only to tell names apart.
    let hash = raw.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{}_{hash:08x}", &clean[..clean.len().min(54)])
}

/// The default of earlier versions, `outbox_relay_<table>`: cluster-wide, so it clashed
/// between databases. A slot of that name in this database is still used (see
/// [`resolve_slot_name`]) so that an upgrade keeps its position.
fn former_default_slot_name(table: &QualifiedName) -> String {
    let mut n = format!("outbox_relay_{}", table.name).to_ascii_lowercase();
    n.truncate(63);
    n
}

/// The slot log tailing uses for `table`: `configured` (`wal.slot`) when set; otherwise the
/// default of this database ([`default_slot_name`]), or the former default when that slot
/// exists, belongs to this database and the new one does not exist (an upgrade).
pub async fn resolve_slot_name(
    client: &Client,
    configured: Option<&str>,
    table: &QualifiedName,
) -> Result<String, Error> {
    if let Some(slot) = configured {
        return Ok(slot.to_string());
    }
    let database = current_database(client).await?;
    let slot = default_slot_name(&database, table);
    if slot_info(client, &slot).await?.is_some() {
        return Ok(slot);
    }
    let former = former_default_slot_name(table);
    match slot_info(client, &former).await? {
        Some(info)
            if info.database.as_deref() == Some(database.as_str())
                && info.plugin.as_deref() == Some("pgoutput") =>
        {
            info!(
                slot = %former,
                "using the replication slot of the former default name (it belongs to this database); set wal.slot = \"{former}\" to keep it explicitly"
            );
            Ok(former)
        }
        _ => Ok(slot),
    }
}

async fn current_database(client: &Client) -> Result<String, Error> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| Error::pg("cannot read the database name", e))?
        .get(0))
}

/// Fails unless an existing `slot` can serve log tailing here: pgoutput, of this database.
/// `migrate` and the wal source give the same message. A missing slot passes (it is created).
pub async fn check_slot_usable(client: &Client, slot: &str) -> Result<(), Error> {
    let Some(info) = slot_info(client, slot).await? else {
        return Ok(());
    };
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::Setup(format!(
            "replication slot `{slot}` uses plugin `{}`, not pgoutput; drop it or set wal.slot to another name",
            info.plugin.unwrap_or_default()
        )));
    }
    let db = current_database(client).await?;
    if info.database.as_deref() != Some(db.as_str()) {
        return Err(Error::Setup(format!(
            "replication slot `{slot}` belongs to database `{}`, not `{db}`; set wal.slot to a slot of this database",
            info.database.unwrap_or_default()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> QualifiedName {
        QualifiedName::parse(name).unwrap()
    }

    #[test]
    fn default_slot_names_differ_per_database_and_fit_the_rules() {
        assert_eq!(
            default_slot_name("wallet", &table("outbox")),
            "outbox_relay_wallet_outbox"
        );
        assert_eq!(
            default_slot_name("wallet", &table("public.outbox")),
            "outbox_relay_wallet_outbox"
        );
        assert_eq!(
            default_slot_name("wallet", &table("billing.outbox")),
            "outbox_relay_wallet_billing_outbox"
        );
        assert_ne!(
            default_slot_name("wallet", &table("outbox")),
            default_slot_name("billing", &table("outbox"))
        );
        // Names that do not fit the slot rules are cleaned, and stay apart by their hash.
        let a = default_slot_name("My-App", &table("outbox"));
        let b = default_slot_name("my_app", &table("outbox"));
        assert_ne!(a, b);
        let long = default_slot_name(&"d".repeat(60), &table("outbox"));
        for name in [&a, &long] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
    }
}

/// What a standby among `DATABASE_URL`'s hosts holds of a failover slot.
#[derive(Debug, Clone, PartialEq)]
pub enum StandbyCopy {
    /// A synced copy (Postgres 17+ `synced = t`), as far as `confirmed` (its
    /// `confirmed_flush_lsn`).
    Synced { confirmed: Option<String> },
    /// The slot is there but not synced, or invalidated (the reason).
    Unusable(String),
    /// No slot of that name: the standby does not sync it (`sync_replication_slots`, a slot
    /// of its own on the primary, `hot_standby_feedback`) or has not yet.
    Missing,
    /// The server is not a standby (e.g. the primary itself, reached under another name).
    NotStandby,
    /// It could not be asked.
    Unreachable(String),
}

impl std::fmt::Display for StandbyCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Synced { confirmed } => write!(
                f,
                "synced, confirmed LSN {}",
                confirmed.as_deref().unwrap_or("-")
            ),
            Self::Unusable(why) => f.write_str(why),
            Self::Missing => f.write_str(
                "no copy of the slot (set sync_replication_slots = on, primary_slot_name and hot_standby_feedback = on on the standby, and dbname in its primary_conninfo)",
            ),
            Self::NotStandby => f.write_str("not a standby"),
            Self::Unreachable(e) => write!(f, "cannot be asked: {e}"),
        }
    }
}

/// Asks every host of `DATABASE_URL` what it holds of `slot`, with a short timeout each: the
/// answer to "would a failover keep the slot?". The primary (it answers "not a standby") is
/// left out. Empty when the URL names one host.
pub async fn standby_copies(
    url: &crate::config::secret::Secret,
    slot: &str,
) -> Vec<((String, u16), StandbyCopy)> {
    let Ok(target) = crate::pg::tls::PgTarget::parse(url) else {
        return Vec::new();
    };
    let hosts = target.hosts();
    if hosts.len() < 2 {
        return Vec::new();
    }
    let Ok(tls) = target.connector() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (host, port) in hosts {
        // A config of that one host (tokio-postgres can add hosts to a config, not drop them).
        let from = &target.config;
        let mut config = tokio_postgres::Config::new();
        if let Some(user) = from.get_user() {
            config.user(user);
        }
        if let Some(password) = from.get_password() {
            config.password(password);
        }
        if let Some(db) = from.get_dbname() {
            config.dbname(db);
        }
        config
            .ssl_mode(from.get_ssl_mode())
            .host(&host)
            .port(port)
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::Any)
            .connect_timeout(std::time::Duration::from_secs(3))
            .application_name("outbox-relay");
        let copy = match config.connect(tls.clone()).await {
            Err(e) => StandbyCopy::Unreachable(crate::error::describe_pg(&e)),
            Ok((client, connection)) => {
                let task = tokio::spawn(connection);
                let copy = ask_standby(&client, slot).await;
                drop(client);
                task.abort();
                copy
            }
        };
        if copy != StandbyCopy::NotStandby {
            out.push(((host, port), copy));
        }
    }
    out
}

async fn ask_standby(client: &Client, slot: &str) -> StandbyCopy {
    let standby = match client.query_one("SELECT pg_is_in_recovery()", &[]).await {
        Ok(row) => row.get::<_, bool>(0),
        Err(e) => return StandbyCopy::Unreachable(crate::error::describe_pg(&e)),
    };
    if !standby {
        return StandbyCopy::NotStandby;
    }
    // `synced` and `invalidation_reason` exist from Postgres 17 on.
    let row = client
        .query_opt(
            "SELECT synced, confirmed_flush_lsn::text, invalidation_reason \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    match row {
        Err(e) => StandbyCopy::Unreachable(crate::error::describe_pg(&e)),
        Ok(None) => StandbyCopy::Missing,
        Ok(Some(row)) => {
            let synced: bool = row.get(0);
            let invalidated: Option<String> = row.get(2);
            match (synced, invalidated) {
                (_, Some(why)) => StandbyCopy::Unusable(format!("copy invalidated ({why})")),
                (false, None) => {
                    StandbyCopy::Unusable("a slot of that name that is not a synced copy".into())
                }
                (true, None) => StandbyCopy::Synced {
                    confirmed: row.get(1),
                },
            }
        }
    }
}

/// One line for `status` and `/readyz`: each standby and what it holds.
pub fn describe_copies(copies: &[((String, u16), StandbyCopy)]) -> String {
    copies
        .iter()
        .map(|((h, p), c)| format!("{h}:{p}: {c}"))
        .collect::<Vec<_>>()
        .join("; ")
}
