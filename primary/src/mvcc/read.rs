//! Range queries and history scans.
//!
//! Every function takes a plain `&Connection`, so the writer (inside its
//! transaction, seeing its own uncommitted changes, as etcd's write
//! transactions do) and the read pool share one implementation.

use rusqlite::{Connection, OptionalExtension, Row};

use super::MvccError;
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

/// The end of the range of keys that start with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff
/// incremented; `\0` (every key from there on) if there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's key/range_end pair, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: exactly one key.
    Single(Vec<u8>),
    /// `range_end == "\0"`: every key >= `key`.
    From(Vec<u8>),
    /// `[start, end)`; empty when `end <= start`.
    Between(Vec<u8>, Vec<u8>),
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::From(key.to_vec()),
            end => KeyRange::Between(key.to_vec(), end.to_vec()),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => k.as_slice() == key,
            KeyRange::From(start) => key >= start.as_slice(),
            KeyRange::Between(start, end) => key >= start.as_slice() && key < end.as_slice(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, KeyRange::Between(s, e) if e <= s)
    }

    /// A SQL condition on column `col` with parameters ?1 and ?2.
    fn condition(&self, col: &str) -> String {
        match self {
            KeyRange::Single(_) => format!("{col} = ?1"),
            KeyRange::From(_) => format!("{col} >= ?1"),
            KeyRange::Between(..) => format!("{col} >= ?1 AND {col} < ?2"),
        }
    }

    fn params(&self) -> (&[u8], &[u8]) {
        match self {
            KeyRange::Single(k) | KeyRange::From(k) => (k, &[]),
            KeyRange::Between(s, e) => (s, e),
        }
    }
}

/// What to read. `revision` is already resolved (never 0).
#[derive(Debug, Clone)]
pub struct RangeQuery {
    pub range: KeyRange,
    pub revision: i64,
    /// 0: no limit. Only honoured in SQL; callers that sort or filter pass 0.
    pub limit: i64,
    pub count_only: bool,
    pub keys_only: bool,
}

#[derive(Debug, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Keys in the range at that revision, whatever the limit.
    pub count: i64,
}

/// The columns [`kv_from_row`] reads, from `kv_history` (aliased `h`).
const KV_COLUMNS: &str = "h.key, h.create_revision, h.mod_revision, h.version, h.lease, h.value";
/// The same columns for live keys: metadata from `kv_keys` (aliased `k`),
/// the value from the history row it points at.
const LIVE_COLUMNS: &str = "k.key, k.create_revision, k.mod_revision, k.version, k.lease, h.value";
const LIVE_SOURCE: &str = "kv_keys k JOIN kv_history h ON h.id = k.history_id";

fn kv_from_row(row: &Row<'_>, keys_only: bool) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(0)?,
        create_revision: row.get(1)?,
        mod_revision: row.get(2)?,
        version: row.get(3)?,
        lease: row.get(4)?,
        value: if keys_only { Vec::new() } else { row.get(5)? },
    })
}

/// Read `query` at `query.revision`, where `current` is the store's revision
/// (reads at it use the live table).
pub fn range(
    conn: &Connection,
    query: &RangeQuery,
    current: i64,
) -> Result<RangeResult, MvccError> {
    if query.range.is_empty() {
        return Ok(RangeResult::default());
    }
    if query.revision < current {
        return range_at(conn, query);
    }
    let (a, b) = query.range.params();
    // The rows, and the same condition for counting them: the count needs
    // only `kv_keys`, never the values.
    let condition = query.range.condition("k.key");
    let columns = if query.keys_only {
        "k.key, k.create_revision, k.mod_revision, k.version, k.lease"
    } else {
        LIVE_COLUMNS
    };
    let from = if query.keys_only {
        "kv_keys k"
    } else {
        LIVE_SOURCE
    };
    let source = format!("SELECT {columns} FROM {from} WHERE {condition} ORDER BY k.key");
    let count_source = format!("SELECT count(*) FROM kv_keys k WHERE {condition}");
    let bind = |stmt: &mut rusqlite::Statement<'_>| -> rusqlite::Result<()> {
        stmt.raw_bind_parameter(1, a)?;
        if matches!(query.range, KeyRange::Between(..)) {
            stmt.raw_bind_parameter(2, b)?;
        }
        Ok(())
    };
    let count_rows = || -> Result<i64, MvccError> {
        let mut stmt = conn.prepare_cached(&count_source)?;
        bind(&mut stmt)?;
        let count = stmt.raw_query().next()?.map(|r| r.get(0)).transpose()?;
        Ok(count.unwrap_or(0))
    };
    if query.count_only {
        return Ok(RangeResult {
            kvs: Vec::new(),
            count: count_rows()?,
        });
    }
    // Read one row past the limit: if it is not there, the rows read are
    // the count, and the range is walked once instead of twice.
    let mut sql = source;
    if query.limit > 0 {
        sql.push_str(&format!(" LIMIT {}", query.limit.saturating_add(1)));
    }
    let mut stmt = conn.prepare_cached(&sql)?;
    bind(&mut stmt)?;
    let mut rows = stmt.raw_query();
    let mut kvs = Vec::new();
    while let Some(row) = rows.next()? {
        kvs.push(kv_from_row(row, query.keys_only)?);
    }
    drop(rows);
    let count = if query.limit > 0 && kvs.len() as i64 > query.limit {
        kvs.truncate(query.limit as usize);
        count_rows()?
    } else {
        kvs.len() as i64
    };
    Ok(RangeResult { kvs, count })
}

/// [`range`] at a revision older than the store's.
fn range_at(conn: &Connection, query: &RangeQuery) -> Result<RangeResult, MvccError> {
    let mut kvs = Vec::new();
    let mut count = 0;
    walk_at(conn, &query.range, query.revision, |row| {
        count += 1;
        if !query.count_only && (query.limit <= 0 || (kvs.len() as i64) < query.limit) {
            kvs.push(kv_from_row(row, query.keys_only)?);
        }
        Ok(true)
    })?;
    Ok(RangeResult { kvs, count })
}

/// Whether any key exists at `revision`.
fn any_live_at(conn: &Connection, revision: i64) -> Result<bool, MvccError> {
    let mut any = false;
    walk_at(conn, &KeyRange::From(Vec::new()), revision, |_| {
        any = true;
        Ok(false)
    })?;
    Ok(any)
}

/// The id of `key`'s newest history row at or before `revision`, if any
/// (a deletion included).
fn newest_at(conn: &Connection, key: &[u8], revision: i64) -> Result<Option<i64>, MvccError> {
    let mut id = newest_row(conn, key)?.map(|(id, _)| id);
    let mut row_by_id =
        conn.prepare_cached("SELECT mod_revision, prev_id FROM kv_history WHERE id = ?1")?;
    while let Some(this) = id {
        let Some((mod_revision, prev_id)) = row_by_id
            .query_row([this], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)))
            .optional()?
        else {
            return Ok(None);
        };
        if mod_revision <= revision {
            return Ok(Some(this));
        }
        id = prev_id;
    }
    Ok(None)
}

/// Call `each` with the row (as [`KV_COLUMNS`]) of every key in `range`
/// that exists at `revision`, in key order, until it returns false: per
/// key, its newest row at or before the revision, unless a deletion. The
/// keys that may have existed then are those live now and those deleted
/// since (their newest deletion is after it); each key's rows are
/// followed back from its newest one (see `schema::KV_TABLES`).
fn walk_at(
    conn: &Connection,
    range: &KeyRange,
    revision: i64,
    mut each: impl FnMut(&Row<'_>) -> Result<bool, MvccError>,
) -> Result<(), MvccError> {
    if range.is_empty() {
        return Ok(());
    }
    let (a, b) = range.params();
    let mut heads = conn.prepare_cached(&format!(
        "SELECT key, history_id FROM kv_keys k WHERE {live}
         UNION ALL
         SELECT t.key, t.id FROM (SELECT d.key, d.id, max(d.mod_revision) AS newest
             FROM kv_history d WHERE d.tombstone = 1 AND {deleted} GROUP BY d.key) t
         WHERE t.newest > ?3 AND NOT EXISTS (SELECT 1 FROM kv_keys l WHERE l.key = t.key)
         ORDER BY 1",
        live = range.condition("k.key"),
        deleted = range.condition("d.key"),
    ))?;
    heads.raw_bind_parameter(1, a)?;
    if matches!(range, KeyRange::Between(..)) {
        heads.raw_bind_parameter(2, b)?;
    }
    heads.raw_bind_parameter(3, revision)?;
    let mut row_by_id = conn.prepare_cached(&format!(
        "SELECT {KV_COLUMNS}, h.tombstone, h.prev_id FROM kv_history h WHERE h.id = ?1"
    ))?;
    let mut keys = heads.raw_query();
    while let Some(head) = keys.next()? {
        let mut id: Option<i64> = head.get(1)?;
        while let Some(this) = id {
            let mut found = row_by_id.query([this])?;
            let Some(row) = found.next()? else { break };
            if row.get::<_, i64>(2)? > revision {
                id = row.get(7)?;
                continue;
            }
            if !row.get::<_, bool>(6)? && !each(row)? {
                return Ok(());
            }
            break;
        }
    }
    Ok(())
}

/// The live row of one key, if it exists.
pub fn get_live(conn: &Connection, key: &[u8]) -> Result<Option<KeyValue>, MvccError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {LIVE_COLUMNS} FROM {LIVE_SOURCE} WHERE k.key = ?1"
    ))?;
    Ok(stmt
        .query_row([key], |r| kv_from_row(r, false))
        .optional()?)
}

/// The live row of one key with the id of the history row holding its
/// value.
pub fn get_live_row(conn: &Connection, key: &[u8]) -> Result<Option<(KeyValue, i64)>, MvccError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {LIVE_COLUMNS}, k.history_id FROM {LIVE_SOURCE} WHERE k.key = ?1"
    ))?;
    Ok(stmt
        .query_row([key], |r| Ok((kv_from_row(r, false)?, r.get(6)?)))
        .optional()?)
}

/// The id and revision of the key's newest history row: its live row, or
/// else its newest deletion.
pub fn newest_row(conn: &Connection, key: &[u8]) -> Result<Option<(i64, i64)>, MvccError> {
    let live = conn
        .prepare_cached("SELECT history_id, mod_revision FROM kv_keys WHERE key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match live {
        Some(row) => Ok(Some(row)),
        None => newest_deletion(conn, key),
    }
}

/// The id and revision of the key's newest deletion still in the history.
pub fn newest_deletion(conn: &Connection, key: &[u8]) -> Result<Option<(i64, i64)>, MvccError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, mod_revision FROM kv_history WHERE key = ?1 AND tombstone = 1 \
         ORDER BY mod_revision DESC LIMIT 1",
    )?;
    Ok(stmt
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Events with `from <= revision <= to` on keys in `range`, in revision
/// order, in whole revisions: about `limit` of them, more only when a single
/// revision holds more. With `prev_kv`, each event carries the key's
/// previous state. Returns the events and the last revision they cover
/// (`to` when everything up to it was read).
pub fn history(
    conn: &Connection,
    range: &KeyRange,
    from: i64,
    to: i64,
    limit: usize,
    prev_kv: bool,
) -> Result<(Vec<Event>, i64), MvccError> {
    if range.is_empty() || from > to {
        return Ok((Vec::new(), to));
    }
    let mut events = history_rows(conn, range, from, to, Some(limit + 1))?;
    let mut reached = to;
    if events.len() > limit {
        let revision_of = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        let first = events.first().map_or(from, revision_of);
        let last = events.last().map_or(to, revision_of);
        if first == last {
            // One revision larger than the limit: take all of it.
            events = history_rows(conn, range, first, first, None)?;
            reached = first;
        } else {
            // Drop the partial last revision; the caller resumes at it.
            events.retain(|e| revision_of(e) != last);
            reached = last - 1;
        }
    }
    if prev_kv {
        for event in &mut events {
            if let Some(kv) = &event.kv {
                event.prev_kv = previous(conn, &kv.key, kv.mod_revision)?;
            }
        }
    }
    Ok((events, reached))
}

fn history_rows(
    conn: &Connection,
    range: &KeyRange,
    from: i64,
    to: i64,
    limit: Option<usize>,
) -> Result<Vec<Event>, MvccError> {
    let (a, b) = range.params();
    let sql = format!(
        "SELECT {KV_COLUMNS}, h.tombstone FROM kv_history h WHERE h.mod_revision >= ?3 AND h.mod_revision <= ?4 AND {} \
         ORDER BY h.mod_revision, h.id LIMIT ?5",
        range.condition("h.key")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    stmt.raw_bind_parameter(1, a)?;
    if matches!(range, KeyRange::Between(..)) {
        stmt.raw_bind_parameter(2, b)?;
    }
    stmt.raw_bind_parameter(3, from)?;
    stmt.raw_bind_parameter(4, to)?;
    stmt.raw_bind_parameter(5, limit.map_or(-1, |l| l as i64))?;
    let mut events = Vec::new();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next()? {
        let kv = kv_from_row(row, false)?;
        let tombstone: bool = row.get(6)?;
        events.push(if tombstone {
            Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                    ..Default::default()
                }),
                prev_kv: None,
            }
        } else {
            Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv: None,
            }
        });
    }
    Ok(events)
}

/// The key's state just before its change at `revision`, if it existed
/// then.
pub fn previous(
    conn: &Connection,
    key: &[u8],
    revision: i64,
) -> Result<Option<KeyValue>, MvccError> {
    // The key's row at `revision` links to the one before it.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {KV_COLUMNS}, h.tombstone FROM kv_history e JOIN kv_history h ON h.id = e.prev_id \
         WHERE e.mod_revision = ?2 AND e.key = ?1"
    ))?;
    let row = stmt
        .query_row((key, revision), |r| {
            Ok((kv_from_row(r, false)?, r.get::<_, bool>(6)?))
        })
        .optional()?;
    Ok(row.and_then(|(kv, tombstone)| (!tombstone).then_some(kv)))
}

/// HashKV exactly as etcd 3.4 computes it (`mvcc.store.HashByRev`), so
/// `etcdctl endpoint hashkv` agrees between an etcd and a Tern that hold
/// the same keys, values and history: CRC-32C over the bucket name `key`,
/// then, in revision order, each `key` bucket record etcd's backend would
/// hold (its 17-byte revision key, `t`-marked for a deletion, and the
/// marshalled `mvccpb.KeyValue`) at or before `revision`.
///
/// At or before the compaction revision etcd counts only the records its
/// index keeps at `revision`: per key, the newest change at or before
/// `revision` if that is not a deletion (all of them when no key is kept).
/// Tern's history also keeps a deletion at exactly the compaction
/// revision, which etcd's compaction drops; it is never counted.
pub fn hash(conn: &Connection, revision: i64, compact_revision: i64) -> Result<u32, MvccError> {
    if super::schema::stored_format(conn)?.is_some_and(|f| f < 3) {
        return hash_indexed_by_key(conn, revision, compact_revision);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT key, mod_revision, sub, create_revision, version, lease, value, tombstone, id \
         FROM kv_history h WHERE h.mod_revision <= ?1 AND (h.mod_revision > ?2 OR h.tombstone = 0) \
         ORDER BY h.mod_revision, h.sub",
    )?;
    let mut keeps_none = None;
    let mut hasher = EtcdKvHash::default();
    let mut rows = stmt.query((revision, compact_revision))?;
    while let Some(row) = rows.next()? {
        let counted = {
            let mod_revision: i64 = row.get(1)?;
            mod_revision > compact_revision || {
                let keeps_none = match keeps_none {
                    Some(known) => known,
                    None => *keeps_none.insert(!any_live_at(conn, revision)?),
                };
                let key: Vec<u8> = row.get(0)?;
                keeps_none || newest_at(conn, &key, revision)? == Some(row.get(8)?)
            }
        };
        if counted {
            hasher.add(history_row(row)?);
        }
    }
    Ok(hasher.finish())
}

/// [`hash`] over a format 1 or 2 file (an older backup being verified),
/// whose history is indexed by (key, revision).
fn hash_indexed_by_key(
    conn: &Connection,
    revision: i64,
    compact_revision: i64,
) -> Result<u32, MvccError> {
    let newest_by_then = "NOT EXISTS (SELECT 1 FROM kv_history n WHERE n.key = h.key \
         AND n.mod_revision > h.mod_revision AND n.mod_revision <= ?1)";
    let keeps_none: bool = conn
        .prepare_cached(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM kv_history h WHERE h.mod_revision <= ?1 \
             AND h.tombstone = 0 AND {newest_by_then})"
        ))?
        .query_row([revision], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT key, mod_revision, sub, create_revision, version, lease, value, tombstone \
         FROM kv_history h WHERE h.mod_revision <= ?1 AND (h.mod_revision > ?2 \
         OR (h.tombstone = 0 AND (?3 OR {newest_by_then}))) ORDER BY h.mod_revision, h.sub"
    ))?;
    let mut hasher = EtcdKvHash::default();
    let mut rows = stmt.query((revision, compact_revision, keeps_none))?;
    while let Some(row) = rows.next()? {
        hasher.add(history_row(row)?);
    }
    Ok(hasher.finish())
}

/// The hash format 1 backup manifests carry (CRC-32 over Tern's own
/// history rows, every row at or before `revision`), kept so `tern-restore
/// verify` still checks backups taken before HashKV became etcd's.
pub fn tern_v1_hash(conn: &Connection, revision: i64) -> Result<u32, MvccError> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, mod_revision, sub, create_revision, version, lease, value, tombstone \
         FROM kv_history WHERE mod_revision <= ?1 ORDER BY mod_revision, sub",
    )?;
    let mut h = crc32fast::Hasher::new();
    let mut rows = stmt.query([revision])?;
    while let Some(row) = rows.next()? {
        let row = history_row(row)?;
        h.update(&(row.key.len() as u64).to_be_bytes());
        h.update(&row.key);
        for n in [
            row.mod_revision,
            row.sub,
            row.create_revision,
            row.version,
            row.lease,
            i64::from(row.tombstone),
        ] {
            h.update(&n.to_be_bytes());
        }
        h.update(&(row.value.len() as u64).to_be_bytes());
        h.update(&row.value);
    }
    Ok(h.finalize())
}

/// A row selected as `key, mod_revision, sub, create_revision, version,
/// lease, value, tombstone`.
pub fn history_row(row: &Row) -> rusqlite::Result<HistoryRow> {
    Ok(HistoryRow {
        key: row.get(0)?,
        mod_revision: row.get(1)?,
        sub: row.get(2)?,
        create_revision: row.get(3)?,
        version: row.get(4)?,
        lease: row.get(5)?,
        value: row.get(6)?,
        tombstone: row.get(7)?,
    })
}

/// One row of `kv_history`: a put, or (`tombstone`) a deletion, whose
/// create revision, version, lease and value are 0 and empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub key: Vec<u8>,
    pub mod_revision: i64,
    /// Position within the revision (etcd's sub revision).
    pub sub: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
    pub tombstone: bool,
}

impl HistoryRow {
    /// The record etcd's backend keeps for this change in its `key`
    /// bucket: the revision key (`revToBytes`, then `t` for a deletion)
    /// and the `mvccpb.KeyValue` it marshals (only the key for a deletion).
    pub fn into_etcd_record(self) -> (Vec<u8>, KeyValue) {
        let mut key = Vec::with_capacity(18);
        key.extend_from_slice(&self.mod_revision.to_be_bytes());
        key.push(b'_');
        key.extend_from_slice(&self.sub.to_be_bytes());
        let kv = if self.tombstone {
            key.push(b't');
            KeyValue {
                key: self.key,
                ..Default::default()
            }
        } else {
            KeyValue {
                key: self.key,
                create_revision: self.create_revision,
                mod_revision: self.mod_revision,
                version: self.version,
                value: self.value,
                lease: self.lease,
            }
        };
        (key, kv)
    }
}

/// etcd's running HashKV (CRC-32C, seeded with the bucket name), public so
/// a history that is not in a database, such as an etcd snapshot's `key`
/// bucket, can be hashed the same way. Records must be added in revision
/// order, already filtered as [`hash`] filters them.
pub struct EtcdKvHash {
    crc: u32,
    value: Vec<u8>,
}

impl Default for EtcdKvHash {
    fn default() -> Self {
        EtcdKvHash {
            crc: crc32c::crc32c(b"key"),
            value: Vec::new(),
        }
    }
}

impl EtcdKvHash {
    pub fn add(&mut self, row: HistoryRow) {
        let (key, kv) = row.into_etcd_record();
        self.value.clear();
        prost::Message::encode(&kv, &mut self.value).expect("a Vec grows");
        self.crc = crc32c::crc32c_append(self.crc, &key);
        self.crc = crc32c::crc32c_append(self.crc, &self.value);
    }

    pub fn finish(self) -> u32 {
        self.crc
    }
}

/// Keys attached to a lease.
pub fn lease_keys(conn: &Connection, lease: i64) -> Result<Vec<Vec<u8>>, MvccError> {
    // `lease != 0` lets SQLite use the partial index `kv_keys_by_lease`
    // (`lease = ?1` alone does not prove the index's condition), instead
    // of scanning every key on each revoke.
    let mut stmt = conn
        .prepare_cached("SELECT key FROM kv_keys WHERE lease = ?1 AND lease != 0 ORDER BY key")?;
    let keys = stmt
        .query_map([lease], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(keys)
}

/// How many keys exist at the current revision. Counts `kv_keys` alone
/// (the `kv_live` view would read every value); a format 1 file, such as
/// an older backup being verified, has only its `kv_live` table.
pub fn key_count(conn: &Connection) -> Result<i64, MvccError> {
    let table = if super::schema::stored_format(conn)? == Some(1) {
        "kv_live"
    } else {
        "kv_keys"
    };
    Ok(conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)
}

/// Granted leases: (id, ttl).
pub fn leases(conn: &Connection) -> Result<Vec<(i64, i64)>, MvccError> {
    let mut stmt = conn.prepare_cached("SELECT id, ttl FROM leases ORDER BY id")?;
    let leases = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(leases)
}

pub fn lease_ttl(conn: &Connection, lease: i64) -> Result<Option<i64>, MvccError> {
    let mut stmt = conn.prepare_cached("SELECT ttl FROM leases WHERE id = ?1")?;
    Ok(stmt.query_row([lease], |r| r.get(0)).optional()?)
}

/// The store counters as of this connection's snapshot, in one query.
pub fn store_state(conn: &Connection) -> Result<super::StoreState, MvccError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision', 'applied_index', 'applied_term')",
    )?;
    let mut state = super::StoreState::default();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let value: i64 = row.get(1)?;
        match row.get_ref(0)?.as_str().unwrap_or("") {
            "revision" => state.revision = value,
            "compact_revision" => state.compact_revision = value,
            "applied_index" => state.applied_index = value as u64,
            "applied_term" => state.applied_term = value as u64,
            _ => {}
        }
    }
    // etcd starts an empty store at revision 1.
    state.revision = state.revision.max(1);
    Ok(state)
}

/// A `meta` value, 0 if unset.
pub fn meta(conn: &Connection, name: &str) -> Result<i64, MvccError> {
    let mut stmt = conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?;
    Ok(stmt
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Bytes the database file uses, and bytes in use (excluding free pages).
pub fn db_size(conn: &Connection) -> Result<(i64, i64), MvccError> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok((pages * page_size, (pages - free) * page_size))
}

/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 256;

/// A pool of read-only connections; reads never queue behind the writer.
pub struct Reader {
    path: std::path::PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
}

impl Reader {
    pub fn new(path: &std::path::Path) -> Self {
        Reader {
            path: path.to_path_buf(),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Run `f` on a pooled connection inside one read transaction, so
    /// everything `f` reads comes from one consistent revision.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, MvccError>,
    ) -> Result<T, MvccError> {
        self.run(self.connection()?, f)
    }

    /// A pooled connection, or a new one if none is idle.
    pub fn connection(&self) -> Result<Connection, MvccError> {
        match self.take_idle() {
            Some(c) => Ok(c),
            None => super::schema::open_reader(&self.path),
        }
    }

    /// A pooled connection, if one is idle; opening one takes longer than
    /// most reads.
    pub fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Run `f` on `conn` (from [`Reader::connection`] or
    /// [`Reader::take_idle`]) as [`Reader::with`]
    /// does, and put `conn` back in the pool.
    pub fn run<T>(
        &self,
        mut conn: Connection,
        f: impl FnOnce(&Connection) -> Result<T, MvccError>,
    ) -> Result<T, MvccError> {
        let result = {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
            let r = f(&tx);
            tx.finish()?;
            r
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Keep as many connections as reads ever ran at once (bounded by
        // the blocking pool): reopening one costs more than the read.
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"lock/"), b"lock0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
