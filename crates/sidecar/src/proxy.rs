//! The sidecar's listeners and per-connection logic.

use std::net::SocketAddr;

use std::sync::{Arc, RwLock};

use fedmesh_catalog::{Attempt, Balancers, Catalog, Ejection, Hop, Member, ServicePolicy};
use fedmesh_transport::admin;
use fedmesh_transport::{
    accept_tls, answer, check_hops, connect_one, read_request, serve_tcp, splice, Limits, Refusal,
    TunnelIo,
};
use fedmesh_trust::{ClientAuth, PeerPolicy, SpiffeId, SvidSource};
use fedmesh_wire::{Header, ServiceName, Status, StatusCode, Target, Traceparent};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::Instrument;

use crate::config::{HttpLimits, InboundRoute, OutboundProtocol, OutboundRoute, SidecarSettings};
use crate::detect::{detect, Protocol, Rewind};
use crate::metrics::{LatencyLabels, MemberLabels, ServiceLabels, SidecarMetrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    #[error(transparent)]
    Tls(#[from] fedmesh_trust::TlsError),
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    catalog: RwLock<Arc<Catalog>>,
    pub(crate) identity: SpiffeId,
    pub(crate) limits: Limits,
    pub(crate) http: HttpLimits,
    pub(crate) metrics: Arc<SidecarMetrics>,
    pub(crate) connector: TlsConnector,
    /// Pooled, multiplexed connections to this cluster's gateway.
    pub(crate) gateway_legs: fedmesh_transport::LegPool,
    inbound: Vec<InboundRoute>,
    /// Ports served for any service that lists this sidecar's identity
    /// among its endpoints (app on 127.0.0.1:port).
    app_ports: Vec<u16>,
    /// Where the inbound listener is bound; an endpoint target naming it
    /// means "this sidecar's (only) service".
    inbound_addr: std::sync::OnceLock<SocketAddr>,
    /// Per-service outlier, load and budget state, kept across catalog updates.
    pub(crate) balancers: Balancers,
    /// Upstream HTTP connections of the L7 path, reused across requests.
    pub(crate) upstreams: crate::http::Upstreams,
    /// Readiness, applied config version.
    config: admin::ConfigState,
    /// Faults a drill announced: what they cause is logged at debug.
    announced: fedmesh_transport::Announced,
}

impl Shared {
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Counts a request for `service` and plans where it may go, best first.
    pub(crate) fn plan(
        &self,
        catalog: &Catalog,
        service: &ServiceName,
        policy: &ServicePolicy,
        routes: &[fedmesh_catalog::ClusterRoute],
    ) -> Vec<Attempt> {
        let now = Instant::now();
        self.balancers.with(service, policy, |b| {
            b.request(now);
            let max = b.attempts().min(self.limits.max_attempts);
            b.plan(&catalog.cluster, routes, max, &mut rand::thread_rng(), now)
        })
    }

    /// The proxy's limits with the policy's connect timeout, if it sets one.
    pub(crate) fn limits_for(&self, policy: &ServicePolicy) -> std::borrow::Cow<'_, Limits> {
        match policy.connect_timeout {
            Some(t) => std::borrow::Cow::Owned(Limits {
                connect_timeout: t,
                ..self.limits.clone()
            }),
            None => std::borrow::Cow::Borrowed(&self.limits),
        }
    }

    /// Before an attempt after the first: whether the service's retry
    /// budget allows it. Counted in `counter` when it does.
    pub(crate) fn may_retry(
        &self,
        service: &ServiceName,
        policy: &ServicePolicy,
        svc: &str,
        counter: &Family<ServiceLabels, Counter>,
    ) -> bool {
        if self
            .balancers
            .with(service, policy, |b| b.try_retry(Instant::now()))
        {
            self.metrics.inc_service(counter, svc);
            true
        } else {
            self.metrics
                .inc_service(&self.metrics.budget_exhausted, svc);
            tracing::warn!(service = svc, "retry budget spent; not trying again");
            false
        }
    }

    /// Before an attempt after one refused with `last`: a peer the gateway
    /// already knows is down cost nothing anywhere, so moving on from it is
    /// free; anything else takes the retry budget.
    pub(crate) fn may_fail_over(
        &self,
        service: &ServiceName,
        policy: &ServicePolicy,
        svc: &str,
        last: &Refusal,
        counter: &Family<ServiceLabels, Counter>,
    ) -> bool {
        if last.code == StatusCode::PeerDown {
            self.metrics.inc_service(counter, svc);
            return true;
        }
        self.may_retry(service, policy, svc, counter)
    }

    /// An attempt's connection (or request) succeeded after `took`.
    pub(crate) fn attempt_ok(
        &self,
        service: &ServiceName,
        policy: &ServicePolicy,
        svc: &str,
        a: &Attempt,
        took: Duration,
    ) {
        let now = Instant::now();
        a.load.observe(took, now);
        self.balancers.with(service, policy, |b| b.success(a, now));
        self.metrics
            .connect_latency
            .get_or_create(&LatencyLabels {
                service: svc.to_owned(),
                cluster: a.cluster.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// An attempt failed in a way that counts against its member.
    pub(crate) fn attempt_failed(
        &self,
        service: &ServiceName,
        policy: &ServicePolicy,
        svc: &str,
        a: &Attempt,
    ) {
        let now = Instant::now();
        if let Some(Ejection::Ejected(d)) =
            self.balancers.with(service, policy, |b| b.failure(a, now))
        {
            let kind = match a.member {
                Member::Endpoint(_) => "endpoint",
                Member::Cluster(_) => "cluster",
            };
            self.metrics
                .ejections
                .get_or_create(&MemberLabels {
                    service: svc.to_owned(),
                    kind,
                })
                .inc();
            let expected = match &a.member {
                Member::Cluster(c) => self
                    .announced
                    .expects(self.catalog().cluster.as_str(), c.as_str()),
                Member::Endpoint(_) => false,
            };
            fedmesh_transport::warn_unless_announced!(
                expected,
                member = %a.member, for_ = ?d, "ejected after consecutive failures"
            );
        }
    }
}

/// A running sidecar. Dropping it stops its listeners.
pub struct Sidecar {
    shared: Arc<Shared>,
    identity: SvidSource,
    outbound: Vec<OutboundRoute>,
    inbound_addr: Option<SocketAddr>,
    transparent_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), SidecarError> {
    let err = |source| SidecarError::Bind { what, addr, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

impl Sidecar {
    pub async fn build(s: SidecarSettings, registry: &mut Registry) -> Result<Self, SidecarError> {
        let metrics = Arc::new(SidecarMetrics::default());
        metrics.register(registry);
        // Renewal stores a new SVID here; every listener and dialer below
        // presents it from the next handshake on.
        let source = SvidSource::new(s.identity.clone())?;
        let client_tls = fedmesh_trust::client_config_from(
            &source,
            s.bundles.clone(),
            PeerPolicy::AnyTrusted,
            &[fedmesh_wire::ALPN],
        )?;
        let shared = Arc::new(Shared {
            identity: s.identity.id().clone(),
            limits: s.limits.clone(),
            http: s.http.clone(),
            upstreams: crate::http::Upstreams::new(&s.http),
            metrics,
            connector: TlsConnector::from(Arc::new(client_tls)),
            gateway_legs: fedmesh_transport::LegPool::new(
                &source,
                s.bundles.clone(),
                s.limits.clone(),
            )?,
            inbound: s
                .inbound
                .as_ref()
                .map(|i| i.routes.clone())
                .unwrap_or_default(),
            app_ports: s
                .inbound
                .as_ref()
                .map(|i| i.app_ports.clone())
                .unwrap_or_default(),
            catalog: RwLock::new(Arc::new(s.catalog.clone())),
            inbound_addr: std::sync::OnceLock::new(),
            balancers: Balancers::default(),
            config: admin::ConfigState::new(s.controller.is_none()),
            announced: fedmesh_transport::Announced::default(),
        });
        shared.gateway_legs.counts.register(
            registry.sub_registry_with_prefix("fedmesh_sidecar"),
            "gateway_pool",
            "this cluster's gateway",
        );
        let mut tasks = Vec::new();
        let mut outbound = Vec::new();
        for o in &s.outbound {
            let (l, local) = bind("outbound", o.listen).await?;
            tracing::info!(listen = %local, service = %o.service, port = o.port, "outbound listener");
            outbound.push(OutboundRoute {
                listen: local,
                ..o.clone()
            });
            tasks.push(tokio::spawn(accept_outbound(
                shared.clone(),
                l,
                o.service.clone(),
                o.port,
                o.protocol,
            )));
        }
        let mut transparent_addr = None;
        if let Some(addr) = s.transparent {
            let (l, local) = bind("transparent", addr).await?;
            tracing::info!(listen = %local, "transparent outbound listener");
            transparent_addr = Some(local);
            tasks.push(tokio::spawn(accept_transparent(shared.clone(), l, local)));
        }
        let mut inbound_addr = None;
        if let Some(inbound) = &s.inbound {
            // Only this cluster's workloads and gateway may connect: remote
            // callers always arrive through the gateway.
            let own = PeerPolicy::trust_domain(s.catalog.trust_domain.clone());
            let tls = fedmesh_trust::server_config_from(
                &source,
                s.bundles.clone(),
                own,
                // One stream per connection, or many over HTTP/2 (the
                // gateway's pooled connections).
                &[fedmesh_wire::ALPN_H2, fedmesh_wire::ALPN],
                ClientAuth::Required,
            )?;
            let (l, local) = bind("inbound", inbound.listen).await?;
            tracing::info!(listen = %local, identity = %s.identity.id(), "inbound listener");
            inbound_addr = Some(local);
            let _ = shared.inbound_addr.set(local);
            tasks.push(tokio::spawn(accept_inbound(
                shared.clone(),
                l,
                TlsAcceptor::from(Arc::new(tls)),
            )));
        }
        let mut admin_addr = None;
        if let Some(addr) = s.admin {
            let m = shared.metrics.clone();
            let dump = {
                let shared = shared.clone();
                let id = s.identity.id().clone();
                let bundles = s.bundles.clone();
                Arc::new(move || shared.catalog().config_dump(&id, &bundles.load()))
                    as admin::JsonFn
            };
            let register = |reg: &mut Registry| {
                m.register(reg);
                let sub = reg.sub_registry_with_prefix("fedmesh_sidecar");
                shared.config.register(sub);
                shared
                    .gateway_legs
                    .counts
                    .register(sub, "gateway_pool", "this cluster's gateway");
            };
            let ready = shared.config.ready_flag();
            let (bound, task) = admin::spawn_with(addr, register, ready, None, Some(dump))
                .await
                .map_err(|source| SidecarError::Bind {
                    what: "admin",
                    addr,
                    source,
                })?;
            admin_addr = Some(bound);
            tasks.push(task);
        }
        Ok(Self {
            shared,
            identity: source,
            outbound,
            inbound_addr,
            transparent_addr,
            admin_addr,
            tasks,
        })
    }

    /// Where the transparent listener is bound, when there is one.
    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent_addr
    }

    /// Outbound listeners, with the addresses actually bound.
    pub fn outbound(&self) -> &[OutboundRoute] {
        &self.outbound
    }

    /// The outbound listener for `service`, if there is one.
    pub fn outbound_addr(&self, service: &ServiceName) -> Option<SocketAddr> {
        self.outbound
            .iter()
            .find(|o| &o.service == service)
            .map(|o| o.listen)
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The SVID the sidecar presents; store a renewed one here.
    pub fn identity_source(&self) -> &SvidSource {
        &self.identity
    }

    /// What the pool of connections to the gateway has done.
    pub fn gateway_pool(&self) -> &fedmesh_transport::PoolCounts {
        &self.shared.gateway_legs.counts
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.shared.identity
    }

    pub fn metrics(&self) -> &SidecarMetrics {
        &self.shared.metrics
    }

    /// Announces that `cluster` is broken on purpose (a failover drill;
    /// `on: false` when it is over): the failures it causes are logged at
    /// debug instead of warn. Counters are unaffected.
    pub fn announce_fault(&self, cluster: &str, on: bool) {
        self.shared.announced.set(cluster, on);
    }

    pub fn set_catalog(&self, catalog: Catalog) {
        self.set_config(catalog, None);
    }

    /// Replaces the catalog with version `version` of the controller's
    /// config (counted, and the sidecar is ready from then on).
    pub fn set_config(&self, catalog: Catalog, version: Option<u64>) {
        {
            let mut g = match self.shared.catalog.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *g = Arc::new(catalog);
        }
        self.shared.config.applied(version);
    }

    /// What `/ready` answers: a config is in place.
    pub fn is_ready(&self) -> bool {
        self.shared.config.is_ready()
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn new_traceparent() -> Option<Traceparent> {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    Traceparent::parse(&format!("00-{trace:032x}-{span:016x}-01")).ok()
}

/// Accepts on `listener` (bounded by `limits.max_connections`, the excess
/// closed and counted) and runs `handle` for each connection.
async fn serve_listener<H, Fut>(
    shared: &Arc<Shared>,
    listener: TcpListener,
    what: &'static str,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let m = shared.metrics.clone();
    let limit = shared.limits.max_connections;
    serve_tcp(
        listener,
        what,
        limit,
        move |_| m.reject("connection_limit"),
        handle,
    )
    .await
}

/// One app connection to `service:port`, in its own span.
async fn outbound_traced(
    shared: Arc<Shared>,
    tcp: TcpStream,
    service: ServiceName,
    port: u16,
    protocol: OutboundProtocol,
    remote: SocketAddr,
) {
    let id: u64 = rand::random();
    let span = tracing::debug_span!(
        "outbound",
        id,
        %service,
        %remote,
        trace = tracing::field::Empty
    );
    outbound_conn(&shared, tcp, &service, port, protocol, id)
        .instrument(span)
        .await
}

async fn accept_outbound(
    shared: Arc<Shared>,
    listener: TcpListener,
    service: ServiceName,
    port: u16,
    protocol: OutboundProtocol,
) {
    serve_listener(&shared.clone(), listener, "outbound", |tcp, remote| {
        outbound_traced(shared.clone(), tcp, service.clone(), port, protocol, remote)
    })
    .await
}

/// Where a connection accepted by the transparent listener was going:
/// its original destination when the kernel redirected it, else the
/// address it connected to (`None` for the second: not redirected).
fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let orig = match tcp.local_addr() {
        Ok(SocketAddr::V6(_)) => sock.original_dst_v6(),
        _ => sock.original_dst_v4(),
    };
    orig.ok().and_then(|a| a.as_socket())
}

async fn accept_transparent(shared: Arc<Shared>, listener: TcpListener, local: SocketAddr) {
    serve_listener(&shared.clone(), listener, "transparent", |tcp, remote| {
        transparent_conn(shared.clone(), tcp, remote, local)
    })
    .await
}

async fn transparent_conn(
    shared: Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
) {
    let count = |result| {
        shared
            .metrics
            .transparent
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
    };
    let redirected = original_dst(&tcp).filter(|d| *d != local);
    let Some(dst) = redirected.or_else(|| tcp.local_addr().ok()) else {
        return count("refused");
    };
    let service = shared
        .catalog()
        .service_for_vip(dst.ip(), dst.port())
        .cloned();
    match (service, redirected) {
        (Some(service), _) => {
            count("mesh");
            let protocol = OutboundProtocol::Detect;
            outbound_traced(shared.clone(), tcp, service, dst.port(), protocol, remote).await
        }
        (None, Some(dst)) => passthrough(&shared, tcp, dst, &count).await,
        // Connected to the listener itself: nothing to pass through to
        // (it would loop).
        (None, None) => {
            tracing::debug!(%remote, "not redirected and not a service VIP; closing");
            count("refused");
        }
    }
}

/// A redirected connection to something outside the mesh: connected to
/// as the app meant (the sidecar's own UID is not redirected) and spliced.
async fn passthrough(
    shared: &Shared,
    mut app: TcpStream,
    dst: SocketAddr,
    count: &impl Fn(&'static str),
) {
    let connect =
        tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(dst)).await;
    let mut up = match connect {
        Ok(Ok(up)) => {
            let _ = up.set_nodelay(true);
            up
        }
        Ok(Err(e)) => {
            tracing::debug!(%dst, error = %e, "passthrough connect failed");
            return count("refused");
        }
        Err(_) => {
            tracing::debug!(%dst, "passthrough connect timed out");
            return count("refused");
        }
    };
    count("passthrough");
    let _ = up.set_nodelay(true);
    let _ = app.set_nodelay(true);
    match splice(&mut app, &mut up, shared.limits.splice_buffer_bytes).await {
        Ok((a, b)) => {
            shared.metrics.bytes.inc_by(a + b);
        }
        Err(e) => tracing::debug!(%dst, error = %e, "passthrough ended with an error"),
    }
}

async fn outbound_conn(
    shared: &Arc<Shared>,
    app: TcpStream,
    service: &ServiceName,
    port: u16,
    protocol: OutboundProtocol,
    id: u64,
) {
    let _ = app.set_nodelay(true);
    let mut first = bytes::BytesMut::new();
    let mut app = app;
    let detected = match protocol {
        OutboundProtocol::Tcp => Protocol::Opaque,
        OutboundProtocol::Detect => {
            match detect(
                &mut app,
                &mut first,
                shared.http.max_header_bytes,
                shared.http.detect_timeout,
            )
            .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "app connection failed before it was classified");
                    return;
                }
            }
        }
    };
    let name = match detected {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Opaque => "opaque",
    };
    shared
        .metrics
        .protocols
        .get_or_create(&crate::metrics::ProtocolLabels { protocol: name })
        .inc();
    let app = Rewind::new(first, app);
    if detected != Protocol::Opaque {
        crate::http::serve(shared.clone(), app, detected, service.clone(), port).await;
        return;
    }
    opaque_conn(shared, app, service, port, id).await
}

/// An outbound connection carried as bytes: planned once, failed over at
/// connect level, then spliced.
async fn opaque_conn(
    shared: &Shared,
    mut app: Rewind<TcpStream>,
    service: &ServiceName,
    port: u16,
    id: u64,
) {
    let catalog = shared.catalog();
    // `NAME.NS`: a bare name would merge equal names of two namespaces.
    let svc_label = service.to_string();
    let svc = svc_label.as_str();
    let routes = match catalog.outbound_routes(service, port) {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.outbound(svc, "failed", "");
            tracing::warn!(error = %e, "no route; closing the app connection");
            return;
        }
    };
    let policy = catalog.policy_or_default(service);
    let now = Instant::now();
    let attempts = shared.plan(&catalog, service, policy, &routes);
    let limits = shared.limits_for(policy);
    let mut header = Header::new(Target::Service {
        name: service.clone(),
        port,
    });
    header.connection_id = Some(id);
    header.traceparent = new_traceparent();
    if let Some(t) = &header.traceparent {
        tracing::Span::current().record("trace", t.as_str());
    }
    let mut last = Refusal::new(StatusCode::NoHealthyEndpoint, "nothing to try");
    for (i, a) in attempts.iter().enumerate() {
        if i > 0 && !shared.may_fail_over(service, policy, svc, &last, &shared.metrics.failovers) {
            break;
        }
        let (Hop::Endpoint { address, identity } | Hop::Gateway { address, identity }) = &a.hop
        else {
            continue;
        };
        // Through the gateway, name the cluster this plan chose; the
        // gateway tries only that one and the plan moves on if it fails.
        header.cluster = (!a.local).then(|| a.cluster.to_string());
        let in_flight = a.load.start();
        let started = Instant::now();
        // To the gateway, over a pooled connection when pooling is on;
        // to a sidecar of this cluster, over a connection of its own.
        let opened: Result<Box<dyn TunnelIo>, Refusal> = match &a.hop {
            Hop::Gateway { .. } if shared.gateway_legs.enabled() => {
                shared.gateway_legs.open(*address, identity, &header).await
            }
            _ => connect_one(*address, identity, &shared.connector, &header, &limits)
                .await
                .map(|s| Box::new(s) as Box<dyn TunnelIo>),
        };
        match opened {
            Ok(mut up) => {
                shared.attempt_ok(service, policy, svc, a, started.elapsed());
                let cluster = a.cluster.as_str();
                shared
                    .metrics
                    .outbound(svc, if a.local { "local" } else { "gateway" }, cluster);
                tracing::debug!(%cluster, hop = %address, attempt = i, "outbound stream open");
                let (sent, received) =
                    match splice(&mut app, &mut up, shared.limits.splice_buffer_bytes).await {
                        Ok((a, b)) => {
                            shared.metrics.bytes.inc_by(a + b);
                            (a, b)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "outbound stream ended with an error");
                            (0, 0)
                        }
                    };
                drop(in_flight);
                access(
                    &header,
                    None,
                    "outbound",
                    svc,
                    cluster,
                    "ok",
                    i + 1,
                    sent,
                    received,
                    now,
                );
                return;
            }
            Err(r) => {
                drop(in_flight);
                // Per attempt (counted as failovers): debug, or an outage
                // floods the log.
                tracing::debug!(member = %a.member, status = %r.code, reason = %fedmesh_wire::bounded(&r.message), "attempt failed");
                let retryable = r.retryable();
                if retryable {
                    shared.attempt_failed(service, policy, svc, a);
                }
                last = r;
                if !retryable {
                    break;
                }
            }
        }
    }
    shared.metrics.outbound(svc, "failed", "");
    tracing::warn!(status = %last.code, reason = %fedmesh_wire::bounded(&last.message), "every attempt failed; closing the app connection");
    access(
        &header,
        None,
        "outbound",
        svc,
        "",
        last.code.as_str(),
        attempts.len(),
        0,
        0,
        now,
    );
}

/// One access-log line per connection (target `fedmesh::access`, level
/// info; `--log-json` makes it structured). Off unless the log filter
/// enables that target.
#[allow(clippy::too_many_arguments)]
fn access(
    header: &Header,
    source: Option<&str>,
    direction: &'static str,
    service: &str,
    peer: &str,
    result: &str,
    attempts: usize,
    sent: u64,
    received: u64,
    started: Instant,
) {
    tracing::info!(
        target: "fedmesh::access",
        direction,
        service,
        peer,
        result,
        attempts,
        sent,
        received,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        id = header.connection_id,
        traceparent = header.traceparent.as_ref().map(|t| t.as_str()),
        source,
    );
}

async fn accept_inbound(shared: Arc<Shared>, listener: TcpListener, acceptor: TlsAcceptor) {
    serve_listener(&shared.clone(), listener, "inbound", |tcp, remote| {
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        async move { inbound_conn(&shared, tcp, remote, &acceptor).await }
    })
    .await
}

async fn inbound_conn(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
) {
    let (down, peer) = match accept_tls(acceptor, tcp, shared.limits.handshake_timeout).await {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.reject(e.reason());
            tracing::warn!(%remote, error = %e, "inbound TLS handshake refused");
            return;
        }
    };
    // One stream, or a pooled connection's many (from the gateway): each
    // is served as the identity the handshake verified.
    let handle = {
        let shared = shared.clone();
        move |mut io: Box<dyn TunnelIo>| {
            let shared = shared.clone();
            let peer = peer.clone();
            async move {
                inbound_stream(&shared, &mut io, peer, remote).await;
                fedmesh_transport::close(&mut io).await;
            }
        }
    };
    if let Err(e) = fedmesh_transport::serve_streams(down, &shared.limits, handle).await {
        tracing::debug!(%remote, error = %e, "pooled inbound connection ended");
    }
}

/// One inbound tunnel stream: its own TLS connection, or a stream of a
/// pooled one. The caller closes it (after a refusal too, so the status
/// frame is delivered).
async fn inbound_stream<S: TunnelIo>(
    shared: &Shared,
    down: &mut S,
    peer: SpiffeId,
    remote: SocketAddr,
) {
    let refuse = |code: StatusCode, msg: String| {
        tracing::info!(%remote, %peer, status = %code, reason = %fedmesh_wire::bounded(&msg), "inbound stream refused");
        Status::new(code, msg)
    };
    let header = match read_request(down, &shared.limits).await {
        Ok(h) => h,
        Err(e) => {
            shared.metrics.reject(e.reason());
            let code = e.status();
            answer(down, &refuse(code, e.to_string())).await;
            return;
        }
    };
    if let Err(why) = check_hops(&header) {
        shared.metrics.reject("loop");
        answer(down, &refuse(StatusCode::Loop, why)).await;
        return;
    }
    // Only our own gateway may relay a caller's identity; from anyone else
    // the caller is whoever the certificate says.
    let gateway = shared.catalog().gateway_identity();
    let (source, via) = if peer == gateway {
        match header.source.as_deref().map(SpiffeId::new) {
            Some(Ok(id)) => (id, "gateway"),
            _ => {
                shared.metrics.reject("bad_source");
                answer(
                    down,
                    &refuse(
                        StatusCode::Denied,
                        "gateway stream without a valid source identity".into(),
                    ),
                )
                .await;
                return;
            }
        }
    } else {
        (peer.clone(), "direct")
    };
    let app = match &header.target {
        Target::Service { name, port } => shared
            .inbound
            .iter()
            .find(|r| &r.service == name && r.port == *port)
            .map(|r| (r.service.clone(), r.app))
            .or_else(|| {
                let ours = shared.app_ports.contains(port)
                    && shared.catalog().service(name).is_some_and(|s| {
                        s.ports.contains(port)
                            && s.endpoints.iter().any(|e| e.identity == shared.identity)
                    });
                ours.then(|| (name.clone(), SocketAddr::from(([127, 0, 0, 1], *port))))
            }),
        // An endpoint target names either an app directly, or this sidecar's
        // listener as the catalog lists it (unambiguous only with one route).
        Target::Endpoint(addr) => shared
            .inbound
            .iter()
            .find(|r| r.app == *addr)
            .or_else(|| match shared.inbound.as_slice() {
                [only] if shared.inbound_addr.get() == Some(addr) => Some(only),
                _ => None,
            })
            .map(|r| (r.service.clone(), r.app)),
    };
    let Some((service, app_addr)) = app else {
        answer(
            down,
            &refuse(
                StatusCode::UnknownService,
                format!("this sidecar does not serve {}", header.target),
            ),
        )
        .await;
        return;
    };
    // Authorization is decided here, where the request lands, on the
    // source identity established above.
    let svc_label = service.to_string();
    if let Err(e) = shared.catalog().authorize(&service, &source) {
        shared
            .metrics
            .inc_service(&shared.metrics.denied, &svc_label);
        shared.metrics.reject("denied");
        // `source` may be relayed from another cluster (≤ 2 KiB): bounded.
        tracing::warn!(%remote, source = %fedmesh_wire::bounded(source.as_str()), via, %service, "denied by authorization policy");
        answer(down, &refuse(StatusCode::Denied, e.to_string())).await;
        return;
    }
    let connect =
        tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(app_addr)).await;
    let mut app = match connect {
        Ok(Ok(s)) => {
            // As every socket a proxy writes to: no Nagle delay.
            let _ = s.set_nodelay(true);
            s
        }
        Ok(Err(e)) => {
            answer(
                down,
                &refuse(StatusCode::UpstreamRefused, format!("app {app_addr}: {e}")),
            )
            .await;
            return;
        }
        Err(_) => {
            answer(
                down,
                &refuse(
                    StatusCode::UpstreamRefused,
                    format!("app {app_addr}: connect timed out"),
                ),
            )
            .await;
            return;
        }
    };
    let _ = app.set_nodelay(true);
    shared.metrics.inbound(&svc_label, source.as_str(), via);
    tracing::debug!(source = %fedmesh_wire::bounded(source.as_str()), via, %service, id = header.connection_id, "inbound stream accepted");
    if !answer(down, &Status::ok()).await {
        return;
    }
    let accepted = Instant::now();
    let (sent, received) = match splice(down, &mut app, shared.limits.splice_buffer_bytes).await {
        Ok((a, b)) => {
            shared.metrics.bytes.inc_by(a + b);
            (a, b)
        }
        Err(e) => {
            tracing::debug!(error = %e, "inbound stream ended with an error");
            (0, 0)
        }
    };
    access(
        &header,
        Some(source.as_str()),
        "inbound",
        &svc_label,
        via,
        "ok",
        1,
        received,
        sent,
        accepted,
    );
}
