//! The Cluster service. Membership changes need the peer transport and
//! arrive with replication; until then they answer Unimplemented rather
//! than pretend.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::mvcc_status;
use crate::member::Member;
use crate::mvcc::write::members;
use crate::proto::etcdserverpb::{
    cluster_server::Cluster, Member as PbMember, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};

pub struct ClusterService {
    member: Arc<Member>,
}

impl ClusterService {
    pub fn new(member: Arc<Member>) -> Self {
        ClusterService { member }
    }
}

const NOT_YET: &str = "membership changes arrive with multi-member replication";

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let rows = self
            .member
            .read(|conn, _| members(conn).map_err(mvcc_status))
            .await?;
        let members = rows
            .into_iter()
            .map(|(id, name, peer_urls, client_urls, is_learner)| PbMember {
                id,
                name,
                peer_ur_ls: peer_urls,
                client_ur_ls: client_urls,
                is_learner,
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            header: Some(self.member.header_without_revision()),
            members,
        }))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
}
