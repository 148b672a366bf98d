//! `tern-learner`: the non-voting, cross-region member. It runs the same
//! member code as `tern-primary` but only ever joins as a Raft learner
//! (added first with `etcdctl member add <name> --learner`): it tails the
//! leader's log into its own state, serves serializable reads and watches
//! (everything else gets etcd's learner error), and writes backups.

use tern_config::LearnerConfig;
use tern_primary::server::Role;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = LearnerConfig::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let backups = tern_learner::backup::extension(&config.backup).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    tern_primary::launch::launch_with(config.member, Role::Learner, backups)
}
