//! Destination templates: Kafka topics and keys, AMQP routing keys, such as
//! `outbox.event.{aggregate_type}` or `tenant.{tenant}`. Parsed once at start-up so an unknown
//! placeholder is a configuration error, not a surprise on the first event.
//!
//! A placeholder is one of the event's fields (`{aggregate_type}`, `{aggregate_id}`,
//! `{event_type}`), `{partition}` (the aggregate's partition number, RabbitMQ only, see
//! [`crate::partition`]), or any other column of the outbox row by its name (`{tenant}`). The
//! columns the templates name are read with every event ([`Template::columns`]); whether the
//! table has them is checked when the table is inspected. A row whose named column is NULL
//! cannot be routed: rendering fails with a message, and the event is dead-lettered.
//!
//! A template knows which placeholders it uses ([`Template::uses`]): replay asks the database
//! only for the columns a topic depends on, and metrics know whether a rendered destination
//! is a bounded label ([`Template::metric_label`]).

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::sync::Arc;

use crate::event::OutboxEvent;

/// What a template can name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{aggregate_type}`, e.g. `wallet`: a handful of values, fixed by the writing code.
    AggregateType,
    /// `{aggregate_id}`, e.g. the wallet id: one value per aggregate, without bound.
    AggregateId,
    /// `{event_type}`, e.g. `CardAdded`: a handful of values, fixed by the writing code.
    EventType,
    /// `{partition}`: `murmur2(aggregate_id) mod partitions`, a number below `partitions`.
    Partition,
    /// Any other column of the outbox row, by name (its text form). Its number of values is
    /// unknown, so it is never a metric label.
    Column(Arc<str>),
}

impl Placeholder {
    /// The event's own fields, in the order of the error message that lists them.
    pub const FIELDS: [Placeholder; 3] = [
        Placeholder::AggregateType,
        Placeholder::AggregateId,
        Placeholder::EventType,
    ];

    /// Whether the placeholder takes few enough values to be a metric label: a time series
    /// per aggregate would grow the registry, and every scrape, with the data.
    pub fn is_bounded(&self) -> bool {
        matches!(
            self,
            Placeholder::AggregateType | Placeholder::EventType | Placeholder::Partition
        )
    }

    /// This placeholder's text in `event`; `None` for a column that is NULL (or absent).
    fn value<'e>(
        &self,
        event: &'e OutboxEvent,
        partitions: Option<NonZeroU32>,
    ) -> Option<Cow<'e, str>> {
        Some(match self {
            Placeholder::AggregateType => Cow::Borrowed(event.aggregate_type.as_str()),
            Placeholder::AggregateId => Cow::Borrowed(event.aggregate_id.as_str()),
            Placeholder::EventType => Cow::Borrowed(event.event_type.as_str()),
            Placeholder::Partition => {
                let n = partitions.map_or(1, NonZeroU32::get);
                Cow::Owned(crate::partition::of(&event.aggregate_id, n).to_string())
            }
            Placeholder::Column(name) => Cow::Borrowed(event.column(name)?),
        })
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
    /// Every placeholder is [bounded](Placeholder::is_bounded).
    bounded: bool,
    /// `rabbitmq.partitions`, which `{partition}` needs.
    partitions: Option<NonZeroU32>,
}

impl Template {
    /// Parses `s`, which may not use `{partition}`; `Err` names the unbalanced brace or the
    /// misplaced placeholder.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::parse_partitioned(s, None)
    }

    /// Parses `s`, where `{partition}` is allowed when `partitions` is set (RabbitMQ's
    /// `rabbitmq.partitions`).
    pub fn parse_partitioned(s: &str, partitions: Option<NonZeroU32>) -> Result<Self, String> {
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
            if name.is_empty() || name.contains('{') {
                return Err(format!(
                    "`{s}` has an empty or nested placeholder; write a column name between the braces, e.g. {{aggregate_type}}"
                ));
            }
            let field = match name {
                "aggregate_type" => Placeholder::AggregateType,
                "aggregate_id" => Placeholder::AggregateId,
                "event_type" => Placeholder::EventType,
                "partition" if partitions.is_some() => Placeholder::Partition,
                "partition" => {
                    return Err(format!(
                        "`{s}` uses {{partition}}, which needs rabbitmq.partitions (the number of partition queues); it is only available in rabbitmq.routing_key"
                    ));
                }
                column => Placeholder::Column(Arc::from(column)),
            };
            parts.push(Part::Field(field));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{s}` has a `}}` without an opening `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        let bounded = parts.iter().all(|part| match part {
            Part::Literal(_) => true,
            Part::Field(p) => p.is_bounded(),
        });
        Ok(Self {
            text: s.to_string(),
            parts,
            bounded,
            partitions,
        })
    }

    /// The template as configured, e.g. `outbox.event.{aggregate_type}`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `placeholder` occurs in the template.
    pub fn uses(&self, placeholder: &Placeholder) -> bool {
        self.parts.contains(&Part::Field(placeholder.clone()))
    }

    /// The placeholders the template uses, each once, in order of first use.
    pub fn placeholders(&self) -> Vec<&Placeholder> {
        let mut out: Vec<&Placeholder> = Vec::new();
        for part in &self.parts {
            if let Part::Field(p) = part
                && !out.contains(&p)
            {
                out.push(p);
            }
        }
        out
    }

    /// The other columns of the row the template names (`{tenant}`), each once.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.placeholders().into_iter().filter_map(|p| match p {
            Placeholder::Column(name) => Some(&**name),
            _ => None,
        })
    }

    /// The template with each placeholder replaced by `value(placeholder)`; `Err` names the
    /// first placeholder without a value.
    pub fn render_with<'a>(
        &'a self,
        value: impl Fn(&Placeholder) -> Option<Cow<'a, str>>,
    ) -> Result<Cow<'a, str>, String> {
        let missing = |p: &Placeholder| match p {
            Placeholder::Column(name) => format!(
                "column `{name}` is NULL, and the template `{}` names it",
                self.text
            ),
            _ => format!(
                "the template `{}` has no value for a placeholder",
                self.text
            ),
        };
        // A template that is one placeholder (the Kafka key `{aggregate_id}`) borrows it.
        if let [Part::Field(p)] = self.parts.as_slice() {
            return value(p).ok_or_else(|| missing(p));
        }
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(p) => out.push_str(&value(p).ok_or_else(|| missing(p))?),
            }
        }
        Ok(Cow::Owned(out))
    }

    /// The destination of `event`; `Err` when a column the template names is NULL in it.
    pub fn render<'e>(&'e self, event: &'e OutboxEvent) -> Result<Cow<'e, str>, String> {
        self.render_with(|p| p.value(event, self.partitions))
    }

    /// The `destination` label for a message this template rendered to `rendered`.
    ///
    /// The rendered destination when every placeholder the template uses is
    /// [bounded](Placeholder::is_bounded) (`{aggregate_type}`, `{event_type}`,
    /// `{partition}`: as many series as the writers have kinds of events), else the template
    /// text itself: with `{aggregate_id}` or a column a label per rendered topic could be a
    /// series per aggregate, growing with the data without end. Such topics are then counted
    /// together, under e.g. `outbox.{aggregate_id}`.
    pub fn metric_label<'a>(&'a self, rendered: &'a str) -> &'a str {
        if self.bounded { rendered } else { &self.text }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &Template, e: &OutboxEvent) -> String {
        t.render(e).unwrap().into_owned()
    }

    #[test]
    fn renders_placeholders() {
        let t = Template::parse("outbox.event.{aggregate_type}.{event_type}").unwrap();
        let e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        assert_eq!(render(&t, &e), "outbox.event.wallet.CardAdded");
        let key = Template::parse("{aggregate_id}").unwrap();
        assert!(matches!(key.render(&e).unwrap(), Cow::Borrowed("w1")));
    }

    #[test]
    fn renders_any_column_and_refuses_a_null_one() {
        let t = Template::parse("outbox.{tenant}.{aggregate_type}").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["tenant"]);
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        e.columns = vec![(Arc::from("tenant"), Some("acme".into()))];
        assert_eq!(render(&t, &e), "outbox.acme.wallet");
        e.columns = vec![(Arc::from("tenant"), None)];
        let err = t.render(&e).unwrap_err();
        assert!(err.contains("column `tenant` is NULL"), "{err}");
    }

    #[test]
    fn partition_needs_partitions_and_stays_below_them() {
        let err = Template::parse("{aggregate_type}.{partition}").unwrap_err();
        assert!(err.contains("rabbitmq.partitions"), "{err}");
        let t = Template::parse_partitioned("{aggregate_type}.{partition}", NonZeroU32::new(4))
            .unwrap();
        for i in 0..100 {
            let e = OutboxEvent::for_tests("wallet", &format!("w{i}"), "CardAdded");
            let r = render(&t, &e);
            let n: u32 = r.strip_prefix("wallet.").unwrap().parse().unwrap();
            assert!(n < 4);
            assert_eq!(t.metric_label(&r), r, "partitions are a bounded label");
        }
    }

    #[test]
    fn lists_the_placeholders_it_uses() {
        let t = Template::parse("x.{event_type}.{event_type}").unwrap();
        assert!(t.uses(&Placeholder::EventType));
        assert!(!t.uses(&Placeholder::AggregateType));
        assert_eq!(t.placeholders(), [&Placeholder::EventType]);
        let plain = Template::parse("audit").unwrap();
        assert!(Placeholder::FIELDS.iter().all(|p| !plain.uses(p)));
        assert_eq!(plain.as_str(), "audit");
    }

    #[test]
    fn metric_label_is_bounded_when_the_template_names_the_aggregate_id() {
        let e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        let by_type = Template::parse("outbox.{aggregate_type}.{event_type}").unwrap();
        let rendered = render(&by_type, &e);
        assert_eq!(by_type.metric_label(&rendered), "outbox.wallet.CardAdded");

        let by_id = Template::parse("outbox.{aggregate_type}.{aggregate_id}").unwrap();
        let labels: std::collections::HashSet<String> = (0..100)
            .map(|i| {
                let e = OutboxEvent::for_tests("wallet", &format!("w{i}"), "CardAdded");
                by_id.metric_label(&render(&by_id, &e)).to_string()
            })
            .collect();
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            ["outbox.{aggregate_type}.{aggregate_id}"]
        );
        let by_column = Template::parse("outbox.{tenant}").unwrap();
        assert_eq!(by_column.metric_label("outbox.acme"), "outbox.{tenant}");
    }

    #[test]
    fn rejects_unbalanced_and_empty_placeholders() {
        assert!(Template::parse("x.aggregate_type}").is_err());
        assert!(Template::parse("x.{aggregate_type").is_err());
        assert!(Template::parse("x.{}").is_err());
        assert!(Template::parse("").is_err());
    }
}
