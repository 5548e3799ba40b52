//! Delivering one batch of records and isolating the ones the API rejects.
//!
//! The API's 207/400 answers say only that *some* records failed, in one
//! free-text error (SPEC.md §4.3). [`deliver_batch`] finds them:
//!
//! 1. If the error text names keys of records in the batch, those are the
//!    suspects: the rest is re-sent as one batch and each suspect alone.
//! 2. Otherwise the batch is split in halves, recursively.
//!
//! A record is dead-lettered only when it is rejected *alone*. The number
//! of extra requests per original batch of `n` records is bounded by
//! [`split_budget`]`(n) = 8·⌈log2(n+1)⌉ + 8` (about 100 for 5000 records,
//! enough to isolate ~8 bad records by bisection alone). Once spent, every
//! still-unresolved sub-batch is dead-lettered whole with the batch's error
//! and a note that it was not isolated — those records are kept, and
//! `dlq replay` re-sends them.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::model::schema::TypeId;
use crate::sink::client::{ApiClient, Outcome};

/// A record ready to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Index in the caller's list.
    pub index: usize,
    /// The record's JSON.
    pub json: Bytes,
    /// Its Cobi key (for matching keys named in errors).
    pub cobi_key: Option<String>,
}

/// The verdict on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Accepted,
    /// Rejected; the reason is the API's error.
    Rejected(String),
}

/// Extra requests allowed to isolate failures in a batch of `n`.
pub fn split_budget(n: usize) -> usize {
    8 * (usize::BITS - n.leading_zeros()) as usize + 8
}

/// Builds `{"records":[…]}`.
pub fn batch_body(records: &[&Outgoing]) -> Bytes {
    let len: usize = records.iter().map(|r| r.json.len() + 1).sum::<usize>() + 14;
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(b"{\"records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&r.json);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// Tokens of an error text that look like keys (UUIDs and other words of
/// 8+ characters made of hex digits, letters, digits and dashes).
fn named_keys(error: &str) -> HashSet<&str> {
    error
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '|'))
        .filter(|t| t.len() >= 8)
        .collect()
}

/// Sends a batch; returns each record's verdict (`None` only if abandoned
/// because of shutdown) and the number of requests used.
pub async fn deliver_batch(
    client: &ApiClient,
    ty: TypeId,
    records: Vec<Outgoing>,
) -> (Vec<(usize, Option<Verdict>)>, usize) {
    let mut budget = split_budget(records.len());
    let mut requests = 0;
    let mut out = Vec::with_capacity(records.len());
    let refs: Vec<&Outgoing> = records.iter().collect();
    deliver(client, ty, refs, &mut budget, &mut requests, &mut out, None).await;
    (out, requests)
}

type Boxed<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

fn deliver<'a>(
    client: &'a ApiClient,
    ty: TypeId,
    batch: Vec<&'a Outgoing>,
    budget: &'a mut usize,
    requests: &'a mut usize,
    out: &'a mut Vec<(usize, Option<Verdict>)>,
    known: Option<String>,
) -> Boxed<'a> {
    Box::pin(async move {
        if batch.is_empty() {
            return;
        }
        // `known`: the caller already learnt this exact batch is rejected.
        let outcome = match known {
            Some(e) => Outcome::Rejected(e),
            None => {
                *requests += 1;
                client.send(ty, batch_body(&batch)).await
            }
        };
        let error = match outcome {
            Outcome::Accepted => {
                out.extend(batch.iter().map(|r| (r.index, Some(Verdict::Accepted))));
                return;
            }
            Outcome::Abandoned => {
                out.extend(batch.iter().map(|r| (r.index, None)));
                return;
            }
            Outcome::Rejected(e) => e,
        };
        if batch.len() == 1 {
            out.push((batch[0].index, Some(Verdict::Rejected(error))));
            return;
        }
        if *budget == 0 {
            let reason = format!(
                "{error} (batch rejected; not isolated to single records within the \
                 split budget — replay with `cobi-sync dlq replay`)"
            );
            out.extend(
                batch
                    .iter()
                    .map(|r| (r.index, Some(Verdict::Rejected(reason.clone())))),
            );
            return;
        }
        // 1. Keys named by the error.
        let names = named_keys(&error);
        let (suspects, rest): (Vec<&Outgoing>, Vec<&Outgoing>) = batch.iter().partition(|r| {
            r.cobi_key
                .as_deref()
                .is_some_and(|k| names.contains(k) || k.split('|').any(|p| names.contains(p)))
        });
        if !suspects.is_empty() && !rest.is_empty() {
            *budget = budget.saturating_sub(1);
            deliver(client, ty, rest, budget, requests, out, None).await;
            for s in suspects {
                *budget = budget.saturating_sub(1);
                deliver(client, ty, vec![s], budget, requests, out, None).await;
            }
            return;
        }
        // 2. Halves.
        let mid = batch.len() / 2;
        let mut left = batch;
        let right = left.split_off(mid);
        *budget = budget.saturating_sub(1);
        deliver(client, ty, left, budget, requests, out, None).await;
        *budget = budget.saturating_sub(1);
        deliver(client, ty, right, budget, requests, out, None).await;
    })
}

/// Sends one interaction (one object per request).
pub async fn deliver_single(client: &ApiClient, ty: TypeId, record: &Outgoing) -> Option<Verdict> {
    match client.send(ty, record.json.clone()).await {
        Outcome::Accepted => Some(Verdict::Accepted),
        Outcome::Rejected(e) => Some(Verdict::Rejected(e)),
        Outcome::Abandoned => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grows_with_log_n() {
        assert_eq!(split_budget(1), 16);
        assert_eq!(split_budget(1000), 88);
        assert_eq!(split_budget(5000), 112);
    }

    #[test]
    fn body_and_names() {
        let a = Outgoing {
            index: 0,
            json: Bytes::from_static(b"{\"a\":1}"),
            cobi_key: None,
        };
        let b = Outgoing {
            index: 1,
            json: Bytes::from_static(b"{\"b\":2}"),
            cobi_key: None,
        };
        assert_eq!(
            &batch_body(&[&a, &b])[..],
            b"{\"records\":[{\"a\":1},{\"b\":2}]}"
        );
        let names = named_keys(
            "2 records failed: 550e8400-e29b-41d4-a716-446655440000: unknown shop_id; abc",
        );
        assert!(names.contains("550e8400-e29b-41d4-a716-446655440000"));
        assert!(!names.contains("abc"));
    }
}
