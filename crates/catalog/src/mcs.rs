//! Multi-Cluster Services semantics (KEP-1645, mcs-api v1beta1): merging
//! every cluster's exports into the ServiceImport one cluster sees. Pure.
//!
//! - Same namespace/name in several clusters is one service.
//! - An import exists while at least one visible cluster exports it, the
//!   viewing cluster included.
//! - Ports are the union of the exporters' ports, keyed by name: a name
//!   used for another (port, protocol, appProtocol), or a (port, protocol)
//!   under another name, is a port conflict and the later port is left out.
//! - Every other property (type, session affinity and its config, exported
//!   labels and annotations) comes from the oldest export (then the lowest
//!   cluster name); a differing value is a conflict. A cluster whose type
//!   differs is left out of the import; other conflicts keep it in.
//! - Conflicts are reported on every export of the service.
//! - Beyond the API: an export may name an audience; clusters outside it
//!   do not see the export at all.
//! - A headless import carries every member cluster's ready endpoints
//!   (what `clusterset.local` answers for it), the viewer's own included.

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

impl Protocol {
    /// As the Kubernetes API spells it.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ServiceType {
    #[default]
    ClusterSetIP,
    Headless,
}

/// One service port as the MCS API carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port {
    /// Empty for the one unnamed port a Service may have.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

impl Port {
    /// An unnamed port.
    pub fn new(port: u16, protocol: Protocol) -> Self {
        Port {
            name: String::new(),
            port,
            protocol,
            app_protocol: None,
        }
    }

    /// Whether `name` can name a Service port: empty, or a DNS label of
    /// at most 63 bytes (lowercase letters, digits, `-`).
    pub fn valid_name(name: &str) -> bool {
        name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    pub fn named(name: &str, port: u16, protocol: Protocol) -> Self {
        Port {
            name: name.to_owned(),
            ..Port::new(port, protocol)
        }
    }
}

/// A Service's `sessionAffinity` and `sessionAffinityConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    /// `ClientIP`, with `sessionAffinityConfig.clientIP.timeoutSeconds`.
    ClientIp { timeout_seconds: Option<u32> },
}

/// One ready endpoint address of a headless export (MCS DNS names it
/// `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeadlessEndpoint {
    pub ip: std::net::IpAddr,
    /// The EndpointSlice endpoint's `hostname` (a StatefulSet pod's name);
    /// `None`: named by its address ([`HeadlessEndpoint::dns_label`]).
    pub hostname: Option<String>,
}

impl HeadlessEndpoint {
    /// Whether `h` can be a hostname: an RFC 1123 DNS label (it becomes a
    /// name in every importing cluster's `clusterset.local`).
    pub fn valid_hostname(h: &str) -> bool {
        !h.is_empty() && Port::valid_name(h) && !h.starts_with('-') && !h.ends_with('-')
    }

    /// The label that names the endpoint: its hostname, else its address
    /// with `.`/`:` as `-` (as the mcs-api conformance suite expects).
    pub fn dns_label(&self) -> String {
        match &self.hostname {
            Some(h) => h.clone(),
            None => self.ip.to_string().replace(['.', ':'], "-"),
        }
    }
}

/// What an export says about its service beyond ports and type: taken
/// from the oldest export, conflicts when another export differs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportedMeta {
    pub session_affinity: SessionAffinity,
    /// The ServiceExport's `spec.exportedLabels`.
    pub labels: BTreeMap<String, String>,
    /// The ServiceExport's `spec.exportedAnnotations`.
    pub annotations: BTreeMap<String, String>,
}

/// One cluster's export of one service, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub cluster: ClusterName,
    pub service: ServiceName,
    pub ports: Vec<Port>,
    pub service_type: ServiceType,
    pub meta: ExportedMeta,
    /// When the export was created (ms since the epoch): the oldest wins.
    pub exported_at: u64,
    pub audience: Option<BTreeSet<ClusterName>>,
    /// Healthy endpoints behind it; a cluster with none is not routed to.
    pub ready_endpoints: u32,
    pub weight: u32,
    /// A headless export's ready endpoints (empty for ClusterSetIP ones).
    pub endpoints: Vec<HeadlessEndpoint>,
}

/// The property two exports disagree on; each has its v1beta1 reason.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum ConflictKind {
    /// A port name used for another (port, protocol, appProtocol), or a
    /// (port, protocol) under another name.
    Port {
        name: String,
        port: u16,
    },
    Type,
    SessionAffinity,
    SessionAffinityConfig,
    Labels,
    Annotations,
}

impl ConflictKind {
    /// The reason mcs-api v1beta1 defines for a `Conflict` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            ConflictKind::Port { .. } => "PortConflict",
            ConflictKind::Type => "TypeConflict",
            ConflictKind::SessionAffinity => "SessionAffinityConflict",
            ConflictKind::SessionAffinityConfig => "SessionAffinityConfigConflict",
            ConflictKind::Labels => "LabelsConflict",
            ConflictKind::Annotations => "AnnotationsConflict",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub kind: ConflictKind,
    /// The cluster whose export decides.
    pub winner: String,
    /// The cluster whose value is not used.
    pub loser: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (w, l) = (&self.winner, &self.loser);
        match &self.kind {
            ConflictKind::Port { name, port } if name.is_empty() => write!(
                f,
                "port {port}: {l} exports it otherwise than {w} (oldest export wins; not imported from {l})"
            ),
            ConflictKind::Port { name, port } => write!(
                f,
                "port {name:?} ({port}): {l} exports it otherwise than {w} (oldest export wins; not imported from {l})"
            ),
            ConflictKind::Type => write!(
                f,
                "{l} exports another service type than {w} (oldest export wins; {l} is not imported)"
            ),
            ConflictKind::SessionAffinity => write!(
                f,
                "{l} exports another session affinity than {w} (oldest export wins)"
            ),
            ConflictKind::SessionAffinityConfig => write!(
                f,
                "{l} exports another session affinity timeout than {w} (oldest export wins)"
            ),
            ConflictKind::Labels => write!(
                f,
                "{l} exports other labels than {w} (oldest export wins)"
            ),
            ConflictKind::Annotations => write!(
                f,
                "{l} exports other annotations than {w} (oldest export wins)"
            ),
        }
    }
}

/// The `Conflict` condition's reason for a set of conflicts: each kind's
/// v1beta1 reason once, comma-separated as the types allow.
pub fn conflict_reason(conflicts: &[Conflict]) -> String {
    let reasons: BTreeSet<(u8, &'static str)> = conflicts
        .iter()
        .map(|c| {
            let order = match c.kind {
                ConflictKind::Port { .. } => 0,
                ConflictKind::Type => 1,
                ConflictKind::SessionAffinity => 2,
                ConflictKind::SessionAffinityConfig => 3,
                ConflictKind::Labels => 4,
                ConflictKind::Annotations => 5,
            };
            (order, c.kind.reason())
        })
        .collect();
    reasons
        .into_iter()
        .map(|(_, r)| r)
        .collect::<Vec<_>>()
        .join(",")
}

/// What one cluster imports of one service: the ServiceImport it writes
/// and the clusters it routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub service: ServiceName,
    pub service_type: ServiceType,
    /// The merged ports, by (name, port, protocol).
    pub ports: Vec<Port>,
    pub meta: ExportedMeta,
    /// Every cluster the import is derived from (the viewer included),
    /// by name: `status.clusters`.
    pub exporters: Vec<ClusterName>,
    /// Other clusters to route to, most preferred first (weight, then
    /// name): exporters with ready endpoints, the viewer left out (it
    /// serves its own exports locally).
    pub clusters: Vec<ClusterName>,
    pub conflicts: Vec<Conflict>,
    /// Headless: each member cluster's ready endpoints, by cluster (the
    /// viewer's own included; clusters without any left out).
    pub endpoints: BTreeMap<ClusterName, Vec<HeadlessEndpoint>>,
}

impl Import {
    /// Whether a cluster other than `viewer` exports it (only then is
    /// there anything to route across clusters).
    pub fn remote(&self, viewer: &ClusterName) -> bool {
        self.exporters.iter().any(|c| c != viewer)
    }
}

/// The imports `viewer` sees, given every cluster's exports.
pub fn merge(viewer: &ClusterName, exports: &[Export]) -> BTreeMap<ServiceName, Import> {
    let mut by_service: BTreeMap<&ServiceName, Vec<&Export>> = BTreeMap::new();
    for e in exports {
        if &e.cluster != viewer && e.audience.as_ref().is_some_and(|a| !a.contains(viewer)) {
            continue;
        }
        by_service.entry(&e.service).or_default().push(e);
    }
    let mut out = BTreeMap::new();
    for (service, mut list) in by_service {
        let Some(r) = resolve(&mut list) else {
            continue;
        };
        let mut exporters: Vec<ClusterName> = r.members.iter().map(|e| e.cluster.clone()).collect();
        exporters.sort();
        let endpoints = r
            .members
            .iter()
            .filter(|e| e.service_type == ServiceType::Headless && !e.endpoints.is_empty())
            .map(|e| (e.cluster.clone(), e.endpoints.clone()))
            .collect();
        let mut serving: Vec<&Export> = r
            .members
            .into_iter()
            .filter(|e| e.ready_endpoints > 0 && &e.cluster != viewer)
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
                service_type: r.oldest.service_type,
                ports: r.ports,
                meta: r.oldest.meta.clone(),
                exporters,
                clusters: serving.into_iter().map(|e| e.cluster.clone()).collect(),
                conflicts: r.conflicts,
                endpoints,
            },
        );
    }
    out
}

struct Resolved<'a> {
    oldest: &'a Export,
    ports: Vec<Port>,
    conflicts: Vec<Conflict>,
    /// Exports the import is derived from (a type conflict leaves one out).
    members: Vec<&'a Export>,
}

/// Applies the conflict rules to one service's exports, oldest first.
fn resolve<'a>(list: &mut [&'a Export]) -> Option<Resolved<'a>> {
    list.sort_by(|a, b| (a.exported_at, &a.cluster).cmp(&(b.exported_at, &b.cluster)));
    let oldest = *list.first()?;
    // Claimed ports by name and by (port, protocol), with their owner.
    let mut by_name: BTreeMap<&str, (&Port, &ClusterName)> = BTreeMap::new();
    let mut by_number: BTreeMap<(u16, Protocol), (&str, &ClusterName)> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut members: Vec<&Export> = Vec::new();
    let conflict = |kind, winner: &ClusterName, loser: &ClusterName| Conflict {
        kind,
        winner: winner.to_string(),
        loser: loser.to_string(),
    };
    for e in list.iter() {
        if e.service_type != oldest.service_type {
            conflicts.push(conflict(ConflictKind::Type, &oldest.cluster, &e.cluster));
            continue;
        }
        let (o, m) = (&oldest.meta, &e.meta);
        match (o.session_affinity, m.session_affinity) {
            (SessionAffinity::ClientIp { .. }, SessionAffinity::ClientIp { .. })
            | (SessionAffinity::None, SessionAffinity::None) => {
                if o.session_affinity != m.session_affinity {
                    conflicts.push(conflict(
                        ConflictKind::SessionAffinityConfig,
                        &oldest.cluster,
                        &e.cluster,
                    ));
                }
            }
            _ => conflicts.push(conflict(
                ConflictKind::SessionAffinity,
                &oldest.cluster,
                &e.cluster,
            )),
        }
        if o.labels != m.labels {
            conflicts.push(conflict(ConflictKind::Labels, &oldest.cluster, &e.cluster));
        }
        if o.annotations != m.annotations {
            conflicts.push(conflict(
                ConflictKind::Annotations,
                &oldest.cluster,
                &e.cluster,
            ));
        }
        for p in &e.ports {
            let clash = match (
                by_name.get(p.name.as_str()),
                by_number.get(&(p.port, p.protocol)),
            ) {
                (Some((q, owner)), _) if *q != p => Some(*owner),
                (_, Some((name, owner))) if *name != p.name => Some(*owner),
                _ => None,
            };
            match clash {
                Some(owner) if owner != &e.cluster => conflicts.push(conflict(
                    ConflictKind::Port {
                        name: p.name.clone(),
                        port: p.port,
                    },
                    owner,
                    &e.cluster,
                )),
                // A Service with two ports of one name cannot exist; a
                // record that says so keeps its first.
                Some(_) => {}
                None => {
                    by_name.entry(&p.name).or_insert((p, &e.cluster));
                    by_number
                        .entry((p.port, p.protocol))
                        .or_insert((&p.name, &e.cluster));
                }
            }
        }
        members.push(e);
    }
    let mut ports: Vec<Port> = by_name.into_values().map(|(p, _)| p.clone()).collect();
    ports.sort();
    Some(Resolved {
        oldest,
        ports,
        conflicts,
        members,
    })
}

/// The conflicts of each service `cluster` exports, judged against every
/// cluster's exports (audiences aside: a conflict is a conflict for
/// whoever sees both), won or lost: what its ServiceExports' `Conflict`
/// conditions report.
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
        if let Some(r) = resolve(&mut list) {
            if !r.conflicts.is_empty() {
                out.insert(service.clone(), r.conflicts);
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

    fn exp(cluster: &str, at: u64, ports: &[Port]) -> Export {
        Export {
            cluster: c(cluster),
            service: ServiceName::new("api", "shop").unwrap(),
            ports: ports.to_vec(),
            service_type: ServiceType::ClusterSetIP,
            meta: ExportedMeta::default(),
            exported_at: at,
            audience: None,
            ready_endpoints: 2,
            weight: 100,
            endpoints: Vec::new(),
        }
    }

    fn tcp(name: &str, port: u16) -> Port {
        Port::named(name, port, Protocol::Tcp)
    }

    fn one(viewer: &str, e: &[Export]) -> Import {
        let mut m = merge(&c(viewer), e);
        assert_eq!(m.len(), 1, "{m:?}");
        m.pop_first().unwrap().1
    }

    #[test]
    fn the_viewers_own_export_is_imported_but_not_routed_to() {
        let e = [exp("west", 10, &[tcp("http", 80)])];
        let i = one("west", &e);
        assert_eq!(i.exporters, [c("west")]);
        assert!(i.clusters.is_empty());
        assert!(!i.remote(&c("west")));
        let e = [e[0].clone(), exp("east", 20, &[tcp("http", 80)])];
        let i = one("west", &e);
        assert_eq!(i.exporters, [c("east"), c("west")]);
        assert_eq!(i.clusters, [c("east")]);
        assert!(i.remote(&c("west")));
    }

    #[test]
    fn ports_are_the_union_by_name_with_names_kept() {
        let sctp = Port::named("stcp", 142, Protocol::Sctp);
        let e = [
            exp("west", 10, &[tcp("http", 80)]),
            exp("north", 20, &[tcp("http", 80), sctp.clone()]),
            exp("east", 5, &[tcp("http", 80)]),
        ];
        let i = one("east", &e);
        assert_eq!(i.ports, [tcp("http", 80), sctp]);
        assert_eq!(i.clusters, [c("north"), c("west")]);
        assert!(i.conflicts.is_empty());
        // The same number under two protocols is two ports.
        let e = [
            exp("west", 1, &[tcp("dns-tcp", 53)]),
            exp("east", 2, &[Port::named("dns", 53, Protocol::Udp)]),
        ];
        assert_eq!(one("west", &e).ports.len(), 2);
    }

    #[test]
    fn a_port_name_with_another_number_is_a_conflict_and_the_later_port_is_left_out() {
        let e = [
            exp("west", 10, &[tcp("tcp", 42)]),
            exp("east", 20, &[tcp("tcp", 43), tcp("admin", 9000)]),
        ];
        for viewer in ["west", "east"] {
            let i = one(viewer, &e);
            assert_eq!(i.ports, [tcp("admin", 9000), tcp("tcp", 42)]);
            // A port conflict keeps the cluster in.
            assert_eq!(i.exporters, [c("east"), c("west")]);
            assert_eq!(
                i.conflicts,
                [Conflict {
                    kind: ConflictKind::Port {
                        name: "tcp".into(),
                        port: 43
                    },
                    winner: "west".into(),
                    loser: "east".into()
                }]
            );
        }
        // The same (port, protocol) under another name conflicts too.
        let e = [
            exp("west", 10, &[tcp("http", 80)]),
            exp("east", 20, &[tcp("web", 80)]),
        ];
        let i = one("west", &e);
        assert_eq!(i.ports, [tcp("http", 80)]);
        assert_eq!(conflict_reason(&i.conflicts), "PortConflict");
        // appProtocol is part of a port.
        let mut h2 = tcp("http", 80);
        h2.app_protocol = Some("kubernetes.io/h2c".into());
        let e = [exp("west", 10, &[tcp("http", 80)]), exp("east", 20, &[h2])];
        assert_eq!(one("west", &e).conflicts.len(), 1);
    }

    #[test]
    fn a_type_conflict_leaves_the_later_cluster_out() {
        let mut headless = exp("north", 1, &[tcp("http", 80)]);
        headless.service_type = ServiceType::Headless;
        let e = [exp("west", 10, &[tcp("http", 80)]), headless];
        let i = one("east", &e);
        assert_eq!(i.service_type, ServiceType::Headless);
        assert_eq!(i.exporters, [c("north")]);
        assert_eq!(i.clusters, [c("north")]);
        assert_eq!(conflict_reason(&i.conflicts), "TypeConflict");
        assert!(i.conflicts[0].to_string().contains("oldest export wins"));
    }

    #[test]
    fn a_headless_import_carries_every_member_clusters_endpoints() {
        let ep = |ip: &str, host: Option<&str>| HeadlessEndpoint {
            ip: ip.parse().unwrap(),
            hostname: host.map(str::to_owned),
        };
        let headless = |cluster, at, eps: Vec<HeadlessEndpoint>| Export {
            service_type: ServiceType::Headless,
            endpoints: eps,
            ..exp(cluster, at, &[tcp("http", 80)])
        };
        let e = [
            headless("west", 1, vec![ep("10.1.0.5", Some("web-0"))]),
            headless("east", 2, vec![ep("10.2.0.5", None), ep("fd00::5", None)]),
            headless("south", 3, vec![]),
            // Left out by the type conflict: its endpoints too.
            Export {
                endpoints: vec![ep("10.3.0.5", None)],
                ..exp("north", 4, &[tcp("http", 80)])
            },
        ];
        let i = one("east", &e);
        assert_eq!(
            i.endpoints.keys().collect::<Vec<_>>(),
            [&c("east"), &c("west")]
        );
        assert_eq!(i.endpoints[&c("east")].len(), 2);
        assert_eq!(i.endpoints[&c("west")][0].dns_label(), "web-0");
        assert_eq!(i.endpoints[&c("east")][0].dns_label(), "10-2-0-5");
        assert_eq!(i.endpoints[&c("east")][1].dns_label(), "fd00--5");
        // A ClusterSetIP import has none.
        let e = [exp("west", 1, &[tcp("http", 80)])];
        assert!(one("east", &e).endpoints.is_empty());
    }

    #[test]
    fn session_affinity_labels_and_annotations_come_from_the_oldest_export() {
        let mut old = exp("west", 1, &[tcp("http", 80)]);
        old.meta.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: Some(300),
        };
        old.meta.labels.insert("tier".into(), "web".into());
        old.meta.annotations.insert("team".into(), "a".into());
        let mut config = old.clone();
        config.cluster = c("east");
        config.exported_at = 2;
        config.meta.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: Some(60),
        };
        let i = one("north", &[old.clone(), config]);
        assert_eq!(i.meta, old.meta);
        assert_eq!(
            conflict_reason(&i.conflicts),
            "SessionAffinityConfigConflict"
        );

        let mut other = exp("east", 2, &[tcp("http", 80)]);
        other.meta.labels.insert("tier2".into(), "web".into());
        let i = one("north", &[old.clone(), other]);
        assert_eq!(i.meta, old.meta);
        assert_eq!(i.exporters.len(), 2);
        assert_eq!(
            conflict_reason(&i.conflicts),
            "SessionAffinityConflict,LabelsConflict,AnnotationsConflict"
        );
        // Identical exports: no conflict.
        let mut same = old.clone();
        same.cluster = c("east");
        assert!(one("north", &[old, same]).conflicts.is_empty());
    }

    #[test]
    fn every_exporter_learns_the_conflicts_of_its_service() {
        let e = [
            exp("west", 10, &[tcp("tcp", 42)]),
            exp("east", 20, &[tcp("tcp", 43)]),
        ];
        for cluster in ["west", "east"] {
            let lost = export_conflicts(&c(cluster), &e);
            assert_eq!(lost.len(), 1, "{cluster}");
            assert_eq!(lost.values().next().unwrap()[0].winner, "west");
        }
        assert!(export_conflicts(&c("north"), &e).is_empty());
    }

    #[test]
    fn audience_and_readiness() {
        let mut only_north = exp("west", 1, &[tcp("http", 80)]);
        only_north.audience = Some([c("north")].into());
        let mut empty = exp("south", 2, &[tcp("http", 80)]);
        empty.ready_endpoints = 0;
        let e = [only_north, empty];
        // east cannot see west's export; south has no ready endpoints, but
        // the import exists while someone exports it.
        let i = one("east", &e);
        assert!(i.clusters.is_empty());
        assert_eq!(i.exporters, [c("south")]);
        assert_eq!(one("north", &e).clusters, [c("west")]);
        // An audience does not hide a cluster's export from itself.
        assert_eq!(one("west", &e).exporters, [c("south"), c("west")]);
        assert!(merge(&c("east"), &[]).is_empty());
    }

    #[test]
    fn weight_orders_clusters() {
        let mut heavy = exp("west", 1, &[tcp("http", 80)]);
        heavy.weight = 10;
        let mut light = exp("north", 2, &[tcp("http", 80)]);
        light.weight = 1;
        assert_eq!(
            one("east", &[light, heavy]).clusters,
            [c("west"), c("north")]
        );
    }
}
