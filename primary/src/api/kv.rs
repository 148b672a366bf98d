//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use crate::apply;
use crate::auth::{AuthError, AuthInfo, AuthStore};
use crate::error::{apply_status, auth_status, EtcdError};
use crate::member::Member;
use crate::mvcc::{KeyRange, StoreState};
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
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        check_range(&r)?;
        // etcd's order: the read index first, then the permission check.
        // A learner gets its read index from the leader (raft-rs forwards a
        // learner's request), so it answers a linearizable read with a
        // voter's guarantee once it has applied up to that index.
        let applied = if r.serializable {
            self.member.node.status.applied_index()
        } else {
            self.member.linearizable_barrier().await?
        };
        self.member
            .auth
            .check_range(who.as_ref(), &r.key, &r.range_end)
            .map_err(auth_status)?;
        let one_key = r.range_end.is_empty();
        let read = move |conn: &rusqlite::Connection, state: StoreState| {
            apply::range(conn, state, state.revision, &r).map_err(apply_status)
        };
        let mut resp = if one_key {
            self.member.read_key_seeing(applied, read).await?
        } else {
            self.member.read_seeing(applied, read).await?
        };
        self.member.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        check_put(&r)?;
        self.check_size(&r, who.as_ref())?;
        check_put_auth(&self.member.auth, who.as_ref(), &r).map_err(auth_status)?;
        self.member.check_quota(r.encoded_len()).await?;
        Ok(Response::new(
            self.member
                .propose_for(RaftReq::Put(r), who.as_ref())
                .await?,
        ))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        self.check_size(&r, who.as_ref())?;
        check_delete_auth(&self.member.auth, who.as_ref(), &r).map_err(auth_status)?;
        Ok(Response::new(
            self.member
                .propose_for(RaftReq::DeleteRange(r), who.as_ref())
                .await?,
        ))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        // A learner serves read-only txns (as it serves ranges), no writes.
        if !is_read_only(request.get_ref()) {
            self.member.refuse_if_learner()?;
        }
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        check_txn(&r, self.member.limits.max_txn_ops, 0)?;
        self.check_size(&r, who.as_ref())?;
        let permitted = || check_txn_auth(&self.member.auth, who.as_ref(), &r);
        if is_read_only(&r) {
            // etcd serves read-only txns without a proposal; serializable
            // only when every range asks for it. As for Range, the read
            // index comes before the permission check.
            let applied = if all_serializable(&r) {
                self.member.node.status.applied_index()
            } else {
                self.member.linearizable_barrier().await?
            };
            permitted().map_err(auth_status)?;
            let mut resp = self
                .member
                .read_seeing(applied, move |conn, state| {
                    apply::read_only_txn(conn, state, &r).map_err(apply_status)
                })
                .await?;
            self.member.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        permitted().map_err(auth_status)?;
        self.member.check_quota(r.encoded_len()).await?;
        Ok(Response::new(
            self.member
                .propose_for(RaftReq::Txn(r), who.as_ref())
                .await?,
        ))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        // Like etcd 3.4, any user may compact: Kubernetes' API server
        // compacts as the (non-root) user it stores its objects as.
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        Ok(Response::new(
            self.member
                .propose_for(RaftReq::Compaction(r), who.as_ref())
                .await?,
        ))
    }
}

impl KvService {
    /// etcd refuses a proposal larger than `--max-request-bytes`, measured
    /// as the `InternalRaftRequest` it replicates: the request as a field,
    /// and a header with the request's id (etcd's idutil, whose top bits
    /// are the member id's low 16) and, with auth on, the caller.
    fn check_size(&self, m: &impl Message, who: Option<&AuthInfo>) -> Result<(), Status> {
        use prost::encoding::encoded_len_varint;
        let request = m.encoded_len();
        let id = ((self.member.member_id & 0xffff) << 48) | (1 << 47);
        let mut header = 1 + encoded_len_varint(id);
        if let Some(who) = who.filter(|_| self.member.auth.enabled()) {
            header += 1 + encoded_len_varint(who.user.len() as u64) + who.user.len();
            if who.revision != 0 {
                header += 1 + encoded_len_varint(who.revision);
            }
        }
        // Field 100 (the header) takes a 2-byte tag; the request's field 1.
        let whole = (2 + encoded_len_varint(header as u64) + header)
            + (1 + encoded_len_varint(request as u64) + request);
        if whole > self.member.limits.max_request_bytes {
            return Err(EtcdError::RequestTooLarge.into());
        }
        Ok(())
    }
}

/// etcd's authApplierV3.Put: write on the key, and read too when the
/// previous value is returned.
fn check_put_auth(
    auth: &AuthStore,
    who: Option<&AuthInfo>,
    r: &PutRequest,
) -> Result<(), AuthError> {
    auth.check_write(who, &r.key, &[])?;
    if r.prev_kv {
        auth.check_range(who, &r.key, &[])?;
    }
    Ok(())
}

/// etcd's authApplierV3.DeleteRange: write on the range, read too with
/// prev_kv.
fn check_delete_auth(
    auth: &AuthStore,
    who: Option<&AuthInfo>,
    r: &DeleteRangeRequest,
) -> Result<(), AuthError> {
    auth.check_write(who, &r.key, &r.range_end)?;
    if r.prev_kv {
        auth.check_range(who, &r.key, &r.range_end)?;
    }
    Ok(())
}

/// etcd's checkTxnAuth: read on every compare, and every op of both
/// branches as if it ran alone (whichever branch is taken). Nested txns
/// are checked the same way (etcd 3.4 skips them; that is a hole, not a
/// behaviour to copy).
fn check_txn_auth(
    auth: &AuthStore,
    who: Option<&AuthInfo>,
    t: &TxnRequest,
) -> Result<(), AuthError> {
    for c in &t.compare {
        auth.check_range(who, &c.key, &c.range_end)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                auth.check_range(who, &r.key, &r.range_end)?
            }
            Some(request_op::Request::RequestPut(p)) => {
                // As for a lone Put: the previous value is a read.
                if p.prev_kv {
                    auth.check_range(who, &p.key, &[])?;
                }
                auth.check_write(who, &p.key, &[])?
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                if d.prev_kv {
                    auth.check_range(who, &d.key, &d.range_end)?;
                }
                auth.check_write(who, &d.key, &d.range_end)?;
            }
            Some(request_op::Request::RequestTxn(nested)) => check_txn_auth(auth, who, nested)?,
            None => {}
        }
    }
    Ok(())
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

/// Nested txns deeper than this are refused: protobuf decoding has a
/// recursion limit, and a txn that decoded here must decode again when the
/// log entry is applied.
const MAX_TXN_DEPTH: usize = 32;

/// etcd's checks, in etcd's order (clients see the first error etcd would
/// give): checkTxnRequest over the whole tree, then checkIntervals.
fn check_txn(r: &TxnRequest, max_ops: usize, depth: usize) -> Result<(), Status> {
    check_txn_ops(r, max_ops, depth)?;
    intervals(&r.success)?;
    intervals(&r.failure)?;
    Ok(())
}

/// etcd's checkTxnRequest: a nested txn gets what its parent left of the
/// op budget, and an op with no request is refused as etcd refuses it.
fn check_txn_ops(r: &TxnRequest, max_ops: usize, depth: usize) -> Result<(), Status> {
    if depth > MAX_TXN_DEPTH {
        return Err(Status::invalid_argument(
            "etcdserver: txn nesting is too deep",
        ));
    }
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len());
    if ops > max_ops {
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
            Some(request_op::Request::RequestDeleteRange(d)) => {
                if d.key.is_empty() {
                    return Err(EtcdError::EmptyKey.into());
                }
            }
            Some(request_op::Request::RequestTxn(t)) => check_txn_ops(t, max_ops - ops, depth + 1)?,
            None => return Err(EtcdError::KeyNotFound.into()),
        }
    }
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
            Some(request_op::Request::RequestDeleteRange(d)) => Some(checked_interval(d)),
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

/// The interval etcd checks a delete against: `[key, range_end)` taken
/// literally, so a "from key" end (`\0`) makes it empty and such a delete
/// conflicts with no put (etcd accepts `del a --from-key` and `put a` in
/// one txn, and clients rely on what etcd accepts).
fn checked_interval(d: &DeleteRangeRequest) -> KeyRange {
    if d.range_end.is_empty() {
        KeyRange::Single(d.key.clone())
    } else {
        KeyRange::Between(d.key.clone(), d.range_end.clone())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn del(key: &str, range_end: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.into(),
                    range_end: range_end.to_vec(),
                    ..Default::default()
                },
            )),
        }
    }

    fn check(ops: Vec<RequestOp>) -> Result<(), String> {
        let txn = TxnRequest {
            success: ops,
            ..Default::default()
        };
        check_txn(&txn, 128, 0).map_err(|s| s.message().to_string())
    }

    /// Found by the etcd differential fuzzer (tests/fuzz.rs): etcd checks
    /// a delete's literal interval, so a "from key" delete overlaps no put.
    #[test]
    fn duplicate_keys_are_judged_like_etcd() {
        let dup = Err("etcdserver: duplicate key given in txn request".to_string());
        assert_eq!(check(vec![del("a", b"\0"), put("a")]), Ok(()));
        assert_eq!(check(vec![del("a", b"\0"), put("b")]), Ok(()));
        assert_eq!(check(vec![del("c", b"a"), put("b")]), Ok(()));
        assert_eq!(check(vec![del("a", b"c"), put("b")]), dup);
        assert_eq!(check(vec![del("a", b"b"), put("ab")]), dup);
        assert_eq!(check(vec![del("a", b""), put("a")]), dup);
        assert_eq!(check(vec![put("a"), put("a")]), dup);
    }

    /// Also found by the differential fuzzer: etcd refuses an op with no
    /// request, gives a nested txn only what is left of the op budget, and
    /// reports an invalid op before a duplicate key anywhere in the tree.
    #[test]
    fn txn_checks_run_in_etcds_order_with_etcds_budget() {
        let empty = RequestOp { request: None };
        assert_eq!(
            check(vec![empty]),
            Err("etcdserver: key not found".to_string())
        );
        let nested = |success: Vec<RequestOp>| RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                success,
                ..Default::default()
            })),
        };
        let put_ops = |n: usize| (0..n).map(|i| put(&format!("k{i}"))).collect::<Vec<_>>();
        let too_many = Err("etcdserver: too many operations in txn request".to_string());
        // 2 ops at the top leave 126 for a nested txn.
        assert_eq!(check(vec![nested(put_ops(126)), put("x")]), Ok(()));
        assert_eq!(check(vec![nested(put_ops(127)), put("x")]), too_many);
        let bad_put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest::default())),
        };
        assert_eq!(
            check(vec![nested(vec![put("a"), put("a")]), bad_put]),
            Err("etcdserver: key is not provided".to_string())
        );
    }
}
