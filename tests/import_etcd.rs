//! `tern-restore import-etcd`: a real etcd 3.4 is filled with keys (several
//! versions, txns, prefix deletes, a value spanning overflow pages), leases
//! (one revoked) and a compaction, snapshotted with `etcdctl snapshot save`
//! and imported; a tern-primary on the result must answer what etcd did.
//!
//! Tern's HashKV is etcd's: the imported member answers `etcdctl endpoint
//! hashkv` (now and at older revisions) with the hash the etcd it came from
//! gave, `import-etcd` prints it, and a snapshot of the imported member
//! holds the same `key` and `lease` records, byte for byte, as etcd's.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tern_primary::bbolt;
use tern_tests::cluster::hashkv;
use tern_tests::{bulk_write, current_revision, etcdctl, workspace_bin, Etcd, Tern};

fn import(args: &[&str]) -> Output {
    Command::new(workspace_bin("tern-restore"))
        .arg("import-etcd")
        .args(args)
        .output()
        .expect("run tern-restore")
}

/// Run etcdctl and require success; returns stdout.
fn ok(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl(endpoint, args, stdin);
    assert_eq!(out.code, 0, "etcdctl {args:?}: {out:?}");
    out.stdout
}

fn json(endpoint: &str, args: &[&str]) -> Value {
    let out = ok(endpoint, args, None);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// What a range answers, without the member's ids and Raft term.
fn range(endpoint: &str, rev: Option<i64>) -> (Value, Value, Value) {
    let mut args = vec!["get", "", "--prefix", "-w", "json"];
    let at = rev.map(|r| format!("--rev={r}"));
    args.extend(at.as_deref());
    let v = json(endpoint, &args);
    (
        v["header"]["revision"].clone(),
        v["count"].clone(),
        v["kvs"].clone(),
    )
}

/// Lease ids, sorted.
fn lease_ids(endpoint: &str) -> Vec<String> {
    let out = ok(endpoint, &["lease", "list"], None);
    let mut ids: Vec<String> = out.lines().skip(1).map(str::to_string).collect();
    ids.sort();
    ids
}

/// A lease's granted TTL and attached keys (sorted).
fn lease_keys(endpoint: &str, id: &str) -> (Value, Vec<String>) {
    let v = json(
        endpoint,
        &["lease", "timetolive", id, "--keys", "-w", "json"],
    );
    let mut keys: Vec<String> = v["keys"]
        .as_array()
        .map(|k| k.iter().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    keys.sort();
    (v["granted-ttl"].clone(), keys)
}

/// Every record of one bucket of a snapshot file.
fn records(path: &Path, bucket: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = bbolt::Reader::open(path).expect("open snapshot");
    db.bucket(bucket)
        .expect("root bucket")
        .expect("bucket exists")
        .map(|e| e.map(|e| (e.key, e.value)).expect("record"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_snapshot_imports_and_serves_what_etcd_served() {
    let etcd = Etcd::start();
    let e = etcd.endpoint.as_str();
    // Txns of 100 puts: revisions with sub revisions 0..99, and a `key`
    // bucket deep enough for branch pages.
    bulk_write(e, "bulk/", 3000, 2, |n| format!("value-{n}").into_bytes()).await;
    for v in ["1", "2", "3"] {
        ok(e, &["put", "a", v], None);
    }
    let before_compaction = current_revision(e);
    ok(e, &["put", "a", "4"], None);
    ok(e, &["put", "big"], Some(&"x".repeat(200_000)));
    let lease = |ttl: &str| -> String {
        let out = ok(e, &["lease", "grant", ttl], None);
        out.split_whitespace().nth(1).expect("lease id").to_string()
    };
    let (l1, l2, l3) = (lease("600"), lease("900"), lease("300"));
    ok(e, &["put", "--lease", &l1, "l1/a", "x"], None);
    ok(e, &["put", "--lease", &l1, "l1/b", "y"], None);
    ok(e, &["put", "--lease", &l2, "l2/a", "z"], None);
    ok(e, &["put", "--lease", &l3, "l3/a", "gone"], None);
    ok(e, &["lease", "revoke", &l3], None);
    ok(e, &["del", "--prefix", "bulk/0001"], None);
    ok(e, &["txn"], Some("\nput t1 one\nput t2 two\ndel a\n\n\n"));
    let compacted = current_revision(e) - 2;
    ok(e, &["compaction", &compacted.to_string()], None);
    ok(e, &["put", "a", "again"], None);
    ok(e, &["put", "c", "1"], None);
    ok(e, &["del", "c"], None);
    let rev = current_revision(e);

    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("etcd.db");
    ok(e, &["snapshot", "save", &snap.display().to_string()], None);
    let old_revs = [compacted, compacted + 1, rev - 1];
    let etcd_now = range(e, None);
    let etcd_old: Vec<_> = old_revs.iter().map(|r| range(e, Some(*r))).collect();
    let etcd_too_old = etcdctl(
        e,
        &["get", "a", &format!("--rev={before_compaction}")],
        None,
    );
    let hashed_revs = [rev, compacted + 1, rev - 1];
    let etcd_hashes: Vec<_> = hashed_revs
        .iter()
        .map(|r| hashkv(e, *r).expect("etcd's hashkv"))
        .collect();
    let etcd_leases = lease_ids(e);
    let etcd_lease_keys: Vec<_> = [&l1, &l2].iter().map(|l| lease_keys(e, l)).collect();
    assert_eq!(etcd_leases.len(), 2, "l3 was revoked");
    assert_eq!(etcd_lease_keys[0].1.len(), 2, "l1 holds two keys");
    assert_ne!(etcd_old[0], etcd_now, "history differs from now");
    drop(etcd);

    let data_dir = dir.path().join("imported.tern");
    let started = std::time::Instant::now();
    let out = import(&[
        &snap.display().to_string(),
        "--data-dir",
        &data_dir.display().to_string(),
        "--json",
    ]);
    println!("import took {:?}", started.elapsed());
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["revision"], rev);
    assert_eq!(report["compact_revision"], compacted);
    assert_eq!(report["keys"], etcd_now.1);
    assert_eq!(report["leases"], 2);
    assert_eq!(report["sha256_checked"], true);
    assert_eq!(report["warnings"], serde_json::json!([]));
    // The default identity: etcd's default member and cluster ids.
    assert_eq!(report["member_id"], "8e9e05c52164694d");

    let tern = Tern::start_in(&data_dir, &[]);
    let t = tern.endpoint.as_str();
    assert_eq!(range(t, None), etcd_now, "current revision");
    for (r, want) in old_revs.iter().zip(&etcd_old) {
        assert_eq!(&range(t, Some(*r)), want, "at revision {r}");
    }
    let too_old = etcdctl(
        t,
        &["get", "a", &format!("--rev={before_compaction}")],
        None,
    );
    assert_eq!(
        (too_old.code, too_old.error_line()),
        (etcd_too_old.code, etcd_too_old.error_line()),
        "a compacted revision"
    );
    assert_eq!(lease_ids(t), etcd_leases);
    for (l, want) in [&l1, &l2].iter().zip(&etcd_lease_keys) {
        assert_eq!(&lease_keys(t, l), want, "lease {l}");
    }

    // HashKV, now and at older revisions: etcd's own numbers.
    for (r, want) in hashed_revs.iter().zip(&etcd_hashes) {
        assert_eq!(hashkv(t, *r), Some(*want), "hashkv at revision {r}");
    }
    assert_eq!(report["kv_hash"], etcd_hashes[0]);

    // Tern's own snapshot of the imported member holds etcd's records.
    let again = dir.path().join("tern.db");
    ok(t, &["snapshot", "save", &again.display().to_string()], None);
    for bucket in [&b"key"[..], b"lease"] {
        assert!(
            records(&again, bucket) == records(&snap, bucket),
            "bucket {} differs",
            String::from_utf8_lossy(bucket)
        );
    }

    // Writes go on from etcd's revision, as after `etcdctl snapshot restore`.
    ok(t, &["put", "after", "import"], None);
    assert_eq!(current_revision(t), rev + 1);
}

/// Files that are not a whole etcd snapshot are refused with the reason,
/// and nothing is left in the target or beside it.
#[test]
fn a_bad_snapshot_or_a_used_data_dir_is_refused() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.db");
    for n in 0..50 {
        ok(&etcd.endpoint, &["put", &format!("k{n}"), "v"], None);
    }
    ok(
        &etcd.endpoint,
        &["snapshot", "save", &good.display().to_string()],
        None,
    );
    drop(etcd);
    let bytes = std::fs::read(&good).unwrap();
    let mut flipped = bytes.clone();
    flipped[3 * 4096 + 100] ^= 0xff;
    let mut seed = 7u32;
    let garbage: Vec<u8> = (0..20_000)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as u8
        })
        .collect();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("half", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("pages", bytes[..3 * 4096].to_vec(), "truncated"),
        ("empty", Vec::new(), "not a bbolt database"),
        ("garbage", garbage, "not a bbolt database"),
        ("flipped", flipped, "sha256 mismatch"),
    ];
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    for (name, content, reason) in cases {
        let file = dir.path().join(format!("{name}.db"));
        std::fs::write(&file, content).unwrap();
        let target = work.join(format!("{name}.tern"));
        let out = import(&[
            &file.display().to_string(),
            "--data-dir",
            &target.display().to_string(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {out:?}");
        assert!(
            stderr.contains(&format!("{name}.db")) && stderr.contains(reason),
            "{name}: {stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert!(left.is_empty(), "{name}: left behind {left:?}");
    }

    // A used data dir is refused before anything is read or written.
    let used = work.join("used.tern");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("state.db"), "mine").unwrap();
    let out = import(&[
        &good.display().to_string(),
        "--data-dir",
        &used.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
    assert_eq!(std::fs::read(used.join("state.db")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&used).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);

    // Without `etcdctl snapshot save`'s sha256 (a copy of etcd's
    // member/snap/db) the import goes on, and says what it could not check.
    let bare = dir.path().join("bare.db");
    std::fs::write(&bare, &bytes[..bytes.len() - 32]).unwrap();
    let target = work.join("bare.tern");
    let out = import(&[
        &bare.display().to_string(),
        "--data-dir",
        &target.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("50 keys"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: no sha256"),
        "{out:?}"
    );
}
