//! The context that names a read index request, unique across members
//! and across a member's restarts.
//!
//! raft-rs keys a leader's pending read index requests by their context
//! alone, and a follower's heartbeat response acknowledges whichever
//! request bears the context it echoes. If two requests could share a
//! context, an acknowledgement of the first could confirm the second:
//! a leader paused between a follower's two acknowledgements of another
//! member's request (context 7) would, on waking, take the late one as a
//! quorum for its own new request 7 and answer it at its old commit
//! index, though a new leader had committed writes meanwhile. A stale
//! linearizable read; the nemesis found one. So a context is this
//! member's ID and a sequence number that starts from the clock, so a
//! restarted member does not reuse the numbers of its former life.

/// Makes this member's read index contexts and recognises them.
#[derive(Debug)]
pub struct ReadContexts {
    member: u64,
    next: u64,
}

impl ReadContexts {
    /// Contexts for `member`, their sequence starting at the clock's
    /// nanoseconds: beyond any this member used before a restart, unless
    /// it issued more than a billion read indexes a second.
    pub fn new(member: u64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::starting_at(member, now)
    }

    fn starting_at(member: u64, next: u64) -> Self {
        Self { member, next }
    }

    /// A sequence number never handed out before, and its context.
    pub fn issue(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next;
        self.next += 1;
        (seq, self.encode(seq))
    }

    /// The context of sequence number `seq`.
    fn encode(&self, seq: u64) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.member.to_be_bytes());
        ctx.extend_from_slice(&seq.to_be_bytes());
        ctx
    }

    /// The sequence number in `ctx`, if this member made it.
    pub fn decode(&self, ctx: &[u8]) -> Option<u64> {
        let (member, seq) = ctx.split_at_checked(8)?;
        let member = u64::from_be_bytes(member.try_into().ok()?);
        let seq = u64::from_be_bytes(seq.try_into().ok()?);
        (member == self.member).then_some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_with_the_same_sequence_make_different_contexts() {
        let mut a = ReadContexts::starting_at(1, 7);
        let mut b = ReadContexts::starting_at(2, 7);
        let (seq_a, ctx_a) = a.issue();
        let (seq_b, ctx_b) = b.issue();
        assert_eq!(seq_a, seq_b);
        assert_ne!(ctx_a, ctx_b);
        assert_eq!(a.decode(&ctx_a), Some(7));
        assert_eq!(a.decode(&ctx_b), None, "another member's context");
        assert_eq!(b.decode(&ctx_b), Some(7));
    }

    #[test]
    fn a_member_never_repeats_a_context() {
        let mut contexts = ReadContexts::new(3);
        let (first, ctx) = contexts.issue();
        let (second, _) = contexts.issue();
        assert_eq!(second, first + 1);
        assert_eq!(contexts.encode(first), ctx);
        // A restart starts past every number the former life handed out.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let restarted = ReadContexts::new(3);
        assert!(restarted.next > second);
    }

    use raft::eraftpb::{ConfState, Message, MessageType};
    use raft::storage::MemStorage;
    use raft::RawNode;

    /// Three raft-rs members in memory, member 1 elected leader.
    fn three_members(read_states: &mut [Vec<raft::ReadState>]) -> Vec<RawNode<MemStorage>> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut nodes: Vec<RawNode<MemStorage>> = (1..=3)
            .map(|id| {
                let config = raft::Config {
                    id,
                    check_quorum: true,
                    pre_vote: true,
                    ..Default::default()
                };
                let storage =
                    MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
                RawNode::new(&config, storage, &logger).expect("raw node")
            })
            .collect();
        nodes[0].campaign().expect("campaign");
        pump(&mut nodes, read_states, &|_| false);
        assert_eq!(nodes[0].raft.state, raft::StateRole::Leader);
        nodes
    }

    /// Deliver messages until none are left; `hold` picks which stay on
    /// the wire (returned).
    fn pump(
        nodes: &mut [RawNode<MemStorage>],
        read_states: &mut [Vec<raft::ReadState>],
        hold: &dyn Fn(&Message) -> bool,
    ) -> Vec<Message> {
        let mut held = Vec::new();
        loop {
            let mut wire = Vec::new();
            for (i, node) in nodes.iter_mut().enumerate() {
                if !node.has_ready() {
                    continue;
                }
                let mut ready = node.ready();
                wire.extend(ready.take_messages());
                read_states[i].extend(ready.take_read_states());
                let store = node.store().clone();
                store.wl().append(ready.entries()).expect("append");
                if let Some(hs) = ready.hs() {
                    store.wl().set_hardstate(hs.clone());
                }
                wire.extend(ready.take_persisted_messages());
                let mut light = node.advance(ready);
                if let Some(commit) = light.commit_index() {
                    store.wl().mut_hard_state().set_commit(commit);
                }
                wire.extend(light.take_messages());
                node.advance_apply();
            }
            if wire.is_empty() {
                return held;
            }
            for m in wire {
                if hold(&m) {
                    held.push(m);
                } else {
                    nodes[m.to as usize - 1].step(m).expect("step");
                }
            }
        }
    }

    fn heartbeat_ack(m: &Message) -> bool {
        m.get_msg_type() == MessageType::MsgHeartbeatResponse
    }

    /// Member 1 leads; member 2 asks for a read index (`follower_ctx`)
    /// and member 3's acknowledgement answers it while member 2's is held
    /// back, as if the leader had been paused with it on the wire. Then
    /// the leader asks for its own read index (`leader_ctx`) and the held
    /// acknowledgement arrives. Whether that alone gives the leader a
    /// read state.
    fn late_ack_confirms(follower_ctx: Vec<u8>, leader_ctx: Vec<u8>) -> bool {
        let mut read_states = vec![Vec::new(); 3];
        let mut nodes = three_members(&mut read_states);
        let ack_from_2 = |m: &Message| heartbeat_ack(m) && m.from == 2;
        nodes[1].read_index(follower_ctx);
        let late = pump(&mut nodes, &mut read_states, &ack_from_2);
        assert_eq!(
            read_states[1].len(),
            1,
            "member 3's acknowledgement answers member 2"
        );
        assert_eq!(late.len(), 1);

        nodes[0].read_index(leader_ctx);
        let fresh = pump(&mut nodes, &mut read_states, &heartbeat_ack);
        assert!(
            read_states[0].is_empty(),
            "no acknowledgement has arrived yet"
        );
        for m in late {
            nodes[0].step(m).expect("step");
        }
        pump(&mut nodes, &mut read_states, &heartbeat_ack);
        let confirmed_by_late_ack = !read_states[0].is_empty();
        // The fresh acknowledgements confirm it in any case.
        for m in fresh {
            nodes[0].step(m).expect("step");
        }
        pump(&mut nodes, &mut read_states, &|_| false);
        assert_eq!(read_states[0].len(), 1);
        confirmed_by_late_ack
    }

    /// The leader asks for a read index (`first`); member 2's
    /// acknowledgement answers it while member 3's is held on the wire.
    /// A read arrives and the leader asks for it (`later`), then asks
    /// again for the first read (`again`, a resend), no acknowledgement
    /// of either in yet. Then member 3's held acknowledgement arrives:
    /// whether it alone confirms the later read.
    fn late_ack_confirms_a_later_read(first: Vec<u8>, later: Vec<u8>, again: Vec<u8>) -> bool {
        let mut read_states = vec![Vec::new(); 3];
        let mut nodes = three_members(&mut read_states);
        let ack_from_3 = |m: &Message| heartbeat_ack(m) && m.from == 3;
        nodes[0].read_index(first);
        let late = pump(&mut nodes, &mut read_states, &ack_from_3);
        assert_eq!(read_states[0].len(), 1, "member 2 answered the first");
        assert_eq!(late.len(), 1);

        nodes[0].read_index(later.clone());
        nodes[0].read_index(again);
        pump(&mut nodes, &mut read_states, &heartbeat_ack);
        assert_eq!(read_states[0].len(), 1, "nothing acknowledged yet");
        for m in late {
            nodes[0].step(m).expect("step");
        }
        pump(&mut nodes, &mut read_states, &heartbeat_ack);
        read_states[0].iter().any(|rs| rs.request_ctx == later)
    }

    #[test]
    fn a_resend_under_a_new_context_is_not_confirmed_by_a_late_ack() {
        let mut contexts = ReadContexts::starting_at(1, 7);
        let (_, first) = contexts.issue();
        let (_, later) = contexts.issue();
        // Asked again under the context already answered, raft-rs queues
        // it behind the later read, and the late acknowledgement of the
        // first heartbeat confirms both: what the resend used to do.
        assert!(late_ack_confirms_a_later_read(
            first.clone(),
            later.clone(),
            first.clone()
        ));
        // Under a context of its own, as the resend does now.
        let (_, again) = contexts.issue();
        assert!(!late_ack_confirms_a_later_read(first, later, again));
    }

    #[test]
    fn a_late_acknowledgement_confirms_only_its_own_request() {
        // Bare sequence numbers, as members used before: the same number
        // from two members, and the late acknowledgement confirms the
        // leader's read without any member having answered it.
        let seven = 7u64.to_be_bytes().to_vec();
        assert!(late_ack_confirms(seven.clone(), seven));
        let (_, follower_ctx) = ReadContexts::starting_at(2, 7).issue();
        let (_, leader_ctx) = ReadContexts::starting_at(1, 7).issue();
        assert!(!late_ack_confirms(follower_ctx, leader_ctx));
    }

    #[test]
    fn malformed_contexts_are_not_ours() {
        let contexts = ReadContexts::starting_at(1, 0);
        assert_eq!(contexts.decode(&[]), None);
        assert_eq!(contexts.decode(&7u64.to_be_bytes()), None);
        assert_eq!(contexts.decode(&[0; 17]), None);
    }
}
