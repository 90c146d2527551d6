//! The service catalog a proxy routes by, and the pure routing decisions
//! made from it ("decide, then do": no sockets here).
//!
//! A [`Catalog`] is one cluster's view: the services it serves (with their
//! endpoints, each a sidecar's inbound listener), which of them it exports,
//! which remote clusters serve which services, and how to reach each peer
//! cluster's gateway. It is built from [`CatalogSpec`] (static YAML today,
//! the controller's config stream later) and validated as a whole.
#![forbid(unsafe_code)]

pub mod mcs;
mod route;
mod spec;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use fedmesh_trust::{SpiffeId, TrustDomain};
use fedmesh_wire::ServiceName;

pub use route::{Hop, RouteError};
pub use spec::{CatalogSpec, EndpointSpec, ImportSpec, PeerSpec, ServiceSpec, SpecError};

/// A cluster's name: a DNS-1123 label such as `east`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn new(name: &str) -> Result<Self, fedmesh_wire::NameError> {
        fedmesh_wire::check_label("cluster name", name)?;
        Ok(Self(name.to_owned()))
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
    pub endpoints: Vec<Endpoint>,
}

/// A peer cluster's gateway, as this cluster reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    pub address: SocketAddr,
    pub identity: SpiffeId,
}

/// This cluster's own gateway, as its sidecars reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGateway {
    pub address: SocketAddr,
    pub identity: SpiffeId,
}

/// One cluster's routing view. Built only through [`CatalogSpec::build`],
/// so every reference in it (import → peer, endpoint → identity) resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    services: BTreeMap<ServiceName, LocalService>,
    /// Remote clusters serving each imported service, in preference order.
    imports: BTreeMap<ServiceName, Vec<ClusterName>>,
    peers: BTreeMap<ClusterName, Peer>,
    gateway: Option<LocalGateway>,
}

impl Catalog {
    /// A catalog with no services, imports, peers or gateway.
    pub fn empty(cluster: ClusterName, trust_domain: TrustDomain) -> Self {
        Self {
            cluster,
            trust_domain,
            services: BTreeMap::new(),
            imports: BTreeMap::new(),
            peers: BTreeMap::new(),
            gateway: None,
        }
    }

    pub fn service(&self, name: &ServiceName) -> Option<&LocalService> {
        self.services.get(name)
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
        let peers: BTreeMap<ClusterName, Peer> =
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
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            imports: imports.into_iter().filter(|(_, c)| !c.is_empty()).collect(),
            peers,
            gateway,
        })
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
