//! `tern-restore`: list, verify, restore and drill Tern backups.
//!
//! Not built yet: it needs the learner's backup format first. Until then the
//! binary refuses to run, so no script takes a silent success for a restore.

fn main() {
    eprintln!("tern-restore: not implemented yet; see README.md (Roadmap)");
    std::process::exit(2);
}
