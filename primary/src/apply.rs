//! etcd's request semantics over the MVCC store.
//!
//! [`Applier::apply`] executes a committed Raft entry inside a [`Batch`];
//! [`range`] answers a RangeRequest over any connection, so a read served
//! from the read pool and a read inside a Txn behave the same.

use std::sync::Arc;

use rusqlite::Connection;

use crate::auth::{self, AuthError, AuthStore};
use crate::lease::Lessor;
use crate::mvcc::{read, Batch, KeyRange, MvccError, RangeQuery, StoreState};
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction,
    compare,
    compare::CompareResult,
    compare::CompareTarget,
    range_request::{SortOrder, SortTarget},
    request_op, response_op, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest,
    TxnResponse,
};
use crate::proto::mvccpb::KeyValue;
use crate::proto::ternpb::raft_request::Request;

/// The outcome of one applied request, handed to the client that proposed it.
#[derive(Debug, Clone)]
pub enum ApplyResult {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    Alarm(AlarmResponse),
    /// A membership change (configuration change or peer URL update) took
    /// effect; the member list after it.
    Membership(Vec<crate::mvcc::write::MemberRow>),
    /// An auth management request took effect (the handler builds its
    /// typed, header-only response).
    Auth(ResponseHeader),
    Authenticate(crate::proto::etcdserverpb::AuthenticateResponse),
    /// A follower's entry of its source's revisions took effect; the
    /// store revision after it.
    Mirrored(i64),
}

/// A response type that a proposal produces, so handlers can ask for the
/// type they expect instead of matching on [`ApplyResult`].
pub trait Applied: Sized {
    fn from_result(result: ApplyResult) -> Option<Self>;
    fn header_mut(&mut self) -> &mut Option<ResponseHeader>;
}

macro_rules! applied {
    ($($variant:ident => $response:ty),* $(,)?) => {$(
        impl Applied for $response {
            fn from_result(result: ApplyResult) -> Option<Self> {
                match result {
                    ApplyResult::$variant(r) => Some(r),
                    _ => None,
                }
            }
            fn header_mut(&mut self) -> &mut Option<ResponseHeader> {
                &mut self.header
            }
        }
    )*};
}

applied! {
    Put => PutResponse,
    DeleteRange => DeleteRangeResponse,
    Txn => TxnResponse,
    Compaction => CompactionResponse,
    LeaseGrant => LeaseGrantResponse,
    LeaseRevoke => LeaseRevokeResponse,
    Alarm => AlarmResponse,
    Authenticate => crate::proto::etcdserverpb::AuthenticateResponse,
}

/// Why a committed request was refused. Every member refuses it the same
/// way, because the decision depends only on the replicated state.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    #[error("key not found")]
    KeyNotFound,
    #[error("mvcc: database space exceeded")]
    NoSpace,
    #[error("corrupt cluster")]
    Corrupt,
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("member not found")]
    MemberNotFound,
    /// A follower's entry does not continue this store (a lost or doubled
    /// revision): nothing of it is applied.
    #[error(
        "mirror: the source's revision {got} does not follow this store's revision {expected}"
    )]
    MirrorGap { expected: i64, got: i64 },
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
    /// The state database failed; the member cannot go on applying.
    #[error("storage failure: {0}")]
    Storage(rusqlite::Error),
}

impl From<MvccError> for ApplyError {
    fn from(e: MvccError) -> Self {
        match e {
            MvccError::Compacted => ApplyError::Compacted,
            MvccError::FutureRevision => ApplyError::FutureRevision,
            MvccError::Sqlite(e) => ApplyError::Storage(e),
            // Only opening or restoring a file finds a foreign format or
            // no file, never an apply; kept as a storage failure with its
            // message if it ever did.
            e @ MvccError::Format { .. } => ApplyError::Storage(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FORMAT),
                Some(e.to_string()),
            )),
            // The batch cannot be kept: stop applying, as for a failed
            // write (see `Batch::entry_checked_first`).
            e @ MvccError::FailedAfterWriting { .. } => {
                ApplyError::Storage(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                    Some(e.to_string()),
                ))
            }
            e @ MvccError::MissingState { .. } => {
                ApplyError::Storage(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(e.to_string()),
                ))
            }
        }
    }
}

/// etcd's MemberUpdate: new peer URLs for a member, no Raft change.
fn member_update(
    b: &mut Batch<'_>,
    u: &crate::proto::etcdserverpb::MemberUpdateRequest,
) -> Result<Vec<crate::mvcc::write::MemberRow>, ApplyError> {
    use crate::mvcc::write::{members, upsert_member};
    let mut all = members(b.conn())?;
    let m = all
        .iter_mut()
        .find(|m| m.0 == u.id)
        .ok_or(ApplyError::MemberNotFound)?;
    m.2 = u.peer_ur_ls.clone();
    upsert_member(b.conn(), m)?;
    Ok(all)
}

/// etcd's publish: a starting member's name and client URLs.
fn member_attributes(
    b: &mut Batch<'_>,
    a: &crate::proto::ternpb::MemberAttributes,
) -> Result<Vec<crate::mvcc::write::MemberRow>, ApplyError> {
    use crate::mvcc::write::{members, upsert_member};
    let mut all = members(b.conn())?;
    let m = all
        .iter_mut()
        .find(|m| m.0 == a.id)
        .ok_or(ApplyError::MemberNotFound)?;
    m.1 = a.name.clone();
    m.3 = a.client_urls.clone();
    upsert_member(b.conn(), m)?;
    Ok(all)
}

/// Applies committed requests; owned by the Raft thread.
pub struct Applier {
    lessor: Arc<Lessor>,
    /// The auth state this applier writes and the API layer reads.
    auth: Arc<AuthStore>,
    /// Mirrors "a NOSPACE alarm is raised", so the check costs no query.
    nospace: bool,
    /// Mirrors "a CORRUPT alarm is raised": writes are refused (etcd's
    /// applierV3Corrupt) until it is disarmed.
    corrupt: bool,
    /// The log's last index when this process started: entries up to it
    /// were proposed before the restart, and their tokens died with it.
    replayed_through: u64,
}

impl Applier {
    pub fn new(lessor: Arc<Lessor>, conn: &Connection) -> Result<Self, MvccError> {
        let alarms = crate::mvcc::write::alarms(conn)?;
        let raised = |kind: AlarmType| alarms.iter().any(|(_, a)| *a == kind as i32);
        let (nospace, corrupt) = (raised(AlarmType::Nospace), raised(AlarmType::Corrupt));
        let auth = Arc::new(AuthStore::new(
            auth::store::load(conn).map_err(MvccError::Sqlite)?,
            std::time::Duration::from_secs(300),
        ));
        Ok(Applier {
            lessor,
            auth,
            nospace,
            corrupt,
            replayed_through: 0,
        })
    }

    /// Entries up to `index` were in the log before this process started
    /// (see [`Applier::assign_token`]).
    pub fn replaying_through(mut self, index: u64) -> Self {
        self.replayed_through = index;
        self
    }

    /// Share `auth` with the API layer instead of a private one (loaded from
    /// the same database).
    pub fn with_auth_store(mut self, auth: Arc<AuthStore>) -> Self {
        self.auth = auth;
        self
    }

    /// Apply an entry proposed by the system (no client to authorize).
    pub fn apply(
        &mut self,
        b: &mut Batch<'_>,
        request: Request,
    ) -> Result<ApplyResult, ApplyError> {
        self.apply_as(b, request, None)
    }

    /// Apply an entry; `who` is the client the proposing member checked
    /// it for (`None`: proposed by the system, e.g. lease expiry).
    pub fn apply_as(
        &mut self,
        b: &mut Batch<'_>,
        request: Request,
        who: Option<&crate::proto::ternpb::AuthInfo>,
    ) -> Result<ApplyResult, ApplyError> {
        // etcd's authApplierV3: with auth on, a client request needs a user,
        // and its check must have seen the auth state as it is now.
        if let Some(who) = who {
            let state = self.auth.state();
            if state.enabled && who.user.is_empty() && needs_user(&request) {
                return Err(AuthError::UserEmpty.into());
            }
            if state.enabled && !who.user.is_empty() && who.revision < state.revision {
                return Err(AuthError::AuthOldRevision.into());
            }
            if state.enabled {
                for lease in leases_touched(&request) {
                    self.check_lease_keys(b, who, lease)?;
                }
            }
        }
        match request {
            Request::Put(p) => {
                self.check_corrupt()?;
                self.check_space()?;
                put(b, &p, false).map(ApplyResult::Put)
            }
            Request::DeleteRange(d) => {
                self.check_corrupt()?;
                delete_range(b, &d).map(ApplyResult::DeleteRange)
            }
            Request::Txn(t) => {
                if txn_writes(&t) {
                    self.check_corrupt()?;
                    self.check_space()?;
                }
                txn(b, &t).map(ApplyResult::Txn)
            }
            Request::Compaction(c) => {
                self.check_corrupt()?;
                compact(b, &c).map(ApplyResult::Compaction)
            }
            Request::LeaseGrant(g) => {
                self.check_corrupt()?;
                self.check_space()?;
                self.lease_grant(b, &g).map(ApplyResult::LeaseGrant)
            }
            Request::LeaseRevoke(r) => {
                self.check_corrupt()?;
                self.lease_revoke(b, &r).map(ApplyResult::LeaseRevoke)
            }
            Request::Alarm(a) => self.alarm(b, &a).map(ApplyResult::Alarm),
            Request::MemberUpdate(u) => member_update(b, &u).map(ApplyResult::Membership),
            Request::MemberAttributes(a) => member_attributes(b, &a).map(ApplyResult::Membership),
            Request::AuthAssignToken(t) => self.assign_token(b, &t),
            Request::AuthEnable(_) => self.auth_change(b, |s| s.enable().map(|()| None)),
            Request::AuthDisable(_) => self.auth_change(b, |s| {
                s.disable();
                Ok(None)
            }),
            Request::AuthUserAdd(u) => self.auth_change(b, |s| {
                s.user_add(&u.name, &u.password_hash, u.no_password)
                    .map(|()| None)
            }),
            Request::AuthUserDelete(d) => {
                self.auth_change(b, |s| s.user_delete(&d.name).map(|()| Some(d.name)))
            }
            Request::AuthUserChangePassword(c) => self.auth_change(b, |s| {
                s.user_change_password(&c.name, &c.password_hash)
                    .map(|()| Some(c.name))
            }),
            Request::AuthUserGrantRole(g) => {
                self.auth_change(b, |s| s.user_grant_role(&g).map(|()| None))
            }
            Request::AuthUserRevokeRole(r) => {
                self.auth_change(b, |s| s.user_revoke_role(&r).map(|()| None))
            }
            Request::AuthRoleAdd(r) => self.auth_change(b, |s| s.role_add(&r.name).map(|()| None)),
            Request::AuthRoleDelete(r) => {
                self.auth_change(b, |s| s.role_delete(&r.role).map(|()| None))
            }
            Request::AuthRoleGrantPermission(g) => {
                self.auth_change(b, |s| s.role_grant_permission(&g).map(|()| None))
            }
            Request::AuthRoleRevokePermission(r) => {
                self.auth_change(b, |s| s.role_revoke_permission(&r).map(|()| None))
            }
            Request::Mirror(m) => self.mirror(b, &m).map(ApplyResult::Mirrored),
        }
    }

    /// A follower's entry: its source etcd's revisions, each applied at the
    /// same revision with the source's key fields, so reads and watches at
    /// any revision held answer as the source does. No quota check: the
    /// source already took these writes.
    fn mirror(
        &mut self,
        b: &mut Batch<'_>,
        m: &crate::proto::ternpb::Mirror,
    ) -> Result<i64, ApplyError> {
        use crate::proto::mvccpb::event::EventType;
        // Checked before anything changes, leases in memory included.
        if let Some(first) = m.revisions.first() {
            if first.revision != b.write_revision() {
                return Err(ApplyError::MirrorGap {
                    expected: b.write_revision(),
                    got: first.revision,
                });
            }
        }
        for g in &m.grant_leases {
            if !b.lease_exists(g.id)? {
                b.grant_lease(g.id, g.ttl)?;
                self.lessor.grant(g.id, g.ttl);
            }
        }
        for revision in &m.revisions {
            let expected = b.write_revision();
            if revision.revision != expected {
                return Err(ApplyError::MirrorGap {
                    expected,
                    got: revision.revision,
                });
            }
            for event in &revision.events {
                let Some(kv) = &event.kv else { continue };
                if event.r#type == EventType::Delete as i32 {
                    b.delete_exact(&kv.key)?;
                } else {
                    let mut kv = kv.clone();
                    kv.mod_revision = expected;
                    b.put_exact(&kv)?;
                }
            }
            b.end_revision();
        }
        for id in &m.drop_leases {
            if b.lease_exists(*id)? {
                b.forget_lease(*id)?;
                self.lessor.revoke(*id);
            }
        }
        let state = b.state();
        if m.compact_revision > state.compact_revision && m.compact_revision <= state.revision {
            b.compact(m.compact_revision)?;
        }
        Ok(b.state().revision)
    }

    /// etcd's Authenticate apply: the password was checked by the serving
    /// member; here every member learns the token. Tokens live in memory
    /// only, so one from before a restart stays unknown even when its
    /// entry is applied again after it (the state is committed every few
    /// ms, and a kill in between applies the last entries once more).
    fn assign_token(
        &mut self,
        b: &mut Batch<'_>,
        t: &crate::proto::ternpb::AuthAssignToken,
    ) -> Result<ApplyResult, ApplyError> {
        self.auth.state().can_authenticate(&t.name)?;
        let token = if b.entry_index() <= self.replayed_through {
            String::new()
        } else {
            self.auth.tokens.assign(&t.token, b.entry_index(), &t.name)
        };
        Ok(ApplyResult::Authenticate(
            crate::proto::etcdserverpb::AuthenticateResponse {
                header: Some(header(b.read_revision())),
                token,
            },
        ))
    }

    /// An auth management request: `change` runs on a copy of the auth
    /// state, which is saved with the entry and then served. `change`
    /// names a user whose tokens stop working (deleted, new password).
    fn auth_change(
        &mut self,
        b: &mut Batch<'_>,
        change: impl FnOnce(&mut auth::AuthState) -> Result<Option<String>, AuthError>,
    ) -> Result<ApplyResult, ApplyError> {
        let mut next = (*self.auth.state()).clone();
        let loses_tokens = change(&mut next)?;
        auth::store::save(b.conn(), &next).map_err(ApplyError::Storage)?;
        self.auth.replace(next);
        if let Some(user) = loses_tokens {
            self.auth.tokens.invalidate_user(&user);
        }
        Ok(ApplyResult::Auth(header(b.read_revision())))
    }

    fn check_corrupt(&self) -> Result<(), ApplyError> {
        if self.corrupt {
            Err(ApplyError::Corrupt)
        } else {
            Ok(())
        }
    }

    fn check_space(&self) -> Result<(), ApplyError> {
        if self.nospace {
            Err(ApplyError::NoSpace)
        } else {
            Ok(())
        }
    }

    fn lease_grant(
        &mut self,
        b: &mut Batch<'_>,
        g: &LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, ApplyError> {
        if b.lease_exists(g.id)? {
            return Err(ApplyError::LeaseExists);
        }
        let ttl = g.ttl.max(self.lessor.min_ttl());
        b.grant_lease(g.id, ttl)?;
        self.lessor.grant(g.id, ttl);
        Ok(LeaseGrantResponse {
            header: Some(header(b.read_revision())),
            id: g.id,
            ttl,
            error: String::new(),
        })
    }

    /// etcd's checkLeasePuts, run here against the lease's keys as they
    /// are when the entry applies (a check before proposing could miss a
    /// key attached meanwhile): revoking a lease deletes its keys, and
    /// attaching a key to a lease ties it to them, so the user must be
    /// able to write every one of them.
    fn check_lease_keys(
        &self,
        b: &Batch<'_>,
        who: &crate::proto::ternpb::AuthInfo,
        lease: i64,
    ) -> Result<(), ApplyError> {
        let keys = read::lease_keys(b.conn(), lease)?;
        if keys.is_empty() {
            return Ok(());
        }
        let user = (!who.user.is_empty()).then(|| auth::AuthInfo {
            user: who.user.clone(),
            revision: who.revision,
        });
        for key in keys {
            self.auth.check_write(user.as_ref(), &key, &[])?;
        }
        Ok(())
    }

    fn lease_revoke(
        &mut self,
        b: &mut Batch<'_>,
        r: &LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse, ApplyError> {
        if !b.lease_exists(r.id)? {
            return Err(ApplyError::LeaseNotFound);
        }
        b.revoke_lease(r.id)?;
        self.lessor.revoke(r.id);
        Ok(LeaseRevokeResponse {
            header: Some(header(b.read_revision())),
        })
    }

    fn alarm(&mut self, b: &mut Batch<'_>, a: &AlarmRequest) -> Result<AlarmResponse, ApplyError> {
        let member = |m: u64, alarm: i32| AlarmMember {
            member_id: m,
            alarm,
        };
        let mut alarms = Vec::new();
        match AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get) {
            AlarmAction::Get => {
                for (m, t) in b.alarms()? {
                    if a.alarm == AlarmType::None as i32 || a.alarm == t {
                        alarms.push(member(m, t));
                    }
                }
            }
            AlarmAction::Activate => {
                if a.alarm != AlarmType::None as i32 {
                    b.set_alarm(a.member_id, a.alarm, true)?;
                    alarms.push(member(a.member_id, a.alarm));
                }
            }
            AlarmAction::Deactivate => {
                if b.set_alarm(a.member_id, a.alarm, false)? {
                    alarms.push(member(a.member_id, a.alarm));
                }
            }
        }
        let raised = b.alarms()?;
        let raised = |kind: AlarmType| raised.iter().any(|(_, t)| *t == kind as i32);
        self.nospace = raised(AlarmType::Nospace);
        self.corrupt = raised(AlarmType::Corrupt);
        Ok(AlarmResponse {
            header: Some(header(b.read_revision())),
            alarms,
        })
    }
}

/// The leases a client request revokes or attaches keys to (etcd's
/// checkLeasePuts and checkLeasePutsTxn look at these).
fn leases_touched(request: &Request) -> Vec<i64> {
    fn txn_leases(t: &crate::proto::etcdserverpb::TxnRequest, out: &mut Vec<i64>) {
        use crate::proto::etcdserverpb::request_op::Request as Op;
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Op::RequestPut(p)) if p.lease != 0 => out.push(p.lease),
                Some(Op::RequestTxn(inner)) => txn_leases(inner, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    match request {
        Request::Put(p) if p.lease != 0 => out.push(p.lease),
        Request::Txn(t) => txn_leases(t, &mut out),
        Request::LeaseRevoke(r) => out.push(r.id),
        _ => {}
    }
    out
}

/// Requests a client may send only as a user once auth is on (etcd
/// refuses them in apply with "user name is empty"); lease grants, for
/// one, need no user.
fn needs_user(request: &Request) -> bool {
    !matches!(
        request,
        // etcd's authApplierV3 leaves compaction to any caller, even one
        // with no user.
        Request::LeaseGrant(_)
            | Request::LeaseRevoke(_)
            | Request::Compaction(_)
            | Request::Alarm(_)
            | Request::MemberUpdate(_)
            | Request::MemberAttributes(_)
            | Request::AuthAssignToken(_)
    )
}

/// A header carrying only the revision; the API layer fills in the ids and
/// the term, as etcd's does.
pub fn header(revision: i64) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}

/// Whether applying `request` checks everything that can refuse it before
/// its first write, so that only a storage failure can stop it halfway and
/// it needs no savepoint (`Batch::entry_checked_first`): a Put, and a Txn
/// whose branches hold only puts and ranges (Kubernetes' writes: compare,
/// then put, else get). `check_txn` validates those puts and ranges before
/// any of them runs, as etcd's checkRequests does; a delete or a nested
/// txn keeps the savepoint.
pub fn checked_before_writing(request: &Request) -> bool {
    match request {
        Request::Put(_) => true,
        Request::Txn(t) => t.success.iter().chain(&t.failure).all(|op| {
            matches!(
                op.request,
                Some(request_op::Request::RequestPut(_) | request_op::Request::RequestRange(_))
                    | None
            )
        }),
        _ => false,
    }
}

/// Whether a txn may write in either branch (for the NOSPACE check).
fn txn_writes(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_)) => true,
            Some(request_op::Request::RequestTxn(t)) => txn_writes(t),
            _ => false,
        })
}

/// Serve a RangeRequest against `conn` whose state is `state`.
pub fn range(
    conn: &Connection,
    state: StoreState,
    current: i64,
    r: &RangeRequest,
) -> Result<RangeResponse, ApplyError> {
    let revision = if r.revision <= 0 { current } else { r.revision };
    if revision > current {
        return Err(ApplyError::FutureRevision);
    }
    if revision < state.compact_revision {
        return Err(ApplyError::Compacted);
    }
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let order = match SortOrder::try_from(r.sort_order) {
        // etcd: results come key-ascending anyway, so another target
        // without an order means ascending.
        Ok(SortOrder::None) if target != SortTarget::Key => SortOrder::Ascend,
        Ok(order) => order,
        // etcd picks a sorter for an order it does not know, then applies
        // neither direction: the rows stay in key order.
        Err(_) => SortOrder::None,
    };
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    let sorted =
        order != SortOrder::None && !(target == SortTarget::Key && order == SortOrder::Ascend);
    // etcd fetches every row only when the request itself names an order:
    // with none (etcdctl's default) it sorts the first `limit + 1` keys
    // and cuts those, whatever the target.
    let fetch_all = sorted && r.sort_order != SortOrder::None as i32;
    let limit = if fetch_all || filtered || r.limit <= 0 {
        0
    } else {
        r.limit.saturating_add(1)
    };
    let query = RangeQuery {
        range: KeyRange::new(&r.key, &r.range_end),
        revision,
        limit,
        count_only: r.count_only,
        keys_only: r.keys_only && target != SortTarget::Value,
    };
    let result = read::range(conn, &query, current)?;
    let mut kvs = result.kvs;
    if filtered {
        kvs.retain(|kv| {
            (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
                && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
        });
    }
    if sorted {
        let key_of = |kv: &KeyValue| -> (i64, Vec<u8>) {
            match target {
                SortTarget::Key => (0, kv.key.clone()),
                SortTarget::Version => (kv.version, Vec::new()),
                SortTarget::Create => (kv.create_revision, Vec::new()),
                SortTarget::Mod => (kv.mod_revision, Vec::new()),
                SortTarget::Value => (0, kv.value.clone()),
            }
        };
        // Stable either way, so equal sort keys stay in key order (what
        // etcd's sort gives for small results).
        if order == SortOrder::Descend {
            kvs.sort_by_key(|kv| std::cmp::Reverse(key_of(kv)));
        } else {
            kvs.sort_by_key(key_of);
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: Some(header(current)),
        kvs,
        more,
        count: result.count,
    })
}

/// A Put; `checked` means a Txn already validated it against the state
/// before the txn (etcd's checkRequestPut), otherwise the lease is looked up
/// first and the key second, in etcd's order for a plain Put.
fn put(b: &mut Batch<'_>, p: &PutRequest, checked: bool) -> Result<PutResponse, ApplyError> {
    if !checked && p.lease != 0 && !b.lease_exists(p.lease)? {
        return Err(ApplyError::LeaseNotFound);
    }
    let existing = if p.ignore_value || p.ignore_lease || p.prev_kv {
        read::get_live(b.conn(), &p.key)?
    } else {
        None
    };
    let (mut value, mut lease) = (p.value.as_slice(), p.lease);
    if p.ignore_value || p.ignore_lease {
        let prev = existing.as_ref().ok_or(ApplyError::KeyNotFound)?;
        if p.ignore_value {
            value = &prev.value;
        }
        if p.ignore_lease {
            lease = prev.lease;
        }
    }
    let value = value.to_vec();
    b.put(&p.key, &value, lease)?;
    Ok(PutResponse {
        header: Some(header(b.read_revision())),
        prev_kv: if p.prev_kv { existing } else { None },
    })
}

fn delete_range(
    b: &mut Batch<'_>,
    d: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, ApplyError> {
    let deleted = b.delete_range(&KeyRange::new(&d.key, &d.range_end))?;
    Ok(DeleteRangeResponse {
        header: Some(header(b.read_revision())),
        deleted: deleted.len() as i64,
        prev_kvs: if d.prev_kv { deleted } else { Vec::new() },
    })
}

fn compact(b: &mut Batch<'_>, c: &CompactionRequest) -> Result<CompactionResponse, ApplyError> {
    let state = b.state();
    // Compacting at 0 succeeds (and removes nothing) until something was
    // compacted, as in etcd.
    if c.revision <= crate::mvcc::write::compact_main_revision(state.compact_revision) {
        return Err(ApplyError::Compacted);
    }
    if c.revision > state.revision {
        return Err(ApplyError::FutureRevision);
    }
    b.compact(c.revision)?;
    Ok(CompactionResponse {
        header: Some(header(state.revision)),
    })
}

fn txn(b: &mut Batch<'_>, t: &TxnRequest) -> Result<TxnResponse, ApplyError> {
    // etcd decides every branch, nested ones included, on the state before
    // the txn writes anything.
    let mut path = Vec::new();
    txn_path(b.conn(), t, &mut path)?;
    check_txn(b.conn(), b.state(), t, &path)?;
    let mut path = path.into_iter();
    let mut response = execute_txn(b, t, &mut path)?;
    response.header = Some(header(b.read_revision()));
    Ok(response)
}

/// etcd's checkRequests: before anything is written, every request on the
/// chosen path is checked against the state before the txn; all puts
/// first, then all ranges, so the error a client sees is etcd's.
fn check_txn(
    conn: &Connection,
    state: StoreState,
    t: &TxnRequest,
    path: &[bool],
) -> Result<(), ApplyError> {
    on_path(t, &mut path.iter().copied(), &mut |op| match op {
        request_op::Request::RequestPut(p) => {
            if (p.ignore_value || p.ignore_lease) && read::get_live(conn, &p.key)?.is_none() {
                return Err(ApplyError::KeyNotFound);
            }
            if p.lease != 0 && read::lease_ttl(conn, p.lease)?.is_none() {
                return Err(ApplyError::LeaseNotFound);
            }
            Ok(())
        }
        _ => Ok(()),
    })?;
    on_path(t, &mut path.iter().copied(), &mut |op| match op {
        request_op::Request::RequestRange(r) if r.revision != 0 => {
            if r.revision > state.revision {
                return Err(ApplyError::FutureRevision);
            }
            // etcd compares with its first revision, -1 until something
            // is compacted.
            let first = crate::mvcc::write::compact_main_revision(state.compact_revision);
            if r.revision < first {
                return Err(ApplyError::Compacted);
            }
            Ok(())
        }
        _ => Ok(()),
    })
}

/// Run `check` on every op of the branches `path` takes, nested txns
/// included, in order.
fn on_path(
    t: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
    check: &mut impl FnMut(&request_op::Request) -> Result<(), ApplyError>,
) -> Result<(), ApplyError> {
    let succeeded = path.next().unwrap_or(false);
    for op in if succeeded { &t.success } else { &t.failure } {
        match &op.request {
            Some(request_op::Request::RequestTxn(nested)) => on_path(nested, path, check)?,
            Some(request) => check(request)?,
            None => {}
        }
    }
    Ok(())
}

fn txn_path(conn: &Connection, t: &TxnRequest, path: &mut Vec<bool>) -> Result<(), ApplyError> {
    let mut ok = true;
    for c in &t.compare {
        if !compare(conn, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    for op in if ok { &t.success } else { &t.failure } {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            txn_path(conn, nested, path)?;
        }
    }
    Ok(())
}

fn execute_txn(
    b: &mut Batch<'_>,
    t: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
) -> Result<TxnResponse, ApplyError> {
    let succeeded = path.next().unwrap_or(false);
    let ops: &[RequestOp] = if succeeded { &t.success } else { &t.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                let state = b.state();
                let current = b.read_revision();
                response_op::Response::ResponseRange(range(b.conn(), state, current, r)?)
            }
            Some(request_op::Request::RequestPut(p)) => {
                response_op::Response::ResponsePut(put(b, p, true)?)
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                response_op::Response::ResponseDeleteRange(delete_range(b, d)?)
            }
            Some(request_op::Request::RequestTxn(nested)) => {
                response_op::Response::ResponseTxn(execute_txn(b, nested, path)?)
            }
            None => continue,
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    // Nested responses carry an empty header, as etcd's do; the caller
    // sets the outer one.
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded,
        responses,
    })
}

/// A txn without writes, served from a read connection at `state`.
pub fn read_only_txn(
    conn: &Connection,
    state: StoreState,
    t: &TxnRequest,
) -> Result<TxnResponse, ApplyError> {
    let mut path = Vec::new();
    txn_path(conn, t, &mut path)?;
    // etcd checks the ranges on the path of a read-only txn too.
    check_txn(conn, state, t, &path)?;
    let mut response = read_only_branch(conn, state, t, &mut path.into_iter())?;
    response.header = Some(header(state.revision));
    Ok(response)
}

fn read_only_branch(
    conn: &Connection,
    state: StoreState,
    t: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
) -> Result<TxnResponse, ApplyError> {
    let succeeded = path.next().unwrap_or(false);
    let mut responses = Vec::new();
    for op in if succeeded { &t.success } else { &t.failure } {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                response_op::Response::ResponseRange(range(conn, state, state.revision, r)?)
            }
            Some(request_op::Request::RequestTxn(nested)) => {
                response_op::Response::ResponseTxn(read_only_branch(conn, state, nested, path)?)
            }
            _ => continue,
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded,
        responses,
    })
}

/// etcd's applyCompare: every key in the range must satisfy the compare; a
/// VALUE compare on no key fails, other targets compare a zero KeyValue.
fn compare(conn: &Connection, c: &Compare) -> Result<bool, ApplyError> {
    let query = RangeQuery {
        range: KeyRange::new(&c.key, &c.range_end),
        revision: i64::MAX,
        limit: 0,
        count_only: false,
        keys_only: false,
    };
    let kvs = read::range(conn, &query, i64::MAX)?.kvs;
    let target = CompareTarget::try_from(c.target).ok();
    if kvs.is_empty() {
        if target == Some(CompareTarget::Value) {
            return Ok(false);
        }
        return Ok(compare_kv(c, target, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
}

/// etcd's compareKV, including what it does with enum values it does not
/// know (they reach it unchecked): an unknown target compares as equal,
/// and an unknown result holds.
fn compare_kv(c: &Compare, target: Option<CompareTarget>, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord = match (&c.target_union, target) {
        (Some(compare::TargetUnion::Value(v)), Some(CompareTarget::Value)) => {
            kv.value.as_slice().cmp(v.as_slice())
        }
        (Some(compare::TargetUnion::Version(v)), Some(CompareTarget::Version)) => kv.version.cmp(v),
        (Some(compare::TargetUnion::CreateRevision(v)), Some(CompareTarget::Create)) => {
            kv.create_revision.cmp(v)
        }
        (Some(compare::TargetUnion::ModRevision(v)), Some(CompareTarget::Mod)) => {
            kv.mod_revision.cmp(v)
        }
        (Some(compare::TargetUnion::Lease(v)), Some(CompareTarget::Lease)) => kv.lease.cmp(v),
        // A union that does not match the target compares against zero,
        // like etcd's generated getters do.
        (_, Some(CompareTarget::Value)) => kv.value.as_slice().cmp(&[]),
        (_, Some(CompareTarget::Version)) => kv.version.cmp(&0),
        (_, Some(CompareTarget::Create)) => kv.create_revision.cmp(&0),
        (_, Some(CompareTarget::Mod)) => kv.mod_revision.cmp(&0),
        (_, Some(CompareTarget::Lease)) => kv.lease.cmp(&0),
        (_, None) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the etcd differential fuzzer (tests/fuzz.rs): compares with
    /// enum values etcd does not know behave as in etcd's compareKV.
    #[test]
    fn unknown_compare_targets_and_results_behave_like_etcd() {
        let kv = KeyValue {
            version: 3,
            ..Default::default()
        };
        let cmp = |target: i32, result: i32| Compare {
            target,
            result,
            target_union: Some(compare::TargetUnion::Version(1)),
            ..Default::default()
        };
        let target = |c: &Compare| CompareTarget::try_from(c.target).ok();
        // Known target and result: version 3 > 1.
        let c = cmp(CompareTarget::Version as i32, CompareResult::Greater as i32);
        assert!(compare_kv(&c, target(&c), &kv));
        // An unknown target compares as equal.
        let c = cmp(99, CompareResult::Equal as i32);
        assert!(compare_kv(&c, target(&c), &kv));
        let c = cmp(99, CompareResult::Greater as i32);
        assert!(!compare_kv(&c, target(&c), &kv));
        // An unknown result holds, whatever the comparison.
        let c = cmp(CompareTarget::Version as i32, -7);
        assert!(compare_kv(&c, target(&c), &kv));
    }

    /// A fresh state in `dir` and an applier over it.
    fn store_and_applier(dir: &tempfile::TempDir) -> (crate::mvcc::MvccStore, Applier) {
        let store = crate::mvcc::MvccStore::open(&dir.path().join("state.db")).unwrap();
        let lessor = Arc::new(Lessor::new(std::time::Duration::from_secs(1)));
        let applier = Applier::new(lessor, store.connection()).unwrap();
        (store, applier)
    }

    /// Found by the differential fuzzer in CI: a sort order etcd does not
    /// know leaves the rows in key order, whatever the target (etcd's
    /// Range picks a sorter, then neither ascends nor descends).
    #[test]
    fn unknown_sort_orders_leave_key_order_like_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut applier) = store_and_applier(&dir);
        // b is written before a, so mod-revision order is b, a.
        for (index, key) in [(1, b"b"), (2, b"a")] {
            let mut b = store.batch().unwrap();
            let put = Request::Put(PutRequest {
                key: key.to_vec(),
                ..Default::default()
            });
            b.entry(index, 1, |b| applier.apply_as(b, put, None))
                .unwrap();
            b.commit().unwrap();
        }
        let keys = |sort_order: i32, limit: i64| {
            let r = RangeRequest {
                key: vec![0],
                range_end: vec![0],
                sort_order,
                sort_target: SortTarget::Mod as i32,
                limit,
                ..Default::default()
            };
            let current = store.state().revision;
            let answer = range(store.connection(), store.state(), current, &r).unwrap();
            let keys: Vec<Vec<u8>> = answer.kvs.into_iter().map(|kv| kv.key).collect();
            (keys, answer.more, answer.count)
        };
        let (b, a) = (b"b".to_vec(), b"a".to_vec());
        assert_eq!(keys(SortOrder::None as i32, 0).0, [b.clone(), a.clone()]);
        assert_eq!(keys(SortOrder::Descend as i32, 0).0, [a.clone(), b.clone()]);
        assert_eq!(keys(-1332054796, 0).0, [a.clone(), b.clone()]);
        assert_eq!(keys(7, 1), (vec![a], true, 2));
    }

    /// Also found by the differential fuzzer: a read-only txn's ranges are
    /// checked against the store's revisions as a writing txn's are.
    #[test]
    fn read_only_txns_check_range_revisions_like_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::mvcc::MvccStore::open(&dir.path().join("state.db")).unwrap();
        let txn = |revision: i64| TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"k".to_vec(),
                    revision,
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let read = |revision| read_only_txn(store.connection(), store.state(), &txn(revision));
        assert!(read(0).is_ok());
        assert!(matches!(read(-5), Err(ApplyError::Compacted)));
        // Nothing compacted yet: etcd's first revision is -1.
        assert!(read(-1).is_ok());
        assert!(matches!(read(100), Err(ApplyError::FutureRevision)));
        // Puts are checked before ranges wherever they stand, as in etcd.
        let mut both = txn(-5);
        both.success.push(RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"k".to_vec(),
                lease: 77,
                ..Default::default()
            })),
        });
        let mut path = Vec::new();
        txn_path(store.connection(), &both, &mut path).unwrap();
        assert!(matches!(
            check_txn(store.connection(), store.state(), &both, &path),
            Err(ApplyError::LeaseNotFound)
        ));
    }

    /// A txn of puts and ranges is applied without a savepoint
    /// (`checked_before_writing`), so whatever refuses it must do so
    /// before its first write: a later put's unknown lease, a later
    /// range's future or compacted revision. A refusal after a write would
    /// be a `FailedAfterWriting` storage error, which stops the node.
    #[test]
    fn txns_without_a_savepoint_are_refused_before_their_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut applier) = store_and_applier(&dir);
        let put = |key: &[u8], lease: i64| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                lease,
                ..Default::default()
            })),
        };
        let range = |revision: i64| RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"a".to_vec(),
                revision,
                ..Default::default()
            })),
        };
        let cases = [
            (vec![put(b"a", 0), put(b"b", 77)], "lease"),
            (vec![put(b"a", 0), range(100)], "future"),
            (vec![put(b"a", 0), range(-5)], "compacted"),
        ];
        for (index, (success, what)) in cases.into_iter().enumerate() {
            let request = Request::Txn(TxnRequest {
                success,
                ..Default::default()
            });
            assert!(checked_before_writing(&request), "{what}");
            let mut b = store.batch().unwrap();
            let result =
                b.entry_checked_first(index as u64 + 1, 1, |b| applier.apply_as(b, request, None));
            match (what, result) {
                ("lease", Err(ApplyError::LeaseNotFound))
                | ("future", Err(ApplyError::FutureRevision))
                | ("compacted", Err(ApplyError::Compacted)) => {}
                (what, other) => panic!("{what}: {other:?}"),
            }
            b.commit().unwrap();
            assert_eq!(store.state().revision, 1, "{what}");
        }
        // A delete or a nested txn keeps the savepoint.
        let delete = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(Default::default())),
        };
        assert!(!checked_before_writing(&Request::Txn(TxnRequest {
            failure: vec![delete],
            ..Default::default()
        })));
    }

    /// etcd's authApplierV3 at apply time: with auth on, a client's write
    /// needs a user, and is refused if auth changed after it was checked;
    /// a lease grant needs no user.
    #[test]
    fn apply_refuses_writes_checked_against_old_auth() {
        use crate::proto::etcdserverpb::{AuthRoleAddRequest, AuthUserGrantRoleRequest};
        use crate::proto::ternpb::{AuthInfo, AuthUserAdd};
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut applier) = store_and_applier(&dir);
        let mut index = 0;
        let mut apply = |r: Request, who: Option<AuthInfo>| {
            index += 1;
            let mut b = store.batch().unwrap();
            let result = b.entry(index, 1, |b| applier.apply_as(b, r, who.as_ref()));
            b.commit().unwrap();
            result
        };
        let as_user = |user: &str, revision: u64| {
            Some(AuthInfo {
                user: user.into(),
                revision,
            })
        };
        let add_root = AuthUserAdd {
            name: "root".into(),
            password_hash: "$2b$10$x".into(),
            no_password: false,
        };
        apply(Request::AuthUserAdd(add_root), None).unwrap();
        let grant = AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        };
        apply(Request::AuthUserGrantRole(grant), None).unwrap();
        apply(Request::AuthEnable(Default::default()), None).unwrap();
        let put = || {
            Request::Put(PutRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })
        };
        assert!(matches!(
            apply(put(), as_user("", 0)),
            Err(ApplyError::Auth(AuthError::UserEmpty))
        ));
        let grant = Request::LeaseGrant(LeaseGrantRequest { id: 7, ttl: 60 });
        assert!(apply(grant, as_user("", 0)).is_ok());
        let checked_at = 2;
        let role = Request::AuthRoleAdd(AuthRoleAddRequest { name: "r".into() });
        apply(role, as_user("root", checked_at)).unwrap();
        assert!(matches!(
            apply(put(), as_user("root", checked_at)),
            Err(ApplyError::Auth(AuthError::AuthOldRevision))
        ));
        assert!(apply(put(), as_user("root", checked_at + 1)).is_ok());
        // The auth state went into the database with the entries.
        let saved = crate::auth::store::load(store.connection()).unwrap();
        assert!(saved.enabled && saved.roles.contains_key("r"));
    }
}
