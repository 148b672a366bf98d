//! Watchers that follow a key prefix across member failures, as a careful
//! etcd client does: when the stream breaks (the member was killed, say)
//! reconnect, to the next member in turn, with `start_revision` = the last
//! revision seen + 1. Whatever happens to the members, such a watcher must
//! see every event of the prefix exactly once, in revision order: the
//! test compares what each one saw with the store's own history, read
//! after the run by a watch from revision 1 ([`history`]).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tern_primary::mvcc::read::prefix_end;
use tern_primary::proto::etcdserverpb::{
    watch_client::WatchClient, watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
};
use tern_primary::proto::mvccpb::event::EventType;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::history::{lazy_channel, Clock};

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub revision: i64,
    pub key: String,
    pub deleted: bool,
    pub value: Vec<u8>,
}

/// What one watcher saw and did.
#[derive(Clone, Debug, Default)]
pub struct WatchLog {
    pub name: String,
    pub events: Vec<Event>,
    pub reconnects: usize,
    /// Timestamped reconnects.
    pub log: Vec<String>,
    /// Anything a correct server never causes: an event at or below a
    /// revision already seen, a cancel, a compaction, not catching up.
    pub problems: Vec<String>,
}

/// A watcher at work.
pub struct Watcher {
    handle: JoinHandle<WatchLog>,
    /// 0 while the run goes on; then the revision it must reach to stop.
    target: Arc<AtomicI64>,
}

/// If a stream is silent this long while the watcher is still short of its
/// target, it moves to the next member (the one it is on may be stuck).
const SILENT_SWITCH: Duration = Duration::from_secs(5);

/// Start a watcher on `prefix` (everything from revision 1), on
/// `members[first]`, moving on to the next member whenever a stream ends.
pub fn follow(
    name: &str,
    members: Vec<(String, String)>,
    first: usize,
    prefix: &str,
    clock: Clock,
) -> Watcher {
    let target = Arc::new(AtomicI64::new(0));
    let mut log = WatchLog {
        name: name.to_string(),
        ..WatchLog::default()
    };
    let key = prefix.as_bytes().to_vec();
    let range_end = prefix_end(&key);
    let handle = {
        let target = target.clone();
        tokio::spawn(async move {
            let mut next: i64 = 1;
            let mut m = first % members.len();
            loop {
                let (member, endpoint) = &members[m];
                let goal = target.load(Ordering::Relaxed);
                if goal > 0 && next > goal {
                    break;
                }
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let create = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: key.clone(),
                        range_end: range_end.clone(),
                        start_revision: next,
                        ..Default::default()
                    })),
                };
                let _ = tx.send(create).await;
                let mut client = WatchClient::new(lazy_channel(endpoint));
                let opened = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.watch(ReceiverStream::new(rx)),
                )
                .await;
                let why = match opened {
                    Ok(Ok(stream)) => {
                        let mut stream = stream.into_inner();
                        let mut silent = Duration::ZERO;
                        let tick = Duration::from_millis(250);
                        loop {
                            let goal = target.load(Ordering::Relaxed);
                            if goal > 0 && next > goal {
                                break "done".to_string();
                            }
                            if goal > 0 && silent >= SILENT_SWITCH {
                                break format!("silent for {SILENT_SWITCH:?}");
                            }
                            let msg = tokio::select! {
                                msg = stream.message() => msg,
                                _ = tokio::time::sleep(tick) => {
                                    silent += tick;
                                    continue;
                                }
                            };
                            silent = Duration::ZERO;
                            let resp = match msg {
                                Ok(Some(resp)) => resp,
                                Ok(None) => break "stream ended".to_string(),
                                Err(status) => {
                                    break format!("{:?}: {}", status.code(), status.message())
                                }
                            };
                            if resp.compact_revision > 0 {
                                log.problems.push(format!(
                                    "{member}: compacted at {}",
                                    resp.compact_revision
                                ));
                            }
                            if resp.canceled {
                                log.problems
                                    .push(format!("{member}: canceled: {}", resp.cancel_reason));
                                break "canceled".to_string();
                            }
                            let mut last_in_response = None;
                            for ev in resp.events {
                                let kv = ev.kv.unwrap_or_default();
                                let revision = kv.mod_revision;
                                // Events of one revision (a txn) come in one
                                // response; otherwise revisions only grow.
                                if revision < next && last_in_response != Some(revision) {
                                    log.problems.push(format!(
                                        "{member}: event at revision {revision} after {} \
                                         (duplicate or out of order)",
                                        next - 1
                                    ));
                                }
                                last_in_response = Some(revision);
                                next = next.max(revision + 1);
                                log.events.push(Event {
                                    revision,
                                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                                    deleted: ev.r#type == EventType::Delete as i32,
                                    value: kv.value,
                                });
                            }
                        }
                    }
                    Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                    Err(_) => "no stream within 2 s".to_string(),
                };
                if why == "done" {
                    break;
                }
                log.reconnects += 1;
                m = (m + 1) % members.len();
                log.log.push(format!(
                    "{} {}: stream on {member} ended ({why}); resuming at revision {next} on {}",
                    clock.stamp(),
                    log.name,
                    members[m].0
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            log
        })
    };
    Watcher { handle, target }
}

impl Watcher {
    /// Let the watcher stop once it has seen revision `upto`; wait at most
    /// `within` for that.
    pub async fn finish(self, upto: i64, within: Duration) -> WatchLog {
        self.target.store(upto.max(1), Ordering::Relaxed);
        let abort = self.handle.abort_handle();
        match tokio::time::timeout(within, self.handle).await {
            Ok(Ok(log)) => log,
            Ok(Err(e)) => panic!("watcher task failed: {e}"),
            Err(_) => {
                abort.abort();
                WatchLog {
                    problems: vec![format!("did not reach revision {upto} within {within:?}")],
                    ..WatchLog::default()
                }
            }
        }
    }
}

/// The events of `prefix` up to revision `upto`, as the member at
/// `endpoint` has them (a watch from revision 1).
pub async fn history(endpoint: &str, prefix: &str, upto: i64, clock: Clock) -> WatchLog {
    let members = vec![("reference".to_string(), endpoint.to_string())];
    follow("reference", members, 0, prefix, clock)
        .finish(upto, Duration::from_secs(30))
        .await
}

/// The first way in which `seen` differs from `reference`, if any.
pub fn compare(reference: &[Event], seen: &WatchLog) -> Result<(), String> {
    if !seen.problems.is_empty() {
        return Err(format!("{}: {}", seen.name, seen.problems.join("; ")));
    }
    for (i, (want, got)) in reference.iter().zip(&seen.events).enumerate() {
        if want != got {
            return Err(format!(
                "{}: event {i} is {got:?}, the store's history has {want:?}",
                seen.name
            ));
        }
    }
    if seen.events.len() != reference.len() {
        return Err(format!(
            "{}: saw {} events, the store's history has {}",
            seen.name,
            seen.events.len(),
            reference.len()
        ));
    }
    Ok(())
}
