//! Scheduled full backups of the learner's state to object storage.
//!
//! - [`pipeline`]: one backup: consistent image → zstd → age → multipart
//!   upload → manifest (written last: a backup exists once its manifest
//!   does).
//! - [`manifest`]: what a backup records, and how its objects are named.
//! - [`target`]: the object store behind `--backup-url`.
//! - [`retention`]: which backups to keep.
//! - [`archive`]: log segments shipped between full backups.
//! - [`background`]: the heavy work of a backup, on idle CPU only.
//!
//! One worker task runs backups one at a time, whatever asked for them:
//! the cron schedules, `POST /backup` on the client URL (answers with the
//! manifest) or SIGUSR1. Each run first removes what an interrupted run
//! left (data objects without a manifest), and after a success applies
//! the retention policy. Metrics go on the member's `/metrics`.

pub mod archive;
pub mod background;
pub mod manifest;
pub mod pipeline;
pub mod retention;
pub mod target;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tern_config::BackupConfig;
use tern_primary::member::Member;
use tern_primary::server::Extension;
use tokio::sync::{mpsc, oneshot};

use manifest::Manifest;
use pipeline::Settings;
use retention::{Candidate, Policy};
use target::Target;

/// Why a backup failed; the variant is the `reason` label of the failure
/// metric.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("invalid value for '--{key}': {reason}")]
    Config { key: &'static str, reason: String },
    #[error("reading the state: {0}")]
    Snapshot(String),
    #[error("encrypting: {0}")]
    Encrypt(String),
    #[error("uploading: {0}")]
    Upload(String),
    #[error("writing the manifest: {0}")]
    Manifest(String),
}

impl BackupError {
    fn reason(&self) -> &'static str {
        match self {
            BackupError::Config { .. } => "config",
            BackupError::Snapshot(_) => "snapshot",
            BackupError::Encrypt(_) => "encrypt",
            BackupError::Upload(_) => "upload",
            BackupError::Manifest(_) => "manifest",
        }
    }

    /// Every value [`BackupError::reason`] takes.
    const REASONS: [&'static str; 5] = ["config", "snapshot", "encrypt", "upload", "manifest"];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// What one alert rule needs ("no good backup for 2 h") and what explains
/// a failure.
#[derive(Default)]
struct BackupMetrics {
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_duration: Gauge<f64, std::sync::atomic::AtomicU64>,
    last_raw_bytes: Gauge,
    last_stored_bytes: Gauge,
    last_revision: Gauge,
    succeeded: Counter,
    failed: Family<ReasonLabel, Counter>,
}

impl BackupMetrics {
    fn register(&self, member: &Member) {
        let m = &member.metrics;
        m.register(
            "tern_backup_last_success_timestamp_seconds",
            "Unix time the last backup became visible (its manifest was written)",
            self.last_success.clone(),
        );
        m.register(
            "tern_backup_last_duration_seconds",
            "How long the last successful backup took",
            self.last_duration.clone(),
        );
        m.register(
            "tern_backup_last_raw_bytes",
            "Size of the state file in the last backup, before compression",
            self.last_raw_bytes.clone(),
        );
        m.register(
            "tern_backup_last_stored_bytes",
            "Bytes stored for the last backup (compressed and encrypted)",
            self.last_stored_bytes.clone(),
        );
        m.register(
            "tern_backup_last_revision",
            "Store revision held by the last backup",
            self.last_revision.clone(),
        );
        m.register(
            "tern_backup_succeeded",
            "Backups that became visible",
            self.succeeded.clone(),
        );
        m.register(
            "tern_backup_failed",
            "Backups that failed, by reason (snapshot, encrypt, upload, manifest)",
            self.failed.clone(),
        );
        // Every reason at zero from the start: the first failure of a kind
        // is then an increase, which `increase(...) > 0` alerts see.
        for reason in BackupError::REASONS {
            self.failed.get_or_create_owned(&ReasonLabel {
                reason: reason.into(),
            });
        }
    }
}

/// A request for one backup; `reply` gets its outcome.
struct Run {
    reply: Option<oneshot::Sender<Result<Manifest, String>>>,
}

/// Everything a backup run needs.
struct Backups {
    member: Arc<Member>,
    target: Arc<Target>,
    settings: Arc<Settings>,
    policy: Policy,
    metrics: BackupMetrics,
}

/// The learner's extension: backups per `config`, or none without
/// `--backup-url`. Checks everything (URL, recipients, schedules) before
/// the member starts.
pub fn extension(config: &BackupConfig) -> Result<Option<Extension>, BackupError> {
    let Some(url) = &config.url else {
        return Ok(None);
    };
    let target = Target::open(url, &config.into())?;
    let recipients = recipients(config)?;
    let schedules = config
        .schedules
        .iter()
        .map(|s| cron_expression(s))
        .collect::<Result<Vec<_>, _>>()?;
    let policy = Policy {
        keep_last: config.keep_last,
        keep_within: config.keep_within().map_err(|e| BackupError::Config {
            key: "backup-keep-within",
            reason: e.to_string(),
        })?,
        keep_hourly: config.keep_hourly,
        keep_daily: config.keep_daily,
        keep_weekly: config.keep_weekly,
        keep_monthly: config.keep_monthly,
    };
    if let Some(dir) = &config.staging_dir {
        tracing::warn!(
            dir = %dir.display(),
            "--backup-staging-dir is no longer used: full backups stream the state without a \
             local copy"
        );
    }
    let settings = Arc::new(Settings {
        zstd_level: config.zstd_level,
        recipients,
    });
    let target = Arc::new(target);
    let interval = config.segment_interval().map_err(|e| BackupError::Config {
        key: "backup-segment-interval",
        reason: e.to_string(),
    })?;
    Ok(Some(Box::new(move |member: Arc<Member>| {
        remove_old_staging(&member.data_dir);
        let archiver = Arc::new(archive::Archiver {
            member: member.clone(),
            target: target.clone(),
            settings: settings.clone(),
            interval,
            metrics: Default::default(),
        });
        archiver.metrics.register(&member);
        tokio::spawn(archiver.run());
        let backups = Arc::new(Backups {
            member,
            target,
            settings,
            policy,
            metrics: BackupMetrics::default(),
        });
        backups.metrics.register(&backups.member);
        let (runs, queue) = mpsc::channel::<Run>(16);
        tokio::spawn(worker(backups.clone(), queue));
        tokio::spawn(schedule(schedules, runs.clone()));
        tokio::spawn(on_signal(runs.clone()));
        axum::Router::new()
            .route("/backup", axum::routing::post(backup_now))
            .with_state(runs)
    })))
}

/// Before full backups streamed, each made a copy of the state in
/// `backup-staging` in the data dir first; one left by a killed run can be
/// as large as the state.
fn remove_old_staging(data_dir: &std::path::Path) {
    let old = data_dir.join("backup-staging");
    if old.exists() {
        match std::fs::remove_dir_all(&old) {
            Ok(()) => tracing::info!(dir = %old.display(), "removed an old backup staging copy"),
            Err(e) => {
                tracing::warn!(dir = %old.display(), error = %e, "cannot remove an old backup staging copy")
            }
        }
    }
}

/// The recipients from the flags and the file, each checked.
fn recipients(config: &BackupConfig) -> Result<Vec<age::x25519::Recipient>, BackupError> {
    let mut lines: Vec<(&'static str, String)> = config
        .recipients
        .iter()
        .map(|r| ("backup-recipient", r.clone()))
        .collect();
    if let Some(file) = &config.recipients_file {
        let text = std::fs::read_to_string(file).map_err(|e| BackupError::Config {
            key: "backup-recipients-file",
            reason: format!("{}: {e}", file.display()),
        })?;
        lines.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| ("backup-recipients-file", l.to_string())),
        );
    }
    if lines.is_empty() {
        return Err(BackupError::Config {
            key: "backup-recipient",
            reason: "backups are encrypted: name at least one age recipient".into(),
        });
    }
    lines
        .into_iter()
        .map(|(key, line)| {
            age::x25519::Recipient::from_str(&line).map_err(|e| BackupError::Config {
                key,
                reason: format!("'{line}' is not an age X25519 recipient: {e}"),
            })
        })
        .collect()
}

/// Cron with seconds (`sec min hour day month weekday`), as
/// tokio-cron-scheduler takes it; the classic five fields run at second 0.
fn cron_expression(expr: &str) -> Result<String, BackupError> {
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {}", expr.trim()),
        6 | 7 => expr.trim().to_string(),
        _ => {
            return Err(BackupError::Config {
                key: "backup-schedule",
                reason: format!("'{expr}' is not a cron expression (5 or 6 fields)"),
            })
        }
    };
    tokio_cron_scheduler::Job::new_async(full.as_str(), |_, _| Box::pin(async {})).map_err(
        |e| BackupError::Config {
            key: "backup-schedule",
            reason: format!("'{expr}': {e}"),
        },
    )?;
    Ok(full)
}

async fn schedule(schedules: Vec<String>, runs: mpsc::Sender<Run>) {
    if schedules.is_empty() {
        return;
    }
    let scheduler = match tokio_cron_scheduler::JobScheduler::new().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "backup scheduler failed to start");
            return;
        }
    };
    for expr in schedules {
        let runs = runs.clone();
        let job = tokio_cron_scheduler::Job::new_async(expr.as_str(), move |_, _| {
            let runs = runs.clone();
            Box::pin(async move {
                // A run still going when the next is due: skip this one.
                let _ = runs.try_send(Run { reply: None });
            })
        });
        match job {
            Ok(job) => {
                if let Err(e) = scheduler.add(job).await {
                    tracing::error!(error = %e, schedule = %expr, "cannot schedule backups");
                }
            }
            Err(e) => tracing::error!(error = %e, schedule = %expr, "cannot schedule backups"),
        }
    }
    if let Err(e) = scheduler.start().await {
        tracing::error!(error = %e, "backup scheduler failed to start");
        return;
    }
    // The scheduler runs as long as it is alive.
    std::future::pending::<()>().await;
}

/// SIGUSR1: take a backup now.
async fn on_signal(runs: mpsc::Sender<Run>) {
    let Ok(mut usr1) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    else {
        return;
    };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: backup requested");
        let _ = runs.try_send(Run { reply: None });
    }
}

/// `POST /backup`: take a backup now; answers with its manifest.
async fn backup_now(State(runs): State<mpsc::Sender<Run>>) -> impl IntoResponse {
    let (reply, rx) = oneshot::channel();
    if runs.send(Run { reply: Some(reply) }).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "backups stopped\n".to_string(),
        );
    }
    match rx.await {
        Ok(Ok(manifest)) => (
            StatusCode::OK,
            serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n",
        ),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "backups stopped\n".to_string(),
        ),
    }
}

async fn worker(backups: Arc<Backups>, mut queue: mpsc::Receiver<Run>) {
    while let Some(run) = queue.recv().await {
        let outcome = backups.run().await;
        if let Some(reply) = run.reply {
            let _ = reply.send(outcome.map_err(|e| e.to_string()));
        }
    }
}

impl Backups {
    async fn run(&self) -> Result<Manifest, BackupError> {
        let started = Instant::now();
        if let Err(e) = self.remove_leftovers().await {
            tracing::warn!(error = %e, "cannot remove what an interrupted backup left");
        }
        match pipeline::take(&self.member, &self.target, &self.settings).await {
            Ok(manifest) => {
                let m = &self.metrics;
                m.succeeded.inc();
                m.last_success
                    .set(manifest.finished_at.timestamp_millis() as f64 / 1000.0);
                m.last_duration.set(started.elapsed().as_secs_f64());
                m.last_raw_bytes.set(manifest.object.raw_size as i64);
                m.last_stored_bytes.set(manifest.object.size as i64);
                m.last_revision.set(manifest.revision);
                tracing::info!(
                    id = %manifest.id,
                    revision = manifest.revision,
                    raw_bytes = manifest.object.raw_size,
                    stored_bytes = manifest.object.size,
                    elapsed = ?started.elapsed(),
                    "backup written"
                );
                if let Err(e) = self.apply_retention().await {
                    tracing::warn!(error = %e, "retention not applied");
                }
                Ok(manifest)
            }
            Err(e) => {
                self.metrics
                    .failed
                    .get_or_create(&ReasonLabel {
                        reason: e.reason().into(),
                    })
                    .inc();
                tracing::error!(error = %e, "backup failed");
                Err(e)
            }
        }
    }

    /// Every object name under `backups/`.
    async fn list(&self) -> Result<Vec<String>, object_store::Error> {
        let objects: Vec<_> = self
            .target
            .store
            .list(Some(&self.target.backups))
            .try_collect()
            .await?;
        Ok(objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect())
    }

    /// Data objects without a manifest are what a failed or interrupted
    /// run left; no backup refers to them.
    async fn remove_leftovers(&self) -> Result<(), object_store::Error> {
        let names = self.list().await?;
        for name in &names {
            let orphan = match manifest::id_of_data(name) {
                Some(id) => !names.contains(&manifest::manifest_name(id)),
                None => manifest::id_of_manifest(name).is_none(),
            };
            if orphan {
                tracing::info!(object = %name, "removing the leftover of an interrupted backup");
                self.target.store.delete(&self.target.path(name)).await?;
            }
        }
        if let Some(dir) = &self.target.local_backups {
            remove_staged_uploads(dir);
        }
        Ok(())
    }
}

/// Remove the staging files (`<data object>#<n>`) that killed uploads
/// left in a `file://` store's `backups/`. Runs are serialized and a
/// prefix belongs to one learner (retention assumes it too), so none of
/// them is an upload still under way.
fn remove_staged_uploads(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((object, n)) = name.to_str().and_then(|n| n.rsplit_once('#')) else {
            continue;
        };
        let staged = manifest::id_of_data(object).is_some()
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit());
        if staged {
            tracing::info!(object = %object, "removing the staging file of an interrupted upload");
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(error = %e, file = %entry.path().display(), "cannot remove it");
            }
        }
    }
}

impl Backups {
    /// Delete what the policy does not keep: manifest first (the backup
    /// disappears), then its data.
    async fn apply_retention(&self) -> Result<(), object_store::Error> {
        if self.policy.is_empty() {
            return Ok(());
        }
        let mut candidates = Vec::new();
        let mut kept_index = std::collections::HashMap::new();
        for name in self.list().await? {
            let Some(id) = manifest::id_of_manifest(&name) else {
                continue;
            };
            let read = self.target.store.get(&self.target.path(&name)).await;
            let parsed = match read {
                Ok(r) => r
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()),
                Err(_) => None,
            };
            let time = parsed
                .as_ref()
                .map(|m| m.finished_at)
                .or_else(|| time_of_id(id));
            let Some(time) = time else { continue };
            if let Some(m) = &parsed {
                kept_index.insert(id.to_string(), m.raft_index);
            }
            candidates.push(Candidate {
                id: id.to_string(),
                time,
                verified: parsed.is_some(),
            });
        }
        let decision = self.policy.apply(&candidates, chrono::Utc::now());
        // Log segments are only useful after a retained full backup.
        let oldest_kept = decision
            .keep
            .iter()
            .filter_map(|(id, _)| kept_index.get(id.as_str()).copied())
            .min();
        for id in decision.delete {
            tracing::info!(backup = %id, "retention: deleting");
            self.target
                .store
                .delete(&self.target.path(&manifest::manifest_name(&id)))
                .await?;
            match self
                .target
                .store
                .delete(&self.target.path(&manifest::data_name(&id)))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(oldest) = oldest_kept {
            self.remove_segments_before(oldest).await?;
        }
        Ok(())
    }

    /// Segments that end before `index` (the oldest retained backup's raft
    /// index) can no longer be replayed onto any backup.
    async fn remove_segments_before(&self, index: u64) -> Result<(), object_store::Error> {
        let dir = self.target.root.clone().join("segments");
        let objects: Vec<_> = self.target.store.list(Some(&dir)).try_collect().await?;
        for o in objects {
            let Some(archive::SegmentName { last, .. }) =
                o.location.filename().and_then(archive::SegmentName::parse)
            else {
                continue;
            };
            if last < index {
                self.target.store.delete(&o.location).await?;
            }
        }
        Ok(())
    }
}

/// The time a backup id starts with.
fn time_of_id(id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let stamp = id.split('-').next()?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ")
        .ok()
        .map(|t| t.and_utc())
}
