//! The restore half of the backup section: the time from the backup the
//! section just took to a new member serving its state, one system at a
//! time, after the servers that were backed up have been stopped.
//!
//! - **etcd**: `etcdctl snapshot restore <file> --data-dir <new dir>
//!   --name ... --initial-cluster ... --initial-advertise-peer-urls ...
//!   --initial-cluster-token ...` on the last `etcdctl snapshot save` file
//!   (it checks the sha256 etcdctl appended and writes a fresh bbolt file
//!   and WAL), then an etcd started on that dir with the same flags.
//! - **Tern**: `tern-restore restore --url file://<store> --identity <key
//!   file> --data-dir <new dir> --name ... --initial-advertise-peer-urls
//!   ... --initial-cluster-token ...` (no backup id: the newest, which is
//!   the last `POST /backup`): it downloads the object, checks size and
//!   sha256, decrypts, decompresses, runs SQLite's integrity check,
//!   recomputes revision, key count and hash against the manifest, and
//!   makes the state a new single-member cluster; then a tern-primary
//!   started on that dir with the same flags.
//!
//! Each run is timed from spawning the restore command to the first
//! linearizable Range on the new member that answers at the backed-up
//! revision (polled every few milliseconds; a read that needs a leader, so
//! the member is serving, not just listening). The rows split that into
//! the restore command and the member's start. After the clock stops, a
//! count of the keys on the new member must equal the keys loaded. The
//! section restores `--backup-runs` times into fresh dirs and reports the
//! median run (by total time).
//!
//! Then `tern-restore drill` runs once against the same store, and its own
//! RTO (drill start to a verified, serving member: verify, replay of the
//! archived log after the backup, restore, start, revision, key count,
//! HashKV and sampled reads through the API) is a row of its own; etcd has
//! no such command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;
use tern_primary::proto::etcdserverpb::kv_client::KvClient;
use tern_primary::proto::etcdserverpb::RangeRequest;

use crate::cluster::{self, MemberFlags};
use crate::load::Settings;
use crate::report::{Metric, Unit};
use crate::servers::{data_dir, free_port, server_dir, Binaries, Server, System};

/// Longest one restore command, or the drill, may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a restored member may take from spawn to serving.
const SERVING_TIMEOUT: Duration = Duration::from_secs(120);
/// The restored member's name and cluster token.
const NAME: &str = "restored";
const TOKEN: &str = "tern-bench-restored";

/// The last `etcdctl snapshot save` file of the backup section, kept for
/// the restore; its directory is removed when this is dropped.
pub struct EtcdSnapshot {
    /// Holds `file`; kept only to be removed on drop.
    pub _dir: TempDir,
    pub file: PathBuf,
    /// etcd's revision when the snapshot was taken.
    pub revision: i64,
}

/// The backup store a tern-learner wrote in the backup section, and the
/// age identity that decrypts it; removed when this is dropped.
pub struct TernBackups {
    /// Holds the store and `identity`; kept only to be removed on drop.
    pub _dir: TempDir,
    /// `file:///...`: the learner's `--backup-url`.
    pub url: String,
    /// The `age-keygen` output whose public key the learner encrypted to.
    pub identity: PathBuf,
    /// The newest backup's revision.
    pub revision: i64,
    /// The learner's lag p99 in ms, without and during a backup.
    pub lag: (f64, f64),
    /// Disaster takeover of that learner once its primary was killed:
    /// seconds until `POST /takeover` answered, and until a put on it was
    /// acknowledged (both from the accepted command's start).
    pub takeover: (f64, f64),
}

/// One restore, split where the member is started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Restored {
    /// The restore command, from spawn to exit.
    pub command: Duration,
    /// From spawning the member to its first answer at the revision.
    pub start: Duration,
}

impl Restored {
    pub fn total(&self) -> Duration {
        self.command + self.start
    }
}

/// The rows of the restore half; `drill_rto` is Tern's drill's own RTO in
/// seconds (`None` for etcd).
pub fn metrics(runs: Vec<Restored>, drill_rto: Option<f64>) -> Result<Vec<Metric>> {
    let run = median(runs).context("no restore was run")?;
    let drill = "tern-restore drill RTO (s)";
    Ok(vec![
        Metric::new(
            "restore to serving (s)",
            Unit::Seconds,
            run.total().as_secs_f64(),
        ),
        Metric::new(
            "restore command (s)",
            Unit::Seconds,
            run.command.as_secs_f64(),
        ),
        Metric::new(
            "restored member start to serving (s)",
            Unit::Seconds,
            run.start.as_secs_f64(),
        ),
        match drill_rto {
            Some(rto) => Metric::new(drill, Unit::Seconds, rto),
            None => Metric::none(drill, Unit::Seconds),
        },
    ])
}

/// `etcdctl snapshot restore` + etcd, `runs` times.
pub async fn etcd(
    bins: &Binaries,
    snapshot: &EtcdSnapshot,
    keys: u64,
    runs: usize,
    settings: &Settings,
) -> Result<Vec<Restored>> {
    let etcdctl = bins
        .etcdctl
        .as_deref()
        .context("the restore needs etcdctl")?;
    let mut restored = Vec::new();
    for i in 1..=runs {
        let run = restore_once(
            System::Etcd,
            bins,
            snapshot.revision,
            keys,
            settings,
            |data, peer| {
                let mut command = tokio::process::Command::new(etcdctl);
                command
                    .env("ETCDCTL_API", "3")
                    .args(["snapshot", "restore"])
                    .arg(&snapshot.file)
                    .arg("--data-dir")
                    .arg(data)
                    .args(["--name", NAME])
                    .arg(format!("--initial-cluster={NAME}={peer}"))
                    .arg(format!("--initial-advertise-peer-urls={peer}"))
                    .arg(format!("--initial-cluster-token={TOKEN}"));
                (command, "etcdctl snapshot restore")
            },
        )
        .await
        .with_context(|| format!("etcd restore {i} of {runs}"))?;
        report(System::Etcd, i, runs, &run, snapshot.revision);
        restored.push(run);
    }
    Ok(restored)
}

/// `tern-restore restore` + tern-primary, `runs` times.
pub async fn tern(
    bins: &Binaries,
    backups: &TernBackups,
    keys: u64,
    runs: usize,
    settings: &Settings,
) -> Result<Vec<Restored>> {
    let tern_restore = bins
        .tern_restore
        .as_deref()
        .context("the restore needs tern-restore")?;
    let mut restored = Vec::new();
    for i in 1..=runs {
        let run = restore_once(
            System::Tern,
            bins,
            backups.revision,
            keys,
            settings,
            |data, peer| {
                let mut command = tokio::process::Command::new(tern_restore);
                command
                    .arg("restore")
                    .args(["--url", &backups.url])
                    .arg("--identity")
                    .arg(&backups.identity)
                    .arg("--data-dir")
                    .arg(data)
                    .args(["--name", NAME])
                    .args(["--initial-advertise-peer-urls", peer])
                    .args(["--initial-cluster-token", TOKEN]);
                (command, "tern-restore restore")
            },
        )
        .await
        .with_context(|| format!("tern restore {i} of {runs}"))?;
        report(System::Tern, i, runs, &run, backups.revision);
        restored.push(run);
    }
    Ok(restored)
}

fn report(system: System, i: usize, runs: usize, run: &Restored, revision: i64) {
    eprintln!(
        "[{system}] restore ({i} of {runs}): serving revision {revision} after {:.2?} (restore command {:.2?}, start {:.2?})",
        run.total(),
        run.command,
        run.start
    );
}

/// One restore into a fresh dir: the command `restore` builds for a data
/// dir and a peer URL, then `system`'s member on that dir until it serves
/// `revision`; then checks it holds `keys` keys.
async fn restore_once(
    system: System,
    bins: &Binaries,
    revision: i64,
    keys: u64,
    settings: &Settings,
    restore: impl FnOnce(&Path, &str) -> (tokio::process::Command, &'static str),
) -> Result<Restored> {
    let name = format!("{system} restored");
    let dir = server_dir(&name)?;
    let data = data_dir(dir.path());
    let client = cluster::loopback_url(free_port()?);
    let peer = cluster::loopback_url(free_port()?);
    let (command, what) = restore(&data, &peer);

    let started = Instant::now();
    let output = run_tool(command, what).await?;
    let command_elapsed = started.elapsed();
    let initial_cluster = format!("{NAME}={peer}");
    let args = MemberFlags {
        name: NAME,
        client: &client,
        listen_peer: &peer,
        advertise_peer: &peer,
        initial_cluster: &initial_cluster,
        state: "new",
        token: TOKEN,
    }
    .to_args();
    let spawned = Instant::now();
    let mut server = Server::spawn_in(dir, system, name, bins.path(system), client, &args)?;
    server
        .wait_serving(revision, SERVING_TIMEOUT)
        .await
        .with_context(|| format!("after {what}, which said: {}", output.trim()))?;
    let run = Restored {
        command: command_elapsed,
        start: spawned.elapsed(),
    };

    let url = server.url().to_string();
    let counted = crate::step(
        &mut server,
        "counting the restored keys",
        count_keys(url, settings.request_timeout),
    )
    .await?;
    ensure!(
        counted == keys,
        "{} holds {counted} keys, not the {keys} backed up",
        server.name()
    );
    Ok(run)
}

/// Runs a restore tool to completion; fails with its stderr if it fails.
/// Returns what it printed.
async fn run_tool(mut command: tokio::process::Command, what: &str) -> Result<String> {
    let output = command.stdin(Stdio::null()).kill_on_drop(true).output();
    let output = tokio::time::timeout(RESTORE_TIMEOUT, output)
        .await
        .with_context(|| format!("`{what}` took over {RESTORE_TIMEOUT:?}"))?
        .with_context(|| format!("running `{what}`"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

/// Keys in the whole key space, by a linearizable count.
async fn count_keys(url: String, request_timeout: Duration) -> Result<u64> {
    let mut kv = KvClient::new(cluster::connect(&url).await?);
    let request = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        count_only: true,
        ..Default::default()
    };
    let response = tokio::time::timeout(request_timeout, kv.range(request))
        .await
        .context("counting keys timed out")??
        .into_inner();
    u64::try_from(response.count).context("a negative key count")
}

/// `tern-restore drill` once against the backup section's store; returns
/// the RTO it reports, in seconds.
pub async fn drill(bins: &Binaries, backups: &TernBackups) -> Result<f64> {
    let tern_restore = bins
        .tern_restore
        .as_deref()
        .context("the drill needs tern-restore")?;
    let mut command = tokio::process::Command::new(tern_restore);
    command
        .arg("drill")
        .args(["--url", &backups.url])
        .arg("--identity")
        .arg(&backups.identity)
        .arg("--tern-primary")
        .arg(&bins.tern)
        .arg("--json");
    let started = Instant::now();
    let stdout = run_tool(command, "tern-restore drill").await?;
    let elapsed = started.elapsed();
    let drill = Drill::parse(&stdout)?;
    ensure!(
        drill.revision >= backups.revision,
        "the drill served revision {}, before the backed-up {}: {stdout}",
        drill.revision,
        backups.revision
    );
    eprintln!(
        "[tern] tern-restore drill: served revision {}, RTO {:.2} s ({elapsed:.2?} with the process around it)",
        drill.revision, drill.rto_seconds
    );
    Ok(drill.rto_seconds)
}

/// The fields of `tern-restore drill --json` the table needs.
#[derive(Debug, PartialEq)]
struct Drill {
    revision: i64,
    rto_seconds: f64,
}

impl Drill {
    fn parse(stdout: &str) -> Result<Drill> {
        let json: serde_json::Value = serde_json::from_str(stdout)
            .with_context(|| format!("`tern-restore drill --json` printed no JSON: {stdout}"))?;
        ensure!(
            json.get("ok").and_then(serde_json::Value::as_bool) == Some(true),
            "the drill did not pass: {stdout}"
        );
        Ok(Drill {
            revision: json
                .get("revision")
                .and_then(serde_json::Value::as_i64)
                .with_context(|| format!("the drill report has no revision: {stdout}"))?,
            rto_seconds: json
                .get("rto_seconds")
                .and_then(serde_json::Value::as_f64)
                .with_context(|| format!("the drill report has no rto_seconds: {stdout}"))?,
        })
    }
}

/// The median run by total time (the later of the middle two for an even
/// count); `None` if there are none.
fn median(mut runs: Vec<Restored>) -> Option<Restored> {
    runs.sort_by_key(Restored::total);
    runs.get(runs.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_drill_report() {
        let report = r#"{
  "ok": true,
  "backup": "20261125T190000.000Z-r300001",
  "backup_revision": 300001,
  "replayed_entries": 3,
  "revision": 300001,
  "key_count": 300000,
  "kv_hash": 1013702223,
  "sampled_reads": 100,
  "rto_seconds": 3.25,
  "rpo_seconds": 4.1
}"#;
        assert_eq!(
            Drill::parse(report).unwrap(),
            Drill {
                revision: 300001,
                rto_seconds: 3.25
            }
        );
        let failed = r#"{"ok": false, "error": "wrong key"}"#;
        let e = Drill::parse(failed).unwrap_err().to_string();
        assert!(e.contains("wrong key"), "{e}");
        assert!(Drill::parse("drill passed: ...").is_err());
    }

    #[test]
    fn median_restore_by_total_time() {
        let run = |command, start| Restored {
            command: Duration::from_millis(command),
            start: Duration::from_millis(start),
        };
        let runs = vec![run(500, 900), run(1000, 100), run(100, 200)];
        assert_eq!(median(runs), Some(run(1000, 100)));
        assert!(median(Vec::new()).is_none());
    }

    #[test]
    fn rows_line_up_with_and_without_a_drill() {
        let runs = vec![Restored {
            command: Duration::from_millis(1500),
            start: Duration::from_millis(500),
        }];
        let etcd = metrics(runs.clone(), None).unwrap();
        let tern = metrics(runs, Some(3.0)).unwrap();
        let names = |m: &[Metric]| m.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&etcd), names(&tern));
        assert_eq!(etcd[0].name, "restore to serving (s)");
        assert!((etcd[0].value - 2.0).abs() < 1e-9);
        assert!(etcd[3].value.is_nan());
        assert!((tern[3].value - 3.0).abs() < 1e-9);
    }
}
