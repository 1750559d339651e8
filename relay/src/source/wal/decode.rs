//! Turning what logical replication sends into events: an insert into the outbox table (its
//! columns found by name in the table's `Relation` message, so column order and extra columns
//! do not matter) or a `pg_logical_emit_message` whose content is the event as JSON.
//!
//! Nothing here fails on a bad row: what cannot become a message is an event with a defect,
//! which the engine dead-letters. Only a table that lacks a required column is an error.
//!
//! pgoutput message formats: <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.

use std::sync::Arc;

use pgwire_replication::Lsn;

use crate::config::ColumnsConfig;
use crate::error::Error;
use crate::event::{OutboxEvent, RowColumns};
use crate::source::pgoutput::{self, BYTEA_OID, JSON_OID, JSONB_OID, Relation, Value};

/// Column positions of the outbox table in its Relation message.
#[derive(Debug, Clone)]
pub(super) struct ColumnMap {
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_bytea: bool,
    /// `json` or `jsonb`: Postgres checked the payload.
    payload_json: bool,
    headers: Option<usize>,
    traceparent: Option<usize>,
    tracestate: Option<usize>,
    created_at: Option<usize>,
    /// The other columns the templates name, by name.
    template_columns: Vec<(Arc<str>, usize)>,
}

impl ColumnMap {
    /// The positions of `c`'s columns and of `template_columns` (found in the table when the
    /// source started) in `rel`.
    pub(super) fn new(
        rel: &Relation,
        c: &ColumnsConfig,
        template_columns: &[Arc<str>],
    ) -> Result<Self, Error> {
        let find = |name: &str| rel.columns.iter().position(|col| col.name == name);
        let need = |setting: &str, name: &str| {
            find(name).ok_or_else(|| {
                Error::Setup(format!(
                    "the replicated table `{}.{}` has no column `{name}` (outbox.columns.{setting})",
                    rel.namespace, rel.name
                ))
            })
        };
        let payload = need("payload", &c.payload)?;
        Ok(Self {
            id: need("id", &c.id)?,
            aggregate_type: need("aggregate_type", &c.aggregate_type)?,
            aggregate_id: need("aggregate_id", &c.aggregate_id)?,
            event_type: need("event_type", &c.event_type)?,
            payload_bytea: rel.columns[payload].type_oid == BYTEA_OID,
            payload_json: [JSON_OID, JSONB_OID].contains(&rel.columns[payload].type_oid),
            payload,
            headers: find(&c.headers),
            traceparent: find(&c.traceparent),
            tracestate: find(&c.tracestate),
            created_at: find(&c.created_at),
            template_columns: template_columns
                .iter()
                .map(|name| {
                    find(name).map(|i| (name.clone(), i)).ok_or_else(|| {
                        Error::Setup(format!(
                            "the replicated table `{}.{}` has no column `{name}`, which a template names",
                            rel.namespace, rel.name
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub(super) fn event(&self, seq: i64, values: &[Value]) -> OutboxEvent {
        let text = |i: usize| match values.get(i) {
            Some(Value::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let opt = |i: Option<usize>| i.and_then(text);
        let mut defect = None;
        let payload = match values.get(self.payload) {
            Some(Value::Text(b)) if self.payload_bytea => pgoutput::bytea_from_text(b)
                .map_err(|e| defect = Some(e))
                .ok(),
            Some(Value::Text(b)) => Some(b.to_vec()),
            _ => None,
        };
        let created_at_ms = match self.created_at.and_then(|i| values.get(i)) {
            Some(Value::Text(b)) => std::str::from_utf8(b)
                .ok()
                .and_then(pgoutput::timestamptz_millis),
            _ => None,
        };
        let columns = RowColumns {
            id: text(self.id),
            aggregate_type: text(self.aggregate_type),
            aggregate_id: text(self.aggregate_id),
            event_type: text(self.event_type),
            payload,
            headers: opt(self.headers),
            traceparent: opt(self.traceparent),
            tracestate: opt(self.tracestate),
            created_at_ms,
            columns: (self.template_columns.iter())
                .map(|(name, i)| (name.clone(), text(*i)))
                .collect(),
            payload_is_json: self.payload_json,
        };
        columns.into_event(seq, defect)
    }
}

/// The JSON of a `pg_logical_emit_message` event: the same fields as a row.
#[derive(Debug, serde::Deserialize)]
struct EmittedEvent {
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    event_type: Option<String>,
    payload: Option<serde_json::Value>,
    #[serde(default)]
    headers: Option<serde_json::Value>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    /// Other fields, among them the columns the templates name.
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// The event of an emitted message at `lsn`; the fields named `template_columns` are read
/// as the template columns of a row (strings as they are, other JSON as its text).
pub(super) fn emitted_event(
    seq: i64,
    lsn: Lsn,
    content: &[u8],
    template_columns: &[Arc<str>],
) -> OutboxEvent {
    let fallback_id = format!("lsn-{lsn}");
    match serde_json::from_slice::<EmittedEvent>(content) {
        Ok(m) => {
            let defect =
                m.id.is_none()
                    .then(|| "emitted message has no `id`".to_string());
            let columns = RowColumns {
                id: Some(m.id.unwrap_or(fallback_id)),
                aggregate_type: m.aggregate_type,
                aggregate_id: m.aggregate_id,
                event_type: m.event_type,
                payload: m.payload.map(|p| p.to_string().into_bytes()),
                headers: m.headers.map(|h| h.to_string()),
                traceparent: m.traceparent,
                tracestate: m.tracestate,
                created_at_ms: None,
                columns: (template_columns.iter())
                    .map(|name| {
                        let value = m.rest.get(&**name).and_then(|v| match v {
                            serde_json::Value::Null => None,
                            serde_json::Value::String(s) => Some(s.clone()),
                            other => Some(other.to_string()),
                        });
                        (name.clone(), value)
                    })
                    .collect(),
                // Written back by serde_json.
                payload_is_json: true,
            };
            columns.into_event(seq, defect)
        }
        Err(e) => RowColumns {
            id: Some(fallback_id),
            payload: Some(content.to_vec()),
            ..RowColumns::default()
        }
        .into_event(
            seq,
            Some(format!("emitted message is not an event JSON object: {e}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::Column;

    /// An Insert's column values, borrowed from the message, become an event that owns them.
    #[test]
    fn an_inserted_row_becomes_an_event() {
        let rel = |payload_oid: u32| Relation {
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            columns: [
                ("id", 2950),
                ("aggregate_type", 25),
                ("aggregate_id", 25),
                ("event_type", 25),
                ("payload", payload_oid),
                ("created_at", 1184),
            ]
            .into_iter()
            .map(|(name, type_oid)| Column {
                name: name.into(),
                type_oid,
            })
            .collect(),
        };
        let row = |payload: &'static [u8]| {
            vec![
                Value::Text(b"e1"),
                Value::Text(b"wallet"),
                Value::Text(b"w1"),
                Value::Text(b"CardAdded"),
                Value::Text(payload),
                Value::Text(b"2026-11-24 13:14:30.123456+00"),
            ]
        };
        let config = ColumnsConfig::default();
        let json = ColumnMap::new(&rel(JSONB_OID), &config, &[]).unwrap();
        let e = json.event(7, &row(br#"{"a": 1}"#));
        assert_eq!(
            (e.seq, e.id.as_str(), e.aggregate_id.as_str()),
            (7, "e1", "w1")
        );
        assert_eq!(e.payload.as_deref(), Some(&br#"{"a": 1}"#[..]));
        assert_eq!(e.created_at_ms, Some(1_795_526_070_123));
        assert!(e.validate().is_ok());

        let bytea = ColumnMap::new(&rel(BYTEA_OID), &config, &[]).unwrap();
        let e = bytea.event(8, &row(b"\\x7b7d"));
        assert_eq!(e.payload.as_deref(), Some(&b"{}"[..]));
        let bad = bytea.event(9, &row(b"{}"));
        assert!(bad.validate().unwrap_err().contains("hex"));
    }

    #[test]
    fn emitted_message_becomes_an_event_or_a_defect() {
        let ok = emitted_event(
            1,
            Lsn(42),
            br#"{"id":"e1","aggregate_type":"wallet","aggregate_id":"w1","event_type":"CardAdded","payload":{"a":1},"headers":{"tenant":"t"},"region":"eu"}"#,
            &[Arc::from("region"), Arc::from("zone")],
        );
        assert_eq!(ok.id, "e1");
        assert_eq!(ok.payload.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(ok.column("region"), Some("eu"));
        assert_eq!(ok.column("zone"), None);
        assert_eq!(ok.headers, vec![("tenant".to_string(), "t".to_string())]);
        assert!(ok.validate().is_ok());
        let bad = emitted_event(2, Lsn(43), b"not json", &[]);
        assert!(bad.validate().is_err());
        let no_id = emitted_event(
            3,
            Lsn(44),
            br#"{"aggregate_type":"w","aggregate_id":"1","event_type":"E","payload":{}}"#,
            &[],
        );
        assert!(no_id.validate().unwrap_err().contains("no `id`"));
    }
}
