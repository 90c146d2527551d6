//! The admin endpoint: `/metrics` (Prometheus text), `/live`, `/ready`, and
//! when the daemon provides them `/status` and `/config_dump` (JSON).
//! Deliberately tiny: GET only, one request per connection, bounded request
//! size and time, so exposing it cannot become a way in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A JSON document produced on demand (e.g. a controller's `/status`).
pub type JsonFn = Arc<dyn Fn() -> String + Send + Sync>;

/// What the admin endpoint serves.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Mutex<Registry>>,
    pub ready: Arc<AtomicBool>,
    /// Served at `/status` when set.
    pub status: Option<JsonFn>,
    /// Served at `/config_dump` when set: the config the daemon runs on.
    pub config_dump: Option<JsonFn>,
}

/// Serves the admin endpoint on `listener` until the task is dropped.
/// Admin connections served at once; scrapes and probes need a handful.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: AdminState) {
    crate::serve_tcp(
        listener,
        "admin",
        MAX_ADMIN_CONNECTIONS,
        |_| {},
        move |stream, peer| {
            let state = state.clone();
            async move {
                if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &state)).await
                {
                    tracing::debug!(%peer, error = %e, "admin request timed out");
                }
            }
        },
    )
    .await
}

async fn handle(mut stream: TcpStream, state: &AdminState) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_REQUEST {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
            return;
        }
    }
    let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        let _ = respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
        return;
    }
    let r = match path {
        "/metrics" => {
            let mut body = String::new();
            let reg = state.registry.lock().await;
            if prometheus_client::encoding::text::encode(&mut body, &reg).is_err() {
                body = "# encoding failed\n".into();
            }
            drop(reg);
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/live" => respond(&mut stream, "200 OK", "text/plain", "live\n").await,
        "/status" if state.status.is_some() => {
            let body = state.status.as_ref().map(|f| f()).unwrap_or_default();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        "/config_dump" if state.config_dump.is_some() => {
            let body = state.config_dump.as_ref().map(|f| f()).unwrap_or_default();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        "/ready" if state.ready.load(Ordering::Relaxed) => {
            respond(&mut stream, "200 OK", "text/plain", "ready\n").await
        }
        "/ready" => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not ready\n",
            )
            .await
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "admin response failed");
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds an admin endpoint serving the metrics `register` puts in a fresh
/// registry (and `/status` when given), ready while `ready` holds.
pub async fn spawn_with(
    addr: SocketAddr,
    register: impl FnOnce(&mut Registry),
    ready: Arc<AtomicBool>,
    status: Option<JsonFn>,
    config_dump: Option<JsonFn>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut reg = Registry::default();
    register(&mut reg);
    let state = AdminState {
        registry: Arc::new(Mutex::new(reg)),
        ready,
        status,
        config_dump,
    };
    spawn(addr, state).await
}

/// A proxy's readiness and config bookkeeping: `/ready` answers 200 once a
/// config is in place (a static one at start, a controller's when the
/// first update was applied) and while the proxy is not draining; the
/// applied config version and update count are metrics.
#[derive(Debug)]
pub struct ConfigState {
    ready: Arc<AtomicBool>,
    have_config: AtomicBool,
    draining: AtomicBool,
    /// A drill's drain fault: the same effect, ended apart from a
    /// shutdown's drain.
    drill_draining: AtomicBool,
    version: prometheus_client::metrics::gauge::Gauge,
    updates: prometheus_client::metrics::counter::Counter,
}

impl ConfigState {
    /// `have_config`: the proxy starts with a usable (static) config.
    pub fn new(have_config: bool) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(have_config)),
            have_config: AtomicBool::new(have_config),
            draining: AtomicBool::new(false),
            drill_draining: AtomicBool::new(false),
            version: Default::default(),
            updates: Default::default(),
        }
    }

    /// Registers `config_version` and `config_updates` in `reg` (the
    /// caller's prefix applies).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "config_version",
            "Version of the controller config applied (0: static config)",
            self.version.clone(),
        );
        reg.register(
            "config_updates",
            "Configs applied since start",
            self.updates.clone(),
        );
    }

    /// The flag `/ready` serves.
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.drill_draining.load(Ordering::Relaxed)
    }

    /// A config was applied (`version` when it came from a controller).
    pub fn applied(&self, version: Option<u64>) {
        self.have_config.store(true, Ordering::Relaxed);
        if let Some(v) = version {
            self.version.set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        self.updates.inc();
        self.update();
    }

    /// A draining proxy reports not ready, so load balancers in front of
    /// it stop sending new work.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
        self.update();
    }

    /// A drill's drain (see [`ConfigState::set_draining`]); a shutdown's
    /// drain stays on when the drill's ends.
    pub fn set_drill_draining(&self, on: bool) {
        self.drill_draining.store(on, Ordering::Relaxed);
        self.update();
    }

    fn update(&self) {
        let ready = self.have_config.load(Ordering::Relaxed) && !self.is_draining();
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Binds the admin endpoint and serves it in the background.
pub async fn spawn(
    addr: SocketAddr,
    state: AdminState,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    Ok((local, tokio::spawn(serve(l, state))))
}
