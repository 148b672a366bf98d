//! `drill`: proof that the newest backup restores into a working cluster.
//! Verify it, replay the archived log after it, restore into a scratch
//! data dir, start a real `tern-primary` on loopback, and check through
//! the etcd API that it serves the restored revision, key count, hash and
//! a sample of keys. Reports the measured RTO (from the start of the drill
//! to a verified, serving member) and RPO (how old the newest restorable
//! state was), optionally as textfile-collector metrics.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tern_learner::backup::target::Target;
use tern_primary::mvcc::read;
use tern_primary::proto::etcdserverpb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, HashKvRequest, RangeRequest,
};

use crate::replay::{self, Chain, Until};
use crate::restore::{self, Identity};
use crate::{catalog, verify};

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub ok: bool,
    pub backup: String,
    pub backup_revision: i64,
    /// Archived log entries replayed after the backup.
    pub replayed_entries: u64,
    pub revision: i64,
    pub key_count: u64,
    pub kv_hash: u32,
    /// Keys read back through the API and compared with the restored state.
    pub sampled_reads: usize,
    /// Seconds from the start of the drill (download) to a verified,
    /// serving member.
    pub rto_seconds: f64,
    /// Seconds between the newest restorable state (the newest archived
    /// segment, else the backup) and the start of the drill.
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

/// Keys read back through the API on the restored member.
const SAMPLE: usize = 100;

/// What the restored state holds, computed from the file itself: what the
/// member must serve.
struct Expected {
    revision: i64,
    key_count: u64,
    kv_hash: u32,
    sample: Vec<(Vec<u8>, Vec<u8>, i64)>,
}

fn expected(state: &Path) -> anyhow::Result<Expected> {
    // Opened for writing: a backup in an older format is migrated here, in
    // the drill's scratch copy, as the member started on it would.
    let conn = tern_primary::mvcc::schema::open(state)?;
    let store = read::store_state(&conn)?;
    let key_count = read::key_count(&conn)?;
    let kv_hash = read::hash(&conn, store.revision, store.compact_revision)?;
    let mut stmt =
        // Sample the keys first, so only the sampled values are read.
        conn.prepare(
            "SELECT k.key, h.value, k.mod_revision \
             FROM (SELECT key, mod_revision, history_id FROM kv_keys ORDER BY random() LIMIT ?1) k \
             JOIN kv_history h ON h.id = k.history_id",
        )?;
    let sample = stmt
        .query_map([SAMPLE as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(Expected {
        revision: store.revision,
        key_count: key_count as u64,
        kv_hash,
        sample,
    })
}

/// The whole drill: verify backup `id` (default: the newest), replay the
/// archived log after it, restore into a scratch dir, serve, check.
pub async fn run(
    target: &Target,
    identities: &[age::x25519::Identity],
    id: Option<&str>,
    tern_primary: &Path,
    json: bool,
) -> anyhow::Result<DrillReport> {
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let manifest = catalog::find(target, id).await?;
    let scratch = tempfile::tempdir()?;
    let (state, _) = verify::verify(
        target,
        &manifest,
        identities,
        scratch.path(),
        &crate::progress::bytes_bar(json),
    )
    .await?;
    let chain = Chain::after(&replay::archived(target).await?, manifest.raft_index);
    if let Some(gap) = chain.gap_error() {
        bail!("{gap}");
    }
    let bar = crate::progress::count_bar(json, "replaying log segments");
    let replayed = replay::replay(target, &chain, identities, &state, Until::End, &bar).await?;
    bar.finish_and_clear();
    if let Some(named) = chain.segments.last().and_then(|s| s.name.revision) {
        if replayed.revision != named {
            bail!(
                "replaying the archived log reached revision {}, but its last segment says {named}",
                replayed.revision
            );
        }
    }
    let restorable_at = chain
        .stored_until()
        .unwrap_or(manifest.finished_at)
        .max(manifest.finished_at);
    let rpo = (started_at - restorable_at).num_milliseconds().max(0) as f64 / 1000.0;
    let want = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || expected(&state)).await??
    };
    let data_dir = scratch.path().join("drill.tern");
    restore::into_data_dir(
        &state,
        &data_dir,
        &Identity {
            name: "default".into(),
            peer_urls: vec!["http://localhost:2380".into()],
            token: "etcd-cluster".into(),
        },
    )?;
    // The drill reads as no user; a backup taken with auth on would refuse
    // that. The scratch copy is the drill's alone, so auth goes off in it.
    {
        let conn = tern_primary::mvcc::schema::open(&data_dir.join("state.db"))?;
        tern_primary::auth::store::switch_off(&conn)?;
    }
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
            revision: want.revision,
        })
        .await
        .context("HashKV on the restored member")?
        .into_inner()
        .hash;
    let mut wrong = Vec::new();
    if revision != want.revision {
        wrong.push(format!("revision {revision} (restored {})", want.revision));
    }
    if count.count as u64 != want.key_count {
        wrong.push(format!(
            "{} keys (restored {})",
            count.count, want.key_count
        ));
    }
    if hash != want.kv_hash {
        wrong.push(format!("hash {hash} (restored {})", want.kv_hash));
    }
    for (key, value, mod_revision) in &want.sample {
        let got = kv
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .context("reading a sampled key on the restored member")?
            .into_inner();
        match got.kvs.first() {
            Some(kv) if kv.value == *value && kv.mod_revision == *mod_revision => {}
            _ => wrong.push(format!(
                "key {:?} does not read back as restored",
                String::from_utf8_lossy(key)
            )),
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the restored member does not serve the restored state: {}",
            wrong.join(", ")
        );
    }
    Ok(DrillReport {
        ok: true,
        backup: manifest.id.clone(),
        backup_revision: manifest.revision,
        replayed_entries: replayed.entries,
        revision,
        key_count: count.count as u64,
        kv_hash: hash,
        sampled_reads: want.sample.len(),
        rto_seconds: started.elapsed().as_secs_f64(),
        rpo_seconds: rpo,
    })
}

/// The drill's outcome as Prometheus text for node_exporter's textfile
/// collector, written to a temporary file and renamed over `path` so the
/// collector never reads half a file. A failed drill keeps the last
/// success time and sets `tern_drill_success` to 0.
pub fn write_metrics(path: &Path, report: Option<&DrillReport>) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let previous_success = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("tern_drill_last_success_timestamp_seconds "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        ));
    };
    gauge(
        "tern_drill_last_run_timestamp_seconds",
        "Unix time the last restore drill ran",
        now,
    );
    gauge(
        "tern_drill_success",
        "Whether the last restore drill passed (1) or failed (0)",
        f64::from(u8::from(report.is_some())),
    );
    gauge(
        "tern_drill_last_success_timestamp_seconds",
        "Unix time of the last restore drill that passed",
        if report.is_some() {
            now
        } else {
            previous_success
        },
    );
    if let Some(r) = report {
        gauge(
            "tern_drill_rto_seconds",
            "Seconds from download to a verified, serving member in the last drill",
            r.rto_seconds,
        );
        gauge(
            "tern_drill_rpo_seconds",
            "Age of the newest restorable state when the last drill started",
            r.rpo_seconds,
        );
        gauge(
            "tern_drill_restored_revision",
            "Store revision the last drill restored and served",
            r.revision as f64,
        );
    }
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
