//! Plain HTTP endpoints beside gRPC: `/health` and `/metrics` (Prometheus).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::member::Member;

pub fn router(member: Arc<Member>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(member)
}

/// etcd's /health: healthy when there is a leader and no alarm.
async fn health(State(member): State<Arc<Member>>) -> impl IntoResponse {
    let has_leader = member.node.status.leader() != 0;
    let alarms = member
        .read(|conn, _| crate::mvcc::write::alarms(conn).map_err(crate::error::mvcc_status))
        .await
        .unwrap_or_default();
    let healthy = has_leader && alarms.is_empty();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{{\"health\":\"{healthy}\"}}"),
    )
}

async fn metrics(State(member): State<Arc<Member>>) -> impl IntoResponse {
    // Replication gauges are read from the node's status at scrape time.
    let status = &member.node.status;
    let m = &member.metrics;
    let (lag_entries, lag_time) = status.lag();
    m.is_learner.set(i64::from(status.is_learner()));
    m.applied_index.set(status.applied_index() as i64);
    // etcd's proposals_committed_total and proposals_applied_total are the
    // commit and applied indexes (gauges, despite the names).
    m.proposals_committed.set(
        status
            .commit_index
            .load(std::sync::atomic::Ordering::Acquire) as i64,
    );
    m.proposals_applied.set(status.applied_index() as i64);
    m.current_revision.set(status.revision());
    m.leader_commit.set(
        status
            .leader_commit
            .load(std::sync::atomic::Ordering::Acquire) as i64,
    );
    m.lag_entries.set(lag_entries as i64);
    m.lag_seconds.set(lag_time.as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        member.metrics.render(),
    )
}
