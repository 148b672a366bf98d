//! A member whose data dir fills up: it raises the NOSPACE alarm, refuses
//! writes with etcd's error, keeps serving reads, loses nothing it
//! acknowledged (also across kill -9), and takes writes again once space is
//! freed and the alarm is disarmed. The data dir is on a small tmpfs made
//! for the test.

use tern_primary::proto::etcdserverpb::{PutRequest, RangeRequest};
use tern_tests::{etcdctl, get, SmallFilesystem, Tern};

const NOSPACE: &str = "etcdserver: mvcc: database space exceeded";

#[tokio::test(flavor = "multi_thread")]
async fn a_full_data_dir_raises_nospace_keeps_reads_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallFilesystem::mount(dir.path().join("disk"), "96m");
    let data_dir = disk.path.join("member.tern");
    let mut member = Tern::start_in(&data_dir, &[]);
    let mut kv = member.kv().await;

    // Fill it: 64 KiB values until the member refuses, remembering every
    // acknowledged write.
    let value = vec![b'x'; 64 * 1024];
    let mut acknowledged = Vec::new();
    let refusal = loop {
        let key = format!("fill/{:05}", acknowledged.len());
        let put = kv
            .put(PutRequest {
                key: key.clone().into_bytes(),
                value: value.clone(),
                ..Default::default()
            })
            .await;
        match put {
            Ok(_) => acknowledged.push(key),
            Err(status) => break status,
        }
        assert!(
            acknowledged.len() < 2_000,
            "96 MiB should fill long before 2000 puts of 64 KiB"
        );
    };
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    assert_eq!(refusal.message(), NOSPACE);
    assert!(
        acknowledged.len() > 100,
        "{} writes fit",
        acknowledged.len()
    );

    // The alarm is raised, writes are refused the etcd way, reads work.
    let alarms = etcdctl(&member.endpoint, &["alarm", "list"], None);
    assert!(alarms.stdout.contains("alarm:NOSPACE"), "{alarms:?}");
    let put = etcdctl(&member.endpoint, &["put", "small", "v"], None);
    assert_ne!(put.code, 0);
    assert!(put.stderr.contains(NOSPACE), "{put:?}");
    let first = etcdctl(
        &member.endpoint,
        &["get", "fill/00000", "--print-value-only"],
        None,
    );
    assert_eq!(first.stdout.trim_end().len(), value.len(), "{}", first.code);
    let count = kv
        .range(RangeRequest {
            key: b"fill/".to_vec(),
            range_end: b"fill0".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("a read on a full member")
        .into_inner()
        .count;
    assert_eq!(count as usize, acknowledged.len());

    // kill -9 on a full disk: every acknowledged write is still there.
    member.kill9();
    member.restart();
    let mut kv = member.kv().await;
    for key in &acknowledged {
        assert_eq!(
            get(&mut kv, key).await.as_deref(),
            Some(&value[..]),
            "{key} lost"
        );
    }

    // The operator frees space and disarms the alarm: writes go through.
    disk.resize("256m");
    let still = etcdctl(&member.endpoint, &["put", "small", "v"], None);
    assert!(
        still.stderr.contains(NOSPACE),
        "the alarm holds until disarmed: {still:?}"
    );
    let disarm = etcdctl(&member.endpoint, &["alarm", "disarm"], None);
    assert_eq!(disarm.code, 0, "{disarm:?}");
    let put = etcdctl(&member.endpoint, &["put", "small", "v"], None);
    assert_eq!(put.code, 0, "{put:?}");
    let alarms = etcdctl(&member.endpoint, &["alarm", "list"], None);
    assert_eq!(alarms.stdout, "", "{alarms:?}");
}
