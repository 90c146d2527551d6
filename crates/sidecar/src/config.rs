//! The sidecar's config file (YAML) and its validation into settings.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fedmesh_api::client::{initial_catalog, ControllerLink};
use fedmesh_catalog::{Catalog, CatalogSpec};
use fedmesh_transport::{load_trust, BundleFile, IdentityFiles, Limits};
use fedmesh_trust::{SharedBundles, Svid};
use fedmesh_wire::ServiceName;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub identity: IdentityFiles,
    pub bundles: Vec<BundleFile>,
    /// Static catalog; absent when `controller` provides it.
    #[serde(default)]
    pub catalog: Option<CatalogSpec>,
    /// Follow this cluster's controller for config and SVID renewal.
    #[serde(default)]
    pub controller: Option<ControllerLink>,
    #[serde(default)]
    pub outbound: Vec<Outbound>,
    #[serde(default)]
    pub inbound: Option<Inbound>,
    /// Where redirected connections arrive (`fedmesh redirect` sends the
    /// pod's outbound TCP here): a connection to a service's VIP is
    /// routed as that service, anything else passes through as sent.
    #[serde(default)]
    pub transparent: Option<Transparent>,
    /// Admin endpoint (`/metrics`, `/live`, `/ready`); off when absent.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    #[serde(default)]
    pub limits: Limits,
    /// Bounds and timeouts of the L7 (HTTP) path.
    #[serde(default)]
    pub http: HttpLimits,
}

/// How an outbound listener treats its connections. YAML: `detect`
/// (default) or `tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundProtocol {
    /// HTTP/1.x and HTTP/2 (prior knowledge) are proxied per request;
    /// anything else is spliced. An app that waits for the server to speak
    /// first (SMTP, MySQL, a banner) waits `http.detect_timeout` once per
    /// connection: declare such listeners `tcp`.
    #[default]
    Detect,
    /// Always splice bytes (L4), no detection delay.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// How long the app may take to send its first bytes before the
    /// connection is treated as opaque.
    #[serde(with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Largest HTTP/1 request line + headers, and HTTP/2 header list.
    pub max_header_bytes: usize,
    /// Largest request body held for a retry; larger or unsized bodies
    /// are streamed and sent once.
    pub max_retry_body_bytes: usize,
    /// Idle upstream HTTP/1 connections kept per destination.
    pub max_idle_per_upstream: usize,
    /// An idle pooled upstream connection is closed after this; an app's
    /// keep-alive connection too (idle, or slow to send a request head).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// No new request goes on an upstream connection older than this (it
    /// is closed once its requests finish): bounds how long traffic stays
    /// on a destination that drains or is no longer preferred.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Concurrent requests per downstream HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            detect_timeout: Duration::from_millis(500),
            max_header_bytes: 64 * 1024,
            max_retry_body_bytes: 64 * 1024,
            max_idle_per_upstream: 16,
            idle_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(5),
            max_concurrent_streams: 256,
        }
    }
}

impl HttpLimits {
    pub fn problems(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (name, d) in [
            ("detect_timeout", self.detect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("max_connection_age", self.max_connection_age),
        ] {
            if d.is_zero() {
                v.push(format!("http.{name} must be more than zero"));
            }
        }
        if !(8 * 1024..=1 << 20).contains(&self.max_header_bytes) {
            v.push("http.max_header_bytes must be within 8KiB..=1MiB".into());
        }
        if self.max_retry_body_bytes > 16 << 20 {
            v.push("http.max_retry_body_bytes must be at most 16MiB".into());
        }
        if self.max_idle_per_upstream > 1024 {
            v.push("http.max_idle_per_upstream must be at most 1024".into());
        }
        if self.max_concurrent_streams == 0 || self.max_concurrent_streams > 10_000 {
            v.push("http.max_concurrent_streams must be within 1..=10000".into());
        }
        v
    }
}

/// An explicit outbound listener: the app connects to `listen` to reach
/// `service:port` wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    pub listen: SocketAddr,
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: OutboundProtocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transparent {
    /// Usually `0.0.0.0:15001` (the redirect's target port).
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// mTLS listener other sidecars and the gateway connect to.
    pub listen: SocketAddr,
    #[serde(default)]
    pub services: Vec<InboundService>,
    /// Serve every service the catalog lists this sidecar (its identity)
    /// as an endpoint of, on these ports, from the app at 127.0.0.1:port:
    /// the Kubernetes shape, where the controller knows which Services
    /// select the pod and the pod knows its container ports.
    #[serde(default)]
    pub app_ports: Vec<u16>,
}

/// A service port this sidecar serves, and where its app listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundService {
    pub service: String,
    pub port: u16,
    pub app: SocketAddr,
}

/// An outbound listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRoute {
    pub listen: SocketAddr,
    pub service: ServiceName,
    pub port: u16,
    pub protocol: OutboundProtocol,
}

/// A served service port and its app, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRoute {
    pub service: ServiceName,
    pub port: u16,
    pub app: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSettings {
    pub listen: SocketAddr,
    pub routes: Vec<InboundRoute>,
    /// Ports served for any service listing this sidecar (see `Inbound`).
    pub app_ports: Vec<u16>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub catalog: Catalog,
    pub identity: Svid,
    pub bundles: SharedBundles,
    pub outbound: Vec<OutboundRoute>,
    pub inbound: Option<InboundSettings>,
    pub transparent: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    pub http: HttpLimits,
    pub controller: Option<ControllerLink>,
}

#[derive(Debug, thiserror::Error)]
#[error("sidecar config {path}:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub path: String,
    pub problems: Vec<String>,
}

impl SidecarConfig {
    pub fn load(path: &Path) -> Result<SidecarSettings, ConfigError> {
        let err = |problems| ConfigError {
            path: path.display().to_string(),
            problems,
        };
        let cfg: SidecarConfig = fedmesh_transport::read_yaml(path).map_err(err)?;
        cfg.settings().map_err(err)
    }

    pub fn settings(&self) -> Result<SidecarSettings, Vec<String>> {
        let mut problems = self.limits.problems();
        problems.extend(self.http.problems());
        let trust = load_trust(&self.identity, &self.bundles)
            .map_err(|e| problems.extend(e))
            .ok();
        let id = trust.as_ref().map(|(svid, _)| svid.id());
        let catalog = initial_catalog(self.catalog.as_ref(), self.controller.as_ref(), id)
            .map_err(|e| problems.extend(e))
            .ok();
        if let (Some(c), Some((svid, _))) = (&catalog, &trust) {
            if svid.id().trust_domain_name() != c.trust_domain.as_str() {
                problems.push(format!(
                    "identity {} is not in this cluster's trust domain {}",
                    svid.id(),
                    c.trust_domain
                ));
            }
        }
        let mut listens = BTreeSet::new();
        let mut outbound = Vec::new();
        for (i, o) in self.outbound.iter().enumerate() {
            match ServiceName::parse(&o.service) {
                Ok(name) => {
                    if o.port == 0 {
                        problems.push(format!("outbound[{i}]: port 0"));
                    }
                    // A controller-fed catalog is empty until the first
                    // update; only a static one can be checked here.
                    if let (Some(c), Some(_)) = (&catalog, &self.catalog) {
                        if c.service(&name).is_none() && c.imports(&name).is_empty() {
                            problems.push(format!(
                                "outbound[{i}]: service {name} is neither served here nor imported"
                            ));
                        }
                    }
                    outbound.push(OutboundRoute {
                        listen: o.listen,
                        service: name,
                        port: o.port,
                        protocol: o.protocol,
                    });
                }
                Err(e) => problems.push(format!("outbound[{i}]: {e}")),
            }
            if o.listen.port() != 0 && !listens.insert(o.listen) {
                problems.push(format!("outbound[{i}]: {} is used twice", o.listen));
            }
        }
        let inbound = self.inbound.as_ref().map(|inb| {
            let mut svcs = Vec::new();
            for (i, s) in inb.services.iter().enumerate() {
                match ServiceName::parse(&s.service) {
                    Ok(service) => svcs.push(InboundRoute {
                        service,
                        port: s.port,
                        app: s.app,
                    }),
                    Err(e) => problems.push(format!("inbound.services[{i}]: {e}")),
                }
            }
            if svcs.is_empty() && inb.services.is_empty() && inb.app_ports.is_empty() {
                problems.push("inbound: needs services or app_ports".into());
            }
            if inb.app_ports.contains(&0) {
                problems.push("inbound.app_ports: port 0".into());
            }
            InboundSettings {
                listen: inb.listen,
                routes: svcs,
                app_ports: inb.app_ports.clone(),
            }
        });
        match (catalog, trust) {
            (Some(catalog), Some((identity, bundles))) if problems.is_empty() => {
                Ok(SidecarSettings {
                    catalog,
                    identity,
                    bundles,
                    outbound,
                    inbound,
                    transparent: self.transparent.as_ref().map(|t| t.listen),
                    admin: self.admin,
                    limits: self.limits.clone(),
                    http: self.http.clone(),
                    controller: self.controller.clone(),
                })
            }
            _ => Err(problems),
        }
    }
}
