//! Destination templates: Kafka topics and AMQP routing keys such as
//! `outbox.event.{aggregate_type}`. Parsed once at start-up so an unknown placeholder is a
//! configuration error, not a surprise on the first event.

use crate::event::OutboxEvent;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    AggregateId,
    EventType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

const PLACEHOLDERS: &str = "{aggregate_type}, {aggregate_id}, {event_type}";

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the template is empty".into());
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{s}` has a `{{` without a closing `}}`"))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "aggregate_type" => Part::AggregateType,
                "aggregate_id" => Part::AggregateId,
                "event_type" => Part::EventType,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in `{s}`; known: {PLACEHOLDERS}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{s}` has a `}}` without an opening `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Self { parts })
    }

    pub fn render(&self, event: &OutboxEvent) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(s) => s,
                Part::AggregateType => &event.aggregate_type,
                Part::AggregateId => &event.aggregate_id,
                Part::EventType => &event.event_type,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders() {
        let t = Template::parse("outbox.event.{aggregate_type}.{event_type}").unwrap();
        let e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        assert_eq!(t.render(&e), "outbox.event.wallet.CardAdded");
    }

    #[test]
    fn rejects_unknown_and_unbalanced_placeholders() {
        assert!(
            Template::parse("x.{aggregateType}")
                .unwrap_err()
                .contains("unknown placeholder")
        );
        assert!(Template::parse("x.{aggregate_type").is_err());
        assert!(Template::parse("x.aggregate_type}").is_err());
        assert!(Template::parse("").is_err());
    }
}
