//! Patroni (PostgreSQL high availability, from PyPI) keeps its cluster
//! state in a 3-member Tern cluster through the JSON gateway, unchanged
//! (its `etcd3` store speaks only `/v3/...` JSON): it bootstraps a primary
//! and a streaming replica, rides out the loss of Tern's leader, and fails
//! over to the replica when the primary dies.
//!
//! Needs `patroni` (`$TERN_PATRONI`, `/opt/tern-ci/venv/bin/patroni` or
//! `PATH`;
//! .ci/run installs it) and Debian's PostgreSQL server binaries. PostgreSQL
//! refuses to run as root, so when the tests run as root Patroni runs as
//! `nobody` through `setpriv`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use tern_tests::cluster::Cluster;
use tern_tests::free_port;

const NOBODY: u32 = 65534;

fn patroni_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TERN_PATRONI") {
        return p.into();
    }
    let venv = Path::new("/opt/tern-ci/venv/bin/patroni");
    if venv.exists() {
        return venv.to_path_buf();
    }
    PathBuf::from("patroni")
}

/// The newest PostgreSQL server Debian installed.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (Debian's postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server")
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One Patroni node: its REST API, its PostgreSQL and its directory.
struct Node {
    name: String,
    rest: u16,
    pg: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn start(name: &str, etcd_hosts: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("tern-patroni-")
            .tempdir_in("/tmp")
            .unwrap();
        let (rest, pg) = (free_port(), free_port());
        let d = dir.path().display().to_string();
        let config = format!(
            r#"scope: tern-test
name: {name}
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: {etcd_hosts}
  protocol: http
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 2
    retry_timeout: 5
    maximum_lag_on_failover: 104857600
    postgresql:
      parameters:
        wal_level: replica
        max_wal_senders: 5
  initdb:
    - encoding: UTF8
  pg_hba:
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {d}/data
  bin_dir: {bin}
  pgpass: {d}/pgpass
  authentication:
    replication: {{username: replicator, password: rep}}
    superuser: {{username: postgres, password: pg}}
  parameters:
    unix_socket_directories: {d}
    shared_buffers: 16MB
"#,
            bin = postgres_bin_dir().display(),
        );
        std::fs::write(dir.path().join("patroni.yml"), config).unwrap();
        let mut node = Node {
            name: name.to_string(),
            rest,
            pg,
            dir,
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("patroni.log")).unwrap();
        let mut cmd = if as_root() {
            std::os::unix::fs::chown(self.dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
            std::os::unix::fs::chown(
                self.dir.path().join("patroni.yml"),
                Some(NOBODY),
                Some(NOBODY),
            )
            .unwrap();
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(patroni_bin());
            c
        } else {
            Command::new(patroni_bin())
        };
        cmd.arg(self.dir.path().join("patroni.yml"))
            .env("HOME", self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start patroni ({}): {e}", patroni_bin().display())),
        );
    }

    /// The REST API's status for `/primary` or `/replica`.
    fn role_status(&self, role: &str) -> u16 {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
            ])
            .arg(format!("http://127.0.0.1:{}/{role}", self.rest))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
    }

    fn wait_role(&self, role: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.role_status(role) != 200 {
            assert!(
                Instant::now() < deadline,
                "{} never became {role}; its log:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("patroni.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn psql(&self, sql: &str) -> Output {
        Command::new(postgres_bin_dir().join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.pg.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-At", "-c", sql])
            .output()
            .expect("psql")
    }

    /// SIGKILL Patroni and its PostgreSQL, as a machine dying would.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let pid_file = self.dir.path().join("data/postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            // SAFETY: kill has no memory preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[test]
fn patroni_runs_on_tern_through_the_json_gateway() {
    let mut tern = Cluster::start(3, &[]);
    let hosts: Vec<String> = tern.nodes.iter().map(|n| n.client.clone()).collect();
    let hosts = hosts.join(",");

    let mut primary = Node::start("pg0", &hosts);
    primary.wait_role("primary", Duration::from_secs(90));
    let replica = Node::start("pg1", &hosts);
    replica.wait_role("replica", Duration::from_secs(120));
    let created = primary.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)");
    assert!(created.status.success(), "{created:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while String::from_utf8_lossy(&replica.psql("SELECT x FROM t").stdout).trim() != "42" {
        assert!(
            Instant::now() < deadline,
            "the replica never streamed the row"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Tern loses its leader: Patroni's leader key (a lease of 20 s, renewed
    // every 2 s) must survive through the other members, past its TTL.
    let leader = tern.leader();
    tern.nodes[leader].kill9();
    std::thread::sleep(Duration::from_secs(25));
    assert_eq!(
        primary.role_status("primary"),
        200,
        "{}",
        primary.log_tail()
    );
    assert_eq!(
        replica.role_status("replica"),
        200,
        "{}",
        replica.log_tail()
    );

    // The primary dies: once its leader key expires the replica takes over,
    // with the data.
    primary.kill9();
    replica.wait_role("primary", Duration::from_secs(90));
    let read = replica.psql("SELECT x FROM t");
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        "42",
        "{read:?}"
    );
    // Patroni reports the role as soon as it holds the leader key and has
    // asked PostgreSQL to promote; the promotion itself takes a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let written = replica.psql("INSERT INTO t VALUES (43)");
        if written.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new primary never took writes: {written:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
