//! Decoder for PostgreSQL's `pgoutput` logical replication messages, protocol version 1.
//!
//! This is the format that PostgreSQL 14–17 sends to a replication client that started
//! `START_REPLICATION ... LOGICAL ... (proto_version '1', publication_names '...', messages 'true')`:
//! no streaming of in-progress transactions (so no `xid` prefixes on data messages and no
//! `S`/`E`/`c`/`A` stream messages), no two-phase messages, text-format tuple values (binary
//! values are still recognised if the server sends them).
//!
//! # Contract
//!
//! * [`decode`] takes exactly one pgoutput message: the payload of one XLogData (`'w'`) copy
//!   message, starting at the pgoutput tag byte (the XLogData header with its start/end LSN and
//!   send time has already been stripped by the caller).
//! * It is **pure**: no I/O, no global state, no allocation proportional to anything but the
//!   bytes actually present in the input. Tuple values ([`TupleValue::Text`] /
//!   [`TupleValue::Binary`]) and logical-message contents are zero-copy [`Bytes::slice`]s of the
//!   input buffer.
//! * It **never panics** on any input. Every count and length read from the wire is checked
//!   against the bytes remaining before it is used (including before any `Vec::with_capacity`),
//!   arithmetic on lengths is checked, negative counts/lengths are rejected as
//!   [`DecodeError::Malformed`], running out of bytes is [`DecodeError::Truncated`], and bytes
//!   left over after a complete message are [`DecodeError::Malformed`] (`"N trailing bytes"`).
//! * Names (schemas, relations, columns, types, origins, message prefixes) are NUL-terminated on
//!   the wire and are decoded lossily as UTF-8 ([`String::from_utf8_lossy`]); invalid UTF-8 in a
//!   name is never an error. Text tuple values are *not* validated as UTF-8 here: that is the
//!   job of whoever interprets them against the column type.
//! * Only the protocol-v1 top-level messages are decoded: `B`egin, `C`ommit, `O`rigin,
//!   `R`elation, t`Y`pe, `I`nsert, `U`pdate, `D`elete, `T`runcate and `M`essage. Every other tag
//!   — including protocol v2+ stream / two-phase tags (`S`, `E`, `c`, `A`, `b`, `P`, `K`, `r`,
//!   `p`, ...) and the tuple submessage markers `K`/`N` when they appear at top level — is
//!   [`DecodeError::UnknownTag`]. (`O` at top level is an Origin message; inside Update/Delete
//!   it marks a full old row.)
//! * Values are reported exactly as sent: this module keeps no relation cache, does not resolve
//!   an empty namespace to `pg_catalog`, does not validate the replica-identity byte or the
//!   commit flags, and does not check a tuple's column count against the relation.

use bytes::Bytes;

/// A PostgreSQL object identifier (`oid`), as sent on the wire (unsigned 32-bit).
pub type Oid = u32;

/// One column value inside a [`Tuple`] (`TupleData` in the protocol documentation).
#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    /// `'n'`: the column is SQL `NULL`.
    Null,
    /// `'u'`: an unchanged TOASTed value; the actual value is not sent.
    UnchangedToast,
    /// `'t'`: a text-format value (the bytes of the type's output function).
    ///
    /// Not validated as UTF-8 by this module; a zero-copy slice of the input.
    Text(Bytes),
    /// `'b'`: a binary-format value (the bytes of the type's send function); a zero-copy slice
    /// of the input.
    Binary(Bytes),
}

/// A row image: one [`TupleValue`] per column, in the column order of the preceding
/// [`Relation`] message for the same relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<TupleValue>);

/// One column description inside a [`Relation`] message.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key (column flags bit `1`).
    pub is_key: bool,
    /// Column name, decoded lossily as UTF-8.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: Oid,
    /// Type modifier of the column (`atttypmod`); `-1` when there is none.
    pub type_modifier: i32,
}

/// A `Relation` (`'R'`) message: describes a table before the first change to it is sent
/// (and again whenever its definition may have changed).
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// OID of the relation.
    pub oid: Oid,
    /// Schema name, as sent: an empty string means `pg_catalog` per the protocol, but it is
    /// kept as the empty string here.
    pub namespace: String,
    /// Relation (table) name.
    pub name: String,
    /// Replica identity setting (`relreplident`), as sent: `b'd'` (default, primary key),
    /// `b'n'` (nothing), `b'f'` (full row) or `b'i'` (index). Not validated.
    pub replica_identity: u8,
    /// Columns in attribute order (only the published ones).
    pub columns: Vec<RelationColumn>,
}

/// One decoded pgoutput (protocol version 1) message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `'B'`: start of a transaction.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit timestamp, microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL epoch).
        commit_time: i64,
        /// Transaction ID.
        xid: u32,
    },
    /// `'C'`: end of a transaction.
    Commit {
        /// Flags; currently unused by PostgreSQL (always 0), kept as sent.
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End LSN of the transaction (the position to confirm as flushed once applied).
        end_lsn: u64,
        /// Commit timestamp, microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL epoch).
        commit_time: i64,
    },
    /// `'O'`: replication origin of the current transaction (sent after Begin when the
    /// transaction was itself replicated from elsewhere).
    Origin {
        /// LSN of the commit on the origin server.
        commit_lsn: u64,
        /// Origin name.
        name: String,
    },
    /// `'R'`: relation (table) description.
    Relation(Relation),
    /// `'Y'`: description of a data type (sent for non-built-in types before they are used).
    Type {
        /// OID of the data type.
        oid: Oid,
        /// Schema name, as sent (empty means `pg_catalog`).
        namespace: String,
        /// Type name.
        name: String,
    },
    /// `'I'`: a row was inserted.
    Insert {
        /// OID of the relation (see the preceding [`Message::Relation`]).
        relation: Oid,
        /// The new row.
        new: Tuple,
    },
    /// `'U'`: a row was updated.
    ///
    /// `old` is Some for 'K' (key-only old tuple, replica identity index/default) or 'O' (full
    /// old row, REPLICA IDENTITY FULL); `old_is_key_only` tells which. When `old` is `None`
    /// (the key did not change and the identity is not FULL), `old_is_key_only` is `false`.
    Update {
        /// OID of the relation (see the preceding [`Message::Relation`]).
        relation: Oid,
        /// The old row (or just its key columns), when sent.
        old: Option<Tuple>,
        /// `true` if `old` came with the `'K'` marker (only replica identity key columns are
        /// meaningful, others are `Null`), `false` for `'O'` or when `old` is `None`.
        old_is_key_only: bool,
        /// The new row.
        new: Tuple,
    },
    /// `'D'`: a row was deleted.
    Delete {
        /// OID of the relation (see the preceding [`Message::Relation`]).
        relation: Oid,
        /// The old row (or just its key columns).
        old: Tuple,
        /// `true` for the `'K'` marker (key columns only), `false` for `'O'` (full row).
        old_is_key_only: bool,
    },
    /// `'T'`: one or more relations were truncated.
    Truncate {
        /// OIDs of the truncated relations.
        relations: Vec<Oid>,
        /// `TRUNCATE ... CASCADE` (option bit `1`).
        cascade: bool,
        /// `TRUNCATE ... RESTART IDENTITY` (option bit `2`).
        restart_identity: bool,
    },
    /// `'M'`: a logical decoding message written with `pg_logical_emit_message`.
    LogicalMessage {
        /// Whether the message is transactional (flags bit `1`); non-transactional messages
        /// can arrive outside Begin/Commit.
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Message prefix.
        prefix: String,
        /// Message content (arbitrary bytes), a zero-copy slice of the input.
        content: Bytes,
    },
}

/// Why a pgoutput message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The input had no bytes at all.
    #[error("pgoutput message is empty")]
    Empty,
    /// The first byte is not a protocol-v1 pgoutput message tag this decoder handles.
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    /// The input ended before the message (named by `what`) was complete.
    #[error("pgoutput {what}: message truncated")]
    Truncated {
        /// Which message was being decoded (e.g. `"Insert"`).
        what: &'static str,
    },
    /// The message (named by `what`) is structurally invalid: a negative count or length, an
    /// unexpected submessage marker or tuple value kind, or trailing bytes.
    #[error("pgoutput {what}: {detail}")]
    Malformed {
        /// Which message was being decoded (e.g. `"Update"`).
        what: &'static str,
        /// Human-readable description of the problem.
        detail: String,
    },
}

/// Decodes one pgoutput message (the payload of an XLogData 'w' message, starting at the tag byte).
///
/// Never panics; see the module documentation for the exact contract.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let (what, body): (&'static str, BodyDecoder) = match tag {
        b'B' => ("Begin", decode_begin),
        b'C' => ("Commit", decode_commit),
        b'O' => ("Origin", decode_origin),
        b'R' => ("Relation", decode_relation),
        b'Y' => ("Type", decode_type),
        b'I' => ("Insert", decode_insert),
        b'U' => ("Update", decode_update),
        b'D' => ("Delete", decode_delete),
        b'T' => ("Truncate", decode_truncate),
        b'M' => ("Message", decode_logical_message),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    let mut reader = Reader {
        buf: data,
        pos: 1,
        what,
    };
    let message = body(&mut reader)?;
    reader.finish()?;
    Ok(message)
}

/// Decodes the body of one message kind (everything after the tag byte).
type BodyDecoder = fn(&mut Reader<'_>) -> Result<Message, DecodeError>;

fn decode_begin(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let final_lsn = r.u64()?;
    let commit_time = r.i64()?;
    let xid = r.u32()?;
    Ok(Message::Begin {
        final_lsn,
        commit_time,
        xid,
    })
}

fn decode_commit(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let flags = r.u8()?;
    let commit_lsn = r.u64()?;
    let end_lsn = r.u64()?;
    let commit_time = r.i64()?;
    Ok(Message::Commit {
        flags,
        commit_lsn,
        end_lsn,
        commit_time,
    })
}

fn decode_origin(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let commit_lsn = r.u64()?;
    let name = r.cstr()?;
    Ok(Message::Origin { commit_lsn, name })
}

/// Smallest possible encoding of one Relation column: flags, empty name (NUL), type OID, typmod.
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

fn decode_relation(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let oid = r.u32()?;
    let namespace = r.cstr()?;
    let name = r.cstr()?;
    let replica_identity = r.u8()?;
    let ncols = r.count_i16("column count", MIN_RELATION_COLUMN_LEN)?;
    let mut columns = Vec::with_capacity(ncols);
    for _ in 0..ncols {
        let flags = r.u8()?;
        let name = r.cstr()?;
        let type_oid = r.u32()?;
        let type_modifier = r.i32()?;
        columns.push(RelationColumn {
            is_key: flags & 1 != 0,
            name,
            type_oid,
            type_modifier,
        });
    }
    Ok(Message::Relation(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    }))
}

fn decode_type(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let oid = r.u32()?;
    let namespace = r.cstr()?;
    let name = r.cstr()?;
    Ok(Message::Type {
        oid,
        namespace,
        name,
    })
}

fn decode_insert(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32()?;
    match r.u8()? {
        b'N' => {}
        other => {
            return Err(r.malformed(format!("expected 'N' new tuple marker, found {other:#04x}")))
        }
    }
    let new = r.tuple()?;
    Ok(Message::Insert { relation, new })
}

fn decode_update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32()?;
    let (old, old_is_key_only) = match r.u8()? {
        b'N' => (None, false),
        marker @ (b'K' | b'O') => {
            let old = r.tuple()?;
            match r.u8()? {
                b'N' => {}
                other => {
                    return Err(r.malformed(format!(
                        "expected 'N' new tuple marker after old tuple, found {other:#04x}"
                    )))
                }
            }
            (Some(old), marker == b'K')
        }
        other => {
            return Err(r.malformed(format!(
                "expected 'K', 'O' or 'N' tuple marker, found {other:#04x}"
            )))
        }
    };
    let new = r.tuple()?;
    Ok(Message::Update {
        relation,
        old,
        old_is_key_only,
        new,
    })
}

fn decode_delete(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32()?;
    let old_is_key_only = match r.u8()? {
        b'K' => true,
        b'O' => false,
        other => {
            return Err(r.malformed(format!(
                "expected 'K' or 'O' old tuple marker, found {other:#04x}"
            )))
        }
    };
    let old = r.tuple()?;
    Ok(Message::Delete {
        relation,
        old,
        old_is_key_only,
    })
}

fn decode_truncate(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let count = r.i32()?;
    let count = usize::try_from(count)
        .map_err(|_| r.malformed(format!("negative relation count {count}")))?;
    let options = r.u8()?;
    r.ensure_items(count, 4)?;
    let mut relations = Vec::with_capacity(count);
    for _ in 0..count {
        relations.push(r.u32()?);
    }
    Ok(Message::Truncate {
        relations,
        cascade: options & 1 != 0,
        restart_identity: options & 2 != 0,
    })
}

fn decode_logical_message(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let flags = r.u8()?;
    let lsn = r.u64()?;
    let prefix = r.cstr()?;
    let len = r.i32()?;
    let len =
        usize::try_from(len).map_err(|_| r.malformed(format!("negative content length {len}")))?;
    let content = r.bytes(len)?;
    Ok(Message::LogicalMessage {
        transactional: flags & 1 != 0,
        lsn,
        prefix,
        content,
    })
}

/// Bounds-checked big-endian cursor over one message.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    what: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated { what: self.what }
    }

    fn malformed(&self, detail: String) -> DecodeError {
        DecodeError::Malformed {
            what: self.what,
            detail,
        }
    }

    /// Returns the `(start, end)` range of the next `n` bytes and advances past them.
    fn advance(&mut self, n: usize) -> Result<(usize, usize), DecodeError> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.truncated())?;
        self.pos = end;
        Ok((start, end))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (start, end) = self.advance(N)?;
        self.buf
            .get(start..end)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or_else(|| self.truncated())
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Next `n` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let (start, end) = self.advance(n)?;
        Ok(self.buf.slice(start..end))
    }

    /// A NUL-terminated string, decoded lossily as UTF-8.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated())?;
        let (start, end) = self.advance(len)?;
        let text = String::from_utf8_lossy(self.buf.get(start..end).unwrap_or_default());
        self.advance(1)?; // the NUL terminator
        Ok(text.into_owned())
    }

    /// Checks that `count` items of at least `min_item_len` bytes each can still fit in the
    /// remaining input, so that allocating `count` slots is bounded by the input size.
    fn ensure_items(&self, count: usize, min_item_len: usize) -> Result<(), DecodeError> {
        match count.checked_mul(min_item_len) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(self.truncated()),
        }
    }

    /// Reads an Int16 count, rejecting negative values and counts that cannot fit.
    fn count_i16(&mut self, field: &str, min_item_len: usize) -> Result<usize, DecodeError> {
        let count = self.i16()?;
        let count = usize::try_from(count)
            .map_err(|_| self.malformed(format!("negative {field} {count}")))?;
        self.ensure_items(count, min_item_len)?;
        Ok(count)
    }

    /// Reads a `TupleData` structure.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        // Every column takes at least its one-byte kind.
        let ncols = self.count_i16("tuple column count", 1)?;
        let mut values = Vec::with_capacity(ncols);
        for column in 0..ncols {
            let value = match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    let len = usize::try_from(len).map_err(|_| {
                        self.malformed(format!("negative value length {len} in column {column}"))
                    })?;
                    let data = self.bytes(len)?;
                    if kind == b't' {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                other => {
                    return Err(self.malformed(format!(
                        "unknown tuple value kind {other:#04x} in column {column}"
                    )))
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    /// Fails if any bytes are left after a complete message.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.malformed(format!("{n} trailing bytes"))),
        }
    }
}

#[cfg(test)]
mod tests;
