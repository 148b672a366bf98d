//! Every error a client can see, with etcd's gRPC code and message, in one
//! place (etcd's `rpctypes`), so every handler answers the same words.

use tonic::{Code, Status};

use crate::apply::ApplyError;
use crate::auth::AuthError;
use crate::mvcc::MvccError;
use crate::raft::ProposeError;

/// etcd's client-visible errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdError {
    EmptyKey,
    KeyNotFound,
    ValueProvided,
    LeaseProvided,
    TooManyOps,
    DuplicateKey,
    Compacted,
    FutureRevision,
    NoSpace,
    Corrupt,
    LeaseNotFound,
    LeaseExists,
    LeaseTtlTooLarge,
    RequestTooLarge,
    RequestTimeout,
    NoLeader,
    Stopped,
    NotCapable,
    MemberNotFound,
    NotSupportedForLearner,
    PeerUrlExist,
    MemberBadUrls,
    MemberNotLearner,
    LearnerNotReady,
    TooManyLearners,
    NotEnoughStartedMembers,
    NotLeader,
    BadLeaderTransferee,
    LeaderTransferTimeout,
    RootUserNotExist,
    RootRoleNotExist,
    UserAlreadyExist,
    UserEmpty,
    UserNotFound,
    RoleAlreadyExist,
    RoleNotFound,
    RoleEmpty,
    AuthFailed,
    PermissionNotGiven,
    PermissionDenied,
    RoleNotGranted,
    PermissionNotGranted,
    AuthNotEnabled,
    InvalidAuthToken,
    InvalidAuthMgmt,
    AuthOldRevision,
    NoPasswordUser,
}

impl EtcdError {
    pub fn code(self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge => Code::InvalidArgument,
            Compacted | FutureRevision | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace => Code::ResourceExhausted,
            Corrupt => Code::DataLoss,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExists | PeerUrlExist | MemberNotLearner | LearnerNotReady | TooManyLearners
            | NotLeader | BadLeaderTransferee => Code::FailedPrecondition,
            LeaderTransferTimeout => Code::Unavailable,
            MemberBadUrls => Code::InvalidArgument,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | RoleNotGranted | PermissionNotGranted
            | AuthNotEnabled => Code::FailedPrecondition,
            UserEmpty | RoleEmpty | AuthFailed | PermissionNotGiven | InvalidAuthMgmt
            | AuthOldRevision => Code::InvalidArgument,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            // etcd 3.4 returns its client-side error type here, which gRPC
            // sends as Unknown.
            NoPasswordUser | NotEnoughStartedMembers => Code::Unknown,
            RequestTimeout | NoLeader | Stopped | NotCapable | NotSupportedForLearner => {
                Code::Unavailable
            }
        }
    }

    pub fn message(self) -> &'static str {
        use EtcdError::*;
        match self {
            EmptyKey => "etcdserver: key is not provided",
            KeyNotFound => "etcdserver: key not found",
            ValueProvided => "etcdserver: value is provided",
            LeaseProvided => "etcdserver: lease is provided",
            TooManyOps => "etcdserver: too many operations in txn request",
            DuplicateKey => "etcdserver: duplicate key given in txn request",
            Compacted => "etcdserver: mvcc: required revision has been compacted",
            FutureRevision => "etcdserver: mvcc: required revision is a future revision",
            NoSpace => "etcdserver: mvcc: database space exceeded",
            Corrupt => "etcdserver: corrupt cluster",
            LeaseNotFound => "etcdserver: requested lease not found",
            LeaseExists => "etcdserver: lease already exists",
            LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            RequestTooLarge => "etcdserver: request is too large",
            RequestTimeout => "etcdserver: request timed out",
            NoLeader => "etcdserver: no leader",
            Stopped => "etcdserver: server stopped",
            NotCapable => "etcdserver: not capable",
            MemberNotFound => "etcdserver: member not found",
            NotSupportedForLearner => "etcdserver: rpc not supported for learner",
            PeerUrlExist => "etcdserver: Peer URLs already exists",
            MemberBadUrls => "etcdserver: given member URLs are invalid",
            MemberNotLearner => "etcdserver: can only promote a learner member",
            LearnerNotReady => {
                "etcdserver: can only promote a learner member which is in sync with leader"
            }
            TooManyLearners => "etcdserver: too many learner members in cluster",
            NotEnoughStartedMembers => {
                "etcdserver: re-configuration failed due to not enough started members"
            }
            NotLeader => "etcdserver: not leader",
            BadLeaderTransferee => "etcdserver: bad leader transferee",
            LeaderTransferTimeout => "etcdserver: request timed out, leader transfer took too long",
            RootUserNotExist => "etcdserver: root user does not exist",
            RootRoleNotExist => "etcdserver: root user does not have root role",
            UserAlreadyExist => "etcdserver: user name already exists",
            UserEmpty => "etcdserver: user name is empty",
            UserNotFound => "etcdserver: user name not found",
            RoleAlreadyExist => "etcdserver: role name already exists",
            RoleNotFound => "etcdserver: role name not found",
            RoleEmpty => "etcdserver: role name is empty",
            AuthFailed => "etcdserver: authentication failed, invalid user ID or password",
            PermissionNotGiven => "etcdserver: permission not given",
            PermissionDenied => "etcdserver: permission denied",
            RoleNotGranted => "etcdserver: role is not granted to the user",
            PermissionNotGranted => "etcdserver: permission is not granted to the role",
            AuthNotEnabled => "etcdserver: authentication is not enabled",
            InvalidAuthToken => "etcdserver: invalid auth token",
            InvalidAuthMgmt => "etcdserver: invalid auth management",
            AuthOldRevision => "etcdserver: revision of auth store is old",
            // Not an rpctypes error: etcd passes auth's own text through.
            NoPasswordUser => {
                "auth: authentication failed, password was given for no password user"
            }
        }
    }
}

impl From<AuthError> for EtcdError {
    fn from(e: AuthError) -> EtcdError {
        use EtcdError::*;
        match e {
            AuthError::RootUserNotExist => RootUserNotExist,
            AuthError::RootRoleNotExist => RootRoleNotExist,
            AuthError::UserAlreadyExist => UserAlreadyExist,
            AuthError::UserEmpty => UserEmpty,
            AuthError::UserNotFound => UserNotFound,
            AuthError::RoleAlreadyExist => RoleAlreadyExist,
            AuthError::RoleNotFound => RoleNotFound,
            AuthError::RoleEmpty => RoleEmpty,
            AuthError::AuthFailed => AuthFailed,
            AuthError::PermissionNotGiven => PermissionNotGiven,
            AuthError::PermissionDenied => PermissionDenied,
            AuthError::RoleNotGranted => RoleNotGranted,
            AuthError::PermissionNotGranted => PermissionNotGranted,
            AuthError::AuthNotEnabled => AuthNotEnabled,
            AuthError::InvalidAuthToken => InvalidAuthToken,
            AuthError::InvalidAuthMgmt => InvalidAuthMgmt,
            AuthError::AuthOldRevision => AuthOldRevision,
            AuthError::NoPasswordUser => NoPasswordUser,
        }
    }
}

pub fn auth_status(e: AuthError) -> Status {
    EtcdError::from(e).into()
}

/// etcd's Maintenance service returns auth's errors without translating
/// them: code Unknown, auth's own text (`auth: permission denied`).
pub fn auth_status_untranslated(e: AuthError) -> Status {
    Status::unknown(format!("auth: {e}"))
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Status {
        Status::new(e.code(), e.message())
    }
}

pub fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::LeaseNotFound => EtcdError::LeaseNotFound.into(),
        ApplyError::LeaseExists => EtcdError::LeaseExists.into(),
        ApplyError::KeyNotFound => EtcdError::KeyNotFound.into(),
        ApplyError::NoSpace => EtcdError::NoSpace.into(),
        ApplyError::Corrupt => EtcdError::Corrupt.into(),
        ApplyError::Compacted => EtcdError::Compacted.into(),
        ApplyError::FutureRevision => EtcdError::FutureRevision.into(),
        ApplyError::MemberNotFound => EtcdError::MemberNotFound.into(),
        ApplyError::Auth(e) => auth_status(e),
        e @ ApplyError::MirrorGap { .. } => Status::internal(e.to_string()),
        ApplyError::Storage(e) => Status::internal(format!("etcdserver: storage failure: {e}")),
    }
}

pub fn mvcc_status(e: MvccError) -> Status {
    apply_status(e.into())
}

pub fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NoLeader => EtcdError::NoLeader.into(),
        ProposeError::Stopped => EtcdError::Stopped.into(),
        ProposeError::Unknown => EtcdError::RequestTimeout.into(),
        ProposeError::Apply(e) => apply_status(e),
    }
}
