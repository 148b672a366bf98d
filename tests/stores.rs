//! One backup and restore suite, run on every object store the README
//! promises: `file://`, S3 (moto), Azure Blob (Azurite) and Google Cloud
//! Storage (fake-gcs-server). Each run: scheduled log segments and
//! on-demand backups from a learner, retention keeping the newest two,
//! `list`, `verify`, a point-in-time `restore` served by a real member, a
//! `drill`, the store failing under a running upload, a tampered backup
//! refused, and no secret in any log or output. On GCS the learner's
//! uploads are not part of it: the emulator takes neither object_store's
//! XML upload nor its XML multipart upload (see `tern_tests::stores`).

use std::time::Duration;

use serde_json::Value;
use tern_tests::backups::{
    age_key, fill, fill_incompressible, post_backup, tern_restore, wait_archived,
};
use tern_tests::cluster::{hashkv, Cluster};
use tern_tests::stores::{Failure, Store};
use tern_tests::{current_revision, etcdctl, Tern};

fn suite(mut store: Store, dir: &tempfile::TempDir) {
    // SAFETY: set before any member starts; every test of this binary
    // sets the same value.
    unsafe { std::env::set_var("TERN_TEST_MEMBER_LOGS", "1") };
    let name = store.name();
    let (key, public) = age_key(dir.path());
    let key_arg = key.display().to_string();
    let mut c = Cluster::start(1, &[]);
    let leader = c.nodes[0].client.clone();
    fill(&leader, "s/a", 20);
    let mut flags = store.learner_args();
    flags.extend(
        [
            "--backup-recipient",
            &public,
            "--backup-segment-interval",
            "300ms",
            "--backup-keep-last",
            "2",
        ]
        .map(String::from),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let l = c.add_member(true, &flags);
    let learner = c.nodes[l].client.clone();
    let restore_args = store.restore_args();
    let with = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(restore_args.iter().cloned());
        args
    };
    // Everything tern-restore printed, for the secret check at the end.
    let printed = std::cell::RefCell::new(String::new());
    let run = |extra: &[&str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tern_restore(&args);
        let mut all = printed.borrow_mut();
        all.push_str(&String::from_utf8_lossy(&out.stdout));
        all.push_str(&String::from_utf8_lossy(&out.stderr));
        out
    };

    // Three backups, writes between them; retention keeps the newest two.
    let mut revisions = Vec::new();
    for round in 0..3 {
        let rev = current_revision(&leader);
        c.converged_hash(&[0, l], rev, Duration::from_secs(20));
        let answer = post_backup(&learner);
        assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
        revisions.push(rev);
        fill(&leader, &format!("s/{round}/"), 5);
    }
    let target = current_revision(&leader);
    c.converged_hash(&[0, l], target, Duration::from_secs(20));
    let written = store.written_args();
    let written: Vec<&str> = written.iter().map(String::as_str).collect();
    wait_archived(&written, target);
    store.publish();

    let list = run(&["list", "--json"]);
    assert!(list.status.success(), "{name}: {list:?}");
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    let kept: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(kept, vec![revisions[2], revisions[1]], "{name}: {listed}");
    let newest_id = listed[0]["id"].as_str().unwrap().to_string();

    let verify = run(&["verify", "--all", "--identity", &key_arg]);
    assert!(verify.status.success(), "{name}: {verify:?}");

    // Point in time: between the second and third backups, through the
    // archived log after the second.
    let middle = revisions[2] - 2;
    let data_dir = dir.path().join("pitr.tern");
    let data_arg = data_dir.display().to_string();
    let restored = run(&[
        "restore",
        "--identity",
        &key_arg,
        "--to-revision",
        &middle.to_string(),
        "--data-dir",
        &data_arg,
    ]);
    assert!(restored.status.success(), "{name}: {restored:?}");
    let member = Tern::start_in(&data_dir, &[]);
    assert_eq!(current_revision(&member.endpoint), middle, "{name}");
    assert_eq!(
        hashkv(&member.endpoint, middle),
        hashkv(&leader, middle),
        "{name}: the restored state is the source's at {middle}"
    );
    drop(member);

    let drill = run(&["drill", "--identity", &key_arg, "--json"]);
    assert!(drill.status.success(), "{name}: {drill:?}");
    let report: Value = serde_json::from_slice(&drill.stdout).unwrap();
    assert_eq!(
        report["revision"].as_i64(),
        Some(target),
        "{name}: {report}"
    );
    assert_eq!(
        report["kv_hash"].as_u64(),
        hashkv(&leader, target),
        "{name}"
    );

    // The store fails under a running upload and comes back. The backup
    // is whole or absent, never listed half-done; the next one succeeds;
    // no object is left that no manifest names.
    let newest_id = if store.takes_uploads() {
        fill_incompressible(&leader, "big/", 48, 60_000);
        let rev = current_revision(&leader);
        c.converged_hash(&[0, l], rev, Duration::from_secs(20));
        store.slow_uploads(true);
        let runner = {
            let learner = learner.clone();
            std::thread::spawn(move || post_backup(&learner))
        };
        let failure = store.fail_mid_upload(&mut c.nodes[l]);
        let first = runner.join().unwrap_or_default();
        store.slow_uploads(false);
        if let Failure::LearnerKilled = failure {
            assert!(
                first.is_empty(),
                "{name}: the killed learner answered {first}"
            );
        }
        let second = post_backup(&learner);
        assert!(
            second.starts_with("HTTP/1.1 200"),
            "{name}: {first}\n{second}"
        );
        let list = run(&["list", "--json"]);
        assert!(list.status.success(), "{name}: {list:?}");
        let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
        let ids: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 2, "{name}: retention keeps two: {listed}");
        let mut named: Vec<String> = ids
            .iter()
            .flat_map(|id| [format!("{id}.db.zst.age"), format!("{id}.manifest.json")])
            .collect();
        named.sort();
        assert_eq!(
            store.backup_objects(),
            named,
            "{name}: every object in backups/ belongs to a listed backup"
        );
        let verify = run(&["verify", "--all", "--identity", &key_arg]);
        assert!(verify.status.success(), "{name}: {verify:?}");
        ids[0].to_string()
    } else {
        newest_id
    };

    // Someone with write access replaces the newest backup's data.
    c.nodes[l].kill9();
    store.overwrite(
        &format!("backups/{newest_id}.db.zst.age"),
        b"not an age file",
    );
    let tampered = run(&["verify", &newest_id, "--identity", &key_arg]);
    assert!(!tampered.status.success(), "{name}: {tampered:?}");
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert!(
        stderr.contains(&newest_id) && stderr.contains("the manifest says"),
        "{name}: {stderr}"
    );
    let refused = run(&[
        "restore",
        &newest_id,
        "--identity",
        &key_arg,
        "--data-dir",
        &dir.path().join("refused.tern").display().to_string(),
    ]);
    assert!(!refused.status.success(), "{name}: {refused:?}");
    assert!(
        !dir.path().join("refused.tern").join("state.db").exists(),
        "{name}: a refused restore leaves no data dir"
    );
    assert_eq!(
        etcdctl(&leader, &["put", "still", "serving"], None).code,
        0,
        "{name}"
    );

    // No secret in the learner's log nor in anything tern-restore printed.
    let log = std::fs::read_to_string(format!("{}.log", c.nodes[l].data_dir.display()))
        .expect("the learner's log");
    assert!(
        log.contains("backup"),
        "{name}: the learner logged its backups: {log}"
    );
    if let Some(secret) = store.secret() {
        assert!(
            !log.contains(secret),
            "{name}: the learner logged its secret key"
        );
        assert!(
            !printed.borrow().contains(secret),
            "{name}: tern-restore printed the secret key"
        );
    }
}

#[test]
fn the_suite_on_file() {
    let dir = tempfile::tempdir().unwrap();
    suite(Store::file(dir.path()), &dir);
}

#[test]
fn the_suite_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    suite(Store::s3(), &dir);
}

#[test]
fn the_suite_on_google_cloud_storage() {
    let dir = tempfile::tempdir().unwrap();
    suite(Store::gcs(dir.path()), &dir);
}

#[test]
fn the_suite_on_azure_blob() {
    let dir = tempfile::tempdir().unwrap();
    suite(Store::azure(dir.path()), &dir);
}
