//! The sidecar's config file (YAML) and its validation into settings.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

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
    /// Admin endpoint (`/metrics`, `/live`, `/ready`); off when absent.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    #[serde(default)]
    pub limits: Limits,
}

/// An explicit outbound listener: the app connects to `listen` to reach
/// `service:port` wherever it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    pub listen: SocketAddr,
    pub service: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// mTLS listener other sidecars and the gateway connect to.
    pub listen: SocketAddr,
    pub services: Vec<InboundService>,
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
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub catalog: Catalog,
    pub identity: Svid,
    pub bundles: SharedBundles,
    pub outbound: Vec<OutboundRoute>,
    pub inbound: Option<InboundSettings>,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
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
            if svcs.is_empty() && inb.services.is_empty() {
                problems.push("inbound: needs at least one service".into());
            }
            InboundSettings {
                listen: inb.listen,
                routes: svcs,
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
                    admin: self.admin,
                    limits: self.limits.clone(),
                    controller: self.controller.clone(),
                })
            }
            _ => Err(problems),
        }
    }
}
