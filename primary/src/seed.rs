//! Seeding a data dir: a state file (a verified backup's, or one built from
//! an etcd snapshot) becomes the data dir of a new
//! single-member cluster, like `etcdutl snapshot restore`: new member and
//! cluster ids from `--name`, `--initial-advertise-peer-urls` and
//! `--initial-cluster-token` (the same flags then start it), the member
//! list reduced to that member, and a Raft log that starts right after the
//! backup's index with that member as the only voter.

use std::path::Path;

use anyhow::{bail, Context};

use crate::identity;
use crate::mvcc::{read, write};
use crate::raft::LogStore;

pub struct Identity {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub token: String,
}

pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    pub revision: i64,
}

/// Make the decrypted state file `state` (in a scratch dir from
/// [`scratch_beside`]) a new cluster and move it into `data_dir`, which
/// must not hold anything. The whole data dir is built in the scratch dir
/// and renamed into place last, so a failure at any step leaves `data_dir`
/// as it was and a retry can run.
pub fn into_data_dir(state: &Path, data_dir: &Path, who: &Identity) -> anyhow::Result<Restored> {
    refuse_non_empty(data_dir)?;
    let scratch = state
        .parent()
        .context("the state file has no scratch dir")?;
    let built = scratch.join("data-dir");
    std::fs::create_dir(&built)?;
    let target = built.join("state.db");
    std::fs::rename(state, &target).context("moving the state into the new data dir")?;
    let member_id = identity::member_id(&who.peer_urls, &who.token, None);
    let cluster_id = identity::cluster_id(&[member_id]);
    let conn = rusqlite::Connection::open(&target)?;
    let tx = conn.unchecked_transaction()?;
    tx.execute("DELETE FROM members", [])?;
    tx.execute("DELETE FROM alarms", [])?;
    write::upsert_member(
        &tx,
        &(
            member_id,
            who.name.clone(),
            who.peer_urls.clone(),
            Vec::new(),
            false,
        ),
    )?;
    write::set_meta(&tx, "cluster_id", cluster_id as i64)?;
    write::set_meta(&tx, "member_id", member_id as i64)?;
    tx.commit()?;
    let state = read::store_state(&conn)?;
    // One self-contained file, whatever journal mode the state came in.
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;")?;
    drop(conn);
    {
        let mut log = LogStore::open(&built, None)?;
        let alone = crate::raft::takeover::Plan::new(member_id, &Default::default(), &[]);
        log.force_new_cluster(member_id, &alone, state.applied_index, state.applied_term)?;
    }
    refuse_non_empty(data_dir)?;
    if data_dir.exists() {
        // Empty (just checked): rename cannot replace a directory on
        // every platform, so make room.
        std::fs::remove_dir(data_dir)?;
    }
    std::fs::rename(&built, data_dir)
        .with_context(|| format!("moving the new data dir to {}", data_dir.display()))?;
    Ok(Restored {
        member_id,
        cluster_id,
        revision: state.revision,
    })
}

/// Scratch space beside `data_dir` (created if missing, removed on drop):
/// the new data dir moves into place with a rename, and /tmp may be too
/// small for the state. Resolved first, so `--data-dir .` or `x/..` puts
/// it beside the dir rather than inside it.
pub fn scratch_beside(data_dir: &Path) -> anyhow::Result<tempfile::TempDir> {
    let resolved = match data_dir.canonicalize() {
        Ok(path) => path,
        Err(_) => std::path::absolute(data_dir)?,
    };
    let parent = resolved
        .parent()
        .with_context(|| format!("{} has no parent dir", resolved.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(".tern-restore-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch dir in {}", parent.display()))
}

/// A restore never writes into a dir that holds anything: checked before
/// any download, and again just before moving the state in.
pub fn refuse_non_empty(data_dir: &Path) -> anyhow::Result<()> {
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        bail!(
            "{} is not empty: restore into a fresh data dir",
            data_dir.display()
        );
    }
    Ok(())
}
