//! Disaster takeover (etcd's `--force-new-cluster`, done on a learner):
//! this member becomes the only voter of a new cluster from its own
//! applied state, and the other learners stay learners of it.
//!
//! The log restarts after the last applied entry with a forced
//! configuration (this member the one voter, the kept learners learners),
//! followed by committed membership entries that say the same thing to the
//! other learners: promote this member, remove every old voter. The other
//! learners receive them from the new leader like any entry, so their
//! member lists and Raft configurations follow without being re-added.

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType};

use crate::proto::ternpb::MemberChange;

/// What a takeover keeps and drops.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The forced configuration: `me` the only voter, the kept learners.
    pub conf: ConfState,
    /// Learners that go on following the new leader.
    pub kept: Vec<u64>,
    /// Members of the old configuration that leave it: its voters, and
    /// learners the caller asked to drop.
    pub removed: Vec<u64>,
}

impl Plan {
    /// The plan for `me` taking over from configuration `old`, dropping
    /// the learners in `drop` as well as the old voters.
    pub fn new(me: u64, old: &ConfState, drop: &[u64]) -> Plan {
        let kept: Vec<u64> = old
            .learners
            .iter()
            .copied()
            .filter(|id| *id != me && !drop.contains(id))
            .collect();
        let mut removed: Vec<u64> = old
            .voters
            .iter()
            .chain(old.learners.iter())
            .copied()
            .filter(|id| *id != me && !kept.contains(id))
            .collect();
        removed.sort_unstable();
        removed.dedup();
        Plan {
            conf: ConfState {
                voters: vec![me],
                learners: kept.clone(),
                ..Default::default()
            },
            kept,
            removed,
        }
    }

    /// The membership entries that follow the forced configuration, at
    /// `first_index` on in `term`: promote `me` first, so the old
    /// configuration, as the other learners hold it, never runs out of
    /// voters while the old ones are removed one at a time.
    /// With no other member, old or kept, there is no one to tell: none.
    pub fn entries(&self, me: u64, first_index: u64, term: u64) -> Vec<Entry> {
        if self.kept.is_empty() && self.removed.is_empty() {
            return Vec::new();
        }
        let promote = std::iter::once((ConfChangeType::AddNode, me, false));
        let removals = self
            .removed
            .iter()
            .map(|id| (ConfChangeType::RemoveNode, *id, false));
        promote
            .chain(removals)
            .zip(first_index..)
            .map(|((kind, id, is_learner), index)| {
                let cc = ConfChange {
                    change_type: kind,
                    node_id: id,
                    ..Default::default()
                };
                let context = MemberChange {
                    id,
                    is_learner,
                    ..Default::default()
                };
                let mut entry = Entry {
                    index,
                    term,
                    data: cc.write_to_bytes().expect("a ConfChange encodes").into(),
                    context: context.encode_to_vec().into(),
                    ..Default::default()
                };
                entry.set_entry_type(EntryType::EntryConfChange);
                entry
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_the_other_learners_and_removes_the_voters() {
        let plan = Plan::new(4, &conf(&[1, 2, 3], &[4, 5, 6]), &[]);
        assert_eq!(plan.conf.voters, vec![4]);
        assert_eq!(plan.kept, vec![5, 6]);
        assert_eq!(plan.conf.learners, vec![5, 6]);
        assert_eq!(plan.removed, vec![1, 2, 3]);
    }

    #[test]
    fn dropped_learners_are_removed_too() {
        let plan = Plan::new(4, &conf(&[1, 2, 3], &[4, 5, 6]), &[6]);
        assert_eq!(plan.kept, vec![5]);
        assert_eq!(plan.removed, vec![1, 2, 3, 6]);
    }

    #[test]
    fn entries_promote_first_then_remove_in_order() {
        let plan = Plan::new(4, &conf(&[1, 2], &[4, 5]), &[]);
        let entries = plan.entries(4, 101, 7);
        let decoded: Vec<(u64, u64, ConfChangeType)> = entries
            .iter()
            .map(|e| {
                let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
                let ctx = MemberChange::decode(&e.context[..]).unwrap();
                assert_eq!(ctx.id, cc.node_id);
                assert_eq!(e.term, 7);
                assert_eq!(e.get_entry_type(), EntryType::EntryConfChange);
                (e.index, cc.node_id, cc.get_change_type())
            })
            .collect();
        assert_eq!(
            decoded,
            vec![
                (101, 4, ConfChangeType::AddNode),
                (102, 1, ConfChangeType::RemoveNode),
                (103, 2, ConfChangeType::RemoveNode),
            ]
        );
    }

    #[test]
    fn a_lone_member_needs_no_entries() {
        let plan = Plan::new(4, &ConfState::default(), &[]);
        assert_eq!(plan.conf.voters, vec![4]);
        assert!(plan.entries(4, 2, 2).is_empty());
    }

    #[test]
    fn an_old_configuration_applied_entry_by_entry_ends_with_the_plan() {
        // What another learner's raft-rs does with the entries.
        let old = conf(&[1, 2, 3], &[4, 5, 6]);
        let plan = Plan::new(4, &old, &[]);
        let storage = raft::storage::MemStorage::new_with_conf_state(old);
        let config = raft::Config {
            id: 5,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw = raft::RawNode::new(&config, storage, &logger).unwrap();
        let mut cs = ConfState::default();
        for e in plan.entries(4, 2, 2) {
            let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
            cs = raw.apply_conf_change(&cc).unwrap();
        }
        assert_eq!(cs.voters, vec![4]);
        let mut learners = cs.learners.clone();
        learners.sort_unstable();
        assert_eq!(learners, vec![5, 6]);
    }
}
