//! `tern-learner`'s flags: a member's flags (same names, same TOML keys),
//! to which the backup settings are added.

use clap::Parser;

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
}

impl LearnerConfig {
    /// Parse flags (and the config file they name) and validate them.
    pub fn load(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Self, ConfigError> {
        let mut config: LearnerConfig = crate::load(args)?;
        config.member.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples shipped in systemd/ must keep loading.
    #[test]
    fn shipped_examples_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
        let learner = dir.join("learner.toml");
        let config = LearnerConfig::load(
            ["tern-learner", "--config-file", learner.to_str().unwrap()].map(Into::into),
        )
        .unwrap();
        assert_eq!(config.member.name, "dr");
        assert_eq!(config.member.initial_members().unwrap().len(), 4);
        let primary = dir.join("primary.toml");
        PrimaryConfig::load(
            ["tern-primary", "--config-file", primary.to_str().unwrap()].map(Into::into),
        )
        .unwrap();
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
