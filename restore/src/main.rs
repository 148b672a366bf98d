//! `tern-restore`: list, verify and restore Tern backups, and run restore
//! drills.
//!
//! - [`catalog`]: the backups in a store, newest first.
//! - [`verify`]: download, sha256, decrypt, decompress, integrity check,
//!   recomputed hash against the manifest.
//! - [`restore`]: a verified backup becomes a new single-member cluster's
//!   data dir.
//! - [`drill`]: restore the newest backup, start a real member, check it
//!   through the etcd API, report RTO and RPO.

mod catalog;
mod drill;
mod restore;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};
use tern_learner::backup::target::{S3Options, Target};

#[derive(Parser)]
#[command(
    name = "tern-restore",
    version,
    about = "List and verify Tern backups."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backups in a store, newest first: id, revision, age, size, and
    /// whether the manifest reads.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download a backup and prove it restores: size and sha256, decrypt,
    /// decompress, SQLite integrity check, revision, key count and hash
    /// recomputed against the manifest. Exits non-zero on any mismatch.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// age identity file (`age-keygen` output) with the private key.
        #[arg(long)]
        identity: PathBuf,
        /// Backup id (default: the newest).
        #[arg(long)]
        backup: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Verify a backup, then make it the data dir of a new single-member
    /// cluster (new member and cluster ids, like `etcdutl snapshot
    /// restore`); start it with the same --name,
    /// --initial-advertise-peer-urls and --initial-cluster-token.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        backup: Option<String>,
        /// A data dir that does not exist yet (or is empty).
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long, value_delimiter = ',', default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: Vec<String>,
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
    },
    /// Restore the newest backup into a scratch dir, start a real
    /// tern-primary on loopback, check revision, key count and hash through
    /// the etcd API, and report RTO and RPO. Exits non-zero on any failure.
    Drill {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        identity: PathBuf,
        /// The tern-primary binary (default: next to tern-restore).
        #[arg(long)]
        tern_primary: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Where the backups are: the learner's `--backup-url` and S3 options.
#[derive(Args)]
struct StoreArgs {
    /// `s3://bucket/prefix`, `gs://…`, `az://…`, `file:///path`.
    #[arg(long)]
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
            identity,
            backup,
            json,
        } => {
            let fetched = fetch_verified(&store, &identity, backup.as_deref()).await?;
            let verified = fetched.verified;
            if json {
                println!("{}", serde_json::to_string_pretty(&verified)?);
            } else {
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
            Ok(())
        }
        Command::Restore {
            store,
            identity,
            backup,
            data_dir,
            name,
            initial_advertise_peer_urls,
            initial_cluster_token,
        } => {
            let fetched = fetch_verified(&store, &identity, backup.as_deref()).await?;
            let manifest = &fetched.manifest;
            let restored = restore::into_data_dir(
                &fetched.state,
                &data_dir,
                &restore::Identity {
                    name,
                    peer_urls: initial_advertise_peer_urls,
                    token: initial_cluster_token,
                },
            )?;
            println!(
                "restored backup {} (revision {}) into {}: member {:x} of new cluster {:x}",
                manifest.id,
                restored.revision,
                data_dir.display(),
                restored.member_id,
                restored.cluster_id
            );
            Ok(())
        }
        Command::Drill {
            store,
            identity,
            tern_primary,
            json,
        } => {
            let started = std::time::Instant::now();
            let fetched = fetch_verified(&store, &identity, None).await?;
            let (manifest, state) = (&fetched.manifest, &fetched.state);
            let dir = fetched.dir.path();
            let binary = tern_primary.unwrap_or_else(drill::default_tern_primary);
            let report = drill::check_restore(started, manifest, state, dir, &binary).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "drill passed: backup {} restored and served revision {} ({} keys, hash {}); RTO {:.1}s, RPO {:.1}s",
                    report.backup,
                    report.revision,
                    report.key_count,
                    report.kv_hash,
                    report.rto_seconds,
                    report.rpo_seconds
                );
            }
            Ok(())
        }
    }
}

async fn list(target: &Target, json: bool) -> anyhow::Result<()> {
    let entries = catalog::list(target).await?;
    let now = chrono::Utc::now();
    if json {
        let docs: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| match e {
                catalog::Entry::Ok(m) => serde_json::json!({
                    "id": m.id, "state": "ok", "revision": m.revision, "raft_index": m.raft_index,
                    "finished_at": m.finished_at, "size": m.object.size, "raw_size": m.object.raw_size,
                    "key_count": m.key_count,
                }),
                catalog::Entry::Unreadable { id, error } => {
                    serde_json::json!({ "id": id, "state": "unreadable", "error": error })
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    println!(
        "{:<32} {:>10} {:>10} {:>12} {:>8}  MANIFEST",
        "ID", "REVISION", "AGE", "SIZE", "KEYS"
    );
    for e in &entries {
        match e {
            catalog::Entry::Ok(m) => {
                let age = now
                    .signed_duration_since(m.finished_at)
                    .num_seconds()
                    .max(0);
                println!(
                    "{:<32} {:>10} {:>10} {:>12} {:>8}  ok",
                    m.id,
                    m.revision,
                    format!("{age}s"),
                    m.object.size,
                    m.key_count
                );
            }
            catalog::Entry::Unreadable { id, error } => {
                println!(
                    "{id:<32} {:>10} {:>10} {:>12} {:>8}  unreadable: {error}",
                    "-", "-", "-", "-"
                );
            }
        }
    }
    Ok(())
}

/// A backup downloaded and verified into a scratch directory (removed
/// when this is dropped).
struct Fetched {
    manifest: tern_learner::backup::manifest::Manifest,
    state: PathBuf,
    verified: verify::Verified,
    dir: tempfile::TempDir,
}

/// Find backup `id` (default: the newest) and verify it into a scratch
/// directory: what `verify`, `restore` and `drill` all start with.
async fn fetch_verified(
    store: &StoreArgs,
    identity: &PathBuf,
    id: Option<&str>,
) -> anyhow::Result<Fetched> {
    let target = store.open()?;
    let identities = read_identities(identity)?;
    let manifest = catalog::find(&target, id).await?;
    let dir = tempfile::tempdir()?;
    let (state, verified) = verify::verify(&target, &manifest, &identities, dir.path()).await?;
    Ok(Fetched {
        manifest,
        state,
        verified,
        dir,
    })
}

/// The X25519 identities in an age identity file.
fn read_identities(path: &PathBuf) -> anyhow::Result<Vec<age::x25519::Identity>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--identity {}: {e}", path.display()))?;
    let identities: Vec<age::x25519::Identity> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("AGE-SECRET-KEY-"))
        .map(|l| {
            age::x25519::Identity::from_str(l)
                .map_err(|e| anyhow::anyhow!("--identity {}: {e}", path.display()))
        })
        .collect::<Result<_, _>>()?;
    if identities.is_empty() {
        anyhow::bail!("--identity {}: no AGE-SECRET-KEY line", path.display());
    }
    Ok(identities)
}
