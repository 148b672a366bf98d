//! TLS on the client, metrics and peer listeners, and for dialing
//! `https://` URLs of other members, with etcd's flags.
//!
//! # Serving
//!
//! A listener whose URL is `https://` hands each accepted TCP connection to
//! [`incoming`], which runs the TLS handshake on a task of its own (with a
//! deadline) and yields only finished handshakes. A client that never
//! speaks, or speaks plain HTTP/2 to a TLS port, fails its own handshake
//! and is dropped; it never holds up the next connection, and the listener
//! never sees an error. TLS sits between TCP and whatever reads the bytes
//! next (the [`authority_shim`](crate::authority_shim) on client listeners).
//!
//! # Reloading
//!
//! Each handshake takes the [`ServerTls`]'s current rustls config, so a new
//! certificate applies to every connection accepted after the swap while
//! open connections keep theirs. [`ServerTls::watch`] rebuilds the config on
//! SIGHUP and when one of the files' modification time or size changes
//! (polled every [`RELOAD_POLL`]): certificates can be rotated by replacing
//! the files, without a restart. A reload that fails (a half-written file, a
//! key that does not match the certificate) is logged and the old config
//! stays; the next change of the files tries again.
//!
//! # Dialing
//!
//! [`DialTls`] is what a member presents when it dials another member: the
//! peer set (peer-trusted-ca-file as roots, peer-cert-file/peer-key-file as
//! its identity) for Raft, joins and probes, and the client set for the
//! leader's client URLs (forwarded requests). It is tonic's own rustls
//! connector (tonic's `tls-ring` feature), configured from the files read
//! at each dial, so a rotated client certificate is used by the next
//! connection.
//!
//! # One crypto provider
//!
//! ring, for every rustls config in the process, installed once by
//! [`install_crypto_provider`] (aws-lc-rs would need cmake to build).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tern_config::{PrimaryConfig, TlsKeys};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How often the reloader looks at the certificate files.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);
/// How long a connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// ALPN of the client and metrics listeners: gRPC, and HTTP/1.1 for
/// `/health` and `/metrics`.
pub const ALPN_CLIENT: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of the peer listeners: gRPC only.
pub const ALPN_PEER: &[&[u8]] = &[b"h2"];

/// Why a TLS config could not be built. Every variant names the flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--{key} {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("--{key} {path}: {reason}")]
    Invalid {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("--{key}: {source}")]
    Rustls {
        key: &'static str,
        source: rustls::Error,
    },
}

/// Make ring the process's rustls crypto provider; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only if another provider got there first, which is then the
        // one in use: there is nothing to undo.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    install_crypto_provider();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// One listener kind's certificate files, from the client or the peer
/// flags.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub keys: TlsKeys,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Checked against only with `client_cert_auth`.
    pub trusted_ca: Option<PathBuf>,
    pub client_cert_auth: bool,
}

impl ServerFiles {
    /// The client set, if `cert-file` is given.
    pub fn client(config: &PrimaryConfig) -> Option<ServerFiles> {
        Some(ServerFiles {
            keys: TlsKeys::CLIENT,
            cert: config.cert_file.clone()?,
            key: config.key_file.clone()?,
            trusted_ca: config.trusted_ca_file.clone(),
            client_cert_auth: config.client_cert_auth,
        })
    }

    /// The peer set, if `peer-cert-file` is given.
    pub fn peer(config: &PrimaryConfig) -> Option<ServerFiles> {
        Some(ServerFiles {
            keys: TlsKeys::PEER,
            cert: config.peer_cert_file.clone()?,
            key: config.peer_key_file.clone()?,
            trusted_ca: config.peer_trusted_ca_file.clone(),
            client_cert_auth: config.peer_client_cert_auth,
        })
    }

    fn build(&self, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
        let provider = provider();
        let certs = read_certs(self.keys.cert, &self.cert)?;
        let key = read_key(self.keys.key, &self.key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                key: self.keys.cert,
                source,
            })?;
        let builder = match (&self.trusted_ca, self.client_cert_auth) {
            (Some(ca), true) => {
                let roots = read_roots(self.keys.trusted_ca, ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Invalid {
                            key: self.keys.trusted_ca,
                            path: ca.display().to_string(),
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            // The config refuses cert auth without a CA; without cert auth
            // a CA file only serves dialing.
            _ => builder.with_no_client_auth(),
        };
        let mut config =
            builder
                .with_single_cert(certs, key)
                .map_err(|source| TlsError::Rustls {
                    key: self.keys.key,
                    source,
                })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// Modification time and size of each file: what the reloader watches.
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        [Some(&self.cert), Some(&self.key), self.trusted_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Invalid {
        key,
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(certs)
}

fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Invalid {
        key,
        path: path.display().to_string(),
        reason: format!("no PEM private key in the file: {e}"),
    })
}

fn read_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(key, path)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::Rustls { key, source })?;
    }
    Ok(roots)
}

/// A listener kind's rustls config, replaced whole on reload.
pub struct ServerTls {
    files: ServerFiles,
    alpn: &'static [&'static [u8]],
    current: RwLock<Arc<ServerConfig>>,
    /// The files' stamps at the last (successful or failed) load attempt.
    seen: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ServerTls {
    /// Load the files now: a bad file stops start-up, naming its flag.
    pub fn load(files: ServerFiles, alpn: &'static [&'static [u8]]) -> Result<Arc<Self>, TlsError> {
        let seen = files.stamps();
        let config = files.build(alpn)?;
        Ok(Arc::new(ServerTls {
            files,
            alpn,
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(seen),
        }))
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuild from the files; on failure the old config stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = self.files.stamps();
        let config = self.files.build(self.alpn)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn changed(&self) -> bool {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != self.files.stamps()
    }

    /// Reload on SIGHUP and when the files change, for the life of the
    /// process.
    pub fn watch(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hangup = match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler; certificates reload on file change only");
                    None
                }
            };
            let mut poll = tokio::time::interval(RELOAD_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGHUP",
                    _ = poll.tick() => {
                        if !tls.changed() {
                            continue;
                        }
                        "files changed"
                    }
                };
                let blocking = tls.clone();
                let result = tokio::task::spawn_blocking(move || blocking.reload()).await;
                let cert = tls.files.cert.display().to_string();
                match result {
                    Ok(Ok(())) => tracing::info!(%cert, reason = why, "TLS certificates reloaded"),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, reason = why, "TLS reload failed; keeping the previous certificates")
                    }
                    Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
                }
            }
        });
    }
}

/// An accepted connection, with or without TLS.
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The accepted connections of `listener`: TLS handshakes finished with
/// `tls`'s current config when given, plain TCP otherwise. Nagle is off on
/// both (small responses would wait for the peer's delayed ACK).
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send>> {
    let tcp = TcpIncoming::from(listener).with_nodelay(Some(true));
    let Some(tls) = tls else {
        return Box::pin(tcp.map(|c| c.map(Connection::Plain)));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Connection>>(64);
    tokio::spawn(async move {
        let mut tcp = tcp;
        loop {
            let accepted = tokio::select! {
                accepted = tcp.next() => accepted,
                // The server stopped reading: stop accepting.
                _ = tx.closed() => return,
            };
            let stream = match accepted {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
                None => return,
            };
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Connection::Tls(Box::new(stream)))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = ?peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = ?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What a request knows of its connection (tonic puts it in the request's
/// extensions): the TCP addresses and, over TLS, the common name of the
/// client certificate the handshake verified. etcd takes that name as the
/// user of a request that carries no token.
#[derive(Clone, Debug)]
pub struct ClientConnectInfo {
    pub tcp: TcpConnectInfo,
    pub common_name: Option<String>,
}

impl Connected for Connection {
    type ConnectInfo = ClientConnectInfo;

    fn connect_info(&self) -> ClientConnectInfo {
        match self {
            Connection::Plain(s) => ClientConnectInfo {
                tcp: s.connect_info(),
                common_name: None,
            },
            Connection::Tls(s) => ClientConnectInfo {
                tcp: s.get_ref().0.connect_info(),
                common_name: verified_common_name(s),
            },
        }
    }
}

/// The subject CN of the client's certificate. rustls only holds one after
/// verifying it against the trusted CA (with client-cert-auth; without it,
/// none is asked for).
fn verified_common_name(tls: &TlsStream<TcpStream>) -> Option<String> {
    let der = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (!cn.is_empty()).then(|| cn.to_string())
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(s) => s.is_write_vectored(),
            Connection::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_flush(cx),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why another member could not be dialed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// What this member presents when it dials an `https://` URL of another
/// member. Plain `http://` URLs are dialed without TLS whatever is set.
#[derive(Debug, Clone)]
pub struct DialTls {
    keys: TlsKeys,
    trusted_ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

impl DialTls {
    /// For peer URLs: the peer set of flags.
    pub fn peer(config: &PrimaryConfig) -> DialTls {
        DialTls {
            keys: TlsKeys::PEER,
            trusted_ca: config.peer_trusted_ca_file.clone(),
            identity: config
                .peer_cert_file
                .clone()
                .zip(config.peer_key_file.clone()),
        }
    }

    /// For other members' client URLs: the client set of flags.
    pub fn client(config: &PrimaryConfig) -> DialTls {
        DialTls {
            keys: TlsKeys::CLIENT,
            trusted_ca: config.trusted_ca_file.clone(),
            identity: config.cert_file.clone().zip(config.key_file.clone()),
        }
    }

    /// For a follower's source etcd: `--etcd-cacert`, `--etcd-cert` and
    /// `--etcd-key`.
    pub fn source(trusted_ca: Option<PathBuf>, identity: Option<(PathBuf, PathBuf)>) -> DialTls {
        DialTls {
            keys: TlsKeys::SOURCE,
            trusted_ca,
            identity,
        }
    }

    /// An endpoint for `url`, with TLS when it is `https://`.
    pub async fn endpoint(&self, url: &str) -> Result<Endpoint, DialError> {
        let endpoint = Endpoint::from_shared(url.to_string())?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        install_crypto_provider();
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.trusted_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(self.keys.trusted_ca, ca).await?));
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(
                read(self.keys.cert, cert).await?,
                read(self.keys.key, key).await?,
            ));
        }
        Ok(endpoint.tls_config(tls)?)
    }
}

async fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| TlsError::Read {
            key,
            path: path.display().to_string(),
            source,
        })
}
