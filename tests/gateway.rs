//! The JSON gateway, through `curl`, side by side with a real etcd 3.4:
//! every route, under each prefix, gives the same HTTP status and the same
//! JSON once what legitimately differs between two servers (ids, terms,
//! sizes, indexes, tokens) is normalized. Streams (watch, keepalive,
//! snapshot, observe), errors, auth and a learner too.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_tests::cluster::Cluster;
use tern_tests::{Etcd, Pair, Tern};

/// One HTTP answer: its status and body.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    code: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `curl -X <method>` of `path` on `endpoint` (host:port), with `body` on
/// its stdin and `token` in the Authorization header.
fn curl(endpoint: &str, method: &str, path: &str, body: &str, token: Option<&str>) -> Answer {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-X",
        method,
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: {token}")]);
    }
    if method != "GET" {
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(format!("http://{endpoint}{path}"));
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    Answer {
        code: code.trim().parse().expect("status"),
        body: body.to_string(),
    }
}

fn post(endpoint: &str, path: &str, body: &str) -> Answer {
    curl(endpoint, "POST", path, body, None)
}

/// Values that differ between any two servers, whatever they hold.
const VOLATILE: [&str; 13] = [
    "cluster_id",
    "member_id",
    "raft_term",
    "leader",
    "raftIndex",
    "raftTerm",
    "raftAppliedIndex",
    "dbSize",
    "dbSizeInUse",
    "peerURLs",
    "clientURLs",
    "token",
    "blob",
];

fn normalize(mut v: Value, also: &[&str]) -> Value {
    fn walk(v: &mut Value, also: &[&str], in_members: bool) {
        match v {
            Value::Object(map) => {
                for (k, x) in map.iter_mut() {
                    let member_id = in_members && k == "ID";
                    if VOLATILE.contains(&k.as_str()) || also.contains(&k.as_str()) || member_id {
                        *x = Value::String("<normalized>".into());
                    } else {
                        walk(x, also, k == "members" || k == "member");
                    }
                }
            }
            Value::Array(items) => {
                for x in items {
                    walk(x, also, in_members);
                }
            }
            _ => {}
        }
    }
    walk(&mut v, also, false);
    v
}

/// What a server answered, comparable across servers: the status, and the
/// body as normalized JSON (or as text when it is not JSON).
fn comparable(a: &Answer, also: &[&str]) -> (u16, Value) {
    let body = match serde_json::from_str::<Value>(&a.body) {
        Ok(v) => normalize(v, also),
        Err(_) => Value::String(a.body.clone()),
    };
    (a.code, body)
}

/// Send the same request to both; they must answer alike. Tern is asked
/// under every prefix (etcd 3.4.23 serves `/v3` and `/v3beta`; Tern also
/// `/v3alpha`, as older etcds did), etcd under `/v3`.
fn same(p: &Pair, route: &str, body: &str, also: &[&str]) -> Answer {
    same_as(p, route, body, None, None, also)
}

fn same_as(
    p: &Pair,
    route: &str,
    body: &str,
    etcd_token: Option<&str>,
    tern_token: Option<&str>,
    also: &[&str],
) -> Answer {
    let e = curl(
        &p.etcd.endpoint,
        "POST",
        &format!("/v3{route}"),
        body,
        etcd_token,
    );
    let want = comparable(&e, also);
    let mut last = None;
    for prefix in ["/v3", "/v3beta", "/v3alpha"] {
        // Writes are sent once: the other prefixes repeat reads only.
        if prefix != "/v3" && !is_read(route) {
            continue;
        }
        let t = curl(
            &p.tern.endpoint,
            "POST",
            &format!("{prefix}{route}"),
            body,
            tern_token,
        );
        assert_eq!(
            comparable(&t, also),
            want,
            "POST {prefix}{route} {body}: etcd (right) and tern (left) differ"
        );
        last = Some(t);
    }
    last.expect("asked once")
}

fn is_read(route: &str) -> bool {
    [
        "/kv/range",
        "/lease/timetolive",
        "/kv/lease/timetolive",
        "/lease/leases",
        "/kv/lease/leases",
        "/cluster/member/list",
        "/maintenance/status",
        "/maintenance/hash",
        "/auth/user/get",
        "/auth/user/list",
        "/auth/role/get",
        "/auth/role/list",
        "/election/leader",
    ]
    .contains(&route)
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn kv_routes_match_etcd() {
    let p = Pair::start();
    let (foo, bar) = (b64("foo"), b64("bar"));
    same(&p, "/kv/range", "", &[]);
    same(
        &p,
        "/kv/put",
        &format!(r#"{{"key":"{foo}","value":"{bar}"}}"#),
        &[],
    );
    for (k, v) in [("foo1", "a"), ("foo2", "b"), ("zoo", "c")] {
        same(
            &p,
            "/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(v)),
            &[],
        );
    }
    same(
        &p,
        "/kv/put",
        &format!(
            r#"{{"key":"{foo}","value":"{}","prev_kv":true}}"#,
            b64("baz")
        ),
        &[],
    );
    let prefix_end = b64("fop");
    for body in [
        format!(r#"{{"key":"{foo}"}}"#),
        format!(r#"{{"key":"{foo}","range_end":"{prefix_end}"}}"#),
        format!(r#"{{"key":"{foo}","range_end":"{prefix_end}","limit":"2"}}"#),
        format!(
            r#"{{"key":"{foo}","range_end":"{prefix_end}","sort_order":"DESCEND","sort_target":"MOD"}}"#
        ),
        format!(r#"{{"key":"{foo}","range_end":"{prefix_end}","count_only":true}}"#),
        format!(
            r#"{{"key":"{foo}","range_end":"{prefix_end}","keys_only":true,"serializable":true}}"#
        ),
        r#"{"key":"AA==","range_end":"AA=="}"#.to_string(),
        format!(r#"{{"key":"{foo}","revision":"2"}}"#),
        format!(r#"{{"key":"{foo}","revision":"100"}}"#),
        format!(r#"{{"key":"{foo}","sortOrder":1,"bogus":7}}"#),
        // Go's decoder: null is the default, a repeated key's last value
        // counts.
        format!(r#"{{"key":"{foo}","range_end":null,"limit":null}}"#),
        format!(r#"{{"key":"{foo}","key":"{}"}}"#, b64("zoo")),
        "null".to_string(),
        // Truncated and malformed bodies.
        format!(r#"{{"key":"{foo}""#),
    ] {
        same(&p, "/kv/range", &body, &[]);
    }
    same(&p, "/kv/put", r#"{"key":""}"#, &[]);
    same(
        &p,
        "/kv/put",
        &format!(r#"{{"key":"{foo}","lease":"99"}}"#),
        &[],
    );
    same(
        &p,
        "/kv/txn",
        &format!(
            r#"{{"compare":[{{"key":"{foo}","result":"EQUAL","target":"VALUE","value":"{}"}}],
                "success":[{{"request_range":{{"key":"{foo}"}}}},{{"request_put":{{"key":"{}","value":"{bar}"}}}}],
                "failure":[{{"request_delete_range":{{"key":"{foo}"}}}}]}}"#,
            b64("baz"),
            b64("t1")
        ),
        &[],
    );
    same(
        &p,
        "/kv/txn",
        &format!(
            r#"{{"compare":[{{"key":"{foo}","target":"VERSION","result":"GREATER","version":"10"}}],
                "failure":[{{"request_txn":{{"success":[{{"request_range":{{"key":"{}"}}}}]}}}}]}}"#,
            b64("zoo")
        ),
        &[],
    );
    same(
        &p,
        "/kv/deleterange",
        &format!(
            r#"{{"key":"{}","range_end":"{prefix_end}","prev_kv":true}}"#,
            b64("foo1")
        ),
        &[],
    );
    same(&p, "/kv/compaction", r#"{"revision":"4"}"#, &[]);
    same(&p, "/kv/compaction", r#"{"revision":"3"}"#, &[]);
    same(
        &p,
        "/kv/range",
        &format!(r#"{{"key":"{foo}","revision":"3"}}"#),
        &[],
    );
    same(&p, "/kv/compaction", r#"{"revision":"1000"}"#, &[]);
    same(
        &p,
        "/kv/range",
        &format!(r#"{{"key":"{foo}","range_end":"AA=="}}"#),
        &[],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_cluster_and_maintenance_routes_match_etcd() {
    let p = Pair::start();
    same(&p, "/lease/grant", r#"{"TTL":"600","ID":"4660"}"#, &[]);
    same(&p, "/lease/grant", r#"{"TTL":"600","ID":"4660"}"#, &[]);
    same(
        &p,
        "/kv/put",
        &format!(
            r#"{{"key":"{}","value":"{}","lease":"4660"}}"#,
            b64("l"),
            b64("v")
        ),
        &[],
    );
    for route in ["/lease/timetolive", "/kv/lease/timetolive"] {
        same(&p, route, r#"{"ID":"4660","keys":true}"#, &["TTL"]);
        same(&p, route, r#"{"ID":"5"}"#, &[]);
    }
    same(&p, "/lease/leases", "{}", &[]);
    same(&p, "/kv/lease/leases", "", &[]);
    same(&p, "/lease/revoke", r#"{"ID":"5"}"#, &[]);
    same(&p, "/kv/lease/revoke", r#"{"ID":"4660"}"#, &[]);
    same(
        &p,
        "/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("l")),
        &[],
    );

    same(&p, "/cluster/member/list", "{}", &[]);
    same(&p, "/cluster/member/remove", r#"{"ID":"1"}"#, &[]);
    same(
        &p,
        "/cluster/member/update",
        r#"{"ID":"1","peerURLs":["http://127.0.0.1:1"]}"#,
        &[],
    );
    same(&p, "/cluster/member/promote", r#"{"ID":"1"}"#, &[]);
    same(&p, "/maintenance/status", "{}", &[]);
    same(&p, "/maintenance/alarm", "{}", &[]);
    same(&p, "/maintenance/alarm", r#"{"action":"GET"}"#, &[]);
    same(&p, "/maintenance/defragment", "{}", &[]);
    // etcd's Hash covers its whole backend (member ids included), so only
    // the shape is compared.
    same(&p, "/maintenance/hash", "{}", &["hash"]);
    same(
        &p,
        "/maintenance/transfer-leadership",
        r#"{"targetID":"1"}"#,
        &[],
    );
    // To itself: etcd 3.4 answers `{}`, no header.
    let own_id = |endpoint: &str| -> String {
        let status = post(endpoint, "/v3/maintenance/status", "{}").json();
        status["leader"].as_str().expect("leader").to_string()
    };
    for endpoint in [&p.etcd.endpoint, &p.tern.endpoint] {
        let to_self = post(
            endpoint,
            "/v3/maintenance/transfer-leadership",
            &format!(r#"{{"targetID":"{}"}}"#, own_id(endpoint)),
        );
        assert_eq!(
            (to_self.code, to_self.body.as_str()),
            (200, "{}"),
            "{endpoint}"
        );
    }
}

#[test]
fn auth_routes_match_etcd() {
    let p = Pair::start();
    for (route, body) in [
        ("/auth/user/add", r#"{"name":"root","password":"rootpw"}"#),
        ("/auth/user/add", r#"{"name":"root","password":"rootpw"}"#),
        ("/auth/user/add", r#"{"name":"alice","password":"alicepw"}"#),
        ("/auth/role/add", r#"{"name":"reader"}"#),
        (
            "/auth/role/grant",
            r#"{"name":"reader","perm":{"permType":"READ","key":"YQ==","range_end":"Yg=="}}"#,
        ),
        ("/auth/user/grant", r#"{"user":"alice","role":"reader"}"#),
        ("/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/auth/user/get", r#"{"name":"alice"}"#),
        ("/auth/user/get", r#"{"name":"nobody"}"#),
        ("/auth/user/list", "{}"),
        ("/auth/role/get", r#"{"role":"reader"}"#),
        ("/auth/role/list", "{}"),
        (
            "/auth/user/changepw",
            r#"{"name":"alice","password":"alicepw2"}"#,
        ),
        ("/auth/role/add", r#"{"name":"gone"}"#),
        ("/auth/role/delete", r#"{"role":"gone"}"#),
        ("/auth/role/revoke", r#"{"role":"reader","key":"eg=="}"#),
        ("/auth/user/revoke", r#"{"name":"alice","role":"nothing"}"#),
        (
            "/auth/authenticate",
            r#"{"name":"alice","password":"alicepw2"}"#,
        ),
        ("/auth/enable", "{}"),
    ] {
        same(&p, route, body, &[]);
    }
    // Auth is on: no token, a wrong password, a bad token, then tokens.
    same(&p, "/kv/range", r#"{"key":"YQ=="}"#, &[]);
    same(
        &p,
        "/auth/authenticate",
        r#"{"name":"alice","password":"wrong"}"#,
        &[],
    );
    same_as(
        &p,
        "/kv/range",
        r#"{"key":"YQ=="}"#,
        Some("bogus"),
        Some("bogus"),
        &[],
    );
    // A stream refused before its first message: the error's HTTP status.
    same(&p, "/maintenance/snapshot", "{}", &[]);
    // A token sent where no permission is needed is still checked.
    same_as(
        &p,
        "/lease/grant",
        r#"{"TTL":"60"}"#,
        Some("bogus"),
        Some("bogus"),
        &[],
    );
    let token = |endpoint: &str, name: &str, password: &str| -> String {
        let a = post(
            endpoint,
            "/v3/auth/authenticate",
            &format!(r#"{{"name":"{name}","password":"{password}"}}"#),
        );
        assert_eq!(a.code, 200, "{a:?}");
        a.json()["token"].as_str().expect("token").to_string()
    };
    let (e_alice, t_alice) = (
        token(&p.etcd.endpoint, "alice", "alicepw2"),
        token(&p.tern.endpoint, "alice", "alicepw2"),
    );
    let alice = |route: &str, body: &str| {
        same_as(&p, route, body, Some(&e_alice), Some(&t_alice), &[]);
    };
    alice("/kv/range", r#"{"key":"YQ=="}"#);
    alice("/kv/put", r#"{"key":"YQ==","value":"eA=="}"#);
    alice("/auth/user/list", "{}");
    let (e_root, t_root) = (
        token(&p.etcd.endpoint, "root", "rootpw"),
        token(&p.tern.endpoint, "root", "rootpw"),
    );
    let root = |route: &str, body: &str| {
        same_as(&p, route, body, Some(&e_root), Some(&t_root), &[]);
    };
    root("/kv/put", r#"{"key":"YQ==","value":"eA=="}"#);
    alice("/kv/range", r#"{"key":"YQ=="}"#);
    root("/auth/user/delete", r#"{"name":"alice"}"#);
    root("/auth/disable", "{}");
    same(&p, "/kv/range", r#"{"key":"YQ=="}"#, &[]);
}

#[test]
fn lock_and_election_routes_match_etcd() {
    let p = Pair::start();
    same(&p, "/lease/grant", r#"{"TTL":"600","ID":"100"}"#, &[]);
    same(&p, "/lease/grant", r#"{"TTL":"600","ID":"200"}"#, &[]);
    let lock = same(
        &p,
        "/lock/lock",
        r#"{"name":"bXlsb2Nr","lease":"100"}"#,
        &[],
    );
    let key = lock.json()["key"].as_str().unwrap().to_string();
    assert_eq!(key, b64("mylock/64"));
    // The same lease locks again at once (one acquisition per lease).
    same(
        &p,
        "/lock/lock",
        r#"{"name":"bXlsb2Nr","lease":"100"}"#,
        &[],
    );
    same(
        &p,
        "/lock/lock",
        r#"{"name":"bXlsb2Nr","lease":"999"}"#,
        &[],
    );
    same(&p, "/lock/unlock", &format!(r#"{{"key":"{key}"}}"#), &[]);
    same(&p, "/lock/unlock", &format!(r#"{{"key":"{key}"}}"#), &[]);

    let e = b64("elect");
    same(&p, "/election/leader", &format!(r#"{{"name":"{e}"}}"#), &[]);
    let won = same(
        &p,
        "/election/campaign",
        &format!(r#"{{"name":"{e}","lease":"100","value":"{}"}}"#, b64("one")),
        &[],
    );
    let leader = won.json()["leader"].clone();
    same(&p, "/election/leader", &format!(r#"{{"name":"{e}"}}"#), &[]);
    // Campaigning again with the same lease proclaims the new value.
    same(
        &p,
        "/election/campaign",
        &format!(r#"{{"name":"{e}","lease":"100","value":"{}"}}"#, b64("two")),
        &[],
    );
    same(
        &p,
        "/election/proclaim",
        &format!(r#"{{"leader":{leader},"value":"{}"}}"#, b64("three")),
        &[],
    );
    same(&p, "/election/leader", &format!(r#"{{"name":"{e}"}}"#), &[]);
    same(
        &p,
        "/election/proclaim",
        &format!(r#"{{"value":"{}"}}"#, b64("x")),
        &[],
    );
    same(
        &p,
        "/election/resign",
        &format!(r#"{{"leader":{leader}}}"#),
        &[],
    );
    same(
        &p,
        "/election/proclaim",
        &format!(r#"{{"leader":{leader},"value":"{}"}}"#, b64("four")),
        &[],
    );
    same(
        &p,
        "/election/resign",
        &format!(r#"{{"leader":{leader}}}"#),
        &[],
    );
    same(&p, "/election/resign", "{}", &[]);
    same(&p, "/election/leader", &format!(r#"{{"name":"{e}"}}"#), &[]);
}

/// A long POST, read for `secs`; its output lines as normalized JSON.
fn stream_lines(endpoint: &str, path: &str, body: &str, secs: u64) -> Vec<Value> {
    let out = Command::new("curl")
        .args([
            "-sN",
            "-X",
            "POST",
            "--max-time",
            &secs.to_string(),
            "--data-binary",
            body,
        ])
        .arg(format!("http://{endpoint}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            normalize(
                serde_json::from_str(l).unwrap_or(Value::String(l.into())),
                &[],
            )
        })
        .collect()
}

#[test]
fn streams_match_etcd() {
    let p = Pair::start();
    let endpoints = [p.etcd.endpoint.clone(), p.tern.endpoint.clone()];
    // Watch: created, then a put and a delete, in one long POST with two
    // requests in its body (one cancelled later by id is not needed).
    let watch = format!(
        r#"{{"create_request":{{"key":"{}","prev_kv":true}}}}
           {{"create_request":{{"key":"{}","range_end":"{}","watch_id":"7"}}}}"#,
        b64("w"),
        b64("p/"),
        b64("p0")
    );
    let watchers: Vec<_> = endpoints
        .iter()
        .map(|e| {
            let (e, w) = (e.clone(), watch.clone());
            std::thread::spawn(move || stream_lines(&e, "/v3/watch", &w, 4))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    for e in &endpoints {
        for (k, v) in [("w", "1"), ("p/a", "2"), ("w", "3")] {
            assert_eq!(
                post(
                    e,
                    "/v3/kv/put",
                    &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(v))
                )
                .code,
                200
            );
        }
        assert_eq!(
            post(
                e,
                "/v3/kv/deleterange",
                &format!(r#"{{"key":"{}"}}"#, b64("w"))
            )
            .code,
            200
        );
    }
    let seen: Vec<Vec<Value>> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
    // The two creations may come in either order on etcd; events may not.
    let sorted = |lines: &Vec<Value>| {
        let mut l: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
        l.sort();
        l
    };
    assert_eq!(
        sorted(&seen[1]),
        sorted(&seen[0]),
        "watch lines: tern (left), etcd (right)"
    );
    assert_eq!(seen[0].len(), 6, "{:?}", seen[0]);

    // Keepalive: one answer per request line.
    for e in &endpoints {
        assert_eq!(
            post(e, "/v3/lease/grant", r#"{"TTL":"60","ID":"42"}"#).code,
            200
        );
    }
    let ka = |e: &str| {
        stream_lines(
            e,
            "/v3/lease/keepalive",
            "{\"ID\":\"42\"}\n{\"ID\":\"42\"}\n{\"ID\":\"9\"}",
            2,
        )
    };
    assert_eq!(ka(&endpoints[1]), ka(&endpoints[0]));

    // Observe: the leader, then each new value.
    for e in &endpoints {
        let c = post(
            e,
            "/v3/election/campaign",
            &format!(
                r#"{{"name":"{}","lease":"42","value":"{}"}}"#,
                b64("o"),
                b64("v1")
            ),
        );
        assert_eq!(c.code, 200, "{c:?}");
    }
    let observers: Vec<_> = endpoints
        .iter()
        .map(|e| {
            let (e, body) = (e.clone(), format!(r#"{{"name":"{}"}}"#, b64("o")));
            std::thread::spawn(move || stream_lines(&e, "/v3/election/observe", &body, 3))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    for e in &endpoints {
        let key = b64(&format!("o/{:x}", 42));
        assert_eq!(
            post(
                e,
                "/v3/kv/put",
                &format!(r#"{{"key":"{key}","value":"{}","lease":"42"}}"#, b64("v2"))
            )
            .code,
            200
        );
    }
    let observed: Vec<Vec<Value>> = observers.into_iter().map(|o| o.join().unwrap()).collect();
    assert_eq!(
        observed[1], observed[0],
        "observe: tern (left), etcd (right)"
    );
    assert_eq!(observed[0].len(), 2);

    // Snapshot: a stream of blobs that together are a backend etcdctl reads.
    for e in &endpoints {
        let out = Command::new("curl")
            .args(["-sN", "-X", "POST", "--max-time", "20", "-d", "{}"])
            .arg(format!("http://{e}/v3/maintenance/snapshot"))
            .output()
            .expect("curl");
        let mut file = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).expect("a JSON line");
            let blob = v["result"]["blob"].as_str().expect("a blob");
            use base64::Engine;
            file.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(blob)
                    .unwrap(),
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.db");
        std::fs::write(&path, &file).unwrap();
        let status = tern_tests::etcdctl(
            e,
            &["snapshot", "status", &path.display().to_string()],
            None,
        );
        assert_eq!(status.code, 0, "{e}: {}", status.stderr);
    }
}

#[test]
fn plain_http_matches_etcd() {
    let p = Pair::start();
    for (method, path) in [
        ("GET", "/version"),
        ("GET", "/health"),
        ("POST", "/health"),
        ("GET", "/v3/kv/range"),
        ("POST", "/v3/nothing"),
        ("POST", "/nothing"),
        ("OPTIONS", "/v3/kv/range"),
    ] {
        let e = curl(&p.etcd.endpoint, method, path, "", None);
        let t = curl(&p.tern.endpoint, method, path, "", None);
        assert_eq!(t, e, "{method} {path}: tern (left), etcd (right)");
    }
    let headers = |endpoint: &str| -> Vec<String> {
        let out = Command::new("curl")
            .args(["-s", "-D", "-", "-o", "/dev/null", "-X", "POST", "-d", "{}"])
            .arg(format!("http://{endpoint}/v3/kv/range"))
            .output()
            .expect("curl");
        let mut h: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.to_ascii_lowercase())
            // The trailer etcd sends on an error (Tern's HTTP stack sends
            // trailers only to clients that ask with `TE: trailers`).
            .filter(|l| {
                !l.starts_with("date:")
                    && !l.starts_with("grpc-trailer-content-type:")
                    && !l.trim().is_empty()
            })
            .collect();
        h.sort();
        h
    };
    assert_eq!(headers(&p.tern.endpoint), headers(&p.etcd.endpoint));
}

#[test]
fn probes_answer_like_etcd_35() {
    let t = Tern::start(&[]);
    let get = |path: &str| curl(&t.endpoint, "GET", path, "", None);
    assert_eq!(
        get("/livez"),
        Answer {
            code: 200,
            body: "ok\n".into()
        }
    );
    assert_eq!(
        get("/readyz"),
        Answer {
            code: 200,
            body: "ok\n".into()
        }
    );
    assert_eq!(
        get("/readyz?verbose").body,
        "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nok\n"
    );
    assert_eq!(
        get("/readyz?verbose&exclude=linearizable_read").body,
        "[+]data_corruption ok\n[+]serializable_read ok\nok\n"
    );
    assert_eq!(get("/livez?verbose").body, "[+]serializable_read ok\nok\n");
    assert_eq!(
        get("/readyz/linearizable_read?verbose").body,
        "[+]linearizable_read ok\nok\n"
    );
    assert_eq!(curl(&t.endpoint, "POST", "/livez", "", None).code, 405);
}

/// A member with no quorum: /health and /readyz fail, /livez (local reads)
/// does not.
#[test]
fn probes_fail_without_a_quorum() {
    let mut c = Cluster::start(3, &[]);
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    let client = c.nodes[0].client.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let health = curl(&client, "GET", "/health", "", None);
        if health.code == 503 {
            assert_eq!(health.body, "{\"health\":\"false\"}\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still healthy: {health:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let ready = curl(&client, "GET", "/readyz", "", None);
    assert_eq!(ready.code, 503);
    assert!(
        ready.body.contains("[-]linearizable_read failed: "),
        "{ready:?}"
    );
    assert!(
        ready.body.contains("[+]serializable_read ok\n"),
        "{ready:?}"
    );
    assert_eq!(curl(&client, "GET", "/livez", "", None).code, 200);
}

/// On a learner the gateway applies the learner's rules: reads are served,
/// everything else refused with etcd's learner error.
#[test]
fn a_learner_serves_reads_and_refuses_the_rest() {
    let mut c = Cluster::start(1, &[]);
    let learner = c.add_member(true, &[]);
    let voter = c.nodes[0].client.clone();
    let client = c.nodes[learner].client.clone();
    assert_eq!(
        post(
            &voter,
            "/v3/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("k"), b64("v"))
        )
        .code,
        200
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let read = loop {
        let a = post(
            &client,
            "/v3/kv/range",
            &format!(r#"{{"key":"{}","serializable":true}}"#, b64("k")),
        );
        if a.code == 200 && a.json()["count"] == "1" {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "learner never served k: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(read.json()["kvs"][0]["value"], b64("v"));
    let refused = r#"{"error":"etcdserver: rpc not supported for learner","message":"etcdserver: rpc not supported for learner","code":14}"#;
    // Linearizable reads (beyond etcd 3.4's learner) go through a read
    // index from the leader.
    let linearizable = post(
        &client,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("k")),
    );
    assert_eq!(linearizable.code, 200, "{linearizable:?}");
    assert_eq!(linearizable.json()["kvs"][0]["value"], b64("v"));
    for (route, body) in [
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{}","value":"{}"}}"#, b64("k"), b64("x")),
        ),
        ("/v3/lease/grant", r#"{"TTL":"60"}"#.to_string()),
        ("/v3/lock/lock", r#"{"name":"bA=="}"#.to_string()),
        ("/v3/election/leader", r#"{"name":"bA=="}"#.to_string()),
    ] {
        let a = post(&client, route, &body);
        assert_eq!((a.code, a.body.as_str()), (503, refused), "{route}");
    }
    assert_eq!(post(&client, "/v3/maintenance/status", "{}").code, 200);
}

/// The same server, reached by etcd's own gateway and by Tern's: the
/// version route works before anything else (tools probe it first).
#[test]
fn version_is_etcds() {
    let e = Etcd::start();
    let t = Tern::start(&[]);
    let v = curl(&t.endpoint, "GET", "/version", "", None);
    assert_eq!(v, curl(&e.endpoint, "GET", "/version", "", None));
    assert_eq!(v.json()["etcdserver"], "3.4.23");
}
