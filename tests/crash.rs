//! Every acknowledged write survives SIGKILL: writers hammer a member, it is
//! killed mid-load, restarted on the same data dir, and every acknowledged
//! put must be there with its value. `TERN_CRASH_CYCLES` sets the number of
//! kill/restart cycles (default 5).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_primary::proto::etcdserverpb::{PutRequest, RangeRequest};
use tern_tests::Tern;

const WRITERS: usize = 32;

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_sigkill() {
    let cycles: usize = std::env::var("TERN_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut tern = Tern::start(&[]);
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    for cycle in 0..cycles {
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let kv = tern.kv().await;
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                let mut kv = kv;
                for n in 0.. {
                    let key = format!("crash/{cycle:03}/{w:02}/{n:06}");
                    let value = format!("value-{cycle}-{w}-{n}");
                    let put = PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    };
                    match kv.put(put).await {
                        Ok(_) => {
                            acked.lock().expect("lock").insert(key, value);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        // Kill at a different point of the load each cycle.
        tokio::time::sleep(Duration::from_millis(300 + 137 * (cycle as u64 % 5))).await;
        tern.kill9();
        for w in writers {
            w.await.expect("writer task");
        }
        tern.restart();
        let mut kv = tern.kv().await;
        let resp = kv
            .range(RangeRequest {
                key: b"crash/".to_vec(),
                range_end: b"crash0".to_vec(),
                ..Default::default()
            })
            .await
            .expect("range after restart")
            .into_inner();
        let stored: BTreeMap<String, String> = resp
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect();
        let acked = acked.lock().expect("lock");
        assert!(
            acked.len() > cycle * 10,
            "the load made progress: {} acked",
            acked.len()
        );
        for (key, value) in acked.iter() {
            assert_eq!(
                stored.get(key),
                Some(value),
                "cycle {cycle}: acknowledged {key} lost"
            );
        }
    }
}
