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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, MessageType};

/// How long a newly committed index may wait for an append to carry it.
/// One client's next put, or the next of a steady 1000 puts/s, comes
/// sooner.
pub const PIGGYBACK_WAIT: Duration = Duration::from_millis(2);

/// What the leader has told each member of its commit index.
#[derive(Default)]
pub struct CommitNotices {
    /// The highest commit index sent to each member.
    told: HashMap<u64, u64>,
    /// The commit index being waited for, and when the members not told
    /// it by then get an append of their own. Later commits wait their own
    /// turn: under steady load there is always a newer one not sent yet.
    due: Option<(Instant, u64)>,
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
            }
        }
    }

    /// The leader's commit index is `committed`: start the wait if one of
    /// `peers` has not been told it.
    pub fn committed(&mut self, committed: u64, peers: impl IntoIterator<Item = u64>) {
        if self.due.is_none() && peers.into_iter().any(|id| self.behind(id, committed)) {
            self.due = Some((Instant::now() + PIGGYBACK_WAIT, committed));
        }
    }

    /// When [`CommitNotices::overdue`] has something to say.
    pub fn due(&self) -> Option<Instant> {
        self.due.map(|(at, _)| at)
    }

    /// Once the wait is over: the members of `peers` still not told the
    /// commit index waited for, which should now get an append of their
    /// own (carrying the latest).
    pub fn overdue(&mut self, peers: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let Some((at, waited_for)) = self.due else {
            return Vec::new();
        };
        if Instant::now() < at {
            return Vec::new();
        }
        self.due = None;
        peers
            .into_iter()
            .filter(|id| self.behind(*id, waited_for))
            .collect()
    }

    /// Forget everything: this member is no longer the leader, or is again.
    pub fn reset(&mut self) {
        self.told.clear();
        self.due = None;
    }

    fn behind(&self, id: u64, committed: u64) -> bool {
        self.told.get(&id).copied().unwrap_or(0) < committed
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

    #[test]
    fn a_commit_carried_by_an_append_needs_no_message_of_its_own() {
        let mut notices = CommitNotices::default();
        notices.committed(5, [2, 3]);
        let due = notices.due().expect("members 2 and 3 were told nothing");
        notices.sent(&[append(2, 5), append(3, 5)]);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        assert!(notices.overdue([2, 3]).is_empty());
        assert!(notices.due().is_none());
    }

    #[test]
    fn a_newer_commit_does_not_stretch_the_wait_or_trigger_it() {
        let mut notices = CommitNotices::default();
        notices.committed(5, [2]);
        let due = notices.due().unwrap();
        // The next put's append carries 5; by the deadline 6 is committed
        // but only the next append can carry it.
        notices.sent(&[append(2, 5)]);
        notices.committed(6, [2]);
        assert_eq!(notices.due(), Some(due));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        assert!(notices.overdue([2]).is_empty());
        notices.committed(6, [2]);
        assert!(notices.due().is_some_and(|next| next > due));
    }

    #[test]
    fn members_not_told_in_time_are_named_once_the_wait_is_over() {
        let mut notices = CommitNotices::default();
        notices.sent(&[append(2, 7)]);
        notices.committed(7, [2, 3]);
        assert!(
            notices.overdue([2, 3]).is_empty(),
            "the wait is not over yet"
        );
        std::thread::sleep(PIGGYBACK_WAIT);
        assert_eq!(notices.overdue([2, 3]), vec![3]);
        assert!(notices.due().is_none());
        notices.committed(7, [2]);
        assert!(notices.due().is_none(), "member 2 was told 7 already");
    }

    #[test]
    fn a_heartbeat_tells_too_and_a_reset_forgets() {
        let mut notices = CommitNotices::default();
        let mut heartbeat = append(2, 4);
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        notices.sent(&[heartbeat]);
        notices.committed(4, [2]);
        assert!(notices.due().is_none());
        notices.reset();
        notices.committed(4, [2]);
        assert!(notices.due().is_some());
    }
}
