//! A Postgres connection with its driver task: the one way the relay opens a query
//! connection (TLS from the URL's libpq settings, a connect timeout, `application_name`).
//!
//! The driver task forwards LISTEN notifications (coalesced: one pending wake-up is enough)
//! and marks the connection closed when it ends, because a session-level advisory lock (the
//! leader lock) ends with it: callers check [`PgConn::ensure_open`] before acting as leader.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::tls::PgTarget;
use crate::config::secret::Secret;
use crate::error::{Error, describe_pg};

/// A connection with its driver task. Notifications (LISTEN) arrive on `notifications`.
pub struct PgConn {
    pub client: Client,
    pub notifications: tokio::sync::mpsc::Receiver<()>,
    closed: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PgConn {
    /// Connects with a 10 s connect timeout unless the URL sets one.
    pub async fn connect(url: &Secret) -> Result<Self, Error> {
        let target = PgTarget::parse(url)?;
        let tls = target.connector()?;
        let mut config = target.config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("outbox-relay");
        let (client, mut connection) = config.connect(tls).await.map_err(|e| {
            Error::pg(
                format!("cannot connect to Postgres at {}", url.redacted()),
                e,
            )
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let closed = CancellationToken::new();
        let closed_flag = closed.clone();
        let task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = futures::StreamExt::next(&mut messages).await {
                match message {
                    // Coalesce: one pending wake-up is enough.
                    Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                        let _ = tx.try_send(());
                    }
                    Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                        debug!(notice = %n.message(), "postgres notice")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %describe_pg(&e), "postgres connection lost");
                        break;
                    }
                }
            }
            closed_flag.cancel();
        });
        Ok(Self {
            client,
            notifications: rx,
            closed,
            task,
        })
    }

    /// A transient error once the connection is gone (and with it any session lock).
    pub fn ensure_open(&self) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::pg_transient(
                "lost the connection to Postgres",
                "the leader lock went with it; reconnecting",
            ));
        }
        Ok(())
    }

    /// Cancelled when the connection ends (lost, or dropped).
    pub fn closed_token(&self) -> CancellationToken {
        self.closed.clone()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.client.is_closed()
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        self.task.abort();
        // The session (and any lock it held) ends with the connection.
        self.closed.cancel();
    }
}
