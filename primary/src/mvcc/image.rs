//! A consistent image of the state file, streamed page by page from one
//! read transaction: what a full backup stores and a Raft snapshot
//! carries.
//!
//! Why not `VACUUM INTO` a copy and read that: the copy writes the whole
//! state to disk again, and at 1 M keys that is over a gigabyte at a few
//! hundred MB/s on the disk the member's own log fsyncs go to, which stalled
//! its commits for hundreds of milliseconds. Here the pages come through
//! SQLite's own pager (the `sqlite_dbpage` table, built in with
//! `SQLITE_ENABLE_DBPAGE_VTAB`), so they are exactly the database as the
//! read transaction sees it, WAL frames included, while the writer goes on.
//! Nothing is written but the stream.
//!
//! Two pages differ from the file's: page 1 says "rollback journal" rather
//! than "WAL" (the image is a standalone file with no `-wal` beside it; a
//! member that opens it switches it back), and free pages are zeroed (they
//! hold old, deleted rows, which a backup should not carry and zstd should
//! not spend time on).

use std::io::Write;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::MvccError;

/// The state as one read transaction sees it. Everything read through
/// [`StateImage::conn`] sees the same revision as the pages.
pub struct StateImage {
    conn: Connection,
    page_size: usize,
    page_count: u32,
}

/// Where page 1's header keeps what the image rewrites or reads.
/// <https://www.sqlite.org/fileformat.html#the_database_header>
const WRITE_VERSION: usize = 18;
const READ_VERSION: usize = 19;
const FIRST_FREELIST_TRUNK: usize = 32;

impl StateImage {
    /// Open `path` and start the read transaction the image is taken from.
    pub fn open(path: &Path) -> Result<Self, MvccError> {
        let conn = super::schema::open_reader(path)?;
        conn.execute_batch("BEGIN")?;
        // The first read fixes the transaction's snapshot.
        let page_count: u32 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: usize = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(StateImage {
            conn,
            page_size,
            page_count,
        })
    }

    /// A connection inside the image's read transaction.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.page_size as u64 * u64::from(self.page_count)
    }

    /// Write every page, in order, to `out`; returns the bytes written.
    /// `out`'s errors come back as [`ImageError::Write`], so a caller can
    /// tell its own sink's failure from SQLite's.
    pub fn write_to(&self, out: &mut impl Write) -> Result<u64, ImageError> {
        let free = self.free_pages()?;
        let zeros = vec![0u8; self.page_size];
        let mut pages = self
            .conn
            .prepare("SELECT pgno, data FROM sqlite_dbpage('main') ORDER BY pgno")?;
        let mut rows = pages.query([])?;
        let mut written = 0u64;
        let mut expected = 1u32;
        while let Some(row) = rows.next()? {
            let pgno: u32 = row.get(0)?;
            let data = row
                .get_ref(1)?
                .as_blob()
                .map_err(|e| ImageError::Unexpected(format!("page {pgno}: {e}")))?;
            if pgno != expected || data.len() != self.page_size {
                return Err(ImageError::Unexpected(format!(
                    "sqlite_dbpage gave page {pgno} of {} bytes where page {expected} of {} was \
                     due",
                    data.len(),
                    self.page_size
                )));
            }
            expected += 1;
            let result = match free.get(pgno) {
                Free::No if pgno == 1 => {
                    let mut first = data.to_vec();
                    first[WRITE_VERSION] = 1;
                    first[READ_VERSION] = 1;
                    out.write_all(&first)
                }
                Free::No => out.write_all(data),
                Free::Leaf => out.write_all(&zeros),
                Free::Trunk(used) => out
                    .write_all(&data[..used])
                    .and_then(|()| out.write_all(&zeros[used..])),
            };
            result.map_err(ImageError::Write)?;
            written += self.page_size as u64;
        }
        if expected != self.page_count + 1 {
            return Err(ImageError::Unexpected(format!(
                "sqlite_dbpage ended at page {} of {}",
                expected - 1,
                self.page_count
            )));
        }
        Ok(written)
    }

    /// The freelist: its trunk pages (how many of their bytes are in use)
    /// and its leaf pages.
    fn free_pages(&self) -> Result<FreeList, ImageError> {
        let mut list = FreeList::default();
        let page = |pgno: u32| -> Result<Vec<u8>, ImageError> {
            self.conn
                .query_row(
                    "SELECT data FROM sqlite_dbpage('main') WHERE pgno = ?1",
                    [pgno],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| {
                    ImageError::Unexpected(format!("freelist page {pgno} is past the end"))
                })
        };
        let first = page(1)?;
        let mut trunk = be32(&first, FIRST_FREELIST_TRUNK);
        while trunk != 0 {
            if trunk > self.page_count || list.trunks.contains_key(&trunk) {
                return Err(ImageError::Unexpected(format!(
                    "freelist trunk {trunk} is out of place"
                )));
            }
            let data = page(trunk)?;
            let leaves = be32(&data, 4) as usize;
            let used = 8 + 4 * leaves;
            if used > data.len() {
                return Err(ImageError::Unexpected(format!(
                    "freelist trunk {trunk} lists {leaves} leaves"
                )));
            }
            for i in 0..leaves {
                list.leaves.insert(be32(&data, 8 + 4 * i));
            }
            list.trunks.insert(trunk, used);
            trunk = be32(&data, 0);
        }
        Ok(list)
    }
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading the state: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The pages are not what SQLite's own header says they are.
    #[error("reading the state: {0}")]
    Unexpected(String),
    /// The sink failed.
    #[error("{0}")]
    Write(std::io::Error),
}

#[derive(Default)]
struct FreeList {
    trunks: std::collections::HashMap<u32, usize>,
    leaves: std::collections::HashSet<u32>,
}

enum Free {
    No,
    Leaf,
    Trunk(usize),
}

impl FreeList {
    fn get(&self, pgno: u32) -> Free {
        if let Some(&used) = self.trunks.get(&pgno) {
            Free::Trunk(used)
        } else if self.leaves.contains(&pgno) {
            Free::Leaf
        } else {
            Free::No
        }
    }
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state with free pages full of deleted rows, written on while the
    /// image streams.
    #[test]
    fn the_image_is_the_state_at_its_transaction_with_free_pages_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                 INSERT INTO t SELECT i, randomblob(900) || x'5345435245544f4c44' FROM n;
                 DELETE FROM t WHERE k > 500;",
            )
            .unwrap();
        let free: i64 = writer
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        assert!(free > 300, "{free} free pages");

        let image = StateImage::open(&path).unwrap();
        // Written after the image's transaction began: not in the image.
        writer
            .execute_batch("INSERT INTO t VALUES (9999, x'00'); DELETE FROM t WHERE k <= 10;")
            .unwrap();
        let mut bytes = Vec::new();
        let written = image.write_to(&mut bytes).unwrap();
        assert_eq!(written, image.size());
        assert_eq!(bytes.len() as u64, written);
        drop(image);

        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, &bytes).unwrap();
        let conn = Connection::open(&copy).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete", "a standalone file");
        let (count, min, max): (i64, i64, i64) = conn
            .query_row("SELECT COUNT(*), MIN(k), MAX(k) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((count, min, max), (500, 1, 500));
        // The deleted rows' bytes are in the file but not in the image.
        let marker = b"SECRETOLD";
        let count = |bytes: &[u8]| bytes.windows(marker.len()).filter(|w| w == marker).count();
        let on_disk = count(&std::fs::read(&path).unwrap())
            + count(&std::fs::read(dir.path().join("state.db-wal")).unwrap_or_default());
        assert!(on_disk >= 1500, "{on_disk} markers in the state's files");
        // 500 live rows, and what is left of deleted cells on the live
        // pages that held the last of them (4 rows a page).
        let in_image = count(&bytes);
        assert!(
            (500..=504).contains(&in_image),
            "{in_image} markers in the image"
        );
        // The copy still works as a database: free pages are reused.
        conn.execute_batch(
            "INSERT INTO t SELECT k + 10000, v FROM t; DELETE FROM t WHERE k > 10000;",
        )
        .unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}
