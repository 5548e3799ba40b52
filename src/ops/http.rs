//! The daemon's HTTP endpoint (`http.listen`, default
//! [`crate::config::DEFAULT_LISTEN`]):
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process runs, with [`Identity`] (so the CLI knows it reached cobi-sync, not another exporter on the port) |
//! | `GET /readyz` | 200 when the source is connected, the API accepts the key, the slot lag is under `max_slot_lag` and the state store is writable; 503 with the reasons otherwise |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /status` | the [`StatusReport`] as JSON |
//! | `GET /dlq?type=T` | dead letters as JSON |
//! | `POST /dlq/replay?type=T` | re-sends dead letters through the running sink |
//! | `POST /dlq/purge?type=T` | drops dead letters |
//! | `POST /resync?types=T,U` | re-copies the mappings of these types while streaming (replication mode) |
//!
//! It is how `cobi-sync status` and `cobi-sync dlq` reach a running daemon
//! (the state store is locked by it). The endpoints in [`protected_routes`]
//! (`/dlq…`, and any route that changes state or carries record contents)
//! need the endpoint token ([`crate::ops::token`]: 401 without it), and
//! answer only clients on the daemon's own host — a loopback address, or
//! the very address they connected to (`http.listen = "10.0.0.5:7781"`
//! reached from 10.0.0.5) — and 403 to everyone else. Health, metrics and
//! status (counts and positions only) answer everyone, so a Prometheus on
//! another host can scrape the daemon.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::model::schema::{schema, TypeId};
use crate::ops::health::Health;
use crate::ops::live::Live;
use crate::ops::metrics::Metrics;
use crate::ops::{dlq, status};
use crate::source::replication::ResyncRequest;
use crate::state::StateStore;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// The settings in force, the running sink and the replication
    /// source's `resync` channel (a SIGHUP replaces them).
    pub live: Arc<Live>,
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The endpoint token the protected routes require; `None` refuses
    /// them all.
    pub token: Option<Arc<str>>,
}

/// What `/healthz` answers: who this is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// Always [`SERVICE`].
    pub service: String,
    /// The daemon's version.
    pub version: String,
    /// `ok`.
    pub status: String,
}

/// The `service` a cobi-sync `/healthz` names.
pub const SERVICE: &str = "cobi-sync";

impl Identity {
    /// This process.
    pub fn this() -> Identity {
        Identity {
            service: SERVICE.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            status: "ok".into(),
        }
    }
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

/// Both ends of a connection to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The client's address.
    pub remote: SocketAddr,
    /// The address the client connected to (this host's).
    pub local: SocketAddr,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        let remote = *stream.remote_addr();
        Peer {
            remote,
            // Unknown: an address no client has, so only loopback passes.
            local: stream
                .io()
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}

/// The routes that change state or carry record contents: each needs the
/// endpoint token and a client on this host. New such routes go here.
fn protected_routes() -> Router<AppState> {
    Router::new()
        .route("/dlq", get(dlq_list))
        .route("/dlq/replay", post(dlq_replay))
        .route("/dlq/purge", post(dlq_purge))
        .route("/resync", post(resync))
}

/// The router. Serve it with a [`Peer`] as [`ConnectInfo`] (as [`serve`]
/// does): without one the protected endpoints answer nobody.
pub fn router(state: AppState) -> Router {
    let protected = protected_routes()
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route_layer(middleware::from_fn(loopback_only));
    Router::new()
        .route("/healthz", get(|| async { Json(Identity::this()) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_handler))
        .merge(protected)
        .with_state(state)
}

/// Refuses protected requests without the endpoint token (401).
async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(token) = &s.token {
        if crate::ops::token::authorizes(header, token) {
            return next.run(req).await;
        }
    }
    warn!(path = %req.uri().path(), "endpoint request without a valid token refused");
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        format!(
            "this endpoint needs the token in <state.dir>/{}; run `cobi-sync dlq …` as root or \
             the service user on this host (it sends the token)\n",
            crate::ops::token::FILE_NAME
        ),
    )
        .into_response()
}

/// Whether `peer` may use the `/dlq` endpoints: only a client on this host,
/// connecting from a loopback address or from the address it connected to
/// (IPv4-mapped IPv6 addresses count as IPv4). A packet from elsewhere
/// cannot carry one of this host's addresses as its source.
fn dlq_allowed(peer: &Peer) -> bool {
    let remote = peer.remote.ip().to_canonical();
    remote.is_loopback() || remote == peer.local.ip().to_canonical()
}

/// Refuses `/dlq` requests from other hosts.
async fn loopback_only(ConnectInfo(peer): ConnectInfo<Peer>, req: Request, next: Next) -> Response {
    if dlq_allowed(&peer) {
        return next.run(req).await;
    }
    warn!(
        peer = %peer.remote.ip(),
        path = %req.uri().path(),
        "dead-letter request from another host refused"
    );
    (
        StatusCode::FORBIDDEN,
        "the /dlq endpoints answer only clients on the daemon's own host (they carry record \
         contents); run `cobi-sync dlq` there\n",
    )
        .into_response()
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
    let settings = s.live.settings();
    let types: Vec<TypeId> = settings.mappings.iter().map(|m| m.ty).collect();
    let dead = s.store.dead_letter_counts().unwrap_or_default();
    s.metrics.refresh(&dead, &types, &settings.state.dir);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Runs a (blocking) state store call on a blocking thread, off the async
/// workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("state store calls do not panic")
}

async fn status_handler(State(s): State<AppState>) -> Response {
    let h = s.health.report();
    let (settings, store) = (s.live.settings(), s.store.clone());
    match blocking(move || status::build(&settings, store.as_ref(), Some(&h))).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn dlq_list(State(s): State<AppState>, Query(q): Query<TypeQuery>) -> Response {
    let ty = match type_param(&q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let store = s.store.clone();
    match blocking(move || dlq::list(store.as_ref(), ty)).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// 503 while a SIGHUP restarts the pipeline (no sink or source to reach).
fn restarting() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the pipeline is restarting to apply a reloaded configuration; try again in a few \
         seconds\n",
    )
        .into_response()
}

async fn dlq_replay(State(s): State<AppState>, Query(q): Query<TypeQuery>) -> Response {
    let ty = match type_param(&q) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let Some(sink) = s.live.sink() else {
        return restarting();
    };
    match dlq::replay(s.store.clone(), &sink, ty).await {
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
    let store = s.store.clone();
    match blocking(move || dlq::purge(store.as_ref(), ty)).await {
        Ok(n) => {
            info!(purged = n, "dead letters purged on request");
            Json(serde_json::json!({ "purged": n })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct ResyncQuery {
    types: String,
}

/// `POST /resync?types=T,U`: asks the replication source to re-copy the
/// mappings of these types; answers once they are marked for re-copy.
async fn resync(State(s): State<AppState>, Query(q): Query<ResyncQuery>) -> Response {
    let mut types = Vec::new();
    for t in q.types.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match schema().type_id(t) {
            Some(id) => types.push(id),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown type {t}; types are: {}\n",
                        schema().type_names().join(", ")
                    ),
                )
                    .into_response()
            }
        }
    }
    if types.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "name at least one type: ?types=shops\n",
        )
            .into_response();
    }
    let Some(running) = s.live.running() else {
        return restarting();
    };
    let Some(tx) = running.resync else {
        return (
            StatusCode::CONFLICT,
            "resync while running needs replication mode; in poll mode stop the daemon and run \
             `cobi-sync snapshot --force --type T`\n",
        )
            .into_response();
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    if tx.send(ResyncRequest { types, reply }).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the replication source is not running\n",
        )
            .into_response();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(mappings))) => {
            info!(mappings = %mappings.join(", "), "resync accepted");
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({ "resync": mappings })),
            )
                .into_response()
        }
        Ok(Ok(Err(why))) => (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the replication source did not take the request (reconnecting?); try again\n",
        )
            .into_response(),
    }
}

/// Binds and serves until `stop`. Bind errors are returned (port in use).
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(state).into_make_service_with_connect_info::<Peer>();
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            error!(error = %e, "http endpoint failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlq_answers_clients_on_this_host_only() {
        let allowed = |remote: &str, local: &str| {
            dlq_allowed(&Peer {
                remote: remote.parse().unwrap(),
                local: local.parse().unwrap(),
            })
        };
        // Loopback, whatever address the daemon listens on.
        assert!(allowed("127.0.0.1:50000", "127.0.0.1:7781"));
        assert!(allowed("127.8.9.10:50000", "127.0.0.1:7781"));
        assert!(allowed("[::1]:50000", "[::1]:7781"));
        assert!(allowed(
            "[::ffff:127.0.0.1]:50000",
            "[::ffff:127.0.0.1]:7781"
        ));
        // This host through its own address (`listen = "10.0.0.5:7781"`).
        assert!(allowed("10.0.0.5:50000", "10.0.0.5:7781"));
        assert!(allowed("[::ffff:10.0.0.5]:50000", "10.0.0.5:7781"));
        // Other hosts.
        assert!(!allowed("10.0.0.7:50000", "10.0.0.5:7781"));
        assert!(
            !allowed("172.17.0.1:50000", "172.17.0.2:7781"),
            "docker's gateway"
        );
        assert!(!allowed("[2001:db8::1]:50000", "[2001:db8::2]:7781"));
        assert!(!allowed(
            "[::ffff:192.168.1.5]:50000",
            "[::ffff:192.168.1.9]:7781"
        ));
        // An unknown local address lets only loopback through.
        assert!(!allowed("10.0.0.7:50000", "0.0.0.0:0"));
    }
}
