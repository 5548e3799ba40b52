//! A tiny stand-in for the Data API that timestamps every record on arrival,
//! for the commit → received latency phase. It accepts
//! `POST /v1/data/<type>` with any body, always answers 200 with the
//! documented envelope, and records the arrival instant of each
//! `transaction_id` (the first arrival wins; re-sends are counted).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;

#[derive(Default)]
pub struct Arrivals {
    /// transaction_id → first arrival.
    pub first: HashMap<String, Instant>,
    pub requests: u64,
    pub records: u64,
    pub resent: u64,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub arrivals: Arc<Mutex<Arrivals>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Result<Receiver> {
        let arrivals = Arc::new(Mutex::new(Arrivals::default()));
        let app = Router::new()
            .route("/v1/data/{ty}", post(handle))
            .with_state(arrivals.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver {
            addr,
            arrivals,
            task,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(serde::Deserialize)]
struct Body {
    records: Vec<serde_json::Map<String, serde_json::Value>>,
}

async fn handle(
    State(arrivals): State<Arc<Mutex<Arrivals>>>,
    Path(ty): Path<String>,
    body: Bytes,
) -> Response {
    let now = Instant::now();
    let parsed: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad body: {e}")).into_response();
        }
    };
    {
        let mut a = arrivals.lock();
        a.requests += 1;
        a.records += parsed.records.len() as u64;
        for r in &parsed.records {
            if let Some(id) = r.get("transaction_id").and_then(|v| v.as_str()) {
                if a.first.contains_key(id) {
                    a.resent += 1;
                } else {
                    a.first.insert(id.to_owned(), now);
                }
            }
        }
    }
    let env = serde_json::json!({
        "request_id": "bench",
        "type": ty,
        "batches": [{
            "batch": 0,
            "status": 200,
            "data": {
                "status": "success",
                "type": ty,
                "message": "Records uploaded successfully",
                "request_id": "bench",
                "batch_id": "bench",
                "error": ""
            }
        }]
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        env.to_string(),
    )
        .into_response()
}
