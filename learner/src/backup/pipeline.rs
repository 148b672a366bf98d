//! One full backup: a consistent copy of the state at one revision,
//! streamed through zstd and age into a multipart upload, then the
//! manifest.
//!
//! The copy is `VACUUM INTO` from a read transaction (the learner keeps
//! applying and serving meanwhile) into a staging file exactly as large as
//! the state; nothing else touches the disk. A blocking thread reads it
//! through the zstd encoder and the age encryptor into [`PART_SIZE`] parts,
//! hashing what will be stored; the async side uploads at most
//! [`PARTS_IN_FLIGHT`] parts at once, so memory stays bounded whatever the
//! state size. On any failure the multipart upload is aborted and no
//! manifest is written, so the backup never appears.

use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tern_primary::member::Member;
use tern_primary::mvcc::{read, write::copy_state, MvccError};
use tokio::sync::mpsc;

use super::manifest::{self, Compression, Encryption, Manifest, StoredObject};
use super::target::Target;
use super::BackupError;

/// Bytes per uploaded part (S3 wants at least 5 MiB but the last).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploading at once; with the parts queued between the encoder and
/// the uploader this bounds the pipeline's memory to a few dozen MiB.
pub const PARTS_IN_FLIGHT: usize = 2;
const PARTS_QUEUED: usize = 2;

/// What a backup needs besides the member and the target.
pub struct Settings {
    pub zstd_level: i32,
    pub recipients: Vec<age::x25519::Recipient>,
    /// `--backup-staging-dir`; `None`: `backup-staging` in the data dir.
    pub staging_dir: Option<PathBuf>,
}

/// The state copy and what was learnt from it.
struct Copy {
    path: PathBuf,
    revision: i64,
    raft_index: u64,
    raft_term: u64,
    compact_revision: i64,
    key_count: u64,
    kv_hash: u32,
    cluster_id: u64,
    member_id: u64,
    /// A follower's source etcd cluster; 0 for a Tern cluster's learner.
    source_cluster_id: u64,
    raw_size: u64,
}

/// Take one full backup; returns its manifest once it is visible.
pub async fn take(
    member: &Arc<Member>,
    target: &Target,
    settings: &Settings,
) -> Result<Manifest, BackupError> {
    let started = Utc::now();
    // A directory of our own even inside an operator's staging dir: it is
    // wiped before every copy, and the operator's dir may be shared (/var/tmp,
    // or two learners on one host).
    let staging = match &settings.staging_dir {
        Some(dir) => dir.join(format!("tern-backup-{:x}", member.member_id)),
        None => member.data_dir.join("backup-staging"),
    };
    let copy = {
        let state_path = member.data_dir.join("state.db");
        let staging = staging.clone();
        tokio::task::spawn_blocking(move || copy_state_for_backup(&state_path, &staging))
            .await
            .map_err(|e| BackupError::Snapshot(e.to_string()))??
    };
    let id = manifest::new_id(started, copy.revision);
    let data_name = manifest::data_name(&id);
    let stored = upload(target, &data_name, &copy.path, settings).await;
    let _ = std::fs::remove_file(&copy.path);
    let (size, sha256) = stored?;
    let manifest = Manifest {
        format_version: manifest::FORMAT_VERSION,
        id: id.clone(),
        cluster_id: format!("{:x}", copy.cluster_id),
        member_id: format!("{:x}", copy.member_id),
        source_etcd_cluster_id: (copy.source_cluster_id != 0)
            .then(|| format!("{:x}", copy.source_cluster_id)),
        revision: copy.revision,
        raft_index: copy.raft_index,
        raft_term: copy.raft_term,
        compact_revision: copy.compact_revision,
        key_count: copy.key_count,
        kv_hash: copy.kv_hash,
        object: StoredObject {
            name: data_name,
            size,
            sha256,
            raw_size: copy.raw_size,
        },
        compression: Compression {
            algorithm: "zstd".into(),
            level: settings.zstd_level,
        },
        encryption: Encryption {
            algorithm: "age-x25519".into(),
            recipients: settings.recipients.iter().map(|r| r.to_string()).collect(),
        },
        content: manifest::CONTENT.into(),
        started_at: started,
        finished_at: Utc::now(),
        tool: format!("tern-learner {}", env!("CARGO_PKG_VERSION")),
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Manifest(e.to_string()))?;
    target
        .store
        .put(
            &target.path(&manifest::manifest_name(&id)),
            PutPayload::from(json),
        )
        .await
        .map_err(|e| BackupError::Manifest(e.to_string()))?;
    Ok(manifest)
}

/// Copy the state and compute what the manifest says about it, from the
/// copy itself: it is exactly the state at its applied index.
fn copy_state_for_backup(state_path: &FsPath, staging: &FsPath) -> Result<Copy, BackupError> {
    // Whatever an interrupted run left here is useless now.
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).map_err(|e| io_failure(&e))?;
    let path = staging.join("state.db");
    let copied = describe_copy(state_path, &path);
    if copied.is_err() {
        // A half-written copy only takes the space the next run needs.
        let _ = std::fs::remove_file(&path);
    }
    copied
}

/// The copy at `path` and what the manifest says about it.
fn describe_copy(state_path: &FsPath, path: &FsPath) -> Result<Copy, BackupError> {
    let snapshot = |e: &dyn std::fmt::Display| BackupError::Snapshot(e.to_string());
    let (state, _) = copy_state(state_path, path).map_err(|e| match e {
        MvccError::Sqlite(e) => sqlite_failure(&e),
        e => snapshot(&e),
    })?;
    let conn = rusqlite::Connection::open(path).map_err(|e| sqlite_failure(&e))?;
    let kv_hash =
        read::hash(&conn, state.revision, state.compact_revision).map_err(|e| snapshot(&e))?;
    let key_count = read::key_count(&conn).map_err(|e| snapshot(&e))?;
    let cluster_id = read::meta(&conn, "cluster_id").map_err(|e| snapshot(&e))? as u64;
    let member_id = read::meta(&conn, "member_id").map_err(|e| snapshot(&e))? as u64;
    let source_cluster_id =
        read::meta(&conn, crate::follow::SOURCE_CLUSTER_ID).map_err(|e| snapshot(&e))? as u64;
    conn.execute(
        "INSERT OR REPLACE INTO about (topic, text) VALUES ('backup', ?1)",
        [format!(
            "A tern-learner backup of cluster {cluster_id:x} at revision {} (raft index {}), \
             taken {}. Read it like a data dir's state.db; see `example`.",
            state.revision,
            state.applied_index,
            Utc::now().to_rfc3339()
        )],
    )
    .map_err(|e| sqlite_failure(&e))?;
    drop(conn);
    let raw_size = std::fs::metadata(path).map_err(|e| io_failure(&e))?.len();
    Ok(Copy {
        path: path.to_path_buf(),
        revision: state.revision,
        raft_index: state.applied_index,
        raft_term: state.applied_term,
        compact_revision: state.compact_revision,
        key_count: key_count as u64,
        kv_hash,
        cluster_id,
        member_id,
        source_cluster_id,
        raw_size,
    })
}

/// Stream `file` through zstd and age into `name`; returns the stored size
/// and sha256.
async fn upload(
    target: &Target,
    name: &str,
    file: &FsPath,
    settings: &Settings,
) -> Result<(u64, String), BackupError> {
    let (parts_tx, mut parts) = mpsc::channel::<Bytes>(PARTS_QUEUED);
    let encoder = {
        let file = file.to_path_buf();
        let level = settings.zstd_level;
        let recipients = settings.recipients.clone();
        tokio::task::spawn_blocking(move || encode(&file, level, &recipients, parts_tx))
    };
    let location = target.path(name);
    let mut upload = target
        .store
        .put_multipart(&location)
        .await
        .map_err(|e| BackupError::Upload(e.to_string()))?;
    let uploaded = async {
        let mut inflight = FuturesUnordered::new();
        while let Some(part) = parts.recv().await {
            inflight.push(upload.put_part(PutPayload::from(part)));
            if inflight.len() >= PARTS_IN_FLIGHT {
                if let Some(done) = inflight.next().await {
                    done?;
                }
            }
        }
        while let Some(done) = inflight.next().await {
            done?;
        }
        Ok::<(), object_store::Error>(())
    }
    .await;
    // The encoder stops once the channel is gone; its error explains more
    // than the upload's "channel closed".
    drop(parts);
    let encoded = encoder
        .await
        .map_err(|e| BackupError::Snapshot(e.to_string()))?;
    let result = match (uploaded, encoded) {
        (Ok(()), Ok(stored)) => upload
            .complete()
            .await
            .map(|_| stored)
            .map_err(|e| BackupError::Upload(e.to_string())),
        (Err(e), _) => Err(BackupError::Upload(e.to_string())),
        (Ok(()), Err(e)) => Err(e),
    };
    if result.is_err() {
        if let Err(e) = upload.abort().await {
            tracing::warn!(error = %e, object = %location, "cannot abort the multipart upload");
        }
    }
    result
}

/// The blocking half: file → zstd → age → parts. Returns the stored size
/// and sha256.
fn encode(
    file: &FsPath,
    level: i32,
    recipients: &[age::x25519::Recipient],
    parts: mpsc::Sender<Bytes>,
) -> Result<(u64, String), BackupError> {
    let snapshot = |e: &dyn std::fmt::Display| BackupError::Snapshot(e.to_string());
    let mut input = std::fs::File::open(file).map_err(|e| snapshot(&e))?;
    let sink = PartWriter {
        parts,
        buffer: Vec::with_capacity(PART_SIZE),
        hasher: Sha256::new(),
        size: 0,
    };
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| BackupError::Encrypt(e.to_string()))?;
    let encrypted = encryptor
        .wrap_output(sink)
        .map_err(|e| BackupError::Encrypt(e.to_string()))?;
    let mut compressed =
        zstd::stream::write::Encoder::new(encrypted, level).map_err(|e| snapshot(&e))?;
    std::io::copy(&mut input, &mut compressed).map_err(pipeline_error)?;
    let encrypted = compressed.finish().map_err(pipeline_error)?;
    let mut sink = encrypted.finish().map_err(pipeline_error)?;
    sink.flush_part().map_err(pipeline_error)?;
    Ok((sink.size, hex(&sink.hasher.finalize())))
}

/// An I/O error in the pipeline: the uploader went away, or the disk.
fn pipeline_error(e: std::io::Error) -> BackupError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        BackupError::Upload("upload stopped".into())
    } else {
        BackupError::Snapshot(e.to_string())
    }
}

/// Cuts the encrypted stream into parts for the uploader, hashing and
/// counting what will be stored.
struct PartWriter {
    parts: mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
    hasher: Sha256,
    size: u64,
}

impl PartWriter {
    fn flush_part(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let part = std::mem::replace(&mut self.buffer, Vec::with_capacity(PART_SIZE));
        self.parts
            .blocking_send(Bytes::from(part))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PART_SIZE - self.buffer.len());
        self.buffer.extend_from_slice(&data[..n]);
        self.hasher.update(&data[..n]);
        self.size += n as u64;
        if self.buffer.len() == PART_SIZE {
            self.flush_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A full staging area is its own failure reason: the operator's fix is
/// space, not a bug report.
fn sqlite_failure(e: &rusqlite::Error) -> BackupError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => BackupError::StagingFull(e.to_string()),
        _ => BackupError::Snapshot(e.to_string()),
    }
}

fn io_failure(e: &std::io::Error) -> BackupError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        BackupError::StagingFull(e.to_string())
    } else {
        BackupError::Snapshot(e.to_string())
    }
}
