//! The Raft log's files: a directory of preallocated segments, each a
//! sequence of checksummed records, appended and `fdatasync`ed, as etcd's
//! WAL is.
//!
//! A put's append was a SQLite transaction: a b-tree insert, every page it
//! touched (the entry's leaf, the hard state's) written whole to SQLite's
//! WAL, and a checkpoint copying them again later. Here it is one `pwrite`
//! of the encoded records into space allocated ahead (so the file's size
//! does not change and `fdatasync` has no size to journal) and one
//! `fdatasync`.
//!
//! What the records mean is the replay's business ([`Replayed`]): an entry
//! at or below the last one replaces it and everything after (a follower's
//! conflicting suffix), [`Record::Compacted`] drops entries up to its index,
//! [`Record::Restart`] drops them all (the state was replaced by a
//! snapshot), the last hard state and conf state win. So appends never
//! rewrite what is on disk.
//!
//! Every segment starts with the state at its creation (snapshot marker,
//! conf state, hard state), so a segment whose entries are all compacted
//! can go once the compaction is durable: the segments after it hold all
//! the rest. Only the last segment is ever written, so only its tail can be
//! torn by a crash; opening the log cuts a torn tail off (see [`Tail`]). A
//! bad record anywhere else is corruption and the log refuses to open.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};

/// Bytes allocated for a segment when it is created. A batch that does not
/// fit starts a new segment (a batch bigger than this makes its segment
/// grow). etcd's are 64 MiB; at the default `snapshot-count` of 5,000 a
/// compaction covers less than a segment of 1 KiB entries, and a data dir
/// on a small disk is not handed 64 MiB at a time.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The first bytes of every segment: the format, for a later one to be
/// told apart.
pub const MAGIC: &[u8; 8] = b"TERNWAL1";

/// The name a segment's file is zeroed under before it is used.
const SPARE_NAME: &str = "spare.tmp";

/// A spare segment is zeroed this much at a time, each piece synced, with
/// [`ZERO_PAUSE`] after it. Written in one go and synced once, the 16 MiB
/// held up the members' log fsyncs and Raft threads for 20–50 ms (three
/// voters reach the same log position at once); paced, the spare takes
/// ~0.1 s, well within the time it takes to write half a segment of log.
const ZERO_CHUNK: usize = 256 * 1024;
const ZERO_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// A segment whose blocks were only reserved (the first of a new log, or
/// the last one after a restart) gets a zeroed spare once this much of it
/// is written, and moves to it as soon as the spare is ready, instead of
/// paying for unwritten blocks until it is full (see [`Wal::start_spare`]).
/// Not at once: a member that writes little never costs a spare.
const UNZEROED_SPARE_AFTER: u64 = 1024 * 1024;

/// A record's frame: payload length (type byte included), CRC-32C of the
/// type and payload, both little-endian. A zero length is the end of the
/// written part (the rest of a segment is preallocated zeros).
const FRAME_HEADER: usize = 8;

/// One record of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Entry(Entry),
    HardState(HardState),
    ConfState(ConfState),
    /// Entries up to this index are compacted away.
    Compacted(SnapshotMetadata),
    /// The state was replaced by a snapshot at this index: the log starts
    /// again after it.
    Restart(SnapshotMetadata),
}

impl Record {
    fn kind(&self) -> u8 {
        match self {
            Record::Entry(_) => 1,
            Record::HardState(_) => 2,
            Record::ConfState(_) => 3,
            Record::Compacted(_) => 4,
            Record::Restart(_) => 5,
        }
    }

    /// Append this record's frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WalError> {
        match self {
            Record::Entry(m) => encode_frame(out, self.kind(), m),
            Record::HardState(m) => encode_frame(out, self.kind(), m),
            Record::ConfState(m) => encode_frame(out, self.kind(), m),
            Record::Compacted(m) | Record::Restart(m) => encode_frame(out, self.kind(), m),
        }
    }

    fn decode(body: &[u8]) -> Option<Record> {
        let (kind, payload) = body.split_first()?;
        Some(match kind {
            1 => Record::Entry(Entry::parse_from_bytes(payload).ok()?),
            2 => Record::HardState(HardState::parse_from_bytes(payload).ok()?),
            3 => Record::ConfState(ConfState::parse_from_bytes(payload).ok()?),
            4 => Record::Compacted(SnapshotMetadata::parse_from_bytes(payload).ok()?),
            5 => Record::Restart(SnapshotMetadata::parse_from_bytes(payload).ok()?),
            _ => return None,
        })
    }
}

/// Append an entry's record to `out` (as [`Record::encode_into`], without
/// a copy of the entry).
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> Result<(), WalError> {
    encode_frame(out, 1, entry)
}

fn encode_frame(
    out: &mut Vec<u8>,
    kind: u8,
    message: &impl protobuf::Message,
) -> Result<(), WalError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.push(kind);
    message
        .write_to_vec(out)
        .map_err(|source| WalError::Encode { source })?;
    let body = &out[start + FRAME_HEADER..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("raft log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("raft log: cannot encode a record: {source}")]
    Encode { source: protobuf::ProtobufError },
    #[error(
        "raft log {path}: corrupt record at byte {offset} (only the last segment's tail may be torn)"
    )]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("raft log {path}: not a Tern log segment of this version (expected {expected:?})")]
    Format { path: PathBuf, expected: String },
    #[error("raft log: entries are not contiguous (expected index {expected}, found {found})")]
    Gap { expected: u64, found: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the records of a log add up to.
#[derive(Debug, Default, Clone)]
pub struct Replayed {
    pub hard_state: Option<HardState>,
    pub conf_state: Option<ConfState>,
    /// The last compaction or restart point.
    pub marker: Option<SnapshotMetadata>,
    /// Entries after the marker, contiguous.
    pub entries: Vec<Entry>,
}

impl Replayed {
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Entry(entry) => self.push(entry),
            Record::HardState(hs) => self.hard_state = Some(hs),
            Record::ConfState(cs) => self.conf_state = Some(cs),
            Record::Compacted(meta) => {
                let keep_from = self.entries.partition_point(|e| e.index <= meta.index);
                self.entries.drain(..keep_from);
                self.marker = Some(meta);
            }
            Record::Restart(meta) => {
                self.entries.clear();
                self.conf_state = Some(meta.get_conf_state().clone());
                self.marker = Some(meta);
            }
        }
    }

    fn push(&mut self, entry: Entry) {
        if let Some(first) = self.entries.first().map(|e| e.index) {
            let last = first + self.entries.len() as u64 - 1;
            if entry.index <= last {
                // A conflicting suffix, replaced.
                self.entries
                    .truncate(entry.index.saturating_sub(first) as usize);
            } else if entry.index > last + 1 {
                // Entries before a gap are ones whose segment was removed
                // after their compaction: a later marker covers them.
                self.entries.clear();
            }
        }
        self.entries.push(entry);
    }

    /// Check what the replay ends with: entries start right after the
    /// marker.
    fn finish(mut self) -> Result<Self, WalError> {
        let marker = self.marker.as_ref().map_or(0, |m| m.index);
        let keep_from = self.entries.partition_point(|e| e.index <= marker);
        self.entries.drain(..keep_from);
        if let Some(first) = self.entries.first() {
            if first.index != marker + 1 {
                return Err(WalError::Gap {
                    expected: marker + 1,
                    found: first.index,
                });
            }
        }
        Ok(self)
    }
}

struct Segment {
    path: PathBuf,
    seq: u64,
    /// The highest entry index written to it (0 for none).
    last_index: u64,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

/// The segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut found = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io(dir))? {
        let item = item.map_err(io(dir))?;
        let name = item.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        found.push((seq, item.path()));
    }
    found.sort();
    Ok(found)
}

/// How a segment's records may end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tail {
    /// A segment before the last: it was complete and synced before the
    /// next one began, so a bad record in it is corruption.
    Sealed,
    /// The last segment, after a crash: its last write may be torn. As
    /// etcd's WAL decides it: a bad record that runs past the end of the
    /// file, or one with a disk sector of nothing but zeros in it (a
    /// sector the write never reached), ends the log; any other is
    /// corruption.
    Crashed,
    /// A segment being written now (read beside the writer): a bad record
    /// is one not finished yet.
    Live,
}

/// The sector a torn write leaves whole or untouched.
const SECTOR: u64 = 512;

/// Whether the frame `bytes`, which starts at file offset `at`, has a
/// sector-aligned piece that is all zeros.
fn has_zero_sector(at: u64, bytes: &[u8]) -> bool {
    let mut start = 0usize;
    while start < bytes.len() {
        let offset = at + start as u64;
        let to_boundary = (SECTOR - offset % SECTOR) as usize;
        let end = (start + to_boundary).min(bytes.len());
        if bytes[start..end].iter().all(|b| *b == 0) {
            return true;
        }
        start = end;
    }
    false
}

/// Read one segment's records, handing each to `visit`; returns where the
/// valid records end (see [`Tail`] for how they may end). Reading stops at
/// the end of the written part, not of the preallocation.
fn read_segment(path: &Path, tail: Tail, mut visit: impl FnMut(Record)) -> Result<u64, WalError> {
    let file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut magic = [0u8; MAGIC.len()];
    let unwritten_ok = tail != Tail::Sealed;
    match reader.read_exact(&mut magic) {
        Ok(()) if &magic == MAGIC => {}
        // Created, not yet written when the process stopped.
        Ok(()) if unwritten_ok && magic == [0; MAGIC.len()] => return Ok(0),
        Err(e) if unwritten_ok && e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(0),
        Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => {
            return Err(io(path)(e));
        }
        _ => {
            return Err(WalError::Format {
                path: path.to_owned(),
                expected: String::from_utf8_lossy(MAGIC).into_owned(),
            })
        }
    }
    let mut at = MAGIC.len() as u64;
    let mut frame = Vec::new();
    loop {
        frame.resize(FRAME_HEADER, 0);
        match reader.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io(path)(e)),
        }
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as u64;
        if len == 0 {
            break;
        }
        let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
        let complete = at + FRAME_HEADER as u64 + len <= size;
        let record = if complete {
            frame.resize(FRAME_HEADER + len as usize, 0);
            reader
                .read_exact(&mut frame[FRAME_HEADER..])
                .map_err(io(path))?;
            let body = &frame[FRAME_HEADER..];
            (crc32c::crc32c(body) == crc)
                .then(|| Record::decode(body))
                .flatten()
        } else {
            None
        };
        match record {
            Some(record) => visit(record),
            None => {
                let torn = match tail {
                    Tail::Sealed => false,
                    Tail::Crashed => !complete || has_zero_sector(at, &frame),
                    Tail::Live => true,
                };
                if torn {
                    break;
                }
                return Err(WalError::Corrupt {
                    path: path.to_owned(),
                    offset: at,
                });
            }
        }
        at += FRAME_HEADER as u64 + len;
    }
    Ok(at)
}

/// Read the log in `dir` without opening it for writing (a learner's
/// archiver, beside the node): the entries of `from..=to` it holds, from
/// the first one at or after `from`, contiguous. A segment removed meanwhile
/// held only compacted entries; a tail being written ends its segment.
pub fn read_entries(dir: &Path, from: u64, to: u64) -> Result<Vec<Entry>, WalError> {
    let mut replayed = Replayed::default();
    for (_, path) in list_segments(dir)? {
        // Only the range is kept: entries up to `to` are committed, so no
        // later record rewrites them.
        let read = read_segment(&path, Tail::Live, |record| match record {
            Record::Entry(e) if e.index < from || e.index > to => {}
            record => replayed.apply(record),
        });
        match read {
            Err(WalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => {
                other?;
            }
        }
    }
    Ok(replayed.entries)
}

/// The log directory, open for appending.
pub struct Wal {
    dir: PathBuf,
    /// Oldest first; the last is the one written.
    segments: Vec<Segment>,
    file: File,
    /// Where the next record goes in the last segment.
    offset: u64,
    /// Bytes allocated for the last segment.
    allocated: u64,
    /// The last segment's blocks were only reserved, not zeroed: it gets
    /// a spare early and is left for it once that is ready. Not after a
    /// spare failed (a full disk): the next would too.
    leave_early: bool,
    /// The next segment's file, being zeroed (see [`Wal::start_spare`]).
    spare: Option<JoinHandle<std::io::Result<File>>>,
    /// Compacted segments being deleted.
    purge: Option<JoinHandle<()>>,
}

impl Wal {
    /// Open (creating if missing) the log in `dir` and replay it. A torn
    /// tail of the last segment is cut off.
    pub fn open(dir: &Path) -> Result<(Wal, Replayed), WalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // A spare left by the last run may be half zeroed.
        let spare = dir.join(SPARE_NAME);
        match std::fs::remove_file(&spare) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&spare)(e)),
            _ => {}
        }
        let listed = list_segments(dir)?;
        let mut replayed = Replayed::default();
        let mut segments = Vec::new();
        let mut end = 0;
        for (i, (seq, path)) in listed.iter().enumerate() {
            let last = i + 1 == listed.len();
            let mut last_index = 0;
            let tail = if last { Tail::Crashed } else { Tail::Sealed };
            end = read_segment(path, tail, |record| {
                if let Record::Entry(e) = &record {
                    last_index = last_index.max(e.index);
                }
                replayed.apply(record);
            })?;
            segments.push(Segment {
                path: path.clone(),
                seq: *seq,
                last_index,
            });
        }
        let replayed = replayed.finish()?;
        let wal = match segments.last() {
            None => {
                let mut wal = Wal {
                    dir: dir.to_owned(),
                    segments: Vec::new(),
                    file: File::open(dir).map_err(io(dir))?,
                    offset: 0,
                    allocated: 0,
                    leave_early: true,
                    spare: None,
                    purge: None,
                };
                wal.start_segment(0, &[])?;
                wal
            }
            Some(segment) => {
                let path = segment.path.clone();
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                let mut wal = Wal {
                    dir: dir.to_owned(),
                    segments,
                    file,
                    offset: end,
                    allocated: 0,
                    leave_early: true,
                    spare: None,
                    purge: None,
                };
                if end == 0 {
                    // Its magic never made it to disk.
                    wal.file.write_all_at(MAGIC, 0).map_err(io(&path))?;
                    wal.offset = MAGIC.len() as u64;
                }
                // Whatever follows the last good record (a torn one) goes,
                // and the space after it is zeros again.
                wal.file.set_len(wal.offset).map_err(io(&path))?;
                wal.allocated = wal.offset;
                wal.preallocate()?;
                wal.file.sync_all().map_err(io(&path))?;
                wal
            }
        };
        Ok((wal, replayed))
    }

    /// Allocate the last segment's space up to [`SEGMENT_BYTES`]. Best
    /// effort: a filesystem without `fallocate`, or without room for a
    /// whole segment, gets appends that grow the file.
    fn preallocate(&mut self) -> Result<(), WalError> {
        if self.allocated >= SEGMENT_BYTES {
            return Ok(());
        }
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::empty(),
            0,
            SEGMENT_BYTES,
        ) {
            Ok(()) => self.allocated = SEGMENT_BYTES,
            Err(e) => tracing::debug!(error = %e, "raft log: no preallocation"),
        }
        Ok(())
    }

    /// Start a new segment holding `records` first, durable (file and
    /// directory entry) before it returns. Its file is the spare zeroed
    /// ahead if that is done, else a new one allocated now (a spare still
    /// being zeroed is left for the next roll: the appends do not wait).
    fn start_segment(&mut self, last_index: u64, records: &[u8]) -> Result<(), WalError> {
        let seq = self.segments.last().map_or(0, |s| s.seq + 1);
        let path = self.dir.join(segment_name(seq));
        let ready = self.spare.take_if(|zeroing| zeroing.is_finished());
        let mut spare_failed = false;
        let spare = match ready.map(|zeroing| zeroing.join()) {
            Some(Ok(Ok(file))) => {
                let spare = self.dir.join(SPARE_NAME);
                std::fs::rename(&spare, &path).map_err(io(&spare))?;
                Some(file)
            }
            Some(Ok(Err(e))) => {
                tracing::debug!(error = %e, "raft log: no zeroed segment");
                spare_failed = true;
                None
            }
            Some(Err(_)) => {
                spare_failed = true;
                None
            }
            None => None,
        };
        let zeroed = spare.is_some();
        self.file = match spare {
            Some(file) => file,
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io(&path))?,
        };
        self.allocated = if zeroed { SEGMENT_BYTES } else { 0 };
        self.leave_early = !zeroed && !spare_failed;
        self.preallocate()?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + records.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(records);
        self.file.write_all_at(&bytes, 0).map_err(io(&path))?;
        if zeroed {
            // Its size and blocks were made durable when it was zeroed.
            self.file.sync_data().map_err(io(&path))?;
        } else {
            self.file.sync_all().map_err(io(&path))?;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.offset = bytes.len() as u64;
        self.segments.push(Segment {
            path,
            seq,
            last_index,
        });
        Ok(())
    }

    /// Once the segment is half full, zero the next one's file on a
    /// thread of its own. Writing into blocks that `fallocate` only
    /// reserved makes every `fdatasync` that reaches a new block write the
    /// inode as well (the extent turns from unwritten to written), a
    /// second I/O; blocks written with zeros beforehand need no such
    /// change. etcd prepares its next WAL file ahead too (its
    /// `filePipeline`), but fallocated only. A segment that was not zeroed
    /// gets its spare after [`UNZEROED_SPARE_AFTER`] and is left for it
    /// early ([`Wal::append`]). A spare that cannot be made (a full disk)
    /// is skipped: the roll allocates the file itself.
    fn start_spare(&mut self) {
        let due = if self.leave_early {
            UNZEROED_SPARE_AFTER
        } else {
            SEGMENT_BYTES / 2
        };
        if self.spare.is_some() || self.offset < due {
            return;
        }
        let path = self.dir.join(SPARE_NAME);
        let zeroing = std::thread::Builder::new()
            .name("raft-log-spare".into())
            .spawn(move || {
                let zeroed = zero_file(&path);
                if zeroed.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                zeroed
            });
        match zeroing {
            Ok(handle) => self.spare = Some(handle),
            Err(e) => tracing::debug!(error = %e, "raft log: no thread to zero a segment"),
        }
    }

    /// Append `records` (encoded frames, their highest entry index
    /// `last_index`) and `fdatasync`. When they do not fit the segment, or
    /// it was not zeroed and a zeroed spare is ready, they start a new one
    /// after `header`'s records (the state they leave, so that older
    /// segments can go).
    pub fn append(
        &mut self,
        records: &[u8],
        last_index: u64,
        header: impl FnOnce() -> Vec<Record>,
    ) -> Result<(), WalError> {
        let full = self.offset + records.len() as u64 > SEGMENT_BYTES;
        let spare_ready = || self.spare.as_ref().is_some_and(|s| s.is_finished());
        if (full || (self.leave_early && spare_ready())) && self.offset > MAGIC.len() as u64 {
            let mut bytes = Vec::with_capacity(records.len() + 256);
            for record in header() {
                record.encode_into(&mut bytes)?;
            }
            bytes.extend_from_slice(records);
            return self.start_segment(last_index, &bytes);
        }
        let path = &self.segments.last().expect("a segment is open").path;
        self.file
            .write_all_at(records, self.offset)
            .map_err(io(path))?;
        self.offset += records.len() as u64;
        if self.offset > self.allocated {
            self.allocated = self.offset;
        }
        self.file.sync_data().map_err(io(path))?;
        let segment = self.segments.last_mut().expect("a segment is open");
        segment.last_index = segment.last_index.max(last_index);
        self.start_spare();
        Ok(())
    }

    /// Start a new segment with `records` and remove every older one: the
    /// log starts again (a snapshot replaced the state).
    pub fn restart(&mut self, records: &[Record]) -> Result<(), WalError> {
        let mut bytes = Vec::new();
        let mut last_index = 0;
        for record in records {
            if let Record::Entry(e) = record {
                last_index = last_index.max(e.index);
            }
            record.encode_into(&mut bytes)?;
        }
        self.start_segment(last_index, &bytes)?;
        self.remove_older(u64::MAX);
        Ok(())
    }

    /// A compaction through `index` is durable: segments before the last
    /// whose entries are all at or below it are no longer read.
    pub fn compacted(&mut self, index: u64) {
        self.remove_older(index);
    }

    /// Forget the segments before the last whose entries are all at or
    /// below `index`, and delete their files on a thread of its own:
    /// deleting a 16 MiB file took the Raft thread milliseconds.
    fn remove_older(&mut self, index: u64) {
        let current = self.segments.len() - 1;
        let removed = self.segments[..current]
            .iter()
            .take_while(|s| s.last_index <= index)
            .count();
        if removed == 0 {
            return;
        }
        let paths: Vec<PathBuf> = self.segments.drain(..removed).map(|s| s.path).collect();
        if let Some(previous) = self.purge.take() {
            let _ = previous.join();
        }
        let purge = move || {
            for path in paths {
                match std::fs::remove_file(&path) {
                    // Left behind: replaying it again is harmless.
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a compacted raft log segment");
                    }
                    _ => {}
                }
            }
        };
        match std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(purge)
        {
            Ok(handle) => self.purge = Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "raft log: no thread to delete compacted segments")
            }
        }
    }

    /// Segments on disk.
    #[cfg(test)]
    fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// The background work finishes before the log is gone: a data dir is
/// not moved or reopened under it.
impl Drop for Wal {
    fn drop(&mut self) {
        if let Some(purge) = self.purge.take() {
            let _ = purge.join();
        }
        if let Some(zeroing) = self.spare.take() {
            let _ = zeroing.join();
        }
    }
}

/// Create (or truncate) `path` and fill it with [`SEGMENT_BYTES`] of
/// zeros, durably.
fn zero_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = 0;
    while at < SEGMENT_BYTES {
        file.write_all_at(&zeros, at)?;
        file.sync_data()?;
        at += zeros.len() as u64;
        std::thread::sleep(ZERO_PAUSE);
    }
    file.sync_all()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Record {
        Record::Entry(Entry {
            index,
            term,
            data: vec![index as u8; 100].into(),
            ..Default::default()
        })
    }

    fn frames(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            r.encode_into(&mut out).unwrap();
        }
        out
    }

    fn indexes(replayed: &Replayed) -> Vec<(u64, u64)> {
        replayed.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn records_replay_with_conflicts_compactions_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, replayed) = Wal::open(dir.path()).unwrap();
        assert!(replayed.entries.is_empty() && replayed.hard_state.is_none());
        wal.append(
            &frames(&[entry(1, 1), entry(2, 1), entry(3, 1)]),
            3,
            Vec::new,
        )
        .unwrap();
        // A conflicting suffix from a new leader.
        wal.append(&frames(&[entry(2, 2)]), 2, Vec::new).unwrap();
        let hs = HardState {
            term: 2,
            commit: 1,
            ..Default::default()
        };
        wal.append(&frames(&[Record::HardState(hs.clone())]), 0, Vec::new)
            .unwrap();
        drop(wal);
        let (mut wal, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(1, 1), (2, 2)]);
        assert_eq!(replayed.hard_state, Some(hs));
        let marker = SnapshotMetadata {
            index: 1,
            term: 1,
            ..Default::default()
        };
        wal.append(
            &frames(&[Record::Compacted(marker.clone()), entry(3, 2)]),
            3,
            Vec::new,
        )
        .unwrap();
        drop(wal);
        let (mut wal, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(2, 2), (3, 2)]);
        assert_eq!(replayed.marker, Some(marker));
        let restart = SnapshotMetadata {
            index: 10,
            term: 3,
            ..Default::default()
        };
        wal.restart(&[Record::Restart(restart.clone())]).unwrap();
        assert_eq!(wal.segment_count(), 1, "the older segment is gone");
        wal.append(&frames(&[entry(11, 3)]), 11, Vec::new).unwrap();
        drop(wal);
        let (_, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(11, 3)]);
        assert_eq!(replayed.marker.unwrap().index, 10);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_corruption_elsewhere_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.append(&frames(&[entry(1, 1), entry(2, 1)]), 2, Vec::new)
            .unwrap();
        let end = wal.offset;
        drop(wal);
        let path = dir.path().join(segment_name(0));
        // A third record of several sectors, of which a crash let only
        // the first reach the disk.
        let torn = frames(&[Record::Entry(Entry {
            index: 3,
            term: 1,
            data: vec![9; 3000].into(),
            ..Default::default()
        })]);
        let reached = (SECTOR - end % SECTOR) as usize;
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&torn[..reached], end).unwrap();
        drop(file);
        let (mut wal, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(1, 1), (2, 1)]);
        assert_eq!(wal.offset, end, "writes go where the torn record was");
        wal.append(&frames(&[entry(3, 2)]), 3, Vec::new).unwrap();
        drop(wal);
        let (_, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(1, 1), (2, 1), (3, 2)]);

        // A flipped byte inside the last segment, with no sector left
        // unwritten, is corruption, not a torn write.
        let (wal, _) = Wal::open(dir.path()).unwrap();
        let end = wal.offset;
        drop(wal);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0x55], end - 3).unwrap();
        drop(file);
        let err = Wal::open(dir.path()).err().expect("refused");
        assert!(matches!(err, WalError::Corrupt { .. }), "{err}");

        // A flipped byte in a segment that is not the last is corruption.
        let dir2 = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir2.path()).unwrap();
        wal.append(&frames(&[entry(1, 1)]), 1, Vec::new).unwrap();
        wal.start_segment(0, &frames(&[entry(2, 1)])).unwrap();
        drop(wal);
        let first = dir2.path().join(segment_name(0));
        let file = OpenOptions::new().write(true).open(&first).unwrap();
        file.write_all_at(&[0xff], MAGIC.len() as u64 + 20).unwrap();
        drop(file);
        let err = Wal::open(dir2.path()).err().expect("refused");
        assert!(matches!(err, WalError::Corrupt { .. }), "{err}");

        // A segment created but never written (a crash between its
        // creation and its first write) is taken as empty and written.
        let dir3 = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir3.path()).unwrap();
        wal.append(&frames(&[entry(1, 1)]), 1, Vec::new).unwrap();
        drop(wal);
        let blank = File::create(dir3.path().join(segment_name(1))).unwrap();
        blank.set_len(4096).unwrap();
        drop(blank);
        let (mut wal, replayed) = Wal::open(dir3.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(1, 1)]);
        wal.append(&frames(&[entry(2, 1)]), 2, Vec::new).unwrap();
        drop(wal);
        let (_, replayed) = Wal::open(dir3.path()).unwrap();
        assert_eq!(indexes(&replayed), vec![(1, 1), (2, 1)]);

        // Something else under a segment's name is refused, by name.
        std::fs::write(dir3.path().join(segment_name(0)), b"SQLite format 3\0").unwrap();
        let err = Wal::open(dir3.path()).err().expect("refused");
        assert!(matches!(err, WalError::Format { .. }), "{err}");
        assert!(err.to_string().contains("0000000000000000.wal"), "{err}");
    }

    /// An entry of term 1 carrying `mib` MiB, to fill segments quickly.
    fn big_entry(index: u64, mib: usize) -> Record {
        Record::Entry(Entry {
            index,
            term: 1,
            data: vec![7; mib * 1024 * 1024].into(),
            ..Default::default()
        })
    }

    #[test]
    fn full_segments_roll_with_a_header_and_compacted_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        let big = |index: u64| big_entry(index, 3);
        let hs = HardState {
            term: 1,
            commit: 7,
            ..Default::default()
        };
        for i in 1..=12 {
            let header = || {
                vec![
                    Record::Compacted(SnapshotMetadata::default()),
                    Record::HardState(hs.clone()),
                ]
            };
            wal.append(&frames(&[big(i)]), i, header).unwrap();
        }
        assert!(wal.segment_count() >= 3, "{}", wal.segment_count());
        let marker = SnapshotMetadata {
            index: 9,
            term: 1,
            ..Default::default()
        };
        wal.append(&frames(&[Record::Compacted(marker)]), 0, Vec::new)
            .unwrap();
        let before = wal.segment_count();
        wal.compacted(9);
        let left = wal.segment_count();
        assert!(left < before, "{left} of {before} segments left");
        // Only segments holding entries past 9 are kept (a segment rolls
        // early to a spare, so how many that is depends on the timing).
        let (last, kept) = wal.segments.split_last().unwrap();
        assert!(kept.iter().all(|s| s.last_index > 9));
        assert!(last.last_index >= 12);
        drop(wal);
        assert_eq!(list_segments(dir.path()).unwrap().len(), left);
        let (_, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            replayed.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert_eq!(replayed.hard_state, Some(hs));
        assert_eq!(
            read_entries(dir.path(), 11, 11)
                .unwrap()
                .iter()
                .map(|e| e.index)
                .collect::<Vec<_>>(),
            vec![11]
        );
    }

    /// A roll takes the spare only once it is zeroed: one still being
    /// written is left for the next roll, and the appends never wait for
    /// it.
    #[test]
    fn a_roll_does_not_wait_for_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        let entry = |index: u64| big_entry(index, 6);
        // A spare whose zeroing goes on until the test lets it finish.
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let spare_path = dir.path().join(SPARE_NAME);
        let path = spare_path.clone();
        wal.spare = Some(std::thread::spawn(move || {
            let file = File::create(&path)?;
            // Bounded, so a roll that waited for it fails below rather
            // than hangs.
            let _ = finished.recv_timeout(std::time::Duration::from_secs(10));
            Ok(file)
        }));
        for i in 1..=3 {
            wal.append(&frames(&[entry(i)]), i, Vec::new).unwrap();
        }
        assert_eq!(wal.segment_count(), 2, "the roll went ahead");
        assert!(wal.spare.is_some(), "the unfinished spare is kept");
        assert!(spare_path.exists());
        finish.send(()).unwrap();
        while !wal.spare.as_ref().unwrap().is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        wal.append(&frames(&[entry(4)]), 4, Vec::new).unwrap();
        assert_eq!(wal.segment_count(), 3);
        // (Checked before the segment is half full: then the next spare
        // is started under the same name.)
        assert!(!spare_path.exists(), "the next roll took the spare");
        wal.append(&frames(&[entry(5)]), 5, Vec::new).unwrap();
        assert_eq!(wal.segment_count(), 3);
        drop(wal);
        let (_, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            replayed.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
    }

    /// A new log's first segment was only fallocated: once a megabyte of
    /// it is written it gets a zeroed spare, and the next append after that
    /// is ready starts the spare; a zeroed segment is kept until it is full.
    #[test]
    fn an_unzeroed_segment_is_left_for_a_spare_early() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        let small = |index: u64| entry(index, 1);
        wal.append(&frames(&[small(1)]), 1, Vec::new).unwrap();
        assert!(wal.spare.is_none(), "no spare for a log that writes little");
        wal.append(&frames(&[big_entry(2, 1)]), 2, Vec::new)
            .unwrap();
        assert!(wal.spare.is_some(), "a spare past the first megabyte");
        while !wal.spare.as_ref().unwrap().is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        wal.append(&frames(&[small(3)]), 3, Vec::new).unwrap();
        assert_eq!(wal.segment_count(), 2, "left for the spare");
        assert!(!dir.path().join(SPARE_NAME).exists(), "the spare was taken");
        assert!(!wal.leave_early);
        wal.append(&frames(&[big_entry(4, 1)]), 4, Vec::new)
            .unwrap();
        wal.append(&frames(&[small(5)]), 5, Vec::new).unwrap();
        assert_eq!(wal.segment_count(), 2, "a zeroed segment is kept");
        assert!(wal.spare.is_none());
        drop(wal);
        let (_, replayed) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            replayed.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
    }
}
