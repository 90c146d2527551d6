//! The Kubernetes source: a cluster's services from its API server, and
//! the Multi-Cluster Services objects written back.
//!
//! In: Services, EndpointSlices and `ServiceExport`s
//! (`multicluster.x-k8s.io/v1beta1`, which the CRDs `fedmesh install`
//! renders store; v1alpha1 stays served for other tools), each through a kube-runtime watcher
//! (list, then watch from the list's resourceVersion with bookmarks; a
//! `410 Gone` re-lists and the re-list replaces the cache whole, so nothing
//! deleted during the gap survives). Nothing is reported before all three
//! have listed once. The local services are a pure function of the three
//! caches, recomputed on every change (level-driven).
//!
//! Out (`mcs.rs`): a `ServiceImport` per import the controller computed,
//! deleted when the import goes away, and `Valid`, `Ready`, `Conflict`
//! (and with ClusterSet IPs `fedmesh.io/ClusterSetIP`) conditions on each
//! `ServiceExport`, written level-driven against what the API server
//! holds.
//!
//! Endpoints: each ready address of a Service's EndpointSlices is a pod
//! whose sidecar listens for mTLS on `inbound_port`; its identity is the
//! SPIFFE ID of the service account named by the Service's
//! `fedmesh.io/service-account` annotation (default: `default`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use fedmesh_catalog::mcs::{
    ExportedMeta, HeadlessEndpoint, Port, Protocol, ServiceType, SessionAffinity,
};
use fedmesh_catalog::ClusterName;
use fedmesh_trust::TrustDomain;
use fedmesh_wire::{bounded, ServiceName};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::controller::{Gateways, LocalService};

pub mod coredns;
mod mcs;
pub use mcs::{contains, export_conditions, service_import, stamped, write_back, Condition};

/// Annotation naming the service account a Service's pods run as.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "fedmesh.io/service-account";
/// Annotation on a ServiceExport: comma-separated clusters that may import it.
pub const AUDIENCE_ANNOTATION: &str = "fedmesh.io/audience";
/// Label on every object fedmesh writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "fedmesh");
const FIELD_MANAGER: &str = "fedmesh";

/// What fedmesh tells the API server it is, on every request.
pub const USER_AGENT: &str = concat!("fedmesh/", env!("CARGO_PKG_VERSION"));

/// A client for the cluster's API server (in-cluster config or
/// `KUBECONFIG`) that names fedmesh and its version in `User-Agent`, so an
/// API server's audit log and metrics tell its requests apart.
pub async fn client() -> Result<Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    Client::try_from(config)
}

/// The Multi-Cluster Services API group and the version fedmesh speaks.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
pub const MCS_VERSION: &str = "v1beta1";
const MCS_API_VERSION: &str = "multicluster.x-k8s.io/v1beta1";

fn mcs_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(MCS_GROUP, MCS_VERSION, kind), plural)
}

pub fn service_export_resource() -> ApiResource {
    mcs_resource("ServiceExport", "serviceexports")
}

pub fn service_import_resource() -> ApiResource {
    mcs_resource("ServiceImport", "serviceimports")
}

#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    /// Port of every pod's sidecar inbound mTLS listener.
    pub inbound_port: u16,
    /// Namespaces whose ServiceExports are refused (`Valid=False`).
    pub exclude_namespaces: BTreeSet<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    kind: &'static str,
    what: &'static str,
}

/// `fedmesh_kube_*` metrics.
#[derive(Clone, Debug, Default)]
pub struct KubeMetrics {
    /// Watch stream errors (including `410 Gone`), by kind.
    errors: Family<Labels, Counter>,
    /// Completed (re-)lists, by kind.
    lists: Family<Labels, Counter>,
    /// Objects (or parts of them) unusable right now, by kind and reason.
    skipped: Family<Labels, Gauge>,
    /// Writes to the API server, by kind and verb.
    writes: Family<Labels, Counter>,
}

impl KubeMetrics {
    pub fn register(&self, reg: &mut Registry) {
        let reg = reg.sub_registry_with_prefix("fedmesh_kube");
        reg.register("watch_errors", "Watch stream errors", self.errors.clone());
        reg.register("lists", "Completed lists and re-lists", self.lists.clone());
        reg.register(
            "unusable",
            "Objects or ports skipped as unusable right now, by kind and reason",
            self.skipped.clone(),
        );
        reg.register("writes", "Objects written back", self.writes.clone());
    }

    fn inc(f: &Family<Labels, Counter>, kind: &'static str, what: &'static str) {
        f.get_or_create(&Labels { kind, what }).inc();
    }

    pub fn lists(&self, kind: &'static str) -> u64 {
        self.lists.get_or_create(&Labels { kind, what: "" }).get()
    }

    pub fn errors(&self, kind: &'static str) -> u64 {
        self.errors.get_or_create(&Labels { kind, what: "" }).get()
    }

    pub fn writes(&self, kind: &'static str, what: &'static str) -> u64 {
        self.writes.get_or_create(&Labels { kind, what }).get()
    }

    pub fn skipped(&self, kind: &'static str, what: &'static str) -> i64 {
        self.skipped.get_or_create(&Labels { kind, what }).get()
    }
}

/// One kind's objects by `namespace/name`, as the last (re-)list and the
/// watch events since say.
struct Cache<K> {
    live: BTreeMap<String, K>,
    /// Filled between `Init` and `InitDone`; replaces `live` whole.
    pending: Option<BTreeMap<String, K>>,
    synced: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            pending: None,
            synced: false,
        }
    }
}

fn key<K: Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or_default(),
        o.meta().name.as_deref().unwrap_or_default()
    )
}

impl<K: Resource> Cache<K> {
    /// Applies one event; true if `live` may have changed.
    fn apply(&mut self, ev: Event<K>) -> bool {
        match ev {
            Event::Init => {
                self.pending = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                if let Some(p) = &mut self.pending {
                    p.insert(key(&o), o);
                }
                false
            }
            Event::InitDone => {
                self.live = self.pending.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(o) => {
                self.live.insert(key(&o), o);
                true
            }
            Event::Delete(o) => {
                self.live.remove(&key(&o));
                true
            }
        }
    }
}

#[derive(Default)]
struct Caches {
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    exports: Cache<DynamicObject>,
    /// Only the write-back's own caches fill this.
    imports: Cache<DynamicObject>,
}

/// A running Kubernetes source. Dropping it stops it.
pub struct KubeSource {
    local: watch::Receiver<Option<Vec<LocalService>>>,
    exports: watch::Receiver<Arc<SeenExports>>,
    metrics: KubeMetrics,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Starts the three watchers and the computation. Metrics go to `registry`.
    pub fn start(client: Client, settings: KubeSettings, registry: &mut Registry) -> Self {
        let metrics = KubeMetrics::default();
        metrics.register(registry);
        let caches = Arc::new(Mutex::new(Caches::default()));
        let changed = Arc::new(Notify::new());
        let (tx, rx) = watch::channel(None);
        let (exports_tx, exports_rx) = watch::channel(Arc::new(SeenExports::new()));
        let exports: Api<DynamicObject> = Api::all_with(client.clone(), &service_export_resource());
        let tasks = vec![
            tokio::spawn(run_watcher(
                Api::<Service>::all(client.clone()),
                "service",
                caches.clone(),
                |c| &mut c.services,
                changed.clone(),
                metrics.clone(),
            )),
            tokio::spawn(run_watcher(
                Api::<EndpointSlice>::all(client.clone()),
                "endpointslice",
                caches.clone(),
                |c| &mut c.slices,
                changed.clone(),
                metrics.clone(),
            )),
            tokio::spawn(run_watcher(
                exports,
                "serviceexport",
                caches.clone(),
                |c| &mut c.exports,
                changed.clone(),
                metrics.clone(),
            )),
            tokio::spawn(compute_loop(
                caches,
                changed,
                settings,
                (tx, exports_tx),
                metrics.clone(),
            )),
        ];
        Self {
            local: rx,
            exports: exports_rx,
            metrics,
            tasks,
        }
    }

    /// The cluster's services; `None` until every kind has listed once.
    pub fn local(&self) -> watch::Receiver<Option<Vec<LocalService>>> {
        self.local.clone()
    }

    /// Every ServiceExport with its `Valid` check and its status as seen.
    pub fn exports(&self) -> watch::Receiver<Arc<SeenExports>> {
        self.exports.clone()
    }

    pub fn metrics(&self) -> &KubeMetrics {
        &self.metrics
    }
}

fn lock(c: &Mutex<Caches>) -> std::sync::MutexGuard<'_, Caches> {
    match c.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn run_watcher<K>(
    api: Api<K>,
    kind: &'static str,
    caches: Arc<Mutex<Caches>>,
    pick: fn(&mut Caches) -> &mut Cache<K>,
    changed: Arc<Notify>,
    metrics: KubeMetrics,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    let cfg = watcher::Config::default().timeout(290);
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => {
                let done = matches!(ev, Event::InitDone);
                let touched = pick(&mut lock(&caches)).apply(ev);
                if done {
                    KubeMetrics::inc(&metrics.lists, kind, "");
                    tracing::info!(kind, "listed");
                }
                if touched {
                    changed.notify_one();
                }
            }
            Err(e) => {
                // Includes 410 Gone: the watcher re-lists by itself next.
                KubeMetrics::inc(&metrics.errors, kind, "");
                tracing::warn!(kind, error = %e, "watch failed; retrying (a 410 Gone re-lists)");
            }
        }
    }
}

async fn compute_loop(
    caches: Arc<Mutex<Caches>>,
    changed: Arc<Notify>,
    settings: KubeSettings,
    (tx, exports_tx): (
        watch::Sender<Option<Vec<LocalService>>>,
        watch::Sender<Arc<SeenExports>>,
    ),
    metrics: KubeMetrics,
) {
    let mut last_problems: Vec<Problem> = Vec::new();
    loop {
        changed.notified().await;
        let mut problems = Vec::new();
        let (computed, seen) = {
            let c = lock(&caches);
            if !(c.services.synced && c.slices.synced && c.exports.synced) {
                continue;
            }
            local_services(
                &c.services.live,
                &c.slices.live,
                &c.exports.live,
                &settings,
                &mut problems,
            )
        };
        if problems != last_problems {
            // Level, not edge: the gauges say what is unusable now, and
            // each problem is logged once when it appears.
            for (kind, what, _) in &last_problems {
                metrics.skipped.get_or_create(&Labels { kind, what }).set(0);
            }
            for (kind, what, text) in &problems {
                metrics.skipped.get_or_create(&Labels { kind, what }).inc();
                if !last_problems.iter().any(|p| &p.2 == text) {
                    tracing::warn!(kind, reason = what, "{text}; skipped");
                }
            }
            last_problems = problems;
        }
        exports_tx.send_if_modified(|cur| {
            let changed = **cur != seen;
            if changed {
                *cur = Arc::new(seen);
            }
            changed
        });
        tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&computed) {
                false
            } else {
                *cur = Some(computed);
                true
            }
        });
    }
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Something in the cluster that could not be used: (kind, reason, text).
pub type Problem = (&'static str, &'static str, String);

/// Whether a ServiceExport can be exported: its `Valid` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportCheck {
    Valid,
    /// `Valid=False` with this reason (mcs-api v1beta1's `NoService` and
    /// `InvalidServiceType`, else fedmesh's own) and message.
    Invalid {
        reason: &'static str,
        message: String,
    },
}

impl ExportCheck {
    fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        ExportCheck::Invalid {
            reason,
            message: message.into(),
        }
    }
}

/// A ServiceExport as the source last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenExport {
    pub check: ExportCheck,
    /// Its resourceVersion and `status.conditions`; `None` when the
    /// source does not read ServiceExports (a services file).
    pub seen: Option<(String, Vec<serde_json::Value>)>,
}

/// Every ServiceExport by (namespace, name).
pub type SeenExports = BTreeMap<(String, String), SeenExport>;

/// The local services the three caches describe, and what each
/// ServiceExport's `Valid` condition says. Pure apart from the problems
/// it collects (each logged once and counted by the caller).
pub fn local_services(
    services: &BTreeMap<String, Service>,
    slices: &BTreeMap<String, EndpointSlice>,
    exports: &BTreeMap<String, DynamicObject>,
    settings: &KubeSettings,
    problems: &mut Vec<Problem>,
) -> (Vec<LocalService>, SeenExports) {
    // Ready endpoint addresses, and their hostnames, by (namespace,
    // service name).
    let mut ready: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
    let mut hostnames: BTreeMap<(String, String), BTreeMap<IpAddr, String>> = BTreeMap::new();
    for s in slices.values() {
        let Some(svc) = s.labels().get("kubernetes.io/service-name") else {
            continue;
        };
        let ns = s.namespace().unwrap_or_default();
        let set = ready.entry((ns.clone(), svc.clone())).or_default();
        for e in &s.endpoints {
            // Unknown readiness counts as ready, as kube-proxy does.
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            // The API server checks it is a DNS label; checked again, as it
            // becomes a name in every importing cluster.
            let hostname = e
                .hostname
                .as_ref()
                .filter(|h| HeadlessEndpoint::valid_hostname(h))
                .map(String::as_str);
            for a in &e.addresses {
                match a.parse::<IpAddr>() {
                    Ok(ip) => {
                        set.insert(ip);
                        if let Some(h) = hostname {
                            hostnames
                                .entry((ns.clone(), svc.clone()))
                                .or_default()
                                .insert(ip, h.to_owned());
                        }
                    }
                    Err(_) => problems.push((
                        "endpointslice",
                        "bad_address",
                        format!("{}: address `{}` is not an IP", key(s), bounded(a)),
                    )),
                }
            }
        }
    }
    // Every export starts as "no Service"; a Service found below says more.
    let mut checks: BTreeMap<String, ExportCheck> = exports
        .keys()
        .map(|k| {
            (
                k.clone(),
                ExportCheck::invalid("NoService", "no Service of this name in this namespace"),
            )
        })
        .collect();
    let mut out = Vec::new();
    for svc in services.values() {
        let (name, ns) = (svc.name_any(), svc.namespace().unwrap_or_default());
        let Some(spec) = &svc.spec else { continue };
        let export_key = key(svc);
        let export = exports.get(&export_key);
        let mut check = ExportCheck::Valid;
        if spec.type_.as_deref() == Some("ExternalName") {
            if export.is_some() {
                checks.insert(
                    export_key,
                    ExportCheck::invalid(
                        "InvalidServiceType",
                        "an ExternalName Service cannot be exported",
                    ),
                );
            }
            continue;
        }
        let service = match ServiceName::new(&name, &ns) {
            Ok(s) => s,
            Err(e) => {
                problems.push(("service", "bad_name", format!("{}: {e}", key(svc))));
                checks.insert(
                    export_key,
                    ExportCheck::invalid("InvalidService", e.to_string()),
                );
                continue;
            }
        };
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            let name = p.name.clone().unwrap_or_default();
            match (u16::try_from(p.port), protocol(p.protocol.as_deref())) {
                (Ok(port), Some(proto)) if port != 0 && Port::valid_name(&name) => {
                    ports.push(Port {
                        name,
                        port,
                        protocol: proto,
                        app_protocol: p
                            .app_protocol
                            .clone()
                            .filter(|a| !a.is_empty() && a.len() <= 253),
                    })
                }
                _ => problems.push((
                    "service",
                    "bad_port",
                    format!(
                        "{}: port {} {:?} not usable",
                        key(svc),
                        p.port,
                        p.protocol.as_deref().map(bounded)
                    ),
                )),
            }
        }
        if ports.is_empty() {
            check = ExportCheck::invalid("InvalidService", "the Service has no usable port");
        }
        let sa = svc
            .annotations()
            .get(SERVICE_ACCOUNT_ANNOTATION)
            .map(String::as_str)
            .unwrap_or("default");
        let identity = match settings.trust_domain.workload(&ns, sa) {
            Ok(id) => id,
            Err(e) => {
                problems.push((
                    "service",
                    "bad_service_account",
                    format!("{}: {e}", key(svc)),
                ));
                checks.insert(
                    export_key,
                    ExportCheck::invalid("InvalidService", e.to_string()),
                );
                continue;
            }
        };
        let endpoints = ready
            .get(&(ns.clone(), name.clone()))
            .into_iter()
            .flatten()
            .map(|ip| {
                (
                    SocketAddr::new(*ip, settings.inbound_port),
                    identity.clone(),
                )
            })
            .collect();
        let audience = export
            .and_then(|e| e.annotations().get(AUDIENCE_ANNOTATION))
            .map(|a| {
                a.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .filter_map(|c| ClusterName::new(c).ok())
                    .collect()
            });
        let exported_at_ms = export
            .and_then(|e| e.meta().creation_timestamp.as_ref())
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok());
        let session_affinity = match spec.session_affinity.as_deref() {
            Some("ClientIP") => SessionAffinity::ClientIp {
                timeout_seconds: spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .and_then(|t| u32::try_from(t).ok())
                    .filter(|t| (1..=86_400).contains(t)),
            },
            _ => SessionAffinity::None,
        };
        let meta = match export.map(exported_meta) {
            Some(Ok((labels, annotations))) => ExportedMeta {
                session_affinity,
                labels,
                annotations,
            },
            Some(Err(why)) => {
                check = ExportCheck::invalid("InvalidExportedMetadata", why);
                ExportedMeta::default()
            }
            None => ExportedMeta {
                session_affinity,
                ..ExportedMeta::default()
            },
        };
        if export.is_some() && settings.exclude_namespaces.contains(&ns) {
            check = ExportCheck::invalid(
                "NamespaceExcluded",
                format!("namespace {ns} is in the controller's kubernetes.exclude_namespaces"),
            );
        }
        let exported = export.is_some() && check == ExportCheck::Valid;
        if export.is_some() {
            checks.insert(export_key, check);
        }
        // Headless Services have no cluster IP ("None"); dual-stack ones two.
        let vips = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .collect();
        let hostnames = hostnames.remove(&(ns, name)).unwrap_or_default();
        out.push(LocalService {
            vips,
            hostnames,
            name: service,
            ports,
            service_type: if spec.cluster_ip.as_deref() == Some("None") {
                ServiceType::Headless
            } else {
                ServiceType::ClusterSetIP
            },
            meta,
            export: exported,
            audience,
            endpoints,
            exported_at_ms,
        });
    }
    let seen = checks
        .into_iter()
        .filter_map(|(k, check)| {
            let o = exports.get(&k)?;
            let (ns, name) = k.split_once('/')?;
            let rv = o.meta().resource_version.clone().unwrap_or_default();
            let conditions = o.data["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Some((
                (ns.to_owned(), name.to_owned()),
                SeenExport {
                    check,
                    seen: Some((rv, conditions)),
                },
            ))
        })
        .collect();
    (out, seen)
}

/// The ServiceExports a services file implies: one, valid, per service
/// it marks exported (their status is not read back).
pub fn file_exports(local: Option<&[LocalService]>) -> SeenExports {
    local
        .into_iter()
        .flatten()
        .filter(|s| s.export)
        .map(|s| {
            (
                (s.name.namespace().to_owned(), s.name.name().to_owned()),
                SeenExport {
                    check: ExportCheck::Valid,
                    seen: None,
                },
            )
        })
        .collect()
}

/// A ServiceExport's `spec.exportedLabels` and `spec.exportedAnnotations`,
/// if they are string maps within what a store record carries.
type StringMap = BTreeMap<String, String>;
fn exported_meta(export: &DynamicObject) -> Result<(StringMap, StringMap), String> {
    let map = |field: &str| -> Result<StringMap, String> {
        match &export.data["spec"][field] {
            serde_json::Value::Null => Ok(StringMap::new()),
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(v) => Ok((k.clone(), v.to_owned())),
                    None => Err(format!("spec.{field}.`{}`: not a string", bounded(k))),
                })
                .collect(),
            _ => Err(format!("spec.{field}: not a map")),
        }
    };
    let (labels, annotations) = (map("exportedLabels")?, map("exportedAnnotations")?);
    let meta = ExportedMeta {
        labels,
        annotations,
        ..ExportedMeta::default()
    };
    crate::records::check_exported_meta(&meta).map_err(|e| e.to_string())?;
    Ok((meta.labels, meta.annotations))
}

/// The audience fedmesh's projected service account tokens carry: a token
/// minted for the API server (or anyone else) is refused.
pub const TOKEN_AUDIENCE: &str = "fedmesh";

/// Service account tokens checked with a TokenReview: the API server says
/// who the token belongs to (and that it is not expired or revoked, and
/// its pod still exists for bound tokens).
pub struct KubeTokenReviewer {
    api: Api<k8s_openapi::api::authentication::v1::TokenReview>,
}

impl KubeTokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }
}

/// `system:serviceaccount:NS:NAME` → (NS, NAME).
pub fn service_account_of(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| (ns.to_owned(), sa.to_owned()))
}

#[async_trait::async_trait]
impl fedmesh_api::server::TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str) -> Result<(String, String), String> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(status.error.unwrap_or_else(|| "not authenticated".into()));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == TOKEN_AUDIENCE)
        {
            return Err(format!("not a token for audience `{TOKEN_AUDIENCE}`"));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_of(&user).ok_or_else(|| format!("`{user}` is not a service account"))
    }
}

/// What a gateway LoadBalancer Service advertises: every ingress IP with
/// the Service's `quic` (UDP) and `tls-fallback` (TCP) ports. Hostname-only
/// ingresses are skipped (peers need IPs) and logged by the caller.
pub fn advertised(svc: &Service) -> Gateways {
    let port = |name: &str, proto: &str| {
        svc.spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ps| {
                ps.iter()
                    .find(|p| {
                        p.name.as_deref() == Some(name)
                            && p.protocol.as_deref().unwrap_or("TCP") == proto
                    })
                    .and_then(|p| u16::try_from(p.port).ok())
            })
    };
    let ips: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .take(16)
        .collect();
    let with = |p: Option<u16>| match p {
        Some(p) => ips.iter().map(|ip| SocketAddr::new(*ip, p)).collect(),
        None => Vec::new(),
    };
    Gateways {
        quic: with(port("quic", "UDP")),
        tcp: with(port("tls-fallback", "TCP")),
    }
}

/// Follows the gateway Service `namespace/name` and sends what it
/// advertises on every change (empty until its load balancer has an IP).
pub fn watch_gateway_service(
    client: Client,
    namespace: &str,
    name: &str,
) -> (watch::Receiver<Gateways>, JoinHandle<()>) {
    let what = format!("{namespace}/{name}");
    follow_service(client, namespace, name, move |svc| {
        let g = advertised(svc);
        if g.quic.is_empty() {
            tracing::info!(service = %what, "gateway load balancer has no IP yet");
        }
        g
    })
}

/// Follows the Service `namespace/name` and sends `f` of it on every
/// change of what `f` says (`T::default()` until the Service is seen).
pub fn follow_service<T, F>(
    client: Client,
    namespace: &str,
    name: &str,
    f: F,
) -> (watch::Receiver<T>, JoinHandle<()>)
where
    T: Default + PartialEq + Send + Sync + 'static,
    F: Fn(&Service) -> T + Send + 'static,
{
    let (tx, rx) = watch::channel(T::default());
    // Cluster-wide with a field selector: the controller may list Services
    // everywhere anyway, and one code path serves every API server.
    let api: Api<Service> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!(
        "metadata.namespace={namespace},metadata.name={name}"
    ));
    let (ns, want) = (namespace.to_owned(), name.to_owned());
    let task = tokio::spawn(async move {
        let mut stream = watcher::watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                // The field selector is checked again: not every server
                // (or stand-in) applies it.
                Ok(svc)
                    if svc.name_any() == want
                        && svc.namespace().as_deref() == Some(ns.as_str()) =>
                {
                    let v = f(&svc);
                    tx.send_if_modified(|cur| {
                        let changed = *cur != v;
                        *cur = v;
                        changed
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, service = %format!("{ns}/{want}"), "watching a Service")
                }
            }
        }
    });
    (rx, task)
}
