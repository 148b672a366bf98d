//! `tern-learner`: the non-voting, cross-region member, and its backups.
//!
//! The member itself is `tern-primary`'s library run as a learner
//! ([`tern_primary::server::Role::Learner`]); this crate adds what only the
//! learner does: [`backup`], scheduled, compressed, encrypted full backups
//! of its state to object storage, with retention; and [`follow`], the
//! learner as the replica of a running etcd cluster.

pub mod backup;
pub mod follow;
