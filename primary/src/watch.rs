//! Watchers: live fan-out of applied events and replay of history.
//!
//! A watcher is *synced* when it has seen every published revision; the
//! Raft thread hands each applied batch's events to [`WatchHub::publish`],
//! which forwards them to synced watchers under the hub lock. A watcher
//! that starts in the past, or whose stream falls too far behind, is
//! *unsynced*: the sync task replays its events from `kv_history` until it
//! reaches the published revision, then marks it synced under the same lock.
//! Because publishing and that switch both happen under the lock, and the
//! state is committed before its events are published, no event is lost or
//! sent twice (etcd's synced/unsynced design).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::mvcc::{read, KeyRange, Reader};
use crate::proto::mvccpb::{event::EventType, Event};

/// Messages queued per stream before its watchers fall back to replay.
const STREAM_BACKLOG: usize = 1024;
/// Events read from history per replay step.
const REPLAY_BATCH: usize = 1000;
/// Most events one watcher's held answers merge into (etcd sends a watcher
/// that lags up to 1,000 revisions an answer).
const MERGED_EVENTS: usize = 1000;
/// Most key and value bytes one merged answer carries: far under the 4 MiB
/// most gRPC clients accept in a message by default.
const MERGED_BYTES: usize = 1 << 20;
/// Longest a held message waits for the stream's answer budget: what a
/// batch may add to an event's delivery, whatever the load (etcd retries
/// the watchers it could not send to every 10 ms).
pub const HOLD_AT_MOST: Duration = Duration::from_millis(10);
/// etcd's default progress notification interval.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

/// What the hub sends to a client's watch stream. `key` is the hub's key of
/// the watcher (0 for one never registered), so a stream that reused a
/// watch id drops messages still queued for the watcher it cancelled.
#[derive(Debug)]
pub enum WatchMessage {
    /// Events for one watcher; `revision` is the header revision.
    Events {
        key: u64,
        watch_id: i64,
        revision: i64,
        events: WatchEvents,
    },
    /// The watcher's start revision was compacted away; it is gone.
    Compacted {
        key: u64,
        watch_id: i64,
        compact_revision: i64,
    },
    /// The watcher was created (sent before any of its events).
    Created { watch_id: i64, revision: i64 },
    /// An answer of the stream itself (a cancel, a refusal, a progress
    /// reply), queued behind what the stream already has to send, so the
    /// client sees them in the order it asked (etcd's control stream).
    Reply(crate::proto::etcdserverpb::WatchResponse),
    /// A progress notification: nothing happened up to `revision`.
    Progress {
        key: u64,
        watch_id: i64,
        revision: i64,
    },
}

/// One watcher's events, shared with the other watchers that get them: the
/// Raft thread hands each watcher references under the hub lock, and the
/// watcher's stream copies them into its answer on its own task. With 100
/// watchers of a key, the copies of each event no longer hold up the next
/// apply.
#[derive(Debug, Clone)]
pub struct WatchEvents {
    events: Vec<Arc<Event>>,
    /// The watcher asked for each event's previous key-value.
    prev_kv: bool,
}

impl WatchEvents {
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().map(|e| &**e)
    }

    /// The key and value bytes the watcher's answer carries.
    fn bytes(&self) -> usize {
        let size = |kv: &Option<crate::proto::mvccpb::KeyValue>| {
            kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len())
        };
        self.events
            .iter()
            .map(|e| size(&e.kv) + if self.prev_kv { size(&e.prev_kv) } else { 0 })
            .sum()
    }

    /// The events as the watcher's answer carries them.
    pub fn into_events(self) -> Vec<Event> {
        self.events
            .into_iter()
            .map(|e| match Arc::try_unwrap(e) {
                Ok(mut e) => {
                    if !self.prev_kv {
                        e.prev_kv = None;
                    }
                    e
                }
                Err(shared) => Event {
                    r#type: shared.r#type,
                    kv: shared.kv.clone(),
                    prev_kv: if self.prev_kv {
                        shared.prev_kv.clone()
                    } else {
                        None
                    },
                },
            })
            .collect()
    }
}

/// A stream's end of the hub: where its watchers' messages go.
#[derive(Clone)]
pub struct StreamSink {
    tx: mpsc::UnboundedSender<WatchMessage>,
    queued: Arc<AtomicUsize>,
}

impl StreamSink {
    pub fn new() -> (Self, StreamSource) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            StreamSink {
                tx,
                queued: queued.clone(),
            },
            StreamSource {
                rx,
                queued,
                held: VecDeque::new(),
                open: HashMap::new(),
                popped: 0,
                notices: 0,
            },
        )
    }

    /// Queue one of the stream's own answers (see [`WatchMessage::Reply`]);
    /// false once the stream is gone.
    pub fn reply(&self, r: crate::proto::etcdserverpb::WatchResponse) -> bool {
        self.send(WatchMessage::Reply(r)).is_ok()
    }

    fn send(&self, m: WatchMessage) -> Result<(), ()> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(m).map_err(|_| ())
    }

    fn backlogged(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= STREAM_BACKLOG
    }
}

/// A message taken off a stream's channel and not sent yet.
struct Held {
    message: WatchMessage,
    /// How many of the hub's messages it carries (merged ones).
    carried: usize,
    since: Instant,
}

/// A stream's end of the hub. Messages taken off the channel are held
/// until the client can take another answer; while they wait, a watcher's
/// next events join its held ones, so a client that lags gets fewer,
/// larger answers rather than one per apply (as etcd batches the
/// revisions of a watcher that fell behind). Held messages count toward
/// the stream's backlog until they are popped, merged ones each, so a
/// stream falls back to replay after as much as before.
pub struct StreamSource {
    rx: mpsc::UnboundedReceiver<WatchMessage>,
    queued: Arc<AtomicUsize>,
    held: VecDeque<Held>,
    /// Hub key -> the watcher's last held `Events` (its position counted
    /// from the stream's first message) and the bytes it carries, while
    /// later events may still join it: no other kind of message was held
    /// after it, so merging reorders nothing a client could see.
    open: HashMap<u64, (usize, usize)>,
    /// Messages popped so far: `held[0]`'s position.
    popped: usize,
    /// Held messages that are not events.
    notices: usize,
}

impl StreamSource {
    /// The next message, held ones first.
    pub async fn recv(&mut self) -> Option<WatchMessage> {
        if let Some(m) = self.pop() {
            return Some(m);
        }
        let m = self.rx.recv().await;
        if m.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        m
    }

    /// Wait for the hub's next message and hold it; false once the hub
    /// dropped the stream. Cancel-safe.
    pub async fn hold_next(&mut self) -> bool {
        match self.rx.recv().await {
            Some(m) => {
                self.hold(m);
                true
            }
            None => false,
        }
    }

    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether what is held should go without waiting for a budget: a
    /// reply or notice (and the events before it), a message held for
    /// [`HOLD_AT_MOST`], or a backlog half way to the hub's fallback to
    /// replay, which costs more than answers.
    pub fn is_urgent(&self, now: Instant) -> bool {
        self.notices > 0
            || self.deadline().is_some_and(|d| d <= now)
            || self.queued.load(Ordering::Relaxed) >= STREAM_BACKLOG / 2
    }

    /// When the oldest held message has waited [`HOLD_AT_MOST`].
    pub fn deadline(&self) -> Option<Instant> {
        self.held.front().map(|h| h.since + HOLD_AT_MOST)
    }

    /// The oldest held message.
    pub fn pop(&mut self) -> Option<WatchMessage> {
        let Held {
            message: m,
            carried,
            ..
        } = self.held.pop_front()?;
        self.queued.fetch_sub(carried, Ordering::Relaxed);
        if let WatchMessage::Events { key, .. } = &m {
            if self.open.get(key).is_some_and(|(at, _)| *at == self.popped) {
                self.open.remove(key);
            }
        } else {
            self.notices -= 1;
        }
        self.popped += 1;
        Some(m)
    }

    fn hold(&mut self, m: WatchMessage) {
        let WatchMessage::Events {
            key,
            watch_id,
            revision,
            events,
        } = m
        else {
            // A reply or notice must follow every event held before it.
            self.open.clear();
            self.notices += 1;
            self.held.push_back(Held {
                message: m,
                carried: 1,
                since: Instant::now(),
            });
            return;
        };
        let bytes = events.bytes();
        if let Some((at, held_bytes)) = self.open.get_mut(&key) {
            if let Some(Held {
                message:
                    WatchMessage::Events {
                        revision: held_revision,
                        events: held,
                        ..
                    },
                carried,
                ..
            }) = self.held.get_mut(*at - self.popped)
            {
                if held.events.len() + events.events.len() <= MERGED_EVENTS
                    && *held_bytes + bytes <= MERGED_BYTES
                {
                    held.events.extend(events.events);
                    *held_revision = revision;
                    *held_bytes += bytes;
                    *carried += 1;
                    return;
                }
            }
        }
        self.open
            .insert(key, (self.popped + self.held.len(), bytes));
        self.held.push_back(Held {
            message: WatchMessage::Events {
                key,
                watch_id,
                revision,
                events,
            },
            carried: 1,
            since: Instant::now(),
        });
    }
}

/// What a client asked to watch.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub watch_id: i64,
    pub range: KeyRange,
    /// 0: from the next revision.
    pub start_revision: i64,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    pub progress_notify: bool,
}

struct Watcher {
    spec: WatchSpec,
    sink: StreamSink,
    next_rev: i64,
    synced: bool,
    last_sent: Instant,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        let key = e.kv.as_ref().map_or(&[][..], |kv| kv.key.as_slice());
        let is_put = e.r#type == EventType::Put as i32;
        let filtered = if is_put {
            self.spec.no_put
        } else {
            self.spec.no_delete
        };
        self.spec.range.contains(key) && !filtered
    }

    fn select<'a>(&self, events: impl IntoIterator<Item = &'a Arc<Event>>) -> Vec<Arc<Event>> {
        events
            .into_iter()
            .filter(|e| {
                self.wants(e)
                    && e.kv
                        .as_ref()
                        .is_some_and(|kv| kv.mod_revision >= self.next_rev)
            })
            .cloned()
            .collect()
    }

    fn events(&self, events: Vec<Arc<Event>>) -> WatchEvents {
        WatchEvents {
            events,
            prev_kv: self.spec.prev_kv,
        }
    }
}

/// The revision an event happened at.
fn event_revision(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

struct HubState {
    published: i64,
    /// The revision reads of the state file see (published events wait a
    /// few ms to be committed): history is replayed from the file up to
    /// here, and from `recent` after it, as etcd's replays read its
    /// backend's uncommitted buffer too.
    committed: i64,
    /// Every published event after revision `recent_from`, in order: those
    /// not committed yet, and those of the last commit (a replay that read
    /// the file just before a commit still finds what follows it here).
    recent: VecDeque<Arc<Event>>,
    recent_from: i64,
    compacted: i64,
    next_key: u64,
    watchers: HashMap<u64, Watcher>,
}

pub struct WatchHub {
    state: Mutex<HubState>,
    reader: Arc<Reader>,
    wake: Notify,
}

/// Refusal to create a watcher.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchError {
    Compacted(i64),
}

impl WatchHub {
    pub fn new(reader: Arc<Reader>, revision: i64, compacted: i64) -> Arc<Self> {
        Arc::new(WatchHub {
            state: Mutex::new(HubState {
                published: revision,
                committed: revision,
                recent: Default::default(),
                recent_from: revision,
                compacted,
                next_key: 1,
                watchers: HashMap::new(),
            }),
            reader,
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn published(&self) -> i64 {
        self.lock().published
    }

    /// Register a watcher; queues its `Created` message first. Returns the
    /// hub key used to cancel it.
    pub fn watch(&self, spec: WatchSpec, sink: StreamSink) -> Result<u64, WatchError> {
        let mut st = self.lock();
        // A start before etcd's first revision (a negative one too) is
        // compacted away.
        let first = crate::mvcc::write::compact_main_revision(st.compacted);
        if spec.start_revision != 0 && spec.start_revision < first {
            let _ = sink.send(WatchMessage::Created {
                watch_id: spec.watch_id,
                revision: st.published,
            });
            let _ = sink.send(WatchMessage::Compacted {
                key: 0,
                watch_id: spec.watch_id,
                compact_revision: first,
            });
            return Err(WatchError::Compacted(first));
        }
        let next_rev = if spec.start_revision == 0 {
            st.published + 1
        } else {
            // -1 on a store never compacted: all of its history.
            spec.start_revision.max(1)
        };
        let synced = next_rev > st.published;
        let _ = sink.send(WatchMessage::Created {
            watch_id: spec.watch_id,
            revision: st.published,
        });
        let key = st.next_key;
        st.next_key += 1;
        st.watchers.insert(
            key,
            Watcher {
                spec,
                sink,
                next_rev,
                synced,
                last_sent: Instant::now(),
            },
        );
        drop(st);
        if !synced {
            self.wake.notify_one();
        }
        Ok(key)
    }

    pub fn cancel(&self, key: u64) {
        self.lock().watchers.remove(&key);
    }

    /// Called by the Raft thread after a batch is applied: `events` are
    /// that batch's changes, `revision` the store revision after it.
    pub fn publish(&self, events: Vec<Event>, revision: i64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let start = st.recent.len();
        st.recent.extend(events.into_iter().map(Arc::new));
        let events = st.recent.range(start..);
        let mut fell_behind = false;
        st.watchers.retain(|key, w| {
            if !w.synced {
                return true;
            }
            let selected = w.select(events.clone());
            if selected.is_empty() {
                // Never backwards: a watcher may start in the future.
                w.next_rev = w.next_rev.max(revision + 1);
                return true;
            }
            if w.sink.backlogged() {
                w.synced = false;
                fell_behind = true;
                return true;
            }
            let sent = w.sink.send(WatchMessage::Events {
                key: *key,
                watch_id: w.spec.watch_id,
                revision,
                events: w.events(selected),
            });
            w.next_rev = revision + 1;
            w.last_sent = Instant::now();
            sent.is_ok()
        });
        st.published = revision;
        drop(guard);
        if fell_behind {
            self.wake.notify_one();
        }
    }

    /// The state file now holds everything up to `revision`: watchers
    /// waiting for it to replay can go on.
    pub fn committed(&self, revision: i64) {
        let mut st = self.lock();
        // Keep the last commit's events (see `HubState::recent`).
        let keep_after = st.committed;
        while st
            .recent
            .front()
            .is_some_and(|e| event_revision(e) <= keep_after)
        {
            st.recent.pop_front();
        }
        st.recent_from = st.recent_from.max(keep_after);
        st.committed = revision;
        let waiting = st.watchers.values().any(|w| !w.synced);
        drop(st);
        if waiting {
            self.wake.notify_one();
        }
    }

    pub fn set_compacted(&self, revision: i64) {
        self.lock().compacted = revision;
    }

    /// The state jumped to `revision` (a leader's snapshot replaced it):
    /// every watcher catches up from history, like etcd's watchers after a
    /// snapshot restore; one whose next revision is compacted gets the
    /// compacted answer.
    pub fn restored(&self, revision: i64) {
        let mut st = self.lock();
        for w in st.watchers.values_mut() {
            w.synced = false;
        }
        st.published = revision;
        st.committed = revision;
        st.recent.clear();
        st.recent_from = revision;
        drop(st);
        self.wake.notify_one();
    }

    /// Replays history to unsynced watchers and sends progress
    /// notifications; runs until the process ends.
    pub async fn run_sync(self: Arc<Self>) {
        let mut progress_due = Instant::now() + PROGRESS_INTERVAL;
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.wake.notified()).await;
            let more = match tokio::task::spawn_blocking({
                let hub = self.clone();
                move || hub.sync_step()
            })
            .await
            {
                Ok(Ok(more)) => more,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "watch replay failed");
                    false
                }
                Err(_) => false,
            };
            if more {
                self.wake.notify_one();
            }
            if Instant::now() >= progress_due {
                self.send_progress();
                progress_due = Instant::now() + PROGRESS_INTERVAL;
            }
        }
    }

    /// One replay round over every unsynced watcher; true if some still lag.
    fn sync_step(&self) -> Result<bool, crate::mvcc::MvccError> {
        let pending: Vec<(u64, WatchSpec, i64, i64)> = {
            let mut st = self.lock();
            let (published, compacted) = (st.published, st.compacted);
            let readable = published.min(st.committed);
            let mut out = Vec::new();
            st.watchers.retain(|key, w| {
                if w.synced || w.sink.backlogged() {
                    return true;
                }
                if w.next_rev < compacted {
                    let _ = w.sink.send(WatchMessage::Compacted {
                        key: *key,
                        watch_id: w.spec.watch_id,
                        compact_revision: compacted,
                    });
                    return false;
                }
                out.push((*key, w.spec.clone(), w.next_rev, readable));
                true
            });
            out
        };
        let mut lagging = false;
        for (key, spec, from, to) in pending {
            // The compaction check and the history read share one read
            // transaction: a compaction committed in between would
            // otherwise delete rows this replay then silently skips.
            let replay = self.reader.with(|conn| {
                let compacted = read::store_state(conn)?.compact_revision;
                if from < compacted {
                    return Ok(Err(compacted));
                }
                read::history(conn, &spec.range, from, to, REPLAY_BATCH, spec.prev_kv).map(Ok)
            })?;
            let mut guard = self.lock();
            let st = &mut *guard;
            let published = st.published;
            let Some(w) = st.watchers.get_mut(&key) else {
                continue;
            };
            if w.next_rev != from {
                continue;
            }
            let (events, reached) = match replay {
                Ok(found) => found,
                Err(compact_revision) => {
                    let _ = w.sink.send(WatchMessage::Compacted {
                        key,
                        watch_id: w.spec.watch_id,
                        compact_revision,
                    });
                    st.watchers.remove(&key);
                    continue;
                }
            };
            let mut selected: Vec<Arc<Event>> = events
                .into_iter()
                .filter(|e| w.wants(e))
                .map(Arc::new)
                .collect();
            let mut reached = reached.max(from - 1);
            // Read from the file up to its last commit: the rest is in
            // `recent`, unless a commit dropped part of it meanwhile.
            if reached >= to && st.recent_from <= reached {
                selected.extend(w.select(st.recent.iter().filter(|e| event_revision(e) > reached)));
                reached = published;
            }
            if !selected.is_empty() {
                let revision = selected
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .map_or(reached, |kv| kv.mod_revision);
                if w.sink
                    .send(WatchMessage::Events {
                        key,
                        watch_id: w.spec.watch_id,
                        revision: revision.max(reached),
                        events: w.events(selected),
                    })
                    .is_err()
                {
                    st.watchers.remove(&key);
                    continue;
                }
                w.last_sent = Instant::now();
            }
            w.next_rev = reached + 1;
            if w.next_rev > published {
                w.synced = true;
            } else {
                lagging = true;
            }
        }
        Ok(lagging)
    }

    fn send_progress(&self) {
        let st = self.lock();
        let now = Instant::now();
        for (key, w) in &st.watchers {
            if w.spec.progress_notify
                && w.synced
                && now.duration_since(w.last_sent) >= PROGRESS_INTERVAL
            {
                let _ = w.sink.send(WatchMessage::Progress {
                    key: *key,
                    watch_id: w.spec.watch_id,
                    revision: st.published,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::MvccStore;

    fn put(store: &mut MvccStore, index: u64, key: &[u8]) -> Batch {
        let mut batch = store.batch().expect("batch");
        batch
            .entry(index, 1, |b| Ok(b.put(key, b"v", 0)?))
            .expect("put");
        let events = batch.end().expect("end");
        Batch {
            events,
            revision: store.state().revision,
        }
    }

    struct Batch {
        events: Vec<Event>,
        revision: i64,
    }

    fn from_start(watch_id: i64, start_revision: i64) -> WatchSpec {
        WatchSpec {
            watch_id,
            range: KeyRange::new(b"k", b"\0"),
            start_revision,
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
        }
    }

    /// Revisions of the events of the first `Events` message, and its
    /// header revision.
    async fn first_events(source: &mut StreamSource) -> (Vec<i64>, i64) {
        loop {
            match source.recv().await.expect("a message") {
                WatchMessage::Events {
                    events, revision, ..
                } => return (events.iter().map(event_revision).collect(), revision),
                WatchMessage::Created { .. } => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// A replay reads the state file up to its last commit and the
    /// applied, published events after it from memory: one answer with
    /// every event, as etcd's, and the watcher is in step after it.
    #[tokio::test]
    async fn a_replay_covers_events_applied_but_not_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let mut store = MvccStore::open(&path).expect("open");
        let hub = WatchHub::new(
            Arc::new(Reader::new(&path)),
            store.state().revision,
            store.state().compact_revision,
        );
        for (index, key) in [(1, b"k1"), (2, b"k2")] {
            let b = put(&mut store, index, key);
            hub.publish(b.events, b.revision);
        }
        store.commit().expect("commit");
        hub.committed(store.committed().revision);
        for (index, key) in [(3, b"k3"), (4, b"k4")] {
            let b = put(&mut store, index, key);
            hub.publish(b.events, b.revision);
        }
        assert_eq!(store.committed().revision, 3);
        assert_eq!(store.state().revision, 5);

        // From the start: the file's two, then memory's two.
        let (sink, mut source) = StreamSink::new();
        hub.watch(from_start(1, 1), sink).expect("watch");
        // Inside the uncommitted part only: memory alone.
        let (sink, mut late) = StreamSink::new();
        hub.watch(from_start(2, 5), sink).expect("watch");
        assert!(!hub.sync_step().expect("sync"), "both in step at once");
        assert_eq!(first_events(&mut source).await, (vec![2, 3, 4, 5], 5));
        assert_eq!(first_events(&mut late).await, (vec![5], 5));

        // In step: the next event comes live.
        let b = put(&mut store, 5, b"k5");
        hub.publish(b.events, b.revision);
        assert_eq!(first_events(&mut source).await, (vec![6], 6));

        // A commit keeps its own events in memory a while (a replay that
        // read the file just before it), then lets them go.
        store.commit().expect("commit");
        hub.committed(6);
        assert_eq!(hub.lock().recent.len(), 3);
        hub.committed(6);
        assert!(hub.lock().recent.is_empty());
    }

    fn events_message(key: u64, revisions: &[i64], value_size: usize) -> WatchMessage {
        use crate::proto::mvccpb::KeyValue;
        let events = revisions
            .iter()
            .map(|&mod_revision| {
                Arc::new(Event {
                    r#type: EventType::Put as i32,
                    kv: Some(KeyValue {
                        key: b"k".to_vec(),
                        value: vec![b'v'; value_size],
                        mod_revision,
                        ..Default::default()
                    }),
                    prev_kv: None,
                })
            })
            .collect();
        WatchMessage::Events {
            key,
            watch_id: key as i64,
            revision: *revisions.last().expect("a revision"),
            events: WatchEvents {
                events,
                prev_kv: false,
            },
        }
    }

    /// A held message as (hub key, header revision, event revisions); a
    /// reply as key 0.
    fn shape(m: WatchMessage) -> (u64, i64, Vec<i64>) {
        match m {
            WatchMessage::Events {
                key,
                revision,
                events,
                ..
            } => (key, revision, events.iter().map(event_revision).collect()),
            WatchMessage::Reply(r) => (0, r.header.map_or(0, |h| h.revision), Vec::new()),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// While a stream cannot send, a watcher's next events join its held
    /// ones; a reply held after them is a fence: later events go behind
    /// it. Each message stays in the stream's backlog until it is sent.
    #[tokio::test]
    async fn held_events_merge_per_watcher_up_to_a_reply() {
        let (sink, mut source) = StreamSink::new();
        let reply = crate::proto::etcdserverpb::WatchResponse {
            header: Some(crate::proto::etcdserverpb::ResponseHeader {
                revision: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let sent = [
            events_message(1, &[2], 10),
            events_message(2, &[2], 10),
            events_message(1, &[3], 10),
            WatchMessage::Reply(reply),
            events_message(1, &[4], 10),
            events_message(2, &[5], 10),
            events_message(1, &[6], 10),
        ];
        let n = sent.len();
        for m in sent {
            sink.send(m).expect("open");
        }
        for _ in 0..n {
            assert!(source.hold_next().await);
        }
        let now = Instant::now();
        assert!(source.is_urgent(now));
        assert_eq!(source.queued.load(Ordering::Relaxed), n);
        let mut popped = Vec::new();
        while let Some(m) = source.pop() {
            popped.push(shape(m));
        }
        assert_eq!(
            popped,
            vec![
                (1, 3, vec![2, 3]),
                (2, 2, vec![2]),
                (0, 3, vec![]),
                (1, 6, vec![4, 6]),
                (2, 5, vec![5]),
            ]
        );
        assert!(!source.is_urgent(now));
        assert_eq!(source.queued.load(Ordering::Relaxed), 0);
    }

    /// Held events wait for the stream's budget at most HOLD_AT_MOST,
    /// counted from the oldest held message.
    #[tokio::test]
    async fn held_events_become_urgent_after_hold_at_most() {
        let (sink, mut source) = StreamSink::new();
        let before = Instant::now();
        sink.send(events_message(1, &[2], 10)).expect("open");
        sink.send(events_message(2, &[3], 10)).expect("open");
        assert!(source.hold_next().await && source.hold_next().await);
        let deadline = source.deadline().expect("a held message");
        assert!(deadline >= before + HOLD_AT_MOST);
        assert!(deadline <= Instant::now() + HOLD_AT_MOST);
        assert!(!source.is_urgent(deadline - Duration::from_micros(1)));
        assert!(source.is_urgent(deadline));
        source.pop();
        assert!(source.deadline().expect("one more") >= deadline);
        source.pop();
        assert_eq!(source.deadline(), None);
        assert!(!source.is_urgent(deadline + HOLD_AT_MOST));
    }

    /// A merged answer stays under MERGED_EVENTS events and MERGED_BYTES of
    /// keys and values; what does not fit starts the next one.
    #[tokio::test]
    async fn a_merged_answer_is_bounded() {
        let (sink, mut source) = StreamSink::new();
        for revision in 1..=MERGED_EVENTS as i64 + 1 {
            sink.send(events_message(1, &[revision], 1)).expect("open");
        }
        // Two fill an answer exactly: the key is one byte.
        let big = MERGED_BYTES / 2 - 1;
        for revision in [5000, 5001, 5002] {
            sink.send(events_message(2, &[revision], big))
                .expect("open");
        }
        for _ in 0..MERGED_EVENTS + 4 {
            assert!(source.hold_next().await);
        }
        let now = Instant::now();
        assert!(source.is_urgent(now), "a long backlog does not wait");
        let sizes: Vec<(u64, usize)> = std::iter::from_fn(|| source.pop())
            .map(shape)
            .map(|(key, _, revisions)| (key, revisions.len()))
            .collect();
        assert_eq!(sizes, vec![(1, MERGED_EVENTS), (1, 1), (2, 2), (2, 1)]);
    }

    /// Watchers share each event; each answer still carries the previous
    /// key-value only for a watcher that asked for it.
    #[test]
    fn shared_events_keep_prev_kv_only_when_asked() {
        use crate::proto::mvccpb::KeyValue;
        let kv = |value: &[u8], mod_revision| KeyValue {
            key: b"k".to_vec(),
            value: value.to_vec(),
            mod_revision,
            ..Default::default()
        };
        let event = Arc::new(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv(b"new", 3)),
            prev_kv: Some(kv(b"old", 2)),
        });
        let with = WatchEvents {
            events: vec![event.clone()],
            prev_kv: true,
        };
        let without = WatchEvents {
            events: vec![event.clone()],
            prev_kv: false,
        };
        let plain = without.into_events();
        assert_eq!(plain[0].kv, event.kv);
        assert_eq!(plain[0].prev_kv, None);
        // The last holder takes the event itself rather than a copy.
        drop(event);
        let full = with.into_events();
        assert_eq!(full[0].kv, Some(kv(b"new", 3)));
        assert_eq!(full[0].prev_kv, Some(kv(b"old", 2)));
    }
}
