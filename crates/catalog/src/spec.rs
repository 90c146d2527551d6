//! The serialized form of a catalog (YAML or JSON) and its validation.
//! `build` collects every problem before failing, so an operator fixes a
//! config file in one pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use fedmesh_trust::{SpiffeId, TrustDomain};
use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

use crate::{
    gateway_identity, Catalog, ClusterName, ClusterSetVip, Endpoint, LocalGateway, LocalService,
    Peer, ServicePolicy,
};

/// Upper bounds on catalog sizes, so a bad config cannot exhaust memory.
pub const MAX_SERVICES: usize = 100_000;
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 10_000;
/// Clusters one export may name as its audience.
pub const MAX_AUDIENCE: usize = 1_024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CatalogSpec {
    pub cluster: String,
    pub trust_domain: String,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub imports: Vec<ImportSpec>,
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<EndpointSpec>,
    /// This cluster's region, for locality failover.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Traffic and authorization policy, by service name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, ServicePolicy>,
    /// Multi-cluster services' ClusterSet IPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusterset_ips: Vec<ClusterSetIpSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSetIpSpec {
    pub service: String,
    /// One per IP family at most.
    pub ips: Vec<std::net::IpAddr>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `NAME.NAMESPACE` (or the full `…svc.clusterset.local` form).
    pub name: String,
    pub ports: Vec<u16>,
    /// Whether other clusters may reach it through the gateway.
    #[serde(default)]
    pub export: bool,
    /// The peer clusters an exported service is exported to (absent:
    /// every peer). The gateway refuses other peers' streams for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<Vec<String>>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// Addresses apps connect to for it (the Service's cluster IPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: SocketAddr,
    /// Defaults: for a gateway, `spiffe://<td>/ns/fedmesh-system/sa/gateway`;
    /// endpoints must name theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportSpec {
    pub service: String,
    /// Remote clusters serving it, most preferred first.
    pub clusters: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub cluster: String,
    pub trust_domain: String,
    pub gateway: SocketAddr,
    /// The gateway's TLS/TCP fallback address, when it offers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_tcp: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
}

/// All problems found in a spec, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid catalog:\n  - {}", .0.join("\n  - "))]
pub struct SpecError(pub Vec<String>);

impl CatalogSpec {
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        serde_yaml_ng::from_str(text).map_err(|e| SpecError(vec![e.to_string()]))
    }

    pub fn build(&self) -> Result<Catalog, SpecError> {
        let mut errs = Vec::new();
        let mut err = |s: String| errs.push(s);

        let cluster = ClusterName::new(&self.cluster)
            .map_err(|e| err(format!("cluster: {e}")))
            .ok();
        let trust_domain = TrustDomain::new(&self.trust_domain)
            .map_err(|e| err(format!("trust_domain {:?}: {e}", self.trust_domain)))
            .ok();

        let id_in =
            |what: &str, raw: &str, td: Option<&TrustDomain>, err: &mut dyn FnMut(String)| {
                match SpiffeId::new(raw) {
                    Ok(id) => {
                        if let Some(td) = td {
                            if id.trust_domain_name() != td.as_str() {
                                err(format!("{what}: identity {id} is not in trust domain {td}"));
                                return None;
                            }
                        }
                        Some(id)
                    }
                    Err(e) => {
                        err(format!("{what}: identity {raw:?}: {e}"));
                        None
                    }
                }
            };

        let mut peers = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            let what = format!("peers[{i}] ({})", p.cluster);
            let name = ClusterName::new(&p.cluster)
                .map_err(|e| err(format!("{what}: {e}")))
                .ok();
            let td = TrustDomain::new(&p.trust_domain)
                .map_err(|e| err(format!("{what}: trust_domain: {e}")))
                .ok();
            if name.is_some() && name == cluster {
                err(format!("{what}: a cluster cannot be its own peer"));
            }
            if td.is_some() && td == trust_domain {
                err(format!("{what}: trust domain {} is this cluster's own; every cluster needs its own trust domain", p.trust_domain));
            }
            let identity = match (&p.identity, &td) {
                (Some(raw), td) => id_in(&what, raw, td.as_ref(), &mut err),
                (None, Some(td)) => Some(gateway_identity(td)),
                (None, None) => None,
            };
            if let (Some(name), Some(td), Some(identity)) = (name, td, identity) {
                if peers.contains_key(&name) {
                    err(format!("{what}: duplicate peer cluster"));
                }
                peers.insert(
                    name.clone(),
                    Peer {
                        cluster: name,
                        trust_domain: td,
                        address: p.gateway,
                        tcp_address: p.gateway_tcp,
                        identity,
                        region: p.region.clone(),
                    },
                );
            }
        }

        if self.services.len() > MAX_SERVICES {
            err(format!(
                "{} services, more than the limit of {MAX_SERVICES}",
                self.services.len()
            ));
        }
        let mut services = BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let what = format!("services[{i}] ({})", s.name);
            let Ok(name) = ServiceName::parse(&s.name).map_err(|e| err(format!("{what}: {e}")))
            else {
                continue;
            };
            if s.ports.is_empty() {
                err(format!("{what}: needs at least one port"));
            }
            if s.ports.contains(&0) {
                err(format!("{what}: port 0 is not a port"));
            }
            let unique: BTreeSet<_> = s.ports.iter().collect();
            if unique.len() != s.ports.len() {
                err(format!("{what}: duplicate ports"));
            }
            if s.endpoints.len() > MAX_ENDPOINTS_PER_SERVICE {
                err(format!(
                    "{what}: more than {MAX_ENDPOINTS_PER_SERVICE} endpoints"
                ));
            }
            let mut endpoints = Vec::with_capacity(s.endpoints.len());
            for (j, e) in s.endpoints.iter().enumerate() {
                let ewhat = format!("{what}: endpoints[{j}]");
                match &e.identity {
                    Some(raw) => {
                        if let Some(identity) = id_in(&ewhat, raw, trust_domain.as_ref(), &mut err)
                        {
                            endpoints.push(Endpoint {
                                address: e.address,
                                identity,
                            });
                        }
                    }
                    None => err(format!(
                        "{ewhat}: needs an identity (the SPIFFE ID its sidecar presents)"
                    )),
                }
            }
            let audience = s.audience.as_ref().map(|list| {
                if list.len() > MAX_AUDIENCE {
                    err(format!(
                        "{what}: audience names more than {MAX_AUDIENCE} clusters"
                    ));
                }
                list.iter()
                    .filter_map(|c| {
                        ClusterName::new(c)
                            .map_err(|e| err(format!("{what}: audience: {e}")))
                            .ok()
                    })
                    .collect::<Vec<_>>()
            });
            if audience.is_some() && !s.export {
                err(format!("{what}: an audience needs `export: true`"));
            }
            if services.contains_key(&name) {
                err(format!("{what}: duplicate service"));
            }
            services.insert(
                name.clone(),
                LocalService {
                    vips: s.vips.clone(),
                    name,
                    ports: s.ports.clone(),
                    exported: s.export,
                    audience,
                    endpoints,
                },
            );
        }

        let mut imports: BTreeMap<ServiceName, Vec<ClusterName>> = BTreeMap::new();
        for (i, imp) in self.imports.iter().enumerate() {
            let what = format!("imports[{i}] ({})", imp.service);
            let Ok(name) =
                ServiceName::parse(&imp.service).map_err(|e| err(format!("{what}: {e}")))
            else {
                continue;
            };
            let list = imports.entry(name).or_default();
            for c in &imp.clusters {
                match ClusterName::new(c) {
                    Ok(c) if peers.contains_key(&c) => {
                        if !list.contains(&c) {
                            list.push(c)
                        }
                    }
                    Ok(c) => err(format!("{what}: cluster {c} is not a configured peer")),
                    Err(e) => err(format!("{what}: {e}")),
                }
            }
        }

        let mut clusterset = BTreeMap::new();
        let mut vips_seen: BTreeSet<std::net::IpAddr> = services
            .values()
            .flat_map(|s: &LocalService| s.vips.iter().copied())
            .collect();
        for (i, v) in self.clusterset_ips.iter().enumerate() {
            let what = format!("clusterset_ips[{i}] ({})", v.service);
            let Ok(name) = ServiceName::parse(&v.service).map_err(|e| err(format!("{what}: {e}")))
            else {
                continue;
            };
            if v.ips.is_empty() || v.ips.len() > 2 {
                err(format!("{what}: one or two IPs expected"));
            }
            if v.ports.is_empty() || v.ports.contains(&0) {
                err(format!("{what}: needs one or more non-zero ports"));
            }
            for ip in &v.ips {
                if !vips_seen.insert(*ip) {
                    err(format!("{what}: {ip} is already another service's address"));
                }
            }
            if clusterset.contains_key(&name) {
                err(format!("{what}: duplicate service"));
            }
            clusterset.insert(
                name.clone(),
                ClusterSetVip {
                    service: name,
                    ips: v.ips.clone(),
                    ports: v.ports.clone(),
                },
            );
        }

        let gateway = match (&self.gateway, &trust_domain) {
            (Some(g), td) => {
                let identity = match (&g.identity, td) {
                    (Some(raw), td) => id_in("gateway", raw, td.as_ref(), &mut err),
                    (None, Some(td)) => Some(gateway_identity(td)),
                    (None, None) => None,
                };
                identity.map(|identity| LocalGateway {
                    address: g.address,
                    identity,
                })
            }
            (None, _) => None,
        };

        let policies = crate::policy::parse_policies(&self.policies, &mut errs);

        match (cluster, trust_domain) {
            (Some(cluster), Some(trust_domain)) if errs.is_empty() => Ok(Catalog {
                cluster,
                trust_domain,
                region: self.region.clone(),
                policies: policies.into_iter().collect(),
                clusterset: clusterset.into_iter().collect(),
                services: services.into_iter().collect(),
                imports: imports.into_iter().collect(),
                peers: peers.into_iter().collect(),
                gateway,
            }),
            _ => Err(SpecError(errs)),
        }
    }
}

impl Catalog {
    /// A proxy's `/config_dump`: who it is, the fingerprint of each trust
    /// bundle it verifies peers with (an operator rotating a root checks
    /// here that every proxy has the new bundle), and the catalog it
    /// routes by.
    pub fn config_dump(
        &self,
        identity: &SpiffeId,
        bundles: &fedmesh_trust::TrustBundles,
    ) -> String {
        #[derive(Serialize)]
        struct Dump<'a> {
            identity: &'a str,
            bundles: BTreeMap<String, String>,
            catalog: CatalogSpec,
        }
        serde_json::to_string(&Dump {
            identity: identity.as_str(),
            bundles: bundles
                .iter()
                .map(|b| (b.trust_domain().to_string(), b.fingerprint()))
                .collect(),
            catalog: self.to_spec(),
        })
        // Plain data (strings, numbers, maps) always serializes.
        .unwrap_or_default()
    }

    /// The spec that builds this catalog again: what a proxy dumps at
    /// `/config_dump`, and what an operator can feed back as a static file.
    pub fn to_spec(&self) -> CatalogSpec {
        CatalogSpec {
            cluster: self.cluster.to_string(),
            trust_domain: self.trust_domain.to_string(),
            region: self.region.clone(),
            services: self
                .services
                .values()
                .map(|s| ServiceSpec {
                    vips: s.vips.clone(),
                    name: s.name.to_string(),
                    ports: s.ports.clone(),
                    export: s.exported,
                    audience: s
                        .audience
                        .as_ref()
                        .map(|a| a.iter().map(|c| c.to_string()).collect()),
                    endpoints: s
                        .endpoints
                        .iter()
                        .map(|e| EndpointSpec {
                            address: e.address,
                            identity: Some(e.identity.to_string()),
                        })
                        .collect(),
                })
                .collect(),
            imports: self
                .imports
                .iter()
                .map(|(name, clusters)| ImportSpec {
                    service: name.to_string(),
                    clusters: clusters.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            peers: self
                .peers
                .values()
                .map(|p| PeerSpec {
                    cluster: p.cluster.to_string(),
                    trust_domain: p.trust_domain.to_string(),
                    gateway: p.address,
                    gateway_tcp: p.tcp_address,
                    identity: Some(p.identity.to_string()),
                    region: p.region.clone(),
                })
                .collect(),
            gateway: self.gateway.as_ref().map(|g| EndpointSpec {
                address: g.address,
                identity: Some(g.identity.to_string()),
            }),
            policies: self
                .policies
                .iter()
                .map(|(k, v)| (k.to_string(), (**v).clone()))
                .collect(),
            clusterset_ips: self
                .clusterset
                .values()
                .map(|v| ClusterSetIpSpec {
                    service: v.service.to_string(),
                    ips: v.ips.clone(),
                    ports: v.ports.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_dumps_to_a_spec_that_builds_it_again() {
        let yaml = r#"
cluster: east
trust_domain: east.demo
region: eu
gateway: { address: "127.0.0.1:15008" }
services:
  - name: echo.demo
    ports: [7000, 7001]
    export: true
    endpoints:
      - { address: "127.0.0.1:9001", identity: "spiffe://east.demo/ns/demo/sa/echo" }
imports:
  - { service: remote.demo, clusters: [north, west] }
peers:
  - { cluster: west, trust_domain: west.demo, gateway: "127.0.0.1:16443", gateway_tcp: "127.0.0.1:16444", region: us }
  - { cluster: north, trust_domain: north.demo, gateway: "127.0.0.1:17443" }
policies:
  echo.demo:
    authz: { allow: ["spiffe://west.demo/*"] }
  remote.demo:
    failover: [north, west]
    weights: { north: 9, west: 1 }
clusterset_ips:
  - { service: remote.demo, ips: ["241.0.0.7", "fd00:fe::7"], ports: [8080] }
"#;
        let c = CatalogSpec::from_yaml(yaml).unwrap().build().unwrap();
        let dumped = serde_yaml_ng::to_string(&c.to_spec()).unwrap();
        let again = CatalogSpec::from_yaml(&dumped).unwrap().build().unwrap();
        assert_eq!(again, c, "{dumped}");
        // A ClusterSet IP is routed as its service, on its ports only.
        let ip = "241.0.0.7".parse().unwrap();
        assert_eq!(
            c.service_for_vip(ip, 8080).unwrap().to_string(),
            "remote.demo"
        );
        assert!(c.service_for_vip(ip, 9090).is_none());
    }

    #[test]
    fn clusterset_ips_are_checked() {
        let yaml = r#"
cluster: east
trust_domain: east.demo
services:
  - { name: echo.demo, ports: [80], vips: ["10.0.0.1"] }
clusterset_ips:
  - { service: echo.demo, ips: ["10.0.0.1"], ports: [80] }
  - { service: Bad, ips: [], ports: [0] }
  - { service: a.demo, ips: ["241.0.0.1", "241.0.0.2", "fd00::1"], ports: [1] }
"#;
        let e = CatalogSpec::from_yaml(yaml)
            .unwrap()
            .build()
            .unwrap_err()
            .to_string();
        for want in [
            "10.0.0.1 is already another service's address",
            "clusterset_ips[1] (Bad)",
            "clusterset_ips[2] (a.demo): one or two IPs expected",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
