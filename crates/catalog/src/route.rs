//! Routing decisions: given a catalog and a target, the ordered list of
//! next hops to try. The caller moves to the next hop when one answers with
//! a retryable status before any payload was sent.

use std::net::SocketAddr;

use fedmesh_trust::SpiffeId;
use fedmesh_wire::{ServiceName, StatusCode, Target};

use crate::{Catalog, ClusterName, ServicePolicy};

/// One place a tunnel stream can go next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// A sidecar's inbound listener in this cluster (mTLS over TCP).
    Endpoint {
        address: SocketAddr,
        identity: SpiffeId,
    },
    /// This cluster's gateway (mTLS over TCP), which goes on to a peer.
    Gateway {
        address: SocketAddr,
        identity: SpiffeId,
    },
    /// A peer cluster's gateway (QUIC).
    Peer { cluster: ClusterName },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    #[error("unknown service {0}")]
    UnknownService(ServiceName),
    #[error("service {service} has no port {port}")]
    UnknownPort { service: ServiceName, port: u16 },
    #[error("service {0} is not exported by this cluster")]
    NotExported(ServiceName),
    #[error("service {service} is not exported to cluster {cluster}")]
    NotInAudience {
        service: ServiceName,
        cluster: ClusterName,
    },
    #[error("service {0} has no endpoints")]
    NoEndpoints(ServiceName),
    #[error("service {0} is served by other clusters, but this cluster has no gateway configured")]
    NoGateway(ServiceName),
    #[error("endpoint {0} is not an endpoint of an exported service")]
    EndpointNotAllowed(SocketAddr),
    #[error("endpoint targets are only accepted from peer gateways")]
    EndpointFromLocal,
    #[error("service {service} is not served by cluster {cluster:?}")]
    NotServedBy {
        service: ServiceName,
        cluster: String,
    },
    #[error("{caller} may not call {service}")]
    NotAuthorized {
        service: ServiceName,
        caller: SpiffeId,
    },
}

impl RouteError {
    /// The status frame code that answers this error.
    pub fn status(&self) -> StatusCode {
        match self {
            // A peer tells none of these apart: a service not exported to
            // it reads as one that does not exist.
            Self::UnknownService(_)
            | Self::UnknownPort { .. }
            | Self::NotExported(_)
            | Self::NotInAudience { .. } => StatusCode::UnknownService,
            Self::NoEndpoints(_) | Self::NoGateway(_) => StatusCode::NoHealthyEndpoint,
            Self::NotServedBy { .. } => StatusCode::UnknownService,
            Self::EndpointNotAllowed(_) | Self::EndpointFromLocal | Self::NotAuthorized { .. } => {
                StatusCode::Denied
            }
        }
    }

    /// A short, fixed name of the error for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownService(_) => "unknown_service",
            Self::UnknownPort { .. } => "unknown_port",
            Self::NotExported(_) => "not_exported",
            Self::NotInAudience { .. } => "not_in_audience",
            Self::NoEndpoints(_) => "no_endpoints",
            Self::NoGateway(_) => "no_gateway",
            Self::EndpointNotAllowed(_) => "endpoint_not_allowed",
            Self::EndpointFromLocal => "endpoint_from_local",
            Self::NotServedBy { .. } => "not_served_by",
            Self::NotAuthorized { .. } => "not_authorized",
        }
    }
}

/// One cluster's share of a service, as the balancer sees it: where its
/// candidates are, which priority level it has and what weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRoute {
    pub cluster: ClusterName,
    /// Lower levels are tried first (see [`ServicePolicy::level`]).
    pub level: u32,
    pub weight: u32,
    /// This cluster's endpoints, or the one hop that reaches a remote
    /// cluster (the local gateway from a sidecar, the peer from a gateway).
    pub hops: Vec<Hop>,
}

static DEFAULT_POLICY: std::sync::LazyLock<ServicePolicy> =
    std::sync::LazyLock::new(ServicePolicy::default);

/// `items` rotated left by `cursor`, so successive calls spread load.
fn rotated<T: Clone>(items: &[T], cursor: usize) -> impl Iterator<Item = T> + '_ {
    let n = items.len().max(1);
    let k = cursor % n;
    items[k.min(items.len())..]
        .iter()
        .chain(&items[..k.min(items.len())])
        .cloned()
}

impl Catalog {
    fn check_port(&self, name: &ServiceName, port: u16) -> Result<(), RouteError> {
        match self.services.get(name) {
            Some(s) if !s.ports.contains(&port) => Err(RouteError::UnknownPort {
                service: name.clone(),
                port,
            }),
            _ => Ok(()),
        }
    }

    /// The service's policy, or the defaults.
    pub fn policy_or_default(&self, name: &ServiceName) -> &ServicePolicy {
        self.policy(name).unwrap_or(&DEFAULT_POLICY)
    }

    fn cluster_route(
        &self,
        policy: &ServicePolicy,
        cluster: &ClusterName,
        hops: Vec<Hop>,
    ) -> ClusterRoute {
        let region = if *cluster == self.cluster {
            self.region.as_str()
        } else {
            self.peer(cluster).map(|p| p.region.as_str()).unwrap_or("")
        };
        ClusterRoute {
            cluster: cluster.clone(),
            level: policy.level(&self.cluster, &self.region, cluster, region),
            weight: policy.weight(cluster),
            hops,
        }
    }

    /// A sidecar's candidates, per cluster: this cluster's endpoints
    /// (direct, sidecar to sidecar), and each remote cluster that serves
    /// the service through the local gateway, with the policy's levels and
    /// weights. The balancer orders them.
    pub fn outbound_routes(
        &self,
        name: &ServiceName,
        port: u16,
    ) -> Result<Vec<ClusterRoute>, RouteError> {
        let local = self.services.get(name);
        let remote = self.imports(name);
        if local.is_none() && remote.is_empty() {
            return Err(RouteError::UnknownService(name.clone()));
        }
        self.check_port(name, port)?;
        let policy = self.policy_or_default(name);
        let mut routes = Vec::new();
        if let Some(s) = local.filter(|s| !s.endpoints.is_empty()) {
            let hops = s
                .endpoints
                .iter()
                .map(|e| Hop::Endpoint {
                    address: e.address,
                    identity: e.identity.clone(),
                })
                .collect();
            routes.push(self.cluster_route(policy, &self.cluster, hops));
        }
        match (&self.gateway, remote.is_empty()) {
            (_, true) => {}
            (Some(g), false) => {
                for c in remote {
                    let hop = Hop::Gateway {
                        address: g.address,
                        identity: g.identity.clone(),
                    };
                    routes.push(self.cluster_route(policy, c, vec![hop]));
                }
            }
            (None, false) if routes.is_empty() => return Err(RouteError::NoGateway(name.clone())),
            (None, false) => {}
        }
        if routes.is_empty() {
            return Err(RouteError::NoEndpoints(name.clone()));
        }
        Ok(routes)
    }

    /// A gateway's candidates for a stream from its own cluster: the peer
    /// clusters serving the service, with levels and weights; only
    /// `hint` when the sidecar chose one.
    pub fn peer_routes(
        &self,
        target: &Target,
        hint: Option<&str>,
    ) -> Result<Vec<ClusterRoute>, RouteError> {
        let Target::Service { name, .. } = target else {
            return Err(RouteError::EndpointFromLocal);
        };
        let clusters = self.imports(name);
        if clusters.is_empty() {
            return Err(RouteError::UnknownService(name.clone()));
        }
        let policy = self.policy_or_default(name);
        let routes: Vec<ClusterRoute> = clusters
            .iter()
            .filter(|c| hint.is_none_or(|h| c.as_str() == h))
            .map(|c| self.cluster_route(policy, c, vec![Hop::Peer { cluster: c.clone() }]))
            .collect();
        if routes.is_empty() {
            return Err(RouteError::NotServedBy {
                service: name.clone(),
                cluster: hint.unwrap_or_default().to_owned(),
            });
        }
        Ok(routes)
    }

    /// Whether `source` may call local service `name` by its policy.
    pub fn authorize(&self, name: &ServiceName, source: &SpiffeId) -> Result<(), RouteError> {
        match self.policy(name).and_then(|p| p.authz.as_ref()) {
            Some(a) if !a.allows(source) => Err(RouteError::NotAuthorized {
                service: name.clone(),
                caller: source.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// A gateway's decision for a stream from peer cluster `peer`'s
    /// gateway: only services exported to `peer`, only their local
    /// endpoints. Never onward to another cluster: a cluster vouches only
    /// for its own workloads.
    ///
    /// What the peer may not see is judged before anything else (ports,
    /// endpoints), so every answer it gets about such a service is the
    /// answer for one that does not exist.
    pub fn route_from_peer(
        &self,
        target: &Target,
        peer: &ClusterName,
        cursor: usize,
    ) -> Result<Vec<Hop>, RouteError> {
        match target {
            Target::Service { name, port } => {
                let s = self
                    .services
                    .get(name)
                    .ok_or_else(|| RouteError::UnknownService(name.clone()))?;
                if !s.exported {
                    return Err(RouteError::NotExported(name.clone()));
                }
                if !s.exported_to(peer) {
                    return Err(RouteError::NotInAudience {
                        service: name.clone(),
                        cluster: peer.clone(),
                    });
                }
                self.check_port(name, *port)?;
                if s.endpoints.is_empty() {
                    return Err(RouteError::NoEndpoints(name.clone()));
                }
                Ok(rotated(&s.endpoints, cursor)
                    .map(|e| Hop::Endpoint {
                        address: e.address,
                        identity: e.identity,
                    })
                    .collect())
            }
            Target::Endpoint(addr) => {
                let e = self
                    .services
                    .values()
                    .filter(|s| s.exported_to(peer))
                    .flat_map(|s| &s.endpoints)
                    .find(|e| e.address == *addr)
                    .ok_or(RouteError::EndpointNotAllowed(*addr))?;
                Ok(vec![Hop::Endpoint {
                    address: e.address,
                    identity: e.identity.clone(),
                }])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CatalogSpec;

    const YAML: &str = r#"
cluster: east
trust_domain: east.demo
gateway: { address: "127.0.0.1:15008" }
services:
  - name: echo.demo
    ports: [7000]
    export: true
    endpoints:
      - { address: "127.0.0.1:9001", identity: "spiffe://east.demo/ns/demo/sa/echo" }
      - { address: "127.0.0.1:9002", identity: "spiffe://east.demo/ns/demo/sa/echo" }
  - name: secret.demo
    ports: [7000]
    endpoints:
      - { address: "127.0.0.1:9003", identity: "spiffe://east.demo/ns/demo/sa/secret" }
  - name: empty.demo
    ports: [7000]
    export: true
  - name: north-only.demo
    ports: [7000]
    export: true
    audience: [north]
    endpoints:
      - { address: "127.0.0.1:9004", identity: "spiffe://east.demo/ns/demo/sa/no" }
  - name: empty-north-only.demo
    ports: [7000]
    export: true
    audience: [north]
imports:
  - { service: echo.demo, clusters: [west] }
  - { service: remote.demo, clusters: [north, west] }
peers:
  - { cluster: west, trust_domain: west.demo, gateway: "127.0.0.1:16443" }
  - { cluster: north, trust_domain: north.demo, gateway: "127.0.0.1:17443" }
"#;

    fn cat() -> Catalog {
        CatalogSpec::from_yaml(YAML).unwrap().build().unwrap()
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn target(s: &str, port: u16) -> Target {
        Target::Service { name: svc(s), port }
    }

    #[test]
    fn outbound_routes_are_local_endpoints_then_each_remote_cluster() {
        let c = cat();
        let r = c.outbound_routes(&svc("echo.demo"), 7000).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].cluster.as_str(), "east");
        assert_eq!(r[0].level, 0);
        assert_eq!(r[0].hops.len(), 2);
        assert!(matches!(&r[0].hops[0], Hop::Endpoint { address, .. } if address.port() == 9001));
        assert_eq!(r[1].cluster.as_str(), "west");
        assert_eq!(
            r[1].level, 2,
            "no regions: west is neither local nor same-region"
        );
        assert!(matches!(&r[1].hops[..], [Hop::Gateway { identity, .. }]
            if identity.as_str() == "spiffe://east.demo/ns/fedmesh-system/sa/gateway"));
        let r = c.outbound_routes(&svc("remote.demo"), 1).unwrap();
        let clusters: Vec<&str> = r.iter().map(|r| r.cluster.as_str()).collect();
        assert_eq!(clusters, ["north", "west"]);
    }

    #[test]
    fn edits_keep_every_import_pointing_at_a_peer() {
        use crate::{CatalogEdit, ClusterName};
        let c = cat();
        let west = ClusterName::new("west").unwrap();
        // Removing a peer that an import still names is refused whole.
        let e = c
            .edited(CatalogEdit {
                gateway: c.gateway().cloned(),
                remove_peers: vec![west.clone()],
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("is not a peer"), "{e}");
        // Removing the imports with it is fine, and leaves `c` untouched.
        let imports: Vec<ServiceName> = c.import_entries().map(|(n, _)| n.clone()).collect();
        let d = c
            .edited(CatalogEdit {
                gateway: c.gateway().cloned(),
                remove_peers: vec![west],
                remove_imports: imports,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(d.import_count(), 0);
        assert!(c.import_count() > 0);
        // An import naming an unknown cluster, a cluster as its own peer.
        let e = c
            .edited(CatalogEdit {
                upsert_imports: vec![(svc("new.demo"), vec![ClusterName::new("south").unwrap()])],
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("south"), "{e}");
        let own = c.peer(&ClusterName::new("west").unwrap()).unwrap().clone();
        let e = c
            .edited(CatalogEdit {
                upsert_peers: vec![crate::Peer {
                    cluster: c.cluster.clone(),
                    ..own
                }],
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("own peer"), "{e}");
    }

    #[test]
    fn outbound_errors() {
        let c = cat();
        assert_eq!(
            c.outbound_routes(&svc("nope.demo"), 1)
                .unwrap_err()
                .status(),
            StatusCode::UnknownService
        );
        assert!(matches!(
            c.outbound_routes(&svc("echo.demo"), 1),
            Err(RouteError::UnknownPort { .. })
        ));
        assert_eq!(
            c.outbound_routes(&svc("empty.demo"), 7000).unwrap_err(),
            RouteError::NoEndpoints(svc("empty.demo"))
        );
    }

    #[test]
    fn from_local_goes_to_the_peers_that_serve_it() {
        let c = cat();
        let r = c.peer_routes(&target("remote.demo", 80), None).unwrap();
        let hops: Vec<Hop> = r.into_iter().flat_map(|r| r.hops).collect();
        assert_eq!(
            hops,
            vec![
                Hop::Peer {
                    cluster: ClusterName::new("north").unwrap()
                },
                Hop::Peer {
                    cluster: ClusterName::new("west").unwrap()
                },
            ]
        );
        assert_eq!(
            c.peer_routes(&target("secret.demo", 7000), None)
                .unwrap_err()
                .status(),
            StatusCode::UnknownService
        );
        assert_eq!(
            c.peer_routes(&Target::Endpoint("127.0.0.1:9001".parse().unwrap()), None)
                .unwrap_err(),
            RouteError::EndpointFromLocal
        );
    }

    #[test]
    fn from_peer_only_exported_local_endpoints() {
        let c = cat();
        let west = ClusterName::new("west").unwrap();
        let h = c
            .route_from_peer(&target("echo.demo", 7000), &west, 0)
            .unwrap();
        assert_eq!(h.len(), 2);
        assert!(h.iter().all(|h| matches!(h, Hop::Endpoint { .. })));
        assert_eq!(
            c.route_from_peer(&target("secret.demo", 7000), &west, 0)
                .unwrap_err(),
            RouteError::NotExported(svc("secret.demo"))
        );
        // Imported-only services are never forwarded onward.
        assert_eq!(
            c.route_from_peer(&target("remote.demo", 80), &west, 0)
                .unwrap_err(),
            RouteError::UnknownService(svc("remote.demo"))
        );
        assert_eq!(
            c.route_from_peer(&target("empty.demo", 7000), &west, 0)
                .unwrap_err()
                .status(),
            StatusCode::NoHealthyEndpoint
        );
        let ok = Target::Endpoint("127.0.0.1:9002".parse().unwrap());
        assert!(c.route_from_peer(&ok, &west, 0).is_ok());
        let hidden = Target::Endpoint("127.0.0.1:9003".parse().unwrap());
        assert_eq!(
            c.route_from_peer(&hidden, &west, 0).unwrap_err().status(),
            StatusCode::Denied
        );
    }

    #[test]
    fn from_peer_outside_the_audience_reads_as_unknown() {
        let c = cat();
        let west = ClusterName::new("west").unwrap();
        let north = ClusterName::new("north").unwrap();
        assert!(c
            .route_from_peer(&target("north-only.demo", 7000), &north, 0)
            .is_ok());
        let unknown = c
            .route_from_peer(&target("nowhere.demo", 7000), &west, 0)
            .unwrap_err();
        // Whatever west asks of a service not exported to it (a wrong
        // port, one without endpoints) gets the answer for no service.
        for (name, port) in [
            ("north-only.demo", 7000),
            ("north-only.demo", 1),
            ("empty-north-only.demo", 7000),
            ("secret.demo", 1),
        ] {
            let e = c
                .route_from_peer(&target(name, port), &west, 0)
                .unwrap_err();
            assert_eq!(e.status(), unknown.status(), "{name}:{port}: {e}");
        }
        assert_eq!(
            c.route_from_peer(&target("north-only.demo", 7000), &west, 0)
                .unwrap_err(),
            RouteError::NotInAudience {
                service: svc("north-only.demo"),
                cluster: west.clone(),
            }
        );
        assert_eq!(
            c.route_from_peer(&target("north-only.demo", 7000), &west, 0)
                .unwrap_err()
                .reason(),
            "not_in_audience"
        );
        // Its endpoints are closed to west too, as any non-endpoint is.
        let ep = Target::Endpoint("127.0.0.1:9004".parse().unwrap());
        assert!(c.route_from_peer(&ep, &north, 0).is_ok());
        let nowhere = Target::Endpoint("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            c.route_from_peer(&ep, &west, 0).unwrap_err().status(),
            c.route_from_peer(&nowhere, &west, 0).unwrap_err().status()
        );
    }

    #[test]
    fn an_audience_is_checked_and_kept() {
        let bad = YAML.replace(
            "audience: [north]\n    endpoints",
            "audience: [North]\n    endpoints",
        );
        let e = CatalogSpec::from_yaml(&bad).unwrap().build().unwrap_err();
        assert!(e.to_string().contains("audience"), "{e}");
        let unexported = YAML.replace(
            "  - name: secret.demo\n    ports: [7000]\n",
            "  - name: secret.demo\n    ports: [7000]\n    audience: [west]\n",
        );
        let e = CatalogSpec::from_yaml(&unexported)
            .unwrap()
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("needs `export: true`"), "{e}");
        // The spec a proxy dumps builds the same catalog again.
        let c = cat();
        let again = c.to_spec().build().unwrap();
        let name = svc("north-only.demo");
        assert_eq!(again.service(&name), c.service(&name));
        assert_eq!(
            c.service(&name).unwrap().audience,
            Some(vec![ClusterName::new("north").unwrap()])
        );
    }

    #[test]
    fn spec_collects_every_error() {
        let bad = r#"
cluster: East
trust_domain: east.demo
services:
  - name: echo
    ports: [0, 0]
    endpoints:
      - { address: "127.0.0.1:1" }
      - { address: "127.0.0.1:2", identity: "spiffe://west.demo/x" }
imports:
  - { service: a.b, clusters: [mars] }
peers:
  - { cluster: west, trust_domain: east.demo, gateway: "127.0.0.1:3" }
"#;
        let errs = CatalogSpec::from_yaml(bad).unwrap().build().unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "cluster name",
            "services[0] (echo)",
            "is not a configured peer",
            "this cluster's own",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let bad2 = r#"
cluster: east
trust_domain: east.demo
services:
  - name: echo.demo
    ports: [0, 0]
    endpoints:
      - { address: "127.0.0.1:1" }
      - { address: "127.0.0.1:2", identity: "spiffe://west.demo/x" }
"#;
        let errs = CatalogSpec::from_yaml(bad2).unwrap().build().unwrap_err().0;
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(CatalogSpec::from_yaml("cluster: a\ntrust_domain: b\nbogus: 1").is_err());
    }
}

#[cfg(test)]
mod big_tests {
    use crate::{Catalog, CatalogEdit, ClusterName, Peer};
    use fedmesh_wire::ServiceName;

    /// Diffs of large catalogs that share structure report exactly what
    /// an edit changed (small catalogs never exercise subtree skipping).
    #[test]
    fn changes_of_large_edited_catalogs_are_exact() {
        let td: fedmesh_trust::TrustDomain = "a.mesh".parse().unwrap();
        let ptd: fedmesh_trust::TrustDomain = "b.mesh".parse().unwrap();
        let b = ClusterName::new("b").unwrap();
        let mut imports = std::collections::BTreeMap::new();
        for i in 0..10_000 {
            imports.insert(
                ServiceName::new(&format!("s{i}"), "ns").unwrap(),
                vec![b.clone()],
            );
        }
        let peer = Peer {
            cluster: b.clone(),
            trust_domain: ptd.clone(),
            address: "127.0.0.1:1".parse().unwrap(),
            tcp_address: None,
            identity: crate::gateway_identity(&ptd),
            region: String::new(),
        };
        let mut cat = Catalog::assemble(
            ClusterName::new("a").unwrap(),
            td,
            None,
            vec![],
            imports,
            vec![peer],
        )
        .unwrap();
        for k in 0..200usize {
            let i = (k * 7919) % 10_000;
            let name = ServiceName::new(&format!("s{i}"), "ns").unwrap();
            let removed = cat
                .edited(CatalogEdit {
                    upsert_imports: vec![(name.clone(), vec![])],
                    ..Default::default()
                })
                .unwrap();
            let ch = removed.changes_from(&cat);
            assert_eq!(ch.removed_imports, vec![&name], "step {k}: removal");
            assert!(ch.imports.is_empty(), "step {k}");
            let back = removed
                .edited(CatalogEdit {
                    upsert_imports: vec![(name.clone(), vec![b.clone()])],
                    ..Default::default()
                })
                .unwrap();
            let ch = back.changes_from(&removed);
            assert_eq!(ch.imports.len(), 1, "step {k}: re-add");
            assert!(ch.removed_imports.is_empty());
            assert_eq!(back, cat, "step {k}");
            cat = back;
        }
    }
}
