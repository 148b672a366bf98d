//! `tern-learner`'s flags: a member's flags (same names, same TOML keys),
//! to which the backup settings are added.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::{ConfigError, PrimaryConfig};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tern-learner",
    version,
    about = "Tern's non-voting cross-region member: tails the leader's log and serves serializable reads and watches.",
    long_about = None
)]
pub struct LearnerConfig {
    #[command(flatten)]
    pub member: PrimaryConfig,

    #[command(flatten)]
    pub backup: BackupConfig,

    #[command(flatten)]
    pub follow: FollowConfig,
}

/// Follow mode: the learner follows a running etcd cluster through its
/// client API instead of joining a Tern cluster. Named as etcdctl names its
/// flags, with an `etcd-` prefix.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FollowConfig {
    /// The source etcd's client URLs, comma-separated (or repeated). Set,
    /// the learner follows that etcd; `--initial-cluster` is then not used.
    #[arg(long = "etcd-endpoints", value_delimiter = ',', action = ArgAction::Append)]
    pub endpoints: Vec<String>,

    /// The CA bundle that signed the source's server certificates.
    #[arg(long = "etcd-cacert")]
    pub cacert: Option<PathBuf>,

    /// The client certificate presented to the source.
    #[arg(long = "etcd-cert")]
    pub cert: Option<PathBuf>,

    /// The client certificate's private key.
    #[arg(long = "etcd-key")]
    pub key: Option<PathBuf>,

    /// `NAME:PASSWORD` of a user of the source (with auth on there).
    #[arg(long = "etcd-user")]
    pub user: Option<String>,

    /// A file holding the password of `--etcd-user` (then given as NAME
    /// alone), so it stays out of the process list.
    #[arg(long = "etcd-password-file")]
    pub password_file: Option<PathBuf>,
}

impl FollowConfig {
    /// Whether the learner follows an etcd instead of joining a cluster.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for url in &self.endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    "etcd-endpoints",
                    url,
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError::invalid(
                "etcd-cert",
                self.cert.as_ref().map_or("", |_| "set").to_string(),
                "--etcd-cert and --etcd-key go together",
            ));
        }
        if !self.enabled() && (self.cacert.is_some() || self.cert.is_some() || self.user.is_some())
        {
            return Err(ConfigError::invalid(
                "etcd-endpoints",
                "",
                "the --etcd-* flags need --etcd-endpoints",
            ));
        }
        if let Some(user) = &self.user {
            if self.password_file.is_none() && !user.contains(':') {
                return Err(ConfigError::invalid(
                    "etcd-user",
                    user,
                    "give NAME:PASSWORD, or NAME with --etcd-password-file",
                ));
            }
        }
        Ok(())
    }

    /// The user name and password for the source, read from the password
    /// file when one is given.
    pub fn credentials(&self) -> Result<Option<(String, String)>, ConfigError> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        if let Some(file) = &self.password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| ConfigError::invalid("etcd-password-file", file.display(), e))?;
            let name = user.split_once(':').map_or(user.as_str(), |(n, _)| n);
            return Ok(Some((
                name.to_string(),
                password.trim_end_matches(['\r', '\n']).to_string(),
            )));
        }
        let (name, password) = user.split_once(':').unwrap_or((user, ""));
        Ok(Some((name.to_string(), password.to_string())))
    }
}

/// Where, when and how the learner writes backups. Without `backup-url`
/// it writes none.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupConfig {
    /// When to take a full backup: a cron expression (`sec min hour day
    /// month weekday`, or the classic five fields), repeatable.
    #[arg(long = "backup-schedule", action = ArgAction::Append)]
    pub schedules: Vec<String>,

    /// Object store URL: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`, `file:///path`. Credentials come from the
    /// environment (AWS_*, GOOGLE_*, AZURE_*), never from flags.
    #[arg(long = "backup-url")]
    pub url: Option<String>,

    /// An age X25519 recipient (`age1...`), repeatable.
    #[arg(long = "backup-recipient", action = ArgAction::Append)]
    pub recipients: Vec<String>,

    /// A file of age recipients, one per line (`#` comments allowed).
    #[arg(long = "backup-recipients-file")]
    pub recipients_file: Option<PathBuf>,

    /// zstd compression level (1-22).
    #[arg(long = "backup-zstd-level", default_value_t = 3)]
    pub zstd_level: i32,

    /// Keep the N newest backups.
    #[arg(long = "backup-keep-last")]
    pub keep_last: Option<u32>,

    /// Keep every backup younger than this (`7d`, `36h`).
    #[arg(long = "backup-keep-within")]
    pub keep_within: Option<String>,

    /// Keep the newest backup of each of the last N hours.
    #[arg(long = "backup-keep-hourly")]
    pub keep_hourly: Option<u32>,

    /// Keep the newest backup of each of the last N days.
    #[arg(long = "backup-keep-daily")]
    pub keep_daily: Option<u32>,

    /// Keep the newest backup of each of the last N ISO weeks.
    #[arg(long = "backup-keep-weekly")]
    pub keep_weekly: Option<u32>,

    /// Keep the newest backup of each of the last N months.
    #[arg(long = "backup-keep-monthly")]
    pub keep_monthly: Option<u32>,

    /// How often committed log entries are shipped between full backups.
    #[arg(long = "backup-segment-interval", default_value = "5s")]
    pub segment_interval: String,

    /// No longer used: full backups stream the state from a read
    /// transaction and write nothing locally. Accepted (with a warning) so
    /// that existing configs still start.
    #[arg(long = "backup-staging-dir", hide = true)]
    pub staging_dir: Option<std::path::PathBuf>,

    /// S3-compatible stores: the endpoint URL (`http://minio:9000`).
    #[arg(long = "backup-s3-endpoint")]
    pub s3_endpoint: Option<String>,

    /// S3 region (default: from the environment, else us-east-1).
    #[arg(long = "backup-s3-region")]
    pub s3_region: Option<String>,

    /// Path-style S3 requests (`endpoint/bucket/key`), as most
    /// S3-compatible servers want.
    #[arg(long = "backup-s3-path-style", action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub s3_path_style: bool,

    /// Allow a plain-HTTP endpoint.
    #[arg(long = "backup-s3-allow-http", action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub s3_allow_http: bool,
}

impl BackupConfig {
    /// Checks that need more than a type parse, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=22).contains(&self.zstd_level) {
            return Err(ConfigError::invalid(
                "backup-zstd-level",
                self.zstd_level,
                "must be between 1 and 22",
            ));
        }
        for (key, value) in [
            ("backup-keep-last", self.keep_last),
            ("backup-keep-hourly", self.keep_hourly),
            ("backup-keep-daily", self.keep_daily),
            ("backup-keep-weekly", self.keep_weekly),
            ("backup-keep-monthly", self.keep_monthly),
        ] {
            if value == Some(0) {
                return Err(ConfigError::invalid(
                    key,
                    0,
                    "must be at least 1 (leave it unset to not use it)",
                ));
            }
        }
        self.keep_within()?;
        self.segment_interval()?;
        if self.url.is_some() && self.recipients.is_empty() && self.recipients_file.is_none() {
            return Err(ConfigError::invalid(
                "backup-recipient",
                "",
                "backups are encrypted: give --backup-recipient or --backup-recipients-file",
            ));
        }
        Ok(())
    }

    pub fn keep_within(&self) -> Result<Option<Duration>, ConfigError> {
        self.keep_within
            .as_deref()
            .map(|v| {
                humantime::parse_duration(v)
                    .map_err(|e| ConfigError::invalid("backup-keep-within", v, e))
            })
            .transpose()
    }

    pub fn segment_interval(&self) -> Result<Duration, ConfigError> {
        let v = &self.segment_interval;
        let d = humantime::parse_duration(v)
            .map_err(|e| ConfigError::invalid("backup-segment-interval", v, e))?;
        if d.is_zero() {
            return Err(ConfigError::invalid(
                "backup-segment-interval",
                v,
                "must be more than zero",
            ));
        }
        Ok(d)
    }
}

impl LearnerConfig {
    /// Parse flags (and the config file they name) and validate them.
    pub fn load(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Self, ConfigError> {
        let mut config: LearnerConfig = crate::load(args)?;
        config.member.validate()?;
        config.backup.validate()?;
        config.follow.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples shipped in systemd/ must keep loading.
    #[test]
    fn follow_flags_parse_and_are_checked() {
        let load = |args: &[&str]| {
            LearnerConfig::load(
                std::iter::once("tern-learner")
                    .chain(args.iter().copied())
                    .map(Into::into),
            )
        };
        let config = load(&[
            "--etcd-endpoints",
            "https://10.0.0.1:2379,https://10.0.0.2:2379",
            "--etcd-user",
            "root:secret:with:colons",
        ])
        .unwrap();
        assert!(config.follow.enabled());
        assert_eq!(config.follow.endpoints.len(), 2);
        assert_eq!(
            config.follow.credentials().unwrap(),
            Some(("root".into(), "secret:with:colons".into()))
        );
        assert!(!load(&[]).unwrap().follow.enabled());
        for bad in [
            &["--etcd-endpoints", "10.0.0.1:2379"][..],
            &["--etcd-endpoints", "https://a:2379", "--etcd-cert", "c.pem"],
            &["--etcd-cacert", "ca.pem"],
            &["--etcd-endpoints", "https://a:2379", "--etcd-user", "root"],
        ] {
            let e = load(bad).unwrap_err().to_string();
            assert!(e.contains("etcd-"), "{bad:?}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let config = load(&[
            "--etcd-endpoints",
            "https://a:2379",
            "--etcd-user",
            "root",
            "--etcd-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(
            config.follow.credentials().unwrap(),
            Some(("root".into(), "s3cret".into()))
        );
    }

    #[test]
    fn shipped_examples_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
        let learner = dir.join("learner.toml");
        let config = LearnerConfig::load(
            ["tern-learner", "--config-file", learner.to_str().unwrap()].map(Into::into),
        )
        .unwrap();
        assert_eq!(config.member.name, "dr");
        assert_eq!(config.member.initial_members().unwrap().len(), 2);
        let primary = dir.join("primary.toml");
        PrimaryConfig::load(
            ["tern-primary", "--config-file", primary.to_str().unwrap()].map(Into::into),
        )
        .unwrap();
    }

    #[test]
    fn backup_flags_from_file_and_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("learner.toml");
        std::fs::write(
            &file,
            "backup-url = \"file:///tmp/b\"\nbackup-schedule = [\"0 0 * * * *\", \"0 30 1,2 * * *\"]\nbackup-recipient = [\"age1x\"]\nbackup-keep-within = \"7d\"\n",
        )
        .unwrap();
        let config = LearnerConfig::load(
            [
                "tern-learner",
                "--config-file",
                file.to_str().unwrap(),
                "--backup-keep-last",
                "3",
            ]
            .map(Into::into),
        )
        .unwrap();
        let b = &config.backup;
        assert_eq!(b.schedules, vec!["0 0 * * * *", "0 30 1,2 * * *"]);
        assert_eq!(b.keep_last, Some(3));
        assert_eq!(
            b.keep_within().unwrap(),
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(b.zstd_level, 3);
        let e =
            LearnerConfig::load(["tern-learner", "--backup-url", "file:///tmp/b"].map(Into::into))
                .unwrap_err();
        assert!(e.to_string().contains("--backup-recipient"), "{e}");
        let e = LearnerConfig::load(["tern-learner", "--backup-zstd-level", "40"].map(Into::into))
            .unwrap_err();
        assert!(e.to_string().contains("--backup-zstd-level"), "{e}");
    }

    #[test]
    fn tls_keys_apply_to_the_learner() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("peer.pem");
        std::fs::write(&pem, "").unwrap();
        let file = dir.path().join("learner.toml");
        let pem = pem.display();
        std::fs::write(
            &file,
            format!(
                "listen-peer-urls = [\"https://127.0.0.1:2380\"]\npeer-cert-file = \"{pem}\"\npeer-key-file = \"{pem}\"\npeer-trusted-ca-file = \"{pem}\"\npeer-client-cert-auth = true\n"
            ),
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let config =
            LearnerConfig::load(["tern-learner", "--config-file", path].map(Into::into)).unwrap();
        assert!(config.member.peer_client_cert_auth);
        assert!(config.member.peer_trusted_ca_file.is_some());
        std::fs::write(&file, "listen-peer-urls = [\"https://127.0.0.1:2380\"]\n").unwrap();
        let e = LearnerConfig::load(["tern-learner", "--config-file", path].map(Into::into))
            .unwrap_err();
        assert!(e.to_string().contains("--peer-cert-file"), "{e}");
    }

    #[test]
    fn member_flags_and_file_keys_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("learner.toml");
        std::fs::write(
            &file,
            "name = \"dr\"\ninitial-cluster-state = \"existing\"\n",
        )
        .unwrap();
        let config = LearnerConfig::load(
            [
                "tern-learner",
                "--config-file",
                file.to_str().unwrap(),
                "--snapshot-count",
                "5",
            ]
            .map(Into::into),
        )
        .unwrap();
        assert_eq!(config.member.name, "dr");
        assert_eq!(config.member.snapshot_count, 5);
        assert_eq!(
            config.member.initial_cluster_state,
            crate::ClusterState::Existing
        );
    }
}
