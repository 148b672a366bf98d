//! The Raft log of earlier versions, `raft.db`: a SQLite file with an
//! `entries` table and a `state` table (hard state, conf state, snapshot
//! marker). A data dir that has one is migrated to the log directory on
//! open ([`migrate`]), once; nothing else reads it.

use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::wal::{Record, Wal, WalError};

/// The older log's file in a data dir.
pub const LEGACY_FILE: &str = "raft.db";

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("cannot migrate {LEGACY_FILE}: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot migrate {LEGACY_FILE}: corrupt record {what}: {source}")]
    Decode {
        what: String,
        source: protobuf::ProtobufError,
    },
    #[error("cannot migrate {LEGACY_FILE}: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot migrate {LEGACY_FILE}: {0}")]
    Wal(#[from] WalError),
}

/// If `data_dir` holds a `raft.db` and no log directory yet, write its
/// contents as the log directory `dir` and remove it. The new directory is
/// built beside and renamed into place, so a crash midway leaves the old
/// file as it was (and a crash after the rename, the new log with the old
/// file, which the next open removes).
pub fn migrate(data_dir: &Path, dir: &Path) -> Result<(), LegacyError> {
    let legacy = data_dir.join(LEGACY_FILE);
    if !legacy.exists() {
        return Ok(());
    }
    if !dir.exists() {
        let building = data_dir.join("raft-log.migrating");
        if building.exists() {
            std::fs::remove_dir_all(&building)?;
        }
        let records = read(&legacy)?;
        let (mut wal, _) = Wal::open(&building)?;
        wal.restart(&records)?;
        drop(wal);
        std::fs::rename(&building, dir)?;
        std::fs::File::open(data_dir)?.sync_all()?;
        tracing::info!(
            entries = records.len().saturating_sub(3),
            "migrated the raft log from {LEGACY_FILE} to {}",
            dir.display()
        );
    }
    for suffix in ["", "-wal", "-shm"] {
        let path = data_dir.join(format!("{LEGACY_FILE}{suffix}"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// The older log as records: its marker (as a restart), conf state, hard
/// state, then the entries after the marker.
fn read(path: &Path) -> Result<Vec<Record>, LegacyError> {
    // Read-write: SQLite folds a WAL left by a crash into what it reads.
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let marker: SnapshotMetadata = load(&conn, "snapshot")?.unwrap_or_default();
    let mut records = vec![Record::Restart(marker.clone())];
    if let Some(cs) = load::<ConfState>(&conn, "conf_state")? {
        records.push(Record::ConfState(cs));
    }
    if let Some(hs) = load::<HardState>(&conn, "hard_state")? {
        records.push(Record::HardState(hs));
    }
    let mut stmt = conn.prepare("SELECT idx, entry FROM entries WHERE idx > ?1 ORDER BY idx")?;
    let mut rows = stmt.query([marker.index as i64])?;
    while let Some(row) = rows.next()? {
        let idx: i64 = row.get(0)?;
        let bytes: Vec<u8> = row.get(1)?;
        let entry = Entry::parse_from_bytes(&bytes).map_err(|source| LegacyError::Decode {
            what: format!("entry {idx}"),
            source,
        })?;
        records.push(Record::Entry(entry));
    }
    Ok(records)
}

fn load<M: protobuf::Message>(conn: &Connection, name: &str) -> Result<Option<M>, LegacyError> {
    let bytes: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM state WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    bytes
        .map(|b| {
            M::parse_from_bytes(&b).map_err(|source| LegacyError::Decode {
                what: name.to_string(),
                source,
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::log_store::{LogStore, LOG_DIR};
    use raft::{GetEntriesContext, Storage};

    fn store<M: protobuf::Message>(conn: &Connection, name: &str, m: &M) {
        conn.execute(
            "INSERT OR REPLACE INTO state (name, value) VALUES (?1, ?2)",
            (name, m.write_to_bytes().unwrap()),
        )
        .unwrap();
    }

    /// A data dir of the SQLite-log versions opens with its log intact,
    /// and the old file is gone.
    #[test]
    fn a_raft_db_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(LEGACY_FILE)).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE entries (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
             CREATE TABLE state (name TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )
        .unwrap();
        let cs = ConfState {
            voters: vec![7],
            learners: vec![9],
            ..Default::default()
        };
        let hs = HardState {
            term: 4,
            vote: 7,
            commit: 11,
            ..Default::default()
        };
        let marker = SnapshotMetadata {
            index: 8,
            term: 3,
            conf_state: Some(cs.clone()).into(),
            ..Default::default()
        };
        store(&conn, "conf_state", &cs);
        store(&conn, "hard_state", &hs);
        store(&conn, "snapshot", &marker);
        // Rows at or below the marker are dead, as a compaction left them.
        for idx in 5..=12u64 {
            let e = Entry {
                index: idx,
                term: 3 + u64::from(idx > 10),
                data: vec![idx as u8; 10].into(),
                ..Default::default()
            };
            conn.execute(
                "INSERT INTO entries (idx, entry) VALUES (?1, ?2)",
                (idx as i64, e.write_to_bytes().unwrap()),
            )
            .unwrap();
        }
        drop(conn);

        let log = LogStore::open(dir.path(), None).unwrap();
        assert_eq!(log.hard_state(), &hs);
        assert_eq!(log.conf_state(), &cs);
        assert_eq!(log.first_index().unwrap(), 9);
        assert_eq!(log.last_index().unwrap(), 12);
        assert_eq!(log.term(8).unwrap(), 3);
        assert_eq!(log.term(12).unwrap(), 4);
        let entries = log
            .entries(9, 13, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(entries[3].data.as_ref(), &[12u8; 10]);
        drop(log);
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(dir.path().join(LOG_DIR).is_dir());
        // And again, from the new log.
        let log = LogStore::open(dir.path(), None).unwrap();
        assert_eq!(log.last_index().unwrap(), 12);
        assert_eq!(log.hard_state(), &hs);
    }
}
