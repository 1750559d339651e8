//! Billing's database and the handling of one event, exactly once.
//!
//! Each event is handled in ONE transaction of billing's own database that first claims the
//! event id (`outbox-client`'s idempotent consumer), then applies its effects. A redelivered
//! event finds its id claimed and changes nothing; a crash before commit leaves no trace and
//! the broker delivers the event again. `charges.purchase_id` is the primary key as well, so no
//! path can charge a purchase twice.
//!
//! Out of order: a `PlanPurchased` whose wallet has no card yet is parked in
//! `waiting_purchases` (in the same transaction as its claim, so it is never lost) and the
//! message is acknowledged — holding it would block the wallet's `CardAdded` behind it on the
//! same partition or queue. The `CardAdded` handler charges the wallet's parked purchases in
//! its own transaction; [`Ledger::retry_due`] retries parked purchases with exponential
//! backoff (covering a card committed concurrently) and moves those still without a card after
//! [`RetryPolicy::limit`] attempts (`BILLING_RETRY_LIMIT`) to `dead_letters`.

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TraceId};
use outbox_client::trace::TraceHeaders;
use outbox_client::{IncomingEvent, ProcessedEvents};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool, Row};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// The consumer name under which billing claims event ids.
pub const CONSUMER: &str = "billing";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS cards (
    wallet_id  text        PRIMARY KEY,
    card_id    text        NOT NULL,
    brand      text        NOT NULL,
    last4      text        NOT NULL,
    added_at   text        NOT NULL,  -- the wallet's timestamp: the newest card wins
    event_id   uuid        NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    purchase_id  text        PRIMARY KEY,
    wallet_id    text        NOT NULL,
    plan         text        NOT NULL,
    amount_cents bigint      NOT NULL,
    currency     text        NOT NULL,
    card_id      text        NOT NULL,
    last4        text        NOT NULL,
    event_id     uuid        NOT NULL,
    trace_id     text,
    charged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS waiting_purchases (
    event_id        uuid        PRIMARY KEY,
    wallet_id       text        NOT NULL,
    payload         jsonb       NOT NULL,
    traceparent     text,
    tracestate      text,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS waiting_purchases_wallet_idx ON waiting_purchases (wallet_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id    uuid        PRIMARY KEY,
    event_type  text        NOT NULL,
    wallet_id   text        NOT NULL,
    payload     jsonb       NOT NULL,
    traceparent text,
    error       text        NOT NULL,
    attempts    integer     NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now()
);
"#;

/// How billing retries a purchase whose card is not known yet.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay before the first retry; doubled on each attempt, at most `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries before the purchase is dead-lettered.
    pub limit: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            limit: 8,
        }
    }
}

impl RetryPolicy {
    /// The delay after `attempts` failed attempts.
    pub fn delay(&self, attempts: u32) -> Duration {
        self.backoff
            .saturating_mul(2u32.saturating_pow(attempts.min(20)))
            .min(self.max_backoff)
    }
}

/// What handling one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Already processed: a redelivery, skipped.
    Duplicate,
    /// The card is on file; `charged` parked purchases of the wallet were charged with it.
    CardStored { charged: usize },
    /// The purchase was charged to the card on file.
    Charged { purchase_id: String },
    /// No card yet: parked, retried with backoff.
    WaitingForCard { purchase_id: String },
    /// An event billing does not act on (e.g. `WalletCreated`).
    Ignored,
}

/// Why an event could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The event can never be handled (malformed payload): dead-letter it.
    #[error("malformed {event_type} event: {reason}")]
    Malformed { event_type: String, reason: String },
    /// The database failed: retry the same event later; nothing was committed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Client(#[from] outbox_client::Error),
}

impl HandleError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, HandleError::Malformed { .. })
    }
}

#[derive(Debug, Deserialize)]
struct CardAdded {
    card_id: String,
    brand: String,
    last4: String,
    added_at: String,
}

#[derive(Debug, Deserialize)]
struct PlanPurchased {
    purchase_id: String,
    plan: String,
    amount_cents: i64,
    currency: String,
}

fn parse<T: serde::de::DeserializeOwned>(
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<T, HandleError> {
    T::deserialize(payload).map_err(|e| HandleError::Malformed {
        event_type: event_type.to_string(),
        reason: e.to_string(),
    })
}

struct Card {
    card_id: String,
    last4: String,
}

/// Billing's database.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: PgPool,
    processed: ProcessedEvents,
    retry: RetryPolicy,
}

impl Ledger {
    /// Creates billing's tables when missing.
    pub async fn open(pool: PgPool, retry: RetryPolicy) -> Result<Self, HandleError> {
        let processed = ProcessedEvents::default();
        let mut conn = pool.acquire().await?;
        processed.ensure_table(&mut conn).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *conn).await?;
        Ok(Self {
            pool,
            processed,
            retry,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Handles one event in one transaction (see the module docs).
    pub async fn handle(&self, event: &IncomingEvent) -> Result<Outcome, HandleError> {
        let mut tx = self.pool.begin().await?;
        if !self.processed.claim(&mut tx, CONSUMER, event.id).await? {
            tx.commit().await?;
            return Ok(Outcome::Duplicate);
        }
        let wallet = event.aggregate_id.as_str();
        let trace = event.trace_headers();
        let outcome = match event.event_type.as_str() {
            "CardAdded" => {
                let card: CardAdded = parse(&event.event_type, &event.payload)?;
                sqlx::query(
                    "INSERT INTO cards (wallet_id, card_id, brand, last4, added_at, event_id) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (wallet_id) DO UPDATE SET card_id = EXCLUDED.card_id, \
                       brand = EXCLUDED.brand, last4 = EXCLUDED.last4, \
                       added_at = EXCLUDED.added_at, event_id = EXCLUDED.event_id \
                     WHERE cards.added_at < EXCLUDED.added_at",
                )
                .bind(wallet)
                .bind(&card.card_id)
                .bind(&card.brand)
                .bind(&card.last4)
                .bind(&card.added_at)
                .bind(event.id)
                .execute(&mut *tx)
                .await?;
                let charged = self.charge_waiting(&mut tx, wallet).await?;
                Outcome::CardStored { charged }
            }
            "PlanPurchased" => {
                let purchase: PlanPurchased = parse(&event.event_type, &event.payload)?;
                match card_on_file(&mut tx, wallet).await? {
                    Some(card) => {
                        charge(&mut tx, wallet, &purchase, &card, event.id, &trace).await?;
                        Outcome::Charged {
                            purchase_id: purchase.purchase_id,
                        }
                    }
                    None => {
                        sqlx::query(
                            "INSERT INTO waiting_purchases \
                             (event_id, wallet_id, payload, traceparent, tracestate, next_attempt_at) \
                             VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 millisecond')",
                        )
                        .bind(event.id)
                        .bind(wallet)
                        .bind(&event.payload)
                        .bind(&trace.traceparent)
                        .bind(&trace.tracestate)
                        .bind(millis(self.retry.delay(0)))
                        .execute(&mut *tx)
                        .await?;
                        Outcome::WaitingForCard {
                            purchase_id: purchase.purchase_id,
                        }
                    }
                }
            }
            _ => Outcome::Ignored,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Records an event that can never be handled, claiming its id so a redelivery is skipped.
    pub async fn dead_letter(&self, event: &IncomingEvent, error: &str) -> Result<(), HandleError> {
        let mut tx = self.pool.begin().await?;
        self.processed.claim(&mut tx, CONSUMER, event.id).await?;
        insert_dead_letter(
            &mut tx,
            event.id,
            &event.event_type,
            &event.aggregate_id,
            &event.payload,
            event.trace_headers().traceparent.as_deref(),
            error,
            1,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Charges the wallet's parked purchases with the card now on file.
    async fn charge_waiting(
        &self,
        tx: &mut PgConnection,
        wallet: &str,
    ) -> Result<usize, HandleError> {
        let Some(card) = card_on_file(tx, wallet).await? else {
            return Ok(0);
        };
        let rows = sqlx::query(
            "SELECT event_id, payload, traceparent, tracestate FROM waiting_purchases \
             WHERE wallet_id = $1 ORDER BY first_seen_at FOR UPDATE",
        )
        .bind(wallet)
        .fetch_all(&mut *tx)
        .await?;
        let mut charged = 0;
        for row in rows {
            let event_id: Uuid = row.get("event_id");
            let purchase: PlanPurchased = parse("PlanPurchased", &row.get("payload"))?;
            let trace = TraceHeaders {
                traceparent: row.get("traceparent"),
                tracestate: row.get("tracestate"),
            };
            // The charge belongs to the purchase's trace (linked to the card's): a span of its
            // own, parented on the context stored with the waiting purchase.
            let span = tracing::info_span!(
                "charge waiting PlanPurchased",
                otel.kind = "internal",
                event.id = %event_id,
            );
            let _ = span.set_parent(context_of(&trace));
            span.add_link(
                tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .clone(),
            );
            if charge(tx, wallet, &purchase, &card, event_id, &trace)
                .instrument(span)
                .await?
            {
                charged += 1;
            }
            sqlx::query("DELETE FROM waiting_purchases WHERE event_id = $1")
                .bind(event_id)
                .execute(&mut *tx)
                .await?;
        }
        Ok(charged)
    }

    /// One round of retries of parked purchases that are due; returns how many were charged
    /// and how many dead-lettered. Safe to run from several billing instances at once.
    pub async fn retry_due(&self) -> Result<(usize, usize), HandleError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT event_id, wallet_id, payload, traceparent, tracestate, attempts \
             FROM waiting_purchases WHERE next_attempt_at <= now() \
             ORDER BY next_attempt_at LIMIT 100 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;
        let (mut charged, mut dead) = (0, 0);
        for row in rows {
            let event_id: Uuid = row.get("event_id");
            let wallet: String = row.get("wallet_id");
            let payload: serde_json::Value = row.get("payload");
            let attempts = u32::try_from(row.get::<i32, _>("attempts")).unwrap_or(0) + 1;
            let trace = TraceHeaders {
                traceparent: row.get("traceparent"),
                tracestate: row.get("tracestate"),
            };
            let span = tracing::info_span!(
                "retry PlanPurchased",
                otel.kind = "internal",
                event.id = %event_id,
                wallet = %wallet,
                attempt = attempts,
            );
            let _ = span.set_parent(context_of(&trace));
            async {
                if let Some(card) = card_on_file(&mut tx, &wallet).await? {
                    let purchase: PlanPurchased = parse("PlanPurchased", &payload)?;
                    charge(&mut tx, &wallet, &purchase, &card, event_id, &trace).await?;
                    sqlx::query("DELETE FROM waiting_purchases WHERE event_id = $1")
                        .bind(event_id)
                        .execute(&mut *tx)
                        .await?;
                    charged += 1;
                } else if attempts >= self.retry.limit {
                    let error = format!("no card on file for wallet {wallet} after {attempts} attempts");
                    insert_dead_letter(
                        &mut tx,
                        event_id,
                        "PlanPurchased",
                        &wallet,
                        &payload,
                        trace.traceparent.as_deref(),
                        &error,
                        attempts,
                    )
                    .await?;
                    sqlx::query("DELETE FROM waiting_purchases WHERE event_id = $1")
                        .bind(event_id)
                        .execute(&mut *tx)
                        .await?;
                    tracing::warn!("{error}: dead-lettered");
                    dead += 1;
                } else {
                    let delay = self.retry.delay(attempts);
                    sqlx::query(
                        "UPDATE waiting_purchases SET attempts = $2, \
                         next_attempt_at = now() + $3 * interval '1 millisecond' WHERE event_id = $1",
                    )
                    .bind(event_id)
                    .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
                    .bind(millis(delay))
                    .execute(&mut *tx)
                    .await?;
                    tracing::info!(retry_in = ?delay, "still no card on file");
                }
                Ok::<_, HandleError>(())
            }
            .instrument(span)
            .await?;
        }
        tx.commit().await?;
        Ok((charged, dead))
    }
}

/// The OpenTelemetry context of stored trace headers.
fn context_of(trace: &TraceHeaders) -> opentelemetry::Context {
    let pairs = [
        ("traceparent", trace.traceparent.as_deref()),
        ("tracestate", trace.tracestate.as_deref()),
    ];
    outbox_client::trace::extract(pairs.into_iter().filter_map(|(k, v)| Some((k, v?))))
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn card_on_file(tx: &mut PgConnection, wallet: &str) -> Result<Option<Card>, sqlx::Error> {
    Ok(
        sqlx::query("SELECT card_id, last4 FROM cards WHERE wallet_id = $1")
            .bind(wallet)
            .fetch_optional(tx)
            .await?
            .map(|r| Card {
                card_id: r.get("card_id"),
                last4: r.get("last4"),
            }),
    )
}

/// Charges a purchase to the card; `false` when it was already charged.
async fn charge(
    tx: &mut PgConnection,
    wallet: &str,
    purchase: &PlanPurchased,
    card: &Card,
    event_id: Uuid,
    trace: &TraceHeaders,
) -> Result<bool, sqlx::Error> {
    // The trace of the span doing the charge (the consumer span continuing the purchase's
    // trace); the message's own trace id when spans are not recorded (no subscriber).
    let trace_id = outbox_client::trace::current_trace_id()
        .or_else(|| trace.trace_id().map(|t: TraceId| t.to_string()));
    let inserted = sqlx::query(
        "INSERT INTO charges (purchase_id, wallet_id, plan, amount_cents, currency, card_id, \
           last4, event_id, trace_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (purchase_id) DO NOTHING",
    )
    .bind(&purchase.purchase_id)
    .bind(wallet)
    .bind(&purchase.plan)
    .bind(purchase.amount_cents)
    .bind(&purchase.currency)
    .bind(&card.card_id)
    .bind(&card.last4)
    .bind(event_id)
    .bind(&trace_id)
    .execute(tx)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        tracing::info!(
            purchase = %purchase.purchase_id,
            plan = %purchase.plan,
            amount_cents = purchase.amount_cents,
            card_last4 = %card.last4,
            "plan charged"
        );
    }
    Ok(inserted)
}

#[allow(clippy::too_many_arguments)]
async fn insert_dead_letter(
    tx: &mut PgConnection,
    event_id: Uuid,
    event_type: &str,
    wallet: &str,
    payload: &serde_json::Value,
    traceparent: Option<&str>,
    error: &str,
    attempts: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (event_id, event_type, wallet_id, payload, traceparent, error, attempts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(wallet)
    .bind(payload)
    .bind(traceparent)
    .bind(error)
    .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            limit: 5,
        };
        assert_eq!(p.delay(0), Duration::from_millis(100));
        assert_eq!(p.delay(1), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(800));
        assert_eq!(p.delay(4), Duration::from_secs(1));
        assert_eq!(p.delay(40), Duration::from_secs(1));
    }
}
