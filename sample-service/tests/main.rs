//! The sample services' tests, one binary (shared helpers in `support/`), against the real
//! Postgres, RabbitMQ and Kafka (tansu) that `scripts/services` starts.
//!
//! - `ledger`: billing's exactly-once rules, straight against its database.
//! - `scenario`: the demo's story end to end with the real `outbox-relay`, `wallet` and
//!   `billing` processes, over Kafka and over RabbitMQ.

mod ledger;
mod scenario;
mod support;
