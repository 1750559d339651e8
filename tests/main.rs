//! End-to-end suite: the real `outbox-relay` binary against real Postgres, RabbitMQ and a
//! Kafka-protocol broker (tansu), plus librdkafka's mock cluster for injected Kafka outages.
//!
//! Tests whose name starts with `fault_` stop shared services (Postgres, RabbitMQ, the brokers
//! of `scripts/services kafka-cluster`); the test script runs them one at a time after the rest.
#![forbid(unsafe_code)]

#[macro_use]
mod support;

mod bad_input;
mod chaos;
mod cluster;
mod config_errors;
mod delivery;
mod failover;
mod faults;
mod formats;
mod kafka_cluster;
mod observability;
mod ops;
mod sasl;
mod security;
mod tls;
mod wal;
