//! Sending one type's records: cutting request-sized batches, and running
//! each batch's [`Isolator`] over the API client.
//!
//! Every request an isolation asks for is sent at once; the client bounds
//! how many are in flight (`api.concurrency`) and paces them
//! (`api.requests_per_minute`). The verdicts are those of
//! [`super::isolate`]: a record is rejected only by an answer to a request
//! holding it alone. Shutdown abandons a batch (`None`): nothing is known
//! of its records, which stay unconfirmed and are read again after restart.

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::model::schema::TypeId;
use crate::sink::client::{ApiClient, Outcome};
use crate::sink::isolate::{Answer, Isolator, Verdict};

/// A record ready to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Index in the caller's list.
    pub index: usize,
    /// The record's JSON.
    pub json: Bytes,
    /// Its Cobi key (for matching keys named in errors).
    pub cobi_key: Option<String>,
    /// One of the likeliest failures ([`super::screen`]): scanned
    /// separately when its batch is rejected.
    pub suspect: bool,
}

/// Length of `{"records":[` plus `]}`.
const ENVELOPE_BYTES: usize = 14;

/// Builds `{"records":[…]}` from the records at `positions`.
pub fn batch_body(records: &[Outgoing], positions: &[u32]) -> Bytes {
    let len: usize = positions
        .iter()
        .map(|&i| records[i as usize].json.len() + 1)
        .sum::<usize>()
        + ENVELOPE_BYTES;
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(b"{\"records\":[");
    for (n, &i) in positions.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&records[i as usize].json);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// Cuts records into request-sized batches (records and body bytes).
pub fn cut_batches(
    records: Vec<Outgoing>,
    max_records: usize,
    max_bytes: usize,
) -> Vec<Vec<Outgoing>> {
    let mut out = Vec::new();
    let mut cur: Vec<Outgoing> = Vec::new();
    let mut bytes = ENVELOPE_BYTES;
    for r in records {
        let size = r.json.len() + 1;
        if !cur.is_empty() && (cur.len() >= max_records || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = ENVELOPE_BYTES;
        }
        bytes += size;
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Sends a batch until every record has a verdict. Returns `(index,
/// verdict)` per record and the number of requests, or `None` if shutdown
/// abandoned it.
pub async fn deliver_batch(
    client: &ApiClient,
    ty: TypeId,
    records: &[Outgoing],
) -> Option<(Vec<(usize, Verdict)>, usize)> {
    let mut iso = Isolator::new(records);
    let mut running = FuturesUnordered::new();
    while !iso.is_done() {
        while let Some(req) = iso.next_request() {
            let body = batch_body(records, &req.records);
            running.push(async move { (req.id, client.send(ty, body).await) });
        }
        let (id, outcome) = running
            .next()
            .await
            .expect("an unfinished isolation has a request in flight");
        let answer = match outcome {
            Outcome::Accepted => Answer::Accepted,
            Outcome::Rejected(e) => Answer::Rejected(e),
            Outcome::Abandoned => return None,
        };
        iso.answer(id, answer);
    }
    let requests = iso.requests();
    let verdicts = records.iter().map(|r| r.index).zip(iso.verdicts());
    Some((verdicts.collect(), requests))
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

    fn rec(i: usize, json: &'static [u8]) -> Outgoing {
        Outgoing {
            index: i,
            json: Bytes::from_static(json),
            cobi_key: None,
            suspect: false,
        }
    }

    #[test]
    fn bodies_hold_the_chosen_records() {
        let recs = [rec(0, b"{\"a\":1}"), rec(1, b"{\"b\":2}"), rec(2, b"{}")];
        assert_eq!(
            &batch_body(&recs, &[0, 1])[..],
            b"{\"records\":[{\"a\":1},{\"b\":2}]}"
        );
        assert_eq!(&batch_body(&recs, &[2])[..], b"{\"records\":[{}]}");
    }

    #[test]
    fn batches_respect_count_and_bytes() {
        let sized = |i: usize, len: usize| Outgoing {
            index: i,
            json: Bytes::from(vec![b'x'; len]),
            cobi_key: None,
            suspect: false,
        };
        let lens = |b: Vec<Vec<Outgoing>>| b.iter().map(|b| b.len()).collect::<Vec<_>>();
        let b = cut_batches((0..10).map(|i| sized(i, 10)).collect(), 4, 1 << 20);
        assert_eq!(lens(b), [4, 4, 2]);
        // 14 bytes of envelope + 11 per record: 3 records fit in 50 bytes.
        let b = cut_batches((0..7).map(|i| sized(i, 10)).collect(), 100, 50);
        assert_eq!(lens(b), [3, 3, 1]);
        // A record larger than max_bytes still goes, alone.
        let b = cut_batches(vec![sized(0, 100), sized(1, 1)], 100, 50);
        assert_eq!(lens(b), [1, 1]);
    }
}
