//! The controller as one running application, built by this library from
//! its config: the service source (a file, or Kubernetes), the store, the
//! [`Controller`], the Kubernetes write-back and gateway watch, the control
//! API and the admin endpoint. `fedmesh controller` is this plus signals
//! and leader election; tests build the same thing.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::server::{
    self, ApiHandle, ApiLimits, ApiMetrics, ConfigApi, Signer, TokenReviewer,
};
use fedmesh_transport::admin;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{open_store, ControllerConfig};
use crate::{source, Controller, ControllerSettings, LocalService, Store};

mod api;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A part the config names could not be started: which, and why.
    #[error("{what}: {source}")]
    Start {
        what: String,
        #[source]
        source: BoxError,
    },
    /// The config asks for something that cannot work.
    #[error("{0}")]
    Refused(String),
}

/// Maps an error to the part of the config it came from.
fn failed<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> AppError {
    let what = what.into();
    move |e| AppError::Start {
        what,
        source: e.into(),
    }
}

/// Something kept alive until the controller stops.
type Keep = Box<dyn std::any::Any + Send>;

/// Aborts its task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone (what it owned, a
    /// listening socket, is closed when this returns).
    pub(crate) async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the cluster's services come from, started before the rest (a
/// standby replica keeps it warm, so taking over does not wait for a full
/// listing). `None` in `local` until the first listing is complete.
pub struct ServiceSource {
    local: watch::Receiver<Option<Vec<LocalService>>>,
    #[cfg(feature = "kube")]
    kube: Option<crate::k8s::KubeMetrics>,
    /// The Kubernetes source's ServiceExports with their checks.
    #[cfg(feature = "kube")]
    exports: Option<watch::Receiver<Arc<crate::k8s::SeenExports>>>,
    /// The Kubernetes source's client, shared with the other Kubernetes
    /// parts (one connection pool to the API server).
    #[cfg(feature = "kube")]
    client: Option<KubeClient>,
    _keep: Keep,
}

#[cfg(feature = "kube")]
type KubeClient = kube::Client;
/// Without the `kube` feature there is never a client.
#[cfg(not(feature = "kube"))]
type KubeClient = std::convert::Infallible;

impl ServiceSource {
    /// Starts the source the config names; a services file is read (and
    /// checked) at once.
    pub async fn start(
        cfg: &ControllerConfig,
        settings: &ControllerSettings,
        registry: &mut Registry,
    ) -> Result<Self, AppError> {
        match (&cfg.services, &cfg.kubernetes) {
            (Some(path), _) => {
                let (rx, task) = source::watch_file(
                    path.clone(),
                    settings.trust_domain.clone(),
                    Duration::from_secs(1),
                )
                .map_err(|e| {
                    AppError::Refused(format!(
                        "services file {}:\n  - {}",
                        path.display(),
                        e.join("\n  - ")
                    ))
                })?;
                let (tx, local) = watch::channel(Some(rx.borrow().clone()));
                let relay = tokio::spawn(async move {
                    let mut rx = rx;
                    while rx.changed().await.is_ok() {
                        tx.send_replace(Some(rx.borrow_and_update().clone()));
                    }
                });
                Ok(Self {
                    local,
                    #[cfg(feature = "kube")]
                    kube: None,
                    #[cfg(feature = "kube")]
                    exports: None,
                    #[cfg(feature = "kube")]
                    client: None,
                    _keep: Box::new((AbortOnDrop(task), AbortOnDrop(relay))),
                })
            }
            (None, Some(k)) => Self::kubernetes(settings, k, registry).await,
            (None, None) => Err(AppError::Refused("no service source".into())),
        }
    }

    #[cfg(feature = "kube")]
    async fn kubernetes(
        settings: &ControllerSettings,
        k: &crate::config::KubernetesSource,
        registry: &mut Registry,
    ) -> Result<Self, AppError> {
        let client = kube_client().await?;
        let src = crate::k8s::KubeSource::start(
            client.clone(),
            crate::k8s::KubeSettings {
                cluster: settings.cluster.clone(),
                trust_domain: settings.trust_domain.clone(),
                inbound_port: k.inbound_port,
                exclude_namespaces: k.exclude_namespaces.iter().cloned().collect(),
            },
            registry,
        );
        Ok(Self {
            local: src.local(),
            exports: Some(src.exports()),
            kube: Some(src.metrics().clone()),
            client: Some(client),
            _keep: Box::new(src),
        })
    }

    #[cfg(not(feature = "kube"))]
    async fn kubernetes(
        _: &ControllerSettings,
        _: &crate::config::KubernetesSource,
        _: &mut Registry,
    ) -> Result<Self, AppError> {
        Err(AppError::Refused(
            "this fedmesh was built without the Kubernetes source (--no-default-features); rebuild with the default features".into(),
        ))
    }

    /// A source whose services never change.
    pub fn fixed(services: Vec<LocalService>) -> Self {
        let (tx, local) = watch::channel(Some(services));
        Self {
            local,
            #[cfg(feature = "kube")]
            kube: None,
            #[cfg(feature = "kube")]
            exports: None,
            #[cfg(feature = "kube")]
            client: None,
            _keep: Box::new(tx),
        }
    }

    /// The services listed so far (`None` before the first full listing).
    pub fn current(&self) -> Option<Vec<LocalService>> {
        self.local.borrow().clone()
    }
}

#[cfg(feature = "kube")]
async fn kube_client() -> Result<kube::Client, AppError> {
    crate::k8s::client().await.map_err(failed(
        "the Kubernetes API (in-cluster config or KUBECONFIG)",
    ))
}

/// How the control API is served: where, its TLS, limits and metrics,
/// and the signer when the controller holds the CA.
pub struct ApiServing {
    pub listen: SocketAddr,
    pub tls: rustls::ServerConfig,
    pub limits: ApiLimits,
    pub metrics: ApiMetrics,
    pub signer: Option<Signer>,
    /// Re-issues the controller's own SVID (holding the CA).
    renewer: Option<AbortOnDrop>,
}

impl ApiServing {
    /// Config streaming only, with `tls` (no signing).
    pub fn new(
        listen: SocketAddr,
        tls: rustls::ServerConfig,
        limits: ApiLimits,
        metrics: ApiMetrics,
    ) -> Self {
        Self {
            listen,
            tls,
            limits,
            metrics,
            signer: None,
            renewer: None,
        }
    }
}

/// Everything a controller runs with, however it was configured.
pub struct AppParts {
    pub settings: ControllerSettings,
    pub store: Arc<dyn Store>,
    pub source: ServiceSource,
    pub api: Option<ApiServing>,
    /// The admin endpoint (`/metrics` of `registry`, `/status`).
    pub admin: Option<SocketAddr>,
    /// The `clusterset.local` DNS server.
    pub dns: Option<crate::dns::server::DnsConfig>,
}

/// A running controller with everything its config names. Dropping it
/// stops every part; [`ControllerApp::shutdown`] stops them in order.
pub struct ControllerApp {
    ctrl: Arc<Controller>,
    api: Option<(ApiHandle, Option<AbortOnDrop>)>,
    admin: Option<(SocketAddr, AbortOnDrop)>,
    dns: Option<(crate::dns::server::DnsServer, AbortOnDrop)>,
    _follower: AbortOnDrop,
    _kube: Vec<Keep>,
    _source: ServiceSource,
}

impl ControllerApp {
    /// Builds the controller its config describes: opens the store,
    /// prepares the control API, starts everything ([`start`](Self::start))
    /// and the Kubernetes parts. `registry` holds what the caller
    /// registered (the source's metrics, leadership); the admin endpoint
    /// serves it.
    pub async fn build(
        cfg: &ControllerConfig,
        settings: ControllerSettings,
        source: ServiceSource,
        mut registry: Registry,
    ) -> Result<Self, AppError> {
        let client = cluster_client(cfg, &source).await?;
        let api = match &cfg.api {
            Some(a) => {
                let reviewer = reviewer(client.as_ref());
                let (td, bundle) = (&settings.trust_domain, &settings.bundle);
                Some(api::prepare(a, td, bundle, &mut registry, reviewer)?)
            }
            None => None,
        };
        let kube_metrics = kube_metrics(cfg, &source, &mut registry);
        let store = open_store(&cfg.store)
            .await
            .map_err(failed("the federation store"))?;
        let parts = AppParts {
            settings,
            store,
            source,
            api,
            admin: cfg.admin,
            dns: cfg.dns.clone(),
        };
        let mut app = Self::start(parts, registry).await?;
        app._kube = kube_parts(cfg, &app.ctrl, &app._source, kube_metrics, client)?;
        Ok(app)
    }

    /// Waits until the source listed every service (nothing is published
    /// before), then starts the controller, its API and admin endpoint.
    /// Metrics go to `registry`, which the admin endpoint then serves.
    pub async fn start(parts: AppParts, mut registry: Registry) -> Result<Self, AppError> {
        let AppParts {
            settings,
            store,
            source,
            api,
            admin,
            dns,
        } = parts;
        let mut first = source.local.clone();
        let initial = first
            .wait_for(Option::is_some)
            .await
            .map_err(|_| AppError::Refused("the service source stopped".into()))?
            .clone()
            .unwrap_or_default();
        tracing::info!(cluster = %settings.cluster, lease_ttl = ?settings.lease_ttl, pinned = settings.pinned.len(), "effective controller config");
        let ctrl = Arc::new(Controller::start(store, settings, initial, &mut registry));
        let api = match api {
            Some(a) => {
                let config_api = ConfigApi::new(
                    server::versioned(ctrl.catalog(), ctrl.bundles()),
                    a.limits,
                    a.metrics,
                );
                let handle = server::spawn(a.listen, a.tls, config_api, a.signer)
                    .await
                    .map_err(failed(format!("api.listen {}", a.listen)))?;
                Some((handle, a.renewer))
            }
            None => None,
        };
        // Follow the source.
        let follower = {
            let ctrl = ctrl.clone();
            let mut local = source.local.clone();
            AbortOnDrop(tokio::spawn(async move {
                while local.changed().await.is_ok() {
                    if let Some(l) = local.borrow_and_update().clone() {
                        ctrl.set_local(l);
                    }
                }
            }))
        };
        let dns = match dns {
            Some(d) => Some(start_dns(&d, &ctrl, &mut registry).await?),
            None => None,
        };
        let admin = match admin {
            Some(addr) => {
                let c = ctrl.clone();
                let status: admin::JsonFn =
                    Arc::new(move || serde_json::to_string_pretty(&c.status()).unwrap_or_default());
                let (bound, task) = admin::spawn_with(
                    addr,
                    |reg| *reg = registry,
                    Arc::new(AtomicBool::new(true)),
                    Some(status),
                    None,
                )
                .await
                .map_err(failed(format!("admin {addr}")))?;
                Some((bound, AbortOnDrop(task)))
            }
            None => None,
        };
        Ok(Self {
            ctrl,
            api,
            admin,
            dns,
            _follower: follower,
            _kube: Vec::new(),
            _source: source,
        })
    }

    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// Where the control API listens, when the config has one.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|(h, _)| h.addr)
    }

    /// Where the admin endpoint listens, when the config has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }

    /// Where the `clusterset.local` DNS server listens (UDP and TCP), when
    /// the config has one.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|(d, _)| d.udp_addr())
    }

    /// Stops the API first (no proxy gets a config from a controller on
    /// its way out), then the controller: with `leave`, the cluster's
    /// records are deleted so peers stop routing to it at once; without,
    /// they live on for the lease TTL (a restart within it is never
    /// missed).
    pub async fn shutdown(self, leave: bool) {
        let Self {
            ctrl,
            api,
            admin,
            dns,
            _follower,
            _kube,
            _source,
        } = self;
        drop(dns);
        drop(_follower);
        if let Some((handle, renewer)) = api {
            drop(renewer);
            handle.shutdown().await;
        }
        if let Some((_, task)) = admin {
            task.stop().await;
        }
        drop(_kube);
        match Arc::try_unwrap(ctrl) {
            Ok(c) if leave => c.leave().await,
            Ok(c) => c.shutdown().await,
            // Someone still holds it (a status closure in flight): the
            // last drop stops it.
            Err(_) => {}
        }
    }
}

/// The `clusterset.local` server and the task that rebuilds its zone from
/// the controller's imports and ClusterSet IPs.
async fn start_dns(
    cfg: &crate::dns::server::DnsConfig,
    ctrl: &Arc<Controller>,
    registry: &mut Registry,
) -> Result<(crate::dns::server::DnsServer, AbortOnDrop), AppError> {
    use crate::dns::Zone;
    let Some(mut ips) = ctrl.clusterset_ips() else {
        return Err(AppError::Refused(
            "dns needs clusterset_ips (a service's A and AAAA records are its ClusterSet IPs)"
                .into(),
        ));
    };
    let mut mcs = ctrl.mcs();
    let ttl = cfg.ttl;
    let (tx, rx) = watch::channel(Arc::new(Zone::empty(ttl)));
    let zone = AbortOnDrop(tokio::spawn(async move {
        loop {
            let next = {
                let view = mcs.borrow_and_update().clone();
                let ips = ips.borrow_and_update().clone();
                Zone::build(view.imports.iter(), &ips.assigned, ttl, 0)
            };
            tx.send_if_modified(|cur| {
                let next = next.versioned(cur);
                let changed = **cur != next;
                if changed {
                    *cur = Arc::new(next);
                }
                changed
            });
            tokio::select! {
                r = mcs.changed() => if r.is_err() { return },
                r = ips.changed() => if r.is_err() { return },
            }
        }
    }));
    let metrics = crate::dns::server::DnsMetrics::default();
    metrics.register(registry);
    let server = crate::dns::server::spawn(cfg, rx, metrics)
        .await
        .map_err(failed(format!("dns.listen {}", cfg.listen)))?;
    Ok((server, zone))
}

/// The client every Kubernetes part of this controller shares, when the
/// config has a `kubernetes` section: the source's, or a new one (a
/// services file with write-back or a gateway Service).
async fn cluster_client(
    cfg: &ControllerConfig,
    source: &ServiceSource,
) -> Result<Option<KubeClient>, AppError> {
    #[cfg(feature = "kube")]
    if cfg.kubernetes.is_some() {
        return match &source.client {
            Some(c) => Ok(Some(c.clone())),
            None => kube_client().await.map(Some),
        };
    }
    let _ = (cfg, source);
    Ok(None)
}

/// With the Kubernetes source, pods prove who they are with their
/// service account token (a TokenReview) to get their first SVID.
fn reviewer(client: Option<&KubeClient>) -> Option<Arc<dyn TokenReviewer>> {
    #[cfg(feature = "kube")]
    return client.map(|c| {
        Arc::new(crate::k8s::KubeTokenReviewer::new(c.clone())) as Arc<dyn TokenReviewer>
    });
    #[cfg(not(feature = "kube"))]
    match client {
        None => None,
        Some(never) => match *never {},
    }
}

/// Gateways advertised from their LoadBalancer Service when the config
/// names none, the MCS view written back to Kubernetes, and CoreDNS's
/// forward of `clusterset.local`.
#[cfg(feature = "kube")]
fn kube_parts(
    cfg: &ControllerConfig,
    ctrl: &Arc<Controller>,
    source: &ServiceSource,
    metrics: Option<crate::k8s::KubeMetrics>,
    client: Option<KubeClient>,
) -> Result<Vec<Keep>, AppError> {
    let mut keep: Vec<Keep> = Vec::new();
    let (Some(k), Some(client), Some(metrics)) = (&cfg.kubernetes, client, metrics) else {
        return Ok(keep);
    };
    if let Some(c) = &k.coredns {
        // Both were checked with the config.
        if let (Some(configmap), Some(dns_service)) = (
            crate::config::namespaced(&c.configmap),
            crate::config::namespaced(&c.dns_service),
        ) {
            let s = crate::k8s::coredns::CorednsSettings {
                configmap,
                dns_service,
                resync: c.resync,
            };
            let task = crate::k8s::coredns::keep_forward(client.clone(), s, metrics.clone());
            keep.push(Box::new(AbortOnDrop(task)));
        }
    }
    if let (Some(svc), true) = (&k.gateway_service, cfg.gateways.is_empty()) {
        let (ns, name) = svc.split_once('/').unwrap_or(("", svc.as_str()));
        let (mut rx, task) = crate::k8s::watch_gateway_service(client.clone(), ns, name);
        // Weak: the controller's clean shutdown needs the only Arc.
        let c = Arc::downgrade(ctrl);
        let relay = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let g = rx.borrow_and_update().clone();
                match c.upgrade() {
                    Some(c) => c.set_gateways(g),
                    None => return,
                }
            }
        });
        keep.push(Box::new((AbortOnDrop(task), AbortOnDrop(relay))));
    }
    if k.write_back {
        let exports = match &source.exports {
            Some(e) => e.clone(),
            None => {
                // A services file: each export is valid as written.
                let (tx, rx) = watch::channel(Arc::new(crate::k8s::SeenExports::new()));
                let mut local = source.local.clone();
                let relay = tokio::spawn(async move {
                    loop {
                        let seen = crate::k8s::file_exports(local.borrow_and_update().as_deref());
                        tx.send_if_modified(|cur| {
                            let changed = **cur != seen;
                            *cur = Arc::new(seen);
                            changed
                        });
                        if local.changed().await.is_err() {
                            return;
                        }
                    }
                });
                keep.push(Box::new(AbortOnDrop(relay)));
                rx
            }
        };
        let task = crate::k8s::write_back(
            client,
            ctrl.mcs(),
            exports,
            ctrl.clusterset_ips(),
            metrics,
            Duration::from_secs(5),
        );
        keep.push(Box::new(AbortOnDrop(task)));
    }
    Ok(keep)
}

#[cfg(not(feature = "kube"))]
fn kube_parts(
    _: &ControllerConfig,
    _: &Arc<Controller>,
    _: &ServiceSource,
    _: Option<()>,
    _: Option<KubeClient>,
) -> Result<Vec<Keep>, AppError> {
    Ok(Vec::new())
}

/// With a `kubernetes` section, the metrics its writes count with: the
/// Kubernetes source's (registered with it); a services file registers
/// its own, before the admin endpoint takes the registry.
#[cfg(feature = "kube")]
fn kube_metrics(
    cfg: &ControllerConfig,
    source: &ServiceSource,
    registry: &mut Registry,
) -> Option<crate::k8s::KubeMetrics> {
    cfg.kubernetes.as_ref()?;
    Some(match &source.kube {
        Some(m) => m.clone(),
        None => {
            let m = crate::k8s::KubeMetrics::default();
            m.register(registry);
            m
        }
    })
}

#[cfg(not(feature = "kube"))]
fn kube_metrics(_: &ControllerConfig, _: &ServiceSource, _: &mut Registry) -> Option<()> {
    None
}
