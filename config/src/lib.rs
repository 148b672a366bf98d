//! Configuration for the Tern programs.
//!
//! # Layout
//!
//! - [`primary`]: [`PrimaryConfig`], every flag of `tern-primary`, with etcd's
//!   names and defaults, and the checks that span several flags.
//! - [`learner`]: [`LearnerConfig`], `tern-learner`'s flags: a member's,
//!   plus (later) its backup settings.
//! - [`file`]: the TOML loader. A config file is not a second schema: each
//!   top-level key is turned into the flag of the same name and handed to clap
//!   before the command-line flags, so a flag always wins over the file and a
//!   bad value is reported by the same parser, naming the same key, wherever
//!   it came from.
//! - [`ConfigError`]: what stops start-up, always naming the key and value.

pub mod file;
pub mod learner;
pub mod primary;

pub use file::load;
pub use learner::{BackupConfig, FollowConfig, LearnerConfig};
pub use primary::{
    AutoCompaction, AutoCompactionMode, ClusterState, InitialMember, PrimaryConfig, TlsKeys,
};

/// Why a configuration was refused. Every variant names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Toml { path: String, message: String },
    #[error("unknown key '{key}' in config file {path}")]
    UnknownKey { path: String, key: String },
    #[error("config file {path}: key '{key}' has a value of unsupported type ({kind})")]
    UnsupportedValue {
        path: String,
        key: String,
        kind: &'static str,
    },
    #[error("invalid value '{value}' for '--{key}': {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// clap's own message: unknown flag, unparsable value, `--help`, `--version`.
    #[error("{0}")]
    Flags(#[from] clap::Error),
}

impl ConfigError {
    pub(crate) fn invalid(key: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        ConfigError::Invalid {
            key,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Exit with clap's conventions (help and version to stdout with code 0,
    /// errors to stderr with code 2).
    pub fn exit(self) -> ! {
        match self {
            ConfigError::Flags(e) => e.exit(),
            other => {
                eprintln!("error: {other}");
                std::process::exit(2)
            }
        }
    }
}
