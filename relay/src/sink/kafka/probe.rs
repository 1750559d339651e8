//! Whether the Kafka brokers answer, for `/readyz`.
//!
//! The probe keeps one client of its own (the sink's producer may be idle, or busy with a
//! backlog) and asks it for the cluster's metadata
//! (<https://kafka.apache.org/protocol#The_Messages_Metadata>). librdkafka keeps the client's
//! broker connections open and reconnects them itself, so a check costs one request, not a
//! connection.
//!
//! What can go wrong: `fetch_metadata` blocks its thread for up to the timeout, so it runs on
//! the blocking pool; a broker that accepts connections but cannot serve metadata counts as
//! down.

use std::time::Duration;

use rdkafka::producer::{Producer, ThreadedProducer};

use super::config::KafkaConfig;
use super::{LastError, client_config, client_error};

/// How long one check waits for the metadata.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A metadata request on a client of the probe's own.
pub struct KafkaProbe {
    /// Its errors go to the check's result (and the debug log), not to the error log: the
    /// sink reports what is wrong with the brokers.
    producer: std::sync::Arc<ThreadedProducer<LastError>>,
}

impl KafkaProbe {
    /// A client with the sink's settings; `Err` when librdkafka refuses them.
    pub fn new(config: &KafkaConfig) -> Result<Self, String> {
        client_config(config)
            .create_with_context(LastError::default())
            .map(|producer| Self {
                producer: std::sync::Arc::new(producer),
            })
            .map_err(|e| format!("cannot create a Kafka client: {}", client_error(&e)))
    }

    /// `Ok` when a broker answered a metadata request within the timeout.
    pub async fn check(&self) -> Result<(), String> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            // The reason of this check, not of an earlier one.
            producer.context().take();
            let result = producer.client().fetch_metadata(None, TIMEOUT);
            let reason = producer.context().take();
            match (result, reason) {
                (Ok(_), _) => Ok(()),
                (Err(e), Some(reason)) => Err(format!("{e} ({reason})")),
                (Err(e), None) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
