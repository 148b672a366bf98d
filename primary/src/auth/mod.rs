//! etcd's v3 authentication and role-based access control.
//!
//! - [`state`]: users, roles and the enabled flag, and what each auth
//!   request does to them (etcd's `auth/store.go`), as pure logic.
//! - [`store`]: the `auth_*` tables beside the MVCC state, so auth is
//!   durable, replicated by the log, and travels in snapshots and backups.
//! - [`permissions`]: etcd's key-range permission check (`range_perm_cache.go`).
//! - [`tokens`]: simple tokens with a TTL (etcd's `--auth-token simple`).
//!
//! Who owns what: the Raft thread's applier is the only writer of the
//! state ([`AuthStore::replace`] after each auth entry, [`AuthStore::reload`]
//! after a snapshot); API handlers read it through [`AuthStore`] to check
//! every request on the member that serves it, learner included. Every
//! write carries the auth revision it was checked at; apply refuses it with
//! etcd's "revision of auth store is old" if the auth state moved since, so
//! a check and its write always see the same users and roles.

pub mod permissions;
pub mod state;
pub mod store;
pub mod tokens;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::proto::authpb::permission::Type as PermType;
pub use state::{AuthState, Role, User};
pub use tokens::Tokens;

/// etcd's name for the all-powerful user and role.
pub const ROOT: &str = "root";

/// etcd's bcrypt cost (`--bcrypt-cost` default).
pub const BCRYPT_COST: u32 = 10;

/// gRPC metadata key clients send the token in (etcd's
/// `rpctypes.TokenFieldNameGRPC`).
pub const TOKEN_METADATA: &str = "token";

/// Why an auth check or an auth request failed; each is one of etcd's
/// client-visible errors (mapped in [`crate::error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExist,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExist,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("permission not given")]
    PermissionNotGiven,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("invalid auth token")]
    InvalidAuthToken,
    #[error("invalid auth management")]
    InvalidAuthMgmt,
    #[error("revision of auth store is old")]
    AuthOldRevision,
    /// A password for a user added with `--no-password`; etcd has no gRPC
    /// error for it, so clients see it with code Unknown.
    #[error("authentication failed, password was given for no password user")]
    NoPasswordUser,
}

/// Who a request comes from: the user its token names and the auth
/// revision the check saw (etcd's `AuthInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthInfo {
    pub user: String,
    pub revision: u64,
}

/// The auth state a member serves from, and its tokens.
pub struct AuthStore {
    state: RwLock<Arc<AuthState>>,
    pub tokens: Tokens,
}

impl AuthStore {
    pub fn new(state: AuthState, token_ttl: Duration) -> Self {
        AuthStore {
            state: RwLock::new(Arc::new(state)),
            tokens: Tokens::new(token_ttl),
        }
    }

    /// The state now; a cheap handle that does not block the applier.
    pub fn state(&self) -> Arc<AuthState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn enabled(&self) -> bool {
        self.state().enabled
    }

    pub fn revision(&self) -> u64 {
        self.state().revision
    }

    /// Install the state an applied auth entry produced. Disabling auth
    /// drops every token, as etcd's token provider does.
    pub fn replace(&self, next: AuthState) {
        if !next.enabled {
            self.tokens.clear();
        }
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    /// After the state file was replaced by a snapshot at `applied`. The
    /// entries it skipped may have changed a password, removed a user or
    /// turned auth off and on, each of which revokes tokens: every token
    /// goes (clients authenticate again), and one from an entry up to
    /// `applied` will never arrive here.
    pub fn reload(&self, conn: &rusqlite::Connection, applied: u64) -> Result<(), rusqlite::Error> {
        self.tokens.clear();
        self.tokens.note_applied(applied);
        self.replace(store::load(conn)?);
        Ok(())
    }

    /// etcd's AuthInfoFromCtx for an already-extracted token: `None` when
    /// the client sent none. An unknown token is refused even with auth
    /// disabled, as etcd does (its clients then authenticate again).
    pub async fn auth_info(&self, token: Option<&str>) -> Result<Option<AuthInfo>, AuthError> {
        let Some(token) = token else {
            return Ok(None);
        };
        match self.tokens.user_of(token).await {
            Some(user) => Ok(Some(AuthInfo {
                user,
                // A simple token carries no revision: it is checked against
                // the state as it is now.
                revision: self.revision(),
            })),
            None => Err(AuthError::InvalidAuthToken),
        }
    }

    /// etcd's IsRangePermitted.
    pub fn check_range(
        &self,
        who: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        self.check_op(who, key, range_end, PermType::Read)
    }

    /// etcd's IsPutPermitted / IsDeleteRangePermitted.
    pub fn check_write(
        &self,
        who: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        self.check_op(who, key, range_end, PermType::Write)
    }

    /// etcd's isOpPermitted.
    fn check_op(
        &self,
        who: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
        kind: PermType,
    ) -> Result<(), AuthError> {
        let state = self.state();
        if !state.enabled {
            return Ok(());
        }
        let Some(who) = who else {
            return Err(AuthError::UserEmpty);
        };
        if who.revision < state.revision {
            return Err(AuthError::AuthOldRevision);
        }
        let user = state
            .users
            .get(&who.user)
            .ok_or(AuthError::PermissionDenied)?;
        if user.has_root_role() {
            return Ok(());
        }
        let roles = user.roles.iter().filter_map(|r| state.roles.get(r));
        if permissions::permitted(roles, key, range_end, kind) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// etcd's IsAdminPermitted: auth management, maintenance
    /// and membership need the root role.
    pub fn check_admin(&self, who: Option<&AuthInfo>) -> Result<(), AuthError> {
        let state = self.state();
        if !state.enabled {
            return Ok(());
        }
        let who = who
            .filter(|w| !w.user.is_empty())
            .ok_or(AuthError::UserEmpty)?;
        let user = state.users.get(&who.user).ok_or(AuthError::UserNotFound)?;
        if user.has_root_role() {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }
}
