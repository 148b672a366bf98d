//! etcd's Lock and Election services, through a third-party client
//! library's own calls (the `etcd-client` crate, which speaks
//! `v3lockpb.Lock` and `v3electionpb.Election`), against a real etcd 3.4
//! and Tern alike: mutual exclusion under 8 contenders, a holder that dies
//! and whose lease expires, an observer that sees every leader, and on
//! Tern a lock that survives the loss of the cluster's leader.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions, ResignOptions};
use tern_tests::cluster::Cluster;
use tern_tests::{Etcd, Tern};

async fn connect(endpoint: &str) -> Client {
    Client::connect([format!("http://{endpoint}")], None)
        .await
        .expect("connect")
}

/// 8 clients, 5 rounds each, increment a counter under one lock: no two
/// are ever inside at once, and no increment is lost.
async fn mutual_exclusion(endpoint: &str) {
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for contender in 0..8 {
        let (endpoint, inside) = (endpoint.to_string(), inside.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&endpoint).await;
            let lease = c.lease_grant(30, None).await.expect("grant").id();
            for _ in 0..5 {
                let held = c
                    .lock("counter-lock", Some(LockOptions::new().with_lease(lease)))
                    .await
                    .expect("lock");
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                let now = c.get("counter", None).await.expect("get");
                let n: u64 = now
                    .kvs()
                    .first()
                    .map_or(0, |kv| kv.value_str().unwrap().parse().unwrap());
                tokio::time::sleep(Duration::from_millis(2)).await;
                c.put("counter", (n + 1).to_string(), None)
                    .await
                    .expect("put");
                inside.fetch_sub(1, Ordering::SeqCst);
                c.unlock(held.key()).await.expect("unlock");
            }
            contender
        }));
    }
    for t in tasks {
        t.await.expect("contender");
    }
    let mut c = connect(endpoint).await;
    let total = c.get("counter", None).await.expect("get");
    assert_eq!(total.kvs()[0].value_str().unwrap(), "40", "{endpoint}");
}

/// A holder that goes away without unlocking (its lease is not kept
/// alive) hands the lock over once its lease expires, not before.
async fn dead_holder_expires(endpoint: &str) {
    let mut dead = connect(endpoint).await;
    let short = dead.lease_grant(2, None).await.expect("grant").id();
    let granted = Instant::now();
    dead.lock("dead-lock", Some(LockOptions::new().with_lease(short)))
        .await
        .expect("first lock");
    drop(dead);
    let mut next = connect(endpoint).await;
    let lease = next.lease_grant(30, None).await.expect("grant").id();
    let held = tokio::time::timeout(
        Duration::from_secs(15),
        next.lock("dead-lock", Some(LockOptions::new().with_lease(lease))),
    )
    .await
    .expect("the lock is handed over once the lease expires")
    .expect("lock");
    assert!(
        granted.elapsed() >= Duration::from_millis(1500),
        "{endpoint}: taken over after {:?}, before the lease expired",
        granted.elapsed()
    );
    assert!(held.key().starts_with(b"dead-lock/"));
}

/// Three candidates win in turn (each resigns after proclaiming a second
/// value); an observer started before them sees every leader and every
/// value, in order.
async fn observer_sees_every_leader(endpoint: &str) {
    let mut watcher = connect(endpoint).await;
    let collector = tokio::spawn(async move {
        // etcd answers the call only with its first leader (grpc-go sends
        // headers with the first message), so the call waits here too.
        let mut observed = watcher.observe("the-election").await.expect("observe");
        let mut values = Vec::new();
        while values.len() < 6 {
            match observed.message().await {
                Ok(Some(r)) => values.push(r.kv().unwrap().value_str().unwrap().to_string()),
                other => panic!("observe ended: {other:?}"),
            }
        }
        values
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut candidates = Vec::new();
    for n in 0..3 {
        let mut c = connect(endpoint).await;
        let lease = c.lease_grant(30, None).await.expect("grant").id();
        candidates.push((c, lease, n));
    }
    // The later candidates campaign while the first leads: they wait.
    let mut waiting = Vec::new();
    let (mut first, first_lease, _) = candidates.remove(0);
    let won = first
        .campaign("the-election", "leader-0", first_lease)
        .await
        .expect("campaign");
    for (mut c, lease, n) in candidates {
        waiting.push(tokio::spawn(async move {
            let won = c
                .campaign("the-election", format!("leader-{n}"), lease)
                .await
                .expect("campaign");
            (c, won.leader().unwrap().clone(), n)
        }));
        // Candidates queue in the order they campaign.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let leader = won.leader().unwrap().clone();
    first
        .proclaim(
            "leader-0-again",
            Some(etcd_client::ProclaimOptions::new().with_leader(leader.clone())),
        )
        .await
        .expect("proclaim");
    first
        .resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .expect("resign");
    for w in waiting {
        let (mut c, leader, n) = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("the next candidate wins")
            .expect("candidate");
        let current = c.leader("the-election").await.expect("leader");
        assert_eq!(
            current.kv().unwrap().value_str().unwrap(),
            format!("leader-{n}")
        );
        c.proclaim(
            format!("leader-{n}-again"),
            Some(etcd_client::ProclaimOptions::new().with_leader(leader.clone())),
        )
        .await
        .expect("proclaim");
        c.resign(Some(ResignOptions::new().with_leader(leader)))
            .await
            .expect("resign");
    }
    let values = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("the observer saw every leader")
        .expect("collector");
    assert_eq!(
        values,
        [
            "leader-0",
            "leader-0-again",
            "leader-1",
            "leader-1-again",
            "leader-2",
            "leader-2-again"
        ],
        "{endpoint}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn locks_exclude_like_etcds() {
    let etcd = Etcd::start();
    let tern = Tern::start(&[]);
    for endpoint in [&etcd.endpoint, &tern.endpoint] {
        mutual_exclusion(endpoint).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_holders_lock_is_released_by_its_lease_like_etcds() {
    let etcd = Etcd::start();
    let tern = Tern::start(&[]);
    for endpoint in [&etcd.endpoint, &tern.endpoint] {
        dead_holder_expires(endpoint).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_observer_sees_every_leader_like_etcds() {
    let etcd = Etcd::start();
    let tern = Tern::start(&[]);
    for endpoint in [&etcd.endpoint, &tern.endpoint] {
        observer_sees_every_leader(endpoint).await;
    }
}

/// On a 3-member Tern cluster: a lock taken through one member holds
/// while the leader is killed, a waiter on another member still waits,
/// and gets the lock once the holder unlocks through a third.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_holds_across_a_leader_kill() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.leader();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (a, b) = (others[0], others[1]);
    let mut holder = connect(&c.nodes[a].client).await;
    let lease = holder.lease_grant(60, None).await.expect("grant").id();
    let held = holder
        .lock("ha-lock", Some(LockOptions::new().with_lease(lease)))
        .await
        .expect("lock");
    let key = held.key().to_vec();
    let waiter_endpoint = c.nodes[b].client.clone();
    let waiter = tokio::spawn(async move {
        let mut w = connect(&waiter_endpoint).await;
        let lease = w.lease_grant(60, None).await.expect("grant").id();
        let started = Instant::now();
        let got = w
            .lock("ha-lock", Some(LockOptions::new().with_lease(lease)))
            .await
            .expect("lock after the holder unlocks");
        (started.elapsed(), got.key().to_vec())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.nodes[leader].kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiter.is_finished(), "the waiter took a held lock");
    let mut unlocker = connect(&c.nodes[a].client).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = unlocker.unlock(key.clone()).await {
        assert!(Instant::now() < deadline, "unlock never went through: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (waited, got) = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter gets the lock")
        .expect("waiter");
    assert!(waited >= Duration::from_secs(3), "waited only {waited:?}");
    assert_ne!(got, key);
}
