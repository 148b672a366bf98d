//! The page cache wrapper (`tern_primary::mvcc::page_cache`) in a process
//! of its own, so that it is installed before SQLite initializes, as in
//! tern-primary and tern-learner.

use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use tern_primary::mvcc::page_cache;

/// Random keys into an indexed table, in many small transactions: the
/// b-tree rebalances that park a page at the lock-byte page's number, then
/// the commits that used to walk the whole cache. The data must come out
/// whole and in order, and the walks must have been skipped.
#[test]
fn random_inserts_commit_without_walking_the_cache_and_lose_nothing() {
    page_cache::install();
    assert!(page_cache::installed(), "SQLite took the wrapper");

    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("t.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA cache_size = -65536;
         CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut keys = Vec::new();
    for _ in 0..500 {
        let tx = conn.unchecked_transaction().unwrap();
        for _ in 0..20 {
            let key: [u8; 16] = rng.random();
            tx.execute(
                "INSERT INTO kv VALUES (?1, ?2)",
                (&key[..], &[7u8; 300][..]),
            )
            .unwrap();
            keys.push(key);
        }
        tx.commit().unwrap();
    }
    // Deletes shrink pages too; then a rolled-back transaction that grew
    // the file, whose pages past the end must really be dropped.
    let deleted = conn
        .execute("DELETE FROM kv WHERE key < x'40'", [])
        .unwrap();
    keys.retain(|k| k[0] >= 0x40);
    assert!(deleted > 0);
    {
        let tx = conn.unchecked_transaction().unwrap();
        for i in 0..2000u32 {
            tx.execute(
                "INSERT INTO kv VALUES (?1, ?2)",
                (&i.to_be_bytes()[..], &[1u8; 1000][..]),
            )
            .unwrap();
        }
        tx.rollback().unwrap();
    }

    assert!(
        page_cache::skipped_truncates() > 0,
        "no truncate was skipped"
    );
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let count: i64 = conn
        .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count as usize, keys.len());
    keys.sort();
    let stored: Vec<Vec<u8>> = conn
        .prepare("SELECT key FROM kv ORDER BY key")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored, keys.iter().map(|k| k.to_vec()).collect::<Vec<_>>());
    // A fresh connection (a cold cache) reads the same.
    let again = Connection::open(dir.path().join("t.db")).unwrap();
    let count: i64 = again
        .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count as usize, keys.len());
}
