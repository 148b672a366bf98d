//! Opening the state database: pragmas and tables.
//!
//! The tables are meant to be read without Tern (`sqlite3 state.db`), so
//! names and columns say what they hold and `about` explains them.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::MvccError;

/// Bumped whenever a table changes meaning or layout.
pub const FORMAT_VERSION: i64 = 3;

const TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS about (
    topic TEXT PRIMARY KEY,
    text  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id  INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    peer_urls   TEXT    NOT NULL,
    client_urls TEXT    NOT NULL,
    is_learner  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS alarms (
    member_id INTEGER NOT NULL,
    alarm     INTEGER NOT NULL,
    PRIMARY KEY (member_id, alarm)
);
"#;

/// The key-value tables of format 3. Each value is stored once, in its
/// `kv_history` row: a rowid table, whose b-tree keeps rows of up to ~4 KB
/// on the leaf page (a WITHOUT ROWID table spills anything over ~1 KB to a
/// mostly empty overflow page), and whose rows arrive in `id` order, so
/// its pages fill completely. `kv_keys` is the small per-key index that
/// points at the row holding the current value.
///
/// A key's rows are linked newest to oldest by `prev_id`, rather than
/// indexed by (key, revision) as in format 2: such an index took a put of
/// a key already written to a random leaf of its own, beside the one of
/// `kv_keys`, and with keys spread over the key space (a Kubernetes
/// store's updates) each dirty leaf is a whole page written into the WAL
/// and copied back by the checkpointer. A read at an older revision
/// starts from the key's newest row (its `kv_keys` row, or for a deleted
/// key its newest deletion, found by the small `kv_history_deletions`
/// index) and follows the links back.
const KV_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS kv_history (
    id              INTEGER PRIMARY KEY,
    key             BLOB    NOT NULL,
    mod_revision    INTEGER NOT NULL,
    sub             INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    value           BLOB    NOT NULL,
    tombstone       INTEGER NOT NULL,
    prev_id         INTEGER
);
CREATE INDEX IF NOT EXISTS kv_history_by_revision ON kv_history (mod_revision);
CREATE INDEX IF NOT EXISTS kv_history_deletions ON kv_history (key, mod_revision) WHERE tombstone = 1;
CREATE TABLE IF NOT EXISTS kv_keys (
    key             BLOB    PRIMARY KEY,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    history_id      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_keys_by_lease ON kv_keys (lease) WHERE lease != 0;
CREATE VIEW IF NOT EXISTS kv_live (key, create_revision, mod_revision, version, lease, value) AS
    SELECT k.key, k.create_revision, k.mod_revision, k.version, k.lease, h.value
    FROM kv_keys k JOIN kv_history h ON h.id = k.history_id;
"#;

/// Format 1 kept every value twice (in `kv_history` and in a `kv_live`
/// table) and spilled 1 KB values to overflow pages: about 4.5 KB on disk
/// per 1 KB value. Rebuilt into the current tables in one transaction, so
/// a crash midway leaves format 1 as it was.
const MIGRATE_1: &str = r#"
DROP INDEX IF EXISTS kv_history_by_revision;
DROP INDEX IF EXISTS kv_live_by_lease;
ALTER TABLE kv_history RENAME TO kv_history_v1;
ALTER TABLE kv_live RENAME TO kv_live_v1;
"#;
/// A key's live row is found among the rows of its revision (by the
/// revision index; the history has no index by key).
const MIGRATE_1_COPY: &str = r#"
INSERT INTO kv_history (id, key, mod_revision, sub, create_revision, version, lease, value, tombstone)
    SELECT row_number() OVER (ORDER BY mod_revision, sub), key, mod_revision, sub,
           create_revision, version, lease, value, tombstone
    FROM kv_history_v1 ORDER BY mod_revision, sub;
INSERT INTO kv_keys (key, create_revision, mod_revision, version, lease, history_id)
    SELECT l.key, l.create_revision, l.mod_revision, l.version, l.lease, h.id
    FROM kv_live_v1 l JOIN kv_history h ON h.mod_revision = l.mod_revision AND h.key = l.key;
DROP TABLE kv_live_v1;
DROP TABLE kv_history_v1;
UPDATE meta SET value = 3 WHERE name = 'format_version';
"#;

/// Format 2 indexed the history by (key, revision). The links that replace
/// that index are filled in from it, then it is dropped, in one
/// transaction.
const MIGRATE_2_TO_3: &str = r#"
ALTER TABLE kv_history ADD COLUMN prev_id INTEGER;
"#;
const MIGRATE_2_TO_3_LINK: &str = r#"
DROP INDEX kv_history_by_key;
CREATE INDEX IF NOT EXISTS kv_history_deletions ON kv_history (key, mod_revision) WHERE tombstone = 1;
UPDATE meta SET value = 3 WHERE name = 'format_version';
"#;

/// Set every row's `prev_id` to its key's previous row, in one pass that
/// sorts the history by key (no index by key is needed). Used when a
/// history is written whole rather than put by put: migrating format 1 or
/// 2, importing an etcd snapshot.
pub fn link_history(conn: &Connection) -> Result<(), MvccError> {
    conn.execute_batch(
        "UPDATE kv_history SET prev_id = linked.prev_id FROM (
             SELECT id, lag(id) OVER (PARTITION BY key ORDER BY mod_revision, sub) AS prev_id
             FROM kv_history) AS linked
         WHERE kv_history.id = linked.id AND kv_history.prev_id IS NOT linked.prev_id;",
    )?;
    Ok(())
}

const ABOUT: &[(&str, &str)] = &[
    ("format", "Tern MVCC state, an etcd v3 compatible key-value store. Integers that are etcd ids (lease, member) are stored as signed 64-bit two's complement."),
    ("kv_live", "A view: keys that exist at the current revision, one row each: create/mod revision, version (number of puts since creation), attached lease id (0: none), value."),
    ("kv_keys", "The table behind kv_live: one row per existing key, pointing (history_id) at the kv_history row that holds its current value."),
    ("kv_history", "Every change to every key since the last compaction, one row each, numbered (id) in revision order; (key, mod_revision) is unique; tombstone=1 rows are deletions; prev_id is the id of the key's previous row (NULL, or a row compaction removed: none). The state at revision R is, per key, the newest row with mod_revision <= R if it is not a tombstone."),
    ("meta", "revision: the store's current revision; compact_revision: history before it is gone; applied_index/applied_term: the last Raft entry applied; cluster_id, member_id."),
    ("leases", "Granted leases: id and TTL in seconds. Keys attached to a lease are deleted when it expires or is revoked."),
    ("members", "Cluster membership: member id, name, peer and client URLs (JSON arrays), learner flag."),
    ("alarms", "Raised alarms per member: 1 = NOSPACE, 2 = CORRUPT."),
    ("example", "SELECT CAST(key AS TEXT), CAST(value AS TEXT) FROM kv_live ORDER BY key;"),
];

/// Open (creating if needed) the state database at `path`, migrating an
/// older format in place. A newer format than this build knows is refused
/// with its version, never read as if it were ours.
pub fn open(path: &Path) -> Result<Connection, MvccError> {
    super::page_cache::install();
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    conn.execute_batch(TABLES)?;
    let found = stored_format(&conn)?;
    match found {
        None => {}
        Some(1) => migrate_1(&mut conn)?,
        Some(2) => migrate_2_to_3(&mut conn)?,
        Some(FORMAT_VERSION) => {}
        Some(other) => {
            return Err(MvccError::Format {
                path: path.to_path_buf(),
                found: other,
            })
        }
    }
    conn.execute_batch(KV_TABLES)?;
    conn.execute_batch(crate::auth::store::TABLES)?;
    {
        let mut about =
            conn.prepare("INSERT OR REPLACE INTO about (topic, text) VALUES (?1, ?2)")?;
        for (topic, text) in ABOUT.iter().chain(crate::auth::store::ABOUT) {
            about.execute((topic, text))?;
        }
    }
    conn.execute(
        "INSERT OR IGNORE INTO meta (name, value) VALUES ('format_version', ?1)",
        [FORMAT_VERSION],
    )?;
    Ok(conn)
}

/// The format a state file was written in; `None` for a new, empty file.
pub fn stored_format(conn: &Connection) -> Result<Option<i64>, MvccError> {
    let has_meta: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'format_version'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

fn migrate_1(conn: &mut Connection) -> Result<(), MvccError> {
    tracing::info!("migrating the state file from format 1 to format {FORMAT_VERSION}");
    let tx = conn.transaction()?;
    tx.execute_batch(MIGRATE_1)?;
    tx.execute_batch(KV_TABLES)?;
    tx.execute_batch(MIGRATE_1_COPY)?;
    link_history(&tx)?;
    tx.commit()?;
    Ok(())
}

fn migrate_2_to_3(conn: &mut Connection) -> Result<(), MvccError> {
    tracing::info!("migrating the state file from format 2 to format 3");
    let tx = conn.transaction()?;
    tx.execute_batch(MIGRATE_2_TO_3)?;
    link_history(&tx)?;
    tx.execute_batch(MIGRATE_2_TO_3_LINK)?;
    tx.commit()?;
    Ok(())
}

/// Bytes per database page. A `kv_history` leaf holds whole rows, so up to
/// one row's worth is wasted at the end of each: at 4 KiB, three 1.1 KiB
/// rows fill 3.3 KiB. 16 KiB pages waste less (16% less disk at 1 KiB
/// values, measured) but every commit writes each page it touches whole
/// into the WAL, and a put touches four or five: they cost 30–50% of the
/// put throughput. Writes win.
pub const PAGE_SIZE: i64 = 4096;

/// Page cache of each read connection, in KiB.
const READER_CACHE_KIB: i64 = 2048;

/// Open a read-only connection for the read pool.
pub fn open_reader(path: &Path) -> Result<Connection, MvccError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // Small: there is one reader per concurrent read (dozens under load),
    // each cache is private, and the OS page cache already holds the file
    // for all of them; 16 MiB each put RSS at several times etcd's.
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<(), MvccError> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // Only takes effect on a new file (and on VACUUM).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The Raft log is the durability boundary; see the module docs.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    Ok(())
}

/// What the state's WAL file is cut back to when it starts over. A long
/// read transaction (a backup streaming to a slow store) keeps every frame
/// written meanwhile, and without a limit the file would keep that size
/// for good. Well above what steady writes leave in it (the checkpointer's
/// backstop is 64 MiB).
pub const WAL_SIZE_LIMIT: i64 = 128 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::read::{self, KeyRange, RangeQuery};

    /// Format 1's key-value tables and a small history in them: `a` put
    /// twice, `b` put then deleted, `c` put with a lease.
    const FORMAT_1: &str = r#"
        CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE kv_history (
            key BLOB NOT NULL, mod_revision INTEGER NOT NULL, sub INTEGER NOT NULL,
            create_revision INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL,
            value BLOB NOT NULL, tombstone INTEGER NOT NULL, PRIMARY KEY (key, mod_revision));
        CREATE INDEX kv_history_by_revision ON kv_history (mod_revision, sub);
        CREATE TABLE kv_live (
            key BLOB PRIMARY KEY, create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,
            version INTEGER NOT NULL, lease INTEGER NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;
        CREATE INDEX kv_live_by_lease ON kv_live (lease) WHERE lease != 0;
        INSERT INTO meta VALUES ('format_version', 1), ('revision', 6);
        INSERT INTO kv_history VALUES
            (CAST('a' AS BLOB), 2, 0, 2, 1, 0, CAST('a1' AS BLOB), 0),
            (CAST('b' AS BLOB), 3, 0, 3, 1, 0, CAST('b1' AS BLOB), 0),
            (CAST('a' AS BLOB), 4, 0, 2, 2, 0, CAST('a2' AS BLOB), 0),
            (CAST('b' AS BLOB), 5, 0, 0, 0, 0, x'', 1),
            (CAST('c' AS BLOB), 6, 0, 6, 1, 7, CAST('c1' AS BLOB), 0);
        INSERT INTO kv_live VALUES
            (CAST('a' AS BLOB), 2, 4, 2, 0, CAST('a2' AS BLOB)),
            (CAST('c' AS BLOB), 6, 6, 1, 7, CAST('c1' AS BLOB));
    "#;

    fn everything(conn: &Connection, revision: i64) -> Vec<(Vec<u8>, Vec<u8>, i64, i64)> {
        let query = RangeQuery {
            range: KeyRange::From(Vec::new()),
            revision,
            limit: 0,
            count_only: false,
            keys_only: false,
        };
        read::range(conn, &query, 6)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.mod_revision, kv.lease))
            .collect()
    }

    #[test]
    fn format_1_is_migrated_on_open_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(FORMAT_1).unwrap();
        let hash_before = read::hash(&old, 6, 0).unwrap();
        drop(old);

        let conn = open(&path).unwrap();
        assert_eq!(stored_format(&conn).unwrap(), Some(FORMAT_VERSION));
        assert_eq!(read::key_count(&conn).unwrap(), 2);
        assert_eq!(
            everything(&conn, 6),
            [
                (b"a".to_vec(), b"a2".to_vec(), 4, 0),
                (b"c".to_vec(), b"c1".to_vec(), 6, 7)
            ]
        );
        assert_eq!(
            everything(&conn, 3),
            [
                (b"a".to_vec(), b"a1".to_vec(), 2, 0),
                (b"b".to_vec(), b"b1".to_vec(), 3, 0)
            ]
        );
        assert_eq!(read::lease_keys(&conn, 7).unwrap(), [b"c".to_vec()]);
        assert_eq!(read::hash(&conn, 6, 0).unwrap(), hash_before);
        // The view a person reads with sqlite3 still answers as before.
        let value: Vec<u8> = conn
            .query_row(
                "SELECT value FROM kv_live WHERE key = CAST('a' AS BLOB)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(value, b"a2");
        drop(conn);
        // Opening again finds the current format and changes nothing.
        let conn = open(&path).unwrap();
        assert_eq!(everything(&conn, 6).len(), 2);
    }

    /// Format 2's key-value tables: the history indexed by (key, revision).
    const FORMAT_2_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS kv_history (
    id              INTEGER PRIMARY KEY,
    key             BLOB    NOT NULL,
    mod_revision    INTEGER NOT NULL,
    sub             INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    value           BLOB    NOT NULL,
    tombstone       INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS kv_history_by_key ON kv_history (key, mod_revision);
CREATE INDEX IF NOT EXISTS kv_history_by_revision ON kv_history (mod_revision);
CREATE TABLE IF NOT EXISTS kv_keys (
    key             BLOB    PRIMARY KEY,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    history_id      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_keys_by_lease ON kv_keys (lease) WHERE lease != 0;
CREATE VIEW IF NOT EXISTS kv_live (key, create_revision, mod_revision, version, lease, value) AS
    SELECT k.key, k.create_revision, k.mod_revision, k.version, k.lease, h.value
    FROM kv_keys k JOIN kv_history h ON h.id = k.history_id;
"#;

    /// Format 2's key-value tables hold the same history as [`FORMAT_1`]'s,
    /// compacted at 3 (`b`'s put at 3 and `a`'s first put were kept; a
    /// format 2 compaction keeps the newest change at or before it).
    fn format_2() -> String {
        format!(
            "{TABLES}{FORMAT_2_TABLES}
            INSERT INTO meta VALUES ('format_version', 2), ('revision', 6), ('compact_revision', 3);
            INSERT INTO kv_history VALUES
                (1, CAST('a' AS BLOB), 2, 0, 2, 1, 0, CAST('a1' AS BLOB), 0),
                (2, CAST('b' AS BLOB), 3, 0, 3, 1, 0, CAST('b1' AS BLOB), 0),
                (3, CAST('a' AS BLOB), 4, 0, 2, 2, 0, CAST('a2' AS BLOB), 0),
                (4, CAST('b' AS BLOB), 5, 0, 0, 0, 0, x'', 1),
                (5, CAST('c' AS BLOB), 6, 0, 6, 1, 7, CAST('c1' AS BLOB), 0);
            INSERT INTO kv_keys VALUES
                (CAST('a' AS BLOB), 2, 4, 2, 0, 3),
                (CAST('c' AS BLOB), 6, 6, 1, 7, 5);"
        )
    }

    #[test]
    fn format_2_is_migrated_on_open_and_its_history_linked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(&format_2()).unwrap();
        let hash_before = read::hash(&old, 6, 3).unwrap();
        let hash_at_5 = read::hash(&old, 5, 3).unwrap();
        drop(old);

        let mut store = crate::mvcc::MvccStore::open(&path).unwrap();
        let conn = store.connection();
        assert_eq!(stored_format(conn).unwrap(), Some(FORMAT_VERSION));
        let links: Vec<(i64, Option<i64>)> = conn
            .prepare("SELECT id, prev_id FROM kv_history ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            links,
            [(1, None), (2, None), (3, Some(1)), (4, Some(2)), (5, None)]
        );
        assert_eq!(
            everything(conn, 3),
            [
                (b"a".to_vec(), b"a1".to_vec(), 2, 0),
                (b"b".to_vec(), b"b1".to_vec(), 3, 0)
            ]
        );
        assert_eq!(everything(conn, 5), [(b"a".to_vec(), b"a2".to_vec(), 4, 0)]);
        assert_eq!(read::hash(conn, 6, 3).unwrap(), hash_before);
        assert_eq!(read::hash(conn, 5, 3).unwrap(), hash_at_5);
        let (events, _) = read::history(conn, &KeyRange::From(Vec::new()), 4, 6, 10, true).unwrap();
        let prev: Vec<Option<Vec<u8>>> = events
            .iter()
            .map(|e| e.prev_kv.as_ref().map(|kv| kv.value.clone()))
            .collect();
        assert_eq!(prev, [Some(b"a1".to_vec()), Some(b"b1".to_vec()), None]);

        // A compaction at 5 follows the links: `a`'s first put and `b`'s
        // put go; `b`'s deletion at 5 itself stays, as before.
        let mut batch = store.batch().unwrap();
        batch.entry(1, 1, |b| Ok(b.compact(5)?)).unwrap();
        batch.commit().unwrap();
        let ids: Vec<i64> = store
            .connection()
            .prepare("SELECT id FROM kv_history ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, [3, 4, 5]);
        assert_eq!(
            everything(store.connection(), 5),
            [(b"a".to_vec(), b"a2".to_vec(), 4, 0)]
        );
    }

    /// A reader held open while the writer goes on lets the WAL grow past
    /// the limit; once it is gone and the WAL starts over, the file shrinks
    /// back.
    #[test]
    fn the_wal_shrinks_back_after_a_long_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (v BLOB); PRAGMA wal_autocheckpoint = 0;")
            .unwrap();
        let reader = open_reader(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let wal = dir.path().join("state.db-wal");
        let chunk = 4 << 20;
        for _ in 0..(WAL_SIZE_LIMIT / chunk + 4) {
            conn.execute("INSERT INTO t VALUES (zeroblob(?1))", [chunk])
                .unwrap();
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .unwrap();
        }
        let grown = std::fs::metadata(&wal).unwrap().len() as i64;
        assert!(grown > WAL_SIZE_LIMIT, "{grown}");
        reader.execute_batch("COMMIT").unwrap();
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        conn.execute("INSERT INTO t VALUES (x'00')", []).unwrap();
        let after = std::fs::metadata(&wal).unwrap().len() as i64;
        assert!(after <= WAL_SIZE_LIMIT, "{after}");
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = open(&path).unwrap();
        conn.execute(
            "UPDATE meta SET value = 99 WHERE name = 'format_version'",
            [],
        )
        .unwrap();
        drop(conn);
        let err = open(&path).unwrap_err().to_string();
        assert!(err.contains("state format 99"), "{err}");
        assert!(err.contains("state.db"), "{err}");
    }

    #[test]
    fn a_format_1_count_reads_its_own_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(FORMAT_1).unwrap();
        // An older backup being verified is read as it is, not migrated.
        assert_eq!(read::key_count(&old).unwrap(), 2);
    }
}
