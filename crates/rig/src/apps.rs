//! Small apps that stand in for workloads.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::RigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// Writes a banner line naming itself, then echoes every byte.
    Echo,
    /// Reads until EOF, then writes the byte count as 8 bytes big-endian.
    Sink,
    /// HTTP/1.1 and HTTP/2 (prior knowledge); see [`http_app`].
    Http,
    /// Tells how connections ended, for tests of cut propagation; see
    /// [`ends_app`].
    Ends,
}

/// A running app; dropping it stops the listener.
pub struct App {
    pub addr: SocketAddr,
    pub name: String,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub async fn start(kind: AppKind, name: &str) -> std::io::Result<App> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(serve(kind, l, name.to_owned()));
        Ok(App {
            addr,
            name: name.to_owned(),
            task,
        })
    }
}

/// Serves `kind` on `listener` until dropped (the body of [`App::start`];
/// the e2e rig runs it as a process of its own).
pub async fn serve(kind: AppKind, listener: TcpListener, name: String) {
    if kind == AppKind::Http {
        return http_app(listener, name).await;
    }
    if kind == AppKind::Ends {
        return ends_app(listener).await;
    }
    let l = listener;
    let banner = format!("{name}\n");
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let banner = banner.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            match kind {
                AppKind::Echo => {
                    if s.write_all(banner.as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                }
                AppKind::Http | AppKind::Ends => {}
                AppKind::Sink => {
                    let mut total = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                }
            }
        });
    }
}

/// How held connections ended, by the id the client gave (bounded).
type Endings = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, &'static str>>>;

/// At most this many endings are remembered; the oldest ids go first.
const MAX_ENDINGS: usize = 4096;

/// Reads one command line, byte by byte so nothing after it is consumed.
async fn command_line(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 128 {
        match s.read(&mut b).await {
            Ok(1) if b[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    None
}

/// An app that tells how its connections ended, so a test can check what
/// the far application of a cut tunnel saw. Each connection starts with
/// one command line:
/// - `hold ID`: echo every byte until the connection ends, then remember
///   `fin` (end of stream), `reset` (connection reset) or `error` for ID;
/// - `cut`: answer `ok`, read one byte, then reset the connection (RST);
/// - `ended ID`: answer one line, how ID ended, `open` while it lasts, or
///   `unknown`.
pub async fn ends_app(listener: TcpListener) {
    let endings: Endings = Default::default();
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let endings = endings.clone();
        tokio::spawn(async move {
            let Some(cmd) = command_line(&mut s).await else {
                return;
            };
            let record = |id: &str, how: &'static str| {
                let mut e = endings.lock().unwrap_or_else(|p| p.into_inner());
                if e.len() >= MAX_ENDINGS && !e.contains_key(id) {
                    e.pop_first();
                }
                e.insert(id.to_owned(), how);
            };
            if let Some(id) = cmd.strip_prefix("hold ") {
                record(id, "open");
                let mut buf = vec![0u8; 16 * 1024];
                let how = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break "fin",
                        Ok(n) => {
                            if let Err(e) = s.write_all(&buf[..n]).await {
                                break if e.kind() == std::io::ErrorKind::ConnectionReset {
                                    "reset"
                                } else {
                                    "error"
                                };
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                        Err(_) => break "error",
                    }
                };
                record(id, how);
            } else if cmd == "cut" {
                if s.write_all(b"ok\n").await.is_ok() {
                    let mut b = [0u8; 1];
                    let _ = s.read(&mut b).await;
                }
                let _ = s.set_zero_linger();
                drop(s);
            } else if let Some(id) = cmd.strip_prefix("ended ") {
                let how = endings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .copied()
                    .unwrap_or("unknown");
                let _ = s.write_all(format!("{how}\n").as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
    }
}

/// An HTTP server standing in for a workload. Every response carries
/// `x-served-by: NAME`. Paths:
/// - `/status/N`: answers status N;
/// - `/slow/MS`: answers after MS milliseconds (at most 10 s);
/// - `…/fail-if/TEXT`: 503 when NAME contains TEXT, else 200;
/// - `/upgrade` with `Upgrade: echo`: 101, then echoes bytes;
/// - anything else: 200 with the request body, or `NAME\n` when empty.
pub async fn http_app(listener: TcpListener, name: String) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let name = name.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        if path == "/upgrade" && req.headers().contains_key("upgrade") {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let mut io = TokioIo::new(up);
                                    let mut buf = vec![0u8; 16 * 1024];
                                    while let Ok(n) = io.read(&mut buf).await {
                                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            });
                            let mut r = hyper::Response::new(Full::new(bytes::Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut()
                                .insert("upgrade", http::HeaderValue::from_static("echo"));
                            r.headers_mut()
                                .insert("connection", http::HeaderValue::from_static("upgrade"));
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let mut status = 200u16;
                        let mut out = if body.is_empty() {
                            bytes::Bytes::from(format!("{name}\n"))
                        } else {
                            body
                        };
                        if let Some(n) = path.strip_prefix("/status/") {
                            status = n.parse().unwrap_or(400);
                            out = bytes::Bytes::new();
                        } else if let Some(ms) = path.strip_prefix("/slow/") {
                            let ms: u64 = ms.parse().unwrap_or(0).min(10_000);
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                        } else if let Some(t) = path.split_once("/fail-if/").map(|x| x.1) {
                            if name.contains(t) {
                                status = 503;
                            }
                        }
                        let mut r = hyper::Response::new(Full::new(out));
                        *r.status_mut() = hyper::StatusCode::from_u16(status)
                            .unwrap_or(hyper::StatusCode::BAD_REQUEST);
                        if let Ok(v) = http::HeaderValue::from_str(&name) {
                            r.headers_mut().insert("x-served-by", v);
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                },
            );
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// A keep-alive HTTP client connection for tests and benchmarks.
pub struct HttpConn {
    send: HttpSend,
}

enum HttpSend {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>),
}

/// What a test looks at in a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub served_by: String,
    pub body: bytes::Bytes,
}

impl HttpConn {
    /// HTTP/1.1, or HTTP/2 with prior knowledge when `h2`.
    pub async fn connect(addr: SocketAddr, h2: bool) -> Result<Self, RigError> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(RigError::http)?;
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        let send = if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(RigError::http)?;
            tokio::spawn(conn);
            HttpSend::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(RigError::http)?;
            tokio::spawn(conn);
            HttpSend::H1(s)
        };
        Ok(Self { send })
    }

    /// Sends one request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: bytes::Bytes,
    ) -> Result<HttpReply, RigError> {
        use http_body_util::BodyExt;
        let h2 = matches!(self.send, HttpSend::H2(_));
        let uri = if h2 {
            format!("http://svc{path}")
        } else {
            path.to_owned()
        };
        let mut b = hyper::Request::builder().method(method).uri(uri);
        if !h2 {
            b = b.header("host", "svc");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(http_body_util::Full::new(body))
            .map_err(RigError::http)?;
        let resp = match &mut self.send {
            HttpSend::H1(s) => {
                s.ready().await.map_err(RigError::http)?;
                s.send_request(req).await.map_err(RigError::http)?
            }
            HttpSend::H2(s) => {
                s.ready().await.map_err(RigError::http)?;
                s.send_request(req).await.map_err(RigError::http)?
            }
        };
        let status = resp.status().as_u16();
        let served_by = resp
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(RigError::http)?
            .to_bytes();
        Ok(HttpReply {
            status,
            served_by,
            body,
        })
    }

    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpReply, RigError> {
        self.request("GET", path, headers, bytes::Bytes::new())
            .await
    }
}
