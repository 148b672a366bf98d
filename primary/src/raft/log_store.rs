//! The durable Raft log: entries, hard state, conf state and the snapshot
//! marker, in the member's log directory ([`LOG_DIR`], see [`super::wal`]).
//!
//! [`LogStore::persist`], called once per `Ready` with every entry of that
//! round, is the group commit: many proposals, one `fdatasync`.
//!
//! Entries since the last log compaction are also kept in memory, which is
//! what raft-rs reads through the [`Storage`] trait; compaction bounds them.
//!
//! [`LogStore::persist_beside`] writes on a thread the log keeps for its
//! lifetime ([`LogWriter`]) while the caller applies committed entries:
//! under load nearly every `Ready` has both, and a thread started per
//! `Ready` (as before) cost a `clone` and an exit per batch. The one
//! [`Wal`] sits behind a mutex that the two threads never contend for:
//! the node always waits for the writer before it touches the log again.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::snapshot::Snapshots;
use super::wal::{self, Record, Wal, WalError};

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// The log's directory in a data dir.
pub const LOG_DIR: &str = "raft-log";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("raft log: {0}")]
    Legacy(#[from] super::legacy_log::LegacyError),
    #[error("raft log: corrupt record {what}: {source}")]
    Decode {
        what: String,
        source: protobuf::ProtobufError,
    },
    #[error("raft log: cannot start its writer thread: {0}")]
    Thread(std::io::Error),
    #[error("raft log: its writer thread stopped")]
    WriterStopped,
}

pub struct LogStore {
    wal: Arc<Mutex<Wal>>,
    writer: LogWriter,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry compacted away (0, 0 for none).
    snapshot: SnapshotMetadata,
    /// Entries after `snapshot.index`, in order.
    entries: Vec<Entry>,
    /// The snapshot marker moved (a compaction) and is not written yet: the
    /// next write records it (see [`LogStore::compact`]).
    marker_pending: bool,
    /// Where state snapshots for lagging followers come from.
    snapshots: Option<Arc<Snapshots>>,
}

impl LogStore {
    /// Open the log of the data dir `data_dir` (a `raft.db` of an older
    /// version is migrated first, see [`super::legacy_log`]). A brand-new
    /// log of a new cluster is bootstrapped with `bootstrap` as if a
    /// snapshot at index 1 (term 1, like etcd's bootstrap entries, so the
    /// first leader has term 2) had set the membership; a member joining
    /// an existing cluster starts empty (`None`) and receives the leader's
    /// snapshot.
    pub fn open(data_dir: &Path, bootstrap: Option<&ConfState>) -> Result<Self, LogError> {
        let dir = data_dir.join(LOG_DIR);
        super::legacy_log::migrate(data_dir, &dir)?;
        let (mut wal, replayed) = Wal::open(&dir)?;
        let (hard_state, snapshot, conf_state, entries) = match (replayed.hard_state, bootstrap) {
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
                wal.restart(&[
                    Record::Restart(meta.clone()),
                    Record::ConfState(cs.clone()),
                    Record::HardState(hs.clone()),
                ])?;
                (hs, meta, cs.clone(), Vec::new())
            }
            (hs, _) => (
                hs.unwrap_or_default(),
                replayed.marker.unwrap_or_default(),
                replayed.conf_state.unwrap_or_default(),
                replayed.entries,
            ),
        };
        let wal = Arc::new(Mutex::new(wal));
        Ok(LogStore {
            writer: LogWriter::spawn(wal.clone())?,
            wal,
            hard_state,
            conf_state,
            snapshot,
            entries,
            marker_pending: false,
            snapshots: None,
        })
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
    /// `hard_state`, with one fsync, unless there is nothing to
    /// [sync](Self::must_sync).
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), LogError> {
        if self.must_sync(entries, hard_state) {
            let batch = self.batch(entries, hard_state)?;
            let compacted = batch.compacted;
            write_batch(&mut lock(&self.wal), batch)?;
            self.note_written(compacted);
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
        let compacted = batch.compacted;
        let started = self.writer.begin(batch);
        let out = work();
        let written = started.and_then(|()| self.writer.finish());
        if written.is_ok() {
            self.note_written(compacted);
            self.remember(entries, hard_state);
        }
        (written.map(Some), out)
    }

    /// What [`write_batch`] writes for `entries` and `hard_state`. Always
    /// the whole hard state, so a commit index held back by
    /// [`persist`](Self::persist) goes out with the next write; and the
    /// snapshot marker if a compaction moved it.
    fn batch(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<Batch, LogError> {
        let hard_state = hard_state.unwrap_or(&self.hard_state).clone();
        let mut frames = Vec::with_capacity(
            entries
                .iter()
                .map(|e| e.data.len() + e.context.len() + 32)
                .sum::<usize>()
                + 64,
        );
        let marker = self.marker_pending.then(|| self.snapshot.clone());
        if let Some(marker) = &marker {
            Record::Compacted(marker.clone()).encode_into(&mut frames)?;
        }
        for entry in entries {
            wal::encode_entry(entry, &mut frames)?;
        }
        Record::HardState(hard_state.clone()).encode_into(&mut frames)?;
        Ok(Batch {
            frames,
            last_index: entries.last().map_or(0, |e| e.index),
            compacted: marker.as_ref().map(|m| m.index),
            header: [
                Record::Compacted(self.snapshot.clone()),
                Record::ConfState(self.conf_state.clone()),
                Record::HardState(hard_state),
            ],
        })
    }

    /// A batch is written: the marker it carried is on disk.
    fn note_written(&mut self, compacted: Option<u64>) {
        if compacted == Some(self.snapshot.index) {
            self.marker_pending = false;
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
        let mut frames = Vec::new();
        Record::ConfState(cs.clone()).encode_into(&mut frames)?;
        let header = [
            Record::Compacted(self.snapshot.clone()),
            Record::ConfState(cs.clone()),
            Record::HardState(self.hard_state.clone()),
        ];
        lock(&self.wal).append(&frames, 0, || header.to_vec())?;
        self.conf_state = cs;
        Ok(())
    }

    /// Drop the entries up to `index` (applied, and durable in the state).
    /// Memory lets them go at once; the file follows with the next write,
    /// which records the new marker, after which the segments holding only
    /// entries up to it are removed. Until then a restart reads the entries
    /// after the old marker: at worst it keeps more entries than it needs.
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
        self.marker_pending = true;
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
        lock(&self.wal).restart(&[
            Record::Restart(meta.clone()),
            Record::ConfState(cs.clone()),
            Record::HardState(hs.clone()),
        ])?;
        self.marker_pending = false;
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

    /// A second handle on this log, in the same state (the node builds a
    /// new Raft node on it after a takeover; raft-rs owns the first, which
    /// is dropped without writing anything).
    pub fn reopen(&self) -> Result<LogStore, LogError> {
        Ok(LogStore {
            wal: self.wal.clone(),
            writer: LogWriter::spawn(self.wal.clone())?,
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
            marker_pending: self.marker_pending,
            snapshots: self.snapshots.clone(),
        })
    }

    /// Entries in memory since the last compaction.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The encoded records of one write, with what a new segment would start
/// with if they do not fit the current one.
struct Batch {
    frames: Vec<u8>,
    /// The highest entry index among them (0 for none).
    last_index: u64,
    /// The compaction marker they carry, if any.
    compacted: Option<u64>,
    /// The state after them, as a segment header.
    header: [Record; 3],
}

fn write_batch(wal: &mut Wal, batch: Batch) -> Result<(), LogError> {
    let Batch {
        frames,
        last_index,
        compacted,
        header,
    } = batch;
    wal.append(&frames, last_index, || header.to_vec())?;
    if let Some(index) = compacted {
        wal.compacted(index);
    }
    Ok(())
}

/// The log, also after a thread panicked holding it (a write that did not
/// finish is a torn tail, cut off when the log is opened).
fn lock(wal: &Mutex<Wal>) -> MutexGuard<'_, Wal> {
    wal.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread that writes batches for [`LogStore::persist_beside`]: one
/// batch at a time, its outcome sent back before the next is taken.
struct LogWriter {
    batches: Option<Sender<Batch>>,
    outcomes: Receiver<Result<Duration, LogError>>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    fn spawn(wal: Arc<Mutex<Wal>>) -> Result<Self, LogError> {
        let (batches, jobs) = crossbeam_channel::bounded::<Batch>(1);
        let (done, outcomes) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || {
                for batch in jobs {
                    let started = Instant::now();
                    let outcome = write_batch(&mut lock(&wal), batch).map(|()| started.elapsed());
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
        let path = dir.path();
        let mut log = LogStore::open(path, None).unwrap();
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
        let mut log = LogStore::open(path, None).unwrap();
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
        let log = LogStore::open(path, None).unwrap();
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(
            log.entries(3, 6, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            3
        );
    }

    /// A compaction costs the Raft thread no disk work: the marker goes
    /// with the next write, and a restart before it reads the entries
    /// after the old marker.
    #[test]
    fn a_compaction_reaches_the_disk_with_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut log = LogStore::open(path, None).unwrap();
        let batch: Vec<Entry> = (1..=20).map(|i| entry(i, 1)).collect();
        log.persist(&batch, None).unwrap();
        log.compact(10).unwrap();
        assert_eq!(log.first_index().unwrap(), 11);
        drop(log);
        let mut log = LogStore::open(path, None).unwrap();
        assert_eq!(log.first_index().unwrap(), 1, "the marker was not written");
        assert_eq!(log.last_index().unwrap(), 20);
        log.compact(10).unwrap();
        let (written, ()) = log.persist_beside(&[entry(21, 1)], None, || ());
        written.unwrap();
        drop(log);
        let log = LogStore::open(path, None).unwrap();
        assert_eq!(log.first_index().unwrap(), 11);
        assert_eq!(log.term(10).unwrap(), 1);
        assert_eq!(log.last_index().unwrap(), 21);
    }

    #[test]
    fn entries_written_beside_other_work_are_durable_and_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut log = LogStore::open(path, None).unwrap();
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
        let log = LogStore::open(path, None).unwrap();
        assert_eq!(log.hard_state().term, 2);
        assert_eq!((log.last_index().unwrap(), log.term(5).unwrap()), (5, 3));
        assert_eq!(log.term(4).unwrap(), 2);
    }

    #[test]
    fn a_commit_only_hard_state_waits_for_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut log = LogStore::open(path, None).unwrap();
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
        let mut log = LogStore::open(path, None).unwrap();
        assert_eq!(log.hard_state().commit, 1, "not written on its own");
        log.set_commit(2);
        log.persist(&[entry(3, 2)], None).unwrap();
        drop(log);
        let mut log = LogStore::open(path, None).unwrap();
        assert_eq!(log.hard_state().commit, 2, "written with the next entries");
        // A new term or vote is written at once, entries or not.
        hs.term = 3;
        hs.vote = 2;
        log.persist(&[], Some(&hs)).unwrap();
        drop(log);
        let log = LogStore::open(path, None).unwrap();
        assert_eq!((log.hard_state().term, log.hard_state().vote), (3, 2));
    }
}
