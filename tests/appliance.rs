//! `tern-appliance`, the README's first command: a primary, a learner
//! registered with it, a generated age key (0600), a first backup and
//! drill at once; a second run reuses all of it; SIGTERM stops every
//! member.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern_tests::{etcdctl, free_port, workspace_bin};

struct Appliance {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Appliance {
    fn start(dir: &std::path::Path, ports: &[u16; 4]) -> Appliance {
        let mut child = Command::new(workspace_bin("tern-appliance"))
            .arg(format!("--dir={}", dir.display()))
            .arg(format!(
                "--primary-client-url=http://127.0.0.1:{}",
                ports[0]
            ))
            .arg(format!("--primary-peer-url=http://127.0.0.1:{}", ports[1]))
            .arg(format!(
                "--learner-client-url=http://127.0.0.1:{}",
                ports[2]
            ))
            .arg(format!("--learner-peer-url=http://127.0.0.1:{}", ports[3]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tern-appliance");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Appliance {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Read its output until a line starts with `prefix`; that line.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line starting {prefix:?}; it printed: {:#?}", self.seen);
    }

    /// SIGTERM; it must stop its members and exit cleanly.
    fn terminate(mut self) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(Instant::now() < deadline, "tern-appliance did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Processes whose command line names a data dir under `dir`.
fn member_processes(dir: &std::path::Path) -> usize {
    let wanted = format!("--data-dir={}", dir.display());
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&wanted))
        .count()
}

#[test]
fn the_appliance_runs_a_primary_a_learner_backups_and_drills() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("appliance");
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let primary = format!("127.0.0.1:{}", ports[0]);
    let learner = format!("127.0.0.1:{}", ports[2]);

    let mut first = Appliance::start(&dir, &ports);
    let generated = first.wait_for("generated an age key");
    let key = dir.join("age-identity.txt");
    assert!(
        generated.contains(&key.display().to_string()),
        "{generated}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("\nAGE-SECRET-KEY-"), "age-keygen's format");
    first.wait_for("tern-appliance is up");
    assert_eq!(member_processes(&dir), 2, "a primary and a learner");
    let backup = first.wait_for("first backup: ");
    assert!(backup.contains("at revision"), "{backup}");
    let drill = first.wait_for("drill ");
    assert!(drill.starts_with("drill ok: "), "{drill}");

    let list = etcdctl(&primary, &["member", "list"], None);
    assert_eq!(list.code, 0, "{list:?}");
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    assert!(
        list.stdout.contains(", learner, ") && list.stdout.contains(", true\n"),
        "{}",
        list.stdout
    );
    assert_eq!(etcdctl(&primary, &["put", "hello", "world"], None).code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let get = etcdctl(&learner, &["get", "hello", "--consistency=s"], None);
        if get.stdout == "hello\nworld\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the learner never served it: {get:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The backup is encrypted to the generated key: the standard age tool
    // opens it with the private half.
    let backups: Vec<_> = walk(&dir.join("backups"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "age"))
        .collect();
    assert!(!backups.is_empty(), "no .age object under backups/");
    let opened = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&key)
        .arg(&backups[0])
        .stdout(Stdio::null())
        .status()
        .expect("age");
    assert!(opened.success());
    first.terminate();
    assert_eq!(member_processes(&dir), 0, "members outlived the appliance");

    // A second run: same key, same cluster, the learner not added again.
    let mut second = Appliance::start(&dir, &ports);
    second.wait_for("tern-appliance is up");
    assert!(
        !second.seen.iter().any(|l| l.starts_with("generated")),
        "{:#?}",
        second.seen
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
    let drill = second.wait_for("drill ");
    assert!(drill.starts_with("drill ok: "), "{drill}");
    assert!(
        drill.contains("1 keys"),
        "the drill restores hello: {drill}"
    );
    let list = etcdctl(&primary, &["member", "list"], None);
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    second.terminate();
    assert_eq!(member_processes(&dir), 0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
