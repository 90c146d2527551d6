//! The service catalog a proxy routes by, and the pure routing decisions
//! made from it ("decide, then do": no sockets here).
//!
//! A [`Catalog`] is one cluster's view: the services it serves (with their
//! endpoints, each a sidecar's inbound listener), which of them it exports,
//! which remote clusters serve which services, and how to reach each peer
//! cluster's gateway. It is built from [`CatalogSpec`] (static YAML today,
//! the controller's config stream later) and validated as a whole.
#![forbid(unsafe_code)]

mod balancer;
pub mod http;
pub mod mcs;
pub mod policy;
mod route;
mod spec;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use imbl::OrdMap;
use std::net::SocketAddr;

use fedmesh_trust::{SpiffeId, TrustDomain};
use fedmesh_wire::ServiceName;

pub use balancer::{Attempt, Balancers, Member, ServiceBalancer};
pub use fedmesh_balance::{Ejection, Load};
pub use http::{HttpDecision, HttpPolicy, RequestFacts};
pub use policy::{Authz, Failover, Partition, Principal, ServicePolicy};
pub use route::{ClusterRoute, Hop, RouteError};
pub use spec::{
    CatalogSpec, ClusterSetIpSpec, EndpointSpec, ImportSpec, PeerSpec, ServiceSpec, SpecError,
};

/// A cluster's name: a DNS-1123 label such as `east`. Shared, not copied:
/// every import and export of a large federation names a cluster.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(std::sync::Arc<str>);

impl ClusterName {
    pub fn new(name: &str) -> Result<Self, fedmesh_wire::NameError> {
        fedmesh_wire::check_label("cluster name", name)?;
        Ok(Self(std::sync::Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ClusterName {
    type Err = fedmesh_wire::NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterName({})", self.0)
    }
}

/// The default identity of a cluster's gateway.
pub fn gateway_identity(td: &TrustDomain) -> SpiffeId {
    td.system_id("gateway")
}

/// One endpoint of a local service: a sidecar's inbound mTLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Identity the sidecar must present.
    pub identity: SpiffeId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub name: ServiceName,
    pub ports: Vec<u16>,
    pub exported: bool,
    /// The peer clusters an exported service is exported to; `None`: every
    /// peer. This cluster's gateway serves a peer's stream for the service
    /// only when the peer is in it.
    pub audience: Option<Vec<ClusterName>>,
    pub endpoints: Vec<Endpoint>,
    /// The Service's cluster IPs: a sidecar's transparent listener routes
    /// connections to `vip:port` as this service.
    pub vips: Vec<std::net::IpAddr>,
}

impl LocalService {
    /// Whether peer cluster `peer` may reach this service through the gateway.
    pub fn exported_to(&self, peer: &ClusterName) -> bool {
        self.exported && self.audience.as_ref().is_none_or(|a| a.contains(peer))
    }
}

/// A multi-cluster service's ClusterSet IPs: a sidecar's transparent
/// listener routes connections to `ip:port` (one of `ports`) as the
/// service, wherever it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSetVip {
    pub service: ServiceName,
    pub ips: Vec<std::net::IpAddr>,
    /// The ServiceImport's ports.
    pub ports: Vec<u16>,
}

/// A peer cluster's gateway, as this cluster reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    /// QUIC (UDP) address of the peer's gateway.
    pub address: SocketAddr,
    /// The same gateway's TLS/TCP fallback (HTTP/2 CONNECT), for networks
    /// that drop UDP; `None` when it offers none.
    pub tcp_address: Option<SocketAddr>,
    pub identity: SpiffeId,
    /// Locality for failover order; empty when unknown.
    pub region: String,
}

/// This cluster's own gateway, as its sidecars reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGateway {
    pub address: SocketAddr,
    pub identity: SpiffeId,
}

/// One cluster's routing view. Built only through [`CatalogSpec::build`],
/// [`Catalog::assemble`] or [`Catalog::edited`], so every reference in it
/// (import → peer) resolves.
///
/// The maps are persistent (structure-sharing): cloning a catalog is
/// O(1) and an edit costs O(changes × log n), so a proxy applying a small
/// delta to a catalog of 10,000 services does not copy 10,000 services.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    /// This cluster's region (empty when unknown): peers in the same
    /// region are preferred by locality failover.
    pub region: String,
    services: OrdMap<ServiceName, LocalService>,
    /// Remote clusters serving each imported service, in preference order.
    imports: OrdMap<ServiceName, Vec<ClusterName>>,
    peers: OrdMap<ClusterName, Peer>,
    /// Traffic and authorization policy per service (local or imported).
    policies: OrdMap<ServiceName, Arc<ServicePolicy>>,
    /// ClusterSet IPs by service.
    clusterset: OrdMap<ServiceName, ClusterSetVip>,
    gateway: Option<LocalGateway>,
}

// imbl 6.1's `OrdMap::diff` (and the `PartialEq` built on it) misreports
// which key changed in large maps that share structure (see the
// `changes_of_large_edited_catalogs_are_exact` test), so equality and diffs
// here walk both maps in key order instead: O(n), shared by every reader.

/// Equal maps: the same root (free), or the same entries in order.
pub fn ordmap_eq<K: Ord + Clone + PartialEq, V: Clone + PartialEq>(
    a: &OrdMap<K, V>,
    b: &OrdMap<K, V>,
) -> bool {
    a.ptr_eq(b) || (a.len() == b.len() && a.iter().eq(b.iter()))
}

/// Merge-joins two key-ordered sequences: entries new or changed in `next`
/// go to `upserts`, keys only in `base` to `removed`.
pub fn keyed_diff<K: Ord, V: PartialEq, P, R>(
    base: impl Iterator<Item = (K, V)>,
    next: impl Iterator<Item = (K, V)>,
    mut upsert: impl FnMut(&K, &V) -> P,
    mut remove: impl FnMut(K) -> R,
    upserts: &mut Vec<P>,
    removed: &mut Vec<R>,
) {
    let mut base = base.peekable();
    for (k, v) in next {
        while let Some((bk, _)) = base.peek() {
            if *bk < k {
                if let Some((bk, _)) = base.next() {
                    removed.push(remove(bk));
                }
            } else {
                break;
            }
        }
        match base.peek() {
            Some((bk, bv)) if *bk == k => {
                if *bv != v {
                    upserts.push(upsert(&k, &v));
                }
                base.next();
            }
            _ => upserts.push(upsert(&k, &v)),
        }
    }
    removed.extend(base.map(|(k, _)| remove(k)));
}

impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.cluster == other.cluster
            && self.trust_domain == other.trust_domain
            && self.region == other.region
            && ordmap_eq(&self.policies, &other.policies)
            && self.gateway == other.gateway
            && ordmap_eq(&self.peers, &other.peers)
            && ordmap_eq(&self.imports, &other.imports)
            && ordmap_eq(&self.services, &other.services)
            && ordmap_eq(&self.clusterset, &other.clusterset)
    }
}

impl Eq for Catalog {}

/// What changed between two catalogs (see [`Catalog::changes_from`]).
#[derive(Debug, Default)]
pub struct CatalogChanges<'a> {
    pub services: Vec<&'a LocalService>,
    pub removed_services: Vec<&'a ServiceName>,
    pub imports: Vec<(&'a ServiceName, &'a [ClusterName])>,
    pub removed_imports: Vec<&'a ServiceName>,
    pub peers: Vec<&'a Peer>,
    pub removed_peers: Vec<&'a ClusterName>,
    pub policies: Vec<(&'a ServiceName, &'a ServicePolicy)>,
    pub removed_policies: Vec<&'a ServiceName>,
    pub clusterset: Vec<&'a ClusterSetVip>,
    pub removed_clusterset: Vec<&'a ServiceName>,
}

/// A change to a catalog: what to add or replace, what to remove (by key).
#[derive(Debug, Clone, Default)]
pub struct CatalogEdit {
    pub gateway: Option<LocalGateway>,
    pub upsert_services: Vec<LocalService>,
    pub remove_services: Vec<ServiceName>,
    pub upsert_imports: Vec<(ServiceName, Vec<ClusterName>)>,
    pub remove_imports: Vec<ServiceName>,
    pub upsert_peers: Vec<Peer>,
    pub remove_peers: Vec<ClusterName>,
    pub upsert_policies: Vec<(ServiceName, Arc<ServicePolicy>)>,
    pub remove_policies: Vec<ServiceName>,
    pub upsert_clusterset: Vec<ClusterSetVip>,
    pub remove_clusterset: Vec<ServiceName>,
    /// The new region, when it changes.
    pub region: Option<String>,
}

impl Catalog {
    /// A catalog with no services, imports, peers or gateway.
    pub fn empty(cluster: ClusterName, trust_domain: TrustDomain) -> Self {
        Self {
            cluster,
            trust_domain,
            region: String::new(),
            services: OrdMap::new(),
            imports: OrdMap::new(),
            peers: OrdMap::new(),
            policies: OrdMap::new(),
            clusterset: OrdMap::new(),
            gateway: None,
        }
    }

    pub fn service(&self, name: &ServiceName) -> Option<&LocalService> {
        self.services.get(name)
    }

    /// The service whose cluster IP is `ip` and that serves `port` (what
    /// a redirected connection to `ip:port` means). A scan: VIPs change
    /// with the catalog and a lookup costs about a microsecond per
    /// thousand services.
    pub fn service_for_vip(&self, ip: std::net::IpAddr, port: u16) -> Option<&ServiceName> {
        self.services
            .values()
            .find(|s| s.vips.contains(&ip) && s.ports.contains(&port))
            .map(|s| &s.name)
            .or_else(|| {
                self.clusterset
                    .values()
                    .find(|v| v.ips.contains(&ip) && v.ports.contains(&port))
                    .map(|v| &v.service)
            })
    }

    /// Every service's ClusterSet IPs, ordered by service name.
    pub fn clusterset_entries(&self) -> impl Iterator<Item = &ClusterSetVip> {
        self.clusterset.values()
    }

    /// This catalog with `other`'s ClusterSet IPs (shared, not copied).
    pub fn with_clusterset_of(mut self, other: &Catalog) -> Self {
        self.clusterset = other.clusterset.clone();
        self
    }

    /// This catalog with `vips` as its whole set of ClusterSet IPs.
    pub fn with_clusterset(mut self, vips: Vec<ClusterSetVip>) -> Self {
        self.clusterset = vips.into_iter().map(|v| (v.service.clone(), v)).collect();
        self
    }

    pub fn services(&self) -> impl Iterator<Item = &LocalService> {
        self.services.values()
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    pub fn peer(&self, cluster: &ClusterName) -> Option<&Peer> {
        self.peers.get(cluster)
    }

    /// The peer whose gateway presents `id`, if any.
    pub fn peer_by_identity(&self, id: &SpiffeId) -> Option<&Peer> {
        self.peers.values().find(|p| &p.identity == id)
    }

    /// Builds a catalog from typed parts (a controller's computed view),
    /// without a round trip through the string spec. Imports may only name
    /// clusters in `peers`; the first such problem is returned.
    pub fn assemble(
        cluster: ClusterName,
        trust_domain: TrustDomain,
        gateway: Option<LocalGateway>,
        services: Vec<LocalService>,
        imports: BTreeMap<ServiceName, Vec<ClusterName>>,
        peers: Vec<Peer>,
    ) -> Result<Self, SpecError> {
        let peers: OrdMap<ClusterName, Peer> =
            peers.into_iter().map(|p| (p.cluster.clone(), p)).collect();
        for (svc, clusters) in &imports {
            if let Some(c) = clusters.iter().find(|c| !peers.contains_key(*c)) {
                return Err(SpecError(vec![format!(
                    "import {svc}: cluster {c} is not a peer"
                )]));
            }
        }
        if peers.contains_key(&cluster) {
            return Err(SpecError(vec![format!(
                "cluster {cluster} cannot be its own peer"
            )]));
        }
        Ok(Self {
            cluster,
            trust_domain,
            region: String::new(),
            policies: OrdMap::new(),
            clusterset: OrdMap::new(),
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            imports: imports.into_iter().filter(|(_, c)| !c.is_empty()).collect(),
            peers,
            gateway,
        })
    }

    /// This catalog with `edit` applied, checked: removing what is not
    /// there, an import naming a cluster that is no peer (after the edit),
    /// or this cluster as its own peer is an error and changes nothing.
    pub fn edited(&self, edit: CatalogEdit) -> Result<Self, SpecError> {
        let mut next = self.clone();
        let mut errs = Vec::new();
        next.gateway = edit.gateway;
        for name in &edit.remove_services {
            if next.services.remove(name).is_none() {
                errs.push(format!("removed service {name} is not present"));
            }
        }
        for s in edit.upsert_services {
            next.services.insert(s.name.clone(), s);
        }
        for name in &edit.remove_imports {
            if next.imports.remove(name).is_none() {
                errs.push(format!("removed import {name} is not present"));
            }
        }
        let mut changed_imports = Vec::new();
        for (name, clusters) in edit.upsert_imports {
            changed_imports.push(name.clone());
            if clusters.is_empty() {
                next.imports.remove(&name);
            } else {
                next.imports.insert(name, clusters);
            }
        }
        for c in &edit.remove_peers {
            if next.peers.remove(c).is_none() {
                errs.push(format!("removed peer {c} is not present"));
            }
        }
        for p in edit.upsert_peers {
            next.peers.insert(p.cluster.clone(), p);
        }
        for name in &edit.remove_policies {
            if next.policies.remove(name).is_none() {
                errs.push(format!("removed policy {name} is not present"));
            }
        }
        for (name, p) in edit.upsert_policies {
            next.policies.insert(name, p);
        }
        for name in &edit.remove_clusterset {
            if next.clusterset.remove(name).is_none() {
                errs.push(format!("removed ClusterSet IPs of {name} are not present"));
            }
        }
        for v in edit.upsert_clusterset {
            next.clusterset.insert(v.service.clone(), v);
        }
        if let Some(r) = edit.region {
            next.region = r;
        }
        if next.peers.contains_key(&next.cluster) {
            errs.push(format!("cluster {} cannot be its own peer", next.cluster));
        }
        // Only what the edit touched can break references: changed imports
        // always, every import only when a peer went away.
        let dangling = |name: &ServiceName, clusters: &[ClusterName], errs: &mut Vec<String>| {
            if let Some(c) = clusters.iter().find(|c| !next.peers.contains_key(*c)) {
                errs.push(format!("import {name}: cluster {c} is not a peer"));
            }
        };
        if edit.remove_peers.is_empty() {
            for name in &changed_imports {
                if let Some(clusters) = next.imports.get(name) {
                    dangling(name, clusters, &mut errs);
                }
            }
        } else {
            for (name, clusters) in &next.imports {
                dangling(name, clusters, &mut errs);
            }
        }
        if errs.is_empty() {
            Ok(next)
        } else {
            Err(SpecError(errs))
        }
    }

    /// What differs from `old`: added or changed entries, and removed keys.
    pub fn changes_from<'a>(&'a self, old: &'a Catalog) -> CatalogChanges<'a> {
        let mut c = CatalogChanges::default();
        if !old.services.ptr_eq(&self.services) {
            keyed_diff(
                old.services.iter(),
                self.services.iter(),
                |_, v| *v,
                |k| k,
                &mut c.services,
                &mut c.removed_services,
            );
        }
        if !old.imports.ptr_eq(&self.imports) {
            keyed_diff(
                old.imports.iter(),
                self.imports.iter(),
                |k, v| (*k, v.as_slice()),
                |k| k,
                &mut c.imports,
                &mut c.removed_imports,
            );
        }
        if !old.peers.ptr_eq(&self.peers) {
            keyed_diff(
                old.peers.iter(),
                self.peers.iter(),
                |_, v| *v,
                |k| k,
                &mut c.peers,
                &mut c.removed_peers,
            );
        }
        if !old.clusterset.ptr_eq(&self.clusterset) {
            keyed_diff(
                old.clusterset.iter(),
                self.clusterset.iter(),
                |_, v| *v,
                |k| k,
                &mut c.clusterset,
                &mut c.removed_clusterset,
            );
        }
        if !old.policies.ptr_eq(&self.policies) {
            keyed_diff(
                old.policies.iter(),
                self.policies.iter(),
                |k, v| (*k, &***v),
                |k| k,
                &mut c.policies,
                &mut c.removed_policies,
            );
        }
        c
    }

    /// This catalog with `policies` as its whole policy set.
    pub fn with_policies(mut self, policies: BTreeMap<ServiceName, Arc<ServicePolicy>>) -> Self {
        self.policies = policies.into_iter().collect();
        self
    }

    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// The policy for `name`, if one is declared.
    pub fn policy(&self, name: &ServiceName) -> Option<&ServicePolicy> {
        self.policies.get(name).map(|p| &**p)
    }

    /// Every policy, ordered by service name.
    pub fn policy_entries(&self) -> impl Iterator<Item = (&ServiceName, &Arc<ServicePolicy>)> {
        self.policies.iter()
    }

    /// Services imported from at least one other cluster.
    pub fn import_count(&self) -> usize {
        self.imports.len()
    }

    /// Every import with its clusters, ordered by service name.
    pub fn import_entries(&self) -> impl Iterator<Item = (&ServiceName, &[ClusterName])> {
        self.imports.iter().map(|(k, v)| (k, v.as_slice()))
    }

    pub fn imports(&self, name: &ServiceName) -> &[ClusterName] {
        self.imports
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn gateway(&self) -> Option<&LocalGateway> {
        self.gateway.as_ref()
    }

    /// Identity of this cluster's gateway (whether or not its address is known).
    pub fn gateway_identity(&self) -> SpiffeId {
        self.gateway
            .as_ref()
            .map(|g| g.identity.clone())
            .unwrap_or_else(|| gateway_identity(&self.trust_domain))
    }
}
