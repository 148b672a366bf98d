//! The Lease service: Grant, Revoke, KeepAlive, TimeToLive, Leases.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{auth_status, mvcc_status, EtcdError};
use crate::lease::MAX_LEASE_TTL;
use crate::member::Member;
use crate::mvcc::read;
use crate::proto::etcdserverpb::{
    lease_client::LeaseClient, lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use crate::proto::ternpb::raft_request::Request as RaftReq;

pub struct LeaseService {
    member: Arc<Member>,
}

impl LeaseService {
    pub fn new(member: Arc<Member>) -> Self {
        LeaseService { member }
    }

    /// The keys attached to lease `id` in this member's state.
    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, Status> {
        self.member
            .read(move |conn, _| read::lease_keys(conn, id).map_err(mvcc_status))
            .await
    }
}

/// A keep-alive sent on to the leader: the TTL it granted (0: unknown).
async fn renew_at_leader(member: &Member, id: i64) -> Result<i64, Status> {
    let channel = member.leader_channel().await?;
    let answer = async {
        let mut responses = LeaseClient::new(channel)
            .lease_keep_alive(tokio_stream::iter([LeaseKeepAliveRequest { id }]))
            .await?
            .into_inner();
        responses
            .message()
            .await?
            .map(|r| r.ttl)
            .ok_or_else(|| Status::from(EtcdError::NoLeader))
    }
    .await;
    if answer.is_err() {
        member.forget_leader_channel();
    }
    answer
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        // Anyone may grant a lease, but a token that is sent must be valid
        // (etcd checks it on every request it replicates).
        self.member.caller(&request).await?;
        let mut r = request.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        if r.id == 0 {
            // The proposer picks the id, so every member applies the same.
            r.id = (self.member.next_id() & (i64::MAX as u64)) as i64;
        }
        self.member.check_quota(16).await?;
        Ok(Response::new(
            self.member
                .propose_for(RaftReq::LeaseGrant(r), None)
                .await?,
        ))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        // etcd's checkLeasePuts: revoking deletes the lease's keys, so a
        // user other than root needs write on each of them.
        let auth = &self.member.auth;
        if auth.enabled() && auth.check_admin(who.as_ref()).is_err() {
            for key in self.lease_keys(r.id).await? {
                auth.check_write(who.as_ref(), &key, &[])
                    .map_err(auth_status)?;
            }
        }
        Ok(Response::new(
            self.member
                .propose_for(RaftReq::LeaseRevoke(r), who.as_ref())
                .await?,
        ))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let member = self.member.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                // The leader keeps the lease clocks; etcd answers an unknown
                // lease with TTL 0, not an error.
                let ttl = if member.is_leader() {
                    member.lessor.renew(r.id).unwrap_or(0)
                } else {
                    match renew_at_leader(&member, r.id).await {
                        Ok(ttl) => ttl,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    }
                };
                let response = LeaseKeepAliveResponse {
                    header: Some(member.header(0)),
                    id: r.id,
                    ttl,
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let who = self.member.caller(&request).await?;
        let token = request.metadata().get(crate::auth::TOKEN_METADATA).cloned();
        let r = request.into_inner();
        // etcd's checkLeaseTimeToLive: listing the keys needs read on each.
        let auth = &self.member.auth;
        if r.keys && auth.enabled() {
            if who.is_none() {
                return Err(auth_status(crate::auth::AuthError::UserEmpty));
            }
            for key in self.lease_keys(r.id).await? {
                auth.check_range(who.as_ref(), &key, &[])
                    .map_err(auth_status)?;
            }
        }
        if !self.member.is_leader() {
            // Only the leader's clock knows the time left. The caller's
            // token goes along: the leader checks it again.
            let channel = self.member.leader_channel().await?;
            let mut forwarded = Request::new(r);
            if let Some(token) = token {
                forwarded
                    .metadata_mut()
                    .insert(crate::auth::TOKEN_METADATA, token);
            }
            let answer = LeaseClient::new(channel)
                .lease_time_to_live(forwarded)
                .await;
            if answer.is_err() {
                self.member.forget_leader_channel();
            }
            let mut response = answer?.into_inner();
            response.header = Some(self.member.header(0));
            return Ok(Response::new(response));
        }
        self.member.linearizable_barrier().await?;
        // etcd answers an unknown (or expired) lease with TTL -1, not an error.
        let expired = LeaseTimeToLiveResponse {
            header: Some(self.member.header(0)),
            id: r.id,
            ttl: -1,
            ..Default::default()
        };
        let Some(remaining) = self.member.lessor.remaining(r.id) else {
            return Ok(Response::new(expired));
        };
        let (id, want_keys) = (r.id, r.keys);
        let (granted, keys) = self
            .member
            .read(move |conn, _| {
                let granted = read::lease_ttl(conn, id).map_err(mvcc_status)?;
                let keys = if want_keys {
                    read::lease_keys(conn, id).map_err(mvcc_status)?
                } else {
                    Vec::new()
                };
                Ok((granted, keys))
            })
            .await?;
        let Some(granted) = granted else {
            return Ok(Response::new(expired));
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: Some(self.member.header(0)),
            id: r.id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.member.linearizable_barrier().await?;
        let mut leases = self
            .member
            .read(|conn, _| read::leases(conn).map_err(mvcc_status))
            .await?;
        // etcd lists leases soonest expiry first.
        let lessor = &self.member.lessor;
        leases.sort_by_key(|(id, _)| (lessor.deadline(*id), *id));
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.member.header(0)),
            leases: leases
                .into_iter()
                .map(|(id, _)| LeaseStatus { id })
                .collect(),
        }))
    }
}
