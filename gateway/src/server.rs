//! The gateway app: binds the QUIC port and the optional TCP fallback port
//! (peers), and the TLS/TCP tunnel port (this cluster's sidecars), and
//! forwards each tunnel stream to where the catalog says it goes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use fedmesh_catalog::{Catalog, Hop, Peer};
use fedmesh_transport::{
    accept_tls, answer, check_hops, connect_first, open, read_request, serve_tcp, Limits, OpenError,
};
use fedmesh_transport::{admin, Cut, TunnelIo};
use fedmesh_trust::{ClientAuth, PeerPolicy, SpiffeId, SvidSource};
use fedmesh_wire::{Header, Status, StatusCode};
use prometheus_client::registry::Registry;
use quinn::{Connection, Endpoint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::Instrument;

use crate::config::GatewaySettings;
use crate::fault::FaultView;
use crate::metrics::{AttemptFailure, GatewayMetrics};
use crate::pool::{self, Dialer, PeerConn, Pool, CLOSE_POLICY};
use crate::splice::PeerStream;
use crate::{quic, tcp};

const FROM_SIDECAR: &str = "from_sidecar";
const FROM_PEER: &str = "from_peer";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
    #[error(transparent)]
    Tls(#[from] fedmesh_trust::TlsError),
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Shared {
    catalog: RwLock<Arc<Catalog>>,
    limits: Limits,
    /// QUIC configs per congestion controller (chosen per peer).
    quic: quic::PeerConfigs,
    metrics: GatewayMetrics,
    endpoint: Endpoint,
    connector: TlsConnector,
    /// Pooled, multiplexed connections to this cluster's sidecars.
    sidecar_legs: fedmesh_transport::LegPool,
    pool: Pool,
    balancers: fedmesh_catalog::Balancers,
    /// Refuse new streams from peers (retryable elsewhere); keep the rest.
    /// Readiness, applied config version, draining.
    config: admin::ConfigState,
    cursor: AtomicUsize,
    next_id: AtomicU64,
    /// Set when the gateway closes: accepted TCP connections end.
    stopped: tokio::sync::watch::Sender<bool>,
    /// Faults a drill announced (shared with the pool's dialer).
    announced: fedmesh_transport::Announced,
    /// Woken by every new catalog.
    catalog_changed: tokio::sync::Notify,
    /// Drill faults at the UDP socket, and the faults in force (applied
    /// again when the catalog moves a peer).
    socket_faults: Arc<quic::SocketFaults>,
    faults: RwLock<Arc<FaultView>>,
}

impl Shared {
    fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The peer whose gateway presents `id`. Two clusters' controllers
    /// learn that they trust each other at slightly different times, so a
    /// peer's dial can beat the catalog that names it here: an identity of
    /// a trust domain no peer has yet waits up to the handshake timeout
    /// for a catalog that names it.
    async fn peer_for(&self, id: &SpiffeId) -> Option<Peer> {
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        loop {
            let changed = self.catalog_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let catalog = self.catalog();
            if let Some(p) = catalog.peer_by_identity(id) {
                return Some(p.clone());
            }
            // A known peer's trust domain but not its gateway: a workload
            // on the peer port, not a race.
            let td = id.trust_domain_name();
            if catalog.peers().any(|p| p.trust_domain.as_str() == td) {
                return None;
            }
            tracing::debug!(id = %fedmesh_wire::bounded(id.as_str()), "identity is no peer gateway (yet); waiting for the catalog");
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Applies a drill's faults: drain, and per peer the datagrams to and
    /// from its gateway (its advertised address and those of the
    /// connections it has now) dropped or delayed.
    fn apply_faults(&self, view: FaultView) {
        self.config.set_drill_draining(view.draining);
        let catalog = self.catalog();
        let live = self.pool.remote_addresses();
        let mut t = quic::AddrFaults::default();
        for p in catalog.peers() {
            let addrs: Vec<SocketAddr> = std::iter::once(p.address)
                .chain(
                    live.iter()
                        .filter(|(c, _)| c == &p.cluster)
                        .map(|(_, a)| *a),
                )
                .collect();
            if view.blackholed.contains(&p.cluster) || view.udp_dropped.contains(&p.cluster) {
                t.drop.extend(addrs.iter().copied());
            }
            if let Some(d) = view.delay(&p.cluster) {
                t.delay.extend(addrs.iter().map(|a| (*a, d)));
            }
        }
        self.pool.set_blocked(view.blackholed.clone());
        self.socket_faults.set(t);
        match self.faults.write() {
            Ok(mut g) => *g = Arc::new(view),
            Err(p) => *p.into_inner() = Arc::new(view),
        }
    }

    fn fault_view(&self) -> Arc<FaultView> {
        match self.faults.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn cursor(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// The admin `/status` document: drain state and how peers are reached.
    fn status_json(&self) -> String {
        let catalog = self.catalog();
        serde_json::json!({
            "cluster": catalog.cluster.as_str(),
            "draining": self.config.is_draining(),
            "drill_faults": {
                "blackholed": self.fault_view().blackholed.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                "udp_dropped": self.fault_view().udp_dropped.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                "delayed": self.fault_view().delayed.iter().map(|(c, d)| (c.as_str(), d.as_millis())).collect::<Vec<_>>(),
                "draining": self.fault_view().draining,
            },
            "quic_connections": self.endpoint.open_connections(),
            "peers": self.pool.status(),
        })
        .to_string()
    }
}

/// The drill API's metrics and the socket's drill counters, in `reg`.
fn register_drills(
    reg: &mut Registry,
    metrics: &crate::drills::DrillMetrics,
    socket: &quic::SocketFaults,
) {
    metrics.register(reg);
    let sub = reg.sub_registry_with_prefix("fedmesh_gateway_drill");
    sub.register(
        "datagrams_dropped",
        "Datagrams a drill fault dropped (to or from a peer, or a delayed one over the bound)",
        socket.dropped.clone(),
    );
    sub.register(
        "datagrams_delayed",
        "Datagrams a drill fault delayed",
        socket.delayed.clone(),
    );
}

/// A running gateway. Dropping it stops its listeners.
pub struct Gateway {
    shared: Arc<Shared>,
    identity: SvidSource,
    quic_addr: SocketAddr,
    tunnel_addr: SocketAddr,
    fallback_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    drills_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds every listener and starts serving. Metrics go into `registry`.
    pub async fn build(s: GatewaySettings, registry: &mut Registry) -> Result<Self, GatewayError> {
        let metrics = GatewayMetrics::default();
        metrics.register(registry);
        // Renewal stores a new SVID here; every listener and dialer below
        // presents it from the next handshake on.
        let identity = SvidSource::new(s.identity.clone())?;
        let sidecar_legs =
            fedmesh_transport::LegPool::new(&identity, s.bundles.clone(), s.limits.clone())?;
        sidecar_legs.counts.register(
            registry.sub_registry_with_prefix("fedmesh_gateway"),
            "sidecar_pool",
            "this cluster's sidecars",
        );
        let quic_configs =
            quic::PeerConfigs::new(&identity, s.bundles.clone(), &s.limits, &s.congestion)?;
        let socket_faults = Arc::new(quic::SocketFaults::default());
        let endpoint = quic::endpoint(
            s.quic,
            quic_configs.default_server(),
            &s.limits,
            quic::SocketCounters::of(&metrics),
            socket_faults.clone(),
        )?;
        let quic_addr = endpoint.local_addr().map_err(|source| GatewayError::Bind {
            what: "QUIC",
            addr: s.quic,
            source,
        })?;
        // Sidecars reach the gateway only from inside the cluster: the TLS
        // handshake itself refuses any other trust domain.
        let own = PeerPolicy::trust_domain(s.catalog.trust_domain.clone());
        // One stream per connection (`fedmesh/1`), or many multiplexed
        // over HTTP/2 (`fedmesh-h2/1`, a sidecar's pooled connection).
        let tunnel_tls = fedmesh_trust::server_config_from(
            &identity,
            s.bundles.clone(),
            own,
            &[fedmesh_wire::ALPN_H2, fedmesh_wire::ALPN],
            ClientAuth::Required,
        )?;
        let client_tls = fedmesh_trust::client_config_from(
            &identity,
            s.bundles.clone(),
            PeerPolicy::AnyTrusted,
            &[fedmesh_wire::ALPN],
        )?;
        // The TCP fallback checks peers like QUIC does: any SVID of a
        // trusted domain completes the handshake, the catalog decides next.
        let fallback_client = fedmesh_trust::client_config_from(
            &identity,
            s.bundles.clone(),
            PeerPolicy::AnyTrusted,
            &[tcp::ALPN_H2],
        )?;
        let fallback = match s.tcp_fallback {
            None => None,
            Some(addr) => {
                let bind = |source| GatewayError::Bind {
                    what: "TCP fallback",
                    addr,
                    source,
                };
                let l = TcpListener::bind(addr).await.map_err(bind)?;
                let bound = l.local_addr().map_err(bind)?;
                let tls = fedmesh_trust::server_config_from(
                    &identity,
                    s.bundles.clone(),
                    PeerPolicy::AnyTrusted,
                    &[tcp::ALPN_H2],
                    ClientAuth::Required,
                )?;
                Some((l, bound, TlsAcceptor::from(Arc::new(tls))))
            }
        };
        let fallback_addr = fallback.as_ref().map(|f| f.1);
        let listener = TcpListener::bind(s.tunnel)
            .await
            .map_err(|source| GatewayError::Bind {
                what: "tunnel",
                addr: s.tunnel,
                source,
            })?;
        let tunnel_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            what: "tunnel",
            addr: s.tunnel,
            source,
        })?;
        tracing::info!(
            cluster = %s.catalog.cluster,
            identity = %s.identity.id(),
            %quic_addr,
            %tunnel_addr,
            fallback = ?fallback_addr,
            peers = s.catalog.peers().count(),
            "gateway listening"
        );
        let local_cluster = s.catalog.cluster.clone();
        let announced = fedmesh_transport::Announced::default();
        // The peer that does not dial opens its streams on our connection:
        // the pool serves them through this from the first dial on.
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| Shared {
            catalog: RwLock::new(Arc::new(s.catalog)),
            pool: Pool::new(
                Dialer {
                    local: local_cluster,
                    endpoint: endpoint.clone(),
                    quic: quic_configs.clone(),
                    tcp: TlsConnector::from(Arc::new(fallback_client)),
                    from: Some(quic_addr.ip()),
                    limits: s.limits.clone(),
                    metrics: metrics.clone(),
                    announced: announced.clone(),
                    blocked: Default::default(),
                },
                {
                    let weak = weak.clone();
                    Arc::new(move |conn, peer| {
                        let Some(shared) = weak.upgrade() else { return };
                        let span = tracing::info_span!("peer", cluster = %peer.cluster, remote = %conn.remote_address());
                        tokio::spawn(serve_peer(shared, conn, peer).instrument(span));
                    })
                },
            ),
            limits: s.limits,
            quic: quic_configs,
            metrics,
            endpoint,
            connector: TlsConnector::from(Arc::new(client_tls)),
            sidecar_legs,
            balancers: fedmesh_catalog::Balancers::default(),
            config: admin::ConfigState::new(s.controller.is_none()),
            cursor: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stopped: tokio::sync::watch::channel(false).0,
            announced,
            catalog_changed: tokio::sync::Notify::new(),
            socket_faults,
            faults: RwLock::default(),
        });
        shared.pool.set_peers(shared.catalog().peers());
        let mut tasks = vec![
            tokio::spawn(accept_peers(shared.clone())),
            tokio::spawn(accept_tcp(
                shared.clone(),
                listener,
                TlsAcceptor::from(Arc::new(tunnel_tls)),
                TcpPort::Sidecars,
            )),
        ];
        if let Some((listener, _, acceptor)) = fallback {
            tasks.push(tokio::spawn(accept_tcp(
                shared.clone(),
                listener,
                acceptor,
                TcpPort::Fallback,
            )));
        }
        let mut drills_addr = None;
        let mut drill_metrics = None;
        if let Some(cfg) = &s.drills {
            let bind = |source| GatewayError::Bind {
                what: "drills",
                addr: cfg.listen,
                source,
            };
            let l = TcpListener::bind(cfg.listen).await.map_err(bind)?;
            drills_addr = Some(l.local_addr().map_err(bind)?);
            // Any SVID of a trusted domain completes the handshake; the
            // API then says whether it is an operator's (and counts it).
            let tls = fedmesh_trust::server_config_from(
                &identity,
                s.bundles.clone(),
                PeerPolicy::AnyTrusted,
                &[b"http/1.1"],
                ClientAuth::Required,
            )?;
            let hooks = crate::drills::DrillHooks {
                apply: {
                    let weak = Arc::downgrade(&shared);
                    Box::new(move |view: &FaultView| {
                        if let Some(shared) = weak.upgrade() {
                            shared.apply_faults(view.clone());
                        }
                    })
                },
                peers: {
                    let weak = Arc::downgrade(&shared);
                    Box::new(move || {
                        weak.upgrade()
                            .map(|s| s.catalog().peers().map(|p| p.cluster.clone()).collect())
                            .unwrap_or_default()
                    })
                },
            };
            let metrics = crate::drills::DrillMetrics::default();
            register_drills(registry, &metrics, &shared.socket_faults);
            drill_metrics = Some(metrics.clone());
            let api = Arc::new(crate::drills::DrillApi::new(cfg, hooks, metrics));
            tracing::info!(addr = ?drills_addr, operators = ?cfg.operators, "drill API listening (mTLS)");
            tasks.extend(crate::drills::spawn(
                l,
                TlsAcceptor::from(Arc::new(tls)),
                api,
            ));
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
            let register = |reg: &mut prometheus_client::registry::Registry| {
                m.register(reg);
                if let Some(d) = &drill_metrics {
                    register_drills(reg, d, &shared.socket_faults);
                }
                let sub = reg.sub_registry_with_prefix("fedmesh_gateway");
                shared.config.register(sub);
                shared
                    .sidecar_legs
                    .counts
                    .register(sub, "sidecar_pool", "this cluster's sidecars");
            };
            let ready = shared.config.ready_flag();
            let status = {
                let shared = shared.clone();
                Arc::new(move || shared.status_json()) as admin::JsonFn
            };
            let (bound, task) = admin::spawn_with(addr, register, ready, Some(status), Some(dump))
                .await
                .map_err(|source| GatewayError::Bind {
                    what: "admin",
                    addr,
                    source,
                })?;
            admin_addr = Some(bound);
            tasks.push(task);
        }
        Ok(Self {
            shared,
            identity,
            quic_addr,
            tunnel_addr,
            fallback_addr,
            admin_addr,
            drills_addr,
            tasks,
        })
    }

    /// The SVID the gateway presents; store a renewed one here.
    pub fn identity_source(&self) -> &SvidSource {
        &self.identity
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// The TCP fallback listener peers dial when UDP does not get through.
    pub fn fallback_addr(&self) -> Option<SocketAddr> {
        self.fallback_addr
    }

    /// How each peer gateway is reached right now.
    pub fn peer_status(&self) -> Vec<pool::PeerStatus> {
        self.shared.pool.status()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The drill API (mTLS), when configured.
    pub fn drills_addr(&self) -> Option<SocketAddr> {
        self.drills_addr
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.shared.metrics
    }

    /// What the pool of connections to this cluster's sidecars has done.
    pub fn sidecar_pool(&self) -> &fedmesh_transport::PoolCounts {
        &self.shared.sidecar_legs.counts
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog()
    }

    /// QUIC connections this gateway holds (one per live peer once each
    /// pair has settled on the connection its tie-break names).
    pub fn quic_connections(&self) -> usize {
        self.shared.endpoint.open_connections()
    }

    /// Peer gateways this gateway holds a live connection to.
    pub fn live_peers(&self) -> usize {
        self.shared.pool.live_peers()
    }

    /// Announces that `cluster` is broken on purpose (a failover drill;
    /// `on: false` when it is over): the failures it causes are logged at
    /// debug instead of warn. Counters are unaffected.
    pub fn announce_fault(&self, cluster: &str, on: bool) {
        self.shared.announced.set(cluster, on);
    }

    /// Replaces the catalog; streams already spliced are not affected.
    pub fn set_catalog(&self, catalog: Catalog) {
        self.set_config(catalog, None);
    }

    /// Replaces the catalog with version `version` of the controller's
    /// config (counted, and the gateway is ready from then on).
    pub fn set_config(&self, catalog: Catalog, version: Option<u64>) {
        let peers: Vec<Peer> = catalog.peers().cloned().collect();
        {
            let mut g = match self.shared.catalog.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *g = Arc::new(catalog);
        }
        self.shared.catalog_changed.notify_waiters();
        self.shared.pool.set_peers(&peers);
        // A peer's addresses may have moved under a fault in force.
        let view = self.shared.fault_view();
        if !view.is_empty() {
            self.shared.apply_faults((*view).clone());
        }
        self.shared.config.applied(version);
    }

    /// What `/ready` answers: a config is in place and not draining.
    pub fn is_ready(&self) -> bool {
        self.shared.config.is_ready()
    }

    /// Stops accepting, closes peer connections, and waits briefly for the
    /// QUIC close to reach peers.
    pub async fn shutdown(self) {
        self.close();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.shared.endpoint.wait_idle(),
        )
        .await;
    }

    /// Drains (or stops draining): new streams from peer clusters are
    /// refused with a status that sends callers elsewhere before any
    /// payload, while streams already open run to their end.
    pub fn set_draining(&self, on: bool) {
        self.shared.config.set_draining(on);
        tracing::info!(draining = on, "gateway drain state changed");
    }

    /// Stops every listener and closes every QUIC connection at once, as a
    /// crashed gateway would look to its peers (tests and drills use it).
    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.stopped.send_replace(true);
        self.shared.pool.close_all();
        self.shared
            .endpoint
            .close(0u32.into(), b"gateway shutting down");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.close();
    }
}

// ---- peers (QUIC) ----

async fn accept_peers(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        // Peers are few; a burst of handshakes beyond the connection limit
        // is refused before any crypto work is done for it.
        if shared.endpoint.open_connections() >= shared.limits.max_connections {
            shared.metrics.reject("connection_limit");
            tracing::warn!(remote = %incoming.remote_address(), "QUIC connection over the limit; refusing");
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            // The congestion controller is chosen before the handshake,
            // so by the address the peer dials from: its catalog address
            // when it dials from its QUIC port (gateways do). Behind a
            // NAT no peer matches and the default controller is used.
            let by_addr = shared
                .catalog()
                .peers()
                .find(|p| p.address == remote)
                .map(|p| p.cluster.to_string());
            let config = shared.quic.server_for(by_addr.as_deref());
            let accepting = match incoming.accept_with(config) {
                Ok(a) => a,
                Err(e) => {
                    shared.metrics.reject("handshake_failed");
                    tracing::warn!(%remote, error = %e, "peer QUIC connection not accepted");
                    return;
                }
            };
            let conn = match accepting.await {
                Ok(c) => c,
                Err(e) => {
                    shared.metrics.reject("handshake_failed");
                    tracing::warn!(%remote, error = %e, "peer QUIC handshake failed");
                    return;
                }
            };
            let Some(id) = pool::peer_id(&conn) else {
                shared.metrics.reject("no_identity");
                conn.close(CLOSE_POLICY.into(), b"no SPIFFE ID");
                return;
            };
            let Some(peer) = shared.peer_for(&id).await else {
                shared.metrics.reject("unknown_peer");
                tracing::warn!(%remote, id = %fedmesh_wire::bounded(id.as_str()), "QUIC connection from an identity that is no peer gateway; closing");
                conn.close(CLOSE_POLICY.into(), b"not a peer gateway");
                return;
            };
            let span = tracing::info_span!("peer", cluster = %peer.cluster, %remote);
            shared.pool.adopt(&peer, &conn);
            serve_peer(shared, conn, peer).instrument(span).await;
        });
    }
}

async fn serve_peer(shared: Arc<Shared>, conn: Connection, peer: Peer) {
    tracing::info!("peer gateway connected");
    shared.metrics.peer_connections.inc();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let shared = shared.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let mut down = PeerStream::Quic {
                        recv,
                        send,
                        lease: None,
                        cut: false,
                    };
                    peer_stream(&shared, &peer, &mut down).await;
                    fedmesh_transport::close(&mut down).await;
                });
            }
            Err(e) => {
                tracing::info!(reason = %e, "peer connection ended");
                break;
            }
        }
    }
    shared.metrics.peer_connections.dec();
}

/// The gateway's two TLS-over-TCP listeners.
#[derive(Debug, Clone, Copy)]
enum TcpPort {
    /// This cluster's sidecars (`listen.tunnel`).
    Sidecars,
    /// Peer gateways whose path drops UDP (`listen.tcp_fallback`): TLS with
    /// a peer gateway's SVID (checked against the catalog like QUIC), then
    /// HTTP/2 whose `CONNECT` streams are served like QUIC streams.
    Fallback,
}

/// Serves one TLS-over-TCP listener within `limits.max_connections`;
/// every accepted connection ends when the gateway closes.
async fn accept_tcp(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    port: TcpPort,
) {
    let m = shared.metrics.clone();
    let limit = shared.limits.max_connections;
    let what = match port {
        TcpPort::Sidecars => "tunnel",
        TcpPort::Fallback => "TCP fallback",
    };
    serve_tcp(
        listener,
        what,
        limit,
        move |_| m.reject("connection_limit"),
        |tcp, remote| {
            let shared = shared.clone();
            let acceptor = acceptor.clone();
            async move {
                let mut stopped = shared.stopped.subscribe();
                let conn = async {
                    match port {
                        TcpPort::Sidecars => sidecar_conn(&shared, tcp, remote, &acceptor).await,
                        TcpPort::Fallback => fallback_conn(&shared, tcp, remote, &acceptor).await,
                    }
                };
                tokio::select! {
                    _ = conn => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
            }
        },
    )
    .await
}

async fn fallback_conn(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
) {
    let (mut tls, id) = match accept_tls(acceptor, tcp, shared.limits.handshake_timeout).await {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.reject(e.reason());
            tracing::warn!(%remote, error = %e, "TCP fallback handshake refused");
            return;
        }
    };
    tls.get_mut()
        .1
        .set_buffer_limit(Some(fedmesh_transport::H2_TLS_BUFFER));
    let Some(peer) = shared.peer_for(&id).await else {
        shared.metrics.reject("unknown_peer");
        tracing::warn!(%remote, id = %fedmesh_wire::bounded(id.as_str()), "TCP fallback connection from an identity that is no peer gateway; closing");
        return;
    };
    if shared.pool.is_blocked(&peer.cluster) {
        shared.metrics.reject("drill_blackhole");
        tracing::debug!(%remote, cluster = %peer.cluster, "TCP fallback connection from a blackholed peer; closing");
        return;
    }
    let span = tracing::info_span!("peer", cluster = %peer.cluster, %remote, transport = "tcp");
    async {
        tracing::info!("peer gateway connected over the TCP fallback");
        shared.metrics.peer_connections.inc();
        let stream = {
            let shared = shared.clone();
            move |io: tcp::TcpStream| {
                let shared = shared.clone();
                let peer = peer.clone();
                async move {
                    let mut down = PeerStream::Tcp {
                        io: Box::new(io),
                        lease: None,
                        cut: false,
                    };
                    peer_stream(&shared, &peer, &mut down).await;
                    fedmesh_transport::close(&mut down).await;
                }
            }
        };
        if let Err(e) = tcp::serve(tls, &shared.limits, stream).await {
            tracing::info!(reason = %e, "TCP fallback connection ended");
        }
        shared.metrics.peer_connections.dec();
    }
    .instrument(span)
    .await;
}

async fn refuse<S: AsyncWrite + Unpin>(
    shared: &Shared,
    down: &mut S,
    direction: &'static str,
    code: StatusCode,
    msg: String,
) {
    shared.metrics.stream(direction, code.as_str());
    // Per stream: counted above, and an outage would flood the log at
    // info. What an operator acts on (a peer down, a refused handshake)
    // is logged where it happens. The reason may quote what the caller
    // sent: bounded and escaped.
    tracing::debug!(direction, status = %code, reason = %fedmesh_wire::bounded(&msg), "stream refused");
    // A peer cluster learns the code and its fixed text only: no
    // addresses, no names of services it may not see, and unknown and
    // not exported to it read the same. This cluster's own sidecars get
    // the reason.
    let told = if direction == FROM_PEER {
        code.fixed_message().to_owned()
    } else {
        msg
    };
    answer(down, &Status::new(code, told)).await;
}

/// Refuses a peer's stream: counted per peer cluster and reason (what an
/// operator reads to see which peer asks for what it may not have), the
/// reason in this gateway's log, the code and its fixed text to the peer.
async fn refuse_peer(
    shared: &Shared,
    peer: &Peer,
    down: &mut PeerStream,
    reason: &'static str,
    code: StatusCode,
    msg: String,
) {
    shared.metrics.peer_refused(peer.cluster.as_str(), reason);
    refuse(shared, down, FROM_PEER, code, msg).await;
}

async fn peer_stream(shared: &Shared, peer: &Peer, down: &mut PeerStream) {
    let started = Instant::now();
    let header = match read_request(down, &shared.limits).await {
        Ok(h) => h,
        Err(e) => {
            shared.metrics.reject(e.reason());
            let code = e.status();
            refuse_peer(shared, peer, down, e.reason(), code, e.to_string()).await;
            return;
        }
    };
    if let Err(why) = check_hops(&header) {
        shared.metrics.reject("loop");
        refuse_peer(shared, peer, down, "loop", StatusCode::Loop, why).await;
        return;
    }
    if shared.config.is_draining() {
        // Before any payload: the caller fails over, nothing is lost, and
        // streams already open run to their end.
        shared.metrics.reject("draining");
        let why = "gateway is draining".to_owned();
        refuse_peer(shared, peer, down, "draining", StatusCode::Overloaded, why).await;
        return;
    }
    // A cluster vouches only for its own workloads.
    let source = match header.source.as_deref().map(SpiffeId::new) {
        Some(Ok(id)) if id.trust_domain_name() == peer.trust_domain.as_str() => id,
        Some(Ok(id)) => {
            shared.metrics.reject("source_denied");
            let msg = format!(
                "peer cluster {} (trust domain {}) may not vouch for {id}",
                peer.cluster, peer.trust_domain
            );
            refuse_peer(shared, peer, down, "source_denied", StatusCode::Denied, msg).await;
            return;
        }
        Some(Err(e)) => {
            shared.metrics.reject("bad_header");
            let msg = format!("source identity: {e}");
            refuse_peer(shared, peer, down, "bad_header", StatusCode::BadHeader, msg).await;
            return;
        }
        None => {
            shared.metrics.reject("source_denied");
            let msg = "peer streams must carry a source identity".to_owned();
            refuse_peer(shared, peer, down, "source_denied", StatusCode::Denied, msg).await;
            return;
        }
    };
    let catalog = shared.catalog();
    let hops = match catalog.route_from_peer(&header.target, &peer.cluster, shared.cursor()) {
        Ok(h) => h,
        Err(e) => {
            refuse_peer(shared, peer, down, e.reason(), e.status(), e.to_string()).await;
            return;
        }
    };
    let Some(next) = next_header(&header, started) else {
        let why = "deadline passed".to_owned();
        refuse_peer(shared, peer, down, "deadline", StatusCode::Timeout, why).await;
        return;
    };
    // A peer chose `source` (up to 2 KiB): logged as a bounded prefix.
    let span = tracing::debug_span!("stream", id = header.connection_id, source = %fedmesh_wire::bounded(source.as_str()), target = %header.target, trace = header.traceparent.as_ref().map(|t| t.as_str()));
    async {
        let targets = hops.into_iter().filter_map(|h| match h {
            Hop::Endpoint { address, identity } => Some((address, identity)),
            _ => None,
        });
        // Over a pooled connection to the destination sidecar when pooling
        // is on, else over a connection of its own.
        let up: Result<Box<dyn TunnelIo>, fedmesh_transport::Refusal> =
            if shared.sidecar_legs.enabled() {
                shared
                    .sidecar_legs
                    .open_first(targets, &next)
                    .await
                    .map(|(s, _)| s)
            } else {
                connect_first(targets, &shared.connector, &next, &shared.limits)
                    .await
                    .map(|(s, _)| Box::new(s) as Box<dyn TunnelIo>)
            };
        match up {
            Ok(mut up) => forward(shared, FROM_PEER, &mut up, down).await,
            Err(r) => refuse_peer(shared, peer, down, "unreachable", r.code, r.message).await,
        }
    }
    .instrument(span)
    .await;
}

/// The header for the next hop, or `None` when the deadline has passed.
fn next_header(h: &Header, started: Instant) -> Option<Header> {
    let mut next = h.clone();
    next.hops = h.hops.saturating_add(1);
    if let Some(d) = h.deadline {
        let left = d.checked_sub(started.elapsed()).filter(|l| !l.is_zero())?;
        next.deadline = Some(left);
    }
    Some(next)
}

/// Answers `ok` to whoever opened the stream (the peer for
/// [`FROM_PEER`], else the local side), then splices.
async fn forward<L>(shared: &Shared, direction: &'static str, local: &mut L, peer: &mut PeerStream)
where
    L: AsyncRead + AsyncWrite + Unpin + Cut + fedmesh_transport::Chunked,
{
    shared.metrics.stream(direction, StatusCode::Ok.as_str());
    let from_peer = direction == FROM_PEER;
    let answered = if from_peer {
        answer(peer, &Status::ok()).await
    } else {
        answer(local, &Status::ok()).await
    };
    if !answered {
        return;
    }
    match peer.splice(local, shared.limits.splice_buffer_bytes).await {
        Ok((to_peer, to_local)) => {
            // tx: opener to target.
            let (tx, rx) = if from_peer {
                (to_local, to_peer)
            } else {
                (to_peer, to_local)
            };
            shared
                .metrics
                .bytes
                .get_or_create(&crate::metrics::DirectionLabels { direction: "tx" })
                .inc_by(tx);
            shared
                .metrics
                .bytes
                .get_or_create(&crate::metrics::DirectionLabels { direction: "rx" })
                .inc_by(rx);
            tracing::debug!(tx, rx, "stream done");
        }
        Err(e) => tracing::debug!(error = %e, "stream ended with an error"),
    }
}

// ---- sidecars (TLS over TCP) ----

async fn sidecar_conn(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
) {
    let (down, client) = match accept_tls(acceptor, tcp, shared.limits.handshake_timeout).await {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.reject(e.reason());
            tracing::warn!(%remote, error = %e, "sidecar TLS handshake refused");
            return;
        }
    };
    shared.metrics.sidecar_connections.inc();
    // One stream, or a pooled connection's many: each is served as the
    // identity the handshake verified.
    let stream = {
        let shared = shared.clone();
        move |mut io: Box<dyn TunnelIo>| {
            let shared = shared.clone();
            let client = client.clone();
            async move {
                sidecar_stream(&shared, &mut io, client, Instant::now()).await;
                fedmesh_transport::close(&mut io).await;
            }
        }
    };
    if let Err(e) = fedmesh_transport::serve_streams(down, &shared.limits, stream).await {
        tracing::debug!(%remote, error = %e, "pooled sidecar connection ended");
    }
    shared.metrics.sidecar_connections.dec();
}

async fn sidecar_stream<S: AsyncRead + AsyncWrite + Unpin + Cut + fedmesh_transport::Chunked>(
    shared: &Shared,
    down: &mut S,
    client: SpiffeId,
    started: Instant,
) {
    let mut header = match read_request(down, &shared.limits).await {
        Ok(h) => h,
        Err(e) => {
            shared.metrics.reject(e.reason());
            let code = e.status();
            refuse(shared, down, FROM_SIDECAR, code, e.to_string()).await;
            return;
        }
    };
    if let Err(why) = check_hops(&header) {
        shared.metrics.reject("loop");
        refuse(shared, down, FROM_SIDECAR, StatusCode::Loop, why).await;
        return;
    }
    // The first gateway vouches for the caller: the source is the calling
    // sidecar's certificate, whatever the header said.
    if header
        .source
        .as_deref()
        .is_some_and(|s| s != client.as_str())
    {
        tracing::debug!(claimed = ?header.source.as_deref().map(fedmesh_wire::bounded), %client, "sidecar set a source identity; replaced by its certificate's");
    }
    header.source = Some(client.to_string());
    if header.connection_id.is_none() {
        header.connection_id = Some(shared.next_id.fetch_add(1, Ordering::Relaxed));
    }
    let catalog = shared.catalog();
    // A sidecar that names a cluster gets only that one (it has its own
    // plan and moves on); otherwise this gateway plans across the peers.
    let hint = header.cluster.take();
    let routes = match catalog.peer_routes(&header.target, hint.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            refuse(shared, down, FROM_SIDECAR, e.status(), e.to_string()).await;
            return;
        }
    };
    let Some(next) = next_header(&header, started) else {
        refuse(
            shared,
            down,
            FROM_SIDECAR,
            StatusCode::Timeout,
            "deadline passed".into(),
        )
        .await;
        return;
    };
    let fedmesh_wire::Target::Service { name: service, .. } = &header.target else {
        return;
    };
    let policy = catalog.policy_or_default(service);
    let attempts = shared.balancers.with(service, policy, |b| {
        let max = b.attempts().min(shared.limits.max_attempts);
        b.plan(
            &catalog.cluster,
            &routes,
            max,
            &mut rand::thread_rng(),
            Instant::now(),
        )
    });
    let span = tracing::debug_span!("stream", id = header.connection_id, source = %client, target = %header.target, trace = header.traceparent.as_ref().map(|t| t.as_str()));
    async {
        let mut last = (StatusCode::NoHealthyEndpoint, "no peer cluster to try".to_owned());
        for a in &attempts {
            let Hop::Peer { cluster } = &a.hop else { continue };
            let Some(peer) = catalog.peer(cluster) else { continue };
            let opened = open_on_peer(shared, peer, &next).await;
            match &opened {
                Ok(up) => shared.metrics.peer_stream(cluster.as_str(), up.transport()),
                Err(e) => shared.metrics.peer_attempt_failure(cluster.as_str(), e.reason()),
            }
            match opened {
                Ok(mut up) => {
                    shared.balancers.with(service, policy, |b| b.success(a, Instant::now()));
                    forward(shared, FROM_SIDECAR, down, &mut up).await;
                    return;
                }
                Err(e) if e.retryable() => {
                    tracing::debug!(peer = %cluster, error = %e, "peer cluster failed; trying the next");
                    if let Some(fedmesh_catalog::Ejection::Ejected(d)) =
                        shared.balancers.with(service, policy, |b| b.failure(a, Instant::now()))
                    {
                        shared.metrics.ejection(cluster.as_str());
                        fedmesh_transport::warn_unless_announced!(
                            shared.announced.expects(catalog.cluster.as_str(), cluster.as_str()),
                            peer = %cluster, %service, for_ = ?d, "peer cluster ejected after consecutive failures"
                        );
                    }
                    last = (e.status(), format!("cluster {cluster}: {e}"));
                }
                Err(e) => {
                    last = (e.status(), format!("cluster {cluster}: {e}"));
                    break;
                }
            }
        }
        refuse(shared, down, FROM_SIDECAR, last.0, last.1).await;
    }
    .instrument(span)
    .await;
}

#[derive(Debug, thiserror::Error)]
enum PeerOpenError {
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    #[error("opening a stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Open(OpenError),
}

impl PeerOpenError {
    fn reason(&self) -> AttemptFailure {
        match self {
            Self::Pool(pool::PoolError::Down { .. }) => AttemptFailure::PeerDown,
            Self::Pool(_) => AttemptFailure::Connect,
            Self::Stream(_) => AttemptFailure::Stream,
            Self::Open(OpenError::Timeout(_)) => AttemptFailure::Timeout,
            Self::Open(OpenError::Refused(_)) => AttemptFailure::Refused,
            Self::Open(_) => AttemptFailure::Io,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Self::Open(e) => e.retryable(),
            _ => true,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Open(e) => e.status(),
            Self::Pool(pool::PoolError::Down { .. }) => StatusCode::PeerDown,
            _ => StatusCode::UpstreamRefused,
        }
    }
}

async fn open_on_peer(
    shared: &Shared,
    peer: &Peer,
    header: &Header,
) -> Result<PeerStream, PeerOpenError> {
    let (conn, lease) = shared.pool.get(peer).await?.into_parts();
    // Opening waits while the peer's stream cap is reached; bound the wait.
    let limit = shared.limits.status_timeout;
    let opened: Result<PeerStream, String> = match &conn {
        PeerConn::Quic(q) => match tokio::time::timeout(limit, q.open_bi()).await {
            Ok(Ok((send, recv))) => Ok(PeerStream::Quic {
                recv,
                send,
                lease: Some(lease),
                cut: false,
            }),
            Ok(Err(e)) => {
                lease.failed();
                Err(e.to_string())
            }
            Err(_) => {
                return Err(PeerOpenError::Stream(
                    "stream cap reached and no stream freed in time".into(),
                ))
            }
        },
        PeerConn::Tcp(t) => match tokio::time::timeout(limit, t.open()).await {
            Ok(Ok(io)) => Ok(PeerStream::Tcp {
                io: Box::new(io),
                lease: Some(lease),
                cut: false,
            }),
            Ok(Err(e)) => {
                lease.failed();
                Err(e.to_string())
            }
            Err(_) => {
                return Err(PeerOpenError::Stream(
                    "stream cap reached and no stream freed in time".into(),
                ))
            }
        },
    };
    let mut up = opened.map_err(PeerOpenError::Stream)?;
    if let Err(e) = open(&mut up, header, &shared.limits).await {
        if !conn.is_open() {
            // The peer closed the connection, for example because it refused
            // our certificate (TLS 1.3 tells us only now). The pool says so
            // once per connection; each stream it cut says so at debug.
            tracing::debug!(peer = %peer.cluster, "peer connection closed under a stream");
            up.failed();
        }
        return Err(PeerOpenError::Open(e));
    }
    Ok(up)
}
