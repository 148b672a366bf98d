//! WAL checkpoints off the commit path.
//!
//! A member's SQLite state file (`state.db`) runs in WAL mode. Left to itself SQLite checkpoints inside whichever commit pushes
//! the WAL past 1000 pages: that commit copies the pages back and fsyncs
//! the database file before it returns, and the proposals waiting on it
//! see a latency spike of several milliseconds. A [`Checkpointer`] runs
//! those checkpoints on a thread and connection of its own instead.
//! PASSIVE checkpoints never block the writer (nor wait for readers), so
//! commits only append to the WAL; once a checkpoint has copied every
//! frame, the next commit starts the WAL from its beginning again, so it
//! stays small. That commit also fsyncs the new WAL's header, so sparse
//! writes (fewer than [`BUSY_FRAMES`] since the last checkpoint) wait up
//! to [`QUIET_FACTOR`] intervals for theirs.
//!
//! Under steady writes a PASSIVE checkpoint rarely catches the newest
//! frame (the writer commits while it copies), and only a complete one lets
//! the WAL start over. So the writer connections keep SQLite's automatic
//! checkpoint at [`BACKSTOP_PAGES`]: when it fires, this thread has already
//! copied and synced nearly every frame, and the commit that runs it only
//! copies and syncs what arrived since the last pass, which comes every
//! [`BUSY_INTERVAL`] while the writes keep coming.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::Connection;

/// How often the WAL is copied back: often enough that it stays a few MB
/// under full load, rare enough that an idle member does nothing.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// How soon the next pass comes after one that found the WAL busy (new
/// frames at a rate of at least [`BUSY_FRAMES`] an interval). When the
/// backstop fires, the commit that runs it copies and syncs whatever
/// arrived since the last pass: at 100 clients of 1 KiB puts, with a pass
/// every [`INTERVAL`], that was up to 100 ms of writes, and those commits
/// took 8–22 ms, the puts' p99 (20–23 ms against 14–15 ms with a pass
/// every 10 ms while busy, three runs each of etcd's `benchmark put`).
const BUSY_INTERVAL: Duration = Duration::from_millis(10);

/// `wal_autocheckpoint` of the writer connections: a commit finishes the
/// checkpoint itself once the WAL holds this many pages (64 MiB at 4 KiB).
/// Each time it fires, the Raft thread copies and syncs the last pass's
/// worth of frames (several ms on puts to keys spread over the key space,
/// where every put dirties two random leaves); how often it fires is the
/// WAL's size over its growth. With 100 clients of 1 KiB puts over
/// 100,000 random keys (etcd's `benchmark put`, one member), the puts' p99
/// was 17–20 ms at 4096 pages, 16–17 at 8192, 14–15 at 16384 and 13 at
/// 65536, with the same puts/s: this size takes most of that, at a WAL
/// of about 64 MiB on disk under steady writes (etcd's WAL files are 64
/// MB each). A backstop that finds this thread's pass running gives way,
/// so under bulk loads the WAL grows past it (up to
/// [`crate::mvcc::schema::WAL_SIZE_LIMIT`] after 4 KiB txns of 100).
pub const BACKSTOP_PAGES: i64 = 16384;

/// A thread checkpointing one database file every [`INTERVAL`]; stops
/// when dropped.
pub struct Checkpointer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// How far a database written with `synchronous=NORMAL` (its commits are
/// not fsynced) is durable, as a mark its rows keep (the state's applied
/// index), for whoever must not drop anything the file does not hold yet
/// (the Raft log's compaction). Asking for a mark is cheap; the
/// checkpointer's thread makes it durable on its next pass, so nothing
/// waits for those fsyncs on the thread that asked.
pub struct Durability {
    /// Reads the mark from the database, as committed.
    read_mark: fn(&Connection) -> Result<u64, String>,
    /// The highest mark asked for.
    wanted: AtomicU64,
    /// The highest mark known durable.
    durable: AtomicU64,
}

impl Durability {
    pub fn new(read_mark: fn(&Connection) -> Result<u64, String>) -> Arc<Self> {
        Arc::new(Durability {
            read_mark,
            wanted: AtomicU64::new(0),
            durable: AtomicU64::new(0),
        })
    }

    /// The highest mark known durable.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Ask for `mark` to become durable.
    pub fn want(&self, mark: u64) {
        self.wanted.fetch_max(mark, Ordering::AcqRel);
    }

    /// If a mark beyond the durable one is wanted: read the committed mark,
    /// then fsync the WAL and the database file. Whatever was committed
    /// when the mark was read is then on disk in one or the other (a
    /// checkpoint moves frames into the database file before the WAL
    /// starts over, and syncs it first).
    fn sync_if_wanted(&self, conn: &Connection, path: &Path) -> std::io::Result<()> {
        if self.wanted.load(Ordering::Acquire) <= self.durable() {
            return Ok(());
        }
        let mark = (self.read_mark)(conn).map_err(std::io::Error::other)?;
        for file in [sibling(path, "-wal"), path.to_path_buf()] {
            match std::fs::File::open(&file) {
                Ok(f) => f.sync_data()?,
                // No WAL (nothing written since it was last removed).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.durable.fetch_max(mark, Ordering::AcqRel);
        Ok(())
    }
}

impl Checkpointer {
    /// Take the checkpoints of `writer`'s (WAL-mode) database file over,
    /// leaving it SQLite's automatic one only as the backstop.
    pub fn take_over(writer: &Connection) -> Result<Self, rusqlite::Error> {
        Self::take_over_with(writer, None)
    }

    /// [`Checkpointer::take_over`], also making `durability`'s marks
    /// durable when asked.
    pub fn take_over_with(
        writer: &Connection,
        durability: Option<Arc<Durability>>,
    ) -> Result<Self, rusqlite::Error> {
        writer.pragma_update(None, "wal_autocheckpoint", BACKSTOP_PAGES)?;
        let path = writer.path().unwrap_or_default().to_owned();
        Self::spawn_with(Path::new(&path), INTERVAL, durability)
    }

    /// Start checkpointing the WAL-mode database at `path`.
    pub fn spawn(path: &Path) -> Result<Self, rusqlite::Error> {
        Self::spawn_every(path, INTERVAL)
    }

    /// [`Checkpointer::spawn`] with another interval (tests use a short
    /// one to make checkpoints collide with commits).
    pub fn spawn_every(path: &Path, interval: Duration) -> Result<Self, rusqlite::Error> {
        Self::spawn_with(path, interval, None)
    }

    fn spawn_with(
        path: &Path,
        interval: Duration,
        durability: Option<Arc<Durability>>,
    ) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(1))?;
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let name = path
            .file_name()
            .map_or_else(|| "db".into(), |n| n.to_string_lossy().into_owned());
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint {name}"))
            .spawn({
                let path = path.to_path_buf();
                move || run(&conn, &stopped, (&name, &path), interval, durability)
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Frames that make a pass worth it at once: below this many new frames
/// (1 MiB at 4 KiB pages) the WAL waits, up to [`QUIET_FACTOR`] intervals.
const BUSY_FRAMES: u32 = 256;

/// How many intervals sparse writes wait for their checkpoint. Every
/// complete checkpoint makes the next commit start the WAL over, and that
/// commit fsyncs the new WAL header before its frames: at 10 puts/s a
/// checkpoint every 100 ms cost every put an fsync of the log's header
/// and one of the state's, three fsyncs on its path where one is needed
/// (and the checkpoints' own, ~55 a second). With this, one put in 20.
const QUIET_FACTOR: u32 = 20;

fn run(
    conn: &Connection,
    stopped: &Receiver<()>,
    (name, path): (&str, &Path),
    interval: Duration,
    durability: Option<Arc<Durability>>,
) {
    let mut frames = WalFrames::new(path);
    let mut waited = 0;
    let mut busy = false;
    loop {
        let wait = if busy {
            interval.min(BUSY_INTERVAL)
        } else {
            interval
        };
        match stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        waited += 1;
        let new = frames.new_since_checkpoint();
        // Busy is a rate: BUSY_FRAMES an interval, whatever this wait was.
        busy = u128::from(new) * interval.as_micros() >= u128::from(BUSY_FRAMES) * wait.as_micros();
        if !busy && (new == 0 || waited < QUIET_FACTOR) {
            // Nothing, or little: a durability asked for still gets its
            // syncs (what little there is, is in the WAL they sync).
            sync_if_wanted(durability.as_deref(), conn, (name, path));
            continue;
        }
        waited = 0;
        // Read before the pass: frames committed while it runs count as
        // new, not as copied (they may not be).
        let seen = frames.read();
        // A failure (a full disk, say) is the writer's to report: its own
        // commits fail the same way. Frames not copied stay in the WAL,
        // which is as durable as the database file.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(file = name, error = %e, "checkpoint failed; retrying");
        }
        frames.checkpointed(seen);
        sync_if_wanted(durability.as_deref(), conn, (name, path));
    }
}

fn sync_if_wanted(durability: Option<&Durability>, conn: &Connection, (name, path): (&str, &Path)) {
    if let Some(durability) = durability {
        if let Err(e) = durability.sync_if_wanted(conn, path) {
            tracing::warn!(file = name, error = %e, "cannot make the file durable; retrying");
        }
    }
}

/// A database file's WAL (`-wal`) or its index (`-shm`).
fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut path = db.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// How many frames the WAL holds, read from the header of its index (the
/// `-shm` file, in SQLite's documented WAL format: `mxFrame`, a
/// native-endian u32 at offset 16, and the first salt at offset 32, which
/// changes whenever the WAL starts over). Only a hint of when to
/// checkpoint: unreadable, it says "many", and the checkpoints run every
/// interval as before.
struct WalFrames {
    shm: Option<std::fs::File>,
    path: PathBuf,
    /// `(mxFrame, salt)` just before the last checkpoint.
    at_checkpoint: Option<(u32, u32)>,
}

impl WalFrames {
    fn new(db: &Path) -> Self {
        WalFrames {
            shm: None,
            path: sibling(db, "-shm"),
            at_checkpoint: None,
        }
    }

    /// `(mxFrame, salt)` now.
    fn read(&mut self) -> Option<(u32, u32)> {
        use std::os::unix::fs::FileExt;
        if self.shm.is_none() {
            self.shm = std::fs::File::open(&self.path).ok();
        }
        let mut header = [0u8; 36];
        self.shm.as_ref()?.read_exact_at(&mut header, 0).ok()?;
        let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().unwrap());
        Some((word(16), word(32)))
    }

    /// Frames written since the last checkpoint (all of them if the WAL
    /// started over since: a count alone cannot tell a new WAL of as many
    /// frames from the old one).
    fn new_since_checkpoint(&mut self) -> u32 {
        match (self.read(), self.at_checkpoint) {
            (Some((now, salt)), Some((then, then_salt))) if salt == then_salt => {
                now.saturating_sub(then)
            }
            (Some((now, _)), _) => now,
            (None, _) => u32::MAX,
        }
    }

    /// A checkpoint ran; `seen` is what [`WalFrames::read`] said before it.
    fn checkpointed(&mut self, seen: Option<(u32, u32)>) {
        self.at_checkpoint = seen;
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

    /// A WAL-mode database with a table `t` and no automatic checkpoints:
    /// only a checkpointer moves rows into the database file.
    fn wal_db(dir: &Path) -> (PathBuf, Connection) {
        let path = dir.join("t.db");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute_batch("CREATE TABLE t (v BLOB NOT NULL)")
            .unwrap();
        (path, writer)
    }

    #[test]
    fn copies_the_wal_back_while_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = wal_db(dir.path());
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

    /// A mark becomes durable only once asked for, then on the thread's
    /// next pass, as committed when it looked (never one not committed).
    #[test]
    fn a_wanted_mark_becomes_durable_on_the_next_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.pragma_update(None, "synchronous", "NORMAL").unwrap();
        writer
            .execute_batch("CREATE TABLE m (v INTEGER NOT NULL); INSERT INTO m VALUES (0);")
            .unwrap();
        let durability = Durability::new(|c| {
            c.query_row("SELECT v FROM m", [], |r| r.get::<_, i64>(0))
                .map(|v| v as u64)
                .map_err(|e| e.to_string())
        });
        let interval = Duration::from_millis(10);
        let checkpointer =
            Checkpointer::spawn_with(&path, interval, Some(durability.clone())).unwrap();
        writer.execute("UPDATE m SET v = 7", []).unwrap();
        std::thread::sleep(interval * 5);
        assert_eq!(durability.durable(), 0, "nothing was asked for");

        durability.want(5);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while durability.durable() < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "the mark never became durable"
            );
            std::thread::sleep(interval);
        }
        assert_eq!(
            durability.durable(),
            7,
            "the committed mark, read after the ask"
        );

        // An open, uncommitted transaction's mark is not the one made durable.
        writer.execute_batch("BEGIN; UPDATE m SET v = 9;").unwrap();
        durability.want(8);
        std::thread::sleep(interval * 5);
        assert_eq!(durability.durable(), 7);
        writer.execute_batch("COMMIT").unwrap();
        while durability.durable() < 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "the mark never became durable"
            );
            std::thread::sleep(interval);
        }
        assert_eq!(durability.durable(), 9);
        drop(checkpointer);
    }

    #[test]
    fn counts_the_frames_written_since_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = wal_db(dir.path());
        let mut frames = WalFrames::new(&path);
        let before = frames.new_since_checkpoint();
        writer
            .execute("INSERT INTO t (v) VALUES (zeroblob(40000))", [])
            .unwrap();
        let after = frames.new_since_checkpoint();
        assert!(
            after >= before + 10,
            "a 40 kB row is 10+ frames: {before} -> {after}"
        );
        let seen = frames.read();
        writer
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        frames.checkpointed(seen);
        assert_eq!(frames.new_since_checkpoint(), 0);
        // The WAL starts over with the next commit: its frames are new.
        writer
            .execute("INSERT INTO t (v) VALUES (zeroblob(100))", [])
            .unwrap();
        let restarted = frames.new_since_checkpoint();
        assert!((1..10).contains(&restarted), "{restarted}");
        // A new WAL as long as the old one was is still all new (a commit
        // between the pass and its count once made frames wait forever).
        let (now, salt) = frames.read().unwrap();
        assert_ne!(Some(salt), seen.map(|s| s.1), "the salt changed");
        frames.checkpointed(seen.map(|(_, old_salt)| (now, old_salt)));
        assert_eq!(frames.new_since_checkpoint(), now);
    }

    /// Sparse writes wait [`QUIET_FACTOR`] intervals for their checkpoint;
    /// a burst of [`BUSY_FRAMES`] is copied back at the next interval.
    #[test]
    fn sparse_writes_wait_and_bursts_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = wal_db(dir.path());
        let interval = Duration::from_millis(20);
        let main_size = || std::fs::metadata(&path).unwrap().len();
        let created = main_size();
        let checkpointer = Checkpointer::spawn_every(&path, interval).unwrap();
        // The table's creation is copied back first; the quiet wait starts
        // over then.
        let deadline = std::time::Instant::now() + interval * QUIET_FACTOR * 10;
        while main_size() == created {
            assert!(
                std::time::Instant::now() < deadline,
                "the creation never copied back"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let start = main_size();
        writer
            .execute("INSERT INTO t (v) VALUES (zeroblob(40000))", [])
            .unwrap();
        std::thread::sleep(interval * 3);
        assert_eq!(main_size(), start, "a few frames were copied back at once");
        let deadline = std::time::Instant::now() + interval * QUIET_FACTOR * 10;
        while main_size() == start {
            assert!(
                std::time::Instant::now() < deadline,
                "sparse frames never copied back"
            );
            std::thread::sleep(interval);
        }
        let quiet = main_size();
        writer
            .execute("INSERT INTO t (v) VALUES (zeroblob(2000000))", [])
            .unwrap();
        std::thread::sleep(interval * 5);
        assert!(
            main_size() > quiet + 1_000_000,
            "a burst waited for the quiet period"
        );
        drop(checkpointer);
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
