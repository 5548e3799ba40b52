//! The daemon's HTTP endpoint (`http.listen`, default 127.0.0.1:9187):
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when the source is connected, the API accepts the key, the slot lag is under `max_slot_lag` and the state store is writable; 503 with the reasons otherwise |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /status` | the [`StatusReport`] as JSON |
//! | `GET /dlq?type=T` | dead letters as JSON |
//! | `POST /dlq/replay?type=T` | re-sends dead letters through the running sink |
//! | `POST /dlq/purge?type=T` | drops dead letters |
//!
//! It is how `cobi-sync status` and `cobi-sync dlq` reach a running daemon
//! (the state store is locked by it). Bind it to loopback: the dlq
//! endpoints change state and carry record contents.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Settings;
use crate::model::schema::{schema, TypeId};
use crate::ops::health::Health;
use crate::ops::metrics::Metrics;
use crate::ops::{dlq, status};
use crate::sink::SinkHandle;
use crate::state::StateStore;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// Settings.
    pub settings: Arc<Settings>,
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The running sink (for replay).
    pub sink: SinkHandle,
}

#[derive(Deserialize)]
struct TypeQuery {
    #[serde(rename = "type")]
    ty: Option<String>,
}

fn type_param(q: &TypeQuery) -> Result<Option<TypeId>, Box<Response>> {
    match &q.ty {
        None => Ok(None),
        Some(t) => schema().type_id(t).map(Some).ok_or_else(|| {
            Box::new(
                (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown type {t}; types are: {}",
                        schema().type_names().join(", ")
                    ),
                )
                    .into_response(),
            )
        }),
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_handler))
        .route("/dlq", get(dlq_list))
        .route("/dlq/replay", post(dlq_replay))
        .route("/dlq/purge", post(dlq_purge))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    let r = s.health.report();
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn status_handler(State(s): State<AppState>) -> Response {
    let h = s.health.report();
    match status::build(&s.settings, s.store.as_ref(), Some(&h)) {
        Ok(r) => Json(r).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn dlq_list(State(s): State<AppState>, Query(q): Query<TypeQuery>) -> Response {
    let ty = match type_param(&q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match dlq::list(s.store.as_ref(), ty) {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn dlq_replay(State(s): State<AppState>, Query(q): Query<TypeQuery>) -> Response {
    let ty = match type_param(&q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match dlq::replay(s.store.as_ref(), &s.sink, ty).await {
        Ok(r) => {
            info!(
                replayed = r.replayed,
                skipped = r.skipped,
                "dead letters replayed on request"
            );
            Json(r).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn dlq_purge(State(s): State<AppState>, Query(q): Query<TypeQuery>) -> Response {
    let ty = match type_param(&q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match dlq::purge(s.store.as_ref(), ty) {
        Ok(n) => {
            info!(purged = n, "dead letters purged on request");
            Json(serde_json::json!({ "purged": n })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Binds and serves until `stop`. Bind errors are returned (port in use).
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            error!(error = %e, "http endpoint failed");
        }
    }))
}
