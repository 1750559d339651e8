//! The writer and the idempotent consumer against a real Postgres (`scripts/services`).

use std::process::{Command, Stdio};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use outbox_client::{NewEvent, Outbox, ProcessedEvents, trace};
use sqlx::{Connection, PgConnection, Row};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

/// The tests' Postgres port: `OUTBOX_TEST_PG_PORT`, else 5432 (as in the relay's e2e suite).
fn pg_port() -> String {
    std::env::var("OUTBOX_TEST_PG_PORT").unwrap_or_else(|_| "5432".into())
}

fn pg_url(database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{database}", pg_port())
}

/// A database of its own, dropped when the test ends.
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn create() -> Self {
        let name = format!("client_test_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = PgConnection::connect(&pg_url("postgres")).await.expect(
            "Postgres on 127.0.0.1 (OUTBOX_TEST_PG_PORT, default 5432); run scripts/services",
        );
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let url = pg_url(&name);
        let mut conn = PgConnection::connect(&url).await.unwrap();
        // The outbox table `outbox-relay migrate` creates (its default columns), twice.
        for table in ["outbox", "custom.events"] {
            sqlx::raw_sql(&format!(
                "CREATE SCHEMA IF NOT EXISTS custom;
                 CREATE TABLE {table} (
                    id uuid PRIMARY KEY, aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                    event_type text NOT NULL, payload jsonb NOT NULL,
                    headers jsonb NOT NULL DEFAULT '{{}}', traceparent text, tracestate text,
                    created_at timestamptz NOT NULL DEFAULT now())"
            ))
            .execute(&mut conn)
            .await
            .unwrap();
        }
        Self { name, url }
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &pg_port(), "-U", "postgres"])
            .args(["-d", "postgres", "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn event(wallet: &str) -> NewEvent {
    NewEvent::new(
        "wallet",
        wallet,
        "CardAdded",
        serde_json::json!({"last4": "4242"}),
    )
    .with_header("tenant", "acme")
}

#[tokio::test]
async fn enqueue_stores_the_current_spans_trace_context_with_the_event() {
    let db = TestDb::create().await;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let span = tracing::info_span!("POST /wallets/w-1/cards");
    let expected_trace = span.context().span().span_context().trace_id().to_string();
    let mut conn = db.connect().await;
    let id = async {
        let mut tx = conn.begin().await.unwrap();
        let id = outbox_client::enqueue(&mut tx, event("w-1")).await.unwrap();
        tx.commit().await.unwrap();
        id
    }
    .instrument(span)
    .await;

    let row = sqlx::query(
        "SELECT aggregate_type, aggregate_id, event_type, payload, headers, traceparent \
         FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(row.get::<String, _>("aggregate_type"), "wallet");
    assert_eq!(row.get::<String, _>("aggregate_id"), "w-1");
    assert_eq!(row.get::<String, _>("event_type"), "CardAdded");
    assert_eq!(row.get::<serde_json::Value, _>("payload")["last4"], "4242");
    assert_eq!(row.get::<serde_json::Value, _>("headers")["tenant"], "acme");
    let traceparent: String = row.get("traceparent");
    let stored = trace::TraceHeaders {
        traceparent: Some(traceparent),
        tracestate: None,
    };
    assert_eq!(stored.trace_id().unwrap().to_string(), expected_trace);
}

#[tokio::test]
async fn an_event_outside_any_trace_has_no_trace_context_and_a_rolled_back_one_does_not_exist() {
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    let outbox = Outbox::new("custom.events").unwrap();

    let mut tx = conn.begin().await.unwrap();
    let kept = outbox.enqueue(&mut tx, event("w-2")).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let dropped = outbox.enqueue(&mut tx, event("w-2")).await.unwrap();
    tx.rollback().await.unwrap();

    let rows = sqlx::query("SELECT id, traceparent FROM custom.events")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<Uuid, _>("id"), kept);
    assert_ne!(kept, dropped);
    assert_eq!(rows[0].get::<Option<String>, _>("traceparent"), None);
}

#[tokio::test]
async fn claim_skips_a_redelivered_event_but_not_one_whose_transaction_rolled_back() {
    let db = TestDb::create().await;
    let mut conn = db.connect().await;
    let processed = ProcessedEvents::default();
    processed.ensure_table(&mut conn).await.unwrap();
    processed.ensure_table(&mut conn).await.unwrap(); // idempotent
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());

    // Processing that rolls back leaves no trace: the event is processed again later.
    let mut tx = conn.begin().await.unwrap();
    assert!(
        outbox_client::claim(&mut tx, "billing", first)
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();

    let mut tx = conn.begin().await.unwrap();
    assert!(
        outbox_client::claim(&mut tx, "billing", first)
            .await
            .unwrap()
    );
    assert!(
        outbox_client::claim(&mut tx, "billing", second)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

    // The redelivery is recognised; another consumer still gets the event.
    let mut tx = conn.begin().await.unwrap();
    assert!(
        !outbox_client::claim(&mut tx, "billing", first)
            .await
            .unwrap()
    );
    assert!(outbox_client::claim(&mut tx, "audit", first).await.unwrap());
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn concurrent_claims_of_one_event_let_exactly_one_consumer_through() {
    let db = TestDb::create().await;
    ProcessedEvents::default()
        .ensure_table(&mut db.connect().await)
        .await
        .unwrap();
    let id = Uuid::new_v4();
    let mut tasks = vec![];
    for _ in 0..4 {
        let mut conn = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let mut tx = conn.begin().await.unwrap();
            let won = outbox_client::claim(&mut tx, "billing", id).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            tx.commit().await.unwrap();
            won
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
}

#[test]
fn invalid_table_names_are_refused_before_any_sql_runs() {
    assert!(Outbox::new("outbox; DROP TABLE users").is_err());
    assert!(ProcessedEvents::new("a.b.c").is_err());
}
