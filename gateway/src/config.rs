//! The gateway's config file (YAML) and its validation into settings.

use std::net::SocketAddr;
use std::path::Path;

use fedmesh_api::client::{initial_catalog, ControllerLink};
use fedmesh_catalog::{Catalog, CatalogSpec};
use fedmesh_transport::{load_trust, BundleFile, IdentityFiles, Limits};
use fedmesh_trust::{SharedBundles, Svid};
use serde::{Deserialize, Serialize};

use crate::congestion::CongestionConfig;
use crate::drills::DrillsConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: Listen,
    pub identity: IdentityFiles,
    pub bundles: Vec<BundleFile>,
    /// Static catalog; absent when `controller` provides it.
    #[serde(default)]
    pub catalog: Option<CatalogSpec>,
    /// Follow this cluster's controller for config and SVID renewal.
    #[serde(default)]
    pub controller: Option<ControllerLink>,
    #[serde(default)]
    pub limits: Limits,
    /// Congestion control of what this gateway sends to its peers.
    #[serde(default)]
    pub congestion: CongestionConfig,
    /// The drill API: operators set faults over mTLS; off when absent.
    #[serde(default)]
    pub drills: Option<DrillsConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// UDP address for QUIC from peer gateways.
    pub quic: SocketAddr,
    /// TCP address for mTLS tunnels from this cluster's sidecars.
    pub tunnel: SocketAddr,
    /// TCP address of the fallback for peers whose path drops UDP (TLS +
    /// HTTP/2 CONNECT); off when absent. Advertise it to peers with the
    /// controller's `gateways_tcp`.
    #[serde(default)]
    pub tcp_fallback: Option<SocketAddr>,
    /// Admin endpoint (`/metrics`, `/live`, `/ready`); off when absent.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
}

/// Everything a gateway needs, validated and loaded.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub catalog: Catalog,
    pub identity: Svid,
    pub bundles: SharedBundles,
    pub quic: SocketAddr,
    pub tunnel: SocketAddr,
    pub tcp_fallback: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    pub congestion: CongestionConfig,
    pub controller: Option<ControllerLink>,
    pub drills: Option<DrillsConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("gateway config {path}:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub path: String,
    pub problems: Vec<String>,
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<GatewaySettings, ConfigError> {
        let err = |problems| ConfigError {
            path: path.display().to_string(),
            problems,
        };
        let cfg: GatewayConfig = fedmesh_transport::read_yaml(path).map_err(err)?;
        cfg.settings().map_err(err)
    }

    /// Validates every part, collecting all problems before failing.
    pub fn settings(&self) -> Result<GatewaySettings, Vec<String>> {
        let mut problems = self.limits.problems();
        problems.extend(self.congestion.problems());
        if let Some(d) = &self.drills {
            problems.extend(d.problems());
        }
        let trust = load_trust(&self.identity, &self.bundles)
            .map_err(|e| problems.extend(e))
            .ok();
        let id = trust.as_ref().map(|(svid, _)| svid.id());
        let catalog = initial_catalog(self.catalog.as_ref(), self.controller.as_ref(), id)
            .map_err(|e| problems.extend(e))
            .ok();
        if let (Some(c), Some((svid, _))) = (&catalog, &trust) {
            if svid.id() != &c.gateway_identity() {
                problems.push(format!(
                    "identity {} is not this cluster's gateway identity {} (set catalog.gateway.identity to match)",
                    svid.id(),
                    c.gateway_identity()
                ));
            }
        }
        match (catalog, trust) {
            (Some(catalog), Some((identity, bundles))) if problems.is_empty() => {
                Ok(GatewaySettings {
                    catalog,
                    identity,
                    bundles,
                    quic: self.listen.quic,
                    tunnel: self.listen.tunnel,
                    tcp_fallback: self.listen.tcp_fallback,
                    admin: self.listen.admin,
                    limits: self.limits.clone(),
                    congestion: self.congestion.clone(),
                    controller: self.controller.clone(),
                    drills: self.drills.clone(),
                })
            }
            _ => Err(problems),
        }
    }
}
