//! Watch streams over gRPC, side by side with etcd: many watchers on one
//! stream, history replay, filters, prev_kv, cancel, compaction, progress
//! requests. Responses are compared per watcher (their interleaving across
//! watchers may legitimately differ).

use std::collections::BTreeMap;
use std::time::Duration;

use tern_primary::proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_create_request::FilterType,
    watch_request::RequestUnion, CompactionRequest, DeleteRangeRequest, PutRequest,
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use tern_tests::{channel, Etcd, Tern};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn create(key: &str, range_end: &str, start: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        range_end: range_end.as_bytes().to_vec(),
        start_revision: start,
        ..Default::default()
    }
}

fn req(u: RequestUnion) -> WatchRequest {
    WatchRequest {
        request_union: Some(u),
    }
}

async fn put(kv: &mut KvClient<tonic::transport::Channel>, k: &str, v: &str) {
    kv.put(PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    })
    .await
    .expect("put");
}

type ById = BTreeMap<i64, Vec<WatchResponse>>;

fn record(by_id: &mut ById, mut r: WatchResponse) {
    // Ids and terms are compared elsewhere; raft terms may differ.
    if let Some(h) = r.header.as_mut() {
        h.raft_term = 0;
    }
    by_id.entry(r.watch_id).or_default().push(r);
}

/// Whether watcher `id` got an event at revision `revision`.
fn has_event(by_id: &ById, id: i64, revision: i64) -> bool {
    by_id.get(&id).into_iter().flatten().any(|r| {
        r.events
            .iter()
            .any(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision == revision))
    })
}

/// Record responses until `done` holds of them.
async fn read_until(
    inbound: &mut tonic::Streaming<WatchResponse>,
    by_id: &mut ById,
    done: impl Fn(&ById) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(by_id) {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Ok(Ok(Some(r))) => record(by_id, r),
            other => panic!("watch responses stopped short ({other:?}): {by_id:?}"),
        }
    }
}

/// Run the scripted session against one server; responses by watch id.
async fn session(endpoint: &str) -> ById {
    let ch = channel(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    for (k, v) in [("w/a", "1"), ("w/b", "2"), ("w/a", "3"), ("x", "4")] {
        put(&mut kv, k, v).await;
    }
    kv.delete_range(DeleteRangeRequest {
        key: "w/b".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let (tx, rx) = mpsc::channel(16);
    let mut all = create("w/", "w0", 1);
    all.prev_kv = true;
    tx.send(req(RequestUnion::CreateRequest(all)))
        .await
        .expect("send");
    let mut no_put = create("w/a", "", 2);
    no_put.filters = vec![FilterType::Noput as i32];
    tx.send(req(RequestUnion::CreateRequest(no_put)))
        .await
        .expect("send");
    let mut no_delete = create("w/", "w0", 0);
    no_delete.filters = vec![FilterType::Nodelete as i32];
    tx.send(req(RequestUnion::CreateRequest(no_delete)))
        .await
        .expect("send");
    tx.send(req(RequestUnion::CreateRequest(create("\0", "\0", 4))))
        .await
        .expect("send");
    // Starts in the future: nothing before revision 9 may arrive.
    tx.send(req(RequestUnion::CreateRequest(create("w/", "w0", 9))))
        .await
        .expect("send");
    let mut explicit = create("x", "", 0);
    explicit.watch_id = 42;
    tx.send(req(RequestUnion::CreateRequest(explicit.clone())))
        .await
        .expect("send");
    tx.send(req(RequestUnion::CreateRequest(explicit)))
        .await
        .expect("send");
    // Ranges that hold no key: refused, as the duplicate id is.
    for (key, end) in [("w/b", "w/a"), ("w/a", "w/a")] {
        tx.send(req(RequestUnion::CreateRequest(create(key, end, 0))))
            .await
            .expect("send");
    }
    // grpc-go sends response headers with the first message, so the
    // requests must be queued before waiting for the stream to open.
    let mut inbound = WatchClient::new(ch.clone())
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut by_id = ById::new();
    // Each step waits for what the last one must have produced, so a
    // server slowed by the machine's load still sees the same sequence.
    // Every create answered, and the history up to revision 6 replayed
    // to the watchers that start before it.
    read_until(&mut inbound, &mut by_id, |seen| {
        seen.values().flatten().filter(|r| r.created).count() >= 9
            && has_event(seen, 0, 6)
            && has_event(seen, 3, 6)
    })
    .await;
    put(&mut kv, "w/c", "5").await;
    kv.delete_range(DeleteRangeRequest {
        key: "w/a".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    put(&mut kv, "x", "6").await;
    read_until(&mut inbound, &mut by_id, |seen| {
        has_event(seen, 0, 8)
            && has_event(seen, 1, 8)
            && has_event(seen, 2, 7)
            && has_event(seen, 3, 9)
            && has_event(seen, 42, 9)
    })
    .await;
    tx.send(req(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 1,
    })))
    .await
    .expect("send");
    tx.send(req(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 77,
    })))
    .await
    .expect("send");
    read_until(&mut inbound, &mut by_id, |seen| {
        seen.get(&1).into_iter().flatten().any(|r| r.canceled)
    })
    .await;
    // Cancelling an unknown watch gets no answer; give one a moment to
    // arrive if the server sends one anyway (etcd does not).
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(&mut kv, "w/a", "7").await;
    kv.compact(CompactionRequest {
        revision: 5,
        physical: true,
    })
    .await
    .expect("compact");
    tx.send(req(RequestUnion::CreateRequest(create("w/", "w0", 2))))
        .await
        .expect("send");
    tx.send(req(RequestUnion::ProgressRequest(WatchProgressRequest {})))
        .await
        .expect("send");
    // A negative start is before the first revision: compacted too. The
    // id stays taken until it is cancelled, and the cancel is answered.
    let mut negative = create("w/", "w0", -5);
    negative.watch_id = 51;
    tx.send(req(RequestUnion::CreateRequest(negative)))
        .await
        .expect("send");
    read_until(&mut inbound, &mut by_id, |seen| {
        seen.get(&51)
            .into_iter()
            .flatten()
            .any(|r| r.compact_revision != 0)
    })
    .await;
    tx.send(req(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 51,
    })))
    .await
    .expect("send");
    // Created, then cancelled at once: the answers keep that order.
    let mut brief = create("w/", "w0", 0);
    brief.watch_id = 60;
    tx.send(req(RequestUnion::CreateRequest(brief)))
        .await
        .expect("send");
    tx.send(req(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 60,
    })))
    .await
    .expect("send");
    // Whatever else comes, until the stream is quiet.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(Some(r))) = tokio::time::timeout_at(deadline, inbound.message()).await {
        record(&mut by_id, r);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_session_matches_etcd() {
    let etcd = Etcd::start();
    let tern = Tern::start(&[]);
    let expected = session(&etcd.endpoint).await;
    let actual = session(&tern.endpoint).await;
    assert!(
        expected.len() >= 6,
        "etcd answered for every watcher: {expected:?}"
    );
    for (id, e) in &expected {
        assert_eq!(
            Some(e),
            actual.get(id),
            "watch id {id}: etcd (left) vs tern (right)"
        );
    }
    assert_eq!(expected.len(), actual.len());
}

/// A slow reader falls back to history replay and still sees every event
/// exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn slow_watcher_gets_every_event_once() {
    let tern = Tern::start(&[]);
    let ch = channel(&tern.endpoint).await;
    let (tx, rx) = mpsc::channel(4);
    let mut inbound = WatchClient::new(ch.clone())
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    tx.send(req(RequestUnion::CreateRequest(create("s/", "s0", 0))))
        .await
        .expect("send");
    let created = inbound.message().await.expect("created").expect("created");
    assert!(created.created);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let ch = ch.clone();
            tokio::spawn(async move {
                let mut kv = KvClient::new(ch);
                for n in 0..400 {
                    put(&mut kv, &format!("s/{w}/{n}"), "v").await;
                }
            })
        })
        .collect();
    // Read nothing until the writers are done, so the stream backs up.
    for w in writers {
        w.await.expect("writer");
    }
    let mut revisions = Vec::new();
    while revisions.len() < 3200 {
        let r = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("events keep coming")
            .expect("stream ok")
            .expect("stream open");
        revisions.extend(
            r.events
                .iter()
                .map(|e| e.kv.as_ref().expect("kv").mod_revision),
        );
    }
    assert_eq!(revisions.len(), 3200);
    let mut sorted = revisions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, revisions, "in order, no duplicates");
    assert_eq!(revisions.first(), Some(&2));
    assert_eq!(revisions.last(), Some(&3201));
}

/// A watch created after a put's response starts after that put, as in
/// etcd (whose apply notifies the watchers before the put returns). Other
/// clients keep the member writing, so its applies run beside log writes,
/// which is when a reply could go out before the watchers heard of it.
#[tokio::test(flavor = "multi_thread")]
async fn watch_created_after_a_put_starts_after_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let tern = Tern::start(&[]);
    let ch = channel(&tern.endpoint).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (ch, stop) = (ch.clone(), stop.clone());
            tokio::spawn(async move {
                let mut kv = KvClient::new(ch);
                while !stop.load(Ordering::Relaxed) {
                    put(&mut kv, &format!("busy/{w}"), "v").await;
                }
            })
        })
        .collect();
    let (tx, rx) = mpsc::channel(4);
    let mut inbound = WatchClient::new(ch.clone())
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut kv = KvClient::new(ch);
    for n in 0..300 {
        let key = format!("probe/{n}");
        let revision = kv
            .put(PutRequest {
                key: key.clone().into(),
                value: b"v".to_vec(),
                ..Default::default()
            })
            .await
            .expect("put")
            .into_inner()
            .header
            .expect("header")
            .revision;
        tx.send(req(RequestUnion::CreateRequest(create(&key, "", 0))))
            .await
            .expect("send");
        let created = inbound.message().await.expect("created").expect("open");
        assert!(
            created.created && created.events.is_empty(),
            "{key}: {created:?}"
        );
        let seen = created.header.expect("header").revision;
        assert!(
            seen >= revision,
            "{key}: the watch was created at revision {seen}, before the put's {revision}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    // No watcher gets the put it was created after.
    let late = tokio::time::timeout(Duration::from_millis(500), inbound.message()).await;
    assert!(late.is_err(), "an event after the puts: {late:?}");
}
