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
//!    messages, then append entries and hard state with one fsync on a
//!    second thread while this one applies the committed entries (they are
//!    durable already), send persisted messages, advance, apply what the
//!    light ready committed (or, when more proposals are queued, keep it
//!    for the next turn's fsync to overlap), release reads whose index is
//!    applied. A follower with nothing else queued sends its persisted
//!    messages (its acknowledgement) before it applies instead
//!    ([`RaftNode::persist_and_apply`]);
//! 4. as the leader, queues an append of its own for members that no
//!    append told the latest commit index in time
//!    ([`super::commit_notice`]); this runs just before step 3, so that
//!    turn's `Ready` sends it.
//!
//! A single voter uses exactly this path; a cluster adds the peer transport
//! (messages out through [`Transport`], in through [`NodeMsg::Step`]) and
//! snapshots for members too far behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::oneshot;

use super::commit_notice::CommitNotices;
use super::log_store::{LogError, LogStore};
use super::read_context::ReadContexts;
use super::snapshot::{snapshot_path, Snapshots};
use super::transport::Transport;
use crate::apply::{Applier, ApplyError, ApplyResult};
use crate::checkpointer::{Checkpointer, Durability};
use crate::lease::Lessor;
use crate::metrics::Metrics;
use crate::mvcc::write::{change_member, members, MemberRow};
use crate::mvcc::{MvccError, MvccStore};
use crate::proto::ternpb::{raft_request::Request, MemberChange, RaftRequest};
use crate::watch::WatchHub;

/// Entries kept behind the applied index at log compaction, so a follower
/// slightly behind catches up from the log (etcd's SnapshotCatchUpEntries).
const CATCH_UP_ENTRIES: u64 = 5000;
/// How long a removed member lingers to hand over leadership and let the
/// others learn its removal is committed.
const REMOVED_GRACE: Duration = Duration::from_millis(1000);
/// How many snapshot counts of entries the log keeps for a lagging
/// archiver.
const MAX_ARCHIVE_BACKLOG_COUNTS: u64 = 10;
/// How long applied entries may wait to be committed to the state file
/// when no reader asks for them (see [`crate::mvcc::write`]): at one client
/// that is a few dozen puts a commit instead of one. Longer intervals let
/// puts to keys spread over the key space share more of the leaves each
/// commit writes (50 ms: 15.3k → 17.2k puts/s on average with etcd's
/// `benchmark put` over 100,000 random keys, eight runs each), but each
/// commit then holds the Raft thread longer: with the bench's client the
/// same change gave no more puts and a put p99 10–15% higher, so the
/// interval stays short (README, "A state commit every 50 ms instead of
/// 10, tried and not kept").
const STATE_COMMIT_INTERVAL: Duration = Duration::from_millis(10);
/// Messages drained per turn, bounding one round's batch.
const MAX_BATCH: usize = 4096;
/// How long a read index request may go unanswered before it is asked
/// again (many round trips even over a WAN link).
const READ_INDEX_RESEND: Duration = Duration::from_millis(500);

/// Why a proposal or read did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader")]
    NoLeader,
    #[error("server stopped")]
    Stopped,
    /// The proposal may or may not have been applied: a leader's snapshot
    /// replaced the state before this member saw its entry.
    #[error("outcome unknown: the state was replaced by a snapshot")]
    Unknown,
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// Requests from the async side to the node thread.
pub enum NodeMsg {
    Propose {
        request: Request,
        /// The client the proposing member authorized it for.
        auth: Option<crate::proto::ternpb::AuthInfo>,
        reply: oneshot::Sender<Result<ApplyResult, ProposeError>>,
    },
    /// Linearizable read barrier: replies once the state machine has applied
    /// everything committed when the read arrived.
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    /// A reader waits for applied entries to be committed to the state
    /// ([`NodeStatus::commit_wanted`]); the node commits on this turn.
    Commit,
    /// Rebuild the state file (etcd's defragment); blocks writes meanwhile.
    Defragment {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Messages from peers.
    Step(Vec<Message>),
    /// The transport could not deliver to this peer.
    Unreachable(u64),
    /// A snapshot stream to `to` ended.
    SnapshotSent { to: u64, ok: bool },
    /// A membership change: add, promote or remove `change.id`.
    ConfChange {
        kind: ConfChangeType,
        change: MemberChange,
        reply: Reply,
    },
    /// Hand leadership to another voter (etcd's MoveLeader).
    TransferLeader(u64),
    /// How far each member's log matches the leader's (leader only).
    Progress {
        reply: oneshot::Sender<Option<Progress>>,
    },
    /// A follower seeded again from its source: the keyspace, leases and
    /// auth come from the state file at `path`; members and the log stay.
    /// Replies with the new revision.
    Reseed {
        path: std::path::PathBuf,
        reply: oneshot::Sender<Result<i64, String>>,
    },
    /// Disaster takeover: become the only voter of a new cluster, keeping
    /// the other learners but those in `drop` (see [`super::takeover`]).
    TakeOver {
        drop: Vec<u64>,
        reply: oneshot::Sender<Result<TakeoverReport, String>>,
    },
}

/// What a takeover kept, and how far behind the old leader it was.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TakeoverReport {
    pub member_id: u64,
    pub revision: i64,
    pub raft_index: u64,
    /// The highest commit index the old leader reported to this member.
    pub leader_commit_seen: u64,
    /// Entries committed by the old leader that this member never applied,
    /// as far as it knows.
    pub entries_behind: u64,
    /// When this member was last in step with the old leader (ms since
    /// the Unix epoch; 0 for never).
    pub caught_up_at_ms: u64,
    /// Learners that go on following this member.
    pub kept_learners: Vec<u64>,
    /// Members that left the configuration.
    pub removed: Vec<u64>,
}

impl TakeoverReport {
    /// The report of `plan` carried out by `member_id` on `state`, having
    /// last heard of `leader_commit` and been in step at `caught_up_at_ms`.
    pub fn new(
        member_id: u64,
        state: &crate::mvcc::StoreState,
        (leader_commit, caught_up_at_ms): (u64, u64),
        plan: super::takeover::Plan,
    ) -> TakeoverReport {
        TakeoverReport {
            member_id,
            revision: state.revision,
            raft_index: state.applied_index,
            leader_commit_seen: leader_commit,
            entries_behind: leader_commit.saturating_sub(state.applied_index),
            caught_up_at_ms,
            kept_learners: plan.kept,
            removed: plan.removed,
        }
    }

    /// The line a takeover prints and logs.
    pub fn summary(&self) -> String {
        let seen = if self.caught_up_at_ms == 0 {
            "never".to_string()
        } else {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(self.caught_up_at_ms);
            humantime::format_rfc3339_seconds(at).to_string()
        };
        let hex = |ids: &[u64]| {
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.iter()
                    .map(|id| format!("{id:x}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        format!(
            "forced a new single-member cluster: member {:x} keeps revision {} \
             (raft index {}); last seen {} entries behind the old leader's commit index \
             {}; last fully caught up at {seen}; learners kept: {}; members removed: {}",
            self.member_id,
            self.revision,
            self.raft_index,
            self.entries_behind,
            self.leader_commit_seen,
            hex(&self.kept_learners),
            hex(&self.removed),
        )
    }
}

/// The leader's view of replication: its last index and each member's
/// matched index.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub last_index: u64,
    pub matched: HashMap<u64, u64>,
}

/// Raft and store counters the API reads without asking the thread.
#[derive(Debug, Default)]
pub struct NodeStatus {
    pub term: AtomicU64,
    pub leader: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    /// Applied and committed to the state file: what reads see (see
    /// [`crate::mvcc::write`] on why the two differ).
    pub visible_index: AtomicU64,
    /// Rung when `visible_index` moves.
    pub visible: tokio::sync::Notify,
    /// A reader waits for applied entries to become visible.
    pub commit_wanted: AtomicBool,
    pub last_index: AtomicU64,
    pub revision: AtomicI64,
    pub compact_revision: AtomicI64,
    /// Bytes the state file's pages take, as of the last write to it: what
    /// the quota check adds a request to. Kept by the Raft thread after
    /// every commit, so a burst of writes, or a defragment before a write,
    /// is counted at once.
    pub db_size: AtomicI64,
    /// Whether this member is a learner in the current configuration.
    pub is_learner: AtomicBool,
    /// This member is the only voter, its leader, and has applied an entry
    /// of its own term: every write acknowledged anywhere is applied here,
    /// so a linearizable read needs no read index from the Raft thread
    /// (see [`NodeHandle::read_index`]).
    pub sole_leader: AtomicBool,
    /// A follower of an etcd cluster (`tern-learner --etcd-endpoints`),
    /// until a takeover: the sole voter of its own log, fed by its source,
    /// it serves clients as a learner does and never writes on its own
    /// (no lease expiry, no auto-compaction).
    pub follows_source: AtomicBool,
    /// When a follower last heard from its source etcd (ms since the Unix
    /// epoch; 0 for never).
    pub source_contact_ms: AtomicU64,
    /// The highest commit index a leader has told this member about.
    pub leader_commit: AtomicU64,
    /// When this member last had applied everything the leader had
    /// committed (milliseconds since the Unix epoch).
    pub caught_up_at_ms: AtomicU64,
    /// When this member last heard from a leader, or was one (ms since
    /// the Unix epoch; 0 for never).
    pub leader_contact_ms: AtomicU64,
    /// The election timeout, for judging how recent that contact is.
    pub election_timeout_ms: AtomicU64,
    /// Log archiving (the learner's): entries after this index are not
    /// shipped yet and stay in the log (within a bound). 0: no archiver.
    pub archive_floor: AtomicU64,
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
    /// Mirror the store's counters after an apply or a snapshot.
    pub fn set_store_state(&self, state: &crate::mvcc::StoreState) {
        self.revision.store(state.revision, Ordering::Release);
        self.compact_revision
            .store(state.compact_revision, Ordering::Release);
        self.applied_index
            .store(state.applied_index, Ordering::Release);
    }

    pub fn is_learner(&self) -> bool {
        self.is_learner.load(Ordering::Acquire)
    }
    pub fn follows_source(&self) -> bool {
        self.follows_source.load(Ordering::Acquire)
    }
    /// Whether clients get the learner's answers here: a learner, or a
    /// follower of an etcd cluster.
    pub fn serves_as_learner(&self) -> bool {
        self.is_learner() || self.follows_source()
    }
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::Acquire)
    }
    /// Committed entries this member has not applied yet, as far as it
    /// knows, and for how long it has not been in step with a leader.
    pub fn lag(&self) -> (u64, Duration) {
        let entries = self
            .leader_commit
            .load(Ordering::Acquire)
            .saturating_sub(self.applied_index());
        let since = self.caught_up_at_ms.load(Ordering::Acquire);
        // Refreshed every loop turn while in step, so a few ms is "none".
        let behind = Duration::from_millis(unix_millis().saturating_sub(since));
        if since == 0 || behind < Duration::from_millis(250) {
            (entries, Duration::ZERO)
        } else {
            (entries, behind)
        }
    }
}

pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The async side's handle on the node thread.
#[derive(Clone)]
pub struct NodeHandle {
    tx: Sender<NodeMsg>,
    pub status: Arc<NodeStatus>,
}

impl NodeHandle {
    pub async fn propose(
        &self,
        request: Request,
        auth: Option<crate::proto::ternpb::AuthInfo>,
    ) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Propose {
                request,
                auth,
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Linearizable read barrier; returns the read index, which the
    /// state is applied up to and reads see.
    ///
    /// A sole voter's read index is its applied index, read here: it
    /// answers a write only once applied, and no other member can lead
    /// (and take writes) before this one has applied the configuration
    /// that adds a voter, which clears [`NodeStatus::sole_leader`] on the
    /// same turn; the vote that would elect another leader is handled on
    /// a later one. raft-rs would answer the same index for it
    /// (`ReadState` at the commit index, once its term has a commit), but
    /// only after two hand-offs to and from the Raft thread.
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        if self.status.sole_leader.load(Ordering::Acquire) {
            return Ok(self.status.applied_index());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::ReadIndex { reply })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Wait until reads see the state applied up to `index`: the node
    /// commits what it applied at once when asked.
    pub async fn visible(&self, index: u64) -> Result<(), ProposeError> {
        let status = &self.status;
        loop {
            let rung = status.visible.notified();
            tokio::pin!(rung);
            // Registered before the check, so a commit in between rings it.
            rung.as_mut().enable();
            if status.visible_index.load(Ordering::Acquire) >= index {
                return Ok(());
            }
            if !status.commit_wanted.swap(true, Ordering::AcqRel) {
                self.tx
                    .send(NodeMsg::Commit)
                    .map_err(|_| ProposeError::Stopped)?;
            }
            rung.await;
        }
    }

    /// Hand peer messages to the node; fails only once it has stopped.
    pub fn step(&self, messages: Vec<Message>) -> Result<(), ProposeError> {
        self.tx
            .send(NodeMsg::Step(messages))
            .map_err(|_| ProposeError::Stopped)
    }

    pub async fn conf_change(
        &self,
        kind: ConfChangeType,
        change: MemberChange,
    ) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::ConfChange {
                kind,
                change,
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    pub fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        self.tx
            .send(NodeMsg::TransferLeader(to))
            .map_err(|_| ProposeError::Stopped)
    }

    pub async fn take_over(&self, drop: Vec<u64>) -> Result<TakeoverReport, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::TakeOver { drop, reply })
            .map_err(|_| "server stopped".to_string())?;
        rx.await.map_err(|_| "server stopped".to_string())?
    }

    pub async fn progress(&self) -> Result<Option<Progress>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Progress { reply })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)
    }

    /// The channel the transport reports through.
    pub fn sender(&self) -> Sender<NodeMsg> {
        self.tx.clone()
    }

    /// See [`NodeMsg::Reseed`].
    pub async fn reseed(&self, path: std::path::PathBuf) -> Result<i64, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Reseed { path, reply })
            .map_err(|_| "server stopped".to_string())?;
        rx.await.map_err(|_| "server stopped".to_string())?
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

/// A turn of the Raft loop longer than this is logged, with where its time
/// went (etcd warns of an apply over 100 ms the same way).
const SLOW_TURN: Duration = Duration::from_millis(100);

/// Settings the node needs from the member's configuration.
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    pub snapshot_count: u64,
    /// How `https://` peer URLs are dialed.
    pub peer_tls: Arc<crate::tls::DialTls>,
    /// Bytes per second sent to each learner (0: no limit).
    pub learner_bandwidth_limit: u64,
}

type Reply = oneshot::Sender<Result<ApplyResult, ProposeError>>;
type ReadReply = oneshot::Sender<Result<u64, ProposeError>>;

pub struct RaftNode {
    config: NodeConfig,
    raw: RawNode<LogStore>,
    store: MvccStore,
    applier: Applier,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    /// Shared with the applier and the API layer; reloaded after a snapshot.
    auth: Arc<crate::auth::AuthStore>,
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
    /// Read index requests in flight, by context: when last sent, and the
    /// reads waiting on it.
    reads_inflight: HashMap<u64, (Instant, Vec<ReadReply>)>,
    /// Reads whose index is known, waiting for it to be applied.
    reads_ready: Vec<(u64, Vec<ReadReply>)>,
    read_contexts: ReadContexts,
    role: StateRole,
    transport: Arc<Transport>,
    snapshots: Arc<Snapshots>,
    last_sweep: Instant,
    /// When a leader's append or heartbeat last arrived.
    leader_contact: Instant,
    /// When this member applied its own removal; it exits shortly after.
    removed_at: Option<Instant>,
    /// Campaign once everything committed is applied (a lone voter at
    /// start-up or after a takeover); see [`RaftNode::maybe_campaign`].
    campaign_when_applied: bool,
    /// Committed entries handed out by the last turn's light ready, left
    /// to be applied during the next fsync (see [`RaftNode::on_ready`]).
    deferred: Vec<Entry>,
    /// The commit index each member was last sent (a leader's).
    commit_notices: CommitNotices,
    /// Checkpoints of the state's WAL, off this thread.
    _checkpoint: Checkpointer,
    /// Up to which applied index the state file is durable: the log is
    /// compacted no further.
    state_durability: Arc<Durability>,
}

impl RaftNode {
    /// Build the node; `start` runs it on its own thread.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: NodeConfig,
        mut log: LogStore,
        store: MvccStore,
        hub: Arc<WatchHub>,
        lessor: Arc<Lessor>,
        metrics: Arc<Metrics>,
        snapshots: Arc<Snapshots>,
        auth: Arc<crate::auth::AuthStore>,
        runtime: tokio::runtime::Handle,
    ) -> Result<(Self, NodeHandle), NodeError> {
        log.set_snapshots(snapshots.clone());
        let state_durability = Durability::new(|conn| {
            crate::mvcc::read::meta(conn, "applied_index")
                .map(|applied| applied as u64)
                .map_err(|e| e.to_string())
        });
        let checkpoint =
            Checkpointer::take_over_with(store.connection(), Some(state_durability.clone()))
                .map_err(MvccError::Sqlite)?;
        let state = store.state();
        // Every applied entry was committed; the persisted commit index may
        // lag because light-ready commits are persisted lazily.
        let mut hs = log.hard_state().clone();
        if hs.commit < state.applied_index {
            hs.commit = state.applied_index;
            log.persist(&[], Some(&hs))?;
        }
        let raw = raw_node(&config, state.applied_index, log)?;
        let conf = raw.store().conf_state().clone();
        // A lone voter need not wait an election timeout to lead.
        let lone_voter = conf.voters == vec![config.id];
        let applier = Applier::new(lessor.clone(), store.connection())?
            .with_auth_store(auth.clone())
            .replaying_through(raw.raft.raft_log.last_index());
        let (tx, rx) = crossbeam_channel::unbounded();
        let transport = Arc::new(Transport::new(
            runtime,
            tx.clone(),
            metrics.clone(),
            config.peer_tls.clone(),
            Some(config.learner_bandwidth_limit).filter(|b| *b > 0),
        ));
        let status = Arc::new(NodeStatus::default());
        status
            .is_learner
            .store(conf.learners.contains(&config.id), Ordering::Release);
        status.set_store_state(&state);
        status
            .visible_index
            .store(store.committed().applied_index, Ordering::Release);
        note_db_size(&store, &status);
        status.election_timeout_ms.store(
            (config.tick * config.election_ticks as u32).as_millis() as u64,
            Ordering::Release,
        );
        let handle = NodeHandle {
            tx,
            status: status.clone(),
        };
        let read_contexts = ReadContexts::new(config.id);
        Ok((
            RaftNode {
                config,
                raw,
                store,
                applier,
                hub,
                lessor,
                auth,
                metrics,
                status,
                rx,
                seq: boot_sequence(),
                waiting: HashMap::new(),
                held: Vec::new(),
                reads_next: Vec::new(),
                reads_inflight: HashMap::new(),
                reads_ready: Vec::new(),
                read_contexts,
                role: StateRole::Follower,
                transport,
                snapshots,
                last_sweep: Instant::now(),
                leader_contact: Instant::now(),
                removed_at: None,
                campaign_when_applied: lone_voter,
                deferred: Vec::new(),
                commit_notices: CommitNotices::default(),
                _checkpoint: checkpoint,
                state_durability,
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
        self.refresh_peers()?;
        self.maybe_campaign()?;
        let mut next_tick = Instant::now() + self.config.tick;
        loop {
            let mut wake = self
                .commit_notices
                .due()
                .map_or(next_tick, |due| due.min(next_tick));
            if let Some(since) = self.store.uncommitted_since() {
                wake = wake.min(since + STATE_COMMIT_INTERVAL);
            }
            let timeout = wake.saturating_duration_since(Instant::now());
            let received = self.rx.recv_timeout(timeout);
            let turn = Instant::now();
            match received {
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
                Err(RecvTimeoutError::Disconnected) => {
                    // Not needed for what the log holds, but a clean
                    // stop leaves nothing to apply again.
                    self.store.commit()?;
                    return Ok(());
                }
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + self.config.tick;
            }
            self.retry_held();
            self.request_read_index();
            self.resend_unanswered_reads();
            self.send_overdue_commits();
            let handled = turn.elapsed();
            self.on_ready()?;
            let ready = turn.elapsed();
            self.maybe_commit_state()?;
            self.publish_visible();
            self.maybe_campaign()?;
            self.maybe_compact_log()?;
            self.track_lag();
            self.note_sole_leader();
            if turn.elapsed() >= SLOW_TURN {
                // Every proposal, read and peer message waited this long.
                tracing::warn!(
                    took = ?turn.elapsed(),
                    messages = ?handled,
                    ready = ?ready.saturating_sub(handled),
                    commit_and_compaction = ?turn.elapsed().saturating_sub(ready),
                    "raft turn took too long"
                );
            }
            if self
                .removed_at
                .is_some_and(|t| t.elapsed() >= REMOVED_GRACE)
            {
                tracing::error!("removed from the cluster; exiting");
                std::process::exit(0);
            }
            if self.last_sweep.elapsed() >= Duration::from_secs(1) {
                self.sweep_abandoned();
            }
        }
    }

    /// See [`NodeStatus::sole_leader`]. Set at the end of each turn;
    /// cleared there too, on the turn that applies a second voter (see
    /// [`NodeHandle::read_index`] for why that is soon enough).
    fn note_sole_leader(&self) {
        let raft = &self.raw.raft;
        let sole = self.role == StateRole::Leader
            && !self.status.is_learner()
            && raft.prs().is_singleton()
            && raft.raft_log.term(raft.raft_log.applied).ok() == Some(raft.term);
        self.status.sole_leader.store(sole, Ordering::Release);
    }

    /// A lone voter campaigns at once instead of after an election
    /// timeout, but only once it has applied what it committed: raft-rs
    /// refuses to campaign while a committed membership change (a
    /// takeover's) is unapplied.
    fn maybe_campaign(&mut self) -> Result<(), NodeError> {
        if !self.campaign_when_applied {
            return Ok(());
        }
        let log = &self.raw.raft.raft_log;
        if log.applied < log.committed || log.applied < self.raw.raft.pending_conf_index {
            return Ok(());
        }
        self.campaign_when_applied = false;
        if self.raw.raft.state != StateRole::Leader {
            self.raw.campaign()?;
        }
        Ok(())
    }

    /// Forget waiters whose client gave up (timed out): a proposal the
    /// leader dropped, or a read index lost with a leader, never answers.
    fn sweep_abandoned(&mut self) {
        self.last_sweep = Instant::now();
        let before = self.waiting.len();
        self.waiting.retain(|_, reply| !reply.is_closed());
        for _ in self.waiting.len()..before {
            self.metrics.proposals_pending.dec();
        }
        self.reads_inflight.retain(|_, (_, waiters)| {
            waiters.retain(|w| !w.is_closed());
            !waiters.is_empty()
        });
    }

    /// Record when this member last was in step with a leader: it had
    /// heard from one within an election timeout and applied all it had
    /// committed. A member cut off stops being in step even though it
    /// cannot know how many entries it is missing.
    fn track_lag(&mut self) {
        if self.role == StateRole::Leader {
            self.status
                .leader_commit
                .store(self.raw.raft.raft_log.committed, Ordering::Release);
            self.note_leader_contact();
        }
        let applied = self.store.state().applied_index;
        let election_timeout = self.config.tick * self.config.election_ticks as u32;
        if applied >= self.status.leader_commit.load(Ordering::Acquire)
            && self.leader_contact.elapsed() <= election_timeout
        {
            self.status
                .caught_up_at_ms
                .store(unix_millis(), Ordering::Release);
        }
    }

    fn note_leader_contact(&mut self) {
        self.leader_contact = Instant::now();
        self.status
            .leader_contact_ms
            .store(unix_millis(), Ordering::Release);
    }

    /// Point the transport at the members in the stored member list.
    fn refresh_peers(&mut self) -> Result<(), NodeError> {
        let rows = members(self.store.connection())?;
        let peers: Vec<super::transport::PeerAddr> = rows
            .into_iter()
            .filter(|m| m.0 != self.config.id)
            .map(|m| (m.0, m.2, m.4))
            .collect();
        self.transport.set_peers(&peers);
        Ok(())
    }

    fn handle(&mut self, msg: NodeMsg) -> Result<(), NodeError> {
        match msg {
            NodeMsg::Propose {
                request,
                auth,
                reply,
            } => self.propose(request, auth, reply),
            NodeMsg::ReadIndex { reply } => self.reads_next.push(reply),
            // Done at the end of this turn, by `commit_state`.
            NodeMsg::Commit => {}
            NodeMsg::Defragment { reply } => {
                let result = self.store.vacuum().map_err(|e| e.to_string());
                self.note_db_size();
                let _ = reply.send(result);
            }
            NodeMsg::Reseed { path, reply } => {
                let result = self.reseed(&path);
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            NodeMsg::Step(messages) => {
                for m in messages {
                    match m.get_msg_type() {
                        MessageType::MsgAppend => {
                            self.status
                                .leader_commit
                                .fetch_max(m.commit, Ordering::AcqRel);
                            self.note_leader_contact();
                        }
                        MessageType::MsgHeartbeat | MessageType::MsgSnapshot => {
                            self.note_leader_contact();
                        }
                        _ => {}
                    }
                    let (from, kind) = (m.from, m.get_msg_type());
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(from = format!("{from:x}"), ?kind, error = %e, "peer message ignored");
                    } else if kind == MessageType::MsgPropose
                        && self.raw.raft.state == StateRole::Leader
                    {
                        // A member's own client waits for this entry: it
                        // learns the commit at once, not a wait later.
                        let last = self.raw.raft.raft_log.last_index();
                        self.commit_notices.proposed(from, last);
                    }
                }
            }
            NodeMsg::Unreachable(id) => self.raw.report_unreachable(id),
            NodeMsg::TransferLeader(to) => self.raw.transfer_leader(to),
            NodeMsg::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            NodeMsg::ConfChange {
                kind,
                mut change,
                reply,
            } => {
                self.seq += 1;
                change.origin = self.config.id;
                change.seq = self.seq;
                let cc = ConfChange {
                    change_type: kind,
                    node_id: change.id,
                    ..Default::default()
                };
                match self.raw.propose_conf_change(change.encode_to_vec(), cc) {
                    Ok(()) => {
                        self.metrics.proposals_pending.inc();
                        self.waiting.insert(self.seq, reply);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "configuration change refused");
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                }
            }
            NodeMsg::Progress { reply } => {
                let progress = (self.raw.raft.state == StateRole::Leader).then(|| Progress {
                    last_index: self.raw.raft.raft_log.last_index(),
                    matched: self
                        .raw
                        .raft
                        .prs()
                        .iter()
                        .map(|(id, pr)| (*id, pr.matched))
                        .collect(),
                });
                let _ = reply.send(progress);
            }
            NodeMsg::TakeOver { drop, reply } => {
                let report = self.take_over(&drop)?;
                let _ = reply.send(Ok(report));
            }
        }
        Ok(())
    }

    /// Disaster takeover on the running member: apply everything committed
    /// here, restart the log as a new single-voter cluster (see
    /// [`super::takeover`]) and build a new Raft node on it. The process,
    /// its listeners and its clients' streams stay up.
    fn take_over(&mut self, drop: &[u64]) -> Result<TakeoverReport, NodeError> {
        // Committed entries waiting in raft-rs or deferred are applied
        // first: they are this member's to keep.
        while self.raw.has_ready() || !self.deferred.is_empty() {
            self.on_ready()?;
        }
        let state = self.store.state();
        let me = self.config.id;
        let plan = super::takeover::Plan::new(me, self.raw.store().conf_state(), drop);
        self.raw.mut_store().force_new_cluster(
            me,
            &plan,
            state.applied_index,
            state.applied_term,
        )?;
        let log = self.raw.store().reopen()?;
        self.raw = raw_node(&self.config, state.applied_index, log)?;
        self.campaign_when_applied = true;
        // Reads waiting on the old leader's read index would never be
        // answered; dropping them answers their clients with an error.
        self.reads_next.clear();
        self.reads_inflight.clear();
        self.reads_ready.clear();
        self.status.is_learner.store(false, Ordering::Release);
        self.role = StateRole::Follower;
        let seen = (
            self.status.leader_commit.load(Ordering::Acquire),
            self.status.caught_up_at_ms.load(Ordering::Acquire),
        );
        let report = TakeoverReport::new(me, &state, seen, plan);
        tracing::warn!("{}", report.summary());
        Ok(report)
    }

    fn propose(
        &mut self,
        request: Request,
        auth: Option<crate::proto::ternpb::AuthInfo>,
        reply: Reply,
    ) {
        self.seq += 1;
        let data = RaftRequest {
            origin: self.config.id,
            seq: self.seq,
            request: Some(request),
            auth,
            proposed_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
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
        // raft-rs drops (does not queue) a read index a new leader gets
        // before it has committed an entry of its term; the reads would then
        // wait until their clients time out. Hold them until it has.
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term() {
            return;
        }
        let (seq, ctx) = self.read_contexts.issue();
        self.raw.read_index(ctx);
        self.reads_inflight
            .insert(seq, (Instant::now(), std::mem::take(&mut self.reads_next)));
    }

    /// Ask again for read indexes that got no answer: a follower's request
    /// is dropped by a leader that has not yet committed in its term (or
    /// lost with a leader that stepped down), and raft-rs never says so.
    /// An index from a later request is just as good for the waiting reads
    /// (they were invoked before it was asked for); a late answer to the
    /// first request finds nothing left to wake.
    ///
    /// The new request always has a new context. Asking again under the
    /// old one is not safe on a leader: if the first request was answered
    /// meanwhile (its read state not yet taken), raft-rs queues the old
    /// context anew, behind requests made since, and a late
    /// acknowledgement of the first heartbeat then confirms it and every
    /// request queued before it (`ReadOnly::advance`). A leader paused
    /// and deposed would answer a read that arrived after the pause at its
    /// old commit index; the nemesis found one.
    fn resend_unanswered_reads(&mut self) {
        if self.reads_inflight.is_empty()
            || self.raw.raft.leader_id == raft::INVALID_ID
            || (self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term())
        {
            return;
        }
        let now = Instant::now();
        let waiters = take_unanswered(&mut self.reads_inflight, now, READ_INDEX_RESEND);
        if waiters.is_empty() {
            return;
        }
        let (seq, ctx) = self.read_contexts.issue();
        self.raw.read_index(ctx);
        self.reads_inflight.insert(seq, (now, waiters));
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        // A commit that moved while stepping reaches the learners in this
        // `Ready`'s messages, ahead of this turn's fsync and apply: they
        // wait for nothing here, and their lag is counted from the client's
        // acknowledgement, which the apply sends.
        if self.role == StateRole::Leader {
            let committed = self.raw.raft.raft_log.committed;
            self.commit_notices.committed(committed, self.peers());
            self.send_overdue_commits();
        }
        if !self.raw.has_ready() {
            if !self.deferred.is_empty() {
                let entries = std::mem::take(&mut self.deferred);
                self.apply(entries)?;
                self.raw.advance_apply();
                self.release_reads()?;
            }
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        // Entries deferred from the last turn come first, in index order.
        let mut committed = std::mem::take(&mut self.deferred);
        if !ready.snapshot().is_empty() {
            self.apply(std::mem::take(&mut committed))?;
            self.apply_snapshot(ready.snapshot().clone())?;
        }
        committed.extend(ready.take_committed_entries());
        for rs in ready.take_read_states() {
            let Some(seq) = self.read_contexts.decode(&rs.request_ctx) else {
                continue;
            };
            if let Some((_, waiters)) = self.reads_inflight.remove(&seq) {
                self.reads_ready.push((rs.index, waiters));
            }
        }
        self.persist_and_apply(&mut ready, committed)?;
        self.status
            .last_index
            .store(self.raw.raft.raft_log.last_index(), Ordering::Release);
        if ready.ss().is_some() {
            self.on_role_change();
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        if self.rx.is_empty() || self.status.is_learner() {
            self.apply(committed)?;
            self.raw.advance_apply();
        } else {
            // More proposals are queued: their fsync, next turn, is when
            // these get applied (a lone voter commits on its own fsync, so
            // without this its apply and fsync would never overlap).
            // Nothing waits for them meanwhile but their clients. (A
            // learner has no such fsync to hide an apply behind: see
            // `persist_and_apply`.)
            self.deferred = committed;
        }
        let committed = self.raw.raft.raft_log.committed;
        self.status.commit_index.store(committed, Ordering::Release);
        if self.role == StateRole::Leader {
            self.commit_notices.committed(committed, self.peers());
        }
        self.release_reads()?;
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        self.commit_notices.sent(&messages);
        self.transport.send(messages);
    }

    /// The other members in the Raft configuration (a leader's view) that
    /// an append would reach now, and whether each is a learner. A paused
    /// one (window full, probing, taking a snapshot) gets the commit index
    /// with the next append that goes to it anyway.
    fn peers(&self) -> Vec<(u64, bool)> {
        let me = self.config.id;
        let prs = self.raw.raft.prs();
        prs.iter()
            .filter(|(id, pr)| **id != me && !pr.is_paused())
            .map(|(id, _)| (*id, prs.conf().learners().contains(id)))
            .collect()
    }

    /// A leader's commit index rides its next append (raft-rs's
    /// `skip_bcast_commit`); members no append reached within their wait
    /// (see [`super::commit_notice`]) get one of their own here, which
    /// this turn's `Ready` sends.
    fn send_overdue_commits(&mut self) {
        // raft-rs's own state, not `self.role`: a message stepped this
        // turn may have made this member a follower, and a follower must
        // not send appends (its peers would take it for the leader).
        if self.raw.raft.state != StateRole::Leader || self.commit_notices.due().is_none() {
            return;
        }
        for id in self.commit_notices.overdue() {
            self.raw.raft.send_append(id);
        }
    }

    /// Append `ready`'s entries and hard state to the log (one fsync),
    /// send the messages that wait for it, and apply `committed`.
    ///
    /// A leader does the append and the apply at the same time, on two
    /// threads: committed entries are already durable, so applying them
    /// need not wait for the new ones, and the fsync's wait and the SQLite
    /// work overlap instead of adding up. Its persisted messages (rare: a
    /// leader's appends go out before its own fsync) follow both.
    ///
    /// Any other member with nothing more queued acknowledges first and
    /// applies after, on this thread: its acknowledgement is what the
    /// leader's commit, and so a client's put, waits for, and applying
    /// here costs no hand-off to another thread (the apply overlaps the
    /// leader's next round instead). With more queued it overlaps like a
    /// leader, so the next append is not held up by an apply as well.
    ///
    /// A learner applies first: nothing waits for its acknowledgement.
    fn persist_and_apply(
        &mut self,
        ready: &mut raft::Ready,
        committed: Vec<Entry>,
    ) -> Result<(), NodeError> {
        let committed = if self.status.is_learner() {
            // Its acknowledgement counts towards no commit, but what it has
            // applied is what its region reads and what a takeover keeps:
            // the committed entries (already in its log) become visible
            // first, and the new ones' fsync follows, rather than each
            // commit waiting for the fsync of an append that came with it.
            // This is also the order of raft-rs's own example.
            self.apply(committed)?;
            Vec::new()
        } else {
            committed
        };
        let (entries, hs) = (ready.entries(), ready.hs());
        let syncs = self.raw.store().must_sync(entries, hs);
        let ack_first = self.role != StateRole::Leader && self.rx.is_empty();
        if !syncs || committed.is_empty() || ack_first {
            let started = Instant::now();
            self.raw.mut_store().persist(entries, hs)?;
            if syncs {
                self.metrics
                    .wal_fsync
                    .observe(started.elapsed().as_secs_f64());
            }
            self.send(ready.take_persisted_messages());
            return self.apply(committed);
        }
        let (log, state_machine) = self.log_and_state_machine();
        let (persisted, applied) =
            log.persist_beside(entries, hs, || state_machine.apply_batch(committed));
        if let Some(fsync) = persisted? {
            self.metrics.wal_fsync.observe(fsync.as_secs_f64());
        }
        self.send(ready.take_persisted_messages());
        self.finish_apply(applied?)
    }

    /// Replace the state with a leader's snapshot: the state file first
    /// (made durable), then the log, so a crash in between replays from a
    /// state that is at least as new as the log's start.
    fn apply_snapshot(&mut self, snapshot: raft::eraftpb::Snapshot) -> Result<(), NodeError> {
        let started = Instant::now();
        let meta = snapshot.get_metadata().clone();
        let path = snapshot_path(&snapshot);
        self.store.restore(&path)?;
        self.raw.mut_store().apply_snapshot(&meta)?;
        self.snapshots.clear_received(meta.index);
        self.metrics.snapshots_applied.inc();
        let state = self.store.state();
        self.lessor
            .reset(&crate::mvcc::read::leases(self.store.connection())?);
        self.auth
            .reload(self.store.connection(), state.applied_index)
            .map_err(crate::mvcc::MvccError::Sqlite)?;
        self.hub.set_compacted(state.compact_revision);
        self.hub.restored(state.revision);
        self.status.set_store_state(&state);
        self.note_db_size();
        // This member's proposals waiting for their entries may be inside
        // the snapshot, whose entries it never applies one by one: they
        // would only learn so by timing out (a new learner's first publish
        // of its attributes waited 7 s for that). Their outcome is told
        // as unknown now, as a timeout's would be.
        for (_, reply) in self.waiting.drain() {
            self.metrics.proposals_pending.dec();
            let _ = reply.send(Err(ProposeError::Unknown));
        }
        self.status.is_learner.store(
            meta.get_conf_state().learners.contains(&self.config.id),
            Ordering::Release,
        );
        self.refresh_peers()?;
        tracing::info!(
            index = meta.index,
            revision = state.revision,
            elapsed = ?started.elapsed(),
            "state replaced by the leader's snapshot"
        );
        Ok(())
    }

    /// See [`NodeMsg::Reseed`]. Entries committed before it are applied
    /// first, so the new state's position is the last applied entry's and
    /// every later entry applies once, on top of it.
    fn reseed(&mut self, path: &std::path::Path) -> Result<i64, NodeError> {
        if !self.deferred.is_empty() {
            let entries = std::mem::take(&mut self.deferred);
            self.apply(entries)?;
            self.raw.advance_apply();
        }
        self.store.reseed(path)?;
        let state = self.store.state();
        self.lessor
            .reset(&crate::mvcc::read::leases(self.store.connection())?);
        self.auth
            .reload(self.store.connection(), state.applied_index)
            .map_err(crate::mvcc::MvccError::Sqlite)?;
        self.hub.set_compacted(state.compact_revision);
        self.hub.restored(state.revision);
        self.status.set_store_state(&state);
        self.note_db_size();
        tracing::info!(
            revision = state.revision,
            "state seeded again from the source"
        );
        Ok(state.revision)
    }

    /// See [`NodeStatus::db_size`].
    fn note_db_size(&self) {
        note_db_size(&self.store, &self.status);
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
        if role != self.role {
            self.commit_notices.reset();
        }
        self.role = role;
    }

    /// Apply committed entries: [`apply_batch`], then what only this
    /// thread's Raft node may do.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        let applied = self.log_and_state_machine().1.apply_batch(entries)?;
        self.finish_apply(applied)
    }

    /// The log, and the parts of the node that applying entries to the
    /// state uses, borrowed apart: none of the latter is the Raft node, so
    /// the log can be written while entries are applied.
    fn log_and_state_machine(&mut self) -> (&mut LogStore, StateMachine<'_>) {
        (
            self.raw.mut_store(),
            StateMachine {
                id: self.config.id,
                store: &mut self.store,
                applier: &mut self.applier,
                waiting: &mut self.waiting,
                metrics: &self.metrics,
                status: &self.status,
                hub: &self.hub,
            },
        )
    }

    /// After a batch is applied to the state: membership changes reach
    /// the Raft node and the transport, events the watchers, results the
    /// clients.
    fn finish_apply(&mut self, applied: Applied) -> Result<(), NodeError> {
        let members_changed = applied.members_changed || !applied.conf_changes.is_empty();
        for entry in applied.conf_changes {
            self.apply_conf_change(&entry)?;
        }
        if members_changed {
            self.refresh_peers()?;
        }
        let state = self.store.state();
        if !applied.published {
            publish(&self.hub, applied.compacted_before, &state, applied.events);
        }
        self.status.set_store_state(&state);
        self.metrics
            .backend_commit
            .observe(applied.started.elapsed().as_secs_f64());
        for (reply, result) in applied.replies {
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
        let removed =
            !cs.voters.contains(&self.config.id) && !cs.learners.contains(&self.config.id);
        self.status
            .is_learner
            .store(cs.learners.contains(&self.config.id), Ordering::Release);
        let next_leader = cs.voters.first().copied();
        self.raw.mut_store().set_conf_state(cs)?;
        if removed && self.removed_at.is_none() {
            // etcd's member stops for good once removed; serving on would
            // answer from a state that no longer follows the cluster. It
            // stops a moment later: a removed leader first hands over
            // leadership and lets its followers learn that the removal is
            // committed, so the cluster does not wait an election timeout.
            tracing::error!(
                member_id = format!("{:x}", self.config.id),
                "the member has been permanently removed from the cluster; stopping"
            );
            self.removed_at = Some(Instant::now());
            if self.role == StateRole::Leader {
                if let Some(next) = next_leader {
                    self.raw.transfer_leader(next);
                }
            }
        }
        Ok(())
    }

    /// Answer the linearizable reads whose read index is applied, once
    /// reads see it.
    fn release_reads(&mut self) -> Result<(), NodeError> {
        let applied = self.store.state().applied_index;
        if !self.reads_ready.iter().any(|(index, _)| *index <= applied) {
            return Ok(());
        }
        self.commit_state()?;
        self.reads_ready.retain_mut(|(index, waiters)| {
            if *index <= applied {
                for w in waiters.drain(..) {
                    let _ = w.send(Ok(*index));
                }
                false
            } else {
                true
            }
        });
        Ok(())
    }

    /// Commit the applied batches to the state file (see
    /// [`crate::mvcc::write`]) when a reader asked for them or they have
    /// waited [`STATE_COMMIT_INTERVAL`], and let the readers know.
    fn maybe_commit_state(&mut self) -> Result<(), NodeError> {
        let wanted = self.status.commit_wanted.swap(false, Ordering::AcqRel);
        let due = self
            .store
            .uncommitted_since()
            .is_some_and(|since| since.elapsed() >= STATE_COMMIT_INTERVAL);
        if wanted || due {
            self.commit_state()?;
        }
        Ok(())
    }

    /// Commit what is applied, and tell the readers and the watchers.
    fn commit_state(&mut self) -> Result<(), NodeError> {
        self.store.commit()?;
        self.publish_visible();
        Ok(())
    }

    /// Mirror what reads see after the store committed (here, or inside a
    /// snapshot's restore, a reseed or a defragment).
    fn publish_visible(&self) {
        let committed = self.store.committed();
        let before = self
            .status
            .visible_index
            .swap(committed.applied_index, Ordering::AcqRel);
        if before != committed.applied_index {
            self.hub.committed(committed.revision);
            self.status.visible.notify_waiters();
        }
    }

    /// Drop the log behind the applied index once it grows past
    /// `snapshot_count`, after making the applied state durable.
    fn maybe_compact_log(&mut self) -> Result<(), NodeError> {
        let applied = self.store.state().applied_index;
        let first = self.raw.store().first_index()?;
        if applied < first || applied - first < self.config.snapshot_count {
            return Ok(());
        }
        let mut upto = applied.saturating_sub(CATCH_UP_ENTRIES.min(self.config.snapshot_count / 2));
        // Keep what the archiver has not shipped, unless it is so far
        // behind (its store down for long) that the disk is at risk: then
        // its chain gets a gap, which it reports, and the next full backup
        // starts a new one.
        let archived = self.status.archive_floor.load(Ordering::Acquire);
        if archived != 0
            && applied - archived <= MAX_ARCHIVE_BACKLOG_COUNTS * self.config.snapshot_count
        {
            upto = upto.min(archived);
        }
        // Only what the state file holds durably (its commits are not
        // fsynced): the checkpointer's thread syncs it when asked, so this
        // thread never waits for those fsyncs (they took 1-30 ms here).
        let durable = self.state_durability.durable();
        if durable < upto {
            self.state_durability.want(upto);
            upto = durable;
        }
        if upto < first {
            return Ok(());
        }
        self.raw.mut_store().compact(upto)?;
        tracing::debug!(upto, "raft log compacted");
        Ok(())
    }
}

/// What applying one batch of entries needs, borrowed from the node.
struct StateMachine<'a> {
    id: u64,
    store: &'a mut MvccStore,
    applier: &'a mut Applier,
    waiting: &'a mut HashMap<u64, Reply>,
    metrics: &'a Metrics,
    status: &'a NodeStatus,
    hub: &'a WatchHub,
}

/// A batch applied to the state, with what is left to do on the node.
struct Applied {
    started: Instant,
    compacted_before: i64,
    replies: Vec<(Reply, Result<ApplyResult, ProposeError>)>,
    conf_changes: Vec<Entry>,
    members_changed: bool,
    events: Vec<crate::proto::mvccpb::Event>,
    /// The watchers have the events already.
    published: bool,
}

/// See [`NodeStatus::db_size`]. A failed reading keeps the last one (the
/// housekeeping task's reading, once a second, covers it).
fn note_db_size(store: &MvccStore, status: &NodeStatus) {
    if let Ok(bytes) = store.file_bytes() {
        status.db_size.store(bytes, Ordering::Release);
    }
}

/// Tell the watchers about a batch applied to the state: what it
/// compacted, then its events.
fn publish(
    hub: &WatchHub,
    compacted_before: i64,
    state: &crate::mvcc::StoreState,
    events: Vec<crate::proto::mvccpb::Event>,
) {
    if state.compact_revision != compacted_before {
        hub.set_compacted(state.compact_revision);
    }
    hub.publish(events, state.revision);
}

impl StateMachine<'_> {
    /// Apply `entries` to the state as one batch, left in the store's open
    /// transaction (see [`crate::mvcc::write`]; the log is the durability
    /// boundary), and collect the waiting proposals' results.
    fn apply_batch(self, entries: Vec<Entry>) -> Result<Applied, NodeError> {
        let started = Instant::now();
        let compacted_before = self.store.state().compact_revision;
        let mut replies = Vec::new();
        let mut conf_changes = Vec::new();
        let mut members_changed = false;
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
                        // A put, and a txn of puts and ranges, check their
                        // leases, auth and space before the first write.
                        Some(r) if crate::apply::checked_before_writing(&r) => batch
                            .entry_checked_first(index, term, |b| {
                                self.applier.apply_as(b, r, request.auth.as_ref())
                            }),
                        Some(r) => batch.entry(index, term, |b| {
                            self.applier.apply_as(b, r, request.auth.as_ref())
                        }),
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
                    members_changed |= matches!(result, Ok(ApplyResult::Membership(_)));
                    if request.origin == self.id {
                        if let Some(reply) = self.waiting.remove(&request.seq) {
                            self.metrics.proposals_pending.dec();
                            replies.push((reply, result.map_err(ProposeError::from)));
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let change = MemberChange::decode(&entry.context[..]).unwrap_or_default();
                    let removed = conf_change_kind(&entry)? == ConfChangeType::RemoveNode;
                    let row: MemberRow = (
                        change.id,
                        change.name.clone(),
                        change.peer_urls.clone(),
                        Vec::new(),
                        change.is_learner,
                    );
                    let result = batch.entry(index, term, |b| {
                        change_member(b.conn(), &row, removed)?;
                        Ok(ApplyResult::Membership(members(b.conn())?))
                    });
                    if let Err(ApplyError::Storage(e)) = result {
                        return Err(NodeError::Apply {
                            index,
                            source: ApplyError::Storage(e),
                        });
                    }
                    if change.origin == self.id {
                        if let Some(reply) = self.waiting.remove(&change.seq) {
                            self.metrics.proposals_pending.dec();
                            replies.push((reply, result.map_err(ProposeError::from)));
                        }
                    }
                    conf_changes.push(entry);
                }
            }
        }
        batch.record_lag(
            self.status.leader_commit.load(Ordering::Acquire),
            self.status.caught_up_at_ms.load(Ordering::Acquire),
        )?;
        let mut events = batch.end()?;
        note_db_size(self.store, self.status);
        let published = conf_changes.is_empty() && !members_changed;
        if published {
            // Applied to the state: the watchers, then the clients, may
            // know now. When the log's next fsync runs beside this apply,
            // the rest of `finish_apply` waits for it, and a reply need not
            // (at 1000 puts/s that wait was most of a put's latency). The
            // watchers come first, as in etcd: a watch created once a put
            // has returned starts after it. Membership replies wait until
            // the Raft node and transport know.
            let state = self.store.state();
            publish(
                self.hub,
                compacted_before,
                &state,
                std::mem::take(&mut events),
            );
            self.status.set_store_state(&state);
            for (reply, result) in replies.drain(..) {
                let _ = reply.send(result);
            }
        }
        Ok(Applied {
            started,
            compacted_before,
            replies,
            conf_changes,
            members_changed,
            events,
            published,
        })
    }
}

use raft::Storage as _;

/// The raft-rs node over `log`, which has applied up to `applied`.
fn raw_node(
    config: &NodeConfig,
    applied: u64,
    log: LogStore,
) -> Result<RawNode<LogStore>, NodeError> {
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: 1,
        applied,
        // Flow control for cross-region members: up to 256 appends of
        // up to 1 MiB in flight per member covers the bandwidth-delay
        // product of a 100 ms link at well over 100 MB/s, and a slow
        // link only fills the window (the voters' commits never wait
        // for a learner).
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        // The commit index rides the next append instead of an append of
        // its own per commit; see `commit_notice`.
        skip_bcast_commit: true,
        ..Default::default()
    };
    raft_config.validate()?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    Ok(RawNode::new(&raft_config, log, &logger)?)
}

/// The waiters of every read index request in `inflight` last asked for
/// `resend_after` or longer before `now`, taken out of it to be asked for
/// again under a new context (see `RaftNode::resend_unanswered_reads`).
fn take_unanswered<W>(
    inflight: &mut HashMap<u64, (Instant, Vec<W>)>,
    now: Instant,
    resend_after: Duration,
) -> Vec<W> {
    let mut waiters = Vec::new();
    inflight.retain(|_, (sent, w)| {
        let unanswered = now.duration_since(*sent) >= resend_after;
        if unanswered {
            waiters.append(w);
        }
        !unanswered
    });
    waiters
}

fn conf_change_kind(entry: &Entry) -> Result<ConfChangeType, NodeError> {
    let decode_err = |e| LogError::Decode {
        what: format!("conf change at {}", entry.index),
        source: e,
    };
    if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
        let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(decode_err)?;
        Ok(cc
            .changes
            .first()
            .map_or(ConfChangeType::AddNode, |c| c.get_change_type()))
    } else {
        let cc = ConfChange::parse_from_bytes(&entry.data).map_err(decode_err)?;
        Ok(cc.get_change_type())
    }
}

/// Where this boot's proposal numbers start. Entries proposed before a crash
/// can be replayed after the restart; numbering from the clock (in
/// microseconds, far above any one boot's proposal count) keeps a new
/// request from being matched with an old entry's result.
fn boot_sequence() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_reads_are_taken_out_together_and_recent_ones_stay() {
        let start = Instant::now();
        let resend = Duration::from_millis(500);
        let mut inflight = HashMap::new();
        inflight.insert(1, (start, vec!["a", "b"]));
        inflight.insert(2, (start + Duration::from_millis(100), vec!["c"]));
        inflight.insert(3, (start + Duration::from_millis(400), vec!["d"]));
        let mut taken = take_unanswered(&mut inflight, start + resend, resend);
        assert_eq!(taken, vec!["a", "b"]);
        assert_eq!(inflight.len(), 2, "asked for less than 500 ms ago");
        taken = take_unanswered(&mut inflight, start + Duration::from_secs(1), resend);
        taken.sort();
        assert_eq!(taken, vec!["c", "d"]);
        assert!(inflight.is_empty(), "their old contexts wake nothing now");
    }
}
