//! Tern's voting member and the library the other programs share.
//!
//! # Layout
//!
//! A write flows in one direction: [`api`] (gRPC handlers: validate,
//! translate) → [`member`] (propose and wait) → [`raft`] (the node thread:
//! log, fsync, commit) → [`apply`] (etcd request semantics) → [`mvcc`]
//! (revisions in SQLite) → [`watch`] (events to watchers). A linearizable
//! read asks [`raft`] for a read index, then reads from the [`mvcc`] read
//! pool; a serializable read goes straight to the pool.
//!
//! - [`proto`]: the etcd v3 API (`etcdserverpb`, `mvccpb`, `authpb`, written
//!   from etcd's API reference, wire-identical) and Tern's Raft entry.
//! - [`api`]: one module per etcd service; [`error`] maps every failure to
//!   etcd's gRPC code and message.
//! - [`member`]: what a running member owns; shared by all handlers.
//! - [`forward`]: requests a follower sends on to the leader.
//! - [`raft`]: the node loop (`on_ready`) and the durable log.
//! - [`checkpointer`]: SQLite WAL checkpoints on a thread of their own, so
//!   no commit waits for one.
//! - [`apply`]: executes committed requests; also serves ranges.
//! - [`mvcc`]: SQLite schema, writer, reads, history, hash, and the etcd
//!   backend layout the Snapshot RPC streams.
//! - [`bbolt`]: bbolt files (etcd's backend format): a bulk-load writer for
//!   the Snapshot RPC, a streaming reader for `tern-restore import-etcd`.
//! - [`auth`]: users, roles, key-range permissions and simple tokens
//!   (etcd's RBAC); changed only through the log, checked by [`api`] on
//!   every member and the learner.
//! - [`lease`]: lease deadlines (the leader revokes expired leases via Raft).
//! - [`watch`]: the watch hub (synced fan-out and history replay).
//! - [`housekeeping`]: lease expiry, auto-compaction, size tracking.
//! - [`gateway`]: etcd's JSON gateway (`/v3/kv/range`…), calling into the
//!   gRPC services.
//! - [`http`]: `/version`, `/health`, `/livez`, `/readyz` and `/metrics`; [`metrics`]: etcd-named metrics
//!   (server, disk, peer network, gRPC, process).
//! - [`readiness`]: systemd's `Type=notify` (`READY=1` once clients are
//!   served, `STATUS=`, `STOPPING=1`).
//! - [`identity`]: etcd-compatible member and cluster ids.
//! - [`seed`]: a state file becomes a new single-member cluster's data dir
//!   (restores, imports); [`import_etcd`]: an etcd snapshot becomes one.
//! - [`server`]: start-up (bootstrap, join, disaster takeover) and serving;
//!   [`launch`]: logging and runtime for the binaries.
//! - [`takeover`]: `POST /takeover`, disaster takeover of a running learner.
//! - [`authority_shim`]: lets etcdctl 3.4's `:authority: http://host:port`
//!   through h2 on the client listeners.
//! - [`tls`]: rustls on `https://` listeners (client, metrics, peer), with
//!   certificate reload on SIGHUP or file change, and the TLS settings a
//!   member dials other members' `https://` URLs with.

pub mod api;
pub mod apply;
pub mod auth;
pub mod authority_shim;
pub mod bbolt;
pub mod checkpointer;
pub mod codec;
pub mod disk_room;
pub mod error;
pub mod forward;
pub mod gateway;
pub mod housekeeping;
pub mod http;
pub mod identity;
pub mod import_etcd;
pub mod launch;
pub mod lease;
pub mod member;
pub mod metrics;
pub mod mvcc;
pub mod raft;
pub mod readiness;
pub mod seed;
pub mod server;
pub mod takeover;
pub mod tls;
pub mod watch;

/// Generated protobuf and gRPC code.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
        include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
        include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
    }
    pub mod ternpb {
        tonic::include_proto!("ternpb");
    }
}
