//! The federation controller of one cluster: publishes the cluster's info
//! and exports under a lease it keeps alive, reflects every cluster's keys,
//! and computes this cluster's catalog and trusted bundles from them.
//!
//! Level-driven: every change recomputes the whole view from the cache;
//! nothing is published before the first full listing arrived.
//!
//! By concern: `publish` (this cluster's records under a lease), `cache`
//! (store values decoded once, indexed), `view` (the watch loop and the
//! catalog, MCS view and bundles computed from the cache at a given
//! instant), `partition` (clusters gone silent and what stays routed to
//! them), `status` (metrics and what `fedmesh status` shows).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fedmesh_catalog::mcs::{self, Conflict, ExportedMeta, Port, ServiceType};
use fedmesh_catalog::{Catalog, ClusterName};
use fedmesh_trust::rotation::Endorsement;
use fedmesh_trust::{TrustBundle, TrustBundles, TrustDomain};
use fedmesh_wire::ServiceName;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clusterset::{ClusterSetIps, Exported, IpMetrics};
use crate::records::Locality;
use crate::store::Store;

mod cache;
mod partition;
mod publish;
mod status;
#[cfg(test)]
mod tests;
mod view;

use publish::publish_loop;
pub use status::{ClusterStatus, ControllerMetrics, Status};
use view::{watch_loop, Outputs};

/// A service this cluster serves, as its source (Kubernetes, a file) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub name: ServiceName,
    pub ports: Vec<Port>,
    pub service_type: ServiceType,
    /// Session affinity and exported labels/annotations (MCS).
    pub meta: ExportedMeta,
    /// A ServiceExport exists for it.
    pub export: bool,
    pub audience: Option<Vec<ClusterName>>,
    /// Sidecar inbound listeners and the identities they present.
    pub endpoints: Vec<(SocketAddr, fedmesh_trust::SpiffeId)>,
    /// Endpoints' hostnames by address (an EndpointSlice endpoint's
    /// `hostname`): a headless export publishes them for MCS DNS.
    pub hostnames: BTreeMap<std::net::IpAddr, String>,
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
    /// ClusterSet IP allocation (`clusterset_ips:`), when configured.
    pub clusterset_ips: Option<crate::clusterset::IpSettings>,
}

/// The Multi-Cluster Services view of this cluster: what a Kubernetes
/// source writes back as ServiceImports and ServiceExport conditions.
#[derive(Debug, Clone, Default)]
pub struct McsView {
    /// Every import this cluster sees, with merged ports, type, conflicts.
    pub imports: imbl::OrdMap<ServiceName, mcs::Import>,
    /// The conflicts of each service this cluster exports (won or lost).
    pub export_conflicts: imbl::OrdMap<ServiceName, Vec<Conflict>>,
    /// This cluster's exports as read back from the federation store:
    /// what other clusters can see (a ServiceExport's `Ready`).
    pub published: imbl::OrdSet<ServiceName>,
    /// False until the controller computed its first view (the empty view
    /// it starts with says nothing about what exists).
    pub computed: bool,
}

/// A running controller. Dropping it stops it; its lease then expires and
/// its keys vanish from every other cluster's view.
pub struct Controller {
    catalog: watch::Receiver<Option<Arc<Catalog>>>,
    imports: watch::Receiver<Arc<McsView>>,
    bundles: watch::Receiver<Arc<TrustBundles>>,
    /// `None` without `clusterset_ips`.
    ips: Option<watch::Receiver<Arc<ClusterSetIps>>>,
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
        let (exported_tx, exported_rx) = watch::channel(Exported::default());
        let mut tasks = Vec::new();
        let ips = settings.clusterset_ips.clone().map(|ip_settings| {
            let metrics = IpMetrics::default();
            metrics.register(registry);
            let (tx, rx) = watch::channel(Arc::new(ClusterSetIps::default()));
            tasks.push(crate::clusterset::run(
                store.clone(),
                ip_settings,
                settings.cluster.clone(),
                exported_rx,
                tx,
                metrics,
            ));
            // `/status` shows them.
            let (mut seen, status) = (rx.clone(), status.clone());
            tasks.push(tokio::spawn(async move {
                while seen.changed().await.is_ok() {
                    let ips = seen.borrow_and_update().clone();
                    let mut st = match status.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    st.clusterset_ips = ips
                        .assigned
                        .iter()
                        .map(|(s, a)| (s.to_string(), a.clone()))
                        .collect();
                    st.clusterset_ips_exhausted = ips
                        .exhausted
                        .iter()
                        .map(|(s, c)| (s.to_string(), c.clone()))
                        .collect();
                }
            }));
            rx
        });
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
            ips.clone(),
            Outputs {
                catalog: catalog_tx,
                imports: imports_tx,
                bundles: bundles_tx,
                trusts: trusts_tx,
                exported: exported_tx,
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
            ips,
            leaving,
            metrics,
            tasks: {
                tasks.extend([publisher, watcher]);
                tasks
            },
        }
    }

    /// ClusterSet IPs as the allocator sees them; `None` when
    /// `clusterset_ips` is not configured.
    pub fn clusterset_ips(&self) -> Option<watch::Receiver<Arc<ClusterSetIps>>> {
        self.ips.clone()
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
            && self.published == other.published
            && self.computed == other.computed
    }
}
