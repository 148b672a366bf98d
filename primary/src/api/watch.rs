//! The Watch service: one bidirectional stream carrying many watchers.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::EtcdError;
use crate::member::Member;
use crate::mvcc::KeyRange;
use crate::proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request, watch_server::Watch, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use crate::watch::{StreamSink, StreamSource, WatchMessage, WatchSpec};

pub struct WatchService {
    member: Arc<Member>,
}

impl WatchService {
    pub fn new(member: Arc<Member>) -> Self {
        WatchService { member }
    }
}

/// Answers of events a stream sends a second before it batches: beyond
/// this rate, events wait for budget (at most `watch::HOLD_AT_MOST`) and
/// a watcher's events merge into one answer meanwhile. etcd gets the same
/// effect by moving a watcher whose channel is full to its unsynced set,
/// replayed in batches every 10–100 ms. Measured with etcd's `benchmark watch` (100 watchers of one
/// key on 4 streams, 16 put clients): unbatched, Tern sent its 2 M events
/// in ~245 k answers and the client spent its CPU taking them (etcd sent
/// ~20 k). A stream under this rate, such as one watcher that sees every
/// put of a lone client, is never held.
const ANSWERS_PER_SECOND: f64 = 4000.0;
/// Answers of events a stream may send at once above that rate.
const ANSWER_BURST: f64 = 64.0;
/// Answers queued for tonic per stream; what cannot go waits in the
/// stream's source, where a watcher's events merge.
const OUT_QUEUE: usize = 4;

type Permit<'a> = mpsc::Permit<'a, Result<WatchResponse, Status>>;
type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let credentials = crate::member::Credentials::of(&request);
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let (sink, source) = StreamSink::new();
        let stream = ClientStream {
            member: self.member.clone(),
            sink,
            watchers: HashMap::new(),
            fragment: HashSet::new(),
            next_id: 0,
            out,
            credentials,
        };
        tokio::spawn(stream.run(inbound, source));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One client's watch stream: its watchers and the responses going out.
struct ClientStream {
    member: Arc<Member>,
    sink: StreamSink,
    /// watch id -> hub key.
    watchers: HashMap<i64, u64>,
    fragment: HashSet<i64>,
    next_id: i64,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    /// Who opened the stream: each create is authorized as them.
    credentials: crate::member::Credentials,
}

impl ClientStream {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>, mut source: StreamSource) {
        // As in etcd, a client that closes its side (the JSON gateway's
        // long POST once its body is read) keeps receiving events until
        // it goes away.
        let mut requests_open = true;
        let out = self.out.clone();
        let mut budget = AnswerBudget::new();
        // Set while held events wait for budget.
        let refill = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(refill);
        let mut waiting = false;
        loop {
            let now = Instant::now();
            if !waiting && source.is_holding() {
                if let Err(at) = budget.check(now) {
                    waiting = true;
                    // Wake for the budget, or for the oldest held message's
                    // deadline if that comes first (once passed, it is
                    // urgent and goes at once; no wake-up is needed for it).
                    let wake = match source.deadline() {
                        Some(deadline) if deadline > now => at.min(deadline),
                        _ => at,
                    };
                    refill.as_mut().reset(wake.into());
                }
            }
            let sendable = source.is_holding() && (!waiting || source.is_urgent(now));
            tokio::select! {
                () = &mut refill, if waiting => waiting = false,
                request = inbound.message(), if requests_open => match request {
                    Ok(Some(r)) => if !self.handle(r).await { break },
                    Ok(None) => requests_open = false,
                    Err(_) => break,
                },
                held = source.hold_next() => if !held { break },
                // What waits for budget or for the client to read is held,
                // and merged, in `source`.
                permit = out.reserve(), if sendable => match (permit, source.pop()) {
                    (Ok(permit), Some(m)) => {
                        if matches!(m, WatchMessage::Events { .. }) {
                            budget.spend();
                        }
                        if !self.deliver(m, permit).await { break }
                        // The next message's deadline is a new wake-up.
                        waiting = false;
                    }
                    _ => break,
                },
                _ = out.closed() => break,
            }
        }
        for key in self.watchers.values() {
            self.member.hub.cancel(*key);
        }
    }

    async fn send(&self, response: WatchResponse) -> bool {
        self.out.send(Ok(response)).await.is_ok()
    }

    /// Answer after whatever the stream already has queued (a watcher's
    /// `created`, say), as [`WatchMessage::Reply`].
    fn queue(&self, response: WatchResponse) -> bool {
        self.sink.reply(response)
    }

    async fn handle(&mut self, request: WatchRequest) -> bool {
        match request.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                if let Some(key) = self.watchers.remove(&c.watch_id) {
                    self.member.hub.cancel(key);
                    self.fragment.remove(&c.watch_id);
                    return self.queue(WatchResponse {
                        header: Some(self.member.header(0)),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    });
                }
                true
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                let revision = self.member.hub.published();
                self.queue(WatchResponse {
                    header: Some(self.member.header(revision)),
                    watch_id: -1,
                    ..Default::default()
                })
            }
            None => true,
        }
    }

    /// etcd's isWatchPermitted: read on the watched range. A refusal is
    /// the cancel reason etcd gives: the gRPC error's text.
    async fn permitted(&self, key: &[u8], range_end: &[u8]) -> Result<(), String> {
        let checked = match self.member.caller_untranslated(&self.credentials).await {
            Ok(who) => self.member.auth.check_range(who.as_ref(), key, range_end),
            Err(e) => Err(e),
        };
        checked.map_err(|e| {
            use crate::auth::AuthError::*;
            let (code, error) = match e {
                InvalidAuthToken => ("Unauthenticated", EtcdError::InvalidAuthToken),
                AuthOldRevision => ("InvalidArgument", EtcdError::AuthOldRevision),
                UserEmpty => ("InvalidArgument", EtcdError::UserEmpty),
                _ => ("PermissionDenied", EtcdError::PermissionDenied),
            };
            format!("rpc error: code = {code} desc = {}", error.message())
        })
    }

    /// etcd's answer to a watch it will not create: created and cancelled
    /// at once, with id -1 and the reason.
    fn refuse(&self, cancel_reason: String) -> bool {
        self.queue(WatchResponse {
            header: Some(self.member.header(0)),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason,
            ..Default::default()
        })
    }

    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        // etcd: an empty key means "\0", the smallest key.
        let key = if c.key.is_empty() {
            vec![0]
        } else {
            c.key.clone()
        };
        if let Err(cancel_reason) = self.permitted(&key, &c.range_end).await {
            return self.refuse(cancel_reason);
        }
        // etcd refuses a range that holds no key (its end at or before its
        // start; an end of "\0" means "from the key on"), before it looks
        // at the id.
        let from_key = c.range_end.is_empty() || c.range_end == [0];
        if !from_key && key.as_slice() >= c.range_end.as_slice() {
            return self.refuse("mvcc: watcher range is empty".into());
        }
        let watch_id = if c.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else {
            c.watch_id
        };
        if c.watch_id != 0 && self.watchers.contains_key(&watch_id) {
            return self.refuse("mvcc: duplicate watch ID provided on the WatchStream".into());
        }
        let spec = WatchSpec {
            watch_id,
            range: KeyRange::new(&key, &c.range_end),
            start_revision: c.start_revision,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
        };
        // A watcher cancelled at once for compaction keeps its id (hub key
        // 0: none) until the client cancels it, as in etcd.
        let key = self.member.hub.watch(spec, self.sink.clone()).unwrap_or(0);
        self.watchers.insert(watch_id, key);
        if c.fragment && key != 0 {
            self.fragment.insert(watch_id);
        }
        true
    }

    /// Whether `key` is still the watcher behind `watch_id` (not one that
    /// was cancelled and whose id was reused).
    fn current(&self, watch_id: i64, key: u64) -> bool {
        self.watchers.get(&watch_id) == Some(&key)
    }

    /// Send a message's answer, the first part on `permit`.
    async fn deliver(&self, message: WatchMessage, permit: Permit<'_>) -> bool {
        let mut answers = self.answers(message).into_iter();
        if let Some(first) = answers.next() {
            permit.send(Ok(first));
        }
        for rest in answers {
            if !self.send(rest).await {
                return false;
            }
        }
        true
    }

    /// What the client gets for a message: nothing for a watcher it has
    /// cancelled, several parts for a large one it asked to fragment.
    fn answers(&self, message: WatchMessage) -> Vec<WatchResponse> {
        match message {
            WatchMessage::Reply(response) => vec![response],
            WatchMessage::Created { watch_id, revision } => vec![WatchResponse {
                header: Some(self.member.header(revision)),
                watch_id,
                created: true,
                ..Default::default()
            }],
            WatchMessage::Compacted {
                key,
                watch_id,
                compact_revision,
            } => {
                // The id stays taken until the client cancels it (etcd
                // answers that cancel); only the hub forgot the watcher.
                if key != 0 && !self.current(watch_id, key) {
                    return Vec::new();
                }
                // etcd's compaction notice carries no revision.
                vec![WatchResponse {
                    header: Some(self.member.header_without_revision()),
                    watch_id,
                    compact_revision,
                    canceled: true,
                    ..Default::default()
                }]
            }
            WatchMessage::Progress {
                key,
                watch_id,
                revision,
            } => {
                if !self.current(watch_id, key) {
                    return Vec::new();
                }
                vec![WatchResponse {
                    header: Some(self.member.header(revision)),
                    watch_id,
                    ..Default::default()
                }]
            }
            WatchMessage::Events {
                key,
                watch_id,
                revision,
                events,
            } => {
                if !self.current(watch_id, key) {
                    return Vec::new();
                }
                let response = WatchResponse {
                    header: Some(self.member.header(revision)),
                    watch_id,
                    events: events.into_events(),
                    ..Default::default()
                };
                let limit = self.member.limits.max_request_bytes;
                if !self.fragment.contains(&watch_id) || response.encoded_len() <= limit {
                    return vec![response];
                }
                fragments(response, limit)
            }
        }
    }
}

/// A stream's budget of answers (a token bucket): ANSWERS_PER_SECOND,
/// up to ANSWER_BURST at once.
struct AnswerBudget {
    answers: f64,
    at: Instant,
}

impl AnswerBudget {
    fn new() -> Self {
        AnswerBudget {
            answers: ANSWER_BURST,
            at: Instant::now(),
        }
    }

    /// Ok if an answer may go now; otherwise when one may.
    fn check(&mut self, now: Instant) -> Result<(), Instant> {
        let earned = now.duration_since(self.at).as_secs_f64() * ANSWERS_PER_SECOND;
        self.answers = (self.answers + earned).min(ANSWER_BURST);
        self.at = now;
        if self.answers >= 1.0 {
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - self.answers) / ANSWERS_PER_SECOND))
        }
    }

    /// An answer went out. One that did not wait (pushed out by a reply,
    /// or by its deadline) may take the balance below zero, but never
    /// below a burst: a long busy spell must not hold the answers after it.
    fn spend(&mut self) {
        self.answers = (self.answers - 1.0).max(-ANSWER_BURST);
    }
}

/// Split a response into pieces under `limit` bytes (at least one event
/// each); every piece but the last has `fragment` set, as etcd does.
fn fragments(response: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    let mut parts = Vec::new();
    let mut current = WatchResponse {
        events: Vec::new(),
        ..response.clone()
    };
    for event in response.events {
        if !current.events.is_empty() && current.encoded_len() + event.encoded_len() + 8 > limit {
            let next = WatchResponse {
                events: Vec::new(),
                ..current.clone()
            };
            parts.push(std::mem::replace(&mut current, next));
        }
        current.events.push(event);
    }
    parts.push(current);
    let n = parts.len();
    for (i, p) in parts.iter_mut().enumerate() {
        p.fragment = i + 1 < n;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::{Event, KeyValue};

    /// A stream sends ANSWER_BURST answers at once, then one per
    /// 1 / ANSWERS_PER_SECOND; a reply that pushed answers out past the
    /// budget delays the next ones by as much.
    #[test]
    fn the_answer_budget_is_a_burst_then_a_rate() {
        let start = Instant::now();
        let mut budget = AnswerBudget::new();
        for _ in 0..ANSWER_BURST as usize {
            assert_eq!(budget.check(start), Ok(()));
            budget.spend();
        }
        let step = Duration::from_secs_f64(1.0 / ANSWERS_PER_SECOND);
        let next = budget.check(start).expect_err("the burst is spent");
        assert!(next.duration_since(start).abs_diff(step) < Duration::from_micros(1));
        assert_eq!(budget.check(next), Ok(()));
        budget.spend();
        budget.spend();
        let later = budget.check(next).expect_err("one answer past the budget");
        assert!(later.duration_since(next).abs_diff(2 * step) < Duration::from_micros(1));
        // Idle, it earns a burst again, and no more.
        let idle = next + Duration::from_secs(10);
        for _ in 0..ANSWER_BURST as usize {
            assert_eq!(budget.check(idle), Ok(()));
            budget.spend();
        }
        assert!(budget.check(idle).is_err());
        // Answers that did not wait owe at most a burst.
        for _ in 0..10 * ANSWER_BURST as usize {
            budget.spend();
        }
        let owed = budget.check(idle).expect_err("in debt");
        let most = Duration::from_secs_f64((1.0 + ANSWER_BURST) / ANSWERS_PER_SECOND);
        assert!(owed.duration_since(idle).abs_diff(most) < Duration::from_micros(1));
    }

    #[test]
    fn fragments_stay_under_the_limit_and_flag_all_but_the_last() {
        let events: Vec<Event> = (0..50)
            .map(|i| Event {
                kv: Some(KeyValue {
                    key: format!("k{i}").into_bytes(),
                    value: vec![b'v'; 100],
                    mod_revision: 7,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let response = WatchResponse {
            watch_id: 3,
            events: events.clone(),
            ..Default::default()
        };
        let parts = fragments(response, 1000);
        assert!(parts.len() > 1);
        assert!(parts
            .iter()
            .all(|p| p.encoded_len() <= 1000 && p.watch_id == 3));
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts[parts.len() - 1].fragment);
        let joined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(joined, events);
    }
}
