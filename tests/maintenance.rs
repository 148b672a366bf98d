//! Quota and alarms, auto-compaction, and the HTTP endpoints.

use std::time::Duration;

use tern_tests::{etcdctl, http_get, Tern};

/// Past the quota, writes are refused with etcd's NOSPACE error and the
/// alarm is raised; reads and deletes go on; after compaction, defrag and
/// disarm, writes work again and nothing acknowledged was lost.
#[test]
fn quota_raises_nospace_and_recovers() {
    let t = Tern::start(&["--quota-backend-bytes", "3000000"]);
    let value = "v".repeat(100_000);
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..100 {
        let key = format!("fill/{i:03}");
        let out = etcdctl(&t.endpoint, &["put", &key], Some(&value));
        if out.code == 0 {
            acked.push(key);
        } else {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.expect("the quota was reached");
    // Back to back, as etcd counts them: each write's size is counted
    // before the next is admitted.
    assert!(
        acked.len() <= 30,
        "{} writes of 100 kB admitted under a 3 MB quota",
        acked.len()
    );
    assert_eq!(
        refused.error_line(),
        "Error: etcdserver: mvcc: database space exceeded"
    );
    let alarms = etcdctl(&t.endpoint, &["alarm", "list"], None);
    assert_eq!(
        alarms.stdout,
        "memberID:10276657743932975437 alarm:NOSPACE \n"
    );
    // etcd's /health reports an alarm as unhealthy (with Go's http.Error
    // newline), unless the alarm is excluded.
    let health = http_get(&t.endpoint, "/health");
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.ends_with("{\"health\":\"false\"}\n"), "{health}");
    let excluded = http_get(&t.endpoint, "/health?exclude=NOSPACE");
    assert!(excluded.starts_with("HTTP/1.1 200"), "{excluded}");
    // Still refused while the alarm is raised, even a small write.
    let small = etcdctl(&t.endpoint, &["put", "small", "x"], None);
    assert_eq!(
        small.error_line(),
        "Error: etcdserver: mvcc: database space exceeded"
    );
    // Reads and deletes still work; nothing acknowledged is gone.
    let count = etcdctl(
        &t.endpoint,
        &["get", "--prefix", "fill/", "--keys-only"],
        None,
    );
    assert_eq!(
        count.stdout.lines().filter(|l| !l.is_empty()).count(),
        acked.len()
    );
    assert_eq!(
        etcdctl(&t.endpoint, &["del", "--prefix", "fill/"], None).stdout,
        format!("{}\n", acked.len())
    );
    let status = etcdctl(&t.endpoint, &["endpoint", "status", "-w", "json"], None);
    let rev: i64 = status
        .stdout
        .split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("revision");
    assert_eq!(
        etcdctl(&t.endpoint, &["compaction", &rev.to_string()], None).code,
        0
    );
    assert_eq!(etcdctl(&t.endpoint, &["defrag"], None).code, 0);
    // Straight after the defragment, as an operator's script would.
    assert_eq!(etcdctl(&t.endpoint, &["alarm", "disarm"], None).code, 0);
    assert_eq!(etcdctl(&t.endpoint, &["alarm", "list"], None).stdout, "");
    assert_eq!(
        etcdctl(&t.endpoint, &["put", "after", "ok"], None).stdout,
        "OK\n"
    );
}

#[test]
fn periodic_auto_compaction_compacts() {
    let t = Tern::start(&[
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "2s",
    ]);
    for i in 0..5 {
        etcdctl(&t.endpoint, &["put", "ac", &i.to_string()], None);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = etcdctl(&t.endpoint, &["get", "--rev", "2", "ac"], None);
        if out.error_line() == "Error: etcdserver: mvcc: required revision has been compacted" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no auto-compaction within 15 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The current value is never compacted away.
    assert_eq!(
        etcdctl(&t.endpoint, &["get", "ac", "--print-value-only"], None).stdout,
        "4\n"
    );
}

#[test]
fn health_and_metrics_over_http() {
    let port = tern_tests::free_port();
    let t = Tern::start(&["--listen-metrics-urls", &format!("http://127.0.0.1:{port}")]);
    etcdctl(&t.endpoint, &["put", "m", "1"], None);
    let health = http_get(&t.endpoint, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("{\"health\":\"true\"}"), "{health}");
    std::thread::sleep(Duration::from_millis(1200));
    for endpoint in [t.endpoint.clone(), format!("127.0.0.1:{port}")] {
        let metrics = http_get(&endpoint, "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        for line in [
            "etcd_server_has_leader 1",
            "etcd_server_is_leader 1",
            "etcd_server_leader_changes_seen_total 1",
            "etcd_server_quota_backend_bytes 2147483648",
            "etcd_debugging_mvcc_current_revision 2",
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "missing {line:?} in\n{metrics}"
            );
        }
        for prefix in [
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"}",
            "etcd_disk_backend_commit_duration_seconds_count",
            "etcd_mvcc_db_total_size_in_bytes ",
            "etcd_server_proposals_applied_total ",
        ] {
            assert!(
                metrics.lines().any(|l| l.starts_with(prefix)),
                "missing {prefix:?}"
            );
        }
    }
}

/// A CORRUPT alarm stops writes, as etcd's does (DATA_LOSS, "corrupt
/// cluster"), while reads go on; disarmed, writes work again. Side by side
/// with etcd: no etcdctl command raises it, so through the gRPC API.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_alarm_stops_writes_like_etcds() {
    use tern_primary::proto::etcdserverpb::{
        alarm_request::AlarmAction, kv_client::KvClient, lease_client::LeaseClient,
        maintenance_client::MaintenanceClient, AlarmRequest, AlarmType, CompactionRequest,
        DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest,
    };

    fn outcome<T>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
        match r {
            Ok(_) => "ok".into(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        }
    }
    let p = tokio::task::spawn_blocking(tern_tests::Pair::start)
        .await
        .expect("pair");
    let mut answers = Vec::new();
    for endpoint in [&p.etcd.endpoint, &p.tern.endpoint] {
        let ch = tern_tests::channel(endpoint).await;
        let (mut kv, mut alarms) = (
            KvClient::new(ch.clone()),
            MaintenanceClient::new(ch.clone()),
        );
        let put = || PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        let mut seen = vec![format!("put: {}", outcome(kv.put(put()).await))];
        let alarm = |action: AlarmAction| AlarmRequest {
            action: action as i32,
            member_id: 12345,
            alarm: AlarmType::Corrupt as i32,
        };
        let raised = alarms.alarm(alarm(AlarmAction::Activate)).await;
        seen.push(format!("raise: {}", outcome(raised)));
        seen.push(format!("put: {}", outcome(kv.put(put()).await)));
        let delete = DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        seen.push(format!(
            "delete: {}",
            outcome(kv.delete_range(delete).await)
        ));
        let compact = CompactionRequest {
            revision: 1,
            physical: false,
        };
        seen.push(format!("compact: {}", outcome(kv.compact(compact).await)));
        let grant = LeaseGrantRequest {
            ttl: 60,
            ..Default::default()
        };
        let granted = LeaseClient::new(ch.clone()).lease_grant(grant).await;
        seen.push(format!("grant: {}", outcome(granted)));
        let range = RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        seen.push(format!("range: {}", outcome(kv.range(range).await)));
        let disarmed = alarms.alarm(alarm(AlarmAction::Deactivate)).await;
        seen.push(format!("disarm: {}", outcome(disarmed)));
        seen.push(format!("put: {}", outcome(kv.put(put()).await)));
        answers.push(seen.join("\n"));
    }
    assert!(answers[0].contains("DataLoss"), "{}", answers[0]);
    assert_eq!(answers[0], answers[1], "etcd (left), tern (right)");
}
