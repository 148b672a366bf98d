//! Lease expiry bookkeeping (etcd's lessor).
//!
//! Which leases exist, their TTLs and attached keys are replicated state in
//! the MVCC store. When each lease expires is not: like etcd, only the
//! leader tracks deadlines, in memory, and on expiry proposes a
//! LeaseRevoke through the log, so every member deletes the same keys at
//! the same revision. A new leader (or a restarted member) gives every
//! lease a full TTL again, which can only extend a lease, never cut it short.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// etcd's largest TTL (MaxLeaseTTL).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

pub struct Lessor {
    deadlines: Mutex<HashMap<i64, Lease>>,
    min_ttl: i64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: i64,
    deadline: Instant,
    /// Expired, with its revoke proposed: no longer renewable (etcd answers
    /// KeepAlive on such a lease as not found).
    revoking: bool,
}

impl Lessor {
    /// `min_ttl` is etcd's: 1.5 election timeouts rounded up to seconds.
    pub fn new(election_timeout: Duration) -> Self {
        let min = election_timeout.as_millis() as i64 * 3 / 2;
        Lessor {
            deadlines: Mutex::new(HashMap::new()),
            min_ttl: ((min + 999) / 1000).max(1),
        }
    }

    pub fn min_ttl(&self) -> i64 {
        self.min_ttl
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Lease>> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Track a lease with a full TTL from now.
    pub fn grant(&self, id: i64, ttl: i64) {
        self.map().insert(
            id,
            Lease {
                ttl,
                deadline: deadline(ttl),
                revoking: false,
            },
        );
    }

    /// Track exactly `leases` (id, TTL), each with a full TTL from now
    /// (after the state was replaced by a snapshot).
    pub fn reset(&self, leases: &[(i64, i64)]) {
        let mut map = self.map();
        map.clear();
        for (id, ttl) in leases {
            map.insert(
                *id,
                Lease {
                    ttl: *ttl,
                    deadline: deadline(*ttl),
                    revoking: false,
                },
            );
        }
    }

    pub fn revoke(&self, id: i64) {
        self.map().remove(&id);
    }

    /// KeepAlive: restart the lease's clock; its TTL, or None if unknown.
    pub fn renew(&self, id: i64) -> Option<i64> {
        let mut map = self.map();
        let lease = map.get_mut(&id)?;
        if lease.revoking || lease.deadline <= Instant::now() {
            return None;
        }
        lease.deadline = deadline(lease.ttl);
        Some(lease.ttl)
    }

    /// Whole seconds left (truncated, as etcd reports them), or None if
    /// unknown.
    pub fn remaining(&self, id: i64) -> Option<i64> {
        let map = self.map();
        let lease = map.get(&id)?;
        Some(
            lease
                .deadline
                .saturating_duration_since(Instant::now())
                .as_secs() as i64,
        )
    }

    pub fn deadline(&self, id: i64) -> Option<Instant> {
        self.map().get(&id).map(|l| l.deadline)
    }

    /// Leases past their deadline (the leader proposes their revocation).
    pub fn expired(&self) -> Vec<i64> {
        let now = Instant::now();
        self.map()
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Give every lease a full TTL again (on start and leadership change).
    pub fn refresh_all(&self) {
        for lease in self.map().values_mut() {
            lease.deadline = deadline(lease.ttl);
            lease.revoking = false;
        }
    }

    /// Push a lease's deadline a little later, so an expiry whose revoke
    /// proposal is in flight is not proposed again on every check.
    pub fn postpone(&self, id: i64, by: Duration) {
        if let Some(lease) = self.map().get_mut(&id) {
            lease.deadline = Instant::now() + by;
            lease.revoking = true;
        }
    }
}

fn deadline(ttl: i64) -> Instant {
    Instant::now() + Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_matches_etcd_defaults() {
        assert_eq!(Lessor::new(Duration::from_millis(1000)).min_ttl(), 2);
    }

    #[test]
    fn renew_and_expire() {
        let l = Lessor::new(Duration::from_millis(1000));
        l.grant(7, 0);
        assert_eq!(l.expired(), vec![7]);
        assert_eq!(l.renew(7), None, "an expired lease cannot be renewed");
        l.grant(6, 60);
        l.postpone(6, Duration::from_secs(3));
        assert_eq!(l.renew(6), None, "a lease being revoked cannot be renewed");
        l.grant(8, 60);
        assert_eq!(l.renew(8), Some(60));
        assert_eq!(l.remaining(8), Some(59));
        assert_eq!(l.renew(9), None);
        l.revoke(8);
        assert_eq!(l.remaining(8), None);
    }
}
