//! The event the relay moves: one committed outbox row (or, in wal mode, one decoded insert).

use std::sync::Arc;

/// The unit of ordering: (aggregate type, aggregate id).
pub type AggregateKey = (String, String);

/// The aggregate `event` belongs to.
pub fn key_of(event: &OutboxEvent) -> AggregateKey {
    (event.aggregate_type.clone(), event.aggregate_id.clone())
}

/// An aggregate's key borrowed from an event or a key: finds an [`AggregateKey`] in a
/// [`hashbrown::HashMap`] without copying the strings. Hashes exactly like the tuple.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct KeyRef<'a>(pub &'a str, pub &'a str);

impl<'a> KeyRef<'a> {
    pub fn of(event: &'a OutboxEvent) -> Self {
        Self(&event.aggregate_type, &event.aggregate_id)
    }

    pub fn to_key(self) -> AggregateKey {
        (self.0.to_string(), self.1.to_string())
    }
}

impl<'a> From<&'a AggregateKey> for KeyRef<'a> {
    fn from(key: &'a AggregateKey) -> Self {
        Self(&key.0, &key.1)
    }
}

impl hashbrown::Equivalent<AggregateKey> for KeyRef<'_> {
    fn equivalent(&self, key: &AggregateKey) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// One outbox event, as read from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The source's position of the event: `relay_seq` in poll mode. Used to confirm it.
    pub seq: i64,
    /// Event id (a UUID in the default schema); consumers deduplicate on it.
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload JSON, as bytes; `None` for a NULL payload (a Kafka tombstone when
    /// `kafka.tombstone_on_null_payload` is set, else a dead letter).
    pub payload: Option<Vec<u8>>,
    /// Extra string headers from the row's `headers` column.
    pub headers: Vec<(String, String)>,
    /// The other columns the templates name (e.g. `tenant`), by name, as text.
    pub columns: Vec<(Arc<str>, Option<String>)>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// `created_at` in milliseconds since the Unix epoch.
    pub created_at_ms: Option<i64>,
    /// Why the row cannot become a message (e.g. its `headers` are not a JSON object).
    pub defect: Option<String>,
    /// The payload is JSON already checked by Postgres (a `json` or `jsonb` column) or written
    /// by `serde_json`: [`Self::validate`] does not parse it again.
    pub payload_is_json: bool,
}

/// An outbox row's columns as a reader found them, before the relay interprets them: the one
/// place where a row (from SQL, a decoded WAL insert, an emitted message or a dead letter)
/// becomes an [`OutboxEvent`]. Missing text columns become empty strings, caught by
/// [`OutboxEvent::validate`], so a bad row is dead-lettered, not a crash.
#[derive(Debug, Clone, Default)]
pub struct RowColumns {
    pub id: Option<String>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub payload: Option<Vec<u8>>,
    /// The `headers` column as JSON text; parsed here.
    pub headers: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub created_at_ms: Option<i64>,
    /// The other columns the templates name, by name, as text.
    pub columns: Vec<(Arc<str>, Option<String>)>,
    /// The payload came from a `json` or `jsonb` column, or from `serde_json`: valid JSON.
    pub payload_is_json: bool,
}

impl RowColumns {
    /// The event at source position `seq`. `defect` is what the reader already found wrong
    /// (an undecodable payload, a missing id); it wins over a defect of the headers.
    pub fn into_event(self, seq: i64, defect: Option<String>) -> OutboxEvent {
        let mut defect = defect;
        let headers = match self.headers.as_deref().map(parse_headers) {
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                defect.get_or_insert(e);
                vec![]
            }
            None => vec![],
        };
        OutboxEvent {
            seq,
            id: self.id.unwrap_or_default(),
            aggregate_type: self.aggregate_type.unwrap_or_default(),
            aggregate_id: self.aggregate_id.unwrap_or_default(),
            event_type: self.event_type.unwrap_or_default(),
            payload: self.payload,
            headers,
            columns: self.columns,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            created_at_ms: self.created_at_ms,
            defect,
            payload_is_json: self.payload_is_json,
        }
    }
}

/// Headers every message carries (README, Use it in your service), in this order, before the
/// row's own headers.
pub const STANDARD_HEADERS: [&str; 6] = [
    "id",
    "event_type",
    "aggregate_type",
    "aggregate_id",
    "traceparent",
    "tracestate",
];

impl OutboxEvent {
    /// The headers of every message: the standard ones, then the row's `headers` (which
    /// cannot override a standard one). `traceparent`/`tracestate` are the relay's publish
    /// span's (see [`crate::telemetry::start_publish_span`]), not the writer's.
    pub fn message_headers<'a>(
        &'a self,
        traceparent: Option<&'a str>,
        tracestate: Option<&'a str>,
    ) -> Vec<(&'a str, &'a str)> {
        let mut out = Vec::with_capacity(6 + self.headers.len());
        out.push(("id", self.id.as_str()));
        out.push(("event_type", self.event_type.as_str()));
        out.push(("aggregate_type", self.aggregate_type.as_str()));
        out.push(("aggregate_id", self.aggregate_id.as_str()));
        if let Some(tp) = traceparent {
            out.push(("traceparent", tp));
            if let Some(ts) = tracestate {
                out.push(("tracestate", ts));
            }
        }
        for (k, v) in &self.headers {
            if !STANDARD_HEADERS.contains(&k.as_str()) {
                out.push((k.as_str(), v.as_str()));
            }
        }
        out
    }

    /// The text of the row's column `name`, one the templates name; `None` when it is NULL.
    pub fn column(&self, name: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(n, _)| &**n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The payload's bytes; empty for a NULL payload.
    pub fn body(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }

    /// The writer's trace id (from `traceparent`), for log lines.
    pub fn trace_id(&self) -> &str {
        self.traceparent
            .as_deref()
            .and_then(|tp| tp.split('-').nth(1))
            .unwrap_or("")
    }

    /// Checks what the broker cannot check for us. An error here is permanent for this event.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(defect) = &self.defect {
            return Err(defect.clone());
        }
        if self.aggregate_id.is_empty() {
            return Err("aggregate_id is empty".into());
        }
        if self.aggregate_type.is_empty() {
            return Err("aggregate_type is empty".into());
        }
        // A NULL payload is the sink's to judge (a Kafka tombstone, or refused).
        if let Some(payload) = &self.payload
            && !self.payload_is_json
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(payload)
        {
            return Err(format!("payload is not valid JSON: {e}"));
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn for_tests(aggregate_type: &str, aggregate_id: &str, event_type: &str) -> Self {
        Self {
            seq: 1,
            id: "0190a1c2-0000-7000-8000-000000000001".into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: Some(b"{}".to_vec()),
            headers: vec![],
            columns: vec![],
            traceparent: None,
            tracestate: None,
            created_at_ms: None,
            defect: None,
            payload_is_json: false,
        }
    }
}

/// Flattens the row's `headers` JSON object into string pairs; non-string values keep their
/// JSON text. Anything but an object is an error.
fn parse_headers(json: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("headers are not valid JSON: {e}"))?;
    match value {
        serde_json::Value::Object(map) => Ok(map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect()),
        serde_json::Value::Null => Ok(vec![]),
        _ => Err("headers must be a JSON object of strings".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_message_format_and_row_headers_cannot_override() {
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        e.headers = vec![("id".into(), "evil".into()), ("tenant".into(), "t1".into())];
        let h = e.message_headers(
            Some("00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"),
            Some("k=v"),
        );
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(get("id").unwrap(), e.id);
        assert_eq!(h.iter().filter(|(n, _)| *n == "id").count(), 1);
        assert_eq!(get("tenant").unwrap(), "t1");
        assert_eq!(get("tracestate").unwrap(), "k=v");
        assert_eq!(
            get("traceparent").unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn trace_id_comes_from_the_writers_traceparent() {
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        assert_eq!(e.trace_id(), "");
        e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        assert_eq!(e.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn invalid_payload_and_headers_are_reported() {
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        e.payload = Some(b"not json".to_vec());
        assert!(e.validate().unwrap_err().contains("not valid JSON"));
        // From a json or jsonb column Postgres checked it already: not parsed again.
        e.payload_is_json = true;
        assert!(e.validate().is_ok());
        assert!(parse_headers("[1]").is_err());
        assert_eq!(
            parse_headers(r#"{"a":"b","n":1}"#).unwrap(),
            vec![("a".into(), "b".into()), ("n".into(), "1".into())]
        );
    }
}
