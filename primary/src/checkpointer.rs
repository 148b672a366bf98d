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
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(1))?;
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let name = path
            .file_name()
            .map_or_else(|| "db".into(), |n| n.to_string_lossy().into_owned());
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint {name}"))
            .spawn(move || run(&conn, &stopped, &name))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

fn run(conn: &Connection, stopped: &Receiver<()>, name: &str) {
    loop {
        match stopped.recv_timeout(INTERVAL) {
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
}
