//! What log tailing needs from the server, checked before it streams, so that a missing
//! privilege or publication is one message with its fix instead of a replication error later.
//!
//! Docs: <https://www.postgresql.org/docs/15/logical-replication-security.html>,
//! <https://www.postgresql.org/docs/15/sql-createpublication.html>.

use tokio_postgres::Client;

use crate::config::Config;
use crate::error::Error;
use crate::ident::QualifiedName;
use crate::pg::slot::{check_slot_usable, check_wal_level};

/// Each prerequisite of log tailing, checked before streaming, with its fix: wal_level,
/// REPLICATION privilege, publication present and covering the table with inserts, slot of
/// this database and of pgoutput (a missing slot is created later, when allowed).
pub(super) async fn check_setup(
    client: &Client,
    config: &Config,
    table: &QualifiedName,
    slot: &str,
) -> Result<(), Error> {
    check_wal_level(client).await?;
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| Error::pg("cannot read the role's attributes", e))?;
    let (role, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(Error::Setup(format!(
            "role `{role}` may not use replication; grant it with ALTER ROLE {role} REPLICATION (or use RELAY_SOURCE=poll)"
        )));
    }
    let publication = config.wal.publication_name(&config.outbox.table);
    let pubinsert: Option<bool> = client
        .query_opt(
            "SELECT pubinsert FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| Error::pg("cannot inspect publications", e))?
        .map(|r| r.get(0));
    match pubinsert {
        None => {
            return Err(Error::Setup(format!(
                "publication `{publication}` does not exist; run `outbox-relay migrate` with RELAY_SOURCE=wal, or CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish = 'insert')",
                table.display()
            )));
        }
        Some(false) => {
            return Err(Error::Setup(format!(
                "publication `{publication}` does not publish inserts; ALTER PUBLICATION {publication} SET (publish = 'insert')"
            )));
        }
        Some(true) => {}
    }
    let covered = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema_or_public(), &table.name],
        )
        .await
        .map_err(|e| Error::pg("cannot inspect publication tables", e))?
        .is_some();
    if !covered {
        return Err(Error::Setup(format!(
            "publication `{publication}` does not cover table `{}`; ALTER PUBLICATION {publication} ADD TABLE {}, or run `outbox-relay migrate` with RELAY_SOURCE=wal",
            table.display(),
            table.display()
        )));
    }
    check_slot_usable(client, slot).await
}
