//! Traces, metrics and health: one trace id from the writer's span through the relay's
//! PRODUCER span to the consumer's span; `/metrics` counters that match what was sent;
//! `/readyz` that follows the broker. Spans reach an OTLP receiver over HTTP (JSON or
//! protobuf) or gRPC, with the headers and resource the standard variables set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use prost::Message;
use rdkafka::mocking::MockCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::proxy::Proxy;
use crate::support::*;

/// One export request as a receiver saw it.
#[derive(Clone, Debug)]
struct Export {
    /// `application/json`, `application/x-protobuf` or `application/grpc`.
    content_type: String,
    /// The HTTP path (`/v1/traces`), or the gRPC method's.
    path: String,
    /// Request headers (gRPC metadata), names in lower case.
    headers: HashMap<String, String>,
    /// The `ExportTraceServiceRequest` in OTLP/JSON form: protobuf bodies are decoded with the
    /// official definitions (opentelemetry-proto) and shown as the JSON encoding shows them.
    request: serde_json::Value,
}

fn otlp_json(request: &ExportTraceServiceRequest) -> serde_json::Value {
    serde_json::to_value(request).unwrap()
}

/// A minimal OTLP receiver, over HTTP (JSON or protobuf bodies) or gRPC: keeps every export.
#[derive(Clone, Default)]
struct OtlpReceiver {
    exports: Arc<Mutex<Vec<Export>>>,
}

impl OtlpReceiver {
    /// An OTLP/HTTP receiver; returns its base URL (`http://127.0.0.1:port`).
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Self::default();
        let exports = receiver.exports.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let exports = exports.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // Read one request: head, then Content-Length bytes of body.
                        let head_end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            let mut chunk = [0u8; 8192];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        let mut lines = head.lines();
                        let path = lines
                            .next()
                            .and_then(|l| l.split(' ').nth(1))
                            .unwrap_or_default()
                            .to_string();
                        let headers: HashMap<String, String> = lines
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                            .collect();
                        let len: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len {
                            let mut chunk = [0u8; 8192];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = &buf[head_end..head_end + len];
                        let content_type = headers.get("content-type").cloned().unwrap_or_default();
                        let protobuf = content_type == "application/x-protobuf";
                        let request = if protobuf {
                            ExportTraceServiceRequest::decode(body).map_or_else(
                                |e| serde_json::json!({ "undecodable": e.to_string() }),
                                |r| otlp_json(&r),
                            )
                        } else {
                            serde_json::from_slice(body).unwrap_or_default()
                        };
                        buf.drain(..head_end + len);
                        exports.lock().unwrap().push(Export {
                            content_type,
                            path,
                            headers,
                            request,
                        });
                        // An empty ExportTraceServiceResponse, in the request's encoding.
                        let reply = if protobuf {
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                        };
                        if sock.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (receiver, url)
    }

    /// An OTLP/gRPC receiver (the collector's `TraceService`, served by tonic); returns its URL.
    async fn start_grpc() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, url)
    }

    fn exports(&self) -> Vec<Export> {
        self.exports.lock().unwrap().clone()
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        let exports = self.exports();
        exports
            .iter()
            .flat_map(|e| e.request["resourceSpans"].as_array().into_iter().flatten())
            .flat_map(|rs| rs["scopeSpans"].as_array().into_iter().flatten())
            .flat_map(|ss| ss["spans"].as_array().into_iter().flatten())
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers: HashMap<String, String> = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect();
        self.exports.lock().unwrap().push(Export {
            content_type: headers.get("content-type").cloned().unwrap_or_default(),
            path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export".into(),
            headers,
            request: otlp_json(request.get_ref()),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

/// How the relay is told to export, and what the receiver must see.
struct Otlp {
    /// `OTEL_*` variables besides the endpoint and the batch delay.
    env: &'static [(&'static str, &'static str)],
    grpc: bool,
    content_type: &'static str,
    /// `/v1/traces` for the HTTP protocols.
    path: &'static str,
    /// Headers the receiver must see on every export.
    headers: &'static [(&'static str, &'static str)],
    /// Resource attributes every export must carry.
    resource: &'static [(&'static str, &'static str)],
}

const HTTP_JSON: Otlp = Otlp {
    env: &[
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_SERVICE_NAME", "relay-under-test"),
    ],
    grpc: false,
    content_type: "application/json",
    path: "/v1/traces",
    headers: &[],
    resource: &[("service.name", "relay-under-test")],
};

async fn one_trace_from_writer_to_consumer(broker: Broker, otlp: Otlp) {
    let (receiver, endpoint) = if otlp.grpc {
        OtlpReceiver::start_grpc().await
    } else {
        OtlpReceiver::start().await
    };
    let mut s = Scenario::new(broker).await;
    s.extra_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    s.extra_env
        .extend(otlp.env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();

    // The writer: a span in "the service", whose context goes into the outbox row.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let tracer = provider.tracer("wallet");
    let propagator = TraceContextPropagator::new();
    let writer_span = tracer.start("POST /wallets/w-1/plans");
    let writer_cx = Context::current_with_span(writer_span);
    let mut carrier = HashMap::new();
    propagator.inject_context(&writer_cx, &mut carrier);
    let id = uuid::Uuid::new_v4();
    s.db.client()
        .await
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, traceparent) \
             VALUES ($1, 'wallet', 'w-1', 'PlanPurchased', '{\"n\": 0}', $2)",
            &[&id, &carrier["traceparent"]],
        )
        .await
        .unwrap();
    writer_cx.span().end();
    let written = vec![Written {
        id: id.to_string(),
        aggregate_id: "w-1".into(),
        n: 0,
    }];
    let got = reader.read_until(&written, Duration::from_secs(60)).await;
    tally(&written, &got).assert_complete_and_ordered();

    // The consumer: continues the trace from the message's headers.
    let consumer_parent = propagator.extract(
        &got[0]
            .headers
            .clone()
            .into_iter()
            .collect::<HashMap<_, _>>(),
    );
    let consumer_span = tracer
        .span_builder("billing handle PlanPurchased")
        .with_kind(SpanKind::Consumer)
        .start_with_context(&tracer, &consumer_parent);
    drop(consumer_span);
    provider.force_flush().unwrap();
    let local = exporter.get_finished_spans().unwrap();
    let writer = local.iter().find(|s| s.name.starts_with("POST")).unwrap();
    let consumer = local
        .iter()
        .find(|s| s.name.starts_with("billing"))
        .unwrap();

    assert!(
        eventually(Duration::from_secs(20), || async {
            !receiver.spans().is_empty()
        })
        .await,
        "the relay exported no span"
    );
    let relay_spans = receiver.spans();
    let producer = relay_spans
        .iter()
        .find(|s| attribute(s, "messaging.message.id") == Some(&id.to_string()))
        .unwrap_or_else(|| panic!("no PRODUCER span for the event: {relay_spans:?}"));
    let trace_id = writer.span_context.trace_id().to_string();
    assert_eq!(
        producer["traceId"],
        trace_id.as_str(),
        "relay span in the writer's trace"
    );
    assert_eq!(
        producer["parentSpanId"],
        writer.span_context.span_id().to_string().as_str(),
        "relay span is the writer span's child"
    );
    assert_eq!(producer["kind"], 4, "SPAN_KIND_PRODUCER");
    let system = match broker {
        Broker::Kafka => "kafka",
        Broker::Rabbitmq => "rabbitmq",
    };
    assert_eq!(attribute(producer, "messaging.system"), Some(system));
    assert_eq!(
        attribute(producer, "messaging.operation.type"),
        Some("publish")
    );
    assert_eq!(
        consumer.span_context.trace_id().to_string(),
        trace_id,
        "consumer in the same trace"
    );
    assert_eq!(
        consumer.parent_span_id.to_string(),
        producer["spanId"].as_str().unwrap(),
        "consumer span is the relay span's child"
    );
    // The transport, the exporter's headers and the resource, on every export.
    let exports = receiver.exports();
    for export in &exports {
        assert!(
            export.content_type.starts_with(otlp.content_type),
            "content-type `{}`, expected `{}`",
            export.content_type,
            otlp.content_type
        );
        assert_eq!(export.path, otlp.path);
        for (name, value) in otlp.headers {
            assert_eq!(
                export.headers.get(*name).map(String::as_str),
                Some(*value),
                "header `{name}` from OTEL_EXPORTER_OTLP_[TRACES_]HEADERS: {:?}",
                export.headers
            );
        }
        for rs in export.request["resourceSpans"].as_array().unwrap() {
            for (key, value) in otlp.resource {
                assert_eq!(
                    attribute(&rs["resource"], key),
                    Some(*value),
                    "resource attribute `{key}`: {}",
                    rs["resource"]
                );
            }
        }
    }
    eprintln!(
        "{system}: trace {trace_id}: writer span {} -> relay `{}` {} -> consumer span {}; \
         {} exports as {} to {}, headers {:?}",
        writer.span_context.span_id(),
        producer["name"].as_str().unwrap_or(""),
        producer["spanId"].as_str().unwrap_or(""),
        consumer.span_context.span_id(),
        exports.len(),
        exports[0].content_type,
        exports[0].path,
        otlp.headers,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_from_writer_through_relay_to_kafka_consumer() {
    one_trace_from_writer_to_consumer(Broker::Kafka, HTTP_JSON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_from_writer_through_relay_to_rabbitmq_consumer() {
    one_trace_from_writer_to_consumer(Broker::Rabbitmq, HTTP_JSON).await;
}

/// No protocol set: the specification's default, OTLP/HTTP with protobuf bodies, decoded here
/// with the official message definitions; the headers and the resource from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_as_otlp_http_protobuf_by_default_with_the_configured_headers_and_resource() {
    let otlp = Otlp {
        env: &[
            ("OTEL_SERVICE_NAME", "billing-relay"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=ignored,deployment.environment.name=prod%2Feu, service.namespace = billing",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=k%3D1,x-tenant=acme",
            ),
        ],
        grpc: false,
        content_type: "application/x-protobuf",
        path: "/v1/traces",
        headers: &[("x-api-key", "k=1"), ("x-tenant", "acme")],
        resource: &[
            ("service.name", "billing-relay"),
            ("deployment.environment.name", "prod/eu"),
            ("service.namespace", "billing"),
        ],
    };
    one_trace_from_writer_to_consumer(Broker::Rabbitmq, otlp).await;
}

/// `grpc` from the traces variable, which wins over the general one; the endpoint is used as
/// it is (no `/v1/traces`), the traces headers become gRPC metadata.
#[cfg(feature = "otlp-grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_otlp_grpc_when_the_traces_protocol_says_so() {
    let otlp = Otlp {
        env: &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=ignored"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=acme"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=billing-relay"),
        ],
        grpc: true,
        content_type: "application/grpc",
        path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        headers: &[("x-tenant", "acme")],
        resource: &[("service.name", "billing-relay")],
    };
    one_trace_from_writer_to_consumer(Broker::Rabbitmq, otlp).await;
}

/// Sum of a metric's samples whose labels contain `filter`.
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_events_sent_and_readyz_follows_the_broker() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let mut s = Scenario::of(Mode::Poll, Broker::Kafka, "").await;
    s.kafka_brokers = cluster.bootstrap_servers();
    cluster.create_topic(&s.topic("wallet"), 3, 1).unwrap();
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let base = relay.http_base().await;
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(&format!("{base}/readyz")).await.0 == 200
        })
        .await,
        "never ready"
    );
    // A healthy standby is ready too: wait until this instance has taken the leader lock.
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(&format!("{base}/readyz"))
                .await
                .1
                .contains("\"active\":true")
        })
        .await,
        "never active: {}",
        http_get(&format!("{base}/readyz")).await.1
    );

    let written = write_events(&s.db.url, "wallet", 20, 25, 4).await;
    let got = reader.read_until(&written, Duration::from_secs(60)).await;
    let t = tally(&written, &got);
    t.assert_complete_and_ordered();
    let topic = s.topic("wallet");
    let published = format!("destination=\"{topic}\"");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (_, text) = http_get(&format!("{base}/metrics")).await;
            metric_sum(&text, "outbox_relay_events_published_total", &published)
                == written.len() as f64
                && metric_sum(&text, "outbox_relay_pending_events", "") == 0.0
        })
        .await,
        "metrics never matched: {}",
        http_get(&format!("{base}/metrics")).await.1
    );
    let (_, text) = http_get(&format!("{base}/metrics")).await;
    assert_eq!(metric_sum(&text, "outbox_relay_active", ""), 1.0);
    assert!(metric_sum(&text, "outbox_relay_batch_size_count", "") >= 1.0);
    assert_eq!(
        metric_sum(&text, "outbox_relay_commit_to_ack_seconds_count", ""),
        written.len() as f64
    );
    eprintln!(
        "metrics excerpt:\n{}",
        text.lines()
            .filter(|l| !l.starts_with('#')
                && (l.contains("published_total")
                    || l.contains("_active")
                    || l.contains("pending")
                    || l.contains("commit_to_ack_seconds_count")
                    || l.contains("_up ")))
            .collect::<Vec<_>>()
            .join("\n")
    );

    cluster.broker_down(1).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            http_get(&format!("{base}/readyz")).await.0 == 503
        })
        .await,
        "still ready with the broker down"
    );
    let (_, body) = http_get(&format!("{base}/readyz")).await;
    assert!(
        body.contains("\"broker\":false") && body.contains("\"database\":true"),
        "{body}"
    );
    cluster.broker_up(1).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            http_get(&format!("{base}/readyz")).await.0 == 200
        })
        .await,
        "not ready again after the broker came back"
    );
}

/// `/readyz` checks RabbitMQ with a round trip on one connection of its own, every 2 s, not
/// with a new connection each time; it follows a cut network and recovers on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_checks_rabbitmq_on_one_kept_connection_and_follows_the_broker() {
    let proxy = Proxy::start(5672).await;
    let mut s = Scenario::new(Broker::Rabbitmq).await;
    s.extra_env.push((
        "RELAY_AMQP_URL".into(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
    ));
    s.migrate();
    let relay = s.start_relay();
    let base = relay.http_base().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            let (status, body) = http_get(&format!("{base}/readyz")).await;
            status == 200 && body.contains("\"active\":true")
        })
        .await,
        "never ready and active: {}",
        http_get(&format!("{base}/readyz")).await.1
    );
    // The sink's connection and the probe's are open; idle checks must open no more.
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        proxy.accepted(),
        before,
        "connections were opened while idle: the probe must reuse its connection"
    );
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);

    proxy.down();
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(&format!("{base}/readyz")).await.0 == 503
        })
        .await,
        "still ready with the network to RabbitMQ cut"
    );
    let (_, body) = http_get(&format!("{base}/readyz")).await;
    assert!(
        body.contains("\"broker\":false") && body.contains("\"database\":true"),
        "{body}"
    );
    proxy.up();
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(&format!("{base}/readyz")).await.0 == 200
        })
        .await,
        "not ready again after the network came back"
    );
}
