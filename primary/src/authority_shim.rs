//! Accepts HTTP/2 requests whose `:authority` carries a scheme.
//!
//! etcdctl 3.4 (grpc-go of its era) sends `:authority: http://host:port`
//! when an endpoint is given as a URL (`--endpoints http://…`, and every
//! `--cluster` call, which dials the members' client URLs). grpc-go servers,
//! and so etcd, accept that. h2 rejects the request as malformed (the value
//! is not a valid URI authority) before hyper or tonic ever see it, and has
//! no option to relax the check (hyperium/h2#525).
//!
//! [`AuthorityShim`] wraps each accepted client connection and fixes the
//! value on its way in: `scheme://host:port[/…]` becomes `host:port`.
//! Everything else is forwarded unchanged.
//!
//! # What it looks at
//!
//! - Server to client: nothing; writes go straight to the socket.
//! - A connection that does not open with the HTTP/2 client preface (plain
//!   HTTP/1.1) is passed through untouched from its first byte on.
//! - After the preface it follows the frame headers. Frames other than
//!   HEADERS and CONTINUATION pass through: they are read straight into the
//!   caller's (hyper's) buffer and only their 9-byte headers are looked at,
//!   so DATA payloads are neither copied nor scanned.
//! - A header block (a HEADERS frame and its CONTINUATION frames, up to
//!   END_HEADERS) is held back until complete, then HPACK-decoded with a
//!   decoder that mirrors the client's encoder.
//!
//! # Why the two HPACK contexts stay consistent
//!
//! There are two compression contexts to keep right: the client's encoder
//! (E) and h2's decoder (D). The shim's decoder (M) decodes every header
//! block the client sends, in order, so M applies the same insertions,
//! evictions and table size updates as E and always equals it.
//!
//! 1. Until a block needs rewriting, every block is forwarded byte for byte.
//!    D then decodes exactly what E encoded, so D = E = M.
//! 2. From the first block that needs rewriting on, for the rest of the
//!    connection, every block is re-encoded from M's decoded header list,
//!    using only "literal header field without indexing" (or "never
//!    indexed", kept as the client sent it) with a literal name, and no table
//!    size updates. Those representations neither read nor change the
//!    dynamic table (RFC 7541 §6.2.2, §6.2.3). So D's table stays frozen as
//!    it was after phase 1, and nothing ever refers to it again. Each
//!    rewritten block decodes from its own bytes alone, whatever E did to its
//!    table. A block cannot go back to being forwarded unchanged: its indexes
//!    refer to E's table, which D no longer mirrors.
//!
//! The shim gives up when it cannot follow the client: an undecodable
//! block, a block over [`MAX_BLOCK`], a frame other than the expected
//! CONTINUATION inside a header block, or a PUSH_PROMISE or stray
//! CONTINUATION from the client (all of which h2 rejects anyway). In phase 1
//! it then forwards everything unchanged from that point on: h2 sees exactly
//! what it would have seen without the shim. In phase 2 that is no longer
//! possible (D has diverged from E), so the connection is closed with an
//! error, which is what h2 would have done with such a connection anyway.
//!
//! Re-encoded blocks are cut into frames of at most [`MAX_FRAME`] bytes, the
//! SETTINGS_MAX_FRAME_SIZE every HTTP/2 endpoint must accept (and the one
//! tonic's server advertises: it leaves hyper's default). The END_STREAM and
//! PRIORITY (with its fields) of the original HEADERS frame are kept;
//! padding is dropped.
//!
//! # The HPACK decoder
//!
//! `httlib-hpack` decodes (and its Huffman tables are `httlib-huffman`'s).
//! It indexes out of bounds on truncated input, so [`representation_len`]
//! first checks that each representation lies within the block, and the
//! decoder is then handed one whole representation at a time (which also
//! keeps its buffer draining linear in the block size).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, TryStreamExt};
use httlib_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The HTTP/2 client connection preface (RFC 7540 §3.5).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame payload the shim writes: SETTINGS_MAX_FRAME_SIZE's
/// initial value, which every endpoint must accept (RFC 7540 §4.2).
pub const MAX_FRAME: usize = 16_384;

/// The largest header block (all its frames) the shim holds back. h2 itself
/// refuses a block of more than six frames of [`MAX_FRAME`] (its
/// CONTINUATION flood limit at hyper's defaults), so no block h2 would
/// accept is larger.
pub const MAX_BLOCK: usize = 128 * 1024;

/// The dynamic table size limit the client's encoder works under: h2's
/// SETTINGS_HEADER_TABLE_SIZE, which hyper (and so tonic) leaves at the
/// protocol default.
const HEADER_TABLE_SIZE: u32 = 4096;

/// How much the slow path reads at a time while it gathers a frame.
const READ_CHUNK: usize = 8 * 1024;

/// Wraps each connection of an incoming stream in an [`AuthorityShim`].
pub fn wrap<S, IO, E>(incoming: S) -> impl Stream<Item = Result<AuthorityShim<IO>, E>>
where
    S: Stream<Item = Result<IO, E>>,
{
    incoming.map_ok(AuthorityShim::new)
}

/// A client connection whose HTTP/2 `:authority` values lose their scheme
/// on the way in. See the [module docs](self).
pub struct AuthorityShim<IO> {
    io: IO,
    parser: Parser,
    /// Input read from `io` and not yet forwarded: the start of a frame
    /// that is held back (a partial frame header, or a frame of a header
    /// block), and whatever came after it.
    pending: BytesMut,
    /// Output ready for the reader, in order, before anything else.
    out: VecDeque<Bytes>,
    eof: bool,
}

impl<IO> AuthorityShim<IO> {
    pub fn new(io: IO) -> Self {
        AuthorityShim {
            io,
            parser: Parser::default(),
            pending: BytesMut::new(),
            out: VecDeque::new(),
            eof: false,
        }
    }

    /// Forwards what it can of `pending` to `out`, until `pending` is empty
    /// or holds an incomplete frame.
    fn process_pending(&mut self) -> io::Result<()> {
        loop {
            let passed = self.parser.scan(&self.pending);
            if passed > 0 {
                self.out.push_back(self.pending.split_to(passed).freeze());
            }
            if self.pending.is_empty()
                || !self.parser.take_frame(&mut self.pending, &mut self.out)?
            {
                return Ok(());
            }
        }
    }
}

impl<IO: Connected> Connected for AuthorityShim<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityShim<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.out.is_empty() {
                while let Some(chunk) = this.out.front_mut() {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    chunk.advance(n);
                    if !chunk.is_empty() {
                        break;
                    }
                    this.out.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.pending.is_empty() {
                // The fast path: read into the caller's buffer and only
                // look at frame headers. Bytes from a held-back frame on
                // move to `pending`.
                let start = buf.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                let end = buf.filled().len();
                if end == start {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                let passed = this.parser.scan(&buf.filled()[start..]);
                if start + passed < end {
                    this.pending
                        .extend_from_slice(&buf.filled()[start + passed..]);
                    buf.set_filled(start + passed);
                    this.process_pending()?;
                }
                if passed > 0 {
                    return Poll::Ready(Ok(()));
                }
                // Nothing for the caller yet (an empty read would say EOF).
            } else {
                // The slow path: a held-back frame is incomplete.
                let len = this.pending.len();
                this.pending.resize(len + READ_CHUNK, 0);
                let mut chunk = ReadBuf::new(&mut this.pending[len..]);
                let polled = Pin::new(&mut this.io).poll_read(cx, &mut chunk);
                let n = chunk.filled().len();
                this.pending.truncate(len + n);
                ready!(polled)?;
                if n == 0 {
                    this.parser.at_eof(&mut this.pending, &mut this.out);
                    this.eof = true;
                } else {
                    this.process_pending()?;
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

enum Mode {
    /// This many bytes of the preface seen so far.
    Preface(usize),
    /// Following HTTP/2 frames.
    Frames,
    /// Forwarding everything unchanged (not HTTP/2, or gave up in phase 1).
    Raw,
}

/// The client-to-server half of the connection, as far as the shim follows it.
struct Parser {
    mode: Mode,
    /// Payload bytes of a forwarded frame still to come.
    skip: usize,
    /// The header block being gathered.
    block: Option<Block>,
    /// Set up at the first header block.
    hpack: Option<Box<Hpack>>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            mode: Mode::Preface(0),
            skip: 0,
            block: None,
            hpack: None,
        }
    }
}

/// A header block held back until END_HEADERS.
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// Its frames as received, to forward unchanged.
    frames: Vec<Bytes>,
    frames_len: usize,
}

impl Parser {
    fn rewriting(&self) -> bool {
        self.hpack.as_ref().is_some_and(|h| h.rewriting)
    }

    /// How many bytes at the start of `data` (which continues the stream
    /// where the previous call stopped) pass through unchanged. Stops at the
    /// header of a frame that belongs to a header block, at an incomplete
    /// frame header, and anywhere inside a header block.
    fn scan(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            match self.mode {
                Mode::Raw => return data.len(),
                Mode::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(data.len() - pos);
                    if data[pos..pos + n] != PREFACE[seen..seen + n] {
                        self.mode = Mode::Raw;
                        return data.len();
                    }
                    pos += n;
                    if seen + n < PREFACE.len() {
                        self.mode = Mode::Preface(seen + n);
                        return pos;
                    }
                    self.mode = Mode::Frames;
                }
                Mode::Frames if self.skip > 0 => {
                    let n = self.skip.min(data.len() - pos);
                    self.skip -= n;
                    pos += n;
                    if self.skip > 0 {
                        return pos;
                    }
                }
                Mode::Frames => {
                    let rest = &data[pos..];
                    if self.block.is_some()
                        || rest.len() < FRAME_HEADER_LEN
                        || matches!(rest[3], HEADERS | PUSH_PROMISE | CONTINUATION)
                    {
                        return pos;
                    }
                    self.skip = FRAME_HEADER_LEN + payload_len(rest);
                }
            }
        }
    }

    /// Handles the held-back frame at the start of `pending`. Returns false
    /// if it is not complete yet.
    fn take_frame(
        &mut self,
        pending: &mut BytesMut,
        out: &mut VecDeque<Bytes>,
    ) -> io::Result<bool> {
        if pending.len() < FRAME_HEADER_LEN {
            return Ok(false);
        }
        let kind = pending[3];
        let flags = pending[4];
        let stream_id =
            u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]]) & 0x7fff_ffff;
        let expected = match &self.block {
            Some(block) => kind == CONTINUATION && stream_id == block.stream_id,
            None => kind == HEADERS,
        };
        let total = FRAME_HEADER_LEN + payload_len(pending);
        let held = self.block.as_ref().map_or(0, |b| b.frames_len);
        if !expected || held + total > MAX_BLOCK {
            self.give_up(out)?;
            return Ok(true);
        }
        if pending.len() < total {
            pending.reserve(total - pending.len());
            return Ok(false);
        }
        let frame = pending.split_to(total).freeze();
        let payload = &frame[FRAME_HEADER_LEN..];
        let mut block = match self.block.take() {
            Some(mut block) => {
                block.fragment.extend_from_slice(payload);
                block
            }
            None => {
                let Some((priority, fragment)) = headers_fragment(flags, payload) else {
                    // Malformed padding: h2 refuses the connection.
                    self.give_up(out)?;
                    out.push_back(frame);
                    return Ok(true);
                };
                Block {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    frames: Vec::with_capacity(1),
                    frames_len: 0,
                }
            }
        };
        block.frames_len += frame.len();
        block.frames.push(frame);
        if flags & END_HEADERS == 0 {
            self.block = Some(block);
        } else {
            self.finish_block(block, out)?;
        }
        Ok(true)
    }

    /// Forwards a complete header block, rewritten if need be.
    fn finish_block(&mut self, block: Block, out: &mut VecDeque<Bytes>) -> io::Result<()> {
        let hpack = self.hpack.get_or_insert_with(Default::default);
        match hpack.decode(&block.fragment) {
            Some(false) if !hpack.rewriting => out.extend(block.frames),
            Some(_) => {
                hpack.rewriting = true;
                let fragment = hpack.encode()?;
                out.push_back(frame_block(&block, fragment));
            }
            None if !hpack.rewriting => {
                out.extend(block.frames);
                self.mode = Mode::Raw;
            }
            None => return Err(invalid_data("undecodable HPACK header block")),
        }
        Ok(())
    }

    /// Stops following the connection: forwards the held-back frames and
    /// everything after them unchanged. Impossible once blocks have been
    /// rewritten.
    fn give_up(&mut self, out: &mut VecDeque<Bytes>) -> io::Result<()> {
        if self.rewriting() {
            return Err(invalid_data("HTTP/2 header block the shim cannot follow"));
        }
        if let Some(block) = self.block.take() {
            out.extend(block.frames);
        }
        self.mode = Mode::Raw;
        Ok(())
    }

    /// The client closed the connection with `pending` unforwarded.
    fn at_eof(&mut self, pending: &mut BytesMut, out: &mut VecDeque<Bytes>) {
        if self.rewriting() {
            // A partial rewritten block is of no use to anyone.
            pending.clear();
            self.block = None;
            return;
        }
        if let Some(block) = self.block.take() {
            out.extend(block.frames);
        }
        if !pending.is_empty() {
            out.push_back(pending.split().freeze());
        }
    }
}

/// The HPACK state of one connection.
struct Hpack {
    /// Mirrors the client's encoder.
    decoder: Decoder<'static>,
    /// Never indexes, so its table stays empty.
    encoder: Encoder<'static>,
    /// Whether blocks are being re-encoded (phase 2).
    rewriting: bool,
    /// The decoded header list of the current block: name, value, flags.
    fields: Vec<(Vec<u8>, Vec<u8>, u8)>,
    /// One representation, as the decoder wants it.
    representation: Vec<u8>,
    encoded: Vec<u8>,
}

impl Default for Hpack {
    fn default() -> Self {
        Hpack {
            decoder: Decoder::with_dynamic_size(HEADER_TABLE_SIZE),
            encoder: Encoder::with_dynamic_size(0),
            rewriting: false,
            fields: Vec::new(),
            representation: Vec::new(),
            encoded: Vec::new(),
        }
    }
}

impl Hpack {
    /// Decodes a header block into `fields` and fixes its `:authority`.
    /// Returns whether it needed fixing, or None if the block is not valid
    /// HPACK.
    fn decode(&mut self, mut block: &[u8]) -> Option<bool> {
        self.fields.clear();
        while !block.is_empty() {
            let n = representation_len(block)?;
            self.representation.clear();
            self.representation.extend_from_slice(&block[..n]);
            self.decoder
                .decode(&mut self.representation, &mut self.fields)
                .ok()?;
            block = &block[n..];
        }
        let mut fixed = false;
        for (name, value, _) in &mut self.fields {
            if name.as_slice() == b":authority" {
                if let Some(range) = authority_without_scheme(value) {
                    value.truncate(range.end);
                    value.drain(..range.start);
                    fixed = true;
                }
            }
        }
        Some(fixed)
    }

    /// Encodes `fields` without touching any dynamic table.
    fn encode(&mut self) -> io::Result<&[u8]> {
        self.encoded.clear();
        for (name, value, flags) in self.fields.drain(..) {
            // Literal name and value, no Huffman, never with indexing.
            let flags = if flags & Decoder::NEVER_INDEXED != 0 {
                Encoder::NEVER_INDEXED
            } else {
                0
            };
            self.encoder
                .encode((name, value, flags), &mut self.encoded)
                .map_err(|e| invalid_data(&format!("HPACK encoding: {e}")))?;
        }
        Ok(&self.encoded)
    }
}

/// The header block fragment of a HEADERS frame payload, and its priority
/// fields. None if the padding does not fit.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&n, after) = rest.split_first()?;
        padding = usize::from(n);
        rest = after;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, after) = rest.split_first_chunk::<5>()?;
        priority = Some(*fields);
        rest = after;
    }
    let len = rest.len().checked_sub(padding)?;
    Some((priority, &rest[..len]))
}

/// HEADERS (and CONTINUATION frames) carrying `fragment` for `block`'s
/// stream, with its END_STREAM and PRIORITY.
fn frame_block(block: &Block, fragment: &[u8]) -> Bytes {
    let frames = 1 + fragment.len() / MAX_FRAME;
    let mut out = BytesMut::with_capacity(fragment.len() + frames * FRAME_HEADER_LEN + 5);
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first = fragment.len().min(MAX_FRAME - priority_len);
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if first == fragment.len() {
        flags |= END_HEADERS;
    }
    put_frame_header(
        &mut out,
        priority_len + first,
        HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(priority) = &block.priority {
        out.put_slice(priority);
    }
    out.put_slice(&fragment[..first]);
    let mut rest = &fragment[first..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        put_frame_header(&mut out, n, CONTINUATION, flags, block.stream_id);
        out.put_slice(&rest[..n]);
        rest = &rest[n..];
    }
    out.freeze()
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    debug_assert!(len <= MAX_FRAME);
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

/// The payload length in a frame header.
fn payload_len(header: &[u8]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// The length of the header field representation (or table size update)
/// at the start of `block`, or None if it does not fit in `block` or uses
/// an integer the decoder does not support (RFC 7541 §6).
fn representation_len(block: &[u8]) -> Option<usize> {
    let first = *block.first()?;
    let (prefix, literal) = if first & 0x80 != 0 {
        (7, false) // indexed
    } else if first & 0x40 != 0 {
        (6, true) // literal with incremental indexing
    } else if first & 0x20 != 0 {
        (5, false) // dynamic table size update
    } else {
        (4, true) // literal without indexing, or never indexed
    };
    let (index, mut len) = integer(block, prefix)?;
    if literal {
        if index == 0 {
            len += string_len(&block[len..])?;
        }
        len += string_len(&block[len..])?;
    }
    Some(len)
}

/// The length of the string literal at the start of `buf` (RFC 7541 §5.2).
fn string_len(buf: &[u8]) -> Option<usize> {
    let (len, prefix) = integer(buf, 7)?;
    let total = prefix.checked_add(usize::try_from(len).ok()?)?;
    (total <= buf.len()).then_some(total)
}

/// An integer with an N-bit prefix (RFC 7541 §5.1) and its encoded length,
/// in at most five octets (the decoder's limit).
fn integer(buf: &[u8], prefix: u32) -> Option<(u64, usize)> {
    let mask = (1u64 << prefix) - 1;
    let mut value = u64::from(*buf.first()?) & mask;
    if value < mask {
        return Some((value, 1));
    }
    for (i, &byte) in buf.iter().enumerate().skip(1).take(4) {
        value += u64::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Where the authority proper is in `scheme://authority[/…]`, if the value
/// has a scheme.
fn authority_without_scheme(value: &[u8]) -> Option<std::ops::Range<usize>> {
    let sep = value.windows(3).position(|w| w == b"://")?;
    let scheme = &value[..sep];
    let valid_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'));
    let start = sep + 3;
    let end = value[start..]
        .iter()
        .position(|&c| c == b'/')
        .map_or(value.len(), |i| start + i);
    (valid_scheme && end > start).then_some(start..end)
}

fn invalid_data(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;

    /// Indexes everything it can, as grpc-go's encoder does.
    const INDEXING: u8 = Encoder::WITH_INDEXING
        | Encoder::BEST_FORMAT
        | Encoder::HUFFMAN_NAME
        | Encoder::HUFFMAN_VALUE;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, payload.len(), kind, flags, stream_id);
        out.put_slice(payload);
        out.to_vec()
    }

    fn encode(encoder: &mut Encoder<'static>, fields: &[(&str, &str)], flags: u8) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            let field = (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags);
            encoder.encode(field, &mut block).unwrap();
        }
        block
    }

    fn request(path: &str, authority: &str, timeout: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "POST".into()),
            (":scheme", "http".into()),
            (":path", path.into()),
            (":authority", authority.into()),
            ("content-type", "application/grpc".into()),
            ("user-agent", "grpc-go/1.26.0".into()),
            ("te", "trailers".into()),
            ("grpc-timeout", timeout.into()),
        ]
    }

    fn fields<'a>(request: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        request.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    /// What a client sends, and what h2 must make of it.
    struct Conversation {
        bytes: Vec<u8>,
        /// Per request: path, grpc-timeout, body.
        expected: Vec<(String, String, Vec<u8>)>,
    }

    /// Requests from a client whose encoder indexes everything (so later
    /// requests refer to its dynamic table), with `authority` from the
    /// second request on. The first request has a plain authority, so h2's
    /// table holds the client's entries when rewriting starts. Covers a
    /// table size update, PADDED and PRIORITY, CONTINUATION frames, DATA
    /// between header blocks, and a header block larger than a frame.
    fn conversation(authority: &str) -> Conversation {
        let mut encoder = Encoder::with_dynamic_size(HEADER_TABLE_SIZE);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[]));
        let mut expected = Vec::new();
        for i in 0..8u32 {
            let stream_id = 2 * i + 1;
            let path = format!("/etcdserverpb.KV/Range{}", i % 3);
            let timeout = format!("{}m", 4999 - i);
            let mut request = request(
                &path,
                if i == 0 { "127.0.0.1:2379" } else { authority },
                &timeout,
            );
            if i == 6 {
                request.push(("x-big", "v".repeat(40_000)));
            }
            let mut block = Vec::new();
            if i == 4 {
                // Shrink the table (evicting entries), then grow it back.
                encoder.update_max_dynamic_size(100, &mut block).unwrap();
                encoder
                    .update_max_dynamic_size(HEADER_TABLE_SIZE, &mut block)
                    .unwrap();
            }
            block.extend(encode(&mut encoder, &fields(&request), INDEXING));
            let body = format!("body {i}").into_bytes();
            match i {
                3 => {
                    // PADDED and PRIORITY, then two CONTINUATION frames.
                    let (a, rest) = block.split_at(3);
                    let (b, c) = rest.split_at(rest.len() / 2);
                    let mut payload = vec![4];
                    payload.extend([0, 0, 0, 0, 15]);
                    payload.extend(a);
                    payload.extend([0; 4]);
                    bytes.extend(frame(HEADERS, PADDED | PRIORITY, stream_id, &payload));
                    bytes.extend(frame(CONTINUATION, 0, stream_id, b));
                    bytes.extend(frame(CONTINUATION, END_HEADERS, stream_id, c));
                }
                6 => {
                    let mut chunks = block.chunks(MAX_FRAME).peekable();
                    bytes.extend(frame(HEADERS, 0, stream_id, chunks.next().unwrap()));
                    while let Some(chunk) = chunks.next() {
                        let flags = if chunks.peek().is_none() {
                            END_HEADERS
                        } else {
                            0
                        };
                        bytes.extend(frame(CONTINUATION, flags, stream_id, chunk));
                    }
                }
                _ => bytes.extend(frame(HEADERS, END_HEADERS, stream_id, &block)),
            }
            bytes.extend(frame(DATA, END_STREAM, stream_id, &body));
            expected.push((path, timeout, body));
        }
        Conversation { bytes, expected }
    }

    /// Feeds `client` through the shim to an h2 server and checks every
    /// request arrives as meant, with `127.0.0.1:2379` as its authority.
    async fn serve(conversation: Conversation) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            client.write_all(&conversation.bytes).await.unwrap();
            // Drain what the server says.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        });
        let mut connection = h2::server::handshake(AuthorityShim::new(server))
            .await
            .unwrap();
        let mut bigs = 0;
        let mut bodies = Vec::new();
        for (path, timeout, body) in conversation.expected {
            let (request, _respond) = connection.accept().await.unwrap().unwrap();
            assert_eq!(request.method(), "POST");
            assert_eq!(request.uri().scheme_str(), Some("http"));
            assert_eq!(request.uri().authority().unwrap(), "127.0.0.1:2379");
            assert_eq!(request.uri().path(), path);
            let headers = request.headers();
            assert_eq!(headers["grpc-timeout"], timeout.as_str());
            assert_eq!(headers["user-agent"], "grpc-go/1.26.0");
            assert_eq!(headers["content-type"], "application/grpc");
            if let Some(big) = headers.get("x-big") {
                assert_eq!(big.len(), 40_000);
                bigs += 1;
            }
            bodies.push((request.into_body(), body));
        }
        assert_eq!(bigs, 1);
        // Bodies arrive while the connection is driven.
        let driver = tokio::spawn(async move { while connection.accept().await.is_some() {} });
        for (mut stream, body) in bodies {
            let data = stream.data().await.unwrap().unwrap();
            assert_eq!(&data[..], body);
        }
        driver.abort();
        writer.abort();
    }

    #[tokio::test]
    async fn rewrites_an_authority_with_a_scheme() {
        serve(conversation("http://127.0.0.1:2379")).await;
        serve(conversation("https://127.0.0.1:2379/")).await;
    }

    #[tokio::test]
    async fn plain_authorities_pass_unchanged() {
        serve(conversation("127.0.0.1:2379")).await;
        let bytes = conversation("127.0.0.1:2379").bytes;
        assert_eq!(through(&bytes, &[usize::MAX], 64 * 1024).await, bytes);
    }

    #[tokio::test]
    async fn http1_passes_unchanged() {
        let request = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1:2379\r\n\r\n".repeat(3);
        assert_eq!(through(&request, &[usize::MAX], 64 * 1024).await, request);
        assert_eq!(through(&request, &[1, 2, 5], 3).await, request);
        // Starts like the preface, then isn't.
        let almost = b"PRI * HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(through(&almost, &[1], 7).await, almost);
    }

    #[tokio::test]
    async fn output_does_not_depend_on_how_input_is_split() {
        let bytes = conversation("http://127.0.0.1:2379").bytes;
        let whole = through(&bytes, &[usize::MAX], 64 * 1024).await;
        assert_ne!(whole, bytes);
        for (reads, buf) in [
            (&[1usize][..], 1),
            (&[1, 2, 3, 5, 7, 11, 13][..], 7),
            (&[9, 4096][..], 9),
            (&[30_000][..], 100_000),
            (&[3][..], 8192),
        ] {
            assert_eq!(through(&bytes, reads, buf).await, whole, "{reads:?} {buf}");
        }
    }

    #[tokio::test]
    async fn a_rewriting_connection_closes_on_a_frame_it_cannot_follow() {
        let mut bytes = conversation("http://127.0.0.1:2379").bytes;
        bytes.extend(frame(HEADERS, 0, 101, &[0x82]));
        bytes.extend(frame(DATA, 0, 101, b"not a CONTINUATION"));
        let mut shim = AuthorityShim::new(Chunks::new(&bytes, &[usize::MAX]));
        let mut out = Vec::new();
        let error = shim.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn gives_up_unchanged_on_what_it_cannot_follow() {
        let mut bytes = conversation("127.0.0.1:2379").bytes;
        // A truncated representation, then a request it would rewrite.
        bytes.extend(frame(HEADERS, END_HEADERS, 101, &[0x82, 0x41, 0x7f]));
        let mut encoder = Encoder::with_dynamic_size(HEADER_TABLE_SIZE);
        let request = request("/p", "http://127.0.0.1:2379", "1m");
        let block = encode(&mut encoder, &fields(&request), 0);
        bytes.extend(frame(HEADERS, END_HEADERS, 103, &block));
        assert_eq!(through(&bytes, &[usize::MAX], 64 * 1024).await, bytes);
    }

    /// Reads all of `bytes` through the shim, the shim's input arriving in
    /// reads of the sizes in `reads` (cycled) and its output taken `buf`
    /// bytes at a time.
    async fn through(bytes: &[u8], reads: &[usize], buf: usize) -> Vec<u8> {
        let mut shim = AuthorityShim::new(Chunks::new(bytes, reads));
        let mut out = Vec::new();
        let mut chunk = vec![0; buf.min(1 << 20)];
        loop {
            let n = shim.read(&mut chunk).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    /// Hands out its bytes in reads of the given sizes.
    struct Chunks {
        bytes: Vec<u8>,
        pos: usize,
        reads: Vec<usize>,
        next: usize,
    }

    impl Chunks {
        fn new(bytes: &[u8], reads: &[usize]) -> Chunks {
            Chunks {
                bytes: bytes.to_vec(),
                pos: 0,
                reads: reads.to_vec(),
                next: 0,
            }
        }
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let size = this.reads[this.next % this.reads.len()];
            this.next += 1;
            let n = size.min(buf.remaining()).min(this.bytes.len() - this.pos);
            buf.put_slice(&this.bytes[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn finds_the_authority_after_a_scheme() {
        let cases: &[(&str, Option<&str>)] = &[
            ("http://127.0.0.1:2379", Some("127.0.0.1:2379")),
            ("https://example.com:443/", Some("example.com:443")),
            ("unix+x.y-z://host/path/more", Some("host")),
            ("127.0.0.1:2379", None),
            ("localhost", None),
            ("://host", None),
            ("1http://host", None),
            ("http://", None),
            ("http:///path", None),
        ];
        for (value, expected) in cases {
            let got = authority_without_scheme(value.as_bytes()).map(|r| &value[r]);
            assert_eq!(got, *expected, "{value}");
        }
    }

    #[test]
    fn splits_representations_within_bounds_only() {
        assert_eq!(representation_len(&[0x82, 0x86]), Some(1));
        // Literal with incremental indexing, new name "a", value "b".
        assert_eq!(representation_len(&[0x40, 1, b'a', 1, b'b', 0x82]), Some(5));
        // Indexed name 1 (:authority), value of 2 bytes.
        assert_eq!(representation_len(&[0x01, 2, b'a', b'b']), Some(4));
        assert_eq!(representation_len(&[0x3f, 0xe1, 0x1f]), Some(3)); // size update 4096
        for truncated in [
            &[][..],
            &[0xff],
            &[0xff, 0x80],
            &[0x40],
            &[0x40, 1, b'a'],
            &[0x40, 1, b'a', 2, b'b'],
            &[0x01],
            &[0x10, 0x7f, 0x80],
            &[0x7f, 0x80, 0x80, 0x80, 0x80, 0x01], // more than five octets
        ] {
            assert_eq!(representation_len(truncated), None, "{truncated:?}");
        }
    }

    #[test]
    fn decoding_truncated_blocks_does_not_panic() {
        let request = request("/p", "http://127.0.0.1:2379", "1m");
        for flags in [INDEXING, Encoder::HUFFMAN_VALUE, Encoder::NEVER_INDEXED] {
            let mut encoder = Encoder::with_dynamic_size(HEADER_TABLE_SIZE);
            let mut block = Vec::new();
            encoder.update_max_dynamic_size(4000, &mut block).unwrap();
            block.extend(encode(&mut encoder, &fields(&request), flags));
            for cut in 0..block.len() {
                // Valid at field boundaries, None elsewhere; never a panic.
                Hpack::default().decode(&block[..cut]);
            }
            let mut hpack = Hpack::default();
            assert_eq!(hpack.decode(&block), Some(true));
            let authority = hpack.fields.iter().find(|f| f.0 == b":authority");
            assert_eq!(authority.unwrap().1, b"127.0.0.1:2379");
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_blocks_does_not_panic(
            blocks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 1..8)
        ) {
            let mut hpack = Hpack::default();
            for block in blocks {
                if hpack.decode(&block).is_some() {
                    hpack.encode().unwrap();
                }
            }
        }
    }
}
