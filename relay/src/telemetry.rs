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
/// Spans go to an exporter: only then are their name and attributes worth building.
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
    span: opentelemetry_sdk::trace::Span,
    system: &'static str,
    destination: String,
    created_at_ms: Option<i64>,
    /// `traceparent` / `tracestate` to put on the message: this span's context.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// Trace id, for log lines.
    pub trace_id: String,
}

/// Starts the PRODUCER span of `event`: a child of the writer's context, or a new root.
pub fn start_publish_span(event: &OutboxEvent, to: &Destination<'_>) -> PublishSpan {
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
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        // Nobody will see the span: only its ids matter (they go on the message).
        let span = tracer
            .span_builder("publish")
            .with_kind(SpanKind::Producer)
            .start_with_context(tracer, &parent);
        return PublishSpan::started(span, &parent, &propagator, to, event);
    }
    let mut attributes = vec![
        KeyValue::new("messaging.system", to.system),
        KeyValue::new("messaging.operation.type", "publish"),
        KeyValue::new("messaging.operation.name", "publish"),
        KeyValue::new("messaging.destination.name", to.name.to_string()),
        KeyValue::new("messaging.message.id", event.id.clone()),
        KeyValue::new("messaging.message.body.size", event.payload.len() as i64),
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
    PublishSpan::started(span, &parent, &propagator, to, event)
}

impl PublishSpan {
    fn started(
        span: opentelemetry_sdk::trace::Span,
        parent: &Context,
        propagator: &TraceContextPropagator,
        to: &Destination<'_>,
        event: &OutboxEvent,
    ) -> Self {
        let span_context = span.span_context().clone();
        let cx = parent.with_remote_span_context(span_context.clone());
        let mut out: HashMap<String, String> = HashMap::new();
        propagator.inject_context(&cx, &mut out);
        Self {
            trace_id: span_context.trace_id().to_string(),
            traceparent: out.remove("traceparent"),
            tracestate: out.remove("tracestate").filter(|s| !s.is_empty()),
            span,
            system: to.system,
            destination: to.name.to_string(),
            created_at_ms: event.created_at_ms,
        }
    }

    /// Ends the span with the broker's answer and counts it in the metrics.
    pub fn end(mut self, result: &Result<(), PublishError>) {
        crate::metrics::record_publish(self.system, &self.destination, self.created_at_ms, result);
        if let Err(e) = result {
            self.span.set_status(Status::error(e.message.clone()));
            self.span
                .set_attribute(KeyValue::new("error.type", format!("{:?}", e.kind)));
        }
        self.span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(tp: &str) -> Vec<String> {
        tp.split('-').map(str::to_string).collect()
    }

    #[test]
    fn publish_span_is_a_child_of_the_writer_and_a_root_without_one() {
        let to = Destination {
            system: "kafka",
            name: "outbox.event.wallet",
            routing_key: None,
        };
        let mut e = OutboxEvent::for_tests("wallet", "w1", "CardAdded");
        e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        e.tracestate = Some("vendor=1".into());
        let span = start_publish_span(&e, &to);
        let tp = parts(span.traceparent.as_deref().unwrap());
        assert_eq!(tp[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(tp[2], "00f067aa0ba902b7", "a new span");
        assert_eq!(tp[3], "01");
        assert_eq!(span.tracestate.as_deref(), Some("vendor=1"));
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        span.end(&Ok(()));

        e.traceparent = None;
        e.tracestate = None;
        let root = start_publish_span(&e, &to);
        let tp = parts(root.traceparent.as_deref().unwrap());
        assert_eq!(tp[1].len(), 32);
        assert_ne!(tp[1], "00000000000000000000000000000000");
        root.end(&Err(PublishError::transient("down")));
    }
}
