//! Simple tokens (etcd's `--auth-token simple`): `<16 random letters>.<raft
//! index>`, kept in memory by every member and the learner.
//!
//! Authenticate proposes the token through the log; each member that
//! applies the entry adds it here, so any member accepts it. The raft
//! index in the token lets a member that has not applied that entry yet
//! wait for it instead of refusing a token the client just got (etcd's
//! `isValidSimpleToken`). A token lives `ttl` after its last use; tokens
//! are not persisted, so after a restart clients authenticate again, as
//! with etcd.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

/// How long a request with a token from a not-yet-applied entry waits.
const APPLY_WAIT: Duration = Duration::from_secs(5);

pub struct Tokens {
    ttl: Duration,
    live: Mutex<HashMap<String, (String, Instant)>>,
    /// The highest raft index applied here, as far as tokens are concerned
    /// (set at start-up and by every token assignment).
    applied: AtomicU64,
    assigned: tokio::sync::Notify,
}

impl Tokens {
    pub fn new(ttl: Duration) -> Self {
        Tokens {
            ttl,
            live: Mutex::new(HashMap::new()),
            applied: AtomicU64::new(0),
            assigned: tokio::sync::Notify::new(),
        }
    }

    /// A fresh random prefix; the applier appends the entry's index.
    pub fn prefix() -> String {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut rng = rand::rng();
        (0..16)
            .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
            .collect()
    }

    /// Tokens from entries up to `index` need no waiting: one not known by
    /// now never will be (a token from before a restart, say).
    pub fn note_applied(&self, index: u64) {
        self.applied.fetch_max(index, Ordering::AcqRel);
    }

    /// Called by the applier for an applied Authenticate entry.
    pub fn assign(&self, prefix: &str, index: u64, user: &str) -> String {
        let token = format!("{prefix}.{index}");
        let now = Instant::now();
        {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|_, (_, expires)| *expires > now);
            live.insert(token.clone(), (user.to_string(), now + self.ttl));
        }
        self.applied.fetch_max(index, Ordering::AcqRel);
        self.assigned.notify_waiters();
        token
    }

    /// The user a live token belongs to; using it extends its life.
    pub async fn user_of(&self, token: &str) -> Option<String> {
        let index: u64 = token.rsplit_once('.')?.1.parse().ok()?;
        let deadline = tokio::time::Instant::now() + APPLY_WAIT;
        loop {
            let notified = self.assigned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(user) = self.touch(token) {
                return Some(user);
            }
            if index <= self.applied.load(Ordering::Acquire) {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn touch(&self, token: &str) -> Option<String> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match live.get_mut(token) {
            Some((user, expires)) if *expires > now => {
                *expires = now + self.ttl;
                Some(user.clone())
            }
            Some(_) => {
                live.remove(token);
                None
            }
            None => None,
        }
    }

    /// A deleted user, or one whose password changed, loses its tokens.
    pub fn invalidate_user(&self, user: &str) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, (u, _)| u != user);
    }

    pub fn clear(&self) {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_expire_and_wait_for_their_entry() {
        let tokens = std::sync::Arc::new(Tokens::new(Duration::from_millis(200)));
        let t = tokens.assign("abc", 5, "alice");
        assert_eq!(t, "abc.5");
        assert_eq!(tokens.user_of(&t).await.as_deref(), Some("alice"));
        assert_eq!(tokens.user_of("zzz.3").await, None);
        assert_eq!(tokens.user_of("garbage").await, None);
        // A token from an entry not applied yet is waited for.
        let waiter = {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.user_of("later.9").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokens.assign("later", 9, "bob");
        assert_eq!(waiter.await.unwrap().as_deref(), Some("bob"));
        tokens.invalidate_user("bob");
        assert_eq!(tokens.user_of("later.9").await, None);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(tokens.user_of(&t).await, None, "expired");
    }
}
