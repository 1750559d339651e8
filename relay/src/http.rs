//! `/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz` (database and
//! broker reachable; says whether this instance is the active relay), on `RELAY_HTTP_ADDR`.
//!
//! The observer behind `/readyz` checks Postgres and the broker every few seconds on
//! connections of its own, so readiness reflects an idle relay too, and it refreshes the
//! gauges (pending events, oldest pending age, dead letters, slot lag and retained WAL).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, SourceKind};
use crate::error::Error;
use crate::metrics as m;
use crate::outbox::Outbox;
use crate::pg::PgConn;
use crate::pg::slot::{resolve_slot_name, slot_lag};
use crate::sink::BrokerProbe;

/// What `/readyz` reports; written by the observer and the pipeline.
#[derive(Debug, Default)]
pub struct Health {
    pub database: AtomicBool,
    pub broker: AtomicBool,
    pub active: AtomicBool,
    /// Counts leadership sessions, so a stale watcher cannot clear a newer session's flag.
    session: AtomicU64,
}

impl Health {
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
        m::set_active(active);
    }

    /// This instance became the active relay; it stops being so the moment `lost` fires (its
    /// connection, and with it the leader lock, is gone), even while the pipeline is still
    /// busy with a batch or a backoff.
    pub fn became_active(self: &Arc<Self>, lost: CancellationToken) {
        let session = self.session.fetch_add(1, Ordering::SeqCst) + 1;
        self.set_active(true);
        let health = self.clone();
        tokio::spawn(async move {
            lost.cancelled().await;
            if health.session.load(Ordering::SeqCst) == session {
                health.set_active(false);
            }
        });
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `addr` now (a taken port is a start-up error) and serves until `shutdown`.
pub async fn serve(
    addr: &str,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Config(format!(
            "cannot serve /metrics, /healthz, /readyz on RELAY_HTTP_ADDR {addr}: {e}; set RELAY_HTTP_ADDR to a free address (or `off`)"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Setup(format!("cannot read the HTTP listener's address: {e}")))?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    info!(addr = %local, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            warn!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(local)
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let h = &state.health;
    let database = h.database.load(Ordering::Relaxed);
    let broker = h.broker.load(Ordering::Relaxed);
    let active = h.active.load(Ordering::Relaxed);
    let ready = database && broker;
    let body = serde_json::json!({
        "ready": ready,
        "database": database,
        "broker": broker,
        "active": active,
        "role": if active { "active" } else { "standby" },
        "stall": crate::metrics::wal_stall(),
        "failover_slot": crate::metrics::slot_standbys()
            .map(|(synced, standbys)| serde_json::json!({ "synced": synced, "standbys": standbys })),
        "broker_node": crate::metrics::broker_node(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
}

/// Every `interval`: checks Postgres and the broker, refreshes the gauges.
pub async fn observe(
    config: Config,
    health: Arc<Health>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut probe = BrokerProbe::new(&config);
    let mut conn: Option<(PgConn, Outbox, String)> = None;
    loop {
        let database = async {
            if conn.as_ref().is_none_or(|(c, _, _)| c.is_closed()) {
                let c = PgConn::connect(&config.database_url).await?;
                let outbox =
                    Outbox::inspect(&c.client, &config, config.source == SourceKind::Poll).await?;
                // Only log tailing has a slot to watch.
                let slot = match config.source {
                    SourceKind::Wal => {
                        resolve_slot_name(&c.client, config.wal.slot.as_deref(), &outbox.table)
                            .await?
                    }
                    SourceKind::Poll => String::new(),
                };
                conn = Some((c, outbox, slot));
            }
            let (c, outbox, slot) = conn.as_ref().expect("connected above");
            let stats = outbox.stats(&c.client).await?;
            if let Some(pending) = stats.pending {
                gauge!(m::PENDING).set(pending as f64);
                gauge!(m::OLDEST_PENDING_AGE).set(stats.oldest_pending_secs.unwrap_or(0.0));
            }
            gauge!(m::DEAD_LETTERS).set(stats.dead_letters as f64);
            gauge!(m::HELD_AGGREGATES).set(stats.held_aggregates as f64);
            if config.source == SourceKind::Wal
                && let Some((lag, retained)) = slot_lag(&c.client, slot).await?
            {
                gauge!(m::WAL_LAG).set(lag as f64);
                gauge!(m::WAL_RETAINED).set(retained as f64);
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = &database {
            debug!(error = %e, "database check failed");
            conn = None;
        }
        let broker = probe.check().await;
        if let Err(e) = &broker {
            debug!(error = %e, "broker check failed");
        }
        health.database.store(database.is_ok(), Ordering::Relaxed);
        health.broker.store(broker.is_ok(), Ordering::Relaxed);
        gauge!(m::DATABASE_UP).set(if database.is_ok() { 1.0 } else { 0.0 });
        gauge!(m::BROKER_UP).set(if broker.is_ok() { 1.0 } else { 0.0 });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
