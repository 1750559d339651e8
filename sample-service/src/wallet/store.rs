//! The wallet's tables and its writes: each one a transaction with its outbox event.

use outbox_client::{NewEvent, Outbox};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{AGGREGATE_TYPE, PLANS};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS wallets (
    id         uuid        PRIMARY KEY,
    owner      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS cards (
    id         uuid        PRIMARY KEY,
    wallet_id  uuid        NOT NULL REFERENCES wallets (id),
    brand      text        NOT NULL,
    last4      text        NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS purchases (
    id           uuid        PRIMARY KEY,
    wallet_id    uuid        NOT NULL REFERENCES wallets (id),
    plan         text        NOT NULL,
    amount_cents bigint      NOT NULL,
    currency     text        NOT NULL,
    purchased_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"#;

/// What can go wrong with a write, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("wallet {0} does not exist")]
    UnknownWallet(Uuid),
    #[error("unknown plan `{0}`; plans: basic, standard, premium")]
    UnknownPlan(String),
    #[error("card number must be 12 to 19 digits")]
    InvalidCard,
    #[error(transparent)]
    Outbox(#[from] outbox_client::Error),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct CardView {
    pub card_id: Uuid,
    pub brand: String,
    pub last4: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PurchaseView {
    pub purchase_id: Uuid,
    pub plan: String,
    pub amount_cents: i64,
    pub currency: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WalletView {
    pub wallet_id: Uuid,
    pub owner: String,
    pub cards: Vec<CardView>,
    pub purchases: Vec<PurchaseView>,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    outbox: Outbox,
}

impl Store {
    pub fn new(pool: PgPool, outbox_table: &str) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            outbox: Outbox::new(outbox_table)?,
        })
    }

    /// Creates the business tables and checks that the outbox table exists.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        sqlx::raw_sql(SCHEMA).execute(&self.pool).await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.outbox.table().to_string())
            .fetch_one(&self.pool)
            .await?;
        anyhow::ensure!(
            exists,
            "the outbox table {} does not exist in the wallet database; run `outbox-relay migrate` with the same DATABASE_URL",
            self.outbox.table()
        );
        Ok(())
    }

    pub async fn create_wallet(&self, owner: &str) -> Result<Uuid, StoreError> {
        let id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO wallets (id, owner) VALUES ($1, $2)")
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        let event = NewEvent::new(
            AGGREGATE_TYPE,
            id,
            "WalletCreated",
            json!({"wallet_id": id, "owner": owner}),
        );
        self.outbox.enqueue(&mut tx, event).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Stores the card (brand and last four digits only: the number itself is never kept).
    pub async fn add_card(
        &self,
        wallet: Uuid,
        brand: &str,
        number: &str,
    ) -> Result<CardView, StoreError> {
        let digits: String = number.chars().filter(|c| !c.is_whitespace()).collect();
        if !(12..=19).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(StoreError::InvalidCard);
        }
        let card = CardView {
            card_id: Uuid::now_v7(),
            brand: brand.to_string(),
            last4: digits[digits.len() - 4..].to_string(),
        };
        let mut tx = self.pool.begin().await?;
        lock_wallet(&mut tx, wallet).await?;
        let added_at: String = sqlx::query_scalar(
            "INSERT INTO cards (id, wallet_id, brand, last4) VALUES ($1, $2, $3, $4) \
             RETURNING to_char(added_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .bind(card.card_id)
        .bind(wallet)
        .bind(&card.brand)
        .bind(&card.last4)
        .fetch_one(&mut *tx)
        .await?;
        let event = NewEvent::new(
            AGGREGATE_TYPE,
            wallet,
            "CardAdded",
            json!({
                "wallet_id": wallet, "card_id": card.card_id, "brand": card.brand,
                "last4": card.last4, "added_at": added_at,
            }),
        );
        self.outbox.enqueue(&mut tx, event).await?;
        tx.commit().await?;
        Ok(card)
    }

    pub async fn purchase_plan(
        &self,
        wallet: Uuid,
        plan: &str,
    ) -> Result<PurchaseView, StoreError> {
        let (plan, amount_cents) = PLANS
            .iter()
            .find(|(name, _)| *name == plan)
            .copied()
            .ok_or_else(|| StoreError::UnknownPlan(plan.to_string()))?;
        let purchase = PurchaseView {
            purchase_id: Uuid::now_v7(),
            plan: plan.to_string(),
            amount_cents,
            currency: "EUR".into(),
        };
        let mut tx = self.pool.begin().await?;
        lock_wallet(&mut tx, wallet).await?;
        sqlx::query(
            "INSERT INTO purchases (id, wallet_id, plan, amount_cents, currency) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(purchase.purchase_id)
        .bind(wallet)
        .bind(&purchase.plan)
        .bind(purchase.amount_cents)
        .bind(&purchase.currency)
        .execute(&mut *tx)
        .await?;
        let event = NewEvent::new(
            AGGREGATE_TYPE,
            wallet,
            "PlanPurchased",
            json!({
                "wallet_id": wallet, "purchase_id": purchase.purchase_id, "plan": purchase.plan,
                "amount_cents": purchase.amount_cents, "currency": purchase.currency,
            }),
        );
        self.outbox.enqueue(&mut tx, event).await?;
        tx.commit().await?;
        Ok(purchase)
    }

    pub async fn wallet(&self, id: Uuid) -> Result<WalletView, StoreError> {
        let owner: String = sqlx::query_scalar("SELECT owner FROM wallets WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::UnknownWallet(id))?;
        let cards = sqlx::query(
            "SELECT id, brand, last4 FROM cards WHERE wallet_id = $1 ORDER BY added_at",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| CardView {
            card_id: r.get("id"),
            brand: r.get("brand"),
            last4: r.get("last4"),
        })
        .collect();
        let purchases = sqlx::query(
            "SELECT id, plan, amount_cents, currency FROM purchases WHERE wallet_id = $1 \
             ORDER BY purchased_at",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| PurchaseView {
            purchase_id: r.get("id"),
            plan: r.get("plan"),
            amount_cents: r.get("amount_cents"),
            currency: r.get("currency"),
        })
        .collect();
        Ok(WalletView {
            wallet_id: id,
            owner,
            cards,
            purchases,
        })
    }
}

/// Locks the wallet row for the rest of the transaction, so the wallet's events enter the
/// outbox in the order of its writes (the relay keeps outbox order per aggregate).
async fn lock_wallet(tx: &mut sqlx::PgConnection, wallet: Uuid) -> Result<(), StoreError> {
    sqlx::query("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE")
        .bind(wallet)
        .fetch_optional(tx)
        .await?
        .map(|_| ())
        .ok_or(StoreError::UnknownWallet(wallet))
}
