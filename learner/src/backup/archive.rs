//! Continuous log archiving: committed Raft entries shipped every
//! `--backup-segment-interval` as compressed, encrypted segments, so a
//! restore can replay from a full backup to any later revision.
//!
//! A segment is `<prefix>/segments/<first>-<last>.seg.zst.age` (indexes
//! zero-padded to 20 digits, so names sort in log order); decrypted and
//! decompressed it is `TERNSEG1` followed by, per entry, its index (u64
//! big-endian), the length of its encoding (u32 big-endian) and the raft
//! `Entry` protobuf. Segments chain: each starts right after the one
//! before, which a reader checks from the names alone.
//!
//! The learner's log keeps entries until they are shipped (the node's
//! `archive_floor`), within a bound; if the archiver falls further behind
//! than that, entries are compacted away, the archiver logs the gap and
//! counts it, and its chain restarts at the first entry it can still read.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tern_primary::member::Member;

use super::pipeline::Settings;
use super::target::Target;

pub const MAGIC: &[u8; 8] = b"TERNSEG1";
/// Entries per segment at most, bounding a segment's memory.
const MAX_SEGMENT_BYTES: usize = 32 * 1024 * 1024;

/// A segment's name for entries `first..=last`.
pub fn segment_name(first: u64, last: u64) -> String {
    format!("{first:020}-{last:020}.seg.zst.age")
}

/// The index range a segment's name carries.
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg.zst.age")?;
    let (first, last) = stem.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

#[derive(Default)]
pub struct ArchiveMetrics {
    lag: Gauge,
    last_index: Gauge,
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    shipped: Counter,
    failed: Counter,
    gaps: Counter,
}

impl ArchiveMetrics {
    pub fn register(&self, member: &Member) {
        let m = &member.metrics;
        m.register(
            "tern_backup_segment_lag_entries",
            "Applied entries not yet shipped in a log segment",
            self.lag.clone(),
        );
        m.register(
            "tern_backup_segment_last_index",
            "Raft index of the last entry shipped in a log segment",
            self.last_index.clone(),
        );
        m.register(
            "tern_backup_segment_last_success_timestamp_seconds",
            "Unix time the last log segment was stored",
            self.last_success.clone(),
        );
        m.register(
            "tern_backup_segments_shipped",
            "Log segments stored",
            self.shipped.clone(),
        );
        m.register(
            "tern_backup_segments_failed",
            "Log segments that could not be stored (retried next interval)",
            self.failed.clone(),
        );
        m.register(
            "tern_backup_segment_gaps",
            "Times entries were compacted away before being shipped (the chain restarted)",
            self.gaps.clone(),
        );
    }
}

pub struct Archiver {
    pub member: Arc<Member>,
    pub target: Arc<Target>,
    pub settings: Arc<Settings>,
    pub interval: Duration,
    pub metrics: ArchiveMetrics,
}

impl Archiver {
    fn segments_dir(&self) -> Path {
        self.target.root.clone().join("segments")
    }

    /// The last index the stored chain reaches, if any.
    async fn stored_end(&self) -> Result<Option<u64>, object_store::Error> {
        let objects: Vec<_> = self
            .target
            .store
            .list(Some(&self.segments_dir()))
            .try_collect()
            .await?;
        Ok(objects
            .iter()
            .filter_map(|o| o.location.filename().and_then(parse_segment_name))
            .map(|(_, last)| last)
            .max())
    }

    pub async fn run(self: Arc<Self>) {
        let status = &self.member.node.status;
        let mut archived = loop {
            match self.stored_end().await {
                Ok(end) => break end,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list log segments; retrying");
                    tokio::time::sleep(self.interval).await;
                }
            }
        };
        // A new chain starts at what is applied now.
        let mut end = archived.unwrap_or_else(|| status.applied_index());
        status.archive_floor.store(end.max(1), Ordering::Release);
        loop {
            tokio::time::sleep(self.interval).await;
            let applied = status.applied_index();
            self.metrics.lag.set(applied.saturating_sub(end) as i64);
            if applied <= end {
                continue;
            }
            match self.ship(end + 1, applied).await {
                Ok(Some((first, last))) => {
                    if first != end + 1 && archived.is_some() {
                        self.metrics.gaps.inc();
                        tracing::warn!(
                            missing_from = end + 1,
                            missing_to = first - 1,
                            "log entries were compacted before being archived; the segment chain restarts"
                        );
                    }
                    archived = Some(last);
                    end = last;
                    status.archive_floor.store(last, Ordering::Release);
                    self.metrics.shipped.inc();
                    self.metrics.last_index.set(last as i64);
                    self.metrics
                        .last_success
                        .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
                    self.metrics.lag.set(applied.saturating_sub(last) as i64);
                }
                Ok(None) => {}
                Err(e) => {
                    self.metrics.failed.inc();
                    tracing::warn!(error = %e, "cannot store a log segment; retrying next interval");
                }
            }
        }
    }

    /// Read entries `from..=to` (as many as fit a segment), encode and
    /// store them; returns the range stored.
    async fn ship(&self, from: u64, to: u64) -> anyhow::Result<Option<(u64, u64)>> {
        let raft_db = self.member.data_dir.join("raft.db");
        let settings = self.settings.clone();
        let encoded =
            tokio::task::spawn_blocking(move || encode_segment(raft_db, from, to, &settings))
                .await??;
        let Some((first, last, bytes)) = encoded else {
            return Ok(None);
        };
        let path = self.segments_dir().join(segment_name(first, last).as_str());
        self.target
            .store
            .put(&path, PutPayload::from(bytes))
            .await?;
        Ok(Some((first, last)))
    }
}

/// Entries from `raft.db` (read-only, beside the node's writer) in
/// `from..=to`, framed, compressed and encrypted.
fn encode_segment(
    raft_db: PathBuf,
    from: u64,
    to: u64,
    settings: &Settings,
) -> anyhow::Result<Option<(u64, u64, Vec<u8>)>> {
    let conn = rusqlite::Connection::open_with_flags(
        &raft_db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mut stmt =
        conn.prepare("SELECT idx, entry FROM entries WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx")?;
    let mut rows = stmt.query([from as i64, to as i64])?;
    let mut plain = Vec::with_capacity(64 * 1024);
    plain.extend_from_slice(MAGIC);
    let mut range: Option<(u64, u64)> = None;
    while let Some(row) = rows.next()? {
        let idx: i64 = row.get(0)?;
        let entry: Vec<u8> = row.get(1)?;
        let idx = idx as u64;
        // Entries are contiguous in the log; stop at any hole.
        if let Some((_, last)) = range {
            if idx != last + 1 {
                break;
            }
        }
        plain.extend_from_slice(&idx.to_be_bytes());
        plain.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        plain.extend_from_slice(&entry);
        range = Some((range.map_or(idx, |r| r.0), idx));
        if plain.len() >= MAX_SEGMENT_BYTES {
            break;
        }
    }
    let Some((first, last)) = range else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(plain.len() / 2);
    {
        let encryptor = age::Encryptor::with_recipients(
            settings.recipients.iter().map(|r| r as &dyn age::Recipient),
        )?;
        let encrypted = encryptor.wrap_output(&mut out)?;
        let mut compressed = zstd::stream::write::Encoder::new(encrypted, settings.zstd_level)?;
        compressed.write_all(&plain)?;
        compressed.finish()?.finish()?;
    }
    Ok(Some((first, last, out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_log_order_and_parse_back() {
        let a = segment_name(9, 120);
        let b = segment_name(121, 1_000_000);
        assert!(a < b);
        assert_eq!(parse_segment_name(&a), Some((9, 120)));
        assert_eq!(parse_segment_name("x.db.zst.age"), None);
    }
}
