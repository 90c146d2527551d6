//! A load generator for echo services: every response is checked byte for
//! byte, every request timed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub connections: usize,
    pub requests_per_connection: usize,
    pub request_bytes: usize,
    /// Per-request bound; a request slower than this fails.
    pub timeout: Duration,
    /// Connections in flight at once.
    pub concurrency: usize,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            connections: 20,
            requests_per_connection: 20,
            request_bytes: 1024,
            timeout: Duration::from_secs(5),
            concurrency: 10,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Per-request round-trip times of successful requests.
    pub latencies: Vec<Duration>,
    /// Banner (which app instance answered) → connections.
    pub served_by: BTreeMap<String, u64>,
    /// Failure reason → count.
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn merge(&mut self, o: LoadReport) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.latencies.extend(o.latencies);
        for (k, v) in o.served_by {
            *self.served_by.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

/// The `p`-th percentile (0..=100) of `v`, by nearest rank; `v` is sorted.
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Runs `spec` against an echo service at `addr`.
pub async fn run_load(addr: SocketAddr, spec: &LoadSpec) -> LoadReport {
    run_load_counted(addr, spec, Default::default()).await
}

/// [`run_load`], counting finished requests (ok or failed) in `done` as
/// it goes, for a progress display.
pub async fn run_load_counted(
    addr: SocketAddr,
    spec: &LoadSpec,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> LoadReport {
    let started = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(spec.connections);
    for c in 0..spec.connections {
        let spec = spec.clone();
        let sem = sem.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = one_connection(addr, &spec, c as u64).await;
            done.fetch_add(r.total(), std::sync::atomic::Ordering::Relaxed);
            r
        }));
    }
    let mut report = LoadReport::default();
    for t in tasks {
        match t.await {
            Ok(r) => report.merge(r),
            Err(e) => {
                report.failed += spec.requests_per_connection as u64;
                *report.errors.entry(format!("task: {e}")).or_default() += 1;
            }
        }
    }
    report.elapsed = started.elapsed();
    report
}

async fn one_connection(addr: SocketAddr, spec: &LoadSpec, seed: u64) -> LoadReport {
    let mut r = LoadReport::default();
    let fail_all = |r: &mut LoadReport, why: String, done: usize| {
        r.failed += (spec.requests_per_connection - done) as u64;
        *r.errors.entry(why).or_default() += 1;
    };
    let stream = match tokio::time::timeout(spec.timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            fail_all(&mut r, format!("connect: {e}"), 0);
            return r;
        }
        Err(_) => {
            fail_all(&mut r, "connect: timeout".into(), 0);
            return r;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut stream = BufReader::new(stream);
    let mut banner = String::new();
    match tokio::time::timeout(spec.timeout, stream.read_line(&mut banner)).await {
        Ok(Ok(n)) if n > 0 => {
            *r.served_by.entry(banner.trim_end().to_owned()).or_default() += 1;
        }
        Ok(Ok(_)) => {
            fail_all(
                &mut r,
                "closed before banner (no route or refused)".into(),
                0,
            );
            return r;
        }
        Ok(Err(e)) => {
            fail_all(&mut r, format!("banner: {e}"), 0);
            return r;
        }
        Err(_) => {
            fail_all(&mut r, "banner: timeout".into(), 0);
            return r;
        }
    }
    let mut payload = vec![0u8; spec.request_bytes];
    let mut back = vec![0u8; spec.request_bytes];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..spec.requests_per_connection {
        for b in payload.iter_mut() {
            // xorshift: cheap, distinct bytes per request and connection.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let t0 = Instant::now();
        let io = async {
            stream.get_mut().write_all(&payload).await?;
            stream.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(spec.timeout, io).await {
            Ok(Ok(())) if back == payload => {
                r.latencies.push(t0.elapsed());
                r.ok += 1;
                r.bytes_sent += payload.len() as u64;
                r.bytes_received += back.len() as u64;
            }
            Ok(Ok(())) => {
                fail_all(&mut r, "response bytes differ from request".into(), i);
                return r;
            }
            Ok(Err(e)) => {
                fail_all(&mut r, format!("io: {e}"), i);
                return r;
            }
            Err(_) => {
                fail_all(&mut r, "request timeout".into(), i);
                return r;
            }
        }
    }
    let _ = stream.get_mut().shutdown().await;
    r
}

/// One request of an open-loop run: a fresh connection, one echo round trip.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    /// When it started, from the start of the run.
    pub start: Duration,
    /// Connect to last byte back (successes), or until it failed.
    pub latency: Duration,
    pub ok: bool,
    /// The app instance that answered (its banner), e.g. `west/echo-0`.
    pub served_by: Option<String>,
    pub error: Option<String>,
}

impl Sample {
    /// The cluster that answered: the banner's part before `/`.
    pub fn cluster(&self) -> Option<&str> {
        self.served_by.as_deref().and_then(|b| b.split('/').next())
    }
}

#[derive(Debug, Clone)]
pub struct OpenLoopSpec {
    /// Requests started per second, whatever the answers do (open loop: a
    /// slow or broken target does not slow the offered load down).
    pub rate: u32,
    pub duration: Duration,
    pub request_bytes: usize,
    pub timeout: Duration,
    /// Requests in flight at most; beyond it a request counts as failed.
    pub max_in_flight: usize,
    /// Each request an HTTP/1.1 `PUT` of `request_bytes` (echoed back) on
    /// a keep-alive connection taken from a pool, instead of a new TCP
    /// connection with one echo round trip.
    pub http: bool,
}

/// Idle keep-alive HTTP connections shared by an open-loop run. Like a
/// well-behaved client it drops connections idle longer than
/// `CLIENT_IDLE`, below any server's idle timeout, so it never reuses one
/// the server is closing at that moment.
#[derive(Default)]
struct HttpPool(std::sync::Mutex<Vec<(crate::apps::HttpConn, Instant)>>);

const CLIENT_IDLE: Duration = Duration::from_secs(10);

impl HttpPool {
    fn take(&self) -> Option<crate::apps::HttpConn> {
        let mut v = self.0.lock().ok()?;
        while let Some((c, since)) = v.pop() {
            if since.elapsed() < CLIENT_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn put(&self, c: crate::apps::HttpConn) {
        if let Ok(mut v) = self.0.lock() {
            v.push((c, Instant::now()));
        }
    }
}

/// One HTTP request of an open-loop run: `(served_by, error)`.
async fn one_http(
    addr: SocketAddr,
    pool: &HttpPool,
    body: bytes::Bytes,
    timeout: Duration,
) -> Result<String, String> {
    let work = async {
        let mut c = match pool.take() {
            Some(c) => c,
            None => crate::apps::HttpConn::connect(addr, false)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        };
        let r = c
            .request("PUT", "/echo", &[], body.clone())
            .await
            .map_err(|e| format!("http: {e}"))?;
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        if r.body != body {
            return Err("response body differs from request".into());
        }
        pool.put(c);
        Ok(r.served_by)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err("request timeout".into()),
    }
}

/// Counters a progress display can read while a run goes on.
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub ok: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
}

/// Offers `spec.rate` requests per second to the echo service at `addr`
/// for `spec.duration`; returns every request's sample, in start order.
pub async fn run_open_loop(
    addr: SocketAddr,
    spec: &OpenLoopSpec,
    live: std::sync::Arc<LiveCounts>,
) -> Vec<Sample> {
    use std::sync::atomic::Ordering;
    let started = Instant::now();
    let total = (u64::from(spec.rate) * spec.duration.as_millis() as u64 / 1000).max(1);
    let interval = Duration::from_secs(1) / spec.rate.max(1);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(spec.max_in_flight.max(1)));
    let one = LoadSpec {
        connections: 1,
        requests_per_connection: 1,
        request_bytes: spec.request_bytes,
        timeout: spec.timeout,
        concurrency: 1,
    };
    let mut tasks = Vec::with_capacity(total as usize);
    let pool = std::sync::Arc::new(HttpPool::default());
    let body = bytes::Bytes::from(vec![b'x'; spec.request_bytes]);
    let (http, timeout) = (spec.http, spec.timeout);
    for i in 0..total {
        let due = started + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let start = started.elapsed();
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            live.failed.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                Sample {
                    start,
                    latency: Duration::ZERO,
                    ok: false,
                    served_by: None,
                    error: Some("too many requests in flight".into()),
                }
            }));
            continue;
        };
        let one = one.clone();
        let live = live.clone();
        let (pool, body) = (pool.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            if http {
                let r = one_http(addr, &pool, body, timeout).await;
                drop(permit);
                let counter = if r.is_ok() { &live.ok } else { &live.failed };
                counter.fetch_add(1, Ordering::Relaxed);
                let (served_by, error) = match r {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(e)),
                };
                return Sample {
                    start,
                    latency: t0.elapsed(),
                    ok: error.is_none(),
                    served_by,
                    error,
                };
            }
            let r = one_connection(addr, &one, i).await;
            drop(permit);
            let ok = r.ok == 1;
            let counter = if ok { &live.ok } else { &live.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            Sample {
                start,
                latency: t0.elapsed(),
                ok,
                served_by: r.served_by.keys().next().cloned(),
                error: r.errors.keys().next().cloned(),
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(s) = t.await {
            out.push(s);
        }
    }
    out
}
