//! TLS with etcd's flags, against real processes and real etcdctl: client
//! certificate checks on the client URL, /metrics over https, certificate
//! reload on SIGHUP and on file change, and a 3-member cluster (and a
//! learner) that talks TLS only, to clients and among its members.
//!
//! Every certificate is made by the test (rcgen): a CA, a server/peer
//! certificate for 127.0.0.1 and localhost, a client certificate, a second
//! CA with a client certificate of its own, and an expired client
//! certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tern_primary::proto::ternpb::{peer_client::PeerClient, MembersRequest};
use tern_tests::cluster::{Cluster, Options};
use tern_tests::pki::{write_atomically, Ca, Leaf, Pki};
use tern_tests::{etcdctl, free_port, Output, Tern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// etcdctl's TLS flags: the CA, and a client certificate if given.
fn etcdctl_tls(ca: &Path, client: Option<&Leaf>) -> Vec<String> {
    let mut flags = vec!["--cacert".to_string(), s(ca)];
    if let Some(c) = client {
        flags.extend(["--cert".into(), s(&c.cert), "--key".into(), s(&c.key)]);
    }
    flags
}

/// The client flags of a TLS member checking client certificates.
fn server_flags(ca: &Ca, server: &Leaf) -> Vec<String> {
    vec![
        "--cert-file".into(),
        s(&server.cert),
        "--key-file".into(),
        s(&server.key),
        "--trusted-ca-file".into(),
        s(&ca.cert),
        "--client-cert-auth".into(),
    ]
}

/// etcdctl with its own TLS flags, failing fast: a refused handshake
/// otherwise waits out the whole command timeout.
fn etcdctl_with(url: &str, tls: &[String], args: &[&str]) -> Output {
    let mut all: Vec<&str> = vec!["--dial-timeout=2s", "--command-timeout=4s"];
    all.extend(tls.iter().map(String::as_str));
    all.extend_from_slice(args);
    etcdctl(url, &all, None)
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A rustls client trusting `ca`, presenting `client` if given.
fn rustls_client(ca: &Path, client: Option<&Leaf>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA pem")).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                vec![c.der.clone()],
                PrivateKeyDer::from_pem_file(&c.key).expect("client key"),
            )
            .expect("client identity"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The certificate a TLS listener serves to a new connection now.
fn served_certificate(addr: &str, ca: &Path, client: &Leaf) -> Option<CertificateDer<'static>> {
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let tls = rustls_client(ca, Some(client), &[b"h2"])
            .connect(name, tcp)
            .await
            .ok()?;
        tls.get_ref().1.peer_certificates()?.first().cloned()
    })
}

/// An HTTP/1.1 GET over TLS: the whole response, or why the connection
/// failed (a server's refusal arrives as a TLS alert on the first read).
fn https_get(addr: &str, path: &str, ca: &Path, client: Option<&Leaf>) -> Result<String, String> {
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let mut tls = rustls_client(ca, client, &[b"http/1.1"])
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        let read = tls.read_to_end(&mut response).await;
        match read {
            Err(e) if response.is_empty() => Err(e.to_string()),
            // A server may close without close_notify; what arrived counts.
            _ => Ok(String::from_utf8_lossy(&response).into_owned()),
        }
    })
}

/// Why a TLS listener refuses `client` (the alert it sent), or None if it
/// keeps the connection. Nothing is written: a server closing a socket with
/// unread data would reset it, and the alert could be lost with it.
fn refusal(addr: &str, ca: &Path, client: Option<&Leaf>) -> Option<String> {
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let mut tls = match rustls_client(ca, client, &[b"h2"]).connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return Some(e.to_string()),
        };
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Err(e)) => Some(e.to_string()),
            Ok(Ok(0)) => Some("closed without an alert".into()),
            Ok(Ok(_)) | Err(_) => None,
        }
    })
}

/// Poll until `f` holds (or panic after `within`).
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("not within {within:?}: {what}");
}

#[test]
fn client_cert_auth_admits_only_valid_clients_of_the_trusted_ca() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "client", false);
    let other_ca = pki.ca("other-ca");
    let stranger = pki.leaf(&other_ca, "stranger", false);
    let expired = pki.leaf(&ca, "expired", true);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut flags = server_flags(&ca, &server);
    flags.extend([
        "--listen-metrics-urls".to_string(),
        format!("https://{metrics}"),
    ]);
    let tern = Tern::start_tls(&as_strs(&flags), &etcdctl_tls(&ca.cert, Some(&client)));
    let url = tern.url();
    assert!(url.starts_with("https://"), "{url}");

    let put = tern.etcdctl(&["put", "greeting", "hello"]);
    assert_eq!(put.code, 0, "put over TLS: {put:?}");
    let get = tern.etcdctl(&["get", "greeting", "--print-value-only"]);
    assert_eq!(get.stdout.trim(), "hello", "{get:?}");

    // The same fail-fast invocation succeeds with a good certificate, so
    // the refusals below are the certificates' doing.
    let good = etcdctl_with(
        &url,
        &etcdctl_tls(&ca.cert, Some(&client)),
        &["get", "greeting", "--print-value-only"],
    );
    assert_eq!(good.stdout.trim(), "hello", "{good:?}");
    let refused = [
        ("no client certificate", None, "CertificateRequired"),
        (
            "a certificate from another CA",
            Some(&stranger),
            "UnknownCA",
        ),
        (
            "an expired certificate",
            Some(&expired),
            "CertificateExpired",
        ),
    ];
    for (what, cert, alert) in refused {
        let out = etcdctl_with(&url, &etcdctl_tls(&ca.cert, cert), &["get", "greeting"]);
        assert_ne!(out.code, 0, "a client with {what} was served: {out:?}");
        assert!(!out.stdout.contains("hello"), "{what}: {out:?}");
        // Why, as the server's TLS alert says it.
        let answer = refusal(&tern.endpoint, &ca.cert, cert);
        assert!(
            answer.as_ref().is_some_and(|e| e.contains(alert)),
            "a client with {what}: expected alert {alert}, got {answer:?}"
        );
    }
    // Plain text on the TLS port is refused too, and the listener lives on.
    let plain = etcdctl_with(
        &format!("http://{}", tern.endpoint),
        &[],
        &["get", "greeting"],
    );
    assert_ne!(plain.code, 0, "plain text on a TLS port: {plain:?}");
    let again = tern.etcdctl(&["get", "greeting", "--print-value-only"]);
    assert_eq!(again.stdout.trim(), "hello", "{again:?}");

    // /metrics and /health over https, on the client URL and the metrics URL.
    for addr in [tern.endpoint.as_str(), metrics.as_str()] {
        let body = https_get(addr, "/metrics", &ca.cert, Some(&client)).expect("/metrics");
        assert!(body.starts_with("HTTP/1.1 200"), "{addr}: {body}");
        assert!(body.contains("etcd_server_has_leader"), "{addr}: {body}");
        let health = https_get(addr, "/health", &ca.cert, Some(&client)).expect("/health");
        assert!(health.contains("\"health\":\"true\""), "{addr}: {health}");
        let anonymous = refusal(addr, &ca.cert, None);
        assert!(
            anonymous.is_some(),
            "{addr}: /metrics without a certificate: {anonymous:?}"
        );
    }
}

#[test]
fn https_without_a_certificate_stops_start_up_naming_the_key() {
    let out = std::process::Command::new(tern_tests::workspace_bin("tern-primary"))
        .args(["--listen-client-urls", "https://127.0.0.1:0"])
        .output()
        .expect("run tern-primary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cert-file"), "{stderr}");

    // A file that is not a certificate is named by its flag, too.
    let pki = Pki::new();
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let data = pki.path("data");
    let out = std::process::Command::new(tern_tests::workspace_bin("tern-primary"))
        .args(["--listen-client-urls", "https://127.0.0.1:0"])
        .args(["--listen-peer-urls", "http://127.0.0.1:0"])
        .args(["--cert-file", &s(&garbage), "--key-file", &s(&garbage)])
        .args(["--data-dir", &s(&data)])
        .output()
        .expect("run tern-primary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cert-file"), "{stderr}");
}

#[test]
fn certificates_reload_on_sighup_and_on_file_change() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let first = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "client", false);
    let flags = server_flags(&ca, &first);
    let tern = Tern::start_tls(&as_strs(&flags), &etcdctl_tls(&ca.cert, Some(&client)));
    let addr = tern.endpoint.clone();
    assert_eq!(
        served_certificate(&addr, &ca.cert, &client),
        Some(first.der.clone())
    );

    // Same paths, new certificate (new key and serial), then SIGHUP.
    let second = pki.leaf(&ca, "server", false);
    assert_ne!(second.der, first.der);
    // SAFETY: plain kill(2) on a child this test owns.
    unsafe {
        libc::kill(tern.pid() as i32, libc::SIGHUP);
    }
    eventually(
        "the new certificate is served",
        Duration::from_secs(10),
        || served_certificate(&addr, &ca.cert, &client) == Some(second.der.clone()),
    );
    let put = tern.etcdctl(&["put", "after-reload", "1"]);
    assert_eq!(put.code, 0, "{put:?}");

    // Without a signal: the reloader sees the files change.
    let third = pki.leaf(&ca, "server", false);
    eventually(
        "the changed files are picked up",
        Duration::from_secs(15),
        || served_certificate(&addr, &ca.cert, &client) == Some(third.der.clone()),
    );

    // A broken certificate file is not taken: the previous one stays, past
    // a SIGHUP and a few file polls.
    write_atomically(&third.cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n");
    // SAFETY: as above.
    unsafe {
        libc::kill(tern.pid() as i32, libc::SIGHUP);
    }
    let until = Instant::now() + tern_primary::tls::RELOAD_POLL * 2;
    while Instant::now() < until {
        assert_eq!(
            served_certificate(&addr, &ca.cert, &client),
            Some(third.der.clone()),
            "a broken certificate file replaced the served one"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let get = tern.etcdctl(&["get", "after-reload", "--print-value-only"]);
    assert_eq!(get.stdout.trim(), "1", "{get:?}");
}

/// A peer-service client for `addr`, over TLS with the given identity, or
/// plain HTTP/2 without `ca`.
async fn peer_members(
    addr: &str,
    ca: Option<&Path>,
    identity: Option<&Leaf>,
) -> Result<usize, String> {
    let endpoint = match ca {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?,
        Some(ca) => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
            if let Some(id) = identity {
                tls = tls.identity(Identity::from_pem(
                    std::fs::read(&id.cert).unwrap(),
                    std::fs::read(&id.key).unwrap(),
                ));
            }
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| e.to_string())?
                .tls_config(tls)
                .map_err(|e| e.to_string())?
        }
    };
    let channel = endpoint
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    PeerClient::new(channel)
        .members(MembersRequest {})
        .await
        .map(|r| r.into_inner().members.len())
        .map_err(|e| e.to_string())
}

#[test]
fn tls_cluster_replicates_forwards_and_refuses_plain_peers() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    // One certificate per member would do as well; peers and the client
    // listeners share this one.
    let member = pki.leaf(&ca, "member", false);
    let client = pki.leaf(&ca, "client", false);
    let other_ca = pki.ca("other-ca");
    let stranger = pki.leaf(&other_ca, "stranger", false);
    let mut flags = server_flags(&ca, &member);
    flags.extend([
        "--peer-cert-file".to_string(),
        s(&member.cert),
        "--peer-key-file".into(),
        s(&member.key),
        "--peer-trusted-ca-file".into(),
        s(&ca.cert),
        "--peer-client-cert-auth".into(),
    ]);
    let options = Options {
        peer_https: true,
        client_tls: Some(etcdctl_tls(&ca.cert, Some(&client))),
    };
    let mut cluster = Cluster::start_with(3, options, &as_strs(&flags));
    let leader = cluster.leader();
    let members = cluster.nodes[leader].etcdctl(&["member", "list"]);
    assert_eq!(
        members.stdout.matches("https://").count(),
        6,
        "every peer and client URL is https: {members:?}"
    );
    let put = cluster.nodes[leader].etcdctl(&["put", "replicated", "over-tls"]);
    assert_eq!(put.code, 0, "{put:?}");
    for i in 0..3 {
        eventually(
            &format!("member {i} has the key"),
            Duration::from_secs(10),
            || {
                cluster.nodes[i]
                    .etcdctl(&["get", "replicated", "--print-value-only", "--consistency=s"])
                    .stdout
                    .trim()
                    == "over-tls"
            },
        );
    }

    // A follower sends lease keep-alives on to the leader's https client URL.
    let follower = (leader + 1) % 3;
    let grant = cluster.nodes[follower].etcdctl(&["lease", "grant", "60"]);
    let lease = grant
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease grant: {grant:?}"))
        .to_string();
    let kept = cluster.nodes[follower].etcdctl(&["lease", "keep-alive", "--once", &lease]);
    assert_eq!(kept.code, 0, "keep-alive through a follower: {kept:?}");
    assert!(kept.stdout.contains("keepalived"), "{kept:?}");

    let rt = runtime();
    let target = cluster.nodes[0].proxy.target().to_string();
    // A client that never finishes a handshake holds no one up.
    let silent = std::net::TcpStream::connect(&target).expect("connect");
    let plain = rt.block_on(peer_members(&target, None, None));
    assert!(plain.is_err(), "plain HTTP/2 on a TLS peer port: {plain:?}");
    let anonymous = rt.block_on(peer_members(&target, Some(&ca.cert), None));
    assert!(
        anonymous.is_err(),
        "a peer without a certificate: {anonymous:?}"
    );
    let foreign = rt.block_on(peer_members(&target, Some(&ca.cert), Some(&stranger)));
    assert!(foreign.is_err(), "a peer of another CA: {foreign:?}");
    let trusted = rt.block_on(peer_members(&target, Some(&ca.cert), Some(&member)));
    assert_eq!(trusted, Ok(3), "a trusted peer, beside the silent one");
    drop(silent);

    // A learner joins over TLS (it dials the members' https peer URLs with
    // the same flags) and follows the log.
    let learner = cluster.add_member(true, &[]);
    let put = cluster.nodes[leader].etcdctl(&["put", "for-the-learner", "yes"]);
    assert_eq!(put.code, 0, "{put:?}");
    eventually("the learner has the key", Duration::from_secs(30), || {
        cluster.nodes[learner]
            .etcdctl(&[
                "get",
                "for-the-learner",
                "--print-value-only",
                "--consistency=s",
            ])
            .stdout
            .trim()
            == "yes"
    });
}

/// With client-cert-auth and auth on, a request without a token acts as
/// the user its verified client certificate names (its CN), as in etcd;
/// a token, when given, wins.
#[test]
fn a_client_certificate_names_the_user_when_auth_is_on() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let root = pki.leaf(&ca, "root", false);
    let alice = pki.leaf(&ca, "alice", false);
    let tern = Tern::start_tls(
        &as_strs(&server_flags(&ca, &server)),
        &etcdctl_tls(&ca.cert, Some(&root)),
    );
    let rest: [&[&str]; 2] = [&["put", "/b/x", "2"], &["auth", "enable"]];
    for args in tern_tests::ALICE_READS_A.iter().chain(&rest) {
        let out = tern.etcdctl(args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    let url = tern.url();
    let as_root = etcdctl_tls(&ca.cert, Some(&root));
    let as_alice = etcdctl_tls(&ca.cert, Some(&alice));
    let put = etcdctl_with(&url, &as_root, &["put", "/b/y", "3"]);
    assert_eq!(put.code, 0, "CN root is root: {put:?}");
    let get = etcdctl_with(&url, &as_alice, &["get", "/a/x", "--print-value-only"]);
    assert_eq!(get.stdout.trim(), "1", "CN alice reads /a/: {get:?}");
    for args in [&["get", "/b/x"][..], &["put", "/a/x", "2"]] {
        let out = etcdctl_with(&url, &as_alice, args);
        assert_eq!(
            out.error_line(),
            "Error: etcdserver: permission denied",
            "{args:?}: {out:?}"
        );
    }
    let put = etcdctl_with(
        &url,
        &as_alice,
        &["--user", "root:rootpw", "put", "/b/z", "4"],
    );
    assert_eq!(put.code, 0, "a token wins over the certificate: {put:?}");
}

/// `curl` with TLS: the CA, and a client certificate if given.
fn curl_tls(url: &str, ca: &Path, client: Option<&Leaf>, body: &str) -> (i32, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "-X",
        "POST",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
    ])
    .args(["--cacert", &s(ca)])
    .args(["--data-binary", body]);
    if let Some(c) = client {
        cmd.args(["--cert", &s(&c.cert), "--key", &s(&c.key)]);
    }
    let out = cmd.arg(url).output().expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// The JSON gateway is served on an `https://` client URL behind the same
/// TLS: a client certificate of the trusted CA is required, and with auth
/// on a request with a named certificate is refused as etcd refuses it
/// (the name would not be used), while a token works.
#[test]
fn the_gateway_serves_https_behind_the_same_tls() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let root = pki.leaf(&ca, "root", false);
    let tern = Tern::start_tls(
        &as_strs(&server_flags(&ca, &server)),
        &etcdctl_tls(&ca.cert, Some(&root)),
    );
    let put = format!("{}/v3/kv/put", tern.url());
    let (code, out) = curl_tls(
        &put,
        &ca.cert,
        Some(&root),
        r#"{"key":"YQ==","value":"MQ=="}"#,
    );
    assert_eq!(code, 0);
    assert!(out.ends_with("\n200"), "{out}");
    let (code, _) = curl_tls(&put, &ca.cert, None, r#"{"key":"YQ==","value":"MQ=="}"#);
    assert_ne!(code, 0, "no client certificate: the handshake fails");
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let out = tern.etcdctl(args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    let (_, out) = curl_tls(
        &put,
        &ca.cert,
        Some(&root),
        r#"{"key":"YQ==","value":"Mg=="}"#,
    );
    assert_eq!(
        out,
        "CommonName of client sending a request against gateway will be ignored and not used as expected\n\n400"
    );
}

/// A client that names the server by IP address in its TLS hello (Node's
/// gRPC does) makes rustls warn on every connection; that stays out of
/// the log unless the level asks for rustls.
#[test]
fn clients_naming_the_server_by_ip_do_not_fill_the_log() {
    // SAFETY: the other tests in this binary only read it, at start-up
    // (it makes every member keep a log beside its data dir).
    unsafe { std::env::set_var("TERN_TEST_MEMBER_LOGS", "1") };
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let tls = [
        "--cert-file".to_string(),
        s(&server.cert),
        "--key-file".into(),
        s(&server.key),
    ];
    let warned = |level: &str| {
        let mut flags = tls.to_vec();
        flags.extend(["--log-level".to_string(), level.to_string()]);
        let tern = Tern::start_tls(&as_strs(&flags), &etcdctl_tls(&ca.cert, None));
        for _ in 0..3 {
            let hello = std::process::Command::new("openssl")
                .args(["s_client", "-brief", "-connect", &tern.endpoint])
                .args(["-servername", "127.0.0.1"])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("openssl s_client");
            assert!(hello.status.success(), "{hello:?}");
        }
        let log = tern_tests::member_log(&["--data-dir".into(), s(&tern.data_dir)])
            .expect("member logs are on");
        // The handshakes are done; their lines reach the file within
        // milliseconds.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Illegal SNI") {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(
        warned("info,rustls=warn"),
        "asked for, rustls's warning is there (the probe triggers it)"
    );
    assert!(!warned("info"), "by default it is not");
}
