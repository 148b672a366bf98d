//! Crash soak: every acknowledged write survives SIGKILL, cycle after
//! cycle. Writers put unique keys concurrently; a member is killed
//! mid-load, restarted on the same data dir, and then every acknowledged
//! put must be there with its value, and every key that is there must be
//! one a writer attempted, with the value it sent (a write whose
//! acknowledgement was lost in the crash may or may not be there).
//!
//! - [`single_member_survives_sigkill_cycles`]: one member, killed and
//!   restarted.
//! - [`three_members_survive_sigkill_of_the_leader_cycles`]: a 3-voter
//!   cluster whose current leader is killed each cycle while clients write
//!   to all three members; a new leader takes over, the old one restarts
//!   and must converge to the same state.
//!
//! `TERN_CRASH_CYCLES` sets the number of kill/restart cycles (default 3,
//! for CI). The long soak:
//!
//! ```sh
//! cargo build --release --workspace
//! TERN_CRASH_CYCLES=200 cargo test --release -p tern-tests --test crash -- --nocapture
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use tern_tests::cluster::Cluster;
use tern_tests::{current_revision, wait_serving, Tern};
use tonic::transport::Channel;

fn cycles() -> usize {
    std::env::var("TERN_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// A kill point that moves around the load from cycle to cycle
/// (deterministic, so a failing cycle can be rerun the same way).
fn kill_after(cycle: usize) -> Duration {
    Duration::from_millis(200 + (cycle as u64 * 7919) % 1300)
}

fn key(prefix: &str, cycle: usize, writer: usize, n: u64) -> String {
    format!("{prefix}/{cycle:04}/{writer:02}/{n:07}")
}

/// Each key is written once, with a value derived from the key, so a value
/// that does not match its key was never written.
fn value_of(key: &str) -> String {
    format!("v:{key}")
}

fn cycle_prefix(prefix: &str, cycle: usize) -> String {
    format!("{prefix}/{cycle:04}/")
}

/// What the writers did: how many puts each writer started in each cycle
/// (key `n` was attempted iff `n < started`), and the keys acknowledged.
#[derive(Default)]
struct Ledger {
    started: HashMap<(usize, usize), u64>,
    acked: BTreeMap<usize, Vec<String>>,
}

impl Ledger {
    fn acked_total(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }

    /// Check what a member holds under one cycle's prefix against what
    /// was written; panics naming the first lost or foreign key.
    fn check(&self, prefix: &str, cycle: usize, stored: &BTreeMap<String, String>, who: &str) {
        for k in self.acked.get(&cycle).into_iter().flatten() {
            assert_eq!(
                stored.get(k).map(String::as_str),
                Some(value_of(k).as_str()),
                "{who}: acknowledged write {k} lost (cycle {cycle})"
            );
        }
        for (k, v) in stored {
            let rest = k
                .strip_prefix(&cycle_prefix(prefix, cycle))
                .unwrap_or_else(|| panic!("{who}: key {k} outside cycle {cycle}"));
            let (w, n) = rest
                .split_once('/')
                .and_then(|(w, n)| Some((w.parse::<usize>().ok()?, n.parse::<u64>().ok()?)))
                .unwrap_or_else(|| panic!("{who}: key {k} was never written"));
            let started = self.started.get(&(cycle, w)).copied().unwrap_or(0);
            assert!(n < started, "{who}: key {k} was never written");
            assert_eq!(v, &value_of(k), "{who}: {k} holds a value never written");
        }
    }
}

fn lazy_channel(endpoint: &str) -> Channel {
    Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint uri")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// Put unique keys until `stop`; with `stop_on_error`, also at the first
/// failure (a single member's writers have nowhere else to go).
async fn writer(
    endpoint: String,
    prefix: &'static str,
    cycle: usize,
    w: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    stop_on_error: bool,
) {
    let mut kv = KvClient::new(lazy_channel(&endpoint));
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let k = key(prefix, cycle, w, n);
        ledger
            .lock()
            .expect("ledger")
            .started
            .insert((cycle, w), n + 1);
        let put = kv.put(PutRequest {
            key: k.clone().into_bytes(),
            value: value_of(&k).into_bytes(),
            ..Default::default()
        });
        match tokio::time::timeout(Duration::from_secs(10), put).await {
            Ok(Ok(_)) => ledger
                .lock()
                .expect("ledger")
                .acked
                .entry(cycle)
                .or_default()
                .push(k),
            _ if stop_on_error => return,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Every key under `prefix` a member holds, with its value.
async fn stored(endpoint: &str, prefix: &str, serializable: bool) -> BTreeMap<String, String> {
    let mut kv = KvClient::new(lazy_channel(endpoint)).max_decoding_message_size(256 << 20);
    let mut range_end = prefix.as_bytes().to_vec();
    *range_end.last_mut().expect("non-empty prefix") += 1;
    let mut last_error = None;
    for _ in 0..50 {
        let range = kv.range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: range_end.clone(),
            serializable,
            ..Default::default()
        });
        match range.await {
            Ok(resp) => {
                return resp
                    .into_inner()
                    .kvs
                    .into_iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                        )
                    })
                    .collect()
            }
            // Just restarted or just elected: give it a moment.
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("range {prefix} on {endpoint}: {last_error:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn single_member_survives_sigkill_cycles() {
    const PREFIX: &str = "crash";
    const WRITERS: usize = 32;
    let cycles = cycles();
    let started = Instant::now();
    let mut tern = Tern::start(&[]);
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                tokio::spawn(writer(
                    tern.endpoint.clone(),
                    PREFIX,
                    cycle,
                    w,
                    ledger.clone(),
                    stop.clone(),
                    true,
                ))
            })
            .collect();
        tokio::time::sleep(kill_after(cycle)).await;
        tern.kill9();
        for w in writers {
            w.await.expect("writer task");
        }
        tokio::task::block_in_place(|| tern.restart());
        // This cycle's writes, and the previous cycle's, which have now
        // been through a second crash.
        for c in cycle.saturating_sub(1)..=cycle {
            let held = stored(&tern.endpoint, &cycle_prefix(PREFIX, c), false).await;
            ledger
                .lock()
                .expect("ledger")
                .check(PREFIX, c, &held, "restarted member");
        }
        let ledger = ledger.lock().expect("ledger");
        let this = ledger.acked.get(&cycle).map_or(0, Vec::len);
        assert!(this > 0, "cycle {cycle}: no write was acknowledged");
        eprintln!(
            "single member: cycle {}/{cycles}: {this} acknowledged, {} in all, 0 lost",
            cycle + 1,
            ledger.acked_total()
        );
    }
    for c in 0..cycles {
        let held = stored(&tern.endpoint, &cycle_prefix(PREFIX, c), false).await;
        ledger
            .lock()
            .expect("ledger")
            .check(PREFIX, c, &held, "member at the end");
    }
    let ledger = ledger.lock().expect("ledger");
    eprintln!(
        "single member crash soak: {cycles} SIGKILL cycles, {} acknowledged writes, 0 lost, \
         no foreign value ({:.0?})",
        ledger.acked_total(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_survive_sigkill_of_the_leader_cycles() {
    const PREFIX: &str = "soak";
    const WRITERS_PER_MEMBER: usize = 4;
    let cycles = cycles();
    let started = Instant::now();
    let mut c = Cluster::start(3, &[]);
    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    for cycle in 0..cycles {
        let leader = c.leader();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3 * WRITERS_PER_MEMBER)
            .map(|w| {
                tokio::spawn(writer(
                    c.nodes[w % 3].client.clone(),
                    PREFIX,
                    cycle,
                    w,
                    ledger.clone(),
                    stop.clone(),
                    false,
                ))
            })
            .collect();
        tokio::time::sleep(kill_after(cycle)).await;
        c.nodes[leader].kill9();
        // Writes go on through the election and under the new leader.
        let new_leader = tokio::task::block_in_place(|| c.leader());
        assert_ne!(new_leader, leader, "a killed member cannot lead");
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| {
            c.nodes[leader].restart();
            wait_serving(&c.nodes[leader].client);
        });
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer task");
        }
        let rev = tokio::task::block_in_place(|| {
            let rev = current_revision(&c.nodes[new_leader].client);
            c.converged_hash(&[0, 1, 2], rev, Duration::from_secs(60));
            rev
        });
        for cc in cycle.saturating_sub(1)..=cycle {
            let prefix = cycle_prefix(PREFIX, cc);
            let held = stored(&c.nodes[new_leader].client, &prefix, false).await;
            ledger
                .lock()
                .expect("ledger")
                .check(PREFIX, cc, &held, "new leader");
            let held = stored(&c.nodes[leader].client, &prefix, true).await;
            let ledger = ledger.lock().expect("ledger");
            ledger.check(PREFIX, cc, &held, "restarted old leader");
        }
        let ledger = ledger.lock().expect("ledger");
        let this = ledger.acked.get(&cycle).map_or(0, Vec::len);
        assert!(this > 0, "cycle {cycle}: no write was acknowledged");
        eprintln!(
            "3 members: cycle {}/{cycles}: killed leader m{leader}, m{new_leader} took over, \
             {this} acknowledged, {} in all, 0 lost, converged at revision {rev}",
            cycle + 1,
            ledger.acked_total()
        );
    }
    for (i, n) in c.nodes.iter().enumerate() {
        for cc in 0..cycles {
            let held = stored(&n.client, &cycle_prefix(PREFIX, cc), true).await;
            let ledger = ledger.lock().expect("ledger");
            ledger.check(PREFIX, cc, &held, &format!("m{i} at the end"));
        }
    }
    let ledger = ledger.lock().expect("ledger");
    eprintln!(
        "3-member crash soak: {cycles} SIGKILL-the-leader cycles, {} acknowledged writes, \
         0 lost, no foreign value, all members converged ({:.0?})",
        ledger.acked_total(),
        started.elapsed()
    );
}
