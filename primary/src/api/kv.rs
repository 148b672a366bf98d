//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use crate::apply;
use crate::error::{apply_status, EtcdError};
use crate::member::Member;
use crate::mvcc::KeyRange;
use crate::proto::etcdserverpb::{
    kv_server::Kv, request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    TxnRequest, TxnResponse,
};
use crate::proto::ternpb::raft_request::Request as RaftReq;

pub struct KvService {
    member: Arc<Member>,
}

impl KvService {
    pub fn new(member: Arc<Member>) -> Self {
        KvService { member }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let r = request.into_inner();
        if !r.serializable {
            self.member.refuse_if_learner()?;
        }
        check_range(&r)?;
        if !r.serializable {
            self.member.linearizable_barrier().await?;
        }
        let mut resp = self
            .member
            .read(move |conn, state| {
                apply::range(conn, state, state.revision, &r).map_err(apply_status)
            })
            .await?;
        self.member.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = request.into_inner();
        check_put(&r)?;
        self.check_size(&r)?;
        self.member.check_quota(r.encoded_len()).await?;
        Ok(Response::new(
            self.member.propose_for(RaftReq::Put(r)).await?,
        ))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        self.check_size(&r)?;
        Ok(Response::new(
            self.member.propose_for(RaftReq::DeleteRange(r)).await?,
        ))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = request.into_inner();
        check_txn(&r, self.member.limits.max_txn_ops, 0)?;
        self.check_size(&r)?;
        if is_read_only(&r) {
            // etcd serves read-only txns without a proposal; serializable
            // only when every range asks for it.
            if !all_serializable(&r) {
                self.member.linearizable_barrier().await?;
            }
            let mut resp = self
                .member
                .read(move |conn, state| {
                    apply::read_only_txn(conn, state, &r).map_err(apply_status)
                })
                .await?;
            self.member.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        self.member.check_quota(r.encoded_len()).await?;
        Ok(Response::new(
            self.member.propose_for(RaftReq::Txn(r)).await?,
        ))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.member.propose_for(RaftReq::Compaction(r)).await?,
        ))
    }
}

impl KvService {
    /// etcd refuses a proposal larger than `--max-request-bytes`.
    fn check_size(&self, m: &impl Message) -> Result<(), Status> {
        if m.encoded_len() > self.member.limits.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.into());
        }
        Ok(())
    }
}

fn check_range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey.into());
    }
    Ok(())
}

fn check_put(r: &PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey.into());
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided.into());
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided.into());
    }
    Ok(())
}

/// etcd's checkTxnRequest and checkIntervals.
/// Nested txns deeper than this are refused: protobuf decoding has a
/// recursion limit, and a txn that decoded here must decode again when the
/// log entry is applied.
const MAX_TXN_DEPTH: usize = 32;

fn check_txn(r: &TxnRequest, max_ops: usize, depth: usize) -> Result<(), Status> {
    if depth > MAX_TXN_DEPTH {
        return Err(Status::invalid_argument(
            "etcdserver: txn nesting is too deep",
        ));
    }
    if r.compare.len() > max_ops || r.success.len() > max_ops || r.failure.len() > max_ops {
        return Err(EtcdError::TooManyOps.into());
    }
    for c in &r.compare {
        if c.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => check_range(r)?,
            Some(request_op::Request::RequestPut(p)) => check_put(p)?,
            Some(request_op::Request::RequestDeleteRange(d)) if d.key.is_empty() => {
                return Err(EtcdError::EmptyKey.into())
            }
            Some(request_op::Request::RequestTxn(t)) => check_txn(t, max_ops, depth + 1)?,
            _ => {}
        }
    }
    intervals(&r.success)?;
    intervals(&r.failure)?;
    Ok(())
}

/// etcd's checkIntervals for one list of ops: a key may be put at most once
/// and not also deleted. A nested txn's two branches are exclusive, so the
/// same key put in both, or put in one and deleted in the other, is fine.
/// Returns the puts and the delete ranges of the list.
fn intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<KeyRange>), Status> {
    let duplicate = || Status::from(EtcdError::DuplicateKey);
    // This level's deletes first, so nested puts are checked against them.
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                Some(KeyRange::new(&d.key, &d.range_end))
            }
            _ => None,
        })
        .collect();
    let deleted = |dels: &[KeyRange], key: &[u8]| dels.iter().any(|d| d.contains(key));
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = intervals(&t.success)?;
        let (puts_else, dels_else) = intervals(&t.failure)?;
        for key in &puts_then {
            if puts.contains(key) || deleted(&dels, key) {
                return Err(duplicate());
            }
        }
        puts.extend(puts_then.iter().cloned());
        for key in puts_else {
            if (puts.contains(&key) && !puts_then.contains(&key)) || deleted(&dels, &key) {
                return Err(duplicate());
            }
            puts.insert(key);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        if let Some(request_op::Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || deleted(&dels, &p.key) {
                return Err(duplicate());
            }
            puts.insert(p.key.clone());
        }
    }
    Ok((puts, dels))
}

fn is_read_only(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) | None => true,
            Some(request_op::Request::RequestTxn(t)) => is_read_only(t),
            _ => false,
        })
}

fn all_serializable(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(rr)) => rr.serializable,
            Some(request_op::Request::RequestTxn(t)) => all_serializable(t),
            _ => true,
        })
}
