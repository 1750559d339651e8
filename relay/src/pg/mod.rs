//! Postgres plumbing shared by the daemon, its sources and `migrate`: connections and their
//! TLS, and the replication slot and publication of log tailing.

mod conn;
pub mod slot;
pub mod tls;

pub use conn::{PgConn, connected_host};
