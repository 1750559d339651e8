//! Client side of the transactional outbox: what a service links to write events and what a
//! consumer links to read them.
//!
//! - [`writer`]: [`enqueue`] adds an event to the outbox inside the caller's own sqlx
//!   transaction, with the current OpenTelemetry context as W3C `traceparent` / `tracestate`,
//!   so the relay's publish span and the consumer's span continue the writer's trace.
//! - [`trace`]: capture and extract W3C trace context (the one place that knows the format).
//! - [`incoming`]: the message the relay publishes, read back into an [`IncomingEvent`], with
//!   the adapters for rdkafka (feature `kafka`) and lapin (feature `amqp`).
//! - `partitions` (feature `amqp`): one queue per `{partition}` of the relay's routing key,
//!   for ordered parallel consumers.
//! - [`idempotency`]: [`claim`] records an event id in the consumer's own transaction, so a
//!   redelivered event (the relay delivers at least once) is recognised and skipped.
//!
//! ```no_run
//! # async fn buy(pool: sqlx::PgPool, wallet: &str) -> Result<(), outbox_client::Error> {
//! use outbox_client::NewEvent;
//!
//! // Writer: the business row and the event commit together, with the current trace context.
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE wallets SET plan = 'premium' WHERE id = $1")
//!     .bind(wallet)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = NewEvent::new("wallet", wallet, "PlanPurchased", serde_json::json!({"plan": "premium"}));
//! outbox_client::enqueue(&mut tx, event).await?;
//! tx.commit().await?;
//! # Ok(()) }
//!
//! # async fn consume(pool: sqlx::PgPool, event: outbox_client::IncomingEvent) -> Result<(), outbox_client::Error> {
//! // Consumer: effects and the processed id commit together; a redelivery is skipped.
//! let mut tx = pool.begin().await?;
//! if outbox_client::claim(&mut tx, "billing", event.id).await? {
//!     // ... apply the event ...
//! }
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! The crate is light on purpose: without features it pulls in neither a Kafka nor an AMQP
//! client, only sqlx (Postgres) and the OpenTelemetry API.
#![forbid(unsafe_code)]

mod error;
pub mod idempotency;
pub mod incoming;
#[cfg(feature = "amqp")]
pub mod partitions;
mod table;
pub mod trace;
pub mod writer;

pub use error::Error;
pub use idempotency::{ProcessedEvents, claim};
pub use incoming::IncomingEvent;
pub use table::TableName;
pub use writer::{NewEvent, Outbox, enqueue};
