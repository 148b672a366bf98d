//! `tern-appliance`: the whole product on one machine, on embedded
//! defaults, so a newcomer sees it work at once.
//!
//! - a primary (`tern-primary`) on 127.0.0.1:2379;
//! - a learner (`tern-learner`) on 127.0.0.1:12379, registered with it
//!   (`member add --learner`) on first run, backing up every hour to
//!   `<dir>/backups` with retention, encrypted to an age key generated on
//!   first run (`<dir>/age-identity.txt`, written 0600);
//! - a backup and a restore drill as soon as the learner serves, then a
//!   drill every hour.
//!
//! The members are real processes: this same executable started again
//! with [`ROLE_ENV`] naming the role, so one `cargo run` builds everything
//! it runs. A member that exits stops the appliance, and Ctrl-C or SIGTERM
//! stops the members (SIGTERM, as systemd would).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use age::secrecy::ExposeSecret;
use anyhow::{bail, Context};
use clap::Parser;
use tern_learner::backup::target::{S3Options, Target};
use tern_primary::proto::etcdserverpb::cluster_client::ClusterClient;
use tern_primary::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tern_primary::proto::etcdserverpb::{MemberAddRequest, MemberListRequest, StatusRequest};
use tokio::process::{Child, Command};

use crate::drill;

/// Set in a member process this executable starts: `primary` or
/// `learner`. The drill's restored member is started the same way.
pub const ROLE_ENV: &str = "TERN_APPLIANCE_ROLE";

const LEARNER_NAME: &str = "learner";

/// Flags of `tern-appliance`; every one has an embedded default.
#[derive(Debug, Parser)]
#[command(
    name = "tern-appliance",
    version,
    about = "A primary, a learner with hourly encrypted backups, and hourly restore drills, on one machine."
)]
pub struct Settings {
    /// Where everything lives: data dirs, backups, the age key, logs.
    #[arg(long, default_value = "tern-appliance")]
    pub dir: PathBuf,
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub primary_client_url: url::Url,
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    pub primary_peer_url: url::Url,
    #[arg(long, default_value = "http://127.0.0.1:12379")]
    pub learner_client_url: url::Url,
    #[arg(long, default_value = "http://127.0.0.1:12380")]
    pub learner_peer_url: url::Url,
    /// The learner's backups (cron, 5 or 6 fields).
    #[arg(long, default_value = "0 * * * *")]
    pub backup_schedule: String,
    /// Restore drills of the newest backup (cron, 6 fields with seconds).
    #[arg(long, default_value = "0 30 * * * *")]
    pub drill_schedule: String,
}

/// In a member process this executable started: run that member.
pub fn member_role() -> Option<anyhow::Result<()>> {
    let role = std::env::var(ROLE_ENV).ok()?;
    Some(match role.as_str() {
        "primary" => {
            let config =
                tern_config::PrimaryConfig::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
            tern_primary::launch::launch(config, tern_primary::server::Role::Primary)
        }
        "learner" => {
            let config =
                tern_config::LearnerConfig::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
            match tern_learner::backup::extension(&config.backup) {
                Ok(backups) => tern_primary::launch::launch_with(
                    config.member,
                    tern_primary::server::Role::Learner,
                    backups,
                ),
                Err(e) => Err(e.into()),
            }
        }
        other => Err(anyhow::anyhow!("{ROLE_ENV}={other}: not a role")),
    })
}

/// The appliance: start, report, supervise until stopped.
pub fn main(settings: Settings) -> ExitCode {
    // Every process this one starts without naming a role (the drill's
    // restored member) is a primary.
    std::env::set_var(ROLE_ENV, "primary");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.dir)
        .with_context(|| format!("creating {}", settings.dir.display()))?;
    let dir = std::fs::canonicalize(&settings.dir)?;
    let (identity, key_path, generated) = age_key(&dir)?;
    let recipient = identity.to_public().to_string();
    if generated {
        println!(
            "generated an age key for the backups: {} (private, mode 0600; keep a copy off \
             this machine: without it no backup can be restored)",
            key_path.display()
        );
    }
    let backups = dir.join("backups");
    std::fs::create_dir_all(&backups)?;
    let backup_url = url::Url::from_directory_path(&backups)
        .map_err(|()| anyhow::anyhow!("{} is not an absolute path", backups.display()))?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let url = |u: &url::Url| u.as_str().trim_end_matches('/').to_string();
    let (primary_url, primary_peer) = (
        url(&settings.primary_client_url),
        url(&settings.primary_peer_url),
    );
    let (learner_url, learner_peer) = (
        url(&settings.learner_client_url),
        url(&settings.learner_peer_url),
    );

    let mut primary = spawn(
        &exe,
        "primary",
        &dir,
        &[
            "--name=primary".into(),
            format!("--data-dir={}", dir.join("primary.tern").display()),
            format!("--listen-client-urls={primary_url}"),
            format!("--advertise-client-urls={primary_url}"),
            format!("--listen-peer-urls={primary_peer}"),
            format!("--initial-advertise-peer-urls={primary_peer}"),
            format!("--initial-cluster=primary={primary_peer}"),
        ],
    )?;
    let channel = serving(&primary_url, &mut primary, &dir, "primary").await?;
    register_learner(channel, &learner_peer).await?;
    let mut learner = spawn(
        &exe,
        "learner",
        &dir,
        &[
            format!("--name={LEARNER_NAME}"),
            format!("--data-dir={}", dir.join("learner.tern").display()),
            format!("--listen-client-urls={learner_url}"),
            format!("--advertise-client-urls={learner_url}"),
            format!("--listen-peer-urls={learner_peer}"),
            format!("--initial-advertise-peer-urls={learner_peer}"),
            format!("--initial-cluster=primary={primary_peer},{LEARNER_NAME}={learner_peer}"),
            "--initial-cluster-state=existing".into(),
            format!("--backup-url={backup_url}"),
            format!("--backup-recipient={recipient}"),
            format!("--backup-schedule={}", settings.backup_schedule),
            "--backup-keep-hourly=24".into(),
            "--backup-keep-daily=7".into(),
        ],
    )?;
    serving(&learner_url, &mut learner, &dir, "learner").await?;

    println!(
        "tern-appliance is up; everything lives in {}",
        dir.display()
    );
    println!("  primary  {primary_url}  (log: primary.log)");
    println!("  learner  {learner_url}  reads and watches; backups (log: learner.log)");
    println!(
        "  backups  {backup_url}  on '{}', kept 24 hourly and 7 daily, encrypted to {recipient}",
        settings.backup_schedule
    );
    println!("  age key  {}", key_path.display());
    println!(
        "  drills   on '{}': restore the newest backup into a scratch member and check it",
        settings.drill_schedule
    );
    println!("try: etcdctl --endpoints={primary_url} put hello world");
    println!(
        "     etcdctl --endpoints={learner_url} get hello --consistency=s    # on the learner"
    );

    // A first backup and drill now: the newcomer sees both work.
    let target = Target::open(backup_url.as_str(), &S3Options::default())?;
    match backup_now(&learner_url).await {
        Ok(summary) => println!("first backup: {summary}"),
        Err(e) => println!("first backup failed: {e:#}"),
    }
    run_drill(&target, &identity, &exe).await;
    let scheduler = schedule_drills(&settings.drill_schedule, target, identity, exe).await?;

    let outcome = tokio::select! {
        status = primary.wait() => Err(anyhow::anyhow!("the primary exited ({}); see {}", describe(status), dir.join("primary.log").display())),
        status = learner.wait() => Err(anyhow::anyhow!("the learner exited ({}); see {}", describe(status), dir.join("learner.log").display())),
        () = stop_signal() => Ok(()),
    };
    drop(scheduler);
    println!("stopping");
    for child in [&mut learner, &mut primary] {
        stop(child).await;
    }
    outcome
}

/// The age identity in `<dir>/age-identity.txt`, generated (mode 0600,
/// in age-keygen's format) if there is none. Also says whether it was
/// generated now.
fn age_key(dir: &Path) -> anyhow::Result<(age::x25519::Identity, PathBuf, bool)> {
    let path = dir.join("age-identity.txt");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .with_context(|| format!("{}: no AGE-SECRET-KEY line", path.display()))?;
        let identity = age::x25519::Identity::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok((identity, path, false));
    }
    let identity = age::x25519::Identity::generate();
    let text = format!(
        "# created: {}\n# public key: {}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        identity.to_public(),
        identity.to_string().expose_secret()
    );
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok((identity, path, true))
}

/// Start this executable as `role`, its log appended to `<dir>/<role>.log`.
fn spawn(exe: &Path, role: &str, dir: &Path, args: &[String]) -> anyhow::Result<Child> {
    let log_path = dir.join(format!("{role}.log"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    Command::new(exe)
        .env(ROLE_ENV, role)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {role}"))
}

/// Wait until the member answers Status on `url` (60 s at most), or fail
/// with the end of its log if it exits first.
async fn serving(
    url: &str,
    child: &mut Child,
    dir: &Path,
    role: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {role} exited ({}): {}",
                describe(Ok(status)),
                log_tail(&dir.join(format!("{role}.log")))
            );
        }
        if let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_string()) {
            if let Ok(channel) = endpoint
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
            {
                if MaintenanceClient::new(channel.clone())
                    .status(StatusRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(channel);
                }
            }
        }
        if Instant::now() >= deadline {
            bail!("the {role} did not serve on {url} within 60 s; see its log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `member add --learner` for the learner's peer URL, unless a member
/// already has it (every run after the first).
async fn register_learner(channel: tonic::transport::Channel, peer: &str) -> anyhow::Result<()> {
    let peer = peer.to_string();
    let mut cluster = ClusterClient::new(channel);
    let members = cluster
        .member_list(MemberListRequest::default())
        .await
        .context("listing the members")?
        .into_inner()
        .members;
    if members.iter().any(|m| m.peer_ur_ls.contains(&peer)) {
        return Ok(());
    }
    cluster
        .member_add(MemberAddRequest {
            peer_ur_ls: vec![peer],
            is_learner: true,
        })
        .await
        .context("adding the learner")?;
    Ok(())
}

/// `POST /backup` on the learner: a backup now; its manifest's id and
/// revision.
async fn backup_now(learner_url: &str) -> anyhow::Result<String> {
    let response = reqwest::Client::new()
        .post(format!("{learner_url}/backup"))
        .timeout(Duration::from_secs(300))
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{status}: {}", body.trim());
    }
    let manifest: serde_json::Value = serde_json::from_str(&body)?;
    Ok(format!(
        "{} at revision {}",
        manifest["id"].as_str().unwrap_or("?"),
        manifest["revision"]
    ))
}

async fn run_drill(target: &Target, identity: &age::x25519::Identity, exe: &Path) {
    match drill::run(target, std::slice::from_ref(identity), None, exe, true).await {
        Ok(report) => println!(
            "drill ok: backup {} (revision {}, {} keys) restored and serving in {:.1} s (RTO); \
             newest restorable state {:.0} s old (RPO)",
            report.backup,
            report.revision,
            report.key_count,
            report.rto_seconds,
            report.rpo_seconds
        ),
        Err(e) => println!("drill FAILED: {e:#}"),
    }
}

async fn schedule_drills(
    schedule: &str,
    target: Target,
    identity: age::x25519::Identity,
    exe: PathBuf,
) -> anyhow::Result<tokio_cron_scheduler::JobScheduler> {
    let scheduler = tokio_cron_scheduler::JobScheduler::new().await?;
    let shared = std::sync::Arc::new((target, identity, exe));
    let job = tokio_cron_scheduler::Job::new_async(schedule, move |_, _| {
        let shared = shared.clone();
        Box::pin(async move {
            let (target, identity, exe) = &*shared;
            run_drill(target, identity, exe).await;
        })
    })
    .map_err(|e| anyhow::anyhow!("--drill-schedule '{schedule}': {e}"))?;
    scheduler.add(job).await?;
    scheduler.start().await?;
    Ok(scheduler)
}

async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// SIGTERM, then SIGKILL after 10 s.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which has not been
        // reaped (`id()` is `None` once it has).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
