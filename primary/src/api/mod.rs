//! The etcd v3 gRPC services, one file per etcd service. Handlers validate
//! and translate; writes go to Raft through [`Member::propose`], reads to
//! the read pool; errors come from [`crate::error`].
//!
//! [`Member::propose`]: crate::member::Member::propose

pub mod auth;
pub mod cluster;
pub mod concurrency;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod watch;

use std::sync::Arc;

use tonic::service::Routes;

use crate::member::Member;
use crate::proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;

/// grpc-go (and so etcd) answers an oversized request with
/// RESOURCE_EXHAUSTED "grpc: received message larger than max (N vs. M)";
/// tonic says OUT_OF_RANGE in other words. Clients match on the code, so
/// rewrite tonic's answer (always a trailers-only response) into etcd's.
pub async fn etcd_oversize_status(
    mut response: axum::response::Response,
) -> axum::response::Response {
    let headers = response.headers_mut();
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some("11") {
        return response;
    }
    let Some(message) = headers.get("grpc-message").and_then(|v| v.to_str().ok()) else {
        return response;
    };
    let message = percent_encoding::percent_decode_str(message).decode_utf8_lossy();
    let Some(rest) = message.strip_prefix("Error, decoded message length too large: found ") else {
        return response;
    };
    let numbers: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    if let [found, limit] = numbers[..] {
        let text = format!("grpc: received message larger than max ({found} vs. {limit})");
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            headers.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
            headers.insert("grpc-message", value);
        }
    }
    response
}

/// etcd's learner interceptor: a learner answers every RPC (Lock and
/// Election included) with `etcdserver: rpc not supported for learner`,
/// except Status and Range. Tern also serves, beyond etcd 3.4: linearizable
/// Range and read-only Txn (with a read index from the leader; the KV
/// service refuses a Txn that writes); Watch and HashKV, which read only
/// the learner's own state, what a cross-region reader (and a check that
/// the learner converged) wants; Snapshot, so an etcd snapshot can be taken
/// from the standby instead of loading the primary; and Authenticate, which the learner
/// forwards to the leader, so a reader with auth on can get a token there.
pub async fn learner_gate(
    axum::extract::State(member): axum::extract::State<Arc<Member>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    const SERVED: [&str; 7] = [
        // Forwarded to the leader (see api::auth): reads here need a token.
        "/etcdserverpb.Auth/Authenticate",
        "/etcdserverpb.Maintenance/HashKV",
        "/etcdserverpb.Maintenance/Snapshot",
        "/etcdserverpb.KV/Range",
        // Read-only only: the service refuses a txn that writes.
        "/etcdserverpb.KV/Txn",
        "/etcdserverpb.Maintenance/Status",
        "/etcdserverpb.Watch/Watch",
    ];
    let path = request.uri().path();
    if member.node.status.serves_as_learner()
        && ["/etcdserverpb.", "/v3lockpb.", "/v3electionpb."]
            .iter()
            .any(|service| path.starts_with(service))
        && !SERVED.contains(&path)
    {
        let status = tonic::Status::from(crate::error::EtcdError::NotSupportedForLearner);
        return status.into_http::<axum::body::Body>();
    }
    next.run(request).await
}

/// gRPC overhead etcd allows on top of `--max-request-bytes`.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Every etcd service of this member, ready to serve.
pub fn routes(member: Arc<Member>) -> Routes {
    let max = member.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
    Routes::new(
        KvServer::new(kv::KvService::new(member.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        WatchServer::new(watch::WatchService::new(member.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        LeaseServer::new(lease::LeaseService::new(member.clone())).max_decoding_message_size(max),
    )
    .add_service(
        ClusterServer::new(cluster::ClusterService::new(member.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        AuthServer::new(auth::AuthService::new(member.clone())).max_decoding_message_size(max),
    )
    .add_service(
        LockServer::new(lock::LockService::new(member.clone())).max_decoding_message_size(max),
    )
    .add_service(
        ElectionServer::new(election::ElectionService::new(member.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        MaintenanceServer::new(maintenance::MaintenanceService::new(member))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX),
    )
}
