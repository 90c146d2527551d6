//! The drill API: an operator, proven by a client SVID the config names,
//! sets and clears this gateway's faults over mTLS. HTTP/1.1, one request
//! per connection, bounded in size and time (like the admin endpoint,
//! which serves none of this):
//!
//! - `GET /faults`: who holds the gateway, and each fault with the time
//!   it has left.
//! - `PUT /faults/<drill>` with `{"faults": [...]}`: set (or, for the
//!   holder, replace) the drill's faults. `409` while another drill holds
//!   the gateway, `400` for a bad request (the reason in the body).
//! - `DELETE /faults/<drill>`: end them now (`409` for anyone else).
//!
//! Every request is logged with the operator and counted
//! (`fedmesh_gateway_drill_requests_total{result, reason}`); a client
//! whose SVID is no operator's gets `403`, counted as `not_operator`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedmesh_catalog::{ClusterName, Principal};
use fedmesh_trust::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::fault::{DrillId, Event, FaultError, FaultLimits, FaultSpec, FaultView, Faults};

/// `drills:` in the gateway config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillsConfig {
    /// mTLS listener of the drill API.
    pub listen: SocketAddr,
    /// Who may set faults: SPIFFE IDs (`spiffe://east.acme/ns/ops/sa/drill`),
    /// namespaces (`spiffe://east.acme/ns/ops/*`) or trust domains
    /// (`spiffe://east.acme/*`), as authorization policy writes them.
    pub operators: Vec<String>,
    /// Longest time to live a fault may ask for.
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Largest added delay.
    #[serde(default = "default_max_delay", with = "humantime_serde")]
    pub max_delay: Duration,
    /// Most faults one request may set.
    #[serde(default = "default_max_faults")]
    pub max_faults: usize,
}

fn default_max_ttl() -> Duration {
    FaultLimits::default().max_ttl
}

fn default_max_delay() -> Duration {
    FaultLimits::default().max_delay
}

fn default_max_faults() -> usize {
    FaultLimits::default().max_faults
}

impl DrillsConfig {
    /// A drill API on `listen` for `operators`, with the default bounds.
    pub fn new(listen: SocketAddr, operators: Vec<String>) -> Self {
        Self {
            listen,
            operators,
            max_ttl: default_max_ttl(),
            max_delay: default_max_delay(),
            max_faults: default_max_faults(),
        }
    }

    /// Every problem, for the config's validation.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.operators.is_empty() {
            p.push("drills.operators: at least one (nobody could set a fault)".into());
        }
        if self.operators.len() > 64 {
            p.push("drills.operators: at most 64".into());
        }
        for o in &self.operators {
            if let Err(e) = Principal::parse(o) {
                p.push(format!("drills.operators: {e}"));
            }
        }
        if self.max_ttl.is_zero() || self.max_ttl > Duration::from_secs(3600) {
            p.push("drills.max_ttl: 1ms to 1h".into());
        }
        if self.max_delay.is_zero() || self.max_delay > Duration::from_secs(60) {
            p.push("drills.max_delay: 1ms to 60s".into());
        }
        if !(1..=64).contains(&self.max_faults) {
            p.push("drills.max_faults: 1 to 64".into());
        }
        p
    }

    pub fn limits(&self) -> FaultLimits {
        FaultLimits {
            max_ttl: self.max_ttl,
            max_delay: self.max_delay,
            max_faults: self.max_faults,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// `fedmesh_gateway_drill_*`.
#[derive(Clone, Debug, Default)]
pub struct DrillMetrics {
    requests: Family<RequestLabels, Counter>,
    active: Family<KindLabels, Gauge>,
    expired: Family<KindLabels, Counter>,
}

impl DrillMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_gateway_drill");
        reg.register(
            "requests",
            "Drill API requests by result (ok, refused) and reason",
            self.requests.clone(),
        );
        reg.register(
            "faults_active",
            "Faults in force, by kind",
            self.active.clone(),
        );
        reg.register(
            "faults_expired",
            "Faults that ended by themselves (their time to live ran out)",
            self.expired.clone(),
        );
        // Every kind reads 0 from the start, not "no data".
        self.set_active(&FaultView::default());
    }

    fn request(&self, result: &'static str, reason: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { result, reason })
            .inc();
    }

    /// Requests by result and reason (tests, `/status`).
    pub fn requests(&self, result: &'static str, reason: &'static str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels { result, reason })
            .get()
    }

    pub fn expired(&self, kind: &'static str) -> u64 {
        self.expired.get_or_create(&KindLabels { kind }).get()
    }

    fn set_active(&self, view: &FaultView) {
        let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        for (kind, count) in [
            ("blackhole", n(view.blackholed.len())),
            ("drop_udp", n(view.udp_dropped.len())),
            ("delay", n(view.delayed.len())),
            ("drain", i64::from(view.draining)),
        ] {
            self.active.get_or_create(&KindLabels { kind }).set(count);
        }
    }
}

/// What the API changes and reads in the gateway.
pub(crate) struct DrillHooks {
    /// Applies the faults in force (replaced whole).
    pub apply: Box<dyn Fn(&FaultView) + Send + Sync>,
    /// The clusters this gateway knows as peers now.
    pub peers: Box<dyn Fn() -> BTreeSet<ClusterName> + Send + Sync>,
}

pub(crate) struct DrillApi {
    faults: Mutex<Faults>,
    /// Woken when the next deadline may have moved.
    rearm: Notify,
    operators: Vec<Principal>,
    hooks: DrillHooks,
    metrics: DrillMetrics,
}

/// Largest request head, and body.
const MAX_HEAD: usize = 8 * 1024;
const MAX_BODY: usize = 64 * 1024;
/// Whole request, TLS handshake included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;

impl DrillApi {
    pub fn new(cfg: &DrillsConfig, hooks: DrillHooks, metrics: DrillMetrics) -> Self {
        Self {
            faults: Mutex::new(Faults::new(cfg.limits())),
            rearm: Notify::new(),
            operators: cfg
                .operators
                .iter()
                .filter_map(|o| Principal::parse(o).ok())
                .collect(),
            hooks,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Faults> {
        match self.faults.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// One event through the state machine, with what follows from it:
    /// the data path updated, ends logged and counted.
    fn step(&self, ev: Event<'_>) -> Result<(), FaultError> {
        let step = self.lock().on(ev, Instant::now());
        for f in &step.ended {
            self.metrics
                .expired
                .get_or_create(&KindLabels {
                    kind: f.kind.label(),
                })
                .inc();
            tracing::info!(kind = f.kind.label(), peer = ?f.peer.as_ref().map(ClusterName::as_str), "drill fault expired");
        }
        if let Some(view) = &step.changed {
            (self.hooks.apply)(view);
            self.metrics.set_active(view);
        }
        self.rearm.notify_one();
        step.result
    }

    /// `GET /faults`.
    fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let g = self.lock();
        match g.holder() {
            None => serde_json::json!({ "drill": null, "faults": [] }),
            Some((drill, operator, faults)) => serde_json::json!({
                "drill": drill.as_str(),
                "operator": operator,
                "faults": faults.iter().map(|a| {
                    let mut v = serde_json::to_value(&a.spec).unwrap_or_default();
                    v["remaining_ms"] = serde_json::json!(
                        u64::try_from(a.until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
                    );
                    v
                }).collect::<Vec<_>>(),
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    faults: Vec<FaultSpec>,
}

/// Serves the drill API on `listener` and ends faults on time, until the
/// tasks are aborted.
pub(crate) fn spawn(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    api: Arc<DrillApi>,
) -> Vec<JoinHandle<()>> {
    let timer = {
        let api = api.clone();
        tokio::spawn(async move {
            loop {
                let rearmed = api.rearm.notified();
                tokio::pin!(rearmed);
                rearmed.as_mut().enable();
                let next = api.lock().next_deadline();
                match next {
                    Some(at) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at.into()) => {
                                let _ = api.step(Event::Tick);
                            }
                            _ = &mut rearmed => {}
                        }
                    }
                    None => rearmed.await,
                }
            }
        })
    };
    let over = api.clone();
    let accept = tokio::spawn(fedmesh_transport::serve_tcp(
        listener,
        "drills",
        MAX_CONNECTIONS,
        move |_| over.metrics.request("refused", "busy_connections"),
        move |tcp, remote| {
            let (api, acceptor) = (api.clone(), acceptor.clone());
            async move {
                let served = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    match fedmesh_transport::accept_tls(&acceptor, tcp, REQUEST_TIMEOUT).await {
                        Ok((tls, id)) => handle(tls, &id, &api).await,
                        Err(e) => {
                            api.metrics.request("refused", "tls");
                            tracing::info!(%remote, error = %e, "drill API: TLS handshake failed");
                        }
                    }
                })
                .await;
                if served.is_err() {
                    api.metrics.request("refused", "timeout");
                }
            }
        },
    ));
    vec![timer, accept]
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Reads one bounded request; `Err` names the status to answer.
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<Request, (u16, &'static str)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if i > MAX_HEAD {
                return Err((431, "request head too large"));
            }
            break i;
        }
        if buf.len() > MAX_HEAD + 4 {
            return Err((431, "request head too large"));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err((400, "request cut short")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (
        first.next().unwrap_or_default().to_owned(),
        first.next().unwrap_or_default().to_owned(),
    );
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| (400, "bad content-length"))
        })
        .transpose()?
        .unwrap_or(0);
    if len > MAX_BODY {
        return Err((413, "body too large"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() > len {
        return Err((400, "more body than content-length"));
    }
    let mut rest = vec![0u8; len - body.len()];
    s.read_exact(&mut rest)
        .await
        .map_err(|_| (400, "body cut short"))?;
    body.extend_from_slice(&rest);
    Ok(Request { method, path, body })
}

async fn respond<S: AsyncWrite + Unpin>(s: &mut S, code: u16, body: &serde_json::Value) {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn error(why: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "error": why.to_string() })
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, id: &SpiffeId, api: &DrillApi) {
    let who = fedmesh_wire::bounded(id.as_str());
    if !api.operators.iter().any(|p| p.matches(id)) {
        api.metrics.request("refused", "not_operator");
        tracing::warn!(client = %who, "drill API: not an operator; refused");
        respond(&mut s, 403, &error("not an operator of this gateway")).await;
        return;
    }
    let req = match read_request(&mut s).await {
        Ok(r) => r,
        Err((code, why)) => {
            api.metrics.request("refused", "bad_request");
            tracing::info!(operator = %who, why, "drill API: bad request");
            respond(&mut s, code, &error(why)).await;
            return;
        }
    };
    let drill = req.path.strip_prefix("/faults/").map(DrillId::new);
    let (code, body) = match (req.method.as_str(), req.path.as_str(), drill) {
        ("GET", "/faults", _) => {
            api.metrics.request("ok", "get");
            (200, api.status())
        }
        (_, _, Some(Err(e))) => refused(api, &who, None, e),
        ("PUT", _, Some(Ok(drill))) => match serde_json::from_slice::<SetBody>(&req.body) {
            Err(e) => {
                api.metrics.request("refused", "bad_request");
                let why = fedmesh_wire::bounded(&e.to_string());
                tracing::info!(operator = %who, %drill, why = %why, "drill API: faults do not decode");
                (400, error(why))
            }
            Ok(b) => {
                let kinds: Vec<&str> = b.faults.iter().map(|f| f.kind.label()).collect();
                let peers = (api.hooks.peers)();
                match api.step(Event::Set {
                    drill: drill.clone(),
                    operator: id.as_str().to_owned(),
                    faults: b.faults,
                    peers: &peers,
                }) {
                    Ok(()) => {
                        api.metrics.request("ok", "set");
                        tracing::info!(operator = %who, %drill, faults = ?kinds, "drill faults set");
                        (200, api.status())
                    }
                    Err(e) => refused(api, &who, Some(&drill), e),
                }
            }
        },
        ("DELETE", _, Some(Ok(drill))) => match api.step(Event::Clear {
            drill: drill.clone(),
        }) {
            Ok(()) => {
                api.metrics.request("ok", "clear");
                tracing::info!(operator = %who, %drill, "drill faults cleared");
                (200, api.status())
            }
            Err(e) => refused(api, &who, Some(&drill), e),
        },
        (_, "/faults", _) | (_, _, Some(Ok(_))) => {
            api.metrics.request("refused", "bad_method");
            (405, error("GET /faults, PUT or DELETE /faults/<drill>"))
        }
        _ => {
            api.metrics.request("refused", "not_found");
            (404, error("not found"))
        }
    };
    respond(&mut s, code, &body).await;
}

fn refused(
    api: &DrillApi,
    who: &str,
    drill: Option<&DrillId>,
    e: FaultError,
) -> (u16, serde_json::Value) {
    let reason = e.reason();
    api.metrics.request("refused", reason);
    tracing::info!(operator = %who, drill = ?drill.map(DrillId::as_str), error = %e, "drill API: refused");
    let code = match reason {
        "busy" | "not_holder" => 409,
        _ => 400,
    };
    (code, error(e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    async fn read(raw: &[u8]) -> Result<Request, (u16, &'static str)> {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(raw).await.unwrap();
        drop(a.shutdown().await);
        read_request(&mut b).await
    }

    #[tokio::test]
    async fn requests_are_read_within_bounds() {
        let r = read(b"PUT /faults/d1 HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("PUT", "/faults/d1", &b"{}"[..])
        );
        let big_head = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let big_body = format!(
            "PUT /faults/d HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        for (raw, code) in [
            (big_head.as_bytes(), 431),
            (big_body.as_bytes(), 413),
            (
                &b"PUT /faults/d HTTP/1.1\r\ncontent-length: 9\r\n\r\n{}"[..],
                400,
            ),
            (
                &b"PUT /faults/d HTTP/1.1\r\ncontent-length: x\r\n\r\n"[..],
                400,
            ),
            (&b"GET /faults HTTP/1.1\r\n"[..], 400),
        ] {
            let got = read(raw).await.err().map(|e| e.0);
            assert_eq!(
                got,
                Some(code),
                "{}",
                String::from_utf8_lossy(&raw[..raw.len().min(60)])
            );
        }
    }

    #[test]
    fn config_bounds() {
        let cfg: DrillsConfig = serde_yaml_ng::from_str(
            "listen: 127.0.0.1:0\noperators: [\"spiffe://east.acme/ns/ops/*\"]\n",
        )
        .unwrap();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        assert_eq!(cfg.limits(), FaultLimits::default());
        let bad: DrillsConfig = serde_yaml_ng::from_str(
            "listen: 127.0.0.1:0\noperators: [\"east\"]\nmax_ttl: 2h\nmax_delay: 0s\nmax_faults: 0\n",
        )
        .unwrap();
        assert_eq!(bad.problems().len(), 4, "{:?}", bad.problems());
        let none: DrillsConfig =
            serde_yaml_ng::from_str("listen: 127.0.0.1:0\noperators: []\n").unwrap();
        assert!(none.problems()[0].contains("at least one"));
    }
}

/// Why a drill API call failed: each says which gateway and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DrillClientError {
    #[error("drill API {addr}: cannot connect: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("drill API {addr}: TLS handshake failed ({source}); is this the gateway's drill port, and does it trust our SVID's domain?")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("drill API {addr}: no answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("drill API {addr}: {code}: {error}")]
    Refused {
        addr: SocketAddr,
        code: u16,
        error: String,
    },
    #[error("drill API {addr}: an answer that is not HTTP/JSON")]
    BadAnswer { addr: SocketAddr },
    #[error("drill API: our TLS config: {0}")]
    Config(#[from] fedmesh_trust::TlsError),
}

/// A client of one gateway's drill API, presenting an operator's SVID.
#[derive(Clone)]
pub struct DrillClient {
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl DrillClient {
    /// Calls `addr` as `identity`, trusting gateways of `bundles`; each
    /// call ends within `timeout` (connect, handshake, answer).
    pub fn new(
        addr: SocketAddr,
        identity: &fedmesh_trust::Svid,
        bundles: fedmesh_trust::SharedBundles,
        timeout: Duration,
    ) -> Result<Self, DrillClientError> {
        let cfg = fedmesh_trust::client_config(
            identity,
            bundles,
            fedmesh_trust::PeerPolicy::AnyTrusted,
            &[b"http/1.1"],
        )?;
        Ok(Self {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            timeout,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets `drill`'s faults; the API's answer (the faults in force).
    pub async fn set(
        &self,
        drill: &DrillId,
        faults: &[FaultSpec],
    ) -> Result<serde_json::Value, DrillClientError> {
        let body = serde_json::json!({ "faults": faults });
        self.call("PUT", &format!("/faults/{drill}"), Some(body))
            .await
    }

    /// Ends `drill`'s faults.
    pub async fn clear(&self, drill: &DrillId) -> Result<serde_json::Value, DrillClientError> {
        self.call("DELETE", &format!("/faults/{drill}"), None).await
    }

    pub async fn status(&self) -> Result<serde_json::Value, DrillClientError> {
        self.call("GET", "/faults", None).await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, DrillClientError> {
        let addr = self.addr;
        tokio::time::timeout(self.timeout, async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| DrillClientError::Connect { addr, source })?;
            let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid")
                .map_err(|_| DrillClientError::BadAnswer { addr })?;
            let mut s = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|source| DrillClientError::Tls { addr, source })?;
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: fedmesh-gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|source| DrillClientError::Tls { addr, source })?;
            // The answer is small; more than the API ever sends is refused.
            let mut out = Vec::new();
            (&mut s)
                .take((MAX_BODY + MAX_HEAD) as u64)
                .read_to_end(&mut out)
                .await
                .map_err(|source| DrillClientError::Tls { addr, source })?;
            let text = String::from_utf8_lossy(&out);
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or(DrillClientError::BadAnswer { addr })?;
            let code: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or(DrillClientError::BadAnswer { addr })?;
            let v: serde_json::Value =
                serde_json::from_str(body).map_err(|_| DrillClientError::BadAnswer { addr })?;
            if code != 200 {
                let error = v["error"].as_str().unwrap_or("(no reason given)");
                return Err(DrillClientError::Refused {
                    addr,
                    code,
                    error: fedmesh_wire::bounded(error),
                });
            }
            Ok(v)
        })
        .await
        .map_err(|_| DrillClientError::Timeout {
            addr,
            after: self.timeout,
        })?
    }
}
