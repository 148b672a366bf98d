//! WAL checkpoints off the commit path.
//!
//! Both of a member's SQLite files (`raft.db`, `state.db`) run in WAL
//! mode. Left to itself SQLite checkpoints inside whichever commit pushes
//! the WAL past 1000 pages: that commit copies the pages back and fsyncs
//! the database file before it returns, and the proposals waiting on it
//! see a latency spike of several milliseconds. A [`Checkpointer`] runs
//! those checkpoints on a thread and connection of its own instead.
//! PASSIVE checkpoints never block the writer (nor wait for readers), so
//! commits only append to the WAL; once a checkpoint has copied every
//! frame, the next commit starts the WAL from its beginning again, so it
//! stays small.
//!
//! Under steady writes a PASSIVE checkpoint rarely catches the newest
//! frame (the writer commits while it copies), and only a complete one lets
//! the WAL start over. So the writer connections keep SQLite's automatic
//! checkpoint at [`BACKSTOP_PAGES`]: when it fires, this thread has already
//! copied and synced nearly every frame, and the commit that runs it only
//! copies and syncs what arrived since the last pass.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::Connection;

/// How often the WAL is copied back: often enough that it stays a few MB
/// under full load, rare enough that an idle member does nothing.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// `wal_autocheckpoint` of the writer connections: a commit finishes the
/// checkpoint itself once the WAL holds this many pages (16 MiB at 4 KiB).
pub const BACKSTOP_PAGES: i64 = 4096;

/// A thread checkpointing one database file every [`INTERVAL`]; stops
/// when dropped.
pub struct Checkpointer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Take the checkpoints of `writer`'s (WAL-mode) database file over,
    /// leaving it SQLite's automatic one only as the backstop.
    pub fn take_over(writer: &Connection) -> Result<Self, rusqlite::Error> {
        writer.pragma_update(None, "wal_autocheckpoint", BACKSTOP_PAGES)?;
        let path = writer.path().unwrap_or_default().to_owned();
        Self::spawn(Path::new(&path))
    }

    /// Start checkpointing the WAL-mode database at `path`.
    pub fn spawn(path: &Path) -> Result<Self, rusqlite::Error> {
        Self::spawn_every(path, INTERVAL)
    }

    /// [`Checkpointer::spawn`] with another interval (tests use a short
    /// one to make checkpoints collide with commits).
    pub fn spawn_every(path: &Path, interval: Duration) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(1))?;
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let name = path
            .file_name()
            .map_or_else(|| "db".into(), |n| n.to_string_lossy().into_owned());
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint {name}"))
            .spawn(move || run(&conn, &stopped, &name, interval))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

fn run(conn: &Connection, stopped: &Receiver<()>, name: &str, interval: Duration) {
    loop {
        match stopped.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        // A failure (a full disk, say) is the writer's to report: its own
        // commits fail the same way. Frames not copied stay in the WAL,
        // which is as durable as the database file.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(file = name, error = %e, "checkpoint failed; retrying");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_the_wal_back_while_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        // No automatic checkpoints: only the thread moves rows into the
        // database file.
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute_batch("CREATE TABLE t (v BLOB NOT NULL)")
            .unwrap();
        let checkpointer = Checkpointer::spawn(&path).unwrap();
        for _ in 0..100 {
            writer
                .execute("INSERT INTO t (v) VALUES (zeroblob(100000))", [])
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&path).unwrap().len() < 10_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint copied the 10 MB of rows into the database file"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(checkpointer);
        let rows: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 100);
    }

    /// Regression: with the checkpointer's connection taking SQLite's locks
    /// for moments, a batch that read before it wrote (a deferred
    /// transaction) failed with "database is locked" at once, and the node
    /// stopped (seen on a learner applying right after a 1.4 GB snapshot).
    #[test]
    fn batches_never_collide_with_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut store = crate::mvcc::MvccStore::open(&path).unwrap();
        let checkpointer = Checkpointer::take_over(store.connection()).unwrap();
        drop(checkpointer);
        let _fast = Checkpointer::spawn_every(&path, Duration::from_micros(200)).unwrap();
        // Readers open read transactions all the while, as the read pool
        // does under load; each one reads the WAL index's header.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let reader = crate::mvcc::Reader::new(&path);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        reader
                            .with(|conn| crate::mvcc::read::get_live(conn, b"k1"))
                            .unwrap();
                    }
                })
            })
            .collect();
        let value = vec![7u8; 1024];
        for i in 0..3000u64 {
            let mut batch = store.batch().unwrap();
            let key = format!("k{}", i % 500).into_bytes();
            batch
                .entry(i + 1, 1, |b| {
                    // A read, then writes: the pattern of every put.
                    b.put(&key, &value, 0)?;
                    Ok(())
                })
                .unwrap();
            batch.commit().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        assert_eq!(store.state().revision, 3001);
    }
}
