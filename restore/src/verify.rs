//! `verify`: prove a backup restores. Download it (checking size and
//! sha256 against the manifest as it streams to disk), decrypt with the age
//! identity, decompress, run SQLite's integrity check, and recompute the
//! revision, key count and HashKV the manifest claims.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tern_learner::backup::manifest::Manifest;
use tern_learner::backup::target::Target;
use tern_primary::mvcc::read;

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
    let encrypted = dir.join("backup.db.zst.age");
    progress.set_length(manifest.object.size);
    progress.set_message(format!("downloading {}", manifest.id));
    let (size, sha256) = download(target, &manifest.object.name, &encrypted, progress).await?;
    progress.finish_and_clear();
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
    let state = dir.join("state.db");
    {
        let (encrypted, state, identities) =
            (encrypted.clone(), state.clone(), identities.to_vec());
        tokio::task::spawn_blocking(move || decrypt(&encrypted, &state, &identities)).await??;
    }
    let _ = std::fs::remove_file(&encrypted);
    let checked = {
        let state = state.clone();
        let manifest = manifest.clone();
        tokio::task::spawn_blocking(move || check_state(&state, &manifest)).await??
    };
    Ok((state, checked))
}

async fn download(
    target: &Target,
    name: &str,
    to: &Path,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(u64, String)> {
    let mut stream = target
        .store
        .get(&target.path(name))
        .await
        .with_context(|| format!("downloading {name}"))?
        .into_stream();
    let mut file = std::fs::File::create(to)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("downloading {name}"))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        progress.inc(chunk.len() as u64);
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, sha256))
}

fn decrypt(from: &Path, to: &Path, identities: &[age::x25519::Identity]) -> anyhow::Result<()> {
    let input = std::io::BufReader::new(std::fs::File::open(from)?);
    let reader = decryptor(input, identities)?;
    let mut decoder = zstd::stream::read::Decoder::new(reader).context("not zstd")?;
    let mut out = std::fs::File::create(to)?;
    std::io::copy(&mut decoder, &mut out).context("decrypting and decompressing")?;
    out.sync_all()?;
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

fn check_state(path: &Path, manifest: &Manifest) -> anyhow::Result<Verified> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .context("not an SQLite file")?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if integrity != "ok" {
        bail!(
            "backup {}: SQLite integrity check: {integrity}",
            manifest.id
        );
    }
    let state = read::store_state(&conn)?;
    let key_count = read::key_count(&conn)?;
    // Format 1 manifests carry Tern's own first hash; later ones etcd's.
    let kv_hash = if manifest.format_version < 2 {
        read::tern_v1_hash(&conn, state.revision)?
    } else {
        read::hash(&conn, state.revision, state.compact_revision)?
    };
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
