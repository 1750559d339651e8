//! Where `replay` sends RabbitMQ messages: `rabbitmq.exchange`, or the exchange given with
//! `--exchange`, with the configured routing key template either way.
//!
//! An explicit exchange is never declared, only checked with a passive `exchange.declare`
//! (<https://www.rabbitmq.com/amqp-0-9-1-reference#exchange.declare.passive>) when the sink
//! connects: a typo would otherwise create an exchange with no queues, and every message would
//! come back unroutable.
//!
//! What can go wrong: the broker answers a passive declare of a missing exchange by closing
//! the channel (404 NOT_FOUND); the sink reports it as a start-up error, which
//! [`explain_connect_error`] turns into the `--exchange` message.

use super::config::RabbitmqConfig;
use crate::error::Error;
use crate::event::OutboxEvent;

/// Checks an `--exchange` value.
pub fn parse_override(exchange: &str) -> Result<(), String> {
    if exchange.is_empty() {
        return Err("--exchange must not be empty".into());
    }
    Ok(())
}

/// `config` sending to `exchange` instead of `rabbitmq.exchange`; such an exchange must exist.
pub fn with_override(config: &RabbitmqConfig, exchange: &str) -> RabbitmqConfig {
    RabbitmqConfig {
        exchange: exchange.to_string(),
        declare_exchange: false,
        ..config.clone()
    }
}

/// The destination in words, for `replay --dry-run`.
pub fn describe(config: &RabbitmqConfig) -> String {
    format!(
        "RabbitMQ exchange `{}` (routing key `{}`)",
        config.exchange, config.routing_key
    )
}

/// `exchange / routing key` of `event`; the key is empty when the template does not parse
/// (validation refused such a config already).
pub fn render(config: &RabbitmqConfig, event: &OutboxEvent) -> String {
    let routing_key = config
        .routing_key_template()
        .map(|t| match t.render(event) {
            Ok(key) => key.into_owned(),
            Err(e) => format!("(cannot route: {e})"),
        })
        .unwrap_or_default();
    format!("{} / {routing_key}", config.exchange)
}

/// The sink's connect error for an `--exchange` (`explicit`) that does not exist, said in
/// terms of the flag; any other error as it is.
pub fn explain_connect_error(config: &RabbitmqConfig, explicit: bool, e: Error) -> Error {
    if explicit && matches!(e, Error::MissingDestination(_)) {
        Error::Setup(format!(
            "--exchange `{}` does not exist on RabbitMQ; create it (a durable topic exchange) first",
            config.exchange
        ))
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_is_never_declared() {
        let replay = with_override(&RabbitmqConfig::default(), "audit");
        assert!(!replay.declare_exchange);
        let e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        assert_eq!(render(&replay, &e), "audit / wallet.CardAdded");
        assert!(parse_override("").is_err());
        let missing = Error::MissingDestination("RabbitMQ exchange `audit` does not exist".into());
        assert!(
            explain_connect_error(&replay, true, missing)
                .to_string()
                .contains("--exchange `audit` does not exist")
        );
    }
}
