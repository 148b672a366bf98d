//! Reads under concurrency: many at once all answer, from a bounded pool.

use tern_primary::proto::etcdserverpb::kv_client::KvClient;
use tern_primary::proto::etcdserverpb::{PutRequest, RangeRequest};
use tern_tests::Tern;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Put `value` at `key`; the revision it made.
async fn put(kv: &mut KvClient<Channel>, key: &[u8], value: &[u8]) -> i64 {
    kv.put(PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .expect("a put's header")
    .revision
}

/// Threads of a running process.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read the server's threads")
        .count()
}

/// Hundreds of concurrent Ranges, serializable and linearizable, all
/// answer with the value, and the server does not grow a thread (and a
/// pooled SQLite connection with its page cache) per read in flight: the
/// pool runs 4 per core at once (8 at least) and queues the rest. Unbounded,
/// 300 reads in flight made a blocking thread each.
#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_reads_answer_from_a_bounded_pool() {
    const READS: usize = 300;
    let tern = Tern::start(&[]);
    let mut kv = tern.kv().await;
    let value = vec![b'v'; 64 * 1024];
    for n in 0..20 {
        put(&mut kv, format!("read/{n:02}").as_bytes(), &value).await;
    }
    let before = threads(tern.pid());

    // A few connections, as a client's channel pool would have.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(tern.kv().await);
    }
    let mut reads = JoinSet::new();
    for n in 0..READS {
        let mut kv = clients[n % clients.len()].clone();
        reads.spawn(async move {
            let response = kv
                .range(RangeRequest {
                    key: b"read/".to_vec(),
                    range_end: b"read0".to_vec(),
                    serializable: n % 2 == 0,
                    ..Default::default()
                })
                .await
                .expect("a concurrent range answers")
                .into_inner();
            (response.count, response.kvs.len())
        });
    }
    let mut peak = before;
    while let Some(answer) = reads.join_next().await {
        assert_eq!(answer.expect("read task"), (20, 20));
        peak = peak.max(threads(tern.pid()));
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slots = (4 * cores).max(8);
    // The read slots, plus a few for whatever else runs on the blocking
    // pool meanwhile (a metrics refresh, the database size). Twice the
    // slots: tokio's pool starts a thread for the next read when the one
    // that ran the last is not idle again yet (the slot is released at the
    // end of the read, a moment before), and keeps it 10 s. Without the
    // slots, each read in flight had a thread: ~80 at 64 clients.
    assert!(
        peak <= before + 2 * slots + 4,
        "{READS} concurrent reads took the server from {before} to {peak} threads \
         ({slots} read slots)"
    );
}

/// One-key Ranges run on the runtime's thread when a pooled connection is
/// free, ranges on the pool: both kinds at once, beside writes, each
/// answer is consistent with its header, a client reads its own write at
/// once (serializable too, on the member it wrote to), a historical read
/// sees the old value, and the thread count stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn one_key_reads_beside_ranges_and_writes_stay_consistent() {
    const KEYS: usize = 50;
    let tern = Tern::start(&[]);
    let mut kv = tern.kv().await;
    let key = |n: usize| format!("one/{n:02}").into_bytes();
    let first = put(&mut kv, &key(0), b"v0").await;
    for n in 1..KEYS {
        put(&mut kv, &key(n), b"v0").await;
    }
    let before = threads(tern.pid());

    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(tern.kv().await);
    }
    let mut tasks = JoinSet::new();
    for n in 0..200 {
        let mut kv = clients[n % clients.len()].clone();
        tasks.spawn(async move {
            let one_key = n % 3 != 0;
            let response = kv
                .range(RangeRequest {
                    key: if one_key {
                        key(n % KEYS)
                    } else {
                        b"one/".to_vec()
                    },
                    range_end: if one_key {
                        Vec::new()
                    } else {
                        b"one0".to_vec()
                    },
                    serializable: n % 2 == 0,
                    ..Default::default()
                })
                .await
                .expect("a read answers")
                .into_inner();
            let header = response.header.expect("header").revision;
            assert_eq!(response.count as usize, if one_key { 1 } else { KEYS });
            for kv in &response.kvs {
                assert!(kv.mod_revision <= header, "a key newer than its header");
            }
        });
    }
    // Writes meanwhile, each read back at once on both paths.
    for n in 0..KEYS {
        let value = format!("v1-{n}").into_bytes();
        put(&mut kv, &key(n), &value).await;
        for serializable in [false, true] {
            let got = kv
                .range(RangeRequest {
                    key: key(n),
                    serializable,
                    ..Default::default()
                })
                .await
                .expect("get")
                .into_inner();
            assert_eq!(got.kvs[0].value, value, "own write not read back");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("read task");
    }
    let old = kv
        .range(RangeRequest {
            key: key(0),
            revision: first,
            ..Default::default()
        })
        .await
        .expect("historical get")
        .into_inner();
    assert_eq!(old.kvs[0].value, b"v0");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slots = (4 * cores).max(8);
    let after = threads(tern.pid());
    // As in `many_concurrent_reads_answer_from_a_bounded_pool`.
    assert!(
        after <= before + 2 * slots + 4,
        "the reads took the server from {before} to {after} threads ({slots} read slots)"
    );
}
