//! `tern-restore`: list, verify and restore Tern backups, and run restore
//! drills. The work is in the library ([`tern_restore`]); this is its CLI.

use tern_restore::progress::{bytes_bar, count_bar};
use tern_restore::{catalog, drill, import_etcd, replay, restore, verify};

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use tern_learner::backup::target::{S3Options, Target};

use replay::{Chain, Until};

/// Exit codes: 0 success, 1 any failure (the reason on stderr, or in the
/// `--json` report), 2 a usage error.
#[derive(Parser)]
#[command(
    name = "tern-restore",
    version,
    about = "List, verify and restore Tern backups, and run restore drills.",
    after_help = "Exit status: 0 success, 1 failure (reason on stderr or in the --json report), 2 usage error.\n\
                  The age identity is read from --identity FILE, else from the file named by \
                  TERN_RESTORE_IDENTITY_FILE, else from TERN_RESTORE_IDENTITY (the key itself)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backups in a store, newest first: id, revision, time, age, size,
    /// compression ratio, and how far the archived log reaches after it.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download a backup and prove it restores: size and sha256, decrypt,
    /// decompress, SQLite integrity check, revision, key count and hash
    /// recomputed against the manifest; then every archived log segment
    /// after it: no gaps, each decrypts and holds what its name says.
    /// Exits non-zero on any failure.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Backup id, or `latest` (the default).
        id: Option<String>,
        /// Every backup (and the log after the oldest).
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Verify a backup, then make it the data dir of a new single-member
    /// cluster (new member and cluster ids, like `etcdutl snapshot
    /// restore`); start it with the same --name,
    /// --initial-advertise-peer-urls and --initial-cluster-token. With
    /// --to-revision or --to-time, the newest backup before the target
    /// plus the archived log up to it. Never writes into a non-empty dir.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Backup id, or `latest` (the default).
        #[arg(conflicts_with_all = ["to_revision", "to_time"])]
        id: Option<String>,
        /// The state at exactly this revision.
        #[arg(long, conflicts_with = "to_time")]
        to_revision: Option<i64>,
        /// The state with every write proposed at or before this time
        /// (RFC 3339, e.g. 2026-11-25T10:00:00Z).
        #[arg(long)]
        to_time: Option<DateTime<Utc>>,
        #[command(flatten)]
        new: NewMember,
        #[arg(long)]
        json: bool,
    },
    /// Restore the newest backup (or ID) and the archived log after it into
    /// a scratch dir, start a real tern-primary on loopback, check
    /// revision, key count, hash and a sample of reads through the etcd
    /// API, and report RTO and RPO. Exits non-zero on any failure.
    Drill {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Backup id, or `latest` (the default).
        id: Option<String>,
        /// The tern-primary binary (default: next to tern-restore).
        #[arg(long)]
        tern_primary: Option<PathBuf>,
        /// Also write the result as Prometheus metrics to this file (for
        /// node_exporter's textfile collector), replaced atomically.
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Turn a file from `etcdctl snapshot save` (etcd 3.4 or later) into
    /// the data dir of a new single-member cluster: keys with their history
    /// since etcd's last compaction, and leases. Start it with the same
    /// --name, --initial-advertise-peer-urls and --initial-cluster-token.
    /// Never writes into a non-empty dir.
    ImportEtcd {
        /// The snapshot file.
        snapshot: PathBuf,
        #[command(flatten)]
        new: NewMember,
        #[arg(long)]
        json: bool,
    },
}

/// The age identity: a file, never a flag value that shows in `ps`.
#[derive(Args)]
struct KeyArgs {
    /// age identity file (`age-keygen` output) with the private key.
    #[arg(long, env = "TERN_RESTORE_IDENTITY_FILE")]
    identity: Option<PathBuf>,
}

/// Where the backups are: the learner's `--backup-url` and S3 options.
#[derive(Args)]
struct StoreArgs {
    /// `s3://bucket/prefix`, `gs://…`, `az://…`, `file:///path`.
    #[arg(long, env = "TERN_BACKUP_URL")]
    url: String,
    #[arg(long)]
    s3_endpoint: Option<String>,
    #[arg(long)]
    s3_region: Option<String>,
    #[arg(long)]
    s3_path_style: bool,
    #[arg(long)]
    s3_allow_http: bool,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Target> {
        let s3 = S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            allow_http: self.s3_allow_http,
        };
        Ok(Target::open(&self.url, &s3)?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { store, json } => list(&store.open()?, json).await,
        Command::Verify {
            store,
            key,
            id,
            all,
            json,
        } => verify_backups(&store.open()?, &key, id.as_deref(), all, json).await,
        Command::Restore {
            store,
            key,
            id,
            to_revision,
            to_time,
            new,
            json,
        } => {
            let target = store.open()?;
            let identities = key.read()?;
            let until = match (to_revision, to_time) {
                (Some(r), _) => Some(Until::Revision(r)),
                (_, Some(t)) => Some(Until::Time(t)),
                _ => None,
            };
            let manifest = match until {
                Some(until) => catalog::before(&target, until).await?,
                None => catalog::find(&target, latest(id.as_deref())).await?,
            };
            let data_dir = new.data_dir.clone();
            restore::refuse_non_empty(&data_dir)?;
            let scratch = restore::scratch_beside(&data_dir)?;
            let (state, _) = verify::verify(
                &target,
                &manifest,
                &identities,
                scratch.path(),
                &bytes_bar(json),
            )
            .await?;
            let replayed = match until {
                Some(until) => {
                    let chain =
                        Chain::after(&replay::archived(&target).await?, manifest.raft_index);
                    let bar = count_bar(json, "replaying log segments");
                    let replayed =
                        replay::replay(&target, &chain, &identities, &state, until, &bar).await?;
                    bar.finish_and_clear();
                    if let (Until::Time(t), Some(end)) = (until, chain.stored_until()) {
                        if t > end && chain.gap.is_none() {
                            eprintln!(
                                "note: {} is after the newest archived segment (stored {}); writes after that, if any, are not in the store",
                                t.to_rfc3339(),
                                end.to_rfc3339()
                            );
                        }
                    }
                    Some(replayed)
                }
                None => None,
            };
            let restored = restore::into_data_dir(&state, &data_dir, &new.identity())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "backup": manifest.id,
                        "backup_revision": manifest.revision,
                        "revision": restored.revision,
                        "replayed": replayed,
                        "data_dir": data_dir,
                        "member_id": format!("{:x}", restored.member_id),
                        "cluster_id": format!("{:x}", restored.cluster_id),
                    }))?
                );
            } else {
                let log = replayed.map_or(String::new(), |r| {
                    format!(" + {} archived log entries", r.entries)
                });
                println!(
                    "restored backup {} (revision {}){log} into {}: revision {}, member {:x} of new cluster {:x}",
                    manifest.id,
                    manifest.revision,
                    data_dir.display(),
                    restored.revision,
                    restored.member_id,
                    restored.cluster_id
                );
            }
            Ok(())
        }
        Command::Drill {
            store,
            key,
            id,
            tern_primary,
            metrics_file,
            json,
        } => {
            let binary = tern_primary.unwrap_or_else(drill::default_tern_primary);
            let outcome = async {
                let target = store.open()?;
                let identities = key.read()?;
                drill::run(&target, &identities, latest(id.as_deref()), &binary, json).await
            }
            .await;
            // The drill's own outcome is reported whatever happens to the
            // metrics file; a metrics failure is a failure of its own.
            let metrics = metrics_file
                .as_ref()
                .map(|path| drill::write_metrics(path, outcome.as_ref().ok()))
                .transpose();
            let report = match outcome {
                Ok(report) => report,
                Err(e) => {
                    if json {
                        let doc = serde_json::json!({ "ok": false, "error": format!("{e:#}") });
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    }
                    if let Err(m) = metrics {
                        eprintln!("Error: writing the metrics file: {m:#}");
                    }
                    return Err(e);
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "drill passed: backup {} + {} log entries restored and served revision {} ({} keys, hash {}, {} sampled reads); RTO {:.1}s, RPO {:.1}s",
                    report.backup,
                    report.replayed_entries,
                    report.revision,
                    report.key_count,
                    report.kv_hash,
                    report.sampled_reads,
                    report.rto_seconds,
                    report.rpo_seconds
                );
            }
            metrics
                .map(|_| ())
                .context("the drill passed, but writing the metrics file failed")
        }
        Command::ImportEtcd {
            snapshot,
            new,
            json,
        } => {
            let imported = import_etcd::import(&snapshot, &new.data_dir, &new.identity())?;
            import_etcd::report(&imported, json)
        }
    }
}

/// The new single-member cluster a restore or an import makes, named the
/// way `etcdutl snapshot restore` names it.
#[derive(Args)]
struct NewMember {
    /// A data dir that does not exist yet (or is empty).
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "default")]
    name: String,
    #[arg(long, value_delimiter = ',', default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: Vec<String>,
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
}

impl NewMember {
    fn identity(&self) -> restore::Identity {
        restore::Identity {
            name: self.name.clone(),
            peer_urls: self.initial_advertise_peer_urls.clone(),
            token: self.initial_cluster_token.clone(),
        }
    }
}

/// `latest` (or nothing) means the newest backup.
fn latest(id: Option<&str>) -> Option<&str> {
    id.filter(|id| *id != "latest")
}

async fn verify_backups(
    target: &Target,
    key: &KeyArgs,
    id: Option<&str>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let identities = key.read()?;
    let manifests = if all {
        catalog::list(target)
            .await?
            .into_iter()
            .map(|e| match e {
                catalog::Entry::Ok(m) => Ok(*m),
                catalog::Entry::Unreadable { id, error } => {
                    anyhow::bail!("backup {id}: unreadable manifest: {error}")
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        vec![catalog::find(target, latest(id)).await?]
    };
    if manifests.is_empty() {
        // A mistyped URL must not verify "everything" in an empty store.
        anyhow::bail!("no backup in {}", target.url);
    }
    let mut reports = Vec::new();
    for manifest in &manifests {
        let scratch = tempfile::tempdir()?;
        let (_, verified) = verify::verify(
            target,
            manifest,
            &identities,
            scratch.path(),
            &bytes_bar(json),
        )
        .await?;
        if !json {
            println!(
                "backup {} verified: revision {}, {} keys, hash {}, {} bytes stored ({} raw)",
                verified.id,
                verified.revision,
                verified.key_count,
                verified.kv_hash,
                verified.stored_bytes,
                verified.raw_bytes
            );
        }
        reports.push(serde_json::to_value(&verified)?);
    }
    // The log after the oldest verified backup covers every later one.
    let oldest = manifests.iter().map(|m| m.raft_index).min().unwrap_or(0);
    let chain = Chain::after(&replay::archived(target).await?, oldest);
    if let Some(gap) = chain.gap_error() {
        anyhow::bail!("{gap}");
    }
    let bar = count_bar(json, "checking log segments");
    bar.set_length(chain.segments.len() as u64);
    let mut entries = 0;
    for segment in &chain.segments {
        entries += replay::fetch(target, segment, &identities).await?.len();
        bar.inc(1);
    }
    bar.finish_and_clear();
    if json {
        let doc = serde_json::json!({
            "backups": reports,
            "segments": chain.segments.len(),
            "log_entries": entries,
            "log_end_index": chain.end_index(),
            "log_end_revision": chain.reachable_revision(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "log after entry {oldest} verified: {} segments, {entries} entries, up to entry {}{}",
            chain.segments.len(),
            chain.end_index(),
            chain
                .reachable_revision()
                .map_or(String::new(), |r| format!(" (revision {r})"))
        );
    }
    Ok(())
}

async fn list(target: &Target, json: bool) -> anyhow::Result<()> {
    let entries = catalog::list(target).await?;
    let segments = replay::archived(target).await?;
    let now = chrono::Utc::now();
    if json {
        let docs: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| match e {
                catalog::Entry::Ok(m) => {
                    let chain = Chain::after(&segments, m.raft_index);
                    serde_json::json!({
                        "id": m.id, "state": "ok", "revision": m.revision, "raft_index": m.raft_index,
                        "started_at": m.started_at, "finished_at": m.finished_at,
                        "size": m.object.size, "raw_size": m.object.raw_size,
                        "key_count": m.key_count,
                        "reachable": {
                            "to_index": chain.end_index(),
                            "to_revision": chain.reachable_revision().unwrap_or(m.revision).max(m.revision),
                            "stored_until": chain.stored_until().unwrap_or(m.finished_at),
                            "missing": chain.gap,
                        },
                    })
                }
                catalog::Entry::Unreadable { id, error } => {
                    serde_json::json!({ "id": id, "state": "unreadable", "error": error })
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>10} {:<20} {:>8} {:>12} {:>6} {:>8}  REACHABLE WITH LOG",
        "ID", "REVISION", "TIME", "AGE", "SIZE", "RATIO", "KEYS"
    );
    for e in &entries {
        match e {
            catalog::Entry::Ok(m) => {
                let age = now
                    .signed_duration_since(m.finished_at)
                    .num_seconds()
                    .max(0);
                let chain = Chain::after(&segments, m.raft_index);
                let reach = chain
                    .reachable_revision()
                    .unwrap_or(m.revision)
                    .max(m.revision);
                let gap = chain.gap.map_or(String::new(), |(a, b)| {
                    format!(", entries {a}..={b} missing")
                });
                println!(
                    "{:<32} {:>10} {:<20} {:>8} {:>12} {:>6} {:>8}  revisions {}..={reach}{gap}",
                    m.id,
                    m.revision,
                    m.finished_at.format("%Y-%m-%d %H:%M:%S"),
                    humantime::format_duration(std::time::Duration::from_secs(age as u64))
                        .to_string()
                        .split(' ')
                        .next()
                        .unwrap_or(""),
                    m.object.size,
                    format!(
                        "{:.1}x",
                        m.object.raw_size as f64 / m.object.size.max(1) as f64
                    ),
                    m.key_count,
                    m.revision,
                );
            }
            catalog::Entry::Unreadable { id, error } => {
                println!("{id:<32}  unreadable: {error}");
            }
        }
    }
    Ok(())
}

impl KeyArgs {
    /// The X25519 identities from `--identity` /
    /// `TERN_RESTORE_IDENTITY_FILE`, else `TERN_RESTORE_IDENTITY`.
    fn read(&self) -> anyhow::Result<Vec<age::x25519::Identity>> {
        match (&self.identity, std::env::var("TERN_RESTORE_IDENTITY")) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--identity {}: {e}", path.display()))?;
                parse_identities(&text, &path.display().to_string())
            }
            (None, Ok(text)) => parse_identities(&text, "TERN_RESTORE_IDENTITY"),
            (None, Err(_)) => anyhow::bail!(
                "no age identity: give --identity FILE (or TERN_RESTORE_IDENTITY_FILE, or the key in TERN_RESTORE_IDENTITY)"
            ),
        }
    }
}

/// The X25519 identities in an age identity file's text.
fn parse_identities(text: &str, source: &str) -> anyhow::Result<Vec<age::x25519::Identity>> {
    let identities: Vec<age::x25519::Identity> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("AGE-SECRET-KEY-"))
        .map(|l| age::x25519::Identity::from_str(l).map_err(|e| anyhow::anyhow!("{source}: {e}")))
        .collect::<Result<_, _>>()?;
    if identities.is_empty() {
        anyhow::bail!("{source}: no AGE-SECRET-KEY line");
    }
    Ok(identities)
}
