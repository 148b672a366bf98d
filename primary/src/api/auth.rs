//! The Auth service: etcd's users, roles, permissions and tokens.
//!
//! Changes go through the log like every write (see [`crate::auth`]);
//! passwords are bcrypt-hashed here, on the serving member, so the log and
//! the state database never hold a plain password. Reads of users and
//! roles are served from this member's auth state after a linearizable
//! barrier (etcd sends them through the log; the answer is the same).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::apply::ApplyResult;
use crate::auth::{AuthError, AuthInfo, Tokens, BCRYPT_COST};
use crate::error::auth_status;
use crate::member::Member;
use crate::proto::etcdserverpb::{
    auth_client::AuthClient, auth_server::Auth, AuthDisableRequest, AuthDisableResponse,
    AuthEnableRequest, AuthEnableResponse, AuthRoleAddRequest, AuthRoleAddResponse,
    AuthRoleDeleteRequest, AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse,
    AuthRoleGrantPermissionRequest, AuthRoleGrantPermissionResponse, AuthRoleListRequest,
    AuthRoleListResponse, AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse,
    AuthUserAddRequest, AuthUserAddResponse, AuthUserChangePasswordRequest,
    AuthUserChangePasswordResponse, AuthUserDeleteRequest, AuthUserDeleteResponse,
    AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest, AuthUserGrantRoleResponse,
    AuthUserListRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
    AuthUserRevokeRoleResponse, AuthenticateRequest, AuthenticateResponse, ResponseHeader,
};
use crate::proto::ternpb::{self, raft_request::Request as RaftReq};

pub struct AuthService {
    member: Arc<Member>,
}

impl AuthService {
    pub fn new(member: Arc<Member>) -> Self {
        AuthService { member }
    }

    /// An auth management request: root only (once auth is on), then
    /// through the log. Returns the header of the applied entry.
    async fn manage<T>(
        &self,
        request: Request<T>,
        to_raft: impl FnOnce(T) -> RaftReq,
    ) -> Result<ResponseHeader, Status> {
        let who = self.root_caller(&request).await?;
        self.propose(to_raft(request.into_inner()), who.as_ref())
            .await
    }

    /// etcd's needAdminPermission check; the caller, for the proposal.
    async fn root_caller<T>(&self, request: &Request<T>) -> Result<Option<AuthInfo>, Status> {
        let who = self.member.caller(request).await?;
        self.member
            .auth
            .check_admin(who.as_ref())
            .map_err(auth_status)?;
        Ok(who)
    }

    async fn propose(
        &self,
        request: RaftReq,
        who: Option<&AuthInfo>,
    ) -> Result<ResponseHeader, Status> {
        let mut header = self.member.propose_for::<AuthHeader>(request, who).await?.0;
        self.member.fill(&mut header);
        Ok(header.unwrap_or_default())
    }

    /// bcrypt at etcd's cost, off the async runtime (it takes ~50 ms).
    async fn hash(password: String) -> Result<String, Status> {
        tokio::task::spawn_blocking(move || bcrypt::hash(password, BCRYPT_COST))
            .await
            .map_err(|e| Status::internal(format!("hash task failed: {e}")))?
            .map_err(|e| Status::internal(format!("bcrypt: {e}")))
    }

    /// etcd's CheckPassword: the auth revision the check saw.
    async fn check_password(&self, name: &str, password: String) -> Result<u64, Status> {
        let state = self.member.auth.state();
        if !state.enabled {
            return Err(auth_status(AuthError::AuthNotEnabled));
        }
        let user = state
            .users
            .get(name)
            .ok_or(auth_status(AuthError::AuthFailed))?;
        if user.no_password {
            return Err(auth_status(AuthError::NoPasswordUser));
        }
        let hash = user.password_hash.clone();
        let matches = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .map_err(|e| Status::internal(format!("bcrypt task failed: {e}")))?
            .unwrap_or(false);
        if !matches {
            tracing::info!(user = name, "authentication failed, invalid password");
            return Err(auth_status(AuthError::AuthFailed));
        }
        Ok(state.revision)
    }

    /// A learner cannot propose: it asks the leader for the token, then
    /// waits until it has applied the entry that made it (the token names
    /// its index), so the client can use it here at once. etcd refuses
    /// Authenticate on a learner; a cross-region reader needs it.
    async fn authenticate_at_leader(
        &self,
        r: AuthenticateRequest,
    ) -> Result<AuthenticateResponse, Status> {
        let channel = self.member.leader_channel().await?;
        let answer = AuthClient::new(channel).authenticate(r).await;
        if answer.is_err() {
            self.member.forget_leader_channel();
        }
        let mut response = answer?.into_inner();
        if self
            .member
            .auth
            .tokens
            .user_of(&response.token)
            .await
            .is_none()
        {
            return Err(crate::error::EtcdError::RequestTimeout.into());
        }
        response.header = Some(self.member.header(0));
        Ok(response)
    }

    /// User and role reads answer what the cluster committed.
    async fn read_state(&self) -> Result<Arc<crate::auth::AuthState>, Status> {
        self.member.linearizable_barrier().await?;
        Ok(self.member.auth.state())
    }
}

/// The header-only result every auth management entry produces.
struct AuthHeader(Option<ResponseHeader>);

impl crate::apply::Applied for AuthHeader {
    fn from_result(result: ApplyResult) -> Option<Self> {
        match result {
            ApplyResult::Auth(header) => Some(AuthHeader(Some(header))),
            _ => None,
        }
    }
    fn header_mut(&mut self) -> &mut Option<ResponseHeader> {
        &mut self.0
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthEnable).await?;
        Ok(Response::new(AuthEnableResponse {
            header: Some(header),
        }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthDisable).await?;
        Ok(Response::new(AuthDisableResponse {
            header: Some(header),
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let credentials = crate::member::Credentials::of(&request);
        let r = request.into_inner();
        if self.member.node.status.is_learner() {
            return Ok(Response::new(self.authenticate_at_leader(r).await?));
        }
        self.member.linearizable_barrier().await?;
        // etcd retries when auth changed between the password check and the
        // token's entry, so a token never outlives the password it proves.
        loop {
            let checked = self.check_password(&r.name, r.password.clone()).await?;
            // The token entry is replicated, and etcd checks the token a
            // request carries (if any) on every one it replicates: a bad
            // one fails a right password.
            self.member.caller_from(&credentials).await?;
            let token = ternpb::AuthAssignToken {
                name: r.name.clone(),
                token: Tokens::prefix(),
            };
            let result = self.member.propose(RaftReq::AuthAssignToken(token)).await?;
            let ApplyResult::Authenticate(mut response) = result else {
                return Err(Status::internal("authenticate produced another result"));
            };
            if checked == self.member.auth.revision() {
                self.member.fill(&mut response.header);
                return Ok(Response::new(response));
            }
        }
    }

    async fn user_add(
        &self,
        request: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let who = self.root_caller(&request).await?;
        let r = request.into_inner();
        let no_password = r.options.is_some_and(|o| o.no_password);
        let password_hash = if no_password || r.name.is_empty() {
            String::new()
        } else {
            Self::hash(r.password).await?
        };
        let add = ternpb::AuthUserAdd {
            name: r.name,
            password_hash,
            no_password,
        };
        let header = self
            .propose(RaftReq::AuthUserAdd(add), who.as_ref())
            .await?;
        Ok(Response::new(AuthUserAddResponse {
            header: Some(header),
        }))
    }

    async fn user_get(
        &self,
        request: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        // etcd: root, or the user asking about itself.
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        let state = self.read_state().await?;
        if let Err(e) = self.member.auth.check_admin(who.as_ref()) {
            if who.as_ref().is_none_or(|w| w.user != r.name) {
                return Err(auth_status(e));
            }
        }
        let user = state
            .users
            .get(&r.name)
            .ok_or(auth_status(AuthError::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse {
            header: Some(self.member.header(0)),
            roles: user.roles.clone(),
        }))
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        self.root_caller(&request).await?;
        let state = self.read_state().await?;
        Ok(Response::new(AuthUserListResponse {
            header: Some(self.member.header(0)),
            users: state.users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthUserDelete).await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: Some(header),
        }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let who = self.root_caller(&request).await?;
        let r = request.into_inner();
        let change = ternpb::AuthUserChangePassword {
            name: r.name,
            password_hash: Self::hash(r.password).await?,
        };
        let header = self
            .propose(RaftReq::AuthUserChangePassword(change), who.as_ref())
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: Some(header),
        }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthUserGrantRole).await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: Some(header),
        }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthUserRevokeRole).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: Some(header),
        }))
    }

    async fn role_add(
        &self,
        request: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthRoleAdd).await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: Some(header),
        }))
    }

    async fn role_get(
        &self,
        request: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        // etcd: root, or a user that has the role.
        let who = self.member.caller(&request).await?;
        let r = request.into_inner();
        let state = self.read_state().await?;
        if let Err(e) = self.member.auth.check_admin(who.as_ref()) {
            let has_role = who
                .as_ref()
                .and_then(|w| state.users.get(&w.user))
                .is_some_and(|u| u.roles.contains(&r.role));
            if !has_role {
                return Err(auth_status(e));
            }
        }
        let role = state
            .roles
            .get(&r.role)
            .ok_or(auth_status(AuthError::RoleNotFound))?;
        Ok(Response::new(AuthRoleGetResponse {
            header: Some(self.member.header(0)),
            perm: role.permissions.clone(),
        }))
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        self.root_caller(&request).await?;
        let state = self.read_state().await?;
        Ok(Response::new(AuthRoleListResponse {
            header: Some(self.member.header(0)),
            roles: state.roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let header = self.manage(request, RaftReq::AuthRoleDelete).await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: Some(header),
        }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let header = self
            .manage(request, RaftReq::AuthRoleGrantPermission)
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: Some(header),
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let header = self
            .manage(request, RaftReq::AuthRoleRevokePermission)
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: Some(header),
        }))
    }
}
