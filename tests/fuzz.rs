//! Fuzzing of everything that parses outside input, with proptest drivers
//! (cargo-fuzz needs a nightly toolchain; these run on stable, in CI).
//! Every input must get a clear error or a correct answer: no panic, no
//! hang (each case is bounded by a timeout), and the server stays up.
//!
//! | target | what | driver |
//! |---|---|---|
//! | `grpc` | every KV, Lease, Watch, Maintenance and Cluster RPC with arbitrary field values (nested txns and compares, enum values out of range, oversized values), and arbitrary bytes as the request message | a real `tern-primary` over gRPC; each error must carry one of etcd's codes and messages; the member must still answer afterwards and its log must hold no panic |
//! | `etcd differential` | KV (Range, Put, DeleteRange, Txn with nested ops and compares, Compact) and lease grant/revoke requests, arbitrary fields | the same requests, in the same order, to a real etcd 3.4 and a real `tern-primary`: every answer (error code and message, or the whole response but for member and cluster ids and Raft term) must be the same |
//! | `config` | TOML documents and flag vectors | `PrimaryConfig::load` and `LearnerConfig::load` in-process |
//! | `manifest` | backup manifests: JSON trees with fields removed, retyped and out of range, and bytes mutated | `serde_json` into `Manifest`, which `tern-restore` and the learner's retention use |
//! | `segment` | log segment names and decrypted segment bodies (frames truncated, bit-flipped, lengths and indexes out of range) | `SegmentName::parse`, `decode_segment` |
//! | `raft log` | a member's Raft log segment (entries, hard states, compactions), then its bytes truncated, bit-flipped, overwritten, cut and extended | `Wal::open`: it replays (cutting a torn tail, the same way on a second open) or refuses with a message; replayed entries are contiguous |
//! | `replay` | forged log entries (what a segment that decrypts could hold): arbitrary `RaftRequest`s | the `Applier` over an `MvccStore`, as `tern-restore`'s replay runs it |
//! | `restore` | a real backup store whose objects are truncated, bit-flipped, re-encrypted after their plaintext was mutated, decrypted with the wrong key, or whose manifests and segment names are mutated | the `tern-restore` binary (`list`, `verify`, `restore --to-revision`) |
//!
//! Each target prints how many inputs it executed and what they got.
//! Inputs that found bugs live on as named regression tests.
//! `TERN_FUZZ_SCALE=N`
//! multiplies every target's case count (the CI default is 1):
//!
//! ```sh
//! TERN_FUZZ_SCALE=20 cargo test -p tern-tests --test fuzz -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tern_primary::proto::etcdserverpb::{
    cluster_client::ClusterClient, compare, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, request_op, watch_client::WatchClient, watch_request,
    AlarmRequest, CompactionRequest, Compare, DefragmentRequest, DeleteRangeRequest, HashKvRequest,
    HashRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, MemberAddRequest, MemberListRequest, MemberPromoteRequest,
    MemberRemoveRequest, MemberUpdateRequest, MoveLeaderRequest, PutRequest, RangeRequest,
    RequestOp, SnapshotRequest, StatusRequest, TxnRequest, WatchCancelRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest,
};
use tern_primary::proto::ternpb::{raft_request, MemberAttributes, RaftRequest};
use tern_tests::{wait_serving, workspace_bin};
use tonic::transport::Channel;

// ---------------------------------------------------------------------
// Driver plumbing.

/// `TERN_FUZZ_SCALE`: how many times the CI case counts to run.
fn cases(ci: u32) -> u32 {
    let scale: u32 = std::env::var("TERN_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    ci * scale.max(1)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Failures are printed with their minimal input; nothing is
        // written next to the sources.
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    })
}

/// Run a test body on a thread with a large stack: generating nested txns
/// recurses deeply through proptest's strategy code, and unoptimized
/// frames are big.
fn big_stack(body: impl FnOnce() + Send) {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn_scoped(scope, body)
            .expect("spawn");
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// How long one input may take before it counts as a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// Run `f` on its own thread, bounded by [`CASE_TIMEOUT`]; a panic or a
/// hang fails the case (and proptest then shrinks the input).
fn bounded<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TestCaseError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(panic)) => Err(TestCaseError::fail(format!("{what} panicked: {panic}"))),
        Err(_) => Err(TestCaseError::fail(format!(
            "{what} did not return within {CASE_TIMEOUT:?}"
        ))),
    }
}

/// Executions and outcomes of one target, printed at its end.
#[derive(Default)]
struct Tally {
    executions: AtomicU64,
    outcomes: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn record(&self, outcome: impl Into<String>) {
        self.executions.fetch_add(1, Ordering::Relaxed);
        *self
            .outcomes
            .lock()
            .expect("tally")
            .entry(outcome.into())
            .or_default() += 1;
    }

    fn report(&self, target: &str, started: Instant) {
        let outcomes = self.outcomes.lock().expect("tally");
        eprintln!(
            "fuzz {target}: {} executions, 0 panics, 0 hangs ({:.1?})",
            self.executions.load(Ordering::Relaxed),
            started.elapsed()
        );
        for (outcome, n) in outcomes.iter() {
            eprintln!("    {n:>7}  {outcome}");
        }
    }
}

/// Mutations of a byte string: truncations, bit flips, overwrites,
/// insertions and deletions at arbitrary places.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
            Mutation::Flip(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
            Mutation::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Mutation::Insert(i, b) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::Append(b) => bytes.extend_from_slice(b),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------
// Field values: the interesting ones (empty, boundaries, out of range)
// more often than chance would give them.

/// A key: mostly a few that collide, sometimes empty (refused), random or
/// long. Inside txns (`op_key`) empty keys are rarer, or nearly every txn
/// would be refused for one of its many keys.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![12 => nonempty_key(), 1 => Just(Vec::new())]
}

fn op_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![150 => nonempty_key(), 1 => Just(Vec::new())]
}

fn nonempty_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        16 => prop::sample::select(vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b"ab".to_vec(),
            b"k".to_vec(),
            b"k/1".to_vec(),
            b"k/2".to_vec(),
            vec![0],
            vec![0xff],
            vec![0xff, 0xff],
        ]),
        8 => prop::collection::vec(any::<u8>(), 1..12),
        2 => prop::collection::vec(any::<u8>(), 1..2000),
    ]
}

/// A range end: none, "from key" (`\0`), a prefix end, or any key.
fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(Vec::new()),
        1 => Just(vec![0]),
        1 => Just(b"k0".to_vec()),
        2 => key(),
    ]
}

fn small_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
        (0usize..20_000).prop_map(|n| vec![b'v'; n]),
    ]
}

/// Values up to past `--max-request-bytes` (1.5 MiB) and past the gRPC
/// limit above it (2 MiB).
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => small_value(),
        1 => (1_500_000usize..1_700_000).prop_map(|n| vec![b'x'; n]),
        1 => (2_100_000usize..2_200_000).prop_map(|n| vec![b'y'; n]),
    ]
}

fn revision() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -2i64..400,
        1 => any::<i64>(),
        1 => prop::sample::select(vec![i64::MIN, -1, 0, 1, i64::MAX]),
    ]
}

/// Enum fields are plain i32 on the wire: valid values and any other.
fn enum_value(valid: i32) -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0..valid, 1 => any::<i32>()]
}

fn lease_id() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => Just(0i64),
        4 => 1i64..6,
        1 => any::<i64>(),
        1 => prop::sample::select(vec![i64::MIN, -1, i64::MAX]),
    ]
}

fn ttl() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -3i64..30,
        1 => any::<i64>(),
        1 => prop::sample::select(vec![i64::MIN, 8_999_999_999, 9_000_000_000, 9_000_000_001, i64::MAX]),
    ]
}

fn range_request() -> impl Strategy<Value = RangeRequest> {
    range_request_with(key())
}

fn range_request_with(key: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = RangeRequest> {
    (
        (
            key,
            range_end(),
            prop_oneof![-2i64..5, any::<i64>()],
            revision(),
        ),
        (
            enum_value(3),
            enum_value(5),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (revision(), revision(), revision(), revision()),
    )
        .prop_map(
            |(
                (key, range_end, limit, revision),
                (sort_order, sort_target, serializable, keys_only, count_only),
                (min_mod_revision, max_mod_revision, min_create_revision, max_create_revision),
            )| RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order,
                sort_target,
                serializable,
                keys_only,
                count_only,
                min_mod_revision,
                max_mod_revision,
                min_create_revision,
                max_create_revision,
            },
        )
}

fn put_request(value: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = PutRequest> {
    put_request_with(key(), value, lease_id())
}

fn put_request_with(
    key: impl Strategy<Value = Vec<u8>>,
    value: impl Strategy<Value = Vec<u8>>,
    lease: impl Strategy<Value = i64>,
) -> impl Strategy<Value = PutRequest> {
    (
        key,
        value,
        lease,
        any::<bool>(),
        prop::bool::weighted(0.03),
        prop::bool::weighted(0.03),
    )
        .prop_map(
            |(key, value, lease, prev_kv, ignore_value, ignore_lease)| PutRequest {
                key,
                value,
                lease,
                prev_kv,
                ignore_value,
                ignore_lease,
            },
        )
}

fn delete_request() -> impl Strategy<Value = DeleteRangeRequest> {
    delete_request_with(key())
}

fn delete_request_with(
    key: impl Strategy<Value = Vec<u8>>,
) -> impl Strategy<Value = DeleteRangeRequest> {
    (key, range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn compare() -> impl Strategy<Value = Compare> {
    let union = prop_oneof![
        1 => Just(None),
        2 => revision().prop_map(|v| Some(compare::TargetUnion::Version(v))),
        2 => revision().prop_map(|v| Some(compare::TargetUnion::CreateRevision(v))),
        2 => revision().prop_map(|v| Some(compare::TargetUnion::ModRevision(v))),
        2 => small_value().prop_map(|v| Some(compare::TargetUnion::Value(v))),
        2 => lease_id().prop_map(|v| Some(compare::TargetUnion::Lease(v))),
    ];
    (enum_value(4), enum_value(5), op_key(), range_end(), union).prop_map(
        |(result, target, key, range_end, target_union)| Compare {
            result,
            target,
            key,
            range_end,
            target_union,
        },
    )
}

fn request_op() -> impl Strategy<Value = RequestOp> {
    request_op_with(lease_id().boxed())
}

/// A txn op, nested up to 4 deep; `lease` for its puts.
fn request_op_with(lease: BoxedStrategy<i64>) -> impl Strategy<Value = RequestOp> {
    use request_op::Request as R;
    let leaf = prop_oneof![
        // An op with no request is refused, like an empty key.
        1 => Just(None),
        30 => range_request_with(op_key()).prop_map(|r| Some(R::RequestRange(r))),
        40 => put_request_with(op_key(), small_value(), lease).prop_map(|r| Some(R::RequestPut(r))),
        20 => delete_request_with(op_key()).prop_map(|r| Some(R::RequestDeleteRange(r))),
    ]
    .prop_map(|request| RequestOp { request });
    leaf.prop_recursive(4, 48, 5, |inner| {
        (
            prop::collection::vec(compare(), 0..4),
            prop::collection::vec(inner.clone(), 0..5),
            prop::collection::vec(inner, 0..5),
        )
            .prop_map(|(compare, success, failure)| RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare,
                    success,
                    failure,
                })),
            })
    })
}

fn txn_request() -> impl Strategy<Value = TxnRequest> {
    // Nesting deeper than anything accepts (and than protobuf's recursion
    // limit).
    let deep = (20usize..120, request_op()).prop_map(|(depth, op)| {
        let mut t = TxnRequest {
            success: vec![op],
            ..Default::default()
        };
        for _ in 0..depth {
            t = TxnRequest {
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        t
    });
    prop_oneof![13 => shallow_txn_request(lease_id().boxed()), 1 => deep]
}

/// Txns nested at most 4 deep, sometimes wider than `--max-txn-ops`.
fn shallow_txn_request(lease: BoxedStrategy<i64>) -> impl Strategy<Value = TxnRequest> {
    let ordinary = (
        prop::collection::vec(compare(), 0..5),
        prop::collection::vec(request_op_with(lease.clone()), 0..6),
        prop::collection::vec(request_op_with(lease.clone()), 0..6),
    )
        .prop_map(|(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        });
    let wide = (100usize..200, request_op_with(lease)).prop_map(|(n, op)| TxnRequest {
        success: vec![op; n],
        ..Default::default()
    });
    prop_oneof![12 => ordinary, 1 => wide]
}

fn url() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("http://127.0.0.1:1".to_string()),
        (1u16..=u16::MAX).prop_map(|p| format!("http://127.0.0.2:{p}")),
        Just("https://[::1]:2380".to_string()),
        Just("http://localhost".to_string()),
        Just("unix:///tmp/x".to_string()),
        Just(String::new()),
        ".{0,40}",
    ]
}

// ---------------------------------------------------------------------
// gRPC: requests of every service into a real member.

/// One input: an RPC with its arguments.
#[derive(Clone, Debug)]
enum Call {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    LeaseKeepAlive(Vec<LeaseKeepAliveRequest>),
    LeaseTimeToLive(LeaseTimeToLiveRequest),
    LeaseLeases,
    Watch(Vec<WatchRequest>),
    Status,
    Hash,
    HashKv(HashKvRequest),
    Defragment,
    Snapshot,
    Alarm(AlarmRequest),
    MoveLeader(MoveLeaderRequest),
    MemberList,
    MemberAdd(MemberAddRequest),
    MemberRemove(MemberRemoveRequest),
    MemberUpdate(MemberUpdateRequest),
    MemberPromote(MemberPromoteRequest),
    /// Arbitrary bytes as the request message of an RPC.
    Raw(&'static str, Vec<u8>),
}

/// Every unary method, for raw-bytes requests.
const UNARY_METHODS: [&str; 20] = [
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Auth/Authenticate",
];

fn watch_request() -> impl Strategy<Value = WatchRequest> {
    let watch_id = prop_oneof![3 => Just(0i64), 3 => 0i64..4, 1 => any::<i64>()];
    let create = (
        (key(), range_end(), revision(), any::<bool>()),
        (
            prop::collection::vec(prop_oneof![0i32..2, any::<i32>()], 0..3),
            any::<bool>(),
            watch_id.clone(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (key, range_end, start_revision, progress_notify),
                (filters, prev_kv, watch_id, fragment),
            )| {
                watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                    key,
                    range_end,
                    start_revision,
                    progress_notify,
                    filters,
                    prev_kv,
                    watch_id,
                    fragment,
                })
            },
        );
    prop_oneof![
        6 => create.prop_map(Some),
        2 => watch_id.prop_map(|watch_id| Some(watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id }))),
        1 => Just(Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {}))),
        1 => Just(None),
    ]
    .prop_map(|request_union| WatchRequest { request_union })
}

/// A valid encoding of some request, for raw mutation.
fn some_encoding() -> impl Strategy<Value = Vec<u8>> {
    use prost::Message;
    prop_oneof![
        range_request().prop_map(|r| r.encode_to_vec()),
        put_request(small_value()).prop_map(|r| r.encode_to_vec()),
        txn_request().prop_map(|r| r.encode_to_vec()),
        prop::collection::vec(url(), 0..3).prop_map(|peer_ur_ls| MemberAddRequest {
            peer_ur_ls,
            is_learner: true
        }
        .encode_to_vec()),
    ]
}

fn call() -> impl Strategy<Value = Call> {
    let member_id = prop_oneof![Just(0u64), 1u64..4, any::<u64>()];
    let alarm =
        (enum_value(3), member_id.clone(), enum_value(3)).prop_map(|(action, member_id, alarm)| {
            Call::Alarm(AlarmRequest {
                action,
                member_id,
                alarm,
            })
        });
    // Adding a voter that never starts costs a single member its quorum
    // (correctly); voters are added only with URLs that must be refused.
    let member_add = prop_oneof![
        prop::collection::vec(url(), 0..3).prop_map(|peer_ur_ls| MemberAddRequest {
            peer_ur_ls,
            is_learner: true
        }),
        prop::collection::vec(
            prop_oneof![
                Just(String::new()),
                "[a-z]{0,8}",
                Just("http://[::1".to_string())
            ],
            0..3
        )
        .prop_map(|peer_ur_ls| MemberAddRequest {
            peer_ur_ls,
            is_learner: false
        }),
    ]
    .prop_map(Call::MemberAdd);
    let raw = (
        prop::sample::select(UNARY_METHODS.to_vec()),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (some_encoding(), prop::collection::vec(mutation(), 1..4)).prop_map(
                |(mut bytes, mutations)| {
                    mutate(&mut bytes, &mutations);
                    bytes
                }
            ),
        ],
    )
        .prop_map(|(method, bytes)| Call::Raw(method, bytes));
    prop_oneof![
        10 => range_request().prop_map(Call::Range),
        10 => put_request(value()).prop_map(Call::Put),
        5 => delete_request().prop_map(Call::DeleteRange),
        14 => txn_request().prop_map(Call::Txn),
        2 => (revision(), any::<bool>()).prop_map(|(revision, physical)| Call::Compact(CompactionRequest { revision, physical })),
        4 => (ttl(), lease_id()).prop_map(|(ttl, id)| Call::LeaseGrant(LeaseGrantRequest { ttl, id })),
        2 => lease_id().prop_map(|id| Call::LeaseRevoke(LeaseRevokeRequest { id })),
        2 => prop::collection::vec(lease_id().prop_map(|id| LeaseKeepAliveRequest { id }), 1..4).prop_map(Call::LeaseKeepAlive),
        2 => (lease_id(), any::<bool>()).prop_map(|(id, keys)| Call::LeaseTimeToLive(LeaseTimeToLiveRequest { id, keys })),
        1 => Just(Call::LeaseLeases),
        8 => prop::collection::vec(watch_request(), 1..6).prop_map(Call::Watch),
        1 => Just(Call::Status),
        1 => Just(Call::Hash),
        2 => revision().prop_map(|revision| Call::HashKv(HashKvRequest { revision })),
        1 => Just(Call::Defragment),
        1 => Just(Call::Snapshot),
        2 => alarm,
        1 => member_id.clone().prop_map(|target_id| Call::MoveLeader(MoveLeaderRequest { target_id })),
        1 => Just(Call::MemberList),
        1 => member_add,
        1 => member_id.clone().prop_map(|id| Call::MemberRemove(MemberRemoveRequest { id })),
        1 => (member_id.clone(), prop::collection::vec(url(), 0..3)).prop_map(|(id, peer_ur_ls)| Call::MemberUpdate(MemberUpdateRequest { id, peer_ur_ls })),
        1 => member_id.prop_map(|id| Call::MemberPromote(MemberPromoteRequest { id })),
        8 => raw,
    ]
}

/// A tern-primary whose log goes to a file, so the fuzzer can look for
/// panics in it afterwards. Killed on drop.
struct LoggedMember {
    child: Child,
    endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoggedMember {
    fn start() -> LoggedMember {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("member.log");
        let child = Command::new(workspace_bin("tern-primary"))
            .arg("--data-dir")
            .arg(dir.path().join("member.tern"))
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:0",
                "--listen-peer-urls",
                "http://127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tern-primary");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("serving client traffic address=").nth(1) {
                break rest.split_whitespace().next().unwrap_or("").to_string();
            }
            assert!(
                Instant::now() < deadline,
                "tern-primary did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        wait_serving(&endpoint);
        LoggedMember {
            child,
            endpoint,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LoggedMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
struct Clients {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
    cluster: ClusterClient<Channel>,
    raw: tonic::client::Grpc<Channel>,
    member_id: u64,
}

/// Passes request bytes through untouched, and response bytes back.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// etcd's gRPC errors: every message a handler may answer with, and its
/// code (`rpctypes` in etcd; `primary/src/error.rs` here).
fn is_etcd_error(status: &tonic::Status) -> bool {
    use tonic::Code::*;
    let m = status.message();
    match status.code() {
        InvalidArgument | OutOfRange | NotFound | FailedPrecondition => {
            m.starts_with("etcdserver: ")
        }
        // Over --max-request-bytes, or over the gRPC limit (grpc-go's words).
        ResourceExhausted => {
            m.starts_with("etcdserver: ") || m.starts_with("grpc: received message larger than max")
        }
        Unavailable => m.starts_with("etcdserver: "),
        // A request that does not decode: grpc-go answers Internal too.
        Internal => m.contains("decode") || m.contains("unmarshal"),
        // The Auth service (not served) and unknown methods.
        Unimplemented => true,
        _ => false,
    }
}

/// The answer to one call: "ok" or the error's code and message, with
/// numbers blanked so the tally groups alike errors.
fn outcome(name: &str, r: Result<(), tonic::Status>) -> Result<String, TestCaseError> {
    match r {
        Ok(()) => Ok(format!("{name}: ok")),
        Err(s) if is_etcd_error(&s) => {
            let message: String = s
                .message()
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .take(90)
                .collect();
            Ok(format!("{name}: {:?} {message}", s.code()))
        }
        Err(s) => Err(TestCaseError::fail(format!(
            "{name}: not an etcd error: {:?} {:?}",
            s.code(),
            s.message()
        ))),
    }
}

fn unit<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

async fn run_call(c: &mut Clients, call: Call) -> Result<String, TestCaseError> {
    use tokio_stream::StreamExt;
    match call {
        Call::Range(r) => outcome("Range", unit(c.kv.range(r).await)),
        Call::Put(r) => outcome("Put", unit(c.kv.put(r).await)),
        Call::DeleteRange(r) => outcome("DeleteRange", unit(c.kv.delete_range(r).await)),
        Call::Txn(r) => outcome("Txn", unit(c.kv.txn(r).await)),
        Call::Compact(r) => outcome("Compact", unit(c.kv.compact(r).await)),
        Call::LeaseGrant(r) => outcome("LeaseGrant", unit(c.lease.lease_grant(r).await)),
        Call::LeaseRevoke(r) => outcome("LeaseRevoke", unit(c.lease.lease_revoke(r).await)),
        Call::LeaseTimeToLive(r) => {
            outcome("LeaseTimeToLive", unit(c.lease.lease_time_to_live(r).await))
        }
        Call::LeaseLeases => outcome(
            "LeaseLeases",
            unit(c.lease.lease_leases(LeaseLeasesRequest {}).await),
        ),
        Call::LeaseKeepAlive(requests) => {
            let n = requests.len();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let stream = c
                .lease
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(e) => return outcome("LeaseKeepAlive", Err(e)),
            };
            // One answer per request, each before the next is sent.
            for r in requests {
                let _ = tx.send(r).await;
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        return Err(TestCaseError::fail(format!(
                            "LeaseKeepAlive: stream ended before answering {n} requests"
                        )))
                    }
                    Err(e) => return outcome("LeaseKeepAlive", Err(e)),
                }
            }
            Ok("LeaseKeepAlive: ok".into())
        }
        Call::Watch(requests) => {
            let creates = requests
                .iter()
                .filter(|r| {
                    matches!(
                        r.request_union,
                        Some(watch_request::RequestUnion::CreateRequest(_))
                    )
                })
                .count();
            let progress = requests
                .iter()
                .filter(|r| {
                    matches!(
                        r.request_union,
                        Some(watch_request::RequestUnion::ProgressRequest(_))
                    )
                })
                .count();
            // Keep the stream open while reading: a closed request side
            // ends the watch.
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            for r in requests {
                let _ = tx.send(r).await;
            }
            let mut stream = match c
                .watch
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(s) => s.into_inner(),
                Err(e) => return outcome("Watch", Err(e)),
            };
            // Every create is answered (created, and canceled if refused),
            // and so is every progress request.
            let (mut created, mut progressed) = (0, 0);
            let mut canceled = false;
            while created < creates || progressed < progress {
                match stream.next().await {
                    Some(Ok(w)) => {
                        created += usize::from(w.created);
                        canceled |= w.canceled && w.created;
                        progressed += usize::from(
                            !w.created && !w.canceled && w.watch_id == -1 && w.events.is_empty(),
                        );
                    }
                    Some(Err(e)) => return outcome("Watch", Err(e)),
                    None => {
                        return Err(TestCaseError::fail(format!(
                            "Watch: stream ended after {created} of {creates} creates answered"
                        )))
                    }
                }
            }
            drop(tx);
            Ok(format!(
                "Watch: ok{}",
                if canceled { " (a create refused)" } else { "" }
            ))
        }
        Call::Status => outcome("Status", unit(c.maintenance.status(StatusRequest {}).await)),
        Call::Hash => outcome("Hash", unit(c.maintenance.hash(HashRequest {}).await)),
        Call::HashKv(r) => outcome("HashKV", unit(c.maintenance.hash_kv(r).await)),
        Call::Defragment => outcome(
            "Defragment",
            unit(c.maintenance.defragment(DefragmentRequest {}).await),
        ),
        Call::Snapshot => {
            let mut stream = match c.maintenance.snapshot(SnapshotRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(e) => return outcome("Snapshot", Err(e)),
            };
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok("Snapshot: ok".into()),
                    Err(e) => return outcome("Snapshot", Err(e)),
                }
            }
        }
        Call::Alarm(r) => {
            let activated = r.action == 1;
            let result = outcome("Alarm", unit(c.maintenance.alarm(r).await));
            if activated {
                // Disarm whatever it raised, so later writes are not all
                // refused with NOSPACE.
                disarm(c).await;
            }
            result
        }
        Call::MoveLeader(r) => outcome("MoveLeader", unit(c.maintenance.move_leader(r).await)),
        Call::MemberList => outcome(
            "MemberList",
            unit(c.cluster.member_list(MemberListRequest {}).await),
        ),
        Call::MemberAdd(r) => outcome("MemberAdd", unit(c.cluster.member_add(r).await)),
        Call::MemberRemove(mut r) => {
            // Removing itself would stop the only member (correctly).
            if r.id == c.member_id {
                r.id ^= 1;
            }
            outcome("MemberRemove", unit(c.cluster.member_remove(r).await))
        }
        Call::MemberUpdate(r) => outcome("MemberUpdate", unit(c.cluster.member_update(r).await)),
        Call::MemberPromote(r) => outcome("MemberPromote", unit(c.cluster.member_promote(r).await)),
        Call::Raw(method, bytes) => {
            if let Err(e) = c.raw.ready().await {
                return Err(TestCaseError::fail(format!("channel not ready: {e}")));
            }
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
            let name = method.rsplit('/').next().unwrap_or(method);
            let r = c
                .raw
                .unary(tonic::Request::new(bytes), path, RawCodec)
                .await;
            outcome(&format!("raw {name}"), unit(r))
        }
    }
}

async fn disarm(c: &mut Clients) {
    let Ok(alarms) = c
        .maintenance
        .alarm(AlarmRequest {
            action: 0,
            member_id: 0,
            alarm: 0,
        })
        .await
    else {
        return;
    };
    for a in alarms.into_inner().alarms {
        let _ = c
            .maintenance
            .alarm(AlarmRequest {
                action: 2,
                member_id: a.member_id,
                alarm: a.alarm,
            })
            .await;
    }
}

#[test]
fn grpc_requests_get_etcd_errors_and_never_crash_the_member() {
    big_stack(|| {
        let started = Instant::now();
        let member = LoggedMember::start();
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let clients = rt.block_on(async {
            let channel = Channel::from_shared(format!("http://{}", member.endpoint))
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            let mut maintenance = MaintenanceClient::new(channel.clone());
            let member_id = maintenance
                .status(StatusRequest {})
                .await
                .expect("status")
                .into_inner()
                .header
                .expect("header")
                .member_id;
            Clients {
                kv: KvClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
                lease: LeaseClient::new(channel.clone()),
                watch: WatchClient::new(channel.clone()).max_decoding_message_size(usize::MAX),
                maintenance: maintenance.max_decoding_message_size(usize::MAX),
                cluster: ClusterClient::new(channel.clone()),
                raw: tonic::client::Grpc::new(channel),
                member_id,
            }
        });
        let tally = Tally::default();
        let result = runner(cases(1500)).run(&call(), |call| {
            let mut c = clients.clone();
            let answer = rt.block_on(async {
                tokio::time::timeout(CASE_TIMEOUT, run_call(&mut c, call))
                    .await
                    .map_err(|_| {
                        TestCaseError::fail(format!("no answer within {CASE_TIMEOUT:?}"))
                    })?
            })?;
            tally.record(answer);
            Ok(())
        });
        let log = member.log();
        if let Some(at) = log.find("panicked") {
            panic!(
                "tern-primary panicked:\n{}",
                &log[at.saturating_sub(200)..(at + 2000).min(log.len())]
            );
        }
        if let Err(e) = result {
            panic!("{e}");
        }
        // Still up, and still writing and reading.
        rt.block_on(async {
            let mut c = clients.clone();
            c.kv.put(PutRequest {
                key: b"fuzz/after".to_vec(),
                value: b"alive".to_vec(),
                ..Default::default()
            })
            .await
            .expect("put after fuzzing");
            let got =
                c.kv.range(RangeRequest {
                    key: b"fuzz/after".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("range after fuzzing")
                .into_inner();
            assert_eq!(got.kvs[0].value, b"alive");
        });
        tally.report("grpc", started);
    });
}

// ---------------------------------------------------------------------
// KV and leases against a real etcd: the same answer, error or not.

/// A request whose answer is deterministic given the requests before it,
/// so etcd's and Tern's can be compared: no server-chosen lease ids, no
/// lease that could expire during the run.
#[derive(Clone, Debug)]
enum KvCall {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
}

fn kv_call() -> impl Strategy<Value = KvCall> {
    // Leases 1..=5 live long; other ids are refused or, when granted with a
    // short TTL, never used again (their expiry time differs per server).
    let lease = prop_oneof![3 => Just(0i64), 3 => 1i64..6, 1 => any::<i64>()].boxed();
    let grant = prop_oneof![
        3 => (1i64..6, 600i64..1000),
        1 => (1_000_000i64..i64::MAX, ttl()),
    ]
    .prop_map(|(id, ttl)| KvCall::LeaseGrant(LeaseGrantRequest { ttl, id }));
    prop_oneof![
        10 => range_request().prop_map(KvCall::Range),
        10 => put_request_with(key(), small_value(), lease.clone()).prop_map(KvCall::Put),
        4 => delete_request().prop_map(KvCall::DeleteRange),
        12 => shallow_txn_request(lease.clone()).prop_map(KvCall::Txn),
        // Not at revision 0: etcd accepts a first compaction there (its
        // store starts "compacted at -1"); Tern's starts at 0 and refuses
        // it as compacted.
        1 => (revision().prop_filter("not 0", |r| *r != 0), any::<bool>()).prop_map(|(revision, physical)| KvCall::Compact(CompactionRequest { revision, physical })),
        2 => grant,
        1 => prop_oneof![1i64..6, any::<i64>()].prop_map(|id| KvCall::LeaseRevoke(LeaseRevokeRequest { id })),
    ]
}

/// What a client sees, without what differs between any two servers
/// (member and cluster ids, Raft term).
fn seen_as_text<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(resp) => {
            let text = format!("{:?}", resp.into_inner());
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(at) = ["cluster_id: ", "member_id: ", "raft_term: "]
                .iter()
                .filter_map(|f| rest.find(f).map(|i| (i, f.len())))
                .min()
            {
                out.push_str(&rest[..at.0 + at.1]);
                rest = rest[at.0 + at.1..].trim_start_matches(|c: char| c.is_ascii_digit());
                out.push('_');
            }
            out.push_str(rest);
            format!("ok {out}")
        }
        Err(s) => format!("error {:?} {}", s.code(), s.message()),
    }
}

async fn kv_answer(
    kv: &mut KvClient<Channel>,
    lease: &mut LeaseClient<Channel>,
    call: KvCall,
) -> String {
    match call {
        KvCall::Range(r) => seen_as_text(kv.range(r).await),
        KvCall::Put(r) => seen_as_text(kv.put(r).await),
        KvCall::DeleteRange(r) => seen_as_text(kv.delete_range(r).await),
        KvCall::Txn(r) => seen_as_text(kv.txn(r).await),
        KvCall::Compact(r) => seen_as_text(kv.compact(r).await),
        KvCall::LeaseGrant(r) => seen_as_text(lease.lease_grant(r).await),
        KvCall::LeaseRevoke(r) => seen_as_text(lease.lease_revoke(r).await),
    }
}

/// Steer clear of what cannot be compared:
/// - etcd 3.4 crashes (sort.Sort of a nil sorter) on a Range whose
///   sort_target it does not know, so only known ones are sent here (the
///   grpc target sends any; Tern sorts those by key);
/// - etcd's store starts "compacted at -1", Tern's at 0, so before any
///   compaction a txn's range at revision -1 is refused by Tern only; -2
///   is refused by both.
fn comparable(call: &mut KvCall) {
    fn range(r: &mut RangeRequest) {
        r.sort_target = r.sort_target.rem_euclid(5);
    }
    fn txn(t: &mut TxnRequest) {
        for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
            match &mut op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    range(r);
                    if r.revision == -1 {
                        r.revision = -2;
                    }
                }
                Some(request_op::Request::RequestTxn(t)) => txn(t),
                _ => {}
            }
        }
    }
    match call {
        KvCall::Range(r) => range(r),
        KvCall::Txn(t) => txn(t),
        _ => {}
    }
}

#[test]
fn kv_and_lease_requests_answer_exactly_like_etcd() {
    big_stack(|| {
        let started = Instant::now();
        let etcd = tern_tests::Etcd::start();
        let member = LoggedMember::start();
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let connect = |endpoint: String| {
            rt.block_on(async move {
                let ch = tern_tests::channel(&endpoint).await;
                (
                    KvClient::new(ch.clone()).max_decoding_message_size(usize::MAX),
                    LeaseClient::new(ch),
                )
            })
        };
        let etcd_clients = connect(etcd.endpoint.clone());
        let tern_clients = connect(member.endpoint.clone());
        let tally = Tally::default();
        let history: Mutex<Vec<KvCall>> = Mutex::default();
        // Each answer depends on the requests before it, so a shrunk input
        // would run against another state: report the failing request and
        // the ones before it instead.
        let mut runner = TestRunner::new(Config {
            cases: cases(600),
            failure_persistence: None,
            max_shrink_iters: 0,
            ..Config::default()
        });
        let calls = kv_call().prop_map(|mut call| {
            comparable(&mut call);
            call
        });
        let result = runner.run(&calls, |call| {
        history.lock().expect("history").push(call.clone());
        let name = match &call {
            KvCall::Range(_) => "Range",
            KvCall::Put(_) => "Put",
            KvCall::DeleteRange(_) => "DeleteRange",
            KvCall::Txn(_) => "Txn",
            KvCall::Compact(_) => "Compact",
            KvCall::LeaseGrant(_) => "LeaseGrant",
            KvCall::LeaseRevoke(_) => "LeaseRevoke",
        };
        let (mut ekv, mut elease) = etcd_clients.clone();
        let (mut tkv, mut tlease) = tern_clients.clone();
        let (from_etcd, from_tern) = rt.block_on(async {
            let e = tokio::time::timeout(CASE_TIMEOUT, kv_answer(&mut ekv, &mut elease, call.clone()));
            let e = e.await.map_err(|_| TestCaseError::fail("etcd did not answer"))?;
            let t = tokio::time::timeout(CASE_TIMEOUT, kv_answer(&mut tkv, &mut tlease, call));
            let t = t.await.map_err(|_| TestCaseError::fail("tern did not answer"))?;
            Ok::<_, TestCaseError>((e, t))
        })?;
        if from_etcd != from_tern {
            let h = history.lock().expect("history");
            let recent: Vec<String> = h.iter().rev().take(8).rev().map(|c| format!("{c:?}")).collect();
            return Err(TestCaseError::fail(format!(
                "answers differ\n etcd: {from_etcd}\n tern: {from_tern}\nrequests (last is this one):\n{}",
                recent.join("\n")
            )));
        }
        let answer: String = match from_tern.strip_prefix("error ") {
            Some(error) => error
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .take(90)
                .collect(),
            None => "ok".into(),
        };
        tally.record(format!("{name}: {answer}"));
        Ok(())
    });
        let log = member.log();
        assert!(!log.contains("panicked"), "tern-primary panicked: {log}");
        if let Err(e) = result {
            panic!("{e}");
        }
        tally.report("etcd differential (KV, leases)", started);
    });
}

// ---------------------------------------------------------------------
// Config: TOML documents and flags.

/// Every flag name of both programs (the learner's include the primary's).
fn flag_names() -> Vec<String> {
    use clap::CommandFactory;
    tern_config::LearnerConfig::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// Values for flags and TOML strings: the shapes each flag expects, at
/// and past their limits, and anything else.
fn flag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<u64>().prop_map(|n| n.to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        2 => prop::sample::select(vec![
            "0", "-1", "1", "5", "18446744073709551615", "18446744073709551616",
            "9223372036854775807", "3074457345618258603", "1h", "30m", "0s", "5s",
            "99999999999999999999h", "1e3", "true", "false", "new", "existing",
            "periodic", "revision", "default=http://localhost:2380",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2", "a=", "=http://x:1", ",,,",
            "http://127.0.0.1:0", "https://[::1]:2379", "unix:///tmp/s", "file:///tmp/b",
            "s3://bucket/prefix", "0 * * * * *", "@hourly", "* * *", "age1xyz",
            "", " ", "\u{0}", "ünïcødé",
        ]).prop_map(str::to_string),
        2 => url(),
        2 => ".{0,24}",
    ]
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => flag_value().prop_map(|v| toml_string(&v)),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => prop::sample::select(vec!["inf", "-inf", "nan", "1979-05-27T07:32:00Z", "07:32:00", "0x10", "1_000"]).prop_map(str::to_string),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        // Not TOML at all.
        1 => "[^\n]{0,16}",
    ]
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => toml_scalar(),
        2 => prop::collection::vec(toml_scalar(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => prop::collection::vec(prop::collection::vec(toml_scalar(), 0..2).prop_map(|v| format!("[{}]", v.join(", "))), 0..3)
            .prop_map(|v| format!("[{}]", v.join(", "))),
        1 => toml_scalar().prop_map(|v| format!("{{ a = {v} }}")),
    ]
}

fn config_key(names: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(names),
        1 => Just("config-file".to_string()),
        1 => "[a-z-]{1,12}",
        1 => ".{0,12}".prop_map(|k| toml_string(&k)),
    ]
}

/// A TOML document, mostly well-formed; sometimes with a table header,
/// a duplicate key or cut short.
fn toml_document(names: Vec<String>) -> impl Strategy<Value = String> {
    (
        prop::collection::vec((config_key(names), toml_value()), 0..8),
        prop::option::weighted(0.1, "\\[[a-z.]{0,8}\\]"),
        prop::option::weighted(0.1, any::<prop::sample::Index>()),
    )
        .prop_map(|(entries, table, cut)| {
            let mut text: String = entries
                .iter()
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect();
            if let Some(t) = table {
                text.push_str(&format!("{t}\nx = 1\n"));
            }
            if let Some(cut) = cut {
                let mut at = cut.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
            text
        })
}

fn flags(names: Vec<String>) -> impl Strategy<Value = Vec<String>> {
    let flag = prop_oneof![
        6 => (prop::sample::select(names.clone()), flag_value()).prop_map(|(k, v)| format!("--{k}={v}")),
        1 => prop::sample::select(names.clone()).prop_map(|k| format!("--{k}")),
        1 => flag_value(),
        1 => prop::sample::select(vec!["--", "-", "-x", "--help", "--version", "--config-file"]).prop_map(str::to_string),
        1 => ".{0,12}",
    ];
    prop::collection::vec(flag, 0..8)
}

#[test]
fn config_files_and_flags_get_a_clear_error_and_never_panic() {
    let started = Instant::now();
    let names = flag_names();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tern.toml");
    let tally = Tally::default();
    let input = (
        toml_document(names.clone()),
        flags(names),
        any::<bool>(),
        any::<bool>(),
    );
    let result = runner(cases(3000)).run(&input, |(document, flags, with_file, learner)| {
        std::fs::write(&file, &document).expect("write config");
        let mut args: Vec<std::ffi::OsString> = vec!["tern".into()];
        if with_file {
            args.push("--config-file".into());
            args.push(file.clone().into());
        }
        args.extend(flags.into_iter().map(Into::into));
        let outcome = bounded("config load", move || {
            let loaded = if learner {
                tern_config::LearnerConfig::load(args).map(|c| {
                    let _ = (c.backup.keep_within(), c.backup.segment_interval());
                    c.member
                })
            } else {
                tern_config::PrimaryConfig::load(args)
            };
            loaded.map(|c| {
                let _ = (c.initial_members(), c.auto_compaction(), c.data_dir());
            })
        })?;
        match outcome {
            Ok(()) => tally.record("loaded"),
            Err(e) => {
                let message = e.to_string();
                prop_assert!(
                    !message.trim().is_empty(),
                    "an error without a message: {e:?}"
                );
                let kind = match e {
                    tern_config::ConfigError::Flags(e) => format!("flags: {:?}", e.kind()),
                    tern_config::ConfigError::Invalid { key, .. } => format!("invalid --{key}"),
                    tern_config::ConfigError::ReadFile { .. } => "unreadable file".into(),
                    tern_config::ConfigError::Toml { .. } => "not TOML".into(),
                    tern_config::ConfigError::UnknownKey { .. } => "unknown key".into(),
                    tern_config::ConfigError::UnsupportedValue { kind, .. } => {
                        format!("unsupported value: {kind}")
                    }
                };
                tally.record(kind);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    tally.report("config", started);
}

/// Inputs the config fuzzer found panicking (overflow), refused by name.
#[test]
fn config_overflows_found_by_fuzzing_are_refused() {
    let load = |args: &[&str]| {
        let args = std::iter::once("tern-primary").chain(args.iter().copied());
        tern_config::PrimaryConfig::load(args.map(std::ffi::OsString::from))
            .expect_err("refused")
            .to_string()
    };
    let e = load(&["--auto-compaction-retention=5124095576030432"]);
    assert!(e.contains("'--auto-compaction-retention'"), "{e}");
    let e = load(&["--heartbeat-interval=3689348814741910324"]);
    assert!(e.contains("'--election-timeout'"), "{e}");
    let e = load(&["--election-timeout=50001"]);
    assert!(e.contains("is too long"), "{e}");
}

// ---------------------------------------------------------------------
// Backup manifests.

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "",
            "2026-11-25T18:12:00Z",
            "2026-13-45T99:99:99Z",
            "+275760-09-13T00:00:00Z",
            "../../../etc/passwd",
            "x.db.zst.age",
            "zstd",
            "age",
            "00",
            "ffffffffffffffffff",
        ])
        .prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{0,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// RFC 3339 times, mostly valid, some with fields out of range.
fn timestamp() -> impl Strategy<Value = String> {
    (
        prop_oneof![1970u32..2100, 0u32..100_000],
        prop_oneof![1u32..13, 0u32..100],
        prop_oneof![1u32..29, 0u32..100],
        (0u32..25, 0u32..61, 0u32..61, 0u32..1000),
        prop::sample::select(vec!["Z", "+00:00", "-11:30", "+99:99", ""]),
    )
        .prop_map(|(y, mo, d, (h, mi, s, ms), tz)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}{tz}")
        })
}

/// A manifest as the learner writes it, with arbitrary field values.
fn valid_manifest() -> impl Strategy<Value = serde_json::Value> {
    (
        (any::<u32>(), ".{0,30}", any::<i64>(), any::<u64>(), any::<u64>()),
        (any::<i64>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<i32>()),
        (timestamp(), timestamp()),
    )
        .prop_map(
            |(
                (format_version, id, revision, raft_index, raft_term),
                (compact_revision, key_count, kv_hash, size, level),
                (started, finished),
            )| {
                serde_json::json!({
                    "format_version": format_version,
                    "id": id,
                    "cluster_id": "cdf818194e3a8c32",
                    "member_id": "8e9e05c52164694d",
                    "revision": revision,
                    "raft_index": raft_index,
                    "raft_term": raft_term,
                    "compact_revision": compact_revision,
                    "key_count": key_count,
                    "kv_hash": kv_hash,
                    "object": {"name": format!("{id}.db.zst.age"), "size": size, "sha256": "00", "raw_size": size},
                    "compression": {"algorithm": "zstd", "level": level},
                    "encryption": {"algorithm": "age-x25519", "recipients": ["age1xyz"]},
                    "content": tern_learner::backup::manifest::CONTENT,
                    "started_at": started,
                    "finished_at": finished,
                    "tool": "tern-learner 0.1.0",
                })
            },
        )
}

/// Change one field somewhere in a JSON tree: remove it, or give it
/// another value (of any type).
fn mutate_json(
    v: &mut serde_json::Value,
    path: &[prop::sample::Index],
    remove: bool,
    new: serde_json::Value,
) {
    let serde_json::Value::Object(map) = v else {
        *v = new;
        return;
    };
    if map.is_empty() {
        return;
    }
    let key = map
        .keys()
        .nth(path.first().map_or(0, |i| i.index(map.len())))
        .cloned()
        .expect("key");
    match path.get(1..) {
        Some(rest) if !rest.is_empty() && map[&key].is_object() => {
            mutate_json(map.get_mut(&key).expect("field"), rest, remove, new)
        }
        _ if remove => {
            map.remove(&key);
        }
        _ => {
            map.insert(key, new);
        }
    }
}

fn manifest_bytes() -> impl Strategy<Value = Vec<u8>> {
    let field_changed = (
        valid_manifest(),
        prop::collection::vec(
            (
                prop::collection::vec(any::<prop::sample::Index>(), 1..3),
                prop::bool::weighted(0.3),
                json_value(),
            ),
            0..4,
        ),
    )
        .prop_map(|(mut m, changes)| {
            for (path, remove, new) in changes {
                mutate_json(&mut m, &path, remove, new);
            }
            serde_json::to_vec_pretty(&m).expect("json")
        });
    let bytes_changed =
        (valid_manifest(), prop::collection::vec(mutation(), 1..6)).prop_map(|(m, mutations)| {
            let mut bytes = serde_json::to_vec_pretty(&m).expect("json");
            mutate(&mut bytes, &mutations);
            bytes
        });
    prop_oneof![
        4 => field_changed,
        4 => bytes_changed,
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

#[test]
fn backup_manifests_parse_or_are_refused_and_never_panic() {
    use tern_learner::backup::manifest::{self, Manifest};
    let started = Instant::now();
    let tally = Tally::default();
    let result = runner(cases(5000)).run(&manifest_bytes(), |bytes| {
        let outcome = bounded("manifest parse", move || {
            match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) => {
                    // What tern-restore and retention do with one.
                    let name = manifest::manifest_name(&m.id);
                    let data = manifest::data_name(&m.id);
                    assert_eq!(manifest::id_of_manifest(&name), Some(m.id.as_str()));
                    assert_eq!(manifest::id_of_data(&data), Some(m.id.as_str()));
                    let again: Manifest =
                        serde_json::from_slice(&serde_json::to_vec(&m).expect("serialize"))
                            .expect("a manifest that parsed parses again");
                    assert_eq!(again, m, "round trip");
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        })?;
        match outcome {
            Ok(()) => tally.record("parsed"),
            Err(e) => {
                prop_assert!(!e.is_empty());
                let kind = e.split([' ', ':']).take(3).collect::<Vec<_>>().join(" ");
                tally.record(format!("refused: {kind}"));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    tally.report("manifest", started);
}

// ---------------------------------------------------------------------
// Log segments: names and decrypted bodies.

/// Segment object names, with numbers up to (and past) the largest index
/// a segment can name (i64::MAX: indexes are SQLite integers) and u64::MAX.
fn segment_name() -> impl Strategy<Value = String> {
    let max = i64::MAX as u64;
    let number = prop_oneof![
        2 => (0u64..64).prop_map(|n| format!("{n:020}")),
        1 => prop::sample::select(vec![max - 1, max, max + 1, u64::MAX]).prop_map(|n| format!("{n}")),
        2 => (0..=max).prop_map(|n| format!("{n:020}")),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec!["", "-1", "+7", "18446744073709551616", "00000000000000000000000000", "1e3", " 1"]).prop_map(str::to_string),
    ];
    let revision = prop_oneof![
        any::<i64>().prop_map(|r| format!("-r{r:020}")),
        any::<i64>().prop_map(|r| format!("-r{r}")),
        Just(String::new()),
        Just("-r".to_string()),
        Just("-x5".to_string()),
        Just("-r1-r2".to_string()),
    ];
    let shaped = (
        number.clone(),
        number,
        revision,
        prop::sample::select(vec![".seg.zst.age", ".seg.zst", "", ".seg.zst.age.tmp"]),
    )
        .prop_map(|(a, b, r, ext)| format!("{a}-{b}{r}{ext}"));
    prop_oneof![
        6 => shaped.clone(),
        2 => (shaped, prop::collection::vec(mutation(), 1..4)).prop_map(|(s, m)| {
            let mut bytes = s.into_bytes();
            mutate(&mut bytes, &m);
            String::from_utf8_lossy(&bytes).into_owned()
        }),
        1 => ".{0,40}",
    ]
}

/// A segment body as the archiver writes it, for entries `first..`, with
/// indexes that may run up to (and past) `u64::MAX`.
fn segment_body() -> impl Strategy<Value = (Vec<u8>, u64, u64)> {
    let first = prop_oneof![
        4 => 1u64..1000,
        1 => (0u64..4).prop_map(|k| u64::MAX - k),
        1 => any::<u64>(),
    ];
    let entry_data = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
        put_request(small_value()).prop_map(|p| {
            use prost::Message;
            RaftRequest {
                request: Some(raft_request::Request::Put(p)),
                ..Default::default()
            }
            .encode_to_vec()
        }),
    ];
    (first, prop::collection::vec((entry_data, 0i32..4), 0..6)).prop_map(|(first, entries)| {
        use protobuf::Message;
        let mut body = tern_learner::backup::archive::MAGIC.to_vec();
        let mut index = first;
        let n = entries.len() as u64;
        for (data, kind) in entries {
            let mut e = raft::eraftpb::Entry {
                index,
                term: 1,
                data: data.into(),
                ..Default::default()
            };
            e.set_entry_type(match kind {
                0 | 1 => raft::eraftpb::EntryType::EntryNormal,
                2 => raft::eraftpb::EntryType::EntryConfChange,
                _ => raft::eraftpb::EntryType::EntryConfChangeV2,
            });
            let bytes = e.write_to_bytes().expect("encode entry");
            body.extend_from_slice(&index.to_be_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            body.extend_from_slice(&bytes);
            index = index.wrapping_add(1);
        }
        (body, first, first.wrapping_add(n.saturating_sub(1)))
    })
}

/// A body with its frames damaged: lengths and indexes overwritten,
/// bytes flipped, cut short.
fn damaged_segment_body() -> impl Strategy<Value = (Vec<u8>, u64, u64)> {
    prop_oneof![
        3 => segment_body(),
        4 => (segment_body(), prop::collection::vec(mutation(), 1..5)).prop_map(|((mut b, f, l), m)| {
            mutate(&mut b, &m);
            (b, f, l)
        }),
        // A frame length near u32::MAX, or an index out of order.
        2 => (segment_body(), any::<u32>(), any::<u64>()).prop_map(|((mut b, f, l), len, index)| {
            let magic = tern_learner::backup::archive::MAGIC.len();
            if b.len() >= magic + 12 {
                b[magic..magic + 8].copy_from_slice(&index.to_be_bytes());
                b[magic + 8..magic + 12].copy_from_slice(&len.to_be_bytes());
            }
            (b, f, l)
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| (b, 1, 1)),
    ]
}

#[test]
fn log_segment_names_and_bodies_are_checked_and_never_panic() {
    use tern_learner::backup::archive::{decode_segment, SegmentName};
    let started = Instant::now();
    let names = Tally::default();
    let result = runner(cases(5000)).run(&segment_name(), |name| {
        let parsed = bounded("SegmentName::parse", move || {
            SegmentName::parse(&name).map(|n| (n, SegmentName::parse(&n.to_string())))
        })?;
        match parsed {
            Some((n, again)) => {
                prop_assert!(n.first <= n.last);
                prop_assert_eq!(again, Some(n), "a parsed name prints as a name that parses");
                names.record("parsed");
            }
            None => names.record("not a segment name"),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    names.report("segment names", started);

    let started = Instant::now();
    let bodies = Tally::default();
    let input = (damaged_segment_body(), any::<bool>(), any::<u64>());
    let result = runner(cases(5000)).run(&input, |((body, first, last), right_name, other)| {
        let name = if right_name {
            SegmentName {
                first,
                last,
                revision: None,
            }
        } else {
            SegmentName {
                first: other.min(first),
                last: other.max(first),
                revision: Some(7),
            }
        };
        let decoded = bounded("decode_segment", move || {
            decode_segment(&body, &name)
                .map(|entries| entries.len())
                .map_err(|e| {
                    let message = e.to_string();
                    let kind: String = message
                        .split(' ')
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ")
                        .chars()
                        .map(|c| if c.is_ascii_digit() { '#' } else { c })
                        .collect();
                    (kind, message)
                })
        })?;
        match decoded {
            Ok(_) => bodies.record("decoded"),
            Err((kind, message)) => {
                prop_assert!(!message.is_empty());
                bodies.record(format!("refused: {kind}"));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    bodies.report("segment bodies", started);
}

/// What a member's log holds, step by step: entries appended (some after
/// a rewind, as a follower's conflicting suffix is replaced), hard states,
/// compactions up to an entry written.
#[derive(Clone, Debug)]
enum LogStep {
    Append(Vec<usize>),
    Rewind(u64),
    HardState(u64),
    Compact(prop::sample::Index),
}

/// A member's Raft log segment as a crash or a bad disk leaves it: the
/// bytes of a real log's records, then mutated.
fn damaged_raft_log() -> impl Strategy<Value = (Vec<u8>, Vec<Mutation>)> {
    use tern_primary::raft::wal::{Record, MAGIC};
    let step = prop_oneof![
        6 => prop::collection::vec(0usize..1500, 1..6).prop_map(LogStep::Append),
        1 => (1u64..4).prop_map(LogStep::Rewind),
        1 => (0u64..5).prop_map(LogStep::HardState),
        1 => any::<prop::sample::Index>().prop_map(LogStep::Compact),
    ];
    (
        prop::collection::vec(step, 1..12),
        prop::collection::vec(mutation(), 0..4),
    )
        .prop_map(|(steps, mutations)| {
            let mut bytes = MAGIC.to_vec();
            let (mut next, mut term) = (1u64, 1u64);
            for step in steps {
                let record = |r: Record, out: &mut Vec<u8>| r.encode_into(out).expect("encode");
                match step {
                    LogStep::Append(sizes) => {
                        for size in sizes {
                            let entry = raft::eraftpb::Entry {
                                index: next,
                                term,
                                data: vec![(next % 251) as u8 + 1; size].into(),
                                ..Default::default()
                            };
                            record(Record::Entry(entry), &mut bytes);
                            next += 1;
                        }
                    }
                    LogStep::Rewind(by) => {
                        next = next.saturating_sub(by).max(1);
                        term += 1;
                    }
                    LogStep::HardState(commit) => record(
                        Record::HardState(raft::eraftpb::HardState {
                            term,
                            commit,
                            ..Default::default()
                        }),
                        &mut bytes,
                    ),
                    LogStep::Compact(at) => {
                        let index = at.index(next as usize) as u64;
                        record(
                            Record::Compacted(raft::eraftpb::SnapshotMetadata {
                                index,
                                ..Default::default()
                            }),
                            &mut bytes,
                        )
                    }
                }
            }
            (bytes, mutations)
        })
}

#[test]
fn raft_log_files_are_replayed_or_refused_and_never_panic() {
    use tern_primary::raft::wal::Wal;
    let started = Instant::now();
    let logs = Tally::default();
    let result = runner(cases(1500)).run(&damaged_raft_log(), |(mut bytes, mutations)| {
        mutate(&mut bytes, &mutations);
        let outcome = bounded("Wal::open", move || {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("0000000000000000.wal"), &bytes).expect("write");
            let first = Wal::open(dir.path()).map(|(_, replayed)| replayed);
            // What an open accepted (a torn tail cut off) opens the same
            // way again.
            let again = Wal::open(dir.path()).map(|(_, replayed)| replayed);
            match (first, again) {
                (Ok(a), Ok(b)) => Ok((
                    a.entries
                        .iter()
                        .map(|e| (e.index, e.term))
                        .collect::<Vec<_>>(),
                    b.entries
                        .iter()
                        .map(|e| (e.index, e.term))
                        .collect::<Vec<_>>(),
                    a.hard_state == b.hard_state && a.marker == b.marker,
                )),
                (Err(e), _) => Err(e.to_string()),
                (Ok(_), Err(e)) => Err(format!("opened once, then refused: {e}")),
            }
        })?;
        match outcome {
            Ok((entries, again, same_state)) => {
                prop_assert_eq!(&entries, &again, "a second open replays the same entries");
                prop_assert!(same_state, "a second open replays the same state");
                prop_assert!(
                    entries.windows(2).all(|w| w[1].0 == w[0].0 + 1),
                    "replayed entries are contiguous: {:?}",
                    entries
                );
                logs.record(if entries.is_empty() {
                    "opened, no entries"
                } else {
                    "opened"
                });
            }
            Err(message) => {
                prop_assert!(!message.contains("opened once"), "{}", message);
                prop_assert!(message.starts_with("raft log"), "{}", message);
                let kind: String = message
                    .split(": ")
                    .nth(1)
                    .unwrap_or("")
                    .split(' ')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                logs.record(format!("refused: {kind}"));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    logs.report("raft log files", started);
}

/// Found by the segment fuzzer: a decrypted segment whose entry at index
/// u64::MAX is followed by another frame makes `decode_segment` compute
/// `u64::MAX + 1` (a panic in debug builds, a wrap in release).
#[test]
fn decode_segment_refuses_an_index_past_u64_max() {
    use protobuf::Message;
    use tern_learner::backup::archive::{decode_segment, SegmentName, MAGIC};
    let mut body = MAGIC.to_vec();
    for index in [u64::MAX, 0] {
        let e = raft::eraftpb::Entry {
            index,
            ..Default::default()
        };
        let bytes = e.write_to_bytes().expect("encode");
        body.extend_from_slice(&index.to_be_bytes());
        body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        body.extend_from_slice(&bytes);
    }
    let name = SegmentName {
        first: u64::MAX,
        last: u64::MAX,
        revision: None,
    };
    let result = std::panic::catch_unwind(|| decode_segment(&body, &name).map(|e| e.len()));
    assert!(
        matches!(result, Ok(Err(_))),
        "a segment running past u64::MAX must be refused"
    );
}

// ---------------------------------------------------------------------
// Replay: forged log entries applied to a state.

fn raft_request() -> impl Strategy<Value = RaftRequest> {
    let request = prop_oneof![
        4 => put_request(small_value()).prop_map(raft_request::Request::Put),
        2 => delete_request().prop_map(raft_request::Request::DeleteRange),
        5 => txn_request().prop_map(raft_request::Request::Txn),
        1 => (revision(), any::<bool>()).prop_map(|(revision, physical)| raft_request::Request::Compaction(CompactionRequest { revision, physical })),
        2 => (ttl(), lease_id()).prop_map(|(ttl, id)| raft_request::Request::LeaseGrant(LeaseGrantRequest { ttl, id })),
        1 => lease_id().prop_map(|id| raft_request::Request::LeaseRevoke(LeaseRevokeRequest { id })),
        1 => (enum_value(3), any::<u64>(), enum_value(3)).prop_map(|(action, member_id, alarm)| raft_request::Request::Alarm(AlarmRequest { action, member_id, alarm })),
        1 => (prop_oneof![Just(1u64), any::<u64>()], prop::collection::vec(url(), 0..3)).prop_map(|(id, peer_ur_ls)| raft_request::Request::MemberUpdate(MemberUpdateRequest { id, peer_ur_ls })),
        1 => (prop_oneof![Just(1u64), any::<u64>()], ".{0,10}", prop::collection::vec(url(), 0..3)).prop_map(|(id, name, client_urls)| raft_request::Request::MemberAttributes(MemberAttributes { id, name, client_urls })),
    ];
    (prop::option::weighted(0.95, request), any::<u64>()).prop_map(|(request, proposed_at_ms)| {
        RaftRequest {
            request,
            proposed_at_ms,
            ..Default::default()
        }
    })
}

#[test]
fn forged_log_entries_replay_without_panicking() {
    big_stack(|| {
        use tern_primary::apply::{Applier, ApplyError};
        use tern_primary::lease::Lessor;
        use tern_primary::mvcc::{read, MvccStore};
        let started = Instant::now();
        let tally = Arc::new(Tally::default());
        let input = prop::collection::vec(raft_request(), 1..24);
        let result = runner(cases(150)).run(&input, |requests| {
            let tally = tally.clone();
            bounded("replay", move || {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("state.db");
                let mut store = MvccStore::open(&path).expect("open a fresh state");
                let lessor = Arc::new(Lessor::new(Duration::from_secs(1)));
                let mut applier = Applier::new(lessor, store.connection()).expect("applier");
                let mut batch = store.batch().expect("batch");
                let mut revision = batch.state().revision;
                for (i, request) in requests.into_iter().enumerate() {
                    let Some(r) = request.request else { continue };
                    let result = batch.entry(i as u64 + 1, 1, |b| applier.apply(b, r));
                    match result {
                        Ok(_) => tally.record("applied"),
                        Err(ApplyError::Storage(e)) => {
                            panic!("storage failure from a request: {e}")
                        }
                        Err(e) => tally.record(format!("refused: {e}")),
                    }
                    assert!(batch.state().revision >= revision, "revision went back");
                    revision = batch.state().revision;
                }
                batch.commit().expect("commit");
                // The state is whole: its hash can be computed at its revision.
                let state = read::store_state(store.connection()).expect("state");
                read::hash(store.connection(), state.revision, state.compact_revision)
                    .expect("hash");
            })
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        tally.report("replay", started);
    });
}

// ---------------------------------------------------------------------
// tern-restore against a store of damaged and forged objects.

/// A backup store made by a real learner: one full backup and log
/// segments after it.
struct RealStore {
    dir: tempfile::TempDir,
    identity: age::x25519::Identity,
    key_file: PathBuf,
    /// A revision the segments reach past the backup.
    target_revision: i64,
}

fn post_backup(endpoint: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(endpoint).expect("connect");
    write!(
        s,
        "POST /backup HTTP/1.1\r\nHost: {endpoint}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("post");
    let mut r = String::new();
    s.read_to_string(&mut r).expect("response");
    assert!(r.starts_with("HTTP/1.1 200"), "POST /backup: {r}");
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

fn make_real_store() -> RealStore {
    use age::secrecy::ExposeSecret;
    use tern_tests::cluster::Cluster;
    use tern_tests::{current_revision, etcdctl};
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = age::x25519::Identity::generate();
    let key_file = dir.path().join("key.txt");
    std::fs::write(
        &key_file,
        format!("{}\n", identity.to_string().expose_secret()),
    )
    .expect("key file");
    let store = dir.path().join("store");
    let url = format!("file://{}", store.display());
    let public = identity.to_public().to_string();
    let mut c = Cluster::start(1, &[]);
    let l = c.add_member(
        true,
        &[
            "--backup-url",
            &url,
            "--backup-recipient",
            &public,
            "--backup-segment-interval",
            "200ms",
        ],
    );
    let leader = c.nodes[0].client.clone();
    for i in 0..5 {
        let out = etcdctl(&leader, &["put", &format!("k/{i}"), &format!("v{i}")], None);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let rev = current_revision(&leader);
    c.converged_hash(&[0, l], rev, Duration::from_secs(30));
    post_backup(&c.nodes[l].client);
    for i in 0..6 {
        let out = etcdctl(&leader, &["put", "k/after", &i.to_string()], None);
        assert_eq!(out.code, 0, "{out:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let target_revision = current_revision(&leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reach = files(&store.join("segments"), ".seg.zst.age")
            .iter()
            .filter_map(|p| {
                tern_learner::backup::archive::SegmentName::parse(
                    &p.file_name()?.to_string_lossy(),
                )?
                .revision
            })
            .max()
            .unwrap_or(0);
        if reach >= target_revision {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "segments did not reach {target_revision}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.nodes[l].kill9();
    RealStore {
        dir,
        identity,
        key_file,
        target_revision,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let path = e.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(e.file_name()));
        } else {
            std::fs::copy(&path, to.join(e.file_name())).expect("copy");
        }
    }
}

/// What to do to a copy of the real store before running tern-restore.
#[derive(Clone, Debug)]
enum Damage {
    /// Bytes of the backup object changed; the manifest left as it was.
    Object(Vec<Mutation>),
    /// The object's plaintext (the zstd stream, or the SQLite file under
    /// it) changed, re-encrypted to the recipient, and the manifest's size
    /// and sha256 made to match: a forgery only the content checks catch.
    ForgedObject {
        sqlite: bool,
        mutations: Vec<Mutation>,
    },
    /// The manifest's bytes changed.
    Manifest(Vec<Mutation>),
    /// A manifest field removed or given another value.
    ManifestField(Vec<prop::sample::Index>, bool, serde_json::Value),
    /// Bytes of one segment object changed.
    Segment(prop::sample::Index, Vec<Mutation>),
    /// One segment's plaintext changed and re-encrypted to the recipient.
    ForgedSegment(prop::sample::Index, Vec<Mutation>),
    /// One segment's entries replaced by forged requests.
    ForgedEntries(prop::sample::Index, Vec<RaftRequest>),
    /// One segment object renamed.
    RenamedSegment(prop::sample::Index, String),
    /// The right files, the wrong identity.
    WrongKey,
}

fn damage() -> impl Strategy<Value = Damage> {
    let mutations = || prop::collection::vec(mutation(), 1..4);
    prop_oneof![
        mutations().prop_map(Damage::Object),
        (any::<bool>(), mutations())
            .prop_map(|(sqlite, mutations)| Damage::ForgedObject { sqlite, mutations }),
        mutations().prop_map(Damage::Manifest),
        (
            prop::collection::vec(any::<prop::sample::Index>(), 1..3),
            prop::bool::weighted(0.3),
            json_value()
        )
            .prop_map(|(p, r, v)| Damage::ManifestField(p, r, v)),
        (any::<prop::sample::Index>(), mutations()).prop_map(|(i, m)| Damage::Segment(i, m)),
        (any::<prop::sample::Index>(), mutations()).prop_map(|(i, m)| Damage::ForgedSegment(i, m)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(raft_request(), 1..6)
        )
            .prop_map(|(i, r)| Damage::ForgedEntries(i, r)),
        (any::<prop::sample::Index>(), segment_name())
            .prop_map(|(i, n)| Damage::RenamedSegment(i, n)),
        Just(Damage::WrongKey),
    ]
}

fn decrypt(identity: &age::x25519::Identity, bytes: &[u8]) -> Vec<u8> {
    age::decrypt(identity, bytes).expect("decrypt the pristine object")
}

fn encrypt(identity: &age::x25519::Identity, plain: &[u8]) -> Vec<u8> {
    age::encrypt(&identity.to_public(), plain).expect("encrypt")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Apply `damage` to the store at `store`; returns the identity file
/// tern-restore should use.
fn apply_damage(real: &RealStore, store: &Path, scratch: &Path, damage: Damage) -> PathBuf {
    let backups = store.join("backups");
    let manifest_path = files(&backups, ".manifest.json").pop().expect("a manifest");
    let object_path = files(&backups, ".db.zst.age").pop().expect("an object");
    let segments = files(&store.join("segments"), ".seg.zst.age");
    let rewrite_manifest = |object: &[u8]| {
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest"))
                .expect("json");
        m["object"]["size"] = object.len().into();
        m["object"]["sha256"] = sha256_hex(object).into();
        std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).expect("json"))
            .expect("write manifest");
    };
    match damage {
        Damage::Object(m) => {
            let mut bytes = std::fs::read(&object_path).expect("object");
            mutate(&mut bytes, &m);
            std::fs::write(&object_path, bytes).expect("write");
        }
        Damage::ForgedObject { sqlite, mutations } => {
            let mut zst = decrypt(
                &real.identity,
                &std::fs::read(&object_path).expect("object"),
            );
            if sqlite {
                let mut db = zstd::decode_all(&zst[..]).expect("zstd");
                mutate(&mut db, &mutations);
                zst = zstd::encode_all(&db[..], 3).expect("zstd");
            } else {
                mutate(&mut zst, &mutations);
            }
            let forged = encrypt(&real.identity, &zst);
            std::fs::write(&object_path, &forged).expect("write");
            rewrite_manifest(&forged);
        }
        Damage::Manifest(m) => {
            let mut bytes = std::fs::read(&manifest_path).expect("manifest");
            mutate(&mut bytes, &m);
            std::fs::write(&manifest_path, bytes).expect("write");
        }
        Damage::ManifestField(path, remove, value) => {
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest"))
                    .expect("json");
            mutate_json(&mut m, &path, remove, value);
            std::fs::write(&manifest_path, serde_json::to_vec(&m).expect("json")).expect("write");
        }
        Damage::Segment(i, m) if !segments.is_empty() => {
            let path = &segments[i.index(segments.len())];
            let mut bytes = std::fs::read(path).expect("segment");
            mutate(&mut bytes, &m);
            std::fs::write(path, bytes).expect("write");
        }
        Damage::ForgedSegment(i, m) if !segments.is_empty() => {
            let path = &segments[i.index(segments.len())];
            let zst = decrypt(&real.identity, &std::fs::read(path).expect("segment"));
            let mut plain = zstd::decode_all(&zst[..]).expect("zstd");
            mutate(&mut plain, &m);
            let zst = zstd::encode_all(&plain[..], 3).expect("zstd");
            std::fs::write(path, encrypt(&real.identity, &zst)).expect("write");
        }
        Damage::ForgedEntries(i, requests) if !segments.is_empty() => {
            use prost::Message as _;
            use protobuf::Message as _;
            let path = &segments[i.index(segments.len())];
            let zst = decrypt(&real.identity, &std::fs::read(path).expect("segment"));
            let plain = zstd::decode_all(&zst[..]).expect("zstd");
            let name = tern_learner::backup::archive::SegmentName::parse(
                &path.file_name().expect("name").to_string_lossy(),
            )
            .expect("segment name");
            let mut entries =
                tern_learner::backup::archive::decode_segment(&plain, &name).expect("decode");
            for (e, r) in entries.iter_mut().zip(requests) {
                e.data = r.encode_to_vec().into();
                e.set_entry_type(raft::eraftpb::EntryType::EntryNormal);
            }
            let mut forged = tern_learner::backup::archive::MAGIC.to_vec();
            for e in entries {
                let bytes = e.write_to_bytes().expect("encode");
                forged.extend_from_slice(&e.index.to_be_bytes());
                forged.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                forged.extend_from_slice(&bytes);
            }
            let zst = zstd::encode_all(&forged[..], 3).expect("zstd");
            std::fs::write(path, encrypt(&real.identity, &zst)).expect("write");
        }
        Damage::RenamedSegment(i, name) if !segments.is_empty() => {
            let path = &segments[i.index(segments.len())];
            let name: String = name.chars().filter(|c| *c != '/' && *c != '\0').collect();
            if !name.is_empty() && name != "." && name != ".." {
                let _ = std::fs::rename(path, store.join("segments").join(name));
            }
        }
        Damage::WrongKey => {
            let other = scratch.join("other-key.txt");
            use age::secrecy::ExposeSecret;
            std::fs::write(
                &other,
                format!(
                    "{}\n",
                    age::x25519::Identity::generate()
                        .to_string()
                        .expose_secret()
                ),
            )
            .expect("key");
            return other;
        }
        _ => {}
    }
    real.key_file.clone()
}

/// Run tern-restore, bounded; (exit code, stderr).
fn tern_restore(args: &[&str]) -> Result<(i32, String), TestCaseError> {
    let mut child = Command::new(workspace_bin("tern-restore"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern-restore");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + CASE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestCaseError::fail(format!(
                "tern-restore {args:?} did not finish within {CASE_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader.join().unwrap_or_default();
    let code = status.code().ok_or_else(|| {
        TestCaseError::fail(format!(
            "tern-restore {args:?} killed by a signal: {stderr}"
        ))
    })?;
    Ok((code, stderr))
}

#[test]
fn tern_restore_refuses_damaged_and_forged_stores_clearly() {
    big_stack(|| {
        let started = Instant::now();
        let real = make_real_store();
        eprintln!("fuzz restore: real store ready ({:.1?})", started.elapsed());
        let pristine = real.dir.path().join("store");
        let work = real.dir.path().join("work");
        let tally = Tally::default();
        let target = real.target_revision.to_string();
        let result = runner(cases(100)).run(&(damage(), 0usize..3), |(damage, command)| {
            let _ = std::fs::remove_dir_all(&work);
            let store = work.join("store");
            copy_dir(&pristine, &store);
            let key = apply_damage(&real, &store, &work, damage);
            let url = format!("file://{}", store.display());
            let key = key.display().to_string();
            let data_dir = work.join("restored.tern").display().to_string();
            let (name, args): (&str, Vec<&str>) = match command {
                0 => ("list", vec!["list", "--url", &url]),
                1 => (
                    "verify",
                    vec!["verify", "--url", &url, "--identity", &key, "--all"],
                ),
                _ => (
                    "restore",
                    vec![
                        "restore",
                        "--url",
                        &url,
                        "--identity",
                        &key,
                        "--to-revision",
                        &target,
                        "--data-dir",
                        &data_dir,
                    ],
                ),
            };
            let (code, stderr) = tern_restore(&args)?;
            prop_assert!(
                !stderr.contains("panicked"),
                "tern-restore {name} panicked: {stderr}"
            );
            match code {
                0 => tally.record(format!("{name}: ok")),
                1 => {
                    let reason = stderr
                        .lines()
                        .rfind(|l| !l.trim().is_empty())
                        .unwrap_or("")
                        .to_string();
                    prop_assert!(
                        !reason.is_empty(),
                        "tern-restore {name} failed without a reason"
                    );
                    let reason: String = reason
                        .chars()
                        .map(|c| if c.is_ascii_digit() { '#' } else { c })
                        .take(100)
                        .collect();
                    tally.record(format!("{name}: {reason}"));
                }
                other => {
                    return Err(TestCaseError::fail(format!(
                        "tern-restore {name} exited {other}: {stderr}"
                    )))
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        tally.report("restore", started);
    });
}

/// Found by the restore fuzzer: a segment object whose name claims entries
/// up to u64::MAX (only a name: anyone who can write to the store can put
/// one there) made `tern-restore verify` compute `u64::MAX + 1` when it
/// chained segments (a panic in a debug build). Raft indexes are SQLite
/// integers, so such a name is not a segment the archiver wrote: it is
/// passed over, and the real chain still verifies.
#[test]
fn restore_passes_over_a_segment_named_up_to_u64_max() {
    let real = make_real_store();
    let segments = real.dir.path().join("store").join("segments");
    let first = files(&segments, ".seg.zst.age").pop().expect("a segment");
    let name = tern_learner::backup::archive::SegmentName::parse(
        &first.file_name().expect("name").to_string_lossy(),
    )
    .expect("segment name");
    std::fs::copy(
        &first,
        segments.join(format!("{:020}-{}.seg.zst.age", name.first, u64::MAX)),
    )
    .expect("copy");
    let url = format!("file://{}", real.dir.path().join("store").display());
    let key = real.key_file.display().to_string();
    let (code, stderr) = tern_restore(&["verify", "--url", &url, "--identity", &key]).expect("ran");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code, 0, "the real chain verifies: {stderr}");
}
