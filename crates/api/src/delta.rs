//! The config a proxy runs on, its wire form, and the two pure halves of
//! the protocol: the controller's diff between two configs, and the
//! proxy's validation and application of an update.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_catalog::{
    Catalog, CatalogEdit, ClusterName, ClusterSetVip, Endpoint, LocalGateway, LocalService, Peer,
    ServicePolicy,
};
use fedmesh_trust::{SpiffeId, TrustBundle, TrustBundles, TrustDomain};
use fedmesh_wire::ServiceName;

use crate::pb;

/// What every proxy of a cluster is configured with: the catalog it routes
/// by and the bundles it verifies peers with.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    pub catalog: Arc<Catalog>,
    pub bundles: Arc<TrustBundles>,
}

/// Why a proxy refused an update (sent back as the NACK's text).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("delta on version {base}, but the applied version is {have:?}")]
    Base { base: u64, have: Option<u64> },
    #[error("{what} {key:?}: {error}")]
    Field {
        what: &'static str,
        key: String,
        error: String,
    },
    #[error("update is for cluster {got}, this proxy belongs to {want}")]
    Cluster { want: String, got: String },
    #[error("peer {cluster} has no trust bundle for {trust_domain}")]
    NoBundle {
        cluster: String,
        trust_domain: String,
    },
    #[error("catalog does not validate: {0}")]
    Catalog(String),
}

impl ApplyError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Base { .. } => "base_version",
            Self::Field { .. } => "bad_field",
            Self::Cluster { .. } => "wrong_cluster",
            Self::NoBundle { .. } => "peer_without_bundle",
            Self::Catalog(_) => "invalid_catalog",
        }
    }
}

// ---- controller side: encode and diff ----

fn service_pb(s: &LocalService) -> pb::Service {
    pb::Service {
        name: s.name.to_string(),
        ports: s.ports.iter().map(|p| u32::from(*p)).collect(),
        exported: s.exported,
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                address: e.address.to_string(),
                identity: e.identity.to_string(),
            })
            .collect(),
        vips: s.vips.iter().map(ToString::to_string).collect(),
        audience: s.audience.as_ref().map(|a| pb::Audience {
            clusters: a.iter().map(ToString::to_string).collect(),
        }),
    }
}

fn peer_pb(p: &Peer) -> pb::Peer {
    pb::Peer {
        cluster: p.cluster.to_string(),
        trust_domain: p.trust_domain.to_string(),
        address: p.address.to_string(),
        identity: p.identity.to_string(),
        region: p.region.clone(),
        tcp_address: p.tcp_address.map(|a| a.to_string()).unwrap_or_default(),
    }
}

fn policy_pb(name: &ServiceName, p: &ServicePolicy) -> pb::Policy {
    pb::Policy {
        service: name.to_string(),
        // A policy is plain data (strings, numbers, maps): it always encodes.
        json: serde_json::to_string(p).unwrap_or_default(),
    }
}

fn decode_policy(p: &pb::Policy) -> Result<(ServiceName, Arc<ServicePolicy>), ApplyError> {
    let name = field("policy", &p.service, p.service.parse::<ServiceName>())?;
    let policy: ServicePolicy = field("policy", &p.service, serde_json::from_str(&p.json))?;
    let problems = policy.problems("policy");
    if !problems.is_empty() {
        return Err(ApplyError::Field {
            what: "policy",
            key: p.service.clone(),
            error: problems.join("; "),
        });
    }
    Ok((name, Arc::new(policy)))
}

fn bundle_pb(b: &TrustBundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain().to_string(),
        pem: b.to_pem(),
    }
}

/// The update that takes a proxy from `base` (None: nothing) to `next`.
pub(crate) fn diff(
    version: u64,
    base: Option<(u64, &ProxyConfig)>,
    next: &ProxyConfig,
) -> pb::ConfigUpdate {
    let c = &next.catalog;
    let mut u = pb::ConfigUpdate {
        version,
        full: base.is_none(),
        base_version: base.map(|b| b.0).unwrap_or(0),
        cluster: c.cluster.to_string(),
        trust_domain: c.trust_domain.to_string(),
        gateway: c.gateway().map(|g| pb::Gateway {
            address: g.address.to_string(),
            identity: g.identity.to_string(),
        }),
        region: c.region.clone(),
        ..Default::default()
    };
    let empty = Catalog::empty(c.cluster.clone(), c.trust_domain.clone());
    let empty_bundles = TrustBundles::new();
    let (bc, bb) = match base {
        Some((_, b)) => (&*b.catalog, &*b.bundles),
        None => (&empty, &empty_bundles),
    };
    // The catalog's persistent maps diff in time proportional to the
    // change; bundles are few and merge-joined.
    let ch = c.changes_from(bc);
    u.services = ch.services.into_iter().map(service_pb).collect();
    u.removed_services = ch
        .removed_services
        .iter()
        .map(ToString::to_string)
        .collect();
    u.imports = ch
        .imports
        .into_iter()
        .map(|(name, clusters)| pb::Import {
            service: name.to_string(),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
        })
        .collect();
    u.removed_imports = ch.removed_imports.iter().map(ToString::to_string).collect();
    u.peers = ch.peers.into_iter().map(peer_pb).collect();
    u.removed_peers = ch.removed_peers.iter().map(ToString::to_string).collect();
    u.policies = ch
        .policies
        .into_iter()
        .map(|(k, p)| policy_pb(k, p))
        .collect();
    u.removed_policies = ch
        .removed_policies
        .iter()
        .map(ToString::to_string)
        .collect();
    u.clusterset_ips = ch
        .clusterset
        .into_iter()
        .map(|v| pb::ClusterSetIp {
            service: v.service.to_string(),
            ips: v.ips.iter().map(ToString::to_string).collect(),
            ports: v.ports.iter().map(|p| u32::from(*p)).collect(),
        })
        .collect();
    u.removed_clusterset_ips = ch
        .removed_clusterset
        .iter()
        .map(ToString::to_string)
        .collect();
    fedmesh_catalog::keyed_diff(
        bb.iter().map(|b| (b.trust_domain(), b)),
        next.bundles.iter().map(|b| (b.trust_domain(), b)),
        |_, b| bundle_pb(b),
        |k| k.to_string(),
        &mut u.bundles,
        &mut u.removed_bundles,
    );
    u
}

// ---- proxy side: validate and apply ----

/// A proxy's applied config. Deltas edit the catalog's persistent maps,
/// so applying one costs what it changes, not the size of the catalog.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The cluster this proxy belongs to, when it knows (from its own config).
    expect_cluster: Option<ClusterName>,
    version: Option<u64>,
    catalog: Option<Catalog>,
    bundles: BTreeMap<TrustDomain, TrustBundle>,
}

fn field<T, E: std::fmt::Display>(
    what: &'static str,
    key: &str,
    r: Result<T, E>,
) -> Result<T, ApplyError> {
    r.map_err(|e| ApplyError::Field {
        what,
        key: key.to_owned(),
        error: e.to_string(),
    })
}

fn parse_addr(what: &'static str, key: &str, s: &str) -> Result<SocketAddr, ApplyError> {
    field(what, key, s.parse::<SocketAddr>())
}

fn parse_id(what: &'static str, key: &str, s: &str) -> Result<SpiffeId, ApplyError> {
    field(what, key, s.parse::<SpiffeId>())
}

impl Applied {
    pub fn new(expect_cluster: Option<ClusterName>) -> Self {
        Self {
            expect_cluster,
            version: None,
            catalog: None,
            bundles: BTreeMap::new(),
        }
    }

    /// The version applied last, if any.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Checks `u` against what is applied and, only if all of it is valid,
    /// applies it and returns the resulting config. On error nothing changes.
    pub fn apply(&mut self, u: &pb::ConfigUpdate) -> Result<ProxyConfig, ApplyError> {
        let cluster = field("cluster", &u.cluster, u.cluster.parse::<ClusterName>())?;
        if let Some(want) = &self.expect_cluster {
            if want != &cluster {
                return Err(ApplyError::Cluster {
                    want: want.to_string(),
                    got: cluster.to_string(),
                });
            }
        }
        let td = field(
            "trust_domain",
            &u.trust_domain,
            u.trust_domain.parse::<TrustDomain>(),
        )?;
        let (base, mut bundles) = if u.full {
            (Catalog::empty(cluster.clone(), td.clone()), BTreeMap::new())
        } else {
            let have = self
                .catalog
                .as_ref()
                .filter(|_| self.version == Some(u.base_version))
                .ok_or(ApplyError::Base {
                    base: u.base_version,
                    have: self.version,
                })?;
            if have.cluster != cluster || have.trust_domain != td {
                return Err(ApplyError::Cluster {
                    want: have.cluster.to_string(),
                    got: cluster.to_string(),
                });
            }
            // Bundles share their roots: this copy is a handful of Arcs.
            (have.clone(), self.bundles.clone())
        };
        let edit = CatalogEdit {
            gateway: match &u.gateway {
                None => None,
                Some(g) => Some(LocalGateway {
                    address: parse_addr("gateway", &g.address, &g.address)?,
                    identity: parse_id("gateway", &g.address, &g.identity)?,
                }),
            },
            remove_services: u
                .removed_services
                .iter()
                .map(|raw| field("removed service", raw, raw.parse::<ServiceName>()))
                .collect::<Result<_, _>>()?,
            upsert_services: u
                .services
                .iter()
                .map(decode_service)
                .collect::<Result<_, _>>()?,
            remove_imports: u
                .removed_imports
                .iter()
                .map(|raw| field("removed import", raw, raw.parse::<ServiceName>()))
                .collect::<Result<_, _>>()?,
            upsert_imports: u
                .imports
                .iter()
                .map(|i| {
                    let name = field("import", &i.service, i.service.parse::<ServiceName>())?;
                    let clusters = i
                        .clusters
                        .iter()
                        .map(|c| field("import", &i.service, c.parse::<ClusterName>()))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((name, clusters))
                })
                .collect::<Result<_, ApplyError>>()?,
            remove_peers: u
                .removed_peers
                .iter()
                .map(|raw| field("removed peer", raw, raw.parse::<ClusterName>()))
                .collect::<Result<_, _>>()?,
            upsert_peers: u
                .peers
                .iter()
                .map(|p| {
                    Ok(Peer {
                        cluster: field("peer", &p.cluster, p.cluster.parse::<ClusterName>())?,
                        trust_domain: field(
                            "peer",
                            &p.cluster,
                            p.trust_domain.parse::<TrustDomain>(),
                        )?,
                        address: parse_addr("peer", &p.cluster, &p.address)?,
                        tcp_address: match p.tcp_address.as_str() {
                            "" => None,
                            raw => Some(parse_addr("peer", &p.cluster, raw)?),
                        },
                        identity: parse_id("peer", &p.cluster, &p.identity)?,
                        region: p.region.clone(),
                    })
                })
                .collect::<Result<_, ApplyError>>()?,
            remove_policies: u
                .removed_policies
                .iter()
                .map(|raw| field("removed policy", raw, raw.parse::<ServiceName>()))
                .collect::<Result<_, _>>()?,
            upsert_policies: u
                .policies
                .iter()
                .map(decode_policy)
                .collect::<Result<_, _>>()?,
            remove_clusterset: u
                .removed_clusterset_ips
                .iter()
                .map(|raw| field("removed ClusterSet IPs", raw, raw.parse::<ServiceName>()))
                .collect::<Result<_, _>>()?,
            upsert_clusterset: u
                .clusterset_ips
                .iter()
                .map(decode_clusterset)
                .collect::<Result<_, _>>()?,
            region: Some(u.region.clone()),
        };
        for raw in &u.removed_bundles {
            let key = field("removed bundle", raw, raw.parse::<TrustDomain>())?;
            if bundles.remove(&key).is_none() {
                return Err(ApplyError::Field {
                    what: "removed bundle",
                    key: raw.clone(),
                    error: "removed but not present".into(),
                });
            }
        }
        for b in &u.bundles {
            let btd = field(
                "bundle",
                &b.trust_domain,
                b.trust_domain.parse::<TrustDomain>(),
            )?;
            let bundle = field(
                "bundle",
                &b.trust_domain,
                TrustBundle::from_pem(btd.clone(), &b.pem),
            )?;
            bundles.insert(btd, bundle);
        }
        let catalog = base
            .edited(edit)
            .map_err(|e| ApplyError::Catalog(e.to_string()))?;

        // Whole-config checks: this cluster and every peer are verifiable.
        if !bundles.contains_key(&td) {
            return Err(ApplyError::NoBundle {
                cluster: cluster.to_string(),
                trust_domain: td.to_string(),
            });
        }
        if let Some(p) = catalog
            .peers()
            .find(|p| !bundles.contains_key(&p.trust_domain))
        {
            return Err(ApplyError::NoBundle {
                cluster: p.cluster.to_string(),
                trust_domain: p.trust_domain.to_string(),
            });
        }
        let mut set = TrustBundles::new();
        for b in bundles.values() {
            set.insert(b.clone());
        }
        self.version = Some(u.version);
        self.catalog = Some(catalog.clone());
        self.bundles = bundles;
        Ok(ProxyConfig {
            catalog: Arc::new(catalog),
            bundles: Arc::new(set),
        })
    }
}

fn decode_clusterset(v: &pb::ClusterSetIp) -> Result<ClusterSetVip, ApplyError> {
    let bad = |error: String| ApplyError::Field {
        what: "ClusterSet IPs",
        key: v.service.clone(),
        error,
    };
    let service = field(
        "ClusterSet IPs",
        &v.service,
        v.service.parse::<ServiceName>(),
    )?;
    if v.ips.is_empty() || v.ips.len() > 2 {
        return Err(bad(format!(
            "{} addresses; one or two expected",
            v.ips.len()
        )));
    }
    let ips = v
        .ips
        .iter()
        .map(|ip| {
            ip.parse()
                .map_err(|_| bad(format!("`{ip}` is not an IP address")))
        })
        .collect::<Result<Vec<std::net::IpAddr>, _>>()?;
    if v.ports.is_empty() || v.ports.len() > 100 {
        return Err(bad(format!("{} ports; 1 to 100 expected", v.ports.len())));
    }
    let ports = v
        .ports
        .iter()
        .map(|p| match u16::try_from(*p) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(bad(format!("port {p} out of range"))),
        })
        .collect::<Result<Vec<u16>, _>>()?;
    Ok(ClusterSetVip {
        service,
        ips,
        ports,
    })
}

fn decode_service(s: &pb::Service) -> Result<LocalService, ApplyError> {
    let name = field("service", &s.name, s.name.parse::<ServiceName>())?;
    let ports = s
        .ports
        .iter()
        .map(|p| match u16::try_from(*p) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(ApplyError::Field {
                what: "service",
                key: s.name.clone(),
                error: format!("port {p} out of range"),
            }),
        })
        .collect::<Result<Vec<u16>, _>>()?;
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| {
            Ok(Endpoint {
                address: parse_addr("endpoint", &s.name, &e.address)?,
                identity: parse_id("endpoint", &s.name, &e.identity)?,
            })
        })
        .collect::<Result<Vec<_>, ApplyError>>()?;
    let vips = s
        .vips
        .iter()
        .map(|v| {
            v.parse().map_err(|_| ApplyError::Field {
                what: "service",
                key: s.name.clone(),
                error: format!("vip `{v}` is not an IP address"),
            })
        })
        .collect::<Result<Vec<std::net::IpAddr>, _>>()?;
    let audience = s
        .audience
        .as_ref()
        .map(|a| {
            a.clusters
                .iter()
                .map(|c| {
                    ClusterName::new(c).map_err(|e| ApplyError::Field {
                        what: "service",
                        key: s.name.clone(),
                        error: format!("audience: {e}"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(LocalService {
        vips,
        name,
        ports,
        exported: s.exported,
        audience,
        endpoints,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fedmesh_trust::CertificateAuthority;
    use std::time::Duration;

    struct Fixture {
        td: TrustDomain,
        bundles: TrustBundles,
        east: TrustDomain,
    }

    fn fixture() -> Fixture {
        let td: TrustDomain = "west.mesh".parse().unwrap();
        let east: TrustDomain = "east.mesh".parse().unwrap();
        let ca = CertificateAuthority::new_root(td.clone(), Duration::from_secs(600)).unwrap();
        let eca = CertificateAuthority::new_root(east.clone(), Duration::from_secs(600)).unwrap();
        Fixture {
            bundles: TrustBundles::new().with(ca.bundle()).with(eca.bundle()),
            td,
            east,
        }
    }

    /// A config from a bit mask: which of 8 services exist, which import
    /// from `east`, and whether `east` is a peer at all.
    fn config(f: &Fixture, services: u8, imports: u8, port: u16) -> ProxyConfig {
        let with_ips = services | imports;
        let svc = |i: u8| -> ServiceName {
            format!("s{i}.default.svc.clusterset.local")
                .parse()
                .unwrap()
        };
        let east = ClusterName::new("east").unwrap();
        let services = (0..8)
            .filter(|i| services & (1 << i) != 0)
            .map(|i| LocalService {
                // Some with a cluster IP, which must survive the trip.
                vips: if i % 3 == 0 {
                    vec![std::net::IpAddr::from([10, 96, 0, i])]
                } else {
                    Vec::new()
                },
                name: svc(i),
                ports: vec![port],
                exported: i % 2 == 0,
                audience: (i % 4 == 0).then(|| vec![east.clone()]),
                endpoints: vec![Endpoint {
                    address: "127.0.0.1:9000".parse().unwrap(),
                    identity: f.td.workload("default", "x").unwrap(),
                }],
            })
            .collect();
        let imports: BTreeMap<_, _> = (0..8)
            .filter(|i| imports & (1 << i) != 0)
            .map(|i| (svc(i), vec![east.clone()]))
            .collect();
        let peers = if imports.is_empty() {
            vec![]
        } else {
            vec![Peer {
                cluster: east,
                trust_domain: f.east.clone(),
                address: "127.0.0.1:7000".parse().unwrap(),
                tcp_address: port
                    .is_multiple_of(2)
                    .then(|| "127.0.0.1:7001".parse().unwrap()),
                identity: fedmesh_catalog::gateway_identity(&f.east),
                region: if port.is_multiple_of(3) {
                    "eu".into()
                } else {
                    String::new()
                },
            }]
        };
        // Policies come and go and change with the same bits.
        let policies = (0..8)
            .filter(|i| imports.contains_key(&svc(*i)) && i % 2 == 0)
            .map(|i| {
                let p = fedmesh_catalog::ServicePolicy {
                    weights: [("east".to_owned(), u32::from(port % 7) + 1)].into(),
                    ..Default::default()
                };
                (svc(i), Arc::new(p))
            })
            .collect();
        let catalog = Catalog::assemble(
            ClusterName::new("west").unwrap(),
            f.td.clone(),
            None,
            services,
            imports,
            peers,
        )
        .unwrap()
        .with_policies(policies)
        .with_region(if port.is_multiple_of(2) { "eu" } else { "" })
        // ClusterSet IPs come, go and change ports with the same bits.
        .with_clusterset(
            (0..8u8)
                .filter(|i| with_ips & (1 << i) != 0 && i % 3 != 1)
                .map(|i| ClusterSetVip {
                    service: svc(i),
                    ips: vec![std::net::IpAddr::from([241, 0, 0, i + 1])],
                    ports: vec![port],
                })
                .collect(),
        );
        ProxyConfig {
            catalog: Arc::new(catalog),
            bundles: Arc::new(f.bundles.clone()),
        }
    }

    #[test]
    fn every_delta_between_configs_reproduces_the_target() {
        let f = fixture();
        // A deterministic walk over many pairs of configs.
        let mut x: u32 = 12345;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as u8
        };
        let mut proxy = Applied::new(Some(ClusterName::new("west").unwrap()));
        let mut prev = config(&f, 0b1010_1010, 0b11, 80);
        assert_eq!(proxy.apply(&diff(1, None, &prev)).unwrap(), prev);
        for v in 2..200u64 {
            let target = config(&f, next(), next(), 80 + (next() % 3) as u16);
            let u = diff(v, Some((v - 1, &prev)), &target);
            assert!(!u.full);
            assert_eq!(proxy.apply(&u).unwrap(), target, "step {v}");
            prev = target;
        }
        // Nothing changed: an empty delta.
        let same = diff(500, Some((199, &prev)), &prev);
        assert!(same.clusterset_ips.is_empty() && same.removed_clusterset_ips.is_empty());
        assert!(same.services.is_empty() && same.removed_services.is_empty());
        assert!(same.imports.is_empty() && same.peers.is_empty() && same.bundles.is_empty());
    }

    fn rejects(proxy: &mut Applied, u: &pb::ConfigUpdate) -> ApplyError {
        let before = proxy.clone();
        let e = proxy.apply(u).unwrap_err();
        assert_eq!(proxy.version, before.version, "state changed on error");
        assert_eq!(proxy.catalog, before.catalog, "state changed on error");
        assert_eq!(proxy.bundles, before.bundles, "state changed on error");
        e
    }

    #[test]
    fn bad_updates_are_refused_and_change_nothing() {
        let f = fixture();
        let a = config(&f, 0b11, 0b1, 80);
        let mut proxy = Applied::new(Some(ClusterName::new("west").unwrap()));
        proxy.apply(&diff(1, None, &a)).unwrap();

        let b = config(&f, 0b111, 0b1, 80);
        let mut u = diff(2, Some((1, &a)), &b);
        u.base_version = 7;
        assert!(matches!(
            rejects(&mut proxy, &u),
            ApplyError::Base {
                base: 7,
                have: Some(1)
            }
        ));

        let mut u = diff(2, Some((1, &a)), &b);
        u.removed_services
            .push("ghost.default.svc.clusterset.local".into());
        let e = rejects(&mut proxy, &u);
        assert!(e.to_string().contains("not present"), "{e}");

        let mut u = diff(2, Some((1, &a)), &b);
        u.services[0].ports = vec![70000];
        assert_eq!(rejects(&mut proxy, &u).reason(), "bad_field");

        let mut u = diff(2, Some((1, &a)), &b);
        u.services[0].endpoints[0].identity = "https://not-spiffe".into();
        assert_eq!(rejects(&mut proxy, &u).reason(), "bad_field");

        // An import that names a cluster the proxy has never heard of.
        let mut u = diff(2, Some((1, &a)), &b);
        u.imports.push(pb::Import {
            service: "s5.default.svc.clusterset.local".into(),
            clusters: vec!["north".into()],
        });
        assert_eq!(rejects(&mut proxy, &u).reason(), "invalid_catalog");

        // Policies: not JSON, an unknown field, and one that does not validate.
        for json in [
            "{",
            r#"{"retries": 3}"#,
            r#"{"retry": {"attempts": 0}}"#,
            r#"{"authz": {"allow": ["*"]}}"#,
        ] {
            let mut u = diff(2, Some((1, &a)), &b);
            u.policies.push(pb::Policy {
                service: "s0.default.svc.clusterset.local".into(),
                json: json.into(),
            });
            let e = rejects(&mut proxy, &u);
            assert_eq!(e.reason(), "bad_field", "{json}: {e}");
        }

        // ClusterSet IPs that are not addresses, too many, bad ports, or
        // removed without being there.
        for (ips, ports) in [
            (vec!["241.0.0.300"], vec![80]),
            (vec![], vec![80]),
            (vec!["241.0.0.1", "241.0.0.2", "fd00::1"], vec![80]),
            (vec!["241.0.0.1"], vec![0]),
            (vec!["241.0.0.1"], vec![]),
        ] {
            let mut u = diff(2, Some((1, &a)), &b);
            u.clusterset_ips.push(pb::ClusterSetIp {
                service: "s0.default.svc.clusterset.local".into(),
                ips: ips.iter().map(|s| s.to_string()).collect(),
                ports,
            });
            assert_eq!(rejects(&mut proxy, &u).reason(), "bad_field", "{ips:?}");
        }
        let mut u = diff(2, Some((1, &a)), &b);
        u.removed_clusterset_ips
            .push("ghost.default.svc.clusterset.local".into());
        assert_eq!(rejects(&mut proxy, &u).reason(), "invalid_catalog");

        // Removing the peer's bundle while the peer stays.
        let mut u = diff(2, Some((1, &a)), &b);
        u.removed_bundles.push(f.east.to_string());
        assert_eq!(rejects(&mut proxy, &u).reason(), "peer_without_bundle");

        let mut u = diff(2, None, &b);
        u.cluster = "south".into();
        assert_eq!(rejects(&mut proxy, &u).reason(), "wrong_cluster");

        let mut u = diff(2, None, &b);
        u.bundles[0].pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert_eq!(rejects(&mut proxy, &u).reason(), "bad_field");

        // After all that, a good delta on the untouched state still applies.
        assert_eq!(proxy.apply(&diff(2, Some((1, &a)), &b)).unwrap(), b);
    }
}
