//! This cluster's records in the store (its info, its exports, its
//! leaving), published under a lease kept alive, and published again
//! whole whenever the lease was lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::mcs::{HeadlessEndpoint, ServiceType};
use fedmesh_catalog::ClusterName;
use fedmesh_wire::ServiceName;
use tokio::sync::watch;

use super::{now_ms, ControllerMetrics, ControllerSettings, Gateways, LocalService};
use crate::keys::{self, Key};
use crate::records::{ClusterInfo, LeftRecord, ServiceRecord, MAX_HEADLESS_ENDPOINTS};
use crate::store::{LeaseId, Store, StoreError};

// ---- publishing ----

/// The clusters whose bundles the watch loop accepted; `None` until its
/// first computation.
pub(super) type Trusts = Option<BTreeSet<ClusterName>>;

pub(super) fn info_record(
    s: &ControllerSettings,
    g: &Gateways,
    trusts: &BTreeSet<ClusterName>,
) -> Vec<u8> {
    let r = ClusterInfo {
        cluster: s.cluster.to_string(),
        trust_domain: s.trust_domain.to_string(),
        gateways: g.quic.clone(),
        gateways_tcp: g.tcp.clone(),
        locality: s.locality.clone(),
        bundle_pem: s.bundle.to_pem(),
        bundle_endorsements: s.endorsements.clone(),
        published_at_ms: now_ms(),
        trusts: Some(trusts.iter().map(|c| c.to_string()).collect()),
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// A headless service's ready addresses as MCS DNS names them: each
/// address once, ordered, with its hostname when it has one.
fn headless_endpoints(svc: &LocalService) -> Vec<HeadlessEndpoint> {
    let ips: BTreeSet<std::net::IpAddr> = svc.endpoints.iter().map(|(a, _)| a.ip()).collect();
    ips.into_iter()
        .map(|ip| HeadlessEndpoint {
            ip,
            hostname: svc.hostnames.get(&ip).cloned(),
        })
        .collect()
}

pub(super) fn service_record(svc: &LocalService, exported_at: u64) -> Vec<u8> {
    let endpoints = match svc.service_type {
        ServiceType::Headless => headless_endpoints(svc),
        ServiceType::ClusterSetIP => Vec::new(),
    };
    if endpoints.len() > MAX_HEADLESS_ENDPOINTS {
        tracing::warn!(
            service = %svc.name,
            endpoints = endpoints.len(),
            published = MAX_HEADLESS_ENDPOINTS,
            "a headless service has more ready addresses than a record carries; \
             clusterset.local names the first ones only"
        );
    }
    let r = ServiceRecord::of(
        &svc.name,
        &svc.ports,
        svc.service_type,
        &svc.meta,
        exported_at,
        svc.audience
            .as_ref()
            .map(|a| a.iter().map(|c| c.to_string()).collect()),
        svc.endpoints.len() as u32,
        &endpoints,
    );
    serde_json::to_vec(&r).unwrap_or_default()
}

/// Publishes under a lease until dropped; re-grants and republishes
/// everything whenever the lease was lost (store restart, long partition).
pub(super) async fn publish_loop(
    store: Arc<dyn Store>,
    s: Arc<ControllerSettings>,
    mut local: watch::Receiver<Vec<LocalService>>,
    mut gateways: watch::Receiver<Gateways>,
    mut trusts: watch::Receiver<Trusts>,
    metrics: ControllerMetrics,
    leaving: Arc<std::sync::atomic::AtomicBool>,
) {
    // Retries never wait longer than a third of the lease: a cluster that
    // is alive must not drop out of the federation because of its backoff.
    let cap = (s.lease_ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut backoff = Duration::from_millis(100);
    loop {
        // Not before there is an address peers can reach.
        if gateways.wait_for(|g| !g.quic.is_empty()).await.is_err() {
            return;
        }
        // Nor before the first view: the info says whom this cluster
        // trusts, and a restart must not briefly say "nobody" (peers
        // would stop routing here). Until then a predecessor's keys hold.
        if trusts.wait_for(Option::is_some).await.is_err() {
            return;
        }
        match publish_session(
            &*store,
            &s,
            &mut local,
            &mut gateways,
            &mut trusts,
            &metrics,
            &leaving,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(cluster = %s.cluster, error = %e, "publishing to the store failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cap);
            }
        }
    }
}

pub(super) async fn publish_session(
    store: &dyn Store,
    s: &ControllerSettings,
    local: &mut watch::Receiver<Vec<LocalService>>,
    gateways: &mut watch::Receiver<Gateways>,
    trusts: &mut watch::Receiver<Trusts>,
    metrics: &ControllerMetrics,
    leaving: &std::sync::atomic::AtomicBool,
) -> Result<(), StoreError> {
    let lease: LeaseId = store.grant(s.lease_ttl).await?;
    // Export times survive controller restarts: reuse what the store holds.
    let prefix = keys::cluster_prefix(&s.cluster);
    let mut exported_at: BTreeMap<ServiceName, u64> = BTreeMap::new();
    for kv in store.list(&prefix).await?.kvs {
        if let Ok(Key::Service(_, name)) = Key::parse(&kv.key) {
            if let Ok(r) = serde_json::from_slice::<ServiceRecord>(&kv.value) {
                exported_at.insert(name, r.exported_at_ms);
            }
        }
    }
    let mut advertised = gateways.borrow_and_update().clone();
    let mut trusted = trusts.borrow_and_update().clone().unwrap_or_default();
    let info = info_record(s, &advertised, &trusted);
    store
        .put(&keys::info_key(&s.cluster), info, Some(lease))
        .await?;
    let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let keepalive = s.lease_ttl / 3;
    let mut tick = tokio::time::interval(keepalive.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    let mut gateways_open = true;
    let mut trusts_open = true;
    loop {
        if dirty {
            let services = local.borrow_and_update().clone();
            let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for svc in services.iter().filter(|s| s.export) {
                let at = svc
                    .exported_at_ms
                    .or_else(|| exported_at.get(&svc.name).copied())
                    .unwrap_or_else(now_ms);
                exported_at.insert(svc.name.clone(), at);
                want.insert(
                    keys::service_key(&s.cluster, &svc.name),
                    service_record(svc, at),
                );
            }
            let mut refreshed = tokio::time::Instant::now();
            for (k, v) in &want {
                if published.get(k) != Some(v) {
                    store.put(k, v.clone(), Some(lease)).await?;
                    metrics.publishes.inc();
                }
                // Publishing thousands of services can outlast the lease:
                // keep it alive along the way.
                if refreshed.elapsed() >= keepalive {
                    store.keep_alive(lease).await?;
                    refreshed = tokio::time::Instant::now();
                }
            }
            // Also delete keys a previous run left behind under our prefix
            // (among them a `left` marker: this cluster is back).
            for kv in store.list(&prefix).await?.kvs {
                if kv.key != keys::info_key(&s.cluster) && !want.contains_key(&kv.key) {
                    store.delete(&kv.key).await?;
                    metrics.publishes.inc();
                }
            }
            published = want;
            dirty = false;
        }
        tokio::select! {
            _ = tick.tick() => {
                // A failed refresh (one store member down, a blip) is retried
                // until the next tick; only a lost lease ends the session, so
                // a transient error never lets our keys expire.
                let deadline = tokio::time::Instant::now() + keepalive;
                let attempt = (keepalive / 2).max(Duration::from_millis(200));
                loop {
                    let r = tokio::time::timeout(attempt, store.keep_alive(lease))
                        .await
                        .unwrap_or_else(|_| Err(StoreError::Unavailable("lease refresh timed out".into())));
                    match r {
                        Ok(_) => break,
                        Err(StoreError::LeaseNotFound(_)) => return Err(StoreError::LeaseNotFound(lease)),
                        Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                        Err(e) => {
                            tracing::debug!(error = %e, "lease refresh failed; retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            changed = gateways.changed(), if gateways_open => {
                // The sender goes with the controller; `local` ends the
                // session then.
                gateways_open = changed.is_ok();
                if gateways_open {
                    let g = gateways.borrow_and_update().clone();
                    if g.quic.is_empty() {
                        // Lost its address: the info would be refused;
                        // keep the last one until the lease says otherwise.
                        continue;
                    }
                    tracing::info!(cluster = %s.cluster, gateways = ?g.quic, tcp = ?g.tcp, "advertised gateways changed");
                    advertised = g;
                    store.put(&keys::info_key(&s.cluster), info_record(s, &advertised, &trusted), Some(lease)).await?;
                    metrics.publishes.inc();
                }
            }
            changed = trusts.changed(), if trusts_open => {
                trusts_open = changed.is_ok();
                let now = trusts.borrow_and_update().clone().unwrap_or_default();
                if trusts_open && now != trusted {
                    // Peers start routing here once they see themselves in
                    // it: by then this cluster's gateways hold their bundles
                    // (the watch loop publishes its bundles to the config
                    // API before it says so here).
                    tracing::debug!(cluster = %s.cluster, trusts = ?now, "trusted clusters changed");
                    trusted = now;
                    store.put(&keys::info_key(&s.cluster), info_record(s, &advertised, &trusted), Some(lease)).await?;
                    metrics.publishes.inc();
                }
            }
            changed = local.changed() => {
                if changed.is_err() {
                    if leaving.load(std::sync::atomic::Ordering::Relaxed) {
                        // Leaving on purpose: say so (others then drop
                        // this cluster at once rather than serve it
                        // stale), then give the keys up.
                        let left = serde_json::to_vec(&LeftRecord { left_at_ms: now_ms() })
                            .unwrap_or_default();
                        let _ = store.put(&keys::left_key(&s.cluster), left, None).await;
                        let _ = store.revoke(lease).await;
                    }
                    // Otherwise a restart: the keys outlive us by the TTL.
                    return Ok(());
                }
                dirty = true;
            }
        }
    }
}
