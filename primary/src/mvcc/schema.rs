//! Opening the state database: pragmas and tables.
//!
//! The tables are meant to be read without Tern (`sqlite3 state.db`), so
//! names and columns say what they hold and `about` explains them.

use std::path::Path;

use rusqlite::Connection;

use super::MvccError;

/// Bumped whenever a table changes meaning or layout.
pub const FORMAT_VERSION: i64 = 1;

const TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS about (
    topic TEXT PRIMARY KEY,
    text  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv_history (
    key             BLOB    NOT NULL,
    mod_revision    INTEGER NOT NULL,
    sub             INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    value           BLOB    NOT NULL,
    tombstone       INTEGER NOT NULL,
    PRIMARY KEY (key, mod_revision)
);
CREATE INDEX IF NOT EXISTS kv_history_by_revision ON kv_history (mod_revision, sub);
CREATE TABLE IF NOT EXISTS kv_live (
    key             BLOB    PRIMARY KEY,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    value           BLOB    NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_live_by_lease ON kv_live (lease) WHERE lease != 0;
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

const ABOUT: &[(&str, &str)] = &[
    ("format", "Tern MVCC state, an etcd v3 compatible key-value store. Integers that are etcd ids (lease, member) are stored as signed 64-bit two's complement."),
    ("kv_live", "Keys that exist at the current revision, one row each: create/mod revision, version (number of puts since creation), attached lease id (0: none), value."),
    ("kv_history", "Every change to every key since the last compaction, keyed by (key, mod_revision); tombstone=1 rows are deletions. The state at revision R is, per key, the newest row with mod_revision <= R if it is not a tombstone."),
    ("meta", "revision: the store's current revision; compact_revision: history before it is gone; applied_index/applied_term: the last Raft entry applied; cluster_id, member_id."),
    ("leases", "Granted leases: id and TTL in seconds. Keys attached to a lease are deleted when it expires or is revoked."),
    ("members", "Cluster membership: member id, name, peer and client URLs (JSON arrays), learner flag."),
    ("alarms", "Raised alarms per member: 1 = NOSPACE, 2 = CORRUPT."),
    ("example", "SELECT CAST(key AS TEXT), CAST(value AS TEXT) FROM kv_live ORDER BY key;"),
];

/// Open (creating if needed) the state database at `path`.
pub fn open(path: &Path) -> Result<Connection, MvccError> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    conn.execute_batch(TABLES)?;
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

/// Open a read-only connection for the read pool.
pub fn open_reader(path: &Path) -> Result<Connection, MvccError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "cache_size", -16384)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<(), MvccError> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The Raft log is the durability boundary; see the module docs.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}
