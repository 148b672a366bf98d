//! `tern-primary`: flags -> config -> run. Nothing else.

use tern_config::PrimaryConfig;
use tern_primary::server::Role;

/// Requests allocate on one thread and free on another (handler, Raft
/// thread, watch streams); mimalloc handles that far better than glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tern_primary::launch::without_transparent_huge_pages();
    // Before any SQLite connection opens.
    tern_primary::mvcc::page_cache::install();
    let config = PrimaryConfig::load(std::env::args_os()).unwrap_or_else(|e| e.exit());
    tern_primary::launch::launch(config, Role::Primary)
}
