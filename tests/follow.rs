//! Follow mode against a real 3-member etcd 3.4 cluster with client TLS:
//! `tern-learner --etcd-endpoints` seeds from the source's snapshot, then
//! mirrors every revision. Its keys (all four revision fields, lease ids),
//! its HashKV at the same revision and a watch from an old revision match
//! etcd's, across a leader kill and a cut link; it refuses writes as a
//! learner does.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::backups::{age_key, file_manifests, post_backup, tern_restore, wait_archived};
use tern_tests::etcd_cluster::EtcdCluster;
use tern_tests::pki::{Ca, Leaf, Pki};
use tern_tests::{
    etcdctl, etcdctl_for, free_port, http_post, metric, spawn_member, Etcd, Proxy, Tern,
};

/// etcdctl's `get --from-key "" -w json`: the header's revision and the
/// kvs whole (the ids in the header differ between the two clusters).
fn keys(out: &tern_tests::Output) -> (i64, Value) {
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).expect("get json");
    (
        v["header"]["revision"].as_i64().expect("revision"),
        v.get("kvs").cloned().unwrap_or(Value::Null),
    )
}

/// `endpoint hashkv --rev` as (hash, compact_revision).
fn hashkv(out: &tern_tests::Output) -> (u64, i64) {
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).expect("hashkv json");
    let h = &v[0]["HashKV"];
    (
        h["hash"].as_u64().expect("hash"),
        h["compact_revision"].as_i64().unwrap_or(0),
    )
}

/// The events of `etcdctl watch -w json` output, flattened across its
/// responses (the two servers may batch them differently).
fn watched_events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).expect("watch json");
            v["Events"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

fn wait_for_revision(follower: &str, revision: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let out = etcdctl(
            follower,
            &["get", "--from-key", "", "-w", "json", "--limit", "1"],
            None,
        );
        if out.code == 0 && keys(&out).0 >= revision {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "follower not at revision {revision} within {within:?}: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` puts, each retried (as a client would) while the source elects a
/// new leader.
fn put_many(etcd: &EtcdCluster, prefix: &str, n: usize) {
    for i in 0..n {
        let (key, value) = (format!("{prefix}{i:03}"), format!("v{i}-{prefix}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = etcd.etcdctl(&["put", &key, &value]);
            if out.code == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{out:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The follower holds exactly what the source holds: at the source's
/// revision, the same keys with the same revision fields and lease ids,
/// and the same HashKV. Returns that revision.
fn same(etcd: &EtcdCluster, follower: &str, label: &str) -> i64 {
    let (revision, source_kvs) = keys(&etcd.etcdctl(&["get", "--from-key", "", "-w", "json"]));
    wait_for_revision(follower, revision, Duration::from_secs(30));
    let (at, follower_kvs) = keys(&etcdctl(
        follower,
        &["get", "--from-key", "", "-w", "json"],
        None,
    ));
    assert_eq!(at, revision, "{label}: follower's revision");
    assert_eq!(
        follower_kvs, source_kvs,
        "{label}: keys and their revision fields"
    );
    let rev = revision.to_string();
    let source_hash = hashkv(&etcd.etcdctl(&["endpoint", "hashkv", "--rev", &rev, "-w", "json"]));
    let follower_hash = hashkv(&etcdctl(
        follower,
        &["endpoint", "hashkv", "--rev", &rev, "-w", "json"],
        None,
    ));
    assert_eq!(follower_hash, source_hash, "{label}: HashKV at {rev}");
    revision
}

/// tern-learner's flags to follow the TLS etcd at `endpoints`, with a data
/// dir in `dir`, plus `extra`.
fn follower_args(
    dir: &Path,
    endpoints: &[String],
    ca: &Ca,
    client: &Leaf,
    extra: &[&str],
) -> Vec<String> {
    let (client_port, peer_port) = (free_port(), free_port());
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = [
        "--name",
        "dr",
        "--data-dir",
        &s(&dir.join("follower")),
        "--listen-client-urls",
        &format!("http://127.0.0.1:{client_port}"),
        "--advertise-client-urls",
        &format!("http://127.0.0.1:{client_port}"),
        "--listen-peer-urls",
        &format!("http://127.0.0.1:{peer_port}"),
        "--initial-advertise-peer-urls",
        &format!("http://127.0.0.1:{peer_port}"),
        "--etcd-endpoints",
        &endpoints
            .iter()
            .map(|e| format!("https://{e}"))
            .collect::<Vec<_>>()
            .join(","),
        "--etcd-cacert",
        &s(&ca.cert),
        "--etcd-cert",
        &s(&client.cert),
        "--etcd-key",
        &s(&client.key),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The source etcd's keys at `revision`, as `get --rev` shows them.
fn source_at(etcd: &EtcdCluster, revision: i64) -> Value {
    let rev = revision.to_string();
    keys(&etcd.etcdctl(&["get", "--from-key", "", "--rev", &rev, "-w", "json"])).1
}

#[test]
fn a_follower_behind_the_compaction_point_seeds_again() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "follower", false);
    let etcd = EtcdCluster::start_tls(1, &ca, &server, &client);
    put_many(&etcd, "a/", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let args = follower_args(dir.path(), &etcd.endpoints, &ca, &client, &[]);
    let (mut learner, follower) = spawn_member("tern-learner", &args);
    same(&etcd, &follower, "seeded");

    // Down while the source moves on and compacts past it.
    let _ = learner.kill();
    let _ = learner.wait();
    put_many(&etcd, "b/", 10);
    assert_eq!(etcd.etcdctl(&["del", "a/001"]).code, 0);
    let head = keys(&etcd.etcdctl(&["get", "--from-key", "", "-w", "json"])).0;
    assert_eq!(etcd.etcdctl(&["compact", &head.to_string()]).code, 0);
    put_many(&etcd, "c/", 3);

    let (mut learner, follower) = spawn_member("tern-learner", &args);
    same(&etcd, &follower, "seeded again");
    assert_eq!(metric(&follower, "tern_follow_reseeds_total"), Some(1.0));
    // It goes on following after it.
    put_many(&etcd, "d/", 3);
    same(&etcd, &follower, "following after the second seeding");
    let _ = learner.kill();
    let _ = learner.wait();
}

/// Backups of a follower's state with its archived log restore to any
/// revision of the source: a point-in-time restore between two backups is
/// exactly etcd's state at that revision.
#[test]
fn a_followers_backups_restore_the_sources_revisions() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "follower", false);
    let etcd = EtcdCluster::start_tls(1, &ca, &server, &client);
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let url = format!("file://{}", store.display());
    let args = follower_args(
        dir.path(),
        &etcd.endpoints,
        &ca,
        &client,
        &[
            "--backup-url",
            &url,
            "--backup-recipient",
            &public,
            "--backup-segment-interval",
            "500ms",
        ],
    );
    put_many(&etcd, "a/", 10);
    let (mut learner, follower) = spawn_member("tern-learner", &args);
    same(&etcd, &follower, "seeded");
    let answer = post_backup(&follower);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    put_many(&etcd, "b/", 10);
    assert_eq!(etcd.etcdctl(&["del", "--prefix", "a/00"]).code, 0);
    let middle = same(&etcd, &follower, "between the backups");
    put_many(&etcd, "c/", 10);
    same(&etcd, &follower, "before the second backup");
    let answer = post_backup(&follower);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    put_many(&etcd, "d/", 5);
    let last = same(&etcd, &follower, "after the second backup");
    wait_archived(&["--url", &url], last);

    // The manifests name the etcd cluster the state came from.
    let status = etcd.etcdctl(&["endpoint", "status", "-w", "json"]);
    let status: Value = serde_json::from_str(&status.stdout).expect("status json");
    let source_cluster = status[0]["Status"]["header"]["cluster_id"]
        .as_u64()
        .expect("cluster id");
    for manifest in file_manifests(&store) {
        assert_eq!(
            manifest["source_etcd_cluster_id"],
            format!("{source_cluster:x}")
        );
    }
    let key_arg = key.display().to_string();
    let verify = tern_restore(&["verify", "--all", "--url", &url, "--identity", &key_arg]);
    assert!(verify.status.success(), "{verify:?}");
    for revision in [middle, last] {
        let data_dir = dir.path().join(format!("restored-{revision}"));
        let data_arg = data_dir.display().to_string();
        let rev = revision.to_string();
        let out = tern_restore(&[
            "restore",
            "--url",
            &url,
            "--identity",
            &key_arg,
            "--data-dir",
            &data_arg,
            "--to-revision",
            &rev,
        ]);
        assert!(out.status.success(), "{out:?}");
        let restored = Tern::start_in(&data_dir, &[]);
        let (at, kvs) = keys(&restored.etcdctl(&["get", "--from-key", "", "-w", "json"]));
        assert_eq!(at, revision);
        assert_eq!(kvs, source_at(&etcd, revision), "restored to {revision}");
    }
    let drill = tern_restore(&["drill", "--url", &url, "--identity", &key_arg, "--json"]);
    assert!(drill.status.success(), "{drill:?}");
    let report: Value = serde_json::from_slice(&drill.stdout).expect("drill json");
    assert_eq!(report["revision"].as_i64(), Some(last));
    let _ = learner.kill();
    let _ = learner.wait();
}

/// A follower's etcd snapshot goes back into etcd (`etcdctl snapshot
/// restore`) with the source's keys; and a source restored from an older
/// backup (same cluster id, lower revision) is never applied.
#[test]
fn a_followers_snapshot_restores_into_etcd_and_a_rewound_source_is_refused() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "follower", false);
    let mut etcd = EtcdCluster::start_tls(1, &ca, &server, &client);
    put_many(&etcd, "a/", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let old_backup = dir.path().join("old.db");
    let saved = etcd.etcdctl(&["snapshot", "save", &old_backup.display().to_string()]);
    assert_eq!(saved.code, 0, "{saved:?}");
    put_many(&etcd, "b/", 10);
    let args = follower_args(dir.path(), &etcd.endpoints, &ca, &client, &[]);
    let (mut learner, follower) = spawn_member("tern-learner", &args);
    let revision = same(&etcd, &follower, "seeded");

    // The follower's snapshot, restored and started as a plain etcd.
    let snapshot = dir.path().join("follower.db");
    let saved = etcdctl(
        &follower,
        &["snapshot", "save", &snapshot.display().to_string()],
        None,
    );
    assert_eq!(saved.code, 0, "{saved:?}");
    let restored_dir = dir.path().join("restored.etcd");
    let restored = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore", &snapshot.display().to_string()])
        .args(["--data-dir", &restored_dir.display().to_string()])
        .output()
        .expect("etcdctl snapshot restore");
    assert!(restored.status.success(), "{restored:?}");
    let plain = Etcd::start_in(&restored_dir);
    let (at, kvs) = keys(&etcdctl(
        &plain.endpoint,
        &["get", "--from-key", "", "-w", "json"],
        None,
    ));
    assert_eq!(at, revision);
    assert_eq!(kvs, source_at(&etcd, revision));

    // The source is rewound to the older backup: refused, kept as it was.
    etcd.kill9(0);
    etcd.restore_member(0, &old_backup);
    etcd.start_member(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&follower, "tern_follow_source_diverged") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the rewound source was not flagged"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (at, _) = keys(&etcdctl(
        &follower,
        &["get", "--from-key", "", "-w", "json", "--consistency", "s"],
        None,
    ));
    assert_eq!(at, revision, "nothing of the rewound history is applied");
    let _ = learner.kill();
    let _ = learner.wait();
}

/// A source with auth on: the follower authenticates with `--etcd-user`
/// and a password file, and serves the source's users (seeded with them).
#[test]
fn a_follower_authenticates_to_a_source_with_auth_on() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "follower", false);
    let mut etcd = EtcdCluster::start_tls(1, &ca, &server, &client);
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let out = etcd.etcdctl(args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    etcd.tls.push("--user=root:rootpw".into());
    put_many(&etcd, "a/", 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("password");
    std::fs::write(&password, "rootpw\n").expect("password file");
    let password_arg = password.display().to_string();
    let args = follower_args(
        dir.path(),
        &etcd.endpoints,
        &ca,
        &client,
        &["--etcd-user", "root", "--etcd-password-file", &password_arg],
    );
    let (mut learner, follower) = spawn_member("tern-learner", &args);
    let (revision, source_kvs) = keys(&etcd.etcdctl(&["get", "--from-key", "", "-w", "json"]));
    let as_root = ["--user", "root:rootpw"];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut get = as_root.to_vec();
        get.extend(["get", "--from-key", "", "-w", "json"]);
        let out = etcdctl(&follower, &get, None);
        if out.code == 0 && keys(&out).0 >= revision {
            assert_eq!(keys(&out).1, source_kvs);
            break;
        }
        assert!(Instant::now() < deadline, "follower not in step: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Without a user the follower refuses, as its source does.
    let anonymous = etcdctl(&follower, &["get", "a/000"], None);
    assert_ne!(anonymous.code, 0, "{anonymous:?}");
    let _ = learner.kill();
    let _ = learner.wait();
}

#[test]
fn a_follower_mirrors_a_tls_etcd_cluster_revision_exact() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let server = pki.leaf(&ca, "server", false);
    let client = pki.leaf(&ca, "follower", false);
    let mut etcd = EtcdCluster::start_tls(3, &ca, &server, &client);

    // History before the follower exists: it arrives in the snapshot.
    put_many(&etcd, "a/", 30);
    assert_eq!(etcd.etcdctl(&["del", "a/003"]).code, 0);
    let lease = etcd.etcdctl(&["lease", "grant", "600"]);
    let lease_id = lease
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert_eq!(
        etcd.etcdctl(&["put", "leased/1", "x", "--lease", &lease_id])
            .code,
        0
    );
    assert_eq!(etcd.etcdctl(&["compact", "10"]).code, 0);
    put_many(&etcd, "a/", 5);

    // The follower reaches each etcd member through a proxy of ours, so the
    // link can be cut.
    let proxies: Vec<Proxy> = etcd
        .endpoints
        .iter()
        .map(|e| Proxy::start(e.parse().expect("addr")))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoints: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let args = follower_args(dir.path(), &endpoints, &ca, &client, &[]);
    let (mut learner, follower) = spawn_member("tern-learner", &args);

    // Load while it follows: puts, deletes, a multi-op txn, a lease that
    // expires (its keys go at the source), a compaction.
    put_many(&etcd, "b/", 40);
    assert_eq!(etcd.etcdctl(&["del", "--prefix", "a/01"]).code, 0);
    let txn = etcd.etcdctl_stdin(
        &["txn"],
        Some("value(\"a/000\") = \"v0-a/\"\n\nput t/1 one\nput t/2 two\ndel a/020\n\nput t/else no\n\n"),
    );
    assert_eq!(txn.code, 0, "{txn:?}");
    let short = etcd.etcdctl(&["lease", "grant", "2"]);
    let short_id = short
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert_eq!(
        etcd.etcdctl(&["put", "leased/short", "y", "--lease", &short_id])
            .code,
        0
    );
    let before_compaction = keys(&etcd.etcdctl(&["get", "--from-key", "", "-w", "json"])).0;
    put_many(&etcd, "c/", 10);
    assert_eq!(
        etcd.etcdctl(&["compact", &before_compaction.to_string()])
            .code,
        0
    );
    // Past the short lease's expiry (etcd checks every 500 ms).
    std::thread::sleep(Duration::from_secs(4));

    let revision = same(&etcd, &follower, "after the load");
    let (_, kvs) = keys(&etcdctl(
        &follower,
        &["get", "leased/1", "-w", "json"],
        None,
    ));
    assert_eq!(
        kvs[0]["lease"].as_i64(),
        i64::from_str_radix(&lease_id, 16).ok(),
        "the lease id is kept"
    );
    assert!(
        keys(&etcdctl(
            &follower,
            &["get", "leased/short", "-w", "json"],
            None
        ))
        .1
        .is_null(),
        "the expired lease's key is gone"
    );

    // A watch from an old revision (after the compaction) gives etcd's events.
    let from = (before_compaction + 1).to_string();
    let watch = [
        "watch",
        "--prefix",
        "",
        "--rev",
        &from,
        "--prev-kv",
        "-w",
        "json",
    ];
    let mut source_args: Vec<&str> = etcd.tls.iter().map(String::as_str).collect();
    source_args.extend(watch);
    let source_watch = etcdctl_for(&etcd.endpoints[0], &source_args, Duration::from_secs(2));
    let follower_watch = etcdctl_for(&follower, &watch, Duration::from_secs(2));
    let source_events = watched_events(&source_watch.stdout);
    assert!(!source_events.is_empty(), "{source_watch:?}");
    assert_eq!(watched_events(&follower_watch.stdout), source_events);

    // It serves as a learner: reads yes, writes no.
    let refused = etcdctl(&follower, &["put", "x", "y"], None);
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("etcdserver: rpc not supported for learner"),
        "{refused:?}"
    );

    // A linearizable read on the follower sees a write the source has
    // acknowledged, with no wait in between.
    assert_eq!(etcd.etcdctl(&["put", "fresh", "now"]).code, 0);
    let fresh = etcdctl(&follower, &["get", "fresh", "--print-value-only"], None);
    assert_eq!(fresh.stdout.trim(), "now", "{fresh:?}");

    // The source's leader dies; the follower resumes on another member.
    let leader = etcd.leader();
    etcd.kill9(leader);
    put_many(&etcd, "d/", 20);
    same(&etcd, &follower, "after a leader kill");

    // The link is cut under load, then healed: no gap, nothing twice.
    for p in &proxies {
        p.blackhole(true);
    }
    put_many(&etcd, "e/", 20);
    std::thread::sleep(Duration::from_secs(2));
    for p in &proxies {
        p.blackhole(false);
    }
    let healed = same(&etcd, &follower, "after a cut link");
    assert!(healed > revision);
    let lag = metric(&follower, "tern_follow_lag_revisions");
    assert_eq!(lag, Some(0.0));
    assert_eq!(metric(&follower, "tern_follow_source_diverged"), Some(0.0));

    // A restart resumes from the state on disk (no second seeding).
    let _ = learner.kill();
    let _ = learner.wait();
    put_many(&etcd, "f/", 5);
    let (mut learner, follower) = spawn_member("tern-learner", &args);
    let revision = same(&etcd, &follower, "after a follower restart");

    // Takeover: refused while the source answers, then forced; the
    // follower takes writes right after the source's last revision.
    let (code, body) = http_post(&follower, "/takeover");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("the source is alive"), "{body}");
    let (code, body) = http_post(&follower, "/takeover?force=true");
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("takeover json");
    assert_eq!(answer["revision"], revision);
    let put = etcdctl(
        &follower,
        &["put", "after/takeover", "1", "-w", "json"],
        None,
    );
    assert_eq!(put.code, 0, "{put:?}");
    let header: Value = serde_json::from_str(&put.stdout).expect("put json");
    assert_eq!(header["header"]["revision"], revision + 1);
    let _ = learner.kill();
    let _ = learner.wait();
}
