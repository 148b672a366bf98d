//! The workloads. Every function here talks gRPC only, so etcd and Tern get
//! byte-for-byte the same requests from the same client code.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tern_primary::proto::etcdserverpb::kv_client::KvClient;
use tern_primary::proto::etcdserverpb::watch_client::WatchClient;
use tern_primary::proto::etcdserverpb::{
    request_op, watch_request, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// Keys are one prefix byte and seven decimal digits: 8 bytes, as etcd's
/// benchmark uses by default, with room for 10 M distinct keys per prefix.
const KEY_DIGITS_MODULUS: u64 = 10_000_000;
/// Put benchmark keys.
const PUT_PREFIX: u8 = b'p';
/// Keys read by the get benchmarks.
const GET_PREFIX: u8 = b'g';
/// Keys written under the watched range.
const WATCH_PREFIX: u8 = b'w';
/// Keys written for the RSS measurement.
pub const RSS_PREFIX: u8 = b'r';
/// Keys written while measuring a learner's lag (the cluster section).
pub const LAG_PREFIX: u8 = b'l';
/// Keys of the data set the backup section backs up.
pub const BACKUP_PREFIX: u8 = b'b';
/// After this many failures in a row a client gives up: the server is most
/// likely gone, and spinning on instant errors would only burn the CPU the
/// other clients need.
const MAX_CONSECUTIVE_ERRORS: u32 = 10;
/// Latencies are recorded in microseconds, up to one minute.
const MAX_LATENCY_US: u64 = 60_000_000;

/// The 8-byte key number `n` under `prefix`.
pub fn key(prefix: u8, n: u64) -> Vec<u8> {
    format!("{}{:07}", prefix as char, n % KEY_DIGITS_MODULUS).into_bytes()
}

/// How long one step of a benchmark runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// Clients start requests until this much time has passed.
    Time(Duration),
    /// Clients together issue exactly this many requests.
    Requests(u64),
}

/// Knobs shared by all workloads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub budget: Budget,
    pub value_size: usize,
    /// Keys the put steps choose from at random (etcd's `benchmark put
    /// --key-space-size`); 0: every put writes a new key, in order.
    pub key_space: u64,
    /// A request that takes longer counts as an error, so a hung server
    /// cannot hang the benchmark.
    pub request_timeout: Duration,
}

/// A fixed set of gRPC connections that clients share round-robin.
///
/// One HTTP/2 connection per client would measure connection handling at
/// 256 clients; one connection for all would serialize on a single socket.
/// etcd's own benchmark tool shares a few connections among its clients, and
/// so does this.
pub struct Pool {
    channels: Vec<Channel>,
}

impl Pool {
    pub async fn connect(url: &str, connections: usize) -> Result<Pool> {
        Pool::connect_all(&[url.to_string()], connections).await
    }

    /// Connections to several servers (the members of a cluster), taken in
    /// turn: connection `i` goes to `urls[i % urls.len()]`. `connections`
    /// is rounded up to a multiple of `urls.len()`, so client `i`, which
    /// uses connection `i % connections`, talks to `urls[i % urls.len()]`
    /// and every server gets the same number of clients, give or take one.
    pub async fn connect_all(urls: &[String], connections: usize) -> Result<Pool> {
        anyhow::ensure!(!urls.is_empty(), "no endpoint to connect to");
        let endpoints = urls
            .iter()
            .map(|url| {
                Ok(Endpoint::from_shared(url.clone())
                    .with_context(|| format!("invalid endpoint {url}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5)))
            })
            .collect::<Result<Vec<_>>>()?;
        let count = connections.max(1).div_ceil(urls.len()) * urls.len();
        let mut channels = Vec::with_capacity(count);
        for i in 0..count {
            let (url, endpoint) = (&urls[i % urls.len()], &endpoints[i % urls.len()]);
            // Each `connect` opens its own TCP connection; clones of one
            // Channel would all share a single connection.
            channels.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            );
        }
        Ok(Pool { channels })
    }

    /// How many connections there are (more than asked for if
    /// [`Pool::connect_all`] rounded up).
    pub fn connections(&self) -> usize {
        self.channels.len()
    }

    fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i))
    }

    fn watch(&self, i: usize) -> WatchClient<Channel> {
        WatchClient::new(self.channel(i))
    }
}

/// What one step measured.
pub struct StepResult {
    /// Requests that succeeded.
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first request started to the last one finished.
    pub elapsed: Duration,
    /// Latency of successful requests, in microseconds.
    latency: Histogram<u64>,
}

impl StepResult {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile_ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Runs `clients` concurrent closed-loop clients: each issues `op` and waits
/// for the answer before the next, as etcd's benchmark does. `op` gets a
/// client on the client's connection and a sequence number unique within the
/// step (used to pick keys).
async fn run_clients<F, Fut>(
    pool: &Pool,
    clients: usize,
    budget: Budget,
    request_timeout: Duration,
    op: F,
) -> Result<StepResult>
where
    F: Fn(KvClient<Channel>, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let op = Arc::new(op);
    let next_seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = match budget {
        Budget::Time(d) => Some(start + d),
        Budget::Requests(_) => None,
    };
    let limit = match budget {
        Budget::Time(_) => u64::MAX,
        Budget::Requests(n) => n,
    };

    let mut tasks = JoinSet::new();
    for i in 0..clients.max(1) {
        let kv = pool.kv(i);
        let op = op.clone();
        let next_seq = next_seq.clone();
        tasks.spawn(async move {
            let mut hist = new_histogram()?;
            let mut errors = 0u64;
            let mut consecutive_errors = 0u32;
            let mut first_error = None;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                if seq >= limit {
                    break;
                }
                let t0 = Instant::now();
                let outcome = tokio::time::timeout(request_timeout, op(kv.clone(), seq)).await;
                let error = match outcome {
                    Ok(Ok(())) => {
                        let us = (t0.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_US);
                        hist.record(us).context("recording a latency")?;
                        consecutive_errors = 0;
                        continue;
                    }
                    Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
                    Err(_) => format!("no answer within {request_timeout:?}"),
                };
                errors += 1;
                consecutive_errors += 1;
                first_error.get_or_insert(error);
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    break;
                }
            }
            anyhow::Ok((hist, errors, first_error))
        });
    }

    let mut result = StepResult {
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency: new_histogram()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let (hist, errors, first_error) = joined.context("a client task panicked")??;
        result.ops += hist.len();
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
        result
            .latency
            .add(&hist)
            .context("merging latency histograms")?;
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating a latency histogram")
}

/// The value every put of a step writes: `size` bytes, shared.
pub fn value(size: usize) -> Arc<Vec<u8>> {
    Arc::new(vec![b'v'; size])
}

/// `size` pseudo-random bytes, the same for the same `n` on every run:
/// values no compressor can shrink, as in a store of encrypted or already
/// compressed payloads.
pub fn random_value(n: u64, size: usize) -> Vec<u8> {
    // splitmix64, seeded by the key number: fast, and good enough that
    // zstd finds nothing to compress.
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out.extend_from_slice(&splitmix64_mix(state).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// splitmix64's finaliser: every bit in moves every bit out.
fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Single-key puts from `clients` concurrent clients, to new keys in
/// order or, with a key space, to keys drawn from it.
pub async fn puts(pool: &Pool, clients: usize, settings: &Settings) -> Result<StepResult> {
    puts_under(pool, clients, PUT_PREFIX, settings).await
}

/// The key number the `seq`th put writes: `seq` itself, or with a key
/// space a pseudo-random one of it, the same sequence on every run and
/// for both systems. New keys in order append at the right edge of every
/// b-tree; keys spread over a key space, as a Kubernetes store's updates
/// are, land on random leaves, which an SQLite state feels and etcd's
/// revision-keyed bbolt does not.
pub fn put_key_number(seq: u64, key_space: u64) -> u64 {
    if key_space == 0 {
        return seq;
    }
    splitmix64_mix(seq.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % key_space
}

/// Single-key puts under `prefix`, within `settings`' budget and key space.
async fn puts_under(
    pool: &Pool,
    clients: usize,
    prefix: u8,
    settings: &Settings,
) -> Result<StepResult> {
    let value = value(settings.value_size);
    let key_space = settings.key_space;
    run_clients(
        pool,
        clients,
        settings.budget,
        settings.request_timeout,
        move |mut kv, seq| {
            let request = PutRequest {
                key: key(prefix, put_key_number(seq, key_space)),
                value: value.to_vec(),
                ..Default::default()
            };
            async move { kv.put(request).await.map(drop) }
        },
    )
    .await
}

/// Writes the `count` keys that [`gets`] reads.
pub async fn prepare_gets(pool: &Pool, count: u64, settings: &Settings) -> Result<()> {
    let loaded = load_keys(pool, GET_PREFIX, count, 100, 16, settings).await?;
    if loaded.errors > 0 {
        bail!(
            "{} of the txns writing the get keys failed; first error: {}",
            loaded.errors,
            loaded.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

/// Single-key gets of keys written by [`prepare_gets`].
pub async fn gets(
    pool: &Pool,
    clients: usize,
    keys: u64,
    serializable: bool,
    settings: &Settings,
) -> Result<StepResult> {
    let keys = keys.max(1);
    run_clients(
        pool,
        clients,
        settings.budget,
        settings.request_timeout,
        move |mut kv, seq| {
            let request = RangeRequest {
                key: key(GET_PREFIX, seq % keys),
                serializable,
                ..Default::default()
            };
            async move { kv.range(request).await.map(drop) }
        },
    )
    .await
}

/// Serializable ranges of `width` consecutive keys of the ones written by
/// [`prepare_gets`] (a list of one kind of object, as a Kubernetes API
/// server's reads of a namespace look).
pub async fn ranges(
    pool: &Pool,
    clients: usize,
    keys: u64,
    width: u64,
    settings: &Settings,
) -> Result<StepResult> {
    let starts = keys.saturating_sub(width).max(1);
    run_clients(
        pool,
        clients,
        settings.budget,
        settings.request_timeout,
        move |mut kv, seq| {
            let first = (seq * width) % starts;
            let request = RangeRequest {
                key: key(GET_PREFIX, first),
                range_end: key(GET_PREFIX, first + width),
                serializable: true,
                ..Default::default()
            };
            async move {
                let response = kv.range(request).await?.into_inner();
                if response.kvs.len() as u64 != width {
                    return Err(Status::internal(format!(
                        "a range of {width} keys returned {}",
                        response.kvs.len()
                    )));
                }
                Ok(())
            }
        },
    )
    .await
}

/// Writes keys `0..count` under `prefix` as txns of up to `ops_per_txn` puts
/// each, from `clients` concurrent clients. One txn per request is what makes
/// writing a million keys take seconds rather than many minutes.
pub async fn load_keys(
    pool: &Pool,
    prefix: u8,
    count: u64,
    ops_per_txn: u64,
    clients: usize,
    settings: &Settings,
) -> Result<StepResult> {
    let value = value(settings.value_size);
    load_keys_with(
        pool,
        prefix,
        count,
        ops_per_txn,
        clients,
        settings,
        move |_| value.to_vec(),
    )
    .await
}

/// [`load_keys`], the value of key number `n` being `value(n)`.
pub async fn load_keys_with(
    pool: &Pool,
    prefix: u8,
    count: u64,
    ops_per_txn: u64,
    clients: usize,
    settings: &Settings,
    value: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> Result<StepResult> {
    let ops_per_txn = ops_per_txn.max(1);
    let txns = count.div_ceil(ops_per_txn);
    run_clients(
        pool,
        clients,
        Budget::Requests(txns),
        settings.request_timeout,
        move |mut kv, seq| {
            let first = seq * ops_per_txn;
            let last = (first + ops_per_txn).min(count);
            let success = (first..last)
                .map(|n| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key(prefix, n),
                        value: value(n),
                        ..Default::default()
                    })),
                })
                .collect();
            let request = TxnRequest {
                success,
                ..Default::default()
            };
            async move { kv.txn(request).await.map(drop) }
        },
    )
    .await
}

/// Shape of the watch benchmark.
#[derive(Debug, Clone)]
pub struct WatchLoad {
    pub watchers: usize,
    pub streams: usize,
    pub puts: u64,
    pub put_clients: usize,
    /// Upper bound on the whole delivery, so a server that drops events fails
    /// the run instead of hanging it.
    pub timeout: Duration,
}

/// What the watch benchmark measured.
pub struct WatchResult {
    /// Events received, summed over all watchers.
    pub events: u64,
    /// From the first put until the last watcher had its last event.
    pub elapsed: Duration,
    /// From the first put until the last was acknowledged: when it is
    /// close to `elapsed`, the puts' rate bound the delivery, not the
    /// watchers.
    pub puts_elapsed: Duration,
}

impl WatchResult {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `load.watchers` watchers on one prefix, spread over `load.streams` watch
/// streams, then `load.puts` puts under the prefix; done when every watcher
/// has seen every put.
pub async fn watch_delivery(
    pool: &Pool,
    load: &WatchLoad,
    settings: &Settings,
) -> Result<WatchResult> {
    let streams = load.streams.clamp(1, load.watchers.max(1));
    let mut receivers = JoinSet::new();
    for s in 0..streams {
        // Spread the remainder so stream sizes differ by at most one.
        let watchers = load.watchers / streams + usize::from(s < load.watchers % streams);
        let stream = open_watch_stream(pool, s, watchers, settings.request_timeout)
            .await
            .with_context(|| format!("creating the watchers of stream {s}"))?;
        receivers.spawn(stream.receive_all(load.puts));
    }

    // Every watcher is created before the first put, so each must see them all.
    let start = Instant::now();
    // Exactly `load.puts` puts, each to a new key: every watcher counts on
    // that many events.
    let watched_puts = Settings {
        budget: Budget::Requests(load.puts),
        key_space: 0,
        ..settings.clone()
    };
    let put_result = puts_under(pool, load.put_clients, WATCH_PREFIX, &watched_puts).await?;
    let puts_elapsed = start.elapsed();
    if put_result.errors > 0 {
        // A failed put may or may not have been applied, so the number of
        // events to wait for is unknown: fail rather than guess.
        bail!(
            "{} of {} puts under the watched prefix failed; first error: {}",
            put_result.errors,
            load.puts,
            put_result.first_error.unwrap_or_default()
        );
    }

    let mut events = 0;
    let mut last_delivery = start;
    let wait = tokio::time::timeout(load.timeout, async {
        while let Some(joined) = receivers.join_next().await {
            let (received, finished) = joined.context("a watch stream task panicked")??;
            events += received;
            last_delivery = last_delivery.max(finished);
        }
        anyhow::Ok(())
    })
    .await;
    match wait {
        Ok(result) => result?,
        Err(_) => bail!(
            "watchers had not received all {} events within {:?}; {} events arrived on the streams that finished",
            load.watchers as u64 * load.puts,
            load.timeout,
            events
        ),
    }
    Ok(WatchResult {
        events,
        elapsed: last_delivery - start,
        puts_elapsed,
    })
}

/// One watch stream with its watchers created.
struct WatchStream {
    /// Kept open: closing the request side ends the stream on etcd.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    /// Events received so far, by watch id.
    received: HashMap<i64, u64>,
    index: usize,
}

async fn open_watch_stream(
    pool: &Pool,
    index: usize,
    watchers: usize,
    request_timeout: Duration,
) -> Result<WatchStream> {
    // Room for every create request, so queueing them never waits on the
    // server.
    let (requests, rx) = mpsc::channel(watchers + 1);
    for _ in 0..watchers {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: vec![WATCH_PREFIX],
                    range_end: vec![WATCH_PREFIX + 1],
                    ..Default::default()
                },
            )),
        };
        requests
            .send(create)
            .await
            .context("queueing a watch create request")?;
    }
    let mut client = pool.watch(index);
    let responses = tokio::time::timeout(request_timeout, client.watch(ReceiverStream::new(rx)))
        .await
        .context("the Watch call was not answered in time")?
        .context("the Watch call failed")?
        .into_inner();
    let mut stream = WatchStream {
        _requests: requests,
        responses,
        received: HashMap::new(),
        index,
    };
    tokio::time::timeout(request_timeout, async {
        while stream.received.len() < watchers {
            let response = stream.next().await?;
            if response.created {
                stream.received.insert(response.watch_id, 0);
            }
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| {
        format!("{watchers} watchers were not all created within {request_timeout:?}")
    })??;
    Ok(stream)
}

impl WatchStream {
    async fn next(&mut self) -> Result<WatchResponse> {
        let response = self
            .responses
            .message()
            .await
            .with_context(|| format!("watch stream {} failed", self.index))?
            .with_context(|| format!("watch stream {} was closed by the server", self.index))?;
        if response.canceled {
            bail!(
                "watch {} on stream {} was canceled: {:?} (compact revision {})",
                response.watch_id,
                self.index,
                response.cancel_reason,
                response.compact_revision
            );
        }
        Ok(response)
    }

    /// Reads until every watcher has `expected` events; returns how many
    /// events arrived and when the last one did.
    async fn receive_all(mut self, expected: u64) -> Result<(u64, Instant)> {
        let mut incomplete = self.received.values().filter(|&&n| n < expected).count();
        let mut total = 0u64;
        while incomplete > 0 {
            let response = self.next().await?;
            let Some(count) = self.received.get_mut(&response.watch_id) else {
                bail!(
                    "stream {} got events for unknown watch id {}",
                    self.index,
                    response.watch_id
                );
            };
            let before = *count;
            *count += response.events.len() as u64;
            total += response.events.len() as u64;
            if before < expected && *count >= expected {
                incomplete -= 1;
            }
        }
        Ok((total, Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_keys_are_new_in_order_without_a_key_space() {
        for seq in [0, 1, 2, 99_999, 5_000_000] {
            assert_eq!(put_key_number(seq, 0), seq);
        }
    }

    #[test]
    fn put_keys_spread_over_the_key_space_the_same_way_every_run() {
        let space = 1_000;
        let drawn: Vec<u64> = (0..10_000).map(|seq| put_key_number(seq, space)).collect();
        assert!(drawn.iter().all(|&n| n < space));
        let again: Vec<u64> = (0..10_000).map(|seq| put_key_number(seq, space)).collect();
        assert_eq!(drawn, again);
        // 10 draws a key on average: random draws leave e^-10 of the keys
        // unhit, a handful at most, and no run of keys in order.
        let distinct: std::collections::HashSet<u64> = drawn.iter().copied().collect();
        assert!(distinct.len() > 990, "{} keys hit", distinct.len());
        let ascending = drawn.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(ascending < 100, "{ascending} steps to the next key");
    }
}
