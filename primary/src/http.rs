//! Plain HTTP endpoints beside gRPC, as etcd serves them on its client and
//! metrics URLs: `/version`, `/health`, etcd 3.5's `/livez` and `/readyz`
//! probes, and `/metrics` (Prometheus).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;

use crate::member::Member;
use crate::proto::etcdserverpb::AlarmType;

pub use crate::api::maintenance::ETCD_VERSION;
/// The cluster version etcd 3.4 reports beside its own.
pub const ETCD_CLUSTER_VERSION: &str = "3.4.0";

pub fn router(member: Arc<Member>) -> Router {
    let mut router = Router::new()
        .route("/version", get_only(get(version)))
        .route("/health", get_only(get(health)))
        .route("/metrics", get(metrics));
    for probe in [Probe::Livez, Probe::Readyz] {
        router = router.route(
            probe.path(),
            get_only(get(
                move |State(m): State<Arc<Member>>, Query(q): Query<Vec<(String, String)>>| {
                    run_probe(m, probe, None, q)
                },
            )),
        );
        for check in probe.checks() {
            router = router.route(
                &format!("{}/{}", probe.path(), check.name()),
                get_only(get(
                    move |State(m): State<Arc<Member>>, Query(q): Query<Vec<(String, String)>>| {
                        run_probe(m, probe, Some(*check), q)
                    },
                )),
            );
        }
    }
    router.with_state(member)
}

/// etcd's HTTP handlers answer anything but GET with 405.
fn get_only(route: MethodRouter<Arc<Member>>) -> MethodRouter<Arc<Member>> {
    route.fallback(|| async {
        let mut response = plain_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        response
    })
}

/// What Go's `http.Error` writes.
fn plain_error(code: StatusCode, body: &str) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn version() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{ETCD_CLUSTER_VERSION}"}}"#),
    )
}

/// etcd 3.4's /health: healthy with no alarm (but those named in
/// `?exclude=`), a leader, and a linearizable read answered within a second.
async fn health(
    State(member): State<Arc<Member>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let excluded: HashSet<String> = query
        .into_iter()
        .filter(|(k, _)| k == "exclude")
        .map(|(_, v)| v)
        .collect();
    let alarms = active_alarms(&member).await;
    let alarmed = alarms.iter().any(|a| {
        let name = AlarmType::try_from(*a).map_or("NONE", |t| t.as_str_name());
        !excluded.contains(name)
    });
    let healthy = !alarmed
        && member.node.status.leader() != 0
        && tokio::time::timeout(Duration::from_secs(1), member.linearizable_barrier())
            .await
            .is_ok_and(|r| r.is_ok());
    let body = format!("{{\"health\":\"{healthy}\"}}");
    if healthy {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    } else {
        plain_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{body}\n"))
    }
}

async fn active_alarms(member: &Member) -> Vec<i32> {
    member
        .read(|conn, _| crate::mvcc::write::alarms(conn).map_err(crate::error::mvcc_status))
        .await
        .map(|alarms| alarms.into_iter().map(|(_, alarm)| alarm).collect())
        .unwrap_or_default()
}

/// etcd 3.5's probes: `/livez` (the member serves local reads) and
/// `/readyz` (also no corruption alarm and a linearizable read).
#[derive(Debug, Clone, Copy)]
enum Probe {
    Livez,
    Readyz,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    DataCorruption,
    SerializableRead,
    LinearizableRead,
}

impl Probe {
    fn path(self) -> &'static str {
        match self {
            Probe::Livez => "/livez",
            Probe::Readyz => "/readyz",
        }
    }

    fn checks(self) -> &'static [Check] {
        match self {
            Probe::Livez => &[Check::SerializableRead],
            Probe::Readyz => &[
                Check::DataCorruption,
                Check::SerializableRead,
                Check::LinearizableRead,
            ],
        }
    }
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
        }
    }

    async fn run(self, member: &Member) -> Result<(), String> {
        match self {
            Check::DataCorruption => {
                if active_alarms(member)
                    .await
                    .contains(&(AlarmType::Corrupt as i32))
                {
                    Err("alarm activated: CORRUPT".into())
                } else {
                    Ok(())
                }
            }
            Check::SerializableRead => member
                .read(|conn, _| {
                    crate::mvcc::read::key_count(conn).map_err(crate::error::mvcc_status)
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string()),
            Check::LinearizableRead => member
                .linearizable_barrier()
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string()),
        }
    }
}

/// One probe, or one of its checks, with etcd's `?verbose` and
/// `?exclude=<check>` (repeatable).
async fn run_probe(
    member: Arc<Member>,
    probe: Probe,
    only: Option<Check>,
    query: Vec<(String, String)>,
) -> Response {
    let excluded: HashSet<&str> = query
        .iter()
        .filter(|(k, _)| k == "exclude")
        .map(|(_, v)| v.as_str())
        .collect();
    let verbose = query.iter().any(|(k, _)| k == "verbose");
    let mut failed = false;
    let mut report = String::new();
    for check in probe.checks() {
        let wanted = match only {
            Some(one) => one == *check,
            None => !excluded.contains(check.name()),
        };
        if !wanted {
            continue;
        }
        match check.run(&member).await {
            Ok(()) => report.push_str(&format!("[+]{} ok\n", check.name())),
            Err(reason) => {
                failed = true;
                report.push_str(&format!("[-]{} failed: {reason}\n", check.name()));
            }
        }
    }
    if failed {
        // etcd always explains a failure.
        return plain_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{report}\n"));
    }
    let body = if verbose {
        format!("{report}ok\n")
    } else {
        "ok\n".to_string()
    };
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// etcd's access controller and mux on every HTTP (not gRPC) request of
/// the client URLs: CORS headers for any origin (its default `--cors=*`),
/// an empty 200 to a preflight OPTIONS, and Go's 404s for paths nothing
/// serves (which would otherwise reach the gRPC router's "unimplemented").
pub async fn plain_http(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_grpc = |headers: &axum::http::HeaderMap| {
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
    };
    if is_grpc(request.headers()) {
        return next.run(request).await;
    }
    let gateway_path = request.uri().path().starts_with("/v3/");
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::OK.into_response()
    } else {
        let response = next.run(request).await;
        if is_grpc(response.headers()) {
            // grpc-gateway's mux, or Go's ServeMux, found no route.
            let text = if gateway_path {
                "Not Found\n"
            } else {
                "404 page not found\n"
            };
            plain_error(StatusCode::NOT_FOUND, text)
        } else {
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    response
}

async fn metrics(State(member): State<Arc<Member>>) -> impl IntoResponse {
    // Replication gauges are read from the node's status at scrape time.
    let status = &member.node.status;
    let m = &member.metrics;
    let (lag_entries, lag_time) = status.lag();
    m.is_learner.set(i64::from(status.serves_as_learner()));
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
    m.leader_contact.set(
        status
            .leader_contact_ms
            .load(std::sync::atomic::Ordering::Acquire) as f64
            / 1000.0,
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        member.metrics.render(),
    )
}
