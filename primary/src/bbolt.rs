//! bbolt database files (the format etcd keeps its backend in): a
//! bulk-load-only [`Writer`], so a snapshot Tern streams can be read by
//! `etcdctl snapshot status/restore` and by etcd itself, and a streaming
//! [`Reader`], so `tern-restore import-etcd` can read what `etcdctl snapshot
//! save` wrote.
//!
//! The writer writes a fresh file from buckets whose keys arrive in
//! ascending order; it never updates a file. The reader walks a bucket's
//! tree page by page and never writes. Both are written from the layout of
//! go.etcd.io/bbolt (page.go, node.go, bucket.go, db.go, freelist.go, tx.go).
//!
//! # File layout
//!
//! The file is a sequence of 4096-byte pages; page `n` starts at byte
//! `n * 4096`. Integers are little-endian (bbolt writes its structs in native
//! order and etcd runs on little-endian machines). Every page starts with a
//! 16-byte header: page id `u64` (its own number), flags `u16` (0x01 branch,
//! 0x02 leaf, 0x04 meta, 0x10 freelist), element count `u16`, overflow `u32`
//! (how many pages after this one the page spills into: a page is one page
//! or a run of `1 + overflow` contiguous pages).
//!
//! - Pages 0 and 1: meta pages. After the header: magic `0xED0CDAED` `u32`,
//!   version 2 `u32`, page size `u32`, flags `u32`, the root bucket (root
//!   page id `u64`, sequence `u64`), freelist page id `u64`, high-water page
//!   id `u64` (the number of pages in the file), transaction id `u64`, and a
//!   checksum `u64`: FNV-1a 64 over the 56 bytes before it. bbolt opens the
//!   valid meta with the higher transaction id; both are written, with ids 0
//!   and 1, as bbolt's own `init` does.
//! - Page 2: the freelist, empty (count 0), since every page is in use.
//! - Then each bucket's b+tree, bottom-up: leaf pages as the keys stream in,
//!   then branch levels over them until one page (the bucket's root) is left.
//!   A leaf element is 16 bytes (flags `u32` (0x01: the value is a bucket),
//!   pos `u32`, key size `u32`, value size `u32`); a branch element is 16
//!   bytes (pos `u32`, key size `u32`, child page id `u64`) whose key is the
//!   first key under that child. `pos` is the distance from the element to
//!   its key; the key and (for leaves) value bytes follow the element array.
//!   A page whose elements do not fit in 4096 bytes (one large value) uses
//!   overflow pages.
//! - Last, the root bucket's tree: one leaf element per bucket, flagged
//!   0x01, whose value is the bucket header (root page id `u64`, sequence
//!   `u64`). An empty bucket is written inline, as bbolt and etcd leave it:
//!   root 0 and, after the header, an empty leaf page header.
//!
//! `tx.Check()` (which `etcdctl snapshot status` runs) requires every page
//! below the high-water mark to be reachable exactly once or free; this
//! layout reaches all of them.
//!
//! Memory stays bounded by one page of pending entries plus the first key
//! and page id of each page of the level being built (branch levels are
//! 1/100 or less of the data for etcd's 17-byte revision keys).
//!
//! # Reading
//!
//! [`Reader::open`] checks both meta pages (magic, version, FNV-1a
//! checksum) and uses the valid one with the higher transaction id, as
//! bbolt does; its page size (not necessarily 4096: bbolt uses the OS page
//! size) locates every other page. [`Reader::bucket`] finds a top-level
//! bucket and [`Entries`] iterates it in key order, depth first, holding one
//! page per tree level: memory is the tree's depth times the page size, plus
//! one bit per page of the file to refuse a page reached twice (a cycle, or
//! two parents sharing a child), never the file's size.
//!
//! The file is untrusted input (a half-copied snapshot, a wrong file): every
//! offset and length is checked against the page it sits in and every page
//! id against the meta's high-water mark and the file's length before use,
//! so a bad file gives a [`ReadError`] naming the page, never a panic, a huge
//! allocation or a loop.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const PAGE_SIZE: usize = 4096;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BUCKET_HEADER: usize = 16;

const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const FREELIST_PAGE: u16 = 0x10;
const BUCKET_LEAF: u32 = 0x01;

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const FREELIST_PGID: u64 = 2;
/// Pages 0, 1 (meta) and 2 (freelist) come before any tree page.
const FIRST_DATA_PGID: u64 = 3;

/// Writes one bbolt file. Create, fill buckets one at a time with
/// [`Writer::bucket`], then [`Writer::finish`]; a writer dropped before
/// `finish` leaves a file bbolt will refuse (no valid meta page).
pub struct Writer {
    file: BufWriter<File>,
    next_pgid: u64,
    /// (bucket name, bucket value in the root bucket), in creation order.
    buckets: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One bucket being filled; keys must arrive strictly ascending.
pub struct BucketWriter<'a> {
    writer: &'a mut Writer,
    name: Vec<u8>,
    tree: Tree,
}

/// Bottom-up b+tree construction: the leaf being filled and the (first key,
/// page id) of each leaf already written.
#[derive(Default)]
struct Tree {
    pending: Vec<(u32, Vec<u8>, Vec<u8>)>,
    pending_bytes: usize,
    last_key: Option<Vec<u8>>,
    pages: Vec<(Vec<u8>, u64)>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn u32_len(n: usize) -> io::Result<u32> {
    u32::try_from(n).map_err(|_| invalid(format!("bbolt: {n} bytes exceed a u32 size")))
}

impl Writer {
    /// Create (truncating) the file at `path`.
    pub fn create(path: &Path) -> io::Result<Writer> {
        let file = File::create(path)?;
        let mut file = BufWriter::with_capacity(256 * 1024, file);
        // Placeholders for the meta and freelist pages, written in finish()
        // once the root and page count are known.
        file.write_all(&[0u8; PAGE_SIZE * FIRST_DATA_PGID as usize])?;
        Ok(Writer {
            file,
            next_pgid: FIRST_DATA_PGID,
            buckets: Vec::new(),
        })
    }

    /// Start a top-level bucket. Names must be unique.
    pub fn bucket(&mut self, name: &[u8]) -> BucketWriter<'_> {
        BucketWriter {
            writer: self,
            name: name.to_vec(),
            tree: Tree::default(),
        }
    }

    /// Write the root bucket, the freelist and both meta pages, and sync.
    pub fn finish(mut self) -> io::Result<()> {
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort();
        let mut root = Tree::default();
        for (name, value) in buckets {
            root.put(&mut self, BUCKET_LEAF, &name, &value)?;
        }
        let root_pgid = root.finish(&mut self)?;
        let high_water = self.next_pgid;
        let file = self
            .file
            .into_inner()
            .map_err(|e| io::Error::new(e.error().kind(), e.to_string()))?;
        let mut freelist = vec![0u8; PAGE_SIZE];
        page_header(&mut freelist, FREELIST_PGID, FREELIST_PAGE, 0, 0);
        file.write_all_at(&freelist, FREELIST_PGID * PAGE_SIZE as u64)?;
        for pgid in 0..2u64 {
            let page = meta_page(pgid, root_pgid, high_water, pgid);
            file.write_all_at(&page, pgid * PAGE_SIZE as u64)?;
        }
        file.sync_all()
    }

    /// Append one page (plus overflow) holding `body` (elements and data,
    /// without the header); returns its id.
    fn write_page(&mut self, flags: u16, count: usize, body: &[u8]) -> io::Result<u64> {
        let count = u16::try_from(count)
            .map_err(|_| invalid(format!("bbolt: {count} elements in one page")))?;
        let pgid = self.next_pgid;
        let total = PAGE_HEADER + body.len();
        let pages = total.div_ceil(PAGE_SIZE);
        let overflow = u32_len(pages - 1)?;
        let mut header = [0u8; PAGE_HEADER];
        page_header(&mut header, pgid, flags, count, overflow);
        self.file.write_all(&header)?;
        self.file.write_all(body)?;
        let padding = pages * PAGE_SIZE - total;
        self.file.write_all(&vec![0u8; padding])?;
        self.next_pgid += pages as u64;
        Ok(pgid)
    }
}

impl BucketWriter<'_> {
    /// Add `key` = `value`; `key` must sort after the previous key.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.tree.put(self.writer, 0, key, value)
    }

    /// Close the bucket: write its remaining pages and register it.
    pub fn finish(self) -> io::Result<()> {
        let value = if self.tree.is_empty() {
            // Inline, as bbolt stores a bucket that has never held a key:
            // root 0, sequence 0, then an empty leaf page.
            let mut v = vec![0u8; BUCKET_HEADER + PAGE_HEADER];
            page_header(&mut v[BUCKET_HEADER..], 0, LEAF_PAGE, 0, 0);
            v
        } else {
            let root = self.tree.finish(self.writer)?;
            let mut v = Vec::with_capacity(BUCKET_HEADER);
            v.extend_from_slice(&root.to_le_bytes());
            v.extend_from_slice(&0u64.to_le_bytes());
            v
        };
        if self.writer.buckets.iter().any(|(n, _)| *n == self.name) {
            return Err(invalid(format!(
                "bbolt: bucket {:?} written twice",
                String::from_utf8_lossy(&self.name)
            )));
        }
        self.writer.buckets.push((self.name, value));
        Ok(())
    }
}

impl Tree {
    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.pages.is_empty()
    }

    fn put(&mut self, w: &mut Writer, flags: u32, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.is_empty() {
            return Err(invalid("bbolt: empty key".into()));
        }
        if let Some(last) = &self.last_key {
            if key <= last.as_slice() {
                return Err(invalid("bbolt: keys out of order".into()));
            }
        }
        u32_len(key.len())?;
        u32_len(value.len())?;
        let size = ELEMENT + key.len() + value.len();
        // Fill each leaf to the page size; a lone entry too big for a page
        // gets overflow pages.
        if !self.pending.is_empty() && PAGE_HEADER + self.pending_bytes + size > PAGE_SIZE {
            self.flush_leaf(w)?;
        }
        self.pending.push((flags, key.to_vec(), value.to_vec()));
        self.pending_bytes += size;
        self.last_key = Some(key.to_vec());
        Ok(())
    }

    fn flush_leaf(&mut self, w: &mut Writer) -> io::Result<()> {
        let entries = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let Some(first) = entries.first().map(|e| e.1.clone()) else {
            return Ok(());
        };
        let mut body = vec![0u8; ELEMENT * entries.len()];
        for (i, (flags, key, value)) in entries.iter().enumerate() {
            let at = ELEMENT * i;
            let pos = u32_len(body.len() - at)?;
            body[at..at + 4].copy_from_slice(&flags.to_le_bytes());
            body[at + 4..at + 8].copy_from_slice(&pos.to_le_bytes());
            body[at + 8..at + 12].copy_from_slice(&u32_len(key.len())?.to_le_bytes());
            body[at + 12..at + 16].copy_from_slice(&u32_len(value.len())?.to_le_bytes());
            body.extend_from_slice(key);
            body.extend_from_slice(value);
        }
        let pgid = w.write_page(LEAF_PAGE, entries.len(), &body)?;
        self.pages.push((first, pgid));
        Ok(())
    }

    /// Write what is pending and the branch levels; returns the root page.
    fn finish(mut self, w: &mut Writer) -> io::Result<u64> {
        self.flush_leaf(w)?;
        if self.pages.is_empty() {
            return w.write_page(LEAF_PAGE, 0, &[]);
        }
        let mut level = self.pages;
        while level.len() > 1 {
            level = write_branch_level(w, &level)?;
        }
        Ok(level[0].1)
    }
}

/// Write branch pages over `children` (first key, page id); returns the
/// next level up.
fn write_branch_level(
    w: &mut Writer,
    children: &[(Vec<u8>, u64)],
) -> io::Result<Vec<(Vec<u8>, u64)>> {
    let mut parents = Vec::new();
    let mut start = 0;
    while start < children.len() {
        // At least two children per branch page so each level shrinks.
        let mut end = start;
        let mut bytes = PAGE_HEADER;
        while end < children.len() {
            let size = ELEMENT + children[end].0.len();
            if end - start >= 2 && bytes + size > PAGE_SIZE {
                break;
            }
            bytes += size;
            end += 1;
        }
        let group = &children[start..end];
        let mut body = vec![0u8; ELEMENT * group.len()];
        for (i, (key, pgid)) in group.iter().enumerate() {
            let at = ELEMENT * i;
            let pos = u32_len(body.len() - at)?;
            body[at..at + 4].copy_from_slice(&pos.to_le_bytes());
            body[at + 4..at + 8].copy_from_slice(&u32_len(key.len())?.to_le_bytes());
            body[at + 8..at + 16].copy_from_slice(&pgid.to_le_bytes());
            body.extend_from_slice(key);
        }
        let pgid = w.write_page(BRANCH_PAGE, group.len(), &body)?;
        parents.push((group[0].0.clone(), pgid));
        start = end;
    }
    Ok(parents)
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// The length of a meta page's fields up to and including the checksum.
const META_LEN: usize = 64;
/// Page sizes bbolt may have used (the OS page size of the machine that
/// created the file); only to find meta page 1 when meta page 0 is bad.
const PAGE_SIZES: [usize; 5] = [4096, 8192, 16384, 32768, 65536];

/// Why a file cannot be read as a bbolt database.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Neither meta page is valid: not a bbolt file, or both metas damaged.
    #[error("not a bbolt database: {0}")]
    NotBbolt(String),
    /// The meta page names more pages than the file holds.
    #[error("truncated: the database has {pages} pages of {page_size} bytes ({need} bytes) but the file holds {have} bytes")]
    Truncated {
        pages: u64,
        page_size: usize,
        need: u64,
        have: u64,
    },
    /// A page or element does not make sense.
    #[error("corrupt bbolt database: {0}")]
    Corrupt(String),
}

fn corrupt(msg: String) -> ReadError {
    ReadError::Corrupt(msg)
}

/// What a valid meta page says.
#[derive(Debug, Clone, Copy)]
struct Meta {
    page_size: usize,
    root: u64,
    high_water: u64,
    txid: u64,
}

/// Parse and check the meta page at the start of `page`.
fn parse_meta(page: &[u8], pgid: u64) -> Result<Meta, String> {
    let field = |at: usize, n: usize| {
        page.get(at..at + n)
            .ok_or_else(|| format!("the file ends inside page {pgid}"))
    };
    let u32_at = |at| field(at, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
    let u64_at = |at| field(at, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let flags = field(8, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))?;
    if flags != META_PAGE {
        return Err(format!("page {pgid} is not a meta page (flags {flags:#x})"));
    }
    let m = PAGE_HEADER;
    let magic = u32_at(m)?;
    if magic != MAGIC {
        return Err(format!("page {pgid}: bad magic {magic:#010x}"));
    }
    let version = u32_at(m + 4)?;
    if version != VERSION {
        return Err(format!("page {pgid}: unsupported version {version}"));
    }
    let stored = u64_at(m + 56)?;
    if stored != fnv1a64(field(m, 56)?) {
        return Err(format!("page {pgid}: meta checksum mismatch"));
    }
    let page_size = u32_at(m + 8)? as usize;
    if !(PAGE_HEADER + META_LEN..=1 << 20).contains(&page_size) {
        return Err(format!("page {pgid}: implausible page size {page_size}"));
    }
    let meta = Meta {
        page_size,
        root: u64_at(m + 16)?,
        high_water: u64_at(m + 40)?,
        txid: u64_at(m + 48)?,
    };
    if meta.root < FIRST_TREE_PGID || meta.root >= meta.high_water {
        return Err(format!(
            "page {pgid}: root page {} outside the file's {} pages",
            meta.root, meta.high_water
        ));
    }
    Ok(meta)
}

/// Pages 0 and 1 are the metas; a tree page comes after them (the
/// freelist may sit anywhere, bbolt allocates it like any page).
const FIRST_TREE_PGID: u64 = 2;

/// A read-only view of one bbolt file.
pub struct Reader {
    file: File,
    meta: Meta,
}

/// One key of a bucket. `is_bucket`: the value is a nested bucket's header
/// (what every entry of the root bucket is; etcd nests no further).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub is_bucket: bool,
}

impl Reader {
    /// Open `path` and pick its meta page: both are checked, and the valid
    /// one with the higher transaction id wins (the other is the previous
    /// commit, or damaged).
    pub fn open(path: &Path) -> Result<Reader, ReadError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut first = vec![0u8; PAGE_SIZE.min(len as usize)];
        file.read_exact_at(&mut first, 0)?;
        let meta0 = parse_meta(&first, 0);
        // Meta 1 sits one page in; if meta 0 cannot say how big a page is,
        // try every page size bbolt might have used.
        let sizes: Vec<usize> = match &meta0 {
            Ok(m) => vec![m.page_size],
            Err(_) => PAGE_SIZES.to_vec(),
        };
        let mut meta1 = Err("file ends before page 1".to_string());
        for size in sizes {
            if len < (2 * size) as u64 {
                continue;
            }
            let mut page = vec![0u8; PAGE_HEADER + META_LEN];
            file.read_exact_at(&mut page, size as u64)?;
            meta1 = parse_meta(&page, 1).and_then(|m| {
                (m.page_size == size)
                    .then_some(m)
                    .ok_or_else(|| format!("page 1: page size {} at offset {size}", m.page_size))
            });
            if meta1.is_ok() {
                break;
            }
        }
        let meta = match (meta0, meta1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(m), Err(_)) | (Err(_), Ok(m)) => m,
            (Err(a), Err(b)) => return Err(ReadError::NotBbolt(format!("{a}; {b}"))),
        };
        let need = meta.high_water.checked_mul(meta.page_size as u64);
        if need.is_none_or(|need| need > len) {
            return Err(ReadError::Truncated {
                pages: meta.high_water,
                page_size: meta.page_size,
                need: need.unwrap_or(u64::MAX),
                have: len,
            });
        }
        Ok(Reader { file, meta })
    }

    pub fn page_size(&self) -> usize {
        self.meta.page_size
    }

    /// The transaction id of the meta page in use.
    pub fn txid(&self) -> u64 {
        self.meta.txid
    }

    /// Bytes the database occupies: the high-water mark in pages. A file
    /// may hold more (bbolt grows files in chunks; `etcdctl snapshot save`
    /// appends a sha256).
    pub fn db_len(&self) -> u64 {
        self.meta.high_water * self.meta.page_size as u64
    }

    /// Names of the top-level buckets, in order.
    pub fn bucket_names(&self) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut names = Vec::new();
        for entry in self.root() {
            let entry = entry?;
            if !entry.is_bucket {
                return Err(corrupt(format!(
                    "root bucket entry {:?} is not a bucket",
                    String::from_utf8_lossy(&entry.key)
                )));
            }
            names.push(entry.key);
        }
        Ok(names)
    }

    /// The top-level bucket `name`, if the file has one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Entries<'_>>, ReadError> {
        for entry in self.root() {
            let entry = entry?;
            if entry.key.as_slice() < name {
                continue;
            }
            if entry.key != name {
                break;
            }
            let label = String::from_utf8_lossy(name);
            if !entry.is_bucket {
                return Err(corrupt(format!("root entry {label:?} is not a bucket")));
            }
            let header = entry.value.get(..BUCKET_HEADER).ok_or_else(|| {
                corrupt(format!(
                    "bucket {label:?}: header of {} bytes",
                    entry.value.len()
                ))
            })?;
            let root = u64::from_le_bytes(header[..8].try_into().unwrap_or([0; 8]));
            if root != 0 {
                return Ok(Some(Entries::new(self, Start::Page(root))));
            }
            // Inline bucket: a leaf page stored in the bucket's value.
            let page = Page::parse(
                entry.value[BUCKET_HEADER..].to_vec(),
                None,
                &format!("inline bucket {label:?}"),
            )?;
            if page.flags != LEAF_PAGE {
                return Err(corrupt(format!(
                    "inline bucket {label:?} holds a page with flags {:#x}",
                    page.flags
                )));
            }
            return Ok(Some(Entries::new(self, Start::Inline(page))));
        }
        Ok(None)
    }

    fn root(&self) -> Entries<'_> {
        Entries::new(self, Start::Page(self.meta.root))
    }

    /// Read tree page `pgid`: its first page, then as much of its overflow
    /// as its elements cover (never more than the page claims, which the
    /// caller has already checked against the file).
    fn read_page(&self, pgid: u64) -> Result<Page, ReadError> {
        let ps = self.meta.page_size;
        if pgid < FIRST_TREE_PGID || pgid >= self.meta.high_water {
            return Err(corrupt(format!(
                "a tree refers to page {pgid}, outside the tree pages 2..{}",
                self.meta.high_water
            )));
        }
        let offset = pgid * ps as u64;
        let mut data = vec![0u8; ps];
        self.file.read_exact_at(&mut data, offset)?;
        let header =
            PageHeader::parse(&data).ok_or_else(|| corrupt(format!("page {pgid}: short")))?;
        if header.id != pgid {
            return Err(corrupt(format!(
                "page {pgid} says it is page {}",
                header.id
            )));
        }
        let last = pgid.checked_add(u64::from(header.overflow));
        if last.is_none_or(|last| last >= self.meta.high_water) {
            return Err(corrupt(format!(
                "page {pgid}: {} overflow pages run past the file's {} pages",
                header.overflow, self.meta.high_water
            )));
        }
        let run = (1 + header.overflow as usize) * ps;
        let label = format!("page {pgid}");
        let elements_end = PAGE_HEADER + header.count as usize * ELEMENT;
        if elements_end > run {
            return Err(corrupt(format!(
                "{label}: {} elements do not fit in {run} bytes",
                header.count
            )));
        }
        extend_to(&self.file, offset, &mut data, elements_end)?;
        let extent = data_extent(&data, &header, &label)?;
        if extent > run {
            return Err(corrupt(format!(
                "{label}: an element runs past the page's end ({extent} > {run} bytes)"
            )));
        }
        extend_to(&self.file, offset, &mut data, extent)?;
        Page::parse(data, Some(header.overflow), &label)
    }
}

/// Grow `data` (the bytes at `offset`) to `len` bytes from the file.
fn extend_to(file: &File, offset: u64, data: &mut Vec<u8>, len: usize) -> io::Result<()> {
    let have = data.len();
    if len > have {
        data.resize(len, 0);
        file.read_exact_at(&mut data[have..], offset + have as u64)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct PageHeader {
    id: u64,
    flags: u16,
    count: u16,
    overflow: u32,
}

impl PageHeader {
    fn parse(d: &[u8]) -> Option<PageHeader> {
        let h = d.get(..PAGE_HEADER)?;
        Some(PageHeader {
            id: u64::from_le_bytes(h[0..8].try_into().ok()?),
            flags: u16::from_le_bytes(h[8..10].try_into().ok()?),
            count: u16::from_le_bytes(h[10..12].try_into().ok()?),
            overflow: u32::from_le_bytes(h[12..16].try_into().ok()?),
        })
    }
}

/// How far into a page its elements' keys and values reach; the element
/// array must already be in `data`.
fn data_extent(data: &[u8], header: &PageHeader, label: &str) -> Result<usize, ReadError> {
    let mut extent = PAGE_HEADER + header.count as usize * ELEMENT;
    for i in 0..header.count as usize {
        let at = PAGE_HEADER + ELEMENT * i;
        let e = &data[at..at + ELEMENT];
        let word = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]) as usize;
        let end = match header.flags {
            LEAF_PAGE => at + word(4) + word(8) + word(12),
            BRANCH_PAGE => at + word(0) + word(4),
            flags => {
                return Err(corrupt(format!(
                    "{label}: expected a branch or leaf page, found flags {flags:#x}"
                )))
            }
        };
        extent = extent.max(end);
    }
    Ok(extent)
}

/// A branch or leaf page whose elements have been checked to lie inside
/// `data`.
struct Page {
    flags: u16,
    count: usize,
    data: Vec<u8>,
    /// Overflow pages after the first (None: inline, not a file page).
    overflow: Option<u32>,
}

impl Page {
    fn parse(data: Vec<u8>, overflow: Option<u32>, label: &str) -> Result<Page, ReadError> {
        let header = PageHeader::parse(&data).ok_or_else(|| corrupt(format!("{label}: short")))?;
        let elements_end = PAGE_HEADER + header.count as usize * ELEMENT;
        if elements_end > data.len() {
            return Err(corrupt(format!(
                "{label}: {} elements do not fit in {} bytes",
                header.count,
                data.len()
            )));
        }
        let extent = data_extent(&data, &header, label)?;
        if extent > data.len() {
            return Err(corrupt(format!(
                "{label}: an element runs past the page's end"
            )));
        }
        if header.flags == BRANCH_PAGE && header.count == 0 {
            return Err(corrupt(format!("{label}: a branch page without children")));
        }
        Ok(Page {
            flags: header.flags,
            count: header.count as usize,
            data,
            overflow,
        })
    }

    fn word(&self, at: usize) -> u32 {
        self.data
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        self.data.get(at..at + len).unwrap_or(&[])
    }

    /// Leaf element `i`: (flags, key, value).
    fn leaf(&self, i: usize) -> (u32, &[u8], &[u8]) {
        let at = PAGE_HEADER + ELEMENT * i;
        let (pos, ks, vs) = (
            self.word(at + 4) as usize,
            self.word(at + 8) as usize,
            self.word(at + 12) as usize,
        );
        (
            self.word(at),
            self.bytes(at + pos, ks),
            self.bytes(at + pos + ks, vs),
        )
    }

    /// Branch element `i`: its child's page id.
    fn child(&self, i: usize) -> u64 {
        let at = PAGE_HEADER + ELEMENT * i;
        let b = self.bytes(at + 8, 8);
        b.try_into().map_or(0, u64::from_le_bytes)
    }
}

enum Start {
    Page(u64),
    Inline(Page),
}

/// A bucket's entries in key order, read page by page. Ends after the
/// first error.
pub struct Entries<'a> {
    reader: &'a Reader,
    /// (page, next element) from the root down to the current leaf.
    stack: Vec<(Page, usize)>,
    start: Option<u64>,
    /// One bit per page of the file: pages this walk has entered.
    seen: Vec<u64>,
    last_key: Option<Vec<u8>>,
    done: bool,
}

impl<'a> Entries<'a> {
    fn new(reader: &'a Reader, start: Start) -> Entries<'a> {
        let mut entries = Entries {
            reader,
            stack: Vec::new(),
            start: None,
            seen: Vec::new(),
            last_key: None,
            done: false,
        };
        match start {
            Start::Page(pgid) => entries.start = Some(pgid),
            Start::Inline(page) => entries.stack.push((page, 0)),
        }
        entries
    }

    /// Enter page `pgid`, refusing one this walk has already entered.
    fn push(&mut self, pgid: u64) -> Result<(), ReadError> {
        if self.seen.is_empty() {
            self.seen = vec![0; (self.reader.meta.high_water as usize).div_ceil(64)];
        }
        let page = self.reader.read_page(pgid)?;
        let last = pgid + u64::from(page.overflow.unwrap_or(0));
        for p in pgid..=last {
            let (word, bit) = ((p / 64) as usize, p % 64);
            let slot = self
                .seen
                .get_mut(word)
                .ok_or_else(|| corrupt(format!("page {p} beyond the high-water mark")))?;
            if *slot & (1 << bit) != 0 {
                return Err(corrupt(format!(
                    "page {p} is reached twice (a cycle or a shared page)"
                )));
            }
            *slot |= 1 << bit;
        }
        self.stack.push((page, 0));
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Entry>, ReadError> {
        if let Some(pgid) = self.start.take() {
            self.push(pgid)?;
        }
        loop {
            let Some((page, next)) = self.stack.last_mut() else {
                return Ok(None);
            };
            if *next >= page.count {
                self.stack.pop();
                continue;
            }
            let i = *next;
            *next += 1;
            if page.flags == BRANCH_PAGE {
                let child = page.child(i);
                self.push(child)?;
                continue;
            }
            let (flags, key, value) = page.leaf(i);
            if key.is_empty() {
                return Err(corrupt("an empty key".into()));
            }
            if self.last_key.as_deref().is_some_and(|last| key <= last) {
                return Err(corrupt(format!(
                    "keys out of order ({:?} after {:?})",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(self.last_key.as_deref().unwrap_or(&[]))
                )));
            }
            let entry = Entry {
                key: key.to_vec(),
                value: value.to_vec(),
                is_bucket: flags & BUCKET_LEAF != 0,
            };
            self.last_key = Some(entry.key.clone());
            return Ok(Some(entry));
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = Result<Entry, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.step().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
            self.stack.clear();
        }
        item
    }
}

fn page_header(buf: &mut [u8], pgid: u64, flags: u16, count: u16, overflow: u32) {
    buf[0..8].copy_from_slice(&pgid.to_le_bytes());
    buf[8..10].copy_from_slice(&flags.to_le_bytes());
    buf[10..12].copy_from_slice(&count.to_le_bytes());
    buf[12..16].copy_from_slice(&overflow.to_le_bytes());
}

fn meta_page(pgid: u64, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    page_header(&mut page, pgid, META_PAGE, 0, 0);
    let mut meta = Vec::with_capacity(64);
    meta.extend_from_slice(&MAGIC.to_le_bytes());
    meta.extend_from_slice(&VERSION.to_le_bytes());
    meta.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    meta.extend_from_slice(&0u32.to_le_bytes());
    meta.extend_from_slice(&root.to_le_bytes());
    meta.extend_from_slice(&0u64.to_le_bytes());
    meta.extend_from_slice(&FREELIST_PGID.to_le_bytes());
    meta.extend_from_slice(&high_water.to_le_bytes());
    meta.extend_from_slice(&txid.to_le_bytes());
    let checksum = fnv1a64(&meta);
    meta.extend_from_slice(&checksum.to_le_bytes());
    page[PAGE_HEADER..PAGE_HEADER + meta.len()].copy_from_slice(&meta);
    page
}

/// FNV-1a 64, bbolt's meta checksum.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    fn le64(d: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
    }
    fn le32(d: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
    }
    fn le16(d: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(d[at..at + 2].try_into().unwrap())
    }

    type Buckets = BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

    /// A minimal bbolt reader that also does tx.Check()'s page accounting.
    struct Reader<'a> {
        d: &'a [u8],
        seen: HashSet<u64>,
    }

    impl Reader<'_> {
        /// Visit the tree at `pgid`, returning its leaf entries in order.
        fn tree(&mut self, pgid: u64, out: &mut Vec<(u32, Vec<u8>, Vec<u8>)>) {
            let at = pgid as usize * PAGE_SIZE;
            let d = self.d;
            assert_eq!(le64(d, at), pgid, "page header id");
            let flags = le16(d, at + 8);
            let count = le16(d, at + 10) as usize;
            let overflow = le32(d, at + 12) as u64;
            for p in pgid..=pgid + overflow {
                assert!(self.seen.insert(p), "page {p} referenced twice");
            }
            for i in 0..count {
                let e = at + PAGE_HEADER + ELEMENT * i;
                if flags == LEAF_PAGE {
                    let (f, pos) = (le32(d, e), le32(d, e + 4) as usize);
                    let (ks, vs) = (le32(d, e + 8) as usize, le32(d, e + 12) as usize);
                    let k = d[e + pos..e + pos + ks].to_vec();
                    let v = d[e + pos + ks..e + pos + ks + vs].to_vec();
                    out.push((f, k, v));
                } else {
                    assert_eq!(flags, BRANCH_PAGE);
                    let (pos, ks) = (le32(d, e) as usize, le32(d, e + 4) as usize);
                    let key = d[e + pos..e + pos + ks].to_vec();
                    let child = le64(d, e + 8);
                    let before = out.len();
                    self.tree(child, out);
                    assert_eq!(out[before].1, key, "branch key is the child's first key");
                }
            }
        }
    }

    fn read_all(d: &[u8]) -> Buckets {
        assert_eq!(d.len() % PAGE_SIZE, 0);
        let mut txids = Vec::new();
        for m in 0..2usize {
            let at = m * PAGE_SIZE;
            assert_eq!(le16(d, at + 8), META_PAGE);
            let meta = &d[at + PAGE_HEADER..at + PAGE_HEADER + 64];
            assert_eq!(le32(meta, 0), MAGIC);
            assert_eq!(le32(meta, 4), VERSION);
            assert_eq!(le32(meta, 8), PAGE_SIZE as u32);
            assert_eq!(le64(meta, 56), fnv1a64(&meta[..56]), "checksum");
            assert_eq!(le64(meta, 40) as usize * PAGE_SIZE, d.len(), "high water");
            txids.push(le64(meta, 48));
        }
        assert_eq!(txids, [0, 1]);
        let meta = &d[PAGE_SIZE + PAGE_HEADER..];
        let freelist = le64(meta, 32);
        assert_eq!(le16(d, freelist as usize * PAGE_SIZE + 8), FREELIST_PAGE);
        let mut r = Reader {
            d,
            seen: [0, 1, freelist].into_iter().collect(),
        };
        let mut roots = Vec::new();
        r.tree(le64(meta, 16), &mut roots);
        let mut buckets = Buckets::new();
        for (flags, name, value) in roots {
            assert_eq!(flags, BUCKET_LEAF);
            let root = le64(&value, 0);
            let mut entries = Vec::new();
            if root == 0 {
                assert_eq!(
                    le16(&value, BUCKET_HEADER + 10),
                    0,
                    "inline buckets are empty"
                );
            } else {
                r.tree(root, &mut entries);
            }
            buckets.insert(name, entries.into_iter().map(|(_, k, v)| (k, v)).collect());
        }
        let high = d.len() as u64 / PAGE_SIZE as u64;
        assert_eq!(
            r.seen.len() as u64,
            high,
            "every page reachable exactly once"
        );
        buckets
    }

    fn write(buckets: &Buckets) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut w = Writer::create(&path).unwrap();
        for (name, entries) in buckets {
            let mut b = w.bucket(name);
            for (k, v) in entries {
                b.put(k, v).unwrap();
            }
            b.finish().unwrap();
        }
        w.finish().unwrap();
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn round_trip_with_branches_and_overflow() {
        let mut buckets = Buckets::new();
        let many: Vec<_> = (0..50_000u64)
            .map(|i| (i.to_be_bytes().to_vec(), format!("value-{i}").into_bytes()))
            .collect();
        buckets.insert(b"many".to_vec(), many);
        let big: Vec<_> = (0..40u64)
            .map(|i| {
                let size = if i % 3 == 0 { 100_000 + i as usize } else { 10 };
                (format!("big{i:03}").into_bytes(), vec![i as u8; size])
            })
            .collect();
        buckets.insert(b"big".to_vec(), big);
        buckets.insert(b"empty".to_vec(), Vec::new());
        let long_keys: Vec<_> = (0..300u64)
            .map(|i| {
                (
                    format!("{i:05}{}", "k".repeat(3000)).into_bytes(),
                    Vec::new(),
                )
            })
            .collect();
        buckets.insert(b"long-keys".to_vec(), long_keys);
        buckets.insert(b"one".to_vec(), vec![(b"k".to_vec(), b"v".to_vec())]);
        let d = write(&buckets);
        assert_eq!(read_all(&d), buckets);
    }

    #[test]
    fn empty_database() {
        assert!(read_all(&write(&Buckets::new())).is_empty());
    }

    #[test]
    fn rejects_unsorted_keys_and_duplicate_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(&dir.path().join("db")).unwrap();
        let mut b = w.bucket(b"b");
        b.put(b"2", b"").unwrap();
        assert!(b.put(b"1", b"").is_err());
        assert!(b.put(b"2", b"").is_err());
        assert!(b.put(b"", b"").is_err());
        b.finish().unwrap();
        assert!(w.bucket(b"b").finish().is_err());
    }

    #[test]
    fn fnv_matches_reference() {
        // FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;
    use std::collections::BTreeMap;

    type Buckets = BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

    fn write_file(path: &Path, buckets: &Buckets) {
        let mut w = Writer::create(path).unwrap();
        for (name, entries) in buckets {
            let mut b = w.bucket(name);
            for (k, v) in entries {
                b.put(k, v).unwrap();
            }
            b.finish().unwrap();
        }
        w.finish().unwrap();
    }

    /// Every bucket, read back with the reader.
    fn read_back(path: &Path) -> Result<Buckets, ReadError> {
        let r = Reader::open(path)?;
        let mut out = Buckets::new();
        for name in r.bucket_names()? {
            let entries = r.bucket(&name)?.expect("listed bucket exists");
            let mut kvs = Vec::new();
            for e in entries {
                let e = e?;
                if e.is_bucket {
                    return Err(corrupt("the writer writes no nested buckets".into()));
                }
                kvs.push((e.key, e.value));
            }
            out.insert(name, kvs);
        }
        Ok(out)
    }

    fn sample() -> Buckets {
        let mut buckets = Buckets::new();
        let many: Vec<_> = (0..30_000u64)
            .map(|i| (i.to_be_bytes().to_vec(), format!("value-{i}").into_bytes()))
            .collect();
        buckets.insert(b"many".to_vec(), many);
        let big: Vec<_> = (0..20u64)
            .map(|i| {
                let size = if i % 3 == 0 { 50_000 + i as usize } else { 10 };
                (format!("big{i:03}").into_bytes(), vec![i as u8; size])
            })
            .collect();
        buckets.insert(b"big".to_vec(), big);
        buckets.insert(b"empty".to_vec(), Vec::new());
        buckets.insert(b"one".to_vec(), vec![(b"k".to_vec(), b"v".to_vec())]);
        buckets
    }

    #[test]
    fn reads_back_what_the_writer_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let buckets = sample();
        write_file(&path, &buckets);
        assert_eq!(read_back(&path).unwrap(), buckets);
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.txid(), 1, "the meta with the higher txid");
        assert_eq!(r.page_size(), PAGE_SIZE);
        assert_eq!(r.db_len(), std::fs::metadata(&path).unwrap().len());
        assert!(r.bucket(b"missing").unwrap().is_none());
        assert!(r.bucket(b"zzz").unwrap().is_none());
    }

    #[test]
    fn reads_an_empty_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        write_file(&path, &Buckets::new());
        assert!(read_back(&path).unwrap().is_empty());
    }

    /// A database whose only bucket is inline with two keys, as bbolt
    /// stores a small bucket (etcd's `meta`, `cluster`, `members`): the
    /// writer only ever writes empty inline buckets, so build it by hand.
    #[test]
    fn reads_an_inline_bucket_with_keys() {
        let mut inline = vec![0u8; BUCKET_HEADER + PAGE_HEADER + 2 * ELEMENT];
        page_header(&mut inline[BUCKET_HEADER..], 0, LEAF_PAGE, 2, 0);
        let kvs: [(&[u8], &[u8]); 2] = [(b"alpha", b"1"), (b"beta", b"22")];
        for (i, (k, v)) in kvs.iter().enumerate() {
            let at = BUCKET_HEADER + PAGE_HEADER + ELEMENT * i;
            let pos = (inline.len() - at) as u32;
            inline[at + 4..at + 8].copy_from_slice(&pos.to_le_bytes());
            inline[at + 8..at + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            inline[at + 12..at + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
            inline.extend_from_slice(k);
            inline.extend_from_slice(v);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut w = Writer::create(&path).unwrap();
        let mut root = Tree::default();
        root.put(&mut w, BUCKET_LEAF, b"small", &inline).unwrap();
        let root_pgid = root.finish(&mut w).unwrap();
        let high_water = w.next_pgid;
        let file = w.file.into_inner().unwrap();
        for pgid in 0..2u64 {
            let page = meta_page(pgid, root_pgid, high_water, pgid);
            file.write_all_at(&page, pgid * PAGE_SIZE as u64).unwrap();
        }
        let got = read_back(&path).unwrap();
        let want: Vec<_> = kvs.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(got[b"small".as_slice()], want);
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        write_file(&path, &sample());
        let whole = std::fs::read(&path).unwrap();
        for len in [
            0,
            10,
            100,
            PAGE_SIZE,
            2 * PAGE_SIZE,
            whole.len() / 2,
            whole.len() - 1,
        ] {
            std::fs::write(&path, &whole[..len]).unwrap();
            let err = read_back(&path).expect_err("a truncated file reads");
            if len >= 2 * PAGE_SIZE {
                assert!(matches!(err, ReadError::Truncated { .. }), "{len}: {err}");
                assert!(err.to_string().starts_with("truncated: "), "{err}");
            } else {
                assert!(
                    matches!(err, ReadError::NotBbolt(_) | ReadError::Truncated { .. }),
                    "{len}: {err}"
                );
            }
        }
    }

    #[test]
    fn a_bad_meta_checksum_falls_back_to_the_other_meta_or_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let buckets = sample();
        write_file(&path, &buckets);
        let whole = std::fs::read(&path).unwrap();
        // The txid field of each meta: a flip there breaks only the checksum.
        let txid_at = |m: usize| m * PAGE_SIZE + PAGE_HEADER + 48;

        let mut d = whole.clone();
        d[txid_at(1)] ^= 0x40;
        std::fs::write(&path, &d).unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.txid(), 0, "meta 1 is bad, so meta 0 is used");
        assert_eq!(read_back(&path).unwrap(), buckets);

        d[txid_at(0)] ^= 0x40;
        std::fs::write(&path, &d).unwrap();
        let err = Reader::open(&path).err().expect("both metas bad");
        assert!(matches!(err, ReadError::NotBbolt(_)), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");

        let mut d = whole.clone();
        d[txid_at(0)] ^= 0x40;
        std::fs::write(&path, &d).unwrap();
        assert_eq!(Reader::open(&path).unwrap().txid(), 1);

        std::fs::write(&path, b"SQLite format 3\0 and then some more bytes").unwrap();
        let err = Reader::open(&path).err().expect("not bbolt");
        assert!(err.to_string().starts_with("not a bbolt database"), "{err}");
    }

    /// The root page id of top-level bucket `name`.
    fn bucket_root(path: &Path, name: &[u8]) -> u64 {
        let r = Reader::open(path).unwrap();
        let entry = r
            .root()
            .map(Result::unwrap)
            .find(|e| e.key == name)
            .unwrap();
        u64::from_le_bytes(entry.value[..8].try_into().unwrap())
    }

    #[test]
    fn a_page_reached_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        write_file(&path, &sample());
        let root = bucket_root(&path, b"many");
        let mut d = std::fs::read(&path).unwrap();
        let at = root as usize * PAGE_SIZE;
        assert_eq!(le16(&d, at + 8), BRANCH_PAGE);
        // Point the root's second child at the first child: the same leaf
        // twice. Then at the root itself: a cycle.
        let first_child = d[at + PAGE_HEADER + 8..at + PAGE_HEADER + 16].to_vec();
        let second = at + PAGE_HEADER + ELEMENT + 8;
        d[second..second + 8].copy_from_slice(&first_child);
        std::fs::write(&path, &d).unwrap();
        let err = read_back(&path).expect_err("shared page");
        assert!(err.to_string().contains("reached twice"), "{err}");
        d[second..second + 8].copy_from_slice(&root.to_le_bytes());
        std::fs::write(&path, &d).unwrap();
        let err = read_back(&path).expect_err("cycle");
        assert!(err.to_string().contains("reached twice"), "{err}");
    }

    fn le16(d: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([d[at], d[at + 1]])
    }

    /// Flipping bytes anywhere in the tree pages gives an error or a
    /// (possibly wrong) answer, never a panic or a hang.
    #[test]
    fn corrupt_pages_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut buckets = sample();
        buckets.remove(b"many".as_slice());
        let many: Vec<_> = (0..3_000u64)
            .map(|i| (i.to_be_bytes().to_vec(), vec![b'v'; (i % 50) as usize]))
            .collect();
        buckets.insert(b"many".to_vec(), many);
        write_file(&path, &buckets);
        let whole = std::fs::read(&path).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut errors = 0;
        for _ in 0..400 {
            let mut d = whole.clone();
            for _ in 0..1 + next() % 4 {
                // Mostly headers and element arrays, where damage matters.
                let page = 2 + next() as usize % (d.len() / PAGE_SIZE - 2);
                let within = if next() % 2 == 0 {
                    next() % 64
                } else {
                    next() % 4096
                };
                d[page * PAGE_SIZE + within as usize] = next() as u8;
            }
            std::fs::write(&path, &d).unwrap();
            if read_back(&path).is_err() {
                errors += 1;
            }
        }
        assert!(errors > 50, "only {errors} of 400 corruptions noticed");
    }
}
