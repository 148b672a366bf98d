//! Support for the cross-process tests: start a real `tern-primary` or a
//! real etcd on loopback, run `etcdctl`, and talk gRPC to either.
//!
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing running.
//!
//! # Layout
//!
//! This file: one member ([`Tern`]), a real etcd ([`Etcd`]), etcdctl, and
//! gRPC helpers. [`cluster`]: multi-member clusters of real processes, each
//! member's peer port behind a fault-injecting [`proxy`]; [`http_faults`]
//! does the same for an object store's HTTP. For proof under faults:
//! [`history`] records what concurrent clients saw (invocation, completion,
//! ok / failed / unknown), [`linearizability`] decides whether such a
//! history is linearizable, [`nemesis`] kills, pauses and partitions
//! members of a running cluster on a schedule, and [`watcher`] follows a
//! prefix across failures to compare with the store's own history.
//! [`rng`] is the seeded generator they share, so a run can be replayed.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
use tonic::transport::Channel;

pub mod backups;
pub mod cluster;
pub mod etcd_cluster;
pub mod history;
pub mod http_faults;
pub mod linearizability;
pub mod nemesis;
pub mod pki;
mod precise_timer;
pub mod proxy;
pub mod rng;
pub mod stores;
pub mod watcher;
pub use proxy::Proxy;

/// A binary built from this workspace, next to the test executable's
/// directory (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// A port for a process that needs its port up front (etcd, cluster
/// peers); tern-primary's client port is bound as port 0 by the member
/// itself, which reports what it got.
///
/// A port from `bind(0)` is only free for a moment: it lies in the kernel's
/// ephemeral range, where every outgoing connection of every test takes its
/// source port, so one may grab it before the member binds it. These ports
/// come from just below that range instead, and each is reserved across the
/// test processes running at once by a lock file held until this process
/// exits (the kernel drops the lock even after a crash).
pub fn free_port() -> u16 {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let span = 12_000.min(ephemeral_low.saturating_sub(1_024));
    let dir = std::env::temp_dir().join("tern-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock dir");
    // Processes start at different points so they rarely meet.
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let port =
            ephemeral_low - 1 - (offset.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .expect("port lock file");
        // SAFETY: flock on a file descriptor we own.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if locked && TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            HELD.lock().unwrap().push(lock);
            return port as u16;
        }
    }
    panic!("no free port below {ephemeral_low}");
}

/// A running tern-primary.
pub struct Tern {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub endpoint: String,
    args: Vec<String>,
    /// etcdctl's TLS flags (`--cacert`, `--cert`, `--key`) when the client
    /// URL is `https://`; empty for plain HTTP.
    pub client_tls: Vec<String>,
    /// Keeps a temporary data dir alive as long as the member.
    _temp: Option<tempfile::TempDir>,
}

impl Tern {
    /// Start a member on a fresh temporary data dir.
    pub fn start(extra: &[&str]) -> Tern {
        let temp = tempfile::tempdir().expect("tempdir");
        let data_dir = temp.path().join("member.tern");
        let mut t = Tern::start_in(&data_dir, extra);
        t._temp = Some(temp);
        t
    }

    /// Start a member on a fresh temporary data dir with an `https://`
    /// client URL, checked for readiness with etcdctl's `client_tls` flags.
    pub fn start_tls(extra: &[&str], client_tls: &[String]) -> Tern {
        let mut flags = vec!["--listen-client-urls", "https://127.0.0.1:0"];
        flags.extend_from_slice(extra);
        let temp = tempfile::tempdir().expect("tempdir");
        let data_dir = temp.path().join("member.tern");
        let mut t = Tern::spawn_in(&data_dir, &flags, client_tls.to_vec());
        t._temp = Some(temp);
        t.wait_ready();
        t
    }

    /// Start a member on `data_dir` (created if missing).
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Tern {
        let t = Tern::spawn_in(data_dir, extra, Vec::new());
        t.wait_ready();
        t
    }

    fn spawn_in(data_dir: &Path, extra: &[&str], client_tls: Vec<String>) -> Tern {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--log-level".into(),
            "info".into(),
        ];
        if !extra.iter().any(|a| a.starts_with("--listen-client-urls")) {
            args.push("--listen-client-urls".into());
            args.push("http://127.0.0.1:0".into());
        }
        // Tests run in parallel: etcd's default peer port would collide.
        if !extra.iter().any(|a| a.starts_with("--listen-peer-urls")) {
            args.push("--listen-peer-urls".into());
            args.push("http://127.0.0.1:0".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, endpoint) = spawn_tern(&args);
        Tern {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            endpoint,
            args,
            client_tls,
            _temp: None,
        }
    }

    fn wait_ready(&self) {
        if self.client_tls.is_empty() {
            wait_serving(&self.endpoint);
        } else {
            wait_serving_with(&self.url(), &self.client_tls);
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.client_tls.is_empty() {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.endpoint)
    }

    /// etcdctl against this member, with its TLS flags if it has any.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = self.client_tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        etcdctl(&self.url(), &all, None)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same data dir and flags (a new port if it was 0).
    pub fn restart(&mut self) {
        self.kill9();
        let (child, endpoint) = spawn_tern(&self.args);
        self.child = Some(child);
        self.endpoint = endpoint;
        self.wait_ready();
    }

    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(channel(&self.endpoint).await)
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Spawn tern-primary and wait for the address it serves on.
fn spawn_tern(args: &[String]) -> (Child, String) {
    spawn_member("tern-primary", args)
}

/// Spawn a member binary (`tern-primary` or `tern-learner`) and wait for
/// the client address it reports binding (it may serve later: a member
/// answers clients only once it has joined).
pub fn spawn_member(bin: &str, args: &[String]) -> (Child, String) {
    let mut child = Command::new(workspace_bin(bin))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern-primary");
    let stderr = child.stderr.take().expect("stderr piped");
    let mut log = member_log(args).and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(file) = log.as_mut() {
                use std::io::Write;
                let _ = writeln!(file, "{line}");
            }
            if !sent {
                if let Some(rest) = line.split("serving client traffic address=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(Ok(addr));
                    sent = true;
                    continue;
                }
            }
            if std::env::var_os("TERN_TEST_LOGS").is_some() {
                eprintln!("[tern] {line}");
            }
            if !sent
                && (line.contains("ERROR")
                    || line.starts_with("error")
                    || line.starts_with("Error"))
            {
                let _ = tx.send(Err(line.clone()));
            }
        }
        let _ = tx.send(Err("tern-primary exited before serving".into()));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addr)) => (child, addr),
        Ok(Err(e)) => {
            let _ = child.kill();
            panic!("tern-primary failed to start: {e}")
        }
        Err(_) => {
            let _ = child.kill();
            panic!("tern-primary did not report its address within 30 s")
        }
    }
}

/// Where a member started with `args` logs, when the test process has
/// `TERN_TEST_MEMBER_LOGS` set: `<data dir>.log`, beside its data dir (so a
/// test can read what a member wrote, e.g. that it logged no secret).
/// Opt-in, so a member on a deliberately small disk never shares it with
/// a log.
pub fn member_log(args: &[String]) -> Option<PathBuf> {
    std::env::var_os("TERN_TEST_MEMBER_LOGS")?;
    let dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--data-dir=").map(str::to_string))
        })?;
    Some(PathBuf::from(format!("{dir}.log")))
}

/// Poll until a serializable Range succeeds and a leader exists.
pub fn wait_serving(endpoint: &str) {
    wait_serving_with(endpoint, &[]);
}

/// [`wait_serving`] with extra etcdctl flags (TLS: `--cacert`, `--cert`,
/// `--key`).
pub fn wait_serving_with(endpoint: &str, flags: &[String]) {
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["endpoint", "health"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = etcdctl(endpoint, &args, None);
        // With auth on, the health check's read is refused for want of a
        // user: an answer all the same, from a member that serves.
        if out.code == 0 || out.stderr.contains("etcdserver: user name is empty") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{endpoint} not healthy within 30 s");
}

pub async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect")
}

/// A real etcd 3.4 (Debian `etcd-server`) with the default member identity,
/// so its ids equal tern-primary's defaults.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("etcd");
        Etcd::spawn(&data_dir, dir)
    }

    /// Start on an existing data dir (one `etcdctl snapshot restore` made,
    /// say), which must stay alive as long as the server.
    pub fn start_in(data_dir: &Path) -> Etcd {
        // Only holds the handle's place; the data dir is the caller's.
        let dir = tempfile::tempdir().expect("tempdir");
        Etcd::spawn(data_dir, dir)
    }

    fn spawn(data_dir: &Path, dir: tempfile::TempDir) -> Etcd {
        let port = free_port();
        let peer = free_port();
        let endpoint = format!("127.0.0.1:{port}");
        let child = Command::new("etcd")
            .args([
                "--data-dir",
                &data_dir.display().to_string(),
                "--listen-client-urls",
                &format!("http://{endpoint}"),
                "--advertise-client-urls",
                &format!("http://{endpoint}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server)");
        wait_serving(&endpoint);
        Etcd {
            child,
            endpoint,
            _dir: dir,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What etcdctl printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The `Error: ...` line etcdctl ends with on failure (retry warnings
    /// before it carry timestamps and differ run to run).
    pub fn error_line(&self) -> String {
        self.stderr
            .lines()
            .rfind(|l| l.starts_with("Error:"))
            .unwrap_or("")
            .to_string()
    }
}

/// Run etcdctl (API v3) against `endpoint`.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--command-timeout=10s")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .expect("spawn etcdctl (apt-get install etcd-client)");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin piped");
        pipe.write_all(input.as_bytes())
            .expect("write etcdctl stdin");
    }
    let out = child.wait_with_output().expect("etcdctl output");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run a long-running etcdctl command (watch, keep-alive) for `for_how_long`
/// and return what it printed by then.
pub fn etcdctl_for(endpoint: &str, args: &[&str], for_how_long: Duration) -> Output {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn etcdctl");
    std::thread::sleep(for_how_long);
    // SIGTERM, not SIGINT: a shell starts background jobs with SIGINT
    // ignored, and a Go program keeps an inherited ignored SIGINT, so under
    // `.ci/run &` an interrupted etcdctl went on watching and this waited
    // for it forever. SIGKILL if it still has not gone after a grace
    // period, so a stuck etcdctl fails the test instead of hanging it.
    // SAFETY: plain kill(2) on a child we own, not yet waited for.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("etcdctl status").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("etcdctl output");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Read one key through gRPC (serializable), for checks after a crash.
pub async fn get(kv: &mut KvClient<Channel>, key: &str) -> Option<Vec<u8>> {
    let resp = kv
        .range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

/// A plain HTTP/1.1 GET (for `/health` and `/metrics`): the whole response,
/// status line and headers included.
pub fn http_get(endpoint: &str, path: &str) -> String {
    http_exchange(endpoint, "GET", path)
}

/// `POST path` with an empty body: the status code and the body.
pub fn http_post(endpoint: &str, path: &str) -> (u16, String) {
    let response = http_exchange(endpoint, "POST", path);
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (code, body)
}

/// One HTTP/1.1 request with no body; the whole response as text.
fn http_exchange(endpoint: &str, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(endpoint).expect("connect");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// The value of an unlabelled metric in a member's `/metrics`.
pub fn metric(endpoint: &str, name: &str) -> Option<f64> {
    http_get(endpoint, "/metrics").lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The store revision a member reports (linearizable Range header).
pub fn current_revision(endpoint: &str) -> i64 {
    let out = etcdctl(endpoint, &["get", "x", "-w", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    v["header"]["revision"].as_i64().expect("revision")
}

/// Write keys `{prefix}{n:06}` for n in `0..count`, in txns of 100 puts,
/// from `clients` concurrent clients; `value(n)` gives each value.
pub async fn bulk_write(
    endpoint: &str,
    prefix: &str,
    count: usize,
    clients: usize,
    value: impl Fn(usize) -> Vec<u8> + Clone + Send + 'static,
) {
    use tern_primary::proto::etcdserverpb::{request_op, PutRequest, RequestOp, TxnRequest};
    let per_client = count / clients;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let endpoint = endpoint.to_string();
        let prefix = prefix.to_string();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel(&endpoint).await);
            let start = c * per_client;
            for chunk in (start..start + per_client).collect::<Vec<_>>().chunks(100) {
                let success = chunk
                    .iter()
                    .map(|&n| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: format!("{prefix}{n:06}").into_bytes(),
                            value: value(n),
                            ..Default::default()
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    success,
                    ..Default::default()
                })
                .await
                .expect("bulk txn");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

/// A small tmpfs mounted for one test and unmounted when dropped: a
/// filesystem that really fills up. Needs root (CI runs as root).
pub struct SmallFilesystem {
    pub path: PathBuf,
}

impl SmallFilesystem {
    pub fn mount(path: PathBuf, size: &str) -> SmallFilesystem {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs (this test needs root): {out:?}"
        );
        SmallFilesystem { path }
    }

    /// Grow it: the operator frees space.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .expect("mount");
        assert!(out.status.success(), "remount: {out:?}");
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A real etcd and a tern-primary side by side, for etcdctl sessions that
/// must print the same on both.
pub struct Pair {
    pub etcd: Etcd,
    pub tern: Tern,
}

impl Pair {
    pub fn start() -> Pair {
        Pair::start_with(&[])
    }

    /// Start both; `extra` are more flags for tern.
    pub fn start_with(extra: &[&str]) -> Pair {
        // The client port is picked up front (it is advertised); another
        // test's process may take it before tern binds it, so try again
        // with a new one.
        let mut attempt = 0;
        let tern = loop {
            attempt += 1;
            let url = format!("http://127.0.0.1:{}", free_port());
            let started = std::panic::catch_unwind(|| {
                let listen = format!("--listen-client-urls={url}");
                let advertise = format!("--advertise-client-urls={url}");
                let mut args = vec![listen.as_str(), advertise.as_str()];
                args.extend_from_slice(extra);
                Tern::start(&args)
            });
            match started {
                Ok(tern) => break tern,
                Err(_) if attempt < 3 => continue,
                Err(e) => std::panic::resume_unwind(e),
            }
        };
        Pair {
            etcd: Etcd::start(),
            tern,
        }
    }

    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> (Output, Output) {
        let e = normalize(
            etcdctl(&self.etcd.endpoint, args, stdin),
            &self.etcd.endpoint,
        );
        let t = normalize(
            etcdctl(&self.tern.endpoint, args, stdin),
            &self.tern.endpoint,
        );
        (e, t)
    }

    /// Run on both and require the same exit code, stdout and error line.
    pub fn same(&self, args: &[&str]) -> Output {
        self.same_stdin(args, None)
    }

    pub fn same_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let (e, t) = self.run(args, stdin);
        assert_eq!(
            (e.code, &e.stdout, e.error_line()),
            (t.code, &t.stdout, t.error_line()),
            "etcdctl {args:?}: etcd (left) and tern (right) differ"
        );
        t
    }

    /// Grant the same lease id on both (etcdctl cannot choose an id).
    pub async fn grant(&self, id: i64, ttl: i64) {
        for endpoint in [&self.etcd.endpoint, &self.tern.endpoint] {
            tern_primary::proto::etcdserverpb::lease_client::LeaseClient::new(
                channel(endpoint).await,
            )
            .lease_grant(tern_primary::proto::etcdserverpb::LeaseGrantRequest { ttl, id })
            .await
            .expect("lease grant");
        }
    }
}

/// Hide what legitimately differs between two servers: the endpoint and
/// elapsed times.
pub fn normalize(mut out: Output, endpoint: &str) -> Output {
    for text in [&mut out.stdout, &mut out.stderr] {
        *text = text.replace(endpoint, "ENDPOINT");
        if let Some(at) = text.find("took = ") {
            let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
            text.replace_range(at..end, "took = T");
        }
        if let Some(at) = text.find("\"took\":\"") {
            let start = at + 8;
            let end = text[start..].find('"').map_or(text.len(), |n| start + n);
            text.replace_range(start..end, "T");
        }
    }
    out
}

/// Users for auth tests: root, and alice with read on /a/ (and /a/x
/// written). The etcdctl commands that make them (auth still off).
pub const ALICE_READS_A: &[&[&str]] = &[
    &["user", "add", "root", "--new-user-password=rootpw"],
    &["user", "grant-role", "root", "root"],
    &["role", "add", "reader"],
    &[
        "role",
        "grant-permission",
        "reader",
        "read",
        "/a/",
        "--prefix",
    ],
    &["user", "add", "alice", "--new-user-password=alicepw"],
    &["user", "grant-role", "alice", "reader"],
    &["put", "/a/x", "1"],
];
