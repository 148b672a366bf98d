//! `tern-learner`: the non-voting cross-region member.
//!
//! Not built yet: replication (issue "Replication") and backups (issue
//! "Off-site backups") land here. Until then the binary refuses to start, so
//! nobody mistakes it for a working standby.

fn main() {
    eprintln!("tern-learner: not implemented yet; see README.md (Roadmap)");
    std::process::exit(2);
}
