//! `tern-restore`: list, verify and restore Tern backups, and run restore
//! drills; and `tern-appliance`, the whole product on one machine.
//!
//! - [`catalog`]: the backups in a store, newest first.
//! - [`verify`]: download, sha256, decrypt, decompress, integrity check,
//!   recomputed hash against the manifest.
//! - [`restore`]: a verified backup becomes a new single-member cluster's
//!   data dir.
//! - [`drill`]: restore the newest backup, start a real member, check it
//!   through the etcd API, report RTO and RPO.
//! - [`import_etcd`]: an `etcdctl snapshot save` file becomes a new
//!   single-member cluster's data dir.
//! - [`appliance`]: `tern-appliance`, a primary, a learner with hourly
//!   encrypted backups and an hourly drill, on embedded defaults.
//! - [`progress`]: progress bars on stderr.

pub mod appliance;
pub mod catalog;
pub mod drill;
pub mod progress;
pub mod replay;
pub mod verify;

// Shared with tern-learner's follow mode, which bootstraps from an etcd
// snapshot the way `import-etcd` does.
pub use tern_primary::import_etcd;
pub use tern_primary::seed as restore;
