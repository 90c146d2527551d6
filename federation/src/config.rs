//! The controller's config file (YAML) and the store it names.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::ClusterName;
use fedmesh_trust::rotation::Endorsement;
use fedmesh_trust::{TrustBundle, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::controller::ControllerSettings;
use crate::records::Locality;
use crate::store::{EmbeddedLimits, EmbeddedStore, Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub cluster: String,
    pub trust_domain: String,
    #[serde(default)]
    pub locality: Locality,
    /// QUIC addresses of this cluster's gateways, as peers reach them.
    /// May be empty with `kubernetes.gateway_service`: then they are the
    /// addresses its load balancer gets.
    #[serde(default)]
    pub gateways: Vec<SocketAddr>,
    /// TLS/TCP fallback addresses of the same gateways (HTTP/2 CONNECT),
    /// as peers reach them; peers whose path drops UDP use these.
    #[serde(default)]
    pub gateways_tcp: Vec<SocketAddr>,
    /// Where this cluster's sidecars reach its gateway: `ip:port`, or a
    /// Service's `name:port` resolved once at start (a ClusterIP is stable
    /// for the Service's life).
    #[serde(default)]
    pub gateway_tunnel: Option<fedmesh_api::addr::HostPort>,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    pub store: StoreConfig,
    /// PEM roots of this cluster's trust domain.
    pub bundle: PathBuf,
    /// JSON list of endorsements of `bundle` (after a rotation).
    #[serde(default)]
    pub endorsements: Option<PathBuf>,
    /// `<cluster>.pem` bundles admitted with `fedmesh cluster join`.
    pub pins_dir: PathBuf,
    /// The services file (file source). Exactly one of `services` and
    /// `kubernetes` names where the cluster's services come from.
    #[serde(default)]
    pub services: Option<PathBuf>,
    /// Read services from the cluster's Kubernetes API (in-cluster config
    /// or `KUBECONFIG`); needs a build with the `kube` feature.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSource>,
    /// ClusterSet IPs for ClusterSetIP services (ServiceImport `spec.ips`),
    /// allocated ClusterSet-wide in the store; none when absent.
    #[serde(default)]
    pub clusterset_ips: Option<crate::clusterset::ClusterSetIpConfig>,
    /// Serve the `clusterset.local` zone (MCS DNS) for this cluster's
    /// CoreDNS to forward to; needs `clusterset_ips`.
    #[serde(default)]
    pub dns: Option<crate::dns::server::DnsConfig>,
    /// Admin endpoint: `/metrics`, `/live`, `/ready`, `/status`.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// The config and certificate API for this cluster's proxies.
    #[serde(default)]
    pub api: Option<fedmesh_api::server::ApiConfig>,
    /// Traffic and authorization policy by service name, sent to every
    /// proxy of this cluster (read at start).
    #[serde(default)]
    pub policies: BTreeMap<String, fedmesh_catalog::ServicePolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSource {
    /// Port of every pod's sidecar inbound mTLS listener.
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// Write ServiceImports and ServiceExport conditions back.
    #[serde(default = "yes")]
    pub write_back: bool,
    /// `NAMESPACE/NAME` of the gateway's LoadBalancer Service: when
    /// `gateways` is empty, its load balancer addresses (with the
    /// Service's `quic` and `tls-fallback` ports) are advertised, and
    /// follow it when they change.
    #[serde(default)]
    pub gateway_service: Option<String>,
    /// Namespaces whose ServiceExports are refused (`Valid=False` with
    /// reason `NamespaceExcluded`); their Services stay in-cluster mesh
    /// services.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// Keep the cluster's CoreDNS forwarding `clusterset.local` to this
    /// controller's `dns` server (needs `dns`).
    #[serde(default)]
    pub coredns: Option<CorednsConfig>,
}

/// `kubernetes.coredns`: which Corefile to keep, and the Service CoreDNS
/// reaches this controller's DNS server through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorednsConfig {
    /// `NAMESPACE/NAME` of CoreDNS's ConfigMap (key `Corefile`).
    #[serde(default = "default_coredns_configmap")]
    pub configmap: String,
    /// `NAMESPACE/NAME` of the Service in front of the controller's DNS
    /// port: its cluster IPs are what CoreDNS forwards to.
    pub dns_service: String,
    /// How often the Corefile is checked besides Service changes (a hand
    /// edit is put back within this).
    #[serde(default = "default_coredns_resync", with = "humantime_serde")]
    pub resync: Duration,
}

fn default_coredns_configmap() -> String {
    "kube-system/coredns".into()
}

fn default_coredns_resync() -> Duration {
    Duration::from_secs(30)
}

/// `NAMESPACE/NAME` as two labels, or `None`.
pub fn namespaced(s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    let ok = fedmesh_wire::check_label("namespace", ns).is_ok()
        && fedmesh_wire::check_label("name", name).is_ok();
    ok.then(|| (ns.to_owned(), name.to_owned()))
}

fn default_excluded() -> Vec<String> {
    ["kube-system", "kube-public", "kube-node-lease"]
        .map(String::from)
        .to_vec()
}

fn default_inbound_port() -> u16 {
    15006
}

fn yes() -> bool {
    true
}

fn default_ttl() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process only: for one machine and tests.
    Embedded,
    Etcd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// etcd client URLs (`http://10.0.0.1:2379`); required for etcd.
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to etcd; endpoints must then be `https://`.
    #[serde(default)]
    pub tls: Option<StoreTls>,
    /// Largest single response taken from etcd (the full listing of the
    /// federation's exports is the largest).
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

fn default_max_response() -> usize {
    64 << 20
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    /// PEM CA bundle that signs etcd's server certificates.
    pub ca: PathBuf,
    /// Client certificate and key (for etcd's `--client-cert-auth`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to check in etcd's certificate (default: the endpoint host).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl StoreConfig {
    pub fn etcd(endpoints: Vec<String>) -> Self {
        Self {
            kind: StoreKind::Etcd,
            endpoints,
            connect_timeout: default_connect(),
            tls: None,
            max_response_bytes: default_max_response(),
        }
    }
}

fn default_connect() -> Duration {
    Duration::from_secs(3)
}

/// Opens the store a config names.
pub async fn open_store(cfg: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match cfg.kind {
        StoreKind::Embedded => Ok(Arc::new(EmbeddedStore::new(EmbeddedLimits::default()))),
        StoreKind::Etcd if cfg.endpoints.is_empty() => Err(StoreError::Other(
            "store.endpoints: etcd needs at least one endpoint".into(),
        )),
        StoreKind::Etcd if cfg.max_response_bytes < 64 << 10 => Err(StoreError::Other(
            "store.max_response_bytes: at least 65536".into(),
        )),
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => {
            let tls = match &cfg.tls {
                None => None,
                Some(t) => {
                    let read = |p: &Path| {
                        std::fs::read_to_string(p).map_err(|e| {
                            StoreError::Other(format!("store.tls {}: {e}", p.display()))
                        })
                    };
                    let identity = match (&t.cert, &t.key) {
                        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                        (None, None) => None,
                        _ => {
                            return Err(StoreError::Other(
                                "store.tls: cert and key go together".into(),
                            ))
                        }
                    };
                    Some(crate::store::EtcdTls {
                        ca_pem: read(&t.ca)?,
                        identity,
                        server_name: t.server_name.clone(),
                    })
                }
            };
            let s = crate::store::EtcdStore::connect(&crate::store::EtcdOptions {
                endpoints: cfg.endpoints.clone(),
                connect_timeout: cfg.connect_timeout,
                tls,
                max_response_bytes: cfg.max_response_bytes,
                ..Default::default()
            })
            .await?;
            Ok(Arc::new(s))
        }
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd => Err(StoreError::Other(
            "this fedmesh was built without the etcd store (--no-default-features); rebuild with the default features".into(),
        )),
    }
}

/// Reads every `<cluster>.pem` in `dir` as that cluster's pinned bundle.
/// The trust domain comes from the roots' SPIFFE URI SAN.
pub fn load_pins(dir: &Path) -> Result<BTreeMap<ClusterName, TrustBundle>, Vec<String>> {
    let mut pins = BTreeMap::new();
    let mut errs = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pins),
        Err(e) => return Err(vec![format!("pins_dir {}: {e}", dir.display())]),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pem") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let cluster = match ClusterName::new(stem) {
            Ok(c) => c,
            Err(e) => {
                errs.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        match read_pin(&path) {
            Ok(b) => {
                pins.insert(cluster, b);
            }
            Err(e) => errs.push(format!("{}: {e}", path.display())),
        }
    }
    if errs.is_empty() {
        Ok(pins)
    } else {
        Err(errs)
    }
}

/// A pinned bundle file: PEM roots whose URI SAN names their trust domain.
pub fn read_pin(path: &Path) -> Result<TrustBundle, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let certs = fedmesh_trust::pem::decode_certs(&text).map_err(|e| e.to_string())?;
    let first = certs.first().ok_or("no certificate")?;
    let td = fedmesh_trust::svid::inspect_ca(first)
        .map_err(|e| format!("root does not name its trust domain: {e}"))?;
    TrustBundle::new(td, certs).map_err(|e| e.to_string())
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        serde_yaml_ng::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])
    }

    /// Validates and loads everything but the store and the services.
    pub fn settings(&self) -> Result<ControllerSettings, Vec<String>> {
        let mut errs = Vec::new();
        let cluster = ClusterName::new(&self.cluster)
            .map_err(|e| errs.push(format!("cluster: {e}")))
            .ok();
        let td = TrustDomain::new(&self.trust_domain)
            .map_err(|e| errs.push(format!("trust_domain: {e}")))
            .ok();
        let discovered = self
            .kubernetes
            .as_ref()
            .is_some_and(|k| k.gateway_service.is_some());
        if self.gateways.len() > 16 || (self.gateways.is_empty() && !discovered) {
            errs.push(
                "gateways: 1 to 16 addresses (or none, with kubernetes.gateway_service)".into(),
            );
        }
        if let Some(svc) = self
            .kubernetes
            .as_ref()
            .and_then(|k| k.gateway_service.as_ref())
        {
            let ok = svc.split_once('/').is_some_and(|(ns, name)| {
                fedmesh_wire::check_label("namespace", ns).is_ok()
                    && fedmesh_wire::check_label("service name", name).is_ok()
            });
            if !ok {
                errs.push(format!(
                    "kubernetes.gateway_service `{svc}`: expected NAMESPACE/NAME"
                ));
            }
        }
        if let Some(c) = self.kubernetes.as_ref().and_then(|k| k.coredns.as_ref()) {
            for (field, v) in [("configmap", &c.configmap), ("dns_service", &c.dns_service)] {
                if namespaced(v).is_none() {
                    errs.push(format!(
                        "kubernetes.coredns.{field} `{}`: expected NAMESPACE/NAME",
                        fedmesh_wire::bounded(v)
                    ));
                }
            }
            if self.dns.is_none() {
                errs.push("kubernetes.coredns: needs dns (the server CoreDNS forwards to)".into());
            }
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&c.resync) {
                errs.push("kubernetes.coredns.resync: 1s to 1h".into());
            }
        }
        if self.gateways_tcp.len() > 16 {
            errs.push("gateways_tcp: at most 16 addresses".into());
        }
        if self.lease_ttl < Duration::from_secs(1) {
            errs.push("lease_ttl: at least 1s (etcd leases are whole seconds)".into());
        }
        let bundle = td.as_ref().and_then(|td| {
            std::fs::read_to_string(&self.bundle)
                .map_err(|e| e.to_string())
                .and_then(|t| TrustBundle::from_pem(td.clone(), &t).map_err(|e| e.to_string()))
                .map_err(|e| errs.push(format!("bundle {}: {e}", self.bundle.display())))
                .ok()
        });
        let endorsements: Vec<Endorsement> = match &self.endorsements {
            None => Vec::new(),
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                .map_err(|e| errs.push(format!("endorsements {}: {e}", p.display())))
                .unwrap_or_default(),
        };
        if self.services.is_some() == self.kubernetes.is_some() {
            errs.push("set exactly one of `services` (a file) and `kubernetes`".into());
        }
        let pinned = load_pins(&self.pins_dir)
            .map_err(|e| errs.extend(e))
            .unwrap_or_default();
        let policies = fedmesh_catalog::policy::parse_policies(&self.policies, &mut errs);
        let gateway_tunnel = self.gateway_tunnel.as_ref().and_then(|t| {
            t.resolve()
                .map_err(|e| errs.push(format!("gateway_tunnel: {e}")))
                .ok()
        });
        let clusterset_ips = self.clusterset_ips.as_ref().and_then(|c| {
            let avoid: Vec<std::net::IpAddr> = self
                .gateways
                .iter()
                .chain(&self.gateways_tcp)
                .map(|a| a.ip())
                .collect();
            c.check(&avoid)
                .map_err(|e| errs.push(format!("clusterset_ips: {e}")))
                .ok()
        });
        if let Some(d) = &self.dns {
            errs.extend(d.problems());
            if self.clusterset_ips.is_none() {
                errs.push(
                    "dns: needs clusterset_ips (a service's A and AAAA records are its ClusterSet IPs)"
                        .into(),
                );
            }
        }
        match (cluster, td, bundle) {
            (Some(cluster), Some(trust_domain), Some(bundle)) if errs.is_empty() => {
                Ok(ControllerSettings {
                    cluster,
                    trust_domain,
                    locality: self.locality.clone(),
                    gateways: self.gateways.clone(),
                    gateways_tcp: self.gateways_tcp.clone(),
                    gateway_tunnel,
                    lease_ttl: self.lease_ttl,
                    bundle,
                    endorsements,
                    pinned,
                    policies,
                    clusterset_ips,
                })
            }
            _ => Err(errs),
        }
    }
}
