//! Model-based property test of the MVCC store against etcd's semantics.
//!
//! Random sequences of etcd requests run against the real store (through
//! [`Applier`] inside [`Batch`]es, reads through the read pool, a bare
//! reader connection and the writer's connection) and against a plain
//! in-memory model that keeps every key of every revision. Every answer,
//! every error, the events each batch commits, the replayed history and the
//! state at every revision still readable must agree.
//!
//! The expected answers follow etcd v3.6 (`server/etcdserver/txn`,
//! `server/storage/mvcc`), including details a client can observe:
//! - a standalone Put checks its lease before `ignore_value`/`ignore_lease`
//!   (etcd's `txn.Put`), a Put inside a Txn checks the key first
//!   (`checkPut`);
//! - a Txn checks every Range and Put on its chosen path against the state
//!   before the Txn (`checkTxn`): a Range at a revision above that state is
//!   a future revision even after the Txn's own writes;
//! - a nested Txn's response carries an empty header (`newTxnResp`); only
//!   the outermost one gets the revision;
//! - sorting on a non-key target keeps ties in key order in both directions
//!   (Go's `sort.Sort` is an insertion sort for up to 12 elements, and the
//!   key space here has 11 keys);
//! - a watcher's `prev_kv` is the state at `mod_revision - 1`, absent when
//!   that revision is compacted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rusqlite::Connection;

use super::{read, schema, KeyRange, MvccStore, Reader, StoreState};
use crate::apply::{self, Applier, ApplyError, ApplyResult};
use crate::lease::Lessor;
use crate::proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op, response_op, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::proto::ternpb::raft_request::Request;

// ---------------------------------------------------------------------------
// Generated operations
// ---------------------------------------------------------------------------

/// Keys that get written: few, so operations collide; "k" is a prefix of
/// "k/1".."k/3" and "k0" sits just past the "k/" prefix range.
const KEYS: &[&str] = &["a", "b", "c", "d", "e", "f", "k", "k/1", "k/2", "k/3", "k0"];
/// Keys never written: misses and range bounds.
const ABSENT: &[&str] = &["ab", "k/", "z"];
const PREFIXES: &[&str] = &["a", "c", "k", "k/", "z"];
const VALUES: &[&str] = &["", "0", "1", "2", "10"];
/// A lease id never granted (the test grants ids 1 to 3).
const MISSING_LEASE: i64 = 9;

/// A key or range, as etcd encodes it in `key`/`range_end`.
#[derive(Debug, Clone)]
enum Keys {
    One(&'static str),
    Prefix(&'static str),
    From(&'static str),
    Between(&'static str, &'static str),
    /// `key = range_end = "\0"`: every key.
    All,
}

impl Keys {
    fn bounds(&self) -> (Vec<u8>, Vec<u8>) {
        match *self {
            Keys::One(k) => (k.into(), Vec::new()),
            Keys::Prefix(p) => (p.into(), read::prefix_end(p.as_bytes())),
            Keys::From(k) => (k.into(), vec![0]),
            Keys::Between(a, b) => (a.into(), b.into()),
            Keys::All => (vec![0], vec![0]),
        }
    }
}

/// Whether `key` is in etcd's `[start, end)`, `end` empty meaning exactly
/// `start` and `"\0"` meaning every key from `start` on.
fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

/// A revision chosen relative to the state when the request is issued.
#[derive(Debug, Clone, Copy)]
enum RevSel {
    /// 0: the latest revision (for a compaction: the current one).
    Latest,
    /// `current - (n mod current)`: anywhere in `[1, current]`.
    Back(u16),
    /// `current + n`.
    Future(i64),
    /// `compact + d`, at least 1.
    NearCompact(i64),
}

impl RevSel {
    fn resolve(self, current: i64, compact: i64) -> i64 {
        match self {
            RevSel::Latest => 0,
            RevSel::Back(n) => current - i64::from(n) % current,
            RevSel::Future(n) => current + n,
            RevSel::NearCompact(d) => (compact + d).max(1),
        }
    }
}

#[derive(Debug, Clone)]
struct GRange {
    keys: Keys,
    rev: RevSel,
    limit: i64,
    keys_only: bool,
    count_only: bool,
    /// (sort order, sort target)
    sort: (i32, i32),
    /// min/max mod revision, min/max create revision; `None`: no bound.
    filters: [Option<u16>; 4],
}

impl GRange {
    fn request(&self, current: i64, compact: i64) -> RangeRequest {
        let (key, range_end) = self.keys.bounds();
        let bound = |f: Option<u16>| f.map_or(0, |n| 1 + i64::from(n) % (current + 1));
        RangeRequest {
            key,
            range_end,
            limit: self.limit,
            revision: self.rev.resolve(current, compact),
            sort_order: self.sort.0,
            sort_target: self.sort.1,
            serializable: false,
            keys_only: self.keys_only,
            count_only: self.count_only,
            min_mod_revision: bound(self.filters[0]),
            max_mod_revision: bound(self.filters[1]),
            min_create_revision: bound(self.filters[2]),
            max_create_revision: bound(self.filters[3]),
        }
    }
}

#[derive(Debug, Clone)]
struct GPut {
    key: &'static str,
    value: &'static str,
    lease: i64,
    prev_kv: bool,
    ignore_value: bool,
    ignore_lease: bool,
}

impl GPut {
    fn request(&self) -> PutRequest {
        PutRequest {
            key: self.key.into(),
            value: self.value.into(),
            lease: self.lease,
            prev_kv: self.prev_kv,
            ignore_value: self.ignore_value,
            ignore_lease: self.ignore_lease,
        }
    }
}

#[derive(Debug, Clone)]
struct GDel {
    keys: Keys,
    prev_kv: bool,
}

impl GDel {
    fn request(&self) -> DeleteRangeRequest {
        let (key, range_end) = self.keys.bounds();
        DeleteRangeRequest {
            key,
            range_end,
            prev_kv: self.prev_kv,
        }
    }
}

#[derive(Debug, Clone)]
struct GCmp {
    keys: Keys,
    target: i32,
    result: i32,
    operand: u16,
    /// Put the operand in a union field that does not match the target
    /// (etcd then compares against zero / the empty value).
    mismatched: bool,
}

impl GCmp {
    fn request(&self, current: i64) -> Compare {
        let (key, range_end) = self.keys.bounds();
        let n = i64::from(self.operand);
        let target = CompareTarget::try_from(self.target).expect("generated target");
        let union = if self.mismatched {
            match target {
                CompareTarget::Value => TargetUnion::Version(n % 4),
                _ => TargetUnion::Value(b"1".to_vec()),
            }
        } else {
            match target {
                CompareTarget::Version => TargetUnion::Version(n % 4),
                CompareTarget::Create => TargetUnion::CreateRevision(n % (current + 2)),
                CompareTarget::Mod => TargetUnion::ModRevision(n % (current + 2)),
                CompareTarget::Value => {
                    TargetUnion::Value(VALUES[self.operand as usize % VALUES.len()].into())
                }
                CompareTarget::Lease => TargetUnion::Lease(n % 4),
            }
        };
        Compare {
            result: self.result,
            target: self.target,
            key,
            range_end,
            target_union: Some(union),
        }
    }
}

#[derive(Debug, Clone)]
enum GOp {
    Range(GRange),
    Put(GPut),
    Del(GDel),
    Txn(Box<GTxn>),
}

#[derive(Debug, Clone)]
struct GTxn {
    compare: Vec<GCmp>,
    success: Vec<GOp>,
    failure: Vec<GOp>,
}

impl GTxn {
    fn request(&self, current: i64, compact: i64) -> TxnRequest {
        let ops = |ops: &[GOp]| -> Vec<RequestOp> {
            ops.iter()
                .map(|op| RequestOp {
                    request: Some(match op {
                        GOp::Range(r) => {
                            request_op::Request::RequestRange(r.request(current, compact))
                        }
                        GOp::Put(p) => request_op::Request::RequestPut(p.request()),
                        GOp::Del(d) => request_op::Request::RequestDeleteRange(d.request()),
                        GOp::Txn(t) => request_op::Request::RequestTxn(t.request(current, compact)),
                    }),
                })
                .collect()
        };
        TxnRequest {
            compare: self.compare.iter().map(|c| c.request(current)).collect(),
            success: ops(&self.success),
            failure: ops(&self.failure),
        }
    }

    /// Keys put and ranges deleted on either branch, nested txns included.
    fn writes(&self, puts: &mut Vec<Vec<u8>>, dels: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        for op in self.success.iter().chain(&self.failure) {
            op_writes(op, puts, dels);
        }
    }
}

fn op_writes(op: &GOp, puts: &mut Vec<Vec<u8>>, dels: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    match op {
        GOp::Range(_) => {}
        GOp::Put(p) => puts.push(p.key.into()),
        GOp::Del(d) => dels.push(d.keys.bounds()),
        GOp::Txn(t) => t.writes(puts, dels),
    }
}

/// Drop the writes etcd's `checkIntervals` would refuse (a key put twice,
/// or put and deleted, in one branch). Stricter than etcd: a nested txn
/// that touches anything written before it in the branch is dropped whole.
fn sanitize(ops: Vec<GOp>) -> Vec<GOp> {
    let mut puts: Vec<Vec<u8>> = Vec::new();
    let mut dels: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    ops.into_iter()
        .filter(|op| {
            let (mut p, mut d) = (Vec::new(), Vec::new());
            op_writes(op, &mut p, &mut d);
            let conflict = p
                .iter()
                .any(|k| puts.contains(k) || dels.iter().any(|(s, e)| in_range(k, s, e)))
                || d.iter()
                    .any(|(s, e)| puts.iter().any(|k| in_range(k, s, e)));
            if !conflict {
                puts.extend(p);
                dels.extend(d);
            }
            !conflict
        })
        .collect()
}

/// A request that goes through Raft: applied inside a batch.
#[derive(Debug, Clone)]
enum Write {
    Put(GPut),
    Del(GDel),
    Txn(GTxn),
    Compact(RevSel),
    Grant(i64, i64),
    Revoke(i64),
}

impl Write {
    fn request(&self, m: &Model) -> Request {
        let (current, compact) = (m.current(), m.compact);
        match self {
            Write::Put(p) => Request::Put(p.request()),
            Write::Del(d) => Request::DeleteRange(d.request()),
            Write::Txn(t) => Request::Txn(t.request(current, compact)),
            Write::Compact(sel) => Request::Compaction(CompactionRequest {
                revision: match sel {
                    RevSel::Latest => current,
                    sel => sel.resolve(current, compact).max(1),
                },
                physical: false,
            }),
            Write::Grant(id, ttl) => Request::LeaseGrant(LeaseGrantRequest { ttl: *ttl, id: *id }),
            Write::Revoke(id) => Request::LeaseRevoke(LeaseRevokeRequest { id: *id }),
        }
    }
}

/// Which connection a read uses.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// [`Reader::with`]: a pooled read-only connection in a read transaction.
    Pool,
    /// A bare [`schema::open_reader`] connection, autocommit.
    Bare,
    /// The writer's own connection, between batches.
    Writer,
}

#[derive(Debug, Clone)]
enum Step {
    /// Entries applied in one batch.
    Batch(Vec<Write>),
    Range(GRange, Via),
    /// A txn without writes, served like the API does (`read_only_txn`).
    ReadTxn(GTxn, Via),
    /// `read::history` from the oldest readable revision, with a limit.
    History {
        limit: usize,
        prev_kv: bool,
    },
}

fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(KEYS)
}

fn bound() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => prop::sample::select(KEYS), 1 => prop::sample::select(ABSENT)]
}

/// A key or range; `single` weighs single keys (deletes should not wipe
/// everything, reads should see several keys).
fn keys(single: u32) -> impl Strategy<Value = Keys> {
    prop_oneof![
        single => key().prop_map(Keys::One),
        1 => prop::sample::select(ABSENT).prop_map(Keys::One),
        3 => prop::sample::select(PREFIXES).prop_map(Keys::Prefix),
        2 => bound().prop_map(Keys::From),
        2 => Just(Keys::All),
        3 => (bound(), bound(), prop::bool::weighted(0.2))
            .prop_map(|(a, b, reversed)| if (a > b) == reversed { Keys::Between(a, b) } else { Keys::Between(b, a) }),
    ]
}

fn rev_sel() -> impl Strategy<Value = RevSel> {
    prop_oneof![
        6 => Just(RevSel::Latest),
        4 => any::<u16>().prop_map(RevSel::Back),
        1 => (1..=2i64).prop_map(RevSel::Future),
        1 => (-1..=1i64).prop_map(RevSel::NearCompact),
    ]
}

fn g_range() -> impl Strategy<Value = GRange> {
    let limit = prop_oneof![5 => Just(0i64), 3 => 1..4i64, 1 => Just(-1i64)];
    let flags = (prop::bool::weighted(0.25), prop::bool::weighted(0.15));
    let sort = prop_oneof![3 => Just((0, 0)), 2 => (0..3i32, 0..5i32)];
    let filters = prop_oneof![
        4 => Just([None; 4]),
        1 => prop::array::uniform4(prop::option::of(any::<u16>())),
    ];
    (keys(2), rev_sel(), limit, flags, sort, filters).prop_map(
        |(keys, rev, limit, (keys_only, count_only), sort, filters)| GRange {
            keys,
            rev,
            limit,
            keys_only,
            count_only,
            sort,
            filters,
        },
    )
}

fn g_put() -> impl Strategy<Value = GPut> {
    let lease = prop_oneof![7 => Just(0i64), 3 => 1..=3i64, 1 => Just(MISSING_LEASE)];
    (
        key(),
        prop::sample::select(VALUES),
        lease,
        any::<bool>(),
        prop::bool::weighted(0.08),
        prop::bool::weighted(0.08),
    )
        .prop_map(
            |(key, value, lease, prev_kv, ignore_value, ignore_lease)| GPut {
                key,
                // The API refuses a value with ignore_value, a lease with
                // ignore_lease.
                value: if ignore_value { "" } else { value },
                lease: if ignore_lease { 0 } else { lease },
                prev_kv,
                ignore_value,
                ignore_lease,
            },
        )
}

fn g_del() -> impl Strategy<Value = GDel> {
    (keys(24), any::<bool>()).prop_map(|(keys, prev_kv)| GDel { keys, prev_kv })
}

fn g_cmp() -> impl Strategy<Value = GCmp> {
    let keys = prop_oneof![5 => key().prop_map(Keys::One), 1 => keys(3)];
    (
        keys,
        0..5i32,
        0..4i32,
        any::<u16>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(keys, target, result, operand, mismatched)| GCmp {
            keys,
            target,
            result,
            operand,
            mismatched,
        })
}

/// A txn; `writes` false: ranges (and nested read-only txns) only.
fn g_txn(depth: u32, writes: bool) -> BoxedStrategy<GTxn> {
    let leaf: BoxedStrategy<GOp> = if writes {
        prop_oneof![
            2 => g_range().prop_map(GOp::Range),
            3 => g_put().prop_map(GOp::Put),
            2 => g_del().prop_map(GOp::Del),
        ]
        .boxed()
    } else {
        g_range().prop_map(GOp::Range).boxed()
    };
    let op = if depth > 0 {
        prop_oneof![
            8 => leaf,
            1 => g_txn(depth - 1, writes).prop_map(|t| GOp::Txn(Box::new(t))),
        ]
        .boxed()
    } else {
        leaf
    };
    (
        prop::collection::vec(g_cmp(), 0..3),
        prop::collection::vec(op.clone(), 0..4),
        prop::collection::vec(op, 0..3),
    )
        .prop_map(|(compare, success, failure)| GTxn {
            compare,
            success: sanitize(success),
            failure: sanitize(failure),
        })
        .boxed()
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        10 => g_put().prop_map(Write::Put),
        2 => g_del().prop_map(Write::Del),
        4 => g_txn(1, true).prop_map(Write::Txn),
        1 => rev_sel().prop_map(Write::Compact),
        2 => (1..=3i64, prop::sample::select(vec![0i64, 5, 100])).prop_map(|(id, ttl)| Write::Grant(id, ttl)),
        1 => prop_oneof![3 => 1..=3i64, 1 => Just(MISSING_LEASE)].prop_map(Write::Revoke),
    ]
}

fn via() -> impl Strategy<Value = Via> {
    prop_oneof![Just(Via::Pool), Just(Via::Bare), Just(Via::Writer)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop_oneof![
            3 => prop::collection::vec(write(), 1..=1),
            1 => prop::collection::vec(write(), 2..=5),
        ]
        .prop_map(Step::Batch),
        3 => (g_range(), via()).prop_map(|(r, v)| Step::Range(r, v)),
        1 => (g_txn(1, false), via()).prop_map(|(t, v)| Step::ReadTxn(t, v)),
        1 => (1..6usize, any::<bool>()).prop_map(|(limit, prev_kv)| Step::History { limit, prev_kv }),
    ]
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

type Kvs = BTreeMap<Vec<u8>, KeyValue>;

/// The refusals the test expects; anything else fails the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    LeaseNotFound,
    LeaseExists,
    KeyNotFound,
    Compacted,
    FutureRevision,
}

fn refusal(e: ApplyError) -> Refusal {
    match e {
        ApplyError::LeaseNotFound => Refusal::LeaseNotFound,
        ApplyError::LeaseExists => Refusal::LeaseExists,
        ApplyError::KeyNotFound => Refusal::KeyNotFound,
        ApplyError::Compacted => Refusal::Compacted,
        ApplyError::FutureRevision => Refusal::FutureRevision,
        other => panic!("unexpected apply error: {other}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
}

fn answer(r: ApplyResult) -> Answer {
    match r {
        ApplyResult::Put(r) => Answer::Put(r),
        ApplyResult::DeleteRange(r) => Answer::DeleteRange(r),
        ApplyResult::Txn(r) => Answer::Txn(r),
        ApplyResult::Compaction(r) => Answer::Compaction(r),
        ApplyResult::LeaseGrant(r) => Answer::LeaseGrant(r),
        ApplyResult::LeaseRevoke(r) => Answer::LeaseRevoke(r),
        other => panic!("unexpected response {other:?}"),
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

struct Model {
    /// `states[r]`: every key at revision `r` (index 0 unused; an empty
    /// store is at revision 1, as in etcd).
    states: Vec<Kvs>,
    /// `changes[r]`: the events of revision `r`, with `prev_kv`.
    changes: Vec<Vec<Event>>,
    compact: i64,
    /// Lease id -> TTL.
    leases: BTreeMap<i64, i64>,
    min_ttl: i64,
}

/// One revision being written (etcd's `storeTxnWrite`).
struct Wtx {
    /// The revision before this entry.
    base: i64,
    kvs: Kvs,
    changes: Vec<Event>,
}

impl Wtx {
    fn write_rev(&self) -> i64 {
        self.base + 1
    }

    /// etcd's `tw.Range` revision: the base plus one once something changed.
    fn read_rev(&self) -> i64 {
        self.base + i64::from(!self.changes.is_empty())
    }

    /// A put whose checks passed.
    fn put(&mut self, p: &PutRequest) -> PutResponse {
        let prev = self.kvs.get(&p.key).cloned();
        let rev = self.write_rev();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |kv| kv.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |kv| kv.version + 1),
            value: if p.ignore_value {
                prev.as_ref().expect("checked").value.clone()
            } else {
                p.value.clone()
            },
            lease: if p.ignore_lease {
                prev.as_ref().expect("checked").lease
            } else {
                p.lease
            },
        };
        self.kvs.insert(p.key.clone(), kv.clone());
        self.changes.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: prev.clone(),
        });
        PutResponse {
            header: header(rev),
            prev_kv: if p.prev_kv { prev } else { None },
        }
    }

    fn delete_key(&mut self, key: &[u8]) -> KeyValue {
        let prev = self.kvs.remove(key).expect("deleting a live key");
        self.changes.push(Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: key.to_vec(),
                mod_revision: self.write_rev(),
                ..Default::default()
            }),
            prev_kv: Some(prev.clone()),
        });
        prev
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let doomed: Vec<Vec<u8>> = self
            .kvs
            .keys()
            .filter(|k| in_range(k, &d.key, &d.range_end))
            .cloned()
            .collect();
        let deleted: Vec<KeyValue> = doomed.iter().map(|k| self.delete_key(k)).collect();
        DeleteRangeResponse {
            header: header(self.read_rev()),
            deleted: deleted.len() as i64,
            prev_kvs: if d.prev_kv { deleted } else { Vec::new() },
        }
    }
}

/// etcd's `executeRange` over the keys of one revision; the response
/// header carries `header_rev`, the revision of the read view.
fn serve_range(kvs: &Kvs, header_rev: i64, r: &RangeRequest) -> RangeResponse {
    let matching: Vec<KeyValue> = kvs
        .values()
        .filter(|kv| in_range(&kv.key, &r.key, &r.range_end))
        .cloned()
        .collect();
    let count = matching.len() as i64;
    let mut out = if r.count_only { Vec::new() } else { matching };
    let filtered = r.max_mod_revision != 0
        || r.min_mod_revision != 0
        || r.max_create_revision != 0
        || r.min_create_revision != 0;
    // etcd reads only `limit + 1` rows, in key order, unless the request
    // names an order or a filter; whatever sort it asked for comes after.
    if r.sort_order == SortOrder::None as i32 && !filtered && r.limit > 0 {
        out.truncate(r.limit as usize + 1);
    }
    out.retain(|kv| {
        (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
            && (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
            && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
            && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
    });
    let target = SortTarget::try_from(r.sort_target).expect("generated target");
    let mut order = SortOrder::try_from(r.sort_order).expect("generated order");
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None;
    }
    if order != SortOrder::None {
        let field = |kv: &KeyValue| -> (i64, Vec<u8>) {
            match target {
                SortTarget::Key => (0, kv.key.clone()),
                SortTarget::Version => (kv.version, Vec::new()),
                SortTarget::Create => (kv.create_revision, Vec::new()),
                SortTarget::Mod => (kv.mod_revision, Vec::new()),
                SortTarget::Value => (0, kv.value.clone()),
            }
        };
        // Stable both ways, as Go's insertion sort is on small inputs.
        assert!(
            out.len() <= 12,
            "tie order is only defined for small ranges"
        );
        if order == SortOrder::Ascend {
            out.sort_by_key(field);
        } else {
            out.sort_by_key(|kv| std::cmp::Reverse(field(kv)));
        }
    }
    let mut more = false;
    if r.limit > 0 && out.len() > r.limit as usize {
        out.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut out {
            kv.value.clear();
        }
    }
    RangeResponse {
        header: header(header_rev),
        kvs: out,
        more,
        count,
    }
}

/// etcd's `compareKV`: a union field not matching the target reads as zero.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let int = |v: Option<i64>| v.unwrap_or(0);
    let ord = match CompareTarget::try_from(c.target).expect("generated target") {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        CompareTarget::Version => kv.version.cmp(&int(match c.target_union {
            Some(TargetUnion::Version(v)) => Some(v),
            _ => None,
        })),
        CompareTarget::Create => kv.create_revision.cmp(&int(match c.target_union {
            Some(TargetUnion::CreateRevision(v)) => Some(v),
            _ => None,
        })),
        CompareTarget::Mod => kv.mod_revision.cmp(&int(match c.target_union {
            Some(TargetUnion::ModRevision(v)) => Some(v),
            _ => None,
        })),
        CompareTarget::Lease => kv.lease.cmp(&int(match c.target_union {
            Some(TargetUnion::Lease(v)) => Some(v),
            _ => None,
        })),
    };
    match CompareResult::try_from(c.result).expect("generated result") {
        CompareResult::Equal => ord.is_eq(),
        CompareResult::NotEqual => ord.is_ne(),
        CompareResult::Greater => ord.is_gt(),
        CompareResult::Less => ord.is_lt(),
    }
}

fn branch(t: &TxnRequest, ok: bool) -> &[RequestOp] {
    if ok {
        &t.success
    } else {
        &t.failure
    }
}

impl Model {
    fn new(min_ttl: i64) -> Self {
        Model {
            states: vec![Kvs::new(), Kvs::new()],
            changes: vec![Vec::new(), Vec::new()],
            compact: 0,
            leases: BTreeMap::new(),
            min_ttl,
        }
    }

    fn current(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn head(&self) -> &Kvs {
        self.states.last().expect("never empty")
    }

    fn at(&self, rev: i64) -> &Kvs {
        &self.states[rev as usize]
    }

    fn begin(&self) -> Wtx {
        Wtx {
            base: self.current(),
            kvs: self.head().clone(),
            changes: Vec::new(),
        }
    }

    /// End an entry: a new revision only if it changed something.
    fn finish(&mut self, w: Wtx) {
        if !w.changes.is_empty() {
            self.states.push(w.kvs);
            self.changes.push(w.changes);
        }
    }

    fn apply(&mut self, req: &Request) -> Result<Answer, Refusal> {
        let current = self.current();
        match req {
            Request::Put(p) => {
                // etcd's txn.Put looks the lease up before anything else.
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(Refusal::LeaseNotFound);
                }
                if (p.ignore_value || p.ignore_lease) && !self.head().contains_key(&p.key) {
                    return Err(Refusal::KeyNotFound);
                }
                let mut w = self.begin();
                let resp = w.put(p);
                self.finish(w);
                Ok(Answer::Put(resp))
            }
            Request::DeleteRange(d) => {
                let mut w = self.begin();
                let resp = w.delete(d);
                self.finish(w);
                Ok(Answer::DeleteRange(resp))
            }
            Request::Txn(t) => {
                self.check_txn(t)?;
                let mut w = self.begin();
                let mut resp = self.exec_txn(&mut w, t);
                resp.header = header(w.read_rev());
                self.finish(w);
                Ok(Answer::Txn(resp))
            }
            Request::Compaction(c) => {
                if c.revision <= self.compact {
                    return Err(Refusal::Compacted);
                }
                if c.revision > current {
                    return Err(Refusal::FutureRevision);
                }
                self.compact = c.revision;
                Ok(Answer::Compaction(CompactionResponse {
                    header: header(current),
                }))
            }
            Request::LeaseGrant(g) => {
                if self.leases.contains_key(&g.id) {
                    return Err(Refusal::LeaseExists);
                }
                let ttl = g.ttl.max(self.min_ttl);
                self.leases.insert(g.id, ttl);
                Ok(Answer::LeaseGrant(LeaseGrantResponse {
                    header: header(current),
                    id: g.id,
                    ttl,
                    error: String::new(),
                }))
            }
            Request::LeaseRevoke(r) => {
                if self.leases.remove(&r.id).is_none() {
                    return Err(Refusal::LeaseNotFound);
                }
                let mut w = self.begin();
                let attached: Vec<Vec<u8>> = w
                    .kvs
                    .values()
                    .filter(|kv| kv.lease == r.id)
                    .map(|kv| kv.key.clone())
                    .collect();
                for key in attached {
                    w.delete_key(&key);
                }
                let resp = LeaseRevokeResponse {
                    header: header(w.read_rev()),
                };
                self.finish(w);
                Ok(Answer::LeaseRevoke(resp))
            }
            // Auth has its own tests (crate::auth); the model covers keys.
            _ => unreachable!("not generated"),
        }
    }

    /// A standalone Range (etcd's `rangeKeys` checks).
    fn range(&self, r: &RangeRequest) -> Result<RangeResponse, Refusal> {
        let current = self.current();
        let rev = if r.revision <= 0 { current } else { r.revision };
        if rev > current {
            return Err(Refusal::FutureRevision);
        }
        if rev < self.compact {
            return Err(Refusal::Compacted);
        }
        Ok(serve_range(self.at(rev), current, r))
    }

    /// etcd's `applyCompare`, on the state before the txn.
    fn compare(&self, c: &Compare) -> bool {
        let kvs: Vec<&KeyValue> = self
            .head()
            .values()
            .filter(|kv| in_range(&kv.key, &c.key, &c.range_end))
            .collect();
        if kvs.is_empty() {
            return c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(c, kv))
    }

    fn succeeds(&self, t: &TxnRequest) -> bool {
        t.compare.iter().all(|c| self.compare(c))
    }

    /// etcd's `checkRequests` in `Txn`: the chosen path's puts (all of
    /// them, nested txns included), then its ranges, against the state
    /// before the txn.
    fn check_txn(&self, t: &TxnRequest) -> Result<(), Refusal> {
        self.check_path(t, &|p| match p {
            request_op::Request::RequestPut(p) => {
                if (p.ignore_value || p.ignore_lease) && !self.head().contains_key(&p.key) {
                    return Err(Refusal::KeyNotFound);
                }
                if p.lease != 0 && !self.leases.contains_key(&p.lease) {
                    return Err(Refusal::LeaseNotFound);
                }
                Ok(())
            }
            _ => Ok(()),
        })?;
        self.check_path(t, &|r| match r {
            request_op::Request::RequestRange(r) => {
                if r.revision != 0 && r.revision > self.current() {
                    return Err(Refusal::FutureRevision);
                }
                if r.revision != 0 && r.revision < self.compact {
                    return Err(Refusal::Compacted);
                }
                Ok(())
            }
            _ => Ok(()),
        })
    }

    fn check_path(
        &self,
        t: &TxnRequest,
        check: &dyn Fn(&request_op::Request) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        for op in branch(t, self.succeeds(t)) {
            match &op.request {
                Some(request_op::Request::RequestTxn(nested)) => self.check_path(nested, check)?,
                Some(request) => check(request)?,
                None => {}
            }
        }
        Ok(())
    }

    /// etcd's `executeTxn`; the header stays empty (only the outermost txn
    /// gets one, set by the caller).
    fn exec_txn(&self, w: &mut Wtx, t: &TxnRequest) -> TxnResponse {
        let succeeded = self.succeeds(t);
        let mut responses = Vec::new();
        for op in branch(t, succeeded) {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    let kvs = if r.revision <= 0 {
                        &w.kvs
                    } else {
                        self.at(r.revision)
                    };
                    response_op::Response::ResponseRange(serve_range(kvs, w.read_rev(), r))
                }
                Some(request_op::Request::RequestPut(p)) => {
                    response_op::Response::ResponsePut(w.put(p))
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    response_op::Response::ResponseDeleteRange(w.delete(d))
                }
                Some(request_op::Request::RequestTxn(nested)) => {
                    response_op::Response::ResponseTxn(self.exec_txn(w, nested))
                }
                None => continue,
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded,
            responses,
        }
    }

    /// A read-only txn served at the current revision.
    fn read_txn(&self, t: &TxnRequest) -> Result<TxnResponse, Refusal> {
        self.check_txn(t)?;
        let mut w = self.begin();
        let mut resp = self.exec_txn(&mut w, t);
        assert!(w.changes.is_empty());
        resp.header = header(self.current());
        Ok(resp)
    }

    /// What a watcher replaying `[from, to]` gets.
    fn history(&self, from: i64, to: i64, prev_kv: bool) -> Vec<Event> {
        let mut out = Vec::new();
        for rev in from..=to {
            for e in &self.changes[rev as usize] {
                let mut e = e.clone();
                if !prev_kv || rev - 1 < self.compact {
                    e.prev_kv = None;
                }
                out.push(e);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

struct Harness {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: MvccStore,
    applier: Applier,
    reader: Reader,
    bare: Connection,
    model: Model,
    index: u64,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let store = MvccStore::open(&path).expect("open store");
        let lessor = Arc::new(Lessor::new(Duration::from_millis(1000)));
        let min_ttl = lessor.min_ttl();
        let applier = Applier::new(lessor, store.connection()).expect("applier");
        let reader = Reader::new(&path);
        let bare = schema::open_reader(&path).expect("open reader");
        Harness {
            _dir: dir,
            path,
            store,
            applier,
            reader,
            bare,
            model: Model::new(min_ttl),
            index: 0,
        }
    }

    /// Run `f` on the chosen connection.
    fn read<T>(&self, via: Via, f: impl FnOnce(&Connection) -> T) -> T {
        match via {
            Via::Pool => self
                .reader
                .with(|conn| Ok(f(conn)))
                .expect("read transaction"),
            Via::Bare => f(&self.bare),
            Via::Writer => f(self.store.connection()),
        }
    }

    fn expected_state(&self) -> StoreState {
        StoreState {
            revision: self.model.current(),
            compact_revision: self.model.compact,
            applied_index: self.index,
            applied_term: u64::from(self.index > 0),
        }
    }

    fn batch(&mut self, writes: &[Write]) -> Result<(), TestCaseError> {
        let before = self.model.current();
        let mut batch = self.store.batch().expect("begin batch");
        for w in writes {
            self.index += 1;
            let req = w.request(&self.model);
            let expected = self.model.apply(&req);
            let applier = &mut self.applier;
            let got = batch
                .entry(self.index, 1, |b| applier.apply(b, req.clone()))
                .map(answer)
                .map_err(refusal);
            prop_assert_eq!(got, expected, "applying {:?}", req);
            let st = batch.state();
            prop_assert_eq!(
                (st.revision, st.compact_revision, st.applied_index),
                (self.model.current(), self.model.compact, self.index),
                "batch state after {:?}",
                req
            );
        }
        let events = batch.commit().expect("commit");
        let current = self.model.current();
        let expected: Vec<Event> = (before + 1..=current)
            .flat_map(|rev| self.model.changes[rev as usize].clone())
            .collect();
        prop_assert_eq!(events, expected, "events committed by the batch");
        prop_assert_eq!(self.store.state(), self.expected_state());

        // A watcher replaying the batch's revisions (those still readable).
        let from = (before + 1).max(self.model.compact);
        self.check_history(from, current)
    }

    /// Unlimited history over [from, to], with and without prev_kv, must
    /// equal the model's.
    fn check_history(&self, from: i64, to: i64) -> Result<(), TestCaseError> {
        for prev_kv in [false, true] {
            let got = self
                .reader
                .with(|conn| {
                    read::history(
                        conn,
                        &KeyRange::From(Vec::new()),
                        from,
                        to,
                        1 << 20,
                        prev_kv,
                    )
                    .map(|(events, _)| events)
                })
                .expect("history");
            prop_assert_eq!(
                got,
                self.model.history(from, to, prev_kv),
                "history [{}, {}] prev_kv={}",
                from,
                to,
                prev_kv
            );
        }
        Ok(())
    }

    fn range(&self, g: &GRange, via: Via) -> Result<(), TestCaseError> {
        let req = g.request(self.model.current(), self.model.compact);
        let st = self.store.state();
        let got = self
            .read(via, |conn| apply::range(conn, st, st.revision, &req))
            .map_err(refusal);
        prop_assert_eq!(got, self.model.range(&req), "range {:?} via {:?}", req, via);
        Ok(())
    }

    fn read_txn(&self, g: &GTxn, via: Via) -> Result<(), TestCaseError> {
        let req = g.request(self.model.current(), self.model.compact);
        let st = self.store.state();
        let got = self
            .read(via, |conn| apply::read_only_txn(conn, st, &req))
            .map_err(refusal);
        prop_assert_eq!(
            got,
            self.model.read_txn(&req),
            "read-only txn {:?} via {:?}",
            req,
            via
        );
        Ok(())
    }

    /// `read::history` with a limit: whole revisions, in order, as many as
    /// fit; a first revision larger than the limit comes (at least partly)
    /// on its own.
    fn history(&self, limit: usize, prev_kv: bool) -> Result<(), TestCaseError> {
        let (from, to) = (self.model.compact.max(1), self.model.current());
        let full = self.model.history(from, to, prev_kv);
        let (got, reached) = self
            .reader
            .with(|conn| read::history(conn, &KeyRange::From(Vec::new()), from, to, limit, prev_kv))
            .expect("history");
        let rev = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        let mut fits = 0;
        while fits < full.len() {
            let end = fits
                + full[fits..]
                    .iter()
                    .take_while(|e| rev(e) == rev(&full[fits]))
                    .count();
            if end > limit {
                break;
            }
            fits = end;
        }
        if fits == full.len() {
            prop_assert_eq!(
                &got[..],
                &full[..],
                "history [{}, {}] limit {}",
                from,
                to,
                limit
            );
            prop_assert_eq!(reached, to);
        } else if fits > 0 {
            prop_assert_eq!(
                &got[..],
                &full[..fits],
                "history [{}, {}] limit {}",
                from,
                to,
                limit
            );
            prop_assert_eq!(reached, rev(&full[fits]) - 1);
        } else {
            // A first revision larger than the limit comes whole, alone.
            let first: Vec<Event> = full
                .iter()
                .take_while(|e| rev(e) == rev(&full[0]))
                .cloned()
                .collect();
            prop_assert_eq!(&got, &first, "history [{}, {}] limit {}", from, to, limit);
            prop_assert_eq!(reached, rev(&full[0]));
        }
        Ok(())
    }

    /// Reopen the store, then read every revision, every stored event and
    /// the leases.
    fn check_all(mut self) -> Result<(), TestCaseError> {
        let expected = self.expected_state();
        drop(self.store);
        self.store = MvccStore::open(&self.path).expect("reopen");
        let st = self.store.state();
        prop_assert_eq!(st, expected, "state after reopening");

        let current = self.model.current();
        for rev in 1..=current + 1 {
            let req = RangeRequest {
                key: vec![0],
                range_end: vec![0],
                revision: rev,
                ..Default::default()
            };
            for via in [Via::Pool, Via::Writer] {
                let got = self
                    .read(via, |conn| apply::range(conn, st, st.revision, &req))
                    .map_err(refusal);
                prop_assert_eq!(
                    got,
                    self.model.range(&req),
                    "everything at revision {} via {:?}",
                    rev,
                    via
                );
            }
        }
        self.check_history(self.model.compact.max(1), current)?;
        let leases = self.read(Via::Pool, read::leases).expect("leases");
        let expected: Vec<(i64, i64)> = self
            .model
            .leases
            .iter()
            .map(|(id, ttl)| (*id, *ttl))
            .collect();
        prop_assert_eq!(leases, expected, "granted leases");
        Ok(())
    }
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    for step in steps {
        match step {
            Step::Batch(writes) => h.batch(writes)?,
            Step::Range(g, via) => h.range(g, *via)?,
            Step::ReadTxn(g, via) => h.read_txn(g, *via)?,
            Step::History { limit, prev_kv } => h.history(*limit, *prev_kv)?,
        }
    }
    h.check_all()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Keep failing cases out of the source tree; a failure prints its
        // minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_etcd_model(steps in prop::collection::vec(step(), 1..70)) {
        run(&steps)?;
    }
}

// ---------------------------------------------------------------------------
// The smallest cases of each difference from etcd the model has found
// ---------------------------------------------------------------------------

/// Apply one request in its own batch.
fn apply_one(h: &mut Harness, req: Request) -> Result<Answer, Refusal> {
    h.index += 1;
    let applier = &mut h.applier;
    let mut batch = h.store.batch().expect("begin batch");
    let result = batch
        .entry(h.index, 1, |b| applier.apply(b, req))
        .map(answer)
        .map_err(refusal);
    batch.commit().expect("commit");
    result
}

fn put_request(key: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    }
}

fn op(request: request_op::Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

/// etcd's `txn.Put` looks the lease up before the `ignore_value` check.
#[test]
fn put_checks_the_lease_before_the_key() {
    let mut h = Harness::new();
    let req = PutRequest {
        key: b"a".to_vec(),
        lease: 7,
        ignore_value: true,
        ..Default::default()
    };
    assert_eq!(
        apply_one(&mut h, Request::Put(req)),
        Err(Refusal::LeaseNotFound)
    );
}

/// etcd's `newTxnResp` gives a nested txn an empty header; only the
/// outermost response carries the revision.
#[test]
fn nested_txn_response_has_an_empty_header() {
    let mut h = Harness::new();
    let txn = TxnRequest {
        success: vec![op(request_op::Request::RequestTxn(TxnRequest::default()))],
        ..Default::default()
    };
    let expected = TxnResponse {
        header: header(1),
        succeeded: true,
        responses: vec![ResponseOp {
            response: Some(response_op::Response::ResponseTxn(TxnResponse {
                header: Some(ResponseHeader::default()),
                succeeded: true,
                responses: Vec::new(),
            })),
        }],
    };
    let st = h.store.state();
    let read_only = apply::read_only_txn(h.store.connection(), st, &txn).map_err(refusal);
    assert_eq!(read_only, Ok(expected.clone()));
    assert_eq!(
        apply_one(&mut h, Request::Txn(txn)),
        Ok(Answer::Txn(expected))
    );
}

/// etcd's `checkTxn` checks a txn's ranges against the revision before the
/// txn: a range at the revision the txn itself is writing is a future
/// revision, and the whole txn fails.
#[test]
fn txn_range_at_its_own_write_revision_is_a_future_revision() {
    let mut h = Harness::new();
    let txn = TxnRequest {
        success: vec![
            op(request_op::Request::RequestPut(put_request("a"))),
            op(request_op::Request::RequestRange(RangeRequest {
                key: b"a".to_vec(),
                revision: 2,
                ..Default::default()
            })),
        ],
        ..Default::default()
    };
    assert_eq!(
        apply_one(&mut h, Request::Txn(txn)),
        Err(Refusal::FutureRevision)
    );
    assert_eq!(h.store.state().revision, 1);
}

/// etcd sorts with Go's `sort.Sort`, an insertion sort (stable) for up to
/// 12 keys, also when descending: keys with equal versions stay in key
/// order.
#[test]
fn descending_sort_keeps_ties_in_key_order() {
    let mut h = Harness::new();
    for key in ["a", "b"] {
        assert!(apply_one(&mut h, Request::Put(put_request(key))).is_ok());
    }
    let req = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Version as i32,
        ..Default::default()
    };
    let st = h.store.state();
    let resp = apply::range(h.store.connection(), st, st.revision, &req).expect("range");
    let keys: Vec<&[u8]> = resp.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [b"a", b"b"], "{resp:?}");
}
