//! The wallet service: an HTTP API over customers' wallets, cards and plan purchases.
//!
//! Every write is ONE transaction holding the business rows and the outbox event
//! (`WalletCreated`, `CardAdded`, `PlanPurchased`), so an event exists exactly when its change
//! does. The outbox row carries the request's trace context: the caller's `traceparent` header
//! when it sends one, else a new root trace. The relay sidecar publishes the events.
//!
//! Plans can be bought before a card is on file: billing charges them once the card is known.

mod api;
mod store;

use std::net::SocketAddr;

use anyhow::Context as _;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

pub use api::router;
pub use store::Store;

/// The aggregate type of every wallet event: topic `outbox.event.wallet`, routing keys
/// `wallet.<EventType>`.
pub const AGGREGATE_TYPE: &str = "wallet";

/// The plans on sale and their monthly price in euro cents.
pub const PLANS: [(&str, i64); 3] = [("basic", 799), ("standard", 1299), ("premium", 1999)];

/// Env-only configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`: the wallet's Postgres, shared with the relay sidecar.
    pub database_url: String,
    /// `WALLET_ADDR`, default `127.0.0.1:8080`.
    pub addr: SocketAddr,
    /// `WALLET_OUTBOX_TABLE`, default `outbox` (created by `outbox-relay migrate`).
    pub outbox_table: String,
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            database_url: crate::env::first_of(&["DATABASE_URL"]).ok_or_else(|| {
                anyhow::anyhow!("DATABASE_URL is not set: point it at the wallet's Postgres")
            })?,
            addr: crate::env::parsed("WALLET_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            outbox_table: crate::env::string("WALLET_OUTBOX_TABLE", "outbox"),
        })
    }
}

/// Runs the HTTP API until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the wallet database {}; check DATABASE_URL",
                crate::env::redact(&config.database_url)
            )
        })?;
    let store = Store::new(pool, &config.outbox_table)?;
    store.prepare().await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {} (WALLET_ADDR)", config.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "wallet API listening");
    axum::serve(listener, router(store))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
