//! What each API answer gets (DESIGN.md §5), as pure functions.
//!
//! [`classify`] maps an HTTP answer to an [`Action`]; [`backoff`] computes
//! retry delays (exponential, full jitter, between `initial_backoff` and
//! `max_backoff`); [`retry_after`] reads a `Retry-After` header. Table
//! tests below pin every row of the design's table.

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
    #[serde(default)]
    batches: Vec<BatchEntry>,
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

/// Whether a 2xx envelope reports a failed batch.
fn envelope_has_error(body: &[u8]) -> bool {
    let Ok(env) = serde_json::from_slice::<Envelope>(body) else {
        return false;
    };
    env.batches.iter().any(|b| {
        b.status.is_some_and(|s| !(200..300).contains(&s))
            || b.data
                .as_ref()
                .and_then(|d| d.status.as_deref())
                .is_some_and(|s| s == "error" || s == "partial")
    })
}

/// Classifies an answer. `retry_after` is the raw header, `now` the clock
/// used for HTTP-date values.
pub fn classify(status: u16, body: &[u8], retry_after: Option<&str>, now: SystemTime) -> Action {
    match status {
        200..=299 if status != 207 => {
            if envelope_has_error(body) {
                Action::Split {
                    error: envelope_error(body),
                }
            } else {
                Action::Delivered
            }
        }
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

/// Delay before retry number `attempt` (0-based): uniform in
/// `[initial, min(max, initial·2^attempt)]` ("full jitter" bounded below by
/// `initial`). `unit` is a random number in `[0, 1)`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let cap = initial
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    if cap <= initial {
        return cap;
    }
    let span = (cap - initial).as_secs_f64();
    initial + Duration::from_secs_f64(span * unit.clamp(0.0, 1.0))
}

/// The delay of a retry: the server's `Retry-After` when given (never less
/// than it), else [`backoff`].
pub fn retry_delay(
    after: Option<Duration>,
    attempt: u32,
    initial: Duration,
    max: Duration,
    unit: f64,
) -> Duration {
    match after {
        Some(a) => a,
        None => backoff(attempt, initial, max, unit),
    }
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
            (201, "{}", None, Action::Delivered),
            (200, "not json", None, Action::Delivered),
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
            assert_eq!(
                classify(status, body.as_bytes(), ra, now),
                want,
                "HTTP {status} {body}"
            );
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
    fn backoff_is_bounded_and_grows() {
        let i = Duration::from_millis(500);
        let m = Duration::from_secs(300);
        assert_eq!(backoff(0, i, m, 0.0), i);
        assert_eq!(
            backoff(0, i, m, 0.99),
            i,
            "attempt 0 has no room above initial"
        );
        assert_eq!(backoff(1, i, m, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, i, m, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(3, i, m, 0.5), Duration::from_millis(2250));
        assert_eq!(backoff(40, i, m, 1.0), m);
        assert_eq!(backoff(40, i, m, 0.0), i);
        for a in 0..64 {
            for u in [0.0, 0.3, 0.999] {
                let d = backoff(a, i, m, u);
                assert!(d >= i && d <= m, "attempt {a}: {d:?}");
            }
        }
        assert_eq!(
            retry_delay(Some(Duration::from_secs(9)), 0, i, m, 0.0),
            Duration::from_secs(9)
        );
    }
}
