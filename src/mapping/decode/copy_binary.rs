//! The `COPY … TO STDOUT (FORMAT binary)` stream → rows of [`Value`]s.
//!
//! [`CopyBinaryReader`] splits a binary COPY stream, fed in chunks of any
//! size as they arrive, into rows; each field is decoded by
//! [`super::binary`]. Contract as there: pure, no I/O, never panics; every
//! length read from the stream is checked against the bytes present before
//! anything is sliced, and malformed framing is a [`DecodeError`] naming the
//! stream.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use super::binary::decode;
use super::DecodeError;
use crate::mapping::value::{PgType, Value};

/// The 11-byte signature that starts a binary COPY stream.
pub(super) const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags and header extension length.
const COPY_HEADER_LEN: usize = 19;
/// Header flag bits a reader must understand (0–15 critical, 16 = OIDs).
const COPY_CRITICAL_FLAGS: i32 = 0x0001_FFFF;
/// `type_name` of stream-level errors.
const COPY_STREAM: &str = "COPY binary stream";

/// Where a [`CopyBinaryReader`] is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Expecting the fixed 19-byte header.
    Header,
    /// Discarding this many header extension bytes.
    Extension(usize),
    /// Reading tuples.
    Tuples,
    /// The trailer was seen.
    Done,
}

/// How much of the front of the data is one unit (the header or a tuple).
enum Extent {
    /// The unit is complete and this long.
    Complete(usize),
    /// The unit needs at least this many bytes (more than there are).
    Need(usize),
}

/// Incremental parser of a `COPY … TO STDOUT (FORMAT binary)` stream.
///
/// Feed it chunks of any size with [`push`](Self::push) as they arrive and
/// take rows with [`next_row`](Self::next_row). Rows are parsed in place
/// from the received chunks; only a tuple that straddles two chunks is
/// copied, into one reused buffer. Declared lengths are never trusted for
/// allocation.
///
/// A malformed stream (bad signature, flags, field count or length) is an
/// error that every later [`next_row`](Self::next_row) repeats. A value that
/// fails to decode is an error for its row only: the row is consumed, and
/// the next call goes on with the next row.
pub struct CopyBinaryReader {
    types: Vec<PgType>,
    /// Received chunks not yet consumed, oldest first, none empty.
    chunks: VecDeque<Bytes>,
    /// The start of a unit that straddles chunks (empty otherwise).
    partial: BytesMut,
    stage: Stage,
    /// The stream-level error, once one was found.
    failed: Option<DecodeError>,
    /// The last row that failed to decode, its bad values as NULL.
    bad_row: Option<Vec<Value>>,
}

/// Shows the reader's state, never the buffered data (values can be
/// personal data).
impl std::fmt::Debug for CopyBinaryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let buffered = self.partial.len() + self.chunks.iter().map(Bytes::len).sum::<usize>();
        f.debug_struct("CopyBinaryReader")
            .field("types", &self.types)
            .field("stage", &self.stage)
            .field("buffered_bytes", &buffered)
            .field("failed", &self.failed)
            .finish()
    }
}

impl CopyBinaryReader {
    /// A reader of rows with one column per entry of `types`.
    pub fn new(types: Vec<PgType>) -> Self {
        CopyBinaryReader {
            types,
            chunks: VecDeque::new(),
            partial: BytesMut::new(),
            stage: Stage::Header,
            failed: None,
            bad_row: None,
        }
    }

    /// Appends received data (any size, including empty).
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.chunks.push_back(chunk);
        }
    }

    /// Has the trailer (field count -1) been seen?
    pub fn finished(&self) -> bool {
        self.stage == Stage::Done
    }

    /// The next complete row, one [`Value`] per column ([`Value::Null`] for
    /// NULL); `Ok(None)` when more data is needed or the trailer was seen
    /// (see [`finished`](Self::finished)).
    pub fn next_row(&mut self) -> Result<Option<Vec<Value>>, DecodeError> {
        match self.next_row_lenient()? {
            None => Ok(None),
            Some((row, errors)) => match errors.into_iter().next() {
                None => Ok(Some(row)),
                Some((_, e)) => {
                    self.bad_row = Some(row);
                    Err(e)
                }
            },
        }
    }

    /// Like [`next_row`](Self::next_row), but a value that fails to decode
    /// is NULL in the row and reported with its column index beside it:
    /// only a malformed stream is an error.
    pub fn next_row_lenient(&mut self) -> Result<Option<LenientRow>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.step();
        if let Err(StepError::Stream(e)) = &r {
            self.failed = Some(e.clone());
        }
        r.map_err(|StepError::Stream(e)| e)
    }

    /// The row of the last row-level error of [`next_row`](Self::next_row),
    /// with the values that failed to decode as NULL (so its key can name a
    /// dead letter).
    pub fn take_bad_row(&mut self) -> Option<Vec<Value>> {
        self.bad_row.take()
    }

    fn step(&mut self) -> Result<Option<LenientRow>, StepError> {
        loop {
            match self.stage {
                Stage::Done => return Ok(None),
                Stage::Extension(n) => {
                    let left = self.discard(n);
                    if left > 0 {
                        self.stage = Stage::Extension(left);
                        return Ok(None);
                    }
                    self.stage = Stage::Tuples;
                    continue;
                }
                Stage::Header | Stage::Tuples => {}
            }
            if self.partial.is_empty() {
                // Fast path: the unit lies in the front chunk.
                let Some(front) = self.chunks.front_mut() else {
                    return Ok(None);
                };
                match extent(self.stage, self.types.len(), front)? {
                    Extent::Complete(n) => {
                        let r = unit(&mut self.stage, &self.types, &front[..n]);
                        front.advance(n);
                        if front.is_empty() {
                            self.chunks.pop_front();
                        }
                        if let Some(row) = r? {
                            return Ok(Some(row));
                        }
                    }
                    Extent::Need(_) => {
                        // Everything left in the chunk belongs to this unit.
                        self.partial.extend_from_slice(front);
                        self.chunks.pop_front();
                    }
                }
            } else {
                match extent(self.stage, self.types.len(), &self.partial)? {
                    Extent::Complete(n) => {
                        let r = unit(&mut self.stage, &self.types, &self.partial[..n]);
                        self.partial.advance(n);
                        if let Some(row) = r? {
                            return Ok(Some(row));
                        }
                    }
                    Extent::Need(n) => {
                        // Copy just what the unit still lacks.
                        let Some(front) = self.chunks.front_mut() else {
                            return Ok(None);
                        };
                        let take = n.saturating_sub(self.partial.len()).min(front.len());
                        self.partial.extend_from_slice(&front[..take]);
                        front.advance(take);
                        if front.is_empty() {
                            self.chunks.pop_front();
                        }
                    }
                }
            }
        }
    }

    /// Drops up to `n` bytes of received data; returns how many are left to
    /// drop.
    fn discard(&mut self, mut n: usize) -> usize {
        let k = n.min(self.partial.len());
        self.partial.advance(k);
        n -= k;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = n.min(front.len());
            front.advance(k);
            n -= k;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        n
    }
}

/// A row with the values that failed to decode (NULL in the row), by
/// column index.
pub type LenientRow = (Vec<Value>, Vec<(usize, DecodeError)>);

/// A stream-level error (sticky).
enum StepError {
    Stream(DecodeError),
}

fn stream_error(detail: String) -> StepError {
    StepError::Stream(DecodeError {
        type_name: COPY_STREAM.into(),
        detail,
    })
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// How long the unit at the front of `data` is, checking its framing.
fn extent(stage: Stage, ncols: usize, data: &[u8]) -> Result<Extent, StepError> {
    if stage == Stage::Header {
        let k = data.len().min(COPY_SIGNATURE.len());
        if data[..k] != COPY_SIGNATURE[..k] {
            return Err(stream_error("bad signature".into()));
        }
        return Ok(if data.len() < COPY_HEADER_LEN {
            Extent::Need(COPY_HEADER_LEN)
        } else {
            Extent::Complete(COPY_HEADER_LEN)
        });
    }
    if data.len() < 2 {
        return Ok(Extent::Need(2));
    }
    let count = be_i16(data, 0);
    if count == -1 {
        return Ok(Extent::Complete(2));
    }
    if usize::try_from(count).ok() != Some(ncols) {
        return Err(stream_error(format!(
            "tuple has {count} fields, expected {ncols}"
        )));
    }
    let mut at = 2usize;
    for i in 0..ncols {
        if data.len() < at + 4 {
            return Ok(Extent::Need(at + 4));
        }
        let len = be_i32(data, at);
        at += 4;
        if len == -1 {
            continue;
        }
        at = usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
            .ok_or_else(|| stream_error(format!("field {} has invalid length {len}", i + 1)))?;
        if data.len() < at {
            return Ok(Extent::Need(at));
        }
    }
    Ok(Extent::Complete(at))
}

/// Acts on one complete unit: the header sets the stage, the trailer ends
/// the stream, a tuple is decoded into a row.
fn unit(stage: &mut Stage, types: &[PgType], data: &[u8]) -> Result<Option<LenientRow>, StepError> {
    if *stage == Stage::Header {
        let flags = be_i32(data, 11);
        if flags & COPY_CRITICAL_FLAGS != 0 {
            return Err(stream_error(format!(
                "unsupported header flags 0x{flags:08x}"
            )));
        }
        let ext = be_i32(data, 15);
        let ext = usize::try_from(ext)
            .map_err(|_| stream_error(format!("invalid header extension length {ext}")))?;
        *stage = Stage::Extension(ext);
        return Ok(None);
    }
    if be_i16(data, 0) == -1 {
        *stage = Stage::Done;
        return Ok(None);
    }
    // The framing was checked by `extent`.
    let mut row = Vec::with_capacity(types.len());
    let mut errors = Vec::new();
    let mut at = 2usize;
    for (i, ty) in types.iter().enumerate() {
        let len = be_i32(data, at);
        at += 4;
        let Ok(len) = usize::try_from(len) else {
            row.push(Value::Null);
            continue;
        };
        let field = &data[at..at + len];
        at += len;
        match decode(ty.oid, &ty.name, ty.elem, field) {
            Ok(v) => row.push(v),
            Err(e) => {
                errors.push((
                    i,
                    DecodeError {
                        type_name: e.type_name,
                        detail: format!("column {}: {}", i + 1, e.detail),
                    },
                ));
                row.push(Value::Null);
            }
        }
    }
    Ok(Some((row, errors)))
}

#[cfg(test)]
mod tests;
