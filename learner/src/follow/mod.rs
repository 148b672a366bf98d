//! Follow mode (`tern-learner --etcd-endpoints`): a Tern learner as the DR
//! replica of a running etcd cluster, through etcd's public client API.
//!
//! The follower is the sole voter of a Raft log of its own, and that log is
//! fed by its source instead of by clients ([`NodeStatus::follows_source`]
//! makes it answer clients as a learner does). So everything downstream of
//! the log works unchanged: backups of the state, archived log segments for
//! point-in-time restores, drills, and a takeover (which only stops the
//! feed).
//!
//! - [`seed`]: on an empty data dir, etcd's Maintenance.Snapshot stream
//!   (an `etcdctl snapshot save` file) is imported as `import-etcd` does:
//!   keys, history, leases, compaction point, users and roles.
//! - [`Follower`]: a Watch of the whole keyspace from the revision after
//!   the state's; each response's revisions go into one [`Mirror`] entry,
//!   applied at the same revisions with the source's create_revision,
//!   mod_revision, version and lease per key. Leases are mirrored beside
//!   (their ids and TTLs, from LeaseTimeToLive and LeaseLeases), and so is
//!   the compaction point. Lost links, restarted members and leader changes
//!   reconnect and resume after the applied revision.
//! - A source whose cluster id changed, or whose revision went below the
//!   applied one (an etcd restored from a backup), is never applied: the
//!   follower stops there and says so (log and metric) until it is fixed.
//!
//! [`NodeStatus::follows_source`]: tern_primary::raft::node::NodeStatus::follows_source

pub mod source;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tern_config::{FollowConfig, PrimaryConfig};
use tern_primary::apply::ApplyResult;
use tern_primary::member::Member;
use tern_primary::proto::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_request::RequestUnion, LeaseGrantRequest,
    LeaseLeasesRequest, LeaseTimeToLiveRequest, RangeRequest, SnapshotRequest, StatusRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use tern_primary::proto::ternpb::{raft_request::Request, Mirror, MirroredRevision};
use tern_primary::server::Extension;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use source::{Source, Stamp};

/// A Mirror entry is closed at this size (a single revision may exceed it).
const MAX_ENTRY_BYTES: usize = 1 << 20;
/// How often the source's leases and compaction point are compared.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the watch asks for the source's current revision.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// The wait before reconnecting after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// The meta row holding the source's cluster id, written at seeding.
pub const SOURCE_CLUSTER_ID: &str = "source_cluster_id";

/// On an empty data dir: the source's snapshot, imported into a new
/// single-member data dir with this member's identity. A data dir that
/// holds a state is left as it is (the follower resumes from it).
pub async fn seed(config: &FollowConfig, member: &PrimaryConfig) -> anyhow::Result<()> {
    let data_dir = member.data_dir();
    if data_dir.join("state.db").exists() {
        return Ok(());
    }
    let mut source = Source::new(config)?;
    let started = Instant::now();
    let (cluster_id, snapshot) = loop {
        match download_snapshot(&mut source, &data_dir).await {
            Ok(downloaded) => break downloaded,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot take the source's snapshot yet; retrying");
                source.failed();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let me = member
        .initial_members()?
        .into_iter()
        .find(|m| m.name == member.name)
        .ok_or_else(|| anyhow::anyhow!("no peer URLs for --name {}", member.name))?;
    let who = tern_primary::seed::Identity {
        name: member.name.clone(),
        peer_urls: me
            .peer_urls
            .iter()
            .map(tern_config::primary::url_string)
            .collect(),
        token: member.initial_cluster_token.clone(),
    };
    let imported = {
        let (snapshot, data_dir) = (snapshot.path().to_path_buf(), data_dir.clone());
        tokio::task::spawn_blocking(move || {
            tern_primary::import_etcd::import(&snapshot, &data_dir, &who)
        })
        .await??
    };
    let conn = rusqlite::Connection::open(data_dir.join("state.db"))?;
    tern_primary::mvcc::write::set_meta(&conn, SOURCE_CLUSTER_ID, cluster_id as i64)?;
    tracing::info!(
        revision = imported.revision,
        compact_revision = imported.compact_revision,
        keys = imported.keys,
        leases = imported.leases,
        source_cluster_id = format!("{cluster_id:x}"),
        elapsed = ?started.elapsed(),
        "seeded from the source's snapshot"
    );
    Ok(())
}

/// The source's Maintenance.Snapshot, written as `etcdctl snapshot save`
/// writes it (etcd appends the sha256), into a temporary file beside the
/// data dir; and the source's cluster id.
async fn download_snapshot(
    source: &mut Source,
    data_dir: &Path,
) -> anyhow::Result<(u64, tempfile::NamedTempFile)> {
    use std::io::Write;
    let parent = std::path::absolute(data_dir)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into());
    std::fs::create_dir_all(&parent)?;
    let mut file = tempfile::Builder::new()
        .prefix(".tern-follow-snapshot-")
        .tempfile_in(&parent)?;
    let mut client = source.maintenance().await?;
    // etcd 3.4's snapshot chunks carry no header: the cluster id comes
    // from Status, on the same connection.
    let cluster_id = client
        .status(source.request(StatusRequest {}))
        .await?
        .into_inner()
        .header
        .map_or(0, |h| h.cluster_id);
    let mut stream = client
        .snapshot(source.request(SnapshotRequest {}))
        .await?
        .into_inner();
    while let Some(chunk) = stream.message().await? {
        file.write_all(&chunk.blob)?;
    }
    file.as_file().sync_all()?;
    Ok((cluster_id, file))
}

/// The follow loop, started once the member serves.
pub fn extension(config: FollowConfig) -> Extension {
    Box::new(move |member: Arc<Member>| {
        let metrics = Arc::new(FollowMetrics::default());
        metrics.register(&member);
        let barrier = Arc::new(tokio::sync::Mutex::new(
            Source::new(&config).expect("checked at start-up"),
        ));
        let _ = member
            .source_revision
            .set(Arc::new(move || Box::pin(source_revision(barrier.clone()))));
        let follower = Follower {
            member,
            source: Source::new(&config).expect("checked at start-up"),
            metrics,
            known_leases: HashSet::new(),
        };
        tokio::spawn(follower.run());
        axum::Router::new()
    })
}

#[derive(Default)]
struct FollowMetrics {
    source_revision: Gauge,
    applied_revision: Gauge,
    lag_revisions: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    /// 1 while the source cannot be applied (another cluster, or history
    /// that went backwards).
    diverged: Gauge,
    reconnects: Counter,
    reseeds: Counter,
}

impl FollowMetrics {
    fn register(&self, member: &Member) {
        let m = &member.metrics;
        m.register(
            "tern_follow_source_revision",
            "The source etcd's revision, from its latest response header",
            self.source_revision.clone(),
        );
        m.register(
            "tern_follow_applied_revision",
            "The source revision this follower has applied",
            self.applied_revision.clone(),
        );
        m.register(
            "tern_follow_lag_revisions",
            "Source revisions not yet applied here",
            self.lag_revisions.clone(),
        );
        m.register(
            "tern_follow_lag_seconds",
            "How long this follower has been behind its source (0 when in step)",
            self.lag_seconds.clone(),
        );
        m.register(
            "tern_follow_source_diverged",
            "1 while the source is not applied: its cluster id changed or its revision went backwards",
            self.diverged.clone(),
        );
        m.register(
            "tern_follow_reconnects",
            "Times the follower reconnected to its source",
            self.reconnects.clone(),
        );
        m.register(
            "tern_follow_reseeds",
            "Times the follower was seeded again from a fresh snapshot (the source compacted past it)",
            self.reseeds.clone(),
        );
    }
}

/// Why a watch session ended.
enum Ended {
    /// The link or the member failed: reconnect and resume.
    Failed(anyhow::Error),
    /// The source refuses to be applied: wait for an operator.
    Diverged(String),
    /// The source compacted past the revision to resume from.
    Compacted(i64),
    /// `POST /takeover` made this member a cluster of its own.
    TakenOver,
}

struct Follower {
    member: Arc<Member>,
    source: Source,
    metrics: Arc<FollowMetrics>,
    /// The leases this state holds, as far as the follower told it.
    known_leases: HashSet<i64>,
}

impl Follower {
    async fn run(mut self) {
        self.known_leases = self.local_leases().await;
        loop {
            if !self.member.node.status.follows_source() {
                tracing::info!("taken over: no longer following the source");
                return;
            }
            match self.session().await {
                Ended::TakenOver => continue,
                Ended::Failed(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "source link failed; resuming");
                    self.metrics.reconnects.inc();
                    self.source.failed();
                }
                Ended::Diverged(why) => {
                    self.metrics.diverged.set(1);
                    tracing::error!(
                        "not applying the source: {why}; the follower keeps what it holds \
                         (restart it on an empty data dir to follow the new history)"
                    );
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    self.source.failed();
                    continue;
                }
                Ended::Compacted(at) => {
                    tracing::warn!(
                        compact_revision = at,
                        applied = self.member.node.status.revision(),
                        "the source compacted past this follower's revision: seeding again \
                         from a fresh snapshot"
                    );
                    match self.reseed().await {
                        Ok(revision) => {
                            self.metrics.reseeds.inc();
                            tracing::info!(revision, "seeded again from the source's snapshot");
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "seeding again failed; retrying");
                            self.source.failed();
                        }
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// A fresh snapshot of the source becomes this state (keyspace, leases,
    /// auth; the log and members stay): the way back after the source
    /// compacted past what this follower applied.
    async fn reseed(&mut self) -> anyhow::Result<i64> {
        let data_dir = self.member.data_dir.clone();
        let (cluster_id, snapshot) = download_snapshot(&mut self.source, &data_dir).await?;
        let expected = self.source_cluster_id().await;
        anyhow::ensure!(
            expected == 0 || cluster_id == expected,
            "the source's cluster id is {cluster_id:x}, the follower's state came from {expected:x}"
        );
        let scratch = tempfile::Builder::new()
            .prefix(".tern-follow-seed-")
            .tempdir_in(snapshot.path().parent().unwrap_or(Path::new(".")))?;
        let state_path = scratch.path().join("state.db");
        {
            let (snapshot, state_path) = (snapshot.path().to_path_buf(), state_path.clone());
            tokio::task::spawn_blocking(move || {
                tern_primary::import_etcd::state_file(&snapshot, &state_path)
            })
            .await??;
        }
        let revision = self
            .member
            .node
            .reseed(state_path)
            .await
            .map_err(anyhow::Error::msg)?;
        self.known_leases = self.local_leases().await;
        Ok(revision)
    }

    async fn source_cluster_id(&self) -> u64 {
        self.member
            .read(|conn, _| {
                tern_primary::mvcc::read::meta(conn, SOURCE_CLUSTER_ID)
                    .map_err(tern_primary::error::mvcc_status)
            })
            .await
            .unwrap_or(0) as u64
    }

    async fn local_leases(&self) -> HashSet<i64> {
        let leases = self
            .member
            .read(|conn, _| {
                tern_primary::mvcc::read::leases(conn).map_err(tern_primary::error::mvcc_status)
            })
            .await
            .unwrap_or_default();
        leases.into_iter().map(|(id, _)| id).collect()
    }

    /// One watch from the applied revision + 1, until it fails.
    async fn session(&mut self) -> Ended {
        let expected_cluster = self.source_cluster_id().await;
        if let Err(ended) = self.check_source(expected_cluster).await {
            return ended;
        }
        let mut watch = match self.source.watch().await {
            Ok(w) => w,
            Err(e) => return Ended::Failed(e),
        };
        let from = self.member.node.status.revision() + 1;
        let (requests, rx) = mpsc::channel::<WatchRequest>(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: from,
                progress_notify: true,
                ..Default::default()
            })),
        };
        if requests.send(create).await.is_err() {
            return Ended::Failed(anyhow::anyhow!("watch request channel closed"));
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses = match watch.watch(self.source.request(stream)).await {
            Ok(r) => r.into_inner(),
            Err(e) => return Ended::Failed(e.into()),
        };
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        // The poll's round trips to the source run beside the watch: on a
        // WAN link they take a round trip or more each, and events waiting
        // behind them were the follower's lag tail.
        let mut polling: Option<BoxFuture<'static, anyhow::Result<Polled>>> = None;
        let mut behind_since: Option<Instant> = None;
        let mut pending: Vec<WatchResponse> = Vec::new();
        loop {
            // Every response that is already here goes into one entry.
            let response = tokio::select! {
                r = responses.next() => r,
                _ = progress.tick() => {
                    let ask = WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                    };
                    let _ = requests.try_send(ask);
                    continue;
                }
                _ = poll.tick(), if polling.is_none() => {
                    match self.start_poll().await {
                        Ok(query) => polling = Some(query),
                        Err(e) => return Ended::Failed(e),
                    }
                    continue;
                }
                polled = async { polling.as_mut().expect("guarded by is_some").await }, if polling.is_some() => {
                    polling = None;
                    let mirrored = match polled {
                        Ok(polled) => self.mirror_polled(polled).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = mirrored {
                        return Ended::Failed(e);
                    }
                    continue;
                }
            };
            let response = match response {
                Some(Ok(r)) => {
                    self.heard_from_source();
                    r
                }
                Some(Err(e)) => return Ended::Failed(anyhow::anyhow!("watch: {}", e.message())),
                None => return Ended::Failed(anyhow::anyhow!("watch stream ended")),
            };
            pending.push(response);
            while let Some(Some(Ok(more))) = futures::FutureExt::now_or_never(responses.next()) {
                pending.push(more);
            }
            for r in &pending {
                if r.compact_revision != 0 {
                    return Ended::Compacted(r.compact_revision);
                }
                if r.canceled {
                    return Ended::Failed(anyhow::anyhow!("watch canceled: {}", r.cancel_reason));
                }
                if let Some(h) = &r.header {
                    if expected_cluster != 0 && h.cluster_id != expected_cluster {
                        return Ended::Diverged(format!(
                            "its cluster id is {:x}, the follower's state came from {:x}",
                            h.cluster_id, expected_cluster
                        ));
                    }
                    self.metrics
                        .source_revision
                        .set(self.metrics.source_revision.get().max(h.revision));
                }
            }
            let revisions = group(std::mem::take(&mut pending));
            if let Err(ended) = self.apply(revisions).await {
                return ended;
            }
            let applied = self.member.node.status.revision();
            let source = self.metrics.source_revision.get();
            self.metrics.applied_revision.set(applied);
            self.metrics.lag_revisions.set((source - applied).max(0));
            if source > applied {
                let since = *behind_since.get_or_insert_with(Instant::now);
                self.metrics.lag_seconds.set(since.elapsed().as_secs_f64());
            } else {
                behind_since = None;
                self.metrics.lag_seconds.set(0.0);
            }
        }
    }

    /// The source as a linearizable read sees it: the cluster this state
    /// came from, at a revision at least the applied one. (A single
    /// member's watch header may lag behind what another member served.)
    async fn check_source(&mut self, expected_cluster: u64) -> Result<(), Ended> {
        let mut kv = self.source.kv().await.map_err(Ended::Failed)?;
        let head = kv
            .range(self.source.request(RangeRequest {
                key: vec![0],
                count_only: true,
                ..Default::default()
            }))
            .await
            .map_err(|s| Ended::Failed(anyhow::anyhow!("range: {}", s.message())))?
            .into_inner()
            .header
            .unwrap_or_default();
        if expected_cluster != 0 && head.cluster_id != expected_cluster {
            return Err(Ended::Diverged(format!(
                "its cluster id is {:x}, the follower's state came from {:x}",
                head.cluster_id, expected_cluster
            )));
        }
        let applied = self.member.node.status.revision();
        if head.revision < applied {
            return Err(Ended::Diverged(format!(
                "its revision {} is below the applied revision {applied} (restored from a \
                 backup?)",
                head.revision
            )));
        }
        self.heard_from_source();
        self.metrics.diverged.set(0);
        self.metrics
            .source_revision
            .set(self.metrics.source_revision.get().max(head.revision));
        Ok(())
    }

    /// Propose `revisions` in entries of at most [`MAX_ENTRY_BYTES`], with
    /// the leases their keys name that this state does not hold yet.
    async fn apply(&mut self, revisions: Vec<MirroredRevision>) -> Result<(), Ended> {
        let mut entry = Mirror::default();
        let mut size = 0;
        for revision in revisions {
            if revision.revision <= self.member.node.status.revision() {
                // Already applied (a resumed watch repeats nothing, but a
                // doubled response must not be applied twice).
                continue;
            }
            for event in &revision.events {
                let lease = event.kv.as_ref().map_or(0, |kv| kv.lease);
                if lease != 0 && !self.known_leases.contains(&lease) {
                    entry.grant_leases.push(self.lease_grant(lease).await?);
                    self.known_leases.insert(lease);
                }
            }
            size += prost::Message::encoded_len(&revision);
            entry.revisions.push(revision);
            if size >= MAX_ENTRY_BYTES {
                self.propose(std::mem::take(&mut entry)).await?;
                size = 0;
            }
        }
        if !entry.revisions.is_empty() || !entry.grant_leases.is_empty() {
            self.propose(entry).await?;
        }
        Ok(())
    }

    fn heard_from_source(&self) {
        self.member
            .node
            .status
            .source_contact_ms
            .store(tern_primary::raft::node::unix_millis(), Ordering::Release);
    }

    async fn propose(&self, entry: Mirror) -> Result<(), Ended> {
        // A takeover stops the feed at once, not at the next session.
        if !self.member.node.status.follows_source() {
            return Err(Ended::TakenOver);
        }
        match self.member.propose(Request::Mirror(entry)).await {
            Ok(ApplyResult::Mirrored(_)) => Ok(()),
            Ok(other) => Err(Ended::Failed(anyhow::anyhow!(
                "unexpected apply result {other:?}"
            ))),
            // A gap (never expected) or a timeout: resume from what the
            // state holds.
            Err(status) => Err(Ended::Failed(anyhow::anyhow!(
                "applying the source's revisions: {}",
                status.message()
            ))),
        }
    }

    /// The grant of a lease the source holds (see [`lease_grant`]).
    async fn lease_grant(&mut self, id: i64) -> Result<LeaseGrantRequest, Ended> {
        let client = self.source.lease().await.map_err(Ended::Failed)?;
        lease_grant(client, &self.source.stamp(), id)
            .await
            .map_err(Ended::Failed)
    }

    /// The next poll of the source's lease set and compaction point, as a
    /// future of its own that borrows nothing from the follower.
    async fn start_poll(&mut self) -> anyhow::Result<BoxFuture<'static, anyhow::Result<Polled>>> {
        anyhow::ensure!(self.member.node.status.follows_source(), "taken over");
        let lease = self.source.lease().await?;
        let kv = self.source.kv().await?;
        let stamp = self.source.stamp();
        let known_before = self.known_leases.clone();
        let status = &self.member.node.status;
        let local_compaction = status.compact_revision.load(Ordering::Acquire);
        let applied = status.revision();
        Ok(Box::pin(async move {
            let leases = lease
                .clone()
                .lease_leases(stamp.request(LeaseLeasesRequest {}))
                .await?
                .into_inner()
                .leases;
            let at_source: HashSet<i64> = leases.iter().map(|l| l.id).collect();
            let mut grants = Vec::new();
            for id in at_source.difference(&known_before) {
                grants.push(lease_grant(lease.clone(), &stamp, *id).await?);
            }
            let compact_revision = compaction_point(kv, &stamp, local_compaction, applied).await?;
            Ok(Polled {
                known_before,
                at_source,
                grants,
                compact_revision,
            })
        }))
    }

    /// Mirror what a poll found: leases granted or gone at the source, and
    /// its compaction point.
    async fn mirror_polled(&mut self, polled: Polled) -> anyhow::Result<()> {
        anyhow::ensure!(self.member.node.status.follows_source(), "taken over");
        let entry = Mirror {
            grant_leases: polled
                .grants
                .into_iter()
                .filter(|g| !self.known_leases.contains(&g.id))
                .collect(),
            // Only leases known before the source answered can be gone
            // there: one learned from the watch since may be newer than
            // the answer.
            drop_leases: polled
                .known_before
                .iter()
                .filter(|id| !polled.at_source.contains(id) && self.known_leases.contains(id))
                .copied()
                .collect(),
            compact_revision: polled.compact_revision,
            ..Default::default()
        };
        let compacted = self
            .member
            .node
            .status
            .compact_revision
            .load(Ordering::Acquire);
        if entry.grant_leases.is_empty()
            && entry.drop_leases.is_empty()
            && entry.compact_revision <= compacted
        {
            return Ok(());
        }
        let (granted, dropped) = (entry.grant_leases.clone(), entry.drop_leases.clone());
        match self.member.propose(Request::Mirror(entry)).await {
            Ok(_) => {
                self.known_leases.extend(granted.iter().map(|g| g.id));
                for id in dropped {
                    self.known_leases.remove(&id);
                }
                Ok(())
            }
            Err(s) => anyhow::bail!("mirroring leases and compaction: {}", s.message()),
        }
    }
}

/// What one poll of the source found (see [`Follower::start_poll`]).
struct Polled {
    /// The leases the follower knew when the poll asked.
    known_before: HashSet<i64>,
    /// The source's leases.
    at_source: HashSet<i64>,
    /// Grants of the source's leases the follower did not know.
    grants: Vec<LeaseGrantRequest>,
    /// The source's compaction point, as far as the follower holds history.
    compact_revision: i64,
}

/// The grant of a lease the source holds, with the TTL it was granted. A
/// lease already gone there is granted with its remaining TTL of 0: the
/// source's deletion of its keys follows.
async fn lease_grant(
    mut client: LeaseClient<Channel>,
    stamp: &Stamp,
    id: i64,
) -> anyhow::Result<LeaseGrantRequest> {
    let ttl = match client
        .lease_time_to_live(stamp.request(LeaseTimeToLiveRequest { id, keys: false }))
        .await
    {
        Ok(r) => r.into_inner().granted_ttl.max(0),
        Err(s) if s.message().contains("lease not found") => 0,
        Err(s) => anyhow::bail!("lease {id:x}: {}", s.message()),
    };
    Ok(LeaseGrantRequest { id, ttl })
}

/// The source's compaction point, as far as this follower holds history
/// (it has applied up to `applied` and compacted at `local`): the lowest
/// revision a Range can still read at (etcd's Status does not tell it).
/// One probe when it has not moved.
async fn compaction_point(
    kv: KvClient<Channel>,
    stamp: &Stamp,
    local: i64,
    applied: i64,
) -> anyhow::Result<i64> {
    let readable = |revision: i64| {
        let request = stamp.request(RangeRequest {
            key: vec![0],
            revision,
            count_only: true,
            serializable: true,
            ..Default::default()
        });
        let mut kv = kv.clone();
        async move {
            match kv.range(request).await {
                Ok(_) => Ok(true),
                Err(s) if s.message().contains("compacted") => Ok(false),
                Err(s) => Err(anyhow::anyhow!("range at {revision}: {}", s.message())),
            }
        }
    };
    if applied <= local || readable(local.max(1)).await? {
        return Ok(local);
    }
    // Readable at `hi`, not at `lo`: the compaction point is in (lo, hi].
    let (mut lo, mut hi) = (local.max(1), applied);
    if !readable(hi).await? {
        return Ok(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if readable(mid).await? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The source's revision now, from a linearizable Range there (the
/// follower's read barrier; see [`Member::source_revision`]).
async fn source_revision(source: Arc<tokio::sync::Mutex<Source>>) -> Result<i64, tonic::Status> {
    // The client sees etcd's answer for a read index it cannot get.
    let unavailable = |e: anyhow::Error| {
        tracing::debug!(error = %format!("{e:#}"), "no read barrier from the source");
        tonic::Status::from(tern_primary::error::EtcdError::RequestTimeout)
    };
    let (mut kv, request) = {
        let mut source = source.lock().await;
        let kv = source.kv().await.map_err(unavailable)?;
        let request = source.request(RangeRequest {
            key: vec![0],
            count_only: true,
            ..Default::default()
        });
        (kv, request)
    };
    match kv.range(request).await {
        Ok(r) => Ok(r.into_inner().header.map_or(0, |h| h.revision)),
        Err(status) => {
            source.lock().await.failed();
            Err(unavailable(anyhow::anyhow!("source: {}", status.message())))
        }
    }
}

/// The events of watch responses, revision by revision.
fn group(responses: Vec<WatchResponse>) -> Vec<MirroredRevision> {
    let mut revisions: Vec<MirroredRevision> = Vec::new();
    for event in responses.into_iter().flat_map(|r| r.events) {
        let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        match revisions.last_mut() {
            Some(last) if last.revision == revision => last.events.push(event),
            _ => revisions.push(MirroredRevision {
                revision,
                events: vec![event],
            }),
        }
    }
    revisions
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_primary::proto::mvccpb::{Event, KeyValue};

    fn put(key: &str, revision: i64) -> Event {
        Event {
            kv: Some(KeyValue {
                key: key.into(),
                mod_revision: revision,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_group_by_revision_across_responses() {
        let responses = vec![
            WatchResponse {
                events: vec![put("a", 5), put("b", 5), put("c", 6)],
                ..Default::default()
            },
            WatchResponse::default(),
            WatchResponse {
                events: vec![put("d", 7)],
                ..Default::default()
            },
        ];
        let grouped = group(responses);
        let shape: Vec<(i64, usize)> = grouped
            .iter()
            .map(|r| (r.revision, r.events.len()))
            .collect();
        assert_eq!(shape, [(5, 2), (6, 1), (7, 1)]);
    }
}
