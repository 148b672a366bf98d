//! Start-up behaviour: configuration errors name the key and value, data
//! survives a restart, one data dir serves one process.

use std::process::Command;

use tern_tests::{etcdctl, workspace_bin, Tern};

fn refused(args: &[&str]) -> String {
    refused_by("tern-primary", args)
}

fn refused_by(bin: &str, args: &[&str]) -> String {
    let out = Command::new(workspace_bin(bin))
        .args(args)
        .output()
        .expect("run a tern binary");
    assert_ne!(out.status.code(), Some(0), "{args:?} should be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_values_stop_startup_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("d").display().to_string();
    let e = refused(&["--data-dir", &d, "--quota-backend-bytes", "lots"]);
    assert!(
        e.contains("--quota-backend-bytes") && e.contains("lots"),
        "{e}"
    );
    let e = refused(&["--data-dir", &d, "--listen-client-urls", "unix:///x"]);
    assert!(
        e.contains("--listen-client-urls") && e.contains("unix:///x"),
        "{e}"
    );
    let e = refused(&["--data-dir", &d, "--auto-compaction-retention", "often"]);
    assert!(
        e.contains("--auto-compaction-retention") && e.contains("often"),
        "{e}"
    );
    let e = refused(&["--data-dir", &d, "--initial-cluster-state", "maybe"]);
    assert!(
        e.contains("--initial-cluster-state") && e.contains("maybe"),
        "{e}"
    );
    let e = refused(&[
        "--data-dir",
        &d,
        "--initial-cluster",
        "a=http://127.0.0.1:2381,b=http://127.0.0.1:2382",
    ]);
    assert!(e.contains("couldn't find local name \"default\""), "{e}");
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, "name = \"x\"\nsnapshot-cuont = 5\n").expect("write config");
    let e = refused(&["--config-file", &config.display().to_string()]);
    assert!(e.contains("snapshot-cuont"), "{e}");
}

#[test]
fn bad_backup_values_stop_the_learner_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("l").display().to_string();
    let recipient = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
    let base = ["--data-dir", &d, "--backup-url", "s3://bucket/prefix"];
    for (flag, value) in [
        ("--backup-s3-endpoint", "127.0.0.1:9000"),
        ("--backup-zstd-level", "99"),
        ("--backup-schedule", "every-day"),
        ("--backup-keep-last", "0"),
        ("--backup-segment-interval", "soon"),
    ] {
        let mut args = base.to_vec();
        args.extend(["--backup-recipient", recipient, flag, value]);
        let e = refused_by("tern-learner", &args);
        assert!(e.contains(flag) && e.contains(value), "{flag} {value}: {e}");
    }
    let mut args = base.to_vec();
    args.extend(["--backup-recipient", "age1notakey"]);
    let e = refused_by("tern-learner", &args);
    assert!(
        e.contains("--backup-recipient") && e.contains("age1notakey"),
        "{e}"
    );
    // Backups are encrypted: a store without a recipient is refused.
    let e = refused_by("tern-learner", &base);
    assert!(e.contains("--backup-recipient"), "{e}");
    let e = refused_by(
        "tern-learner",
        &[
            "--data-dir",
            &d,
            "--backup-url",
            "ftp://host/x",
            "--backup-recipient",
            recipient,
        ],
    );
    assert!(
        e.contains("--backup-url") && e.contains("ftp://host/x"),
        "{e}"
    );
}

#[test]
fn config_file_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tern.toml");
    let data = dir.path().join("data.tern");
    std::fs::write(
        &config,
        format!(
            "name = \"filed\"\ndata-dir = \"{}\"\nmax-txn-ops = 2\n",
            data.display()
        ),
    )
    .expect("write config");
    let t = Tern::start_in(&data, &["--config-file", &config.display().to_string()]);
    let out = etcdctl(&t.endpoint, &["member", "list"], None);
    assert!(out.stdout.contains(", filed, "), "{}", out.stdout);
    let txn = etcdctl(
        &t.endpoint,
        &["txn"],
        Some("\n\nput a 1\nput b 2\nput c 3\n\n\n"),
    );
    assert!(
        txn.stderr.contains("too many operations in txn request"),
        "{}",
        txn.stderr
    );
}

#[test]
fn data_survives_restart_and_dir_is_locked() {
    let mut t = Tern::start(&[]);
    for i in 0..20 {
        etcdctl(
            &t.endpoint,
            &["put", &format!("k{i}"), &format!("v{i}")],
            None,
        );
    }
    etcdctl(&t.endpoint, &["del", "k3"], None);
    let before = etcdctl(&t.endpoint, &["get", "--prefix", "k", "-w", "json"], None).stdout;
    // A second process on the same data dir is refused.
    let e = refused(&[
        "--data-dir",
        &t.data_dir.display().to_string(),
        "--listen-client-urls",
        "http://127.0.0.1:0",
    ]);
    assert!(e.contains("in use by another process"), "{e}");
    t.restart();
    let after = etcdctl(&t.endpoint, &["get", "--prefix", "k", "-w", "json"], None).stdout;
    // Only the term may move: a restarted member campaigns again, as etcd's does.
    let strip = |s: &str| s.split("\"kvs\"").nth(1).unwrap_or("").to_string();
    assert_eq!(strip(&before), strip(&after));
    let rev = etcdctl(&t.endpoint, &["put", "k100", "x", "-w", "json"], None).stdout;
    assert!(
        rev.contains("\"revision\":23"),
        "revisions continue after restart: {rev}"
    );
}

/// With a tiny `--snapshot-count` the Raft log is compacted many times; a
/// restart (and a kill -9) must still find every write, and new writes
/// continue at the right revision.
#[tokio::test(flavor = "multi_thread")]
async fn log_compaction_then_restart_keeps_everything() {
    use tern_primary::proto::etcdserverpb::{PutRequest, RangeRequest};
    let mut t = Tern::start(&["--snapshot-count", "50"]);
    let mut kv = t.kv().await;
    for i in 0..600 {
        kv.put(PutRequest {
            key: format!("lc/{i:04}").into_bytes(),
            value: format!("{i}").into_bytes(),
            ..Default::default()
        })
        .await
        .expect("put");
    }
    t.kill9();
    t.restart();
    let mut kv = t.kv().await;
    let resp = kv
        .range(RangeRequest {
            key: b"lc/".to_vec(),
            range_end: b"lc0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    assert_eq!(resp.count, 600);
    assert!(resp
        .kvs
        .iter()
        .enumerate()
        .all(|(i, kv)| kv.value == i.to_string().into_bytes()));
    let header = kv
        .put(PutRequest {
            key: b"after".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put after restart")
        .into_inner()
        .header
        .expect("header");
    assert_eq!(header.revision, 602);
}
