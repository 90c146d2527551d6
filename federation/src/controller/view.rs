//! The watch loop and what it computes from the cache: this cluster's
//! catalog, its Multi-Cluster Services view and the bundles it trusts,
//! fully or for the services that changed, at an instant it is given.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedmesh_catalog::mcs::{self, Conflict, ServiceType};
use fedmesh_catalog::{Catalog, CatalogEdit, ClusterName, ClusterSetVip};
use fedmesh_trust::rotation::{self, Acceptance};
use fedmesh_trust::{TrustBundle, TrustBundles};
use fedmesh_wire::ServiceName;
use tokio::sync::watch;

use super::cache::Cache;
use super::partition::{keeps, kept_stale, partitioned, Stale};
use super::publish::Trusts;
use super::{
    now_ms, ClusterStatus, ControllerMetrics, ControllerSettings, LocalService, McsView, Status,
};
use crate::clusterset::driver::Exported;
use crate::clusterset::ClusterSetIps;
use crate::keys;
use crate::records::ValidInfo;
use crate::store::{reflect, Store};

/// What the watch loop publishes.
pub(super) struct Outputs {
    pub(super) catalog: watch::Sender<Option<Arc<Catalog>>>,
    pub(super) imports: watch::Sender<Arc<McsView>>,
    pub(super) bundles: watch::Sender<Arc<TrustBundles>>,
    /// Whom this cluster trusts, for the publisher's info record.
    pub(super) trusts: watch::Sender<Trusts>,
    /// ClusterSetIP services exported anywhere and here, for the
    /// ClusterSet IP allocator.
    pub(super) exported: watch::Sender<Exported>,
}

pub(super) async fn watch_loop(
    store: Arc<dyn Store>,
    s: Arc<ControllerSettings>,
    mut local: watch::Receiver<Vec<LocalService>>,
    mut ips: Option<watch::Receiver<Arc<ClusterSetIps>>>,
    out: Outputs,
    status: Arc<Mutex<Status>>,
    metrics: ControllerMetrics,
) {
    let reflected = reflect(store, keys::ROOT.to_owned());
    let mut cache = Cache::default();
    // Bundles accepted per remote cluster; kept when a cluster's lease
    // expires, so it can come back without a new pin.
    let mut trusted: BTreeMap<ClusterName, TrustBundle> = BTreeMap::new();
    let mut version = 0u64;
    let mut prev: Option<View> = None;
    // What the catalog's ClusterSet IPs were last built from.
    let mut vips_from: Option<(imbl::OrdMap<ServiceName, mcs::Import>, Arc<ClusterSetIps>)> = None;
    loop {
        // A fail-closed partition policy ends at a set time: recompute then.
        let expiry = prev.as_ref().and_then(|p| p.next_expiry);
        tokio::select! {
            _ = reflected.changed() => {}
            changed = local.changed() => {
                if changed.is_err() { return; }
                cache.structural = true;
            }
            _ = sleep_until_some(expiry) => {
                cache.structural = true;
            }
            changed = async {
                match &mut ips {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_err() { return; }
            }
        }
        cache.apply(reflected.take(), &metrics);
        if !reflected.synced() {
            continue;
        }
        metrics.recomputes.inc();
        // Exports of single services changed: redo those services only.
        // Anything else (a cluster's info, trust, a re-list, local
        // services): the whole view, level-driven from the cache.
        let now = Instant::now();
        let mut view = match prev.take() {
            Some(p) if !cache.structural => incremental(&s, &mut cache, p, &metrics, now),
            p => {
                cache.structural = false;
                cache.dirty.clear();
                let services = local.borrow().clone();
                compute(
                    &s,
                    &cache,
                    &services,
                    &mut trusted,
                    &metrics,
                    p.as_ref(),
                    now,
                )
            }
        };
        if let Some(rx) = &mut ips {
            let held = rx.borrow_and_update().clone();
            // Rebuilt only when the imports or the addresses changed (it
            // walks every import); otherwise the last catalog's map is
            // taken as is, which a full recomputation starts without.
            let same = vips_from.as_ref().is_some_and(|(imports, h)| {
                imports.ptr_eq(&view.mcs.imports) && Arc::ptr_eq(h, &held)
            });
            match out.catalog.borrow().as_deref() {
                Some(last) if same => view.catalog = view.catalog.clone().with_clusterset_of(last),
                _ => {
                    let want = clusterset_vips(&view.mcs, &held);
                    if !view.catalog.clusterset_entries().eq(want.iter()) {
                        view.catalog = view.catalog.clone().with_clusterset(want);
                    }
                    vips_from = Some((view.mcs.imports.clone(), held));
                }
            }
        }
        // Order matters to readers: status and bundles first, the catalog
        // last, so whoever sees a new catalog already trusts every peer it
        // names (and `status` agrees with it).
        let changed_catalog = out.catalog.borrow().as_deref() != Some(&view.catalog);
        if changed_catalog {
            version += 1;
        }
        {
            let mut st = match status.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            st.synced = true;
            st.clusters = view.clusters.clone();
            st.imported = view
                .mcs
                .imports
                .values()
                .filter(|i| i.remote(&s.cluster))
                .count();
            st.conflicts = view
                .conflicts
                .iter()
                .flat_map(|(name, cs)| cs.iter().map(move |c| (name.to_string(), c.clone())))
                .collect();
            st.rejected = cache
                .rejected
                .values()
                .chain(&view.trust_rejected)
                .cloned()
                .collect();
            st.last_sync_ms = now_ms();
            st.catalog_version = version;
            st.stale = view
                .stale
                .iter()
                .filter(|(_, st)| st.returned.is_none())
                .map(|(c, st)| (c.to_string(), st.since.elapsed().as_millis() as u64))
                .collect();
        }
        if **out.bundles.borrow() != view.bundles {
            out.bundles.send_replace(Arc::new(view.bundles.clone()));
        }
        // ClusterSet IPs are for every ClusterSetIP export in the store,
        // trusted or not, audiences aside: an address is released only
        // when nobody at all exports its service.
        let exported: Exported = {
            let clusterset_ip = |e: &mcs::Export| e.service_type == ServiceType::ClusterSetIP;
            let all = cache
                .exports
                .iter()
                .filter(|(_, m)| m.values().any(clusterset_ip))
                .map(|(n, _)| n.clone())
                .collect();
            let mine = cache
                .exports
                .iter()
                .filter(|(_, m)| m.get(&s.cluster).is_some_and(clusterset_ip))
                .map(|(n, _)| n.clone())
                .collect();
            (all, mine)
        };
        out.exported.send_if_modified(|cur| {
            let changed = *cur != exported;
            *cur = exported;
            changed
        });
        if **out.imports.borrow() != view.mcs {
            out.imports.send_replace(Arc::new(view.mcs.clone()));
        }
        if changed_catalog {
            out.catalog
                .send_replace(Some(Arc::new(view.catalog.clone())));
        }
        // Last: peers route here once they read this, and by then the
        // bundles above are on their way to this cluster's gateways.
        let trusts: BTreeSet<ClusterName> = trusted.keys().cloned().collect();
        out.trusts.send_if_modified(|t| {
            let changed = t.as_ref() != Some(&trusts);
            *t = Some(trusts);
            changed
        });
        prev = Some(view);
        // At most one recompute per interval: a burst of changes (a cluster
        // joining with 10,000 services) costs a few recomputes, not 10,000.
        // Changes keep accumulating in the reflector meanwhile.
        tokio::time::sleep(RECOMPUTE_INTERVAL).await;
    }
}

/// What sidecars route as each ClusterSetIP import: its ClusterSet IPs
/// on the import's ports.
fn clusterset_vips(mcs: &McsView, held: &ClusterSetIps) -> Vec<ClusterSetVip> {
    mcs.imports
        .iter()
        .filter(|(_, i)| i.service_type == ServiceType::ClusterSetIP)
        .filter_map(|(name, i)| {
            let ips = held.assigned.get(name)?;
            let mut ports: Vec<u16> = i.ports.iter().map(|p| p.port).collect();
            ports.sort_unstable();
            ports.dedup();
            Some(ClusterSetVip {
                service: name.clone(),
                ips: ips.clone(),
                ports,
            })
        })
        .collect()
}

/// Redoes the services whose exports changed, on top of `v`. Catalog and
/// MCS view are persistent maps, so this costs what changed.
pub(super) fn incremental(
    s: &ControllerSettings,
    cache: &mut Cache,
    mut v: View,
    metrics: &ControllerMetrics,
    now: Instant,
) -> View {
    let dirty = std::mem::take(&mut cache.dirty);
    let mut edit = CatalogEdit {
        gateway: v.catalog.gateway().cloned(),
        ..CatalogEdit::default()
    };
    for svc in dirty {
        let list: Vec<mcs::Export> = cache
            .exports
            .get(&svc)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|e| e.cluster == s.cluster || v.usable.contains(&e.cluster))
            .cloned()
            .collect();
        let stale = kept_stale(&v.stale, &s.policies, &svc, now);
        match mcs::merge(&s.cluster, &list).remove(&svc) {
            Some(imp) => {
                if imp.conflicts.is_empty() {
                    v.conflicts.remove(&svc);
                } else {
                    v.conflicts.insert(svc.clone(), imp.conflicts.clone());
                }
                // An import only this cluster exports has nothing to route.
                let mut clusters = if imp.remote(&s.cluster) {
                    imp.clusters.clone()
                } else {
                    Vec::new()
                };
                add_missing(&mut clusters, stale);
                edit.upsert_imports.push((svc.clone(), clusters));
                v.mcs.imports.insert(svc.clone(), imp);
            }
            None => {
                v.conflicts.remove(&svc);
                v.mcs.imports.remove(&svc);
                // An empty list removes the import if there is one.
                edit.upsert_imports.push((svc.clone(), stale));
            }
        }
        if list.iter().any(|e| e.cluster == s.cluster) {
            v.mcs.published.insert(svc.clone());
        } else {
            v.mcs.published.remove(&svc);
        }
        match mcs::export_conflicts(&s.cluster, &list).remove(&svc) {
            Some(c) => {
                v.mcs.export_conflicts.insert(svc, c);
            }
            None => {
                v.mcs.export_conflicts.remove(&svc);
            }
        }
    }
    for st in &mut v.clusters {
        st.exported = ClusterName::new(&st.cluster)
            .ok()
            .and_then(|c| cache.export_counts.get(&c).copied())
            .unwrap_or(0);
    }
    match v.catalog.edited(edit) {
        Ok(c) => v.catalog = c,
        Err(e) => {
            // Imports only name usable peers, so this is a bug: keep the
            // last catalog and redo everything next time.
            tracing::error!(error = %e, "incremental catalog edit did not validate; recomputing fully next");
            metrics.reject("catalog_invalid");
            cache.structural = true;
        }
    }
    v
}

/// Minimum time between two recomputations of the view.
pub(super) const RECOMPUTE_INTERVAL: Duration = Duration::from_millis(20);

/// The computed view, kept between computations (its maps are persistent,
/// so keeping and editing it is cheap).
pub(super) struct View {
    pub(super) catalog: Catalog,
    pub(super) mcs: McsView,
    pub(super) bundles: TrustBundles,
    pub(super) clusters: Vec<ClusterStatus>,
    /// Clusters routed to: alive and trusted.
    pub(super) usable: BTreeSet<ClusterName>,
    /// Import conflicts by service (only services that have some).
    pub(super) conflicts: imbl::OrdMap<ServiceName, Vec<Conflict>>,
    /// Clusters refused on trust grounds.
    pub(super) trust_rejected: Vec<String>,
    /// Clusters whose lease expired (without saying they leave), with
    /// what they exported then.
    pub(super) stale: BTreeMap<ClusterName, Stale>,
    /// When a fail-closed partition policy next drops something.
    pub(super) next_expiry: Option<Instant>,
}

pub(super) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
pub(super) fn add_missing(list: &mut Vec<ClusterName>, more: Vec<ClusterName>) {
    for c in more {
        if !list.contains(&c) {
            list.push(c);
        }
    }
}

/// The whole view from the cache at `now`. Pure apart from `trusted`
/// (bundles accepted so far) and counters.
pub(super) fn compute(
    s: &ControllerSettings,
    cache: &Cache,
    local: &[LocalService],
    trusted: &mut BTreeMap<ClusterName, TrustBundle>,
    metrics: &ControllerMetrics,
    prev: Option<&View>,
    now: Instant,
) -> View {
    let mut rejected = Vec::new();
    let infos: BTreeMap<&ClusterName, &ValidInfo> = cache.infos.iter().collect();
    let export_counts = &cache.export_counts;

    // Trust: each remote cluster's bundle, accepted only if pinned or
    // endorsed by a root already trusted for that cluster.
    let mut bundles = TrustBundles::new();
    bundles.insert(s.bundle.clone());
    let mut usable: BTreeSet<ClusterName> = BTreeSet::new();
    let mut statuses = Vec::new();
    for (&c, &info) in &infos {
        if c == &s.cluster {
            continue;
        }
        if info.trust_domain == s.trust_domain {
            metrics.reject("trust_domain_clash");
            rejected.push(format!(
                "cluster {c} claims this cluster's trust domain {}",
                s.trust_domain
            ));
            continue;
        }
        let ok = match rotation::accept(
            trusted.get(c),
            s.pinned.get(c),
            &info.bundle,
            &info.endorsements,
        ) {
            Ok(Acceptance::Unchanged) => true,
            Ok(Acceptance::Accept) => {
                tracing::info!(cluster = %c, fingerprint = %info.bundle.fingerprint(), "trust bundle accepted");
                trusted.insert(c.clone(), info.bundle.clone());
                true
            }
            Err(e) => {
                metrics.reject("bundle_not_trusted");
                rejected.push(format!("cluster {c}: {e}"));
                false
            }
        };
        statuses.push(ClusterStatus {
            cluster: c.to_string(),
            trust_domain: info.trust_domain.to_string(),
            gateways: info.gateways.clone(),
            gateways_tcp: info.gateways_tcp.clone(),
            region: info.locality.region.clone(),
            zone: info.locality.zone.clone(),
            exported: export_counts.get(c).copied().unwrap_or(0),
            bundle_fingerprint: info.bundle.fingerprint(),
            bundle_trusted: ok,
            trusts_us: info.trusts(&s.cluster),
            published_at_ms: info.published_at_ms,
        });
        // Routed to once both ways hold: we accept its gateways, and it
        // says it accepts ours (else our first dial fails its handshake).
        if ok && info.trusts(&s.cluster) {
            usable.insert(c.clone());
        }
    }
    for b in trusted.values() {
        bundles.insert(b.clone());
    }

    // Routing: only clusters that are alive (info present) and trusted.
    let exports: Vec<mcs::Export> = cache
        .exports
        .values()
        .flat_map(|m| m.values())
        .filter(|e| e.cluster == s.cluster || usable.contains(&e.cluster))
        .cloned()
        .collect();
    let imports = mcs::merge(&s.cluster, &exports);
    let export_conflicts = mcs::export_conflicts(&s.cluster, &exports);
    let mut conflicts = imbl::OrdMap::new();
    let mut import_map: BTreeMap<ServiceName, Vec<ClusterName>> = BTreeMap::new();
    for (name, imp) in &imports {
        if !imp.conflicts.is_empty() {
            conflicts.insert(name.clone(), imp.conflicts.clone());
        }
        if imp.remote(&s.cluster) {
            import_map.insert(name.clone(), imp.clusters.clone());
        }
    }
    let (stale, next_expiry) = partitioned(s, cache, &usable, prev, now);
    for (c, st) in &stale {
        for svc in &st.services {
            if keeps(&s.policies, svc, st.since, now) {
                add_missing(import_map.entry(svc.clone()).or_default(), vec![c.clone()]);
            }
        }
    }
    let services = local
        .iter()
        .map(|svc| fedmesh_catalog::LocalService {
            vips: svc.vips.clone(),
            name: svc.name.clone(),
            ports: svc.ports.iter().map(|p| p.port).collect(),
            exported: svc.export,
            audience: svc.audience.clone().filter(|_| svc.export),
            endpoints: svc
                .endpoints
                .iter()
                .map(|(address, identity)| fedmesh_catalog::Endpoint {
                    address: *address,
                    identity: identity.clone(),
                })
                .collect(),
        })
        .collect();
    let peers = usable
        .iter()
        .filter_map(|c| infos.get(c))
        .filter_map(|info| {
            Some(fedmesh_catalog::Peer {
                cluster: info.cluster.clone(),
                trust_domain: info.trust_domain.clone(),
                address: *info.gateways.first()?,
                tcp_address: info.gateways_tcp.first().copied(),
                identity: fedmesh_catalog::gateway_identity(&info.trust_domain),
                region: info.locality.region.clone(),
            })
        })
        .chain(
            stale
                .iter()
                .filter(|(c, _)| !usable.contains(*c))
                .map(|(_, st)| st.peer.clone()),
        )
        .collect();
    let gateway = s
        .gateway_tunnel
        .map(|address| fedmesh_catalog::LocalGateway {
            address,
            identity: fedmesh_catalog::gateway_identity(&s.trust_domain),
        });
    let catalog = Catalog::assemble(s.cluster.clone(), s.trust_domain.clone(), gateway, services, import_map, peers)
        .unwrap_or_else(|e| {
            // Imports only name usable peers, so this is a bug; keep routing
            // local services rather than nothing.
            tracing::error!(error = %e, "computed catalog did not validate; serving local services only");
            metrics.reject("catalog_invalid");
            Catalog::empty(s.cluster.clone(), s.trust_domain.clone())
        })
        .with_policies(s.policies.clone())
        .with_region(s.locality.region.clone());
    View {
        catalog,
        mcs: McsView {
            imports: imports.into_iter().collect(),
            export_conflicts: export_conflicts.into_iter().collect(),
            published: exports
                .iter()
                .filter(|e| e.cluster == s.cluster)
                .map(|e| e.service.clone())
                .collect(),
            computed: true,
        },
        bundles,
        clusters: statuses,
        usable,
        conflicts,
        trust_rejected: rejected,
        stale,
        next_expiry,
    }
}
