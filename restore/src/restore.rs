//! `restore`: a verified backup becomes the data dir of a new
//! single-member cluster, like `etcdutl snapshot restore`: new member and
//! cluster ids from `--name`, `--initial-advertise-peer-urls` and
//! `--initial-cluster-token` (the same flags then start it), the member
//! list reduced to that member, and a Raft log that starts right after the
//! backup's index with that member as the only voter.

use std::path::Path;

use anyhow::{bail, Context};
use tern_primary::identity;
use tern_primary::mvcc::{read, write};
use tern_primary::raft::LogStore;

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

/// Move the decrypted state file `state` into `data_dir` (which must not
/// hold anything yet) and make it a new cluster.
pub fn into_data_dir(state: &Path, data_dir: &Path, who: &Identity) -> anyhow::Result<Restored> {
    refuse_non_empty(data_dir)?;
    std::fs::create_dir_all(data_dir)?;
    let target = data_dir.join("state.db");
    if std::fs::rename(state, &target).is_err() {
        std::fs::copy(state, &target).context("copying the state into the data dir")?;
    }
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
    drop(conn);
    let mut log = LogStore::open(&data_dir.join("raft.db"), None)?;
    log.force_new_cluster(member_id, state.applied_index, state.applied_term)?;
    Ok(Restored {
        member_id,
        cluster_id,
        revision: state.revision,
    })
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
