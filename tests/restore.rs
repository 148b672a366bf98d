//! `tern-restore` end to end: a cluster with a learner backing up (to
//! `file://` and to a real S3-protocol server), restored to the newest
//! backup, to a revision between two backups, to a time and past the newest
//! backup through the archived log; each restored dir served by a real
//! tern-primary and compared key by key (and by HashKV) with what the
//! source cluster answered at that revision. Then tampering: every kind is
//! refused with its own message and nothing is written to the target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tern_tests::backups::{
    add_file_learner, add_s3_learner, age_key, file_manifests, post_backup, tern_restore,
    wait_archived, S3,
};
use tern_tests::cluster::{hashkv, Cluster};
use tern_tests::{current_revision, etcdctl, Tern};

fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args, None);
    assert_eq!(out.code, 0, "etcdctl {args:?}: {out:?}");
    out.stdout
}

/// Every key at `rev` as etcd reports them (create/mod revision, version,
/// lease, value), without the header, which names the cluster.
fn kvs_at(endpoint: &str, rev: i64) -> Value {
    let out = ok(
        endpoint,
        &[
            "get",
            "",
            "--prefix",
            "-w",
            "json",
            "--rev",
            &rev.to_string(),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["kvs"].clone()
}

/// The state the source cluster had at one revision.
struct Seen {
    revision: i64,
    kvs: Value,
    hash: u64,
}

fn seen(endpoint: &str, revision: i64) -> Seen {
    Seen {
        revision,
        kvs: kvs_at(endpoint, revision),
        hash: hashkv(endpoint, revision).expect("hashkv"),
    }
}

/// Start a tern-primary on `dir` and check it serves exactly `want`.
fn serves(dir: &Path, want: &Seen) {
    let member = Tern::start_in(dir, &[]);
    assert_eq!(current_revision(&member.endpoint), want.revision);
    assert_eq!(kvs_at(&member.endpoint, want.revision), want.kvs);
    assert_eq!(hashkv(&member.endpoint, want.revision), Some(want.hash));
    // A restored member is a working cluster.
    ok(&member.endpoint, &["put", "after-restore", "yes"]);
}

fn backup_now(learner: &str) {
    let answer = post_backup(learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Writes, deletes, a lease, a compaction and two full backups; restores
/// of every kind, each compared with the source.
fn restore_every_way(store: &[&str], key: &Path, dir: &Path, c: &Cluster, l: usize) {
    let leader = c.nodes[0].client.clone();
    let learner = c.nodes[l].client.clone();
    let restore_to = |name: &str, target: &[&str]| -> PathBuf {
        let data_dir = dir.join(name);
        let data_arg = data_dir.display().to_string();
        let key_arg = key.display().to_string();
        let mut args = vec!["restore", "--identity", &key_arg, "--data-dir", &data_arg];
        args.extend_from_slice(store);
        args.extend_from_slice(target);
        let out = tern_restore(&args);
        assert!(out.status.success(), "restore {target:?}: {out:?}");
        data_dir
    };

    for i in 0..20 {
        ok(&leader, &["put", &format!("k{i:02}"), &format!("a{i}")]);
    }
    let lease = ok(&leader, &["lease", "grant", "600"]);
    let lease = lease.split_whitespace().nth(1).unwrap().to_string();
    ok(&leader, &["put", "leased", "x", "--lease", &lease]);
    let rev = current_revision(&leader);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    backup_now(&learner);

    // Between the backups: updates, deletes, a compaction.
    for i in 0..10 {
        ok(&leader, &["put", &format!("k{i:02}"), &format!("b{i}")]);
    }
    ok(&leader, &["del", "k15", "k18"]);
    let compact_at = current_revision(&leader) - 3;
    ok(&leader, &["compaction", &compact_at.to_string()]);
    let middle = seen(&leader, current_revision(&leader));
    std::thread::sleep(Duration::from_millis(300));
    let middle_time = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        ok(&leader, &["put", &format!("m{i}"), "c"]);
    }
    let rev = current_revision(&leader);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    backup_now(&learner);
    let newest = seen(&leader, rev);

    // After the newest backup: only the archived log has these.
    ok(&leader, &["del", "k0", "--prefix"]);
    ok(&leader, &["lease", "revoke", &lease]);
    ok(&leader, &["put", "z", "last"]);
    let last = seen(&leader, current_revision(&leader));
    wait_archived(store, last.revision);

    serves(&restore_to("latest.tern", &["latest"]), &newest);
    let between = middle.revision.to_string();
    serves(
        &restore_to("revision.tern", &["--to-revision", &between]),
        &middle,
    );
    serves(
        &restore_to("time.tern", &["--to-time", &middle_time.to_rfc3339()]),
        &middle,
    );
    let end = last.revision.to_string();
    serves(&restore_to("end.tern", &["--to-revision", &end]), &last);

    // Beyond the log: refused, nothing written.
    let data_dir = dir.join("beyond.tern");
    let (key_arg, data_arg) = (key.display().to_string(), data_dir.display().to_string());
    let beyond = (last.revision + 100).to_string();
    let mut args = vec![
        "restore",
        "--identity",
        &key_arg,
        "--data-dir",
        &data_arg,
        "--to-revision",
        &beyond,
    ];
    args.extend_from_slice(store);
    let out = tern_restore(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("beyond the archived log"),
        "{out:?}"
    );
    assert!(!data_dir.exists(), "nothing written for a refused restore");
}

#[test]
fn restores_to_latest_a_revision_and_a_time_from_a_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let url = format!("file://{}", dir.path().join("store").display());
    let mut c = Cluster::start(1, &[]);
    let l = add_file_learner(
        &mut c,
        &url,
        &public,
        &["--backup-segment-interval", "500ms"],
    );
    restore_every_way(&["--url", &url], &key, dir.path(), &c, l);
}

#[test]
fn restores_to_latest_a_revision_and_a_time_from_s3() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let s3 = S3::start();
    s3.create_bucket("tern");
    let mut c = Cluster::start(1, &[]);
    let endpoint = format!("http://{}", s3.endpoint);
    let l = add_s3_learner(
        &mut c,
        &endpoint,
        &public,
        &["--backup-segment-interval", "500ms"],
    );
    // tern-restore reads credentials from the environment, as the learner
    // does (add_s3_learner set them for this process).
    restore_every_way(
        &[
            "--url",
            "s3://tern/dr",
            "--s3-endpoint",
            &endpoint,
            "--s3-path-style",
            "--s3-allow-http",
        ],
        &key,
        dir.path(),
        &c,
        l,
    );
}

/// Run `tern-restore restore` expecting a refusal that mentions `reason`,
/// and check the target was never created.
fn refused(dir: &Path, args: &[&str], reason: &str) {
    let data_dir = dir.join("refused.tern");
    let data_arg = data_dir.display().to_string();
    let mut all = vec!["restore", "--data-dir", &data_arg];
    all.extend_from_slice(args);
    let out = tern_restore(&all);
    assert!(!out.status.success(), "{all:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(reason),
        "{all:?}: want {reason:?}, got {stderr}"
    );
    assert!(!data_dir.exists(), "{all:?} wrote into the target dir");
}

/// Flip one byte of a file in the middle.
fn flip(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn segments(store: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(store.join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    all.sort();
    all
}

#[test]
fn tampered_backups_and_logs_are_refused_each_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let url = format!("file://{}", store.display());
    let mut c = Cluster::start(1, &[]);
    let l = add_file_learner(
        &mut c,
        &url,
        &public,
        &["--backup-segment-interval", "300ms"],
    );
    let (leader, learner) = (c.nodes[0].client.clone(), c.nodes[l].client.clone());
    ok(&leader, &["put", "a", "1"]);
    c.converged_hash(&[0, l], current_revision(&leader), Duration::from_secs(20));
    backup_now(&learner);
    // Several segments after the first backup, one write per interval.
    for i in 0..4 {
        ok(&leader, &["put", "b", &i.to_string()]);
        std::thread::sleep(Duration::from_millis(700));
    }
    let target = current_revision(&leader);
    c.converged_hash(&[0, l], target, Duration::from_secs(20));
    backup_now(&learner);
    wait_archived(&["--url", &url], target);
    c.nodes[l].kill9();
    let key_arg = key.display().to_string();
    let base = ["--url", url.as_str(), "--identity", key_arg.as_str()];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>, reason: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(dir.path(), &args, reason);
    };
    let manifests = file_manifests(&store);
    assert_eq!(manifests.len(), 2);
    let (older, newer) = (&manifests[0], &manifests[1]);
    let backups = store.join("backups");
    let object = |m: &Value| backups.join(m["object"]["name"].as_str().unwrap());
    let manifest_file =
        |m: &Value| backups.join(format!("{}.manifest.json", m["id"].as_str().unwrap()));
    let restore_older = with(&["--to-revision", &target.to_string()]);

    // A wrong identity.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (other_key, _) = age_key(&other);
    run(
        vec![
            "--url".into(),
            url.clone(),
            "--identity".into(),
            other_key.display().to_string(),
        ],
        "cannot decrypt",
    );

    // `verify --all` on a store without backups (a mistyped URL) fails.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let empty_url = format!("file://{}", empty.display());
    let out = tern_restore(&[
        "verify",
        "--all",
        "--url",
        &empty_url,
        "--identity",
        &key_arg,
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no backup in"),
        "{out:?}"
    );

    // A segment bit-flipped, then removed: the chain after the older
    // backup is broken, and both `restore --to-revision` and `verify` say
    // where.
    let segs = segments(&store);
    assert!(segs.len() >= 3, "{segs:?}");
    let victim = segs[segs.len() - 2].clone();
    let saved = std::fs::read(&victim).unwrap();
    flip(&victim);
    let older_id = older["id"].as_str().unwrap().to_string();
    let verify_older = |reason: &str| {
        let out = tern_restore(&["verify", "--url", &url, "--identity", &key_arg, &older_id]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason), "want {reason:?}: {stderr}");
    };
    // The newest backup needs no log: the point-in-time restore to the
    // newest revision starts from it. Restoring past the older backup
    // through the flipped segment is refused.
    std::fs::remove_file(manifest_file(newer)).unwrap();
    let newer_manifest = serde_json::to_vec_pretty(newer).unwrap();
    run(restore_older.clone(), "tampered or damaged");
    verify_older("tampered or damaged");
    std::fs::remove_file(&victim).unwrap();
    run(restore_older.clone(), "missing segment");
    verify_older("missing segment");
    // A time after every write is just as unreachable past the gap (the
    // replay must not stop there and call it done).
    let now = chrono::Utc::now().to_rfc3339();
    run(with(&["--to-time", &now]), "missing segment");
    std::fs::write(&victim, saved).unwrap();
    std::fs::write(manifest_file(newer), newer_manifest).unwrap();

    // The newest object truncated, then bit-flipped.
    let newest_object = object(newer);
    let saved = std::fs::read(&newest_object).unwrap();
    std::fs::write(&newest_object, &saved[..saved.len() - 100]).unwrap();
    run(with(&[]), "bytes, the manifest says");
    std::fs::write(&newest_object, {
        let mut b = saved.clone();
        let i = b.len() / 3;
        b[i] ^= 1;
        b
    })
    .unwrap();
    run(with(&[]), "sha256");

    // A drill on this store fails, with the reason in its report.
    let metrics = dir.path().join("drill.prom");
    let metrics_arg = metrics.display().to_string();
    let drill = || {
        tern_restore(&[
            "drill",
            "--url",
            &url,
            "--identity",
            &key_arg,
            "--json",
            "--metrics-file",
            &metrics_arg,
        ])
    };
    let out = drill();
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(
        report["error"].as_str().unwrap().contains("sha256"),
        "{report}"
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(text.contains("\ntern_drill_success 0\n"), "{text}");
    std::fs::write(&newest_object, &saved).unwrap();

    // Manifests swapped between the two backups.
    let (a, b) = (manifest_file(older), manifest_file(newer));
    let (text_a, text_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::write(&a, &text_b).unwrap();
    std::fs::write(&b, &text_a).unwrap();
    run(with(&[]), "swapped");
    std::fs::write(&a, &text_a).unwrap();
    std::fs::write(&b, &text_b).unwrap();

    // Everything put back: verify --all passes, the drill passes and says
    // so in its metrics.
    let out = tern_restore(&["verify", "--url", &url, "--identity", &key_arg, "--all"]);
    assert!(out.status.success(), "{out:?}");
    let out = drill();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["revision"].as_i64(), Some(target));
    assert!(report["sampled_reads"].as_u64().unwrap() >= 2);
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(text.contains("\ntern_drill_success 1\n"), "{text}");
    assert!(text.contains("tern_drill_rto_seconds "), "{text}");
}
