//! Consensus: the Raft node loop and its durable log.
//!
//! - [`node`]: [`RaftNode`], one thread that owns the raft-rs `RawNode`, the
//!   log and the MVCC writer, and runs the `on_ready` loop; [`NodeHandle`]
//!   is how the async side proposes, waits for read indexes and reads
//!   status.
//! - [`commit_notice`]: telling the other members what is committed
//!   without a message of its own per put.
//! - [`read_context`]: naming read index requests so that no
//!   acknowledgement of one can confirm another.
//! - [`log_store`]: [`LogStore`], the fsynced Raft log (raft-rs `Storage`);
//!   [`wal`]: its segment files; [`legacy_log`]: migrating the SQLite log
//!   of earlier versions.
//! - [`transport`]: sending messages and snapshots to peers over gRPC;
//!   [`peer_service`]: receiving them (the `ternpb.Peer` service).
//! - [`snapshot`]: state snapshots for members too far behind the log.
//! - [`takeover`]: what a disaster takeover keeps and the entries that
//!   tell the other learners.

pub mod commit_notice;
pub mod legacy_log;
pub mod log_store;
pub mod node;
pub mod peer_service;
pub mod read_context;
pub mod snapshot;
pub mod takeover;
pub mod transport;
pub mod wal;

pub use log_store::LogStore;
pub use node::{NodeHandle, NodeStatus, ProposeError, RaftNode};
