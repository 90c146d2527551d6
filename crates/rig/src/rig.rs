//! The in-process multi-cluster rig: each cluster gets its own root CA and
//! trust domain, an east-west gateway, one sidecar per app replica, and a
//! client sidecar with outbound listeners, all on 127.0.0.1 with real QUIC
//! and mTLS. The catalogs a controller would compute are computed here from
//! the topology (static config), after every listener is bound.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::{Context, RigError};
use fedmesh_catalog::mcs::{Port, Protocol, ServiceType};
use fedmesh_catalog::{CatalogSpec, EndpointSpec, ImportSpec, PeerSpec, ServiceSpec};
use fedmesh_catalog::{ClusterName, ServicePolicy};
use fedmesh_federation::app::{ApiServing, AppParts};
use fedmesh_federation::records::Locality;
use fedmesh_federation::store::{EmbeddedLimits, EmbeddedStore};
use fedmesh_federation::{ControllerApp, ControllerSettings, LocalService, ServiceSource};
use fedmesh_gateway::{Gateway, GatewaySettings};
use fedmesh_sidecar::{
    InboundRoute, InboundSettings, OutboundProtocol, OutboundRoute, Sidecar, SidecarSettings,
};
use fedmesh_transport::Limits;
use fedmesh_trust::{CertificateAuthority, SharedBundles, TrustBundles, TrustDomain};
use fedmesh_wire::ServiceName;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

use crate::apps::{App, AppKind};
use crate::faults::UdpRelay;
use fedmesh_api::client::ControllerLink;
use fedmesh_api::controller_identity;
use fedmesh_api::follow::Follower;
use fedmesh_api::server::{ApiLimits, ApiMetrics};
use fedmesh_trust::{ClientAuth, PeerPolicy, SvidSource};

const ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct ServiceTopo {
    pub name: String,
    pub port: u16,
    pub replicas: usize,
    pub export: bool,
    /// The clusters an exported service is exported to; `None`: all.
    pub audience: Option<Vec<String>>,
    pub app: AppKind,
}

#[derive(Debug, Clone)]
pub struct ClusterTopo {
    pub name: String,
    pub services: Vec<ServiceTopo>,
}

/// Where catalogs and trust bundles come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlPlane {
    /// Computed by the rig from the topology (static config).
    Static,
    /// One federation controller per cluster on a shared embedded store;
    /// proxies follow their controller's catalog and bundles.
    Embedded,
}

#[derive(Debug, Clone)]
pub struct Topology {
    /// Trust domains are `<cluster>.<mesh>`.
    pub mesh: String,
    pub clusters: Vec<ClusterTopo>,
    pub limits: Limits,
    pub control_plane: ControlPlane,
    /// Policy by service name, given to every cluster.
    pub policies: BTreeMap<String, ServicePolicy>,
    /// Put a [`UdpRelay`] in front of every gateway's QUIC port (peers
    /// reach it through the relay), so drills can break the path.
    pub fault_relays: bool,
    /// Gateways also listen on a TCP fallback port and advertise it (then
    /// a relay that drops UDP makes peers move to TCP, not fail over).
    pub tcp_fallback: bool,
    /// Controllers (control plane `Embedded`) allocate ClusterSet IPs
    /// from [`CLUSTERSET_CIDR`] and serve `clusterset.local` on a loopback
    /// port ([`RigCluster::dns_addr`]).
    pub clusterset_dns: bool,
    /// Principals allowed to set faults through every gateway's drill API
    /// (on a loopback port, `Gateway::drills_addr`); none: no drill API.
    pub drill_operators: Vec<String>,
}

/// The rig's ClusterSet IP range.
pub const CLUSTERSET_CIDR: &str = "241.0.0.0/24";

impl Topology {
    /// The demo's shape: `east` serves `hello.demo` locally; `west` and
    /// `north` each serve and export `echo.demo`; two replicas everywhere.
    pub fn demo() -> Self {
        let svc = |name: &str, export| ServiceTopo {
            name: name.into(),
            port: 7000,
            replicas: 2,
            export,
            audience: None,
            app: AppKind::Echo,
        };
        Self {
            mesh: "demo".into(),
            clusters: vec![
                ClusterTopo {
                    name: "east".into(),
                    services: vec![svc("hello.demo", false)],
                },
                ClusterTopo {
                    name: "west".into(),
                    services: vec![svc("echo.demo", true)],
                },
                ClusterTopo {
                    name: "north".into(),
                    services: vec![svc("echo.demo", true)],
                },
            ],
            limits: Limits::default(),
            control_plane: ControlPlane::Static,
            policies: BTreeMap::new(),
            fault_relays: false,
            tcp_fallback: false,
            clusterset_dns: false,
            drill_operators: Vec::new(),
        }
    }
}

/// One running cluster.
pub struct RigCluster {
    pub name: String,
    pub trust_domain: TrustDomain,
    pub ca: CertificateAuthority,
    pub bundles: SharedBundles,
    pub gateway: Arc<Gateway>,
    /// Sidecars in front of app replicas, with their service.
    pub sidecars: Vec<(ServiceName, Arc<Sidecar>)>,
    /// A sidecar with outbound listeners for every reachable service.
    pub client: Arc<Sidecar>,
    pub apps: Vec<App>,
    /// The cluster's federation controller with its config API (control
    /// plane `Embedded`), built as `fedmesh controller` builds it; the
    /// cluster's proxies follow it over mTLS.
    pub controller: Option<ControllerApp>,
    /// In front of the gateway's QUIC port when the topology asks for it.
    pub relay: Option<UdpRelay>,
    spec: CatalogSpec,
    _links: Vec<Follower>,
}

impl RigCluster {
    /// Tells this cluster's gateway and sidecars that `cluster` is broken
    /// on purpose (or repaired): see `Gateway::announce_fault`.
    pub fn announce_fault(&self, cluster: &str, on: bool) {
        self.gateway.announce_fault(cluster, on);
        self.client.announce_fault(cluster, on);
        for (_, s) in &self.sidecars {
            s.announce_fault(cluster, on);
        }
    }

    pub fn catalog_spec(&self) -> &CatalogSpec {
        &self.spec
    }

    /// The client sidecar's outbound listener for `service` (`NAME.NS`).
    /// The controller's `clusterset.local` DNS server (topology
    /// `clusterset_dns`).
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.controller.as_ref()?.dns_addr()
    }

    pub fn client_addr(&self, service: &str) -> Option<SocketAddr> {
        let name = ServiceName::parse(service).ok()?;
        self.client.outbound_addr(&name)
    }
}

/// A cluster whose listeners are bound but whose catalog is not set yet.
struct Partial {
    topo: ClusterTopo,
    td: TrustDomain,
    ca: CertificateAuthority,
    bundles: SharedBundles,
    gateway: Arc<Gateway>,
    sidecars: Vec<(ServiceName, u16, bool, Arc<Sidecar>)>,
    apps: Vec<App>,
    relay: Option<UdpRelay>,
}

impl Partial {
    /// Where peers reach this cluster's gateway.
    fn quic_addr(&self) -> SocketAddr {
        self.relay
            .as_ref()
            .map(UdpRelay::addr)
            .unwrap_or_else(|| self.gateway.quic_addr())
    }
}

pub struct Rig {
    pub clusters: Vec<RigCluster>,
    pub registry: Registry,
    /// With controllers: time from their start until every cluster's
    /// catalog imported every service exported elsewhere.
    pub converged_in: Option<Duration>,
    pub store: Option<EmbeddedStore>,
}

impl Rig {
    pub fn cluster(&self, name: &str) -> Option<&RigCluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub async fn start(topo: &Topology) -> Result<Rig, RigError> {
        let mut registry = Registry::default();
        // CAs and the shared bundle set first: every cluster trusts every
        // other cluster's root, each under its own trust domain.
        let mut cas = Vec::new();
        let mut all = TrustBundles::new();
        for c in &topo.clusters {
            let td = TrustDomain::new(&format!("{}.{}", c.name, topo.mesh))
                .ctx(|| format!("trust domain of {}", c.name))?;
            let ca = CertificateAuthority::new_root(td.clone(), CERT_TTL * 30)
                .ctx(|| format!("CA of {}", c.name))?;
            all.insert(ca.bundle());
            cas.push((td, ca));
        }

        // Bind everything with a minimal catalog, then hand out the real
        // catalogs once every address is known.
        let mut parts = Vec::new();
        for (c, (td, ca)) in topo.clusters.iter().zip(cas) {
            // With controllers, each cluster starts out trusting only itself
            // and learns the others through federation.
            let bundles = match topo.control_plane {
                ControlPlane::Static => SharedBundles::new(all.clone()),
                ControlPlane::Embedded => SharedBundles::new(TrustBundles::new().with(ca.bundle())),
            };
            let reg = registry
                .sub_registry_with_label((Cow::Borrowed("cluster"), Cow::Owned(c.name.clone())));
            let bare = CatalogSpec {
                cluster: c.name.clone(),
                trust_domain: td.to_string(),
                ..Default::default()
            }
            .build()
            .ctx(|| format!("catalog of {}", c.name))?;
            let gw_id = td.system_id("gateway");
            let gateway = Gateway::build(
                GatewaySettings {
                    catalog: bare.clone(),
                    identity: ca
                        .issue(&gw_id, CERT_TTL)
                        .ctx(|| format!("gateway SVID of {}", c.name))?,
                    bundles: bundles.clone(),
                    quic: ANY,
                    tunnel: ANY,
                    tcp_fallback: topo.tcp_fallback.then_some(ANY),
                    admin: None,
                    limits: topo.limits.clone(),
                    congestion: Default::default(),
                    controller: None,
                    drills: (!topo.drill_operators.is_empty()).then(|| {
                        fedmesh_gateway::DrillsConfig::new(ANY, topo.drill_operators.clone())
                    }),
                },
                reg,
            )
            .await
            .ctx(|| format!("gateway of {}", c.name))?;
            let gateway = Arc::new(gateway);
            let mut apps = Vec::new();
            let mut sidecars = Vec::new();
            for s in &c.services {
                let name = ServiceName::parse(&s.name).ctx(|| format!("service {:?}", s.name))?;
                let id = td
                    .workload(name.namespace(), name.name())
                    .ctx(|| format!("identity of {name}"))?;
                for i in 0..s.replicas {
                    let app = App::start(s.app, &format!("{}/{}-{i}", c.name, name.name()))
                        .await
                        .ctx(|| format!("app of {name}"))?;
                    let sc = Sidecar::build(
                        SidecarSettings {
                            catalog: bare.clone(),
                            identity: ca.issue(&id, CERT_TTL).ctx(|| format!("SVID of {id}"))?,
                            bundles: bundles.clone(),
                            outbound: Vec::new(),
                            inbound: Some(InboundSettings {
                                app_ports: Vec::new(),
                                listen: ANY,
                                routes: vec![InboundRoute {
                                    service: name.clone(),
                                    port: s.port,
                                    app: app.addr,
                                }],
                            }),
                            transparent: None,
                            admin: None,
                            limits: topo.limits.clone(),
                            http: Default::default(),
                            controller: None,
                        },
                        reg,
                    )
                    .await
                    .ctx(|| format!("sidecar of {name} in {}", c.name))?;
                    apps.push(app);
                    sidecars.push((name.clone(), s.port, s.export, Arc::new(sc)));
                }
            }
            let relay = match topo.fault_relays {
                true => Some(
                    UdpRelay::start(gateway.quic_addr())
                        .await
                        .ctx(|| format!("fault relay of {}", c.name))?,
                ),
                false => None,
            };
            parts.push(Partial {
                relay,
                topo: c.clone(),
                td,
                ca,
                bundles,
                gateway,
                sidecars,
                apps,
            });
        }

        let mut clusters = Vec::new();
        for p in &parts {
            let mut spec = CatalogSpec {
                cluster: p.topo.name.clone(),
                trust_domain: p.td.to_string(),
                gateway: Some(EndpointSpec {
                    address: p.gateway.tunnel_addr(),
                    identity: None,
                }),
                policies: topo.policies.clone(),
                ..Default::default()
            };
            for s in &p.topo.services {
                let name = ServiceName::parse(&s.name).ctx(|| format!("service {:?}", s.name))?;
                spec.services.push(ServiceSpec {
                    vips: Vec::new(),
                    name: name.to_string(),
                    ports: vec![s.port],
                    export: s.export,
                    audience: s.audience.clone(),
                    endpoints: p
                        .sidecars
                        .iter()
                        .filter(|x| x.0 == name)
                        .filter_map(|x| {
                            Some(EndpointSpec {
                                address: x.3.inbound_addr()?,
                                identity: Some(x.3.identity().to_string()),
                            })
                        })
                        .collect(),
                });
            }
            for other in parts.iter().filter(|o| o.topo.name != p.topo.name) {
                spec.peers.push(PeerSpec {
                    cluster: other.topo.name.clone(),
                    trust_domain: other.td.to_string(),
                    gateway: other.quic_addr(),
                    gateway_tcp: other.gateway.fallback_addr(),
                    identity: None,
                    region: String::new(),
                });
                let exported_here = |s: &&ServiceTopo| {
                    s.export && s.audience.as_ref().is_none_or(|a| a.contains(&p.topo.name))
                };
                for s in other.topo.services.iter().filter(exported_here) {
                    match spec.imports.iter_mut().find(|i| i.service == s.name) {
                        Some(i) => i.clusters.push(other.topo.name.clone()),
                        None => spec.imports.push(ImportSpec {
                            service: s.name.clone(),
                            clusters: vec![other.topo.name.clone()],
                        }),
                    }
                }
            }
            clusters.push(spec);
        }

        let store = match topo.control_plane {
            ControlPlane::Static => None,
            ControlPlane::Embedded => Some(EmbeddedStore::new(EmbeddedLimits::default())),
        };
        let all_bundles: Vec<(ClusterName, fedmesh_trust::TrustBundle)> = parts
            .iter()
            .map(|p| {
                let name =
                    ClusterName::new(&p.topo.name).ctx(|| format!("cluster {:?}", p.topo.name))?;
                Ok((name, p.ca.bundle()))
            })
            .collect::<Result<_, RigError>>()?;
        let started = Instant::now();
        let mut out = Vec::new();
        for (p, spec) in parts.into_iter().zip(clusters) {
            let catalog = spec.build().ctx(|| format!("catalog of {}", p.topo.name))?;
            let mut outbound = Vec::new();
            let mut names: Vec<(String, u16)> = spec
                .services
                .iter()
                .map(|s| (s.name.clone(), s.ports[0]))
                .collect();
            let topo_of = |name: &str| {
                topo.clusters
                    .iter()
                    .flat_map(|c| &c.services)
                    .find(|s| s.name == name)
            };
            for i in &spec.imports {
                if !names.iter().any(|n| n.0 == i.service) {
                    let port = topo_of(&i.service).map(|s| s.port).unwrap_or(7000);
                    names.push((i.service.clone(), port));
                }
            }
            for (n, port) in names {
                // The echo app speaks first (its banner): detection would
                // only add its timeout, so it is declared plain TCP.
                let protocol = match topo_of(&n).map(|s| s.app) {
                    Some(AppKind::Echo | AppKind::Ends) => OutboundProtocol::Tcp,
                    _ => OutboundProtocol::Detect,
                };
                outbound.push(OutboundRoute {
                    listen: ANY,
                    service: ServiceName::parse(&n).ctx(|| format!("service {n:?}"))?,
                    port,
                    protocol,
                });
            }
            let reg = registry.sub_registry_with_label((
                Cow::Borrowed("cluster"),
                Cow::Owned(p.topo.name.clone()),
            ));
            let client = Arc::new(
                Sidecar::build(
                    SidecarSettings {
                        catalog: catalog.clone(),
                        identity: {
                            let id =
                                p.td.workload("demo", "client")
                                    .ctx(|| "client identity".into())?;
                            p.ca.issue(&id, CERT_TTL).ctx(|| format!("SVID of {id}"))?
                        },
                        bundles: p.bundles.clone(),
                        outbound,
                        inbound: None,
                        transparent: None,
                        admin: None,
                        limits: topo.limits.clone(),
                        http: Default::default(),
                        controller: None,
                    },
                    reg,
                )
                .await
                .ctx(|| format!("client sidecar of {}", p.topo.name))?,
            );
            let (controller, links) = match &store {
                None => {
                    p.gateway.set_catalog(catalog.clone());
                    for s in &p.sidecars {
                        s.3.set_catalog(catalog.clone());
                    }
                    (None, Vec::new())
                }
                Some(store) => {
                    let name = ClusterName::new(&p.topo.name)
                        .ctx(|| format!("cluster {:?}", p.topo.name))?;
                    let settings = ControllerSettings {
                        cluster: name.clone(),
                        trust_domain: p.td.clone(),
                        locality: Locality::default(),
                        gateways: vec![p.quic_addr()],
                        gateways_tcp: p.gateway.fallback_addr().into_iter().collect(),
                        gateway_tunnel: Some(p.gateway.tunnel_addr()),
                        lease_ttl: Duration::from_secs(3),
                        bundle: p.ca.bundle(),
                        endorsements: Vec::new(),
                        // The rig is the operator: it joined every cluster.
                        pinned: all_bundles
                            .iter()
                            .filter(|(c, _)| c != &name)
                            .cloned()
                            .collect(),
                        policies: catalog
                            .policy_entries()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        clusterset_ips: match topo.clusterset_dns {
                            true => Some(
                                fedmesh_federation::clusterset::ClusterSetIpConfig::new(vec![
                                    CLUSTERSET_CIDR.into(),
                                ])
                                .check(&[])
                                .ctx(|| "ClusterSet CIDR".to_owned())?,
                            ),
                            false => None,
                        },
                    };
                    let local = local_services(&p.topo, &p.sidecars)?;
                    let parts = AppParts {
                        settings,
                        store: Arc::new(store.clone()),
                        source: ServiceSource::fixed(local),
                        api: Some(config_api(&p, reg)?),
                        admin: None,
                        dns: topo.clusterset_dns.then(|| {
                            fedmesh_federation::dns::server::DnsConfig::new(SocketAddr::from((
                                [127, 0, 0, 1],
                                0,
                            )))
                        }),
                    };
                    let app = ControllerApp::start(parts, Registry::default())
                        .await
                        .ctx(|| format!("controller of {}", p.topo.name))?;
                    let links = follow(&p, &app, &client)?;
                    (Some(app), links)
                }
            };
            out.push(RigCluster {
                name: p.topo.name,
                trust_domain: p.td,
                ca: p.ca,
                bundles: p.bundles,
                gateway: p.gateway,
                sidecars: p.sidecars.into_iter().map(|s| (s.0, s.3)).collect(),
                client,
                apps: p.apps,
                controller,
                relay: p.relay,
                spec,
                _links: links,
            });
        }
        let converged_in = match &store {
            None => None,
            Some(_) => {
                // Converged when every cluster imports what the static
                // computation says it should, and trusts every domain.
                let deadline = Duration::from_secs(20);
                loop {
                    let done = out.iter().all(|c| {
                        if c.controller.is_none() {
                            return true;
                        }
                        // What the proxies run on, not what the controller
                        // computed: the config stream is part of the path.
                        let cat = c.gateway.catalog();
                        c.spec.imports.iter().all(|i| {
                            ServiceName::parse(&i.service)
                                .map(|n| cat.imports(&n).len() == i.clusters.len())
                                .unwrap_or(false)
                        }) && c.bundles.load().len() == out.len()
                    });
                    if done {
                        break Some(started.elapsed());
                    }
                    if started.elapsed() > deadline {
                        return Err(RigError::NotReady(format!(
                            "control plane did not converge within {deadline:?}"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        // The data path is ready when every gateway holds a live QUIC
        // connection to every peer (trust and catalogs both propagated).
        let peers = out.len().saturating_sub(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.iter().any(|c| c.gateway.live_peers() < peers) {
            if Instant::now() > deadline {
                let have: Vec<String> = out
                    .iter()
                    .map(|c| format!("{}: {}/{peers}", c.name, c.gateway.live_peers()))
                    .collect();
                return Err(RigError::NotReady(format!(
                    "gateways not connected to every peer within 10 s: {have:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Rig {
            clusters: out,
            registry,
            converged_in,
            store,
        })
    }
}

/// The local services a controller publishes, from the rig's sidecars.
fn local_services(
    topo: &ClusterTopo,
    sidecars: &[(ServiceName, u16, bool, Arc<Sidecar>)],
) -> Result<Vec<LocalService>, RigError> {
    let mut out = Vec::new();
    for s in &topo.services {
        let name = ServiceName::parse(&s.name).ctx(|| format!("service {:?}", s.name))?;
        let endpoints = sidecars
            .iter()
            .filter(|x| x.0 == name)
            .filter_map(|x| Some((x.3.inbound_addr()?, x.3.identity().clone())))
            .collect();
        out.push(LocalService {
            vips: Vec::new(),
            hostnames: Default::default(),
            name,
            ports: vec![Port::new(s.port, Protocol::Tcp)],
            meta: Default::default(),
            service_type: ServiceType::ClusterSetIP,
            export: s.export,
            audience: s
                .audience
                .as_ref()
                .map(|a| {
                    a.iter()
                        .map(|c| ClusterName::new(c).ctx(|| format!("audience of {}", s.name)))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?,
            endpoints,
            exported_at_ms: None,
        });
    }
    Ok(out)
}

/// The config API of a cluster's controller, with an SVID from its CA.
fn config_api(p: &Partial, reg: &mut Registry) -> Result<ApiServing, RigError> {
    let own = SharedBundles::new(TrustBundles::new().with(p.ca.bundle()));
    let api_id =
        p.ca.issue(&controller_identity(&p.td), CERT_TTL)
            .ctx(|| "controller SVID".into())?;
    let tls = fedmesh_trust::server_config_from(
        &SvidSource::new(api_id).ctx(|| "controller SVID".into())?,
        own,
        PeerPolicy::trust_domain(p.td.clone()),
        &[b"h2"],
        ClientAuth::Required,
    )
    .ctx(|| "config API TLS".into())?;
    let metrics = ApiMetrics::default();
    metrics.register(reg);
    Ok(ApiServing::new(ANY, tls, ApiLimits::default(), metrics))
}

/// Subscribes the cluster's gateway and sidecars to its controller, each
/// with its own SVID, the way proxies in other processes do.
fn follow(
    p: &Partial,
    app: &ControllerApp,
    client: &Arc<Sidecar>,
) -> Result<Vec<Follower>, RigError> {
    let Some(addr) = app.api_addr() else {
        return Err(RigError::NotReady(
            "the controller serves no config API".into(),
        ));
    };
    let link = ControllerLink {
        address: addr.into(),
        cluster: p.topo.name.clone(),
        renew: false,
    };
    let mut links = Vec::new();
    let gw = p.gateway.clone();
    links.push(
        Follower::start(
            &link,
            "gateway",
            p.gateway.identity_source(),
            p.bundles.clone(),
            None,
            move |c, v| gw.set_config(c, v),
        )
        .ctx(|| format!("gateway of {} following its controller", p.topo.name))?,
    );
    for sc in p.sidecars.iter().map(|s| &s.3).chain([client]) {
        let s = sc.clone();
        links.push(
            Follower::start(
                &link,
                &format!("sidecar/{}", sc.identity()),
                sc.identity_source(),
                p.bundles.clone(),
                None,
                move |c, v| s.set_config(c, v),
            )
            .ctx(|| format!("sidecar {} following its controller", sc.identity()))?,
        );
    }
    Ok(links)
}
