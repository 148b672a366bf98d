//! `import-etcd`: a file from `etcdctl snapshot save` (etcd 3.4 or later: a
//! bbolt backend followed by its sha256) becomes the data dir of a new
//! single-member Tern cluster, so an etcd user can move over with their
//! keys, history and leases.
//!
//! The snapshot is read with [`bbolt::Reader`] and its records decoded with
//! [`etcd_snapshot`], both streaming; the state is built in a scratch file
//! next to the target and handed to [`seed::into_data_dir`], the step a
//! Tern backup's restore ends with too. A bad file fails before anything is
//! written into the target.
//!
//! What etcd itself serves after `etcdctl snapshot restore` is what the
//! imported member serves:
//! - every revision in the `key` bucket, deletions included, becomes a
//!   `kv_history` row (etcd's sub revision kept), and the newest per key, if
//!   not a deletion, its `kv_keys` row;
//! - the store revision is the highest main revision there, or the
//!   compaction revision if that is higher (a compaction can remove the
//!   newest revisions, deletions, from the bucket), as etcd's
//!   `mvcc.store.restore` sets it;
//! - the compaction revision is `finishedCompactRev`; a compaction etcd
//!   started and did not finish (`scheduledCompactRev` ahead) is finished
//!   here, as etcd finishes it at its next start;
//! - leases keep their ids and TTLs (a new leader grants every lease a full
//!   TTL, in etcd and in Tern alike);
//! - users (with their bcrypt hashes), roles, permissions and whether auth
//!   is on carry over as they are.
//!
//! Members, alarms and the Raft position do not carry over: the new
//! cluster's ids come from `--name`, `--initial-advertise-peer-urls` and
//! `--initial-cluster-token`, as with `etcdutl snapshot restore`. Tern's Raft
//! log starts after etcd's `consistent_index` (etcd's restore restarts at
//! the member count instead; only `endpoint status`'s raft index shows it).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::bbolt;
use crate::mvcc::etcd_snapshot::{self, EtcdMeta};
use crate::mvcc::{read, write, MvccStore};
use crate::seed::{self, Identity};
use anyhow::{bail, Context};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What an import did, for the human line and `--json`.
#[derive(Debug, Serialize)]
pub struct Imported {
    pub snapshot: PathBuf,
    pub data_dir: PathBuf,
    /// Whether the file carried `etcdctl snapshot save`'s sha256 (checked)
    /// or was a bare bbolt file (a copy of `member/snap/db`).
    pub sha256_checked: bool,
    pub revision: i64,
    pub compact_revision: i64,
    /// Keys that exist at `revision`.
    pub keys: u64,
    /// Revisions of keys held (puts and deletions), what reads at older
    /// revisions and watches from them can see.
    pub history_rows: u64,
    pub leases: u64,
    /// The Raft index the new cluster's log starts after.
    pub raft_index: u64,
    /// Tern's HashKV at `revision`, what the started member answers.
    pub kv_hash: u32,
    /// Hex, as `etcdctl member list` shows it.
    pub member_id: String,
    pub cluster_id: String,
    /// What the import could not carry over.
    pub warnings: Vec<String>,
}

/// Import the etcd snapshot at `snapshot` into `data_dir`, which must not
/// exist yet or be empty.
pub fn import(snapshot: &Path, data_dir: &Path, who: &Identity) -> anyhow::Result<Imported> {
    // Checked before the work, and again by into_data_dir just before the
    // state moves in.
    seed::refuse_non_empty(data_dir)?;
    // It goes away with everything in it if anything fails.
    let scratch = seed::scratch_beside(data_dir)?;
    let state_path = scratch.path().join("state.db");
    let (mut built, sha256_checked) = state_file(snapshot, &state_path)?;

    if !sha256_checked {
        built.warnings.push(
            "no sha256 at the end of the file (not from `etcdctl snapshot save`?): \
             only the bbolt structure and the records were checked"
                .into(),
        );
    }

    let restored = seed::into_data_dir(&state_path, data_dir, who)?;
    Ok(Imported {
        snapshot: snapshot.to_path_buf(),
        data_dir: data_dir.to_path_buf(),
        sha256_checked,
        revision: restored.revision,
        compact_revision: built.compact_revision,
        keys: built.keys,
        history_rows: built.history_rows,
        leases: built.leases,
        raft_index: built.raft_index,
        kv_hash: built.kv_hash,
        member_id: format!("{:x}", restored.member_id),
        cluster_id: format!("{:x}", restored.cluster_id),
        warnings: built.warnings,
    })
}

/// The state file at `state_path` built from the etcd snapshot at
/// `snapshot`: keys, history, leases and auth (no members, no Raft
/// position). Also whether the snapshot carried a sha256 (checked).
pub fn state_file(snapshot: &Path, state_path: &Path) -> anyhow::Result<(Built, bool)> {
    // Every failure that is the file's names the file.
    let in_file = || snapshot.display().to_string();
    let db = bbolt::Reader::open(snapshot).with_context(in_file)?;
    let sha256_checked = check_sha256(snapshot, &db).with_context(in_file)?;
    require_etcd_buckets(&db).with_context(in_file)?;
    let built = build_state(&db, state_path).with_context(in_file)?;
    let auth = read_auth(&db).with_context(in_file)?;
    let conn = crate::mvcc::schema::open(state_path)?;
    crate::auth::store::save(&conn, &auth)?;
    Ok((built, sha256_checked))
}

/// `etcdctl snapshot save` appends the sha256 of the database to it; etcd
/// recognizes it by the file's length (512-byte aligned plus 32), and so
/// does this. Returns whether there was one (it must then match).
fn check_sha256(path: &Path, db: &bbolt::Reader) -> anyhow::Result<bool> {
    let len = std::fs::metadata(path)?.len();
    if len % 512 != 32 {
        return Ok(false);
    }
    let body = len - 32;
    if db.db_len() > body {
        bail!(
            "truncated: the database needs {} bytes before its sha256, the file holds {body}",
            db.db_len()
        );
    }
    let mut file = File::open(path)?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = body;
    while left > 0 {
        let n = buf.len().min(left as usize);
        file.read_exact(&mut buf[..n])?;
        sha.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; 32];
    file.read_exact(&mut stored)?;
    let computed = sha.finalize();
    if computed.as_slice() != stored {
        bail!(
            "sha256 mismatch: the file says {}, its content hashes to {}: the snapshot is damaged",
            hex(&stored),
            hex(&computed)
        );
    }
    Ok(true)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`build_state`] wrote.
pub struct Built {
    pub compact_revision: i64,
    pub keys: u64,
    pub history_rows: u64,
    pub leases: u64,
    pub raft_index: u64,
    pub kv_hash: u32,
    pub warnings: Vec<String>,
}

/// Write Tern's state for the etcd backend `db` into a new file at `path`.
fn build_state(db: &bbolt::Reader, path: &Path) -> anyhow::Result<Built> {
    let mut meta = EtcdMeta::default();
    for entry in bucket(db, b"meta")? {
        let entry = entry?;
        meta.add(&entry.key, &entry.value)
            .map_err(anyhow::Error::msg)?;
    }

    let store = MvccStore::open(path)?;
    let conn = store.connection();
    let tx = conn.unchecked_transaction()?;
    let mut highest = 0i64;
    {
        let mut insert = tx.prepare(
            "INSERT INTO kv_history (key, mod_revision, sub, create_revision, version, lease, value, tombstone) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        // Keys changed in the revision being read: each once at most.
        let mut in_revision = std::collections::HashSet::new();
        for entry in bucket(db, b"key")? {
            let entry = entry?;
            let row = etcd_snapshot::history_row(&entry.key, &entry.value)
                .map_err(|e| anyhow::anyhow!("key bucket: {e}"))?;
            if row.mod_revision != highest {
                in_revision.clear();
            }
            if !in_revision.insert(row.key.clone()) {
                bail!(
                    "key bucket: key {:?} changes twice in revision {}",
                    String::from_utf8_lossy(&row.key),
                    row.mod_revision
                );
            }
            insert.execute((
                &row.key,
                row.mod_revision,
                row.sub,
                row.create_revision,
                row.version,
                row.lease,
                &row.value,
                row.tombstone,
            ))?;
            // The bucket is in revision order.
            highest = row.mod_revision;
        }
    }
    // Link each key's rows, and point each live key at its newest row.
    crate::mvcc::schema::link_history(&tx)?;
    tx.execute(
        "INSERT INTO kv_keys (key, create_revision, mod_revision, version, lease, history_id) \
         SELECT h.key, h.create_revision, h.mod_revision, h.version, h.lease, h.id \
         FROM (SELECT id, row_number() OVER (PARTITION BY key ORDER BY mod_revision DESC) AS n \
               FROM kv_history) newest \
         JOIN kv_history h ON h.id = newest.id WHERE newest.n = 1 AND h.tombstone = 0",
        [],
    )?;

    let mut leases = 0u64;
    if let Some(entries) = db.bucket(b"lease")? {
        let mut insert = tx.prepare("INSERT INTO leases (id, ttl) VALUES (?1, ?2)")?;
        for entry in entries {
            let entry = entry?;
            let (id, ttl) = etcd_snapshot::lease_record(&entry.key, &entry.value)
                .map_err(|e| anyhow::anyhow!("lease bucket: {e}"))?;
            insert.execute((id, ttl))?;
            leases += 1;
        }
    }

    // etcd's mvcc.store.restore: the highest revision seen, unless the
    // compaction is later (it may have removed the newest revisions).
    let revision = highest.max(meta.finished_compact).max(1);
    let raft_index = meta.consistent_index.max(1);
    write::set_meta(&tx, "revision", revision)?;
    write::set_meta(&tx, "compact_revision", meta.finished_compact)?;
    write::set_meta(&tx, "applied_index", raft_index as i64)?;
    write::set_meta(&tx, "applied_term", meta.term.max(1) as i64)?;
    tx.commit()?;
    drop(store);

    // Reopen so the store reads the counters just written.
    let mut store = MvccStore::open(path)?;
    if meta.scheduled_compact > meta.finished_compact {
        let mut batch = store.batch()?;
        batch.compact(meta.scheduled_compact)?;
        batch.commit()?;
    }
    let state = store.state();
    let conn = store.connection();
    let keys = read::key_count(conn)?;
    let history_rows: i64 = conn.query_row("SELECT count(*) FROM kv_history", [], |r| r.get(0))?;
    let kv_hash = read::hash(conn, state.revision, state.compact_revision)?;
    let orphans: i64 = conn.query_row(
        "SELECT count(*) FROM kv_keys WHERE lease != 0 AND lease NOT IN (SELECT id FROM leases)",
        [],
        |r| r.get(0),
    )?;
    let mut warnings = Vec::new();
    if orphans > 0 {
        warnings.push(format!(
            "{orphans} keys are attached to leases the snapshot does not hold; \
             like etcd, they are kept and never expire"
        ));
    }
    drop(store);
    Ok(Built {
        compact_revision: state.compact_revision,
        keys: keys as u64,
        history_rows: history_rows as u64,
        leases,
        raft_index,
        kv_hash,
        warnings,
    })
}

/// etcd always has `key` and `meta`; a bbolt file without them is
/// something else.
fn require_etcd_buckets(db: &bbolt::Reader) -> anyhow::Result<()> {
    let buckets = db.bucket_names()?;
    for required in [&b"key"[..], b"meta"] {
        if !buckets.iter().any(|b| b == required) {
            let names: Vec<_> = buckets.iter().map(|b| String::from_utf8_lossy(b)).collect();
            bail!(
                "not an etcd snapshot: no '{}' bucket (it has: {})",
                String::from_utf8_lossy(required),
                names.join(", ")
            );
        }
    }
    Ok(())
}

/// Top-level bucket `name`, which must exist.
fn bucket<'a>(db: &'a bbolt::Reader, name: &[u8]) -> anyhow::Result<bbolt::Entries<'a>> {
    db.bucket(name)?.with_context(|| {
        format!(
            "not an etcd snapshot: no '{}' bucket",
            String::from_utf8_lossy(name)
        )
    })
}

/// etcd's users, roles and enabled flag, to carry over as they are
/// (passwords are bcrypt hashes both sides check).
fn read_auth(db: &bbolt::Reader) -> anyhow::Result<crate::auth::AuthState> {
    let mut auth = etcd_snapshot::EtcdAuth::default();
    let bad = |e: String| anyhow::anyhow!("auth buckets: {e}");
    if let Some(entries) = db.bucket(b"auth")? {
        for entry in entries {
            let entry = entry?;
            auth.add_flag(&entry.key, &entry.value).map_err(bad)?;
        }
    }
    if let Some(entries) = db.bucket(b"authUsers")? {
        for entry in entries {
            auth.add_user(&entry?.value).map_err(bad)?;
        }
    }
    if let Some(entries) = db.bucket(b"authRoles")? {
        for entry in entries {
            auth.add_role(&entry?.value).map_err(bad)?;
        }
    }
    Ok(auth.state)
}

/// Print what `import` did: one line (warnings on stderr), or `--json`.
pub fn report(imported: &Imported, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(imported)?);
        return Ok(());
    }
    for warning in &imported.warnings {
        eprintln!("warning: {warning}");
    }
    let compacted = match imported.compact_revision {
        0 => String::new(),
        c => format!(" (compacted at {c})"),
    };
    println!(
        "imported etcd snapshot {} into {}: revision {}{compacted}, {} keys, {} revisions of history, \
         {} leases, hash {}; member {} of new cluster {}",
        imported.snapshot.display(),
        imported.data_dir.display(),
        imported.revision,
        imported.keys,
        imported.history_rows,
        imported.leases,
        imported.kv_hash,
        imported.member_id,
        imported.cluster_id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd never changes a key twice in one revision; a `key` bucket that
    /// does is refused by name rather than imported as a history with two
    /// rows at one revision.
    #[test]
    fn a_key_changed_twice_in_one_revision_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = MvccStore::open(&dir.path().join("source.db")).unwrap();
        let mut batch = store.batch().unwrap();
        batch.entry(1, 1, |b| Ok(b.put(b"a", b"1", 0)?)).unwrap();
        batch.commit().unwrap();
        store
            .connection()
            .execute(
                "INSERT INTO kv_history (key, mod_revision, sub, create_revision, version, lease, \
                 value, tombstone) VALUES (CAST('a' AS BLOB), 2, 1, 2, 2, 0, CAST('2' AS BLOB), 0)",
                [],
            )
            .unwrap();
        let snapshot = dir.path().join("etcd.db");
        etcd_snapshot::write_etcd_snapshot(store.connection(), &snapshot).unwrap();

        let Err(refused) = state_file(&snapshot, &dir.path().join("state.db")) else {
            panic!("a key changed twice in one revision was imported");
        };
        let message = format!("{refused:#}");
        assert!(
            message.contains("key bucket: key \"a\" changes twice in revision 2"),
            "{message}"
        );
    }
}
