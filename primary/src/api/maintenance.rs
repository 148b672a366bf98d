//! The Maintenance service: Status, Snapshot, HashKV, Defragment, Alarm.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{mvcc_status, EtcdError};
use crate::member::Member;
use crate::mvcc::etcd_snapshot::write_etcd_snapshot;
use crate::mvcc::{read, schema};
use crate::proto::etcdserverpb::{
    maintenance_server::Maintenance, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest,
    DefragmentResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use crate::proto::ternpb::raft_request::Request as RaftReq;

/// etcd's snapshot chunk size.
const SNAPSHOT_CHUNK: usize = 32 * 1024;

/// The etcd API version Tern speaks; clients gate features on it.
pub const ETCD_VERSION: &str = "3.4.23";

pub struct MaintenanceService {
    member: Arc<Member>,
}

impl MaintenanceService {
    pub fn new(member: Arc<Member>) -> Self {
        MaintenanceService { member }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

impl MaintenanceService {
    /// etcd's authMaintenanceServer: root only, with auth's errors as they
    /// are (see [`crate::error::auth_status_untranslated`]).
    async fn require_root<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let untranslated = crate::error::auth_status_untranslated;
        let who = self
            .member
            .caller_untranslated(&crate::member::Credentials::of(request))
            .await
            .map_err(untranslated)?;
        self.member
            .auth
            .check_admin(who.as_ref())
            .map_err(untranslated)
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // No permission is needed, but a token that is sent must be valid;
        // etcd 3.4 passes auth's error through untranslated here.
        self.member
            .caller_untranslated(&crate::member::Credentials::of(&request))
            .await
            .map_err(crate::error::auth_status_untranslated)?;
        let mut response: AlarmResponse = self
            .member
            .propose_for(RaftReq::Alarm(request.into_inner()), None)
            .await?;
        // etcd 3.4 answers Alarm with no header.
        response.header = None;
        Ok(Response::new(response))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let status = &self.member.node.status;
        let ((db_size, in_use), alarms) = self
            .member
            .read(|conn, _| {
                let size = read::db_size(conn).map_err(mvcc_status)?;
                let alarms = crate::mvcc::write::alarms(conn).map_err(mvcc_status)?;
                Ok((size, alarms))
            })
            .await?;
        let leader = status.leader();
        let mut errors = Vec::new();
        if leader == 0 {
            errors.push(EtcdError::NoLeader.message().to_string());
        }
        for (member, alarm) in alarms {
            let name = AlarmType::try_from(alarm)
                .map_or("UNKNOWN".into(), |a| a.as_str_name().to_string());
            errors.push(format!("memberID:{member} alarm:{name} "));
        }
        Ok(Response::new(StatusResponse {
            header: Some(self.member.header(0)),
            version: ETCD_VERSION.into(),
            db_size: db_size + wal_size(&self.member.data_dir),
            leader,
            raft_index: status
                .commit_index
                .load(std::sync::atomic::Ordering::Acquire),
            raft_term: status.term(),
            raft_applied_index: status
                .applied_index
                .load(std::sync::atomic::Ordering::Acquire),
            errors,
            db_size_in_use: in_use,
            is_learner: status.serves_as_learner(),
        }))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.require_root(&request).await?;
        self.member
            .node
            .defragment()
            .await
            .map_err(Status::internal)?;
        // etcd 3.4 answers with no header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    /// etcd's Hash covers its whole backend, not only the keys: the same
    /// etcd 3.4 backend the Snapshot RPC streams is written from one read
    /// transaction and hashed as etcd hashes its own.
    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.require_root(&request).await?;
        let failed = |e: &dyn std::fmt::Display| Status::internal(format!("hash: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("hash-")
            .tempdir_in(&self.member.data_dir)
            .map_err(|e| failed(&e))?;
        let path = dir.path().join("backend.db");
        let source = self.member.data_dir.join("state.db");
        // etcd commits its backend first: everything applied is in it.
        self.member
            .visible(self.member.node.status.applied_index())
            .await?;
        let (hash, revision) =
            tokio::task::spawn_blocking(move || -> Result<(u32, i64), Status> {
                let mut conn = schema::open_reader(&source).map_err(mvcc_status)?;
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)
                    .map_err(|e| mvcc_status(e.into()))?;
                let revision = read::store_state(&tx).map_err(mvcc_status)?.revision;
                write_etcd_snapshot(&tx, &path).map_err(|e| failed(&e))?;
                let hash =
                    crate::mvcc::etcd_snapshot::backend_hash(&path).map_err(|e| failed(&e))?;
                Ok((hash, revision))
            })
            .await
            .map_err(|e| failed(&e))??;
        drop(dir);
        Ok(Response::new(HashResponse {
            header: Some(self.member.header(revision)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.require_root(&request).await?;
        let wanted = request.into_inner().revision;
        let (hash, revision, compact_revision) = self
            .member
            .read(move |conn, state| {
                // etcd: a revision at or below the compaction is gone.
                if wanted > 0 && state.compact_revision > 0 && wanted <= state.compact_revision {
                    return Err(EtcdError::Compacted.into());
                }
                if wanted > state.revision {
                    return Err(EtcdError::FutureRevision.into());
                }
                let revision = if wanted <= 0 { state.revision } else { wanted };
                let hash =
                    read::hash(conn, revision, state.compact_revision).map_err(mvcc_status)?;
                // etcd's compactMainRev is -1 until the first compaction.
                let compacted = if state.compact_revision > 0 {
                    state.compact_revision
                } else {
                    -1
                };
                Ok((hash, state.revision, compacted))
            })
            .await?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.member.header(revision)),
            hash,
            compact_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// The state as an etcd 3.4 bbolt backend, written from one SQLite read
    /// transaction (one revision) and streamed in chunks followed by its
    /// sha256, as etcd streams its bbolt file; `etcdctl snapshot restore`
    /// reads it like etcd's.
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.require_root(&request).await?;
        let dir = tempfile::Builder::new()
            .prefix("snapshot-")
            .tempdir_in(&self.member.data_dir)
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?;
        let path = dir.path().join("snapshot.db");
        let dest = path.clone();
        // etcd commits its backend first: everything applied is in it.
        self.member
            .visible(self.member.node.status.applied_index())
            .await?;
        let source = self.member.data_dir.join("state.db");
        tokio::task::spawn_blocking(move || -> Result<(), Status> {
            let mut conn = schema::open_reader(&source).map_err(mvcc_status)?;
            // Deferred: the snapshot of the database is fixed at the first
            // read, and every bucket is read inside it.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)
                .map_err(|e| mvcc_status(e.into()))?;
            write_etcd_snapshot(&tx, &dest).map_err(|e| Status::internal(e.to_string()))
        })
        .await
        .map_err(|e| Status::internal(format!("snapshot: {e}")))??;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?;
        let total = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?
            .len();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // The temporary directory lives until the stream is done.
            let _dir = dir;
            let mut sha = Sha256::new();
            let mut sent = 0u64;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            while sent < total {
                let n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("snapshot: {e}"))))
                            .await;
                        return;
                    }
                };
                sent += n as u64;
                sha.update(&buf[..n]);
                let chunk = SnapshotResponse {
                    header: None,
                    remaining_bytes: total - sent,
                    blob: buf[..n].to_vec(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(Ok(SnapshotResponse {
                    header: None,
                    remaining_bytes: 0,
                    blob: sha.finalize().to_vec(),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        // etcd looks at the leader and the transferee before the caller.
        let target = request.get_ref().target_id;
        if !self.member.is_leader() {
            return Err(EtcdError::NotLeader.into());
        }
        let voters = self
            .member
            .read(|conn, _| crate::mvcc::write::members(conn).map_err(mvcc_status))
            .await?;
        if !voters.iter().any(|m| m.0 == target && !m.4) {
            return Err(EtcdError::BadLeaderTransferee.into());
        }
        self.require_root(&request).await?;
        let status = &self.member.node.status;
        if target != self.member.member_id {
            self.member
                .node
                .transfer_leader(target)
                .map_err(crate::error::propose_status)?;
            let deadline = tokio::time::Instant::now() + crate::member::REQUEST_TIMEOUT;
            while status.leader() != target {
                if tokio::time::Instant::now() >= deadline {
                    return Err(EtcdError::LeaderTransferTimeout.into());
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        // etcd 3.4 answers with no header.
        Ok(Response::new(MoveLeaderResponse { header: None }))
    }
}

/// Bytes in the state database's WAL, counted in db size like etcd counts
/// its whole file.
fn wal_size(data_dir: &std::path::Path) -> i64 {
    std::fs::metadata(data_dir.join("state.db-wal")).map_or(0, |m| m.len() as i64)
}
