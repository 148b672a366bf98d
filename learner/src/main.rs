//! `tern-learner`: the non-voting, cross-region member. It runs the same
//! member code as `tern-primary` but only ever joins as a Raft learner
//! (added first with `etcdctl member add <name> --learner`): it tails the
//! leader's log into its own state, serves serializable reads and watches
//! (everything else gets etcd's learner error), and writes backups. With
//! `--etcd-endpoints` it follows a running etcd cluster instead
//! ([`tern_learner::follow`]).

use tern_config::LearnerConfig;
use tern_primary::server::{Extension, Role};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tern_primary::launch::without_transparent_huge_pages();
    // Before any SQLite connection opens.
    tern_primary::mvcc::page_cache::install();
    let mut config = LearnerConfig::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let backups = tern_learner::backup::extension(&config.backup).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    if !config.follow.enabled() {
        return tern_primary::launch::launch_with(config.member, Role::Learner, backups);
    }
    // A follower is a cluster of one, named by its own flags.
    let member = &mut config.member;
    member.initial_cluster = format!(
        "{}={}",
        member.name,
        member
            .initial_advertise_peer_urls
            .iter()
            .map(tern_config::primary::url_string)
            .collect::<Vec<_>>()
            .join(&format!(",{}=", member.name))
    );
    member.initial_cluster_state = tern_config::ClusterState::New;
    let follow = config.follow.clone();
    let extensions: Vec<Extension> = [Some(tern_learner::follow::extension(follow)), backups]
        .into_iter()
        .flatten()
        .collect();
    let extension: Extension = Box::new(move |member| {
        extensions
            .into_iter()
            .fold(axum::Router::new(), |router, extend| {
                router.merge(extend(member.clone()))
            })
    });
    let seed = config.follow.clone();
    tern_primary::launch::launch_prepared(
        config.member,
        Role::Follower,
        Some(extension),
        move |member| Box::pin(async move { tern_learner::follow::seed(&seed, &member).await }),
    )
}
