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
    pub fn next(&mut self) -> (u64, Vec<u8>) {
        let seq = self.next;
        self.next += 1;
        (seq, self.encode(seq))
    }

    /// The context of sequence number `seq` (to ask again for an index).
    pub fn encode(&self, seq: u64) -> Vec<u8> {
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
        let (seq_a, ctx_a) = a.next();
        let (seq_b, ctx_b) = b.next();
        assert_eq!(seq_a, seq_b);
        assert_ne!(ctx_a, ctx_b);
        assert_eq!(a.decode(&ctx_a), Some(7));
        assert_eq!(a.decode(&ctx_b), None, "another member's context");
        assert_eq!(b.decode(&ctx_b), Some(7));
    }

    #[test]
    fn a_member_never_repeats_a_context() {
        let mut contexts = ReadContexts::new(3);
        let (first, ctx) = contexts.next();
        let (second, _) = contexts.next();
        assert_eq!(second, first + 1);
        assert_eq!(contexts.encode(first), ctx);
        // A restart starts past every number the former life handed out.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let restarted = ReadContexts::new(3);
        assert!(restarted.next > second);
    }

    #[test]
    fn malformed_contexts_are_not_ours() {
        let contexts = ReadContexts::starting_at(1, 0);
        assert_eq!(contexts.decode(&[]), None);
        assert_eq!(contexts.decode(&7u64.to_be_bytes()), None);
        assert_eq!(contexts.decode(&[0; 17]), None);
    }
}
