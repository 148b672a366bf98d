//! The client gRPC metrics etcd exports through go-grpc-prometheus
//! (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds`, `grpc_server_msg_received_total`,
//! `grpc_server_msg_sent_total`) and etcd's own client traffic counters,
//! with the same labels: `grpc_type` (`unary`, `server_stream`,
//! `bidi_stream`), `grpc_service` (`etcdserverpb.KV`), `grpc_method`
//! (`Range`) and, when handled, `grpc_code` (`OK`, `Unavailable`, ...).
//!
//! A middleware ([`track`]) on the client listeners sees every call: the
//! path names the method; the status arrives either in the response
//! headers (a trailers-only answer: an error before any message) or in the
//! trailers at the end of the body, so the response body is wrapped to
//! catch them, and a stream the client drops before the end counts as
//! `Canceled`, as grpc-go reports it. Messages are counted by reading the
//! gRPC length prefixes as the bytes pass, never by decoding them.
//!
//! Like etcd (whose learner check runs outside the prometheus interceptor),
//! requests a learner refuses are not counted: the middleware sits inside
//! [`crate::api::learner_gate`]. Every served method is registered up
//! front with every code at zero, as go-grpc-prometheus does, so rates and
//! ratios exist before the first failure; each method's series are looked
//! up once, by path, in a map built then, so a call costs a few atomic
//! increments and takes no lock. The handling-time histogram is what etcd
//! exports with `--metrics extensive`, with the Go client's default
//! buckets.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Metrics;

const UNARY: &str = "unary";
const SERVER_STREAM: &str = "server_stream";
const BIDI_STREAM: &str = "bidi_stream";

/// Every RPC the client listeners serve: (service, method, grpc_type).
const METHODS: &[(&str, &str, &str)] = &[
    ("etcdserverpb.KV", "Range", UNARY),
    ("etcdserverpb.KV", "Put", UNARY),
    ("etcdserverpb.KV", "DeleteRange", UNARY),
    ("etcdserverpb.KV", "Txn", UNARY),
    ("etcdserverpb.KV", "Compact", UNARY),
    ("etcdserverpb.Watch", "Watch", BIDI_STREAM),
    ("etcdserverpb.Lease", "LeaseGrant", UNARY),
    ("etcdserverpb.Lease", "LeaseRevoke", UNARY),
    ("etcdserverpb.Lease", "LeaseKeepAlive", BIDI_STREAM),
    ("etcdserverpb.Lease", "LeaseTimeToLive", UNARY),
    ("etcdserverpb.Lease", "LeaseLeases", UNARY),
    ("etcdserverpb.Cluster", "MemberAdd", UNARY),
    ("etcdserverpb.Cluster", "MemberRemove", UNARY),
    ("etcdserverpb.Cluster", "MemberUpdate", UNARY),
    ("etcdserverpb.Cluster", "MemberList", UNARY),
    ("etcdserverpb.Cluster", "MemberPromote", UNARY),
    ("etcdserverpb.Maintenance", "Alarm", UNARY),
    ("etcdserverpb.Maintenance", "Status", UNARY),
    ("etcdserverpb.Maintenance", "Defragment", UNARY),
    ("etcdserverpb.Maintenance", "Hash", UNARY),
    ("etcdserverpb.Maintenance", "HashKV", UNARY),
    ("etcdserverpb.Maintenance", "Snapshot", SERVER_STREAM),
    ("etcdserverpb.Maintenance", "MoveLeader", UNARY),
];

/// gRPC status codes by number, named as grpc-go's `codes.Code.String()`.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `Canceled`'s number.
const CANCELED: usize = 1;
/// `Unknown`'s number.
const UNKNOWN: usize = 2;

/// The code a `grpc-status` header value stands for (`Unknown` if it is
/// not one).
fn code_of(status: &[u8]) -> usize {
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|n| *n < CODES.len())
        .unwrap_or(UNKNOWN)
}

/// `grpc_type`, `grpc_service`, `grpc_method`.
type MethodLabel = [(&'static str, &'static str); 3];
/// The same and `grpc_code`.
type HandledLabel = [(&'static str, &'static str); 4];

fn method_label(service: &'static str, method: &'static str, kind: &'static str) -> MethodLabel {
    [
        ("grpc_type", kind),
        ("grpc_service", service),
        ("grpc_method", method),
    ]
}

/// prometheus.DefBuckets of the Go client: 5 ms to 10 s.
fn handling_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

#[derive(Clone)]
pub struct GrpcMetrics {
    started: Family<MethodLabel, Counter>,
    handled: Family<HandledLabel, Counter>,
    handling: Family<MethodLabel, Histogram, fn() -> Histogram>,
    msg_received: Family<MethodLabel, Counter>,
    msg_sent: Family<MethodLabel, Counter>,
    client_received_bytes: Counter,
    client_sent_bytes: Counter,
    /// Each served method's series, by request path.
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
}

/// The series of one method (handles onto the families' children).
struct MethodMetrics {
    started: Counter,
    /// By code number.
    handled: Vec<Counter>,
    handling: Histogram,
    msg_received: Counter,
    msg_sent: Counter,
}

impl GrpcMetrics {
    pub fn new() -> Self {
        let started: Family<MethodLabel, Counter> = Family::default();
        let handled: Family<HandledLabel, Counter> = Family::default();
        let handling: Family<MethodLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(handling_histogram);
        let msg_received: Family<MethodLabel, Counter> = Family::default();
        let msg_sent: Family<MethodLabel, Counter> = Family::default();
        let methods = METHODS
            .iter()
            .map(|&(service, method, kind)| {
                let labels = method_label(service, method, kind);
                let series = MethodMetrics {
                    started: started.get_or_create_owned(&labels),
                    handled: CODES
                        .iter()
                        .map(|code| handled.get_or_create_owned(&handled_label(&labels, code)))
                        .collect(),
                    handling: handling.get_or_create_owned(&labels),
                    msg_received: msg_received.get_or_create_owned(&labels),
                    msg_sent: msg_sent.get_or_create_owned(&labels),
                };
                (format!("/{service}/{method}"), Arc::new(series))
            })
            .collect();
        GrpcMetrics {
            started,
            handled,
            handling,
            msg_received,
            msg_sent,
            client_received_bytes: Counter::default(),
            client_sent_bytes: Counter::default(),
            methods: Arc::new(methods),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            self.started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            self.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
            self.handling.clone(),
        );
        registry.register(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server",
            self.msg_received.clone(),
        );
        registry.register(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server",
            self.msg_sent.clone(),
        );
        registry.register(
            "etcd_network_client_grpc_received_bytes",
            "The total number of bytes received from grpc clients",
            self.client_received_bytes.clone(),
        );
        registry.register(
            "etcd_network_client_grpc_sent_bytes",
            "The total number of bytes sent to grpc clients",
            self.client_sent_bytes.clone(),
        );
    }
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn handled_label(labels: &MethodLabel, code: &'static str) -> HandledLabel {
    [labels[0], labels[1], labels[2], ("grpc_code", code)]
}

/// The middleware: count the call, its messages and bytes, and its outcome.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let grpc = &metrics.grpc;
    let Some(method) = grpc.methods.get(request.uri().path()).cloned() else {
        return next.run(request).await;
    };
    method.started.inc();
    let mut call = Call {
        method: method.clone(),
        started: Instant::now(),
        done: false,
    };
    let request = request.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: grpc.client_received_bytes.clone(),
            messages: method.msg_received.clone(),
            frames: MessageCounter::default(),
            call: None,
        })
    });
    let response = next.run(request).await;
    // A trailers-only response: the call ended before any message.
    if let Some(status) = response.headers().get("grpc-status") {
        call.finish(code_of(status.as_bytes()));
    }
    response.map(|body| {
        Body::new(Counted {
            inner: body,
            bytes: grpc.client_sent_bytes.clone(),
            messages: method.msg_sent.clone(),
            frames: MessageCounter::default(),
            call: Some(call),
        })
    })
}

/// One call in flight; counted as handled exactly once.
struct Call {
    method: Arc<MethodMetrics>,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: usize) {
        if self.done {
            return;
        }
        self.done = true;
        self.method.handled[code].inc();
        self.method
            .handling
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    /// The client went away before the status was sent.
    fn drop(&mut self) {
        self.finish(CANCELED);
    }
}

/// A request or response body passed through unchanged while its bytes,
/// messages and (for a response) final status are counted.
struct Counted {
    inner: Body,
    bytes: Counter,
    messages: Counter,
    frames: MessageCounter,
    call: Option<Call>,
}

impl Counted {
    fn saw(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.bytes.inc_by(data.len() as u64);
            let messages = self.frames.feed(data);
            if messages > 0 {
                self.messages.inc_by(messages);
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            if let Some(call) = &mut self.call {
                let code = trailers
                    .get("grpc-status")
                    .map_or(UNKNOWN, |s| code_of(s.as_bytes()));
                call.finish(code);
            }
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => self.saw(frame),
            // A response that ends without a status, or breaks.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(call) = &mut self.call {
                    call.finish(UNKNOWN);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts gRPC messages in a byte stream: each is a 1-byte flag and a
/// 4-byte big-endian length, then that many bytes; frames may split
/// anywhere.
#[derive(Default)]
struct MessageCounter {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
}

impl MessageCounter {
    /// Messages whose prefix completed in `data`.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut messages = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64);
                self.remaining -= take;
                data = &data[take as usize..];
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                messages += 1;
                self.header_len = 0;
                let len = [
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ];
                self.remaining = u64::from(u32::from_be_bytes(len));
            }
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn messages_are_counted_however_the_bytes_split() {
        let mut stream = message(3);
        stream.extend(message(0));
        stream.extend(message(300));
        for split in 0..stream.len() {
            let mut c = MessageCounter::default();
            let n = c.feed(&stream[..split]) + c.feed(&stream[split..]);
            assert_eq!(n, 3, "split at {split}");
        }
        let mut c = MessageCounter::default();
        let n: u64 = stream.iter().map(|b| c.feed(&[*b])).sum();
        assert_eq!(n, 3);
    }

    #[test]
    fn paths_and_codes_are_named_as_grpc_go_names_them() {
        let m = GrpcMetrics::new();
        assert!(m.methods.contains_key("/etcdserverpb.KV/Range"));
        assert!(m.methods.contains_key("/etcdserverpb.Watch/Watch"));
        assert!(!m.methods.contains_key("/etcdserverpb.Auth/Authenticate"));
        assert!(!m.methods.contains_key("/metrics"));
        assert_eq!(CODES[code_of(b"0")], "OK");
        assert_eq!(CODES[code_of(b"14")], "Unavailable");
        assert_eq!(CODES[code_of(b"99")], "Unknown");
        assert_eq!(CODES[CANCELED], "Canceled");
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(
            "grpc_server_handled_total{grpc_type=\"bidi_stream\",grpc_service=\"etcdserverpb.Watch\",grpc_method=\"Watch\",grpc_code=\"Unavailable\"} 0"
        ));
    }
}
