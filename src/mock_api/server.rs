//! The HTTP side of the mock: one task per connection (so that a "drop"
//! fault can close a connection without answering), routing, the
//! envelope, and the `/_mock/*` control endpoints.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;

use crate::mock_api::faults::{check_rate, Fault, Faults};
use crate::mock_api::parse::{parse_batch, parse_one};
use crate::mock_api::store::{Failure, Store};
use crate::mock_api::MockStats;
use crate::model::schema::{schema, TypeDef, TypeId};

/// Largest request body read.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// How many failing records the `error` string names before "… and N more".
const MAX_NAMED_FAILURES: usize = 100;
/// Exact body of a 401.
pub(crate) const UNAUTHORIZED_BODY: &str =
    r#"{"error":"Unauthorized","message":"Invalid or missing API key"}"#;

type Resp = Response<Full<Bytes>>;

/// State shared by every connection.
pub(crate) struct Shared {
    pub store: Store,
    pub api_key: RwLock<Arc<str>>,
    pub faults: Mutex<Faults>,
    /// Answers by status (and "dropped"), `/_mock/*` excluded.
    pub requests: Mutex<BTreeMap<String, u64>>,
    /// Name no record in 207/400 error texts.
    pub opaque_errors: bool,
}

impl Shared {
    fn count(&self, what: &str) {
        *self.requests.lock().entry(what.to_string()).or_insert(0) += 1;
    }

    fn counted(&self, resp: Resp) -> Resp {
        self.count(resp.status().as_str());
        resp
    }

    /// The counters as `/_mock/stats` shows them.
    pub fn stats(&self) -> MockStats {
        let c = self.store.counters();
        MockStats {
            requests_by_status: self.requests.lock().clone(),
            records_accepted: c.accepted,
            records_rejected: c.rejected,
            reference_failures: c.reference_failures,
            duplicates: c.duplicates,
            stored: c.stored,
        }
    }

    /// Forgets records and counters (faults and key stay).
    pub fn reset(&self) {
        self.store.reset();
        self.requests.lock().clear();
    }
}

// ---- connections ----------------------------------------------------------

/// Accepts connections until `stop` fires (or its sender is dropped), then
/// closes every connection.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(error = %e, "mock-api accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Serves one connection. A handler that decides to drop the connection
/// signals `dropper` and never answers; the connection future is then
/// dropped, which closes the socket with no response written.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let dropper = Arc::new(Notify::new());
    let signal = dropper.clone();
    let service =
        hyper::service::service_fn(move |req| handle(shared.clone(), signal.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = dropper.notified() => {}
    }
}

// ---- requests -------------------------------------------------------------

/// What a non-control path designates.
enum Target {
    /// `POST /v1/data/<type>`.
    Batch(TypeId),
    /// `POST /user-interactions`.
    Single(TypeId),
    /// `POST /v1/data/<unknown>`.
    UnknownType(String),
}

fn route(path: &str) -> Option<Target> {
    if let Some(t) = schema().types.iter().position(|t| t.path == path) {
        let ty = t as TypeId;
        return Some(if schema().ty(ty).batch {
            Target::Batch(ty)
        } else {
            Target::Single(ty)
        });
    }
    path.strip_prefix("/v1/data/")
        .map(|seg| Target::UnknownType(seg.to_string()))
}

async fn handle(
    shared: Arc<Shared>,
    dropper: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if let Some(rest) = path.strip_prefix("/_mock/") {
        return Ok(control(&shared, &parts.method, rest, body).await);
    }
    let Some(target) = route(path) else {
        let msg = format!("no route for {} {path}", parts.method);
        return Ok(shared.counted(error_json(StatusCode::NOT_FOUND, "Not Found", &msg)));
    };
    if parts.method != Method::POST {
        let msg = format!("{path} accepts POST only");
        let resp = error_json(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed", &msg);
        return Ok(shared.counted(resp));
    }
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(resp) => return Ok(shared.counted(resp)),
    };
    let (latency, fault) = shared.faults.lock().decide();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Fault::None => Ok(shared.counted(process(&shared, &parts.headers, target, &body))),
        Fault::DropBefore => drop_connection(&shared, &dropper).await,
        Fault::DropAfter => {
            let _ = process(&shared, &parts.headers, target, &body);
            drop_connection(&shared, &dropper).await
        }
        Fault::Fail => Ok(shared.counted(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"internal"}"#,
        ))),
        Fault::Throttle => {
            let mut resp = error_json(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                "rate limit exceeded (injected by mock-api)",
            );
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(shared.counted(resp))
        }
    }
}

/// Never answers: the connection task sees the signal and closes the socket.
async fn drop_connection(shared: &Shared, dropper: &Notify) -> Result<Resp, Infallible> {
    shared.count("dropped");
    dropper.notify_one();
    std::future::pending().await
}

async fn read_body(body: Incoming) -> Result<Bytes, Resp> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(error_json(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload Too Large",
            &format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        )),
        Err(e) => Err(error_json(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            &format!("could not read the request body: {e}"),
        )),
    }
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(key) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return false;
    };
    let expected = shared.api_key.read();
    !expected.is_empty() && key.trim() == &**expected
}

fn process(shared: &Shared, headers: &HeaderMap, target: Target, body: &[u8]) -> Resp {
    if !authorized(shared, headers) {
        return json(StatusCode::UNAUTHORIZED, UNAUTHORIZED_BODY);
    }
    match target {
        Target::Batch(ty) => batch(shared, ty, body),
        Target::Single(ty) => single(shared, ty, body),
        Target::UnknownType(seg) => {
            let names = schema()
                .types
                .iter()
                .filter(|t| t.batch)
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            error_json(
                StatusCode::NOT_FOUND,
                "Not Found",
                &format!("unknown type `{seg}`; the data types are {names}"),
            )
        }
    }
}

/// `POST /v1/data/<type>`.
fn batch(shared: &Shared, ty: TypeId, body: &[u8]) -> Resp {
    let t = schema().ty(ty);
    let max = schema().max_records_per_request;
    let parsed = match parse_batch(ty, body, max) {
        Ok(b) => b,
        Err(e) => return envelope(t, Verdict::BadRequest(e.to_string())),
    };
    if parsed.total == 0 {
        return envelope(t, Verdict::BadRequest("records must not be empty".into()));
    }
    if parsed.total > max {
        return envelope(
            t,
            Verdict::BadRequest(format!(
                "too many records: {} (at most {max} per request)",
                parsed.total
            )),
        );
    }
    let total = parsed.total;
    let checked = shared.store.check(ty, parsed.records, body);
    let verdict = Verdict::Records {
        total,
        failed: checked.failures.len(),
        error: if shared.opaque_errors {
            opaque_failure_text(checked.failures.len(), total)
        } else {
            failure_text(&checked.failures, total)
        },
    };
    shared.store.apply(ty, checked.accepted, &checked.failures);
    envelope(t, verdict)
}

/// `POST /user-interactions`: one object, 201 with the object and an id.
fn single(shared: &Shared, ty: TypeId, body: &[u8]) -> Resp {
    let parsed = match parse_one(ty, body) {
        Ok(p) => p,
        Err(e) => {
            return error_json(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                &format!("body must be one JSON {} object: {e}", schema().ty(ty).name),
            )
        }
    };
    let mut checked = shared.store.check(ty, vec![parsed], body);
    let Some(accepted) = checked.accepted.pop() else {
        let reason = checked
            .failures
            .first()
            .map(|f| f.reason.clone())
            .unwrap_or_default();
        shared.store.apply(ty, Vec::new(), &checked.failures);
        return error_json(StatusCode::BAD_REQUEST, "Validation failed", &reason);
    };
    // The echo: the stored object plus a generated `id`.
    let mut echo = accepted.json.to_vec();
    echo.pop(); // '}'
    while echo.last().is_some_and(u8::is_ascii_whitespace) {
        echo.pop();
    }
    if echo.last() != Some(&b'{') {
        echo.push(b',');
    }
    echo.extend_from_slice(br#""id":""#);
    echo.extend_from_slice(uuid::Uuid::new_v4().to_string().as_bytes());
    echo.extend_from_slice(br#""}"#);
    shared.store.apply(ty, vec![accepted], &[]);
    json(StatusCode::CREATED, echo)
}

/// The `error` string of a batch in `--opaque-errors` mode: a count, no
/// record named.
fn opaque_failure_text(failed: usize, total: usize) -> String {
    if failed == 0 {
        return String::new();
    }
    format!("{failed} of {total} records failed validation")
}

/// The `error` string of a batch: each failing record named by its key.
fn failure_text(failures: &[Failure], total: usize) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let mut out = format!("{} of {total} records failed: ", failures.len());
    for (i, f) in failures.iter().take(MAX_NAMED_FAILURES).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&f.label);
        out.push_str(": ");
        out.push_str(&f.reason);
    }
    if failures.len() > MAX_NAMED_FAILURES {
        out.push_str(&format!(
            "; … and {} more",
            failures.len() - MAX_NAMED_FAILURES
        ));
    }
    out
}

enum Verdict {
    /// The body as a whole is unusable.
    BadRequest(String),
    /// Records were judged one by one.
    Records {
        total: usize,
        failed: usize,
        error: String,
    },
}

#[derive(Serialize)]
struct Envelope<'a> {
    request_id: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    batches: [BatchEntry<'a>; 1],
}

#[derive(Serialize)]
struct BatchEntry<'a> {
    batch: u32,
    status: u16,
    data: BatchData<'a>,
}

#[derive(Serialize)]
struct BatchData<'a> {
    status: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    message: &'a str,
    request_id: &'a str,
    batch_id: &'a str,
    error: &'a str,
}

fn envelope(t: &TypeDef, verdict: Verdict) -> Resp {
    let request_id = uuid::Uuid::new_v4().to_string();
    let batch_id = uuid::Uuid::new_v4().to_string();
    let (status, word, message, error) = match verdict {
        Verdict::BadRequest(error) => (
            StatusCode::BAD_REQUEST,
            "error",
            "Invalid request".to_string(),
            error,
        ),
        Verdict::Records { failed: 0, .. } => (
            StatusCode::OK,
            "success",
            "Records uploaded successfully".to_string(),
            String::new(),
        ),
        Verdict::Records {
            total,
            failed,
            error,
        } if failed < total => (
            StatusCode::MULTI_STATUS,
            "partial",
            format!("{} of {total} records uploaded", total - failed),
            error,
        ),
        Verdict::Records { error, .. } => (
            StatusCode::BAD_REQUEST,
            "error",
            "No records uploaded".to_string(),
            error,
        ),
    };
    let env = Envelope {
        request_id: &request_id,
        ty: &t.name,
        batches: [BatchEntry {
            batch: 0,
            status: status.as_u16(),
            data: BatchData {
                status: word,
                ty: &t.name,
                message: &message,
                request_id: &request_id,
                batch_id: &batch_id,
                error: &error,
            },
        }],
    };
    json(
        status,
        serde_json::to_vec(&env).expect("envelope serialises"),
    )
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_json(status: StatusCode, error: &str, message: &str) -> Resp {
    let body = serde_json::json!({ "error": error, "message": message });
    json(status, body.to_string())
}

// ---- control endpoints ----------------------------------------------------

/// Body of `POST /_mock/faults`; absent fields keep their value.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FaultsBody {
    #[serde(default)]
    fail_rate: Option<f64>,
    #[serde(default)]
    throttle_rate: Option<f64>,
    #[serde(default)]
    drop_rate: Option<f64>,
    #[serde(default)]
    latency_ms: Option<u64>,
}

async fn control(shared: &Shared, method: &Method, rest: &str, body: Incoming) -> Resp {
    match (method, rest) {
        (&Method::GET, "stats") => json(
            StatusCode::OK,
            serde_json::to_vec(&shared.stats()).expect("stats serialise"),
        ),
        (&Method::GET, r) if r.starts_with("records/") => {
            let name = &r["records/".len()..];
            let Some(ty) = schema().type_id(name) else {
                return error_json(
                    StatusCode::NOT_FOUND,
                    "Not Found",
                    &format!("unknown type `{name}`"),
                );
            };
            let records = shared.store.records_json(ty);
            let mut out =
                Vec::with_capacity(2 + records.iter().map(|r| r.len() + 1).sum::<usize>());
            out.push(b'[');
            for (i, r) in records.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(r);
            }
            out.push(b']');
            json(StatusCode::OK, out)
        }
        (&Method::POST, "reset") => {
            shared.reset();
            json(StatusCode::OK, r#"{"status":"reset"}"#)
        }
        (&Method::POST, "faults") => {
            let body = match read_body(body).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match set_faults_from(shared, &body) {
                Ok(now) => json(
                    StatusCode::OK,
                    serde_json::to_vec(&now).expect("serialises"),
                ),
                Err(msg) => error_json(StatusCode::BAD_REQUEST, "Bad Request", &msg),
            }
        }
        _ => error_json(
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("no route for {method} /_mock/{rest}"),
        ),
    }
}

fn set_faults_from(shared: &Shared, body: &[u8]) -> Result<FaultsBody, String> {
    let req: FaultsBody = serde_json::from_slice(body).map_err(|e| {
        format!(
            "expected {{\"fail_rate\":0.1,\"throttle_rate\":0,\"drop_rate\":0,\"latency_ms\":0}}: {e}"
        )
    })?;
    let mut f = shared.faults.lock();
    let fail = check_rate("fail_rate", req.fail_rate.unwrap_or(f.fail_rate))?;
    let throttle = check_rate(
        "throttle_rate",
        req.throttle_rate.unwrap_or(f.throttle_rate),
    )?;
    let drop = check_rate("drop_rate", req.drop_rate.unwrap_or(f.drop_rate))?;
    f.fail_rate = fail;
    f.throttle_rate = throttle;
    f.drop_rate = drop;
    if let Some(ms) = req.latency_ms {
        f.latency = Duration::from_millis(ms);
    }
    Ok(FaultsBody {
        fail_rate: Some(f.fail_rate),
        throttle_rate: Some(f.throttle_rate),
        drop_rate: Some(f.drop_rate),
        latency_ms: Some(f.latency.as_millis() as u64),
    })
}
