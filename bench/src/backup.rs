//! The backup section: the time each system takes to write a full backup
//! of the same data set, one system at a time, every process on loopback.
//!
//! - **etcd**: one etcd loaded with `--backup-keys` keys, then `etcdctl
//!   snapshot save` into a local file: etcd streams its bbolt file over
//!   gRPC as it is, neither compressed nor encrypted, so the file's size is
//!   the state's size.
//! - **Tern**: one tern-primary loaded with the same keys, then a
//!   tern-learner added with `etcdctl member add --learner`, writing
//!   backups to a `file://` store in a temporary directory, encrypted to a
//!   fresh age key from `age-keygen`. Once the learner has caught up (a
//!   serializable Range on it shows the leader's revision), `POST /backup`
//!   on its client URL is timed: it answers with the manifest once the
//!   backup is visible, after the consistent image of the state (read
//!   page by page from one read transaction), zstd, age, the upload and
//!   the manifest. The manifest gives the state's size
//!   (`object.raw_size`) and what was stored (`object.size`).
//!
//! Each system takes `--backup-runs` backups in a row and the table shows
//! the median run (by time); throughput is the state's size over that
//! run's time, in MB (10^6 bytes) per second.
//!
//! The last snapshot (etcd) and the store with its age key (Tern) are kept
//! for the section's second half, [`crate::restore`], which runs once the
//! backed-up servers are stopped: the time from that backup to a new
//! member serving it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;
use tern_primary::proto::etcdserverpb::kv_client::KvClient;
use tern_primary::proto::etcdserverpb::{DeleteRangeRequest, PutRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster::{self, MemberFlags, LEARNER_NAME};
use crate::load::{self, Pool, Settings};
use crate::report::{Metric, Unit};
use crate::restore::{self, EtcdSnapshot, TernBackups};
use crate::servers::{free_port, Binaries, Probe, Server, System};
use crate::{count_label, progress};

/// Longest one backup (or etcd snapshot) may take.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest the learner may take to catch up on the loaded keys: it joins
/// after the load, so it replays all of it.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// The primary's member name.
const PRIMARY_NAME: &str = "m0";
/// The bulk load's shape, as for the get keys.
pub const TXN_OPS: u64 = 100;
pub const LOAD_CLIENTS: usize = 16;
const MIB: f64 = 1024.0 * 1024.0;
/// Puts per second to the primary while the learner's lag is measured in
/// the backup section, for [`LAG_DURATION`], its revision read every
/// [`LAG_POLL`].
const LAG_RATE: u64 = 500;
const LAG_DURATION: Duration = Duration::from_secs(5);
const LAG_POLL: Duration = Duration::from_millis(2);

/// The shape of the backup section.
#[derive(Debug, Clone)]
pub struct BackupLoad {
    /// Keys in the data set.
    pub keys: u64,
    /// Backups taken in a row; the median one is reported.
    pub runs: usize,
    /// Pseudo-random (incompressible) values instead of one repeated byte.
    pub random_values: bool,
    /// Connections the bulk load shares.
    pub connections: usize,
}

/// One backup: how long it took, and the sizes it reported.
#[derive(Debug, Clone, Copy)]
struct Run {
    elapsed: Duration,
    /// The state's size: etcd's snapshot file, Tern's SQLite copy.
    state_bytes: u64,
    /// Bytes stored: the same for etcd, compressed and encrypted for Tern.
    stored_bytes: u64,
}

/// The backup section against `system`, backups then restores; returns
/// its rows.
pub async fn bench_system(
    system: System,
    bins: &Binaries,
    load: &BackupLoad,
    settings: &Settings,
) -> Result<Vec<Metric>> {
    // The backed-up servers are gone once these return; only what they
    // wrote is left for the restores.
    let (idle_lag, backup_lag) = (
        "learner lag p99, no backup (ms)",
        "learner lag p99, during a backup (ms)",
    );
    // etcd has no takeover of a running learner (only a restart with
    // --force-new-cluster, on a voter's data).
    let (takeover_answer, takeover_writable) = (
        "POST /takeover on the learner, answered (s)",
        "POST /takeover on the learner, to a put acknowledged (s)",
    );
    let (runs, restores, lag) = match system {
        System::Etcd => {
            let (runs, snapshot) = etcd_snapshots(bins, load, settings).await?;
            eprintln!("[{system}] restoring the last snapshot");
            let restored = restore::etcd(bins, &snapshot, load.keys, load.runs, settings).await?;
            // etcd's learner takes no backups.
            let lag = vec![
                Metric::none(idle_lag, Unit::Millis),
                Metric::none(backup_lag, Unit::Millis),
                Metric::none(takeover_answer, Unit::Seconds),
                Metric::none(takeover_writable, Unit::Seconds),
            ];
            (runs, restore::metrics(restored, None)?, lag)
        }
        System::Tern => {
            let (runs, backups) = tern_backups(bins, load, settings).await?;
            eprintln!("[{system}] restoring the newest backup");
            let restored = restore::tern(bins, &backups, load.keys, load.runs, settings).await?;
            let rto = restore::drill(bins, &backups).await?;
            let lag = vec![
                Metric::new(idle_lag, Unit::Millis, backups.lag.0),
                Metric::new(backup_lag, Unit::Millis, backups.lag.1),
                Metric::new(takeover_answer, Unit::Seconds, backups.takeover.0),
                Metric::new(takeover_writable, Unit::Seconds, backups.takeover.1),
            ];
            (runs, restore::metrics(restored, Some(rto))?, lag)
        }
    };
    let run = median(runs).context("no backup was taken")?;
    let keys = count_label(load.keys);
    let mut metrics = vec![
        Metric::new(
            format!("full backup of {keys} keys (s)"),
            Unit::Seconds,
            run.elapsed.as_secs_f64(),
        ),
        Metric::new(
            "backup throughput (MB/s of state)",
            Unit::MBps,
            run.state_bytes as f64 / 1e6 / run.elapsed.as_secs_f64().max(1e-9),
        ),
        Metric::new("state size (MiB)", Unit::MiB, run.state_bytes as f64 / MIB),
        Metric::new(
            "stored backup size (MiB)",
            Unit::MiB,
            run.stored_bytes as f64 / MIB,
        ),
    ];
    let ratio = "tern compression ratio (state/stored)";
    metrics.push(match system {
        // etcd's snapshot is the state itself.
        System::Etcd => Metric::none(ratio, Unit::Factor),
        System::Tern => Metric::new(
            ratio,
            Unit::Factor,
            run.state_bytes as f64 / run.stored_bytes.max(1) as f64,
        ),
    });
    metrics.extend(restores);
    metrics.extend(lag);
    Ok(metrics)
}

/// One etcd, loaded, then `etcdctl snapshot save` `load.runs` times; the
/// last snapshot is kept for the restores.
async fn etcd_snapshots(
    bins: &Binaries,
    load: &BackupLoad,
    settings: &Settings,
) -> Result<(Vec<Run>, EtcdSnapshot)> {
    let system = System::Etcd;
    let etcdctl = bins
        .etcdctl
        .as_deref()
        .context("the backup section needs etcdctl")?;
    // Declared before the server, so it is removed after the server is
    // dead (locals drop in reverse order).
    let snapshots = tempfile::Builder::new()
        .prefix("tern-bench-etcd-snapshots-")
        .tempdir()
        .context("creating a directory for etcd's snapshots")?;
    eprintln!("[{system}] starting for the backup section");
    let mut server = Server::start(system, bins).await?;
    load_data(&mut server, load, settings).await?;
    // Nothing writes any more: every snapshot is at this revision.
    let mut kv = KvClient::new(cluster::connect(server.url()).await?);
    let revision = cluster::revision(&mut kv, settings.request_timeout)
        .await
        .context("reading etcd's revision")?;

    let url = server.url().to_string();
    let mut runs = Vec::new();
    let mut kept = None;
    for i in 1..=load.runs {
        let file = snapshots.path().join(format!("snapshot-{i}.db"));
        let what = format!("etcdctl snapshot save ({i} of {})", load.runs);
        let started = Instant::now();
        crate::step(&mut server, &what, snapshot_save(etcdctl, &url, &file)).await?;
        let elapsed = started.elapsed();
        let size = std::fs::metadata(&file)
            .with_context(|| format!("reading the size of {}", file.display()))?
            .len();
        eprintln!(
            "[{system}] {what}: {:.1} MiB in {elapsed:.2?} = {:.1} MB/s",
            size as f64 / MIB,
            size as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
        );
        // The restores need the last one; of the others only the size is
        // needed, and the next snapshot needs the disk.
        if let Some(previous) = kept.replace(file) {
            let _ = std::fs::remove_file(previous);
        }
        runs.push(Run {
            elapsed,
            state_bytes: size,
            stored_bytes: size,
        });
    }
    let file = kept.context("no snapshot was taken")?;
    Ok((
        runs,
        EtcdSnapshot {
            _dir: snapshots,
            file,
            revision,
        },
    ))
}

/// `etcdctl snapshot save <file>` against `url`.
async fn snapshot_save(etcdctl: &Path, url: &str, file: &Path) -> Result<()> {
    let output = tokio::process::Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        // The default (5 s) bounds the whole transfer, and a large state
        // takes longer than that.
        .arg(format!("--command-timeout={}s", BACKUP_TIMEOUT.as_secs()))
        .args(["snapshot", "save"])
        .arg(file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BACKUP_TIMEOUT, output)
        .await
        .with_context(|| format!("`etcdctl snapshot save` took over {BACKUP_TIMEOUT:?}"))?
        .with_context(|| format!("running {}", etcdctl.display()))?;
    if !output.status.success() {
        bail!(
            "`etcdctl snapshot save` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// One tern-primary, loaded, then a tern-learner added and caught up;
/// then `POST /backup` on the learner `load.runs` times. The store and the
/// key that decrypts it are kept for the restores.
async fn tern_backups(
    bins: &Binaries,
    load: &BackupLoad,
    settings: &Settings,
) -> Result<(Vec<Run>, TernBackups)> {
    let system = System::Tern;
    let etcdctl = bins
        .etcdctl
        .as_deref()
        .context("the backup section needs etcdctl")?;
    let learner_bin = bins
        .tern_learner
        .as_deref()
        .context("the backup section needs tern-learner")?;
    let age_keygen = bins
        .age_keygen
        .as_deref()
        .context("the backup section needs age-keygen")?;
    // The backup store outlives the learner that writes to it (locals drop
    // in reverse order).
    let store = tempfile::Builder::new()
        .prefix("tern-bench-backup-store-")
        .tempdir()
        .context("creating a directory for the backup store")?;
    // Beside the store, not in it: the learner writes only under `store`.
    let identity = store.path().join("backup-key.txt");
    let recipient = age_key(age_keygen, &identity).await?;
    let url = file_url(&store, "store")?;
    let token = "tern-bench-backup";

    // A member with a name and a peer URL it can be reached at, which the
    // learner needs and the defaults (localhost:2380) would not give.
    eprintln!("[{system}] starting a primary for the backup section");
    let client = cluster::loopback_url(free_port()?);
    let peer = cluster::loopback_url(free_port()?);
    let initial_cluster = format!("{PRIMARY_NAME}={peer}");
    let args = MemberFlags {
        name: PRIMARY_NAME,
        client: &client,
        listen_peer: &peer,
        advertise_peer: &peer,
        initial_cluster: &initial_cluster,
        state: "new",
        token,
    }
    .to_args();
    let mut primary = Server::spawn(
        system,
        format!("{system} primary"),
        &bins.tern,
        client,
        &args,
    )?;
    primary.wait_ready(Probe::Linearizable).await?;
    load_data(&mut primary, load, settings).await?;

    eprintln!("[{system}] adding a learner that writes backups");
    let learner_client = cluster::loopback_url(free_port()?);
    let learner_peer = cluster::loopback_url(free_port()?);
    let initial_cluster = cluster::member_add_learner(
        etcdctl,
        &[primary.url().to_string()],
        LEARNER_NAME,
        &learner_peer,
    )
    .await
    .context("adding a learner to the tern primary")?;
    let mut args = MemberFlags {
        name: LEARNER_NAME,
        client: &learner_client,
        listen_peer: &learner_peer,
        advertise_peer: &learner_peer,
        initial_cluster: &initial_cluster,
        state: "existing",
        token,
    }
    .to_args();
    args.extend([
        "--backup-url".to_string(),
        url.clone(),
        "--backup-recipient".to_string(),
        recipient,
    ]);
    let joining = Instant::now();
    let mut learner = Server::spawn(
        system,
        format!("{system} learner"),
        learner_bin,
        learner_client,
        &args,
    )?;
    learner
        .wait_ready_within(Probe::Serializable, CATCH_UP_TIMEOUT)
        .await?;
    let lag = learner_lag_with_a_backup(&primary, &mut learner, load, settings).await?;

    // Nothing writes any more, so the primary's revision now is the one
    // the learner must reach.
    let mut primary_kv = KvClient::new(cluster::connect(primary.url()).await?);
    let target = cluster::revision(&mut primary_kv, settings.request_timeout)
        .await
        .context("reading the primary's revision")?;
    let mut learner_kv = KvClient::new(cluster::connect(learner.url()).await?);
    crate::step(
        &mut learner,
        "catching up",
        cluster::wait_for_revision(
            &mut learner_kv,
            target,
            CATCH_UP_TIMEOUT,
            settings.request_timeout,
        ),
    )
    .await?;
    eprintln!(
        "[{system}] the learner started and caught up to revision {target} in {:.2?}",
        joining.elapsed()
    );

    let learner_url = learner.url().to_string();
    let mut runs = Vec::new();
    let mut newest = None;
    for i in 1..=load.runs {
        let what = format!("POST /backup ({i} of {})", load.runs);
        let started = Instant::now();
        let body = crate::step(&mut learner, &what, post_backup(&learner_url)).await?;
        let elapsed = started.elapsed();
        let manifest = Manifest::parse(&body)?;
        ensure!(
            manifest.key_count == load.keys,
            "the backup holds {} keys, not the {} loaded; manifest:\n{body}",
            manifest.key_count,
            load.keys
        );
        eprintln!(
            "[{system}] {what}: revision {}, {:.1} MiB of state stored as {:.1} MiB in {elapsed:.2?} = {:.1} MB/s",
            manifest.revision,
            manifest.raw_size as f64 / MIB,
            manifest.size as f64 / MIB,
            manifest.raw_size as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
        );
        runs.push(Run {
            elapsed,
            state_bytes: manifest.raw_size,
            stored_bytes: manifest.size,
        });
        newest = Some(manifest.revision);
    }
    primary.ensure_running()?;
    let revision = newest.context("no backup was taken")?;
    drop(primary);
    let takeover = crate::step(&mut learner, "disaster takeover", take_over(&learner_url)).await?;
    eprintln!(
        "[{system}] POST /takeover with {} keys: answered in {:.3} s, writable {:.3} s after the command",
        load.keys, takeover.0, takeover.1
    );
    Ok((
        runs,
        TernBackups {
            _dir: store,
            url,
            identity,
            revision,
            lag,
            takeover,
        },
    ))
}

/// The learner's lag behind its primary (p99, ms) under [`LAG_RATE`]
/// puts/s: with nothing else going on, then while a backup runs; a backup
/// must not hold up the learner's apply. The lag keys are deleted after,
/// so every later backup holds exactly the loaded keys.
async fn learner_lag_with_a_backup(
    primary: &Server,
    learner: &mut Server,
    load: &BackupLoad,
    settings: &Settings,
) -> Result<(f64, f64)> {
    let system = System::Tern;
    let lag_load = cluster::ClusterLoad {
        voters: 1,
        clients: 1,
        connections: load.connections,
        learner_rtt: Duration::ZERO,
        learner_rate: LAG_RATE,
        learner_duration: LAG_DURATION,
        poll_interval: LAG_POLL,
    };
    let (primary_url, learner_url) = (primary.url().to_string(), learner.url().to_string());
    let idle = crate::step(
        learner,
        "learner lag, no backup",
        cluster::measure_lag(&primary_url, &learner_url, &lag_load, settings),
    )
    .await?;
    let (during, backup) = tokio::join!(
        cluster::measure_lag(&primary_url, &learner_url, &lag_load, settings),
        post_backup(&learner_url)
    );
    let during = crate::step(learner, "learner lag during a backup", async { during }).await?;
    backup.context("the backup taken while the learner's lag was measured")?;
    let (idle, during) = (idle.percentile_ms(0.99), during.percentile_ms(0.99));
    eprintln!(
        "[{system}] learner lag at {LAG_RATE} puts/s, p99: {idle:.3} ms without a backup, \
         {during:.3} ms during one"
    );
    let mut kv = KvClient::new(cluster::connect(&primary_url).await?);
    let prefix = load::key(load::LAG_PREFIX, 0)[..1].to_vec();
    let mut range_end = prefix.clone();
    range_end[0] += 1;
    kv.delete_range(DeleteRangeRequest {
        key: prefix,
        range_end,
        ..Default::default()
    })
    .await
    .context("deleting the lag keys")?;
    Ok((idle, during))
}

/// Writes the data set: `load.keys` keys in txns of [`TXN_OPS`]. Fails if
/// any txn failed, since both systems must back up the same data.
async fn load_data(server: &mut Server, load: &BackupLoad, settings: &Settings) -> Result<()> {
    let system = server.system();
    let pool = Pool::connect(server.url(), load.connections).await?;
    let what = format!(
        "load {} keys for the backup, txns of {TXN_OPS}",
        count_label(load.keys)
    );
    let (random, size, same) = (
        load.random_values,
        settings.value_size,
        load::value(settings.value_size),
    );
    let bulk = load::load_keys_with(
        &pool,
        load::BACKUP_PREFIX,
        load.keys,
        TXN_OPS,
        LOAD_CLIENTS,
        settings,
        move |n| {
            if random {
                load::random_value(n, size)
            } else {
                same.to_vec()
            }
        },
    );
    let r = crate::step(server, &what, bulk).await?;
    progress(system, &what, &r);
    if r.errors > 0 {
        bail!(
            "{} of the txns writing the backup's keys failed; first error: {}",
            r.errors,
            r.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

/// A fresh age X25519 key from `age-keygen -o <file>`, the identity file
/// the restores decrypt with; returns its public half (`age1...`), the
/// learner's recipient.
async fn age_key(age_keygen: &Path, file: &Path) -> Result<String> {
    let output = tokio::process::Command::new(age_keygen)
        .arg("-o")
        .arg(file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", age_keygen.display()))?;
    ensure!(
        output.status.success(),
        "age-keygen failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the key age-keygen wrote to {}", file.display()))?;
    public_key(&text).with_context(|| {
        format!(
            "{} (from age-keygen) has no `# public key: age1...` line",
            file.display()
        )
    })
}

/// The `# public key: age1...` comment `age-keygen` writes above the
/// secret key.
fn public_key(identity_file: &str) -> Option<String> {
    identity_file
        .lines()
        .find_map(|line| line.strip_prefix("# public key: "))
        .map(str::trim)
        .filter(|key| key.starts_with("age1"))
        .map(str::to_string)
}

/// `file:///<dir>/<name>`.
fn file_url(dir: &TempDir, name: &str) -> Result<String> {
    let path = dir.path().join(name);
    let path = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    ensure!(path.starts_with('/'), "{path} is not absolute");
    Ok(format!("file://{path}"))
}

/// `POST /backup` on the learner's client URL (plain HTTP/1.1 on the gRPC
/// port); returns the body, the manifest, which arrives once the backup is
/// visible.
async fn post_backup(url: &str) -> Result<String> {
    let (status, body) = post(url, "/backup").await?;
    ensure!(
        status == 200,
        "POST /backup answered {status}: {}",
        body.trim()
    );
    Ok(body)
}

/// `POST /takeover` on the learner (its primary is gone), asked again
/// while it answers 409 (a leader was heard from within an election
/// timeout); then puts until one is acknowledged. Seconds from the
/// accepted command's start to its answer, and to that put.
async fn take_over(url: &str) -> Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (started, answered) = loop {
        let started = Instant::now();
        let (status, body) = post(url, "/takeover").await?;
        if status == 200 {
            break (started, started.elapsed());
        }
        ensure!(
            status == 409 && Instant::now() < deadline,
            "POST /takeover answered {status}: {}",
            body.trim()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut kv = KvClient::new(cluster::connect(url).await?);
    loop {
        let put = kv
            .put(PutRequest {
                key: b"bench-after-takeover".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            })
            .await;
        if put.is_ok() {
            return Ok((answered.as_secs_f64(), started.elapsed().as_secs_f64()));
        }
        ensure!(
            Instant::now() < deadline,
            "no put acknowledged after the takeover: {put:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `POST path` with an empty body: the status and the body.
async fn post(url: &str, path: &str) -> Result<(u16, String)> {
    let address = url
        .strip_prefix("http://")
        .with_context(|| format!("{url} is not an http:// URL"))?;
    let exchange = async {
        let mut stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .with_context(|| format!("sending POST {path}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .with_context(|| format!("reading the answer to POST {path}"))?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(BACKUP_TIMEOUT, exchange)
        .await
        .with_context(|| format!("POST {path} was not answered within {BACKUP_TIMEOUT:?}"))??;
    response_body(&response, path)
}

/// The status and body of an HTTP/1.1 response with a Content-Length.
fn response_body(response: &[u8], path: &str) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("an HTTP response without a blank line: {text:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("POST {path} answered `{status_line}`"))?;
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "POST {path} answered with a chunked body, which this client does not decode"
    );
    Ok((status, body.to_string()))
}

/// The manifest fields the table needs.
#[derive(Debug, PartialEq, Eq)]
struct Manifest {
    revision: i64,
    key_count: u64,
    /// `object.raw_size`: the SQLite copy before compression.
    raw_size: u64,
    /// `object.size`: what was stored, compressed and encrypted.
    size: u64,
}

impl Manifest {
    fn parse(body: &str) -> Result<Manifest> {
        let json: serde_json::Value = serde_json::from_str(body)
            .with_context(|| format!("POST /backup answered with no JSON manifest: {body}"))?;
        let number = |pointer: &str| {
            json.pointer(pointer)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("the manifest has no {pointer}: {body}"))
        };
        Ok(Manifest {
            revision: json
                .pointer("/revision")
                .and_then(serde_json::Value::as_i64)
                .with_context(|| format!("the manifest has no revision: {body}"))?,
            key_count: number("/key_count")?,
            raw_size: number("/object/raw_size")?,
            size: number("/object/size")?,
        })
    }
}

/// The median run by time (the later of the middle two for an even
/// count); `None` if there are none.
fn median(mut runs: Vec<Run>) -> Option<Run> {
    runs.sort_by_key(|r| r.elapsed);
    runs.get(runs.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_manifest_fields_the_table_needs() {
        let body = r#"{
  "format_version": 1,
  "id": "20261125T181200.123Z-r5001",
  "revision": 5001,
  "key_count": 500000,
  "object": {"name": "x.db.zst.age", "size": 1234, "sha256": "ab", "raw_size": 987654}
}
"#;
        assert_eq!(
            Manifest::parse(body).unwrap(),
            Manifest {
                revision: 5001,
                key_count: 500000,
                raw_size: 987654,
                size: 1234,
            }
        );
        assert!(Manifest::parse("{\"revision\": 1}").is_err());
        assert!(Manifest::parse("backups stopped").is_err());
    }

    #[test]
    fn reads_the_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(response_body(ok, "/backup").unwrap(), (200, "{}".into()));
        let failed = b"HTTP/1.1 409 Conflict\r\ncontent-length: 6\r\n\r\nbusy\r\n";
        assert_eq!(
            response_body(failed, "/takeover").unwrap(),
            (409, "busy\r\n".into())
        );
        assert!(response_body(b"garbage", "/backup").is_err());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}";
        assert!(response_body(chunked, "/backup").is_err());
    }

    #[test]
    fn median_run_by_time() {
        let run = |secs| Run {
            elapsed: Duration::from_secs(secs),
            state_bytes: secs,
            stored_bytes: secs,
        };
        assert_eq!(median(vec![run(3), run(1), run(2)]).unwrap().state_bytes, 2);
        assert_eq!(median(vec![run(4), run(1)]).unwrap().state_bytes, 4);
        assert!(median(Vec::new()).is_none());
    }

    #[test]
    fn finds_the_public_key_in_an_identity_file() {
        let file = "# created: 2026-11-25T22:10:35Z\n\
                    # public key: age1rwwj6865fl5825u42czdd908ep953jla07gxxhmcews3u5ux2yaqydkv93\n\
                    AGE-SECRET-KEY-1XXXX\n";
        assert_eq!(
            public_key(file).as_deref(),
            Some("age1rwwj6865fl5825u42czdd908ep953jla07gxxhmcews3u5ux2yaqydkv93")
        );
        assert_eq!(public_key("AGE-SECRET-KEY-1XXXX\n"), None);
    }

    #[test]
    fn file_urls_have_three_slashes() {
        let dir = tempfile::tempdir().unwrap();
        let url = file_url(&dir, "store").unwrap();
        assert!(url.starts_with("file:///"), "{url}");
        assert!(url.ends_with("/store"), "{url}");
    }
}
