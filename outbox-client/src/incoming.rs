//! A consumed outbox event: the message the relay publishes, read back, whatever the broker.
//!
//! Body = the payload JSON; headers `id`, `event_type`, `aggregate_type`, `aggregate_id`,
//! `traceparent`, `tracestate` plus the row's own headers. On Kafka the key is the aggregate id;
//! on AMQP `message_id` is the id and `type` the event type, used when a header is missing.
//!
//! CloudEvents (`[message] format = "cloudevents"` on the relay) are read too: in binary mode
//! the attributes (`ce_id`/`ce-id`, `type`, `subject`, `aggregatetype`) stand in for the plain
//! headers; in structured mode (content type `application/cloudevents+json`) the document's
//! attributes do, and its `data` is the payload.

use std::collections::BTreeMap;

use opentelemetry::Context;
use uuid::Uuid;

use crate::Error;
use crate::trace::{self, TraceHeaders};

/// CloudEvents attributes and the plain headers they stand in for.
const CLOUDEVENTS_ATTRIBUTES: [(&str, &str); 6] = [
    ("id", "id"),
    ("type", "event_type"),
    ("subject", "aggregate_id"),
    ("aggregatetype", "aggregate_type"),
    ("traceparent", "traceparent"),
    ("tracestate", "tracestate"),
];

/// One event as a consumer receives it.
#[derive(Debug, Clone)]
pub struct IncomingEvent {
    pub id: Uuid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The payload JSON; `Null` for a Kafka tombstone (the key with a null value, which the
    /// relay sends for a NULL payload when `kafka.tombstone_on_null_payload` is set).
    pub payload: serde_json::Value,
    /// Every header of the message, as strings.
    pub headers: BTreeMap<String, String>,
}

impl IncomingEvent {
    /// Builds the event from its headers and body. `id` and `event_type` are required,
    /// `aggregate_type` and `aggregate_id` default to empty.
    pub fn from_parts(headers: BTreeMap<String, String>, body: &[u8]) -> Result<Self, Error> {
        Self::from_headers_and_body(headers, Some(body))
    }

    /// Like [`IncomingEvent::from_parts`]; a missing body (a Kafka tombstone) is a `Null`
    /// payload.
    pub fn from_headers_and_body(
        mut headers: BTreeMap<String, String>,
        body: Option<&[u8]>,
    ) -> Result<Self, Error> {
        let Some(body) = body else {
            return Self::from_headers(headers, serde_json::Value::Null);
        };
        let structured = headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/cloudevents+json"));
        let payload = if structured {
            let mut doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)?;
            for (attribute, value) in &doc {
                if let serde_json::Value::String(v) = value {
                    headers
                        .entry(format!("ce_{attribute}"))
                        .or_insert_with(|| v.clone());
                }
            }
            doc.remove("data").unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::from_slice(body)?
        };
        Self::from_headers(headers, payload)
    }

    fn from_headers(
        mut headers: BTreeMap<String, String>,
        payload: serde_json::Value,
    ) -> Result<Self, Error> {
        for (attribute, header) in CLOUDEVENTS_ATTRIBUTES {
            let value = ["ce_", "ce-"]
                .iter()
                .find_map(|prefix| headers.get(&format!("{prefix}{attribute}")).cloned());
            if let Some(v) = value {
                headers.entry(header.into()).or_insert(v);
            }
        }
        let id_text = headers.get("id").ok_or(Error::MissingHeader("id"))?;
        let id = Uuid::parse_str(id_text).map_err(|_| Error::InvalidHeader {
            name: "id",
            value: id_text.clone(),
        })?;
        let event_type = headers
            .get("event_type")
            .cloned()
            .ok_or(Error::MissingHeader("event_type"))?;
        Ok(Self {
            id,
            event_type,
            aggregate_type: headers.get("aggregate_type").cloned().unwrap_or_default(),
            aggregate_id: headers.get("aggregate_id").cloned().unwrap_or_default(),
            payload,
            headers,
        })
    }

    /// The trace context the message carries (the relay's publish span): make it the parent of
    /// the span that handles the event, e.g. with tracing-opentelemetry's
    /// `span.set_parent(event.trace_context())`.
    pub fn trace_context(&self) -> Context {
        trace::extract(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The `traceparent` / `tracestate` headers, e.g. to store with work deferred to later.
    pub fn trace_headers(&self) -> TraceHeaders {
        TraceHeaders {
            traceparent: self.headers.get("traceparent").cloned(),
            tracestate: self.headers.get("tracestate").cloned(),
        }
    }
}

#[cfg(feature = "kafka")]
pub mod kafka {
    //! rdkafka messages (feature `kafka`).
    use std::collections::BTreeMap;

    use opentelemetry::Context;
    use rdkafka::message::{Headers, Message};

    use super::IncomingEvent;
    use crate::Error;

    /// The message's headers as strings (non-UTF-8 bytes replaced).
    pub fn headers(message: &impl Message) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                out.insert(
                    header.key.to_string(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        out
    }

    /// The trace context of the message's `traceparent` / `tracestate` headers.
    pub fn trace_context(message: &impl Message) -> Context {
        let headers = headers(message);
        crate::trace::extract(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The outbox event a Kafka message carries; the key stands in for a missing
    /// `aggregate_id` header.
    pub fn incoming_event(message: &impl Message) -> Result<IncomingEvent, Error> {
        let mut headers = headers(message);
        if !headers.contains_key("aggregate_id")
            && let Some(key) = message.key()
        {
            headers.insert(
                "aggregate_id".into(),
                String::from_utf8_lossy(key).into_owned(),
            );
        }
        IncomingEvent::from_headers_and_body(headers, message.payload())
    }

    #[cfg(test)]
    mod tests {
        use opentelemetry::trace::TraceContextExt;
        use rdkafka::Timestamp;
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

        #[test]
        fn a_tombstone_is_an_event_with_a_null_payload() {
            let id = uuid::Uuid::new_v4().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "event_type",
                    value: Some(b"WalletClosed".as_slice()),
                });
            let message = OwnedMessage::new(
                None,
                Some(b"w-1".to_vec()),
                "outbox.event.wallet".into(),
                Timestamp::NotAvailable,
                0,
                7,
                Some(headers),
            );
            let event = super::incoming_event(&message).unwrap();
            assert_eq!(event.id.to_string(), id);
            assert_eq!(event.aggregate_id, "w-1");
            assert_eq!(event.payload, serde_json::Value::Null);
        }

        #[test]
        fn a_kafka_message_yields_its_event_and_the_writers_trace() {
            let id = uuid::Uuid::new_v4().to_string();
            let mut headers = OwnedHeaders::new();
            for (key, value) in [
                ("id", id.as_str()),
                ("event_type", "PlanPurchased"),
                ("aggregate_type", "wallet"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let message = OwnedMessage::new(
                Some(br#"{"plan":"premium"}"#.to_vec()),
                Some(b"w-7".to_vec()),
                "outbox.event.wallet".into(),
                Timestamp::NotAvailable,
                0,
                42,
                Some(headers),
            );
            let event = super::incoming_event(&message).unwrap();
            assert_eq!(event.id.to_string(), id);
            assert_eq!(
                event.aggregate_id, "w-7",
                "the key stands in for the header"
            );
            assert_eq!(event.payload["plan"], "premium");
            let cx = super::trace_context(&message);
            let span = cx.span();
            assert!(span.span_context().is_remote());
            assert_eq!(
                span.span_context().trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
        }
    }
}

#[cfg(feature = "amqp")]
pub mod amqp {
    //! lapin deliveries (feature `amqp`).
    use std::collections::BTreeMap;

    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};
    use opentelemetry::Context;

    use super::IncomingEvent;
    use crate::Error;

    fn text(value: &AMQPValue) -> Option<String> {
        match value {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
            _ => None,
        }
    }

    /// The string-valued entries of an AMQP headers table.
    pub fn headers(table: &FieldTable) -> BTreeMap<String, String> {
        table
            .inner()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), text(v)?)))
            .collect()
    }

    /// The trace context of an AMQP headers table's `traceparent` / `tracestate`.
    pub fn trace_context(table: &FieldTable) -> Context {
        let headers = headers(table);
        crate::trace::extract(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// The outbox event of a delivery's properties and body; `message_id` and `type` stand in
    /// for missing `id` / `event_type` headers.
    pub fn incoming_event(
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<IncomingEvent, Error> {
        let mut headers = properties
            .headers()
            .as_ref()
            .map(headers)
            .unwrap_or_default();
        if let Some(id) = properties.message_id() {
            headers
                .entry("id".into())
                .or_insert_with(|| id.as_str().to_string());
        }
        if let Some(kind) = properties.kind() {
            headers
                .entry("event_type".into())
                .or_insert_with(|| kind.as_str().to_string());
        }
        if let Some(content_type) = properties.content_type() {
            headers
                .entry("content-type".into())
                .or_insert_with(|| content_type.as_str().to_string());
        }
        IncomingEvent::from_parts(headers, body)
    }

    #[cfg(test)]
    mod tests {
        use lapin::BasicProperties;
        use lapin::types::{AMQPValue, FieldTable, ShortString};
        use opentelemetry::trace::TraceContextExt;

        #[test]
        fn an_amqp_delivery_yields_its_event_and_the_writers_trace() {
            let id = uuid::Uuid::new_v4().to_string();
            let mut table = FieldTable::default();
            for (key, value) in [
                ("aggregate_id", "w-8"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("tracestate", "vendor=1"),
            ] {
                table.insert(
                    ShortString::from(key),
                    AMQPValue::LongString(value.to_string().into()),
                );
            }
            // id and event type only as AMQP properties: message_id and type.
            let properties = BasicProperties::default()
                .with_message_id(id.clone().into())
                .with_type("CardAdded".into())
                .with_headers(table.clone());
            let event = super::incoming_event(&properties, br#"{"last4":"4242"}"#).unwrap();
            assert_eq!(event.id.to_string(), id);
            assert_eq!(event.event_type, "CardAdded");
            assert_eq!(event.aggregate_id, "w-8");
            assert_eq!(
                event.trace_headers().tracestate.as_deref(),
                Some("vendor=1")
            );
            let cx = super::trace_context(&table);
            assert_eq!(
                cx.span().span_context().trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cloudevents_in_either_mode_become_the_same_event() {
        let id = "0195f0a4-7c1e-7a53-9d7e-3f1f2b6c8a01";
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for prefix in ["ce_", "ce-"] {
            let h = |k: &str| format!("{prefix}{k}");
            let event = IncomingEvent::from_parts(
                [
                    (h("specversion"), "1.0"),
                    (h("id"), id),
                    (h("type"), "CardAdded"),
                    (h("subject"), "w-1"),
                    (h("aggregatetype"), "wallet"),
                    (h("traceparent"), tp),
                ]
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect(),
                br#"{"last4":"4242"}"#,
            )
            .unwrap();
            assert_eq!(event.id.to_string(), id);
            assert_eq!(event.event_type, "CardAdded");
            assert_eq!(event.aggregate_type, "wallet");
            assert_eq!(event.aggregate_id, "w-1");
            assert_eq!(event.payload["last4"], "4242");
            assert!(event.trace_headers().trace_id().is_some());
        }
        let structured = format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/s","type":"CardAdded","subject":"w-1","aggregatetype":"wallet","traceparent":"{tp}","datacontenttype":"application/json","data":{{"last4":"4242"}}}}"#
        );
        let event = IncomingEvent::from_parts(
            headers(&[("content-type", "application/cloudevents+json")]),
            structured.as_bytes(),
        )
        .unwrap();
        assert_eq!(event.id.to_string(), id);
        assert_eq!(event.aggregate_id, "w-1");
        assert_eq!(event.payload["last4"], "4242");
        assert!(event.trace_headers().trace_id().is_some());
    }

    #[test]
    fn an_outbox_message_becomes_an_event_with_its_trace() {
        let id = "0195f0a4-7c1e-7a53-9d7e-3f1f2b6c8a01";
        let event = IncomingEvent::from_parts(
            headers(&[
                ("id", id),
                ("event_type", "CardAdded"),
                ("aggregate_type", "wallet"),
                ("aggregate_id", "w-1"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ]),
            br#"{"last4":"4242"}"#,
        )
        .unwrap();
        assert_eq!(event.id.to_string(), id);
        assert_eq!(event.aggregate_id, "w-1");
        assert_eq!(event.payload["last4"], "4242");
        assert_eq!(
            event.trace_headers().trace_id().unwrap().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn a_message_without_an_id_or_json_body_is_refused() {
        assert!(matches!(
            IncomingEvent::from_parts(headers(&[("event_type", "X")]), b"{}"),
            Err(Error::MissingHeader("id"))
        ));
        assert!(matches!(
            IncomingEvent::from_parts(headers(&[("id", "nope"), ("event_type", "X")]), b"{}"),
            Err(Error::InvalidHeader { name: "id", .. })
        ));
        let id = uuid::Uuid::new_v4().to_string();
        assert!(matches!(
            IncomingEvent::from_parts(headers(&[("id", &id), ("event_type", "X")]), b"not json"),
            Err(Error::InvalidPayload(_))
        ));
    }
}
