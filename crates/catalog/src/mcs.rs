//! Multi-Cluster Services semantics (KEP-1645): merging every cluster's
//! exports into the imports one cluster sees. Pure.
//!
//! - Same namespace/name in several clusters is one service.
//! - An import exists while at least one visible cluster exports it.
//! - Ports are the union of the exporters' ports.
//! - Conflicting port protocols or service types set a conflict; the
//!   oldest export (then the lowest cluster name) wins, and the conflicting
//!   cluster is left out of the import until the conflict is resolved.
//! - Beyond the API: an export may name an audience; clusters outside it
//!   do not see the export at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

use crate::ClusterName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ServiceType {
    #[default]
    ClusterSetIP,
    Headless,
}

/// One cluster's export of one service, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub cluster: ClusterName,
    pub service: ServiceName,
    pub ports: Vec<(u16, Protocol)>,
    pub service_type: ServiceType,
    /// When the export was created (ms since the epoch): the oldest wins.
    pub exported_at: u64,
    pub audience: Option<BTreeSet<ClusterName>>,
    /// Healthy endpoints behind it; a cluster with none is not routed to.
    pub ready_endpoints: u32,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ConflictKind {
    /// Two clusters export the same port with different protocols.
    PortProtocol {
        port: u16,
    },
    ServiceType,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub kind: ConflictKind,
    /// The cluster whose export decides.
    pub winner: String,
    /// The cluster left out.
    pub loser: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ConflictKind::PortProtocol { port } => write!(
                f,
                "port {port}: {} exports another protocol than {} (oldest export wins)",
                self.loser, self.winner
            ),
            ConflictKind::ServiceType => write!(
                f,
                "{} exports another service type than {} (oldest export wins)",
                self.loser, self.winner
            ),
        }
    }
}

/// What one cluster imports of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub service: ServiceName,
    pub service_type: ServiceType,
    pub ports: Vec<(u16, Protocol)>,
    /// Clusters to route to, most preferred first (weight, then name).
    pub clusters: Vec<ClusterName>,
    pub conflicts: Vec<Conflict>,
}

/// The imports `viewer` sees, given every cluster's exports. The viewer's
/// own exports are not imports (it serves them locally).
pub fn merge(viewer: &ClusterName, exports: &[Export]) -> BTreeMap<ServiceName, Import> {
    let mut by_service: BTreeMap<&ServiceName, Vec<&Export>> = BTreeMap::new();
    for e in exports {
        if &e.cluster == viewer {
            continue;
        }
        if e.audience.as_ref().is_some_and(|a| !a.contains(viewer)) {
            continue;
        }
        by_service.entry(&e.service).or_default().push(e);
    }
    let mut out = BTreeMap::new();
    for (service, mut list) in by_service {
        let Some((oldest, ports, conflicts, members)) = resolve(&mut list) else {
            continue;
        };
        let mut serving: Vec<&Export> = members
            .into_iter()
            .filter(|e| e.ready_endpoints > 0)
            .collect();
        serving.sort_by(|a, b| {
            b.weight
                .cmp(&a.weight)
                .then_with(|| a.cluster.cmp(&b.cluster))
        });
        out.insert(
            service.clone(),
            Import {
                service: service.clone(),
                service_type: oldest,
                ports,
                clusters: serving.into_iter().map(|e| e.cluster.clone()).collect(),
                conflicts,
            },
        );
    }
    out
}

type Resolved<'a> = (
    ServiceType,
    Vec<(u16, Protocol)>,
    Vec<Conflict>,
    Vec<&'a Export>,
);

/// Applies the conflict rules to one service's exports: the oldest export
/// decides the type, the first to claim a port its protocol; returns the
/// type, the merged ports, the conflicts and the exports that stay in.
fn resolve<'a>(list: &mut [&'a Export]) -> Option<Resolved<'a>> {
    list.sort_by(|a, b| (a.exported_at, &a.cluster).cmp(&(b.exported_at, &b.cluster)));
    let oldest = *list.first()?;
    let mut ports: BTreeMap<u16, (Protocol, &ClusterName)> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut members: Vec<&Export> = Vec::new();
    for e in list.iter() {
        if e.service_type != oldest.service_type {
            conflicts.push(Conflict {
                kind: ConflictKind::ServiceType,
                winner: oldest.cluster.to_string(),
                loser: e.cluster.to_string(),
            });
            continue;
        }
        let clash = e.ports.iter().find_map(|(port, proto)| {
            ports
                .get(port)
                .filter(|(p, _)| p != proto)
                .map(|(_, owner)| (*port, (*owner).clone()))
        });
        if let Some((port, owner)) = clash {
            conflicts.push(Conflict {
                kind: ConflictKind::PortProtocol { port },
                winner: owner.to_string(),
                loser: e.cluster.to_string(),
            });
            continue;
        }
        for (port, proto) in &e.ports {
            ports.entry(*port).or_insert((*proto, &e.cluster));
        }
        members.push(e);
    }
    let ports = ports
        .into_iter()
        .map(|(p, (proto, _))| (p, proto))
        .collect();
    Some((oldest.service_type, ports, conflicts, members))
}

/// The conflicts `cluster`'s own exports lose, by service, judged against
/// every cluster's exports (audiences aside: a conflict is a conflict for
/// whoever sees both). What a ServiceExport's Conflict condition reports.
pub fn export_conflicts(
    cluster: &ClusterName,
    exports: &[Export],
) -> BTreeMap<ServiceName, Vec<Conflict>> {
    let mut by_service: BTreeMap<&ServiceName, Vec<&Export>> = BTreeMap::new();
    for e in exports {
        by_service.entry(&e.service).or_default().push(e);
    }
    let mut out = BTreeMap::new();
    for (service, mut list) in by_service {
        if !list.iter().any(|e| &e.cluster == cluster) {
            continue;
        }
        if let Some((_, _, conflicts, _)) = resolve(&mut list) {
            let lost: Vec<Conflict> = conflicts
                .into_iter()
                .filter(|c| c.loser == cluster.as_str())
                .collect();
            if !lost.is_empty() {
                out.insert(service.clone(), lost);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn exp(cluster: &str, at: u64, ports: &[(u16, Protocol)]) -> Export {
        Export {
            cluster: c(cluster),
            service: ServiceName::new("api", "shop").unwrap(),
            ports: ports.to_vec(),
            service_type: ServiceType::ClusterSetIP,
            exported_at: at,
            audience: None,
            ready_endpoints: 2,
            weight: 100,
        }
    }

    #[test]
    fn a_cluster_learns_which_of_its_exports_lose() {
        let e = [
            exp("west", 10, &[(80, Protocol::Tcp)]),
            exp("east", 20, &[(80, Protocol::Udp)]),
        ];
        let lost = export_conflicts(&c("east"), &e);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost.values().next().unwrap()[0].winner, "west");
        assert!(export_conflicts(&c("west"), &e).is_empty());
    }

    #[test]
    fn same_name_is_one_service_with_the_union_of_ports() {
        let e = [
            exp("west", 10, &[(80, Protocol::Tcp)]),
            exp("north", 20, &[(80, Protocol::Tcp), (9090, Protocol::Tcp)]),
            exp("east", 5, &[(80, Protocol::Tcp)]),
        ];
        let m = merge(&c("east"), &e);
        assert_eq!(m.len(), 1);
        let i = m.values().next().unwrap();
        assert_eq!(i.ports, [(80, Protocol::Tcp), (9090, Protocol::Tcp)]);
        assert_eq!(i.clusters, [c("north"), c("west")]);
        assert!(i.conflicts.is_empty());
    }

    #[test]
    fn oldest_export_wins_conflicts() {
        let mut headless = exp("north", 1, &[(80, Protocol::Tcp)]);
        headless.service_type = ServiceType::Headless;
        let e = [
            exp("west", 10, &[(80, Protocol::Tcp)]),
            exp("south", 20, &[(80, Protocol::Udp)]),
            headless,
        ];
        let m = merge(&c("east"), &e);
        let i = m.values().next().unwrap();
        // north is oldest: its type wins, west and south conflict on type.
        assert_eq!(i.service_type, ServiceType::Headless);
        assert_eq!(i.clusters, [c("north")]);
        assert_eq!(i.conflicts.len(), 2);

        let e = [
            exp("west", 10, &[(80, Protocol::Tcp)]),
            exp("south", 20, &[(80, Protocol::Udp)]),
        ];
        let i = merge(&c("east"), &e).into_values().next().unwrap();
        assert_eq!(i.clusters, [c("west")]);
        assert_eq!(
            i.conflicts,
            [Conflict {
                kind: ConflictKind::PortProtocol { port: 80 },
                winner: "west".into(),
                loser: "south".into()
            }]
        );
        assert!(i.conflicts[0].to_string().contains("oldest export wins"));
    }

    #[test]
    fn audience_and_readiness() {
        let mut only_north = exp("west", 1, &[(80, Protocol::Tcp)]);
        only_north.audience = Some([c("north")].into());
        let mut empty = exp("south", 2, &[(80, Protocol::Tcp)]);
        empty.ready_endpoints = 0;
        let e = [only_north, empty];
        let east = merge(&c("east"), &e);
        // east cannot see west's export; south has no ready endpoints, but
        // the import exists while someone exports it.
        let i = east.values().next().unwrap();
        assert!(i.clusters.is_empty());
        let north = merge(&c("north"), &e);
        assert_eq!(north.values().next().unwrap().clusters, [c("west")]);
        // No exports: no import.
        assert!(merge(&c("east"), &[]).is_empty());
    }

    #[test]
    fn weight_orders_clusters() {
        let mut heavy = exp("west", 1, &[(80, Protocol::Tcp)]);
        heavy.weight = 10;
        let mut light = exp("north", 2, &[(80, Protocol::Tcp)]);
        light.weight = 1;
        let i = merge(&c("east"), &[light, heavy])
            .into_values()
            .next()
            .unwrap();
        assert_eq!(i.clusters, [c("west"), c("north")]);
    }
}
