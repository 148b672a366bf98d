//! Monitoring that operators already have works on Tern: etcd's alert
//! rules (`monitoring/etcd-alerts.yaml`, the etcd mixin's), Tern's own
//! (`monitoring/tern-alerts.yaml`) and the Grafana dashboard use only
//! metrics that real processes export, and the rules fire when they should
//! and stay silent when they should not.
//!
//! One scenario, with real processes: a tern-primary, a tern-learner that
//! backs up to a `file://` store, one backup, one `tern-restore drill
//! --metrics-file`. Then:
//! - every metric name in the rules and the dashboard is in a scrape (the
//!   primary's for etcd's rules), so renaming a metric fails here;
//! - `promtool check rules` accepts the rule files;
//! - `promtool test rules` runs unit tests whose series are built from the
//!   scrape: the members' real label sets, the histograms' real bucket
//!   bounds, the real starting values, so a change of label or bucket
//!   layout breaks them too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tern_tests::backups::{age_key, post_backup};
use tern_tests::cluster::Cluster;
use tern_tests::{
    current_revision, etcdctl, free_port, http_get, spawn_member, workspace_bin, Etcd,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// One sample of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// What one scrape says: samples, and the families its `# TYPE` lines
/// declare (a labelled family with no child yet has no sample).
#[derive(Debug, Default, Clone)]
struct Scrape {
    samples: Vec<Sample>,
    families: BTreeSet<String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    scrape.families.insert(name.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            scrape.samples.push(parse_sample(line));
        }
        scrape
    }

    fn merge(mut self, other: Scrape) -> Scrape {
        self.samples.extend(other.samples);
        self.families.extend(other.families);
        self
    }

    /// Whether a metric of this name is exported: a sample of it, or a
    /// family whose samples carry it (`x_total`, `x_bucket`, ...).
    fn has(&self, name: &str) -> bool {
        if self.samples.iter().any(|s| s.name == name) || self.families.contains(name) {
            return true;
        }
        ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|f| self.families.contains(f))
            })
    }

    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    fn one(&self, name: &str) -> &Sample {
        self.all(name)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("{name} not in the scrape"))
    }

    /// A histogram's buckets: (le as written, le as a number, count), in
    /// order, for the series whose other labels include `with`.
    fn buckets(&self, name: &str, with: &[(&str, &str)]) -> Vec<(String, f64, f64)> {
        let mut out: Vec<(String, f64, f64)> = self
            .all(&format!("{name}_bucket"))
            .into_iter()
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| {
                let le = label(s, "le").to_string();
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                (le, bound, s.value)
            })
            .collect();
        out.sort_by(|a, b| a.1.total_cmp(&b.1));
        assert!(!out.is_empty(), "no buckets of {name} with {with:?}");
        out
    }
}

fn label<'a>(s: &'a Sample, key: &str) -> &'a str {
    s.labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{} has no label {key}", s.name))
}

/// `name{k="v",...} value` (the text format; values here hold no quotes
/// or backslashes, but escapes are read anyway).
fn parse_sample(line: &str) -> Sample {
    let (head, value) = line.rsplit_once(' ').expect("name and value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
    };
    let Some((name, rest)) = head.split_once('{') else {
        return Sample {
            name: head.to_string(),
            labels: Vec::new(),
            value,
        };
    };
    let mut labels = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "{line}");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => val.extend(chars.next()),
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
        if chars.peek() == Some(&'}') {
            break;
        }
    }
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// The metric names a PromQL expression selects: identifiers that are not
/// functions, keywords, label names (inside `{}` or a `by`/`without`/
/// `on`/`ignoring` list), durations or numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 5] = ["and", "or", "unless", "bool", "offset"];
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Past the string starting at `i`.
    let skip_string = |mut i: usize| -> usize {
        let quote = chars[i];
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    // Past the bracket opening at `i` and its match, over strings inside.
    let skip = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        let mut quote: Option<char> = None;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some(_) if c == '\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                None => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip(i, '{', '}');
        } else if c == '[' {
            i = skip(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, a number, a duration.
            i += 1;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = chars.get(j) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if call {
                    i = skip(j, '(', ')');
                }
            } else if !call
                && !KEYWORDS.contains(&word.as_str())
                && !AGGREGATIONS.contains(&word.as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The `expr: |` blocks of a rule file (the layout ours use).
fn rule_exprs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("rule file");
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim_start() == "expr: |" {
            let indent = line.len() - line.trim_start().len();
            let mut body = String::new();
            i += 1;
            while i < lines.len() {
                let l = lines[i];
                if !l.trim().is_empty() && l.len() - l.trim_start().len() <= indent {
                    break;
                }
                body.push_str(l.trim());
                body.push('\n');
                i += 1;
            }
            exprs.push(body);
        } else {
            i += 1;
        }
    }
    assert!(!exprs.is_empty(), "no rules in {}", path.display());
    exprs
}

fn dashboard_exprs(path: &Path) -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("dashboard")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (apt-get install prometheus)")
}

/// The body of a member's `/metrics`.
fn scrape(endpoint: &str) -> Scrape {
    let response = http_get(endpoint, "/metrics");
    let (_, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    // Chunked transfer: drop the chunk-size lines (hex numbers alone).
    let body: String = body
        .lines()
        .filter(|l| !(l.len() <= 8 && !l.is_empty() && l.chars().all(|c| c.is_ascii_hexdigit())))
        .map(|l| format!("{l}\n"))
        .collect();
    Scrape::parse(&body)
}

/// Everything the scenario observed.
struct Observed {
    primary: Scrape,
    learner: Scrape,
    drill: Scrape,
    /// A follower of a real etcd (`tern-learner --etcd-endpoints`).
    follower: Scrape,
    primary_instance: String,
    learner_instance: String,
    follower_instance: String,
}

fn observe() -> Observed {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = age_key(dir.path());
    let store = dir.path().join("store");
    let url = format!("file://{}", store.display());
    let mut c = Cluster::start(1, &[]);
    let primary = c.nodes[0].client.clone();
    for i in 0..10 {
        let out = etcdctl(&primary, &["put", &format!("k{i}"), "v"], None);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let l = c.add_member(true, &["--backup-url", &url, "--backup-recipient", &public]);
    let learner = c.nodes[l].client.clone();
    let rev = current_revision(&primary);
    c.converged_hash(&[0, l], rev, Duration::from_secs(20));
    let answer = post_backup(&learner);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let metrics_file = dir.path().join("tern-drill.prom");
    let drill = Command::new(workspace_bin("tern-restore"))
        .args(["drill", "--url", &url, "--identity"])
        .arg(&key)
        .arg("--metrics-file")
        .arg(&metrics_file)
        .output()
        .expect("tern-restore");
    assert!(drill.status.success(), "{drill:?}");
    // The leader probes its peer's round trip as soon as it connects.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut primary_scrape = scrape(&primary);
    while primary_scrape
        .all("etcd_network_peer_round_trip_time_seconds_count")
        .iter()
        .all(|s| s.value == 0.0)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        primary_scrape = scrape(&primary);
    }
    let (follower, _etcd, _follower_process) = start_follower(dir.path());
    Observed {
        primary: primary_scrape,
        learner: scrape(&learner),
        drill: Scrape::parse(&std::fs::read_to_string(&metrics_file).expect("drill metrics")),
        follower: scrape(&follower),
        primary_instance: primary,
        learner_instance: learner,
        follower_instance: follower,
    }
}

/// A real etcd and a Tern follower of it, in step; the follower's client
/// address.
fn start_follower(dir: &Path) -> (String, Etcd, KilledOnDrop) {
    let etcd = Etcd::start();
    let out = etcdctl(&etcd.endpoint, &["put", "followed", "yes"], None);
    assert_eq!(out.code, 0, "{out:?}");
    let (client, peer) = (free_port(), free_port());
    let args: Vec<String> = [
        "--name".to_string(),
        "dr".into(),
        "--data-dir".into(),
        dir.join("follower").display().to_string(),
        "--listen-client-urls".into(),
        format!("http://127.0.0.1:{client}"),
        "--advertise-client-urls".into(),
        format!("http://127.0.0.1:{client}"),
        "--listen-peer-urls".into(),
        format!("http://127.0.0.1:{peer}"),
        "--initial-advertise-peer-urls".into(),
        format!("http://127.0.0.1:{peer}"),
        "--etcd-endpoints".into(),
        format!("http://{}", etcd.endpoint),
    ]
    .to_vec();
    let (child, follower) = spawn_member("tern-learner", &args);
    let want = current_revision(&etcd.endpoint);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while current_revision(&follower) < want {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower did not catch up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (follower, etcd, KilledOnDrop(child))
}

struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Labels = Vec<(String, String)>;

/// A promtool unit test: input series over minutes, and at some minutes
/// the set of firing alerts of one name, with their labels.
struct Case {
    what: &'static str,
    series: Vec<(String, String)>,
    /// (minute, alert name, the label sets firing then).
    checks: Vec<(u32, &'static str, Vec<Labels>)>,
}

impl Case {
    fn new(what: &'static str) -> Case {
        Case {
            what,
            series: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// A series `name{labels}` with promtool's `values` notation.
    fn series(mut self, name: &str, labels: &[(String, String)], values: String) -> Case {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.series
            .push((format!("{name}{{{}}}", labels.join(",")), values));
        self
    }

    /// At minute `at`, exactly these alerts named `alert` fire (none if
    /// `firing` is empty); each is its series' labels plus `severity`.
    fn expect(mut self, at: u32, alert: &'static str, firing: Vec<Vec<(String, String)>>) -> Case {
        self.checks.push((at, alert, firing));
        self
    }

    fn yaml(&self, out: &mut String) {
        let _ = writeln!(out, "  # {}", self.what);
        let _ = writeln!(out, "  - interval: 1m\n    input_series:");
        for (series, values) in &self.series {
            let _ = writeln!(
                out,
                "      - series: '{series}'\n        values: '{values}'"
            );
        }
        let _ = writeln!(out, "    promql_expr_test:");
        for (at, alert, firing) in &self.checks {
            let _ = writeln!(
                out,
                "      - expr: 'ALERTS{{alertname=\"{alert}\",alertstate=\"firing\"}}'\n        eval_time: {at}m"
            );
            if firing.is_empty() {
                let _ = writeln!(out, "        exp_samples: []");
                continue;
            }
            let _ = writeln!(out, "        exp_samples:");
            for labels in firing {
                let mut all = vec![
                    ("alertname".to_string(), alert.to_string()),
                    ("alertstate".to_string(), "firing".to_string()),
                ];
                all.extend(labels.iter().cloned());
                let text: Vec<String> = all.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                let _ = writeln!(
                    out,
                    "          - labels: 'ALERTS{{{}}}'\n            value: 1",
                    text.join(",")
                );
            }
        }
    }
}

fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with(base: &[(String, String)], more: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = base.to_vec();
    v.extend(l(more));
    v
}

/// Series for a histogram's buckets (real bounds, real starting counts)
/// that each minute gain `per_minute` observations of each value.
fn histogram(
    case: Case,
    name: &str,
    base: &[(String, String)],
    buckets: &[(String, f64, f64)],
    per_minute: &[(f64, u32)],
    minutes: u32,
) -> Case {
    let mut case = case;
    for (le, bound, start) in buckets {
        let gain: u32 = per_minute
            .iter()
            .filter(|(v, _)| v <= bound)
            .map(|(_, n)| n)
            .sum();
        case = case.series(
            &format!("{name}_bucket"),
            &with(base, &[("le", le)]),
            format!("{start}+{gain}x{minutes}"),
        );
    }
    case
}

fn cases(o: &Observed) -> Vec<Case> {
    let p = &o.primary;
    let member = l(&[("job", "tern"), ("instance", &o.primary_instance)]);
    let learner = l(&[("job", "tern-learner"), ("instance", &o.learner_instance)]);
    let firing =
        |labels: &[(String, String)], severity: &str| with(labels, &[("severity", severity)]);
    let value = |s: &Scrape, name: &str| s.one(name).value;
    let mut cases = Vec::new();

    // etcdNoLeader: the member loses its leader for good.
    let has_leader = value(p, "etcd_server_has_leader");
    assert_eq!(has_leader, 1.0, "the primary leads");
    cases.push(
        Case::new("etcdNoLeader")
            .series(
                "etcd_server_has_leader",
                &member,
                format!("{has_leader}x5 0x10"),
            )
            .expect(5, "etcdNoLeader", vec![])
            .expect(10, "etcdNoLeader", vec![firing(&member, "critical")]),
    );

    // etcdHighNumberOfLeaderChanges: four elections in a few minutes fire;
    // two do not.
    let changes = value(p, "etcd_server_leader_changes_seen_total");
    let job = l(&[("job", "tern")]);
    let c = changes;
    cases.push(
        Case::new("etcdHighNumberOfLeaderChanges: 4 changes")
            .series(
                "etcd_server_leader_changes_seen_total",
                &member,
                format!("{c}x5 {} {} {} {}x15", c + 1.0, c + 2.0, c + 3.0, c + 4.0),
            )
            .expect(
                16,
                "etcdHighNumberOfLeaderChanges",
                vec![firing(&job, "warning")],
            ),
    );
    cases.push(
        Case::new("etcdHighNumberOfLeaderChanges: 2 changes")
            .series(
                "etcd_server_leader_changes_seen_total",
                &member,
                format!("{c}x5 {} {}x15", c + 1.0, c + 2.0),
            )
            .expect(16, "etcdHighNumberOfLeaderChanges", vec![]),
    );

    // etcdMembersDown: a peer's `up` goes to 0 for 10 minutes; the real
    // peer label (the learner's id, as the leader reports it) rides along.
    let to = label(p.one("etcd_network_peer_sent_failures_total"), "To").to_string();
    let failures = with(&member, &[("To", &to)]);
    let other = l(&[("job", "tern"), ("instance", "127.0.0.2:2379")]);
    cases.push(
        Case::new("etcdMembersDown: a member down")
            .series("up", &member, "1x20".into())
            .series("up", &other, "1x2 0x18".into())
            .series(
                "etcd_network_peer_sent_failures_total",
                &failures,
                "0+600x20".into(),
            )
            .expect(8, "etcdMembersDown", vec![])
            .expect(15, "etcdMembersDown", vec![firing(&job, "critical")]),
    );
    cases.push(
        Case::new("etcdMembersDown: all up")
            .series("up", &member, "1x20".into())
            .series("up", &other, "1x20".into())
            .series(
                "etcd_network_peer_sent_failures_total",
                &failures,
                "0x20".into(),
            )
            .expect(15, "etcdMembersDown", vec![]),
    );

    // etcdHighFsyncDurations: p99 of the WAL fsync from Tern's buckets.
    let fsync = p.buckets("etcd_disk_wal_fsync_duration_seconds", &[]);
    let name = "etcd_disk_wal_fsync_duration_seconds";
    for (what, observations, warning, critical) in [
        (
            "etcdHighFsyncDurations: fast disk",
            vec![(0.0002, 1000)],
            false,
            false,
        ),
        (
            "etcdHighFsyncDurations: p99 between 0.5 s and 1 s",
            vec![(0.3, 980), (0.7, 20)],
            true,
            false,
        ),
        (
            "etcdHighFsyncDurations: p99 above 1 s",
            vec![(0.7, 100), (3.0, 100)],
            true,
            true,
        ),
    ] {
        let mut expected = Vec::new();
        if warning {
            expected.push(firing(&member, "warning"));
        }
        if critical {
            expected.push(firing(&member, "critical"));
        }
        let case = histogram(Case::new(what), name, &member, &fsync, &observations, 25);
        cases.push(case.expect(22, "etcdHighFsyncDurations", expected));
    }

    // etcdHighCommitDurations: the backend commit, threshold 0.25 s.
    let commit = p.buckets("etcd_disk_backend_commit_duration_seconds", &[]);
    let name = "etcd_disk_backend_commit_duration_seconds";
    let slow = histogram(
        Case::new("etcdHighCommitDurations: slow commits"),
        name,
        &member,
        &commit,
        &[(0.4, 100)],
        25,
    );
    cases.push(slow.expect(
        22,
        "etcdHighCommitDurations",
        vec![firing(&member, "warning")],
    ));
    let fast = histogram(
        Case::new("etcdHighCommitDurations: fast commits"),
        name,
        &member,
        &commit,
        &[(0.003, 100)],
        25,
    );
    cases.push(fast.expect(22, "etcdHighCommitDurations", vec![]));

    // etcdDatabaseQuotaLowSpace: the real size against the real quota is
    // silent; 97% of the quota fires.
    let size = value(p, "etcd_mvcc_db_total_size_in_bytes");
    let quota = value(p, "etcd_server_quota_backend_bytes");
    assert_eq!(quota, 2147483648.0, "the default quota is etcd's 2 GiB");
    for (what, bytes, expected) in [
        ("etcdDatabaseQuotaLowSpace: real size", size, vec![]),
        (
            "etcdDatabaseQuotaLowSpace: 97% of the quota",
            (quota * 0.97).round(),
            vec![firing(&member, "critical")],
        ),
    ] {
        cases.push(
            Case::new(what)
                .series(
                    "etcd_mvcc_db_total_size_in_bytes",
                    &member,
                    format!("{bytes}x20"),
                )
                .series(
                    "etcd_server_quota_backend_bytes",
                    &member,
                    format!("{quota}x20"),
                )
                .expect(16, "etcdDatabaseQuotaLowSpace", expected),
        );
    }

    // etcdHighNumberOfFailedGRPCRequests: 10% of Range failing with
    // Unavailable fires both severities; OK answers alone fire nothing.
    let range = |code: &str| {
        let s = p
            .all("grpc_server_handled_total")
            .into_iter()
            .find(|s| label(s, "grpc_method") == "Range" && label(s, "grpc_code") == code)
            .unwrap_or_else(|| panic!("Range with code {code} in the scrape"));
        (
            with(
                &member,
                &[
                    ("grpc_type", label(s, "grpc_type")),
                    ("grpc_service", label(s, "grpc_service")),
                    ("grpc_method", "Range"),
                    ("grpc_code", code),
                ],
            ),
            s.value,
        )
    };
    let (ok, ok_start) = range("OK");
    let (unavailable, unavailable_start) = range("Unavailable");
    let method = with(
        &member,
        &[
            ("grpc_service", "etcdserverpb.KV"),
            ("grpc_method", "Range"),
        ],
    );
    cases.push(
        Case::new("etcdHighNumberOfFailedGRPCRequests: 10% failing")
            .series(
                "grpc_server_handled_total",
                &ok,
                format!("{ok_start}+900x25"),
            )
            .series(
                "grpc_server_handled_total",
                &unavailable,
                format!("{unavailable_start}+100x25"),
            )
            .expect(
                22,
                "etcdHighNumberOfFailedGRPCRequests",
                vec![firing(&method, "warning"), firing(&method, "critical")],
            ),
    );
    cases.push(
        Case::new("etcdHighNumberOfFailedGRPCRequests: none failing")
            .series(
                "grpc_server_handled_total",
                &ok,
                format!("{ok_start}+900x25"),
            )
            .series(
                "grpc_server_handled_total",
                &unavailable,
                format!("{unavailable_start}x25"),
            )
            .expect(22, "etcdHighNumberOfFailedGRPCRequests", vec![]),
    );

    // etcdMemberCommunicationSlow: the leader's probes to its peer, with
    // etcd's round-trip buckets.
    let rtt = p.buckets("etcd_network_peer_round_trip_time_seconds", &[("To", &to)]);
    let name = "etcd_network_peer_round_trip_time_seconds";
    let slow = histogram(
        Case::new("etcdMemberCommunicationSlow: 200 ms round trips"),
        name,
        &failures,
        &rtt,
        &[(0.2, 12)],
        25,
    );
    cases.push(slow.expect(
        22,
        "etcdMemberCommunicationSlow",
        vec![firing(&failures, "warning")],
    ));
    let fast = histogram(
        Case::new("etcdMemberCommunicationSlow: loopback"),
        name,
        &failures,
        &rtt,
        &[(0.0003, 12)],
        25,
    );
    cases.push(fast.expect(22, "etcdMemberCommunicationSlow", vec![]));

    // TernReplicationLagHigh: the learner cut off, its lag growing a
    // minute a minute, from the real (caught-up) value.
    let lag = value(&o.learner, "tern_replication_lag_seconds");
    assert_eq!(lag, 0.0, "the learner is caught up");
    cases.push(
        Case::new("TernReplicationLagHigh: cut off")
            .series(
                "tern_replication_lag_seconds",
                &learner,
                format!("{lag}+60x20"),
            )
            .expect(4, "TernReplicationLagHigh", vec![])
            .expect(
                9,
                "TernReplicationLagHigh",
                vec![firing(&learner, "warning")],
            )
            .expect(
                18,
                "TernReplicationLagHigh",
                vec![firing(&learner, "warning"), firing(&learner, "critical")],
            ),
    );
    cases.push(
        Case::new("TernReplicationLagHigh: in step")
            .series(
                "tern_replication_lag_seconds",
                &learner,
                format!("{lag}x20"),
            )
            .expect(18, "TernReplicationLagHigh", vec![]),
    );
    let entries = value(&o.learner, "tern_replication_lag_entries");
    cases.push(
        Case::new("TernReplicationBacklogHigh")
            .series(
                "tern_replication_lag_entries",
                &learner,
                format!("{entries}+2000x20"),
            )
            .expect(4, "TernReplicationBacklogHigh", vec![])
            .expect(
                18,
                "TernReplicationBacklogHigh",
                vec![firing(&learner, "warning")],
            ),
    );

    // TernBackupTooOld. promtool's clock starts at 0: the learner starts
    // at 0 and backs up at 10 min (a real scrape has a success time).
    assert!(value(&o.learner, "tern_backup_last_success_timestamp_seconds") > 0.0);
    assert!(value(&o.learner, "process_start_time_seconds") > 0.0);
    cases.push(
        Case::new("TernBackupTooOld: the last backup is 3 h old")
            .series("process_start_time_seconds", &learner, "0x200".into())
            .series(
                "tern_backup_last_success_timestamp_seconds",
                &learner,
                "0x9 600x190".into(),
            )
            .expect(120, "TernBackupTooOld", vec![])
            .expect(180, "TernBackupTooOld", vec![firing(&learner, "critical")]),
    );
    cases.push(
        Case::new("TernBackupTooOld: hourly backups")
            .series("process_start_time_seconds", &learner, "0x200".into())
            .series(
                "tern_backup_last_success_timestamp_seconds",
                &learner,
                "0x59 3600x59 7200x59 10800x20".into(),
            )
            .expect(180, "TernBackupTooOld", vec![]),
    );
    cases.push(
        Case::new("TernBackupTooOld: restarted an hour ago, none since")
            .series(
                "process_start_time_seconds",
                &learner,
                "0x130 7800x70".into(),
            )
            .series(
                "tern_backup_last_success_timestamp_seconds",
                &learner,
                "0x59 3600x70 0x70".into(),
            )
            .expect(190, "TernBackupTooOld", vec![]),
    );
    // TernBackupFailing, with the reason label the learner uses.
    let failed = with(&learner, &[("reason", "upload")]);
    cases.push(
        Case::new("TernBackupFailing")
            .series("tern_backup_failed_total", &failed, "0x10 1x50".into())
            .expect(5, "TernBackupFailing", vec![])
            .expect(30, "TernBackupFailing", vec![firing(&failed, "warning")]),
    );

    // Drills, from the real textfile: the real run passes; a failed run
    // and a slow one fire.
    let drill = l(&[("job", "node"), ("instance", "drill-host:9100")]);
    let d = |name: &str| value(&o.drill, name);
    assert_eq!(d("tern_drill_success"), 1.0);
    let (rto, rpo) = (d("tern_drill_rto_seconds"), d("tern_drill_rpo_seconds"));
    cases.push(
        Case::new("drills: the real one")
            .series("tern_drill_success", &drill, "1x10".into())
            .series("tern_drill_rto_seconds", &drill, format!("{rto}x10"))
            .series("tern_drill_rpo_seconds", &drill, format!("{rpo}x10"))
            .expect(5, "TernRestoreDrillFailed", vec![])
            .expect(5, "TernRestoreDrillRTOHigh", vec![])
            .expect(5, "TernRestoreDrillRPOHigh", vec![]),
    );
    cases.push(
        Case::new("drills: a failed and slow one")
            .series("tern_drill_success", &drill, "1x3 0x7".into())
            .series("tern_drill_rto_seconds", &drill, format!("{rto}x3 1800x7"))
            .expect(2, "TernRestoreDrillFailed", vec![])
            .expect(
                5,
                "TernRestoreDrillFailed",
                vec![firing(&drill, "critical")],
            )
            .expect(
                5,
                "TernRestoreDrillRTOHigh",
                vec![firing(&drill, "warning")],
            ),
    );
    // A follower of an etcd: a source it refuses to apply (another
    // cluster, or rewound history) is critical at once; a follower behind
    // for long, a warning.
    let follower = l(&[("job", "tern-follower"), ("instance", &o.follower_instance)]);
    let diverged = value(&o.follower, "tern_follow_source_diverged");
    assert_eq!(diverged, 0.0, "the follower applies its source");
    cases.push(
        Case::new("TernFollowerSourceDiverged")
            .series(
                "tern_follow_source_diverged",
                &follower,
                format!("{diverged}x5 1x10"),
            )
            .expect(5, "TernFollowerSourceDiverged", vec![])
            .expect(
                8,
                "TernFollowerSourceDiverged",
                vec![firing(&follower, "critical")],
            ),
    );
    let lag = value(&o.follower, "tern_follow_lag_seconds");
    assert_eq!(lag, 0.0, "the follower is in step");
    cases.push(
        Case::new("TernFollowerLagHigh")
            .series(
                "tern_follow_lag_seconds",
                &follower,
                format!("{lag}x5 90x15"),
            )
            .expect(8, "TernFollowerLagHigh", vec![])
            .expect(
                12,
                "TernFollowerLagHigh",
                vec![firing(&follower, "warning")],
            ),
    );
    cases
}

#[test]
fn etcd_and_tern_rules_evaluate_against_real_metrics() {
    let o = observe();
    let etcd_rules = repo().join("monitoring/etcd-alerts.yaml");
    let tern_rules = repo().join("monitoring/tern-alerts.yaml");
    let dashboard = repo().join("monitoring/grafana/tern.json");

    // Every metric the rules and the dashboard use is exported. etcd's
    // rules run against the voting members; Tern's, and the dashboard,
    // against members, learners and the drill's textfile.
    let everything = o
        .primary
        .clone()
        .merge(o.learner.clone())
        .merge(o.drill.clone())
        .merge(o.follower.clone());
    // `up` is Prometheus's own; ALERTS its rule state.
    let synthetic = ["up", "ALERTS"];
    let mut missing = BTreeMap::new();
    for (file, exprs, scrape) in [
        ("etcd-alerts.yaml", rule_exprs(&etcd_rules), &o.primary),
        ("tern-alerts.yaml", rule_exprs(&tern_rules), &everything),
        (
            "grafana/tern.json",
            dashboard_exprs(&dashboard),
            &everything,
        ),
    ] {
        let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
        assert!(names.len() > 5, "{file}: {names:?}");
        for name in names {
            if !synthetic.contains(&name.as_str()) && !scrape.has(&name) {
                missing
                    .entry(file)
                    .or_insert_with(Vec::new)
                    .push(name.clone());
            }
        }
    }
    assert!(missing.is_empty(), "not exported: {missing:?}");

    let check = promtool(&[
        "check",
        "rules",
        etcd_rules.to_str().unwrap(),
        tern_rules.to_str().unwrap(),
    ]);
    assert!(check.status.success(), "{check:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut yaml = format!(
        "rule_files:\n  - {}\n  - {}\nevaluation_interval: 1m\ntests:\n",
        etcd_rules.display(),
        tern_rules.display()
    );
    let cases = cases(&o);
    for case in &cases {
        case.yaml(&mut yaml);
    }
    let tests = dir.path().join("rules.test.yaml");
    std::fs::write(&tests, &yaml).unwrap();
    let run = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "promtool test rules: {}\n{}\n--- generated tests ---\n{yaml}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(cases.len() >= 20);
}

#[test]
fn promql_names_are_told_from_functions_labels_and_keywords() {
    let names = metric_names(
        "max without (endpoint) (sum without (instance) (up{job=~\".*etcd.*|tern\"} == bool 0) \
         or count without (To) (rate(x_total{a=\"b\"}[2m]) > 0.01)) > 0 \
         and on (job, instance) time() - process_start_time_seconds > 2 * 3600 \
         unless histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval]))) > 1e3",
    );
    let expected: BTreeSet<String> = ["up", "x_total", "process_start_time_seconds", "h_bucket"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, expected);
    let s = parse_sample(r#"a_bucket{le="0.5",To="8e9e",q="x\"y"} 3"#);
    assert_eq!(s.name, "a_bucket");
    assert_eq!(s.labels[1], ("To".to_string(), "8e9e".to_string()));
    assert_eq!(s.labels[2].1, "x\"y");
    assert_eq!(s.value, 3.0);
}
