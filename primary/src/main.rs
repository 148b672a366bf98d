//! `tern-primary`: flags -> config -> run. Nothing else.

use tern_config::PrimaryConfig;

/// Requests allocate on one thread and free on another (handler, Raft
/// thread, watch streams); mimalloc handles that far better than glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = PrimaryConfig::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let filter = EnvFilter::try_new(&config.log_level).map_err(|e| {
        anyhow::anyhow!(
            "invalid value '{}' for '--log-level': {e}",
            config.log_level
        )
    })?;
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
    runtime.block_on(tern_primary::server::run(config))?;
    Ok(())
}
