//! A real 3-member etcd 3.4 cluster (Debian `etcd-server`) on loopback,
//! with client TLS as Kubernetes runs it: `https://` client URLs, client
//! certificates required (`--client-cert-auth`), plain peers.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::pki::{Ca, Leaf};
use crate::{etcdctl, free_port, wait_serving_with, Output};

pub struct EtcdCluster {
    members: Vec<Option<Child>>,
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
        let mut members = Vec::new();
        for (i, (client_port, peer)) in ports.iter().enumerate() {
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .args(["--data-dir", &s(&dir.path().join(format!("e{i}")))])
                .args([
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
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd (apt-get install etcd-server)");
            members.push(Some(child));
        }
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
