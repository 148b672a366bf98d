//! The manifest: what a backup is, written last so a backup exists only
//! once all of it does. JSON, readable by people and by `tern-restore`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Bumped when the manifest or the backup file changes meaning. 2:
/// `kv_hash` is etcd's HashKV (1: Tern's own CRC-32 over its history rows,
/// which `tern-restore verify` still checks).
pub const FORMAT_VERSION: u32 = 2;
/// What the decrypted, decompressed object is.
pub const CONTENT: &str = "sqlite3: Tern MVCC state (tables explain themselves in `about`)";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Sortable by time: `20261125T181200.123Z-r104213`.
    pub id: String,
    /// Hex, as etcdctl prints them.
    pub cluster_id: String,
    pub member_id: String,
    /// A follower's backup (`tern-learner --etcd-endpoints`): the etcd
    /// cluster its state came from, hex; its revisions are that cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_etcd_cluster_id: Option<String>,
    /// The store revision the backup holds, and where it stands in the log.
    pub revision: i64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub compact_revision: i64,
    /// Keys that exist at `revision`.
    pub key_count: u64,
    /// The HashKV of the key-value state at `revision`: equal to what
    /// `etcdctl endpoint hashkv --rev <revision>` prints for any member of
    /// the cluster.
    pub kv_hash: u32,
    pub object: StoredObject,
    pub compression: Compression,
    pub encryption: Encryption,
    pub content: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// `tern-learner <version>`.
    pub tool: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// The object's name, next to the manifest.
    pub name: String,
    /// Bytes stored (compressed and encrypted).
    pub size: u64,
    /// sha256 of the stored bytes, hex.
    pub sha256: String,
    /// Bytes of the SQLite file before compression.
    pub raw_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encryption {
    pub algorithm: String,
    /// The X25519 public keys it was encrypted to.
    pub recipients: Vec<String>,
}

/// Object names of a backup, relative to the target's `backups/` prefix.
pub fn data_name(id: &str) -> String {
    format!("{id}.db.zst.age")
}

pub fn manifest_name(id: &str) -> String {
    format!("{id}.manifest.json")
}

/// The backup id a manifest's object name carries.
pub fn id_of_manifest(name: &str) -> Option<&str> {
    name.strip_suffix(".manifest.json")
}

/// The backup id a data object's name carries.
pub fn id_of_data(name: &str) -> Option<&str> {
    name.strip_suffix(".db.zst.age")
}

pub fn new_id(started: DateTime<Utc>, revision: i64) -> String {
    format!("{}-r{revision}", started.format("%Y%m%dT%H%M%S%.3fZ"))
}
