//! The federation controller of one cluster: publishes the cluster's info
//! and exports under a lease it keeps alive, reflects every cluster's keys,
//! and computes this cluster's catalog and trusted bundles from them.
//!
//! Level-driven: every change recomputes the whole view from the cache;
//! nothing is published before the first full listing arrived.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fedmesh_catalog::mcs::{self, Conflict, Protocol, ServiceType};
use fedmesh_catalog::{Catalog, CatalogEdit, ClusterName};
use fedmesh_trust::rotation::{self, Acceptance, Endorsement};
use fedmesh_trust::{TrustBundle, TrustBundles, TrustDomain};
use fedmesh_wire::ServiceName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::keys::{self, Key};
use crate::records::{ClusterInfo, LeftRecord, Locality, PortRecord, ServiceRecord, ValidInfo};
use crate::store::{reflect, Delta, LeaseId, Store, StoreError};

/// A service this cluster serves, as its source (Kubernetes, a file) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub name: ServiceName,
    pub ports: Vec<(u16, Protocol)>,
    pub service_type: ServiceType,
    /// A ServiceExport exists for it.
    pub export: bool,
    pub audience: Option<Vec<ClusterName>>,
    /// Sidecar inbound listeners and the identities they present.
    pub endpoints: Vec<(SocketAddr, fedmesh_trust::SpiffeId)>,
    /// The Service's cluster IPs (what apps connect to).
    pub vips: Vec<std::net::IpAddr>,
    /// When the export was created; `None` lets the controller keep the
    /// time already in the store (or use now).
    pub exported_at_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ControllerSettings {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    pub locality: Locality,
    /// QUIC addresses peers dial.
    pub gateways: Vec<SocketAddr>,
    /// TLS/TCP fallback addresses peers dial when UDP does not get through.
    pub gateways_tcp: Vec<SocketAddr>,
    /// Where this cluster's sidecars reach the gateway.
    pub gateway_tunnel: Option<SocketAddr>,
    pub lease_ttl: Duration,
    /// This cluster's bundle and the endorsements that let others rotate to it.
    pub bundle: TrustBundle,
    pub endorsements: Vec<Endorsement>,
    /// Bundles an operator admitted (`fedmesh cluster join`), by cluster.
    pub pinned: BTreeMap<ClusterName, TrustBundle>,
    /// Traffic and authorization policy by service, for this cluster's proxies.
    pub policies: BTreeMap<ServiceName, std::sync::Arc<fedmesh_catalog::ServicePolicy>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    rejected: Family<ReasonLabels, Counter>,
    recomputes: Counter,
    publishes: Counter,
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

    fn reject(&self, reason: &'static str) {
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
}

/// A running controller. Dropping it stops it; its lease then expires and
/// its keys vanish from every other cluster's view.
/// The Multi-Cluster Services view of this cluster: what a Kubernetes
/// source writes back as ServiceImports and ServiceExport conditions.
#[derive(Debug, Clone, Default)]
pub struct McsView {
    /// Every import this cluster sees, with merged ports, type, conflicts.
    pub imports: imbl::OrdMap<ServiceName, mcs::Import>,
    /// Conflicts this cluster's own exports lose, by service.
    pub export_conflicts: imbl::OrdMap<ServiceName, Vec<Conflict>>,
}

pub struct Controller {
    catalog: watch::Receiver<Option<Arc<Catalog>>>,
    imports: watch::Receiver<Arc<McsView>>,
    bundles: watch::Receiver<Arc<TrustBundles>>,
    status: Arc<Mutex<Status>>,
    local: watch::Sender<Vec<LocalService>>,
    /// The advertised gateway addresses (QUIC, TCP fallback): from the
    /// settings, or discovered (a load balancer's address) later.
    gateways: watch::Sender<Gateways>,
    /// Set by [`Controller::leave`]: the publisher announces the leave.
    leaving: Arc<std::sync::atomic::AtomicBool>,
    metrics: ControllerMetrics,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where peers reach this cluster's gateways: QUIC, and the TCP fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gateways {
    pub quic: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Controller {
    pub fn start(
        store: Arc<dyn Store>,
        settings: ControllerSettings,
        local: Vec<LocalService>,
        registry: &mut Registry,
    ) -> Self {
        let metrics = ControllerMetrics::default();
        metrics.register(registry);
        let (local_tx, local_rx) = watch::channel(local);
        let (gateways_tx, gateways_rx) = watch::channel(Gateways {
            quic: settings.gateways.clone(),
            tcp: settings.gateways_tcp.clone(),
        });
        let mut own = TrustBundles::new();
        own.insert(settings.bundle.clone());
        let (bundles_tx, bundles_rx) = watch::channel(Arc::new(own));
        let (catalog_tx, catalog_rx) = watch::channel(None);
        let (imports_tx, imports_rx) = watch::channel(Arc::new(McsView::default()));
        let (trusts_tx, trusts_rx) = watch::channel(None);
        let status = Arc::new(Mutex::new(Status {
            cluster: settings.cluster.to_string(),
            ..Status::default()
        }));
        let settings = Arc::new(settings);
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = tokio::spawn(publish_loop(
            store.clone(),
            settings.clone(),
            local_rx.clone(),
            gateways_rx,
            trusts_rx,
            metrics.clone(),
            leaving.clone(),
        ));
        let watcher = tokio::spawn(watch_loop(
            store,
            settings,
            local_rx,
            Outputs {
                catalog: catalog_tx,
                imports: imports_tx,
                bundles: bundles_tx,
                trusts: trusts_tx,
            },
            status.clone(),
            metrics.clone(),
        ));
        Self {
            catalog: catalog_rx,
            imports: imports_rx,
            bundles: bundles_rx,
            status,
            local: local_tx,
            gateways: gateways_tx,
            leaving,
            metrics,
            tasks: vec![publisher, watcher],
        }
    }

    /// The latest catalog; `None` until the first full listing was seen.
    pub fn catalog(&self) -> watch::Receiver<Option<Arc<Catalog>>> {
        self.catalog.clone()
    }

    /// The imports behind the catalog (ports, type, conflicts) and the
    /// conflicts of this cluster's own exports.
    pub fn mcs(&self) -> watch::Receiver<Arc<McsView>> {
        self.imports.clone()
    }

    pub fn bundles(&self) -> watch::Receiver<Arc<TrustBundles>> {
        self.bundles.clone()
    }

    pub fn status(&self) -> Status {
        match self.status.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn metrics(&self) -> &ControllerMetrics {
        &self.metrics
    }

    /// Stops for a restart or an upgrade: publishing ends, but this
    /// cluster's keys stay until the lease TTL, so a successor that starts
    /// within it takes them over and peers never see the cluster go (and
    /// past it, peers' partition policy decides). Use [`leave`](Self::leave)
    /// to take the cluster out of the federation.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    /// Takes the cluster out of the federation: writes the `<cluster>/left`
    /// marker (peers drop it at once instead of serving it stale) and
    /// revokes the lease so its keys vanish.
    pub async fn leave(self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop().await;
    }

    async fn stop(mut self) {
        let (dummy, _) = watch::channel(Vec::new());
        drop(std::mem::replace(&mut self.local, dummy));
        if let Some(publisher) = self.tasks.first_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
        }
    }

    /// Replaces the local services (a source saw a change).
    pub fn set_local(&self, services: Vec<LocalService>) {
        self.local.send_replace(services);
    }

    /// Replaces the advertised gateway addresses (a load balancer got or
    /// changed its address); republished at once. While there are none,
    /// nothing is published: peers could not reach this cluster anyway.
    pub fn set_gateways(&self, gateways: Gateways) {
        self.gateways.send_if_modified(|g| {
            let changed = *g != gateways;
            *g = gateways;
            changed
        });
    }
}

impl PartialEq for McsView {
    fn eq(&self, other: &Self) -> bool {
        fedmesh_catalog::ordmap_eq(&self.imports, &other.imports)
            && fedmesh_catalog::ordmap_eq(&self.export_conflicts, &other.export_conflicts)
    }
}

// ---- publishing ----

/// The clusters whose bundles the watch loop accepted; `None` until its
/// first computation.
type Trusts = Option<BTreeSet<ClusterName>>;

fn info_record(s: &ControllerSettings, g: &Gateways, trusts: &BTreeSet<ClusterName>) -> Vec<u8> {
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

fn service_record(svc: &LocalService, exported_at: u64) -> Vec<u8> {
    let r = ServiceRecord {
        name: svc.name.name().to_owned(),
        namespace: svc.name.namespace().to_owned(),
        ports: svc
            .ports
            .iter()
            .map(|(port, protocol)| PortRecord {
                port: *port,
                protocol: *protocol,
            })
            .collect(),
        service_type: svc.service_type,
        exported_at_ms: exported_at,
        audience: svc
            .audience
            .as_ref()
            .map(|a| a.iter().map(|c| c.to_string()).collect()),
        ready_endpoints: svc.endpoints.len() as u32,
        weight: 100,
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// Publishes under a lease until dropped; re-grants and republishes
/// everything whenever the lease was lost (store restart, long partition).
async fn publish_loop(
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

async fn publish_session(
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

// ---- watching and computing ----

/// A store value after decoding: usable, or why not.
enum Decoded {
    Info(Box<ValidInfo>),
    Export(mcs::Export),
    Left(ClusterName),
    Rejected(String),
}

fn decode(k: &str, v: &[u8], metrics: &ControllerMetrics) -> Decoded {
    let key = match Key::parse(k) {
        Ok(key) => key,
        Err(e) => {
            metrics.reject("bad_key");
            tracing::warn!(error = %e, "store key refused");
            return Decoded::Rejected(e.to_string());
        }
    };
    let r = match &key {
        Key::Info(_) => ClusterInfo::decode(&key, v).map(|i| Decoded::Info(Box::new(i))),
        Key::Service(..) => ServiceRecord::decode(&key, v).map(Decoded::Export),
        Key::Left(c) => LeftRecord::decode(v).map(|_| Decoded::Left(c.clone())),
    };
    r.unwrap_or_else(|e| {
        metrics.reject("bad_record");
        tracing::warn!(key = k, error = %e, "store value refused");
        Decoded::Rejected(format!("{k}: {e}"))
    })
}

/// What the controller knows from the store, indexed for the computation:
/// values are decoded once, when they arrive, and every change notes what
/// it touched, so a recompute redoes only that.
#[derive(Default)]
struct Cache {
    /// Where each key's value went (to undo it when the key changes); the
    /// values themselves live once, in the indexes below.
    by_key: BTreeMap<String, Indexed>,
    infos: BTreeMap<ClusterName, ValidInfo>,
    exports: BTreeMap<ServiceName, BTreeMap<ClusterName, mcs::Export>>,
    export_counts: BTreeMap<ClusterName, usize>,
    rejected: BTreeMap<String, String>,
    /// Services whose exports changed since the last computation.
    dirty: BTreeSet<ServiceName>,
    /// Something beyond single services changed (a cluster's info, a
    /// re-list, local services): the next computation is a full one.
    structural: bool,
    /// Clusters that left on purpose (their `left` marker is present).
    leaving: BTreeSet<ClusterName>,
}

/// Which index a key's value is in.
enum Indexed {
    Info(ClusterName),
    Export(ServiceName, ClusterName),
    Left(ClusterName),
    Rejected,
}

impl Cache {
    fn forget(&mut self, key: &str) {
        match self.by_key.remove(key) {
            Some(Indexed::Info(cluster)) => {
                self.infos.remove(&cluster);
                self.structural = true;
            }
            Some(Indexed::Export(service, cluster)) => {
                if let Some(m) = self.exports.get_mut(&service) {
                    m.remove(&cluster);
                    if m.is_empty() {
                        self.exports.remove(&service);
                    }
                }
                if let Some(n) = self.export_counts.get_mut(&cluster) {
                    *n = n.saturating_sub(1);
                }
                self.dirty.insert(service);
            }
            Some(Indexed::Left(cluster)) => {
                self.leaving.remove(&cluster);
            }
            Some(Indexed::Rejected) => {
                self.rejected.remove(key);
            }
            None => {}
        }
    }

    fn learn(&mut self, key: String, d: Decoded) {
        let marker = match d {
            Decoded::Info(i) => {
                self.structural = true;
                let cluster = i.cluster.clone();
                self.infos.insert(cluster.clone(), *i);
                Indexed::Info(cluster)
            }
            Decoded::Export(e) => {
                let (service, cluster) = (e.service.clone(), e.cluster.clone());
                *self.export_counts.entry(cluster.clone()).or_default() += 1;
                self.dirty.insert(service.clone());
                self.exports
                    .entry(service.clone())
                    .or_default()
                    .insert(cluster.clone(), e);
                Indexed::Export(service, cluster)
            }
            Decoded::Left(cluster) => {
                self.leaving.insert(cluster.clone());
                Indexed::Left(cluster)
            }
            Decoded::Rejected(why) => {
                self.rejected.insert(key.clone(), why);
                Indexed::Rejected
            }
        };
        self.by_key.insert(key, marker);
    }

    fn apply(&mut self, delta: Delta, metrics: &ControllerMetrics) {
        if delta.replaced {
            *self = Cache {
                structural: true,
                ..Cache::default()
            };
        }
        for (k, v) in delta.changes {
            self.forget(&k);
            if let Some(v) = v {
                let d = decode(&k, &v, metrics);
                self.learn(k, d);
            }
        }
    }
}

/// What the watch loop publishes.
struct Outputs {
    catalog: watch::Sender<Option<Arc<Catalog>>>,
    imports: watch::Sender<Arc<McsView>>,
    bundles: watch::Sender<Arc<TrustBundles>>,
    /// Whom this cluster trusts, for the publisher's info record.
    trusts: watch::Sender<Trusts>,
}

async fn watch_loop(
    store: Arc<dyn Store>,
    s: Arc<ControllerSettings>,
    mut local: watch::Receiver<Vec<LocalService>>,
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
        }
        cache.apply(reflected.take(), &metrics);
        if !reflected.synced() {
            continue;
        }
        metrics.recomputes.inc();
        // Exports of single services changed: redo those services only.
        // Anything else (a cluster's info, trust, a re-list, local
        // services): the whole view, level-driven from the cache.
        let view = match prev.take() {
            Some(p) if !cache.structural => incremental(&s, &mut cache, p, &metrics),
            p => {
                cache.structural = false;
                cache.dirty.clear();
                let services = local.borrow().clone();
                compute(&s, &cache, &services, &mut trusted, &metrics, p.as_ref())
            }
        };
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
            st.imported = view.mcs.imports.len();
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

/// Redoes the services whose exports changed, on top of `v`. Catalog and
/// MCS view are persistent maps, so this costs what changed.
fn incremental(
    s: &ControllerSettings,
    cache: &mut Cache,
    mut v: View,
    metrics: &ControllerMetrics,
) -> View {
    let dirty = std::mem::take(&mut cache.dirty);
    let mut edit = CatalogEdit {
        gateway: v.catalog.gateway().cloned(),
        ..CatalogEdit::default()
    };
    let now = std::time::Instant::now();
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
                let mut clusters = imp.clusters.clone();
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
const RECOMPUTE_INTERVAL: Duration = Duration::from_millis(20);

/// The computed view, kept between computations (its maps are persistent,
/// so keeping and editing it is cheap).
struct View {
    catalog: Catalog,
    mcs: McsView,
    bundles: TrustBundles,
    clusters: Vec<ClusterStatus>,
    /// Clusters routed to: alive and trusted.
    usable: BTreeSet<ClusterName>,
    /// Import conflicts by service (only services that have some).
    conflicts: imbl::OrdMap<ServiceName, Vec<Conflict>>,
    /// Clusters refused on trust grounds.
    trust_rejected: Vec<String>,
    /// Clusters whose lease expired (without saying they leave), with
    /// what they exported then.
    stale: BTreeMap<ClusterName, Stale>,
    /// When a fail-closed partition policy next drops something.
    next_expiry: Option<std::time::Instant>,
}

/// A cluster that went silent in the store (lease expired) and what it
/// exported to this cluster at that moment.
#[derive(Clone)]
struct Stale {
    since: std::time::Instant,
    peer: fedmesh_catalog::Peer,
    services: Vec<ServiceName>,
    /// When its info reappeared: its old exports stay until its new ones
    /// are seen (or a lease TTL passed), so a return does not flap.
    returned: Option<std::time::Instant>,
}

async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether `policies` keep routing `service` to a cluster stale since
/// `since`, at `now`: `serve_stale` (the default) always, `fail_closed_after`
/// until that long has passed.
fn keeps(
    policies: &BTreeMap<ServiceName, Arc<fedmesh_catalog::ServicePolicy>>,
    service: &ServiceName,
    since: std::time::Instant,
    now: std::time::Instant,
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
fn kept_stale(
    stale: &BTreeMap<ClusterName, Stale>,
    policies: &BTreeMap<ServiceName, Arc<fedmesh_catalog::ServicePolicy>>,
    service: &ServiceName,
    now: std::time::Instant,
) -> Vec<ClusterName> {
    stale
        .iter()
        .filter(|(_, st)| st.services.contains(service) && keeps(policies, service, st.since, now))
        .map(|(c, _)| c.clone())
        .collect()
}

fn add_missing(list: &mut Vec<ClusterName>, more: Vec<ClusterName>) {
    for c in more {
        if !list.contains(&c) {
            list.push(c);
        }
    }
}

/// The whole view from the cache. Pure apart from `trusted` (bundles
/// accepted so far) and counters.
fn compute(
    s: &ControllerSettings,
    cache: &Cache,
    local: &[LocalService],
    trusted: &mut BTreeMap<ClusterName, TrustBundle>,
    metrics: &ControllerMetrics,
    prev: Option<&View>,
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
        import_map.insert(name.clone(), imp.clusters.clone());
    }
    let (stale, next_expiry) = partitioned(s, cache, &usable, prev);
    let now = std::time::Instant::now();
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
            ports: svc.ports.iter().map(|p| p.0).collect(),
            exported: svc.export,
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

/// Which clusters are partitioned from the store but still routed to:
/// those of the previous view that were usable and are now gone without
/// saying they leave, plus earlier ones not back yet, while the partition
/// policy of at least one of their services keeps them. Also when the
/// next fail-closed policy runs out.
fn partitioned(
    s: &ControllerSettings,
    cache: &Cache,
    usable: &BTreeSet<ClusterName>,
    prev: Option<&View>,
) -> (BTreeMap<ClusterName, Stale>, Option<std::time::Instant>) {
    let Some(prev) = prev else {
        return (BTreeMap::new(), None);
    };
    let now = std::time::Instant::now();
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
    let mut next = None::<std::time::Instant>;
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
    use super::*;
    use fedmesh_trust::CertificateAuthority;

    fn settings(
        name: &str,
        pinned: &[(&str, &CertificateAuthority)],
        ca: &CertificateAuthority,
    ) -> ControllerSettings {
        ControllerSettings {
            cluster: ClusterName::new(name).unwrap(),
            trust_domain: ca.trust_domain().clone(),
            locality: Locality::default(),
            gateways: vec!["127.0.0.1:15443".parse().unwrap()],
            gateways_tcp: Vec::new(),
            gateway_tunnel: None,
            lease_ttl: Duration::from_secs(10),
            bundle: ca.bundle(),
            endorsements: vec![],
            pinned: pinned
                .iter()
                .map(|(n, ca)| (ClusterName::new(n).unwrap(), ca.bundle()))
                .collect(),
            policies: Default::default(),
        }
    }

    fn svc(i: u32, export: bool, proto: Protocol, td: &TrustDomain) -> LocalService {
        LocalService {
            vips: Vec::new(),
            name: ServiceName::new(&format!("s{i}"), "ns").unwrap(),
            ports: vec![(80, proto)],
            service_type: ServiceType::ClusterSetIP,
            export,
            audience: None,
            endpoints: vec![(
                "127.0.0.1:9000".parse().unwrap(),
                td.workload("ns", "x").unwrap(),
            )],
            exported_at_ms: None,
        }
    }

    /// Many random single-service changes: after each, the incremental
    /// view equals a full recomputation from the same cache.
    #[test]
    fn incremental_views_equal_full_recomputation() {
        let m = ControllerMetrics::default();
        let cas: Vec<CertificateAuthority> = ["a", "b", "c"]
            .iter()
            .map(|c| {
                CertificateAuthority::new_root(
                    format!("{c}.mesh").parse().unwrap(),
                    Duration::from_secs(600),
                )
                .unwrap()
            })
            .collect();
        let me = settings("a", &[("b", &cas[1]), ("c", &cas[2])], &cas[0]);
        let others = [settings("b", &[], &cas[1]), settings("c", &[], &cas[2])];
        let local: Vec<LocalService> = (0..5)
            .map(|i| svc(i, i % 2 == 0, Protocol::Tcp, &cas[0].trust_domain().clone()))
            .collect();
        let mut cache = Cache::default();
        let record = |s: &ControllerSettings| {
            let g = Gateways {
                quic: s.gateways.clone(),
                tcp: s.gateways_tcp.clone(),
            };
            // Everyone trusts everyone: this test is about exports.
            let all = ["a", "b", "c"].map(|c| ClusterName::new(c).unwrap());
            Some(info_record(s, &g, &all.into_iter().collect()))
        };
        let mut changes: Vec<(String, Option<Vec<u8>>)> = others
            .iter()
            .map(|o| (keys::info_key(&o.cluster), record(o)))
            .collect();
        changes.push((keys::info_key(&me.cluster), record(&me)));
        // Our own exports come back from the store like everyone else's.
        for l in local.iter().filter(|l| l.export) {
            changes.push((
                keys::service_key(&me.cluster, &l.name),
                Some(service_record(l, 2)),
            ));
        }
        cache.apply(
            Delta {
                replaced: true,
                changes,
            },
            &m,
        );
        let mut trusted = BTreeMap::new();
        cache.structural = false;
        let mut view = compute(&me, &cache, &local, &mut trusted, &m, None);
        let mut x: u32 = 7;
        let mut rnd = move || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            x >> 8
        };
        let (mut lost, mut conflicted) = (false, false);
        for step in 0..300 {
            // One to three changes per step, like a burst between recomputes.
            let mut changes = Vec::new();
            for _ in 0..=(rnd() % 3) {
                let o = &others[(rnd() % 2) as usize];
                let i = rnd() % 8;
                let name = ServiceName::new(&format!("s{i}"), "ns").unwrap();
                let key = keys::service_key(&o.cluster, &name);
                let value = match rnd() % 4 {
                    0 => None,
                    1 => Some(b"{not json".to_vec()),
                    k => {
                        let proto = if k == 2 { Protocol::Tcp } else { Protocol::Udp };
                        let s = svc(i, true, proto, &o.trust_domain);
                        Some(service_record(&s, u64::from(rnd() % 5)))
                    }
                };
                changes.push((key, value));
            }
            cache.apply(
                Delta {
                    replaced: false,
                    changes,
                },
                &m,
            );
            assert!(
                !cache.structural,
                "single-service changes are not structural"
            );
            view = incremental(&me, &mut cache, view, &m);
            let full = compute(&me, &cache, &local, &mut trusted, &m, None);
            assert_eq!(view.catalog, full.catalog, "catalog differs at step {step}");
            assert_eq!(view.mcs, full.mcs, "MCS view differs at step {step}");
            assert_eq!(
                view.conflicts, full.conflicts,
                "conflicts differ at step {step}"
            );
            let exported = |v: &View| v.clusters.iter().map(|c| c.exported).collect::<Vec<_>>();
            assert_eq!(
                exported(&view),
                exported(&full),
                "counts differ at step {step}"
            );
            lost |= !view.mcs.export_conflicts.is_empty();
            conflicted |= !view.conflicts.is_empty();
        }
        // The walk did reach the interesting states.
        assert!(lost && conflicted, "no conflicts were exercised");
    }
}
