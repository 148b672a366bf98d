//! Replication with real processes: 3-voter clusters, the etcdctl
//! membership workflow, a learner behind a slow and then broken link,
//! SIGKILL of the leader under load, a partitioned leader, and disaster
//! takeover from a learner (at restart, and of a running learner that keeps
//! the other learners).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use tern_tests::cluster::{hashkv, Cluster};
use tern_tests::proxy::Direction;
use tern_tests::{bulk_write, channel, current_revision, etcdctl, etcdctl_for, http_post, metric};

const LEARNER_ERROR: &str = "etcdserver: rpc not supported for learner";

fn value(endpoint: &str, key: &str, serializable: bool) -> String {
    let mut args = vec!["get", key, "--print-value-only"];
    if serializable {
        args.push("--consistency=s");
    }
    etcdctl(endpoint, &args, None).stdout.trim_end().to_string()
}

/// Poll until `f` holds (or panic after `within`).
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("not within {within:?}: {what}");
}

fn small_value(n: usize) -> Vec<u8> {
    format!("value-{n}").into_bytes()
}

fn count_prefix(endpoint: &str, prefix: &str, serializable: bool) -> i64 {
    let mut args = vec!["get", "--prefix", prefix, "--limit=1", "-w", "json"];
    if serializable {
        args.push("--consistency=s");
    }
    let out = etcdctl(endpoint, &args, None);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["count"].as_i64().unwrap_or(0)
}

#[test]
fn three_voters_replicate_and_forward_writes() {
    let c = Cluster::start(3, &[]);
    let leader = c.leader();
    // Exactly one leader, and every member agrees which.
    let leader_id = c.member_id(leader);
    for i in 0..3 {
        let s = c.status(i).expect("status");
        assert_eq!(s["leader"].as_u64(), Some(leader_id), "member {i}");
    }
    // Writes through every member (followers forward), reads through every
    // member (linearizable: a ReadIndex round through the leader).
    for (i, n) in c.nodes.iter().enumerate() {
        let out = n.etcdctl(&["put", &format!("k{i}"), &format!("from-{}", n.name)]);
        assert_eq!(out.stdout, "OK\n", "{}", out.stderr);
    }
    for n in &c.nodes {
        for (i, writer) in c.nodes.iter().enumerate() {
            assert_eq!(
                value(&n.client, &format!("k{i}"), false),
                format!("from-{}", writer.name)
            );
        }
    }
    let rev = current_revision(&c.nodes[leader].client);
    c.converged_hash(&[0, 1, 2], rev, Duration::from_secs(10));
    // etcdctl move-leader hands leadership to a follower.
    let target = (leader + 1) % 3;
    let target_id = format!("{:x}", c.member_id(target));
    let moved = etcdctl(&c.endpoints(), &["move-leader", &target_id], None);
    assert!(
        moved.stdout.contains(&format!("to {target_id}")),
        "{moved:?}"
    );
    assert_eq!(c.leader(), target);
    let bad = etcdctl(&c.endpoints(), &["move-leader", "1234"], None);
    assert_eq!(bad.error_line(), "Error: etcdserver: bad leader transferee");
    // `endpoint status --cluster` reaches every member through the client
    // URLs in the member list, and all name the same leader.
    let all = etcdctl(
        &c.nodes[0].client,
        &["endpoint", "status", "--cluster", "-w", "json"],
        None,
    );
    assert_eq!(all.code, 0, "{all:?}");
    let all: serde_json::Value = serde_json::from_str(&all.stdout).expect("json");
    let all = all.as_array().expect("array");
    assert_eq!(all.len(), 3, "{all:?}");
    let leaders: std::collections::BTreeSet<u64> = all
        .iter()
        .map(|e| e["Status"]["leader"].as_u64().unwrap())
        .collect();
    assert_eq!(leaders.len(), 1, "{all:?}");
    // The member list has every member's client URL (each published its own).
    let list = etcdctl(&c.endpoints(), &["member", "list"], None).stdout;
    for n in &c.nodes {
        assert!(list.contains(&format!("http://{}", n.client)), "{list}");
        assert!(list.contains(&format!(", {}, ", n.name)), "{list}");
    }
}

#[test]
fn five_voters_tolerate_two_failures_and_restart_from_disk() {
    let mut c = Cluster::start(5, &[]);
    let leader = c.leader();
    let down = [leader, (leader + 1) % 5];
    for &i in &down {
        c.nodes[i].kill9();
    }
    let up = (0..5).find(|i| !down.contains(i)).unwrap();
    eventually("three of five commit", Duration::from_secs(20), || {
        etcdctl(&c.nodes[up].client, &["put", "quorum", "3of5"], None).code == 0
    });
    for &i in &down {
        c.nodes[i].restart();
    }
    for &i in &down {
        eventually(
            "a restarted member catches up",
            Duration::from_secs(20),
            || value(&c.nodes[i].client, "quorum", true) == "3of5",
        );
    }
    let rev = current_revision(&c.nodes[up].client);
    c.converged_hash(&[0, 1, 2, 3, 4], rev, Duration::from_secs(20));
    // SIGTERM stops a member promptly although its peers keep their
    // streams to it open.
    assert!(
        c.nodes[up].terminate(Duration::from_secs(8)),
        "SIGTERM did not stop the member"
    );
}

#[test]
fn leases_hold_across_a_leader_change() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.leader();
    let follower = (leader + 1) % 3;
    let out = c.nodes[follower].etcdctl(&["lease", "grant", "6"]);
    let id = out
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert_eq!(
        c.nodes[follower]
            .etcdctl(&["put", "--lease", &id, "leased", "v"])
            .code,
        0
    );
    // A keep-alive and a time-to-live on a follower go to the leader.
    let ka = c.nodes[follower].etcdctl(&["lease", "keep-alive", "--once", &id]);
    assert!(ka.stdout.contains("TTL(6)"), "{ka:?}");
    let ttl = c.nodes[follower].etcdctl(&["lease", "timetolive", &id]);
    assert!(ttl.stdout.contains("granted with TTL(6s)"), "{ttl:?}");
    c.nodes[leader].kill9();
    let new_leader = c.leader();
    assert_ne!(new_leader, leader);
    // The new leader gave the lease a full TTL again; it is still there.
    let ttl = c.nodes[new_leader].etcdctl(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.stdout.contains("attached keys([leased])"), "{ttl:?}");
    // Without keep-alives it expires, on every member, through the log.
    let survivor = (0..3).find(|&i| i != leader).unwrap();
    eventually("the lease expires", Duration::from_secs(20), || {
        value(&c.nodes[survivor].client, "leased", false).is_empty()
    });
    c.nodes[leader].restart();
    eventually(
        "the restarted member applies the expiry",
        Duration::from_secs(20),
        || {
            etcdctl(&c.nodes[leader].client, &["get", "leased"], None)
                .stdout
                .is_empty()
        },
    );
}

#[test]
fn etcdctl_membership_workflow() {
    let mut c = Cluster::start(3, &[]);
    for i in 0..20 {
        c.nodes[0].etcdctl(&["put", &format!("w{i}"), "v"]);
    }
    let l = c.add_member(true, &[]);
    let learner = c.nodes[l].client.clone();
    eventually(
        "the learner serves the data",
        Duration::from_secs(20),
        || value(&learner, "w19", true) == "v",
    );
    // Beyond etcd: a watch on the learner's own state (history and live).
    let live = {
        let learner = learner.clone();
        std::thread::spawn(move || {
            etcdctl_for(
                &learner,
                &["watch", "--rev", "1", "w1"],
                Duration::from_secs(3),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    c.nodes[0].etcdctl(&["put", "w1", "live"]);
    let watched = live.join().expect("watch thread");
    assert_eq!(watched.stdout, "PUT\nw1\nv\nPUT\nw1\nlive\n", "{watched:?}");
    // Writes are refused with etcd's learner error; a linearizable read
    // (beyond etcd 3.4) sees the voter's latest write at once.
    let put = etcdctl(&learner, &["put", "x", "y"], None);
    assert_ne!(put.code, 0);
    assert!(put.error_line().contains(LEARNER_ERROR), "{put:?}");
    let txn = etcdctl(&learner, &["txn"], Some("\nput x y\n\n\n"));
    assert!(txn.error_line().contains(LEARNER_ERROR), "{txn:?}");
    c.nodes[0].etcdctl(&["put", "w1", "newest"]);
    let lin = etcdctl(&learner, &["get", "w1", "--print-value-only"], None);
    assert_eq!((lin.code, lin.stdout.as_str()), (0, "newest\n"), "{lin:?}");
    let read_txn = etcdctl(&learner, &["txn"], Some("\nget w1\n\n\n"));
    assert_eq!(read_txn.stdout, "SUCCESS\n\nw1\nnewest\n", "{read_txn:?}");
    let status = c.status(l).expect("status on a learner");
    assert_eq!(status["isLearner"].as_bool(), Some(true), "{status}");
    // Asked of a voter: etcdctl spreads requests over all its endpoints,
    // and the learner (like etcd's) refuses these with the learner error.
    let list = c.nodes[0].etcdctl(&["member", "list"]).stdout;
    assert!(list.contains(", true\n"), "a learner is listed: {list}");
    // Promote: the learner is in sync, so etcd's check lets it through.
    let id = format!("{:x}", c.member_id(l));
    let promoted = c.nodes[0].etcdctl(&["member", "promote", &id]);
    assert!(promoted.stdout.contains("promoted"), "{promoted:?}");
    eventually(
        "the promoted member takes writes",
        Duration::from_secs(10),
        || etcdctl(&learner, &["put", "after", "promote"], None).code == 0,
    );
    assert_eq!(value(&c.nodes[0].client, "after", false), "promote");
    // Remove the leader (the hard case): it hands over and stops, the rest
    // carry on as a 3-member cluster.
    let gone = c.leader();
    let rest: Vec<usize> = (0..c.nodes.len()).filter(|&i| i != gone).collect();
    let (a, b) = (
        c.nodes[rest[0]].client.clone(),
        c.nodes[rest[1]].client.clone(),
    );
    let gone_id = format!("{:x}", c.member_id(gone));
    let removed = etcdctl(&a, &["member", "remove", &gone_id], None);
    assert!(removed.stdout.contains("removed"), "{removed:?}");
    let list = etcdctl(&a, &["member", "list"], None).stdout;
    assert!(!list.contains(&gone_id), "{list}");
    assert_eq!(list.lines().count(), 3, "{list}");
    // A client retries through a leader change; the handover makes it short.
    let started = Instant::now();
    eventually("the rest take writes", Duration::from_secs(10), || {
        etcdctl(
            &b,
            &["--command-timeout=3s", "put", "after", "remove"],
            None,
        )
        .code
            == 0
    });
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    eventually("the removed member stops", Duration::from_secs(5), || {
        etcdctl(
            &c.nodes[gone].client,
            &["--command-timeout=1s", "endpoint", "health"],
            None,
        )
        .code
            != 0
    });
    // Errors etcd gives for impossible changes.
    let again = etcdctl(&a, &["member", "remove", &gone_id], None);
    assert!(again.error_line().contains("member not found"), "{again:?}");
    let voter = format!("{:x}", c.member_id(rest[0]));
    let not_learner = etcdctl(&a, &["member", "promote", &voter], None);
    assert!(
        not_learner
            .error_line()
            .contains("can only promote a learner member"),
        "{not_learner:?}"
    );
}

/// The cross-region scenario: a learner behind a 100 ms round trip
/// converges; cut off for 60 s while 100k keys are written it cannot be
/// promoted, the voters keep committing, and once the link is back it
/// catches up by snapshot to the same HashKV at the same revision.
#[tokio::test(flavor = "multi_thread")]
async fn learner_behind_a_slow_link_catches_up_by_snapshot() {
    // 100k keys go in 1000 txns: a small snapshot count makes the leader
    // compact its log past what the learner has.
    let mut c = Cluster::start(3, &["--snapshot-count", "200"]);
    let l = c.add_member(true, &[]);
    // A cross-region link: 100 ms round trip, 8 MB/s towards the learner.
    c.nodes[l].proxy.set_rtt(Duration::from_millis(100));
    c.nodes[l]
        .proxy
        .set_bandwidth(Direction::Upstream, Some(8 * 1024 * 1024));
    let learner = c.nodes[l].client.clone();
    let leader = c.leader();
    let writer = c.nodes[leader].client.clone();
    bulk_write(&writer, "before/", 2000, 4, small_value).await;
    let rev = current_revision(&writer);
    c.converged_hash(&[0, 1, 2, l], rev, Duration::from_secs(30));

    c.nodes[l].proxy.blackhole(true);
    let cut_at = Instant::now();
    bulk_write(&writer, "during/", 100_000, 8, small_value).await;
    assert_eq!(count_prefix(&writer, "during/", false), 100_000);
    let learner_id = {
        let list = etcdctl(&writer, &["member", "list", "-w", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&list.stdout).expect("json");
        let m = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|m| m["isLearner"].as_bool() == Some(true))
            .expect("a learner")
            .clone();
        format!("{:x}", m["ID"].as_u64().expect("id"))
    };
    let refused = etcdctl(&writer, &["member", "promote", &learner_id], None);
    assert!(
        refused
            .error_line()
            .contains("can only promote a learner member which is in sync with leader"),
        "{refused:?}"
    );
    // The learner still answers from what it has, and reports its lag.
    assert_eq!(count_prefix(&learner, "during/", true), 0);
    let remaining = Duration::from_secs(60).saturating_sub(cut_at.elapsed());
    tokio::time::sleep(remaining).await;
    // Cut off, it knows how long it has not been in step with a leader.
    let lag = metric(&learner, "tern_replication_lag_seconds").unwrap_or(0.0);
    assert!(lag >= 30.0, "lag while cut off: {lag}");

    c.nodes[l].proxy.blackhole(false);
    let rev = current_revision(&writer);
    c.converged_hash(&[leader, l], rev, Duration::from_secs(120));
    assert_eq!(count_prefix(&learner, "during/", true), 100_000);
    let snapshots = metric(&learner, "tern_raft_snapshots_applied_total").unwrap_or(0.0);
    assert!(
        snapshots >= 2.0,
        "caught up by snapshot (joining took one): {snapshots}"
    );
    eventually(
        "the learner reports no lag",
        Duration::from_secs(10),
        || {
            metric(&learner, "tern_replication_lag_entries") == Some(0.0)
                && metric(&learner, "tern_replication_lag_seconds") == Some(0.0)
        },
    );
    let promoted = etcdctl(&writer, &["member", "promote", &learner_id], None);
    assert!(promoted.stdout.contains("promoted"), "{promoted:?}");
}

/// SIGKILL the leader while clients write through every member: every
/// write that was acknowledged is there afterwards, on every member.
#[tokio::test(flavor = "multi_thread")]
async fn leader_killed_under_load_loses_no_acknowledged_write() {
    leader_fault_under_load(LeaderFault::Kill).await;
}

/// SIGSTOP the leader under load for longer than an election timeout, then
/// let it go on: it steps down, and nothing acknowledged is lost or
/// overwritten by what it held.
#[tokio::test(flavor = "multi_thread")]
async fn leader_paused_under_load_loses_no_acknowledged_write() {
    leader_fault_under_load(LeaderFault::Pause).await;
}

enum LeaderFault {
    Kill,
    Pause,
}

async fn leader_fault_under_load(fault: LeaderFault) {
    let mut c = Cluster::start(3, &[]);
    let leader = c.leader();
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..12 {
        let endpoint = c.nodes[w % 3].client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel(&endpoint).await);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load/{w}/{n}");
                let value = format!("{w}-{n}");
                let put = kv.put(PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                });
                match tokio::time::timeout(Duration::from_secs(10), put).await {
                    Ok(Ok(_)) => {
                        acked.lock().unwrap().insert(key, value);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    match fault {
        LeaderFault::Kill => c.nodes[leader].kill9(),
        LeaderFault::Pause => c.nodes[leader].pause(true),
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    if let LeaderFault::Pause = fault {
        c.nodes[leader].pause(false);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    if !c.nodes[leader].is_running() {
        c.nodes[leader].restart();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "the load ran: {} writes", acked.len());
    let new_leader = c.leader();
    let rev = current_revision(&c.nodes[new_leader].client);
    c.converged_hash(&[0, 1, 2], rev, Duration::from_secs(30));
    for n in &c.nodes {
        let mut kv = KvClient::new(channel(&n.client).await);
        let got = kv
            .range(RangeRequest {
                key: b"load/".to_vec(),
                range_end: b"load0".to_vec(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner();
        let stored: BTreeMap<String, String> = got
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8(kv.key).unwrap(),
                    String::from_utf8(kv.value).unwrap(),
                )
            })
            .collect();
        for (k, v) in &acked {
            assert_eq!(
                stored.get(k),
                Some(v),
                "acknowledged {k} lost on {}",
                n.name
            );
        }
    }
}

/// A leader cut off from the others cannot commit: its client's write is
/// not acknowledged and the majority never sees it as committed while the
/// partition lasts; the majority elects a leader and goes on.
#[test]
fn partitioned_leader_cannot_commit() {
    let c = Cluster::start(3, &[]);
    let old = c.leader();
    c.nodes[old].etcdctl(&["put", "before", "1"]);
    c.nodes[old].proxy.blackhole(true);
    let write = etcdctl(
        &c.nodes[old].client,
        &["--command-timeout=4s", "put", "minority", "x"],
        None,
    );
    assert_ne!(
        write.code, 0,
        "the isolated leader acknowledged a write: {write:?}"
    );
    // The majority elects one of its own and commits.
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    eventually(
        "the majority elects a leader",
        Duration::from_secs(20),
        || {
            let s = c.status(others[0]);
            let leader = s.as_ref().and_then(|s| s["leader"].as_u64()).unwrap_or(0);
            leader != 0 && leader != c.member_id(old)
        },
    );
    let majority = etcdctl(&c.nodes[others[0]].client, &["put", "majority", "y"], None);
    assert_eq!(majority.code, 0, "{majority:?}");
    // The cut-off member never applies what the majority committed.
    assert_eq!(value(&c.nodes[old].client, "majority", true), "");
    let status = c.status(old).expect("status");
    assert!(
        status["errors"].to_string().contains("no leader")
            || status["leader"].as_u64() == Some(c.member_id(old)),
        "{status}"
    );
    // Healed, it follows the new leader and has everything.
    c.nodes[old].proxy.blackhole(false);
    eventually("the old leader catches up", Duration::from_secs(20), || {
        value(&c.nodes[old].client, "majority", true) == "y"
    });
    let rev = current_revision(&c.nodes[others[0]].client);
    c.converged_hash(&[0, 1, 2], rev, Duration::from_secs(20));
}

/// The primary region is lost: the learner's data dir becomes a new
/// single-voter cluster with every revision it had applied.
#[test]
fn disaster_takeover_from_a_learner() {
    let mut c = Cluster::start(3, &[]);
    let l = c.add_member(true, &[]);
    for i in 0..50 {
        c.nodes[0].etcdctl(&["put", &format!("dr{i:02}"), &format!("v{i}")]);
    }
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&[0, 1, 2, l], rev, Duration::from_secs(20));
    let before = etcdctl(
        &c.nodes[l].client,
        &["get", "--prefix", "dr", "--consistency=s"],
        None,
    );
    for i in 0..3 {
        c.nodes[i].kill9();
    }
    // With no voter left, a linearizable read on the learner times out
    // with etcd's error; a serializable one is still served.
    let lin = etcdctl(
        &c.nodes[l].client,
        &["get", "dr00", "--command-timeout=15s"],
        None,
    );
    // etcdctl retries etcd's (Unavailable) timeout until its own deadline.
    assert_ne!(lin.code, 0);
    assert!(
        lin.stderr.contains("desc = etcdserver: request timed out"),
        "{lin:?}"
    );
    let ser = etcdctl(
        &c.nodes[l].client,
        &["get", "dr00", "--consistency=s"],
        None,
    );
    assert_eq!(ser.code, 0, "{ser:?}");
    c.nodes[l].restart_as("tern-primary", &["--force-new-cluster"]);
    let learner = c.nodes[l].client.clone();
    eventually("the new cluster serves", Duration::from_secs(20), || {
        etcdctl(&learner, &["endpoint", "health"], None).code == 0
    });
    let after = etcdctl(&learner, &["get", "--prefix", "dr"], None);
    assert_eq!(after.stdout, before.stdout);
    assert_eq!(hashkv(&learner, rev), hashkv(&learner, rev));
    assert_eq!(current_revision(&learner), rev);
    let list = etcdctl(&learner, &["member", "list"], None).stdout;
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.contains(", false\n"), "now a voter: {list}");
    assert_eq!(
        etcdctl(&learner, &["put", "after", "takeover"], None).code,
        0
    );
    assert_eq!(current_revision(&learner), rev + 1);
}

/// The primary region is lost with three regions attached: one command on
/// a running learner (`POST /takeover`) makes it the only voter, and the
/// other two learners go on following it without being re-added; a new
/// voter joins it with `member add`.
#[test]
fn takeover_keeps_the_other_learners() {
    let mut c = Cluster::start(3, &[]);
    let learners: Vec<usize> = [20, 100, 60]
        .into_iter()
        .map(|rtt| {
            let l = c.add_member(true, &[]);
            c.nodes[l].proxy.set_rtt(Duration::from_millis(rtt));
            l
        })
        .collect();
    for i in 0..30 {
        let put = c.nodes[i % 3].etcdctl(&["put", &format!("dr/{i:02}"), "before"]);
        assert_eq!(put.code, 0, "{put:?}");
    }
    let rev = current_revision(&c.nodes[0].client);
    let mut all = vec![0, 1, 2];
    all.extend(&learners);
    c.converged_hash(&all, rev, Duration::from_secs(30));
    let chosen = learners[0];
    let endpoint = c.nodes[chosen].client.clone();
    // While the voters live, a takeover is refused: two clusters would
    // take different writes.
    let (code, body) = http_post(&endpoint, "/takeover");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("the cluster is alive"), "{body}");
    // Every learner's revision and last contact, in one place.
    for &l in &learners {
        let contact = metric(
            &c.nodes[l].client,
            "tern_raft_leader_last_contact_timestamp_seconds",
        );
        assert!(contact.is_some_and(|t| t > 1e9), "{contact:?}");
        assert_eq!(current_revision(&c.nodes[l].client), rev);
    }
    let voter_ids: Vec<u64> = (0..3).map(|i| c.member_id(i)).collect();
    let learner_ids: Vec<u64> = learners.iter().map(|&l| c.member_id(l)).collect();
    for i in 0..3 {
        c.nodes[i].kill9();
    }
    // Once no leader has been heard from for an election timeout.
    let started = Instant::now();
    let mut answer = (0, String::new());
    while started.elapsed() < Duration::from_secs(10) {
        answer = http_post(&endpoint, "/takeover");
        if answer.0 != 409 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = answer;
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("a JSON report");
    assert_eq!(report["revision"].as_i64(), Some(rev), "{body}");
    let hex = |ids: &[u64]| -> Vec<String> { ids.iter().map(|id| format!("{id:x}")).collect() };
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let reported = |field: &str| sorted(serde_json::from_value(report[field].clone()).unwrap());
    assert_eq!(reported("removed"), sorted(hex(&voter_ids)), "{body}");
    assert_eq!(
        reported("kept_learners"),
        sorted(hex(&learner_ids[1..])),
        "{body}"
    );
    // Writable on the same process, and the writes reach the other two.
    let commanded = Instant::now();
    eventually(
        "the taken-over learner takes writes",
        Duration::from_secs(10),
        || etcdctl(&endpoint, &["put", "dr/after", "takeover"], None).code == 0,
    );
    let rto = commanded.elapsed();
    assert!(
        rto < Duration::from_secs(5),
        "writable {rto:?} after the takeover"
    );
    for i in 0..20 {
        let put = etcdctl(&endpoint, &["put", &format!("dr/new{i:02}"), "after"], None);
        assert_eq!(put.code, 0, "{put:?}");
    }
    let rev = current_revision(&endpoint);
    c.converged_hash(&learners, rev, Duration::from_secs(30));
    let new_leader = learner_ids[0];
    for &l in &learners[1..] {
        assert_eq!(value(&c.nodes[l].client, "dr/after", true), "takeover");
        let status = c.status(l).expect("status");
        assert_eq!(status["leader"].as_u64(), Some(new_leader), "{status}");
        assert_eq!(status["isLearner"].as_bool(), Some(true), "{status}");
    }
    // A kept learner restarted from its own data dir follows the new
    // cluster too: its stored membership is the new one.
    let last = learners[2];
    c.nodes[last].restart();
    let put = etcdctl(&endpoint, &["put", "dr/restarted", "x"], None);
    assert_eq!(put.code, 0, "{put:?}");
    let rev = current_revision(&endpoint);
    c.converged_hash(&learners, rev, Duration::from_secs(30));
    // A new voter joins the new cluster the usual way (asked of the new
    // leader: the learners refuse membership changes).
    let voter = c.add_member_through(&endpoint, false, &[]);
    let mut members = learners.clone();
    members.push(voter);
    eventually("the two voters commit", Duration::from_secs(30), || {
        etcdctl(&endpoint, &["put", "dr/last", "x"], None).code == 0
    });
    let rev = current_revision(&endpoint);
    c.converged_hash(&members, rev, Duration::from_secs(30));
    let list = etcdctl(&endpoint, &["member", "list"], None).stdout;
    assert_eq!(list.matches(", false\n").count(), 2, "two voters: {list}");
}

/// Linearizable reads on a follower while its leader is paused: their read
/// index requests go to the paused leader (or reach the new leader before
/// it has committed in its term) and are dropped without an answer. They
/// must be asked again and answered once a new leader serves, not wait out
/// the request timeout.
#[tokio::test(flavor = "multi_thread")]
async fn follower_reads_are_answered_after_the_leader_is_paused() {
    let c = Cluster::start(3, &[]);
    let leader = c.leader();
    let follower = (leader + 1) % 3;
    let out = c.nodes[follower].etcdctl(&["put", "k", "v"]);
    assert_eq!(out.code, 0, "{out:?}");
    let endpoint = c.nodes[follower].client.clone();
    let mut kv = KvClient::new(channel(&endpoint).await);
    c.nodes[leader].pause(true);
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let mut kv = kv.clone();
            tokio::spawn(async move {
                kv.range(RangeRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().kvs[0].value.clone())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for read in reads {
        answers.push(read.await.unwrap());
    }
    c.nodes[leader].pause(false);
    // A read never asked again would end in the request timeout (7 s),
    // long after a new leader took over.
    for answer in answers {
        assert_eq!(answer.expect("a linearizable read on the follower"), b"v");
    }
    // And the follower still answers linearizable reads afterwards.
    let again = kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .expect("a read after the leader came back");
    assert_eq!(again.into_inner().kvs[0].value, b"v");
}

/// Three learners at once (`--max-learners`, 3 by default) behind links
/// of 20, 100 and 250 ms round trip, the farthest capped at 1 MB/s toward
/// it, all converge on the voters' HashKV; a fourth is refused with etcd's
/// error. Each learner added after the leader's latest Raft snapshot needs
/// a new one that names it (raft-rs ignores one that does not). Then the
/// 100 ms learner is cut off for 60 s under a steady write load: the
/// voters' put latency and the 20 ms learner's lag stay what they were,
/// and the cut-off learner catches up once the link heals.
#[test]
fn three_learners_at_different_distances_converge() {
    let mut c = Cluster::start(3, &[]);
    let mut members = vec![0, 1, 2];
    for (rtt, cap) in [(20, None), (100, None), (250, Some(1_000_000))] {
        let l = c.add_member(true, &[]);
        c.nodes[l].proxy.set_rtt(Duration::from_millis(rtt));
        c.nodes[l].proxy.set_bandwidth(Direction::Upstream, cap);
        members.push(l);
    }
    for i in 0..40 {
        let put = c.nodes[i % 3].etcdctl(&["put", &format!("region/{i:02}"), &"x".repeat(2048)]);
        assert_eq!(put.code, 0, "{put:?}");
    }
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&members, rev, Duration::from_secs(60));
    let list = c.nodes[0].etcdctl(&["member", "list"]);
    assert_eq!(list.stdout.matches(", true\n").count(), 3, "{list:?}");
    let fourth = c.nodes[0].etcdctl(&[
        "member",
        "add",
        "fourth",
        "--learner",
        "--peer-urls=http://127.0.0.1:1",
    ]);
    assert_eq!(
        fourth.error_line(),
        "Error: etcdserver: too many learner members in cluster",
        "{fourth:?}"
    );

    let leader = c.leader();
    let (near, cut) = (&c.nodes[members[3]], &c.nodes[members[4]]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before = runtime.block_on(load(
        &c.nodes[leader].client,
        &near.client,
        Duration::from_secs(10),
    ));
    cut.proxy.blackhole(true);
    let during = runtime.block_on(load(
        &c.nodes[leader].client,
        &near.client,
        Duration::from_secs(60),
    ));
    cut.proxy.blackhole(false);
    // Beyond noise: a voter waiting on the cut-off learner would stall for
    // whole seconds (its window, then its retries), not milliseconds.
    let (put_before, put_during) = (before.puts.p99(), during.puts.p99());
    assert!(
        put_during <= put_before * 2 + Duration::from_millis(50),
        "voters' put p99 {put_before:?} before the cut, {put_during:?} during it"
    );
    let (p50_before, p50_during) = (before.puts.p50(), during.puts.p50());
    assert!(
        p50_during <= p50_before * 2 + Duration::from_millis(10),
        "voters' put p50 {p50_before:?} before the cut, {p50_during:?} during it"
    );
    let (lag_before, lag_during) = (before.lag.p99(), during.lag.p99());
    assert!(
        lag_during <= lag_before * 2 + Duration::from_millis(100),
        "the 20 ms learner's lag p99 {lag_before:?} before the cut, {lag_during:?} during it"
    );
    let rev = current_revision(&c.nodes[leader].client);
    c.converged_hash(&members, rev, Duration::from_secs(60));
}

/// A learner behind a slow link receives a Raft snapshot that takes
/// longer to cross it than a peer connection's keep-alive allows a ping to
/// go unanswered (6 MiB at 256 KiB/s: ~24 s, against 5 s + 10 s): the
/// pings would wait behind the snapshot's queued data. The snapshot's own
/// connection has no pings, so it arrives whole, the first time, instead
/// of being cut and sent again forever.
#[test]
fn a_snapshot_slower_than_a_keepalive_reaches_a_capped_learner() {
    let mut c = Cluster::start(1, &["--snapshot-count", "20"]);
    let value = "s".repeat(64 * 1024);
    for i in 0..96 {
        let put = c.nodes[0].etcdctl(&["put", &format!("big/{i:03}"), &value]);
        assert_eq!(put.code, 0, "{put:?}");
    }
    let rev = current_revision(&c.nodes[0].client);
    let l = c.add_member(true, &[]);
    c.nodes[l]
        .proxy
        .set_bandwidth(Direction::Upstream, Some(256 * 1024));
    c.converged_hash(&[0, l], rev, Duration::from_secs(90));
}

/// `--learner-bandwidth-limit`: the leader feeds a learner no faster than
/// its budget, while its own commits do not wait for it.
#[test]
fn a_learner_is_fed_within_its_bandwidth_budget() {
    const BUDGET: u64 = 256 * 1024;
    let mut c = Cluster::start(1, &["--learner-bandwidth-limit", "262144"]);
    let l = c.add_member(true, &[]);
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&[0, l], rev, Duration::from_secs(30));
    let before = c.nodes[l].proxy.bytes(Direction::Upstream);
    // 1.5 MiB of writes, acknowledged at the voter's own pace.
    let started = Instant::now();
    let value = "v".repeat(64 * 1024);
    for i in 0..24 {
        let put = c.nodes[0].etcdctl(&["put", &format!("budget/{i:02}"), &value]);
        assert_eq!(put.code, 0, "{put:?}");
    }
    let written = started.elapsed();
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&[0, l], rev, Duration::from_secs(60));
    let caught_up = started.elapsed();
    let sent = c.nodes[l].proxy.bytes(Direction::Upstream) - before;
    assert!(sent >= 24 * 64 * 1024, "{sent} bytes reached the learner");
    // Paid for at the budget's rate, less the pacer's 100 ms of credit.
    let floor = Duration::from_secs_f64(sent as f64 / BUDGET as f64) - Duration::from_millis(300);
    assert!(
        caught_up >= floor,
        "{sent} bytes in {caught_up:?}: faster than {BUDGET} B/s"
    );
    assert!(
        written < floor,
        "the voter's puts took {written:?}: they waited for the learner"
    );
}

/// Latencies, sorted on demand.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn quantile(&self, q: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort_unstable();
        assert!(!v.is_empty(), "no samples");
        v[((v.len() - 1) as f64 * q) as usize]
    }
    fn p50(&self) -> Duration {
        self.quantile(0.5)
    }
    fn p99(&self) -> Duration {
        self.quantile(0.99)
    }
}

struct Load {
    /// Each put's latency on the leader.
    puts: Samples,
    /// From a put's acknowledgement to the learner serving its revision.
    lag: Samples,
}

/// Puts of 1 KiB from 4 clients on `leader` for `how_long`, and every
/// 50th put, the time until `learner` serves its revision.
async fn load(leader: &str, learner: &str, how_long: Duration) -> Load {
    let writer = KvClient::new(channel(leader).await);
    let reader = KvClient::new(channel(learner).await);
    let until = Instant::now() + how_long;
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let (mut writer, mut reader) = (writer.clone(), reader.clone());
            tokio::spawn(async move {
                let (mut puts, mut lag) = (Vec::new(), Vec::new());
                let mut n = 0u64;
                while Instant::now() < until {
                    let started = Instant::now();
                    let put = writer
                        .put(PutRequest {
                            key: format!("load/{t}/{}", n % 100).into_bytes(),
                            value: vec![b'v'; 1024],
                            ..Default::default()
                        })
                        .await
                        .expect("a put on the leader");
                    let acked = Instant::now();
                    puts.push(acked - started);
                    n += 1;
                    if t == 0 && n.is_multiple_of(50) {
                        let rev = put.into_inner().header.map_or(0, |h| h.revision);
                        loop {
                            let seen = reader
                                .range(RangeRequest {
                                    key: b"load/".to_vec(),
                                    serializable: true,
                                    limit: 1,
                                    ..Default::default()
                                })
                                .await
                                .expect("a read on the learner")
                                .into_inner()
                                .header
                                .map_or(0, |h| h.revision);
                            if seen >= rev {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        lag.push(acked.elapsed());
                    }
                }
                (puts, lag)
            })
        })
        .collect();
    let mut load = Load {
        puts: Samples::default(),
        lag: Samples::default(),
    };
    for task in tasks {
        let (puts, lag) = task.await.expect("load task");
        load.puts.0.extend(puts);
        load.lag.0.extend(lag);
    }
    load
}
