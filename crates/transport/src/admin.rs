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
/// registry (and `/status` when given), always ready.
pub async fn spawn_with(
    addr: SocketAddr,
    register: impl FnOnce(&mut Registry),
    status: Option<JsonFn>,
    config_dump: Option<JsonFn>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut reg = Registry::default();
    register(&mut reg);
    let state = AdminState {
        registry: Arc::new(Mutex::new(reg)),
        ready: Arc::new(AtomicBool::new(true)),
        status,
        config_dump,
    };
    spawn(addr, state).await
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
