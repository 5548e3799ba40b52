//! The HTTP client of the Cobi Data API (reqwest + rustls).
//!
//! [`ApiClient::send`] posts one body and keeps at it until the answer is a
//! verdict on the records: accepted, or rejected (for the caller to split).
//! Transient failures (408/429/5xx, timeouts, connection errors) are
//! retried forever with backoff; 401/403 pauses delivery, marks the API not
//! ready, logs one ERROR and re-reads the key (every second, retrying as
//! soon as it changes, and at least every `max_backoff`). With no key at
//! all nothing is sent: it waits the same way. Redirects are never
//! followed: a 3xx, or a 2xx that is not the API's answer, pauses delivery
//! the same way (ERROR naming the status and `Location`, not ready, a retry
//! every `max_backoff`) — nothing counts as delivered until the API itself
//! answers. Only shutdown makes it give up ([`Outcome::Abandoned`]), which
//! leaves the records unconfirmed so they are read again after restart.
//!
//! Requests in flight are bounded by `api.concurrency` and paced by
//! `api.requests_per_minute`.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::secret::{KeySource, Secret};
use crate::config::ApiSettings;
use crate::model::schema::{schema, TypeId};
use crate::ops::health::Health;
use crate::ops::metrics::{Metrics, RequestLabel};
use crate::sink::policy::{classify, retry_delay, Action, Answer};

/// The verdict on one request's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All accepted.
    Accepted,
    /// Rejected (some or all); the text is the API's error.
    Rejected(String),
    /// Given up because of shutdown: nothing is known.
    Abandoned,
}

/// A client shared by every sending task.
pub struct ApiClient {
    http: reqwest::Client,
    base_url: String,
    key_source: RwLock<KeySource>,
    /// `(initial_backoff, max_backoff)`: changeable on SIGHUP.
    backoff: RwLock<(Duration, Duration)>,
    key: RwLock<Option<Secret>>,
    permits: Semaphore,
    limiter: Option<DefaultDirectRateLimiter>,
    auth_failed: AtomicBool,
    misdirected: AtomicBool,
    unexpected_logged: AtomicBool,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl ApiClient {
    /// Builds the client. The key is read now if possible (a missing key is
    /// not fatal: it behaves like a 401 until one appears).
    pub fn new(
        settings: &ApiSettings,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<ApiClient, String> {
        let http = http_client(settings)?;
        let limiter = NonZeroU32::new(settings.requests_per_minute)
            .map(|n| RateLimiter::direct(Quota::per_minute(n)));
        let key = settings.key.load().ok();
        Ok(ApiClient {
            http,
            base_url: settings.base_url.clone(),
            key_source: RwLock::new(settings.key.clone()),
            backoff: RwLock::new((settings.initial_backoff, settings.max_backoff)),
            key: RwLock::new(key),
            permits: Semaphore::new(settings.concurrency),
            limiter,
            auth_failed: AtomicBool::new(false),
            misdirected: AtomicBool::new(false),
            unexpected_logged: AtomicBool::new(false),
            health,
            metrics,
            stop,
        })
    }

    /// The full URL of a type's endpoint.
    pub fn url(&self, ty: TypeId) -> String {
        format!("{}{}", self.base_url, schema().ty(ty).path)
    }

    fn key_source(&self) -> KeySource {
        self.key_source.read().expect("lock").clone()
    }

    fn backoff(&self) -> (Duration, Duration) {
        *self.backoff.read().expect("lock")
    }

    /// Switches to another key source (SIGHUP) and reads the key from it.
    pub fn set_key_source(&self, source: KeySource) {
        *self.key_source.write().expect("lock") = source;
        self.reload_key();
    }

    /// Changes the retry delays (SIGHUP); they apply from the next retry.
    pub fn set_backoff(&self, initial: Duration, max: Duration) {
        *self.backoff.write().expect("lock") = (initial, max);
    }

    fn current_key(&self) -> Option<Secret> {
        self.key.read().expect("lock").clone()
    }

    /// Re-reads the key; true if it changed.
    fn reload_key(&self) -> bool {
        let new = self.key_source().load().ok();
        let mut k = self.key.write().expect("lock");
        if *k != new {
            *k = new;
            true
        } else {
            false
        }
    }

    /// Posts `body` to `ty`'s endpoint until there is a verdict.
    pub async fn send(&self, ty: TypeId, body: Bytes) -> Outcome {
        let label = |status: &str| RequestLabel {
            r#type: schema().ty(ty).name.clone(),
            status: status.to_string(),
        };
        let mut attempt: u32 = 0;
        loop {
            if self.stop.is_cancelled() {
                return Outcome::Abandoned;
            }
            if let Some(l) = &self.limiter {
                tokio::select! {
                    _ = l.until_ready() => {}
                    _ = self.stop.cancelled() => return Outcome::Abandoned,
                }
            }
            // Never a request without a key: wait for one as for a 401.
            let Some(key) = self.current_key() else {
                if !self.auth_failed.swap(true, Ordering::Relaxed) {
                    let source = self.key_source();
                    error!(
                        key_source = %source.describe(),
                        fix = source.rotation_hint(),
                        "no API key found; delivery paused, nothing is sent or dropped"
                    );
                }
                self.health.set_api(false, Some("no API key found".into()));
                if !self.wait_for_key().await {
                    return Outcome::Abandoned;
                }
                attempt = 0;
                continue;
            };
            let answer = {
                let _permit = tokio::select! {
                    p = self.permits.acquire() => p.expect("semaphore open"),
                    _ = self.stop.cancelled() => return Outcome::Abandoned,
                };
                let req = self
                    .http
                    .post(self.url(ty))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .bearer_auth(key.expose())
                    .body(body.clone());
                let exchange = async {
                    match req.send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let header = |h| {
                                resp.headers()
                                    .get(h)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let retry_after = header(reqwest::header::RETRY_AFTER);
                            let location = header(reqwest::header::LOCATION);
                            match resp.bytes().await {
                                Ok(b) => Ok((status, b, retry_after, location)),
                                Err(e) => Err(format!("reading the answer failed: {e}")),
                            }
                        }
                        Err(e) => Err(describe_reqwest(&e)),
                    }
                };
                // Shutdown's hard stop abandons a request in flight too (its
                // records were never confirmed, so they are read again).
                tokio::select! {
                    a = exchange => a,
                    _ = self.stop.cancelled() => return Outcome::Abandoned,
                }
            };
            let action = match &answer {
                Ok((status, body, retry_after, location)) => {
                    self.metrics
                        .requests
                        .get_or_create(&label(&status.to_string()))
                        .inc();
                    let a = Answer {
                        status: *status,
                        body,
                        retry_after: retry_after.as_deref(),
                        location: location.as_deref(),
                        batch: schema().ty(ty).batch,
                    };
                    classify(a, SystemTime::now())
                }
                Err(e) => {
                    self.metrics.requests.get_or_create(&label("error")).inc();
                    Action::Retry {
                        after: None,
                        reason: e.clone(),
                        unexpected: false,
                    }
                }
            };
            match action {
                Action::Delivered => {
                    self.api_recovered();
                    return Outcome::Accepted;
                }
                Action::Split { error } => {
                    self.api_recovered();
                    return Outcome::Rejected(error);
                }
                Action::NotTheApi {
                    status,
                    location,
                    detail,
                } => {
                    if !self.misdirected.swap(true, Ordering::Relaxed) {
                        error!(
                            type = %schema().ty(ty).name,
                            status,
                            location = location.as_deref().unwrap_or(""),
                            url = %self.url(ty),
                            "{detail}; delivery paused, nothing is dropped or marked delivered; \
                             retrying every api.max_backoff — fix api.base_url and restart"
                        );
                    }
                    self.health.set_api(false, Some(detail));
                    tokio::select! {
                        _ = tokio::time::sleep(self.backoff().1) => {}
                        _ = self.stop.cancelled() => return Outcome::Abandoned,
                    }
                    attempt = 0;
                }
                Action::AuthFailed { status, message } => {
                    if !self.auth_failed.swap(true, Ordering::Relaxed) {
                        let source = self.key_source();
                        error!(
                            status,
                            key_source = %source.describe(),
                            api_message = %message,
                            fix = source.rotation_hint(),
                            "cobi api rejected the api key; delivery paused, nothing is dropped"
                        );
                    }
                    self.health
                        .set_api(false, Some(format!("HTTP {status}: API key rejected")));
                    if !self.wait_for_key().await {
                        return Outcome::Abandoned;
                    }
                    attempt = 0;
                }
                Action::Retry {
                    after,
                    reason,
                    unexpected,
                } => {
                    self.metrics.retries.get_or_create(&Metrics::ty(ty)).inc();
                    if unexpected {
                        if !self.unexpected_logged.swap(true, Ordering::Relaxed) {
                            error!(type = %schema().ty(ty).name, %reason, "unexpected answer from the cobi api; retrying");
                        }
                    } else if attempt >= 3 {
                        warn!(type = %schema().ty(ty).name, %reason, attempt, "cobi api request failed; retrying");
                    }
                    if attempt >= 3 || unexpected {
                        self.health.set_api(false, Some(reason));
                    }
                    let delay = retry_delay(
                        after,
                        attempt,
                        self.backoff().0,
                        self.backoff().1,
                        rand::random::<f64>(),
                    );
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => return Outcome::Abandoned,
                    }
                }
            }
        }
    }

    fn api_recovered(&self) {
        if self.auth_failed.swap(false, Ordering::Relaxed) {
            info!("cobi api accepts the api key again; delivery resumed");
        }
        if self.misdirected.swap(false, Ordering::Relaxed) {
            info!("the cobi api answers at api.base_url again; delivery resumed");
        }
        self.unexpected_logged.store(false, Ordering::Relaxed);
        if !self.health.set_api(true, None) {
            info!("cobi api reachable again");
        }
    }

    /// Waits until the key source changes or `max_backoff` passes. False on
    /// shutdown.
    async fn wait_for_key(&self) -> bool {
        let until = Instant::now() + self.backoff().1;
        while Instant::now() < until {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stop.cancelled() => return false,
            }
            if self.reload_key() {
                info!(key_source = %self.key_source().describe(), "api key changed; retrying");
                return true;
            }
        }
        self.reload_key();
        true
    }

    /// One request, no retries, no redirects followed: for `check` (proves
    /// the key with an empty batch). Never sent without a key.
    pub async fn probe(&self, ty: TypeId) -> Result<ProbeAnswer, String> {
        self.reload_key();
        let key = self
            .current_key()
            .ok_or_else(|| format!("no API key found ({})", self.key_source().describe()))?;
        let resp = self
            .http
            .post(self.url(ty))
            .bearer_auth(key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(r#"{"records":[]}"#)
            .send()
            .await
            .map_err(|e| describe_reqwest(&e))?;
        let header = |h: reqwest::header::HeaderName| {
            resp.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let status = resp.status().as_u16();
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let location = header(reqwest::header::LOCATION);
        let body = resp.bytes().await.unwrap_or_default();
        Ok(ProbeAnswer {
            status,
            content_type,
            location,
            body,
        })
    }
}

/// What the API answered to [`ApiClient::probe`].
#[derive(Debug, Clone)]
pub struct ProbeAnswer {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Location` (redirects).
    pub location: Option<String>,
    /// The body.
    pub body: Bytes,
}

/// The HTTP client for `settings`: its timeouts, never following a
/// redirect (DESIGN.md §5: a 3xx is a configuration problem, reported by
/// status and `Location`), and trusting `api.ca_file` besides the web PKI
/// roots. `HTTPS_PROXY` / `NO_PROXY` from the environment are honoured.
pub fn http_client(settings: &ApiSettings) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(settings.concurrency * 2)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cobi-sync/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("api.ca_file: cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("api.ca_file: {}: {e}", path.display()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A short description of a request error (no URL query, no key).
fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "request timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {}", root_cause(e))
    } else {
        format!("request failed: {}", root_cause(e))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
