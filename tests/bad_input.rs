//! Bad requests get etcd's gRPC code and message, never a panic: each is
//! sent to a real etcd and to tern-primary and the answers compared.

use tern_primary::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tern_primary::proto::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, CompactionRequest,
    Compare, DeleteRangeRequest, HashKvRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use tern_tests::{channel, Etcd, Tern};
use tonic::transport::Channel;

/// The outcome a client sees: Ok, or (code, message).
type Seen = Result<(), (tonic::Code, String)>;

fn seen<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Seen {
    r.map(|_| ())
        .map_err(|s| (s.code(), s.message().to_string()))
}

struct Clients {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
}

async fn clients(endpoint: &str) -> Clients {
    let ch = channel(endpoint).await;
    Clients {
        kv: KvClient::new(ch.clone()).max_decoding_message_size(64 << 20),
        lease: LeaseClient::new(ch.clone()),
        maintenance: MaintenanceClient::new(ch),
    }
}

fn put(key: &[u8], value: Vec<u8>) -> PutRequest {
    PutRequest {
        key: key.to_vec(),
        value,
        ..Default::default()
    }
}

fn put_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put(
            key.as_bytes(),
            b"v".to_vec(),
        ))),
    }
}

/// Every bad request, in order, against one server.
async fn run_all(c: &mut Clients) -> Vec<(&'static str, Seen)> {
    let mut out = Vec::new();
    // Set up a little history: revisions 2..=4, then compact at 3.
    for v in ["1", "2", "3"] {
        seen(c.kv.put(put(b"k", v.as_bytes().to_vec())).await).expect("setup put");
    }
    seen(
        c.kv.compact(CompactionRequest {
            revision: 3,
            physical: true,
        })
        .await,
    )
    .expect("setup compact");

    out.push((
        "put empty key",
        seen(c.kv.put(put(b"", b"v".to_vec())).await),
    ));
    out.push((
        "range empty key",
        seen(c.kv.range(RangeRequest::default()).await),
    ));
    out.push((
        "delete empty key",
        seen(c.kv.delete_range(DeleteRangeRequest::default()).await),
    ));
    out.push((
        "value over limit",
        seen(c.kv.put(put(b"big", vec![7u8; 1_600_000])).await),
    ));
    out.push((
        "value at limit",
        seen(c.kv.put(put(b"fits", vec![7u8; 1_500_000])).await),
    ));
    out.push((
        "value far over limit",
        seen(c.kv.put(put(b"huge", vec![7u8; 3_000_000])).await)
            .map_err(|(code, _)| (code, String::new())),
    ));
    out.push((
        "key over limit",
        seen(c.kv.put(put(&vec![b'k'; 1_600_000], b"v".to_vec())).await),
    ));
    out.push((
        "range end before key",
        seen(
            c.kv.range(RangeRequest {
                key: b"z".to_vec(),
                range_end: b"a".to_vec(),
                ..Default::default()
            })
            .await,
        ),
    ));
    let many: Vec<RequestOp> = (0..129).map(|i| put_op(&format!("t{i}"))).collect();
    out.push((
        "129 txn ops",
        seen(
            c.kv.txn(TxnRequest {
                success: many,
                ..Default::default()
            })
            .await,
        ),
    ));
    let fine: Vec<RequestOp> = (0..128).map(|i| put_op(&format!("t{i}"))).collect();
    out.push((
        "128 txn ops",
        seen(
            c.kv.txn(TxnRequest {
                success: fine,
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "duplicate key in txn",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![put_op("d"), put_op("d")],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "put and delete same key in txn",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![
                    put_op("e"),
                    RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(
                            DeleteRangeRequest {
                                key: b"a".to_vec(),
                                range_end: b"z".to_vec(),
                                ..Default::default()
                            },
                        )),
                    },
                ],
                ..Default::default()
            })
            .await,
        ),
    ));
    let nested = |success: Vec<RequestOp>, failure: Vec<RequestOp>| RequestOp {
        request: Some(request_op::Request::RequestTxn(TxnRequest {
            success,
            failure,
            ..Default::default()
        })),
    };
    let delete_op = |key: &str| RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            },
        )),
    };
    out.push((
        "nested txn: put in one branch, delete in the other",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![nested(vec![put_op("n")], vec![delete_op("n")])],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "nested txn: same put in both branches",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![nested(vec![put_op("n")], vec![put_op("n")])],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "nested txn put under an outer delete",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![delete_op("n"), nested(vec![put_op("n")], vec![])],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "two nested txns putting one key",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![
                    nested(vec![put_op("n")], vec![]),
                    nested(vec![put_op("n")], vec![]),
                ],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "txn compare empty key",
        seen(
            c.kv.txn(TxnRequest {
                compare: vec![Compare {
                    target_union: Some(compare::TargetUnion::Version(1)),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "txn with unknown lease",
        seen(
            c.kv.txn(TxnRequest {
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b"l".to_vec(),
                        lease: 4242,
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "put with unknown lease",
        seen(
            c.kv.put(PutRequest {
                key: b"l".to_vec(),
                lease: 4242,
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "ignore_value with value",
        seen(
            c.kv.put(PutRequest {
                key: b"k".to_vec(),
                value: b"x".to_vec(),
                ignore_value: true,
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "ignore_lease with lease",
        seen(
            c.kv.put(PutRequest {
                key: b"k".to_vec(),
                lease: 5,
                ignore_lease: true,
                ..Default::default()
            })
            .await,
        ),
    ));
    out.push((
        "ignore_value on missing key",
        seen(
            c.kv.put(PutRequest {
                key: b"nokey".to_vec(),
                ignore_value: true,
                ..Default::default()
            })
            .await,
        ),
    ));
    let future = RangeRequest {
        key: b"k".to_vec(),
        revision: 1000,
        ..Default::default()
    };
    out.push(("range future revision", seen(c.kv.range(future).await)));
    let compacted = RangeRequest {
        key: b"k".to_vec(),
        revision: 2,
        ..Default::default()
    };
    out.push((
        "range compacted revision",
        seen(c.kv.range(compacted).await),
    ));
    out.push((
        "compact compacted revision",
        seen(
            c.kv.compact(CompactionRequest {
                revision: 2,
                physical: false,
            })
            .await,
        ),
    ));
    out.push((
        "compact future revision",
        seen(
            c.kv.compact(CompactionRequest {
                revision: 1000,
                physical: false,
            })
            .await,
        ),
    ));
    out.push((
        "hashkv future revision",
        seen(
            c.maintenance
                .hash_kv(HashKvRequest { revision: 1000 })
                .await,
        ),
    ));
    out.push((
        "hashkv compacted revision",
        seen(c.maintenance.hash_kv(HashKvRequest { revision: 2 }).await),
    ));
    out.push((
        "revoke unknown lease",
        seen(c.lease.lease_revoke(LeaseRevokeRequest { id: 777 }).await),
    ));
    out.push((
        "lease ttl too large",
        seen(
            c.lease
                .lease_grant(LeaseGrantRequest {
                    ttl: 9_000_000_001,
                    id: 0,
                })
                .await,
        ),
    ));
    seen(
        c.lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 55 })
            .await,
    )
    .expect("grant");
    out.push((
        "grant existing lease id",
        seen(
            c.lease
                .lease_grant(LeaseGrantRequest { ttl: 60, id: 55 })
                .await,
        ),
    ));
    // At --max-request-bytes (1.5 MiB): etcd measures the request it
    // replicates, header included, so these two values straddle it.
    out.push((
        "put just under the request limit",
        seen(c.kv.put(put(b"big", vec![b'x'; 1_572_838])).await),
    ));
    out.push((
        "put just over the request limit",
        seen(c.kv.put(put(b"big", vec![b'x'; 1_572_839])).await),
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_answer_like_etcd() {
    let etcd = Etcd::start();
    let tern = Tern::start(&[]);
    let expected = run_all(&mut clients(&etcd.endpoint).await).await;
    let actual = run_all(&mut clients(&tern.endpoint).await).await;
    for (e, t) in expected.iter().zip(&actual) {
        assert_eq!(e, t, "{}: etcd (left) vs tern (right)", e.0);
    }
    assert_eq!(expected.len(), actual.len());
    // And the member still serves afterwards.
    let mut kv = tern.kv().await;
    assert_eq!(tern_tests::get(&mut kv, "k").await, Some(b"3".to_vec()));
}
