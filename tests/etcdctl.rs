//! etcdctl sessions run side by side against a real etcd 3.4 and
//! tern-primary: the same commands, in the same order, must print the same
//! thing. Only what legitimately differs between two servers is normalized
//! (the endpoint address, elapsed times, database sizes and Raft indexes).

use std::time::Duration;

use serde_json::Value;
use tern_tests::{etcdctl, etcdctl_for, normalize, Etcd, Pair, Tern};

fn session_put(p: &Pair) {
    for (k, v) in [
        ("foo", "bar"),
        ("foo2", "bar2"),
        ("foo3", "bar3"),
        ("k1", "v1"),
        ("k2", "v2"),
        ("a", "1"),
    ] {
        assert_eq!(p.same(&["put", k, v]).stdout, "OK\n");
    }
}

#[test]
fn get_forms_match_etcd() {
    let p = Pair::start();
    session_put(&p);
    p.same(&["put", "foo", "bar-again"]);
    let out = p.same(&["get", "foo"]);
    assert_eq!(out.stdout, "foo\nbar-again\n");
    for args in [
        &["get", "foo", "-w", "json"][..],
        &["get", "foo", "-w", "fields"],
        &["get", "--prefix", "foo"],
        &["get", "foo", "foo3"],
        &["get", "--from-key", "foo2"],
        &["get", "--from-key", "", "--keys-only"],
        &["get", "--prefix", "foo", "--limit", "1", "-w", "json"],
        &["get", "--prefix", "--limit=1", "-w", "json", ""],
        &["get", "--rev", "2", "foo2"],
        &["get", "--rev", "3", "--prefix", "foo"],
        &["get", "--rev", "7", "foo", "-w", "json"],
        &[
            "get",
            "--prefix",
            "foo",
            "--sort-by=MODIFY",
            "--order=DESCEND",
        ],
        &[
            "get",
            "--prefix",
            "foo",
            "--sort-by=VALUE",
            "--order=ASCEND",
            "--keys-only",
        ],
        &["get", "--prefix", "foo", "--sort-by=CREATE"],
        &[
            "get",
            "--prefix",
            "foo",
            "--sort-by=VERSION",
            "--order=DESCEND",
            "-w",
            "json",
        ],
        &["get", "--prefix", "foo", "--order=DESCEND"],
        // A target without an order: etcd sorts only the first limit + 1
        // keys.
        &["get", "--from-key", "", "--sort-by=CREATE", "--limit=3"],
        &[
            "get",
            "--from-key",
            "",
            "--sort-by=MODIFY",
            "--limit=3",
            "-w",
            "json",
        ],
        &["get", "--from-key", "", "--sort-by=VALUE", "--limit=2"],
        &["get", "--prefix", "foo", "--sort-by=VERSION", "--limit=1"],
        &["get", "foo", "--print-value-only"],
        &["get", "--prefix", "k", "--keys-only"],
        &["get", "--consistency=s", "foo"],
        &["get", "missing"],
        &["get", "missing", "-w", "json"],
        &["get", "--rev", "100", "foo"],
    ] {
        p.same(args);
    }
}

#[test]
fn put_and_del_match_etcd() {
    let p = Pair::start();
    session_put(&p);
    for args in [
        &["put", "--prev-kv", "foo", "baz"][..],
        &["put", "--prev-kv", "newkey", "x", "-w", "json"],
        &["put", "--ignore-value", "foo"],
        &["get", "foo", "-w", "json"],
        &["put", "--ignore-value", "nokey"],
        &["put", "--ignore-lease", "foo", "v"],
        &["put", "--lease=99", "foo", "v"],
        &["del", "foo2", "--prev-kv"],
        &["del", "--prefix", "k"],
        &["del", "nothing"],
        &["del", "--from-key", "foo", "-w", "json"],
        &["get", "--from-key", ""],
        &["del", "--prefix", "", "--prev-kv", "-w", "json"],
        &["get", "--from-key", "", "-w", "json"],
    ] {
        p.same(args);
    }
}

#[test]
fn txn_matches_etcd() {
    let p = Pair::start();
    session_put(&p);
    let scripts = [
        "value(\"foo\") = \"bar\"\n\nput foo baz\nget foo\n\nput foo nope\n\n",
        "value(\"foo\") = \"bar\"\n\nput foo again\n\nput foo failed\nget foo\n\n",
        "mod(\"foo\") > \"0\"\nversion(\"k1\") = \"1\"\n\ndel k1\nget --prefix k\n\nput x y\n\n",
        "create(\"missing\") = \"0\"\n\nput missing now\n\n\n",
        "value(\"missing2\") != \"x\"\n\nput a b\n\nput a c\n\n",
        "\n\nget foo\nget a\n\n\n",
    ];
    for script in scripts {
        p.same_stdin(&["txn"], Some(script));
        p.same_stdin(&["txn", "-w", "json"], Some(script));
    }
    p.same(&["get", "--from-key", "", "-w", "json"]);
}

#[test]
fn compaction_matches_etcd() {
    let p = Pair::start();
    // Nothing compacted yet: compacting at 0 is allowed.
    p.same(&["compaction", "0"]);
    session_put(&p);
    p.same(&["put", "foo", "v2"]);
    p.same(&["compaction", "5"]);
    p.same(&["get", "--rev", "4", "foo"]);
    p.same(&["get", "--rev", "5", "--prefix", "foo"]);
    p.same(&["compaction", "3"]);
    p.same(&["compaction", "100"]);
    p.same(&["compaction", "--physical", "6"]);
    p.same(&["get", "--from-key", "", "-w", "json"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_match_etcd() {
    let p = Pair::start();
    p.grant(0x1234, 100).await;
    p.grant(0x99, 200).await;
    p.same(&["lease", "list"]);
    p.same(&["put", "--lease=1234", "lk", "lv"]);
    p.same(&["put", "--lease=1234", "lk2", "lv2"]);
    p.same(&["get", "lk", "-w", "json"]);
    // Remaining seconds depend on timing, and etcd lists attached keys in Go
    // map order (random); everything else must match.
    let (e, t) = p.run(&["lease", "timetolive", "1234", "--keys"], None);
    assert_eq!(
        sort_attached_keys(&strip_remaining(&e.stdout)),
        sort_attached_keys(&strip_remaining(&t.stdout))
    );
    assert!(t.stdout.contains("attached keys([lk lk2])"), "{}", t.stdout);
    p.same(&["lease", "keep-alive", "--once", "1234"]);
    p.same(&["lease", "revoke", "1234"]);
    p.same(&["get", "lk"]);
    p.same(&["lease", "timetolive", "1234"]);
    p.same(&["lease", "revoke", "1234"]);
    p.same(&["lease", "keep-alive", "--once", "1234"]);
    p.same(&["lease", "list"]);
    p.same(&["get", "--from-key", "", "-w", "json"]);
}

/// Sorts the names inside `attached keys([...])` so Go's random map order
/// does not matter.
fn sort_attached_keys(s: &str) -> String {
    let Some(start) = s.find("attached keys([") else {
        return s.to_string();
    };
    let open = start + "attached keys([".len();
    let Some(len) = s[open..].find("])") else {
        return s.to_string();
    };
    let mut keys: Vec<&str> = s[open..open + len].split(' ').collect();
    keys.sort_unstable();
    format!("{}{}{}", &s[..open], keys.join(" "), &s[open + len..])
}

fn strip_remaining(s: &str) -> String {
    match (s.find("remaining("), s.find("s), attached")) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &s[..a], &s[b..]),
        _ => s.to_string(),
    }
}

#[test]
fn short_lease_expires_and_deletes_keys() {
    let t = Tern::start(&[]);
    let grant = etcdctl(&t.endpoint, &["lease", "grant", "2"], None);
    let id = grant
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert_eq!(
        etcdctl(&t.endpoint, &["put", "--lease", &id, "eph", "x"], None).stdout,
        "OK\n"
    );
    assert_eq!(
        etcdctl(&t.endpoint, &["get", "eph", "--print-value-only"], None).stdout,
        "x\n"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(etcdctl(&t.endpoint, &["get", "eph"], None).stdout, "");
    let ttl = etcdctl(&t.endpoint, &["lease", "timetolive", &id], None);
    assert_eq!(ttl.stdout, format!("lease {id} already expired\n"));
}

#[test]
fn watch_matches_etcd() {
    let p = Pair::start();
    session_put(&p);
    p.same(&["put", "foo", "v2"]);
    p.same(&["del", "foo2"]);
    for args in [
        &["watch", "--rev", "2", "--prefix", "foo"][..],
        &["watch", "--rev", "2", "--prev-kv", "foo"],
        &["watch", "--rev", "1", "foo", "-w", "json"],
        &["watch", "--rev", "3", "foo2", "foo4"],
    ] {
        let e = normalize(
            etcdctl_for(&p.etcd.endpoint, args, Duration::from_millis(1500)),
            &p.etcd.endpoint,
        );
        let t = normalize(
            etcdctl_for(&p.tern.endpoint, args, Duration::from_millis(1500)),
            &p.tern.endpoint,
        );
        assert_eq!(e.stdout, t.stdout, "etcdctl {args:?}");
    }
    p.same(&["compaction", "4"]);
    let args = ["watch", "--rev", "2", "foo"];
    let e = etcdctl_for(&p.etcd.endpoint, &args, Duration::from_millis(1500));
    let t = etcdctl_for(&p.tern.endpoint, &args, Duration::from_millis(1500));
    assert_eq!(e.stdout, t.stdout);
    assert_eq!(e.error_line(), t.error_line());
}

#[test]
fn live_watch_sees_new_events() {
    let t = Tern::start(&[]);
    let endpoint = t.endpoint.clone();
    let watcher = std::thread::spawn(move || {
        etcdctl_for(
            &endpoint,
            &["watch", "--prefix", "live/"],
            Duration::from_millis(2500),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    etcdctl(&t.endpoint, &["put", "live/a", "1"], None);
    etcdctl(&t.endpoint, &["del", "live/a"], None);
    etcdctl(&t.endpoint, &["put", "other", "1"], None);
    let out = watcher.join().expect("watcher");
    assert_eq!(out.stdout, "PUT\nlive/a\n1\nDELETE\nlive/a\n\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_and_maintenance_match_etcd() {
    let p = Pair::start();
    session_put(&p);
    p.same(&["member", "list"]);
    p.same(&["member", "list", "-w", "json"]);
    p.same(&["member", "list", "-w", "table"]);
    // The only voter cannot be removed; an unknown member is looked up
    // before its URLs are.
    let list = p.same(&["member", "list"]);
    let id = list
        .stdout
        .split(',')
        .next()
        .expect("member id")
        .to_string();
    p.same(&["member", "remove", &id]);
    p.same(&["member", "update", "ffff", "--peer-urls=not-a-url"]);
    p.same(&["member", "list"]);
    p.same(&["endpoint", "health"]);
    p.same(&["endpoint", "health", "-w", "json"]);
    p.same(&["alarm", "list"]);
    p.same(&["defrag"]);
    let (e, t) = p.run(&["endpoint", "status", "-w", "json"], None);
    assert_eq!(status_fields(&e.stdout), status_fields(&t.stdout));
    let (e, t) = p.run(&["endpoint", "status", "-w", "table"], None);
    assert_eq!(
        e.stdout.lines().nth(1),
        t.stdout.lines().nth(1),
        "table header"
    );
    assert_eq!(e.code, t.code);
    let (e, t) = p.run(&["endpoint", "hashkv", "-w", "json"], None);
    assert_eq!(e.code, 0);
    assert_eq!(t.code, 0, "{}", t.stderr);
    snapshot_restores_into_etcd(&p).await;
}

/// A snapshot from Tern is an etcd backend: `snapshot status` agrees with
/// one from etcd after the same writes, and etcd restored from it serves
/// the same keys (leased ones included, deleted and compacted ones not).
async fn snapshot_restores_into_etcd(p: &Pair) {
    p.grant(0x4321, 600).await;
    p.same(&["put", "leased", "v", "--lease=4321"]);
    p.same(&["del", "foo2"]);
    p.same(&["put", "foo", "bar-again"]);
    p.same(&["del", "k1"]);
    p.same(&["compaction", "9"]);
    p.same(&["put", "after", "compaction"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut status = Vec::new();
    for (name, endpoint) in [("etcd", &p.etcd.endpoint), ("tern", &p.tern.endpoint)] {
        let path = dir.path().join(format!("{name}.db"));
        let file = path.display().to_string();
        let out = etcdctl(endpoint, &["snapshot", "save", &file], None);
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        assert_eq!(out.stdout, format!("Snapshot saved at {file}\n"));
        let out = etcdctl(endpoint, &["snapshot", "status", "-w", "json", &file], None);
        assert_eq!(out.code, 0, "{name} snapshot status: {}", out.stderr);
        let v: Value = serde_json::from_str(&out.stdout).expect("status json");
        status.push((v["revision"].clone(), v["totalKey"].clone()));
    }
    assert_eq!(
        status[0], status[1],
        "snapshot status: etcd (left), tern (right)"
    );
    assert_eq!(status[1].0, Value::from(12), "revision");

    let restored = dir.path().join("restored");
    let out = etcdctl(
        &p.tern.endpoint,
        &[
            "snapshot",
            "restore",
            &dir.path().join("tern.db").display().to_string(),
            "--data-dir",
            &restored.display().to_string(),
        ],
        None,
    );
    assert_eq!(out.code, 0, "snapshot restore: {}", out.stderr);
    let etcd = Etcd::start_in(&restored);
    let get = ["get", "--from-key", "", "-w", "json"];
    let kvs = |endpoint: &str| {
        let out = etcdctl(endpoint, &get, None);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: Value = serde_json::from_str(&out.stdout).expect("get json");
        v["kvs"].clone()
    };
    let from_tern = kvs(&p.tern.endpoint);
    let keys: Vec<&str> = from_tern
        .as_array()
        .expect("kvs")
        .iter()
        .filter_map(|kv| kv["key"].as_str())
        .collect();
    // base64 of after, foo, foo3, k2, leased, a: deleted keys are gone.
    assert_eq!(
        keys,
        ["YQ==", "YWZ0ZXI=", "Zm9v", "Zm9vMw==", "azI=", "bGVhc2Vk"]
    );
    assert_eq!(
        kvs(&etcd.endpoint),
        from_tern,
        "restored etcd (left), tern (right)"
    );
    assert_eq!(
        etcdctl(&etcd.endpoint, &["lease", "list"], None).stdout,
        "found 1 leases\n0000000000004321\n"
    );
}

/// Endpoint status without the figures that differ between engines.
fn status_fields(json: &str) -> Value {
    let mut v: Value = serde_json::from_str(json).expect("status json");
    for entry in v.as_array_mut().expect("array") {
        let status = entry.get_mut("Status").expect("Status");
        for field in ["dbSize", "dbSizeInUse", "raftIndex", "raftAppliedIndex"] {
            let present = status.get(field).is_some();
            status[field] = Value::Bool(present);
        }
    }
    v
}

#[test]
fn oversized_and_bad_requests_match_etcd() {
    let p = Pair::start();
    let big = "x".repeat(1024 * 1024 + 600 * 1024);
    p.same_stdin(&["put", "big"], Some(&big));
    let fits = "y".repeat(1024 * 1024);
    p.same_stdin(&["put", "fits"], Some(&fits));
    p.same(&["get", "fits", "--keys-only"]);
    p.same(&["lease", "timetolive", "abcd"]);
    p.same(&["lease", "revoke", "abcd"]);
}

/// etcdctl 3.4 sends per-endpoint maintenance calls (endpoint status,
/// hashkv, defrag, and every `--cluster` call) with the HTTP/2 `:authority`
/// set to the whole endpoint URL when it has a scheme (`http://host:port`).
/// grpc-go accepts that; Rust's h2 rejects it as malformed (PROTOCOL_ERROR,
/// hyperium/h2#525), so Tern's client listeners strip the scheme first
/// (`primary/src/authority_shim.rs`).
#[test]
fn endpoints_with_a_scheme_match_etcd() {
    let p = Pair::start();
    session_put(&p);
    let e = format!("http://{}", p.etcd.endpoint);
    let t = format!("http://{}", p.tern.endpoint);
    for args in [
        &["endpoint", "hashkv"][..],
        &["defrag"],
        &["endpoint", "status", "--cluster"],
    ] {
        let on_etcd = etcdctl(&e, args, None);
        let on_tern = etcdctl(&t, args, None);
        assert_eq!(on_etcd.code, 0, "{args:?} on etcd: {}", on_etcd.stderr);
        assert_eq!(on_tern.code, 0, "{args:?} on tern: {}", on_tern.stderr);
    }
}

/// `endpoint hashkv` prints etcd's number on Tern after the same mixed
/// history (puts over several versions, a lease, deletes, a txn, a
/// compaction), now and at older revisions; `compact_revision` is -1
/// until the first compaction, as in etcd.
#[tokio::test(flavor = "multi_thread")]
async fn hashkv_matches_etcd() {
    let p = Pair::start();
    let hashkv = |args: &[&str]| -> (Value, Value) {
        let mut all = vec!["endpoint", "hashkv", "-w", "json"];
        all.extend_from_slice(args);
        let (e, t) = p.run(&all, None);
        assert_eq!(
            (e.code, e.error_line()),
            (t.code, t.error_line()),
            "{args:?}"
        );
        let parse = |s: &str| -> Value {
            serde_json::from_str::<Value>(s).map_or(Value::Null, |v| v[0]["HashKV"].clone())
        };
        (parse(&e.stdout), parse(&t.stdout))
    };
    let same_hash = |args: &[&str]| {
        let (e, t) = hashkv(args);
        for field in ["hash", "compact_revision"] {
            assert_eq!(e[field], t[field], "{field} of hashkv {args:?}");
        }
        assert_eq!(e["header"]["revision"], t["header"]["revision"]);
    };
    same_hash(&[]);
    let (e, _) = hashkv(&[]);
    assert_eq!(e["compact_revision"], -1, "nothing compacted yet");
    session_put(&p);
    same_hash(&[]);
    p.grant(0x77, 600).await;
    p.same(&["put", "leased", "v", "--lease=77"]);
    for v in ["2", "3", "4"] {
        p.same(&["put", "foo", v]);
    }
    p.same(&["del", "k1"]);
    p.same(&["del", "--prefix", "foo"]);
    p.same_stdin(&["txn"], Some("\nput t1 one\nput t2 two\ndel a\n\n\n"));
    p.same(&["put", "foo", "back"]);
    same_hash(&[]);
    for rev in 1..=16 {
        same_hash(&["--rev", &rev.to_string()]);
    }
    p.same(&["compaction", "9"]);
    p.same(&["put", "k2", "after"]);
    p.same(&["del", "k2"]);
    for rev in ["0", "9", "10", "12", "14", "18", "19", "100"] {
        same_hash(&["--rev", rev]);
    }
    let (e, _) = hashkv(&[]);
    assert_eq!(e["compact_revision"], 9);
}

/// Maintenance Hash is etcd's hash of its whole backend: on etcd it equals
/// `backend_hash` of the file `snapshot save` copies out of that backend
/// (which checks the algorithm against etcd itself), and on Tern it equals
/// the same function of Tern's own snapshot after the same writes.
#[tokio::test(flavor = "multi_thread")]
async fn hash_is_etcds_backend_hash() {
    use tern_primary::mvcc::etcd_snapshot::backend_hash;
    use tern_primary::proto::etcdserverpb::{maintenance_client::MaintenanceClient, HashRequest};
    let p = Pair::start();
    session_put(&p);
    p.grant(0x99, 600).await;
    p.same(&["put", "leased", "v", "--lease=99"]);
    p.same(&["del", "k1"]);
    p.same(&["compaction", "4"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, endpoint) in [("etcd", &p.etcd.endpoint), ("tern", &p.tern.endpoint)] {
        let mut client = MaintenanceClient::new(tern_tests::channel(endpoint).await);
        let served = client
            .hash(HashRequest {})
            .await
            .expect("hash")
            .into_inner()
            .hash;
        let file = dir.path().join(format!("{name}.db"));
        let saved = etcdctl(
            endpoint,
            &["snapshot", "save", &file.display().to_string()],
            None,
        );
        assert_eq!(saved.code, 0, "{}", saved.stderr);
        assert_eq!(backend_hash(&file).expect("a backend"), served, "{name}");
    }
}
