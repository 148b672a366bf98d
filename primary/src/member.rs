//! What a running member owns, shared by every API service: the handle on
//! the Raft thread, the read pool, the watch hub, the lessor, the member's
//! identity and limits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::apply::{Applied, ApplyResult};
use crate::auth::{AuthInfo, AuthStore};
use crate::error::{self, EtcdError};
use crate::lease::Lessor;
use crate::metrics::Metrics;
use crate::mvcc::{read, MvccError, Reader, StoreState};
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::ternpb::raft_request::Request;
use crate::raft::NodeHandle;
use crate::watch::WatchHub;

/// etcd's default request timeout for a proposal to be applied.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);

/// Client-facing limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub quota_backend_bytes: u64,
    /// `--max-learners`.
    pub max_learners: usize,
}

pub struct Member {
    pub cluster_id: u64,
    pub member_id: u64,
    pub name: String,
    pub node: NodeHandle,
    pub reader: Arc<Reader>,
    pub hub: Arc<WatchHub>,
    pub lessor: Arc<Lessor>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub data_dir: std::path::PathBuf,
    /// Users, roles and tokens; every handler checks its caller here.
    pub auth: Arc<AuthStore>,
    ids: IdGenerator,
    leader_link: crate::forward::LeaderLink,
    /// A follower's read barrier (set by follow mode): its source's current
    /// revision, which a linearizable read waits to have applied.
    pub source_revision: std::sync::OnceLock<SourceRevision>,
    /// Reads running on the pool at once (see [`read_slots`]).
    reads: Arc<tokio::sync::Semaphore>,
    /// Free space on the data dir's filesystem, for the quota check.
    disk_room: crate::disk_room::DiskRoom,
}

/// How many reads run at once: enough to keep every core busy while some
/// wait on the disk. Each running read holds a blocking thread and a pooled
/// SQLite connection with its page cache; left unbounded, 64 concurrent
/// clients made ~80 of each on 2 cores, for no more throughput, and
/// peak memory ~1.2× etcd's. More reads than this queue, in arrival order.
fn read_slots() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(8)
}

/// `f` in one read transaction on `conn`, with the store state it sees.
fn run_read<T>(
    reader: &Reader,
    conn: rusqlite::Connection,
    f: impl FnOnce(&rusqlite::Connection, StoreState) -> Result<T, Status>,
) -> Result<T, Status> {
    let mut out = None;
    let r = reader.run(conn, |conn| {
        let state = read::store_state(conn)?;
        out = Some(f(conn, state));
        Ok::<_, MvccError>(())
    });
    match (r, out) {
        (_, Some(result)) => result,
        (Err(e), None) => Err(error::mvcc_status(e)),
        (Ok(()), None) => Err(Status::internal("read produced no result")),
    }
}

/// Asks a follower's source etcd for its current revision, with a
/// linearizable read there.
pub type SourceRevision = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, Status>> + Send>>
        + Send
        + Sync,
>;

impl Member {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        name: String,
        node: NodeHandle,
        reader: Arc<Reader>,
        hub: Arc<WatchHub>,
        lessor: Arc<Lessor>,
        metrics: Arc<Metrics>,
        limits: Limits,
        data_dir: std::path::PathBuf,
        leader_tls: crate::tls::DialTls,
        auth: Arc<AuthStore>,
    ) -> Self {
        Member {
            cluster_id,
            member_id,
            name,
            node,
            reader,
            hub,
            lessor,
            metrics,
            limits,
            data_dir: data_dir.clone(),
            auth,
            ids: IdGenerator::new(member_id),
            leader_link: crate::forward::LeaderLink::new(leader_tls),
            source_revision: std::sync::OnceLock::new(),
            reads: Arc::new(tokio::sync::Semaphore::new(read_slots())),
            disk_room: crate::disk_room::DiskRoom::new(data_dir),
        }
    }

    /// Whether this member leads the cluster now.
    pub fn is_leader(&self) -> bool {
        self.node.status.leader() == self.member_id
    }

    /// etcd's learner check: a learner serves only serializable reads and
    /// Status (and Watch, which etcd cannot do there).
    pub fn refuse_if_learner(&self) -> Result<(), Status> {
        if self.node.status.serves_as_learner() {
            Err(EtcdError::NotSupportedForLearner.into())
        } else {
            Ok(())
        }
    }

    /// A channel to the current leader's client URL, for requests only the
    /// leader can answer.
    pub async fn leader_channel(&self) -> Result<tonic::transport::Channel, Status> {
        let leader = self.node.status.leader();
        if leader == 0 {
            return Err(EtcdError::NoLeader.into());
        }
        let row = self
            .read(move |conn, _| {
                Ok(crate::mvcc::write::members(conn)
                    .map_err(error::mvcc_status)?
                    .into_iter()
                    .find(|m| m.0 == leader))
            })
            .await?;
        self.leader_link.channel(leader, row).await
    }

    /// A new channel to another member's client URLs.
    pub async fn member_channel(
        &self,
        row: &crate::mvcc::write::MemberRow,
    ) -> Result<tonic::transport::Channel, String> {
        self.leader_link.dial(&row.3).await
    }

    /// After a forwarded request failed: reconnect next time.
    pub fn forget_leader_channel(&self) {
        self.leader_link.forget();
    }

    /// A new cluster-unique id (leases), etcd's way.
    pub fn next_id(&self) -> u64 {
        self.ids.next()
    }

    /// etcd's quota check: refuse a write that would take the database past
    /// the quota, or leave the data dir's filesystem with less than
    /// [`crate::disk_room::DISK_RESERVE_BYTES`] free, and raise the NOSPACE
    /// alarm through the log.
    pub async fn check_quota(&self, cost: usize) -> Result<(), Status> {
        let size = self.node.status.db_size.load(Ordering::Acquire).max(0) as u64;
        let within_quota = size + cost as u64 <= self.limits.quota_backend_bytes;
        if within_quota && self.disk_room.admit(cost) {
            return Ok(());
        }
        let nospace = crate::proto::etcdserverpb::AlarmType::Nospace as i32;
        // Raise it once: every proposal is a log append, and refused writes
        // retried against a full disk must not eat the reserve.
        let raised = self
            .read(|conn, _| {
                crate::mvcc::write::alarms(conn).map_err(|e| Status::internal(e.to_string()))
            })
            .await
            .is_ok_and(|alarms| alarms.contains(&(self.member_id, nospace)));
        if !raised {
            let alarm = crate::proto::etcdserverpb::AlarmRequest {
                action: crate::proto::etcdserverpb::alarm_request::AlarmAction::Activate as i32,
                member_id: self.member_id,
                alarm: nospace,
            };
            let _ = self.propose(Request::Alarm(alarm)).await;
        }
        Err(EtcdError::NoSpace.into())
    }

    /// A header with the ids, the term and `revision` (0: the current one).
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision: if revision == 0 {
                self.node.status.revision()
            } else {
                revision
            },
            raft_term: self.node.status.term(),
        }
    }

    /// etcd's cluster service answers without a revision.
    pub fn header_without_revision(&self) -> ResponseHeader {
        ResponseHeader {
            revision: 0,
            ..self.header(0)
        }
    }

    /// Fill a header produced by the apply layer, like etcd's `header.fill`.
    pub fn fill(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = Some(self.header(revision));
    }

    /// etcd's AuthInfoFromCtx: who sent `request` (`None`: nobody in
    /// particular). Refuses a token this member does not know.
    pub async fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Option<AuthInfo>, Status> {
        self.caller_from(&Credentials::of(request)).await
    }

    pub async fn caller_from(&self, credentials: &Credentials) -> Result<Option<AuthInfo>, Status> {
        self.caller_untranslated(credentials)
            .await
            .map_err(error::auth_status)
    }

    /// [`Member::caller_from`] with auth's own error, for the services
    /// where etcd passes it through untranslated.
    pub async fn caller_untranslated(
        &self,
        credentials: &Credentials,
    ) -> Result<Option<AuthInfo>, crate::auth::AuthError> {
        match self.auth.auth_info(credentials.token.as_deref()).await? {
            Some(who) => Ok(Some(who)),
            // No token: the verified client certificate's name, as etcd
            // does with client-cert-auth on.
            None => Ok(credentials
                .common_name
                .as_ref()
                .map(|user| crate::auth::AuthInfo {
                    user: user.clone(),
                    revision: self.auth.revision(),
                })),
        }
    }

    /// etcd's IsAdminPermitted for the caller of `request`.
    pub async fn require_root<T>(&self, request: &tonic::Request<T>) -> Result<(), Status> {
        let who = self.caller(request).await?;
        self.auth
            .check_admin(who.as_ref())
            .map_err(error::auth_status)
    }

    /// Propose a request of the system itself (lease expiry, alarms,
    /// publishing) and wait for the entry to be applied.
    pub async fn propose(&self, request: Request) -> Result<ApplyResult, Status> {
        self.propose_as(request, None).await
    }

    /// Propose a client's request, checked for `who`: apply refuses it if
    /// auth changed since the check (see [`crate::auth`]).
    async fn propose_as(
        &self,
        request: Request,
        who: Option<crate::proto::ternpb::AuthInfo>,
    ) -> Result<ApplyResult, Status> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.node.propose(request, who)).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(error::propose_status(e)),
            Err(_) => Err(EtcdError::RequestTimeout.into()),
        }
    }

    /// Propose a client's request, checked for `who` (`None`: no token),
    /// and return the response type it produces, with its header filled in.
    pub async fn propose_for<T: Applied>(
        &self,
        request: Request,
        who: Option<&AuthInfo>,
    ) -> Result<T, Status> {
        let who = crate::proto::ternpb::AuthInfo {
            user: who.map(|w| w.user.clone()).unwrap_or_default(),
            revision: who.map_or(0, |w| w.revision),
        };
        let result = self.propose_as(request, Some(who)).await?;
        let mut response = T::from_result(result)
            .ok_or_else(|| Status::internal("apply produced a response of another kind"))?;
        self.fill(response.header_mut());
        Ok(response)
    }

    /// Wait until every write committed before now is applied locally;
    /// returns the Raft index reads must see for that (see
    /// [`Member::read_seeing`]).
    pub async fn linearizable_barrier(&self) -> Result<u64, Status> {
        if self.node.status.follows_source() {
            if let Some(source_revision) = self.source_revision.get() {
                self.source_barrier(source_revision).await?;
                return Ok(self.node.status.applied_index());
            }
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, self.node.read_index()).await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(e)) => Err(error::propose_status(e)),
            Err(_) => Err(EtcdError::RequestTimeout.into()),
        }
    }

    /// A follower's linearizable read: what its source had committed when
    /// the read arrived must be applied here first (the read index, with
    /// the source's revision for the index). No answer from the source in
    /// time is etcd's request timeout, as for a learner without a leader.
    async fn source_barrier(&self, source_revision: &SourceRevision) -> Result<(), Status> {
        let waited = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let target = source_revision().await?;
            while self.node.status.revision() < target {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<(), Status>(())
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => Err(EtcdError::RequestTimeout.into()),
        }
    }

    /// Run a read on the pool, off the async runtime, in one SQLite read
    /// transaction; `f` gets the store state of that snapshot. It sees
    /// every write applied here before the call (a put answered here, say).
    pub async fn read<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, StoreState) -> Result<T, Status> + Send + 'static,
    {
        self.read_seeing(self.node.status.applied_index(), f).await
    }

    /// [`Member::read`] of a state that has applied at least the Raft
    /// index `applied` (a read index, after a linearizable barrier).
    pub async fn read_seeing<T, F>(&self, applied: u64, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, StoreState) -> Result<T, Status> + Send + 'static,
    {
        self.visible(applied).await?;
        // Held until the read itself ends, even if its caller goes away.
        let slot = self
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::internal("the read pool is closed"))?;
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let conn = reader.connection().map_err(error::mvcc_status)?;
            run_read(&reader, conn, f)
        })
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))?
    }

    /// [`Member::read`] for a read of one key, which touches a few pages
    /// the cache mostly holds: when a read slot and a pooled connection
    /// are free it runs right here, on the runtime's thread, sparing the
    /// two hand-offs to and from a blocking thread that take longer than
    /// the read itself.
    pub async fn read_key_seeing<T, F>(&self, applied: u64, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, StoreState) -> Result<T, Status> + Send + 'static,
    {
        self.visible(applied).await?;
        if let Ok(_slot) = self.reads.clone().try_acquire_owned() {
            if let Some(conn) = self.reader.take_idle() {
                return run_read(&self.reader, conn, f);
            }
        }
        self.read_seeing(applied, f).await
    }

    /// Wait until the state file's readers see the Raft index `applied`:
    /// the Raft thread commits what it applied when a reader asks (and
    /// otherwise every few ms).
    pub async fn visible(&self, applied: u64) -> Result<(), Status> {
        if self.node.status.visible_index.load(Ordering::Acquire) >= applied {
            return Ok(());
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, self.node.visible(applied)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(error::propose_status(e)),
            Err(_) => Err(EtcdError::RequestTimeout.into()),
        }
    }

    /// Database file size and bytes in use.
    pub async fn db_size(&self) -> Result<(i64, i64), Status> {
        self.read(|conn, _| read::db_size(conn).map_err(error::mvcc_status))
            .await
    }
}

/// etcd's idutil generator: member id prefix, millisecond timestamp, counter;
/// unique across members and restarts without coordination.
struct IdGenerator {
    prefix: u64,
    suffix: AtomicU64,
}

impl IdGenerator {
    fn new(member_id: u64) -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        IdGenerator {
            prefix: (member_id & 0xffff) << 48,
            suffix: AtomicU64::new((millis & ((1 << 40) - 1)) << 8),
        }
    }

    fn next(&self) -> u64 {
        let suffix = self.suffix.fetch_add(1, Ordering::Relaxed) + 1;
        self.prefix | (suffix & ((1 << 48) - 1))
    }
}

/// What a request says about who sent it: its token (etcd's `token`
/// metadata, or `authorization`, its gateway's key) and the common name of
/// its verified TLS client certificate.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub common_name: Option<String>,
}

impl Credentials {
    pub fn of<T>(request: &tonic::Request<T>) -> Credentials {
        let token = [crate::auth::TOKEN_METADATA, "authorization"]
            .iter()
            .find_map(|key| request.metadata().get(*key))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let common_name = request
            .extensions()
            .get::<crate::tls::ClientConnectInfo>()
            .and_then(|info| info.common_name.clone());
        Credentials { token, common_name }
    }
}
