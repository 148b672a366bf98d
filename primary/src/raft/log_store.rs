//! The durable Raft log: entries, hard state, conf state and the snapshot
//! marker, in their own SQLite file (`raft.db`).
//!
//! `synchronous=FULL` in WAL mode makes every commit one fsync of the WAL, so
//! [`LogStore::persist`], called once per `Ready` with every entry of that
//! round, is the group commit: many proposals, one fsync. SQLite's own
//! journaling means a crash mid-write leaves the previous commit intact, so a
//! member can always start again.
//!
//! Entries since the last log compaction are also kept in memory, which is
//! what raft-rs reads through the [`Storage`] trait; compaction bounds them.
//!
//! [`LogStore::persist_beside`] writes on a thread the log keeps for its
//! lifetime ([`LogWriter`]) while the caller applies committed entries:
//! under load nearly every `Ready` has both, and a thread started per
//! `Ready` (as before) cost a `clone` and an exit per batch. The one
//! connection sits behind a mutex that the two threads never contend for:
//! the node always waits for the writer before it touches the log again.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::snapshot::Snapshots;

use crossbeam_channel::{Receiver, Sender};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use rusqlite::{Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("raft log: corrupt record {what}: {source}")]
    Decode {
        what: String,
        source: protobuf::ProtobufError,
    },
    #[error("raft log: entries are not contiguous (expected index {expected}, found {found})")]
    Gap { expected: u64, found: u64 },
    #[error("raft log: cannot start its writer thread: {0}")]
    Thread(std::io::Error),
    #[error("raft log: its writer thread stopped")]
    WriterStopped,
}

/// Rows a write deletes, at most, of those a compaction left on disk. A
/// compaction drops thousands of entries (5,000 at the default
/// `snapshot-count`); deleting them at once took 9-15 ms of the Raft
/// thread, a stall for every put meanwhile. This many rows cost a write a
/// fraction of its fsync.
const COMPACTED_ROWS_PER_WRITE: u64 = 128;

/// How far the file has caught up with compactions done in memory.
struct Compaction {
    /// The snapshot marker changed and is not written yet.
    marker_pending: bool,
    /// Every row up to this index is gone from the file (rows above it and
    /// up to the marker are dead: nothing reads them, the next writes
    /// delete them).
    deleted_through: u64,
}

pub struct LogStore {
    conn: Arc<Mutex<Connection>>,
    writer: LogWriter,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry compacted away (0, 0 for none).
    snapshot: SnapshotMetadata,
    /// Entries after `snapshot.index`, in order.
    entries: Vec<Entry>,
    /// Compaction on disk, which follows the in-memory one (see
    /// [`LogStore::compact`]).
    on_disk: Compaction,
    /// Where state snapshots for lagging followers come from.
    snapshots: Option<Arc<Snapshots>>,
}

impl LogStore {
    /// Open the log at `path`. A brand-new log of a new cluster is
    /// bootstrapped with `bootstrap` as if a snapshot at index 1 (term 1,
    /// like etcd's bootstrap entries, so the first leader has term 2) had
    /// set the membership; a member joining an existing cluster starts
    /// empty (`None`) and receives the leader's snapshot.
    pub fn open(path: &Path, bootstrap: Option<&ConfState>) -> Result<Self, LogError> {
        crate::mvcc::page_cache::install();
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value BLOB NOT NULL);",
        )?;
        let existing: Option<HardState> = load(&conn, "hard_state")?;
        let (hard_state, snapshot, conf_state) = match (existing, bootstrap) {
            (Some(hs), _) => (
                hs,
                load(&conn, "snapshot")?.unwrap_or_default(),
                load(&conn, "conf_state")?.unwrap_or_default(),
            ),
            (None, Some(cs)) => {
                let hs = HardState {
                    term: 1,
                    commit: 1,
                    ..Default::default()
                };
                let meta = SnapshotMetadata {
                    index: 1,
                    term: 1,
                    conf_state: Some(cs.clone()).into(),
                    ..Default::default()
                };
                let tx = conn.unchecked_transaction()?;
                store(&tx, "snapshot", &meta)?;
                store(&tx, "conf_state", cs)?;
                store(&tx, "hard_state", &hs)?;
                tx.commit()?;
                (hs, meta, cs.clone())
            }
            (None, None) => Default::default(),
        };
        let mut entries = Vec::new();
        {
            let mut stmt =
                conn.prepare("SELECT idx, entry FROM entries WHERE idx > ?1 ORDER BY idx")?;
            let mut rows = stmt.query([snapshot.index as i64])?;
            let mut expected = snapshot.index + 1;
            while let Some(row) = rows.next()? {
                let idx: i64 = row.get(0)?;
                let bytes: Vec<u8> = row.get(1)?;
                let entry = Entry::parse_from_bytes(&bytes).map_err(|source| LogError::Decode {
                    what: format!("entry {idx}"),
                    source,
                })?;
                if entry.index != expected {
                    return Err(LogError::Gap {
                        expected,
                        found: entry.index,
                    });
                }
                expected += 1;
                entries.push(entry);
            }
        }
        // Rows at or below the marker that a crash left: the next writes
        // delete them.
        let lowest: Option<i64> =
            conn.query_row("SELECT min(idx) FROM entries", [], |r| r.get(0))?;
        let deleted_through = lowest.map_or(snapshot.index, |i| (i as u64).saturating_sub(1));
        let conn = Arc::new(Mutex::new(conn));
        Ok(LogStore {
            writer: LogWriter::spawn(conn.clone())?,
            conn,
            hard_state,
            conf_state,
            snapshot,
            entries,
            on_disk: Compaction {
                marker_pending: false,
                deleted_through,
            },
            snapshots: None,
        })
    }

    /// The log's SQLite connection (the node hands its checkpoints to a
    /// [`crate::checkpointer::Checkpointer`]).
    pub fn connection(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn first(&self) -> u64 {
        self.snapshot.index + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.index, |e| e.index)
    }

    /// Whether [`persist`](Self::persist) of these writes (and fsyncs)
    /// anything: entries, or a new term or vote. A hard state that moves
    /// only the commit index is kept in memory and written with the next
    /// write, as etcd's WAL skips the fsync then (`raft.MustSync`): a lost
    /// commit index is re-learned from the leader, and at start-up it is
    /// raised to the applied index. A follower gets one such update per
    /// commit; an fsync for each would sit in front of the next append.
    pub fn must_sync(&self, entries: &[Entry], hard_state: Option<&HardState>) -> bool {
        !entries.is_empty()
            || hard_state.is_some_and(|hs| {
                hs.term != self.hard_state.term || hs.vote != self.hard_state.vote
            })
    }

    /// Append `entries` (replacing any conflicting suffix) and record
    /// `hard_state`, in one fsynced transaction, unless there is nothing
    /// to [sync](Self::must_sync).
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), LogError> {
        if self.must_sync(entries, hard_state) {
            let batch = self.batch(entries, hard_state)?;
            write_batch(&mut lock(&self.conn), &batch)?;
            self.note_compacted(batch.compaction());
        }
        self.remember(entries, hard_state);
        Ok(())
    }

    /// [`persist`](Self::persist) on the log's writer thread while `work`
    /// runs on this one; returns how long the write took (`None` if there
    /// was nothing to sync) and what `work` returned. The entries reach
    /// memory (and raft-rs) only once they are durable.
    pub fn persist_beside<T>(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        work: impl FnOnce() -> T,
    ) -> (Result<Option<Duration>, LogError>, T) {
        if !self.must_sync(entries, hard_state) {
            self.remember(entries, hard_state);
            return (Ok(None), work());
        }
        let batch = match self.batch(entries, hard_state) {
            Ok(batch) => batch,
            Err(e) => return (Err(e), work()),
        };
        let compaction = batch.compaction();
        let started = self.writer.begin(batch);
        let out = work();
        let written = started.and_then(|()| self.writer.finish());
        if written.is_ok() {
            self.note_compacted(compaction);
            self.remember(entries, hard_state);
        }
        (written.map(Some), out)
    }

    /// What [`write_batch`] writes for `entries` and `hard_state`. Always
    /// the whole hard state, so a commit index held back by
    /// [`persist`](Self::persist) goes out with the next write.
    fn batch(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<Batch, LogError> {
        let entries = entries
            .iter()
            .map(|e| {
                e.write_to_bytes()
                    .map(|bytes| (e.index, bytes))
                    .map_err(|source| LogError::Decode {
                        what: format!("entry {}", e.index),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let delete_through = (self.on_disk.deleted_through < self.snapshot.index).then(|| {
            self.snapshot
                .index
                .min(self.on_disk.deleted_through + COMPACTED_ROWS_PER_WRITE)
        });
        Ok(Batch {
            entries,
            hard_state: hard_state.unwrap_or(&self.hard_state).clone(),
            marker: self.on_disk.marker_pending.then(|| self.snapshot.clone()),
            delete_through,
        })
    }

    /// A batch is written: what it did of the pending compaction (see
    /// [`Batch::compaction`]) is done.
    fn note_compacted(&mut self, (marker, delete_through): (bool, Option<u64>)) {
        if marker {
            self.on_disk.marker_pending = false;
        }
        if let Some(through) = delete_through {
            self.on_disk.deleted_through = self.on_disk.deleted_through.max(through);
        }
    }

    /// The in-memory side of a persist: the entries (replacing any
    /// conflicting suffix) and the hard state.
    fn remember(&mut self, entries: &[Entry], hard_state: Option<&HardState>) {
        if let Some(first) = entries.first() {
            let keep = first.index.saturating_sub(self.first()) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
    }

    /// Record a new commit index (from a light ready). It is persisted with
    /// the next hard state write; losing it only means re-learning it.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), LogError> {
        store(&lock(&self.conn), "conf_state", &cs)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Drop the entries up to `index` (applied, and durable in the state).
    /// Memory lets them go at once; the file follows with the next writes,
    /// which record the new marker and delete the rows a few at a time
    /// ([`COMPACTED_ROWS_PER_WRITE`]), in their own transaction and fsync.
    /// Until then a row at or below the marker is dead: opening the log
    /// reads only what follows the marker on disk, which is at or below
    /// this one, so at worst a restart keeps more entries than it needs.
    pub fn compact(&mut self, index: u64) -> Result<(), LogError> {
        if index < self.first() || index > self.last() {
            return Ok(());
        }
        let term = self.term(index).unwrap_or(0);
        let meta = SnapshotMetadata {
            index,
            term,
            conf_state: Some(self.conf_state.clone()).into(),
            ..Default::default()
        };
        let drop = (index + 1 - self.first()) as usize;
        self.entries.drain(..drop);
        self.snapshot = meta;
        self.on_disk.marker_pending = true;
        Ok(())
    }

    pub fn set_snapshots(&mut self, snapshots: Arc<Snapshots>) {
        self.snapshots = Some(snapshots);
    }

    /// The state was replaced by a leader's snapshot (already durable in
    /// the state file): the log restarts after it.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata) -> Result<(), LogError> {
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        let cs = meta.get_conf_state().clone();
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        store(&tx, "snapshot", meta)?;
        store(&tx, "conf_state", &cs)?;
        store(&tx, "hard_state", &hs)?;
        tx.execute("DELETE FROM entries", [])?;
        tx.commit()?;
        drop(conn);
        self.on_disk = Compaction {
            marker_pending: false,
            deleted_through: meta.index,
        };
        self.entries.clear();
        self.snapshot = meta.clone();
        self.conf_state = cs;
        self.hard_state = hs;
        Ok(())
    }

    /// Disaster takeover (etcd's `--force-new-cluster`): the log restarts
    /// after `applied_index` with `plan`'s configuration, followed by its
    /// membership entries, committed, in a term after every term seen.
    /// Entries after `applied_index` were never applied here and may never
    /// have been committed, so they go.
    pub fn force_new_cluster(
        &mut self,
        me: u64,
        plan: &super::takeover::Plan,
        applied_index: u64,
        applied_term: u64,
    ) -> Result<(), LogError> {
        let meta = SnapshotMetadata {
            index: applied_index,
            term: applied_term,
            conf_state: Some(plan.conf.clone()).into(),
            ..Default::default()
        };
        let term = self.hard_state.term.max(applied_term) + 1;
        let mut hs = self.hard_state.clone();
        hs.commit = applied_index;
        hs.vote = 0;
        self.hard_state = hs.clone();
        self.apply_snapshot(&meta)?;
        let entries = plan.entries(me, applied_index + 1, term);
        hs.term = term;
        hs.commit = applied_index + entries.len() as u64;
        self.persist(&entries, Some(&hs))
    }

    /// A second handle on this log's file (the node builds a new Raft node
    /// on it after a takeover; raft-rs owns the first).
    pub fn reopen(&self) -> Result<LogStore, LogError> {
        let (path, autocheckpoint) = {
            let conn = lock(&self.conn);
            let autocheckpoint: i64 =
                conn.pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))?;
            (conn.path().unwrap_or_default().to_owned(), autocheckpoint)
        };
        let mut log = LogStore::open(Path::new(&path), None)?;
        log.connection()
            .pragma_update(None, "wal_autocheckpoint", autocheckpoint)?;
        log.snapshots = self.snapshots.clone();
        Ok(log)
    }

    /// Entries in memory since the last compaction.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Entries (index, encoded) and the hard state, written in one
/// transaction.
struct Batch {
    entries: Vec<(u64, Vec<u8>)>,
    hard_state: HardState,
    /// A compaction's new marker, not written yet.
    marker: Option<SnapshotMetadata>,
    /// Delete the compacted rows up to this index.
    delete_through: Option<u64>,
}

impl Batch {
    /// What this batch does of a pending compaction: whether it writes
    /// the marker, and through which index it deletes rows.
    fn compaction(&self) -> (bool, Option<u64>) {
        (self.marker.is_some(), self.delete_through)
    }
}

fn write_batch(conn: &mut Connection, batch: &Batch) -> Result<(), LogError> {
    let tx = conn.transaction()?;
    if let Some((first, _)) = batch.entries.first() {
        tx.prepare_cached("DELETE FROM entries WHERE idx >= ?1")?
            .execute([*first as i64])?;
        let mut stmt = tx.prepare_cached("INSERT INTO entries (idx, entry) VALUES (?1, ?2)")?;
        for (index, bytes) in &batch.entries {
            stmt.execute((*index as i64, bytes))?;
        }
    }
    store(&tx, "hard_state", &batch.hard_state)?;
    if let Some(marker) = &batch.marker {
        store(&tx, "snapshot", marker)?;
    }
    if let Some(through) = batch.delete_through {
        tx.prepare_cached("DELETE FROM entries WHERE idx <= ?1")?
            .execute([through as i64])?;
    }
    tx.commit()?;
    Ok(())
}

/// The connection, also after a thread panicked holding it (SQLite's own
/// transaction is what keeps the file consistent).
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread that writes batches for [`LogStore::persist_beside`]: one
/// batch at a time, its outcome sent back before the next is taken.
struct LogWriter {
    batches: Option<Sender<Batch>>,
    outcomes: Receiver<Result<Duration, LogError>>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    fn spawn(conn: Arc<Mutex<Connection>>) -> Result<Self, LogError> {
        let (batches, jobs) = crossbeam_channel::bounded::<Batch>(1);
        let (done, outcomes) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || {
                for batch in jobs {
                    let started = Instant::now();
                    let outcome = write_batch(&mut lock(&conn), &batch).map(|()| started.elapsed());
                    if done.send(outcome).is_err() {
                        return;
                    }
                }
            })
            .map_err(LogError::Thread)?;
        Ok(LogWriter {
            batches: Some(batches),
            outcomes,
            thread: Some(thread),
        })
    }

    /// Hand `batch` to the thread; [`LogWriter::finish`] waits for it.
    fn begin(&self, batch: Batch) -> Result<(), LogError> {
        self.batches
            .as_ref()
            .ok_or(LogError::WriterStopped)?
            .send(batch)
            .map_err(|_| LogError::WriterStopped)
    }

    /// The outcome of the batch started last.
    fn finish(&self) -> Result<Duration, LogError> {
        self.outcomes.recv().map_err(|_| LogError::WriterStopped)?
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn load<M: protobuf::Message>(conn: &Connection, name: &str) -> Result<Option<M>, LogError> {
    let bytes: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM state WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    bytes
        .map(|b| {
            M::parse_from_bytes(&b).map_err(|source| LogError::Decode {
                what: name.to_string(),
                source,
            })
        })
        .transpose()
}

fn store<M: protobuf::Message>(conn: &Connection, name: &str, m: &M) -> Result<(), LogError> {
    let bytes = m.write_to_bytes().map_err(|source| LogError::Decode {
        what: name.to_string(),
        source,
    })?;
    // Cached: the log writes its hard state with every append.
    conn.prepare_cached("INSERT OR REPLACE INTO state (name, value) VALUES (?1, ?2)")?
        .execute((name, bytes))?;
    Ok(())
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The state for a follower whose next entry was compacted away: any
    /// snapshot at or after both the compaction point and what the
    /// follower asked for will do.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match &self.snapshots {
            Some(s) => s.get(request_index.max(self.snapshot.index), to),
            None => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn survives_reopen_and_truncates_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let mut log = LogStore::open(&path, None).unwrap();
        let hs = HardState {
            term: 2,
            commit: 2,
            ..Default::default()
        };
        log.persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs))
            .unwrap();
        log.persist(&[entry(3, 2), entry(4, 2)], None).unwrap();
        assert_eq!(log.term(3).unwrap(), 2);
        drop(log);
        let mut log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.hard_state().term, 2);
        assert_eq!(log.last_index().unwrap(), 4);
        assert_eq!(log.term(3).unwrap(), 2);
        log.compact(2).unwrap();
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(log.term(2).unwrap(), 1);
        assert!(log
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .is_err());
        // The file follows with the next write.
        log.persist(&[entry(5, 2)], None).unwrap();
        drop(log);
        let log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(
            log.entries(3, 6, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            3
        );
    }

    fn rows_on_disk(path: &Path) -> (i64, Option<i64>) {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*), min(idx) FROM entries", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap()
    }

    /// A compaction costs the Raft thread no disk work: the rows go with
    /// the next writes, a few at a time, and a restart in between (or
    /// without any write) loses nothing and reads no dead row.
    #[test]
    fn compacted_rows_leave_the_file_with_the_next_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let mut log = LogStore::open(&path, None).unwrap();
        let total = 3 * COMPACTED_ROWS_PER_WRITE + 10;
        let batch: Vec<Entry> = (1..=total).map(|i| entry(i, 1)).collect();
        log.persist(&batch, None).unwrap();
        let upto = 3 * COMPACTED_ROWS_PER_WRITE;
        log.compact(upto).unwrap();
        assert_eq!(log.first_index().unwrap(), upto + 1);
        assert_eq!(rows_on_disk(&path).0, total as i64, "nothing deleted yet");

        // A restart before any write: the old marker, every row still
        // there, and the entries after the new marker intact.
        drop(log);
        let mut log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.first_index().unwrap(), 1);
        assert_eq!(log.last_index().unwrap(), total);
        log.compact(upto).unwrap();

        let mut next = total + 1;
        for round in 1..=3u64 {
            log.persist(&[entry(next, 1)], None).unwrap();
            next += 1;
            let (_, lowest) = rows_on_disk(&path);
            assert_eq!(
                lowest,
                Some((round * COMPACTED_ROWS_PER_WRITE + 1) as i64),
                "write {round} deletes the next rows"
            );
        }
        // Beside other work too, and nothing left to delete after.
        let (written, ()) = log.persist_beside(&[entry(next, 1)], None, || ());
        written.unwrap();
        assert_eq!(
            rows_on_disk(&path),
            ((next - upto) as i64, Some(upto as i64 + 1))
        );

        // A restart midway reads from the marker on, and finishes the job.
        log.compact(upto + 5).unwrap();
        drop(log);
        let mut log = LogStore::open(&path, None).unwrap();
        assert_eq!(
            log.first_index().unwrap(),
            upto + 1,
            "the marker was not written"
        );
        log.compact(upto + 5).unwrap();
        log.persist(&[entry(next + 1, 1)], None).unwrap();
        drop(log);
        let log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.first_index().unwrap(), upto + 6);
        assert_eq!(log.last_index().unwrap(), next + 1);
        assert_eq!(rows_on_disk(&path).1, Some(upto as i64 + 6));
    }

    #[test]
    fn entries_written_beside_other_work_are_durable_and_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let mut log = LogStore::open(&path, None).unwrap();
        let hs = HardState {
            term: 2,
            commit: 1,
            ..Default::default()
        };
        for round in 0..3u64 {
            let first = round * 2 + 1;
            let batch = [entry(first, 2), entry(first + 1, 2)];
            let (written, out) = log.persist_beside(&batch, Some(&hs), || round * 10);
            assert!(written.unwrap().is_some(), "entries are synced");
            assert_eq!(out, round * 10);
            assert_eq!(log.last_index().unwrap(), first + 1);
        }
        // A conflicting suffix is replaced, in memory and on disk.
        let (written, ()) = log.persist_beside(&[entry(5, 3)], None, || ());
        written.unwrap();
        assert_eq!((log.last_index().unwrap(), log.term(5).unwrap()), (5, 3));
        // Nothing to sync: the work runs, nothing is written.
        let (written, ()) = log.persist_beside(&[], None, || ());
        assert!(written.unwrap().is_none());
        drop(log);
        let log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.hard_state().term, 2);
        assert_eq!((log.last_index().unwrap(), log.term(5).unwrap()), (5, 3));
        assert_eq!(log.term(4).unwrap(), 2);
    }

    #[test]
    fn a_commit_only_hard_state_waits_for_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let mut log = LogStore::open(&path, None).unwrap();
        let mut hs = HardState {
            term: 2,
            vote: 1,
            commit: 1,
            ..Default::default()
        };
        log.persist(&[entry(1, 2), entry(2, 2)], Some(&hs)).unwrap();
        hs.commit = 2;
        log.persist(&[], Some(&hs)).unwrap();
        assert_eq!(log.hard_state().commit, 2, "known in memory at once");
        drop(log);
        let mut log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.hard_state().commit, 1, "not written on its own");
        log.set_commit(2);
        log.persist(&[entry(3, 2)], None).unwrap();
        drop(log);
        let mut log = LogStore::open(&path, None).unwrap();
        assert_eq!(log.hard_state().commit, 2, "written with the next entries");
        // A new term or vote is written at once, entries or not.
        hs.term = 3;
        hs.vote = 2;
        log.persist(&[], Some(&hs)).unwrap();
        drop(log);
        let log = LogStore::open(&path, None).unwrap();
        assert_eq!((log.hard_state().term, log.hard_state().vote), (3, 2));
    }
}
