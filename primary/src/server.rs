//! Start-up: open the data directory, bootstrap or recover, start the Raft
//! thread and serve the client URLs until a signal arrives.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_config::{primary::url_string, PrimaryConfig};
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::identity;
use crate::lease::Lessor;
use crate::member::{Limits, Member};
use crate::metrics::Metrics;
use crate::mvcc::{read, write, MvccStore, Reader};
use crate::raft::node::NodeConfig;
use crate::raft::{LogStore, RaftNode};
use crate::watch::WatchHub;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("data dir {0} is in use by another process")]
    Locked(String),
    #[error("state database: {0}")]
    Store(#[from] crate::mvcc::MvccError),
    #[error(transparent)]
    Log(#[from] crate::raft::log_store::LogError),
    #[error(transparent)]
    Node(#[from] crate::raft::node::NodeError),
    #[error("cannot listen on {url}: {source}")]
    Listen { url: String, source: std::io::Error },
    #[error(
        "data dir {dir} belongs to member {stored:x}, but the flags describe member {configured:x}"
    )]
    WrongMember {
        dir: String,
        stored: u64,
        configured: u64,
    },
    #[error("{0}")]
    NotYet(String),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Run a member until SIGINT or SIGTERM.
pub async fn run(config: PrimaryConfig) -> Result<(), StartError> {
    let data_dir = config.data_dir();
    let dir_err = |source| StartError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&data_dir).map_err(dir_err)?;
    let _lock = lock_data_dir(&data_dir)?;

    let initial = config.initial_members().map_err(|e| StartError::DataDir {
        path: data_dir.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let token = &config.initial_cluster_token;
    let ids: Vec<(u64, &tern_config::InitialMember)> = initial
        .iter()
        .map(|m| {
            let urls: Vec<String> = m.peer_urls.iter().map(url_string).collect();
            (identity::member_id(&urls, token, None), m)
        })
        .collect();
    let member_id = ids
        .iter()
        .find(|(_, m)| m.name == config.name)
        .map(|(id, _)| *id)
        .unwrap_or_default();
    let voters: Vec<u64> = ids.iter().map(|(id, _)| *id).collect();
    // Without the peer transport a second member could never be reached and
    // the cluster would sit without a leader; say so instead.
    let joining = config.initial_cluster_state == tern_config::ClusterState::Existing
        && !data_dir.join("state.db").exists();
    if voters.len() > 1 || joining {
        return Err(StartError::NotYet(format!(
            "--initial-cluster names {} members and --initial-cluster-state is {:?}: \
             this build runs single-member clusters only (replication is not built yet)",
            voters.len(),
            config.initial_cluster_state
        )));
    }
    remove_stale_snapshots(&data_dir);

    let state_path = data_dir.join("state.db");
    let store = MvccStore::open(&state_path)?;
    let cluster_id = if write::has_members(store.connection())? {
        let stored = read::meta(store.connection(), "member_id")? as u64;
        if stored != member_id {
            return Err(StartError::WrongMember {
                dir: data_dir.display().to_string(),
                stored,
                configured: member_id,
            });
        }
        read::meta(store.connection(), "cluster_id")? as u64
    } else {
        let cluster_id = identity::cluster_id(&voters);
        // One transaction: a crash mid-bootstrap must leave either nothing
        // or everything, or the next start would see members but no ids.
        let tx = store
            .connection()
            .unchecked_transaction()
            .map_err(crate::mvcc::MvccError::from)?;
        for (id, m) in &ids {
            let clients = if *id == member_id {
                config
                    .advertise_client_urls
                    .iter()
                    .map(url_string)
                    .collect()
            } else {
                Vec::new()
            };
            let peers = m.peer_urls.iter().map(url_string).collect();
            write::upsert_member(&tx, &(*id, m.name.clone(), peers, clients, false))?;
        }
        write::set_meta(&tx, "cluster_id", cluster_id as i64)?;
        write::set_meta(&tx, "member_id", member_id as i64)?;
        tx.commit().map_err(crate::mvcc::MvccError::from)?;
        cluster_id
    };
    // Client URLs may change between restarts, like etcd's publish.
    let mut me = write::members(store.connection())?
        .into_iter()
        .find(|m| m.0 == member_id);
    if let Some(me) = me.as_mut() {
        me.3 = config
            .advertise_client_urls
            .iter()
            .map(url_string)
            .collect();
        write::upsert_member(store.connection(), me)?;
    }

    let log = LogStore::open(&data_dir.join("raft.db"), &voters, &[])?;
    let lessor = Arc::new(Lessor::new(Duration::from_millis(config.election_timeout)));
    for (id, ttl) in read::leases(store.connection())? {
        lessor.grant(id, ttl);
    }
    let reader = Arc::new(Reader::new(&state_path));
    let state = store.state();
    let hub = WatchHub::new(reader.clone(), state.revision, state.compact_revision);
    let metrics = Arc::new(Metrics::new());
    metrics
        .quota_backend_bytes
        .set(config.quota_backend_bytes as i64);

    let node_config = NodeConfig {
        id: member_id,
        tick: Duration::from_millis(config.heartbeat_interval),
        election_ticks: (config.election_timeout / config.heartbeat_interval) as usize,
        snapshot_count: config.snapshot_count,
    };
    let (node, handle) = RaftNode::new(
        node_config,
        log,
        store,
        hub.clone(),
        lessor.clone(),
        metrics.clone(),
    )?;
    node.start();

    let member = Arc::new(Member::new(
        cluster_id,
        member_id,
        config.name.clone(),
        handle,
        reader,
        hub.clone(),
        lessor,
        metrics,
        Limits {
            max_request_bytes: config.max_request_bytes as usize,
            max_txn_ops: config.max_txn_ops as usize,
            quota_backend_bytes: config.quota_backend_bytes,
        },
        data_dir.clone(),
    ));
    tokio::spawn(hub.run_sync());
    tokio::spawn(crate::housekeeping::expire_leases(member.clone()));
    tokio::spawn(crate::housekeeping::track_size(member.clone()));
    let policy = config
        .auto_compaction()
        .unwrap_or(tern_config::AutoCompaction::Off);
    tokio::spawn(crate::housekeeping::auto_compact(member.clone(), policy));

    let router = crate::api::routes(member.clone())
        .into_axum_router()
        .layer(axum::middleware::map_response(
            crate::api::etcd_oversize_status,
        ))
        .merge(crate::http::router(member.clone()));
    let mut servers = tokio::task::JoinSet::new();
    for url in &config.listen_client_urls {
        let listener = bind(url).await?;
        let address = listener.local_addr().map_err(|source| StartError::Listen {
            url: url.to_string(),
            source,
        })?;
        tracing::info!(%address, "serving client traffic");
        let routes = Routes::from(router.clone());
        servers.spawn(
            tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(routes)
                // serve_with_incoming ignores the builder's nodelay, and
                // without it small responses wait for the peer's delayed ACK.
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown_signal(),
                ),
        );
    }
    for url in &config.listen_metrics_urls {
        let listener = bind(url).await?;
        let address = listener.local_addr().ok();
        tracing::info!(address = ?address, "serving metrics");
        let app = crate::http::router(member.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
            {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    tracing::info!(
        name = %config.name,
        member_id = format!("{member_id:x}"),
        cluster_id = format!("{cluster_id:x}"),
        data_dir = %data_dir.display(),
        revision = state.revision,
        "tern-primary started"
    );
    while let Some(result) = servers.join_next().await {
        if let Ok(Err(e)) = result {
            return Err(StartError::Serve(e));
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn bind(url: &url::Url) -> Result<TcpListener, StartError> {
    let host = url
        .host_str()
        .unwrap_or("127.0.0.1")
        .trim_matches(|c| c == '[' || c == ']');
    let port = url.port_or_known_default().unwrap_or(2379);
    let addr = format!("{host}:{port}");
    let listen_err = |source| StartError::Listen {
        url: url.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&addr)
        .await
        .map_err(listen_err)?
        .collect();
    let first = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| listen_err(std::io::Error::other("host resolves to no address")))?;
    TcpListener::bind(first).await.map_err(listen_err)
}

/// Snapshot streams stage their copy in `snapshot-*` directories under the
/// data dir; a crash mid-stream leaves one behind.
fn remove_stale_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("snapshot-") {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove stale snapshot");
            }
        }
    }
}

/// One process per data dir: two members writing one log would corrupt it.
fn lock_data_dir(dir: &Path) -> Result<File, StartError> {
    let path = dir.join("LOCK");
    let file = File::create(&path).map_err(|source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => Err(StartError::Locked(dir.display().to_string())),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
