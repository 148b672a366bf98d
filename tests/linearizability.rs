//! Proof under faults: clients run random gets, puts and compare-and-sets
//! against 3 voters and a learner while a nemesis kills the leader,
//! pauses and partitions members and slows the learner's link; the
//! linearizability checker must accept the whole history, and watchers
//! that reconnect across the faults must see the store's history exactly.
//! Linearizable reads go to the learner as well as the voters. The last
//! tests show the checker catches a stale read when a client asks a
//! cut-off member, a follower or the learner, for serializable reads.
//!
//! Runs are short for CI (20 s of faults each). For a long run:
//! `TERN_NEMESIS_SECS=600 cargo test -p tern-tests --test linearizability`;
//! `TERN_NEMESIS_SEED=<n>` replays a run's choices (printed at the start).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
use tern_tests::cluster::Cluster;
use tern_tests::history::{lazy_channel, Client, Clock, Reads, Recorder, Workload};
use tern_tests::linearizability::{check, Input, Operation, Outcome, Output};
use tern_tests::nemesis::{Fault, Nemesis, Plan};
use tern_tests::rng::Rng;
use tern_tests::watcher::{self, WatchLog};
use tokio::sync::Mutex;

const PREFIX: &str = "lin/";

/// The two long scenarios each run 4 member processes plus clients; on a
/// 2-core machine they would starve each other's timers, so they take
/// turns.
static HEAVY: Mutex<()> = Mutex::const_new(());

/// Members compact their logs every 100 entries, so a member that was
/// down or cut off usually catches up by snapshot (and watchers on it
/// replay history from the snapshot's state).
const SNAPSHOTS: &[&str] = &["--snapshot-count", "100"];

fn fault_duration() -> Duration {
    let secs = std::env::var("TERN_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// 3 voters (`nodes[0..3]`) and a learner (`nodes[3]`), all serving.
async fn cluster_with_learner(flags: &'static [&'static str]) -> Cluster {
    let cluster = tokio::task::spawn_blocking(move || {
        let mut c = Cluster::start(3, flags);
        c.add_member(true, &[]);
        c
    })
    .await
    .expect("cluster");
    let mut kv = KvClient::new(lazy_channel(&cluster.nodes[3].client));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let serving = kv
            .range(RangeRequest {
                key: b"x".to_vec(),
                serializable: true,
                ..Default::default()
            })
            .await
            .is_ok();
        if serving {
            return cluster;
        }
        assert!(Instant::now() < deadline, "the learner did not serve");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn members(c: &Cluster, which: &[usize]) -> Vec<(String, String)> {
    which
        .iter()
        .map(|&i| (c.nodes[i].name.clone(), c.nodes[i].client.clone()))
        .collect()
}

/// The figures a scenario prints, for the README.
struct Figures {
    operations: usize,
    faults: usize,
    violations: usize,
}

/// Run the workload on the voters, with watchers on every member, under
/// `faults`; check linearizability, the watchers, and that every member
/// converged.
async fn scenario(name: &str, faults: Vec<Fault>, flags: &'static [&'static str]) -> Figures {
    let seed = Rng::seed_from_env("TERN_NEMESIS_SEED");
    let duration = fault_duration();
    let cluster = cluster_with_learner(flags).await;
    let voters = members(&cluster, &[0, 1, 2]);
    let everyone = members(&cluster, &[0, 1, 2, 3]);
    let learner = members(&cluster, &[3]);
    let clock = Clock::start();
    eprintln!("{name}: seed {seed} (TERN_NEMESIS_SEED), {duration:?} of faults");

    // One watcher starts on each voter and moves among the voters (so the
    // leader kills keep finding them); one stays on the learner unless its
    // stream breaks.
    let mut watchers: Vec<_> = (0..voters.len())
        .map(|i| watcher::follow(&format!("watcher-{i}"), voters.clone(), i, PREFIX, clock))
        .collect();
    watchers.push(watcher::follow(
        "watcher-learner",
        everyone.clone(),
        3,
        PREFIX,
        clock,
    ));
    let recorder = Recorder::new(clock);
    let plan = Plan {
        faults,
        duration,
        seed,
        voters: vec![0, 1, 2],
        learner: Some(3),
    };
    let nemesis = Nemesis::start(cluster, plan, clock);
    let workload = Workload {
        prefix: PREFIX.to_string(),
        members: voters.clone(),
        clients: 10,
        // Linearizable reads on the learner too: a read index from the
        // leader, answered once the learner has applied up to it.
        readers: learner.clone(),
        reader_clients: 2,
        keys: 3,
        ops_per_key: 150,
        reads: Reads::Linearizable,
        timeout: Duration::from_secs(3),
    };
    workload.run(recorder.clone(), seed, duration).await;
    let (cluster, nemesis_report) = tokio::task::spawn_blocking(move || nemesis.finish())
        .await
        .expect("nemesis");
    // Healed, the cluster must serve again: 2 s more of the workload, which
    // also ends the history on a healthy cluster.
    let before_heal = recorder.operations().len();
    let after = Workload {
        clients: 3,
        ..workload.clone()
    };
    after
        .run(recorder.clone(), seed + 1, Duration::from_secs(2))
        .await;

    let history = recorder.operations();
    let ok_after_heal = history[before_heal..]
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
        .count();
    let report = check(&history);
    eprintln!("{name}: {report}");
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for op in history.iter().filter(|o| !o.error.is_empty()) {
        let kind = if matches!(op.outcome, Outcome::Failed) {
            "failed"
        } else {
            "unknown"
        };
        let message: String = op.error.chars().take(90).collect();
        *errors.entry(format!("{kind}: {message}")).or_default() += 1;
    }
    for (e, n) in &errors {
        eprintln!("{name}: {n:>5} x {e}");
    }
    eprintln!("{name}: {nemesis_report}");
    let context = format!("{report}\n{nemesis_report}");
    assert!(report.is_linearizable(), "{context}");
    assert!(
        nemesis_report.total() >= 3,
        "too few faults injected: {context}"
    );
    let acknowledged_writes = history
        .iter()
        .filter(|o| o.input != Input::Get && matches!(o.outcome, Outcome::Ok(_)))
        .count();
    assert!(
        acknowledged_writes >= 100,
        "the workload barely ran: {context}"
    );
    assert!(
        ok_after_heal > 0,
        "nothing succeeded after healing: {context}"
    );
    let on_learner = format!("@{}", learner[0].0);
    let learner_reads = history
        .iter()
        .filter(|o| o.client.ends_with(&on_learner) && o.input == Input::Get)
        .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
        .count();
    assert!(
        learner_reads >= 20,
        "only {learner_reads} linearizable reads answered on the learner: {context}"
    );
    eprintln!("{name}: {learner_reads} linearizable reads answered on the learner");

    // The store's history of the prefix, as a voter has it, and what every
    // watcher saw of it.
    let (voter, upto) = final_revision(&cluster).await;
    let endpoint = &cluster.nodes[voter].client;
    let reference = watcher::history(endpoint, PREFIX, upto, clock).await;
    assert!(reference.problems.is_empty(), "{:?}", reference.problems);
    check_history_against_ranges(endpoint, &reference.events).await;
    let mut logs: Vec<WatchLog> = Vec::new();
    for w in watchers {
        logs.push(w.finish(upto, Duration::from_secs(30)).await);
    }
    for log in &logs {
        for line in &log.log {
            eprintln!("[watch] {line}");
        }
    }
    for log in &logs {
        if let Err(e) = watcher::compare(&reference.events, log) {
            panic!("{e}\n{nemesis_report}");
        }
    }
    check_writes_against_store(&history, &reference.events);
    let reconnects: usize = logs.iter().map(|l| l.reconnects).sum();
    eprintln!(
        "{name}: {} watchers each saw all {} events of the store's history exactly once, \
         in order, across {reconnects} reconnects",
        logs.len(),
        reference.events.len()
    );

    // Every member, the learner too, ends with the same state.
    tokio::task::spawn_blocking(move || {
        cluster.converged_hash(&[0, 1, 2, 3], upto, Duration::from_secs(60));
    })
    .await
    .expect("converged");
    Figures {
        operations: report.operations,
        faults: nemesis_report.total(),
        violations: report.violations.len(),
    }
}

/// A voter that answers, and the revision of the prefix's last event:
/// the workload only puts, so that is the highest mod revision of its
/// keys (a linearizable Range).
async fn final_revision(cluster: &Cluster) -> (usize, i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, node) in cluster.nodes.iter().enumerate().take(3) {
            if let Ok(kvs) = range_prefix(&node.client, 0).await {
                let last = kvs.values().map(|(_, rev)| *rev).max().unwrap_or(0);
                return (i, last);
            }
        }
        assert!(Instant::now() < deadline, "no member answers after healing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The prefix's keys at `revision` (0: now): value and mod revision.
async fn range_prefix(
    endpoint: &str,
    revision: i64,
) -> Result<BTreeMap<String, (Vec<u8>, i64)>, tonic::Status> {
    let mut kv = KvClient::new(lazy_channel(endpoint));
    let request = RangeRequest {
        key: PREFIX.as_bytes().to_vec(),
        range_end: b"lin0".to_vec(),
        revision,
        ..Default::default()
    };
    let resp = tokio::time::timeout(Duration::from_secs(3), kv.range(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("range"))??
        .into_inner();
    Ok(resp
        .kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                (kv.value, kv.mod_revision),
            )
        })
        .collect())
}

/// The watch-made history agrees with Range: replaying its events up to a
/// revision gives what a Range at that revision returns (at 20 revisions
/// spread over the run, and the last).
async fn check_history_against_ranges(endpoint: &str, events: &[watcher::Event]) {
    assert!(
        events.windows(2).all(|w| w[0].revision < w[1].revision),
        "the store's history is not in strict revision order"
    );
    let Some(last) = events.last().map(|e| e.revision) else {
        return;
    };
    let mut at: Vec<i64> = (1..=20).map(|k| last * k / 20).collect();
    at.retain(|&r| r > 0);
    at.dedup();
    let mut replayed: BTreeMap<String, (Vec<u8>, i64)> = BTreeMap::new();
    let mut next = events.iter().peekable();
    for rev in at {
        while let Some(e) = next.next_if(|e| e.revision <= rev) {
            if e.deleted {
                replayed.remove(&e.key);
            } else {
                replayed.insert(e.key.clone(), (e.value.clone(), e.revision));
            }
        }
        let ranged = range_prefix(endpoint, rev)
            .await
            .expect("range at revision");
        assert_eq!(
            ranged, replayed,
            "Range at revision {rev} differs from the history"
        );
    }
}

/// Every acknowledged write is in the store's history exactly once, no
/// write that failed is, and an unknown one at most once.
fn check_writes_against_store(history: &[Operation], events: &[watcher::Event]) {
    let mut stored: HashMap<(String, Vec<u8>), usize> = HashMap::new();
    for e in events {
        *stored.entry((e.key.clone(), e.value.clone())).or_default() += 1;
    }
    let mut unknown_applied = 0;
    for op in history {
        let v = match op.input {
            Input::Put(v) | Input::Cas { new: v, .. } => v,
            Input::Get => continue,
        };
        let times = stored
            .get(&(op.key.clone(), v.to_string().into_bytes()))
            .copied()
            .unwrap_or(0);
        match op.outcome {
            Outcome::Ok(Output::Written | Output::Swapped(true)) => {
                assert_eq!(times, 1, "acknowledged write {op:?} stored {times} times")
            }
            Outcome::Ok(_) | Outcome::Failed => {
                assert_eq!(times, 0, "write {op:?} that did not happen is stored")
            }
            Outcome::Unknown => {
                assert!(times <= 1, "unknown write {op:?} stored {times} times");
                unknown_applied += times;
            }
        }
    }
    eprintln!("writes: every acknowledged one stored once; {unknown_applied} of unknown outcome were applied");
}

/// 3 voters and a learner under every kind of fault, linearizable reads on
/// the voters.
#[tokio::test(flavor = "multi_thread")]
async fn voters_stay_linearizable_under_mixed_faults() {
    let _turn = HEAVY.lock().await;
    let f = scenario("mixed faults", Fault::ALL.to_vec(), SNAPSHOTS).await;
    eprintln!(
        "FIGURES mixed faults: {} operations checked, {} faults injected, {} violations",
        f.operations, f.faults, f.violations
    );
}

/// Watchers on every member, the learner too, across repeated SIGKILLs of
/// the leader (each restarted on its data dir).
#[tokio::test(flavor = "multi_thread")]
async fn watchers_see_every_event_once_across_leader_kills() {
    let _turn = HEAVY.lock().await;
    let f = scenario("leader kills", vec![Fault::KillLeader], SNAPSHOTS).await;
    eprintln!(
        "FIGURES leader kills: {} operations checked, {} faults injected, {} violations",
        f.operations, f.faults, f.violations
    );
}

/// A lone voter answers a linearizable read from its applied index, with
/// no read index from its Raft thread (`NodeStatus::sole_leader`). Under
/// gets, puts and compare-and-sets it is killed with SIGKILL and restarted
/// (reads arrive while it replays its log and before it has a commit of
/// its new term), then a second voter joins (reads take the Raft read
/// index again from the turn that applies it): the history must stay
/// linearizable.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_voter_stays_linearizable_across_a_restart_and_a_new_voter() {
    let _turn = HEAVY.lock().await;
    let seed = Rng::seed_from_env("TERN_NEMESIS_SEED");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(1, SNAPSHOTS))
        .await
        .expect("cluster");
    let member = members(&cluster, &[0]);
    let clock = Clock::start();
    let recorder = Recorder::new(clock);
    let workload = Workload {
        prefix: PREFIX.to_string(),
        members: member.clone(),
        clients: 6,
        readers: member,
        reader_clients: 4,
        keys: 3,
        ops_per_key: 150,
        reads: Reads::Linearizable,
        timeout: Duration::from_secs(3),
    };
    let run = {
        let (workload, recorder) = (workload.clone(), recorder.clone());
        tokio::spawn(async move { workload.run(recorder, seed, Duration::from_secs(10)).await })
    };
    let faults = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        std::thread::sleep(Duration::from_secs(3));
        cluster.nodes[0].kill9();
        cluster.nodes[0].restart();
        std::thread::sleep(Duration::from_secs(3));
        cluster.add_member(false, &[]);
        cluster
    });
    run.await.expect("workload");
    let _cluster = faults.await.expect("faults");
    let history = recorder.operations();
    let report = check(&history);
    eprintln!("lone voter: {report}");
    assert!(report.is_linearizable(), "{report}");
    let ok = |get: bool| {
        history
            .iter()
            .filter(|o| (o.input == Input::Get) == get && matches!(o.outcome, Outcome::Ok(_)))
            .count()
    };
    assert!(
        ok(true) >= 100,
        "only {} reads answered: {report}",
        ok(true)
    );
    assert!(
        ok(false) >= 100,
        "only {} writes acknowledged: {report}",
        ok(false)
    );
}

/// The checker can fail: a follower cut off from its peers still answers
/// serializable reads from its own state, so after a write through the
/// leader it returns the value before. The history shows a read that
/// began after the write was acknowledged and returned the old value, and
/// the checker must reject it, with that counterexample. A linearizable
/// read on the same member cannot answer at all while it is cut off.
#[tokio::test(flavor = "multi_thread")]
async fn serializable_reads_on_a_partitioned_member_are_caught() {
    let (cluster, leader) = tokio::task::spawn_blocking(|| {
        let c = Cluster::start(3, &[]);
        let leader = c.leader();
        (c, leader)
    })
    .await
    .expect("cluster");
    let follower = (leader + 1) % 3;
    stale_read_is_caught(cluster, leader, follower).await;
}

/// The same on a learner: its serializable reads are local and go stale
/// when it is cut off; its linearizable reads cannot answer.
#[tokio::test(flavor = "multi_thread")]
async fn serializable_reads_on_a_partitioned_learner_are_caught() {
    let cluster = cluster_with_learner(&[]).await;
    let (cluster, leader) = tokio::task::spawn_blocking(move || {
        let leader = cluster.leader();
        (cluster, leader)
    })
    .await
    .expect("leader");
    stale_read_is_caught(cluster, leader, 3).await;
}

/// With `reader` cut off, a write on `leader` commits; a serializable read
/// on `reader` returns the value before it and the checker rejects it.
async fn stale_read_is_caught(cluster: Cluster, leader: usize, follower: usize) {
    let recorder = Recorder::new(Clock::start());
    let client = |name: &str, i: usize, reads, timeout| {
        let name = format!("{name}@{}", cluster.nodes[i].name);
        Client::new(
            &name,
            &cluster.nodes[i].client,
            reads,
            timeout,
            recorder.clone(),
        )
    };
    let second = Duration::from_secs(1);
    let mut writer = client("writer", leader, Reads::Linearizable, 5 * second);
    let mut serializable = client("serializable", follower, Reads::Serializable, 5 * second);
    let mut linearizable = client("linearizable", follower, Reads::Linearizable, 2 * second);
    let key = "stale/k";

    let (v1, put) = writer.put(key).await;
    assert!(matches!(put, Outcome::Ok(_)), "{put:?}");
    // Wait for the follower to apply it, off the record: a follower may
    // apply a write a moment after the leader acknowledged it, and a
    // serializable read in that moment is stale too (but not the point
    // here).
    let mut probe = Client::new(
        "probe",
        &cluster.nodes[follower].client,
        Reads::Serializable,
        5 * second,
        Recorder::new(Clock::start()),
    );
    let deadline = Instant::now() + 10 * second;
    while probe.get(key).await != Outcome::Ok(Output::Read(Some(v1))) {
        assert!(Instant::now() < deadline, "the follower never applied {v1}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.nodes[follower].proxy.blackhole(true);
    let (v2, put) = writer.put(key).await;
    assert!(
        matches!(put, Outcome::Ok(_)),
        "the majority commits: {put:?}"
    );
    let stale = serializable.get(key).await;
    assert_eq!(stale, Outcome::Ok(Output::Read(Some(v1))), "stale read");
    let refused = linearizable.get(key).await;
    assert!(!matches!(refused, Outcome::Ok(_)), "{refused:?}");
    cluster.nodes[follower].proxy.blackhole(false);

    let report = check(&recorder.operations());
    eprintln!("{report}");
    assert_eq!(report.violations.len(), 1, "{report}");
    let v = &report.violations[0];
    assert!(v.stuck_at.client.starts_with("serializable@"), "{report}");
    let shape: Vec<(Input, Outcome)> = v
        .counterexample
        .iter()
        .map(|o| (o.input, o.outcome))
        .collect();
    assert_eq!(
        shape,
        vec![
            (Input::Put(v1), Outcome::Ok(Output::Written)),
            (Input::Put(v2), Outcome::Ok(Output::Written)),
            (Input::Get, Outcome::Ok(Output::Read(Some(v1)))),
        ],
        "{report}"
    );
}
