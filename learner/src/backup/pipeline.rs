//! One full backup: a consistent image of the state at one revision,
//! streamed through zstd and age into a multipart upload, then the
//! manifest.
//!
//! The image is read page by page from one read transaction
//! ([`StateImage`]; the learner keeps applying and serving meanwhile), and
//! what the manifest says of it (revision, key count, hash) is read in that
//! same transaction first. Nothing is written to the local disk: a copy of
//! the state made first would write as much again, and at 1 M keys that
//! disk traffic stalled the primary's commits beside it. A blocking thread
//! feeds the pages through the zstd encoder and the age encryptor into
//! [`PART_SIZE`] parts, hashing what will be stored; the async side uploads
//! at most [`PARTS_IN_FLIGHT`] parts at once, so memory stays bounded
//! whatever the state size. On any failure the multipart upload is aborted
//! and no manifest is written, so the backup never appears.

use std::io::Write;
use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use futures::stream::{FuturesUnordered, StreamExt};
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tern_primary::member::Member;
use tern_primary::mvcc::image::{ImageError, StateImage};
use tern_primary::mvcc::read;
use tokio::sync::mpsc;

use super::background;
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
}

/// What the manifest says of an image, read in the image's transaction.
struct Described {
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
    // Everything applied so far is in the backup, as in etcd's snapshot
    // (which commits its backend first).
    member
        .visible(member.node.status.applied_index())
        .await
        .map_err(|e| BackupError::Snapshot(e.message().to_string()))?;
    let (image, described) = {
        let state_path = member.data_dir.join("state.db");
        background::run("backup-read", move || open_image(&state_path))
            .await
            .map_err(BackupError::Snapshot)??
    };
    let id = manifest::new_id(started, described.revision);
    let data_name = manifest::data_name(&id);
    let (size, sha256) = upload(target, &data_name, image, settings).await?;
    let manifest = Manifest {
        format_version: manifest::FORMAT_VERSION,
        id: id.clone(),
        cluster_id: format!("{:x}", described.cluster_id),
        member_id: format!("{:x}", described.member_id),
        source_etcd_cluster_id: (described.source_cluster_id != 0)
            .then(|| format!("{:x}", described.source_cluster_id)),
        revision: described.revision,
        raft_index: described.raft_index,
        raft_term: described.raft_term,
        compact_revision: described.compact_revision,
        key_count: described.key_count,
        kv_hash: described.kv_hash,
        object: StoredObject {
            name: data_name,
            size,
            sha256,
            raw_size: described.raw_size,
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

/// Start the image's read transaction and read what the manifest says
/// about it there.
fn open_image(state_path: &FsPath) -> Result<(StateImage, Described), BackupError> {
    let snapshot = |e: &dyn std::fmt::Display| BackupError::Snapshot(e.to_string());
    let image = StateImage::open(state_path).map_err(|e| snapshot(&e))?;
    let conn = image.conn();
    let state = read::store_state(conn).map_err(|e| snapshot(&e))?;
    let kv_hash =
        read::hash(conn, state.revision, state.compact_revision).map_err(|e| snapshot(&e))?;
    let key_count = read::key_count(conn).map_err(|e| snapshot(&e))?;
    let cluster_id = read::meta(conn, "cluster_id").map_err(|e| snapshot(&e))? as u64;
    let member_id = read::meta(conn, "member_id").map_err(|e| snapshot(&e))? as u64;
    let source_cluster_id =
        read::meta(conn, crate::follow::SOURCE_CLUSTER_ID).map_err(|e| snapshot(&e))? as u64;
    let described = Described {
        revision: state.revision,
        raft_index: state.applied_index,
        raft_term: state.applied_term,
        compact_revision: state.compact_revision,
        key_count: key_count as u64,
        kv_hash,
        cluster_id,
        member_id,
        source_cluster_id,
        raw_size: image.size(),
    };
    Ok((image, described))
}

/// Stream `image` through zstd and age into `name`; returns the stored size
/// and sha256.
async fn upload(
    target: &Target,
    name: &str,
    image: StateImage,
    settings: &Settings,
) -> Result<(u64, String), BackupError> {
    let (parts_tx, mut parts) = mpsc::channel::<Bytes>(PARTS_QUEUED);
    let encoder = {
        let level = settings.zstd_level;
        let recipients = settings.recipients.clone();
        background::run("backup-encode", move || {
            encode(&image, level, &recipients, parts_tx)
        })
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
    let encoded = encoder.await.map_err(BackupError::Snapshot)?;
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

/// The blocking half: pages → zstd → age → parts. Returns the stored size
/// and sha256.
fn encode(
    image: &StateImage,
    level: i32,
    recipients: &[age::x25519::Recipient],
    parts: mpsc::Sender<Bytes>,
) -> Result<(u64, String), BackupError> {
    let snapshot = |e: &dyn std::fmt::Display| BackupError::Snapshot(e.to_string());
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
    image.write_to(&mut compressed).map_err(|e| match e {
        ImageError::Write(e) => pipeline_error(e),
        e => snapshot(&e),
    })?;
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
