//! Support for backup and restore tests: age keys, a moto S3 server,
//! learners backing up to `file://` or S3, the stores' contents, and
//! `tern-restore`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;
use crate::{etcdctl, free_port, http_get};

/// An age identity made with `age-keygen`: (key file, public key).
pub fn age_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("key.txt");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (apt-get install age)");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&key).expect("key file");
    let public = text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("public key line")
        .to_string();
    (key, public)
}

/// Manifests in a `file://` store's `backups/` directory, oldest first.
pub fn file_manifests(store: &Path) -> Vec<Value> {
    let dir = store.join("backups");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".manifest.json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|n| serde_json::from_slice(&std::fs::read(dir.join(n)).unwrap()).unwrap())
        .collect()
}

pub fn post_backup(endpoint: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(endpoint).expect("connect");
    write!(
        stream,
        "POST /backup HTTP/1.1\r\nHost: {endpoint}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

pub fn fill(endpoint: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let out = etcdctl(
            endpoint,
            &["put", &format!("{prefix}{i:04}"), &format!("v{i}")],
            None,
        );
        assert_eq!(out.code, 0, "{out:?}");
    }
}

/// Put `n` keys `<prefix>NN` with `size` bytes of incompressible printable
/// values each, so a backup of them takes a while through a capped link.
pub fn fill_incompressible(endpoint: &str, prefix: &str, n: usize, size: usize) {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..n {
        let value: String = (0..size)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'!' + (seed % 90) as u8)
            })
            .filter(|c| *c != '\'' && *c != '\\')
            .collect();
        let out = etcdctl(endpoint, &["put", &format!("{prefix}{i:02}"), &value], None);
        assert_eq!(out.code, 0, "{out:?}");
    }
}

/// A moto S3 server on loopback, killed on drop.
pub struct S3 {
    child: Child,
    pub endpoint: String,
}

impl S3 {
    pub fn start() -> S3 {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]'; .ci/run does)");
        let endpoint = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&endpoint).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3 { child, endpoint }
    }

    pub fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.endpoint).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.endpoint
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    /// Object keys under `prefix`, from a path-style ListObjectsV2.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let body = http_get(
            &self.endpoint,
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
        );
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    pub fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.endpoint).unwrap();
        // moto refuses anonymous object reads; it does not check the
        // signature itself.
        write!(
            s,
            "GET /{bucket}/{key} HTTP/1.1\r\nHost: {}\r\nAuthorization: AWS4-HMAC-SHA256 \
             Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, \
             Signature=0\r\nConnection: close\r\n\r\n",
            self.endpoint
        )
        .unwrap();
        let mut r = Vec::new();
        s.read_to_end(&mut r).unwrap();
        let split = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        r[split..].to_vec()
    }
}

impl S3 {
    /// Replace an object (moto checks no signature).
    pub fn put_object(&self, bucket: &str, key: &str, data: &[u8]) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.endpoint).unwrap();
        write!(
            s,
            "PUT /{bucket}/{key} HTTP/1.1\r\nHost: {}\r\nAuthorization: AWS4-HMAC-SHA256 \
             Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, \
             Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.endpoint,
            data.len()
        )
        .unwrap();
        s.write_all(data).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
}

/// Wait until the newest backup in the store (`store`: tern-restore's
/// flags for it) is reachable with the archived log up to `rev`.
pub fn wait_archived(store: &[&str], rev: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(store);
        let out = tern_restore(&args);
        assert!(out.status.success(), "{out:?}");
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        if listed[0]["reachable"]["to_revision"].as_i64() >= Some(rev) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archived log did not reach revision {rev}: {listed}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Add a tern-learner backing up to `url` (a `file://` store) for
/// `recipient`, with `extra` flags. Returns its index.
pub fn add_file_learner(c: &mut Cluster, url: &str, recipient: &str, extra: &[&str]) -> usize {
    let mut args = vec!["--backup-url", url, "--backup-recipient", recipient];
    args.extend_from_slice(extra);
    c.add_member(true, &args)
}

/// Add a tern-learner backing up to `s3://tern/dr` at `endpoint`, with
/// credentials in the environment as in production. Returns its index.
pub fn add_s3_learner(c: &mut Cluster, endpoint: &str, recipient: &str, extra: &[&str]) -> usize {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ] {
        // SAFETY: every test of this binary sets the same values, before
        // it starts members; nothing reads them concurrently in-process.
        unsafe { std::env::set_var(k, v) };
    }
    let mut args = vec![
        "--backup-url",
        "s3://tern/dr",
        "--backup-s3-endpoint",
        endpoint,
        "--backup-s3-path-style",
        "--backup-s3-allow-http",
        "--backup-recipient",
        recipient,
    ];
    args.extend_from_slice(extra);
    c.add_member(true, &args)
}

/// Manifest keys and data keys in an S3 bucket's backups/.
pub fn s3_backups(s3: &S3) -> (Vec<String>, Vec<String>) {
    let keys = s3.keys("tern", "dr/backups/");
    let manifests = keys
        .iter()
        .filter(|k| k.ends_with(".manifest.json"))
        .cloned()
        .collect();
    let data = keys
        .iter()
        .filter(|k| k.ends_with(".db.zst.age"))
        .cloned()
        .collect();
    (manifests, data)
}

/// Run `tern-restore` with `args`.
pub fn tern_restore(args: &[&str]) -> Output {
    Command::new(crate::workspace_bin("tern-restore"))
        .args(args)
        .output()
        .expect("tern-restore")
}
