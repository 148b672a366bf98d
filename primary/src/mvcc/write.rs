//! The single writer: applies changes at new revisions.
//!
//! Only the Raft thread holds an [`MvccStore`]. It opens one [`Batch`] per
//! group of committed entries. Within a batch each entry is its own
//! revision; [`Batch::entry`] wraps one in a savepoint so a failing request
//! (a txn naming an unknown lease, say) leaves no trace while its
//! neighbours stay.
//!
//! Batches the Raft thread applies ([`Batch::end`]) stay in one open SQLite
//! transaction, committed by [`MvccStore::commit`] when a reader needs them
//! or every few milliseconds, as etcd's backend commits its batch
//! transaction every 100 ms. Each SQLite commit writes every page it
//! touched into the WAL (a put's history leaf, its two index leaves, its
//! key's leaf, the meta page), so at one client a commit per put cost about
//! a fifth of the put's CPU. Nothing is lost by waiting: the state's
//! commits are not fsynced anyway (the Raft log is the durability
//! boundary, and a restart applies the log again from the state's applied
//! index).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::read::{self, KeyRange};
use super::MvccError;
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// The counters kept in `meta`, mirrored in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreState {
    /// The store revision; etcd starts an empty store at 1.
    pub revision: i64,
    pub compact_revision: i64,
    pub applied_index: u64,
    pub applied_term: u64,
}

/// etcd's `compactMainRev` for a stored compaction point: -1 until
/// something is compacted (stored as 0 here). Requests at or before it
/// are compacted away.
pub fn compact_main_revision(compact_revision: i64) -> i64 {
    if compact_revision == 0 {
        -1
    } else {
        compact_revision
    }
}

pub struct MvccStore {
    conn: Connection,
    /// Everything applied, committed to SQLite or not.
    state: StoreState,
    open: OpenTransaction,
}

/// The SQLite transaction holding applied batches not yet committed.
struct OpenTransaction {
    /// When it began; `None` when none is open.
    since: Option<std::time::Instant>,
    /// The state as of the last commit: what other connections see.
    committed: StoreState,
}

impl MvccStore {
    pub fn open(path: &Path) -> Result<Self, MvccError> {
        let conn = super::schema::open(path)?;
        let state = read::store_state(&conn)?;
        Ok(MvccStore {
            conn,
            state,
            open: OpenTransaction {
                since: None,
                committed: state,
            },
        })
    }

    /// Everything applied, whether committed or not.
    pub fn state(&self) -> StoreState {
        self.state
    }

    /// What other connections see: the state as of the last commit.
    pub fn committed(&self) -> StoreState {
        self.open.committed
    }

    /// Since when applied batches have waited for [`MvccStore::commit`].
    pub fn uncommitted_since(&self) -> Option<std::time::Instant> {
        self.open.since
    }

    /// Commit the batches applied since the last commit, so that other
    /// connections see them. No fsync (`synchronous=NORMAL`): the Raft log
    /// is durable, the state catches up from it after a crash.
    pub fn commit(&mut self) -> Result<(), MvccError> {
        if self.open.since.is_some() {
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            self.open.since = None;
        }
        self.open.committed = self.state;
        Ok(())
    }

    /// The write connection; it sees what is applied but not committed.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Bytes the database's pages take, as this connection sees it (no
    /// I/O: SQLite keeps the page count in memory).
    pub fn file_bytes(&self) -> Result<i64, MvccError> {
        let pages: i64 = self
            .conn
            .prepare_cached("PRAGMA page_count")?
            .query_row([], |r| r.get(0))?;
        Ok(pages * super::schema::PAGE_SIZE)
    }

    /// Start applying a group of entries. The transaction takes the write
    /// lock at once (IMMEDIATE): a deferred one would read first and then
    /// upgrade, and SQLite answers an upgrade that finds the lock held
    /// (for a moment, by the checkpointer's connection) with "database is
    /// locked" at once instead of waiting, which would stop the node.
    pub fn batch(&mut self) -> Result<Batch<'_>, MvccError> {
        if self.open.since.is_none() {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            self.open.since = Some(std::time::Instant::now());
        }
        // No savepoint of the batch's own: with one open, SQLite copies
        // every page the batch changes into its sub-journal first (10% of
        // the Raft thread at 100 clients of puts). A batch dropped
        // unfinished, which only a failure that stops the node does, rolls
        // the open transaction back instead (see `Drop for Batch`).
        Ok(Batch {
            state: self.state,
            target: &mut self.state,
            open: &mut self.open,
            tx: &self.conn,
            finished: false,
            events: Vec::new(),
            changed: false,
            sub: 0,
            index: 0,
        })
    }

    /// Make every committed transaction durable: a checkpoint fsyncs the
    /// WAL before copying it back (and the database after), so after this
    /// the applied index is on disk and the Raft log before it can go.
    /// PASSIVE never waits for readers; frames it cannot copy yet are
    /// already durable in the synced WAL. It does not wait for another
    /// checkpointer either (the [`crate::checkpointer`] thread): it answers
    /// busy without syncing anything, so it is asked again until it ran.
    pub fn checkpoint(&mut self) -> Result<(), MvccError> {
        self.commit()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let busy: bool = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(0))?;
            if !busy {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(MvccError::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                    Some("the state's WAL could not be checkpointed for 30 s".into()),
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Rebuild the file without free pages (etcd's defragment). The
    /// checkpoint after it is PASSIVE: this runs on the Raft thread, and a
    /// TRUNCATE checkpoint would wait for readers (a snapshot stream, say)
    /// while every write waits for it.
    pub fn vacuum(&mut self) -> Result<(), MvccError> {
        self.commit()?;
        self.conn.execute_batch("VACUUM")?;
        self.checkpoint()
    }

    /// Replace the whole replicated state with the one in the state file at
    /// `snapshot` (a Raft snapshot from the leader), in one transaction,
    /// then make it durable: the caller drops the Raft log behind it next.
    /// The member's own ids (`member_id`, `cluster_id`) stay.
    pub fn restore(&mut self, snapshot: &Path) -> Result<(), MvccError> {
        self.replace_from(snapshot, Replace::Everything)
    }

    /// Replace the keyspace, leases and auth with the state file at `seed`
    /// (a follower seeded again from its source's snapshot), keeping this
    /// member's members, alarms and Raft position: its log goes on from
    /// the entry it applied last.
    pub fn reseed(&mut self, seed: &Path) -> Result<(), MvccError> {
        self.replace_from(seed, Replace::Keyspace)
    }

    fn replace_from(&mut self, snapshot: &Path, what: Replace) -> Result<(), MvccError> {
        // Both opening and ATTACH create a missing file, as an empty state.
        if !snapshot.is_file() {
            return Err(MvccError::MissingState {
                path: snapshot.to_path_buf(),
            });
        }
        self.commit()?;
        // Tables are copied column for column, so bring the snapshot to
        // this build's format first (a leader still on an older Tern sends
        // an older one; a newer one is refused).
        drop(super::schema::open(snapshot)?);
        self.conn.execute(
            "ATTACH DATABASE ?1 AS snap",
            [snapshot.to_string_lossy().as_ref()],
        )?;
        let membership = match what {
            Replace::Everything => {
                "DELETE FROM members;    INSERT INTO members    SELECT * FROM snap.members;
                 DELETE FROM alarms;     INSERT INTO alarms     SELECT * FROM snap.alarms;"
            }
            Replace::Keyspace => "",
        };
        let position = match what {
            Replace::Everything => "'applied_index', 'applied_term',",
            Replace::Keyspace => "",
        };
        let copied = self.conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             DELETE FROM kv_history; INSERT INTO kv_history SELECT * FROM snap.kv_history;
             DELETE FROM kv_keys;    INSERT INTO kv_keys    SELECT * FROM snap.kv_keys;
             DELETE FROM leases;     INSERT INTO leases     SELECT * FROM snap.leases;
             {membership}
             DELETE FROM auth_users; INSERT INTO auth_users SELECT * FROM snap.auth_users;
             DELETE FROM auth_roles; INSERT INTO auth_roles SELECT * FROM snap.auth_roles;
             DELETE FROM auth_permissions;
             INSERT INTO auth_permissions SELECT * FROM snap.auth_permissions;
             DELETE FROM meta WHERE name IN ('auth_enabled', 'auth_revision');
             INSERT OR REPLACE INTO meta (name, value)
                 SELECT name, value FROM snap.meta
                 WHERE name IN ('revision', 'compact_revision', {position}
                                'auth_enabled', 'auth_revision');
             COMMIT;"
        ));
        if copied.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let detached = self.conn.execute_batch("DETACH DATABASE snap");
        copied?;
        detached?;
        self.state = read::store_state(&self.conn)?;
        self.open.committed = self.state;
        self.checkpoint()
    }
}

/// A live row read for a write: the key's value, and its history row's
/// id and revision (the new row links to it).
fn split_live(row: Option<(KeyValue, i64)>) -> (Option<KeyValue>, Option<(i64, i64)>) {
    match row {
        Some((kv, id)) => {
            let newest = (id, kv.mod_revision);
            (Some(kv), Some(newest))
        }
        None => (None, None),
    }
}

/// What [`MvccStore::replace_from`] takes from the new state file.
enum Replace {
    /// A leader's snapshot: all of it, members and Raft position included.
    Everything,
    /// A follower's new seed: the keyspace, leases and auth only.
    Keyspace,
}

/// A group of entries applied together, in the store's open transaction.
pub struct Batch<'a> {
    tx: &'a Connection,
    /// Working copy; written to `target` only when the batch ends.
    state: StoreState,
    target: &'a mut StoreState,
    open: &'a mut OpenTransaction,
    /// Ended; otherwise dropping it rolls the open transaction back.
    finished: bool,
    /// Changes of the whole batch, in revision order, with `prev_kv` filled.
    events: Vec<Event>,
    /// Whether the entry being applied has changed anything yet.
    changed: bool,
    sub: i64,
    /// The Raft index of the entry being applied.
    index: u64,
}

impl Batch<'_> {
    pub fn state(&self) -> StoreState {
        self.state
    }

    pub fn conn(&self) -> &Connection {
        self.tx
    }

    /// Apply one entry: `f` runs inside a savepoint; on error its changes
    /// are rolled back and the error returned. Either way the entry counts
    /// as applied at `index`.
    pub fn entry<T>(
        &mut self,
        index: u64,
        term: u64,
        f: impl FnOnce(&mut Self) -> Result<T, crate::apply::ApplyError>,
    ) -> Result<T, crate::apply::ApplyError> {
        self.apply_entry(index, term, true, f)
    }

    /// [`entry`](Self::entry) without the savepoint, for a request whose
    /// apply checks everything before its one write (a put): a failure
    /// after that write can only be the storage's, which stops the node
    /// and rolls the open transaction back. The savepoint copies every
    /// page the entry touches into SQLite's statement journal
    /// (`sqlite3BtreeSavepoint` was ~4% of the Raft threads in a 3-member
    /// profile). Should such an entry still fail after writing, it is
    /// refused as a storage failure ([`MvccError::FailedAfterWriting`]).
    pub fn entry_checked_first<T>(
        &mut self,
        index: u64,
        term: u64,
        f: impl FnOnce(&mut Self) -> Result<T, crate::apply::ApplyError>,
    ) -> Result<T, crate::apply::ApplyError> {
        self.apply_entry(index, term, false, f)
    }

    fn apply_entry<T>(
        &mut self,
        index: u64,
        term: u64,
        savepoint: bool,
        f: impl FnOnce(&mut Self) -> Result<T, crate::apply::ApplyError>,
    ) -> Result<T, crate::apply::ApplyError> {
        if savepoint {
            self.exec_cached("SAVEPOINT entry")?;
        }
        let saved = (self.state, self.events.len());
        self.changed = false;
        self.sub = 0;
        self.index = index;
        let result = f(self);
        match &result {
            Ok(_) => {
                if savepoint {
                    self.exec_cached("RELEASE entry")?;
                }
                if self.changed {
                    self.state.revision += 1;
                }
            }
            Err(crate::apply::ApplyError::Storage(_)) if !savepoint => {}
            Err(_) if !savepoint && self.changed => {
                return Err(MvccError::FailedAfterWriting { index }.into());
            }
            Err(_) => {
                if savepoint {
                    self.exec_cached("ROLLBACK TO entry")?;
                    self.exec_cached("RELEASE entry")?;
                }
                self.state = saved.0;
                self.events.truncate(saved.1);
            }
        }
        self.changed = false;
        self.state.applied_index = index;
        self.state.applied_term = term;
        result
    }

    /// Run a parameterless statement through the statement cache: these
    /// run once per entry, so parsing them each time shows.
    fn exec_cached(&self, sql: &str) -> Result<(), MvccError> {
        self.tx.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// The Raft index of the entry being applied (simple tokens carry it).
    pub fn entry_index(&self) -> u64 {
        self.index
    }

    /// Mark an entry that changes nothing (a conf change, an empty entry).
    pub fn skip(&mut self, index: u64, term: u64) {
        self.state.applied_index = index;
        self.state.applied_term = term;
    }

    /// The revision reads inside the current entry see: etcd's
    /// `beginRev`, plus one once this entry has changed something.
    pub fn read_revision(&self) -> i64 {
        self.state.revision + i64::from(self.changed)
    }

    /// The revision the current entry writes at.
    pub fn write_revision(&self) -> i64 {
        self.state.revision + 1
    }

    pub fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<Option<KeyValue>, MvccError> {
        let (prev, newest) = split_live(read::get_live_row(self.tx, key)?);
        let rev = self.write_revision();
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value: value.to_vec(),
            lease,
        };
        self.write(kv, prev.clone(), newest)?;
        Ok(prev)
    }

    /// A follower's put: `kv` as its source etcd wrote it, all four
    /// revision fields and the lease kept, at this entry's revision
    /// (which is `kv.mod_revision`: the caller checked).
    pub fn put_exact(&mut self, kv: &KeyValue) -> Result<(), MvccError> {
        let (prev, newest) = split_live(read::get_live_row(self.tx, &kv.key)?);
        self.write(kv.clone(), prev, newest)
    }

    /// Add `key`'s row at revision `rev` to the history: its create
    /// revision, version and lease, its value, whether it is a tombstone,
    /// linked (`prev_id`) to the key's newest row so far, `newest` (its
    /// id and revision, if it has one). Returns the new row's id.
    ///
    /// A key is written once per revision (the API refuses a txn naming it
    /// twice), except in a log entry that did not come through the API (a
    /// forged one, or an older member's): its later write of the key
    /// replaces the earlier one, as it always did, and links past it.
    fn insert_history(
        &mut self,
        key: &[u8],
        rev: i64,
        (create_revision, version, lease): (i64, i64, i64),
        value: &[u8],
        tombstone: bool,
        newest: Option<(i64, i64)>,
    ) -> Result<i64, MvccError> {
        let prev_id = match newest {
            Some((id, mod_revision)) if mod_revision == rev => {
                let prev_id: Option<i64> = self
                    .tx
                    .prepare_cached("SELECT prev_id FROM kv_history WHERE id = ?1")?
                    .query_row([id], |r| r.get(0))?;
                self.tx
                    .prepare_cached("DELETE FROM kv_history WHERE id = ?1")?
                    .execute([id])?;
                prev_id
            }
            Some((id, _)) => Some(id),
            None => None,
        };
        self.tx
            .prepare_cached(
                "INSERT INTO kv_history (key, mod_revision, sub, create_revision, version, lease, \
                 value, tombstone, prev_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute((
                key,
                rev,
                self.sub,
                create_revision,
                version,
                lease,
                value,
                tombstone,
                prev_id,
            ))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Write `kv` as the key's new value; `prev` is its live value, which
    /// the caller read from this transaction, and `newest` the id and
    /// revision of its history row. The key row is updated in place (or
    /// inserted, for a new key) rather than replaced: a REPLACE may delete
    /// as well as insert, so SQLite gives each such statement inside a
    /// transaction a statement journal (a copy of every page it touches).
    fn write(
        &mut self,
        kv: KeyValue,
        prev: Option<KeyValue>,
        newest: Option<(i64, i64)>,
    ) -> Result<(), MvccError> {
        let rev = kv.mod_revision;
        // A key that is not live may have been deleted: its new row links
        // to the deletion.
        let newest = match newest {
            Some(live) => Some(live),
            None => read::newest_deletion(self.tx, &kv.key)?,
        };
        let history_id = self.insert_history(
            &kv.key,
            rev,
            (kv.create_revision, kv.version, kv.lease),
            &kv.value,
            false,
            newest,
        )?;
        let sql = if prev.is_some() {
            "UPDATE kv_keys SET create_revision = ?2, mod_revision = ?3, version = ?4, lease = ?5, \
             history_id = ?6 WHERE key = ?1"
        } else {
            "INSERT INTO kv_keys (key, create_revision, mod_revision, version, lease, history_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        };
        self.tx.prepare_cached(sql)?.execute((
            &kv.key,
            kv.create_revision,
            rev,
            kv.version,
            kv.lease,
            history_id,
        ))?;
        self.sub += 1;
        self.changed = true;
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: prev,
        });
        Ok(())
    }

    /// A follower's delete of one key; false when the key is not live
    /// here (the source and this store differ).
    pub fn delete_exact(&mut self, key: &[u8]) -> Result<bool, MvccError> {
        match read::get_live(self.tx, key)? {
            Some(prev) => self.delete_key(&prev).map(|()| true),
            None => Ok(false),
        }
    }

    /// End one revision inside an entry: a follower's entry carries many
    /// of its source's revisions, each its own revision here too.
    pub fn end_revision(&mut self) {
        if self.changed {
            self.state.revision += 1;
            self.changed = false;
            self.sub = 0;
        }
    }

    /// Delete every live key in `range`; returns what was deleted.
    pub fn delete_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>, MvccError> {
        let query = read::RangeQuery {
            range: range.clone(),
            revision: i64::MAX,
            limit: 0,
            count_only: false,
            keys_only: false,
        };
        let doomed = read::range(self.tx, &query, i64::MAX)?.kvs;
        for kv in &doomed {
            self.delete_key(kv)?;
        }
        Ok(doomed)
    }

    fn delete_key(&mut self, prev: &KeyValue) -> Result<(), MvccError> {
        let rev = self.write_revision();
        let newest = read::newest_row(self.tx, &prev.key)?;
        self.insert_history(&prev.key, rev, (0, 0, 0), b"", true, newest)?;
        self.tx
            .prepare_cached("DELETE FROM kv_keys WHERE key = ?1")?
            .execute([&prev.key])?;
        self.sub += 1;
        self.changed = true;
        self.events.push(Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: prev.key.clone(),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: Some(prev.clone()),
        });
        Ok(())
    }

    /// Drop history before `revision`: per key, keep the newest change at
    /// or before it (unless a deletion) and everything after. A row is
    /// superseded at `revision` when a later row links to it at or before
    /// `revision`; rows up to the previous compaction were already
    /// dropped if superseded by then, so only links from rows written
    /// since need following.
    pub fn compact(&mut self, revision: i64) -> Result<(), MvccError> {
        self.tx.execute(
            "DELETE FROM kv_history WHERE id IN (SELECT prev_id FROM kv_history \
             WHERE mod_revision > ?1 AND mod_revision <= ?2 AND prev_id IS NOT NULL)",
            [self.state.compact_revision, revision],
        )?;
        self.tx.execute(
            "DELETE FROM kv_history WHERE tombstone = 1 AND mod_revision < ?1",
            [revision],
        )?;
        self.state.compact_revision = revision;
        Ok(())
    }

    pub fn grant_lease(&mut self, id: i64, ttl: i64) -> Result<(), MvccError> {
        self.tx
            .execute("INSERT INTO leases (id, ttl) VALUES (?1, ?2)", (id, ttl))?;
        Ok(())
    }

    pub fn lease_exists(&self, id: i64) -> Result<bool, MvccError> {
        Ok(read::lease_ttl(self.tx, id)?.is_some())
    }

    /// Remove a lease and delete its keys in this entry's revision.
    pub fn revoke_lease(&mut self, id: i64) -> Result<(), MvccError> {
        for key in read::lease_keys(self.tx, id)? {
            if let Some(kv) = read::get_live(self.tx, &key)? {
                self.delete_key(&kv)?;
            }
        }
        self.tx.execute("DELETE FROM leases WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Remove a lease, keeping its keys (a follower: the source's
    /// deletions of them arrive as revisions of their own).
    pub fn forget_lease(&mut self, id: i64) -> Result<(), MvccError> {
        self.tx.execute("DELETE FROM leases WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn set_alarm(&mut self, member: u64, alarm: i32, active: bool) -> Result<bool, MvccError> {
        let n = if active {
            self.tx.execute(
                "INSERT OR IGNORE INTO alarms (member_id, alarm) VALUES (?1, ?2)",
                (member as i64, alarm),
            )?
        } else {
            self.tx.execute(
                "DELETE FROM alarms WHERE member_id = ?1 AND alarm = ?2",
                (member as i64, alarm),
            )?
        };
        Ok(n > 0)
    }

    pub fn alarms(&self) -> Result<Vec<(u64, i32)>, MvccError> {
        alarms(self.tx)
    }

    /// Record how far behind the leader this member is, for a disaster
    /// takeover to report (see `server::take_over`).
    pub fn record_lag(&self, leader_commit: u64, caught_up_at_ms: u64) -> Result<(), MvccError> {
        let mut stmt = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
        stmt.execute(("leader_commit_seen", leader_commit as i64))?;
        stmt.execute(("caught_up_at_ms", caught_up_at_ms as i64))?;
        Ok(())
    }

    /// End the batch and leave it in the store's open transaction, for
    /// [`MvccStore::commit`]; returns the events it produced, in order.
    pub fn end(mut self) -> Result<Vec<Event>, MvccError> {
        self.finish()?;
        Ok(std::mem::take(&mut self.events))
    }

    /// End the batch and commit it, with every batch before it.
    pub fn commit(mut self) -> Result<Vec<Event>, MvccError> {
        self.finish()?;
        self.exec_cached("COMMIT")?;
        self.open.since = None;
        self.open.committed = self.state;
        Ok(std::mem::take(&mut self.events))
    }

    fn finish(&mut self) -> Result<(), MvccError> {
        let s = self.state;
        {
            let mut stmt = self
                .tx
                .prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
            stmt.execute(("revision", s.revision))?;
            stmt.execute(("compact_revision", s.compact_revision))?;
            stmt.execute(("applied_index", s.applied_index as i64))?;
            stmt.execute(("applied_term", s.applied_term as i64))?;
        }
        self.finished = true;
        *self.target = s;
        Ok(())
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Back to the last commit, as after a crash: the batches ended
            // since it go too, and the Raft log applies them again. (An
            // error may have rolled the transaction back already; then
            // this finds none to roll back.)
            let _ = self.exec_cached("ROLLBACK");
            self.open.since = None;
            *self.target = self.open.committed;
        }
    }
}

/// Raised alarms: (member id, alarm type).
pub fn alarms(conn: &Connection) -> Result<Vec<(u64, i32)>, MvccError> {
    let mut stmt =
        conn.prepare_cached("SELECT member_id, alarm FROM alarms ORDER BY member_id, alarm")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Stored membership: (id, name, peer urls, client urls, learner).
pub type MemberRow = (u64, String, Vec<String>, Vec<String>, bool);

/// Add or change a member as a configuration change says; removes it when
/// `removed`.
pub fn change_member(conn: &Connection, m: &MemberRow, removed: bool) -> Result<(), MvccError> {
    if removed {
        conn.execute("DELETE FROM members WHERE id = ?1", [m.0 as i64])?;
        return Ok(());
    }
    // A promotion names only the id; keep what the learner registered with.
    let existing = members(conn)?.into_iter().find(|e| e.0 == m.0);
    let row = match existing {
        Some(mut e) => {
            e.4 = m.4;
            if !m.2.is_empty() {
                e.2 = m.2.clone();
            }
            e
        }
        None => m.clone(),
    };
    upsert_member(conn, &row)
}

pub fn members(conn: &Connection) -> Result<Vec<MemberRow>, MvccError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, name, peer_urls, client_urls, is_learner FROM members")?;
    let mut rows: Vec<MemberRow> = stmt
        .query_map([], |r| {
            let peers: String = r.get(2)?;
            let clients: String = r.get(3)?;
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get(1)?,
                serde_json::from_str(&peers).unwrap_or_default(),
                serde_json::from_str(&clients).unwrap_or_default(),
                r.get(4)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    // By id as etcd sorts them, unsigned: SQLite orders the stored (signed)
    // value, which puts ids at or above 2^63 first.
    rows.sort_by_key(|m| m.0);
    Ok(rows)
}

pub fn upsert_member(conn: &Connection, m: &MemberRow) -> Result<(), MvccError> {
    conn.execute(
        "INSERT OR REPLACE INTO members (id, name, peer_urls, client_urls, is_learner) VALUES (?1, ?2, ?3, ?4, ?5)",
        (
            m.0 as i64,
            &m.1,
            serde_json::to_string(&m.2).unwrap_or_default(),
            serde_json::to_string(&m.3).unwrap_or_default(),
            m.4,
        ),
    )?;
    Ok(())
}

/// Set a `meta` value outside any batch (bootstrap ids).
pub fn set_meta(conn: &Connection, name: &str, value: i64) -> Result<(), MvccError> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)",
        (name, value),
    )?;
    Ok(())
}

pub fn has_members(conn: &Connection) -> Result<bool, MvccError> {
    Ok(conn
        .query_row("SELECT 1 FROM members LIMIT 1", [], |_| Ok(()))
        .optional()?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_in_unsigned_id_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = MvccStore::open(&dir.path().join("state.db")).expect("open");
        for id in [(1 << 63) + 5, 7, u64::MAX] {
            let row: MemberRow = (id, format!("m{id}"), Vec::new(), Vec::new(), false);
            upsert_member(store.connection(), &row).expect("member");
        }
        let ids: Vec<u64> = members(store.connection())
            .expect("members")
            .iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(ids, [7, (1 << 63) + 5, u64::MAX]);
    }

    #[test]
    fn restoring_from_a_missing_file_is_refused_and_keeps_the_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = MvccStore::open(&dir.path().join("state.db")).expect("open");
        let mut batch = store.batch().expect("batch");
        batch
            .entry(7, 2, |b| Ok(b.put(b"k", b"v", 0)?))
            .expect("put");
        batch.commit().expect("commit");
        let before = store.state();

        let missing = dir.path().join("received-0000000000000009-1.db");
        let refused = store.restore(&missing);
        assert!(
            matches!(&refused, Err(MvccError::MissingState { path }) if *path == missing),
            "{refused:?}"
        );
        assert!(!missing.exists(), "no empty state file was created");
        assert_eq!(store.state(), before);
        let kept = read::get_live(store.connection(), b"k").expect("read");
        assert_eq!(kept.map(|kv| kv.value), Some(b"v".to_vec()));
    }

    /// An entry applied without its savepoint: a put, a refusal before any
    /// write (nothing changes), and a failure after a write (refused as a
    /// storage failure; dropping the batch goes back to the last commit).
    #[test]
    fn entries_checked_first_need_no_savepoint() {
        use crate::apply::ApplyError;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = MvccStore::open(&dir.path().join("state.db")).expect("open");
        let mut batch = store.batch().expect("batch");
        batch
            .entry_checked_first(1, 2, |b| Ok(b.put(b"a", b"1", 0)?))
            .expect("put");
        let refused = batch.entry_checked_first(2, 2, |_| -> Result<(), _> {
            Err(ApplyError::LeaseNotFound)
        });
        assert!(matches!(refused, Err(ApplyError::LeaseNotFound)));
        batch.commit().expect("commit");
        let state = store.state();
        assert_eq!((state.applied_index, state.revision), (2, 2));

        let mut batch = store.batch().expect("batch");
        let failed = batch.entry_checked_first(3, 2, |b| -> Result<(), _> {
            b.put(b"b", b"2", 0)?;
            Err(ApplyError::LeaseNotFound)
        });
        match failed {
            Err(ApplyError::Storage(e)) => {
                assert!(
                    e.to_string()
                        .contains("entry 3 failed after its first write"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        drop(batch);
        assert_eq!(store.state().revision, 2);
        assert!(read::get_live(store.connection(), b"b").unwrap().is_none());
        assert!(read::get_live(store.connection(), b"a").unwrap().is_some());
    }

    /// A log entry that did not come through the API may write a key
    /// twice in one revision: the later write replaces the earlier one and
    /// links past it, so reads at every revision, watch history with
    /// `prev_kv` and compaction see one change per revision.
    #[test]
    fn a_key_written_twice_in_one_revision_keeps_the_later_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = MvccStore::open(&dir.path().join("state.db")).expect("open");
        let a = || read::KeyRange::Single(b"a".to_vec());
        let mut batch = store.batch().expect("batch");
        batch.entry(1, 1, |b| Ok(b.put(b"a", b"1", 0)?)).unwrap();
        batch
            .entry(2, 1, |b| {
                b.put(b"a", b"2", 0)?;
                Ok(b.put(b"a", b"3", 0)?)
            })
            .unwrap();
        batch
            .entry(3, 1, |b| {
                b.delete_range(&a())?;
                Ok(b.put(b"a", b"4", 0)?)
            })
            .unwrap();
        batch.entry(4, 1, |b| Ok(b.put(b"a", b"5", 0)?)).unwrap();
        batch.commit().unwrap();
        let conn = store.connection();
        let at = |revision| {
            let query = read::RangeQuery {
                range: a(),
                revision,
                limit: 0,
                count_only: false,
                keys_only: false,
            };
            let kvs = read::range(conn, &query, 5).unwrap().kvs;
            kvs.into_iter()
                .map(|kv| (kv.value, kv.version))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(2), [(b"1".to_vec(), 1)]);
        assert_eq!(at(3), [(b"3".to_vec(), 3)]);
        assert_eq!(at(4), [(b"4".to_vec(), 1)]);
        assert_eq!(at(5), [(b"5".to_vec(), 2)]);
        let (events, _) = read::history(conn, &a(), 2, 5, 100, true).unwrap();
        let seen: Vec<_> = events
            .iter()
            .map(|e| {
                let value = |kv: &Option<KeyValue>| kv.as_ref().map(|kv| kv.value.clone());
                (value(&e.kv), value(&e.prev_kv))
            })
            .collect();
        let some = |v: &[u8]| Some(v.to_vec());
        assert_eq!(
            seen,
            [
                (some(b"1"), None),
                (some(b"3"), some(b"1")),
                (some(b"4"), some(b"3")),
                (some(b"5"), some(b"4")),
            ]
        );

        let mut batch = store.batch().expect("batch");
        batch.entry(5, 1, |b| Ok(b.compact(4)?)).unwrap();
        batch.commit().unwrap();
        let rows: i64 = store
            .connection()
            .query_row("SELECT count(*) FROM kv_history", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2, "the changes at revisions 4 and 5 are left");
    }

    fn put_at<'a>(store: &'a mut MvccStore, index: u64, key: &[u8]) -> Batch<'a> {
        let mut batch = store.batch().expect("batch");
        batch
            .entry(index, 1, |b| Ok(b.put(key, b"v", 0)?))
            .expect("put");
        batch
    }

    fn seen_by_a_reader(path: &Path, key: &[u8]) -> bool {
        let reader = super::super::schema::open_reader(path).expect("reader");
        read::get_live(&reader, key).expect("read").is_some()
    }

    #[test]
    fn ended_batches_wait_in_one_transaction_until_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let mut store = MvccStore::open(&path).expect("open");
        put_at(&mut store, 1, b"a").end().expect("end");
        put_at(&mut store, 2, b"b").end().expect("end");
        assert_eq!(store.state().applied_index, 2);
        assert_eq!(store.committed().applied_index, 0);
        assert!(store.uncommitted_since().is_some());
        // The writer sees what it applied; another connection does not.
        assert!(read::get_live(store.connection(), b"b").unwrap().is_some());
        assert!(!seen_by_a_reader(&path, b"a"));
        assert_eq!(
            read::store_state(&super::super::schema::open_reader(&path).unwrap())
                .unwrap()
                .applied_index,
            0
        );

        store.commit().expect("commit");
        assert!(store.uncommitted_since().is_none());
        assert_eq!(store.committed(), store.state());
        assert!(seen_by_a_reader(&path, b"a") && seen_by_a_reader(&path, b"b"));

        // A crash before the commit loses the batches (the log applies
        // them again): the file holds the last commit.
        put_at(&mut store, 3, b"c").end().expect("end");
        drop(store);
        let store = MvccStore::open(&path).expect("reopen");
        assert_eq!(store.state().applied_index, 2);
        assert!(!seen_by_a_reader(&path, b"c"));
    }

    #[test]
    fn a_batch_dropped_unfinished_goes_back_to_the_last_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let mut store = MvccStore::open(&path).expect("open");
        put_at(&mut store, 1, b"a").commit().expect("commit");
        put_at(&mut store, 2, b"b").end().expect("end");
        drop(put_at(&mut store, 3, b"c"));
        assert_eq!(store.state().applied_index, 1);
        assert_eq!(store.committed().applied_index, 1);
        assert!(store.uncommitted_since().is_none());
        for key in [b"b", b"c"] {
            assert!(read::get_live(store.connection(), key).unwrap().is_none());
        }
        // The log applies the lost entries again.
        put_at(&mut store, 2, b"b").end().expect("end");
        put_at(&mut store, 3, b"c").commit().expect("commit");
        for key in [b"a", b"b", b"c"] {
            assert!(seen_by_a_reader(&path, key));
        }
        assert_eq!(store.committed().applied_index, 3);
        assert_eq!(store.state().revision, 4);
    }

    #[test]
    fn whole_file_operations_commit_the_open_batches_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let mut store = MvccStore::open(&path).expect("open");
        put_at(&mut store, 1, b"a").end().expect("end");
        store.vacuum().expect("vacuum");
        assert!(seen_by_a_reader(&path, b"a"));
        put_at(&mut store, 2, b"b").end().expect("end");
        store.checkpoint().expect("checkpoint");
        assert!(seen_by_a_reader(&path, b"b"));

        // A snapshot's restore replaces the state, open batches included.
        let other = dir.path().join("other.db");
        let mut source = MvccStore::open(&other).expect("open");
        put_at(&mut source, 9, b"z").commit().expect("commit");
        drop(source);
        put_at(&mut store, 3, b"c").end().expect("end");
        store.restore(&other).expect("restore");
        assert_eq!(store.committed().applied_index, 9);
        assert_eq!(store.state(), store.committed());
        assert!(seen_by_a_reader(&path, b"z"));
        assert!(!seen_by_a_reader(&path, b"c"));
    }
}
