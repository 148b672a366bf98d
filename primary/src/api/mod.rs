//! The etcd v3 gRPC services, one file per etcd service. Handlers validate
//! and translate; writes go to Raft through [`Member::propose`], reads to
//! the read pool; errors come from [`crate::error`].
//!
//! [`Member::propose`]: crate::member::Member::propose

pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

use std::sync::Arc;

use tonic::service::Routes;

use crate::member::Member;
use crate::proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};

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
    .add_service(LeaseServer::new(lease::LeaseService::new(member.clone())).max_decoding_message_size(max))
    .add_service(ClusterServer::new(cluster::ClusterService::new(member.clone())).max_decoding_message_size(max))
    .add_service(
        MaintenanceServer::new(maintenance::MaintenanceService::new(member))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX),
    )
}
