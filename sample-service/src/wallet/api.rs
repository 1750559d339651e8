//! HTTP routes and the per-request trace span.

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use opentelemetry::trace::TraceContextExt;
use outbox_client::trace;
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use super::Store;
use super::store::StoreError;

pub fn router(store: Store) -> Router {
    Router::new()
        .route("/wallets", post(create_wallet))
        .route("/wallets/{id}", get(show_wallet))
        .route("/wallets/{id}/cards", post(add_card))
        .route("/wallets/{id}/purchases", post(purchase_plan))
        .layer(middleware::from_fn(traced))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(store)
}

/// One server span per request, continuing the caller's `traceparent` when it sends one (else
/// a new root trace). The response carries the span's `traceparent` so callers (and the demo)
/// can follow the trace.
async fn traced(req: Request, next: Next) -> Response {
    let parent = trace::extract(
        req.headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
    );
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        trace_id = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!("request span not traced: {e}");
    }
    let cx = span.context();
    span.record(
        "trace_id",
        tracing::field::display(cx.span().span_context().trace_id()),
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if let Some(tp) = trace::inject(&cx).traceparent
        && let Ok(value) = HeaderValue::from_str(&tp)
    {
        response.headers_mut().insert("traceparent", value);
    }
    response
}

struct ApiError(StoreError);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            StoreError::UnknownWallet(_) => StatusCode::NOT_FOUND,
            StoreError::UnknownPlan(_) | StoreError::InvalidCard => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            StoreError::Outbox(_) | StoreError::Database(_) => {
                tracing::error!(error = %self.0, "request failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({"error": self.0.to_string()}))).into_response()
    }
}

fn trace_id() -> serde_json::Value {
    trace::current_trace_id().map_or(serde_json::Value::Null, serde_json::Value::String)
}

#[derive(Deserialize)]
struct NewWallet {
    owner: String,
}

async fn create_wallet(
    State(store): State<Store>,
    Json(body): Json<NewWallet>,
) -> Result<impl IntoResponse, ApiError> {
    let id = store.create_wallet(&body.owner).await?;
    tracing::info!(wallet = %id, owner = %body.owner, "wallet created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"wallet_id": id, "trace_id": trace_id()})),
    ))
}

#[derive(Deserialize)]
struct NewCard {
    brand: String,
    number: String,
}

async fn add_card(
    State(store): State<Store>,
    Path(wallet): Path<Uuid>,
    Json(body): Json<NewCard>,
) -> Result<impl IntoResponse, ApiError> {
    let card = store.add_card(wallet, &body.brand, &body.number).await?;
    tracing::info!(wallet = %wallet, card = %card.card_id, last4 = %card.last4, "card added");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "card_id": card.card_id, "brand": card.brand, "last4": card.last4,
            "trace_id": trace_id(),
        })),
    ))
}

#[derive(Deserialize)]
struct NewPurchase {
    plan: String,
}

async fn purchase_plan(
    State(store): State<Store>,
    Path(wallet): Path<Uuid>,
    Json(body): Json<NewPurchase>,
) -> Result<impl IntoResponse, ApiError> {
    let purchase = store.purchase_plan(wallet, &body.plan).await?;
    tracing::info!(wallet = %wallet, purchase = %purchase.purchase_id, plan = %purchase.plan, "plan purchased");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "purchase_id": purchase.purchase_id, "plan": purchase.plan,
            "amount_cents": purchase.amount_cents, "currency": purchase.currency,
            "trace_id": trace_id(),
        })),
    ))
}

async fn show_wallet(
    State(store): State<Store>,
    Path(wallet): Path<Uuid>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(store.wallet(wallet).await?))
}
