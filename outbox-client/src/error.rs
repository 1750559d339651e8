use thiserror::Error;

/// Everything this crate can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A table name that is not `table` or `schema.table` made of plain SQL identifiers.
    #[error(
        "invalid table name `{0}`: use `table` or `schema.table`, letters, digits and `_` only, at most 63 characters each"
    )]
    InvalidTableName(String),
    /// The database refused or could not be reached. Often transient: see [`Error::is_transient`].
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A consumed message lacks a header the outbox message format requires.
    #[error("message has no `{0}` header (is it an outbox event?)")]
    MissingHeader(&'static str),
    /// A header is present but unusable (an `id` that is not a UUID, ...).
    #[error("message header `{name}` is invalid: {value:?}")]
    InvalidHeader { name: &'static str, value: String },
    /// The body is not JSON.
    #[error("message body is not JSON: {0}")]
    InvalidPayload(#[from] serde_json::Error),
    /// Partition queues asked for with a binding without `{partition}` or 0 partitions.
    #[error("invalid partitioned queues: {0}")]
    InvalidPartitions(String),
    /// RabbitMQ refused a declaration or the connection broke.
    #[cfg(feature = "amqp")]
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
}

impl Error {
    /// True when retrying the same operation later may succeed (connection lost, pool
    /// exhausted, serialization failure, deadlock); false for errors that repeat forever
    /// (a malformed message, a missing table, a constraint violation).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    // serialization_failure, deadlock_detected, admin_shutdown,
                    // crash_shutdown, cannot_connect_now
                    Some("40001" | "40P01" | "57P01" | "57P02" | "57P03")
                ),
                _ => false,
            },
            #[cfg(feature = "amqp")]
            Error::Amqp(e) => matches!(
                e,
                lapin::Error::IOError(_) | lapin::Error::InvalidConnectionState(_)
            ),
            _ => false,
        }
    }
}
