//! Billing's exactly-once rules against its real database (no broker): redeliveries, plans
//! that arrive before their card, retries with backoff, dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_client::IncomingEvent;
use sample_service::billing::{Ledger, Outcome, RetryPolicy};
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use crate::support::TestDb;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn event(event_type: &str, wallet: &str, payload: serde_json::Value) -> IncomingEvent {
    let headers: BTreeMap<String, String> = [
        ("id", Uuid::now_v7().to_string()),
        ("event_type", event_type.to_string()),
        ("aggregate_type", "wallet".to_string()),
        ("aggregate_id", wallet.to_string()),
        ("traceparent", TRACEPARENT.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    IncomingEvent::from_parts(headers, payload.to_string().as_bytes()).unwrap()
}

fn card_added(wallet: &str, last4: &str, added_at: &str) -> IncomingEvent {
    event(
        "CardAdded",
        wallet,
        json!({"wallet_id": wallet, "card_id": Uuid::new_v4(), "brand": "visa", "last4": last4, "added_at": added_at}),
    )
}

fn plan_purchased(wallet: &str, purchase: &str) -> IncomingEvent {
    event(
        "PlanPurchased",
        wallet,
        json!({"wallet_id": wallet, "purchase_id": purchase, "plan": "premium", "amount_cents": 1999, "currency": "EUR"}),
    )
}

async fn ledger(db: &TestDb, retry: RetryPolicy) -> Ledger {
    Ledger::open(db.pool().await, retry).await.unwrap()
}

fn fast_retries(limit: u32) -> RetryPolicy {
    RetryPolicy {
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        limit,
    }
}

/// `(purchase_id, last4, trace_id)` of every charge.
async fn charges(db: &TestDb) -> Vec<(String, String, Option<String>)> {
    sqlx::query("SELECT purchase_id, last4, trace_id FROM charges ORDER BY purchase_id")
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn count(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn billing_charges_a_plan_once_when_its_event_is_delivered_again_and_again() {
    let db = TestDb::create("billing_test").await;
    let ledger = ledger(&db, RetryPolicy::default()).await;
    let card = card_added("w1", "4242", "2026-01-01T00:00:00Z");
    assert_eq!(
        ledger.handle(&card).await.unwrap(),
        Outcome::CardStored { charged: 0 }
    );
    let plan = plan_purchased("w1", "p1");
    assert!(matches!(
        ledger.handle(&plan).await.unwrap(),
        Outcome::Charged { .. }
    ));
    // Sequential and concurrent redeliveries.
    assert_eq!(ledger.handle(&plan).await.unwrap(), Outcome::Duplicate);
    assert_eq!(ledger.handle(&card).await.unwrap(), Outcome::Duplicate);
    let mut tasks = vec![];
    for _ in 0..4 {
        let (ledger, plan) = (ledger.clone(), plan.clone());
        tasks.push(tokio::spawn(
            async move { ledger.handle(&plan).await.unwrap() },
        ));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Outcome::Duplicate);
    }
    // The same purchase under another event id (e.g. written twice) is not charged again either.
    let mut copy = plan_purchased("w1", "p1");
    copy.id = Uuid::now_v7();
    ledger.handle(&copy).await.unwrap();

    assert_eq!(
        charges(&db).await,
        vec![(
            "p1".to_string(),
            "4242".to_string(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_string())
        )]
    );
}

#[tokio::test]
async fn billing_charges_a_plan_that_arrives_before_its_card_once_the_card_arrives() {
    let db = TestDb::create("billing_test").await;
    let ledger = ledger(&db, RetryPolicy::default()).await;
    let plan = plan_purchased("w2", "p2");
    assert_eq!(
        ledger.handle(&plan).await.unwrap(),
        Outcome::WaitingForCard {
            purchase_id: "p2".into()
        }
    );
    assert_eq!(ledger.handle(&plan).await.unwrap(), Outcome::Duplicate);
    assert!(charges(&db).await.is_empty());
    assert_eq!(count(&db, "waiting_purchases").await, 1);

    let card = card_added("w2", "1881", "2026-01-01T00:00:00Z");
    assert_eq!(
        ledger.handle(&card).await.unwrap(),
        Outcome::CardStored { charged: 1 }
    );
    assert_eq!(ledger.handle(&plan).await.unwrap(), Outcome::Duplicate);
    assert_eq!(ledger.retry_due().await.unwrap(), (0, 0));
    let charged = charges(&db).await;
    assert_eq!(charged.len(), 1);
    assert_eq!(charged[0].1, "1881");
    assert_eq!(count(&db, "waiting_purchases").await, 0);
}

#[tokio::test]
async fn billing_retries_a_waiting_plan_with_backoff_and_charges_it_once_a_card_is_on_file() {
    let db = TestDb::create("billing_test").await;
    let ledger = ledger(&db, fast_retries(50)).await;
    ledger.handle(&plan_purchased("w3", "p3")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ledger.retry_due().await.unwrap(), (0, 0));
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM waiting_purchases")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(attempts, 1);

    // A card that became visible without waking the purchase (a CardAdded handled concurrently
    // by another billing instance): the next retry charges it.
    sqlx::query(
        "INSERT INTO cards (wallet_id, card_id, brand, last4, added_at, event_id) \
         VALUES ('w3', 'c3', 'visa', '0005', '2026-01-01', gen_random_uuid())",
    )
    .execute(&mut db.connect().await)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ledger.retry_due().await.unwrap(), (1, 0));
    assert_eq!(ledger.retry_due().await.unwrap(), (0, 0));
    assert_eq!(charges(&db).await.len(), 1);
}

#[tokio::test]
async fn billing_dead_letters_a_plan_whose_card_never_arrives_and_never_charges_it() {
    let db = TestDb::create("billing_test").await;
    let ledger = ledger(&db, fast_retries(3)).await;
    let plan = plan_purchased("w4", "p4");
    ledger.handle(&plan).await.unwrap();
    let mut dead = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        dead += ledger.retry_due().await.unwrap().1;
        if dead > 0 {
            break;
        }
    }
    assert_eq!(dead, 1);
    let row = sqlx::query("SELECT event_id, attempts, error FROM dead_letters")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(row.get::<Uuid, _>("event_id"), plan.id);
    assert_eq!(row.get::<i32, _>("attempts"), 3);
    assert!(row.get::<String, _>("error").contains("no card on file"));
    assert_eq!(count(&db, "waiting_purchases").await, 0);

    // A late card does not charge a dead-lettered purchase behind the operator's back, and a
    // redelivery of the plan is recognised.
    ledger
        .handle(&card_added("w4", "4444", "2026-01-01T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(ledger.handle(&plan).await.unwrap(), Outcome::Duplicate);
    assert!(charges(&db).await.is_empty());
}

#[tokio::test]
async fn billing_keeps_the_newest_card_when_card_events_arrive_out_of_order() {
    let db = TestDb::create("billing_test").await;
    let ledger = ledger(&db, RetryPolicy::default()).await;
    ledger
        .handle(&card_added("w5", "2222", "2026-01-02T00:00:00.000000Z"))
        .await
        .unwrap();
    ledger
        .handle(&card_added("w5", "1111", "2026-01-01T00:00:00.000000Z"))
        .await
        .unwrap();
    ledger.handle(&plan_purchased("w5", "p5")).await.unwrap();
    assert_eq!(charges(&db).await[0].1, "2222");
}

#[tokio::test]
async fn billing_dead_letters_a_malformed_event_instead_of_retrying_it_forever() {
    let db = TestDb::create("billing_test").await;
    let ledger = ledger(&db, RetryPolicy::default()).await;
    let bad = event("PlanPurchased", "w6", json!({"plan": 42}));
    let err = ledger.handle(&bad).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    ledger.dead_letter(&bad, &err.to_string()).await.unwrap();
    assert_eq!(count(&db, "dead_letters").await, 1);
    assert_eq!(ledger.handle(&bad).await.unwrap(), Outcome::Duplicate);
}
