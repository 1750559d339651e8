//! What each event becomes on the wire, whichever the broker: its headers, its body and its
//! content type, in the format `[message] format` selects.
//!
//! - `plain` (the default): the payload as the body, and the headers of the message contract
//!   (`id`, `event_type`, `aggregate_type`, `aggregate_id`, `traceparent`, `tracestate`, then
//!   the row's `headers`).
//! - `cloudevents`: a CloudEvents 1.0 event (<https://github.com/cloudevents/spec>): `id` = event
//!   id, `type` = event type, `subject` = aggregate id, `time` = `created_at`, `source` from
//!   `[message] source`, `datacontenttype` = `application/json`, the distributed-tracing
//!   extension (`traceparent`, `tracestate`) and the extension `aggregatetype`.
//!   - `mode = "binary"` (the default): the attributes as headers, `ce_` on Kafka (the Kafka
//!     protocol binding, with `content-type` for `datacontenttype`) and `ce-` on RabbitMQ
//!     (the RabbitMQ protocol binding, with the `content_type` property); the payload as the
//!     body.
//!   - `mode = "structured"`: the whole event as the JSON body, content type
//!     `application/cloudevents+json`.
//!
//!   In both modes the message also carries the plain `traceparent`/`tracestate` headers that
//!   OpenTelemetry's propagators read, and the row's own headers.
//!
//! A NULL payload (a Kafka tombstone, see `kafka.tombstone_on_null_payload`) has no body in
//! any format: a tombstone's value must be null for compaction to remove the key.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::event::{OutboxEvent, STANDARD_HEADERS};

/// `[message] format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Plain,
    Cloudevents,
}

/// `[message] mode`: how a CloudEvent is laid out on the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes in headers, the payload as the body.
    #[default]
    Binary,
    /// The whole event as a JSON document (`application/cloudevents+json`).
    Structured,
}

/// The `[message]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessageConfig {
    /// `plain` or `cloudevents` (`RELAY_MESSAGE__FORMAT`).
    pub format: Format,
    /// CloudEvents content mode: `binary` or `structured`.
    pub mode: ContentMode,
    /// The CloudEvents `source` attribute (a URI reference); by default
    /// `/outbox-relay/<database>/<schema>.<table>`.
    pub source: Option<String>,
}

impl MessageConfig {
    /// Checks what can be checked at start-up.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(source) = &self.source
            && source.trim().is_empty()
        {
            return Err(
                "message.source is empty; set it to a URI reference such as /billing/outbox, or remove it"
                    .into(),
            );
        }
        Ok(())
    }

    /// The `source` attribute: `message.source`, or one derived from where the events come
    /// from.
    pub fn source_for(&self, database: &str, schema: &str, table: &str) -> String {
        self.source
            .clone()
            .unwrap_or_else(|| format!("/outbox-relay/{database}/{schema}.{table}"))
    }
}

/// The protocol binding: where CloudEvents attributes and the content type go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// `ce_` headers, `content-type` header.
    Kafka,
    /// `ce-` headers, content type in the `content_type` property.
    Rabbitmq,
}

/// Encodes events for one broker in the configured format.
#[derive(Debug, Clone)]
pub struct Encoder {
    format: Format,
    mode: ContentMode,
    source: String,
    binding: Binding,
}

/// One event as the broker's client sends it.
#[derive(Debug)]
pub struct Wire<'a> {
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// `None` for a tombstone (a NULL payload).
    pub body: Option<Cow<'a, [u8]>>,
    /// The content type, for a broker with a property of its own (AMQP's `content_type`);
    /// on Kafka it is among the headers where the format needs it.
    pub content_type: &'static str,
}

/// A CloudEvents attribute: its name, and its header in each binary binding.
#[derive(Debug)]
struct Attribute {
    name: &'static str,
    kafka: &'static str,
    rabbitmq: &'static str,
}

const fn attribute(name: &'static str, kafka: &'static str, rabbitmq: &'static str) -> Attribute {
    Attribute {
        name,
        kafka,
        rabbitmq,
    }
}

/// The attributes the relay sets, in the order [`Encoder::encode`] gives their values.
const ATTRIBUTES: [Attribute; 9] = [
    attribute("specversion", "ce_specversion", "ce-specversion"),
    attribute("id", "ce_id", "ce-id"),
    attribute("source", "ce_source", "ce-source"),
    attribute("type", "ce_type", "ce-type"),
    attribute("subject", "ce_subject", "ce-subject"),
    attribute("time", "ce_time", "ce-time"),
    attribute("aggregatetype", "ce_aggregatetype", "ce-aggregatetype"),
    attribute("traceparent", "ce_traceparent", "ce-traceparent"),
    attribute("tracestate", "ce_tracestate", "ce-tracestate"),
];

pub const JSON: &str = "application/json";
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

impl Encoder {
    pub fn new(config: &MessageConfig, source: String, binding: Binding) -> Self {
        Self {
            format: config.format,
            mode: config.mode,
            source,
            binding,
        }
    }

    /// The message of `event`, whose publish span's context is `traceparent`/`tracestate`.
    pub fn encode<'a>(
        &'a self,
        event: &'a OutboxEvent,
        traceparent: Option<&'a str>,
        tracestate: Option<&'a str>,
    ) -> Wire<'a> {
        let body = event.payload.as_deref().map(Cow::Borrowed);
        if self.format == Format::Plain {
            return Wire {
                headers: event
                    .message_headers(traceparent, tracestate)
                    .into_iter()
                    .map(|(k, v)| (Cow::Borrowed(k), Cow::Borrowed(v)))
                    .collect(),
                body,
                content_type: JSON,
            };
        }
        let tracestate = traceparent.and(tracestate);
        let time = event.created_at_ms.and_then(rfc3339);
        let attributes: Vec<(&Attribute, Cow<'a, str>)> = ATTRIBUTES
            .iter()
            .zip([
                Some(Cow::Borrowed("1.0")),
                Some(Cow::Borrowed(event.id.as_str())),
                Some(Cow::Borrowed(self.source.as_str())),
                Some(Cow::Borrowed(event.event_type.as_str())),
                Some(Cow::Borrowed(event.aggregate_id.as_str())),
                time.map(Cow::Owned),
                Some(Cow::Borrowed(event.aggregate_type.as_str())),
                traceparent.map(Cow::Borrowed),
                tracestate.map(Cow::Borrowed),
            ])
            .filter_map(|(a, v)| Some((a, v?)))
            .collect();
        let mut headers: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::with_capacity(14);
        let (content_type, body) = match self.mode {
            ContentMode::Binary => {
                for (a, v) in attributes {
                    let name = match self.binding {
                        Binding::Kafka => a.kafka,
                        Binding::Rabbitmq => a.rabbitmq,
                    };
                    headers.push((Cow::Borrowed(name), v));
                }
                (JSON, body)
            }
            ContentMode::Structured => {
                let body = body.map(|data| Cow::Owned(structured(&attributes, &data)));
                (CLOUDEVENTS_JSON, body)
            }
        };
        if self.binding == Binding::Kafka && body.is_some() {
            headers.push((Cow::Borrowed("content-type"), Cow::Borrowed(content_type)));
        }
        if let Some(tp) = traceparent {
            headers.push((Cow::Borrowed("traceparent"), Cow::Borrowed(tp)));
            if let Some(ts) = tracestate {
                headers.push((Cow::Borrowed("tracestate"), Cow::Borrowed(ts)));
            }
        }
        for (k, v) in &event.headers {
            let reserved = STANDARD_HEADERS.contains(&k.as_str())
                || k.starts_with("ce_")
                || k.starts_with("ce-")
                || k == "content-type";
            if !reserved {
                headers.push((Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())));
            }
        }
        Wire {
            headers,
            body,
            content_type,
        }
    }
}

/// The structured-mode document: the attributes, `datacontenttype`, and the payload (valid
/// JSON, checked before sending) as `data`.
fn structured(attributes: &[(&Attribute, Cow<'_, str>)], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 256);
    out.push(b'{');
    for (a, v) in attributes {
        // Keys are fixed names; values are escaped by serde_json.
        out.extend_from_slice(format!("\"{}\":", a.name).as_bytes());
        out.extend_from_slice(&serde_json::to_vec(&**v).unwrap_or_else(|_| b"null".to_vec()));
        out.push(b',');
    }
    out.extend_from_slice(format!("\"datacontenttype\":\"{JSON}\",\"data\":").as_bytes());
    out.extend_from_slice(data);
    out.push(b'}');
    out
}

/// `ms` since the Unix epoch as RFC 3339 in UTC with milliseconds (`2026-12-02T18:00:00.123Z`).
fn rfc3339(ms: i64) -> Option<String> {
    let ms = u64::try_from(ms).ok()?;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    Some(humantime::format_rfc3339_millis(t).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01";

    fn event() -> OutboxEvent {
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        e.payload = Some(br#"{"last4":"4242"}"#.to_vec());
        e.created_at_ms = Some(1_764_698_400_123);
        e.headers = vec![
            ("tenant".into(), "acme".into()),
            ("ce_id".into(), "forged".into()),
        ];
        e
    }

    fn encoder(mode: ContentMode, binding: Binding) -> Encoder {
        let config = MessageConfig {
            format: Format::Cloudevents,
            mode,
            source: None,
        };
        Encoder::new(
            &config,
            config.source_for("app", "public", "outbox"),
            binding,
        )
    }

    fn header<'a>(w: &'a Wire<'_>, k: &str) -> Option<&'a str> {
        w.headers.iter().find(|(n, _)| n == k).map(|(_, v)| &**v)
    }

    #[test]
    fn plain_is_the_message_contract() {
        let e = event();
        let enc = Encoder::new(&MessageConfig::default(), String::new(), Binding::Kafka);
        let w = enc.encode(&e, Some(TP), None);
        assert_eq!(header(&w, "id"), Some(e.id.as_str()));
        assert_eq!(header(&w, "aggregate_id"), Some("w1"));
        assert_eq!(header(&w, "traceparent"), Some(TP));
        assert_eq!(header(&w, "tenant"), Some("acme"));
        assert_eq!(w.body.as_deref(), e.payload.as_deref());
        assert_eq!(w.content_type, JSON);
    }

    #[test]
    fn binary_mode_uses_each_bindings_prefix() {
        let e = event();
        let kafka = encoder(ContentMode::Binary, Binding::Kafka);
        let w = kafka.encode(&e, Some(TP), Some("k=v"));
        assert_eq!(header(&w, "ce_specversion"), Some("1.0"));
        assert_eq!(header(&w, "ce_id"), Some(e.id.as_str()));
        assert_eq!(header(&w, "ce_type"), Some("CardAdded"));
        assert_eq!(header(&w, "ce_subject"), Some("w1"));
        assert_eq!(
            header(&w, "ce_source"),
            Some("/outbox-relay/app/public.outbox")
        );
        assert_eq!(header(&w, "ce_time"), Some("2025-12-02T18:00:00.123Z"));
        assert_eq!(header(&w, "ce_traceparent"), Some(TP));
        assert_eq!(header(&w, "ce_tracestate"), Some("k=v"));
        assert_eq!(header(&w, "traceparent"), Some(TP));
        assert_eq!(header(&w, "content-type"), Some(JSON));
        assert_eq!(header(&w, "tenant"), Some("acme"));
        assert_eq!(header(&w, "id"), None, "plain headers are not doubled");
        assert_eq!(
            w.headers.iter().filter(|(k, _)| k == "ce_id").count(),
            1,
            "a row header cannot forge an attribute"
        );
        let amqp = encoder(ContentMode::Binary, Binding::Rabbitmq);
        let w = amqp.encode(&e, None, None);
        assert_eq!(header(&w, "ce-id"), Some(e.id.as_str()));
        assert_eq!(header(&w, "ce-traceparent"), None);
        assert_eq!(header(&w, "content-type"), None, "a property on AMQP");
        assert_eq!(w.content_type, JSON);
    }

    #[test]
    fn structured_mode_is_one_json_document() {
        let e = event();
        let enc = encoder(ContentMode::Structured, Binding::Rabbitmq);
        let w = enc.encode(&e, Some(TP), None);
        assert_eq!(w.content_type, CLOUDEVENTS_JSON);
        let doc: serde_json::Value = serde_json::from_slice(w.body.as_deref().unwrap()).unwrap();
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(doc["id"], e.id.as_str());
        assert_eq!(doc["subject"], "w1");
        assert_eq!(doc["traceparent"], TP);
        assert_eq!(doc["datacontenttype"], JSON);
        assert_eq!(doc["data"]["last4"], "4242");
        assert_eq!(header(&w, "traceparent"), Some(TP));
    }

    #[test]
    fn a_tombstone_has_no_body_in_any_format() {
        let mut e = event();
        e.payload = None;
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let enc = encoder(mode, Binding::Kafka);
            let w = enc.encode(&e, None, None);
            assert!(w.body.is_none());
            assert_eq!(header(&w, "content-type"), None);
        }
    }
}
