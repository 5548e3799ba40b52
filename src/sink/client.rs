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
    key_source: KeySource,
    key: RwLock<Option<Secret>>,
    settings: ApiSettings,
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
    ) -> Result<ApiClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(settings.concurrency * 2)
            // A redirect is a misconfiguration, not a delivery (a POST
            // would become a GET, or reach another host).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cobi-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let limiter = NonZeroU32::new(settings.requests_per_minute)
            .map(|n| RateLimiter::direct(Quota::per_minute(n)));
        let key = settings.key.load().ok();
        Ok(ApiClient {
            http,
            base_url: settings.base_url.clone(),
            key_source: settings.key.clone(),
            key: RwLock::new(key),
            settings: settings.clone(),
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

    fn current_key(&self) -> Option<Secret> {
        self.key.read().expect("lock").clone()
    }

    /// Re-reads the key; true if it changed.
    fn reload_key(&self) -> bool {
        let new = self.key_source.load().ok();
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
            let Some(key) = self.current_key() else {
                // Nothing goes out unauthenticated.
                let message = format!("no API key ({})", self.key_source.describe());
                if !self.pause_for_key(None, &message).await {
                    return Outcome::Abandoned;
                }
                attempt = 0;
                continue;
            };
            if let Some(l) = &self.limiter {
                tokio::select! {
                    _ = l.until_ready() => {}
                    _ = self.stop.cancelled() => return Outcome::Abandoned,
                }
            }
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
                        _ = tokio::time::sleep(self.settings.max_backoff) => {}
                        _ = self.stop.cancelled() => return Outcome::Abandoned,
                    }
                    attempt = 0;
                }
                Action::AuthFailed { status, message } => {
                    if !self.pause_for_key(Some(status), &message).await {
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
                        self.settings.initial_backoff,
                        self.settings.max_backoff,
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

    /// The key is missing or rejected: says so once (ERROR), marks the API
    /// not ready, and waits for a new key. False on shutdown.
    /// (`status`: the API's 401/403; `None`: no key to send.)
    async fn pause_for_key(&self, status: Option<u16>, message: &str) -> bool {
        if !self.auth_failed.swap(true, Ordering::Relaxed) {
            match status {
                Some(status) => error!(
                    status,
                    key_source = %self.key_source.describe(),
                    api_message = %message,
                    "cobi api rejected the api key; delivery paused, nothing is dropped. \
                     put a valid key in the key source; it is re-read every second"
                ),
                None => error!(
                    key_source = %self.key_source.describe(),
                    "no cobi api key; nothing is sent until one is present (delivery paused, \
                     nothing is dropped). put the key in the key source; it is re-read every second"
                ),
            }
        }
        let why = match status {
            Some(s) => format!("HTTP {s}: API key rejected"),
            None => message.to_string(),
        };
        self.health.set_api(false, Some(why));
        self.wait_for_key().await
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
        let until = Instant::now() + self.settings.max_backoff;
        while Instant::now() < until {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stop.cancelled() => return false,
            }
            if self.reload_key() {
                info!(key_source = %self.key_source.describe(), "api key changed; retrying");
                return true;
            }
        }
        self.reload_key();
        true
    }

    /// One request, no retries: for `check` (proves the key with an empty
    /// batch). Returns the status.
    pub async fn probe(&self, ty: TypeId) -> Result<u16, String> {
        let key = self.current_key().ok_or_else(|| "no API key".to_string())?;
        let resp = self
            .http
            .post(self.url(ty))
            .bearer_auth(key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(r#"{"records":[]}"#)
            .send()
            .await
            .map_err(|e| describe_reqwest(&e))?;
        Ok(resp.status().as_u16())
    }
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
