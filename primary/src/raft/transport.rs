//! Sending Raft messages to the other members over gRPC.
//!
//! Each peer gets a task that owns one long-lived `Peer.Send` stream and
//! forwards the node's messages to it in batches (every message waiting
//! when the stream is ready goes in one `RaftBatch`). The node thread never
//! waits on the network: [`Transport::send`] only queues, and a full queue
//! drops the message and tells Raft the peer is unreachable, which is what
//! Raft expects of a lossy network (it resends from the log). A broken
//! stream reconnects with backoff.
//!
//! Snapshots go on their own `Peer.Snapshot` call, the state file read and
//! sent in [`SNAPSHOT_CHUNK`] pieces, so memory stays bounded whatever the
//! state size; the outcome is reported back to Raft. That call has a
//! connection of its own without HTTP/2 keep-alive pings: behind a slow
//! link a ping's answer waits behind all the snapshot data queued ahead
//! of it (up to the receiver's window, 16 MiB: 16 s at 1 MB/s), so a ping
//! timeout would cut every snapshot that takes longer than it, again on
//! every retry, and the member would never catch up. A snapshot that makes
//! no progress for [`SNAPSHOT_STALL`] is abandoned instead.
//!
//! A learner's link (its appends, and its snapshots on their own stream)
//! may run under a bandwidth budget (`--learner-bandwidth-limit`), so one
//! region catching up cannot take the uplink the others share.
//!
//! HTTP/2 flow-control windows are sized for cross-region links: with the
//! default 64 KiB window a 100 ms round trip caps a stream at 640 KiB/s.
//!
//! Each link also feeds etcd's peer network metrics: bytes sent, messages
//! that never left (a full queue, an unreachable peer), and the round trip
//! of a small probe call every [`PROBE_INTERVAL`] on the same connection
//! (etcd's rafthttp probes its peers the same way, off the Raft path).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::node::NodeMsg;
use super::snapshot::snapshot_path;
use crate::metrics::{to_peer, Metrics};
use crate::proto::ternpb::{peer_client::PeerClient, MembersRequest, RaftBatch, SnapshotChunk};
use crate::tls::{DialError, DialTls};

/// Messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Bytes of Raft messages per batch on the stream.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of state file per snapshot chunk.
pub const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// HTTP/2 windows: enough for a 100 ms round trip at ~100 MB/s.
pub const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// How long the peer server waits for a ping's answer. From a member
/// sending a snapshot it queues behind the data ahead of it, up to
/// [`STREAM_WINDOW`]: 60 s lets that drain over links down to ~280 KB/s.
/// Slower links need `--learner-bandwidth-limit` at or below their rate,
/// so the data waits at the sender instead of on the link.
pub const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest gRPC message on the peer service (a batch or a chunk, framed).
pub const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;
/// How often each link measures its round trip.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a snapshot may wait for room to send its next chunk, or,
/// once all is sent, for the receiver's answer (what is still queued must
/// cross first), before it is abandoned and Raft told it failed.
const SNAPSHOT_STALL: Duration = Duration::from_secs(60);

pub struct Transport {
    runtime: tokio::runtime::Handle,
    /// Bytes per second each learner's link may carry (`None`: no limit).
    learner_budget: Option<u64>,
    node: Sender<NodeMsg>,
    peers: Mutex<HashMap<u64, Link>>,
    metrics: Arc<Metrics>,
    /// How `https://` peer URLs are dialed.
    tls: Arc<DialTls>,
}

struct Link {
    urls: Vec<String>,
    /// The bandwidth budget it runs under (a learner's).
    budget: Option<u64>,
    queue: mpsc::Sender<Message>,
}

/// A peer as the transport sees it: id, peer URLs, and whether it is a
/// learner (whose link runs under the learner bandwidth budget).
pub type PeerAddr = (u64, Vec<String>, bool);

impl Transport {
    pub fn new(
        runtime: tokio::runtime::Handle,
        node: Sender<NodeMsg>,
        metrics: Arc<Metrics>,
        tls: Arc<DialTls>,
        learner_budget: Option<u64>,
    ) -> Self {
        Transport {
            runtime,
            learner_budget,
            node,
            peers: Mutex::new(HashMap::new()),
            metrics,
            tls,
        }
    }

    /// Make the set of peers `peers`: new ones get a link, removed ones
    /// lose theirs, changed URLs (or a learner promoted) reconnect.
    pub fn set_peers(&self, peers: &[PeerAddr]) {
        let budget = |learner: bool| self.learner_budget.filter(|_| learner);
        let mut links = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|id, link| {
            peers.iter().any(|(p, urls, learner)| {
                p == id && *urls == link.urls && budget(*learner) == link.budget
            })
        });
        for (id, urls, learner) in peers {
            if links.contains_key(id) || urls.is_empty() {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE);
            self.runtime.spawn(run_link(
                *id,
                urls.clone(),
                rx,
                self.node.clone(),
                self.metrics.clone(),
                (self.tls.clone(), budget(*learner)),
            ));
            links.insert(
                *id,
                Link {
                    urls: urls.clone(),
                    budget: budget(*learner),
                    queue,
                },
            );
        }
    }

    /// Queue messages for their peers; never blocks.
    pub fn send(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let links = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        for m in messages {
            let to = m.to;
            let Some(link) = links.get(&to) else {
                tracing::debug!(
                    to = format!("{to:x}"),
                    "message for an unknown peer dropped"
                );
                continue;
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let urls = link.urls.clone();
                self.runtime.spawn(send_snapshot(
                    to,
                    urls,
                    m,
                    self.node.clone(),
                    self.metrics.clone(),
                    (self.tls.clone(), link.budget),
                ));
                continue;
            }
            if link.queue.try_send(m).is_err() {
                self.metrics
                    .peer_sent_failures
                    .get_or_create(&to_peer(to))
                    .inc();
                let _ = self.node.send(NodeMsg::Unreachable(to));
            }
        }
    }
}

/// A client for the first of `urls` that answers (over TLS for an
/// `https://` URL), with keep-alive pings to notice a dead connection.
pub async fn connect(urls: &[String], tls: &DialTls) -> Result<PeerClient<Channel>, DialError> {
    dial(urls, tls, true).await
}

/// [`connect`], with or without keep-alive pings (see the module docs for
/// why snapshots go without).
async fn dial(
    urls: &[String],
    tls: &DialTls,
    keep_alive: bool,
) -> Result<PeerClient<Channel>, DialError> {
    let mut last = None;
    for url in urls {
        let endpoint = match tls.endpoint(url).await {
            Ok(e) => e,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let mut endpoint = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        if keep_alive {
            endpoint = endpoint
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(10));
        }
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(PeerClient::new(channel)
                    .max_decoding_message_size(MAX_PEER_MESSAGE)
                    .max_encoding_message_size(MAX_PEER_MESSAGE))
            }
            Err(e) => last = Some(e.into()),
        }
    }
    Err(last.expect("a member has at least one peer URL"))
}

async fn run_link(
    id: u64,
    urls: Vec<String>,
    mut queue: mpsc::Receiver<Message>,
    node: Sender<NodeMsg>,
    metrics: Arc<Metrics>,
    (tls, budget): (Arc<DialTls>, Option<u64>),
) {
    let mut pacer = budget.map(Pacer::new);
    let label = to_peer(id);
    let failures = metrics.peer_sent_failures.get_or_create_owned(&label);
    let sent_bytes = metrics.peer_sent_bytes.get_or_create_owned(&label);
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut client = match connect(&urls, &tls).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = format!("{id:x}"), error = %e, "peer unreachable");
                // Whatever queued meanwhile is stale; Raft resends.
                while queue.try_recv().is_ok() {
                    failures.inc();
                }
                if queue.is_closed() {
                    return;
                }
                let _ = node.send(NodeMsg::Unreachable(id));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _probe = AbortOnDrop(tokio::spawn(probe(
            client.clone(),
            metrics.peer_rtt.get_or_create_owned(&label),
        )));
        let (batches, rx) = mpsc::channel::<RaftBatch>(8);
        let mut call = tokio::spawn(async move {
            client
                .send(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        loop {
            tokio::select! {
                m = queue.recv() => {
                    let Some(m) = m else {
                        call.abort();
                        return;
                    };
                    let mut batch = RaftBatch::default();
                    let mut bytes = push(&mut batch, &m);
                    while bytes < MAX_BATCH_BYTES {
                        match queue.try_recv() {
                            Ok(m) => bytes += push(&mut batch, &m),
                            Err(_) => break,
                        }
                    }
                    let count = batch.messages.len() as u64;
                    if let Some(pacer) = &mut pacer {
                        pacer.spend(bytes).await;
                    }
                    if batches.send(batch).await.is_err() {
                        failures.inc_by(count);
                        break;
                    }
                    sent_bytes.inc_by(bytes as u64);
                    backoff = Duration::from_millis(50);
                }
                ended = &mut call => {
                    tracing::debug!(peer = format!("{id:x}"), result = ?ended, "peer stream ended");
                    break;
                }
            }
        }
        call.abort();
        let _ = node.send(NodeMsg::Unreachable(id));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Keeps a link within its bandwidth budget: each send is paid for in
/// time at the budget's rate, with up to [`PACER_BURST`] of credit, so a
/// learner's average never exceeds it and an idle link can still send a
/// small batch at once.
struct Pacer {
    rate: u64,
    /// When everything sent so far is paid for.
    paid_until: Instant,
}

/// Credit a paced link may build up while idle.
const PACER_BURST: Duration = Duration::from_millis(100);

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate: rate.max(1),
            paid_until: Instant::now(),
        }
    }

    /// Wait until `bytes` more fit in the budget.
    async fn spend(&mut self, bytes: usize) {
        let now = Instant::now();
        let start = self
            .paid_until
            .max(now.checked_sub(PACER_BURST).unwrap_or(now));
        self.paid_until = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        if let Some(wait) = self.paid_until.checked_duration_since(now + PACER_BURST) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Aborts a link's helper task when the link's connection ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Measure the round trip to a peer every [`PROBE_INTERVAL`] with its
/// cheapest call (the member list, read from its read pool), on the
/// link's own connection.
async fn probe(
    mut client: PeerClient<Channel>,
    rtt: prometheus_client::metrics::histogram::Histogram,
) {
    loop {
        let started = Instant::now();
        let answered =
            tokio::time::timeout(PROBE_INTERVAL, client.members(MembersRequest {})).await;
        if let Ok(Ok(_)) = answered {
            rtt.observe(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

fn push(batch: &mut RaftBatch, m: &Message) -> usize {
    let bytes = m.write_to_bytes().unwrap_or_default();
    let len = bytes.len();
    batch.messages.push(bytes);
    len
}

fn stalled(sent: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no progress for {SNAPSHOT_STALL:?} after {sent} bytes"),
    )
}

async fn send_snapshot(
    to: u64,
    urls: Vec<String>,
    mut m: Message,
    node: Sender<NodeMsg>,
    metrics: Arc<Metrics>,
    (tls, budget): (Arc<DialTls>, Option<u64>),
) {
    let mut pacer = budget.map(Pacer::new);
    let path = snapshot_path(m.get_snapshot());
    let result = async {
        let mut file = tokio::fs::File::open(&path).await?;
        m.mut_snapshot().data = Default::default();
        let header = m.write_to_bytes().map_err(std::io::Error::other)?;
        let mut client = dial(&urls, &tls, false)
            .await
            .map_err(std::io::Error::other)?;
        let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
        let mut call = tokio::spawn(async move {
            client
                .snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let mut sent = 0usize;
        let mut first = Some(header);
        loop {
            let mut data = vec![0u8; SNAPSHOT_CHUNK];
            let mut filled = 0;
            while filled < data.len() {
                let n = file.read(&mut data[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            data.truncate(filled);
            let done = filled < SNAPSHOT_CHUNK;
            sent += filled;
            if let Some(pacer) = &mut pacer {
                pacer.spend(filled).await;
            }
            let chunk = SnapshotChunk {
                message: first.take().unwrap_or_default(),
                data,
            };
            match tokio::time::timeout(SNAPSHOT_STALL, tx.send(chunk)).await {
                Ok(Ok(())) => {}
                // The call ended: its outcome says why.
                Ok(Err(_)) => break,
                Err(_) => {
                    call.abort();
                    return Err(stalled(sent));
                }
            }
            if done {
                break;
            }
        }
        drop(tx);
        let Ok(answer) = tokio::time::timeout(SNAPSHOT_STALL, &mut call).await else {
            call.abort();
            return Err(stalled(sent));
        };
        answer
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        Ok::<usize, std::io::Error>(sent)
    }
    .await;
    match &result {
        Ok(bytes) => {
            metrics
                .peer_sent_bytes
                .get_or_create(&to_peer(to))
                .inc_by(*bytes as u64);
            tracing::info!(
                to = format!("{to:x}"),
                bytes,
                index = m.get_snapshot().get_metadata().index,
                "snapshot sent"
            )
        }
        Err(e) => {
            metrics.peer_sent_failures.get_or_create(&to_peer(to)).inc();
            tracing::warn!(to = format!("{to:x}"), error = %e, "snapshot failed")
        }
    }
    let _ = node.send(NodeMsg::SnapshotSent {
        to,
        ok: result.is_ok(),
    });
}
