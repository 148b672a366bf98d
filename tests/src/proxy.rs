//! A fault-injecting TCP proxy for the cross-process tests.
//!
//! This machine has no `tc netem`, so to test a cluster under a slow, lossy
//! or partitioned network the tests put a [`Proxy`] between members: each
//! member is told to reach a peer at `proxy.url()` instead of at the peer's
//! own address, and the test then turns faults on and off while the cluster
//! runs. Peer traffic is gRPC over HTTP/2 on loopback, so the proxy works on
//! the TCP byte stream and never looks inside it.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use tern_tests::proxy::{Direction, Proxy};
//! # let peer: std::net::SocketAddr = "127.0.0.1:2380".parse().unwrap();
//! let proxy = Proxy::start(peer);
//! // ... point a member at proxy.url() ...
//! proxy.set_rtt(Duration::from_millis(100));
//! proxy.set_bandwidth(Direction::Upstream, Some(1 << 20));
//! proxy.blackhole(true); // partition
//! proxy.blackhole(false); // heal: connections held open during it are reset
//! ```
//!
//! # Model
//!
//! Each accepted connection gets its own connection to the target, and each
//! direction ([`Direction::Upstream`]: client to target,
//! [`Direction::Downstream`]: target to client) is a pipeline:
//!
//! * a reader reads chunks of up to 64 KiB, notes when each was read and
//!   queues it;
//! * a writer holds each chunk until `read time + latency + jitter`, then
//!   paces it out at the bandwidth cap, if any, then writes it.
//!
//! Latency and jitter are one-way and apply to every chunk. A chunk's
//! jitter is drawn once, uniformly from `0..jitter`, but its release time is
//! never earlier than the previous chunk's, so bytes within a connection
//! are never reordered (jitter then shows up as bunching, as on a real
//! link that keeps TCP segments in order). Release times are computed from
//! the current settings whenever they change, so a new latency also applies
//! to data already queued.
//!
//! Memory is bounded: the queue between a reader and its writer holds at
//! most [`QUEUE_BYTES`] (plus one chunk being read). When it is full the
//! reader stops reading, the kernel buffers fill, and the sender is pushed
//! back on by TCP flow control, as it would be behind a slow link.
//!
//! Every setting can be changed at any time and takes effect on open
//! connections as well as new ones.
//!
//! # Blackhole (partition)
//!
//! TCP is a byte stream, so the proxy cannot drop "packets" during a
//! partition: dropping bytes from the middle of a stream would corrupt the
//! HTTP/2 framing and the peers would see protocol errors that a real
//! partition never causes. So [`Proxy::blackhole`] does this instead:
//!
//! * while it is on, every connection stops: nothing is read from either
//!   socket and nothing is written, so no byte crosses the proxy and the
//!   senders are eventually blocked by flow control. Connections stay open,
//!   and new connections are still accepted (the kernel would complete the
//!   handshake with the listening socket anyway) but nothing flows on them
//!   either, and the proxy does not even connect them to the target. Data
//!   that was already queued inside the proxy when the blackhole began is
//!   discarded, never delivered.
//! * when it is turned off, every connection that was open at any moment
//!   during the blackhole is reset (RST on both sides), so the peers notice,
//!   reconnect and start clean streams. Connections made after it are
//!   unaffected.
//!
//! That models a partition long enough for the peers' connections to die
//! (keepalive or request timeouts), which is what the cluster's recovery
//! paths have to cope with. A very short outage that TCP would ride out by
//! retransmitting is modelled instead by a large latency ([`Proxy::set_delay`]).
//!
//! # Reset
//!
//! [`Proxy::reset`] aborts every open connection at once with an RST
//! (`SO_LINGER` 0) on both the client and the target side.
//!
//! # Runtime
//!
//! The proxy runs on its own single-threaded tokio runtime on a background
//! thread, so it works the same from a plain `#[test]` and from any flavour
//! of `#[tokio::test]`, and it keeps running even while the test's own
//! runtime is blocked. Dropping the [`Proxy`] stops that runtime and closes
//! every connection.

use std::fmt;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::precise_timer::PreciseTimer;

/// The most one read takes from a socket.
const CHUNK: usize = 64 * 1024;

/// The most bytes queued inside the proxy per direction of a connection
/// (between its reader and its writer), not counting the chunk being read.
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// With a bandwidth cap, data is written in slices worth this much time at
/// the cap (at least one byte, at most one chunk).
const PACING_SLOT: Duration = Duration::from_millis(20);

/// One direction of the proxied traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client (whoever connected to the proxy) to the target.
    Upstream,
    /// From the target back to the client.
    Downstream,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Upstream => 0,
            Direction::Downstream => 1,
        }
    }
}

/// The faults on one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Link {
    latency: Duration,
    jitter: Duration,
    /// Bytes per second; `None` is unlimited, `Some(0)` lets nothing through.
    bandwidth: Option<u64>,
}

/// Everything the tests control, broadcast to every connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Control {
    links: [Link; 2],
    blackhole: bool,
    /// Bumped each time the blackhole goes on: a connection that sees it
    /// change lived through a blackhole.
    blackhole_epoch: u64,
    /// Bumped by each `reset()`.
    reset_epoch: u64,
}

#[derive(Default)]
struct Counters {
    bytes: [AtomicU64; 2],
    connections: AtomicUsize,
}

/// A fault-injecting TCP proxy in front of one target address. See the
/// [module docs](self) for the model.
///
/// All methods take `&self` and may be called from any thread, sync or
/// async, at any time.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    control: watch::Sender<Control>,
    /// Processes whose connections to the proxy get no latency, jitter or
    /// bandwidth cap (see [`Proxy::spare`]).
    spared: Arc<Mutex<Vec<u32>>>,
    counters: Arc<Counters>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on `127.0.0.1:0` and forward every connection to `target`,
    /// with no faults until told otherwise. Panics if it cannot listen.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).expect("proxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("proxy: set_nonblocking");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let (control, control_rx) = watch::channel(Control::default());
        let counters = Arc::new(Counters::default());
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let thread_counters = counters.clone();
        let spared = Arc::new(Mutex::new(Vec::new()));
        let thread_spared = spared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy: build runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("proxy: listener");
                    tokio::select! {
                        _ = accept_loop(listener, target, control_rx, thread_counters, thread_spared) => {}
                        _ = shutdown_rx => {}
                    }
                });
                // Drops every connection task, closing its sockets.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("proxy: spawn thread");
        Proxy {
            addr,
            target,
            control,
            spared,
            counters,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`: the proxy's address as a URL, to give a
    /// member in place of the target's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Set the one-way delay of `direction`: every chunk is held for
    /// `latency` plus a uniformly random `0..jitter`, without reordering
    /// bytes. Also applies to data already queued.
    pub fn set_delay(&self, direction: Direction, latency: Duration, jitter: Duration) {
        self.control.send_if_modified(|c| {
            let link = &mut c.links[direction.index()];
            let old = *link;
            link.latency = latency;
            link.jitter = jitter;
            *link != old
        });
    }

    /// Cap `direction` at `bytes_per_sec` (`None`: unlimited; `Some(0)`:
    /// nothing gets through until the cap is changed).
    pub fn set_bandwidth(&self, direction: Direction, bytes_per_sec: Option<u64>) {
        self.control.send_if_modified(|c| {
            let link = &mut c.links[direction.index()];
            let old = *link;
            link.bandwidth = bytes_per_sec;
            *link != old
        });
    }

    /// Set the latency of both directions to `rtt / 2`, so a round trip
    /// through the proxy takes at least `rtt` longer. Jitter is unchanged.
    pub fn set_rtt(&self, rtt: Duration) {
        let half = rtt / 2;
        self.control.send_if_modified(|c| {
            let old = *c;
            for link in &mut c.links {
                link.latency = half;
            }
            *c != old
        });
    }

    /// Latency, jitter and the bandwidth cap apply to every connection
    /// accepted from now on except those dialed by the processes `pids`
    /// (found at accept through `/proc`: the socket at the connection's
    /// client address belongs to one of them). In front of the voters'
    /// peer URLs, sparing the voters delays only a learner's own
    /// connections to them, so both directions of a learner's link are
    /// delayed whichever side dials. Blackholes and resets apply to all.
    pub fn spare(&self, pids: &[u32]) {
        *self.spared.lock().unwrap_or_else(|e| e.into_inner()) = pids.to_vec();
    }

    /// Partition (`true`) or heal (`false`). While on, nothing flows either
    /// way on any connection, old or new; on healing, every connection that
    /// was open during the blackhole is reset so the peers reconnect. See
    /// the [module docs](self#blackhole-partition) for why.
    pub fn blackhole(&self, on: bool) {
        self.control.send_if_modified(|c| {
            if c.blackhole == on {
                return false;
            }
            c.blackhole = on;
            if on {
                c.blackhole_epoch += 1;
            }
            true
        });
    }

    /// Abort every open connection with an RST on both sides. Returns at
    /// once; the connections are torn down within milliseconds. Connections
    /// still waiting in the listen backlog (not yet accepted) are not
    /// affected.
    pub fn reset(&self) {
        self.control.send_modify(|c| c.reset_epoch += 1);
    }

    /// How many client connections are open through the proxy (accepted
    /// and not yet closed or reset).
    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// How many bytes have been forwarded in `direction` so far (written to
    /// the receiving side), over all connections.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.counters.bytes[direction.index()].load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("control", &*self.control.borrow())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Drop for Proxy {
    /// Stop the proxy's runtime and wait for its thread: every connection
    /// is closed and the listening port released.
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Decrements the open-connection count when a connection task ends (or is
/// dropped by the runtime shutting down).
struct ConnectionGuard(Arc<Counters>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    control: watch::Receiver<Control>,
    counters: Arc<Counters>,
    spared: Arc<Mutex<Vec<u32>>>,
) {
    let mut rng = Rng::from_time(target.port());
    loop {
        match listener.accept().await {
            Ok((client, from)) => {
                let pids = spared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let faulty = pids.is_empty() || !dialed_by(&pids, from);
                counters.connections.fetch_add(1, Ordering::SeqCst);
                let guard = ConnectionGuard(counters.clone());
                // Taken here, not in the task, so a reset() or blackhole
                // right after the accept still catches this connection.
                let start = *control.borrow();
                tokio::spawn(connection(
                    client,
                    target,
                    start,
                    control.clone(),
                    counters.clone(),
                    (rng.next_u64(), faulty),
                    guard,
                ));
            }
            // Out of file descriptors, say: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The faults on direction `d` of a connection: none on a spared one.
fn link_of(control: &mut watch::Receiver<Control>, d: usize, faulty: bool) -> Link {
    let link = control.borrow_and_update().links[d];
    if faulty {
        link
    } else {
        Link::default()
    }
}

/// Whether the TCP socket at `client` (a connection's far end, on this
/// machine) is open in one of the processes `pids`: its inode, from
/// `/proc/net/tcp`, among their file descriptors.
fn dialed_by(pids: &[u32], client: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = client else {
        return false;
    };
    // The kernel prints the address as the host-order value of the
    // network-order word, and the port in hex.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let Some(inode) = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()))
            .then(|| fields.get(9).map(|i| i.to_string()))
            .flatten()
    }) else {
        return false;
    };
    let wanted = format!("socket:[{inode}]");
    pids.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
    })
}

/// Why a connection stopped forwarding before it finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interrupt {
    Reset,
    Blackhole,
}

/// Resolves when a reset or a blackhole has happened since `start`.
async fn interrupted(control: &mut watch::Receiver<Control>, start: &Control) -> Interrupt {
    loop {
        {
            let c = control.borrow_and_update();
            if c.reset_epoch != start.reset_epoch {
                return Interrupt::Reset;
            }
            if c.blackhole || c.blackhole_epoch != start.blackhole_epoch {
                return Interrupt::Blackhole;
            }
        }
        if control.changed().await.is_err() {
            // The proxy is going away; its runtime will drop this task.
            pending::<()>().await;
        }
    }
}

/// Waits for the blackhole to end (or for a reset during it).
async fn hold(control: &mut watch::Receiver<Control>, start: &Control) {
    loop {
        {
            let c = control.borrow_and_update();
            if !c.blackhole || c.reset_epoch != start.reset_epoch {
                return;
            }
        }
        if control.changed().await.is_err() {
            pending::<()>().await;
        }
    }
}

/// Make the socket's close send an RST instead of a FIN. The caller then
/// drops it.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    start: Control,
    mut control: watch::Receiver<Control>,
    counters: Arc<Counters>,
    (seed, faulty): (u64, bool),
    _guard: ConnectionGuard,
) {
    let _ = client.set_nodelay(true);

    let connected = tokio::select! {
        // Checked first: a connection accepted during a blackhole is never
        // connected to the target at all.
        biased;
        why = interrupted(&mut control, &start) => {
            if why == Interrupt::Blackhole {
                hold(&mut control, &start).await;
            }
            abort(&client);
            return;
        }
        r = TcpStream::connect(target) => r,
    };
    let mut server = match connected {
        Ok(server) => server,
        Err(_) => {
            // Target down: the client sees its connection refused-ish.
            abort(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);

    let outcome = {
        let pipes = pipes(
            &mut client,
            &mut server,
            control.clone(),
            &counters,
            (seed, faulty),
        );
        tokio::select! {
            biased;
            why = interrupted(&mut control, &start) => Err(why),
            r = pipes => Ok(r),
        }
    };
    match outcome {
        // Both directions ended with a FIN and were passed on: plain close.
        Ok(Ok(())) => {}
        // A read or write failed (a side reset us, say): pass it on.
        Ok(Err(_)) => {
            abort(&client);
            abort(&server);
        }
        Err(why) => {
            if why == Interrupt::Blackhole {
                // Hold both sockets open, reading nothing, until it heals.
                hold(&mut control, &start).await;
            }
            abort(&client);
            abort(&server);
        }
    }
}

/// Forward both directions until both have ended with a FIN (`Ok`) or one
/// side fails (`Err`).
async fn pipes(
    client: &mut TcpStream,
    server: &mut TcpStream,
    control: watch::Receiver<Control>,
    counters: &Counters,
    (seed, faulty): (u64, bool),
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(
        pump(
            client_read,
            server_write,
            (Direction::Upstream, faulty),
            control.clone(),
            counters,
            Rng::new(seed),
        ),
        pump(
            server_read,
            client_write,
            (Direction::Downstream, faulty),
            control.clone(),
            counters,
            Rng::new(seed ^ 0xa5a5_a5a5_a5a5_a5a5),
        ),
    )?;
    Ok(())
}

/// A chunk queued between a reader and a writer.
struct Chunk {
    data: Vec<u8>,
    read_at: Instant,
    /// This chunk's share of the jitter, in `[0, 1)`.
    jitter: f64,
    /// Returned to the queue's byte budget once the chunk is written.
    _permit: OwnedSemaphorePermit,
}

/// One direction: read, delay, pace, write; then pass the EOF on.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    (direction, faulty): (Direction, bool),
    mut control: watch::Receiver<Control>,
    counters: &Counters,
    mut rng: Rng,
) -> io::Result<()> {
    let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
    // Unbounded in chunks but bounded in bytes by `budget`, so many small
    // chunks in flight under a long latency do not throttle throughput.
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let d = direction.index();

    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(()); // drops `tx`: EOF to the writer
            }
            let read_at = Instant::now();
            let permit = budget
                .clone()
                .acquire_many_owned(n as u32)
                .await
                .expect("budget semaphore is never closed");
            let chunk = Chunk {
                data: buf[..n].to_vec(),
                read_at,
                jitter: rng.next_unit(),
                _permit: permit,
            };
            if tx.send(chunk).is_err() {
                return Ok(()); // the writer failed; try_join reports it
            }
        }
    };

    let writer = async move {
        let timer = PreciseTimer::new()?;
        let mut last_due: Option<Instant> = None;
        let mut next_slot = Instant::now();
        while let Some(chunk) = rx.recv().await {
            // Delay: recomputed whenever the settings change.
            let due = loop {
                let link = link_of(&mut control, d, faulty);
                let mut due = chunk.read_at + link.latency + link.jitter.mul_f64(chunk.jitter);
                if let Some(last) = last_due {
                    due = due.max(last); // never overtake the previous chunk
                }
                if due <= Instant::now() || sleep_or_change(&timer, &mut control, due).await? {
                    break due;
                }
            };
            last_due = Some(due);

            // Pace and write.
            let mut rest = &chunk.data[..];
            while !rest.is_empty() {
                let link = link_of(&mut control, d, faulty);
                match link.bandwidth {
                    None => {
                        to.write_all(rest).await?;
                        counters.bytes[d].fetch_add(rest.len() as u64, Ordering::SeqCst);
                        rest = &[];
                    }
                    Some(0) => {
                        if control.changed().await.is_err() {
                            pending::<()>().await;
                        }
                    }
                    Some(rate) => {
                        let now = Instant::now();
                        let at = next_slot.max(now);
                        if at > now && !sleep_or_change(&timer, &mut control, at).await? {
                            continue;
                        }
                        let slice = ((rate as f64 * PACING_SLOT.as_secs_f64()) as usize)
                            .clamp(1, CHUNK)
                            .min(rest.len());
                        to.write_all(&rest[..slice]).await?;
                        counters.bytes[d].fetch_add(slice as u64, Ordering::SeqCst);
                        next_slot = at + Duration::from_secs_f64(slice as f64 / rate as f64);
                        rest = &rest[slice..];
                    }
                }
            }
        }
        // The reader saw EOF and everything before it is written: pass the
        // half-close on. If the other side is gone, its own direction fails.
        let _ = to.shutdown().await;
        Ok::<(), io::Error>(())
    };

    tokio::try_join!(reader, writer)?;
    Ok(())
}

/// Sleep until `deadline` (`true`) unless the settings change first
/// (`false`). The sleep is to the microsecond ([`PreciseTimer`]), so a
/// delay is the latency set, not that rounded up to tokio's millisecond.
async fn sleep_or_change(
    timer: &PreciseTimer,
    control: &mut watch::Receiver<Control>,
    deadline: Instant,
) -> io::Result<bool> {
    tokio::select! {
        slept = timer.sleep_until(deadline) => slept.map(|()| true),
        changed = control.changed() => {
            if changed.is_err() {
                timer.sleep_until(deadline).await?;
                return Ok(true);
            }
            Ok(false)
        }
    }
}

/// SplitMix64: plenty for jitter, and no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn from_time(salt: u16) -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(nanos ^ (u64::from(salt) << 48))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
