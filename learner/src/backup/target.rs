//! The backup target: an object_store URL plus the S3-compatible options.
//! Credentials come from the environment the way each cloud SDK reads them
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`) and are handed to object_store without
//! ever being logged.

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use super::BackupError;

pub struct Target {
    pub store: Arc<dyn ObjectStore>,
    /// The URL's prefix: `backups/` and `segments/` live under it.
    pub root: Path,
    /// `<prefix>/backups`: manifests and data objects.
    pub backups: Path,
    /// The URL as configured (no credentials ever appear in it).
    pub url: String,
    /// For a `file://` URL, the directory `backups/` is: object_store's
    /// local store stages an upload in `<name>#<n>` beside its object and
    /// hides such files from listings, so what a killed upload left can
    /// only be found (and removed) on the filesystem.
    pub local_backups: Option<std::path::PathBuf>,
}

/// Options for S3-compatible stores (the `--backup-s3-*` flags).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub allow_http: bool,
}

impl From<&tern_config::BackupConfig> for S3Options {
    fn from(c: &tern_config::BackupConfig) -> Self {
        S3Options {
            endpoint: c.s3_endpoint.clone(),
            region: c.s3_region.clone(),
            path_style: c.s3_path_style,
            allow_http: c.s3_allow_http,
        }
    }
}

/// Environment prefixes whose variables configure the cloud stores.
const ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

impl Target {
    pub fn open(url: &str, s3: &S3Options) -> Result<Target, BackupError> {
        let parsed = Url::parse(url).map_err(|e| BackupError::Config {
            key: "backup-url",
            reason: format!("'{url}': {e}"),
        })?;
        tern_primary::tls::install_crypto_provider();
        if parsed.scheme() == "file" {
            // object_store's local store wants the directory to exist.
            std::fs::create_dir_all(parsed.path()).map_err(|e| BackupError::Config {
                key: "backup-url",
                reason: format!("cannot create {}: {e}", parsed.path()),
            })?;
        }
        let mut options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        if let Some(endpoint) = &s3.endpoint {
            // object_store panics on an endpoint it cannot build requests
            // from; refuse it here, naming the flag.
            match Url::parse(endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(BackupError::Config {
                        key: "backup-s3-endpoint",
                        reason: format!("'{endpoint}': not an http:// or https:// URL"),
                    })
                }
            }
            options.push(("aws_endpoint".into(), endpoint.clone()));
        }
        if let Some(region) = &s3.region {
            options.push(("aws_region".into(), region.clone()));
        }
        if s3.path_style {
            options.push(("aws_virtual_hosted_style_request".into(), "false".into()));
        }
        if s3.allow_http {
            options.push(("aws_allow_http".into(), "true".into()));
        }
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, options).map_err(|e| BackupError::Config {
                key: "backup-url",
                reason: format!("'{url}': {e}"),
            })?;
        let local_backups = (parsed.scheme() == "file").then(|| {
            std::path::Path::new("/")
                .join(prefix.as_ref())
                .join("backups")
        });
        Ok(Target {
            local_backups,
            store: Arc::from(store),
            backups: prefix.clone().join("backups"),
            root: prefix,
            url: url.to_string(),
        })
    }

    pub fn path(&self, name: &str) -> Path {
        self.backups.clone().join(name)
    }
}
