//! What the data-path benchmark does to a path, and the app at its far
//! end. The same code drives every path: a path is only how a client
//! opens a connection to the app ([`Dialer`]).
//!
//! The app speaks a one-byte preamble chosen by the client: [`SINK`]
//! reads to the end and answers with the byte count (8 bytes, big
//! endian); [`ECHO`] echoes until the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SINK: u8 = b'S';
pub const ECHO: u8 = b'E';

/// Bound on any one step of a measurement: a path that stalls fails the
/// benchmark instead of hanging it.
const STEP: Duration = Duration::from_secs(30);

pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}
pub type Conn = Box<dyn Duplex>;

/// How a client reaches the app over one path.
#[derive(Clone)]
pub enum Dialer {
    /// A TCP connection to the path's first hop.
    Tcp(SocketAddr),
    /// A stream on one established QUIC connection (the raw quinn path).
    Quic(quinn::Connection),
}

impl Dialer {
    /// Opens a connection and sends `first` (the preamble, and for a probe
    /// the first payload byte) in one write.
    pub async fn open(&self, first: &[u8]) -> anyhow::Result<Conn> {
        let mut c: Conn = match self {
            Dialer::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Dialer::Quic(q) => {
                let (send, recv) = q.open_bi().await?;
                Box::new(tokio::io::join(recv, send))
            }
        };
        c.write_all(first).await?;
        Ok(c)
    }
}

/// Serves the app on `listener` until the task is dropped.
pub async fn serve_app(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(app(s));
            }
            Err(e) => {
                // Out of descriptors under a connection storm: back off.
                tracing::warn!(error = %e, "bench app accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One app connection (TCP, or a QUIC stream on the raw quinn path).
pub async fn app<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    if s.read(&mut mode).await? == 0 {
        return Ok(()); // a readiness probe
    }
    let mut buf = vec![0u8; 256 * 1024];
    match mode[0] {
        SINK => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
        }
        ECHO => {
            buf.truncate(16 * 1024);
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        _ => return Ok(()),
    }
    s.shutdown().await
}

async fn step<T>(
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(STEP, f)
        .await
        .with_context(|| format!("{what}: no progress within {STEP:?}"))?
}

/// Sends `bytes` to the sink over one connection and checks its count.
async fn sink(dialer: &Dialer, bytes: u64) -> anyhow::Result<()> {
    let mut c = dialer.open(&[SINK]).await?;
    send_counted(&mut c, bytes).await
}

/// Writes `bytes`, ends the stream, and checks the count a sink answers.
pub async fn send_counted<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut S,
    bytes: u64,
) -> anyhow::Result<()> {
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        c.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    c.shutdown().await?;
    let mut count = [0u8; 8];
    c.read_exact(&mut count).await.context("sink count")?;
    let got = u64::from_be_bytes(count);
    if got != bytes {
        bail!("the sink received {got} of {bytes} bytes");
    }
    Ok(())
}

/// `bytes` in all over `streams` parallel connections; returns bits/s.
pub async fn goodput(dialer: &Dialer, streams: usize, bytes: u64) -> anyhow::Result<f64> {
    let streams = streams.max(1);
    let each = bytes / streams as u64;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let d = dialer.clone();
            tokio::spawn(async move { step("bulk transfer", sink(&d, each)).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok((each * streams as u64) as f64 * 8.0 / t0.elapsed().as_secs_f64())
}

/// 64-byte round trips back to back on one connection (a tenth more
/// first, unmeasured).
pub async fn round_trips(dialer: &Dialer, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut c = dialer.open(&[ECHO]).await?;
    let req = [7u8; 64];
    let mut resp = [0u8; 64];
    let warmup = n / 10;
    let mut out = Vec::with_capacity(n);
    for i in 0..n + warmup {
        let t0 = Instant::now();
        step("round trip", async {
            c.write_all(&req).await?;
            c.read_exact(&mut resp).await?;
            Ok(())
        })
        .await?;
        if i >= warmup {
            out.push(t0.elapsed());
        }
        if resp != req {
            bail!("echo mismatch");
        }
    }
    Ok(out)
}

/// What an open-loop run at a fixed rate saw.
pub struct RateRun {
    pub latencies: Vec<Duration>,
    pub sent: u64,
    /// Requests without a response within the run's grace time.
    pub failed: u64,
    pub achieved_per_s: f64,
}

/// 64-byte requests at `rate` per second for `length`, round robin over
/// `conns` connections, without waiting for responses (open loop). Each
/// latency counts from the request's write: tokio's timer fires at 1 ms
/// granularity, so at 10,000/s requests leave in bursts of about ten, and
/// the path's queueing of a burst shows in the figures, as it would for
/// a real client.
pub async fn fixed_rate(
    dialer: &Dialer,
    rate: u32,
    length: Duration,
    conns: usize,
) -> anyhow::Result<RateRun> {
    let n = ((f64::from(rate) * length.as_secs_f64()) as u64).max(1);
    let (mut writers, mut txs, mut readers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..conns.max(1) {
        let c = dialer.open(&[ECHO]).await?;
        let (r, w) = tokio::io::split(c);
        // Send times, in order; bounded by the requests of the whole run.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(n as usize);
        writers.push(w);
        txs.push(tx);
        readers.push(tokio::spawn(async move {
            let mut r = r;
            let mut out = Vec::new();
            let mut resp = [0u8; 64];
            while let Some(sent) = rx.recv().await {
                if r.read_exact(&mut resp).await.is_err() {
                    break;
                }
                out.push(sent.elapsed());
            }
            out
        }));
    }
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let req = [9u8; 64];
    let started = Instant::now();
    for i in 0..n {
        let due = started + interval.mul_f64(i as f64);
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
        }
        let k = i as usize % writers.len();
        let _ = txs[k].try_send(Instant::now());
        let w = &mut writers[k];
        step("paced write", async { Ok(w.write_all(&req).await?) }).await?;
    }
    let wall = started.elapsed();
    // Closing the channels ends each reader once it has read what was sent.
    drop(txs);
    let mut latencies = Vec::with_capacity(n as usize);
    for r in readers {
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(5), r).await {
            latencies.extend(v);
        }
    }
    drop(writers);
    Ok(RateRun {
        failed: n - latencies.len() as u64,
        latencies,
        sent: n,
        achieved_per_s: n as f64 / wall.as_secs_f64(),
    })
}

/// One new connection: connect, send a byte, read its echo.
async fn probe(dialer: &Dialer) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut c = dialer.open(&[ECHO, b'x']).await?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await?;
    let took = t0.elapsed();
    // Close cleanly so no path counts a reset.
    c.shutdown().await?;
    let _ = c.read(&mut b).await;
    Ok(took)
}

/// What new connections cost on a path.
pub struct ConnectRun {
    /// Connect plus first byte, one connection at a time.
    pub latencies: Vec<Duration>,
    /// Completed connections per second with `workers` in parallel.
    pub per_s: f64,
    pub failed: u64,
}

/// New connections one after another for `length` (latency), then from
/// `workers` in parallel for `length` (rate); at most `max` each.
pub async fn connects(
    dialer: &Dialer,
    length: Duration,
    workers: usize,
    max: usize,
) -> anyhow::Result<ConnectRun> {
    let mut latencies = Vec::new();
    let mut failed = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < length && latencies.len() < max {
        match tokio::time::timeout(Duration::from_secs(5), probe(dialer)).await {
            Ok(Ok(l)) => latencies.push(l),
            _ => failed += 1,
        }
        if failed > 100 {
            bail!("more than 100 new connections failed");
        }
    }
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bad = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let (d, done, bad) = (dialer.clone(), done.clone(), bad.clone());
            let per = max / workers.max(1) + 1;
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                for _ in 0..per {
                    if t0.elapsed() >= length {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(5), probe(&d)).await {
                        Ok(Ok(_)) => done.fetch_add(1, Relaxed),
                        _ => bad.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let wall = t0.elapsed().as_secs_f64();
    use std::sync::atomic::Ordering::Relaxed;
    Ok(ConnectRun {
        latencies,
        per_s: done.load(Relaxed) as f64 / wall,
        failed: failed + bad.load(Relaxed),
    })
}
