//! The cluster section: the same load against a 3-member etcd cluster and a
//! 3-member Tern cluster, one system at a time, every member a process on
//! loopback.
//!
//! - **Put throughput**: [`load::puts`], the single-node put step, from
//!   `--cluster-clients` clients spread evenly over the three members'
//!   client URLs, as clients given every endpoint spread themselves; a
//!   follower passes its puts on to the leader. Both systems get the same
//!   spread.
//! - **Learner lag**: a fresh cluster and a learner added with `etcdctl
//!   member add --learner`, whose advertised peer URL is a [`Proxy`] in
//!   front of its real peer listener that holds everything passing through
//!   it for half of `--learner-rtt` each way. After the learner has caught
//!   up, puts go to the leader at a steady rate, and each one's revision
//!   and the instant it was acknowledged are recorded, while a poller reads
//!   the learner's revision every few milliseconds with a serializable
//!   Range (all a learner serves). A write's lag is the time from its
//!   acknowledgement to the answer of the first poll that saw its revision
//!   on the learner, or zero if the learner had it before the
//!   acknowledgement arrived. The polling period is the resolution.
//!
//! The link is delayed both ways for both systems, whichever side dials:
//! a Tern member sends its Raft messages on connections it dials itself,
//! etcd's rafthttp on streams its peer dialed to it, so each direction of
//! the leader-learner exchange rides a different connection, and the two
//! systems use them oppositely. So in the learner step every voter's
//! advertised peer URL is a proxy too: the voters cross it undelayed
//! ([`Proxy::spare`] recognises their connections), the learner's own
//! connections to a voter are delayed half the RTT each way, as is every
//! connection to the learner's proxy. Every byte between the learner and a
//! voter then waits half the RTT, in both directions, for both systems;
//! the step prints the bytes each proxy carried. The voters' put latency
//! during the step (open loop, to the leader) is reported beside the lag.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tern_primary::proto::etcdserverpb::kv_client::KvClient;
use tern_primary::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tern_primary::proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
use tern_tests::proxy::Direction;
use tern_tests::Proxy;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tonic::transport::{Channel, Endpoint};

use crate::load::{self, Pool, Settings};
use crate::report::{Metric, Unit};
use crate::servers::{free_port, Binaries, Probe, Server, System};
use crate::{plural, progress, push_rate_and_latency};

/// How long a fresh cluster may take to agree on a leader that answers
/// Status (every member already served a linearizable Range by then).
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the learner may take to catch up, before the timed writes and
/// after them.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Puts before the timed ones, so the leader's connections to the learner
/// are up and the learner is replicating, not joining, when timing starts.
const WARM_UP_PUTS: u64 = 100;
/// The learner's member name.
pub const LEARNER_NAME: &str = "learner";
/// Key the poller and the catch-up check read; never written, so every
/// answer is a header and nothing else.
const PROBE_KEY: &[u8] = b"bench-lag-probe";

/// The shape of the cluster section.
#[derive(Debug, Clone)]
pub struct ClusterLoad {
    /// Voting members of every cluster.
    pub voters: usize,
    /// Closed-loop put clients, spread over the voters.
    pub clients: usize,
    /// Connections those clients share; rounded up to a multiple of
    /// `voters` so each voter gets the same share.
    pub connections: usize,
    /// Round trip the learner's proxy adds.
    pub learner_rtt: Duration,
    /// Puts per second to the leader while the lag is measured.
    pub learner_rate: u64,
    /// How long those puts go on.
    pub learner_duration: Duration,
    /// How often the learner's revision is read.
    pub poll_interval: Duration,
}

/// Both cluster steps against `system`; returns their rows, the last one
/// the number of failed requests.
pub async fn bench_system(
    system: System,
    bins: &Binaries,
    load: &ClusterLoad,
    settings: &Settings,
) -> Result<Vec<Metric>> {
    let mut metrics = Vec::new();
    let mut errors = 0;
    {
        eprintln!("[{system}] starting a {}-member cluster", load.voters);
        let mut cluster = Cluster::start(system, bins, load.voters, false).await?;
        errors += put_throughput(&mut cluster, load, settings, &mut metrics).await?;
        // Dropping the cluster kills its members before the next one starts.
    }
    // A fresh cluster, so the learner catches up on a short log rather than
    // on everything the put step wrote.
    eprintln!(
        "[{system}] starting a fresh {}-member cluster for the learner",
        load.voters
    );
    let mut cluster = Cluster::start(system, bins, load.voters, true).await?;
    errors += learner_lag(&mut cluster, bins, load, settings, &mut metrics).await?;
    drop(cluster);
    if system == System::Tern {
        errors += follower_lag(bins, load, settings, &mut metrics).await?;
    }
    metrics.push(Metric::new(
        "request errors (cluster steps)",
        Unit::Count,
        errors as f64,
    ));
    Ok(metrics)
}

/// [`load::puts`] against every voter at once; appends its rows and
/// returns the number of failed puts.
async fn put_throughput(
    cluster: &mut Cluster,
    load: &ClusterLoad,
    settings: &Settings,
    metrics: &mut Vec<Metric>,
) -> Result<u64> {
    let pool = Pool::connect_all(&cluster.voter_urls(), load.connections).await?;
    let what = format!(
        "{} members, put {} {}",
        load.voters,
        load.clients,
        plural(load.clients, "client")
    );
    eprintln!(
        "[{}] {what}: {} connections, {} to each member",
        cluster.system,
        pool.connections(),
        pool.connections() / load.voters
    );
    let r = cluster
        .step(&what, load::puts(&pool, load.clients, settings))
        .await?;
    progress(cluster.system, &what, &r);
    push_rate_and_latency(metrics, &what, &r, &[0.5, 0.99]);
    Ok(r.errors)
}

/// Adds a learner behind the slow link and measures its lag; appends the
/// rows and returns the number of failed requests.
async fn learner_lag(
    cluster: &mut Cluster,
    bins: &Binaries,
    load: &ClusterLoad,
    settings: &Settings,
    metrics: &mut Vec<Metric>,
) -> Result<u64> {
    let system = cluster.system;
    let leader = cluster.leader().await?;
    let leader_url = cluster.members[leader].url().to_string();
    let alone = cluster
        .step(
            "voter puts, no learner",
            voter_latencies(&leader_url, load, settings, 0),
        )
        .await?;
    push_latency_rows(metrics, "no learner", &alone);
    eprintln!(
        "[{system}] adding a learner behind a {:?} round trip",
        load.learner_rtt
    );
    let learner = cluster
        .add_learner(bins, (LEARNER_NAME, load.learner_rtt, None))
        .await?;
    let learner_url = cluster.members[learner].url().to_string();

    let bytes_before = cluster.proxy_bytes();
    let what = format!(
        "learner lag, {:?} RTT, {} puts/s",
        load.learner_rtt, load.learner_rate
    );
    let lag = cluster
        .step(
            &what,
            measure_lag(&leader_url, &learner_url, load, settings),
        )
        .await?;
    let bytes_after = cluster.proxy_bytes();

    eprintln!(
        "[{system}] {what}: {} writes acknowledged in {:.2?} ({:.0}/s), {} learner polls; \
         lag p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        lag.lags.len(),
        lag.write_elapsed,
        lag.lags.len() as f64 / lag.write_elapsed.as_secs_f64().max(1e-9),
        lag.polls,
        millis(percentile(&lag.lags, 0.5)),
        millis(percentile(&lag.lags, 0.99)),
        millis(percentile(&lag.lags, 1.0)),
    );
    // Which connections carried the bytes: a member sends its Raft
    // messages over connections it dials (Tern) or over connections its
    // peer dialed to it (etcd's rafthttp streams); both are delayed.
    eprintln!(
        "[{system}] during that step: {} KiB to the learner's peer listener and {} KiB back; \
         {} KiB to the voters' peer listeners and {} KiB back (the voters' own traffic included)",
        (bytes_after[0] - bytes_before[0]) / 1024,
        (bytes_after[1] - bytes_before[1]) / 1024,
        (bytes_after[2] - bytes_before[2]) / 1024,
        (bytes_after[3] - bytes_before[3]) / 1024,
    );
    eprintln!(
        "[{system}] {what}: the leader's put latency meanwhile p50 {:.3} ms, p99 {:.3} ms",
        millis(percentile(&lag.put_latencies, 0.5)),
        millis(percentile(&lag.put_latencies, 0.99)),
    );
    if lag.errors > 0 {
        eprintln!(
            "[{system}] {what}: {} errors, first: {}",
            lag.errors,
            lag.first_error.as_deref().unwrap_or("?")
        );
    }
    push_percentile_rows(metrics, &what, &lag.lags);
    push_latency_rows(
        metrics,
        &format!("learner at {:?} RTT", load.learner_rtt),
        &lag.put_latencies,
    );
    // Three learners, the last behind a 1 MB/s link: Tern only (etcd 3.4
    // allows one learner).
    let three = format!(
        "3 learners at {:?} RTT, one capped at 1 MB/s",
        load.learner_rtt
    );
    match system {
        System::Etcd => {
            for q in ["p50", "p99"] {
                metrics.push(Metric::none(
                    format!("voter put latency, {three}, {q} (ms)"),
                    Unit::Millis,
                ));
            }
        }
        System::Tern => {
            for (name, cap) in [("learner2", None), ("learner3", Some(1_000_000))] {
                eprintln!("[{system}] adding {name}");
                cluster
                    .add_learner(bins, (name, load.learner_rtt, cap))
                    .await?;
            }
            let latencies = cluster
                .step(
                    "voter puts, 3 learners",
                    voter_latencies(&leader_url, load, settings, 1),
                )
                .await?;
            push_latency_rows(metrics, &three, &latencies);
        }
    }
    if system == System::Etcd {
        // The etcd side of the follower rows (which follow this step's rows
        // in both runs): etcd's own learner is what a Tern follower of an
        // etcd is measured against.
        push_follower_rows(metrics, load, &lag.lags);
    }
    Ok(lag.errors)
}

/// The rows of [`follower_lag`]; in the etcd run, the learner's lag.
fn push_follower_rows(metrics: &mut Vec<Metric>, load: &ClusterLoad, lags: &[Duration]) {
    let what = format!(
        "lag behind a {}-member etcd (etcd: its learner; tern: a follower), {:?} RTT, {} puts/s",
        load.voters, load.learner_rtt, load.learner_rate
    );
    push_percentile_rows(metrics, &what, lags);
}

/// A `tern-learner --etcd-endpoints` follower of a fresh etcd cluster,
/// reaching every member's client URL through a proxy that adds the
/// learner's round trip (half each way, both directions), with the same
/// puts and poller as the learner step; appends its rows and returns the
/// failed requests. Against etcd's own learner on the same kind of
/// cluster and link (the etcd run's learner step).
async fn follower_lag(
    bins: &Binaries,
    load: &ClusterLoad,
    settings: &Settings,
    metrics: &mut Vec<Metric>,
) -> Result<u64> {
    eprintln!(
        "[tern] starting a {}-member etcd for a tern follower behind a {:?} round trip",
        load.voters, load.learner_rtt
    );
    let mut source = Cluster::start(System::Etcd, bins, load.voters, false).await?;
    let leader = source.leader().await?;
    let leader_url = source.members[leader].url().to_string();
    let proxies: Vec<Proxy> = source
        .voter_urls()
        .iter()
        .map(|url| {
            let port: u16 = url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let proxy = Proxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            proxy.set_rtt(load.learner_rtt);
            proxy
        })
        .collect();
    let bin = bins
        .tern_learner
        .as_deref()
        .context("the cluster section needs tern-learner")?;
    let client = loopback_url(free_port()?);
    let peer = loopback_url(free_port()?);
    let endpoints = proxies.iter().map(Proxy::url).collect::<Vec<_>>().join(",");
    let args: Vec<String> = [
        ("--name", "follower"),
        ("--listen-client-urls", &client),
        ("--advertise-client-urls", &client),
        ("--listen-peer-urls", &peer),
        ("--initial-advertise-peer-urls", &peer),
        ("--etcd-endpoints", &endpoints),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
    .collect();
    let follower = Server::spawn(System::Tern, "tern follower".into(), bin, client, &args)?;
    source.members.push(follower);
    let index = source.members.len() - 1;
    source.members[index]
        .wait_ready(Probe::Serializable)
        .await?;
    let follower_url = source.members[index].url().to_string();
    let what = format!("follower lag, {:?} RTT", load.learner_rtt);
    let lag = source
        .step(
            &what,
            measure_lag(&leader_url, &follower_url, load, settings),
        )
        .await?;
    eprintln!(
        "[tern] {what}: {} writes acknowledged, lag p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        lag.lags.len(),
        millis(percentile(&lag.lags, 0.5)),
        millis(percentile(&lag.lags, 0.99)),
        millis(percentile(&lag.lags, 1.0)),
    );
    push_follower_rows(metrics, load, &lag.lags);
    drop(source);
    drop(proxies);
    Ok(lag.errors)
}

/// p50 and p99 rows of the leader's put latency in the situation `what`.
fn push_latency_rows(metrics: &mut Vec<Metric>, what: &str, latencies: &[Duration]) {
    push_percentile_rows(metrics, &format!("voter put latency, {what},"), latencies);
}

/// The rows `<what> p50 (ms)` and `<what> p99 (ms)` of `samples`.
fn push_percentile_rows(metrics: &mut Vec<Metric>, what: &str, samples: &[Duration]) {
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        metrics.push(Metric::new(
            format!("{what} {name} (ms)"),
            Unit::Millis,
            millis(percentile(samples, q)),
        ));
    }
}

/// The leader's put latencies under the lag step's steady load
/// (`--learner-rate` for `--duration`), on keys of their own (`round`
/// picks which); sorted.
async fn voter_latencies(
    leader_url: &str,
    load: &ClusterLoad,
    settings: &Settings,
    round: u64,
) -> Result<Vec<Duration>> {
    let leader = KvClient::new(connect(leader_url).await?);
    let count = ((load.learner_rate as f64) * load.learner_duration.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let first = 1_000_000 * (round + 1);
    let writes = steady_writes(
        leader,
        load.learner_rate,
        first..first + count,
        load::value(settings.value_size),
        settings.request_timeout,
    )
    .await;
    if let Some(error) = writes.first_error {
        bail!("{} of {count} puts failed, first: {error}", writes.errors);
    }
    let mut latencies = writes.latencies;
    latencies.sort_unstable();
    Ok(latencies)
}

impl LagResult {
    /// The lag at `quantile`, in milliseconds.
    pub fn percentile_ms(&self, quantile: f64) -> f64 {
        millis(percentile(&self.lags, quantile))
    }
}

/// Running members of one system. Dropping it kills them all and removes
/// their data.
struct Cluster {
    system: System,
    /// How many of `members` vote (the first ones).
    voters: usize,
    /// The voters, then the learner once added.
    members: Vec<Server>,
    /// In front of the learner's peer listener. Fields drop in order, so
    /// the proxies stop after the members are dead.
    learner_proxies: Vec<Proxy>,
    /// In front of each voter's peer listener, when started behind them.
    voter_proxies: Vec<Proxy>,
    /// `--initial-cluster-token`, also given to the learner.
    token: String,
}

impl Cluster {
    /// Starts `voters` voters as a new cluster and waits until each one
    /// answers a linearizable Range, which needs an elected leader. With
    /// `behind_proxies`, each advertises a proxy in front of its peer
    /// listener (which spares the voters' own connections).
    async fn start(
        system: System,
        bins: &Binaries,
        voters: usize,
        behind_proxies: bool,
    ) -> Result<Cluster> {
        let token = format!("tern-bench-{system}");
        let mut voter_proxies = Vec::new();
        // All ports first: every member's flags list every peer URL.
        let mut planned = Vec::new();
        for i in 0..voters {
            let peer_port = free_port()?;
            let advertised = if behind_proxies {
                let proxy = Proxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, peer_port)));
                let url = proxy.url();
                voter_proxies.push(proxy);
                url
            } else {
                loopback_url(peer_port)
            };
            planned.push((
                format!("m{i}"),
                loopback_url(free_port()?),
                loopback_url(peer_port),
                advertised,
            ));
        }
        let initial_cluster = planned
            .iter()
            .map(|(name, _, _, advertised)| format!("{name}={advertised}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            system,
            voters,
            members: Vec::new(),
            learner_proxies: Vec::new(),
            voter_proxies,
            token,
        };
        // Spawn them all before waiting for any: one member alone cannot
        // elect a leader.
        for (name, client, peer, advertised) in planned {
            let args = MemberFlags {
                name: &name,
                client: &client,
                listen_peer: &peer,
                advertise_peer: &advertised,
                initial_cluster: &initial_cluster,
                state: "new",
                token: &cluster.token,
            }
            .to_args();
            let server = Server::spawn(
                system,
                format!("{system} {name}"),
                bins.path(system),
                client,
                &args,
            )?;
            cluster.members.push(server);
        }
        let pids: Vec<u32> = cluster.members.iter().map(Server::pid).collect();
        for proxy in &cluster.voter_proxies {
            proxy.spare(&pids);
        }
        for member in &mut cluster.members {
            member.wait_ready(Probe::Linearizable).await?;
        }
        Ok(cluster)
    }

    /// The voters' client URLs.
    fn voter_urls(&self) -> Vec<String> {
        self.members[..self.voters]
            .iter()
            .map(|m| m.url().to_string())
            .collect()
    }

    /// Index of the voter that leads: the one whose Status names itself.
    async fn leader(&self) -> Result<usize> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            for (i, member) in self.members[..self.voters].iter().enumerate() {
                let Ok((own_id, leader_id)) = status(member.url()).await else {
                    continue;
                };
                if leader_id != 0 && own_id == leader_id {
                    return Ok(i);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {} member reported itself leader within {LEADER_TIMEOUT:?}",
                    self.system
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `etcdctl member add learner --learner`, then starts the learner
    /// (etcd itself, or `tern-learner`) with the cluster etcdctl printed,
    /// its advertised peer URL a proxy adding `rtt` to every round trip to
    /// its peer listener. Returns its index once it answers a serializable
    /// Range; it may still be catching up.
    async fn add_learner(
        &mut self,
        bins: &Binaries,
        (name, rtt, cap): (&str, Duration, Option<u64>),
    ) -> Result<usize> {
        let system = self.system;
        let etcdctl = bins
            .etcdctl
            .as_deref()
            .context("the cluster section needs etcdctl")?;
        let bin = match system {
            System::Etcd => bins.etcd.as_path(),
            System::Tern => bins
                .tern_learner
                .as_deref()
                .context("the cluster section needs tern-learner")?,
        };
        let client = loopback_url(free_port()?);
        let peer_port = free_port()?;
        let proxy = Proxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, peer_port)));
        // Slow from the start, so the learner's whole life (joining,
        // catching up) is across the slow link.
        proxy.set_rtt(rtt);
        // The learner's own connections to the voters, the same.
        for voter in &self.voter_proxies {
            voter.set_rtt(rtt);
        }
        let advertised_peer = proxy.url();
        if let Some(cap) = cap {
            proxy.set_bandwidth(Direction::Upstream, Some(cap));
        }
        self.learner_proxies.push(proxy);

        let initial_cluster =
            member_add_learner(etcdctl, &self.voter_urls(), name, &advertised_peer)
                .await
                .with_context(|| format!("adding a learner to the {system} cluster"))?;

        let args = MemberFlags {
            name,
            client: &client,
            listen_peer: &loopback_url(peer_port),
            advertise_peer: &advertised_peer,
            initial_cluster: &initial_cluster,
            state: "existing",
            token: &self.token,
        }
        .to_args();
        let server = Server::spawn(system, format!("{system} {name}"), bin, client, &args)?;
        self.members.push(server);
        let index = self.members.len() - 1;
        // A learner behind a capped link receives the log (or a snapshot)
        // at its budget before it serves: give it the catch-up deadline,
        // and the time the state takes to cross the cap twice over (after
        // the put steps at 4 KiB it is hundreds of MB: minutes at 1 MB/s).
        let crossing = match cap {
            Some(cap) => {
                let mut state = 0;
                for voter in &self.members[..self.voters] {
                    state = state.max(voter.state_bytes()?);
                }
                Duration::from_secs_f64(2.0 * state as f64 / cap as f64)
            }
            None => Duration::ZERO,
        };
        self.members[index]
            .wait_ready_within(Probe::Serializable, CATCH_UP_TIMEOUT + crossing)
            .await?;
        Ok(index)
    }

    /// Bytes forwarded so far: to the learner's peer listener, back from
    /// it, to the voters' peer listeners, back from them.
    fn proxy_bytes(&self) -> [u64; 4] {
        let learner = self.learner_proxies.iter();
        let voters = self.voter_proxies.iter();
        let sum = |proxies: std::slice::Iter<'_, Proxy>, d| proxies.map(|p| p.bytes(d)).sum();
        [
            sum(learner.clone(), Direction::Upstream),
            sum(learner, Direction::Downstream),
            sum(voters.clone(), Direction::Upstream),
            sum(voters, Direction::Downstream),
        ]
    }

    /// Awaits one workload; on failure says which step, and why: a crash
    /// if a member died, else the workload's error and the members' logs.
    async fn step<T>(
        &mut self,
        what: &str,
        workload: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = workload.await;
        for member in &mut self.members {
            member.ensure_running()?;
        }
        result.with_context(|| {
            let logs: Vec<String> = self
                .members
                .iter()
                .map(|m| format!("--- {} ---\n{}", m.name(), m.log_tail(10)))
                .collect();
            format!(
                "{} cluster: {what} failed; last lines of the members' logs:\n{}",
                self.system,
                logs.join("\n")
            )
        })
    }
}

/// How long `etcdctl member add` is retried while the cluster calls
/// itself unhealthy.
const MEMBER_ADD_TIMEOUT: Duration = Duration::from_secs(20);

/// `etcdctl member add <name> --learner --peer-urls=<peer_url>`; returns
/// the ETCD_INITIAL_CLUSTER value it prints for the new member.
pub async fn member_add_learner(
    etcdctl: &Path,
    endpoints: &[String],
    name: &str,
    peer_url: &str,
) -> Result<String> {
    let deadline = Instant::now() + MEMBER_ADD_TIMEOUT;
    loop {
        let output = tokio::process::Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["member", "add", name, "--learner"])
            .arg(format!("--peer-urls={peer_url}"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running {}", etcdctl.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // etcdctl ends a failure with one `Error: ...` line, after retry
        // warnings that only repeat it.
        let error = stderr
            .lines()
            .rfind(|l| l.starts_with("Error:"))
            .unwrap_or(stderr.trim());
        if !output.status.success() {
            // etcd refuses any member change until every voter has been
            // connected to the leader for 5 s (its strict reconfiguration
            // check), which a fresh cluster has not. Nothing was added, so
            // trying again is safe.
            if error.contains("unhealthy cluster") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            bail!(
                "`etcdctl member add {name} --learner` failed ({}): {error}",
                output.status
            );
        }
        // etcdctl prints the new member's flags as environment variables;
        // the cluster's is the one it cannot work out alone.
        return stdout
            .lines()
            .find_map(|line| {
                line.strip_prefix("ETCD_INITIAL_CLUSTER=\"")?
                    .strip_suffix('"')
            })
            .map(str::to_string)
            .with_context(|| {
                format!("`etcdctl member add` printed no ETCD_INITIAL_CLUSTER: {stdout}")
            });
    }
}

/// The flags of one member; both systems take etcd's names.
pub struct MemberFlags<'a> {
    pub name: &'a str,
    pub client: &'a str,
    pub listen_peer: &'a str,
    pub advertise_peer: &'a str,
    pub initial_cluster: &'a str,
    /// `new` or `existing`.
    pub state: &'a str,
    pub token: &'a str,
}

impl MemberFlags<'_> {
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--name", self.name),
            ("--listen-client-urls", self.client),
            ("--advertise-client-urls", self.client),
            ("--listen-peer-urls", self.listen_peer),
            ("--initial-advertise-peer-urls", self.advertise_peer),
            ("--initial-cluster", self.initial_cluster),
            ("--initial-cluster-state", self.state),
            ("--initial-cluster-token", self.token),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
    }
}

pub fn loopback_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// (own member id, leader's member id) from one member's Status.
async fn status(url: &str) -> Result<(u64, u64)> {
    let mut client = MaintenanceClient::new(connect(url).await?);
    let status = tokio::time::timeout(Duration::from_secs(2), client.status(StatusRequest {}))
        .await
        .context("Status timed out")??
        .into_inner();
    let own_id = status.header.map_or(0, |h| h.member_id);
    Ok((own_id, status.leader))
}

pub async fn connect(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid endpoint {url}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// What the lag measurement saw.
pub struct LagResult {
    /// Lag of every acknowledged timed write, sorted.
    lags: Vec<Duration>,
    /// Latency of every acknowledged timed write on the leader, sorted.
    put_latencies: Vec<Duration>,
    /// From the first timed put sent to the last one acknowledged.
    write_elapsed: Duration,
    /// Failed puts and failed polls.
    errors: u64,
    first_error: Option<String>,
    /// Polls that the learner answered.
    polls: u64,
}

/// Warms up, waits for the learner to catch up, then writes to the leader
/// at the steady rate while polling the learner; see the module docs.
pub async fn measure_lag(
    leader_url: &str,
    learner_url: &str,
    load: &ClusterLoad,
    settings: &Settings,
) -> Result<LagResult> {
    let mut leader = KvClient::new(connect(leader_url).await?);
    let mut learner = KvClient::new(connect(learner_url).await?);
    let value = load::value(settings.value_size);

    for n in 0..WARM_UP_PUTS {
        let request = PutRequest {
            key: load::key(load::LAG_PREFIX, n),
            value: value.to_vec(),
            ..Default::default()
        };
        tokio::time::timeout(settings.request_timeout, leader.put(request))
            .await
            .context("a warm-up put timed out")?
            .context("a warm-up put failed")?;
    }
    // Nothing else writes, so the leader's revision now is the one the
    // learner must reach.
    let leader_revision = revision(&mut leader, settings.request_timeout)
        .await
        .context("reading the leader's revision")?;
    wait_for_revision(
        &mut learner,
        leader_revision,
        CATCH_UP_TIMEOUT,
        settings.request_timeout,
    )
    .await?;

    let (target_tx, target_rx) = watch::channel(i64::MAX);
    // In a JoinSet so the poller is aborted, not left polling, if this
    // future is dropped (Ctrl-C) before it finishes.
    let mut poller = JoinSet::new();
    poller.spawn(poll_revisions(
        learner,
        load.poll_interval,
        target_rx,
        settings.request_timeout,
    ));
    let count = ((load.learner_rate as f64) * load.learner_duration.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let writes = steady_writes(
        leader,
        load.learner_rate,
        WARM_UP_PUTS..WARM_UP_PUTS + count,
        value,
        settings.request_timeout,
    )
    .await;
    // Tell the poller where to stop, even if there is nothing to wait for
    // (the writes all failed): it must not poll forever.
    let last_revision = writes.acked.iter().map(|&(rev, _)| rev).max().unwrap_or(0);
    let _ = target_tx.send(last_revision);
    let polled = poller
        .join_next()
        .await
        .context("the learner poller was not started")?
        .context("the learner poller panicked")??;

    let mut put_latencies = writes.latencies;
    put_latencies.sort_unstable();
    Ok(LagResult {
        lags: lags(&writes.acked, &polled.seen),
        put_latencies,
        write_elapsed: writes.elapsed,
        errors: writes.errors + polled.errors,
        first_error: writes.first_error.or(polled.first_error),
        polls: polled.polls,
    })
}

/// A serializable Range of [`PROBE_KEY`]: the member's own revision, with
/// no round trip to the leader.
fn probe_request() -> RangeRequest {
    RangeRequest {
        key: PROBE_KEY.to_vec(),
        serializable: true,
        ..Default::default()
    }
}

/// The revision in the header of a serializable Range.
pub async fn revision(kv: &mut KvClient<Channel>, request_timeout: Duration) -> Result<i64> {
    let response = tokio::time::timeout(request_timeout, kv.range(probe_request()))
        .await
        .context("Range timed out")??
        .into_inner();
    response
        .header
        .map(|h| h.revision)
        .context("Range answered without a header")
}

/// Polls until `kv`'s member reaches `target` or `timeout` passes.
pub async fn wait_for_revision(
    kv: &mut KvClient<Channel>,
    target: i64,
    timeout: Duration,
    request_timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match revision(kv, request_timeout).await {
            Ok(rev) if rev >= target => return Ok(()),
            Ok(rev) => last = format!("at revision {rev}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the learner did not catch up to revision {target} within {timeout:?} ({last})")
}

/// The timed puts.
struct Writes {
    /// (revision, instant the answer arrived) of each acknowledged put.
    acked: Vec<(i64, Instant)>,
    /// From each acknowledged put's send to its answer.
    latencies: Vec<Duration>,
    elapsed: Duration,
    errors: u64,
    first_error: Option<String>,
}

/// Puts keys `keys` to the leader at `rate` a second, open loop: each put
/// is sent on its tick whether or not earlier ones were answered, so a
/// slow answer delays nothing else, as with independent writers.
async fn steady_writes(
    leader: KvClient<Channel>,
    rate: u64,
    keys: std::ops::Range<u64>,
    value: std::sync::Arc<Vec<u8>>,
    request_timeout: Duration,
) -> Writes {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    // A tick missed (the timer has 1 ms granularity, and the CPU is busy)
    // is made up at once, so the average rate holds.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut puts = JoinSet::new();
    for n in keys {
        tick.tick().await;
        let mut kv = leader.clone();
        let request = PutRequest {
            key: load::key(load::LAG_PREFIX, n),
            value: value.to_vec(),
            ..Default::default()
        };
        puts.spawn(async move {
            let sent = Instant::now();
            let answer = tokio::time::timeout(request_timeout, kv.put(request)).await;
            let acked = Instant::now();
            match answer {
                Ok(Ok(response)) => match response.into_inner().header {
                    Some(header) => Ok((header.revision, acked, acked - sent)),
                    None => Err("Put answered without a header".to_string()),
                },
                Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
                Err(_) => Err(format!("no answer within {request_timeout:?}")),
            }
        });
    }
    let mut writes = Writes {
        acked: Vec::new(),
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    while let Some(joined) = puts.join_next().await {
        match joined {
            Ok(Ok((revision, at, latency))) => {
                writes.acked.push((revision, at));
                writes.latencies.push(latency);
            }
            Ok(Err(error)) => {
                writes.errors += 1;
                writes.first_error.get_or_insert(error);
            }
            Err(e) => {
                writes.errors += 1;
                writes
                    .first_error
                    .get_or_insert(format!("a put task failed: {e}"));
            }
        }
    }
    writes.elapsed = writes
        .acked
        .iter()
        .map(|&(_, at)| at - start)
        .max()
        .unwrap_or_default();
    writes
}

/// What the poller saw.
struct Polled {
    /// (instant the answer arrived, revision) each time the learner's
    /// revision rose; rising in both.
    seen: Vec<(Instant, i64)>,
    polls: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Reads the learner's revision every `every` until it reaches the target
/// sent on `target` (which starts unreachable, at `i64::MAX`). Fails if the
/// learner has not reached it [`CATCH_UP_TIMEOUT`] after it was sent.
async fn poll_revisions(
    mut learner: KvClient<Channel>,
    every: Duration,
    target: watch::Receiver<i64>,
    request_timeout: Duration,
) -> Result<Polled> {
    let mut tick = tokio::time::interval(every);
    // A slow answer pushes the next poll back rather than causing a burst
    // of polls that would load the learner.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut polled = Polled {
        seen: Vec::new(),
        polls: 0,
        errors: 0,
        first_error: None,
    };
    let mut last = 0;
    let mut give_up_at = None;
    loop {
        tick.tick().await;
        match revision(&mut learner, request_timeout).await {
            Ok(rev) => {
                let at = Instant::now();
                polled.polls += 1;
                if rev > last {
                    polled.seen.push((at, rev));
                    last = rev;
                }
            }
            Err(e) => {
                polled.errors += 1;
                polled
                    .first_error
                    .get_or_insert_with(|| format!("learner poll: {e:#}"));
            }
        }
        let target = *target.borrow();
        if last >= target {
            return Ok(polled);
        }
        if target != i64::MAX {
            let give_up_at = *give_up_at.get_or_insert_with(|| Instant::now() + CATCH_UP_TIMEOUT);
            if Instant::now() >= give_up_at {
                bail!(
                    "the learner had not reached revision {target} {CATCH_UP_TIMEOUT:?} after the last write (it is at {last})"
                );
            }
        }
    }
}

/// Each acknowledged write's lag: from its acknowledgement to the first
/// poll that saw its revision, zero if that poll answered before the
/// acknowledgement arrived. Sorted.
fn lags(acked: &[(i64, Instant)], seen: &[(Instant, i64)]) -> Vec<Duration> {
    let mut lags: Vec<Duration> = acked
        .iter()
        .filter_map(|&(rev, acked_at)| {
            // `seen` rises in revision, so the first poll that saw `rev` is
            // found by binary search.
            let first = seen.partition_point(|&(_, r)| r < rev);
            seen.get(first)
                .map(|&(at, _)| at.saturating_duration_since(acked_at))
        })
        .collect();
    lags.sort_unstable();
    lags
}

/// Nearest-rank percentile of sorted `values`; zero if there are none.
fn percentile(values: &[Duration], quantile: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let rank = (quantile * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_runs_from_ack_to_first_poll_that_saw_the_revision() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let seen = [(ms(10), 5), (ms(30), 7), (ms(50), 9)];
        let acked = [
            (5, ms(4)),   // seen at 10: 6 ms
            (6, ms(8)),   // first seen (as 7) at 30: 22 ms
            (7, ms(40)),  // already seen at 30, before its ack: 0
            (9, ms(45)),  // seen at 50: 5 ms
            (10, ms(46)), // never seen: not counted
        ];
        let lags = lags(&acked, &seen);
        let expected = [0, 5, 6, 22].map(Duration::from_millis);
        assert_eq!(lags, expected);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&values, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&values, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn member_flags_use_etcd_names() {
        let args = MemberFlags {
            name: "m0",
            client: "http://127.0.0.1:1",
            listen_peer: "http://127.0.0.1:2",
            advertise_peer: "http://127.0.0.1:3",
            initial_cluster: "m0=http://127.0.0.1:3",
            state: "new",
            token: "t",
        }
        .to_args();
        assert_eq!(
            args,
            [
                "--name",
                "m0",
                "--listen-client-urls",
                "http://127.0.0.1:1",
                "--advertise-client-urls",
                "http://127.0.0.1:1",
                "--listen-peer-urls",
                "http://127.0.0.1:2",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:3",
                "--initial-cluster",
                "m0=http://127.0.0.1:3",
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "t",
            ]
        );
    }
}
