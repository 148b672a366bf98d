//! Continuous log archiving: committed Raft entries shipped every
//! `--backup-segment-interval` as compressed, encrypted segments, so a
//! restore can replay from a full backup to any later revision.
//!
//! A segment is `<prefix>/segments/<first>-<last>-r<revision>.seg.zst.age`
//! (indexes and revision zero-padded to 20 digits, so names sort in log
//! order): entries `first..=last`, after which the store is at
//! `revision`, so `tern-restore list` shows how far the log reaches without
//! decrypting anything. A segment cut short (by the size bound) cannot know
//! its revision and is named `<first>-<last>.seg.zst.age`. Decrypted and
//! decompressed it is `TERNSEG1` followed by, per entry, its index (u64
//! big-endian), the length of its encoding (u32 big-endian) and the raft
//! `Entry` protobuf. Segments chain: each starts right after the one
//! before, which a reader checks from the names alone.
//!
//! The learner's log keeps entries until they are shipped (the node's
//! `archive_floor`), within a bound; if the archiver falls further behind
//! than that, entries are compacted away, the archiver logs the gap and
//! counts it, and its chain restarts at the first entry it can still read.

use protobuf::Message as _;
use std::io::Write;
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

/// What a segment's object name says: its entries and the store revision
/// after the last one (when known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentName {
    pub first: u64,
    pub last: u64,
    pub revision: Option<i64>,
}

impl SegmentName {
    pub fn parse(name: &str) -> Option<SegmentName> {
        let stem = name.strip_suffix(".seg.zst.age")?;
        let mut parts = stem.split('-');
        let first = parts.next()?.parse().ok()?;
        let last = parts.next()?.parse().ok()?;
        let revision = match parts.next() {
            Some(r) => Some(r.strip_prefix('r')?.parse().ok()?),
            None => None,
        };
        // Raft indexes are stored as SQLite integers: a name beyond i64
        // cannot be one the archiver wrote (and would overflow chaining).
        if parts.next().is_some() || last < first || last > i64::MAX as u64 {
            return None;
        }
        Some(SegmentName {
            first,
            last,
            revision,
        })
    }
}

impl std::fmt::Display for SegmentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:020}-{:020}", self.first, self.last)?;
        if let Some(r) = self.revision {
            write!(f, "-r{r:020}")?;
        }
        f.write_str(".seg.zst.age")
    }
}

/// Why a decrypted segment cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("does not start with {MAGIC:?}")]
    Magic,
    #[error("truncated entry frame at byte {0}")]
    Truncated(usize),
    #[error("entry {0} is not a raft entry: {1}")]
    Decode(u64, String),
    #[error("frame says index {frame} but the entry is {entry}")]
    IndexMismatch { frame: u64, entry: u64 },
    #[error("entries are not contiguous: {after} is followed by {next}")]
    NotContiguous { after: u64, next: u64 },
    #[error("the name says entries {name_first}..={name_last} but it holds {first}..={last}")]
    NameMismatch {
        name_first: u64,
        name_last: u64,
        first: u64,
        last: u64,
    },
}

/// The entries of a decrypted, decompressed segment named `name`, checked:
/// framing, contiguous indexes, and exactly the range the name claims.
pub fn decode_segment(
    plain: &[u8],
    name: &SegmentName,
) -> Result<Vec<raft::eraftpb::Entry>, SegmentError> {
    use protobuf::Message;
    let mut rest = plain.strip_prefix(MAGIC).ok_or(SegmentError::Magic)?;
    let mut entries: Vec<raft::eraftpb::Entry> = Vec::new();
    while !rest.is_empty() {
        let at = plain.len() - rest.len();
        if rest.len() < 12 {
            return Err(SegmentError::Truncated(at));
        }
        let index = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        let body = rest.get(12..12 + len).ok_or(SegmentError::Truncated(at))?;
        let entry = raft::eraftpb::Entry::parse_from_bytes(body)
            .map_err(|e| SegmentError::Decode(index, e.to_string()))?;
        if entry.index != index {
            return Err(SegmentError::IndexMismatch {
                frame: index,
                entry: entry.index,
            });
        }
        if let Some(prev) = entries.last() {
            if prev.index.checked_add(1) != Some(index) {
                return Err(SegmentError::NotContiguous {
                    after: prev.index,
                    next: index,
                });
            }
        }
        entries.push(entry);
        rest = &rest[12 + len..];
    }
    let (first, last) = match (entries.first(), entries.last()) {
        (Some(f), Some(l)) => (f.index, l.index),
        _ => (0, 0),
    };
    if (first, last) != (name.first, name.last) {
        return Err(SegmentError::NameMismatch {
            name_first: name.first,
            name_last: name.last,
            first,
            last,
        });
    }
    Ok(entries)
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
            .filter_map(|o| o.location.filename().and_then(SegmentName::parse))
            .map(|s| s.last)
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
            let (applied, revision) = match self.applied_state().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the applied state; retrying next interval");
                    continue;
                }
            };
            self.metrics.lag.set(applied.saturating_sub(end) as i64);
            if applied <= end {
                continue;
            }
            match self.ship(end + 1, applied, revision).await {
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

    /// The applied index and the store revision at it, read together from
    /// one read transaction of the state (the node's atomics are updated
    /// one at a time).
    async fn applied_state(&self) -> anyhow::Result<(u64, i64)> {
        let state_db = self.member.data_dir.join("state.db");
        let state = tokio::task::spawn_blocking(move || {
            let conn = tern_primary::mvcc::schema::open_reader(&state_db)?;
            tern_primary::mvcc::read::store_state(&conn)
        })
        .await??;
        Ok((state.applied_index, state.revision))
    }

    /// Read entries `from..=to` (as many as fit a segment), encode and
    /// store them; returns the range stored. `revision` is the store's
    /// revision after entry `to`.
    async fn ship(&self, from: u64, to: u64, revision: i64) -> anyhow::Result<Option<(u64, u64)>> {
        let log_dir = self
            .member
            .data_dir
            .join(tern_primary::raft::log_store::LOG_DIR);
        let settings = self.settings.clone();
        let encoded =
            tokio::task::spawn_blocking(move || encode_segment(&log_dir, from, to, &settings))
                .await??;
        let Some((first, last, bytes)) = encoded else {
            return Ok(None);
        };
        let name = SegmentName {
            first,
            last,
            revision: (last == to).then_some(revision),
        };
        let path = self.segments_dir().join(name.to_string().as_str());
        self.target
            .store
            .put(&path, PutPayload::from(bytes))
            .await?;
        Ok(Some((first, last)))
    }
}

/// Entries from the node's log (read beside its writer) in `from..=to`,
/// framed, compressed and encrypted.
fn encode_segment(
    log_dir: &std::path::Path,
    from: u64,
    to: u64,
    settings: &Settings,
) -> anyhow::Result<Option<(u64, u64, Vec<u8>)>> {
    let entries = tern_primary::raft::wal::read_entries(log_dir, from, to)?;
    let mut plain = Vec::with_capacity(64 * 1024);
    plain.extend_from_slice(MAGIC);
    let mut range: Option<(u64, u64)> = None;
    for entry in entries {
        let bytes = entry.write_to_bytes()?;
        plain.extend_from_slice(&entry.index.to_be_bytes());
        plain.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        plain.extend_from_slice(&bytes);
        range = Some((range.map_or(entry.index, |r| r.0), entry.index));
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
        let a = SegmentName {
            first: 9,
            last: 120,
            revision: Some(77),
        };
        let b = SegmentName {
            first: 121,
            last: 1_000_000,
            revision: None,
        };
        assert!(a.to_string() < b.to_string());
        assert_eq!(SegmentName::parse(&a.to_string()), Some(a));
        assert_eq!(SegmentName::parse(&b.to_string()), Some(b));
        assert_eq!(SegmentName::parse("x.db.zst.age"), None);
        assert_eq!(SegmentName::parse("9-8.seg.zst.age"), None);
        assert_eq!(SegmentName::parse("1-2-x3.seg.zst.age"), None);
    }

    fn frame(entries: &[(u64, u64)]) -> Vec<u8> {
        use protobuf::Message;
        let mut plain = MAGIC.to_vec();
        for &(frame_index, entry_index) in entries {
            let e = raft::eraftpb::Entry {
                index: entry_index,
                term: 1,
                ..Default::default()
            };
            let bytes = e.write_to_bytes().unwrap();
            plain.extend_from_slice(&frame_index.to_be_bytes());
            plain.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            plain.extend_from_slice(&bytes);
        }
        plain
    }

    fn named(first: u64, last: u64) -> SegmentName {
        SegmentName {
            first,
            last,
            revision: None,
        }
    }

    #[test]
    fn decode_checks_framing_order_and_the_name() {
        let good = frame(&[(5, 5), (6, 6), (7, 7)]);
        let entries = decode_segment(&good, &named(5, 7)).unwrap();
        assert_eq!(
            entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            [5, 6, 7]
        );
        assert!(matches!(
            decode_segment(&good, &named(5, 8)),
            Err(SegmentError::NameMismatch { .. })
        ));
        assert!(matches!(
            decode_segment(&good[..good.len() - 1], &named(5, 7)),
            Err(SegmentError::Truncated(_))
        ));
        assert!(matches!(
            decode_segment(&good[1..], &named(5, 7)),
            Err(SegmentError::Magic)
        ));
        assert!(matches!(
            decode_segment(&frame(&[(5, 5), (7, 7)]), &named(5, 7)),
            Err(SegmentError::NotContiguous { after: 5, next: 7 })
        ));
        assert!(matches!(
            decode_segment(&frame(&[(5, 6)]), &named(5, 5)),
            Err(SegmentError::IndexMismatch { frame: 5, entry: 6 })
        ));
    }
}
