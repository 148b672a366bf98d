//! The source etcd cluster, as a client of its public API: its client URLs
//! tried in turn, its client TLS (`--etcd-cacert/--etcd-cert/--etcd-key`),
//! and a token from `--etcd-user` when auth is on there.

use std::time::Duration;

use tern_config::FollowConfig;
use tern_primary::proto::etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, watch_client::WatchClient, AuthenticateRequest,
};
use tern_primary::tls::DialTls;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// How long a connection attempt to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Source {
    endpoints: Vec<String>,
    tls: DialTls,
    credentials: Option<(String, String)>,
    /// The endpoint to try first: the last one that answered.
    next: usize,
    channel: Option<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Source {
    pub fn new(config: &FollowConfig) -> anyhow::Result<Source> {
        Ok(Source {
            endpoints: config.endpoints.clone(),
            tls: DialTls::source(
                config.cacert.clone(),
                config.cert.clone().zip(config.key.clone()),
            ),
            credentials: config.credentials()?,
            next: 0,
            channel: None,
            token: None,
        })
    }

    /// A channel to an endpoint that answers (with a fresh token when a
    /// user is given), trying each in turn from the last good one.
    pub async fn connect(&mut self) -> anyhow::Result<Channel> {
        if let Some(channel) = &self.channel {
            return Ok(channel.clone());
        }
        let mut errors = Vec::new();
        for attempt in 0..self.endpoints.len() {
            let i = (self.next + attempt) % self.endpoints.len();
            let url = &self.endpoints[i];
            let result = async {
                let endpoint = self.tls.endpoint(url).await?;
                let channel = endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect()
                    .await?;
                anyhow::Ok(channel)
            }
            .await;
            match result {
                Ok(channel) => {
                    self.next = i;
                    self.token = match &self.credentials {
                        Some((name, password)) => {
                            let token = AuthClient::new(channel.clone())
                                .authenticate(AuthenticateRequest {
                                    name: name.clone(),
                                    password: password.clone(),
                                })
                                .await
                                .map_err(|e| {
                                    anyhow::anyhow!(
                                        "{url}: authenticating as {name}: {}",
                                        e.message()
                                    )
                                })?
                                .into_inner()
                                .token;
                            Some(token.parse()?)
                        }
                        None => None,
                    };
                    self.channel = Some(channel.clone());
                    return Ok(channel);
                }
                Err(e) => errors.push(format!("{url}: {e:#}")),
            }
        }
        anyhow::bail!("no source endpoint answers: {}", errors.join("; "))
    }

    /// After a failure: reconnect next time, starting at the next endpoint.
    pub fn failed(&mut self) {
        self.channel = None;
        self.next = (self.next + 1) % self.endpoints.len().max(1);
    }

    /// `message` with the token, and etcd's `hasleader` so a member cut off
    /// from its leader refuses instead of serving a stalled stream.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.stamp().request(message)
    }

    /// What [`Source::request`] adds to a request, for requests made away
    /// from the `Source` (the poll that runs beside the watch).
    pub fn stamp(&self) -> Stamp {
        Stamp {
            token: self.token.clone(),
        }
    }

    pub async fn kv(&mut self) -> anyhow::Result<KvClient<Channel>> {
        Ok(KvClient::new(self.connect().await?).max_decoding_message_size(usize::MAX))
    }

    pub async fn watch(&mut self) -> anyhow::Result<WatchClient<Channel>> {
        Ok(WatchClient::new(self.connect().await?).max_decoding_message_size(usize::MAX))
    }

    pub async fn lease(&mut self) -> anyhow::Result<LeaseClient<Channel>> {
        Ok(LeaseClient::new(self.connect().await?))
    }

    pub async fn maintenance(&mut self) -> anyhow::Result<MaintenanceClient<Channel>> {
        Ok(MaintenanceClient::new(self.connect().await?).max_decoding_message_size(usize::MAX))
    }
}

/// The metadata every request to the source carries: the auth token, and
/// etcd's `hasleader`.
#[derive(Clone)]
pub struct Stamp {
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Stamp {
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("token", token.clone());
        }
        request
            .metadata_mut()
            .insert("hasleader", MetadataValue::from_static("true"));
        request
    }
}
