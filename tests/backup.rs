//! Backups from a real tern-learner: to `file://` and to a real
//! S3-protocol server (moto), opened with the `age`, `zstd` and `sqlite3`
//! command-line tools, checked against the leader's HashKV, and under
//! faults (the store's connection reset mid-upload, the learner killed
//! mid-upload).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_learner::backup::archive::SegmentName;
use tern_tests::backups::{
    add_file_learner, add_s3_learner, age_key, file_manifests, fill, fill_incompressible,
    post_backup, s3_backups, tern_restore, S3,
};
use tern_tests::cluster::{hashkv, Cluster};
use tern_tests::{current_revision, etcdctl, http_get, metric, Proxy, SmallFilesystem};

/// `age -d -i key < file | zstd -d > out`, then a query with sqlite3.
fn open_backup(data: &[u8], key: &Path, dir: &Path, query: &str) -> String {
    let encrypted = dir.join("backup.age");
    std::fs::write(&encrypted, data).expect("write backup");
    let db = dir.join("backup.db");
    let _ = std::fs::remove_file(&db);
    let script = format!(
        "age -d -i '{}' '{}' | zstd -d -q -o '{}'",
        key.display(),
        encrypted.display(),
        db.display()
    );
    let status = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .status()
        .expect("sh");
    assert!(status.success(), "{script}");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(query)
        .output()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn scheduled_backups_open_with_age_zstd_and_sqlite_and_match_hashkv() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let mut c = Cluster::start(1, &[]);
    fill(&c.nodes[0].client, "k", 30);
    let url = format!("file://{}", store.display());
    let l = add_file_learner(
        &mut c,
        &url,
        &public,
        &[
            "--backup-schedule",
            "*/3 * * * * *",
            "--backup-keep-last",
            "2",
        ],
    );
    let learner = c.nodes[l].client.clone();
    // Two scheduled runs, at seconds divisible by 3.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 && Instant::now() < deadline {
        for m in file_manifests(&store) {
            seen.insert(m["id"].as_str().unwrap().to_string());
            // Started by the cron tick at a multiple of 3 s (allowing for
            // a busy machine to take up to two seconds to get going).
            let past_tick = seconds_in_minute(m["started_at"].as_str().unwrap()) % 3.0;
            assert!(past_tick < 2.0, "scheduled at a multiple of 3 s: {m}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(seen.len() >= 3, "three scheduled backups: {seen:?}");
    // keep-last 2: older ones were deleted (manifest and data).
    let manifests = file_manifests(&store);
    assert!(
        manifests.len() <= 3,
        "retention keeps 2 (+1 in flight): {}",
        manifests.len()
    );
    let files = std::fs::read_dir(store.join("backups")).unwrap().count();
    assert_eq!(
        files,
        manifests.len() * 2,
        "a data object per manifest, nothing else"
    );

    let m = manifests.last().unwrap().clone();
    let revision = m["revision"].as_i64().unwrap();
    let data = std::fs::read(
        store
            .join("backups")
            .join(m["object"]["name"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(data.len() as u64, m["object"]["size"].as_u64().unwrap());
    assert_eq!(sha256_hex(&data), m["object"]["sha256"].as_str().unwrap());
    let count = open_backup(&data, &key, dir.path(), "SELECT COUNT(*) FROM kv_live");
    assert_eq!(count, "30");
    assert_eq!(m["key_count"].as_u64(), Some(30));
    let value = open_backup(
        &data,
        &key,
        dir.path(),
        "SELECT CAST(value AS TEXT) FROM kv_live WHERE key = CAST('k0007' AS BLOB)",
    );
    assert_eq!(value, "v7");
    assert_eq!(
        hashkv(&c.nodes[0].client, revision),
        m["kv_hash"].as_u64(),
        "the manifest's hash is the leader's HashKV at its revision"
    );
    assert_eq!(m["format_version"].as_u64(), Some(2));
    assert_eq!(m["compression"]["algorithm"], "zstd");
    assert_eq!(m["encryption"]["recipients"][0], public.as_str());

    // Backup now, on demand: answers with the manifest.
    fill(&c.nodes[0].client, "more", 5);
    // The learner applies the puts a moment after the voter acknowledges
    // them: back up once it has them.
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"key_count\": 35"), "{answer}");
    assert!(metric(&learner, "tern_backup_succeeded_total").unwrap_or(0.0) >= 4.0);
    assert!(metric(&learner, "tern_backup_last_success_timestamp_seconds").unwrap_or(0.0) > 0.0);
    c.nodes[l].kill9();

    // tern-restore lists them newest first and proves the newest restores.
    let restore = tern_restore;
    let listed = restore(&["list", "--url", &url, "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let newest = file_manifests(&store).last().unwrap()["id"].clone();
    assert_eq!(listed[0]["id"], newest);
    assert_eq!(listed[0]["state"], "ok");
    let key_arg = key.display().to_string();
    let verified = restore(&["verify", "--url", &url, "--identity", &key_arg, "--json"]);
    assert!(verified.status.success(), "{verified:?}");
    let verified: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(verified["backups"][0]["key_count"], 35);
    // The wrong key, and a tampered object, are refused with the reason.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (other_key, _) = age_key(&other);
    let wrong = restore(&[
        "verify",
        "--url",
        &url,
        "--identity",
        other_key.to_str().unwrap(),
    ]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("cannot decrypt"),
        "{wrong:?}"
    );
    let newest_manifest = file_manifests(&store).last().unwrap().clone();
    let object = store
        .join("backups")
        .join(newest_manifest["object"]["name"].as_str().unwrap());
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&object, bytes).unwrap();
    let tampered = restore(&["verify", "--url", &url, "--identity", &key_arg]);
    assert!(!tampered.status.success());
    assert!(
        String::from_utf8_lossy(&tampered.stderr).contains("sha256"),
        "{tampered:?}"
    );
}

/// Seconds (with the fraction) past the minute in an RFC 3339 time such
/// as `2026-11-25T18:26:44.685518121Z`.
fn seconds_in_minute(stamp: &str) -> f64 {
    stamp
        .split('T')
        .nth(1)
        .and_then(|t| t.split(':').nth(2))
        .and_then(|s| s.trim_end_matches('Z').parse().ok())
        .expect("an RFC 3339 time")
}

/// An object store answering 500s: object_store retries with backoff,
/// the backup comes through whole, and nothing partial is ever listed.
#[test]
fn backups_retry_through_an_object_store_answering_500s() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let s3 = S3::start();
    s3.create_bucket("tern");
    let failing = tern_tests::http_faults::FailingHttp::start(s3.endpoint.parse().unwrap());
    let mut c = Cluster::start(1, &[]);
    fill(&c.nodes[0].client, "k", 20);
    let l = add_s3_learner(
        &mut c,
        &failing.url(),
        &public,
        &["--backup-segment-interval", "1h"],
    );
    let learner = c.nodes[l].client.clone();
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    failing.fail_next(3);
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(failing.failed(), 3, "the store did fail");
    let (manifests, data) = s3_backups(&s3);
    assert_eq!((manifests.len(), data.len()), (1, 1));
    let object = s3.object("tern", &data[0]);
    assert_eq!(
        open_backup(&object, &key, dir.path(), "SELECT COUNT(*) FROM kv_live"),
        "20"
    );
}

#[test]
fn backups_to_s3_survive_a_reset_store_and_a_killed_learner() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let s3 = S3::start();
    s3.create_bucket("tern");
    // The learner reaches the store through our fault proxy.
    let proxy = Proxy::start(s3.endpoint.parse().unwrap());
    let mut c = Cluster::start(1, &[]);
    // Incompressible values, so an upload takes a while through the proxy.
    let leader = c.nodes[0].client.clone();
    fill_incompressible(&leader, "big", 40, 60_000);
    let l = add_s3_learner(&mut c, &proxy.url(), &public, &[]);
    let learner = c.nodes[l].client.clone();
    let rev = current_revision(&leader);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));

    // A clean backup first.
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (manifests, data) = s3_backups(&s3);
    assert_eq!((manifests.len(), data.len()), (1, 1));
    let m: Value = serde_json::from_slice(&s3.object("tern", &manifests[0])).unwrap();
    let object = s3.object("tern", &data[0]);
    assert_eq!(sha256_hex(&object), m["object"]["sha256"].as_str().unwrap());
    assert_eq!(
        open_backup(&object, &key, dir.path(), "SELECT COUNT(*) FROM kv_live"),
        "40"
    );

    // The learner killed mid-upload: no backup appears for that run.
    proxy.set_bandwidth(tern_tests::proxy::Direction::Upstream, Some(256 * 1024));
    let runner = {
        let learner = learner.clone();
        std::thread::spawn(move || post_backup(&learner))
    };
    std::thread::sleep(Duration::from_millis(1500));
    c.nodes[l].kill9();
    let _ = runner.join();
    let (manifests, _) = s3_backups(&s3);
    assert_eq!(manifests.len(), 1, "the interrupted backup never appears");

    // The store's connections reset mid-upload: object_store retries;
    // whatever happens, a backup is either whole (with a manifest) or
    // absent, and the next one succeeds.
    c.nodes[l].restart();
    proxy.set_bandwidth(tern_tests::proxy::Direction::Upstream, Some(1024 * 1024));
    let runner = {
        let learner = learner.clone();
        std::thread::spawn(move || post_backup(&learner))
    };
    std::thread::sleep(Duration::from_millis(1000));
    proxy.reset();
    let first = runner.join().unwrap();
    proxy.set_bandwidth(tern_tests::proxy::Direction::Upstream, None);
    let second = post_backup(&learner);
    assert!(second.starts_with("HTTP/1.1 200"), "{first}\n{second}");
    let (manifests, data) = s3_backups(&s3);
    let expected = if first.starts_with("HTTP/1.1 200") {
        3
    } else {
        2
    };
    assert_eq!(manifests.len(), expected, "{first}");
    // Leftovers of failed runs were removed before the next one.
    assert_eq!(data.len(), manifests.len(), "{data:?}");
    for key_name in &manifests {
        let m: Value = serde_json::from_slice(&s3.object("tern", key_name)).unwrap();
        let stored = s3.object(
            "tern",
            &format!("dr/backups/{}", m["object"]["name"].as_str().unwrap()),
        );
        assert_eq!(sha256_hex(&stored), m["object"]["sha256"].as_str().unwrap());
    }
}

#[test]
fn log_segments_ship_every_interval_and_chain_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let mut c = Cluster::start(1, &["--snapshot-count", "50"]);
    let url = format!("file://{}", store.display());
    let l = add_file_learner(&mut c, &url, &public, &["--backup-segment-interval", "1s"]);
    let learner = c.nodes[l].client.clone();
    for round in 0..3 {
        fill(&c.nodes[0].client, &format!("seg{round}-"), 40);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let applied = || metric(&learner, "tern_raft_applied_index").unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&learner, "tern_backup_segment_last_index").unwrap_or(-1.0) < applied() {
        assert!(Instant::now() < deadline, "segments did not catch up");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(&learner, "tern_backup_segment_gaps_total"),
        Some(0.0)
    );
    let mut ranges: Vec<(u64, u64, String)> = std::fs::read_dir(store.join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .map(|n| {
            let name = SegmentName::parse(&n).expect("segment name");
            (name.first, name.last, n.clone())
        })
        .collect();
    ranges.sort();
    assert!(
        ranges.len() >= 3,
        "one segment per busy interval: {ranges:?}"
    );
    for pair in ranges.windows(2) {
        assert_eq!(pair[1].0, pair[0].1 + 1, "chain without gaps: {ranges:?}");
    }
    // The chain starts where the learner was when the archiver started
    // (within the first puts) and covers the 120 puts since, although
    // snapshot-count 50 would have compacted the learner's log meanwhile:
    // it keeps entries until they are shipped.
    let covered: u64 = ranges.iter().map(|(a, b, _)| b - a + 1).sum();
    assert!(covered >= 110, "{ranges:?}");
    // Each segment opens with age and zstd.
    let last = &ranges.last().unwrap().2;
    let encrypted = store.join("segments").join(last);
    let plain = dir.path().join("segment");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "age -d -i '{}' '{}' | zstd -d -q -o '{}'",
            key.display(),
            encrypted.display(),
            plain.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&plain).unwrap();
    assert_eq!(&bytes[..8], b"TERNSEG1");
    let first_index = u64::from_be_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(first_index, ranges.last().unwrap().0);
}

/// Peak resident memory of a process since the last reset, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Backing up a state several times larger than the pipeline's bound
/// leaves the learner's peak memory within the bound: the state is
/// streamed, never held.
#[tokio::test(flavor = "multi_thread")]
async fn backup_memory_stays_bounded_for_a_large_state() {
    // The pipeline holds at most 5 parts of 8 MiB; SQLite and the
    // allocator take the rest.
    const BOUND: u64 = 64 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let mut c = Cluster::start(1, &["--quota-backend-bytes", "8589934592"]);
    // 52k incompressible 4 KiB values, ~210 MB (state.db holds each value
    // once), in txns of 100.
    let leader = c.nodes[0].client.clone();
    let random_4kib = |n: usize| (4 * n..4 * n + 4).flat_map(random_kib).collect();
    tern_tests::bulk_write(&leader, "mem/", 52_000, 4, random_4kib).await;
    let url = format!("file://{}", store.display());
    let l = add_file_learner(&mut c, &url, &public, &[]);
    let learner = c.nodes[l].client.clone();
    let rev = current_revision(&leader);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = etcdctl(
            &learner,
            &["get", "x", "-w", "json", "--consistency=s"],
            None,
        );
        let seen = serde_json::from_str::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["header"]["revision"].as_i64())
            .unwrap_or(0);
        if seen >= rev {
            break;
        }
        assert!(Instant::now() < deadline, "learner did not catch up");
        std::thread::sleep(Duration::from_millis(500));
    }
    let pid = c.nodes[l].pid().unwrap();
    let rss_before = {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    // Reset the peak (VmHWM) to now, so it measures the backup alone.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let raw: u64 = answer
        .split("\"raw_size\": ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        raw > 3 * BOUND,
        "the state ({raw} bytes) is several times the bound"
    );
    let grew = peak_rss(pid).saturating_sub(rss_before);
    assert!(
        grew < BOUND,
        "backing up {raw} bytes grew the learner's peak RSS by {grew} bytes"
    );
}

/// `tern-restore restore` makes a new single-member cluster of a backup,
/// and `drill` proves the newest backup serves, with RTO and RPO.
#[test]
fn restore_and_drill_the_newest_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let url = format!("file://{}", store.display());
    let mut c = Cluster::start(1, &[]);
    fill(&c.nodes[0].client, "r", 25);
    let l = add_file_learner(&mut c, &url, &public, &[]);
    let learner = c.nodes[l].client.clone();
    let rev = current_revision(&c.nodes[0].client);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let key_arg = key.display().to_string();
    let restore = tern_restore;
    let drill = restore(&["drill", "--url", &url, "--identity", &key_arg, "--json"]);
    assert!(drill.status.success(), "{drill:?}");
    let report: Value = serde_json::from_slice(&drill.stdout).unwrap();
    assert_eq!(report["revision"].as_i64(), Some(rev));
    assert_eq!(report["key_count"], 25);
    assert_eq!(report["kv_hash"].as_u64(), hashkv(&c.nodes[0].client, rev));
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);
    assert!(report["rpo_seconds"].as_f64().unwrap() >= 0.0);

    let data_dir = dir.path().join("restored.tern");
    let data_arg = data_dir.display().to_string();
    let restored = restore(&[
        "restore",
        "--url",
        &url,
        "--identity",
        &key_arg,
        "--data-dir",
        &data_arg,
    ]);
    assert!(restored.status.success(), "{restored:?}");
    let again = restore(&[
        "restore",
        "--url",
        &url,
        "--identity",
        &key_arg,
        "--data-dir",
        &data_arg,
    ]);
    assert!(
        !again.status.success(),
        "restoring over a data dir is refused"
    );
    let member = tern_tests::Tern::start_in(&data_dir, &[]);
    assert_eq!(
        etcdctl(
            &member.endpoint,
            &["get", "r0007", "--print-value-only"],
            None
        )
        .stdout,
        "v7\n"
    );
    assert_eq!(current_revision(&member.endpoint), rev);
    assert_eq!(
        hashkv(&member.endpoint, rev),
        hashkv(&c.nodes[0].client, rev)
    );
    let list = etcdctl(&member.endpoint, &["member", "list"], None).stdout;
    assert_eq!(
        list.lines().count(),
        1,
        "a new single-member cluster: {list}"
    );
    assert_eq!(
        etcdctl(&member.endpoint, &["put", "after", "restore"], None).code,
        0
    );
}

/// 1 KiB of incompressible bytes, different for every `n` (xorshift).
fn random_kib(n: usize) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// The store's filesystem fills up mid-upload: the backup fails with a
/// clear error, nothing appears in the store (the partial upload is
/// aborted), the learner keeps replicating and serving, and once there is
/// room the next backup succeeds. A backup writes nothing locally: the old
/// `--backup-staging-dir` (still accepted) is left alone, and a staging
/// copy an older version left in the data dir is removed.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_store_fails_the_backup_cleanly_and_the_next_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let disk = SmallFilesystem::mount(dir.path().join("disk"), "1m");
    let store = disk.path.join("store");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("operator.txt"), "kept").unwrap();
    let mut c = Cluster::start(1, &[]);
    let leader = c.nodes[0].client.clone();
    // About 3 MiB of incompressible state: three times the store's room.
    tern_tests::bulk_write(&leader, "full/", 2_000, 2, random_kib).await;
    let url = format!("file://{}", store.display());
    let staging_dir = staging.display().to_string();
    let l = add_file_learner(
        &mut c,
        &url,
        &public,
        &[
            "--backup-staging-dir",
            &staging_dir,
            "--backup-segment-interval",
            "1h",
        ],
    );
    let learner = c.nodes[l].client.clone();
    let rev = current_revision(&leader);
    c.converged_hash(&[0, l], rev, Duration::from_secs(30));

    let answer = post_backup(&learner);
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("No space left on device"), "{answer}");
    let metrics = http_get(&learner, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"tern_backup_failed_total{reason="upload"} 1"#),
        "{metrics}"
    );
    assert!(file_manifests(&store).is_empty(), "no backup is listed");
    let data: Vec<_> = std::fs::read_dir(store.join("backups"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(data.is_empty(), "the partial upload is removed: {data:?}");
    let old_staging = c.nodes[l].data_dir.join("backup-staging");
    assert!(!old_staging.exists(), "nothing is staged locally");
    // A staging copy an older version left behind goes at the next start.
    c.nodes[l].kill9();
    std::fs::create_dir_all(&old_staging).unwrap();
    std::fs::write(old_staging.join("state.db"), vec![0u8; 1 << 20]).unwrap();
    c.nodes[l].restart();

    // The learner is unaffected: it applies new writes and serves them.
    fill(&leader, "after-full/", 5);
    let rev = current_revision(&leader);
    let hash = c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    assert!(!old_staging.exists(), "the old staging copy is removed");
    let out = etcdctl(
        &learner,
        &[
            "get",
            "after-full/0004",
            "--print-value-only",
            "--consistency=s",
        ],
        None,
    );
    assert_eq!(out.stdout.trim(), "v4", "{out:?}");

    disk.resize("64m");
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let manifests = file_manifests(&store);
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["revision"], rev);
    assert_eq!(manifests[0]["kv_hash"].as_u64(), Some(hash));
    let object = std::fs::read(
        store
            .join("backups")
            .join(manifests[0]["object"]["name"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(
        open_backup(&object, &key, dir.path(), "SELECT COUNT(*) FROM kv_live"),
        "2005"
    );
    let left: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["operator.txt"], "the old staging dir is not used");
}
