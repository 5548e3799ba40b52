//! What each API answer gets (DESIGN.md §5), as pure functions.
//!
//! [`classify`] maps an HTTP answer to an [`Action`]; [`backoff`] computes
//! retry delays (exponential, full jitter: uniform between zero and
//! `initial_backoff·2^attempt`, at most `max_backoff`); [`retry_delay`]
//! never waits less than the server's `Retry-After` ([`parse_retry_after`]).
//! Table tests below pin every row of the design's table.
//!
//! Only the API's own answer counts as delivered: a 200/201 carrying its
//! JSON envelope (one JSON object per interaction). A redirect (never
//! followed) or a 2xx without the envelope — a login page, a proxy's
//! answer, a wrong `api.base_url` — is [`Action::NotTheApi`]: nothing is
//! delivered, delivery pauses as for a rejected key.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Every record was accepted.
    Delivered,
    /// Some or all records were rejected (207, 400, 413, 422, or a 200 whose
    /// per-batch status says error): split and re-send to isolate them.
    Split {
        /// The API's error text.
        error: String,
    },
    /// The answer is not the Cobi API's (a redirect, or a 2xx without its
    /// envelope): pause, as for a rejected key, until `api.base_url` is
    /// fixed.
    NotTheApi {
        /// The HTTP status.
        status: u16,
        /// The redirect's `Location`, if any.
        location: Option<String>,
        /// What was wrong, for logs and `/readyz`.
        detail: String,
    },
    /// The key is missing, wrong or not permitted (401/403): pause.
    AuthFailed {
        /// 401 or 403.
        status: u16,
        /// The API's message.
        message: String,
    },
    /// Try the same request again later.
    Retry {
        /// Server-requested delay (`Retry-After`).
        after: Option<Duration>,
        /// Why, for logs and metrics.
        reason: String,
        /// Whether an operator must act (an unexpected status such as 404).
        unexpected: bool,
    },
}

#[derive(Deserialize)]
struct Envelope {
    /// Present (possibly empty) in the API's envelope.
    #[serde(default)]
    batches: Option<Vec<BatchEntry>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct BatchEntry {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    data: Option<BatchData>,
}

#[derive(Deserialize)]
struct BatchData {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Errors named by the envelope (per-batch `data.error`, or top-level
/// `error`/`message`), joined. Empty when the body says nothing.
pub fn envelope_error(body: &[u8]) -> String {
    let Ok(env) = serde_json::from_slice::<Envelope>(body) else {
        return String::from_utf8_lossy(&body[..body.len().min(2000)])
            .trim()
            .to_string();
    };
    let mut parts: Vec<String> = env
        .batches
        .iter()
        .flatten()
        .filter_map(|b| b.data.as_ref())
        .filter_map(|d| {
            d.error
                .clone()
                .filter(|e| !e.is_empty())
                .or(d.message.clone())
        })
        .filter(|e| !e.is_empty())
        .collect();
    if parts.is_empty() {
        if let Some(e) = env.error.filter(|e| !e.is_empty()) {
            parts.push(e);
        }
        if let Some(m) = env.message.filter(|m| !m.is_empty()) {
            parts.push(m);
        }
    }
    parts.join("; ")
}

/// What a 2xx body is.
#[derive(Debug, PartialEq, Eq)]
enum Body {
    /// The API's envelope, every batch successful.
    Success,
    /// The API's envelope reporting a failed batch.
    Failed,
    /// Not the API's envelope.
    Foreign,
}

/// Reads a 2xx body: `batch` endpoints answer the envelope (an object with
/// `batches`), the interactions endpoint the created object.
fn read_2xx(body: &[u8], batch: bool) -> Body {
    if !batch {
        return match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(_)) => Body::Success,
            _ => Body::Foreign,
        };
    }
    let Ok(env) = serde_json::from_slice::<Envelope>(body) else {
        return Body::Foreign;
    };
    let Some(batches) = env.batches else {
        return Body::Foreign;
    };
    let failed = batches.iter().any(|b| {
        b.status.is_some_and(|s| !(200..300).contains(&s))
            || b.data
                .as_ref()
                .and_then(|d| d.status.as_deref())
                .is_some_and(|s| s == "error" || s == "partial")
    });
    if failed {
        Body::Failed
    } else {
        Body::Success
    }
}

/// The start of a body, printable, for saying what answered instead of
/// the API.
fn body_start(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(60)]);
    let t: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let t = t.trim();
    if t.is_empty() {
        "an empty body".into()
    } else {
        format!("a body starting `{t}`")
    }
}

/// An answer as [`classify`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: &'a [u8],
    /// The raw `Retry-After` header.
    pub retry_after: Option<&'a str>,
    /// The raw `Location` header.
    pub location: Option<&'a str>,
    /// Whether the endpoint takes batches (all but interactions).
    pub batch: bool,
}

/// Classifies an answer; `now` is the clock used for HTTP-date
/// `Retry-After` values.
pub fn classify(a: Answer<'_>, now: SystemTime) -> Action {
    let Answer {
        status,
        body,
        retry_after,
        location,
        batch,
    } = a;
    match status {
        200..=299 if status != 207 => match read_2xx(body, batch) {
            Body::Success => Action::Delivered,
            Body::Failed => Action::Split {
                error: envelope_error(body),
            },
            Body::Foreign => Action::NotTheApi {
                status,
                location: None,
                detail: format!(
                    "HTTP {status} with {} instead of the Cobi API's JSON answer: \
                     api.base_url does not point at the Cobi Data API (a login page or a proxy?)",
                    body_start(body)
                ),
            },
        },
        300..=399 => Action::NotTheApi {
            status,
            location: location.map(str::to_string),
            detail: format!(
                "HTTP {status} redirect to {} (redirects are not followed): set api.base_url to \
                 the address the API answers at",
                location.map_or_else(|| "nowhere".to_string(), |l| format!("`{l}`"))
            ),
        },
        207 | 400 | 413 | 422 => Action::Split {
            error: {
                let e = envelope_error(body);
                if e.is_empty() {
                    format!("HTTP {status}")
                } else {
                    e
                }
            },
        },
        401 | 403 => Action::AuthFailed {
            status,
            message: envelope_error(body),
        },
        408 | 425 | 429 | 500..=599 => Action::Retry {
            after: retry_after.and_then(|h| parse_retry_after(h, now)),
            reason: format!("HTTP {status}"),
            unexpected: false,
        },
        _ => Action::Retry {
            after: retry_after.and_then(|h| parse_retry_after(h, now)),
            reason: format!(
                "unexpected HTTP {status} (check api.base_url): {}",
                envelope_error(body)
            ),
            unexpected: true,
        },
    }
}

/// Longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(h: &str, now: SystemTime) -> Option<Duration> {
    let h = h.trim();
    let d = if let Ok(secs) = h.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(h).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// Delay before retry number `attempt` (0-based), full jitter: uniform in
/// `[0, min(max, initial·2^attempt)]`. `unit` is a random number in
/// `[0, 1)`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let cap = initial
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// The delay of a retry: [`backoff`], but never less than the server's
/// `Retry-After` (so `Retry-After: 0` still backs off).
pub fn retry_delay(
    after: Option<Duration>,
    attempt: u32,
    initial: Duration,
    max: Duration,
    unit: f64,
) -> Duration {
    backoff(attempt, initial, max, unit).max(after.unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"request_id":"r","type":"shops","batches":[{"batch":0,"status":200,"data":{"status":"success","type":"shops","message":"Records uploaded successfully","request_id":"r","batch_id":"b","error":""}}]}"#;
    const PARTIAL_IN_200: &str = r#"{"request_id":"r","type":"shops","batches":[{"batch":0,"status":200,"data":{"status":"success","error":""}},{"batch":1,"status":400,"data":{"status":"error","error":"shop 123 unknown"}}]}"#;
    const PARTIAL: &str = r#"{"request_id":"r","type":"branches","batches":[{"batch":0,"status":207,"data":{"status":"partial","message":"1 failed","error":"branch b1: unknown shop_id"}}]}"#;
    const UNAUTH: &str = r#"{"error":"Unauthorized","message":"Invalid or missing API key"}"#;

    #[test]
    fn the_answer_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cases: Vec<(u16, &str, Option<&str>, Action)> = vec![
            (200, OK, None, Action::Delivered),
            (
                200,
                PARTIAL_IN_200,
                None,
                Action::Split {
                    error: "shop 123 unknown".into(),
                },
            ),
            (
                207,
                PARTIAL,
                None,
                Action::Split {
                    error: "branch b1: unknown shop_id".into(),
                },
            ),
            (
                400,
                r#"{"batches":[{"status":400,"data":{"status":"error","error":"all bad"}}]}"#,
                None,
                Action::Split {
                    error: "all bad".into(),
                },
            ),
            (
                400,
                "",
                None,
                Action::Split {
                    error: "HTTP 400".into(),
                },
            ),
            (
                413,
                "too big",
                None,
                Action::Split {
                    error: "too big".into(),
                },
            ),
            (
                401,
                UNAUTH,
                None,
                Action::AuthFailed {
                    status: 401,
                    message: "Unauthorized; Invalid or missing API key".into(),
                },
            ),
            (
                403,
                "",
                None,
                Action::AuthFailed {
                    status: 403,
                    message: String::new(),
                },
            ),
            (
                408,
                "",
                None,
                Action::Retry {
                    after: None,
                    reason: "HTTP 408".into(),
                    unexpected: false,
                },
            ),
            (
                429,
                "",
                Some("7"),
                Action::Retry {
                    after: Some(Duration::from_secs(7)),
                    reason: "HTTP 429".into(),
                    unexpected: false,
                },
            ),
            (
                429,
                "",
                Some("Tue, 14 Nov 2023 22:13:40 GMT"),
                Action::Retry {
                    after: Some(Duration::from_secs(20)),
                    reason: "HTTP 429".into(),
                    unexpected: false,
                },
            ),
            (
                500,
                "",
                None,
                Action::Retry {
                    after: None,
                    reason: "HTTP 500".into(),
                    unexpected: false,
                },
            ),
            (
                503,
                "",
                Some("garbage"),
                Action::Retry {
                    after: None,
                    reason: "HTTP 503".into(),
                    unexpected: false,
                },
            ),
            (
                404,
                "no route",
                None,
                Action::Retry {
                    after: None,
                    reason: "unexpected HTTP 404 (check api.base_url): no route".into(),
                    unexpected: true,
                },
            ),
        ];
        for (status, body, ra, want) in cases {
            let a = Answer {
                status,
                body: body.as_bytes(),
                retry_after: ra,
                location: None,
                batch: true,
            };
            assert_eq!(classify(a, now), want, "HTTP {status} {body}");
        }
    }

    /// Only the API's own answer is a delivery: redirects and 2xx answers
    /// without its envelope pause delivery.
    #[test]
    fn redirects_and_foreign_2xx_are_not_deliveries() {
        let now = SystemTime::UNIX_EPOCH;
        let html = "<!DOCTYPE html><html><body>Sign in</body></html>";
        // (status, location, what `detail` holds) of a paused delivery;
        // `None`: delivered.
        type Paused<'a> = Option<(u16, Option<&'a str>, &'a str)>;
        // (status, body, location, batch endpoint) -> outcome
        let cases: Vec<(u16, &str, Option<&str>, bool, Paused)> = vec![
            (200, OK, None, true, None),
            (200, r#"{"batches":[]}"#, None, true, None),
            (
                201,
                r#"{"interaction_type":"SHARE","id":"x"}"#,
                None,
                false,
                None,
            ),
            (200, html, None, true, Some((200, None, "`<!DOCTYPE html>"))),
            (200, html, None, false, Some((200, None, "login page"))),
            (200, "{}", None, true, Some((200, None, "api.base_url"))),
            (
                201,
                r#"{"ok":true}"#,
                None,
                true,
                Some((201, None, "instead of")),
            ),
            (204, "", None, true, Some((204, None, "an empty body"))),
            (200, "[1]", None, false, Some((200, None, "`[1]`"))),
            (
                301,
                "",
                Some("https://api.example/v1/data/shops"),
                true,
                Some((
                    301,
                    Some("https://api.example/v1/data/shops"),
                    "redirect to `https://api.example/v1/data/shops`",
                )),
            ),
            (
                302,
                "",
                Some("/login"),
                true,
                Some((302, Some("/login"), "not followed")),
            ),
            (
                307,
                "",
                Some("https://x/"),
                false,
                Some((307, Some("https://x/"), "HTTP 307")),
            ),
            (
                308,
                "",
                None,
                true,
                Some((308, None, "redirect to nowhere")),
            ),
        ];
        for (status, body, location, batch, want) in cases {
            let got = classify(
                Answer {
                    status,
                    body: body.as_bytes(),
                    retry_after: None,
                    location,
                    batch,
                },
                now,
            );
            match (want, got) {
                (None, Action::Delivered) => {}
                (
                    Some((ws, wl, needle)),
                    Action::NotTheApi {
                        status: s,
                        location: l,
                        detail,
                    },
                ) => {
                    assert_eq!((s, l.as_deref()), (ws, wl), "HTTP {status} {body}");
                    assert!(detail.contains(needle), "HTTP {status} {body}: {detail}");
                }
                (want, got) => {
                    panic!("HTTP {status} {body} (batch {batch}): want {want:?}, got {got:?}")
                }
            }
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        // A date in the past means "now".
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_is_full_jitter_and_bounded() {
        let i = Duration::from_millis(500);
        let m = Duration::from_secs(300);
        // (attempt, unit) -> delay: uniform in [0, min(max, initial·2^attempt)].
        let cases: &[(u32, f64, Duration)] = &[
            (0, 0.0, Duration::ZERO),
            (0, 0.5, Duration::from_millis(250)),
            (0, 1.0, i),
            (1, 1.0, Duration::from_secs(1)),
            (3, 1.0, Duration::from_secs(4)),
            (3, 0.5, Duration::from_secs(2)),
            (40, 1.0, m),
            (40, 0.0, Duration::ZERO),
            (40, 2.0, m),
        ];
        for &(attempt, unit, want) in cases {
            assert_eq!(
                backoff(attempt, i, m, unit),
                want,
                "attempt {attempt}, unit {unit}"
            );
        }
        for a in 0..64 {
            for u in [0.0, 0.3, 0.999] {
                assert!(backoff(a, i, m, u) <= m, "attempt {a}");
            }
        }
        // The first retry is not always `initial` (no lock-step retries).
        assert_ne!(backoff(0, i, m, 0.1), backoff(0, i, m, 0.9));
    }

    #[test]
    fn retry_after_is_a_floor_and_zero_still_backs_off() {
        let i = Duration::from_millis(500);
        let m = Duration::from_secs(300);
        let nine = Some(Duration::from_secs(9));
        assert_eq!(retry_delay(nine, 0, i, m, 0.0), Duration::from_secs(9));
        assert_eq!(retry_delay(nine, 10, i, m, 1.0), Duration::from_secs(300));
        // `Retry-After: 0` answered every time: the delays still grow.
        let zero = Some(Duration::ZERO);
        assert_eq!(retry_delay(zero, 0, i, m, 0.5), Duration::from_millis(250));
        assert_eq!(retry_delay(zero, 6, i, m, 0.5), Duration::from_secs(16));
        assert_eq!(retry_delay(None, 6, i, m, 0.5), Duration::from_secs(16));
    }
}
