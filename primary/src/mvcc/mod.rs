//! Multi-version key-value state in SQLite.
//!
//! Every change to a key writes a row into `kv_history` (key, mod revision,
//! create revision, version, lease, value, tombstone flag), the only place
//! a value is stored, and updates the key's row in `kv_keys`, which holds
//! only keys that exist now and points at the history row with the current
//! value (the `kv_live` view joins the two). Reads at the current revision
//! walk `kv_keys`; reads at older revisions, watch replay and HashKV use
//! `kv_history`, which keeps every change until compaction, each row linked
//! to its key's previous one (`prev_id`), so a put touches one random
//! b-tree leaf (its key's `kv_keys` row) rather than two.
//!
//! - [`schema`]: opening a database file, pragmas and tables.
//! - [`write`]: [`MvccStore`], the single writer (owned by the Raft thread),
//!   and [`Batch`], many Raft entries applied together in the writer's
//!   open transaction (committed every few ms, or when a reader needs it).
//! - [`read`]: range queries and history scans over any connection, so the
//!   writer (inside a transaction) and the read pool share one implementation.
//! - [`image`]: the state file as one read transaction sees it, page by
//!   page, for full backups.
//! - [`etcd_snapshot`]: the state as etcd 3.4's bbolt backend, for the
//!   Snapshot RPC, and etcd's records decoded back, for `tern-restore
//!   import-etcd`.
//!
//! Why SQLite in WAL mode: a read transaction sees one consistent revision
//! while the writer goes on, which is what linearizable reads, the snapshot
//! stream and (later) learner backups need. The state file is written without
//! fsync per transaction (`synchronous=NORMAL`): the Raft log is the
//! durability boundary, and the applied index committed with the state makes
//! replay after a crash exact.

pub mod etcd_snapshot;
pub mod image;
pub mod page_cache;
pub mod read;
pub mod schema;
pub mod write;

#[cfg(test)]
mod model_tests;

pub use read::{KeyRange, RangeQuery, RangeResult, Reader};
pub use write::{Batch, MvccStore, StoreState};

/// What the MVCC layer can refuse; the API layer maps each to etcd's status.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "{}: state format {found} is newer than format {}, the newest this build of Tern \
         reads (it migrates older ones); run a newer Tern",
        path.display(),
        schema::FORMAT_VERSION
    )]
    Format {
        path: std::path::PathBuf,
        found: i64,
    },
    /// Opening it would create an empty state, and restoring that would
    /// wipe the keyspace.
    #[error("{}: the state file to restore from is missing", path.display())]
    MissingState { path: std::path::PathBuf },
    /// An entry applied without a savepoint failed after a write (see
    /// `Batch::entry_checked_first`): the node stops, as for a storage
    /// failure, and the state goes back to its last commit.
    #[error(
        "mvcc: entry {index} failed after its first write; the state goes back to its last commit"
    )]
    FailedAfterWriting { index: u64 },
}
