//! etcd auth (v3 RBAC) through real etcdctl: the same sessions run against
//! a real etcd 3.4 and tern-primary must print the same (exit code, stdout
//! and the `Error:` line); and a learner enforces the same permissions on
//! the serializable reads it serves.

use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, AuthenticateRequest, RangeRequest,
};
use tern_tests::backups::{add_file_learner, age_key, post_backup, tern_restore};
use tern_tests::cluster::Cluster;
use tern_tests::{
    channel, etcdctl, etcdctl_for, normalize, workspace_bin, Etcd, Output, Pair, Tern,
    ALICE_READS_A,
};

const ROOT: &str = "--user=root:rootpw";
const ALICE: &str = "--user=alice:alicepw";

/// Users, roles and permissions for the scenarios, set up with auth off.
fn set_up(p: &Pair) {
    p.same(&["user", "add", "root", "--new-user-password=rootpw"]);
    p.same(&["role", "add", "reader"]);
    p.same(&[
        "role",
        "grant-permission",
        "reader",
        "read",
        "/a/",
        "--prefix",
    ]);
    p.same(&["role", "grant-permission", "reader", "readwrite", "/c"]);
    p.same(&["user", "add", "alice", "--new-user-password=alicepw"]);
    p.same(&["user", "grant-role", "alice", "reader"]);
}

#[test]
fn auth_management_matches_etcd() {
    let p = Pair::start();
    set_up(&p);
    for args in [
        &["user", "add", "root", "--new-user-password=x"][..],
        &["user", "add", "svc", "--no-password"],
        &["role", "add", "reader"],
        &["role", "grant-permission", "nosuch", "read", "x"],
        &["role", "grant-permission", "reader", "write", "/w/", "/w0"],
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "k",
            "--from-key",
        ],
        &["user", "grant-role", "alice", "nosuch"],
        &["user", "grant-role", "nobody", "reader"],
        &["user", "grant-role", "alice", "reader"],
        &["user", "revoke-role", "alice", "nosuch"],
        &["user", "revoke-role", "nobody", "reader"],
        &["role", "revoke-permission", "reader", "/zzz"],
        &["role", "revoke-permission", "nosuch", "/zzz"],
        &["user", "list"],
        &["role", "list"],
        &["user", "get", "alice"],
        &["user", "get", "nobody"],
        &["role", "get", "reader"],
        &["role", "get", "nosuch"],
        &["user", "get", "alice", "--detail"],
        &["auth", "disable"],
    ] {
        p.same(args);
    }
    p.same(&["role", "revoke-permission", "reader", "/w/", "/w0"]);
    p.same(&["role", "get", "reader"]);
    p.same(&["user", "delete", "svc"]);
    p.same(&["role", "add", "temp"]);
    p.same(&["user", "grant-role", "alice", "temp"]);
    p.same(&["role", "delete", "temp"]);
    p.same(&["user", "get", "alice"]);
    p.same(&["user", "delete", "root"]);
    // (etcdctl grants a missing root role itself; a missing root user it
    // cannot make up.)
    assert_eq!(
        p.same(&["auth", "enable"]).error_line(),
        "Error: etcdserver: root user does not exist"
    );
}

#[test]
fn permissions_are_enforced_like_etcd() {
    let p = Pair::start();
    set_up(&p);
    p.same(&["user", "grant-role", "root", "root"]);
    assert_eq!(
        p.same(&["auth", "enable"]).stdout,
        "Authentication Enabled\n"
    );
    p.same(&["auth", "enable"]);
    for (k, v) in [("/a/x", "1"), ("/a/y", "2"), ("/b/x", "3"), ("/c", "4")] {
        assert_eq!(p.same(&[ROOT, "put", k, v]).stdout, "OK\n");
    }
    let denied = "Error: etcdserver: permission denied";
    // Reads inside the permission, refusals outside it.
    assert_eq!(p.same(&[ALICE, "get", "/a/x"]).stdout, "/a/x\n1\n");
    p.same(&[ALICE, "get", "/a/", "--prefix"]);
    p.same(&[ALICE, "get", "/a/x", "/a/z"]);
    for args in [
        &[ALICE, "get", "/b/x"][..],
        &[ALICE, "get", "/a", "--prefix"],
        &[ALICE, "get", "/a/", "--from-key"],
        &[ALICE, "put", "/a/x", "5"],
        &[ALICE, "del", "/a/x"],
        &[ALICE, "del", "/a/", "--prefix"],
        &[ALICE, "user", "list"],
        &[ALICE, "role", "list"],
        &[ALICE, "user", "get", "root"],
        &[ALICE, "user", "add", "mallory", "--new-user-password=x"],
        &[ALICE, "auth", "disable"],
    ] {
        assert_eq!(p.same(args).error_line(), denied, "{args:?}");
    }
    // Maintenance passes auth's own error through (code Unknown); membership
    // reads and lease grants need no permission.
    for args in [
        &[ALICE, "endpoint", "hashkv"][..],
        &[ALICE, "defrag"],
        &[ALICE, "snapshot", "save", "/dev/null"],
        &[ALICE, "member", "list"],
        &[ALICE, "alarm", "list"],
    ] {
        let (e, t) = p.run(args, None);
        assert_eq!(
            (e.code, e.stderr.contains("auth: permission denied")),
            (t.code, t.stderr.contains("auth: permission denied")),
            "{args:?}: {e:?} / {t:?}"
        );
    }
    let (e, t) = p.run(&[ALICE, "lease", "grant", "100"], None);
    assert_eq!((e.code, t.code), (0, 0), "{e:?} / {t:?}");
    // Revoking a lease deletes its keys: write on each is needed.
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(p.grant(0x77, 100));
    p.same(&[ROOT, "put", "--lease=77", "/b/leased", "v"]);
    assert_eq!(
        p.same(&[ALICE, "lease", "revoke", "77"]).error_line(),
        "Error: failed to revoke lease (etcdserver: permission denied)"
    );
    // Listing a lease's keys needs read on them: the fix etcd made in 3.4.26
    // (CVE-2023-32082); the etcd 3.4.23 here still shows them.
    let out = etcdctl(
        &p.tern.endpoint,
        &[ALICE, "lease", "timetolive", "77", "--keys"],
        None,
    );
    assert_eq!(out.error_line(), denied);
    let (e, t) = p.run(&[ALICE, "lease", "timetolive", "77"], None);
    assert_eq!((e.code, t.code), (0, 0), "{e:?} / {t:?}");
    // Attaching a key to a lease ties it to the lease's other keys: write
    // on each is needed (etcd's checkLeasePuts). Tern checks a txn's puts
    // too, where etcd 3.4 lets them through (its txn applies puts past the
    // check), so that one runs on Tern alone.
    assert_eq!(
        p.same(&[ALICE, "put", "--lease=77", "/c", "v"])
            .error_line(),
        denied
    );
    let txn = "\nput --lease=77 /c v\n\n\n";
    let out = etcdctl(&p.tern.endpoint, &[ALICE, "txn"], Some(txn));
    assert_eq!(out.error_line(), denied, "{out:?}");
    p.same(&[ROOT, "lease", "revoke", "77"]);
    // A watch outside the permission is created cancelled.
    let watch = |endpoint: &str| {
        let out = etcdctl_for(endpoint, &[ALICE, "watch", "/b/x"], Duration::from_secs(2));
        let out = normalize(out, endpoint);
        // etcdctl reports the cancellation on stderr, after its retry
        // warnings (JSON lines with timestamps).
        let said: Vec<&str> = out.stderr.lines().filter(|l| !l.starts_with('{')).collect();
        format!("{}{}", out.stdout, said.join("\n"))
    };
    let on_etcd = watch(&p.etcd.endpoint);
    // ...while one inside it replays the history it may read.
    let replay = |endpoint: &str| {
        let args = [ALICE, "watch", "/a/x", "--rev=1"];
        let out = etcdctl_for(endpoint, &args, Duration::from_secs(2));
        normalize(out, endpoint).stdout
    };
    let replayed = replay(&p.etcd.endpoint);
    assert_eq!(replayed, "PUT\n/a/x\n1\n");
    assert_eq!(replayed, replay(&p.tern.endpoint));
    assert!(
        on_etcd.contains("etcdserver: permission denied"),
        "{on_etcd}"
    );
    assert_eq!(on_etcd, watch(&p.tern.endpoint));
    // Any user may compact, as in etcd 3.4 (Kubernetes' API server
    // compacts as a user without the root role).
    p.same(&[ALICE, "compaction", "1"]);
    // ...even with no user at all.
    p.same(&["compaction", "2"]);
    // Read-write on one key.
    p.same(&[ALICE, "put", "/c", "6"]);
    p.same(&[ALICE, "get", "/c"]);
    p.same(&[ALICE, "del", "/c"]);
    // A txn needs every compare and op permitted, whichever branch runs.
    let txn = "value(\"/a/x\") = \"1\"\n\nget /a/x\n\nput /b/x no\n\n";
    assert_eq!(
        p.same_stdin(&[ALICE, "txn"], Some(txn)).error_line(),
        denied
    );
    let txn = "value(\"/a/x\") = \"1\"\n\nget /a/y\n\nget /a/x\n\n";
    p.same_stdin(&[ALICE, "txn"], Some(txn));
    // What a user may see about itself and its roles.
    p.same(&[ALICE, "user", "get", "alice"]);
    p.same(&[ALICE, "role", "get", "reader"]);
    // No token, a wrong password, a user without a password.
    assert_eq!(
        p.same(&["get", "/a/x"]).error_line(),
        "Error: etcdserver: user name is empty"
    );
    p.same(&["put", "/a/x", "1"]);
    let failed = "Error: etcdserver: authentication failed, invalid user ID or password";
    assert_eq!(
        p.same(&["--user=alice:wrong", "get", "/a/x"]).error_line(),
        failed
    );
    p.same(&["--user=nobody:pw", "get", "/a/x"]);
    p.same(&[ROOT, "user", "add", "svc", "--no-password"]);
    p.same(&["--user=svc:", "get", "/a/x"]);
    p.same(&["--user=svc:x", "get", "/a/x"]);
    // Root does everything; root cannot be removed while auth is on.
    p.same(&[ROOT, "get", "", "--from-key"]);
    p.same(&[ROOT, "user", "list"]);
    p.same(&[ROOT, "role", "list"]);
    p.same(&[ROOT, "role", "get", "reader"]);
    p.same(&[ROOT, "user", "get", "alice"]);
    for args in [
        &[ROOT, "user", "delete", "root"][..],
        &[ROOT, "user", "revoke-role", "root", "root"],
        &[ROOT, "role", "delete", "root"],
    ] {
        assert_eq!(
            p.same(args).error_line(),
            "Error: etcdserver: invalid auth management"
        );
    }
    // A new password: the old one stops working.
    p.same_stdin(
        &[ROOT, "user", "passwd", "alice", "--interactive=false"],
        Some("newpw\n"),
    );
    assert_eq!(p.same(&[ALICE, "get", "/a/x"]).error_line(), failed);
    p.same(&["--user=alice:newpw", "get", "/a/x"]);
    // Revoked permission, then auth off: everyone reads everything.
    p.same(&[
        ROOT,
        "role",
        "revoke-permission",
        "reader",
        "/a/",
        "--prefix",
    ]);
    assert_eq!(
        p.same(&["--user=alice:newpw", "get", "/a/x"]).error_line(),
        denied
    );
    assert_eq!(
        p.same(&[ROOT, "auth", "disable"]).stdout,
        "Authentication Disabled\n"
    );
    assert_eq!(p.same(&["get", "/b/x"]).stdout, "/b/x\n3\n");
    p.same(&["put", "/b/x", "4"]);
    p.same(&["user", "delete", "alice"]);
    p.same(&["user", "get", "alice"]);
    p.same(&["role", "delete", "reader"]);
    p.same(&["role", "list"]);
}

/// Retry `args` on `node` until `done` holds for its output or `within`
/// passes (the learner applies the log a little after the voter).
fn poll(
    c: &Cluster,
    node: usize,
    args: &[&str],
    within: Duration,
    done: impl Fn(&Output) -> bool,
) -> Output {
    let deadline = Instant::now() + within;
    loop {
        let out = c.nodes[node].etcdctl(args);
        if done(&out) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Users and roles on a 1-member cluster's voter (auth still off).
fn set_up_voter(c: &Cluster) {
    for args in ALICE_READS_A
        .iter()
        .chain([&["put", "/b/x", "2"][..]].iter())
    {
        let out = c.nodes[0].etcdctl(args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    }
}

#[test]
fn a_learner_enforces_the_same_permissions() {
    // A short log: the learner starts from a Raft snapshot, which must
    // carry the users and roles.
    let mut c = Cluster::start(1, &["--snapshot-count", "10"]);
    set_up_voter(&c);
    for i in 0..30 {
        let out = c.nodes[0].etcdctl(&["put", &format!("/fill/{i}"), "x"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    // Membership changes need root once auth is on: add the learner first.
    let learner = c.add_member(true, &[]);
    let out = c.nodes[0].etcdctl(&["auth", "enable"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let within = Duration::from_secs(30);
    // Once the learner has applied the log, alice reads /a/ there (asking
    // the learner itself for her token)...
    let out = poll(
        &c,
        learner,
        &[ALICE, "get", "/a/x", "--consistency=s"],
        within,
        |o| o.stdout == "/a/x\n1\n",
    );
    assert_eq!(out.stdout, "/a/x\n1\n", "{}", out.stderr);
    // ...and is refused the rest, as on the voter.
    for (args, error) in [
        (
            &[ALICE, "get", "/b/x", "--consistency=s"][..],
            "Error: etcdserver: permission denied",
        ),
        (
            &["get", "/a/x", "--consistency=s"],
            "Error: etcdserver: user name is empty",
        ),
        (
            &["--user=alice:wrong", "get", "/a/x", "--consistency=s"],
            "Error: etcdserver: authentication failed, invalid user ID or password",
        ),
    ] {
        let on_voter = c.nodes[0].etcdctl(args);
        let on_learner = c.nodes[learner].etcdctl(args);
        assert_eq!(on_voter.error_line(), error, "voter {args:?}");
        assert_eq!(on_learner.error_line(), error, "learner {args:?}");
    }
    let root = c.nodes[learner].etcdctl(&[ROOT, "get", "/b/x", "--consistency=s"]);
    assert_eq!(root.stdout, "/b/x\n2\n", "{}", root.stderr);
    // A permission granted later reaches the learner through the log.
    let out = c.nodes[0].etcdctl(&[
        ROOT,
        "role",
        "grant-permission",
        "reader",
        "read",
        "/b/",
        "--prefix",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = poll(
        &c,
        learner,
        &[ALICE, "get", "/b/x", "--consistency=s"],
        within,
        |o| o.code == 0,
    );
    assert_eq!(out.stdout, "/b/x\n2\n", "{}", out.stderr);
}

#[test]
fn backups_keep_auth_and_drills_pass_with_auth_on() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let url = format!("file://{}", dir.path().join("store").display());
    let mut c = Cluster::start(1, &[]);
    let learner = add_file_learner(&mut c, &url, &public, &[]);
    set_up_voter(&c);
    let out = c.nodes[0].etcdctl(&["auth", "enable"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = c.nodes[0].etcdctl(&[ROOT, "put", "/a/y", "3"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = poll(
        &c,
        learner,
        &[ROOT, "get", "/a/y", "--consistency=s"],
        Duration::from_secs(30),
        |o| o.stdout == "/a/y\n3\n",
    );
    assert_eq!(out.stdout, "/a/y\n3\n", "{}", out.stderr);
    let answer = post_backup(&c.nodes[learner].client);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The drill reads the restored keys back with auth on in the backup.
    let key_arg = key.display().to_string();
    let drill = tern_restore(&["drill", "--url", &url, "--identity", &key_arg, "--json"]);
    assert!(drill.status.success(), "{drill:?}");
    let report: serde_json::Value = serde_json::from_slice(&drill.stdout).unwrap();
    assert_eq!(report["key_count"], 3);

    // A restored member keeps users, roles and auth on.
    let data_dir = dir.path().join("restored.tern");
    let data_arg = data_dir.display().to_string();
    let restored = tern_restore(&[
        "restore",
        "--url",
        &url,
        "--identity",
        &key_arg,
        "--data-dir",
        &data_arg,
    ]);
    assert!(restored.status.success(), "{restored:?}");
    let member = Tern::start_in(&data_dir, &[]);
    let run = |args: &[&str]| etcdctl(&member.endpoint, args, None);
    assert_eq!(
        run(&["get", "/a/x"]).error_line(),
        "Error: etcdserver: user name is empty"
    );
    assert_eq!(run(&[ALICE, "get", "/a/x"]).stdout, "/a/x\n1\n");
    assert_eq!(
        run(&[ALICE, "get", "/b/x"]).error_line(),
        "Error: etcdserver: permission denied"
    );
    assert_eq!(run(&[ROOT, "user", "list"]).stdout, "alice\nroot\n");
}

/// What alice, root and no user get from a member that carries the
/// scenario's auth (set up by [`set_up`] or [`set_up_voter`], enabled).
fn enforces_scenario(endpoint: &str) {
    let run = |args: &[&str]| etcdctl(endpoint, args, None);
    assert_eq!(
        run(&["get", "/a/x"]).error_line(),
        "Error: etcdserver: user name is empty"
    );
    let read = run(&[ALICE, "get", "/a/x"]);
    assert_eq!(read.stdout, "/a/x\n1\n", "{}", read.stderr);
    assert_eq!(
        run(&[ALICE, "get", "/b/x"]).error_line(),
        "Error: etcdserver: permission denied"
    );
    assert_eq!(run(&[ROOT, "get", "/b/x"]).stdout, "/b/x\n2\n");
}

#[test]
fn snapshots_carry_auth_to_etcd_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pair::start();
    set_up(&p);
    p.same(&["user", "grant-role", "root", "root"]);
    p.same(&["auth", "enable"]);
    p.same(&[ROOT, "put", "/a/x", "1"]);
    p.same(&[ROOT, "put", "/b/x", "2"]);

    // Tern's snapshot, restored by etcdctl, served by etcd.
    let tern_db = dir.path().join("tern.db").display().to_string();
    let out = etcdctl(
        &p.tern.endpoint,
        &[ROOT, "snapshot", "save", &tern_db],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let restored = dir.path().join("restored.etcd");
    let restored_arg = restored.display().to_string();
    let out = etcdctl(
        &p.etcd.endpoint,
        &["snapshot", "restore", &tern_db, "--data-dir", &restored_arg],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    enforces_scenario(&Etcd::start_in(&restored).endpoint);

    // etcd's snapshot, imported by tern-restore, served by Tern.
    let etcd_db = dir.path().join("etcd.db").display().to_string();
    let out = etcdctl(
        &p.etcd.endpoint,
        &[ROOT, "snapshot", "save", &etcd_db],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let imported = dir.path().join("imported.tern");
    let out = std::process::Command::new(workspace_bin("tern-restore"))
        .args(["import-etcd", &etcd_db, "--data-dir"])
        .arg(&imported)
        .output()
        .expect("run tern-restore");
    assert!(out.status.success(), "{out:?}");
    enforces_scenario(&Tern::start_in(&imported, &[]).endpoint);
}

/// A request for `key` carrying `token`.
fn range_as(token: &str, key: &str) -> tonic::Request<RangeRequest> {
    let mut request = tonic::Request::new(RangeRequest {
        key: key.as_bytes().to_vec(),
        serializable: true,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("token", token.parse().expect("token is ASCII"));
    request
}

async fn token(endpoint: &str, name: &str, password: &str) -> Result<String, tonic::Status> {
    let response = AuthClient::new(channel(endpoint).await)
        .authenticate(AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await?
        .into_inner();
    assert!(response
        .header
        .is_some_and(|h| h.cluster_id != 0 && h.revision > 0));
    Ok(response.token)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expire_and_do_not_outlive_a_restart() {
    let mut t = Tern::start(&["--auth-token-ttl", "1"]);
    for args in ALICE_READS_A.iter().chain([&["auth", "enable"][..]].iter()) {
        let out = etcdctl(&t.endpoint, args, None);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    }
    let wrong = token(&t.endpoint, "alice", "nope").await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    let alice = token(&t.endpoint, "alice", "alicepw").await.unwrap();
    let mut kv = KvClient::new(channel(&t.endpoint).await);
    let got = kv
        .range(range_as(&alice, "/a/x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"1");
    let denied = kv.range(range_as(&alice, "/b/x")).await.unwrap_err();
    assert_eq!(
        (denied.code(), denied.message()),
        (
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied"
        )
    );
    let invalid = (
        tonic::Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );
    let unknown = kv.range(range_as("forged.1", "/a/x")).await.unwrap_err();
    assert_eq!((unknown.code(), unknown.message()), invalid);

    // Unused for longer than --auth-token-ttl: gone (this waits on the
    // TTL itself, not on readiness).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expired = kv.range(range_as(&alice, "/a/x")).await.unwrap_err();
    assert_eq!((expired.code(), expired.message()), invalid);

    // Tokens live in memory only; users and auth itself survive a restart.
    let alice = token(&t.endpoint, "alice", "alicepw").await.unwrap();
    tokio::task::block_in_place(|| t.restart());
    let mut kv = KvClient::new(channel(&t.endpoint).await);
    let stale = kv.range(range_as(&alice, "/a/x")).await.unwrap_err();
    assert_eq!((stale.code(), stale.message()), invalid);
    let alice = token(&t.endpoint, "alice", "alicepw").await.unwrap();
    let got = kv
        .range(range_as(&alice, "/a/x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_from_one_member_works_on_every_member() {
    let c = tokio::task::block_in_place(|| {
        let c = Cluster::start(3, &[]);
        set_up_voter(&c);
        let out = c.nodes[0].etcdctl(&["auth", "enable"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        c
    });
    for from in 0..3 {
        // Used at once everywhere: a member that has not applied the
        // token's entry yet waits for it rather than refusing it.
        let alice = token(&c.nodes[from].client, "alice", "alicepw")
            .await
            .unwrap();
        for on in 0..3 {
            let mut kv = KvClient::new(channel(&c.nodes[on].client).await);
            let mut linearizable = range_as(&alice, "/a/x");
            linearizable.get_mut().serializable = false;
            for request in [range_as(&alice, "/a/x"), linearizable] {
                let got = kv.range(request).await.unwrap().into_inner();
                assert_eq!(got.kvs[0].value, b"1", "token from {from} on {on}");
            }
            let denied = kv.range(range_as(&alice, "/b/x")).await.unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        }
    }
}

/// A put that returns the previous value reads it: write alone is not
/// enough, in a txn as much as on its own (etcd 3.4 checks only the lone
/// put, so this runs on Tern alone).
#[test]
fn a_put_returning_the_previous_value_needs_read_in_a_txn_too() {
    let t = Tern::start(&[]);
    for args in [
        &["user", "add", "root", "--new-user-password=rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "writer"],
        &[
            "role",
            "grant-permission",
            "writer",
            "write",
            "/w/",
            "--prefix",
        ],
        &["user", "add", "wally", "--new-user-password=wallypw"],
        &["user", "grant-role", "wally", "writer"],
        &["put", "/w/x", "secret"],
        &["auth", "enable"],
    ] {
        let out = etcdctl(&t.endpoint, args, None);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
    }
    let wally = "--user=wally:wallypw";
    let denied = "Error: etcdserver: permission denied";
    let put = etcdctl(&t.endpoint, &[wally, "put", "/w/x", "1"], None);
    assert_eq!(put.code, 0, "write is granted: {put:?}");
    let put = etcdctl(&t.endpoint, &[wally, "put", "/w/x", "2", "--prev-kv"], None);
    assert_eq!(put.error_line(), denied, "{put:?}");
    let txn = "\nput --prev-kv /w/x 3\n\n\n";
    let out = etcdctl(&t.endpoint, &[wally, "txn"], Some(txn));
    assert_eq!(out.error_line(), denied, "{out:?}");
    let txn = "\nput /w/x 4\n\n\n";
    let out = etcdctl(&t.endpoint, &[wally, "txn"], Some(txn));
    assert_eq!(out.code, 0, "{out:?}");
}

/// What a request with a bad token, no token or too little permission gets
/// back, where etcdctl does not show it: a watch's cancel (id -1, and the
/// gRPC error's text for a reason), and the check of a token sent along
/// with requests that need no permission (a lease grant, an alarm, a
/// login). Compared with etcd's answers.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_name_their_cause_as_etcd_does() {
    use tern_primary::proto::etcdserverpb::{
        lease_client::LeaseClient, maintenance_client::MaintenanceClient,
        watch_client::WatchClient, watch_request::RequestUnion, AlarmRequest, LeaseGrantRequest,
        WatchCreateRequest, WatchRequest,
    };

    fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = token {
            let value = token.parse().expect("token is ASCII");
            request.metadata_mut().insert("token", value);
        }
        request
    }
    fn outcome<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
        match r {
            Ok(_) => "ok".into(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        }
    }

    let p = tokio::task::spawn_blocking(|| {
        let p = Pair::start();
        set_up(&p);
        p.same(&["user", "grant-role", "root", "root"]);
        p.same(&["auth", "enable"]);
        p
    })
    .await
    .expect("set up");
    let mut answers = Vec::new();
    for endpoint in [&p.etcd.endpoint, &p.tern.endpoint] {
        let alice = token(endpoint, "alice", "alicepw").await.expect("alice");
        let ch = channel(endpoint).await;
        let mut seen = Vec::new();
        for token in [Some(alice.as_str()), None, Some("bogus")] {
            let create = WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: b"/b/x".to_vec(),
                    ..Default::default()
                })),
            };
            let requests = tokio_stream::iter([create]);
            let mut inbound = WatchClient::new(ch.clone())
                .watch(with_token(requests, token))
                .await
                .expect("watch stream")
                .into_inner();
            let r = inbound.message().await.expect("answer").expect("open");
            seen.push(format!(
                "watch {token:?}: id {} created {} canceled {} reason {:?}",
                r.watch_id, r.created, r.canceled, r.cancel_reason
            ));
        }
        let grant = LeaseGrantRequest {
            ttl: 60,
            ..Default::default()
        };
        let granted = LeaseClient::new(ch.clone())
            .lease_grant(with_token(grant, Some("bogus")))
            .await;
        seen.push(format!("grant: {}", outcome(granted)));
        let alarms = MaintenanceClient::new(ch.clone())
            .alarm(with_token(AlarmRequest::default(), Some("bogus")))
            .await;
        seen.push(format!("alarm: {}", outcome(alarms)));
        let login = AuthenticateRequest {
            name: "root".into(),
            password: "rootpw".into(),
        };
        let logged_in = AuthClient::new(ch.clone())
            .authenticate(with_token(login, Some("bogus")))
            .await;
        seen.push(format!("authenticate: {}", outcome(logged_in)));
        answers.push(seen.join("\n").replace(&alice, "<alice's token>"));
    }
    assert!(answers[0].contains("id -1"), "{}", answers[0]);
    assert_eq!(answers[0], answers[1], "etcd (left), tern (right)");
}
