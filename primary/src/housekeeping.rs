//! Background duties of a member: lease expiry, auto-compaction, and the
//! size figures behind the quota check and the metrics.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_config::AutoCompaction;

use crate::member::Member;
use crate::proto::etcdserverpb::{CompactionRequest, LeaseRevokeRequest};
use crate::proto::ternpb::raft_request::Request;

/// On the leader, revoke expired leases through the log.
pub async fn expire_leases(member: Arc<Member>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        // A follower's leases expire at its source, whose deletions of
        // their keys arrive as revisions.
        if member.node.status.leader() != member.member_id || member.node.status.follows_source() {
            continue;
        }
        for id in member.lessor.expired() {
            // Until the revoke applies, do not propose it again each tick.
            member.lessor.postpone(id, Duration::from_secs(3));
            let m = member.clone();
            tokio::spawn(async move {
                if let Err(e) = m
                    .propose(Request::LeaseRevoke(LeaseRevokeRequest { id }))
                    .await
                {
                    tracing::debug!(lease = id, error = %e, "expired lease revoke failed");
                }
            });
        }
    }
}

/// Refresh the database size metrics (the quota check reads the size the
/// Raft thread keeps after every write).
pub async fn track_size(member: Arc<Member>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok((total, in_use)) = member.db_size().await {
            member.metrics.db_total_size.set(total);
            member.metrics.db_in_use_size.set(in_use);
        }
        let status = &member.node.status;
        member.metrics.current_revision.set(status.revision());
        member
            .metrics
            .compact_revision
            .set(status.compact_revision.load(Ordering::Acquire));
    }
}

/// etcd's auto-compaction. Periodic: every tenth of the retention (at most
/// an hour), compact to the revision seen one retention ago. Revision:
/// every five minutes, keep the last N revisions.
pub async fn auto_compact(member: Arc<Member>, policy: AutoCompaction) {
    let (interval, retention) = match policy {
        AutoCompaction::Off => return,
        AutoCompaction::Periodic(d) => (
            (d / 10)
                .min(Duration::from_secs(3600))
                .max(Duration::from_secs(1)),
            d,
        ),
        AutoCompaction::Revision(_) => (Duration::from_secs(300), Duration::ZERO),
    };
    let mut seen: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let current = member.node.status.revision();
        seen.push_back((now, current));
        let target = match policy {
            AutoCompaction::Revision(keep) => current - keep,
            _ => {
                let mut target = 0;
                while let Some(&(at, rev)) = seen.front() {
                    if now.duration_since(at) >= retention {
                        target = rev;
                        seen.pop_front();
                    } else {
                        break;
                    }
                }
                target
            }
        };
        let compacted = member.node.status.compact_revision.load(Ordering::Acquire);
        if target <= compacted
            || target <= 0
            || member.node.status.leader() != member.member_id
            || member.node.status.follows_source()
        {
            continue;
        }
        let request = Request::Compaction(CompactionRequest {
            revision: target,
            physical: false,
        });
        match member.propose(request).await {
            Ok(_) => tracing::info!(revision = target, "auto-compacted"),
            Err(e) => tracing::warn!(revision = target, error = %e, "auto-compaction failed"),
        }
    }
}
