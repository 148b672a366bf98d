//! `drill`: proof that the newest backup restores into a working cluster.
//! Verify it, restore it into a scratch data dir, start a real
//! `tern-primary` on loopback, and check through the etcd API that it
//! serves the backup's revision, key count and hash. Reports the measured
//! RTO (from the start of the drill to a verified, serving member) and RPO
//! (how old the newest backup was).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tern_learner::backup::manifest::Manifest;
use tern_primary::proto::etcdserverpb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, HashKvRequest, RangeRequest,
};

use crate::restore::{self, Identity};

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub backup: String,
    pub revision: i64,
    pub key_count: u64,
    pub kv_hash: u32,
    /// Seconds from the start of the drill to a verified, serving member.
    pub rto_seconds: f64,
    /// Age of the newest backup when the drill started, in seconds.
    pub rpo_seconds: f64,
}

/// Kills the member when the drill ends, however it ends.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn check_restore(
    started: Instant,
    manifest: &Manifest,
    state: &Path,
    scratch: &Path,
    tern_primary: &Path,
) -> anyhow::Result<DrillReport> {
    let rpo = (chrono::Utc::now() - manifest.finished_at)
        .num_milliseconds()
        .max(0) as f64
        / 1000.0;
    let data_dir = scratch.join("drill.tern");
    restore::into_data_dir(
        state,
        &data_dir,
        &Identity {
            name: "default".into(),
            peer_urls: vec!["http://localhost:2380".into()],
            token: "etcd-cluster".into(),
        },
    )?;
    let (member, endpoint) = start(tern_primary, &data_dir)?;
    let _member = Member(member);
    let channel = connect(&endpoint).await?;
    let mut kv = KvClient::new(channel.clone());
    let count = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .context("counting keys on the restored member")?
        .into_inner();
    let revision = count.header.as_ref().map_or(0, |h| h.revision);
    let hash = MaintenanceClient::new(channel)
        .hash_kv(HashKvRequest {
            revision: manifest.revision,
        })
        .await
        .context("HashKV on the restored member")?
        .into_inner()
        .hash;
    let mut wrong = Vec::new();
    if revision != manifest.revision {
        wrong.push(format!(
            "revision {revision} (backup {})",
            manifest.revision
        ));
    }
    if count.count as u64 != manifest.key_count {
        wrong.push(format!(
            "{} keys (backup {})",
            count.count, manifest.key_count
        ));
    }
    if hash != manifest.kv_hash {
        wrong.push(format!("hash {hash} (backup {})", manifest.kv_hash));
    }
    if !wrong.is_empty() {
        bail!(
            "the restored member does not serve the backup: {}",
            wrong.join(", ")
        );
    }
    Ok(DrillReport {
        backup: manifest.id.clone(),
        revision,
        key_count: count.count as u64,
        kv_hash: hash,
        rto_seconds: started.elapsed().as_secs_f64(),
        rpo_seconds: rpo,
    })
}

/// Start `tern-primary` on the restored dir with free loopback ports;
/// returns it and the client address it reports.
fn start(binary: &Path, data_dir: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(binary)
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-peer-urls",
            "http://127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut last = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving client traffic address=").nth(1) {
                let _ = tx.send(Ok(rest.split_whitespace().next().unwrap_or("").to_string()));
            }
            last = line;
        }
        let _ = tx.send(Err(last));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(address)) => Ok((child, address)),
        Ok(Err(last)) => {
            let _ = child.kill();
            bail!("tern-primary exited on the restored data dir: {last}")
        }
        Err(_) => {
            let _ = child.kill();
            bail!("tern-primary did not start on the restored data dir within 60 s")
        }
    }
}

/// Connect once the member answers (it serves after electing itself).
async fn connect(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let channel = tonic::transport::Channel::from_shared(format!("http://{endpoint}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await;
        match channel {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                bail!("the restored member does not answer on {endpoint}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `tern-primary` next to this binary, else on PATH.
pub fn default_tern_primary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tern-primary")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tern-primary"))
}
