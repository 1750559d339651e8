//! Errors of the library. An [`Error`] carries its [`ErrorKind`], decided where it arises:
//! transient (retry with backoff while the relay keeps running), or permanent, configuration or
//! operator (stop with one clear message). A publish the broker did not confirm is a
//! [`PublishError`] of its event instead, with a [`FailureKind`]: retried, paused for, or
//! dead-lettered.

use std::fmt;

/// What a caller does about an [`Error`], decided once, where the error arises (from the
/// SQLSTATE, the client library's error type or the check that failed), never from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Goes away by itself (connection lost, server restarting, lock busy, leadership lost):
    /// the daemon retries with backoff and keeps running.
    Transient,
    /// Will not go away by retrying, and no setting names the fix (a statement the server
    /// rejects): stop with the message.
    Permanent,
    /// A setting, or the set-up of the database or the broker, must change; the message says
    /// which and how.
    Configuration,
    /// The command line asked for something that cannot be done (an unknown id, a bad flag
    /// value, a missing `--yes`).
    Operator,
}

/// A failure that stops a command or the daemon. `Display` is the one message a user sees;
/// the underlying client error, where there is one, stays reachable as its `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration or environment: fix the setting named in the message.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Postgres refused or lost a request.
    #[error("{context}: {detail}")]
    Postgres {
        context: String,
        detail: String,
        kind: ErrorKind,
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    /// The logical replication connection failed.
    #[error("{context}: {source}")]
    Replication {
        context: String,
        kind: ErrorKind,
        #[source]
        source: pgwire_replication::PgWireError,
    },
    /// The database is reachable but not set up as the relay needs (missing table, column,
    /// privilege, ...). The message says how to fix it.
    #[error("{0}")]
    Setup(String),
    /// The broker cannot be used (unreachable at start-up, refused credentials, missing exchange).
    #[error("{0}")]
    Broker(String),
    /// The topic or exchange an event or a command is sent to does not exist on the broker.
    #[error("{0}")]
    MissingDestination(String),
    /// An operator command was asked for something it cannot do; the message says why.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_)
            | Error::Setup(_)
            | Error::Broker(_)
            | Error::MissingDestination(_) => ErrorKind::Configuration,
            Error::Postgres { kind, .. } | Error::Replication { kind, .. } => *kind,
            Error::Invalid(_) => ErrorKind::Operator,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// Wraps a tokio-postgres error with what the relay was doing; its kind comes from the
    /// SQLSTATE ([`is_transient_pg`]).
    pub fn pg(context: impl Into<String>, e: tokio_postgres::Error) -> Self {
        let kind = if is_transient_pg(&e) {
            ErrorKind::Transient
        } else {
            ErrorKind::Permanent
        };
        Error::Postgres {
            context: context.into(),
            detail: describe_pg(&e),
            kind,
            source: Some(e),
        }
    }

    /// A condition of the Postgres session that a reconnect fixes (the connection, and with it
    /// the leader lock, is gone).
    pub fn pg_transient(context: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Postgres {
            context: context.into(),
            detail: detail.into(),
            kind: ErrorKind::Transient,
            source: None,
        }
    }
}

/// Connection-level failures and server-side conditions that go away by themselves (restart,
/// failover, serialization conflicts) are transient; everything else needs a human.
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            // 08: connection exception, 57P0x: shutdown/crash, 40: rollback (serialization,
            // deadlock), 53: insufficient resources, 55P03: lock not available.
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("40")
                || c.starts_with("53")
                || c == "55P03"
        }
        // No SQLSTATE: an I/O or protocol error talking to the server.
        None => true,
    }
}

/// The server's message with its detail and hint, or the client-side cause chain.
pub fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

/// Whether a failed publish may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A `nack`, a timeout or a metadata hiccup for this message: its aggregate is retried
    /// with its own backoff, no attempt counted; the rest of the outbox keeps flowing.
    Transient,
    /// The broker cannot be used as a whole (connection lost or refused, producer being
    /// replaced): the engine stops sending, lets what is in flight settle, and backs off
    /// globally before it sends again.
    Unavailable,
    /// The broker refuses this message (too large, unroutable, unknown topic): counted towards
    /// `delivery.max_attempts`, then dead-lettered.
    Permanent,
}

/// Why one event was not confirmed by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError {
    pub kind: FailureKind,
    pub message: String,
}

impl PublishError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Transient,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Unavailable,
            message: message.into(),
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Permanent,
            message: message.into(),
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PublishError {}
