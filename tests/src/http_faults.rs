//! An HTTP/1.1 reverse proxy that answers `500 Internal Server Error`
//! instead of forwarding, for as many requests as a test asks: an object
//! store failing on purpose. Each request gets its own upstream connection
//! and the client connection closes after each response, which keeps the
//! proxy simple (no keep-alive bookkeeping) and is legal HTTP/1.1.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct FailingHttp {
    addr: SocketAddr,
    to_fail: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl FailingHttp {
    pub fn start(target: SocketAddr) -> FailingHttp {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let to_fail = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (f, d, w) = (to_fail.clone(), failed.clone(), forwarded.clone());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (f, d, w) = (f.clone(), d.clone(), w.clone());
                tokio::spawn(async move {
                    let _ = serve(client, target, f, d, w).await;
                });
            }
        });
        FailingHttp {
            addr,
            to_fail,
            failed,
            forwarded,
            _runtime: runtime,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answer the next `n` requests with a 500.
    pub fn fail_next(&self, n: u64) {
        self.to_fail.store(n, Ordering::SeqCst);
    }

    /// Requests answered with a 500 so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Requests forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    to_fail: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
) -> std::io::Result<()> {
    // The request head, then the body by Content-Length.
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 16 * 1024];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let fail = to_fail
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if fail {
        failed.fetch_add(1, Ordering::SeqCst);
        client
            .write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
        return client.shutdown().await;
    }
    forwarded.fetch_add(1, Ordering::SeqCst);
    // Forward with `Connection: close`, so the response ends at EOF.
    let mut upstream = TcpStream::connect(target).await?;
    let request_line_end = head.find("\r\n").unwrap_or(head.len());
    let mut out = String::with_capacity(head.len() + 32);
    out.push_str(&head[..request_line_end + 2]);
    for line in head[request_line_end + 2..].split("\r\n") {
        if line.is_empty() || line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream.write_all(out.as_bytes()).await?;
    upstream
        .write_all(&buf[head_end..head_end + length])
        .await?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response).await?;
    client.write_all(&response).await?;
    client.shutdown().await
}
