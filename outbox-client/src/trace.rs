//! W3C trace context (<https://www.w3.org/TR/trace-context/>) in and out of OpenTelemetry.
//!
//! Writers store the context of the request that wrote an event as `traceparent` /
//! `tracestate` columns; the relay copies it (as its publish span's child) onto the message;
//! consumers extract it from the message headers and make it the parent of their span. All
//! encoding and decoding goes through opentelemetry's [`TraceContextPropagator`], so malformed
//! values are ignored (a new root trace starts) rather than failing anything.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace context of one event, as stored in the outbox and sent in message headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The trace id (32 hex digits) of `traceparent`, when there is a valid one.
    pub fn trace_id(&self) -> Option<TraceId> {
        let cx = extract(
            self.traceparent
                .as_deref()
                .map(|tp| ("traceparent", tp))
                .into_iter(),
        );
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| sc.trace_id())
    }
}

/// The OpenTelemetry context to propagate from here: the current `tracing` span's (when a
/// tracing-opentelemetry layer is installed and the span is recorded), else the current
/// OpenTelemetry [`Context`] (code that uses the OpenTelemetry API directly).
pub fn current_context() -> Context {
    let from_span = tracing::Span::current().context();
    if from_span.span().span_context().is_valid() {
        from_span
    } else {
        Context::current()
    }
}

/// Encodes `cx` as W3C headers; both are `None` when `cx` has no valid span context.
pub fn inject(cx: &Context) -> TraceHeaders {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    TraceHeaders {
        traceparent: carrier.remove("traceparent"),
        tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
    }
}

/// Decodes W3C headers (names case-insensitive, other headers ignored) into a context whose
/// remote span is the parent a consumer's span should have. Without a valid `traceparent` the
/// result has no span, and a span parented on it becomes a new root.
pub fn extract<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>) -> Context {
    let carrier: HashMap<String, String> = headers
        .filter_map(|(k, v)| {
            let k = k.to_ascii_lowercase();
            (k == "traceparent" || k == "tracestate").then(|| (k, v.to_string()))
        })
        .collect();
    TraceContextPropagator::new().extract(&carrier)
}

/// The trace id of the current `tracing` span (or OpenTelemetry context), formatted as 32 hex
/// digits, for log lines and API responses; `None` outside any trace.
pub fn current_trace_id() -> Option<String> {
    let cx = current_context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};

    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn extracted_context_injects_back_unchanged() {
        let cx = extract([("TraceParent", TP), ("tracestate", "vendor=1")].into_iter());
        let headers = inject(&cx);
        assert_eq!(headers.traceparent.as_deref(), Some(TP));
        assert_eq!(headers.tracestate.as_deref(), Some("vendor=1"));
        assert_eq!(
            headers.trace_id().unwrap().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn malformed_or_missing_context_propagates_nothing() {
        for headers in [
            vec![],
            vec![("traceparent", "garbage")],
            vec![(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )],
        ] {
            let cx = extract(headers.into_iter());
            assert!(!cx.span().span_context().is_valid());
            assert_eq!(inject(&cx), TraceHeaders::default());
        }
    }

    #[test]
    fn the_current_otel_context_is_captured_without_a_tracing_span() {
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _guard = Context::current().with_remote_span_context(sc).attach();
        assert_eq!(
            current_trace_id().as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(
            inject(&current_context()).traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }
}
