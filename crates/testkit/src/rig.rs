//! The in-process multi-cluster rig: each cluster gets its own root CA and
//! trust domain, an east-west gateway, one sidecar per app replica, and a
//! client sidecar with outbound listeners, all on 127.0.0.1 with real QUIC
//! and mTLS. The catalogs a controller would compute are computed here from
//! the topology (static config), after every listener is bound.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use fedmesh_catalog::{CatalogSpec, EndpointSpec, ImportSpec, PeerSpec, ServiceSpec};
use fedmesh_gateway::{Gateway, GatewaySettings};
use fedmesh_sidecar::{InboundRoute, InboundSettings, OutboundRoute, Sidecar, SidecarSettings};
use fedmesh_transport::Limits;
use fedmesh_trust::{CertificateAuthority, SharedBundles, TrustBundles, TrustDomain};
use fedmesh_wire::ServiceName;
use prometheus_client::registry::Registry;

use crate::apps::{App, AppKind};

const ANY: &str = "127.0.0.1:0";
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct ServiceTopo {
    pub name: String,
    pub port: u16,
    pub replicas: usize,
    pub export: bool,
    pub app: AppKind,
}

#[derive(Debug, Clone)]
pub struct ClusterTopo {
    pub name: String,
    pub services: Vec<ServiceTopo>,
}

#[derive(Debug, Clone)]
pub struct Topology {
    /// Trust domains are `<cluster>.<mesh>`.
    pub mesh: String,
    pub clusters: Vec<ClusterTopo>,
    pub limits: Limits,
}

impl Topology {
    /// The demo's shape: `east` serves `hello.demo` locally; `west` and
    /// `north` each serve and export `echo.demo`; two replicas everywhere.
    pub fn demo() -> Self {
        let svc = |name: &str, export| ServiceTopo {
            name: name.into(),
            port: 7000,
            replicas: 2,
            export,
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
        }
    }
}

/// One running cluster.
pub struct RigCluster {
    pub name: String,
    pub trust_domain: TrustDomain,
    pub ca: CertificateAuthority,
    pub bundles: SharedBundles,
    pub gateway: Gateway,
    /// Sidecars in front of app replicas, with their service.
    pub sidecars: Vec<(ServiceName, Sidecar)>,
    /// A sidecar with outbound listeners for every reachable service.
    pub client: Sidecar,
    pub apps: Vec<App>,
    spec: CatalogSpec,
}

impl RigCluster {
    pub fn catalog_spec(&self) -> &CatalogSpec {
        &self.spec
    }

    /// The client sidecar's outbound listener for `service` (`NAME.NS`).
    pub fn client_addr(&self, service: &str) -> Option<SocketAddr> {
        let name = ServiceName::parse(service).ok()?;
        self.client.outbound_addr(&name)
    }
}

pub struct Rig {
    pub clusters: Vec<RigCluster>,
    pub registry: Registry,
}

impl Rig {
    pub fn cluster(&self, name: &str) -> Option<&RigCluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub async fn start(topo: &Topology) -> anyhow::Result<Rig> {
        let mut registry = Registry::default();
        // CAs and the shared bundle set first: every cluster trusts every
        // other cluster's root, each under its own trust domain.
        let mut cas = Vec::new();
        let mut all = TrustBundles::new();
        for c in &topo.clusters {
            let td = TrustDomain::new(&format!("{}.{}", c.name, topo.mesh))?;
            let ca = CertificateAuthority::new_root(td.clone(), CERT_TTL * 30)?;
            all.insert(ca.bundle());
            cas.push((td, ca));
        }

        // Bind everything with a minimal catalog, then hand out the real
        // catalogs once every address is known.
        struct Partial {
            topo: ClusterTopo,
            td: TrustDomain,
            ca: CertificateAuthority,
            bundles: SharedBundles,
            gateway: Gateway,
            sidecars: Vec<(ServiceName, u16, bool, Sidecar)>,
            apps: Vec<App>,
        }
        let mut parts = Vec::new();
        for (c, (td, ca)) in topo.clusters.iter().zip(cas) {
            let bundles = SharedBundles::new(all.clone());
            let reg = registry
                .sub_registry_with_label((Cow::Borrowed("cluster"), Cow::Owned(c.name.clone())));
            let bare = CatalogSpec {
                cluster: c.name.clone(),
                trust_domain: td.to_string(),
                ..Default::default()
            }
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let gw_id = td.system_id("gateway");
            let gateway = Gateway::build(
                GatewaySettings {
                    catalog: bare.clone(),
                    identity: ca.issue(&gw_id, CERT_TTL)?,
                    bundles: bundles.clone(),
                    quic: ANY.parse()?,
                    tunnel: ANY.parse()?,
                    admin: None,
                    limits: topo.limits.clone(),
                },
                reg,
            )
            .await
            .with_context(|| format!("gateway of {}", c.name))?;
            let mut apps = Vec::new();
            let mut sidecars = Vec::new();
            for s in &c.services {
                let name = ServiceName::parse(&s.name)?;
                let id = td.workload(name.namespace(), name.name())?;
                for i in 0..s.replicas {
                    let app = App::start(s.app, &format!("{}/{}-{i}", c.name, name.name())).await?;
                    let sc = Sidecar::build(
                        SidecarSettings {
                            catalog: bare.clone(),
                            identity: ca.issue(&id, CERT_TTL)?,
                            bundles: bundles.clone(),
                            outbound: Vec::new(),
                            inbound: Some(InboundSettings {
                                listen: ANY.parse()?,
                                routes: vec![InboundRoute {
                                    service: name.clone(),
                                    port: s.port,
                                    app: app.addr,
                                }],
                            }),
                            admin: None,
                            limits: topo.limits.clone(),
                        },
                        reg,
                    )
                    .await?;
                    apps.push(app);
                    sidecars.push((name.clone(), s.port, s.export, sc));
                }
            }
            parts.push(Partial {
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
                ..Default::default()
            };
            for s in &p.topo.services {
                let name = ServiceName::parse(&s.name)?;
                spec.services.push(ServiceSpec {
                    name: name.to_string(),
                    ports: vec![s.port],
                    export: s.export,
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
                    gateway: other.gateway.quic_addr(),
                    identity: None,
                });
                for s in other.topo.services.iter().filter(|s| s.export) {
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

        let mut out = Vec::new();
        for (p, spec) in parts.into_iter().zip(clusters) {
            let catalog = spec
                .build()
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.topo.name))?;
            p.gateway.set_catalog(catalog.clone());
            for s in &p.sidecars {
                s.3.set_catalog(catalog.clone());
            }
            let mut outbound = Vec::new();
            let mut names: Vec<(String, u16)> = spec
                .services
                .iter()
                .map(|s| (s.name.clone(), s.ports[0]))
                .collect();
            for i in &spec.imports {
                if !names.iter().any(|n| n.0 == i.service) {
                    names.push((i.service.clone(), 7000));
                }
            }
            for (n, port) in names {
                outbound.push(OutboundRoute {
                    listen: ANY.parse()?,
                    service: ServiceName::parse(&n)?,
                    port,
                });
            }
            let reg = registry.sub_registry_with_label((
                Cow::Borrowed("cluster"),
                Cow::Owned(p.topo.name.clone()),
            ));
            let client = Sidecar::build(
                SidecarSettings {
                    catalog,
                    identity: p.ca.issue(&p.td.workload("demo", "client")?, CERT_TTL)?,
                    bundles: p.bundles.clone(),
                    outbound,
                    inbound: None,
                    admin: None,
                    limits: topo.limits.clone(),
                },
                reg,
            )
            .await?;
            out.push(RigCluster {
                name: p.topo.name,
                trust_domain: p.td,
                ca: p.ca,
                bundles: p.bundles,
                gateway: p.gateway,
                sidecars: p.sidecars.into_iter().map(|s| (s.0, s.3)).collect(),
                client,
                apps: p.apps,
                spec,
            });
        }
        Ok(Rig {
            clusters: out,
            registry,
        })
    }
}
