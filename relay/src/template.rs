//! Destination templates: Kafka topics and AMQP routing keys such as
//! `outbox.event.{aggregate_type}`. Parsed once at start-up so an unknown placeholder is a
//! configuration error, not a surprise on the first event.
//!
//! A template knows which placeholders it uses ([`Template::uses`]): replay asks the database
//! only for the columns a topic depends on, and metrics know whether a rendered destination
//! is a bounded label ([`Template::metric_label`]).

use crate::event::OutboxEvent;

/// A field of the event that a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{aggregate_type}`, e.g. `wallet`: a handful of values, fixed by the writing code.
    AggregateType,
    /// `{aggregate_id}`, e.g. the wallet id: one value per aggregate, without bound.
    AggregateId,
    /// `{event_type}`, e.g. `CardAdded`: a handful of values, fixed by the writing code.
    EventType,
}

impl Placeholder {
    /// Every placeholder, in the order of the error message that lists them.
    pub const ALL: [Placeholder; 3] = [
        Placeholder::AggregateType,
        Placeholder::AggregateId,
        Placeholder::EventType,
    ];

    /// The name between the braces.
    pub fn name(self) -> &'static str {
        match self {
            Placeholder::AggregateType => "aggregate_type",
            Placeholder::AggregateId => "aggregate_id",
            Placeholder::EventType => "event_type",
        }
    }

    /// This field of `event`.
    pub fn value(self, event: &OutboxEvent) -> &str {
        match self {
            Placeholder::AggregateType => &event.aggregate_type,
            Placeholder::AggregateId => &event.aggregate_id,
            Placeholder::EventType => &event.event_type,
        }
    }

    /// Whether the field takes few enough values to be a metric label: a time series per
    /// aggregate would grow the registry, and every scrape, with the data.
    pub fn is_bounded(self) -> bool {
        !matches!(self, Placeholder::AggregateId)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Placeholder),
}

/// A parsed destination template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The text as configured, kept as the bounded metric label.
    text: String,
    parts: Vec<Part>,
}

const PLACEHOLDERS: &str = "{aggregate_type}, {aggregate_id}, {event_type}";

impl Template {
    /// Parses `s`; `Err` names the unknown placeholder or the unbalanced brace.
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
            let name = &rest[open + 1..close];
            let field = Placeholder::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| {
                    format!("unknown placeholder `{{{name}}}` in `{s}`; known: {PLACEHOLDERS}")
                })?;
            parts.push(Part::Field(field));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{s}` has a `}}` without an opening `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Self {
            text: s.to_string(),
            parts,
        })
    }

    /// The template as configured, e.g. `outbox.event.{aggregate_type}`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `{placeholder}` occurs in the template.
    pub fn uses(&self, placeholder: Placeholder) -> bool {
        self.parts.contains(&Part::Field(placeholder))
    }

    /// The template with each placeholder replaced by `value(placeholder)`.
    pub fn render_with<'a>(&self, value: impl Fn(Placeholder) -> &'a str) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(p) => out.push_str(value(*p)),
            }
        }
        out
    }

    /// The destination of `event`.
    pub fn render(&self, event: &OutboxEvent) -> String {
        self.render_with(|p| p.value(event))
    }

    /// The `destination` label for a message this template rendered to `rendered`.
    ///
    /// The rendered destination when every placeholder the template uses is
    /// [bounded](Placeholder::is_bounded) (`{aggregate_type}`, `{event_type}`: as many series as
    /// the writers have kinds of events), else the template text itself: with `{aggregate_id}`
    /// a label per rendered topic would be a series per aggregate, growing with the data
    /// without end. Such topics are then counted together, under e.g.
    /// `outbox.{aggregate_id}`.
    pub fn metric_label<'a>(&'a self, rendered: &'a str) -> &'a str {
        let bounded = self.parts.iter().all(|part| match part {
            Part::Literal(_) => true,
            Part::Field(p) => p.is_bounded(),
        });
        if bounded { rendered } else { &self.text }
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
        assert_eq!(
            t.render_with(|p| p.value(&e)),
            "outbox.event.wallet.CardAdded"
        );
    }

    #[test]
    fn lists_the_placeholders_it_uses() {
        let t = Template::parse("x.{event_type}.{event_type}").unwrap();
        assert!(t.uses(Placeholder::EventType));
        assert!(!t.uses(Placeholder::AggregateType));
        assert!(!t.uses(Placeholder::AggregateId));
        let plain = Template::parse("audit").unwrap();
        assert!(Placeholder::ALL.iter().all(|p| !plain.uses(*p)));
        assert_eq!(plain.as_str(), "audit");
    }

    #[test]
    fn metric_label_is_bounded_when_the_template_names_the_aggregate_id() {
        let e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        let by_type = Template::parse("outbox.{aggregate_type}.{event_type}").unwrap();
        let rendered = by_type.render(&e);
        assert_eq!(by_type.metric_label(&rendered), "outbox.wallet.CardAdded");

        let by_id = Template::parse("outbox.{aggregate_type}.{aggregate_id}").unwrap();
        let labels: std::collections::HashSet<String> = (0..100)
            .map(|i| {
                let e = OutboxEvent::for_tests("wallet", &format!("w{i}"), "CardAdded");
                by_id.metric_label(&by_id.render(&e)).to_string()
            })
            .collect();
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            ["outbox.{aggregate_type}.{aggregate_id}"]
        );
    }

    #[test]
    fn rejects_unknown_and_unbalanced_placeholders() {
        assert!(
            Template::parse("x.{aggregateType}")
                .unwrap_err()
                .contains("unknown placeholder")
        );
        assert!(Template::parse("x.aggregate_type}").is_err());
        assert!(Template::parse("x.{aggregate_type").is_err());
        assert!(Template::parse("").is_err());
    }
}
