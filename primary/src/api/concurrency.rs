//! etcd's concurrency recipes (`clientv3/concurrency` 3.4: sessions,
//! waiting for earlier keys to go), which its Lock and Election services
//! run on an in-process client. [`LocalClient`] is that client: it calls
//! this member's KV and Lease services as the caller (same token, same
//! certificate), so permissions, forwarding to the leader and the
//! learner's refusals are the ones any client gets, and the state the
//! recipes keep is ordinary keys on leases, which outlive leader changes
//! and restarts.

use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::error::EtcdError;
use crate::member::Member;
use crate::mvcc::read::prefix_end;
use crate::mvcc::KeyRange;
use crate::proto::etcdserverpb::{
    compare, kv_server::Kv, lease_server::Lease, range_request, request_op, Compare,
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::{event::EventType, Event};
use crate::watch::{StreamSink, StreamSource, WatchMessage, WatchSpec};

use super::kv::KvService;
use super::lease::LeaseService;

/// The TTL of a session etcd's services open when the request names no
/// lease (`concurrency.defaultSessionTTL`).
const DEFAULT_SESSION_TTL: i64 = 60;

/// etcd's services get their client's errors as plain Go errors, which
/// gRPC answers with code Unknown and the same message.
fn as_client_error(status: Status) -> Status {
    Status::unknown(status.message())
}

/// An etcd client inside this member, acting for one caller.
#[derive(Clone)]
pub struct LocalClient {
    member: Arc<Member>,
    metadata: MetadataMap,
    connect_info: Option<crate::tls::ClientConnectInfo>,
}

impl LocalClient {
    pub fn acting_for<T>(member: Arc<Member>, request: &Request<T>) -> Self {
        LocalClient {
            member,
            metadata: request.metadata().clone(),
            connect_info: request
                .extensions()
                .get::<crate::tls::ClientConnectInfo>()
                .cloned(),
        }
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    fn request<M>(&self, message: M) -> Request<M> {
        let mut request = Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        if let Some(info) = &self.connect_info {
            request.extensions_mut().insert(info.clone());
        }
        request
    }

    pub async fn txn(&self, txn: TxnRequest) -> Result<TxnResponse, Status> {
        let kv = KvService::new(self.member.clone());
        Ok(kv
            .txn(self.request(txn))
            .await
            .map_err(as_client_error)?
            .into_inner())
    }

    pub async fn range(&self, range: RangeRequest) -> Result<RangeResponse, Status> {
        let kv = KvService::new(self.member.clone());
        Ok(kv
            .range(self.request(range))
            .await
            .map_err(as_client_error)?
            .into_inner())
    }

    pub async fn delete(&self, key: Vec<u8>) -> Result<DeleteRangeResponse, Status> {
        let kv = KvService::new(self.member.clone());
        let request = DeleteRangeRequest {
            key,
            ..Default::default()
        };
        Ok(kv
            .delete_range(self.request(request))
            .await
            .map_err(as_client_error)?
            .into_inner())
    }

    /// `concurrency.NewSession(WithLease(lease))` as etcd's services open
    /// it, orphaned at once: the caller's lease, or (for 0) a new one of
    /// 60 s that nobody keeps alive.
    pub async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let leases = LeaseService::new(self.member.clone());
        let grant = LeaseGrantRequest {
            ttl: DEFAULT_SESSION_TTL,
            id: 0,
        };
        Ok(leases
            .lease_grant(self.request(grant))
            .await?
            .into_inner()
            .id)
    }

    /// The oldest (`first`) or newest key under `prefix` by create
    /// revision, optionally created at or before `max_create_revision`.
    pub async fn by_create(
        &self,
        prefix: &[u8],
        first: bool,
        max_create_revision: i64,
    ) -> Result<RangeResponse, Status> {
        self.range(by_create(prefix, first, max_create_revision))
            .await
    }

    /// etcd's `waitDeletes`: wait until no key under `prefix` created at or
    /// before `max_create_revision` is left; returns the header of the
    /// read that found none.
    pub async fn wait_deletes(
        &self,
        prefix: &[u8],
        max_create_revision: i64,
    ) -> Result<crate::proto::etcdserverpb::ResponseHeader, Status> {
        loop {
            let newest = self.by_create(prefix, false, max_create_revision).await?;
            let Some(kv) = newest.kvs.first() else {
                return Ok(newest.header.unwrap_or_default());
            };
            let revision = newest.header.as_ref().map_or(0, |h| h.revision);
            let mut watch = self.watch(KeyRange::Single(kv.key.clone()), revision)?;
            loop {
                let (_, events) = watch.next().await?;
                if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                    break;
                }
            }
        }
    }

    /// Watch `range` from `start_revision` (0: from now) on this member.
    pub fn watch(&self, range: KeyRange, start_revision: i64) -> Result<LocalWatch, Status> {
        let (sink, source) = StreamSink::new();
        let spec = WatchSpec {
            watch_id: 0,
            range,
            start_revision,
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
        };
        let key = self
            .member
            .hub
            .watch(spec, sink)
            .map_err(|_| Status::from(EtcdError::Compacted))?;
        Ok(LocalWatch {
            member: self.member.clone(),
            key,
            source,
        })
    }
}

/// A watcher on this member's hub, cancelled when dropped.
pub struct LocalWatch {
    member: Arc<Member>,
    key: u64,
    source: StreamSource,
}

impl LocalWatch {
    /// The next batch of events and its header revision.
    pub async fn next(&mut self) -> Result<(i64, Vec<Event>), Status> {
        loop {
            match self.source.recv().await {
                Some(WatchMessage::Events {
                    revision, events, ..
                }) => return Ok((revision, events.into_events())),
                Some(WatchMessage::Compacted { .. }) => return Err(EtcdError::Compacted.into()),
                Some(
                    WatchMessage::Created { .. }
                    | WatchMessage::Progress { .. }
                    | WatchMessage::Reply(_),
                ) => {}
                None => return Err(Status::unavailable("watcher closed")),
            }
        }
    }
}

impl Drop for LocalWatch {
    fn drop(&mut self) {
        self.member.hub.cancel(self.key);
    }
}

/// etcd's `WithFirstCreate` / `WithLastCreate` (and `WithMaxCreateRev`)
/// read of a prefix.
fn by_create(prefix: &[u8], first: bool, max_create_revision: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: if first {
            range_request::SortOrder::Ascend
        } else {
            range_request::SortOrder::Descend
        } as i32,
        sort_target: range_request::SortTarget::Create as i32,
        max_create_revision,
        ..Default::default()
    }
}

/// A compare of `key`'s create revision.
pub fn create_revision_is(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
        ..Default::default()
    }
}

pub fn put_op(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

pub fn get_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

pub fn first_created_op(prefix: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(by_create(
            prefix, true, 0,
        ))),
    }
}

pub fn delete_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                ..Default::default()
            },
        )),
    }
}

/// The range answer of a txn's `n`th response.
pub fn range_of(txn: &TxnResponse, n: usize) -> RangeResponse {
    use crate::proto::etcdserverpb::response_op::Response;
    match txn.responses.get(n).and_then(|r| r.response.clone()) {
        Some(Response::ResponseRange(range)) => range,
        _ => RangeResponse::default(),
    }
}
