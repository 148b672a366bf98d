//! A bulk-load-only writer of bbolt database files (the format etcd keeps its
//! backend in), so a snapshot Tern streams can be read by `etcdctl snapshot
//! status/restore` and by etcd itself.
//!
//! It writes a fresh file from buckets whose keys arrive in ascending order;
//! it never updates a file. Written from the layout of go.etcd.io/bbolt
//! (page.go, node.go, bucket.go, db.go, freelist.go, tx.go).
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
