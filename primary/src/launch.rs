//! What `tern-primary` and `tern-learner` do after parsing flags: set up
//! logging, start the runtime, run the member.

use tern_config::PrimaryConfig;
use tracing_subscriber::EnvFilter;

use crate::server::{run_with, Extension, Role};

/// Keep transparent huge pages out of this process; call first thing in
/// `main`. mimalloc marks its 1 GiB arenas `MADV_HUGEPAGE`, so the first
/// touch of each 2 MiB of one faulted in, and zeroed, a whole huge page:
/// on this VM 7-17 ms at a time, spent by whichever thread allocated, the
/// Raft thread included (`perf sched timehist`: `folio_zero_user` under
/// `do_huge_pmd_anonymous_page`). At 100 clients of puts those were most
/// of the Raft turns over 20 ms. Without them, etcd's `benchmark put`
/// at 100 clients (1 KiB, sequential keys) had a p99 of 9.9-15.0 ms
/// against 13.9-20.3 ms, three alternating runs each. (The pages touched
/// before `main` may still be huge.) A kernel without the flag (before
/// 3.15) leaves things as they were.
pub fn without_transparent_huge_pages() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

pub fn launch(config: PrimaryConfig, role: Role) -> anyhow::Result<()> {
    launch_with(config, role, None)
}

pub fn launch_with(
    config: PrimaryConfig,
    role: Role,
    extension: Option<Extension>,
) -> anyhow::Result<()> {
    launch_prepared(config, role, extension, |_| Box::pin(async { Ok(()) }))
}

/// [`launch_with`], with `prepare` run first on the runtime, once logging is
/// set up (a follower seeds its data dir from its source there).
pub fn launch_prepared(
    config: PrimaryConfig,
    role: Role,
    extension: Option<Extension>,
    prepare: impl FnOnce(
        PrimaryConfig,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>,
) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log_level).map_err(|e| {
        anyhow::anyhow!(
            "invalid value '{}' for '--log-level': {e}",
            config.log_level
        )
    })?;
    // rustls warns on every TLS connection whose client names the server
    // by IP address (Node's gRPC does; the connection works, and etcd says
    // nothing): hundreds of lines a minute. Unless the level names rustls.
    let filter = if config.log_level.contains("rustls") {
        filter
    } else {
        filter.add_directive("rustls::msgs::handshake=error".parse()?)
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if config.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        prepare(config.clone()).await?;
        run_with(config, role, extension).await?;
        anyhow::Ok(())
    })
}
