//! Ordered parallel consumers on RabbitMQ (feature `amqp`).
//!
//! With `[rabbitmq] partitions = N` and a routing key such as `{aggregate_type}.{partition}`,
//! the relay routes every event of one aggregate to the same partition number
//! (`murmur2(aggregate_id) mod N`, the partition Kafka's default partitioner gives the same
//! key). [`declare`] creates one queue per partition and binds it, so N consumers, one per
//! queue, work in parallel and each aggregate's events stay in order in its queue.
//!
//! ```no_run
//! # async fn run(channel: lapin::Channel) -> Result<(), outbox_client::Error> {
//! use outbox_client::partitions::{PartitionedQueues, declare};
//!
//! // The relay: routing_key = "{aggregate_type}.{partition}", partitions = 4.
//! let queues = declare(
//!     &channel,
//!     &PartitionedQueues::new("outbox", "wallet.{partition}", 4, "billing.wallet"),
//! )
//! .await?;
//! // queues = ["billing.wallet.0", ..., "billing.wallet.3"]: start one consumer on each.
//! # Ok(()) }
//! ```

use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::Error;

/// The queues of one partitioned routing key.
#[derive(Debug, Clone)]
pub struct PartitionedQueues {
    /// The relay's exchange (`rabbitmq.exchange`).
    pub exchange: String,
    /// The binding key of each queue, with `{partition}` where the partition number goes,
    /// e.g. `wallet.{partition}` or `*.{partition}` for every aggregate type.
    pub binding: String,
    /// `rabbitmq.partitions` of the relay: it must be the same number.
    pub partitions: u32,
    /// Queue names are `<prefix>.<partition>`.
    pub queue_prefix: String,
    /// Declare quorum queues (replicated on a cluster) instead of classic ones.
    pub quorum: bool,
}

impl PartitionedQueues {
    pub fn new(exchange: &str, binding: &str, partitions: u32, queue_prefix: &str) -> Self {
        Self {
            exchange: exchange.into(),
            binding: binding.into(),
            partitions,
            queue_prefix: queue_prefix.into(),
            quorum: false,
        }
    }

    /// The queue of `partition`.
    pub fn queue(&self, partition: u32) -> String {
        format!("{}.{partition}", self.queue_prefix)
    }

    /// The binding key of `partition`'s queue.
    pub fn binding_key(&self, partition: u32) -> String {
        self.binding.replace("{partition}", &partition.to_string())
    }
}

/// Declares the durable queue of every partition and binds it to the exchange; returns the
/// queue names in partition order. Idempotent, like the declarations it makes. A binding
/// without `{partition}` would send every event to every queue: refused as an invalid
/// argument before anything is declared.
pub async fn declare(channel: &Channel, q: &PartitionedQueues) -> Result<Vec<String>, Error> {
    if !q.binding.contains("{partition}") {
        return Err(Error::InvalidPartitions(format!(
            "the binding `{}` has no {{partition}}: every queue would get every event",
            q.binding
        )));
    }
    if q.partitions == 0 {
        return Err(Error::InvalidPartitions(
            "partitions = 0; use the relay's rabbitmq.partitions".into(),
        ));
    }
    let mut args = FieldTable::default();
    if q.quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let mut names = Vec::with_capacity(q.partitions as usize);
    for p in 0..q.partitions {
        let queue = q.queue(p);
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args.clone(),
            )
            .await?;
        channel
            .queue_bind(
                &queue,
                &q.exchange,
                &q.binding_key(p),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        names.push(queue);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_binding_keys_follow_the_partition() {
        let q = PartitionedQueues::new("outbox", "wallet.{partition}", 4, "billing.wallet");
        assert_eq!(q.queue(3), "billing.wallet.3");
        assert_eq!(q.binding_key(0), "wallet.0");
    }
}
