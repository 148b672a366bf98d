//! `verify`: prove a backup restores. Download it, checking size and
//! sha256 against the manifest, while the same bytes are decrypted with the
//! age identity and decompressed into the state file (one pass, nothing
//! staged); then run SQLite's integrity check and, beside it, recompute the
//! revision, key count and HashKV the manifest claims.
//!
//! The state file is only handed on once every check passed. The stored
//! object's own checks (size, sha256) decide the error whenever they fail,
//! even if decryption failed first: a damaged object is "tampered or
//! damaged", whatever byte age tripped on.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetResultPayload, ObjectStoreExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tern_learner::backup::manifest::Manifest;
use tern_learner::backup::target::Target;
use tern_primary::mvcc::read;
use tokio::sync::mpsc;

/// Chunks of the stored object queued between the download and the
/// decrypting thread.
const CHUNKS_QUEUED: usize = 16;
/// Bytes read at a time from a `file://` store's object.
const FILE_CHUNK: usize = 1 << 20;

#[derive(Debug, Serialize)]
pub struct Verified {
    pub id: String,
    pub revision: i64,
    pub key_count: u64,
    pub kv_hash: u32,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

/// Download and check backup `manifest` into `dir`; returns the path of the
/// decrypted state file and what was checked.
pub async fn verify(
    target: &Target,
    manifest: &Manifest,
    identities: &[age::x25519::Identity],
    dir: &Path,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(PathBuf, Verified)> {
    progress.set_length(manifest.object.size);
    progress.set_message(format!("downloading {}", manifest.id));
    let state = dir.join("state.db");
    let (chunks, queue) = mpsc::channel::<Bytes>(CHUNKS_QUEUED);
    let decoder = {
        let (state, identities) = (state.clone(), identities.to_vec());
        tokio::task::spawn_blocking(move || decode(ChunkReader::new(queue), &state, &identities))
    };
    let downloaded = download(target, &manifest.object.name, chunks, progress).await;
    progress.finish_and_clear();
    let decoded = decoder.await?;
    let (size, sha256) = downloaded?;
    if size != manifest.object.size {
        bail!(
            "backup {}: stored object has {size} bytes, the manifest says {}",
            manifest.id,
            manifest.object.size
        );
    }
    if sha256 != manifest.object.sha256 {
        bail!(
            "backup {}: sha256 of the stored object is {sha256}, the manifest says {} (tampered or damaged)",
            manifest.id,
            manifest.object.sha256
        );
    }
    decoded?;
    let checked = {
        let state = state.clone();
        let manifest = manifest.clone();
        tokio::task::spawn_blocking(move || check_state(&state, &manifest)).await??
    };
    Ok((state, checked))
}

/// Read the stored object `name`, hashing and counting it, and pass it on
/// to `chunks`. Reads it to the end even if the receiver has gone (the
/// decrypting side failed): the object's own size and hash explain a
/// damaged object better than the byte decryption stopped at.
async fn download(
    target: &Target,
    name: &str,
    chunks: mpsc::Sender<Bytes>,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(u64, String)> {
    let got = target
        .store
        .get(&target.path(name))
        .await
        .with_context(|| format!("downloading {name}"))?;
    let mut seen = Seen::default();
    let range = got.range.clone();
    match got.payload {
        // A `file://` store: read the file in large chunks on a thread of
        // its own (object_store's stream of it hops threads every 8 KiB).
        GetResultPayload::File(mut file, path) => {
            let progress = progress.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<Seen> {
                // The object's bytes are the range object_store resolved
                // (all of it here), wherever the file is at.
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(range.start))
                    .with_context(|| format!("downloading {}", path.display()))?;
                let mut file = file.take(range.end - range.start);
                loop {
                    let mut chunk = vec![0u8; FILE_CHUNK];
                    let n = read_full(&mut file, &mut chunk)
                        .with_context(|| format!("downloading {}", path.display()))?;
                    if n == 0 {
                        return Ok(seen);
                    }
                    chunk.truncate(n);
                    progress.inc(n as u64);
                    let chunk = Bytes::from(chunk);
                    seen.count(&chunk);
                    if seen.forwarding {
                        seen.forwarding = chunks.blocking_send(chunk).is_ok();
                    }
                }
            })
            .await??
            .finish()
        }
        GetResultPayload::Stream(mut stream) => {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.with_context(|| format!("downloading {name}"))?;
                progress.inc(chunk.len() as u64);
                seen.count(&chunk);
                if seen.forwarding {
                    seen.forwarding = chunks.send(chunk).await.is_ok();
                }
            }
            seen.finish()
        }
    }
}

/// What the download has seen of the object.
struct Seen {
    hasher: Sha256,
    size: u64,
    /// Whether the decrypting side still takes chunks.
    forwarding: bool,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            hasher: Sha256::new(),
            size: 0,
            forwarding: true,
        }
    }
}

impl Seen {
    fn count(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
    }

    fn finish(self) -> anyhow::Result<(u64, String)> {
        let sha256 = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((self.size, sha256))
    }
}

/// Fill `buf` unless the input ends first; the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The downloaded chunks as one `Read`, on the decrypting thread.
struct ChunkReader {
    queue: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChunkReader {
    fn new(queue: mpsc::Receiver<Bytes>) -> Self {
        ChunkReader {
            queue,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.queue.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// age → zstd → the state file, synced.
fn decode(input: impl Read, to: &Path, identities: &[age::x25519::Identity]) -> anyhow::Result<()> {
    let reader = decryptor(input, identities)?;
    let mut decoder = zstd::stream::read::Decoder::new(reader).context("not zstd")?;
    let mut out = std::io::BufWriter::with_capacity(FILE_CHUNK, std::fs::File::create(to)?);
    std::io::copy(&mut decoder, &mut out).context("decrypting and decompressing")?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// The plaintext of an age file, or what is wrong: no identity matches
/// (the wrong key), or the header does not hold together (tampered or
/// damaged). Damage in the payload shows up while reading it.
pub fn decryptor<R: std::io::Read>(
    input: R,
    identities: &[age::x25519::Identity],
) -> anyhow::Result<impl std::io::Read> {
    let decryptor = age::Decryptor::new(input)
        .map_err(|e| anyhow::anyhow!("tampered or damaged: not a readable age file ({e})"))?;
    decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => anyhow::anyhow!(
                "cannot decrypt: no identity matches the recipients it was encrypted to (wrong identity?)"
            ),
            e => anyhow::anyhow!("tampered or damaged: cannot decrypt the age header ({e})"),
        })
}

/// SQLite's integrity check on one core and the manifest's numbers
/// recomputed on the other, each from a connection of its own; the
/// integrity check's verdict comes first.
fn check_state(path: &Path, manifest: &Manifest) -> anyhow::Result<Verified> {
    let open = || {
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .context("not an SQLite file")
    };
    let conn = open()?;
    let (integrity, computed) = std::thread::scope(|scope| {
        let integrity = scope.spawn(|| -> anyhow::Result<String> {
            Ok(open()?.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
        });
        let computed = (|| -> anyhow::Result<_> {
            let state = read::store_state(&conn)?;
            let key_count = read::key_count(&conn)?;
            // Format 1 manifests carry Tern's own first hash; later ones etcd's.
            let kv_hash = if manifest.format_version < 2 {
                read::tern_v1_hash(&conn, state.revision)?
            } else {
                read::hash(&conn, state.revision, state.compact_revision)?
            };
            Ok((state, key_count, kv_hash))
        })();
        let integrity = integrity
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the integrity check panicked")));
        (integrity, computed)
    });
    let integrity = integrity?;
    if integrity != "ok" {
        bail!(
            "backup {}: SQLite integrity check: {integrity}",
            manifest.id
        );
    }
    let (state, key_count, kv_hash) = computed?;
    let mut wrong = Vec::new();
    if state.revision != manifest.revision {
        wrong.push(format!(
            "revision {} (manifest {})",
            state.revision, manifest.revision
        ));
    }
    if key_count as u64 != manifest.key_count {
        wrong.push(format!(
            "key count {key_count} (manifest {})",
            manifest.key_count
        ));
    }
    if kv_hash != manifest.kv_hash {
        wrong.push(format!("hash {kv_hash} (manifest {})", manifest.kv_hash));
    }
    if !wrong.is_empty() {
        bail!(
            "backup {}: the state does not match its manifest: {}",
            manifest.id,
            wrong.join(", ")
        );
    }
    Ok(Verified {
        id: manifest.id.clone(),
        revision: state.revision,
        key_count: key_count as u64,
        kv_hash,
        stored_bytes: manifest.object.size,
        raw_bytes: manifest.object.raw_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_primary::mvcc::MvccStore;

    fn manifest(format_version: u32, revision: i64, kv_hash: u32) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format_version": format_version,
            "id": "20261203T120000.000Z-r3",
            "cluster_id": "1",
            "member_id": "2",
            "revision": revision,
            "raft_index": 3,
            "raft_term": 1,
            "compact_revision": 0,
            "key_count": 2,
            "kv_hash": kv_hash,
            "object": {"name": "x", "size": 0, "sha256": "", "raw_size": 0},
            "compression": {"algorithm": "zstd", "level": 3},
            "encryption": {"algorithm": "age", "recipients": []},
            "content": "",
            "started_at": "2026-12-03T12:00:00Z",
            "finished_at": "2026-12-03T12:00:01Z",
            "tool": "test",
        }))
        .unwrap()
    }

    /// Backups taken before HashKV became etcd's carry Tern's first hash
    /// (manifest format 1); both kinds verify, and neither passes with the
    /// other's number.
    #[test]
    fn both_manifest_hashes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut store = MvccStore::open(&path).unwrap();
        let mut batch = store.batch().unwrap();
        for (i, key) in [&b"a"[..], b"b", b"a"].iter().enumerate() {
            batch
                .entry(i as u64 + 1, 1, |b| {
                    b.put(key, b"v", 0)?;
                    Ok(())
                })
                .unwrap();
        }
        batch.commit().unwrap();
        let state = store.state();
        let conn = store.connection();
        let etcd = read::hash(conn, state.revision, state.compact_revision).unwrap();
        let v1 = read::tern_v1_hash(conn, state.revision).unwrap();
        assert_ne!(etcd, v1);
        drop(store);
        check_state(&path, &manifest(2, state.revision, etcd)).expect("format 2");
        check_state(&path, &manifest(1, state.revision, v1)).expect("format 1");
        assert!(check_state(&path, &manifest(2, state.revision, v1)).is_err());
        assert!(check_state(&path, &manifest(1, state.revision, etcd)).is_err());
    }
}
