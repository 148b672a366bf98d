//! Prometheus metrics, under etcd's names, types, labels and histogram
//! buckets where the meaning is the same, so etcd's published alert rules
//! (the etcd mixin) and dashboards work unchanged; `monitoring/` in the
//! repository has them, with Tern's own rules, and
//! `tests/monitoring.rs` checks every name they use against a live scrape.
//! (Help texts carry no final period: prometheus-client adds one.)
//!
//! - this module: the registry, and the server, disk, MVCC and peer
//!   network metrics the member updates as it goes (or at scrape time, from
//!   the node's status: see [`crate::http`]);
//! - [`grpc`]: go-grpc-prometheus's `grpc_server_*` metrics, and etcd's
//!   client traffic counters, kept by a middleware on the client listeners;
//! - [`process`]: the Go client's standard `process_*` metrics, read from
//!   `/proc` at scrape time.

pub mod grpc;
pub mod process;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A peer network metric's one label: `To` or `From` and the peer's member
/// id in hex, as etcd's rafthttp labels them.
pub type PeerLabel = [(&'static str, String); 1];

/// The label of a metric about traffic to peer `id`.
pub fn to_peer(id: u64) -> PeerLabel {
    [("To", format!("{id:x}"))]
}

/// The label of a metric about traffic from peer `id`.
pub fn from_peer(id: u64) -> PeerLabel {
    [("From", format!("{id:x}"))]
}

/// etcd's peer round-trip buckets: 0.1 ms doubling to about 3.3 s.
fn peer_rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub struct Metrics {
    /// Behind a lock so programs built on the member (the learner's
    /// backups) can add their own metrics after start-up.
    registry: std::sync::Mutex<Registry>,
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    /// etcd's are gauges despite the `_total`: the commit and applied
    /// indexes, set at scrape time.
    pub proposals_committed: Gauge,
    pub proposals_applied: Gauge,
    pub proposals_pending: Gauge,
    pub proposals_failed: Counter,
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    pub db_total_size: Gauge,
    pub db_in_use_size: Gauge,
    pub quota_backend_bytes: Gauge,
    pub current_revision: Gauge,
    pub compact_revision: Gauge,
    pub is_learner: Gauge,
    pub applied_index: Gauge,
    pub leader_commit: Gauge,
    pub lag_entries: Gauge,
    pub leader_contact: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub snapshots_applied: Counter,
    /// Raft messages and snapshots sent to each peer, in bytes.
    pub peer_sent_bytes: Family<PeerLabel, Counter>,
    pub peer_received_bytes: Family<PeerLabel, Counter>,
    /// Messages to a peer that never left: its queue was full, or it could
    /// not be reached (etcd counts the same drops; the mixin's
    /// etcdMembersDown fires on their rate).
    pub peer_sent_failures: Family<PeerLabel, Counter>,
    /// Round trips of a probe to each peer over the peer connection.
    pub peer_rtt: Family<PeerLabel, Histogram, fn() -> Histogram>,
    pub grpc: grpc::GrpcMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            has_leader: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            proposals_committed: Gauge::default(),
            proposals_applied: Gauge::default(),
            proposals_pending: Gauge::default(),
            proposals_failed: Counter::default(),
            // etcd's buckets: 1 ms doubling to about 8 s.
            wal_fsync: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            backend_commit: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            db_total_size: Gauge::default(),
            db_in_use_size: Gauge::default(),
            quota_backend_bytes: Gauge::default(),
            current_revision: Gauge::default(),
            compact_revision: Gauge::default(),
            is_learner: Gauge::default(),
            applied_index: Gauge::default(),
            leader_commit: Gauge::default(),
            lag_entries: Gauge::default(),
            leader_contact: Gauge::default(),
            lag_seconds: Gauge::default(),
            snapshots_applied: Counter::default(),
            peer_sent_bytes: Family::default(),
            peer_received_bytes: Family::default(),
            peer_sent_failures: Family::default(),
            peer_rtt: Family::new_with_constructor(peer_rtt_histogram),
            grpc: grpc::GrpcMetrics::new(),
            registry: Default::default(),
        };
        registry.register(
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not",
            m.has_leader.clone(),
        );
        registry.register(
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise",
            m.is_leader.clone(),
        );
        registry.register(
            "etcd_server_leader_changes_seen",
            "The number of leader changes seen",
            m.leader_changes.clone(),
        );
        registry.register(
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed",
            m.proposals_committed.clone(),
        );
        registry.register(
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied",
            m.proposals_applied.clone(),
        );
        registry.register(
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit",
            m.proposals_pending.clone(),
        );
        registry.register(
            "etcd_server_proposals_failed",
            "The total number of failed proposals seen",
            m.proposals_failed.clone(),
        );
        registry.register(
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL",
            m.wal_fsync.clone(),
        );
        registry.register(
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend",
            m.backend_commit.clone(),
        );
        registry.register(
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes",
            m.db_total_size.clone(),
        );
        registry.register(
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes",
            m.db_in_use_size.clone(),
        );
        registry.register(
            "etcd_server_quota_backend_bytes",
            "Current backend storage quota size in bytes",
            m.quota_backend_bytes.clone(),
        );
        registry.register(
            "etcd_debugging_mvcc_current_revision",
            "The current revision of store",
            m.current_revision.clone(),
        );
        registry.register(
            "etcd_debugging_mvcc_compact_revision",
            "The revision of the last compaction in store",
            m.compact_revision.clone(),
        );
        registry.register(
            "etcd_server_is_learner",
            "Whether or not this member is a learner. 1 if is, 0 otherwise",
            m.is_learner.clone(),
        );
        registry.register(
            "tern_raft_applied_index",
            "The last Raft index applied to this member's state",
            m.applied_index.clone(),
        );
        registry.register(
            "tern_raft_leader_commit_index",
            "The highest commit index the leader has reported to this member",
            m.leader_commit.clone(),
        );
        registry.register(
            "tern_replication_lag_entries",
            "Entries the leader has committed that this member has not applied",
            m.lag_entries.clone(),
        );
        registry.register(
            "tern_raft_leader_last_contact_timestamp_seconds",
            "When this member last heard from a leader, or was one (Unix time; 0 for never): \
             with etcd_debugging_mvcc_current_revision, what picks the learner to take over",
            m.leader_contact.clone(),
        );
        registry.register(
            "tern_replication_lag_seconds",
            "How long this member has been behind the leader's commit index (0 when caught up)",
            m.lag_seconds.clone(),
        );
        registry.register(
            "tern_raft_snapshots_applied",
            "Leader snapshots that replaced this member's state (it was too far behind the log)",
            m.snapshots_applied.clone(),
        );
        registry.register(
            "etcd_network_peer_sent_bytes",
            "The total number of bytes sent to peers",
            m.peer_sent_bytes.clone(),
        );
        registry.register(
            "etcd_network_peer_received_bytes",
            "The total number of bytes received from peers",
            m.peer_received_bytes.clone(),
        );
        registry.register(
            "etcd_network_peer_sent_failures",
            "The total number of send failures from peers",
            m.peer_sent_failures.clone(),
        );
        registry.register(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers",
            m.peer_rtt.clone(),
        );
        let version: Family<[(&'static str, &'static str); 1], Gauge> = Family::default();
        version
            .get_or_create(&[("server_version", crate::api::maintenance::ETCD_VERSION)])
            .set(1);
        registry.register(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version",
            version,
        );
        m.grpc.register(&mut registry);
        registry.register_collector(Box::new(process::ProcessCollector));
        Metrics {
            registry: std::sync::Mutex::new(registry),
            ..m
        }
    }

    /// Add a metric served on `/metrics` with the member's own.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(
            &mut out,
            &self.registry.lock().unwrap_or_else(|e| e.into_inner()),
        );
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
