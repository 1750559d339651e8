//! Logging and tracing.
//!
//! Logs: human-readable lines on stderr by default, JSON with `RELAY_LOG_FORMAT=json`; the
//! level from `RUST_LOG` (default `info`).
//!
//! Traces: every event gets a PRODUCER span following OpenTelemetry's messaging semantic
//! conventions (<https://opentelemetry.io/docs/specs/semconv/messaging/messaging-spans/>),
//! whose parent is the writer's context from the row (`traceparent`/`tracestate`), or a new
//! root when the row has none. Its context is what the message carries, so the writer's
//! request, the relay's publish and the consumer's handling share one trace id.
//!
//! Export follows the OTLP exporter's standard variables
//! (<https://opentelemetry.io/docs/specs/otel/protocol/exporter/>,
//! <https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/>):
//!
//! | variable | meaning |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | base URL of the receiver; the HTTP protocols append `/v1/traces`, gRPC uses it as it is |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | full URL for spans, used as it is; wins over the above |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` | `http/protobuf` (default), `http/json`, `grpc` (with the `otlp-grpc` cargo feature, on by default); the traces variable wins |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` | `key=value,...` sent with every export (e.g. an API key); the traces variable wins, whole |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` | export timeout in ms, read by the exporter itself |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION` | none is built in: any value is an error from the exporter |
//! | `OTEL_SERVICE_NAME` | `service.name` of the resource (default `outbox-relay`) |
//! | `OTEL_RESOURCE_ATTRIBUTES` | `key=value,...` resource attributes, percent-decoded |
//!
//! Without an endpoint, spans are created (the ids are needed on the messages) and dropped.
//! Export is without TLS (neither the HTTP client nor tonic is built with it): an `https://`
//! endpoint is refused; a collector next to the relay, reached over `http://`, forwards over TLS.
//! An unknown or uncompiled protocol, an endpoint that is not an http URL, and a malformed
//! headers or resource attributes list are configuration errors at start-up (one message, a
//! non-zero exit), not warnings: the exporter alone would drop what it cannot parse, or send to
//! `localhost`, and the first sign would be traces missing in the collector. The messages name
//! the variable and the entry, never a header's value (they carry credentials).

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
/// Returns the message for the user when the variables are malformed (unknown protocol, bad
/// endpoint, headers or resource attributes) or the exporter cannot be built.
pub fn init_tracing() -> Result<(), String> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let env = |name: &str| std::env::var(name).ok();
    let resource = resource_from(&env)?;
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let export = OtlpExport::from_env(&env)?;
    if let Some(export) = &export {
        builder = builder.with_batch_exporter(export.exporter()?);
    }
    let own_sampler = std::env::var("OTEL_TRACES_SAMPLER")
        .is_ok_and(|s| !s.is_empty() && s != "parentbased_always_on");
    if export.is_some() || own_sampler {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let provider = builder.build();
    let tracer = provider.tracer("outbox-relay");
    let _ = PROVIDER.set((provider, tracer));
    Ok(())
}

/// The OTLP transports, as `OTEL_EXPORTER_OTLP_PROTOCOL` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OtlpProtocol {
    HttpProtobuf,
    HttpJson,
    Grpc,
}

impl OtlpProtocol {
    /// The values this build accepts, for messages.
    const SUPPORTED: &'static str = if cfg!(feature = "otlp-grpc") {
        "`http/protobuf` (the default), `http/json` or `grpc`"
    } else {
        "`http/protobuf` (the default) or `http/json`"
    };

    /// The protocol from the traces variable, else the general one, else the specification's
    /// default `http/protobuf`; an empty variable counts as unset, as the specification says.
    fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let Some((var, value)) = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|var| env(var).filter(|v| !v.trim().is_empty()).map(|v| (var, v))) else {
            return Ok(Self::HttpProtobuf);
        };
        match value.trim() {
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Ok(Self::HttpJson),
            "grpc" if cfg!(feature = "otlp-grpc") => Ok(Self::Grpc),
            "grpc" => Err(format!(
                "{var}=`grpc`: this outbox-relay was built without OTLP/gRPC (cargo feature \
                 `otlp-grpc`); use {}, or rebuild with the feature",
                Self::SUPPORTED
            )),
            other => Err(format!(
                "{var}=`{other}` is not an OTLP protocol; use {}",
                Self::SUPPORTED
            )),
        }
    }
}

/// Where and how spans are exported, when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
#[derive(Debug, PartialEq)]
struct OtlpExport {
    protocol: OtlpProtocol,
    /// The URL spans are sent to, resolved as the specification says: the traces variable as
    /// it is; the general one with `/v1/traces` appended for the HTTP protocols, as it is for
    /// gRPC.
    endpoint: String,
}

impl OtlpExport {
    /// `None` when no endpoint is set. The exporter would fall back to `localhost` for a value
    /// it cannot parse, and drop header entries it cannot parse: both are checked here, so
    /// that a typo is an error at start-up instead of spans that silently go nowhere.
    fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        // Checked with or without an endpoint: a typo is found before it matters.
        let protocol = OtlpProtocol::from_env(env)?;
        // The exporter reads the headers itself (the traces variable wins, whole); check the
        // one it will read.
        if let Some((var, value)) = [
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ]
        .into_iter()
        .find_map(|var| env(var).map(|v| (var, v)))
        {
            check_headers(var, &value)?;
        }
        let set = |var: &str| {
            env(var)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let (var, endpoint) = match (
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces),
            (None, Some(base)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", base),
            (None, None) => return Ok(None),
        };
        let endpoint = if var == "OTEL_EXPORTER_OTLP_ENDPOINT" && protocol != OtlpProtocol::Grpc {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        } else {
            endpoint
        };
        let uri = endpoint.parse::<::http::Uri>().ok().filter(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
        });
        // Neither the HTTP client nor tonic is built with TLS here: an https:// receiver would
        // fail every export, without a word (the SDK's internal logs are not built in either).
        if uri.as_ref().and_then(|u| u.scheme_str()) == Some("https") {
            return Err(format!(
                "{var}=`{}`: this outbox-relay exports OTLP without TLS, so https:// is not \
                 supported; send to a collector over http:// (e.g. a sidecar or node-local \
                 collector, which forwards over TLS)",
                env(var).unwrap_or_default().trim(),
            ));
        }
        if uri.is_none() {
            let example = match (protocol, var) {
                (OtlpProtocol::Grpc, _) => "http://otel-collector:4317",
                (_, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") => "http://otel-collector:4318/v1/traces",
                _ => "http://otel-collector:4318",
            };
            return Err(format!(
                "{var}=`{}` is not an http:// URL of an OTLP receiver, e.g. `{example}`",
                env(var).unwrap_or_default().trim(),
            ));
        }
        Ok(Some(Self { protocol, endpoint }))
    }

    fn exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, String> {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let built = match self.protocol {
            OtlpProtocol::HttpProtobuf | OtlpProtocol::HttpJson => builder
                .with_http()
                .with_protocol(if self.protocol == OtlpProtocol::HttpJson {
                    Protocol::HttpJson
                } else {
                    Protocol::HttpBinary
                })
                .with_endpoint(&self.endpoint)
                .build(),
            // The tonic channel's task is spawned here, on the runtime `run` is called on (tonic
            // would panic without one); the batch processor's thread then sends through it.
            #[cfg(feature = "otlp-grpc")]
            OtlpProtocol::Grpc if tokio::runtime::Handle::try_current().is_err() => {
                return Err("OTLP/gRPC export must be set up on the async runtime".into());
            }
            #[cfg(feature = "otlp-grpc")]
            OtlpProtocol::Grpc => builder
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_endpoint(&self.endpoint)
                .build(),
            // Rejected by `OtlpProtocol::from_env` already; an error rather than a panic.
            #[cfg(not(feature = "otlp-grpc"))]
            OtlpProtocol::Grpc => {
                return Err(format!(
                    "OTLP/gRPC is not in this build; use {}",
                    OtlpProtocol::SUPPORTED
                ));
            }
        };
        built.map_err(|e| {
            format!(
                "cannot set up the OTLP exporter for `{}`: {e}; check the \
                 OTEL_EXPORTER_OTLP_* variables (endpoint, timeout, compression)",
                self.endpoint
            )
        })
    }
}

/// A `key=value,key=value` list of `OTEL_EXPORTER_OTLP_HEADERS` or `OTEL_RESOURCE_ATTRIBUTES`
/// (<https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/>), keys
/// and values trimmed, values percent-decoded. Empty entries are skipped; an entry without `=` or
/// with an empty key, or a broken `%` escape, is an error. Messages name the entry by its key or
/// position, never by its value: headers carry credentials.
fn parse_key_values(var: &str, value: &str) -> Result<Vec<(String, String)>, String> {
    let decode = |key: &str, s: &str| -> Result<String, String> {
        let bytes = s.as_bytes();
        let broken_escape = bytes.iter().enumerate().any(|(i, &b)| {
            b == b'%'
                && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        });
        match percent_encoding::percent_decode_str(s).decode_utf8() {
            Ok(decoded) if !broken_escape => Ok(decoded.into_owned()),
            _ => Err(format!(
                "{var}: the value of `{key}` has a `%` not followed by two hex digits, or \
                 escapes that are not UTF-8; write `%25` for a literal `%`"
            )),
        }
    };
    let format = "the format is `key1=value1,key2=value2`, percent-encoded";
    let mut out = Vec::new();
    for (i, entry) in value.split(',').enumerate() {
        let n = i + 1;
        if entry.trim().is_empty() {
            continue;
        }
        let Some((key, val)) = entry.split_once('=') else {
            return Err(format!("{var}: entry {n} has no `=`; {format}"));
        };
        // Only values are percent-encoded (keys are baggage tokens), as the exporter reads them.
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(format!("{var}: entry {n} has an empty key; {format}"));
        }
        let val = decode(&key, val.trim())?;
        out.push((key, val));
    }
    Ok(out)
}

/// Checks `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` the way the exporter will use it: each entry
/// must become an HTTP header (gRPC metadata are HTTP/2 headers too), with a value.
fn check_headers(var: &str, value: &str) -> Result<(), String> {
    for (key, val) in parse_key_values(var, value)? {
        if ::http::HeaderName::from_bytes(key.as_bytes()).is_err() {
            return Err(format!(
                "{var}: `{key}` is not an HTTP header name (letters, digits and `!#$&'*+-.^_|~`)"
            ));
        }
        if val.is_empty() || ::http::HeaderValue::from_str(&val).is_err() {
            return Err(format!(
                "{var}: the value of header `{key}` is empty or not printable ASCII; \
                 percent-encode what is not"
            ));
        }
    }
    Ok(())
}

/// The resource of the relay's spans: the SDK's `telemetry.sdk.*`, `OTEL_RESOURCE_ATTRIBUTES`
/// (percent-decoded: the SDK's own detector does not decode and drops malformed entries without
/// a word), and `service.name` from `OTEL_SERVICE_NAME`, else from the attributes, else
/// `outbox-relay`.
fn resource_from(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<opentelemetry_sdk::Resource, String> {
    let attributes = match env("OTEL_RESOURCE_ATTRIBUTES") {
        Some(value) => parse_key_values("OTEL_RESOURCE_ATTRIBUTES", &value)?,
        None => Vec::new(),
    };
    let service_name = env("OTEL_SERVICE_NAME")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            attributes
                .iter()
                .rev()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| "outbox-relay".into());
    Ok(opentelemetry_sdk::Resource::builder_empty()
        .with_detector(Box::new(
            opentelemetry_sdk::resource::TelemetryResourceDetector,
        ))
        .with_attributes(attributes.into_iter().map(|(k, v)| KeyValue::new(k, v)))
        .with_service_name(service_name)
        .build())
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
        traceparent: Some(traceparent_header(trace_id, span_id, sampled)),
        tracestate,
    }
}

/// `00-<trace id>-<span id>-<flags>` in lower-case hex, in one allocation of its exact length
/// (`format!` made three allocator calls for it: a first guess, then two reallocations).
fn traceparent_header(trace_id: u128, span_id: u64, sampled: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    for shift in (0..32).rev() {
        out.push(char::from(HEX[(trace_id >> (shift * 4)) as usize & 0xf]));
    }
    out.push('-');
    for shift in (0..16).rev() {
        out.push(char::from(HEX[(span_id >> (shift * 4)) as usize & 0xf]));
    }
    out.push_str(if sampled { "-01" } else { "-00" });
    out
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

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn export_of(vars: &[(&str, &str)]) -> Result<Option<OtlpExport>, String> {
        OtlpExport::from_env(&env_of(vars))
    }

    #[test]
    fn the_traceparent_header_is_the_w3c_form_of_its_ids() {
        for (trace_id, span_id, sampled) in [
            (1u128, 1u64, true),
            (u128::MAX, u64::MAX, false),
            (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, true),
        ] {
            let header = traceparent_header(trace_id, span_id, sampled);
            assert_eq!(
                header,
                format!(
                    "00-{trace_id:032x}-{span_id:016x}-{:02x}",
                    u8::from(sampled)
                )
            );
            assert_eq!(header.capacity(), header.len());
            assert_eq!(parse_traceparent(&header), Some((trace_id, sampled)));
        }
    }

    #[test]
    fn protocol_defaults_to_protobuf_and_the_traces_variable_wins() {
        let p = |vars: &[(&str, &str)]| OtlpProtocol::from_env(&env_of(vars));
        assert_eq!(p(&[]), Ok(OtlpProtocol::HttpProtobuf));
        assert_eq!(
            p(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "")]),
            Ok(OtlpProtocol::HttpProtobuf),
            "empty is unset"
        );
        assert_eq!(
            p(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Ok(OtlpProtocol::HttpJson)
        );
        assert_eq!(
            p(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ]),
            Ok(OtlpProtocol::HttpProtobuf)
        );
        let grpc = p(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")]);
        if cfg!(feature = "otlp-grpc") {
            assert_eq!(grpc, Ok(OtlpProtocol::Grpc));
        } else {
            let e = grpc.unwrap_err();
            assert!(
                e.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=`grpc`"),
                "{e}"
            );
            assert!(e.contains("`http/json`") && e.contains("otlp-grpc"), "{e}");
        }
        let e = p(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/xml")]).unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=`http/xml` is not an OTLP protocol; use")
                && e.contains("`http/protobuf` (the default)")
                && e.contains("`http/json`"),
            "{e}"
        );
    }

    #[test]
    fn the_general_endpoint_gets_the_traces_path_over_http_only() {
        let endpoint = |vars: &[(&str, &str)]| export_of(vars).unwrap().map(|e| e.endpoint);
        assert_eq!(endpoint(&[]), None);
        assert_eq!(endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), None);
        for base in ["http://collector:4318", "http://collector:4318/"] {
            assert_eq!(
                endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base)]).as_deref(),
                Some("http://collector:4318/v1/traces")
            );
        }
        assert_eq!(
            endpoint(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://x.example/otlp/spans"
                ),
            ])
            .as_deref(),
            Some("http://x.example/otlp/spans"),
            "the traces endpoint is used as it is"
        );
        if cfg!(feature = "otlp-grpc") {
            assert_eq!(
                endpoint(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ])
                .as_deref(),
                Some("http://collector:4317")
            );
        }
        let e = export_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://api.vendor.example")])
            .unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT=`https://api.vendor.example`: this")
                && e.contains("without TLS"),
            "{e}"
        );
        for bad in ["collector:4318", "localhost", "ftp://x/", "http://"] {
            let e = export_of(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", bad)]).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=`{bad}` is not"
                )),
                "{e}"
            );
        }
    }

    /// tonic spawns its channel's task on the current runtime: without one, an error, not a panic.
    #[cfg(feature = "otlp-grpc")]
    #[test]
    fn a_grpc_exporter_is_built_on_the_runtime_and_is_an_error_without_one() {
        let export = OtlpExport {
            protocol: OtlpProtocol::Grpc,
            endpoint: "http://127.0.0.1:4317".into(),
        };
        let e = export.exporter().expect_err("no runtime");
        assert!(e.contains("async runtime"), "{e}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { assert!(export.exporter().is_ok()) });
    }

    #[test]
    fn key_value_lists_are_trimmed_and_percent_decoded() {
        assert_eq!(
            parse_key_values("V", " a = b%2Cc ,, k=v=w,x=%E2%9C%93,").unwrap(),
            [("a", "b,c"), ("k", "v=w"), ("x", "\u{2713}")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(parse_key_values("V", "").unwrap(), vec![]);
        for (bad, expect) in [
            ("a=1,secret", "V: entry 2 has no `=`"),
            ("=1", "V: entry 1 has an empty key"),
            ("a=100%", "V: the value of `a` has a `%`"),
            ("a=%zz", "V: the value of `a` has a `%`"),
            ("a=%FF", "V: the value of `a` has a `%`"),
        ] {
            let e = parse_key_values("V", bad).unwrap_err();
            assert!(e.starts_with(expect), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn malformed_headers_are_errors_that_do_not_show_the_value() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert!(
            export_of(&[
                base,
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "api-key=s3cret,x-tenant=a%20b"
                )
            ])
            .is_ok()
        );
        for (var, bad, expect) in [
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Bearer s3cret",
                "entry 1 has no `=`",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api key=s3cret",
                "`api key` is not an HTTP header name",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "api-key=s3cret%0A",
                "the value of header `api-key`",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "api-key=",
                "the value of header `api-key`",
            ),
        ] {
            let e = export_of(&[base, (var, bad)]).unwrap_err();
            assert!(
                e.starts_with(&format!("{var}: ")) && e.contains(expect),
                "{e}"
            );
            assert!(!e.contains("s3cret"), "{e}");
        }
        // The traces variable wins, whole: the general one is not read then.
        assert!(
            export_of(&[
                base,
                ("OTEL_EXPORTER_OTLP_HEADERS", "broken"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "a=1"),
            ])
            .is_ok()
        );
    }

    #[test]
    fn service_name_comes_from_otel_service_name_then_the_attributes() {
        let resource = |vars: &[(&str, &str)]| resource_from(&env_of(vars)).unwrap();
        let get = |r: &opentelemetry_sdk::Resource, k: &'static str| {
            r.get(&opentelemetry::Key::from_static_str(k))
                .map(|v| v.to_string())
        };
        let r = resource(&[]);
        assert_eq!(get(&r, "service.name").as_deref(), Some("outbox-relay"));
        assert_eq!(get(&r, "telemetry.sdk.language").as_deref(), Some("rust"));
        let attrs = (
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=billing,deployment.environment.name=prod%2Feu",
        );
        let r = resource(&[attrs]);
        assert_eq!(get(&r, "service.name").as_deref(), Some("billing"));
        assert_eq!(
            get(&r, "deployment.environment.name").as_deref(),
            Some("prod/eu")
        );
        let r = resource(&[attrs, ("OTEL_SERVICE_NAME", "billing-relay")]);
        assert_eq!(get(&r, "service.name").as_deref(), Some("billing-relay"));
        let e = resource_from(&env_of(&[("OTEL_RESOURCE_ATTRIBUTES", "a=1,b")])).unwrap_err();
        assert!(
            e.starts_with("OTEL_RESOURCE_ATTRIBUTES: entry 2 has no `=`"),
            "{e}"
        );
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
