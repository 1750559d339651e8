//! Logging and tracing for the sample services.
//!
//! Every `tracing` span is also an OpenTelemetry span (tracing-opentelemetry), so the trace
//! context of a request can be written to the outbox and continued by the consumer. Spans are
//! exported over OTLP/HTTP when the crate is built with feature `otlp` and
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set — as in docker-compose, to
//! Jaeger; otherwise they only give ids to the log lines.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops span export when dropped: keep it alive in `main`.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global subscriber: log lines on stderr (level from `RUST_LOG`, default
/// `info`) and OpenTelemetry spans for `service`.
pub fn init(service: &'static str) -> Telemetry {
    let builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    let builder = with_exporter(builder);
    let provider = builder.build();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,lapin=warn,sqlx=warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer(service)))
        .try_init();
    Telemetry { provider }
}

#[cfg(feature = "otlp")]
fn with_exporter(
    builder: opentelemetry_sdk::trace::TracerProviderBuilder,
) -> opentelemetry_sdk::trace::TracerProviderBuilder {
    let configured = crate::env::first_of(&[
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ])
    .is_some();
    if !configured {
        return builder;
    }
    use opentelemetry_otlp::WithExportConfig as _;
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
    {
        Ok(exporter) => builder.with_batch_exporter(exporter),
        Err(e) => {
            eprintln!("warning: cannot set up OTLP export, spans are not exported: {e}");
            builder
        }
    }
}

#[cfg(not(feature = "otlp"))]
fn with_exporter(
    builder: opentelemetry_sdk::trace::TracerProviderBuilder,
) -> opentelemetry_sdk::trace::TracerProviderBuilder {
    builder
}

/// Cancels `shutdown` on SIGTERM or SIGINT (graceful stop in containers and the demo).
pub async fn stop_on_signal(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    shutdown.cancel();
}
