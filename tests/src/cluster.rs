//! Multi-member clusters of real processes on loopback, each member's peer
//! port behind its own fault-injecting [`Proxy`].
//!
//! Every member advertises its proxy's URL as its peer URL, so all Raft
//! traffic *to* a member crosses that member's proxy: blackholing it cuts
//! the member off from everyone (nothing reaches it, and nothing it sends
//! is answered), and a latency on it delays everything sent to it.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{etcdctl, free_port, spawn_member, wait_serving_with, Output, Proxy};

/// How a cluster's members are reached: plain HTTP unless told otherwise.
/// The servers' own TLS flags (`cert-file`, `peer-cert-file`, ...) go in
/// the members' extra flags.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `https://` peer URLs (listen and advertised). The proxies pass TLS
    /// through untouched.
    pub peer_https: bool,
    /// `https://` client URLs, reached by etcdctl with these flags
    /// (`--cacert`, `--cert`, `--key`).
    pub client_tls: Option<Vec<String>>,
}

impl Options {
    fn peer_scheme(&self) -> &'static str {
        if self.peer_https {
            "https"
        } else {
            "http"
        }
    }

    fn client_scheme(&self) -> &'static str {
        if self.client_tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// One member process.
pub struct Node {
    pub name: String,
    /// `127.0.0.1:port` of the client listener.
    pub client: String,
    /// The proxy in front of this member's peer listener.
    pub proxy: Proxy,
    pub data_dir: PathBuf,
    /// etcdctl's TLS flags for an `https://` client URL; empty for plain.
    pub client_tls: Vec<String>,
    bin: &'static str,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `within` for the process to exit; whether
    /// it did.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: plain kill(2) on a child we own.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// SIGSTOP / SIGCONT: a paused process keeps its sockets open.
    pub fn pause(&self, paused: bool) {
        if let Some(c) = &self.child {
            let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: plain kill(2) on a child we own.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Start again on the same data dir with the same flags plus `extra`.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.kill9();
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, _) = spawn_member(self.bin, &args);
        self.child = Some(child);
    }

    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Start this member's data dir with another binary (disaster
    /// takeover: `tern-primary --force-new-cluster` on a learner's dir).
    pub fn restart_as(&mut self, bin: &'static str, extra: &[&str]) {
        self.bin = bin;
        self.restart_with(extra);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The client URL: `https://` with TLS, the bare address otherwise.
    pub fn url(&self) -> String {
        if self.client_tls.is_empty() {
            self.client.clone()
        } else {
            format!("https://{}", self.client)
        }
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = self.client_tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        etcdctl(&self.url(), &all, None)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    temp: tempfile::TempDir,
    extra: Vec<String>,
    options: Options,
}

impl Cluster {
    /// Start `voters` tern-primary members as a new cluster, with `extra`
    /// flags on each, and wait until every one serves.
    pub fn start(voters: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(voters, Options::default(), extra)
    }

    /// Like [`Cluster::start`], reached as `options` say (TLS on the peer
    /// or client URLs).
    pub fn start_with(voters: usize, options: Options, extra: &[&str]) -> Cluster {
        let peer_scheme = options.peer_scheme();
        let temp = tempfile::tempdir().expect("tempdir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut planned = Vec::new();
        for i in 0..voters {
            let peer_port = free_port();
            let proxy = Proxy::start(format!("127.0.0.1:{peer_port}").parse().unwrap());
            planned.push((format!("m{i}"), peer_port, proxy));
        }
        let initial: Vec<String> = planned
            .iter()
            .map(|(name, _, proxy)| format!("{name}={peer_scheme}://{}", proxy.addr()))
            .collect();
        let initial = initial.join(",");
        let mut nodes = Vec::new();
        for (name, peer_port, proxy) in planned {
            let node = spawn_node(
                "tern-primary",
                &temp,
                name,
                (&options, peer_port, proxy),
                &initial,
                "new",
                &extra,
            );
            nodes.push(node);
        }
        let cluster = Cluster {
            nodes,
            temp,
            extra,
            options,
        };
        for n in &cluster.nodes {
            wait_serving_with(&n.url(), &n.client_tls);
        }
        cluster
    }

    /// Every member's client address (URL with TLS), comma-separated, for
    /// etcdctl.
    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl endpoint status` of one member, as JSON.
    pub fn status(&self, i: usize) -> Option<Value> {
        let out = self.nodes[i].etcdctl(&["endpoint", "status", "-w", "json"]);
        if out.code != 0 {
            return None;
        }
        let v: Value = serde_json::from_str(&out.stdout).ok()?;
        v.get(0).and_then(|e| e.get("Status")).cloned()
    }

    /// The member id a member reports.
    pub fn member_id(&self, i: usize) -> u64 {
        self.status(i)
            .and_then(|s| s["header"]["member_id"].as_u64())
            .expect("member id")
    }

    /// Index of the member that leads now (waits up to 20 s for one).
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            for i in 0..self.nodes.len() {
                if !self.nodes[i].is_running() {
                    continue;
                }
                if let Some(s) = self.status(i) {
                    let leader = s["leader"].as_u64().unwrap_or(0);
                    if leader != 0 && s["header"]["member_id"].as_u64() == Some(leader) {
                        return i;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no leader within 20 s");
    }

    /// `etcdctl member add <name> [--learner]`, then start the member
    /// (`tern-learner` for a learner) with `--initial-cluster-state
    /// existing`. Returns its index; it may still be catching up.
    pub fn add_member(&mut self, learner: bool, extra: &[&str]) -> usize {
        // Only the voters: a learner refuses `member add`, and etcdctl
        // sends it to any endpoint it was given.
        let endpoints = self
            .nodes
            .iter()
            .filter(|n| n.is_running() && n.bin == "tern-primary")
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",");
        self.add_member_through(&endpoints, learner, extra)
    }

    /// [`Cluster::add_member`], asking only the members at `endpoints`
    /// (etcdctl spreads requests over all it is given, and a learner
    /// refuses `member add`).
    pub fn add_member_through(&mut self, endpoints: &str, learner: bool, extra: &[&str]) -> usize {
        let name = format!("m{}", self.nodes.len());
        let peer_port = free_port();
        let proxy = Proxy::start(format!("127.0.0.1:{peer_port}").parse().unwrap());
        let mut args = vec!["member", "add", &name];
        let peer_flag = format!(
            "--peer-urls={}://{}",
            self.options.peer_scheme(),
            proxy.addr()
        );
        if learner {
            args.push("--learner");
        }
        args.push(&peer_flag);
        let mut all: Vec<&str> = self
            .options
            .client_tls
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        all.extend(args);
        let out = etcdctl(endpoints, &all, None);
        assert_eq!(out.code, 0, "member add: {}", out.stderr);
        let initial = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER=\""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("member add prints ETCD_INITIAL_CLUSTER")
            .to_string();
        let mut flags = self.extra.clone();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let bin = if learner {
            "tern-learner"
        } else {
            "tern-primary"
        };
        let node = spawn_node(
            bin,
            &self.temp,
            name,
            (&self.options, peer_port, proxy),
            &initial,
            "existing",
            &flags,
        );
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Wait until every running member reports the same HashKV at the
    /// revision `rev`; returns that hash.
    pub fn converged_hash(&self, members: &[usize], rev: i64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = members
                .iter()
                .map(|&i| hashkv(&self.nodes[i].client, rev))
                .collect::<Vec<_>>();
            if last.iter().all(|h| h.is_some() && *h == last[0]) {
                return last[0].expect("hash");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("members {members:?} did not converge at revision {rev}: {last:?}");
    }
}

/// HashKV of one member at `rev`, if it answers.
pub fn hashkv(client: &str, rev: i64) -> Option<u64> {
    let out = etcdctl(
        client,
        &[
            "endpoint",
            "hashkv",
            "--rev",
            &rev.to_string(),
            "-w",
            "json",
        ],
        None,
    );
    if out.code != 0 {
        return None;
    }
    let v: Value = serde_json::from_str(&out.stdout).ok()?;
    v.get(0)?.get("HashKV")?.get("hash")?.as_u64()
}

/// `peer`: how the cluster is reached, the port the member listens on for
/// peers, and the proxy in front of it (whose address it advertises).
fn spawn_node(
    bin: &'static str,
    temp: &tempfile::TempDir,
    name: String,
    peer: (&Options, u16, Proxy),
    initial: &str,
    state: &str,
    extra: &[String],
) -> Node {
    let (options, peer_port, proxy) = peer;
    let (peer_scheme, client_scheme) = (options.peer_scheme(), options.client_scheme());
    let client_port = free_port();
    let client = format!("127.0.0.1:{client_port}");
    let data_dir = temp.path().join(&name);
    let mut args: Vec<String> = [
        "--name",
        &name,
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        &format!("{client_scheme}://{client}"),
        "--advertise-client-urls",
        &format!("{client_scheme}://{client}"),
        "--listen-peer-urls",
        &format!("{peer_scheme}://127.0.0.1:{peer_port}"),
        "--initial-advertise-peer-urls",
        &format!("{peer_scheme}://{}", proxy.addr()),
        "--initial-cluster",
        initial,
        "--initial-cluster-state",
        state,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let (child, _) = spawn_member(bin, &args);
    Node {
        name,
        client,
        proxy,
        data_dir,
        client_tls: options.client_tls.clone().unwrap_or_default(),
        bin,
        args,
        child: Some(child),
    }
}
