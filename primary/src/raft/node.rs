//! The Raft node loop.
//!
//! One dedicated thread owns everything that must change in step: the
//! raft-rs `RawNode`, the durable log and the MVCC writer. Handlers talk to
//! it through a channel ([`NodeHandle`]). Each turn of the loop:
//!
//! 1. waits for a message or the next tick, then drains every queued
//!    message: all proposals that arrived meanwhile go into one round;
//! 2. ticks the Raft clock when due, and asks for one read index on behalf
//!    of every linearizable read that arrived (reads are batched too);
//! 3. handles `Ready` in raft-rs's order ([`RaftNode::on_ready`]): send
//!    messages, apply committed entries, append entries and hard state with
//!    one fsync, send persisted messages, advance, apply what the light
//!    ready committed, release reads whose index is applied.
//!
//! A single voter uses exactly this path; a cluster only adds a transport.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

use super::log_store::{LogError, LogStore};
use crate::apply::{Applier, ApplyError, ApplyResult};
use crate::lease::Lessor;
use crate::metrics::Metrics;
use crate::mvcc::{MvccError, MvccStore};
use crate::proto::ternpb::{raft_request::Request, RaftRequest};
use crate::watch::WatchHub;

/// Entries kept behind the applied index at log compaction, so a follower
/// slightly behind catches up from the log (etcd's SnapshotCatchUpEntries).
const CATCH_UP_ENTRIES: u64 = 5000;
/// Messages drained per turn, bounding one round's batch.
const MAX_BATCH: usize = 4096;

/// Why a proposal or read did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader")]
    NoLeader,
    #[error("server stopped")]
    Stopped,
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// Requests from the async side to the node thread.
pub enum NodeMsg {
    Propose {
        request: Request,
        reply: oneshot::Sender<Result<ApplyResult, ProposeError>>,
    },
    /// Linearizable read barrier: replies once the state machine has applied
    /// everything committed when the read arrived.
    ReadIndex {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// Rebuild the state file (etcd's defragment); blocks writes meanwhile.
    Defragment {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Raft and store counters the API reads without asking the thread.
#[derive(Debug, Default)]
pub struct NodeStatus {
    pub term: AtomicU64,
    pub leader: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    pub last_index: AtomicU64,
    pub revision: AtomicI64,
    pub compact_revision: AtomicI64,
}

impl NodeStatus {
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Acquire)
    }
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }
}

/// The async side's handle on the node thread.
#[derive(Clone)]
pub struct NodeHandle {
    tx: Sender<NodeMsg>,
    pub status: Arc<NodeStatus>,
}

impl NodeHandle {
    pub async fn propose(&self, request: Request) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Propose { request, reply })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    pub async fn read_index(&self) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::ReadIndex { reply })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    pub async fn defragment(&self) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Defragment { reply })
            .map_err(|_| "server stopped".to_string())?;
        rx.await.map_err(|_| "server stopped".to_string())?
    }
}

/// A failure that stops the node: the log or the state cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] MvccError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("applying entry {index}: {source}")]
    Apply { index: u64, source: ApplyError },
}

/// Settings the node needs from the member's configuration.
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub snapshot_count: u64,
}

type Reply = oneshot::Sender<Result<ApplyResult, ProposeError>>;
type ReadReply = oneshot::Sender<Result<(), ProposeError>>;

pub struct RaftNode {
    config: NodeConfig,
    raw: RawNode<LogStore>,
    store: MvccStore,
    applier: Applier,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    metrics: Arc<Metrics>,
    status: Arc<NodeStatus>,
    rx: Receiver<NodeMsg>,
    seq: u64,
    /// Proposals in the log, waiting for their entry to apply.
    waiting: HashMap<u64, Reply>,
    /// Proposals waiting for a leader (sequence, encoded entry, reply);
    /// retried each turn.
    held: Vec<(u64, Vec<u8>, Reply)>,
    /// Reads that arrived since the last read index request.
    reads_next: Vec<ReadReply>,
    /// Read index requests in flight, by context.
    reads_inflight: HashMap<u64, Vec<ReadReply>>,
    /// Reads whose index is known, waiting for it to be applied.
    reads_ready: Vec<(u64, Vec<ReadReply>)>,
    read_ctx: u64,
    role: StateRole,
}

impl RaftNode {
    /// Build the node; `start` runs it on its own thread.
    pub fn new(
        config: NodeConfig,
        mut log: LogStore,
        store: MvccStore,
        hub: Arc<WatchHub>,
        lessor: Arc<Lessor>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, NodeHandle), NodeError> {
        let state = store.state();
        // Every applied entry was committed; the persisted commit index may
        // lag because light-ready commits are persisted lazily.
        let mut hs = log.hard_state().clone();
        if hs.commit < state.applied_index {
            hs.commit = state.applied_index;
            log.persist(&[], Some(&hs))?;
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: 1,
            applied: state.applied_index,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw = RawNode::new(&raft_config, log, &logger)?;
        // A lone voter need not wait an election timeout to lead.
        let conf = raw.store().conf_state().clone();
        if conf.voters == vec![config.id] {
            raw.campaign()?;
        }
        let applier = Applier::new(lessor.clone(), store.connection())?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let status = Arc::new(NodeStatus::default());
        status.revision.store(state.revision, Ordering::Release);
        status
            .compact_revision
            .store(state.compact_revision, Ordering::Release);
        status
            .applied_index
            .store(state.applied_index, Ordering::Release);
        let handle = NodeHandle {
            tx,
            status: status.clone(),
        };
        Ok((
            RaftNode {
                config,
                raw,
                store,
                applier,
                hub,
                lessor,
                metrics,
                status,
                rx,
                seq: boot_sequence(),
                waiting: HashMap::new(),
                held: Vec::new(),
                reads_next: Vec::new(),
                reads_inflight: HashMap::new(),
                reads_ready: Vec::new(),
                read_ctx: 0,
                role: StateRole::Follower,
            },
            handle,
        ))
    }

    /// Run the loop on a dedicated thread. A storage failure ends the
    /// process: going on could acknowledge writes that are not durable.
    pub fn start(self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || {
                if let Err(e) = self.run() {
                    tracing::error!(error = %e, "raft node stopped; exiting");
                    std::process::exit(1);
                }
            })
            .expect("spawn raft thread")
    }

    fn run(mut self) -> Result<(), NodeError> {
        let mut next_tick = Instant::now() + self.config.tick;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(msg) => {
                    self.handle(msg)?;
                    for _ in 0..MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(msg) => self.handle(msg)?,
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + self.config.tick;
            }
            self.retry_held();
            self.request_read_index();
            self.on_ready()?;
            self.maybe_compact_log()?;
        }
    }

    fn handle(&mut self, msg: NodeMsg) -> Result<(), NodeError> {
        match msg {
            NodeMsg::Propose { request, reply } => self.propose(request, reply),
            NodeMsg::ReadIndex { reply } => self.reads_next.push(reply),
            NodeMsg::Defragment { reply } => {
                let result = self.store.vacuum().map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    fn propose(&mut self, request: Request, reply: Reply) {
        self.seq += 1;
        let data = RaftRequest {
            origin: self.config.id,
            seq: self.seq,
            request: Some(request),
        }
        .encode_to_vec();
        self.propose_encoded(self.seq, data, reply);
    }

    fn propose_encoded(&mut self, seq: u64, data: Vec<u8>, reply: Reply) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            self.held.push((seq, data, reply));
            return;
        }
        // raft-rs takes the data by value and drops it on refusal; a copy is
        // kept only while there is no leader, the one case that retries.
        match self.raw.propose(vec![], data) {
            Ok(()) => {
                self.metrics.proposals_pending.inc();
                self.waiting.insert(seq, reply);
            }
            Err(e) => {
                tracing::warn!(error = %e, "proposal refused");
                self.metrics.proposals_failed.inc();
                let _ = reply.send(Err(ProposeError::NoLeader));
            }
        }
    }

    fn retry_held(&mut self) {
        if self.held.is_empty() || self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        for (seq, data, reply) in std::mem::take(&mut self.held) {
            if !reply.is_closed() {
                self.propose_encoded(seq, data, reply);
            }
        }
    }

    fn request_read_index(&mut self) {
        if self.reads_next.is_empty() || self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        self.read_ctx += 1;
        self.raw.read_index(self.read_ctx.to_be_bytes().to_vec());
        self.reads_inflight
            .insert(self.read_ctx, std::mem::take(&mut self.reads_next));
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        // Snapshots from a leader arrive with the peer transport.
        self.apply(ready.take_committed_entries())?;
        for rs in ready.take_read_states() {
            let ctx = rs
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some(waiters) = self.reads_inflight.remove(&ctx) {
                self.reads_ready.push((rs.index, waiters));
            }
        }
        let started = Instant::now();
        self.raw.mut_store().persist(ready.entries(), ready.hs())?;
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.metrics
                .wal_fsync
                .observe(started.elapsed().as_secs_f64());
        }
        self.status
            .last_index
            .store(self.raw.raft.raft_log.last_index(), Ordering::Release);
        self.send(ready.take_persisted_messages());
        if ready.ss().is_some() {
            self.on_role_change();
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.status
            .commit_index
            .store(self.raw.raft.raft_log.committed, Ordering::Release);
        self.release_reads();
        Ok(())
    }

    /// Peer messages; a lone voter has nobody to send to.
    fn send(&mut self, messages: Vec<Message>) {
        if !messages.is_empty() {
            tracing::trace!(
                count = messages.len(),
                "no peer transport; dropping messages"
            );
        }
    }

    fn on_role_change(&mut self) {
        let leader = self.raw.raft.leader_id;
        let role = self.raw.raft.state;
        let term = self.raw.raft.term;
        let previous = self.status.leader.swap(leader, Ordering::AcqRel);
        self.status.term.store(term, Ordering::Release);
        if previous != leader && leader != raft::INVALID_ID {
            self.metrics.leader_changes.inc();
            tracing::info!(leader = format!("{leader:x}"), term, "leader elected");
        }
        self.metrics
            .has_leader
            .set(i64::from(leader != raft::INVALID_ID));
        self.metrics
            .is_leader
            .set(i64::from(role == StateRole::Leader));
        if role == StateRole::Leader && self.role != StateRole::Leader {
            self.lessor.refresh_all();
        }
        self.role = role;
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let compacted_before = self.store.state().compact_revision;
        let mut replies = Vec::new();
        let mut conf_changes = Vec::new();
        let mut batch = self.store.batch()?;
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => batch.skip(index, term),
                EntryType::EntryNormal => {
                    let request = match RaftRequest::decode(&entry.data[..]) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(index, error = %e, "undecodable log entry skipped");
                            batch.skip(index, term);
                            continue;
                        }
                    };
                    let result = match request.request {
                        Some(r) => batch.entry(index, term, |b| self.applier.apply(b, r)),
                        None => {
                            batch.skip(index, term);
                            continue;
                        }
                    };
                    if let Err(ApplyError::Storage(e)) = result {
                        return Err(NodeError::Apply {
                            index,
                            source: ApplyError::Storage(e),
                        });
                    }
                    self.metrics.proposals_applied.inc();
                    if request.origin == self.config.id {
                        if let Some(reply) = self.waiting.remove(&request.seq) {
                            self.metrics.proposals_pending.dec();
                            replies.push((reply, result.map_err(ProposeError::from)));
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    conf_changes.push(entry);
                    batch.skip(index, term);
                }
            }
        }
        let events = batch.commit()?;
        for entry in conf_changes {
            self.apply_conf_change(&entry)?;
        }
        let state = self.store.state();
        if state.compact_revision != compacted_before {
            self.hub.set_compacted(state.compact_revision);
        }
        self.hub.publish(&events, state.revision);
        self.status
            .revision
            .store(state.revision, Ordering::Release);
        self.status
            .compact_revision
            .store(state.compact_revision, Ordering::Release);
        self.status
            .applied_index
            .store(state.applied_index, Ordering::Release);
        self.metrics
            .backend_commit
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .proposals_committed
            .set(state.applied_index as i64);
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), NodeError> {
        let cs = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| LogError::Decode {
                what: format!("conf change at {}", entry.index),
                source: e,
            })?;
            self.raw.apply_conf_change(&cc)?
        } else {
            let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|e| LogError::Decode {
                what: format!("conf change at {}", entry.index),
                source: e,
            })?;
            self.raw.apply_conf_change(&cc)?
        };
        self.raw.mut_store().set_conf_state(cs)?;
        Ok(())
    }

    fn release_reads(&mut self) {
        let applied = self.store.state().applied_index;
        self.reads_ready.retain_mut(|(index, waiters)| {
            if *index <= applied {
                for w in waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
                false
            } else {
                true
            }
        });
    }

    /// Drop the log behind the applied index once it grows past
    /// `snapshot_count`, after making the applied state durable.
    fn maybe_compact_log(&mut self) -> Result<(), NodeError> {
        let applied = self.store.state().applied_index;
        let first = self.raw.store().first_index()?;
        if applied < first || applied - first < self.config.snapshot_count {
            return Ok(());
        }
        self.store.checkpoint()?;
        let upto = applied.saturating_sub(CATCH_UP_ENTRIES.min(self.config.snapshot_count / 2));
        self.raw.mut_store().compact(upto)?;
        tracing::debug!(upto, "raft log compacted");
        Ok(())
    }
}

use raft::Storage as _;

/// Where this boot's proposal numbers start. Entries proposed before a crash
/// can be replayed after the restart; numbering from the clock (in
/// microseconds, far above any one boot's proposal count) keeps a new
/// request from being matched with an old entry's result.
fn boot_sequence() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}
