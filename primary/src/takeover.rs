//! `POST /takeover` on a member's client URL: the one command that turns a
//! running learner into a new single-voter cluster when the voters are
//! gone, keeping every revision it applied and the other learners (the
//! Raft side is [`crate::raft::takeover`]). The process stays up; clients
//! connected to it can write as soon as it answers.
//!
//! It refuses, with 409 and the reason, two takeovers that would lose
//! something, unless the request says `?force=true`:
//! - a leader is still in contact: the old cluster is alive, and two
//!   clusters would accept different writes;
//! - another learner that answers has committed more of the old log than
//!   this one: it would conflict with the new cluster's log, so the
//!   operator should take over there instead. Forced, such learners are
//!   removed from the new cluster (re-add them from scratch).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Serialize;

use crate::member::Member;
use crate::mvcc::write::{members, MemberRow};
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::StatusRequest;
use crate::raft::node::{unix_millis, TakeoverReport};

/// How long another learner may take to answer its status.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(member: Arc<Member>) -> Router {
    Router::new()
        .route("/takeover", post(take_over))
        .with_state(member)
}

#[derive(serde::Deserialize, Default)]
struct Params {
    #[serde(default)]
    force: bool,
}

/// Another learner as seen at takeover time.
#[derive(Debug, Serialize)]
struct PeerLearner {
    id: String,
    name: String,
    /// Its commit index, or `None` if it did not answer.
    raft_index: Option<u64>,
    revision: Option<i64>,
}

#[derive(Serialize)]
struct Answer {
    summary: String,
    member_id: String,
    revision: i64,
    raft_index: u64,
    leader_commit_seen: u64,
    entries_behind: u64,
    caught_up_at_ms: u64,
    kept_learners: Vec<String>,
    removed: Vec<String>,
    learners_seen: Vec<PeerLearner>,
}

#[derive(Serialize)]
struct Refusal {
    error: String,
    learners_seen: Vec<PeerLearner>,
}

async fn take_over(
    State(member): State<Arc<Member>>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let status = &member.node.status;
    let refuse = |code: StatusCode, error: String, learners_seen: Vec<PeerLearner>| {
        json(
            code,
            &Refusal {
                error,
                learners_seen,
            },
        )
    };
    // With auth on, only root may take over (etcd's IsAdminPermitted), by
    // the token etcd's gateway reads from the Authorization header.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let admitted = match member.auth.auth_info(token).await {
        Ok(who) => member.auth.check_admin(who.as_ref()),
        Err(e) => Err(e),
    };
    if let Err(e) = admitted {
        return refuse(StatusCode::UNAUTHORIZED, e.to_string(), Vec::new());
    }
    if status.follows_source() {
        return stop_following(&member, params.force);
    }
    let contact_ms = status.leader_contact_ms.load(Ordering::Acquire);
    let since = unix_millis().saturating_sub(contact_ms);
    let timeout = status.election_timeout_ms.load(Ordering::Acquire);
    if !params.force && contact_ms != 0 && since <= timeout {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "member {:x} heard from leader {:x} {since} ms ago: the cluster is alive; \
                 a takeover is for when its voters are gone (force=true takes over anyway)",
                member.member_id,
                status.leader()
            ),
            Vec::new(),
        );
    }
    let rows = match member
        .read(|conn, _| members(conn).map_err(crate::error::mvcc_status))
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.message().to_string(),
                Vec::new(),
            )
        }
    };
    let others: Vec<MemberRow> = rows
        .into_iter()
        .filter(|m| m.4 && m.0 != member.member_id)
        .collect();
    let seen = futures::future::join_all(others.iter().map(|row| peer_status(&member, row))).await;
    let mine = status.commit_index.load(Ordering::Acquire);
    let ahead: Vec<&PeerLearner> = seen
        .iter()
        .filter(|p| p.raft_index.is_some_and(|i| i > mine))
        .collect();
    if !ahead.is_empty() && !params.force {
        let names: Vec<String> = ahead
            .iter()
            .map(|p| {
                format!(
                    "{} ({}, raft index {})",
                    p.name,
                    p.id,
                    p.raft_index.unwrap_or(0)
                )
            })
            .collect();
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "learners ahead of this member (raft index {mine}): {}; take over on the \
                 most advanced one (force=true takes over here and removes them)",
                names.join(", ")
            ),
            seen,
        );
    }
    let drop: Vec<u64> = others
        .iter()
        .zip(&seen)
        .filter(|(_, p)| p.raft_index.is_some_and(|i| i > mine))
        .map(|(row, _)| row.0)
        .collect();
    match member.node.take_over(drop).await {
        Ok(report) => {
            println!("{}", report.summary());
            json(StatusCode::OK, &answer(report, seen))
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e, seen),
    }
}

/// How recently a follower must have heard from its source etcd for a
/// takeover to be refused without `force`.
const SOURCE_ALIVE: Duration = Duration::from_secs(5);

/// A follower's takeover: it is already the sole voter of its own log, so
/// stopping the feed from its source is all it takes; it then takes
/// writes at the revisions it holds.
fn stop_following(member: &Member, force: bool) -> Response {
    let status = &member.node.status;
    let contact_ms = status.source_contact_ms.load(Ordering::Acquire);
    let since = Duration::from_millis(unix_millis().saturating_sub(contact_ms));
    if !force && contact_ms != 0 && since <= SOURCE_ALIVE {
        return json(
            StatusCode::CONFLICT,
            &Refusal {
                error: format!(
                    "member {:x} heard from its source etcd {} ms ago: the source is alive; \
                     a takeover is for when it is gone (force=true takes over anyway)",
                    member.member_id,
                    since.as_millis()
                ),
                learners_seen: Vec::new(),
            },
        );
    }
    status.follows_source.store(false, Ordering::Release);
    let revision = status.revision();
    let raft_index = status.applied_index();
    let summary = format!(
        "stopped following the source etcd: member {:x} is a writable single-member cluster \
         at revision {revision} (raft index {raft_index}); last heard from the source {} ms ago",
        member.member_id,
        since.as_millis()
    );
    println!("{summary}");
    json(
        StatusCode::OK,
        &Answer {
            summary,
            member_id: format!("{:x}", member.member_id),
            revision,
            raft_index,
            leader_commit_seen: raft_index,
            entries_behind: 0,
            caught_up_at_ms: contact_ms,
            kept_learners: Vec::new(),
            removed: Vec::new(),
            learners_seen: Vec::new(),
        },
    )
}

async fn peer_status(member: &Member, row: &MemberRow) -> PeerLearner {
    let mut seen = PeerLearner {
        id: format!("{:x}", row.0),
        name: row.1.clone(),
        raft_index: None,
        revision: None,
    };
    let asked = tokio::time::timeout(PEER_STATUS_TIMEOUT, async {
        let channel = member.member_channel(row).await.ok()?;
        MaintenanceClient::new(channel)
            .status(StatusRequest {})
            .await
            .ok()
    })
    .await;
    if let Ok(Some(response)) = asked {
        let response = response.into_inner();
        seen.raft_index = Some(response.raft_index);
        seen.revision = response.header.map(|h| h.revision);
    }
    seen
}

fn answer(report: TakeoverReport, learners_seen: Vec<PeerLearner>) -> Answer {
    let hex = |ids: &[u64]| ids.iter().map(|id| format!("{id:x}")).collect();
    Answer {
        summary: report.summary(),
        member_id: format!("{:x}", report.member_id),
        revision: report.revision,
        raft_index: report.raft_index,
        leader_commit_seen: report.leader_commit_seen,
        entries_behind: report.entries_behind,
        caught_up_at_ms: report.caught_up_at_ms,
        kept_learners: hex(&report.kept_learners),
        removed: hex(&report.removed),
        learners_seen,
    }
}

fn json<T: Serialize>(code: StatusCode, body: &T) -> Response {
    let text = serde_json::to_string_pretty(body).unwrap_or_default() + "\n";
    (code, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}
