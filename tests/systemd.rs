//! The units in `systemd/`: `systemd-analyze verify` accepts them (pointed
//! at the binaries this workspace built), they carry the hardening the
//! README promises, the example configs fit them, and the members speak
//! systemd's readiness protocol: run with `NOTIFY_SOCKET` on a datagram
//! socket of ours, tern-primary and tern-learner send `READY=1` only once
//! their client port answers, and never while they cannot serve.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern_tests::{etcdctl, free_port, workspace_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(repo().join("systemd").join(name)).expect("unit file")
}

/// The value of `key=` in a unit (the last one, as systemd reads it).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .collect()
}

const UNITS: [&str; 4] = [
    "tern-primary.service",
    "tern-learner.service",
    "tern-restore-drill.service",
    "tern-restore-drill.timer",
];

#[test]
fn units_pass_systemd_analyze_verify() {
    // verify insists that ExecStart= names an executable file: point a
    // copy of the units at the binaries the workspace built.
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in UNITS {
        let mut text = unit_text(unit);
        for bin in ["tern-primary", "tern-learner", "tern-restore"] {
            text = text.replace(
                &format!("/usr/local/bin/{bin} "),
                &format!("{} ", workspace_bin(bin).display()),
            );
        }
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings (an unknown key, a bad value) do not change the exit code:
    // any line about one of ours fails the test. Lines about the host's
    // own units are not ours to judge.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| UNITS.iter().any(|u| l.contains(u)))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {:?}\n{said}",
        out.status
    );
}

#[test]
fn units_are_hardened_and_fit_the_example_configs() {
    for unit in ["tern-primary.service", "tern-learner.service"] {
        let text = unit_text(unit);
        assert_eq!(unit_values(&text, "Type"), ["notify"], "{unit}");
        assert_eq!(unit_values(&text, "ReadWritePaths"), ["/var/lib/tern"]);
        assert_eq!(unit_values(&text, "StateDirectory"), ["tern"], "{unit}");
        // The data dir of the example config is where the unit may write.
        let config = unit_values(&text, "ExecStart")[0]
            .split_whitespace()
            .last()
            .unwrap()
            .to_string();
        let example = repo()
            .join("systemd")
            .join(Path::new(&config).file_name().expect("config file name"));
        let toml = std::fs::read_to_string(&example).expect("example config beside the unit");
        let data_dir = toml
            .lines()
            .find_map(|l| l.strip_prefix("data-dir = "))
            .expect("data-dir in the example config")
            .trim_matches('"');
        assert!(data_dir.starts_with("/var/lib/tern/"), "{data_dir}");
    }
    let drill = unit_text("tern-restore-drill.service");
    assert_eq!(unit_values(&drill, "Type"), ["oneshot"]);
    for unit in [
        "tern-primary.service",
        "tern-learner.service",
        "tern-restore-drill.service",
    ] {
        let text = unit_text(unit);
        for (key, value) in [
            ("User", "tern"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("CapabilityBoundingSet", ""),
            ("LimitNOFILE", "65536"),
        ] {
            assert_eq!(
                unit_values(&text, key),
                [value],
                "{unit}: {key}={value} expected"
            );
        }
    }
    // The timer starts the unit of its own name.
    assert!(repo().join("systemd/tern-restore-drill.service").exists());
    assert!(!unit_values(&unit_text("tern-restore-drill.timer"), "OnCalendar").is_empty());
}

/// A member started with `NOTIFY_SOCKET` pointing at a socket we hold.
struct Notified {
    child: Child,
    socket: UnixDatagram,
    /// The client address the member bound (it may not serve yet).
    client: String,
    _dir: tempfile::TempDir,
}

impl Notified {
    fn spawn(bin: &str, args: &[String]) -> Notified {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let mut child = Command::new(workspace_bin(bin))
            .args(args)
            .env("NOTIFY_SOCKET", &path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn member");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TERN_TEST_LOGS").is_some() {
                    eprintln!("[member] {line}");
                }
                if let Some(rest) = line.split("serving client traffic address=").nth(1) {
                    if !sent {
                        let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                        sent = true;
                    }
                }
            }
        });
        let client = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the member reports its client address");
        Notified {
            child,
            socket,
            client,
            _dir: dir,
        }
    }

    /// The next notification, if one arrives within `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Notifications up to and including the one with `READY=1`.
    fn until_ready(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(m) => {
                    let ready = m.lines().any(|l| l == "READY=1");
                    seen.push(m);
                    if ready {
                        return seen;
                    }
                }
                None => break,
            }
        }
        panic!("no READY=1 within {within:?}; got {seen:?}");
    }

    fn terminate(&mut self) {
        // SAFETY: plain kill(2) on a child we own.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status line of `GET /health`, if the member answers within
/// `within` (a bound but not yet serving listener accepts the connection
/// and says nothing).
fn health(endpoint: &str, within: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(endpoint).ok()?;
    stream.set_read_timeout(Some(within)).ok()?;
    write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().next().map(str::to_string)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn members_send_ready_only_once_their_client_port_answers() {
    let dir = tempfile::tempdir().unwrap();
    let examples = repo().join("systemd");
    let peer = format!("http://127.0.0.1:{}", free_port());

    // A member of a two-member cluster whose other member never starts:
    // no quorum, so it cannot join the member list, and must neither
    // answer clients nor claim to be ready.
    let a = format!("http://127.0.0.1:{}", free_port());
    let alone = Notified::spawn(
        "tern-primary",
        &strings(&[
            "--name",
            "a",
            "--data-dir",
            &dir.path().join("alone.tern").display().to_string(),
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-peer-urls",
            &a,
            "--initial-advertise-peer-urls",
            &a,
            "--initial-cluster",
            &format!("a={a},b=http://127.0.0.1:{}", free_port()),
        ]),
    );
    let waiting = alone
        .next(Duration::from_secs(5))
        .expect("a STATUS= line while waiting");
    assert!(waiting.starts_with("STATUS="), "{waiting:?}");
    assert!(!waiting.contains("READY=1"), "{waiting:?}");
    assert_eq!(health(&alone.client, Duration::from_secs(2)), None);
    assert_eq!(alone.next(Duration::from_millis(500)), None, "no READY=1");
    drop(alone);

    // The example config as shipped, with flags (which win over the file)
    // for what must differ in a test: paths and ports.
    let config = |name: &str| examples.join(name).display().to_string();
    let mut primary = Notified::spawn(
        "tern-primary",
        &strings(&[
            "--config-file",
            &config("primary.toml"),
            "--data-dir",
            &dir.path().join("n1.tern").display().to_string(),
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-metrics-urls",
            "http://127.0.0.1:0",
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("n1={peer}"),
        ]),
    );
    let seen = primary.until_ready(Duration::from_secs(30));
    // Asked the moment READY=1 arrives, the member answers.
    let answer = health(&primary.client, Duration::from_secs(2));
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 200 OK"), "{seen:?}");
    let ready = seen.last().unwrap();
    assert!(
        ready.contains(&format!("STATUS=serving clients on {}", primary.client)),
        "{ready:?}"
    );
    assert!(
        seen[0].starts_with("STATUS="),
        "a status before READY: {seen:?}"
    );

    // The example learner config joins it, the same way.
    let learner_peer = format!("http://127.0.0.1:{}", free_port());
    let added = etcdctl(
        &primary.client,
        &[
            "member",
            "add",
            "dr",
            "--learner",
            &format!("--peer-urls={learner_peer}"),
        ],
        None,
    );
    assert_eq!(added.code, 0, "{added:?}");
    let recipients = dir.path().join("recipients.txt");
    std::fs::write(
        &recipients,
        "# the public half of an age key made for this test\n\
         age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\n",
    )
    .unwrap();
    let learner = Notified::spawn(
        "tern-learner",
        &strings(&[
            "--config-file",
            &config("learner.toml"),
            "--data-dir",
            &dir.path().join("dr.tern").display().to_string(),
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--listen-metrics-urls",
            "http://127.0.0.1:0",
            "--listen-peer-urls",
            &learner_peer,
            "--initial-advertise-peer-urls",
            &learner_peer,
            "--initial-cluster",
            &format!("n1={peer},dr={learner_peer}"),
            "--backup-url",
            &format!("file://{}", dir.path().join("backups").display()),
            "--backup-recipients-file",
            &recipients.display().to_string(),
        ]),
    );
    let seen = learner.until_ready(Duration::from_secs(30));
    let answer = health(&learner.client, Duration::from_secs(2));
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 200 OK"), "{seen:?}");
    assert!(seen.last().unwrap().contains("learner"), "{seen:?}");

    // SIGTERM: STOPPING=1 before the member goes.
    primary.terminate();
    let stopping = primary
        .next(Duration::from_secs(5))
        .expect("a notification on SIGTERM");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}
