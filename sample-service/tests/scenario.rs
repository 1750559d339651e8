//! The demo's story end to end, with the real processes: `outbox-relay` (poll or wal) next to
//! `wallet`, and `billing`, over Kafka and over RabbitMQ. Every test has its own databases,
//! topic / exchange / queue and consumer group.
//!
//! Alice adds a card and buys a plan; Bob buys a plan before adding his card; Alice's
//! `PlanPurchased` is then delivered a second time. Each plan must be charged exactly once, to
//! the right card, and each charge must carry the trace id of the request that bought the plan.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sample_service::redeliver::{Target, redeliver};
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use crate::support::{
    AMQP_URL, KAFKA_BROKERS, Proc, TestDb, free_addr, http, psql, relay_bin, unique, wait_for,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Kafka,
    Rabbitmq,
}

#[tokio::test]
async fn scenario_over_kafka_charges_each_plan_exactly_once_and_continues_the_trace() {
    scenario(Broker::Kafka, "poll").await;
}

#[tokio::test]
async fn scenario_over_rabbitmq_charges_each_plan_exactly_once_and_continues_the_trace() {
    scenario(Broker::Rabbitmq, "poll").await;
}

#[tokio::test]
async fn scenario_over_kafka_with_the_wal_source_charges_each_plan_exactly_once() {
    scenario(Broker::Kafka, "wal").await;
}

#[tokio::test]
async fn scenario_over_rabbitmq_with_the_wal_source_charges_each_plan_exactly_once() {
    scenario(Broker::Rabbitmq, "wal").await;
}

/// Drops the test's replication slot (a slot keeps WAL forever and blocks DROP DATABASE).
struct Slot(String);

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = psql()
            .args(["-d", "postgres", "-qAtc"])
            .arg(format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{}'",
                self.0
            ))
            .output();
    }
}

// Fields drop in order: the processes stop first, then the slot goes, then the databases.
struct Stack {
    procs: Vec<Proc>,
    _slot: Slot,
    wallet_db: TestDb,
    billing_db: TestDb,
    wallet_addr: String,
    target: Target,
}

impl Stack {
    async fn start(broker: Broker, source: &str) -> Self {
        let wallet_db = TestDb::create("sample_wallet").await;
        let billing_db = TestDb::create("sample_billing").await;
        let name = unique("sample");
        let relay = relay_bin();
        let slot = Slot(name.clone());
        let migrate = std::process::Command::new(&relay)
            .arg("migrate")
            .env("DATABASE_URL", &wallet_db.url)
            .env("RELAY_SOURCE", source)
            .env("RELAY_WAL__SLOT", &slot.0)
            .output()
            .expect("run outbox-relay migrate");
        assert!(
            migrate.status.success(),
            "outbox-relay migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        );

        let (sink, target) = match broker {
            Broker::Kafka => (
                "kafka",
                Target::Kafka {
                    brokers: KAFKA_BROKERS.into(),
                    topic: format!("{name}.{{aggregate_type}}"),
                },
            ),
            Broker::Rabbitmq => (
                "rabbitmq",
                Target::Rabbitmq {
                    url: AMQP_URL.into(),
                    exchange: name.clone(),
                },
            ),
        };
        let relay_env = vec![
            ("DATABASE_URL", wallet_db.url.clone()),
            ("RELAY_SOURCE", source.into()),
            ("RELAY_WAL__SLOT", slot.0.clone()),
            ("RELAY_SINK", sink.into()),
            ("RELAY_KAFKA_BROKERS", KAFKA_BROKERS.into()),
            ("RELAY_KAFKA__CREATE_TOPICS", "true".into()),
            ("RELAY_KAFKA__TOPIC", format!("{name}.{{aggregate_type}}")),
            ("RELAY_AMQP_URL", AMQP_URL.into()),
            ("RELAY_RABBITMQ__EXCHANGE", name.clone()),
            ("RELAY_HTTP_ADDR", free_addr()),
        ];
        let wallet_addr = free_addr();
        let wallet_env = vec![
            ("DATABASE_URL", wallet_db.url.clone()),
            ("WALLET_ADDR", wallet_addr.clone()),
        ];
        let billing_env = vec![
            ("BILLING_DATABASE_URL", billing_db.url.clone()),
            ("BILLING_BROKER", sink.into()),
            ("BILLING_KAFKA_BROKERS", KAFKA_BROKERS.into()),
            ("BILLING_KAFKA_TOPIC", format!("{name}.wallet")),
            ("BILLING_KAFKA_GROUP", name.clone()),
            ("BILLING_AMQP_URL", AMQP_URL.into()),
            ("BILLING_AMQP_EXCHANGE", name.clone()),
            ("BILLING_AMQP_QUEUE", name.clone()),
            ("BILLING_RETRY_BACKOFF", "200ms".into()),
            ("BILLING_RETRY_INTERVAL", "100ms".into()),
        ];
        let procs = vec![
            Proc::spawn(
                "billing",
                Path::new(env!("CARGO_BIN_EXE_billing")),
                &[],
                &billing_env,
            ),
            Proc::spawn("relay", &relay, &["run"], &relay_env),
            Proc::spawn(
                "wallet",
                Path::new(env!("CARGO_BIN_EXE_wallet")),
                &[],
                &wallet_env,
            ),
        ];
        let stack = Self {
            _slot: slot,
            wallet_db,
            billing_db,
            wallet_addr,
            target,
            procs,
        };
        let addr = stack.wallet_addr.clone();
        wait_for("the wallet API", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move {
                http(&addr, "GET", "/healthz", None, &[])
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            }
        })
        .await;
        stack
    }

    async fn post(
        &mut self,
        path: &str,
        body: serde_json::Value,
        traceparent: Option<&str>,
    ) -> serde_json::Value {
        for p in &mut self.procs {
            p.assert_running();
        }
        let headers: Vec<(&str, &str)> = traceparent
            .map(|tp| ("traceparent", tp))
            .into_iter()
            .collect();
        let response = http(&self.wallet_addr, "POST", path, Some(body), &headers)
            .await
            .unwrap();
        assert_eq!(response.status, 201, "POST {path}: {:?}", response.body);
        response.body
    }

    async fn billing_query(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&mut self.billing_db.connect().await)
            .await
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.name, p.output()))
            .collect()
    }

    async fn wait_billing(&self, what: &str, sql: &str, want: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.billing_query(sql).await != want {
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn scenario(broker: Broker, source: &str) {
    let mut stack = Stack::start(broker, source).await;
    let mut trace_of_purchase = BTreeMap::new();

    // Alice: wallet, card, plan — the plan request continues the caller's trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let alice = stack
        .post("/wallets", json!({"owner": "alice"}), None)
        .await;
    let alice = alice["wallet_id"].as_str().unwrap().to_string();
    stack
        .post(
            &format!("/wallets/{alice}/cards"),
            json!({"brand": "visa", "number": "4242 4242 4242 4242"}),
            None,
        )
        .await;
    let bought = stack
        .post(
            &format!("/wallets/{alice}/purchases"),
            json!({"plan": "premium"}),
            Some(&format!("00-{caller_trace}-00f067aa0ba902b7-01")),
        )
        .await;
    assert_eq!(bought["trace_id"], caller_trace);
    trace_of_purchase.insert(
        bought["purchase_id"].as_str().unwrap().to_string(),
        caller_trace.to_string(),
    );

    // Bob buys a plan before his card is on file: billing must wait for the card.
    let bob = stack.post("/wallets", json!({"owner": "bob"}), None).await;
    let bob = bob["wallet_id"].as_str().unwrap().to_string();
    let bought = stack
        .post(
            &format!("/wallets/{bob}/purchases"),
            json!({"plan": "standard"}),
            None,
        )
        .await;
    trace_of_purchase.insert(
        bought["purchase_id"].as_str().unwrap().to_string(),
        bought["trace_id"].as_str().unwrap().to_string(),
    );
    stack
        .wait_billing(
            "Bob's plan to wait for his card",
            "SELECT count(*) FROM waiting_purchases",
            1,
        )
        .await;
    stack
        .wait_billing("Alice's charge", "SELECT count(*) FROM charges", 1)
        .await;
    stack
        .post(
            &format!("/wallets/{bob}/cards"),
            json!({"brand": "mastercard", "number": "5555555555554444"}),
            None,
        )
        .await;
    stack
        .wait_billing("Bob's charge", "SELECT count(*) FROM charges", 2)
        .await;

    // A duplicate delivery of Alice's PlanPurchased, then one more purchase behind it (same
    // wallet: same partition / queue): once that one is charged, the duplicate was seen.
    let event_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM outbox WHERE event_type = 'PlanPurchased' AND aggregate_id = $1",
    )
    .bind(&alice)
    .fetch_one(&mut stack.wallet_db.connect().await)
    .await
    .unwrap();
    redeliver(&stack.wallet_db.url, "outbox", event_id, &stack.target)
        .await
        .expect("publish the duplicate");
    let bought = stack
        .post(
            &format!("/wallets/{alice}/purchases"),
            json!({"plan": "basic"}),
            None,
        )
        .await;
    trace_of_purchase.insert(
        bought["purchase_id"].as_str().unwrap().to_string(),
        bought["trace_id"].as_str().unwrap().to_string(),
    );
    stack
        .wait_billing("Alice's second charge", "SELECT count(*) FROM charges", 3)
        .await;
    let billing_log = stack.procs[0].output();
    assert!(
        billing_log.contains("duplicate delivery skipped")
            && billing_log.contains(&event_id.to_string()),
        "billing did not report the duplicate:\n{}",
        stack.logs()
    );

    // Each purchase charged exactly once, to the right card, in the purchase's trace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = sqlx::query("SELECT purchase_id, wallet_id, last4, trace_id FROM charges")
        .fetch_all(&mut stack.billing_db.connect().await)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "{}", stack.logs());
    for row in rows {
        let purchase: String = row.get("purchase_id");
        let wallet: String = row.get("wallet_id");
        let last4: String = row.get("last4");
        assert_eq!(last4, if wallet == alice { "4242" } else { "4444" });
        assert_eq!(
            row.get::<Option<String>, _>("trace_id").as_deref(),
            Some(trace_of_purchase[&purchase].as_str()),
            "charge of {purchase} is not in its purchase's trace"
        );
    }
    assert_eq!(
        stack
            .billing_query("SELECT count(*) FROM waiting_purchases")
            .await,
        0
    );
    assert_eq!(
        stack
            .billing_query("SELECT count(*) FROM dead_letters")
            .await,
        0
    );

    // Stop billing first: it would declare its queue again when it is deleted under it.
    stack.procs.clear();
    if let Target::Rabbitmq { exchange, .. } = &stack.target {
        delete_amqp_queue_and_exchange(exchange).await;
    }
}

/// The test's queue and exchange share one unique name.
async fn delete_amqp_queue_and_exchange(name: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(conn) = lapin::Connection::connect(AMQP_URL, Default::default()).await else {
        return;
    };
    if let Ok(channel) = conn.create_channel().await {
        let _ = channel
            .queue_delete(name, QueueDeleteOptions::default())
            .await;
        let _ = channel
            .exchange_delete(name, ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "test done").await;
}
