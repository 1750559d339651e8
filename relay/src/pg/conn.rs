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

/// Of the `(host, port)` pairs a URL names, the one `client` is connected to: with several
/// hosts and `target_session_attrs=read-write`, the primary among them, which the replication
/// connection must stream from. Asks the server for its address and port
/// (`inet_server_addr()`) and matches them against the hosts, resolving names.
pub async fn connected_host(
    client: &Client,
    hosts: &[(String, u16)],
) -> Result<(String, u16), Error> {
    if let [only] = hosts {
        return Ok(only.clone());
    }
    let row = client
        .query_one("SELECT host(inet_server_addr()), inet_server_port()", &[])
        .await
        .map_err(|e| Error::pg("cannot ask the server for its address", e))?;
    let (addr, port): (Option<String>, Option<i32>) = (row.get(0), row.get(1));
    let (Some(addr), Some(port)) = (addr, port) else {
        return Err(Error::Setup(
            "DATABASE_URL names several hosts, but the connection is over a Unix socket: name TCP hosts".into(),
        ));
    };
    let addr: std::net::IpAddr = addr.parse().map_err(|_| {
        Error::Setup(format!(
            "the server reports an address `{addr}` that is not an IP"
        ))
    })?;
    for (host, host_port) in hosts {
        if i32::from(*host_port) != port {
            continue;
        }
        let matches = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip == addr,
            Err(_) => tokio::net::lookup_host((host.as_str(), *host_port))
                .await
                .map(|mut addrs| addrs.any(|a| a.ip() == addr))
                .unwrap_or(false),
        };
        if matches {
            return Ok((host.clone(), *host_port));
        }
    }
    Err(Error::Setup(format!(
        "connected to the primary at {addr}:{port}, which is none of the hosts DATABASE_URL names; name the servers as the relay reaches them"
    )))
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
                    // A WARNING from the server is the operator's to see (a setting about to
                    // bite, a slot in trouble); NOTICEs such as "already exists, skipping"
                    // are routine.
                    // (`parsed_severity`: `severity` is translated by the server's lc_messages.)
                    Ok(tokio_postgres::AsyncMessage::Notice(n))
                        if n.parsed_severity()
                            == Some(tokio_postgres::error::Severity::Warning) =>
                    {
                        warn!(
                            warning = %n.message(),
                            detail = n.detail().unwrap_or_default(),
                            hint = n.hint().unwrap_or_default(),
                            "postgres warning"
                        )
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
