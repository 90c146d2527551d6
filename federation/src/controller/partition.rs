//! Clusters gone silent in the store without saying they leave: which
//! stay routed to, per service partition policy, and until when.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use fedmesh_catalog::ClusterName;
use fedmesh_wire::ServiceName;

use super::cache::Cache;
use super::view::View;
use super::ControllerSettings;

/// A cluster that went silent in the store (lease expired) and what it
/// exported to this cluster at that moment.
#[derive(Clone)]
pub(super) struct Stale {
    pub(super) since: Instant,
    pub(super) peer: fedmesh_catalog::Peer,
    pub(super) services: Vec<ServiceName>,
    /// When its info reappeared: its old exports stay until its new ones
    /// are seen (or a lease TTL passed), so a return does not flap.
    pub(super) returned: Option<Instant>,
}

/// Whether `policies` keep routing `service` to a cluster stale since
/// `since`, at `now`: `serve_stale` (the default) always, `fail_closed_after`
/// until that long has passed.
pub(super) fn keeps(
    policies: &BTreeMap<ServiceName, Arc<fedmesh_catalog::ServicePolicy>>,
    service: &ServiceName,
    since: Instant,
    now: Instant,
) -> bool {
    match policies
        .get(service)
        .map(|p| p.partition)
        .unwrap_or_default()
    {
        fedmesh_catalog::Partition::ServeStale => true,
        fedmesh_catalog::Partition::FailClosedAfter(t) => now.duration_since(since) < t,
    }
}

/// Stale clusters still routed to for `service`.
pub(super) fn kept_stale(
    stale: &BTreeMap<ClusterName, Stale>,
    policies: &BTreeMap<ServiceName, Arc<fedmesh_catalog::ServicePolicy>>,
    service: &ServiceName,
    now: Instant,
) -> Vec<ClusterName> {
    stale
        .iter()
        .filter(|(_, st)| st.services.contains(service) && keeps(policies, service, st.since, now))
        .map(|(c, _)| c.clone())
        .collect()
}

/// Which clusters are partitioned from the store but still routed to:
/// those of the previous view that were usable and are now gone without
/// saying they leave, plus earlier ones not back yet, while the partition
/// policy of at least one of their services keeps them. Also when the
/// next fail-closed policy runs out.
pub(super) fn partitioned(
    s: &ControllerSettings,
    cache: &Cache,
    usable: &BTreeSet<ClusterName>,
    prev: Option<&View>,
    now: Instant,
) -> (BTreeMap<ClusterName, Stale>, Option<Instant>) {
    let Some(prev) = prev else {
        return (BTreeMap::new(), None);
    };
    let mut stale: BTreeMap<ClusterName, Stale> = BTreeMap::new();
    for (c, st) in &prev.stale {
        let mut st = st.clone();
        if cache.infos.contains_key(c) {
            let republished = cache.export_counts.get(c).copied().unwrap_or(0) > 0;
            let returned = *st.returned.get_or_insert(now);
            if republished || !usable.contains(c) || now.duration_since(returned) >= s.lease_ttl {
                continue;
            }
        }
        stale.insert(c.clone(), st);
    }
    for c in prev.usable.difference(usable) {
        if cache.infos.contains_key(c) {
            // Still there, refused on trust grounds now: not a partition.
            continue;
        }
        if cache.leaving.contains(c) {
            tracing::info!(cluster = %c, "cluster left the federation");
            continue;
        }
        let Some(peer) = prev.catalog.peer(c).cloned() else {
            continue;
        };
        let services: Vec<ServiceName> = prev
            .catalog
            .import_entries()
            .filter(|(_, cs)| cs.contains(c))
            .map(|(svc, _)| svc.clone())
            .collect();
        tracing::warn!(cluster = %c, services = services.len(), "cluster's lease expired; routing to its last exports by partition policy");
        stale.insert(
            c.clone(),
            Stale {
                since: now,
                peer,
                services,
                returned: None,
            },
        );
    }
    let mut next = None::<Instant>;
    stale.retain(|c, st| {
        if let Some(r) = st.returned {
            let at = r + s.lease_ttl;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        let mut kept = false;
        for svc in &st.services {
            if let Some(fedmesh_catalog::Partition::FailClosedAfter(t)) =
                s.policies.get(svc).map(|p| p.partition)
            {
                let at = st.since + t;
                if at > now {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
            kept |= keeps(&s.policies, svc, st.since, now);
        }
        if !kept {
            tracing::info!(cluster = %c, "partition policy ran out; no longer routing to the cluster");
        }
        kept
    });
    (stale, next)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use fedmesh_catalog::{Partition, ServicePolicy};

    use super::*;

    /// On virtual time: the instant is the caller's, so the boundary is
    /// exact and the test does not wait.
    #[test]
    fn a_fail_closed_policy_keeps_a_stale_cluster_until_its_time_is_up() {
        let api = ServiceName::new("api", "shop").unwrap();
        let web = ServiceName::new("web", "shop").unwrap();
        let policy = ServicePolicy {
            partition: Partition::FailClosedAfter(Duration::from_secs(30)),
            ..Default::default()
        };
        let policies = BTreeMap::from([(api.clone(), Arc::new(policy))]);
        let since = Instant::now();
        let at = |ms: u64| since + Duration::from_millis(ms);
        assert!(keeps(&policies, &api, since, at(29_999)));
        assert!(!keeps(&policies, &api, since, at(30_000)));
        // No policy: serve stale, however long the partition lasts.
        assert!(keeps(&policies, &web, since, at(86_400_000)));
    }
}
