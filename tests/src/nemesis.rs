//! A nemesis: faults injected into a running [`Cluster`] on a random
//! schedule while clients work, as Jepsen does.
//!
//! One fault at a time, each healed before the next, with a quiet second or
//! two between them so the cluster can make progress (a majority of voters
//! is always up, or back within seconds):
//!
//! * [`Fault::KillLeader`]: SIGKILL the current leader, leave it down for
//!   1–3 s, restart it on the same data dir and flags;
//! * [`Fault::PauseMember`]: SIGSTOP a voter (the leader or not) for 2–4 s,
//!   then SIGCONT; its sockets stay open, so peers and clients hang rather
//!   than fail;
//! * [`Fault::PartitionMember`] / [`Fault::PartitionLeader`]: blackhole a
//!   follower's (the leader's) peer proxy for 2–5 s, then heal;
//! * [`Fault::LearnerLatency`]: change the learner link's one-way latency
//!   and jitter (it keeps the new setting until the next time), and one
//!   time in three also cut the learner off for 2–3 s.
//!
//! Every action is logged with a timestamp from the run's [`Clock`], both
//! to stderr as it happens and into the [`NemesisReport`], so a failing
//! test shows what was done when, next to the history's own times.
//!
//! The nemesis runs on its own thread (the [`Node`](crate::cluster::Node)
//! controls block) and owns the cluster until [`Nemesis::finish`] hands it
//! back, healed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{maintenance_client::MaintenanceClient, StatusRequest};

use crate::cluster::Cluster;
use crate::history::{lazy_channel, Clock};
use crate::proxy::Direction;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillLeader,
    PauseMember,
    PartitionMember,
    PartitionLeader,
    LearnerLatency,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::KillLeader,
        Fault::PauseMember,
        Fault::PartitionMember,
        Fault::PartitionLeader,
        Fault::LearnerLatency,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::PauseMember => "pause",
            Fault::PartitionMember => "partition-follower",
            Fault::PartitionLeader => "partition-leader",
            Fault::LearnerLatency => "learner-link",
        }
    }
}

/// What to do: which faults, for how long, and on which members.
#[derive(Clone, Debug)]
pub struct Plan {
    pub faults: Vec<Fault>,
    /// No new fault starts after this; the one under way is healed.
    pub duration: Duration,
    pub seed: u64,
    /// Indexes in `cluster.nodes` of the voters and of the learner.
    pub voters: Vec<usize>,
    pub learner: Option<usize>,
}

/// What the nemesis did.
#[derive(Clone, Debug, Default)]
pub struct NemesisReport {
    /// `+12.345s what` lines, in order.
    pub log: Vec<String>,
    pub injected: BTreeMap<&'static str, usize>,
}

impl NemesisReport {
    pub fn total(&self) -> usize {
        self.injected.values().sum()
    }
}

impl fmt::Display for NemesisReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self
            .injected
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(
            f,
            "faults injected: {} ({})",
            self.total(),
            kinds.join(", ")
        )?;
        for line in &self.log {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// A nemesis at work on a cluster.
pub struct Nemesis {
    handle: JoinHandle<(Cluster, NemesisReport)>,
    stop: Arc<AtomicBool>,
}

impl Nemesis {
    /// Start injecting faults into `cluster` (which the nemesis owns until
    /// [`finish`](Nemesis::finish)).
    pub fn start(cluster: Cluster, plan: Plan, clock: Clock) -> Nemesis {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || Run::new(cluster, plan, clock, stop).go())
        };
        Nemesis { handle, stop }
    }

    /// Stop starting faults, heal the one under way and everything else,
    /// and hand the cluster back.
    pub fn finish(self) -> (Cluster, NemesisReport) {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(done) => done,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

struct Run {
    cluster: Cluster,
    plan: Plan,
    clock: Clock,
    stop: Arc<AtomicBool>,
    rng: Rng,
    report: NemesisReport,
    rt: tokio::runtime::Runtime,
}

impl Run {
    fn new(cluster: Cluster, plan: Plan, clock: Clock, stop: Arc<AtomicBool>) -> Run {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("nemesis runtime");
        Run {
            cluster,
            rng: Rng::new(plan.seed),
            plan,
            clock,
            stop,
            report: NemesisReport::default(),
            rt,
        }
    }

    fn go(mut self) -> (Cluster, NemesisReport) {
        self.log(format!(
            "nemesis: seed {}, {:?}, faults {:?}",
            self.plan.seed,
            self.plan.duration,
            self.plan
                .faults
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
        ));
        let deadline = Instant::now() + self.plan.duration;
        let mut order: Vec<Fault> = Vec::new();
        // Let the clients get going before the first fault.
        let warm_up = self.rng.millis(500, 1500);
        self.sleep(warm_up);
        while Instant::now() < deadline && !self.stop.load(Ordering::Relaxed) {
            if order.is_empty() {
                // Every kind once per round, in a random order.
                order = self.plan.faults.clone();
                self.rng.shuffle(&mut order);
            }
            let fault = order.pop().expect("a fault");
            if self.inject(fault) {
                *self.report.injected.entry(fault.name()).or_default() += 1;
            }
            let quiet = self.rng.millis(1000, 2000);
            self.sleep(quiet);
        }
        self.heal_all();
        (self.cluster, self.report)
    }

    fn log(&mut self, what: String) {
        let line = format!("{} {what}", self.clock.stamp());
        eprintln!("[nemesis] {line}");
        self.report.log.push(line);
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn name(&self, i: usize) -> String {
        self.cluster.nodes[i].name.clone()
    }

    /// Inject one fault and heal it; whether it was injected.
    fn inject(&mut self, fault: Fault) -> bool {
        match fault {
            Fault::KillLeader => {
                let Some(l) = self.leader() else {
                    self.log("kill-leader: no leader found, skipped".into());
                    return false;
                };
                let name = self.name(l);
                self.log(format!("kill -9 {name} (leader)"));
                self.cluster.nodes[l].kill9();
                let down = self.rng.millis(1000, 3000);
                self.sleep(down);
                self.cluster.nodes[l].restart();
                self.log(format!("restarted {name} on its data dir"));
            }
            Fault::PauseMember => {
                let leader = self.leader();
                let i = *self.rng.pick(&self.plan.voters);
                let role = if Some(i) == leader {
                    "leader"
                } else {
                    "follower"
                };
                let name = self.name(i);
                self.log(format!("SIGSTOP {name} ({role})"));
                self.cluster.nodes[i].pause(true);
                let held = self.rng.millis(2000, 4000);
                self.sleep(held);
                self.cluster.nodes[i].pause(false);
                self.log(format!("SIGCONT {name}"));
            }
            Fault::PartitionMember | Fault::PartitionLeader => {
                let Some(leader) = self.leader() else {
                    self.log(format!("{}: no leader found, skipped", fault.name()));
                    return false;
                };
                let (i, role) = if fault == Fault::PartitionLeader {
                    (leader, "leader")
                } else {
                    let followers: Vec<usize> = self
                        .plan
                        .voters
                        .iter()
                        .copied()
                        .filter(|&v| v != leader)
                        .collect();
                    (*self.rng.pick(&followers), "follower")
                };
                let name = self.name(i);
                self.log(format!("partition {name} ({role}) from every peer"));
                self.cluster.nodes[i].proxy.blackhole(true);
                let held = self.rng.millis(2000, 5000);
                self.sleep(held);
                self.cluster.nodes[i].proxy.blackhole(false);
                self.log(format!("healed {name}"));
            }
            Fault::LearnerLatency => {
                let Some(l) = self.plan.learner else {
                    return false;
                };
                let name = self.name(l);
                let one_way = self.rng.millis(25, 150);
                let jitter = self.rng.millis(0, 20);
                for d in [Direction::Upstream, Direction::Downstream] {
                    self.cluster.nodes[l].proxy.set_delay(d, one_way, jitter);
                }
                self.log(format!(
                    "learner {name} link: {:?} round trip, {jitter:?} jitter each way",
                    one_way * 2
                ));
                if self.rng.below(3) == 0 {
                    self.log(format!("partition learner {name}"));
                    self.cluster.nodes[l].proxy.blackhole(true);
                    let held = self.rng.millis(2000, 3000);
                    self.sleep(held);
                    self.cluster.nodes[l].proxy.blackhole(false);
                    self.log(format!("healed learner {name}"));
                }
            }
        }
        true
    }

    /// Undo anything left: every member running and connected, no latency.
    fn heal_all(&mut self) {
        for i in 0..self.cluster.nodes.len() {
            let node = &mut self.cluster.nodes[i];
            node.pause(false);
            node.proxy.blackhole(false);
            for d in [Direction::Upstream, Direction::Downstream] {
                node.proxy.set_delay(d, Duration::ZERO, Duration::ZERO);
            }
            if !node.is_running() {
                node.restart();
            }
        }
        self.log("nemesis done: everything healed".into());
    }

    /// The voter that leads now, asked over gRPC with short timeouts
    /// (etcdctl's would hang on a paused member); `None` after 10 s.
    fn leader(&self) -> Option<usize> {
        let members: Vec<(usize, String)> = self
            .plan
            .voters
            .iter()
            .filter(|&&i| self.cluster.nodes[i].is_running())
            .map(|&i| (i, self.cluster.nodes[i].client.clone()))
            .collect();
        self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                for (i, endpoint) in &members {
                    let mut m = MaintenanceClient::new(lazy_channel(endpoint));
                    let status =
                        tokio::time::timeout(Duration::from_secs(1), m.status(StatusRequest {}))
                            .await;
                    if let Ok(Ok(s)) = status {
                        let s = s.into_inner();
                        let me = s.header.map(|h| h.member_id).unwrap_or(0);
                        if s.leader != 0 && s.leader == me {
                            return Some(*i);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None
        })
    }
}
