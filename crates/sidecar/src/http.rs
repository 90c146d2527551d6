//! The L7 path of outbound listeners: an HTTP/1.x or HTTP/2 connection
//! from the app is served by hyper, each request is routed on its own
//! (the service's `http` rules, then the balancer's plan), sent over a
//! pooled tunnel connection of the same protocol, retried or failed over
//! when that is safe, and answered with a clear status when it cannot be
//! (403 denied, 503 nothing healthy, 502 upstream broke, 504 timeout).
//!
//! The destination sidecar stays L4: authorization happens there on the
//! tunnel's source identity and comes back as a `Denied` status frame,
//! which becomes the 403 here.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_catalog::{Hop, HttpPolicy, RequestFacts};
use fedmesh_transport::{connect_one, Refusal};
use fedmesh_wire::{Header, ServiceName, StatusCode, Target};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::HttpLimits;
use crate::detect::{Protocol, Rewind};
use crate::metrics::{class, HttpLabels, HttpLatencyLabels};
use crate::proxy::{new_traceparent, Shared};

type ReqBody = Either<Full<Bytes>, Incoming>;
type RespBody = Either<Incoming, Full<Bytes>>;

/// Serves one app connection already classified as HTTP until it closes.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    app: Rewind<TcpStream>,
    protocol: Protocol,
    service: ServiceName,
    port: u16,
) {
    let io = TokioIo::new(app);
    let handler = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let service = service.clone();
            async move { Ok::<_, Infallible>(request(&shared, &service, port, protocol, req).await) }
        })
    };
    let result = match protocol {
        Protocol::Http2 => {
            server2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(shared.http.max_concurrent_streams)
                .max_header_list_size(shared.http.max_header_bytes as u32)
                .serve_connection(io, handler)
                .await
        }
        _ => {
            server1::Builder::new()
                .timer(TokioTimer::new())
                // hyper runs this clock while a keep-alive connection
                // waits for its next request too, so it is the idle timeout
                // (5 s would race clients' pools, which reuse longer).
                .header_read_timeout(shared.http.idle_timeout)
                .max_buf_size(shared.http.max_header_bytes)
                .keep_alive(true)
                .serve_connection(io, handler)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "app HTTP connection ended with an error");
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    // `te: trailers` is end to end in practice: gRPC needs it to pass.
    let te_trailers = h
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(http::header::TRANSFER_ENCODING);
    if te_trailers {
        h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

fn reply(status: u16, why: &str) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "fedmesh: {why}\n"
    )))));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The HTTP status for a refused tunnel stream.
fn refusal_status(r: &Refusal) -> u16 {
    match r.code {
        StatusCode::Denied => 403,
        StatusCode::UnknownService | StatusCode::NoHealthyEndpoint | StatusCode::Overloaded => 503,
        _ => 502,
    }
}

/// How a request ended, for metrics and the access log.
struct Outcome {
    response: Response<RespBody>,
    cluster: String,
    attempts: usize,
}

async fn request(
    shared: &Arc<Shared>,
    listener: &ServiceName,
    port: u16,
    protocol: Protocol,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    let catalog = shared.catalog();
    let policy = catalog.policy_or_default(listener);
    let none = HttpPolicy::default();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let decision = {
        let headers = req.headers();
        let facts = RequestFacts {
            method: req.method().as_str(),
            authority: authority.as_deref(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
            header: |name: &str| headers.get(name).and_then(|v| v.to_str().ok()),
        };
        policy
            .http
            .as_ref()
            .unwrap_or(&none)
            .decide(listener, policy.request_timeout, &facts)
    };
    let svc = decision.service.to_string();
    // Carry the caller's trace, or start one, so every hop's span and
    // access-log line can be joined.
    let traceparent = match req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| fedmesh_wire::Traceparent::parse(v).ok())
    {
        Some(t) => Some(t),
        None => {
            let t = new_traceparent();
            if let Some(v) = t
                .as_ref()
                .and_then(|t| HeaderValue::from_str(t.as_str()).ok())
            {
                req.headers_mut().insert("traceparent", v);
            }
            t
        }
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // Decided and routed on the same catalog, even if one arrives meanwhile.
    let work = forward(shared, &catalog, &decision, port, protocol, req);
    let outcome = match decision.timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(o) => o,
            Err(_) => Outcome {
                response: reply(504, &format!("no response within {t:?}")),
                cluster: String::new(),
                attempts: 0,
            },
        },
        None => work.await,
    };
    let status = outcome.response.status().as_u16();
    let class = class(status);
    shared
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            service: svc.clone(),
            cluster: outcome.cluster.clone(),
            class,
        })
        .inc();
    shared
        .metrics
        .http_latency
        .get_or_create(&HttpLatencyLabels {
            service: svc.clone(),
            class,
        })
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        target: "fedmesh::access",
        direction = "outbound-http",
        service = svc,
        route = decision.route,
        method = %method,
        path,
        status,
        peer = outcome.cluster,
        attempts = outcome.attempts,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        traceparent = traceparent.as_ref().map(|t| t.as_str()),
    );
    outcome.response
}

/// The request body, held for replay when the request may be retried and
/// is small enough; otherwise streamed once.
enum Payload {
    Held(Bytes),
    Once(Option<Incoming>),
}

impl Payload {
    fn take(&mut self) -> Option<ReqBody> {
        match self {
            Payload::Held(b) => Some(Either::Left(Full::new(b.clone()))),
            Payload::Once(b) => b.take().map(Either::Right),
        }
    }
}

async fn forward(
    shared: &Arc<Shared>,
    catalog: &fedmesh_catalog::Catalog,
    decision: &fedmesh_catalog::HttpDecision,
    port: u16,
    protocol: Protocol,
    req: Request<Incoming>,
) -> Outcome {
    let fail = |status: u16, why: String| Outcome {
        response: reply(status, &why),
        cluster: String::new(),
        attempts: 0,
    };
    let service = &decision.service;
    let svc = service.to_string();
    let mut routes = match catalog.outbound_routes(service, port) {
        Ok(r) => r,
        Err(e) => return fail(503, e.to_string()),
    };
    if !decision.clusters.is_empty() {
        routes.retain(|r| decision.clusters.contains(&r.cluster));
        if routes.is_empty() {
            return fail(
                503,
                format!(
                    "route {} allows no cluster serving {service}",
                    decision.route
                ),
            );
        }
    }
    let (mut parts, body) = req.into_parts();
    // An HTTP/1.1 `Upgrade` (WebSocket …) gets a fresh upstream connection
    // of its own, keeps its Connection/Upgrade headers, is never resent,
    // and after `101` both sides are spliced as bytes.
    let upgrade =
        match protocol == Protocol::Http1 && parts.headers.contains_key(http::header::UPGRADE) {
            true => match parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
                Some(on) => Some(on),
                None => {
                    return fail(
                        400,
                        "upgrade request without an upgradable connection".into(),
                    )
                }
            },
            false => None,
        };
    if upgrade.is_none() {
        strip_hop_by_hop(&mut parts.headers);
    }
    let held = decision.retryable
        && upgrade.is_none()
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= shared.http.max_retry_body_bytes as u64);
    let mut payload = if held {
        match Limited::new(body, shared.http.max_retry_body_bytes)
            .collect()
            .await
        {
            Ok(c) => Payload::Held(c.to_bytes()),
            Err(e) => return fail(400, format!("reading the request body: {e}")),
        }
    } else {
        Payload::Once(Some(body))
    };
    let policy = catalog.policy_or_default(service);
    let plan = shared.plan(catalog, service, policy, &routes);
    let limits = shared.limits_for(policy);
    let mut last = fail(503, format!("no healthy endpoint for {service}"));
    // Set when the budget already allowed the next attempt (a gateway
    // error is retried only if it may be, else the app gets the answer).
    let mut approved = false;
    // The refusal that ended the previous attempt, if one did.
    let mut refused: Option<Refusal> = None;
    for (i, a) in plan.iter().enumerate() {
        let last_refusal = refused.take();
        if i > 0 && !std::mem::take(&mut approved) {
            let counter = &shared.metrics.http_retries;
            let go_on = match &last_refusal {
                Some(r) => shared.may_fail_over(service, policy, &svc, r, counter),
                None => shared.may_retry(service, policy, &svc, counter),
            };
            if !go_on {
                break;
            }
        }
        let (Hop::Endpoint { address, identity } | Hop::Gateway { address, identity }) = &a.hop
        else {
            continue;
        };
        let key = Key {
            service: service.clone(),
            port,
            address: *address,
            cluster: (!a.local).then(|| a.cluster.to_string()),
            h2: protocol == Protocol::Http2,
        };
        let in_flight = a.load.start();
        let started = Instant::now();
        let pooled = match upgrade {
            Some(_) => None,
            None => shared.upstreams.checkout(&key),
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => {
                let mut header = Header::new(Target::Service {
                    name: service.clone(),
                    port,
                });
                header.connection_id = Some(rand::random());
                header.cluster = key.cluster.clone();
                match connect_one(*address, identity, &shared.connector, &header, &limits).await {
                    Ok(tls) => match Sender::handshake(tls, key.h2, upgrade.is_some()).await {
                        Ok(s) => {
                            if key.h2 {
                                shared.upstreams.share(&key, &s);
                            }
                            s
                        }
                        Err(e) => {
                            drop(in_flight);
                            shared.attempt_failed(service, policy, &svc, a);
                            last = fail(502, format!("{address}: HTTP handshake: {e}"));
                            continue;
                        }
                    },
                    Err(r) => {
                        drop(in_flight);
                        tracing::debug!(member = %a.member, status = %r.code, reason = %fedmesh_wire::bounded(&r.message), "attempt failed");
                        last = Outcome {
                            response: reply(refusal_status(&r), &r.message),
                            cluster: String::new(),
                            attempts: i + 1,
                        };
                        if !r.retryable() {
                            // A denial is an answer, not a failure to fail over.
                            if r.code == StatusCode::Denied {
                                tracing::warn!(%service, reason = %fedmesh_wire::bounded(&r.message), "request denied by the destination");
                            }
                            return last;
                        }
                        shared.attempt_failed(service, policy, &svc, a);
                        refused = Some(r);
                        continue;
                    }
                }
            }
        };
        let Some(body) = payload.take() else {
            // A streamed body went to an earlier attempt: nothing to resend.
            break;
        };
        let mut out = Request::from_parts(parts.clone(), body);
        if !key.h2 {
            // HTTP/1 upstreams get origin-form targets.
            if let Some(pq) = out.uri().path_and_query().cloned() {
                *out.uri_mut() = http::Uri::from(pq);
            }
        }
        match sender.send(out).await {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                if let Some(downstream) = upgrade {
                    drop(in_flight);
                    shared.attempt_ok(service, policy, &svc, a, started.elapsed());
                    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        splice_upgraded(downstream, hyper::upgrade::on(&mut resp));
                    }
                    return Outcome {
                        response: resp.map(Either::Left),
                        cluster: a.cluster.to_string(),
                        attempts: i + 1,
                    };
                }
                let gateway_error = matches!(status, 502..=504);
                if gateway_error
                    && decision.retryable
                    && i + 1 < plan.len()
                    && shared.may_retry(service, policy, &svc, &shared.metrics.http_retries)
                {
                    approved = true;
                    drop(in_flight);
                    shared.attempt_failed(service, policy, &svc, a);
                    shared.upstreams.checkin(key, sender);
                    tracing::info!(member = %a.member, status, "upstream answered with a gateway error; trying the next");
                    last = Outcome {
                        response: reply(status, "upstream error"),
                        cluster: a.cluster.to_string(),
                        attempts: i + 1,
                    };
                    continue;
                }
                if gateway_error {
                    shared.attempt_failed(service, policy, &svc, a);
                } else {
                    shared.attempt_ok(service, policy, &svc, a, started.elapsed());
                }
                drop(in_flight);
                shared.upstreams.checkin(key, sender);
                strip_hop_by_hop(resp.headers_mut());
                return Outcome {
                    response: resp.map(Either::Left),
                    cluster: a.cluster.to_string(),
                    attempts: i + 1,
                };
            }
            Err(e) => {
                drop(in_flight);
                shared.attempt_failed(service, policy, &svc, a);
                tracing::info!(member = %a.member, error = %e, "upstream request failed");
                last = Outcome {
                    response: reply(502, &format!("upstream: {e}")),
                    cluster: String::new(),
                    attempts: i + 1,
                };
                if !decision.retryable {
                    return last;
                }
            }
        }
    }
    last
}

/// Once both sides have switched protocols, carries bytes between them
/// until either closes.
fn splice_upgraded(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((d, u)) => {
                let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::info!(error = %e, "upgrade was not completed"),
        }
    });
}

/// Which upstream connections can carry a request: same destination
/// service and port, same next hop, same cluster named to the gateway,
/// same protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    service: ServiceName,
    port: u16,
    address: SocketAddr,
    cluster: Option<String>,
    h2: bool,
}

/// An upstream connection and when it was opened (connections are
/// retired at `http.max_connection_age`, so traffic moves off a draining
/// or no longer preferred destination even while its connections work).
struct Sender {
    conn: Conn,
    opened: Instant,
}

enum Conn {
    H1(client1::SendRequest<ReqBody>),
    H2(client2::SendRequest<ReqBody>),
}

impl Sender {
    /// `upgrades`: an HTTP/1 connection for one `Upgrade` request.
    async fn handshake(
        tls: fedmesh_transport::TlsClient,
        h2: bool,
        upgrades: bool,
    ) -> hyper::Result<Self> {
        let io = TokioIo::new(tls);
        let conn = if h2 {
            let (send, conn) = client2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Conn::H2(send)
        } else {
            let (send, conn) = client1::handshake(io).await?;
            tokio::spawn(async move {
                let r = match upgrades {
                    true => conn.with_upgrades().await,
                    false => conn.await,
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
                }
            });
            Conn::H1(send)
        };
        Ok(Sender {
            conn,
            opened: Instant::now(),
        })
    }

    async fn send(&mut self, req: Request<ReqBody>) -> hyper::Result<Response<Incoming>> {
        match &mut self.conn {
            Conn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// Reusable upstream connections: idle HTTP/1 connections (one request at
/// a time each, at most `max_idle_per_upstream` kept per key) and one
/// shared HTTP/2 connection per key, each used until `max_connection_age`.
pub(crate) struct Upstreams {
    inner: Arc<Mutex<Pools>>,
    max_idle: usize,
    idle_timeout: Duration,
    max_age: Duration,
}

/// An idle HTTP/1 connection: since when idle, when opened.
type Idle = (client1::SendRequest<ReqBody>, Instant, Instant);

#[derive(Default)]
struct Pools {
    h1: HashMap<Key, Vec<Idle>>,
    h2: HashMap<Key, (client2::SendRequest<ReqBody>, Instant)>,
}

impl Upstreams {
    pub(crate) fn new(limits: &HttpLimits) -> Self {
        Self {
            inner: Arc::default(),
            max_idle: limits.max_idle_per_upstream,
            idle_timeout: limits.idle_timeout,
            max_age: limits.max_connection_age,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pools> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn checkout(&self, key: &Key) -> Option<Sender> {
        let mut p = self.lock();
        let now = Instant::now();
        if key.h2 {
            let (s, opened) = p.h2.get(key)?;
            if s.is_closed() || now.duration_since(*opened) >= self.max_age {
                // Requests already on it finish; new ones get a new one.
                p.h2.remove(key);
                return None;
            }
            return Some(Sender {
                conn: Conn::H2(s.clone()),
                opened: *opened,
            });
        }
        let idle = p.h1.get_mut(key)?;
        while let Some((s, since, opened)) = idle.pop() {
            if now.duration_since(since) < self.idle_timeout
                && now.duration_since(opened) < self.max_age
                && s.is_ready()
            {
                return Some(Sender {
                    conn: Conn::H1(s),
                    opened,
                });
            }
        }
        p.h1.remove(key);
        None
    }

    fn share(&self, key: &Key, s: &Sender) {
        if let Conn::H2(c) = &s.conn {
            self.lock().h2.insert(key.clone(), (c.clone(), s.opened));
        }
    }

    /// Gives a connection back once its response is done with. An
    /// HTTP/1 connection is reusable only after the app read the whole
    /// response body; until then it waits here, off the request path.
    fn checkin(&self, key: Key, s: Sender) {
        let Conn::H1(mut c) = s.conn else {
            return;
        };
        let opened = s.opened;
        if opened.elapsed() >= self.max_age {
            return;
        }
        let inner = self.inner.clone();
        let (max, idle, age) = (self.max_idle, self.idle_timeout, self.max_age);
        tokio::spawn(async move {
            if !matches!(tokio::time::timeout(idle, c.ready()).await, Ok(Ok(()))) {
                return;
            }
            let mut p = match inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let now = Instant::now();
            let list = p.h1.entry(key).or_default();
            list.retain(|(c, since, opened)| {
                now.duration_since(*since) < idle
                    && now.duration_since(*opened) < age
                    && !c.is_closed()
            });
            if list.len() < max {
                list.push((c, now, opened));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_do_not_travel() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-canary", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-canary"));
        // gRPC's `te: trailers` survives; other TE values do not.
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn refusals_map_to_http_statuses() {
        let r = |code| refusal_status(&Refusal::new(code, "x"));
        assert_eq!(r(StatusCode::Denied), 403);
        assert_eq!(r(StatusCode::NoHealthyEndpoint), 503);
        assert_eq!(r(StatusCode::UpstreamRefused), 502);
    }
}
