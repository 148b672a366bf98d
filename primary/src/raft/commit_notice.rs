//! Telling the other members what is committed, without a round of its
//! own for every put.
//!
//! Left to itself, raft-rs has the leader send every member an empty
//! append each time its commit index moves. Each one costs every member a
//! round (receive, step, acknowledge, apply) and the leader an
//! acknowledgement to read back: with one client, twice the rounds a put
//! needs, and a third of a follower's CPU per put. With `skip_bcast_commit`
//! the commit index instead rides the next append or heartbeat, which under
//! load is a fraction of a millisecond away, but when the writes stop it
//! could be a heartbeat interval: a follower's serializable reads and
//! watches, and a learner's lag, would wait for it. So the leader notes the
//! commit index each member was last sent, and a member still behind
//! [`PIGGYBACK_WAIT`] after the commit moved gets an append of its own.
//!
//! A member that forwarded a proposal (its client put through it) does not
//! wait: its client's answer waits for that member to learn the commit and
//! apply the entry, so it is told as soon as the entry commits, as raft-rs
//! would without `skip_bcast_commit`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};

/// How long a newly committed index may wait for an append to carry it to
/// a voter. One client's next put, or the next of a steady 1000 puts/s,
/// comes sooner. A learner is told at once: it is a region's copy, its lag
/// is what a takeover loses, and a message more on its link costs the
/// voters nothing they wait for.
pub const PIGGYBACK_WAIT: Duration = Duration::from_millis(2);

/// What the leader has told each member of its commit index.
#[derive(Default)]
pub struct CommitNotices {
    /// The highest commit index sent to each member.
    told: HashMap<u64, u64>,
    /// Members not told a commit index yet: which one, and when they get
    /// an append of their own if no other append carries it by then.
    /// Later commits wait their own turn: under steady load there is
    /// always a newer one not sent yet.
    waits: HashMap<u64, (Instant, u64)>,
    /// Members whose forwarded proposals are not committed yet: the
    /// highest index among them.
    proposed: HashMap<u64, u64>,
}

impl CommitNotices {
    /// Note the commit indexes that `messages`, about to be sent, carry.
    pub fn sent(&mut self, messages: &[Message]) {
        for m in messages {
            if matches!(
                m.get_msg_type(),
                MessageType::MsgAppend | MessageType::MsgHeartbeat
            ) {
                let told = self.told.entry(m.to).or_default();
                *told = (*told).max(m.commit);
                if self.waits.get(&m.to).is_some_and(|(_, c)| *c <= *told) {
                    self.waits.remove(&m.to);
                }
            }
        }
    }

    /// Member `from` forwarded a proposal the leader appended at `index`.
    pub fn proposed(&mut self, from: u64, index: u64) {
        let highest = self.proposed.entry(from).or_default();
        *highest = (*highest).max(index);
    }

    /// The leader's commit index is `committed`: each of `peers` (id, and
    /// whether it is a learner) not told it and not waiting already starts
    /// to wait; a learner, or a member whose forwarded proposal is now
    /// committed, is due at once.
    pub fn committed(&mut self, committed: u64, peers: impl IntoIterator<Item = (u64, bool)>) {
        let now = Instant::now();
        for (id, learner) in peers {
            let its_proposal_committed = self
                .proposed
                .get(&id)
                .is_some_and(|index| *index <= committed);
            if its_proposal_committed {
                self.proposed.remove(&id);
            }
            if self.told.get(&id).copied().unwrap_or(0) < committed {
                let wait = if learner || its_proposal_committed {
                    Duration::ZERO
                } else {
                    PIGGYBACK_WAIT
                };
                let (at, _) = self.waits.entry(id).or_insert((now + wait, committed));
                *at = (*at).min(now + wait);
            }
        }
    }

    /// When [`CommitNotices::overdue`] has something to say.
    pub fn due(&self) -> Option<Instant> {
        self.waits.values().map(|(at, _)| *at).min()
    }

    /// The members whose wait is over, which should now get an append of
    /// their own (carrying the latest commit index).
    pub fn overdue(&mut self) -> Vec<u64> {
        let now = Instant::now();
        let mut over = Vec::new();
        self.waits.retain(|id, (at, _)| {
            let waiting = *at > now;
            if !waiting {
                over.push(*id);
            }
            waiting
        });
        over
    }

    /// Forget everything: this member is no longer the leader, or is again.
    pub fn reset(&mut self) {
        self.told.clear();
        self.waits.clear();
        self.proposed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(to: u64, commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = to;
        m.commit = commit;
        m
    }

    fn wait_until(due: Option<Instant>) {
        std::thread::sleep(due.unwrap().saturating_duration_since(Instant::now()));
    }

    #[test]
    fn a_commit_carried_by_an_append_needs_no_message_of_its_own() {
        let mut notices = CommitNotices::default();
        notices.committed(5, [(2, false), (3, false)]);
        assert!(notices.due().is_some(), "members 2 and 3 were told nothing");
        notices.sent(&[append(2, 5), append(3, 5)]);
        assert!(notices.due().is_none());
        assert!(notices.overdue().is_empty());
    }

    #[test]
    fn a_newer_commit_does_not_stretch_the_wait_or_trigger_it() {
        let mut notices = CommitNotices::default();
        notices.committed(5, [(2, false)]);
        let due = notices.due();
        // The next put's append carries 5; by then 6 is committed, which
        // only the append after can carry.
        notices.committed(6, [(2, false)]);
        assert_eq!(notices.due(), due, "6 waits behind 5");
        notices.sent(&[append(2, 5)]);
        notices.committed(6, [(2, false)]);
        let next = notices.due().expect("6 waits now");
        assert!(next >= due.unwrap());
        assert!(notices.overdue().is_empty());
    }

    #[test]
    fn members_not_told_in_time_are_named_once_the_wait_is_over() {
        let mut notices = CommitNotices::default();
        notices.sent(&[append(2, 7)]);
        notices.committed(7, [(2, false), (3, false)]);
        assert!(notices.overdue().is_empty(), "the wait is not over yet");
        wait_until(notices.due());
        assert_eq!(notices.overdue(), vec![3]);
        assert!(notices.due().is_none());
        notices.committed(7, [(2, false)]);
        assert!(notices.due().is_none(), "member 2 was told 7 already");
    }

    #[test]
    fn a_learner_is_told_at_once() {
        let mut notices = CommitNotices::default();
        notices.committed(3, [(2, false), (4, true)]);
        assert_eq!(notices.overdue(), vec![4]);
        assert!(notices.due().is_some(), "voter 2 still waits");
    }

    #[test]
    fn a_member_whose_proposal_committed_is_told_at_once() {
        let mut notices = CommitNotices::default();
        notices.proposed(2, 6);
        notices.committed(5, [(2, false), (3, false)]);
        assert!(notices.overdue().is_empty(), "its entry 6 is not committed");
        notices.committed(6, [(2, false), (3, false)]);
        assert_eq!(notices.overdue(), vec![2], "member 2 waits for entry 6");
        assert!(notices.due().is_some(), "member 3 still waits");
        notices.sent(&[append(2, 6)]);
        notices.committed(7, [(2, false)]);
        assert!(notices.overdue().is_empty(), "entry 7 is not member 2's");
    }

    #[test]
    fn a_heartbeat_tells_too_and_a_reset_forgets() {
        let mut notices = CommitNotices::default();
        let mut heartbeat = append(2, 4);
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        notices.sent(&[heartbeat]);
        notices.committed(4, [(2, false)]);
        assert!(notices.due().is_none());
        notices.reset();
        notices.committed(4, [(2, false)]);
        assert!(notices.due().is_some());
    }
}
