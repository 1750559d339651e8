//! outbox-relay: moves committed Postgres outbox rows to Kafka or RabbitMQ, at least once, in
//! order per aggregate, carrying the writer's trace context. What it guarantees and how: README,
//! section Guarantees and how they are kept.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod event;
pub mod http;
pub mod ident;
pub mod message;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod partition;
pub mod pg;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod template;
