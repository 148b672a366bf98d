//! The Cluster service: the member list and etcd's membership workflow
//! (`member add [--learner]`, `promote`, `update`, `remove`). Adding,
//! promoting and removing are Raft configuration changes; the entry also
//! carries the member's row, so every member updates its list in the same
//! apply. A peer URL update is an ordinary entry.

use std::sync::Arc;

use raft::eraftpb::ConfChangeType;
use tonic::{Request, Response, Status};

use crate::apply::ApplyResult;
use crate::error::{mvcc_status, propose_status, EtcdError};
use crate::member::{Member, REQUEST_TIMEOUT};
use crate::mvcc::write::{members, MemberRow};
use crate::proto::etcdserverpb::{
    cluster_client::ClusterClient, cluster_server::Cluster, Member as PbMember, MemberAddRequest,
    MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};
use crate::proto::ternpb::{raft_request::Request as RaftReq, MemberChange};

/// etcd's readiness bar for promotion: the learner's log matches at least
/// this share of the leader's.
const PROMOTE_READY: f64 = 0.9;

pub struct ClusterService {
    member: Arc<Member>,
}

impl ClusterService {
    pub fn new(member: Arc<Member>) -> Self {
        ClusterService { member }
    }

    async fn members(&self) -> Result<Vec<MemberRow>, Status> {
        self.member
            .read(|conn, _| members(conn).map_err(mvcc_status))
            .await
    }

    async fn change(
        &self,
        kind: ConfChangeType,
        change: MemberChange,
    ) -> Result<Vec<PbMember>, Status> {
        let result =
            tokio::time::timeout(REQUEST_TIMEOUT, self.member.node.conf_change(kind, change))
                .await
                .map_err(|_| Status::from(EtcdError::RequestTimeout))?
                .map_err(propose_status)?;
        match result {
            ApplyResult::Membership(rows) => Ok(rows.into_iter().map(pb_member).collect()),
            _ => Err(Status::internal(
                "configuration change produced another result",
            )),
        }
    }
}

pub fn pb_member(row: MemberRow) -> PbMember {
    let (id, name, peer_urls, client_urls, is_learner) = row;
    PbMember {
        id,
        name,
        peer_ur_ls: peer_urls,
        client_ur_ls: client_urls,
        is_learner,
    }
}

fn valid_urls(urls: &[String]) -> bool {
    !urls.is_empty()
        && urls.iter().all(|u| {
            url::Url::parse(u).is_ok_and(|p| {
                matches!(p.scheme(), "http" | "https")
                    && p.host_str().is_some()
                    && p.port().is_some()
            })
        })
}

/// `urls` as etcd's `types.NewURLs` takes them for a new member: trimmed,
/// the scheme in lower case, http(s) ones with a host and port and no
/// path, unix(s) ones as given, all sorted; `None` if any is refused.
fn normalized_peer_urls(urls: &[String]) -> Option<Vec<String>> {
    if urls.is_empty() {
        return None;
    }
    let mut normalized = urls
        .iter()
        .map(|u| {
            let (scheme, rest) = u.trim().split_once("://")?;
            let scheme = scheme.to_ascii_lowercase();
            let url = format!("{scheme}://{rest}");
            match scheme.as_str() {
                "http" | "https" => {
                    let parsed = url::Url::parse(&url).ok()?;
                    let has_path = rest.contains('/');
                    (parsed.host_str().is_some() && parsed.port().is_some() && !has_path)
                        .then_some(url)
                }
                "unix" | "unixs" => Some(url),
                _ => None,
            }
        })
        .collect::<Option<Vec<String>>>()?;
    normalized.sort();
    Some(normalized)
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.member.refuse_if_learner()?;
        // etcd's checkMembershipOperationPermission.
        self.member.require_root(&request).await?;
        let mut r = request.into_inner();
        r.peer_ur_ls = normalized_peer_urls(&r.peer_ur_ls).ok_or(EtcdError::MemberBadUrls)?;
        let existing = self.members().await?;
        if existing
            .iter()
            .any(|m| m.2.iter().any(|u| r.peer_ur_ls.contains(u)))
        {
            return Err(EtcdError::PeerUrlExist.into());
        }
        let learners = existing.iter().filter(|m| m.4).count();
        if r.is_learner && learners >= self.member.limits.max_learners {
            return Err(EtcdError::TooManyLearners.into());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let id = crate::identity::member_id(
            &r.peer_ur_ls,
            &format!("{:x}", self.member.cluster_id),
            Some(now),
        );
        let kind = if r.is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        let change = MemberChange {
            id,
            peer_urls: r.peer_ur_ls.clone(),
            is_learner: r.is_learner,
            ..Default::default()
        };
        let members = self.change(kind, change).await?;
        Ok(Response::new(MemberAddResponse {
            header: Some(self.member.header_without_revision()),
            member: Some(PbMember {
                id,
                name: String::new(),
                peer_ur_ls: r.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: r.is_learner,
            }),
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.member.refuse_if_learner()?;
        // etcd's checkMembershipOperationPermission.
        self.member.require_root(&request).await?;
        let id = request.into_inner().id;
        let existing = self.members().await?;
        let Some(removed) = existing.iter().find(|m| m.0 == id) else {
            return Err(EtcdError::MemberNotFound.into());
        };
        // etcd's strict reconfiguration check (IsReadyToRemoveVotingMember):
        // the voters left must make a quorum of themselves. The last voter
        // cannot go; removing it would stop the cluster for good.
        if !removed.4 {
            let voters_left = existing.iter().filter(|m| !m.4 && m.0 != id).count();
            if voters_left == 0 {
                return Err(EtcdError::NotEnoughStartedMembers.into());
            }
        }
        let change = MemberChange {
            id,
            ..Default::default()
        };
        let members = self.change(ConfChangeType::RemoveNode, change).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.member.header_without_revision()),
            members,
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.member.refuse_if_learner()?;
        // etcd's checkMembershipOperationPermission.
        self.member.require_root(&request).await?;
        let r = request.into_inner();
        // etcd looks the member up before it looks at the URLs.
        let existing = self.members().await?;
        if !existing.iter().any(|m| m.0 == r.id) {
            return Err(EtcdError::MemberNotFound.into());
        }
        if !valid_urls(&r.peer_ur_ls) {
            return Err(EtcdError::MemberBadUrls.into());
        }
        if existing
            .iter()
            .any(|m| m.0 != r.id && m.2.iter().any(|u| r.peer_ur_ls.contains(u)))
        {
            return Err(EtcdError::PeerUrlExist.into());
        }
        let result = self.member.propose(RaftReq::MemberUpdate(r)).await?;
        let ApplyResult::Membership(rows) = result else {
            return Err(Status::internal("member update produced another result"));
        };
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.member.header_without_revision()),
            members: rows.into_iter().map(pb_member).collect(),
        }))
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.member.refuse_if_learner()?;
        let members = self.members().await?.into_iter().map(pb_member).collect();
        Ok(Response::new(MemberListResponse {
            header: Some(self.member.header_without_revision()),
            members,
        }))
    }

    /// Only the leader knows how far the learner is: a follower asks it.
    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.member.refuse_if_learner()?;
        // etcd's checkMembershipOperationPermission.
        self.member.require_root(&request).await?;
        let token = request.metadata().get(crate::auth::TOKEN_METADATA).cloned();
        let id = request.into_inner().id;
        if !self.member.is_leader() {
            let channel = self.member.leader_channel().await?;
            // The leader checks the caller again: pass the token on.
            let mut forwarded = Request::new(MemberPromoteRequest { id });
            if let Some(token) = token {
                forwarded
                    .metadata_mut()
                    .insert(crate::auth::TOKEN_METADATA, token);
            }
            let answer = ClusterClient::new(channel).member_promote(forwarded).await;
            if answer.is_err() {
                self.member.forget_leader_channel();
            }
            let mut response = answer?.into_inner();
            response.header = Some(self.member.header_without_revision());
            return Ok(Response::new(response));
        }
        let existing = self.members().await?;
        let Some(row) = existing.iter().find(|m| m.0 == id) else {
            return Err(EtcdError::MemberNotFound.into());
        };
        if !row.4 {
            return Err(EtcdError::MemberNotLearner.into());
        }
        let progress = self
            .member
            .node
            .progress()
            .await
            .map_err(propose_status)?
            .ok_or_else(|| Status::from(EtcdError::NotLeader))?;
        let leader_match = progress
            .matched
            .get(&self.member.member_id)
            .copied()
            .unwrap_or(progress.last_index);
        let learner_match = progress.matched.get(&id).copied().unwrap_or(0);
        if (learner_match as f64) < (leader_match as f64) * PROMOTE_READY {
            return Err(EtcdError::LearnerNotReady.into());
        }
        let change = MemberChange {
            id,
            name: row.1.clone(),
            peer_urls: row.2.clone(),
            is_learner: false,
            ..Default::default()
        };
        let members = self.change(ConfChangeType::AddNode, change).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.member.header_without_revision()),
            members,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| u.to_string()).collect()
    }

    #[test]
    fn new_members_urls_are_read_as_etcd_reads_them() {
        assert_eq!(
            normalized_peer_urls(&urls(&["HTTP://127.0.0.1:2", " http://127.0.0.1:1"])),
            Some(urls(&["http://127.0.0.1:1", "http://127.0.0.1:2"]))
        );
        assert_eq!(
            normalized_peer_urls(&urls(&["unix://127.0.0.1:9"])),
            Some(urls(&["unix://127.0.0.1:9"]))
        );
        for refused in [
            &[][..],
            &["http://127.0.0.1:1/"],
            &["https://127.0.0.1:1/path"],
            &["http://127.0.0.1"],
            &["ftp://127.0.0.1:1"],
            &["127.0.0.1:1"],
        ] {
            assert_eq!(normalized_peer_urls(&urls(refused)), None, "{refused:?}");
        }
    }
}
