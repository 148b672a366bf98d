//! A real 3-member etcd 3.4 cluster (Debian `etcd-server`) on loopback,
//! with client TLS as Kubernetes runs it: `https://` client URLs, client
//! certificates required (`--client-cert-auth`), plain peers.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::pki::{Ca, Leaf};
use crate::{etcdctl, free_port, wait_serving_with, Output};

pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    /// Each member's command line, to start it again.
    commands: Vec<Vec<String>>,
    /// Each member's data dir.
    pub data_dirs: Vec<std::path::PathBuf>,
    /// `127.0.0.1:port` of each member's client URL.
    pub endpoints: Vec<String>,
    /// etcdctl's TLS flags for the client URLs.
    pub tls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Start `size` members serving `https://` with `server`'s certificate
    /// and requiring client certificates of `ca`; `client` is what etcdctl
    /// presents.
    pub fn start_tls(size: usize, ca: &Ca, server: &Leaf, client: &Leaf) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let s = |p: &Path| p.display().to_string();
        let mut commands = Vec::new();
        let mut data_dirs = Vec::new();
        for (i, (client_port, peer)) in ports.iter().enumerate() {
            let data_dir = dir.path().join(format!("e{i}"));
            let mut command: Vec<String> = ["--name", &format!("e{i}")]
                .iter()
                .map(|a| a.to_string())
                .collect();
            command.extend(["--data-dir".to_string(), s(&data_dir)]);
            command.extend(
                [
                    "--listen-client-urls",
                    &format!("https://127.0.0.1:{client_port}"),
                    "--advertise-client-urls",
                    &format!("https://127.0.0.1:{client_port}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-token",
                    "follow-source",
                    "--initial-cluster-state",
                    "new",
                    "--cert-file",
                    &s(&server.cert),
                    "--key-file",
                    &s(&server.key),
                    "--trusted-ca-file",
                    &s(&ca.cert),
                    "--client-cert-auth",
                ]
                .iter()
                .map(|a| a.to_string()),
            );
            commands.push(command);
            data_dirs.push(data_dir);
        }
        let members = commands.iter().map(|c| Some(spawn(c))).collect();
        let tls = vec![
            "--cacert".to_string(),
            s(&ca.cert),
            "--cert".into(),
            s(&client.cert),
            "--key".into(),
            s(&client.key),
        ];
        let endpoints: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("127.0.0.1:{c}"))
            .collect();
        for e in &endpoints {
            wait_serving_with(e, &tls);
        }
        EtcdCluster {
            members,
            commands,
            data_dirs,
            endpoints,
            tls,
            _dir: dir,
        }
    }

    /// The members still running, as etcdctl's `--endpoints`.
    pub fn live_endpoints(&self) -> String {
        self.endpoints
            .iter()
            .zip(&self.members)
            .filter(|(_, m)| m.is_some())
            .map(|(e, _)| e.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// etcdctl with the cluster's TLS flags against the running members.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_stdin(args, None)
    }

    pub fn etcdctl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut all: Vec<&str> = self.tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        etcdctl(&self.live_endpoints(), &all, stdin)
    }

    /// The index of the member that leads now.
    pub fn leader(&self) -> usize {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        assert_eq!(out.code, 0, "{out:?}");
        let statuses: serde_json::Value = serde_json::from_str(&out.stdout).expect("status json");
        for status in statuses.as_array().expect("array") {
            let s = &status["Status"];
            if s["header"]["member_id"] == s["leader"] {
                let endpoint = status["Endpoint"].as_str().expect("endpoint");
                return self
                    .endpoints
                    .iter()
                    .position(|e| e == endpoint)
                    .expect("known endpoint");
            }
        }
        panic!("no leader among {}", out.stdout);
    }

    /// Start member `i` again (on its data dir as it is now).
    pub fn start_member(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "member {i} is running");
        self.members[i] = Some(spawn(&self.commands[i]));
        wait_serving_with(&self.endpoints[i], &self.tls);
    }

    /// `etcdctl snapshot restore` of `snapshot` into member `i`'s data dir
    /// (stopped), with its own identity: an etcd restored from a backup.
    pub fn restore_member(&mut self, i: usize, snapshot: &Path) {
        assert!(self.members[i].is_none(), "member {i} is running");
        let flag = |name: &str| {
            let c = &self.commands[i];
            let at = c.iter().position(|a| a == name).expect("flag");
            c[at + 1].clone()
        };
        let data_dir = self.data_dirs[i].clone();
        std::fs::remove_dir_all(&data_dir).expect("remove the data dir");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("snapshot")
            .arg("restore")
            .arg(snapshot)
            .args(["--data-dir", &data_dir.display().to_string()])
            .args(["--name", &flag("--name")])
            .args(["--initial-cluster", &flag("--initial-cluster")])
            .args(["--initial-cluster-token", &flag("--initial-cluster-token")])
            .args([
                "--initial-advertise-peer-urls",
                &flag("--initial-advertise-peer-urls"),
            ])
            .output()
            .expect("etcdctl snapshot restore");
        assert!(out.status.success(), "{out:?}");
    }

    /// SIGKILL member `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new("etcd")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd (apt-get install etcd-server)")
}
