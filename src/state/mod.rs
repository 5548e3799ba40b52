//! Durable state: what was delivered, what was rejected, and how far the
//! source has been read.
//!
//! The [`StateStore`] trait has two implementations: [`SledStore`] (the
//! product, a sled database in `state.dir`) and [`MemoryStore`] (tests).
//! What it holds:
//!
//! - per record key `(type, mapping, source key)`: a [`KeyState`] — the
//!   status and fingerprint of the last version accepted (or
//!   dead-lettered), and a compact delete image ([`image`]) where soft
//!   deletes need one. The sled store keeps them in pages of neighbouring
//!   keys, whatever the key's type ([`pages`] for integers, [`ranges`] for
//!   the rest, whose writes wait in a journal until many can share each
//!   page rewrite: [`journal`]);
//! - dead letters ([`DeadLetter`]) under the same key;
//! - checkpoints ([`Checkpoint`]): the replication position with per-table
//!   snapshot progress, per-mapping poll cursors, per-mapping snapshot
//!   progress. Checkpoints never move backwards: a write older than what is
//!   stored is ignored;
//! - per-type counters for `status` when the daemon is stopped.
//!
//! Writes are grouped with [`StateStore::apply`] (checkpoints last) and
//! become durable with
//! [`StateStore::flush`], which the sink calls before any progress is
//! confirmed to PostgreSQL. A mapping's keys are listed with
//! [`StateStore::scan_keys`] (statuses only) or, from async code,
//! [`stream_keys`].

pub mod image;
mod journal;
mod keycode;
mod layout;
mod memory;
mod pages;
mod presence;
mod ranges;
mod sled_store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::schema::schema;
/// The id of a Cobi record type (see [`crate::sink::type_id`]), as keys
/// and statistics carry it.
pub use crate::model::schema::TypeId;

pub use image::ImagePolicy;
pub use memory::MemoryStore;
pub use sled_store::SledStore;

/// A record's identity in the state store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    /// Cobi type.
    pub ty: TypeId,
    /// Mapping id ([`crate::config::MappingSettings::id`]), shared.
    pub mapping: std::sync::Arc<str>,
    /// Source key ([`crate::mapping::engine::source_key`]).
    pub source_key: String,
}

impl StateKey {
    /// Encodes as `[type][8-byte hash of the mapping id][source key]`:
    /// short keys keep sled's per-entry memory down, and one mapping's keys
    /// are one prefix scan.
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Self::mapping_prefix(self.ty, &self.mapping);
        k.extend_from_slice(self.source_key.as_bytes());
        k
    }

    /// The source key of an encoded key.
    pub fn source_key_of(bytes: &[u8]) -> Option<String> {
        String::from_utf8(bytes.get(9..)?.to_vec()).ok()
    }

    /// The prefix of every key of one mapping.
    pub fn mapping_prefix(ty: TypeId, mapping: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(24);
        k.push(ty);
        k.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(mapping.as_bytes()).to_be_bytes());
        k
    }
}

/// What happened to the last version of a key that reached a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyStatus {
    /// The API accepted it.
    Accepted,
    /// It became a dead letter.
    DeadLettered,
}

/// The state of one record key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    /// Accepted or dead-lettered.
    pub status: KeyStatus,
    /// Fingerprint of that version's JSON.
    pub fingerprint: u64,
    /// The fields of the version last accepted, compactly encoded
    /// ([`image::encode`]), where soft deletes need them
    /// ([`ImagePolicy`]).
    pub delete_image: Option<bytes::Bytes>,
}

/// Bytes of a status and a fingerprint, as stored.
pub(crate) const FIXED_BYTES: usize = 9;

/// Appends `[status][fingerprint, big-endian]` (the fixed part of a
/// stored key state, also a page slot).
pub(crate) fn encode_fixed(status: KeyStatus, fingerprint: u64, out: &mut Vec<u8>) {
    out.push(match status {
        KeyStatus::Accepted => 1,
        KeyStatus::DeadLettered => 2,
    });
    out.extend_from_slice(&fingerprint.to_be_bytes());
}

/// Reads [`encode_fixed`]'s bytes from the start of `b`.
pub(crate) fn decode_fixed(b: &[u8]) -> Option<(KeyStatus, u64)> {
    let status = match b.first()? {
        1 => KeyStatus::Accepted,
        2 => KeyStatus::DeadLettered,
        _ => return None,
    };
    let fingerprint = u64::from_be_bytes(b.get(1..FIXED_BYTES)?.try_into().ok()?);
    Some((status, fingerprint))
}

/// A record the API (or local validation) rejected, kept for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Cobi type name.
    #[serde(rename = "type")]
    pub ty: String,
    /// Mapping id.
    pub mapping: String,
    /// The record's Cobi key, if it has one.
    pub cobi_key: Option<String>,
    /// Source key.
    pub source_key: String,
    /// The record's JSON.
    pub record: String,
    /// Why it was rejected.
    pub reason: String,
    /// How many times it was rejected.
    pub attempts: u32,
    /// First rejection (RFC 3339).
    pub first_at: String,
    /// Last rejection (RFC 3339).
    pub last_at: String,
}

impl DeadLetter {
    /// Its state key.
    pub fn key(&self) -> Option<StateKey> {
        Some(StateKey {
            ty: schema().type_id(&self.ty)?,
            mapping: self.mapping.as_str().into(),
            source_key: self.source_key.clone(),
        })
    }
}

/// A column value in a checkpoint: the type OID and PostgreSQL's text form
/// (`None` for NULL). Decoded with [`crate::mapping::decode::text`] for
/// comparisons; bound as text parameters in queries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorValue {
    /// Type OID.
    pub oid: u32,
    /// Text form.
    pub text: Option<String>,
}

/// A position in a table ordered by `(cursor column, key)` or by key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Cursor column value (poll mode), if ordered by a cursor.
    pub cursor: Option<CursorValue>,
    /// Key column values.
    pub key: Vec<CursorValue>,
}

impl Position {
    /// Compares positions with PostgreSQL's ordering of the decoded values.
    pub fn cmp_values(&self, other: &Position) -> std::cmp::Ordering {
        use crate::mapping::decode::text::decode_text;
        use crate::mapping::value::{PgType, Value};
        let val = |c: &CursorValue| -> Value {
            match &c.text {
                None => Value::Null,
                Some(t) => decode_text(
                    &PgType {
                        oid: c.oid,
                        name: String::new(),
                        elem: None,
                    },
                    t.as_bytes(),
                )
                .unwrap_or_else(|_| Value::Text(t.as_str().into())),
            }
        };
        let a = self.cursor.iter().chain(self.key.iter()).map(val);
        let b = other.cursor.iter().chain(other.key.iter()).map(val);
        for (x, y) in a.zip(b) {
            let o = x.key_cmp(&y);
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    }
}

/// How far a table's snapshot has got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableSnapshot {
    /// Not read yet.
    NotStarted,
    /// Read up to and including this key.
    InProgress(Position),
    /// Fully read.
    Done,
}

impl TableSnapshot {
    fn rank(&self) -> u8 {
        match self {
            TableSnapshot::NotStarted => 0,
            TableSnapshot::InProgress(_) => 1,
            TableSnapshot::Done => 2,
        }
    }
}

/// The replication position with every table's snapshot progress, written
/// as one value so both move together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReplicationCheckpoint {
    /// Confirmed LSN: everything committed up to here is delivered.
    pub lsn: u64,
    /// Snapshot progress per mapping id.
    pub tables: BTreeMap<String, TableSnapshot>,
}

/// A progress marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Checkpoint {
    /// Replication mode.
    Replication(ReplicationCheckpoint),
    /// A poll mapping's cursor.
    PollCursor {
        /// Mapping id.
        mapping: String,
        /// Last delivered `(cursor, key)`.
        position: Position,
    },
    /// A poll mapping's late-commit guard (open transactions and the
    /// bounds of what they may write; see `crate::source::poll::guard`),
    /// opaque here. Always replaces the stored one.
    PollGuard {
        /// Mapping id.
        mapping: String,
        /// The guard's state.
        guard: serde_json::Value,
    },
    /// A `snapshot` command's progress for one mapping (`None`: finished,
    /// forget it).
    Snapshot {
        /// Mapping id.
        mapping: String,
        /// Progress.
        progress: Option<TableSnapshot>,
    },
}

impl Checkpoint {
    /// Its name in the store.
    pub fn name(&self) -> String {
        match self {
            Checkpoint::Replication(_) => "replication".into(),
            Checkpoint::PollCursor { mapping, .. } => format!("poll/{mapping}"),
            Checkpoint::PollGuard { mapping, .. } => format!("pollguard/{mapping}"),
            Checkpoint::Snapshot { mapping, .. } => format!("snapshot/{mapping}"),
        }
    }

    /// Whether replacing `old` by `self` would move backwards.
    pub fn is_behind(&self, old: &Checkpoint) -> bool {
        match (self, old) {
            (Checkpoint::Replication(new), Checkpoint::Replication(old)) => {
                new.lsn < old.lsn
                    || new.tables.iter().any(|(m, t)| {
                        old.tables.get(m).is_some_and(|o| {
                            t.rank() < o.rank()
                                || matches!((t, o), (TableSnapshot::InProgress(a), TableSnapshot::InProgress(b)) if a.cmp_values(b).is_lt())
                        })
                    })
            }
            (
                Checkpoint::PollCursor { position: new, .. },
                Checkpoint::PollCursor { position: old, .. },
            ) => new.cmp_values(old).is_lt(),
            _ => false,
        }
    }
}

/// Per-type counters kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TypeStats {
    /// Records read from the source.
    pub read: u64,
    /// Records accepted by the API.
    pub sent: u64,
    /// Last accepted delivery (RFC 3339).
    pub last_success: Option<String>,
}

/// One write in an atomic group.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Set a key's state.
    Key(StateKey, KeyState),
    /// Forget a key.
    RemoveKey(StateKey),
    /// Add or replace a dead letter.
    DeadLetter(StateKey, Box<DeadLetter>),
    /// Remove a dead letter.
    RemoveDeadLetter(StateKey),
    /// Advance a checkpoint (ignored if it would move backwards).
    Checkpoint(Checkpoint),
    /// Replace a type's counters.
    Stats(TypeId, TypeStats),
}

/// A state store failure (disk full, read-only, corrupt).
#[derive(Debug, thiserror::Error)]
#[error("state store {op} failed: {detail}")]
pub struct StateError {
    /// What was being done.
    pub op: &'static str,
    /// The underlying error.
    pub detail: String,
}

/// The durable state behind the pipeline.
pub trait StateStore: Send + Sync + 'static {
    /// A key's state.
    fn get_key(&self, key: &StateKey) -> Result<Option<KeyState>, StateError>;
    /// The states of many keys, in order (one epoch's lookups: stores may
    /// share work between neighbouring keys).
    fn get_keys(&self, keys: &[&StateKey]) -> Result<Vec<Option<KeyState>>, StateError> {
        keys.iter().map(|k| self.get_key(k)).collect()
    }
    /// Calls `visit` with every key of one mapping and its status, in no
    /// particular order, reading a page at a time (applies are not held up
    /// for the scan; a key written meanwhile is seen in its old or new
    /// state).
    fn scan_keys(
        &self,
        ty: TypeId,
        mapping: &str,
        visit: &mut dyn FnMut(String, KeyStatus),
    ) -> Result<(), StateError>;
    /// Every key of one mapping with its status, collected (tests and small
    /// mappings; [`stream_keys`] bounds memory for large ones).
    fn keys_of(&self, ty: TypeId, mapping: &str) -> Result<Vec<(String, KeyStatus)>, StateError> {
        let mut out = Vec::new();
        self.scan_keys(ty, mapping, &mut |k, s| out.push((k, s)))?;
        Ok(out)
    }
    /// Applies a group of writes, checkpoints last: after a crash, a
    /// checkpoint is only present if the writes before it are (call
    /// [`StateStore::flush`] to make them durable).
    fn apply(&self, writes: &[Write]) -> Result<(), StateError>;
    /// Applies groups of writes in order, as [`StateStore::apply`] would
    /// one after the other, but as one: a re-open
    /// ([`StateStore::recover`]) never falls between them, so a later
    /// group (an epoch's progress marks) never outlives an earlier one
    /// (its key states). A store whose `recover` re-opens overrides it.
    fn apply_all(&self, groups: &[&[Write]]) -> Result<(), StateError> {
        for writes in groups {
            self.apply(writes)?;
        }
        Ok(())
    }
    /// Makes every applied write durable.
    fn flush(&self) -> Result<(), StateError>;
    /// Applies the groups ([`StateStore::apply_all`]) and flushes them.
    /// Fails if the store was re-opened ([`StateStore::recover`], by a
    /// failed operation on another thread) before the flush: the writes
    /// are then gone, and the caller must write them again rather than
    /// count them done.
    fn write_durably(&self, groups: &[&[Write]]) -> Result<(), StateError> {
        let generation = self.generation();
        self.apply_all(groups)?;
        self.flush()?;
        if self.generation() != generation {
            return Err(StateError {
                op: "write",
                detail: "the state store was re-opened after a failure before these writes \
                         were flushed; they were not saved and must be written again"
                    .into(),
            });
        }
        Ok(())
    }
    /// A checkpoint by name.
    fn checkpoint(&self, name: &str) -> Result<Option<Checkpoint>, StateError>;
    /// Every checkpoint.
    fn checkpoints(&self) -> Result<Vec<Checkpoint>, StateError>;
    /// Removes a checkpoint (e.g. to re-run a snapshot).
    fn remove_checkpoint(&self, name: &str) -> Result<(), StateError>;
    /// Dead letters, all or of one type.
    fn dead_letters(&self, ty: Option<TypeId>) -> Result<Vec<DeadLetter>, StateError>;
    /// Number of dead letters per type.
    fn dead_letter_counts(&self) -> Result<BTreeMap<TypeId, u64>, StateError> {
        let mut m = BTreeMap::new();
        for d in self.dead_letters(None)? {
            if let Some(t) = schema().type_id(&d.ty) {
                *m.entry(t).or_insert(0) += 1;
            }
        }
        Ok(m)
    }
    /// A dead letter by key.
    fn dead_letter(&self, key: &StateKey) -> Result<Option<DeadLetter>, StateError>;
    /// Per-type counters.
    fn stats(&self) -> Result<BTreeMap<TypeId, TypeStats>, StateError>;
    /// After a failure (disk full, read-only), re-opens the store as of
    /// its last flush so writes can be retried.
    fn recover(&self) -> Result<(), StateError> {
        Ok(())
    }
    /// How many times [`StateStore::recover`] has re-opened the store.
    /// Writes applied before it changed and not flushed by then are gone:
    /// a caller that applies and then flushes checks that it did not
    /// change in between (another thread may recover meanwhile). A store
    /// whose `recover` re-opens must count here too (0 turns the check
    /// off).
    fn generation(&self) -> u64 {
        0
    }
}

/// Keys streamed by [`stream_keys`], in chunks.
pub type KeyChunks = tokio::sync::mpsc::Receiver<Result<Vec<(String, KeyStatus)>, StateError>>;

/// Keys per chunk of [`stream_keys`].
const KEY_CHUNK: usize = 1024;

/// Streams every key of one mapping with its status from a blocking
/// thread, in chunks of 1 024 through a channel of 4: at most ~5 000 keys
/// are in memory at a time, whatever the mapping's size. A failed scan
/// ends the stream with its error.
pub fn stream_keys(
    store: std::sync::Arc<dyn StateStore>,
    ty: TypeId,
    mapping: std::sync::Arc<str>,
) -> KeyChunks {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(KEY_CHUNK);
        let mut open = true;
        let r = store.scan_keys(ty, &mapping, &mut |k, s| {
            if !open {
                return;
            }
            chunk.push((k, s));
            if chunk.len() == KEY_CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(KEY_CHUNK));
                open = tx.blocking_send(Ok(full)).is_ok();
            }
        });
        if open {
            let last = match r {
                Ok(()) if chunk.is_empty() => return,
                Ok(()) => Ok(chunk),
                Err(e) => Err(e),
            };
            let _ = tx.blocking_send(last);
        }
    });
    rx
}

/// The replication checkpoint, if any.
pub fn replication_checkpoint(
    store: &dyn StateStore,
) -> Result<Option<ReplicationCheckpoint>, StateError> {
    Ok(match store.checkpoint("replication")? {
        Some(Checkpoint::Replication(r)) => Some(r),
        _ => None,
    })
}

/// A poll mapping's guard state, if any.
pub fn poll_guard(
    store: &dyn StateStore,
    mapping: &str,
) -> Result<Option<serde_json::Value>, StateError> {
    Ok(match store.checkpoint(&format!("pollguard/{mapping}"))? {
        Some(Checkpoint::PollGuard { guard, .. }) => Some(guard),
        _ => None,
    })
}

/// A poll mapping's cursor, if any.
pub fn poll_cursor(store: &dyn StateStore, mapping: &str) -> Result<Option<Position>, StateError> {
    Ok(match store.checkpoint(&format!("poll/{mapping}"))? {
        Some(Checkpoint::PollCursor { position, .. }) => Some(position),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
