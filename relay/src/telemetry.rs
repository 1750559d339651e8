//! Logging and tracing.
//!
//! Logs: human-readable lines on stderr by default, JSON with `RELAY_LOG_FORMAT=json`; the
//! level from `RUST_LOG` (default `info`).
//!
//! Traces: every event gets a PRODUCER span following OpenTelemetry's messaging semantic
//! conventions (<https://opentelemetry.io/docs/specs/semconv/messaging/messaging-spans/>),
//! whose parent is the writer's context from the row (`traceparent`/`tracestate`), or a new
//! root when the row has none. Its context is what the message carries, so the writer's
//! request, the relay's publish and the consumer's handling share one trace id. Spans are
//! exported over OTLP/HTTP (JSON) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; otherwise they are created (the ids are
//! needed on the messages) and dropped.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_subscriber::EnvFilter;

use crate::error::PublishError;
use crate::event::OutboxEvent;

static PROVIDER: OnceLock<(SdkTracerProvider, SdkTracer)> = OnceLock::new();
/// Spans go through the SDK: when they are exported (only then are their name and attributes
/// worth building), or when `OTEL_TRACES_SAMPLER` names a sampler other than the default
/// parent-based always-on one, which decides the sampled flag the messages carry.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,rdkafka=off,librdkafka=warn,lapin=off,opentelemetry=warn")
    });
    let json = std::env::var("RELAY_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colours only on a terminal: a sidecar's log collector wants plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Sets up the tracer provider once; exports over OTLP when the standard variables ask for it.
/// Returns an error message when the exporter cannot be built (bad endpoint, ...).
pub fn init_tracing() -> Result<(), String> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "outbox-relay".into()),
        )
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let export = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()));
    if export {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .build()
            .map_err(|e| {
                format!("cannot set up the OTLP exporter: {e}; check OTEL_EXPORTER_OTLP_ENDPOINT")
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let own_sampler = std::env::var("OTEL_TRACES_SAMPLER")
        .is_ok_and(|s| !s.is_empty() && s != "parentbased_always_on");
    if export || own_sampler {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let provider = builder.build();
    let tracer = provider.tracer("outbox-relay");
    let _ = PROVIDER.set((provider, tracer));
    Ok(())
}

/// Flushes spans still buffered for export (at shutdown).
pub fn shutdown_tracing() {
    if let Some((provider, _)) = PROVIDER.get() {
        let _ = provider.force_flush();
        let _ = provider.shutdown();
    }
}

fn tracer() -> &'static SdkTracer {
    if PROVIDER.get().is_none() {
        let _ = init_tracing();
    }
    &PROVIDER.get().expect("initialised above").1
}

/// Where a message goes, for the span's attributes.
pub struct Destination<'a> {
    /// `kafka` or `rabbitmq` (OpenTelemetry's `messaging.system` values).
    pub system: &'static str,
    /// Topic or exchange.
    pub name: &'a str,
    /// AMQP routing key.
    pub routing_key: Option<&'a str>,
}

/// The relay's PRODUCER span of one event, open until the broker answered.
pub struct PublishSpan {
    /// The SDK's span, only while spans are exported: without an exporter nobody would see
    /// it, and only its ids matter (they go on the message).
    span: Option<opentelemetry_sdk::trace::Span>,
    created_at_ms: Option<i64>,
    /// `traceparent` / `tracestate` to put on the message: this span's context.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Starts the PRODUCER span of `event`: a child of the writer's context, or a new root.
pub fn start_publish_span(event: &OutboxEvent, to: &Destination<'_>) -> PublishSpan {
    if EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        exported_span(event, to)
    } else {
        id_only_span(event)
    }
}

/// The writer's context in a W3C `traceparent` (<https://www.w3.org/TR/trace-context/>): its
/// trace id and whether it was sampled; `None` when the header is not a valid one (a new root).
/// Field lengths are checked as the specification requires; the SDK's parser is laxer (it
/// continues e.g. a short trace id or a trailing `-`), so only such malformed headers differ.
fn parse_traceparent(tp: &str) -> Option<(u128, bool)> {
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let more = parts.next().is_some();
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && more) {
        return None;
    }
    if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok()?;
    let span_id = u64::from_str_radix(span, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == 0 || span_id == 0 || (version == "00" && flags > 2) {
        return None;
    }
    Some((trace_id, flags & 1 == 1))
}

/// The span's ids without the SDK: a child of a valid writer context keeps its trace id,
/// sampled flag and `tracestate` (the SDK's parent-based sampler does the same), anything else
/// becomes a sampled root. `exported_span` gives the same context (unit test).
fn id_only_span(event: &OutboxEvent) -> PublishSpan {
    let parent = event.traceparent.as_deref().and_then(parse_traceparent);
    let span_id = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    let (trace_id, sampled, tracestate) = match parent {
        Some((trace_id, sampled)) => {
            let state = event
                .tracestate
                .as_deref()
                .and_then(|ts| ts.parse::<opentelemetry::trace::TraceState>().ok())
                .map(|ts| ts.header())
                .filter(|ts| !ts.is_empty());
            (trace_id, sampled, state)
        }
        None => loop {
            let id: u128 = rand::random();
            if id != 0 {
                break (id, true, None);
            }
        },
    };
    PublishSpan {
        span: None,
        created_at_ms: event.created_at_ms,
        traceparent: Some(format!(
            "00-{trace_id:032x}-{span_id:016x}-{:02x}",
            u8::from(sampled)
        )),
        tracestate,
    }
}

/// The span through the SDK, with the name and attributes of the semantic conventions.
fn exported_span(event: &OutboxEvent, to: &Destination<'_>) -> PublishSpan {
    let propagator = TraceContextPropagator::new();
    let mut carrier: HashMap<String, String> = HashMap::new();
    if let Some(tp) = &event.traceparent {
        carrier.insert("traceparent".into(), tp.clone());
        if let Some(ts) = &event.tracestate {
            carrier.insert("tracestate".into(), ts.clone());
        }
    }
    let parent = propagator.extract_with_context(&Context::new(), &carrier);
    let tracer = tracer();
    let mut attributes = vec![
        KeyValue::new("messaging.system", to.system),
        KeyValue::new("messaging.operation.type", "publish"),
        KeyValue::new("messaging.operation.name", "publish"),
        KeyValue::new("messaging.destination.name", to.name.to_string()),
        KeyValue::new("messaging.message.id", event.id.clone()),
        KeyValue::new("messaging.message.body.size", event.body().len() as i64),
        KeyValue::new("outbox.aggregate_type", event.aggregate_type.clone()),
        KeyValue::new("outbox.aggregate_id", event.aggregate_id.clone()),
        KeyValue::new("outbox.event_type", event.event_type.clone()),
    ];
    match to.routing_key {
        Some(rk) => attributes.push(KeyValue::new(
            "messaging.rabbitmq.destination.routing_key",
            rk.to_string(),
        )),
        None => attributes.push(KeyValue::new(
            "messaging.kafka.message.key",
            event.aggregate_id.clone(),
        )),
    }
    let span = tracer
        .span_builder(format!("publish {}", to.name))
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    let cx = parent.with_remote_span_context(span.span_context().clone());
    let mut out: HashMap<String, String> = HashMap::new();
    propagator.inject_context(&cx, &mut out);
    PublishSpan {
        traceparent: out.remove("traceparent"),
        tracestate: out.remove("tracestate").filter(|s| !s.is_empty()),
        span: Some(span),
        created_at_ms: event.created_at_ms,
    }
}

impl PublishSpan {
    /// Ends the span with the broker's answer, and counts the answer in `tally` under the
    /// metric label `destination` (see [`crate::metrics::PublishTally::record`]).
    pub fn end(
        self,
        result: &Result<(), PublishError>,
        destination: &str,
        tally: &mut crate::metrics::PublishTally,
    ) {
        tally.record(destination, self.created_at_ms, result);
        if let Some(mut span) = self.span {
            if let Err(e) = result {
                span.set_status(Status::error(e.message.clone()));
                span.set_attribute(KeyValue::new("error.type", format!("{:?}", e.kind)));
            }
            span.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(tp: &str) -> Vec<String> {
        tp.split('-').map(str::to_string).collect()
    }

    fn wallet_event(traceparent: Option<&str>, tracestate: Option<&str>) -> OutboxEvent {
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        e.traceparent = traceparent.map(str::to_string);
        e.tracestate = tracestate.map(str::to_string);
        e
    }

    const TO: Destination<'static> = Destination {
        system: "kafka",
        name: "outbox.event.wallet",
        routing_key: None,
    };

    #[test]
    fn publish_span_is_a_child_of_the_writer_and_a_root_without_one() {
        let e = wallet_event(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("vendor=1"),
        );
        for span in [id_only_span(&e), exported_span(&e, &TO)] {
            let tp = parts(span.traceparent.as_deref().unwrap());
            assert_eq!(tp[0], "00");
            assert_eq!(tp[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
            assert_eq!(tp[2].len(), 16);
            assert_ne!(tp[2], "00f067aa0ba902b7", "a new span");
            assert_eq!(tp[3], "01");
            assert_eq!(span.tracestate.as_deref(), Some("vendor=1"));
            span.end(
                &Ok(()),
                TO.name,
                &mut crate::metrics::PublishTally::new("kafka"),
            );
        }

        let e = wallet_event(None, None);
        for root in [id_only_span(&e), exported_span(&e, &TO)] {
            let tp = parts(root.traceparent.as_deref().unwrap());
            assert_eq!(tp[1].len(), 32);
            assert_ne!(tp[1], "00000000000000000000000000000000");
            assert_eq!(tp[3], "01", "a new root is sampled");
            assert_eq!(root.tracestate, None);
            root.end(
                &Err(PublishError::transient("down")),
                TO.name,
                &mut crate::metrics::PublishTally::new("kafka"),
            );
        }
    }

    /// Without an exporter the relay builds the ids itself; the message must carry the same
    /// context the SDK would give it, for valid, unsampled and malformed writer contexts.
    #[test]
    fn id_only_spans_continue_the_writer_like_the_sdk() {
        let cases = [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02",
                None,
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
                Some("a=1,b=2"),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("not a state"),
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                None,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Some("a=1"),
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                None,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
                None,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-zzf067aa0ba902b7-01",
                None,
            ),
            ("garbage", Some("a=1")),
            ("", None),
        ];
        for (traceparent, tracestate) in cases {
            let e = wallet_event(Some(traceparent), tracestate);
            let ours = id_only_span(&e);
            let sdk = exported_span(&e, &TO);
            let (o, s) = (
                parts(ours.traceparent.as_deref().unwrap()),
                parts(sdk.traceparent.as_deref().unwrap()),
            );
            let continued = traceparent.contains("4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(o[0], s[0], "{traceparent}");
            assert_eq!(o[3], s[3], "flags of {traceparent}");
            assert_eq!(
                o[1] == s[1],
                continued && o[1] == "4bf92f3577b34da6a3ce929d0e0e4736",
                "trace id of {traceparent}: ours {} sdk {}",
                o[1],
                s[1]
            );
            assert_eq!(
                ours.tracestate, sdk.tracestate,
                "{traceparent} {tracestate:?}"
            );
            assert_ne!(o[2], "00f067aa0ba902b7");
        }
    }
}
