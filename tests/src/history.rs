//! Recording what concurrent etcd clients saw, for the
//! [linearizability checker](crate::linearizability).
//!
//! A [`Client`] is bound to one member and runs get (a Range), put (a Put
//! of a value no one else writes) and compare-and-set (a Txn: compare the
//! value, or creation for an absent key, then put) on one key at a time;
//! each call is written to a shared [`Recorder`] with its invocation and
//! completion times and its [`Outcome`]. A [`Workload`] runs several
//! clients at random for a while.
//!
//! # Classifying errors
//!
//! The checker is only as sound as the outcomes it is given. A write that
//! is recorded as failed when it may have been applied can make a correct
//! store look broken, so [`classify`] calls a write failed only when the
//! error proves it never reached the log:
//!
//! * etcd's own refusals made before proposing, recognised by code *and*
//!   an `etcdserver:` message (invalid argument, failed precondition, out
//!   of range, not found, NOSPACE, the learner refusal, ...). A status of
//!   one of those codes made up by the client library (a response too large
//!   to decode, say) arrives after the server acted, so it does not count;
//! * a connection that could not be opened: nothing was sent.
//!
//! Everything else is unknown: a client-side timeout, a connection lost
//! mid-request, `etcdserver: request timed out` (the proposal may still
//! commit), `etcdserver: no leader` and `leader changed` (etcd and Tern
//! send these before proposing, but a client cannot check that, and calling
//! a failed write unknown only costs the search a little, while the
//! opposite mistake makes a correct store look broken), `server stopped`,
//! any Unavailable, Internal or Unknown. For reads the question does not arise: a read that failed in
//! any way saw nothing and the checker leaves it out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_primary::proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    request_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::linearizability::{Input, Operation, Outcome, Output, State, Value};
use crate::rng::Rng;

/// One clock for a whole run: the history, the nemesis log and the
/// watchers stamp times from the same start, so they line up.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Duration {
        self.0.elapsed()
    }

    /// `+12.345s`, for log lines.
    pub fn stamp(&self) -> String {
        format!("+{:.3}s", self.now().as_secs_f64())
    }
}

/// The history of a run, shared by all its clients.
pub struct Recorder {
    pub clock: Clock,
    ops: Mutex<Vec<Operation>>,
    /// Values are unique across the run, so a read names its write.
    values: AtomicU64,
}

impl Recorder {
    pub fn new(clock: Clock) -> Arc<Recorder> {
        Arc::new(Recorder {
            clock,
            ops: Mutex::new(Vec::new()),
            values: AtomicU64::new(1),
        })
    }

    fn fresh_value(&self) -> Value {
        self.values.fetch_add(1, Ordering::Relaxed)
    }

    fn record(&self, op: Operation) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Everything recorded so far.
    pub fn operations(&self) -> Vec<Operation> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A value read back that does not parse as one the workload wrote; no
/// write has it, so the checker reports the read.
pub const GARBAGE: Value = u64::MAX;

fn encode(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn decode(bytes: &[u8]) -> Value {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(GARBAGE)
}

/// Which outcome an error gives a write (see the module docs).
pub fn classify(status: &Status) -> Outcome {
    const REFUSED_BEFORE_PROPOSING: [Code; 9] = [
        Code::InvalidArgument,
        Code::FailedPrecondition,
        Code::OutOfRange,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::Unimplemented,
    ];
    // Unavailable is unknown except for these two, which etcd answers from
    // an interceptor before the request is looked at.
    const REFUSED_UNAVAILABLE: [&str; 2] = [
        "etcdserver: rpc not supported for learner",
        "etcdserver: not capable",
    ];
    let message = status.message();
    let from_etcd = message.starts_with("etcdserver: ");
    if from_etcd && REFUSED_BEFORE_PROPOSING.contains(&status.code()) {
        return Outcome::Failed;
    }
    if status.code() == Code::Unavailable && REFUSED_UNAVAILABLE.contains(&message) {
        return Outcome::Failed;
    }
    if never_connected(status) {
        return Outcome::Failed;
    }
    Outcome::Unknown
}

/// Whether the request failed because no connection could be opened, so
/// not a byte of it was sent. tonic reports that as Unavailable with the
/// connector's error ("tcp connect error", "Connection refused") in the
/// message or its source chain; a connection that broke mid-request says
/// something else ("connection reset", "broken pipe", "stream closed").
pub fn never_connected(status: &Status) -> bool {
    if status.code() != Code::Unavailable {
        return false;
    }
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text.contains("tcp connect error") || text.contains("Connection refused")
}

/// How reads are made: linearizable (etcd's default: a ReadIndex round
/// through the leader) or serializable (the member's local state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    Linearizable,
    Serializable,
}

/// A lazily connected channel to `endpoint` (`127.0.0.1:port`): it
/// reconnects by itself after the member restarts on the same port, and
/// creating it never fails while the member is down.
pub fn lazy_channel(endpoint: &str) -> Channel {
    Endpoint::from_shared(format!("http://{endpoint}"))
        .expect("endpoint uri")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// A client bound to one member that records everything it does.
pub struct Client {
    pub name: String,
    kv: KvClient<Channel>,
    reads: Reads,
    timeout: Duration,
    recorder: Arc<Recorder>,
}

impl Client {
    /// `timeout` bounds every request; past it the outcome is unknown.
    pub fn new(
        name: &str,
        endpoint: &str,
        reads: Reads,
        timeout: Duration,
        recorder: Arc<Recorder>,
    ) -> Client {
        Client {
            name: name.to_string(),
            kv: KvClient::new(lazy_channel(endpoint)),
            reads,
            timeout,
            recorder,
        }
    }

    pub async fn get(&mut self, key: &str) -> Outcome {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            serializable: self.reads == Reads::Serializable,
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        self.run(key, Input::Get, async move {
            let resp = kv.range(request).await?.into_inner();
            Ok(Output::Read(resp.kvs.first().map(|kv| decode(&kv.value))))
        })
        .await
    }

    /// Put a fresh value; returns it and the outcome.
    pub async fn put(&mut self, key: &str) -> (Value, Outcome) {
        let v = self.recorder.fresh_value();
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value: encode(v),
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        let outcome = self
            .run(key, Input::Put(v), async move {
                kv.put(request).await?;
                Ok(Output::Written)
            })
            .await;
        (v, outcome)
    }

    /// If the value is `expect` (`None`: the key is absent), put a fresh
    /// value, in one Txn; returns the value and the outcome.
    pub async fn cas(&mut self, key: &str, expect: State) -> (Value, Outcome) {
        let new = self.recorder.fresh_value();
        let k = key.as_bytes().to_vec();
        let compare = match expect {
            Some(v) => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::Value(encode(v))),
                ..Default::default()
            },
            None => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                ..Default::default()
            },
        };
        let request = TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: k,
                    value: encode(new),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        let mut kv = self.kv.clone();
        let outcome = self
            .run(key, Input::Cas { expect, new }, async move {
                let resp = kv.txn(request).await?.into_inner();
                Ok(Output::Swapped(resp.succeeded))
            })
            .await;
        (new, outcome)
    }

    async fn run(
        &mut self,
        key: &str,
        input: Input,
        request: impl std::future::Future<Output = Result<Output, Status>>,
    ) -> Outcome {
        let clock = self.recorder.clock;
        let call = clock.now();
        let result = tokio::time::timeout(self.timeout, request).await;
        let ret = clock.now();
        let (outcome, error) = match result {
            Ok(Ok(output)) => (Outcome::Ok(output), String::new()),
            Ok(Err(status)) => (
                classify(&status),
                format!("{:?}: {}", status.code(), status.message()),
            ),
            Err(_) => (
                Outcome::Unknown,
                format!("no answer within {:?}", self.timeout),
            ),
        };
        self.recorder.record(Operation {
            client: self.name.clone(),
            key: key.to_string(),
            input,
            call,
            ret,
            outcome,
            error,
        });
        outcome
    }
}

/// Random gets, puts and compare-and-sets from several clients, each bound
/// to one member, on a few keys at a time.
///
/// Keys rotate: the first `keys * ops_per_key` operations go to
/// `{prefix}00000/0 .. /{keys-1}`, the next as many to `{prefix}00001/...`,
/// and so on. The checker's search is exponential in the worst case in the
/// operations of one key (unknown writes stay open to the end), so no key
/// may collect thousands; rotating keeps each search small while faults
/// still land in the middle of every key's life.
#[derive(Clone, Debug)]
pub struct Workload {
    pub prefix: String,
    /// `(member name, client endpoint)`; clients are spread round robin.
    pub members: Vec<(String, String)>,
    pub clients: usize,
    /// `(member name, client endpoint)` of members that only read (a
    /// learner refuses writes), each with `reader_clients` clients of its
    /// own doing gets in `reads` mode.
    pub readers: Vec<(String, String)>,
    pub reader_clients: usize,
    pub keys: u64,
    pub ops_per_key: u64,
    pub reads: Reads,
    pub timeout: Duration,
}

impl Workload {
    /// Run for `duration`, recording into `recorder`; `seed` makes the
    /// choice of operations repeatable (timing, of course, is not).
    pub async fn run(&self, recorder: Arc<Recorder>, seed: u64, duration: Duration) {
        let issued = Arc::new(AtomicU64::new(0));
        let deadline = tokio::time::Instant::now() + duration;
        let mut tasks = Vec::new();
        let readers = self
            .readers
            .iter()
            .flat_map(|r| std::iter::repeat_n(r, self.reader_clients));
        let everyone = (0..self.clients)
            .map(|c| (&self.members[c % self.members.len()], false))
            .chain(readers.map(|r| (r, true)));
        for (c, ((member, endpoint), only_reads)) in everyone.enumerate() {
            let mut client = Client::new(
                &format!("c{c}@{member}"),
                endpoint,
                self.reads,
                self.timeout,
                recorder.clone(),
            );
            let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9e37_79b9));
            let issued = issued.clone();
            let w = self.clone();
            tasks.push(tokio::spawn(async move {
                // What this client last knew of each key, for its CAS.
                let mut known: HashMap<String, State> = HashMap::new();
                while tokio::time::Instant::now() < deadline {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    let epoch = n / (w.keys * w.ops_per_key);
                    let key = format!("{}{epoch:05}/{}", w.prefix, rng.below(w.keys));
                    let choice = if only_reads { 0 } else { rng.below(10) };
                    let outcome = match choice {
                        0..=4 => {
                            let o = client.get(&key).await;
                            if let Outcome::Ok(Output::Read(v)) = o {
                                known.insert(key.clone(), v);
                            }
                            o
                        }
                        5..=7 => {
                            let (v, o) = client.put(&key).await;
                            if let Outcome::Ok(_) = o {
                                known.insert(key.clone(), Some(v));
                            }
                            o
                        }
                        _ => {
                            let expect = known.get(&key).copied().flatten();
                            let (v, o) = client.cas(&key, expect).await;
                            if let Outcome::Ok(Output::Swapped(true)) = o {
                                known.insert(key.clone(), Some(v));
                            }
                            o
                        }
                    };
                    if !matches!(outcome, Outcome::Ok(_)) {
                        known.remove(&key);
                        // A member that is down refuses at once; do not
                        // spin on it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_refusals_are_failures_and_the_rest_unknown() {
        let failed = [
            Status::invalid_argument("etcdserver: key is not provided"),
            Status::failed_precondition("etcdserver: duplicate key given in txn request"),
            Status::resource_exhausted("etcdserver: mvcc: database space exceeded"),
            Status::unavailable("etcdserver: rpc not supported for learner"),
            Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
        ];
        for s in failed {
            assert_eq!(classify(&s), Outcome::Failed, "{s:?}");
        }
        let unknown = [
            Status::unavailable("etcdserver: request timed out"),
            Status::unavailable("etcdserver: no leader"),
            Status::unavailable("etcdserver: leader changed"),
            Status::unavailable("etcdserver: server stopped"),
            Status::unavailable("error reading a body from connection: connection reset"),
            Status::deadline_exceeded("Timeout expired"),
            Status::cancelled("operation was canceled"),
            Status::internal("h2 protocol error"),
            Status::unknown("transport error"),
            // The client library's own limit: the server has acted already.
            Status::out_of_range("Error, decoded message length too large"),
        ];
        for s in unknown {
            assert_eq!(classify(&s), Outcome::Unknown, "{s:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_failure() {
        // A port that was free a moment ago: nothing listens there.
        let port = crate::free_port();
        let recorder = Recorder::new(Clock::start());
        let mut client = Client::new(
            "c0",
            &format!("127.0.0.1:{port}"),
            Reads::Linearizable,
            Duration::from_secs(5),
            recorder.clone(),
        );
        let (_, outcome) = client.put("k").await;
        let op = &recorder.operations()[0];
        assert_eq!(outcome, Outcome::Failed, "{}", op.error);
    }

    #[test]
    fn values_round_trip_and_garbage_is_never_written() {
        assert_eq!(decode(&encode(42)), 42);
        assert_eq!(decode(b"not a number"), GARBAGE);
    }
}
