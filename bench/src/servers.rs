//! Starting and stopping the two servers under test.
//!
//! Each server is a child process on 127.0.0.1 with a fresh temporary data
//! directory. The [`Server`] guard kills the process and removes the
//! directory when it is dropped, so an error (or Ctrl-C, which drops the
//! running future) never leaves a server behind. The cluster and backup
//! sections start their members through the same guard ([`Server::spawn`]),
//! and the backup section its restored members ([`Server::spawn_in`]).

use std::fmt;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use tern_primary::proto::etcdserverpb::kv_client::KvClient;
use tern_primary::proto::etcdserverpb::RangeRequest;
use tonic::transport::Endpoint;

/// How long a server may take from spawn to answering its first Range.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Server::wait_serving`] probes: the resolution of the
/// restore section's start-to-serving time.
const SERVING_POLL: Duration = Duration::from_millis(5);

/// Which implementation a server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Etcd,
    Tern,
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Etcd => "etcd",
            System::Tern => "tern",
        })
    }
}

/// The executables to benchmark.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub tern: PathBuf,
    /// `tern-learner`; only the cluster and backup sections need it (etcd
    /// is its own learner binary).
    pub tern_learner: Option<PathBuf>,
    /// `etcdctl`; only the cluster and backup sections need it, to add the
    /// learner (and to take etcd's snapshots).
    pub etcdctl: Option<PathBuf>,
    /// `age-keygen`; only the backup section needs it, for the key Tern's
    /// backups are encrypted to (and restored with).
    pub age_keygen: Option<PathBuf>,
    /// `tern-restore`; only the backup section needs it, to restore the
    /// backups it took and to run a drill.
    pub tern_restore: Option<PathBuf>,
}

impl Binaries {
    /// The executable of a voting member of `system`.
    pub fn path(&self, system: System) -> &Path {
        match system {
            System::Etcd => &self.etcd,
            System::Tern => &self.tern,
        }
    }
}

/// Which kind of Range tells that a server is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Needs a leader: a voter that answers one is ready to take writes.
    Linearizable,
    /// All a learner serves (it refuses linearizable reads).
    Serializable,
}

/// A running server. Dropping it kills the process and deletes its data.
pub struct Server {
    system: System,
    /// For messages: the system, and the member's name in a cluster.
    name: String,
    child: Child,
    /// The gRPC endpoint, `http://127.0.0.1:<port>`.
    url: String,
    log_path: PathBuf,
    // Removed after `Drop::drop` has killed the process that writes to it.
    _dir: TempDir,
}

impl Server {
    /// Spawns `system` on free loopback ports and waits until it serves a
    /// Range, so the first measured request never races start-up.
    pub async fn start(system: System, bins: &Binaries) -> Result<Server> {
        let client_port = free_port()?;
        let url = format!("http://127.0.0.1:{client_port}");
        // Both bind a peer port even as a single member; a fresh one keeps
        // them off the default 2380, which may be in use.
        let peer_port = free_port()?;
        let args = [
            "--listen-client-urls".to_string(),
            url.clone(),
            "--advertise-client-urls".to_string(),
            url.clone(),
            "--listen-peer-urls".to_string(),
            format!("http://127.0.0.1:{peer_port}"),
        ];
        let mut server = Server::spawn(system, system.to_string(), bins.path(system), url, &args)?;
        server.wait_ready(Probe::Linearizable).await?;
        Ok(server)
    }

    /// Spawns `bin` with `args` plus `--data-dir` in a fresh temporary
    /// directory, which also holds its log. `url` is the client URL `args`
    /// make it listen on. Returns at once: a cluster member cannot become
    /// ready before the other members are started, so the caller waits
    /// with [`Server::wait_ready`] when it is time.
    pub fn spawn(
        system: System,
        name: String,
        bin: &Path,
        url: String,
        args: &[String],
    ) -> Result<Server> {
        let dir = server_dir(&name)?;
        Server::spawn_in(dir, system, name, bin, url, args)
    }

    /// [`Server::spawn`] in `dir` (from [`server_dir`]), whose [`data_dir`]
    /// may already hold a data dir, such as a restored one. The server owns
    /// `dir` from then on and removes it when it is dropped.
    pub fn spawn_in(
        dir: TempDir,
        system: System,
        name: String,
        bin: &Path,
        url: String,
        args: &[String],
    ) -> Result<Server> {
        let data_dir = data_dir(dir.path());
        let log_path = dir.path().join("server.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;

        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {name} from {}", bin.display()))?;
        Ok(Server {
            system,
            name,
            child,
            url,
            log_path,
            _dir: dir,
        })
    }

    pub fn system(&self) -> System {
        self.system
    }

    /// The system, and the member's name in a cluster ("etcd m1").
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of the server's log, if the process has exited.
    /// Checked between workloads so a crash is reported as a crash rather
    /// than as a table full of errors.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(20)
            ),
            Err(e) => Err(e).context(format!("checking whether {} is running", self.name)),
        }
    }

    /// Resident set size of the server process, from /proc/<pid>/status.
    pub fn rss_bytes(&self) -> Result<u64> {
        self.status_kib("VmRSS").map(|kib| kib * 1024)
    }

    /// The largest resident set size the process has had (VmHWM).
    pub fn peak_rss_bytes(&self) -> Result<u64> {
        self.status_kib("VmHWM").map(|kib| kib * 1024)
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let line = status
            .lines()
            .find(|l| {
                l.strip_prefix(field)
                    .is_some_and(|rest| rest.starts_with(':'))
            })
            .with_context(|| format!("no {field} line in {path}"))?;
        // The line reads "VmRSS:   123456 kB".
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("cannot parse {line:?} in {path}"))
    }

    /// Bytes of the key-value state on disk, the file the quota counts:
    /// etcd's bbolt file (`member/snap/db`), Tern's `state.db`. Neither
    /// counts its log (etcd's `member/wal`, Tern's `raft-log` and the
    /// state's WAL, 64 MiB under steady writes).
    pub fn state_bytes(&self) -> Result<u64> {
        let data = data_dir(self._dir.path());
        let files = match self.system {
            System::Etcd => vec![data.join("member/snap/db")],
            System::Tern => vec![data.join("state.db")],
        };
        let mut total = 0;
        for file in files {
            match std::fs::metadata(&file) {
                Ok(m) => total += m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
            }
        }
        Ok(total)
    }

    /// The last `n` lines of the server's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        match std::fs::read_to_string(&self.log_path) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(cannot read log: {e})"),
        }
    }

    /// Polls with `probe` Ranges until one succeeds; fails if the process
    /// exits or [`READY_TIMEOUT`] passes first.
    pub async fn wait_ready(&mut self, probe: Probe) -> Result<()> {
        self.wait_ready_within(probe, READY_TIMEOUT).await
    }

    /// [`Server::wait_ready`] with another deadline (a learner that joins
    /// by receiving a large snapshot serves once it has applied it).
    pub async fn wait_ready_within(&mut self, probe: Probe, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let endpoint = self.probe_endpoint()?;
        let mut last_error = String::from("no attempt made");
        while Instant::now() < deadline {
            self.ensure_running()?;
            match probe_once(&endpoint, probe).await {
                Ok(_) => return Ok(()),
                Err(e) => last_error = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} did not answer a {probe:?} Range within {timeout:?} (last error: {last_error}); last lines of {}:\n{}",
            self.name,
            self.log_path.display(),
            self.log_tail(20)
        )
    }

    /// Polls with linearizable Ranges, every [`SERVING_POLL`], until one
    /// answers at store revision `revision`: the member is serving that
    /// state. Fails if the process exits, if it answers at a later
    /// revision (nothing writes to it), or if `timeout` passes first.
    pub async fn wait_serving(&mut self, revision: i64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let endpoint = self.probe_endpoint()?;
        let mut last = String::from("no attempt made");
        while Instant::now() < deadline {
            self.ensure_running()?;
            match probe_once(&endpoint, Probe::Linearizable).await {
                Ok(served) if served == revision => return Ok(()),
                Ok(served) if served > revision => bail!(
                    "{} serves revision {served}, past the {revision} it was restored to",
                    self.name
                ),
                Ok(served) => last = format!("at revision {served}"),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(SERVING_POLL).await;
        }
        bail!(
            "{} did not serve revision {revision} within {timeout:?} ({last}); last lines of {}:\n{}",
            self.name,
            self.log_path.display(),
            self.log_tail(20)
        )
    }

    fn probe_endpoint(&self) -> Result<Endpoint> {
        Ok(Endpoint::from_shared(self.url.clone())
            .context("building the readiness endpoint")?
            .connect_timeout(Duration::from_secs(1)))
    }
}

/// A fresh temporary directory for a server called `name`, to hold its
/// data dir ([`data_dir`]) and its log.
pub fn server_dir(name: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("tern-bench-{}-", name.replace(' ', "-")))
        .tempdir()
        .with_context(|| format!("creating a temporary directory for {name}"))
}

/// The data dir a server spawned in `dir` is given.
pub fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGKILL: the data is thrown away, so a graceful stop buys nothing.
        // Errors mean the process is already gone, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Range with a short timeout: the server is up when this succeeds.
/// Returns the store revision it answered at.
async fn probe_once(endpoint: &Endpoint, probe: Probe) -> Result<i64> {
    let channel = endpoint.connect().await.context("connecting")?;
    let mut kv = KvClient::new(channel);
    let request = RangeRequest {
        key: b"bench-ready".to_vec(),
        serializable: probe == Probe::Serializable,
        ..Default::default()
    };
    let response = tokio::time::timeout(Duration::from_secs(1), kv.range(request))
        .await
        .context("Range timed out")?
        .context("Range failed")?
        .into_inner();
    response
        .header
        .map(|h| h.revision)
        .context("Range answered without a header")
}

/// A port that was free a moment ago. The kernel may hand it out again
/// before the server binds it, but on an otherwise idle loopback that race
/// is rare, and a lost race shows up as a clear start-up error.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}
