//! The Watch service: one bidirectional stream carrying many watchers.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

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
        let (out, rx) = mpsc::channel(64);
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
        loop {
            tokio::select! {
                request = inbound.message(), if requests_open => match request {
                    Ok(Some(r)) => if !self.handle(r).await { break },
                    Ok(None) => requests_open = false,
                    Err(_) => break,
                },
                message = source.recv() => match message {
                    Some(m) => if !self.deliver(m).await { break },
                    None => break,
                },
                _ = self.out.closed() => break,
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

    async fn deliver(&mut self, message: WatchMessage) -> bool {
        match message {
            WatchMessage::Reply(response) => self.send(response).await,
            WatchMessage::Created { watch_id, revision } => {
                self.send(WatchResponse {
                    header: Some(self.member.header(revision)),
                    watch_id,
                    created: true,
                    ..Default::default()
                })
                .await
            }
            WatchMessage::Compacted {
                key,
                watch_id,
                compact_revision,
            } => {
                // The id stays taken until the client cancels it (etcd
                // answers that cancel); only the hub forgot the watcher.
                if key != 0 && !self.current(watch_id, key) {
                    return true;
                }
                // etcd's compaction notice carries no revision.
                self.send(WatchResponse {
                    header: Some(self.member.header_without_revision()),
                    watch_id,
                    compact_revision,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            WatchMessage::Progress {
                key,
                watch_id,
                revision,
            } => {
                if !self.current(watch_id, key) {
                    return true;
                }
                self.send(WatchResponse {
                    header: Some(self.member.header(revision)),
                    watch_id,
                    ..Default::default()
                })
                .await
            }
            WatchMessage::Events {
                key,
                watch_id,
                revision,
                events,
            } => {
                if !self.current(watch_id, key) {
                    return true;
                }
                let response = WatchResponse {
                    header: Some(self.member.header(revision)),
                    watch_id,
                    events: events.into_events(),
                    ..Default::default()
                };
                let limit = self.member.limits.max_request_bytes;
                if !self.fragment.contains(&watch_id) || response.encoded_len() <= limit {
                    return self.send(response).await;
                }
                for part in fragments(response, limit) {
                    if !self.send(part).await {
                        return false;
                    }
                }
                true
            }
        }
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
