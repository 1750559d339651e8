//! The outbox-relay demo services: wallet and billing, run by `scripts/demo`.
//!
//! A streaming platform: **wallet** stores a customer's card and sells plans; each write is one
//! Postgres transaction holding the business rows and an outbox event (through
//! `outbox-client`). The relay sidecar publishes the events to Kafka or RabbitMQ. **billing**
//! consumes them and charges each purchased plan to the card on file, exactly once, in its own
//! database, even when events are redelivered or a plan arrives before its card.
//!
//! Both binaries are configured with env alone (see [`wallet::Config`] and
//! [`billing::Config`]) and continue the trace of the request that wrote each event.
#![forbid(unsafe_code)]

pub mod billing;
pub mod env;
pub mod redeliver;
pub mod telemetry;
pub mod wallet;
