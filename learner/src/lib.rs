//! `tern-learner`: the non-voting, cross-region member, and its backups.
//!
//! The member itself is `tern-primary`'s library run as a learner
//! ([`tern_primary::server::Role::Learner`]); this crate adds what only the
//! learner does: [`backup`], scheduled, compressed, encrypted full backups
//! of its state to object storage, with retention.

pub mod backup;
