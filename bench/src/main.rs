//! `tern-bench`: runs the same gRPC load against a real etcd and against
//! tern-primary, one at a time on loopback, and prints one markdown table
//! comparing them.
//!
//! - [`servers`]: starting, probing and killing the two processes.
//! - [`load`]: the workloads (puts, gets, watch delivery, bulk load).
//! - [`cluster`]: the cluster section (`--cluster`): puts against 3-member
//!   clusters, and a learner's lag behind a slow link.
//! - [`backup`]: the backup section (`--backup`): a full backup of the same
//!   data set, `etcdctl snapshot save` against a tern-learner's backup.
//! - [`restore`]: the backup section's second half: from that backup to a
//!   new member serving it, `etcdctl snapshot restore` + etcd against
//!   `tern-restore restore` + tern-primary, and one `tern-restore drill`.
//! - [`report`]: the table.

mod backup;
mod cluster;
mod load;
mod report;
mod restore;
mod servers;

use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use backup::BackupLoad;
use cluster::ClusterLoad;
use load::{Budget, Pool, Settings, WatchLoad};
use report::{Header, Metric, Unit};
use servers::{Binaries, Server, System};

/// Largest txn etcd accepts by default (`--max-txn-ops`); Tern has the same.
const MAX_TXN_OPS: u64 = 128;
/// Key numbers have seven digits (see `load::key`).
const MAX_KEYS: u64 = 10_000_000;
/// Pause between the last write and reading RSS, so memory freed right after
/// the load (request buffers, Go's background GC) is not counted.
const RSS_SETTLE: Duration = Duration::from_secs(1);

/// Benchmark tern-primary against etcd with identical client load.
///
/// The defaults take about three minutes on a 2-core machine; --cluster
/// adds about a minute, --backup a few (backups, then restores).
#[derive(Debug, Parser)]
#[command(name = "tern-bench", version, about)]
struct Args {
    /// The etcd executable.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// The tern-primary executable [default: next to this executable].
    #[arg(long)]
    tern_bin: Option<PathBuf>,
    /// The tern-learner executable, for --cluster and --backup [default:
    /// next to tern-primary].
    #[arg(long)]
    tern_learner_bin: Option<PathBuf>,
    /// The tern-restore executable, for --backup (it restores the backups
    /// and runs a drill) [default: next to tern-primary].
    #[arg(long)]
    tern_restore_bin: Option<PathBuf>,
    /// The etcdctl executable, for --cluster and --backup (it adds the
    /// learners and takes etcd's snapshots).
    #[arg(long, default_value = "/usr/bin/etcdctl")]
    etcdctl_bin: PathBuf,
    /// The age-keygen executable, for --backup (the key Tern's backups are
    /// encrypted to and restored with).
    #[arg(long, default_value = "/usr/bin/age-keygen")]
    age_keygen_bin: PathBuf,
    /// How long each put and get step runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Issue exactly this many requests per put and get step instead of
    /// running for --duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Concurrent clients of each put step, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    put_clients: Vec<usize>,
    /// Concurrent clients of the get steps.
    #[arg(long, default_value_t = 64)]
    get_clients: usize,
    /// Distinct keys written before, and read by, the get steps.
    #[arg(long, default_value_t = 10_000)]
    get_keys: u64,
    /// Keys in each Range of the range step (serializable, over the get
    /// keys); 0 skips the step.
    #[arg(long, default_value_t = 200)]
    range_keys: u64,
    /// gRPC connections shared round-robin by the clients.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Bytes per value (keys are always 8 bytes).
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Keys the put steps (single server and cluster) choose from at
    /// random, as etcd's `benchmark put --key-space-size`; 0 writes a new
    /// key with every put, in order.
    #[arg(long, default_value_t = 0)]
    key_space: u64,
    /// Watchers on the watched prefix.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Watch streams the watchers are spread over.
    #[arg(long, default_value_t = 4)]
    watch_streams: usize,
    /// Puts under the watched prefix; each watcher must receive all of them.
    #[arg(long, default_value_t = 5_000)]
    watch_puts: u64,
    /// Concurrent clients issuing those puts.
    #[arg(long, default_value_t = 16)]
    watch_put_clients: usize,
    /// Longest the watch delivery may take before the run fails.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    watch_timeout: Duration,
    /// Keys written (to a fresh server) before measuring RSS.
    #[arg(long, default_value_t = 1_000_000)]
    rss_keys: u64,
    /// Puts per txn when writing those keys.
    #[arg(long, default_value_t = 100)]
    rss_txn_ops: u64,
    /// Concurrent clients writing those keys.
    #[arg(long, default_value_t = 16)]
    rss_clients: usize,
    /// A request unanswered for this long counts as an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// After the single-server steps, run the cluster section: puts against
    /// 3-member clusters, and a learner's lag behind a slow link.
    #[arg(long)]
    cluster: bool,
    /// Run the cluster section only.
    #[arg(long)]
    cluster_only: bool,
    /// Voting members of the clusters of the cluster section.
    #[arg(long, default_value_t = 3)]
    cluster_members: usize,
    /// Concurrent clients of the cluster put step, spread evenly over the
    /// members (it runs for --duration or --requests).
    #[arg(long, default_value_t = 256)]
    cluster_clients: usize,
    /// Round trip added to the learner's link: half of it each way, on
    /// every connection between the learner and a voter.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    learner_rtt: Duration,
    /// Puts per second to the leader while the learner's lag is measured;
    /// they go on for --duration.
    #[arg(long, default_value_t = 1000)]
    learner_rate: u64,
    /// How often the learner's revision is read: the lag's resolution (a
    /// write's lag includes up to one period of waiting for the next poll).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    learner_poll: Duration,
    /// After the other sections, run the backup section: the time to back
    /// up the same data set with `etcdctl snapshot save` from an etcd and
    /// with `POST /backup` on a tern-learner of a tern-primary; then the
    /// time from that backup to a new member serving it (`etcdctl snapshot
    /// restore` + etcd, `tern-restore restore` + tern-primary), and one
    /// `tern-restore drill`.
    #[arg(long)]
    backup: bool,
    /// Run the backup section only (with --cluster-only: those two only).
    #[arg(long)]
    backup_only: bool,
    /// Keys in the backed-up data set, of --value-size bytes each; the
    /// default makes about 110 MiB of state in etcd, 180 MiB in Tern.
    #[arg(long, default_value_t = 300_000)]
    backup_keys: u64,
    /// Backups taken in a row of each system, and restores of the last one;
    /// the table shows the median of each.
    #[arg(long, default_value_t = 3)]
    backup_runs: usize,
    /// Fill the backed-up values with pseudo-random bytes, which no
    /// compressor shrinks, instead of the one repeated byte every other
    /// step writes (which zstd shrinks to almost nothing).
    #[arg(long)]
    backup_random_values: bool,
}

impl Args {
    fn validate(&self) -> Result<()> {
        ensure!(
            !self.put_clients.is_empty(),
            "--put-clients needs at least one value"
        );
        ensure!(
            self.put_clients.iter().all(|&c| c > 0),
            "--put-clients values must be positive"
        );
        ensure!(self.get_clients > 0, "--get-clients must be positive");
        ensure!(
            self.range_keys < self.get_keys,
            "--range-keys must be below --get-keys (the ranges read the get keys)"
        );
        ensure!(self.connections > 0, "--connections must be positive");
        ensure!(self.watchers > 0, "--watchers must be positive");
        ensure!(
            self.watch_put_clients > 0,
            "--watch-put-clients must be positive"
        );
        ensure!(self.rss_clients > 0, "--rss-clients must be positive");
        ensure!(
            (1..=MAX_TXN_OPS).contains(&self.rss_txn_ops),
            "--rss-txn-ops must be between 1 and {MAX_TXN_OPS} (etcd's default --max-txn-ops)"
        );
        for (flag, keys) in [
            ("--get-keys", self.get_keys),
            ("--watch-puts", self.watch_puts),
            ("--rss-keys", self.rss_keys),
            ("--backup-keys", self.backup_keys),
        ] {
            ensure!(
                (1..=MAX_KEYS).contains(&keys),
                "{flag} must be between 1 and {MAX_KEYS} (8-byte keys)"
            );
        }
        ensure!(
            self.key_space <= MAX_KEYS,
            "--key-space must be at most {MAX_KEYS} (8-byte keys)"
        );
        if let Some(n) = self.requests {
            ensure!(n > 0, "--requests must be positive");
        }
        ensure!(
            self.cluster_clients > 0,
            "--cluster-clients must be positive"
        );
        ensure!(
            (1..=7).contains(&self.cluster_members),
            "--cluster-members must be between 1 and 7"
        );
        ensure!(self.learner_rate > 0, "--learner-rate must be positive");
        ensure!(
            !self.learner_poll.is_zero(),
            "--learner-poll must be positive"
        );
        ensure!(
            self.learner_rate as f64 * self.duration.as_secs_f64() <= MAX_KEYS as f64,
            "--learner-rate times --duration must stay under {MAX_KEYS} writes (8-byte keys)"
        );
        ensure!(self.backup_runs > 0, "--backup-runs must be positive");
        Ok(())
    }

    /// Whether some --*-only flag limits the run to the sections it names.
    fn only(&self) -> bool {
        self.cluster_only || self.backup_only
    }

    fn single_server(&self) -> bool {
        !self.only()
    }

    fn cluster(&self) -> bool {
        self.cluster_only || (self.cluster && !self.only())
    }

    fn backup(&self) -> bool {
        self.backup_only || (self.backup && !self.only())
    }

    fn backup_load(&self) -> BackupLoad {
        BackupLoad {
            keys: self.backup_keys,
            runs: self.backup_runs,
            random_values: self.backup_random_values,
            connections: self.connections,
        }
    }

    fn cluster_load(&self) -> ClusterLoad {
        ClusterLoad {
            voters: self.cluster_members,
            clients: self.cluster_clients,
            connections: self.connections,
            learner_rtt: self.learner_rtt,
            learner_rate: self.learner_rate,
            learner_duration: self.duration,
            poll_interval: self.learner_poll,
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            budget: match self.requests {
                Some(n) => Budget::Requests(n),
                None => Budget::Time(self.duration),
            },
            value_size: self.value_size,
            key_space: self.key_space,
            request_timeout: self.request_timeout,
        }
    }

    fn binaries(&self) -> Result<Binaries> {
        let tern = match &self.tern_bin {
            Some(path) => path.clone(),
            // `cargo build --release` puts both binaries in target/release.
            None => std::env::current_exe()
                .context("locating this executable")?
                .with_file_name("tern-primary"),
        };
        ensure!(
            tern.is_file(),
            "tern-primary not found at {}: build it with `cargo build --release -p tern-primary` or pass --tern-bin",
            tern.display()
        );
        ensure!(
            self.etcd_bin.is_file(),
            "etcd not found at {}: install etcd-server or pass --etcd-bin",
            self.etcd_bin.display()
        );
        let (mut tern_learner, mut etcdctl, mut age_keygen, mut tern_restore) =
            (None, None, None, None);
        if self.cluster() || self.backup() {
            let learner = match &self.tern_learner_bin {
                Some(path) => path.clone(),
                None => tern.with_file_name("tern-learner"),
            };
            ensure!(
                learner.is_file(),
                "tern-learner not found at {}: build it with `cargo build --release -p tern-learner` or pass --tern-learner-bin",
                learner.display()
            );
            ensure!(
                self.etcdctl_bin.is_file(),
                "etcdctl not found at {}: install etcd-client or pass --etcdctl-bin",
                self.etcdctl_bin.display()
            );
            tern_learner = Some(learner);
            etcdctl = Some(self.etcdctl_bin.clone());
        }
        if self.backup() {
            ensure!(
                self.age_keygen_bin.is_file(),
                "age-keygen not found at {}: install age or pass --age-keygen-bin",
                self.age_keygen_bin.display()
            );
            age_keygen = Some(self.age_keygen_bin.clone());
            let restore = match &self.tern_restore_bin {
                Some(path) => path.clone(),
                None => tern.with_file_name("tern-restore"),
            };
            ensure!(
                restore.is_file(),
                "tern-restore not found at {}: build it with `cargo build --release -p tern-restore` or pass --tern-restore-bin",
                restore.display()
            );
            tern_restore = Some(restore);
        }
        Ok(Binaries {
            etcd: self.etcd_bin.clone(),
            tern,
            tern_learner,
            etcdctl,
            age_keygen,
            tern_restore,
        })
    }

    /// The load in words, for the table's header.
    fn describe(&self) -> String {
        let step = match self.requests {
            Some(n) => format!("{n} requests"),
            None => format!("{:?}", self.duration),
        };
        let mut parts = vec![format!(
            "{step} per put/get step; 8-byte keys, {}-byte values; up to {} connections; {}",
            self.value_size,
            self.connections,
            match self.key_space {
                0 => "puts to new keys in order".to_string(),
                n => format!("puts to random keys of {n}"),
            }
        )];
        if self.single_server() {
            parts.push(format!(
                "gets over {} keys; watch: {} watchers on {} streams, {} puts from {} clients, \
                 timed from the first put to the last event received; \
                 RSS on a fresh server after {} keys in txns of {} from {} clients",
                self.get_keys,
                self.watchers,
                self.watch_streams,
                self.watch_puts,
                self.watch_put_clients,
                self.rss_keys,
                self.rss_txn_ops,
                self.rss_clients
            ));
        }
        if self.cluster() {
            parts.push(format!(
                "cluster: {voters} voters on loopback, puts from {} clients on {} connections \
                 spread evenly over all {voters}; learner: added with `etcdctl member add \
                 --learner` across a link of {:?} RTT (half each way on every connection between \
                 it and a voter, whichever side dials), {} puts/s to the leader for {:?}, lag = \
                 time from a put's ack to the first serializable Range on the learner (one every \
                 {:?}) that shows its revision; voter put latency = those puts' latency",
                self.cluster_clients,
                self.connections.div_ceil(self.cluster_members) * self.cluster_members,
                self.learner_rtt,
                self.learner_rate,
                self.duration,
                self.learner_poll,
                voters = self.cluster_members,
            ));
        }
        if self.backup() {
            parts.push(format!(
                "backup: {} keys of {} {}-byte values, written in txns of {} from {} clients; \
                 etcd: `etcdctl snapshot save` from one etcd (its bbolt file as is, neither \
                 compressed nor encrypted); tern: `POST /backup` on a tern-learner added to one \
                 tern-primary with `etcdctl member add --learner`, once caught up, writing to a \
                 file:// store in a temporary directory (page image of the state streamed from \
                 one read transaction, zstd level 3, age to one X25519 recipient, answered when \
                 the manifest is written); state = etcd's \
                 snapshot size, tern's manifest raw_size; throughput = state MB (10^6 bytes) / \
                 seconds; the median of {} {} in a row; restore: with the backed-up servers \
                 stopped, from spawning the restore command (etcd: `etcdctl snapshot restore` of \
                 the last snapshot; tern: `tern-restore restore` of the newest backup: download, \
                 sha256, decrypt and decompress in one stream, integrity check beside the hash \
                 recomputed) into a fresh dir \
                 to the first linearizable Range on a member started on it that answers at the \
                 backed-up revision, the median of {} in a row; drill RTO: as reported by one \
                 `tern-restore drill` on the same store",
                count_label(self.backup_keys),
                if self.backup_random_values {
                    "pseudo-random (incompressible)"
                } else {
                    "repeated-byte (highly compressible)"
                },
                self.value_size,
                backup::TXN_OPS,
                backup::LOAD_CLIENTS,
                self.backup_runs,
                plural(self.backup_runs, "backup"),
                self.backup_runs,
            ));
        }
        parts.join("; ")
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    args.validate()?;
    let bins = args.binaries()?;
    // SIGINT or SIGTERM drops `run`, and with it the running server, whose
    // Drop kills it; without this the server would outlive the benchmark.
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::select! {
        result = run(&args, &bins) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT)"),
        _ = terminate.recv() => bail!("terminated (SIGTERM)"),
    }
}

async fn run(args: &Args, bins: &Binaries) -> Result<()> {
    let started = Instant::now();
    let header = Header {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        etcd_version: version(&bins.etcd)?,
        tern_version: version(&bins.tern)?,
        load: args.describe(),
    };
    // One system at a time, so neither competes with the other for the CPU.
    let (mut etcd, mut tern) = (Vec::new(), Vec::new());
    if args.single_server() {
        etcd = bench_system(System::Etcd, args, bins).await?;
        tern = bench_system(System::Tern, args, bins).await?;
    }
    if args.cluster() {
        let (load, settings) = (args.cluster_load(), args.settings());
        etcd.extend(cluster::bench_system(System::Etcd, bins, &load, &settings).await?);
        tern.extend(cluster::bench_system(System::Tern, bins, &load, &settings).await?);
    }
    if args.backup() {
        let (load, settings) = (args.backup_load(), args.settings());
        etcd.extend(backup::bench_system(System::Etcd, bins, &load, &settings).await?);
        tern.extend(backup::bench_system(System::Tern, bins, &load, &settings).await?);
    }
    print!("{}", report::render(&header, &etcd, &tern)?);
    eprintln!("benchmark took {:.0?}", started.elapsed());
    Ok(())
}

/// Every workload against one system, in the order the table lists them.
async fn bench_system(system: System, args: &Args, bins: &Binaries) -> Result<Vec<Metric>> {
    let mut metrics = Vec::new();
    let mut errors = 0;
    eprintln!("[{system}] starting");
    {
        let mut server = Server::start(system, bins).await?;
        errors += throughput_workloads(&mut server, args, &mut metrics).await?;
        // Dropping the server here kills it before the next one starts.
    }
    // A fresh server, so RSS reflects the loaded keys and not the history
    // the workloads above left behind.
    eprintln!("[{system}] restarting for the RSS measurement");
    let mut server = Server::start(system, bins).await?;
    errors += rss_workload(&mut server, args, &mut metrics).await?;
    metrics.push(Metric::new(
        "request errors (all steps)",
        Unit::Count,
        errors as f64,
    ));
    Ok(metrics)
}

/// Puts, gets and watch delivery; appends their rows and returns the number
/// of failed requests.
async fn throughput_workloads(
    server: &mut Server,
    args: &Args,
    metrics: &mut Vec<Metric>,
) -> Result<u64> {
    let system = server.system();
    let settings = args.settings();
    let mut errors = 0;
    let pool = Pool::connect(server.url(), args.connections).await?;

    for &clients in &args.put_clients {
        let what = format!("put {clients} {}", plural(clients, "client"));
        let r = step(server, &what, load::puts(&pool, clients, &settings)).await?;
        progress(system, &what, &r);
        errors += r.errors;
        push_rate_and_latency(metrics, &what, &r, &[0.5, 0.99]);
    }

    let get_keys = load::prepare_gets(&pool, args.get_keys, &settings);
    step(server, "writing the get keys", get_keys).await?;
    for (serializable, kind) in [(false, "linearizable"), (true, "serializable")] {
        let what = format!(
            "{kind} get, {} {}",
            args.get_clients,
            plural(args.get_clients, "client")
        );
        let gets = load::gets(
            &pool,
            args.get_clients,
            args.get_keys,
            serializable,
            &settings,
        );
        let r = step(server, &what, gets).await?;
        progress(system, &what, &r);
        errors += r.errors;
        metrics.push(Metric::new(
            format!("{what} (req/s)"),
            Unit::Rate,
            r.per_second(),
        ));
    }

    if args.range_keys > 0 {
        let what = format!(
            "range {} keys, serializable, {} {}",
            args.range_keys,
            args.get_clients,
            plural(args.get_clients, "client")
        );
        let ranges = load::ranges(
            &pool,
            args.get_clients,
            args.get_keys,
            args.range_keys,
            &settings,
        );
        let r = step(server, &what, ranges).await?;
        progress(system, &what, &r);
        errors += r.errors;
        push_rate_and_latency(metrics, &what, &r, &[0.99]);
    }

    metrics.push(Metric::new(
        "peak RSS, puts and reads (MiB)",
        Unit::MiB,
        server.peak_rss_bytes()? as f64 / (1024.0 * 1024.0),
    ));

    let watch = WatchLoad {
        watchers: args.watchers,
        streams: args.watch_streams,
        puts: args.watch_puts,
        put_clients: args.watch_put_clients,
        timeout: args.watch_timeout,
    };
    let what = format!(
        "watch delivery, {} {}",
        args.watchers,
        plural(args.watchers, "watcher")
    );
    let w = step(
        server,
        &what,
        load::watch_delivery(&pool, &watch, &settings),
    )
    .await?;
    eprintln!(
        "[{system}] {what}: {} events in {:.2?} = {:.0} events/s (the puts took {:.2?})",
        w.events,
        w.elapsed,
        w.events_per_second(),
        w.puts_elapsed
    );
    metrics.push(Metric::new(
        format!("{what} (events/s)"),
        Unit::Rate,
        w.events_per_second(),
    ));
    Ok(errors)
}

/// Loads `--rss-keys` keys, then reads the server's RSS; appends the rows
/// and returns the number of failed txns.
async fn rss_workload(server: &mut Server, args: &Args, metrics: &mut Vec<Metric>) -> Result<u64> {
    let system = server.system();
    let settings = args.settings();
    let pool = Pool::connect(server.url(), args.connections).await?;
    let keys = count_label(args.rss_keys);
    let what = format!("load {keys} keys, txns of {}", args.rss_txn_ops);
    let bulk = load::load_keys(
        &pool,
        load::RSS_PREFIX,
        args.rss_keys,
        args.rss_txn_ops,
        args.rss_clients,
        &settings,
    );
    let r = step(server, &what, bulk).await?;
    progress(system, &what, &r);
    // Only the last txn may hold fewer than --rss-txn-ops keys.
    let keys_written = (r.ops * args.rss_txn_ops).min(args.rss_keys);
    let keys_per_second = keys_written as f64 / r.elapsed.as_secs_f64().max(1e-9);
    tokio::time::sleep(RSS_SETTLE).await;
    let rss_mib = server.rss_bytes()? as f64 / (1024.0 * 1024.0);
    eprintln!("[{system}] RSS after {keys} keys: {rss_mib:.1} MiB");
    metrics.push(Metric::new(
        format!("{what} (keys/s)"),
        Unit::Rate,
        keys_per_second,
    ));
    metrics.push(Metric::new(
        format!("RSS after {keys} keys (MiB)"),
        Unit::MiB,
        rss_mib,
    ));
    let state_mib = server.state_bytes()? as f64 / (1024.0 * 1024.0);
    eprintln!("[{system}] state on disk after {keys} keys: {state_mib:.1} MiB");
    metrics.push(Metric::new(
        format!("state on disk after {keys} keys (MiB)"),
        Unit::MiB,
        state_mib,
    ));
    Ok(r.errors)
}

/// The rows of one step: its rate, and its latency at each quantile.
fn push_rate_and_latency(
    metrics: &mut Vec<Metric>,
    what: &str,
    r: &load::StepResult,
    quantiles: &[f64],
) {
    metrics.push(Metric::new(
        format!("{what} (req/s)"),
        Unit::Rate,
        r.per_second(),
    ));
    for &q in quantiles {
        metrics.push(Metric::new(
            format!("{what} p{} (ms)", (q * 100.0).round()),
            Unit::Millis,
            r.percentile_ms(q),
        ));
    }
}

/// Awaits one workload; on failure says which server and step, and why: a
/// crash if the process died, else the workload's error and the log's end.
async fn step<T>(
    server: &mut Server,
    what: &str,
    workload: impl Future<Output = Result<T>>,
) -> Result<T> {
    let result = workload.await;
    server.ensure_running()?;
    result.with_context(|| {
        format!(
            "{} {what} failed; last lines of its log:\n{}",
            server.name(),
            server.log_tail(15)
        )
    })
}

fn progress(system: System, what: &str, r: &load::StepResult) {
    eprintln!(
        "[{system}] {what}: {} ok in {:.2?} = {:.0}/s, p50 {:.3} ms, p99 {:.3} ms",
        r.ops,
        r.elapsed,
        r.per_second(),
        r.percentile_ms(0.5),
        r.percentile_ms(0.99)
    );
    if r.errors > 0 {
        eprintln!(
            "[{system}] {what}: {} errors, first: {}",
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
}

/// The first line of `<bin> --version`.
fn version(bin: &std::path::Path) -> Result<String> {
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .next()
        .unwrap_or("unknown version")
        .trim()
        .to_string())
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// 1000000 -> "1M", 50000 -> "50k"; anything else as is.
fn count_label(n: u64) -> String {
    // Trimming zeros off the decimal string avoids `%` arithmetic whose
    // clippy-preferred form (`is_multiple_of`) is newer than our MSRV.
    let digits = n.to_string();
    if let Some(millions) = digits.strip_suffix("000000").filter(|m| !m.is_empty()) {
        format!("{millions}M")
    } else if let Some(thousands) = digits.strip_suffix("000").filter(|k| !k.is_empty()) {
        format!("{thousands}k")
    } else {
        digits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_labels() {
        assert_eq!(count_label(1_000_000), "1M");
        assert_eq!(count_label(20_000), "20k");
        assert_eq!(count_label(1_500_000), "1500k");
        assert_eq!(count_label(1_234), "1234");
        assert_eq!(count_label(0), "0");
    }

    #[test]
    fn defaults_are_valid() {
        let args = Args::parse_from(["tern-bench"]);
        args.validate().expect("the defaults pass validation");
        assert_eq!(args.put_clients, [1, 16, 256]);
        assert!(args.single_server() && !args.cluster() && !args.backup());
        assert_eq!(args.key_space, 0, "puts write new keys in order by default");
        let args = Args::parse_from(["tern-bench", "--key-space", "100000000"]);
        assert!(
            args.validate().is_err(),
            "more keys than 8-byte keys can name"
        );
    }

    #[test]
    fn only_flags_run_the_sections_they_name() {
        let args = Args::parse_from(["tern-bench", "--backup-only", "--cluster"]);
        assert!(!args.single_server() && !args.cluster() && args.backup());
        let args = Args::parse_from(["tern-bench", "--backup-only", "--cluster-only"]);
        assert!(!args.single_server() && args.cluster() && args.backup());
        let args = Args::parse_from(["tern-bench", "--backup", "--cluster"]);
        assert!(args.single_server() && args.cluster() && args.backup());
    }
}
