//! What the controller counts (Prometheus) and what `fedmesh status` shows.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use fedmesh_catalog::mcs::Conflict;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    rejected: Family<ReasonLabels, Counter>,
    pub(super) recomputes: Counter,
    pub(super) publishes: Counter,
}

impl ControllerMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_controller");
        reg.register(
            "rejected",
            "Store entries refused, by reason",
            self.rejected.clone(),
        );
        reg.register(
            "recomputes",
            "Catalog recomputations",
            self.recomputes.clone(),
        );
        reg.register(
            "publishes",
            "Writes of this cluster's keys",
            self.publishes.clone(),
        );
    }

    pub(super) fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn rejected_count(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&ReasonLabels { reason }).get()
    }
}

/// One row of `fedmesh status`.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ClusterStatus {
    pub cluster: String,
    pub trust_domain: String,
    pub gateways: Vec<SocketAddr>,
    pub gateways_tcp: Vec<SocketAddr>,
    pub region: String,
    pub zone: String,
    pub exported: usize,
    pub bundle_fingerprint: String,
    pub bundle_trusted: bool,
    /// Whether that cluster says it trusts this one (its gateways accept
    /// ours); it is routed to only then.
    pub trusts_us: bool,
    pub published_at_ms: u64,
}

/// What the controller knows, for status commands and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub cluster: String,
    pub synced: bool,
    pub clusters: Vec<ClusterStatus>,
    pub imported: usize,
    pub conflicts: Vec<(String, Conflict)>,
    pub rejected: Vec<String>,
    pub last_sync_ms: u64,
    pub catalog_version: u64,
    /// Clusters whose lease expired but whose last exports are still
    /// routed to by partition policy: cluster → ms since the expiry.
    pub stale: BTreeMap<String, u64>,
    /// ClusterSet IPs by service (`NAME.NAMESPACE`), with
    /// `clusterset_ips` configured.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub clusterset_ips: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// This cluster's services without a ClusterSet IP for want of a free
    /// address, with the CIDRs that are full.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub clusterset_ips_exhausted: BTreeMap<String, Vec<String>>,
}
