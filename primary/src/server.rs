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
use crate::proto::ternpb::peer_server::PeerServer;
use crate::raft::node::NodeConfig;
use crate::raft::peer_service::PeerService;
use crate::raft::snapshot::Snapshots;
use crate::raft::transport::{
    CONNECTION_WINDOW, MAX_PEER_MESSAGE, PEER_KEEPALIVE_TIMEOUT, STREAM_WINDOW,
};
use crate::raft::{LogStore, RaftNode};
use crate::readiness;
use crate::tls::{DialTls, ServerFiles, ServerTls};
use crate::watch::WatchHub;
use raft::eraftpb::ConfState;

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
    Bootstrap(String),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What kind of member a process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `tern-primary`: bootstraps or joins as a voter (or as a learner
    /// added with `member add --learner`).
    Primary,
    /// `tern-learner`: joins only as a learner.
    Learner,
    /// `tern-learner --etcd-endpoints`: the sole voter of its own log, fed
    /// by a source etcd, serving clients as a learner.
    Follower,
}

/// Run a member until SIGINT or SIGTERM.
pub async fn run(config: PrimaryConfig) -> Result<(), StartError> {
    run_as(config, Role::Primary).await
}

/// What a program adds to a member (the learner's backups): called once
/// the member exists, it starts its tasks and returns HTTP routes to serve
/// on the client URLs.
pub type Extension = Box<dyn FnOnce(Arc<Member>) -> axum::Router + Send>;

/// Run a member of the given role until SIGINT or SIGTERM.
pub async fn run_as(config: PrimaryConfig, role: Role) -> Result<(), StartError> {
    run_with(config, role, None).await
}

/// Run a member of the given role, with a program's extension, until
/// SIGINT or SIGTERM.
pub async fn run_with(
    config: PrimaryConfig,
    role: Role,
    extension: Option<Extension>,
) -> Result<(), StartError> {
    let data_dir = config.data_dir();
    let dir_err = |source| StartError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    // Certificates are read before anything else: a bad file stops
    // start-up, naming its flag, before the data dir is touched.
    let (client_tls, peer_tls) = server_tls(&config)?;
    std::fs::create_dir_all(&data_dir).map_err(dir_err)?;
    let _lock = lock_data_dir(&data_dir)?;
    remove_stale_snapshots(&data_dir);

    let state_path = data_dir.join("state.db");
    let store = MvccStore::open(&state_path)?;
    let fresh = !write::has_members(store.connection())?;
    let (member_id, cluster_id, bootstrap) = if !fresh {
        let stored = read::meta(store.connection(), "member_id")? as u64;
        let cluster_id = read::meta(store.connection(), "cluster_id")? as u64;
        if config.initial_cluster_state == tern_config::ClusterState::New
            && !config.force_new_cluster
        {
            let (configured, _) = initial_ids(&config)?;
            if configured != stored {
                return Err(StartError::WrongMember {
                    dir: data_dir.display().to_string(),
                    stored,
                    configured,
                });
            }
        }
        (stored, cluster_id, None)
    } else if config.force_new_cluster {
        return Err(StartError::Bootstrap(format!(
            "--force-new-cluster needs an existing data dir, and {} holds no member",
            data_dir.display()
        )));
    } else if config.initial_cluster_state == tern_config::ClusterState::New {
        if role == Role::Learner {
            return Err(StartError::Bootstrap(
                "a learner joins an existing cluster: add it with `etcdctl member add <name> \
                 --learner --peer-urls=<url>` and start it with --initial-cluster-state existing"
                    .into(),
            ));
        }
        let (member_id, ids) = initial_ids(&config)?;
        let voters: Vec<u64> = ids.iter().map(|(id, _)| *id).collect();
        let cluster_id = identity::cluster_id(&voters);
        // Client URLs arrive through the log when each member publishes
        // them, so every member lists the same thing.
        let rows: Vec<write::MemberRow> = ids
            .into_iter()
            .map(|(id, (name, peers))| (id, name, peers, Vec::new(), false))
            .collect();
        bootstrap_state(&store, member_id, cluster_id, &rows, true)?;
        let conf = ConfState {
            voters,
            ..Default::default()
        };
        (member_id, cluster_id, Some(conf))
    } else {
        readiness::status("joining the existing cluster named in --initial-cluster");
        let (member_id, cluster_id, rows) = join_existing(&config, role).await?;
        bootstrap_state(&store, member_id, cluster_id, &rows, false)?;
        (member_id, cluster_id, None)
    };
    drop(store);
    let mut store = MvccStore::open(&state_path)?;
    let mut log = LogStore::open(&data_dir, bootstrap.as_ref())?;
    let sole_voter = log.conf_state().voters == [member_id];
    if config.force_new_cluster && sole_voter {
        // Already taken over (the flag was left on): redoing it would drop
        // committed entries not yet applied.
        tracing::warn!(
            "--force-new-cluster: this member is already the only voter; ignoring the flag"
        );
    } else if config.force_new_cluster {
        take_over(&mut store, &mut log, member_id)?;
    }

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

    let auth = Arc::new(crate::auth::AuthStore::new(
        crate::auth::store::load(store.connection()).map_err(crate::mvcc::MvccError::Sqlite)?,
        Duration::from_secs(config.auth_token_ttl),
    ));
    auth.tokens.note_applied(store.state().applied_index);
    let snapshots = Snapshots::open(&data_dir).map_err(dir_err)?;
    let node_config = NodeConfig {
        id: member_id,
        tick: Duration::from_millis(config.heartbeat_interval),
        election_ticks: (config.election_timeout / config.heartbeat_interval) as usize,
        snapshot_count: config.snapshot_count,
        peer_tls: Arc::new(DialTls::peer(&config)),
        learner_bandwidth_limit: config.learner_bandwidth_limit,
    };
    let (node, handle) = RaftNode::new(
        node_config,
        log,
        store,
        hub.clone(),
        lessor.clone(),
        metrics.clone(),
        snapshots.clone(),
        auth.clone(),
        tokio::runtime::Handle::current(),
    )?;
    // Before the node runs, so it never acts on its own as a leader would.
    handle
        .status
        .follows_source
        .store(role == Role::Follower, std::sync::atomic::Ordering::Release);
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
            max_learners: config.max_learners as usize,
        },
        data_dir.clone(),
        DialTls::client(&config),
        auth,
    ));
    tokio::spawn(hub.run_sync());
    tokio::spawn(crate::housekeeping::expire_leases(member.clone()));
    tokio::spawn(crate::housekeeping::track_size(member.clone()));
    let policy = config
        .auto_compaction()
        .unwrap_or(tern_config::AutoCompaction::Off);
    tokio::spawn(crate::housekeeping::auto_compact(member.clone(), policy));

    let client_urls: Vec<String> = config
        .advertise_client_urls
        .iter()
        .map(url_string)
        .collect();

    // From the outside in: the learner gate (refusals are not counted, as
    // in etcd), the gRPC metrics, etcd's oversize status, the services.
    let grpc = crate::api::routes(member.clone())
        .into_axum_router()
        .layer(axum::middleware::map_response(
            crate::api::etcd_oversize_status,
        ))
        .layer(axum::middleware::from_fn_with_state(
            member.metrics.clone(),
            crate::metrics::grpc::track,
        ))
        .layer(axum::middleware::from_fn_with_state(
            member.clone(),
            crate::api::learner_gate,
        ));
    // The JSON gateway calls back into the gRPC router, layers and all.
    let router = grpc
        .clone()
        .merge(crate::gateway::router(member.clone(), grpc))
        .merge(crate::http::router(member.clone()))
        .merge(crate::takeover::router(member.clone()))
        .merge(extension.map_or_else(axum::Router::new, |extend| extend(member.clone())));
    // HTTP (not gRPC) requests get etcd's HTTP conventions around all of
    // it, the routing included.
    let router = axum::Router::new()
        .fallback_service(router)
        .layer(axum::middleware::from_fn(crate::http::plain_http));
    let mut servers = tokio::task::JoinSet::new();
    for url in &config.listen_peer_urls {
        let listener = bind(url).await?;
        let address = listener.local_addr().map_err(|source| StartError::Listen {
            url: url.to_string(),
            source,
        })?;
        tracing::info!(%address, "serving peer traffic");
        let peer = PeerServer::new(PeerService::new(member.clone(), snapshots.clone()))
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        servers.spawn(
            tonic::transport::Server::builder()
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .http2_keepalive_interval(Some(Duration::from_secs(5)))
                // tonic's default 20 s would cut snapshots over links
                // slower than about 0.8 MB/s; see the constant.
                .http2_keepalive_timeout(Some(PEER_KEEPALIVE_TIMEOUT))
                .add_service(peer)
                .serve_with_incoming_shutdown(
                    crate::tls::incoming(listener, tls_for(url, &peer_tls)),
                    shutdown_signal(),
                ),
        );
    }
    for url in &config.listen_metrics_urls {
        let listener = bind(url).await?;
        let address = listener.local_addr().ok();
        tracing::info!(address = ?address, "serving metrics");
        // tonic's server rather than axum::serve: it takes the same
        // (possibly TLS) connection stream as the client listeners.
        let routes = Routes::from(crate::http::router(member.clone()));
        let incoming = crate::tls::incoming(listener, tls_for(url, &client_tls));
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, shutdown_signal())
                .await
            {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    let mut client_listeners = Vec::new();
    let mut client_addresses = Vec::new();
    for url in &config.listen_client_urls {
        let listener = bind(url).await?;
        let address = listener.local_addr().map_err(|source| StartError::Listen {
            url: url.to_string(),
            source,
        })?;
        tracing::info!(%address, "serving client traffic");
        client_listeners.push((listener, tls_for(url, &client_tls)));
        client_addresses.push(address.to_string());
    }
    // Like etcd, answer clients only once this member's name and client
    // URLs are in the replicated member list; connections wait in the
    // listen backlog meanwhile.
    readiness::status("waiting for a leader to commit this member's client URLs");
    tokio::select! {
        _ = publish(member.clone(), config.name.clone(), client_urls) => {}
        _ = shutdown_signal() => {
            readiness::stopping();
            return Ok(());
        }
    }
    for (listener, tls) in client_listeners {
        let routes = Routes::from(router.clone());
        servers.spawn(
            tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(routes)
                // serve_with_incoming ignores the builder's nodelay;
                // `tls::incoming` sets it. TLS comes off first, then the
                // shim lets etcdctl 3.4's `:authority: http://…` through.
                .serve_with_incoming_shutdown(
                    crate::authority_shim::wrap(crate::tls::incoming(listener, tls)),
                    shutdown_signal(),
                ),
        );
    }
    tracing::info!(
        name = %config.name,
        member_id = format!("{member_id:x}"),
        cluster_id = format!("{cluster_id:x}"),
        data_dir = %data_dir.display(),
        revision = state.revision,
        "tern-primary started"
    );
    // The listeners are bound and their servers spawned: a request sent
    // from now on is answered.
    readiness::ready(&format!(
        "serving clients on {}: {} {member_id:x} of cluster {cluster_id:x}",
        client_addresses.join(", "),
        if member.node.status.is_learner() {
            "learner"
        } else {
            "member"
        },
    ));
    let served = async {
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(e)) = result {
                return Err(StartError::Serve(e));
            }
        }
        Ok(())
    };
    // A graceful shutdown waits for open connections, and peers (and
    // watchers) keep theirs open for good: give in-flight requests a grace
    // period, then stop. Every acknowledged write is already durable.
    let grace = async {
        shutdown_signal().await;
        readiness::stopping();
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = served => result?,
        _ = grace => tracing::info!("connections still open after the grace period are dropped"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long a stopping member lets in-flight requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// etcd's publish: put this member's name and client URLs in the
/// replicated member list (once per change), retrying until a leader
/// commits it.
async fn publish(member: Arc<Member>, name: String, client_urls: Vec<String>) {
    loop {
        let id = member.member_id;
        let stored = member
            .read(move |conn, _| {
                Ok(write::members(conn)
                    .map_err(crate::error::mvcc_status)?
                    .into_iter()
                    .find(|m| m.0 == id))
            })
            .await;
        if let Ok(Some(row)) = &stored {
            if row.1 == name && row.3 == client_urls {
                return;
            }
        }
        let request = crate::proto::ternpb::raft_request::Request::MemberAttributes(
            crate::proto::ternpb::MemberAttributes {
                id,
                name: name.clone(),
                client_urls: client_urls.clone(),
            },
        );
        match member.propose(request).await {
            Ok(_) => {
                tracing::info!("published member attributes to the cluster");
                return;
            }
            Err(e) => {
                tracing::info!(error = %e.message(), "cannot publish member attributes yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// This member's id and every initial member's (id, (name, peer URLs)),
/// computed from the flags as etcd computes them.
#[allow(clippy::type_complexity)]
fn initial_ids(
    config: &PrimaryConfig,
) -> Result<(u64, Vec<(u64, (String, Vec<String>))>), StartError> {
    let initial = config
        .initial_members()
        .map_err(|e| StartError::Bootstrap(e.to_string()))?;
    let token = &config.initial_cluster_token;
    let ids: Vec<(u64, (String, Vec<String>))> = initial
        .iter()
        .map(|m| {
            let urls: Vec<String> = m.peer_urls.iter().map(url_string).collect();
            (
                identity::member_id(&urls, token, None),
                (m.name.clone(), urls),
            )
        })
        .collect();
    let me = ids
        .iter()
        .find(|(_, (name, _))| *name == config.name)
        .map(|(id, _)| *id)
        .ok_or_else(|| {
            StartError::Bootstrap(format!(
                "--initial-cluster has no member named '{}' (--name)",
                config.name
            ))
        })?;
    Ok((me, ids))
}

/// Write the member list and ids into a fresh state file, in one
/// transaction: a crash mid-bootstrap leaves either nothing or everything.
/// A new cluster's state starts at the bootstrap snapshot (index 1).
fn bootstrap_state(
    store: &MvccStore,
    member_id: u64,
    cluster_id: u64,
    rows: &[write::MemberRow],
    new_cluster: bool,
) -> Result<(), StartError> {
    let tx = store
        .connection()
        .unchecked_transaction()
        .map_err(crate::mvcc::MvccError::from)?;
    for row in rows {
        write::upsert_member(&tx, row)?;
    }
    write::set_meta(&tx, "cluster_id", cluster_id as i64)?;
    write::set_meta(&tx, "member_id", member_id as i64)?;
    if new_cluster {
        write::set_meta(&tx, "applied_index", 1)?;
        write::set_meta(&tx, "applied_term", 1)?;
    }
    tx.commit().map_err(crate::mvcc::MvccError::from)?;
    Ok(())
}

/// `--initial-cluster-state existing`: ask the other members listed in
/// `--initial-cluster` who we are (the member must have been added with
/// `etcdctl member add` first, as with etcd).
async fn join_existing(
    config: &PrimaryConfig,
    role: Role,
) -> Result<(u64, u64, Vec<write::MemberRow>), StartError> {
    let mine: Vec<String> = config
        .initial_advertise_peer_urls
        .iter()
        .map(url_string)
        .collect();
    let initial = config
        .initial_members()
        .map_err(|e| StartError::Bootstrap(e.to_string()))?;
    let others: Vec<Vec<String>> = initial
        .iter()
        .map(|m| m.peer_urls.iter().map(url_string).collect::<Vec<_>>())
        .filter(|urls| !urls.iter().any(|u| mine.contains(u)))
        .collect();
    if others.is_empty() {
        return Err(StartError::Bootstrap(
            "--initial-cluster-state existing, but --initial-cluster names no other member to join"
                .into(),
        ));
    }
    let dial = DialTls::peer(config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last_error = String::new();
    // How long a member list that lacks this member is taken as lag.
    let listed_by = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        for urls in &others {
            let answer = async {
                let mut client = crate::raft::transport::connect(urls, &dial)
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .members(crate::proto::ternpb::MembersRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| e.message().to_string())
            }
            .await;
            let cluster = match answer {
                Ok(c) => c,
                Err(e) => {
                    last_error = format!("{}: {e}", urls.join(","));
                    continue;
                }
            };
            let Some(me) = cluster
                .members
                .iter()
                .find(|m| m.peer_urls.iter().any(|u| mine.contains(u)))
            else {
                // The peer asked may not have applied the `member add` yet
                // (a follower or learner a little behind the leader): ask
                // the others, and again, for a few seconds.
                let refusal = StartError::Bootstrap(format!(
                    "the cluster has no member with peer URLs {}: add it first with \
                     `etcdctl member add {} {}--peer-urls={}`",
                    mine.join(","),
                    config.name,
                    if role == Role::Learner {
                        "--learner "
                    } else {
                        ""
                    },
                    mine.join(",")
                ));
                if tokio::time::Instant::now() >= listed_by {
                    return Err(refusal);
                }
                continue;
            };
            if role == Role::Learner && !me.is_learner {
                return Err(StartError::Bootstrap(format!(
                    "member {:x} is a voter; tern-learner joins only as a learner \
                     (`etcdctl member add {} --learner --peer-urls={}`)",
                    me.id,
                    config.name,
                    mine.join(",")
                )));
            }
            let member_id = me.id;
            let rows = cluster
                .members
                .into_iter()
                .map(|m| {
                    let name = if m.id == member_id {
                        config.name.clone()
                    } else {
                        m.name
                    };
                    (m.id, name, m.peer_urls, m.client_urls, m.is_learner)
                })
                .collect();
            return Ok((member_id, cluster.cluster_id, rows));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(StartError::Bootstrap(format!(
        "cannot reach any member of the existing cluster: {last_error}"
    )))
}

/// Disaster takeover at start-up (`--force-new-cluster`): this data dir
/// becomes a new single-voter cluster with every revision it applied,
/// keeping the other learners (see [`crate::raft::takeover`]). Says what it
/// kept and how far behind the old leader it was last seen. A running
/// learner does the same on `POST /takeover` without a restart.
fn take_over(store: &mut MvccStore, log: &mut LogStore, member_id: u64) -> Result<(), StartError> {
    let state = store.state();
    let conn = store.connection();
    let leader_commit = read::meta(conn, "leader_commit_seen")? as u64;
    let caught_up_ms = read::meta(conn, "caught_up_at_ms")? as u64;
    let plan = crate::raft::takeover::Plan::new(member_id, log.conf_state(), &[]);
    log.force_new_cluster(member_id, &plan, state.applied_index, state.applied_term)?;
    let report = crate::raft::node::TakeoverReport::new(
        member_id,
        &state,
        (leader_commit, caught_up_ms),
        plan,
    );
    let summary = report.summary();
    tracing::warn!("{summary}");
    println!("{summary}");
    Ok(())
}

/// The client and peer TLS configs, loaded when some listener needs them,
/// each reloaded on SIGHUP and file change from then on.
#[allow(clippy::type_complexity)]
fn server_tls(
    config: &PrimaryConfig,
) -> Result<(Option<Arc<ServerTls>>, Option<Arc<ServerTls>>), StartError> {
    let https = |urls: &[url::Url]| urls.iter().any(|u| u.scheme() == "https");
    let load = |files: Option<ServerFiles>, alpn| -> Result<Option<Arc<ServerTls>>, StartError> {
        let Some(files) = files else {
            return Ok(None);
        };
        let tls = ServerTls::load(files, alpn)?;
        tls.watch();
        Ok(Some(tls))
    };
    let client = if https(&config.listen_client_urls) || https(&config.listen_metrics_urls) {
        load(ServerFiles::client(config), crate::tls::ALPN_CLIENT)?
    } else {
        None
    };
    let peer = if https(&config.listen_peer_urls) {
        load(ServerFiles::peer(config), crate::tls::ALPN_PEER)?
    } else {
        None
    };
    Ok((client, peer))
}

/// The TLS config a listener on `url` serves with: `https://` only.
fn tls_for(url: &url::Url, tls: &Option<Arc<ServerTls>>) -> Option<Arc<ServerTls>> {
    if url.scheme() == "https" {
        tls.clone()
    } else {
        None
    }
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
