//! `tern-primary`'s flags, with etcd's names and defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use url::Url;

use crate::ConfigError;

/// etcd's default quota: 2 GiB.
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// etcd's longest `--election-timeout`: 50 s.
pub const MAX_ELECTION_TIMEOUT_MS: u64 = 50_000;
/// etcd's `--max-request-bytes` default: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 1536 * 1024;

/// A voting member of a Tern cluster.
///
/// Every flag can also be a key of the same name in the TOML file given with
/// `--config-file`; flags win over the file.
#[derive(Debug, Clone, Parser)]
#[command(name = "tern-primary", version, about, long_about = None)]
pub struct PrimaryConfig {
    /// TOML file whose keys are these flags' long names.
    #[arg(long)]
    pub config_file: Option<PathBuf>,

    /// Human-readable name of this member.
    #[arg(long, default_value = "default")]
    pub name: String,

    /// Path to the data directory (default: `<name>.tern`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// URLs to listen on for client traffic (gRPC and HTTP), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub listen_client_urls: Vec<Url>,

    /// Client URLs advertised to the cluster and to clients.
    #[arg(long, value_delimiter = ',', default_value = "http://localhost:2379")]
    pub advertise_client_urls: Vec<Url>,

    /// URLs to listen on for peer traffic.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2380")]
    pub listen_peer_urls: Vec<Url>,

    /// This member's peer URLs, advertised to the rest of the cluster.
    #[arg(long, value_delimiter = ',', default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: Vec<Url>,

    /// Initial cluster configuration for bootstrapping: `name=peer-url,...`.
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,

    /// `new` to bootstrap a new cluster, `existing` to join one.
    #[arg(long, value_enum, default_value = "new")]
    pub initial_cluster_state: ClusterState,

    /// Disaster takeover: restart this member's data (a learner's, say) as a
    /// new single-voter cluster keeping every revision it applied; the
    /// other members are dropped from the member list.
    #[arg(long, action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub force_new_cluster: bool,

    /// Token that makes cluster and member ids unique per cluster.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,

    /// Size at which the NOSPACE alarm is raised (0: the 2 GiB default).
    #[arg(long, default_value_t = 0)]
    pub quota_backend_bytes: u64,

    /// Largest client request accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: u32,

    /// Most operations allowed in one transaction.
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: u32,

    /// Most learners the cluster may hold (etcd 3.6's `--max-learners`;
    /// etcd 3.4 allows one). Set the same on every member, as etcd
    /// requires: the member that takes a `member add --learner` checks it.
    #[arg(long, default_value_t = 3)]
    pub max_learners: u32,

    /// Most bytes per second this member, as leader, sends to each learner
    /// (its appends, and a snapshot on its own stream; 0: no limit). A
    /// budget per learner, so one
    /// region catching up cannot take the uplink every other region and
    /// the voters share. Below the write rate the learner falls behind.
    #[arg(long, default_value_t = 0)]
    pub learner_bandwidth_limit: u64,

    /// Seconds an auth token (etcd's simple token) stays valid after its
    /// last use (etcd's `--auth-token-ttl`).
    #[arg(long, default_value_t = 300)]
    pub auth_token_ttl: u64,

    /// `periodic` (retention is a duration) or `revision` (a count).
    #[arg(long, value_enum, default_value = "periodic")]
    pub auto_compaction_mode: AutoCompactionMode,

    /// History kept by auto-compaction; `0` turns it off. Periodic mode takes
    /// a duration (`1h`, `30m`) or a bare number of hours.
    #[arg(long, default_value = "0")]
    pub auto_compaction_retention: String,

    /// Extra URLs serving only /metrics and /health.
    #[arg(long, value_delimiter = ',')]
    pub listen_metrics_urls: Vec<Url>,

    /// Client TLS certificate (PEM, leaf first): served on every `https://`
    /// client and metrics URL.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,

    /// Private key of `cert-file` (PEM).
    #[arg(long)]
    pub key_file: Option<PathBuf>,

    /// CA certificates (PEM) that clients' certificates must chain to with
    /// `client-cert-auth`; also the roots trusted when this member dials
    /// another member's `https://` client URL.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,

    /// Require every client on an `https://` client URL to present a
    /// certificate signed by `trusted-ca-file`.
    #[arg(long, action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: bool,

    /// Peer TLS certificate (PEM): served on `https://` peer URLs and
    /// presented as this member's identity when it dials an `https://` peer.
    #[arg(long)]
    pub peer_cert_file: Option<PathBuf>,

    /// Private key of `peer-cert-file` (PEM).
    #[arg(long)]
    pub peer_key_file: Option<PathBuf>,

    /// CA certificates (PEM) that peers' certificates must chain to: the
    /// roots for dialing `https://` peer URLs, and for checking dialers
    /// with `peer-client-cert-auth`.
    #[arg(long)]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Require every member dialing an `https://` peer URL to present a
    /// certificate signed by `peer-trusted-ca-file`.
    #[arg(long, action = ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub peer_client_cert_auth: bool,

    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval: u64,

    /// Raft election timeout in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub election_timeout: u64,

    /// Applied entries between Raft log compactions.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_count: u64,

    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Emit logs as JSON lines.
    #[arg(long, action = ArgAction::Set, default_value_t = false)]
    pub log_json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterState {
    New,
    Existing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AutoCompactionMode {
    Periodic,
    Revision,
}

/// The validated auto-compaction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    /// Keep this much wall-clock time of history.
    Periodic(Duration),
    /// Keep this many revisions of history.
    Revision(i64),
}

/// One entry of `--initial-cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_urls: Vec<Url>,
}

impl PrimaryConfig {
    /// Parse flags (and the config file they name) and validate them.
    pub fn load(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Self, ConfigError> {
        let mut config: PrimaryConfig = crate::load(args)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that span several flags or need more than a type parse. Fills
    /// in derived defaults the way etcd does.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::invalid("name", "", "must not be empty"));
        }
        if self.quota_backend_bytes == 0 {
            self.quota_backend_bytes = DEFAULT_QUOTA_BACKEND_BYTES;
        }
        // etcd: a non-default name with the default cluster means "just me".
        if self.initial_cluster == "default=http://localhost:2380" && self.name != "default" {
            self.initial_cluster = self
                .initial_advertise_peer_urls
                .iter()
                .map(|u| format!("{}={}", self.name, url_string(u)))
                .collect::<Vec<_>>()
                .join(",");
        }
        let members = self.initial_members()?;
        let me = members
            .iter()
            .find(|m| m.name == self.name)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "initial-cluster",
                    &self.initial_cluster,
                    format!(
                        "couldn't find local name \"{}\" in the initial cluster configuration",
                        self.name
                    ),
                )
            })?;
        let mut mine: Vec<String> = me.peer_urls.iter().map(url_string).collect();
        let mut advertised: Vec<String> = self
            .initial_advertise_peer_urls
            .iter()
            .map(url_string)
            .collect();
        mine.sort();
        advertised.sort();
        if mine != advertised {
            return Err(ConfigError::invalid(
                "initial-advertise-peer-urls",
                advertised.join(","),
                format!(
                    "does not match --initial-cluster's URLs for \"{}\" ({})",
                    self.name,
                    mine.join(",")
                ),
            ));
        }
        for (key, urls) in [
            ("listen-client-urls", &self.listen_client_urls),
            ("advertise-client-urls", &self.advertise_client_urls),
            ("listen-peer-urls", &self.listen_peer_urls),
            (
                "initial-advertise-peer-urls",
                &self.initial_advertise_peer_urls,
            ),
            ("listen-metrics-urls", &self.listen_metrics_urls),
        ] {
            check_urls(key, urls)?;
        }
        self.check_tls()?;
        if self.listen_client_urls.is_empty() {
            return Err(ConfigError::invalid(
                "listen-client-urls",
                "",
                "at least one URL is required",
            ));
        }
        if self.heartbeat_interval == 0 {
            return Err(ConfigError::invalid(
                "heartbeat-interval",
                0,
                "must be positive",
            ));
        }
        // etcd's bound; it also keeps every Raft timer far from overflowing
        // an Instant.
        if self.election_timeout > MAX_ELECTION_TIMEOUT_MS {
            return Err(ConfigError::invalid(
                "election-timeout",
                self.election_timeout,
                format!("is too long, and should be set less than {MAX_ELECTION_TIMEOUT_MS}"),
            ));
        }
        if self.election_timeout < self.heartbeat_interval.saturating_mul(5) {
            return Err(ConfigError::invalid(
                "election-timeout",
                self.election_timeout,
                format!(
                    "should be at least as 5 times as --heartbeat-interval ({})",
                    self.heartbeat_interval
                ),
            ));
        }
        if self.max_request_bytes == 0 {
            return Err(ConfigError::invalid(
                "max-request-bytes",
                0,
                "must be positive",
            ));
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError::invalid("max-txn-ops", 0, "must be positive"));
        }
        if self.max_learners == 0 {
            return Err(ConfigError::invalid("max-learners", 0, "must be positive"));
        }
        if self.auth_token_ttl == 0 {
            return Err(ConfigError::invalid(
                "auth-token-ttl",
                0,
                "must be positive",
            ));
        }
        if self.snapshot_count == 0 {
            return Err(ConfigError::invalid(
                "snapshot-count",
                0,
                "must be positive",
            ));
        }
        self.auto_compaction()?;
        Ok(())
    }

    /// etcd's TLS rules: an `https://` listener needs a certificate and
    /// its key, a key needs its certificate (and the other way round), and
    /// client-certificate checks need the CA to check against. Each file
    /// must be readable now; its contents are parsed when the listener
    /// starts (a parse error there names the same key).
    fn check_tls(&self) -> Result<(), ConfigError> {
        let client = TlsKeys::CLIENT;
        let peer = TlsKeys::PEER;
        for (keys, cert, key, ca, cert_auth) in [
            (
                &client,
                &self.cert_file,
                &self.key_file,
                &self.trusted_ca_file,
                self.client_cert_auth,
            ),
            (
                &peer,
                &self.peer_cert_file,
                &self.peer_key_file,
                &self.peer_trusted_ca_file,
                self.peer_client_cert_auth,
            ),
        ] {
            for (name, path) in [(keys.cert, cert), (keys.key, key), (keys.trusted_ca, ca)] {
                if let Some(path) = path {
                    std::fs::File::open(path)
                        .map_err(|e| ConfigError::invalid(name, path.display(), e))?;
                }
            }
            match (cert, key) {
                (Some(_), None) => {
                    return Err(ConfigError::invalid(
                        keys.key,
                        "",
                        format!("--{} needs --{}", keys.cert, keys.key),
                    ))
                }
                (None, Some(path)) => {
                    return Err(ConfigError::invalid(
                        keys.cert,
                        "",
                        format!("--{} {} needs --{}", keys.key, path.display(), keys.cert),
                    ))
                }
                _ => {}
            }
            if cert_auth && ca.is_none() {
                return Err(ConfigError::invalid(
                    keys.trusted_ca,
                    "",
                    format!(
                        "--{} needs the CA to check certificates against",
                        keys.cert_auth
                    ),
                ));
            }
        }
        let https = |urls: &[Url]| urls.iter().find(|u| u.scheme() == "https").cloned();
        for (listener, urls, keys, cert) in [
            (
                "listen-client-urls",
                &self.listen_client_urls,
                &client,
                &self.cert_file,
            ),
            (
                "listen-metrics-urls",
                &self.listen_metrics_urls,
                &client,
                &self.cert_file,
            ),
            (
                "listen-peer-urls",
                &self.listen_peer_urls,
                &peer,
                &self.peer_cert_file,
            ),
        ] {
            if let (Some(url), None) = (https(urls), cert) {
                return Err(ConfigError::invalid(
                    keys.cert,
                    "",
                    format!(
                        "--{listener} has {url}: TLS key/cert (--{}, --{}) must be provided",
                        keys.cert, keys.key
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The data directory, defaulting like etcd's `<name>.etcd`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.tern", self.name)))
    }

    /// `--initial-cluster` parsed; names may repeat to give several URLs.
    pub fn initial_members(&self) -> Result<Vec<InitialMember>, ConfigError> {
        let mut members: Vec<InitialMember> = Vec::new();
        for part in self
            .initial_cluster
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let (name, url) = part.split_once('=').ok_or_else(|| {
                ConfigError::invalid(
                    "initial-cluster",
                    &self.initial_cluster,
                    format!("'{part}' is not name=url"),
                )
            })?;
            let url = Url::parse(url.trim()).map_err(|e| {
                ConfigError::invalid(
                    "initial-cluster",
                    &self.initial_cluster,
                    format!("'{url}': {e}"),
                )
            })?;
            match members.iter_mut().find(|m| m.name == name) {
                Some(m) => m.peer_urls.push(url),
                None => members.push(InitialMember {
                    name: name.trim().to_string(),
                    peer_urls: vec![url],
                }),
            }
        }
        if members.is_empty() {
            return Err(ConfigError::invalid(
                "initial-cluster",
                &self.initial_cluster,
                "no members",
            ));
        }
        Ok(members)
    }

    /// `--auto-compaction-mode` and `--auto-compaction-retention` together.
    pub fn auto_compaction(&self) -> Result<AutoCompaction, ConfigError> {
        let raw = self.auto_compaction_retention.trim();
        let bad = |reason: &str| ConfigError::invalid("auto-compaction-retention", raw, reason);
        match self.auto_compaction_mode {
            AutoCompactionMode::Revision => {
                let n: i64 = raw
                    .parse()
                    .map_err(|_| bad("revision mode takes a whole number of revisions"))?;
                match n {
                    0 => Ok(AutoCompaction::Off),
                    n if n > 0 => Ok(AutoCompaction::Revision(n)),
                    _ => Err(bad("must not be negative")),
                }
            }
            AutoCompactionMode::Periodic => {
                // etcd: a bare number is hours; otherwise a Go-style duration.
                let duration = match raw.parse::<u64>() {
                    Ok(hours) => Duration::from_secs(
                        hours
                            .checked_mul(3600)
                            .ok_or_else(|| bad("too many hours"))?,
                    ),
                    Err(_) => humantime::parse_duration(raw)
                        .map_err(|_| bad("periodic mode takes a duration such as 1h or 30m, or a number of hours"))?,
                };
                if duration.is_zero() {
                    Ok(AutoCompaction::Off)
                } else {
                    Ok(AutoCompaction::Periodic(duration))
                }
            }
        }
    }
}

/// The flag names of one set of TLS settings (client or peer), so that a
/// message names the flag the operator has to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsKeys {
    pub cert: &'static str,
    pub key: &'static str,
    pub trusted_ca: &'static str,
    pub cert_auth: &'static str,
}

impl TlsKeys {
    pub const CLIENT: TlsKeys = TlsKeys {
        cert: "cert-file",
        key: "key-file",
        trusted_ca: "trusted-ca-file",
        cert_auth: "client-cert-auth",
    };
    pub const PEER: TlsKeys = TlsKeys {
        cert: "peer-cert-file",
        key: "peer-key-file",
        trusted_ca: "peer-trusted-ca-file",
        cert_auth: "peer-client-cert-auth",
    };
    /// A follower's flags for its source etcd (etcdctl's names).
    pub const SOURCE: TlsKeys = TlsKeys {
        cert: "etcd-cert",
        key: "etcd-key",
        trusted_ca: "etcd-cacert",
        cert_auth: "etcd-cert",
    };
}

/// A URL as etcd prints it: no trailing slash for an empty path.
pub fn url_string(url: &Url) -> String {
    let s = url.as_str();
    if url.path() == "/" {
        s.trim_end_matches('/').to_string()
    } else {
        s.to_string()
    }
}

fn check_urls(key: &'static str, urls: &[Url]) -> Result<(), ConfigError> {
    for url in urls {
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(ConfigError::invalid(
                key,
                url,
                "URL scheme must be http or https",
            ));
        }
        if url.host_str().is_none() || url.port_or_known_default().is_none() {
            return Err(ConfigError::invalid(
                key,
                url,
                "URL must have a host and a port",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<PrimaryConfig, ConfigError> {
        let mut all = vec!["tern-primary"];
        all.extend_from_slice(args);
        PrimaryConfig::load(all.into_iter().map(Into::into))
    }

    #[test]
    fn defaults_are_etcds() {
        let c = load(&[]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir(), PathBuf::from("default.tern"));
        assert_eq!(c.listen_client_urls[0].as_str(), "http://127.0.0.1:2379/");
        assert_eq!(c.quota_backend_bytes, DEFAULT_QUOTA_BACKEND_BYTES);
        assert_eq!(c.auto_compaction().unwrap(), AutoCompaction::Off);
        assert_eq!(c.initial_members().unwrap()[0].name, "default");
    }

    #[test]
    fn name_without_cluster_becomes_single_member() {
        let c = load(&["--name", "n1"]).unwrap();
        assert_eq!(c.initial_cluster, "n1=http://localhost:2380");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = load(&["--quota-backend-bytes", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--quota-backend-bytes") && e.contains("lots"),
            "{e}"
        );
        let e = load(&["--auto-compaction-retention", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--auto-compaction-retention") && e.contains("soon"),
            "{e}"
        );
        let e = load(&["--listen-client-urls", "ftp://127.0.0.1:1"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--listen-client-urls") && e.contains("ftp://"),
            "{e}"
        );
        let e = load(&[
            "--name",
            "x",
            "--initial-cluster",
            "y=http://127.0.0.1:2380",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--initial-cluster") && e.contains("\"x\""),
            "{e}"
        );
        let e = load(&["--election-timeout", "100"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--election-timeout"), "{e}");
    }

    #[test]
    fn tls_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "").unwrap();
        let pem = pem.to_str().unwrap();
        let e = load(&["--listen-client-urls", "https://127.0.0.1:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cert-file") && e.contains("https://"), "{e}");
        let e = load(&["--listen-peer-urls", "https://127.0.0.1:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--peer-cert-file"), "{e}");
        let e = load(&["--listen-metrics-urls", "https://127.0.0.1:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cert-file"), "{e}");
        let e = load(&["--cert-file", pem]).unwrap_err().to_string();
        assert!(e.contains("--key-file"), "{e}");
        let e = load(&["--cert-file", "/nonexistent/cert.pem", "--key-file", pem])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--cert-file") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        let e = load(&["--client-cert-auth"]).unwrap_err().to_string();
        assert!(e.contains("--trusted-ca-file"), "{e}");
        let e = load(&["--peer-client-cert-auth", "true"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--peer-trusted-ca-file"), "{e}");
        let c = load(&[
            "--listen-client-urls",
            "https://127.0.0.1:1",
            "--cert-file",
            pem,
            "--key-file",
            pem,
            "--trusted-ca-file",
            pem,
            "--client-cert-auth",
        ])
        .unwrap();
        assert!(c.client_cert_auth);
    }

    #[test]
    fn retention_forms() {
        let c = load(&["--auto-compaction-retention", "2"]).unwrap();
        assert_eq!(
            c.auto_compaction().unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(7200))
        );
        let c = load(&["--auto-compaction-retention", "30m"]).unwrap();
        assert_eq!(
            c.auto_compaction().unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(1800))
        );
        let c = load(&[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "100",
        ])
        .unwrap();
        assert_eq!(c.auto_compaction().unwrap(), AutoCompaction::Revision(100));
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("tern-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("primary.toml");
        std::fs::write(
            &path,
            "name = \"filed\"\nsnapshot-count = 77\nmax-txn-ops = 5\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = load(&["--config-file", p, "--max-txn-ops", "9"]).unwrap();
        assert_eq!(c.name, "filed");
        assert_eq!(c.snapshot_count, 77);
        assert_eq!(c.max_txn_ops, 9);
        // A list given as a flag replaces the file's, not adds to it.
        std::fs::write(
            &path,
            "listen-client-urls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n",
        )
        .unwrap();
        let c = load(&["--config-file", p]).unwrap();
        assert_eq!(c.listen_client_urls.len(), 2);
        let c = load(&[
            "--config-file",
            p,
            "--listen-client-urls",
            "http://127.0.0.1:3",
        ])
        .unwrap();
        assert_eq!(c.listen_client_urls.len(), 1);
        assert_eq!(c.listen_client_urls[0].as_str(), "http://127.0.0.1:3/");
        std::fs::write(&path, "snapshot-count = \"many\"\n").unwrap();
        let e = load(&["--config-file", p]).unwrap_err().to_string();
        assert!(e.contains("--snapshot-count") && e.contains("many"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
