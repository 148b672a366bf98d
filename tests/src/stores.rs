//! The object stores backups go to, each a real server on loopback, behind
//! one interface so one suite runs the same cases on every store:
//! `file://`, S3 (moto), Azure Blob (Azurite, npm's `azurite`).
//!
//! Credentials reach the learner and `tern-restore` the way production
//! passes them: object_store's environment variables (`AWS_*`, and for
//! Azurite `AZURE_STORAGE_USE_EMULATOR` with `AZURITE_BLOB_STORAGE_URL`,
//! which selects Azurite's well-known account and key).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::backups::S3;
use crate::free_port;

/// The S3 secret key the suite runs with: moto checks no signature, and a
/// value this distinctive shows up if anything logs it.
pub const S3_SECRET: &str = "tern-test-secret-Qm9vT3JH7z";

/// Azurite's well-known development account.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where a suite's backups go.
pub enum Store {
    File { root: PathBuf },
    S3(S3),
    Azure(Azurite),
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
        Store::S3(s3)
    }

    /// An Azurite blob server with the container `tern`.
    pub fn azure(dir: &Path) -> Store {
        let azurite = Azurite::start(dir);
        azurite.create_container("tern");
        // SAFETY: as for S3; only one Azure test runs in a binary.
        unsafe {
            std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
            std::env::set_var("AZURITE_BLOB_STORAGE_URL", azurite.url());
        }
        Store::Azure(azurite)
    }

    /// The secret this store's credentials carry, which nothing may log.
    pub fn secret(&self) -> Option<&'static str> {
        match self {
            Store::S3(_) => Some(S3_SECRET),
            Store::File { .. } | Store::Azure(_) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Store::File { .. } => "file",
            Store::S3(_) => "s3",
            Store::Azure(_) => "azure",
        }
    }

    /// `--backup-url` and the store's other flags, for a learner.
    pub fn learner_args(&self) -> Vec<String> {
        self.flags("backup-")
    }

    /// `--url` and the store's other flags, for `tern-restore`.
    pub fn restore_args(&self) -> Vec<String> {
        self.flags("")
    }

    /// The learner's flags are tern-restore's with `backup-` in front.
    fn flags(&self, prefix: &str) -> Vec<String> {
        let mut args = vec![format!("--{prefix}url"), self.url()];
        if let Store::S3(s3) = self {
            args.extend([
                format!("--{prefix}s3-endpoint"),
                format!("http://{}", s3.endpoint),
                format!("--{prefix}s3-path-style"),
                format!("--{prefix}s3-allow-http"),
            ]);
        }
        args
    }

    pub fn url(&self) -> String {
        match self {
            Store::File { root } => format!("file://{}", root.display()),
            Store::S3(_) => "s3://tern/dr".into(),
            Store::Azure(_) => "az://tern/dr".into(),
        }
    }

    /// Replace the object at `key` (below the URL's prefix) with `data`,
    /// as someone with write access to the store could.
    pub fn overwrite(&self, key: &str, data: &[u8]) {
        match self {
            Store::File { root } => std::fs::write(root.join(key), data).expect("overwrite"),
            Store::S3(s3) => s3.put_object("tern", &format!("dr/{key}"), data),
            Store::Azure(azurite) => azurite.put_blob("tern", &format!("dr/{key}"), data),
        }
    }
}

/// An Azurite blob server on loopback, killed on drop.
pub struct Azurite {
    child: Child,
    port: u16,
}

impl Azurite {
    pub fn start(dir: &Path) -> Azurite {
        let port = free_port();
        let location = dir.join("azurite");
        let child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(&location)
            .args(["--silent", "--skipApiVersionCheck"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("azurite-blob (npm install -g azurite; .ci/run does)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "azurite did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Azurite { child, port }
    }

    /// The blob service's URL (object_store's `AZURITE_BLOB_STORAGE_URL`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_container(&self, name: &str) {
        self.python(
            &format!("service.create_container({name:?})\nprint('ok')",),
            &[],
        );
    }

    pub fn put_blob(&self, container: &str, key: &str, data: &[u8]) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), data).expect("write blob data");
        self.python(
            &format!(
                "import sys\nwith open(sys.argv[1], 'rb') as f:\n    \
                 service.get_blob_client({container:?}, {key:?}).upload_blob(f.read(), overwrite=True)\n\
                 print('ok')"
            ),
            &[file.path()],
        );
    }

    /// Run `body` with `service`, a BlobServiceClient on this server
    /// (the `azure-storage-blob` package, in the venv `.ci/run` makes).
    fn python(&self, body: &str, args: &[&Path]) -> Output {
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={}/{AZURITE_ACCOUNT};",
            self.url()
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
